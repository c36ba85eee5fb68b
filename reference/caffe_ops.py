"""Caffe-side operations of the reference runner (Python 3 + pycaffe, inside the legacy root).

``run_net``: forward (and optionally backward) a net and save every blob, Caffe's own view
and each layer's own outputs. ``make_weights``: let Caffe's fillers write a caffemodel.
``train``: let Caffe's own SGD solver train a net on seeded synthetic data and save it.
``NetRegistry.call``: the methods a Python 2 ``CaffeProxy`` reaches through the pipe.

Blob arrays are float32, NCHW, in the net's own preprocessing (whatever the caller fed).
"""
import math
import os
import sys
import tempfile
import time
from collections import OrderedDict

import numpy as np

import caffe
from caffe.proto import caffe_pb2
from google.protobuf import text_format

from reference.wire import array_digest, load_npy, save_npz, sha256_file

TEST_STATE = caffe_pb2.NetState(phase=caffe_pb2.TEST)


# ---------------------------------------------------------------- prototxt editing

def read_net_parameter(path):
    net = caffe_pb2.NetParameter()
    with open(path) as handle:
        text_format.Merge(handle.read(), net)
    return net


def write_temp_prototxt(net, folder, stem):
    fd, path = tempfile.mkstemp(prefix=stem + "-", suffix=".prototxt", dir=folder)
    with os.fdopen(fd, "w") as handle:
        handle.write(text_format.MessageToString(net))
    return path


def layer_list(net):
    """The layer messages: ``layer`` (current format) or ``layers`` (V1 and V0)."""
    return net.layer if len(net.layer) else net.layers


def layer_name(layer):
    return layer.name or (layer.layer.name if hasattr(layer, "layer") else "")


def _rule_met(rule, state):
    """Caffe's Net::StateMeetsRule (net.cpp) for one NetStateRule."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stage for s in rule.stage):
        return False
    if any(s in state.stage for s in rule.not_stage):
        return False
    return True


def layer_included(layer, state=TEST_STATE):
    """Caffe's Net::FilterNet: include rules, else exclude rules, decide."""
    if len(layer.include):
        return any(_rule_met(r, state) for r in layer.include)
    return not any(_rule_met(r, state) for r in layer.exclude)


def input_blob_names(net):
    return list(net.input)


def rename_inplace_tops(net, state=TEST_STATE):
    """Give every top that overwrites an existing blob a fresh name; rewire later bottoms.

    Returns {layer name: [blob name of each top in the renamed net]} for the layers kept
    in ``state`` (the TEST phase by default). Why the renamed net computes the same numbers as the original:
    the layers Caffe runs in place (ReLU, Dropout, BatchNorm, Scale, ...) compute each
    output element from the same-position input element and read nothing else of the
    bottom after writing the top; out of place they read the same bottom values and write
    the same top values, only into a different buffer. Backward is unchanged too: ReLU's
    backward tests ``bottom > 0``, and in place that bottom already holds ``relu(x)``,
    which is positive exactly where ``x`` is; the others use the top or the same-position
    bottom value. Data flow between layers is untouched: each renamed blob is consumed by
    exactly the layers that consumed the overwritten one, in the same order.
    """
    current = dict((name, name) for name in input_blob_names(net))
    tops_by_layer = OrderedDict()
    taken = set(current)
    for layer in layer_list(net):
        if not layer_included(layer, state):
            continue
        for i, bottom in enumerate(layer.bottom):
            layer.bottom[i] = current.get(bottom, bottom)
        names = []
        for i, top in enumerate(layer.top):
            new = top
            if top in taken:  # an in-place top, or a name reused further down
                new, n = "%s@%s" % (top, layer_name(layer)), 1
                while new in taken:
                    n += 1
                    new = "%s@%s#%d" % (top, layer_name(layer), n)
                layer.top[i] = new
            taken.add(new)
            current[top] = new
            names.append(new)
        tops_by_layer[layer_name(layer)] = names
    return tops_by_layer, current


def declared_blobs(net, state=TEST_STATE):
    """Blob names the prototxt itself declares (net inputs and tops of layers kept in ``state``)."""
    names = list(input_blob_names(net))
    for layer in layer_list(net):
        if layer_included(layer, state):
            names.extend(t for t in layer.top if t not in names)
    return names


