"""The verdict: does the port compute what the reference (Caffe) computes?

The rule (the default) is invariant to float32 rounding, so it holds on any CPU, kernel
path and thread count, and for any weights: the port passes when

* every array the port produces has the reference's shape, and no forward array of the
  port is missing from the reference run;
* every layer of both frameworks, forward and backward, is within its own float32
  rounding bound of the port's float64 layer applied to that framework's own inputs
  (``porting.verify.attribution``), inputs included (an Input layer must copy exactly).

The reference's local checks are the semantic test (the float64 layer is the port's
reading of the layer, evaluated at the reference's inputs); the port's own are the
arithmetic test. A layer without a rounding rule is judged by the per-blob tolerance of
its arrays instead. Per-blob tolerances (``porting.tolerances.Tolerances``) stay as a
report column and, with ``strict``, as an extra condition (every compared array within
its tolerance): that rule depends on how far the net amplifies rounding and on which
decisions flip, so it is a property of one machine, inputs and weights, not of the port.

Each verification carries a one-line ``summary`` (pass or fail, where, the likely cause)
and a longer ``verdict`` paragraph.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from porting.layers import LAYERS
from porting.tolerances import Tolerances
from porting.verify.attribution import (DecisionFlips, Departure, LocalCheck, decision_flips, find_departure,
                                        local_checks)
from porting.verify.keys import NetValues
from porting.verify.metrics import Row, compare_rows
from porting.verify.run import EXACT, Objective, _net_dtype, float64_twin, port_arrays


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
    summary: str = ""                 # one line: PASS/FAIL, where, the likely cause
    strict: bool = False              # the per-blob tolerances decided too
    flips: list[DecisionFlips] = field(default_factory=list)  # decisions reference and candidate take differently
    problems: list[str] = field(default_factory=list)          # what failed the verdict, one line each

    @property
    def failed_rows(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    @property
    def departed_at(self) -> str | None:
        """The layer the verdict names: the earliest (forward in net order, then backward) of
        the point of departure and the first array whose shape the reference does not share;
        when the verdict fails by tolerance only, the first failing array's layer."""
        return blamed_layer(self.rows, self.departure, self.passed)


def verify_arrays(graph_or_net64, reference: Mapping, candidate: Mapping, tolerances: Tolerances | None = None,
                  objective: Objective | None = None, exact: Mapping | None = None,
                  others: Mapping[str, Mapping] | None = None, names: tuple[str, str] = ("caffe", "port"),
                  inputs: Mapping[str, np.ndarray] | None = None, pinned: Mapping | None = None,
                  strict: bool = False, foreign: bool = False) -> Verification:
    """Compare ``candidate`` with ``reference`` (keyed arrays) and give the verdict.

    ``graph_or_net64``: the port in float64 (enables the local checks the verdict rests on)
    or just its Graph (metrics only: the verdict then falls back on the per-blob
    tolerances). ``exact`` is ``port_arrays(net64, inputs, objective)``; ``others`` more
    candidates (name -> arrays) reported apart; ``inputs`` the arrays both were fed (judges
    the Input layers); ``pinned`` the candidate run at the reference's forward point.
    ``foreign``: the candidate is not the port (someone else's module,
    porting.verify.foreign), so where it alone departs it computes another function, and
    an array no local check covers (its layer's input has no counterpart) is judged by
    its per-blob tolerance.
    """
    tolerances = tolerances or Tolerances()
    net64 = graph_or_net64 if hasattr(graph_or_net64, "graph") else None
    if net64 is not None and _net_dtype(net64) != torch.float64 and any(True for _ in net64.parameters()):
        net64 = float64_twin(net64)  # handed the float32 port: the exact side must be float64
    graph = net64.graph if net64 is not None else graph_or_net64
    values = NetValues(graph)
    rows = compare_rows(values, reference, candidate, tolerances, objective, others, exact, names, pinned)
    frameworks = [names[0], names[1], *(others or {})]
    checks: list[LocalCheck] = []
    departure = None
    other_departures: list[Departure] = []
    flips: list[DecisionFlips] = []
    if net64 is not None:
        arrays = {names[0]: reference, names[1]: candidate, **(others or {})}
        checks = local_checks(net64, arrays, objective, exact, inputs)
        departure = find_departure([c for c in checks if c.framework in names], list(names), names[0])
        for name in others or {}:
            found = find_departure([c for c in checks if c.framework == name], [name])
            if found is not None:
                other_departures.append(found)
        flips = decision_flips(net64, names[0], reference, names[1], candidate, checks)
    missing_in_reference = sorted(k for k in candidate if k not in reference)
    not_in_candidate = sorted(k for k in reference if k not in candidate)
    main_checks = [c for c in checks if c.framework in names]
    problems = _problems(rows, main_checks, departure, missing_in_reference, strict or net64 is None,
                         _unchecked(rows, [c for c in checks if c.framework == names[1]], values) if foreign
                         else set())
    passed = bool(rows) and not problems
    verdict = explain(rows, main_checks, departure, names, passed, list(names), flips, strict)
    if problems and departure is None:
        verdict += " It fails: " + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "") + "."
    for other in other_departures:
        verdict += (f" Third opinion: {other.statement} This is a fault of the {', '.join(other.frameworks)} "
                    f"path (export or evaluator), not of {names[0]} or {names[1]}.")
    return Verification(names[0], names[1], objective, tolerances, rows, checks, departure, verdict, passed,
                        missing_in_reference, not_in_candidate, frameworks, other_departures,
                        summarise(passed, problems, departure, rows, main_checks, flips, names, strict, foreign),
                        strict, flips, problems)


