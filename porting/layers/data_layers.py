"""Caffe's data layers as net inputs: Data, ImageData, HDF5Data, MemoryData, WindowData, DummyData.

A data layer's tops are inputs of the port, fed by the caller exactly as the Input
layer's are: ``net(data=x, label=y)``. The port never opens a data source: no LMDB or
LevelDB, no image list or image, no HDF5 file, no window file and no mean_file is read
(they are files from strangers, and reading them is Caffe's data pipeline, not the net).
So the caller feeds the *transformed* blob, as Caffe's layer outputs it: cropped,
mirrored, mean-subtracted and scaled already. ``transform_param``'s ``mean_file``,
``mean_value``, ``scale`` and ``mirror`` change values, not shapes, and do not apply here.

Each top's shape is Caffe's own arithmetic on the layer's parameters (its
``DataLayerSetUp`` and ``DataTransformer::InferBlobShape``, Caffe 1.0):

* Data: ``batch_size x C x H x W``; H and W are ``crop_size`` when set, else the
  records'; C is the records' (the ``mean_value`` count when it gives more than one, as
  Caffe's Transform CHECKs that count against the channels). Label: ``(batch_size,)``.
* ImageData: ``batch_size x (3 if is_color else 1) x H x W``; H, W are ``crop_size``, else
  ``new_height``/``new_width``, else the first image's. Label: ``(batch_size,)``.
* WindowData: ``batch_size x C x crop_size x crop_size``, C from the window file's
  records. Label: ``batch_size x 1 x 1 x 1``.
* MemoryData: ``batch_size x channels x height x width``; label ``batch_size x 1 x 1 x 1``
  (Caffe's Forward reshapes it so; its set-up said ``(batch_size,)``).
* HDF5Data: each top is its dataset's shape with ``batch_size`` first: only N is known.
* DummyData: ``shape`` (one for all tops or one per top), or the legacy num, channels,
  height, width (each once or once per top). Its filler values are not reproduced: the
  caller feeds them.

A dim the prototxt cannot give is ``None`` in ``top_shapes`` until ``--input-shape
top=N,C,H,W`` (``apply_input_shapes``) gives the whole shape; the same option overrides a
known shape (any input layer's, Input's too). ``shape_sources`` says, per top, where the
shape comes from (``porting inspect`` prints it).

For real Caffe, which cannot run a data layer without its source, ``caffe_net_with_inputs``
rewrites the NetParameter: each data layer kept in the phase becomes an Input layer of the
same tops and shapes (``porting verify`` and the tests run that net in the legacy worker).
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from porting import caffe_pb2
from porting.errors import PortingError, shown
from porting.layers import MAX_BLOB_AXES, CaffeLayer, caffe_int, register
from porting.layers.input_layer import FedLayer

INPUT_SHAPE_OPTION = "--input-shape"


class _DataLayer(FedLayer):
    """A data layer (its tops fed by the caller); subclasses give ``infer()``."""

    verified_by = ("tests/test_data_layers.py",)
    top_range: tuple[int, int] = (1, 1)  # (min, max) number of tops; max -1: any

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(0)
        tops = list(spec.param.top)
        low, high = self.top_range
        if len(tops) < low or (high >= 0 and len(tops) > high):
            want = str(low) if low == high else f"{low}+" if high < 0 else f"{low} to {high}"
            raise ValueError(f"{self.type_name} takes {want} top blob(s), got {len(tops)}")
        self.tops = tops
        self.top_shapes, self.shape_sources, self.unknown_why = [], [], {}
        for top, (shape, source, why) in zip(tops, self.infer()):
            shape = tuple(None if d is None else int(d) for d in shape)
            self.top_shapes.append(shape)
            if None in shape:
                self.unknown_why[top] = why
                source = unknown_source(top, shape)
            self.shape_sources.append(source)

    def infer(self) -> list[tuple[tuple, str, str | None]]:  # pragma: no cover - overridden
        """Per top: (shape with None for unknown dims, where it comes from, why a dim is unknown)."""
        raise NotImplementedError

    def transform(self) -> caffe_pb2.TransformationParameter:
        tp = self.spec.param.transform_param
        if tp.HasField("mean_file") and len(tp.mean_value):
            raise ValueError("transform_param gives both mean_file and mean_value (Caffe's DataTransformer "
                             "refuses them together)")
        return tp

    def describe(self) -> str:
        return " ".join("x".join("?" if d is None else str(d) for d in s) for s in self.top_shapes)


def unknown_source(top: str, shape: Sequence[int | None]) -> str:
    """The inspect text of a top whose shape the prototxt cannot give."""
    return f"unknown: give {INPUT_SHAPE_OPTION} {top}={_hint(shape)}"


def _hint(shape: Sequence[int | None]) -> str:
    letters = "NCHW" if len(shape) == 4 else "N" + "D" * (len(shape) - 1)
    dims = [str(d) if d is not None else letters[i] for i, d in enumerate(shape)]
    return ",".join(dims) if len(shape) > 1 else f"{dims[0]},..."


def _crop(tp) -> int:
    return caffe_int(tp.crop_size, "crop_size")


@register("Data", v1="DATA")
class Data(_DataLayer):
    """LMDB/LevelDB records (never opened): see the module docstring for the shapes."""

    top_range = (1, 2)
    param_fields = ("data_param", "transform_param")

    def infer(self):
        tp = self.transform()
        n = caffe_int(self.spec.param.data_param.batch_size, "batch_size")
        crop = _crop(tp)
        channels = len(tp.mean_value) if len(tp.mean_value) > 1 else None
        used = ["batch_size"] + (["crop_size"] if crop else []) + (["mean_value count"] if channels else [])
        shape = (n, channels, crop or None, crop or None)
        why = "Data reads its records' channels" + ("" if crop else ", height and width") + \
              " from its LMDB/LevelDB, which the port never opens"
        out = [(shape, _and(used), why)]
        if len(self.tops) > 1:
            out.append(((n,), "batch_size", None))
        return out


@register("ImageData", v1="IMAGE_DATA")
class ImageData(_DataLayer):
    """Images from a list file (never opened): see the module docstring for the shapes."""

    top_range = (2, 2)
    param_fields = ("image_data_param", "transform_param")

    def infer(self):
        tp, ip = self.transform(), self.spec.param.image_data_param
        n = caffe_int(ip.batch_size, "batch_size")
        if n <= 0:
            raise ValueError("ImageData needs a positive batch_size")
        new_h, new_w = caffe_int(ip.new_height, "new_height"), caffe_int(ip.new_width, "new_width")
        if not ((new_h == 0 and new_w == 0) or (new_h > 0 and new_w > 0)):
            raise ValueError("ImageData needs new_height and new_width set together")
        crop = _crop(tp)
        if crop and new_h and (new_h < crop or new_w < crop):
            raise ValueError(f"crop_size {crop} is larger than the resized image {new_h}x{new_w}")
        channels = 3 if ip.is_color else 1
        if crop:
            hw, used = (crop, crop), "batch_size, is_color and crop_size"
        elif new_h:
            hw, used = (new_h, new_w), "batch_size, is_color and new_height/new_width"
        else:
            hw, used = (None, None), ""
        why = "ImageData takes height and width from its first image, which the port never opens"
        return [((n, channels) + hw, used, why), ((n,), "batch_size", None)]


@register("WindowData", v1="WINDOW_DATA")
class WindowData(_DataLayer):
    """Windows of images listed in a window file (never opened)."""

    top_range = (2, 2)
    param_fields = ("window_data_param", "transform_param")

    def infer(self):
        tp, wp = self.transform(), self.spec.param.window_data_param
        n, crop = caffe_int(wp.batch_size, "batch_size"), _crop(tp)
        if crop <= 0:
            raise ValueError("WindowData needs a positive transform_param.crop_size")
        why = "WindowData takes the channels from its window file, which the port never opens"
        return [((n, None, crop, crop), "batch_size and crop_size", why),
                ((n, 1, 1, 1), "batch_size", None)]


@register("MemoryData", v1="MEMORY_DATA")
class MemoryData(_DataLayer):
    """Arrays the caller hands Caffe (``set_input_arrays``); here, handed to the net."""

    top_range = (2, 2)

    def infer(self):
        mp = self.spec.param.memory_data_param
        dims = [caffe_int(getattr(mp, f), f) for f in ("batch_size", "channels", "height", "width")]
        if dims[0] * dims[1] * dims[2] * dims[3] <= 0:
            raise ValueError("MemoryData needs batch_size, channels, height and width, all positive")
        return [(tuple(dims), "memory_data_param", None), ((dims[0], 1, 1, 1), "batch_size", None)]


@register("HDF5Data", v1="HDF5_DATA")
class HDF5Data(_DataLayer):
    """Datasets of HDF5 files (never opened): only the batch size is known."""

    top_range = (1, -1)

    def infer(self):
        n = caffe_int(self.spec.param.hdf5_data_param.batch_size, "batch_size")
        why = "HDF5Data takes each top's shape from its dataset in the HDF5 file, which the port never opens"
        return [((n, None, None, None), "", why) for _ in self.tops]


@register("DummyData", v1="DUMMY_DATA")
class DummyData(_DataLayer):
    """Tops of the shapes it declares; their filler values are the caller's to feed."""

    top_range = (1, -1)

    def infer(self):
        dp, k = self.spec.param.dummy_data_param, len(self.tops)
        if len(dp.data_filler) not in (0, 1, k):
            raise ValueError(f"DummyData gives {len(dp.data_filler)} data_filler for {k} tops; give 0, 1 or {k}")
        legacy = [(f, list(getattr(dp, f))) for f in ("num", "channels", "height", "width")]
        if any(values for _, values in legacy):
            if len(dp.shape):
                raise ValueError("DummyData gives both shape and num/channels/height/width")
            for field, values in legacy:
                if len(values) not in (1, k):
                    raise ValueError(f"DummyData gives {len(values)} {field} for {k} tops; give 1 or {k}")
            shapes = [tuple(caffe_int(v[0] if len(v) == 1 else v[i], f) for f, v in legacy) for i in range(k)]
        else:
            if len(dp.shape) not in (1, k):
                raise ValueError(f"DummyData gives {len(dp.shape)} shape for {k} tops; give 1 or {k}")
            shapes = [tuple(caffe_int(d, "DummyData dim") for d in dp.shape[0 if len(dp.shape) == 1 else i].dim)
                      for i in range(k)]
        return [(s, "dummy_data_param", None) for s in shapes]


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# ------------------------------------------------------------------ --input-shape

