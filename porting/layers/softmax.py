"""Softmax (Caffe 1.0 softmax_layer.cpp): exp(x - max) / sum over ``axis`` (default 1).

``torch.softmax`` computes the same max-shifted formula and its backward is Caffe's
(dy - sum(dy * y)) * y along the axis.
"""
from __future__ import annotations

import torch

from porting.layers import CaffeLayer, PortBug, canonical_axis, register
from porting.rounding import ETA, LIBM, U, gamma, stored_error


@register("Softmax", v1="SOFTMAX")
class Softmax(CaffeLayer):
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_neuron.py")
    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(spec.param.softmax_param.axis, len(shape))
        self.top_shapes = [shape]

    def forward(self, x):
        return (torch.softmax(x, dim=self.axis),)

    def port_bugs(self, bottoms, top_shape):
        """softmax-axis: the softmax over another axis (dim=0, the batch, first)."""
        for axis in range(bottoms[0].dim()):
            if axis != self.axis:
                yield PortBug("softmax-axis", f"with the softmax over axis {axis}"
                              + (" (the batch)" if axis == 0 else "") + f" instead of axis {self.axis}",
                              self.variant(bottoms, lambda p, a=axis: setattr(p.softmax_param, "axis", a)), bottoms)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        x, axis = bottoms[0], self.axis
        spread = (x - x.amax(dim=axis, keepdim=True)).abs()
        n = x.shape[axis]
        # y_i = exp(d_i) / sum_j exp(d_j), d = x - max: rounding d_i moves exp(d_i) by |d_i| u
        # (relative), in y_i's numerator and in the sum's largest term; the sum of n terms adds
        # gamma_{n-1}; exp itself (LIBM, in y_i and in the sum), the quotient (or reciprocal
        # and product) the rest.
        rel = U * (spread + spread.amax(dim=axis, keepdim=True)) + gamma(n + 1) + 2 * LIBM
        return [rel * exact_tops[0].abs() + 2 * ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe: dx = (g - sum(g*y)) * y with its stored y: a dot product of n terms, a
        # subtraction and a product, plus the stored top's own error.
        y_f, g, axis = tops[0], top_diffs[0], self.axis
        dy = stored_error(y_f, exact_tops[0])
        n = y_f.shape[axis]
        dot = (g * y_f).sum(dim=axis, keepdim=True)
        dot_mag = (g * y_f).abs().sum(dim=axis, keepdim=True)
        bound = (gamma(n + 2) * (g.abs() + dot_mag) * y_f.abs() + (g - dot).abs() * dy
                 + y_f.abs() * (g.abs() * dy).sum(dim=axis, keepdim=True))
        return [bound + 2 * ETA]

    def describe(self) -> str:
        return f"axis {self.axis}"
