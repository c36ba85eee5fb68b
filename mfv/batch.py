"""Batched facets: many MFV runs stepped together, one forward/backward and one TV call
per iteration for all of them.

A task is ``(unit, seed, start)``: the unit to maximise, the seed of the facet's own
``RandomState`` and its start image (RGB 0-255, H x W x 3, e.g. a cluster's mean image;
None for the noise image). Each facet is a ``mfv.loop.FacetRun`` as in ``run_facet``:
its own stream (noise drawn first, then its own crop offsets), its own whole image,
zoomed on its own; all facets share the octave schedule, so an iteration has one step
size and one denoising weight (Python 2 arithmetic in faithful mode). Per iteration:

1. each facet draws its crop offset and copies its crop;
2. one forward and one backward of all crops (``mfv.step.gradient_steps``, objective
   sum_n output[n, unit_n]), each crop masked and stepped as alone (``apply_step``:
   faithful takes numpy 1.11's mean of |g| per crop);
3. one ``mfv.tv.denoise_tv_bregman_0131_batch`` call for all crops (faithful: 0.13.1's
   ring; modern: today's ring, ``padding="edge"``), float64, each image its own stopping
   test;
4. each crop written back, each facet's record and snapshot kept as ``run_facet`` keeps
   them.

Device: the forward and backward run where the net's parameters are (``FacetNet.device``;
``device=`` moves the module there first); the TV call runs on that device too when it
is not the CPU (the plain torch sweep, float64), else on the CPU's compiled sweep. Crops,
step arithmetic, zoom and the images stay in NumPy on the CPU.

Fidelity against ``run_facet`` of the same task (same unit, seed, start):

* crop offsets, step sizes, weights, layers and margins are the same numbers (same
  stream, same schedule code);
* the step is ``apply_step`` on the facet's own gradient, and on the CPU the TV call is
  bit for bit a batch of one per image (the C loop's per-plane arithmetic does not
  depend on the planes beside it; the plain torch sweep, used on a GPU or without a C
  compiler, within 1e-12 grey levels), its stopping test too (0.13.1's own running sum
  either way, ``mfv.tv``);
* the gradient is not bit for bit a batch of one: a batched convolution blocks its
  float32 sums differently (measured here on CaffeNet: per-sample gradients up to 1e-9
  apart on gradients of 2.5e-3 with Xavier-like weights and mean-image crops, 6e-12 on
  5e-6 with 0.01-Gaussian weights and random crops; ~1e-6 relative or less).
  tests/test_mfv_batch.py runs the single run synchronised on the batched
  run's crops and holds the gradient and the stepped crop within derived float32 bounds.

Free-running, such a rounding difference may grow as any float32 perturbation of MFV
does (``mfv.compare``'s noise floor: Caffe against itself under another BLAS kernel ends
at SSIM 0.731, max |diff| 121, mean 4.83 grey levels), or vanish. Measured on this 2-core
CPU (CaffeNet, seeded Xavier-like weights, unit 498 from the authors' theater mean_0..,
seed 1, all 370 iterations, final 8-bit images against ``run_facet``'s): with one torch
thread, 3 facets batched ended bit for bit equal to their single runs (their gradients
differ by ~4e-7 relative, objectives by up to 8e-4: the image did not keep the
difference); with two threads, 2 facets ended at SSIM 0.734 and 0.735, max |diff| 135 and
145, mean 4.74 and 4.76 grey levels: Caffe's own floor. Neither is asserted.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from porting.errors import PortingError

from mfv import schedule, tv
from mfv.loop import ARITHMETIC, MODES, FacetResult, FacetRun, IterationRecord, Snapshot, keeps_snapshot, octave_plan
from mfv.step import FacetNet, gradient_steps
from mfv.zoom import zoom_octave

PADDING = {"faithful": "reflect", "modern": "edge"}   # 0.13.1's TV ring, today's


def denoise_batch(rgb: np.ndarray, weights: Sequence[float], mode: str = "faithful",
                  device: torch.device | str = "cpu") -> np.ndarray:
    """MFV's TV call (max_iter 100, eps 1e-3) on N images at once: ``rgb`` is float64 RGB
    0-255, N x H x W x 3, ``weights`` one per image; run on ``device``, returned as a
    float64 NumPy array. faithful: scikit-image 0.13.1's algorithm (``tv.denoise``'s
    faithful call, per image); modern: the same with today's padding ring, which is
    today's scikit-image to rounding (tests/test_mfv_tv.py)."""
    images = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float64)).to(device)
    out, _ = tv.denoise_tv_bregman_0131_batch(images, [float(w) for w in weights], max_iter=100, eps=1e-3,
                                              padding=PADDING[mode])
    return out.cpu().numpy()


