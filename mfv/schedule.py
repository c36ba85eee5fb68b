"""MFV's octaves as data, and the per-iteration step size and denoising weight.

The 2016 code ran under Python 2, where ``/`` between two integers is floor division.
The schedules are written as in the original,

    step   = start_step + ((end_step - start_step) * i) / iter_n
    weight = start_w - (start_w - end_w * i) / iter_n

so whether an octave's numbers are ``int`` or ``float`` matters: the mean-image
octave 0 has integer steps 1 -> 2 and 190 iterations, so under Python 2 its step stays
1 for the whole octave, while Python 3 ramps it from 1 to 1.99. The tables keep each
number's type exactly as the original wrote it; ``py2_div`` and ``py3_div`` say which
arithmetic is meant.

Net input size: the tables are CaffeNet's (a 227 x 227 input). Of their numbers only
``margin`` is in pixels; the rest are ratios or per-pixel values that mean the same for
any input size: ``window`` is a fraction of the room a crop has to move, ``scale`` a
zoom factor of the whole image, step sizes grey levels per pixel, denoising weights
per pixel. ``margin_for`` scales the margin so the gradient's central square keeps its
share of the input's side: margin * side / 227, rounded to the nearest pixel (half up),
side the input's shorter side (the 2016 code assumed a square input). At 227 it is the
table's number exactly; at 224 (GoogLeNet, torchvision nets) the 50 becomes 49. The loop applies it to
every table, so a hand-written table's margins are pixels of a 227-pixel input too.

Importable by Python 2.7 (no annotations, no f-strings): the Caffe side uses it too.
"""
from __future__ import division

import numbers
from collections import namedtuple

Octave = namedtuple("Octave", [
    "layer",                 # objective layer, or None for the run's layer (default fc8)
    "margin",                # gradient zeroed outside the central square [margin, size - margin)
    "window",                # crop jitter: sd of the offset = (image size - input size) * window
    "scale",                 # zoom factor applied at the octave's start, or None
    "iter_n",                # iterations
    "start_denoise_weight", "end_denoise_weight",
    "start_step_size", "end_step_size",
])

# Mean-image initialisation (start from a cluster's mean image), objective fc8.
MEAN_OCTAVES = (
    Octave(None, 0, 0.3, None, 190, 0.4, 0.4, 1, 2),
    Octave(None, 0, 0.3, 1.2, 150, 0.01, 2, 1., 1.),
    Octave(None, 50, 0.2, 1.0, 20, 0.1, 2, 2., 2.),
    Octave(None, 0, 0.3, None, 10, 0.4, 2, 2., 2.),
)

# Centre-bias regularisation (start from noise), a per-octave objective layer.
CENTER_BIAS_OCTAVES = (
    Octave("prob", 0, 0.3, None, 190, 0.001, 0.05, 11., 11.),
    Octave("prob", 0, 0.3, 1.2, 150, 0.01, 0.08, 6., 6.),
    Octave("fc8", 0, 0.3, 1.2, 150, 0.01, 2., 1., 1.),
    Octave("fc8", 50, 0.1, 1.0, 30, 0.1, 2., 3., 3.),
    Octave("fc8", 0, 0.3, None, 10, 0.01, 2., 6., 3.),
)

VARIANTS = {"mean": MEAN_OCTAVES, "center-bias": CENTER_BIAS_OCTAVES}
REFERENCE_SIZE = 227   # the input side (pixels) the tables' margins were written for
ARITHMETIC = ("py2", "py3")


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def py2_div(a, b):
    """Python 2's ``a / b``: floor division when both operands are integers, else true division."""
    if _is_int(a) and _is_int(b):
        return a // b
    return a / b


def py3_div(a, b):
    """Python 3's ``a / b``: always true division."""
    return a / b


def _div(arithmetic):
    if arithmetic == "py2":
        return py2_div
    if arithmetic == "py3":
        return py3_div
    raise ValueError("arithmetic must be 'py2' or 'py3', not %r" % (arithmetic,))


def step_size(octave, i, arithmetic="py2"):
    """Step size of iteration ``i`` (0-based) of ``octave``, as the original computes it."""
    div = _div(arithmetic)
    return octave.start_step_size + div((octave.end_step_size - octave.start_step_size) * i, octave.iter_n)


def denoise_weight(octave, i, arithmetic="py2"):
    """TV weight of iteration ``i``: ``start - (start - end * i) / n``, exactly as written."""
    div = _div(arithmetic)
    return octave.start_denoise_weight - div(octave.start_denoise_weight - octave.end_denoise_weight * i,
                                             octave.iter_n)


def octaves_for(variant):
    """The octave table of ``variant`` ("mean" or "center-bias")."""
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError("variant must be one of %s, not %r" % (sorted(VARIANTS), variant))


def margin_for(octave, input_size):
    """The octave's margin in pixels for a net whose input is ``input_size`` (rows, cols):
    ``round(margin * min(rows, cols) / 227)``, halves up, in integer arithmetic (see the
    module's docstring); the table's own number for a 227-pixel input."""
    side = min(int(n) for n in input_size)
    return (2 * int(octave.margin) * side + REFERENCE_SIZE) // (2 * REFERENCE_SIZE)
