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
is parsed by protobuf itself, so field semantics stay protobuf's. The walker applies
protobuf's wire rules (key, length and varint sizes, wire types, groups, nesting), so it
accepts and refuses exactly the files protobuf does, and reads the same values
(tests/test_walker_protobuf.py checks it against protobuf on mutated files). The arrays
are views of the map until someone copies them (``load_caffe`` does, and keeps no view).
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
from porting.upgrade import upgrade_v0_net
from porting.weights import WeightBlob
from porting.wire import EGROUP, I32, I64, LEN, SGROUP, VARINT, key, varint

# Protobuf wire types.

# Fields the walker looks into.
NET_LAYERS_V1, NET_LAYER_V2 = 2, 100
LAYER_V2_BLOBS = 7          # LayerParameter.blobs
LAYER_V1_BLOBS = 6          # V1LayerParameter.blobs
LAYER_V1_V0 = 1             # V1LayerParameter.layer (a V0LayerParameter)
LAYER_V0_BLOBS = 50         # V0LayerParameter.blobs
BLOB_DATA, BLOB_DIFF, BLOB_DOUBLE_DATA, BLOB_DOUBLE_DIFF = 5, 6, 8, 9
BLOB_VALUES = {BLOB_DATA: 4, BLOB_DIFF: 4, BLOB_DOUBLE_DATA: 8, BLOB_DOUBLE_DIFF: 8}  # field -> bytes per value
MAX_FILE_BYTES = 2**31 - 1  # Caffe's ReadProtoFromBinaryFile: SetTotalBytesLimit(INT_MAX)
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
    from porting.layers import schema, to_caffe  # caffe.proto plus the fields of fork layers (plugins)

    net = schema().NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as err:
        problem = str(err)
        head, sep, rest = problem.partition(" : ")
        if sep and err.GetLine() is not None and head == f"{err.GetLine()}:{err.GetColumn()}":
            problem = rest
        place = None if err.GetLine() is None else f"line {err.GetLine()}, column {err.GetColumn()}"
        raise PortingError(problem.rstrip("."), path, place) from None
    return to_caffe(net)


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

    The file is read exactly as protobuf reads it (so as Caffe does); files protobuf
    parses and this refuses: one without any layer entry (see ``_scan``) and a V0 net
    Caffe's upgrade aborts on (below).

    The layout (V2 / V1 / V0) is chosen as Caffe's ``UpgradeNetAsNeeded`` does: V1 ``layers``
    entries win over V2 ``layer`` entries when both exist (Caffe drops the latter); when
    any V1 entry holds a V0 ``layer``, names and blobs come from the V0 messages, V0
    ``padding`` layers are left out, and what makes Caffe's ``UpgradeV0Net`` abort (an
    unknown V0 type, a bottom no earlier layer produced, ...) is refused as
    ``porting.upgrade`` refuses it. A layer name that repeats keeps its last blobs
    (Caffe's ``CopyTrainedLayersFrom`` copies in file order). Blob data: ``double_data``
    when it has values (rounded to float32 like ``Blob::FromProto``), else ``data``;
    ``diff_count`` counts ``double_diff`` likewise.

    Packed float data are read-write views of a private (copy-on-write) memory map of the
    file, never written back, at any byte offset (NumPy and torch read unaligned float32
    correctly); the map lives as long as a view. A view reads the file's pages when it is
    read: if the file is truncated meanwhile, that read is a SIGBUS. So copy what you
    keep before the file can change, as ``load_caffe`` does (it keeps no view).
    """
    scan = _scan(path, want_data=True)
    net = scan.net
    weights: dict[str, list[WeightBlob]] = {}
    if len(net.layers):
        v0 = any(entry.HasField("layer") for entry in net.layers)
        if v0:  # Caffe upgrades the caffemodel's net before copying: refuse what aborts it
            _check_v0_upgrade(net, path)
        for entry, blobs in zip(net.layers, scan.blobs_v1):
            if v0 and entry.layer.type == "padding":
                continue  # UpgradeV0PaddingLayers drops the layer, blobs and all
            name, protos, data = ((entry.layer.name, entry.layer.blobs, blobs[1]) if v0
                                  else (entry.name, entry.blobs, blobs[0]))
            weights[name] = [_weight_blob(p, d, n) for p, (d, n) in zip(protos, data)]
    else:
        for layer, blobs in zip(net.layer, scan.blobs_v2):
            weights[layer.name] = [_weight_blob(p, d, n) for p, (d, n) in zip(layer.blobs, blobs)]
    return weights


def _check_v0_upgrade(net: caffe_pb2.NetParameter, path) -> None:
    """Refuse (``porting.upgrade``'s PortingError) what makes Caffe's UpgradeV0Net abort.

    Python protobuf cannot copy a string that is not UTF-8 (it hands it out as bytes;
    Caffe's C++ takes any bytes), so a net holding one is not checked: its names could
    not match a prototxt's layer names (str) anyway.
    """
    try:
        upgrade_v0_net(net, source=path)
    except ValueError:  # UnicodeDecodeError: a string protobuf hands out as bytes
        pass


def read_caffemodel_net(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """The caffemodel's NetParameter (not upgraded) with every blob's data and diff left
    out; blob shapes and legacy dims stay. Cheap: the layer list of a 240 MB file."""
    return _scan(path, want_data=False).net


def _weight_blob(proto: caffe_pb2.BlobProto, data: np.ndarray, diff_count: int) -> WeightBlob:
    # Blob::ShapeEquals: any of the deprecated 4-D fields present means legacy dims.
    if any(proto.HasField(f) for f in ("num", "channels", "height", "width")):
        return WeightBlob(data, None, (proto.num, proto.channels, proto.height, proto.width), diff_count)
    return WeightBlob(data, tuple(int(d) for d in proto.shape.dim), None, diff_count)


@dataclass
class _Scan:
    net: caffe_pb2.NetParameter
    # per blob: (data as float32, or None when not wanted; number of diff values)
    blobs_v2: list[list[tuple]] = field(default_factory=list)  # per `layer` entry
    # per `layers` entry: (its own V1 blobs, the blobs of its V0 `layer`)
    blobs_v1: list[tuple[list, list]] = field(default_factory=list)


class _Malformed(Exception):
    """Wire data that is not a well-formed message (the file is not a caffemodel)."""


def _scan(path, want_data: bool) -> _Scan:
    """Walk the file's top-level fields: layer entries by the walker, the rest verbatim.

    Refused beyond protobuf's own rules: a file without any layer entry (protobuf reads
    any such bytes, a text file or a short foreign file, as an empty net, which Caffe
    would load without a word and leave every layer at its fillers) and a file over
    2 GB (Caffe's ``ReadProtoFromBinaryFile`` limits a message to ``INT_MAX`` bytes).
    """
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            if before.st_size == 0:
                raise PortingError("not a Caffe caffemodel (empty file)", path)
            if before.st_size > MAX_FILE_BYTES:
                raise PortingError(f"not a Caffe caffemodel ({before.st_size} bytes; Caffe reads at most "
                                   f"{MAX_FILE_BYTES}, 2 GB)", path)
            try:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError:  # emptied since fstat
                raise PortingError("the file changed while being read", path) from None
            # The map has the size the file had when it was mapped; a file that shrinks
            # under a map makes reading the lost pages a SIGBUS, so check before walking
            # and again after (the walk reads the keys, a consumer later the data).
            size = len(buf)
            _check_unchanged(f, before, size, path)
            scan = _walk(buf, size, want_data, path)
            _check_unchanged(f, before, size, path)
    except OSError as err:
        raise PortingError(_os_problem(err), path) from None
    if not want_data:
        buf.close()  # nothing refers to it: the net holds copies
    return scan


def _check_unchanged(f, before: os.stat_result, size: int, path) -> None:
    now = os.fstat(f.fileno())
    if (now.st_size, now.st_mtime_ns) != (size, before.st_mtime_ns):
        raise PortingError("the file changed while being read", path)


def _walk(buf, size: int, want_data: bool, path) -> _Scan:
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
            if wire == LEN and field_no == NET_LAYER_V2:
                remnant, blobs = walker.layer_v2(start, end)
                walker.blobs_v2.append(blobs)
            elif wire == LEN and field_no == NET_LAYERS_V1:
                remnant, blobs = walker.layer_v1(start, end)
                walker.blobs_v1.append(blobs)
            else:  # another field, or a layer field of another wire type (protobuf: unknown)
                stripped += buf[where:pos]
                continue
            n_layers += 1
            stripped += key(field_no, LEN) + varint(len(remnant)) + remnant
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
    return _Scan(net, walker.blobs_v2, walker.blobs_v1)


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


class _Walker:
    """Walks protobuf wire data in ``buf`` (an mmap) by protobuf's rules (the upb decoder
    of protobuf 7.x, which the tests check it against); collects blob data as arrays.

    The rules: a varint has at most 10 bytes (value modulo 2**64); a field key at most 5
    bytes and a value below 2**32, its field number not 0 (except inside an unknown group,
    which protobuf skips without that check); a length at most 5 bytes;
    wire types 6 and 7 do not exist, and an end-group key closes only the group it names.
    A known field that comes with another wire type than its own is an unknown field
    (kept, as protobuf keeps it): only ``layer``/``layers``/``blobs`` entries of wire
    type 2 are walked into; blob values are ``data``/``diff`` of wire type 2 (packed: a
    whole number of 4-byte values) or 5 (one value), ``double_data``/``double_diff`` of
    wire type 2 (8-byte values) or 1.
    ``depth`` arguments are the nesting depth of the message being walked, counted as
    protobuf counts it against its recursion limit (``MAX_DEPTH``).
    """

    def __init__(self, buf, want_data: bool):
        self.buf, self.want_data = buf, want_data
        self.blobs_v2: list = []
        self.blobs_v1: list = []

    # -- wire primitives -------------------------------------------------------
    def varint(self, pos: int, end: int, top: bool, limit: int = 10) -> tuple[int, int]:
        """The varint at ``pos`` (at most ``limit`` bytes) and the position after it."""
        buf, shift, value, start = self.buf, 0, 0, pos
        while True:
            if pos >= end:
                if top:
                    raise _Truncated(pos + 1)
                raise _Malformed(f"byte {pos}: varint runs past the end of its message")
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value & 0xFFFF_FFFF_FFFF_FFFF, pos
            shift += 7
            if pos - start >= limit:
                what = "varint" if limit == 10 else "field key or length"
                raise _Malformed(f"byte {start}: {what} longer than {limit} bytes")

    def tag(self, pos: int, end: int, top: bool) -> tuple[int, int, int]:
        """The field key at ``pos``: (field number, wire type, position after it)."""
        key, after = self.varint(pos, end, top, limit=5)
        if key > 0xFFFF_FFFF:
            raise _Malformed(f"byte {pos}: field key {key} is not below 2**32")
        return key >> 3, key & 7, after

    def field(self, pos: int, end: int, top: bool = False, depth: int = 0,
              in_group: bool = False) -> tuple[int, int, int, int, int]:
        """One field at ``pos`` of a message (or, ``in_group``, of an unknown group) at
        ``depth``: (number, wire type, value start, value end, next pos)."""
        key_at = pos
        field_no, wire, pos = self.tag(pos, end, top)
        if field_no == 0 and not in_group:  # protobuf skips unknown groups without this check
            raise _Malformed(f"byte {key_at}: field number 0")
        if wire == VARINT:
            _, nxt = self.varint(pos, end, top)
            return field_no, wire, pos, nxt, nxt
        if wire == LEN:
            length, start = self.varint(pos, end, top, limit=5)
            stop = start + length
        elif wire == I32:
            start, stop = pos, pos + 4
        elif wire == I64:
            start, stop = pos, pos + 8
        elif wire == SGROUP:
            start = pos
            stop = self.skip_group(field_no, pos, end, top, depth + 1)
            return field_no, wire, start, stop, stop
        elif wire == EGROUP:
            raise _Malformed(f"byte {key_at}: end of group {field_no} outside any group")
        else:
            raise _Malformed(f"byte {key_at}: invalid wire type {wire}")
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
            field_no, wire, after = self.tag(pos, end, top)
            if wire == EGROUP:
                if field_no != group_no:
                    raise _Malformed(f"byte {pos}: end of group {field_no} inside group {group_no}")
                return after
            _, _, _, _, pos = self.field(pos, end, top, depth, in_group=True)

    # -- messages --------------------------------------------------------------
    def layer_v2(self, start: int, end: int) -> tuple[bytes, list[tuple]]:
        """LayerParameter bytes without blob data, and the (data, diff count) of each blob."""
        return self._message_with_blobs(start, end, LAYER_V2_BLOBS, depth=1)

    def layer_v1(self, start: int, end: int) -> tuple[bytes, tuple[list, list]]:
        """V1LayerParameter bytes without blob data (its own and its V0 layer's)."""
        out, own, v0 = bytearray(), [], []
        pos = start
        while pos < end:
            at = pos
            field_no, wire, s, e, pos = self.field(pos, end, depth=1)
            if wire == LEN and field_no == LAYER_V1_BLOBS:
                blob, blob_data = self.blob(s, e, depth=2)
                own.append(blob_data)
            elif wire == LEN and field_no == LAYER_V1_V0:
                # A singular message given twice is merged: its blobs add up, in order.
                blob, blobs = self._message_with_blobs(s, e, LAYER_V0_BLOBS, depth=2)
                v0.extend(blobs)
            else:
                out += self.buf[at:pos]
                continue
            out += key(field_no, LEN) + varint(len(blob)) + blob
        return bytes(out), (own, v0)

    def _message_with_blobs(self, start: int, end: int, blobs_field: int, depth: int):
        out, blobs = bytearray(), []
        pos = start
        while pos < end:
            at = pos
            field_no, wire, s, e, pos = self.field(pos, end, depth=depth)
            if wire == LEN and field_no == blobs_field:
                blob, blob_data = self.blob(s, e, depth + 1)
                blobs.append(blob_data)
                out += key(field_no, LEN) + varint(len(blob)) + blob
            else:
                out += self.buf[at:pos]
        return bytes(out), blobs

    def blob(self, start: int, end: int, depth: int) -> tuple[bytes, tuple]:
        """BlobProto bytes without data/diff, and (its data as float32 or None when not
        wanted, its number of diff values).

        ``double_data`` wins over ``data`` when it has any values (Blob::FromProto), and
        ``double_diff`` over ``diff`` likewise. Each may come packed (any number of
        chunks, empty ones too) or unpacked.
        """
        out = bytearray()
        chunks: dict[int, list] = {BLOB_DATA: [], BLOB_DOUBLE_DATA: []}
        counts = dict.fromkeys(BLOB_VALUES, 0)
        pos = start
        while pos < end:
            at = pos
            field_no, wire, s, e, pos = self.field(pos, end, depth=depth)
            width = BLOB_VALUES.get(field_no)
            if width is None or wire not in (LEN, I32 if width == 4 else I64):
                out += self.buf[at:pos]  # not a blob value (for protobuf an unknown field)
                continue
            keep = self.want_data and field_no in chunks
            dtype = "<f4" if width == 4 else "<f8"
            if wire == LEN:
                if (e - s) % width:
                    raise _Malformed(f"byte {s}: packed field {field_no} of {e - s} bytes is not a "
                                     f"multiple of {width}")
                n = (e - s) // width
                if keep:
                    chunks[field_no].append(np.frombuffer(self.buf, dtype, n, s))
            else:  # a run of unpacked records [this same key][value]: read as one array
                n, pos = self._unpacked_run(at, s, end, width)
                if keep:
                    step = s - at + width
                    records = np.frombuffer(self.buf, np.uint8, n * step, at).reshape(n, step)
                    chunks[field_no].append(records[:, s - at:].copy().view(dtype).reshape(-1))
            counts[field_no] += n
        diff_count = counts[BLOB_DOUBLE_DIFF] or counts[BLOB_DIFF]
        if not self.want_data:
            return bytes(out), (None, diff_count)
        if counts[BLOB_DOUBLE_DATA]:
            # As cvtsd2ss (Caffe on x86): inf beyond float range, NaN stays NaN; no warning.
            with np.errstate(over="ignore", invalid="ignore"):
                data = _concat(chunks[BLOB_DOUBLE_DATA]).astype(np.float32)
        else:
            data = _concat([c for c in chunks[BLOB_DATA] if c.size])
        return bytes(out), (data, diff_count)

    def _unpacked_run(self, at: int, start: int, end: int, width: int) -> tuple[int, int]:
        """How many consecutive records ``[key][value of width bytes]`` whose key spans
        ``at``..``start`` start at ``at`` (at least 1: the caller checked the first),
        and the position after them. A record whose first bytes are that same key (a
        whole varint) is a value of the same field. Read with NumPy in windows that
        double, rather than one Python step per value (and not quadratic in short runs)."""
        step = start - at + width
        total, n, window = (end - at) // step, 0, 64
        if total < 2 or self.buf[at + step:start + step] != self.buf[at:start]:
            return 1, at + step  # a single value (no NumPy for it: interleaved fields stay linear)
        key = np.frombuffer(self.buf, np.uint8, start - at, at)
        while n < total:
            m = min(window, total - n)
            keys = np.frombuffer(self.buf, np.uint8, m * step, at + n * step).reshape(m, step)[:, :len(key)]
            other = np.flatnonzero((keys != key).any(axis=1))
            if other.size:
                n += int(other[0])
                break
            n, window = n + m, window * 2
        return n, at + n * step


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        return np.zeros(0, np.float32)
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks)
