"""The caffemodel wire walker (``porting.parse.read_caffemodel``) against protobuf's own parser.

``read_caffemodel`` walks the protobuf wire format itself (blob data become views of the
file's map) and hands protobuf only what is left. It must read every file exactly as
protobuf does (``caffe_pb2.NetParameter.FromString``, the upb backend), hence as Caffe
does: the differential test below starts from real small caffemodels (written by
``porting.write`` and by protobuf, in the V2, V1 and V0 layouts), mutates them at the
wire level with a seeded generator, and requires for every input that

* both refuse (ours with a one-line ``PortingError`` naming the file), or
* both accept, and per layer (file order, a repeated name keeping its last blobs, the
  V1/V0 selection ``read_caffemodel`` documents) and per blob, the data are equal bit for
  bit (protobuf's view: ``double_data`` rounded to float32 when it has values, else
  ``data``), the shape or legacy dims are equal, and so is the diff count Caffe checks;
  ``read_caffemodel_net`` equals protobuf's parse with data and diff cleared.

Where ours may refuse what protobuf accepts (the exceptions, kept short):

* ``NO_LAYERS``: a file with no layer entries at all. Protobuf parses any such bytes as an
  empty net (a text file, most short binary files); Caffe's ``CopyTrainedLayersFrom``
  would then copy nothing and leave every layer at its filler values without a word. The
  port refuses it as "not a Caffe caffemodel", its rule for foreign files.
* ``V0_UPGRADE``: a V0 file (``layers { layer {..} }``) on which Caffe's ``UpgradeV0Net``
  aborts: ``CopyTrainedLayersFromBinaryProto`` runs ``UpgradeNetAsNeeded`` on the
  caffemodel's net before copying, and ``UpgradeV0PaddingLayers`` LOG(FATAL)s on a bottom
  no earlier layer (or net input) produced and CHECKs a padding layer's consumer,
  ``UpgradeV0LayerType`` LOG(FATAL)s on an unknown V0 type (src/caffe/util/upgrade_proto.cpp).
  The port refuses with ``porting.upgrade``'s message for it.
* Files over 2 GB (Caffe's ``ReadProtoFromBinaryFile`` sets the total-bytes limit to
  ``INT_MAX``, src/caffe/util/io.cpp): not reachable here, see ``test_file_over_2gb``.

Blob-level rules Caffe checks only when it copies a layer (``Blob::FromProto``: the data
and diff counts equal the blob's count; ``ShapeEquals``) are not parse rules: they are
checked by ``porting.graph`` against the net, and tested at the end of this file.
"""
from __future__ import annotations

import copy
import struct
import sys
import time
from dataclasses import dataclass, field as dataclass_field

import numpy as np
import pytest
from google.protobuf import message as pb_message
from hypothesis import given, settings, strategies as st

from porting import caffe_pb2, load_caffe
from porting.errors import PortingError
from porting.parse import read_caffemodel, read_caffemodel_net
from porting.upgrade import upgrade_v0_net
from porting.wire import EGROUP, I32, I64, LEN, SGROUP, VARINT, key, varint
from porting.write import write_caffemodel

BLOB_FIELDS = {"data": 5, "diff": 6, "double_data": 8, "double_diff": 9}


# --------------------------------------------------------------------------- wire encoding


def len_field(number: int, payload: bytes) -> bytes:
    return key(number, LEN) + varint(len(payload)) + payload


@dataclass
class Field:
    """One field of a message tree. ``value``: the payload bytes, or a ``Msg`` for the
    messages the walker looks into (layers, V0 layers, blobs). The ``*_width`` and
    ``wire_as``/``length_as`` overrides make non-minimal or inconsistent encodings."""

    number: int
    wire: int
    value: object
    key_width: int | None = None
    length_width: int | None = None
    wire_as: int | None = None  # the wire type written in the key (the value keeps ``wire``'s encoding)
    length_as: int | None = None  # the length written (the payload keeps its own)

    def encode(self) -> bytes:
        payload = self.value.encode() if isinstance(self.value, Msg) else self.value
        head = key(self.number, self.wire if self.wire_as is None else self.wire_as, self.key_width)
        if self.wire == LEN:
            n = len(payload) if self.length_as is None else self.length_as
            return head + varint(n, self.length_width) + payload
        if self.wire == SGROUP:
            return head + payload + key(self.number, EGROUP)
        return head + payload


@dataclass
class Msg:
    kind: str  # "net", "layer", "v1", "v0", "blob", "other"
    fields: list[Field] = dataclass_field(default_factory=list)

    def encode(self) -> bytes:
        return b"".join(f.encode() for f in self.fields)


# Which LEN fields of which message the walker parses as messages of which kind.
SUB = {("net", 100): "layer", ("net", 2): "v1", ("layer", 7): "blob", ("v1", 6): "blob",
       ("v1", 1): "v0", ("v0", 50): "blob"}


def parse(data: bytes, kind: str = "net") -> Msg:
    """A valid serialized message as a tree (the seeds only: no error handling needed)."""
    msg, pos = Msg(kind), 0
    while pos < len(data):
        key_at = pos
        tag, pos = _read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        key_width, length_width = pos - key_at, None
        if wire == VARINT:
            _, end = _read_varint(data, pos)
        elif wire == I64:
            end = pos + 8
        elif wire == I32:
            end = pos + 4
        elif wire == LEN:
            length_at = pos
            n, pos = _read_varint(data, pos)
            end, length_width = pos + n, pos - length_at
        else:
            raise AssertionError(f"seed has wire type {wire}")
        value = data[pos:end]
        if wire == LEN and (kind, number) in SUB:
            value = parse(value, SUB[kind, number])
        padded_key = key_width if key_width > len(varint(tag)) else None  # kept only when non-minimal
        padded_length = length_width if length_width and length_width > len(varint(end - pos)) else None
        msg.fields.append(Field(number, wire, value, padded_key, padded_length))
        pos = end
    return msg


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


