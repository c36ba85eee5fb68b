"""LRN against Caffe's formulas (tests/numpy_ref.py): ACROSS_CHANNELS with Caffe's
CrossChannelBackward formula, WITHIN_CHANNEL as Caffe's split/power/AVE-pool/power/product
chain with each sub-layer's backward.

The bottom diff is a difference of two terms, so its error is taken relative to the sum
of their absolute values (numpy_ref.rel_err). Tolerances: float64 1e-10 (measured max
5.3e-16); float32 from the measured maximum of two LAYER_EXAMPLES=1000 runs with
LAYER_ERRORS_LOG, times ~4.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy_ref as ref
from porting.layers import build_layer

TOL32 = 1e-6  # measured max 2.43e-7 (forward and bottom diff, both regions, 8000 comparisons)


def _text(size, alpha, beta, k, region="ACROSS_CHANNELS"):
    return (f'name: "norm" type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha!r} beta: {beta!r} k: {k!r} '
            f'norm_region: {region} }}')


def _f32(v):
    """A float32 value (prototxt floats are float32) as a Python float."""
    return float(np.float32(v))


lrn_params = dict(size=st.sampled_from([1, 3, 5, 7]), alpha=st.floats(1e-4, 2.0).map(_f32),
                  beta=st.floats(0.25, 1.5).map(_f32), k=st.floats(0.5, 3.0).map(_f32))


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 9), hw=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       seed=st.integers(0, 2**16), **lrn_params)
def test_lrn_across_channels(n, c, hw, seed, size, alpha, beta, k):
    rng = np.random.default_rng(seed)
    x = ref.f32(rng.normal(scale=2.0, size=(n, c) + hw))
    y, scale = ref.lrn_across_forward(x, size, alpha, beta, k)
    dy = ref.f32(rng.normal(size=y.shape))
    dx = ref.lrn_across_backward(x, y, scale, dy, size, alpha, beta)
    magnitude = ref.lrn_across_backward(x, y, scale, dy, size, alpha, beta, magnitude=True)
    ref.check_layer(_text(size, alpha, beta, k), [x], [dy], [y], [dx], tol32=TOL32,
                    magnitudes={("bottom diff", 0): magnitude})


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 3), hw=st.tuples(st.integers(1, 7), st.integers(1, 7)),
       seed=st.integers(0, 2**16), **lrn_params)
def test_lrn_within_channel(n, c, hw, seed, size, alpha, beta, k):
    rng = np.random.default_rng(seed)
    x = ref.f32(rng.normal(scale=2.0, size=(n, c) + hw))
    y, intermediates = ref.lrn_within_forward(x, size, alpha, beta)
    dy = ref.f32(rng.normal(size=y.shape))
    dx = ref.lrn_within_backward(x, dy, size, alpha, beta, intermediates)
    magnitude = ref.lrn_within_backward(x, dy, size, alpha, beta, intermediates, magnitude=True)
    ref.check_layer(_text(size, alpha, beta, k, "WITHIN_CHANNEL"), [x], [dy], [y], [dx], tol32=TOL32,
                    magnitudes={("bottom diff", 0): magnitude})


def test_lrn_caffenet_settings():
    """CaffeNet norm1 (n 5, alpha 1e-4, beta 0.75) on post-ReLU magnitudes, 96 channels."""
    rng = np.random.default_rng(0)
    x = ref.f32(np.maximum(rng.normal(scale=60.0, size=(1, 96, 5, 5)), 0))
    alpha, beta = _f32(1e-4), 0.75
    y, scale = ref.lrn_across_forward(x, 5, alpha, beta, 1.0)
    dy = ref.f32(rng.normal(size=y.shape))
    dx = ref.lrn_across_backward(x, y, scale, dy, 5, alpha, beta)
    assert scale.max() > 1.5  # the normalization is active, not a near-identity
    ref.check_layer(_text(5, alpha, beta, 1.0), [x], [dy], [y], [dx], tol32=TOL32)


def test_lrn_across_backward_is_the_derivative():
    """Caffe's formula (with y / scale) equals the true gradient: finite differences in float64."""
    layer = build_layer(_text(5, 0.5, 0.75, 2.0), [(1, 7, 2, 3)]).double()
    x = torch.randn(1, 7, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-8)


def test_within_channel_ignores_k():
    x = ref.f32(np.random.default_rng(1).normal(size=(1, 2, 4, 4)))
    tops = [ref.run_layer(build_layer(_text(3, 0.5, 0.75, k, "WITHIN_CHANNEL"), [x.shape]), [x])[0][0]
            for k in (1.0, 5.0)]
    assert np.array_equal(tops[0], tops[1])


def test_lrn_refusals_and_describe():
    with pytest.raises(ValueError, match="odd"):
        build_layer(_text(4, 1e-4, 0.75, 1.0), [(1, 3, 4, 4)])
    with pytest.raises(ValueError, match="4-axis"):
        build_layer(_text(3, 1e-4, 0.75, 1.0), [(3, 4)])
    assert build_layer(_text(5, _f32(1e-4), 0.75, 1.0), [(1, 3, 4, 4)]).describe() == "across n5 a0.0001 b0.75 k1"
