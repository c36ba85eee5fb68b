"""ShuffleChannel, a layer of ShuffleNet's Caffe fork (github.com/farmingyard/ShuffleNet),
as a ``porting`` layer plugin (entry point group ``porting.layers``).

The fork adds to caffe.proto's LayerParameter::

    optional ShuffleChannelParameter shuffle_channel_param = 164;
    message ShuffleChannelParameter { optional uint32 group = 1 [default = 1]; }

and its ``shuffle_channel_layer.cpp`` does, per sample of a bottom (N, C, ...): with
``group`` g (CHECK_GT(g, 0)) and C a multiple of g (CHECK_EQ, "Wrong group size."), the
values of input channel ``i * (C / g) + j`` (i < g, j < C / g) are copied to output channel
``j * g + i`` (``Resize_cpu``: the channel axis seen as a g x (C / g) matrix, transposed);
the positions inside a channel do not move. The backward copies each top diff back to
where its value came from (the inverse permutation), overwriting the bottom diff. The top
is shaped (num, channels, height, width) with Caffe's legacy accessors: a bottom of 2 or 3
axes gets trailing dims of 1; Caffe aborts on fewer than 2 or more than 4 axes. A copy in
place would read channels it has already overwritten, so in-place use is refused.
"""
from __future__ import annotations

import torch

from porting.layers import CaffeLayer, ForkParam, caffe_int, register


@register("ShuffleChannel")
class ShuffleChannel(CaffeLayer):
    """Channel shuffle by ``shuffle_channel_param.group``; forward and backward are copies."""

    fork_param = ForkParam("shuffle_channel_param", 164, "ShuffleChannelParameter", {"group": (1, "uint32", 1)})
    verified_by = ("examples/porting-layer-shufflechannel/tests/test_shufflechannel.py",)

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        if len(spec.tops) != 1:
            raise ValueError(f"ShuffleChannel takes 1 top blob, got {len(spec.tops)}")
        if spec.tops[0] == spec.bottoms[0]:
            raise ValueError("ShuffleChannel cannot run in place (its copy would overwrite its own input)")
        shape = self.bottom_shapes[0]
        if not 2 <= len(shape) <= 4:
            raise ValueError(f"ShuffleChannel needs a bottom of 2 to 4 axes, got {len(shape)}")
        self.group = caffe_int(self.fork_params().group, "shuffle_channel_param.group")
        if self.group <= 0:
            raise ValueError(f"shuffle_channel_param.group must be greater than 0, got {self.group}")
        if shape[1] % self.group:
            raise ValueError(f"ShuffleChannel: {shape[1]} channels are not a multiple of group {self.group}")
        self.top_shapes = [shape + (1,) * (4 - len(shape))]

    def forward(self, x):
        n, c = x.shape[0], x.shape[1]
        shuffled = x.reshape(n, self.group, c // self.group, -1).transpose(1, 2)
        return (shuffled.reshape(tuple(x.shape) + (1,) * (4 - x.dim())),)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return [torch.zeros_like(y) for y in exact_tops]  # a copy: nothing is rounded

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return [torch.zeros_like(b) for b in bottoms]  # the diffs copied back

    def describe(self) -> str:
        return f"group {self.group}"
