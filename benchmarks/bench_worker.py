"""What the reference worker costs: its start, and a CaffeNet pass through it vs pycaffe.

Rows (medians): a worker start (unshare + chroot + python3 + import caffe, until ready);
CaffeNet forward + backward of one fc8 unit to the input through ``Worker.run_net``
(arrays through .npy/.npz files and the pipe) and through a Python 2.7 op calling back
with CaffeProxy; the same work in pycaffe directly inside the root
(reference/bench_pycaffe.py). Target: the worker adds at most 10 % to the direct time.
The net is the MFV authors' CaffeNet deploy prototxt (shared reference data) or BVLC's,
with weights drawn by Caffe's msra filler. Needs the legacy root (`porting env build`).

    .venv/bin/python benchmarks/bench_worker.py [--rounds 4] [--repeats 3] [--starts 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from porting.legacy import Worker
from porting.legacy import get_backend
from porting.legacy_build import INSIDE_JOBS, INSIDE_REFERENCE, REFERENCE_DIR

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference-data"
CANDIDATES = [SHARED / "mfv-original" / "deploy_alexnet_updated.prototxt",
              SHARED / "bvlc-prototxt" / "bvlc_reference_caffenet.deploy.prototxt"]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per way per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="OPENBLAS_NUM_THREADS for the worker and the direct run (default: all cores)")
    args = parser.parse_args()
    prototxt = next((p for p in CANDIDATES if p.exists()), None)
    if prototxt is None:
        print("no CaffeNet deploy prototxt in the shared reference data", file=sys.stderr)
        return 1
    backend = get_backend()  # $PORTING_BACKEND or the first that works

    starts = []
    for _ in range(args.starts):
        t0 = time.perf_counter()
        with Worker(backend=backend):
            starts.append(time.perf_counter() - t0)

    rows = [("worker start (ready to serve)", statistics.median(starts), None)]
    x = np.random.RandomState(0).uniform(-100, 100, (1, 3, 227, 227)).astype(np.float32)
    onehot = np.zeros((1, 1000), np.float32)
    onehot[0, 498] = 1
    samples: dict[str, list[float]] = {"direct": [], "worker": [], "py2": []}
    env = {"PYTHONPATH": "/opt/porting"}
    if args.blas_threads is not None:
        env["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    with tempfile.TemporaryDirectory() as tmp, Worker(backend=backend, blas_threads=args.blas_threads) as worker:
        weights = Path(tmp) / "caffenet.caffemodel"
        worker.make_weights(prototxt, weights, filler="msra", bias_filler="constant", bias_value=0.1, seed=1)

        def run_worker():
            worker.run_net(prototxt, weights, inputs={"data": x}, blobs=["data", "fc8"],
                           top_diffs={"fc8": onehot}, capture_tops=False)

        def run_py2():
            worker.py2("caffe_onehot_gradient", prototxt=prototxt, caffemodel=weights, x=x, end="fc8", unit=498)

        run_worker(), run_py2()  # warm-up: nets built, inputs placed
        np.save(worker.jobdir / "bench-input.npy", x)
        command = ["python3", "-m", "reference.bench_pycaffe", worker._file_inside(prototxt),
                   worker._file_inside(weights), f"{worker._inside}/bench-input.npy", "fc8", "498",
                   str(args.repeats)]
        argv, env = backend.launch(["/bin/sh", "-c", 'cd /opt/porting && exec "$@"', "sh"] + command,
                                   [(REFERENCE_DIR, INSIDE_REFERENCE, "ro"), (worker.jobdir, INSIDE_JOBS, "rw")], env)
        # Rounds interleave the three ways so that load from other processes on the
        # machine falls on all of them alike.
        for _ in range(args.rounds):
            out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True,
                                 stdin=subprocess.DEVNULL).stdout
            samples["direct"] += json.loads(out.strip().splitlines()[-1])["seconds"]
            samples["worker"] += timed(run_worker, args.repeats)
            samples["py2"] += timed(run_py2, args.repeats)
    direct, through_worker, through_py2 = (statistics.median(samples[k]) for k in ("direct", "worker", "py2"))
    rows += [("CaffeNet fwd+bwd, pycaffe direct", direct, 1.0),
             ("CaffeNet fwd+bwd, Worker.run_net", through_worker, through_worker / direct),
             ("CaffeNet fwd+bwd, py2 op via CaffeProxy", through_py2, through_py2 / direct)]
    print(f"net: {prototxt.name}; {args.rounds} rounds x {args.repeats} runs per way after a warm-up; "
          f"backend: {backend.name}; worker starts: {args.starts}; OPENBLAS_NUM_THREADS={args.blas_threads or 'default'}")
    print(f"{'what':<42} {'median s':>9} {'vs direct':>9}")
    for what, seconds, ratio in rows:
        print(f"{what:<42} {seconds:>9.3f} {'' if ratio is None else f'{ratio:.3f}':>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
