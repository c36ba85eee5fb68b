"""Eltwise (Caffe 1.0 eltwise_layer.cpp): PROD, SUM (with coeff) or MAX of 2+ same-shape bottoms.

SUM: y = sum_i coeff_i * x_i (coeff default 1), dx_i = coeff_i * dy.
PROD: y = prod_i x_i; with stable_prod_grad (default) dx_i = dy * prod_{j != i} x_j
(what autograd gives), otherwise Caffe's dx_i = dy * y / x_i (its own Function).
MAX: Caffe keeps bottom 0 only where x_0 > x_1 (strictly), then takes a later bottom k >= 2
only where it is strictly greater; the gradient goes to that one bottom. Among equal
maxima the winner is therefore the first in the order 1, 0, 2, 3, ...; reproduced with an
argmax over the bottoms stacked in that order.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from porting import caffe_pb2
from porting.layers import CaffeLayer, PortBug, register
from porting.rounding import ETA, U, gamma, vjp

OP = caffe_pb2.EltwiseParameter


class UnstableProd(torch.autograd.Function):
    """Product of the bottoms with Caffe's stable_prod_grad: false backward, dy * y / x_i."""

    @staticmethod
    def forward(ctx, *xs):
        y = xs[0] * xs[1]
        for x in xs[2:]:
            y = y * x
        ctx.save_for_backward(y, *xs)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, *xs = ctx.saved_tensors
        return tuple(y / x * dy for x in xs)


def caffe_eltwise_max(xs):
    """Element-wise max whose gradient goes to Caffe's winner (ties: order 1, 0, 2, 3, ...)."""
    order = [1, 0] + list(range(2, len(xs)))
    stacked = torch.stack([xs[i] for i in order])
    winner = torch.argmax(stacked, dim=0, keepdim=True)
    return stacked.gather(0, winner).squeeze(0)


@register("Eltwise", v1="ELTWISE")
class Eltwise(CaffeLayer):
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_eltwise_norm.py")
    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(2, -1)
        ep = spec.param.eltwise_param
        if any(s != self.bottom_shapes[0] for s in self.bottom_shapes):
            raise ValueError(f"Eltwise bottoms must all have the same shape, got {self.bottom_shapes}")
        self.operation = OP.EltwiseOp.Name(ep.operation)
        self.coeffs = [float(c) for c in ep.coeff] or [1.0] * len(self.bottom_shapes)
        if ep.coeff and ep.operation != OP.SUM:
            raise ValueError("Eltwise takes coefficients only for SUM")
        if len(self.coeffs) != len(self.bottom_shapes):
            raise ValueError(f"Eltwise has {len(ep.coeff)} coeff(s) for {len(self.bottom_shapes)} bottoms")
        self.stable_prod_grad = bool(ep.stable_prod_grad)
        self.top_shapes = [self.bottom_shapes[0]]

    def forward(self, *xs):
        if self.operation == "SUM":
            y = xs[0] * self.coeffs[0] if self.coeffs[0] != 1 else xs[0]
            for c, x in zip(self.coeffs[1:], xs[1:]):
                y = y + (x * c if c != 1 else x)
            return (y,)
        if self.operation == "PROD":
            if not self.stable_prod_grad:
                return (UnstableProd.apply(*xs),)
            y = xs[0] * xs[1]
            for x in xs[2:]:
                y = y * x
            return (y,)
        return (caffe_eltwise_max(xs),)

    def port_bugs(self, bottoms, top_shape):
        """eltwise-coeff (SUM's coefficients ignored), eltwise-op (another operation)."""
        if self.operation == "SUM" and any(c != 1 for c in self.coeffs):
            yield PortBug("eltwise-coeff", f"with its coefficients ({', '.join(f'{c:g}' for c in self.coeffs)}) "
                          "ignored (a plain sum)", self.variant(bottoms, lambda p: p.eltwise_param.ClearField("coeff")),
                          bottoms)
        for op in ("SUM", "PROD", "MAX"):
            if op != self.operation:
                yield PortBug("eltwise-op", f"with {op} instead of {self.operation}",
                              self.variant(bottoms, lambda p, o=op: (p.eltwise_param.ClearField("coeff"), setattr(
                                  p.eltwise_param, "operation", OP.EltwiseOp.Value(o)))), bottoms)

    def decisions(self, bottoms):
        """MAX: the index of the winning bottom (ties: the first in the order 1, 0, 2, 3, ...)."""
        if self.operation != "MAX":
            return None
        order = torch.tensor([1, 0] + list(range(2, len(bottoms))), device=bottoms[0].device)
        stacked = torch.stack([bottoms[i] for i in order.tolist()])
        return [order[torch.argmax(stacked, dim=0)]]

    def decision_margins(self, bottoms):
        """MAX: the largest bottom minus the second largest, element by element."""
        if self.operation != "MAX":
            return None
        top2 = torch.stack(list(bottoms)).topk(2, dim=0).values
        return [top2[0] - top2[1]]

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        y, n = exact_tops[0], len(bottoms)
        if self.operation == "MAX":  # a comparison: exact
            return [torch.zeros_like(y)]
        if self.operation == "PROD":  # n - 1 products
            return [gamma(n) * y.abs() + n * ETA]
        # SUM: n products by a coefficient and n - 1 additions.
        mag = sum(abs(c) * b.abs() for c, b in zip(self.coeffs, bottoms))
        return [gamma(2 * n) * mag + n * ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        g, n = top_diffs[0], len(bottoms)
        if self.operation == "SUM":  # bottom_diff = coeff * top_diff
            return [U * (c * g).abs() for c in self.coeffs]
        if self.operation == "MAX":  # routing
            return [torch.zeros_like(b) for b in bottoms]
        # PROD: the product of the other bottoms (or y / x_i) times the top diff.
        mags = vjp(self, bottoms, [g])
        return [None if m is None else gamma(n + 1) * m.abs() + n * ETA for m in mags]

    def describe(self) -> str:
        if self.operation == "SUM" and any(c != 1 for c in self.coeffs):
            return "SUM " + ",".join(f"{c:g}" for c in self.coeffs)
        return self.operation