# --------------------------------------------------------------------------- protobuf's view
def protobuf_parse(data: bytes) -> caffe_pb2.NetParameter | None:
    """Protobuf's parse, or None when it refuses; FromString and MergeFromString agree."""
    try:
        net = caffe_pb2.NetParameter.FromString(data)
    except pb_message.DecodeError:
        net = None
    merged = caffe_pb2.NetParameter()
    try:
        merged.MergeFromString(data)
    except pb_message.DecodeError:
        merged = None
    assert (net is None) == (merged is None)
    assert net is None or net == merged
    return net


def _raw(blob: caffe_pb2.BlobProto, name: str, dtype: str) -> np.ndarray:
    """A repeated float/double field's values with their exact bits, as protobuf stores
    them (its own serialization of that one field: packed, so one key, one length)."""
    only = caffe_pb2.BlobProto()
    getattr(only, name).MergeFrom(getattr(blob, name))  # copies stored values, not via Python floats
    wire = only.SerializeToString()
    if not wire:
        return np.zeros(0, dtype)
    n, start = _read_varint(wire, 1)
    assert len(wire) == start + n
    return np.frombuffer(wire[start:], dtype)


def protobuf_weights(net: caffe_pb2.NetParameter) -> dict:
    """{layer name: [(data, shape, legacy_dims, diff_count), ...]} as read_caffemodel documents it."""
    if len(net.layers):
        v0 = any(entry.HasField("layer") for entry in net.layers)
        layers = [entry.layer if v0 else entry for entry in net.layers
                  if not (v0 and entry.layer.type == "padding")]
    else:
        layers = list(net.layer)
    out = {}
    for layer in layers:
        blobs = []
        for blob in layer.blobs:
            doubles = _raw(blob, "double_data", "<f8")
            if len(doubles):
                with np.errstate(over="ignore", invalid="ignore"):
                    data = doubles.astype(np.float32)
            else:
                data = _raw(blob, "data", "<f4")
            diff_count = len(blob.double_diff) or len(blob.diff)
            if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
                blobs.append((data, None, (blob.num, blob.channels, blob.height, blob.width), diff_count))
            else:
                blobs.append((data, tuple(blob.shape.dim), None, diff_count))
        out[layer.name] = blobs
    return out


def caffe_v0_upgrade_aborts(net: caffe_pb2.NetParameter, path) -> str | None:
    """The error of porting.upgrade's V0 upgrade (Caffe's UpgradeV0Net, which
    CopyTrainedLayersFromBinaryProto runs on the caffemodel), if it aborts on ``net``."""
    if not any(entry.HasField("layer") for entry in net.layers):
        return None
    try:
        upgrade_v0_net(net, source=path)
    except PortingError as err:
        return str(err)
    except ValueError:  # a string not UTF-8: not checked (see parse.py)
        pass
    return None


def without_data(net: caffe_pb2.NetParameter) -> bytes:
    net = caffe_pb2.NetParameter.FromString(net.SerializeToString())
    blobs = [b for l in net.layer for b in l.blobs] + [b for l in net.layers for b in l.blobs]
    blobs += [b for l in net.layers for b in l.layer.blobs]
    for blob in blobs:
        for name in BLOB_FIELDS:
            blob.ClearField(name)
    return net.SerializeToString(deterministic=True)


def compare(data: bytes, path) -> str:
    """Check one input; returns "refused", "accepted" or "no-layers" (the exception)."""
    path.write_bytes(data)
    net = protobuf_parse(data)
    try:
        ours = read_caffemodel(path)
    except PortingError as err:
        message = str(err)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        if net is not None and caffe_v0_upgrade_aborts(net, path):
            assert message == caffe_v0_upgrade_aborts(net, path), message  # V0_UPGRADE
            assert without_data(read_caffemodel_net(path)) == without_data(net)  # not upgraded
            return "v0-upgrade"
        with pytest.raises(PortingError):
            read_caffemodel_net(path)
        if net is not None and not len(net.layer) and not len(net.layers):
            assert "no layer entries" in message or "empty file" in message, message  # NO_LAYERS
            return "no-layers"
        assert net is None, f"ours refused what protobuf accepts: {message}"
        return "refused"
    assert net is not None, "ours accepted what protobuf refuses"
    theirs = protobuf_weights(net)
    assert list(ours) == list(theirs)
    for name, blobs in theirs.items():
        assert len(ours[name]) == len(blobs), name
        for got, (data, shape, legacy, diff_count) in zip(ours[name], blobs):
            assert got.data.dtype == np.float32 and got.data.ndim == 1
            assert got.data.tobytes() == data.astype("<f4").tobytes(), name
            assert (got.shape, got.legacy_dims, got.diff_count) == (shape, legacy, diff_count), name
    assert without_data(read_caffemodel_net(path)) == without_data(net)
    return "accepted"


