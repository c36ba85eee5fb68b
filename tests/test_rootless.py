"""The rootless backend, used by a user without privileges.

Run as root, the test creates an ordinary user (``porting-rootless``) and does everything
as that user: builds its own legacy root with mmdebstrap in user namespaces, under its
own home, then runs a net through a Worker on the rootless backend. Run as anyone else,
it does the same as that user. Nothing is built as root: every file of the user's root
belongs to the user. Where the machine lacks something the backend needs, the build
exits 2 with one line naming it, and the test fails with that line.

The first build downloads and provisions the whole stack (minutes); later runs find it
current (a no-op). The user's Python: this test's interpreter when the user may run it,
else the system's python3 with this environment's packages on PYTHONPATH.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import pytest

from porting.legacy_build import STAMP
from test_legacy import TINY, numpy_tiny

REPO = Path(__file__).resolve().parents[1]
USER = "porting-rootless"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"

RUN_A_NET = r"""
import json, sys
import numpy as np
from porting.legacy import Worker
folder = sys.argv[1]
x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
with Worker(blas_threads=1) as worker:
    worker.make_weights(folder + "/tiny.prototxt", folder + "/tiny.caffemodel", seed=5, filler="gaussian",
                        std=0.3, bias_filler="gaussian", bias_std=0.5)
    out = worker.run_net(folder + "/tiny.prototxt", folder + "/tiny.caffemodel", inputs={"data": x}, params=True)
    print(json.dumps({"backend": worker.backend.name, "caffe": worker.versions()["python3"]["caffe"]}))
np.savez(folder + "/out.npz", x=x, **out)
"""


def as_user(argv: list[str], user: pwd.struct_passwd | None, env: dict, timeout: float) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", user.pw_name, "--"] if user else []
    return subprocess.run(prefix + ["env", "-i", *(f"{k}={v}" for k, v in env.items())] + argv,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def unprivileged_user() -> pwd.struct_passwd | None:
    """The user to act as (created when missing), or None when this process is one already."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        return pwd.getpwnam(USER)


def user_python(user, home: str) -> tuple[list[str], dict]:
    """argv prefix and environment of a Python with this project that ``user`` may run."""
    env = {"HOME": home, "PATH": SYSTEM_PATH, "PORTING_BACKEND": "rootless", "LANG": "C.UTF-8"}
    site = sysconfig.get_paths()["purelib"]
    for needed in (REPO / "porting" / "__init__.py", Path(site) / "numpy" / "__init__.py"):
        if as_user(["test", "-r", str(needed)], user, env, 30).returncode != 0:
            pytest.fail(f"the user {USER} cannot read {needed}: put the checkout and its environment "
                        "where other users may read them", pytrace=False)
    if as_user(["test", "-x", sys.executable], user, env, 30).returncode == 0:
        return [sys.executable], env
    return ["python3"], dict(env, PYTHONPATH=f"{REPO}:{site}")


def test_missing_tools_are_one_line(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    done = subprocess.run([sys.executable, "-m", "porting", "env", "build", "--backend", "rootless", "--root",
                           tmp_path / "root"], capture_output=True, text=True, env=dict(os.environ, PATH=str(bare)))
    assert done.returncode == 2 and done.stdout == ""
    if os.geteuid() == 0:  # root's mmdebstrap maps no ids
        missing, packages = "`mmdebstrap`, `unshare`, `tar`", "mmdebstrap util-linux tar"
    else:
        missing, packages = "`mmdebstrap`, `unshare`, `tar`, `newuidmap`, `newgidmap`", "mmdebstrap util-linux tar uidmap"
    assert done.stderr == (f"porting: the rootless legacy root cannot be built: {missing} not found on PATH "
                           f"(as root: apt-get install -y {packages})\n")
    assert not (tmp_path / "root").exists()


@pytest.mark.slow
@pytest.mark.rootless
def test_unprivileged_user_builds_and_runs_a_net(tmp_path):
    user = unprivileged_user()
    home = user.pw_dir if user else os.environ["HOME"]
    python, env = user_python(user, home)

    built = as_user(python + ["-m", "porting", "env", "build", "--backend", "rootless", "-q"], user, env, 1800)
    if built.returncode != 0:
        lines = built.stderr.strip().splitlines()
        assert built.returncode == 2 and len(lines) == 1, built.stderr[-3000:]
        pytest.fail(lines[0], pytrace=False)  # what is missing, in one line

    shown = as_user(python + ["-m", "porting", "env", "status", "--json"], user, env, 120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    info = json.loads(shown.stdout)
    assert info["backend"] == "rootless" and info["current"] and info["built_by"] == "mmdebstrap --mode=unshare"
    root = Path(info["root"])
    uid = user.pw_uid if user else os.getuid()
    not_theirs = [p for p in [root, *root.rglob("*")] if p.lstat().st_uid != uid]
    assert not_theirs == [], f"{len(not_theirs)} files of the root not owned by the user, e.g. {not_theirs[:3]}"
    assert json.loads((root / STAMP).read_text())["recipe_sha256"] == info["recipe_sha256"]

    folder = Path(tempfile.mkdtemp(prefix="rootless-", dir="/tmp"))
    try:
        (folder / "tiny.prototxt").write_text(TINY)
        if user:
            shutil.chown(folder, user.pw_uid, user.pw_gid)
        ran = as_user(python + ["-c", RUN_A_NET, str(folder)], user, env, 600)
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert json.loads(ran.stdout.strip().splitlines()[-1]) == {"backend": "rootless", "caffe": "1.0.0"}
        with np.load(folder / "out.npz") as out:
            got = {k: out[k] for k in out.files}
    finally:
        shutil.rmtree(folder)
    conv, relu, pool, fc = numpy_tiny(got, got["x"])
    # as test_legacy measures for the chroot: float32 Caffe within 2e-6 of float64 NumPy
    np.testing.assert_allclose(got["blob/fc/data"], fc, rtol=0, atol=2e-6)
    np.testing.assert_allclose(got["top/conv1/0/data"], conv, rtol=0, atol=2e-6)
    assert np.abs(fc).max() > 0.1  # a real net's output, not zeros
