"""Pooling against Caffe's own loops (tests/numpy_ref.py), forward and backward.

Covers Caffe's output-size rules (ceil rounding, the pad clip rule, FLOOR round_mode,
global pooling), the AVE divisor that counts padding up to the padded border, empty
windows, and MAX tie-breaking (gradient to the first maximum in scan order) on ReLU-style
inputs full of exact zeros. AVE sums and the diffs of overlapping windows are compared
relative to the same sums over absolute values (numpy_ref.rel_err). Tolerances: float64
1e-10 (measured: exactly equal); float32 from the measured maximum of two
LAYER_EXAMPLES=1000 runs with LAYER_ERRORS_LOG, times ~4.
"""
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import numpy_ref as ref
from porting.layers import build_layer

TOL32 = 6e-7  # measured max 1.40e-7 (4000 comparisons; MAX tops are exact, diffs add overlaps)


def _pool_text(method, kernel, stride, pad, round_mode="CEIL", global_pooling=False):
    fields = [f"pool: {method}", f"round_mode: {round_mode}"]
    if global_pooling:
        fields.append("global_pooling: true")
    else:
        fields.append(f"kernel_size: {kernel[0]}" if kernel[0] == kernel[1] else
                      f"kernel_h: {kernel[0]} kernel_w: {kernel[1]}")
        fields.append(f"stride: {stride[0]}" if stride[0] == stride[1] else
                      f"stride_h: {stride[0]} stride_w: {stride[1]}")
        if pad != (0, 0):
            fields.append(f"pad: {pad[0]}" if pad[0] == pad[1] else f"pad_h: {pad[0]} pad_w: {pad[1]}")
    return f'name: "pool" type: "Pooling" pooling_param {{ {" ".join(fields)} }}'


def _check_pool(method, x, kernel, stride, pad, round_mode="CEIL", global_pooling=False, seed=0):
    height, width = x.shape[2:]
    if global_pooling:
        kernel, stride, pad = (height, width), (1, 1), (0, 0)
    pooled = ref.pool_geometry(height, width, kernel, stride, pad, round_mode == "CEIL")
    layer = build_layer(_pool_text(method, kernel, stride, pad, round_mode, global_pooling), [x.shape])
    assert layer.top_shapes == [x.shape[:2] + pooled]
    top, mask = ref.pool_forward(x, method, kernel, stride, pad, pooled)
    dy = ref.f32(np.random.default_rng(seed).normal(size=top.shape))
    dx = ref.pool_backward(dy, x.shape, method, kernel, stride, pad, mask)
    magnitudes = {  # AVE sums and overlapping windows' diffs may cancel: the same sums of |.|
        ("top", 0): ref.pool_forward(np.abs(x), method, kernel, stride, pad, pooled)[0],
        ("bottom diff", 0): ref.pool_backward(np.abs(dy), x.shape, method, kernel, stride, pad, mask)}
    ref.check_layer(_pool_text(method, kernel, stride, pad, round_mode, global_pooling), [x], [dy], [top], [dx],
                    tol32=TOL32, magnitudes=magnitudes)
    return top, dx


def _input(rng, shape, relu):
    x = rng.normal(size=shape)
    return ref.f32(np.maximum(x, 0) if relu else x)


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(method=st.sampled_from(["MAX", "AVE"]), n=st.integers(1, 2), c=st.integers(1, 2),
       size=st.tuples(st.integers(1, 9), st.integers(1, 9)), kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), pad_frac=st.tuples(st.integers(0, 3), st.integers(0, 3)),
       round_mode=st.sampled_from(["CEIL", "FLOOR"]), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_pooling_matches_caffe_loops(method, n, c, size, kernel, stride, pad_frac, round_mode, relu, seed):
    pad = tuple(min(p, k - 1) for p, k in zip(pad_frac, kernel))  # Caffe requires pad < kernel
    pooled = ref.pool_geometry(*size, kernel, stride, pad, round_mode == "CEIL")
    assume(min(pooled) > 0)
    x = _input(np.random.default_rng(seed), (n, c) + size, relu)
    _check_pool(method, x, kernel, stride, pad, round_mode, seed=seed)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("size,kernel,stride,pad,pooled", [
    ((6, 6), (3, 3), (2, 2), (0, 0), (3, 3)),  # ceil adds a partial window (floor would give 2)
    ((55, 55), (3, 3), (2, 2), (0, 0), (27, 27)),  # CaffeNet pool1
    ((3, 3), (2, 2), (2, 2), (1, 1), (2, 2)),  # ceil gives 3; the clip rule drops the window in the padding
    ((2, 7), (3, 3), (2, 2), (2, 1), (2, 4)),  # clip rule on one axis only
    ((5, 5), (3, 3), (2, 2), (1, 1), (3, 3)),  # AVE divisor counts the padding at both borders
    ((7, 4), (3, 2), (2, 1), (1, 1), (4, 5)),  # asymmetric kernel / stride, padding
    ((6, 6), (1, 1), (3, 3), (0, 0), (3, 3)),  # pad 0, stride > kernel: last window starts at the border
    ((5, 5), (1, 1), (3, 3), (0, 0), (3, 3)),  # ... and past it (empty window)
])
def test_pooling_rounding_edge_cases(method, size, kernel, stride, pad, pooled):
    x = _input(np.random.default_rng(1), (2, 3) + size, relu=False)
    assert ref.pool_geometry(*size, kernel, stride, pad) == pooled
    _check_pool(method, x, kernel, stride, pad)


