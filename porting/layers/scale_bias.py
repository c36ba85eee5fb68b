"""Scale and Bias (Caffe 1.0 scale_layer.cpp, bias_layer.cpp): broadcast multiply / add.

The factor (or bias) covers bottom 0's axes [axis, axis + its own number of axes) and is
broadcast over the others. It is a learned blob of shape bottom.shape[axis:axis+num_axes]
(num_axes -1: to the end; 0: a scalar) with one bottom, or the second bottom itself.
Scale with ``bias_term`` adds a bias blob of the factor's shape (the blob after the factor
with one bottom; the only blob with two). Backward is the exact derivative (autograd),
as in Caffe, including the gradient into a second bottom.
"""
from __future__ import annotations

import torch

from porting.layers import CaffeLayer, PortBug, canonical_axis, register
from porting.rounding import ETA, U, gamma, magnitude, magnitude_vjp


def operand_shape(shape, axis: int, num_axes: int) -> tuple[int, ...]:
    """The learned operand's shape: shape[axis : axis + num_axes] (num_axes -1: to the end)."""
    start = canonical_axis(axis, len(shape)) if len(shape) else 0
    if num_axes < -1:
        raise ValueError(f"num_axes must be non-negative, or -1 to extend to the end, got {num_axes}")
    if num_axes >= 0 and len(shape) < start + num_axes:
        raise ValueError(f"bottom {tuple(shape)} has too few axes for axis {axis} + num_axes {num_axes}")
    return tuple(shape[start:] if num_axes == -1 else shape[start:start + num_axes])


def broadcast_axis(shape, operand, axis: int) -> int:
    """Caffe's axis_ in Reshape: 0 for a scalar operand, else canonical, with a shape check."""
    if len(operand) == 0:
        return 0
    start = canonical_axis(axis, len(shape))
    if tuple(shape[start:start + len(operand)]) != tuple(operand):
        raise ValueError(f"operand shape {tuple(operand)} does not match bottom {tuple(shape)} "
                         f"from axis {start}")
    return start


def broadcast(operand: torch.Tensor, start: int, dims: int) -> torch.Tensor:
    """View the operand so it broadcasts against a ``dims``-axis bottom from axis ``start``."""
    return operand.reshape((1,) * start + tuple(operand.shape) + (1,) * (dims - start - operand.dim()))


class _BroadcastLayer(CaffeLayer):
    """Shared shape logic: one bottom with a learned operand, or two bottoms."""

    def _setup(self, axis: int, num_axes: int) -> tuple[int, ...]:
        self.expect_bottoms(1, 2)
        shape = self.bottom_shapes[0]
        self.axis = axis
        operand = self.bottom_shapes[1] if len(self.bottom_shapes) == 2 else operand_shape(shape, axis, num_axes)
        self.start = broadcast_axis(shape, operand, axis)
        self.top_shapes = [shape]
        return operand


@register("Scale")
class Scale(_BroadcastLayer):
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_eltwise_norm.py", "tests/test_trained.py")
    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        sp = spec.param.scale_param
        operand = self._setup(int(sp.axis), int(sp.num_axes))
        self.bias_term = bool(sp.bias_term)
        self.two_bottoms = len(self.bottom_shapes) == 2
        self.param_shapes = ([] if self.two_bottoms else [operand]) + ([operand] if self.bias_term else [])

    def forward(self, x, *factor):
        scale = factor[0] if self.two_bottoms else self.blobs[0]
        y = x * broadcast(scale, self.start, x.dim())
        if self.bias_term:
            y = y + broadcast(self.blobs[-1], self.start, x.dim())
        return (y,)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # y = x * s (+ b): one product, one sum, bounded with |s| and |b| (s a blob or bottom 1).
        return [gamma(2) * magnitude(self, bottoms, abs_module)[0] + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # dx = g * s: one product. A second bottom s gets sum of g * x over the n elements
        # it is broadcast to (Caffe: products, then gemv/dot in any order): gamma(n + 1).
        mags = magnitude_vjp(self, bottoms, top_diffs, abs_module)
        bounds = [U * mags[0] + ETA]
        if self.two_bottoms:
            n = bottoms[0].numel() // max(bottoms[1].numel(), 1)
            bounds.append(gamma(n + 1) * mags[1] + n * ETA)
        return bounds

    def port_bugs(self, bottoms, top_shape):
        """scale-bias: the bias dropped (a multiplication only)."""
        if self.bias_term:
            blobs = [b.detach().double().numpy() for b in self.blobs]
            yield PortBug("scale-bias", "without the Scale layer's bias (a multiplication only)",
                          self.variant(bottoms, lambda p: setattr(p.scale_param, "bias_term", False), blobs[:-1]),
                          bottoms, why="the prototxt's scale_param has bias_term: true")

    def describe(self) -> str:
        return f"axis {self.start}" + (" bottom" if self.two_bottoms else "") + (" +bias" if self.bias_term else "")


@register("Bias")
class Bias(_BroadcastLayer):
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_eltwise_norm.py")
    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        bp = spec.param.bias_param
        operand = self._setup(int(bp.axis), int(bp.num_axes))
        self.two_bottoms = len(self.bottom_shapes) == 2
        self.param_shapes = [] if self.two_bottoms else [operand]

    def forward(self, x, *bias):
        b = bias[0] if self.two_bottoms else self.blobs[0]
        return (x + broadcast(b, self.start, x.dim()),)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        return [U * exact_tops[0].abs()]  # one sum

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # dx = g; a second bottom b gets the sum of g over the n elements it is broadcast to.
        bounds = [torch.zeros_like(bottoms[0])]
        if self.two_bottoms:
            n = bottoms[0].numel() // max(bottoms[1].numel(), 1)
            bounds.append(gamma(n - 1) * magnitude_vjp(self, bottoms, top_diffs, abs_module)[1])
        return bounds

    def describe(self) -> str:
        return f"axis {self.start}" + (" bottom" if self.two_bottoms else "")
