"""Independent float64 NumPy references for Caffe 1.0's layers, forward and backward.

Written from Caffe's src/caffe/layers/*.cpp (Forward_cpu / Backward_cpu, LayerSetUp /
Reshape), loop by loop where Caffe loops, for clarity rather than speed; nothing here
imports the port. Arrays are NCHW (or N-D with the channel axis 1), float64. Backward
functions take the top diff and return what Caffe writes into the bottom (and blob) diffs.

At the end, ``run_layer`` and ``rel_err`` are the small harness the tests share: the first
runs a port layer with torch and hands back NumPy arrays; the second is the project's
error measure, max |a - ref| / max |ref|.
"""
from __future__ import annotations

import itertools
import math
import os

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------------
# Convolution / Deconvolution (im2col + GEMM in Caffe: a grouped cross-correlation)
# ---------------------------------------------------------------------------------------
def wide_range(shape, seed, low, high) -> np.ndarray:
    """A test input with a large dynamic range: N(0, 1) times 10**U(low, high) from
    ``default_rng(seed)``, 5 % of the entries exactly 0, as float32."""
    r = np.random.default_rng(seed)
    x = r.normal(size=shape) * 10.0 ** r.uniform(low, high, size=shape)
    x[r.random(shape) < 0.05] = 0
    return x.astype(np.float32)


def seeded_normal(shape, seed, scale=1.0, zeros=0.0) -> np.ndarray:
    """A test input: N(0, scale**2) from ``default_rng(seed)``, a fraction ``zeros`` of the
    entries set to exactly 0 (ReLU kinks, ties), as float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=scale, size=shape)
    x[rng.random(shape) < zeros] = 0.0
    return x.astype(np.float32)


def conv_out_size(size, kernel, stride, pad, dilation):
    """base_conv_layer.cpp compute_output_shape: (in + 2p - ext) / s + 1, ext = d (k - 1) + 1."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _taps(kernel, stride, dilation, out):
    """For every kernel offset: the offset tuple and the slices of the padded input it reads."""
    for offs in itertools.product(*[range(k) for k in kernel]):
        yield offs, tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                          for o, d, s, n in zip(offs, dilation, stride, out))


def _contract(a, b):
    """sum over n and every spatial position of a[n, i, ...] * b[n, j, ...] -> (i, j)."""
    return np.einsum("nip,njp->ij", a.reshape(a.shape[0], a.shape[1], -1), b.reshape(b.shape[0], b.shape[1], -1))


def conv_forward(x, w, b, stride, pad, dilation, group):
    """y[n, o] = sum_c,k w[o, c, k] * x_pad[n, g*C/g + c, s*i + d*k] + b[o]."""
    n, c = x.shape[:2]
    o, kernel = w.shape[0], w.shape[2:]
    out = [conv_out_size(x.shape[2 + i], kernel[i], stride[i], pad[i], dilation[i]) for i in range(len(kernel))]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in pad])
    y = np.zeros((n, o, *out))
    cg, og = c // group, o // group
    for g in range(group):
        xs, ys = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
        for offs, window in _taps(kernel, stride, dilation, out):
            patch = xp[(slice(None), xs) + window]
            y[:, ys] += np.einsum("nc...,oc->no...", patch, w[(ys, slice(None)) + offs])
    if b is not None:
        y += b.reshape((1, -1) + (1,) * len(kernel))
    return y


def conv_backward(x, w, dy, stride, pad, dilation, group, bias=True):
    """(dx, dw, db) of conv_forward for top diff dy (Caffe: col2im(W^T dy), dy x col^T, sum dy)."""
    c, o, kernel = x.shape[1], w.shape[0], w.shape[2:]
    out = dy.shape[2:]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in pad])
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    cg, og = c // group, o // group
    for g in range(group):
        xs, ys = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
        for offs, window in _taps(kernel, stride, dilation, out):
            wk = w[(ys, slice(None)) + offs]
            dxp[(slice(None), xs) + window] += np.einsum("no...,oc->nc...", dy[:, ys], wk)
            dw[(ys, slice(None)) + offs] += _contract(dy[:, ys], xp[(slice(None), xs) + window])
    crop = (slice(None), slice(None)) + tuple(slice(p, p + x.shape[2 + i]) for i, p in enumerate(pad))
    db = dy.sum(axis=(0,) + tuple(range(2, dy.ndim))) if bias else None
    return dxp[crop], dw, db


