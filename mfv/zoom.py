"""The octave zoom: ``scipy.ndimage.zoom(image, (1, s, s))``, cubic spline, default mode.

Faithful and modern modes call today's scipy: it needs no reimplementation. scipy 1.6
changed zoom (``grid_mode``, the 'constant' boundary, an early exit for zoom 1), so we
measured it against scipy 0.17.0 in the legacy stack on 3 x H x W images at MFV's
scales (1.2 from 227 and 272, 1.0 at 272): for float32 images, which is what MFV
zooms (its image lives in the net's float32 layout), every output value is identical.
In float64 the two differ by rounding only (at most 2.6e-13): the spline prefilter's
initial conditions are summed differently, and zoom 1 is now an exact copy. With
grid_mode=False (the default) every output coordinate lies inside the input, so
the 'constant' boundary change never applies. tests/test_mfv_zoom.py keeps a NumPy
transcription of 0.17.0's algorithm (bit-exact to real 0.17.0, measured) and checks
this equality on every run.

Importable by Python 2.7 (the Caffe side calls its own scipy 0.17.0 directly).
"""
from __future__ import division

import scipy.ndimage


def zoom_octave(image, scale):
    """Zoom a channels-first image (C x H x W) by ``scale`` in both spatial axes.

    Output shape: (C, round(H * scale), round(W * scale)), same dtype as the input.
    """
    return scipy.ndimage.zoom(image, (1, scale, scale))
