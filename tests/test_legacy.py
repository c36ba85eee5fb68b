"""The legacy stack and its worker: real Caffe 1.0 and the 2016 Python 2.7 libraries.

Plumbing is checked against independent float64 NumPy computations; failure handling
against Caffe's own CHECKs; the Python 2 side against today's libraries.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from porting.errors import PortingError
from porting.legacy import CaffeError, CaffeTimeout, Worker
from porting import legacy_build
from porting.legacy_build import format_status, is_current
from porting.legacy_worker import parse_caffe_log

TINY = """name: "tiny"
input: "data"
input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 5 } }
"""

# Eltwise needs equal bottom shapes: Caffe's EltwiseLayer::Reshape CHECKs it at set-up.
BAD_ELTWISE = """name: "bad"
input: "a" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }
input: "b" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "s" }
"""

# About 10 GFLOP of convolution: seconds of work, so a 0.3 s limit always trips.
HEAVY = """name: "heavy"
input: "data" input_shape { dim: 1 dim: 16 dim: 512 dim: 512 }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param { num_output: 64 kernel_size: 7 pad: 3 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2"
  convolution_param { num_output: 64 kernel_size: 7 pad: 3 weight_filler { type: "gaussian" std: 0.01 } } }
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, caffe_weights):
    prototxt = tmp_path_factory.mktemp("tiny") / "tiny.prototxt"
    prototxt.write_text(TINY)
    weights = caffe_weights(prototxt, seed=5, filler="gaussian", std=0.3, bias_filler="gaussian", bias_std=0.5)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    return prototxt, weights, x


def numpy_tiny(params, x):
    """The tiny net in float64 NumPy: conv 3x3 pad 1, ReLU, max-pool 2x2/2, inner product."""
    w, b = params["param/conv1/0"].astype(np.float64), params["param/conv1/1"].astype(np.float64)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((2, 4, 8, 8))
    for i in range(3):
        for j in range(3):
            conv += np.einsum("ncij,oc->noij", xp[:, :, i:i + 8, j:j + 8], w[:, :, i, j])
    conv += b[None, :, None, None]
    relu = np.maximum(conv, 0)
    pool = relu.reshape(2, 4, 4, 2, 4, 2).max(axis=(3, 5))
    fc = pool.reshape(2, -1) @ params["param/fc/0"].astype(np.float64).T + params["param/fc/1"]
    return conv, relu, pool, fc


@pytest.mark.caffe
def test_status_reports_the_pinned_stack(caffe_backend):
    info = caffe_backend.status()
    assert info["built"] and info["current"]
    assert info["caffe"] == "1.0.0"
    assert info["caffe_debian"] == "1.0.0+git20180821.99bd997-8+b2"
    assert info["blas"] == "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
    assert all(v["pinned"] == v["installed"] for v in info["pinned_debian"].values())
    assert info["python2"]["numpy"] == "1.11.0"
    assert "openblas-pthread" in format_status(info)


@pytest.mark.caffe
def test_build_is_a_no_op_when_current_and_needs_root_otherwise(caffe_root, tmp_path, monkeypatch):
    monkeypatch.setattr(legacy_build.os, "geteuid", lambda: 1000)  # as an ordinary user
    assert legacy_build.build(caffe_root, progress=False) == caffe_root  # current: nothing to do
    assert not is_current(caffe_root, snapshot="20240801T000000Z")  # another recipe would rebuild
    with pytest.raises(PortingError, match="root privileges.*docker/Dockerfile"):
        legacy_build.build(tmp_path / "root", progress=False)
    assert not (tmp_path / "root").exists()


@pytest.mark.caffe
def test_tiny_net_matches_numpy_float64(caffe_worker, tiny):
    prototxt, weights, x = tiny
    ref = caffe_worker.run_net(prototxt, weights, inputs={"data": x}, params=True)
    conv, relu, pool, fc = numpy_tiny(ref, x)
    # float32 Caffe (OpenBLAS sgemm) vs float64, measured max |diff|: fc 6.8e-7 (values
    # up to 3.9), conv1 3.8e-7 (up to 3.0), pool1 3.0e-7; 2e-6 is three times the worst.
    np.testing.assert_allclose(ref["blob/fc/data"], fc, rtol=0, atol=2e-6)
    np.testing.assert_allclose(ref["top/conv1/0/data"], conv, rtol=0, atol=2e-6)
    np.testing.assert_allclose(ref["blob/pool1/data"], pool, rtol=0, atol=2e-6)
    assert ref.provenance["inputs"]["prototxt"] == __import__("hashlib").sha256(prototxt.read_bytes()).hexdigest()
    assert ref.provenance["versions"]["blas"].endswith("openblas-pthread/libblas.so.3")


