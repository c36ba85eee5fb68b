"""Message framing and array helpers shared by every process of the reference runner.

Runs unchanged under Python 2.7 (numpy 1.11) and Python 3 (numpy 1.19 in the legacy
root, numpy 2 on the host): no f-strings, no annotations, bytes handled explicitly.

A message is one line of UTF-8 JSON (an object) followed by the raw bytes of the arrays
its "arrays" entry lists, in that order: [[name, dtype.str, shape], ...], C order.
The host and the Python 3 worker exchange messages without inline arrays (arrays travel
as .npy/.npz files in the job folder); the Python 3 worker and its Python 2.7 child send
arrays inline.
"""
from __future__ import absolute_import, division, print_function

import hashlib
import json
import os

import numpy as np


class ChannelClosed(EOFError):
    """The other end of a pipe went away."""


def write_message(stream, header, arrays=None):
    """Write ``header`` (a JSON-able dict) and ``arrays`` (name -> ndarray), then flush."""
    specs, payloads = [], []
    for name, value in sorted((arrays or {}).items()):
        value = np.ascontiguousarray(value)
        if value.dtype.hasobject:
            raise TypeError("array %r holds Python objects; only plain dtypes cross the pipe" % name)
        specs.append([name, value.dtype.str, list(value.shape)])
        payloads.append(value)
    header = dict(header)
    header["arrays"] = specs
    line = json.dumps(header, sort_keys=True)
    if not isinstance(line, bytes):
        line = line.encode("utf-8")
    stream.write(line + b"\n")
    for value in payloads:
        stream.write(value.tobytes())
    stream.flush()


def read_message(stream):
    """Read one message: (header dict, {name: ndarray}). Raises ChannelClosed at EOF."""
    line = stream.readline()
    if not line:
        raise ChannelClosed("pipe closed")
    header = json.loads(line.decode("utf-8"))
    arrays = {}
    for name, dtype, shape in header.pop("arrays", []):
        dtype = np.dtype(str(dtype))
        count = int(np.prod(shape)) if shape else 1
        raw = _read_exact(stream, count * dtype.itemsize)
        arrays[str(name)] = np.frombuffer(raw, dtype=dtype).reshape([int(n) for n in shape]).copy()
    return header, arrays


def _read_exact(stream, size):
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            raise ChannelClosed("pipe closed inside a message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def protocol_streams():
    """(input, output) binary streams for messages; stray prints then go to stderr.

    Native code (Caffe, BLAS) or a library may print to fd 1; moving fd 1 onto fd 2
    after taking a private copy keeps such output out of the message stream.
    """
    out = os.fdopen(os.dup(1), "wb")
    inp = os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return inp, out


def sha256_file(path, cache=None):
    """sha256 hex of a file's bytes; ``cache`` (a dict) keys on (path, size, mtime)."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime)
    if cache is not None and key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if cache is not None:
        cache[key] = digest.hexdigest()
    return digest.hexdigest()


def array_digest(value):
    """{"sha256", "dtype", "shape"} of an array: the hash is over its C-order raw bytes."""
    value = np.ascontiguousarray(value)
    return {"sha256": hashlib.sha256(value.tobytes()).hexdigest(), "dtype": value.dtype.str,
            "shape": list(value.shape)}


def load_npy(path):
    """An .npy file as an array (never unpickles)."""
    return np.load(path, allow_pickle=False)


def save_npz(path, arrays, provenance=None):
    """Write ``arrays`` (name -> ndarray; names may hold '/') to ``path`` atomically.

    ``provenance`` (a JSON-able dict) is stored as the uint8 array "provenance.json".
    """
    arrays = dict((str(k), np.asarray(v)) for k, v in arrays.items())
    if provenance is not None:
        text = json.dumps(provenance, sort_keys=True)
        if not isinstance(text, bytes):
            text = text.encode("utf-8")
        arrays["provenance.json"] = np.frombuffer(text, dtype=np.uint8)
    tmp = "%s.tmp-%d" % (path, os.getpid())
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def error_text(exc):
    """One line: the exception's type and message."""
    return "%s: %s" % (type(exc).__name__, exc)
