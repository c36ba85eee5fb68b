"""Pooling with Caffe 1.0's own geometry (pooling_layer.cpp, CAFFE engine).

Why not plain ``max_pool2d``/``avg_pool2d``: Caffe's output size rounds up (``round_mode``
CEIL, the default) and, only when pad > 0, drops a last window that would start in the
right/bottom padding; torch limits pad to kernel/2 and applies its own clip rule even
without padding. Caffe's AVE divisor counts padded cells up to the padded border
(``min(start + kernel, size + pad) - start``), which neither ``count_include_pad`` setting
reproduces at the bottom/right edge. So the input is padded here by hand (-inf for MAX,
0 for AVE) to exactly cover Caffe's windows, the windows are pooled without torch
padding, and AVE divides the window sums by Caffe's divisor map.

Tie-breaking: Caffe routes the MAX gradient to the first maximum of a window in row-major
scan order; torch's CPU max_pool2d keeps the first strictly greater value too, so its
backward matches (tests/test_layers_pooling.py checks this on ReLU-style ties at 0).
A window with no image cell (possible only with pad 0 and stride > kernel) gives Caffe's
-FLT_MAX for MAX and 0 / divisor for AVE (NaN when the divisor is 0), as Caffe does;
Caffe's MAX backward of such a window writes before the blob (index -1), here nothing.
Only the CPU path has been checked against Caffe. STOCHASTIC pooling (random at TRAIN, GPU-only at TEST) is refused.

A kernel or pad far beyond the input is legal in Caffe, whose loops visit only each
window's image cells (hstart..hend clipped to the image), so it costs Caffe little. The
padded cover would then be far larger than the input, so such geometries gather each
window's clipped cells instead (``clipped_pool``), at a cost bounded by the input and
output sizes. Values Caffe keeps in a C++ int (kernel, pad, stride, the padded size, the
AVE divisor) are refused when they do not fit one, as their Caffe result is meaningless.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from porting import caffe_pb2
from porting.layers import INT_MAX, CaffeLayer, PortBug, caffe_int, int_arithmetic, register
from porting.rounding import ETA, gamma, vjp

P = caffe_pb2.PoolingParameter
FLT_MAX = float(np.finfo(np.float32).max)


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool = True) -> int:
    """Caffe's pooled size before the pad clip rule: float32 division, ceil (or floor), + 1."""
    ratio = float(np.float32(size + 2 * pad - kernel) / np.float32(stride))
    return int(math.ceil(ratio) if ceil_mode else math.floor(ratio)) + 1


