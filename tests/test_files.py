"""porting.files: whole-or-nothing writes and file digests."""
import hashlib
import os
import stat

import pytest

from porting.files import atomic_path, copy_atomic, file_digest, write_atomic


def test_write_atomic_replaces_whole_with_the_usual_mode(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    write_atomic(target, b"first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_copy_and_digests(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(bytes(range(256)) * 5000)
    copy_atomic(source, tmp_path / "b.bin")
    data = source.read_bytes()
    assert (tmp_path / "b.bin").read_bytes() == data
    assert file_digest(source) == hashlib.sha256(data).hexdigest()
    assert file_digest(source, "sha1", chunk=1000) == hashlib.sha1(data).hexdigest()