def run_facets(net: FacetNet, tasks: Sequence[tuple], octaves=schedule.MEAN_OCTAVES, layer: str = "fc8",
               xy: int = 0, mode: str = "faithful", snapshot_every: int = 10, progress: bool = True,
               iterations: int | None = None, device: torch.device | str | None = None,
               observe: Callable[[int, IterationRecord, Snapshot], None] | None = None,
               desc: str | None = None) -> list[FacetResult]:
    """Run the facets of ``tasks`` (each ``(unit, seed, start)``, start None or RGB 0-255
    H x W x 3 at least the net's input size) as one batch; one ``FacetResult`` per task,
    in order, as ``run_facet`` returns it (records, snapshots every ``snapshot_every``
    iterations and the last, final image RGB), savable with ``mfv.loop.save_facet``.

    octaves, layer, xy, mode, iterations: as ``run_facet``. device: move the net's module
    there first (None: where it is). observe(n, record, snapshot): after every iteration,
    for each facet n. Memory: per facet, its image and kept snapshots (2.4 MB each at
    227 x 227), plus the net's activations for N crops.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    tasks = [tuple(t) for t in tasks]
    if not tasks or any(len(t) != 3 for t in tasks):
        raise ValueError("tasks: a non-empty list of (unit, seed, start image or None)")
    if device is not None:
        net.module.to(device)
    on = net.device
    tv_device = on if on.type != "cpu" else torch.device("cpu")
    arithmetic = ARITHMETIC[mode]
    prep = net.preprocessing
    facets = [FacetRun.begin(net, int(unit), int(seed), start) for unit, seed, start in tasks]
    units = [f.unit for f in facets]
    total, plan = octave_plan(octaves, iterations)
    bar = tqdm(total=total, disable=not progress, unit="it", desc=desc or f"{len(facets)} facets")
    try:
        for index, octave, first, count in plan:
            if octave.scale is not None:
                for facet in facets:
                    facet.image = zoom_octave(facet.image, octave.scale)
            objective_layer = octave.layer or layer
            margin = schedule.margin_for(octave, prep.input_size)
            for i in range(count):
                iteration = first + i
                crops = [facet.draw_crop(prep.input_size, octave.window) for facet in facets]
                step = schedule.step_size(octave, i, arithmetic)
                weight = schedule.denoise_weight(octave, i, arithmetic)
                dones = gradient_steps(net, np.stack(crops), objective_layer, units, step, margin, xy, mode)
                rgb = np.stack([prep.from_net(done.x) for done in dones]).astype(np.float64)
                denoised = denoise_batch(rgb, [weight] * len(facets), mode, tv_device)
                keep = keeps_snapshot(iteration, total, snapshot_every)
                for n, (facet, x, done) in enumerate(zip(facets, crops, dones)):
                    record, snapshot = facet.finish(iteration, index, i, objective_layer, step, weight, x, done,
                                                    prep.to_net(denoised[n]), keep)
                    if observe is not None:
                        observe(n, record, snapshot)
                objectives = [done.objective for done in dones]
                bar.set_postfix(obj=f"{min(objectives):.2f}..{max(objectives):.2f}", refresh=False)
                bar.update(1)
    finally:
        bar.close()
    return [facet.close(net) for facet in facets]


MEAN_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")   # the order a mean image is looked for in
MAX_UNITS = 1_000_000


def load_means(folder) -> list[tuple[Path, np.ndarray]]:
    """The mean images of a folder as ``mfv means`` writes them: mean_0 ... mean_{k-1}, each
    an 8-bit image (.png, or .jpg as the authors published theirs) or a .npy array (RGB
    0-255, H x W x 3, read without unpickling). Where one index has several files the
    8-bit image is taken (.png, then .jpg): the 2016 script started from an 8-bit file,
    and it is what ``mfv facet --init`` reads. Returns [(path, RGB float32 H x W x 3)] in
    index order; a missing folder, no mean images, a gap in the numbering or an
    unreadable file is a ``PortingError``."""
    path = Path(folder)
    if not path.is_dir():
        raise PortingError("not a folder" if path.exists() else "no such folder", path)
    found: dict[int, list[Path]] = {}
    for entry in path.iterdir():
        match = re.fullmatch(r"mean_(\d{1,6})(\.\w+)", entry.name)
        if match and match.group(2).lower() in MEAN_SUFFIXES and entry.is_file():
            found.setdefault(int(match.group(1)), []).append(entry)
    if not found:
        raise PortingError("no mean images (mean_0.png, .jpg or .npy, as `mfv means` writes them)", path)
    missing = [k for k in range(max(found) + 1) if k not in found]
    if missing:
        raise PortingError(f"mean_{missing[0]} is missing (found {len(found)} mean images numbered up to "
                           f"mean_{max(found)})", path)
    means = []
    for k in range(len(found)):
        chosen = min(found[k], key=lambda p: (MEAN_SUFFIXES.index(p.suffix.lower()), p.name))
        means.append((chosen, read_mean(chosen)))
    return means


def read_mean(path) -> np.ndarray:
    """A mean image file as RGB 0-255, H x W x 3: an 8-bit file (.png, .jpg) as float32, a
    .npy (as `mfv means` writes it) as float64, its header checked before anything is read
    (no pickles); not an RGB array, or NaN/infinite values, is a ``PortingError``."""
    from mfv.means import load_rgb

    path = Path(path)
    if path.suffix.lower() != ".npy":
        return load_rgb(path).astype(np.float32)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header checked against the file's size
    except (OSError, ValueError) as err:
        raise PortingError(f"cannot read array: {err}", path) from None
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype.kind not in "fiu":
        raise PortingError(f"expected an RGB image array (H x W x 3, real numbers), got {array.dtype} of shape "
                           f"{'x'.join(map(str, array.shape))}", path)
    rgb = np.array(array, dtype=np.float64)
    if not np.isfinite(rgb).all():
        raise PortingError("the array holds NaN or infinite values", path)
    return rgb


def parse_units(text: str) -> list[int]:
    """``"498,945"``, ``"0-9"`` or both (``"0-3,7"``) -> units, in order, each once."""
    units: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise PortingError(f"--units: expected units and ranges such as 498,945 or 0-9, got {text!r}")
        first = int(match.group(1))
        last = first if match.group(2) is None else int(match.group(2))
        if last < first or last - first >= MAX_UNITS:
            raise PortingError(f"--units: range {part.strip()!r} is empty or longer than {MAX_UNITS} units")
        units.extend(range(first, last + 1))
        if len(units) > MAX_UNITS:
            raise PortingError(f"--units: more than {MAX_UNITS} units")
    return list(dict.fromkeys(units))
