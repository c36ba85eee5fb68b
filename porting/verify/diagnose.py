"""Diagnosis: which classic porting bug accounts for a foreign port's departure.

When someone else's module departs from Caffe (``porting verify --torch``,
porting.verify.foreign), ``diagnose`` takes the layer the verdict blames
(``Verification.departed_at``: the first departing layer, forward in net order) and
re-runs it in float64 with the alternative semantics ports classically get wrong. What a
port gets wrong in one layer type lives in that type's class (``CaffeLayer.port_bugs``,
each a ``PortBug`` built from the layer itself: a copy of its LayerParameter edited and
rebuilt, or its blobs, inputs or a method changed); this module holds what is not
particular to a type: the walk to the layer to re-run, the re-run, the rule for claiming
an explanation, the input conversion (a property of the input, not of a layer) and a
missing or extra ReLU around the layer. An explanation is claimed only when the module's
output then matches: the same shape and every element within the float32 rounding bound
of the alternative layer on those inputs (``CaffeLayer.forward_bound``, the verdict's
rule), plus, where the port rounds once more than Caffe's layer would (an input converted
in float32, a product added: ``PortBug.slack``), that rounding; a random variant (Dropout
left in training mode) is recognised by its pattern instead (``PortBug.explain``). The
first explanation that fits is reported; when none does, the sentence says that no known
explanation fits.

The layer's inputs are the module's own (its counterparts' recorded arrays), which are
Caffe's up to float32 rounding: every layer before the first departing one is within it.
Where an input has no counterpart in the module (the layer then had no local check and
fails by its per-blob tolerance), Caffe's array stands in, and the match is judged by that
per-blob tolerance (relative to the largest element), since the module computed from
inputs that were not recorded.

The catalogue (explanation ids), by where it applies (the per-type ones defined in the
layer classes' ``port_bugs``; tried first, then the input's, then the ReLUs'):

* the first layer reading the net's input (the input conversion), in Caffe's input space
  (BGR, 0-255 minus ``caffe_mean``): ``input-swap`` (B and R swapped), ``input-unit``
  (0-1 units: / 255), ``input-mean-kept`` (mean not subtracted), ``input-mean-twice``,
  ``input-unit-no-mean`` (ToTensor alone: picture / 255), each also after the swap;
  ``input-mean`` (another mean: the per-channel offset fitted by least squares, then
  checked like the others) and ``input-convention`` (a * x + b per channel fitted the same
  way, e.g. a torchvision-style module fed Caffe's input: spelled as the --torch-input
  options that feed it what Caffe sees);
* Pooling: ``pool-floor`` (size rounded down: ceil_mode=False), ``pool-no-clip`` (Caffe's
  rule dropping a last window that starts in the padding ignored), ``ave-divisor``
  (count_include_pad=False), ``pool-pad`` (another padding);
* LRN: ``lrn-alpha-whole`` (alpha not divided by local_size), ``lrn-alpha-divided``
  (divided once more), ``lrn-k``, ``lrn-beta``, ``lrn-region`` (across/within channels);
* Convolution, Deconvolution: ``conv-flipped`` (kernels rotated 180 degrees),
  ``group-ignored`` (groups=1, weights tiled), ``conv-pad``, ``bias-missing``;
* InnerProduct: ``ip-transposed`` (the N x K blob read as K x N), ``flatten-nhwc``
  (flattened channels-last), ``bias-missing``;
* BatchNorm: ``bn-eps`` (another eps), ``bn-factor`` (the moving-average factor, blob 2,
  ignored); Scale: ``scale-bias`` (bias dropped);
* Dropout: ``dropout-train`` (training mode: each output 0 or the input times
  1 / (1 - ratio)), ``dropout-scaled`` (times 1 - ratio at test);
* Softmax: ``softmax-axis`` (another axis);
* Eltwise: ``eltwise-coeff`` (SUM's coefficients ignored), ``eltwise-op`` (another operation);
* ReLU: ``relu-missing`` (the port has none there), ``relu-slope`` (negative_slope ignored,
  or a leaky ReLU where Caffe has none); any other layer: ``relu-missing`` (a
  ReLU that wrote its input skipped), ``relu-extra`` (a ReLU on its input or output).

A blamed layer whose one input has no counterpart in the module (it fails by its per-blob
tolerance: no local check covered it) is diagnosed at the layer that wrote that input,
its alternatives followed by the blamed layer as Caffe has it (e.g. a Scale whose bias
the port dropped, seen through the ReLU after it); the match is then judged by the blamed
layer's per-blob tolerance.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from porting.rounding import ETA, U, magnitude
from porting.verify.keys import NetValues, Value

CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)  # the mean verify's image inputs have had subtracted
LINEAR_TYPES = ("Convolution", "Deconvolution", "InnerProduct")


@dataclass
class Diagnosis:
    """What accounts for the departure at ``layer``: ``explanation`` (an id of the catalogue,
    None when no known explanation fits) and one ``sentence`` for people; ``tried``: the
    ids tried there, in order."""

    layer: str
    explanation: str | None
    sentence: str
    tried: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"layer": self.layer, "explanation": self.explanation, "sentence": self.sentence,
                "tried": list(self.tried)}


@dataclass
class _Try:
    """One alternative: ``module`` (float64) applied to ``bottoms``, ``after`` (an exact
    1-Lipschitz element-wise map) applied to its output; ``slack``: a bound on the port's
    extra rounding, added to the layer's own bound (a tensor of the output's shape, 0, or a
    function giving it: computed only when the layer's own bound does not suffice)."""

    id: str
    what: str
    module: object
    bottoms: list
    after: Callable | None = None
    why: str = ""
    slack: object = 0.0


