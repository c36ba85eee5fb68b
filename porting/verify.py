"""Compare a port with real Caffe blob by blob, and say who is right where they differ.

Every evaluation (Caffe through the legacy worker, the PyTorch port, its float64 twin, an
ONNX export) is a flat dict of NumPy arrays under the same keys:

* ``blob/<name>/data`` and ``blob/<name>/diff``: Caffe's own view of a blob after the
  forward and the backward pass. An in-place layer overwrites the data; after backward
  the diff is the gradient with respect to the *earliest* value of that name (an in-place
  layer's backward rewrites the diff of its bottom, which is the same memory).
* ``top/<layer>/<i>/data`` and ``top/<layer>/<i>/diff``: the i-th output of one layer, as
  that layer produced it (before any in-place layer overwrote it), and the gradient of
  the objective with respect to that output.

Arrays are float32 (float64 for the exact evaluation), NCHW, in the net's own units. The
backward pass seeds ``objective.seed(shape)`` (one-hot on the objective unit, for every
image of the batch; at the spatial centre for a 4-D blob, as MFV does) as the diff of the
objective blob's final value and runs the backward from the last layer writing that blob
down, as the legacy worker's ``run_net(top_diffs={blob: seed})`` does; layers after it
get no diff.

Metrics of one blob (candidate ``t`` against reference ``r``): max |t - r|; that divided
by max |r| (the relative error every tolerance bounds); ||t - r||_2 / ||r||_2; the
fraction of elements with |t - r| > tolerance * max |r|; and for classifier outputs the
top-1 / top-5 agreement over the batch.

Attribution: a float64 evaluation of the port (weights and inputs are the same float32
numbers, only the arithmetic is wider) stands for exact arithmetic. For each blob and
framework the report gives the error against it, and which framework is closer. The
point of departure is found layer by layer: each framework's output of a layer is
compared with the float64 layer applied to *that framework's own inputs*, which removes
everything inherited from earlier layers; what remains is the error this layer added.
It is "within float32 rounding" when no element exceeds the a-priori rounding bound of
the layer (``porting.tolerances.forward_bound`` / ``backward_bound``: gamma_n dot-product
bounds and their kin, computed element by element from the same inputs). The first layer,
forward then backward, where some framework exceeds its bound is the point of departure.
When no layer exceeds its bound yet the outputs differ, the differences are float32
rounding amplified by the net (for example a max-pooling window whose winner changes):
the report says so and counts such flipped decisions. The float64 side is the port's own
semantics: Caffe beyond its bound where the port is not points at a semantic difference
of the port, and the statement says so.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from porting.errors import PortingError
from porting.tolerances import U, Tolerances, backward_bound, forward_bound, gamma, magnitude_twin

EXACT = "float64"


# --------------------------------------------------------------------------------------
# Objective and inputs
# --------------------------------------------------------------------------------------

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
    """The layer feeding the first Softmax (CaffeNet: fc8), unit 0; else the last layer."""
    writer = {}
    for spec in graph.layers:
        if spec.type == "Softmax" and spec.bottoms and spec.bottoms[0] in writer:
            layer = writer[spec.bottoms[0]]
            return Objective(layer.name, 0, layer.tops[0])
        for top in spec.tops:
            writer[top] = spec
    for spec in reversed(graph.layers):
        if spec.tops and spec.type != "Input":
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


def random_inputs(graph, batch: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the net's input shapes: uniform in [-128, 128), float32, NCHW.

    The range is that of mean-subtracted 8-bit pixels (what CaffeNet-style nets eat).
    ``batch`` replaces the first dimension.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in graph.inputs.items():
        shape = tuple(shape)
        if batch is not None:
            shape = (int(batch),) + shape[1:]
        out[name] = rng.uniform(-128, 128, size=shape).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------
# The port, as the same flat dict of arrays
# --------------------------------------------------------------------------------------

def _net_dtype(net) -> torch.dtype:
    for p in net.parameters():
        return p.dtype
    return torch.float32


def port_arrays(net, inputs: Mapping[str, np.ndarray] | np.ndarray, objective: Objective | None = None,
                ) -> dict[str, np.ndarray]:
    """Run ``net`` forward and (with an objective) backward; return Caffe-keyed arrays.

    Inputs are cast to the net's dtype (``net.double()`` gives the float64 evaluation).
    The backward seeds ``objective.seed`` on the final value of the objective blob and
    collects, by autograd, the gradient with respect to every layer output up to there
    (``top/<layer>/<i>/diff``) and, for each blob name, with respect to its earliest value
    (``blob/<name>/diff``, as Caffe's in-place backward leaves it), inputs included.
    """
    dtype = _net_dtype(net)
    if not isinstance(inputs, Mapping):
        inputs = {next(iter(net.graph.inputs)): inputs}
    tensors = {name: torch.as_tensor(np.asarray(value)).to(dtype).requires_grad_(objective is not None)
               for name, value in inputs.items()}
    out: dict[str, np.ndarray] = {}
    with torch.set_grad_enabled(objective is not None):
        blobs = net(**tensors)
        outputs = OrderedDict(net.layer_outputs)
    for name, tensor in blobs.items():
        out[f"blob/{name}/data"] = _np(tensor)
    for layer, tops in outputs.items():
        for i, tensor in enumerate(tops):
            out[f"top/{layer}/{i}/data"] = _np(tensor)
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
            wrt.append((f"top/{spec.name}/{i}/diff", tensor))
            first_value.setdefault(top, f"top/{spec.name}/{i}/diff")
    differentiable = [(k, t) for k, t in wrt if t.requires_grad]
    grads = torch.autograd.grad(target, [t for _, t in differentiable], seed, allow_unused=True)
    diffs = {k: (_np(g) if g is not None else np.zeros(t.shape, _np_dtype(dtype)))
             for (k, t), g in zip(differentiable, grads)}
    for key, tensor in wrt:
        out[key] = diffs.get(key, np.zeros(tuple(tensor.shape), _np_dtype(dtype)))
    for name, key in first_value.items():
        out[f"blob/{name}/diff"] = out[key]
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _np_dtype(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

@dataclass
class BlobMetrics:
    """Candidate vs reference over one blob; relative values are over max |reference|."""

    max_abs: float
    max_rel: float
    rel_l2: float
    frac_beyond: float
    ref_max: float
    size: int
    top1: float | None = None
    top5: float | None = None


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def blob_metrics(test, ref, tolerance: float = 0.0, classes: bool = False) -> BlobMetrics:
    """Metrics of ``test`` against ``ref`` (same shape; computed in float64).

    ``frac_beyond`` counts elements with |test - ref| > tolerance * max |ref|. With
    ``classes`` (a classifier output, N x C), top-1 agreement is the fraction of items whose
    arg-max agrees, top-5 agreement the mean overlap of the two top-5 sets (1 = same five).
    NaN anywhere makes every error NaN.
    """
    t = np.asarray(test, np.float64)
    r = np.asarray(ref, np.float64)
    if t.shape != r.shape:
        raise ValueError(f"shape mismatch: {t.shape} vs {r.shape}")
    if t.size == 0:
        return BlobMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0)
    diff = np.abs(t - r)
    if np.isnan(diff).any():
        nan = float("nan")
        return BlobMetrics(nan, nan, nan, nan, float(np.nanmax(np.abs(r))) if not np.isnan(r).all() else nan, t.size)
    ref_max = float(np.abs(r).max())
    max_abs = float(diff.max())
    metrics = BlobMetrics(
        max_abs=max_abs,
        max_rel=_ratio(max_abs, ref_max),
        rel_l2=_ratio(float(np.sqrt((diff ** 2).sum())), float(np.sqrt((r ** 2).sum()))),
        frac_beyond=float((diff > tolerance * ref_max).mean()),
        ref_max=ref_max, size=int(t.size))
    if classes:
        flat_t, flat_r = t.reshape(t.shape[0], -1), r.reshape(r.shape[0], -1)
        metrics.top1 = topk_agreement(flat_t, flat_r, 1)
        metrics.top5 = topk_agreement(flat_t, flat_r, 5) if flat_r.shape[1] >= 5 else None
    return metrics


def topk_agreement(test, ref, k: int) -> float:
    """Mean over items (rows) of |top-k(test) & top-k(ref)| / k; for k=1 the arg-max agreement."""
    test, ref = np.asarray(test), np.asarray(ref)
    k = min(k, ref.shape[1])
    a = np.argsort(-test, axis=1, kind="stable")[:, :k]
    b = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def top_classes(probs, k: int = 5) -> list[list[tuple[int, float]]]:
    """Per item: the k best (class index, value) pairs, best first."""
    p = np.asarray(probs, np.float64).reshape(np.asarray(probs).shape[0], -1)
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return [[(int(c), float(row[c])) for c in idx] for row, idx in zip(p, order)]


# --------------------------------------------------------------------------------------
# Graph bookkeeping: which layer output is which blob
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Value:
    """One layer output (pre-in-place): ``layer``'s top number ``index``, named ``blob``."""

    layer: str
    index: int
    blob: str
    position: int       # index of the layer in the net
    first: bool         # the first value of this blob name (its diff is blob/<name>/diff)
    last: bool          # the last value of this blob name (its data is blob/<name>/data)

    def key(self, kind: str) -> str:
        return f"top/{self.layer}/{self.index}/{kind}"


class NetValues:
    """Values of a graph, the value each layer's bottoms read, and who reads each value."""

    def __init__(self, graph):
        self.graph = graph
        self.specs = list(graph.layers)
        self.position = {s.name: i for i, s in enumerate(self.specs)}
        writers: dict[str, list[tuple[int, int]]] = {}
        for pos, spec in enumerate(self.specs):
            for i, top in enumerate(spec.tops):
                writers.setdefault(top, []).append((pos, i))
        self.values: list[Value] = []
        self.by_layer: dict[str, list[Value]] = {}
        for pos, spec in enumerate(self.specs):
            vals = []
            for i, top in enumerate(spec.tops):
                w = writers[top]
                vals.append(Value(spec.name, i, top, pos, w[0] == (pos, i), w[-1] == (pos, i)))
            self.by_layer[spec.name] = vals
            self.values.extend(vals)
        current: dict[str, Value] = {}
        self.bottoms: dict[str, list[Value | None]] = {}
        self.readers: dict[Value, list[tuple[str, int]]] = {v: [] for v in self.values}
        for spec in self.specs:
            self.bottoms[spec.name] = [current.get(b) for b in spec.bottoms]
            for slot, v in enumerate(self.bottoms[spec.name]):
                if v is not None:
                    self.readers[v].append((spec.name, slot))
            for v in self.by_layer[spec.name]:
                current[v.blob] = v
        self.first_value = {}
        self.last_value = {}
        for v in self.values:
            self.first_value.setdefault(v.blob, v)
            self.last_value[v.blob] = v

    def read(self, arrays: Mapping, value: Value, kind: str):
        """The array of ``value`` from ``arrays``, falling back on the blob view where it is the same."""
        key = value.key(kind)
        if key in arrays:
            return arrays[key]
        if (kind == "data" and value.last) or (kind == "diff" and value.first):
            return arrays.get(f"blob/{value.blob}/{kind}")
        return None

    def value_of_key(self, key: str) -> Value | None:
        """The value a key shows: top keys name it; blob data = last value, blob diff = first."""
        # layer and blob names may hold "/" themselves (GoogLeNet's "inception_3a/1x1")
        if key.startswith("top/") and key.count("/") >= 3:
            layer, index, _ = key[4:].rsplit("/", 2)
            for v in self.by_layer.get(layer, []):
                if str(v.index) == index:
                    return v
            return None
        if key.startswith("blob/") and key.count("/") >= 2:
            blob, kind = key[5:].rsplit("/", 1)
            return (self.last_value if kind == "data" else self.first_value).get(blob)
        return None


# --------------------------------------------------------------------------------------
# Per-blob comparison rows
# --------------------------------------------------------------------------------------

@dataclass
class Row:
    """One compared array (stable ``key``), candidate vs reference plus float64 attribution."""

    key: str
    view: str                 # "top" (a layer's own output) or "blob" (Caffe's blob view)
    kind: str                 # "data" or "diff"
    layer: str                # the layer that produced the value shown
    layer_type: str
    blob: str
    index: int
    position: int             # layer position in the net (depth)
    shape: list[int]
    tolerance: float
    metrics: BlobMetrics | None
    passed: bool
    overwritten_by: str = ""  # a later in-place layer that overwrites this value ("" if none)
    others: dict[str, dict] = field(default_factory=dict)     # other candidates vs reference
    vs_float64: dict[str, dict] = field(default_factory=dict)  # framework -> {max_rel, rel_l2}
    closer: str = ""          # framework closest to float64 ("" when not attributed)
    problem: str = ""         # why it could not be compared (shape mismatch, ...)


def _is_classifier(values: NetValues, value: Value, shape, objective: Objective | None) -> bool:
    squeezed = [d for d in shape[1:] if d != 1]
    if len(shape) < 2 or len(squeezed) != 1 or squeezed[0] < 5:
        return False
    spec = values.specs[value.position]
    consumed_later = bool(values.readers.get(value)) or not value.last
    return spec.type == "Softmax" or (objective is not None and value.blob == objective.blob) \
        or not consumed_later


def compare_rows(values: NetValues, reference: Mapping, candidate: Mapping, tolerances: Tolerances,
                 objective: Objective | None = None, others: Mapping[str, Mapping] | None = None,
                 exact: Mapping | None = None, names: tuple[str, str] = ("caffe", "port")) -> list[Row]:
    """One Row per key the candidate has (and the reference too), in net order.

    ``others`` are further candidates (e.g. ONNX) compared against the same reference;
    ``exact`` is the float64 evaluation: each framework's error against it goes into
    ``vs_float64`` and the closest framework into ``closer``.
    """
    others = dict(others or {})
    rows = []
    for key in candidate:
        if key not in reference:
            continue
        value = values.value_of_key(key)
        if value is None:
            continue
        view, kind = key.split("/")[0], key.rsplit("/", 1)[1]
        spec = values.specs[value.position]
        tol = tolerances.for_layer(spec.type, kind)
        ref, cand = np.asarray(reference[key]), np.asarray(candidate[key])
        overwritten = "" if value.last else next(
            (v.layer for v in values.values if v.blob == value.blob and v.position > value.position), "")
        row = Row(key, view, kind, value.layer, spec.type, value.blob, value.index, value.position,
                  list(ref.shape), tol, None, False, overwritten if view == "top" else "")
        if ref.shape != cand.shape:
            row.problem = f"shape {tuple(cand.shape)} vs {tuple(ref.shape)}"
            rows.append(row)
            continue
        classes = kind == "data" and _is_classifier(values, value, ref.shape, objective)
        row.metrics = blob_metrics(cand, ref, tol, classes)
        row.passed = bool(row.metrics.max_rel <= tol)
        for name, arrays in others.items():
            if key in arrays and np.shape(arrays[key]) == ref.shape:
                m = blob_metrics(arrays[key], ref, tol, classes)
                row.others[name] = {"max_rel": m.max_rel, "rel_l2": m.rel_l2, "max_abs": m.max_abs,
                                    "top1": m.top1, "top5": m.top5}
        if exact is not None and key in exact:
            ex = np.asarray(exact[key])
            for name, arrays in [(names[0], reference), (names[1], candidate), *others.items()]:
                if key in arrays and np.shape(arrays[key]) == ex.shape:
                    m = blob_metrics(arrays[key], ex)
                    row.vs_float64[name] = {"max_rel": m.max_rel, "rel_l2": m.rel_l2}
            row.closer = closest(row.vs_float64)
        rows.append(row)
    order = {"data": 0, "diff": 1}
    rows.sort(key=lambda r: (order[r.kind], r.position if r.kind == "data" else -r.position,
                             r.index, r.view != "top"))
    return rows


def closest(errors: Mapping[str, Mapping]) -> str:
    """The framework with the smallest max_rel against float64; "all exact" when none
    exceeds float32's unit roundoff u = 2**-24 (nothing to tell apart); "tie" on equality."""
    finite = {k: v["max_rel"] for k, v in errors.items() if v["max_rel"] == v["max_rel"]}
    if not finite:
        return ""
    if max(finite.values()) <= U:
        return "all within u"
    best = min(finite.values())
    winners = [k for k, v in finite.items() if v == best]
    return winners[0] if len(winners) == 1 else "tie"


# --------------------------------------------------------------------------------------
# Local checks: the error each layer adds, against its float32 rounding bound
# --------------------------------------------------------------------------------------

@dataclass
class LocalCheck:
    """What one layer added to one framework's error, against float32's bound.

    ``error_ratio`` = max over elements of |error| / bound (<= 1: within float32 rounding;
    inf: an exact operation that was not exact); None when the type has no bound rule.
    ``local_rel`` = max |error| / max |float64 value|; ``band`` = max bound / max |float64 value|.
    For the backward, ``key`` is the diff of the value the layer(s) in ``layer`` wrote into.
    """

    framework: str
    direction: str            # "forward" or "backward"
    layer: str                # the layer whose arithmetic is judged (comma-separated if several)
    layer_type: str
    params: str
    key: str
    position: int
    error_ratio: float | None
    local_rel: float
    band: float | None
    n_beyond: int = 0
    note: str = ""

    @property
    def within(self) -> bool | None:
        return None if self.error_ratio is None else bool(self.error_ratio <= 1.0)


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float64))


