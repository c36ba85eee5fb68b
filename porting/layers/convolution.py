"""Convolution and Deconvolution (Caffe 1.0 base_conv_layer.cpp, conv_layer.cpp, deconv_layer.cpp).

Caffe's im2col + GEMM convolution is the cross-correlation that ``torch.nn.functional.conv*d``
computes, with the same weight layout, symmetric zero padding, dilation, groups and floor
output size; Deconvolution is Caffe's convolution backward-data, i.e. ``conv_transpose*d``
with output_padding 0. Both are verified against float64 NumPy loops in
tests/test_layers_conv.py. ``set_conv_path`` chooses how they multiply: torch's kernels,
Caffe's im2col + GEMM, or ("phases") a strided Convolution's input gradient as one stride-1
convolution by output phase (tests/test_conv_phases.py). Bottoms are (N..., C, spatial...)
with the channel axis at ``convolution_param.axis`` (default 1); axes before it are batch
axes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from porting.layers import CaffeLayer, PortBug, caffe_int, canonical_axis, count, int_arithmetic, register
from porting.rounding import ETA, gamma, magnitude, magnitude_vjp

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
CONV_PATHS = ("torch", "im2col", "phases")


def conv_geometry(cp, num_spatial: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Kernel, stride, pad, dilation per spatial axis, with Caffe's rules for _h/_w and repeats."""

    def per_axis(name: str, values, default: int | None) -> list[int]:
        n = len(values)
        if n == 0 and default is not None:
            return [default] * num_spatial
        if n not in (1, num_spatial):
            raise ValueError(f"{name} must be given once, or once per spatial axis "
                             f"(given {n} times for {num_spatial} spatial axes)")
        return [caffe_int(values[0 if n == 1 else i], name) for i in range(num_spatial)]

    def with_hw(name: str, default: int | None) -> list[int]:
        has_h, has_w = cp.HasField(f"{name}_h"), cp.HasField(f"{name}_w")
        repeated = getattr(cp, "kernel_size" if name == "kernel" else name)
        if has_h or has_w:
            if num_spatial != 2:
                raise ValueError(f"{name}_h and {name}_w can only be used for 2-D convolution")
            if len(repeated):
                raise ValueError(f"give either {name if name != 'kernel' else 'kernel_size'} "
                                 f"or {name}_h/{name}_w, not both")
            return [caffe_int(getattr(cp, f"{name}_{a}"), f"{name}_{a}") for a in "hw"]
        return per_axis("kernel_size" if name == "kernel" else name, repeated, default)

    kernel = with_hw("kernel", None)
    stride = with_hw("stride", 1)
    pad = with_hw("pad", 0)
    dilation = per_axis("dilation", cp.dilation, 1)
    if any(k <= 0 for k in kernel):
        raise ValueError(f"kernel dimensions must be nonzero, got {kernel}")
    if any(s <= 0 for s in stride):
        raise ValueError(f"stride dimensions must be nonzero, got {stride}")
    if any(d <= 0 for d in dilation):
        raise ValueError(f"dilation must be nonzero, got {dilation}")
    return kernel, stride, pad, dilation


