"""Total-variation denoising by split Bregman, as MFV calls it after every step.

MFV calls ``skimage.restoration.denoise_tv_bregman(img, weight=w, max_iter=100,
eps=1e-3)`` on a float64 RGB image, height x width x 3, values 0-255 (not 0-1:
``img_as_float`` leaves float64 input untouched).

``denoise_tv_bregman_0131_batch`` is our own implementation of scikit-image 0.13.1's
algorithm (``skimage/restoration/_denoise_cy.pyx``, isotropic case) in torch, batched
over images, on the images' device and in their dtype; ``denoise_tv_bregman_0131`` is
its one-image NumPy face, and ``denoise_tv_bregman_0131_numpy`` the plain NumPy
version of the same sweep, kept as the reference the tests compare with. They exist because
today's scikit-image differs: from 0.15 on, the ring of padding the Gauss-Seidel
sweeps read holds ``image[-1]`` / ``image[:, -1]`` on the bottom and right edges,
where 0.13.1 holds ``image[-2]`` / ``image[:, -2]`` (a mirror without the edge, as on
the top and left). ``padding="edge"`` gives today's ring, which lets tests check this
implementation against today's compiled scikit-image on full-size images.

How it is vectorised. One sweep of 0.13.1 visits the pixels in row-major order,
updating in place. The split variables (d, b) of a pixel depend only on values
from the previous sweep (the pixel itself and its right and lower neighbours are not
yet updated when it is visited), so they are computed for all pixels at once. What is
left is the recurrence ``u[r, c] = a * (u[r-1, c] + u[r, c-1]) + B[r, c]`` with
``a = lam / norm = 2/9``, which runs anti-diagonal by anti-diagonal (each one depends
only on the previous one). All arrays are stored in a wrapped anti-diagonal layout,
storage row ``(r + c) mod (cols + 2)``, position ``r``: every anti-diagonal is a
contiguous run, the four neighbours of all pixels are plain shifted slices (one
mirrored storage row at each end closes the wrap), and no cell is wasted. A sweep is
about 25 whole-array operations plus 3 per anti-diagonal. The sums are associated
differently from the Cython loop, so results match 0.13.1 to rounding (about 1e-13
on the 0-255 scale; the tests hold the measured bound), not bit for bit. The torch
sweep does the same with the N * dims planes of a batch on the last axis (about 20
whole-array operations plus 2 per anti-diagonal, whatever N): the plain version, for
CUDA and float32.

The fused sweep. On the CPU in float64 a batch runs by default on a small C function
(``fused_sweep``, compiled once with the machine's C compiler, loaded with ctypes):
0.13.1's whole loop, sweeps and stopping test, as its Cython reads, pixel by pixel,
with several images (or planes) innermost so the compiler vectorises across them,
without fused multiply-add. The batch is split into one group of whole images per
thread, each in arrays of its own. Its values are 0.13.1's bit for bit (the tests
check against the real 0.13.1), and so is its stopping test (the sum of squared changes
is 0.13.1's running sum, added in its order). Speed: benchmarks/bench_tv.py. Without a
compiler the torch sweep runs instead.

Importable by Python 2.7 with numpy 1.11 (no annotations, no f-strings).
"""
from __future__ import division

import math

import numpy as np

PADDINGS = ("reflect", "edge")


def _padded(image, padding):
    """The (rows+2, cols+2, dims) array u starts as: image inside, a ring of padding, zero corners."""
    rows, cols = image.shape[:2]
    u = np.zeros((rows + 2, cols + 2, image.shape[2]))
    u[1:-1, 1:-1] = image
    u[0, 1:-1] = image[1, :]
    u[1:-1, 0] = image[:, 1]
    last = -2 if padding == "reflect" else -1
    u[-1, 1:-1] = image[last, :]
    u[1:-1, -1] = image[:, last]
    return u


