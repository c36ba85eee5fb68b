"""How much error is acceptable, and how much float32 arithmetic can explain.

Two different questions, two parts:

* ``Tolerances``: the pass/fail bound a person sets on the Caffe-vs-port comparison,
  per layer type (``--tolerance Convolution=1e-5,LRN.diff=2e-5,default=1e-4`` or a JSON
  file). A tolerance bounds the *relative* error of a blob: max |port - caffe| divided by
  max |caffe| over that blob. Defaults and the measurement behind each are in
  ``DEFAULT_TOLERANCES``.
* ``forward_bound`` / ``backward_bound``: the worst-case error that float32 rounding can
  add inside one layer, element by element, given that layer's own inputs (the classical
  a-priori bounds of Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
  ch. 3: a sum or dot product of n terms computed in any order satisfies
  |fl(s) - s| <= gamma_n * sum |terms|, gamma_n = n*u / (1 - n*u), u = 2**-24). They are
  what ``porting.verify`` uses to decide whether a framework's error at a layer is
  "within float32 rounding". Where Caffe's own CPU algorithm has a longer chain of
  roundings than the textbook one (LRN's running sum over channels), the bound follows
  Caffe's algorithm. Every operation may also underflow: each product or quotient gets an
  absolute ``ETA = 2**-150`` (gradual underflow; a framework that flushes subnormals to
  zero can exceed this, and should be caught). Bounds are first order in u.
  A layer type without a rule here gets ``None``: its local error is reported, not judged.
"""
from __future__ import annotations

import copy
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from porting.errors import PortingError

U = 2.0 ** -24   # unit roundoff of IEEE float32, round to nearest
ETA = 2.0 ** -150  # absolute error of one product/quotient that underflows (gradual underflow)


def gamma(n: float) -> float:
    """Higham's gamma_n = n*u / (1 - n*u): the relative bound on a chain of n roundings."""
    return n * U / (1.0 - n * U)


# --------------------------------------------------------------------------------------
# Pass/fail tolerances
# --------------------------------------------------------------------------------------

# Relative error bounds (max |diff| / max |ref| over a blob) by layer type, and where each
# number comes from. ".data" / ".diff" suffixes restrict a rule to forward values or to
# gradients. "default" applies to every other type.
#
# Measured: real Caffe 1.0 (legacy stack, OpenBLAS, CPU) against this port, 12 runs: the
# MFV CaffeNet deploy net, BVLC AlexNet and BVLC GoogLeNet, each with Caffe's "msra" and
# "gaussian" (std 0.01) weight fillers (bias gaussian std 0.1) and seeds 1 and 2, seeded
# random inputs in [-128, 128) (batch 2, GoogLeNet 1), objective the unit before Softmax.
# Each rule is ten times the largest difference measured for that layer type, rounded up
# to one significant digit. Gradients: only the 7 runs where no decision flipped; in the
# other 5 a ReLU input or a max-pooling tie within rounding of its kink moved a gradient by
# up to 90 % in both frameworks alike (see porting.verify), which no tolerance should hide.
_MEASURED = "10x the largest Caffe-vs-port difference in 12 runs (CaffeNet, AlexNet, GoogLeNet; msra and gaussian weights)"
DEFAULT_TOLERANCES: dict[str, float] = {
    "default": 1e-4,
    "Input.data": 0.0,
    "Convolution.data": 2e-5, "InnerProduct.data": 1e-5, "LRN.data": 3e-5, "Pooling.data": 2e-5,
    "ReLU.data": 2e-5, "Softmax.data": 2e-5, "Concat.data": 2e-5, "Dropout.data": 1e-5,
    "Input.diff": 2e-5, "Convolution.diff": 2e-5, "InnerProduct.diff": 5e-6, "LRN.diff": 1e-5,
    "Pooling.diff": 2e-5, "ReLU.diff": 2e-5, "Dropout.diff": 5e-6,
}
DEFAULT_SOURCES: dict[str, str] = {
    "default": "the issue's acceptance bound (1e-4 relative to the blob's largest element), for types "
               "without a measurement",
    "Input.data": "the input is copied: measured exactly 0 in all 12 runs",
    "Convolution.data": f"{_MEASURED}: max 1.66e-6 (GoogLeNet, msra)",
    "InnerProduct.data": f"{_MEASURED}: max 9.4e-7 (AlexNet fc8, msra)",
    "LRN.data": f"{_MEASURED}: max 2.7e-6 (AlexNet norm2, msra)",
    "Pooling.data": f"{_MEASURED}: max 1.72e-6 (AlexNet pool2, msra)",
    "ReLU.data": f"{_MEASURED}: max 1.83e-6 (GoogLeNet, msra)",
    "Softmax.data": f"{_MEASURED}: max 1.43e-6 (CaffeNet prob, msra)",
    "Concat.data": f"{_MEASURED}: max 1.21e-6 (GoogLeNet inception_3b/output, gaussian)",
    "Dropout.data": f"{_MEASURED}: max 8.7e-7 (AlexNet drop7, msra)",
    "Input.diff": f"{_MEASURED}, gradients of the 7 runs without flipped decisions: max 1.05e-6 (AlexNet)",
    "Convolution.diff": f"{_MEASURED}, gradients of the 7 runs without flipped decisions: max 1.06e-6 (AlexNet)",
    "InnerProduct.diff": f"{_MEASURED}, gradients of the 7 runs without flipped decisions: max 4.6e-7 (CaffeNet fc6)",
    "LRN.diff": f"{_MEASURED}, gradients of the 7 runs without flipped decisions: max 9.2e-7 (AlexNet norm1)",
    "Pooling.diff": f"{_MEASURED}, gradients of the 7 runs without flipped decisions: max 1.14e-6 (CaffeNet pool1)",
    "ReLU.diff": f"{_MEASURED}, gradients of the 7 runs without flipped decisions: max 1.06e-6 (AlexNet relu2)",
    "Dropout.diff": f"{_MEASURED}, gradients of the 7 runs without flipped decisions: max 4.6e-7 (CaffeNet drop6)",
}


