"""Nets with trained statistics, trained by real Caffe's own SGD solver (Worker.train).

The nets of tests/fixtures/trained/ are trained on seeded synthetic images (4 classes;
see the caffe_trained fixture in conftest.py), so their BatchNorm running statistics,
Scale gammas/betas and PReLU slopes hold values that only training produces. The port
must load Caffe's file and match Caffe on it within float32 rounding, layer by layer.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from porting import load_caffe
from porting.errors import PortingError
from porting.legacy import CaffeError
from porting.verify import default_objective, verify_port

pytestmark = pytest.mark.caffe
TRAINED_DIR = Path(__file__).parent / "fixtures" / "trained"
NAMES = ["caffenet_tiny", "deconv_tiny", "resnet_tiny"]  # conftest.TRAINED_RECIPES
LOSS_DROP = 4.0  # the last 10 iterations' mean loss is at most a quarter of the first 10's


def _params(net, layer: str) -> list[np.ndarray]:
    return [b.detach().numpy() for b in net.params[layer]]


@pytest.mark.parametrize("name", NAMES)
def test_training_lowered_the_loss(caffe_trained, name):
    trained = caffe_trained(name)
    prov = trained.provenance
    losses = np.asarray(prov["losses"])
    assert len(losses) == prov["iterations"] >= 100
    assert np.isfinite(losses).all()
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last * LOSS_DROP <= first, f"{name}: mean loss {first:.3f} over the first 10 iterations, {last:.3f} over the last 10"
    assert prov["versions"]["caffe"] == "1.0.0"
    assert prov["output"]["caffemodel"] == hashlib.sha256(trained.caffemodel.read_bytes()).hexdigest()


def test_batchnorm_statistics_are_trained(caffe_trained):
    trained = caffe_trained("resnet_tiny")
    net = load_caffe(trained.deploy, trained.caffemodel)
    # Caffe's TRAIN-phase forward: factor = 0.999 * factor + 1 per iteration, in float32.
    factor = np.float32(0)
    for _ in range(trained.provenance["iterations"]):
        factor = np.float32(np.float32(factor * np.float32(0.999)) + np.float32(1))
    layers = [s.name for s in net.graph.layers if s.type == "BatchNorm"]
    assert len(layers) == 6
    for layer in layers:
        mean_sum, var_sum, factor_blob = _params(net, layer)
        assert factor_blob.shape == (1,) and factor_blob[0] == factor, (layer, factor_blob, factor)
        assert factor_blob[0] not in (0.0, 1.0)
        assert np.abs(mean_sum).max() > 0, layer
        assert (var_sum > 0).all(), layer


def test_scale_and_prelu_are_trained(caffe_trained):
    resnet = caffe_trained("resnet_tiny")
    net = load_caffe(resnet.deploy, resnet.caffemodel)
    scales = [s.name for s in net.graph.layers if s.type == "Scale"]
    assert len(scales) == 6
    for layer in scales:
        gamma, beta = _params(net, layer)  # filled with 1 and 0 before training
        assert not np.all(gamma == 1) and not np.all(beta == 0), layer

    caffenet = caffe_trained("caffenet_tiny")
    net = load_caffe(caffenet.deploy, caffenet.caffemodel)
    (per_channel,), (shared,) = _params(net, "prelu2"), _params(net, "prelu7")
    assert per_channel.shape == (32,) and shared.size == 1
    assert not np.any(per_channel == np.float32(0.25)) and shared.ravel()[0] != np.float32(0.25)  # filler: 0.25


@pytest.mark.parametrize("name", NAMES)
def test_port_matches_caffe_on_trained_weights(caffe_trained, caffe_worker, name):
    trained = caffe_trained(name)
    net = load_caffe(trained.deploy, trained.caffemodel)
    inputs = {"data": trained.heldout["data"]}
    objective = default_objective(net.graph)
    shape = (len(inputs["data"]),) + tuple(net.graph.blob_shapes[objective.blob][1:])
    reference = caffe_worker.run_net(trained.deploy, trained.caffemodel, inputs=inputs,
                                     top_diffs={objective.blob: objective.seed(shape)})
    verification, arrays = verify_port(net, dict(reference), inputs, objective)
    beyond = [f"{c.framework} {c.direction} {c.layer} ({c.layer_type}): {c.error_ratio:.3g} x bound"
              for c in verification.checks if c.within is False]
    assert not beyond, "\n".join(beyond)
    assert any(c.within for c in verification.checks)
    labels = trained.heldout["label"]
    caffe_classes = reference["blob/prob/data"].argmax(1)
    port_classes = arrays["port"]["blob/prob/data"].argmax(1)
    assert (caffe_classes == labels).mean() >= 0.75, "trained net no better than chance on held-out images"
    assert (port_classes == caffe_classes).all()


def test_training_repeats_exactly(caffe_worker, tmp_path):
    """Same seed, same file (Dropout draws from Caffe's seeded RNG); another seed, another file."""
    train = TRAINED_DIR / "caffenet_tiny_train.prototxt"
    digests = []
    for i, seed in enumerate((0, 0, 1)):
        result = caffe_worker.train(train, tmp_path / f"run{i}.caffemodel", iterations=20, base_lr=0.003, seed=seed)
        digests.append(result.provenance["output"]["caffemodel"])
    assert digests[0] == digests[1] != digests[2]


def test_bad_training_input_is_refused_clearly(caffe_worker, tmp_path):
    text = (TRAINED_DIR / "resnet_tiny_train.prototxt").read_text()
    no_label = tmp_path / "no_label.prototxt"
    no_label.write_text(text.replace('top: "label"', 'top: "labels"').replace('bottom: "label"', 'bottom: "labels"'))
    with pytest.raises(CaffeError, match="no blob 'label'"):
        caffe_worker.train(no_label, tmp_path / "x.caffemodel", iterations=1)
    renamed = tmp_path / "renamed_deploy.prototxt"
    renamed.write_text((TRAINED_DIR / "resnet_tiny_deploy.prototxt").read_text().replace('"fc4"', '"fc_other"'))
    with pytest.raises(CaffeError, match="fc_other.*keep filler values"):
        caffe_worker.train(TRAINED_DIR / "resnet_tiny_train.prototxt", tmp_path / "y.caffemodel", renamed, iterations=1)
    with pytest.raises(PortingError, match="iterations >= 1"):
        caffe_worker.train(TRAINED_DIR / "resnet_tiny_train.prototxt", tmp_path / "z.caffemodel", iterations=0)
    assert not (tmp_path / "x.caffemodel").exists() and not (tmp_path / "z.caffemodel").exists()
