"""BatchNorm (Caffe 1.0 batch_norm_layer.cpp): normalization only, no scale or shift.

Blobs (statistics, not weights: ``frozen_blobs``): 0 = running mean sum (C,), 1 = running
variance sum (C,), 2 = the moving-average scale factor (1,). Channels are axis 1 (one
channel for a 1-axis bottom); statistics run over every other axis.

With global stats (default: use_global_stats = phase is TEST):
    factor = 0 if blob2 == 0 else 1 / blob2
    y = (x - factor * blob0) / sqrt(factor * blob1 + eps),   dx = dy / sqrt(...)
Otherwise the batch mean and biased variance E[(x - mean)^2] normalize x, and, as Caffe's
forward does, the blobs are updated in place: blob2 = maf * blob2 + 1,
blob0 = mean + maf * blob0, blob1 = m / (m - 1) * var + maf * blob1 (m values per channel).
Caffe's backward, (dy - mean(dy) - mean(dy * y) * y) / sqrt(var + eps), is the exact
derivative of the batch forward, so autograd computes it.
"""
from __future__ import annotations

import numpy as np
import torch

from porting.layers import CaffeLayer, PortBug, register
from porting.rounding import ETA, LIBM, gamma

PORT_EPS = (1e-5, 1e-3, 1e-4, 2e-5, 1e-6, 1e-2, 0.0)  # eps values ports use (torch's default first)


@register("BatchNorm")
class BatchNorm(CaffeLayer):
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_eltwise_norm.py", "tests/test_trained.py")
    frozen_blobs = True

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        bp = spec.param.batch_norm_param
        shape = self.bottom_shapes[0]
        self.channels = 1 if len(shape) == 1 else shape[1]
        self.eps = float(bp.eps)
        self.moving_average_fraction = float(bp.moving_average_fraction)
        self.use_global_stats = bp.use_global_stats if bp.HasField("use_global_stats") else self.phase == "test"
        self.param_shapes = [(self.channels,), (self.channels,), (1,)]
        self.top_shapes = [shape]

    def _per_channel(self, t: torch.Tensor, dims: int) -> torch.Tensor:
        return t.reshape((1, -1) + (1,) * (dims - 2)) if dims > 1 else t

    def forward(self, x):
        mean_sum, var_sum, factor_blob = self.blobs
        if self.use_global_stats:
            stored = factor_blob.detach()[0]
            factor = torch.where(stored == 0, torch.zeros_like(stored), 1 / stored)
            mean, var = mean_sum.detach() * factor, var_sum.detach() * factor
            centered = x - self._per_channel(mean.to(x.dtype), x.dim())
        else:
            axes = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=axes) if x.dim() > 1 else x.mean().reshape(1)
            centered = x - self._per_channel(mean, x.dim())
            var = (centered * centered).mean(dim=axes) if x.dim() > 1 else (centered * centered).mean().reshape(1)
            self._update_statistics(mean.detach(), var.detach(), x.numel() // self.channels)
        std = torch.sqrt(var.to(x.dtype) + self.eps)
        return (centered / self._per_channel(std, x.dim()),)

    def _global_stats(self, x):
        """The stored mean and variance (divided by the scale factor), shaped to broadcast."""
        mean, var, factor = (b.detach().to(x.dtype) for b in self.blobs)
        sf = float(factor.reshape(-1)[0])
        sf = 0.0 if sf == 0 else 1.0 / sf
        return self._per_channel(mean * sf, x.dim()), self._per_channel(var * sf, x.dim())

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        if not self.use_global_stats:
            return None  # batch statistics: no rule yet (the stored ones would be wrong)
        x = bottoms[0]
        mean, var = self._global_stats(x)
        # (x - mean) / sqrt(var + eps): the stats rescaling (1/factor and two products), the
        # subtraction, the sum, sqrt (Caffe: powx 0.5, LIBM), the quotient.
        return [(gamma(6) + LIBM) * (x.abs() + mean.abs()) / torch.sqrt(var + self.eps) + 2 * ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        if not self.use_global_stats:
            return None
        _, var = self._global_stats(bottoms[0])
        return [(gamma(4) + LIBM) * top_diffs[0].abs() / torch.sqrt(var + self.eps) + ETA]

    def port_bugs(self, bottoms, top_shape):
        """With the stored statistics only: bn-eps (another eps of PORT_EPS), bn-factor (the
        moving-average factor, blob 2, ignored)."""
        if not self.use_global_stats:
            return
        for eps in PORT_EPS:
            if eps != self.eps:
                yield PortBug("bn-eps", f"with BatchNorm eps {eps:g} instead of {self.eps:g}",
                              self.variant(bottoms, lambda p, e=eps: setattr(p.batch_norm_param, "eps", e)), bottoms)
        blobs = [b.detach().double().numpy() for b in self.blobs]
        factor = float(blobs[2].reshape(-1)[0])
        if factor not in (0.0, 1.0):
            yield PortBug("bn-factor", f"with the stored mean and variance not divided by the moving-average factor "
                          f"(blob 2, {factor:g})", self.variant(bottoms, blobs=blobs[:2] + [np.ones_like(blobs[2])]),
                          bottoms, why="Caffe's running statistics are blob 0 and blob 1 over blob 2")

    @torch.no_grad()
    def _update_statistics(self, mean, var, m: int) -> None:
        mean_sum, var_sum, factor_blob = self.blobs
        maf = self.moving_average_fraction
        factor_blob.mul_(maf).add_(1)
        mean_sum.mul_(maf).add_(mean.to(mean_sum.dtype))
        correction = m / (m - 1) if m > 1 else 1.0
        var_sum.mul_(maf).add_(var.to(var_sum.dtype) * correction)

    def describe(self) -> str:
        return f"eps {self.eps:g}" + ("" if self.use_global_stats else " batch stats")
