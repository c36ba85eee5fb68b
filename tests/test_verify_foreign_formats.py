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
    from porting.verify.recording import load_module

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


def test_reports_show_the_mapping_table(small, port, tmp_path):
    status, report = _run(small, tmp_path / "r", "--onnx", _onnx(tmp_path))
    assert status == 0, report["summary"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Correspondence: caffe outputs and onnx's" in md
    assert "| caffe layer or blob | onnx output | found by |" in md
    rows = [f"| {k} | `{v}[0]` | value |" for k, v in ONNX_EXPECTED.items()]
    assert "\n".join(rows) in md
    assert "Without a counterpart (not compared): drop6" in md
    page = (tmp_path / "r" / "report.html").read_text()
    assert ("<tr><td class=\"l\">conv1</td><td class=\"l\"><code>/0/Conv[0]</code></td>"
            "<td class=\"l\">value</td></tr>") in page
    assert "Without a counterpart (not compared): drop6" in page
    assert report["net"]["torch"]["map"]["conv1"] == {"module": "/0/Conv", "output": 0}
    # after the RGB swap, conv1 is found by its type (the Conv op) and listed so
    port("rgb_swap")
    status, report = _run(small, tmp_path / "bug", "--onnx", _onnx(tmp_path))
    assert status == 1
    assert "| conv1 | `/0/Conv[0]` | type |" in (tmp_path / "bug" / "report.md").read_text()


def test_our_port_report_has_no_mapping_table(small, tmp_path):
    prototxt, caffemodel, golden, _ = small
    assert main(["verify", str(prototxt), str(caffemodel), "--reference", str(golden), "--no-onnx",
                 "--report", str(tmp_path / "r")]) == 0
    assert "Correspondence" not in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("option", ["--torch", "--onnx"])
def test_json_input_convention(small, port, tmp_path, option):
    # the torchvision-style port, its convention given as a JSON file instead of the flags
    (tmp_path / "in.json").write_text(json.dumps({"channel_order": "RGB", "range": 1,
                                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))
    spec = _script(tmp_path, "caffenet_rgb") if option == "--torch" else _onnx(tmp_path, "caffenet_rgb")
    status, report = _run(small, tmp_path / "r", option, spec, "--torch-input", str(tmp_path / "in.json"))
    assert status == 0, report["summary"]
    assert report["net"]["torch"]["input"] == {"kind": "rgb01", "mean_rgb": [0.485, 0.456, 0.406],
                                               "std_rgb": [0.229, 0.224, 0.225],
                                               "caffe_mean_bgr": [104.0, 117.0, 123.0]}
    # the same picture stated as 0-255 RGB: mean and std times 255
    (tmp_path / "in255.json").write_text(json.dumps({"channel_order": "RGB", "range": 255,
                                                     "mean": [123.675, 116.28, 103.53],
                                                     "std": [58.395, 57.12, 57.375]}))
    status, report = _run(small, tmp_path / "r255", option, spec, "--torch-input", str(tmp_path / "in255.json"))
    assert status == 0, report["summary"]
    assert report["net"]["torch"]["input"]["kind"] == "custom"
    # BGR order given to the RGB port: it departs at conv1
    (tmp_path / "bgr.json").write_text(json.dumps({"channel_order": "BGR", "range": 1,
                                                   "mean": [0.406, 0.456, 0.485], "std": [0.225, 0.224, 0.229]}))
    status, report = _run(small, tmp_path / "rb", option, spec, "--torch-input", str(tmp_path / "bgr.json"))
    assert status == 1 and report["departure"]["layer"] == "conv1", report["summary"]


@pytest.mark.parametrize("content, expected", [
    ('{"channel_order": "rgb"}', 'in.json: channel_order: expected "RGB" or "BGR", got "rgb"'),
    ('{"range": 0}', "in.json: range: expected a positive number (1 or 255), got 0"),
    ('{"range": true}', "in.json: range: expected a positive number"),
    ('{"mean": [1, 2]}', "in.json: mean: expected a list of three numbers, got [1, 2]"),
    ('{"std": [1, 0, 1]}', "in.json: std: expected a list of three positive numbers"),
    ('{"mean": [1, 2, NaN]}', "in.json: mean: expected a list of three numbers"),
    ('{"scale": 1}', "in.json: scale: unknown key"),
    ('[1]', "in.json: expected a JSON object"),
    ('{"mean": ', "in.json: line 1: not JSON"),
])
def test_bad_json_input_convention_exit_2(small, port, tmp_path, capsys, content, expected):
    (tmp_path / "in.json").write_text(content)
    err = _refused(small, tmp_path, capsys, "--torch", f"{FIXTURE}:caffenet", "--torch-input",
                   str(tmp_path / "in.json"))
    assert expected in err, err


def test_json_input_convention_takes_no_flags(small, port, tmp_path, capsys):
    (tmp_path / "in.json").write_text("{}")
    err = _refused(small, tmp_path, capsys, "--torch", f"{FIXTURE}:caffenet", "--torch-input",
                   str(tmp_path / "in.json"), "--torch-std", "1,2,3")
    assert "are not taken with a JSON --torch-input" in err, err


# --------------------------------------------------------------------------------------
# Bad and hostile files: exit 2, one line, nothing run
# --------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs Path(...).touch(): the proof that nothing was unpickled."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.sentinel),))


def _zip_member(path: Path, suffix: str) -> str:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return next(n for n in archive.namelist() if n.endswith(suffix))


def test_torch_save_pickle_is_never_loaded(small, port, tmp_path, capsys):
    sentinel = tmp_path / "ran"
    torch.save({"model": _Payload(sentinel)}, tmp_path / "pickled.pt")
    err = _refused(small, tmp_path, capsys, "--torch", tmp_path / "pickled.pt")
    assert "pickled.pt: not a TorchScript archive (torch.jit.save): no code/ in the zip" in err, err
    assert not sentinel.exists()


def test_torchscript_archive_with_a_python_pickle_is_refused(small, port, tmp_path, capsys):
    # a real TorchScript archive whose data.pkl is replaced by a pickle that would run code:
    # torch.jit.load's own unpickler refuses the global, nothing runs
    import pickle
    import zipfile

    good = _script(tmp_path)
    sentinel = tmp_path / "ran"
    member = _zip_member(good, "/data.pkl")
    hostile = tmp_path / "hostile.ts"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(hostile, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = pickle.dumps(_Payload(sentinel), protocol=2) if info.filename == member else src.read(info)
            dst.writestr(info.filename, data)
    err = _refused(small, tmp_path, capsys, "--torch", hostile)
    assert "hostile.ts: cannot load the TorchScript archive" in err, err
    assert not sentinel.exists()


@pytest.mark.parametrize("content, expected", [
    (b"", "not a TorchScript archive"),
    (b"PK\x03\x04 truncated zip", "not a TorchScript archive"),
    (b"\x80\x04K\x01.", "not a TorchScript archive"),
])
def test_malformed_torchscript_exit_2(small, port, tmp_path, capsys, content, expected):
    (tmp_path / "bad.ts").write_bytes(content)
    err = _refused(small, tmp_path, capsys, "--torch", tmp_path / "bad.ts")
    assert f"bad.ts: {expected}" in err, err


def test_missing_files_exit_2(small, port, tmp_path, capsys):
    assert "missing.ts: no such file" in _refused(small, tmp_path, capsys, "--torch", tmp_path / "missing.ts")
    assert "missing.onnx: no such file" in _refused(small, tmp_path, capsys, "--onnx", tmp_path / "missing.onnx")
    assert "--torch and --onnx: give one model" in _refused(small, tmp_path, capsys, "--onnx", "a.onnx",
                                                             "--torch", "b.ts")


def test_torchscript_in_place_on_a_view_is_refused(small, port, tmp_path, capsys):
    class ViewThenInPlace(torch.nn.Module):
        def forward(self, x):
            y = x.view(-1)
            x.add_(1.0)  # y sees it: torch cannot rewrite this as a pure op
            return y * 2

    path = tmp_path / "inplace.ts"
    torch.jit.save(torch.jit.script(ViewThenInPlace()), path)
    err = _refused(small, tmp_path, capsys, "--torch", path)
    assert "the TorchScript graph writes a tensor in place (aten::add_)" in err, err


def _tiny_onnx(nodes, initializers=(), inputs=None, outputs=None):
    from onnx import TensorProto, helper

    inputs = inputs or [helper.make_tensor_value_info("data", TensorProto.FLOAT, [2, 3, 21, 21])]
    outputs = outputs or [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, [2, 3, 21, 21])]
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hostile_onnx_exit_2(small, port, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def refused(model_or_bytes, name):
        path = tmp_path / name
        if isinstance(model_or_bytes, bytes):
            path.write_bytes(model_or_bytes)
        else:
            path.write_bytes(model_or_bytes.SerializeToString())
        return _refused(small, tmp_path, capsys, "--onnx", path)

    assert "garbage.onnx: not an ONNX model (DecodeError" in refused(b"\xff\xff\xff not protobuf", "garbage.onnx")
    assert "empty.onnx: invalid ONNX model" in refused(b"", "empty.onnx")
    # a declared 10^10-element weight with 8 bytes of data: onnx.checker, nothing allocated
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    weight.dims[:] = [100000, 100000]
    err = refused(_tiny_onnx([helper.make_node("Add", ["data", "w"], ["y"])], [weight]), "declared.onnx")
    assert "declared.onnx: invalid ONNX model" in err and "too small for the declared shape" in err, err
    # a 10^12-element value made at run time from a constant shape: refused by the size check before running
    shape = numpy_helper.from_array(np.array([1000000, 1000000], np.int64), "shape")
    big = helper.make_tensor_value_info("big", TensorProto.FLOAT, [1000000, 1000000])
    err = refused(_tiny_onnx([helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor(
        "v", TensorProto.FLOAT, [1], [0.0])), helper.make_node("Relu", ["data"], ["y"])], [shape],
        outputs=[big, helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 21, 21])]), "huge.onnx")
    assert "huge.onnx: its values take" in err and "above the limit" in err, err
    # a weight stored in another file (any path): not read
    external = numpy_helper.from_array(np.ones(3, np.float32), "w")
    external.data_location = onnx.TensorProto.EXTERNAL
    external.ClearField("raw_data")
    external.external_data.add(key="location", value="../../etc/passwd")
    err = refused(_tiny_onnx([helper.make_node("Add", ["data", "w"], ["y"])], [external]), "external.onnx")
    assert "external.onnx: tensor w is stored outside the file (external data): not read" in err, err
    # an If on the input's values: its branch's sizes are not known before it runs
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    branch = [helper.make_graph([helper.make_node(op, ["data"], [f"{op}_out"])], op, [],
                                [helper.make_tensor_value_info(f"{op}_out", TensorProto.FLOAT, [2, 3, 21, 21])])
              for op in ("Relu", "Neg")]
    err = refused(_tiny_onnx([helper.make_node("ReduceMax", ["data"], ["top"], keepdims=0),
                              helper.make_node("Greater", ["top", "zero"], ["cond"]),
                              helper.make_node("If", ["cond"], ["y"], name="branching", then_branch=branch[0],
                                               else_branch=branch[1])], [zero]), "if.onnx")
    assert "if.onnx: node branching (If) runs a subgraph on a condition or count that depends on the input" in err, err
    # two inputs: verify feeds one
    two = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 21, 21]) for n in ("a", "b")]
    err = refused(_tiny_onnx([helper.make_node("Add", ["a", "b"], ["y"])], inputs=two), "two.onnx")
    assert "two.onnx: verify feeds one input; the ONNX graph takes 2 (a, b)" in err, err
    # an input of another shape than the net's
    other = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 8, 8])]
    err = refused(_tiny_onnx([helper.make_node("Relu", ["data"], ["y"])], inputs=other, outputs=[
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])]), "shape.onnx")
    assert "shape.onnx: the ONNX input data has shape 1x3x8x8, the net's is 2x3x21x21" in err, err


