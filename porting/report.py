"""Drift reports: report.json (machine-readable), report.md and report.html (for people).

``build_report(verification, ...)`` turns a ``porting.verify.Verification`` into one plain
dict (the JSON schema below); ``write_report(report, folder)`` writes the three files and
``errors.png``; the HTML embeds its images as base64 and links nothing outside itself.
``drift_diff(old, new)`` compares two report.json files blob by blob.

JSON schema (``schema`` = "caffe-port-harness/drift-report", ``schema_version`` = 2):
  passed, exit_status, summary (one line: PASS/FAIL, where, the likely cause), verdict (the
  long paragraph), strict (per-blob tolerances decided too), problems (why it failed),
  departure (or null), diagnosis (a foreign module's: layer, explanation, sentence, tried;
  or null), flips (decisions reference and candidate take differently, each
  with its kind: "rounding" or "after departure"), objective, frameworks, tolerances,
  rounding_rule, net, inputs, provenance, top5, missing, and
  rows: one per compared array, in net order, keyed by ``key`` ("top/<layer>/<i>/data",
  "blob/<name>/diff", ...: stable across runs of the same net), with the metrics
  max_abs, max_rel, rel_l2, frac_beyond (candidate vs reference), tolerance, passed, the
  error of each framework against float64 (``vs_float64``) and the ``closer`` one, and for
  gradients ``pinned``: the port run at the reference's forward point against the reference;
  checks: the local float32-rounding check of every layer and framework.
Non-finite numbers are written as the strings "inf", "-inf", "nan".
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from porting.errors import PortingError
from porting.files import read_json, write_atomic
from porting.verify import EXACT, Verification, top_classes, top_key

SCHEMA = "caffe-port-harness/drift-report"
SCHEMA_VERSION = 2
REPORT_LIMIT = 1 << 28   # bytes: the largest report.json read back

ROUNDING_RULE = (
    "A framework is within float32 rounding at a layer when, fed its own inputs to that layer, "
    "no output element differs from the float64 evaluation of the same layer by more than the "
    "layer's a-priori float32 rounding bound: for a sum or dot product of n terms "
    "gamma_n * sum|terms| with gamma_n = n*u/(1-n*u), u = 2^-24 (Higham, Accuracy and Stability "
    "of Numerical Algorithms, ch. 3), zero for exact operations (ReLU, max pooling, copies), and "
    "the bound of Caffe's own algorithm where it rounds more (LRN's running channel sum). Errors "
    "inherited from earlier layers are excluded by construction, so the first layer beyond its "
    "bound is where a framework departs from float32 arithmetic; when none is, remaining "
    "differences are float32 rounding amplified by the net. The float64 evaluation is the port "
    "in double precision on the same float32 weights and inputs. The verdict passes when every "
    "layer of both frameworks is within this rule, forward and backward, and every input blob is "
    "exactly the input given; decisions the two frameworks take differently are then rounding flips. "
    "Per-blob tolerances decide only with --strict.")


# --------------------------------------------------------------------------------------
# Building the report dict
# --------------------------------------------------------------------------------------

def _versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__}
    for dist in ("caffe-port-harness", "torch", "onnx", "protobuf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_report(verification: Verification, net: dict | None = None, inputs: dict | None = None,
                 provenance: dict | None = None, top5: list | None = None) -> dict:
    """The report as one JSON-ready dict.

    ``net``: what was verified (e.g. {"name", "prototxt", "prototxt_sha256", "caffemodel",
    "caffemodel_sha256"}); ``inputs``: where the inputs came from ({"kind": "random",
    "seed": 0, "batch": 1} or {"kind": "files", "files": [...]}); ``provenance``: the
    reference side's provenance (the legacy worker's, with versions and BLAS);
    ``top5``: ``top5_table(...)`` rows for image inputs.
    """
    v = verification
    rows = []
    for r in v.rows:
        row = {"key": r.key, "view": r.view, "kind": r.kind, "layer": r.layer, "type": r.layer_type,
               "blob": r.blob, "index": r.index, "position": r.position, "shape": list(r.shape),
               "overwritten_by": r.overwritten_by, "tolerance": r.tolerance, "passed": r.passed,
               "problem": r.problem}
        row.update(asdict(r.metrics) if r.metrics is not None else {})
        row.update({"others": r.others, "vs_float64": r.vs_float64, "closer": r.closer, "pinned": r.pinned})
        rows.append(row)
    checks = [{"framework": c.framework, "direction": c.direction, "layer": c.layer, "type": c.layer_type,
               "params": c.params, "key": c.key, "position": c.position, "error_ratio": c.error_ratio,
               "within": c.within, "local_rel": c.local_rel, "band": c.band, "n_beyond": c.n_beyond,
               "note": c.note} for c in v.checks]
    report = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "passed": v.passed, "exit_status": 0 if v.passed else 1,
        "summary": v.summary, "verdict": v.verdict, "strict": v.strict, "problems": list(v.problems),
        "flips": [asdict(f) for f in v.flips],
        "departure": asdict(v.departure) if v.departure is not None else None,
        "diagnosis": _diagnosis(v),
        "other_departures": [asdict(d) for d in v.other_departures],
        "objective": ({"layer": v.objective.layer, "unit": v.objective.unit, "blob": v.objective.blob}
                      if v.objective is not None else None),
        "frameworks": {"reference": v.reference, "candidate": v.candidate,
                       "others": [f for f in v.frameworks if f not in (v.reference, v.candidate)],
                       "exact": EXACT},
        "tolerances": v.tolerances.to_json(),
        "rounding_rule": ROUNDING_RULE,
        "net": dict(net or {}), "inputs": dict(inputs or {}),
        "provenance": {"harness": _versions(), "reference": dict(provenance or {})},
        "top5": list(top5 or []),
        "missing": {"in_reference": list(v.missing_in_reference), "in_candidate": list(v.not_in_candidate)},
        "rows": rows, "checks": checks,
    }
    return report


def _diagnosis(verification) -> dict | None:
    """A foreign module's diagnosis (porting.verify.diagnose): {"layer", "explanation",
    "sentence", "tried"}; None when there is none (a pass, or our own port)."""
    found = getattr(verification, "diagnosis", None)
    return found.to_json() if found is not None else None


def read_synset_list(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(WordNet id, class words) per line of a synset_words.txt ("n01440764 tench, Tinca
    tinca"): line u names class u. Blank lines at the end are ignored; one elsewhere would
    shift every class after it, so it is refused, as is text that is not UTF-8."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise PortingError(f"cannot read synset list: {err.strerror}", path) from None
    except UnicodeDecodeError as err:
        raise PortingError(f"synset list is not UTF-8 text (byte {err.start})", path) from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    entries = []
    for number, line in enumerate(lines, 1):
        wnid, _, words = line.strip().partition(" ")
        if not wnid:
            raise PortingError(f"line {number} is blank (line u names class u)", path)
        entries.append((wnid, words.strip()))
    return entries


def read_synsets(path: str | os.PathLike) -> list[str]:
    """Class names from a synset_words.txt: the text after the WordNet id (or the id alone)."""
    return [words or wnid for wnid, words in read_synset_list(path)]


def top5_table(reference: np.ndarray, candidate: np.ndarray, labels=None, synsets=None,
               names: tuple[str, str] = ("caffe", "port"), k: int = 5) -> list[dict]:
    """Per input item: the top-k classes of both frameworks side by side.

    ``reference``/``candidate``: (N, C) class scores (a Softmax output or its logits);
    ``labels``: a name per item (e.g. the image file); ``synsets``: class names.
    """
    out = []
    ref, cand = top_classes(reference, k), top_classes(candidate, k)
    for i, (a, b) in enumerate(zip(ref, cand)):
        def entry(pairs):
            return [{"class": c, "name": synsets[c] if synsets and c < len(synsets) else str(c), "score": s}
                    for c, s in pairs]
        out.append({"item": i, "label": labels[i] if labels and i < len(labels) else f"input {i}",
                    names[0]: entry(a), names[1]: entry(b)})
    return out


# --------------------------------------------------------------------------------------
# JSON in and out
# --------------------------------------------------------------------------------------

def jsonable(obj):
    """``obj`` with NumPy scalars as Python ones and non-finite floats as "nan"/"inf"/"-inf"."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, (np.floating,)):
        return jsonable(float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_NUMERIC = {"max_abs", "max_rel", "rel_l2", "frac_beyond", "ref_max", "error_ratio", "local_rel", "band",
            "tolerance", "top1", "top5"}


def _restore(obj, key=None):
    if isinstance(obj, dict):
        return {k: _restore(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v, key) for v in obj]
    if isinstance(obj, str) and obj in _NONFINITE and key in _NUMERIC:
        return _NONFINITE[obj]
    return obj


def dumps(report: dict) -> str:
    return json.dumps(jsonable(report), indent=1, allow_nan=False)


def load_report(path: str | os.PathLike) -> dict:
    """Read a report.json; PortingError unless it is one (schema and version checked)."""
    obj = read_json(path, REPORT_LIMIT)
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
        raise PortingError(f"not a drift report (schema is not {SCHEMA!r})", path)
    if obj.get("schema_version") != SCHEMA_VERSION:
        raise PortingError(f"drift report schema_version {obj.get('schema_version')!r}; this harness "
                           f"reads version {SCHEMA_VERSION}", path)
    if not isinstance(obj.get("rows"), list) or any("key" not in r for r in obj["rows"]):
        raise PortingError("drift report without a list of keyed rows", path, "rows")
    return _restore(obj)


def write_report(report: dict, folder: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md, report.html and errors.png into ``folder``.

    Each file is written to a temporary name and renamed, so none is left half-written.
    Returns the paths by kind.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PortingError(f"cannot create report folder: {err.strerror}", folder) from None
    png = plot_errors(report)
    paths = {"json": folder / "report.json", "md": folder / "report.md", "html": folder / "report.html",
             "png": folder / "errors.png"}
    write_atomic(paths["png"], png)
    write_atomic(paths["json"], (dumps(report) + "\n").encode("utf-8"))
    write_atomic(paths["md"], render_markdown(report, image="errors.png").encode("utf-8"))
    write_atomic(paths["html"], render_html(report, png).encode("utf-8"))
    return paths


# --------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------

FLOOR = 1e-10  # exact zeros are drawn here on the log scale

COLORS = {"reference": "#1f77b4", "candidate": "#d62728", "other": "#2ca02c", "diff": "#222222"}


def _num(x):
    return x if isinstance(x, (int, float)) and x == x else None


def plot_errors(report: dict) -> bytes:
    """PNG: relative error by depth, forward (top) and backward (bottom), log y.

    Lines: candidate vs reference (black), each framework vs float64 (colours); grey band:
    the worst-case float32 rounding one layer may add (float64 inputs); dotted: tolerance;
    a vertical line marks the point of departure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fw = report["frameworks"]
    frameworks = [fw["reference"], fw["candidate"], *fw.get("others", [])]
    colors = {fw["reference"]: COLORS["reference"], fw["candidate"]: COLORS["candidate"]}
    for name in fw.get("others", []):
        colors[name] = COLORS["other"]
    layers = {}
    for r in report["rows"]:
        layers.setdefault(r["position"], r["layer"])
    bands = {}
    for c in report.get("checks", []):  # the bound at the reference's own inputs
        if c["framework"] == fw["reference"] and _num(c["band"]) is not None:
            bands[(c["direction"], c["key"])] = c["band"]
    directions = [("data", "forward", "forward pass (each layer's own output)"),
                  ("diff", "backward", "backward pass (gradient w.r.t. each layer's output; flows right to left)")]
    present = [d for d in directions if any(r["kind"] == d[0] and r["view"] == "top" for r in report["rows"])]
    fig, axes = plt.subplots(max(len(present), 1), 1, figsize=(11, 3.6 * max(len(present), 1) + 0.6),
                             sharex=True, squeeze=False)
    positions = sorted(layers)
    for ax, (kind, direction, title) in zip(axes[:, 0], present):
        rows = sorted((r for r in report["rows"] if r["kind"] == kind and r["view"] == "top"),
                      key=lambda r: (r["position"], r["index"]))
        xs = [r["position"] for r in rows]

        def series(values):
            return [max(v, FLOOR) if v is not None else np.nan for v in values]

        band = [bands.get((direction, r["key"])) for r in rows]
        if any(b is not None for b in band):
            ax.fill_between(xs, FLOOR, series(band), step="mid", color="#cccccc", alpha=0.6,
                            label="float32 rounding bound of one layer (worst case)")
        ax.step(xs, series([_num(r.get("tolerance")) for r in rows]), where="mid", color="#999999",
                linestyle=":", label="tolerance")
        ax.plot(xs, series([_num(r.get("max_rel")) for r in rows]), color=COLORS["diff"], marker="o",
                markersize=3.5, linewidth=1.6, label=f"{fw['candidate']} vs {fw['reference']}")
        for name in frameworks:
            vals = [_num(r.get("vs_float64", {}).get(name, {}).get("max_rel")) for r in rows]
            if any(v is not None for v in vals):
                ax.plot(xs, series(vals), color=colors[name], marker=".", linewidth=1.0, linestyle="--",
                        label=f"{name} vs float64")
        for name in fw.get("others", []):
            vals = [_num(r.get("others", {}).get(name, {}).get("max_rel")) for r in rows]
            if any(v is not None for v in vals):
                ax.plot(xs, series(vals), color=colors[name], marker="x", linewidth=1.0,
                        label=f"{name} vs {fw['reference']}")
        dep = report.get("departure")
        if dep and dep.get("direction") == direction:
            pos = next((r["position"] for r in rows if r["layer"] == dep["layer"].split(",")[0].strip()), None)
            pos = pos if pos is not None else next((r["position"] for r in rows if r["key"] == dep["key"]), None)
            if pos is not None:
                ax.axvline(pos, color=COLORS["candidate"], linewidth=1.2, alpha=0.7)
                ax.annotate(f"departure: {dep['layer']}", (pos, 0.97), xycoords=("data", "axes fraction"),
                            ha="left", va="top", fontsize=8, color=COLORS["candidate"],
                            xytext=(4, 0), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_ylim(FLOOR / 2, 10)
        ax.set_ylabel("max |error| / max |ref|")
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(True, which="major", axis="y", alpha=0.3)
    seen = {}
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    ax = axes[-1, 0]
    step = max(1, len(positions) // 40)
    ax.set_xticks(positions[::step])
    ax.set_xticklabels([layers[p] for p in positions[::step]], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel(f"layer (exact zeros drawn at {FLOOR:g})")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.legend(list(seen.values()), list(seen.keys()), loc="upper center", ncol=3, fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# Markdown and HTML
# --------------------------------------------------------------------------------------

def _g(x, digits: int = 2) -> str:
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def _shown_rows(report: dict) -> list[dict]:
    """Top rows always; a blob-view row only where it tells something its top row does not."""
    by_key = {r["key"]: r for r in report["rows"]}
    shown = []
    for r in report["rows"]:
        if r["view"] == "top":
            shown.append(r)
            continue
        twin = by_key.get(top_key(r["layer"], r["index"], r["kind"]))
        if twin is None or twin.get("max_rel") != r.get("max_rel") or twin["passed"] != r["passed"]:
            shown.append(r)
    return shown


def _table_columns(report: dict):
    fw = report["frameworks"]
    cols = [("layer", lambda r: r["layer"]), ("type", lambda r: r["type"]),
            ("array", lambda r: r["blob"] + ("" if r["view"] == "top" else " (blob view)")
             + (f" (before {r['overwritten_by']})" if r.get("overwritten_by") else "")),
            ("shape", lambda r: "x".join(map(str, r["shape"]))),
            ("max abs", lambda r: _g(r.get("max_abs"))), ("max rel", lambda r: _g(r.get("max_rel"))),
            ("rel L2", lambda r: _g(r.get("rel_l2"))),
            ("beyond tol", lambda r: _g(r.get("frac_beyond"))), ("tol", lambda r: _g(r.get("tolerance")))]
    for name in fw.get("others", []):
        cols.append((f"{name} max rel", lambda r, n=name: _g(r.get("others", {}).get(n, {}).get("max_rel"))))
    for name in [fw["reference"], fw["candidate"], *fw.get("others", [])]:
        cols.append((f"{name} vs f64", lambda r, n=name: _g(r.get("vs_float64", {}).get(n, {}).get("max_rel"))))
    cols.append(("closer to f64", lambda r: r.get("closer", "")))
    cols.append(("pinned max rel", lambda r: _g((r.get("pinned") or {}).get("max_rel"))))
    cols.append(("top1/top5", lambda r: "" if r.get("top1") is None else
                 f"{_g(r['top1'], 3)}/{_g(r.get('top5'), 3)}"))
    cols.append(("status", lambda r: r["problem"] or ("ok" if r["passed"] else "FAIL")))
    return cols


def _summary_lines(report: dict) -> list[tuple[str, str]]:
    fw = report["frameworks"]
    obj = report.get("objective")
    net = report.get("net", {})
    inputs = report.get("inputs", {})
    lines = [("net", net.get("name") or net.get("prototxt", "")),
             ("compared", f"{fw['candidate']} against {fw['reference']}"
              + (f" (and {', '.join(fw['others'])})" if fw.get("others") else "")
              + f"; attribution against {fw.get('exact', EXACT)}"),
             ("objective", f"{obj['layer']}:{obj['unit']} (blob {obj['blob']})" if obj else "none (forward only)"),
             ("inputs", ", ".join(f"{k}={v}" for k, v in inputs.items()) if inputs else "")]
    return [(k, v) for k, v in lines if v]


def _correspondence(report: dict) -> tuple[list[tuple[str, str, str]], list[str]] | None:
    """A foreign module's mapping (``net.torch``): rows (Caffe layer or blob, module output as
    ``path#call[index]``, how it was found) and the Caffe outputs without a counterpart;
    None for our own port."""
    mapping = report.get("net", {}).get("torch")
    if not mapping:
        return None
    rows = []
    for name, spec in mapping.get("map", {}).items():
        call = f"#{spec['call']}" if spec.get("call") else ""
        rows.append((name, f"{spec.get('module') or '<module>'}{call}[{spec.get('output', 0)}]",
                     mapping.get("matched_by", {}).get(name, "")))
    return rows, list(mapping.get("no_counterpart", []))


def _no_departure_text(report: dict) -> str:
    text = "No framework leaves float32 rounding at any layer (see the rule below)."
    failed = next((r for r in report["rows"] if not r["passed"]), None)
    if failed is not None:
        text += (f" The first array beyond tolerance, {failed['key']}, differs through float32 rounding "
                 f"amplified by the net (see the verdict and the decisions listed below).")
    return text


def _within(err, tolerance) -> bool:
    """True unless ``err`` is a number beyond ``tolerance`` (or NaN)."""
    if not isinstance(err, (int, float)) or not isinstance(tolerance, (int, float)):
        return True
    return err <= tolerance


def _framework_summary(report: dict) -> list[dict]:
    out = []
    fw = report["frameworks"]
    for name in [fw["reference"], fw["candidate"], *fw.get("others", [])]:
        mine = [c for c in report.get("checks", []) if c["framework"] == name]
        if not mine:
            continue
        judged = [c for c in mine if c["within"] is not None]
        beyond = [c for c in judged if not c["within"]]
        worst = max(judged, key=lambda c: c["error_ratio"], default=None)
        off = next((r for r in report["rows"] if not _within(r.get("vs_float64", {}).get(name, {}).get("max_rel"),
                                                             r.get("tolerance"))), None)
        out.append({"framework": name, "checks": len(mine), "judged": len(judged), "beyond": len(beyond),
                    "first_beyond": (f"{beyond[0]['direction']} {beyond[0]['layer']}" if beyond else ""),
                    "first_off": (f"{off['key']} ({_g(off['vs_float64'][name]['max_rel'])})" if off else ""),
                    "worst": (f"{_g(worst['error_ratio'])} at {worst['direction']} {worst['layer']}"
                              if worst else ""),
                    "notes": [f"{c['layer']}: {c['note']}" for c in mine if c.get("note")]})
    return out


def render_markdown(report: dict, image: str | None = "errors.png") -> str:
    fw = report["frameworks"]
    status = "PASS" if report["passed"] else "FAIL"
    out = [f"# Drift report: {report.get('net', {}).get('name') or 'net'} ({status})", ""]
    for k, v in _summary_lines(report):
        out.append(f"- **{k}**: {v}")
    out += ["", f"**{report.get('summary') or status}** (exit status {report['exit_status']})", ""]
    if report.get("diagnosis"):
        out += [f"- **diagnosis**: {report['diagnosis']['sentence']}", ""]
    out += [report["verdict"], ""]
    if report.get("flips"):
        out += ["## Decisions the frameworks take differently", "",
                "| layer | type | flipped | of | largest margin (of the blob's max) | kind |", "|---|---|---|---|---|---|"]
        out += [f"| {f['layer']} | {f['layer_type']} | {f['flips']} | {f['total']} | {_g(f['margin_rel'])} | "
                f"{f['kind']} |" for f in report["flips"]] + [""]
    dep = report.get("departure")
    out.append("## Point of departure")
    out.append("")
    if dep:
        out += [f"- **layer**: {dep['layer']} ({dep['layer_type']}{': ' + dep['params'] if dep['params'] else ''})",
                f"- **direction**: {dep['direction']}; first array: `{dep['key']}`",
                f"- **beyond float32 rounding**: {', '.join(dep['frameworks'])} (error {_g(dep['error_ratio'], 3)} "
                f"x the bound)",
                f"- **within float32 rounding up to there**: {', '.join(dep['within']) or 'none'}", "",
                dep["statement"], ""]
    else:
        out += [_no_departure_text(report), ""]
    for other in report.get("other_departures", []):
        out += [f"Third opinion ({', '.join(other['frameworks'])}): {other['statement']}", ""]
    corr = _correspondence(report)
    if corr:
        out += [f"## Correspondence: {fw['reference']} outputs and {fw['candidate']}'s", "",
                f"| {fw['reference']} layer or blob | {fw['candidate']} output | found by |", "|---|---|---|"]
        out += ["| " + " | ".join(str(t).replace("|", "\\|") for t in (a, f"`{b}`", c)) + " |"
                for a, b, c in corr[0]]
        out += ["", f"Without a counterpart (not compared): {', '.join(corr[1]) or 'none'}", ""]
    summary = _framework_summary(report)
    if summary:
        out += ["## Each framework against float64, layer by layer", "",
                "| framework | local checks | judged | beyond bound | first beyond | worst (error / bound) "
                "| first array off float64 by more than its tolerance |",
                "|---|---|---|---|---|---|---|"]
        for s in summary:
            out.append(f"| {s['framework']} | {s['checks']} | {s['judged']} | {s['beyond']} | "
                       f"{s['first_beyond']} | {s['worst']} | {s['first_off']} |")
        notes = [f"{s['framework']}, {n}" for s in summary for n in s["notes"]]
        if notes:
            out += ["", "Discrete decisions that differ from float64:", ""] + [f"- {n}" for n in notes]
        out.append("")
    if image:
        out += ["## Error by depth", "", f"![relative error by layer]({image})", ""]
    if report.get("top5"):
        out += ["## Top-5 classes", ""]
        ref, cand = fw["reference"], fw["candidate"]
        for item in report["top5"]:
            out += [f"**{item['label']}**", "", f"| rank | {ref} | score | {cand} | score |", "|---|---|---|---|---|"]
            for rank, (a, b) in enumerate(zip(item[ref], item[cand]), 1):
                out.append(f"| {rank} | {a['name']} | {a['score']:.4g} | {b['name']} | {b['score']:.4g} |")
            out.append("")
    cols = _table_columns(report)
    for kind, title in (("data", "Forward: every blob"), ("diff", "Backward: every gradient")):
        rows = [r for r in _shown_rows(report) if r["kind"] == kind]
        if not rows:
            continue
        out += [f"## {title}", "", "| " + " | ".join(c for c, _ in cols) + " |",
                "|" + "---|" * len(cols)]
        for r in rows:
            out.append("| " + " | ".join(str(f(r)).replace("|", "\\|") for _, f in cols) + " |")
        out.append("")
    out += ["## How to read this", "", "- Relative errors are max |difference| / max |reference| over the array; "
            "rel L2 is ||difference|| / ||reference||; 'beyond tol' is the fraction of elements past "
            "tolerance x max |reference|.",
            f"- Rounding rule: {report.get('rounding_rule', ROUNDING_RULE)}", "", "Tolerances:", ""]
    tol = report.get("tolerances", {})
    for name, value in tol.get("rules", {}).items():
        out.append(f"- `{name}` = {value:g}: {tol.get('sources', {}).get(name, '')}")
    missing = report.get("missing", {})
    if missing.get("in_reference"):
        out += ["", f"Arrays the {fw['reference']} run lacks: " + ", ".join(f"`{k}`" for k in missing["in_reference"])]
    if missing.get("in_candidate"):
        out += ["", f"Arrays only the {fw['reference']} run has (not compared): {len(missing['in_candidate'])}"]
    out += ["", "## Provenance", "", "```", json.dumps(jsonable({k: report.get(k) for k in (
        "created", "net", "inputs", "provenance")}), indent=1), "```", ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
     color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.badge{display:inline-block;padding:.1em .6em;border-radius:.3em;color:#fff;font-weight:600}
.pass{background:#2e7d32} .fail{background:#c62828}
.verdict{background:#f6f6f6;border-left:4px solid #888;padding:.6em 1em}
.departure{background:#fff4f4;border-left:4px solid #c62828;padding:.6em 1em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.2em .45em;text-align:right;white-space:nowrap}
th{background:#f0f0f0;position:sticky;top:0} td.l,th.l{text-align:left}
tr.bad td{background:#ffebee} tr.dep td{outline:2px solid #c62828}
.small{font-size:.85em;color:#555} img{max-width:100%} pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.8em}
.scroll{overflow-x:auto}
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def render_html(report: dict, png: bytes | None = None) -> str:
    """A self-contained page: inline CSS, the plot as a data: URI, no external reference."""
    fw = report["frameworks"]
    status = "PASS" if report["passed"] else "FAIL"
    title = f"Drift report: {report.get('net', {}).get('name') or 'net'}"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{_esc(title)} <span class=\"badge {status.lower()}\">{status}</span></h1>", "<ul class=\"small\">"]
    for k, v in _summary_lines(report):
        parts.append(f"<li><b>{_esc(k)}</b>: {_esc(v)}</li>")
    parts.append("</ul>")
    parts.append(f"<p class=\"verdict\"><b>{_esc(report.get('summary') or status)}</b> "
                 f"(exit status {report['exit_status']})</p>")
    if report.get("diagnosis"):
        parts.append(f"<p class=\"verdict\"><b>Diagnosis:</b> {_esc(report['diagnosis']['sentence'])}</p>")
    parts.append(f"<p>{_esc(report['verdict'])}</p>")
    dep = report.get("departure")
    parts.append("<h2>Point of departure</h2>")
    if dep:
        parts.append(
            f"<div class=\"departure\"><p><b>{_esc(dep['layer'])}</b> ({_esc(dep['layer_type'])}"
            f"{': ' + _esc(dep['params']) if dep['params'] else ''}), {_esc(dep['direction'])}; first array "
            f"<code>{_esc(dep['key'])}</code>.<br>Beyond float32 rounding: <b>{_esc(', '.join(dep['frameworks']))}"
            f"</b> (error {_esc(_g(dep['error_ratio'], 3))} &times; the bound). Within float32 rounding up to "
            f"there: <b>{_esc(', '.join(dep['within']) or 'none')}</b>.</p><p>{_esc(dep['statement'])}</p></div>")
    else:
        parts.append(f"<p>{_esc(_no_departure_text(report))}</p>")
    for other in report.get("other_departures", []):
        parts.append(f"<p class=\"small\"><b>Third opinion ({_esc(', '.join(other['frameworks']))}).</b> "
                     f"{_esc(other['statement'])}</p>")
    corr = _correspondence(report)
    if corr:
        parts.append(f"<h2>Correspondence: {_esc(fw['reference'])} outputs and {_esc(fw['candidate'])}'s</h2>"
                     f"<table><tr><th class=\"l\">{_esc(fw['reference'])} layer or blob</th><th class=\"l\">"
                     f"{_esc(fw['candidate'])} output</th><th class=\"l\">found by</th></tr>")
        parts += [f"<tr><td class=\"l\">{_esc(a)}</td><td class=\"l\"><code>{_esc(b)}</code></td>"
                  f"<td class=\"l\">{_esc(c)}</td></tr>" for a, b, c in corr[0]]
        parts.append(f"</table><p class=\"small\">Without a counterpart (not compared): "
                     f"{_esc(', '.join(corr[1]) or 'none')}</p>")
    if report.get("flips"):
        parts.append("<h2>Decisions the frameworks take differently</h2><table><tr>"
                     + "".join(f"<th class=\"l\">{h}</th>" for h in (
                         "layer", "type", "flipped", "of", "largest margin (of the blob's max)", "kind")) + "</tr>")
        for f in report["flips"]:
            parts.append(f"<tr><td class=\"l\">{_esc(f['layer'])}</td><td class=\"l\">{_esc(f['layer_type'])}</td>"
                         f"<td>{f['flips']}</td><td>{f['total']}</td><td>{_esc(_g(f['margin_rel']))}</td>"
                         f"<td class=\"l\">{_esc(f['kind'])}</td></tr>")
        parts.append("</table>")
    summary = _framework_summary(report)
    if summary:
        parts.append("<h2>Each framework against float64, layer by layer</h2><table><tr>"
                     + "".join(f"<th class=\"l\">{h}</th>" for h in (
                         "framework", "local checks", "judged", "beyond bound", "first beyond",
                         "worst (error / bound)", "first array off float64 by more than its tolerance"))
                     + "</tr>")
        for s in summary:
            parts.append("<tr>" + "".join(f"<td class=\"l\">{_esc(s[k])}</td>" for k in (
                "framework", "checks", "judged", "beyond", "first_beyond", "worst", "first_off")) + "</tr>")
        parts.append("</table>")
        notes = [f"{s['framework']}, {n}" for s in summary for n in s["notes"]]
        if notes:
            parts.append("<p class=\"small\">Discrete decisions that differ from float64:</p><ul class=\"small\">"
                         + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    if png:
        parts.append("<h2>Error by depth</h2><img alt=\"relative error by layer\" src=\"data:image/png;base64,"
                     + base64.b64encode(png).decode("ascii") + "\">")
    if report.get("top5"):
        ref, cand = fw["reference"], fw["candidate"]
        parts.append("<h2>Top-5 classes</h2>")
        for item in report["top5"]:
            parts.append(f"<p><b>{_esc(item['label'])}</b></p><table><tr><th>rank</th><th class=\"l\">{_esc(ref)}"
                         f"</th><th>score</th><th class=\"l\">{_esc(cand)}</th><th>score</th></tr>")
            for rank, (a, b) in enumerate(zip(item[ref], item[cand]), 1):
                cls = "" if a["class"] == b["class"] else " class=\"bad\""
                parts.append(f"<tr{cls}><td>{rank}</td><td class=\"l\">{_esc(a['name'])}</td><td>{a['score']:.4g}"
                             f"</td><td class=\"l\">{_esc(b['name'])}</td><td>{b['score']:.4g}</td></tr>")
            parts.append("</table>")
    cols = _table_columns(report)
    dep_key = dep["key"] if dep else None
    for kind, title in (("data", "Forward: every blob"), ("diff", "Backward: every gradient")):
        rows = [r for r in _shown_rows(report) if r["kind"] == kind]
        if not rows:
            continue
        parts.append(f"<h2>{title}</h2><div class=\"scroll\"><table><tr>"
                     + "".join(f"<th class=\"l\">{_esc(c)}</th>" if i < 4 else f"<th>{_esc(c)}</th>"
                               for i, (c, _) in enumerate(cols)) + "</tr>")
        for r in rows:
            cls = " ".join(c for c in ("bad" if not r["passed"] else "", "dep" if r["key"] == dep_key else "") if c)
            parts.append(f"<tr class=\"{cls}\" title=\"{_esc(r['key'])}\">" + "".join(
                f"<td class=\"l\">{_esc(f(r))}</td>" if i < 4 else f"<td>{_esc(f(r))}</td>"
                for i, (_, f) in enumerate(cols)) + "</tr>")
        parts.append("</table></div>")
    tol = report.get("tolerances", {})
    parts.append("<h2>How to read this</h2><p class=\"small\">Relative errors are max |difference| / max "
                 "|reference| over the array; rel L2 is ||difference|| / ||reference||; 'beyond tol' is the "
                 "fraction of elements past tolerance &times; max |reference|.</p>"
                 f"<p class=\"small\"><b>Rounding rule.</b> {_esc(report.get('rounding_rule', ROUNDING_RULE))}</p>"
                 "<p class=\"small\"><b>Tolerances.</b></p><ul class=\"small\">"
                 + "".join(f"<li><code>{_esc(k)}</code> = {_esc(_g(v, 3))}: {_esc(tol.get('sources', {}).get(k, ''))}"
                           f"</li>" for k, v in tol.get("rules", {}).items()) + "</ul>")
    parts.append("<h2>Provenance</h2><pre>" + _esc(json.dumps(jsonable({k: report.get(k) for k in (
        "created", "net", "inputs", "provenance", "missing")}), indent=1)) + "</pre></body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# drift-diff
# --------------------------------------------------------------------------------------

@dataclass
class DriftRow:
    """One key of two reports: its max_rel before and after, and whether it moved."""

    key: str
    layer: str
    old: float | None
    new: float | None
    factor: float | None     # new / old, both floored at ``floor``
    old_passed: bool | None
    new_passed: bool | None
    moved: bool
    what: str                # "steady", "worse", "better", "now fails", "now passes", "added", "removed"


def drift_diff(old: dict, new: dict, factor: float = 2.0, floor: float = 2.0 ** -24) -> list[DriftRow]:
    """Compare two reports key by key.

    A key moved when its max_rel changed by more than ``factor`` either way (both values
    floored at ``floor``, default float32's unit roundoff: below it there is nothing to
    tell apart), when it changed pass/fail, or when it appears in only one report.
    """
    if factor <= 1:
        raise PortingError(f"factor must be > 1, got {factor:g}", place="--factor")
    a = {r["key"]: r for r in old["rows"]}
    b = {r["key"]: r for r in new["rows"]}
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        ra, rb = a.get(key), b.get(key)
        layer = (rb or ra)["layer"]
        if ra is None or rb is None:
            out.append(DriftRow(key, layer, _num(ra.get("max_rel")) if ra else None,
                                _num(rb.get("max_rel")) if rb else None, None, ra["passed"] if ra else None,
                                rb["passed"] if rb else None, True, "added" if ra is None else "removed"))
            continue
        va, vb = ra.get("max_rel"), rb.get("max_rel")
        fa = va if isinstance(va, (int, float)) else math.nan
        fb = vb if isinstance(vb, (int, float)) else math.nan
        if math.isnan(fa) or math.isnan(fb):
            ratio = math.nan
        else:
            lo_a, lo_b = max(fa, floor), max(fb, floor)
            ratio = lo_b / lo_a if not math.isinf(lo_a) else (1.0 if math.isinf(lo_b) else 0.0)
        changed_status = ra["passed"] != rb["passed"]
        if math.isnan(fa) and math.isnan(fb):
            moved = changed_status
        elif math.isnan(fa) or math.isnan(fb):
            moved = True
        else:
            moved = changed_status or ratio > factor or ratio < 1 / factor
        if changed_status:
            what = "now passes" if rb["passed"] else "now fails"
        elif not moved:
            what = "steady"
        else:
            what = "worse" if (math.isnan(ratio) or ratio > 1) else "better"
        out.append(DriftRow(key, layer, fa, fb, ratio, ra["passed"], rb["passed"], moved, what))
    return out


def drift_table(rows: list[DriftRow], only_moved: bool = True) -> str:
    """A fixed-width text table of the rows (only those that moved, unless told otherwise)."""
    shown = [r for r in rows if r.moved or not only_moved]
    header = ("key", "old max_rel", "new max_rel", "new/old", "what")
    lines = [header] + [(r.key, _g(r.old, 3), _g(r.new, 3), _g(r.factor, 3), r.what) for r in shown]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    moved = sum(r.moved for r in rows)
    text.append(f"{moved} of {len(rows)} arrays moved" if rows else "no arrays")
    return "\n".join(text)


def _drift_command(args) -> int:
    old, new = load_report(args.old), load_report(args.new)
    rows = drift_diff(old, new, factor=args.factor)
    notes = []
    for part in ("prototxt_sha256", "caffemodel_sha256"):
        x, y = old.get("net", {}).get(part), new.get("net", {}).get(part)
        if x and y and x != y:
            notes.append(f"note: {part} differs between the two reports")
    print("\n".join(notes + [drift_table(rows, only_moved=not args.all)]))
    return 1 if any(r.moved for r in rows) else 0


def add_parser(subparsers) -> None:
    """``porting drift-diff OLD.json NEW.json [--factor F] [--all]``: exit 1 if anything moved."""
    p = subparsers.add_parser("drift-diff", help="which blobs moved between two drift reports",
                              description="Compare two report.json files key by key; exit status 1 when "
                                          "any array moved beyond the factor or changed pass/fail.")
    p.add_argument("old", help="the earlier report.json")
    p.add_argument("new", help="the later report.json")
    p.add_argument("--factor", type=float, default=2.0,
                   help="a max_rel change beyond this factor either way counts as moved (default 2)")
    p.add_argument("--all", action="store_true", help="list every array, not only those that moved")
    p.set_defaults(func=_drift_command)
