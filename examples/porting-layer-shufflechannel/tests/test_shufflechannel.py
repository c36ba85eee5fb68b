"""ShuffleChannel against a NumPy transcription of the fork's C++ (shuffle_channel_layer.cpp),
alone and through whole nets (``load_caffe``, a save/load round trip, ``porting inspect``).

Installed (``pip install ./examples/porting-layer-shufflechannel``), the plugin is loaded
through its entry point; otherwise (the project's own test run) the module is imported from
beside this folder for these tests only, and the registry is restored afterwards.
"""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from porting.layers import LAYERS, V1_TYPES, build_layer

HERE = Path(__file__).resolve().parent.parent
MODULE = "porting_shufflechannel"


@pytest.fixture(scope="module")
def layer_class():
    installed = LAYERS.get("ShuffleChannel")
    if installed is not None and installed.__module__ == MODULE:
        yield installed
        return
    saved = dict(LAYERS), dict(V1_TYPES)
    sys.path.insert(0, str(HERE))
    sys.modules.pop(MODULE, None)
    try:
        yield importlib.import_module(MODULE).ShuffleChannel
    finally:
        sys.path.remove(str(HERE))
        sys.modules.pop(MODULE, None)
        LAYERS.clear(), LAYERS.update(saved[0]), V1_TYPES.clear(), V1_TYPES.update(saved[1])


def _resize_cpu(output, input_, group_row, group_column, length):
    """The fork's Resize_cpu: block (i, j) of input goes to block (j, i) of output."""
    for i in range(group_row):
        for j in range(group_column):
            p_i = (i * group_column + j) * length
            p_o = (j * group_row + i) * length
            output[p_o:p_o + length] = input_[p_i:p_i + length]


def caffe_forward(bottom: np.ndarray, group: int) -> np.ndarray:
    """Forward_cpu: per sample, Resize_cpu(top, bottom, group, chs / group, count(2))."""
    num, chs, sp_sz = bottom.shape[0], bottom.shape[1], math.prod(bottom.shape[2:])
    flat, top = bottom.reshape(num, -1), np.full((num, chs * sp_sz), np.nan, bottom.dtype)
    for n in range(num):
        _resize_cpu(top[n], flat[n], group, chs // group, sp_sz)
    return top.reshape(bottom.shape + (1,) * (4 - bottom.ndim))


def caffe_backward(top_diff: np.ndarray, bottom_shape: tuple, group: int) -> np.ndarray:
    """Backward_cpu: per sample, Resize_cpu(bottom_diff, top_diff, chs / group, group, count(2))."""
    num, chs, sp_sz = bottom_shape[0], bottom_shape[1], math.prod(bottom_shape[2:])
    flat, diff = top_diff.reshape(num, -1), np.full((num, chs * sp_sz), np.nan, top_diff.dtype)
    for n in range(num):
        _resize_cpu(diff[n], flat[n], chs // group, group, sp_sz)
    return diff.reshape(bottom_shape)


def _text(group=None, top="y"):
    param = "" if group is None else f" shuffle_channel_param {{ group: {group} }}"
    return f'name: "shuf" type: "ShuffleChannel" bottom: "x" top: "{top}"{param}'


@pytest.mark.parametrize("shape, group", [((2, 6, 3, 4), 3), ((2, 6, 3, 4), 2), ((1, 12), 4), ((3, 8, 5), 8),
                                          ((2, 6, 3, 4), 1), ((1, 4, 2, 2), None)])
def test_matches_the_forks_cpp(layer_class, shape, group):
    rng = np.random.default_rng(sum(shape) * 31 + (group or 0))
    x = rng.standard_normal(shape).astype(np.float32)
    diff = rng.standard_normal(shape + (1,) * (4 - len(shape))).astype(np.float32)
    layer = build_layer(_text(group), [shape])
    g = 1 if group is None else group
    assert isinstance(layer, layer_class) and layer.group == g
    assert layer.top_shapes == [shape + (1,) * (4 - len(shape))]
    xt = torch.tensor(x, requires_grad=True)
    (top,) = layer(xt)
    expected = caffe_forward(x, g)
    assert top.shape == expected.shape and np.array_equal(top.detach().numpy(), expected)  # a copy: bit for bit
    top.backward(torch.tensor(diff))
    assert np.array_equal(xt.grad.numpy(), caffe_backward(diff, shape, g))
    if g not in (1, shape[1]):  # a real permutation: the reference is not the identity
        assert not np.array_equal(expected.reshape(x.shape), x)
    assert [b.abs().max().item() for b in layer.forward_bound([xt.double()], [top.double()])] == [0.0]


@pytest.mark.parametrize("text, shape, problem", [
    (_text(0), (1, 4, 2, 2), "greater than 0"),
    (_text(3), (1, 4, 2, 2), "not a multiple of group 3"),
    (_text(2147483648), (1, 4, 2, 2), "does not fit Caffe's int"),
    (_text(2), (1, 4, 2, 2, 2), "2 to 4 axes"),
    (_text(1), (4,), "2 to 4 axes"),
    (_text(2, top="x"), (1, 4, 2, 2), "in place"),
])
def test_refuses_what_caffe_aborts_on(layer_class, text, shape, problem):
    with pytest.raises(ValueError, match=problem):
        build_layer(text, [shape])


NET = """name: "shuffle_net"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 dim: 3 dim: 2 } } }
layer { name: "shuf3" type: "ShuffleChannel" bottom: "data" top: "shuf3" shuffle_channel_param { group: 3 } }
layer { name: "relu" type: "ReLU" bottom: "shuf3" top: "shuf3" }
layer { name: "shuf2" type: "ShuffleChannel" bottom: "shuf3" top: "shuf2" shuffle_channel_param { group: 2 } }
"""


def test_whole_net_load_save_and_inspect(layer_class, tmp_path):
    from porting import load_caffe
    from porting.saved import load_converted, save_converted

    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(NET)
    net = load_caffe(prototxt)
    x = np.random.default_rng(5).standard_normal((2, 6, 3, 2)).astype(np.float32)
    x[0, 1, 0, 0] = 0.0
    expected = caffe_forward(np.maximum(caffe_forward(x, 3), 0), 2)
    xt = torch.tensor(x, requires_grad=True)
    blobs = net(xt)
    assert np.array_equal(blobs["shuf2"].detach().numpy(), expected)
    diff = np.random.default_rng(6).standard_normal(expected.shape).astype(np.float32)
    blobs["shuf2"].backward(torch.tensor(diff))
    back = caffe_backward(diff, x.shape, 2) * (caffe_forward(x, 3) > 0)  # ReLU's backward: x > 0
    assert np.array_equal(xt.grad.numpy(), caffe_backward(back, x.shape, 3))
    save_converted(net, tmp_path / "net.safetensors")
    again = load_converted(tmp_path / "net.safetensors")  # the fork field survives the saved text
    assert [again.graph.layer(n).module.group for n in ("shuf3", "shuf2")] == [3, 2]
    assert np.array_equal(again(torch.tensor(x))["shuf2"].numpy(), expected)
    from porting.graph import build_graph
    from porting.parse import read_prototxt
    from porting.upgrade import upgrade_net

    table = build_graph(upgrade_net(read_prototxt(prototxt)), shape_only=True).table()
    assert "ShuffleChannel" in table and layer_class.origin in table
