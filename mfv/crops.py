"""Random crop offsets ("jitter") of MFV's octaves, drawn from numpy's legacy RandomState.

The 2016 code calls ``np.random.seed(seed)``, draws the noise start image
(``np.random.normal(float32([175, 175, 175]), 8, (h, w, 3))``, even when a mean image
then replaces it), and, at every iteration of an image larger than the net's input,
draws one offset per axis, rows first:

    mid = (size - crop) / 2.
    offset = int(clip(np.random.normal(mid, (size - crop) * window, 1), 0, size - crop))

The check is on the row count only; when it fails, nothing is drawn and the whole
image is the crop. ``rng`` is a ``numpy.random.RandomState`` (the legacy stream, equal
in numpy 1.11 and today's numpy) or the ``numpy.random`` module itself.

Importable by Python 2.7 with numpy 1.11: the Caffe side draws with the same code.
"""
from __future__ import division

import numpy as np

BACKGROUND_RGB = (175.0, 175.0, 175.0)
NOISE_SD = 8


def noise_start(rng, height, width):
    """The start image: float64 RGB, height x width x 3, mean 175, sd 8 (h*w*3 draws)."""
    return rng.normal(np.float32(BACKGROUND_RGB), NOISE_SD, (height, width, 3))


def _offset(rng, size, crop, window):
    mid = (size - crop) / 2.
    drawn = rng.normal(mid, (size - crop) * window, 1)
    return int(np.clip(drawn[0], 0, size - crop))


def crop_offsets(rng, rows, cols, crop_rows, crop_cols, window):
    """(row offset, column offset) of this iteration's crop; draws only when rows > crop_rows."""
    if rows > crop_rows:
        oy = _offset(rng, rows, crop_rows, window)
        ox = _offset(rng, cols, crop_cols, window)
        return oy, ox
    return 0, 0