def apply_fillers(net, weight_filler, bias_filler):
    """Set ``weight_filler``/``bias_filler`` wherever a layer's parameters message has them.

    Layers with learnable weights (Convolution, Deconvolution, InnerProduct, and their V1
    and V0 forms) carry these fields; fillers are dicts of FillerParameter fields.
    """
    def fill(message, spec):
        message.Clear()
        for key, value in spec.items():
            if key == "variance_norm" and isinstance(value, str):
                value = caffe_pb2.FillerParameter.VarianceNorm.Value(value.upper())
            setattr(message, key, value)

    touched = 0
    for layer in layer_list(net):
        holders = [value for field, value in layer.ListFields()  # V0 keeps fillers in "layer"
                   if field.message_type is not None and (field.name.endswith("_param") or field.name == "layer")]
        for holder in holders:
            names = holder.DESCRIPTOR.fields_by_name
            if "weight_filler" in names:
                fill(holder.weight_filler, weight_filler)
                touched += 1
                if "bias_filler" in names and bias_filler is not None:
                    fill(holder.bias_filler, bias_filler)
    return touched


# ---------------------------------------------------------------- nets

class NetCache(object):
    """The last few nets built, keyed by what they were built from (LRU)."""

    def __init__(self, size=4):
        self.size, self.nets = size, OrderedDict()

    def get(self, key, make):
        if key in self.nets:
            self.nets.move_to_end(key)
            return self.nets[key]
        while len(self.nets) >= self.size:
            self.nets.popitem(last=False)
        value = self.nets[key] = make()
        return value


def load_net(prototxt, caffemodel, phase=caffe.TEST):
    if caffemodel:
        return caffe.Net(prototxt, phase, weights=caffemodel)
    return caffe.Net(prototxt, phase)


def log_step(what, layer):
    """A glog-like marker on stderr so a failed CHECK can be tied to the layer it ran in."""
    sys.stderr.write("I porting-worker] %s layer %s\n" % (what, layer))
    sys.stderr.flush()


def forward(net, start=0, end=None):
    """Net::ForwardFromTo, one layer per call (the same loop, with a marker per layer);
    returns the loss it sums, in float32 as Caffe's Dtype."""
    names = list(net._layer_names)
    end = len(names) - 1 if end is None else end
    loss = np.float32(0)
    for i in range(start, end + 1):
        log_step("Forward", names[i])
        loss += np.float32(net._forward(i, i))
    return loss


def backward(net, start, end=0):
    """Net::BackwardFromTo, one layer per call (same order, a marker per layer)."""
    names = list(net._layer_names)
    for i in range(start, end - 1, -1):
        log_step("Backward", names[i])
        net._backward(i, i)


def zero_blob_diffs(net):
    for blob in net.blobs.values():
        blob.diff[...] = 0


def set_inputs(net, inputs):
    reshaped = False
    for name, value in inputs.items():
        if name not in net.blobs:
            raise KeyError("the net has no blob %r to feed (blobs: %s)" % (name, ", ".join(net.blobs)))
        blob = net.blobs[name]
        if tuple(blob.data.shape) != tuple(value.shape):
            blob.reshape(*value.shape)
            reshaped = True
        blob.data[...] = value
    if reshaped:
        net.reshape()


def last_writer(net, blob):
    """Index of the last layer with ``blob`` among its tops (where backward must start)."""
    names = list(net._layer_names)
    for i in range(len(names) - 1, -1, -1):
        if blob in net.top_names[names[i]]:
            return i
    raise KeyError("no layer writes blob %r, so no diff can be injected there" % blob)


