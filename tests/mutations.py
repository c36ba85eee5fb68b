"""Mutation catalogue: classic Caffe-to-PyTorch port bugs, injected into a correct port.

Each ``Mutation`` takes a correctly loaded port (``porting.load_caffe(prototxt, caffemodel)``,
a ``CaffeNet``) and makes it wrong the way a porter would: a layer module's attributes,
weights or forward are changed on that instance (``net.graph.layer(name).module``); an
input-side bug wraps the net's treatment of its input blob. Every change lives on the
module or net instance (no closures over tensors), so ``porting.verify.float64_twin``'s
deep copy carries it into the float64 evaluation. ``layer`` is where the verifier must
say the port departs; ``net`` is the key in ``NETS`` of a net on which the bug shows.

Conventions: arrays are float32, NCHW. Pixel nets (CaffeNet, AlexNet, GoogLeNet, the
``pools`` fixture) take BGR, 0-255 minus the mean; the verifier's random inputs are
uniform in [-128, 128). The ``zoo`` fixture stands for a block in the middle of a net:
its inputs are standard normal (a normalized feature map, not pixels). Weights come from
real Caffe's fillers (``Worker.make_weights``); BatchNorm statistics and Scale parameters,
which Caffe's fillers leave at 0 and 1, are set "as if trained" by ``with_statistics``.

Used by tests/test_mutations.py (a CI subset) and benchmarks/bench_verdict.py (everything).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference-data"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mutation"
TRAINED = Path(__file__).resolve().parent / "fixtures" / "trained"
MEAN_BGR = (104.0, 117.0, 123.0)  # ImageNet mean pixel, BGR, 0-255


# --------------------------------------------------------------------------------------
# Nets
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NetSpec:
    """A net the campaign runs: prototxt, objective ("LAYER:UNIT"; None: the layer before
    the Softmax, unit 0), batch (None: the prototxt's), inputs ("pixels": uniform
    [-128, 128), BGR minus mean; "normal": N(0, 1)), ``statistics``: BatchNorm/Scale
    parameters set by ``with_statistics``, ``shared``: from the shared reference data,
    ``trained``: a tests/conftest.py TRAINED_RECIPES name (weights trained by Caffe's
    solver, inputs its held-out synthetic images: 16 x 3 x 32 x 32, not BGR/0-255)."""

    prototxt: Path
    objective: str | None = None
    batch: int | None = None
    inputs: str = "pixels"
    statistics: bool = False
    shared: bool = False
    trained: str | None = None


NETS = {
    "caffenet": NetSpec(SHARED / "mfv-original" / "deploy_alexnet_updated.prototxt", "fc8:498", 1, shared=True),
    "alexnet": NetSpec(SHARED / "bvlc-prototxt" / "bvlc_alexnet.deploy.prototxt", "fc8:498", 1, shared=True),
    "reference_caffenet": NetSpec(SHARED / "bvlc-prototxt" / "bvlc_reference_caffenet.deploy.prototxt",
                                  "fc8:498", 1, shared=True),
    "googlenet": NetSpec(SHARED / "bvlc-prototxt" / "bvlc_googlenet.deploy.prototxt", None, 1, shared=True),
    "pools": NetSpec(FIXTURES / "pools.prototxt"),
    "zoo": NetSpec(FIXTURES / "zoo.prototxt", "score:0", inputs="normal", statistics=True),
    **{name: NetSpec(TRAINED / f"{name}_deploy.prototxt", inputs="heldout", trained=name)
       for name in ("resnet_tiny", "caffenet_tiny", "deconv_tiny")},
}

# Caffe filler recipes (Worker.make_weights keywords); biases N(0, 0.1) as in `porting demo`.
FILLERS = {
    "msra": dict(filler="msra", bias_filler="gaussian", bias_std=0.1),
    "xavier": dict(filler="xavier", bias_filler="gaussian", bias_std=0.1),
    "gaussian": dict(filler="gaussian", std=0.01, bias_filler="gaussian", bias_std=0.1),
}


def make_inputs(spec: NetSpec, graph, seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 NCHW inputs for ``graph`` as ``spec`` says (see ``NetSpec``)."""
    from porting.verify import random_inputs

    if spec.inputs == "pixels":
        return random_inputs(graph, spec.batch, seed)
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in graph.inputs.items():
        shape = ((spec.batch,) + tuple(shape[1:])) if spec.batch else tuple(shape)
        out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


