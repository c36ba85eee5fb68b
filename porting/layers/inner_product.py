"""InnerProduct (Caffe 1.0 inner_product_layer.cpp): a fully connected layer.

The bottom is flattened from ``axis`` (default 1) on: (M, K) with M = count(0, axis) and
K = count(axis). Weights are (num_output, K), or (K, num_output) with ``transpose: true``;
bias (num_output,). The top is bottom.shape[:axis] + (num_output,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from porting.layers import CaffeLayer, PortBug, caffe_int, canonical_axis, count, register
from porting.rounding import ETA, gamma, magnitude, magnitude_vjp

INNER_PRODUCT_PATHS = ("torch", "blocked")
BLOCK = 128  # outputs per partial sum of the "blocked" input gradient


def set_inner_product_path(module, path: str):
    """Choose how every InnerProduct in ``module`` (a CaffeNet, one layer, any ``nn.Module``)
    forms its input gradient dx = dy W; returns ``module``. "torch" (the default): autograd of
    ``F.linear``, one matrix product; at batch 1 MKL's sum over the outputs lands as far from
    float64 as one long chain would (CaffeNet fc6 and fc7, 4096 outputs: relative L2 error
    8e-7, against Caffe's 2.4e-7 through OpenBLAS). "blocked"
    (``blocked_linear``): dx sums ``BLOCK`` outputs at a time, one matrix product per block,
    then adds the partial sums (1.7e-7; the same products). Either path's top is a sum of
    the same K + 1 terms and its dx of the same N terms, in some order: ``forward_bound`` and
    ``backward_bound`` hold for both. Meant for small batches (MFV): the blocks' partial
    input gradients are held at once, N / BLOCK times the input (32x for fc6).
    Measured in benchmarks/bench_conv_accuracy.py."""
    if path not in INNER_PRODUCT_PATHS:
        raise ValueError(f"inner product path must be one of {', '.join(INNER_PRODUCT_PATHS)}, not {path!r}")
    for layer in module.modules():
        if isinstance(layer, InnerProduct):
            layer.path = path
    return module


def blocked_linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)`` (x: (..., K), weight: (N, K)) written so that autograd
    sums the input gradient BLOCK outputs at a time: x meets each block of BLOCK weight rows
    in its own matrix product (the blocks batched, x expanded over them; the last N mod BLOCK
    rows in one more), so its gradient is one product per block, then the blocks' sum
    (expand's backward, and autograd adding the two uses of x). The weights' gradient is
    computed only when asked for, as for ``F.linear``."""
    n, k = weight.shape
    rows = x.reshape(-1, k)
    full = n - n % BLOCK
    parts = []
    if full:
        blocks = weight[:full].reshape(full // BLOCK, BLOCK, k).transpose(1, 2)  # (B, K, BLOCK)
        y = torch.bmm(rows.expand(full // BLOCK, *rows.shape), blocks)          # (B, M, BLOCK)
        parts.append(y.transpose(0, 1).reshape(rows.shape[0], full))
    if n > full:
        parts.append(rows @ weight[full:].t())
    y = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


@register("InnerProduct", v1="INNER_PRODUCT")
class InnerProduct(CaffeLayer):
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_conv.py")
    path = "torch"  # how the input gradient is summed: one of INNER_PRODUCT_PATHS, see set_inner_product_path

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
        if self.path == "blocked":
            return (blocked_linear(flat, weight, bias),)
        return (F.linear(flat, weight, bias),)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # GEMM of K products per output plus the bias, any order: gamma(K + 1).
        n = self.param_shapes[0][0 if self.transpose else 1]
        return [gamma(n + 1) * m + (n + 1) * ETA for m in magnitude(self, bottoms, abs_module)]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        n = self.num_output
        return [None if m is None else gamma(n) * m + n * ETA
                for m in magnitude_vjp(self, bottoms, top_diffs, abs_module)]

    def port_bugs(self, bottoms, top_shape):
        """ip-transposed (the weight blob read transposed), flatten-nhwc (a 4-axis input
        flattened channels-last), bias-missing."""
        k = count(self.param_shapes[0]) // self.num_output
        yield PortBug("ip-transposed", "with the weight transposed (Caffe's num_output x K blob read as K x num_output)"
                      if not self.transpose else "with the weight transposed (the K x num_output blob read as "
                      "num_output x K)", self.variant(
                          bottoms, lambda p: setattr(p.inner_product_param, "transpose", not self.transpose)), bottoms,
                      why=f"Caffe stores it {self.num_output} x {k}" if not self.transpose else "")
        x = bottoms[0]
        if x.dim() == 4 and self.axis == 1:
            yield PortBug("flatten-nhwc", "with its input flattened channels-last (N x H x W x C)", self,
                          [x.permute(0, 2, 3, 1).reshape(x.shape)], why="Caffe flattens N x C x H x W")
        if self.bias_term:
            blobs = [b.detach().double().numpy() for b in self.blobs]
            yield PortBug("bias-missing", "without its bias", self.variant(
                bottoms, lambda p: setattr(p.inner_product_param, "bias_term", False), blobs[:1]), bottoms)

    def work(self) -> int:
        """Products: each top value is a dot product of K = count(axis) terms."""
        return count(self.top_shapes[0]) * count(self.bottom_shapes[0], self.axis)

    def describe(self) -> str:
        return f"{self.num_output}" + (" T" if self.transpose else "") + ("" if self.bias_term else " nobias")
