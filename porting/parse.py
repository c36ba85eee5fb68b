"""Read Caffe net definitions (text prototxt) and trained weights (binary caffemodel).

``read_prototxt`` parses protobuf text format as Caffe's ``ReadProtoFromTextFile`` does
(strict: a singular field given twice is an error). ``read_caffemodel`` returns every
layer's parameter blobs as flat float32 arrays for all three layouts Caffe 1.0 reads:
V2 ``layer`` (NetParameter field 100), V1 ``layers`` (field 2) and V0 ``layers { layer {..} }``.
Neither upgrades the net: ``porting.upgrade.upgrade_net`` does that.

Why a hand-written wire walker: a CaffeNet caffemodel is a 240 MB protobuf message; parsing
it whole with protobuf and copying every ``data`` field into NumPy costs about 3x the file
in memory and over a second. Here the file is memory-mapped (copy-on-write, so the arrays
are writable and the file never changes), the protobuf wire format is walked just deep
enough to find each blob's ``data``, packed floats become ``np.frombuffer`` views of the
map (no copy), and what is left of each layer (names, types, shapes: a few hundred bytes)
is parsed by protobuf itself, so field semantics stay protobuf's.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import text_format

from porting import caffe_pb2
from porting.errors import PortingError
from porting.weights import WeightBlob

# Protobuf wire types.
VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5

# NetParameter fields that hold layers, and the expected wire type of every field Caffe
# 1.0 defines there (a known field with another wire type means a foreign file).
NET_LAYERS_V1, NET_LAYER_V2 = 2, 100
NET_FIELDS = {1: (LEN,), 2: (LEN,), 3: (LEN,), 4: (VARINT, LEN), 5: (VARINT,), 6: (LEN,),
              7: (VARINT,), 8: (LEN,), 100: (LEN,)}
LAYER_V2_BLOBS = 7          # LayerParameter.blobs
LAYER_V1_BLOBS = 6          # V1LayerParameter.blobs
LAYER_V1_V0 = 1             # V1LayerParameter.layer (a V0LayerParameter)
LAYER_V0_BLOBS = 50         # V0LayerParameter.blobs
BLOB_DATA, BLOB_DIFF, BLOB_DOUBLE_DATA, BLOB_DOUBLE_DIFF = 5, 6, 8, 9
# Protobuf's default recursion limit: a message or group nested deeper than this (the
# NetParameter at depth 0, a layer at 1, a blob at 2, each group one more) is refused.
MAX_DEPTH = 100

MAGIC = [(b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
         (b"PK\x03\x04", "a zip archive (a PyTorch .pt or .npz?)"), (b"\x93NUMPY", "a NumPy .npy file"),
         (b"\x89HDF", "an HDF5 file"), (b"\x1f\x8b", "a gzip file")]


# --------------------------------------------------------------------------- prototxt
def read_prototxt(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """Parse a text-format NetParameter (any Caffe format version; not upgraded).

    Errors name the file, line and column as protobuf's text parser reports them.
    """
    raw = _read_bytes(path)
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise PortingError(f"not a text prototxt (NUL byte at byte {nul}; a binary caffemodel?)", path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # Caffe's C++ parser reads bytes; non-UTF-8 text (Latin-1 comments) is accepted there.
        text = raw.decode("latin-1")
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as err:
        problem = str(err)
        head, sep, rest = problem.partition(" : ")
        if sep and err.GetLine() is not None and head == f"{err.GetLine()}:{err.GetColumn()}":
            problem = rest
        place = None if err.GetLine() is None else f"line {err.GetLine()}, column {err.GetColumn()}"
        raise PortingError(problem.rstrip("."), path, place) from None
    return net


def _read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise PortingError(_os_problem(err), path) from None


def _os_problem(err: OSError) -> str:
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(err, PermissionError):
        return "permission denied"
    return f"cannot read ({err.strerror or err})"


# --------------------------------------------------------------------------- caffemodel
def read_caffemodel(path: str | os.PathLike) -> dict[str, list[WeightBlob]]:
    """Layer name -> its parameter blobs (flat float32 data, declared shape), file order.

    The layout (V2 / V1 / V0) is chosen as Caffe's ``UpgradeNetAsNeeded`` does: V1 ``layers``
    entries win over V2 ``layer`` entries when both exist (Caffe drops the latter); when
    any V1 entry holds a V0 ``layer``, names and blobs come from the V0 messages. A layer
    name that repeats keeps its last blobs (Caffe's ``CopyTrainedLayersFrom`` copies in
    file order). Blob data: ``double_data`` when present (rounded to float32 like
    ``Blob::FromProto``), else ``data``; packed float data are read-write views of a
    private memory map of the file, never written back, and may sit at any byte offset
    (NumPy and torch read unaligned float32 correctly; the map lives as long as a view).
    """
    scan = _scan(path, want_data=True)
    net = scan.net
    weights: dict[str, list[WeightBlob]] = {}
    if len(net.layers):
        v0 = any(entry.HasField("layer") for entry in net.layers)
        for entry, arrays in zip(net.layers, scan.arrays_v1):
            name, protos, data = ((entry.layer.name, entry.layer.blobs, arrays[1]) if v0
                                  else (entry.name, entry.blobs, arrays[0]))
            weights[name] = [_weight_blob(p, d) for p, d in zip(protos, data)]
    else:
        for layer, arrays in zip(net.layer, scan.arrays_v2):
            weights[layer.name] = [_weight_blob(p, d) for p, d in zip(layer.blobs, arrays)]
    return weights


def read_caffemodel_net(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """The caffemodel's NetParameter (not upgraded) with every blob's data and diff left
    out; blob shapes and legacy dims stay. Cheap: the layer list of a 240 MB file."""
    return _scan(path, want_data=False).net


def _weight_blob(proto: caffe_pb2.BlobProto, data: np.ndarray) -> WeightBlob:
    # Blob::ShapeEquals: any of the deprecated 4-D fields present means legacy dims.
    if any(proto.HasField(f) for f in ("num", "channels", "height", "width")):
        return WeightBlob(data, None, (proto.num, proto.channels, proto.height, proto.width))
    return WeightBlob(data, tuple(int(d) for d in proto.shape.dim))


@dataclass
class _Scan:
    net: caffe_pb2.NetParameter
    arrays_v2: list[list[np.ndarray]] = field(default_factory=list)  # per `layer` entry
    # per `layers` entry: (its own V1 blobs, the blobs of its V0 `layer`)
    arrays_v1: list[tuple[list[np.ndarray], list[np.ndarray]]] = field(default_factory=list)


class _Malformed(Exception):
    """Wire data that is not a well-formed message (the file is not a caffemodel)."""


def _scan(path, want_data: bool) -> _Scan:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise PortingError("not a Caffe caffemodel (empty file)", path)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as err:
        raise PortingError(_os_problem(err), path) from None
    walker = _Walker(buf, want_data)
    try:
        stripped, where, pos, n_layers = bytearray(), 0, 0, 0
        while pos < size:
            where = pos
            try:
                field_no, wire, start, end, pos = walker.field(pos, size, top=True)
            except _Truncated as err:
                # A layer entry cut short, or anything after a whole layer: a truncated
                # caffemodel. Bytes that overrun the file before any layer: foreign.
                if n_layers or err.field_no in (NET_LAYER_V2, NET_LAYERS_V1):
                    raise
                raise _Malformed(f"byte {where}: field {err.field_no} runs past the end of the file") from None
            if field_no in NET_FIELDS and wire not in NET_FIELDS[field_no]:
                raise _Malformed(f"byte {where}: field {field_no} has wire type {wire}")
            if field_no == NET_LAYER_V2:
                remnant, arrays = walker.layer_v2(start, end)
                walker.arrays_v2.append(arrays)
            elif field_no == NET_LAYERS_V1:
                remnant, arrays = walker.layer_v1(start, end)
                walker.arrays_v1.append(arrays)
            else:
                stripped += buf[where:pos]
                continue
            n_layers += 1
            stripped += _key(field_no, LEN) + _varint_bytes(len(remnant)) + remnant
        if n_layers == 0:
            raise _Malformed("no layer entries")
        net = caffe_pb2.NetParameter.FromString(bytes(stripped))
    except _Truncated as err:
        raise PortingError(f"truncated at byte {size} (the entry at byte {where} ends at byte "
                           f"{err.needed})", path) from None
    except _Malformed as err:
        raise PortingError(f"not a Caffe caffemodel ({err}{_hint(buf)})", path) from None
    except pb_message.DecodeError as err:
        raise PortingError(f"not a Caffe caffemodel (protobuf: {err})", path) from None
    return _Scan(net, walker.arrays_v2, walker.arrays_v1)


class _Truncated(Exception):
    """The file ends inside a top-level entry that would end at byte ``needed``."""

    def __init__(self, needed: int, field_no: int | None = None):
        super().__init__(needed)
        self.needed, self.field_no = needed, field_no


def _hint(buf) -> str:
    head = bytes(buf[:512])
    for magic, what in MAGIC:
        if head.startswith(magic):
            return f"; the file looks like {what}"
    if all(32 <= b < 127 or b in b"\r\n\t" for b in head):
        return "; the file looks like text (a prototxt?)"
    return ""


def _key(field_no: int, wire: int) -> bytes:
    return _varint_bytes(field_no << 3 | wire)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


class _Walker:
    """Walks protobuf wire data in ``buf`` (an mmap); collects blob data as arrays.

    ``depth`` arguments are the nesting depth of the message being walked, counted as
    protobuf counts it against its recursion limit (``MAX_DEPTH``).
    """

    def __init__(self, buf, want_data: bool):
        self.buf, self.want_data = buf, want_data
        self.arrays_v2: list = []
        self.arrays_v1: list = []

    # -- wire primitives -------------------------------------------------------
    def varint(self, pos: int, end: int, top: bool) -> tuple[int, int]:
        buf, shift, value = self.buf, 0, 0
        while True:
            if pos >= end:
                if top:
                    raise _Truncated(pos + 1)
                raise _Malformed(f"byte {pos}: varint runs past the end of its message")
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value, pos
            shift += 7
            if shift >= 70:
                raise _Malformed(f"byte {pos}: varint longer than 10 bytes")

    def field(self, pos: int, end: int, top: bool = False, depth: int = 0) -> tuple[int, int, int, int, int]:
        """One field at ``pos`` of a message at ``depth``: (number, wire type, value start,
        value end, next pos)."""
        key, pos = self.varint(pos, end, top)
        field_no, wire = key >> 3, key & 7
        if field_no == 0:
            raise _Malformed(f"byte {pos - 1}: field number 0")
        if wire == VARINT:
            _, nxt = self.varint(pos, end, top)
            return field_no, wire, pos, nxt, nxt
        if wire == LEN:
            length, start = self.varint(pos, end, top)
            stop = start + length
        elif wire == I32:
            start, stop = pos, pos + 4
        elif wire == I64:
            start, stop = pos, pos + 8
        elif wire == SGROUP:
            start = pos
            stop = self.skip_group(field_no, pos, end, top, depth + 1)
            return field_no, wire, start, stop, stop
        else:
            raise _Malformed(f"byte {pos - 1}: invalid wire type {wire}")
        if stop > end:
            if top:
                raise _Truncated(stop, field_no)
            raise _Malformed(f"byte {start}: field {field_no} runs past the end of its message")
        return field_no, wire, start, stop, stop

    def skip_group(self, group_no: int, pos: int, end: int, top: bool, depth: int) -> int:
        """The position after the group that starts at ``pos`` (its own depth: ``depth``)."""
        if depth > MAX_DEPTH:
            raise _Malformed(f"byte {pos}: groups nested deeper than protobuf's limit of {MAX_DEPTH}")
        while True:
            key, after = self.varint(pos, end, top)
            if key & 7 == EGROUP:
                if key >> 3 != group_no:
                    raise _Malformed(f"byte {pos}: unmatched end of group")
                return after
            _, _, _, _, pos = self.field(pos, end, top, depth)

    # -- messages --------------------------------------------------------------
    def layer_v2(self, start: int, end: int) -> tuple[bytes, list[np.ndarray]]:
        """LayerParameter bytes without blob data, and the data of each blob."""
        return self._message_with_blobs(start, end, {LAYER_V2_BLOBS}, depth=1)

    def layer_v1(self, start: int, end: int) -> tuple[bytes, tuple[list, list]]:
        """V1LayerParameter bytes without blob data (its own and its V0 layer's)."""
        out, own, v0 = bytearray(), [], []
        pos = start
        while pos < end:
            at = pos
            field_no, wire, s, e, pos = self.field(pos, end, depth=1)
            if field_no == LAYER_V1_BLOBS:
                self._expect(wire, LEN, at, "V1 layer blobs")
                blob, data = self.blob(s, e, depth=2)
                own.append(data)
                out += _key(field_no, LEN) + _varint_bytes(len(blob)) + blob
            elif field_no == LAYER_V1_V0:
                self._expect(wire, LEN, at, "V0 layer")
                v0_bytes, data = self._message_with_blobs(s, e, {LAYER_V0_BLOBS}, depth=2)
                v0.extend(data)
                out += _key(field_no, LEN) + _varint_bytes(len(v0_bytes)) + v0_bytes
            else:
                out += self.buf[at:pos]
        return bytes(out), (own, v0)

    def _message_with_blobs(self, start: int, end: int, blob_fields: set[int], depth: int):
        out, arrays = bytearray(), []
        pos = start
        while pos < end:
            at = pos
            field_no, wire, s, e, pos = self.field(pos, end, depth=depth)
            if field_no in blob_fields:
                self._expect(wire, LEN, at, "blobs")
                blob, data = self.blob(s, e, depth + 1)
                arrays.append(data)
                out += _key(field_no, LEN) + _varint_bytes(len(blob)) + blob
            else:
                out += self.buf[at:pos]
        return bytes(out), arrays

    def blob(self, start: int, end: int, depth: int) -> tuple[bytes, np.ndarray | None]:
        """BlobProto bytes without data/diff, and its data as float32 (None if not wanted).

        ``double_data`` wins over ``data`` when it has any values (Blob::FromProto).
        Repeated fields may come packed (any number of chunks) or unpacked.
        """
        out, floats, doubles = bytearray(), [], []
        pos = start
        while pos < end:
            at = pos
            field_no, wire, s, e, pos = self.field(pos, end, depth=depth)
            if field_no in (BLOB_DATA, BLOB_DOUBLE_DATA):
                width, dtype, chunks = (4, "<f4", floats) if field_no == BLOB_DATA else (8, "<f8", doubles)
                if wire == LEN:
                    if (e - s) % width:
                        raise _Malformed(f"byte {s}: packed data of {e - s} bytes is not a multiple of {width}")
                    if self.want_data:
                        chunks.append(np.frombuffer(self.buf, dtype, (e - s) // width, s))
                elif wire == (I32 if width == 4 else I64):
                    values, pos = self._unpacked_run(at, end, self.buf[at], width, dtype)
                    if self.want_data:
                        chunks.append(values)
                else:
                    raise _Malformed(f"byte {at}: blob data field {field_no} has wire type {wire}")
            elif field_no in (BLOB_DIFF, BLOB_DOUBLE_DIFF):
                continue  # gradients: Caffe ignores them when loading weights
            else:
                out += self.buf[at:pos]
        if not self.want_data:
            return bytes(out), None
        if doubles:
            with np.errstate(over="ignore"):  # as cvtsd2ss (Caffe on x86): inf beyond float range
                data = _concat(doubles).astype(np.float32)
        elif len(floats) == 1:
            data = floats[0]
        else:
            data = _concat(floats)
        return bytes(out), data

    def _unpacked_run(self, pos: int, end: int, key_byte: int, width: int, dtype: str):
        """Values of consecutive unpacked fixed-width records ``[key][value]`` from ``pos``.

        The key of BlobProto.data / double_data is one byte, so a run is a strided array:
        read it with NumPy rather than one Python step per value.
        """
        step = width + 1
        n = (end - pos) // step
        records = np.frombuffer(self.buf, np.uint8, n * step, pos).reshape(n, step)
        mismatch = np.flatnonzero(records[:, 0] != key_byte)
        run = int(mismatch[0]) if mismatch.size else n
        if run == 0:  # the one record left is cut short
            raise _Malformed(f"byte {pos}: value runs past the end of its blob")
        values = records[:run, 1:].copy().view(dtype).reshape(-1) if self.want_data else None
        return values, pos + run * step

    @staticmethod
    def _expect(wire: int, expected: int, at: int, what: str) -> None:
        if wire != expected:
            raise _Malformed(f"byte {at}: {what} field has wire type {wire}")


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        return np.zeros(0, np.float32)
    return np.concatenate(chunks)
