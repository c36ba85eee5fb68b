"""MFV's activation maximisation with octaves: the pieces composed into one loop.

Per octave: zoom (if it has a scale), then per iteration: a crop offset (``mfv.crops``),
the step size and denoising weight (``mfv.schedule``, Python 2 arithmetic in faithful
mode, Python 3 in modern), a gradient step on the crop (``mfv.step``), TV denoising of
the crop as float64 RGB 0-255 (``mfv.tv``), and the crop written back into the image.
The image lives in the net's float32 layout (3 x H x W) throughout, as in the 2016 code.

``run_facet`` returns the final image (the whole image, de-processed to RGB) and a
trace: one ``IterationRecord`` per iteration, and every ``snapshot_every`` iterations
(plus the first and the last) a ``Snapshot`` of the crop's input, gradient, the crop
after the step and after denoising, so a run can be compared step by step.

The pieces of an iteration (``FacetRun``: the start, the crop draw, the write-back and
the record; ``octave_plan``; ``keeps_snapshot``) are shared with ``mfv.batch``, which runs
many facets in one batch with the same arithmetic per facet.

For comparisons (``mfv.compare``): ``swap`` replaces single parts of the loop (schedule
arithmetic, the step's casting, the denoiser, the zoom, the random stream) to isolate one
source of drift; ``start_from`` lets another run's image replace this run's before each
step (the synchronised mode); ``observe`` sees every iteration's arrays.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from mfv import crops, schedule, tv
from mfv.files import save_json, save_npy, save_npz, save_png, truncating_uint8
from mfv.step import FacetNet, gradient_step
from mfv.zoom import zoom_octave

MODES = ("faithful", "modern")
ARITHMETIC = {"faithful": "py2", "modern": "py3"}


@dataclass
class IterationRecord:
    iteration: int            # across octaves, from 0
    octave: int
    i: int                    # within the octave
    layer: str
    image_shape: tuple        # (rows, cols) of the whole image
    crop: tuple               # (row offset, column offset)
    step_size: float
    denoise_weight: float
    objective: float          # the unit's value before the step
    best_unit: int
    best_value: float
    mean_abs_gradient: float


@dataclass
class Snapshot:
    iteration: int
    input: np.ndarray         # the crop before the step (net layout, float32)
    gradient: np.ndarray      # masked gradient
    after_step: np.ndarray    # after step and clip
    after_denoise: np.ndarray  # after TV denoising (back in net layout)


@dataclass(frozen=True)
class Swap:
    """Parts of the loop replaced to isolate one source of drift (None keeps the mode's own)."""
    arithmetic: str | None = None        # schedule arithmetic: "py2" or "py3"
    step_mode: str | None = None         # apply_step's casting: "faithful" or "modern"
    denoise: Callable | None = None      # (RGB 0-255 H x W x 3 float64, weight) -> float64 image
    zoom: Callable | None = None         # (image 3 x H x W float32, scale) -> zoomed image
    rng: Callable | None = None          # seed -> stream with .normal(loc, scale, size), for noise and crops


@dataclass
class FacetResult:
    image: np.ndarray         # final whole image, RGB 0-255, H x W x 3, float32
    records: list = field(default_factory=list)
    snapshots: list = field(default_factory=list)
    start: np.ndarray | None = None  # the start image, RGB (float64 noise or float32 mean image)

    def image_uint8(self) -> np.ndarray:
        """The 2016 code's ``np.uint8(image)``: truncating (see ``truncating_uint8``)."""
        return truncating_uint8(self.image)


def octave_plan(octaves, iterations: int | None = None) -> tuple[int, list[tuple[int, object, int, int]]]:
    """(iterations in all, [(octave index, octave, its first iteration, iterations run in it)]).

    iterations: stop after this many in all (None: the whole schedule). An octave is
    entered (and zoomed) when iterations are left at its start, even with ``iter_n`` 0."""
    total = sum(o.iter_n for o in octaves)
    if iterations is not None:
        total = min(total, max(int(iterations), 0))
    plan, first = [], 0
    for index, octave in enumerate(octaves):
        if first == total:
            break
        count = min(octave.iter_n, total - first)
        plan.append((index, octave, first, count))
        first += count
    return total, plan


def keeps_snapshot(iteration: int, total: int, every: int) -> bool:
    """Whether ``FacetResult.snapshots`` keeps an iteration: every ``every``-th and the last (0: none)."""
    return bool(every) and (iteration % every == 0 or iteration == total - 1)


@dataclass
class FacetRun:
    """One facet between iterations: its random stream, its whole image (net layout,
    float32, 3 x H x W) and its result so far. ``run_facet`` drives one, ``mfv.batch``
    many; the pieces an iteration is made of live here so both run them alike."""
    unit: int
    rng: object
    image: np.ndarray
    result: FacetResult
    crop: tuple = (0, 0)          # this iteration's (row, column) offset

    @classmethod
    def begin(cls, net: FacetNet, unit: int, seed: int, start=None, rng=np.random.RandomState) -> "FacetRun":
        """The 2016 start: ``rng(seed)``, the noise image drawn from it (always, so the crop
        draws that follow are the same), the start image (or the noise) in net layout."""
        prep = net.preprocessing
        height, width = prep.input_size
        stream = rng(seed)
        noise = crops.noise_start(stream, height, width)
        start_rgb = noise if start is None else np.asarray(start, dtype=np.float32)
        if start_rgb.ndim != 3 or start_rgb.shape[2] != 3 or start_rgb.shape[0] < height or start_rgb.shape[1] < width:
            raise ValueError(f"start image must be H x W x 3 with H >= {height} and W >= {width}, "
                             f"got {start_rgb.shape}")
        return cls(unit, stream, prep.to_net(start_rgb), FacetResult(image=np.empty(0), start=start_rgb))

    def replace_image(self, given, iteration: int) -> None:
        """``start_from``'s answer (None: keep the image)."""
        if given is None:
            return
        if given.shape != self.image.shape:
            raise ValueError(f"start_from gave an image of shape {given.shape} for iteration "
                             f"{iteration}, whose image has shape {self.image.shape}")
        self.image = np.array(given, dtype=np.float32)

    def draw_crop(self, input_size, window: float) -> np.ndarray:
        """This iteration's crop offset from the facet's stream; returns a copy of the crop."""
        height, width = input_size
        rows, cols = self.image.shape[1:]
        self.crop = crops.crop_offsets(self.rng, rows, cols, height, width, window)
        oy, ox = self.crop
        return self.image[:, oy:oy + height, ox:ox + width].copy()

    def finish(self, iteration: int, octave_index: int, i: int, layer: str, step, weight, x: np.ndarray,
               done, denoised: np.ndarray, keep: bool) -> tuple[IterationRecord, Snapshot]:
        """Write the denoised crop back into the image; record the iteration (and keep its snapshot)."""
        oy, ox = self.crop
        height, width = denoised.shape[1:]
        self.image[:, oy:oy + height, ox:ox + width] = denoised
        record = IterationRecord(
            iteration, octave_index, i, layer, tuple(self.image.shape[1:]), self.crop, float(step), float(weight),
            done.objective, done.best_unit, done.best_value, done.mean_abs_gradient)
        self.result.records.append(record)
        snapshot = Snapshot(iteration, x, done.gradient, done.x, denoised)
        if keep:
            self.result.snapshots.append(snapshot)
        return record, snapshot

    def close(self, net: FacetNet) -> FacetResult:
        """The result, its final image de-processed to RGB."""
        self.result.image = net.preprocessing.from_net(self.image)
        return self.result


def run_facet(net: FacetNet, unit: int, seed: int, octaves=schedule.MEAN_OCTAVES, start=None,
              layer: str = "fc8", xy: int = 0, mode: str = "faithful", snapshot_every: int = 10,
              progress: bool = True, iterations: int | None = None, swap: Swap | None = None,
              start_from: Callable[[int, np.ndarray], np.ndarray | None] | None = None,
              observe: Callable[[IterationRecord, Snapshot], None] | None = None) -> FacetResult:
    """Maximise ``unit`` of ``layer`` (an octave's own layer overrides it).

    start: None for the noise image, or an RGB 0-255 image (H x W x 3) at least the
    net's input size. The noise image is drawn from ``RandomState(seed)`` in either case,
    as the 2016 code did, so the crop draws that follow are the same.
    iterations: stop after this many in all (None: the whole schedule; the schedules
    keep the octaves' full lengths, so the iterations run are those of a full run).
    swap: parts replaced (see ``Swap``). start_from(iteration, image): called with the
    whole image entering each iteration (net layout, float32, after any zoom) before its
    crop is drawn; an array it returns (same shape) replaces the image. observe(record,
    snapshot): called after every iteration with its record and arrays.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    swap = swap or Swap()
    arithmetic = swap.arithmetic or ARITHMETIC[mode]
    step_mode = swap.step_mode or mode
    denoise = swap.denoise or (lambda rgb, weight: tv.denoise(rgb, weight, mode=mode))
    zoom = swap.zoom or zoom_octave
    prep = net.preprocessing
    facet = FacetRun.begin(net, unit, seed, start, swap.rng or np.random.RandomState)
    total, plan = octave_plan(octaves, iterations)
    bar = tqdm(total=total, disable=not progress, unit="it", desc=f"unit {unit}")
    try:
        for index, octave, first, count in plan:
            if octave.scale is not None:
                facet.image = zoom(facet.image, octave.scale)
            objective_layer = octave.layer or layer
            margin = schedule.margin_for(octave, prep.input_size)
            for i in range(count):
                iteration = first + i
                if start_from is not None:
                    facet.replace_image(start_from(iteration, facet.image), iteration)
                x = facet.draw_crop(prep.input_size, octave.window)
                step = schedule.step_size(octave, i, arithmetic)
                weight = schedule.denoise_weight(octave, i, arithmetic)
                done = gradient_step(net, x, objective_layer, unit, step, xy=xy, mode=step_mode, margin=margin)
                rgb = prep.from_net(done.x).astype(np.float64)
                denoised = prep.to_net(denoise(rgb, weight))
                record, snapshot = facet.finish(iteration, index, i, objective_layer, step, weight, x, done, denoised,
                                                keeps_snapshot(iteration, total, snapshot_every))
                if observe is not None:
                    observe(record, snapshot)
                bar.set_postfix(obj=f"{done.objective:.2f}", best=done.best_unit, refresh=False)
                bar.update(1)
    finally:
        bar.close()
    return facet.close(net)


def save_facet(result: FacetResult, out_dir, name: str = "facet") -> dict[str, Path]:
    """Write <name>.png (8-bit, truncating cast), <name>.npy (float32 RGB), <name>_trace.json
    (one record per iteration) and <name>_snapshots.npz (arrays keyed ``<iteration>/<what>``)."""
    out = Path(out_dir)
    arrays = {}
    for snap in result.snapshots:
        for what in ("input", "gradient", "after_step", "after_denoise"):
            arrays[f"{snap.iteration:04d}/{what}"] = getattr(snap, what)
    return {
        "png": save_png(out / f"{name}.png", result.image_uint8()),
        "npy": save_npy(out / f"{name}.npy", result.image.astype(np.float32)),
        "trace": save_json(out / f"{name}_trace.json", [asdict(r) for r in result.records]),
        "snapshots": save_npz(out / f"{name}_snapshots.npz", **arrays),
    }
