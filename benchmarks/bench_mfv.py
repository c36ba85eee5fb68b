"""MFV's cost per iteration and per facet, faithful mode (PyTorch side).

Builds the shipped CaffeNet deploy net (porting/models/caffenet.prototxt) with seeded
random weights (the cost does not depend on the values) and times, over ``--repeats``
runs (medians), the pieces of one iteration on a 227x227 crop:

* step:     forward to fc8, one-hot backward to the input, normalise, clip
* tv:       TV-Bregman, 100 sweeps at most, faithful (mfv.tv: 0.13.1's loop as the fused
            C sweep where it builds; benchmarks/bench_tv.py times its variants)
* tv-today: the same call on today's compiled scikit-image (what modern mode runs)
* zoom:     one octave zoom of a 3x227x227 float32 image by 1.2

then prints a table of medians and the per-facet estimate: iterations x (step + tv)
plus the octaves' zooms, for the mean-image (370 iterations) and centre-bias (530)
schedules. ``--facet N`` also runs the first N iterations of a real facet through
``mfv.loop.run_facet`` and reports its median seconds per iteration.

``--caffe N`` (needs the legacy stack, ``porting env build``) runs the first N
iterations of the mean-image schedule on both sides from the same noise start with the
same weights (Caffe's Xavier filler, so TV converges alike on both): the Caffe side
(reference/mfv_legacy.py: Python 2.7, Caffe 1.0 through the worker, scikit-image 0.13.1's
TV) and the torch side in faithful mode, and prints their medians side by side: seconds
per iteration, its net part (Caffe: the worker round trip of forward + backward; torch:
the iteration less its TV) and its TV part, and the per-facet estimates.

    python benchmarks/bench_mfv.py [--repeats 5] [--facet 20] [--caffe 20] [--threads N]

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
    from porting.net import load_caffe

    from mfv.step import FacetNet

    net = load_caffe(ROOT / "porting" / "models" / "caffenet.prototxt")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blobs in net.params.values():
            for blob in blobs:
                blob.copy_(torch.randn(blob.shape, generator=generator) * 0.01)
    return FacetNet.from_caffe(net)


def side_by_side(iterations: int) -> None:
    """The Caffe side and torch faithful mode, N iterations each, medians side by side."""
    import tempfile

    from porting.net import load_caffe
    from porting.legacy import Worker

    from mfv import schedule, tv
    from mfv.loop import Swap, run_facet
    from mfv.step import FacetNet

    prototxt = ROOT / "porting" / "models" / "caffenet.prototxt"
    with tempfile.TemporaryDirectory() as tmp, Worker() as worker:
        weights = Path(tmp) / "xavier.caffemodel"
        worker.make_weights(prototxt, weights, filler="xavier", seed=0)
        worker.py2("mfv_legacy.facet", prototxt=prototxt, caffemodel=weights, unit=1, seed=0, iterations=2)  # warm-up
        start = time.perf_counter()
        done = worker.py2("mfv_legacy.facet", prototxt=prototxt, caffemodel=weights, unit=1, seed=0,
                          variant="mean", iterations=iterations, every=0)
        caffe_wall = (time.perf_counter() - start) / iterations
        records = done["records"]
        net = FacetNet.from_caffe(load_caffe(prototxt, weights))

    tv_seconds, stamps = [], [time.perf_counter()]

    def timed_tv(rgb, weight):
        began = time.perf_counter()
        out = tv.denoise(rgb, weight, mode="faithful")
        tv_seconds.append(time.perf_counter() - began)
        return out

    run_facet(net, 1, 0, schedule.MEAN_OCTAVES, progress=False, snapshot_every=0, iterations=iterations,
              swap=Swap(denoise=timed_tv), observe=lambda record, snap: stamps.append(time.perf_counter()))
    torch_iteration = [b - a for a, b in zip(stamps, stamps[1:])]
    rows = [
        ("seconds per iteration (median)", statistics.median(r["seconds"] for r in records),
         statistics.median(torch_iteration)),
        ("  net: forward + backward (+ step)", statistics.median(r["seconds_net"] for r in records),
         statistics.median(t - v for t, v in zip(torch_iteration, tv_seconds))),
        ("  TV (0.13.1 compiled | mfv.tv faithful)", statistics.median(r["seconds_tv"] for r in records),
         statistics.median(tv_seconds)),
        ("seconds per iteration, wall (mean)", caffe_wall, sum(torch_iteration) / len(torch_iteration)),
    ]
    for variant, octaves in schedule.VARIANTS.items():
        n = sum(o.iter_n for o in octaves)
        rows.append((f"facet {variant} ({n} it), estimate", rows[0][1] * n, rows[0][2] * n))
    width = max(len(name) for name, *_ in rows)
    print(f"\nside by side, {iterations} iterations of the mean-image schedule from the noise start "
          f"(Caffe's Xavier weights)")
    print(f"{'':<{width}}  {'Caffe side':>10}  {'torch faithful':>14}")
    for name, caffe, torch_side in rows:
        print(f"{name:<{width}}  {caffe:10.3f}  {torch_side:14.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--facet", type=int, default=0, help="also time N iterations of a real run")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--caffe", type=int, default=0,
                        help="also run N iterations on the Caffe side (legacy stack) and in faithful mode, side by side")
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
        ("tv faithful (mfv.tv, 0.13.1 algorithm)", median_seconds(lambda: tv.denoise(rgb, 0.4, "faithful"), args.repeats)),
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
    if args.caffe:
        side_by_side(args.caffe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
