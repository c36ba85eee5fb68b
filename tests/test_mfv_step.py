"""Preprocessing and one gradient step against independent float64 NumPy computations."""
import numpy as np
import pytest
import torch
from torch import nn

from mfv.preprocess import CAFFENET, Preprocessing
from mfv.step import FacetNet, central_mask, gradient_step
from mfv_nets import SMALL

SIZE = 12


def linear_net(seed=0):
    """fc = W . x (flattened 3x12x12 input, 5 units): d fc[u] / dx = W[u]."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 5, bias=True))
    return module, module[1].weight.detach().double().numpy().reshape(5, 3, SIZE, SIZE)


def test_caffenet_preprocessing_is_float32_bgr_minus_mean():
    rgb = np.random.RandomState(0).uniform(0, 255, (227, 227, 3))
    x = CAFFENET.to_net(rgb)
    assert x.dtype == np.float32 and x.shape == (3, 227, 227)
    expected = np.float32(rgb[..., ::-1].transpose(2, 0, 1)) - np.float32([104, 117, 123])[:, None, None]
    np.testing.assert_array_equal(x, expected)
    back = CAFFENET.from_net(x)
    assert back.dtype == np.float32 and back.shape == (227, 227, 3)
    np.testing.assert_array_equal(back, (x + np.float32([104, 117, 123])[:, None, None])[::-1].transpose(1, 2, 0))
    lo, hi = CAFFENET.bounds()
    np.testing.assert_array_equal(lo.ravel(), [-104, -117, -123])
    np.testing.assert_array_equal(hi.ravel(), [151, 138, 132])


def test_rgb_scaled_preprocessing_matches_float64_formula():
    prep = Preprocessing("RGB", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), value_range=1.0,
                         input_size=(8, 8))
    rgb = np.random.RandomState(1).uniform(0, 255, (8, 8, 3))
    expected = ((rgb / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
    # float32 arithmetic on values of a few units: measured error 6.5e-7 (round trip 2.1e-5)
    np.testing.assert_allclose(prep.to_net(rgb), expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(prep.from_net(prep.to_net(rgb)), rgb, rtol=0, atol=1e-4)
    lo, hi = prep.bounds()
    np.testing.assert_allclose(lo.ravel(), -np.array([0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], atol=1e-6)
    np.testing.assert_allclose(hi.ravel(), (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], atol=1e-6)


@pytest.mark.parametrize("mode", ["faithful", "modern"])
@pytest.mark.parametrize("margin", [0, 3])
def test_step_matches_float64_reference(mode, margin):
    module, weights = linear_net()
    net = FacetNet(module, Preprocessing(input_size=(SIZE, SIZE)))
    x = CAFFENET.to_net(np.random.RandomState(2).uniform(0, 255, (SIZE, SIZE, 3)))
    result = gradient_step(net, x, layer="", unit=3, step_size=60.0, margin=margin, mode=mode)
    g = weights[3] * central_mask(x.shape, margin)
    np.testing.assert_array_equal(result.gradient, g.astype(np.float32))  # the float32 weights themselves
    if margin:
        assert not result.gradient[:, :margin].any() and not result.gradient[:, :, -margin:].any()
    lo = -np.array([104.0, 117, 123])[:, None, None]
    expected = np.clip(x + 60.0 / np.abs(g).mean() * g, lo, lo + 255)
    assert (expected == lo).any() and (expected == lo + 255).any()  # the clip is exercised
    # float32 step on values up to 255: measured 1.5e-5 from the float64 result
    np.testing.assert_allclose(result.x, expected, rtol=0, atol=6e-5)
    assert result.mean_abs_gradient == pytest.approx(np.abs(g).mean(), rel=1e-6)
    logits = module(torch.from_numpy(x[None])).detach().double().numpy()[0]
    assert result.objective == pytest.approx(logits[3], rel=1e-6)
    assert result.best_unit == int(np.argmax(logits))


def test_zero_gradient_makes_no_step():
    module = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2))
    with torch.no_grad():
        module[1].weight.zero_()
    net = FacetNet(module, Preprocessing(input_size=(SIZE, SIZE)))
    x = np.zeros((3, SIZE, SIZE), np.float32)
    result = gradient_step(net, x, "", 0, 1.0)
    np.testing.assert_array_equal(result.x, x)


TINY = """
name: "tiny"
input: "data"
input_shape { dim: 1 dim: 3 dim: 9 dim: 9 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 5 } }
"""


def test_caffe_conv_objective_is_the_pre_relu_unit_at_xy(tmp_path):
    from porting import load_caffe

    path = tmp_path / "tiny.prototxt"
    path.write_text(TINY)
    caffe = load_caffe(path)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blobs in caffe.params.values():
            for blob in blobs:
                blob.copy_(torch.randn(blob.shape, generator=generator))
    net = FacetNet.from_caffe(caffe)
    assert net.preprocessing.input_size == (9, 9)
    x = np.random.RandomState(4).normal(0, 1, (3, 9, 9)).astype(np.float32)
    kernel = caffe.params["conv1"][0].detach().double().numpy()
    bias = caffe.params["conv1"][1].detach().double().numpy()
    xy, unit = 2, 1
    # conv1[unit, 2, 2] reads input rows/cols 4..6 (stride 2, kernel 3)
    pre_relu = (kernel[unit] * x[:, 4:7, 4:7]).sum() + bias[unit]
    expected_g = np.zeros((3, 9, 9))
    expected_g[:, 4:7, 4:7] = kernel[unit]
    result = gradient_step(net, x, "conv1", unit, 1.0, xy=xy)
    assert result.objective == pytest.approx(pre_relu, rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(result.gradient, expected_g, rtol=0, atol=1e-7)
    conv = np.array([(kernel[u] * x[:, 4:7, 4:7]).sum() + bias[u] for u in range(4)])
    assert result.best_unit == int(np.argmax(conv))




@pytest.mark.caffe
def test_gradients_match_caffe(caffe_worker, caffe_weights, tmp_path):
    from porting import load_caffe

    prototxt = tmp_path / "small.prototxt"
    prototxt.write_text(SMALL)
    caffemodel = caffe_weights(prototxt, seed=0, filler="gaussian", std=0.1)
    net = FacetNet.from_caffe(load_caffe(prototxt, caffemodel))
    x = net.preprocessing.to_net(np.random.RandomState(0).uniform(0, 255, (24, 24, 3)))
    for layer, unit in [("fc8", 2), ("prob", 2), ("fc7", 5)]:
        caffe = caffe_worker.py2("caffe_onehot_gradient", prototxt=prototxt, caffemodel=caffemodel,
                                 x=x[None], end=layer, unit=unit)
        ours = gradient_step(net, x, layer, unit, 1.0)
        expected = caffe["gradient"][0]
        # float32 through two implementations: measured largest gap / largest |g|:
        # fc8 1.6e-7, fc7 8.2e-8, prob 1.9e-6 (a softmax output of 4e-5)
        assert np.abs(ours.gradient - expected).max() <= 1e-5 * np.abs(expected).max()
        assert ours.objective == pytest.approx(float(caffe["output"][0, unit]), rel=1e-5)
