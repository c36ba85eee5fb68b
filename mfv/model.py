"""Any torch module as MFV's net: ``--model`` and ``--preprocessing``.

``--model package.module:FACTORY`` or ``FILE.py:FACTORY`` names a callable returning an
``nn.Module`` with its weights loaded (loaded by ``porting.verify.recording.load_module``,
as ``porting verify --torch`` loads one: it runs the user's own code, named by them).
Its layers are submodule names (``--layer``; "" for the module's output).

``--preprocessing`` says what the module takes, in one of three forms:

* a preset: ``torchvision`` (``rgb01:0.485,0.456,0.406:0.229,0.224,0.225:224``, the
  ImageNet models of torchvision) or ``caffenet`` (``bgr255:104,117,123:1,1,1:227``);
* ``KIND:MEAN:STD:SIZE``: KIND is the channel order and value range, ``rgb01``,
  ``rgb255``, ``bgr01`` or ``bgr255``; MEAN and STD three numbers each, in the net's
  channel order and value range (``x = (p * range / 255 - mean) / std`` for 0-255
  pixels p); SIZE the input side (``224``) or ``HxW`` (``224x256``);
* a JSON file (``.json``, at most 64 KiB): ``{"channel_order": "RGB", "value_range": 1,
  "mean": [...], "std": [...], "input_size": 224 or [H, W]}``.

Every problem is a ``PortingError`` naming the option (or the file) in one line.
"""
from __future__ import annotations

import math
from pathlib import Path

from porting.errors import PortingError, shown
from porting.files import read_json
from porting.verify.convention import parse_triple

from mfv.preprocess import Preprocessing

KINDS = {"rgb01": ("RGB", 1.0), "rgb255": ("RGB", 255.0), "bgr01": ("BGR", 1.0), "bgr255": ("BGR", 255.0)}
PRESETS = {
    "torchvision": "rgb01:0.485,0.456,0.406:0.229,0.224,0.225:224",
    "caffenet": "bgr255:104,117,123:1,1,1:227",
}
JSON_LIMIT = 1 << 16
JSON_KEYS = ("channel_order", "value_range", "mean", "std", "input_size")
OPTION = "--preprocessing"


def _size(text: str, place: str) -> tuple[int, int]:
    parts = str(text).lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    parts = [p.strip() for p in parts]
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 5 and 0 < int(p) <= 8192 for p in parts):
        raise PortingError(f"input size must be N or HxW with 1 <= N <= 8192, got {shown(text)}", place=place)
    return int(parts[0]), int(parts[1])


def parse_preprocessing(text: str) -> Preprocessing:
    """A preset name, ``KIND:MEAN:STD:SIZE`` or a JSON file's path -> ``Preprocessing``."""
    text = str(text).strip()
    if text.lower().endswith(".json"):
        return read_preprocessing(text)
    text = PRESETS.get(text.lower(), text)
    parts = text.split(":")
    if len(parts) != 4:
        raise PortingError(f"expected a preset ({', '.join(PRESETS)}), KIND:MEAN:STD:SIZE (e.g. {PRESETS['torchvision']}) "
                           f"or a .json file, got {shown(text)}", place=OPTION)
    kind, mean, std, size = parts
    if kind.lower() not in KINDS:
        raise PortingError(f"KIND must be one of {', '.join(KINDS)}, got {shown(kind)}", place=OPTION)
    order, value_range = KINDS[kind.lower()]
    return Preprocessing(order, parse_triple(mean, f"{OPTION} MEAN"), parse_triple(std, f"{OPTION} STD", positive=True),
                         value_range, _size(size, f"{OPTION} SIZE"))


def read_preprocessing(path) -> Preprocessing:
    """The JSON form (see the module's docstring); a PortingError naming the file and key."""
    path = Path(path)
    spec = read_json(path, JSON_LIMIT)
    if not isinstance(spec, dict):
        raise PortingError("expected a JSON object", path)
    unknown = sorted(set(spec) - set(JSON_KEYS))
    missing = [k for k in JSON_KEYS if k not in spec]
    if unknown or missing:
        raise PortingError(f"keys must be {', '.join(JSON_KEYS)}" + (f"; unknown: {shown(', '.join(unknown))}"
                           if unknown else "") + (f"; missing: {', '.join(missing)}" if missing else ""), path)
    order = spec["channel_order"]
    if order not in ("RGB", "BGR"):
        raise PortingError(f"must be \"RGB\" or \"BGR\", got {shown(order)}", path, "channel_order")
    value_range = spec["value_range"]
    if value_range not in (1, 255) or isinstance(value_range, bool):
        raise PortingError(f"must be 1 or 255, got {shown(value_range)}", path, "value_range")
    triples = {}
    for key in ("mean", "std"):
        values = spec[key]
        if (not isinstance(values, list) or len(values) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           and (v > 0 or key == "mean") for v in values)):
            raise PortingError(f"must be three {'positive ' if key == 'std' else ''}numbers, got {shown(values)}",
                               path, key)
        triples[key] = tuple(float(v) for v in values)
    size = spec["input_size"]
    if isinstance(size, list) and len(size) == 2:
        size = "x".join(str(v) if isinstance(v, int) and not isinstance(v, bool) else "?" for v in size)
    elif not isinstance(size, int) or isinstance(size, bool):
        size = f"{size!r}"
    return Preprocessing(order, triples["mean"], triples["std"], float(value_range), _size(str(size), f"{path}: input_size"))


def load_model(spec: str, preprocessing: Preprocessing):
    """``FACTORY()`` of ``spec`` (see ``porting.verify.recording.load_module``) as a ``FacetNet``."""
    from porting.verify.recording import load_module

    from mfv.step import FacetNet

    if str(spec).endswith(".pt2"):
        raise PortingError("an exported program (.pt2) cannot be differentiated to its input here; "
                           "give FILE.py:FACTORY or package.module:FACTORY", place=f"--model {shown(spec)}")
    try:
        module = load_module(spec)
    except PortingError as err:  # the loader names its own option; ours is --model
        place = err.place
        if place and place.startswith("--torch"):
            place = "--model" + place[len("--torch"):]
        raise PortingError(err.problem, err.path, place) from None
    return FacetNet(module, preprocessing)
