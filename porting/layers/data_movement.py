"""Layers that move data without arithmetic (Caffe 1.0): Concat, Slice, Split, Flatten,
Reshape, Crop, Silence, Tile.

Shapes follow each layer's Reshape() in Caffe, including the legacy ``concat_dim`` and
``slice_dim`` fields, and are recomputed from the actual bottoms at run time (as Caffe
reshapes a net when its input changes). Gradients are routed by autograd, which is exactly
Caffe's backward for these layers (Crop's second bottom gets none, as in Caffe).

A top that passes its bottom through unchanged (Concat of one bottom, Slice to one top,
Split) is a view of it, never the bottom tensor itself: the gradient with respect to that
top is then only what flows back through the top, as in Caffe's own diff of it, and not
also what other consumers of the bottom send back.
"""
from __future__ import annotations

import math

import torch

from porting.layers import CaffeLayer, canonical_axis, count, int_arithmetic, register
from porting.rounding import gamma


def _legacy_axis(param, legacy: str, num_axes: int, kind: str) -> int:
    """axis, or the legacy non-negative ``concat_dim``/``slice_dim`` (never both)."""
    if param.HasField("axis") and param.HasField(legacy):
        raise ValueError(f"give either axis or {legacy} for {kind}, not both")
    if param.HasField(legacy):
        axis = int(getattr(param, legacy))
        if axis >= num_axes:
            raise ValueError(f"{legacy} {axis} out of range for a {num_axes}-axis blob")
        return axis
    return canonical_axis(param.axis, num_axes)


class _Moving(CaffeLayer):
    """A layer that only copies or routes values: forward and backward round nothing."""

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return [torch.zeros_like(y) for y in exact_tops]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return [torch.zeros_like(b) for b in bottoms]


def _refuse_in_place(layer: CaffeLayer) -> None:
    param = layer.spec.param
    if len(param.top) and len(param.bottom) and param.top[0] == param.bottom[0]:
        raise ValueError(f"{layer.type_name} does not allow in-place computation")