class _Wrapped(object):
    """The wrapped anti-diagonal layout of a (h, w, dims) grid.

    Cell (r, c) is stored at [t, r + 1] of a (w + 2, h + 2, dims) array, with storage
    row t = (r + c) mod w + 1. Rows 0 and w + 1 mirror rows w and 1; columns 0 and
    h + 1 are spare. Then for the core block [1:w+1, 1:h+1] (every cell once):
    right (r, c+1) is [2:w+2, 1:h+1], down (r+1, c) [2:w+2, 2:h+2], left (r, c-1)
    [0:w, 1:h+1] and up (r-1, c) [0:w, 0:h].
    """

    def __init__(self, h, w, dims):
        self.h, self.w, self.dims = h, w, dims
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        self.rows = ((r + c) % w + 1).ravel()
        self.cols = (r + 1).ravel()

    def empty(self):
        return np.zeros((self.w + 2, self.h + 2, self.dims))

    def put(self, grid, into):
        into[self.rows, self.cols] = grid.reshape(-1, self.dims)
        self.mirror(into)
        return into

    def take(self, stored):
        return stored[self.rows, self.cols].reshape(self.h, self.w, self.dims)

    def mirror(self, stored):
        stored[0] = stored[self.w]
        stored[self.w + 1] = stored[1]

    def core(self, stored):
        return stored[1:self.w + 1, 1:self.h + 1]

    def right(self, stored):
        return stored[2:self.w + 2, 1:self.h + 1]

    def down(self, stored):
        return stored[2:self.w + 2, 2:self.h + 2]

    def left(self, stored):
        return stored[0:self.w, 1:self.h + 1]

    def up(self, stored):
        return stored[0:self.w, 0:self.h]

    def diagonal(self, stored, d, lo, hi):
        """Cells r in [lo, hi) of anti-diagonal d = r + c, flattened (a view)."""
        t = d % self.w + 1
        return stored[t, lo + 1:hi + 1].reshape(-1)


