"""A plain graph between the protobuf messages and the torch module.

``build_graph`` takes an upgraded (V2, Input-layer) NetParameter, keeps the layers of the
requested phase, refuses unsupported types all at once, instantiates each registered
layer to infer shapes (nothing is allocated: the layer classes hold shapes only), refuses
blobs Caffe cannot hold (``porting.layers.blob_problem``), matches weights by layer name,
checks the resource budget (``porting.budget``) and only then creates the parameters.
``Graph.table()`` is what ``porting inspect`` prints.

Layer names need not be unique, as in Caffe. Caffe's CopyTrainedLayersFrom gives a
caffemodel's blobs of a name to the first layer of that name only; a later layer with
weights and the same name would keep Caffe's random filler values, which the port does
not reproduce, so it is refused (rename it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import math

from porting import caffe_pb2
from porting.budget import Budget, check
from porting.errors import PortingError, UnsupportedLayers, shown
from porting.layers import LAYERS, REFUSED, CaffeLayer, blob_problem
from porting.layers.data_layers import apply_input_shapes, unknown_shape_problem
from porting.weights import WeightBlob


@dataclass
class LayerSpec:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    param: caffe_pb2.LayerParameter
    module: CaffeLayer | None = None

    @property
    def is_input(self) -> bool:
        """The caller feeds this layer's tops (an Input or data layer): they are net inputs."""
        return getattr(LAYERS.get(self.type), "is_input", False)

    @property
    def in_place(self) -> bool:
        return bool(self.tops) and self.tops == self.bottoms[: len(self.tops)]


@dataclass
class Graph:
    name: str
    inputs: dict[str, tuple[int, ...]]
    layers: list[LayerSpec] = field(default_factory=list)
    blob_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def layer(self, name: str) -> LayerSpec:
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_netparameter(self) -> caffe_pb2.NetParameter:
        """The graph's layers as a V2 NetParameter without weights (for saving and export)."""
        net = caffe_pb2.NetParameter(name=self.name)
        for spec in self.layers:
            layer = net.layer.add()
            layer.CopyFrom(spec.param)
            del layer.blobs[:]
        return net

    def table(self) -> str:
        """A fixed-width table: layer, type, bottoms -> tops, output shape, params, support
        ("yes", "yes (plugin <distribution> <version>)" for a type a plugin supplied, "NO")."""
        from porting.layers import BUILT_IN

        rows = [("layer", "type", "bottoms -> tops", "output shape", "params", "supported")]
        for spec in self.layers:
            shape = "" if spec.module is None else " ".join("x".join(map(str, s)) for s in spec.module.top_shapes)
            count = 0 if spec.module is None else sum(math.prod(s) for s in spec.module.param_shapes)
            cls = None if spec.type in REFUSED else LAYERS.get(spec.type)
            support = "NO" if cls is None else "yes" if cls.origin == BUILT_IN else f"yes ({shown(cls.origin)})"
            rows.append((shown(spec.name), shown(spec.type), f"{_names(spec.bottoms)} -> {_names(spec.tops)}",
                         shape, f"{count:,}", support))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _phase_allowed(layer: caffe_pb2.LayerParameter, phase: int, level: int = 0, stages=()) -> bool:
    """Caffe's Net::StateMeetsRule: include rules (any must match) else exclude rules (none may)."""

    def meets(rule) -> bool:
        if rule.HasField("phase") and rule.phase != phase:
            return False
        if rule.HasField("min_level") and level < rule.min_level:
            return False
        if rule.HasField("max_level") and level > rule.max_level:
            return False
        if any(s not in stages for s in rule.stage) or any(s in stages for s in rule.not_stage):
            return False
        return True

    if layer.include:
        return any(meets(r) for r in layer.include)
    return not any(meets(r) for r in layer.exclude)


def _with_phase(layer: caffe_pb2.LayerParameter, phase: int) -> caffe_pb2.LayerParameter:
    """A copy of the layer with the net's phase set, as Caffe's Net::Init does; no blob data."""
    copy = caffe_pb2.LayerParameter()
    copy.CopyFrom(layer)
    del copy.blobs[:]
    copy.phase = phase
    return copy


