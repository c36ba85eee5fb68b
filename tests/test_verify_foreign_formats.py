"""`porting verify --torch FILE.ts` (TorchScript) and `--onnx FILE.onnx` against real Caffe 1.0.

The port is tests/fixtures/foreign_caffenet.py (torch layers only), scripted and saved by
torch.jit.save or exported by torch.onnx.export (the TorchScript-based exporter, offline),
verified against the golden file Caffe wrote once (tests/test_verify_torch.py's fixtures:
its small CaffeNet, Caffe's own fillers, batch 2, objective fc8:3). Each format passes
with the correspondence found automatically; the RGB-fed-to-BGR-weights bug fails at
conv1 (exit 1); bad or hostile files are exit 2 with one line, before anything runs (a
torch.save pickle is never unpickled: its payload would write a file). The report's
markdown and HTML show the mapping table; --torch-input takes a JSON file.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from porting.cli import main
from test_verify_torch import EXPECTED, FIXTURE, TORCHVISION, _mapped, port, small  # noqa: F401 (fixtures)

pytestmark = pytest.mark.caffe

# Caffe layer -> TorchScript value (module path/op) that auto-mapping must find.
SCRIPT_EXPECTED = {"conv1": "0/conv2d", "relu1": "1/relu", "pool1": "2/max_pool2d", "norm1": "3/If",
                   "conv2": "4/conv2d", "relu2": "5/relu", "pool2": "6/max_pool2d", "fc6": "8/linear",
                   "relu6": "9/relu", "drop6": "10/dropout", "fc8": "11/linear", "prob": "12/softmax"}
# ... and ONNX node (torch.onnx's names: /module path/op); eval Dropout is not exported.
ONNX_EXPECTED = {"conv1": "/0/Conv", "relu1": "/1/Relu", "pool1": "/2/MaxPool", "norm1": "/3/Div",
                 "conv2": "/4/Conv", "relu2": "/5/Relu", "pool2": "/6/MaxPool", "fc6": "/8/Gemm",
                 "relu6": "/9/Relu", "fc8": "/11/Gemm", "prob": "/12/Softmax"}


def _module(factory="caffenet"):
    from porting.verify.foreign import load_module

    return load_module(f"{FIXTURE}:{factory}")


def _script(tmp_path, factory="caffenet", name="port.ts") -> Path:
    path = tmp_path / name
    torch.jit.save(torch.jit.script(_module(factory)), path)
    return path


def _onnx(tmp_path, factory="caffenet") -> Path:
    path = tmp_path / "port.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_module(factory), (torch.zeros(2, 3, 21, 21),), str(path), dynamo=False)
    return path


def _run(small, report, option, spec, *extra) -> tuple[int, dict]:
    prototxt, caffemodel, golden, _ = small
    status = main(["verify", str(prototxt), str(caffemodel), "--reference", str(golden), option, str(spec),
                   "--report", str(report), *extra])
    return status, json.loads((Path(report) / "report.json").read_text())


def _refused(small, tmp_path, capsys, option, spec, *extra) -> str:
    prototxt, caffemodel, golden, _ = small
    status = main(["verify", str(prototxt), str(caffemodel), "--reference", str(golden), option, str(spec),
                   "--report", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r" / "report.json").exists()
    return err


def test_torchscript_passes(small, port, tmp_path):
    status, report = _run(small, tmp_path / "r", "--torch", _script(tmp_path))
    assert status == 0, report["summary"]
    assert _mapped(report) == SCRIPT_EXPECTED
    assert set(report["net"]["torch"]["matched_by"].values()) == {"value"}
    assert report["net"]["torch"]["gradients"].startswith("compared up to fc8")
    checks = [c for c in report["checks"] if c["framework"] == "torch"]
    assert {c["layer"] for c in checks if c["direction"] == "forward"} == set(EXPECTED) | {"input"}
    assert {c["layer"] for c in checks if c["direction"] == "backward"} >= {"conv1", "pool1", "norm1", "fc6"}
    assert all(c["within"] for c in checks)


def test_torchscript_nested_traced_passes(small, port, tmp_path):
    # traced, not scripted; nested names; pool2 and the flattening in one module; no Dropout
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(_module("caffenet_nested"), torch.zeros(2, 3, 21, 21)), path)
    status, report = _run(small, tmp_path / "r", "--torch", path)
    assert status == 0, report["summary"]
    mapped = _mapped(report)
    assert mapped["conv1"] == "features.conv1/_convolution" and mapped["fc8"] == "classifier.fc8/linear", mapped
    assert report["net"]["torch"]["no_counterpart"] == ["drop6"]


def test_torchscript_rgb_swap_fails_at_conv1(small, port, tmp_path):
    port("rgb_swap")
    status, report = _run(small, tmp_path / "r", "--torch", _script(tmp_path))
    assert status == 1
    dep = report["departure"]
    assert (dep["layer"], dep["direction"], dep["frameworks"]) == ("conv1", "forward", ["torch"]), report["summary"]
    assert report["summary"].startswith("FAIL at the forward of layer conv1 (Convolution): torch computes conv1 "
                                        "differently from caffe")
    assert _mapped(report)["conv1"] == "0/conv2d" and report["net"]["torch"]["matched_by"]["conv1"] == "type"


def test_onnx_passes(small, port, tmp_path):
    status, report = _run(small, tmp_path / "r", "--onnx", _onnx(tmp_path))
    assert status == 0, report["summary"]
    assert _mapped(report) == ONNX_EXPECTED
    assert report["net"]["torch"]["no_counterpart"] == ["drop6"]
    assert report["net"]["torch"]["gradients"] == "not compared: ONNX Runtime computes no gradients"
    checks = [c for c in report["checks"] if c["framework"] == "onnx"]
    # fc8's input (drop6's output, Caffe's fc6 blob) has no counterpart: fc8 is judged by its tolerance
    assert {c["layer"] for c in checks if c["direction"] == "forward"} == set(ONNX_EXPECTED) - {"fc8"} | {"input"}
    assert next(r for r in report["rows"] if r["key"] == "top/fc8/0/data")["passed"]
    assert all(c["within"] for c in checks)
    assert report["summary"].startswith("PASS: onnx computes what caffe computes"), report["summary"]


def test_onnx_rgb_swap_fails_at_conv1(small, port, tmp_path):
    port("rgb_swap")
    status, report = _run(small, tmp_path / "r", "--onnx", _onnx(tmp_path))
    assert status == 1
    dep = report["departure"]
    assert (dep["layer"], dep["direction"], dep["frameworks"]) == ("conv1", "forward", ["onnx"]), report["summary"]
    assert report["net"]["torch"]["matched_by"]["conv1"] == "type"
