"""Session fixtures shared by the test suite.

Real Caffe (the legacy stack, see porting/legacy.py), through the backend that
$PORTING_BACKEND names, else the first that works here (porting/legacy_backends.py):
  caffe_backend  that backend, ready (built); ``launch(command, binds)`` runs a command inside
  caffe_root     the built legacy root folder (a Path), for tests about the root folder
                 itself; they skip under the docker and podman backends, which have none
  caffe_worker   one reference Worker for the whole run (Caffe starts once)
  caffe_weights  make(prototxt, seed=0, **filler) -> Path of a caffemodel written by real
                 Caffe's fillers, made once per (prototxt content, filler, seed) per session
  caffe_trained  train(name) -> TrainedNet(deploy, caffemodel, train, provenance, heldout):
                 one of the nets in tests/fixtures/trained/ (TRAINED_RECIPES) trained by real
                 Caffe's SGD solver on seeded synthetic images (Worker.train), once per name
                 per session (about 1-3 s each on 2 cores); the caffemodel is Caffe's net.save
                 of the training net, so BatchNorm/Scale/PReLU blobs hold trained values.
                 ``heldout``: {"data": 16 x 3 x 32 x 32 float32 NCHW, "label": 16} fresh
                 images of the same generator (not BGR/0-255: per-class offsets and
                 stripes within [-2, 2] plus Gaussian noise of std 1.5).
Tests that use them, or carry ``@pytest.mark.caffe``, skip when the stack is absent,
and fail instead when PORTING_REQUIRE_CAFFE=1 (as in CI).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not flake on a new draw);
# HYPOTHESIS_PROFILE=explore draws fresh ones for a developer hunting bugs.
settings.register_profile("repeatable", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REQUIRE_CAFFE = os.environ.get("PORTING_REQUIRE_CAFFE") == "1"


def legacy_stack_missing() -> str | None:
    """Why real Caffe cannot run here, or None when it can."""
    from porting.errors import PortingError
    from porting.legacy_backends import get_backend

    try:
        return get_backend().problem()
    except PortingError as err:
        return str(err)


def _skip_or_fail(reason: str) -> None:
    if REQUIRE_CAFFE:
        pytest.fail(f"PORTING_REQUIRE_CAFFE=1 but {reason}", pytrace=False)
    pytest.skip(reason)


CAFFE_FIXTURES = {"caffe_backend", "caffe_root", "caffe_worker", "caffe_weights", "caffe_trained"}


def pytest_collection_modifyitems(config, items):
    """A test that uses a real-Caffe fixture is a ``caffe`` test (``-m caffe`` selects it)."""
    for item in items:
        if CAFFE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.caffe)


def pytest_runtest_setup(item):
    if item.get_closest_marker("caffe") is not None:
        reason = legacy_stack_missing()
        if reason:
            _skip_or_fail(reason)


@pytest.fixture(scope="session")
def caffe_backend():
    reason = legacy_stack_missing()
    if reason:
        _skip_or_fail(reason)
    from porting.legacy_backends import get_backend

    return get_backend()


@pytest.fixture(scope="session")
def caffe_root(caffe_backend) -> Path:
    if not hasattr(caffe_backend, "root"):
        pytest.skip(f"a test of the root folder; the {caffe_backend.name} backend runs an image")
    return caffe_backend.root


@pytest.fixture(scope="session")
def caffe_worker(caffe_backend):
    from porting.legacy import Worker

    worker = Worker(backend=caffe_backend)
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def caffe_weights(caffe_worker, tmp_path_factory):
    """make(prototxt, seed=0, **filler) -> caffemodel Path; filler keywords as Worker.make_weights."""
    folder = tmp_path_factory.mktemp("caffe-weights")
    made: dict[tuple, Path] = {}

    def make(prototxt, seed: int = 0, **filler) -> Path:
        content = hashlib.sha256(Path(prototxt).read_bytes()).hexdigest()
        key = (content, seed, tuple(sorted(filler.items())))
        if key not in made:
            out = folder / f"{content[:16]}-{len(made)}.caffemodel"
            caffe_worker.make_weights(prototxt, out, seed=seed, **filler)
            made[key] = out
        return made[key]

    return make


TRAINED_DIR = Path(__file__).parent / "fixtures" / "trained"
# name -> Worker.train keywords; each net has {name}_train.prototxt and {name}_deploy.prototxt.
TRAINED_RECIPES = {
    "resnet_tiny": dict(iterations=200, base_lr=0.01, noise=1.5, seed=0),
    "caffenet_tiny": dict(iterations=300, base_lr=0.003, noise=1.5, seed=0),
    "deconv_tiny": dict(iterations=200, base_lr=0.01, noise=1.5, seed=0),
}


class TrainedNet(NamedTuple):
    deploy: Path        # deploy prototxt (Input "data", Softmax "prob")
    caffemodel: Path    # Caffe's net.save of the trained training net
    train: Path         # training prototxt (Input "data" and "label", SoftmaxWithLoss "loss")
    provenance: dict    # Worker.train's: loss_first, loss_last, losses, train_seconds, versions, ...
    heldout: dict       # {"data": N x C x H x W float32, "label": N float32}, unseen in training


@pytest.fixture(scope="session")
def caffe_trained(caffe_worker, tmp_path_factory):
    """train(name) -> TrainedNet; trained once per name per session (see TRAINED_RECIPES)."""
    folder = tmp_path_factory.mktemp("caffe-trained")
    made: dict[str, TrainedNet] = {}

    def train(name: str) -> TrainedNet:
        if name not in TRAINED_RECIPES:
            raise KeyError(f"no trained-net recipe {name!r} (known: {', '.join(TRAINED_RECIPES)})")
        if name not in made:
            deploy, train_net = TRAINED_DIR / f"{name}_deploy.prototxt", TRAINED_DIR / f"{name}_train.prototxt"
            out = folder / f"{name}.caffemodel"
            result = caffe_worker.train(train_net, out, deploy, **TRAINED_RECIPES[name])
            made[name] = TrainedNet(deploy, out, train_net, result.provenance,
                                    {"data": result["data"], "label": result["label"]})
        return made[name]

    return train
