"""MFV on real Caffe 1.0 in the 2016 stack next to the PyTorch port, iteration by iteration.

The Caffe side is ``reference/mfv_legacy.py``: the authors' loop transcribed for Python
2.7 with numpy 1.11.0, scipy 0.17.0 and scikit-image 0.13.1, the net on Caffe 1.0,
running in the legacy worker. ``run_caffe_side`` runs it once and streams its iterations
back in chunks; each iteration's arrays (the whole image entering it, the masked
gradient, the crop after the step and after denoising: float32, net layout) are kept as
.npy files in a folder (``CaffeRun``), one iteration in memory at a time. The mean-image
schedule (370 iterations, images 3 x 227 x 227 then 3 x 272 x 272) takes about 0.9 GB
there; the folder is temporary unless the caller names one.

Each PyTorch run (``compare_torch_side``) is ``mfv.loop.run_facet`` with hooks:
free-running (each side alone: drift accumulates) or synchronised (every torch step
starts from the Caffe side's whole image of the same iteration, crops drawn by the torch
side itself, so each step's own discrepancy is measured). Per iteration it records both
sides' crop offsets, step size, denoising weight, objective, best unit and mean |g|,
and the difference of the arrays: the whole image entering the iteration, the gradient,
the crop after the step and after denoising (max |difference| in grey levels, the net
layout being 0-255 minus the mean; relative L2 against the Caffe side).

``attribute_operations`` replays single operations of ours on the Caffe side's own
inputs (our step on Caffe's gradient, our TV on Caffe's stepped crop, our zoom on
Caffe's image, torch's gradient at Caffe's input), which names the operations that
cannot be matched and by how much. ``drift_sources`` runs the torch side with one
source of drift switched at a time and measures each one's effect: per step when
synchronised, on the final image always. Free-running, the loop is chaotic: a single
flipped max-pooling winner sends the trajectory elsewhere, and after a few hundred
iterations every source moves the final image about as far as any other (``chaotic``);
the synchronised per-step costs are what tells the sources apart.
``caffe_floor`` measures Caffe's own noise floor: free-running, the Caffe side again in a
fresh worker with OpenBLAS forced to a kernel path on the other side of fused multiply-add
(OPENBLAS_CORETYPE) and another thread count, its final image against the first run's
beside the port's (``distance``: SSIM, max and mean |diff| in grey levels), judged by
FLOOR_RULE (``floor_verdict``).
``compare_facet`` does all of it and returns the report (``mfv.report`` writes it).

"Beyond float32 rounding": a difference larger than one float32 ulp of the reference
array's largest magnitude (``rounding_bound``; 1.5e-5 grey levels for images reaching
128-255 in the net layout).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from mfv import schedule, tv
from mfv.loop import FacetResult, IterationRecord, Snapshot, Swap, run_facet
from mfv.step import FacetNet, apply_step, gradient_step
from mfv.zoom import zoom_octave

ARRAYS = ("image", "gradient", "after_step", "after_denoise")   # fetched from the Caffe side per iteration
IMAGE_ARRAYS = ("image", "after_step", "after_denoise")          # the ones in grey levels

# The bounds the issue sets: an image after one step, in grey levels; the objective, relative.
IMAGE_TOLERANCE = 1e-3
OBJECTIVE_TOLERANCE = 1e-4
# The torch gradient at the Caffe side's input, relative L2 against Caffe's (CaffeNet,
# Caffe's Xavier weights, unit 498, synchronised): mean-image schedule from mean_0, at most
# 1.1e-6 in the 272 of 370 iterations where both take the same discrete decisions and at
# least 4.9e-5 where a max-pooling winner or a ReLU sign flips (porting.verify counts
# them); centre-bias schedule, at most 8.3e-6 and at least 1.1e-5 (its prob objective's
# gradient is ill-conditioned when the softmax saturates). GRADIENT_AGREES lies in the gaps.
GRADIENT_AGREES = 1e-5


# --------------------------------------------------------------------------------------
# measures
# --------------------------------------------------------------------------------------

def difference(candidate: np.ndarray, reference: np.ndarray) -> dict:
    """{"max_abs", "rel_l2", "bound"} of ``candidate - reference`` in float64.

    max_abs: max |difference| (grey levels for images); rel_l2: ||difference|| /
    ||reference|| (0 when both are zero, inf when only the reference is); bound: one
    float32 ulp of max |reference| (``rounding_bound``)."""
    c = np.asarray(candidate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if c.shape != r.shape:
        raise ValueError(f"shapes differ: {c.shape} vs {r.shape}")
    d = c - r
    norm = float(np.sqrt(np.sum(r * r)))
    off = float(np.sqrt(np.sum(d * d)))
    rel = off / norm if norm else (0.0 if off == 0 else float("inf"))
    return {"max_abs": float(np.abs(d).max()) if d.size else 0.0, "rel_l2": rel, "bound": rounding_bound(r)}


def rounding_bound(reference: np.ndarray) -> float:
    """One float32 ulp at the largest magnitude of ``reference`` (np.spacing of float32)."""
    top = float(np.abs(reference).max()) if np.size(reference) else 0.0
    return float(np.spacing(np.float32(top)))


def ssim(candidate_rgb: np.ndarray, reference_rgb: np.ndarray) -> float:
    """SSIM (scikit-image defaults: 7 x 7 uniform window; data range 255) of two RGB 0-255 images."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(np.asarray(candidate_rgb, np.float64), np.asarray(reference_rgb, np.float64),
                                       channel_axis=2, data_range=255.0))


