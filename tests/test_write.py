"""Writing caffemodels and prototxts: round trips, protobuf's own reading, atomicity."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from porting import caffe_pb2
from porting.errors import PortingError
from porting.parse import read_caffemodel, read_prototxt
from porting.upgrade import upgrade_net
from porting.write import write_caffemodel, write_prototxt

FORMATS = Path(__file__).resolve().parent / "fixtures" / "formats"


def small_net_weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        ("conv1", "Convolution", [rng.standard_normal((8, 3, 5, 5)).astype(np.float32),
                                  rng.standard_normal(8).astype(np.float32)]),
        ("relu1", "ReLU", []),
        ("fc6", "InnerProduct", [rng.standard_normal((16, 200)).astype(np.float32),
                                 rng.standard_normal(16).astype(np.float32)]),
        ("fc7", "InnerProduct", [rng.standard_normal((10, 16)).astype(np.float32)]),
    ]


@pytest.mark.parametrize("fmt", ["v2", "v1", "v0"])
def test_round_trip_gives_identical_arrays(tmp_path, fmt):
    layers = small_net_weights()
    path = tmp_path / f"w_{fmt}.caffemodel"
    write_caffemodel(path, layers, format=fmt)
    got = read_caffemodel(path)
    assert list(got) == [name for name, _, _ in layers]
    for name, _, arrays in layers:
        assert len(got[name]) == len(arrays)
        for blob, array in zip(got[name], arrays):
            assert np.array_equal(blob.data, array.ravel()) and blob.matches(array.shape)
            if fmt == "v2":
                assert blob.shape == array.shape
            else:  # legacy dims, left-padded with 1s: fc weights 1x1xOxI, biases 1x1x1xO
                assert blob.legacy_dims == (1,) * (4 - array.ndim) + array.shape


def test_v2_file_as_protobuf_reads_it(tmp_path):
    layers = small_net_weights(1)
    path = tmp_path / "w.caffemodel"
    write_caffemodel(path, layers, net_name="small")
    net = caffe_pb2.NetParameter.FromString(path.read_bytes())
    assert net.name == "small" and not net.layers
    assert [(l.name, l.type) for l in net.layer] == [(n, t) for n, t, _ in layers]
    for layer, (_, _, arrays) in zip(net.layer, layers):
        for blob, array in zip(layer.blobs, arrays):
            assert tuple(blob.shape.dim) == array.shape
            assert np.array_equal(np.array(blob.data, np.float32), array.ravel())
            assert not any(blob.HasField(f) for f in ("num", "channels", "height", "width"))


def test_v1_file_as_protobuf_reads_it(tmp_path):
    layers = small_net_weights(2)
    path = tmp_path / "w.caffemodel"
    write_caffemodel(path, layers, format="v1")
    net = caffe_pb2.NetParameter.FromString(path.read_bytes())
    V1 = caffe_pb2.V1LayerParameter
    assert not net.layer
    assert [(l.name, l.type) for l in net.layers] == [("conv1", V1.CONVOLUTION), ("relu1", V1.RELU),
                                                      ("fc6", V1.INNER_PRODUCT), ("fc7", V1.INNER_PRODUCT)]
    fc6_w, fc6_b = net.layers[2].blobs
    assert (fc6_w.num, fc6_w.channels, fc6_w.height, fc6_w.width) == (1, 1, 16, 200)
    assert (fc6_b.num, fc6_b.channels, fc6_b.height, fc6_b.width) == (1, 1, 1, 16)
    assert not fc6_w.HasField("shape")
    assert np.array_equal(np.array(fc6_w.data, np.float32), layers[2][2][0].ravel())


def test_v0_file_upgrades_like_caffe(tmp_path):
    path = tmp_path / "w.caffemodel"
    write_caffemodel(path, small_net_weights(3), format="v0")
    net = caffe_pb2.NetParameter.FromString(path.read_bytes())
    assert [l.layer.type for l in net.layers] == ["conv", "relu", "innerproduct", "innerproduct"]
    assert [l.type for l in upgrade_net(net).layer] == ["Convolution", "ReLU", "InnerProduct", "InnerProduct"]


def test_other_dtypes_are_stored_as_float32(tmp_path):
    weights = np.array([[0.1, 1 / 3], [2.0, -7.25]], np.float64)
    path = tmp_path / "w.caffemodel"
    write_caffemodel(path, [("fc", "InnerProduct", [weights])])
    assert np.array_equal(read_caffemodel(path)["fc"][0].data, weights.astype(np.float32).ravel())


def test_refusals_leave_no_file_behind(tmp_path):
    target = tmp_path / "w.caffemodel"
    target.write_bytes(b"old contents")
    bad = small_net_weights() + [("custom", "MyLayer", [np.zeros(3, np.float32)])]
    with pytest.raises(PortingError, match=r"w\.caffemodel: layer custom: layer type 'MyLayer' has no V1 enum value"):
        write_caffemodel(target, bad, format="v1")
    with pytest.raises(PortingError, match=r"layer big: a 5-D blob cannot be stored with legacy 4-D dims"):
        write_caffemodel(target, [("big", "Convolution", [np.zeros((1, 1, 1, 1, 2), np.float32)])], format="v1")
    with pytest.raises(PortingError, match=r"layer up: layer type 'Deconvolution' did not exist in V0"):
        write_caffemodel(target, [("up", "Deconvolution", [])], format="v0")
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.caffemodel"]


def test_written_file_gets_the_usual_mode(tmp_path):
    path = tmp_path / "w.caffemodel"
    write_caffemodel(path, small_net_weights())
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("name", ["v1_mixed.prototxt", "v2_input_shape.v2.prototxt", "v0_all_params.prototxt"])
def test_prototxt_round_trip(tmp_path, name):
    net = read_prototxt(FORMATS / name)
    out = tmp_path / "net.prototxt"
    write_prototxt(out, net)
    assert read_prototxt(out) == net


# --------------------------------------------------------------------------- real Caffe
@pytest.mark.caffe
@pytest.mark.parametrize("fmt", ["v1", "v0"])
def test_real_caffe_reads_our_legacy_files_to_the_same_numbers(caffe_weights, caffe_worker, tmp_path, fmt):
    """Caffe-made weights, re-saved by us as V1 or V0 (legacy dims), loaded by real Caffe
    (which upgrades the caffemodel itself): identical parameters and outputs."""
    from porting.parse import read_caffemodel_net

    prototxt = FORMATS / "caffe_v1_deploy.prototxt"
    weights = caffe_weights(prototxt, seed=5)
    stored, types = read_caffemodel(weights), {l.name: l.type for l in read_caffemodel_net(weights).layer}
    layers = [(name, types[name], [b.data.reshape(b.declared()) for b in blobs])
              for name, blobs in stored.items() if blobs]
    assert [name for name, _, _ in layers] == ["conv1", "ip"]
    resaved = tmp_path / f"weights_{fmt}.caffemodel"
    write_caffemodel(resaved, layers, format=fmt)
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    original = caffe_worker.run_net(prototxt, weights, inputs={"data": x}, params=True)
    again = caffe_worker.run_net(prototxt, resaved, inputs={"data": x}, params=True)
    for key in ("param/conv1/0", "param/conv1/1", "param/ip/0", "param/ip/1", "blob/prob/data"):
        assert np.array_equal(again[key], original[key]), key


def test_zero_axis_blob_round_trips(tmp_path):
    """Caffe stores a channel-shared PReLU slope as a blob with an empty shape."""
    from porting.parse import read_caffemodel
    from porting.write import write_caffemodel

    path = tmp_path / "prelu.caffemodel"
    write_caffemodel(path, [("prelu", "PReLU", [np.float32(0.25)])])
    blob = read_caffemodel(path)["prelu"][0]
    assert blob.shape == () and blob.data.tolist() == [0.25]
