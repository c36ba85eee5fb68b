"""Concat, Slice, Split, Flatten, Reshape, Crop, Tile, ArgMax, Input, Silence, the registry, and
Reduction's shapes (on integer values, where its sums are exact).

These layers move values without arithmetic, so tops and gradients must be exactly equal
to the NumPy references in float64 and float32 (inputs are float32 values); ArgMax follows
Caffe's (value, index) ordering, equal values in decreasing index order.
"""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import numpy_ref as ref
from porting import caffe_pb2
from porting.layers import LAYERS, REFUSED, V1_TYPES, build_layer

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def _exact(text, bottoms, top_diffs, tops, grads):
    ref.check_layer(text, bottoms, top_diffs, tops, grads, tol64=0.0, tol32=0.0)


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=shapes, n=st.integers(1, 4), axis_pick=st.integers(0, 7), legacy=st.booleans(), seed=st.integers(0, 2**16))
def test_concat(shape, n, axis_pick, legacy, seed):
    rng = np.random.default_rng(seed)
    axis = axis_pick % len(shape)
    sizes = rng.integers(1, 4, size=n)
    xs = [ref.f32(rng.normal(size=shape[:axis] + (int(s),) + shape[axis + 1:])) for s in sizes]
    top = np.concatenate(xs, axis=axis)
    dy = ref.f32(rng.normal(size=top.shape))
    grads = np.split(dy, np.cumsum(sizes)[:-1], axis=axis)
    field = f"concat_dim: {axis}" if legacy else f"axis: {axis - len(shape) if axis_pick >= 4 else axis}"
    _exact(f'type: "Concat" concat_param {{ {field} }}', xs, [dy], [top], grads)


def test_concat_refusals():
    with pytest.raises(ValueError, match="must match except at axis 1"):
        build_layer('type: "Concat"', [(1, 2, 3), (1, 2, 4)])
    with pytest.raises(ValueError, match="not both"):
        build_layer('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [(1, 2), (1, 2)])
    with pytest.raises(ValueError, match="out of range"):
        build_layer('type: "Concat" concat_param { concat_dim: 3 }', [(1, 2), (1, 2)])
    assert build_layer('type: "Concat"', [(2, 3, 4), (2, 5, 4)]).top_shapes == [(2, 8, 4)]


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=shapes, n_tops=st.integers(1, 4), axis_pick=st.integers(0, 3), use_points=st.booleans(),
       legacy=st.booleans(), seed=st.integers(0, 2**16))
def test_slice(shape, n_tops, axis_pick, use_points, legacy, seed):
    rng = np.random.default_rng(seed)
    axis = axis_pick % len(shape)
    size = shape[axis] * n_tops if not use_points else shape[axis] + n_tops  # room for every top
    full = shape[:axis] + (size,) + shape[axis + 1:]
    x = ref.f32(rng.normal(size=full))
    points = sorted(rng.choice(np.arange(1, size), size=n_tops - 1, replace=False).tolist()) if use_points else []
    tops = np.split(x, points, axis=axis) if points else np.split(x, n_tops, axis=axis)
    dys = [ref.f32(rng.normal(size=t.shape)) for t in tops]
    fields = [f"slice_dim: {axis}" if legacy else f"axis: {axis}"] + [f"slice_point: {p}" for p in points]
    text = f'type: "Slice" slice_param {{ {" ".join(fields)} }} ' + " ".join(f'top: "t{i}"' for i in range(n_tops))
    _exact(text, [x], dys, tops, [np.concatenate(dys, axis=axis)])


def test_slice_refusals():
    with pytest.raises(ValueError, match="evenly divide"):
        build_layer('type: "Slice" top: "a" top: "b"', [(1, 3)])
    with pytest.raises(ValueError, match="need 2"):
        build_layer('type: "Slice" slice_param { slice_point: 1 } top: "a" top: "b" top: "c"', [(1, 6)])
    with pytest.raises(ValueError, match="increase strictly"):
        build_layer('type: "Slice" slice_param { slice_point: 3 slice_point: 2 } top: "a" top: "b" top: "c"',
                    [(1, 6)])
    with pytest.raises(ValueError, match="increase strictly"):
        build_layer('type: "Slice" slice_param { slice_point: 7 } top: "a" top: "b"', [(1, 6)])


