"""porting.testing.assert_matches_caffe and the pytest plugin (fixture porting_verify).

The golden file is test_verify_torch's (its fixture ``small``: Caffe's fillers and one
real-Caffe run, `porting reference dump`); every check here reads that file with the legacy
root pointing nowhere. The hand-written port (tests/fixtures/foreign_caffenet.py) passes,
also given a map and through torchvision's input convention; variants of it made here
(torch only: B and R swapped at conv1, LRN's alpha divided by its size, pool1 rounded
down) fail with the verdict line naming the layer, the error measured against its bound
and the diagnosis (porting.verify.diagnose). Last, a separate test project in a temporary folder (no conftest, its own ini file)
uses the fixture and the function through the installed entry point, in its own pytest.
The tests that use the golden file are ``caffe`` tests (conftest marks them: it needs Caffe once).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from porting.errors import PortingError
from porting.testing import assert_matches_caffe, diagnosis_text, verify_module
from porting.verify.recording import load_module
from test_verify_torch import EXPECTED, FIXTURE, TORCHVISION, small  # noqa: F401 (small: the golden fixture)

ROOT = Path(__file__).resolve().parents[1]
CAFFELESS = {"PORTING_LEGACY_ROOT": "/nonexistent/porting-legacy-root", "PORTING_BACKEND": "chroot"}


@pytest.fixture
def golden(small, monkeypatch):
    """(golden path, files keywords): the port's weights set for the fixture module, no legacy stack."""
    prototxt, caffemodel, path, weights = small
    monkeypatch.setenv("FOREIGN_CAFFENET_WEIGHTS", str(weights))
    monkeypatch.setenv("FOREIGN_CAFFENET_BUG", "")
    for name, value in CAFFELESS.items():
        monkeypatch.setenv(name, value)
    return path, {"prototxt": prototxt, "caffemodel": caffemodel}


def _port() -> torch.nn.Module:
    return load_module(f"{FIXTURE}:caffenet")


def test_correct_port_passes(golden, tmp_path):
    path, files = golden
    module = _port().train()
    verification = assert_matches_caffe(module, path, **files)
    assert verification.passed and verification.summary.startswith("PASS: torch computes what caffe computes")
    assert all(m.training for m in module.modules())  # evaluated in eval mode, its mode given back
    # a factory spec, an explicit map (a dict; a map.json path is read as --map reads it)
    assert assert_matches_caffe(f"{FIXTURE}:caffenet", path, EXPECTED, **files).passed
    (tmp_path / "map.json").write_text(json.dumps({"conv1": "0", "norm1": "3"}))
    _, report = verify_module(_port(), path, tmp_path / "map.json", **files)
    assert report["map"] == {"conv1": {"module": "0", "output": 0}, "norm1": {"module": "3", "output": 0}}
    # torchvision's convention, as the CLI options take it (strings) or as numbers
    options = dict(zip(("torch_input", "torch_mean", "torch_std"), TORCHVISION[1::2]))
    assert assert_matches_caffe(f"{FIXTURE}:caffenet_rgb", path, **options, **files).passed
    options["torch_mean"] = (0.485, 0.456, 0.406)
    assert assert_matches_caffe(load_module(f"{FIXTURE}:caffenet_rgb"), path, **options, **files).passed


def test_bad_input_is_a_porting_error(golden, tmp_path):
    path, files = golden
    with pytest.raises(PortingError, match="its caffemodel .* is not beside it: pass caffemodel="):
        assert_matches_caffe(_port(), path, prototxt=files["prototxt"])  # the caffemodel is elsewhere
    with pytest.raises(PortingError, match="conv9: no layer or computed blob of the net has this name"):
        assert_matches_caffe(_port(), path, {"conv9": "0"}, **files)
    with pytest.raises(PortingError, match="--torch-std: expected three positive numbers"):
        assert_matches_caffe(_port(), path, torch_input="rgb01", torch_std=(1, 0, 1), **files)
    with pytest.raises(PortingError, match="--torch-mean, --torch-std and --caffe-mean are taken only with"):
        assert_matches_caffe(_port(), path, torch_mean="1,2,3", **files)
    with pytest.raises(PortingError, match="expected an nn.Module or what --torch takes .* got OrderedDict"):
        assert_matches_caffe(_port().state_dict(), path, **files)
    other = tmp_path / "other.prototxt"
    other.write_text(Path(files["prototxt"]).read_text() + "\n")
    with pytest.raises(PortingError, match="was dumped from another prototxt"):
        assert_matches_caffe(_port(), path, prototxt=other, caffemodel=files["caffemodel"])


def _swap_b_and_r(net):
    with torch.no_grad():
        net[0].weight.copy_(net[0].weight.flip(1))  # RGB fed to weights trained on BGR


def _lrn_alpha_per_element(net):
    net[3] = torch.nn.LocalResponseNorm(5, alpha=1e-2 / 5, beta=0.75, k=1.0)  # alpha / size taken twice


def _pool_rounded_down(net):
    net[2].ceil_mode = False  # torch's default: 10 -> 4 where Caffe gives 5


SEEDED = {
    "swap_b_and_r": (_swap_b_and_r, "FAIL at the forward of layer conv1 (Convolution): torch computes conv1 "
                     "differently from caffe", "top/conv1/0/data"),
    "lrn_alpha": (_lrn_alpha_per_element, "FAIL at the forward of layer norm1 (LRN): torch computes norm1 "
                  "differently from caffe", "top/norm1/0/data"),
    "pool_rounded_down": (_pool_rounded_down, "FAIL at layer pool1 (Pooling): top/pool1/0/data has shape "
                          "(2, 8, 4, 4) vs (2, 8, 5, 5).", None),
}
MEASURED = re.compile(r"measured at (\S+): error (\S+) of its largest element, allowed (\S+) \(float32 rounding "
                      r"bound of (\w+)\), (\S+)x the bound")


