"""CaffeNet semantics: blob dict, in-place overwrite, end=, params, state_dict, save/load."""
import numpy as np
import pytest
import torch

from porting import PortingError, load_caffe
from porting.saved import load_converted, save_converted

TINY = """
name: "tiny"
input: "data"
input_shape { dim: 2 dim: 3 dim: 9 dim: 9 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.prototxt"
    path.write_text(TINY)
    net = load_caffe(path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blobs in net.params.values():
            for blob in blobs:
                blob.copy_(torch.randn(blob.shape, generator=gen))
    return net


def test_blob_dict_in_place_and_pre_in_place(tiny):
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    blobs = tiny(x)
    assert list(blobs) == ["data", "conv1", "pool1", "fc", "prob"]
    pre_relu = tiny.layer_outputs["conv1"][0]
    assert (pre_relu < 0).any()  # the pre-in-place value keeps its negatives
    assert torch.equal(blobs["conv1"], pre_relu.clamp_min(0))  # the blob is overwritten, as in Caffe
    assert blobs["conv1"].shape == (2, 4, 4, 4) and blobs["pool1"].shape == (2, 4, 2, 2)
    np.testing.assert_allclose(blobs["prob"].sum(1).detach(), 1.0, rtol=1e-6)


def test_end_stops_after_layer(tiny):
    blobs = tiny(torch.zeros(2, 3, 9, 9), end="fc")
    assert "fc" in blobs and "prob" not in blobs
    with pytest.raises(KeyError):
        tiny(torch.zeros(2, 3, 9, 9), end="nope")


def test_params_and_state_dict_follow_caffe(tiny):
    assert list(tiny.params) == ["conv1", "fc"]
    assert [tuple(b.shape) for b in tiny.params["conv1"]] == [(4, 3, 3, 3), (4,)]
    assert [tuple(b.shape) for b in tiny.params["fc"]] == [(5, 16), (5,)]
    assert list(tiny.state_dict()) == ["conv1.0", "conv1.1", "fc.0", "fc.1"]


def test_input_gradient_by_autograd(tiny):
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(2), requires_grad=True)
    tiny(x)["fc"][0, 3].backward()
    assert x.grad is not None and x.grad[1].abs().max() == 0 and x.grad[0].abs().max() > 0


def test_save_and_load_without_caffemodel(tiny, tmp_path):
    out = tmp_path / "tiny.safetensors"
    save_converted(tiny, out)
    back = load_converted(out)
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(back(x)["prob"], tiny(x)["prob"])
    assert list(back.state_dict()) == list(tiny.state_dict())
    assert not list(tmp_path.glob("*.part"))


def test_load_converted_refuses_foreign_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x89PNG not a model")
    with pytest.raises(PortingError, match="bad.safetensors"):
        load_converted(bad)