# --------------------------------------------------------------------------- seeds
def _rand(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def seeds(tmp_path) -> dict[str, bytes]:
    """Small real caffemodels in every layout and encoding the walker reads."""
    rng = np.random.default_rng(7)
    layers = [("conv", "Convolution", [_rand(rng, 2, 1, 2, 2), _rand(rng, 2)]),
              ("relu", "ReLU", []),
              ("fc", "InnerProduct", [_rand(rng, 3, 8), _rand(rng, 3)])]
    out = {}
    for fmt in ("v2", "v1", "v0"):
        write_caffemodel(tmp_path / f"{fmt}.caffemodel", layers, format=fmt, net_name="seed")
        out[f"write-{fmt}"] = (tmp_path / f"{fmt}.caffemodel").read_bytes()

    # protobuf, V2: double_data, diff and double_diff, legacy dims, an empty blob, params
    net = caffe_pb2.NetParameter(name="pb", input=["data"], input_dim=[1, 1, 2, 2])
    conv = net.layer.add(name="conv", type="Convolution", bottom=["data"], top=["conv"])
    conv.convolution_param.num_output = 2
    conv.blobs.add(shape=caffe_pb2.BlobShape(dim=[2, 1, 1, 2]), data=_rand(rng, 4), diff=_rand(rng, 4))
    conv.blobs.add(shape=caffe_pb2.BlobShape(dim=[2]), double_data=[0.1, -1e300], double_diff=[1.0, 2.0])
    fc = net.layer.add(name="fc", type="InnerProduct")
    fc.blobs.add(num=1, channels=1, height=2, width=3, data=_rand(rng, 6))
    fc.blobs.add(shape=caffe_pb2.BlobShape(dim=[]))
    net.layer.add(name="fc", type="InnerProduct").blobs.add(shape=caffe_pb2.BlobShape(dim=[1]), data=[5.0])
    out["protobuf-v2"] = net.SerializeToString()

    # protobuf, V1 with both `layers` and `layer` entries (the V2 ones are dropped)
    net = caffe_pb2.NetParameter(name="pb1")
    v1 = net.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT, bottom=["x"], top=["y"])
    v1.blobs.add(num=1, channels=1, height=2, width=2, data=_rand(rng, 4))
    v1.blobs.add(num=1, channels=1, height=1, width=2, double_data=[3.5, -0.25])
    net.layer.add(name="ignored").blobs.add(data=[1.0])
    out["protobuf-v1"] = net.SerializeToString()

    # protobuf, V0 entries: a padding layer (with a blob, which Caffe drops with the
    # layer), one entry without a V0 layer
    net = caffe_pb2.NetParameter(name="pb0", input=["data"])
    entry = net.layers.add(bottom=["data"], top=["pad1"])
    entry.layer.name, entry.layer.type, entry.layer.pad = "pad1", "padding", 1
    entry.layer.blobs.add(data=[7.0])
    entry = net.layers.add(bottom=["pad1"], top=["conv1"])
    entry.layer.name, entry.layer.type = "conv1", "conv"
    entry.layer.blobs.add(num=2, channels=1, height=1, width=1, data=[3.0, 4.0], diff=[0.0, 1.0])
    net.layers.add(bottom=["conv1"], top=["conv1"])
    out["protobuf-v0"] = net.SerializeToString()

    # hand-written: unpacked and mixed encodings, empty repeated fields, padded keys
    values = _rand(rng, 5)
    blob = (caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[5])).SerializeToString()
            + len_field(8, b"")  # an empty double_data: data wins (Blob::FromProto)
            + len_field(5, values[:2].tobytes())
            + b"".join(b"\x2d" + v.tobytes() for v in values[2:4])
            + key(5, I32, 2) + values[4:].tobytes()  # a padded key
            + len_field(6, b""))  # an empty diff
    doubles = (caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[3])).SerializeToString()
               + b"".join(b"\x41" + struct.pack("<d", v) for v in (0.5, 1e-3, 7.0))
               + b"\x49" + struct.pack("<d", 9.0)  # an unpacked double_diff
               + len_field(9, struct.pack("<dd", 1.0, 2.0)))
    head = caffe_pb2.LayerParameter(name="mixed", type="Scale").SerializeToString()
    layer = head + len_field(7, blob) + len_field(7, doubles)
    out["hand-v2"] = len_field(1, b"hand") + len_field(100, layer)
    return out


# --------------------------------------------------------------------------- mutations
NAN_FLOATS = [0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x7FBFFFFF, 0x7F800000, 0x00000001, 0x80000000]
NAN_DOUBLES = [0x7FF0000000000001, 0x7FF8000000000001, 0xFFF0000000000000, 0x7FEFFFFFFFFFFFFF,
               0x47EFFFFFF0000000, 0x47EFFFFFE0000000, 0x0000000000000001, 0x36A0000000000000]
FIELD_NUMBERS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 50, 100, 1000, 2**29 - 1, 2**29, 2**32 - 1]


def messages(msg: Msg) -> list[Msg]:
    out = [msg]
    for f in msg.fields:
        if isinstance(f.value, Msg):
            out += messages(f.value)
    return out


def _unknown(rng) -> Field:
    number = int(rng.choice(FIELD_NUMBERS[1:-2])) if rng.random() < 0.5 else int(rng.integers(10, 2000))
    wire = int(rng.choice([VARINT, I64, LEN, SGROUP, I32]))
    value = {VARINT: varint(int(rng.integers(0, 2**63))), I64: rng.bytes(8), I32: rng.bytes(4),
             LEN: rng.bytes(int(rng.integers(0, 6))), SGROUP: b""}[wire]
    return Field(number, wire, value)


