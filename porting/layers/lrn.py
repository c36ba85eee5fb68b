"""Local response normalization, Caffe 1.0 lrn_layer.cpp (CAFFE engine), forward and backward.

ACROSS_CHANNELS, for an (N, C, H, W) bottom, n = local_size (odd), p = (n - 1) / 2:

    scale_c = k + alpha / n * sum_{c' = c - p .. c + p, inside [0, C)} x_c'^2
    y_c     = x_c * scale_c ** -beta
    dx_c    = dy_c * scale_c ** -beta
              - (2 alpha beta / n) * x_c * sum_{c' = c - p .. c + p} dy_c' * y_c' / scale_c'

The backward is Caffe's CrossChannelBackward_cpu formula (it uses y / scale, not
x * scale ** (-beta - 1)), so it lives in an autograd Function rather than in autograd.

WITHIN_CHANNEL is what Caffe builds from sub-layers: split, Power(power 2), AVE Pooling
(kernel n, stride 1, pad p; Caffe's divisor counts the padding, so it is n * n
everywhere), Power(power -beta, scale alpha, shift 1), Eltwise PROD. Note that Caffe
ignores ``k`` here (the shift is 1). It is reproduced from the same pieces, so its
backward is the composition of Caffe's sub-layer backwards.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from porting import caffe_pb2
from porting.layers import CaffeLayer, register
from porting.layers.neuron import caffe_power
from porting.layers.pooling import caffe_ave_pool
from porting.rounding import ETA, U, gamma


def _window_sum_over_channels(t: torch.Tensor, size: int, front: int) -> torch.Tensor:
    """sum_{i < size} of t shifted along channels: out_c = sum t_{c - front + i}, zero outside."""
    channels = t.shape[1]
    padded = F.pad(t, (0, 0, 0, 0, front, size - 1 - front))
    total = padded[:, 0:channels].clone()
    for i in range(1, size):
        total.add_(padded[:, i:i + channels])
    return total


class CrossChannelLRN(torch.autograd.Function):
    """Caffe's ACROSS_CHANNELS LRN (forward and Caffe's own backward formula)."""

    @staticmethod
    def forward(ctx, x, size: int, alpha: float, beta: float, k: float):
        pre_pad = (size - 1) // 2
        scale = _window_sum_over_channels(x * x * (alpha / size), size, pre_pad).add_(k)
        scale_pow = scale.pow(-beta)
        y = x * scale_pow
        ctx.save_for_backward(x, y, scale, scale_pow)
        ctx.params = (size, alpha, beta)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, y, scale, scale_pow = ctx.saved_tensors
        size, alpha, beta = ctx.params
        inverse_pre_pad = size - (size + 1) // 2
        ratio = dy * y / scale
        accum = _window_sum_over_channels(ratio, size, inverse_pre_pad)
        dx = (dy * scale_pow).sub_(accum.mul_(x).mul_(2.0 * alpha * beta / size))
        return dx, None, None, None, None


@register("LRN", v1="LRN")
class LRN(CaffeLayer):
    """Local response normalization of an (N, C, H, W) blob; see the module docstring."""

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        lp = spec.param.lrn_param
        shape = self.bottom_shapes[0]
        if len(shape) != 4:
            raise ValueError(f"LRN needs a 4-axis (N, C, H, W) bottom, got {shape}")
        self.size = int(lp.local_size)
        if self.size % 2 != 1:
            raise ValueError(f"LRN only supports odd values for local_size, got {self.size}")
        self.alpha, self.beta, self.k = float(lp.alpha), float(lp.beta), float(lp.k)
        self.within = lp.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL
        self.top_shapes = [shape]

    def forward(self, x):
        if not self.within:
            return (CrossChannelLRN.apply(x, self.size, self.alpha, self.beta, self.k),)
        pad = (self.size - 1) // 2
        pooled = (x.shape[2], x.shape[3])  # stride 1, pad (n-1)/2: Caffe's pooled size equals the input's
        squared = caffe_power(x, 2.0)
        averaged = caffe_ave_pool(squared, (self.size, self.size), (1, 1), (pad, pad), pooled)
        return (x * caffe_power(averaged, -self.beta, self.alpha, 1.0),)

    def _scale(self, x):
        """s = k + alpha/size * (window sum over channels of x^2), float64 (N, C, ...)."""
        return self.k + self.alpha / self.size * _window_sum_over_channels(x * x, self.size, (self.size - 1) // 2)

    def _scale_error(self, x, s):
        """Bound on |fl(s) - s| for Caffe's CPU LRN: a running sum over all C channels.

        Caffe (lrn_layer.cpp, CrossChannelForward_cpu) slides the window by adding the new
        channel's alpha/size*x^2 and subtracting the old one, so the rounding of every partial
        sum along the channel axis stays in the scale. Each partial sum is at most
        k + alpha/size * sum over all channels of x^2 (= s_max); there are at most 2C + size + 2
        roundings on the chain, and each window term carries gamma_2 of its own.
        """
        size, alpha, k = self.size, self.alpha, self.k
        s_max = k + alpha / size * (x * x).sum(dim=1, keepdim=True)
        return gamma(2 * x.shape[1] + size + 4) * s_max + gamma(2) * (s - k) + size * ETA

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        x, y = bottoms[0], exact_tops[0]
        if not self.within:
            s = self._scale(x)
            ds = self._scale_error(x, s)
            # y = x * s^-beta: beta*ds/s from the scale, pow (<= 1 ulp = 2u), one product.
            return [(self.beta * ds / s + 4 * U) * y.abs() + 2 * ETA]
        # WITHIN_CHANNEL: Caffe chains Power (square), AVE pooling over size^2, Power, Eltwise PROD.
        return [(self.beta * gamma(self.size * self.size + 4) + 6 * U) * y.abs() + 3 * ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        if self.within:
            return None
        size, alpha, beta = self.size, self.alpha, self.beta
        x, y_f, y, g = bottoms[0], tops[0], exact_tops[0], top_diffs[0]
        dy = (y_f - y).abs()
        s = self._scale(x)
        ds = self._scale_error(x, s)
        c = x.shape[1]
        pad = (size - 1) // 2
        # Caffe (CrossChannelBackward_cpu): ratio = g*y/s; accum = running window sum of
        # ratio over channels; bottom_diff = g*s^-beta - (2*alpha*beta/size) * x * accum.
        a1 = g.abs() * s.pow(-beta)
        ratio = (g * y_f / s).abs()
        d_ratio = g.abs() * (dy / s + y_f.abs() * ds / (s * s)) + gamma(3) * ratio
        win_ratio = _window_sum_over_channels(ratio, size, pad)
        total_ratio = ratio.sum(dim=1, keepdim=True)
        cache = 2 * alpha * beta / size
        a2 = cache * x.abs() * win_ratio
        d_accum = gamma(2 * c + size + 4) * total_ratio + _window_sum_over_channels(d_ratio, size, pad)
        bound = (beta * ds / s + 4 * U) * a1 + cache * x.abs() * d_accum + gamma(3) * (a1 + a2)
        return [bound + 4 * ETA]

    def describe(self) -> str:
        region = "within" if self.within else "across"
        text = f"{region} n{self.size} a{self.alpha:g} b{self.beta:g}"
        return text if self.within else f"{text} k{self.k:g}"
