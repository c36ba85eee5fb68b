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

Layers from Caffe forks come from plugins: an installed distribution declares entry points
in the group ``porting.layers``, each naming a module (importing it runs its ``@register``)
or a registered class; a plugin layer is written exactly like a built-in one. Plugins are
loaded once, after the built-in layers, when this package is first imported. A plugin that
fails (an import error, a type already registered, a refused type, something that is not a
registered ``CaffeLayer`` subclass) is left out whole, with one warning line naming its
distribution and entry point (logger ``porting.layers``; also kept in ``PLUGIN_PROBLEMS``).
A fork layer whose parameter message is not in Caffe 1.0's caffe.proto declares it
(``fork_param``, a ``ForkParam``); prototxt parsing then accepts that field.

A layer type also knows the classic ways a port of it goes wrong (``port_bugs``: each a
``PortBug``, the variant built from the layer itself), which porting.verify.diagnose
tries on the layer where someone else's port departs from Caffe.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from types import MethodType, SimpleNamespace

import numpy as np
import torch
from torch import nn

from porting import caffe_pb2

LAYERS: dict[str, type["CaffeLayer"]] = {}
V1_TYPES: dict[str, str] = {}  # V1LayerParameter.LayerType name -> V2 type string

# Types that are refused by name, whatever the registry holds (never executed).
REFUSED = {"Python": "Python layers run arbitrary code and are never executed"}

PLUGIN_GROUP = "porting.layers"  # the entry-point group of layer plugins
PLUGIN_PROBLEMS: list[str] = []  # one line per plugin left out (also logged as a warning)
BUILT_IN = "built-in"            # ``CaffeLayer.origin`` of the layers of this package
_loading: str | None = None      # origin of the plugin being loaded ("plugin dist version")


def register(type_name: str, v1: str | None = None):
    """Class decorator: register a layer under its V2 type name (and its V1 enum name).

    Sets ``cls.type_name`` and ``cls.origin``: "built-in", "plugin <distribution> <version>"
    (registered while its entry point loads) or "module <name>" (registered by other code).
    Raises ValueError for a refused type or a type, V1 name or fork field already registered
    (nothing is ever overridden), TypeError for a non-``CaffeLayer``.
    """

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, CaffeLayer)):
            raise TypeError(f"register({type_name!r}): {getattr(cls, '__qualname__', cls)!r} "
                            "is not a subclass of porting.layers.CaffeLayer")
        if type_name in REFUSED:
            raise ValueError(f"layer type {type_name!r} is refused ({REFUSED[type_name]}) and cannot be registered")
        taken = LAYERS.get(type_name)
        if taken is not None and taken is not cls:
            raise ValueError(f"layer type {type_name!r} is already registered ({taken.origin}: "
                             f"{taken.__module__}.{taken.__qualname__})")
        if v1 and V1_TYPES.get(v1, type_name) != type_name:
            raise ValueError(f"V1 type {v1} already stands for {V1_TYPES[v1]!r}")
        if cls.__dict__.get("fork_param") is not None:
            _check_fork_param(cls.fork_param, type_name)
        cls.type_name = type_name
        cls.origin = _loading or (BUILT_IN if cls.__module__.startswith(__name__ + ".") else f"module {cls.__module__}")
        LAYERS[type_name] = cls
        if v1:
            V1_TYPES[v1] = type_name
        return cls

    return wrap


# -- parameter messages -----------------------------------------------------------
_SCALAR_TYPES = {"double": 1, "float": 2, "int64": 3, "uint64": 4, "int32": 5, "bool": 8, "string": 9,
                 "uint32": 13}  # FieldDescriptorProto.Type numbers


@dataclass(frozen=True)
class ForkParam:
    """A LayerParameter field a Caffe fork adds, as the fork's caffe.proto declares it, e.g.
    ``optional ShuffleChannelParameter shuffle_channel_param = 164;`` with ``message
    ShuffleChannelParameter { optional uint32 group = 1 [default = 1]; }`` is
    ``ForkParam("shuffle_channel_param", 164, "ShuffleChannelParameter", {"group": (1, "uint32", 1)})``.
    ``fields``: name -> (number, scalar type: one of double float int64 uint64 int32 bool
    string uint32, default or None); all optional."""

    field: str
    number: int
    message: str
    fields: dict  # kept as a tuple of (name, (number, type, default)) items: hashable

    def __post_init__(self):
        object.__setattr__(self, "fields", tuple((k, tuple(v)) for k, v in dict(self.fields).items()))


