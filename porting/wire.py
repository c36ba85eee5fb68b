"""Protocol buffers' wire format, the few pieces the harness writes by hand: wire types,
varints and field keys (https://protobuf.dev/programming-guides/encoding/).

The caffemodel walker (porting/parse.py) reads the wire format itself so blob data stay
zero-copy views, and the writer (porting/write.py) streams blobs without building the
message; tests build malformed files with the same two functions.
"""
from __future__ import annotations

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5


def varint(value: int, width: int | None = None) -> bytes:
    """``value`` as a base-128 varint, low group first. A negative value is written as its
    two's complement in 64 bits (ten bytes, as protobuf writes a negative int32/int64);
    ``width`` pads it to that many bytes with redundant continuation bytes (an overlong
    encoding protobuf still reads, up to ten bytes)."""
    if value < 0:
        value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low)
        if not value and (width is None or len(out) >= width):
            break
    for i in range(len(out) - 1):
        out[i] |= 0x80
    return bytes(out)


def key(field_no: int, wire: int, width: int | None = None) -> bytes:
    """The key of field ``field_no`` with wire type ``wire`` (``width``: as for varint)."""
    return varint(field_no << 3 | wire, width)