class SyntheticImages(object):
    """Seeded class-dependent images for training: float32 NCHW, labels 0..classes-1.

    Class k has its own per-channel offset (uniform in [-1, 1)) and its own stripe pattern
    cos(2 pi f_k (x cos a_k + y sin a_k) + phase), f_k in [0.1, 0.4) cycles per pixel,
    a_k in [0, pi), shown in every channel with a per-class sign; each image draws its
    own phase and adds Gaussian noise of std ``noise``. Values are then multiplied by
    ``scale`` (so with scale 1 they lie around [-3, 3]; no BGR/0-255 convention applies).
    numpy's legacy RandomState stream: the same seed gives the same images on any numpy.
    """

    def __init__(self, shape_chw, classes, seed, noise=0.5, scale=1.0):
        channels, height, width = [int(n) for n in shape_chw]
        self.rng = np.random.RandomState(int(seed))
        self.classes, self.noise, self.scale = int(classes), float(noise), float(scale)
        self.offsets = self.rng.uniform(-1, 1, (self.classes, channels, 1, 1))
        self.signs = self.rng.choice([-1.0, 1.0], (self.classes, channels, 1, 1))
        freq = self.rng.uniform(0.1, 0.4, self.classes)
        angle = self.rng.uniform(0, math.pi, self.classes)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        self.waves = 2 * math.pi * freq[:, None, None] * (xx * np.cos(angle)[:, None, None]
                                                          + yy * np.sin(angle)[:, None, None])

    def batch(self, n):
        labels = self.rng.randint(0, self.classes, int(n))
        phase = self.rng.uniform(0, 2 * math.pi, (int(n), 1, 1))
        stripes = np.cos(self.waves[labels] + phase)[:, None]  # N x 1 x H x W
        images = self.offsets[labels] + self.signs[labels] * stripes
        images = images + self.noise * self.rng.standard_normal(images.shape)
        return (self.scale * images).astype(np.float32), labels.astype(np.float32)


def solver_text(train_prototxt, iterations, seed, base_lr, momentum, weight_decay):
    """A SolverParameter (SGD, fixed rate, CPU, no test nets, no snapshots) as prototxt text."""
    solver = caffe_pb2.SolverParameter()
    solver.train_net = train_prototxt
    solver.type = "SGD"
    solver.base_lr, solver.lr_policy = float(base_lr), "fixed"
    solver.momentum, solver.weight_decay = float(momentum), float(weight_decay)
    solver.max_iter, solver.display, solver.snapshot = int(iterations), 0, 0
    solver.snapshot_after_train = False
    solver.random_seed = int(seed)
    solver.solver_mode = caffe_pb2.SolverParameter.CPU
    return text_format.MessageToString(solver)


# ---------------------------------------------------------------- operations