@dataclass
class Tolerances:
    """Relative tolerance per layer type, with a source for each rule.

    ``for_layer(type, kind)`` resolves, most specific first: ``Type.kind``, ``Type``,
    ``default.kind``, ``default``; ``kind`` is "data" (forward) or "diff" (gradient).
    """

    rules: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    sources: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SOURCES))

    def rule_for(self, layer_type: str, kind: str = "data") -> str:
        for name in (f"{layer_type}.{kind}", layer_type, f"default.{kind}", "default"):
            if name in self.rules:
                return name
        return "default"

    def for_layer(self, layer_type: str, kind: str = "data") -> float:
        return self.rules.get(self.rule_for(layer_type, kind), DEFAULT_TOLERANCES["default"])

    def source_for(self, layer_type: str, kind: str = "data") -> str:
        return self.sources.get(self.rule_for(layer_type, kind), "")

    def updated(self, overrides: dict[str, float], source: str) -> "Tolerances":
        """These rules with ``overrides`` on top. A rule for a bare type ("LRN") replaces every
        existing rule of that type ("LRN.data", "LRN.diff") unless the overrides name those too;
        "default" replaces only the fallback for types without a rule of their own."""
        rules, sources = dict(self.rules), dict(self.sources)
        for name in overrides:
            if "." not in name and name != "default":
                for kind in ("data", "diff"):
                    if f"{name}.{kind}" not in overrides:
                        rules.pop(f"{name}.{kind}", None)
                        sources.pop(f"{name}.{kind}", None)
        for name, value in overrides.items():
            rules[name] = value
            sources[name] = source
        return Tolerances(rules, sources)

    def to_json(self) -> dict:
        return {"rules": dict(self.rules), "sources": dict(self.sources)}

    @classmethod
    def from_json(cls, obj: dict) -> "Tolerances":
        return cls(dict(obj["rules"]), dict(obj.get("sources", {})))