def _blob_payload(rng, number: int) -> bytes:
    width = 4 if number in (5, 6) else 8
    return rng.bytes(width * int(rng.integers(0, 4)))


def _packed(blob: Msg, numbers) -> list[Field]:
    return [g for g in blob.fields if g.wire == LEN and g.number in numbers
            and isinstance(g.value, bytes) and len(g.value)]


def mutate(tree: Msg, rng) -> None:
    """One structural mutation of ``tree`` in place (lengths re-computed on encoding)."""
    msgs = messages(tree)
    msg = msgs[int(rng.integers(len(msgs)))]
    blobs = [m for m in msgs if m.kind == "blob"]
    kind = str(rng.choice(["pad_key", "pad_len", "wire", "number", "dup", "drop", "unknown",
                           "group", "nan", "empty", "unpack", "double", "diff_len", "len_delta",
                           "dims", "long_varint", "move_blob"]))
    fields = msg.fields
    f = fields[int(rng.integers(len(fields)))] if fields else None
    if kind == "pad_key" and f:
        f.key_width = int(rng.integers(2, 8))
    elif kind == "pad_len" and f and f.wire == LEN:
        f.length_width = int(rng.integers(2, 8))
    elif kind == "wire" and f:
        f.wire_as = int(rng.integers(0, 8))
    elif kind == "number" and f:
        f.number = int(rng.choice(FIELD_NUMBERS))
    elif kind == "dup" and f:
        fields.insert(int(rng.integers(len(fields) + 1)), copy.deepcopy(f))
    elif kind == "drop" and f:
        fields.remove(f)
    elif kind == "unknown":
        fields.insert(int(rng.integers(len(fields) + 1)), _unknown(rng))
    elif kind == "group":
        # an unknown group holding a run of this message's fields (or nothing), nested
        # 1-4 deep; sometimes its end tag names another group
        i = int(rng.integers(len(fields) + 1))
        j = int(rng.integers(i, len(fields) + 1))
        inner = Msg("other", fields[i:j])
        for _ in range(int(rng.integers(1, 5))):
            inner = Msg("other", [Field(int(rng.integers(1, 3000)), SGROUP, inner)])
        group = inner.fields[0]
        if rng.random() < 0.2:
            group.value = Msg("other", group.value.fields + [Field(group.number + 1, EGROUP, b"")])
        fields[i:j] = [group]
    elif kind == "nan" and blobs:
        blob = blobs[int(rng.integers(len(blobs)))]
        packed = _packed(blob, (5, 8))
        if packed:
            g = packed[int(rng.integers(len(packed)))]
            width = 4 if g.number == 5 else 8
            at = width * int(rng.integers(max(1, len(g.value) // width)))
            bits = int(rng.choice(NAN_FLOATS if width == 4 else NAN_DOUBLES))
            g.value = g.value[:at] + bits.to_bytes(width, "little") + g.value[at + width:]
    elif kind == "empty" and blobs:
        blob = blobs[int(rng.integers(len(blobs)))]
        number = int(rng.choice([5, 6, 8, 9]))
        blob.fields.insert(int(rng.integers(len(blob.fields) + 1)), Field(number, LEN, b""))
    elif kind == "unpack" and blobs:
        # a packed float/double field split into unpacked records (some with padded keys)
        # and packed chunks
        blob = blobs[int(rng.integers(len(blobs)))]
        packed = _packed(blob, (5, 6, 8, 9))
        if packed:
            g = packed[int(rng.integers(len(packed)))]
            width = 4 if g.number in (5, 6) else 8
            pieces, pos = [], 0
            while pos < len(g.value):
                n = int(rng.integers(1, 4))
                chunk = g.value[pos:pos + n * width]
                if rng.random() < 0.5:
                    pieces.append(Field(g.number, LEN, chunk))
                else:
                    for k in range(0, len(chunk), width):
                        pieces.append(Field(g.number, I32 if width == 4 else I64, chunk[k:k + width],
                                            key_width=int(rng.choice([1, 1, 1, 2, 5]))))
                pos += n * width
            at = blob.fields.index(g)
            blob.fields[at:at + 1] = pieces
    elif kind == "double" and blobs:
        blob = blobs[int(rng.integers(len(blobs)))]
        blob.fields.insert(int(rng.integers(len(blob.fields) + 1)), Field(8, LEN, _blob_payload(rng, 8)))
    elif kind == "diff_len" and blobs:
        blob = blobs[int(rng.integers(len(blobs)))]
        number = int(rng.choice([5, 6, 8, 9]))
        payload = _blob_payload(rng, number) + rng.bytes(int(rng.integers(1, 8)))
        blob.fields.insert(int(rng.integers(len(blob.fields) + 1)), Field(number, LEN, payload))
    elif kind == "len_delta" and f and f.wire == LEN:
        size = len(f.value.encode() if isinstance(f.value, Msg) else f.value)
        f.length_as = max(0, size + int(rng.choice([-3, -2, -1, 1, 2, 3, 2**31, 2**32 + size])))
    elif kind == "dims" and blobs:
        blob = blobs[int(rng.integers(len(blobs)))]
        dims = [int(rng.choice([0, 1, 3, -1, 2**31, 2**62, -(2**63), 2**63 - 1])) for _ in range(int(rng.integers(0, 4)))]
        if rng.random() < 0.5:
            blob.fields.append(Field(7, LEN, caffe_pb2.BlobShape(dim=dims).SerializeToString()))
        else:
            number = int(rng.integers(1, 5))
            blob.fields.append(Field(number, VARINT, varint(dims[0] % 2**64 if dims else 7)))
    elif kind == "long_varint" and f and f.wire == VARINT:
        value, _ = _read_varint(f.value, 0)
        f.value = varint(value, int(rng.choice([9, 10, 10, 11])))
    elif kind == "move_blob" and blobs and len(msgs) > 1:
        # a blob placed into another layer-ish message (wrong parent, deeper nesting)
        blob = blobs[int(rng.integers(len(blobs)))]
        target = msgs[int(rng.integers(len(msgs)))]
        target.fields.append(Field(int(rng.choice([7, 6, 50, 100, 2])), LEN, Msg("other", copy.deepcopy(blob.fields))))


def byte_mutate(data: bytes, rng) -> bytes:
    """One unstructured edit of the encoded bytes."""
    if not data:
        return rng.bytes(int(rng.integers(1, 8)))
    kind = str(rng.choice(["flip", "truncate", "insert", "delete", "splice"]))
    at = int(rng.integers(len(data)))
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ int(rng.integers(1, 256))]) + data[at + 1:]
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + rng.bytes(int(rng.integers(1, 9))) + data[at:]
    if kind == "delete":
        return data[:at] + data[at + int(rng.integers(1, 9)):]
    start = int(rng.integers(len(data)))
    return data[:at] + data[start:start + int(rng.integers(1, 17))] + data[at:]


# --------------------------------------------------------------------------- the differential test
N_INPUTS = 6000


def test_walker_reads_every_mutated_caffemodel_as_protobuf_does(tmp_path):
    bases = seeds(tmp_path)
    names = sorted(bases)
    path = tmp_path / "fuzz.caffemodel"
    counts: dict[str, int] = {}
    started = time.perf_counter()
    for i in range(N_INPUTS):
        rng = np.random.default_rng([2016, i])
        name = names[i % len(names)]
        tree = parse(bases[name])
        for _ in range(int(rng.integers(1, 4))):
            mutate(tree, rng)
        data = tree.encode()
        if rng.random() < 0.3:
            data = byte_mutate(data, rng)
        try:
            outcome = compare(data, path)
        except AssertionError as err:
            raise AssertionError(f"input {i} (seed {name}, {len(data)} bytes {data[:80].hex()}...): {err}") from None
        counts[outcome] = counts.get(outcome, 0) + 1
    seconds = time.perf_counter() - started
    print(f"\n{N_INPUTS} inputs in {seconds:.1f} s: {counts}", file=sys.stderr)
    # the mutations must reach both sides of the line, not only refusals
    assert counts.get("accepted", 0) > N_INPUTS // 5 and counts.get("refused", 0) > N_INPUTS // 5


def test_seeds_themselves_agree(tmp_path):
    for name, data in seeds(tmp_path).items():
        assert compare(data, tmp_path / f"{name}.caffemodel") == "accepted", name
        assert parse(data).encode() == data  # the tree encodes a seed back to its bytes


def test_reference_keeps_nan_payloads():
    """The reference reads protobuf's stored bits (a signalling NaN read through a Python
    float would come back quieted)."""
    bits = np.array([0x7F800001, 0x7FBFFFFF, 0xFFC00001], "<u4")
    blob = caffe_pb2.BlobProto.FromString(len_field(5, bits.tobytes()))
    assert _raw(blob, "data", "<f4").view("<u4").tolist() == bits.tolist()


@st.composite
def value_fields(draw, number: int, raw: bytes, width: int) -> list[bytes]:
    """``raw`` (whole values of ``width`` bytes) as field ``number``: a mix of packed
    chunks and unpacked records (some keys padded), with empty packed fields among them."""
    out, i, n = [], 0, len(raw) // width
    while i < n:
        k = draw(st.integers(1, n - i))
        if draw(st.booleans()):
            out.append(len_field(number, raw[i * width:(i + k) * width]))
        else:
            key_width = draw(st.sampled_from([1, 1, 2, 5]))
            out += [key(number, I32 if width == 4 else I64, key_width) + raw[j * width:(j + 1) * width]
                    for j in range(i, i + k)]
        i += k
    for _ in range(draw(st.integers(0, 2))):
        out.insert(draw(st.integers(0, len(out))), len_field(number, b""))
    return out


@st.composite
def blobs(draw) -> bytes:
    n = draw(st.integers(0, 5))
    if draw(st.booleans()):
        head = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[n])).SerializeToString()
    else:
        head = caffe_pb2.BlobProto(num=1, channels=1, height=1, width=n).SerializeToString()
    parts = [[head]]
    for number, width in ((5, 4), (6, 4), (8, 8), (9, 8)):
        if number == 5 or draw(st.booleans()):
            count = n if number in (5, 6) or draw(st.booleans()) else 0
            raw = draw(st.binary(min_size=count * width, max_size=count * width))  # any bits: NaNs too
            parts.append(draw(value_fields(number, raw, width)))
    parts = draw(st.permutations(parts))
    fields = [f for part in parts for f in part]
    for _ in range(draw(st.integers(0, 2))):  # unknown fields anywhere
        unknown = draw(st.sampled_from([key(10, VARINT) + b"\x01", key(11, I32) + b"abcd", len_field(12, b"xy"),
                                        key(13, SGROUP) + key(0, VARINT) + b"\x00" + key(13, EGROUP)]))
        fields.insert(draw(st.integers(0, len(fields))), unknown)
    return b"".join(fields)