class CaffeOps(object):
    """State of one worker: a scratch folder, built nets, file hashes."""

    def __init__(self, jobdir):
        self.jobdir = jobdir
        self.scratch = tempfile.mkdtemp(prefix="prototxt-", dir=jobdir)
        self.hashes = {}
        self.nets = NetCache()
        self.proxy_nets = {}
        self.parsed = {}  # prototxt sha256 -> NetParameter, parsed once

    def net_parameter(self, prototxt):
        """A fresh copy of the parsed prototxt (parsed once per content)."""
        digest = self.digest(prototxt)
        if digest not in self.parsed:
            self.parsed[digest] = read_net_parameter(prototxt)
        copy = caffe_pb2.NetParameter()
        copy.CopyFrom(self.parsed[digest])
        return copy

    def digest(self, path):
        return sha256_file(path, self.hashes) if path else None

    def run_net(self, prototxt, caffemodel=None, inputs=None, blobs="all", top_diffs=None,
                capture_tops=True, params=False, out=None, net_backward=False, phase="test", seed=None):
        """Forward, optional backward from injected top diffs, everything saved to ``out``.

        Keys: blob/<name>/data (and /diff after a backward): Caffe's own view of every
        declared blob; top/<layer>/<i>/data|diff: each layer's own outputs, taken from a
        copy of the net whose in-place tops are renamed (see rename_inplace_tops);
        param/<layer>/<i> when ``params`` (and param/<layer>/<i>/diff after a backward:
        the gradient of this one backward, the param diffs being zeroed before it).
        ``phase``: "test" (Caffe's TEST phase) or "train" (TRAIN: the layers its rules keep,
        Dropout drawing masks); ``seed``: caffe.set_random_seed(seed) right before each
        forward (both passes then draw the same Dropout masks).
        ``net_backward`` (no ``top_diffs``): Net::Forward then Net::Backward as Caffe's
        Net::ForwardBackward, nothing zeroed or injected but the param diffs, each loss
        top's diff holding its loss weight (Layer::SetLossWeights); force_backward as the
        prototxt says; adds ``loss`` (the float32 sum Net::Forward returns) and the diffs.
        """
        inputs = dict((k, load_npy(v)) for k, v in (inputs or {}).items())
        diffs = dict((k, load_npy(v)) for k, v in (top_diffs or {}).items())
        if net_backward and diffs:
            raise ValueError("net_backward seeds the loss tops' diffs with their loss weights: give no top_diffs")
        backward_pass = bool(diffs) or bool(net_backward)
        proto_sha, model_sha = self.digest(prototxt), self.digest(caffemodel)
        if phase not in ("test", "train"):
            raise ValueError("phase must be 'test' or 'train', got %r" % (phase,))
        state = caffe_pb2.NetState(phase=caffe_pb2.TRAIN if phase == "train" else caffe_pb2.TEST)
        original = self.net_parameter(prototxt)
        wanted = declared_blobs(original, state) if blobs == "all" else list(blobs)
        result = OrderedDict()

        def build(variant):
            net_param = self.net_parameter(prototxt)
            if variant == "renamed":
                rename_inplace_tops(net_param, state)
            if diffs:
                net_param.force_backward = True
            path = write_temp_prototxt(net_param, self.scratch, variant)
            try:
                return load_net(path, caffemodel, caffe.TRAIN if phase == "train" else caffe.TEST)
            finally:
                os.remove(path)

        key = (proto_sha, model_sha, bool(diffs), phase) + (("net_backward",) if net_backward else ())
        net = self.nets.get(key + ("original",), lambda: build("original"))
        loss = self._pass(net, inputs, diffs, net_backward, seed)
        if net_backward:
            result["loss"] = np.array(loss, np.float32)
        for name in wanted:
            if name not in net.blobs:
                raise KeyError("the net has no blob %r" % name)
            result["blob/%s/data" % name] = net.blobs[name].data.copy()
            if backward_pass:
                result["blob/%s/diff" % name] = net.blobs[name].diff.copy()
        if params:
            for layer, blobs_ in net.params.items():
                for i, blob in enumerate(blobs_):
                    result["param/%s/%d" % (layer, i)] = blob.data.copy()
                    if backward_pass:
                        result["param/%s/%d/diff" % (layer, i)] = blob.diff.copy()
        if capture_tops:
            renamed = self.nets.get(key + ("renamed",), lambda: build("renamed"))
            _, current = rename_inplace_tops(self.net_parameter(prototxt), state)
            self._pass(renamed, inputs, dict((current[k], v) for k, v in diffs.items()), net_backward, seed)
            only = None if capture_tops is True else set(capture_tops)
            declared = set(layer_name(layer) for layer in layer_list(original))
            # Caffe's own layer list: it includes the "input" layer that Caffe's upgrade
            # makes of legacy `input:` fields, and the Split layers it inserts (skipped).
            for index, layer in enumerate(renamed._layer_names):
                if renamed.layers[index].type == "Split" and layer not in declared:
                    continue
                if only is not None and layer not in only:
                    continue
                for i, name in enumerate(renamed.top_names[layer]):
                    result["top/%s/%d/data" % (layer, i)] = renamed.blobs[name].data.copy()
                    if backward_pass:
                        result["top/%s/%d/diff" % (layer, i)] = renamed.blobs[name].diff.copy()
        provenance = {
            "op": "run_net", "seed": None if seed is None else int(seed), "phase": phase,
            "inputs": {"prototxt": proto_sha, "caffemodel": model_sha,
                       "arrays": dict([("input/" + k, array_digest(v)) for k, v in inputs.items()]
                                      + [("top_diff/" + k, array_digest(v)) for k, v in diffs.items()])},
        }
        if net_backward:
            provenance["net_backward"] = True
        save_npz(out, result, provenance)
        return {"npz": out, "provenance": provenance}

    def _pass(self, net, inputs, diffs, net_backward=False, seed=None):
        set_inputs(net, inputs)
        if seed is not None:  # Caffe's generator, as Dropout at TRAIN draws from it
            caffe.set_random_seed(int(seed))
        loss = forward(net)
        if net_backward:  # Net::Backward: the loss tops' diffs hold their loss weights
            for blobs_ in net.params.values():
                for blob in blobs_:
                    blob.diff[...] = 0
            backward(net, len(net.layers) - 1)
        elif diffs:
            zero_blob_diffs(net)
            for blobs_ in net.params.values():  # Caffe accumulates param diffs across backwards
                for blob in blobs_:
                    blob.diff[...] = 0
            start = 0
            for name, value in diffs.items():
                net.blobs[name].diff[...] = value
                start = max(start, last_writer(net, name))
            backward(net, start)
        return loss

    def make_weights(self, prototxt, out, weight_filler, bias_filler=None, seed=0):
        """Build the net with the fillers injected, seeded, and ``net.save`` it to ``out``."""
        net_param = read_net_parameter(prototxt)
        if apply_fillers(net_param, weight_filler, bias_filler) == 0:
            raise ValueError("no layer of %s has weights to fill" % os.path.basename(prototxt))
        path = write_temp_prototxt(net_param, self.scratch, "fillers")
        try:
            caffe.set_random_seed(int(seed))
            net = caffe.Net(path, caffe.TEST)
        finally:
            os.remove(path)
        tmp = out + ".tmp"
        net.save(tmp)
        os.rename(tmp, out)
        provenance = {"op": "make_weights", "seed": int(seed), "seeded_by": "caffe.set_random_seed",
                      "weight_filler": weight_filler, "bias_filler": bias_filler,
                      "inputs": {"prototxt": self.digest(prototxt)},
                      "output": {"caffemodel": self.digest(out)}}
        return {"caffemodel": out, "provenance": provenance}

    def train(self, train_prototxt, out, iterations, seed=0, base_lr=0.01, momentum=0.9,
              weight_decay=5e-4, classes=4, noise=0.5, scale=1.0, heldout=16, data_blob="data",
              label_blob="label", loss_blob="loss", deploy_prototxt=None, heldout_out=None):
        """Train with Caffe's SGDSolver on SyntheticImages and ``net.save`` the TRAIN net to ``out``.

        Each iteration fills blob ``data_blob`` (N x C x H x W, the Input layer's shape) and
        ``label_blob`` (N) with a fresh batch, then ``solver.step(1)``; ``loss_blob`` is read
        after each step (the loss of that batch before the update). BatchNorm layers run in
        TRAIN phase and accumulate their moving statistics as in any Caffe training. With
        ``deploy_prototxt``, every deploy layer with blobs must find a trained layer of the
        same name (Caffe would silently keep filler values otherwise) and the deploy net
        must load the saved file. ``heldout`` images of a fresh batch go to ``heldout_out``.
        """
        iterations, classes = int(iterations), int(classes)
        if iterations < 1 or classes < 2:
            raise ValueError("need iterations >= 1 and classes >= 2 (got %d, %d)" % (iterations, classes))
        proto_sha = self.digest(train_prototxt)
        fd, solver_path = tempfile.mkstemp(prefix="solver-", suffix=".prototxt", dir=self.scratch)
        text = solver_text(train_prototxt, iterations, seed, base_lr, momentum, weight_decay)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        try:
            solver = caffe.SGDSolver(solver_path)  # seeds Caffe's RNG (fillers, Dropout) first
        finally:
            os.remove(solver_path)
        net = solver.net
        for name in (data_blob, label_blob, loss_blob):
            if name not in net.blobs:
                raise ValueError("the training net has no blob %r (blobs: %s)" % (name, ", ".join(net.blobs)))
        if len(net.blobs[data_blob].data.shape) != 4:
            raise ValueError("blob %r must be N x C x H x W, is %s" % (data_blob, net.blobs[data_blob].data.shape))
        batch = net.blobs[data_blob].data.shape[0]
        if net.blobs[label_blob].data.size != batch:
            raise ValueError("blob %r holds %d values; one label per image (%d) expected"
                             % (label_blob, net.blobs[label_blob].data.size, batch))
        data = SyntheticImages(net.blobs[data_blob].data.shape[1:], classes, seed, noise, scale)
        losses, started = [], time.time()
        for step in range(iterations):
            images, labels = data.batch(batch)
            net.blobs[data_blob].data[...] = images
            net.blobs[label_blob].data[...] = labels.reshape(net.blobs[label_blob].data.shape)
            solver.step(1)
            loss = float(net.blobs[loss_blob].data.ravel()[0])
            if not math.isfinite(loss):
                raise ValueError("training diverged: loss %r at iteration %d (lower base_lr)" % (loss, step))
            losses.append(loss)
        seconds = time.time() - started
        tmp = out + ".tmp"
        net.save(tmp)
        os.rename(tmp, out)
        if deploy_prototxt:
            deploy = load_net(deploy_prototxt, out)
            lacking = [name for name in deploy.params if name not in net.params]
            if lacking:
                raise ValueError("deploy layer(s) %s have blobs but the training net has no layer of that "
                                 "name, so they would keep filler values" % ", ".join(lacking))
        if heldout_out:
            images, labels = data.batch(int(heldout))
            save_npz(heldout_out, {"data": images, "label": labels})
        provenance = {"op": "train", "seed": int(seed), "seeded_by": "SolverParameter.random_seed",
                      "solver": text.replace(train_prototxt, os.path.basename(train_prototxt)),
                      "data": {"generator": "SyntheticImages", "classes": classes, "noise": float(noise),
                               "scale": float(scale), "batch": int(batch), "numpy_stream": "RandomState"},
                      "iterations": iterations, "loss_first": losses[0], "loss_last": losses[-1],
                      "losses": losses, "train_seconds": seconds,
                      "inputs": {"train_prototxt": proto_sha, "deploy_prototxt": self.digest(deploy_prototxt)},
                      "output": {"caffemodel": self.digest(out)}}
        return {"caffemodel": out, "provenance": provenance}

    # ------------------------------------------------------------ CaffeProxy methods

    def proxy_call(self, method, args, arrays):
        """One request from a Python 2 CaffeProxy: (JSON result, arrays)."""
        handler = getattr(self, "proxy_" + method, None)
        if handler is None or method == "call":
            raise ValueError("unknown CaffeProxy method %r" % method)
        return handler(arrays=arrays, **args)

    def _proxy_net(self, handle):
        if handle not in self.proxy_nets:
            raise KeyError("no net with handle %r (load it first)" % handle)
        return self.proxy_nets[handle]

    def proxy_load(self, prototxt, caffemodel=None, force_backward=True, arrays=None):
        key = "%s:%s:%d" % (self.digest(prototxt)[:16], (self.digest(caffemodel) or "none")[:16],
                            int(force_backward))
        if key not in self.proxy_nets:
            net_param = read_net_parameter(prototxt)
            net_param.force_backward = bool(force_backward)
            path = write_temp_prototxt(net_param, self.scratch, "proxy")
            try:
                self.proxy_nets[key] = load_net(path, caffemodel)
            finally:
                os.remove(path)
        net = self.proxy_nets[key]
        return {"handle": key, "inputs": list(net.inputs), "outputs": list(net.outputs),
                "layers": list(net._layer_names),
                "blobs": OrderedDict((k, list(v.data.shape)) for k, v in net.blobs.items())}, {}

    def proxy_set(self, handle, which, arrays=None):
        """Copy arrays into blobs' data or diff (data of a differently shaped input reshapes)."""
        net = self._proxy_net(handle)
        if which == "data":
            set_inputs(net, arrays)
        else:
            for name, value in arrays.items():
                net.blobs[name].diff[...] = value
        return {}, {}

    def proxy_get(self, handle, names, which="data", arrays=None):
        net = self._proxy_net(handle)
        return {}, dict((n, getattr(net.blobs[n], which).copy()) for n in names)

    def _index(self, net, layer, default):
        return default if layer is None else list(net._layer_names).index(layer)

    def proxy_forward(self, handle, start=None, end=None, arrays=None):
        net = self._proxy_net(handle)
        forward(net, self._index(net, start, 0), self._index(net, end, len(net.layers) - 1))
        return {}, {}

    def proxy_backward(self, handle, start=None, end=None, arrays=None):
        net = self._proxy_net(handle)
        backward(net, self._index(net, start, len(net.layers) - 1), self._index(net, end, 0))
        return {}, {}

    def proxy_zero_diffs(self, handle, arrays=None):
        zero_blob_diffs(self._proxy_net(handle))
        return {}, {}

    def proxy_step(self, handle, end, fetch, arrays=None):
        """One round trip: arrays "input/<blob>" into blobs' data, forward to layer ``end``,
        zero every diff, arrays "diff/<blob>" into blobs' diff, backward from ``end`` to
        the first layer; return "<blob>/data" or "<blob>/diff" for each entry of ``fetch``."""
        net = self._proxy_net(handle)
        set_inputs(net, dict((k[len("input/"):], v) for k, v in arrays.items() if k.startswith("input/")))
        stop = self._index(net, end, len(net.layers) - 1)
        forward(net, 0, stop)
        zero_blob_diffs(net)
        for key, value in arrays.items():
            if key.startswith("diff/"):
                net.blobs[key[len("diff/"):]].diff[...] = value
        backward(net, stop, 0)
        out = {}
        for item in fetch:
            blob, which = item.rsplit("/", 1)
            if which not in ("data", "diff"):
                raise ValueError("fetch %r: expected <blob>/data or <blob>/diff" % item)
            out[item] = getattr(net.blobs[blob], which).copy()
        return {}, out
