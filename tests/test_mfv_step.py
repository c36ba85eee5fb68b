"""Preprocessing and one gradient step against independent float64 NumPy computations."""
import numpy as np
import pytest
import torch
from torch import nn

from mfv.preprocess import CAFFENET, Preprocessing
from mfv.step import (FacetNet, apply_step, central_mask, gradient_step, gradient_steps, mean_abs_gradients,
                      mean_numpy_1_11, means_numpy_1_11)
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


def numpy_pairwise_sum(a: np.ndarray) -> np.float32:
    """numpy's pairwise_sum (umath/loops.c.src, 1.11 as today) transcribed as it reads, float32."""
    n = len(a)
    if n < 8:
        res = np.float32(0)
        for value in a:
            res = np.float32(res + value)
        return res
    if n <= 128:
        r = a[:8].copy()
        i = 8
        while i < n - n % 8:
            r += a[i:i + 8]
            i += 8
        res = np.float32(np.float32(np.float32(r[0] + r[1]) + np.float32(r[2] + r[3]))
                         + np.float32(np.float32(r[4] + r[5]) + np.float32(r[6] + r[7])))
        for value in a[i:]:
            res = np.float32(res + value)
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return np.float32(numpy_pairwise_sum(a[:n2]) + numpy_pairwise_sum(a[n2:]))


def numpy_1_11_mean(a: np.ndarray) -> np.float32:
    """numpy 1.11's float32 mean: the sum through its 8192-element buffer, a pairwise sum per
    buffer added to a float32 total in order, divided in float64."""
    flat = a.reshape(-1)
    total = np.float32(0)
    for begin in range(0, flat.size, 8192):
        total = np.float32(total + numpy_pairwise_sum(flat[begin:begin + 8192]))
    return np.float32(np.float64(total) / flat.size)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 8), (3, 9), (2, 127), (2, 128), (3, 129), (1, 1000),
                                   (2, 8191), (1, 8192), (2, 8193), (3, 2, 8192), (4, 3, 50, 50),
                                   (2, 3, 130, 64), (1, 3, 227, 227), (10, 3, 227, 227)])
def test_means_are_numpy_1_11s_chunked_pairwise_sums(shape):
    """Bit for bit the transcribed algorithm, on sizes around 8, 128 and 8192 and on
    gradient-like values (|Cauchy| times 1e-8..1e-1, so the sums span many magnitudes)."""
    rng = np.random.RandomState(sum(shape))
    values = (np.abs(rng.standard_cauchy(shape)) * 10.0 ** rng.uniform(-8, -1, shape)).astype(np.float32)
    means = means_numpy_1_11(values)
    expected = np.array([numpy_1_11_mean(sample) for sample in values])
    assert means.dtype == expected.dtype == np.float32 and means.shape == (shape[0],)
    np.testing.assert_array_equal(means.view(np.uint32), expected.view(np.uint32))
    for sample, mean in zip(values, means):
        single = mean_numpy_1_11(sample)
        assert single.dtype == np.float32 and single.view(np.uint32) == mean.view(np.uint32)


def test_mean_of_nothing_is_nan():
    assert np.isnan(mean_numpy_1_11(np.zeros(0, np.float32)))
    assert means_numpy_1_11(np.zeros((0, 3, 4), np.float32)).shape == (0,)


@pytest.mark.parametrize("mode", ["faithful", "modern"])
def test_batched_steps_take_each_samples_own_mean(mode):
    """gradient_steps takes all means in one call: each step and mean is bit for bit
    apply_step's on that sample alone, on a net whose input is scaled (k != 1)."""
    module, _ = linear_net(seed=1)
    prep = Preprocessing("RGB", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), value_range=1.0,
                         input_size=(SIZE, SIZE))
    net = FacetNet(module, prep)
    rng = np.random.RandomState(6)
    xs = np.stack([prep.to_net(rng.uniform(0, 255, (SIZE, SIZE, 3))) for _ in range(4)])
    steps = [1.0, 6.0, 2.5, 11.0]
    results = gradient_steps(net, xs, "", [0, 3, 3, 4], steps, [0, 2, 3, 0], mode=mode)
    lo, hi = prep.bounds()
    scale = prep.pixel_scale()
    for x, step, result in zip(xs, steps, results):
        alone, mean_abs = apply_step(x, result.gradient, step, lo, hi, mode, scale)
        np.testing.assert_array_equal(result.x, alone)
        assert result.mean_abs_gradient == float(mean_abs)
        if mode == "faithful":
            assert mean_abs == numpy_1_11_mean(np.abs(result.gradient * scale))
        else:
            assert mean_abs == np.abs(result.gradient * scale).mean()
    means = mean_abs_gradients(np.stack([r.gradient for r in results]), scale, mode)
    assert [float(m) for m in means] == [r.mean_abs_gradient for r in results]
    with pytest.raises(ValueError, match="mode"):
        mean_abs_gradients(xs, scale, "fast")


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