def blamed_layer(rows: list[Row], departure: Departure | None, passed: bool) -> str | None:
    """See ``Verification.departed_at``."""
    if passed:
        return None
    places = [(departure.order(), departure.layer)] if departure is not None else []
    shape = next((r for r in rows if r.problem), None)  # rows come forward first, then backward
    if shape is not None:
        places.append((_row_order(shape), shape.layer))
    if places:
        return min(places)[1]
    failed = next((r for r in rows if not r.passed), None)
    return failed.layer if failed is not None else None


def _row_order(row: Row) -> tuple[int, int]:
    return (0, row.position) if row.kind == "data" else (1, -row.position)


def _problems(rows: list[Row], checks: list[LocalCheck], departure: Departure | None,
              missing_in_reference: list[str], by_tolerance: bool, unchecked: set[str] = frozenset()
              ) -> list[str]:
    """Why the verdict fails (empty: it passes). ``unchecked``: keys of rows judged by their
    per-blob tolerance because no local check covers them (see ``_unchecked``)."""
    problems = [f"{r.key}: {r.problem}" for r in rows if r.problem]
    missing = [k for k in missing_in_reference if k.endswith("/data")]
    if missing:
        problems.append(f"{len(missing)} forward array(s) of the port are missing from the reference, "
                        f"first {missing[0]}")
    if departure is not None:
        problems.append(f"{', '.join(departure.frameworks)} beyond float32 rounding at the {departure.direction} "
                        f"of {departure.layer}")
    unjudged = {c.key for c in checks if c.within is None}
    for row in rows:
        if row.problem or row.passed:
            continue
        if by_tolerance or row.key in unjudged or row.key in unchecked or _unjudged_layer(row, checks):
            problems.append(f"{row.key}: {row.metrics.max_rel:.3g} beyond its tolerance {row.tolerance:g}")
    return problems


def _unchecked(rows: list[Row], candidate_checks: list[LocalCheck], values: NetValues) -> set[str]:
    """Keys of rows no local check of the candidate covers: a forward row whose layer has no
    forward check, a backward row whose value's gradient has none (a foreign module's layer
    whose input has no counterpart). They are judged by their per-blob tolerance."""
    forward = {c.layer for c in candidate_checks if c.direction == "forward"}
    backward = {c.key for c in candidate_checks if c.direction == "backward"}
    out = set()
    for row in rows:
        value = values.value_of_key(row.key)
        if row.kind == "data" and row.layer not in forward:
            out.add(row.key)
        elif row.kind == "diff" and value is not None and value.key("diff") not in backward:
            out.add(row.key)
    return out


