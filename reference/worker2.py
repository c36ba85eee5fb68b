"""The Python 2.7 child of the reference worker (``python2.7 -m reference.worker2 JOBDIR``).

Reads {"kind": "job", "op", "args", "out"} messages from the Python 3 worker on stdin
and answers {"kind": "done", "ok", "result"} on stdout (framing: reference/wire.py).
Arguments {"__npy__": path} are loaded as arrays and {"__file__": path} become plain
paths; ndarray results are saved to ``out`` (.npz), the rest returned as JSON. While an
op runs it may send {"kind": "call"} messages (CaffeProxy) and read the replies.
"""
from __future__ import absolute_import, division, print_function

import sys
import traceback

import numpy as np

from reference import py2_ops
from reference.caffe_proxy import CaffeProxy
from reference.wire import (ChannelClosed, array_digest, error_text, load_npy, protocol_streams,
                            read_message, save_npz, sha256_file, write_message)


FILE_HASHES = {}  # (path, size, mtime) -> sha256: a 233 MB caffemodel is hashed once


def decode_args(args):
    """(keyword arguments for the op, provenance of its inputs)."""
    kwargs, arrays, files = {}, {}, {}
    for key, value in args.items():
        key = str(key)
        if isinstance(value, dict) and "__npy__" in value:
            value = load_npy(value["__npy__"])
            arrays[key] = array_digest(value)
        elif isinstance(value, dict) and "__file__" in value:
            value = str(value["__file__"])
            files[key] = sha256_file(value, FILE_HASHES)
        elif isinstance(value, type(u"")):
            value = str(value)
        kwargs[key] = value
    return kwargs, {"arrays": arrays, "files": files}


def to_json(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def run(job, proxy, versions):
    fn = py2_ops.find(job["op"])
    kwargs, inputs = decode_args(job.get("args") or {})
    if fn.needs_caffe:
        kwargs["caffe"] = proxy
    result = fn(**kwargs) or {}
    arrays = dict((k, v) for k, v in result.items() if isinstance(v, np.ndarray))
    plain = dict((k, to_json(v)) for k, v in result.items() if k not in arrays)
    provenance = {"op": "py2:" + job["op"], "seed": kwargs.get("seed"), "inputs": inputs,
                  "python2": versions}
    npz = save_npz(job["out"], arrays, provenance) if arrays else None
    return {"values": plain, "npz": npz, "provenance": provenance}


def main():
    inp, out = protocol_streams()
    proxy = CaffeProxy(inp, out)
    versions = py2_ops.versions()
    write_message(out, {"kind": "ready", "versions": versions})
    while True:
        try:
            job, _ = read_message(inp)
        except ChannelClosed:
            break
        try:
            reply = {"kind": "done", "ok": True, "result": run(job, proxy, versions)}
        except Exception as exc:  # reported to the host through the Python 3 worker
            reply = {"kind": "done", "ok": False, "error": error_text(exc),
                     "traceback": traceback.format_exc()}
        write_message(out, reply)


if __name__ == "__main__":
    sys.exit(main())