def test_empty_windows_give_caffes_values():
    """Caffe: MAX keeps its -FLT_MAX start value, AVE divides 0 by its divisor (0 -> NaN)."""
    x = ref.f32(np.random.default_rng(2).normal(size=(1, 1, 6, 6)))
    max_top, _ = _check_pool("MAX", x, (1, 1), (3, 3), (0, 0))
    ave_top, _ = _check_pool("AVE", x, (1, 1), (3, 3), (0, 0))
    assert (max_top[0, 0, 2] == -ref.FLT_MAX).all() and np.isnan(ave_top[0, 0, 2]).all()


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("size", [(1, 1), (6, 6), (7, 5)])
def test_global_pooling(method, size):
    x = _input(np.random.default_rng(3), (2, 3) + size, relu=True)
    top, _ = _check_pool(method, x, None, None, None, global_pooling=True)
    expected = x.max(axis=(2, 3)) if method == "MAX" else x.mean(axis=(2, 3))
    np.testing.assert_allclose(top[:, :, 0, 0], expected, rtol=1e-12)


@pytest.mark.parametrize("kernel,stride,pad", [((3, 3), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)),
                                               ((2, 2), (1, 1), (1, 1))])
def test_max_ties_route_gradient_to_first_maximum(kernel, stride, pad):
    """All-zero windows (dead ReLUs) and plateaus: the whole gradient goes to the first cell."""
    x = np.zeros((1, 2, 7, 7))
    x[0, 1, 2:5, 2:5] = 1.0  # a plateau of equal maxima
    _, dx = _check_pool("MAX", x, kernel, stride, pad)
    pooled = ref.pool_geometry(7, 7, kernel, stride, pad)
    # every window's gradient lands on one cell: the count of cells hit is at most the windows
    assert np.count_nonzero(dx[0, 0]) <= pooled[0] * pooled[1]
    # the top-left zero window's gradient lands on its first in-image cell
    assert dx[0, 0, 0, 0] != 0


def test_pooling_follows_a_new_input_size():
    layer = build_layer(_pool_text("AVE", (3, 3), (2, 2), (1, 1)), [(1, 1, 5, 5)])
    x = ref.f32(np.random.default_rng(4).normal(size=(1, 1, 8, 6)))
    pooled = ref.pool_geometry(8, 6, (3, 3), (2, 2), (1, 1))
    expected, _ = ref.pool_forward(x, "AVE", (3, 3), (2, 2), (1, 1), pooled)
    (got,), _, _ = ref.run_layer(layer, [x])
    assert ref.rel_err(got, expected) <= 1e-10


def test_pooling_describe_and_refusals():
    assert build_layer(_pool_text("MAX", (3, 3), (2, 2), (0, 0)), [(1, 96, 55, 55)]).describe() == "MAX k3 s2 p0"
    assert build_layer(_pool_text("AVE", None, None, None, global_pooling=True),
                       [(1, 8, 7, 7)]).describe() == "AVE global"
    with pytest.raises(ValueError, match="STOCHASTIC"):
        build_layer('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 }', [(1, 1, 4, 4)])
    with pytest.raises(ValueError, match="pad"):
        build_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 pad: 2 }', [(1, 1, 4, 4)])
    with pytest.raises(ValueError, match="global_pooling"):
        build_layer('type: "Pooling" pooling_param { pool: MAX global_pooling: true stride: 2 }', [(1, 1, 4, 4)])
    with pytest.raises(ValueError, match="kernel_size"):
        build_layer('type: "Pooling" pooling_param { pool: MAX }', [(1, 1, 4, 4)])


def test_torch_ceil_mode_differs_where_caffe_rules_matter():
    """Why pooling is not plain max_pool2d(ceil_mode=True): pad 0 with stride > kernel."""
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    layer = build_layer(_pool_text("MAX", (1, 1), (3, 3), (0, 0)), [x.shape])
    assert layer(x)[0].shape[-1] == 3
    assert torch.nn.functional.max_pool2d(x, 1, 3, ceil_mode=True).shape[-1] == 2
