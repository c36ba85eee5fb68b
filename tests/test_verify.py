"""Drift metrics, the port adapter, tolerances, float64 attribution and the verdict (porting/verify/).

References: hand-made arrays with known answers; an independent float64 NumPy forward and
backward of a small MLP; central finite differences of the float64 port; real Caffe where
the legacy stack is built (marker ``caffe``). Attribution is checked on ports with one
layer made wrong on purpose: the departure must be named at exactly that layer.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from porting import PortingError, load_caffe
from porting.layers import LAYERS
from porting.rounding import gamma
from porting.tolerances import Tolerances, parse_tolerances
from porting.verify import (NetValues, Objective, blob_metrics, default_objective, find_departure,
                            float64_twin, local_checks, parse_objective, port_arrays, random_inputs,
                            topk_agreement, verify_arrays, verify_port)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference-data"
CAFFENET = SHARED / "mfv-original" / "deploy_alexnet_updated.prototxt"
NEEDED = {"Input", "Convolution", "ReLU", "Pooling", "LRN", "InnerProduct", "Dropout", "Softmax"}
needs_layers = pytest.mark.skipif(not NEEDED <= set(LAYERS), reason="layer types not registered yet")

TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 15 dim: 15 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "fc1" type: "InnerProduct" bottom: "norm1" top: "fc1" inner_product_param { num_output: 16 } }
layer { name: "relu2" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "drop1" type: "Dropout" bottom: "fc1" top: "fc1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" }
"""

MLP = """
name: "mlp"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 6 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 5 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 4 } }
"""