def parse_tolerances(spec: str | os.PathLike | None, known_types=None,
                     base: Tolerances | None = None) -> Tolerances:
    """Defaults overridden by ``spec``: "Type=1e-5,Type.diff=2e-5,default=1e-4" or a JSON file.

    A bare type sets both kinds of that type; "default" sets the fallback for types that
    have no rule (see ``Tolerances.updated``).

    The JSON file holds either {"Type": number, ...} or {"rules": {...}, "sources": {...}}.
    ``known_types`` (e.g. the layer registry) rejects misspelled type names. Bad input is a
    PortingError naming the spec and the offending entry.
    """
    base = base or Tolerances()
    if spec is None or str(spec).strip() == "":
        return base
    text = str(spec)
    if text.lower().endswith(".json") or (os.path.sep in text and "=" not in text):
        try:
            with open(text, encoding="utf-8") as f:
                obj = json.load(f)
        except OSError as err:
            raise PortingError(f"cannot read tolerance file: {err.strerror}", text) from None
        except json.JSONDecodeError as err:
            raise PortingError(f"not JSON: {err.msg}", text, f"line {err.lineno}") from None
        if not isinstance(obj, dict):
            raise PortingError("expected a JSON object of layer type -> number", text)
        rules = obj.get("rules", obj) if isinstance(obj.get("rules"), dict) else obj
        overrides = {str(k): _tolerance_value(v, text, str(k)) for k, v in rules.items() if k != "sources"}
        source = f"user file {os.path.basename(text)}"
    else:
        overrides = {}
        for entry in filter(None, (e.strip() for e in text.split(","))):
            name, sep, value = entry.partition("=")
            if not sep or not name.strip():
                raise PortingError("expected Type=number", "--tolerance", entry)
            overrides[name.strip()] = _tolerance_value(value.strip(), "--tolerance", entry)
        source = "user override (--tolerance)"
    for name in overrides:
        type_name, _, kind = name.partition(".")
        if kind and kind not in ("data", "diff"):
            raise PortingError(f"suffix must be .data or .diff, got .{kind}", "--tolerance", name)
        if known_types is not None and type_name != "default" and type_name not in known_types:
            raise PortingError("unknown layer type", "--tolerance", name)
    return base.updated(overrides, source)


