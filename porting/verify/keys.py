"""The array-key scheme and the graph bookkeeping behind it: which layer output is which blob.

Every evaluation (Caffe through the legacy worker, the PyTorch port, its float64 twin, an
ONNX export) is a flat dict of NumPy arrays under the same keys:

* ``blob/<name>/data`` and ``blob/<name>/diff``: Caffe's own view of a blob after the
  forward and the backward pass. An in-place layer overwrites the data; after backward
  the diff is the gradient with respect to the *earliest* value of that name (an in-place
  layer's backward rewrites the diff of its bottom, which is the same memory).
* ``top/<layer>/<i>/data`` and ``top/<layer>/<i>/diff``: the i-th output of one layer, as
  that layer produced it (before any in-place layer overwrote it), and the gradient of
  the objective with respect to that output.

Layer and blob names may hold "/" themselves (GoogLeNet's "inception_3a/1x1"): keys are
parsed from the right. The legacy side (reference/caffe_ops.py, Python 2 inside the root)
writes the same keys with its own two lines.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

KINDS = ("data", "diff")


def top_key(layer: str, index: int, kind: str) -> str:
    """``top/<layer>/<index>/<kind>``: a layer's own i-th output (kind "data" or "diff")."""
    return f"top/{layer}/{int(index)}/{kind}"


def blob_key(blob: str, kind: str) -> str:
    """``blob/<name>/<kind>``: Caffe's view of a blob after the forward (data) or backward (diff)."""
    return f"blob/{blob}/{kind}"


def parse_key(key: str) -> tuple[str, str, int | None, str] | None:
    """("top", layer, index, kind) or ("blob", name, None, kind); None for any other key."""
    if key.startswith("top/") and key.count("/") >= 3:
        layer, index, kind = key[4:].rsplit("/", 2)
        if kind in KINDS and index.isdigit():
            return "top", layer, int(index), kind
        return None
    if key.startswith("blob/") and key.count("/") >= 2:
        blob, kind = key[5:].rsplit("/", 1)
        if kind in KINDS:
            return "blob", blob, None, kind
    return None



@dataclass(frozen=True)
class Value:
    """One layer output (pre-in-place): ``layer``'s top number ``index``, named ``blob``."""

    layer: str
    index: int
    blob: str
    position: int       # index of the layer in the net
    first: bool         # the first value of this blob name (its diff is blob/<name>/diff)
    last: bool          # the last value of this blob name (its data is blob/<name>/data)

    def key(self, kind: str) -> str:
        return top_key(self.layer, self.index, kind)


class NetValues:
    """Values of a graph, the value each layer's bottoms read, and who reads each value."""

    def __init__(self, graph):
        self.graph = graph
        self.specs = list(graph.layers)
        self.position = {s.name: i for i, s in enumerate(self.specs)}
        writers: dict[str, list[tuple[int, int]]] = {}
        for pos, spec in enumerate(self.specs):
            for i, top in enumerate(spec.tops):
                writers.setdefault(top, []).append((pos, i))
        self.values: list[Value] = []
        self.by_layer: dict[str, list[Value]] = {}
        for pos, spec in enumerate(self.specs):
            vals = []
            for i, top in enumerate(spec.tops):
                w = writers[top]
                vals.append(Value(spec.name, i, top, pos, w[0] == (pos, i), w[-1] == (pos, i)))
            self.by_layer[spec.name] = vals
            self.values.extend(vals)
        current: dict[str, Value] = {}
        self.bottoms: dict[str, list[Value | None]] = {}
        self.readers: dict[Value, list[tuple[str, int]]] = {v: [] for v in self.values}
        for spec in self.specs:
            self.bottoms[spec.name] = [current.get(b) for b in spec.bottoms]
            for slot, v in enumerate(self.bottoms[spec.name]):
                if v is not None:
                    self.readers[v].append((spec.name, slot))
            for v in self.by_layer[spec.name]:
                current[v.blob] = v
        self.first_value = {}
        self.last_value = {}
        for v in self.values:
            self.first_value.setdefault(v.blob, v)
            self.last_value[v.blob] = v

    def read(self, arrays: Mapping, value: Value, kind: str):
        """The array of ``value`` from ``arrays``, falling back on the blob view where it is the same."""
        key = value.key(kind)
        if key in arrays:
            return arrays[key]
        if (kind == "data" and value.last) or (kind == "diff" and value.first):
            return arrays.get(blob_key(value.blob, kind))
        return None

    def value_of_key(self, key: str) -> Value | None:
        """The value a key shows: top keys name it; blob data = last value, blob diff = first."""
        parsed = parse_key(key)
        if parsed is None:
            return None
        view, name, index, kind = parsed
        if view == "top":
            return next((v for v in self.by_layer.get(name, []) if v.index == index), None)
        return (self.last_value if kind == "data" else self.first_value).get(name)