def build(tmp_path, text: str, seed: int = 0, std: float | None = None, bias_std: float = 0.1):
    """A net from prototxt text with seeded weights: He-scaled normal (or N(0, std))."""
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    net = load_caffe(path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blobs in net.params.values():
            w = blobs[0]
            scale = std if std is not None else (2.0 / w[0].numel()) ** 0.5
            w.copy_(torch.randn(w.shape, generator=gen) * scale)
            if len(blobs) > 1:
                blobs[1].copy_(torch.randn(blobs[1].shape, generator=gen) * bias_std)
    return net


# ---------------------------------------------------------------------------- metrics

def test_blob_metrics_known_values():
    ref = np.array([1.0, -2.0, 4.0])
    test = np.array([1.0, -2.5, 4.2])
    m = blob_metrics(test, ref, tolerance=0.1)
    assert m.max_abs == pytest.approx(0.5)
    assert m.max_rel == pytest.approx(0.5 / 4)
    assert m.rel_l2 == pytest.approx(np.sqrt(0.25 + 0.04) / np.sqrt(1 + 4 + 16))
    assert m.frac_beyond == pytest.approx(1 / 3)  # only |-0.5| > 0.1 * 4
    assert m.ref_max == 4 and m.size == 3


def test_blob_metrics_zero_reference_nan_and_shape():
    assert blob_metrics(np.zeros(4), np.zeros(4)).max_rel == 0
    assert blob_metrics(np.array([0, 1e-30]), np.zeros(2)).max_rel == np.inf
    m = blob_metrics(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    assert np.isnan(m.max_rel) and np.isnan(m.max_abs)
    with pytest.raises(ValueError, match="shape"):
        blob_metrics(np.zeros(3), np.zeros(4))


def test_topk_agreement_known():
    ref = np.array([[9, 8, 7, 6, 5, 4, 0], [0, 1, 2, 3, 4, 5, 6]], float)
    test = ref.copy()
    test[0, [0, 1]] = test[0, [1, 0]]  # item 0: top-1 swapped, same top-5 set
    test[1, 1] = 100                   # item 1: class 1 jumps to first; class 2 falls out of the top 5
    assert topk_agreement(test, ref, 1) == pytest.approx(0.0)
    assert topk_agreement(test, ref, 5) == pytest.approx((1 + 4 / 5) / 2)
    m = blob_metrics(test, ref, classes=True)
    assert (m.top1, m.top5) == (pytest.approx(0.0), pytest.approx(0.9))


# ---------------------------------------------------------------------------- tolerances

def test_tolerance_spec_resolution():
    base = Tolerances(rules={"default": 1e-4, "LRN.data": 3e-5, "Pooling.diff": 2e-5},
                      sources={"default": "issue", "LRN.data": "measured", "Pooling.diff": "measured"})
    tol = parse_tolerances("Convolution=1e-5,LRN=7e-5,LRN.diff=2e-5,default=3e-4,default.diff=5e-4", base=base)
    assert tol.for_layer("Convolution", "data") == 1e-5 and tol.for_layer("Convolution", "diff") == 1e-5
    assert tol.for_layer("LRN", "data") == 7e-5 and tol.for_layer("LRN", "diff") == 2e-5  # bare type replaces
    assert tol.for_layer("Pooling", "diff") == 2e-5 and tol.for_layer("Pooling", "data") == 3e-4
    assert tol.for_layer("ReLU", "diff") == 5e-4
    assert "user override" in tol.source_for("LRN", "diff") and tol.source_for("Pooling", "diff") == "measured"
    assert Tolerances.from_json(json.loads(json.dumps(tol.to_json()))) == tol


def test_default_tolerances_have_sources():
    tol = Tolerances()
    assert set(tol.rules) == set(tol.sources) and tol.rules["default"] == 1e-4
    assert all(0 <= v <= 1e-4 for v in tol.rules.values())
    assert tol.for_layer("Input", "data") == 0.0 and tol.for_layer("Eltwise", "diff") == 1e-4


def test_tolerance_json_file(tmp_path):
    path = tmp_path / "tol.json"
    path.write_text(json.dumps({"InnerProduct": 2e-6, "default": 1e-3}))
    tol = parse_tolerances(str(path))
    assert tol.for_layer("InnerProduct") == 2e-6 and tol.for_layer("Eltwise") == 1e-3
    assert tol.for_layer("ReLU") == Tolerances().for_layer("ReLU")  # measured rules stay
    assert "tol.json" in tol.source_for("InnerProduct")


@pytest.mark.parametrize("spec, words", [
    ("Convolution", "expected Type=number"),
    ("Convolution=abc", "not a number"),
    ("Convolution=-1", ">= 0"),
    ("Convolution.grad=1e-5", ".data or .diff"),
    ("Convolutoin=1e-5", "unknown layer type"),
])
def test_tolerance_spec_errors(spec, words):
    with pytest.raises(PortingError, match=words) as err:
        parse_tolerances(spec, known_types={"Convolution", "ReLU"})
    assert "--tolerance" in str(err.value)


def test_tolerance_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PortingError, match="bad.json.*not JSON"):
        parse_tolerances(str(bad))
    with pytest.raises(PortingError, match="cannot read"):
        parse_tolerances(str(tmp_path / "absent.json"))


def test_gamma_is_highams():
    u = 2.0 ** -24
    assert gamma(10) == pytest.approx(10 * u / (1 - 10 * u), rel=1e-15)


# ---------------------------------------------------------------------------- objective

@needs_layers
def test_objective_default_parse_and_seed(tmp_path):
    net = build(tmp_path, TINY)
    assert default_objective(net.graph) == Objective("fc2", 0, "fc2")
    obj = parse_objective("conv1:3", net.graph)
    seed = obj.seed((2, 8, 7, 7))
    assert seed.sum() == 2 and seed[:, 3, 3, 3].tolist() == [1, 1]  # centre of a 7x7 map, every item
    with pytest.raises(PortingError, match="out of range"):
        parse_objective("conv1:8", net.graph)
    with pytest.raises(PortingError, match="no layer named"):
        parse_objective("conv9:1", net.graph)
    with pytest.raises(PortingError, match="integer"):
        parse_objective("fc2:x", net.graph)


# ---------------------------------------------------------------------------- port adapter

@needs_layers
def test_port_arrays_against_numpy_float64(tmp_path):
    """Data and diffs of an MLP with an in-place ReLU, against a float64 NumPy computation."""
    net = build(tmp_path, MLP, seed=1)
    w1, b1 = (p.detach().double().numpy() for p in net.params["ip1"])
    w2, b2 = (p.detach().double().numpy() for p in net.params["ip2"])
    x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    h = x.astype(np.float64) @ w1.T + b1
    a = np.maximum(h, 0)
    y = a @ w2.T + b2
    seed = np.zeros_like(y)
    seed[:, 2] = 1
    da = seed @ w2
    dh = da * (h > 0)
    dx = dh @ w1
    expected = {"top/ip1/0/data": h, "top/relu1/0/data": a, "blob/ip1/data": a, "top/ip2/0/data": y,
                "top/ip2/0/diff": seed, "top/relu1/0/diff": da, "top/ip1/0/diff": dh, "blob/ip1/diff": dh,
                "blob/data/diff": dx, "top/data/0/diff": dx}
    objective = Objective("ip2", 2, "ip2")
    got64 = port_arrays(float64_twin(net), {"data": x}, objective)
    got32 = port_arrays(net, {"data": x}, objective)
    assert (h < 0).any() and (h > 0).any()  # the ReLU mask matters
    for key, value in expected.items():
        # float64 against float64 in another summation order: measured 2.1e-16 relative.
        assert blob_metrics(got64[key], value).max_rel <= 1e-13, key
        # float32 port: measured 1.6e-7 relative on this net (dot products of 5-6 terms).
        assert blob_metrics(got32[key], value).max_rel <= 1e-6, key
    assert got32["top/ip1/0/data"].dtype == np.float32 and got64["top/ip1/0/data"].dtype == np.float64


@needs_layers
def test_port_arrays_in_place_views(tmp_path):
    net = build(tmp_path, TINY)
    obj = default_objective(net.graph)
    arrays = port_arrays(net, random_inputs(net.graph, seed=1), obj)
    pre, post = arrays["top/conv1/0/data"], arrays["top/relu1/0/data"]
    assert (pre < 0).any() and np.array_equal(arrays["blob/conv1/data"], post)
    np.testing.assert_array_equal(post, np.maximum(pre, 0))
    # the blob's diff is the gradient w.r.t. its earliest value (Caffe's in-place backward)
    np.testing.assert_array_equal(arrays["blob/conv1/diff"], arrays["top/conv1/0/diff"])
    np.testing.assert_array_equal(arrays["top/conv1/0/diff"], arrays["top/relu1/0/diff"] * (pre > 0))
    assert np.abs(arrays["blob/data/diff"]).max() > 0
    assert "top/prob/0/diff" not in arrays and "top/prob/0/data" in arrays  # past the objective: no diff


@needs_layers
def test_port_arrays_gradient_by_finite_differences(tmp_path):
    """The float64 input gradient of conv/pool/LRN/fc against central differences."""
    net64 = float64_twin(build(tmp_path, TINY, seed=3))
    obj = default_objective(net64.graph)
    x = random_inputs(net64.graph, seed=4)["data"].astype(np.float64)
    grad = port_arrays(net64, {"data": x}, obj)["blob/data/diff"]
    direction = np.random.default_rng(5).normal(size=x.shape)
    eps = 1e-3

    def f(v):
        with torch.no_grad():
            return float(net64(torch.from_numpy(v))["fc2"][:, obj.unit].sum())

    numeric = (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
    analytic = float((grad * direction).sum())
    # ReLU/max-pool kinks are far from x for these inputs; measured relative gap 6.3e-11.
    assert analytic == pytest.approx(numeric, rel=1e-7)


# ---------------------------------------------------------------------------- attribution

def _flaw_forward(net, layer: str, fn):
    """Make one layer's forward wrong on purpose: its outputs pass through ``fn``."""
    module = net.graph.layer(layer).module
    original = module.forward
    module.forward = lambda *b: tuple(fn(t) for t in original(*b))


class _ScaledGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _bfloat16(t):
    return t.to(torch.bfloat16).to(t.dtype)


def _verify_flawed(net, flaws: dict, inputs, obj):
    """Caffe's stand-in is the honest float32 port, float64 its honest twin; the candidate is
    the port with ``flaws`` (layer -> output transform) applied to its float32 arithmetic."""
    net64 = float64_twin(net)
    reference = port_arrays(net, inputs, obj)
    exact = port_arrays(net64, inputs, obj)
    for layer, fn in flaws.items():
        _flaw_forward(net, layer, fn)
    candidate = port_arrays(net, inputs, obj)
    return verify_arrays(net64, reference, candidate, objective=obj, exact=exact)


@needs_layers
@pytest.mark.parametrize("layer", ["conv1", "norm1", "fc1"])
def test_departure_at_a_wrong_forward(tmp_path, layer):
    net = build(tmp_path, TINY, seed=6)
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=7)
    v = _verify_flawed(net, {layer: _bfloat16}, inputs, obj)  # 8 significant bits instead of 24
    assert not v.passed
    dep = v.departure
    assert (dep.direction, dep.layer, dep.frameworks, dep.within) == ("forward", layer, ["port"], ["caffe"])
    assert dep.key == f"top/{layer}/0/data" and dep.error_ratio > 1
    assert layer in v.verdict and "caffe stays within float32 rounding" in v.verdict
    first_failed = next(r for r in v.rows if not r.passed)
    assert first_failed.layer == layer and first_failed.closer == "caffe"


@needs_layers
def test_departure_at_a_wrong_backward(tmp_path):
    net = build(tmp_path, TINY, seed=8)
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=9)
    # forward exact, gradient 0.1 % off
    v = _verify_flawed(net, {"norm1": lambda t: _ScaledGrad.apply(t, 1 + 1e-3)}, inputs, obj)
    dep = v.departure
    assert (dep.direction, dep.layer, dep.frameworks) == ("backward", "norm1", ["port"])
    assert dep.key == "top/pool1/0/diff"  # the gradient norm1 writes: w.r.t. its bottom
    assert all(r.passed for r in v.rows if r.kind == "data")
    assert not next(r for r in v.rows if r.key == "top/pool1/0/diff").passed