def _tolerance_value(value, where: str, entry: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PortingError(f"not a number: {value!r}", where, entry) from None
    if not math.isfinite(number) or number < 0:
        raise PortingError(f"tolerance must be a finite number >= 0, got {value!r}", where, entry)
    return number


# --------------------------------------------------------------------------------------
# Float32 rounding bounds, one layer at a time
# --------------------------------------------------------------------------------------
# All tensors here are float64. ``bottoms`` are the layer's inputs as the framework under
# test saw them, ``tops`` its outputs as that framework produced them, ``exact_tops`` the
# float64 evaluation of the layer on those same bottoms, ``top_diffs`` the gradients the
# framework received. Each function returns one bound tensor per top (forward) or per
# bottom (backward; None where no gradient flows), or None when the type has no rule.

EXACT_TYPES = {"Input", "Split", "Concat", "Slice", "Flatten", "Reshape", "Crop", "Silence",
               "Dropout", "ArgMax"}


@contextmanager
def magnitude_twin(module):
    """A copy of ``module`` whose parameters are their absolute values (None if it has none).

    Applied to |x| it gives the sum of |terms| a dot-product bound needs. Made once per
    layer and shared by every framework checked there; dropped on exit.
    """
    if not any(True for _ in module.parameters()):
        yield None
        return
    nested = any(m is not module and any(True for _ in m.parameters(recurse=False)) for m in module.modules())
    if nested:  # parameters in sub-modules: copy the whole thing
        twin = copy.deepcopy(module)
        for p in twin.parameters():
            p.data = p.data.abs()
    else:  # share everything but the parameters (no copy of the weights besides |W|)
        twin = copy.copy(module)
        twin._parameters = {k: (None if p is None else torch.nn.Parameter(p.detach().abs(), requires_grad=False))
                            for k, p in module._parameters.items()}
    yield twin


@contextmanager
def _abs_weights(module, twin=None):
    """``twin`` when given, else ``module`` with its parameters replaced by |parameters| for a while."""
    if twin is not None:
        yield twin
        return
    saved = [p.data for p in module.parameters()]
    try:
        for p in module.parameters():
            p.data = p.data.abs()
        yield module
    finally:
        for p, data in zip(module.parameters(), saved):
            p.data = data


def _weight_terms(spec, module) -> tuple[int, int]:
    """(terms per output in forward, terms per input in backward) of a dot-product layer."""
    w = tuple(module.blobs[0].shape)
    if spec.type == "InnerProduct":
        transpose = spec.param.inner_product_param.transpose
        k, n = (w[0], w[1]) if transpose else (w[1], w[0])
        return k, n
    group = max(1, int(spec.param.convolution_param.group or 1))
    kernel = math.prod(w[2:])
    if spec.type == "Convolution":  # w = (C_out, C_in/g, k...)
        return w[1] * kernel, (w[0] // group) * kernel
    return (w[0] // group) * kernel, w[1] * kernel  # Deconvolution: w = (C_in, C_out/g, k...)


def _pool_overlap(spec) -> int:
    """How many pooling windows can cover one input element (ceil(k/s) per axis)."""
    p = spec.param.pooling_param
    if p.global_pooling:
        return 1
    kh = p.kernel_h or (p.kernel_size or 1)
    kw = p.kernel_w or (p.kernel_size or 1)
    sh = p.stride_h or (p.stride or 1)
    sw = p.stride_w or (p.stride or 1)
    return math.ceil(kh / sh) * math.ceil(kw / sw)


def _pool_size(spec, shape) -> int:
    p = spec.param.pooling_param
    if p.global_pooling:
        return math.prod(shape[2:])
    kh = p.kernel_h or (p.kernel_size or 1)
    kw = p.kernel_w or (p.kernel_size or 1)
    return kh * kw


def _vjp(module, bottoms, grads):
    xs = [b.detach().clone().requires_grad_(True) for b in bottoms]
    with torch.enable_grad():
        ys = module(*xs)
        pairs = [(y, g) for y, g in zip(ys, grads) if g is not None and y.requires_grad]
        if not pairs:
            return [None] * len(xs)
        out = torch.autograd.grad([y for y, _ in pairs], xs, [g for _, g in pairs], allow_unused=True)
    return [None if o is None else o.detach() for o in out]


def _channel_window_sum(v, size: int):
    """Sum over Caffe's LRN channel window (pre_pad = (size - 1) / 2 before, the rest after)."""
    pad = (size - 1) // 2
    c = v.shape[1]
    last = v.movedim(1, -1)
    padded = torch.nn.functional.pad(last, (pad + 1, size - 1 - pad))  # one extra zero in front for cumsum
    csum = torch.cumsum(padded, dim=-1)
    return (csum[..., size:size + c] - csum[..., 0:c]).movedim(-1, 1)


def _lrn_scale(x, size: int, alpha: float, k: float):
    """s = k + alpha/size * (window sum over channels of x^2), float64 (N, C, ...)."""
    return k + alpha / size * _channel_window_sum(x * x, size)


def _lrn_scale_error(x, s, size: int, alpha: float, k: float):
    """Bound on |fl(s) - s| for Caffe's CPU LRN: a running sum over all C channels.

    Caffe (lrn_layer.cpp, CrossChannelForward_cpu) slides the window by adding the new
    channel's alpha/size*x^2 and subtracting the old one, so the rounding of every partial
    sum along the channel axis stays in the scale. Each partial sum is at most
    k + alpha/size * sum over all channels of x^2 (= s_max); there are at most 2C + size + 2
    roundings on the chain, and each window term carries gamma_2 of its own.
    """
    c = x.shape[1]
    s_max = k + alpha / size * (x * x).sum(dim=1, keepdim=True)
    return gamma(2 * c + size + 4) * s_max + gamma(2) * (s - k) + size * ETA


def forward_bound(spec, module, bottoms, exact_tops, abs_module=None):
    """Element-wise bound on the float32 rounding error of one layer's forward pass.

    Returns a list (one tensor per top) or None for a type without a rule.
    """
    t = spec.type
    x = bottoms[0] if bottoms else None
    y = list(exact_tops)
    if t in EXACT_TYPES:
        return [torch.zeros_like(top) for top in y]
    if t == "ReLU":
        slope = spec.param.relu_param.negative_slope
        return [torch.zeros_like(x) if slope == 0 else U * y[0].abs() + ETA]
    if t in ("Convolution", "InnerProduct", "Deconvolution"):
        n_fwd, _ = _weight_terms(spec, module)
        with torch.no_grad(), _abs_weights(module, abs_module) as magnitude:
            mag = magnitude(x.abs())[0]
        return [gamma(n_fwd + 1) * mag + (n_fwd + 1) * ETA]
    if t == "Pooling":
        method = spec.param.pooling_param.pool
        if method == 0:  # MAX: a comparison, exact
            return [torch.zeros_like(t_) for t_ in y]
        if method == 1:  # AVE: sum of k terms then one division
            with torch.no_grad():
                mag = module(x.abs())[0]
            return [gamma(_pool_size(spec, x.shape) + 1) * mag + ETA]
        return None
    if t == "LRN":
        p = spec.param.lrn_param
        size, alpha, beta, k = p.local_size, p.alpha, p.beta, p.k
        if p.norm_region == 0:  # ACROSS_CHANNELS
            s = _lrn_scale(x, size, alpha, k)
            ds = _lrn_scale_error(x, s, size, alpha, k)
            # y = x * s^-beta: beta*ds/s from the scale, pow (<= 1 ulp = 2u), one product.
            return [(beta * ds / s + 4 * U) * y[0].abs() + 2 * ETA]
        # WITHIN_CHANNEL: Caffe chains Power (square), AVE pooling over size^2, Power, Eltwise PROD.
        return [(beta * gamma(size * size + 4) + 6 * U) * y[0].abs() + 3 * ETA]
    if t == "Softmax":
        axis = spec.param.softmax_param.axis if spec.param.HasField("softmax_param") else 1
        axis = axis % x.dim()
        m = x.amax(dim=axis, keepdim=True)
        spread = (x - m).abs()
        n = x.shape[axis]
        # y_i = exp(d_i) / sum_j exp(d_j), d = x - max: rounding d_i moves exp(d_i) by |d_i| u
        # (relative), in y_i's numerator and in the sum's largest term; the sum of n terms adds
        # gamma_{n-1}; exp itself (up to 3.5 ulp = 7u in vectorised libraries, twice), the
        # quotient (or reciprocal and product) the rest.
        rel = U * (spread + spread.amax(dim=axis, keepdim=True)) + gamma(n + 16)
        return [rel * y[0].abs() + 2 * ETA]
    if t == "Eltwise":
        p = spec.param.eltwise_param
        op = p.operation
        if op == 2:  # MAX
            return [torch.zeros_like(y[0])]
        if op == 0:  # PROD
            return [gamma(len(bottoms)) * y[0].abs() + len(bottoms) * ETA]
        coeffs = list(p.coeff) or [1.0] * len(bottoms)
        mag = sum(abs(c) * b.abs() for c, b in zip(coeffs, bottoms))
        return [gamma(2 * len(bottoms)) * mag + len(bottoms) * ETA]
    if t in ("TanH", "Sigmoid"):
        # libm / vectorised tanh, exp: within 3.5 ulp (7u); one more rounding for Sigmoid's 1/(1+e).
        return [8 * U * y[0].abs() + ETA]
    if t == "AbsVal":
        return [torch.zeros_like(y[0])]
    if t == "Bias" and len(bottoms) == 1:
        return [U * y[0].abs() + ETA]
    if t == "Scale" and len(bottoms) == 1:
        # y = x * s (+ b): one product, one sum, bounded with |s| and |b|.
        with torch.no_grad(), _abs_weights(module, abs_module) as magnitude:
            mag = magnitude(x.abs())[0]
        return [gamma(2) * mag + ETA]
    if t == "BatchNorm":
        mean, var, eps = _batch_norm_stats(spec, module, x)
        sigma = torch.sqrt(var + eps)
        # (x - mean) / sqrt(var + eps): subtraction, sum, sqrt, quotient, stats rescaling.
        return [gamma(6) * (x.abs() + mean.abs()) / sigma + 2 * ETA]
    return None


def _batch_norm_stats(spec, module, x):
    """Caffe's BatchNorm in use_global_stats mode: mean, var (divided by the scale factor), eps."""
    mean, var, factor = (b.detach().to(x.dtype) for b in module.blobs[:3])
    sf = float(factor.reshape(-1)[0])
    sf = 0.0 if sf == 0 else 1.0 / sf
    shape = [1, -1] + [1] * (x.dim() - 2)
    eps = spec.param.batch_norm_param.eps if spec.param.HasField("batch_norm_param") else 1e-5
    return (mean * sf).reshape(shape), (var * sf).reshape(shape), eps


def backward_bound(spec, module, bottoms, tops, exact_tops, top_diffs, abs_module=None):
    """Element-wise bound on the float32 rounding error of one layer's backward pass.

    ``tops`` are the framework's stored forward outputs (Caffe's backward reads them: a
    forward error there moves the gradient too, and is counted); ``exact_tops`` the float64
    outputs on the same bottoms. Returns a list with one tensor (or None) per bottom, or
    None for a type without a rule.
    """
    t = spec.type
    g = top_diffs
    none = [None] * len(bottoms)
    if any(d is None for d in g[:1]):
        return none
    if t in ("Input",):
        return none
    if t in ("Split",):
        return [gamma(max(len(g) - 1, 0)) * sum(d.abs() for d in g)]
    if t in ("Concat", "Slice", "Flatten", "Reshape", "Crop", "Dropout"):
        return [torch.zeros_like(b) for b in bottoms]
    if t == "ReLU":
        slope = spec.param.relu_param.negative_slope
        x = bottoms[0]
        return [torch.zeros_like(x) if slope == 0 else U * (g[0] * slope).abs() * (x <= 0) + ETA]
    if t in ("Convolution", "InnerProduct", "Deconvolution"):
        _, n_bwd = _weight_terms(spec, module)
        with _abs_weights(module, abs_module) as magnitude:
            mag = _vjp(magnitude, [b.abs() for b in bottoms], [g[0].abs()])[0]
        return [gamma(n_bwd) * mag + n_bwd * ETA]
    if t == "Pooling":
        method = spec.param.pooling_param.pool
        if method not in (0, 1):
            return None
        mag = _vjp(module, bottoms, [g[0].abs()])[0]
        if method == 1:
            return [gamma(_pool_overlap(spec) + 1) * mag.abs() + ETA]
        return [gamma(_pool_overlap(spec)) * mag.abs()]
    if t == "LRN":
        p = spec.param.lrn_param
        if p.norm_region != 0:
            return None
        size, alpha, beta, k = p.local_size, p.alpha, p.beta, p.k
        x, y_f, y = bottoms[0], tops[0], exact_tops[0]
        dy = (y_f - y).abs()
        s = _lrn_scale(x, size, alpha, k)
        ds = _lrn_scale_error(x, s, size, alpha, k)
        c = x.shape[1]
        # Caffe (CrossChannelBackward_cpu): ratio = g*y/s; accum = running window sum of
        # ratio over channels; bottom_diff = g*s^-beta - (2*alpha*beta/size) * x * accum.
        a1 = g[0].abs() * s.pow(-beta)
        ratio = (g[0] * y_f / s).abs()
        d_ratio = g[0].abs() * (dy / s + y_f.abs() * ds / (s * s)) + gamma(3) * ratio
        win_ratio = _channel_window_sum(ratio, size)
        total_ratio = ratio.sum(dim=1, keepdim=True)
        cache = 2 * alpha * beta / size
        a2 = cache * x.abs() * win_ratio
        d_accum = gamma(2 * c + size + 4) * total_ratio + _channel_window_sum(d_ratio, size)
        bound = (beta * ds / s + 4 * U) * a1 + cache * x.abs() * d_accum + gamma(3) * (a1 + a2)
        return [bound + 4 * ETA]
    if t == "Softmax":
        axis = spec.param.softmax_param.axis if spec.param.HasField("softmax_param") else 1
        y_f = tops[0]
        axis = axis % y_f.dim()
        dy = (y_f - exact_tops[0]).abs()
        n = y_f.shape[axis]
        dot = (g[0] * y_f).sum(dim=axis, keepdim=True)
        dot_mag = (g[0] * y_f).abs().sum(dim=axis, keepdim=True)
        bound = (gamma(n + 2) * (g[0].abs() + dot_mag) * y_f.abs()
                 + (g[0] - dot).abs() * dy
                 + y_f.abs() * (g[0].abs() * dy).sum(dim=axis, keepdim=True))
        return [bound + 2 * ETA]
    if t == "Eltwise":
        p = spec.param.eltwise_param
        if p.operation == 1:  # SUM: bottom_diff = coeff * top_diff
            coeffs = list(p.coeff) or [1.0] * len(bottoms)
            return [U * (c * g[0]).abs() for c in coeffs]
        if p.operation == 2:  # MAX: routing
            return [torch.zeros_like(b) for b in bottoms]
        mags = _vjp(module, bottoms, [g[0]])
        return [None if m is None else gamma(len(bottoms) + 1) * m.abs() + len(bottoms) * ETA for m in mags]
    if t == "TanH":
        y_f = tops[0]
        dy = (y_f - exact_tops[0]).abs()
        return [gamma(3) * g[0].abs() * (1 + y_f * y_f) + 2 * (g[0] * y_f).abs() * dy + ETA]
    if t == "Sigmoid":
        y_f = tops[0]
        dy = (y_f - exact_tops[0]).abs()
        return [gamma(3) * g[0].abs() * y_f.abs() * (1 + y_f.abs()) + g[0].abs() * (1 - 2 * y_f).abs() * dy + ETA]
    if t == "AbsVal":
        return [torch.zeros_like(bottoms[0])]
    if t == "Bias" and len(bottoms) == 1:
        return [torch.zeros_like(bottoms[0])]
    if t == "Scale" and len(bottoms) == 1:
        with _abs_weights(module, abs_module) as magnitude:
            mag = _vjp(magnitude, [b.abs() for b in bottoms], [g[0].abs()])[0]
        return [U * mag + ETA]
    if t == "BatchNorm":
        mean, var, eps = _batch_norm_stats(spec, module, bottoms[0])
        return [gamma(4) * g[0].abs() / torch.sqrt(var + eps) + ETA]
    return None
