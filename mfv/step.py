"""One gradient-ascent step of MFV: forward to the objective layer, one-hot backward to
the input, mask, normalise by the mean absolute gradient, clip to the valid pixel range.

``FacetNet`` wraps the network: a ``porting`` CaffeNet (``net(x, end=layer)`` returns
a dict of blobs; the objective is the blob named like the layer, read right after that
layer, before any in-place layer after it) or any torch module, whose layer is then a
submodule name read with a forward hook ("" for the module's output). Arrays are
float32, channels first, in the net's preprocessing (``mfv.preprocess``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from mfv.preprocess import CAFFENET, Preprocessing


class FacetNet:
    """A torch module (put in eval mode) plus how its input is prepared."""

    def __init__(self, module: torch.nn.Module, preprocessing: Preprocessing = CAFFENET):
        self.module = module.eval()
        self.preprocessing = preprocessing
        self._is_caffe = getattr(module, "graph", None) is not None

    @classmethod
    def from_caffe(cls, net, mean=(104.0, 117.0, 123.0), blocked_inner_products: bool = True,
                   conv_phases: bool = True) -> "FacetNet":
        """A porting CaffeNet with BGR 0-255 minus ``mean`` input; size from its input blob.
        ``blocked_inner_products`` sets its InnerProducts' input gradient to block sums
        (``porting.layers.inner_product.set_inner_product_path(net, "blocked")``): the input
        gradient as close to float64 as Caffe's (median relative L2 4.4e-7 against Caffe's
        4.9e-7 and 1.2e-6 without; same cost; benchmarks/bench_conv_accuracy.py).
        ``conv_phases`` sets its Convolutions to the "phases" path
        (``porting.layers.convolution.set_conv_path(net, "phases")``): a strided layer's input
        gradient as one stride-1 convolution by output phase, CaffeNet conv1's in about a
        quarter of oneDNN's time at a batch of 10 and half its distance from float64; the
        forward and every stride-1 layer stay torch's. False leaves the net's paths as they
        are. (Caffe's im2col, "im2col", adds little accuracy here and cost 1.5-2x at a batch
        of 10.)"""
        from porting.layers.convolution import set_conv_path
        from porting.layers.inner_product import set_inner_product_path

        if blocked_inner_products:
            set_inner_product_path(net, "blocked")
        if conv_phases:
            set_conv_path(net, "phases")
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
    mean_abs_gradient: float      # float32 mean of |gradient| per grey level (apply_step), the step's normaliser


def objective_of(output: torch.Tensor, unit: int, xy: int = 0) -> torch.Tensor:
    """output[0, unit] for fc layers, output[0, unit, xy, xy] for conv layers (batch of one)."""
    return output[0, unit] if output.dim() == 2 else output[0, unit, xy, xy]


def central_mask(shape: tuple[int, ...], margin: int) -> np.ndarray:
    """1 inside the square [margin, H - margin) x [margin, W - margin), 0 outside (float32)."""
    mask = np.zeros(shape, np.float32)
    mask[..., margin:shape[-2] - margin, margin:shape[-1] - margin] = 1
    return mask


NUMPY_1_11_BUFSIZE = 8192   # numpy 1.11's ufunc buffer (np.getbufsize()), in elements
PAIRWISE_BLOCK = 128        # numpy's PW_BLOCKSIZE: blocks up to this size are summed with 8 accumulators


@lru_cache(maxsize=16)
def _pairwise_plan(n: int) -> tuple[tuple, tuple]:
    """numpy's pairwise summation of n elements as data: (leaves, program).

    leaves: (start, length) of each block summed directly; program: the additions in
    postfix order (a leaf index, or -1 for "add the last two values")."""
    leaves: list[tuple[int, int]] = []
    program: list[int] = []

    def plan(start: int, length: int) -> None:
        if length <= PAIRWISE_BLOCK:
            program.append(len(leaves))
            leaves.append((start, length))
            return
        half = length // 2
        half -= half % 8
        plan(start, half)
        plan(start + half, length - half)
        program.append(-1)

    plan(0, n)
    return tuple(leaves), tuple(program)


def _leaf_sums(rows: np.ndarray, leaves) -> np.ndarray:
    """Each leaf's sum in each row as numpy's loop forms it: (M, n) float32 -> (M, leaves)
    float32, vectorised over rows and over the leaves of equal length."""
    sums = np.empty((rows.shape[0], len(leaves)), np.float32)
    by_length: dict[int, list[int]] = {}
    for k, (_, length) in enumerate(leaves):
        by_length.setdefault(length, []).append(k)
    for length, ks in by_length.items():
        starts = [leaves[k][0] for k in ks]
        block = sliding_window_view(rows, length, axis=1)[:, starts]    # M x leaves x length
        if length < 8:
            res = np.zeros(block.shape[:2], np.float32)
            for j in range(length):
                res = res + block[..., j]
        else:
            whole = length - length % 8
            r = block[..., :8].copy()
            for j in range(8, whole, 8):
                r += block[..., j:j + 8]
            res = (((r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3]))
                   + ((r[..., 4] + r[..., 5]) + (r[..., 6] + r[..., 7])))
            for j in range(whole, length):
                res = res + block[..., j]
        sums[:, ks] = res
    return sums


def pairwise_sums_float32(rows: np.ndarray) -> np.ndarray:
    """numpy's pairwise sum of each row of an (M, n) float32 array, in float32: (M,) float32
    (the algorithm of numpy 1.11 and today's, written out so the chunking around it can be
    chosen). Every addition is a float32 one, done for all rows at once."""
    leaves, program = _pairwise_plan(rows.shape[1])
    sums = _leaf_sums(rows, leaves)
    stack: list[np.ndarray] = []
    for op in program:
        if op >= 0:
            stack.append(sums[:, op])
        else:
            right, left = stack.pop(), stack.pop()
            stack.append(left + right)
    return stack[0]


def means_numpy_1_11(values: np.ndarray) -> np.ndarray:
    """``values[k].mean()`` of each sample of an (N, ...) float32 array exactly as numpy 1.11
    computed it: (N,) float32.

    numpy 1.11 reduced through its 8192-element buffer: the flat (C-order) sample is summed
    chunk by chunk, each chunk pairwise, the chunk sums added in order to a float32 total,
    which is then divided by the count in float64. Today's numpy sums the whole array
    pairwise in one go, so the two means differ in the last bit for about half of MFV's
    gradients (measured on CaffeNet gradients, mean_0 start; the chunked sum equals numpy
    1.11.0's in the legacy stack). Written out here because that bit moves the 2016 step.
    All samples' full chunks are summed in one pass (N x chunks rows), their tail chunks in
    another; an empty sample's mean is NaN.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    n, size = len(values), math.prod(values.shape[1:])
    flat = values.reshape(n, size)
    if size == 0:
        return np.full(n, np.nan, np.float32)
    whole = size // NUMPY_1_11_BUFSIZE
    chunk_sums = []
    if whole:
        full = flat[:, :whole * NUMPY_1_11_BUFSIZE].reshape(n * whole, NUMPY_1_11_BUFSIZE)
        chunk_sums += list(pairwise_sums_float32(full).reshape(n, whole).T)
    if size % NUMPY_1_11_BUFSIZE:
        chunk_sums.append(pairwise_sums_float32(flat[:, whole * NUMPY_1_11_BUFSIZE:]))
    total = np.zeros(n, np.float32)
    for chunk_sum in chunk_sums:            # in order, float32
        total = total + chunk_sum
    return (total.astype(np.float64) / size).astype(np.float32)


def mean_numpy_1_11(values: np.ndarray) -> np.float32:
    """``values.mean()`` of a float32 array exactly as numpy 1.11 computed it (the one-sample
    case of ``means_numpy_1_11``)."""
    return means_numpy_1_11(np.asarray(values)[None])[0]


def mean_abs_gradients(gs: np.ndarray, scale: np.ndarray | None = None, mode: str = "faithful") -> np.ndarray:
    """mean(|k g|) of each of N gradients (N x 3 x H x W float32): ``apply_step``'s normaliser,
    (N,) float32. ``scale`` is k (``Preprocessing.pixel_scale()``, None for 1), so k g is the
    gradient per grey level. "faithful": numpy 1.11's mean (``means_numpy_1_11``), all
    samples at once; "modern": today's ``np.abs(k g).mean()``, sample by sample."""
    if mode not in ("faithful", "modern"):
        raise ValueError(f"mode must be 'faithful' or 'modern', not {mode!r}")
    grey = np.abs(gs * scale if scale is not None else gs)
    if mode == "faithful":
        return means_numpy_1_11(grey)
    return np.array([sample.mean() for sample in grey])


def apply_step(x: np.ndarray, g: np.ndarray, step_size, lo: np.ndarray, hi: np.ndarray,
               mode: str = "faithful", scale: np.ndarray | None = None,
               mean_abs: np.float32 | None = None) -> tuple[np.ndarray, np.float32]:
    """``clip(x + step / mean(|g|) * g, lo, hi)`` on float32 arrays; returns it and mean(|g|).

    Units: ``step_size`` is in grey levels of RGB 0-255 pixels (the 2016 code's net input
    was 0-255 minus a mean, so its step was the mean |change| per pixel in grey levels).
    ``scale`` is the net's ``Preprocessing.pixel_scale()``: k = value_range / 255 / std per
    channel (3 x 1 x 1), net units per grey level; None means k = 1 (CaffeNet) and the
    expression above, bit for bit. With pixels p and net input x = k (p - p0), the
    gradient per grey level is g_p = k g, the 2016 step in pixels is
    dp = step / mean(|g_p|) * g_p, and in net units dx = k dp, so the step taken is
    ``clip(x + step / mean(|k g|) * (k k g), lo, hi)``; the mean returned is mean(|k g|).

    mode "faithful" takes the mean as numpy 1.11 did (``mean_numpy_1_11``) and forms the
    factor as numpy 1.11 did (the Python number divided by the float32 mean in float64,
    then rounded to float32 for the float32 product); "modern" writes the same expression
    under today's numpy (its own mean; Python numbers are weak: float32 division). A zero
    gradient (a dead unit) makes no step, where the 2016 code would have produced NaNs.

    ``mean_abs``, when given, is that mean already taken (``mean_abs_gradients`` of a batch
    holding ``g``, same ``scale`` and ``mode``: ``gradient_steps`` takes all its samples'
    at once); it is used as it is and returned.
    """
    if mode not in ("faithful", "modern"):
        raise ValueError(f"mode must be 'faithful' or 'modern', not {mode!r}")
    if mean_abs is None:
        mean_abs = mean_abs_gradients(g[None], scale, mode)[0]
    direction = g if scale is None else g * scale * scale    # per grey level, back in net units
    if mean_abs == 0:
        stepped = x.copy()
    elif mode == "faithful":
        stepped = x + np.float32(np.float64(step_size) / np.float64(mean_abs)) * direction
    elif mode == "modern":
        stepped = x + step_size / mean_abs * direction
    else:
        raise ValueError(f"mode must be 'faithful' or 'modern', not {mode!r}")
    return np.clip(stepped, lo, hi).astype(np.float32, copy=False), mean_abs


def objectives_of(output: torch.Tensor, units, xy: int = 0) -> torch.Tensor:
    """output[n, units[n]] for fc layers, output[n, units[n], xy, xy] for conv layers (N values)."""
    rows = torch.arange(output.shape[0], device=output.device)
    units = torch.as_tensor(units, device=output.device)
    return output[rows, units] if output.dim() == 2 else output[rows, units, xy, xy]


def _per_sample(value, n: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{what}: one per sample ({n}), got {len(values)}")
    return values


def gradient_steps(net: FacetNet, xs: np.ndarray, layer: str, units, step_sizes, margins=0, xy: int = 0,
                   mode: str = "faithful") -> list[StepResult]:
    """N steps in one forward and one backward: sample n starts from ``xs[n]`` (N x 3 x H x W
    float32) and maximises ``units[n]`` with ``step_sizes[n]`` and ``margins[n]`` (a single
    number serves all samples).

    The objective is sum_n output[n, units[n]]: in eval mode no layer mixes the samples of
    a batch, so each sample's gradient is that of its own objective, computed as a batch of
    one computes it except for the order of the float32 sums inside the net's kernels (a
    batched convolution blocks its GEMMs differently: per-sample gradients then differ
    from a batch of one by rounding; measured on CaffeNet, this CPU: up to 6e-12 on
    gradients of 5e-6, i.e. ~1e-6 relative). Each sample is then masked and stepped by
    ``apply_step`` as ``gradient_step`` does (faithful: numpy 1.11's mean per sample, all
    samples' taken in one call of ``mean_abs_gradients``). The
    forward and backward run on ``net.device``; the step itself in NumPy on the CPU.
    """
    xs = np.asarray(xs)
    if xs.ndim != 4 or xs.shape[1] != 3:
        raise ValueError(f"xs must be N x 3 x H x W, got shape {xs.shape}")
    n = len(xs)
    units = [int(u) for u in _per_sample(units, n, "units")]
    step_sizes = _per_sample(step_sizes, n, "step_sizes")
    margins = _per_sample(margins, n, "margins")
    xt = torch.from_numpy(np.array(xs, dtype=np.float32)).to(net.device).requires_grad_(True)
    with torch.enable_grad():
        output = net.layer_output(xt, layer)
        objectives = objectives_of(output, units, xy)
        (grad,) = torch.autograd.grad(objectives.sum(), xt)
    acts = output.detach().cpu()
    if acts.dim() == 4:
        acts = acts[:, :, xy, xy]
    acts = acts.reshape(n, -1)
    best_units = torch.argmax(acts, dim=1).tolist()
    grads = grad.cpu().numpy()
    values = objectives.detach().cpu().tolist()
    lo, hi = net.preprocessing.bounds()
    scale = net.preprocessing.pixel_scale()
    gs = np.stack([grads[k] * central_mask(grads[k].shape, margins[k]) if margins[k] != 0 else grads[k]
                   for k in range(n)])
    means = mean_abs_gradients(gs, scale, mode)
    results = []
    for k in range(n):
        g = gs[k]
        stepped, mean_abs = apply_step(xs[k], g, step_sizes[k], lo, hi, mode, scale, means[k])
        results.append(StepResult(stepped, g, values[k], best_units[k], float(acts[k, best_units[k]]),
                                  float(mean_abs)))
    return results


def gradient_step(net: FacetNet, x: np.ndarray, layer: str, unit: int, step_size, margin: int = 0,
                  xy: int = 0, mode: str = "faithful") -> StepResult:
    """One step from ``x`` (3 x H x W float32): the objective's gradient g, masked to the
    central square when ``margin`` > 0, then ``apply_step`` (normalise, step, clip). A batch
    of one of ``gradient_steps``."""
    return gradient_steps(net, np.asarray(x)[None], layer, [unit], [step_size], [margin], xy, mode)[0]
