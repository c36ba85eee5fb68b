"""Files written whole or not at all, and file digests: the one home of both.

``atomic_path(path)`` yields a temporary name beside ``path``; what is written there is
renamed onto ``path`` (same folder, so the rename is atomic) only when the block ends
without an exception, with the usual mode (0666 less the umask; mkstemp makes 0600).
Otherwise the temporary file is removed: nothing half-written is left behind. Missing
folders on the way are created; a target that cannot be written (a directory, a folder
path through a file, no permission) is a ``PortingError`` naming it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from porting.errors import PortingError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file name beside ``path``, renamed onto it when the block succeeds."""
    target = Path(path)
    if target.is_dir():
        raise PortingError("cannot write: is a directory, not a file", path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as err:
        raise PortingError(_write_problem(err), path) from None
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        try:
            os.replace(tmp, target)
        except OSError as err:
            raise PortingError(_write_problem(err), path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_problem(err: OSError) -> str:
    if isinstance(err, (FileExistsError, NotADirectoryError)):  # mkdir or mkstemp through a file
        return "cannot write: a part of its folder path is not a folder"
    if isinstance(err, IsADirectoryError):
        return "cannot write: is a directory, not a file"
    if isinstance(err, PermissionError):
        return "cannot write: permission denied"
    return f"cannot write ({err.strerror or err})"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """``open`` on a temporary file beside ``path``; flushed, synced and renamed on success."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def copy_atomic(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy ``source`` onto ``path`` whole or not at all."""
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)


def read_json(path: str | os.PathLike, limit: int = 1 << 20):
    """A small JSON file (at most ``limit`` bytes, read no further) as Python values; a
    PortingError naming the file when it cannot be read, is larger, or is not UTF-8 JSON."""
    import json

    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise PortingError(f"cannot read: {err.strerror or err}", path) from None
    if len(data) > limit:
        raise PortingError(f"larger than {limit} bytes", path)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise PortingError(f"not JSON: not UTF-8 text (byte {err.start})", path) from None
    except json.JSONDecodeError as err:
        raise PortingError(f"not JSON: {err.msg}", path, f"line {err.lineno}") from None


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of a file's bytes, read in chunks (``algorithm``: any hashlib name)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