def final_difference(candidate_rgb: np.ndarray, reference_rgb: np.ndarray) -> dict:
    """difference() of two final RGB images plus their SSIM."""
    out = difference(candidate_rgb, reference_rgb)
    out["ssim"] = ssim(candidate_rgb, reference_rgb)
    return out


# --------------------------------------------------------------------------------------
# the Caffe side
# --------------------------------------------------------------------------------------

AUTHORS_TABLES = {"mean": schedule.MEAN_OCTAVES, "center-bias": schedule.CENTER_BIAS_OCTAVES}


def variant_of(octaves) -> str | None:
    """The name of ``octaves`` when it is one of the authors' tables (the Python 2 side
    keeps its own transcription of those); None for any other table."""
    return next((name for name, table in AUTHORS_TABLES.items() if tuple(table) == tuple(octaves)), None)


def octave_dicts(octaves, input_size=(227, 227)) -> list[dict]:
    """Octaves in the original's dict form (numbers keep their int or float type), margins
    as the loop takes them for a net of ``input_size`` (``schedule.margin_for``)."""
    out = []
    for o in octaves:
        d = {"margin": schedule.margin_for(o, input_size), "window": o.window, "iter_n": o.iter_n,
             "start_denoise_weight": o.start_denoise_weight, "end_denoise_weight": o.end_denoise_weight,
             "start_step_size": o.start_step_size, "end_step_size": o.end_step_size}
        if o.layer is not None:
            d["layer"] = o.layer
        if o.scale is not None:
            d["scale"] = o.scale
        out.append(d)
    return out


@dataclass
class CaffeRun:
    """The Caffe side's run: its records (dicts, one per iteration), final image (RGB 0-255,
    H x W x 3 float32), start image, and each iteration's arrays in ``folder``."""
    unit: int
    seed: int
    octaves: tuple
    layer: str
    xy: int
    start: np.ndarray | None          # the RGB start image handed to both sides (None: noise)
    folder: Path
    records: list = field(default_factory=list)
    final: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)
    owns_folder: bool = False
    input_size: tuple = (227, 227)    # the net's (rows, cols): the octaves' margins scale to it

    def array(self, iteration: int, name: str) -> np.ndarray:
        """Array ``name`` (of ``ARRAYS``, or "input": the crop, cut from "image") of ``iteration``."""
        if name == "input":
            image = self.array(iteration, "image")
            (row, col), (h, w) = self.records[iteration]["crop"], self.array(iteration, "after_step").shape[1:]
            return image[:, row:row + h, col:col + w].copy()
        return np.load(self.folder / f"{iteration:04d}_{name}.npy", allow_pickle=False)

    def truncated(self, iterations: int) -> "CaffeRun":
        """The same run seen as if it had stopped after ``iterations`` (the 2016 loop is
        deterministic, so its first iterations are those of a shorter run): records cut, final
        image rebuilt from the last iteration's image and denoised crop, before any zoom."""
        if not 0 < iterations <= len(self.records):
            raise ValueError(f"iterations must be 1..{len(self.records)}, not {iterations}")
        if iterations == len(self.records):
            return self
        last = iterations - 1
        image = self.array(last, "image")
        (row, col), (h, w) = self.records[last]["crop"], self.array(last, "after_denoise").shape[1:]
        image[:, row:row + h, col:col + w] = self.array(last, "after_denoise")
        mean = np.asarray(self.provenance.get("mean", (104.0, 117.0, 123.0)), np.float32).reshape(3, 1, 1)
        final = np.dstack((image + mean)[::-1])   # the 2016 deprocess: BGR net layout -> RGB
        return CaffeRun(self.unit, self.seed, self.octaves, self.layer, self.xy, self.start, self.folder,
                        self.records[:iterations], final, self.provenance, owns_folder=False,
                        input_size=self.input_size)

    def seconds_per_iteration(self) -> float:
        """Median seconds of one iteration on the Caffe side (Caffe round trip, numpy, TV)."""
        return float(np.median([r["seconds"] for r in self.records])) if self.records else float("nan")

    def cleanup(self) -> None:
        if self.owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def run_caffe_side(worker, prototxt, caffemodel, unit: int, seed: int, octaves=schedule.MEAN_OCTAVES,
                   start: np.ndarray | None = None, layer: str = "fc8", xy: int = 0,
                   mean=(104.0, 117.0, 123.0), iterations: int | None = None, folder=None, chunk: int = 10,
                   progress: bool = True, *, input_size: tuple[int, int]) -> CaffeRun:
    """Run the Caffe side (reference/mfv_legacy.py) in ``worker`` (a porting.legacy.Worker).

    start: RGB 0-255 start image (H x W x 3), or None for the seeded noise image. The
    authors' tables go by name (the Python 2 side keeps its own transcription of them);
    other tables, and any table for a net whose input side is not 227 (``input_size``, which
    scales the margins as the port's loop does), travel as the original's dicts. folder: where the per-iteration arrays
    go (default: a temporary folder, removed by ``cleanup()``)."""
    owns = folder is None
    folder = Path(tempfile.mkdtemp(prefix="mfv-caffe-")) if owns else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run = CaffeRun(unit, seed, tuple(octaves), layer, xy, None if start is None else np.asarray(start), folder,
                   owns_folder=owns, input_size=tuple(input_size))
    scaled = any(schedule.margin_for(o, input_size) != o.margin for o in octaves)
    variant = None if scaled else variant_of(octaves)
    args = dict(prototxt=Path(prototxt), unit=int(unit), seed=int(seed), layer=layer, xy=int(xy),
                mean=[float(m) for m in mean], iterations=iterations)
    if caffemodel is not None:
        args["caffemodel"] = Path(caffemodel)
    if variant is not None:
        args["variant"] = variant
    else:
        args["octaves"] = octave_dicts(octaves, input_size)
    if start is not None:
        args["start_image"] = np.ascontiguousarray(start)
    try:
        begun = worker.py2("mfv_legacy.start", **args)
        run.provenance = dict(begun.provenance, mean=[float(m) for m in mean])
        bar = tqdm(total=begun["total"], disable=not progress, unit="it", desc=f"Caffe side, unit {unit}")
        try:
            done = False
            while not done:
                got = worker.py2("mfv_legacy.advance", run=begun["run"], count=int(chunk), every=1,
                                 fetch=list(ARRAYS))
                for record in got["records"]:
                    n = record["iteration"]
                    for name in ARRAYS:
                        np.save(folder / f"{n:04d}_{name}.npy", got[f"{n:04d}/{name}"])
                    run.records.append(record)
                    bar.set_postfix(obj=f"{record['objective']:.2f}", best=record["best_unit"], refresh=False)
                    bar.update(1)
                done = bool(got["done"])
                if done:
                    run.final = np.asarray(got["final"], dtype=np.float32)
                elif not got["records"]:
                    raise RuntimeError("the Caffe side made no progress")
        finally:
            bar.close()
    except BaseException:
        run.cleanup()
        raise
    return run