def test_split_sums_gradients():
    x = ref.f32(np.random.default_rng(0).normal(size=(2, 3)))
    dys = [np.full((2, 3), v) for v in (1.0, 2.0, 4.0)]
    _exact('type: "Split" top: "a" top: "b" top: "c"', [x], dys, [x, x, x], [np.full((2, 3), 7.0)])


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=shapes, a=st.integers(-4, 3), b=st.integers(-4, 3), seed=st.integers(0, 2**16))
def test_flatten(shape, a, b, seed):
    n = len(shape)
    assume(-n <= a < n and -n <= b < n)
    start, end = a % n, b % n
    assume(start <= end)
    x = ref.f32(np.random.default_rng(seed).normal(size=shape))
    top = x.reshape(shape[:start] + (int(np.prod(shape[start:end + 1])),) + shape[end + 1:])
    dy = ref.f32(np.random.default_rng(seed + 1).normal(size=top.shape))
    _exact(f'type: "Flatten" flatten_param {{ axis: {a} end_axis: {b} }}', [x], [dy], [top], [dy.reshape(shape)])


def test_flatten_default_and_in_place():
    assert build_layer('type: "Flatten"', [(2, 3, 4, 5)]).top_shapes == [(2, 60)]
    with pytest.raises(ValueError, match="in-place"):
        build_layer('type: "Flatten" bottom: "x" top: "x"', [(2, 3)])


@st.composite
def reshape_cases(draw):
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple))
    start = draw(st.integers(0, len(shape)))
    num_axes = draw(st.integers(-1, len(shape) - start))
    end = len(shape) if num_axes == -1 else start + num_axes
    replaced = int(np.prod(shape[start:end]))
    # a new factorization of the replaced block's count
    dims, rest = [], replaced
    for _ in range(draw(st.integers(0, 3))):
        d = draw(st.sampled_from([k for k in range(1, rest + 1) if rest % k == 0]))
        dims.append(d)
        rest //= d
    dims.append(rest)
    if draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = -1
    for i, d in enumerate(dims):  # a 0 copies the bottom dim at the same position
        if d != -1 and start + i < len(shape) and shape[start + i] == d and draw(st.booleans()):
            dims[i] = 0
    use_negative_axis = draw(st.booleans())
    axis = start - len(shape) - 1 if use_negative_axis else start
    return shape, dims, axis, num_axes


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(case=reshape_cases(), seed=st.integers(0, 2**16))
def test_reshape(case, seed):
    shape, dims, axis, num_axes = case
    top_shape = ref.reshape_top_shape(shape, dims, axis, num_axes)
    x = ref.f32(np.random.default_rng(seed).normal(size=shape))
    dy = ref.f32(np.random.default_rng(seed + 1).normal(size=top_shape))
    text = (f'type: "Reshape" reshape_param {{ shape {{ {" ".join(f"dim: {d}" for d in dims)} }} '
            f'axis: {axis} num_axes: {num_axes} }}')
    assert build_layer(text, [shape]).top_shapes == [top_shape]
    _exact(text, [x], [dy], [x.reshape(top_shape)], [dy.reshape(shape)])


def test_reshape_documented_examples_and_refusals():
    """Worked examples: 0 copies a dim, -1 infers one, axis/num_axes replace or insert axes."""
    def top(dims, shape, axis=0, num_axes=-1):
        text = f'type: "Reshape" reshape_param {{ shape {{ {" ".join(f"dim: {d}" for d in dims)} }} ' \
               f'axis: {axis} num_axes: {num_axes} }}'
        return build_layer(text, [shape]).top_shapes[0]

    assert top([0, -1], (2, 3, 4, 5)) == (2, 60)
    assert top([0, 0, -1, 4], (2, 8, 3, 4)) == (2, 8, 3, 4)
    assert top([2, 2], (2, 4, 3), axis=1, num_axes=1) == (2, 2, 2, 3)
    assert top([1, 1], (2, 8), axis=-1, num_axes=0) == (2, 8, 1, 1)  # insert axes at the end
    assert top([1], (2, 8), axis=0, num_axes=0) == (1, 2, 8)
    with pytest.raises(ValueError, match="multiple -1"):
        top([-1, -1], (2, 8))
    with pytest.raises(ValueError, match="changes the number"):
        top([3, 5], (2, 8))
    with pytest.raises(ValueError, match="no bottom axis"):
        top([0, 0, 0], (2, 8))
    with pytest.raises(ValueError, match="in-place"):
        build_layer('type: "Reshape" bottom: "x" top: "x" reshape_param { shape { dim: -1 } }', [(2, 3)])


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple), axis_pick=st.integers(0, 3),
       per_axis=st.booleans(), seed=st.integers(0, 2**16))