def denoise_tv_bregman_0131_numpy(image, weight, max_iter=100, eps=1e-3, padding="reflect"):
    """Isotropic split-Bregman TV denoising with scikit-image 0.13.1's semantics.

    image: (rows, cols) or (rows, cols, dims), any real dtype, used as float64 as is
    (no rescaling). Returns float64 of the input's shape (squeezed, as skimage does).
    Stops after ``max_iter`` sweeps or when the root mean square change of a sweep is
    at most ``eps`` (in the image's own units).
    """
    if padding not in PADDINGS:
        raise ValueError("padding must be one of %s, not %r" % (PADDINGS, padding))
    image = np.atleast_3d(np.asarray(image, dtype=np.float64))
    rows, cols, dims = image.shape
    if rows < 2 or cols < 2:
        raise ValueError("image must be at least 2x2, got %dx%d" % (rows, cols))
    weight = float(weight)
    if not weight > 0:
        raise ValueError("weight must be positive (0.13.1 divides by it), got %r" % (weight,))
    lam = 2 * weight
    norm = weight + 4 * lam
    a = lam / norm
    total = rows * cols * dims

    layout = _Wrapped(rows + 2, cols + 2, dims)
    u = layout.put(_padded(image, padding), layout.empty())   # the ring stays as set here
    grid = np.zeros((rows + 2, cols + 2, dims))
    grid[1:-1, 1:-1] = weight * image / norm
    fidelity = layout.core(layout.put(grid, layout.empty())).copy()
    grid[...] = 0.0
    grid[1:-1, 1:-1] = 1.0
    inside = layout.core(layout.put(grid, layout.empty())).copy()   # 1 on pixels, 0 on the ring
    minus_two_inside = -2.0 * inside
    # e = d - b, kept 0 on the ring (as d and b's rings stay 0 in Cython); b may hold
    # harmless values on ring cells: only the ring's own (masked) e would read them
    ex, ey = layout.empty(), layout.empty()
    shape = fidelity.shape
    bx, by, before, tx, ty, s, p, rhs = (np.zeros(shape) for _ in range(8))
    u_here, u_right, u_down = layout.core(u), layout.right(u), layout.down(u)
    ex_here, ey_here = layout.core(ex), layout.core(ey)
    ex_left, ey_up = layout.left(ex), layout.up(ey)

    # per anti-diagonal: views of the upper and left neighbours (anti-diagonal d - 1),
    # the right-hand side, the cells themselves and a scratch buffer, made once: the
    # per-diagonal Python overhead is what this loop costs
    rhs_full = layout.empty()
    rhs_here = layout.core(rhs_full)
    buf = np.empty(rows * dims)
    steps = []
    for d in range(2, rows + cols + 1):
        lo, hi = max(1, d - cols), min(rows, d - 1) + 1
        steps.append((layout.diagonal(u, d - 1, lo - 1, hi - 1), layout.diagonal(u, d - 1, lo, hi),
                      layout.diagonal(rhs_full, d, lo, hi), layout.diagonal(u, d, lo, hi),
                      buf[: (hi - lo) * dims]))
    add, subtract, multiply = np.add, np.subtract, np.multiply

    sweeps = 0
    rmse = np.inf
    while sweeps < max_iter and rmse > eps:
        before[...] = u_here
        # split variables from the previous sweep's state, all cells at once
        subtract(u_right, u_here, tx)
        tx += bx                          # u_x + b_x
        subtract(u_down, u_here, ty)
        ty += by                          # u_y + b_y
        multiply(tx, tx, s)
        multiply(ty, ty, p)
        s += p
        np.sqrt(s, s)
        s *= lam                          # s * lam
        s += 1.0
        np.divide(1.0, s, p)              # 1 - q, where d = q * (u' + b), q = s lam / (s lam + 1)
        multiply(tx, p, bx)               # new b = b + u' - d = (1 - q) * (u' + b)
        multiply(ty, p, by)
        multiply(p, minus_two_inside, p)
        p += inside                       # d - b = (2q - 1) * (u' + b), 0 on the ring
        # right-hand side of the u update: all but the two freshly updated neighbours
        add(u_down, u_right, rhs)
        rhs -= ex_here                    # -(d - b) of this pixel, previous sweep
        rhs -= ey_here
        multiply(tx, p, ex_here)
        multiply(ty, p, ey_here)
        layout.mirror(ex)
        layout.mirror(ey)
        rhs += ex_left                    # d_x - b_x of the left neighbour, this sweep
        rhs += ey_up                      # d_y - b_y of the upper neighbour, this sweep
        rhs *= a
        add(rhs, fidelity, rhs_here)
        # Gauss-Seidel: u[r, c] = a * (u[r-1, c] + u[r, c-1]) + rhs, anti-diagonal by anti-diagonal
        for up, left, right_hand, cells, scratch in steps:
            add(up, left, scratch)
            multiply(scratch, a, scratch)
            add(scratch, right_hand, cells)
        layout.mirror(u)
        change = subtract(u_here, before, rhs)   # rhs is free again
        change *= change                          # (np.dot would wake BLAS threads: slower here)
        rmse = math.sqrt(change.sum() / total)
        sweeps += 1
    return np.squeeze(layout.take(u)[1:-1, 1:-1])


def _padded_torch(images, padding):
    """(..., rows+2, cols+2, K) from (..., rows, cols, K): image inside, the ring, zero corners."""
    rows, cols, k = images.shape[-3:]
    u = images.new_zeros(images.shape[:-3] + (rows + 2, cols + 2, k))
    u[..., 1:-1, 1:-1, :] = images
    u[..., 0, 1:-1, :] = images[..., 1, :, :]
    u[..., 1:-1, 0, :] = images[..., :, 1, :]
    last = -2 if padding == "reflect" else -1
    u[..., -1, 1:-1, :] = images[..., last, :, :]
    u[..., 1:-1, -1, :] = images[..., :, last, :]
    return u