# --------------------------------------------------------------------------------------
# the PyTorch side against it
# --------------------------------------------------------------------------------------

@dataclass
class TorchRun:
    """One PyTorch run compared with a CaffeRun: per-iteration rows and the final image."""
    name: str
    mode: str
    sync: bool
    rows: list
    result: FacetResult
    final: dict                       # final_difference(torch final, Caffe final)
    seconds: float                    # wall time of the whole run (comparisons included)


def _side_by_side(record: IterationRecord, caffe: dict) -> dict:
    objective_rel = abs(record.objective - caffe["objective"]) / abs(caffe["objective"]) if caffe["objective"] else (
        0.0 if record.objective == 0 else float("inf"))
    return {
        "iteration": record.iteration, "octave": record.octave, "i": record.i, "layer": record.layer,
        "image_shape": list(record.image_shape),
        "crop": {"caffe": list(caffe["crop"]), "torch": list(record.crop)},
        "step_size": {"caffe": caffe["step_size"], "torch": record.step_size},
        "denoise_weight": {"caffe": caffe["denoise_weight"], "torch": record.denoise_weight},
        "objective": {"caffe": caffe["objective"], "torch": record.objective, "rel": objective_rel},
        "best_unit": {"caffe": caffe["best_unit"], "torch": record.best_unit},
        "mean_abs_gradient": {"caffe": caffe["mean_abs_gradient"], "torch": record.mean_abs_gradient},
    }


def compare_torch_side(net: FacetNet, caffe: CaffeRun, mode: str = "faithful", sync: bool = False,
                       swap: Swap | None = None, name: str | None = None, progress: bool = True,
                       snapshot_every: int = 0) -> TorchRun:
    """Run the torch side as ``caffe`` ran (same unit, seed, octaves, start, iterations) and
    compare every iteration. sync: each iteration starts from the Caffe side's whole image.
    snapshot_every: keep the torch arrays every k iterations, the first and the last
    (``result.snapshots``; 0: none)."""
    rows: dict[int, dict] = {}

    def start_from(iteration: int, image: np.ndarray):
        if iteration >= len(caffe.records):
            return None
        theirs = caffe.array(iteration, "image")
        rows[iteration] = {"image": difference(image, theirs) if image.shape == theirs.shape else None}
        return theirs if sync else None

    def observe(record: IterationRecord, snap: Snapshot):
        theirs = caffe.records[record.iteration]
        row = rows.setdefault(record.iteration, {"image": None})
        row.update(_side_by_side(record, theirs))
        same_crop = tuple(record.crop) == tuple(theirs["crop"])
        for what in ("gradient", "after_step", "after_denoise"):
            row[what] = difference(getattr(snap, what), caffe.array(record.iteration, what)) if same_crop else None

    began = time.perf_counter()
    result = run_facet(net, caffe.unit, caffe.seed, caffe.octaves, start=caffe.start, layer=caffe.layer, xy=caffe.xy,
                       mode=mode, snapshot_every=snapshot_every, progress=progress, iterations=len(caffe.records),
                       swap=swap,
                       start_from=start_from, observe=observe)
    seconds = time.perf_counter() - began
    ordered = [rows[k] for k in sorted(rows)]
    final = final_difference(result.image, caffe.final) if result.image.shape == caffe.final.shape else None
    return TorchRun(name or mode, mode, sync, ordered, result, final, seconds)


def first_beyond(rows: list[dict], tolerance: float | None = None) -> dict | None:
    """The first iteration (and array) whose image difference exceeds ``tolerance`` grey
    levels, or float32 rounding (each array's ``bound``) when tolerance is None."""
    for row in rows:
        for what in IMAGE_ARRAYS:
            d = row.get(what)
            if d is None:
                continue
            limit = d["bound"] if tolerance is None else tolerance
            if d["max_abs"] > limit:
                return {"iteration": row["iteration"], "array": what, "max_abs": d["max_abs"], "bound": limit}
    return None


def first_beyond_rounding(rows: list[dict]) -> dict | None:
    """The first iteration (and array) whose image difference exceeds float32 rounding."""
    return first_beyond(rows, None)


