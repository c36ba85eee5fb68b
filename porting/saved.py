"""Converted models on disk: one safetensors file, no pickled code.

The file holds every parameter blob as a tensor under its state_dict key
(``<layer>.<blob index>``) and, in the safetensors metadata, the upgraded V2 net
definition as prototxt text plus the phase and the input shapes. Loading rebuilds the graph from that text
and needs neither the original prototxt nor the caffemodel.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from google.protobuf import text_format
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from porting.errors import PortingError
from porting.files import atomic_path
from porting.layers import from_caffe, schema, to_caffe

FORMAT = "caffe-port-harness/1"


def save_converted(net, path: str | os.PathLike, phase: str = "test") -> None:
    """Write ``net`` (a CaffeNet) to ``path`` atomically."""
    path = Path(path)
    meta = {"format": FORMAT, "phase": phase,
            "prototxt": text_format.MessageToString(from_caffe(net.graph.to_netparameter())),
            "input_shapes": json.dumps({k: list(v) for k, v in net.graph.inputs.items()})}
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_converted(path: str | os.PathLike):
    """Load a file written by ``save_converted`` into a CaffeNet."""
    from safetensors import safe_open

    from porting.graph import WeightBlob, build_graph
    from porting.net import CaffeNet

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise PortingError("no such file", path) from None
    except (SafetensorError, OSError, ValueError) as err:
        raise PortingError(f"not a converted model ({err})", path) from None
    if meta.get("format") != FORMAT:
        raise PortingError(f"not a converted model (format {meta.get('format')!r}, expected {FORMAT!r})", path)
    net = schema().NetParameter()  # with the fields of fork layers (plugins)
    text_format.Parse(meta["prototxt"], net)
    net = to_caffe(net)
    try:  # the input shapes the net was built with (a data layer's come from --input-shape)
        shapes = json.loads(meta.get("input_shapes", "{}"))
        shapes = {str(k): tuple(int(d) for d in v) for k, v in shapes.items()
                  if isinstance(v, list) and all(type(d) is int for d in v)}
    except (ValueError, AttributeError, TypeError):
        raise PortingError("not a converted model (its input_shapes are not a JSON object of shapes)", path) from None
    names = {layer.name for layer in net.layer}
    weights: dict[str, list[WeightBlob]] = {}
    for key, tensor in tensors.items():
        layer, index = key.rsplit(".", 1)
        if layer not in names:  # files written before keys kept dots had "\u2024" for "."
            layer = layer.replace("\u2024", ".")
        weights.setdefault(layer, []).append((int(index), tensor))
    weights = {name: [WeightBlob(t.numpy().reshape(-1), tuple(t.shape)) for _, t in sorted(blobs)]
               for name, blobs in weights.items()}
    return CaffeNet(build_graph(net, meta.get("phase", "test"), weights, source=path, input_shapes=shapes))
