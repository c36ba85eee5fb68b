"""Eltwise, BatchNorm, Scale and Bias against Caffe's formulas (tests/numpy_ref.py).

Eltwise MAX inputs are drawn from {-1, 0, 1} so ties are everywhere: the gradient must go
to Caffe's winner (bottom 1 on a 0/1 tie, otherwise the first maximum). Sums that may
cancel (Eltwise SUM, x * s + b, x - mean) are compared relative to their terms' size
(numpy_ref.rel_err). Tolerances: float64 1e-10 (measured max 3.2e-16); float32 from the
measured maxima of two LAYER_EXAMPLES=1000 runs with LAYER_ERRORS_LOG, times ~3.5.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy_ref as ref
from porting.layers import build_layer

TOL32 = 6e-7  # measured max 1.63e-7 (Eltwise, Scale, Bias; forward and diffs)
TOL32_BN = 1.2e-6  # measured max 3.29e-7 (1 / blob2 scaling, means of squares, then 1/sqrt)

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=shapes, op=st.sampled_from(["SUM", "PROD", "MAX"]), n=st.integers(2, 4), with_coeff=st.booleans(),
       stable=st.booleans(), seed=st.integers(0, 2**16))
def test_eltwise(shape, op, n, with_coeff, stable, seed):
    rng = np.random.default_rng(seed)
    if op == "MAX":
        xs = [rng.integers(-1, 2, size=shape).astype(np.float64) for _ in range(n)]
    else:
        xs = [ref.f32(rng.normal(size=shape)) for _ in range(n)]
    coeffs = [float(np.float32(c)) for c in rng.choice([1.0, -1.0, 0.5, 2.0, 0.0], size=n)] \
        if (op == "SUM" and with_coeff) else None
    dy = ref.f32(rng.normal(size=shape))
    top, mask = ref.eltwise_forward(xs, op, coeffs)
    grads = ref.eltwise_backward(xs, top, dy, op, coeffs, mask, stable)
    fields = [f"operation: {op}"] + [f"coeff: {c!r}" for c in coeffs or []]
    if op == "PROD":
        fields.append(f"stable_prod_grad: {str(stable).lower()}")
        zero = [np.abs(x).min() for x in xs]
        if not stable and min(zero) == 0:  # y / x at x = 0: NaN/inf in Caffe too; keep inputs nonzero
            return
    magnitudes = {}
    if op == "SUM":  # terms of the sum, which may cancel
        magnitudes[("top", 0)] = ref.eltwise_forward([np.abs(x) for x in xs], "SUM", [abs(c) for c in coeffs or []])[0]
    ref.check_layer(f'type: "Eltwise" eltwise_param {{ {" ".join(fields)} }}', xs, [dy], [top], grads, tol32=TOL32,
                    magnitudes=magnitudes)


def test_eltwise_max_tie_rule():
    """Caffe: bottom 0 wins only if strictly greater than bottom 1; later bottoms if strictly greater."""
    x0 = np.array([1.0, 1.0, 0.0, 2.0])
    x1 = np.array([1.0, 0.0, 0.0, 1.0])
    x2 = np.array([0.0, 1.0, 0.0, 2.0])
    layer = build_layer('type: "Eltwise" eltwise_param { operation: MAX }', [(4,)] * 3)
    (top,), grads, _ = ref.run_layer(layer, [x0, x1, x2], [np.ones(4)])
    assert np.array_equal(top, [1, 1, 0, 2])
    winners = np.argmax(np.stack(grads), axis=0)
    assert winners.tolist() == [1, 0, 1, 0]  # 0/1 tie -> 1; 0 beats 1, ties 2 -> 0; all tie -> 1; 0 ties 2 -> 0
    assert np.array_equal(np.stack(grads).sum(0), np.ones(4))


def test_eltwise_refusals():
    with pytest.raises(ValueError, match="coefficients only for SUM"):
        build_layer('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [(2,), (2,)])
    with pytest.raises(ValueError, match="1 coeff"):
        build_layer('type: "Eltwise" eltwise_param { coeff: 1 }', [(2,), (2,)])
    with pytest.raises(ValueError, match="same shape"):
        build_layer('type: "Eltwise"', [(2,), (3,)])
    with pytest.raises(ValueError, match="2\\+ bottom"):
        build_layer('type: "Eltwise"', [(2,)])
    assert build_layer('type: "Eltwise" eltwise_param { coeff: 1 coeff: -1 }', [(2,), (2,)]).describe() == "SUM 1,-1"


def _bn_blobs(rng, c, factor):
    return [ref.f32(rng.normal(size=c) * factor), ref.f32(rng.uniform(0.5, 2.0, size=c) * factor),
            np.array([factor])]


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
       factor=st.sampled_from([0.0, 1.0, 999.98236083984375, 0.5]), eps=st.sampled_from([1e-5, 1e-3]),
       seed=st.integers(0, 2**16))
def test_batch_norm_global_stats(shape, factor, eps, seed):
    rng = np.random.default_rng(seed)
    c = 1 if len(shape) == 1 else shape[1]
    x, dy = ref.f32(rng.normal(size=shape)), ref.f32(rng.normal(size=shape))
    blobs = _bn_blobs(rng, c, factor)
    eps = float(np.float32(eps))
    top, std, _ = ref.batch_norm_forward(x, blobs, eps, use_global_stats=True)
    dx = ref.batch_norm_backward(top, std, dy, use_global_stats=True)
    mean = (0.0 if factor == 0 else 1.0 / factor) * blobs[0]
    terms = (np.abs(x) + ref._channel_view(np.abs(mean), x.ndim)) / ref._channel_view(std, x.ndim)  # x - mean
    ref.check_layer(f'type: "BatchNorm" batch_norm_param {{ eps: {eps!r} }}', [x], [dy], [top], [dx],
                    [None, None, None], blobs=blobs, tol32=TOL32_BN, magnitudes={("top", 0): terms})


def test_batch_norm_factor_zero_means_no_statistics():
    """A zero scale factor (untrained blobs) gives mean 0 and variance 0: y = x / sqrt(eps)."""
    x = np.arange(12.0).reshape(2, 3, 2)
    layer = build_layer('type: "BatchNorm"', [x.shape], [np.ones(3), np.ones(3), np.zeros(1)])
    (top,), _, _ = ref.run_layer(layer, [x])
    np.testing.assert_allclose(top, x / np.sqrt(float(np.float32(1e-5))), rtol=1e-12)


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple), phase=st.sampled_from(["TRAIN", "TEST"]),
       seed=st.integers(0, 2**16))
def test_batch_norm_batch_stats(shape, phase, seed):
    """Batch statistics (TRAIN default, or use_global_stats: false), the running-sum update."""
    rng = np.random.default_rng(seed)
    # at least four values per channel: with two, y = +-1 whatever x and the gradient is
    # pure cancellation (ill-conditioned in float32, not a property of the port)
    shape = (max(shape[0], 2 if int(np.prod(shape[2:])) >= 2 else 4),) + shape[1:]
    x, dy = ref.f32(rng.normal(loc=1.0, size=shape)), ref.f32(rng.normal(size=shape))
    blobs = _bn_blobs(rng, shape[1], 3.0)
    maf = float(np.float32(0.999))  # moving_average_fraction's default, as the float32 field holds it
    top, std, new_blobs = ref.batch_norm_forward(x, blobs, float(np.float32(1e-5)), use_global_stats=False, maf=maf)
    dx = ref.batch_norm_backward(top, std, dy, use_global_stats=False)
    text = 'type: "BatchNorm"' + (' phase: TRAIN' if phase == "TRAIN" else
                                  ' phase: TEST batch_norm_param { use_global_stats: false }')
    axes = (0,) + tuple(range(2, x.ndim))
    std_view = ref._channel_view(std, x.ndim)
    magnitudes = {  # x - mean and dy - mean(dy) - ... cancel: errors relative to the terms' size
        ("top", 0): (np.abs(x) + np.abs(x).mean(axis=axes, keepdims=True)) / std_view,
        ("bottom diff", 0): (np.abs(dy) + np.abs(dy).mean(axis=axes, keepdims=True)
                             + np.abs(dy * top).mean(axis=axes, keepdims=True) * np.abs(top)) / std_view}
    ref.check_layer(text, [x], [dy], [top], [dx], [None, None, None], blobs=blobs, tol32=TOL32_BN,
                    magnitudes=magnitudes)
    layer = build_layer(text, [x.shape], blobs).double()
    ref.run_layer(layer, [x])
    for got, want in zip(layer.blobs, new_blobs):
        assert ref.rel_err(got.detach().numpy(), want) <= 1e-10


def test_batch_norm_phase_default_and_frozen_blobs():
    test = build_layer('type: "BatchNorm" phase: TEST', [(2, 3)])
    train = build_layer('type: "BatchNorm" phase: TRAIN', [(2, 3)])
    assert test.use_global_stats and not train.use_global_stats
    assert test.param_shapes == [(3,), (3,), (1,)] and not any(b.requires_grad for b in test.blobs)


def _operand_axes(shape, axis, num_axes):
    start = axis % len(shape)
    return shape[start:] if num_axes == -1 else shape[start:start + num_axes], start


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple), axis_pick=st.integers(0, 7),
       num_axes_pick=st.integers(-1, 3), kind=st.sampled_from(["Scale", "Bias"]), bias_term=st.booleans(),
       two_bottoms=st.booleans(), seed=st.integers(0, 2**16))
def test_scale_and_bias(shape, axis_pick, num_axes_pick, kind, bias_term, two_bottoms, seed):
    rng = np.random.default_rng(seed)
    start = axis_pick % len(shape)
    num_axes = min(num_axes_pick, len(shape) - start)
    operand_shape = shape[start:] if num_axes == -1 else shape[start:start + num_axes]
    axis = start - len(shape) if axis_pick >= 4 else start  # negative axes too
    x, dy = ref.f32(rng.normal(size=shape)), ref.f32(rng.normal(size=shape))
    operand = ref.f32(rng.normal(size=operand_shape))
    bias = ref.f32(rng.normal(size=operand_shape)) if (kind == "Scale" and bias_term) else None
    ndim = len(operand_shape)
    if kind == "Scale":
        top = ref.scale_forward(x, operand, start, bias)
        dx, d_operand = ref.scale_backward(x, operand, dy, start)
        fields = f"axis: {axis} num_axes: {num_axes} bias_term: {str(bias_term).lower()}"
        text = f'type: "Scale" scale_param {{ {fields} }}'
        magnitude = ref.scale_backward(np.abs(x), operand, np.abs(dy), start)[1]
    else:
        top = ref.scale_forward(x, np.ones(operand_shape), start, operand)
        dx, d_operand = dy, ref.bias_backward(dy, ndim, start)
        text = f'type: "Bias" bias_param {{ axis: {axis} num_axes: {num_axes} }}'
        magnitude = ref.bias_backward(np.abs(dy), ndim, start)
    if kind == "Scale":  # x * s + b, and x + b, may cancel
        top_terms = ref.scale_forward(np.abs(x), np.abs(operand), start, None if bias is None else np.abs(bias))
    else:
        top_terms = ref.scale_forward(np.abs(x), np.ones(operand_shape), start, np.abs(operand))
    d_bias = ref.bias_backward(dy, ndim, start) if bias is not None else None
    m_bias = ref.bias_backward(np.abs(dy), ndim, start) if bias is not None else None
    if two_bottoms:
        bottoms, grads, blobs = [x, operand], [dx, d_operand], [bias] if bias is not None else []
        blob_grads, mags = [d_bias], {("bottom diff", 1): magnitude, ("blob diff", 0): m_bias}
    else:
        bottoms, grads, blobs = [x], [dx], [operand] + ([bias] if bias is not None else [])
        blob_grads, mags = [d_operand, d_bias], {("blob diff", 0): magnitude, ("blob diff", 1): m_bias}
    mags[("top", 0)] = top_terms
    layer = build_layer(text, [b.shape for b in bottoms], blobs or None)
    assert [tuple(s) for s in layer.param_shapes] == [b.shape for b in blobs]
    ref.check_layer(text, bottoms, [dy], [top], grads, [g for g in blob_grads if g is not None] or (),
                    blobs=blobs or None, tol32=TOL32, magnitudes=mags)


def test_scale_two_bottoms_with_bias_shapes():
    """Scale with a second bottom: the bias blob takes the second bottom's shape (Caffe)."""
    layer = build_layer('type: "Scale" scale_param { axis: 1 bias_term: true }', [(2, 3, 4, 5), (3, 4)])
    assert layer.param_shapes == [(3, 4)]
    one = build_layer('type: "Scale" scale_param { bias_term: true }', [(2, 3, 4, 5)])
    assert one.param_shapes == [(3,), (3,)] and one.describe() == "axis 1 +bias"
    scalar = build_layer('type: "Scale" scale_param { num_axes: 0 }', [(2, 3)])
    assert scalar.param_shapes == [()]
    with pytest.raises(ValueError, match="does not match"):
        build_layer('type: "Scale"', [(2, 3, 4), (4,)])
