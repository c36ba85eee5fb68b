"""Caffemodel loading: our ``read_caffemodel`` against a naive protobuf parse.

Makes (once; cached) a caffemodel shaped like bvlc_reference_caffenet (the same 8 weighted
layers, 60,965,224 float32 values, seeded random, about 244 MB), then loads it in fresh
Python processes, 5 runs each (medians), with the page cache warm:

* ours:  ``porting.parse.read_caffemodel``
* naive: ``NetParameter.ParseFromString`` of the whole file + ``np.array(blob.data)`` per blob

and reports, per way: the load call's time; load + touching every value (a sum over all
blobs, so lazily mapped pages are really read); and the peak resident memory above the
process's baseline after its imports (VmHWM from /proc/self/status), also as a multiple
of the file size. Exits 1 when ours misses the issue's targets: load + touch at most
0.6 s, peak extra memory at most 1.5x the file size.

    python benchmarks/bench_load.py [--file PATH] [--format v1|v2] [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TARGET_SECONDS = 0.6
TARGET_MEMORY_RATIO = 1.5

# bvlc_reference_caffenet's weighted layers: (name, type, [blob shapes]).
CAFFENET = [
    ("conv1", "Convolution", [(96, 3, 11, 11), (96,)]),
    ("conv2", "Convolution", [(256, 48, 5, 5), (256,)]),
    ("conv3", "Convolution", [(384, 256, 3, 3), (384,)]),
    ("conv4", "Convolution", [(384, 192, 3, 3), (384,)]),
    ("conv5", "Convolution", [(256, 192, 3, 3), (256,)]),
    ("fc6", "InnerProduct", [(4096, 9216), (4096,)]),
    ("fc7", "InnerProduct", [(4096, 4096), (4096,)]),
    ("fc8", "InnerProduct", [(1000, 4096), (1000,)]),
]

# Runs in a fresh interpreter: argv = [file, way]. Prints one JSON line.
CHILD = r"""
import sys, time, json
import numpy as np
from porting import caffe_pb2
from porting.parse import read_caffemodel

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

path, way = sys.argv[1], sys.argv[2]
base = hwm_kib()
t0 = time.perf_counter()
if way == "ours":
    arrays = [b.data for blobs in read_caffemodel(path).values() for b in blobs]
else:
    net = caffe_pb2.NetParameter()
    with open(path, "rb") as f:
        net.ParseFromString(f.read())
    layers = net.layer if len(net.layer) else net.layers
    arrays = [np.array(b.data, dtype=np.float32) for l in layers for b in l.blobs]
t1 = time.perf_counter()
total = sum(float(a.sum(dtype=np.float64)) for a in arrays)
t2 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "touch": t2 - t0, "extra_kib": hwm_kib() - base,
                  "values": int(sum(a.size for a in arrays)), "checksum": total}))
"""


def make_file(path: Path, fmt: str) -> None:
    from porting.write import write_caffemodel

    rng = np.random.default_rng(2016)
    layers = [(name, kind, [(rng.standard_normal(shape, dtype=np.float32) * 0.01) for shape in shapes])
              for name, kind, shapes in CAFFENET]
    write_caffemodel(path, layers, format=fmt, net_name="CaffeNet")


def run_child(path: Path, way: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), way], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, help="caffemodel to load (made when absent)")
    parser.add_argument("--format", choices=["v1", "v2"], default="v1",
                        help="layout of the made file (the published CaffeNet file is V1)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    path = args.file or Path(tempfile.gettempdir()) / "caffe-port-harness-bench" / f"caffenet_shaped_{args.format}.caffemodel"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"making {path} ...", flush=True)
        make_file(path, args.format)
    size = path.stat().st_size
    with open(path, "rb") as f:  # warm the page cache: every run below reads from memory
        while f.read(1 << 24):
            pass

    results = {}
    for way in ("ours", "naive"):
        runs = [run_child(path, way) for _ in range(args.runs)]
        results[way] = {key: statistics.median(r[key] for r in runs) for key in ("load", "touch", "extra_kib")}
        results[way]["checksum"] = runs[0]["checksum"]
        results[way]["values"] = runs[0]["values"]
    if results["ours"]["checksum"] != results["naive"]["checksum"]:
        print("ours and naive read different values", file=sys.stderr)
        return 1

    print(f"file: {path} ({size / 1e6:.1f} MB, {results['ours']['values']:,} float32 values), "
          f"page cache warm, {args.runs} fresh processes per way, medians")
    header = ("way", "load s", "load+touch s", "peak extra MB", "x file size")
    rows = [(way, f"{r['load']:.3f}", f"{r['touch']:.3f}", f"{r['extra_kib'] * 1024 / 1e6:.1f}",
             f"{r['extra_kib'] * 1024 / size:.2f}") for way, r in results.items()]
    ours, naive = results["ours"], results["naive"]
    rows.append(("naive/ours", f"{naive['load'] / ours['load']:.1f}x", f"{naive['touch'] / ours['touch']:.1f}x",
                 f"{naive['extra_kib'] / max(ours['extra_kib'], 1):.1f}x", ""))
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())

    ratio = ours["extra_kib"] * 1024 / size
    ok = ours["touch"] <= TARGET_SECONDS and ratio <= TARGET_MEMORY_RATIO
    print(f"target: load+touch <= {TARGET_SECONDS} s and peak extra <= {TARGET_MEMORY_RATIO}x file size: "
          + ("met" if ok else "MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
