"""Write caffemodels (binary NetParameter with weights) and prototxts, atomically.

``write_caffemodel`` streams the protobuf wire format itself: the small part of each layer
(name, type, blob shapes) is serialized by protobuf, and each blob's ``data`` is appended
as one packed little-endian float32 field straight from the array, which is exactly what
protobuf would write, without building a 240 MB message in memory. Files appear whole or
not at all: written to a temporary file beside the target, then renamed.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from google.protobuf import text_format

from porting import caffe_pb2
from porting.errors import PortingError
from porting.files import atomic_open
from porting.upgrade import V0_LAYER_TYPES, V2_TO_V1_TYPE
from porting.wire import LEN, key, varint

FORMATS = ("v2", "v1", "v0")
_NET_LAYER_V2, _NET_LAYERS_V1 = 100, 2
_LAYER_V2_BLOBS, _LAYER_V1_BLOBS, _LAYER_V1_V0, _LAYER_V0_BLOBS = 7, 6, 1, 50
_BLOB_DATA = 5
# V1 enum -> V0 type string, for the types V0 had.
_V1_TO_V0_TYPE = {v1: v0 for v0, v1 in V0_LAYER_TYPES.items()}

LayerWeights = tuple[str, str, Sequence[np.ndarray]]


def write_caffemodel(path: str | os.PathLike, layers: Iterable[LayerWeights], format: str = "v2",
                     net_name: str = "") -> None:
    """Write ``layers`` — (name, V2 type string, list of arrays) in net order — as a caffemodel.

    ``format``: "v2" (``layer`` entries, blobs with BlobShape), "v1" (``layers`` entries,
    V1 enum types, blobs with legacy num/channels/height/width: arrays of fewer than 4
    dims are left-padded with 1s, so fc weights O x I are stored 1x1xOxI and biases
    1x1x1xO, as Caffe wrote them then) or "v0" (``layers { layer { name type blobs } }``
    with V0 type strings and legacy dims). Arrays are stored as float32.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    with atomic_open(path, "wb") as f:
        if net_name:
            f.write(caffe_pb2.NetParameter(name=net_name).SerializeToString())
        for name, type_name, arrays in layers:
            arrays = [_as_float32(a) for a in arrays]
            head, blob_field, net_field, wrap_v0 = _layer_head(name, type_name, format, path)
            blob_heads = [_blob_head(a, format != "v2", path, f"layer {name}") for a in arrays]
            blobs_len = sum(_field_len(blob_field, _blob_len(h, a)) for h, a in zip(blob_heads, arrays))
            if wrap_v0:  # the blobs live inside the V0 layer message, field 1 of the V1 entry
                inner_len = len(head) + blobs_len
                entry_len = _field_len(_LAYER_V1_V0, inner_len)
                f.write(key(net_field, LEN) + varint(entry_len) + key(_LAYER_V1_V0, LEN) + varint(inner_len) + head)
            else:
                f.write(key(net_field, LEN) + varint(len(head) + blobs_len) + head)
            for h, a in zip(blob_heads, arrays):
                f.write(key(blob_field, LEN) + varint(_blob_len(h, a)) + h)
                f.write(key(_BLOB_DATA, LEN) + varint(a.nbytes))
                f.write(memoryview(a.reshape(-1)).cast("B"))


def write_prototxt(path: str | os.PathLike, net: caffe_pb2.NetParameter) -> None:
    """Write ``net`` in protobuf text format (what Caffe reads as a .prototxt), atomically.
    The fields of registered fork layers (kept unknown in ``caffe_pb2``) are written too."""
    from porting.layers import from_caffe

    with atomic_open(path, "w") as f:
        f.write(text_format.MessageToString(from_caffe(net)))


def _layer_head(name: str, type_name: str, format: str, path):
    """The layer's serialized fields other than blobs; blob field; NetParameter field; V0 wrap."""
    if format == "v2":
        head = caffe_pb2.LayerParameter(name=name, type=type_name)
        return head.SerializeToString(), _LAYER_V2_BLOBS, _NET_LAYER_V2, False
    if type_name not in V2_TO_V1_TYPE:
        raise PortingError(f"layer type {type_name!r} has no V1 enum value", path, f"layer {name}")
    v1_type = V2_TO_V1_TYPE[type_name]
    if format == "v1":
        head = caffe_pb2.V1LayerParameter(name=name, type=v1_type)
        return head.SerializeToString(), _LAYER_V1_BLOBS, _NET_LAYERS_V1, False
    if v1_type not in _V1_TO_V0_TYPE:
        raise PortingError(f"layer type {type_name!r} did not exist in V0", path, f"layer {name}")
    head = caffe_pb2.V0LayerParameter(name=name, type=_V1_TO_V0_TYPE[v1_type])
    return head.SerializeToString(), _LAYER_V0_BLOBS, _NET_LAYERS_V1, True


def _blob_head(a: np.ndarray, legacy: bool, path, where: str) -> bytes:
    blob = caffe_pb2.BlobProto()
    if legacy:
        if a.ndim > 4:
            raise PortingError(f"a {a.ndim}-D blob cannot be stored with legacy 4-D dims", path, where)
        blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - a.ndim) + a.shape
    else:
        blob.shape.SetInParent()  # a 0-axis blob (channel-shared PReLU) keeps an empty shape
        blob.shape.dim.extend(a.shape)
    return blob.SerializeToString()


def _as_float32(a) -> np.ndarray:
    return np.require(np.asarray(a, dtype="<f4"), requirements="C")  # keeps 0-d arrays 0-d


def _blob_len(head: bytes, a: np.ndarray) -> int:
    return len(head) + _field_len(_BLOB_DATA, a.nbytes)


def _field_len(field_no: int, payload: int) -> int:
    return len(key(field_no, LEN)) + len(varint(payload)) + payload


