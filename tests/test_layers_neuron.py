"""Element-wise layers and Softmax against Caffe's formulas (tests/numpy_ref.py).

Inputs hold exact zeros on purpose: Caffe's backward at x = 0 (ReLU/PReLU slope, AbsVal
sign(0) = 0, BNLL 1/2, Power's power * y / x) is where a port usually slips.
Where a formula subtracts nearly equal numbers (1 - y in the sigmoid and tanh
derivatives, Caffe's tanh-form sigmoid for x << 0) the error is taken relative to the
magnitude of the terms (numpy_ref.rel_err); likewise exp(x) - 1 in ELU, shift + scale x
in Power, and log near 1. Tolerances: float64 1e-10 (measured max 2.0e-15); float32 from
the measured maxima of two LAYER_EXAMPLES=1000 runs with LAYER_ERRORS_LOG, times ~4.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy_ref as ref
from porting import PortingError
from porting.layers import build_layer

TOL32 = 8e-7  # measured max 2.11e-7 over ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal, BNLL, Softmax
TOL32_POWER = 3e-6  # measured max 6.96e-7 (Exp: float32 rounding of scale * ln(base) * x, |.| <= 20)

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def _input(seed, shape, scale=2.0, zeros=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=scale, size=shape)
    if zeros:
        x[rng.random(shape) < 0.2] = 0.0
    return ref.f32(x), ref.f32(rng.normal(size=shape))


def _f32(v):
    return float(np.float32(v))


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=shapes, slope=st.sampled_from([0.0, 0.1, -0.5, 1.5]), seed=st.integers(0, 2**16))
def test_relu(shape, slope, seed):
    x, dy = _input(seed, shape)
    slope = _f32(slope)
    ref.check_layer(f'type: "ReLU" relu_param {{ negative_slope: {slope!r} }}', [x], [dy],
                    [ref.relu_forward(x, slope)], [ref.relu_backward(x, dy, slope)], tol32=TOL32)


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple), shared=st.booleans(),
       seed=st.integers(0, 2**16))
def test_prelu(shape, shared, seed):
    x, dy = _input(seed, shape)
    a = ref.f32(np.random.default_rng(seed + 1).uniform(-1, 1, size=() if shared else (shape[1],)))
    dx, da = ref.prelu_backward(x, a, dy)
    ref.check_layer(f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}', [x], [dy],
                    [ref.prelu_forward(x, a)], [dx], [da], blobs=[a], tol32=TOL32,
                    magnitudes={("blob diff", 0): (np.abs(dy * x) * (x <= 0)).sum(
                        axis=None if shared else (0,) + tuple(range(2, x.ndim)))})


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=shapes, alpha=st.sampled_from([1.0, 0.5, 2.0]), seed=st.integers(0, 2**16))
def test_elu(shape, alpha, seed):
    x, dy = _input(seed, shape)
    y = ref.elu_forward(x, alpha)
    terms = np.where(x > 0, np.abs(x), alpha * (np.exp(np.minimum(x, 0)) + 1))  # exp(x) - 1 cancels near 0
    ref.check_layer(f'type: "ELU" elu_param {{ alpha: {alpha} }}', [x], [dy], [y],
                    [ref.elu_backward(x, y, dy, alpha)], tol32=TOL32,
                    magnitudes={("top", 0): terms, ("bottom diff", 0): np.abs(dy) * terms})


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=shapes, kind=st.sampled_from(["Sigmoid", "TanH", "AbsVal", "BNLL"]), seed=st.integers(0, 2**16))
def test_parameterless_neurons(shape, kind, seed):
    x, dy = _input(seed, shape, scale=4.0)
    magnitudes = {}
    if kind == "Sigmoid":
        y = ref.sigmoid_forward(x)
        dx = ref.sigmoid_backward(y, dy)
        # Caffe's tanh form, 0.5 + 0.5 tanh(x / 2), cancels for x << 0 (y has an absolute error
        # on the scale of its terms), and 1 - y cancels for x >> 0; dx = dy y (1 - y) inherits both
        terms = 0.5 + 0.5 * np.abs(np.tanh(0.5 * x))
        magnitudes[("top", 0)] = terms
        magnitudes[("bottom diff", 0)] = np.abs(dy) * terms * (1 + y)
    elif kind == "TanH":
        y = np.tanh(x)
        dx = ref.tanh_backward(y, dy)
        magnitudes[("bottom diff", 0)] = np.abs(dy) * (1 + y * y)  # so does 1 - y^2
    elif kind == "AbsVal":
        y, dx = np.abs(x), ref.absval_backward(x, dy)
    else:
        y, dx = ref.bnll_forward(x), ref.bnll_backward(x, dy)
    ref.check_layer(f'type: "{kind}"', [x], [dy], [y], [dx], tol32=TOL32, magnitudes=magnitudes)


def test_bnll_extremes_and_kink():
    """Large |x| stays finite (Caffe's two-branch forward), gradient 1/2 at 0."""
    x = np.array([-80.0, -50.0, -1.0, 0.0, 1.0, 50.0, 80.0])
    dy = np.ones_like(x)
    ref.check_layer('type: "BNLL"', [x], [dy], [ref.bnll_forward(x)], [ref.bnll_backward(x, dy)], tol32=TOL32)
    _, (dx,), _ = ref.run_layer(build_layer('type: "BNLL"', [x.shape]), [x], [dy])
    assert dx[3] == 0.5


# power, scale, shift: every branch of Caffe's PowerLayer backward
POWER_CASES = [(1.0, 2.0, 0.5), (2.0, 1.0, 0.0), (2.0, -1.5, 2.0), (3.0, 1.0, 0.0), (3.0, 0.5, 0.0),
               (0.5, 2.0, 3.0), (-0.75, 1.0, 1.0), (2.5, 1.0, 2.0), (0.0, 1.0, 2.0), (2.0, 0.0, 3.0),
               (1.0, 1.0, 0.0)]


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=shapes, case=st.sampled_from(POWER_CASES), seed=st.integers(0, 2**16))
def test_power(shape, case, seed):
    power, scale, shift = case
    rng = np.random.default_rng(seed)
    if power == int(power):
        x = rng.normal(size=shape)
    else:  # a fractional power needs a positive base: shift + scale * x in [0.25, 3]
        x = (rng.uniform(0.25, 3.0, size=shape) - shift) / scale
    x, dy = ref.f32(x), ref.f32(rng.normal(size=shape))
    y = ref.power_forward(x, power, scale, shift)
    dx = ref.power_backward(x, y, dy, power, scale, shift)
    base = np.abs(shift) + np.abs(scale * x)  # shift + scale * x cancels near its root
    with np.errstate(divide="ignore"):
        magnitudes = {("top", 0): base ** power, ("bottom diff", 0): np.abs(dy * power * scale) * base ** (power - 1)}
    ref.check_layer(f'type: "Power" power_param {{ power: {power} scale: {scale} shift: {shift} }}',
                    [x], [dy], [y], [dx], tol32=TOL32_POWER, magnitudes=magnitudes)