def build_graph(net: caffe_pb2.NetParameter, phase: str = "test",
                weights: dict[str, list[WeightBlob]] | None = None, source: object = None,
                shape_only: bool = False, budget: Budget | None = None,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """Build the graph of an upgraded NetParameter; ``source`` names the file in errors.

    ``budget`` (default ``Budget.default()``: the environment's or the machine's limits) is
    checked before any parameter is created. With ``shape_only`` (for ``inspect``) nothing
    is allocated and no budget applies; unsupported layers are kept instead of refused,
    and shape inference stops at the first of them, or at an input whose shape is unknown.
    ``input_shapes`` (top name -> shape, ``--input-shape``) gives the shapes of input tops
    the prototxt cannot give (a data layer's, see porting.layers.data_layers) or overrides
    them; an unknown one not given is a PortingError naming the top.
    """
    phase_id = {"train": caffe_pb2.TRAIN, "test": caffe_pb2.TEST}[phase.lower()]
    specs = [LayerSpec(l.name, l.type, list(l.bottom), list(l.top), _with_phase(l, phase_id))
             for l in net.layer if _phase_allowed(l, phase_id)]
    bad = [f"{shown(s.name)} ({shown(s.type)}{': ' + REFUSED[s.type] if s.type in REFUSED else ''})"
           for s in specs if s.type not in LAYERS or s.type in REFUSED]
    if bad and not shape_only:
        raise UnsupportedLayers("unsupported layer types: " + "; ".join(bad), source)
    inputs = [t for s in specs if s.is_input for t in s.tops]
    stray = sorted(set(input_shapes or {}) - set(inputs))
    if stray:
        raise PortingError(f"{_names(stray, ', ')}: not an input of the net in phase {phase.lower()} "
                           f"(its inputs: {_names(inputs, ', ') or 'none'})", source, "--input-shape")
    graph = Graph(net.name, {}, specs)
    first_of_name: dict[str, int] = {}
    matched: list[list[WeightBlob] | None] = []
    for index, spec in enumerate(specs):
        if spec.type not in LAYERS or spec.type in REFUSED:
            break
        missing = [b for b in spec.bottoms if b not in graph.blob_shapes]
        if missing:
            raise PortingError(f"bottom blob(s) {_names(missing, ', ')} not produced by any earlier layer",
                               source, _place(spec))
        _check_tops_new_or_in_place(spec, graph.blob_shapes, source)
        try:
            spec.module = LAYERS[spec.type](spec, [graph.blob_shapes[b] for b in spec.bottoms])
        except PortingError:
            raise
        except (ValueError, IndexError) as err:
            raise PortingError(str(err), source, f"{_place(spec)} ({shown(spec.type)})") from None
        if spec.is_input:
            unknown = apply_input_shapes(spec.module, spec.tops, input_shapes or {})
            if unknown and shape_only:
                spec.module = None
                break
            if unknown:
                raise PortingError(unknown_shape_problem(spec.module, unknown[0]), source,
                                   f"{_place(spec)} ({shown(spec.type)})")
        _check_blobs(spec, source)
        if spec.is_input:
            graph.inputs.update(zip(spec.tops, spec.module.top_shapes))
        for top, shape in zip(spec.tops, spec.module.top_shapes):
            graph.blob_shapes[top] = tuple(shape)
        if spec.name not in first_of_name:
            first_of_name[spec.name] = index
            matched.append(_match_weights(spec, (weights or {}).get(spec.name), weights is not None, source))
        elif spec.module.param_shapes:
            raise PortingError(f"a weighted layer with the name of layer {first_of_name[spec.name] + 1}: Caffe gives "
                               "caffemodel blobs of a name to the first layer of that name only, so this one "
                               "would keep its random filler values; rename one of them",
                               source, f"{_place(spec)} (layer {index + 1})")
        else:
            matched.append(None)
    if shape_only:
        return graph
    check(graph, budget if budget is not None else Budget.default(), source)
    for spec, blobs in zip(specs, matched):
        # The module keeps copies: nothing refers to the caffemodel's memory map after loading.
        spec.module.init_blobs(None if blobs is None else [b.data for b in blobs])
    return graph


def _check_tops_new_or_in_place(spec: LayerSpec, existing, source) -> None:
    """Caffe's Net::AppendTop: a top is a new blob name, or in place (the bottom at its
    index has its name); writing an existing blob otherwise aborts Caffe ("Top blob ...
    produced by multiple sources"), a name twice among one layer's tops included."""
    for i, top in enumerate(spec.tops):
        in_place = i < len(spec.bottoms) and spec.bottoms[i] == top
        if not in_place and (top in existing or top in spec.tops[:i]):
            raise PortingError(f"top blob {shown(top)} produced by multiple sources (Caffe refuses a top that "
                               "already exists unless the layer computes it in place)", source, _place(spec))


def _check_blobs(spec: LayerSpec, source) -> None:
    """Every top and parameter blob must be one Caffe can hold and use (Blob::Reshape)."""
    module = spec.module
    named = [(f"top {shown(t)}", s) for t, s in zip(spec.tops, module.top_shapes)]
    named += [(f"parameter blob {i}", s) for i, s in enumerate(module.param_shapes)]
    for what, shape in named:
        problem = blob_problem(shape)
        if problem:
            raise PortingError(f"{what}: {problem}", source, f"{_place(spec)} ({shown(spec.type)})")


def _match_weights(spec: LayerSpec, blobs: list[WeightBlob] | None, have_file: bool,
                   source) -> list[WeightBlob] | None:
    """The stored blobs for this layer, checked against its expected shapes (Caffe's
    CopyTrainedLayersFrom); None: none (zeros). Nothing is allocated here."""
    expected = spec.module.param_shapes
    if blobs is None:
        if expected and have_file:
            raise PortingError(f"weighted layer has no weights in the caffemodel (expects "
                               f"{_fmt_shapes(expected)})", source, _place(spec))
        return None
    if len(blobs) != len(expected):
        raise PortingError(f"caffemodel has {len(blobs)} blob(s) {_fmt_shapes([b.declared() for b in blobs])}, "
                           f"layer expects {len(expected)} {_fmt_shapes(expected)}", source, _place(spec))
    for i, (blob, shape) in enumerate(zip(blobs, expected)):
        if not blob.matches(shape) or blob.data.size != math.prod(shape):
            raise PortingError(f"blob {i} shape mismatch: caffemodel {_fmt_shapes([blob.declared()])} "
                               f"({blob.data.size} values), layer expects {_fmt_shapes([shape])}",
                               source, _place(spec))
        if blob.diff_count not in (0, blob.data.size):  # Blob::FromProto checks the diff count too
            raise PortingError(f"blob {i} has {blob.diff_count} diff values for {blob.data.size} data values",
                               source, _place(spec))
    return blobs


def _place(spec: LayerSpec) -> str:
    return f"layer {shown(spec.name)}"


def _names(names, sep: str = ",") -> str:
    return sep.join(shown(n) for n in names)


def _fmt_shapes(shapes) -> str:
    return ", ".join("(" + "x".join(map(str, s)) + ")" for s in shapes)
