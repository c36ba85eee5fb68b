"""Input: declares the shapes of the net's input blobs (Caffe 1.0 input_layer.cpp), and
``FedLayer``, the base of every layer whose tops the caller feeds (Input and the data
layers of ``porting.layers.data_layers``)."""
from __future__ import annotations

import torch

from porting.layers import CaffeLayer, caffe_int, register


class FedLayer(CaffeLayer):
    """A layer with no bottoms whose tops the net is given: forward returns them as they
    are, so they carry no rounding of the port's own and have no bottoms to send diffs to."""

    is_input = True

    def forward(self, *tops):
        return tuple(tops)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return [torch.zeros_like(y) for y in exact_tops]  # the caller's arrays, as given

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return []  # no bottoms


@register("Input")
class Input(FedLayer):
    """``input_param { shape {...} }`` once for all tops or once per top; no bottoms.

    The net feeds the tops itself; ``forward(*tops)`` returns what it is given.
    """
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_shape.py", "tests/test_property_caffe.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(0)
        shapes = [tuple(caffe_int(d, "Input dim") for d in s.dim) for s in spec.param.input_param.shape]
        n_tops = len(spec.param.top)
        if not shapes:
            raise ValueError("Input layer needs input_param { shape { dim: ... } }")
        if len(shapes) not in (1, n_tops):
            raise ValueError(f"Input layer gives {len(shapes)} shapes for {n_tops} tops; "
                             "give one shape, or one per top")
        if any(d < 0 for s in shapes for d in s):
            raise ValueError(f"Input shape has a negative dim: {shapes}")
        self.top_shapes = shapes * n_tops if len(shapes) == 1 else shapes

    def describe(self) -> str:
        return " ".join("x".join(map(str, s)) for s in self.top_shapes)