def summarize(run: TorchRun) -> dict:
    """Checks over all iterations of one torch run against the Caffe side."""
    rows = run.rows

    def worst(what, key="max_abs"):
        values = [r[what][key] for r in rows if r.get(what) is not None]
        return max(values) if values else None

    def argworst(what, key="max_abs"):
        best = max((r for r in rows if r.get(what) is not None), key=lambda r: r[what][key], default=None)
        return None if best is None else best["iteration"]

    def split(what):
        departs = [r for r in rows if r.get("gradient") is not None and r["gradient"]["rel_l2"] > GRADIENT_AGREES
                   and r.get(what) is not None]
        agrees = [r for r in rows if r.get("gradient") is not None and r["gradient"]["rel_l2"] <= GRADIENT_AGREES
                  and r.get(what) is not None]
        return (max((r[what]["max_abs"] for r in agrees), default=None),
                max((r[what]["max_abs"] for r in departs), default=None))

    return {
        "iterations": len(rows),
        "gradient_departures": sum(1 for r in rows if r.get("gradient") is not None
                                   and r["gradient"]["rel_l2"] > GRADIENT_AGREES),
        "after_step_max_abs_gradient_agrees": split("after_step")[0],
        "after_step_max_abs_gradient_departs": split("after_step")[1],
        "crops_identical": all(r["crop"]["caffe"] == r["crop"]["torch"] for r in rows),
        "step_sizes_identical": all(r["step_size"]["caffe"] == r["step_size"]["torch"] for r in rows),
        "denoise_weights_identical": all(r["denoise_weight"]["caffe"] == r["denoise_weight"]["torch"] for r in rows),
        "objective_max_rel": max((r["objective"]["rel"] for r in rows), default=None),
        "best_units_equal": sum(r["best_unit"]["caffe"] == r["best_unit"]["torch"] for r in rows),
        "image_max_abs": worst("image"), "image_max_rel_l2": worst("image", "rel_l2"),
        "gradient_max_rel_l2": worst("gradient", "rel_l2"),
        "after_step_max_abs": worst("after_step"), "after_step_worst_iteration": argworst("after_step"),
        "after_denoise_max_abs": worst("after_denoise"), "after_denoise_worst_iteration": argworst("after_denoise"),
        "first_beyond_rounding": first_beyond_rounding(rows),
        "first_beyond_tolerance": first_beyond(rows, IMAGE_TOLERANCE),
        "first_gradient_departure": next((r["iteration"] for r in rows if r.get("gradient") is not None
                                          and r["gradient"]["rel_l2"] > GRADIENT_AGREES), None),
        "final": run.final,
        "seconds_per_iteration": run.seconds / max(len(rows), 1),
    }


# --------------------------------------------------------------------------------------
# which operation departs
# --------------------------------------------------------------------------------------

def sampled(total: int, every: int) -> list[int]:
    """Iterations 0, every, 2 every, ... and the last (all of them when every <= 1)."""
    if total <= 0:
        return []
    every = max(int(every), 1)
    return sorted(set(range(0, total, every)) | {total - 1})


def attribute_operations(net: FacetNet, caffe: CaffeRun, every: int = 10, iterations=None) -> dict:
    """Our operations replayed on the Caffe side's own inputs.

    At every iteration, step: ``apply_step`` (faithful) on Caffe's input crop and gradient
    vs Caffe's stepped crop (cheap). At sampled iterations (every ``every``, the first and
    the last; ``iterations``, a list, replaces the sample), gradient: torch's gradient at
    Caffe's input crop vs Caffe's (relative L2, and max |difference| / max |Caffe's|) and
    the objective; tv: faithful TV of Caffe's stepped crop vs Caffe's denoised crop. Zoom
    (every octave with a scale): ``zoom_octave`` of Caffe's image after the octave before vs
    the image Caffe's next octave starts from. Returns {"iterations": [...], "steps":
    [max |difference| per iteration], "zoom": [...], "operations": per-operation worst}."""
    prep = net.preprocessing
    lo, hi = prep.bounds()
    steps = []
    for n, record in enumerate(caffe.records):
        step, _ = apply_step(caffe.array(n, "input"), caffe.array(n, "gradient"), record["step_size"], lo, hi,
                             "faithful")
        steps.append(difference(step, caffe.array(n, "after_step")))
    rows = []
    for n in sampled(len(caffe.records), every) if iterations is None else sorted(set(iterations)):
        record = caffe.records[n]
        octave = caffe.octaves[record["octave"]]
        x = caffe.array(n, "input")
        g_caffe = caffe.array(n, "gradient")
        stepped_caffe = caffe.array(n, "after_step")
        ours = gradient_step(net, x, record["layer"], caffe.unit, record["step_size"], margin=schedule.margin_for(octave, prep.input_size),
                             xy=caffe.xy, mode="faithful")
        g_diff = difference(ours.gradient, g_caffe)
        g_top = float(np.abs(g_caffe).max()) or 1.0
        rgb = prep.from_net(stepped_caffe).astype(np.float64)
        denoised = prep.to_net(tv.denoise(rgb, record["denoise_weight"], mode="faithful"))
        rows.append({
            "iteration": n,
            "objective_rel": abs(ours.objective - record["objective"]) / (abs(record["objective"]) or 1.0),
            "gradient": {"rel_l2": g_diff["rel_l2"], "max_rel": g_diff["max_abs"] / g_top},
            "step": steps[n],
            "tv": difference(denoised, caffe.array(n, "after_denoise")),
        })
    zooms = []
    for n, record in enumerate(caffe.records):
        if n == 0 or record["i"] != 0 or caffe.octaves[record["octave"]].scale is None:
            continue
        before = caffe.records[n - 1]
        image = caffe.array(n - 1, "image")
        (row, col), (h, w) = before["crop"], prep.input_size
        image[:, row:row + h, col:col + w] = caffe.array(n - 1, "after_denoise")
        zooms.append({"iteration": n, "octave": record["octave"], "scale": caffe.octaves[record["octave"]].scale,
                      **difference(zoom_octave(image, caffe.octaves[record["octave"]].scale),
                                   caffe.array(n, "image"))})

    def worst(key, sub):
        values = [r[key][sub] for r in rows]
        return max(values) if values else None

    operations = {
        "gradient (framework arithmetic)": {"measure": "relative L2 of the input gradient",
                                            "worst": worst("gradient", "rel_l2"),
                                            "worst_max_rel": worst("gradient", "max_rel")},
        "step (normalise, step, clip)": {"measure": "max |difference|, grey levels, every iteration",
                                         "worst": max((d["max_abs"] for d in steps), default=None),
                                         "bound": max((d["bound"] for d in steps), default=None)},
        "tv (split Bregman, 0.13.1)": {"measure": "max |difference|, grey levels", "worst": worst("tv", "max_abs"),
                                       "bound": worst("tv", "bound")},
        "zoom (scipy cubic spline)": {"measure": "max |difference|, grey levels",
                                      "worst": max((z["max_abs"] for z in zooms), default=None),
                                      "bound": max((z["bound"] for z in zooms), default=None)},
        "objective": {"measure": "relative difference", "worst": max((r["objective_rel"] for r in rows), default=None)},
    }
    return {"iterations": rows, "steps": [d["max_abs"] for d in steps], "zoom": zooms, "operations": operations}


