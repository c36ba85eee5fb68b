"""Golden reference files: one real-Caffe run stored, so a port is verified without Caffe.

``porting reference dump`` runs real Caffe once (as ``porting verify`` does: the same
inputs, objective seed and data-layer rewrite) and writes a golden file; ``porting verify
... --reference FILE`` then compares the port with the stored arrays and starts no worker.

The format is a plain, uncompressed NumPy ``.npz`` archive (``np.savez``), every member a
little-endian float32 array (``<f4``, C order, NCHW, the net's own units) except one:

* ``provenance.json``: a 1-D uint8 array holding UTF-8 JSON (as the legacy worker's own
  results store theirs): ``schema`` ("porting-golden"), ``schema_version`` (1),
  ``created`` (UTC, ISO 8601), ``harness`` (this package's and its libraries' versions),
  ``net`` (name; prototxt and caffemodel file names and sha256 of their bytes),
  ``caffe`` (the worker's provenance: Caffe, BLAS, Debian package versions, sha256 of
  every array it was fed), ``machine`` (CPU model, the OPENBLAS_* variables Caffe ran
  with), ``run`` (``phase``, ``objective`` "LAYER:UNIT",
  ``dropout_seed``, ``input_shapes`` (top -> dims, from ``--input-shape``; may be empty),
  ``inputs`` (how the inputs were made, as the verify report says it)) and ``arrays``
  (every other member's key -> ``{"shape": [...], "dtype": "<f4"}``: the manifest);
* ``input/<name>``: each input blob as both frameworks were fed it;
* ``blob/<name>/data|diff`` and ``top/<layer>/<i>/data|diff``: Caffe's arrays under the
  keys of ``porting.verify.keys`` (forward values, the objective's gradients after the
  backward, and each layer's own outputs before an in-place layer overwrote them).

Reading treats the file as hostile: nothing is unpickled (an object array is refused
from its header); every member's header is read before its data, and a member whose
dtype is not ``<f4`` (uint8 for the provenance), whose header is unreadable or whose
declared size exceeds the member's stored size is refused before any allocation;
compressed members are refused (the stored size then bounds nothing); the JSON must
have the schema and version above, and the members must be exactly the manifest's, with
its shapes. ZIP's CRC-32 catches a damaged member. Any problem is a ``PortingError``
naming the file, the place (a member or field) and the problem. A file of another schema
version is refused with both versions named.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from porting.errors import PortingError, shown
from porting.files import atomic_open, file_digest
from porting.verify.keys import blob_key, parse_key

SCHEMA = "porting-golden"
SCHEMA_VERSION = 1
PROVENANCE = "provenance.json"
INPUT_PREFIX = "input/"
FLOAT = np.dtype("<f4")
MAX_PROVENANCE_BYTES = 1 << 26  # the JSON of a net of thousands of layers is a few MB
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
               RuntimeError, struct.error, SyntaxError, KeyError, OverflowError, MemoryError)


@dataclass
class Golden:
    """A golden file's contents: ``provenance`` (the JSON), ``inputs`` (name -> array) and
    ``arrays`` (Caffe's arrays by ``porting.verify.keys`` key)."""

    path: Path
    provenance: dict
    inputs: dict
    arrays: dict

    @property
    def run(self) -> dict:
        return self.provenance["run"]

    @property
    def batch(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def check_model(self, prototxt, caffemodel) -> None:
        """Refuse a golden file dumped from other files than ``prototxt``/``caffemodel`` (sha256)."""
        net = self.provenance["net"]
        for what, path in (("prototxt", prototxt), ("caffemodel", caffemodel)):
            mine = file_digest(path)
            if net[f"{what}_sha256"] != mine:
                raise PortingError(f"was dumped from another {what} (sha256 {net[what + '_sha256'][:12]}..., "
                                   f"{Path(path).name} has {mine[:12]}...)", self.path, f"net.{what}_sha256")

    def check_inputs(self, graph) -> None:
        """The stored inputs must be exactly the net's inputs, of its per-item shapes, one batch."""
        names, mine = set(self.inputs), set(graph.inputs)
        if names != mine:
            extra, missing = sorted(names - mine), sorted(mine - names)
            raise PortingError(f"inputs {', '.join(map(shown, sorted(names)))} do not match the net's "
                               f"({', '.join(map(shown, sorted(mine)))})", self.path,
                               shown(INPUT_PREFIX + (missing or extra)[0]))
        for name, arr in self.inputs.items():
            want = tuple(graph.inputs[name])
            if arr.ndim != len(want) or arr.shape[1:] != want[1:] or arr.shape[0] != self.batch:
                raise PortingError(f"shape {_dims(arr.shape)} does not fit the input {_dims(want[1:])} "
                                   f"(per item) at batch {self.batch}", self.path, shown(INPUT_PREFIX + name))

    def check_required(self, graph, objective_blob: str) -> None:
        """Caffe's forward value of every blob and the objective blob's gradient must be there."""
        needed = [blob_key(b, "data") for b in graph.blob_shapes] + [blob_key(objective_blob, "diff")]
        for key in needed:
            if key not in self.arrays:
                raise PortingError(f"missing array {shown(key)} (the net has that blob)", self.path)


def _dims(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def write_golden(path, arrays, inputs, caffe_provenance: dict, run: dict, prototxt, caffemodel,
                 net_name: str = "") -> dict:
    """Write a golden file atomically (whole or not at all); returns its provenance dict.

    ``arrays``: Caffe's arrays by key (a ``CaffeResult``); ``inputs``: name -> the fed
    array; ``run``: phase, objective, dropout_seed, input_shapes, inputs (see the module doc).
    """
    from porting.report import _versions

    members = {}
    for name, arr in inputs.items():
        members[INPUT_PREFIX + name] = np.asarray(arr, dtype=FLOAT, order="C")
    for key, arr in arrays.items():
        if parse_key(key) is None:
            raise ValueError(f"not an array key of porting.verify.keys: {key!r}")
        members[key] = np.asarray(arr, dtype=FLOAT, order="C")  # 0-d stays 0-d (a loss)
    provenance = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "harness": _versions(),
        "net": {"name": net_name, "prototxt": Path(prototxt).name, "prototxt_sha256": file_digest(prototxt),
                "caffemodel": Path(caffemodel).name, "caffemodel_sha256": file_digest(caffemodel)},
        "caffe": dict(caffe_provenance or {}),
        "machine": _machine(),
        "run": dict(run),
        "arrays": {k: {"shape": list(a.shape), "dtype": FLOAT.str} for k, a in members.items()},
    }
    text = json.dumps(provenance, sort_keys=True).encode("utf-8")
    members[PROVENANCE] = np.frombuffer(text, dtype=np.uint8)
    with atomic_open(path, "wb") as f:
        np.savez(f, **members)
    return provenance


def _machine() -> dict:
    """Where Caffe ran: the CPU model and the OpenBLAS variables the worker inherits
    (``OPENBLAS_CORETYPE`` picks the kernels, so the rounding)."""
    from porting.legacy_worker import _passed_through

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu, "blas_environment": {k: v for k, v in sorted(os.environ.items()) if _passed_through(k)}}


def read_golden(path) -> Golden:
    """Read and validate a golden file (see the module doc); a ``PortingError`` on any problem."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise PortingError("a member appears twice", path)
            by_name = {i.filename: i for i in infos}
            if PROVENANCE + ".npy" not in by_name:
                raise PortingError(f"no {PROVENANCE} member: not a golden reference file "
                                   "(write one with `porting reference dump`)", path)
            raw = _read_member(archive, by_name.pop(PROVENANCE + ".npy"), path, PROVENANCE)
            provenance = _parse_provenance(raw, path)
            manifest = provenance["arrays"]
            keys = {}
            for name, info in by_name.items():
                key = name[:-4] if name.endswith(".npy") else name
                if key not in manifest:
                    raise PortingError("member not in the manifest (provenance arrays)", path, shown(key))
                keys[key] = info
            for key in manifest:
                if key not in keys:
                    raise PortingError("missing: the manifest (provenance arrays) lists it", path, shown(key))
            inputs, arrays = {}, {}
            for key, info in keys.items():
                arr = _read_member(archive, info, path, key)
                want = tuple(manifest[key]["shape"])
                if arr.shape != want:
                    raise PortingError(f"shape {_dims(arr.shape)}, the manifest says {_dims(want)}", path, shown(key))
                if key.startswith(INPUT_PREFIX):
                    inputs[key[len(INPUT_PREFIX):]] = arr
                else:
                    arrays[key] = arr
    except PortingError:
        raise
    except FileNotFoundError:
        raise PortingError("no such file", path) from None
    except IsADirectoryError:
        raise PortingError("is a directory, not a file", path) from None
    except _UNREADABLE as err:
        raise PortingError(f"cannot read: not an intact npz archive ({shown(err, 120)})", path) from None
    if not inputs:
        raise PortingError("holds no input/<name> array", path)
    if len({a.shape[0] if a.ndim else None for a in inputs.values()}) != 1 or any(a.ndim == 0 for a in inputs.values()):
        raise PortingError("inputs of different batch sizes", path)
    return Golden(path, provenance, inputs, arrays)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, key: str) -> np.ndarray:
    """One .npy member, its header checked before its data is read."""
    place = shown(key)
    if not info.filename.endswith(".npy"):
        raise PortingError("member is not a .npy array", path, place)
    if info.compress_type != zipfile.ZIP_STORED:
        raise PortingError("compressed member: golden files are plain np.savez archives", path, place)
    size_on_disk = path.stat().st_size
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise PortingError(f"unknown .npy format version {version}", path, place)
        if dtype.hasobject:
            raise PortingError("holds Python objects (a pickle): not read", path, place)
        want = np.dtype(np.uint8) if key == PROVENANCE else FLOAT
        if dtype != want:
            raise PortingError(f"dtype {dtype.str}, expected {want.str}", path, place)
        if any(int(d) < 0 for d in shape):
            raise PortingError(f"negative dimension in shape {shape}", path, place)
        count = 1
        for d in shape:
            count *= int(d)
        nbytes = count * dtype.itemsize
        if nbytes > min(info.file_size, size_on_disk) or (key == PROVENANCE and nbytes > MAX_PROVENANCE_BYTES):
            raise PortingError(f"declares shape {_dims(shape)}, more than the member holds", path, place)
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise PortingError("truncated member", path, place)
    arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return np.array(arr, order="C")


def _parse_provenance(raw: np.ndarray, path: Path) -> dict:
    if raw.ndim != 1:
        raise PortingError("must be a 1-D uint8 array of JSON", path, PROVENANCE)
    try:
        prov = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise PortingError(f"not JSON ({shown(err, 80)})", path, PROVENANCE) from None
    if not isinstance(prov, dict) or prov.get("schema") != SCHEMA:
        found = prov.get("schema") if isinstance(prov, dict) else None
        raise PortingError(f"schema {shown(found)!s}, not {SCHEMA}: not a golden reference file", path,
                           f"{PROVENANCE} schema")
    version = prov.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PortingError(f"schema version {shown(version)}; this harness reads version {SCHEMA_VERSION} "
                           "(dump the file again with this harness)", path, f"{PROVENANCE} schema_version")
    for field, kind in (("net", dict), ("caffe", dict), ("run", dict), ("arrays", dict), ("created", str)):
        if not isinstance(prov.get(field), kind):
            raise PortingError(f"missing or not a JSON {'object' if kind is dict else 'string'}", path,
                               f"{PROVENANCE} {field}")
    for field in ("prototxt_sha256", "caffemodel_sha256", "prototxt", "caffemodel"):
        if not isinstance(prov["net"].get(field), str):
            raise PortingError("missing or not a string", path, f"{PROVENANCE} net.{field}")
    run = prov["run"]
    if run.get("phase") not in ("test", "train"):
        raise PortingError("must be \"test\" or \"train\"", path, f"{PROVENANCE} run.phase")
    if not isinstance(run.get("objective"), str):
        raise PortingError("missing or not a string", path, f"{PROVENANCE} run.objective")
    if run.get("dropout_seed") is not None and not _is_int(run["dropout_seed"]):
        raise PortingError("must be an integer or null", path, f"{PROVENANCE} run.dropout_seed")
    shapes = run.get("input_shapes")
    if not isinstance(shapes, dict) or not all(
            isinstance(v, list) and v and all(_is_int(d) and d > 0 for d in v) for v in shapes.values()):
        raise PortingError("must map top names to lists of positive integers", path, f"{PROVENANCE} run.input_shapes")
    if not isinstance(run.get("inputs"), dict):
        raise PortingError("missing or not an object", path, f"{PROVENANCE} run.inputs")
    for key, entry in prov["arrays"].items():
        ok_key = key.startswith(INPUT_PREFIX) and len(key) > len(INPUT_PREFIX) or parse_key(key) is not None
        if not ok_key:
            raise PortingError("not an array key (input/<name>, blob/<name>/data|diff, top/<layer>/<i>/data|diff)",
                               path, f"{PROVENANCE} arrays {shown(key)}")
        if (not isinstance(entry, dict) or entry.get("dtype") != FLOAT.str or not isinstance(entry.get("shape"), list)
                or not all(_is_int(d) and d >= 0 for d in entry["shape"])):
            raise PortingError(f"must be {{\"shape\": [...], \"dtype\": \"{FLOAT.str}\"}}", path,
                               f"{PROVENANCE} arrays {shown(key)}")
    return prov


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def describe(golden: Golden) -> dict:
    """What a verify report says of the golden file it used."""
    prov = golden.provenance
    return {"file": os.fspath(golden.path), "sha256": file_digest(golden.path), "created": prov["created"],
            "schema_version": prov["schema_version"], "harness": prov.get("harness", {})}