@needs_layers
def test_honest_port_within_bounds_and_passes(tmp_path):
    net = build(tmp_path, TINY, seed=10)
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=11)
    reference = port_arrays(net, inputs, obj)
    v, arrays = verify_port(net, reference, inputs, obj)
    assert v.passed and v.departure is None and v.failed_rows == []
    judged = [c for c in v.checks if c.within is not None]
    assert judged and all(c.within for c in judged) and len(judged) == len(v.checks)  # every type has a rule
    assert {c.framework for c in v.checks} == {"caffe", "port"}
    assert v.summary.startswith("PASS") and v.flips == []
    # pinned to its own forward values, the port's backward is the same computation: exactly 0
    pinned = [r for r in v.rows if r.pinned is not None]
    assert pinned and all(r.pinned["max_rel"] == 0 for r in pinned)


@needs_layers
def test_tolerance_decides_pass_and_frac_beyond(tmp_path):
    net = build(tmp_path, TINY, seed=12)
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=13)
    reference = port_arrays(net, inputs, obj)
    candidate = {k: v.copy() for k, v in reference.items()}
    candidate["top/fc2/0/data"] = candidate["top/fc2/0/data"] * np.float32(1 + 3e-5)
    loose = verify_arrays(net.graph, reference, candidate, parse_tolerances("InnerProduct=1e-4"), obj)
    tight = verify_arrays(net.graph, reference, candidate, parse_tolerances("InnerProduct.data=1e-5"), obj)
    assert loose.passed and not tight.passed
    bad = tight.failed_rows
    assert [r.key for r in bad] == ["top/fc2/0/data"]
    assert bad[0].metrics.max_rel == pytest.approx(3e-5, rel=0.05) and bad[0].metrics.frac_beyond > 0
    assert bad[0].tolerance == 1e-5


