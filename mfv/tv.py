"""Total-variation denoising by split Bregman, as MFV calls it after every step.

MFV calls ``skimage.restoration.denoise_tv_bregman(img, weight=w, max_iter=100,
eps=1e-3)`` on a float64 RGB image, height x width x 3, values 0-255 (not 0-1:
``img_as_float`` leaves float64 input untouched).

``denoise_tv_bregman_0131`` is our own NumPy implementation of scikit-image 0.13.1's
algorithm (``skimage/restoration/_denoise_cy.pyx``, isotropic case). It exists because
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
``a = lam / norm = 2/9``; it runs along anti-diagonals (every pixel of one
anti-diagonal depends only on the previous one) on a strided view, so each sweep is
about 30 whole-image operations plus 3 per anti-diagonal. The sums are associated
differently from the Cython loop, so results match 0.13.1 to rounding (about 1e-13
on the 0-255 scale; the tests hold the measured bound), not bit for bit.

Importable by Python 2.7 with numpy 1.11 (no annotations, no f-strings).
"""
from __future__ import division

import math

import numpy as np

PADDINGS = ("reflect", "edge")
BAND_ROWS = 32  # rows per band of the whole-image part of a sweep (cache size, not semantics)


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


def _antidiagonal_index(rows, cols):
    """Flat index of cell (r, c) of a (rows, cols) grid in its anti-diagonal layout.

    The anti-diagonal layout is a (rows + cols - 1, rows) array S with
    S[r + c, r] = grid[r, c]; the cells of one anti-diagonal are contiguous there.
    """
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return ((r + c) * rows + r).ravel()


