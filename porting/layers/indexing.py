"""Layers that pick items of the first axis by values in another bottom (Caffe 1.0):
BatchReindex and Filter.

The index values arrive in a float bottom and are read at run time. Neither layer sends a
gradient to its index bottom (Caffe CHECK-fails or LOG(FATAL)s if asked to).
"""
from __future__ import annotations

import torch

from porting.errors import PortingError
from porting.layers import register
from porting.layers.data_movement import _Moving
from porting.rounding import gamma


@register("BatchReindex")
class BatchReindex(_Moving):
    """top[i] = data[int(permut[i])] (batch_reindex_layer.cpp): bottoms data (N, ...) and a
    1-axis index blob (M,); top (M, ...). An index may repeat or be left out; the backward
    adds the top diffs of every i that read an item (Caffe in order of i; zeros elsewhere).

    Caffe CHECKs 0 <= permut[i] < N on the float value, then truncates it to int; a value
    outside (or NaN) is a run-time PortingError here.
    """
    verified_by = ("tests/test_layers_vision.py", "tests/test_bounds.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(2)
        data, index = self.bottom_shapes
        if len(index) != 1:
            raise ValueError(f"BatchReindex's index bottom must have 1 axis, got shape {index}")
        if len(data) < 1:
            raise ValueError("BatchReindex's data bottom needs a first axis to index")
        self.top_shapes = [(index[0],) + data[1:]]

    def forward(self, x, permut):
        permut = permut.detach()  # never differentiated (and float() of a grad tensor warns)
        bad = ~((permut >= 0) & (permut < x.shape[0]))
        if bool(bad.any()):
            value = float(permut[bad][0])
            raise PortingError(f"BatchReindex index {value:g} is outside the data's first axis "
                               f"[0, {x.shape[0]}) (Caffe aborts: Check failed)", place=f"layer {self.name}")
        return (x.index_select(0, permut.to(torch.int64)),)

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Each data item's diff is the sum of the diffs of every i that read it.
        x, permut = bottoms
        g = top_diffs[0].abs()
        mag = torch.zeros_like(x).index_add_(0, permut.to(torch.int64), g)
        uses = torch.bincount(permut.to(torch.int64), minlength=x.shape[0])
        return [gamma(max(int(uses.max()) - 1, 0)) * mag, None]

    def describe(self) -> str:
        return f"{self.top_shapes[0][0]} items"


@register("Filter")
class Filter(_Moving):
    """Items whose selector is nonzero (filter_layer.cpp): bottoms data_1..data_k and a
    selector (N, 1, ..., 1) last; tops k, top t holding the selected items of data_t in
    order. The backward copies each top's diff to the items it came from, zeros to the
    others; the selector gets none.

    Shape: Caffe's first Reshape (at net setup) declares every item selected, whatever the
    selector holds, so the declared top shape (and what ``porting.budget`` counts) is the
    data's own shape, the most the layer can give. At run time the first dim is the
    number of nonzero selector values (NaN counts as nonzero, as in C++), as Caffe's
    Reshape in each Forward makes it; layers below see that size. No item selected gives
    an empty top (Caffe keeps the blob's memory and gives 0 items too); what later layers
    do with an empty blob is not checked against Caffe.
    """
    verified_by = ("tests/test_layers_vision.py", "tests/test_bounds.py")
    # The tops' first dim is decided at run time (<= the declared one); so are the shapes of
    # every blob computed from them.
    first_dim_at_run_time = True

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(2, -1)
        *data, selector = self.bottom_shapes
        if len(spec.param.top) != len(data):
            raise ValueError(f"Filter needs one top per filtered bottom: {len(data)} bottom(s) before the "
                             f"selector, {len(spec.param.top)} top(s)")
        if len(selector) < 1 or any(d != 1 for d in selector[1:]):
            raise ValueError(f"Filter's selector (last bottom) must be (N, 1, ..., 1), got {selector}")
        for shape in data:
            if len(shape) < 1 or shape[0] != selector[0]:
                raise ValueError(f"every Filter bottom must have the selector's first dim {selector[0]}, "
                                 f"got {shape}")
        self.top_shapes = list(data)

    def forward(self, *bottoms):
        *data, selector = bottoms
        chosen = torch.nonzero(selector.detach().reshape(-1) != 0).reshape(-1)
        return tuple(x.index_select(0, chosen) for x in data)

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return [torch.zeros_like(b) for b in bottoms[:-1]] + [None]

    def describe(self) -> str:
        return f"{len(self.top_shapes)} blob(s)"