@register("Concat", v1="CONCAT")
class Concat(_Moving):
    """Join bottoms along ``axis`` (default 1); every other dim must match."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_shape.py", "tests/test_property_caffe.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1, -1)
        first = self.bottom_shapes[0]
        self.axis = _legacy_axis(spec.param.concat_param, "concat_dim", len(first), "Concat")
        top = list(first)
        for shape in self.bottom_shapes[1:]:
            if len(shape) != len(first):
                raise ValueError(f"all Concat bottoms must have the same number of axes, got {self.bottom_shapes}")
            if any(a != b for j, (a, b) in enumerate(zip(first, shape)) if j != self.axis):
                raise ValueError(f"Concat bottoms must match except at axis {self.axis}, got {self.bottom_shapes}")
            top[self.axis] += shape[self.axis]
        self.top_shapes = [tuple(top)]

    def forward(self, *bottoms):
        if len(bottoms) == 1:  # Caffe shares data and diff with the bottom
            return (bottoms[0].view_as(bottoms[0]),)
        return (torch.cat(bottoms, dim=self.axis),)

    def describe(self) -> str:
        return f"axis {self.axis}"


def slice_sizes(points: list[int], size: int, n_tops: int) -> list[int]:
    """Caffe's SliceLayer sizes: from slice_point, or an equal split among the tops."""
    if points:
        if len(points) != n_tops - 1:
            raise ValueError(f"{len(points)} slice_point(s) for {n_tops} tops; need {n_tops - 1}")
        if n_tops > size:
            raise ValueError(f"cannot slice {size} entries into {n_tops} tops")
        bounds = [0] + list(points) + [size]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        if any(s <= 0 for s in sizes):
            raise ValueError(f"slice_point {list(points)} must increase strictly inside (0, {size})")
        return sizes
    if n_tops == 0 or size % n_tops:
        raise ValueError(f"{n_tops} tops do not evenly divide the slice axis ({size})")
    return [size // n_tops] * n_tops


@register("Slice", v1="SLICE")
class Slice(_Moving):
    """Cut a bottom along ``axis`` (default 1) at ``slice_point``s, or equally among tops."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_shape.py", "tests/test_property_caffe.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        sp = spec.param.slice_param
        shape = self.bottom_shapes[0]
        self.axis = _legacy_axis(sp, "slice_dim", len(shape), "Slice")
        self.points = [int(p) for p in sp.slice_point]
        self.n_tops = len(spec.param.top)
        sizes = slice_sizes(self.points, shape[self.axis], self.n_tops)
        self.top_shapes = [shape[: self.axis] + (s,) + shape[self.axis + 1:] for s in sizes]

    def forward(self, x):
        if self.n_tops == 1:  # Caffe shares data and diff with the bottom
            return (x.view_as(x),)
        return tuple(torch.split(x, slice_sizes(self.points, x.shape[self.axis], self.n_tops), dim=self.axis))

    def describe(self) -> str:
        points = ",".join(map(str, self.points)) if self.points else "equal"
        return f"axis {self.axis} at {points}"


class SplitFunction(torch.autograd.Function):
    """n views of x; the backward adds the tops' diffs in Caffe's order ((d0 + d1) + d2) + ..."""

    @staticmethod
    def forward(ctx, x, n: int):
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *diffs):
        total = diffs[0].clone()
        for d in diffs[1:]:
            total = total + d
        return total, None


@register("Split", v1="SPLIT")
class Split(_Moving):
    """The bottom to every top; the backward sums the tops' gradients in top order, as Caffe."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_shape.py", "tests/test_property_caffe.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        self.top_shapes = [self.bottom_shapes[0]] * len(spec.param.top)

    def forward(self, x):
        if len(self.top_shapes) == 1:
            return (x.view_as(x),)
        return SplitFunction.apply(x, len(self.top_shapes))

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe adds the n top diffs: n - 1 additions in order.
        diffs = [d.abs() for d in top_diffs if d is not None]
        return [gamma(max(len(diffs) - 1, 0)) * sum(diffs, torch.zeros_like(bottoms[0]))]


@register("Silence", v1="SILENCE")
class Silence(_Moving):
    """Consumes its bottoms, produces nothing."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_shape.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        if len(spec.param.top):
            raise ValueError("Silence has no tops")

    def forward(self, *bottoms):
        return ()


def flatten_shape(shape, axis: int, end_axis: int) -> tuple[int, ...]:
    """Caffe's FlattenLayer: dims axis..end_axis (inclusive, canonical) merged into one."""
    start, end = canonical_axis(axis, len(shape)), canonical_axis(end_axis, len(shape))
    return tuple(shape[:start]) + (count(shape, start, end + 1),) + tuple(shape[end + 1:])


@register("Flatten", v1="FLATTEN")
class Flatten(_Moving):
    """Merge axes ``axis`` (default 1) to ``end_axis`` (default -1) into one."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_shape.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        _refuse_in_place(self)
        fp = spec.param.flatten_param
        self.axis, self.end_axis = int(fp.axis), int(fp.end_axis)
        self.top_shapes = [flatten_shape(self.bottom_shapes[0], self.axis, self.end_axis)]

    def forward(self, x):
        return (x.reshape(flatten_shape(tuple(x.shape), self.axis, self.end_axis)),)

    def describe(self) -> str:
        return f"axes {self.axis}..{self.end_axis}"


def reshape_shape(shape, dims, axis: int = 0, num_axes: int = -1) -> tuple[int, ...]:
    """Caffe's ReshapeLayer: replace axes [axis, axis + num_axes) by ``dims``.

    A 0 in ``dims`` copies the bottom dim at the same position; one -1 is inferred.
    """
    dims = [int(d) for d in dims]
    if dims.count(-1) > 1:
        raise ValueError("new shape contains multiple -1 dims; at most one may be given")
    if any(d < -1 for d in dims):
        raise ValueError(f"reshape dims must be >= -1, got {dims}")
    n = len(shape)
    start = axis if axis >= 0 else n + axis + 1
    if not 0 <= start <= n:
        raise ValueError(f"reshape axis {axis} out of range for a {n}-axis bottom")
    if num_axes < -1:
        raise ValueError(f"num_axes must be >= 0, or -1 for all, got {num_axes}")
    end = n if num_axes == -1 else start + num_axes
    if end > n:
        raise ValueError(f"axis {axis} + num_axes {num_axes} exceeds the {n} bottom axes")
    top = list(shape[:start]) + dims + list(shape[end:])
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= n:
                raise ValueError("new shape contains a 0, but there is no bottom axis to copy")
            top[start + i] = shape[start + i]
    if -1 in dims:
        explicit = count(shape, 0, start) * count(shape, end) * \
            math.prod(top[start + i] for i, d in enumerate(dims) if d != -1)
        if explicit == 0 or count(shape) % explicit:
            raise ValueError(f"cannot infer the -1 dim: {count(shape)} values into {dims} (bottom {tuple(shape)})")
        top[start + dims.index(-1)] = count(shape) // explicit
    if count(top) != count(shape):
        raise ValueError(f"reshape of {tuple(shape)} to {tuple(top)} changes the number of values")
    return tuple(top)


@register("Reshape")
class Reshape(_Moving):
    """New shape from reshape_param { shape { dim } axis num_axes } (0 copies, -1 infers)."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_shape.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        _refuse_in_place(self)
        rp = spec.param.reshape_param
        self.dims, self.axis, self.num_axes = [int(d) for d in rp.shape.dim], int(rp.axis), int(rp.num_axes)
        self.top_shapes = [reshape_shape(self.bottom_shapes[0], self.dims, self.axis, self.num_axes)]

    def forward(self, x):
        return (x.reshape(reshape_shape(tuple(x.shape), self.dims, self.axis, self.num_axes)),)

    def describe(self) -> str:
        return "x".join(map(str, self.top_shapes[0]))


def crop_offsets(shape, reference, axis: int, offsets) -> list[int]:
    """Caffe's CropLayer: per-axis offsets (0 before ``axis``), checked against the sizes."""
    n = len(shape)
    if len(reference) != n:
        raise ValueError(f"Crop bottoms must have the same number of axes, got {tuple(shape)} and {tuple(reference)}")
    start = canonical_axis(axis, n)
    offsets = [int(o) for o in offsets]
    if len(offsets) > 1 and start + len(offsets) != n:
        raise ValueError(f"{len(offsets)} crop offsets for the {n - start} axes from axis {start}; "
                         "give one offset, or one per cropped axis")
    out = []
    for i in range(n):
        if i < start:
            out.append(0)
            continue
        off = 0 if not offsets else offsets[0] if len(offsets) == 1 else offsets[i - start]
        if shape[i] - off < reference[i]:
            raise ValueError(f"crop of axis {i} (size {shape[i]}) at offset {off} to size {reference[i]} "
                             "goes out of bounds")
        out.append(off)
    return out


@register("Crop")
class Crop(_Moving):
    """Crop bottom 0 to bottom 1's shape on axes >= ``axis`` (default 2), at ``offset``."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_shape.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(2)
        cp = spec.param.crop_param
        shape, reference = self.bottom_shapes
        self.axis, self.offsets = int(cp.axis), [int(o) for o in cp.offset]
        crop_offsets(shape, reference, self.axis, self.offsets)
        start = canonical_axis(self.axis, len(shape))
        self.top_shapes = [shape[:start] + reference[start:]]

    def forward(self, x, reference):
        offsets = crop_offsets(tuple(x.shape), tuple(reference.shape), self.axis, self.offsets)
        start = canonical_axis(self.axis, x.dim())
        index = tuple(slice(None) if i < start else slice(o, o + reference.shape[i])
                      for i, o in enumerate(offsets))
        return (x[index],)

    def describe(self) -> str:
        return f"axis {self.axis} offset {','.join(map(str, self.offsets)) or 0}"


@register("Tile")
class Tile(_Moving):
    """The bottom repeated ``tiles`` times along ``axis`` (default 1): top[..., t * d + i, ...]
    = bottom[..., i, ...] for each tile t, d the bottom's dim there (Caffe copies the whole
    block count(axis) once per tile). The backward adds each bottom value's ``tiles``
    gradients (Caffe in tile order; here torch's sum of the repeat, within the same bound)."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_shape.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        tp = spec.param.tile_param
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(int(tp.axis), len(shape))
        if not tp.HasField("tiles"):
            raise ValueError("tile_param.tiles must be specified")
        self.tiles = int(tp.tiles)
        if self.tiles <= 0:
            raise ValueError(f"tile_param.tiles must be positive, got {self.tiles}")
        top = list(shape)
        top[self.axis] = int_arithmetic(shape[self.axis] * self.tiles, "tiled dim")
        self.top_shapes = [tuple(top)]

    def forward(self, x):
        reps = [self.tiles if i == self.axis else 1 for i in range(x.dim())]
        return (x.repeat(*reps),)

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Each bottom diff is the sum of its ``tiles`` top diffs: tiles - 1 additions.
        g = top_diffs[0].abs()
        shape = g.shape
        block = g.reshape(count(shape, 0, self.axis), self.tiles, -1).sum(1).reshape(bottoms[0].shape)
        return [gamma(self.tiles - 1) * block]

    def describe(self) -> str:
        return f"axis {self.axis} tiles {self.tiles}"
