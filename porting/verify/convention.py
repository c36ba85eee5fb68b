"""How a foreign model's input is made from the picture Caffe sees: ``InputConvention``
(channel order, value range, mean and std of the module's input, and the BGR mean Caffe's
input has had subtracted), from ``--torch-input``/``--torch-mean``/``--torch-std``/
``--caffe-mean`` (``convention_from_options``) or a JSON file (``read_convention``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from porting.cli_verify import IMAGENET_MEAN_BGR  # the mean verify subtracts from images
from porting.errors import PortingError, shown
from porting.files import read_json

CONVENTION_KEYS = ("channel_order", "range", "mean", "std", "caffe_mean")  # an --torch-input FILE.json


@dataclass(frozen=True)
class InputConvention:
    """What the module takes, as a function of Caffe's input blob x (N x C x H x W, float).

    ``bgr255``: x itself (Caffe's convention: BGR, 0-255 minus the mean). ``rgb01``
    (torchvision style, 3 channels): the picture x + ``caffe_mean`` (BGR, 0-255) in RGB
    order, over 255, minus ``mean`` over ``std`` (both RGB, in [0, 1] units). ``custom``
    (a JSON file, ``read_convention``): the picture in ``order`` ("RGB" or "BGR"), times
    ``range`` / 255 (``range``: the picture's white, 1 or 255), minus ``mean`` over
    ``std`` (in that order and those units). The map is evaluated in float64 and rounded
    once to float32; the gradient is taken back through it (channel swap and scaling,
    chain rule) in float64.
    """

    kind: str = "bgr255"
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    caffe_mean: tuple = IMAGENET_MEAN_BGR
    order: str = "RGB"
    range: float = 1.0

    def to_module(self, x64: torch.Tensor) -> torch.Tensor:
        if self.kind == "bgr255":
            return x64
        if x64.dim() != 4 or x64.shape[1] != 3:
            raise PortingError(f"--torch-input {self.kind} needs a 3-channel N x 3 x H x W input, the net's is "
                               f"{'x'.join(map(str, x64.shape))}")
        view = (1, 3, 1, 1)
        caffe_mean = torch.tensor(self.caffe_mean, dtype=torch.float64).view(view)
        picture = x64 + caffe_mean
        if self.order == "RGB":
            picture = picture.flip(1)
        picture = picture / 255.0 if self.range == 1.0 else picture * (self.range / 255.0)
        mean = torch.tensor(self.mean, dtype=torch.float64).view(view)
        std = torch.tensor(self.std, dtype=torch.float64).view(view)
        return (picture - mean) / std

    def describe(self) -> dict:
        if self.kind == "bgr255":
            return {"kind": "bgr255"}
        if self.kind == "rgb01":
            return {"kind": "rgb01", "mean_rgb": list(self.mean), "std_rgb": list(self.std),
                    "caffe_mean_bgr": list(self.caffe_mean)}
        return {"kind": self.kind, "channel_order": self.order, "range": self.range, "mean": list(self.mean),
                "std": list(self.std), "caffe_mean_bgr": list(self.caffe_mean)}


def parse_triple(text: str, option: str, positive: bool = False) -> tuple[float, float, float]:
    """"a,b,c" -> three finite floats (``positive``: each > 0); PortingError naming ``option``."""
    parts = str(text).split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        raise PortingError(f"expected three {'positive ' if positive else ''}numbers a,b,c, got {shown(text)}",
                           place=option)
    return values


def convention_from_options(kind=None, mean=None, std=None, caffe_mean=None) -> InputConvention:
    """The InputConvention of ``--torch-input`` (``kind``: "bgr255", the default, or "rgb01"),
    ``--torch-mean``, ``--torch-std`` (RGB, [0, 1] units) and ``--caffe-mean`` (BGR, 0-255):
    each triple "a,b,c" or three numbers, None for the default. PortingError naming the option."""
    kind = str(kind or "bgr255")
    given = {o: v if v is None or isinstance(v, str) else ",".join(map(str, v)) for o, v in (
        ("--torch-mean", mean), ("--torch-std", std), ("--caffe-mean", caffe_mean))}
    if kind.lower().endswith(".json"):
        if any(v is not None for v in given.values()):
            raise PortingError("--torch-mean, --torch-std and --caffe-mean are not taken with a JSON --torch-input "
                               "(the file holds them)")
        return read_convention(kind)
    if kind not in ("bgr255", "rgb01"):
        raise PortingError(f"expected bgr255, rgb01 or FILE.json, got {shown(kind)}", place="--torch-input")
    if kind == "bgr255":
        if any(v is not None for v in given.values()):
            raise PortingError("--torch-mean, --torch-std and --caffe-mean are taken only with --torch-input rgb01")
        return InputConvention(kind)
    return InputConvention(kind, parse_triple(given["--torch-mean"] or "0,0,0", "--torch-mean"),
                           parse_triple(given["--torch-std"] or "1,1,1", "--torch-std", positive=True),
                           parse_triple(given["--caffe-mean"], "--caffe-mean") if given["--caffe-mean"]
                           else IMAGENET_MEAN_BGR)


def read_convention(path) -> InputConvention:
    """An --torch-input FILE.json: {"channel_order": "RGB" | "BGR" (default RGB), "range": the
    picture's white (default 1: [0, 1]; 255: 0-255), "mean": [3 numbers] and "std": [3
    positive numbers] in that order and range (defaults 0 and 1), "caffe_mean": [B, G, R],
    0-255, the mean Caffe's input has had subtracted (default 104, 117, 123)}. RGB in [0, 1]
    is ``rgb01``; anything else ``custom``. Any other key or value: PortingError, one line."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise PortingError(f"expected a JSON object with keys among {', '.join(CONVENTION_KEYS)}", path)
    unknown = sorted(set(data) - set(CONVENTION_KEYS))
    if unknown:
        raise PortingError(f"unknown key (expected {', '.join(CONVENTION_KEYS)})", path, shown(unknown[0]))
    order = data.get("channel_order", "RGB")
    if order not in ("RGB", "BGR"):
        raise PortingError(f'expected "RGB" or "BGR", got {shown(json.dumps(order))}', path, "channel_order")
    scale = data.get("range", 1)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise PortingError(f"expected a positive number (1 or 255), got {shown(json.dumps(scale))}", path, "range")

    def triple(key, default, positive=False):
        value = data.get(key, default)
        if (not isinstance(value, list) or len(value) != 3 or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or (positive and v <= 0) for v in value)):
            raise PortingError(f"expected a list of three {'positive ' if positive else ''}numbers, got "
                               f"{shown(json.dumps(value), 80)}", path, key)
        return tuple(float(v) for v in value)

    mean, std = triple("mean", [0, 0, 0]), triple("std", [1, 1, 1], positive=True)
    caffe_mean = triple("caffe_mean", list(IMAGENET_MEAN_BGR))
    kind = "rgb01" if order == "RGB" and float(scale) == 1.0 else "custom"
    return InputConvention(kind, mean, std, caffe_mean, order, float(scale))
