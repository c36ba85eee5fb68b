"""Session fixtures shared by the test suite.

Real Caffe (the legacy stack, see porting/legacy.py):
  caffe_root     the built legacy root folder (a Path)
  caffe_worker   one reference Worker for the whole run (Caffe starts once)
  caffe_weights  make(prototxt, seed=0, **filler) -> Path of a caffemodel written by real
                 Caffe's fillers, made once per (prototxt content, filler, seed) per session
Tests that use them, or carry ``@pytest.mark.caffe``, skip when the stack is absent,
and fail instead when PORTING_REQUIRE_CAFFE=1 (as in CI).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not flake on a new draw);
# HYPOTHESIS_PROFILE=explore draws fresh ones for a developer hunting bugs.
settings.register_profile("repeatable", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REQUIRE_CAFFE = os.environ.get("PORTING_REQUIRE_CAFFE") == "1"


def legacy_stack_missing() -> str | None:
    """Why real Caffe cannot run here, or None when it can."""
    from porting.legacy_build import read_stamp, resolve_root

    root = resolve_root(None)
    if read_stamp(root) is None:
        return f"the legacy Caffe root is not built at {root} (`porting env build`)"
    if os.geteuid() != 0:
        return "real Caffe runs in a chroot, which needs root privileges"
    return None


def _skip_or_fail(reason: str) -> None:
    if REQUIRE_CAFFE:
        pytest.fail(f"PORTING_REQUIRE_CAFFE=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item):
    if item.get_closest_marker("caffe") is not None:
        reason = legacy_stack_missing()
        if reason:
            _skip_or_fail(reason)


@pytest.fixture(scope="session")
def caffe_root() -> Path:
    reason = legacy_stack_missing()
    if reason:
        _skip_or_fail(reason)
    from porting.legacy_build import resolve_root

    return resolve_root(None)


@pytest.fixture(scope="session")
def caffe_worker(caffe_root):
    from porting.legacy import Worker

    worker = Worker(caffe_root)
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def caffe_weights(caffe_worker, tmp_path_factory):
    """make(prototxt, seed=0, **filler) -> caffemodel Path; filler keywords as Worker.make_weights."""
    folder = tmp_path_factory.mktemp("caffe-weights")
    made: dict[tuple, Path] = {}

    def make(prototxt, seed: int = 0, **filler) -> Path:
        content = hashlib.sha256(Path(prototxt).read_bytes()).hexdigest()
        key = (content, seed, tuple(sorted(filler.items())))
        if key not in made:
            out = folder / f"{content[:16]}-{len(made)}.caffemodel"
            caffe_worker.make_weights(prototxt, out, seed=seed, **filler)
            made[key] = out
        return made[key]

    return make
