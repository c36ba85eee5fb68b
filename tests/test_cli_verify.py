"""`porting verify` / `porting demo` end to end against real Caffe."""
import json
from pathlib import Path

import pytest

from porting import models
from porting.cli import main

pytestmark = pytest.mark.caffe
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference-data"


@pytest.fixture(scope="module")
def caffenet_weights(caffe_weights):
    return caffe_weights(models.path("caffenet"), seed=1, filler="msra", bias_filler="gaussian", bias_std=0.1)


def test_demo_ends_with_report_all_within_tolerance(tmp_path, capsys):
    """What `make demo` runs: the MFV-form CaffeNet, Caffe-written He weights, ONNX third opinion."""
    assert main(["demo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["passed"] and report["exit_status"] == 0
    judged = [r for r in report["rows"] if r["passed"] is not None]
    assert len(judged) >= 2 * 23 and all(r["passed"] for r in judged)
    keys = {r["key"] for r in report["rows"]}
    assert {"top/conv1/0/data", "blob/data/diff"} <= keys  # pre-in-place value and input gradient
    assert report["net"]["onnx"]["outputs"] > 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and " src=\"http" not in html
    assert (tmp_path / "caffenet.safetensors").exists()
    assert "PASS" in capsys.readouterr().out


def test_verify_image_inputs_top5(tmp_path, caffenet_weights):
    images = sorted((SHARED / "mfv-original" / "mean_images" / "n03032252" / "0").glob("*.JPEG"))[:2]
    if not images:
        pytest.skip("reference data absent")
    status = main(["verify", str(models.path("caffenet")), str(caffenet_weights), "--input", *map(str, images),
                   "--no-onnx", "--synsets", str(SHARED / "mfv-original" / "synset_words.txt"),
                   "--report", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert status == 0 and report["inputs"]["batch"] == 2
    assert len(report["top5"]) == 2 and report["top5"][0]


def test_verify_strict_exit_1_when_beyond_tolerance(tmp_path, caffenet_weights, capsys):
    # A tolerance below float32 rounding of any summing layer fails only under --strict (and
    # still writes the report); the default verdict rests on the rounding bounds and passes.
    args = ["verify", str(models.path("caffenet")), str(caffenet_weights), "--no-onnx",
            "--tolerance", "Convolution=1e-12"]
    assert main([*args, "--report", str(tmp_path / "plain")]) == 0
    assert capsys.readouterr().out.startswith("PASS: port computes what caffe computes")
    assert main([*args, "--strict", "--report", str(tmp_path / "strict")]) == 1
    report = json.loads((tmp_path / "strict" / "report.json").read_text())
    failed = {r["type"] for r in report["rows"] if r["passed"] is False}
    assert not report["passed"] and report["strict"] and failed == {"Convolution"}
    assert report["summary"].startswith("FAIL by strict per-blob tolerance: top/conv")


@pytest.mark.parametrize("args", [["--objective", "nope:1"], ["--objective", "fc8:5000"], ["--input", "x.txt"]])
def test_verify_bad_input_exit_2(tmp_path, caffenet_weights, capsys, args):
    status = main(["verify", str(models.path("caffenet")), str(caffenet_weights), *args, "--report", str(tmp_path)])
    assert status == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "report.json").exists()