def test_power_backward_keeps_caffes_division():
    """y = x^3 (shift 0): Caffe's dx = 3 y / x is NaN at x = 0 where the derivative is 0."""
    x = np.array([-2.0, 0.0, 1.5])
    dy = np.ones(3)
    layer = build_layer('type: "Power" power_param { power: 3 }', [x.shape])
    _, (dx,), _ = ref.run_layer(layer, [x], [dy])
    assert np.isnan(dx[1]) and np.allclose(dx[[0, 2]], 3 * x[[0, 2]] ** 2)


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=shapes, base=st.sampled_from([-1.0, 2.0, 10.0, 0.5]), scale=st.sampled_from([1.0, 0.5, -2.0]),
       shift=st.sampled_from([0.0, 1.0, -0.5]), seed=st.integers(0, 2**16))
def test_exp(shape, base, scale, shift, seed):
    x, dy = _input(seed, shape, scale=1.0)
    y = ref.exp_forward(x, base, scale, shift)
    ref.check_layer(f'type: "Exp" exp_param {{ base: {base} scale: {scale} shift: {shift} }}', [x], [dy], [y],
                    [ref.exp_backward(y, dy, base, scale)], tol32=TOL32_POWER)


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=shapes, base=st.sampled_from([-1.0, 2.0, 10.0]), scale=st.sampled_from([1.0, 0.5, -2.0]),
       shift=st.sampled_from([0.0, 1.0, 3.0]), seed=st.integers(0, 2**16))