def with_statistics(prototxt, weights, out, seed: int = 0, factor: float = 993.3) -> Path:
    """Write to ``out`` a copy of ``weights`` with BatchNorm statistics and Scale
    parameters as training leaves them.

    BatchNorm: the per-channel mean and unbiased variance of its bottom over a
    calibration batch (inputs of seed ``seed + 1000``, the net's own input kind), stored
    as Caffe stores them: blob0 = mean * factor, blob1 = var * factor, blob2 = factor
    (993.3 = sum of 0.999^i over 5000 iterations, moving_average_fraction 0.999). Layers
    are filled in net order, each BatchNorm normalizing with its statistics before the
    next one is measured. Scale: factor U(0.5, 1.5), bias N(0, 0.5) per channel.
    """
    from porting import load_caffe
    from porting.write import write_caffemodel

    net = load_caffe(prototxt, weights)
    spec = next(s for s in NETS.values() if Path(s.prototxt) == Path(prototxt))
    rng = np.random.RandomState(seed)
    calibration = {k: torch.from_numpy(v).double() for k, v in make_inputs(spec, net.graph, seed + 1000).items()}
    net64 = net.double()
    writer: dict[str, tuple[str, int]] = {}
    with torch.no_grad():
        for layer in net64.graph.layers:
            if layer.type == "BatchNorm":
                net64(**calibration, end=layer.name)
                name, i = writer[layer.bottoms[0]]
                x = net64.layer_outputs[name][i].transpose(0, 1).reshape(layer.module.channels, -1)
                mean, var = x.mean(dim=1), x.var(dim=1, unbiased=True)
                for blob, value in zip(layer.module.blobs, (mean * factor, var * factor, torch.tensor([factor]))):
                    blob.copy_(value)
            elif layer.type == "Scale" and layer.module.blobs:
                blobs = layer.module.blobs
                blobs[0].copy_(torch.from_numpy(rng.uniform(0.5, 1.5, tuple(blobs[0].shape))))
                if layer.module.bias_term:
                    blobs[-1].copy_(torch.from_numpy(rng.normal(0.0, 0.5, tuple(blobs[-1].shape))))
            for i, top in enumerate(layer.tops):
                writer[top] = (layer.name, i)
    write_caffemodel(out, [(s.name, s.type, [b.detach().float().numpy() for b in s.module.blobs])
                           for s in net64.graph.layers if s.module.param_shapes])
    return Path(out)


# --------------------------------------------------------------------------------------
# Injection helpers
# --------------------------------------------------------------------------------------

def _module(net, layer: str):
    return net.graph.layer(layer).module


def _patch(module, name: str, fn) -> None:
    """Replace method ``name`` on this instance only (a bound method deep-copies with it)."""
    setattr(module, name, MethodType(fn, module))


def _wrap_input(net, fn) -> None:
    """The port treats its (first) input blob with ``fn`` before the first layer sees it;
    the blob the net reports is the treated one, as a port with its own preprocessing does."""
    from porting.net import CaffeNet

    def forward(self, *args, end=None, pin=None, **inputs):
        names = list(self.graph.inputs)
        inputs = {**dict(zip(names, args)), **inputs}
        inputs[names[0]] = fn(inputs[names[0]])
        return CaffeNet.forward(self, end=end, pin=pin, **inputs)

    _patch(net, "forward", forward)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(MEAN_BGR, dtype=x.dtype).reshape(1, 3, 1, 1)


# Each injector: (net, layer) -> None, changing the port in place; ``layer`` is the layer it
# breaks (for input-side bugs the Input layer, which the wrapper stands in front of).

def rgb_order(net, layer):
    _wrap_input(net, lambda x: x.flip(1))


def unit_scale(net, layer):
    _wrap_input(net, lambda x: x / 255.0)


def mean_kept(net, layer):
    _wrap_input(net, lambda x: x + _mean(x))


def pool_floor(net, layer):
    def forward(self, x):
        pool = F.max_pool2d if self.method == "MAX" else F.avg_pool2d
        return (pool(x, self.kernel, self.stride, self.pad, ceil_mode=False),)

    _patch(_module(net, layer), "forward", forward)