def _check_fork_param(fork: ForkParam, type_name: str) -> None:
    known = caffe_pb2.LayerParameter.DESCRIPTOR
    for cls in LAYERS.values():
        other = cls.__dict__.get("fork_param")
        if other is not None and other != fork and (other.field == fork.field or other.number == fork.number
                                                    or other.message == fork.message):
            raise ValueError(f"{type_name}'s fork field {fork.field} = {fork.number} clashes with "
                             f"{cls.type_name}'s {other.field} = {other.number}")
    if fork.field in known.fields_by_name or fork.number in known.fields_by_number:
        raise ValueError(f"{type_name}'s fork field {fork.field} = {fork.number} clashes with a field of "
                         "Caffe's LayerParameter")
    if fork.message in known.file.message_types_by_name:
        raise ValueError(f"{type_name}'s fork message {fork.message} clashes with a message of caffe.proto")
    bad = [name for name, (_, kind, _) in fork.fields if kind not in _SCALAR_TYPES]
    if bad:
        raise ValueError(f"{type_name}'s fork message {fork.message}: field(s) {', '.join(bad)} not of a "
                         f"scalar type ({', '.join(_SCALAR_TYPES)})")


def param_fields(cls: type["CaffeLayer"]) -> tuple[str, ...]:
    """The ``*_param`` fields of LayerParameter that a layer type reads: its ``param_fields``
    if it sets them, else its fork field, else the field named after the type if caffe.proto
    has one (InnerProduct: inner_product_param, PReLU: prelu_param), else none."""
    if cls.param_fields is not None:
        return tuple(cls.param_fields)
    if cls.fork_param is not None:
        return (cls.fork_param.field,)
    key = cls.type_name.lower()
    return tuple(f for f in caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
                 if f.endswith("_param") and f[: -len("_param")].replace("_", "") == key)


def param_message_fields(field: str) -> list[str]:
    """The field names of the message held in LayerParameter field ``field``."""
    fields = schema().LayerParameter.DESCRIPTOR.fields_by_name
    return [f.name for f in fields[field].message_type.fields] if field in fields else []


def schema() -> SimpleNamespace:
    """The message classes prototxt text is read with: caffe.proto's ``NetParameter`` and
    ``LayerParameter``, plus the fields of the registered fork layers (``fork_param``).
    Parse with these, then hand on ``caffe_pb2`` messages (``to_caffe``): protobuf keeps a
    fork field there as an unknown field, which ``CaffeLayer.fork_params`` reads back."""
    return _schema(tuple(sorted({c.fork_param for c in LAYERS.values() if c.fork_param is not None},
                                key=lambda f: f.number)))


@lru_cache(maxsize=8)
def _schema(forks: tuple[ForkParam, ...]) -> SimpleNamespace:
    if not forks:
        return SimpleNamespace(NetParameter=caffe_pb2.NetParameter, LayerParameter=caffe_pb2.LayerParameter)
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto()
    caffe_pb2.DESCRIPTOR.CopyToProto(proto)
    layer = next(m for m in proto.message_type if m.name == "LayerParameter")
    for fork in forks:
        message = proto.message_type.add(name=fork.message)
        for name, (number, kind, default) in fork.fields:
            f = message.field.add(name=name, number=number, label=1, type=_SCALAR_TYPES[kind])
            if default is not None:
                f.default_value = str(default).lower() if kind == "bool" else str(default)
        layer.field.add(name=fork.field, number=fork.number, label=1, type=11,
                        type_name=f".{proto.package}.{fork.message}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    cls = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{proto.package}.{name}"))
    return SimpleNamespace(NetParameter=cls("NetParameter"), LayerParameter=cls("LayerParameter"))


def to_caffe(message, cls=caffe_pb2.NetParameter):
    """A message of ``schema()`` as the ``caffe_pb2`` class ``cls`` (fork fields unknown)."""
    return message if type(message) is cls else cls.FromString(message.SerializeToString())


def from_caffe(message, name: str = "NetParameter"):
    """A ``caffe_pb2`` message as ``schema()``'s class ``name``, fork fields readable (e.g. to
    write it as text with them)."""
    cls = getattr(schema(), name)
    return message if type(message) is cls else cls.FromString(message.SerializeToString())


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