@st.composite
def caffemodels(draw) -> bytes:
    layout = draw(st.sampled_from(["v2", "v1", "v0"]))
    out = len_field(1, b"net") if draw(st.booleans()) else b""
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(["a", "b", "c"]))  # names repeat sometimes
        blob_fields = [(50 if layout == "v0" else 7 if layout == "v2" else 6, b) for b in draw(st.lists(blobs(), max_size=2))]
        name_field = 4 if layout == "v1" else 1  # V1LayerParameter.name is field 4
        body = len_field(name_field, name.encode()) + b"".join(len_field(number, b) for number, b in blob_fields)
        if layout == "v0":
            body = len_field(1, body)
        out += len_field(100 if layout == "v2" else 2, body)
    return out


@given(data=caffemodels())
@settings(max_examples=300, deadline=None)
def test_generated_caffemodels_read_as_protobuf_reads_them(data, tmp_path_factory):
    """Every encoding protobuf accepts, generated: packed chunks, unpacked runs, padded
    keys, empty fields, any bit patterns, unknown fields, three layouts, repeated names."""
    assert compare(data, tmp_path_factory.getbasetemp() / "generated.caffemodel") == "accepted"


# --------------------------------------------------------------------------- named regressions
def blob(*parts: bytes, dims=(2,)) -> bytes:
    return caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=dims)).SerializeToString() + b"".join(parts)