def _ratio_stats(err: torch.Tensor, bound: torch.Tensor | None, scale: float):
    max_err = float(err.max()) if err.numel() else 0.0
    local_rel = _ratio(max_err, scale)
    if bound is None:
        return None, local_rel, None, 0
    beyond = err > bound
    if err.numel() == 0:
        return 0.0, local_rel, 0.0, 0
    r = torch.where(bound > 0, err / bound.clamp_min(1e-300), torch.where(err > 0, math.inf, 0.0))
    return float(r.max()), local_rel, _ratio(float(bound.max()), scale), int(beyond.sum())


def _params(spec) -> str:
    module = getattr(spec, "module", None)
    try:
        return module.describe() if module is not None else ""
    except Exception:  # describe() is for display only
        return ""


def local_checks(net64, arrays: Mapping[str, Mapping], objective: Objective | None = None,
                 exact: Mapping | None = None) -> list[LocalCheck]:
    """Local forward and backward checks of every framework in ``arrays`` (name -> arrays).

    ``net64`` is the port in float64 (``float64_twin(net)``); its layers applied to a
    framework's own bottoms give the exact output that framework should have produced.
    ``exact`` (the float64 run) adds decision counts to the notes: max-pooling windows whose
    winner differs from float64's and ReLU inputs whose sign does. Layers are visited once
    each (all frameworks at a time), so a layer's |weights| copy is made once.
    """
    values = NetValues(net64.graph)
    stop = None
    if objective is not None and objective.blob in values.last_value:
        stop = values.last_value[objective.blob].position
    forward: dict[str, list[LocalCheck]] = {name: [] for name in arrays}
    contrib: dict[str, dict[Value, list]] = {name: {} for name in arrays}
    for spec in values.specs:
        if spec.type == "Input" or spec.module is None:
            continue
        with magnitude_twin(spec.module) as abs_module:
            for name, arr in arrays.items():
                _layer_checks(spec, abs_module, values, name, arr, stop, exact, forward[name], contrib[name])
    checks: list[LocalCheck] = []
    for name, arr in arrays.items():
        checks.extend(forward[name])
        checks.extend(_backward_checks(values, name, arr, objective, stop, contrib[name]))
    return checks


