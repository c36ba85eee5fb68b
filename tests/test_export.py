"""ONNX export, checker and reference evaluation as a third opinion (porting/export.py)."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from porting import PortingError, load_caffe
from porting.layers import LAYERS
from porting.verify import default_objective, float64_twin, port_arrays, random_inputs, verify_arrays

onnx = pytest.importorskip("onnx")
from porting.export import add_parser, check_onnx, export_onnx, onnx_arrays, onnx_opinion  # noqa: E402

NEEDED = {"Input", "Convolution", "ReLU", "Pooling", "LRN", "InnerProduct", "Dropout", "Softmax", "Concat", "Eltwise"}
needs_layers = pytest.mark.skipif(not NEEDED <= set(LAYERS), reason="layer types not registered yet")

NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 13 dim: 13 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 group: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 5 alpha: 0.001 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 1 group: 2 } }
layer { name: "sum" type: "Eltwise" bottom: "norm1" bottom: "conv2" top: "sum" eltwise_param { operation: SUM } }
layer { name: "apool" type: "Pooling" bottom: "norm1" top: "apool"
        pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "apool" top: "cat" }
layer { name: "fc" type: "InnerProduct" bottom: "cat" top: "fc" inner_product_param { num_output: 10 } }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "small.prototxt"
    path.write_text(NET)
    net = load_caffe(path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blobs in net.params.values():
            blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) * (2 / blobs[0][0].numel()) ** 0.5)
            blobs[1].copy_(torch.randn(blobs[1].shape, generator=gen) * 0.1)
    net.prototxt = path
    return net


@needs_layers
def test_export_check_and_evaluate(net, tmp_path):
    inputs = random_inputs(net.graph, seed=1)
    path = export_onnx(net, tmp_path / "small.onnx", inputs)
    summary = check_onnx(path)
    assert summary["inputs"] == ["data"] and summary["outputs"] == sum(len(s.tops) for s in net.graph.layers)
    assert summary["ops"].get("Conv") == 2 and summary["opset"] == 17 and "AveragePool" in summary["ops"]
    assert not list(tmp_path.glob("*.part"))
    theirs, ours = onnx_arrays(path, inputs), port_arrays(net, inputs)
    assert {k for k in ours if k.endswith("/data")} == set(theirs)
    # NumPy's float32 kernels sum in another order than torch's, and how far apart the two
    # end up depends on the CPU's kernels; what holds everywhere is that each ONNX layer,
    # given its own (ONNX) inputs, is within float32 rounding of the exact layer (the stock
    # exporter's divisor_override slip in AVE pooling would be 0.89 relative, far beyond).
    v = verify_arrays(float64_twin(net), ours, ours, others={"onnx": theirs})
    checks = {c.layer: c for c in v.checks if c.framework == "onnx"}
    assert set(checks) == {s.name for s in net.graph.layers if s.type != "Input"}
    beyond = {name: c.error_ratio for name, c in checks.items() if c.within is not True}
    assert not beyond, f"ONNX layers beyond their float32 rounding bound (error / bound): {beyond}"
    # in-place views: the blob is the ReLU output, the top keeps the pre-ReLU values
    assert (theirs["top/conv1/0/data"] < 0).any()
    np.testing.assert_array_equal(theirs["blob/conv1/data"], theirs["top/relu1/0/data"])


@needs_layers
def test_onnx_as_third_opinion_is_within_float32_bounds(net, tmp_path):
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=2)
    reference = port_arrays(net, inputs, obj)
    net64 = float64_twin(net)
    exact = port_arrays(net64, inputs, obj)
    arrays, summary = onnx_opinion(net, inputs, tmp_path)
    v = verify_arrays(net64, reference, reference, objective=obj, exact=exact, others={"onnx": arrays})
    assert v.passed and v.departure is None
    onnx_checks = [c for c in v.checks if c.framework == "onnx"]
    assert onnx_checks and all(c.direction == "forward" for c in onnx_checks)
    assert all(c.within for c in onnx_checks if c.within is not None)
    row = next(r for r in v.rows if r.key == "top/fc/0/data")
    assert "onnx" in row.others and "onnx" in row.vs_float64
    assert math.isfinite(row.others["onnx"]["max_rel"])


def test_check_refuses_a_broken_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1])]))  # z is never produced
    bad.write_bytes(model.SerializeToString())
    with pytest.raises(PortingError, match="bad.onnx: onnx.checker"):
        check_onnx(bad)


@needs_layers
def test_export_needs_every_input(net, tmp_path):
    with pytest.raises(PortingError, match="data"):
        export_onnx(net, tmp_path / "x.onnx", {"other": np.zeros((1,), np.float32)})
    assert not (tmp_path / "x.onnx").exists()


@needs_layers
def test_export_command(net, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.onnx"
    args = parser.parse_args(["export", str(net.prototxt), "--onnx", str(out), "--batch", "1", "--compare"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "onnx.checker: ok" in text and "largest relative difference" in text
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