@pytest.mark.caffe
def test_inplace_capture_keeps_pre_relu_values(caffe_worker, tiny):
    prototxt, weights, x = tiny
    ref = caffe_worker.run_net(prototxt, weights, inputs={"data": x})
    pre, post = ref["top/conv1/0/data"], ref["blob/conv1/data"]
    assert pre.min() < 0 and post.min() >= 0  # Caffe's own view was overwritten by ReLU
    assert np.array_equal(post, np.maximum(pre, 0))
    assert np.array_equal(ref["top/relu1/0/data"], post)


@pytest.mark.caffe
def test_backward_diffs_match_numpy(caffe_worker, tiny):
    prototxt, weights, x = tiny
    onehot = np.zeros((2, 5), np.float32)
    onehot[:, 3] = 1
    ref = caffe_worker.run_net(prototxt, weights, inputs={"data": x}, top_diffs={"fc": onehot}, params=True)
    w_fc = ref["param/fc/0"].astype(np.float64)
    # A one-hot top diff makes pool1's diff a copy of one row of fc's weights: measured exact.
    assert np.array_equal(ref["blob/pool1/diff"].reshape(2, -1), onehot @ w_fc)
    # In place, ReLU's backward overwrites the conv1 diff: Caffe's view equals the diff
    # w.r.t. conv1's own output in the renamed copy, bit for bit.
    assert np.array_equal(ref["blob/conv1/diff"], ref["top/conv1/0/diff"])
    assert np.abs(ref["blob/data/diff"]).max() > 0