def _layer_checks(spec, abs_module, values: NetValues, name: str, arr: Mapping, stop, exact,
                  forward: list, contrib: dict) -> None:
    """One layer, one framework: append its forward check, collect its backward contributions."""
    bottom_vals = values.bottoms[spec.name]
    bottoms = [None if v is None else values.read(arr, v, "data") for v in bottom_vals]
    tops = [values.read(arr, v, "data") for v in values.by_layer[spec.name]]
    if any(b is None for b in bottoms):
        return
    module = spec.module
    xs = [_t(b) for b in bottoms]
    wants_backward = stop is not None and values.position[spec.name] <= stop
    top_diffs = [values.read(arr, v, "diff") for v in values.by_layer[spec.name]] if wants_backward else []
    wants_backward = wants_backward and bool(top_diffs) and top_diffs[0] is not None
    leaves = [x.clone().requires_grad_(wants_backward) for x in xs]
    with torch.set_grad_enabled(wants_backward):
        exact_tops = module(*leaves)
    exact_det = [y.detach() for y in exact_tops]
    have_tops = bool(tops) and all(t is not None for t in tops)
    if have_tops:
        with torch.no_grad():
            bounds = forward_bound(spec, module, xs, exact_det, abs_module)
        worst = None
        for i, (top, y) in enumerate(zip(tops, exact_det)):
            if tuple(np.shape(top)) != tuple(y.shape):
                continue
            err = (_t(top) - y).abs()
            scale = float(y.abs().max()) if y.numel() else 0.0
            ratio, rel, band, n = _ratio_stats(err, None if bounds is None else bounds[i], scale)
            check = LocalCheck(name, "forward", spec.name, spec.type, _params(spec),
                               values.by_layer[spec.name][i].key("data"), values.position[spec.name],
                               ratio, rel, band, n)
            if worst is None or _worse(check, worst):
                worst = check
        if worst is not None:
            worst.note = _decision_note(spec, values, arr, exact, bottom_vals)
            forward.append(worst)
    if not wants_backward:
        return
    g = [None if d is None else _t(d) for d in top_diffs]
    pairs = [(y, d) for y, d in zip(exact_tops, g) if d is not None and y.requires_grad]
    if not pairs:
        return
    grads = torch.autograd.grad([y for y, _ in pairs], leaves, [d for _, d in pairs], allow_unused=True)
    stored = [_t(t) for t in tops] if have_tops else exact_det
    bounds = backward_bound(spec, module, xs, stored, exact_det, g, abs_module)
    for slot, (v, grad) in enumerate(zip(bottom_vals, grads)):
        if v is None or grad is None:
            continue
        contrib.setdefault(v, []).append((spec, grad.detach(), None if bounds is None else bounds[slot]))