@pytest.mark.parametrize("bug", sorted(SEEDED))
def test_seeded_bug_fails_with_a_short_message(golden, bug):
    path, files = golden
    seed, verdict, key = SEEDED[bug]
    module = _port()
    seed(module)
    with pytest.raises(AssertionError) as raised:
        assert_matches_caffe(module, path, **files)
    lines = str(raised.value).splitlines()
    assert lines[0].startswith(f"the module does not match Caffe (golden.npz): {verdict}"), lines
    verification, _ = verify_module(module, path, **files)
    diagnosis = diagnosis_text(verification)
    if key is None:  # a shape: nothing to measure, the verdict line says it
        assert not any(line.startswith("measured") for line in lines), lines
    else:
        found = MEASURED.fullmatch(lines[1])
        assert found and found[1] == key and found[4] == key.split("/")[1], lines
        error, bound, ratio = float(found[2]), float(found[3]), float(found[5])
        assert error > 10 * bound > 0 and ratio > 10, lines  # the bug is far beyond float32 rounding
    layer = verdict.split("layer ")[1].split(" ")[0]
    assert f"{layer} matches" in diagnosis, diagnosis  # the verifier diagnoses these classic bugs
    assert [line for line in lines if line.startswith("diagnosis: ")] == ([f"diagnosis: {diagnosis}"] if diagnosis
                                                                          else [])
    assert len(lines) <= 4 and all(len(line) < 400 for line in lines), lines


def test_output_only_map_fails_by_its_tolerance(golden):
    """prob alone mapped: no local check covers it, its per-blob tolerance decides and is the bound shown."""
    path, files = golden
    module = _port()
    _lrn_alpha_per_element(module)
    with pytest.raises(AssertionError) as raised:
        assert_matches_caffe(module, path, {"prob": "12"}, **files)
    lines = str(raised.value).splitlines()
    found = re.fullmatch(r"the module does not match Caffe \(golden.npz\): FAIL by per-blob tolerance \(no local "
                         r"check covers it\): top/prob/0/data: (\S+) beyond its tolerance (\S+)\.", lines[0])
    assert found and float(found[1]) > float(found[2]) > 0, lines
    assert not any(line.startswith("measured") for line in lines), lines  # the verdict line says it
    assert lines[-1] == ("no counterpart in the module (not compared): conv1, relu1, pool1, norm1, conv2, relu2, "
                         "pool2, fc6, relu6, drop6, fc8"), lines


def test_diagnosis_is_read_where_the_verifier_puts_it():
    """Verification.diagnosis (porting.verify.diagnose) carries a sentence; a result without one: no line."""
    class Found:
        sentence = "norm1 matches with alpha divided by local_size"

    class Result:
        diagnosis = Found()

    assert diagnosis_text(Result()) == Found.sentence
    assert diagnosis_text(object()) == ""


# ---------------------------------------------------------------------------- a user's project

USER_TEST = '''
from pathlib import Path

import port
from porting.testing import assert_matches_caffe


def test_port_matches_caffe(porting_verify):
    porting_verify(port.caffenet())


def test_port_with_lrn_bug(monkeypatch):
    monkeypatch.setenv("FOREIGN_CAFFENET_BUG", "lrn_alpha")
    assert_matches_caffe(port.caffenet(), Path(__file__).parent / "golden" / "golden.npz")
'''


def _entry_point_installed() -> bool:
    return any(ep.value == "porting.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11"))


def test_plugin_in_a_separate_project(small, tmp_path):
    assert '[project.entry-points.pytest11]\nporting = "porting.pytest_plugin"' in \
        "\n".join(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if not line.startswith("#"))
    if not _entry_point_installed():
        pytest.fail("the pytest11 entry point is not installed: run `pip install -e . --no-deps` again")
    prototxt, caffemodel, golden, weights = small
    project = tmp_path / "user-project"
    (project / "golden").mkdir(parents=True)
    for source in (prototxt, caffemodel):  # under the names the golden file records
        shutil.copy(source, project / "golden" / Path(source).name)
    shutil.copy(golden, project / "golden" / "golden.npz")
    shutil.copy(FIXTURE, project / "port.py")
    (project / "test_port.py").write_text(USER_TEST)
    (project / "pytest.ini").write_text("[pytest]\nporting_golden = golden/golden.npz\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(CAFFELESS, FOREIGN_CAFFENET_WEIGHTS=str(weights), FOREIGN_CAFFENET_BUG="")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                              capture_output=True, text=True, env=env, cwd=project, timeout=600)

    done = run()
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "1 failed, 1 passed" in out, out
    assert ("AssertionError: the module does not match Caffe (golden.npz): FAIL at the forward of layer norm1 "
            "(LRN): torch computes norm1 differently from caffe") in out, out
    assert "measured at top/norm1/0/data: error " in out, out
    assert "diagnosis: norm1 matches with alpha divided by local_size once more" in out, out
    assert "FAILED test_port.py::test_port_with_lrn_bug" in out and "porting/testing.py" not in out, out
    # --porting-golden (relative to where pytest starts) overrides the ini option
    done = run("--porting-golden", "golden/golden.npz", "-o", "porting_golden=nowhere.npz", "-k", "matches")
    assert done.returncode == 0 and "1 passed, 1 deselected" in done.stdout, done.stdout + done.stderr
    # the fixture without a golden file configured fails and says how to give one
    done = run("-o", "porting_golden=", "-k", "matches")
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "porting_verify needs a golden file: --porting-golden PATH" in out, out
