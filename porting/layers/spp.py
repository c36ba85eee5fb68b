"""SPP, spatial pyramid pooling (Caffe 1.0 spp_layer.cpp), built as Caffe builds it: one
Pooling layer per pyramid level (the project's ``Pooling``), each flattened, then joined.

Level i (0 <= i < pyramid_height) pools into 2^i x 2^i bins: per spatial axis of size S,
kernel = stride = ceil(S / 2^i) and pad = (kernel * 2^i - S + 1) / 2 (C++ int division),
with ``spp_param.pool`` (MAX or AVE; STOCHASTIC is refused as in Pooling). Pooling's own
rules apply (ceil output size, the pad clip rule, pad < kernel: a level whose pad reaches
its kernel, as for 2^i well above S, is refused as Caffe's Pooling CHECK refuses it).
The top is (N, sum over levels of C * bins_h * bins_w): each level's (N, C, h, w) flattened
from axis 1, concatenated along axis 1 in level order; with pyramid_height 1 Caffe uses
the one Pooling layer's 4-axis top directly. The backward adds the levels' pooling
gradients (Caffe's internal Split), here by autograd.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from porting import caffe_pb2
from porting.layers import CaffeLayer, count, register
from porting.layers.pooling import Pooling
from porting.rounding import ETA, gamma, vjp

S = caffe_pb2.SPPParameter


def spp_level(level: int, height: int, width: int, pool: int) -> caffe_pb2.LayerParameter:
    """Caffe's SPPLayer::GetPoolingParam: the Pooling layer of one pyramid level."""
    bins = 2 ** level
    param = caffe_pb2.LayerParameter(name=f"spp_level{level}", type="Pooling")
    pp = param.pooling_param
    for axis, size in (("h", height), ("w", width)):
        kernel = math.ceil(size / bins)
        pad = (kernel * bins - size + 1) // 2
        setattr(pp, f"kernel_{axis}", kernel)
        setattr(pp, f"stride_{axis}", kernel)
        setattr(pp, f"pad_{axis}", pad)
    pp.pool = {S.MAX: caffe_pb2.PoolingParameter.MAX, S.AVE: caffe_pb2.PoolingParameter.AVE,
               S.STOCHASTIC: caffe_pb2.PoolingParameter.STOCHASTIC}[pool]
    param.top.append("pooled")
    return param


@register("SPP")
class SPP(CaffeLayer):
    verified_by = ("tests/test_layers_vision.py", "tests/test_bounds.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        sp = spec.param.spp_param
        shape = self.bottom_shapes[0]
        if len(shape) != 4:
            raise ValueError(f"SPP needs a 4-axis (N, C, H, W) bottom, got {shape}")
        if shape[2] <= 0 or shape[3] <= 0:
            raise ValueError(f"SPP input dimensions cannot be zero, got {shape}")
        self.height = int(sp.pyramid_height)
        if self.height < 1:
            raise ValueError("spp_param.pyramid_height must be at least 1")
        self.method = "MAX" if sp.pool == S.MAX else "AVE"
        levels = []
        for i in range(self.height):  # a level beyond the image is refused before the next
            param = spp_level(i, shape[2], shape[3], sp.pool)
            try:
                levels.append(Pooling(SimpleNamespace(name=param.name, param=param), [shape]))
            except ValueError as err:
                raise ValueError(f"pyramid level {i} ({2 ** i}x{2 ** i} bins): {err}") from None
        self.levels = nn.ModuleList(levels)
        if self.height == 1:
            self.top_shapes = [levels[0].top_shapes[0]]
        else:
            self.top_shapes = [(shape[0], sum(count(p.top_shapes[0], 1) for p in levels))]

    def _pool(self, x):
        if tuple(x.shape) != self.bottom_shapes[0]:  # Caffe rebuilds the levels for a new size
            sp = self.spec.param.spp_param
            return [Pooling(SimpleNamespace(name="level", param=spp_level(i, x.shape[2], x.shape[3], sp.pool)),
                            [tuple(x.shape)]) for i in range(self.height)]
        return list(self.levels)

    def forward(self, x):
        outs = [p(x)[0] for p in self._pool(x)]
        if self.height == 1:
            return (outs[0],)
        return (torch.cat([o.flatten(1) for o in outs], dim=1),)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        x = bottoms[0]
        bounds = []
        for p in self._pool(x):
            with torch.no_grad():
                exact = p(x)
            bounds.append(p.forward_bound([x], list(exact))[0])
        if self.height == 1:
            return bounds
        return [torch.cat([b.flatten(1) for b in bounds], dim=1)]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Levels have stride = kernel (no overlap): a bottom value gets at most one routed
        # (MAX) or divided (AVE) diff per level, and Caffe's Split adds the levels.
        mag = vjp(self, bottoms, [top_diffs[0].abs()])[0].abs()
        if self.method == "MAX":
            return [gamma(self.height - 1) * mag]
        return [gamma(self.height) * mag + self.height * ETA]

    def decisions(self, bottoms):
        """MAX: each level's winners (Pooling.decisions), one tensor per level."""
        if self.method != "MAX":
            return None
        return [p.decisions(bottoms)[0] for p in self._pool(bottoms[0])]

    def decision_margins(self, bottoms):
        if self.method != "MAX":
            return None
        return [p.decision_margins(bottoms)[0] for p in self._pool(bottoms[0])]

    def work(self) -> int:
        return sum(p.work() for p in self.levels)

    def workspace(self) -> int:
        """Caffe's internal blobs besides the top: each level's pooled output (the Concat
        copies them into the top; one level pools into the top itself), one sample's worth."""
        return sum(count(p.top_shapes[0], 1) for p in self.levels) if self.height > 1 else 0

    def describe(self) -> str:
        return f"{self.method} {self.height} level(s)"
