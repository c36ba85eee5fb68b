"""Convolution, Deconvolution and InnerProduct against float64 NumPy loops (tests/numpy_ref.py).

Forward and backward (bottom, weight and bias diffs; Caffe's backward is the exact
derivative here) in float64 and float32, on each arithmetic path: "torch" (F.conv*d,
F.linear) and Caffe's (Convolution "im2col", InnerProduct "blocked"; see
porting.layers.convolution.set_conv_path, porting.layers.inner_product.set_inner_product_path).
Errors are relative to the larger of max |ref| and the same sums over absolute values
(numpy_ref.rel_err), the scale rounding works on.
Tolerances: float64 1e-10 (measured max 3.3e-16; a semantic slip shows as >= 1e-3);
float32 from the measured maxima of two LAYER_EXAMPLES=1000 runs with LAYER_ERRORS_LOG
(about 7000 comparisons per test), times ~3.
"""
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import numpy_ref as ref
from porting.layers import build_layer
from porting.layers.convolution import CONV_PATHS, _ConvBase
from porting.layers.inner_product import INNER_PRODUCT_PATHS, InnerProduct

TOL32_CONV = 5e-7  # measured max 1.65e-7 (conv and deconv; forward and every diff)
TOL32_IP = 5e-7  # measured max 1.60e-7


@contextmanager
def default_path(cls, path):
    """Layers of ``cls`` built meanwhile take ``path`` (numpy_ref builds them from text)."""
    saved = cls.path
    cls.path = path
    try:
        yield
    finally:
        cls.path = saved


def _field(name, values):
    """``name: v`` for a symmetric value, ``name_h/_w`` for an asymmetric 2-D one."""
    if len(set(values)) == 1:
        return f"{name}: {values[0]}" if name != "kernel" else f"kernel_size: {values[0]}"
    return f"{name}_h: {values[0]} {name}_w: {values[1]}"


