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

    def describe(self) -> str:
        region = "within" if self.within else "across"
        text = f"{region} n{self.size} a{self.alpha:g} b{self.beta:g}"
        return text if self.within else f"{text} k{self.k:g}"