def pooling_geometry(pp, height: int, width: int):
    """(kernel, stride, pad, pooled) as (h, w) pairs, with Caffe's parameter rules."""
    if pp.global_pooling:
        if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
            raise ValueError("with global_pooling: true the kernel size cannot be given")
        kernel = (height, width)
    elif pp.HasField("kernel_size") == (pp.HasField("kernel_h") and pp.HasField("kernel_w")):
        raise ValueError("give kernel_size, or kernel_h and kernel_w; not both, not neither")
    elif pp.HasField("kernel_size"):
        kernel = (pp.kernel_size, pp.kernel_size)
    else:
        kernel = (pp.kernel_h, pp.kernel_w)
    if pp.HasField("pad") and (pp.HasField("pad_h") or pp.HasField("pad_w")) or \
            pp.HasField("pad_h") != pp.HasField("pad_w"):
        raise ValueError("give pad, or pad_h and pad_w")
    pad = (pp.pad_h, pp.pad_w) if pp.HasField("pad_h") else (pp.pad, pp.pad)
    if pp.HasField("stride") and (pp.HasField("stride_h") or pp.HasField("stride_w")) or \
            pp.HasField("stride_h") != pp.HasField("stride_w"):
        raise ValueError("give stride, or stride_h and stride_w")
    stride = (pp.stride_h, pp.stride_w) if pp.HasField("stride_h") else (pp.stride, pp.stride)
    kernel = tuple(caffe_int(k, "kernel size") for k in kernel)
    pad = tuple(caffe_int(p, "pad") for p in pad)
    stride = tuple(caffe_int(s, "stride") for s in stride)
    if min(kernel) <= 0:
        raise ValueError(f"kernel dimensions must be nonzero, got {kernel}")
    if min(stride) <= 0:
        raise ValueError(f"stride must be nonzero, got {stride}")
    if pp.global_pooling and (pad != (0, 0) or stride != (1, 1)):
        raise ValueError("with global_pooling: true only pad = 0 and stride = 1 are allowed")
    if any(p >= k for p, k in zip(pad, kernel)):
        raise ValueError(f"pad {pad} must be smaller than the kernel {kernel}")
    for size, p in zip((height, width), pad):
        int_arithmetic(size + 2 * p, "input plus padding")
    ceil_mode = pp.round_mode == P.CEIL
    pooled = [pooled_size(s, k, st, p, ceil_mode) for s, k, st, p in zip((height, width), kernel, stride, pad)]
    if pad != (0, 0):  # the last window must start strictly inside the image (Caffe's clip rule)
        for i, size in enumerate((height, width)):
            if int_arithmetic((pooled[i] - 1) * stride[i], "last window start") >= size + pad[i]:
                pooled[i] -= 1
    if min(pooled) <= 0:
        raise ValueError(f"pooling output would be empty: input {height}x{width}, kernel {kernel}, "
                         f"stride {stride}, pad {pad}")
    return kernel, stride, pad, tuple(pooled)


def _use_cover(size, kernel, stride, pooled) -> bool:
    """Whether the padded cover of an input plane ``size`` (h, w) is small enough to build:
    at most 4 times the plane plus 1024 cells (always so for the kernels of real nets)."""
    need = [(o - 1) * s + k for o, s, k in zip(pooled, stride, kernel)]
    return need[0] * need[1] <= 4 * size[0] * size[1] + 1024


def clipped_cells(size: int, kernel: int, stride: int, pad: int, pooled: int, device=None):
    """Along one axis, the image cells of each window as Caffe's loops visit them
    (hstart..hend clipped to [0, size)): ``index`` and ``valid``, both (pooled, L) with L the
    longest clipped window (at least 1); an invalid cell's index is any cell in range."""
    start = torch.arange(pooled, device=device) * stride - pad
    first, end = start.clamp(0, size), (start + kernel).clamp(0, size)
    index = first[:, None] + torch.arange(max(int((end - first).max()), 1), device=device)
    valid = index < end[:, None]
    return index.clamp_max(size - 1), valid


def _pool_axis(x, dim: int, index, valid, fill: float, method: str):
    """Reduce the windows of axis ``dim`` (MAX: the first maximum; AVE: the sum)."""
    cells = x.index_select(dim, index.reshape(-1)).unflatten(dim, tuple(index.shape))
    cells = cells.masked_fill(~valid.reshape(tuple(valid.shape) + (1,) * (cells.dim() - dim - 2)), fill)
    return cells.max(dim=dim + 1).values if method == "MAX" else cells.sum(dim=dim + 1)


_CHUNK = 1 << 24  # gathered cells per step of clipped_pool


