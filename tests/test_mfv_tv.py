"""Faithful TV-Bregman (mfv/tv.py) against scikit-image 0.13.1's algorithm and today's library.

References: a line-by-line transcription of 0.13.1's Cython loop (below, slow, small
images only); today's compiled scikit-image, whose only change is the padding ring
(checked on full-size images with ``padding="edge"``); real 0.13.1 in the legacy stack.
"""
import math

import numpy as np
import pytest
from skimage.restoration import denoise_tv_bregman

from mfv.tv import denoise, denoise_tv_bregman_0131

# Our sweep adds the same terms as 0.13.1 in another order. Largest difference measured
# (values 0-255): against the transcription below on these inputs 2.3e-13; against
# today's skimage on 227x227x3 images, 100 sweeps, 4.5e-13; against real 0.13.1 in the
# legacy stack, 100 sweeps, 4.5e-13. Bound: 2e-12.
ROUNDING = 2e-12


def transcription_0131(image, weight, max_iter=100, eps=1e-3, padding="reflect"):
    """skimage/restoration/_denoise_cy.pyx (0.13.1) ``_denoise_tv_bregman``, isotropic,
    loop for loop; ``padding="edge"`` swaps in the ring later versions use."""
    image = np.atleast_3d(np.asarray(image, dtype=np.float64))
    rows, cols, dims = image.shape
    u = np.zeros((rows + 2, cols + 2, dims))
    dx, dy, bx, by = (np.zeros_like(u) for _ in range(4))
    lam = 2 * weight
    norm = weight + 4 * lam
    u[1:-1, 1:-1] = image
    u[0, 1:-1] = image[1, :]
    u[1:-1, 0] = image[:, 1]
    last = -2 if padding == "reflect" else -1
    u[-1, 1:-1] = image[last, :]
    u[1:-1, -1] = image[:, last]
    i, rmse, total = 0, np.finfo(np.float64).max, rows * cols * dims
    while i < max_iter and rmse > eps:
        rmse = 0.0
        for k in range(dims):
            for r in range(1, rows + 1):
                for c in range(1, cols + 1):
                    uprev = u[r, c, k]
                    ux = u[r, c + 1, k] - uprev
                    uy = u[r + 1, c, k] - uprev
                    unew = (lam * (+u[r + 1, c, k] + u[r - 1, c, k] + u[r, c + 1, k] + u[r, c - 1, k]
                                   + dx[r, c - 1, k] - dx[r, c, k] + dy[r - 1, c, k] - dy[r, c, k]
                                   - bx[r, c - 1, k] + bx[r, c, k] - by[r - 1, c, k] + by[r, c, k])
                            + weight * image[r - 1, c - 1, k]) / norm
                    u[r, c, k] = unew
                    rmse += (unew - uprev) ** 2
                    bxx, byy = bx[r, c, k], by[r, c, k]
                    s = math.sqrt((ux + bxx) ** 2 + (uy + byy) ** 2)
                    dxx = s * lam * (ux + bxx) / (s * lam + 1)
                    dyy = s * lam * (uy + byy) / (s * lam + 1)
                    dx[r, c, k], dy[r, c, k] = dxx, dyy
                    bx[r, c, k] += ux - dxx
                    by[r, c, k] += uy - dyy
        rmse = math.sqrt(rmse / total)
        i += 1
    return np.squeeze(u[1:-1, 1:-1])


@pytest.mark.parametrize("shape", [(9, 13, 3), (13, 9, 3), (6, 7), (2, 2, 1), (40, 3, 2)])
@pytest.mark.parametrize("padding", ["reflect", "edge"])
def test_matches_transcription(shape, padding):
    image = np.random.RandomState(sum(shape)).uniform(0, 255, shape)
    for weight in (0.01, 0.3, 2.0):
        expected = transcription_0131(image, weight, max_iter=7, padding=padding)
        got = denoise_tv_bregman_0131(image, weight, max_iter=7, padding=padding)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=ROUNDING)


def test_stops_on_eps_like_the_transcription():
    image = np.random.RandomState(3).uniform(0, 255, (8, 10, 3))
    # eps=2: 0.13.1 stops after a few sweeps; the same count gives the same result
    expected = transcription_0131(image, 0.5, max_iter=100, eps=2.0)
    fewer = transcription_0131(image, 0.5, max_iter=2, eps=2.0)
    assert np.abs(expected - fewer).max() > 1e-3  # it did run more than two sweeps
    np.testing.assert_allclose(denoise_tv_bregman_0131(image, 0.5, eps=2.0), expected, rtol=0, atol=ROUNDING)


def test_edge_padding_matches_todays_skimage_full_size():
    image = np.random.RandomState(0).normal(128, 40, (227, 227, 3))
    for weight in (0.05, 2.0):
        expected = denoise_tv_bregman(image, weight=weight, max_num_iter=20, eps=1e-3)
        got = denoise_tv_bregman_0131(image, weight, max_iter=20, padding="edge")
        np.testing.assert_allclose(got, expected, rtol=0, atol=ROUNDING)


def test_faithful_and_modern_differ_at_the_bottom_right_ring():
    image = np.random.RandomState(1).uniform(0, 255, (30, 30, 3))
    faithful = denoise(image, 0.4, mode="faithful")
    modern = denoise(image, 0.4, mode="modern")
    gap = np.abs(faithful - modern)
    # the changed ring feeds the last row and column (measured 5.3 grey levels there);
    # the top-left 8x8 corner agrees to our rounding (measured 2.6e-13)
    assert gap[-1].max() > 1.0 and gap[:, -1].max() > 1.0
    assert gap[:8, :8].max() < ROUNDING


def test_rejects_too_small_images_and_unknown_options():
    with pytest.raises(ValueError):
        denoise_tv_bregman_0131(np.zeros((1, 5, 3)), 0.1)
    with pytest.raises(ValueError):
        denoise_tv_bregman_0131(np.zeros((4, 5, 3)), 0.1, padding="wrap")
    with pytest.raises(ValueError):
        denoise(np.zeros((4, 5, 3)), 0.1, mode="fast")


@pytest.mark.caffe
def test_matches_scikit_image_0131_in_the_legacy_stack(caffe_worker):
    image = np.random.RandomState(2).normal(128, 40, (227, 227, 3))
    for weight in (0.01, 0.4):  # converges early; runs all 100 sweeps
        expected = caffe_worker.py2("denoise_tv_bregman", image=image, weight=weight,
                                    max_iter=100, eps=1e-3)["output"]
        np.testing.assert_allclose(denoise_tv_bregman_0131(image, weight), expected, rtol=0, atol=ROUNDING)
