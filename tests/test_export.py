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


TRAIN_NET = """
name: "train_style"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 6 dim: 3 dim: 6 dim: 6 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "loss_ignoring" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss_ignoring"
        loss_param { ignore_label: 3 } }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" top: "per_class"
        accuracy_param { top_k: 2 ignore_label: 1 } }
"""


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "porting", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def train_prototxt(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "train.prototxt"
    path.write_text(TRAIN_NET)
    return path


def test_export_training_style_net_compare(train_prototxt, tmp_path):
    """Labels are read by a cast (ONNX Cast), the VALID normalizer and Accuracy's counts
    are graph arithmetic: the export runs, and its graph holds for labels other than the
    traced example's (other ignored positions, other counts)."""
    out = tmp_path / "train.onnx"
    done = _cli("export", train_prototxt, "--onnx", out, "--compare")
    assert done.returncode == 0, done.stderr
    assert "onnx.checker: ok" in done.stdout and "Cast" in done.stdout
    worst = float(done.stdout.split("largest relative difference ")[1].split()[0])
    assert worst < 1e-5, done.stdout
    net = load_caffe(train_prototxt)  # weights drawn here (the CLI's are zeros: no caffemodel)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blobs in net.params.values():
            blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) * 0.05)
    export_onnx(net, out, random_inputs(net.graph, seed=0))
    net64 = float64_twin(net)
    for seed, labels in [(3, [3, 3, 3, 0, 4, 1]), (4, [0, 1, 2, 3, 4, 2]), (5, [1, 1, 1, 1, 1, 1])]:
        inputs = random_inputs(net.graph, seed=seed)
        inputs["label"] = np.asarray(labels, np.float32)
        ours, theirs = port_arrays(net, inputs), onnx_arrays(out, inputs)
        # Accuracy: counts and one float32 quotient each, the same in any arithmetic order
        for key in ("top/acc/0/data", "top/acc/1/data"):
            np.testing.assert_array_equal(theirs[key], ours[key])
        v = verify_arrays(net64, ours, ours, others={"onnx": theirs})
        beyond = {c.layer: c.error_ratio for c in v.checks if c.framework == "onnx" and c.within is not True
                  and c.layer.startswith("loss")}
        assert not beyond, f"seed {seed}: ONNX loss layers beyond their float32 bound: {beyond}"
        if seed == 3:  # three labels ignored: the normalizer is 3, not the traced example's count
            assert theirs["top/loss_ignoring/0/data"] != theirs["top/loss/0/data"]
            np.testing.assert_allclose(theirs["top/loss_ignoring/0/data"], -np.log(np.take_along_axis(
                _softmax(ours["top/fc/0/data"]), np.asarray(labels)[:, None], 1)[3:]).mean(), rtol=1e-5)
        assert 0 < theirs["top/acc/0/data"] < 1 or seed == 5


def _softmax(x):
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("layer", [
    'layer { name: "emb" type: "Embed" bottom: "idx" top: "emb" embed_param { num_output: 3 input_dim: 5 } }',
    'layer { name: "ri" type: "BatchReindex" bottom: "fc" bottom: "idx" top: "ri" }',
    'layer { name: "hinge" type: "HingeLoss" bottom: "fc" bottom: "idx" top: "hinge" }',
])
def test_index_reading_layers_export(layer, tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 5 dim: 4 } } }\n'
                    'layer { name: "idx" type: "Input" top: "idx" input_param { shape { dim: 5 } } }\n'
                    'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" '
                    'inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }\n' + layer)
    done = _cli("export", path, "--onnx", tmp_path / "net.onnx", "--compare")
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split("largest relative difference ")[1].split()[0]) < 1e-5
    net = load_caffe(path)
    inputs = random_inputs(net.graph, seed=7)
    inputs["idx"] = np.asarray([4.9, 0.0, 3.5, 2.0, 0.7], np.float32)  # truncated toward zero
    theirs, ours = onnx_arrays(tmp_path / "net.onnx", inputs), port_arrays(net, inputs)
    name = layer.split('"')[1]
    if name != "hinge":  # copies: equal
        np.testing.assert_array_equal(theirs[f"top/{name}/0/data"], ours[f"top/{name}/0/data"])
    else:
        np.testing.assert_allclose(theirs["top/hinge/0/data"], ours["top/hinge/0/data"], rtol=1e-5)