@dataclass
class PortBug:
    """One classic way a port of a layer type gets it wrong (``CaffeLayer.port_bugs``).

    ``id``: its name in the diagnosis catalogue (e.g. "pool-floor"); ``what``: the words
    completing "<layer> matches ..." (e.g. "with the pooled size rounded down
    (ceil_mode=False)"); ``why``: what Caffe does instead (may be empty). The variant:
    ``layer``, a float64 layer (this one rebuilt with ``CaffeLayer.variant``, patched with
    ``CaffeLayer.patched``, or itself) whose tops are what the buggy port computes from
    ``bottoms`` (float64; None: the bottoms ``port_bugs`` was given). It is claimed only when
    the port's output is within ``layer.forward_bound`` of it, plus ``slack``: a bound on
    the port's extra float32 rounding (0, a tensor of the top's shape, or a function giving
    it). A variant no layer reproduces (random) gives ``explain`` instead: a function of the
    port's output (float64) returning ``(what, why)`` when the output is that variant, else
    None; such a bug is tried after every re-run one.
    """

    id: str
    what: str
    layer: object = None
    bottoms: list | None = None
    why: str = ""
    slack: object = 0.0
    explain: Callable | None = None


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
    # Where the type comes from: "built-in" or "plugin <distribution> <version>" (set by register).
    origin = BUILT_IN
    # The LayerParameter ``*_param`` fields the type reads; None: by convention (``param_fields``).
    param_fields: tuple[str, ...] | None = None
    # A fork layer's own parameter field, missing from Caffe 1.0's caffe.proto (a ForkParam).
    fork_param: ForkParam | None = None

    def __init__(self, spec, bottom_shapes: list[tuple[int, ...]]):
        super().__init__()
        self.spec = spec
        self.bottom_shapes = [tuple(int(d) for d in s) for s in bottom_shapes]
        self.param_shapes: list[tuple[int, ...]] = []
        self.top_shapes: list[tuple[int, ...]] = []

    # -- helpers for subclasses -------------------------------------------------
    def fork_params(self):
        """This layer's ``fork_param`` message (its defaults when the prototxt has none)."""
        return getattr(from_caffe(self.spec.param, "LayerParameter"), self.fork_param.field)

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

    # -- classic porting bugs (see porting.verify.diagnose) -----------------------
    def port_bugs(self, bottoms, top_shape) -> Iterator[PortBug]:
        """The classic porting bugs of this type that could explain a port's output of shape
        ``top_shape`` (the top compared) from ``bottoms`` (float64, as this layer reads them;
        called on the float64 layer), in the order to try them. A bug that cannot be built
        for this configuration may raise ValueError, RuntimeError, IndexError or KeyError:
        the rest are then skipped. Default: none."""
        return iter(())

    def variant(self, bottoms, edit=None, blobs=None) -> "CaffeLayer":
        """This layer built again in float64 for ``bottoms`` from a copy of its LayerParameter
        edited by ``edit(param)``, with ``blobs`` (arrays in Caffe order; default its own)."""
        param = type(self.spec.param)()
        param.CopyFrom(self.spec.param)
        if edit is not None:
            edit(param)
        arrays = [b.detach().double().numpy() for b in self.blobs] if blobs is None else blobs
        layer = build_layer(param, [tuple(b.shape) for b in bottoms], arrays)
        with torch.no_grad():
            for p in layer.parameters():
                p.data = p.data.double()
        return layer

    def patched(self, name: str, fn) -> "CaffeLayer":
        """A copy of this layer with its method ``name`` replaced by ``fn`` (called as
        ``fn(layer, ...)``) on the copy only."""
        twin = copy.deepcopy(self)
        setattr(twin, name, MethodType(fn, twin))
        return twin


def build_layer(param: caffe_pb2.LayerParameter | str, bottom_shapes, blobs=None) -> CaffeLayer:
    """One layer outside any net, from a LayerParameter or its prototxt text.

    ``bottom_shapes`` is a list of shapes; ``blobs`` optional arrays in Caffe order (zeros
    otherwise). V1 enum type names (``CONVOLUTION``) are accepted. Raises ValueError on an
    impossible configuration and KeyError on an unknown type.
    """
    if isinstance(param, str):
        from google.protobuf import text_format

        param = to_caffe(text_format.Parse(param, schema().LayerParameter()), caffe_pb2.LayerParameter)
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


def load_plugins(entry_points=None) -> None:
    """Load the layer plugins (``entry_points``: default, those installed in the group
    ``porting.layers``), each whole or not at all; a plugin that fails is logged as one
    warning line naming its distribution and entry point and kept in ``PLUGIN_PROBLEMS``."""
    global _loading
    if entry_points is None:
        from importlib.metadata import entry_points as installed

        entry_points = installed(group=PLUGIN_GROUP)
    import types

    for ep in sorted(entry_points, key=lambda e: (getattr(e.dist, "name", "") or "", e.name)):
        dist = getattr(ep, "dist", None)
        origin = f"plugin {dist.name} {dist.version}" if dist is not None else "plugin (unknown distribution)"
        before = dict(LAYERS), dict(V1_TYPES)
        _loading = origin
        try:
            loaded = ep.load()
            if isinstance(loaded, type):
                if not issubclass(loaded, CaffeLayer) or LAYERS.get(loaded.type_name) is not loaded:
                    raise TypeError(f"{ep.value} is not a CaffeLayer subclass registered with "
                                    "porting.layers.register")
            elif not isinstance(loaded, types.ModuleType):
                raise TypeError(f"{ep.value} is a {type(loaded).__name__}, not a module or a CaffeLayer subclass")
            elif set(LAYERS) == set(before[0]):
                raise TypeError(f"module {ep.value} registered no layer type")
            schema()  # a fork field that protobuf refuses fails here, with its plugin
        except Exception as err:  # a plugin must not break the package: left out, said once
            LAYERS.clear(), LAYERS.update(before[0]), V1_TYPES.clear(), V1_TYPES.update(before[1])
            reason = " ".join(str(err).split()) or type(err).__name__
            if isinstance(err, ImportError):
                reason = f"{type(err).__name__}: {reason}"
            problem = (f"layer {origin} (entry point {ep.name} = {ep.value} in group {PLUGIN_GROUP}) "
                       f"not loaded: {reason}")
            PLUGIN_PROBLEMS.append(problem)
            logging.getLogger(__name__).warning(problem)
        finally:
            _loading = None


_import_builtin_layers()
load_plugins()
