"""Embed (Caffe 1.0 embed_layer.cpp): a lookup table, InnerProduct on one-hot inputs.

Bottom: indices held as float values, any shape; top: bottom.shape + (num_output,).
Blobs: weights (input_dim, num_output) (transposed from InnerProduct's), bias (num_output,)
when ``bias_term`` (default). top[..., :] = weights[int(x)] (+ bias: one float addition).
Caffe reads an index with static_cast<int> (truncation toward zero); its range and
integer checks are debug-only DCHECKs, so a release Caffe reads outside the table: here an
index outside [0, input_dim) (or NaN) is a run-time PortingError. No gradient reaches the
index bottom (Caffe CHECK-fails if asked to backpropagate to it); the weights' gradient
adds each top row's diff into the row it read, as Caffe's axpy loop does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from porting.errors import PortingError
from porting.layers import CaffeLayer, caffe_int, count, register
from porting.rounding import U


@register("Embed")
class Embed(CaffeLayer):
    verified_by = ("tests/test_layers_vision.py", "tests/test_bounds.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        ep = spec.param.embed_param
        self.num_output = caffe_int(ep.num_output, "num_output")
        self.input_dim = caffe_int(ep.input_dim, "input_dim")
        if self.num_output <= 0:
            raise ValueError("embed_param.num_output must be positive")
        if self.input_dim <= 0:
            raise ValueError("embed_param.input_dim must be positive")
        self.bias_term = bool(ep.bias_term)
        self.param_shapes = [(self.input_dim, self.num_output)] + ([(self.num_output,)] if self.bias_term else [])
        self.top_shapes = [self.bottom_shapes[0] + (self.num_output,)]

    def forward(self, x):
        index = x.detach()
        # static_cast<int>(x) in [0, input_dim) exactly where -1 < x < input_dim (NaN: never).
        # The check runs in Python: an ONNX export (traced) does not carry it.
        bad = ~((index > -1) & (index < self.input_dim))
        if bool(bad.any()):
            raise PortingError(f"Embed index {float(x.detach()[bad][0]):g} is outside the table [0, "
                               f"{self.input_dim}) (input_dim); Caffe would read outside its weights",
                               place=f"layer {self.name}")
        y = F.embedding(index.to(torch.int64), self.blobs[0].to(x.dtype))  # the cast truncates toward zero (ONNX Cast)
        if self.bias_term:
            y = y + self.blobs[1].to(x.dtype)
        return (y,)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # a copy, then one addition of the bias
        return [(U if self.bias_term else 0.0) * exact_tops[0].abs()]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return [None]  # the indices get no gradient

    def work(self) -> int:
        return count(self.top_shapes[0])

    def describe(self) -> str:
        return f"{self.input_dim} -> {self.num_output}" + ("" if self.bias_term else " nobias")