def test_log(shape, base, scale, shift, seed):
    rng = np.random.default_rng(seed)
    x = ref.f32((rng.uniform(0.1, 5.0, size=shape) - shift) / scale)  # positive argument
    dy = ref.f32(rng.normal(size=shape))
    # log(u) near u = 1 is tiny while u carries an error on the scale of |shift| + |scale x|:
    # the absolute error of y is that scale over u (log's condition), times 1 / ln(base)
    base_scale = 1.0 if base == -1 else 1.0 / np.log(base)
    u = shift + scale * x
    condition = abs(base_scale) * (np.abs(shift) + np.abs(scale * x)) / np.abs(u)
    ref.check_layer(f'type: "Log" log_param {{ base: {base} scale: {scale} shift: {shift} }}', [x], [dy],
                    [ref.log_forward(x, base, scale, shift)], [ref.log_backward(x, dy, base, scale, shift)],
                    tol32=TOL32_POWER, magnitudes={("top", 0): condition})


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=shapes, threshold=st.sampled_from([0.0, 0.5, -1.0]), seed=st.integers(0, 2**16))
def test_threshold_forward_only(shape, threshold, seed):
    x, dy = _input(seed, shape)
    layer = build_layer(f'type: "Threshold" threshold_param {{ threshold: {threshold} }}', [x.shape])
    (top,), (dx,), _ = ref.run_layer(layer, [x], [dy])
    assert np.array_equal(top, ref.threshold_forward(x, threshold))
    assert dx is None  # Caffe's Threshold has no backward


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), axis_choice=st.integers(-4, 3),
       seed=st.integers(0, 2**16))
def test_softmax(shape, axis_choice, seed):
    axis = axis_choice % len(shape) - (len(shape) if axis_choice < 0 else 0)
    x, dy = _input(seed, shape, scale=5.0)
    y = ref.softmax_forward(x, axis)
    ref.check_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}', [x], [dy], [y],
                    [ref.softmax_backward(y, dy, axis)], tol32=TOL32,
                    magnitudes={("bottom diff", 0): (np.abs(dy) + np.abs(dy * y).sum(axis=axis, keepdims=True)) * y})


def test_dropout_is_identity_at_test_and_refused_at_train():
    x = np.arange(6.0).reshape(2, 3)
    layer = build_layer('name: "drop6" type: "Dropout" dropout_param { dropout_ratio: 0.5 }', [x.shape])
    (top,), (dx,), _ = ref.run_layer(layer, [x], [np.ones_like(x)])
    assert np.array_equal(top, x) and np.array_equal(dx, np.ones_like(x))
    train = build_layer('name: "drop6" type: "Dropout" phase: TRAIN dropout_param { dropout_ratio: 0.5 }', [x.shape])
    with pytest.raises(PortingError, match="drop6.*TEST phase"):
        ref.run_layer(train, [x])
    no_drop = build_layer('type: "Dropout" phase: TRAIN dropout_param { dropout_ratio: 0 }', [x.shape])
    assert np.array_equal(ref.run_layer(no_drop, [x])[0][0], x)


def test_neuron_describe():
    assert build_layer('type: "ReLU"', [(2,)]).describe() == ""
    assert build_layer('type: "ReLU" relu_param { negative_slope: 0.5 }', [(2,)]).describe() == "slope 0.5"
    assert build_layer('type: "Power" power_param { power: 2 shift: 1 }', [(2,)]).describe() == \
        "power 2 scale 1 shift 1"
    assert build_layer('type: "PReLU" prelu_param { channel_shared: true }', [(1, 3)]).param_shapes == [()]