def pool_no_clip(net, layer):
    from porting.layers.pooling import caffe_ave_pool, caffe_max_pool, pooled_size

    def forward(self, x):
        pooled = tuple(pooled_size(s, k, st, p) for s, k, st, p in zip(x.shape[2:], self.kernel, self.stride, self.pad))
        pool = caffe_max_pool if self.method == "MAX" else caffe_ave_pool
        return (pool(x, self.kernel, self.stride, self.pad, pooled),)

    _patch(_module(net, layer), "forward", forward)


def ave_exclude_pad(net, layer):
    def forward(self, x):
        return (F.avg_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=True, count_include_pad=False),)

    _patch(_module(net, layer), "forward", forward)


def lrn_alpha_whole(net, layer):
    m = _module(net, layer)
    m.alpha = m.alpha * m.size  # the layer divides by local_size; the porter's formula did not


def lrn_k_one(net, layer):
    _module(net, layer).k = 1.0


def bn_no_factor(net, layer):
    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = (b.detach().to(x.dtype).reshape(shape) for b in self.blobs[:2])
        return ((x - mean) / torch.sqrt(var + self.eps),)

    _patch(_module(net, layer), "forward", forward)


def bn_torch_eps(net, layer):
    _module(net, layer).eps = 1e-5


def scale_no_bias(net, layer):
    _module(net, layer).bias_term = False


def ip_transposed(net, layer):
    _module(net, layer).transpose = True  # the layer then uses its (N, K) weights as (K, N)


def flatten_nhwc(net, layer):
    def forward(self, x):
        flat = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return (F.linear(flat, self.blobs[0], self.blobs[1] if self.bias_term else None),)

    _patch(_module(net, layer), "forward", forward)


def group_tiled(net, layer):
    def _convolve(self, x, weight, bias):
        return F.conv2d(x, weight.repeat(1, self.group, 1, 1), bias, self.stride, self.pad, self.dilation)

    _patch(_module(net, layer), "_convolve", _convolve)


def dropout_scaled(net, layer):
    _patch(_module(net, layer), "apply_to", lambda self, x: x * (1.0 - self.ratio))


def softmax_last_axis(net, layer):
    _patch(_module(net, layer), "forward", lambda self, x: (torch.softmax(x, dim=-1),))


def eltwise_no_coeff(net, layer):
    m = _module(net, layer)
    m.coeffs = [1.0] * len(m.coeffs)


def relu_no_slope(net, layer):
    _module(net, layer).negative_slope = 0.0


def deconv_unflipped(net, layer):
    def _convolve(self, x, weight, bias):
        return F.conv_transpose2d(x, weight.flip(2, 3), bias, self.stride, self.pad, 0, self.group, self.dilation)

    _patch(_module(net, layer), "_convolve", _convolve)


# --------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mutation:
    id: str
    bug: str                                # the bug, as a porter would make it
    net: str                                # key of NETS: a net where the bug shows
    layer: str                              # where the verifier must say the port departs
    fn: Callable[[object, str], None]       # fn(net, layer) makes a correct port wrong, in place

    def inject(self, net) -> None:
        self.fn(net, self.layer)