def _worse(a: LocalCheck, b: LocalCheck) -> bool:
    ra = -1 if a.error_ratio is None else a.error_ratio
    rb = -1 if b.error_ratio is None else b.error_ratio
    return (ra, a.local_rel) > (rb, b.local_rel)


def _backward_checks(values: NetValues, name, arr, objective, stop, contrib) -> list[LocalCheck]:
    checks = []
    if stop is None:
        return checks
    for v in reversed(values.values):
        if v.position > stop:
            continue
        diff = values.read(arr, v, "diff")
        if diff is None:
            continue
        parts = contrib.get(v, [])
        is_target = objective is not None and values.last_value.get(objective.blob) == v
        if not parts and not is_target:
            continue
        exact = torch.zeros(np.shape(diff), dtype=torch.float64)
        bound = torch.zeros_like(exact)
        judged = True
        if is_target:
            exact = exact + _t(objective.seed(np.shape(diff)))
        for _, grad, b in parts:
            exact = exact + grad
            if b is None:
                judged = False
            else:
                bound = bound + b
        if len(parts) > 1:  # the sum of the readers' diffs (Caffe's Split backward)
            bound = bound + gamma(len(parts) - 1) * sum(g.abs() for _, g, _ in parts)
        err = (_t(diff) - exact).abs()
        scale = float(exact.abs().max()) if exact.numel() else 0.0
        ratio, rel, band, n = _ratio_stats(err, bound if judged else None, scale)
        specs = [s for s, _, _ in parts]
        layer = ", ".join(s.name for s in specs) or v.layer
        types = ", ".join(dict.fromkeys(s.type for s in specs)) or values.specs[v.position].type
        params = "; ".join(p for p in (_params(s) for s in specs) if p)
        pos = max((values.position[s.name] for s in specs), default=v.position)
        checks.append(LocalCheck(name, "backward", layer, types, params, v.key("diff"), pos,
                                 ratio, rel, band, n))
    return checks


