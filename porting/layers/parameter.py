"""Parameter (Caffe 1.0 parameter_layer.hpp): a layer whose only top is its own blob.

``parameter_param { shape { dim ... } }`` gives the blob's shape; the layer has no bottoms.
Caffe's top shares the blob's data and diff, so the top's gradient is the blob's gradient
(the port's top is a view of the ``nn.Parameter``, which autograd fills the same way).
Without a caffemodel the blob is zeros, as Caffe's unfilled blob is.
"""
from __future__ import annotations

import torch

from porting.layers import CaffeLayer, caffe_int, register


@register("Parameter")
class Parameter(CaffeLayer):
    verified_by = ("tests/test_layers_vision.py", "tests/test_bounds.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(0)
        if len(spec.param.top) != 1:
            raise ValueError(f"Parameter has exactly one top, got {len(spec.param.top)}")
        shape = tuple(caffe_int(d, "parameter_param shape dim") for d in spec.param.parameter_param.shape.dim)
        self.param_shapes = [shape]
        self.top_shapes = [shape]

    def forward(self):
        blob = self.blobs[0]
        return (blob.view(blob.shape),)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return [torch.zeros_like(exact_tops[0])]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return []  # no bottoms

    def describe(self) -> str:
        return "x".join(map(str, self.top_shapes[0])) or "scalar"