@dataclass
class _Layer:
    """The blamed layer: its spec (float64 module), bottoms (float64), which of them are the
    module's own arrays, the value compared and the module's output there."""

    spec: object
    values: NetValues
    bottoms: list
    own: list
    value: Value
    output: torch.Tensor
    caffe_shape: tuple
    candidate: Mapping
    reference: Mapping
    caffe_mean: tuple
    through: list = field(default_factory=list)  # layers applied after it, up to the blamed one
    input_kind: str = "bgr255"                   # --torch-input: what the module was fed


def diagnose(verification, net64, reference: Mapping, candidate: Mapping,
             caffe_mean=CAFFE_MEAN_BGR, input_kind: str = "bgr255") -> Diagnosis | None:
    """The diagnosis of a failed verification of a foreign module (None when it passed).

    ``net64``: the port in float64 (its layers are the exact reading); ``reference`` and
    ``candidate``: Caffe's and the module's keyed arrays as verify_arrays judged them;
    ``caffe_mean``: the mean (BGR, 0-255) Caffe's input has had subtracted; ``input_kind``:
    the module's input convention as given (``InputConvention.kind``; with "bgr255" the
    module was fed Caffe's input itself, and a fitted convention is spelled as options).
    """
    if verification.passed:
        return None
    layer = verification.departed_at
    if layer is None:
        return None
    values = NetValues(net64.graph)
    dep = verification.departure
    shape_row = next((r for r in verification.rows if r.problem and r.layer == layer), None)
    forward = next((r for r in verification.rows if r.kind == "data" and not r.passed), None)
    if shape_row is None and dep is not None and dep.direction != "forward" and forward is not None:
        layer = forward.layer  # a forward array beyond its tolerance (no local check) comes first
    if shape_row is None and dep is None and any(c.framework == verification.candidate and c.layer == layer and
                                                 c.direction == "forward" and c.within for c in verification.checks):
        return None  # failed by --strict tolerances only: the module computes what Caffe computes there
    if shape_row is None and dep is not None and dep.layer == layer:
        if dep.direction != "forward":
            return Diagnosis(layer, None, f"No known explanation fits: {layer} departs in its gradient only "
                             "(the catalogue covers forward bugs).")
        if verification.candidate not in dep.frameworks:
            return Diagnosis(layer, None, f"No known explanation fits: at {layer} Caffe departs from the "
                             "port's float64 reading, not the module.")
    targets = _blamed(values, layer, reference, candidate, caffe_mean)
    for target in targets:
        target.input_kind = input_kind
    if not targets:
        return Diagnosis(layer, None, f"No known explanation fits: {layer} has no output of the module to test.")
    row = next((r for r in verification.rows if r.layer == layer and r.kind == "data"), None)
    tried = []
    for target in targets:
        tolerance = None
        if target.through or not all(target.own):
            tolerance = row.tolerance if row is not None else 1e-4
        patterns = []  # tried after the others, on the blamed layer itself only
        for attempt in _catalogue(target, patterns):
            if attempt.id not in tried:
                tried.append(attempt.id)
            try:
                fits = _fits(attempt, target, tolerance)
            except (RuntimeError, ValueError, IndexError):  # an alternative this layer cannot take
                fits = False
            if fits:
                return Diagnosis(target.spec.name, attempt.id, _sentence(target, attempt.what, attempt.why), tried)
        for bug in [] if target.through else patterns:
            tried.append(bug.id)
            special = bug.explain(target.output)
            if special is not None:
                return Diagnosis(target.spec.name, bug.id, _sentence(target, *special), tried)
    kind = values.specs[values.position[layer]].type
    return Diagnosis(layer, None, f"No known explanation fits the departure at {layer} ({kind}): "
                     f"{len(tried)} tried ({', '.join(tried) or 'none applies to this type'}).", tried)


