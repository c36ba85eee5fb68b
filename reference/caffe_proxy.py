"""CaffeProxy: Python 2.7 code driving the Caffe nets of the Python 3 worker.

No pycaffe exists for Python 2 here, so a Python 2 op reaches Caffe by calling back
through the pipe it was started on; the Python 3 worker answers (reference/caffe_ops.py,
``proxy_*`` methods). Runs under Python 2.7 and 3. Arrays are float32 NCHW blobs.

    net = caffe.net("/opt/porting/jobs/.../deploy.prototxt", caffemodel, force_backward=True)
    out = net.step({"data": x}, end="fc8", top_diffs={"fc8": onehot},
                   fetch=["data/diff", "fc8/data"])   # one round trip
"""
from __future__ import absolute_import, division, print_function

from reference.wire import read_message, write_message


class CaffeProxyError(RuntimeError):
    """The Python 3 side could not do what was asked (its error message)."""


class CaffeProxy(object):
    """The Caffe side as seen from Python 2: ``net()`` loads (or reuses) a net."""

    def __init__(self, inp, out):
        self._inp, self._out = inp, out

    def call(self, method, arrays=None, **args):
        """One request and its reply: (JSON result, {name: ndarray})."""
        write_message(self._out, {"kind": "call", "method": method, "args": args}, arrays)
        header, out_arrays = read_message(self._inp)
        if header.get("kind") != "reply":
            raise CaffeProxyError("protocol error: expected a reply, got %r" % header.get("kind"))
        if not header["ok"]:
            raise CaffeProxyError(header["error"])
        return header["result"], out_arrays

    def net(self, prototxt, caffemodel=None, force_backward=True):
        """A net of the worker (built once per prototxt/caffemodel/force_backward)."""
        info, _ = self.call("load", prototxt=prototxt, caffemodel=caffemodel, force_backward=force_backward)
        return NetProxy(self, info)


class NetProxy(object):
    """One Caffe net in the worker. ``blob_shapes``: name -> shape at load time."""

    def __init__(self, proxy, info):
        self._proxy = proxy
        self.handle = info["handle"]
        self.inputs, self.outputs, self.layers = info["inputs"], info["outputs"], info["layers"]
        self.blob_shapes = dict((k, tuple(v)) for k, v in info["blobs"].items())

    def _call(self, method, arrays=None, **args):
        return self._proxy.call(method, arrays, handle=self.handle, **args)

    def set_data(self, arrays):
        """Blob name -> array into blobs' data (an input of a new shape reshapes the net)."""
        self._call("set", arrays, which="data")

    def set_diff(self, arrays):
        self._call("set", arrays, which="diff")

    def zero_diffs(self):
        self._call("zero_diffs")

    def forward(self, start=None, end=None):
        """Layers ``start`` to ``end`` (names; default all), as pycaffe's forward."""
        self._call("forward", start=start, end=end)

    def backward(self, start=None, end=None):
        """Layers ``start`` down to ``end`` (names; default all), as pycaffe's backward."""
        self._call("backward", start=start, end=end)

    def data(self, *names):
        return self._get(names, "data")

    def diff(self, *names):
        return self._get(names, "diff")

    def _get(self, names, which):
        _, arrays = self._call("get", names=list(names), which=which)
        return arrays[names[0]] if len(names) == 1 else dict((n, arrays[n]) for n in names)

    def step(self, inputs, end, top_diffs, fetch):
        """Inputs in, forward to layer ``end``, zero diffs, inject ``top_diffs``, backward
        from ``end`` to the first layer, and return {"<blob>/data|diff": array} for
        ``fetch``: one round trip per optimisation step."""
        arrays = dict(("input/" + k, v) for k, v in inputs.items())
        arrays.update(("diff/" + k, v) for k, v in top_diffs.items())
        _, out = self._call("step", arrays, end=end, fetch=list(fetch))
        return out
