"""The backends of the legacy stack (porting/legacy_backends.py): how one is chosen, the
docker (or podman) container's isolation and clean-up on a real engine, and the same net
giving the same blobs, bit for bit, through a container and through the root folder.

The engine tests need a running engine and the built image; they skip without them, and
fail instead when PORTING_REQUIRE_CAFFE=1 and PORTING_BACKEND names docker or podman (as
in CI's docker subset).
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from porting import legacy_backends
from porting.errors import PortingError
from porting.legacy import CaffeTimeout, Worker
from porting.legacy_backends import BACKENDS, DockerBackend, RootBackend, get_backend, make_backend
from porting.legacy_build import INSIDE_REFERENCE, REFERENCE_DIR
from test_legacy import HEAVY, TINY, numpy_tiny

ENGINE = os.environ.get("PORTING_BACKEND") if os.environ.get("PORTING_BACKEND") in ("docker", "podman") else "docker"


def test_unknown_backend_is_one_line():
    with pytest.raises(PortingError, match=r"^unknown legacy backend 'vm' \(choose one of chroot, docker, podman, rootless\)$"):
        get_backend("vm")


def test_a_root_folder_means_a_root_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTING_BACKEND", "docker")
    backend = get_backend(root=tmp_path)  # an explicit folder outranks a container backend
    assert isinstance(backend, RootBackend) and backend.root == tmp_path
    assert backend.name == ("chroot" if os.geteuid() == 0 else "rootless")
    monkeypatch.setenv("PORTING_BACKEND", "rootless")
    assert get_backend(root=tmp_path).name == "rootless"
    assert get_backend().name == "rootless" and get_backend("podman").name == "podman"


def test_default_is_the_first_that_works_said_once(monkeypatch, capsys):
    monkeypatch.delenv("PORTING_BACKEND", raising=False)
    monkeypatch.setattr(legacy_backends, "_chosen", None)
    works = [name for name in BACKENDS if make_backend(name).unavailable() is None]
    if not works:
        with pytest.raises(PortingError, match="no legacy backend works here: chroot: .*; rootless: "):
            get_backend()
        return
    assert get_backend().name == works[0] and get_backend().name == works[0]
    said = capsys.readouterr().err.splitlines()
    assert said == [f"porting: legacy Caffe runs through the {works[0]} backend, the first of "
                    "chroot, docker, podman, rootless that works here (PORTING_BACKEND chooses)"]


@pytest.fixture(scope="module")
def engine():
    backend = DockerBackend(ENGINE)
    reason = backend.problem()
    if reason:
        if os.environ.get("PORTING_REQUIRE_CAFFE") == "1" and os.environ.get("PORTING_BACKEND") == ENGINE:
            pytest.fail(f"PORTING_REQUIRE_CAFFE=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return backend


PROBE = r"""
import json, os, socket
try:
    socket.create_connection(("deb.debian.org", 80), timeout=5)
    net = "reached deb.debian.org"
except OSError as err:
    net = type(err).__name__
try:
    open("/opt/porting/reference/x", "w")
    reference = "writable"
except OSError as err:
    reference = err.strerror
with open("/mnt/written-inside", "w") as f:
    f.write("ok")
print(json.dumps({"net": net, "interfaces": sorted(os.listdir("/sys/class/net")), "reference": reference,
                  "uid": os.getuid(), "worker": os.path.isfile("/opt/porting/reference/worker.py")}))
"""


@pytest.mark.docker
def test_container_has_no_network_and_sees_only_its_binds(engine, tmp_path):
    argv, env = engine.launch(["python3", "-c", PROBE], [(REFERENCE_DIR, INSIDE_REFERENCE, "ro"), (tmp_path, "/mnt", "rw")])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["interfaces"] == ["lo"] and seen["net"] != "reached deb.debian.org"
    assert seen["reference"] == "Read-only file system" and seen["worker"]
    written = tmp_path / "written-inside"
    assert written.read_text() == "ok"
    if engine.engine == "docker":  # as the caller, so job files stay theirs
        assert seen["uid"] == os.getuid() and written.stat().st_uid == os.getuid()


def _containers(engine, name: str) -> str:
    listed = subprocess.run([engine.engine, "ps", "-a", "-q", "--filter", f"name=porting-{name}"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout.strip()


@pytest.mark.docker
def test_killed_worker_leaves_no_container(engine, tmp_path):
    heavy = tmp_path / "heavy.prototxt"
    heavy.write_text(HEAVY)
    with Worker(backend=engine, timeout=0.3, blas_threads=1) as worker:
        assert _containers(engine, worker.name)  # its container runs
        with pytest.raises(CaffeTimeout):
            worker.run_net(heavy, inputs={"data": np.ones((1, 16, 512, 512), np.float32)}, capture_tops=False)
        assert _containers(engine, worker.name) == ""  # killed client, container removed too
        assert worker.versions(timeout=60)["python3"]["caffe"] == "1.0.0"
        name = worker.name
    assert _containers(engine, name) == "" and not worker.jobdir.exists()


@pytest.mark.docker
def test_same_blobs_through_a_container_and_the_root_folder(engine, tmp_path):
    """The image and the root folder hold the same packages, so Caffe's float32 output is
    the same bit for bit (one BLAS thread on both sides); both match float64 NumPy."""
    folder = make_backend("chroot" if os.geteuid() == 0 else "rootless")
    reason = folder.problem()
    if reason:
        pytest.skip(f"no root folder backend to compare with: {reason}")
    prototxt = tmp_path / "tiny.prototxt"
    prototxt.write_text(TINY)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    results = {}
    for backend in (engine, folder):
        with Worker(backend=backend, blas_threads=1) as worker:
            weights = tmp_path / f"{backend.name}.caffemodel"
            worker.make_weights(prototxt, weights, seed=5, filler="gaussian", std=0.3, bias_filler="gaussian",
                                bias_std=0.5)
            results[backend.name] = worker.run_net(prototxt, weights, inputs={"data": x},
                                                   top_diffs={"fc": np.ones((2, 5), np.float32)}, params=True)
    a, b = results[engine.name], results[folder.name]
    assert (tmp_path / f"{engine.name}.caffemodel").read_bytes() == (tmp_path / f"{folder.name}.caffemodel").read_bytes()
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    fc = numpy_tiny(a, x)[3]
    np.testing.assert_allclose(a["blob/fc/data"], fc, rtol=0, atol=2e-6)  # as test_legacy measures
    assert a.provenance["versions"]["debian"] == b.provenance["versions"]["debian"]