def _blamed(values: NetValues, layer: str, reference, candidate, caffe_mean) -> list[_Layer]:
    """What to re-run: the blamed layer on its inputs; when its one input has no counterpart
    in the module, first the layer that wrote that input, checked through the blamed one."""
    spec = values.specs[values.position[layer]]
    if spec.module is None or spec.is_input:
        return []
    value = next((v for v in values.by_layer[layer] if values.read(candidate, v, "data") is not None), None)
    found = None if value is None else _inputs(values, layer, reference, candidate)
    if found is None:
        return []
    bottoms, own = found
    ref = values.read(reference, value, "data")
    target = _Layer(spec, values, bottoms, own, value, _t(values.read(candidate, value, "data")),
                    tuple(np.shape(ref)) if ref is not None else (), candidate, reference, tuple(caffe_mean))
    up = values.bottoms[layer][0] if len(own) == 1 and not own[0] else None
    if up is None or values.specs[up.position].is_input or len(values.by_layer[up.layer]) != 1:
        return [target]
    writer = values.specs[up.position]
    found = _inputs(values, writer.name, reference, candidate)
    if found is None or writer.module is None or not all(found[1]):
        return [target]
    chained = _Layer(writer, values, found[0], found[1], up, target.output, target.caffe_shape, candidate,
                     reference, tuple(caffe_mean), [spec])
    return [chained, target]


def _inputs(values: NetValues, layer: str, reference, candidate) -> tuple[list, list] | None:
    """A layer's bottoms (float64): the module's arrays, Caffe's where it has none, and
    which are the module's own."""
    bottoms, own = [], []
    for v in values.bottoms[layer]:
        if v is None:
            return None
        arr = values.read(candidate, v, "data")
        own.append(arr is not None)
        arr = values.read(reference, v, "data") if arr is None else arr
        if arr is None:
            return None
        bottoms.append(_t(arr))
    return bottoms, own


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float64))


def _fits(attempt: _Try, target: _Layer, tolerance: float | None) -> bool:
    """The module's output within the alternative's rounding bound (or ``tolerance``)."""
    index = target.value.index
    with torch.no_grad():
        tops = list(attempt.module(*attempt.bottoms))
        y = attempt.after(tops[index]) if attempt.after else tops[index]
        for layer in target.through:  # exact float64 layers of one bottom, as Caffe has them
            y = layer.module(y)[0]
        if tuple(y.shape) != tuple(target.output.shape) or not bool(torch.isfinite(y).all()):
            return False
        err = (target.output - y).abs()
        if tolerance is not None:
            return float(err.max()) <= tolerance * float(y.abs().max())
        bounds = attempt.module.forward_bound(attempt.bottoms, tops, None)  # ``after`` adds no error
        if bounds is None:
            return False
        if bool((err <= bounds[index]).all()):
            return True
        slack = attempt.slack() if callable(attempt.slack) else attempt.slack
        return bool((err <= bounds[index] + slack).all())


def _sentence(target: _Layer, what: str, why: str = "") -> str:
    name = target.spec.name
    text = ""
    if target.through:
        name += (f" (without a counterpart in the module, checked through "
                 f"{', '.join(s.name for s in target.through)})")
    elif target.caffe_shape and tuple(target.output.shape) != target.caffe_shape:
        text = (f"{name} output is {_dims(target.caffe_shape)} in Caffe and {_dims(target.output.shape)} in the "
                f"port; ")
    return text + f"{name} matches {what}" + (f": {why}" if why else "") + "."


def _dims(shape) -> str:
    shape = tuple(int(d) for d in shape)
    return "x".join(map(str, shape[2:] if len(shape) == 4 else shape))


# --------------------------------------------------------------------------------------
# The alternatives: the layer type's own (its class), the input conversion, the ReLUs
# --------------------------------------------------------------------------------------