CATALOGUE = [
    Mutation("rgb-order", "feeds RGB (PIL/torchvision order) to a net trained on BGR", "caffenet", "input", rgb_order),
    Mutation("unit-scale", "preprocesses in 0-1 units (ToTensor: pixels / 255) where Caffe expects 0-255",
             "caffenet", "input", unit_scale),
    Mutation("mean-kept", "forgets to subtract the mean pixel (104, 117, 123 BGR)", "caffenet", "input", mean_kept),
    Mutation("pool-floor", "max_pool2d with torch's default floor rounding; Caffe rounds the pooled size up "
             "(14 -> 7, floor 6)", "pools", "pool1", pool_floor),
    Mutation("pool-clip", "ceil((H + 2p - k) / s) + 1 windows without Caffe's rule that drops a last window "
             "starting in the padding (7 -> 4, without the rule 5)", "pools", "pool2", pool_no_clip),
    Mutation("ave-divisor", "avg_pool2d(count_include_pad=False): divides by the image cells only; Caffe's "
             "divisor counts the padding", "pools", "pool3", ave_exclude_pad),
    Mutation("lrn-alpha", "LRN scale k + alpha * sum(x^2) without dividing alpha by local_size",
             "caffenet", "norm1", lrn_alpha_whole),
    Mutation("lrn-k", "LRN k hard-coded to 1 (nn.LocalResponseNorm's default) where the prototxt says k: 2",
             "caffenet_tiny", "norm1", lrn_k_one),
    Mutation("bn-factor", "BatchNorm uses blobs 0 and 1 as mean and variance, ignoring the moving-average "
             "factor in blob 2", "resnet_tiny", "bn_conv1", bn_no_factor),
    Mutation("bn-eps", "BatchNorm eps left at nn.BatchNorm2d's 1e-5 where the prototxt says 0.001",
             "zoo", "bn1", bn_torch_eps),
    Mutation("scale-bias", "Scale layer ported as a multiply only, its bias_term blob dropped",
             "resnet_tiny", "scale_conv1", scale_no_bias),
    Mutation("ip-transposed", "InnerProduct weights used as K x N (x @ W); Caffe stores num_output x K",
             "caffenet", "fc7", ip_transposed),
    Mutation("flatten-nhwc", "flattens pool5 channels-last (NHWC, TensorFlow order) before fc6",
             "caffenet", "fc6", flatten_nhwc),
    Mutation("group-ignored", "group: 2 ignored; each filter's weights tiled over all input channels",
             "caffenet", "conv2", group_tiled),
    Mutation("dropout-scaled", "Dropout multiplies by (1 - ratio) at test; Caffe's test-time Dropout is the "
             "identity (it scales at train)", "caffenet", "drop6", dropout_scaled),
    Mutation("softmax-axis", "Softmax over the last axis (dim=-1, right for N x C scores) of an N x C x H x W "
             "map; Caffe's axis is 1", "zoo", "prob", softmax_last_axis),
    Mutation("eltwise-coeff", "Eltwise SUM adds its bottoms, ignoring coeff: 1, -0.5", "deconv_tiny", "mix",
             eltwise_no_coeff),
    Mutation("relu-slope", "ReLU ported as torch.relu, negative_slope: 0.1 ignored", "caffenet_tiny", "relu1",
             relu_no_slope),
    Mutation("deconv-flip", "Deconvolution as zero-insertion upsampling plus a convolution with the kernel "
             "as stored, not flipped", "deconv_tiny", "deconv1", deconv_unflipped),
]


# --------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------

@dataclass
class Case:
    """One net with weights and inputs, and real Caffe's arrays for them (forward, and
    backward from ``objective.seed``)."""

    net: str
    prototxt: Path
    weights: Path
    inputs: dict
    objective: object
    reference: dict


def make_case(net: str, worker, make_weights=None, folder=None, filler: str = "msra", seed: int = 0,
              input_seed: int = 0, train=None) -> Case:
    """One real Caffe run (``worker.run_net``) of ``net`` and its inputs.

    Weights: Caffe's ``filler`` via ``make_weights(prototxt, seed=, **FILLERS[filler])`` (the
    tests' ``caffe_weights`` fixture), plus ``with_statistics`` where the net has
    BatchNorm (written into ``folder``); inputs of ``input_seed``. A trained net instead
    takes ``train(name)`` (the tests' ``caffe_trained`` fixture: ``.deploy``,
    ``.caffemodel``, ``.heldout``) and its held-out images; filler and seeds do not apply.
    """
    from porting import load_caffe
    from porting.verify import parse_objective

    spec = NETS[net]
    graph = load_caffe(spec.prototxt).graph
    if spec.trained:
        trained = train(spec.trained)
        weights, inputs = Path(trained.caffemodel), {"data": np.asarray(trained.heldout["data"], np.float32)}
    else:
        weights = Path(make_weights(spec.prototxt, seed=seed, **FILLERS[filler]))
        if spec.statistics:
            weights = with_statistics(spec.prototxt, weights, Path(folder) / f"{net}-{filler}-{seed}.caffemodel", seed)
        inputs = make_inputs(spec, graph, input_seed)
    objective = parse_objective(spec.objective, graph)
    batch = next(iter(inputs.values())).shape[0]
    seed_diff = objective.seed((batch,) + tuple(graph.blob_shapes[objective.blob][1:]))
    reference = worker.run_net(spec.prototxt, weights, inputs=inputs, top_diffs={objective.blob: seed_diff})
    return Case(net, spec.prototxt, weights, inputs, objective, dict(reference))


