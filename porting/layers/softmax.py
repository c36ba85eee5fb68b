"""Softmax (Caffe 1.0 softmax_layer.cpp): exp(x - max) / sum over ``axis`` (default 1).

``torch.softmax`` computes the same max-shifted formula and its backward is Caffe's
(dy - sum(dy * y)) * y along the axis.
"""
from __future__ import annotations

import torch

from porting.layers import CaffeLayer, canonical_axis, register


@register("Softmax", v1="SOFTMAX")
class Softmax(CaffeLayer):
    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(spec.param.softmax_param.axis, len(shape))
        self.top_shapes = [shape]

    def forward(self, x):
        return (torch.softmax(x, dim=self.axis),)

    def describe(self) -> str:
        return f"axis {self.axis}"
