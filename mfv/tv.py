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
0.13.1's loop as its Cython reads, pixel by pixel, the planes of the batch innermost so
the compiler vectorises across them, without fused multiply-add. Its values are
0.13.1's bit for bit (the tests check against the real 0.13.1), and it is 3-4 times
faster per image than the NumPy sweep (benchmarks/bench_tv.py). Without a compiler the
torch sweep runs instead.

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
    """(rows+2, cols+2, K) from (rows, cols, K): image inside, the ring, zero corners."""
    rows, cols, k = images.shape
    u = images.new_zeros((rows + 2, cols + 2, k))
    u[1:-1, 1:-1] = images
    u[0, 1:-1] = images[1, :]
    u[1:-1, 0] = images[:, 1]
    last = -2 if padding == "reflect" else -1
    u[-1, 1:-1] = images[last, :]
    u[1:-1, -1] = images[:, last]
    return u


# One Gauss-Seidel sweep of 0.13.1's isotropic loop, written as its Cython is, with the
# (image, channel) planes interleaved on the innermost axis so the compiler vectorises
# across them. Compiled without contraction into fused multiply-add (-ffp-contract=off)
# and without fast-math, every value is the Cython loop's own IEEE arithmetic (SIMD
# sqrt and division are correctly rounded too): the sweep is bit for bit 0.13.1's.
_SWEEP_C = r"""
#include <math.h>
#ifdef MFV_CLONES
__attribute__((target_clones("avx2", "default")))   /* AVX2 where the CPU has it: 4 doubles a step */
#endif
void tv_sweep(double *restrict u, double *restrict dx, double *restrict dy,
              double *restrict bx, double *restrict by, const double *restrict image,
              const double *restrict lam, const double *restrict weight,
              const double *restrict norm, const double *restrict keep,
              double *restrict sq, long rows, long cols, long K, long k0, long k1)
{
    /* planes k0 <= k < k1 of K; u, dx, dy, bx, by: (rows+2) x (cols+2) x K; image:
       rows x cols x K; keep[k] 1 (sweep) or 0 (u stays); sq[k]: sum of squared changes */
    const long W = (cols + 2) * K;
    for (long k = k0; k < k1; k++) sq[k] = 0.0;
    for (long r = 1; r <= rows; r++) {
        for (long c = 1; c <= cols; c++) {
            const long i = r * W + c * K;
            const double *img = image + ((r - 1) * cols + (c - 1)) * K;
#pragma GCC ivdep
            for (long k = k0; k < k1; k++) {
                const double uprev = u[i + k];
                const double ux = u[i + K + k] - uprev;
                const double uy = u[i + W + k] - uprev;
                double unew = (lam[k] * (+u[i + W + k] + u[i - W + k] + u[i + K + k] + u[i - K + k]
                                         + dx[i - K + k] - dx[i + k] + dy[i - W + k] - dy[i + k]
                                         - bx[i - K + k] + bx[i + k] - by[i - W + k] + by[i + k])
                               + weight[k] * img[k]) / norm[k];
                unew = keep[k] * unew + (1 - keep[k]) * uprev;   /* exact either way */
                u[i + k] = unew;
                const double t = unew - uprev;
                sq[k] += t * t;
                const double tx = ux + bx[i + k], ty = uy + by[i + k];
                const double s = sqrt(tx * tx + ty * ty);
                const double dxx = s * lam[k] * tx / (s * lam[k] + 1);
                const double dyy = s * lam[k] * ty / (s * lam[k] + 1);
                dx[i + k] = dxx;
                dy[i + k] = dyy;
                bx[i + k] += ux - dxx;
                by[i + k] += uy - dyy;
            }
        }
    }
}
"""
_SWEEP_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
# tried in this order: with AVX2 clones (GCC and Clang on glibc), then plain
_SWEEP_OPTIONS = (["-DMFV_CLONES"], [])
_sweep = []   # [the ctypes function, or None where no C compiler works], filled on first use