@needs_layers
def test_missing_and_foreign_keys(tmp_path):
    net = build(tmp_path, TINY)
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=14)
    reference = port_arrays(net, inputs, obj)
    reference["top/conv1_relu1_0_split/0/data"] = reference["top/conv1/0/data"]  # a Caffe-only array
    candidate = dict(reference)
    del candidate["top/conv1_relu1_0_split/0/data"]
    del reference["top/pool1/0/data"]
    v = verify_arrays(net.graph, reference, candidate, objective=obj)
    assert v.not_in_candidate == ["top/conv1_relu1_0_split/0/data"]
    assert v.missing_in_reference == ["top/pool1/0/data"]
    assert not v.passed and "missing" in v.verdict  # a forward array of the port that Caffe did not produce


@needs_layers
def test_values_bookkeeping(tmp_path):
    net = build(tmp_path, TINY)
    values = NetValues(net.graph)
    conv, relu = values.by_layer["conv1"][0], values.by_layer["relu1"][0]
    assert conv.first and not conv.last and relu.last and not relu.first
    assert values.bottoms["pool1"] == [relu] and values.readers[conv] == [("relu1", 0)]
    assert values.value_of_key("blob/conv1/diff") == conv and values.value_of_key("blob/conv1/data") == relu
    assert values.value_of_key("top/relu1/0/diff") == relu and values.value_of_key("top/relu1/1/diff") is None
    assert values.value_of_key("param/conv1/0") is None


