"""MFV on any net: a torch module through ``--model``/``--preprocessing`` (tests/fixtures/
tiny_rgb_net.py: RGB, 0-1, mean/std) and BVLC GoogLeNet (224 input) through the port.

The step is in grey levels whatever the net's input scale (``mfv.step.apply_step``), the
clip keeps every pixel in 0-255, the octave margin scales to the input side
(``mfv.schedule.margin_for``), and the thread policy is ``mfv.device``.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mfv import schedule
from mfv.cli import main
from mfv.device import THREAD_CAP, configure, default_threads
from mfv.model import load_model, parse_preprocessing
from mfv.preprocess import Preprocessing
from mfv.step import gradient_step, objective_of
from porting.errors import PortingError

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_rgb_net.py"
GOOGLENET = Path(__file__).resolve().parents[2] / "shared" / "reference-data" / "bvlc-prototxt" / \
    "bvlc_googlenet.deploy.prototxt"
TINY_PREPROCESSING = "rgb01:0.485,0.456,0.406:0.229,0.224,0.225:32"


@pytest.fixture
def torch_threads():
    """Leave torch's thread count as it was (the CLI sets it)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny():
    return load_model(f"{FIXTURE}:build", parse_preprocessing(TINY_PREPROCESSING))


def smooth_start(size: int) -> np.ndarray:
    """RGB 0-255, a gentle colour ramp well inside the range (nothing clips at a 1-grey-level step)."""
    ramp = np.linspace(0, 1, size)
    return np.dstack([110 + 40 * ramp[:, None] + 0 * ramp, 130 + 30 * ramp[None, :] + 0 * ramp[:, None],
                      np.full((size, size), 150.0)]).astype(np.float32)


def objective(net, x, layer, unit):
    with torch.no_grad():
        return float(objective_of(net.layer_output(torch.from_numpy(x[None]), layer), unit))


def test_preprocessing_forms_and_one_line_errors(tmp_path):
    p = parse_preprocessing("torchvision")
    assert (p.channel_order, p.value_range, p.input_size) == ("RGB", 1.0, (224, 224))
    assert p.std == (0.229, 0.224, 0.225) and p.mean == (0.485, 0.456, 0.406)
    assert parse_preprocessing("caffenet") == Preprocessing()
    assert parse_preprocessing("bgr255:1,2,3:1,1,1:224x256").input_size == (224, 256)
    spec = tmp_path / "p.json"
    spec.write_text(json.dumps({"channel_order": "RGB", "value_range": 1, "mean": [0.485, 0.456, 0.406],
                                "std": [0.229, 0.224, 0.225], "input_size": 224}))
    assert parse_preprocessing(str(spec)) == p
    for bad, words in [("rgb01:1,2,3", "expected a preset"), ("yuv01:1,2,3:1,1,1:8", "KIND must be one of"),
                       ("rgb01:1,2:1,1,1:8", "MEAN: expected three numbers"),
                       ("rgb01:1,2,3:1,0,1:8", "STD: expected three positive numbers"),
                       ("rgb01:1,2,3:1,1,1:0", "SIZE: input size"), ("rgb01:1,2,3:1,1,1:9x", "SIZE: input size")]:
        with pytest.raises(PortingError, match=words) as caught:
            parse_preprocessing(bad)
        assert str(caught.value).startswith("--preprocessing") and "\n" not in str(caught.value)
    spec.write_text(json.dumps({"channel_order": "RGB", "value_range": 1, "mean": [0, 0, 0], "std": [1, -1, 1],
                                "input_size": 8}))
    with pytest.raises(PortingError, match="std: must be three positive numbers"):
        parse_preprocessing(str(spec))
    spec.write_text('{"channel_order": "RGB"}')
    with pytest.raises(PortingError, match="missing: value_range, mean, std, input_size"):
        parse_preprocessing(str(spec))