def deconv_out_size(size, kernel, stride, pad, dilation):
    """deconv_layer.cpp: s (in - 1) + ext - 2p."""
    return stride * (size - 1) + dilation * (kernel - 1) + 1 - 2 * pad


def deconv_forward(x, w, b, stride, pad, dilation, group):
    """Caffe's Deconvolution: conv backward-data with weights (C, O/g, k...), then + bias.

    Every input value x[n, c, i] scatters w[c, o, k] * x into y_full[n, o, s*i + d*k];
    the top is y_full cropped by pad on each side.
    """
    n, c = x.shape[:2]
    og, kernel = w.shape[1], w.shape[2:]
    o = og * group
    ins = x.shape[2:]
    full = [stride[i] * (ins[i] - 1) + dilation[i] * (kernel[i] - 1) + 1 for i in range(len(kernel))]
    yp = np.zeros((n, o, *full))
    cg = c // group
    for g in range(group):
        xs, ys = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
        for offs, window in _taps(kernel, stride, dilation, ins):
            yp[(slice(None), ys) + window] += np.einsum("nc...,co->no...", x[:, xs], w[(xs, slice(None)) + offs])
    out = [deconv_out_size(ins[i], kernel[i], stride[i], pad[i], dilation[i]) for i in range(len(kernel))]
    y = yp[(slice(None), slice(None)) + tuple(slice(p, p + m) for p, m in zip(pad, out))]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * len(kernel))
    return y


def deconv_backward(x, w, dy, stride, pad, dilation, group, bias=True):
    """(dx, dw, db) of deconv_forward (Caffe: dx is a forward convolution of dy)."""
    c = x.shape[1]
    og, kernel = w.shape[1], w.shape[2:]
    ins = x.shape[2:]
    dyp = np.pad(dy, [(0, 0), (0, 0)] + [(p, p) for p in pad])
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    cg = c // group
    for g in range(group):
        xs, ys = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
        for offs, window in _taps(kernel, stride, dilation, ins):
            patch = dyp[(slice(None), ys) + window]
            dx[:, xs] += np.einsum("no...,co->nc...", patch, w[(xs, slice(None)) + offs])
            dw[(xs, slice(None)) + offs] += _contract(x[:, xs], patch)
    db = dy.sum(axis=(0,) + tuple(range(2, dy.ndim))) if bias else None
    return dx, dw, db


# ---------------------------------------------------------------------------------------
# InnerProduct
# ---------------------------------------------------------------------------------------
def inner_product_forward(x, w, b, axis=1, transpose=False):
    m = int(np.prod(x.shape[:axis]))
    x2 = x.reshape(m, -1)
    y = x2 @ (w if transpose else w.T)
    if b is not None:
        y = y + b
    return y.reshape(x.shape[:axis] + (y.shape[1],))


def inner_product_backward(x, w, dy, axis=1, transpose=False):
    m = int(np.prod(x.shape[:axis]))
    x2, dy2 = x.reshape(m, -1), dy.reshape(m, -1)
    dx = dy2 @ (w.T if transpose else w)
    dw = x2.T @ dy2 if transpose else dy2.T @ x2
    return dx.reshape(x.shape), dw, dy2.sum(axis=0)