# 0.13.1's isotropic loop, whole (sweeps and stopping test), written as its Cython is, for
# a group of images laid out as ``blocks`` x (rows+2) x (cols+2) x ``lanes``: the lanes
# of a pixel are innermost so the compiler vectorises across them. Two layouts (chosen
# by _denoise_fused): images as lanes and planes as blocks, or one block with every
# (image, plane) as a lane. Compiled without contraction into fused multiply-add
# (-ffp-contract=off) and without fast-math, every value is the Cython loop's own IEEE
# arithmetic (SIMD sqrt and division are correctly rounded too): u is 0.13.1's bit for
# bit. So is the stopping test: 0.13.1 adds an image's squared changes to one running sum,
# plane after plane, each plane row-major. A lane's running sum follows its plane(s) in
# that order, so with images as lanes (planes one block after another) it is the image's
# sum itself; with an image's planes as lanes, the first plane's lane gives the sum's
# start and the other planes' squared changes, kept in ``chain`` during the sweep, are
# added to it after the sweep, plane after plane.
_SWEEP_C = r"""
#include <float.h>
#include <math.h>
#ifdef MFV_CLONES
__attribute__((target_clones("avx2", "default")))   /* AVX2 where the CPU has it: 4 doubles a step */
#endif
void tv_denoise(double *restrict u, double *restrict dx, double *restrict dy,
                double *restrict bx, double *restrict by, const double *restrict image,
                const double *restrict weight, const long *restrict owner, long images,
                long blocks, long rows, long cols, long L, long total, long max_iter,
                double eps, long *restrict sweeps, double *restrict chain)
{
    /* u, dx, dy, bx, by: blocks x (rows+2) x (cols+2) x L, u's ring set by the caller and
       the others zero; image: blocks x rows x cols x L; weight[g] > 0 and owner[g] (the
       image of lane g, -1 for a padding lane; an image's lanes are its planes in order)
       for L lanes; sweeps[j]: sweeps image j ran; chain: rows x cols x L scratch where an
       image has several lanes (one block), else NULL */
    double lam[L], norm[L], keep[L], acc[L], rmse[images];
    const long W = (cols + 2) * L, plane = (rows + 2) * W;
    for (long g = 0; g < L; g++) {
        lam[g] = 2 * weight[g];
        norm[g] = weight[g] + 4 * lam[g];
    }
    for (long j = 0; j < images; j++) {
        rmse[j] = DBL_MAX;
        sweeps[j] = 0;
    }
    for (long i = 0; i < max_iter; i++) {
        int any = 0;
        for (long j = 0; j < images; j++) any |= rmse[j] > eps;
        if (!any) break;
        for (long g = 0; g < L; g++) {
            keep[g] = owner[g] >= 0 && rmse[owner[g]] > eps ? 1.0 : 0.0;   /* 1: sweep, 0: u stays */
            acc[g] = 0.0;
        }
        for (long b = 0; b < blocks; b++) {
            double *restrict ub = u + b * plane, *restrict dxb = dx + b * plane, *restrict dyb = dy + b * plane;
            double *restrict bxb = bx + b * plane, *restrict byb = by + b * plane;
            const double *restrict imb = image + b * rows * cols * L;
            for (long r = 1; r <= rows; r++) {
                for (long c = 1; c <= cols; c++) {
                    const long p = r * W + c * L;
                    const double *img = imb + ((r - 1) * cols + (c - 1)) * L;
#pragma GCC ivdep
                    for (long g = 0; g < L; g++) {
                        const long q = p + g;
                        const double uprev = ub[q];
                        const double ux = ub[q + L] - uprev;
                        const double uy = ub[q + W] - uprev;
                        double unew = (lam[g] * (+ub[q + W] + ub[q - W] + ub[q + L] + ub[q - L]
                                                 + dxb[q - L] - dxb[q] + dyb[q - W] - dyb[q]
                                                 - bxb[q - L] + bxb[q] - byb[q - W] + byb[q])
                                       + weight[g] * img[g]) / norm[g];
                        unew = keep[g] * unew + (1 - keep[g]) * uprev;   /* exact either way */
                        ub[q] = unew;
                        const double t = unew - uprev;
                        acc[g] += t * t;
                        if (chain) chain[((r - 1) * cols + (c - 1)) * L + g] = t * t;
                        const double tx = ux + bxb[q], ty = uy + byb[q];
                        const double s = sqrt(tx * tx + ty * ty);
                        const double dxx = s * lam[g] * tx / (s * lam[g] + 1);
                        const double dyy = s * lam[g] * ty / (s * lam[g] + 1);
                        dxb[q] = dxx;
                        dyb[q] = dyy;
                        bxb[q] += ux - dxx;
                        byb[q] += uy - dyy;
                    }
                }
            }
        }
        for (long j = 0; j < images; j++) {
            if (!(rmse[j] > eps)) continue;
            double sum = 0.0;
            int first = 1;
            for (long g = 0; g < L; g++) {
                if (owner[g] != j) continue;
                if (first) sum = acc[g];   /* the running sum through the first plane */
                else
                    for (long k = 0; k < rows * cols; k++) sum += chain[k * L + g];
                first = 0;
            }
            rmse[j] = sqrt(sum / total);
            sweeps[j]++;
        }
    }
}
"""
_SWEEP_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
# tried in this order: with AVX2 clones (GCC and Clang on glibc), then plain
_SWEEP_OPTIONS = (["-DMFV_CLONES"], [])
_sweep = []   # [the ctypes function, or None where no C compiler works], filled on first use