def worst_gradient_iteration(attribution: dict) -> int | None:
    """The replayed iteration whose torch gradient is furthest from Caffe's, if beyond GRADIENT_AGREES."""
    rows = [r for r in attribution["iterations"] if r["gradient"]["rel_l2"] > GRADIENT_AGREES]
    return max(rows, key=lambda r: r["gradient"]["rel_l2"])["iteration"] if rows else None


def diagnose_gradient(worker, prototxt, caffemodel, caffe: CaffeRun, iteration: int, module=None) -> dict:
    """Where the torch gradient leaves Caffe's at ``iteration``: ``porting.verify`` on the
    Caffe side's input crop, layer by layer against float64 (the flipped max-pooling
    winners and ReLU signs behind it). The objective must be a 2-D blob (fc layers)."""
    import torch

    from porting.net import load_caffe
    from porting.verify import Objective, verify_port

    record = caffe.records[iteration]
    module = module if module is not None else load_caffe(prototxt, caffemodel)
    blob = record["layer"]
    x = caffe.array(iteration, "input")[None]
    input_name = next(iter(module.graph.inputs))
    with torch.no_grad():
        shape = tuple(module(torch.from_numpy(x), end=blob)[blob].shape)
    if len(shape) != 2:
        return {"iteration": iteration, "layer": blob, "verdict": None,
                "note": "not diagnosed: the objective is a conv blob (porting.verify seeds its centre, MFV its xy)"}
    objective = Objective(blob, caffe.unit, blob)
    reference = worker.run_net(prototxt, caffemodel, inputs={input_name: x}, top_diffs={blob: objective.seed(shape)})
    verification, _ = verify_port(module, reference, {input_name: x}, objective, names=("caffe", "port"))
    notes = [f"{c.framework}, {c.direction} {c.layer}: {c.note}" for c in verification.checks if c.note]
    departure = verification.departure
    return {"iteration": iteration, "layer": blob, "verdict": verification.verdict, "decision_notes": notes,
            "flips": [f.describe() for f in verification.flips],
            "departure": None if departure is None else {"layer": departure.layer, "direction": departure.direction,
                                                         "frameworks": departure.frameworks,
                                                         "statement": departure.statement}}


# --------------------------------------------------------------------------------------
# sources of drift, one at a time
# --------------------------------------------------------------------------------------

def _tv_edge_padding(rgb: np.ndarray, weight) -> np.ndarray:
    return tv.denoise_tv_bregman_0131(rgb, weight, max_iter=100, eps=1e-3, padding="edge")


def _tv_today(rgb: np.ndarray, weight) -> np.ndarray:
    return tv.denoise_tv_bregman_modern(rgb, weight, max_iter=100, eps=1e-3)


def torch_bicubic_zoom(image: np.ndarray, scale: float) -> np.ndarray:
    """What a PyTorch port would likely write for the octave zoom: ``interpolate`` bicubic,
    align_corners=False, to the same size as scipy's zoom (round(H * scale))."""
    import torch

    rows, cols = image.shape[1:]
    size = (int(round(rows * scale)), int(round(cols * scale)))
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(t, size=size, mode="bicubic", align_corners=False)[0].numpy()


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    swap: Swap | None = None          # None: not a torch-side switch


SOURCES = (
    Source("framework arithmetic", "Caffe 1.0 + OpenBLAS in the 2016 stack vs the PyTorch port (both faithful)"),
    Source("Python 2 step size", "schedules with Python 3's true division instead of Python 2's integer '/'",
           Swap(arithmetic="py3")),
    Source("step casting", "step factor step/mean|g| in float32 (today's numpy) instead of float64 (numpy 1.11)",
           Swap(step_mode="modern")),
    Source("TV padding", "TV's padding ring holds the edge row/column (scikit-image >= 0.15), not 0.13.1's mirror",
           Swap(denoise=_tv_edge_padding)),
    Source("TV today", "today's compiled scikit-image denoise_tv_bregman (padding and its own sums)",
           Swap(denoise=_tv_today)),
    Source("zoom", "torch bicubic interpolate (align_corners=False) instead of scipy's corner-aligned cubic spline",
           Swap(zoom=torch_bicubic_zoom)),
    Source("random stream", "numpy's default_rng (PCG64) instead of the legacy RandomState (MT19937) for noise "
                            "and crops", Swap(rng=np.random.default_rng)),
)