def _catalogue(t: _Layer, patterns: list) -> Iterator[_Try]:
    """The layer type's own bugs (``CaffeLayer.port_bugs``), then the input conversion (at a
    layer reading the net's input) and missing or extra ReLUs around it. The type's bugs
    recognised by a pattern of the output (``PortBug.explain``) are added to ``patterns``."""
    kind = t.spec.type
    for bug in _safely(t.spec.module.port_bugs(t.bottoms, tuple(t.output.shape))):
        if bug.explain is not None:
            patterns.append(bug)
            continue
        yield _Try(bug.id, bug.what, bug.layer, t.bottoms if bug.bottoms is None else bug.bottoms,
                   why=bug.why, slack=bug.slack)
    if any(t.values.specs[v.position].is_input for v in t.values.bottoms[t.spec.name]):
        yield from _safely(_input(t))
    if kind != "ReLU":
        yield from _safely(_relus(t))


def _safely(alternatives: Iterator[_Try]) -> Iterator[_Try]:
    """The alternatives of one group until one cannot be built for this layer (a shape or
    configuration it does not take): the rest of that group is skipped."""
    while True:
        try:
            attempt = next(alternatives)
        except StopIteration:
            return
        except (RuntimeError, ValueError, IndexError, KeyError):
            return
        yield attempt


def _input(t: _Layer) -> Iterator[_Try]:
    """The input conversion, at the first layer reading the net's input (slot of the input)."""
    slot = next(i for i, v in enumerate(t.values.bottoms[t.spec.name]) if t.values.specs[v.position].is_input)
    x = t.bottoms[slot]
    module = t.spec.module
    rgb = x.dim() == 4 and x.shape[1] == 3
    mean = torch.tensor(t.caffe_mean, dtype=torch.float64).view(1, 3, 1, 1) if rgb else None
    shown = ", ".join(f"{m:g}" for m in t.caffe_mean)
    maps = [("input-unit", "with the input in 0-1 units (divided by 255) where Caffe takes 0-255",
             lambda z: z / 255)]
    if rgb:
        maps += [("input-mean-kept", f"with the mean ({shown}, BGR) not subtracted from the input",
                  lambda z: z + mean),
                 ("input-mean-twice", f"with the mean ({shown}, BGR) subtracted twice", lambda z: z - mean),
                 ("input-unit-no-mean", "with the input in 0-1 units and the mean not subtracted (the picture / "
                  "255, as ToTensor alone gives it)", lambda z: (z + mean) / 255)]
    swaps = [(False, x)] + ([(True, x.flip(1))] if rgb else [])
    for swapped, z in swaps:
        tag, lead = ("input-swap", "after swapping B and R at the input") if swapped else ("", "")
        if swapped:
            yield _input_try(t, module, slot, z, tag, lead, "the port takes RGB where Caffe's weights take BGR")
        for id_, what, f in maps:
            yield _input_try(t, module, slot, f(z), f"{tag}+{id_}" if tag else id_,
                             f"{lead}, {what}" if tag else what)
    if rgb and t.spec.type in LINEAR_TYPES:
        for scaled in (False, True):
            for swapped, z in swaps:
                found = _fitted_input(t, module, slot, z, swapped, scaled)
                if found is not None:
                    yield found


def _input_try(t: _Layer, module, slot: int, z: torch.Tensor, id_: str, what: str, why: str = "") -> _Try:
    bottoms = list(t.bottoms)
    bottoms[slot] = z
    return _Try(id_, what, module, bottoms, why=why, slack=lambda: _input_slack(t, module, bottoms, slot))


def _input_slack(t: _Layer, module, bottoms, slot: int):
    """The port converts its input in float32: a few roundings (at most 4) of each element,
    each relative to a value of at most |Caffe's input| + |the converted input| + |the mean|.
    For a layer linear in its input: 4u times the layer's |weights| applied to that sum."""
    if t.spec.type not in LINEAR_TYPES:
        return 0.0
    size = bottoms[slot].abs() + t.bottoms[slot].abs()
    if size.dim() == 4 and size.shape[1] == 3:
        size = size + torch.tensor(t.caffe_mean, dtype=torch.float64).abs().view(1, 3, 1, 1)
    mags = magnitude(module, [size if i == slot else torch.zeros_like(b) for i, b in enumerate(bottoms)])
    return 4 * U * mags[t.value.index] + ETA