def clipped_pool(x, kernel, stride, pad, pooled, method: str):
    """MAX (empty window: -inf) or AVE window sums of x (N, C, H, W) over each window's
    clipped image cells, by gathering: widths first, then heights. MAX keeps the first
    maximum of each row, then the first row holding the maximum: Caffe's first maximum in
    row-major scan order (its backward routes there). Planes go in chunks of about 2^24
    gathered cells, so the memory stays near the output's."""
    n, c, h, w = x.shape
    (ih, vh), (iw, vw) = (clipped_cells(size, k, s, p, o, x.device)
                          for size, k, s, p, o in zip((h, w), kernel, stride, pad, pooled))
    fill = -math.inf if method == "MAX" else 0.0
    planes = x.reshape(n * c, h, w)
    step = max(1, _CHUNK // max(1, h * pooled[1] * iw.shape[1] + pooled[0] * ih.shape[1] * pooled[1]))
    parts = [_pool_axis(_pool_axis(planes[i:i + step], 2, iw, vw, fill, method), 1, ih, vh, fill, method)
             for i in range(0, n * c, step)]
    out = torch.cat(parts) if parts else planes.new_zeros((0,) + tuple(pooled))
    return out.reshape(n, c, *pooled)


def pool_work(shape, kernel, stride, pooled) -> int:
    """Cells the port visits pooling an (N, C, H, W) blob: every window cell of the padded
    cover, or on the clipped path each gathered cell (a width pass, then a height pass)."""
    n, c, h, w = shape
    (kh, kw), (ph, pw) = kernel, pooled
    if _use_cover((h, w), kernel, stride, pooled):
        return n * c * ph * pw * kh * kw
    return n * c * (h * pw * min(kw, w) + ph * min(kh, h) * pw)


def _cover(x, kernel, stride, pad, pooled, value):
    """Pad x (N, C, H, W) with ``value`` so that Caffe's windows tile it without torch padding."""
    need = [(o - 1) * s + k for o, s, k in zip(pooled, stride, kernel)]
    extra = [n - size - p for n, size, p in zip(need, x.shape[2:], pad)]
    if pad == (0, 0) and extra[0] <= 0 and extra[1] <= 0:  # windows inside the image: no copy
        return x[:, :, : need[0], : need[1]]
    x = F.pad(x, (pad[1], max(extra[1], 0), pad[0], max(extra[0], 0)), value=value)
    return x[:, :, : need[0], : need[1]]


def caffe_max_pool(x, kernel, stride, pad, pooled):
    """MAX pooling over Caffe's windows; empty windows give -FLT_MAX as in Caffe."""
    if _use_cover(x.shape[2:], kernel, stride, pooled):
        y = F.max_pool2d(_cover(x, kernel, stride, pad, pooled, -math.inf), kernel, stride)
    else:
        y = clipped_pool(x, kernel, stride, pad, pooled, "MAX")
    return y.clamp_min(-FLT_MAX)


def ave_divisor(size: int, kernel: int, stride: int, pad: int, pooled: int) -> np.ndarray:
    """Caffe's AVE pool_size factor along one axis: min(start + k, size + pad) - start."""
    start = np.arange(pooled) * stride - pad
    return np.minimum(start + kernel, size + pad) - start


def caffe_ave_pool(x, kernel, stride, pad, pooled):
    """AVE pooling: window sums over the image divided by Caffe's divisor (counts padding)."""
    if _use_cover(x.shape[2:], kernel, stride, pooled):
        sums = F.avg_pool2d(_cover(x, kernel, stride, pad, pooled, 0.0), kernel, stride, divisor_override=1)
    else:
        sums = clipped_pool(x, kernel, stride, pad, pooled, "AVE")
    dh = ave_divisor(x.shape[2], kernel[0], stride[0], pad[0], pooled[0])
    dw = ave_divisor(x.shape[3], kernel[1], stride[1], pad[1], pooled[1])
    divisor = torch.as_tensor(np.outer(dh, dw), dtype=x.dtype, device=x.device)
    return sums / divisor


@register("Pooling", v1="POOLING")
class Pooling(CaffeLayer):
    """MAX or AVE pooling of an (N, C, H, W) blob; see the module docstring for the rules."""
    verified_by = ("tests/test_layers_caffe.py", "tests/test_bounds.py", "tests/test_layers_pooling.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(1)
        pp = spec.param.pooling_param
        if pp.pool == P.STOCHASTIC:
            raise ValueError("STOCHASTIC pooling is not supported (random at TRAIN, GPU-only at TEST)")
        if len(spec.param.top) > 1:
            raise ValueError("Pooling with a second (mask) top is not supported")
        shape = self.bottom_shapes[0]
        if len(shape) != 4:
            raise ValueError(f"Pooling needs a 4-axis (N, C, H, W) bottom, got {shape}")
        self.method = "MAX" if pp.pool == P.MAX else "AVE"
        self.global_pooling = bool(pp.global_pooling)
        self.kernel, self.stride, self.pad, self.pooled = pooling_geometry(pp, shape[2], shape[3])
        if self.method == "AVE":  # Caffe's int pool_size: at most min(k, size + 2 pad) per axis
            largest = math.prod(min(k, n + 2 * p) for k, n, p in zip(self.kernel, shape[2:], self.pad))
            if largest > INT_MAX:
                raise ValueError(f"AVE window of {largest:,} cells (kernel {self.kernel}, pad {self.pad}) "
                                 "overflows Caffe's int divisor")
        self.top_shapes = [shape[:2] + self.pooled]

    def geometry(self, x):
        """(kernel, stride, pad, pooled) for this input (Caffe reshapes to a new input size)."""
        if tuple(x.shape[2:]) != self.bottom_shapes[0][2:]:
            return pooling_geometry(self.spec.param.pooling_param, x.shape[2], x.shape[3])
        return self.kernel, self.stride, self.pad, self.pooled

    def forward(self, x):
        pool = caffe_max_pool if self.method == "MAX" else caffe_ave_pool
        return (pool(x, *self.geometry(x)),)

    def _overlap(self, x) -> int:
        """How many windows can cover one input element (ceil(k/s) per axis, 1 for global)."""
        if self.global_pooling:
            return 1
        kernel, stride, _, pooled = self.geometry(x)
        return math.prod(min(math.ceil(k / s), o) for k, s, o in zip(kernel, stride, pooled))

    def _windows(self, x):
        """Each window's values and their plane indices h * W + w (-1 for padding), as
        (N, C, pooled_h, pooled_w, k_h * k_w) in Caffe's row-major scan order."""
        kernel, stride, pad, pooled = self.geometry(x)
        if not _use_cover(x.shape[2:], kernel, stride, pooled):
            return self._clipped_windows(x, kernel, stride, pad, pooled)
        plane = torch.arange(x.shape[2] * x.shape[3], dtype=x.dtype, device=x.device).reshape(1, 1, *x.shape[2:])
        values = _cover(x, kernel, stride, pad, pooled, -math.inf)
        index = _cover(plane, kernel, stride, pad, pooled, -1.0)

        def unfold(t):
            t = t.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])
            return t.reshape(t.shape[:4] + (-1,))

        return unfold(values), unfold(index).long()

    @staticmethod
    def _clipped_windows(x, kernel, stride, pad, pooled):
        """``_windows`` from each window's clipped image cells (-inf and -1 past its end)."""
        (ih, vh), (iw, vw) = (clipped_cells(size, k, s, p, o, x.device)
                              for size, k, s, p, o in zip(x.shape[2:], kernel, stride, pad, pooled))
        cells = x[:, :, ih][..., iw].permute(0, 1, 2, 4, 3, 5)  # (N, C, ph, pw, row, col)
        valid = vh[:, None, :, None] & vw[None, :, None, :]
        values = cells.masked_fill(~valid, -math.inf).flatten(-2)
        index = torch.where(valid, ih[:, None, :, None] * x.shape[3] + iw[None, :, None, :], -1)
        return values, index.flatten(-2)[None, None]

    def decisions(self, bottoms):
        """MAX: each window's winner as Caffe's mask holds it, h * W + w within its (N, C)
        plane (the first maximum in row-major scan order; -1 for a window with no image cell)."""
        if self.method != "MAX":
            return None
        values, index = self._windows(bottoms[0])
        best = values.argmax(dim=-1, keepdim=True)  # the first maximum
        return [index.expand_as(values).gather(-1, best).squeeze(-1)]

    def decision_margins(self, bottoms):
        """MAX: winner minus runner-up in each window (inf for a window of one image cell)."""
        if self.method != "MAX":
            return None
        values, _ = self._windows(bottoms[0])
        if values.shape[-1] == 1:
            return [torch.full(values.shape[:4], math.inf, dtype=values.dtype, device=values.device)]
        top2 = values.topk(2, dim=-1).values
        margin = top2[..., 0] - top2[..., 1]
        return [torch.where(torch.isnan(margin), math.inf, margin)]

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        x = bottoms[0]
        if self.method == "MAX":  # a comparison: exact
            return [torch.zeros_like(exact_tops[0])]
        # AVE: a sum of the window's image cells (at most k*k) in any order, then one division.
        kernel = self.geometry(x)[0]
        with torch.no_grad():
            mag = self(x.abs())[0]
        return [gamma(min(kernel[0], x.shape[2]) * min(kernel[1], x.shape[3]) + 1) * mag + ETA]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Each bottom diff sums at most `overlap` routed (MAX) or divided (AVE) top diffs.
        mag = vjp(self, bottoms, [top_diffs[0].abs()])[0].abs()
        if self.method == "MAX":
            return [gamma(self._overlap(bottoms[0])) * mag]
        return [gamma(self._overlap(bottoms[0]) + 1) * mag + ETA]

    def port_bugs(self, bottoms, top_shape):
        """pool-floor (size rounded down: ceil_mode=False), pool-no-clip (Caffe's dropping of a
        last window that starts in the padding ignored), ave-divisor (count_include_pad=False),
        pool-pad (another padding giving the port's size)."""
        x = bottoms[0]
        kernel, stride, pad, pooled = self.geometry(x)
        if self.global_pooling:
            return
        floor = tuple(pooled_size(s, k, st, p, ceil_mode=False)
                      for s, k, st, p in zip(x.shape[2:], kernel, stride, pad))
        if floor != tuple(pooled):
            def floored(self, x):
                if self.method == "MAX":
                    return (F.max_pool2d(x, kernel, stride, pad, ceil_mode=False),)
                return (F.avg_pool2d(x, kernel, stride, pad, ceil_mode=False),)

            yield PortBug("pool-floor", "with the pooled size rounded down (ceil_mode=False)",
                          self.patched("forward", floored), [x],
                          why="Caffe rounds pooling output size up (ceil_mode=True)")
        unclipped = tuple(pooled_size(s, k, st, p) for s, k, st, p in zip(x.shape[2:], kernel, stride, pad))
        if unclipped != tuple(pooled):
            def no_clip(self, x):
                pool = caffe_max_pool if self.method == "MAX" else caffe_ave_pool
                return (pool(x, kernel, stride, pad, unclipped),)

            yield PortBug("pool-no-clip", "with a last window that starts in the padding kept",
                          self.patched("forward", no_clip), [x],
                          why="Caffe drops it ((pooled - 1) * stride >= size + pad)")
        if self.method == "AVE" and any(pad):
            def exclude_pad(self, x):
                return (F.avg_pool2d(x, kernel, stride, pad, ceil_mode=True, count_include_pad=False),)

            yield PortBug("ave-divisor", "with each average over the image cells only (count_include_pad=False)",
                          self.patched("forward", exclude_pad), [x], why="Caffe's divisor counts the padding")
        for p in range(0, max(kernel)):
            if (p, p) == tuple(pad):
                continue

            def edit(param, p=p):
                pp = param.pooling_param
                pp.ClearField("pad_h"), pp.ClearField("pad_w")
                pp.pad = p

            try:
                layer = self.variant([x], edit)
            except ValueError:
                continue
            if tuple(layer.top_shapes[0]) == tuple(top_shape):
                yield PortBug("pool-pad", f"with pad {p} instead of {_pair(pad)}", layer, [x])

    def work(self) -> int:
        return pool_work(self.bottom_shapes[0], self.kernel, self.stride, self.pooled)

    def describe(self) -> str:
        def fmt(pair):
            return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"

        if self.global_pooling:
            return f"{self.method} global"
        return f"{self.method} k{fmt(self.kernel)} s{fmt(self.stride)} p{fmt(self.pad)}"


def _pair(values) -> str:
    """"3" for (3, 3), "3x2" for (3, 2)."""
    values = tuple(values)
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))
