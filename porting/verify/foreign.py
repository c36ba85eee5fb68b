"""Someone else's PyTorch port as the candidate: its arrays under Caffe's keys.

``porting verify --torch FILE.py:FACTORY | package.module:FACTORY | FILE.pt2 | FILE.ts``
or ``--onnx FILE.onnx``: the model is loaded and run with every value recorded
(``porting.verify.recording``) on the picture Caffe sees, converted to its input
convention (``porting.verify.convention``). Every format feeds the net's one input blob:
a net with several is refused.

Each Caffe value (a layer's output before any in-place layer, ``porting.verify.keys.Value``)
gets a counterpart among the recorded module outputs: given (``--map``) or found
(``auto_map``). The counterparts'
arrays, reshaped to Caffe's shape, and their gradients (the same objective seed, by
autograd; the input's gradient taken back to Caffe's input space through the conversion)
are keyed as the port's own arrays are, so ``verify_arrays`` judges them by the same
rounding-invariant rules. A Caffe value without a counterpart is missing from the
candidate: reported, not compared, not failed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from porting.errors import PortingError, shown
from porting.files import read_json
from porting.verify.convention import InputConvention
from porting.verify.keys import NetValues, Value, blob_key
from porting.verify.recording import OnnxModel, Output, load_module, run_hooked

LOOSE = 1e-2        # auto_map: values agree when max |a - b| <= LOOSE * max |Caffe's|
MAP_LIMIT = 1 << 20  # bytes of a --map file

# Caffe type -> torch module classes (names) and ONNX op types that usually implement it:
# auto_map's fallback when no output agrees in value (a buggy port still gets its counterpart).
TYPE_HINTS = {
    "Convolution": ("Conv2d", "Conv1d", "Conv3d", "Conv"), "Deconvolution": ("ConvTranspose2d", "ConvTranspose"),
    "Pooling": ("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "MaxPool", "AveragePool",
                "GlobalAveragePool", "GlobalMaxPool"),
    "ReLU": ("ReLU", "LeakyReLU", "Relu", "LeakyRelu"), "PReLU": ("PReLU", "PRelu"), "Sigmoid": ("Sigmoid",),
    "TanH": ("Tanh",), "LRN": ("LocalResponseNorm", "CrossMapLRN2d", "LRN"), "InnerProduct": ("Linear", "Gemm"),
    "Softmax": ("Softmax",), "Dropout": ("Dropout",),
    "BatchNorm": ("BatchNorm2d", "BatchNorm1d", "BatchNormalization"), "Flatten": ("Flatten",),
}


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
    data = read_json(path, MAP_LIMIT)
    if not isinstance(data, dict):
        raise PortingError("expected a JSON object: Caffe blob or layer name -> module path and output", path)
    return data


def given_map(values: NetValues, data: Mapping, outputs: list[Output], module: torch.nn.Module,
              path) -> list[Match]:
    """Resolve a read_map dict. A key is a Caffe layer name (its first output, before any
    in-place layer) or a blob name (its last value); any bad entry is a PortingError."""
    paths = {o.path for o in outputs}  # graph nodes of a .pt2, TorchScript or ONNX model
    if isinstance(module, torch.nn.Module):
        paths |= set(dict(module.named_modules()))
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
    onnx_model = isinstance(module, OnnxModel)  # no gradients: ONNX Runtime computes none
    if len(feeds) != 1:
        raise PortingError(f"{'--onnx' if onnx_model else '--torch'} feeds one input blob; the net has "
                           f"{len(feeds)} ({', '.join(feeds)})")
    name = feeds[0]
    dtype = module.dtype if onnx_model else next(
        (p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    grads = objective is not None and not onnx_model
    x64 = torch.as_tensor(np.asarray(inputs[name], np.float64)).requires_grad_(grads)
    with torch.set_grad_enabled(grads):
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
    if onnx_model:
        report["gradients"] = "not compared: ONNX Runtime computes no gradients"
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
    given, is what it loaded: an nn.Module, a ScriptModule or an OnnxModel), its input
    ``convention`` and the correspondence ``map_data`` (read_map; None: auto_map);
    ``name``: the candidate's name in the report (None: "onnx" for an ONNX model, else "torch")."""

    spec: str
    convention: InputConvention = InputConvention()
    map_data: dict | None = None
    map_path: object = None
    name: str | None = None
    module: object = None

    def verify(self, net, reference: Mapping, inputs: Mapping[str, np.ndarray], objective=None,
               tolerances=None, strict: bool = False):
        """Verify the module against Caffe's arrays ``reference`` as ``verify_port`` verifies
        the port: the port's float64 twin is the exact reading every layer is judged by.
        Returns (verification, the module's keyed arrays, the mapping report); the
        verification's ``diagnosis`` (porting.verify.diagnose) says which classic porting bug
        accounts for a departure, None when it passes."""
        from porting.verify.diagnose import diagnose
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
                                     names=("caffe", self.name or ("onnx" if isinstance(module, OnnxModel) else "torch")), inputs=inputs, strict=strict, foreign=True)
        # which classic porting bug accounts for a departure (None when it passes)
        verification.diagnosis = diagnose(verification, net64, reference, candidate, self.convention.caffe_mean,
                                          self.convention.kind)
        return verification, candidate, mapping
