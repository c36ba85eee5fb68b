"""Im2col (Caffe 1.0 im2col_layer.cpp): the columns Caffe's convolution multiplies, as a top.

``convolution_param`` gives the geometry exactly as for Convolution (kernel, stride, pad,
dilation per spatial axis, ``axis``; ``num_output``, ``group`` and the fillers are unused),
read by ``convolution.conv_geometry`` and sized by ``convolution.conv_out_size``. A bottom
(batch..., C, S1, ..., Sk) gives (batch..., C * K1 * ... * Kk, O1, ..., Ok): row
c * (K1 ... Kk) + (t1 ... tk in row-major order) holds, at each output position, the input
cell that kernel tap sees, zero in the padding and past the input (Caffe's im2col_cpu and
im2col_nd_cpu agree; ``force_nd_im2col`` changes nothing). The backward, Caffe's col2im,
adds every column entry back into its cell: autograd of the gather.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from porting.layers import CaffeLayer, canonical_axis, count, register
from porting.layers.convolution import conv_geometry, conv_out_size
from porting.rounding import gamma, vjp


@register("Im2col", v1="IM2COL")
class Im2col(CaffeLayer):
    verified_by = ("tests/test_layers_vision.py", "tests/test_bounds.py")
    param_fields = ("convolution_param",)

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        cp = spec.param.convolution_param
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(cp.axis, len(shape))
        self.num_spatial = len(shape) - self.axis - 1
        if self.num_spatial < 1:
            raise ValueError(f"Im2col needs at least one spatial axis after channel axis {self.axis}, "
                             f"bottom {shape} has none")
        self.kernel, self.stride, self.pad, self.dilation = conv_geometry(cp, self.num_spatial)
        out = [conv_out_size(shape[self.axis + 1 + i], self.kernel[i], self.stride[i], self.pad[i],
                             self.dilation[i]) for i in range(self.num_spatial)]
        self.top_shapes = [shape[:self.axis] + (shape[self.axis] * math.prod(self.kernel),) + tuple(out)]

    def forward(self, x):
        batch, channels = tuple(x.shape[:self.axis]), x.shape[self.axis]
        spatial = tuple(x.shape[self.axis + 1:])
        x = x.reshape((math.prod(batch), channels) + spatial)
        out = [conv_out_size(s, k, st, p, d) for s, k, st, p, d in
               zip(spatial, self.kernel, self.stride, self.pad, self.dilation)]
        # zeros: the padding, and past it where a window reaches beyond the padded input
        extent = [d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation)]
        after = [max(p, (o - 1) * st + e - s - p) for s, p, o, st, e in zip(spatial, self.pad, out, self.stride, extent)]
        x = F.pad(x, [v for p, a in zip(reversed(self.pad), reversed(after)) for v in (p, a)])
        n = self.num_spatial
        for i in range(n):  # axis i becomes (kernel tap, output position): cell o * stride + t * dilation
            cells = (torch.arange(self.kernel[i], device=x.device)[:, None] * self.dilation[i]
                     + torch.arange(out[i], device=x.device)[None, :] * self.stride[i])
            dim = 2 + 2 * i
            x = x.index_select(dim, cells.reshape(-1)).unflatten(dim, (self.kernel[i], out[i]))
        # (N, C, K1, O1, ..., Kk, Ok) -> (N, C, K1..Kk, O1..Ok) -> (N, C * K, O1..Ok)
        x = x.permute([0, 1] + [2 + 2 * i for i in range(n)] + [3 + 2 * i for i in range(n)])
        return (x.reshape(batch + (channels * math.prod(self.kernel),) + tuple(out)),)

    def _overlap(self) -> int:
        """Column entries that can read one input cell: at most one window per kernel tap."""
        out = self.top_shapes[0][self.axis + 1:]
        return math.prod(min(k, o) for k, o in zip(self.kernel, out))

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return [torch.zeros_like(exact_tops[0])]  # copies

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # col2im adds each cell's column entries: at most `overlap` terms in any order.
        mag = vjp(self, bottoms, [top_diffs[0].abs()])[0]
        return [gamma(max(self._overlap() - 1, 0)) * mag]

    def work(self) -> int:
        return count(self.top_shapes[0])

    def describe(self) -> str:
        return "k" + "x".join(map(str, self.kernel)) + " s" + "x".join(map(str, self.stride)) + \
            " p" + "x".join(map(str, self.pad))