def conv_out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Caffe's convolution (and Im2col) output size along one axis:
    (size + 2 pad - (dilation (kernel - 1) + 1)) / stride + 1 in C++ int arithmetic."""
    extent = int_arithmetic(dilation * (kernel - 1) + 1, "dilated kernel extent")
    span = int_arithmetic(size + 2 * pad, "input plus padding") - extent
    # C++ division truncates toward zero: a window wider than the padded input by less
    # than the stride still gives one output (its cells past the input are zeros).
    return int(span / stride) + 1 if span < 0 else span // stride + 1


def set_conv_path(module, path: str):
    """Choose how every Convolution and Deconvolution in ``module`` (a CaffeNet, one layer, any
    ``nn.Module`` holding them) multiplies; returns ``module``. Paths (``CONV_PATHS``):

    * "torch" (the default): ``F.conv*d`` / ``F.conv_transpose*d``, whatever kernel torch
      picks.
    * "im2col": Caffe's own algorithm, written with torch ops: Convolution is im2col
      (``F.unfold``) and one matrix product per image and group, W_g (O/g x C/g K) times the
      columns (C/g K x output pixels), then the bias; its backward to the input is autograd's:
      the columns' gradient W_g^T dy (a matrix product), added back into the image by col2im
      (``F.fold``). Deconvolution is the reverse (W_g^T x, then col2im; backward: im2col of
      the top's gradient times W_g). 1-D and 2-D; a 3-D layer keeps the "torch" path. The
      columns of every image of the batch are held at once, and autograd keeps them for the
      weights' gradient (CaffeNet: 18 MB per image).
    * "phases": a 2-D Convolution with a stride > 1 (dilation 1) computes its forward as
      "torch" (``F.conv2d``) and its input gradient by output phase (``phase_input_grad``):
      one stride-1 ``F.conv2d`` of the top's gradient with the kernel's taps regrouped per
      phase, interleaved into the image, instead of torch's strided backward-data. The
      weights' and bias's gradients come from torch's own convolution node (of the input
      detached), bit for bit the "torch" path's, and only when a backward asks for them
      (MFV's gradient to the input alone skips them, as on "torch"). No double backward
      (create_graph raises: use "torch"). Every other layer (stride 1, dilated, 1-D, 3-D,
      Deconvolution) keeps the "torch" path, and so does a forward without autograd. The
      custom autograd Function is for eager runs: to export (TorchScript, ONNX) use "torch".

    All compute the same sums of the same products (a top: C/g K products and the bias; a
    bottom gradient: at most O/g K products), only in another order, so each layer's
    ``forward_bound`` and ``backward_bound`` (any order) hold for all. "phases" adds products
    of 0 (a tap past the kernel padded to ceil(k/s) s, or a row of zeros around the top's
    gradient): each is exactly +-0 for finite operands, and adding +-0 is exact, so the
    bound for the real terms holds; at most the sign of a zero result differs (-0 == +0).
    With an inf or NaN among the weights or the top's gradient, 0 * inf = NaN can reach
    input pixels whose real products are finite or inf (Caffe never forms those products).
    What differs is how far from the exact sums they typically land, and the time
    (benchmarks/bench_conv_accuracy.py, CaffeNet on CPU: "im2col" is Caffe's accuracy layer
    by layer, conv1's input gradient half the "torch" path's distance from float64, the others
    alike; forward and backward 1.17x "torch"'s time at batch 1, 1.5-2x at batch 10). "phases"
    (conv1 is CaffeNet's only strided convolution; a shared 2-core machine at load 1-2, 2 torch
    threads, medians of 9, two runs): conv1's input gradient alone 0.31-0.35x "torch"'s time
    at batch 1 and 0.26-0.28x at batch 10 (torch 0.058 s, "im2col" 0.92-1.06x); the whole
    forward and backward to the input at batch 10 0.89x (torch 0.27 s), with the blocked
    inner products 0.73-0.75x (blocked alone 0.86-0.87x), at batch 1 (one run) 0.91x and
    0.75x. One thread: conv1 0.29-0.35x at batch 1, 0.24-0.27x at batch 10 (torch 0.109 s).
    Its conv1 gradient is 2.1e-7 from float64 (relative L2; "torch" 4.9e-7, "im2col"
    1.9e-7), on Caffe's own top diff 9.3e-8 (Caffe 9.4e-8).
    """
    if path not in CONV_PATHS:
        raise ValueError(f"convolution path must be one of {', '.join(CONV_PATHS)}, not {path!r}")
    for layer in module.modules():
        if isinstance(layer, _ConvBase):
            layer.path = path
    return module


def phase_input_grad(dy, weight, size, stride, pad, group):
    """The input gradient of a 2-D convolution (dilation 1) as ONE stride-1 convolution of
    ``dy``, by output phase. ``dy`` (N, O, OH, OW), ``weight`` (O, C/g, kh, kw), ``size`` the
    input's (H, W), ``stride`` and ``pad`` per axis; returns (N, C, H, W).

    Along one axis (stride s, pad p, kernel k; h' = h + p the row in the padded input), tap
    t' of output row i reaches h' = s i + t'. So the rows of phase a = h' mod s, h' = s m + a,
    receive only the taps t' = a + s t: dx_pad[s m + a] = sum_t W[a + s t] dy[m - t] over
    t = 0..T-1, T = ceil(k / s), taps past the kernel weighing 0, dy 0 outside its rows: a
    stride-1 correlation of dy padded by T - 1 rows with the sub-kernel flipped. Phases
    a >= k receive nothing (a kernel smaller than the stride), so only A = min(k, s) phases
    are computed, rows m = 0..M-1, M = ceil((p + H) / s) (rows of zeros appended to dy where
    M is more than its OH + T - 1; rows from M on, which reach only the padding past the
    input, dropped). The A_h A_w phases of every group are the output channels (group, a, b,
    c) of ONE grouped conv2d (its weight regrouped from the kernel by ``_phase_weight``),
    interleaved into the padded image (row s m + a; rows of phases >= k stay 0), then the
    padding is cropped. Each element sums the products W dy of Caffe's col2im(W^T dy), plus
    products with a padded weight or a padded dy of 0 (see set_conv_path). Autograd-able ops only (differentiable
    in ``dy`` and ``weight``)."""
    n, o = dy.shape[:2]
    c = weight.shape[1] * group
    taps, phases = _phase_geometry(weight.shape[2:], stride)
    rows = [-(-(size[i] + pad[i]) // stride[i]) for i in range(2)]  # M per axis
    w = _phase_weight(weight, stride, group)
    # dy padded by T - 1 on both sides gives rows 0..OH + T - 2; rows from M on reach past the input
    extra = [max(0, rows[i] - (dy.shape[2 + i] + taps[i] - 1)) for i in range(2)]
    if any(extra):
        dy = F.pad(dy, (0, extra[1], 0, extra[0]))
    out = F.conv2d(dy, w, padding=[t - 1 for t in taps], groups=group)[:, :, :rows[0], :rows[1]]
    out = out.reshape(n, group, phases[0], phases[1], c // group, rows[0], rows[1]).permute(0, 1, 4, 5, 2, 6, 3)
    if phases != list(stride):  # kernel smaller than the stride: the other phases get 0
        full = out.new_zeros(n, group, c // group, rows[0], stride[0], rows[1], stride[1])
        full[:, :, :, :, :phases[0], :, :phases[1]] = out
        out = full
    out = out.reshape(n, c, rows[0] * stride[0], rows[1] * stride[1])
    return out[:, :, pad[0]:pad[0] + size[0], pad[1]:pad[1] + size[1]]


def _phase_geometry(kernel, stride) -> tuple[list[int], list[int]]:
    """(T, A) per axis for ``phase_input_grad``: T = ceil(k / s) taps a phase, A = min(k, s)
    phases that receive any."""
    return [-(-k // st) for k, st in zip(kernel, stride)], [min(k, st) for k, st in zip(kernel, stride)]


def _phase_weight(weight, stride, group):
    """``phase_input_grad``'s conv2d weight (g A_h A_w C/g, O/g, T_h, T_w) from the kernel
    (O, C/g, kh, kw): output channel (group, a, b, c), input channel o of the group, entry
    (t, u) the tap (a + s_h (T_h - 1 - t), b + s_w (T_w - 1 - u)), 0 past the kernel. The
    kernel padded with zeros to A T along each axis (at most 2k - 1 < 2k where s <= k; k
    itself where s > k, A = k and T = 1), so the taps a + s t are its rows t A + a: a
    reshape, a flip of t and a permute. No larger than 4 times the kernel."""
    o, cg, kh, kw = weight.shape
    taps, phases = _phase_geometry((kh, kw), stride)
    w = F.pad(weight, (0, phases[1] * taps[1] - kw, 0, phases[0] * taps[0] - kh))
    w = w.reshape(group, o // group, cg, taps[0], phases[0], taps[1], phases[1]).flip(3, 5)
    return w.permute(0, 4, 6, 2, 1, 3, 5).reshape(group * phases[0] * phases[1] * cg, o // group, *taps)


def phase_conv2d(x, weight, bias, stride, pad, group):
    """``F.conv2d`` (dilation 1) whose gradient with respect to ``x`` is ``phase_input_grad``'s.
    The top is torch's convolution of ``x`` detached, so the weight's and bias's gradients are
    torch's own node's (computed only when a backward asks for them); ``_PhaseInputGrad``
    takes that top over in place and adds the input's gradient."""
    y = F.conv2d(x.detach(), weight, bias, stride=stride, padding=pad, groups=group)
    return _PhaseInputGrad.apply(x, weight, y, stride, pad, group)


class _PhaseInputGrad(torch.autograd.Function):
    """Returns the top ``y`` of ``x`` (marked dirty: the same tensor, not a view, so later
    in-place ops on it are allowed); backward: the top's gradient on to ``y``'s own node
    (the parameters), and ``phase_input_grad`` to ``x``. No double backward: that node's
    gradients would miss their derivative with respect to ``x``, so create_graph raises."""

    @staticmethod
    def forward(ctx, x, weight, y, stride, pad, group):
        ctx.mark_dirty(y)
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(x.shape[2:]), list(stride), list(pad), group)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph: the parameters' node got x detached
            raise RuntimeError('the "phases" convolution path has no double backward (create_graph=True); '
                               'use set_conv_path(module, "torch") for it')
        (weight,) = ctx.saved_tensors
        dx = phase_input_grad(dy, weight, *ctx.geometry) if ctx.needs_input_grad[0] else None
        return dx, None, dy if ctx.needs_input_grad[2] else None, None, None, None


def _planar(x, kernel, stride, pad, dilation):
    """A 1-D case as 2-D with a spatial axis of one (F.unfold and F.fold take 2-D only)."""
    if x.dim() == 4:
        return x, kernel, stride, pad, dilation
    return x.unsqueeze(2), [1] + list(kernel), [1] + list(stride), [0] + list(pad), [1] + list(dilation)


def im2col_conv(x, weight, bias, kernel, stride, pad, dilation, group):
    """Caffe's Convolution forward (forward_cpu_gemm, then forward_cpu_bias) on (N, C, S...)
    with 1 or 2 spatial axes: y_g = W_g im2col(x)_g per image and group, plus the bias."""
    flat, kernel, stride, pad, dilation = _planar(x, kernel, stride, pad, dilation)
    n = flat.shape[0]
    out = [(flat.shape[2 + i] + 2 * pad[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    col = F.unfold(flat, kernel, dilation=dilation, padding=pad, stride=stride)  # (N, C K, L)
    w = weight.reshape(group, weight.shape[0] // group, -1)                       # (g, O/g, C/g K)
    y = torch.matmul(w, col.reshape(n, group, w.shape[2], col.shape[2]))         # (N, g, O/g, L)
    y = y.reshape(n, weight.shape[0], *out)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y if x.dim() == 4 else y.squeeze(2)


def col2im_deconv(x, weight, bias, kernel, stride, pad, dilation, group):
    """Caffe's Deconvolution forward (backward_cpu_gemm, then forward_cpu_bias) on (N, C, S...)
    with 1 or 2 spatial axes: col_g = W_g^T x_g per image and group, col2im, plus the bias."""
    flat, kernel, stride, pad, dilation = _planar(x, kernel, stride, pad, dilation)
    n, c = flat.shape[:2]
    out = [stride[i] * (flat.shape[2 + i] - 1) + dilation[i] * (kernel[i] - 1) + 1 - 2 * pad[i] for i in range(2)]
    w = weight.reshape(group, c // group, -1)                                      # (g, C/g, O/g K)
    col = torch.matmul(w.transpose(1, 2), flat.reshape(n, group, c // group, -1))  # (N, g, O/g K, L)
    y = F.fold(col.reshape(n, -1, col.shape[3]), out, kernel, dilation=dilation, padding=pad, stride=stride)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y if x.dim() == 4 else y.squeeze(2)


class _ConvBase(CaffeLayer):
    """Shared parameter handling; ``reverse`` is True for Deconvolution."""
    param_fields = ("convolution_param",)  # Deconvolution reads it too

    reverse = False
    path = "torch"  # how the layer multiplies: one of CONV_PATHS, see set_conv_path

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1, -1)
        if any(s != self.bottom_shapes[0] for s in self.bottom_shapes):
            raise ValueError(f"all bottoms must have the same shape, got {self.bottom_shapes}")
        cp = spec.param.convolution_param
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(cp.axis, len(shape))
        self.num_spatial = len(shape) - self.axis - 1
        if self.num_spatial not in _CONV:
            raise ValueError(f"{self.type_name} supports 1 to 3 spatial axes, bottom {shape} has "
                             f"{self.num_spatial} after channel axis {self.axis}")
        self.kernel, self.stride, self.pad, self.dilation = conv_geometry(cp, self.num_spatial)
        self.channels = shape[self.axis]
        self.num_output = caffe_int(cp.num_output, "num_output")
        self.group = caffe_int(cp.group, "group")
        self.bias_term = bool(cp.bias_term)
        if self.num_output <= 0:
            raise ValueError("convolution_param.num_output must be positive")
        if self.group <= 0 or self.channels % self.group or self.num_output % self.group:
            raise ValueError(f"group {self.group} must divide the input channels ({self.channels}) "
                             f"and num_output ({self.num_output})")
        if self.reverse:
            weight = (self.channels, self.num_output // self.group)
        else:
            weight = (self.num_output, self.channels // self.group)
        self.param_shapes = [weight + tuple(self.kernel)]
        if self.bias_term:
            self.param_shapes.append((self.num_output,))
        out_spatial = [self._out_size(i, shape[self.axis + 1 + i]) for i in range(self.num_spatial)]
        if any(o <= 0 for o in out_spatial):
            raise ValueError(f"{self.type_name} output would be empty: input {shape}, kernel "
                             f"{self.kernel}, stride {self.stride}, pad {self.pad}, dilation {self.dilation}")
        top = shape[: self.axis] + (self.num_output,) + tuple(out_spatial)
        self.top_shapes = [top] * len(self.bottom_shapes)

    def _extent(self, i: int) -> int:
        return int_arithmetic(self.dilation[i] * (self.kernel[i] - 1) + 1, "dilated kernel extent")

    def work(self) -> int:
        """Products: each top value (Deconvolution: each bottom value) times C_in/group * kernel."""
        side = self.top_shapes[0] if not self.reverse else self.bottom_shapes[0]
        return len(self.bottom_shapes) * count(side) * self.terms()[0 if not self.reverse else 1]

    def workspace(self) -> int:
        """Caffe's column buffer (BaseConvolutionLayer::col_buffer_): kernel_dim * group rows
        by the spatial size of the convolution's output (for Deconvolution, its bottom), one
        image; torch's CPU convolution unfolds the same columns. None for a 1x1 kernel with
        stride 1 and no padding, which both multiply the input as it is (Caffe's is_1x1_)."""
        if all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride) and not any(self.pad):
            return 0
        side = self.top_shapes[0] if not self.reverse else self.bottom_shapes[0]
        weight = self.param_shapes[0]
        return weight[1] * self.group * math.prod(weight[2:]) * math.prod(side[self.axis + 1:])

    def _out_size(self, i: int, size: int) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, *bottoms):
        weight = self.blobs[0]
        bias = self.blobs[1] if self.bias_term else None
        tops = []
        for x in bottoms:
            batch = x.shape[: self.axis]
            x = x.reshape((math.prod(batch),) + tuple(x.shape[self.axis:]))
            y = self._convolve(x, weight, bias)
            tops.append(y.reshape(tuple(batch) + tuple(y.shape[1:])))
        return tuple(tops)

    def terms(self) -> tuple[int, int]:
        """(products per top element, products per bottom-diff element): the dot-product lengths."""
        w = self.param_shapes[0]
        kernel = math.prod(w[2:])
        if self.reverse:  # w = (C_in, C_out/g, k...)
            return (w[0] // self.group) * kernel, w[1] * kernel
        return w[1] * kernel, (w[0] // self.group) * kernel  # w = (C_out, C_in/g, k...)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # im2col + GEMM (Deconvolution: GEMM + col2im) and the bias: n + 1 terms in any order.
        n = self.terms()[0]
        return [gamma(n + 1) * m + (n + 1) * ETA for m in magnitude(self, bottoms, abs_module)]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        n = self.terms()[1]
        mags = magnitude_vjp(self, bottoms, top_diffs, abs_module)
        return [None if m is None else gamma(n) * m + n * ETA for m in mags]

    def port_bugs(self, bottoms, top_shape):
        """conv-flipped (kernels rotated by 180 degrees), group-ignored (groups=1, the weights
        tiled), conv-pad (another padding giving the port's size), bias-missing."""
        blobs = [b.detach().double().numpy() for b in self.blobs]
        spatial = tuple(range(2, 2 + self.num_spatial))
        yield PortBug("conv-flipped", "with its kernels rotated by 180 degrees (flipped)",
                      self.variant(bottoms, blobs=[np.flip(blobs[0], spatial).copy()] + blobs[1:]), bottoms,
                      why="Caffe cross-correlates with the kernel as stored" if not self.reverse else
                      "Caffe's deconvolution is the convolution's backward, with the kernel as stored")
        if self.group > 1 and not self.reverse:
            tiled = np.tile(blobs[0], (1, self.group) + (1,) * self.num_spatial)
            yield PortBug("group-ignored", f"with groups=1 and each filter's weights tiled over the {self.group} "
                          "channel groups", self.variant(bottoms, lambda p: setattr(p.convolution_param, "group", 1),
                                                         [tiled] + blobs[1:]), bottoms,
                          why=f"Caffe's group: {self.group} convolves each group of channels with its own filters")
        for p in range(0, max(self.kernel) + 1):
            if all(q == p for q in self.pad):
                continue

            def edit(param, p=p):
                cp = param.convolution_param
                cp.ClearField("pad_h"), cp.ClearField("pad_w")
                del cp.pad[:]
                cp.pad.append(p)

            try:
                layer = self.variant(bottoms, edit)
            except ValueError:
                continue
            if tuple(layer.top_shapes[0]) == tuple(top_shape):
                pad = str(self.pad[0]) if len(set(self.pad)) == 1 else "x".join(map(str, self.pad))
                yield PortBug("conv-pad", f"with pad {p} instead of {pad}", layer, bottoms)
        if self.bias_term:
            yield PortBug("bias-missing", "without its bias", self.variant(
                bottoms, lambda p: setattr(p.convolution_param, "bias_term", False), blobs[:1]), bottoms)

    def describe(self) -> str:
        def fmt(values):
            return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))

        text = f"k{fmt(self.kernel)} s{fmt(self.stride)} p{fmt(self.pad)} g{self.group}"
        if any(d != 1 for d in self.dilation):
            text += f" d{fmt(self.dilation)}"
        return text


@register("Convolution", v1="CONVOLUTION")
class Convolution(_ConvBase):
    """Weights (num_output, C/group, k...), bias (num_output,); out = (in + 2p - ext) // s + 1."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_conv.py",
                   "tests/test_conv_phases.py")

    def _out_size(self, i, size):
        return conv_out_size(size, self.kernel[i], self.stride[i], self.pad[i], self.dilation[i])

    def _convolve(self, x, weight, bias):
        # Caffe's im2col reads zeros outside the input, also past the padding: where one
        # window is wider than the padded input (see _out_size), zeros are appended for torch.
        # A stride beyond the padded input leaves one window either way; torch gets the
        # padded size instead (its backward traps on a stride near 2^31).
        stride = [min(s, x.shape[2 + i] + 2 * self.pad[i]) for i, s in enumerate(self.stride)]
        short = [max(0, self._extent(i) - x.shape[2 + i] - 2 * self.pad[i]) for i in range(self.num_spatial)]
        if any(short):
            x = F.pad(x, [v for n in reversed(short) for v in (0, n)])
        if (self.path == "phases" and self.num_spatial == 2 and any(s > 1 for s in stride)
                and all(d == 1 for d in self.dilation) and x.requires_grad and torch.is_grad_enabled()):
            return phase_conv2d(x, weight, bias, stride, self.pad, self.group)
        if self.path == "im2col" and self.num_spatial <= 2:
            return im2col_conv(x, weight, bias, self.kernel, stride, self.pad, self.dilation, self.group)
        return _CONV[self.num_spatial](x, weight, bias, stride=stride, padding=self.pad,
                                       dilation=self.dilation, groups=self.group)


@register("Deconvolution", v1="DECONVOLUTION")
class Deconvolution(_ConvBase):
    """Weights (C, num_output/group, k...), bias (num_output,); out = s*(in-1) + ext - 2p."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_conv.py")

    reverse = True

    def _out_size(self, i, size):
        return int_arithmetic(self.stride[i] * (size - 1) + self._extent(i), "output before the padding") \
            - 2 * self.pad[i]

    def _convolve(self, x, weight, bias):
        # Along an axis of one input pixel the stride places nothing; torch traps (SIGFPE)
        # on a stride near 2^31, so it gets 1 there.
        stride = [s if x.shape[2 + i] > 1 else 1 for i, s in enumerate(self.stride)]
        if self.path == "im2col" and self.num_spatial <= 2:
            return col2im_deconv(x, weight, bias, self.kernel, stride, self.pad, self.dilation, self.group)
        return _DECONV[self.num_spatial](x, weight, bias, stride=stride, padding=self.pad,
                                         output_padding=0, groups=self.group, dilation=self.dilation)
