"""MVN (Caffe 1.0 mvn_layer.cpp): mean (and variance) normalization per row.

Caffe reads the bottom as (num, channels, height, width) (its legacy accessors: at most 4
axes, missing trailing axes are 1) and its top is that 4-axis shape. A row is one
(n, c) plane, or one whole item n with ``across_channels``; dim values per row.

    y = x - mean(x)                                  (normalize_variance: false)
    y = (x - mean(x)) / (sqrt(mean((x - mean)^2)) + eps)   (default; eps added after the root)

Backward: without variance normalization Caffe's g - mean(g) is the derivative. With it,
Caffe computes dx = (g - mean(g) - y * mean(y * g)) / (sqrt(var) + eps), the derivative of
the eps = 0 formula: the exact derivative has y * (sqrt(var) + eps) / sqrt(var) in place of
y, so the two part where eps is not negligible against sqrt(var). The port reproduces
Caffe's formula (``MVNFunction``).
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from porting.layers import CaffeLayer, count, register
from porting.rounding import ETA, LIBM, U, gamma, stored_error


class MVNFunction(torch.autograd.Function):
    """rows (R, dim) -> (x - mean) / (sqrt(var) + eps); backward Caffe's formula."""

    @staticmethod
    def forward(ctx, rows, eps: float):
        centered = rows - rows.mean(dim=1, keepdim=True)
        d = torch.sqrt((centered * centered).mean(dim=1, keepdim=True)) + eps
        y = centered / d
        ctx.save_for_backward(y, d)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, d = ctx.saved_tensors
        dim = y.shape[1]
        total = y * (y * g).sum(dim=1, keepdim=True) + g.sum(dim=1, keepdim=True)
        return (g - total / dim) / d, None


@register("MVN", v1="MVN")
class MVN(CaffeLayer):
    verified_by = ("tests/test_layers_vision.py", "tests/test_bounds.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        shape = self.bottom_shapes[0]
        if len(shape) > 4:
            raise ValueError(f"MVN reads its bottom as (num, channels, height, width), at most 4 axes, got {shape}")
        legacy = shape + (1,) * (4 - len(shape))
        mp = spec.param.mvn_param
        self.normalize_variance = bool(mp.normalize_variance)
        self.across_channels = bool(mp.across_channels)
        self.eps = float(mp.eps)
        self.top_shapes = [legacy]

    def _rows(self, x):
        """x as (rows, dim), rows = num (across_channels) or num * channels."""
        n, c = (tuple(x.shape) + (1, 1))[:2]
        return x.reshape(n if self.across_channels else n * c, -1)

    def forward(self, x):
        legacy = tuple(x.shape) + (1,) * (4 - x.dim())
        rows = self._rows(x)
        if self.normalize_variance:
            y = MVNFunction.apply(rows, self.eps)
        else:
            y = rows - rows.mean(dim=1, keepdim=True)
        return (y.reshape(legacy),)

    def workspace(self) -> int:
        return count(self.top_shapes[0])  # Caffe's temp_, the bottom's size

    # -- float32 rounding --------------------------------------------------------------
    def _errors(self, x):
        """Per row (R, dim) of the float64 bottom: centered c, d = sqrt(var) + eps, and the
        bounds on the float32 |c^ - c| (per value) and |d^ - d| (per row), from Caffe's
        steps (gemv of the values with alpha = float(1/dim), subtract, square, gemv, powx
        0.5, add eps) and the port's (mean, subtract, square, mean, sqrt, add eps)."""
        rows = self._rows(x)
        dim = rows.shape[1]
        c = rows - rows.mean(dim=1, keepdim=True)
        e_mean = gamma(dim + 2) * rows.abs().mean(dim=1, keepdim=True)
        e_c = e_mean + U * c.abs()
        if not self.normalize_variance:
            return rows, c, None, e_c, None
        var = (c * c).mean(dim=1, keepdim=True)
        s = torch.sqrt(var)
        e_var = (2 * c.abs() * e_c + e_c * e_c).mean(dim=1, keepdim=True) * (1 + 2 * U) + gamma(dim + 3) * var
        e_root = torch.minimum(torch.sqrt(e_var), torch.where(s > 0, e_var / s, math.inf))
        e_s = e_root + LIBM * (s + e_root)
        d = s + self.eps
        e_d = e_s + U * (d + e_s)
        return rows, c, d, e_c, e_d

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        x = bottoms[0]
        _, c, d, e_c, e_d = self._errors(x)
        if d is None:
            return [(e_c + ETA).reshape(exact_tops[0].shape)]
        y = c / d
        room = (d - e_d).clamp_min(0)  # d^ >= d - e_d
        bound = (e_c + y.abs() * e_d) / room + U * (y.abs() + e_c / room) + ETA
        return [torch.where(room > 0, bound, math.inf).reshape(exact_tops[0].shape)]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        x, g = bottoms[0], top_diffs[0]
        rows, c, d, e_c, e_d = self._errors(x)
        g = g.reshape(rows.shape).abs()
        dim = rows.shape[1]
        if d is None:  # g - mean(g): the gemv (alpha's rounding, the product) and the subtraction
            mean_g = g.mean(dim=1, keepdim=True)
            return [(gamma(dim + 3) * mean_g + U * g + ETA).reshape(x.shape)]
        # Caffe: S1 = sum(fl(y g)), fl(y S1) + S2 (S2 = sum g), fl(g + fl(-1/dim) * T), / d^;
        # y is the framework's stored top (its error e_y carried on).
        y = (c / d).abs()
        e_y = stored_error(tops[0], exact_tops[0]).reshape(rows.shape)
        p1 = (y * g).sum(dim=1, keepdim=True)
        e_s1 = gamma(dim + 1) * p1 + (g * e_y).sum(dim=1, keepdim=True)
        e_ys1 = y * e_s1 + e_y * p1 + U * y * p1
        s2 = g.sum(dim=1, keepdim=True)
        t_mag = y * p1 + s2
        e_t = e_ys1 + gamma(dim) * s2 + U * t_mag
        num_mag = g + t_mag / dim
        e_num = e_t / dim + 3 * U * num_mag
        room = (d - e_d).clamp_min(0)
        bound = (e_num + num_mag * e_d / room) / d + U * num_mag / room + 2 * ETA
        return [torch.where(room > 0, bound, math.inf).reshape(x.shape)]

    def describe(self) -> str:
        text = "mean" + (" and variance" if self.normalize_variance else "")
        return text + (" across channels" if self.across_channels else "") + \
            (f" eps {self.eps:g}" if self.normalize_variance else "")