def fused_sweep():
    """The compiled C loop (a ctypes function: 0.13.1's sweeps and stopping test for a
    group of images), or None where it cannot be built.

    Built once per machine with ``$CC`` (default ``cc``) into ``$XDG_CACHE_HOME/mfv`` (or
    ``~/.cache/mfv``), named by a hash of source and flags; written under a temporary
    name and renamed, so no half-written library is ever loaded.
    """
    if not _sweep:
        _sweep.append(_build_sweep())
    return _sweep[0]


def _build_sweep():
    import ctypes
    import hashlib
    import os
    import subprocess
    import tempfile

    cc = os.environ.get("CC", "cc")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mfv")
    for options in _SWEEP_OPTIONS:
        command = [cc] + _SWEEP_FLAGS + options
        key = hashlib.sha256((_SWEEP_C + " ".join(command)).encode("utf-8")).hexdigest()[:16]
        target = os.path.join(cache, "tv_denoise_%s.so" % key)
        try:
            if not os.path.exists(target):
                if not os.path.isdir(cache):
                    os.makedirs(cache)
                work = tempfile.mkdtemp(dir=cache)
                try:
                    source = os.path.join(work, "tv_denoise.c")
                    with open(source, "w") as f:
                        f.write(_SWEEP_C)
                    built = os.path.join(work, "tv_denoise.so")
                    subprocess.check_call(command + ["-o", built, source],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    os.replace(built, target)
                finally:
                    for name in os.listdir(work):
                        os.remove(os.path.join(work, name))
                    os.rmdir(work)
            function = ctypes.CDLL(target).tv_denoise
        except (OSError, subprocess.CalledProcessError):
            continue
        function.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_long] * 7 + [ctypes.c_double] + [ctypes.c_void_p] * 2
        function.restype = None
        return function
    return None


LANES = 4   # doubles in an AVX2 vector: a group of at least this many images runs images as lanes


