"""TV-Bregman per 227x227x3 image: the NumPy reference against the torch version, single and batched.

Times, in one run on one machine, scikit-image 0.13.1's algorithm (faithful padding,
100 sweeps at most, eps 1e-3, weight 0.4: the images run 99 or 100 sweeps) on
227x227x3 float64 images, values 0-255:

* numpy:          ``mfv.tv.denoise_tv_bregman_0131_numpy``, one image per call
* torch single:   ``mfv.tv.denoise_tv_bregman_0131_batch`` on a batch of one, with the
                  plain torch sweep (``fused=False``) and with the fused C sweep
* torch batch:    the same on a batch of ``--batch`` images (seconds per image)
* torch float32:  the batch in float32, torch sweep (what modern mode may run; not faithful)

The fused sweep (the C loop, sweeps and stopping test) splits a batch between torch's
intra-op threads by whole images, each thread's group in arrays of its own.

The variants run round-robin, ``--repeats`` rounds, so a busy machine slows them alike;
the table gives each one's median seconds per image and its ratio to the NumPy median.

    python benchmarks/bench_tv.py [--repeats 5] [--batch 10] [--threads N] [--device cpu]

Measured on 2 quiet cores, ``--threads 2``, seconds per image (99-100 sweeps) and x NumPy,
two runs: NumPy 0.32-0.38 (1.00); fused C loop, one image 0.099-0.106, batch of 10
0.044-0.048; torch sweep, one image 0.39-0.50, batch of 10 0.25-0.30; torch float32 batch of
10 0.12-0.14. The C sweep as it was before (one shared array, the two threads on interleaved
lanes of its cache lines, Python between sweeps), in the first run's conditions: one image
0.122, batch of 10 0.113. (The second run has the exact stopping test for one image, its
later planes' squared changes kept and added after each sweep: 0.106 against 0.099.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mfv.tv import denoise_tv_bregman_0131_batch, denoise_tv_bregman_0131_numpy, fused_sweep

    device = torch.device(args.device)
    images = np.random.RandomState(0).normal(128, 40, (args.batch, 227, 227, 3))
    batch = torch.from_numpy(images).to(device)
    single = batch[:1].clone()
    batch32 = batch.float()
    weights = [0.4] * args.batch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def torch_run(x, w, fused):
        def run():
            denoise_tv_bregman_0131_batch(x, w, fused=fused)
            sync()
        return run

    variants = [
        ("numpy 0.13.1-faithful, one image", 1, lambda: denoise_tv_bregman_0131_numpy(images[0], 0.4)),
        ("torch faithful, torch sweep, one image", 1, torch_run(single, weights[:1], False)),
        (f"torch faithful, torch sweep, batch of {args.batch}", args.batch, torch_run(batch, weights, False)),
        (f"torch float32, torch sweep, batch of {args.batch}", args.batch, torch_run(batch32, weights, False)),
    ]
    if device.type == "cpu" and fused_sweep() is not None:
        variants[1:1] = [
            ("torch faithful, fused C sweep, one image", 1, torch_run(single, weights[:1], True)),
            (f"torch faithful, fused C sweep, batch of {args.batch}", args.batch, torch_run(batch, weights, True)),
        ]
    for _, _, run in variants:   # warm-up
        run()
    seconds = {name: [] for name, _, _ in variants}
    for _ in range(args.repeats):
        for name, count, run in variants:
            began = time.perf_counter()
            run()
            seconds[name].append((time.perf_counter() - began) / count)
    base = statistics.median(seconds[variants[0][0]])
    width = max(len(name) for name in seconds)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.repeats} rounds (medians), "
          f"99-100 sweeps per image")
    print(f"{'per 227x227x3 image':<{width}}  {'seconds':>8}  {'min':>8}  {'x numpy':>8}")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<{width}}  {median:8.3f}  {min(times):8.3f}  {base / median:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
