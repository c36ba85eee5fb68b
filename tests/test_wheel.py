"""The wheel carries the legacy recipe and the reference code: `porting env` works from an
installed package, outside the source tree.

The wheel is built from a copy of the sources (setuptools from the test extras, no build
isolation) and installed without dependencies into a fresh virtual environment in a
temp folder; the dependencies come from this test's environment through a path file,
which adds their folder to sys.path without running that folder's own path files (so
the editable install of the checkout stays out).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from porting.legacy_backends import DockerBackend
from porting.legacy_build import RECIPE_FILES, recipe_hash

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "porting", "reference", "docker", "mfv")


def run(argv, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, **kw)
    assert done.returncode == 0, f"{argv}: {done.stdout[-1500:]}{done.stderr[-1500:]}"
    return done


def test_installed_wheel_builds_and_reports_from_its_own_recipe(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src])
    wheel = next((tmp_path / "dist").glob("caffe_port_harness-*.whl"))
    listing = run([sys.executable, "-m", "zipfile", "-l", wheel]).stdout
    for name in RECIPE_FILES + ("Dockerfile",):
        assert f"porting/legacy_recipe/{name}" in listing
    for package in ("porting", "mfv", "reference"):  # every module of the sources, subpackages too
        for module in (REPO / package).rglob("*.py"):
            assert str(module.relative_to(REPO)) in listing, module

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    run([venv / "bin/python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])
    site = Path(run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shutil.rmtree(src)  # nothing of the sources is left to read

    where = tmp_path / "elsewhere"  # a working folder outside any source tree
    where.mkdir()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path / "home")}
    found = run([venv / "bin/python", "-c", "import porting, reference; print(porting.__file__); print(reference.__file__)"],
                cwd=where, env=env).stdout.split()
    assert all(Path(f).is_relative_to(site) for f in found), found

    root = tmp_path / "no-root-yet"
    status = json.loads(run([venv / "bin/porting", "env", "status", "--backend", "chroot", "--root", root, "--json"],
                            cwd=where, env=env).stdout)
    assert status["backend"] == "chroot" and status["built"] is False
    assert status["recipe_sha256"] == recipe_hash()  # the same recipe as the checkout's docker/

    plan = run([venv / "bin/porting", "env", "build", "--dry-run", "--backend", "chroot", "--root", root],
               cwd=where, env=env).stdout
    assert f"recipe: {site / 'porting' / 'legacy_recipe'} (sha256 {recipe_hash()})" in plan
    assert f"reference code: {site / 'reference'}" in plan and "would be built" in plan
    assert not root.exists()

    plan = run([venv / "bin/porting", "env", "build", "--dry-run", "--backend", "docker"], cwd=where, env=env).stdout
    assert f"image: {DockerBackend().image()}" in plan  # the same image tag as the checkout's