def parse_input_shapes(values: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``["data=2,3,227,227", ...]`` -> {"data": (2, 3, 227, 227)}; PortingError (place
    ``--input-shape``) on a malformed value. A name given twice keeps the last."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values or ():
        name, eq, dims = str(value).rpartition("=")
        if not eq or not name:
            raise PortingError(f"{shown(value)} is not NAME=N,C,H,W", place=INPUT_SHAPE_OPTION)
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise PortingError(f"{shown(value)}: dims must be integers separated by commas",
                               place=INPUT_SHAPE_OPTION) from None
        if len(shape) > MAX_BLOB_AXES or any(d < 0 for d in shape):
            raise PortingError(f"{shown(value)}: dims must be non-negative, at most {MAX_BLOB_AXES} of them",
                               place=INPUT_SHAPE_OPTION)
        try:
            shapes[name] = tuple(caffe_int(d, "dim") for d in shape)
        except ValueError as err:
            raise PortingError(f"{shown(value)}: {err}", place=INPUT_SHAPE_OPTION) from None
    return shapes


def add_input_shape_option(parser: argparse.ArgumentParser) -> None:
    """``--input-shape NAME=N,C,H,W`` (repeatable) for a command that builds a net."""
    parser.add_argument(INPUT_SHAPE_OPTION, action="append", metavar="NAME=N,C,H,W", dest="input_shape",
                        help="the shape of an input blob (a data layer's top, which the port never reads "
                             "from its source; or any input, to override); repeatable")


def input_shapes_from_args(args) -> dict[str, tuple[int, ...]]:
    return parse_input_shapes(getattr(args, "input_shape", None))


def apply_input_shapes(module: CaffeLayer, tops: Sequence[str], given: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Give an input layer's ``module`` the shapes of ``given`` for its ``tops`` (overriding
    its own) and set its ``shape_sources``; returns the tops whose shape is still unknown."""
    shapes = list(module.top_shapes)
    sources = list(getattr(module, "shape_sources", None) or ["input_param"] * len(tops))
    for i, top in enumerate(tops):
        if top in given:
            shapes[i], sources[i] = tuple(given[top]), INPUT_SHAPE_OPTION
    module.top_shapes, module.shape_sources = shapes, sources
    return [t for t, s in zip(tops, shapes) if None in s]


def unknown_shape_problem(module: CaffeLayer, top: str) -> str:
    """The one-line problem of a top whose shape nobody gave."""
    i = list(module.spec.param.top).index(top)
    why = getattr(module, "unknown_why", {}).get(top) or "the prototxt does not give it"
    return f"the shape of top {shown(top)} is unknown ({why}); give {INPUT_SHAPE_OPTION} " \
           f"{shown(top)}={_hint(module.top_shapes[i])}"


def input_shape_lines(graph) -> list[str]:
    """``porting inspect``'s line per input top: its shape and where the shape comes from."""
    from porting.layers import LAYERS

    lines = []
    for spec in graph.layers:
        if not spec.is_input:
            continue
        module = spec.module
        if module is None:  # inference stopped before it (inspect): read its own parameters
            try:
                module = LAYERS[spec.type](spec, [])
            except (ValueError, IndexError) as err:
                lines.append(f"input {', '.join(map(shown, spec.tops))}: {err}")
                continue
        sources = getattr(module, "shape_sources", None) or ["input_param"] * len(spec.tops)
        for top, shape, source in zip(spec.tops, module.top_shapes, sources):
            dims = "x".join("?" if d is None else str(d) for d in shape)
            said = source if source.startswith("unknown") else f"from {source}"
            lines.append(f"input {shown(top)} ({shown(spec.type)} {shown(spec.name)}): {dims or '()'}, shape {said}")
    return lines


# ------------------------------------------------------------------ the Caffe side

def is_data_layer(type_name: str) -> bool:
    """A registered input type other than Input (what Caffe cannot run without its source)."""
    from porting.layers import LAYERS

    cls = LAYERS.get(type_name)
    return cls is not None and cls.is_input and issubclass(cls, _DataLayer)


def caffe_net_with_inputs(graph) -> caffe_pb2.NetParameter:
    """The graph's net for real Caffe: every data layer an Input layer of the same tops and
    the graph's shapes, every other layer as it is (the graph's layers are those of its
    phase, include/exclude rules cleared since the phase chose them already).

    Caffe then runs the net on the arrays the caller feeds, as the port does; the weights
    match by layer name as before. ``porting verify`` and the tests give this net to the
    legacy worker when the prototxt has data layers."""
    net = caffe_pb2.NetParameter(name=graph.name)
    for spec in graph.layers:
        layer = net.layer.add()
        if is_data_layer(spec.type):
            layer.name, layer.type = spec.param.name, "Input"
            layer.top.extend(spec.tops)
            for top in spec.tops:
                layer.input_param.shape.add().dim.extend(graph.blob_shapes[top])
        else:
            layer.CopyFrom(spec.param)
            del layer.blobs[:]
            layer.ClearField("phase")
        del layer.include[:]
        del layer.exclude[:]
    return net