def _fitted_input(t: _Layer, module, slot: int, z: torch.Tensor, swapped: bool, scaled: bool) -> _Try | None:
    """Another mean (``scaled`` False: the per-channel offset b with layer(z + b) closest to
    the module's output) or another input convention altogether (``scaled``: a * z + b per
    channel), by least squares over every output element (the layer is linear in its
    input), then checked like any alternative. ``z``: Caffe's input, B and R swapped when
    ``swapped``."""
    index = t.value.index
    bottoms = list(t.bottoms)

    def run(value):
        bottoms[slot] = value
        return module(*bottoms)[index]

    with torch.no_grad():
        zero = run(torch.zeros_like(z))
        if tuple(zero.shape) != tuple(t.output.shape):
            return None
        columns = []
        for c in range(3):
            unit = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
            unit[0, c] = 1.0
            if scaled:
                columns.append((run(z * unit) - zero).reshape(-1))
            columns.append((run(unit.expand_as(z)) - zero).reshape(-1))
        target = t.output - (zero if scaled else run(z))
        solution = torch.linalg.lstsq(torch.stack(columns, dim=1), target.reshape(-1, 1)).solution.reshape(-1)
    if not bool(torch.isfinite(solution).all()):
        return None
    a = solution[0::2] if scaled else torch.ones(3, dtype=torch.float64)
    b = solution[1::2] if scaled else solution
    if float((a - 1).abs().max()) < 1e-6 and float(b.abs().max()) < 1e-3:
        return None  # Caffe's own input: not another convention
    cm = torch.tensor(t.caffe_mean, dtype=torch.float64)
    lead = "after swapping B and R at the input, " if swapped else ""
    given = f"({', '.join(f'{m:g}' for m in t.caffe_mean)}, BGR)"
    if not scaled:  # the module's input is z + b: the picture (in z's channel order) minus (mean - b)
        order, cm_z = ("R, G, B", cm.flip(0)) if swapped else ("B, G, R", cm)
        what = (f"{lead}with the mean ({order}) = ({_fmt(cm_z - b)}) subtracted where Caffe's input has "
                f"{given} subtracted")
        return _input_try(t, module, slot, z + b.view(1, 3, 1, 1), ("input-swap+" if swapped else "") + "input-mean",
                          what)
    what = (f"with its input x taken as a * x{' with B and R swapped' if swapped else ''} + b per channel "
            f"(Caffe's B, G, R: a = ({_fmt(a, 4)}), b = ({_fmt(b)}))")
    why = ""
    if t.input_kind == "bgr255" and bool((a > 0).all()):
        # a module taking (picture / 255 - mean) / std treats Caffe's x as that: Caffe's input is
        # then 255 * (std * x + mean) - Caffe's mean, channel by channel (B, G, R)
        std, mean = a / 255, (b + cm) / 255
        if swapped:  # the module's channels are R, G, B
            why = (f"the module takes another input convention; --torch-input rgb01 --torch-mean "
                   f"{_fmt(mean.flip(0), 3, ',')} --torch-std {_fmt(std.flip(0), 3, ',')} feeds it what Caffe sees")
        else:
            why = ("the module takes another input convention; --torch-input FILE.json with "
                   f'{{"channel_order": "BGR", "range": 1, "mean": [{_fmt(mean, 3)}], "std": [{_fmt(std, 3)}]}} '
                   "feeds it what Caffe sees")
    return _input_try(t, module, slot, a.view(1, 3, 1, 1) * z + b.view(1, 3, 1, 1), "input-convention", what, why)


def _fmt(values, digits: int = 2, sep: str = ", ") -> str:
    return sep.join(f"{float(v):.{digits}f}" for v in values)


def _relus(t: _Layer) -> Iterator[_Try]:
    """relu-missing: a bottom written by a ReLU taken from that ReLU's input instead;
    relu-extra: a ReLU applied to the inputs, or to the output."""
    values, name = t.values, t.spec.name
    module = t.spec.module
    for slot, v in enumerate(values.bottoms[name]):
        writer = values.specs[v.position]
        if writer.type != "ReLU" or values.bottoms[writer.name][0] is None:
            continue
        before = values.bottoms[writer.name][0]
        arr = values.read(t.candidate, before, "data")
        if arr is None:
            continue
        bottoms = list(t.bottoms)
        bottoms[slot] = _t(arr)
        yield _Try("relu-missing", f"when {writer.name} is skipped (its input {before.layer} taken unrectified)",
                   module, bottoms, why=f"the port has no ReLU {writer.name}")
    if any(bool((b < 0).any()) for b in t.bottoms):
        yield _Try("relu-extra", "with a ReLU applied to its input", module, [torch.relu(b) for b in t.bottoms],
                   why="the port has an extra ReLU before it")
    yield _Try("relu-extra", "with a ReLU applied to its output", module, t.bottoms, after=torch.relu,
               why="the port has an extra ReLU after it")
