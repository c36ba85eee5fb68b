"""The long-lived reference worker: Python 3 + pycaffe inside the legacy root.

Started by the host as ``python3 -m reference.worker JOBDIR`` (PYTHONPATH=/opt/porting).
Reads one JSON message per request on stdin, answers one on stdout (framing in
reference/wire.py); arrays travel as .npy/.npz files under JOBDIR. glog and anything
printed go to stderr, which the host keeps to explain a crash.

Requests: {"id", "op", "args"}; ops: version, run_net, make_weights, train, py2.
Replies: {"id", "ok": true, "result"} or {"id", "ok": false, "error", "traceback"}.
A failed Caffe CHECK aborts this process; the host reads stderr and starts a new one.

Ops of the "py2" kind go to one long-lived ``python2.7 -m reference.worker2`` child,
started on first need; while such an op runs, the child may call back (CaffeProxy) and
this process answers with the nets it holds.
"""
import json
import os
import platform
import subprocess
import sys
import traceback

os.environ.setdefault("GLOG_logtostderr", "1")

import caffe  # noqa: E402
import google.protobuf  # noqa: E402
import numpy as np  # noqa: E402

from reference.caffe_ops import CaffeOps  # noqa: E402
from reference.wire import ChannelClosed, error_text, protocol_streams, read_message, write_message  # noqa: E402

STACK_JSON = "/opt/porting/stack.json"
BLAS = "/usr/lib/x86_64-linux-gnu/libblas.so.3"


def versions():
    info = {"python": platform.python_version(), "caffe": caffe.__version__, "numpy": np.__version__,
            "protobuf": google.protobuf.__version__, "blas": os.path.realpath(BLAS),
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "mode": "cpu"}
    try:
        with open(STACK_JSON) as handle:
            stack = json.load(handle)
        info["debian"] = dict((line.split("=")[0], stack["debian"].get(line.split("=")[0]))
                              for line in stack["pinned_debian"])
    except (OSError, ValueError, KeyError):
        info["debian"] = None
    return info


class Python2OpError(RuntimeError):
    """A Python 2 op raised; ``traceback`` is the child's."""

    def __init__(self, message, child_traceback):
        RuntimeError.__init__(self, message)
        self.traceback = child_traceback


class Python2Child(object):
    """One ``python2.7 -m reference.worker2`` process, started on first use."""

    def __init__(self, jobdir, ops):
        self.jobdir, self.ops, self.proc, self.versions = jobdir, ops, None, None

    def start(self):
        self.proc = subprocess.Popen(["python2.7", "-m", "reference.worker2", self.jobdir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        header, _ = read_message(self.proc.stdout)
        self.versions = header["versions"]

    def run(self, op, args, out):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            write_message(self.proc.stdin, {"kind": "job", "op": op, "args": args, "out": out})
            while True:
                header, arrays = read_message(self.proc.stdout)
                if header["kind"] == "done":
                    return header
                self._answer(header, arrays)
        except (ChannelClosed, BrokenPipeError):
            code = self.proc.wait()
            self.proc = None
            raise RuntimeError("the python2.7 child exited (status %s) during op %r; its stderr is in "
                               "the worker log" % (code, op))

    def _answer(self, header, arrays):
        try:
            result, out = self.ops.proxy_call(header["method"], header.get("args") or {}, arrays)
            write_message(self.proc.stdin, {"kind": "reply", "ok": True, "result": result}, out)
        except Exception as exc:  # reported to the Python 2 caller, which raises it there
            write_message(self.proc.stdin, {"kind": "reply", "ok": False, "error": error_text(exc)})

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()


def main():
    jobdir = sys.argv[1]
    inp, out = protocol_streams()
    caffe.set_mode_cpu()
    ops = CaffeOps(jobdir)
    py2 = Python2Child(jobdir, ops)
    mine = versions()
    write_message(out, {"ready": True, "versions": mine})
    while True:
        try:
            request, _ = read_message(inp)
        except ChannelClosed:
            break
        args = request.get("args") or {}
        try:
            op = request["op"]
            if op == "version":
                if args.get("python2") and py2.versions is None:
                    py2.start()
                result = {"python3": mine, "python2": py2.versions}
            elif op == "run_net":
                result = ops.run_net(**args)
            elif op == "make_weights":
                result = ops.make_weights(**args)
            elif op == "train":
                result = ops.train(**args)
            elif op == "py2":
                done = py2.run(args["op"], args["args"], args["out"])
                if not done["ok"]:
                    raise Python2OpError("python2.7 op %s: %s" % (args["op"], done["error"]),
                                         done.get("traceback", ""))
                result = done["result"]
            else:
                raise ValueError("unknown op %r" % op)
            if isinstance(result, dict) and "provenance" in result:
                result["provenance"]["versions"] = mine
            reply = {"id": request.get("id"), "ok": True, "result": result}
        except Exception as exc:  # reported to the host, which raises CaffeError
            reply = {"id": request.get("id"), "ok": False,
                     "error": str(exc) if isinstance(exc, Python2OpError) else error_text(exc),
                     "traceback": getattr(exc, "traceback", None) or traceback.format_exc()}
        write_message(out, reply)
    py2.close()


if __name__ == "__main__":
    main()
