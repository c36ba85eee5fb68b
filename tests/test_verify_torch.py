"""`porting verify --torch`: someone else's PyTorch port verified against real Caffe 1.0.

The port is tests/fixtures/foreign_caffenet.py, hand-written with torch layers only (no
import of the harness), loading the weights of a caffemodel drawn by Caffe's own fillers
(read here through porting, handed over in an .npz named by an environment variable).
Caffe runs once (`porting reference dump`); every verify reads that golden file, one
verifies live. The port passes with the correspondence found automatically and with an
explicit --map; torchvision's input convention (RGB in [0, 1], mean/std) passes for the
module written for it; two seeded bugs (pooling size rounded down, RGB fed to BGR
weights, LRN's alpha divided by its size twice) fail with exit 1 at the layer where they
are; a bad map or module is exit 2, one line. torch's LocalResponseNorm needs no rewrite:
it scales by alpha / size as Caffe does, which the passing port shows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from porting.cli import main
from porting.net import load_caffe

pytestmark = pytest.mark.caffe
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "foreign_caffenet.py"

NET = """name: "foreign_small"
input: "data"
input_shape { dim: 2 dim: 3 dim: 21 dim: 21 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 5 alpha: 0.01 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  convolution_param { num_output: 12 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool2" top: "fc6" inner_product_param { num_output: 16 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc6" top: "fc8" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""

# Caffe layer -> index in the fixture's nn.Sequential (what auto-mapping must find).
EXPECTED = {"conv1": "0", "relu1": "1", "pool1": "2", "norm1": "3", "conv2": "4", "relu2": "5", "pool2": "6",
            "fc6": "8", "relu6": "9", "drop6": "10", "fc8": "11", "prob": "12"}
TORCHVISION = ["--torch-input", "rgb01", "--torch-mean", "0.485,0.456,0.406", "--torch-std", "0.229,0.224,0.225"]


@pytest.fixture(scope="module")
def small(tmp_path_factory, caffe_weights):
    """(prototxt, caffemodel, golden, weights.npz): Caffe's fillers, Caffe's run (batch 2, objective fc8:3)."""
    folder = tmp_path_factory.mktemp("foreign")
    prototxt = folder / "net.prototxt"
    prototxt.write_text(NET)
    caffemodel = caffe_weights(prototxt, seed=7, filler="msra", bias_filler="gaussian", bias_std=0.1)
    state = load_caffe(prototxt, caffemodel).state_dict()  # "conv1.0" weight, "conv1.1" bias
    weights = folder / "weights.npz"
    np.savez(weights, **{f"{k[:-2]}.{'weight' if k.endswith('.0') else 'bias'}": v.numpy()
                         for k, v in state.items()})
    golden = folder / "golden.npz"
    assert main(["reference", "dump", str(prototxt), str(caffemodel), "--batch", "2", "--seed", "4",
                 "--objective", "fc8:3", "-o", str(golden)]) == 0
    return prototxt, caffemodel, golden, weights


@pytest.fixture
def port(small, monkeypatch):
    """set(bug="") -> the fixture module's environment."""
    def set_bug(bug: str = "") -> None:
        monkeypatch.setenv("FOREIGN_CAFFENET_WEIGHTS", str(small[3]))
        monkeypatch.setenv("FOREIGN_CAFFENET_BUG", bug)
    set_bug()
    return set_bug


def _verify(small, report, factory="caffenet", *extra, live=False, factory_path=None) -> tuple[int, dict]:
    prototxt, caffemodel, golden, _ = small
    spec = str(factory_path) if factory_path else f"{FIXTURE}:{factory}"
    args = ["verify", str(prototxt), str(caffemodel), "--torch", spec, "--report", str(report)]
    args += ["--batch", "2", "--seed", "4", "--objective", "fc8:3"] if live else ["--reference", str(golden)]
    status = main(args + list(extra))
    return status, json.loads((Path(report) / "report.json").read_text())


def _exported(tmp_path) -> Path:
    """The fixture's port (as the environment sets it) through torch.export, saved as .pt2."""
    import torch

    from porting.verify.recording import load_module

    module = load_module(f"{FIXTURE}:caffenet")
    path = tmp_path / "port.pt2"
    torch.export.save(torch.export.export(module, (torch.zeros(2, 3, 21, 21),)), path)
    return path


def _mapped(report: dict) -> dict:
    return {k: v["module"] for k, v in report["net"]["torch"]["map"].items()}


def test_auto_map_passes(small, port, tmp_path):
    status, report = _verify(small, tmp_path / "r")
    assert status == 0, report["summary"]
    torch_map = report["net"]["torch"]
    assert _mapped(report) == EXPECTED
    assert set(torch_map["matched_by"].values()) == {"value"}
    assert torch_map["no_counterpart"] == []
    assert json.loads((tmp_path / "r" / "mapping.json").read_text()) == torch_map["map"]
    assert report["summary"].startswith("PASS: torch computes what caffe computes")
    checks = [c for c in report["checks"] if c["framework"] == "torch"]
    # every layer forward (Input included) and every value's gradient up to fc8 was judged
    forward = {c["layer"] for c in checks if c["direction"] == "forward"}
    assert forward == set(EXPECTED) | {"input"}
    assert {c["key"] for c in checks if c["direction"] == "backward"} >= {"top/conv1/0/diff", "top/input/0/diff"}
    assert all(c["within"] is not False for c in checks)
    keys = {r["key"] for r in report["rows"]}
    assert {"blob/data/diff", "top/fc8/0/diff", "blob/prob/data", "top/pool1/0/data"} <= keys


def test_nested_module_flattened_output_passes(small, port, tmp_path):
    status, report = _verify(small, tmp_path / "r", "caffenet_nested")
    assert status == 0, report["summary"]
    assert _mapped(report) == {k: ("features." if k in ("conv1", "relu1", "pool1", "norm1", "conv2", "relu2",
                                                       "pool2") else "classifier.") + k
                               for k in EXPECTED if k != "drop6"}
    assert report["net"]["torch"]["no_counterpart"] == ["drop6"]
    assert "top/drop6/0/data" not in {r["key"] for r in report["rows"]}  # listed, not compared, not failed
    pool2 = next(r for r in report["rows"] if r["key"] == "top/pool2/0/data")
    assert pool2["shape"] == [2, 12, 2, 2] and pool2["passed"]  # N x 48 taken back to Caffe's layout


def test_exported_program_passes_and_its_bug_fails(small, port, tmp_path):
    status, report = _verify(small, tmp_path / "r", "", factory_path=_exported(tmp_path))
    assert status == 0, report["summary"]
    assert _mapped(report) == {"conv1": "conv2d", "relu1": "relu_", "pool1": "max_pool2d", "norm1": "div",
                               "conv2": "conv2d_1", "relu2": "relu__1", "pool2": "max_pool2d_1", "fc6": "linear",
                               "relu6": "relu__2", "drop6": "dropout", "fc8": "linear_1", "prob": "softmax"}
    port("floor_pool")
    status, report = _verify(small, tmp_path / "bug", "", factory_path=_exported(tmp_path))
    assert status == 1 and report["summary"].startswith("FAIL at layer pool1 (Pooling)"), report["summary"]


def test_explicit_map_passes_and_is_used(small, port, tmp_path):
    given = {"conv1": ["0", 0], "pool1": "2", "norm1": {"module": "3"}, "fc8": {"module": "11", "output": 0}}
    (tmp_path / "map.json").write_text(json.dumps(given))
    status, report = _verify(small, tmp_path / "r", "caffenet", "--map", str(tmp_path / "map.json"))
    assert status == 0, report["summary"]
    assert _mapped(report) == {"conv1": "0", "pool1": "2", "norm1": "3", "fc8": "11"}
    assert set(report["net"]["torch"]["matched_by"].values()) == {"map"}
    assert report["net"]["torch"]["no_counterpart"] == ["relu1", "conv2", "relu2", "pool2", "fc6", "relu6",
                                                       "drop6", "prob"]
    judged = {c["layer"] for c in report["checks"] if c["framework"] == "torch" and c["direction"] == "forward"}
    assert judged == {"input", "conv1", "norm1"}  # a layer is judged where its input and output both have one


@pytest.mark.parametrize("bug, status", [("", 0), ("lrn_alpha", 1)])
def test_output_only_map_is_judged_by_tolerance(small, port, tmp_path, bug, status):
    # prob's input (fc8) has no counterpart: no local check covers prob, so its tolerance does
    port(bug)
    (tmp_path / "map.json").write_text(json.dumps({"prob": "12"}))
    got, report = _verify(small, tmp_path / "r", "caffenet", "--map", str(tmp_path / "map.json"))
    assert got == status, report["summary"]
    prob = next(r for r in report["rows"] if r["key"] == "top/prob/0/data")
    assert prob["passed"] == (status == 0)
    assert report["net"]["torch"]["gradients"] == "not compared: the objective blob fc8 has no counterpart"
    if status:
        assert report["summary"].startswith("FAIL by per-blob tolerance (no local check covers it): "
                                            "top/prob/0/data:"), report["summary"]
        assert any(p.startswith("top/prob/0/data:") for p in report["problems"])


def test_live_caffe_passes(small, port, tmp_path):
    status, report = _verify(small, tmp_path / "r", live=True)
    assert status == 0, report["summary"]
    assert _mapped(report) == EXPECTED


@pytest.mark.parametrize("with_map", [False, True])
def test_pool_rounded_down_fails_at_pool1(small, port, tmp_path, with_map):
    port("floor_pool")
    extra = []
    if with_map:
        (tmp_path / "map.json").write_text(json.dumps(EXPECTED))
        extra = ["--map", str(tmp_path / "map.json")]
    status, report = _verify(small, tmp_path / "r", "caffenet", *extra)
    assert status == 1
    assert report["summary"].startswith("FAIL at layer pool1 (Pooling): top/pool1/0/data has shape "
                                        "(2, 8, 4, 4) vs (2, 8, 5, 5)"), report["summary"]
    assert _mapped(report)["pool1"] == "2"


def test_rgb_fed_to_bgr_weights_fails_at_conv1(small, port, tmp_path):
    port("rgb_swap")
    status, report = _verify(small, tmp_path / "r")
    assert status == 1
    departure = report["departure"]
    assert (departure["layer"], departure["direction"], departure["frameworks"]) == ("conv1", "forward", ["torch"])
    assert report["summary"] == ("FAIL at the forward of layer conv1 (Convolution): torch computes conv1 "
                                 "differently from caffe, which is within rounding of the port's float64 reading "
                                 "there (a semantic difference).")
    data = [c for c in report["checks"] if c["framework"] == "torch" and c["layer"] == "input"]
    assert [c["within"] for c in data] == [True]  # the input was what it was given: conv1 is at fault
    assert _mapped(report)["conv1"] == "0" and report["net"]["torch"]["matched_by"]["conv1"] == "type"


def test_lrn_alpha_divided_twice_fails_at_norm1(small, port, tmp_path):
    port("lrn_alpha")
    status, report = _verify(small, tmp_path / "r")
    assert status == 1
    assert (report["departure"]["layer"], report["departure"]["direction"]) == ("norm1", "forward")
    assert report["summary"].startswith("FAIL at the forward of layer norm1 (LRN): torch computes norm1 "
                                        "differently from caffe"), report["summary"]


def test_torchvision_convention_passes(small, port, tmp_path):
    status, report = _verify(small, tmp_path / "r", "caffenet_rgb", *TORCHVISION)
    assert status == 0, report["summary"]
    assert _mapped(report) == EXPECTED
    assert report["net"]["torch"]["input"] == {"kind": "rgb01", "mean_rgb": [0.485, 0.456, 0.406],
                                               "std_rgb": [0.229, 0.224, 0.225],
                                               "caffe_mean_bgr": [104.0, 117.0, 123.0]}
    # the input's gradient, taken back through the conversion, is within conv1's backward bound
    grads = [c for c in report["checks"] if c["framework"] == "torch" and c["key"] == "top/input/0/diff"]
    assert [c["within"] for c in grads] == [True]
    # fed Caffe's input instead, the same module departs at conv1
    status, report = _verify(small, tmp_path / "r2", "caffenet_rgb")
    assert status == 1 and report["departure"]["layer"] == "conv1"


@pytest.mark.parametrize("content, extra, expected", [
    ('{"conv9": "0"}', [], "map.json: conv9: no layer or computed blob of the net has this name"),
    ('{"conv1": "features.0"}', [], "map.json: conv1: the module has no submodule features.0"),
    ('{"conv1": ["0", 3]}', [], "map.json: conv1: 0 produced no tensor output 3 on call 0"),
    ('{"conv1": {"module": "0", "output": -1}}', [], "map.json: conv1: output and call must be integers >= 0"),
    ('["conv1"]', [], "map.json: expected a JSON object"),
    ('{"conv1": ', [], "map.json: line 1: not JSON"),
    ('{}', ["--torch-mean", "1,2,3"], "--torch-mean, --torch-std and --caffe-mean are taken only with"),
    ('{}', ["--torch-input", "rgb01", "--torch-std", "1,0,1"], "--torch-std: expected three positive numbers"),
])
def test_bad_map_or_options_exit_2(small, port, tmp_path, capsys, content, extra, expected):
    prototxt, caffemodel, golden, _ = small
    (tmp_path / "map.json").write_text(content)
    status = main(["verify", str(prototxt), str(caffemodel), "--reference", str(golden), "--torch",
                   f"{FIXTURE}:caffenet", "--map", str(tmp_path / "map.json"), "--report", str(tmp_path / "r"),
                   *extra])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize("spec, expected", [
    ("{fixture}:nothing", "has no callable nothing"),
    ("{fixture}", "expected FILE.py:FACTORY or package.module:FACTORY"),
    ("missing_port.py:net", "missing_port.py: no such file"),
    ("porting.no_such_module:net", "loading the module failed: ModuleNotFoundError"),
    ("numpy:zeros", "loading the module failed: TypeError"),
    ("numpy:array", "loading the module failed: TypeError"),
    ("missing.pt2", "missing.pt2: no such file"),
    ("{tmp}/bad.pt2", "bad.pt2: cannot load the exported program"),
])
def test_bad_module_exit_2(small, port, tmp_path, capsys, spec, expected):
    prototxt, caffemodel, golden, _ = small
    (tmp_path / "bad.pt2").write_bytes(b"PK not an exported program")
    status = main(["verify", str(prototxt), str(caffemodel), "--reference", str(golden), "--torch",
                   spec.format(fixture=FIXTURE, tmp=tmp_path), "--report", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and expected in err, err
