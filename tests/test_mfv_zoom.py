"""The octave zoom: today's scipy.ndimage.zoom equals scipy 0.17.0's on MFV's float32 images.

``zoom_0170`` transcribes scipy 0.17.0's algorithm (ni_interpolation.c: NI_SplineFilter1D
with its truncated mirror initialisation, NI_ZoomShift with mirrored edge taps, the
64 taps of a cubic spline summed in the C loop's order). Measured against real 0.17.0
in the legacy stack it is bit-exact, in float32 and float64.
"""
import math

import numpy as np
import pytest

from mfv.zoom import zoom_octave

POLE = math.sqrt(3.0) - 2.0


def _spline_filter_0170(a, axis):
    """In-place cubic B-spline prefilter along ``axis`` (float64), 0.17.0's line loop."""
    a = np.moveaxis(a, axis, -1)
    n = a.shape[-1]
    if n <= 1:
        return
    p = POLE
    a *= (1.0 - p) * (1.0 - 1.0 / p)
    terms = int(math.ceil(math.log(1e-15) / math.log(abs(p))))
    if terms < n:
        zn, total = p, a[..., 0].copy()
        for ll in range(1, terms):
            total += zn * a[..., ll]
            zn *= p
        a[..., 0] = total
    else:
        zn, iz = p, 1.0 / p
        z2n = p ** float(n - 1)
        total = a[..., 0] + z2n * a[..., n - 1]
        z2n *= z2n * iz
        for ll in range(1, n - 1):
            total += (zn + z2n) * a[..., ll]
            zn *= p
            z2n *= iz
        a[..., 0] = total / (1.0 - zn * zn)
    for ll in range(1, n):
        a[..., ll] += p * a[..., ll - 1]
    a[..., n - 1] = (p / (p * p - 1.0)) * (a[..., n - 1] + p * a[..., n - 2])
    for ll in range(n - 2, -1, -1):
        a[..., ll] = p * (a[..., ll + 1] - a[..., ll])


def _taps(coordinates, n):
    """Mirrored tap indices (..., 4) and cubic weights (..., 4) at float coordinates."""
    start = np.floor(coordinates) - 1
    weights = np.empty(coordinates.shape + (4,))
    for h in range(4):
        y = np.abs(start - coordinates + h)
        inner = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0
        rest = 2.0 - y
        outer = rest * rest * rest / 6.0   # C: (y*y)*y, not pow
        weights[..., h] = np.where(y < 1.0, inner, np.where(y < 2.0, outer, 0.0))
    index = start.astype(np.int64)[..., None] + np.arange(4)
    if n > 1:
        period = 2 * n - 2
        index = np.abs(index) % period
        index = np.where(index >= n, period - index, index)
    else:
        index = np.zeros_like(index)
    return index, weights


def zoom_0170(image, factors):
    """scipy 0.17.0's ``zoom(image, factors)`` (order 3, mode 'constant', cval 0) for 3-D input."""
    coefficients = np.asarray(image, dtype=np.float64).copy()
    for axis in range(coefficients.ndim):
        _spline_filter_0170(coefficients, axis)
    out_shape = tuple(int(round(n * f)) for n, f in zip(image.shape, factors))
    scale = (np.array(image.shape) - 1) / (np.array(out_shape, float) - 1)
    scale[~np.isfinite(scale)] = 1
    taps = []
    inside = np.ones(out_shape, bool)
    for axis, n in enumerate(image.shape):
        coords = np.arange(out_shape[axis], dtype=np.float64) * scale[axis]
        taps.append(_taps(coords, n))
        ok = (coords >= 0) & (coords <= n - 1)
        inside &= ok.reshape([-1 if a == axis else 1 for a in range(3)])
    total = np.zeros(out_shape)
    (i0, w0), (i1, w1), (i2, w2) = taps
    for a in range(4):
        for b in range(4):
            for c in range(4):
                value = coefficients[i0[:, a][:, None, None], i1[:, b][None, :, None], i2[:, c][None, None, :]]
                total += value * w0[:, a][:, None, None] * w1[:, b][None, :, None] * w2[:, c][None, None, :]
    total[~inside] = 0.0
    return total.astype(image.dtype)


CASES = [(1.2, (3, 227, 227)), (1.0, (3, 272, 272)), (1.2, (3, 272, 272))]


@pytest.mark.parametrize("scale,shape", CASES)
def test_float32_zoom_is_scipy_0170_bit_for_bit(scale, shape):
    image = np.random.RandomState(int(scale * 10) + shape[1]).normal(0, 40, shape).astype(np.float32)
    got = zoom_octave(image, scale)
    assert got.dtype == np.float32 and got.shape == (3, round(shape[1] * scale), round(shape[2] * scale))
    np.testing.assert_array_equal(got, zoom_0170(image, (1, scale, scale)))


def test_float64_zoom_differs_by_rounding_only():
    image = np.random.RandomState(0).normal(0, 40, (3, 227, 227))
    gap = np.abs(zoom_octave(image, 1.2) - zoom_0170(image, (1, 1.2, 1.2)))
    # measured 2.0e-13 here (values ~ +-160); prefilter initial conditions differ in order
    assert 0 < gap.max() < 1e-12


@pytest.mark.caffe
@pytest.mark.parametrize("scale,shape", CASES)
def test_transcription_and_today_match_real_scipy_0170(caffe_worker, scale, shape):
    image = np.random.RandomState(1).normal(0, 40, shape).astype(np.float32)
    expected = caffe_worker.py2("zoom", input=image, zoom=[1, scale, scale])["output"]
    np.testing.assert_array_equal(zoom_0170(image, (1, scale, scale)), expected)
    np.testing.assert_array_equal(zoom_octave(image, scale), expected)
    wide = image.astype(np.float64)
    expected64 = caffe_worker.py2("zoom", input=wide, zoom=[1, scale, scale])["output"]
    np.testing.assert_array_equal(zoom_0170(wide, (1, scale, scale)), expected64)