def test_a_net_of_two_inputs_is_refused(tmp_path):
    # every format feeds the net's one input blob (labels aside); no Caffe needed to say so
    from porting.errors import PortingError
    from porting.graph import build_graph
    from porting.parse import read_prototxt
    from porting.verify.foreign import foreign_arrays

    layers = [f'layer {{ name: "{n}" type: "Input" top: "{n}" input_param {{ shape {{ dim: 1 dim: 3 dim: 4 dim: 4 }} }} }}'
              for n in ("a", "b")] + ['layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }']
    (tmp_path / "two.prototxt").write_text("\n".join(layers) + "\n")
    graph = build_graph(read_prototxt(tmp_path / "two.prototxt"))
    inputs = {n: np.zeros((1, 3, 4, 4), np.float32) for n in ("a", "b")}
    with pytest.raises(PortingError, match=r"^--torch feeds one input blob; the net has 2 \(a, b\)$"):
        foreign_arrays(torch.nn.Identity(), graph, {}, inputs)


@pytest.mark.parametrize("option", ["--torch", "--onnx"])
def test_explicit_map_of_graph_values(small, port, tmp_path, capsys, option):
    names = SCRIPT_EXPECTED if option == "--torch" else ONNX_EXPECTED
    spec = _script(tmp_path) if option == "--torch" else _onnx(tmp_path)
    given = {"conv1": names["conv1"], "pool1": [names["pool1"], 0], "norm1": {"module": names["norm1"]}}
    (tmp_path / "map.json").write_text(json.dumps(given))
    status, report = _run(small, tmp_path / "ok", option, spec, "--map", str(tmp_path / "map.json"))
    assert status == 0, report["summary"]
    assert _mapped(report) == {k: names[k] for k in given}
    assert set(report["net"]["torch"]["matched_by"].values()) == {"map"}
    (tmp_path / "bad.json").write_text(json.dumps({"conv1": names["conv1"] + "_9"}))
    err = _refused(small, tmp_path, capsys, option, spec, "--map", str(tmp_path / "bad.json"))
    assert f"bad.json: conv1: the module has no submodule {names['conv1']}_9" in err, err
