"""The layer registry: one class per Caffe layer type, nothing else to edit to add one.

A layer class is an ``nn.Module`` registered with ``@register("Convolution", v1="CONVOLUTION")``.
It is built from its ``LayerSpec`` and the shapes of its bottoms, knows the shapes of its
parameter blobs and of its tops, and maps bottom tensors (NCHW, float) to top tensors
with Caffe 1.0's semantics. Its parameter blobs are registered in Caffe's order under the
names "0", "1", ... so a state_dict key reads ``<layer name>.<blob index>`` and
``net.params[name][i]`` is pycaffe's ``net.params[name][i].data``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

LAYERS: dict[str, type["CaffeLayer"]] = {}
V1_TYPES: dict[str, str] = {}  # V1LayerParameter.LayerType name -> V2 type string

# Types that are refused by name, whatever the registry holds (never executed).
REFUSED = {"Python": "Python layers run arbitrary code and are never executed"}


def register(type_name: str, v1: str | None = None):
    """Class decorator: register a layer under its V2 type name (and its V1 enum name)."""

    def wrap(cls):
        cls.type_name = type_name
        LAYERS[type_name] = cls
        if v1:
            V1_TYPES[v1] = type_name
        return cls

    return wrap


class CaffeLayer(nn.Module):
    """Base class. Subclasses set ``param_shapes`` and ``top_shapes`` in ``__init__``.

    ``spec`` is the graph's LayerSpec (``spec.param`` is the LayerParameter message);
    ``bottom_shapes`` is a list of tuples. ``param_shapes`` lists the expected shape of
    each parameter blob in Caffe order; ``top_shapes`` the shape of each top.
    """

    type_name = ""
    # Blobs that are statistics, not trainable weights (BatchNorm's): no gradient.
    frozen_blobs = False

    def __init__(self, spec, bottom_shapes: list[tuple[int, ...]]):
        super().__init__()
        self.spec = spec
        self.bottom_shapes = [tuple(s) for s in bottom_shapes]
        self.param_shapes: list[tuple[int, ...]] = []
        self.top_shapes: list[tuple[int, ...]] = []

    # -- parameter blobs -------------------------------------------------------
    def init_blobs(self, arrays: list[np.ndarray] | None = None) -> None:
        """Create the parameter blobs: from ``arrays`` (already shape-checked) or zeros."""
        for i, shape in enumerate(self.param_shapes):
            data = torch.zeros(shape) if arrays is None else torch.as_tensor(np.asarray(arrays[i]), dtype=torch.float32).reshape(shape)
            self.register_parameter(str(i), nn.Parameter(data, requires_grad=not self.frozen_blobs))

    @property
    def blobs(self) -> list[nn.Parameter]:
        return [getattr(self, str(i)) for i in range(len(self.param_shapes))]

    def forward(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        """Short text of the parameters that matter (for tables and drift reports)."""
        return ""
