"""The trajectory drift report of ``mfv compare``: compare.json and a self-contained compare.html.

JSON (``schema`` = "caffe-port-harness/mfv-compare", ``schema_version`` = 1):
  settings, versions, rounding_rule, verdict (a paragraph), caffe (its records and
  seconds per iteration), runs (per torch run: mode, sync, summary, and one row per
  iteration: both sides' crop, step size, denoising weight, objective, best unit, mean
  |g|, and the difference of the whole image entering the iteration, the gradient, the
  crop after the step and after denoising: max_abs in grey levels, rel_l2, bound),
  attribution (our operations replayed on the Caffe side's inputs), diagnosis, sources
  (the drift-source table: each switched run's final image against the faithful torch
  run's and the Caffe side's: max_abs, rel_l2, SSIM), floor (free-running runs unless
  --no-floor; else null: ``mfv.compare.caffe_floor``: the OpenBLAS kernel paths and thread
  counts of both Caffe runs, caffe_vs_caffe and port_vs_caffe final-image distances (ssim,
  max_abs, mean_abs in grey levels, rel_l2, and the tile standard errors), bitwise_equal,
  the second run's objective per iteration, and the verdict by floor_rule). Non-finite
  numbers are written as the strings "inf", "-inf", "nan".

The HTML page embeds its plots and images as data: URIs and links nothing outside itself.
Images in the page are 8-bit with the 2016 code's truncating cast; the difference images
show max |difference| over the channels, scaled so the largest difference is white.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import platform
from pathlib import Path

import numpy as np

from mfv.compare import FLOOR_RULE, GRADIENT_AGREES, IMAGE_TOLERANCE, Comparison, TorchRun, chaotic, summarize
from mfv.files import _atomic, save_npy, save_npz, truncating_uint8
from porting.report import jsonable

SCHEMA = "caffe-port-harness/mfv-compare"
SCHEMA_VERSION = 1
ROUNDING_RULE = ("A difference is beyond float32 rounding when it exceeds one float32 ulp of the largest "
                 "magnitude of the Caffe side's array (np.spacing(float32(max |x|)); 1.5e-5 grey levels for "
                 "images reaching 128-255 in the net layout, 0-255 minus the mean).")
RUN_COLORS = {"faithful": "#d62728", "modern": "#2ca02c"}


def _host_versions() -> dict:
    import scipy
    import skimage
    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "scikit-image": skimage.__version__, "torch": torch.__version__}


def _g(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if x != x:
        return "nan"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def run_entry(run: TorchRun) -> dict:
    return {"mode": run.mode, "sync": run.sync, "summary": summarize(run), "iterations": run.rows}


def verdict(comparison: Comparison) -> str:
    """A paragraph for people: what matched, where drift begins, which operation departs."""
    parts = []
    ops = comparison.attribution["operations"]
    for name, run in comparison.runs.items():
        s = summarize(run)
        how = "synchronised" if run.sync else "free-running"
        labels = {"crops_identical": "crop offsets", "step_sizes_identical": "step sizes",
                  "denoise_weights_identical": "denoising weights"}
        same = [k for k in labels if s[k]]
        text = (f"{name.capitalize()} torch run ({how}, {s['iterations']} iterations): "
                + (f"{', '.join(labels[k] for k in same)} identical" if same else "no schedule value identical")
                + (f", {', '.join(v for k, v in labels.items() if k not in same)} differ" if len(same) < 3 else "")
                + f"; objective within {_g(s['objective_max_rel'], 2)} relative; after each step within "
                  f"{_g(s['after_step_max_abs'], 2)} grey levels (worst at iteration {s['after_step_worst_iteration']})")
        first = s["first_beyond_rounding"]
        text += (f"; first beyond float32 rounding at iteration {first['iteration']} ({first['array']}, "
                 f"{_g(first['max_abs'], 2)} > {_g(first['bound'], 2)})" if first else "; never beyond float32 rounding")
        over = s["first_beyond_tolerance"]
        text += (f"; first beyond {_g(IMAGE_TOLERANCE)} grey levels at iteration {over['iteration']} "
                 f"({over['array']}, {_g(over['max_abs'], 2)})" if over else
                 f"; never beyond {_g(IMAGE_TOLERANCE)} grey levels")
        if s["first_gradient_departure"] is not None:
            text += f"; the torch gradient first departs from Caffe's at iteration {s['first_gradient_departure']}"
        if run.sync and run.mode == "faithful":
            text += (f"; at the same input the torch gradient departs from Caffe's (relative L2 > {GRADIENT_AGREES:g}: "
                     f"float32 rounding amplified by a flipped max-pooling winner or ReLU sign, or a saturated "
                     f"softmax) in {s['gradient_departures']} of {s['iterations']} iterations, where the "
                     f"crop after the step differs by up to {_g(s['after_step_max_abs_gradient_departs'], 2)} grey "
                     f"levels; elsewhere by at most {_g(s['after_step_max_abs_gradient_agrees'], 2)}")
        if s["final"]:
            text += (f"; final image max |diff| {_g(s['final']['max_abs'], 3)} grey levels, SSIM "
                     f"{s['final']['ssim']:.6f}")
        parts.append(text + ".")
    grad = ops["gradient (framework arithmetic)"]
    exact = [name for name, op in ops.items() if name not in ("gradient (framework arithmetic)", "objective")
             and op["worst"] is not None and op["worst"] <= max(op.get("bound") or 0.0, 0.0)]
    parts.append("Replayed on the Caffe side's own inputs, "
                 + (f"{', '.join(exact)} reproduce it within float32 rounding; " if exact else "")
                 + f"the input gradient (Caffe 1.0 + OpenBLAS vs PyTorch) differs by up to {_g(grad['worst'], 2)} "
                   f"relative L2 ({_g(grad['worst_max_rel'], 2)} of its largest element).")
    if comparison.sources and chaotic(comparison.sources):
        framework = comparison.sources[0]["vs_faithful"]
        parts.append(f"Free-running, the loop is chaotic here: float32 rounding alone (the Caffe side against the "
                     f"faithful torch run) moves the final image by {_g(framework['rel_l2'], 2)} relative L2 "
                     f"(SSIM {framework['ssim']:.3f}), as far as the legacy quirks do; the synchronised per-step "
                     f"costs (--sync) tell the sources apart.")
    floor = comparison.floor
    if floor and floor.get("verdict"):
        k = floor["kernels"]
        parts.append(f"Caffe's own noise floor (the Caffe side again with OpenBLAS's {k['other']['core']} kernels "
                     f"and {k['other']['threads']} thread(s) instead of {k['reference']['core']} and "
                     f"{k['reference']['threads']} thread(s)): " + floor["verdict"]["sentence"])
    diagnosis = comparison.diagnosis
    if diagnosis and diagnosis.get("verdict"):
        notes = "; ".join(diagnosis.get("decision_notes") or []) or "none counted"
        parts.append(f"At iteration {diagnosis['iteration']}, the worst, porting.verify says: {diagnosis['verdict']} "
                     f"Discrete decisions that differ from float64: {notes}.")
    return " ".join(parts)


def build_report(comparison: Comparison) -> dict:
    """The report as one plain dict (see the module docstring)."""
    caffe = comparison.caffe
    return jsonable({
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": comparison.settings,
        "versions": {"torch_side": _host_versions(), **comparison.versions},
        "rounding_rule": ROUNDING_RULE,
        "verdict": verdict(comparison),
        "caffe": {"records": caffe.records, "seconds_per_iteration": caffe.seconds_per_iteration(),
                  "seconds_net": float(np.median([r["seconds_net"] for r in caffe.records])) if caffe.records else None,
                  "seconds_tv": float(np.median([r["seconds_tv"] for r in caffe.records])) if caffe.records else None},
        "runs": {name: run_entry(run) for name, run in comparison.runs.items()},
        "attribution": comparison.attribution,
        "diagnosis": comparison.diagnosis,
        "sources": comparison.sources,
        "floor_rule": FLOOR_RULE,
        "floor": comparison.floor,
    })


def dumps(report: dict) -> str:
    return json.dumps(jsonable(report), indent=1, allow_nan=False)


# --------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------

def _png_bytes(rgb_uint8: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb_uint8).save(buffer, format="PNG")
    return buffer.getvalue()


def difference_image(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """(max |a - b| over channels as a grey RGB uint8 image scaled so the largest is 255, that largest)."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(axis=2)
    top = float(d.max())
    grey = np.zeros(d.shape, np.uint8) if top == 0 else np.round(d / top * 255).astype(np.uint8)
    return np.dstack([grey] * 3), top