def test_crop(shape, axis_pick, per_axis, seed):
    rng = np.random.default_rng(seed)
    axis = axis_pick % len(shape)
    ref_shape = tuple(s if i < axis else int(rng.integers(1, s + 1)) for i, s in enumerate(shape))
    if per_axis:
        offsets = [int(rng.integers(0, shape[i] - ref_shape[i] + 1)) for i in range(axis, len(shape))]
    else:
        room = min(shape[i] - ref_shape[i] for i in range(axis, len(shape)))
        offsets = [int(rng.integers(0, room + 1))]
    x, like = ref.f32(rng.normal(size=shape)), np.zeros(ref_shape)
    top, index = ref.crop_forward(x, ref_shape, axis, offsets)
    dy = ref.f32(rng.normal(size=top.shape))
    dx = np.zeros(shape)
    dx[index] = dy
    text = f'type: "Crop" crop_param {{ axis: {axis} {" ".join(f"offset: {o}" for o in offsets)} }}'
    ref.check_layer(text, [x, like], [dy], [top], [dx, None], tol64=0.0, tol32=0.0)
    _, grads, _ = ref.run_layer(build_layer(text, [shape, ref_shape]), [x, like], [dy])
    assert grads[1] is None  # Caffe propagates nothing to the reference bottom


def test_crop_defaults_and_refusals():
    layer = build_layer('type: "Crop" crop_param { offset: 1 }', [(1, 3, 8, 8), (1, 1, 5, 6)])
    assert layer.top_shapes == [(1, 3, 5, 6)]  # axis 2 by default: N and C are kept
    with pytest.raises(ValueError, match="out of bounds"):
        build_layer('type: "Crop" crop_param { offset: 4 }', [(1, 3, 8, 8), (1, 1, 5, 6)])
    with pytest.raises(ValueError, match="one per cropped axis"):
        build_layer('type: "Crop" crop_param { offset: 1 offset: 1 offset: 1 }', [(1, 3, 8, 8), (1, 1, 5, 6)])


def test_tile_values_gradients_and_refusals():
    import torch

    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    for axis, tiles in [(1, 3), (-1, 2), (0, 1)]:
        layer = build_layer(f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}', [x.shape])
        reps = [1, 1, 1]
        reps[axis] = tiles
        want = np.tile(x, reps)  # Caffe repeats the whole block count(axis) once per tile
        assert layer.top_shapes == [want.shape]
        xt = torch.tensor(x, requires_grad=True)
        (y,) = layer(xt)
        assert np.array_equal(y.detach().numpy(), want)
        y.backward(torch.ones_like(y))
        assert np.array_equal(xt.grad.numpy(), np.full(x.shape, tiles, np.float32))
    assert build_layer('type: "Tile" tile_param { tiles: 2 }', [(2, 3)]).top_shapes == [(2, 6)]  # axis 1
    for text, match in [('type: "Tile"', "must be specified"),
                        ('type: "Tile" tile_param { tiles: 0 }', "positive"),
                        ('type: "Tile" tile_param { axis: 3 tiles: 2 }', "out of range"),
                        ('type: "Tile" tile_param { tiles: 1073741824 }', "overflows")]:
        with pytest.raises(ValueError, match=match):
            build_layer(text, [(2, 3, 4)])


def test_reduction_shapes_and_refusals():
    import torch

    x = torch.arange(-12.0, 12.0, dtype=torch.float64).reshape(2, 3, 4)
    for op, axis, want in [("SUM", 1, x.sum((1, 2))), ("ASUM", -1, x.abs().sum(2)), ("SUMSQ", 0, (x * x).sum()),
                           ("MEAN", 2, x.mean(2))]:
        layer = build_layer(f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} }}', [x.shape])
        assert layer.top_shapes == [tuple(want.shape)]  # the axes before axis are kept
        assert torch.equal(layer.double()(x)[0], want)
    assert build_layer('type: "Reduction"', [(2, 3)]).top_shapes == [()]  # axis 0: a zero-axis scalar
    with pytest.raises(ValueError, match="out of range"):
        build_layer('type: "Reduction" reduction_param { axis: 3 }', [(2, 3, 4)])


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple), use_axis=st.booleans(),
       axis_pick=st.integers(0, 3), k_pick=st.integers(1, 8), out_max_val=st.booleans(), seed=st.integers(0, 2**16))
