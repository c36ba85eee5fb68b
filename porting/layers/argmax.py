"""ArgMax (Caffe 1.0 argmax_layer.cpp): indices (or values) of the top_k largest entries.

Without ``axis`` each item n is flattened and the top is (N, 1, top_k) - or (N, 2, top_k)
holding indices then values with ``out_max_val`` - padded with 1s to the bottom's number
of axes (at least 3). With ``axis`` the top is the bottom's shape with that axis set to
top_k, holding values if ``out_max_val`` else indices. Indices are stored as floats.
Caffe sorts (value, index) pairs with std::greater, so equal values come out in
decreasing index order; that order is reproduced. There is no backward in Caffe.
"""
from __future__ import annotations

import math

import torch

from porting.layers import CaffeLayer, canonical_axis, count, register


def caffe_topk(x: torch.Tensor, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k values and indices along dim; ties ordered by decreasing index, as Caffe's pairs."""
    size = x.shape[dim]
    flipped = torch.flip(x, dims=(dim,))
    values, order = torch.sort(flipped, dim=dim, descending=True, stable=True)
    values, order = values.narrow(dim, 0, k), order.narrow(dim, 0, k)
    return values, (size - 1 - order)


@register("ArgMax", v1="ARGMAX")
class ArgMax(CaffeLayer):
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_shape.py")
    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        ap = spec.param.argmax_param
        shape = self.bottom_shapes[0]
        self.out_max_val, self.top_k = bool(ap.out_max_val), int(ap.top_k)
        self.axis = canonical_axis(ap.axis, len(shape)) if ap.HasField("axis") else None
        if self.top_k < 1:
            raise ValueError("argmax_param.top_k must be at least 1")
        available = shape[self.axis] if self.axis is not None else count(shape, 1)
        if self.top_k > available:
            raise ValueError(f"top_k {self.top_k} exceeds the {available} values it is taken from")
        if self.axis is not None:
            top = list(shape)
            top[self.axis] = self.top_k
        else:
            top = [1] * max(len(shape), 3)
            top[0], top[1], top[2] = shape[0], 2 if self.out_max_val else 1, self.top_k
        self.top_shapes = [tuple(top)]

    def forward(self, x):
        x = x.detach()
        if self.axis is not None:
            values, indices = caffe_topk(x, self.top_k, self.axis)
            return ((values if self.out_max_val else indices.to(x.dtype)),)
        flat = x.reshape(x.shape[0], -1)
        values, indices = caffe_topk(flat, self.top_k, 1)
        out = indices.to(x.dtype).unsqueeze(1)
        if self.out_max_val:
            out = torch.stack((indices.to(x.dtype), values), dim=1)
        return (out.reshape((x.shape[0],) + self.top_shapes[0][1:]),)

    def _ranked(self, x):
        """(values along the ranked axis, that axis): the item flattened without ``axis``."""
        if self.axis is None:
            return x.reshape(x.shape[0], -1), 1
        return x, self.axis

    def decisions(self, bottoms):
        """The selected indices, rank by rank: (N, top_k) without ``axis``, else the top's shape."""
        flat, dim = self._ranked(bottoms[0])
        return [caffe_topk(flat, self.top_k, dim)[1]]

    def decision_margins(self, bottoms):
        """Per rank k: the k-th largest value minus the (k+1)-th (inf past the last value)."""
        flat, dim = self._ranked(bottoms[0])
        k = min(self.top_k + 1, flat.shape[dim])
        values = caffe_topk(flat, k, dim)[0]
        if k == self.top_k:  # no (k+1)-th value
            pad_shape = list(values.shape)
            pad_shape[dim] = 1
            values = torch.cat([values, torch.full(pad_shape, -math.inf, dtype=values.dtype)], dim=dim)
        return [values.narrow(dim, 0, self.top_k) - values.narrow(dim, 1, self.top_k)]

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return [torch.zeros_like(exact_tops[0])]  # copied values and indices

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return [None]  # no backward in Caffe

    def describe(self) -> str:
        text = f"top {self.top_k}" + ("" if self.axis is None else f" axis {self.axis}")
        return text + (" values" if self.out_max_val else "")
