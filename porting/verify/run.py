"""Running the port: the objective and inputs of a verification, and the port's arrays.

The port's arrays use the keys of ``porting.verify.keys``; float32, NCHW, in the net's
own units (for CaffeNet: BGR, 0-255 minus the mean). ``float64_twin`` gives the same net
with the same float32 weights and float64 arithmetic, the stand-in for exact arithmetic.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from porting.errors import PortingError
from porting.verify.keys import NetValues, blob_key, top_key

EXACT = "float64"  # the name of the float64 evaluation among the frameworks



@dataclass(frozen=True)
class Objective:
    """The unit whose gradient is compared: channel ``unit`` of ``layer``'s first top ``blob``.

    As the legacy worker's ``top_diffs`` does, the seed is the diff of the blob's final
    value (after any in-place layer, Caffe's own view) and the backward starts at the last
    layer writing that blob. For a 4-D blob the seed sits at the spatial centre
    (row H // 2, column W // 2), as MFV's conv-layer objective does.
    """

    layer: str
    unit: int
    blob: str

    def seed(self, shape) -> np.ndarray:
        """The one-hot diff (float32, ``shape`` = the top's shape incl. batch) to backpropagate."""
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2 or not 0 <= self.unit < shape[1]:
            raise PortingError(f"unit {self.unit} out of range for top {self.blob} of shape "
                               f"{'x'.join(map(str, shape))}", place=f"objective {self.layer}")
        seed = np.zeros(shape, np.float32)
        seed[(slice(None), self.unit) + tuple(d // 2 for d in shape[2:])] = 1
        return seed

    def __str__(self) -> str:
        return f"{self.layer}:{self.unit}"


def default_objective(graph) -> Objective:
    """The layer feeding the first Softmax, loss or Accuracy layer of LABEL_TAKERS
    (CaffeNet: fc8), unit 0; else the last layer."""
    writer = {}
    for spec in graph.layers:
        if (spec.type == "Softmax" or spec.type in LABEL_TAKERS) and spec.bottoms and spec.bottoms[0] in writer:
            layer = writer[spec.bottoms[0]]
            return Objective(layer.name, 0, layer.tops[0])
        for top in spec.tops:
            writer[top] = spec
    for spec in reversed(graph.layers):
        if spec.tops and not spec.is_input:
            return Objective(spec.name, 0, spec.tops[0])
    raise PortingError("the net has no layer to take an objective from")


def parse_objective(text: str | None, graph) -> Objective:
    """"LAYER:UNIT" or "LAYER" (unit 0); None gives ``default_objective``."""
    if text is None:
        return default_objective(graph)
    name, _, unit = str(text).rpartition(":") if ":" in str(text) else (str(text), "", "0")
    try:
        spec = graph.layer(name)
    except KeyError:
        raise PortingError(f"no layer named {name!r}", place="--objective") from None
    if not spec.tops:
        raise PortingError(f"layer {name!r} has no top", place="--objective")
    try:
        unit_no = int(unit)
    except ValueError:
        raise PortingError(f"unit must be an integer, got {unit!r}", place="--objective") from None
    objective = Objective(spec.name, unit_no, spec.tops[0])
    objective.seed(graph.blob_shapes[spec.tops[0]])  # range check
    return objective


# Layers whose second bottom is a class label along their first bottom's axis (the field
# holding that axis, default 1).
LABEL_TAKERS = {"SoftmaxWithLoss": "softmax_param", "Accuracy": "accuracy_param",
                "InfogainLoss": "infogain_loss_param", "MultinomialLogisticLoss": None}


def label_classes(graph, name: str) -> int | None:
    """How many classes an input blob labels: the smallest class count of the layers that
    read it as their label (LABEL_TAKERS; HingeLoss: the count per item) or as indices
    (Embed: input_dim; BatchReindex: the data's first dim); None when no layer does."""
    counts = []
    for spec in graph.layers:
        shape = graph.blob_shapes.get(spec.bottoms[0], ()) if spec.bottoms else ()
        second = len(spec.bottoms) > 1 and spec.bottoms[1] == name
        if spec.type in LABEL_TAKERS and second:
            field = LABEL_TAKERS[spec.type]
            axis = getattr(getattr(spec.param, field), "axis", 1) if field else 1
            if shape and -len(shape) <= axis < len(shape):
                counts.append(int(shape[axis]))
        elif spec.type in ("HingeLoss", "BatchReindex") and second and shape:
            counts.append(math.prod(shape[1:]) if spec.type == "HingeLoss" else int(shape[0]))
        elif spec.type == "Embed" and spec.bottoms and spec.bottoms[0] == name:
            counts.append(int(spec.param.embed_param.input_dim))
    return min(counts) if counts else None


def random_inputs(graph, batch: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the net's input shapes: uniform in [-128, 128), float32, NCHW.

    The range is that of mean-subtracted 8-bit pixels (what CaffeNet-style nets eat).
    A label (an input that a loss or Accuracy layer reads as its label, e.g. a Data
    layer's second top) gets class indices instead: integers uniform in [0, classes).
    ``batch`` replaces the first dimension.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in graph.inputs.items():
        shape = tuple(shape)
        if batch is not None:
            shape = (int(batch),) + shape[1:]
        classes = label_classes(graph, name)
        if classes:
            out[name] = rng.integers(0, classes, size=shape).astype(np.float32)
        else:
            out[name] = rng.uniform(-128, 128, size=shape).astype(np.float32)
    return out




def _net_dtype(net) -> torch.dtype:
    for p in net.parameters():
        return p.dtype
    return torch.float32


def port_arrays(net, inputs: Mapping[str, np.ndarray] | np.ndarray, objective: Objective | None = None,
                pin: Mapping[str, Mapping] | None = None) -> dict[str, np.ndarray]:
    """Run ``net`` forward and (with an objective) backward; return Caffe-keyed arrays.

    Inputs are cast to the net's dtype (``net.double()`` gives the float64 evaluation).
    The backward seeds ``objective.seed`` on the final value of the objective blob and
    collects, by autograd, the gradient with respect to every layer output up to there
    (``top/<layer>/<i>/diff``) and, for each blob name, with respect to its earliest value
    (``blob/<name>/diff``, as Caffe's in-place backward leaves it), inputs included.

    ``pin``: another framework's arrays; every layer's tops then take that framework's
    values (``top/<layer>/<i>/data``) while gradients flow through the port's own layers
    (``CaffeNet.forward(pin=)``), so the port's backward runs at that framework's forward
    point and follows its ReLU and max-pool decisions.
    """
    dtype = _net_dtype(net)
    if not isinstance(inputs, Mapping):
        inputs = {next(iter(net.graph.inputs)): inputs}
    tensors = {name: torch.as_tensor(np.asarray(value)).to(dtype).requires_grad_(objective is not None)
               for name, value in inputs.items()}
    out: dict[str, np.ndarray] = {}
    with torch.set_grad_enabled(objective is not None):
        blobs = net(**tensors, pin=_pins(net.graph, pin) if pin is not None else None)
        outputs = OrderedDict(net.layer_outputs)
    for name, tensor in blobs.items():
        out[blob_key(name, "data")] = _np(tensor)
    for layer, tops in outputs.items():
        for i, tensor in enumerate(tops):
            out[top_key(layer, i, "data")] = _np(tensor)
    if objective is None:
        return out

    values = NetValues(net.graph)
    if objective.blob not in values.last_value:
        raise PortingError(f"no blob named {objective.blob!r}", place="objective")
    final = values.last_value[objective.blob]
    stop = final.position
    target = outputs[final.layer][final.index]
    seed = torch.from_numpy(objective.seed(target.shape)).to(dtype)
    wrt: list[tuple[str, torch.Tensor]] = []
    first_value: dict[str, str] = {}
    for spec in net.graph.layers[: stop + 1]:
        for i, (top, tensor) in enumerate(zip(spec.tops, outputs[spec.name])):
            wrt.append((top_key(spec.name, i, "diff"), tensor))
            first_value.setdefault(top, top_key(spec.name, i, "diff"))
    differentiable = [(k, t) for k, t in wrt if t.requires_grad]
    grads = torch.autograd.grad(target, [t for _, t in differentiable], seed, allow_unused=True)
    diffs = {k: (_np(g) if g is not None else np.zeros(t.shape, _np_dtype(dtype)))
             for (k, t), g in zip(differentiable, grads)}
    for key, tensor in wrt:
        out[key] = diffs.get(key, np.zeros(tuple(tensor.shape), _np_dtype(dtype)))
    for name, key in first_value.items():
        out[blob_key(name, "diff")] = out[key]
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _np_dtype(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def _pins(graph, arrays: Mapping) -> dict[str, list[np.ndarray]]:
    """Layer name -> its tops' values in ``arrays`` (layers whose tops are all there, Input excluded)."""
    values = NetValues(graph)
    out = {}
    for spec in graph.layers:
        if spec.is_input:
            continue
        tops = [values.read(arrays, v, "data") for v in values.by_layer[spec.name]]
        if tops and all(t is not None for t in tops):
            out[spec.name] = tops
    return out


def float64_twin(net):
    """A float64 copy of ``net`` (the same float32 weights, wider arithmetic).

    Parameters and buffers are converted one by one rather than by ``Module.double()``, so
    a layer that happens to define a method of the same name as a Module internal cannot
    stand in the way.
    """
    kept = net.layer_outputs
    net.layer_outputs = OrderedDict()  # tensors of the last run: not copyable, not needed
    try:
        twin = copy.deepcopy(net)
    finally:
        net.layer_outputs = kept
    with torch.no_grad():
        for p in twin.parameters():
            if p.is_floating_point():
                p.data = p.data.double()
        for m in twin.modules():
            for name, buf in list(m._buffers.items()):
                if buf is not None and buf.is_floating_point():
                    m._buffers[name] = buf.double()
    return twin