def denoise_tv_bregman_0131(image, weight, max_iter=100, eps=1e-3, padding="reflect"):
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

    u = _padded(image, padding)                       # (rows+2, cols+2, dims), ring fixed
    inner = (slice(1, -1), slice(1, -1))
    shape = image.shape
    bx = np.zeros(shape)
    by = np.zeros(shape)
    # e = d - b on the padded grid (its ring stays zero, as d and b's rings do in Cython)
    ex = np.zeros(u.shape)
    ey = np.zeros(u.shape)
    fidelity = weight * image / norm
    before = np.empty(shape)
    rhs = np.empty(shape)

    # The split-variable update and the right-hand side touch every pixel with ~25
    # whole-array operations; they run over bands of BAND_ROWS rows so that the
    # temporaries stay in cache. Everything a band reads is from the previous sweep,
    # except the new d - b of the row above, which the previous band has written.
    band = min(BAND_ROWS, rows)
    ux, uy, tx, ty, q, t = (np.empty((band, cols, dims)) for _ in range(6))
    bands = []
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        n = r1 - r0
        p0, p1 = r0 + 1, r1 + 1                        # the band's rows in padded indices
        bands.append((
            before[r0:r1], u[p0:p1, 1:-1], u[p0:p1, 2:], u[p0 + 1:p1 + 1, 1:-1],
            bx[r0:r1], by[r0:r1], ex[p0:p1, 1:-1], ey[p0:p1, 1:-1],
            ex[p0:p1, :-2], ey[p0 - 1:p1 - 1, 1:-1], fidelity[r0:r1], rhs[r0:r1],
            ux[:n], uy[:n], tx[:n], ty[:n], q[:n], t[:n]))

    # the recurrence runs on contiguous anti-diagonals of the padded grid
    prow, pcol = u.shape[:2]
    all_cells = _antidiagonal_index(prow, pcol)
    inner_cells = all_cells.reshape(prow, pcol)[1:-1, 1:-1].ravel()
    u_diag = np.zeros((prow + pcol - 1, prow, dims))
    rhs_diag = np.zeros_like(u_diag)
    u_diag.reshape(-1, dims)[all_cells] = u.reshape(-1, dims)   # the ring, once
    # per anti-diagonal d = r + c of the padded grid: views of the upper and left
    # neighbours, the right-hand side, the cells themselves and a scratch buffer
    # (made once: the per-diagonal Python overhead is what this loop costs)
    buf = np.empty(rows * dims)
    steps = []
    for d in range(2, rows + cols + 1):
        lo, hi = max(1, d - cols), min(rows, d - 1) + 1
        steps.append((u_diag[d - 1, lo - 1:hi - 1].reshape(-1), u_diag[d - 1, lo:hi].reshape(-1),
                      rhs_diag[d, lo:hi].reshape(-1), u_diag[d, lo:hi].reshape(-1),
                      buf[: (hi - lo) * dims]))
    add, subtract, multiply = np.add, np.subtract, np.multiply

    sweeps = 0
    rmse = np.inf
    while sweeps < max_iter and rmse > eps:
        for (u_before, u_here, u_right, u_down, bx_b, by_b, ex_here, ey_here, ex_left, ey_up,
             fid, rhs_b, ux_, uy_, tx_, ty_, q_, t_) in bands:
            u_before[...] = u_here
            subtract(u_right, u_here, ux_)
            subtract(u_down, u_here, uy_)
            add(ux_, bx_b, tx_)
            add(uy_, by_b, ty_)
            multiply(tx_, tx_, q_)
            multiply(ty_, ty_, t_)
            q_ += t_
            np.sqrt(q_, q_)
            q_ *= lam                   # s * lam
            add(q_, 1.0, t_)
            q_ /= t_                    # d = q * (u' + b)
            subtract(1.0, q_, t_)       # new b = b + u' - d = (1 - q) * (u' + b)
            multiply(tx_, t_, bx_b)
            multiply(ty_, t_, by_b)
            # right-hand side of the u update: all but the two freshly updated neighbours
            add(u_down, u_right, rhs_b)
            rhs_b -= ex_here            # -(d - b) of this pixel, previous sweep
            rhs_b -= ey_here
            q_ -= t_                    # d - b = (2q - 1) * (u' + b)
            multiply(tx_, q_, ex_here)
            multiply(ty_, q_, ey_here)
            rhs_b += ex_left            # d_x - b_x of the left neighbour, this sweep
            rhs_b += ey_up              # d_y - b_y of the upper neighbour, this sweep
            rhs_b *= a
            rhs_b += fid
        rhs_diag.reshape(-1, dims)[inner_cells] = rhs.reshape(-1, dims)
        # Gauss-Seidel: u[r, c] = a * (u[r-1, c] + u[r, c-1]) + rhs, anti-diagonal by anti-diagonal
        for up, left, right_hand, cells, scratch in steps:
            add(up, left, scratch)
            multiply(scratch, a, scratch)
            add(scratch, right_hand, cells)
        np.take(u_diag.reshape(-1, dims), all_cells, axis=0, out=u.reshape(-1, dims))
        change = np.subtract(u[inner], before, out=rhs).reshape(-1)   # rhs is free again
        rmse = math.sqrt(np.dot(change, change) / total)
        sweeps += 1
    return np.squeeze(u[inner].copy())


def denoise_tv_bregman_modern(image, weight, max_iter=100, eps=1e-3):
    """Today's scikit-image, called as a naive port of the 2016 call would call it."""
    from skimage.restoration import denoise_tv_bregman

    return denoise_tv_bregman(np.asarray(image, dtype=np.float64), weight=weight,
                              max_num_iter=max_iter, eps=eps)


def denoise(image, weight, mode="faithful"):
    """MFV's denoising call (max_iter=100, eps=1e-3) in the given mode.

    image: float64 RGB, height x width x 3, 0-255. mode: "faithful" (scikit-image
    0.13.1's algorithm, our implementation) or "modern" (today's scikit-image).
    """
    if mode == "faithful":
        return denoise_tv_bregman_0131(image, weight, max_iter=100, eps=1e-3)
    if mode == "modern":
        return denoise_tv_bregman_modern(image, weight, max_iter=100, eps=1e-3)
    raise ValueError("mode must be 'faithful' or 'modern', not %r" % (mode,))