def _decision_note(spec, values: NetValues, arr, exact, bottom_vals) -> str:
    """Discrete decisions that differ from float64's: max-pool winners, ReLU signs."""
    if exact is None or not bottom_vals or bottom_vals[0] is None:
        return ""
    mine = values.read(arr, bottom_vals[0], "data")
    theirs = values.read(exact, bottom_vals[0], "data")
    if mine is None or theirs is None or np.shape(mine) != np.shape(theirs):
        return ""
    if spec.type == "ReLU":
        flips = int(((np.asarray(mine) > 0) != (np.asarray(theirs) > 0)).sum())
        return f"{flips} of {np.size(mine)} ReLU inputs differ in sign from float64" if flips else ""
    if spec.type == "Pooling" and spec.param.pooling_param.pool == 0:
        flips, total = _pool_winner_flips(spec, _t(mine), _t(theirs))
        if flips is None:
            return ""
        return f"{flips} of {total} max-pooling windows pick another winner than float64" if flips else ""
    return ""


def _pool_winner_flips(spec, a: torch.Tensor, b: torch.Tensor):
    """(windows whose max-pooling winner differs between inputs ``a`` and ``b``, windows).

    The winner of each window is read through the layer itself: the Jacobian of max
    pooling picks one input element per window, so J @ (flat index + 1) is the winner's
    index (J @ labels via two reverse passes). None when the layer cannot be differentiated twice.
    """
    def winners(x: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            y = spec.module(x)[0]
            v = torch.zeros_like(y, requires_grad=True)
            (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
            labels = torch.arange(1, x.numel() + 1, dtype=x.dtype).reshape(x.shape)
            (picked,) = torch.autograd.grad(gx, v, labels)
        return picked

    try:
        wa, wb = winners(a), winners(b)
    except Exception:  # a diagnostic only: a layer without double backward gets no count
        return None, 0
    return int((wa != wb).sum()), int(wa.numel())


# --------------------------------------------------------------------------------------
# The whole verification
# --------------------------------------------------------------------------------------

@dataclass
class Departure:
    """The first place where a framework's own arithmetic leaves float32 rounding."""

    frameworks: list[str]        # the framework(s) beyond their bound there
    within: list[str]            # the framework(s) within their bound everywhere up to there
    direction: str
    layer: str
    layer_type: str
    params: str
    key: str
    error_ratio: float
    local_rel: float
    band: float | None
    statement: str


@dataclass
class Verification:
    reference: str
    candidate: str
    objective: Objective | None
    tolerances: Tolerances
    rows: list[Row]
    checks: list[LocalCheck]
    departure: Departure | None
    verdict: str                      # a paragraph for people
    passed: bool
    missing_in_reference: list[str] = field(default_factory=list)
    not_in_candidate: list[str] = field(default_factory=list)
    frameworks: list[str] = field(default_factory=list)
    other_departures: list[Departure] = field(default_factory=list)  # of the third opinions (ONNX)

    @property
    def failed_rows(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]


def find_departure(checks: list[LocalCheck], frameworks: list[str], reference: str | None = None
                   ) -> Departure | None:
    """The first check, forward in net order then backward from the objective down, that
    some framework fails (error beyond its float32 bound). When the ``reference`` (Caffe)
    is the one beyond, the statement says what that most likely means: float64 is the
    port's own reading of the layer, so the port computes another function there."""
    def order(c: LocalCheck):
        return (0, c.position) if c.direction == "forward" else (1, -c.position)

    failing = sorted((c for c in checks if c.within is False), key=order)
    if not failing:
        return None
    first = failing[0]
    here = [c for c in failing if order(c) == order(first)]
    bad = list(dict.fromkeys(c.framework for c in here))
    up_to = [c for c in checks if order(c) <= order(first)]
    within = [f for f in frameworks if f not in bad and f != EXACT
              and all(c.within is not False for c in up_to if c.framework == f)
              and any(c.framework == f for c in up_to)]
    worst = max(here, key=lambda c: c.error_ratio)
    what = "forward output" if first.direction == "forward" else "gradient"
    state = (f"{' and '.join(within)} {'stays' if len(within) == 1 else 'stay'} within float32 rounding of "
             f"float64 at every layer up to this point. " if within else "")
    statement = (f"{', '.join(bad)} {'departs' if len(bad) == 1 else 'depart'} from float64 at the "
                 f"{first.direction} of layer {worst.layer} ({worst.layer_type}"
                 f"{': ' + worst.params if worst.params else ''}): the {what} {worst.key} carries an error "
                 f"{_fmt_ratio(worst.error_ratio)} the worst-case float32 rounding bound of that layer "
                 f"(local error {worst.local_rel:.2g} of the largest element, bound "
                 f"{'n/a' if worst.band is None else format(worst.band, '.2g')}). {state}"
                 f"Every blob computed from {worst.key} on inherits this error.")
    if reference is not None and reference in bad:
        statement += (f" The float64 evaluation is the port's own reading of this layer, so {reference} "
                      f"departing from it most likely means the port implements {worst.layer} "
                      f"differently from {reference} (a semantic difference), not that {reference}'s "
                      f"arithmetic is wrong.")
    return Departure(bad, within, first.direction, worst.layer, worst.layer_type, worst.params, worst.key,
                     worst.error_ratio, worst.local_rel, worst.band, statement)


def _fmt_ratio(r: float) -> str:
    return "where the operation should be exact, i.e. infinitely beyond" if math.isinf(r) else f"{r:.3g} times"


def verify_arrays(graph_or_net64, reference: Mapping, candidate: Mapping, tolerances: Tolerances | None = None,
                  objective: Objective | None = None, exact: Mapping | None = None,
                  others: Mapping[str, Mapping] | None = None, names: tuple[str, str] = ("caffe", "port"),
                  ) -> Verification:
    """Compare ``candidate`` with ``reference`` (Caffe-keyed arrays) and attribute the differences.

    ``graph_or_net64``: the port in float64 (enables local checks and the point of
    departure) or just its Graph (metrics and float64 comparison only). ``exact`` is
    ``port_arrays(net64, inputs, objective)``; ``others`` more candidates (name -> arrays).
    """
    tolerances = tolerances or Tolerances()
    net64 = graph_or_net64 if hasattr(graph_or_net64, "graph") else None
    if net64 is not None and _net_dtype(net64) != torch.float64 and any(True for _ in net64.parameters()):
        net64 = float64_twin(net64)  # handed the float32 port: the exact side must be float64
    graph = net64.graph if net64 is not None else graph_or_net64
    values = NetValues(graph)
    rows = compare_rows(values, reference, candidate, tolerances, objective, others, exact, names)
    frameworks = [names[0], names[1], *(others or {})]
    checks: list[LocalCheck] = []
    departure = None
    other_departures: list[Departure] = []
    if net64 is not None:
        arrays = {names[0]: reference, names[1]: candidate, **(others or {})}
        checks = local_checks(net64, arrays, objective, exact)
        departure = find_departure([c for c in checks if c.framework in names], list(names), names[0])
        for name in others or {}:
            found = find_departure([c for c in checks if c.framework == name], [name])
            if found is not None:
                other_departures.append(found)
    missing_in_reference = sorted(k for k in candidate if k not in reference)
    not_in_candidate = sorted(k for k in reference if k not in candidate)
    passed = bool(rows) and all(r.passed for r in rows) and not [
        k for k in missing_in_reference if k.endswith("/data")]
    main_checks = [c for c in checks if c.framework in names]
    verdict = explain(rows, main_checks, departure, names, passed, list(names))
    for other in other_departures:
        verdict += (f" Third opinion: {other.statement} This is a fault of the {', '.join(other.frameworks)} "
                    f"path (export or evaluator), not of {names[0]} or {names[1]}.")
    return Verification(names[0], names[1], objective, tolerances, rows, checks, departure, verdict, passed,
                        missing_in_reference, not_in_candidate, frameworks, other_departures)


def first_beyond_tolerance(rows: list[Row], framework: str) -> Row | None:
    """The first row (forward in net order, then backward from the objective down) where
    ``framework``'s error against float64 exceeds the row's tolerance."""
    for row in rows:
        err = row.vs_float64.get(framework, {}).get("max_rel")
        if err is not None and not err <= row.tolerance:
            return row
    return None


def explain(rows: list[Row], checks: list[LocalCheck], departure: Departure | None,
            names: tuple[str, str], passed: bool, frameworks: list[str]) -> str:
    """A short paragraph: pass or fail, where it departs, who is right, why."""
    compared = [r for r in rows if r.metrics is not None]
    if not compared:
        return "Nothing was compared: the two sides share no blob keys."
    worst = max(compared, key=lambda r: (r.metrics.max_rel if r.metrics.max_rel == r.metrics.max_rel
                                         else math.inf))
    failed = [r for r in rows if not r.passed]
    parts = []
    if not failed:
        parts.append(f"All {len(rows)} compared arrays are within tolerance; the largest relative "
                     f"difference is {worst.metrics.max_rel:.2g} at {worst.key}.")
        if not passed:
            parts.append(f"It fails all the same: forward arrays of {names[1]} are missing from the "
                         f"{names[0]} run (see the list of missing arrays).")
    else:
        first = failed[0]
        parts.append(f"{len(failed)} of {len(rows)} compared arrays exceed their tolerance, the first at "
                     f"{first.key}; the largest relative difference is {worst.metrics.max_rel:.3g} at "
                     f"{worst.key} (tolerance {worst.tolerance:g}).")
    if worst.vs_float64:
        errs = ", ".join(f"{k} {v['max_rel']:.2g}" for k, v in worst.vs_float64.items())
        parts.append(f"There, against float64: {errs}; closest: {worst.closer or 'n/a'}.")
    if departure is not None:
        parts.append(departure.statement)
        return " ".join(parts)
    if not checks:
        return " ".join(parts)
    judged = [c for c in checks if c.within is not None]
    unjudged = sorted({c.layer_type for c in checks if c.within is None})
    parts.append(f"No layer adds more than float32 rounding can explain in any framework "
                 f"({len(judged)} local checks" + (f"; no rule for {', '.join(unjudged)}" if unjudged else "")
                 + ").")
    if passed:
        return " ".join(parts)
    for name in frameworks:
        row = first_beyond_tolerance(rows, name)
        if row is None:
            parts.append(f"{name} stays within tolerance of float64 everywhere.")
            continue
        notes = [f"{c.layer}: {c.note}" for c in checks if c.framework == name and c.note]
        parts.append(f"{name}'s own error against float64 first exceeds the tolerance at {row.key} "
                     f"({row.vs_float64[name]['max_rel']:.2g})"
                     + (f"; its discrete decisions that differ from float64: {'; '.join(notes[:4])}." if notes
                        else "."))
    parts.append("Neither framework computes wrongly: float32 rounding moved a value across a ReLU kink "
                 "or a max-pooling tie, and the net amplified it (an ill-conditioned blob for these "
                 "inputs and weights). Other inputs or weights, or a looser tolerance on these arrays, "
                 "are the remedy; the port is not at fault.")
    return " ".join(parts)


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


def verify_port(net, reference: Mapping, inputs: Mapping[str, np.ndarray], objective: Objective | None = None,
                tolerances: Tolerances | None = None, others: Mapping[str, Mapping] | None = None,
                names: tuple[str, str] = ("caffe", "port")) -> tuple[Verification, dict[str, dict]]:
    """Run the port in float32 and float64 on ``inputs`` and verify it against ``reference``.

    ``reference`` is the legacy worker's result for the same inputs and, with an
    objective, ``top_diffs={objective.blob: objective.seed(shape)}``. Returns the
    verification and the port's arrays ({"port": float32, "float64": exact}).
    """
    candidate = port_arrays(net, inputs, objective)
    net64 = float64_twin(net)
    exact = port_arrays(net64, inputs, objective)
    verification = verify_arrays(net64, reference, candidate, tolerances, objective, exact, others, names)
    return verification, {names[1]: candidate, EXACT: exact}
