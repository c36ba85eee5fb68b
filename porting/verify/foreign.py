"""Someone else's PyTorch port as the candidate: its arrays under Caffe's keys.

``porting verify --torch FILE.py:FACTORY`` (or ``package.module:FACTORY``) loads a
callable that returns an ``nn.Module`` with its weights loaded; ``--torch FILE.pt2`` an
ExportedProgram (``torch.export.save``), whose graph nodes are recorded in place of
submodules. Loading either runs that code:
it is the user's own port, named on their command line (the prototxt and caffemodel stay
untrusted files as everywhere).

The module runs once on the picture Caffe sees, converted to its input convention
(``InputConvention``), with a forward hook on every submodule. Each Caffe value (a layer's
output before any in-place layer, ``porting.verify.keys.Value``) gets a counterpart among
the recorded module outputs: given (``--map``) or found (``auto_map``). The counterparts'
arrays, reshaped to Caffe's shape, and their gradients (the same objective seed, by
autograd; the input's gradient taken back to Caffe's input space through the conversion)
are keyed as the port's own arrays are, so ``verify_arrays`` judges them by the same
rounding-invariant rules. A Caffe value without a counterpart is missing from the
candidate: reported, not compared, not failed.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from porting.cli_verify import IMAGENET_MEAN_BGR  # the mean verify subtracts from images
from porting.errors import PortingError, shown
from porting.verify.keys import NetValues, Value, blob_key

LOOSE = 1e-2        # auto_map: values agree when max |a - b| <= LOOSE * max |Caffe's|
MAP_LIMIT = 1 << 20  # bytes of a --map file

# Caffe type -> torch module classes (names) that usually implement it: auto_map's
# fallback when no output agrees in value (a buggy port still gets its counterpart).
TYPE_HINTS = {
    "Convolution": ("Conv2d", "Conv1d", "Conv3d"), "Deconvolution": ("ConvTranspose2d",),
    "Pooling": ("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d"),
    "ReLU": ("ReLU", "LeakyReLU"), "PReLU": ("PReLU",), "Sigmoid": ("Sigmoid",), "TanH": ("Tanh",),
    "LRN": ("LocalResponseNorm", "CrossMapLRN2d"), "InnerProduct": ("Linear",),
    "Softmax": ("Softmax",), "Dropout": ("Dropout",), "BatchNorm": ("BatchNorm2d", "BatchNorm1d"),
    "Flatten": ("Flatten",),
}


@dataclass(frozen=True)
class InputConvention:
    """What the module takes, as a function of Caffe's input blob x (N x C x H x W, float).

    ``bgr255``: x itself (Caffe's convention: BGR, 0-255 minus the mean). ``rgb01``
    (torchvision style, 3 channels): the picture x + ``caffe_mean`` (BGR, 0-255) in RGB
    order, over 255, minus ``mean`` over ``std`` (both RGB, in [0, 1] units). The map is
    evaluated in float64 and rounded once to float32; the gradient is taken back through
    it (channel swap and scaling, chain rule) in float64.
    """

    kind: str = "bgr255"
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    caffe_mean: tuple = IMAGENET_MEAN_BGR

    def to_module(self, x64: torch.Tensor) -> torch.Tensor:
        if self.kind == "bgr255":
            return x64
        if x64.dim() != 4 or x64.shape[1] != 3:
            raise PortingError(f"--torch-input rgb01 needs a 3-channel N x 3 x H x W input, the net's is "
                               f"{'x'.join(map(str, x64.shape))}")
        view = (1, 3, 1, 1)
        caffe_mean = torch.tensor(self.caffe_mean, dtype=torch.float64).view(view)
        rgb = (x64 + caffe_mean).flip(1) / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float64).view(view)
        std = torch.tensor(self.std, dtype=torch.float64).view(view)
        return (rgb - mean) / std

    def describe(self) -> dict:
        if self.kind == "bgr255":
            return {"kind": "bgr255"}
        return {"kind": "rgb01", "mean_rgb": list(self.mean), "std_rgb": list(self.std),
                "caffe_mean_bgr": list(self.caffe_mean)}


def parse_triple(text: str, option: str, positive: bool = False) -> tuple[float, float, float]:
    """"a,b,c" -> three finite floats (``positive``: each > 0); PortingError naming ``option``."""
    parts = str(text).split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        raise PortingError(f"expected three {'positive ' if positive else ''}numbers a,b,c, got {shown(text)}",
                           place=option)
    return values


def convention_from_options(kind=None, mean=None, std=None, caffe_mean=None) -> InputConvention:
    """The InputConvention of ``--torch-input`` (``kind``: "bgr255", the default, or "rgb01"),
    ``--torch-mean``, ``--torch-std`` (RGB, [0, 1] units) and ``--caffe-mean`` (BGR, 0-255):
    each triple "a,b,c" or three numbers, None for the default. PortingError naming the option."""
    kind = kind or "bgr255"
    if kind not in ("bgr255", "rgb01"):
        raise PortingError(f"expected bgr255 or rgb01, got {shown(kind)}", place="--torch-input")
    given = {o: v if v is None or isinstance(v, str) else ",".join(map(str, v)) for o, v in (
        ("--torch-mean", mean), ("--torch-std", std), ("--caffe-mean", caffe_mean))}
    if kind == "bgr255":
        if any(v is not None for v in given.values()):
            raise PortingError("--torch-mean, --torch-std and --caffe-mean are taken only with --torch-input rgb01")
        return InputConvention(kind)
    return InputConvention(kind, parse_triple(given["--torch-mean"] or "0,0,0", "--torch-mean"),
                           parse_triple(given["--torch-std"] or "1,1,1", "--torch-std", positive=True),
                           parse_triple(given["--caffe-mean"], "--caffe-mean") if given["--caffe-mean"]
                           else IMAGENET_MEAN_BGR)


# --------------------------------------------------------------------------------------
# Loading the user's module
# --------------------------------------------------------------------------------------

def load_module(spec: str) -> torch.nn.Module:
    """``FILE.py:FACTORY`` or ``package.module:FACTORY`` -> ``FACTORY()``, an nn.Module in eval
    mode; ``FILE.pt2`` (``torch.export.save``) -> its program's module (a GraphModule, in
    the mode it was exported in).

    Runs the user's code (their own port, named by them). Anything that goes wrong while
    importing or calling it is a PortingError naming ``spec``.
    """
    if str(spec).endswith(".pt2"):
        path = Path(spec)
        if not path.is_file():
            raise PortingError("no such file", path)
        try:
            return torch.export.load(path).module()
        except Exception as err:  # the user's own file, of torch's format
            raise PortingError(f"cannot load the exported program: {type(err).__name__}: {shown(err, 200)}",
                               path) from None
    source, _, name = str(spec).rpartition(":")
    if not source or not name.isidentifier():
        raise PortingError("expected FILE.py:FACTORY or package.module:FACTORY", place=f"--torch {shown(spec)}")
    place = f"--torch {shown(spec)}"
    try:
        if source.endswith(".py"):
            path = Path(source)
            if not path.is_file():
                raise PortingError("no such file", path)
            unique = f"_porting_foreign_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            code = importlib.util.module_from_spec(module_spec)
            folder = str(path.resolve().parent)
            sys.path.insert(0, folder)  # the port's sibling files
            try:
                module_spec.loader.exec_module(code)
            finally:
                if folder in sys.path:
                    sys.path.remove(folder)
        else:
            code = importlib.import_module(source)
        factory = getattr(code, name, None)
        if not callable(factory):
            raise PortingError(f"{shown(source)} has no callable {shown(name)}", place=place)
        module = factory()
    except PortingError:
        raise
    except Exception as err:  # the user's code: any failure is theirs, reported in one line
        raise PortingError(f"loading the module failed: {type(err).__name__}: {shown(err, 200)}",
                           place=place) from None
    if not isinstance(module, torch.nn.Module):
        raise PortingError(f"{shown(name)}() returned {type(module).__name__}, not a torch.nn.Module", place=place)
    return module.eval()


# --------------------------------------------------------------------------------------
# Running it with hooks
# --------------------------------------------------------------------------------------

@dataclass
class Output:
    """One tensor a submodule returned: module ``path`` ("" for the whole module), its
    ``call``-th call (0 first), element ``index`` of its output (0 for a lone tensor)."""

    path: str
    call: int
    index: int
    module_type: str
    tensor: torch.Tensor = field(repr=False)

    @property
    def name(self) -> str:
        return (self.path or "<module>") + (f"#{self.call}" if self.call else "") + f"[{self.index}]"

    def spec(self) -> dict:
        """The --map entry that names this output."""
        out = {"module": self.path, "output": self.index}
        if self.call:
            out["call"] = self.call
        return out


def run_hooked(module: torch.nn.Module, x: torch.Tensor) -> list[Output]:
    """Run ``module(x)`` recording every submodule's tensor outputs in the order they
    complete (the whole module's last). Each recorded tensor is handed on as a copy, so an
    in-place layer after it (ReLU(inplace=True)) leaves the recorded value as it was."""
    outputs: list[Output] = []
    calls: dict[str, int] = {}

    def hook(path, sub, _inputs, result):
        call = calls.get(path, 0)
        calls[path] = call + 1
        if isinstance(result, torch.Tensor):
            outputs.append(Output(path, call, 0, type(sub).__name__, result))
            return result.clone()
        if type(result) in (tuple, list):
            copies = []
            for i, item in enumerate(result):
                if isinstance(item, torch.Tensor):
                    outputs.append(Output(path, call, i, type(sub).__name__, item))
                    item = item.clone()
                copies.append(item)
            return type(result)(copies)
        return None

    if isinstance(module, torch.fx.GraphModule):
        return _run_graph(module, x)
    handles = [m.register_forward_hook(lambda m, i, o, p=path: hook(p, m, i, o))
               for path, m in module.named_modules()]
    try:
        module(x)
    except Exception as err:  # the user's module: its failure is a failed verification input
        raise PortingError(f"the module's forward failed: {type(err).__name__}: {shown(err, 200)}",
                           place="--torch") from None
    finally:
        for h in handles:
            h.remove()
    return outputs


def _run_graph(graph_module: torch.fx.GraphModule, x: torch.Tensor) -> list[Output]:
    """run_hooked for a graph (an exported program's module): every call_function node's
    tensor output, the node's name as its path. The last node a source module produced
    (``nn_module_stack``) carries that module's class name, for auto_map's type hints."""
    last_of: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if stack:
            where, kind = list(stack.values())[-1]
            last_of[where] = (node.name, str(getattr(kind, "__name__", kind)).rsplit(".", 1)[-1])
    kinds = dict(last_of.values())
    outputs: list[Output] = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.op != "call_function":
                return result
            items = [result] if isinstance(result, torch.Tensor) else list(result) if type(result) in (
                tuple, list) else []
            copies = []
            for i, item in enumerate(items):
                if isinstance(item, torch.Tensor):
                    outputs.append(Output(node.name, 0, i, kinds.get(node.name, ""), item))
                    item = item.clone()  # an in-place node after it (relu_) leaves the record alone
                copies.append(item)
            return copies[0] if isinstance(result, torch.Tensor) else type(result)(copies) if items else result

    try:
        Recorder(graph_module).run(x)
    except Exception as err:
        raise PortingError(f"the exported program failed: {type(err).__name__}: {shown(err, 200)}",
                           place="--torch") from None
    return outputs


def fit(tensor: torch.Tensor, shape) -> torch.Tensor | None:
    """``tensor`` in Caffe's ``shape``: as it is, or reshaped when only the layout of the
    item differs (N x C*H*W flattened vs N x C x H x W); None when they cannot be the same."""
    shape = tuple(int(d) for d in shape)
    if tuple(tensor.shape) == shape:
        return tensor
    if tensor.dim() >= 1 and len(shape) >= 1 and tensor.shape[0] == shape[0] and tensor.numel() == math.prod(shape):
        return tensor.reshape(shape)
    return None


def _agrees(a: torch.Tensor, r: torch.Tensor, scale: float) -> bool:
    """max |a - r| <= LOOSE * scale (``r`` float64, ``scale`` its largest magnitude)."""
    return bool(torch.isfinite(a).all()) and float((a.detach().double() - r).abs().max()) <= LOOSE * scale


# --------------------------------------------------------------------------------------
# The correspondence
# --------------------------------------------------------------------------------------

@dataclass
class Match:
    value: Value
    output: Output
    how: str        # "value" (agrees within LOOSE), "type" (module class only), "map" (given)


def compared_values(values: NetValues) -> list[Value]:
    """The Caffe values a counterpart is looked for: every layer output but the inputs'."""
    return [v for v in values.values if not values.specs[v.position].is_input]


def auto_map(values: NetValues, caffe: Mapping, outputs: list[Output]) -> list[Match]:
    """Each Caffe value, in net order, to the first module output after the previous
    match that has its shape (after ``fit``) and agrees in value within LOOSE; failing
    that, to the first later output of a module class that usually implements its layer
    type (TYPE_HINTS), whatever its values or shape; failing both, none."""
    matches = []
    cursor = -1
    for v in compared_values(values):
        ref = values.read(caffe, v, "data")
        if ref is None:
            continue
        found = how = None
        r = torch.as_tensor(np.asarray(ref, np.float64))
        scale = float(r.abs().max()) if r.numel() else 0.0
        for j in range(cursor + 1, len(outputs)):
            fitted = fit(outputs[j].tensor, np.shape(ref))
            if fitted is not None and _agrees(fitted, r, scale):
                found, how = j, "value"
                break
        if found is None:
            hints = TYPE_HINTS.get(values.specs[v.position].type, ())
            found = next((j for j in range(cursor + 1, len(outputs)) if outputs[j].module_type in hints), None)
            how = "type"
        if found is not None:
            matches.append(Match(v, outputs[found], how))
            cursor = found
    return matches


def read_map(path) -> dict:
    """A --map file: JSON object, Caffe name -> "module.path" | [path, output] | {"module", "output", "call"}."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAP_LIMIT:
            raise PortingError(f"{size} bytes; a map is at most {MAP_LIMIT}", path)
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PortingError(f"cannot read ({err.strerror or err})", path) from None
    except (UnicodeDecodeError, ValueError) as err:
        raise PortingError(f"not JSON ({shown(err, 120)})", path) from None
    if not isinstance(data, dict):
        raise PortingError("expected a JSON object: Caffe blob or layer name -> module path and output", path)
    return data


def given_map(values: NetValues, data: Mapping, outputs: list[Output], module: torch.nn.Module,
              path) -> list[Match]:
    """Resolve a read_map dict. A key is a Caffe layer name (its first output, before any
    in-place layer) or a blob name (its last value); any bad entry is a PortingError."""
    paths = set(dict(module.named_modules())) | {o.path for o in outputs}  # graph nodes for a .pt2
    by_name = {(o.path, o.call, o.index): o for o in outputs}
    matches = []
    for key, entry in data.items():
        place = shown(key)
        if key in values.by_layer and values.by_layer[key] and not values.specs[values.position[key]].is_input:
            value = values.by_layer[key][0]
        elif key in values.last_value and not values.specs[values.last_value[key].position].is_input:
            value = values.last_value[key]
        else:
            raise PortingError("no layer or computed blob of the net has this name", path, place)
        if isinstance(entry, str):
            entry = {"module": entry}
        elif isinstance(entry, list) and len(entry) == 2:
            entry = {"module": entry[0], "output": entry[1]}
        if not isinstance(entry, dict) or not isinstance(entry.get("module"), str) or set(entry) - {
                "module", "output", "call"}:
            raise PortingError('expected "module.path", [path, output] or {"module", "output", "call"}', path, place)
        index, call = entry.get("output", 0), entry.get("call", 0)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (index, call)):
            raise PortingError("output and call must be integers >= 0", path, place)
        if entry["module"] not in paths:
            raise PortingError(f"the module has no submodule {shown(entry['module'])}", path, place)
        found = by_name.get((entry["module"], call, index))
        if found is None:
            raise PortingError(f"{shown(entry['module'] or '<module>')} produced no tensor output {index} "
                               f"on call {call}", path, place)
        matches.append(Match(value, found, "map"))
    return sorted(matches, key=lambda m: (m.value.position, m.value.index))


def mapping_json(matches: list[Match], values: NetValues, caffe: Mapping) -> dict:
    """The mapping used, as --map takes it (layer names as keys), and the unmatched values."""
    used = {m.value: m for m in matches}
    mapping, how, missing = {}, {}, []
    for v in compared_values(values):
        m = used.get(v)
        name = v.layer if v.index == 0 else v.blob
        if m is None:
            if values.read(caffe, v, "data") is not None:
                missing.append(name)
            continue
        mapping[name] = m.output.spec()
        how[name] = m.how
    return {"map": mapping, "matched_by": how, "no_counterpart": missing}


# --------------------------------------------------------------------------------------
# The candidate's arrays
# --------------------------------------------------------------------------------------

def foreign_arrays(module: torch.nn.Module, graph, caffe: Mapping, inputs: Mapping[str, np.ndarray],
                   objective=None, convention: InputConvention = InputConvention(), map_data=None,
                   map_path=None) -> tuple[dict[str, np.ndarray], dict]:
    """Run ``module`` on the net's one input, find the correspondence (``map_data`` from
    read_map, else auto_map against Caffe's arrays ``caffe``) and return the module's
    arrays under Caffe's keys (float32, Caffe's shapes) and the mapping report
    (mapping_json plus notes). The input blob's data is the array given (what the module
    was fed, before the conversion); its diff is the gradient taken back through it."""
    values = NetValues(graph)
    feeds = [n for n in inputs if not _is_label(graph, n)]
    if len(feeds) != 1:
        raise PortingError(f"--torch feeds one input blob; the net has {len(feeds)} ({', '.join(feeds)})")
    name = feeds[0]
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    x64 = torch.as_tensor(np.asarray(inputs[name], np.float64)).requires_grad_(objective is not None)
    with torch.set_grad_enabled(objective is not None):
        fed = convention.to_module(x64).to(dtype)
        outputs = run_hooked(module, fed)
    matches = (given_map(values, map_data, outputs, module, map_path) if map_data is not None
               else auto_map(values, caffe, outputs))
    out: dict[str, np.ndarray] = {}
    fitted: dict[Value, torch.Tensor] = {}
    for m in matches:
        ref = values.read(caffe, m.value, "data")
        tensor = None if ref is None else fit(m.output.tensor, np.shape(ref))
        fitted[m.value] = m.output.tensor if tensor is None else tensor
        arr = fitted[m.value].detach().float().numpy().copy()
        out[m.value.key("data")] = arr
        if m.value.last:
            out[blob_key(m.value.blob, "data")] = arr
    given = np.asarray(inputs[name], np.float32)
    for v in values.values:
        if values.specs[v.position].is_input and v.blob == name:
            out[v.key("data")] = given
            if v.last:
                out[blob_key(v.blob, "data")] = given
    report = mapping_json(matches, values, caffe)
    report["outputs_recorded"] = len(outputs)
    if objective is None:
        return out, report
    target_value = values.last_value.get(objective.blob)
    if target_value not in fitted:
        report["gradients"] = f"not compared: the objective blob {objective.blob} has no counterpart"
        return out, report
    stop = target_value.position
    target = fitted[target_value]
    seed = torch.from_numpy(objective.seed(tuple(target.shape))).to(target.dtype)
    wrt = [(m.value, m.output.tensor) for m in matches if m.value.position <= stop and m.output.tensor.requires_grad]
    grads = torch.autograd.grad(target, [x64] + [t for _, t in wrt], seed, allow_unused=True)
    dx = grads[0]
    for (value, tensor), g in zip(wrt, grads[1:]):
        g = torch.zeros_like(tensor) if g is None else g
        arr = g.reshape(fitted[value].shape).detach().float().numpy().copy()
        out[value.key("diff")] = arr
        if value.first:
            out[blob_key(value.blob, "diff")] = arr
    dx = np.zeros(given.shape, np.float32) if dx is None else dx.detach().float().numpy().copy()
    for v in values.values:
        if values.specs[v.position].is_input and v.blob == name:
            out[v.key("diff")] = dx
            if v.first:
                out[blob_key(v.blob, "diff")] = dx
    report["gradients"] = f"compared up to {objective.blob} (the input's through the {convention.kind} conversion)"
    return out, report


def _is_label(graph, name: str) -> bool:
    from porting.verify.run import label_classes

    return bool(label_classes(graph, name))


@dataclass
class Foreign:
    """Someone else's module to verify (``spec`` as load_module takes it; ``module``, when
    given, is what it loaded), its input ``convention`` and the correspondence
    ``map_data`` (read_map; None: auto_map)."""

    spec: str
    convention: InputConvention = InputConvention()
    map_data: dict | None = None
    map_path: object = None
    name: str = "torch"
    module: torch.nn.Module | None = None

    def verify(self, net, reference: Mapping, inputs: Mapping[str, np.ndarray], objective=None,
               tolerances=None, strict: bool = False):
        """Verify the module against Caffe's arrays ``reference`` as ``verify_port`` verifies
        the port: the port's float64 twin is the exact reading every layer is judged by.
        Returns (verification, the module's keyed arrays, the mapping report)."""
        from porting.verify.run import float64_twin, port_arrays
        from porting.verify.verdict import verify_arrays

        module = self.module if self.module is not None else load_module(self.spec)
        candidate, mapping = foreign_arrays(module, net.graph, reference, inputs, objective, self.convention,
                                            self.map_data, self.map_path)
        mapping = {"module": str(self.spec), "input": self.convention.describe(),
                   "map_given": None if self.map_path is None else str(self.map_path), **mapping}
        net64 = float64_twin(net)
        exact = port_arrays(net64, inputs, objective)
        verification = verify_arrays(net64, reference, candidate, tolerances, objective, exact,
                                     names=("caffe", self.name), inputs=inputs, strict=strict, foreign=True)
        return verification, candidate, mapping
