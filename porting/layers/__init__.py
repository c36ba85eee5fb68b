"""The layer registry: one class per Caffe layer type, nothing else to edit to add one.

A layer class is an ``nn.Module`` registered with ``@register("Convolution", v1="CONVOLUTION")``.
It is built from its ``LayerSpec`` and the shapes of its bottoms, knows the shapes of its
parameter blobs and of its tops, and maps bottom tensors (NCHW, float) to top tensors
with Caffe 1.0's semantics. Its parameter blobs are registered in Caffe's order under the
names "0", "1", ... so a state_dict key reads ``<layer name>.<blob index>`` and
``net.params[name][i]`` is pycaffe's ``net.params[name][i].data``.

Conventions every layer keeps: ``__init__`` raises ``ValueError`` (one clear sentence) on a
configuration Caffe would refuse or could not run; ``forward`` never writes into its
bottoms (the net keeps pre-in-place values) and computes in the dtype of its inputs, so a
net converted with ``.double()`` runs in float64. Layers whose backward in Caffe is not the
exact derivative of the forward (LRN, Power, Eltwise MAX, pooling ties) reproduce Caffe's
backward formula; the others rely on autograd.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from porting import caffe_pb2

LAYERS: dict[str, type["CaffeLayer"]] = {}
V1_TYPES: dict[str, str] = {}  # V1LayerParameter.LayerType name -> V2 type string

# Types that are refused by name, whatever the registry holds (never executed).
REFUSED = {"Python": "Python layers run arbitrary code and are never executed"}


def register(type_name: str, v1: str | None = None):
    """Class decorator: register a layer under its V2 type name (and its V1 enum name)."""

    def wrap(cls):
        cls.type_name = type_name
        LAYERS[type_name] = cls
        if v1:
            V1_TYPES[v1] = type_name
        return cls

    return wrap


def canonical_axis(axis: int, num_axes: int) -> int:
    """Caffe's Blob::CanonicalAxisIndex: a negative axis counts from the end."""
    if not -num_axes <= axis < num_axes:
        raise ValueError(f"axis {axis} out of range for a {num_axes}-axis blob")
    return axis + num_axes if axis < 0 else axis


def count(shape, start: int = 0, end: int | None = None) -> int:
    """Caffe's Blob::count(start, end): the product of the dims in [start, end) (a Python
    int: exact at any size, so a shape Caffe refuses is seen as such, not wrapped)."""
    return math.prod(int(d) for d in shape[start:end])


INT_MAX = 2**31 - 1  # Caffe keeps dims, counts, kernels, pads and strides in a C++ int
MAX_BLOB_AXES = 32   # Caffe's kMaxBlobAxes


def caffe_int(value: int, what: str) -> int:
    """``value`` (an unsigned or 64-bit field) as Caffe's int holds it; ValueError when it
    does not fit (Caffe would read it as another, often negative, number)."""
    value = int(value)
    if not -INT_MAX - 1 <= value <= INT_MAX:
        wrapped = (value + 2**31) % 2**32 - 2**31
        raise ValueError(f"{what} {value} does not fit Caffe's int (Caffe would read it as {wrapped})")
    return value


def int_arithmetic(value: int, what: str) -> int:
    """A value Caffe computes in int (an output size, a padded extent); ValueError when the
    C++ arithmetic would overflow (its result would be meaningless)."""
    if not -INT_MAX - 1 <= value <= INT_MAX:
        raise ValueError(f"{what} ({value}) overflows Caffe's int arithmetic")
    return value