def _denoise_group(images, weights, max_iter, eps, padding, loop):
    """One group (M, rows, cols, dims) float64 CPU tensor, float64 weights (M,), through the C
    loop in its own arrays; returns (denoised, sweeps). At least ``LANES`` images: the
    images are the lanes and the planes the blocks. Fewer: one block, the M * dims planes
    as lanes, padded to a whole vector (a scratch of one more array keeps the squared
    changes of every plane after the first for the running sum). Either way values and
    stopping test are 0.13.1's bit for bit."""
    import torch

    m, rows, cols, dims = images.shape
    if m >= LANES:
        planes = images.permute(3, 1, 2, 0)                                 # (dims, rows, cols, M)
        owner = torch.arange(m)
        lane_weights = weights
    else:
        lanes = -(-m * dims // LANES) * LANES
        planes = torch.nn.functional.pad(images.permute(1, 2, 0, 3).reshape(1, rows, cols, m * dims),
                                         (0, lanes - m * dims))
        owner = torch.nn.functional.pad(torch.arange(m).repeat_interleave(dims), (0, lanes - m * dims), value=-1)
        lane_weights = torch.nn.functional.pad(weights.repeat_interleave(dims), (0, lanes - m * dims), value=1.0)
    planes = planes.contiguous()
    u = _padded_torch(planes, padding).contiguous()
    dx, dy, bx, by = (torch.zeros_like(u) for _ in range(4))
    owner = owner.contiguous()
    lane_weights = lane_weights.contiguous()
    sweeps = torch.zeros(m, dtype=torch.long)
    blocks, _, _, width = planes.shape
    chain = torch.empty(rows * cols * width if m < LANES and dims > 1 else 0, dtype=torch.float64)
    loop(u.data_ptr(), dx.data_ptr(), dy.data_ptr(), bx.data_ptr(), by.data_ptr(), planes.data_ptr(),
         lane_weights.data_ptr(), owner.data_ptr(), m, blocks, rows, cols, width, rows * cols * dims,
         max_iter, eps, sweeps.data_ptr(), chain.data_ptr() if chain.numel() else None)
    core = u[:, 1:-1, 1:-1, :]
    if m >= LANES:
        return core.permute(3, 1, 2, 0), sweeps
    return core[0, :, :, :m * dims].reshape(rows, cols, m, dims).permute(2, 0, 1, 3), sweeps


def _denoise_fused(images, weights, max_iter, eps, padding, loop):
    """The batch (N, rows, cols, dims) float64 CPU tensor on the C loop: split by whole
    images into one group per torch intra-op thread, each group in arrays of its own
    (threads sharing the lanes of one array fight over its cache lines) and run to its
    end without returning to Python (ctypes lets go of the GIL during a call)."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    n = images.shape[0]
    parts = max(1, min(torch.get_num_threads(), n))
    groups = [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]

    def run(bounds):
        lo, hi = bounds
        return _denoise_group(images[lo:hi], weights[lo:hi], max_iter, eps, padding, loop)

    if parts == 1:
        results = [run(groups[0])]
    else:
        with ThreadPoolExecutor(parts) as pool:
            results = list(pool.map(run, groups))
    return torch.cat([out for out, _ in results]), torch.cat([sweeps for _, sweeps in results])


def denoise_tv_bregman_0131_batch(images, weights, max_iter=100, eps=1e-3, padding="reflect", fused=None):
    """Split-Bregman TV of a batch of images at once, in torch: 0.13.1's algorithm.

    images: tensor (N, rows, cols, dims), values as they are (0-255 in MFV); computed in
    its own dtype (float64 for the faithful algorithm; float32 allowed; other dtypes are
    taken as float64) and on its own device. weights: N positive numbers (a sequence or a
    tensor), one per image. Each image is one 0.13.1 call: its dims channels share one
    stopping test (root mean square change of a sweep over rows * cols * dims values at
    most ``eps``, or ``max_iter`` sweeps), and an image that has stopped keeps its value
    while the others sweep on (its u is restored after each later sweep; images never
    mix). Returns (denoised tensor of the input's shape, sweeps: int64 tensor (N,), the
    sweeps each image ran).

    Same layout and arithmetic as the NumPy reference ``denoise_tv_bregman_0131_numpy``
    (the module docstring): the N * dims channels are the last axis of the wrapped
    anti-diagonal layout, so every operation of a sweep serves the whole batch and a
    sweep costs ~20 whole-array operations plus 2 per anti-diagonal whatever N is.

    fused: None (default) runs float64 CPU batches on the compiled C loop
    (``fused_sweep``: 0.13.1's loop itself, values bit for bit, several times faster;
    split by whole images between torch's intra-op threads) when it can be built, else
    on the torch sweep; True insists on the C loop (ValueError where it cannot run);
    False always runs the torch sweep, the plain version (the one for CUDA and float32).
    The stopping test: on the C loop, 0.13.1's own running sum, bit for bit; on the torch
    sweep, per-plane sums added over planes, which part from 0.13.1's single running sum
    only by rounding (~1e-16 relative).
    """
    import torch

    if padding not in PADDINGS:
        raise ValueError("padding must be one of %s, not %r" % (PADDINGS, padding))
    if images.dim() != 4:
        raise ValueError("images must be N x rows x cols x dims, got shape %s" % (tuple(images.shape),))
    if not images.is_floating_point():
        images = images.to(torch.float64)
    n, rows, cols, dims = images.shape
    if rows < 2 or cols < 2:
        raise ValueError("image must be at least 2x2, got %dx%d" % (rows, cols))
    dtype, device = images.dtype, images.device
    weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).to(device)
    if weights.numel() != n:
        raise ValueError("one weight per image: %d images, %d weights" % (n, weights.numel()))
    if not bool((weights > 0).all()):
        raise ValueError("weights must be positive (0.13.1 divides by them)")
    sweep = None
    if fused is not False and device.type == "cpu" and dtype == torch.float64:
        sweep = fused_sweep()
    if fused and sweep is None:
        raise ValueError("the fused sweep runs float64 on the CPU with a C compiler; "
                         "got %s on %s%s" % (dtype, device, "" if fused_sweep() else ", no compiler"))
    if sweep is not None:
        out, sweeps = _denoise_fused(images, weights, max_iter, eps, padding, sweep)
        return out.contiguous(), sweeps
    k = n * dims
    weight = weights.repeat_interleave(dims).to(dtype)     # (K,), channel j of image i at i * dims + j
    flat = images.permute(1, 2, 0, 3).reshape(rows, cols, k)
    lam = 2 * weight
    norm = weight + 4 * lam
    a = lam / norm                                         # 2/9 up to rounding, per image as in the reference
    total = rows * cols * dims
    h, w = rows + 2, cols + 2                              # the padded grid

    r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    srows = ((r + c) % w + 1).reshape(-1)
    scols = (r + 1).reshape(-1)

    def empty():
        return images.new_zeros((w + 2, h + 2, k))

    def mirror(stored):
        stored[0] = stored[w]
        stored[w + 1] = stored[1]

    def put(grid, into):
        into[srows, scols] = grid.reshape(-1, k)
        mirror(into)
        return into

    def core(s):
        return s[1:w + 1, 1:h + 1]

    def right(s):
        return s[2:w + 2, 1:h + 1]

    def down(s):
        return s[2:w + 2, 2:h + 2]

    def left(s):
        return s[0:w, 1:h + 1]

    def up(s):
        return s[0:w, 0:h]

    def diagonal(s, d, lo, hi):
        return s[d % w + 1, lo + 1:hi + 1].reshape(-1)

    u = put(_padded_torch(flat, padding), empty())
    grid = images.new_zeros((h, w, k))
    grid[1:-1, 1:-1] = weight * flat / norm
    fidelity = core(put(grid, empty())).clone()
    grid.zero_()
    grid[1:-1, 1:-1] = 1.0
    inside = core(put(grid, empty())).clone()
    minus_two_inside = -2.0 * inside
    ex, ey = empty(), empty()
    shape = fidelity.shape
    bx, by, before, tx, ty, s, p, rhs = (images.new_zeros(shape) for _ in range(8))
    u_here, u_right, u_down = core(u), right(u), down(u)
    ex_here, ey_here = core(ex), core(ey)
    ex_left, ey_up = left(ex), up(ey)
    rhs_full = empty()
    rhs_here = core(rhs_full)
    buf = images.new_empty(rows * k)
    a_runs = a.repeat(rows)                                # a for every cell of the longest anti-diagonal
    steps = []
    for d in range(2, rows + cols + 1):
        lo, hi = max(1, d - cols), min(rows, d - 1) + 1
        steps.append((diagonal(u, d - 1, lo - 1, hi - 1), diagonal(u, d - 1, lo, hi),
                      diagonal(rhs_full, d, lo, hi), diagonal(u, d, lo, hi),
                      buf[: (hi - lo) * k], a_runs[: (hi - lo) * k]))

    sweeps = torch.zeros(n, dtype=torch.int64, device=device)
    rmse = torch.full((n,), float("inf"), dtype=dtype, device=device)
    for _ in range(max_iter):
        running = rmse > eps                               # (N,): 0.13.1's loop test, per image
        if not bool(running.any()):
            break
        before.copy_(u_here)
        torch.sub(u_right, u_here, out=tx)
        tx += bx
        torch.sub(u_down, u_here, out=ty)
        ty += by
        torch.hypot(tx, ty, out=s)                         # s (to 1 ulp of sqrt(tx^2 + ty^2))
        s *= lam
        s += 1.0
        torch.reciprocal(s, out=p)                         # 1 - q
        torch.mul(tx, p, out=bx)
        torch.mul(ty, p, out=by)
        torch.addcmul(inside, p, minus_two_inside, out=p)  # 2q - 1, 0 on the ring
        torch.add(u_down, u_right, out=rhs)
        rhs -= ex_here
        rhs -= ey_here
        torch.mul(tx, p, out=ex_here)
        torch.mul(ty, p, out=ey_here)
        mirror(ex)
        mirror(ey)
        rhs += ex_left
        rhs += ey_up
        torch.addcmul(fidelity, rhs, a, out=rhs_here)
        for up_, left_, right_hand, cells, scratch, a_run in steps:
            torch.add(up_, left_, out=scratch)
            torch.addcmul(right_hand, scratch, a_run, out=cells)
        if not bool(running.all()):                        # stopped images keep their u
            keep = running.repeat_interleave(dims)
            u_here.copy_(torch.where(keep, u_here, before))
        mirror(u)
        torch.sub(u_here, before, out=rhs)
        rhs *= rhs
        sums = rhs.sum(dim=(0, 1)).reshape(n, dims).sum(dim=1)
        rmse = torch.where(running, torch.sqrt(sums / total), rmse)
        sweeps += running.to(torch.int64)
    out = core(u)[srows - 1, scols - 1].reshape(h, w, k)[1:-1, 1:-1]
    return out.reshape(rows, cols, n, dims).permute(2, 0, 1, 3).contiguous(), sweeps


def denoise_tv_bregman_0131(image, weight, max_iter=100, eps=1e-3, padding="reflect", fused=None):
    """One image (rows, cols) or (rows, cols, dims), NumPy in and out, through the torch
    batch version (a batch of one, float64, CPU). Same contract as the NumPy reference."""
    import torch

    image = np.atleast_3d(np.asarray(image, dtype=np.float64))
    out, _ = denoise_tv_bregman_0131_batch(torch.from_numpy(image)[None], [float(weight)],
                                           max_iter=max_iter, eps=eps, padding=padding, fused=fused)
    return np.squeeze(out[0].numpy())


def denoise_tv_bregman_modern(image, weight, max_iter=100, eps=1e-3):
    """Today's scikit-image, called as a naive port of the 2016 call would call it."""
    from skimage.restoration import denoise_tv_bregman

    return denoise_tv_bregman(np.asarray(image, dtype=np.float64), weight=weight,
                              max_num_iter=max_iter, eps=eps)


def denoise(image, weight, mode="faithful"):
    """MFV's denoising call (max_iter=100, eps=1e-3) in the given mode.

    image: float64 RGB, height x width x 3, 0-255. mode: "faithful" (scikit-image
    0.13.1's algorithm, our torch implementation, float64 on the CPU) or "modern"
    (today's scikit-image).
    """
    if mode == "faithful":
        return denoise_tv_bregman_0131(image, weight, max_iter=100, eps=1e-3)
    if mode == "modern":
        return denoise_tv_bregman_modern(image, weight, max_iter=100, eps=1e-3)
    raise ValueError("mode must be 'faithful' or 'modern', not %r" % (mode,))
