"""One gradient-ascent step of MFV: forward to the objective layer, one-hot backward to
the input, mask, normalise by the mean absolute gradient, clip to the valid pixel range.

``FacetNet`` wraps the network: a ``porting`` CaffeNet (``net(x, end=layer)`` returns
a dict of blobs; the objective is the blob named like the layer, read right after that
layer, before any in-place layer after it) or any torch module, whose layer is then a
submodule name read with a forward hook ("" for the module's output). Arrays are
float32, channels first, in the net's preprocessing (``mfv.preprocess``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mfv.preprocess import CAFFENET, Preprocessing


class FacetNet:
    """A torch module (put in eval mode) plus how its input is prepared."""

    def __init__(self, module: torch.nn.Module, preprocessing: Preprocessing = CAFFENET):
        self.module = module.eval()
        self.preprocessing = preprocessing
        self._is_caffe = getattr(module, "graph", None) is not None

    @classmethod
    def from_caffe(cls, net, mean=(104.0, 117.0, 123.0)) -> "FacetNet":
        """A porting CaffeNet with BGR 0-255 minus ``mean`` input; size from its input blob."""
        shape = next(iter(net.inputs.values()))
        return cls(net, Preprocessing("BGR", tuple(float(m) for m in mean), input_size=tuple(shape[-2:])))

    @property
    def device(self) -> torch.device:
        """Where the module's parameters live (inputs are moved there, results back to the CPU)."""
        first = next(self.module.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def layer_names(self) -> list[str]:
        if self._is_caffe:
            return [spec.name for spec in self.module.graph.layers]
        return [name for name, _ in self.module.named_modules()]

    def blob_output(self, x: torch.Tensor, blob: str) -> torch.Tensor:
        """Blob ``blob`` after a full forward (pycaffe's ``net.blobs[blob]`` after
        ``net.forward()``: in-place layers after it, e.g. fc7's ReLU, have run).
        For a plain torch module, the same as ``layer_output``."""
        if self._is_caffe:
            blobs = self.module(x)
            if blob not in blobs:
                raise KeyError(f"no blob named {blob!r}")
            return blobs[blob]
        return self.layer_output(x, blob)

    def layer_output(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """The objective layer's output for input batch ``x`` (N x 3 x H x W)."""
        if self._is_caffe:
            blobs = self.module(x, end=layer)
            return blobs[layer] if layer in blobs else self.module.layer_outputs[layer][0]
        if layer == "":
            return self.module(x)
        target = dict(self.module.named_modules()).get(layer)
        if target is None:
            raise KeyError(f"no submodule named {layer!r}")
        captured = []
        handle = target.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.module(x)
        finally:
            handle.remove()
        return captured[0]


@dataclass
class StepResult:
    x: np.ndarray                 # the input after the step and the clip (3 x H x W, float32)
    gradient: np.ndarray          # the masked gradient of the objective (3 x H x W, float32)
    objective: float              # the objective unit's value before the step
    best_unit: int                # the layer's largest unit (at xy for conv layers)
    best_value: float
    mean_abs_gradient: float      # float32 mean of |gradient|, the step's normaliser


def objective_of(output: torch.Tensor, unit: int, xy: int = 0) -> torch.Tensor:
    """output[0, unit] for fc layers, output[0, unit, xy, xy] for conv layers (batch of one)."""
    return output[0, unit] if output.dim() == 2 else output[0, unit, xy, xy]


def central_mask(shape: tuple[int, ...], margin: int) -> np.ndarray:
    """1 inside the square [margin, H - margin) x [margin, W - margin), 0 outside (float32)."""
    mask = np.zeros(shape, np.float32)
    mask[..., margin:shape[-2] - margin, margin:shape[-1] - margin] = 1
    return mask


def apply_step(x: np.ndarray, g: np.ndarray, step_size, lo: np.ndarray, hi: np.ndarray,
               mode: str = "faithful") -> tuple[np.ndarray, np.float32]:
    """``clip(x + step / mean(|g|) * g, lo, hi)`` on float32 arrays; returns it and mean(|g|).

    mode "faithful" forms the factor as numpy 1.11 did (the Python number divided by the
    float32 mean in float64, then rounded to float32 for the float32 product); "modern"
    writes the same expression under today's numpy (Python numbers are weak: float32
    division). A zero gradient (a dead unit) makes no step, where the 2016 code would
    have produced NaNs.
    """
    mean_abs = np.abs(g).mean()
    if mean_abs == 0:
        stepped = x.copy()
    elif mode == "faithful":
        stepped = x + np.float32(np.float64(step_size) / np.float64(mean_abs)) * g
    elif mode == "modern":
        stepped = x + step_size / mean_abs * g
    else:
        raise ValueError(f"mode must be 'faithful' or 'modern', not {mode!r}")
    return np.clip(stepped, lo, hi).astype(np.float32, copy=False), mean_abs


def gradient_step(net: FacetNet, x: np.ndarray, layer: str, unit: int, step_size, margin: int = 0,
                  xy: int = 0, mode: str = "faithful") -> StepResult:
    """One step from ``x`` (3 x H x W float32): the objective's gradient g, masked to the
    central square when ``margin`` > 0, then ``apply_step`` (normalise, step, clip)."""
    xt = torch.from_numpy(np.array(x[None], dtype=np.float32)).to(net.device).requires_grad_(True)
    with torch.enable_grad():
        output = net.layer_output(xt, layer)
        objective = objective_of(output, unit, xy)
        (grad,) = torch.autograd.grad(objective, xt)
    acts = output.detach()[0].cpu()
    if acts.dim() == 3:
        acts = acts[:, xy, xy]
    acts = acts.reshape(-1)
    best_unit = int(torch.argmax(acts))
    g = grad[0].cpu().numpy()
    if margin != 0:
        g = g * central_mask(g.shape, margin)
    lo, hi = net.preprocessing.bounds()
    stepped, mean_abs = apply_step(x, g, step_size, lo, hi, mode)
    return StepResult(stepped, g, float(objective.detach().cpu()), best_unit, float(acts[best_unit]), float(mean_abs))