def test_export_refuses_a_run_time_first_dim(tmp_path):
    path = tmp_path / "filter.prototxt"
    path.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 6 } } }\n'
                    'layer { name: "sel" type: "Input" top: "sel" input_param { shape { dim: 4 } } }\n'
                    'layer { name: "pick" type: "Filter" bottom: "x" bottom: "sel" top: "picked" }\n'
                    'layer { name: "r" type: "Reshape" bottom: "picked" top: "r" '
                    'reshape_param { shape { dim: -1 dim: 2 dim: 3 } } }\n')
    done = _cli("export", path, "--onnx", tmp_path / "f.onnx")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "layer pick (Filter) cannot be exported" in done.stderr
    assert not (tmp_path / "f.onnx").exists() and not list(tmp_path.glob("*.part"))


def test_failed_export_is_one_line(train_prototxt, tmp_path):
    """torch's exporter prints its whole TorchScript graph when it fails; porting export
    says one line (here opset 7, which has no Where)."""
    done = _cli("export", train_prototxt, "--onnx", tmp_path / "t.onnx", "--opset", "7")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "torch.onnx.export failed" in done.stderr


NEW_TYPES_NET = """
name: "new_types"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 dim: 2 dim: 4 } } }
layer { name: "cont" type: "Input" top: "cont" input_param { shape { dim: 3 dim: 2 } } }
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h" recurrent_param { num_output: 5 } }
layer { name: "rnn" type: "RNN" bottom: "x" bottom: "cont" top: "r" recurrent_param { num_output: 3 } }
layer { name: "mvn" type: "MVN" bottom: "data" top: "mvn" }
layer { name: "spp" type: "SPP" bottom: "mvn" top: "spp" spp_param { pyramid_height: 2 pool: AVE } }
layer { name: "cols" type: "Im2col" bottom: "data" top: "cols" convolution_param { kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "par" type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 15 } } }
layer { name: "dummy" type: "DummyData" top: "dummy" dummy_data_param { shape { dim: 2 dim: 15 } } }
layer { name: "join" type: "Eltwise" bottom: "spp" bottom: "p" bottom: "dummy" top: "join" }
"""


def test_new_layer_types_export_within_their_bounds(tmp_path):
    """LSTM, RNN, MVN, SPP, Im2col, Parameter and DummyData (an input) through ONNX: each
    ONNX layer, given its own inputs, within the layer's float32 bound of the exact layer."""
    path = tmp_path / "new.prototxt"
    path.write_text(NEW_TYPES_NET)
    net = load_caffe(path)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blobs in net.params.values():
            for blob in blobs:
                blob.copy_(torch.randn(blob.shape, generator=gen) * 0.5)
    inputs = random_inputs(net.graph, seed=4)
    inputs["x"] = inputs["x"] / 64
    inputs["cont"] = np.array([[0, 0], [1, 0], [1, 1]], np.float32)
    out = export_onnx(net, tmp_path / "new.onnx", inputs)
    assert {"Sigmoid", "Tanh", "Gather"} <= set(check_onnx(out)["ops"])
    inputs["cont"] = np.array([[0, 0], [0, 1], [1, 1]], np.float32)  # other sequence starts than traced
    theirs, ours = onnx_arrays(out, inputs), port_arrays(net, inputs)
    v = verify_arrays(float64_twin(net), ours, ours, others={"onnx": theirs})
    checks = {c.layer: c for c in v.checks if c.framework == "onnx"}
    assert {f"top/{s.name}/0/data" for s in net.graph.layers} <= set(theirs)  # the Parameter's top too
    assert {"lstm", "rnn", "mvn", "spp", "cols", "join"} <= set(checks)
    np.testing.assert_array_equal(theirs["top/par/0/data"], net.params["par"][0].detach().numpy())
    beyond = {name: c.error_ratio for name, c in checks.items() if c.within is not True}
    assert not beyond, f"ONNX layers beyond their float32 rounding bound (error / bound): {beyond}"