def v2_model(*blobs: bytes, name: str = "fc") -> bytes:
    head = caffe_pb2.LayerParameter(name=name, type="InnerProduct").SerializeToString()
    return len_field(100, head + b"".join(len_field(7, b) for b in blobs))


def floats(*values) -> bytes:
    return np.array(values, "<f4").tobytes()


def doubles(*values) -> bytes:
    return np.array(values, "<f8").tobytes()


def check(tmp_path, data: bytes, expected: list | None) -> None:
    """Ours and protobuf agree on ``data`` (see ``compare``), and the first blob of layer
    "fc" reads ``expected`` (None: both refuse)."""
    path = tmp_path / "case.caffemodel"
    assert compare(data, path) == ("refused" if expected is None else "accepted")
    if expected is not None:
        assert read_caffemodel(path)["fc"][0].data.tolist() == expected


@pytest.mark.parametrize("parts, expected", [
    # Blob::FromProto takes double_data only when double_data_size() > 0
    ((len_field(8, b""), len_field(5, floats(1, 2))), [1.0, 2.0]),
    ((len_field(5, floats(1, 2)), len_field(8, b"")), [1.0, 2.0]),
    ((len_field(8, b""), len_field(8, b""), b"\x2d" + floats(1), b"\x2d" + floats(2)), [1.0, 2.0]),
    ((len_field(5, b""), len_field(8, doubles(3, 4))), [3.0, 4.0]),
    ((len_field(5, floats(9, 9)), len_field(8, doubles(3)), len_field(8, b""), b"\x41" + doubles(4)), [3.0, 4.0]),
], ids=["empty-double-first", "empty-double-last", "two-empty-doubles-unpacked-data",
        "empty-data", "double-chunks"])
def test_empty_double_data_does_not_hide_data(tmp_path, parts, expected):
    check(tmp_path, v2_model(blob(*parts)), expected)


@pytest.mark.parametrize("parts, expected", [
    ((key(5, I32, 2) + floats(1), key(5, I32, 2) + floats(2)), [1.0, 2.0]),
    ((b"\x2d" + floats(1), key(5, I32, 5) + floats(2), b"\x2d" + floats(3)), [1.0, 2.0, 3.0]),
    ((key(8, I64, 2) + doubles(0.5), b"\x41" + doubles(-1)), [0.5, -1.0]),
    ((key(5, I32, 6) + floats(1),), None),  # a key of 6 bytes: refused
], ids=["padded-floats", "padded-in-a-run", "padded-double", "key-of-6-bytes"])
def test_unpacked_values_with_padded_keys(tmp_path, parts, expected):
    check(tmp_path, v2_model(blob(*parts, dims=(len(expected or [0]),))), expected)


@pytest.mark.parametrize("parts", [
    (len_field(6, b"\0" * 6),), (len_field(9, b"\0" * 12),), (len_field(5, b"\0" * 3),),
    (len_field(8, b"\0" * 4),),
], ids=["diff-6-bytes", "double-diff-12-bytes", "data-3-bytes", "double-data-4-bytes"])
def test_packed_values_of_a_partial_width_are_refused(tmp_path, parts):
    check(tmp_path, v2_model(blob(len_field(5, floats(1, 2)), *parts)), None)


_GOOD = blob(len_field(5, floats(1, 2)))
_LAYER_HEAD = caffe_pb2.LayerParameter(name="fc", type="InnerProduct").SerializeToString()


