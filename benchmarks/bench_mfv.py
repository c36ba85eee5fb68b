"""MFV's cost per iteration and per facet, faithful mode (PyTorch side).

Builds the shipped CaffeNet deploy net (porting/models/caffenet.prototxt) with seeded
random weights (the cost does not depend on the values) and times, over ``--repeats``
runs (medians), the pieces of one iteration on a 227x227 crop:

* step:     forward to fc8, one-hot backward to the input, normalise, clip
* tv:       TV-Bregman, 100 sweeps at most, faithful (our NumPy version of 0.13.1)
* tv-today: the same call on today's compiled scikit-image (what modern mode runs)
* zoom:     one octave zoom of a 3x227x227 float32 image by 1.2

then prints a table of medians and the per-facet estimate: iterations x (step + tv)
plus the octaves' zooms, for the mean-image (370 iterations) and centre-bias (530)
schedules. ``--facet N`` also runs the first N iterations of a real facet through
``mfv.loop.run_facet`` and reports its median seconds per iteration.

    python benchmarks/bench_mfv.py [--repeats 5] [--facet 20] [--threads N]

Torch's thread count matters on a busy machine: on 2 shared cores at load 5 one step
took 1.48 s with torch's default 2 threads and 0.085 s with ``--threads 1``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def caffenet():
    from porting import load_caffe

    from mfv.step import FacetNet

    net = load_caffe(ROOT / "porting" / "models" / "caffenet.prototxt")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blobs in net.params.values():
            for blob in blobs:
                blob.copy_(torch.randn(blob.shape, generator=generator) * 0.01)
    return FacetNet.from_caffe(net)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--facet", type=int, default=0, help="also time N iterations of a real run")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mfv import schedule, tv
    from mfv.loop import run_facet
    from mfv.step import gradient_step
    from mfv.zoom import zoom_octave

    net = caffenet()
    rng = np.random.RandomState(0)
    rgb = rng.normal(175, 8, (227, 227, 3))
    x = net.preprocessing.to_net(rgb)
    gradient_step(net, x, "fc8", 1, 1.0)  # warm-up
    rows = [
        ("step (fwd fc8 + bwd + normalise + clip)", median_seconds(lambda: gradient_step(net, x, "fc8", 1, 1.0), args.repeats)),
        ("tv faithful (NumPy, 0.13.1 algorithm)", median_seconds(lambda: tv.denoise(rgb, 0.4, "faithful"), args.repeats)),
        ("tv today (compiled scikit-image)", median_seconds(lambda: tv.denoise(rgb, 0.4, "modern"), args.repeats)),
        ("zoom 3x227x227 float32 by 1.2", median_seconds(lambda: zoom_octave(x, 1.2), args.repeats)),
    ]
    times = dict((name.split(" ")[0] + (" today" if "today" in name else ""), t) for name, t in rows)
    per_iteration = times["step"] + times["tv"]
    width = max(len(name) for name, _ in rows)
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (medians)")
    print(f"{'piece':<{width}}  seconds")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:8.3f}")
    print(f"{'faithful iteration (step + tv)':<{width}}  {per_iteration:8.3f}")
    for variant, octaves in schedule.VARIANTS.items():
        iterations = sum(o.iter_n for o in octaves)
        zooms = sum(1 for o in octaves if o.scale is not None)
        total = iterations * per_iteration + zooms * times["zoom"]
        print(f"{'facet ' + variant + f' ({iterations} it), estimate':<{width}}  {total:8.1f}")
    if args.facet:
        octaves = (schedule.MEAN_OCTAVES[0]._replace(iter_n=args.facet),)
        start = time.perf_counter()
        result = run_facet(net, 1, 0, octaves, mode="faithful", progress=False, snapshot_every=0)
        elapsed = time.perf_counter() - start
        print(f"{f'run_facet, {len(result.records)} iterations, s/iteration':<{width}}  {elapsed / args.facet:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
