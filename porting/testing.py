"""Verify a PyTorch port against Caffe inside a test suite, from a golden file (no Caffe).

``assert_matches_caffe(module, "golden.npz")`` runs what ``porting verify PROTOTXT
CAFFEMODEL --reference golden.npz --torch ...`` runs (porting.verify.foreign) and raises
``AssertionError`` with a short message when the module does not compute what Caffe
computed: the one-line verdict naming the first departing layer, the error measured there
against the bound allowed (float32 rounding at that layer, or the per-blob tolerance when
no local check covers it) and, when the verifier has one, the diagnosis of the departure.

The golden file (``porting reference dump``) holds Caffe's arrays, inputs and objective;
the prototxt and caffemodel it was dumped from are still read (the float64 reading every
layer is judged by is built from them, and their sha256 must be the file's): by default
the files of the names the golden file records, beside it. No legacy stack is used.

``porting.pytest_plugin`` (a pytest plugin registered by the package) adds the fixture
``porting_verify``: this function bound to ``--porting-golden`` / ini ``porting_golden``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from porting.errors import PortingError, shown


def assert_matches_caffe(module, golden, mapping=None, torch_input=None, torch_mean=None, torch_std=None,
                         caffe_mean=None, *, prototxt=None, caffemodel=None, tolerance=None, strict=False):
    """Assert that ``module`` computes what Caffe computed when it wrote ``golden``.

    ``module``: an ``nn.Module`` with its weights loaded (put in eval mode for the check,
    its modes restored after), or a file or spec as ``porting verify --torch`` takes it
    (``FILE.py:FACTORY``, ``package.module:FACTORY``, ``FILE.pt2``, a TorchScript file,
    ``FILE.onnx``: porting.verify.recording.load_module). ``golden``: a golden
    file of ``porting reference dump``. ``mapping``: Caffe layer or blob name -> module
    path, a dict or a map.json path as ``--map`` takes (None: found automatically).
    ``torch_input`` "bgr255" (Caffe's input, the default), a convention FILE.json, or "rgb01"
    with ``torch_mean``, ``torch_std`` (RGB, [0, 1] units) and ``caffe_mean`` (BGR, 0-255),
    each "a,b,c" or three numbers, as ``--torch-input``/``--torch-mean``/``--torch-std``/
    ``--caffe-mean`` take them (porting.verify.convention.convention_from_options).
    ``prototxt``/``caffemodel``: the files the golden file was dumped from (default: the
    names it records, in its folder). ``tolerance``/``strict``: as verify's.

    Returns the ``porting.verify.verdict.Verification`` when it passes; raises
    ``AssertionError`` (the message above) when not, and ``PortingError`` on bad input (a
    golden file of other model files, a bad map, a module that fails to load or run).
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this module's
    verification, report = verify_module(module, golden, mapping, torch_input, torch_mean, torch_std, caffe_mean,
                                         prototxt=prototxt, caffemodel=caffemodel, tolerance=tolerance,
                                         strict=strict)
    if not verification.passed:
        raise AssertionError(failure_message(verification, report, golden))
    return verification


def verify_module(module, golden, mapping=None, torch_input=None, torch_mean=None, torch_std=None,
                  caffe_mean=None, *, prototxt=None, caffemodel=None, tolerance=None, strict=False):
    """``assert_matches_caffe`` without the assertion: (Verification, mapping report)."""
    import torch

    from porting.cli_verify import plan_from_golden
    from porting.layers import LAYERS
    from porting.tolerances import parse_tolerances
    from porting.verify.convention import convention_from_options
    from porting.verify.foreign import Foreign, read_map
    from porting.verify.reference import read_golden

    if not isinstance(module, (str, os.PathLike, torch.nn.Module)):
        raise PortingError(f"expected an nn.Module or what --torch takes (FILE.py:FACTORY, package.module:FACTORY, "
                           f"a file), got {type(module).__name__}")
    convention = convention_from_options(torch_input, torch_mean, torch_std, caffe_mean)
    map_path = None
    if mapping is not None and not isinstance(mapping, Mapping):
        map_path, mapping = mapping, read_map(mapping)
    mapping = None if mapping is None else dict(mapping)
    tolerances = parse_tolerances(tolerance, known_types=LAYERS)
    stored = read_golden(golden)
    prototxt, caffemodel = model_files(stored, prototxt, caffemodel)
    plan = plan_from_golden(stored, prototxt, caffemodel)
    modes = []
    if isinstance(module, torch.nn.Module):
        foreign = Foreign(type(module).__name__, convention, mapping, map_path, module=module)
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
    else:
        foreign = Foreign(os.fspath(module), convention, mapping, map_path)
    try:
        verification, _candidate, report = foreign.verify(plan.net, stored.arrays, plan.inputs, plan.objective,
                                                          tolerances, strict)
    finally:
        for m, training in modes:
            m.training = training
    return verification, report


def model_files(stored, prototxt=None, caffemodel=None) -> tuple[Path, Path]:
    """The prototxt and caffemodel of a golden file: as given, else the file names it
    records (provenance ``net``) in the golden file's folder."""
    folder = Path(stored.path).parent
    found = []
    for given, what in ((prototxt, "prototxt"), (caffemodel, "caffemodel")):
        if given is None:
            name = Path(stored.provenance["net"][what]).name  # a name, never a path from the file
            given = folder / name
            if not given.is_file():
                raise PortingError(f"its {what} {shown(name)} is not beside it: pass {what}=", stored.path)
        found.append(Path(given))
    return found[0], found[1]


def failure_message(verification, report, golden) -> str:
    """The AssertionError's text: the verdict line (where, why; a shape or an error beyond
    its per-blob tolerance is in it), the error measured at the point of departure against
    its float32 rounding bound, the diagnosis (when there is one) and what had no
    counterpart in the module."""
    lines = [f"the module does not match Caffe ({Path(golden).name}): {verification.summary}"]
    measured = _measured(verification)
    if measured:
        lines.append(measured)
    diagnosis = diagnosis_text(verification)
    if diagnosis:
        lines.append(f"diagnosis: {diagnosis}")
    missing = (report or {}).get("no_counterpart") or []
    if missing:
        lines.append(f"no counterpart in the module (not compared): {', '.join(missing)}")
    return "\n".join(lines)


def _measured(verification) -> str:
    """One line: the error at the point of departure against its float32 rounding bound;
    "" when the verdict line says it already (a shape, an array beyond its per-blob tolerance)."""
    from porting.verify.verdict import _row_order

    dep = verification.departure
    shape = next((r for r in verification.rows if r.problem), None)
    if dep is None or shape is not None and _row_order(shape) < dep.order():
        return ""
    bound = "n/a" if dep.band is None else f"{dep.band:.2g}"
    return (f"measured at {dep.key}: error {dep.local_rel:.2g} of its largest element, allowed {bound} "
            f"(float32 rounding bound of {dep.layer}), {dep.error_ratio:.3g}x the bound")


def diagnosis_text(verification) -> str:
    """The sentence of the diagnosis the verifier puts on a foreign result
    (``Verification.diagnosis``, porting.verify.diagnose; read with getattr, as a verifier
    without it puts none); "" when there is none."""
    sentence = getattr(getattr(verification, "diagnosis", None), "sentence", None)
    return sentence if isinstance(sentence, str) else ""