@needs_layers
def test_names_with_slashes(tmp_path):
    """GoogLeNet names layers and blobs "inception_3a/1x1": keys must still resolve."""
    text = TINY.replace('"conv1"', '"block/conv1"').replace('"relu1"', '"block/relu1"')
    net = build(tmp_path, text)
    values = NetValues(net.graph)
    conv = values.by_layer["block/conv1"][0]
    assert values.value_of_key("top/block/conv1/0/data") == conv
    assert values.value_of_key("blob/block/conv1/diff") == conv
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=1)
    arrays = port_arrays(net, inputs, obj)
    v = verify_arrays(net.graph, arrays, arrays, objective=obj)
    assert {"top/block/conv1/0/data", "top/block/relu1/0/diff", "blob/block/conv1/diff"} <= {r.key for r in v.rows}


@needs_layers
def test_find_departure_orders_forward_before_backward(tmp_path):
    net = build(tmp_path, TINY, seed=15)
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=16)
    net64 = float64_twin(net)
    honest = port_arrays(net, inputs, obj)
    _flaw_forward(net, "fc1", _bfloat16)
    flawed = port_arrays(net, inputs, obj)
    checks = local_checks(net64, {"a": honest, "b": flawed}, obj)
    dep = find_departure(checks, ["a", "b"])
    assert dep.frameworks == ["b"] and dep.within == ["a"] and dep.layer == "fc1"
    assert find_departure([c for c in checks if c.framework == "a"], ["a"]) is None


# ---------------------------------------------------------------------------- CaffeNet

def _caffenet(std: float | None, bias: float = 0.0):
    net = load_caffe(CAFFENET)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blobs in net.params.values():
            w = blobs[0]
            scale = std if std is not None else (2.0 / w[0].numel()) ** 0.5
            w.copy_(torch.randn(w.shape, generator=gen) * scale)
            blobs[1].fill_(bias)
    return net


def _flush_below(threshold: float):
    """An absolute epsilon somewhere in a port: magnitudes below ``threshold`` become 0."""
    return lambda t: torch.where(t.abs() < threshold, torch.zeros_like(t), t)


@needs_layers
@pytest.mark.skipif(not CAFFENET.exists(), reason="reference data absent")
@pytest.mark.parametrize("weights", ["gaussian-0.01", "msra"])
def test_caffenet_small_activation_trap(weights):
    """The trap: with N(0, 0.01) weights CaffeNet's fc activations are small (fc7 |x| < 0.5),
    and a port with an absolute epsilon (here fc6-fc8 drop |x| < 1e-3, so some ReLU units
    switch off and the input gradient moves) departs, while the same port is within float32
    rounding at He scale (fc |x| in the hundreds). The verification must name an fc layer,
    say the reference stays within float32 rounding, and that the reference is the closer
    one on the input gradient. With an honest port the whole net is within the bounds
    (no departure at He scale), which also checks the bounds against our own layers."""
    net = _caffenet(0.01 if weights == "gaussian-0.01" else None)
    obj = parse_objective("fc8:498", net.graph)
    inputs = random_inputs(net.graph, batch=1, seed=3)
    v = _verify_flawed(net, {layer: _flush_below(1e-3) for layer in ("fc6", "fc7", "fc8")}, inputs, obj)
    grad = next(r for r in v.rows if r.key == "blob/data/diff")
    if weights == "msra":
        assert v.passed and v.departure is None
        judged = [c for c in v.checks if c.within is not None]
        assert len(judged) >= 2 * 40 and all(c.within for c in judged)
        return
    dep = v.departure
    assert not v.passed and dep is not None and dep.direction == "forward" and dep.layer in ("fc6", "fc7", "fc8")
    assert dep.frameworks == ["port"] and dep.within == ["caffe"]
    assert v.summary.startswith(f"FAIL at the forward of layer {dep.layer}")
    # how far the flushed port's input gradient is from float64 depends on which ReLU units the
    # flush switched off, not on rounding: far beyond any tolerance on every machine
    assert grad.vs_float64["port"]["max_rel"] > 1e-3 and not grad.passed