def per_step(run: TorchRun) -> dict | None:
    """A synchronised run's one-step discrepancy: max |difference| of the whole image after
    each step (the image entering the next iteration, and the final image) against the
    Caffe side's, median and max over the iterations. None for a free-running run."""
    if not run.sync:
        return None
    values = [r["image"]["max_abs"] for r in run.rows[1:] if r.get("image") is not None]
    if run.final is not None:
        values.append(run.final["max_abs"])
    return {"median": float(np.median(values)), "max": float(max(values))} if values else None


def drift_sources(net: FacetNet, caffe: CaffeRun, faithful: TorchRun, modern: TorchRun | None = None,
                  progress: bool = True, sources=SOURCES) -> list[dict]:
    """One torch run per switched source, in the comparison mode of ``faithful`` (the
    faithful torch run: synchronised or free-running), each against the Caffe side and
    against ``faithful``: the final image (max |difference|, relative L2, SSIM) and, when
    synchronised, the one-step discrepancy (``per_step``). The first row is the framework
    arithmetic itself (the faithful run against the Caffe side); with ``modern``, a last
    row has every modern choice at once."""
    reference = faithful.result.image
    out = []

    def row(source: Source, run: TorchRun, image: np.ndarray, compared: str) -> dict:
        return {"source": source.name, "description": source.description, "compared": compared,
                "per_step": per_step(run),
                "vs_faithful": final_difference(image, reference) if image.shape == reference.shape else None,
                "vs_caffe": run.final}

    how = "synchronised" if faithful.sync else "free-running"
    for source in sources:
        if source.swap is None:
            out.append(row(source, faithful, caffe.final, f"faithful torch vs the Caffe side ({how})"))
            continue
        run = compare_torch_side(net, caffe, mode="faithful", sync=faithful.sync, swap=source.swap, name=source.name,
                                 progress=progress)
        out.append(row(source, run, run.result.image, f"switched torch run ({how})"))
    if modern is not None:
        out.append(row(Source("all of modern mode", "today's libraries and arithmetic together (--mode modern)"),
                       modern, modern.result.image, f"modern torch run ({how})"))
    return out


def chaotic(sources: list[dict]) -> bool:
    """Free-running drift saturates: the framework arithmetic alone (float32 rounding) moves
    the final image at least half as far, in relative L2, as the median switched source."""
    framework = next((s for s in sources if s["source"] == "framework arithmetic"), None)
    others = [s["vs_faithful"]["rel_l2"] for s in sources if s["source"] != "framework arithmetic"
              and s["per_step"] is None and s["vs_faithful"] is not None and s["vs_faithful"]["rel_l2"] > 0]
    if framework is None or framework["vs_faithful"] is None or not others:
        return False
    return framework["vs_faithful"]["rel_l2"] >= 0.5 * float(np.median(others))


# --------------------------------------------------------------------------------------
# Caffe's own noise floor
# --------------------------------------------------------------------------------------

# OpenBLAS kernel paths (OPENBLAS_CORETYPE) for the second Caffe run: one on the other side of
# fused multiply-add from the default's, so the sgemm sums round differently (kernels on the same
# side may share their accumulation order: measured here, Sandybridge and Prescott give the same
# bits on a small net). FMA_CORES: OpenBLAS's kernels that use FMA (lower case).
FMA_CORES = frozenset({"haswell", "zen", "skylakex", "cooperlake", "sapphirerapids", "piledriver",
                       "steamroller", "excavator"})
OTHER_CORES = ("SandyBridge", "Haswell", "Prescott")
FLOOR_TILES = 8           # the spread of a final-image measure: its mean over an 8 x 8 grid of tiles
FLOOR_SIGMAS = 2.0        # the margin: this many standard errors of the tile-by-tile difference
FLOOR_RULE = (
    "The port is within Caffe's own noise floor when its final image is no further from the Caffe side's "
    "than a second Caffe run under another OpenBLAS kernel path (and thread count) is, up to a margin, in "
    "both SSIM (port's >= Caffe-vs-Caffe's - margin) and mean |diff| (port's <= Caffe-vs-Caffe's + "
    "margin). Both pairs are measured against the same Caffe image, tile by tile over an 8 x 8 grid; each "
    "margin is 2 standard errors of the mean of the 64 tile-by-tile differences (port's tile minus "
    "Caffe-vs-Caffe's tile), the spread the data offer: one pair of chaotic runs gives no run-to-run "
    "spread, and the pairing removes what both owe to the image (its busy regions drift most in both). "
    "Max |diff| is reported but does not decide: it is the extreme of one pixel and swings by tens of grey "
    "levels between pairs of runs as far apart as these.")


def _tile_means(values: np.ndarray, tiles: int = FLOOR_TILES) -> np.ndarray:
    rows = np.array_split(np.arange(values.shape[0]), tiles)
    cols = np.array_split(np.arange(values.shape[1]), tiles)
    return np.array([values[np.ix_(r, c)].mean() for r in rows for c in cols if r.size and c.size])


def _se(values) -> float:
    values = np.asarray(values, np.float64)
    return float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0