# ---------------------------------------------------------------------------------------
# Pooling (pooling_layer.cpp)
# ---------------------------------------------------------------------------------------
def pool_out_size(size, kernel, stride, pad, ceil_mode=True):
    """Pooled size by integer arithmetic (ceil or floor of (size + 2p - k) / s, plus 1),
    before the pad clip rule."""
    span = size + 2 * pad - kernel
    return (-(-span // stride) if ceil_mode else span // stride) + 1


def pool_geometry(height, width, kernel, stride, pad, ceil_mode=True):
    """(pooled_h, pooled_w) with Caffe's rule: with any padding, drop a last window that
    starts at or beyond size + pad (i.e. in the right/bottom padding)."""
    ph = pool_out_size(height, kernel[0], stride[0], pad[0], ceil_mode)
    pw = pool_out_size(width, kernel[1], stride[1], pad[1], ceil_mode)
    if pad[0] or pad[1]:
        if (ph - 1) * stride[0] >= height + pad[0]:
            ph -= 1
        if (pw - 1) * stride[1] >= width + pad[1]:
            pw -= 1
    return ph, pw


def pool_forward(x, method, kernel, stride, pad, pooled):
    """Caffe's Forward_cpu loops. Returns (top, mask); mask holds h * W + w of the max (MAX)."""
    n, c, height, width = x.shape
    top = np.zeros((n, c) + tuple(pooled))
    mask = np.full((n, c) + tuple(pooled), -1, dtype=np.int64)
    for i, j, ph, pw in itertools.product(range(n), range(c), range(pooled[0]), range(pooled[1])):
        hstart, wstart = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
        if method == "MAX":
            hend, wend = min(hstart + kernel[0], height), min(wstart + kernel[1], width)
            hstart, wstart = max(hstart, 0), max(wstart, 0)
            best = -FLT_MAX
            for h in range(hstart, hend):
                for w in range(wstart, wend):
                    if x[i, j, h, w] > best:
                        best, mask[i, j, ph, pw] = x[i, j, h, w], h * width + w
            top[i, j, ph, pw] = best
        else:
            hend, wend = min(hstart + kernel[0], height + pad[0]), min(wstart + kernel[1], width + pad[1])
            pool_size = (hend - hstart) * (wend - wstart)
            hstart, wstart = max(hstart, 0), max(wstart, 0)
            hend, wend = min(hend, height), min(wend, width)
            total = 0.0
            for h in range(hstart, hend):
                for w in range(wstart, wend):
                    total += x[i, j, h, w]
            with np.errstate(invalid="ignore", divide="ignore"):
                top[i, j, ph, pw] = np.float64(total) / pool_size
    return top, mask


def pool_backward(dy, x_shape, method, kernel, stride, pad, mask=None):
    """Caffe's Backward_cpu: MAX adds dy at the mask index (skipped where the mask is -1,
    an empty window, where Caffe would write out of bounds); AVE spreads dy / pool_size."""
    n, c, height, width = x_shape
    dx = np.zeros(x_shape)
    pooled = dy.shape[2:]
    for i, j, ph, pw in itertools.product(range(n), range(c), range(pooled[0]), range(pooled[1])):
        if method == "MAX":
            index = mask[i, j, ph, pw]
            if index >= 0:
                dx[i, j, index // width, index % width] += dy[i, j, ph, pw]
            continue
        hstart, wstart = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
        hend, wend = min(hstart + kernel[0], height + pad[0]), min(wstart + kernel[1], width + pad[1])
        pool_size = (hend - hstart) * (wend - wstart)
        hstart, wstart = max(hstart, 0), max(wstart, 0)
        hend, wend = min(hend, height), min(wend, width)
        for h in range(hstart, hend):
            for w in range(wstart, wend):
                dx[i, j, h, w] += dy[i, j, ph, pw] / pool_size
    return dx


# ---------------------------------------------------------------------------------------
# Power (power_layer.cpp), used by LRN WITHIN_CHANNEL too
# ---------------------------------------------------------------------------------------
def power_forward(x, power, scale, shift):
    diff_scale = power * scale
    if diff_scale == 0:
        with np.errstate(all="ignore"):
            return np.full_like(x, 1.0 if power == 0 else np.power(shift, power))
    with np.errstate(all="ignore"):
        return np.power(scale * x + shift, power) if power != 1 else scale * x + shift


def power_backward(x, y, dy, power, scale, shift):
    """Caffe's special cases, including its power * y / x when shift == 0."""
    diff_scale = power * scale
    with np.errstate(all="ignore"):
        if diff_scale == 0:
            return np.zeros_like(x)
        if power == 1:
            d = np.full_like(x, diff_scale)
        elif power == 2:
            d = diff_scale * scale * x + diff_scale * shift
        elif shift == 0:
            d = power * y / x
        else:
            d = diff_scale * y / (scale * x + shift)
        return d * dy


# ---------------------------------------------------------------------------------------
# LRN (lrn_layer.cpp)
# ---------------------------------------------------------------------------------------
def lrn_across_forward(x, size, alpha, beta, k):
    """Returns (top, scale): scale_c = k + alpha/size * sum of x^2 over channels c-p..c+p."""
    n, c = x.shape[:2]
    pre_pad = (size - 1) // 2
    scale = np.full(x.shape, float(k))
    for ch in range(c):
        for other in range(ch - pre_pad, ch - pre_pad + size):
            if 0 <= other < c:
                scale[:, ch] += alpha / size * x[:, other] ** 2
    return x * scale ** -beta, scale


def lrn_across_backward(x, y, scale, dy, size, alpha, beta, magnitude=False):
    """CrossChannelBackward_cpu: dy * scale^-beta - 2 alpha beta / size * x * sum(dy y / scale).

    With ``magnitude`` the same sum over absolute values of every term (see rel_err).
    """
    c = x.shape[1]
    inverse_pre_pad = size - (size + 1) // 2
    ratio = dy * y / scale
    dx = dy * scale ** -beta
    sign = 1.0
    if magnitude:
        x, ratio, dx, sign = np.abs(x), np.abs(ratio), np.abs(dx), -1.0
    for ch in range(c):
        accum = np.zeros(x.shape[:1] + x.shape[2:])
        for other in range(ch - inverse_pre_pad, ch - inverse_pre_pad + size):
            if 0 <= other < c:
                accum += ratio[:, other]
        dx[:, ch] -= sign * 2.0 * alpha * beta / size * x[:, ch] * accum
    return dx


def lrn_within_forward(x, size, alpha, beta):
    """Caffe's sub-layer chain: x^2 -> AVE pool (k size, s 1, pad (size-1)/2) ->
    (1 + alpha * avg)^-beta -> times x. Returns top and the intermediates."""
    pad = (size - 1) // 2
    sq = power_forward(x, 2.0, 1.0, 0.0)
    pooled = pool_geometry(x.shape[2], x.shape[3], (size, size), (1, 1), (pad, pad))
    avg, _ = pool_forward(sq, "AVE", (size, size), (1, 1), (pad, pad), pooled)
    pw = power_forward(avg, -beta, alpha, 1.0)
    return x * pw, (sq, avg, pw)


def lrn_within_backward(x, dy, size, alpha, beta, intermediates, magnitude=False):
    """Backward of the chain, sub-layer by sub-layer; split sums the two paths
    (with ``magnitude``: sums their absolute values, see rel_err)."""
    pad = (size - 1) // 2
    sq, avg, pw = intermediates
    d_product_input = dy * pw  # Eltwise PROD, stable gradient: the other factor
    d_pw = dy * x
    d_avg = power_backward(avg, pw, d_pw, -beta, alpha, 1.0)
    d_sq = pool_backward(d_avg, x.shape, "AVE", (size, size), (1, 1), (pad, pad))
    d_square_input = power_backward(x, sq, d_sq, 2.0, 1.0, 0.0)
    if magnitude:
        return np.abs(d_product_input) + np.abs(d_square_input)
    return d_product_input + d_square_input


# ---------------------------------------------------------------------------------------
# Neurons
# ---------------------------------------------------------------------------------------
def relu_forward(x, slope=0.0):
    return np.maximum(x, 0) + slope * np.minimum(x, 0)


def relu_backward(x, dy, slope=0.0):
    return dy * ((x > 0) + slope * (x <= 0))


def prelu_forward(x, a):
    a = a.reshape((1, -1) + (1,) * (x.ndim - 2)) if a.ndim else a
    return np.maximum(x, 0) + a * np.minimum(x, 0)


def prelu_backward(x, a, dy):
    """(dx, da): dx = dy * (x > 0 ? 1 : a); da = sum of dy * x where x <= 0 (per channel)."""
    shared = a.ndim == 0
    ab = a if shared else a.reshape((1, -1) + (1,) * (x.ndim - 2))
    dx = dy * ((x > 0) + ab * (x <= 0))
    contrib = dy * x * (x <= 0)
    da = contrib.sum() if shared else contrib.sum(axis=(0,) + tuple(range(2, x.ndim)))
    return dx, np.asarray(da)


def elu_forward(x, alpha):
    return np.where(x > 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1))


def elu_backward(x, y, dy, alpha):
    return dy * ((x > 0) + (alpha + y) * (x <= 0))


def sigmoid_forward(x):
    return 0.5 * np.tanh(0.5 * x) + 0.5


def sigmoid_backward(y, dy):
    return dy * y * (1 - y)


def tanh_backward(y, dy):
    return dy * (1 - y * y)


def absval_backward(x, dy):
    return dy * ((0 < x).astype(float) - (x < 0))


def exp_forward(x, base, scale, shift):
    """base^(shift + scale x), base e for -1."""
    b = math.e if base == -1 else base
    return np.power(b, shift + scale * x)


def exp_backward(y, dy, base, scale):
    return dy * y * (scale * (1.0 if base == -1 else math.log(base)))


def log_forward(x, base, scale, shift):
    y = np.log(shift + scale * x)
    return y if base == -1 else y / math.log(base)


def log_backward(x, dy, base, scale, shift):
    base_scale = 1.0 if base == -1 else 1.0 / math.log(base)
    return dy * scale * base_scale / (shift + scale * x)


def bnll_forward(x):
    """x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x)), as Caffe writes it."""
    out = np.empty_like(x)
    pos = x > 0
    out[pos] = x[pos] + np.log1p(np.exp(-x[pos]))
    out[~pos] = np.log1p(np.exp(x[~pos]))
    return out


def bnll_backward(x, dy):
    e = np.exp(np.minimum(x, 50.0))  # kBNLL_THRESHOLD
    return dy * e / (e + 1)


def threshold_forward(x, threshold):
    return (x > threshold).astype(np.float64)


def softmax_forward(x, axis):
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def softmax_backward(y, dy, axis):
    return (dy - (dy * y).sum(axis=axis, keepdims=True)) * y


# ---------------------------------------------------------------------------------------
# Eltwise (eltwise_layer.cpp)
# ---------------------------------------------------------------------------------------
def eltwise_forward(xs, op, coeffs=None):
    """Returns (top, mask); mask is the MAX winner index per element (Caffe's max_idx_)."""
    if op == "SUM":
        coeffs = coeffs or [1.0] * len(xs)
        top = np.zeros_like(xs[0])
        for c, x in zip(coeffs, xs):
            top += c * x
        return top, None
    if op == "PROD":
        top = xs[0] * xs[1]
        for x in xs[2:]:
            top = top * x
        return top, None
    top, mask = np.empty_like(xs[0]), np.empty(xs[0].shape, dtype=np.int64)
    for idx in np.ndindex(top.shape):
        if xs[0][idx] > xs[1][idx]:
            top[idx], mask[idx] = xs[0][idx], 0
        else:
            top[idx], mask[idx] = xs[1][idx], 1
        for k in range(2, len(xs)):
            if xs[k][idx] > top[idx]:
                top[idx], mask[idx] = xs[k][idx], k
    return top, mask


def eltwise_backward(xs, top, dy, op, coeffs=None, mask=None, stable_prod_grad=True):
    out = []
    for i, x in enumerate(xs):
        if op == "SUM":
            out.append(dy * (coeffs[i] if coeffs else 1.0))
        elif op == "PROD":
            if stable_prod_grad:
                others = [xs[j] for j in range(len(xs)) if j != i]
                d = others[0].copy()
                for o in others[1:]:
                    d = d * o
            else:
                with np.errstate(all="ignore"):
                    d = top / x
            out.append(d * dy)
        else:
            out.append(np.where(mask == i, dy, 0.0))
    return out


# ---------------------------------------------------------------------------------------
# BatchNorm, Scale, Bias
# ---------------------------------------------------------------------------------------
def _channel_view(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2)) if ndim > 1 else v


def batch_norm_forward(x, blobs, eps, use_global_stats, maf=0.999):
    """Returns (top, std, new_blobs). Global: factor = 0 if blob2 == 0 else 1 / blob2."""
    mean_sum, var_sum, factor_blob = (np.array(b, dtype=np.float64) for b in blobs)
    axes = (0,) + tuple(range(2, x.ndim))
    if use_global_stats:
        factor = 0.0 if factor_blob[0] == 0 else 1.0 / factor_blob[0]
        mean, var = factor * mean_sum, factor * var_sum
    else:
        mean = x.mean(axis=axes)
        var = ((x - _channel_view(mean, x.ndim)) ** 2).mean(axis=axes)
        m = x.size // mean.size
        factor_blob = factor_blob * maf + 1
        mean_sum = mean + maf * mean_sum
        var_sum = (m / (m - 1) if m > 1 else 1.0) * var + maf * var_sum
    std = np.sqrt(var + eps)
    top = (x - _channel_view(mean, x.ndim)) / _channel_view(std, x.ndim)
    return top, std, (mean_sum, var_sum, factor_blob)


def batch_norm_backward(top, std, dy, use_global_stats):
    """Caffe: global dy / std; batch (dy - mean(dy) - mean(dy * y) * y) / std."""
    stdv = _channel_view(std, top.ndim)
    if use_global_stats:
        return dy / stdv
    axes = (0,) + tuple(range(2, top.ndim))
    mean_dy = dy.mean(axis=axes, keepdims=True)
    mean_dy_y = (dy * top).mean(axis=axes, keepdims=True)
    return (dy - mean_dy - mean_dy_y * top) / stdv


def _operand_view(operand, axis, ndim):
    return operand.reshape((1,) * axis + operand.shape + (1,) * (ndim - axis - operand.ndim))


def scale_forward(x, scale, axis, bias=None):
    """y = x * scale (+ bias), the operand spanning axes [axis, axis + scale.ndim) of x."""
    axis = 0 if scale.ndim == 0 else axis
    y = x * _operand_view(scale, axis, x.ndim)
    return y if bias is None else y + _operand_view(bias, axis, x.ndim)


def _reduce_to(t, axis, operand_ndim):
    """Sum t over every axis outside [axis, axis + operand_ndim)."""
    keep = set(range(axis, axis + operand_ndim))
    return t.sum(axis=tuple(i for i in range(t.ndim) if i not in keep))


def scale_backward(x, scale, dy, axis):
    """(dx, dscale): dx = dy * scale, dscale = sum of dy * x over the broadcast axes."""
    axis = 0 if scale.ndim == 0 else axis
    return dy * _operand_view(scale, axis, x.ndim), _reduce_to(dy * x, axis, scale.ndim)


def bias_backward(dy, operand_ndim, axis):
    return _reduce_to(dy, 0 if operand_ndim == 0 else axis, operand_ndim)


# ---------------------------------------------------------------------------------------
# Shapes: Flatten, Reshape, Crop, Slice; ArgMax
# ---------------------------------------------------------------------------------------
def reshape_top_shape(shape, dims, axis=0, num_axes=-1):
    """ReshapeLayer::Reshape, step by step."""
    start = axis if axis >= 0 else len(shape) + axis + 1
    end = len(shape) if num_axes == -1 else start + num_axes
    top = list(shape[:start]) + list(dims) + list(shape[end:])
    for i, d in enumerate(dims):
        if d == 0:
            top[start + i] = shape[start + i]
    if -1 in dims:
        known = int(np.prod([t for j, t in enumerate(top) if j != start + list(dims).index(-1)]))
        top[start + list(dims).index(-1)] = int(np.prod(shape)) // known
    return tuple(top)


def crop_forward(x, ref_shape, axis, offsets):
    start = axis % x.ndim
    index = []
    for i in range(x.ndim):
        if i < start:
            index.append(slice(None))
            continue
        off = 0 if not offsets else offsets[0] if len(offsets) == 1 else offsets[i - start]
        index.append(slice(off, off + ref_shape[i]))
    return x[tuple(index)], tuple(index)


def argmax_forward(x, top_k, out_max_val, axis=None):
    """ArgMaxLayer::Forward_cpu: std::partial_sort of (value, index) pairs with std::greater
    (so equal values come in decreasing index order)."""
    if axis is None:
        num, dim, axis_dist = x.shape[0], x.size // x.shape[0], 1
        top_shape = [1] * max(x.ndim, 3)
        top_shape[0], top_shape[1], top_shape[2] = x.shape[0], 2 if out_max_val else 1, top_k
    else:
        dim = x.shape[axis]
        axis_dist = int(np.prod(x.shape[axis:])) // dim
        num = x.size // dim
        top_shape = list(x.shape)
        top_shape[axis] = top_k
    flat, top = x.reshape(-1), np.zeros(int(np.prod(top_shape)))
    for i in range(num):
        pairs = [(flat[(i // axis_dist * dim + j) * axis_dist + i % axis_dist], j) for j in range(dim)]
        pairs.sort(reverse=True)
        for j in range(top_k):
            if out_max_val and axis is None:
                top[2 * i * top_k + j] = pairs[j][1]
                top[2 * i * top_k + top_k + j] = pairs[j][0]
            else:
                value = pairs[j][0] if out_max_val else pairs[j][1]
                top[(i // axis_dist * top_k + j) * axis_dist + i % axis_dist] = value
    return top.reshape(top_shape)


# ---------------------------------------------------------------------------------------
# Harness shared by the tests (torch imported lazily: the references above do not use it)
# ---------------------------------------------------------------------------------------
def rel_err(actual, ref, magnitude=None) -> float:
    """max |actual - ref| / max |ref| (or max |actual| when ref is all zeros).

    ``magnitude`` (optional, same shape) is the same quantity computed from absolute
    values (e.g. |x| * |w| for a product sum): the scale of the terms that were summed.
    When given, the error is relative to the larger of the two maxima, the usual
    rounding-error bound for sums, so cancellation in a tiny result is not mistaken for
    an error of the port.
    """
    a, r = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    assert a.shape == r.shape, f"shape {a.shape} != reference {r.shape}"
    # Caffe's sentinels (NaN from 0/0, +-inf, -FLT_MAX of an empty MAX window) must match
    # exactly and stay out of the scale.
    special = ~np.isfinite(r) | (np.abs(r) == FLT_MAX)
    assert np.array_equal(a[special], r[special], equal_nan=True), \
        f"special values differ: {a[special][:8]} vs {r[special][:8]}"
    a, r = a[~special], r[~special]
    scale = np.abs(r).max() if r.size else 0.0
    if magnitude is not None and r.size:
        scale = max(scale, float(np.abs(np.asarray(magnitude, np.float64)[~special]).max()))
    diff = np.abs(a - r).max() if r.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def f32(a) -> np.ndarray:
    """Round to float32 values, kept as float64 (so float64 runs see exactly the same numbers)."""
    return np.asarray(a, np.float32).astype(np.float64)


def run_layer(layer, bottoms, top_diffs=None, dtype="float64"):
    """Run a port layer: forward in ``dtype``, then backward of ``top_diffs`` (if given).

    Returns (tops, bottom_grads, blob_grads) as float64 arrays; a gradient that autograd
    does not produce is None.
    """
    import torch

    dt = getattr(torch, dtype)
    layer = layer.to(dt)
    for blob in layer.blobs:
        blob.grad = None
    xs = [torch.tensor(np.asarray(b), dtype=dt, requires_grad=True) for b in bottoms]
    tops = layer(*xs)
    if top_diffs is not None:
        pairs = [(t, torch.tensor(np.asarray(d), dtype=dt)) for t, d in zip(tops, top_diffs) if t.requires_grad]
        torch.autograd.backward([t for t, _ in pairs], [d for _, d in pairs])

    def arr(t):
        return None if t is None else t.detach().to(torch.float64).numpy()

    return ([arr(t) for t in tops], [arr(x.grad) for x in xs], [arr(b.grad) for b in layer.blobs])


# How many hypothesis examples each layer property runs (raise it to re-measure tolerances).
EXAMPLES = int(os.environ.get("LAYER_EXAMPLES", "20"))


def log_error(dtype: str, what: str, err: float) -> None:
    """With LAYER_ERRORS_LOG=path set, append one measured error to that file as a JSON line
    (how the float32 tolerances of these tests were measured)."""
    path = os.environ.get("LAYER_ERRORS_LOG")
    if path:
        import json

        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "dtype": dtype, "what": what, "err": err}) + "\n")


def check_layer(text, bottoms, top_diffs, ref_tops, ref_bottom_grads=(), ref_blob_grads=(),
                blobs=None, tol64=1e-10, tol32=1e-5, magnitudes=None):
    """Build the layer from prototxt ``text``, run it in float64 and float32, and compare
    tops, bottom gradients and blob gradients with the references (None: not compared).

    ``magnitudes`` optionally maps ("top" | "bottom diff" | "blob diff", index) to the
    same quantity computed from absolute values (see rel_err).

    ``tol64``/``tol32`` bound rel_err; every measured error goes to ``log_error``.
    """
    from porting.layers import build_layer

    for dtype, tol in (("float64", tol64), ("float32", tol32)):
        layer = build_layer(text, [np.shape(b) for b in bottoms], blobs)
        tops, bottom_grads, blob_grads = run_layer(layer, bottoms, top_diffs, dtype)
        groups = (("top", tops, ref_tops), ("bottom diff", bottom_grads, ref_bottom_grads),
                  ("blob diff", blob_grads, ref_blob_grads))
        for what, got, refs in groups:
            for i, ref in enumerate(refs):
                if ref is None:
                    continue
                assert got[i] is not None, f"{dtype}: {what} {i} has no gradient"
                err = rel_err(got[i], ref, (magnitudes or {}).get((what, i)))
                log_error(dtype, f"{what} {i}", err)
                assert err <= tol, f"{dtype}: {what} {i} rel err {err:.3g} > {tol:g}\n{text}"