# ---------------------------------------------------------------------------- real Caffe

@pytest.mark.caffe
@pytest.mark.parametrize("filler", ["gaussian", "msra"])
def test_caffe_within_float32_bounds_on_caffenet(caffe_worker, caffe_weights, filler):
    """Real Caffe's float32 arithmetic stays within the bounds at every layer, forward and
    backward, on CaffeNet with N(0, 0.01) weights (the trap) and with He weights. This is
    the check that the bounds model Caffe's own algorithms (e.g. LRN's running sum)."""
    if not CAFFENET.exists():
        pytest.skip("reference data absent")
    weights = caffe_weights(CAFFENET, seed=5, filler=filler, std=0.01)
    net = load_caffe(CAFFENET, weights)
    obj = parse_objective("fc8:498", net.graph)
    inputs = random_inputs(net.graph, batch=1, seed=3)
    seed = obj.seed(net.graph.blob_shapes[obj.blob])
    reference = caffe_worker.run_net(CAFFENET, weights, inputs=inputs, top_diffs={obj.blob: seed})
    v, _ = verify_port(net, dict(reference), inputs, obj)
    caffe_checks = [c for c in v.checks if c.framework == "caffe" and c.within is not None]
    assert len(caffe_checks) >= 40
    beyond = [(c.direction, c.layer, c.error_ratio) for c in caffe_checks if not c.within]
    assert beyond == []
    # our port does not depart either, so it passes whatever decisions rounding flipped on this
    # machine (N(0, 0.01) weights: ReLU inputs and pooling ties within rounding of a kink)
    assert v.departure is None and v.passed and v.summary.startswith("PASS")
    assert all(f.kind == "rounding" for f in v.flips)


@needs_layers
def test_third_opinion_departure_is_reported_apart(tmp_path):
    net = build(tmp_path, TINY, seed=17)
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=18)
    arrays = port_arrays(net, inputs, obj)
    third = {k: v for k, v in arrays.items() if k.endswith("/data")}  # forward only, as ONNX
    third["top/norm1/0/data"] = third["top/norm1/0/data"] * np.float32(1 + 1e-3)
    v = verify_arrays(net, arrays, arrays, objective=obj, exact=port_arrays(float64_twin(net), inputs, obj),
                      others={"onnx": third})
    assert v.passed and v.departure is None
    assert [(d.frameworks, d.layer) for d in v.other_departures] == [(["onnx"], "norm1")]
    assert "Third opinion" in v.verdict and "not of caffe or port" in v.verdict
    row = next(r for r in v.rows if r.key == "top/norm1/0/data")
    assert row.others["onnx"]["max_rel"] == pytest.approx(1e-3, rel=1e-2) and row.closer != "onnx"


@needs_layers
def test_reference_departing_reads_as_a_semantic_difference(tmp_path):
    """A port whose LRN reads k differently: against the port's float64, real Caffe (here the
    honest port standing in) is the one 'beyond' — the statement must point at the port."""
    net = build(tmp_path, TINY, seed=19)
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=20)
    honest = port_arrays(net, inputs, obj)
    norm = net.graph.layer("norm1").param.lrn_param
    norm.k = 2.0  # the "port" now believes k = 2, Caffe's k is 1
    changed = load_caffe_like(net, tmp_path)
    v = verify_arrays(changed, honest, port_arrays(changed, inputs, obj), objective=obj)
    assert v.departure.frameworks == ["caffe"] and v.departure.layer == "norm1"
    assert "semantic difference" in v.departure.statement and "port implements norm1" in v.departure.statement
    assert not v.passed and v.summary == ("FAIL at the forward of layer norm1 (LRN): the port implements norm1 "
                                          "differently from caffe (a semantic difference).")


def load_caffe_like(net, tmp_path):
    """The same net rebuilt from its (edited) layer parameters, weights copied."""
    from google.protobuf import text_format

    from porting import caffe_pb2

    proto = caffe_pb2.NetParameter(name="edited")
    for spec in net.graph.layers:
        proto.layer.add().CopyFrom(spec.param)
    path = tmp_path / "edited.prototxt"
    path.write_text(text_format.MessageToString(proto))
    other = load_caffe(path)
    other.load_state_dict(net.state_dict())
    return other