@pytest.mark.parametrize("data, accepted", [
    (key(100, LEN, 5) + varint(len(_LAYER_HEAD) + len(_GOOD) + 2) + _LAYER_HEAD + len_field(7, _GOOD), True),
    (key(100, LEN, 6) + varint(len(_LAYER_HEAD) + len(_GOOD) + 2) + _LAYER_HEAD + len_field(7, _GOOD), False),
    (key(100, LEN) + varint(len(_LAYER_HEAD) + len(_GOOD) + 2, 5) + _LAYER_HEAD + len_field(7, _GOOD), True),
    (key(100, LEN) + varint(len(_LAYER_HEAD) + len(_GOOD) + 2, 6) + _LAYER_HEAD + len_field(7, _GOOD), False),
    (key(100, LEN) + varint(len(_LAYER_HEAD) + len(_GOOD) + 2 + 2**64, 10) + _LAYER_HEAD + len_field(7, _GOOD), False),
    (v2_model(_GOOD) + key(2**29 - 1, VARINT) + b"\x01", True),  # the largest field number
    (v2_model(_GOOD) + varint(2**32 | (7 << 3), 5) + b"\x01", False),  # a key not below 2**32
    (v2_model(_GOOD) + key(7, VARINT) + varint(1, 10), True),  # a varint of 10 bytes
    (v2_model(_GOOD) + key(7, VARINT) + varint(1, 11), False),
    (v2_model(_GOOD) + b"\x00\x00", False),  # field number 0
    (v2_model(blob(len_field(5, floats(1, 2)), b"\x00\x00")), False),
    (v2_model(_GOOD) + key(9, SGROUP) + b"\x00\x00" + key(0, SGROUP) + key(0, EGROUP) + key(9, EGROUP), True),
    (v2_model(_GOOD) + key(9, SGROUP) + key(8, EGROUP), False),  # the end of another group
    (v2_model(_GOOD) + key(9, EGROUP), False),  # an end of group outside any
    (v2_model(_GOOD) + b"\x0e", False),  # wire type 6
], ids=["key-5-bytes", "key-6-bytes", "length-5-bytes", "length-6-bytes", "length-over-2**64",
        "field-2**29-1", "key-2**32", "varint-10-bytes", "varint-11-bytes", "field-0-top",
        "field-0-blob", "field-0-in-group", "group-mismatch", "end-group-alone", "wire-type-6"])
def test_keys_lengths_and_varints_follow_protobuf(tmp_path, data, accepted):
    check(tmp_path, data, [1.0, 2.0] if accepted else None)


@pytest.mark.parametrize("extra", [
    key(100, VARINT) + b"\x05",  # NetParameter.layer as a varint
    key(2, I32) + b"\0\0\0\0",  # NetParameter.layers as fixed32
    key(1, VARINT) + b"\x01",  # NetParameter.name as a varint
    key(100, SGROUP) + key(7, LEN) + b"\x00" + key(100, EGROUP),  # a layer as a group
], ids=["layer-varint", "layers-fixed32", "name-varint", "layer-group"])
def test_known_net_fields_of_another_wire_type_are_unknown_fields(tmp_path, extra):
    check(tmp_path, extra + v2_model(_GOOD), [1.0, 2.0])


@pytest.mark.parametrize("parts, expected", [
    ((len_field(5, floats(1, 2)), key(5, VARINT) + b"\x07"), [1.0, 2.0]),
    ((len_field(5, floats(1, 2)), key(5, I64) + doubles(3)), [1.0, 2.0]),
    ((len_field(5, floats(1, 2)), key(8, I32) + floats(3)), [1.0, 2.0]),
    ((len_field(5, floats(1, 2)), key(6, VARINT) + b"\x07"), [1.0, 2.0]),
], ids=["data-varint", "data-fixed64", "double-data-fixed32", "diff-varint"])
def test_blob_values_of_another_wire_type_are_unknown_fields(tmp_path, parts, expected):
    check(tmp_path, v2_model(blob(*parts)), expected)


def test_blobs_and_v0_layer_of_another_wire_type_are_unknown_fields(tmp_path):
    data = _LAYER_HEAD + key(7, I32) + b"\0\0\0\0" + len_field(7, _GOOD)
    check(tmp_path, len_field(100, data), [1.0, 2.0])
    v0 = caffe_pb2.V0LayerParameter(name="fc", blobs=[caffe_pb2.BlobProto(data=[1, 2])]).SerializeToString()
    entry = key(1, VARINT) + b"\x01" + len_field(1, v0)  # V1LayerParameter.layer as a varint, then as a message
    check(tmp_path, len_field(2, entry), [1.0, 2.0])


def _v0_net(*entries) -> bytes:
    """A V0 caffemodel: entries (name, type, bottoms, tops, blob values or None)."""
    net = caffe_pb2.NetParameter(input=["data"])
    for name, kind, bottoms, tops, values in entries:
        entry = net.layers.add(bottom=bottoms, top=tops)
        entry.layer.name, entry.layer.type = name, kind
        if values is not None:
            entry.layer.blobs.add(num=1, channels=1, height=1, width=len(values), data=values)
    return net.SerializeToString()