def test_argmax(shape, use_axis, axis_pick, k_pick, out_max_val, seed):
    axis = axis_pick % len(shape) if use_axis else None
    available = shape[axis] if use_axis else int(np.prod(shape[1:]))
    top_k = 1 + (k_pick - 1) % available
    x = np.random.default_rng(seed).integers(-2, 3, size=shape).astype(np.float64)  # many ties
    expected = ref.argmax_forward(x, top_k, out_max_val, axis)
    fields = f"top_k: {top_k} out_max_val: {str(out_max_val).lower()}" + (f" axis: {axis}" if use_axis else "")
    layer = build_layer(f'type: "ArgMax" argmax_param {{ {fields} }}', [shape])
    assert layer.top_shapes == [expected.shape]
    for dtype in ("float64", "float32"):
        (got,), _, _ = ref.run_layer(build_layer(f'type: "ArgMax" argmax_param {{ {fields} }}', [shape]), [x],
                                     dtype=dtype)
        assert np.array_equal(got, expected)


def test_argmax_ties_come_in_decreasing_index_order():
    x = np.array([[3.0, 5.0, 5.0, 1.0, 5.0]])
    layer = build_layer('type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', [x.shape])
    (got,), _, _ = ref.run_layer(layer, [x])
    assert got.shape == (1, 2, 3) and got[0, 0].tolist() == [4, 2, 1] and got[0, 1].tolist() == [5, 5, 5]


def test_input_and_silence():
    layer = build_layer('type: "Input" top: "a" top: "b" input_param { shape { dim: 1 dim: 3 } }', [])
    assert layer.top_shapes == [(1, 3), (1, 3)]
    two = build_layer('type: "Input" top: "a" top: "b" input_param { shape { dim: 1 } shape { dim: 2 dim: 2 } }', [])
    assert two.top_shapes == [(1,), (2, 2)] and two.describe() == "1 2x2"
    with pytest.raises(ValueError, match="one per top"):
        build_layer('type: "Input" top: "a" top: "b" top: "c" input_param { shape { dim: 1 } shape { dim: 2 } }', [])
    silence = build_layer('type: "Silence"', [(2, 3), (4,)])
    assert silence.top_shapes == [] and silence(*[np.zeros(1)] * 2) == ()


def test_registry_covers_caffes_v1_names():
    """Every V1 enum name but NONE maps to a registered type."""
    names = caffe_pb2.V1LayerParameter.LayerType.keys()
    expected = {"ABSVAL", "ARGMAX", "BNLL", "CONCAT", "CONVOLUTION", "DECONVOLUTION", "DROPOUT", "ELTWISE", "EXP",
                "FLATTEN", "INNER_PRODUCT", "LRN", "POOLING", "POWER", "RELU", "SIGMOID", "SILENCE", "SOFTMAX",
                "SPLIT", "SLICE", "TANH", "THRESHOLD", "MVN", "IM2COL", "HDF5_OUTPUT",
                "ACCURACY", "CONTRASTIVE_LOSS", "EUCLIDEAN_LOSS", "HINGE_LOSS", "INFOGAIN_LOSS",
                "MULTINOMIAL_LOGISTIC_LOSS", "SIGMOID_CROSS_ENTROPY_LOSS", "SOFTMAX_LOSS",
                "DATA", "IMAGE_DATA", "WINDOW_DATA", "MEMORY_DATA", "HDF5_DATA", "DUMMY_DATA"}
    assert expected <= set(names) and set(V1_TYPES) == expected
    assert all(V1_TYPES[name] in LAYERS for name in expected)
    assert build_layer('type: "INNER_PRODUCT" inner_product_param { num_output: 2 }', [(1, 3)]).param_shapes == \
        [(2, 3), (2,)]
    assert "Python" in REFUSED
    with pytest.raises(KeyError, match="arbitrary code"):
        build_layer('type: "Python"', [(1,)])


@pytest.mark.parametrize("text,shapes", [
    ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }', [(1, 3, 5, 5)]),
    ('type: "Pooling" pooling_param { kernel_size: 2 stride: 2 }', [(1, 3, 5, 5)]),
    ('type: "LRN"', [(1, 3, 5, 5)]),
    ('type: "InnerProduct" inner_product_param { num_output: 4 }', [(2, 3, 2, 2)]),
    ('type: "BatchNorm"', [(2, 3, 2, 2)]),
    ('type: "Scale" scale_param { bias_term: true }', [(2, 3, 2, 2)]),
    ('type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3), (2, 3)]),
])
def test_layers_run_in_float64_when_converted(text, shapes):
    """A net converted with .double() computes in float64 end to end."""
    import torch

    layer = build_layer(text, shapes).double()
    for blob in layer.blobs:
        torch.nn.init.normal_(blob.data) if blob.dim() else blob.data.fill_(0.5)
    outs = layer(*[torch.randn(s, dtype=torch.float64) for s in shapes])
    assert all(o.dtype == torch.float64 for o in outs)
    assert isinstance(layer.describe(), str)
