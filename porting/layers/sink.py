"""HDF5Output (Caffe 1.0 hdf5_output_layer.cpp): a sink that Caffe has write its two
bottoms (data, label) to the HDF5 file ``hdf5_output_param.file_name``.

The port accepts the layer and writes nothing: the file is never opened, created or named
outside the prototxt (a model file must not make the port write where it says). It has no
tops and, as in Caffe (whose backward does nothing), sends no gradient to its bottoms.
Caffe's own checks are kept: exactly two bottoms, no tops, and both bottoms read as
(num, channels, height, width) with the same num (at most 4 axes, Caffe's legacy shape).
"""
from __future__ import annotations

from porting.layers import CaffeLayer, register


@register("HDF5Output", v1="HDF5_OUTPUT")
class HDF5Output(CaffeLayer):
    verified_by = ("tests/test_layers_vision.py", "tests/test_bounds.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(2)
        if len(spec.param.top):
            raise ValueError("HDF5Output has no tops")
        if any(len(s) > 4 for s in self.bottom_shapes):
            raise ValueError(f"HDF5Output reads its bottoms as (num, channels, height, width), at most 4 axes, "
                             f"got {self.bottom_shapes}")
        nums = [s[0] if s else 1 for s in self.bottom_shapes]
        if nums[0] != nums[1]:
            raise ValueError(f"HDF5Output's data and label must have the same num, got {nums[0]} and {nums[1]}")

    def forward(self, *bottoms):
        return ()

    def work(self) -> int:
        return 0

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return []

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        return [None, None]

    def describe(self) -> str:
        return "writes nothing"