def test_step_is_in_grey_levels_for_a_mean_std_net(tiny):
    """x = (p / 255 - mean) / std: the pixels move by step grey levels on average, along
    k g (the gradient per grey level, k = 1 / (255 std)); the objective rises."""
    prep = tiny.preprocessing
    k = np.array([1 / (255 * s) for s in prep.std]).reshape(3, 1, 1)
    x = prep.to_net(smooth_start(32))
    for step in (1.0, 2.0):
        done = gradient_step(tiny, x, "fc", 2, step)
        dp = (done.x.astype(np.float64) - x) / k             # the change in grey levels
        expected = step * k * done.gradient / np.abs(k * done.gradient).mean()
        # float32 rounding of x + factor * direction: |x| < 2.7, so at most 2.4e-7 net units = 1.6e-5 grey levels
        assert np.abs(dp - expected).max() < 1e-4
        assert abs(np.abs(dp).mean() - step) < 1e-4
        assert done.mean_abs_gradient == pytest.approx(np.abs(k * done.gradient).mean(), rel=1e-6)
        assert objective(tiny, done.x, "fc", 2) > done.objective


def test_clip_keeps_pixels_in_range(tiny):
    prep = tiny.preprocessing
    x = prep.to_net(smooth_start(32))
    done = gradient_step(tiny, x, "fc", 2, 500.0)         # a step far past both ends
    rgb = prep.from_net(done.x).astype(np.float64)
    lo, hi = prep.bounds()
    assert np.all(done.x >= lo) and np.all(done.x <= hi)
    assert rgb.min() > -1e-4 and rgb.max() < 255 + 1e-4      # float32 images of 0 and 255
    assert np.isclose(rgb, 0, atol=1e-4).any() and np.isclose(rgb, 255, atol=1e-3).any()


def test_margin_scales_with_the_input_side():
    for octave in schedule.MEAN_OCTAVES + schedule.CENTER_BIAS_OCTAVES:   # CaffeNet's numbers unchanged
        assert schedule.margin_for(octave, (227, 227)) == octave.margin
    octave = schedule.MEAN_OCTAVES[2]                                     # margin 50 of 227
    assert [schedule.margin_for(octave, (n, n)) for n in (224, 32, 299, 454)] == [49, 7, 66, 100]
    assert schedule.margin_for(octave, (224, 300)) == 49                 # the shorter side


def test_thread_policy(torch_threads):
    assert 1 <= default_threads() <= min(len(os.sched_getaffinity(0)), THREAD_CAP)
    assert configure(1) == "mfv: torch on cpu, 1 thread" and torch.get_num_threads() == 1
    assert configure(None).endswith(f", {default_threads()} threads" if default_threads() > 1 else ", 1 thread")


