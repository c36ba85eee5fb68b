"""Attribution: the error each layer adds in each framework, judged against float32 rounding.

A float64 evaluation of the port (weights and inputs are the same float32 numbers, only the
arithmetic is wider) stands for exact arithmetic. Each framework's output of a layer is
compared with the float64 layer applied to *that framework's own inputs*, which removes
everything inherited from earlier layers (decision flips upstream included); what remains
is the error this layer added. It is "within float32 rounding" when no element exceeds
the layer's own a-priori bound (``CaffeLayer.forward_bound`` / ``backward_bound``,
computed element by element from the same inputs). The first layer, forward in net order
then backward from the objective down, where some framework exceeds its bound is the
point of departure. The float64 side is the port's own reading of every layer: the
reference (Caffe) beyond its bound where the port is not means the port computes another
function there (a semantic difference).

Input layers are judged too: each framework's input blob must equal the inputs given.

Discrete decisions (ReLU signs, max-pool winners, ArgMax, Eltwise MAX, Threshold; the
layer's ``decisions``) taken differently by two frameworks are classified: when every
layer upstream of the deciding layer is within float32 rounding in both frameworks, the
two evaluate the same function up to rounding, so the flip is a *rounding flip* (its
deciding values differ by accumulated rounding only, however far the net then carries
it); otherwise it lies *after a departure* and is that departure's consequence.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from porting.rounding import gamma, magnitude_twin
from porting.verify.keys import NetValues, Value
from porting.verify.metrics import _ratio
from porting.verify.run import EXACT, Objective


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
                 exact: Mapping | None = None, inputs: Mapping[str, np.ndarray] | None = None
                 ) -> list[LocalCheck]:
    """Local forward and backward checks of every framework in ``arrays`` (name -> arrays).

    ``net64`` is the port in float64 (``float64_twin(net)``); its layers applied to a
    framework's own bottoms give the exact output that framework should have produced.
    ``exact`` (the float64 run) adds decision counts to the notes: decisions a framework
    takes otherwise than float64 does (``CaffeLayer.decisions``). ``inputs`` (blob name ->
    the arrays fed to every framework) judges Input layers: a framework whose input blob
    is not exactly what it was given departs there. Layers are visited once each (all
    frameworks at a time), so a layer's |weights| copy is made once.
    """
    values = NetValues(net64.graph)
    stop = None
    if objective is not None and objective.blob in values.last_value:
        stop = values.last_value[objective.blob].position
    forward: dict[str, list[LocalCheck]] = {name: [] for name in arrays}
    contrib: dict[str, dict[Value, list]] = {name: {} for name in arrays}
    for spec in values.specs:
        if spec.is_input:
            for name, arr in arrays.items():
                forward[name].extend(_input_checks(spec, values, name, arr, inputs))
            continue
        if spec.module is None:
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
            bounds = module.forward_bound(xs, exact_det, abs_module)
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
    if any(d is not None and d.shape != y.shape for y, d in zip(exact_tops, g)):
        return  # a shape the reference does not share: reported as such, nothing to judge here
    pairs = [(y, d) for y, d in zip(exact_tops, g) if d is not None and y.requires_grad]
    if not pairs or not leaves:  # no gradient, or no bottoms to send it to (Parameter)
        return
    grads = torch.autograd.grad([y for y, _ in pairs], leaves, [d for _, d in pairs], allow_unused=True)
    stored = [_t(t) for t in tops] if have_tops else exact_det
    bounds = module.backward_bound(xs, stored, exact_det, g, abs_module)
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


def _input_checks(spec, values: NetValues, name: str, arr: Mapping, inputs) -> list[LocalCheck]:
    """An Input layer copies: a framework's input blob must be exactly the input it was given."""
    checks = []
    for v in values.by_layer[spec.name]:
        given = None if inputs is None else inputs.get(v.blob)
        seen = values.read(arr, v, "data")
        if given is None or seen is None:
            continue
        given = _t(given)
        if tuple(np.shape(seen)) != tuple(given.shape):
            ratio, rel, band, n = math.inf, math.inf, 0.0, int(given.numel())
        else:
            err = (_t(seen) - given).abs()
            ratio, rel, band, n = _ratio_stats(err, torch.zeros_like(err), float(given.abs().max()) if given.numel() else 0.0)
        checks.append(LocalCheck(name, "forward", spec.name, spec.type, "", v.key("data"), v.position,
                                 ratio, rel, band, n))
    return checks


def _decisions(spec, bottoms: list) -> list[torch.Tensor] | None:
    try:
        return spec.module.decisions([_t(b) for b in bottoms])
    except (RuntimeError, ValueError):  # a diagnostic: a layer that cannot say gets no count
        return None