# ---------------------------------------------------------------------------- the verdict

def _near_kink_net(tmp_path):
    """TINY with conv1's bias moved so that one ReLU input (item 0, channel 3, row 2, col 4)
    is within float32 rounding of 0: a decision either framework may take either way."""
    net = build(tmp_path, TINY, seed=21)
    inputs = random_inputs(net.graph, seed=22)
    with torch.no_grad():
        y = net(torch.from_numpy(inputs["data"]), end="conv1")["conv1"]
        net.params["conv1"][1][3] -= y[0, 3, 2, 4]
    return net, inputs, (0, 3, 2, 4)


@needs_layers
def test_rounding_flip_passes_and_is_classified(tmp_path):
    """The candidate takes the near-kink ReLU decision the other way, by an error within
    conv1's rounding bound: the verdict passes, names the flip a rounding flip, and only
    --strict (per-blob tolerances) may fail it."""
    net, inputs, at = _near_kink_net(tmp_path)
    obj = default_objective(net.graph)
    reference = port_arrays(net, inputs, obj)
    ref_value = float(reference["top/conv1/0/data"][at])
    mask = torch.zeros(reference["top/conv1/0/data"].shape, dtype=torch.bool)
    mask[at] = True
    nudge = 2 * abs(ref_value) if ref_value != 0 else 1e-6  # to the other side of 0, within conv1's bound
    flip = (lambda t: torch.where(mask, t - nudge, t)) if ref_value > 0 else (lambda t: torch.where(mask, t + nudge, t))
    net64 = float64_twin(net)
    exact = port_arrays(net64, inputs, obj)
    _flaw_forward(net, "conv1", flip)
    candidate = port_arrays(net, inputs, obj)
    assert (candidate["top/conv1/0/data"][at] > 0) != (reference["top/conv1/0/data"][at] > 0)
    for strict in (False, True):
        v = verify_arrays(net64, reference, candidate, objective=obj, exact=exact, inputs=inputs, strict=strict)
        assert v.departure is None
        relu = [f for f in v.flips if f.layer == "relu1"]
        assert len(relu) == 1 and relu[0].flips == 1 and relu[0].kind == "rounding"
        assert relu[0].margin_rel < 1e-5  # the deciding value sits at the kink
        assert v.passed == (not strict or not v.failed_rows)
    assert v.strict and "rounding" in verify_arrays(net64, reference, candidate, objective=obj, exact=exact).summary


@needs_layers
def test_flip_after_a_departure_is_not_a_rounding_flip(tmp_path):
    """The same near-kink flip, but with conv1 made wrong (bfloat16): the flip lies after the
    departure and the verdict fails at conv1."""
    net, inputs, at = _near_kink_net(tmp_path)
    obj = default_objective(net.graph)
    reference = port_arrays(net, inputs, obj)
    net64 = float64_twin(net)
    exact = port_arrays(net64, inputs, obj)
    _flaw_forward(net, "conv1", lambda t: -_bfloat16(t))  # a sign error: every ReLU decision flips
    v = verify_arrays(net64, reference, port_arrays(net, inputs, obj), objective=obj, exact=exact, inputs=inputs)
    assert not v.passed and v.departure.layer == "conv1"
    relu = next(f for f in v.flips if f.layer == "relu1")
    assert relu.kind == "after departure" and relu.flips > relu.total // 4


@needs_layers
def test_input_not_as_given_departs_at_the_input_layer(tmp_path):
    """A port whose preprocessing swaps BGR and RGB: its data blob is not the input it was given."""
    net = build(tmp_path, TINY, seed=23)
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=24)
    reference = port_arrays(net, inputs, obj)
    swapped = {"data": np.ascontiguousarray(inputs["data"][:, ::-1])}
    v = verify_arrays(net, reference, port_arrays(net, swapped, obj), objective=obj, inputs=inputs)
    assert not v.passed
    assert (v.departure.layer, v.departure.frameworks, v.departure.layer_type) == ("data", ["port"], "Input")
    assert v.summary == ("FAIL at the forward of layer data (Input): port did not get the input it was "
                         "given (preprocessing).")