def test_cli_model_runs_a_facet(tmp_path, capsys, torch_threads):
    out = tmp_path / "out"
    code = main(["facet", "--model", f"{FIXTURE}:build", "--preprocessing", TINY_PREPROCESSING, "--layer", "fc",
                 "--unit", "2", "--variant", "mean", "--threads", "1", "--out", str(out), "--name", "f",
                 "--no-progress", "--snapshot-every", "0"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.err.count("mfv: torch on cpu, 1 thread\n") == 1
    assert "370 iterations" in printed.out
    trace = json.loads((out / "f_trace.json").read_text())
    assert trace[0]["image_shape"] == [32, 32] and trace[-1]["image_shape"] == [38, 38]   # 32 -> zoom 1.2
    objectives = [r["objective"] for r in trace]
    assert objectives[-1] > objectives[0] + 1                  # measured: -1.35 -> 2.33
    image = np.load(out / "f.npy")
    assert image.shape == (38, 38, 3) and image.min() >= 0 and image.max() <= 255
    assert (out / "f.png").exists() and (out / "f_snapshots.npz").exists()


def test_cli_refuses_bad_nets_in_one_line(tmp_path, capsys, torch_threads):
    base = ["facet", "--unit", "0", "--out", str(tmp_path), "--no-progress"]
    cases = [
        (["--model", f"{FIXTURE}:build"], "--model needs --preprocessing"),
        (["--model", f"{FIXTURE}:build", "--preprocessing", "rgb01:1,2:1,1,1:32"], "--preprocessing MEAN"),
        (["--model", f"{FIXTURE}:nothing", "--preprocessing", TINY_PREPROCESSING], "--model"),
        (["--model", str(tmp_path / "absent.py") + ":build", "--preprocessing", TINY_PREPROCESSING],
         "no such file"),
        (["--model", f"{FIXTURE}:build", "--preprocessing", TINY_PREPROCESSING, "--layer", "fc9"],
         "no layer named 'fc9'"),
        (["--model", f"{FIXTURE}:build", "--prototxt", str(FIXTURE)], "one of them"),
        ([], "one of them"),
    ]
    for extra, words in cases:
        code = main(base + extra)
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (extra, err)
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text('input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n')
    for argv, words in [
        (["compare", "--model", f"{FIXTURE}:build", "--preprocessing", TINY_PREPROCESSING], "needs --prototxt"),
        (["facet", "--prototxt", str(prototxt), "--preprocessing", TINY_PREPROCESSING], "goes with --model"),
    ]:
        code = main(argv + ["--unit", "0", "--out", str(tmp_path), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)


def random_weights(net, seed=0):
    """He-scaled normal weights (so activations neither vanish nor explode through 22 layers), zero biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blobs in net.params.values():
            weight = blobs[0]
            fan_in = int(np.prod(weight.shape[1:]))
            weight.copy_(torch.randn(weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            for bias in blobs[1:]:
                bias.zero_()


@pytest.mark.skipif(not GOOGLENET.is_file(), reason="reference data (BVLC GoogLeNet prototxt) absent")
def test_googlenet_through_the_port(tmp_path):
    from porting.net import load_caffe

    from mfv.loop import run_facet, save_facet
    from mfv.step import FacetNet

    port = load_caffe(GOOGLENET)
    random_weights(port)
    net = FacetNet.from_caffe(port)
    assert net.preprocessing.input_size == (224, 224) and net.preprocessing.pixel_scale() is None
    # octave 0 (no margin) then the margin octave (50 of 227 -> 49 of 224), two iterations each;
    # steps of 0.25 grey levels: with random weights through 22 layers a step of 1-2 is past the
    # linear range (measured: the masked step of 2 lowers this unit, one of 0.25 raises it)
    small = dict(start_step_size=0.25, end_step_size=0.25)
    octaves = (schedule.MEAN_OCTAVES[0]._replace(iter_n=2, **small),
               schedule.MEAN_OCTAVES[2]._replace(iter_n=2, **small))
    result = run_facet(net, 7, 1, octaves, start=smooth_start(224), layer="loss3/classifier", progress=False,
                       snapshot_every=1)
    assert [r.iteration for r in result.records] == [0, 1, 2, 3]
    for snap in result.snapshots[2:]:
        g = snap.gradient
        inside = np.zeros(g.shape, bool)
        inside[:, 49:175, 49:175] = True
        assert not g[~inside].any()
        assert all(np.abs(edge).max() > 0 for edge in (g[:, 49, 49:175], g[:, 174, 49:175],
                                                        g[:, 49:175, 49], g[:, 49:175, 174]))
    for snap, record in zip(result.snapshots, result.records):
        assert objective(net, snap.after_step, "loss3/classifier", 7) > record.objective   # each step rises
    assert result.image.min() >= 0 and result.image.max() <= 255
    paths = save_facet(result, tmp_path, "googlenet")
    assert all(Path(p).is_file() for p in paths.values())


def test_cli_facets_takes_a_model(tmp_path, capsys, torch_threads):
    from PIL import Image

    means = tmp_path / "means"
    means.mkdir()
    rng = np.random.RandomState(0)
    for k in range(2):
        Image.fromarray(rng.randint(60, 200, (34, 34, 3)).astype(np.uint8)).save(means / f"mean_{k}.png")
    out = tmp_path / "out"
    code = main(["facets", "--model", f"{FIXTURE}:build", "--preprocessing", TINY_PREPROCESSING, "--layer", "fc",
                 "--unit", "2", "--means", str(means), "--threads", "1", "--out", str(out), "--no-progress",
                 "--snapshot-every", "0"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.err.count("mfv: torch on cpu, 1 thread\n") == 1
    for k in range(2):
        stem = out / "2" / f"facet_fc_0002_mean_{k}_faithful_seed1"
        trace = json.loads(Path(f"{stem}_trace.json").read_text())
        assert len(trace) == 370 and trace[-1]["objective"] > trace[0]["objective"] + 1
        image = np.load(f"{stem}.npy")
        assert image.shape == (41, 41, 3) and image.min() >= 0 and image.max() <= 255   # 34 -> zoom 1.2: 40.8
        assert Path(f"{stem}.png").is_file()