def _octave_starts(rows: list[dict]) -> list[int]:
    return [r["iteration"] for r in rows if r.get("i") == 0 and r["iteration"] > 0]


ZERO_FLOOR = 1e-12   # exact zeros are drawn here on the log scales


def plot_trajectories(report: dict) -> bytes:
    """PNG, per iteration: the objective (both sides); max |torch - Caffe| and the relative
    L2 of the whole image entering the iteration (solid) and of the crop after the step
    (dotted); the torch gradient's relative L2 against Caffe's (flipped decisions stand out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    records = report["caffe"]["records"]
    axes[0].plot([r["iteration"] for r in records], [r["objective"] for r in records], color="#1f77b4", lw=2.2,
                 label="Caffe side")

    floor = report.get("floor")
    if floor:
        axes[0].plot([r["iteration"] for r in records], floor["objective"]["other"], "--", color="#9467bd", lw=1.2,
                     label=f"Caffe side, OpenBLAS {floor['kernels']['other']['core']}")

    def series(rows, what, key):
        return [(r["iteration"], max(r[what][key], ZERO_FLOOR)) for r in rows
                if r.get(what) is not None and isinstance(r[what][key], (int, float))]

    for name, run in report["runs"].items():
        rows = run["iterations"]
        color = RUN_COLORS.get(name, "#444444")
        axes[0].plot([r["iteration"] for r in rows], [r["objective"]["torch"] for r in rows], color=color, lw=1,
                     label=f"torch {name}")
        for ax, key in ((axes[1], "max_abs"), (axes[2], "rel_l2")):
            for what, style, label in (("image", "-", "whole image entering"), ("after_step", ":", "crop after step")):
                pts = series(rows, what, key)
                if pts:
                    ax.semilogy(*zip(*pts), style, color=color, lw=1, label=f"{name}: {label}")
        pts = series(rows, "gradient", "rel_l2")
        if pts:
            axes[3].semilogy(*zip(*pts), ".", color=color, ms=3, label=f"{name}")
        first = run["summary"]["first_beyond_rounding"]
        if first:
            for ax in axes[1:3]:
                ax.axvline(first["iteration"], color=color, lw=0.8, ls="--")
    bounds = [r["after_step"]["bound"] for run in report["runs"].values() for r in run["iterations"]
              if r.get("after_step")]
    if bounds:
        axes[1].axhline(max(bounds), color="k", lw=0.8, ls="--", label="float32 rounding (1 ulp)")
    axes[1].axhline(1e-3, color="#888888", lw=0.8, ls="-.", label="1e-3 grey levels")
    axes[3].axhline(GRADIENT_AGREES, color="#888888", lw=0.8, ls="-.",
                    label=f"{GRADIENT_AGREES:g}: above it, at the same input, a max-pooling winner or ReLU sign flipped")
    starts = _octave_starts(next(iter(report["runs"].values()))["iterations"]) if report["runs"] else []
    for ax in axes:
        for start in starts:
            ax.axvline(start, color="#bbbbbb", lw=0.6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("objective")
    axes[1].set_ylabel("max |torch - Caffe| (grey levels)")
    axes[2].set_ylabel("||torch - Caffe|| / ||Caffe||")
    axes[3].set_ylabel("gradient: ||torch - Caffe|| / ||Caffe||")
    axes[3].set_xlabel(f"iteration (grey lines: octave starts; dashed: first beyond float32 rounding; "
                       f"exact zeros drawn at {ZERO_FLOOR:g})")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def final_images(comparison: Comparison) -> list[tuple[str, bytes]]:
    """(caption, PNG) of the Caffe side's final image, each torch run's and their differences."""
    caffe = comparison.caffe.final
    out = [("Caffe side (Python 2.7, Caffe 1.0)", _png_bytes(truncating_uint8(caffe)))]
    for name, run in comparison.runs.items():
        image = run.result.image
        out.append((f"torch {name}", _png_bytes(truncating_uint8(image))))
        if image.shape == caffe.shape:
            diff, top = difference_image(image, caffe)
            s = run.final
            out.append((f"|torch {name} - Caffe| (white = {top:.3g} grey levels; SSIM {s['ssim']:.5f})",
                        _png_bytes(diff)))
    other = comparison.caffe_other
    if other is not None and other.shape == caffe.shape:
        core = comparison.floor["kernels"]["other"]["core"]
        out.append((f"Caffe side again, OpenBLAS {core} (the noise floor)", _png_bytes(truncating_uint8(other))))
        diff, top = difference_image(other, caffe)
        out.append((f"|Caffe ({core}) - Caffe| (white = {top:.3g} grey levels; SSIM "
                    f"{comparison.floor['caffe_vs_caffe']['ssim']:.5f})", _png_bytes(diff)))
    return out


# --------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
     color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.verdict{background:#f6f6f6;border-left:4px solid #888;padding:.6em 1em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.2em .45em;text-align:right;white-space:nowrap}
th{background:#f0f0f0} td.l,th.l{text-align:left;white-space:normal}
tr.bad td{background:#ffebee}
.small{font-size:.85em;color:#555} img{max-width:100%} pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.8em}
figure{display:inline-block;margin:.4em;vertical-align:top;max-width:360px} figcaption{font-size:.8em}
figure img{image-rendering:pixelated;width:340px}
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(headers: list[str], rows: list[list], left: int = 1, bad=None) -> str:
    out = ["<div style=\"overflow-x:auto\"><table><tr>"
           + "".join(f"<th class=\"l\">{_esc(h)}</th>" if i < left else f"<th>{_esc(h)}</th>"
                     for i, h in enumerate(headers)) + "</tr>"]
    for k, row in enumerate(rows):
        cls = " class=\"bad\"" if bad and bad[k] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td class=\"l\">{_esc(_g(v))}</td>" if i < left else
                                          f"<td>{_esc(_g(v))}</td>" for i, v in enumerate(row)) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _d(d: dict | None, key: str):
    return None if d is None else d.get(key)


def render_html(report: dict, plot: bytes | None = None, images: list[tuple[str, bytes]] = ()) -> str:
    """A self-contained page: inline CSS, plots and images as data: URIs."""
    st = report["settings"]
    title = f"MFV trajectory drift: unit {st['unit']} of {st['layer']}, {st['variant']}, seed {st['seed']}"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1><ul class=\"small\">"]
    for key in ("prototxt", "caffemodel", "start", "iterations", "sync", "every"):
        parts.append(f"<li><b>{_esc(key)}</b>: {_esc(st.get(key))}</li>")
    caffe = report["caffe"]
    parts.append(f"<li><b>seconds per iteration</b>: Caffe side {_g(caffe['seconds_per_iteration'])} "
                 f"(Caffe round trip {_g(caffe['seconds_net'])}, TV {_g(caffe['seconds_tv'])}); "
                 + ", ".join(f"torch {n} {_g(r['summary']['seconds_per_iteration'])}" for n, r in report["runs"].items())
                 + " (torch times include the comparison)</li></ul>")
    parts.append(f"<p class=\"verdict\">{_esc(report['verdict'])}</p>")

    parts.append("<h2>Checks per run</h2>")
    names = list(report["runs"])
    checks = [("mode, comparison", lambda s, r: f"{r['mode']}, {'synchronised' if r['sync'] else 'free-running'}"),
              ("iterations", lambda s, r: s["iterations"]),
              ("crop offsets identical", lambda s, r: s["crops_identical"]),
              ("step sizes identical", lambda s, r: s["step_sizes_identical"]),
              ("denoising weights identical", lambda s, r: s["denoise_weights_identical"]),
              ("best unit equal (iterations)", lambda s, r: s["best_units_equal"]),
              ("objective, max relative difference", lambda s, r: s["objective_max_rel"]),
              ("gradient, max relative L2", lambda s, r: s["gradient_max_rel_l2"]),
              ("crop after step, max |diff| (grey levels)", lambda s, r: s["after_step_max_abs"]),
              ("crop after denoising, max |diff|", lambda s, r: s["after_denoise_max_abs"]),
              ("whole image entering an iteration, max |diff|", lambda s, r: s["image_max_abs"]),
              ("first iteration beyond float32 rounding",
               lambda s, r: None if not s["first_beyond_rounding"] else
               f"{s['first_beyond_rounding']['iteration']} ({s['first_beyond_rounding']['array']})"),
              (f"first iteration beyond {_g(IMAGE_TOLERANCE)} grey levels",
               lambda s, r: None if not s["first_beyond_tolerance"] else
               f"{s['first_beyond_tolerance']['iteration']} ({s['first_beyond_tolerance']['array']})"),
              ("first iteration whose gradient departs (a flipped decision)", lambda s, r: s["first_gradient_departure"]),
              ("iterations whose gradient departs", lambda s, r: s["gradient_departures"]),
              ("crop after step, max |diff| where the gradient agrees",
               lambda s, r: s["after_step_max_abs_gradient_agrees"]),
              ("crop after step, max |diff| where it departs", lambda s, r: s["after_step_max_abs_gradient_departs"]),
              ("final image, max |diff|", lambda s, r: _d(s["final"], "max_abs")),
              ("final image, relative L2", lambda s, r: _d(s["final"], "rel_l2")),
              ("final image, SSIM", lambda s, r: _d(s["final"], "ssim"))]
    rows = [[label] + [f(report["runs"][n]["summary"], report["runs"][n]) for n in names] for label, f in checks]
    parts.append(_table(["check"] + [f"torch {n}" for n in names], rows))

    floor = report.get("floor")
    if floor:
        k = floor["kernels"]
        parts.append("<h2>Caffe's own noise floor</h2><p class=\"small\">The Caffe side run a second time with "
                     f"OpenBLAS forced to another kernel path ({_esc(k['other']['core'])}, "
                     f"{_esc(k['other']['threads'])} thread(s); the first run: {_esc(k['reference']['core'])}, "
                     f"{_esc(k['reference']['threads'])} thread(s)). Final images; grey levels 0-255. "
                     f"{_esc(report['floor_rule'])}</p>")
        pairs = [(f"Caffe vs Caffe (other BLAS kernel: {k['other']['core']})", floor["caffe_vs_caffe"]),
                 ("port (faithful) vs Caffe", floor["port_vs_caffe"])]
        parts.append(_table(["pair", "SSIM", "SSIM tile s.e.", "max |diff|", "mean |diff|", "mean tile s.e.",
                             "relative L2"],
                            [[label, None if d is None else f"{d['ssim']:.6f}", _d(d, "ssim_se"), _d(d, "max_abs"), _d(d, "mean_abs"),
                              _d(d, "mean_abs_se"), _d(d, "rel_l2")] for label, d in pairs]))
        parts.append(f"<p class=\"small\">The two Caffe runs are {'bitwise equal' if floor['bitwise_equal'] else 'not bitwise equal'}; "
                     f"their objectives first differ at iteration {_esc(_g(floor['objective']['first_differs']))} "
                     f"(max relative difference {_esc(_g(floor['objective']['max_rel']))}).</p>")
        if floor.get("verdict"):
            parts.append(f"<p class=\"verdict\">{_esc(floor['verdict']['sentence'])}</p>")

    if plot:
        parts.append("<h2>Trajectories</h2><img alt=\"objective and differences per iteration\" src=\""
                     + _uri(plot) + "\">")
    if images:
        parts.append("<h2>Final images</h2><div>" + "".join(
            f"<figure><img alt=\"{_esc(c)}\" src=\"{_uri(p)}\"><figcaption>{_esc(c)}</figcaption></figure>"
            for c, p in images) + "</div>")

    attribution = report["attribution"]
    parts.append("<h2>Which operation departs</h2><p class=\"small\">Our operations replayed on the Caffe "
                 "side's own inputs at every k-th iteration: the gradient (torch at Caffe's input crop), the "
                 "step (our faithful normalise/step/clip on Caffe's gradient), TV (our 0.13.1 algorithm on "
                 "Caffe's stepped crop) and the zoom (on Caffe's image at each octave change).</p>")
    parts.append(_table(["operation", "measure", "worst"],
                        [[k, v["measure"], v["worst"]] for k, v in attribution["operations"].items()], left=2))
    parts.append(_table(["iteration", "objective rel", "gradient rel L2", "gradient max rel", "step max |diff|",
                         "TV max |diff|"],
                        [[r["iteration"], r["objective_rel"], r["gradient"]["rel_l2"], r["gradient"]["max_rel"],
                          r["step"]["max_abs"], r["tv"]["max_abs"]] for r in attribution["iterations"]]))
    diagnosis = report.get("diagnosis")
    if diagnosis:
        parts.append(f"<p><b>Diagnosis at iteration {_esc(diagnosis['iteration'])}</b> (porting.verify, Caffe "
                     f"vs port vs float64): {_esc(diagnosis.get('verdict') or diagnosis.get('note'))}</p>")
        if diagnosis.get("decision_notes"):
            parts.append("<ul class=\"small\">" + "".join(f"<li>{_esc(n)}</li>" for n in diagnosis["decision_notes"])
                         + "</ul>")

    if report.get("sources"):
        how = "synchronised" if st.get("sync") else "free-running"
        parts.append(f"<h2>Sources of drift, one at a time ({how})</h2><p class=\"small\">Each row switches one "
                     "source in an otherwise faithful torch run; the first row is the framework arithmetic itself "
                     "(the faithful torch run against the Caffe side). Per step (synchronised runs only): max |diff| "
                     "of the whole image after one step from the Caffe side's image, median and max over the "
                     "iterations. Final: the final image against the faithful torch run's and the Caffe side's. "
                     "Free-running, a single flipped decision sends the trajectory elsewhere, so after many "
                     "iterations every source moves the final image about as far as any other.</p>")
        parts.append(_table(
            ["source", "what is switched", "per step: median max |diff|", "per step: max", "final: max |diff| vs "
             "faithful", "rel L2 vs faithful", "SSIM vs faithful", "max |diff| vs Caffe", "SSIM vs Caffe"],
            [[s["source"], s["description"], _d(s.get("per_step"), "median"), _d(s.get("per_step"), "max"),
              _d(s["vs_faithful"], "max_abs"), _d(s["vs_faithful"], "rel_l2"), _d(s["vs_faithful"], "ssim"),
              _d(s["vs_caffe"], "max_abs"), _d(s["vs_caffe"], "ssim")] for s in report["sources"]], left=2))

    for name, run in report["runs"].items():
        rows = run["iterations"]
        parts.append(f"<details><summary>Every iteration, torch {_esc(name)}</summary>")
        parts.append(_table(
            ["iteration", "octave", "crop Caffe", "crop torch", "step", "weight", "objective Caffe",
             "objective torch", "rel", "best Caffe", "best torch", "image max", "gradient rel L2",
             "after step max", "after TV max"],
            [[r["iteration"], r["octave"], str(r["crop"]["caffe"]), str(r["crop"]["torch"]),
              f"{_g(r['step_size']['caffe'])} / {_g(r['step_size']['torch'])}",
              f"{_g(r['denoise_weight']['caffe'])} / {_g(r['denoise_weight']['torch'])}",
              r["objective"]["caffe"], r["objective"]["torch"], r["objective"]["rel"], r["best_unit"]["caffe"],
              r["best_unit"]["torch"], _d(r.get("image"), "max_abs"), _d(r.get("gradient"), "rel_l2"),
              _d(r.get("after_step"), "max_abs"), _d(r.get("after_denoise"), "max_abs")] for r in rows],
            left=1, bad=[r["crop"]["caffe"] != r["crop"]["torch"] or r["step_size"]["caffe"] != r["step_size"]["torch"]
                         for r in rows]))
        parts.append("</details>")
    parts.append(f"<h2>How to read this</h2><p class=\"small\">{_esc(report['rounding_rule'])} Grey levels: the "
                 "net layout's units (BGR 0-255 minus the mean). Synchronised: every torch step starts from the "
                 "Caffe side's whole image of the same iteration (its own crop draw), so each row is one step's "
                 "discrepancy; free-running: each side alone, so differences accumulate.</p>")
    parts.append("<h2>Provenance</h2><pre>" + _esc(json.dumps(jsonable(
        {k: report.get(k) for k in ("created", "settings", "versions")}), indent=1)) + "</pre></body></html>")
    return "\n".join(parts)


def write_report(comparison: Comparison, folder) -> dict[str, Path]:
    """Write compare.json, compare.html, trajectories.png, the final images (.npy, float32
    RGB 0-255; caffe_other_final.npy: the noise floor's second Caffe run) and snapshots.npz
    (both sides' arrays every k iterations, keyed
    "<iteration>/caffe/<what>" and "<iteration>/torch_<run>/<what>", net layout float32)
    into ``folder``, each whole or not at all. Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = build_report(comparison)
    plot = plot_trajectories(report)
    images = final_images(comparison)
    text = render_html(report, plot, images)
    paths = {
        "json": _atomic(folder / "compare.json", lambda tmp: Path(tmp).write_text(dumps(report) + "\n")),
        "html": _atomic(folder / "compare.html", lambda tmp: Path(tmp).write_text(text, encoding="utf-8")),
        "plot": _atomic(folder / "trajectories.png", lambda tmp: Path(tmp).write_bytes(plot)),
        "caffe_final": save_npy(folder / "caffe_final.npy", comparison.caffe.final.astype(np.float32)),
    }
    if comparison.caffe_other is not None:
        paths["caffe_other_final"] = save_npy(folder / "caffe_other_final.npy",
                                              comparison.caffe_other.astype(np.float32))
    for name, run in comparison.runs.items():
        key = name.replace(" ", "_")
        paths[f"torch_{key}_final"] = save_npy(folder / f"torch_{key}_final.npy", run.result.image.astype(np.float32))
    arrays = {f"{n:04d}/caffe/{what}": value for n, snap in comparison.caffe_snapshots.items()
              for what, value in snap.items()}
    for name, run in comparison.runs.items():
        for snap in run.result.snapshots:
            for what in ("input", "gradient", "after_step", "after_denoise"):
                arrays[f"{snap.iteration:04d}/torch_{name.replace(' ', '_')}/{what}"] = getattr(snap, what)
    if arrays:
        paths["snapshots"] = save_npz(folder / "snapshots.npz", **arrays)
    return paths
