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

A window wider than the channels costs no more than 2C - 1 shifts here (the others add
only padding zeros); Caffe's own limits are kept: its int local_size, its padded-square
blob of C + n - 1 channels (at most INT_MAX values) and, within channels, its pooling's
int divisor n * n.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from porting import caffe_pb2
from porting.layers import INT_MAX, CaffeLayer, PortBug, blob_problem, caffe_int, count, int_arithmetic, register
from porting.layers.neuron import caffe_power
from porting.layers.pooling import caffe_ave_pool, pool_work
from porting.rounding import ETA, LIBM, LIBM_ETA, U, gamma, stored_error


def _shifts(size: int, front: int, channels: int) -> range:
    """The shifts i < size of a window sum whose terms t_{c - front + i} reach a channel."""
    return range(max(0, front - channels + 1), min(size, front + channels))


def _window_sum_over_channels(t: torch.Tensor, size: int, front: int) -> torch.Tensor:
    """sum_{i < size} of t shifted along channels: out_c = sum t_{c - front + i}, zero outside.

    Only the shifts that reach a channel are added (at most 2C - 1), in increasing i; the
    others would add exact zeros."""
    channels = t.shape[1]
    shifts = _shifts(size, front, channels)
    padded = F.pad(t, (0, 0, 0, 0, front - shifts.start, shifts.stop - 1 - front))
    total = padded[:, 0:channels].clone()
    for i in range(1, len(shifts)):
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
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_lrn.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        lp = spec.param.lrn_param
        shape = self.bottom_shapes[0]
        if len(shape) != 4:
            raise ValueError(f"LRN needs a 4-axis (N, C, H, W) bottom, got {shape}")
        self.size = caffe_int(lp.local_size, "local_size")
        if self.size % 2 != 1:
            raise ValueError(f"LRN only supports odd values for local_size, got {self.size}")
        self.alpha, self.beta, self.k = float(lp.alpha), float(lp.beta), float(lp.k)
        self.within = lp.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL
        n, c, h, w = shape
        if self.within:  # Caffe's AVE pooling sub-layer: kernel n, pad (n - 1) / 2, int pool_size n * n
            int_arithmetic(max(h, w) + self.size - 1, "input plus padding")
            if self.size * self.size > INT_MAX:
                raise ValueError(f"local_size {self.size}: the AVE divisor n * n overflows Caffe's int")
        else:  # Caffe's CrossChannelForward_cpu: a padded-square blob (1, C + n - 1, H, W)
            problem = blob_problem((1, int_arithmetic(c + self.size - 1, "channels plus padding"), h, w))
            if problem:
                raise ValueError(f"local_size {self.size}: Caffe's padded-square blob {problem}")
        self.top_shapes = [shape]

    def forward(self, x):
        if not self.within:
            return (CrossChannelLRN.apply(x, self.size, self.alpha, self.beta, self.k),)
        pad = (self.size - 1) // 2
        pooled = (x.shape[2], x.shape[3])  # stride 1, pad (n-1)/2: Caffe's pooled size equals the input's
        squared = caffe_power(x, 2.0)
        averaged = caffe_ave_pool(squared, (self.size, self.size), (1, 1), (pad, pad), pooled)
        return (x * caffe_power(averaged, -self.beta, self.alpha, 1.0),)

    def port_bugs(self, bottoms, top_shape):
        """lrn-alpha-whole (alpha not divided by local_size), lrn-alpha-divided (divided once
        more), lrn-k, lrn-beta (the values ports use), lrn-region (the other norm_region)."""
        def edited(**changes):
            def edit(param):
                for k, v in changes.items():
                    setattr(param.lrn_param, k, v)
            return self.variant(bottoms, edit)

        yield PortBug("lrn-alpha-whole", "with alpha not divided by local_size (k + alpha * the window's sum of "
                      "squares)", edited(alpha=self.alpha * self.size), bottoms,
                      why=f"Caffe scales the sum by alpha / local_size = {self.alpha:g} / {self.size}")
        yield PortBug("lrn-alpha-divided", f"with alpha divided by local_size once more ({self.alpha:g} / {self.size})",
                      edited(alpha=self.alpha / self.size), bottoms,
                      why="torch's LocalResponseNorm divides alpha by size itself, as Caffe does; pass Caffe's "
                      "alpha as it is")
        for k in (1.0, 2.0):
            if k != self.k:
                yield PortBug("lrn-k", f"with k = {k:g} instead of {self.k:g}", edited(k=k), bottoms)
        for beta in (0.75, 0.5, 1.0):
            if beta != self.beta:
                yield PortBug("lrn-beta", f"with beta = {beta:g} instead of {self.beta:g}", edited(beta=beta), bottoms)
        region = caffe_pb2.LRNParameter
        other = region.ACROSS_CHANNELS if self.within else region.WITHIN_CHANNEL
        yield PortBug("lrn-region", f"with the window {'across channels' if self.within else 'within each channel'} "
                      f"instead of {'within each channel' if self.within else 'across channels'}",
                      edited(norm_region=other), bottoms)

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
        s_max = abs(k) + abs(alpha) / size * (x * x).sum(dim=1, keepdim=True)
        return gamma(2 * x.shape[1] + size + 4) * s_max + gamma(2) * (s - k).abs() + size * ETA

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        x, y = bottoms[0], exact_tops[0]
        if not self.within:
            s = self._scale(x)
            ds = self._scale_error(x, s)
            # y = x * s^-beta: beta*ds/s from the scale, pow (LIBM), one product.
            return [(abs(self.beta) * ds / s + LIBM + 2 * U) * y.abs() + 2 * ETA]
        _, _, _, rel_p = self._within_errors(x)
        return [(rel_p + U) * y.abs() + 2 * ETA]

    def _within_pool(self, t):
        pad = (self.size - 1) // 2
        return caffe_ave_pool(t, (self.size, self.size), (1, 1), (pad, pad), (t.shape[2], t.shape[3]))

    def _within_errors(self, x):
        """WITHIN_CHANNEL as Caffe chains it: A = AVE pool of x^2 (pow LIBM, n*n terms and a
        division), z = fl(fl(alpha A) + 1), P = pow(z, -beta) (LIBM). Returns A, z, the bound
        on |fl(z) - z| / |z| and the one on |fl(P) - P| / |P| (float64)."""
        a = self._within_pool(x * x)
        z = 1 + self.alpha * a
        rel_z = (abs(self.alpha) * a * (LIBM + gamma(self.size * self.size + 1)) + LIBM_ETA) / z.abs() + U
        return a, z, rel_z, LIBM + abs(self.beta) * rel_z

    def _within_backward_bound(self, x, g):
        # Caffe's sub-layer backwards: dx = g * P (Eltwise PROD)
        #   + 2x * poolT(dA / n^2) (Power 2, AVE pooling), dA = (g x) * (-beta alpha) * P / z (Power).
        # g * P: P's error and one product; dA: P's and z's errors, a quotient, the constant and
        # two products; pooling's transpose sums at most n*n terms of dA / n^2 in any order;
        # two products; the final sum of the two paths one rounding.
        _, z, rel_z, rel_p = self._within_errors(x)
        p = z.pow(-self.beta)
        a1 = (g * p).abs()
        d_a = (g * x * self.alpha * self.beta * p / z).abs()
        with torch.enable_grad():
            t = torch.zeros_like(x, requires_grad=True)
            (spread,) = torch.autograd.grad(self._within_pool(t), t, d_a)
        a2 = 2 * x.abs() * spread
        return [a1 * (rel_p + 2 * U) + a2 * (rel_p + rel_z + gamma(self.size * self.size + 8)) + 4 * ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        if self.within:
            return self._within_backward_bound(bottoms[0], top_diffs[0])
        size, alpha, beta = self.size, self.alpha, self.beta
        x, y_f, y, g = bottoms[0], tops[0], exact_tops[0], top_diffs[0]
        dy = stored_error(y_f, y)
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
        cache = abs(2 * alpha * beta / size)
        a2 = cache * x.abs() * win_ratio
        d_accum = gamma(2 * c + size + 4) * total_ratio + _window_sum_over_channels(d_ratio, size, pad)
        bound = (abs(beta) * ds / s + LIBM + 2 * U) * a1 + cache * x.abs() * d_accum + gamma(3) * (a1 + a2)
        return [bound + 4 * ETA]

    def work(self) -> int:
        """ACROSS: one sum per shift that reaches a channel, and a few operations per value;
        WITHIN: the pooling sub-layer's (``pool_work``) and a few operations per value."""
        n, c, h, w = self.bottom_shapes[0]
        if self.within:
            return pool_work((n, c, h, w), (self.size, self.size), (1, 1), (h, w)) + 4 * n * c * h * w
        return n * c * h * w * (len(_shifts(self.size, (self.size - 1) // 2, c)) + 4)

    def describe(self) -> str:
        region = "within" if self.within else "across"
        text = f"{region} n{self.size} a{self.alpha:g} b{self.beta:g}"
        return text if self.within else f"{text} k{self.k:g}"
