"""MFV on the 2016 code (Caffe) against the PyTorch port, single and batched, in one table.

One run on one machine, CaffeNet (porting/models/caffenet.prototxt) with weights written
by Caffe's Xavier filler (seed 0; the cost does not depend on the values, and TV converges
alike on both sides), the mean-image schedule (370 iterations a facet) from the noise
start, fc8 unit 1, ``--iterations`` iterations per measurement (medians):

* Caffe (2016 code):   reference/mfv_legacy.py, the authors' loop transcribed (Python 2.7,
                       Caffe 1.0, scikit-image 0.13.1's TV) through the worker, OpenBLAS
                       threads set to the same N as torch's. Per iteration: the median of
                       the loop's own per-iteration clock. Per 10 facets: the authors'
                       shell script runs the 10 facets of a unit one after the other, so
                       10 x 370 x that median (an estimate; it leaves out each facet's
                       process start and net load, a few seconds each). ``--full`` runs
                       the 10 whole facets for real (about an hour on 2 cores).
* faithful single:     ``mfv.loop.run_facet``, faithful mode, one facet; per 10 facets
                       10 x 370 x its median iteration.
* faithful batched 10: ``mfv.batch.run_facets``, 10 facets (seeds 0-9) as one batch; its
                       iteration advances all 10, so per 10 facets = 370 x its median;
                       with ``--full``, the whole schedule run and timed for real.
* modern batched 10:   the same in modern mode.
* limit (FLOPs/peak):  the net's share at this CPU's float32 peak: FLOPs of CaffeNet's
                       forward to fc8 and backward to the input, counted from the layer
                       shapes (``CaffeLayer.work()``: 2 FLOPs a multiply-add, the
                       backward's input gradient as much as the forward for Convolution
                       and InnerProduct, one FLOP a value each way for the rest; weight
                       gradients are not needed), over the best of a large float32
                       matmul (``torch.mm`` of 2048 x 2048, N threads). TV, crops and the
                       step are left out, so no implementation of the loop can beat it.

Each torch row runs in a child process of its own (``--child``), alone: its peak memory
(RSS, ``ru_maxrss``) is that row's process, net and weights included, and no row shares
the CPU with another or with the Caffe worker (closed before the torch rows start).
Ratios: seconds of the Caffe side over this row's (how many times faster).

    python benchmarks/bench_mfv.py [--iterations 10] [--threads N] [--full] [--investigate]

The 1.06 s per iteration "side by side with the Caffe worker alive" (issue 11).
``--investigate`` times torch's step (forward + backward + step, median of 5) alone,
beside an idle worker (after a Caffe job) and while the worker runs the Caffe loop, with
torch at N threads and at 1, OpenBLAS at its default (all cores) and at 1, and measures
the worker's own CPU (its process tree's utime + stime). Measured on this 2-core machine
at load average 8.6 (other people's work), seconds per step:

    condition                                torch 2 threads   torch 1 thread
    alone (no worker)                             0.755            0.231
    beside an idle worker, OpenBLAS default       1.426            0.178
    while Caffe runs, OpenBLAS default            1.492            0.260
    beside an idle worker, OpenBLAS 1             1.044            0.224
    while Caffe runs, OpenBLAS 1                  1.091            0.286

An idle worker burns no CPU (0.00 CPU-seconds per second over 2 s right after a job,
with either OpenBLAS thread count; 0.3 while it runs its loop, so the measure sees it):
OpenBLAS's pool spins only for a moment after a call, then sleeps. Torch's 2 threads
cost 3-8 times its 1 thread in every condition, the worker's presence or absence moving
it less than the run-to-run spread: torch's OpenMP pool (GNU OpenMP, spinning at its
barriers) waits at every parallel region for a thread that the loaded machine has
descheduled. So the 1.06 s is thread oversubscription in torch's own pool on a busy
machine (the worker's run being one more load when it is busy), not a spinning idle
BLAS pool. Honest figures: each side timed with the other idle (this script closes the
worker before the torch rows and runs each torch row alone in its own process), the
worker's OpenBLAS threads set explicitly to torch's N (``Worker(blas_threads=N)``),
and final numbers taken on a quiet machine; on a shared one, ``--threads 1``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROTOTXT = ROOT / "porting" / "models" / "caffenet.prototxt"
FACETS = 10
UNIT = 1
MATMUL_SIZE = 2048


def schedule_iterations() -> int:
    from mfv import schedule

    return sum(o.iter_n for o in schedule.MEAN_OCTAVES)


# --------------------------------------------------------------------------------------
# The floating-point limit
# --------------------------------------------------------------------------------------

def caffenet_flops(prototxt=PROTOTXT, end: str = "fc8") -> tuple[int, int]:
    """(forward FLOPs to ``end``, backward FLOPs from it to the input) of one image."""
    from porting.net import load_caffe

    net = load_caffe(prototxt)
    forward = backward = 0
    for spec in net.graph.layers:
        if spec.type in ("Input", "Data"):
            continue
        work = spec.module.work()
        if spec.type in ("Convolution", "InnerProduct"):
            forward += 2 * work        # multiply-adds
            backward += 2 * work       # the input gradient: as many (weights' gradients not needed)
        else:
            forward += work
            backward += work
        if spec.name == end:
            break
    return forward, backward


def matmul_peak(repeats: int = 5, size: int = MATMUL_SIZE) -> float:
    """Best FLOP/s of a size x size float32 matmul (torch.mm, torch's current threads)."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# --------------------------------------------------------------------------------------
# The torch rows, each in a child process
# --------------------------------------------------------------------------------------

def caffenet(weights: str | None):
    """The port of CaffeNet with ``weights`` (a caffemodel), or seeded Gaussian weights without."""
    from porting.net import load_caffe

    from mfv.step import FacetNet

    net = load_caffe(PROTOTXT, weights)
    if weights is None:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for blobs in net.params.values():
                for blob in blobs:
                    blob.copy_(torch.randn(blob.shape, generator=generator) * 0.01)
    return FacetNet.from_caffe(net)


def run_child(variant: str, weights: str | None, iterations: int | None, threads: int) -> dict:
    """One torch row in this process: its per-iteration seconds and peak RSS; with
    ``iterations`` None the whole schedule, and its wall seconds ("full")."""
    from mfv import schedule
    from mfv.device import configure

    configure(threads)
    net = caffenet(weights)
    stamps = []
    if variant == "single":
        from mfv.loop import run_facet

        stamps.append(time.perf_counter())
        run_facet(net, UNIT, 0, schedule.MEAN_OCTAVES, mode="faithful", progress=False, snapshot_every=0,
                  iterations=iterations, observe=lambda record, snap: stamps.append(time.perf_counter()))
    else:
        mode = variant.split("-")[1]
        try:
            from mfv import batch
        except ImportError:
            return {"missing": "mfv.batch missing"}
        tasks = [(UNIT, seed, None) for seed in range(FACETS)]   # (unit, seed, start): noise starts

        def observe(n, record, snapshot):  # called per facet; the last one ends the batch iteration
            if n == FACETS - 1:
                stamps.append(time.perf_counter())

        stamps.append(time.perf_counter())
        batch.run_facets(net, tasks, schedule.MEAN_OCTAVES, mode=mode, progress=False, snapshot_every=0,
                         iterations=iterations, observe=observe)
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    row = {"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": torch.get_num_threads()}
    if iterations is None:
        row["full"] = stamps[-1] - stamps[0]
    return row


def child(variant: str, weights: str | None, iterations: int | None, threads: int) -> dict:
    """``run_child`` in a fresh process (alone on the CPU, its own peak RSS); iterations
    None: the whole schedule."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--threads", str(threads)] \
        + (["--iterations", str(iterations)] if iterations else ["--full"]) + (["--weights", weights] if weights else [])
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"missing": f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# The Caffe side
# --------------------------------------------------------------------------------------

def caffe_side(worker, weights: Path, iterations: int, full: bool) -> dict:
    """The 2016 loop through ``worker``: per-iteration seconds (the loop's own clock), and
    with ``full`` the wall seconds of 10 whole facets one after the other."""
    worker.py2("mfv_legacy.facet", prototxt=PROTOTXT, caffemodel=weights, unit=UNIT, seed=0, iterations=2)  # warm-up
    done = worker.py2("mfv_legacy.facet", prototxt=PROTOTXT, caffemodel=weights, unit=UNIT, seed=0,
                      variant="mean", iterations=iterations, every=0)
    result = {"seconds": [r["seconds"] for r in done["records"]],
              "net": [r["seconds_net"] for r in done["records"]], "tv": [r["seconds_tv"] for r in done["records"]]}
    if full:
        start = time.perf_counter()
        for seed in range(FACETS):
            worker.py2("mfv_legacy.facet", prototxt=PROTOTXT, caffemodel=weights, unit=UNIT, seed=seed,
                       variant="mean", every=0, timeout=7200)
        result["full"] = time.perf_counter() - start
    return result


def legacy_ready() -> bool:
    from porting.errors import PortingError
    from porting.legacy_backends import get_backend

    try:
        return get_backend().problem() is None
    except PortingError:
        return False


# --------------------------------------------------------------------------------------
# The 1.06 s: who slows torch down beside the worker
# --------------------------------------------------------------------------------------

def tree_cpu_seconds(pid: int) -> float:
    """utime + stime (seconds) of ``pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += ticks.get(p, 0)
        todo.extend(children.get(p, []))
    return total / os.sysconf("SC_CLK_TCK")


def step_median(net, repeats: int) -> float:
    from mfv.step import gradient_step

    x = net.preprocessing.to_net(np.random.RandomState(0).normal(175, 8, (227, 227, 3)))
    gradient_step(net, x, "fc8", UNIT, 1.0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gradient_step(net, x, "fc8", UNIT, 1.0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def investigate(threads: int, repeats: int) -> None:
    """Torch's step alone, beside an idle worker and while the worker runs the Caffe loop,
    for torch's ``threads`` and 1 thread, with OpenBLAS at its default (all cores) and 1."""
    from porting.legacy import Worker

    from mfv.device import configure

    counts = sorted({threads, 1}, reverse=True)
    rows = []  # (condition, torch threads, seconds, worker CPU-seconds per second or None)

    def timed(condition, pid=None):
        for count in counts:
            configure(count)
            before, began = (tree_cpu_seconds(pid), time.perf_counter()) if pid else (None, None)
            seconds = step_median(net, repeats)
            cpu = (tree_cpu_seconds(pid) - before) / (time.perf_counter() - began) if pid else None
            rows.append((condition, count, seconds, cpu))

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "xavier.caffemodel"
        with Worker() as maker:
            maker.make_weights(PROTOTXT, weights, filler="xavier", seed=0)
        net = caffenet(str(weights))
        timed("alone (no worker)")
        for blas in (None, 1):
            name = "default (all cores)" if blas is None else str(blas)
            with Worker(blas_threads=blas) as worker:
                pid = worker._proc.pid
                worker.py2("mfv_legacy.facet", prototxt=PROTOTXT, caffemodel=weights, unit=UNIT, seed=0, iterations=3)
                spin0 = tree_cpu_seconds(pid)
                time.sleep(2.0)
                rows.append((f"worker idle after a job, OpenBLAS {name}: its own CPU", None, None,
                             (tree_cpu_seconds(pid) - spin0) / 2.0))
                timed(f"beside an idle worker, OpenBLAS {name}", pid)
                done = threading.Event()

                def caffe_loop():
                    while not done.is_set():
                        worker.py2("mfv_legacy.facet", prototxt=PROTOTXT, caffemodel=weights, unit=UNIT, seed=0,
                                   iterations=3, every=0)

                busy = threading.Thread(target=caffe_loop)
                busy.start()
                time.sleep(2.0)  # the Caffe loop under way
                timed(f"while Caffe runs its loop, OpenBLAS {name}", pid)
                done.set()
                busy.join()
    width = max(len(row[0]) for row in rows)
    print(f"\ntorch step (fwd fc8 + bwd + step), median of {repeats}; worker CPU: its process tree's "
          f"CPU-seconds per second over the window; load average {os.getloadavg()[0]:.1f} "
          f"on {len(os.sched_getaffinity(0))} cores")
    for condition, count, seconds, cpu in rows:
        print(f"{condition:<{width}}  " + (f"torch {count} thread{'s' if count > 1 else ' '} {seconds:7.3f} s"
                                           if seconds is not None else f"{'':>25}")
              + ("" if cpu is None else f"   worker CPU {cpu:.2f}"))


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10, help="iterations per measurement (default 10)")
    parser.add_argument("--threads", type=int, help="torch threads and the worker's OpenBLAS threads "
                                                    "(default: mfv.device's, the cores available)")
    parser.add_argument("--full", action="store_true", help="run the Caffe side's 10 facets for real (slow), and "
                                                           "the batched faithful row's whole schedule")
    parser.add_argument("--no-caffe", action="store_true", help="leave the Caffe side out")
    parser.add_argument("--investigate", action="store_true",
                        help="time torch's step alone, beside an idle worker and beside a busy one")
    parser.add_argument("--repeats", type=int, default=5, help="--investigate: steps per condition")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from mfv.device import configure, default_threads

    threads = args.threads or default_threads()
    if args.child:
        print(json.dumps(run_child(args.child, args.weights, None if args.full else args.iterations, threads)))
        return 0
    if args.investigate:
        investigate(threads, args.repeats)
        return 0
    configure(threads)
    n_schedule = schedule_iterations()
    with tempfile.TemporaryDirectory() as tmp:
        weights = None
        caffe = None
        if not args.no_caffe and legacy_ready():
            from porting.legacy import Worker

            weights = Path(tmp) / "xavier.caffemodel"
            with Worker(blas_threads=threads) as worker:
                worker.make_weights(PROTOTXT, weights, filler="xavier", seed=0)
                blas = worker.openblas()
                caffe = caffe_side(worker, weights, args.iterations, args.full)
            caffe["blas"] = blas
        elif not args.no_caffe:
            print("bench_mfv: the legacy stack is not built: no Caffe row (porting env status)", file=sys.stderr)
        rows = {variant: child(variant, str(weights) if weights else None,
                               None if args.full and variant == "batched-faithful" else args.iterations, threads)
                for variant in ("single", "batched-faithful", "batched-modern")}
    forward, backward = caffenet_flops()
    peak = matmul_peak()
    limit = (forward + backward) / peak

    table = []  # (name, s/iteration of one facet's work, s per 10 facets, note, rss)
    caffe_ten = None
    if caffe:
        per = statistics.median(caffe["seconds"])
        caffe_ten = caffe.get("full", FACETS * n_schedule * per)
        how = "measured" if "full" in caffe else f"estimate: 10 x {n_schedule} x median"
        table.append(("Caffe 1.0, 2016 code (10 facets in a row)", per, caffe_ten, how, None))
    single = rows["single"]
    if "seconds" in single:
        per = statistics.median(single["seconds"])
        table.append(("torch faithful, one facet at a time", per, FACETS * n_schedule * per,
                      f"estimate: 10 x {n_schedule} x median", single["rss_mb"]))
    else:
        table.append(("torch faithful, one facet at a time", None, None, single["missing"], None))
    for variant, name in (("batched-faithful", "torch faithful, 10 facets batched"),
                          ("batched-modern", "torch modern, 10 facets batched")):
        row = rows[variant]
        if "full" in row:
            per = statistics.median(row["seconds"])
            table.append((name, per / FACETS, row["full"], "measured (the whole schedule)", row["rss_mb"]))
        elif "seconds" in row:
            per = statistics.median(row["seconds"])
            table.append((name, per / FACETS, n_schedule * per, f"estimate: {n_schedule} x median batch iteration",
                          row["rss_mb"]))
        else:
            table.append((name, None, None, f"n/a ({row['missing']})", None))
    table.append(("limit: CaffeNet fwd+bwd FLOPs / matmul peak", limit, FACETS * n_schedule * limit,
                  f"{(forward + backward) / 1e9:.2f} GFLOP / {peak / 1e9:.1f} GFLOP/s", None))

    print(f"MFV, CaffeNet, mean-image schedule ({n_schedule} iterations a facet), {args.iterations} iterations "
          f"measured per row (medians), torch threads: {threads}"
          + (f"; Caffe: OpenBLAS {caffe['blas']['core']}, threads: {caffe['blas']['threads']}" if caffe else ""))
    width = max(len(r[0]) for r in table)
    print(f"{'':<{width}}  {'s/iteration':>11}  {'s/10 facets':>11}  {'x Caffe':>7}  {'peak RSS':>9}  how")
    for name, per, ten, how, rss in table:
        cells = (f"{per:11.3f}" if per is not None else f"{'n/a':>11}",
                 f"{ten:11.1f}" if ten is not None else f"{'n/a':>11}",
                 f"{caffe_ten / ten:7.2f}" if (ten and caffe_ten) else f"{'':>7}",
                 f"{rss:6.0f} MB" if rss else f"{'':>9}")
        print(f"{name:<{width}}  " + "  ".join(cells) + f"  {how}")
    print("s/iteration: one facet's iteration (batched rows: a batch iteration / 10); x Caffe: the Caffe side's "
          "seconds over the row's")
    if caffe:
        print(f"Caffe side per iteration: net (worker round trip) {statistics.median(caffe['net']):.3f} s, "
              f"TV (scikit-image 0.13.1) {statistics.median(caffe['tv']):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
