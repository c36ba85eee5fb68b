"""Small random Caffe nets for the property test against real Caffe, and its reproducer.

A net is a pure function of three values: ``make_example(seed, depth, focus)``. ``focus``
(one of ``KINDS``) is the first building step, ``depth`` (1-4) the number of steps, and
``seed`` drives NumPy's ``RandomState`` for every other choice (shapes, layer parameters,
which earlier blobs a multi-bottom layer joins, in place or not, weights, inputs, the top
diff). A step adds one layer, or two where the pair is the point (BatchNorm then Scale,
Slice then Concat, Parameter then Eltwise, Reduction or SPP then a Reshape back to 4 axes);
later steps pick from ``KINDS`` (see ``NEW_KINDS``), ReLU (sometimes leaky), Dropout and a
declared Split. Shapes stay small (N <= 2, C <= 12, H, W <= 16), so one Caffe call takes
milliseconds.

Every array is float32, NCHW. Inputs and weights are standard normal draws (weights
scaled by 1/sqrt(fan-in), so values stay of order 1 through a chain); the random top diff
is injected at the last layer's first top, and Caffe's backward runs from there. The
generator keeps clear of Caffe's memory-sharing artifacts and of ill-conditioned inputs
(see ``_Builder``); ``aliasing=True`` (``--aliasing``) lets it make the artifacts.

Reproduce one example (as root, with the legacy stack built, from the repository root)::

    python tests/property_nets.py --seed 12345 --depth 3 --focus pool

prints the prototxt, writes prototxt, caffemodel and arrays to a kept folder (``--out``),
runs real Caffe and the port, and prints every compared array's error against its bound;
the exit status is 1 when some array is beyond it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from numpy_ref import rel_err  # the project's error measure: max |a - ref| / max |ref|
from porting.verify import Objective

OLD_KINDS = ("conv", "deconv", "pool", "lrn", "eltwise", "batchnorm", "crop", "slice_concat")
# Kinds added later. A net focused on an older kind draws exactly as before (later steps
# pick from OLD_KINDS and the fillers), so the pinned examples' seeds keep their nets; a
# net focused on a newer kind picks its later steps from every kind. Embed, BatchReindex
# and Filter are left out: under the force_backward the comparison runs Caffe with, Caffe
# aborts in their backward (they refuse to backpropagate to their index bottom).
NEW_KINDS = ("clip", "swish", "tile", "reduction", "mvn", "spp", "im2col", "parameter", "recurrent")
# A loss is terminal: a net focused on "loss" draws its other steps first (as a newer
# kind's would) and ends in the loss, whose scalar top takes the random top diff (Caffe's
# backward scales its own diff formula by it). Its label or target bottom is a net input fed
# valid values, which Caffe's LossLayer::AllowForceBackward keeps out of the backward.
TERMINAL_KINDS = ("loss",)
KINDS = OLD_KINDS + NEW_KINDS + TERMINAL_KINDS
MAX_DEPTH = 4

# Layer families: "exact" layers (data movement, ReLU, MAX pooling, Eltwise MAX) must give
# equal bits. 1e-6 bounds the *local* relative error (max |error| / max |float64|) of a layer
# without a float32 rule in porting (BatchNorm with batch statistics, LRN WITHIN_CHANNEL's
# backward before it had one): measured at most 1.5e-7 over the 200 default examples.
LAYER_TOL = {"exact": 0.0, "sum": 1e-6, "transcendental": 1e-6}


@dataclass
class Example:
    """One generated net: prototxt text, weights, inputs and the injected top diff."""

    seed: int
    depth: int
    focus: str
    prototxt: str
    weights: list = field(default_factory=list)  # (layer name, type, [float32 arrays]) in net order
    inputs: dict = field(default_factory=dict)  # input blob -> float32 array
    diff_blob: str = ""  # where the random top diff is injected
    top_diff: np.ndarray | None = None
    families: dict = field(default_factory=dict)  # layer -> "exact" | "sum" | "transcendental"
    upstream: dict = field(default_factory=dict)  # layer -> layers its tops depend on (itself included)
    writer: dict = field(default_factory=dict)  # blob -> last layer writing it
    aliasing: bool = False
    features: list = field(default_factory=list)  # what the net exercises, e.g. "Pooling:MAX:clip"

    @property
    def command(self) -> str:
        """The one command that reproduces this example outside hypothesis."""
        return (f"python tests/property_nets.py --seed {self.seed} --depth {self.depth} --focus {self.focus}"
                + (" --aliasing" if self.aliasing else ""))

    def rounding_layers(self, layers) -> int:
        return sum(1 for name in layers if self.families[name] != "exact")

    def tolerance(self, key: str) -> float:
        """0 for an array key only exact layers touch (it must match Caffe bit for bit), else
        a rough end-to-end scale, LAYER_TOL per rounding layer (twice over the whole net for
        a diff), used only to tell the two apart: such values are judged by local checks.
        """
        kind, rest = key.split("/", 1)
        name, what = rest.rsplit("/", 1)
        if what == "diff":
            return 2 * self.rounding_layers(self.families) * LAYER_TOL["sum"]
        layer = self.writer[name] if kind == "blob" else name.rsplit("/", 1)[0]
        return self.rounding_layers(self.upstream[layer]) * LAYER_TOL["sum"]


class _Builder:
    """Accumulates layers; every choice comes from ``rng``.

    Besides shapes it keeps, per blob name (that is, per piece of Caffe memory), what
    Caffe's backward will read from it later and what values it may hold, so that steps
    keep clear of Caffe's memory-sharing artifacts (unless ``aliasing``) and of
    ill-conditioned inputs:

    * ``readers[blob]``: "sign" when a ReLU's backward reads its sign, "value" when the
      backward of LRN, Eltwise PROD or a batch-statistics BatchNorm reads its values.
      Caffe runs an in-place layer on the memory those backward passes read later, so an
      in-place layer may only overwrite what no later reader needs (a ReLU keeps signs;
      BatchNorm and Scale keep neither).
    * ``shared``: blobs whose memory Caffe shares with another named blob (Split tops,
      Concat of one bottom, Slice to one top): an in-place layer on one of them changes
      the others too, in Caffe only. ``in_place``: blobs an in-place layer has written;
      Concat of one bottom and Slice to one top also share the diff, so they may not
      follow one (its backward, run after theirs, rewrites their diff).
    * ``zeros``: blobs that may hold exact zeros (Eltwise PROD's ``stable_prod_grad:
      false`` divides by them); ``flat``: blobs where a channel may be one nonzero constant
      (bias-only cells of a convolution), which a batch-statistics BatchNorm would turn
      into normalized rounding noise.
    * ``mag``: the typical size of a blob's values (inputs are standard normal: 1), a
      rough estimate that LRN's alpha is scaled by, as real nets scale it to their data:
      Caffe's LRN sums squares over channels as a running sum (add the entering channel,
      subtract the leaving one), whose rounding grows with alpha * x^2 / k.
    """

    def __init__(self, rng: np.random.RandomState, aliasing: bool = False):
        self.rng = rng
        self.aliasing = aliasing
        self.input_lines: list[str] = []
        self.lines: list[str] = []
        self.shapes: dict[str, tuple] = {}
        self.inputs: dict[str, np.ndarray] = {}
        self.weights: list = []
        self.families: dict[str, str] = {}
        self.upstream: dict[str, set] = {}
        self.writer: dict[str, str] = {}
        self.readers: dict[str, set] = {}
        self.shared: set[str] = set()
        self.in_place: set[str] = set()
        self.zeros: set[str] = set()
        self.flat: set[str] = set()
        self.mag: dict[str, float] = {}
        self.features: list[str] = []
        self.count = 0

    # -- bookkeeping ----------------------------------------------------------------
    def rand(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        return int(self.rng.randint(low, high + 1))

    def chance(self, p: float) -> bool:
        return bool(self.rng.rand() < p)

    def pick(self, seq):
        return seq[self.rng.randint(len(seq))]

    def new_input(self, shape, prefix="data") -> str:
        name = prefix if prefix not in self.shapes else f"{prefix}{len(self.inputs)}"
        shape = tuple(int(d) for d in shape)
        dims = " ".join(f"dim: {d}" for d in shape)
        layer = f"input_{name}"
        self.input_lines.append(f'layer {{ name: "{layer}" type: "Input" top: "{name}" '
                                f'input_param {{ shape {{ {dims} }} }} }}')
        self.inputs[name] = self.rng.standard_normal(shape).astype(np.float32)
        self.shapes[name] = shape
        self.families[layer] = "exact"
        self.upstream[layer] = {layer}
        self.writer[name] = layer
        self.readers[name] = set()
        self.mag[name] = 1.0
        return name

    def may_overwrite(self, blob: str, keeps: str) -> bool:
        """Whether an in-place layer may write ``blob`` in Caffe without an aliasing artifact.

        ``keeps``: what the in-place layer leaves unchanged: "all" (Dropout at TEST),
        "sign" (ReLU) or "nothing" (BatchNorm, Scale).
        """
        if self.aliasing or keeps == "all":
            return True
        if blob in self.shared or "value" in self.readers[blob]:
            return False
        return keeps == "sign" or "sign" not in self.readers[blob]

    def may_share_diff(self, blob: str) -> bool:
        """Whether a top may share ``blob``'s data and diff (Concat of one, Slice to one)."""
        return self.aliasing or blob not in self.in_place

    def add(self, kind: str, type_name: str, bottoms, family: str, body: str = "", top_shapes=(),
            in_place=False, blobs=None, reads=None, reads_top=None, shares=False, makes=(),
            mag: float | None = None) -> list[str]:
        """Append one layer; its tops are named after it (or its bottom when in place).

        ``reads``/``reads_top``: what Caffe's backward of this layer reads from its bottoms'
        / tops' memory ("sign", "value" or None); ``shares``: its tops share memory with its
        bottom; ``makes``: value flags ("zeros", "flat") its tops may get from it; ``mag``:
        the tops' typical size (default: the largest of the bottoms').
        """
        mag = max(self.mag[b] for b in bottoms) if mag is None else float(mag)
        self.count += 1
        name = f"{kind}{self.count}"
        tops = [bottoms[0]] if in_place else \
            [name] if len(top_shapes) == 1 else [f"{name}_{i}" for i in range(len(top_shapes))]
        text = f'layer {{ name: "{name}" type: "{type_name}"'
        text += "".join(f' bottom: "{b}"' for b in bottoms) + "".join(f' top: "{t}"' for t in tops)
        self.lines.append(text + (f" {body}" if body else "") + " }")
        self.features.append(type_name + (":in-place" if in_place else ""))
        self.families[name] = family
        self.upstream[name] = {name}.union(*(self.upstream[self.writer[b]] for b in bottoms))
        inherited = {flag for flag, blobs_ in (("zeros", self.zeros), ("flat", self.flat))
                     if any(b in blobs_ for b in bottoms)}
        for b in bottoms:
            if reads:
                self.readers[b].add(reads)
        if in_place:
            self.in_place.add(bottoms[0])
        for top, shape in zip(tops, top_shapes):
            self.shapes[top] = tuple(int(d) for d in shape)
            self.writer[top] = name
            self.readers.setdefault(top, set())
            self.mag[top] = mag
            if reads_top:
                self.readers[top].add(reads_top)
            for flag in inherited | set(makes):
                (self.zeros if flag == "zeros" else self.flat).add(top)
            if shares:
                self.shared.update([top, bottoms[0]])
        if blobs:
            self.weights.append((name, type_name, [np.asarray(b, np.float32) for b in blobs]))
        return tops

    def normal(self, shape, scale=1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def same_shape_blobs(self, shape) -> list[str]:
        return [b for b, s in self.shapes.items() if s == shape]

    # -- text helpers ----------------------------------------------------------------
    def pair(self, field_name: str, values, repeated: bool, default=None) -> str:
        """An (h, w) parameter in one of Caffe's spellings.

        ``f: v`` (or omitted when it is the default), ``f: h f: w`` for repeated fields
        (Convolution's), ``f_h: h f_w: w`` (``kernel_h`` for ``kernel_size``); dilation has
        only the repeated form.
        """
        h, w = values
        if h == w:
            if h == default and self.chance(0.5):
                return ""
            if repeated and self.chance(0.2):
                return f"{field_name}: {h} {field_name}: {h}"
            return f"{field_name}: {h}"
        if field_name == "dilation" or repeated and self.chance(0.5):
            return f"{field_name}: {h} {field_name}: {w}"
        base = field_name.replace("_size", "")
        return f"{base}_h: {h} {base}_w: {w}"


def _f(value: float) -> str:
    """A float32 value as prototxt text: the shortest decimal that reads back as that float32."""
    return str(np.float32(value))


# ---------------------------------------------------------------------------------------
# Building steps: each takes the builder and the current blob, returns the new current blob
# ---------------------------------------------------------------------------------------
def _conv_axis(b: _Builder, size: int):
    """(kernel, stride, pad, dilation) for one axis that Caffe accepts, output >= 1."""
    for _ in range(50):
        k, s, p = b.rand(1, 4), b.rand(1, 3), b.rand(0, 2)
        d = 2 if b.chance(0.3) else 1
        if d * (k - 1) + 1 <= size + 2 * p:
            return k, s, p, d
    return 1, 1, 0, 1


def _conv_uncovered(size: int, k: int, s: int, p: int, d: int, out: int) -> bool:
    """Whether some convolution output cell along one axis sees only padding."""
    return any(all(not 0 <= i * s - p + d * t < size for t in range(k)) for i in range(out))


def _deconv_uncovered(size: int, k: int, s: int, p: int, d: int, out: int) -> bool:
    """Whether some deconvolution output cell along one axis receives no input cell."""
    reached = {i * s - p + d * t for i in range(size) for t in range(k)}
    return any(j not in reached for j in range(out))


def _group(b: _Builder, channels: int) -> int:
    divisors = [g for g in range(2, channels + 1) if channels % g == 0]
    return b.pick(divisors) if divisors and b.chance(0.5) else 1


def _geometry_text(b: _Builder, kernel, stride, pad, dilation) -> str:
    parts = [b.pair("kernel_size", kernel, True), b.pair("stride", stride, True, default=1),
             b.pair("pad", pad, True, default=0)]
    if dilation != (1, 1):
        parts.append(b.pair("dilation", dilation, True))
    return " ".join(p for p in parts if p)


def step_conv(b: _Builder, x: str) -> str:
    """Convolution: groups, dilation, asymmetric kernel/stride/pad, bias or not."""
    n, c, h, w = b.shapes[x]
    g = _group(b, c)
    out = g * b.rand(1, max(1, 6 // g))
    (kh, sh, ph, dh), (kw, sw, pw, dw) = _conv_axis(b, h), _conv_axis(b, w)
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    bias = b.chance(0.7)
    blobs = [b.normal((out, c // g, kh, kw), 1 / math.sqrt(c // g * kh * kw))]
    if bias:
        blobs.append(b.normal((out,), 0.5))
    body = (f"convolution_param {{ num_output: {out} "
            f"{_geometry_text(b, (kh, kw), (sh, sw), (ph, pw), (dh, dw))}"
            f"{f' group: {g}' if g > 1 else ''}{'' if bias else ' bias_term: false'} }}")
    # a window lying wholly in the padding gives the bias alone (or an exact 0)
    uncovered = _conv_uncovered(h, kh, sh, ph, dh, oh) or _conv_uncovered(w, kw, sw, pw, dw, ow)
    makes = ("flat" if bias else "zeros",) if uncovered else ()
    b.features += [f"Convolution:{f}" for f, has in (("group", g > 1), ("dilation", (dh, dw) != (1, 1)),
                                                     ("asymmetric", (kh, sh, ph) != (kw, sw, pw))) if has]
    return b.add("conv", "Convolution", [x], "sum", body, [(n, out, oh, ow)], blobs=blobs, makes=makes,
                 mag=math.hypot(b.mag[x], 0.5 if bias else 0.0))[0]


def step_deconv(b: _Builder, x: str) -> str:
    """Deconvolution: groups, stride (upsampling), pad, dilation; output kept <= 16."""
    n, c, h, w = b.shapes[x]
    g = _group(b, c)
    out = g * b.rand(1, max(1, 6 // g))
    geometry = []
    for size in (h, w):
        for _ in range(50):
            k, s, p = b.rand(1, 4), b.rand(1, 3), b.rand(0, 2)
            d = 2 if b.chance(0.25) else 1
            o = s * (size - 1) + d * (k - 1) + 1 - 2 * p
            if 1 <= o <= 16:
                break
        else:
            k, s, p, d, o = 1, 1, 0, 1, size
        geometry.append((k, s, p, d, o))
    (kh, sh, ph, dh, oh), (kw, sw, pw, dw, ow) = geometry
    bias = b.chance(0.7)
    blobs = [b.normal((c, out // g, kh, kw), 1 / math.sqrt(c // g * kh * kw))]
    if bias:
        blobs.append(b.normal((out,), 0.5))
    body = (f"convolution_param {{ num_output: {out} "
            f"{_geometry_text(b, (kh, kw), (sh, sw), (ph, pw), (dh, dw))}"
            f"{f' group: {g}' if g > 1 else ''}{'' if bias else ' bias_term: false'} }}")
    # stride > kernel (or a large dilation) leaves cells no input reaches: the bias alone, or 0
    uncovered = _deconv_uncovered(h, kh, sh, ph, dh, oh) or _deconv_uncovered(w, kw, sw, pw, dw, ow)
    makes = ("flat" if bias else "zeros",) if uncovered else ()
    b.features += [f"Deconvolution:{f}" for f, has in (("group", g > 1), ("dilation", (dh, dw) != (1, 1)),
                                                       ("stride", max(sh, sw) > 1)) if has]
    return b.add("deconv", "Deconvolution", [x], "sum", body, [(n, out, oh, ow)], blobs=blobs, makes=makes,
                 mag=math.hypot(b.mag[x], 0.5 if bias else 0.0))[0]


def pooled_size(size: int, k: int, s: int, p: int, ceil: bool) -> int:
    """Caffe's pooled size before the clip rule (float32 division, then ceil or floor)."""
    ratio = float(np.float32(size + 2 * p - k) / np.float32(s))
    return int(math.ceil(ratio) if ceil else math.floor(ratio)) + 1


def pool_geometry(b: _Builder, h: int, w: int, want: str):
    """Kernel, stride, pad (h, w), round mode, output size and features, no empty window.

    ``want``: "ceil" (ceil rounding leaves a last window that runs past the padded input),
    "clip" (pad > 0 and Caffe's clip rule drops a last window) or "any". Falls back to
    "any" after 200 tries. Features: the subset of ("ceil", "clip") the geometry has.
    """
    for attempt in range(400):
        kernel = (b.rand(1, 4), b.rand(1, 4)) if b.chance(0.4) else (b.rand(1, 4),) * 2
        stride = (b.rand(1, 3), b.rand(1, 3)) if b.chance(0.4) else (b.rand(1, 3),) * 2
        if b.chance(0.3):
            pad = (0, 0)
        elif b.chance(0.6):
            pad = (b.rand(0, min(min(kernel) - 1, 2)),) * 2
        else:
            pad = tuple(b.rand(0, min(k - 1, 2)) for k in kernel)
        ceil = b.chance(0.8)
        sizes, clipped, partial = [], False, False
        for size, k, s, p in zip((h, w), kernel, stride, pad):
            if size + 2 * p < k:
                break
            o = pooled_size(size, k, s, p, ceil)
            if pad != (0, 0) and (o - 1) * s >= size + p:
                o -= 1
                clipped = True
            if o < 1 or (o - 1) * s - p >= size:  # an empty window: Caffe writes outside the blob
                break
            partial |= (o - 1) * s + k > size + 2 * p
            sizes.append(o)
        else:
            ok = {"ceil": partial, "clip": clipped}.get(want if attempt < 200 else "any", True)
            if ok:
                features = [f for f, has in (("ceil", partial), ("clip", clipped)) if has]
                return kernel, stride, pad, ceil, tuple(sizes), features
    return (1, 1), (1, 1), (0, 0), True, (h, w), []


def step_pool(b: _Builder, x: str) -> str:
    """Pooling MAX or AVE at geometries that exercise ceil rounding and the pad clip rule."""
    n, c, h, w = b.shapes[x]
    method = b.pick(["MAX", "AVE"])
    family = "exact" if method == "MAX" else "sum"
    if b.chance(0.15):
        body = f"pooling_param {{ pool: {method} global_pooling: true }}"
        b.features.append(f"Pooling:{method}:global")
        return b.add("pool", "Pooling", [x], family, body, [(n, c, 1, 1)])[0]
    kernel, stride, pad, ceil, (oh, ow), features = pool_geometry(b, h, w, b.pick(["ceil", "clip", "any"]))
    b.features += [f"Pooling:{method}"] + [f"Pooling:{method}:{f}" for f in features]
    parts = [b.pair("kernel_size", kernel, False), b.pair("stride", stride, False, default=1),
             b.pair("pad", pad, False, default=0), "" if ceil else "round_mode: FLOOR"]
    body = f"pooling_param {{ pool: {method} {' '.join(p for p in parts if p)} }}"
    return b.add("pool", "Pooling", [x], family, body, [(n, c, oh, ow)])[0]


def step_lrn(b: _Builder, x: str) -> str:
    """LRN across channels or within a channel, with drawn size, alpha, beta and k."""
    within = b.chance(0.5)
    size = f"local_size: {b.pick([1, 3, 5])}" if b.chance(0.8) else ""
    alpha = b.rng.uniform(0.05, 2.0) / max(1.0, b.mag[x] ** 2)  # alpha * x^2 of order 1
    explicit_alpha = b.chance(0.7) or b.mag[x] > 30  # the default 1e-4 suits x up to ~100
    parts = [size, f"alpha: {_f(alpha)}" if explicit_alpha else "",
             f"beta: {_f(b.rng.uniform(0.5, 1.0))}" if b.chance(0.7) else "",
             f"k: {_f(b.rng.uniform(0.5, 3.0))}" if b.chance(0.6) else "",  # ignored WITHIN_CHANNEL
             "norm_region: WITHIN_CHANNEL" if within else "norm_region: ACROSS_CHANNELS" if b.chance(0.3) else ""]
    body = f"lrn_param {{ {' '.join(p for p in parts if p)} }}"
    b.features.append("LRN:within" if within else "LRN:across")
    return b.add("lrn", "LRN", [x], "transcendental", body, [b.shapes[x]], reads="value", reads_top="value")[0]


def step_eltwise(b: _Builder, x: str) -> str:
    """Eltwise SUM (with coefficients), PROD or MAX of 2-3 same-shape blobs.

    The other bottoms are earlier blobs of the same shape (a residual join) or new inputs.
    """
    shape = b.shapes[x]
    bottoms = [x]
    for _ in range(b.rand(1, 2)):
        earlier = [s for s in b.same_shape_blobs(shape) if s not in bottoms]
        bottoms.append(b.pick(earlier) if earlier and b.chance(0.6) else b.new_input(shape, "other"))
    order = list(b.rng.permutation(len(bottoms)))
    bottoms = [bottoms[i] for i in order]
    op = b.pick(["SUM", "PROD", "MAX"])
    family = "exact" if op == "MAX" else "sum"
    parts = [f"operation: {op}" if op != "SUM" or b.chance(0.5) else ""]
    coeffs = [1.0] * len(bottoms)
    if op == "SUM" and b.chance(0.7):
        coeffs = [round(b.rng.uniform(-2, 2), 2) for _ in bottoms]
        parts += [f"coeff: {_f(c)}" for c in coeffs]
    mags = [b.mag[t] for t in bottoms]
    mag = sum(abs(c) * m for c, m in zip(coeffs, mags)) if op == "SUM" else \
        math.prod(mags) if op == "PROD" else max(mags)
    unstable = op == "PROD" and not any(t in b.zeros for t in bottoms) and b.chance(0.4)
    if unstable:
        parts.append("stable_prod_grad: false")  # Caffe divides y / x_i: only for nonzero bottoms
    b.features.append(f"Eltwise:{op}" + (":coeff" if len(parts) > 1 and op == "SUM" else "")
                      + (":unstable" if unstable else ""))
    body = f"eltwise_param {{ {' '.join(p for p in parts if p)} }}"
    return b.add("eltwise", "Eltwise", bottoms, family, body, [shape], reads="value" if op == "PROD" else None,
                 reads_top="value" if unstable else None, makes=("zeros",) if op == "SUM" else (), mag=mag)[0]


def step_batchnorm(b: _Builder, x: str) -> str:
    """BatchNorm (global statistics or batch statistics), then Scale; each in place or not."""
    shape = b.shapes[x]
    c = shape[1]
    parts = []
    # Batch statistics over m values per channel: m = 1 normalizes to an exact 0. Small m
    # is ill-conditioned: m = 2 gives y = +-1 up to eps, whose backward is all
    # cancellation, and for m < 6 the zero-sum diff it passes down can cancel almost
    # entirely in the next layer's backward (seen at m = 3: 5e-4 relative in both
    # frameworks alike). A channel that may be one constant gives normalized rounding noise.
    m = shape[0] * shape[2] * shape[3]
    batch_stats = b.chance(0.3) and x not in b.flat and (m == 1 or m >= 6)
    b.features.append("BatchNorm:batch-statistics" if batch_stats else "BatchNorm:global-statistics")
    if batch_stats:
        parts.append("use_global_stats: false")
    elif b.chance(0.3):
        parts.append("use_global_stats: true")
    eps = 1e-5
    if b.chance(0.5):
        eps = b.pick([1e-3, 0.1, 1e-5])
        parts.append(f"eps: {_f(eps)}")
    factor = 0.0 if b.chance(0.1) else b.rng.uniform(0.5, 2.0)
    blobs = [b.normal((c,)), b.rng.uniform(0.2, 2.0, c), np.array([factor])]
    inverse = 0.0 if factor == 0 else 1.0 / factor
    mag = 1.0 if batch_stats else \
        float(np.max((b.mag[x] + np.abs(blobs[0]) * inverse) / np.sqrt(blobs[1] * inverse + eps)))
    body = f"batch_norm_param {{ {' '.join(parts)} }}" if parts else ""
    in_place = b.chance(0.5) and b.may_overwrite(x, "nothing")
    # the batch-statistics backward reads the top (a copy of it when in place)
    y = b.add("bn", "BatchNorm", [x], "transcendental", body, [shape], in_place=in_place, blobs=blobs,
              reads_top="value" if batch_stats and not in_place else None,
              makes=("zeros",) if batch_stats else (), mag=mag)[0]
    if b.chance(0.2):
        return y
    bias = b.chance(0.6)
    blobs = [b.rng.uniform(0.5, 1.5, c) * b.rng.choice([-1, 1], c)] + ([b.normal((c,))] if bias else [])
    body = "scale_param { bias_term: true }" if bias else ""
    in_place = b.chance(0.5) and b.may_overwrite(y, "nothing")
    return b.add("scale", "Scale", [y], "sum", body, [shape], in_place=in_place, blobs=blobs,
                 mag=1.5 * b.mag[y] + (1.0 if bias else 0.0))[0]


def step_crop(b: _Builder, x: str) -> str:
    """Crop to a new reference input's shape on axes >= axis, at one offset or one per axis."""
    shape = b.shapes[x]
    axis = b.pick([1, 2, 2, 3])
    ref = list(shape[:axis])
    if axis >= 2 and b.chance(0.3):
        ref[1] = b.rand(1, 3)  # dims before the axis are not compared
    ref += [b.rand(1, d) for d in shape[axis:]]
    slack = [d - r for d, r in zip(shape[axis:], ref[axis:])]
    style = b.pick(["none", "one", "each"])
    if style == "one":
        offsets = [b.rand(0, min(slack))]
    elif style == "each":
        offsets = [b.rand(0, s) for s in slack]
    else:
        offsets = []
    reference = b.new_input(ref, "ref")
    axis_text = "" if axis == 2 and b.chance(0.5) else f"axis: {axis - 4 if b.chance(0.3) else axis} "
    body = f"crop_param {{ {axis_text}{' '.join(f'offset: {o}' for o in offsets)} }}"
    top = tuple(shape[:axis]) + tuple(ref[axis:])
    return b.add("crop", "Crop", [x, reference], "exact", body, [top])[0]


def step_slice_concat(b: _Builder, x: str) -> str:
    """Slice along an axis, then Concat some parts (and maybe the bottom) in a new order."""
    shape = b.shapes[x]
    axes = [a for a in (1, 2, 3) if shape[a] >= 2] or [1]
    axis = b.pick(axes)
    size = shape[axis]
    n_parts = b.rand(1, min(size, 3)) if size > 1 else 1
    if n_parts == 1 and not b.may_share_diff(x):
        if size == 1:
            return step_crop(b, x)
        n_parts = 2
    if n_parts > 1 and size % n_parts == 0 and b.chance(0.4):
        points, sizes = [], [size // n_parts] * n_parts  # equal split
    else:
        points = sorted(int(p) for p in b.rng.choice(np.arange(1, size), n_parts - 1, replace=False)) \
            if n_parts > 1 else []
        bounds = [0] + points + [size]
        sizes = [q - p for p, q in zip(bounds, bounds[1:])]
    axis_text = f"slice_dim: {axis}" if b.chance(0.2) else f"axis: {axis}" if axis != 1 or b.chance(0.5) else ""
    body = f"slice_param {{ {axis_text} {' '.join(f'slice_point: {p}' for p in points)} }}"
    part_shapes = [shape[:axis] + (s,) + shape[axis + 1:] for s in sizes]
    b.features.append(f"Slice:axis{axis}" + (":one-top" if n_parts == 1 else ""))
    parts = b.add("slice", "Slice", [x], "exact", body, part_shapes, shares=len(part_shapes) == 1)
    chosen = [parts[i] for i in b.rng.permutation(len(parts))[: b.rand(1, len(parts))]]
    if b.chance(0.3):
        chosen.insert(b.rand(0, len(chosen)), x)  # same shape but the axis: joins along it
    cat_axis = axis
    others = [a for a in (0, 1, 2, 3) if a != axis]
    if len(set(b.shapes[t][axis] for t in chosen)) == 1 and b.chance(0.3):
        cat_axis = b.pick(others)  # equal parts may be joined along another axis
    top = list(b.shapes[chosen[0]])
    top[cat_axis] = sum(b.shapes[t][cat_axis] for t in chosen)
    b.features.append(f"Concat:axis{cat_axis}" + (":one-bottom" if len(chosen) == 1 else ""))
    axis_text = f"concat_dim: {cat_axis}" if b.chance(0.2) else \
        f"axis: {cat_axis}" if cat_axis != 1 or b.chance(0.5) else ""
    return b.add("concat", "Concat", chosen, "exact", f"concat_param {{ {axis_text} }}", [tuple(top)],
                 shares=len(chosen) == 1)[0]


def step_relu(b: _Builder, x: str) -> str:
    """ReLU, in place or not; sometimes leaky."""
    leaky = b.chance(0.25)
    body = f"relu_param {{ negative_slope: {_f(b.rng.uniform(0.05, 0.5))} }}" if leaky else ""
    in_place = b.chance(0.7) and b.may_overwrite(x, "sign")
    return b.add("relu", "ReLU", [x], "sum" if leaky else "exact", body, [b.shapes[x]], in_place=in_place,
                 reads="sign", makes=() if leaky else ("zeros",))[0]


def step_dropout(b: _Builder, x: str) -> str:
    """Dropout (the identity at TEST), in place or not."""
    body = f"dropout_param {{ dropout_ratio: {b.pick([0.5, 0.1, 0.9])} }}" if b.chance(0.5) else ""
    return b.add("drop", "Dropout", [x], "exact", body, [b.shapes[x]], in_place=b.chance(0.5))[0]


def step_split(b: _Builder, x: str) -> str:
    """A declared Split into 2-3 tops; the next steps go on from one of them (others may join later)."""
    tops = b.add("split", "Split", [x], "exact", "", [b.shapes[x]] * b.rand(2, 3), shares=True)
    return b.pick(tops)


def _to_4d(b: _Builder, x: str, kind: str) -> str:
    """A Reshape of a blob of fewer axes to (N, C, H, W), 1 for the missing trailing axes
    (later steps take 4-axis blobs). Caffe shares its data and diff with the bottom."""
    shape = b.shapes[x]
    if len(shape) == 4:
        return x
    top = (tuple(shape) + (1, 1, 1, 1))[:4]
    dims = " ".join(f"dim: {d}" for d in top)
    return b.add(kind, "Reshape", [x], "exact", f"reshape_param {{ shape {{ {dims} }} }}", [top], shares=True)[0]


def step_clip(b: _Builder, x: str) -> str:
    """Clip to [min, max] (min > max sometimes: min everywhere, as Caffe's std::max(min, ...))."""
    lo, hi = sorted(round(float(v), 2) for v in b.rng.uniform(-1.5, 1.5, 2) * b.mag[x])
    if b.chance(0.1):
        lo, hi = hi, lo
    b.features.append("Clip" + (":inverted" if lo > hi else ""))
    # its backward reads the bottom (which values lie inside); plateaus may make a channel flat
    return b.add("clip", "Clip", [x], "exact", f"clip_param {{ min: {_f(lo)} max: {_f(hi)} }}", [b.shapes[x]],
                 reads="value", makes=("zeros", "flat"), mag=max(abs(lo), abs(hi)))[0]


def step_swish(b: _Builder, x: str) -> str:
    """Swish x * sigmoid(beta x), beta default or drawn."""
    beta = 1.0 if b.chance(0.4) else round(float(b.rng.uniform(0.25, 2.5)), 2)
    body = "" if beta == 1.0 and b.chance(0.5) else f"swish_param {{ beta: {_f(beta)} }}"
    b.features.append("Swish")
    return b.add("swish", "Swish", [x], "transcendental", body, [b.shapes[x]], reads="value",
                 reads_top="value")[0]


def step_tile(b: _Builder, x: str) -> str:
    """Tile 2-3 times along an axis whose tiled size stays <= 16 (the channel axis <= 12)."""
    shape = b.shapes[x]
    choices = [(a, t) for a in (0, 1, 2, 3) for t in (2, 3) if shape[a] * t <= (12 if a == 1 else 16)]
    if not choices:
        return step_clip(b, x)
    axis, tiles = b.pick(choices)
    top = list(shape)
    top[axis] *= tiles
    axis_text = "" if axis == 1 and b.chance(0.5) else f"axis: {axis - 4 if b.chance(0.3) else axis} "
    b.features.append(f"Tile:axis{axis}")
    return b.add("tile", "Tile", [x], "sum", f"tile_param {{ {axis_text}tiles: {tiles} }}", [tuple(top)])[0]


def step_reduction(b: _Builder, x: str) -> str:
    """Reduction SUM, ASUM, SUMSQ or MEAN from an axis to the end (coeff sometimes), then a
    Reshape back to 4 axes."""
    shape = b.shapes[x]
    op = b.pick(["SUM", "ASUM", "SUMSQ", "MEAN"])
    axis = b.rand(0, 3)
    coeff = 1.0 if b.chance(0.5) else round(float(b.rng.uniform(-2, 2)), 2) or 1.0
    parts = [f"operation: {op}" if op != "SUM" or b.chance(0.5) else "",
             f"axis: {axis - 4 if b.chance(0.3) else axis}" if axis or b.chance(0.5) else "",
             f"coeff: {_f(coeff)}" if coeff != 1.0 else ""]
    n = math.prod(shape[axis:])
    mag = abs(coeff) * b.mag[x] * {"SUM": math.sqrt(n), "ASUM": n, "SUMSQ": n * b.mag[x], "MEAN": 1}[op]
    b.features.append(f"Reduction:{op}:axis{axis}")
    y = b.add("reduction", "Reduction", [x], "sum", f"reduction_param {{ {' '.join(p for p in parts if p)} }}",
              [tuple(shape[:axis])], reads="value" if op in ("ASUM", "SUMSQ") else None, mag=mag)[0]
    return _to_4d(b, y, "reshape")


def step_mvn(b: _Builder, x: str) -> str:
    """MVN: mean only, or mean and variance (eps drawn), per channel or across channels.

    Rows of fewer than 4 values or a blob that may hold a constant channel (whose variance is
    rounding noise, amplified by 1 / eps) fall back to the mean only."""
    n, c, h, w = b.shapes[x]
    across = b.chance(0.4)
    variance = (c * h * w if across else h * w) >= 4 and x not in b.flat and b.chance(0.75)
    parts = ["across_channels: true" if across else "",
             "" if variance and b.chance(0.5) else f"normalize_variance: {str(variance).lower()}"]
    if variance and b.chance(0.6):
        parts.append(f"eps: {_f(b.pick([1e-3, 0.1, 0.5]))}")
    b.features.append("MVN" + (":variance" if variance else ":mean") + (":across" if across else ""))
    body = f"mvn_param {{ {' '.join(p for p in parts if p)} }}"
    return b.add("mvn", "MVN", [x], "transcendental" if variance else "sum", body, [(n, c, h, w)],
                 reads_top="value" if variance else None, makes=("zeros",), mag=2.0 if variance else b.mag[x])[0]


def step_spp(b: _Builder, x: str) -> str:
    """SPP MAX or AVE with the pyramid heights the image allows (Caffe's Pooling refuses a
    level whose pad reaches its kernel), then a Reshape to 4 axes when it has several levels."""
    from porting.layers.spp import spp_level
    from porting.layers.pooling import pooling_geometry

    n, c, h, w = b.shapes[x]
    heights = []
    for level in range(4):
        pp = spp_level(level, h, w, 0).pooling_param
        try:
            pooling_geometry(pp, h, w)
        except ValueError:
            break
        heights.append(level + 1)
    height = b.pick(heights)
    method = b.pick(["MAX", "AVE"])
    sizes = [pooling_geometry(spp_level(i, h, w, 0).pooling_param, h, w)[3] for i in range(height)]
    b.features.append(f"SPP:{method}:height{height}")
    top = (n, c) + sizes[0] if height == 1 else (n, sum(c * sh * sw for sh, sw in sizes))
    family = "sum" if method == "AVE" or height > 1 else "exact"  # the backward adds the levels
    body = f"spp_param {{ pyramid_height: {height}{'' if method == 'MAX' and b.chance(0.5) else f' pool: {method}'} }}"
    y = b.add("spp", "SPP", [x], family, body, [top])[0]
    return _to_4d(b, y, "reshape")


def step_im2col(b: _Builder, x: str) -> str:
    """Im2col with a small kernel (channels times the kernel size stay <= 12 when possible)."""
    n, c, h, w = b.shapes[x]
    geometry = [_conv_axis(b, size) for size in (h, w)]
    (kh, sh, ph, dh), (kw, sw, pw, dw) = geometry
    if c * kh * kw > 12:
        (kh, sh, ph, dh), (kw, sw, pw, dw) = (1, sh, 0, 1), (min(kw, 2), sw, min(pw, 1), 1)
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    body = f"convolution_param {{ {_geometry_text(b, (kh, kw), (sh, sw), (ph, pw), (dh, dw))} }}"
    b.features.append("Im2col" + (":dilation" if (dh, dw) != (1, 1) else ""))
    overlap = min(kh, oh) * min(kw, ow) > 1
    return b.add("im2col", "Im2col", [x], "sum" if overlap else "exact", body, [(n, c * kh * kw, oh, ow)],
                 makes=("zeros",) if ph or pw else ())[0]


def step_parameter(b: _Builder, x: str) -> str:
    """A Parameter layer (its top is its own blob: weights in the caffemodel, diff the blob's)
    joined to x by an Eltwise SUM, PROD or MAX."""
    shape = b.shapes[x]
    dims = " ".join(f"dim: {d}" for d in shape)
    p = b.add("param", "Parameter", [], "exact", f"parameter_param {{ shape {{ {dims} }} }}", [shape],
              blobs=[b.normal(shape)], mag=1.0)[0]
    op = b.pick(["SUM", "PROD", "MAX"])
    bottoms = [x, p] if b.chance(0.5) else [p, x]
    b.features.append(f"Parameter:Eltwise:{op}")
    return b.add("eltwise", "Eltwise", bottoms, "exact" if op == "MAX" else "sum",
                 f"eltwise_param {{ operation: {op} }}", [shape], reads="value" if op == "PROD" else None,
                 mag=b.mag[x] + 1 if op != "PROD" else b.mag[x])[0]


def new_label_input(b: _Builder, shape, values: np.ndarray, prefix: str = "label") -> str:
    """An input blob fed ``values`` (labels, targets, cont: not standard normal draws)."""
    name = b.new_input(shape, prefix=prefix)
    b.inputs[name] = np.asarray(values, np.float32).reshape(shape)
    return name


def step_recurrent(b: _Builder, x: str) -> str:
    """LSTM or RNN over x reshaped to T x N x D (T N = x's N C, D = H W), with a cont input of
    0/1 (0 at t = 0: each stream starts a sequence there, so Caffe's state carried from an
    earlier forward is multiplied away), then a Reshape of the T x N x num_output top back to
    4 axes. Caffe's RecurrentLayer::AllowForceBackward keeps cont out of the backward."""
    n, c, h, w = b.shapes[x]
    if not b.may_share_diff(x):  # the Reshape would share the diff an in-place layer's backward rewrites
        x = b.add("drop", "Dropout", [x], "exact", "", [(n, c, h, w)])[0]
    steps = [d for d in range(1, n * c + 1) if n * c % d == 0]
    t = b.pick(steps[1:] if len(steps) > 1 and b.chance(0.8) else steps)  # mostly several time steps
    streams, d = n * c // t, h * w
    seq = b.add("seq", "Reshape", [x], "exact", f"reshape_param {{ shape {{ dim: {t} dim: {streams} dim: {d} }} }}",
                [(t, streams, d)], shares=True)[0]
    cont = (b.rng.rand(t, streams) < 0.7).astype(np.float32)
    cont[0] = 0
    cont_blob = new_label_input(b, (t, streams), cont, "cont")
    hidden = b.rand(1, 4)
    kind = b.pick(["LSTM", "RNN"])
    if kind == "LSTM":
        blobs = [b.normal((4 * hidden, d), 1 / math.sqrt(d)), b.normal((4 * hidden,), 0.5),
                 b.normal((4 * hidden, hidden), 1 / math.sqrt(hidden))]
    else:
        blobs = [b.normal((hidden, d), 1 / math.sqrt(d)), b.normal((hidden,), 0.5),
                 b.normal((hidden, hidden), 1 / math.sqrt(hidden)), b.normal((hidden, hidden), 1 / math.sqrt(hidden)),
                 b.normal((hidden,), 0.5)]
    b.features.append(kind + (":one-step" if t == 1 else ""))
    y = b.add("rec", kind, [seq, cont_blob], "transcendental", f"recurrent_param {{ num_output: {hidden} }}",
              [(t, streams, hidden)], blobs=blobs, mag=1.0)[0]
    return _to_4d(b, y, "reshape")


def step_loss(b: _Builder, x: str) -> str:
    """The terminal loss: SoftmaxWithLoss over the channels (labels in [0, C), ignore_label
    sometimes, a normalization drawn), EuclideanLoss against a second input, or
    SigmoidCrossEntropyLoss with targets in [0, 1] (-1 ignored sometimes)."""
    n, c, h, w = b.shapes[x]
    kind = b.pick(["SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss"])
    parts = []
    if kind == "SoftmaxWithLoss":
        shape = b.pick([(n, h, w), (n, 1, h, w)])
        labels = b.rng.randint(0, c, size=shape)
        if b.chance(0.5):
            ignore = b.rand(0, c - 1)
            parts.append(f"ignore_label: {ignore}")
            b.features.append("SoftmaxWithLoss:ignore_label")
        if b.chance(0.5):
            parts.append(f"normalization: {b.pick(['FULL', 'VALID', 'BATCH_SIZE', 'NONE'])}")
        other = new_label_input(b, shape, labels)
    elif kind == "EuclideanLoss":
        other = b.new_input((n, c, h, w))
        b.inputs[other] = b.inputs[other] * np.float32(b.mag[x])
    else:
        targets = b.rng.rand(n, c, h, w) if b.chance(0.5) else (b.rng.rand(n, c, h, w) < 0.5).astype(np.float64)
        if b.chance(0.4):
            targets[b.rng.rand(n, c, h, w) < 0.3] = -1
            parts.append("ignore_label: -1")
            b.features.append("SigmoidCrossEntropyLoss:ignore_label")
        other = new_label_input(b, (n, c, h, w), targets)
    b.features.append(kind)
    body = f"loss_param {{ {' '.join(parts)} }}" if parts else ""
    bottoms = [x, other] if kind != "EuclideanLoss" or b.chance(0.5) else [other, x]
    return b.add("loss", kind, bottoms, "sum" if kind == "EuclideanLoss" else "transcendental", body, [()])[0]


STEPS = {"conv": step_conv, "deconv": step_deconv, "pool": step_pool, "lrn": step_lrn, "eltwise": step_eltwise,
         "batchnorm": step_batchnorm, "crop": step_crop, "slice_concat": step_slice_concat,
         "clip": step_clip, "swish": step_swish, "tile": step_tile, "reduction": step_reduction, "mvn": step_mvn,
         "spp": step_spp, "im2col": step_im2col, "parameter": step_parameter, "recurrent": step_recurrent,
         "loss": step_loss}
FOLLOW = OLD_KINDS + ("relu", "relu", "dropout", "split")
FILLERS = {"relu": step_relu, "dropout": step_dropout, "split": step_split}


def make_example(seed: int, depth: int, focus: str | int, aliasing: bool = False) -> Example:
    """The net of (seed, depth, focus): a pure function of them (NumPy RandomState(seed)).

    ``aliasing``: let in-place layers write memory that Caffe shares or reads later (see
    ``_Builder``), where Caffe's results are artifacts of its memory layout.
    """
    focus = KINDS[focus] if isinstance(focus, int) else focus
    if focus not in STEPS:
        raise ValueError(f"focus must be one of {KINDS}, not {focus!r}")
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be 1..{MAX_DEPTH}, not {depth}")
    b = _Builder(np.random.RandomState(seed), aliasing)
    head = b.new_input((b.rand(1, 2), b.rand(1, 6), b.rand(1, 12), b.rand(1, 12)))
    follow = FOLLOW if focus in OLD_KINDS else FOLLOW + NEW_KINDS
    for step in range(depth):
        if focus in TERMINAL_KINDS:
            kind = focus if step == depth - 1 else b.pick(follow)
        else:
            kind = focus if step == 0 else b.pick(follow)
        if kind == "deconv" and max(b.shapes[head][2:]) > 12:
            kind = "pool"
        if kind in ("conv", "deconv", "im2col", "tile") and b.shapes[head][1] > 12:
            kind = "slice_concat"
        head = (STEPS.get(kind) or FILLERS[kind])(b, head)
    if focus in NEW_KINDS and b.chance(0.25):  # a newer kind's net sometimes ends in a loss too
        head = step_loss(b, head)
    text = f'name: "property_{seed}_{depth}_{focus}"\n' + "\n".join(b.input_lines + b.lines) + "\n"
    diff = np.asarray(b.normal(b.shapes[head]), np.float32)  # a 0-axis array for a loss top
    return Example(seed, depth, focus, text, b.weights, b.inputs, head, diff, b.families,
                   b.upstream, b.writer, aliasing, sorted(set(b.features)))


# ---------------------------------------------------------------------------------------
# Running one example through real Caffe and the port
# ---------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Rows of one example: (what, error, bound, problem or ""); see ``compare_with_caffe``."""

    example: Example
    rows: list
    folder: Path

    @property
    def failures(self) -> list:
        return [r for r in self.rows if r[3] or not r[1] <= r[2]]

    def report(self) -> str:
        ex = self.example
        lines = [f"seed {ex.seed}, depth {ex.depth}, focus {ex.focus}; reproduce: {ex.command}",
                 f"files in {self.folder}", ex.prototxt.rstrip(),
                 f"top diff injected at blob {ex.diff_blob!r}",
                 f"{'array':40} {'rel err':>10} {'bound':>8}"]
        for key, err, tol, problem in self.rows:
            mark = "  <-- " + (problem or "beyond") if problem or not err <= tol else ""
            lines.append(f"{key:40} {err:10.3g} {tol:8.2g}{mark}")
        return "\n".join(lines)


@dataclass(frozen=True)
class GivenDiff(Objective):
    """An objective whose seed is a given array (the random top diff), not a one-hot unit."""

    diff: np.ndarray | None = field(default=None, compare=False, repr=False)

    def seed(self, shape) -> np.ndarray:
        if tuple(shape) != self.diff.shape:
            raise ValueError(f"top diff of shape {self.diff.shape} for a top of shape {tuple(shape)}")
        return self.diff


def write_files(example: Example, folder: Path) -> tuple[Path, Path | None]:
    """prototxt, caffemodel (None without weights) and the arrays (.npy) into ``folder``."""
    from porting.write import write_caffemodel

    folder.mkdir(parents=True, exist_ok=True)
    prototxt = folder / "net.prototxt"
    prototxt.write_text(example.prototxt)
    caffemodel = None
    if example.weights:
        caffemodel = folder / "net.caffemodel"
        write_caffemodel(caffemodel, example.weights)
    for name, value in example.inputs.items():
        np.save(folder / f"input_{name}.npy", value)
    np.save(folder / f"top_diff_{example.diff_blob}.npy", example.top_diff)
    return prototxt, caffemodel


def compare_with_caffe(worker, example: Example, folder: Path) -> Comparison:
    """Run ``example`` in real Caffe (``worker``) and in the port; judge every array.

    Caffe returns every blob and every layer top, data and diff, after a forward and a
    backward from the random diff at ``example.diff_blob``; the port's arrays come from
    ``porting.verify.port_arrays`` with the same diff. Rows, each (what, error, bound,
    problem); a row fails when error > bound or a problem is named:

    * every Caffe array exists in the port with the same shape;
    * a value only exact layers touch (``Example.tolerance`` 0) is equal bit for bit;
    * within each framework, a ``blob/`` array equals the layer top it is a view of;
    * local checks (``porting.verify``): each layer of each framework, forward and
      backward, given that framework's *own* inputs, is within the layer's float32
      rounding bound of the float64 layer (error / bound <= 1). Nothing here depends on
      the order in which one CPU's kernels sum, nor on upstream ReLU or max-pooling
      decisions (a flipped one is an input like any other to the layers below it). The
      float64 layer is the port's reading of Caffe, so a semantic difference shows as
      Caffe beyond its bound. Where a layer has no rule (its bound is None), its local
      relative error (max |error| / max |float64|) is held to ``LAYER_TOL``;
    * the end-to-end port-vs-Caffe errors are listed for the reader, not judged.
    """
    from porting import load_caffe
    from porting.verify import NetValues, port_arrays, verify_arrays

    prototxt, caffemodel = write_files(example, folder)
    caffe = worker.run_net(prototxt, caffemodel, inputs=example.inputs,
                           top_diffs={example.diff_blob: example.top_diff})
    net = load_caffe(prototxt, caffemodel)
    last = example.writer[example.diff_blob]
    objective = GivenDiff(last, 0, example.diff_blob, example.top_diff)
    port = port_arrays(net, example.inputs, objective)
    rows, info = [], []
    for key in sorted(caffe):
        tol = example.tolerance(key)
        if key not in port:
            rows.append((key, math.inf, tol, "missing in the port"))
        elif port[key].shape != caffe[key].shape:
            rows.append((key, math.inf, tol, f"shape {port[key].shape} != Caffe's {caffe[key].shape}"))
        else:
            try:
                err = rel_err(port[key], caffe[key])
            except AssertionError as problem:  # NaN, inf or -FLT_MAX in different places
                rows.append((key, math.inf, tol, str(problem)))
                continue
            (rows if tol == 0 else info).append((key, err, tol if tol == 0 else math.inf, ""))
    if any(r[3] for r in rows):
        return Comparison(example, rows + info, folder)
    values = NetValues(net.graph)
    for name, arrays in (("caffe", caffe), ("port", port)):
        for key in sorted(k for k in caffe if k.startswith("blob/")):
            value = values.value_of_key(key)
            top = None if value is None else value.key(key.rsplit("/", 1)[1])
            if top in arrays and not np.array_equal(arrays[key], arrays[top], equal_nan=True):
                rows.append((f"{name}: {key} vs its top {top}", math.inf, 0.0, "a blob view differs from its top"))
    verification = verify_arrays(net, caffe, port, objective=objective)
    for c in verification.checks:
        what = f"{c.framework} {c.direction} {c.layer} ({c.layer_type}) {c.key}"
        if c.within is None:  # no rule for this layer (BatchNorm with batch statistics)
            rows.append((what + " local rel", c.local_rel, LAYER_TOL["sum"], ""))
        else:
            rows.append((what + " error/bound", c.error_ratio, 1.0, ""))
    return Comparison(example, rows + info, folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Reproduce one property-test example against real Caffe.")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--depth", type=int, default=1, help=f"building steps, 1..{MAX_DEPTH}")
    parser.add_argument("--focus", default="conv", choices=KINDS, help="the first step")
    parser.add_argument("--aliasing", action="store_true",
                        help="let in-place layers write memory Caffe shares or reads later")
    parser.add_argument("--out", help="folder for prototxt, caffemodel and arrays (default: a new temp folder)")
    parser.add_argument("--print-only", action="store_true", help="print the prototxt, run nothing")
    args = parser.parse_args(argv)
    example = make_example(args.seed, args.depth, args.focus, args.aliasing)
    if args.print_only:
        print(example.prototxt, end="")
        return 0
    from porting.legacy import Worker, get_backend

    backend = get_backend()
    reason = backend.problem()
    if reason:
        print(f"real Caffe cannot run here: {reason}", file=sys.stderr)
        return 2
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="property-"))
    worker = Worker(backend=backend)
    try:
        result = compare_with_caffe(worker, example, folder)
    finally:
        worker.close()
    print(result.report())
    print("FAIL" if result.failures else "ok")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
