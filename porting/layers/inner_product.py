"""InnerProduct (Caffe 1.0 inner_product_layer.cpp): a fully connected layer.

The bottom is flattened from ``axis`` (default 1) on: (M, K) with M = count(0, axis) and
K = count(axis). Weights are (num_output, K), or (K, num_output) with ``transpose: true``;
bias (num_output,). The top is bottom.shape[:axis] + (num_output,).
"""
from __future__ import annotations

import torch.nn.functional as F

from porting.layers import CaffeLayer, caffe_int, canonical_axis, count, register
from porting.rounding import ETA, gamma, magnitude, magnitude_vjp


@register("InnerProduct", v1="INNER_PRODUCT")
class InnerProduct(CaffeLayer):
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_conv.py")
    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        ip = spec.param.inner_product_param
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(ip.axis, len(shape))
        self.num_output = caffe_int(ip.num_output, "num_output")
        if self.num_output <= 0:
            raise ValueError("inner_product_param.num_output must be positive")
        self.transpose = bool(ip.transpose)
        self.bias_term = bool(ip.bias_term)
        k = count(shape, self.axis)
        self.param_shapes = [(k, self.num_output) if self.transpose else (self.num_output, k)]
        if self.bias_term:
            self.param_shapes.append((self.num_output,))
        self.top_shapes = [shape[: self.axis] + (self.num_output,)]

    def forward(self, x):
        flat = x.reshape(tuple(x.shape[: self.axis]) + (-1,))
        weight = self.blobs[0].t() if self.transpose else self.blobs[0]
        bias = self.blobs[1] if self.bias_term else None
        return (F.linear(flat, weight, bias),)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # GEMM of K products per output plus the bias, any order: gamma(K + 1).
        n = self.param_shapes[0][0 if self.transpose else 1]
        return [gamma(n + 1) * m + (n + 1) * ETA for m in magnitude(self, bottoms, abs_module)]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        n = self.num_output
        return [None if m is None else gamma(n) * m + n * ETA
                for m in magnitude_vjp(self, bottoms, top_diffs, abs_module)]

    def work(self) -> int:
        """Products: each top value is a dot product of K = count(axis) terms."""
        return count(self.top_shapes[0]) * count(self.bottom_shapes[0], self.axis)

    def describe(self) -> str:
        return f"{self.num_output}" + (" T" if self.transpose else "") + ("" if self.bias_term else " nobias")