def generated_case(worker, seed: int, depth: int, focus: str, folder) -> Case:
    """A random small net of tests/property_nets.py (its weights, standard normal inputs and
    random top diff, aliasing artifacts excluded) and real Caffe's run of it."""
    import property_nets as nets

    example = nets.make_example(seed, depth, focus)
    prototxt, caffemodel = nets.write_files(example, Path(folder))
    reference = worker.run_net(prototxt, caffemodel, inputs=example.inputs,
                               top_diffs={example.diff_blob: example.top_diff})
    objective = nets.GivenDiff(example.writer[example.diff_blob], 0, example.diff_blob, example.top_diff)
    return Case(f"generated {seed}/{depth}/{focus}", prototxt, caffemodel, example.inputs, objective, dict(reference))


GENERATED = [(7000 + i, 2 + i % 3, focus) for i, focus in enumerate(
    ("conv", "deconv", "pool", "lrn", "eltwise", "batchnorm", "crop", "slice_concat") * 2)]  # (seed, depth, focus)


@dataclass
class Outcome:
    passed: bool
    departed_at: str | None
    summary: str
    flips: str = ""   # decisions Caffe and the port take differently by rounding: "layer n/total, ..."
    worst: str = ""   # the array farthest from Caffe: "key max_rel" (relative to max |caffe|)


def _outcome(v) -> Outcome:
    rounding = [f for f in getattr(v, "flips", []) if f.kind == "rounding"]
    flips = ", ".join(f"{f.layer} {f.flips}/{f.total}" for f in rounding[:2])
    flips += f" (+{len(rounding) - 2} layers)" if len(rounding) > 2 else ""
    rows = [r for r in getattr(v, "rows", []) if r.metrics is not None and r.metrics.max_rel == r.metrics.max_rel]
    worst = max(rows, key=lambda r: r.metrics.max_rel, default=None)
    return Outcome(bool(v.passed), departed_at(v), describe(v), flips,
                   f"{worst.key} {worst.metrics.max_rel:.2g}" if worst else "")


def departed_at(verification) -> str | None:
    """The layer the verification blames (``Verification.departed_at``: the earlier of the
    departure and the first shape mismatch, forward in net order, then backward)."""
    return verification.departed_at


def describe(verification) -> str:
    """One paragraph: verdict, departure, what failed, flipped decisions, first failing arrays."""
    dep = verification.departure
    parts = [getattr(verification, "summary", "") or f"passed={verification.passed}"]
    if dep is not None:
        parts.append(f"departure {dep.direction} at {dep.layer} ({dep.layer_type}) by {dep.frameworks}, "
                     f"{dep.key} error {dep.error_ratio:.3g} x bound")
    parts += list(getattr(verification, "problems", []))[:4]
    flips = getattr(verification, "flips", [])
    if flips:
        parts.append("flips: " + "; ".join(f.describe() for f in flips[:4]))
    failed = [r for r in getattr(verification, "rows", []) if not r.passed]
    if failed:
        shown = ", ".join(f"{r.key} {r.problem or format(r.metrics.max_rel, '.2g')} (tol {r.tolerance:g})"
                          for r in failed[:3])
        parts.append(f"{len(failed)} arrays beyond tolerance, e.g. {shown}")
    return "; ".join(p for p in parts if p)


def verify(net, case: Case):
    """``porting.verify.verify_port`` of ``net`` against the case's Caffe arrays."""
    from porting.verify import verify_port

    verification, _ = verify_port(net, dict(case.reference), case.inputs, case.objective)
    return verification


def run_correct(case: Case) -> Outcome:
    from porting import load_caffe

    return _outcome(verify(load_caffe(case.prototxt, case.weights), case))


def run_mutation(mutation: Mutation, case: Case) -> Outcome:
    """Load the correct port, inject the bug, verify it against the correct model's Caffe run."""
    from porting import load_caffe

    net = load_caffe(case.prototxt, case.weights)
    mutation.inject(net)
    return _outcome(verify(net, case))


def available(net: str) -> bool:
    return NETS[net].prototxt.exists()


def mutation_by_id(mid: str) -> Mutation:
    return next(m for m in CATALOGUE if m.id == mid)
