"""Time a forward+backward pass in pycaffe directly, inside the legacy root.

The baseline of benchmarks/bench_worker.py: the same work the worker's run_net does
for one input and one injected top diff, without the pipe. Prints one JSON line:
{"seconds": [...], "median": s}. Usage:
    python3 -m reference.bench_pycaffe PROTOTXT CAFFEMODEL INPUT.npy TOP_BLOB UNIT REPEATS
"""
import json
import os
import sys
import time

os.environ.setdefault("GLOG_minloglevel", "2")

import caffe  # noqa: E402
import numpy as np  # noqa: E402

from reference.caffe_ops import last_writer, read_net_parameter, write_temp_prototxt  # noqa: E402


def main(prototxt, caffemodel, input_npy, top, unit, repeats):
    caffe.set_mode_cpu()
    net_param = read_net_parameter(prototxt)
    net_param.force_backward = True
    path = write_temp_prototxt(net_param, os.path.dirname(input_npy), "bench")
    net = caffe.Net(path, caffe.TEST, weights=caffemodel)
    os.remove(path)
    x = np.load(input_npy)
    onehot = np.zeros(net.blobs[top].data.shape, np.float32)
    onehot[:, int(unit)] = 1
    start = last_writer(net, top)
    times = []
    for _ in range(int(repeats) + 1):  # the first run warms up
        t0 = time.perf_counter()
        net.blobs["data"].data[...] = x
        net.forward()
        for blob in net.blobs.values():
            blob.diff[...] = 0
        net.blobs[top].diff[...] = onehot
        net._backward(start, 0)
        grad = net.blobs["data"].diff.copy()
        out = net.blobs[top].data.copy()
        times.append(time.perf_counter() - t0)
    times = times[1:]
    print(json.dumps({"seconds": times, "median": float(np.median(times)),
                      "checksum": float(grad.sum() + out.sum())}))


if __name__ == "__main__":
    main(*sys.argv[1:])