def fused_sweep():
    """The compiled C sweep (a ctypes function), or None where it cannot be built.

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
        target = os.path.join(cache, "tv_sweep_%s.so" % key)
        try:
            if not os.path.exists(target):
                if not os.path.isdir(cache):
                    os.makedirs(cache)
                work = tempfile.mkdtemp(dir=cache)
                try:
                    source = os.path.join(work, "tv_sweep.c")
                    with open(source, "w") as f:
                        f.write(_SWEEP_C)
                    built = os.path.join(work, "tv_sweep.so")
                    subprocess.check_call(command + ["-o", built, source],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    os.replace(built, target)
                finally:
                    for name in os.listdir(work):
                        os.remove(os.path.join(work, name))
                    os.rmdir(work)
            function = ctypes.CDLL(target).tv_sweep
        except (OSError, subprocess.CalledProcessError):
            continue
        function.argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_long] * 5
        function.restype = None
        return function
    return None


def _denoise_fused(flat, weight, n, dims, max_iter, eps, padding, sweep):
    """The batch loop of ``denoise_tv_bregman_0131_batch`` on the C sweep: flat is the
    (rows, cols, K) float64 CPU tensor of the N images' planes, weight (K,)."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    rows, cols, planes = flat.shape
    # planes rounded up to a multiple of 4 (whole SIMD vectors, no scalar tail: one RGB
    # image sweeps ~20 % faster); the extra planes hold zeros and stay zero (keep 0)
    k = -(-planes // 4) * 4
    flat = torch.nn.functional.pad(flat, (0, k - planes)).contiguous()
    u = _padded_torch(flat, padding).contiguous()
    dx, dy, bx, by = (torch.zeros_like(u) for _ in range(4))
    weight = torch.nn.functional.pad(weight, (0, k - planes), value=1.0).contiguous()
    lam = 2 * weight
    norm = weight + 4 * lam
    keep = torch.zeros(k, dtype=torch.float64)
    sq = torch.zeros(k, dtype=torch.float64)
    pointers = [t.data_ptr() for t in (u, dx, dy, bx, by, flat, lam, weight, norm, keep, sq)]
    # whole images to each thread (ctypes lets go of the GIL during a call)
    parts = max(1, min(torch.get_num_threads(), n))
    bounds = [(i * n // parts * dims, (i + 1) * n // parts * dims) for i in range(parts)]
    bounds[-1] = (bounds[-1][0], k)
    pool = ThreadPoolExecutor(parts) if parts > 1 else None
    total = rows * cols * dims
    rmse = torch.full((n,), float("inf"), dtype=torch.float64)
    sweeps = torch.zeros(n, dtype=torch.int64)
    try:
        for _ in range(max_iter):
            running = rmse > eps
            if not bool(running.any()):
                break
            keep[:planes] = running.repeat_interleave(dims)
            calls = [pointers + [rows, cols, k, lo, hi] for lo, hi in bounds]
            if pool is None:
                sweep(*calls[0])
            else:
                list(pool.map(lambda args: sweep(*args), calls))
            rmse = torch.where(running, torch.sqrt(sq[:planes].reshape(n, dims).sum(dim=1) / total), rmse)
            sweeps += running.to(torch.int64)
    finally:
        if pool is not None:
            pool.shutdown()
    return u[1:-1, 1:-1, :planes], sweeps


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

    fused: None (default) runs float64 CPU batches on the compiled C sweep
    (``fused_sweep``: 0.13.1's loop itself, bit for bit, several times faster) when it
    can be built, else on the torch sweep; True insists on the C sweep (ValueError where
    it cannot run); False always runs the torch sweep, the plain version (the one for
    CUDA and float32). The stopping test sums squared changes per channel, then over
    channels: it can part from 0.13.1's single running sum only by rounding.
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
    k = n * dims
    weight = weights.repeat_interleave(dims).to(dtype)     # (K,), channel j of image i at i * dims + j
    flat = images.permute(1, 2, 0, 3).reshape(rows, cols, k)
    sweep = None
    if fused is not False and device.type == "cpu" and dtype == torch.float64:
        sweep = fused_sweep()
    if fused and sweep is None:
        raise ValueError("the fused sweep runs float64 on the CPU with a C compiler; "
                         "got %s on %s%s" % (dtype, device, "" if fused_sweep() else ", no compiler"))
    if sweep is not None:
        out, sweeps = _denoise_fused(flat, weight, n, dims, max_iter, eps, padding, sweep)
        return out.reshape(rows, cols, n, dims).permute(2, 0, 1, 3).contiguous(), sweeps
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