def test_v0_caffemodel_is_upgraded_as_caffe_upgrades_it(tmp_path):
    """CopyTrainedLayersFromBinaryProto upgrades the caffemodel's net first: a V0 padding
    layer is dropped with its blobs; what aborts UpgradeV0Net aborts the read."""
    path = tmp_path / "v0.caffemodel"
    good = _v0_net(("pad", "padding", ["data"], ["p"], [9.0]), ("fc", "conv", ["p"], ["c"], [1.0, 2.0]))
    assert compare(good, path) == "accepted"
    weights = read_caffemodel(path)
    assert list(weights) == ["fc"] and weights["fc"][0].data.tolist() == [1.0, 2.0]
    for bad, problem in [
        (_v0_net(("fc", "conv", ["nowhere"], ["c"], [1.0])), "layer fc: bottom blob 'nowhere' is not produced"),
        (_v0_net(("fc", "nonesuch", ["data"], ["c"], [1.0])), "layer fc: unknown V0 layer type 'nonesuch'"),
        (_v0_net(("pad", "padding", ["data"], ["p"], None), ("fc", "relu", ["p"], ["c"], [1.0])),
         "layer fc: V0 padding layer 'pad' feeds a 'relu' layer"),
    ]:
        assert compare(bad, path) == "v0-upgrade"
        with pytest.raises(PortingError, match=rf"^{path}: {problem}"):
            read_caffemodel(path)


def test_double_data_nan_and_overflow_without_warning(tmp_path):
    """NaN double_data stay NaN (quiet, payload's high bits kept, as x86's cvtsd2ss), beyond
    float32's range they are inf; no NumPy RuntimeWarning reaches the terminal."""
    import warnings

    bits = [0x7FF0000000000001, 0x7FF4000000000000, 0xFFF8000000000123]
    payload = np.array(bits, "<u8").tobytes() + doubles(1e300)
    path = tmp_path / "nan.caffemodel"
    data = v2_model(blob(len_field(8, payload), dims=(4,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compare(data, path) == "accepted"
        got = read_caffemodel(path)["fc"][0].data
    assert np.isnan(got[:3]).all() and got[3] == np.inf
    assert got[:3].view("<u4").tolist() == [0x7FC00000, 0x7FE00000, 0xFFC00000]


def test_file_over_2gb(tmp_path):
    """Caffe reads at most INT_MAX bytes (io.cpp: SetTotalBytesLimit); the size alone
    refuses the file, before anything is read (the file here is sparse)."""
    path = tmp_path / "huge.caffemodel"
    with open(path, "wb") as f:
        f.write(v2_model(_GOOD))
        f.truncate(2**31)
    with pytest.raises(PortingError, match=r"not a Caffe caffemodel \(2147483648 bytes; Caffe reads at most"):
        read_caffemodel(path)


# --------------------------------------------------------------------------- what Caffe checks on copying
FC_NET = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
          'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 2 } }\n')


def fc_model(tmp_path, weight: caffe_pb2.BlobProto) -> tuple:
    proto = tmp_path / "fc.prototxt"
    proto.write_text(FC_NET)
    net = caffe_pb2.NetParameter()
    layer = net.layer.add(name="fc", type="InnerProduct")
    layer.blobs.append(weight)
    layer.blobs.add(shape=caffe_pb2.BlobShape(dim=[2]), data=[0.5, -0.5])
    model = tmp_path / "fc.caffemodel"
    model.write_bytes(net.SerializeToString())
    assert compare(model.read_bytes(), tmp_path / "copy.caffemodel") == "accepted"  # protobuf parses it
    return proto, model


def _one_line_exit_2(*args) -> str:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "porting", *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    return out.stderr


@pytest.mark.parametrize("diff", ["diff", "double_diff"])
def test_diff_count_is_checked_as_blob_from_proto_does(tmp_path, diff):
    """Blob::FromProto: CHECK_EQ(count_, double_diff_size()) when double_diff has values,
    else CHECK_EQ(count_, diff_size()) when diff has: Caffe aborts, the port refuses."""
    values = np.arange(6, dtype=np.float32)
    good = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2, 3]), data=values, **{diff: values})
    proto, model = fc_model(tmp_path, good)
    assert np.array_equal(load_caffe(proto, model).params["fc"][0].detach().numpy().ravel(), values)
    bad = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2, 3]), data=values, **{diff: values[:5]})
    proto, model = fc_model(tmp_path, bad)
    with pytest.raises(PortingError, match=r"layer fc: blob 0 has 5 diff values for 6 data values"):
        load_caffe(proto, model)
    assert "blob 0 has 5 diff values" in _one_line_exit_2("convert", proto, model, "-o", tmp_path / "o.safetensors")


@pytest.mark.parametrize("shape", [
    dict(shape=caffe_pb2.BlobShape(dim=[-2, -3])),
    dict(shape=caffe_pb2.BlobShape(dim=[2**62, 2**62, 6])),  # the count overflows int64
    dict(shape=caffe_pb2.BlobShape(dim=[2**63 - 1, -(2**63)])),
    dict(num=-1, channels=1, height=2, width=3),
    # Caffe's ShapeEquals stores int64 dims in a vector<int>: 2**32 + 2 would pass there as
    # 2. The port compares the stored values and refuses (a difference kept on purpose).
    dict(shape=caffe_pb2.BlobShape(dim=[2**32 + 2, 3])),
], ids=["negative", "count-overflows", "extremes", "legacy-negative", "int32-wrap"])
def test_impossible_shapes_are_refused_in_one_line(tmp_path, shape):
    """Protobuf parses any int64 dims; Caffe's ShapeEquals fails on them and aborts (its
    error path reshapes a blob to them, which CHECKs dims >= 0 and the count <= INT_MAX)."""
    proto, model = fc_model(tmp_path, caffe_pb2.BlobProto(data=np.zeros(6, np.float32), **shape))
    with pytest.raises(PortingError, match=r"layer fc: blob 0 shape mismatch"):
        load_caffe(proto, model)
    _one_line_exit_2("inspect", proto, model)
