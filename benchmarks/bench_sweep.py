"""Throughput of `mfv sweep`: facets per minute in-process and on a local Ray cluster of
1 and 2 workers, and Ray's overhead against the same work in-process.

The sweep: 2 units x 10 facets = 20 facets (``--units``, ``--facets``), each unit's 10
facets one task (``--facets-per-task``), ``--iterations`` iterations per facet (the mean
schedule cut short), on the shipped CaffeNet deploy net with seeded random weights
(``--net small``: a 24 x 24 two-layer net, for a quick look at the overheads) and random
227 x 227 mean images. Every configuration first runs one untimed sweep (the net loads
once per process or worker, Ray starts its workers), then ``--repeats`` timed sweeps,
each into a fresh folder; the table shows medians. Ray's cluster start (``ray.init``) is
timed apart and not in the sweeps' times.

Threads: each task gets one CPU (Ray sets OMP_NUM_THREADS=1 in its workers: one torch
thread, one BLAS thread), and the in-process sweep runs with one torch thread and its BLAS
and OpenMP pools limited to one thread too (threadpoolctl), so "ray, 1 worker" against "in-process"
is the same work and the ratio is Ray's overhead (target: under 10 % on 20 facets);
"ray, 2 workers" shows what a second CPU buys.

    .venv/bin/python benchmarks/bench_sweep.py [--net caffenet|small] [--iterations 5] [--repeats 3]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from mfv.sweep import Model, Settings, find_units, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SMALL = """
name: "small"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 24 input_dim: 24
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 5 stride: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc7" type: "InnerProduct" bottom: "conv1" top: "fc7" inner_product_param { num_output: 8 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 6 } }
"""


def write_net(folder: Path, which: str) -> tuple[Path, Path, int]:
    """(prototxt, caffemodel with seeded weights, input side)."""
    from porting.net import load_caffe
    from porting.write import write_caffemodel

    if which == "small":
        prototxt = folder / "small.prototxt"
        prototxt.write_text(SMALL)
    else:
        prototxt = ROOT / "porting" / "models" / "caffenet.prototxt"
    net = load_caffe(prototxt)
    generator = torch.Generator().manual_seed(0)
    layers = []
    for spec in net.graph.layers:
        blobs = net.params.get(spec.name)
        if blobs:
            layers.append((spec.name, spec.type, [(torch.randn(b.shape, generator=generator) * 0.01).numpy()
                                                  for b in blobs]))
    caffemodel = folder / f"{which}.caffemodel"
    write_caffemodel(caffemodel, layers)
    return prototxt, caffemodel, int(next(iter(net.inputs.values()))[-1])


def write_means(root: Path, units: list[int], facets: int, side: int) -> None:
    rng = np.random.RandomState(0)
    for unit in units:
        (root / str(unit)).mkdir(parents=True, exist_ok=True)
        for f in range(facets):
            Image.fromarray(rng.randint(0, 256, (side, side, 3)).astype(np.uint8)).save(root / str(unit) / f"mean_{f}.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=["caffenet", "small"], default="caffenet")
    parser.add_argument("--units", type=int, default=2)
    parser.add_argument("--facets", type=int, default=10)
    parser.add_argument("--facets-per-task", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=5, help="iterations per facet")
    parser.add_argument("--repeats", type=int, default=3, help="timed sweeps per configuration")
    args = parser.parse_args(argv)
    import ray

    total = args.units * args.facets
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prototxt, caffemodel, side = write_net(tmp, args.net)
        units = list(range(args.units))
        write_means(tmp / "means", units, args.facets, side)
        model = Model(str(prototxt), str(caffemodel))
        settings = Settings(iterations=args.iterations)
        found = find_units(tmp / "means", units, args.facets)
        sweeps = iter(range(10 ** 6))

        def sweep(use_ray: bool) -> float:
            began = time.perf_counter()
            outcome = run_sweep(model, settings, found, tmp / f"out{next(sweeps)}", facets=args.facets,
                                facets_per_task=args.facets_per_task, use_ray=use_ray, progress=False,
                                gallery=False)
            seconds = time.perf_counter() - began
            assert outcome.ran == total and not outcome.failed, outcome.failed
            return seconds

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with threadpool_limits(1):   # BLAS and OpenMP pools as a Ray worker has them (OMP_NUM_THREADS=1)
            sweep(False)
            rows.append(("in-process (1 thread)", None, [sweep(False) for _ in range(args.repeats)]))
        torch.set_num_threads(threads)
        for workers in (1, 2):
            began = time.perf_counter()
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
            start = time.perf_counter() - began
            try:
                sweep(True)
                rows.append((f"ray, {workers} worker{'s' * (workers > 1)}", start,
                             [sweep(True) for _ in range(args.repeats)]))
            finally:
                ray.shutdown()
    print(f"\n{total} facets ({args.units} units x {args.facets}, {args.facets_per_task} per task), "
          f"{args.iterations} iterations each, {args.net}; medians of {args.repeats} sweeps")
    print(f"{'':24s} {'seconds':>9s} {'facets/min':>11s} {'vs in-process':>14s} {'ray.init s':>11s}")
    base = statistics.median(rows[0][2])
    for name, start, times in rows:
        median = statistics.median(times)
        print(f"{name:24s} {median:9.2f} {total / median * 60:11.1f} {median / base:14.3f} "
              f"{'' if start is None else f'{start:.2f}':>11s}")
    ray1 = statistics.median(rows[1][2])
    print(f"Ray's overhead (1 worker against in-process, same threads): {(ray1 / base - 1) * 100:+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