def _unjudged_layer(row: Row, checks: list[LocalCheck]) -> bool:
    """True when the layer that made this row has no rounding rule (judged by tolerance instead)."""
    return any(c.within is None and row.layer in c.layer.split(", ") and c.direction ==
               ("forward" if row.kind == "data" else "backward") for c in checks)


def first_beyond_tolerance(rows: list[Row], framework: str) -> Row | None:
    """The first row (forward in net order, then backward from the objective down) where
    ``framework``'s error against float64 exceeds the row's tolerance."""
    for row in rows:
        err = row.vs_float64.get(framework, {}).get("max_rel")
        if err is not None and not err <= row.tolerance:
            return row
    return None


def summarise(passed: bool, problems: list[str], departure: Departure | None, rows: list[Row],
              checks: list[LocalCheck], flips: list[DecisionFlips], names: tuple[str, str], strict: bool,
              foreign: bool = False) -> str:
    """One line for people: PASS or FAIL, where it departs, the likely cause."""
    reference, candidate = names
    if passed:
        n = len([c for c in checks if c.within])
        beyond = len([r for r in rows if not r.passed])
        text = (f"PASS: {candidate} computes what {reference} computes; every layer is within float32 rounding "
                f"({n} local checks, forward and backward)")
        rounding = [f for f in flips if f.kind == "rounding"]
        if rounding:
            text += (f"; {sum(f.flips for f in rounding)} decision(s) flipped by rounding "
                     f"({', '.join(f.layer for f in rounding[:3])}{', ...' if len(rounding) > 3 else ''})")
        if beyond:
            text += f"; {beyond} array(s) beyond their per-blob tolerance (which decides only with --strict)"
        return text + "."
    shape = next((r for r in rows if r.problem), None)
    if shape is not None and (departure is None or _row_order(shape) < departure.order()):
        return f"FAIL at layer {shape.layer} ({shape.layer_type}): {shape.key} has {shape.problem}."
    if departure is not None:
        where = f"the {departure.direction} of layer {departure.layer} ({departure.layer_type})"
        if getattr(LAYERS.get(departure.layer_type), "is_input", False):  # Input or a data layer
            cause = f"{', '.join(departure.frameworks)} did not get the input it was given (preprocessing)"
        elif reference in departure.frameworks and candidate not in departure.frameworks:
            cause = (f"the port implements {departure.layer} differently from {reference} "
                     f"(a semantic difference)")
        elif candidate in departure.frameworks and reference not in departure.frameworks and foreign:
            cause = (f"{candidate} computes {departure.layer} differently from {reference}, which is within "
                     f"rounding of the port's float64 reading there (a semantic difference)")
        elif candidate in departure.frameworks and reference not in departure.frameworks:
            cause = f"{candidate}'s float32 arithmetic at {departure.layer} is beyond rounding (precision or kernel)"
        else:
            cause = "both frameworks differ from the port's float64 reading there"
        return f"FAIL at {where}: {cause}."
    first = problems[0] if problems else "nothing was compared"
    rule = "strict per-blob tolerance" if strict else "per-blob tolerance (no local check covers it)" if foreign \
        else "per-blob tolerance (no rounding rule for this layer)"
    return f"FAIL by {rule}: {first}."


