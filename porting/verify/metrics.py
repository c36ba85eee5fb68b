"""How far one array is from another: per-blob metrics and the comparison rows of a verification.

Metrics of one blob (candidate ``t`` against reference ``r``): max |t - r|; that divided
by max |r| (the relative error every tolerance bounds); ||t - r||_2 / ||r||_2; the
fraction of elements with |t - r| > tolerance * max |r|; and for classifier outputs the
top-1 / top-5 agreement over the batch. A row holds these for one key, with each
framework's error against the float64 evaluation and, where the port was also run at
the reference's forward point (pinned), the pinned port's error.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from porting.rounding import U
from porting.tolerances import Tolerances
from porting.verify.keys import NetValues, Value, parse_key
from porting.verify.run import Objective


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
    pinned: dict | None = None  # diff rows: the port run at the reference's forward point vs the reference
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
                 exact: Mapping | None = None, names: tuple[str, str] = ("caffe", "port"),
                 pinned: Mapping | None = None) -> list[Row]:
    """One Row per key the candidate has (and the reference too), in net order.

    ``others`` are further candidates (e.g. ONNX) compared against the same reference;
    ``exact`` is the float64 evaluation: each framework's error against it goes into
    ``vs_float64`` and the closest framework into ``closer``; ``pinned`` the candidate run at
    the reference's forward point (its diffs go into ``Row.pinned``).
    """
    others = dict(others or {})
    rows = []
    for key in candidate:
        if key not in reference:
            continue
        value = values.value_of_key(key)
        if value is None:
            continue
        view, _, _, kind = parse_key(key)
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
        if pinned is not None and kind == "diff" and key in pinned and np.shape(pinned[key]) == ref.shape:
            m = blob_metrics(pinned[key], ref, tol)
            row.pinned = {"max_rel": m.max_rel, "rel_l2": m.rel_l2, "max_abs": m.max_abs,
                          "passed": bool(m.max_rel <= tol)}
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