@pytest.mark.caffe
def test_failed_check_becomes_caffe_error_with_layer(caffe_worker, tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text(BAD_ELTWISE)
    with pytest.raises(CaffeError) as caught:
        caffe_worker.run_net(bad, inputs={})
    err = caught.value
    assert err.layer == "sum"
    assert "Check failed" in str(err) and "eltwise_layer.cpp" in str(err)
    assert str(err).startswith(str(bad))
    # the worker came back for the next job
    assert caffe_worker.versions()["python3"]["caffe"] == "1.0.0"


def test_parse_caffe_log_takes_the_last_fatal_line_and_layer():
    lines = ["I0101 00:00:00.000 7 net.cpp:84] Creating layer conv1",
             "I0101 00:00:00.000 7 net.cpp:120] Setting up conv1",
             "I porting-worker] Forward layer conv1",
             "F0101 00:00:00.100 7 conv_layer.cpp:20] Check failed: a == b (1 vs. 2)",
             "*** Check failure stack trace: ***"]
    message, layer = parse_caffe_log(lines)
    assert layer == "conv1" and message.startswith("Check failed: a == b (1 vs. 2) [conv_layer.cpp:20")
    assert parse_caffe_log(lines[:3]) == (None, None)


@pytest.mark.caffe
def test_hung_worker_is_killed_after_timeout(caffe_backend, tmp_path):
    heavy = tmp_path / "heavy.prototxt"
    heavy.write_text(HEAVY)
    x = np.ones((1, 16, 512, 512), np.float32)
    with Worker(backend=caffe_backend, timeout=0.3, blas_threads=1) as worker:
        with pytest.raises(CaffeTimeout):
            worker.run_net(heavy, inputs={"data": x}, capture_tops=False)
        assert worker._proc is None  # killed, process group and all
        assert worker.versions(timeout=60)["python3"]["caffe"] == "1.0.0"
        assert worker.starts == 2


def test_missing_root_says_how_to_build(tmp_path):
    with pytest.raises(PortingError, match="porting env build"):
        Worker(tmp_path / "nowhere")


@pytest.mark.caffe
def test_python2_side_is_the_2016_stack(caffe_worker):
    v = caffe_worker.versions()["python2"]
    assert v["python"].startswith("2.7.")
    assert (v["numpy"], v["scipy"], v["skimage"], v["Pillow"]) == ("1.11.0", "0.17.0", "0.13.1", "5.1.0")


@pytest.mark.caffe
def test_legacy_random_state_matches_today(caffe_worker):
    # numpy's legacy RandomState stream is frozen: 1.11.0 and today draw the same bits.
    got = caffe_worker.py2("random_normal", seed=123, size=[3, 4], loc=1.0, scale=2.0)
    assert np.array_equal(got["output"], np.random.RandomState(123).normal(1.0, 2.0, (3, 4)))
    assert got.provenance["seed"] == 123


@pytest.mark.caffe
def test_denoise_tv_bregman_2016_differs_from_today(caffe_worker):
    from skimage.restoration import denoise_tv_bregman

    image = np.random.RandomState(1).uniform(0, 1, (32, 32))
    old = caffe_worker.py2("denoise_tv_bregman", image=image, weight=2.0, max_iter=100, eps=1e-3)["output"]
    new = denoise_tv_bregman(image, weight=2.0, max_num_iter=100, eps=1e-3)
    diff = np.abs(old - new)
    # Measured (scikit-image 0.13.1 in the root vs 0.26.0 here, float64, this image):
    # max |diff| 0.22412 at the last column, 0.18721 on the last row, 0.04173 inside the
    # 2-pixel border. scikit-image 0.15 changed the padding at the bottom/right border,
    # and the difference peaks there; the bands are the measured values +-1e-4.
    assert 0.2240 <= diff.max() <= 0.2242
    assert 0.1871 <= diff[-1].max() <= 0.1873
    assert 0.0416 <= diff[2:-2, 2:-2].max() <= 0.0418


@pytest.mark.caffe
def test_zoom_2016_matches_today_for_cubic_upsampling(caffe_worker):
    import scipy.ndimage

    image = np.random.RandomState(1).uniform(0, 1, (32, 32))
    old = caffe_worker.py2("zoom", input=image, zoom=[2.0, 2.0], order=3)["output"]
    # Measured: scipy 0.17.0 vs 1.17.1 differ by at most 8.9e-16 here (float64 rounding).
    np.testing.assert_allclose(old, scipy.ndimage.zoom(image, (2.0, 2.0), order=3), rtol=0, atol=1e-14)


@pytest.mark.caffe
def test_py2_op_calls_back_into_caffe(caffe_worker, tiny):
    prototxt, weights, x = tiny
    onehot = np.zeros((2, 5), np.float32)
    onehot[:, 3] = 1
    ref = caffe_worker.run_net(prototxt, weights, inputs={"data": x}, top_diffs={"fc": onehot},
                               blobs=["data", "fc"], capture_tops=False)
    got = caffe_worker.py2("caffe_onehot_gradient", prototxt=Path(prototxt), caffemodel=Path(weights),
                           x=x, end="fc", unit=3)
    assert np.array_equal(got["output"], ref["blob/fc/data"])
    assert np.array_equal(got["gradient"], ref["blob/data/diff"])


@pytest.mark.caffe
def test_jpeg_decode_2016_vs_today(caffe_worker):
    from PIL import Image

    yy, xx = np.mgrid[0:48, 0:64]
    smooth = np.stack([yy * 4, xx * 3, (yy + xx) * 2], -1).clip(0, 255).astype(np.uint8)
    diffs = {}
    for subsampling in (0, 2):  # 4:4:4 and 4:2:0 chroma
        buf = io.BytesIO()
        Image.fromarray(smooth).save(buf, format="JPEG", quality=90, subsampling=subsampling)
        old = caffe_worker.py2("jpeg_decode", path=buf.getvalue())
        assert old["mode"] == "RGB" and old["output"].shape == (48, 64, 3)
        today = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        diffs[subsampling] = int(np.abs(old["output"].astype(int) - today).max())
    # Measured (Pillow 5.1.0 vs 13.0.0, their bundled libjpeg): 4:4:4 decodes identically;
    # 4:2:0 differs by up to 3 levels on this gradient (chroma upsampling changed).
    assert diffs == {0: 0, 2: 3}