def distance(candidate_rgb: np.ndarray, reference_rgb: np.ndarray) -> dict:
    """Final-image distance for the noise floor: ``final_difference`` plus mean |diff| (grey
    levels, over pixels and channels), the SSIM map's and |diff|'s means over an 8 x 8 grid of
    tiles (``ssim_tiles``, ``mean_abs_tiles``, row by row) and their standard errors (``ssim_se``,
    ``mean_abs_se``: std of the tile means / sqrt(tiles))."""
    from skimage.metrics import structural_similarity

    c = np.asarray(candidate_rgb, np.float64)
    r = np.asarray(reference_rgb, np.float64)
    out = final_difference(c, r)
    a = np.abs(c - r)
    out["mean_abs"] = float(a.mean())
    _, smap = structural_similarity(c, r, channel_axis=2, data_range=255.0, full=True)
    pad = 3                                   # (7 - 1) // 2: the border skimage leaves out of the mean
    smap = smap[pad:-pad, pad:-pad] if min(smap.shape[:2]) > 2 * pad else smap
    for key, values in (("ssim", smap.mean(axis=2)), ("mean_abs", a.mean(axis=2))):
        tiles = _tile_means(values)
        out[f"{key}_tiles"] = [float(t) for t in tiles]
        out[f"{key}_se"] = _se(tiles)
    return out


def _margin(port: dict, caffe: dict, key: str, sigmas: float) -> float:
    """sigmas standard errors of the tile-by-tile difference (both measured against the same
    image); without tiles of the same grid, of the two measures' own standard errors combined."""
    mine, theirs = port.get(f"{key}_tiles"), caffe.get(f"{key}_tiles")
    if mine is not None and theirs is not None and len(mine) == len(theirs) > 1:
        return sigmas * _se(np.subtract(mine, theirs))
    return sigmas * float(np.hypot(port.get(f"{key}_se", 0.0), caffe.get(f"{key}_se", 0.0)))


def floor_verdict(port: dict, caffe: dict, sigmas: float = FLOOR_SIGMAS) -> dict:
    """FLOOR_RULE on two ``distance`` dicts (port vs Caffe, Caffe vs Caffe under another kernel).
    Returns {"within", "ssim": {...}, "mean_abs": {...}, "sentence"}; each measure has the two
    values, the margin and whether the port is within it."""
    ssim_margin = _margin(port, caffe, "ssim", sigmas)
    mean_margin = _margin(port, caffe, "mean_abs", sigmas)
    by = {"ssim": {"port": port["ssim"], "caffe": caffe["ssim"], "margin": ssim_margin,
                   "within": bool(port["ssim"] >= caffe["ssim"] - ssim_margin)},
          "mean_abs": {"port": port["mean_abs"], "caffe": caffe["mean_abs"], "margin": mean_margin,
                       "within": bool(port["mean_abs"] <= caffe["mean_abs"] + mean_margin)}}
    within = all(m["within"] for m in by.values())
    sentence = (f"The port is {'within' if within else 'beyond'} Caffe's own noise floor: final image SSIM "
                f"{port['ssim']:.6f} against Caffe's {caffe['ssim']:.6f} with itself (margin {ssim_margin:.3g}), "
                f"mean |diff| {port['mean_abs']:.3g} against {caffe['mean_abs']:.3g} grey levels (margin "
                f"{mean_margin:.3g}), max |diff| {port['max_abs']:.4g} against {caffe['max_abs']:.4g}.")
    return {"within": bool(within), **by, "sentence": sentence}


def cpu_flags() -> set:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def other_core(default: str, flags=None) -> str:
    """The OPENBLAS_CORETYPE for the second Caffe run: SandyBridge (AVX, no FMA) where the
    default kernel uses fused multiply-add; Haswell (FMA) where it does not and the CPU has
    AVX2 and FMA; else Prescott (SSE3), or SandyBridge where Prescott is the default (then
    both sides lack FMA and may round alike: ``differs_in_fma`` says which case holds)."""
    flags = cpu_flags() if flags is None else set(flags)
    if default.lower() in FMA_CORES:
        return "SandyBridge"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return "Prescott" if default.lower() != "prescott" else "SandyBridge"


def differs_in_fma(core: str, other: str) -> bool:
    """Whether one of two OpenBLAS kernels uses fused multiply-add and the other does not."""
    return (core.lower() in FMA_CORES) != (other.lower() in FMA_CORES)


def caffe_floor(worker, prototxt, caffemodel, caffe: CaffeRun, port_final: np.ndarray | None,
                mean=(104.0, 117.0, 123.0), progress: bool = True, folder=None) -> dict:
    """Run the Caffe side of ``caffe`` a second time in a fresh worker under another OpenBLAS
    kernel path (``other_core`` of ``worker``'s) and another thread count (1, or 2 where the
    first ran 1), and measure Caffe against itself beside the port against Caffe.

    Returns {"kernels": {"reference": {"core", "threads"}, "other": {"core", "coretype",
    "threads", "differs_in_fma"}}, "caffe_vs_caffe", "port_vs_caffe" (``distance`` of the final images),
    "bitwise_equal" (the two Caffe finals), "objective": {"other": [per iteration], "max_rel",
    "first_differs"}, "verdict" (``floor_verdict``), "final" (the second run's final image,
    RGB 0-255 float32: ``compare_facet`` moves it to ``Comparison.caffe_other``)}."""
    from porting.legacy import Worker

    reference = worker.openblas()
    coretype = other_core(reference["core"])
    threads = 2 if reference["threads"] == 1 else 1
    with Worker(backend=worker.backend, env={"OPENBLAS_CORETYPE": coretype}, blas_threads=threads,
                timeout=worker.timeout) as second:
        other = dict(second.openblas(), coretype=coretype)
        other["differs_in_fma"] = differs_in_fma(reference["core"], other["core"])
        again = run_caffe_side(second, prototxt, caffemodel, caffe.unit, caffe.seed, caffe.octaves, start=caffe.start,
                               layer=caffe.layer, xy=caffe.xy, mean=mean, iterations=len(caffe.records),
                               folder=folder, progress=progress, input_size=caffe.input_size)
    try:
        ours = [r["objective"] for r in caffe.records]
        theirs = [r["objective"] for r in again.records]
        rel = [abs(a - b) / (abs(a) or 1.0) for a, b in zip(theirs, ours)]
        floor = distance(again.final, caffe.final)
        port = distance(port_final, caffe.final) if port_final is not None and \
            np.shape(port_final) == np.shape(caffe.final) else None
        return {
            "kernels": {"reference": reference, "other": other},
            "caffe_vs_caffe": floor, "port_vs_caffe": port,
            "bitwise_equal": bool(np.array_equal(again.final, caffe.final)),
            "objective": {"other": theirs, "max_rel": max(rel, default=None),
                          "first_differs": next((k for k, (a, b) in enumerate(zip(theirs, ours)) if a != b), None)},
            "verdict": None if port is None else floor_verdict(port, floor),
            "final": again.final,
        }
    finally:
        again.cleanup()


