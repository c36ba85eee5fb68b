"""The octave loop on a small torch net: draws, schedules, composition and outputs."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from mfv import crops, tv
from mfv.files import truncating_uint8
from mfv.loop import run_facet, save_facet
from mfv.preprocess import Preprocessing
from mfv.schedule import Octave
from mfv.step import FacetNet

SIZE = 16
OCTAVES = (
    Octave(None, 0, 0.3, None, 3, 0.4, 0.4, 1, 2),       # integer steps: Python 2 keeps 1
    Octave("1", 0, 0.3, 1.25, 4, 0.01, 2, 1., 1.),        # objective: the ReLU's output
    Octave(None, 50, 0.2, 1.0, 2, 0.1, 2, 2., 2.),        # margin 50 of 227 is 4 of 16 (schedule.margin_for)
)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 6))
    return FacetNet(module, Preprocessing(input_size=(SIZE, SIZE)))


def test_draws_schedules_and_layers(net):
    result = run_facet(net, unit=2, seed=4, octaves=OCTAVES, layer="3", mode="faithful", progress=False)
    rng = np.random.RandomState(4)
    crops.noise_start(rng, SIZE, SIZE)
    expected_crops = [(0, 0)] * 3 + [crops.crop_offsets(rng, 20, 20, SIZE, SIZE, w) for w in [0.3] * 4 + [0.2] * 2]
    assert [r.crop for r in result.records] == expected_crops
    assert [r.image_shape for r in result.records] == [(16, 16)] * 3 + [(20, 20)] * 6
    assert [r.step_size for r in result.records] == [1, 1, 1, 1, 1, 1, 1, 2, 2]
    assert [r.layer for r in result.records] == ["3"] * 3 + ["1"] * 4 + ["3"] * 2
    assert result.image.shape == (20, 20, 3) and result.image.dtype == np.float32
    modern = run_facet(net, unit=2, seed=4, octaves=OCTAVES, layer="3", mode="modern", progress=False)
    assert [r.step_size for r in modern.records][:3] == [1.0, 1 + 1 / 3, 1 + 2 / 3]
    assert [r.crop for r in modern.records] == expected_crops
    assert np.abs(modern.image - result.image).max() > 1.0


def test_each_iteration_is_step_then_denoise(net):
    result = run_facet(net, unit=1, seed=2, octaves=OCTAVES, layer="3", progress=False, snapshot_every=2)
    assert [s.iteration for s in result.snapshots] == [0, 2, 4, 6, 8]
    prep = net.preprocessing
    for snap in result.snapshots:
        record = result.records[snap.iteration]
        rgb = prep.from_net(snap.after_step).astype(np.float64)
        expected = prep.to_net(tv.denoise_tv_bregman_0131(rgb, record.denoise_weight))
        np.testing.assert_array_equal(snap.after_denoise, expected)
        assert record.mean_abs_gradient == pytest.approx(np.abs(snap.gradient).mean(), rel=1e-6)
    # the margin octave zeroes the gradient outside [4, 12)
    last = result.snapshots[-1]
    assert not last.gradient[:, :4].any() and last.gradient[:, 4:12, 4:12].any()


def test_same_seed_same_image_and_start_image(net):
    a = run_facet(net, unit=0, seed=9, octaves=OCTAVES[:2], layer="3", progress=False)
    b = run_facet(net, unit=0, seed=9, octaves=OCTAVES[:2], layer="3", progress=False)
    np.testing.assert_array_equal(a.image, b.image)
    start = np.full((SIZE, SIZE, 3), 120.0)
    c = run_facet(net, unit=0, seed=9, octaves=OCTAVES[:2], layer="3", start=start, progress=False)
    assert [r.crop for r in c.records] == [r.crop for r in a.records]  # noise drawn all the same
    assert np.abs(c.image - a.image).max() > 1.0
    with pytest.raises(ValueError):
        run_facet(net, unit=0, seed=9, octaves=OCTAVES, start=np.zeros((8, 8, 3)), progress=False)


def test_truncating_uint8_is_numpy_1_11_cast():
    values = np.array([0.0, 0.99, 254.999, 255.5, 256.2, -0.4, -1.5, np.nan])
    np.testing.assert_array_equal(truncating_uint8(values), [0, 0, 254, 255, 0, 0, 255, 0])


def test_save_facet_writes_all_outputs(net, tmp_path):
    result = run_facet(net, unit=0, seed=1, octaves=OCTAVES[:1], layer="3", progress=False, snapshot_every=1)
    paths = save_facet(result, tmp_path, "unit0")
    from PIL import Image

    png = np.asarray(Image.open(paths["png"]))
    np.testing.assert_array_equal(png, truncating_uint8(result.image))
    np.testing.assert_array_equal(np.load(paths["npy"]), result.image)
    trace = json.loads(paths["trace"].read_text())
    assert [t["iteration"] for t in trace] == [0, 1, 2] and trace[0]["crop"] == [0, 0]
    with np.load(paths["snapshots"]) as snaps:
        assert sorted(snaps.files)[:2] == ["0000/after_denoise", "0000/after_step"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit0.npy", "unit0.png", "unit0_snapshots.npz",
                                                         "unit0_trace.json"]
