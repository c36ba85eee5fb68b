"""Loss layers of Caffe 1.0 (src/caffe/layers/*_loss_layer.cpp) and Caffe's loss weights.

Every loss top is a zero-axis scalar. Labels are float tensors holding integers, read as
Caffe reads them (``static_cast<int>``: truncated toward zero); they never get a gradient
(Caffe's LossLayer::AllowForceBackward is false for them). A label outside [0, classes)
that is not ``ignore_label`` is a PortingError at run time, naming the layer (Caffe only
DCHECKs it: a release build reads or writes outside the blob).

Backward is Caffe's formula, not autograd's derivative of the forward (they differ at
Caffe's clamps: FLT_MIN and kLOG_THRESHOLD under a log, the 1e-4 in ContrastiveLoss, the
sign at a Hinge kink, sigmoid(0) in SigmoidCrossEntropyLoss): each layer computes Caffe's
bottom diff for a unit top diff, and ``_CaffeLoss`` scales it by the top's diff over the
layer's normalizer, as Caffe's ``top[0]->cpu_diff()[0] / normalizer``. In a net Caffe
seeds each loss top's diff with its loss weight (Layer::SetLossWeights); ``loss_weights``
gives them, ``CaffeNet.loss`` the weighted sum Net::Forward returns.

``InfogainLoss`` takes H (classes x classes) as its third bottom; ``infogain_loss_param
.source`` (H read from a BlobProto file) is refused with a ValueError: give H as a bottom.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from porting import caffe_pb2
from porting.errors import PortingError, shown
from porting.layers import INT_MAX, CaffeLayer, canonical_axis, count, register
from porting.rounding import ETA, LIBM, U, gamma

Mode = caffe_pb2.LossParameter
FLT_MIN = 1.1754943508222875e-38  # Caffe's clamp under SoftmaxWithLoss's log
LOG_THRESHOLD = float(np.float32(1e-20))  # Caffe's kLOG_THRESHOLD (loss_layer.hpp), a float in any Dtype
VERIFIED = ("tests/test_layers_loss.py", "tests/test_bounds.py")


def loss_weights(layer: CaffeLayer) -> list[float]:
    """Caffe's Layer::SetLossWeights: the weight of each top in the net's loss.

    A loss layer (``default_loss_weight``, 1 for LossLayer's subclasses) weighs top 0 by 1
    unless ``loss_weight`` is given; any layer may give ``loss_weight``, once per top.
    ValueError when the count of weights does not match the tops (Caffe's CHECK), which
    includes a loss layer with a second top and no ``loss_weight`` at all."""
    tops = getattr(layer, "n_tops", None) or len(getattr(layer.spec, "tops", ()))
    given = [float(w) for w in layer.spec.param.loss_weight]
    default = getattr(layer, "default_loss_weight", 0.0)
    if not given and default:
        given = [default]
    if given and len(given) != tops:
        raise ValueError(f"loss_weight must be unspecified or given once per top blob ({len(given)} for "
                         f"{tops} top(s))")
    return given or [0.0] * tops


def normalization(loss_param, default: int) -> int:
    """The NormalizationMode: ``normalization`` if set, else the deprecated ``normalize``
    (true: VALID, false: BATCH_SIZE), else ``default``."""
    if not loss_param.HasField("normalization") and loss_param.HasField("normalize"):
        return Mode.VALID if loss_param.normalize else Mode.BATCH_SIZE
    if loss_param.HasField("normalization"):
        return int(loss_param.normalization)
    return default


def normalizer(mode: int, outer: int, inner: int, valid: int) -> float:
    """Caffe's LossLayer::GetNormalizer, at least 1."""
    value = {Mode.FULL: outer * inner, Mode.VALID: valid, Mode.BATCH_SIZE: outer, Mode.NONE: 1}[mode]
    return float(max(1, value))


def run_normalizer(mode: int, outer: int, inner: int, keep: torch.Tensor):
    """``normalizer`` with VALID's count taken from ``keep`` (the kept labels) in a forward.

    While the net is traced for ONNX export (``torch.jit.is_tracing()``) a VALID count is a
    tensor (Sum, Max with 1), so the exported graph counts each run's own kept labels instead
    of keeping the traced example's count as a constant; the value is the same float."""
    if mode == Mode.VALID and torch.jit.is_tracing():
        return keep.sum().clamp(min=1).to(torch.float32)
    return normalizer(mode, outer, inner, int(keep.sum()))


def static_int(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, representable): a float tensor as Caffe's ``static_cast<int>`` reads it, and
    where that is defined (finite, |t| < 2^31; elsewhere index is 0, and C++ is undefined).

    A cast to int64 truncates toward zero as static_cast does, and exports to ONNX as Cast
    (torch.trunc has no ONNX export)."""
    t = t.detach()
    representable = t.abs() < 2.0 ** 31  # False for NaN and inf
    return torch.where(representable, t, torch.zeros_like(t)).to(torch.int64), representable


def static_int_equals(t: torch.Tensor, value: int) -> torch.Tensor:
    """Where ``static_cast<int>(t) == value`` (never where the cast is undefined: C++ gives
    some int there, which this port does not guess)."""
    index, representable = static_int(t)
    return representable & (index == value)


def legacy_dims(shape, what: str) -> tuple[int, int, int, int]:
    """Blob's num/channels/height/width (missing axes read 1); ValueError past 4 axes
    (Caffe's CHECK in LegacyShape)."""
    if len(shape) > 4:
        raise ValueError(f"{what} has {len(shape)} axes; this layer reads it with Caffe's 4-axis accessors")
    return tuple(list(shape) + [1] * (4 - len(shape)))


class _CaffeLoss(torch.autograd.Function):
    """A loss value whose bottoms get ``direction * (top diff / divisor)``: Caffe's backward."""

    @staticmethod
    def forward(ctx, value, divisor, directions, *bottoms):
        ctx.divisor, ctx.directions = divisor, directions
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        scale = g / ctx.divisor
        return (None, None, None) + tuple(None if d is None else d * scale for d in ctx.directions)


def caffe_loss(value, divisor, pairs):
    """``value`` (computed without grad) linked to the bottoms of ``pairs`` [(bottom,
    Caffe's diff for a unit top diff and divisor 1 or a callable making it)]; the diffs are
    made only when a gradient can flow."""
    pairs = [(b, d) for b, d in pairs if b.requires_grad and torch.is_grad_enabled()]
    if not pairs:
        return value
    with torch.no_grad():
        directions = [d() if callable(d) else d for _, d in pairs]
    return _CaffeLoss.apply(value, divisor, directions, *[b for b, _ in pairs])


class LossLayer(CaffeLayer):
    """Caffe's LossLayer: two bottoms (data, label) sharing their first dim, one scalar top."""

    default_loss_weight = 1.0
    verified_by = VERIFIED
    bottom_range = (2, 2)
    max_tops = 1

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(*self.bottom_range)
        given = len(getattr(spec, "tops", ()))
        if given > self.max_tops:
            raise ValueError(f"{self.type_name} takes at most {self.max_tops} top blob(s), got {given}")
        self.n_tops = max(given, 1)  # Caffe's AutoTopBlobs: an unnamed top when none is given
        a, b = self.bottom_shapes[0], self.bottom_shapes[1]
        if not a or not b or a[0] != b[0]:
            raise ValueError(f"the data and label should have the same first dimension (bottom shapes "
                             f"{_dims(a)} and {_dims(b)})")
        self.top_shapes = [()]
        self.ignore = None  # set by the layers that read loss_param.ignore_label

    def _read_ignore_label(self):
        lp = self.spec.param.loss_param
        self.ignore = int(lp.ignore_label) if lp.HasField("ignore_label") else None

    def _check_weights(self):
        loss_weights(self)

    def labels(self, label: torch.Tensor, classes: int):
        """(index, keep): the labels as Caffe's int, and where they are not ignore_label;
        PortingError (at run time, naming the layer) for a kept label outside [0, classes)
        or not finite: Caffe would read (or write) outside its blob."""
        value, representable = static_int(label)
        keep = torch.ones_like(value, dtype=torch.bool) if self.ignore is None else \
            ~static_int_equals(label, self.ignore)
        # The check runs in Python: an ONNX export (traced) does not carry it.
        bad = keep & ~(representable & (value >= 0) & (value < classes))
        if bool(bad.any()):
            where = int(bad.reshape(-1).nonzero()[0, 0])
            raise PortingError(f"label {label.reshape(-1)[where].item():g} at index {where} is outside [0, {classes})"
                               + ("" if self.ignore is None else f" and is not ignore_label {self.ignore}")
                               + "; Caffe would read outside its blob",
                               place=f"layer {shown(self.name)} ({self.type_name})")
        return torch.where(keep, value, torch.zeros_like(value)), keep

    def work(self) -> int:
        return 4 * count(self.bottom_shapes[0])

    def workspace(self) -> int:
        """Caffe's internal blob of the bottom's size (prob_, sigmoid_output_, diff_) and the
        port's bottom diff, made in the forward and kept for the backward."""
        return 2 * count(self.bottom_shapes[0])


def _dims(shape) -> str:
    return "x".join(map(str, shape)) if shape else "()"


class _SoftmaxBased(LossLayer):
    """Shared by SoftmaxWithLoss and InfogainLoss: softmax over ``axis``, labels of
    outer x inner positions, ignore_label, normalization (default VALID), optional
    second top = the probabilities (Caffe's backward ignores that top's diff: it carries
    no gradient here)."""

    max_tops = 2

    def _setup(self, axis: int):
        self._read_ignore_label()
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(axis, len(shape))
        self.outer, self.inner = count(shape, 0, self.axis), count(shape, self.axis + 1)
        self.classes = shape[self.axis]
        if self.outer * self.inner != count(self.bottom_shapes[1]):
            raise ValueError(f"number of labels ({count(self.bottom_shapes[1])}) must match number of predictions "
                             f"({self.outer * self.inner}: the bottom's count without its axis {self.axis})")
        self.mode = normalization(self.spec.param.loss_param, Mode.VALID)  # (InfogainLoss refuses normalize)
        if self.n_tops == 2:
            self.top_shapes.append(shape)
        self._check_weights()

    def _prob(self, x):
        return torch.softmax(x.detach(), dim=self.axis)

    def _bound_parts(self, x, label):
        """For the bounds (float64): p (outer x classes x inner), the relative bound r of a
        float32 softmax (Softmax.forward_bound's), labels, kept positions, normalizer."""
        p = self._prob(x).reshape(self.outer, self.classes, self.inner)
        spread = (x - x.amax(dim=self.axis, keepdim=True)).abs()
        r = U * (spread + spread.amax(dim=self.axis, keepdim=True)) + gamma(self.classes + 1) + 2 * LIBM
        lab, keep = self.labels(label.reshape(self.outer, self.inner), self.classes)
        norm = normalizer(self.mode, self.outer, self.inner, int(keep.sum()))
        return p, r.reshape(p.shape), lab, keep, norm

    def _prob_bound(self, p, r):
        return [r * p.reshape(self.bottom_shapes[0]) + 2 * ETA] if self.n_tops == 2 else []

    def _tops(self, loss, prob):
        return (loss, prob) if self.n_tops == 2 else (loss,)


@register("SoftmaxWithLoss", v1="SOFTMAX_LOSS")
class SoftmaxWithLoss(_SoftmaxBased):
    """loss = -sum over kept positions of log(max(p[label], FLT_MIN)) / normalizer;
    diff = (p - onehot(label)) (0 at ignored positions) * top diff / normalizer.

    A second top cannot be set up in Caffe 1.0: its inner Softmax is a copy of this
    layer's parameters, loss_weight included, and a loss layer with two tops needs two
    loss weights, which the one-top Softmax refuses (layer.hpp:392); so it is refused."""

    param_fields = ("softmax_param", "loss_param")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        if self.n_tops == 2:
            raise ValueError("SoftmaxWithLoss with a second top cannot be set up in Caffe 1.0 (its inner Softmax "
                             "copies the layer's loss_weight, one per top, and has one top): use a Softmax layer")
        self._setup(spec.param.softmax_param.axis)

    def forward(self, x, label):
        lab, keep = self.labels(label.reshape(self.outer, self.inner), self.classes)
        prob = self._prob(x)
        p = prob.reshape(self.outer, self.classes, self.inner)
        picked = p.gather(1, lab.unsqueeze(1)).squeeze(1)
        logs = torch.log(picked.clamp(min=FLT_MIN))
        norm = run_normalizer(self.mode, self.outer, self.inner, keep)
        value = -torch.where(keep, logs, torch.zeros_like(logs)).sum() / norm

        def diff():
            d = p.clone()
            d.scatter_add_(1, lab.unsqueeze(1), -keep.unsqueeze(1).to(d.dtype))
            return (d * keep.unsqueeze(1)).reshape(x.shape)

        return self._tops(caffe_loss(value, norm, [(x, diff)]), prob)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # -log p_label: p's relative error r becomes an absolute error r in the log (the
        # FLT_MIN clamp is 1-Lipschitz there), log's own LIBM |log p|; a sum of n terms of one
        # sign (gamma(n)), the quotient by the normalizer (U).
        p, r, lab, keep, norm = self._bound_parts(*bottoms)
        kept = keep.to(p.dtype)
        logs = torch.log(p.gather(1, lab.unsqueeze(1)).squeeze(1).clamp(min=FLT_MIN)).abs()
        err = ((r.gather(1, lab.unsqueeze(1)).squeeze(1) + LIBM * logs) * kept).sum() \
            + gamma(max(int(keep.sum()), 1)) * (logs * kept).sum()
        return [err / norm + U * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # (p - onehot) * fl(g / norm): p's error r p, the subtraction, the quotient and product.
        p, r, lab, keep, norm = self._bound_parts(*bottoms)
        onehot = torch.zeros_like(p).scatter_(1, lab.unsqueeze(1), 1.0)
        scale = top_diffs[0].abs() / norm
        d = (p - onehot).abs()
        bound = ((r * p + U * d) * scale + 2 * U * d * scale) * keep.unsqueeze(1)
        return [bound.reshape(bottoms[0].shape) + 2 * ETA, None]

    def work(self) -> int:
        return 6 * count(self.bottom_shapes[0])

    def describe(self) -> str:
        return f"axis {self.axis} {Mode.NormalizationMode.Name(self.mode)}" + (
            "" if self.ignore is None else f" ignore {self.ignore}")


@register("InfogainLoss", v1="INFOGAIN_LOSS")
class InfogainLoss(_SoftmaxBased):
    """Bottoms: scores, labels, H (classes x classes values). p = softmax over ``axis``;
    loss = -sum over kept positions, over l, of H[label, l] log(max(p_l, 1e-20)) / normalizer;
    diff_l = p_l * sum_k H[label, k] - H[label, l]. H gets no gradient."""

    param_fields = ("infogain_loss_param", "loss_param")

    bottom_range = (2, 3)

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        ip = spec.param.infogain_loss_param
        if len(self.bottom_shapes) < 3:
            if ip.source:
                raise ValueError("infogain_loss_param.source (H read from a BlobProto file) is not supported: "
                                 "give H as the third bottom")
            raise ValueError("Infogain matrix source must be specified (or H given as the third bottom)")
        if spec.param.loss_param.HasField("normalize"):
            raise ValueError('InfogainLoss refuses loss_param.normalize (deprecated): use "normalization"')
        self._setup(ip.axis)
        if count(self.bottom_shapes[2]) != self.classes ** 2:
            raise ValueError(f"H (third bottom, {count(self.bottom_shapes[2])} values) must be "
                             f"{self.classes}x{self.classes}")

    def forward(self, x, label, h):
        lab, keep = self.labels(label.reshape(self.outer, self.inner), self.classes)
        prob = self._prob(x)
        p = prob.reshape(self.outer, self.classes, self.inner)
        rows = h.detach().reshape(self.classes, self.classes)[lab].permute(0, 2, 1)  # outer x classes x inner
        terms = rows * torch.log(p.clamp(min=LOG_THRESHOLD))
        kept = keep.unsqueeze(1)
        norm = run_normalizer(self.mode, self.outer, self.inner, keep)
        value = -torch.where(kept, terms, torch.zeros_like(terms)).sum() / norm

        def diff():
            sums = h.detach().reshape(self.classes, self.classes).sum(dim=1)[lab].unsqueeze(1)
            return ((p * sums - rows) * kept).reshape(x.shape)

        return self._tops(caffe_loss(value, norm, [(x, diff)]), prob)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # Terms H log p: |H| (r + LIBM |log p|) each, their product (U), a sum of n C terms
        # (gamma, on their magnitudes), the quotient (U); the probabilities top: softmax's.
        x, label, h = bottoms
        p, r, lab, keep, norm = self._bound_parts(x, label)
        rows = h.reshape(self.classes, self.classes)[lab].permute(0, 2, 1)
        logs = torch.log(p.clamp(min=LOG_THRESHOLD)).abs()
        terms = (rows * logs).abs()
        kept = keep.unsqueeze(1).to(p.dtype)
        n = max(int(keep.sum()) * self.classes, 1)
        err = ((rows.abs() * (r + LIBM * logs) + U * terms) * kept).sum() + gamma(n) * (terms * kept).sum()
        return [err / norm + U * exact_tops[0].abs() + ETA] + self._prob_bound(p, r)

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # p S - H with S the row sum of H (gamma(C) on sum |H|), p's error, product and
        # difference (U each), then fl(g / norm) and its product.
        x, label, h = bottoms
        p, r, lab, keep, norm = self._bound_parts(x, label)
        H = h.reshape(self.classes, self.classes)
        rows = H[lab].permute(0, 2, 1)
        sums = H.sum(dim=1)[lab].unsqueeze(1)
        sums_abs = H.abs().sum(dim=1)[lab].unsqueeze(1)
        d = (p * sums - rows).abs()
        scale = top_diffs[0].abs() / norm
        err = p * (r * sums.abs() + gamma(self.classes + 1) * sums_abs) + U * (p * sums).abs() + U * d
        bound = (err * scale + 2 * U * d * scale) * keep.unsqueeze(1)
        return [bound.reshape(x.shape) + 2 * ETA, None, None]

    def work(self) -> int:
        return 8 * count(self.bottom_shapes[0])


@register("EuclideanLoss", v1="EUCLIDEAN_LOSS")
class EuclideanLoss(LossLayer):
    """loss = sum((a - b)^2) / num / 2; diffs (a - b) and -(a - b) times top diff / num
    (Caffe lets both bottoms get a gradient)."""

    param_fields = ()

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        a, b = self.bottom_shapes[:2]
        if count(a, 1) != count(b, 1):
            raise ValueError(f"inputs must have the same dimension (bottom shapes {_dims(a)} and {_dims(b)})")
        self.num = legacy_dims(a, "bottom 0")[0]
        self._check_weights()

    def forward(self, a, b):
        d = a.detach() - b.detach().reshape(a.shape)
        value = (d.reshape(-1) @ d.reshape(-1)) / self.num / 2
        return (caffe_loss(value, self.num, [(a, d), (b, lambda: -d.reshape(b.shape))]),)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # d = a - b (U), its square (2U + U), a sum of n non-negative terms, / num (U).
        a, b = bottoms
        d = a - b.reshape(a.shape)
        return [(gamma(d.numel()) + 3 * U) * (d * d).sum() / self.num / 2 + U * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # d * fl(g / num): d's rounding, the quotient, the product.
        a, b = bottoms
        bound = 3 * U * (a - b.reshape(a.shape)).abs() * top_diffs[0].abs() / self.num + ETA
        return [bound, bound.reshape(b.shape)]


@register("SigmoidCrossEntropyLoss", v1="SIGMOID_CROSS_ENTROPY_LOSS")
class SigmoidCrossEntropyLoss(LossLayer):
    """Caffe's stable form: loss = -sum over kept i of x (t - [x >= 0]) - log(1 + exp(x -
    2 x [x >= 0])), over the normalizer (default BATCH_SIZE; VALID counts targets that are
    not ignore_label); diff = sigmoid(x) - t (0 where ignored). Targets are probabilities
    (any float); only ``static_cast<int>(t) == ignore_label`` is tested."""

    param_fields = ("loss_param",)

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        a, b = self.bottom_shapes[:2]
        if count(a) != count(b):
            raise ValueError(f"inputs must have the same count (bottom shapes {_dims(a)} and {_dims(b)})")
        self.outer, self.inner = a[0], count(a, 1)
        self._read_ignore_label()
        self.mode = normalization(spec.param.loss_param, Mode.BATCH_SIZE)
        self._check_weights()

    def forward(self, x, target):
        xd, t = x.detach(), target.detach().reshape(x.shape)
        keep = torch.ones_like(t, dtype=torch.bool) if self.ignore is None else ~static_int_equals(t, self.ignore)
        pos = (xd >= 0).to(xd.dtype)
        terms = xd * (t - pos) - torch.log(1 + torch.exp(xd - 2 * xd * pos))
        norm = run_normalizer(self.mode, self.outer, self.inner, keep)
        value = -torch.where(keep, terms, torch.zeros_like(terms)).sum() / norm
        return (caffe_loss(value, norm, [(x, lambda: (torch.sigmoid(xd) - t) * keep)]),)

    def _bound_parts(self, x, target):
        t = target.reshape(x.shape)
        keep = torch.ones_like(t, dtype=torch.bool) if self.ignore is None else ~static_int_equals(t, self.ignore)
        norm = normalizer(self.mode, self.outer, self.inner, int(keep.sum()))
        return t, keep.to(x.dtype), norm

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # x (t - [x >= 0]): two roundings; log(1 + e), e = exp(-|x|): exp's LIBM moves the log
        # by LIBM e / (1 + e), fl(1 + e) by U, log's own LIBM |log(1 + e)|; the difference (U);
        # a sum of n terms (gamma(n) on their magnitudes); the quotient (U).
        x, target = bottoms
        t, kept, norm = self._bound_parts(x, target)
        lin = (x * (t - (x >= 0).to(x.dtype))).abs()
        e = torch.exp(-x.abs())
        soft = torch.log1p(e)
        term = (x * (t - (x >= 0).to(x.dtype)) - soft).abs()
        per = 2 * U * lin + LIBM * e / (1 + e) + U + LIBM * soft + U * term
        n = max(int(kept.sum()), 1)
        err = (per * kept).sum() + gamma(n) * (term * kept).sum()
        return [err / norm + U * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # sigmoid(x): Caffe's 0.5 tanh(0.5 x) + 0.5 (LIBM relative to tanh, which does not shrink
        # with s) or a direct sigmoid (LIBM relative to s); - t (U); fl(g / norm) and product.
        x, target = bottoms
        t, kept, norm = self._bound_parts(x, target)
        s = torch.sigmoid(x)
        d = (s - t).abs()
        scale = top_diffs[0].abs() / norm
        err_s = LIBM * (0.5 * (2 * s - 1).abs() + s) + U * s
        return [((err_s + U * d) * scale + 2 * U * d * scale) * kept + 2 * ETA, None]


@register("HingeLoss", v1="HINGE_LOSS")
class HingeLoss(LossLayer):
    """num rows of dim = count / num scores; m = max(0, 1 + s x) with s = -1 at the row's
    label, +1 elsewhere (labels: the first num values of the label bottom). L1: loss =
    sum(m) / num, diff = s [m > 0]; L2: loss = sum(m^2) / num, diff = 2 s m; times top
    diff / num. The kink m = 0 is this layer's decision."""

    param_fields = ("hinge_loss_param",)

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.num = legacy_dims(self.bottom_shapes[0], "bottom 0")[0]
        self.dim = count(self.bottom_shapes[0]) // self.num
        self.l2 = spec.param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2
        self._check_weights()

    def _signs(self, x, label):
        lab, _ = self.labels(label.reshape(-1)[:self.num], self.dim)
        s = torch.ones(self.num, self.dim, dtype=x.dtype, device=x.device)
        s.scatter_(1, lab.unsqueeze(1), -1.0)
        return s

    def forward(self, x, label):
        xd = x.detach().reshape(self.num, self.dim)
        s = self._signs(xd, label)
        m = (1 + s * xd).clamp(min=0)
        value = ((m.reshape(-1) @ m.reshape(-1)) if self.l2 else m.sum()) / self.num
        return (caffe_loss(value, self.num, [(x, lambda: (2 * s * m if self.l2 else s * (m > 0)).reshape(x.shape))]),)

    def _margins(self, bottoms):
        x = bottoms[0].reshape(self.num, self.dim)
        return self._signs(x, bottoms[1]), (1 + self._signs(x, bottoms[1]) * x).clamp(min=0)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # m = max(0, fl(1 + s x)): U m (rounding is monotone, so m = 0 stays 0); L2's square
        # adds 2U + U; a sum of count non-negative terms; / num.
        _, m = self._margins(bottoms)
        total = (m * m).sum() * (3 * U) if self.l2 else m.sum() * U
        mag = (m * m).sum() if self.l2 else m.sum()
        return [(total + gamma(m.numel()) * mag) / self.num + U * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # L1: s [m > 0] fl(g / num): two roundings; L2: 2 s m times Caffe's fl(fl(2 g) / num):
        # m's U and three more. The kink m = 0 is a decision.
        s, m = self._margins(bottoms)
        scale = top_diffs[0].abs() / self.num
        bound = 4 * U * 2 * m * scale if self.l2 else 2 * U * (m > 0).to(m.dtype) * scale
        return [bound.reshape(bottoms[0].shape) + ETA, None]

    def decisions(self, bottoms):
        x = bottoms[0].reshape(self.num, self.dim)
        return [(1 + self._signs(x, bottoms[1]) * x > 0).reshape(bottoms[0].shape)]

    def decision_margins(self, bottoms):
        x = bottoms[0].reshape(self.num, self.dim)
        return [(1 + self._signs(x, bottoms[1]) * x).abs().reshape(bottoms[0].shape)]


@register("MultinomialLogisticLoss", v1="MULTINOMIAL_LOGISTIC_LOSS")
class MultinomialLogisticLoss(LossLayer):
    """Bottom 0 holds probabilities, num rows of dim values; loss = -sum log(max(p[label],
    1e-20)) / num; diff = -1 / max(p[label], 1e-20) at the label, 0 elsewhere, times top
    diff / num. The label bottom has one value per row (channels, height, width 1)."""

    param_fields = ()

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        n, c, h, w = legacy_dims(self.bottom_shapes[1], "the label bottom")
        if (c, h, w) != (1, 1, 1):
            raise ValueError(f"the label bottom must be num x 1 x 1 x 1, got {_dims(self.bottom_shapes[1])}")
        self.num = legacy_dims(self.bottom_shapes[0], "bottom 0")[0]
        self.dim = count(self.bottom_shapes[0]) // self.num
        self._check_weights()

    def forward(self, x, label):
        lab, _ = self.labels(label.reshape(-1), self.dim)
        p = x.detach().reshape(self.num, self.dim)
        picked = p.gather(1, lab.unsqueeze(1)).clamp(min=LOG_THRESHOLD)
        value = -torch.log(picked).sum() / self.num

        def diff():
            d = torch.zeros_like(p)
            d.scatter_(1, lab.unsqueeze(1), -1 / picked)
            return d.reshape(x.shape)

        return (caffe_loss(value, self.num, [(x, diff)]),)

    def _picked(self, bottoms):
        lab, _ = self.labels(bottoms[1].reshape(-1), self.dim)
        p = bottoms[0].reshape(self.num, self.dim)
        return lab, p.gather(1, lab.unsqueeze(1)).clamp(min=LOG_THRESHOLD)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # one log per row (LIBM), a sum of num terms of one sign, / num.
        _, picked = self._picked(bottoms)
        logs = torch.log(picked).abs()
        return [(LIBM + gamma(self.num)) * logs.sum() / self.num + U * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # -fl(g / num) / p (Caffe) or fl(-1 / p) fl(g / num) (the port): at most three roundings.
        lab, picked = self._picked(bottoms)
        bound = torch.zeros(self.num, self.dim, dtype=picked.dtype)
        bound.scatter_(1, lab.unsqueeze(1), 3 * U * top_diffs[0].abs() / self.num / picked)
        return [bound.reshape(bottoms[0].shape) + ETA, None]

    def work(self) -> int:
        return 2 * count(self.bottom_shapes[1])


@register("ContrastiveLoss", v1="CONTRASTIVE_LOSS")
class ContrastiveLoss(LossLayer):
    """Bottoms a, b (num x channels) and y (one value per pair, ``static_cast<int>(y) != 0``:
    similar). With d = a - b, D = |d|^2: similar pairs add D, dissimilar ones
    max(margin - D, 0) (legacy_version) or max(margin - sqrt(D), 0)^2; loss = sum / num / 2.
    Caffe's diff of a (b: its negative), per pair: d if similar; else, where m = margin - D
    (legacy) or margin - sqrt(D) is > 0, -d (legacy) or -m / (sqrt(D) + 1e-4) d, else 0;
    times top diff / num. y gets no gradient."""

    param_fields = ("contrastive_loss_param",)

    bottom_range = (3, 3)

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        a, b, y = self.bottom_shapes
        na, ca, ha, wa = legacy_dims(a, "bottom 0")
        nb, cb, hb, wb = legacy_dims(b, "bottom 1")
        ny, cy, hy, wy = legacy_dims(y, "bottom 2")
        if ca != cb or (ha, wa, hb, wb) != (1, 1, 1, 1) or (cy, hy, wy) != (1, 1, 1):
            raise ValueError(f"bottoms must be num x channels (x 1 x 1) twice and num x 1 x 1 x 1 (got "
                             f"{_dims(a)}, {_dims(b)}, {_dims(y)})")
        if ny < na:
            raise ValueError(f"the similarity bottom has {ny} values for {na} pairs")
        self.num, self.channels = na, ca
        cp = spec.param.contrastive_loss_param
        self.margin, self.legacy = float(cp.margin), bool(cp.legacy_version)
        self._check_weights()

    def _pairs(self, a, b, y):
        d = a.detach().reshape(self.num, self.channels) - b.detach().reshape(self.num, self.channels)
        dist_sq = (d * d).sum(dim=1)
        similar = ~(y.detach().reshape(-1)[:self.num].abs() < 1)  # static_cast<int>(y) != 0 (NaN too)
        return d, dist_sq, similar

    def forward(self, a, b, y):
        d, dist_sq, similar = self._pairs(a, b, y)
        if self.legacy:
            mdist = self.margin - dist_sq
            apart = mdist.clamp(min=0)
        else:
            dist = torch.sqrt(dist_sq)
            mdist = self.margin - dist
            apart = mdist.clamp(min=0) ** 2
        value = torch.where(similar, dist_sq, apart).sum() / self.num / 2

        def diff():
            factor = torch.ones_like(mdist) if self.legacy else mdist / (dist + 1e-4)
            per_pair = torch.where(similar, torch.ones_like(mdist), torch.where(mdist > 0, -factor, 0 * factor))
            return per_pair.unsqueeze(1) * d

        return (caffe_loss(value, self.num, [(a, lambda: diff().reshape(a.shape)),
                                              (b, lambda: -diff().reshape(b.shape))]),)

    def _errors(self, bottoms):
        """Per pair: d, D = |d|^2, similar, dist, m and the float32 error bounds eD, edist, em."""
        d, D, similar = self._pairs(*bottoms)
        eD = (gamma(self.channels) + 3 * U) * D  # d's rounding (2U), the squares (U), the sum
        dist = torch.sqrt(D)
        edist = (gamma(self.channels) + 3 * U) * dist / 2 + U * dist
        m = self.margin - (D if self.legacy else dist)
        em = (eD if self.legacy else edist) + U * m.abs()
        return d, D, similar, dist, m, eD, edist, em

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # similar: D (eD); dissimilar: max(m, 0) (em, the clamp is 1-Lipschitz) or max(m, 0)^2
        # (2 m em + em^2 + U m^2); a sum of num non-negative terms; / num (U), / 2 exact.
        d, D, similar, dist, m, eD, edist, em = self._errors(bottoms)
        mp = m.clamp(min=0)
        if self.legacy:
            apart, e_apart = mp, torch.where(m > -em, em, torch.zeros_like(em))
        else:
            apart, e_apart = mp * mp, torch.where(m > -em, 2 * mp * em + em * em + U * mp * mp, torch.zeros_like(em))
        terms = torch.where(similar, D, apart)
        err = torch.where(similar, eD, e_apart).sum() + gamma(self.num) * terms.sum()
        return [err / self.num / 2 + U * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # f d fl(g / num), f = 1, -1 or -m / (dist + 1e-4) (where m > 0): d's rounding, f's
        # error (m's, dist's, the sum with 1e-4 and its float32 value, the quotient), the
        # products and the quotient g / num. The kink m = 0 is a decision.
        d, D, similar, dist, m, eD, edist, em = self._errors(bottoms)
        active = (m > 0).to(m.dtype)
        if self.legacy:
            f, ef = torch.where(similar, torch.ones_like(m), active), torch.zeros_like(m)
        else:
            den = dist + 1e-4
            f = torch.where(similar, torch.ones_like(m), active * m.abs() / den)
            ef = torch.where(similar, torch.zeros_like(m),
                             active * (em / den + m.abs() / den * ((edist + 2 * U * den) / den + U)))
        scale = top_diffs[0].abs() / self.num
        bound = (f.unsqueeze(1) * 4 * U + ef.unsqueeze(1)) * d.abs() * scale + ETA
        a, b = bottoms[0], bottoms[1]
        return [bound.reshape(a.shape), bound.reshape(b.shape), None]

    def decisions(self, bottoms):
        d, dist_sq, similar = self._pairs(*bottoms)
        m = self.margin - (dist_sq if self.legacy else torch.sqrt(dist_sq))
        return [~similar & (m > 0)]

    def decision_margins(self, bottoms):
        d, dist_sq, similar = self._pairs(*bottoms)
        m = self.margin - (dist_sq if self.legacy else torch.sqrt(dist_sq))
        return [torch.where(similar, torch.full_like(m, float("inf")), m.abs())]

    def describe(self) -> str:
        return f"margin {self.margin:g}" + (" legacy" if self.legacy else "")


@register("Accuracy", v1="ACCURACY")
class Accuracy(CaffeLayer):
    """The fraction of kept positions whose label's score is beaten or tied by fewer than
    ``top_k`` other scores (Caffe counts every score >= the label's, its own included, so a
    tie counts against); 0 when none is kept. Optional second top: that fraction per class
    (0 for a class with no kept position). No gradient (Caffe's Backward is
    NOT_IMPLEMENTED): the tops do not require grad."""

    param_fields = ("accuracy_param",)

    verified_by = VERIFIED

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(2)
        tops = len(getattr(spec, "tops", ()))
        if not 1 <= tops <= 2:
            raise ValueError(f"Accuracy takes 1 or 2 top blobs, got {tops}")
        ap = spec.param.accuracy_param
        shape = self.bottom_shapes[0]
        self.top_k = int(ap.top_k) - (2**32 if ap.top_k > INT_MAX else 0)  # Caffe's int top_k_
        labels = count(self.bottom_shapes[1])
        if labels == 0 or self.top_k > count(shape) // labels:
            raise ValueError(f"top_k ({self.top_k}) must be less than or equal to the number of classes "
                             f"({count(shape) // max(labels, 1)})")
        self.axis = canonical_axis(int(ap.axis), len(shape))
        self.outer, self.inner = count(shape, 0, self.axis), count(shape, self.axis + 1)
        self.classes = shape[self.axis]
        if self.outer * self.inner != labels:
            raise ValueError(f"number of labels ({labels}) must match number of predictions "
                             f"({self.outer * self.inner})")
        self.ignore = int(ap.ignore_label) if ap.HasField("ignore_label") else None
        self.top_shapes = [()] + ([(self.classes,)] if tops == 2 else [])
        loss_weights(self)

    labels = LossLayer.labels

    def _correct(self, x, label):
        lab, keep = self.labels(label.reshape(self.outer, self.inner), self.classes)
        s = x.detach().reshape(self.outer, self.classes, self.inner)
        true = s.gather(1, lab.unsqueeze(1))
        better = (s >= true).sum(dim=1) - 1
        return lab, keep, keep & (better < self.top_k), s, true

    def forward(self, x, label):
        with torch.no_grad():
            lab, keep, correct, _, _ = self._correct(x, label)
            # tensor arithmetic throughout (no Python branch on the counts), so an ONNX
            # export computes each run's own counts; the same floats as Caffe's quotients
            kept = keep.sum().to(x.dtype)
            value = torch.where(kept > 0, correct.sum().to(x.dtype) / kept.clamp(min=1), torch.zeros_like(kept))
            if len(self.top_shapes) == 1:
                return (value.reshape(()),)
            per = lab.reshape(-1)
            nums = torch.zeros(self.classes, dtype=x.dtype).scatter_add(0, per, keep.reshape(-1).to(x.dtype))
            hits = torch.zeros(self.classes, dtype=x.dtype).scatter_add(0, per, correct.reshape(-1).to(x.dtype))
            per_class = torch.where(nums > 0, hits / nums.clamp(min=1), torch.zeros_like(hits))
            return value.reshape(()), per_class

    def work(self) -> int:
        return count(self.bottom_shapes[0])

    def workspace(self) -> int:
        return count(self.bottom_shapes[0])  # the comparisons with each label's score

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # counts are exact; one float32 quotient per top (given the same decisions).
        return [U * t.abs() + ETA for t in exact_tops]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return [None, None]  # no gradient (Caffe: NOT_IMPLEMENTED)

    def decisions(self, bottoms):
        return [self._correct(*bottoms)[2]]

    def decision_margins(self, bottoms):
        """Per position, the nearest other score to the label's (0: a tie); inf where
        ignored. A flip needs some score to cross the label's."""
        lab, keep, _, s, true = self._correct(*bottoms)
        gap = (s - true).abs()
        gap.scatter_(1, lab.unsqueeze(1), float("inf"))
        margin = gap.amin(dim=1)
        return [torch.where(keep, margin, torch.full_like(margin, float("inf")))]

    def describe(self) -> str:
        return f"top_k {self.top_k} axis {self.axis}"

