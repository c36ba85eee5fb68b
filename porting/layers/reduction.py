"""Reduction (Caffe 1.0 reduction_layer.cpp): SUM, ASUM, SUMSQ or MEAN of all values from
``axis`` (default 0) to the end, times ``coeff`` (default 1).

The top keeps the axes before ``axis`` (a zero-axis scalar at axis 0). Caffe's MEAN is SUM
with coeff / count(axis). Backward (Caffe's, which autograd reproduces): every bottom value
of a row gets g * coeff, times sign(x) for ASUM (0 at x = 0) and 2 x for SUMSQ.
"""
from __future__ import annotations

import torch

from porting import caffe_pb2
from porting.layers import CaffeLayer, canonical_axis, count, register
from porting.rounding import ETA, U, gamma

OPS = caffe_pb2.ReductionParameter


@register("Reduction")
class Reduction(CaffeLayer):
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_shape.py")
    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        rp = spec.param.reduction_param
        shape = self.bottom_shapes[0]
        self.op = int(rp.operation)
        self.axis = canonical_axis(int(rp.axis), len(shape))
        self.dim = count(shape, self.axis)
        # Caffe: coeff_ = coeff (/ dim_ for MEAN), in float; here in double (the float32 port
        # rounds it once when it scales a float32 tensor).
        self.coeff = float(rp.coeff) / (self.dim if self.op == OPS.MEAN else 1)
        self.top_shapes = [shape[:self.axis]]

    def forward(self, x):
        rows = x.reshape(count(x.shape, 0, self.axis), -1)
        if self.op == OPS.ASUM:
            rows = rows.abs()
        elif self.op == OPS.SUMSQ:
            rows = rows * rows
        y = rows.sum(dim=1)
        if self.coeff != 1:
            y = y * self.coeff
        return (y.reshape(x.shape[:self.axis]),)

    def work(self) -> int:
        return count(self.bottom_shapes[0])

    def _rows(self, x):
        return x.reshape(count(x.shape, 0, self.axis), -1)

    def _constant_error(self) -> float:
        """Relative error of the float32 coeff / dim (the quotient, and dim as a float)."""
        return 2 * U if self.op == OPS.MEAN and self.coeff != 1 else 0.0

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # A sum of dim terms (x, |x| or fl(x * x)) in any order: gamma(dim + 1) times the sum of
        # their magnitudes; then fl(s * coeff): one product and the constant.
        rows, y = self._rows(bottoms[0]), exact_tops[0]
        mag = (rows * rows if self.op == OPS.SUMSQ else rows.abs()).sum(dim=1).reshape(y.shape)
        scale = 0.0 if self.coeff == 1 else U + self._constant_error()
        return [gamma(self.dim + 1) * abs(self.coeff) * mag + scale * y.abs() + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: b = fl(g * coeff), then b (SUM, MEAN), sign(x) b (ASUM), fl(2 b x) (SUMSQ):
        # at most two roundings and the constant.
        x = bottoms[0]
        rows = self._rows(x)
        g = top_diffs[0].reshape(-1, 1) * abs(self.coeff)
        if self.op == OPS.SUMSQ:
            G = 2 * g * rows.abs()
        elif self.op == OPS.ASUM:
            G = g * (rows != 0)
        else:
            G = g.expand_as(rows)
        return [((2 * U + self._constant_error()) * G.abs() + 2 * ETA).reshape(x.shape)]

    def decisions(self, bottoms):
        if self.op != OPS.ASUM:
            return None
        return [torch.sign(bottoms[0]).to(torch.int8)]

    def decision_margins(self, bottoms):
        if self.op != OPS.ASUM:
            return None
        return [bottoms[0].abs()]

    def describe(self) -> str:
        name = OPS.ReductionOp.Name(self.op)
        return f"{name} axis {self.axis}" + (f" coeff {self.spec.param.reduction_param.coeff:g}"
                                             if self.spec.param.reduction_param.coeff != 1 else "")
