"""Element-wise ("neuron") layers of Caffe 1.0: ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal,
Power, Exp, Log, BNLL, Threshold, Dropout.

Each forward is Caffe's Forward_cpu formula; where Caffe's Backward_cpu is the exact
derivative autograd provides it, except Power (special cases that give Caffe's own
numbers, e.g. ``power * y / x`` at shift 0) and BNLL (gradient 1/2 at 0, which autograd of
a kinked expression would not give), which have their own autograd Functions.
Threshold has no backward in Caffe; its top carries no gradient here.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from porting.errors import PortingError
from porting.layers import CaffeLayer, register
from porting.rounding import ETA, U, gamma


class _Elementwise(CaffeLayer):
    """One bottom, one top of the same shape."""

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        self.top_shapes = [self.bottom_shapes[0]]

    def forward(self, x):
        return (self.apply_to(x),)

    def apply_to(self, x):  # pragma: no cover - overridden
        raise NotImplementedError


class _Exact(_Elementwise):
    """An element-wise layer whose forward and backward round nothing."""

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return [torch.zeros_like(exact_tops[0])]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return [torch.zeros_like(bottoms[0])]


@register("ReLU", v1="RELU")
class ReLU(_Elementwise):
    """y = max(x, 0) + negative_slope * min(x, 0); dy/dx = 1 if x > 0 else negative_slope."""

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.negative_slope = float(spec.param.relu_param.negative_slope)

    def apply_to(self, x):
        if self.negative_slope == 0:
            return torch.relu(x)
        return torch.where(x > 0, x, x * self.negative_slope)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # x or one product slope * x
        y = exact_tops[0]
        return [torch.zeros_like(y) if self.negative_slope == 0 else U * y.abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        x, g = bottoms[0], top_diffs[0]
        if self.negative_slope == 0:
            return [torch.zeros_like(x)]
        return [U * (g * self.negative_slope).abs() * (x <= 0) + ETA]

    def describe(self):
        return f"slope {self.negative_slope:g}" if self.negative_slope else ""


@register("PReLU")
class PReLU(_Elementwise):
    """y = x if x > 0 else a_c * x, one learned slope per channel (axis 1) or one shared.

    Blob 0: slopes of shape (C,), or () with channel_shared (Caffe's zero-axis blob).
    """

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        shape = self.bottom_shapes[0]
        if len(shape) < 2:
            raise ValueError(f"PReLU needs a bottom with at least 2 axes, got {shape}")
        self.channel_shared = bool(spec.param.prelu_param.channel_shared)
        self.param_shapes = [() if self.channel_shared else (shape[1],)]

    def apply_to(self, x):
        slope = self.blobs[0]
        if not self.channel_shared:
            slope = slope.reshape((1, -1) + (1,) * (x.dim() - 2))
        return torch.where(x > 0, x, x * slope)

    def describe(self):
        return "shared" if self.channel_shared else "per channel"


@register("ELU")
class ELU(_Elementwise):
    """y = x if x > 0 else alpha * (exp(x) - 1); Caffe's backward (y + alpha) is the derivative."""

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.alpha = float(spec.param.elu_param.alpha)

    def apply_to(self, x):
        # exp of min(x, 0): the unused branch must not overflow (its zero gradient times inf is NaN)
        return torch.where(x > 0, x, self.alpha * (torch.exp(torch.clamp_max(x, 0)) - 1))

    def describe(self):
        return f"alpha {self.alpha:g}"


class SigmoidFunction(torch.autograd.Function):
    """Caffe's sigmoid: y = 0.5 * tanh(0.5 * x) + 0.5 (its saturation), dx = dy * y * (1 - y)."""

    @staticmethod
    def forward(ctx, x):
        y = 0.5 * torch.tanh(0.5 * x) + 0.5
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * y * (1 - y)


@register("Sigmoid", v1="SIGMOID")
class Sigmoid(_Elementwise):
    """y = 1 / (1 + exp(-x)) in Caffe's tanh form; dy/dx = y (1 - y)."""

    def apply_to(self, x):
        return SigmoidFunction.apply(x)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # libm / vectorised tanh, exp: within 3.5 ulp (7u); one more rounding for 1/(1+e).
        return [8 * U * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: g * y * (1 - y) with its stored y.
        y_f, g = tops[0], top_diffs[0]
        dy = (y_f - exact_tops[0]).abs()
        return [gamma(3) * g.abs() * y_f.abs() * (1 + y_f.abs()) + g.abs() * (1 - 2 * y_f).abs() * dy + ETA]


@register("TanH", v1="TANH")
class TanH(_Elementwise):
    """y = tanh(x); dy/dx = 1 - y^2."""

    def apply_to(self, x):
        return torch.tanh(x)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # libm / vectorised tanh: within 3.5 ulp (7u), one more rounding to spare.
        return [8 * U * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: g * (1 - y^2) with its stored y.
        y_f, g = tops[0], top_diffs[0]
        dy = (y_f - exact_tops[0]).abs()
        return [gamma(3) * g.abs() * (1 + y_f * y_f) + 2 * (g * y_f).abs() * dy + ETA]


@register("AbsVal", v1="ABSVAL")
class AbsVal(_Exact):
    """y = |x|; dy/dx = sign(x) with sign(0) = 0."""

    def apply_to(self, x):
        return torch.abs(x)


class PowerFunction(torch.autograd.Function):
    """y = (shift + scale * x) ** power with Caffe's PowerLayer forward and backward.

    Backward (power_layer.cpp), with diff_scale = power * scale: 0 when diff_scale == 0;
    diff_scale when power == 1; diff_scale * (scale * x + shift) when power == 2;
    power * y / x when shift == 0; otherwise diff_scale * y / (shift + scale * x). These
    equal the derivative except where Caffe divides by zero (x = 0 at shift 0 gives
    inf/NaN in Caffe, and here).
    """

    @staticmethod
    def forward(ctx, x, power: float, scale: float, shift: float):
        diff_scale = power * scale
        if diff_scale == 0:
            with np.errstate(all="ignore"):  # C's pow: 0 ** -1 = inf, (-1) ** 0.5 = nan
                value = 1.0 if power == 0 else float(np.power(np.float64(shift), power))
            y = torch.full_like(x, value)
        else:
            y = x * scale if scale != 1 else x.clone()
            if shift != 0:
                y = y + shift
            if power != 1:
                y = y.pow(power)
        ctx.save_for_backward(x, y)
        ctx.params = (power, scale, shift)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, y = ctx.saved_tensors
        power, scale, shift = ctx.params
        diff_scale = power * scale
        if diff_scale == 0:
            return torch.zeros_like(x), None, None, None
        if power == 1:
            dx = torch.full_like(x, diff_scale)
        elif power == 2:
            dx = x * (diff_scale * scale)
            if shift != 0:
                dx = dx + diff_scale * shift
        elif shift == 0:
            dx = y / x * power
        else:
            base = x * scale if scale != 1 else x
            dx = y / (base + shift)
            if diff_scale != 1:
                dx = dx * diff_scale
        return dx * dy, None, None, None


def caffe_power(x, power: float, scale: float = 1.0, shift: float = 0.0):
    """(shift + scale * x) ** power with Caffe's PowerLayer backward."""
    return PowerFunction.apply(x, float(power), float(scale), float(shift))


@register("Power", v1="POWER")
class Power(_Elementwise):
    """y = (shift + scale * x) ** power; backward as Caffe computes it (see PowerFunction)."""

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        pp = spec.param.power_param
        self.power, self.scale, self.shift = float(pp.power), float(pp.scale), float(pp.shift)

    def apply_to(self, x):
        return caffe_power(x, self.power, self.scale, self.shift)

    def describe(self):
        return f"power {self.power:g} scale {self.scale:g} shift {self.shift:g}"


@register("Exp", v1="EXP")
class Exp(_Elementwise):
    """y = base ** (shift + scale * x), base e when base = -1 (the default).

    Computed as Caffe does: outer * exp(inner * x) with inner = ln(base) * scale and
    outer = base ** shift; dy/dx = inner * y.
    """

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        ep = spec.param.exp_param
        self.base, scale, shift = float(ep.base), float(ep.scale), float(ep.shift)
        if self.base != -1 and self.base <= 0:
            raise ValueError(f"exp_param.base must be strictly positive (or -1 for e), got {self.base:g}")
        log_base = 1.0 if self.base == -1 else math.log(self.base)
        self.inner_scale = log_base * scale
        self.outer_scale = 1.0 if shift == 0 else (math.exp(shift) if self.base == -1 else self.base ** shift)

    def apply_to(self, x):
        y = torch.exp(x * self.inner_scale if self.inner_scale != 1 else x)
        return y * self.outer_scale if self.outer_scale != 1 else y

    def describe(self):
        return f"base {'e' if self.base == -1 else f'{self.base:g}'}"


@register("Log")
class Log(_Elementwise):
    """y = log_base(shift + scale * x), natural log when base = -1 (the default)."""

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        lp = spec.param.log_param
        self.base, self.scale, self.shift = float(lp.base), float(lp.scale), float(lp.shift)
        if self.base != -1 and self.base <= 0:
            raise ValueError(f"log_param.base must be strictly positive (or -1 for e), got {self.base:g}")
        self.base_scale = 1.0 if self.base == -1 else 1.0 / math.log(self.base)

    def apply_to(self, x):
        inner = x * self.scale if self.scale != 1 else x
        if self.shift != 0:
            inner = inner + self.shift
        y = torch.log(inner)
        return y * self.base_scale if self.base_scale != 1 else y

    def describe(self):
        return f"base {'e' if self.base == -1 else f'{self.base:g}'}"


BNLL_THRESHOLD = 50.0  # Caffe's kBNLL_THRESHOLD: exp() argument cap in the backward


class BNLLFunction(torch.autograd.Function):
    """y = log(1 + exp(x)) computed stably; dx = dy * e / (1 + e), e = exp(min(x, 50))."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.clamp_min(x, 0) + torch.log1p(torch.exp(-torch.abs(x)))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        e = torch.exp(torch.clamp_max(x, BNLL_THRESHOLD))
        return dy * e / (e + 1)


@register("BNLL", v1="BNLL")
class BNLL(_Elementwise):
    """Binomial normal log likelihood: y = log(1 + exp(x))."""

    def apply_to(self, x):
        return BNLLFunction.apply(x)


@register("Threshold", v1="THRESHOLD")
class Threshold(_Elementwise):
    """y = 1 if x > threshold else 0 (no backward in Caffe: the top carries no gradient)."""

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.threshold = float(spec.param.threshold_param.threshold)

    def apply_to(self, x):
        return (x > self.threshold).to(x.dtype)

    def describe(self):
        return f"> {self.threshold:g}"


@register("Dropout", v1="DROPOUT")
class Dropout(_Exact):
    """Identity at TEST (Caffe scales at TRAIN). At TRAIN Caffe's random mask cannot be
    reproduced, so running it raises PortingError unless dropout_ratio is 0."""

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.ratio = float(spec.param.dropout_param.dropout_ratio)
        if not 0 <= self.ratio < 1:
            raise ValueError(f"dropout_ratio must be in [0, 1), got {self.ratio:g}")

    def apply_to(self, x):
        if self.phase == "train" and self.ratio > 0:
            raise PortingError("Dropout at TRAIN draws a random mask from Caffe's generator, which cannot "
                               "be reproduced; run the net in the TEST phase", place=f"layer {self.name}")
        return x.view_as(x)  # a top of its own (see data_movement): its gradient is its consumers' alone

    def describe(self):
        return f"ratio {self.ratio:g}"