@st.composite
def conv_cases(draw, deconv=False):
    group = draw(st.integers(1, 3))
    cg, og = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 4)) for _ in range(2)]
    stride = [draw(st.integers(1, 3)) for _ in range(2)]
    dilation = draw(st.sampled_from([1, 2]))
    pad = [draw(st.integers(0, 2)) for _ in range(2)]
    size = [draw(st.integers(1, 8)) for _ in range(2)]
    ext = [dilation * (k - 1) + 1 for k in kernel]
    if deconv:
        assume(all(ref.deconv_out_size(s, k, st_, p, dilation) > 0
                   for s, k, st_, p in zip(size, kernel, stride, pad)))
    else:
        assume(all(s + 2 * p >= e for s, p, e in zip(size, pad, ext)))
    return dict(n=draw(st.integers(1, 2)), group=group, channels=cg * group, num_output=og * group,
                kernel=kernel, stride=stride, pad=pad, dilation=dilation, size=size,
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _conv_text(kind, c):
    fields = " ".join([f"num_output: {c['num_output']}", _field("kernel", c["kernel"]),
                       _field("stride", c["stride"]), _field("pad", c["pad"]),
                       f"dilation: {c['dilation']}", f"group: {c['group']}",
                       f"bias_term: {'true' if c['bias'] else 'false'}"])
    return f'name: "c" type: "{kind}" convolution_param {{ {fields} }}'


def _run_conv_case(kind, c):
    rng = np.random.default_rng(c["seed"])
    deconv = kind == "Deconvolution"
    x = ref.f32(rng.normal(size=(c["n"], c["channels"], *c["size"])))
    wshape = ((c["channels"], c["num_output"] // c["group"]) if deconv else
              (c["num_output"], c["channels"] // c["group"])) + tuple(c["kernel"])
    w = ref.f32(rng.normal(size=wshape))
    b = ref.f32(rng.normal(size=c["num_output"])) if c["bias"] else None
    geometry = (c["stride"], c["pad"], [c["dilation"]] * 2, c["group"])
    forward, backward = (ref.deconv_forward, ref.deconv_backward) if deconv else (ref.conv_forward, ref.conv_backward)
    y = forward(x, w, b, *geometry)
    dy = ref.f32(rng.normal(size=y.shape))
    dx, dw, db = backward(x, w, dy, *geometry, bias=c["bias"])
    blobs = [w] + ([b] if c["bias"] else [])
    ref.check_layer(_conv_text(kind, c), [x], [dy], [y], [dx], [dw] + ([db] if c["bias"] else []),
                    blobs=blobs, tol32=TOL32_CONV, magnitudes=_magnitudes(forward, backward, x, w, b, dy, geometry))


def _magnitudes(forward, backward, x, w, b, dy, geometry):
    """The same sums over absolute values: the scale float32 rounding is relative to."""
    mx, mw, mdy = np.abs(x), np.abs(w), np.abs(dy)
    dx, dw, db = backward(mx, mw, mdy, *geometry, bias=b is not None)
    out = {("top", 0): forward(mx, mw, None if b is None else np.abs(b), *geometry),
           ("bottom diff", 0): dx, ("blob diff", 0): dw}
    if b is not None:
        out[("blob diff", 1)] = db
    return out


@pytest.mark.parametrize("path", CONV_PATHS)
@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(conv_cases())
def test_convolution_matches_reference(path, c):
    with default_path(_ConvBase, path):
        _run_conv_case("Convolution", c)


@pytest.mark.parametrize("path", CONV_PATHS)
@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(conv_cases(deconv=True))
def test_deconvolution_matches_reference(path, c):
    with default_path(_ConvBase, path):
        _run_conv_case("Deconvolution", c)


@pytest.mark.parametrize("kind,case", [
    # groups with asymmetric kernel/stride/pad given as _h/_w (AlexNet conv2-like, smaller)
    ("Convolution", dict(n=2, group=2, channels=4, num_output=6, kernel=[3, 5], stride=[1, 2], pad=[2, 1],
                         dilation=1, size=[7, 9], bias=True, seed=1)),
    # dilation 2 with stride 2 and pad
    ("Convolution", dict(n=1, group=1, channels=3, num_output=2, kernel=[3, 3], stride=[2, 2], pad=[2, 2],
                         dilation=2, size=[8, 8], bias=False, seed=2)),
    # CaffeNet conv1 geometry on a smaller input: k11 s4 p0
    ("Convolution", dict(n=1, group=1, channels=3, num_output=4, kernel=[11, 11], stride=[4, 4], pad=[0, 0],
                         dilation=1, size=[23, 23], bias=True, seed=3)),
    # deconvolution upsampling by 2 (FCN style) with pad, and groups
    ("Deconvolution", dict(n=1, group=2, channels=4, num_output=2, kernel=[4, 4], stride=[2, 2], pad=[1, 1],
                           dilation=1, size=[5, 5], bias=True, seed=4)),
    ("Deconvolution", dict(n=2, group=1, channels=2, num_output=3, kernel=[3, 2], stride=[3, 1], pad=[1, 0],
                           dilation=1, size=[4, 3], bias=False, seed=5)),
])
@pytest.mark.parametrize("path", CONV_PATHS)
def test_conv_edge_cases(kind, case, path):
    with default_path(_ConvBase, path):
        _run_conv_case(kind, case)


def test_conv_shapes_and_describe():
    conv = build_layer('type: "Convolution" convolution_param { num_output: 96 kernel_size: 11 stride: 4 }',
                       [(10, 3, 227, 227)])
    assert conv.top_shapes == [(10, 96, 55, 55)] and conv.param_shapes == [(96, 3, 11, 11), (96,)]
    assert conv.describe() == "k11 s4 p0 g1"
    conv2 = build_layer('type: "Convolution" convolution_param { num_output: 256 pad: 2 kernel_size: 5 group: 2 }',
                        [(10, 96, 27, 27)])
    assert conv2.top_shapes == [(10, 256, 27, 27)] and conv2.param_shapes[0] == (256, 48, 5, 5)
    deconv = build_layer('type: "Deconvolution" convolution_param { num_output: 21 kernel_size: 64 stride: 32 '
                         'bias_term: false group: 21 }', [(1, 21, 10, 10)])
    assert deconv.param_shapes == [(21, 1, 64, 64)] and deconv.top_shapes == [(1, 21, 352, 352)]


@pytest.mark.parametrize("path", CONV_PATHS)
def test_conv_nd_and_axis(path):
    """1-D convolution, and a channel axis of 2 (axes before it are batch axes)."""
    rng = np.random.default_rng(0)
    x = ref.f32(rng.normal(size=(2, 3, 4, 10)))
    w = ref.f32(rng.normal(size=(5, 4, 3)))
    with default_path(_ConvBase, path):
        layer = build_layer('type: "Convolution" convolution_param { num_output: 5 kernel_size: 3 axis: 2 '
                            'bias_term: false }', [x.shape], [w])
    assert layer.top_shapes == [(2, 3, 5, 8)]
    expected = ref.conv_forward(x.reshape(6, 4, 10), w, None, [1], [0], [1], 1).reshape(2, 3, 5, 8)
    (got,), _, _ = ref.run_layer(layer, [x])
    assert ref.rel_err(got, expected) <= 1e-10


def test_conv_refuses_impossible_configurations():
    with pytest.raises(ValueError, match="group 2 must divide"):
        build_layer('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 group: 2 }', [(1, 3, 5, 5)])
    with pytest.raises(ValueError, match="not both"):
        build_layer('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3 }',
                    [(1, 3, 5, 5)])
    with pytest.raises(ValueError, match="output would be empty"):
        build_layer('type: "Convolution" convolution_param { num_output: 4 kernel_size: 7 }', [(1, 3, 5, 5)])
    with pytest.raises(ValueError, match="kernel_size must be given"):
        build_layer('type: "Convolution" convolution_param { num_output: 4 }', [(1, 3, 5, 5)])


@pytest.mark.parametrize("path", INNER_PRODUCT_PATHS)
@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(n=st.integers(1, 3), inner=st.lists(st.integers(1, 4), min_size=1, max_size=3), num_output=st.integers(1, 6),
       transpose=st.booleans(), bias=st.booleans(), axis_choice=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_inner_product_matches_reference(path, n, inner, num_output, transpose, bias, axis_choice, seed):
    rng = np.random.default_rng(seed)
    shape = (n, *inner)
    axis = 1 + axis_choice % len(inner)  # any axis after the batch axis
    x = ref.f32(rng.normal(size=shape))
    k = int(np.prod(shape[axis:]))
    w = ref.f32(rng.normal(size=(k, num_output) if transpose else (num_output, k)))
    b = ref.f32(rng.normal(size=num_output)) if bias else None
    y = ref.inner_product_forward(x, w, b, axis, transpose)
    dy = ref.f32(rng.normal(size=y.shape))
    dx, dw, db = ref.inner_product_backward(x, w, dy, axis, transpose)
    text = (f'type: "InnerProduct" inner_product_param {{ num_output: {num_output} axis: {axis} '
            f'transpose: {str(transpose).lower()} bias_term: {str(bias).lower()} }}')
    mdx, mdw, mdb = ref.inner_product_backward(np.abs(x), np.abs(w), np.abs(dy), axis, transpose)
    magnitudes = {("top", 0): ref.inner_product_forward(np.abs(x), np.abs(w), None if b is None else np.abs(b),
                                                        axis, transpose),
                  ("bottom diff", 0): mdx, ("blob diff", 0): mdw, ("blob diff", 1): mdb}
    with default_path(InnerProduct, path):
        ref.check_layer(text, [x], [dy], [y], [dx], [dw] + ([db] if bias else []),
                        blobs=[w] + ([b] if bias else []), tol32=TOL32_IP, magnitudes=magnitudes)