# --------------------------------------------------------------------------------------
# everything
# --------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """What ``compare_facet`` measured; ``mfv.report.build_report`` turns it into the report."""
    settings: dict
    caffe: CaffeRun
    runs: dict                        # name -> TorchRun ("faithful", "modern")
    attribution: dict
    sources: list
    versions: dict
    diagnosis: dict | None = None     # diagnose_gradient at the worst replayed iteration, if any
    caffe_snapshots: dict = field(default_factory=dict)   # iteration -> {input, gradient, after_step, after_denoise}
    floor: dict | None = None         # caffe_floor: Caffe against itself under another BLAS kernel path
    caffe_other: np.ndarray | None = None   # the floor's second Caffe run's final image


def compare_facet(worker, prototxt, caffemodel, unit: int, seed: int, octaves=schedule.MEAN_OCTAVES,
                  start: np.ndarray | None = None, layer: str = "fc8", xy: int = 0, mean=(104.0, 117.0, 123.0),
                  sync: bool = False, iterations: int | None = None, every: int = 10, modern: bool = True,
                  sources: bool = True, progress: bool = True, net: FacetNet | None = None,
                  keep: str | os.PathLike | None = None, log: Callable[[str], None] | None = None,
                  floor: bool = True) -> Comparison:
    """Run the Caffe side once, then the torch side (faithful, and modern unless told not
    to) in the chosen mode, the operation replays every ``every`` iterations and, with
    ``sources``, one torch run per source of drift in the same mode. Both sides' arrays
    (input crop, gradient, after the step, after denoising) are kept every ``every``
    iterations, the first and the last.

    net: the torch side (default: porting's CaffeNet of prototxt/caffemodel). keep: a
    folder to keep the Caffe side's per-iteration arrays in (default: temporary). floor:
    free-running only, run the Caffe side again under another BLAS kernel path
    (``caffe_floor``) and judge the faithful run against that floor (FLOOR_RULE)."""
    from porting.net import load_caffe

    say = log or (lambda _text: None)
    if net is None:
        net = FacetNet.from_caffe(load_caffe(prototxt, caffemodel), mean=mean)
    say("Caffe side (Python 2.7, numpy 1.11.0, scipy 0.17.0, scikit-image 0.13.1, Caffe 1.0)")
    caffe = run_caffe_side(worker, prototxt, caffemodel, unit, seed, octaves, start=start, layer=layer, xy=xy,
                           mean=mean, iterations=iterations, folder=keep, progress=progress,
                           input_size=net.preprocessing.input_size)
    try:
        runs = {}
        for mode in ("faithful", "modern") if modern else ("faithful",):
            say(f"PyTorch side, {mode} mode, {'synchronised' if sync else 'free-running'}")
            runs[mode] = compare_torch_side(net, caffe, mode=mode, sync=sync, progress=progress,
                                            snapshot_every=every)
        say("replaying single operations on the Caffe side's inputs")
        attribution = attribute_operations(net, caffe, every)
        diagnosis = None
        worst = worst_gradient_iteration(attribution)
        if worst is not None and getattr(net.module, "graph", None) is not None:
            say(f"diagnosing the gradient at iteration {worst} (porting.verify against float64)")
            diagnosis = diagnose_gradient(worker, prototxt, caffemodel, caffe, worst, module=net.module)
        found = []
        if sources:
            say(f"drift sources, one {'synchronised' if sync else 'free-running'} torch run each")
            found = drift_sources(net, caffe, runs["faithful"], runs.get("modern"), progress=progress)
        measured_floor = None
        if floor and not sync:
            say("Caffe's own noise floor: the Caffe side again under another OpenBLAS kernel path")
            measured_floor = caffe_floor(worker, prototxt, caffemodel, caffe, runs["faithful"].result.image,
                                         mean=mean, progress=progress)
        versions = {"caffe_side": {"python2": caffe.provenance.get("python2")}}
        settings = {"prototxt": str(prototxt), "caffemodel": None if caffemodel is None else str(caffemodel),
                    "unit": int(unit), "seed": int(seed), "variant": variant_of(octaves) or "custom",
                    "octaves": octave_dicts(octaves, net.preprocessing.input_size), "layer": layer, "xy": int(xy), "mean": [float(m) for m in mean],
                    "start": "noise" if start is None else f"RGB image {np.asarray(start).shape[1]}x"
                                                            f"{np.asarray(start).shape[0]}",
                    "sync": bool(sync), "iterations": len(caffe.records), "every": int(every)}
        snapshots = {n: {what: caffe.array(n, what) for what in ("input", "gradient", "after_step", "after_denoise")}
                     for n in sampled(len(caffe.records), every)}
        other_final = None if measured_floor is None else measured_floor.pop("final")
        return Comparison(settings, caffe, runs, attribution, found, versions, diagnosis, snapshots, measured_floor,
                          other_final)
    finally:
        if keep is None:
            caffe.cleanup()