def blob_problem(shape) -> str | None:
    """Why Caffe 1.0 cannot hold or use a blob of this shape (None: it can).

    Blob::Reshape refuses more than 32 axes, a negative dim and more than INT_MAX values;
    a blob of 0 values is never given memory, and the first forward that reads or writes
    it aborts (``Check failed: data_``; a weight filler aborts already at load), so an
    empty blob is refused too.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_BLOB_AXES:
        return f"{len(shape)} axes, more than Caffe's {MAX_BLOB_AXES}"
    if any(d < 0 for d in shape):
        return f"shape {_dims(shape)} has a negative dim"
    total = count(shape)
    if total > INT_MAX:
        return f"shape {_dims(shape)} holds {total:,} values, more than Caffe's INT_MAX ({INT_MAX:,}) per blob"
    if total == 0:
        return (f"shape {_dims(shape)} holds no values (Caffe 1.0 aborts at the first use of an empty "
                "blob: Check failed: data_)")
    return None


def _dims(shape) -> str:
    return "x".join(map(str, shape)) if shape else "()"


class CaffeLayer(nn.Module):
    """Base class. Subclasses set ``param_shapes`` and ``top_shapes`` in ``__init__``.

    ``spec`` is the graph's LayerSpec (``spec.param`` is the LayerParameter message);
    ``bottom_shapes`` is a list of tuples. ``param_shapes`` lists the expected shape of
    each parameter blob in Caffe order; ``top_shapes`` the shape of each top.
    """

    type_name = ""
    # Blobs that are statistics, not trainable weights (BatchNorm's): no gradient.
    frozen_blobs = False
    # A layer whose tops the caller feeds (Input; data layers): the net takes them as inputs.
    is_input = False
    # The test files that check this type against real Caffe or a reference (repository
    # paths, e.g. "tests/test_layers_caffe.py"); ``porting layers`` lists them.
    verified_by: tuple[str, ...] = ()

    def __init__(self, spec, bottom_shapes: list[tuple[int, ...]]):
        super().__init__()
        self.spec = spec
        self.bottom_shapes = [tuple(int(d) for d in s) for s in bottom_shapes]
        self.param_shapes: list[tuple[int, ...]] = []
        self.top_shapes: list[tuple[int, ...]] = []

    # -- helpers for subclasses -------------------------------------------------
    @property
    def name(self) -> str:
        return getattr(self.spec, "name", "") or self.type_name

    @property
    def phase(self) -> str:
        """"test" or "train": the layer's phase as the graph set it (TEST when unset)."""
        param = self.spec.param
        if param.HasField("phase") and param.phase == caffe_pb2.TRAIN:
            return "train"
        return "test"

    def expect_bottoms(self, low: int, high: int | None = None) -> None:
        """Raise ValueError unless the layer has between low and high (inclusive) bottoms."""
        n, high = len(self.bottom_shapes), low if high is None else high
        if n < low or (high >= 0 and n > high):
            want = str(low) if high == low else f"{low}+" if high < 0 else f"{low} to {high}"
            raise ValueError(f"{self.type_name} takes {want} bottom blob(s), got {n}")

    # -- parameter blobs -------------------------------------------------------
    def init_blobs(self, arrays: list[np.ndarray] | None = None) -> None:
        """Create the parameter blobs: from ``arrays`` (already shape-checked) or zeros.

        Each blob is copied once into fresh, contiguous float32 torch storage (64-byte
        aligned by torch's CPU allocator), never kept as a view of ``arrays``: the arrays
        read from a caffemodel are views into the file's memory map at whatever byte offset
        the protobuf put them (often not even 4-byte aligned), and MKL's GEMV (an
        InnerProduct at batch 1) sums in a different order for each address mod 16 bytes,
        so the same weights read from a V1 and a V2 file gave different output bits.
        """
        for i, shape in enumerate(self.param_shapes):
            if arrays is None:
                data = torch.zeros(shape, dtype=torch.float32)
            else:
                data = torch.empty(shape, dtype=torch.float32).copy_(
                    torch.as_tensor(np.asarray(arrays[i]), dtype=torch.float32).reshape(shape))
            self.register_parameter(str(i), nn.Parameter(data, requires_grad=not self.frozen_blobs))

    @property
    def blobs(self) -> list[nn.Parameter]:
        return [getattr(self, str(i)) for i in range(len(self.param_shapes))]

    def forward(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        """Short text of the parameters that matter (for tables and drift reports)."""
        return ""

    def work(self) -> int:
        """Multiply-adds (or comparisons) of the port's forward of this layer at its declared
        shapes, for ``porting.budget``; computed from shapes only. Default: one per top value."""
        return sum(count(s) for s in self.top_shapes)

    def workspace(self) -> int:
        """Values the layer holds while it runs besides its tops and parameters, for
        ``porting.budget`` (one sample's worth, as Caffe keeps them). Default: none."""
        return 0

    # -- float32 rounding and decisions (see porting.rounding) --------------------
    # Every tensor in and out is float64. ``bottoms`` are this layer's inputs as one
    # framework saw them (float32 values), ``exact_tops`` this layer in float64 applied to
    # those same bottoms, ``tops`` that framework's own (float32) outputs, ``top_diffs`` the
    # gradients it received per top (None for a top that got none), ``abs_module`` an
    # optional ``porting.rounding.magnitude_twin`` of this layer (saves a copy).
    def forward_bound(self, bottoms, exact_tops, abs_module=None) -> list[torch.Tensor] | None:
        """Element-wise bound on |fl32(top) - exact top| that float32 rounding inside this
        layer can cause, one tensor per top in the top's units, derived from Caffe 1.0's
        own CPU algorithm; None: no rule (the error is reported, not judged)."""
        return None

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs,
                       abs_module=None) -> list[torch.Tensor | None] | None:
        """Element-wise bound on |fl32(bottom diff) - exact bottom diff|, one per bottom in
        its units (None where no gradient flows). The exact diff is this layer's float64
        backward at ``bottoms``; the bound counts the error of ``tops`` where Caffe's
        backward reads its stored top. None: no rule."""
        return None

    def decisions(self, bottoms) -> list[torch.Tensor] | None:
        """The discrete decisions this layer takes on these bottoms (integer or bool
        tensors, e.g. x > 0 for ReLU, the winner's index for MAX pooling); None: none."""
        return None

    def decision_margins(self, bottoms) -> list[torch.Tensor] | None:
        """Per decision of ``decisions``, how far the deciding value is from its kink or tie,
        in the bottom's units (0: a tie; inf: nothing to decide); None: no decisions."""
        return None


def build_layer(param: caffe_pb2.LayerParameter | str, bottom_shapes, blobs=None) -> CaffeLayer:
    """One layer outside any net, from a LayerParameter or its prototxt text.

    ``bottom_shapes`` is a list of shapes; ``blobs`` optional arrays in Caffe order (zeros
    otherwise). V1 enum type names (``CONVOLUTION``) are accepted. Raises ValueError on an
    impossible configuration and KeyError on an unknown type.
    """
    if isinstance(param, str):
        from google.protobuf import text_format

        param = text_format.Parse(param, caffe_pb2.LayerParameter())
    type_name = V1_TYPES.get(param.type, param.type)
    if type_name in REFUSED:
        raise KeyError(f"{type_name}: {REFUSED[type_name]}")
    spec = SimpleNamespace(name=param.name, type=type_name, bottoms=list(param.bottom),
                           tops=list(param.top), param=param)
    layer = LAYERS[type_name](spec, [tuple(s) for s in bottom_shapes])
    layer.init_blobs(blobs)
    return layer


def _import_builtin_layers() -> None:
    """Registration happens on import: every module of this package is imported once (kept
    last: they import the names above), so adding a layer is adding a module."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        importlib.import_module(f"{__name__}.{info.name}")


_import_builtin_layers()
