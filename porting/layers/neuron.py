"""Element-wise ("neuron") layers of Caffe 1.0: ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal,
Power, Exp, Log, BNLL, Threshold, Dropout, Clip, Swish.

Each forward is Caffe's Forward_cpu formula; where Caffe's Backward_cpu is the exact
derivative autograd provides it, except Power (special cases that give Caffe's own
numbers, e.g. ``power * y / x`` at shift 0) and BNLL (gradient 1/2 at 0, which autograd of
a kinked expression would not give), which have their own autograd Functions.
Threshold has no backward in Caffe; its top carries no gradient here. Clip has its own
Function too (Caffe passes the gradient at both bounds, min <= x <= max).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from porting.errors import PortingError
from porting.layers import CaffeLayer, PortBug, register
from porting.rounding import ETA, LIBM, LIBM_ETA, U, U64, gamma, stored_error, vjp


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


class _Kinked(_Elementwise):
    """An element-wise layer that decides on each input whether x > ``kink``."""

    kink = 0.0

    def decisions(self, bottoms):
        return [bottoms[0] > self.kink]

    def decision_margins(self, bottoms):
        return [(bottoms[0] - self.kink).abs()]


def _affine_error(x, scale: float, shift: float):
    """z = shift + scale * x in float64 and the bound on |fl(fl(scale * x) + shift) - z|
    (Caffe's caffe_scal then caffe_add_scalar: two roundings)."""
    z = shift + scale * x
    return z, U * ((scale * x).abs() + z.abs())


class _Exact(_Elementwise):
    """An element-wise layer whose forward and backward round nothing."""

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return [torch.zeros_like(exact_tops[0])]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return [torch.zeros_like(bottoms[0])]


@register("ReLU", v1="RELU")
class ReLU(_Kinked):
    """y = max(x, 0) + negative_slope * min(x, 0); dy/dx = 1 if x > 0 else negative_slope."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")

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

    def port_bugs(self, bottoms, top_shape):
        """relu-missing (the port has no ReLU here), relu-slope (negative_slope ignored, or a
        leaky ReLU where Caffe has none)."""
        yield PortBug("relu-missing", "with no ReLU applied (its input passed on as it is)",
                      self.patched("apply_to", lambda self, x: x * 1.0), bottoms,
                      why=f"the port has no ReLU {self.name}")
        for slope in ((0.0,) if self.negative_slope else (0.01, 0.1, 0.2)):
            yield PortBug("relu-slope", f"with negative_slope {slope:g} instead of {self.negative_slope:g}",
                          self.variant(bottoms, lambda p, a=slope: setattr(p.relu_param, "negative_slope", a)),
                          bottoms, why="torch.relu has no slope; Caffe's ReLU takes relu_param.negative_slope"
                          if self.negative_slope else "nn.LeakyReLU where Caffe's ReLU has none")

    def describe(self):
        return f"slope {self.negative_slope:g}" if self.negative_slope else ""


@register("PReLU")
class PReLU(_Kinked):
    """y = x if x > 0 else a_c * x, one learned slope per channel (axis 1) or one shared.

    Blob 0: slopes of shape (C,), or () with channel_shared (Caffe's zero-axis blob).
    """
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")

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

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # Caffe: max(x, 0) + slope_c * min(x, 0): one product (adding 0 is exact).
        return [U * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: g * ((x > 0) + slope_c * (x <= 0)): one product where x <= 0.
        x, g = bottoms[0], top_diffs[0]
        slope = self.blobs[0].detach().to(x.dtype)
        if not self.channel_shared:
            slope = slope.reshape((1, -1) + (1,) * (x.dim() - 2))
        return [U * (g * slope).abs() * (x <= 0) + ETA]

    def describe(self):
        return "shared" if self.channel_shared else "per channel"


@register("ELU")
class ELU(_Kinked):
    """y = x if x > 0 else alpha * (exp(x) - 1); Caffe's backward (y + alpha) is the derivative."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.alpha = float(spec.param.elu_param.alpha)

    def apply_to(self, x):
        # exp of min(x, 0): the unused branch must not overflow (its zero gradient times inf is NaN)
        return torch.where(x > 0, x, self.alpha * (torch.exp(torch.clamp_max(x, 0)) - 1))

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # Caffe: max(x, 0) + alpha * (exp(min(x, 0)) - 1): exp's error (LIBM relative to
        # e = exp(min(x, 0)), not to e - 1: it cancels near 0), the subtraction, the product.
        e = torch.exp(torch.clamp_max(bottoms[0], 0))
        return [abs(self.alpha) * (LIBM * e + LIBM_ETA) + 2 * U * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: g * (alpha + y) where x <= 0 with its stored y (a sum, a product); autograd:
        # g * alpha * exp(x) (exp, two products). Exact where x > 0.
        x, g = bottoms[0], top_diffs[0]
        dy = stored_error(tops[0], exact_tops[0])
        grad = (g * self.alpha * torch.exp(torch.clamp_max(x, 0))).abs()
        return [(x <= 0) * (g.abs() * dy + (LIBM + 3 * U) * grad + abs(self.alpha) * g.abs() * LIBM_ETA) + ETA]

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
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")

    def apply_to(self, x):
        return SigmoidFunction.apply(x)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # 0.5 * tanh(0.5 x) + 0.5: tanh's error (LIBM relative to t = 2y - 1, which does not
        # shrink with y as x -> -inf), the exact halvings, one sum. Caffe computes it in double.
        y = exact_tops[0]
        return [0.5 * LIBM * (2 * y - 1).abs() + U * y.abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: g * y * (1 - y) with its stored y.
        y_f, g = tops[0], top_diffs[0]
        dy = stored_error(y_f, exact_tops[0])
        return [gamma(3) * g.abs() * y_f.abs() * (1 + y_f.abs()) + g.abs() * (1 - 2 * y_f).abs() * dy + ETA]


@register("TanH", v1="TANH")
class TanH(_Elementwise):
    """y = tanh(x); dy/dx = 1 - y^2."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")

    def apply_to(self, x):
        return torch.tanh(x)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return [LIBM * exact_tops[0].abs() + LIBM_ETA]  # one tanh

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: g * (1 - y^2) with its stored y.
        y_f, g = tops[0], top_diffs[0]
        dy = stored_error(y_f, exact_tops[0])
        return [gamma(3) * g.abs() * (1 + y_f * y_f) + 2 * (g * y_f).abs() * dy + ETA]


@register("AbsVal", v1="ABSVAL")
class AbsVal(_Exact):
    """y = |x|; dy/dx = sign(x) with sign(0) = 0."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")

    def apply_to(self, x):
        return torch.abs(x)

    def decisions(self, bottoms):
        return [torch.sign(bottoms[0]).to(torch.int8)]

    def decision_margins(self, bottoms):
        return [bottoms[0].abs()]


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
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        pp = spec.param.power_param
        self.power, self.scale, self.shift = float(pp.power), float(pp.scale), float(pp.shift)

    def apply_to(self, x):
        return caffe_power(x, self.power, self.scale, self.shift)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # Caffe: z = fl(fl(scale * x) + shift), y = pow(z, power) (LIBM): relative error
        # LIBM + |power| * dz / |z|; at z = 0 (power > 0) |y| <= dz ** power. Constant
        # top (power or scale 0): pow(shift, power) once, LIBM.
        x, y = bottoms[0], exact_tops[0]
        p = self.power
        if p * self.scale == 0:
            return [LIBM * y.abs()]
        z, dz = _affine_error(x, self.scale, self.shift)
        if p == 1:
            return [dz]
        rel = LIBM + abs(p) * dz / z.abs()
        at_zero = dz.pow(p) if p > 0 else torch.full_like(z, math.inf)
        return [torch.where(z == 0, at_zero, rel * y.abs()) + LIBM_ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe's branches (PowerFunction): diff_scale = power * scale rounded once, then
        #   power 1:  fl(diff_scale) * g                               -> 2u |G|
        #   power 2:  (diff_scale*scale) * x + diff_scale*shift, * g   -> 3u (|ds scale x| + |ds shift|) |g| + 2u |G|
        #   else:     y_f / z * diff_scale * g with z = fl(fl(scale x) + shift) (or x at shift 0)
        #             -> |G| (dz/|z| + 4u) + |g ds (y_f - y) / z|, the stored top's error counted.
        x, g = bottoms[0], top_diffs[0]
        p, scale, shift = self.power, self.scale, self.shift
        ds = p * scale
        if ds == 0:
            return [torch.zeros_like(x)]
        G = vjp(self, bottoms, [g])[0].abs()
        if p == 1:
            return [2 * U * G + ETA]
        if p == 2:
            return [3 * U * (g * ds).abs() * ((scale * x).abs() + abs(shift)) + 2 * U * G + 2 * ETA]
        z, dz = _affine_error(x, scale, shift)
        dy = stored_error(tops[0], exact_tops[0])
        return [G * (dz / z.abs() + 4 * U) + (g * ds).abs() * dy / z.abs() + 2 * ETA]

    def describe(self):
        return f"power {self.power:g} scale {self.scale:g} shift {self.shift:g}"


def _log_base(base: float, field: str) -> float:
    """log(base) as ExpLayer and LogLayer's LayerSetUp take it (1 for base -1, meaning e),
    with their CHECKs: base strictly positive, log(base) neither NaN nor inf."""
    if base == -1:
        return 1.0
    if not base > 0:
        raise ValueError(f"{field}.base must be strictly positive (or -1 for e), got {base:g}")
    if math.isinf(base):
        raise ValueError(f"{field}.base inf has an infinite logarithm")
    return math.log(base)


@register("Exp", v1="EXP")
class Exp(_Elementwise):
    """y = base ** (shift + scale * x), base e when base = -1 (the default).

    Computed as Caffe does: outer * exp(inner * x) with inner = ln(base) * scale and
    outer = base ** shift; dy/dx = inner * y.
    """
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        ep = spec.param.exp_param
        self.base, scale, shift = float(ep.base), float(ep.scale), float(ep.shift)
        log_base = _log_base(self.base, "exp_param")
        self.inner_scale = log_base * scale
        # Caffe's pow/exp in float: a shift beyond float range gives inf (or 0), as here.
        try:
            self.outer_scale = 1.0 if shift == 0 else (math.exp(shift) if self.base == -1 else self.base ** shift)
        except OverflowError:
            self.outer_scale = math.inf

    def apply_to(self, x):
        y = torch.exp(x * self.inner_scale if self.inner_scale != 1 else x)
        return y * self.outer_scale if self.outer_scale != 1 else y

    def _constant_error(self) -> float:
        """Relative error of Caffe's float32 inner_scale = log(base) * scale (exact for base e)."""
        return 0.0 if self.base == -1 else LIBM + U

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # Caffe: exp(fl(inner_scale * x)) * outer_scale: the exponent's error (constant and
        # product) times |inner x| moves y relatively; exp and outer_scale (pow) LIBM each,
        # one product.
        inner_x = (self.inner_scale * bottoms[0]).abs()
        rel = inner_x * (self._constant_error() + U) + 2 * LIBM + U
        return [rel * exact_tops[0].abs() + LIBM_ETA + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: fl(y_f * g) * inner_scale (its stored top, two products, the constant);
        # autograd: g * outer * exp(z) * inner (four products, two constants).
        g = top_diffs[0]
        G = (self.inner_scale * g * exact_tops[0]).abs()
        dy = stored_error(tops[0], exact_tops[0])
        return [G * (self._constant_error() + 6 * U) + (self.inner_scale * g).abs() * dy + 2 * ETA]

    def describe(self):
        return f"base {'e' if self.base == -1 else f'{self.base:g}'}"


@register("Log")
class Log(_Elementwise):
    """y = log_base(shift + scale * x), natural log when base = -1 (the default)."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        lp = spec.param.log_param
        self.base, self.scale, self.shift = float(lp.base), float(lp.scale), float(lp.shift)
        log_base = _log_base(self.base, "log_param")
        if log_base == 0:  # Caffe: CHECK(!isinf(base_scale_)), base_scale_ = 1 / log(base)
            raise ValueError("log_param.base 1 has no logarithm (1 / log(base) is inf)")
        self.base_scale = 1.0 / log_base

    def apply_to(self, x):
        inner = x * self.scale if self.scale != 1 else x
        if self.shift != 0:
            inner = inner + self.shift
        y = torch.log(inner)
        return y * self.base_scale if self.base_scale != 1 else y

    def _constant_error(self) -> float:
        """Relative error of Caffe's float32 1/log(base) and scale/log(base) (exact for base e)."""
        return 0.0 if self.base == -1 else LIBM + U

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # Caffe: log(z) * base_scale with z = fl(fl(scale x) + shift): dz/|z| absolute in
        # log(z); log (LIBM relative to its result), the constant, one product.
        z, dz = _affine_error(bottoms[0], self.scale, self.shift)
        rel = LIBM + self._constant_error() + U
        return [abs(self.base_scale) * dz / z.abs() + rel * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: pow(z, -1) (LIBM) * (scale / log(base)) * g; autograd: g * base_scale / z * scale.
        z, dz = _affine_error(bottoms[0], self.scale, self.shift)
        G = (top_diffs[0] * self.scale * self.base_scale / z).abs()
        return [G * (dz / z.abs() + LIBM + self._constant_error() + 4 * U) + 2 * ETA]

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
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")

    def apply_to(self, x):
        return BNLLFunction.apply(x)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # Caffe: x>0 ? x + log(1. + exp(-x)) : log(1. + exp(x)), the 1. in double: with
        # e = exp(-|x|) and L = log(1 + e) <= y, exp's error moves L by at most LIBM e/(1+e)
        # <= LIBM L, log adds LIBM L, the sum 1. + e rounds in double (U64 absolute in L, or
        # u with float), the final sum and store u |y|. Torch: log1p(exp(-|x|)), the same.
        x, y = bottoms[0], exact_tops[0]
        L = torch.log1p(torch.exp(-x.abs()))
        return [(2 * LIBM + U) * L + U * y.abs() + U64 + LIBM_ETA + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: e = exp(min(x, 50)) (LIBM), g * e (u) / (e + 1.) (double, stored: u);
        # e/(1+e) moves by LIBM/(1+e) relative; torch the same in float32 (3u).
        x, g = bottoms[0], top_diffs[0]
        e = torch.exp(torch.clamp_max(x, BNLL_THRESHOLD))
        G = (g * e / (1 + e)).abs()
        return [G * (LIBM + 3 * U + U64) + g.abs() * LIBM_ETA + ETA]


@register("Threshold", v1="THRESHOLD")
class Threshold(_Kinked):
    """y = 1 if x > threshold else 0 (no backward in Caffe: the top carries no gradient)."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.threshold = float(spec.param.threshold_param.threshold)
        self.kink = self.threshold

    def apply_to(self, x):
        return (x > self.threshold).to(x.dtype)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return [torch.zeros_like(exact_tops[0])]  # a comparison with the float32 threshold: exact

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return [None]  # no backward in Caffe (NOT_IMPLEMENTED); the top carries no gradient

    def describe(self):
        return f"> {self.threshold:g}"


class CaffeRandom:
    """Caffe's CPU random generator as Dropout draws from it, restarted at ``seed``.

    ``caffe.set_random_seed(seed)`` makes a boost::mt19937 seeded by init_genrand(seed),
    which is NumPy's legacy ``RandomState(seed)`` (the same MT19937, the same seeding):
    both give the same 32-bit words (checked against real Caffe in
    tests/test_data_layers.py). ``bernoulli(n, p)`` is Caffe's caffe_rng_bernoulli over
    boost's bernoulli_distribution<double>: one word per value, 1 where
    double(word) <= p * (2^32 - 1), and no word drawn at all when p == 0.
    """

    def __init__(self, seed: int):
        if not 0 <= int(seed) < 2**32:
            raise ValueError(f"a Caffe seed is an unsigned 32-bit int, got {seed}")
        self.seed = int(seed)
        self.drawing = False  # True while the net's forward runs (see seed_dropout)
        self.restart()

    def restart(self) -> None:
        self.state = np.random.RandomState(self.seed)

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        if p == 0:
            return np.zeros(n, bool)
        words = self.state.randint(0, 2**32, size=n, dtype=np.uint32)
        return words.astype(np.float64) <= p * 4294967295.0


def seed_dropout(net, seed: int) -> None:
    """Make ``net``'s TRAIN-phase Dropout layers draw Caffe's own masks.

    Each forward of ``net`` restarts one CaffeRandom at ``seed``, as the legacy worker's
    ``run_net(seed=...)`` calls ``caffe.set_random_seed(seed)`` right before Caffe's
    forward, and the Dropout layers draw from it in forward order, ``count`` words each
    (a ratio of 0 draws too, as Caffe's does). A Dropout layer evaluated alone, outside a
    forward of the net (as porting.verify re-evaluates each layer), applies the mask
    drawn by the net's last forward.
    """
    rng = CaffeRandom(seed)
    for module in net.modules():
        if isinstance(module, Dropout):
            module.rng = rng
    net.register_forward_pre_hook(_dropout_forward_starts)
    net.register_forward_hook(_dropout_forward_ends)


def _dropout_generators(net):
    return {id(m.rng): m.rng for m in net.modules() if isinstance(m, Dropout) and m.rng is not None}.values()


def _dropout_forward_starts(net, args):
    for rng in _dropout_generators(net):
        rng.restart()
        rng.drawing = True


def _dropout_forward_ends(net, args, output):
    for rng in _dropout_generators(net):
        rng.drawing = False


@register("Dropout", v1="DROPOUT")
class Dropout(_Exact):
    """Identity at TEST. At TRAIN, y = x * mask * scale with Caffe's float32
    scale = 1 / (1 - ratio) and mask ~ Bernoulli(1 - ratio) drawn from Caffe's generator:
    reproduced when the net is seeded (``seed_dropout``, ``load_caffe(dropout_seed=)``),
    else refused (PortingError) unless dropout_ratio is 0. dx = dy * mask * scale."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py", "tests/test_property_caffe.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.ratio = float(spec.param.dropout_param.dropout_ratio)
        if not 0 <= self.ratio < 1:
            raise ValueError(f"dropout_ratio must be in [0, 1), got {self.ratio:g}")
        threshold = float(np.float32(self.ratio))  # Caffe's threshold_ is a float
        self.keep = 1.0 - threshold  # caffe_rng_bernoulli(count, 1. - threshold_): a double
        self.scale = float(np.float32(1.0 / self.keep))  # scale_, a float
        self.rng: CaffeRandom | None = None
        self.mask: torch.Tensor | None = None  # the last mask drawn (bool, the bottom's shape)

    def _train_factor(self, x):
        """mask * scale in x's dtype: drawn during a forward of the net, else the last one."""
        if self.rng.drawing or self.mask is None:
            self.mask = torch.from_numpy(self.rng.bernoulli(x.numel(), self.keep).reshape(tuple(x.shape)))
        elif tuple(self.mask.shape) != tuple(x.shape):
            raise PortingError(f"Dropout evaluated alone on a bottom of shape {tuple(x.shape)}, but the net's "
                               f"last forward drew a mask of shape {tuple(self.mask.shape)}",
                               place=f"layer {self.name}")
        return self.mask.to(x.dtype) * self.scale

    def apply_to(self, x):
        if self.phase == "train" and self.rng is not None:
            return x * self._train_factor(x)
        if self.phase == "train" and self.ratio > 0:
            raise PortingError("Dropout at TRAIN draws a random mask from Caffe's generator: seed it "
                               "(--dropout-seed S, load_caffe(..., dropout_seed=S): caffe.set_random_seed(S) "
                               "before Caffe's forward) or run the net in the TEST phase", place=f"layer {self.name}")
        return x.view_as(x)  # a top of its own (see data_movement): its gradient is its consumers' alone

    def _rounds(self) -> bool:
        return self.phase == "train" and self.rng is not None and self.mask is not None and self.scale != 1.0

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        if not self._rounds():
            return super().forward_bound(bottoms, exact_tops, abs_module)
        return [U * exact_tops[0].abs()]  # fl(fl(x * mask) * scale): x * mask is exact

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        if not self._rounds() or top_diffs[0] is None:
            return super().backward_bound(bottoms, tops, exact_tops, top_diffs, abs_module)
        return [U * (top_diffs[0] * self.mask.to(top_diffs[0].dtype) * self.scale).abs()]

    def port_bugs(self, bottoms, top_shape):
        """dropout-scaled (times 1 - ratio at test), dropout-train (training mode: each output 0
        or the input times 1 / (1 - ratio); random, so recognised by that pattern)."""
        if not self.ratio:
            return
        if self.phase == "test":
            kept = 1.0 - self.ratio
            y = bottoms[0] * kept
            yield PortBug("dropout-scaled", f"multiplied by 1 - ratio = {kept:g}",
                          self.patched("apply_to", lambda self, x: x * kept), bottoms,
                          why="Caffe's Dropout scales at training, and is the identity at test",
                          slack=U * y.abs() + ETA)
        yield PortBug("dropout-train", "Dropout in training mode", explain=lambda output: self._train_pattern(
            bottoms[0], output))

    def _train_pattern(self, x, y):
        """(what, why) when ``y`` is ``x`` through Dropout in training mode: each output 0 or the
        input times 1 / (1 - ratio) (within one rounding), some of each where the input is not 0."""
        if tuple(y.shape) != tuple(x.shape):
            return None
        scaled = x / (1.0 - self.ratio)
        kept = (y - scaled).abs() <= 2 * U * scaled.abs() + ETA
        dropped = (y == 0) & (x != 0)
        if not bool((kept | (y == 0)).all()) or not bool(dropped.any()):
            return None
        n = int(dropped.sum())
        return (f"Dropout in training mode ({n} of {x.numel()} outputs zeroed, the others scaled by "
                f"1 / (1 - {self.ratio:g}))", "F.dropout's training=True default or a module left in train mode; "
                "Caffe's Dropout is the identity at test")

    def describe(self):
        return f"ratio {self.ratio:g}"


class ClipFunction(torch.autograd.Function):
    """Caffe's ClipLayer: y = max(lo, min(x, hi)) with std::min/std::max (a NaN input gives
    lo); dx = dy where lo <= x <= hi (both bounds included), 0 elsewhere."""

    @staticmethod
    def forward(ctx, x, lo: float, hi: float):
        ctx.save_for_backward(x)
        ctx.bounds = (lo, hi)
        t = torch.where(x > hi, torch.full_like(x, hi), x)  # std::min(x, hi): (hi < x) ? hi : x
        return torch.where(t > lo, t, torch.full_like(x, lo))  # std::max(lo, t): (lo < t) ? t : lo

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        return dy * ((x >= lo) & (x <= hi)).to(dy.dtype), None, None


@register("Clip")
class Clip(_Exact):
    """y = max(min, min(x, max)) (clip_param, both required); dy/dx = 1 where
    min <= x <= max, 0 elsewhere. Caffe checks nothing more (min > max gives min everywhere)."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        cp = spec.param.clip_param
        if not (cp.HasField("min") and cp.HasField("max")):
            raise ValueError("clip_param.min and clip_param.max are required")
        self.lo, self.hi = float(cp.min), float(cp.max)

    def apply_to(self, x):
        return ClipFunction.apply(x, self.lo, self.hi)

    def decisions(self, bottoms):
        x = bottoms[0]
        return [x >= self.lo, x <= self.hi]

    def decision_margins(self, bottoms):
        x = bottoms[0]
        return [(x - self.lo).abs(), (x - self.hi).abs()]

    def describe(self):
        return f"[{self.lo:g}, {self.hi:g}]"


@register("Swish")
class Swish(_Elementwise):
    """y = x * sigmoid(beta * x) (swish_param.beta, default 1), as Caffe computes it:
    s = sigmoid(fl(beta * x)) by its Sigmoid layer (tanh form), then y = x * s. Caffe's
    backward g * (beta y + s (1 - beta y)) is the derivative s + beta x s (1 - s); autograd."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.beta = float(spec.param.swish_param.beta)

    def apply_to(self, x):
        return x * SigmoidFunction.apply(x * self.beta if self.beta != 1 else x)

    def _sigmoid_error(self, x):
        """The exact s = sigmoid(beta x) and a bound on the error of the float32 s: the
        product fl(beta x) (u |beta x|, moved by s' = s (1 - s)), then Sigmoid's own rule."""
        bx = self.beta * x
        s = torch.sigmoid(bx)
        return s, s * (1 - s) * U * bx.abs() + 0.5 * LIBM * (2 * s - 1).abs() + U * s + ETA

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # fl(x * s_f): |x| times s's error, one product.
        x = bottoms[0]
        _, ds = self._sigmoid_error(x)
        return [x.abs() * ds + U * exact_tops[0].abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: g * (beta y_f + s_f * (1. - beta y_f)), the 1. in double: the stored top's
        # error moves it by |beta (1 - s)| dy <= |beta| dy, s's error by |1 - beta y|; two
        # float products beta y_f, the double steps, the stored result. Autograd:
        # g s + (g x) s (1 - s) beta: s's error by 1 + |beta x| |1 - 2s|, about six roundings.
        x, g = bottoms[0], top_diffs[0]
        s, ds = self._sigmoid_error(x)
        by, bx = (self.beta * exact_tops[0]).abs(), (self.beta * x).abs()
        G = (g * (s + bx * s * (1 - s))).abs()
        dy = stored_error(tops[0], exact_tops[0])
        per_g = (abs(self.beta) * dy + ds * (1 + by + bx) + (2 * U + 4 * U64) * by
                 + 6 * U * (s + bx * s * (1 - s)))
        return [g.abs() * per_g + U * G + 2 * ETA]

    def describe(self):
        return f"beta {self.beta:g}" if self.beta != 1 else ""