def explain(rows: list[Row], checks: list[LocalCheck], departure: Departure | None,
            names: tuple[str, str], passed: bool, frameworks: list[str],
            flips: list[DecisionFlips] | None = None, strict: bool = False) -> str:
    """The long paragraph: what was compared, where it departs, who is right, why."""
    compared = [r for r in rows if r.metrics is not None]
    if not compared:
        return "Nothing was compared: the two sides share no blob keys."
    worst = max(compared, key=lambda r: (r.metrics.max_rel if r.metrics.max_rel == r.metrics.max_rel
                                         else math.inf))
    failed = [r for r in rows if not r.passed]
    parts = []
    if not failed:
        parts.append(f"All {len(rows)} compared arrays are within their per-blob tolerance; the largest "
                     f"relative difference is {worst.metrics.max_rel:.2g} at {worst.key}.")
    else:
        first = failed[0]
        parts.append(f"{len(failed)} of {len(rows)} compared arrays exceed their per-blob tolerance, the first "
                     f"at {first.key}; the largest relative difference is {worst.metrics.max_rel:.3g} at "
                     f"{worst.key} (tolerance {worst.tolerance:g}).")
    if worst.vs_float64:
        errs = ", ".join(f"{k} {v['max_rel']:.2g}" for k, v in worst.vs_float64.items())
        parts.append(f"There, against float64: {errs}; closest: {worst.closer or 'n/a'}.")
    if departure is not None:
        parts.append(departure.statement)
        return " ".join(parts)
    if not checks:
        parts.append("No float64 evaluation was given, so the per-blob tolerances decide.")
        return " ".join(parts)
    judged = [c for c in checks if c.within is not None]
    unjudged = sorted({c.layer_type for c in checks if c.within is None})
    parts.append(f"No layer adds more than float32 rounding can explain in any framework "
                 f"({len(judged)} local checks" + (f"; no rule for {', '.join(unjudged)}, judged by tolerance"
                                                    if unjudged else "") + ").")
    rounding = [f for f in flips or [] if f.kind == "rounding"]
    if rounding:
        parts.append(f"Decisions {names[0]} and {names[1]} take differently, every one a rounding flip (all "
                     f"layers before it are within float32 rounding in both): "
                     + "; ".join(f.describe() for f in rounding[:6]) + ("; ..." if len(rounding) > 6 else "") + ".")
    pinned = [r for r in rows if r.pinned is not None]
    if pinned:
        worst_pinned = max(pinned, key=lambda r: r.pinned["max_rel"])
        parts.append(f"With the port pinned to {names[0]}'s forward values (the same decisions), the largest "
                     f"gradient difference is {worst_pinned.pinned['max_rel']:.2g} at {worst_pinned.key}.")
    if not failed:
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
                 "inputs and weights). The port is not at fault"
                 + ("; --strict fails it on the per-blob tolerances all the same." if strict and not passed
                    else "; only --strict would fail it."))
    return " ".join(parts)


def verify_port(net, reference: Mapping, inputs: Mapping[str, np.ndarray], objective: Objective | None = None,
                tolerances: Tolerances | None = None, others: Mapping[str, Mapping] | None = None,
                names: tuple[str, str] = ("caffe", "port"), strict: bool = False,
                ) -> tuple[Verification, dict[str, dict]]:
    """Run the port in float32 and float64 on ``inputs`` and verify it against ``reference``.

    ``reference`` is the legacy worker's result for the same inputs and, with an
    objective, ``top_diffs={objective.blob: objective.seed(shape)}``. With an objective the
    port also runs pinned to the reference's forward values (its backward at the
    reference's decisions). Returns the verification and the port's arrays
    ({"port": float32, "float64": exact, "pinned": the pinned run when made}).
    """
    if not isinstance(inputs, Mapping):
        inputs = {next(iter(net.graph.inputs)): inputs}
    candidate = port_arrays(net, inputs, objective)
    pinned = None
    if objective is not None:  # pinned where the shapes agree (a shape difference is reported as such)
        same = {k: v for k, v in reference.items() if k in candidate and np.shape(v) == np.shape(candidate[k])}
        pinned = port_arrays(net, inputs, objective, pin=same)
    net64 = float64_twin(net)
    exact = port_arrays(net64, inputs, objective)
    verification = verify_arrays(net64, reference, candidate, tolerances, objective, exact, others, names,
                                 inputs=inputs, pinned=pinned, strict=strict)
    arrays = {names[1]: candidate, EXACT: exact}
    if pinned is not None:
        arrays["pinned"] = pinned
    return verification, arrays