def _decision_note(spec, values: NetValues, arr, exact, bottom_vals) -> str:
    """Discrete decisions this framework takes otherwise than float64 does on its own inputs."""
    if exact is None or not bottom_vals or any(v is None for v in bottom_vals):
        return ""
    mine = [values.read(arr, v, "data") for v in bottom_vals]
    theirs = [values.read(exact, v, "data") for v in bottom_vals]
    if any(a is None or b is None or np.shape(a) != np.shape(b) for a, b in zip(mine, theirs)):
        return ""
    da, db = _decisions(spec, mine), _decisions(spec, theirs)
    if not da or not db:
        return ""
    flips = sum(int((a != b).sum()) for a, b in zip(da, db))
    total = sum(int(a.numel()) for a in da)
    return f"{flips} of {total} {spec.type} decisions differ from float64's" if flips else ""


# --------------------------------------------------------------------------------------
# Decisions two frameworks take differently
# --------------------------------------------------------------------------------------

@dataclass
class DecisionFlips:
    """Decisions of one layer that ``a`` and ``b`` take differently, each on its own inputs.

    ``margin_rel``: the largest margin of a flipped decision (how far its deciding value was
    from the kink or tie, the larger of the two frameworks' margins) over the largest
    magnitude of the deciding blob. ``kind``: "rounding" (every layer upstream is within
    float32 rounding in both frameworks) or "after departure".
    """

    layer: str
    layer_type: str
    position: int
    frameworks: tuple[str, str]
    flips: int
    total: int
    margin_rel: float
    kind: str

    def describe(self) -> str:
        return (f"{self.layer} ({self.layer_type}): {self.flips} of {self.total} decisions differ, "
                f"margins up to {self.margin_rel:.2g} of the blob's largest value, "
                f"{'a rounding flip' if self.kind == 'rounding' else 'after the departure'}")


def ancestors(values: NetValues) -> dict[str, set[str]]:
    """Layer name -> the names of every layer whose output reaches it."""
    found: dict[str, set[str]] = {}
    for spec in values.specs:
        up: set[str] = set()
        for v in values.bottoms[spec.name]:
            if v is not None:
                up |= {v.layer} | found.get(v.layer, set())
        found[spec.name] = up
    return found


def decision_flips(net64, a_name: str, a: Mapping, b_name: str, b: Mapping,
                   checks: list[LocalCheck]) -> list[DecisionFlips]:
    """Per layer with decisions: where ``a`` and ``b`` decide differently, and what kind of flip.

    A flip is a rounding flip when no forward check upstream of its layer fails, in either
    framework (see the module docstring for the argument).
    """
    values = NetValues(net64.graph)
    up = ancestors(values)
    failing = {c.layer for c in checks if c.direction == "forward" and c.within is False
               and c.framework in (a_name, b_name)}
    out = []
    for spec in values.specs:
        if spec.is_input or spec.module is None:
            continue
        bottom_vals = values.bottoms[spec.name]
        if not bottom_vals or any(v is None for v in bottom_vals):
            continue
        xa = [values.read(a, v, "data") for v in bottom_vals]
        xb = [values.read(b, v, "data") for v in bottom_vals]
        if any(x is None for x in xa + xb) or any(np.shape(p) != np.shape(q) for p, q in zip(xa, xb)):
            continue
        da, db = _decisions(spec, xa), _decisions(spec, xb)
        if not da or not db:
            continue
        flipped = [p != q for p, q in zip(da, db)]
        flips = sum(int(f.sum()) for f in flipped)
        if not flips:
            continue
        margin = 0.0
        try:
            ma, mb = spec.module.decision_margins([_t(x) for x in xa]), spec.module.decision_margins([_t(x) for x in xb])
        except (RuntimeError, ValueError):
            ma = mb = None
        if ma and mb:
            for f, p, q in zip(flipped, ma, mb):
                if f.any():
                    margin = max(margin, float(torch.maximum(p[f], q[f]).max()))
        scale = max(float(np.abs(np.asarray(x)).max()) if np.size(x) else 0.0 for x in xa)
        kind = "after departure" if up[spec.name] & failing else "rounding"
        out.append(DecisionFlips(spec.name, spec.type, values.position[spec.name], (a_name, b_name), flips,
                                 sum(int(d.numel()) for d in da), _ratio(margin, scale), kind))
    return out


# --------------------------------------------------------------------------------------
# The point of departure
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
    position: int = -1           # the layer's position in the net

    def order(self) -> tuple[int, int]:
        """Forward in net order first, then backward from the objective down."""
        return (0, self.position) if self.direction == "forward" else (1, -self.position)


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
                     worst.error_ratio, worst.local_rel, worst.band, statement, worst.position)


def _fmt_ratio(r: float) -> str:
    return "where the operation should be exact, i.e. infinitely beyond" if math.isinf(r) else f"{r:.3g} times"
