"""`mfv compare`: MFV's loop on real Caffe 1.0 in the 2016 stack next to the PyTorch port.

Without Caffe (seconds): the measures, and the whole comparison and report machinery
against a "Caffe side" recorded from the torch loop itself, where every difference
must be exactly zero. With Caffe and a small net (seconds): the transcribed 2016 loop's
semantics. With Caffe and CaffeNet (minutes, module-scoped runs shared by the
assertions): the mean-image schedule synchronised over all 370 iterations, 20
free-running iterations through the command line with the full report, and the
centre-bias schedule synchronised over a shortened table (see CENTER_BIAS_SUBSET).

Weights: real Caffe's Xavier filler (variance 1/fan_in). With He/MSRA (variance
2/fan_in) the ReLU stack keeps the input's scale (tens of grey levels) up to fc8: on the
noise start fc8 has sd 62 and prob[498] is exactly 0.0 in float32, so the centre-bias
objective (prob) has no gradient and the 2016 step divides by zero. With Xavier fc8 has
sd 4.5 (noise start) and 4.7 (mean_0), prob[498] = 4.7e-4: neither vanishing nor saturated.
"""
import json
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mfv import schedule
from mfv.compare import (GRADIENT_AGREES, IMAGE_TOLERANCE, OBJECTIVE_TOLERANCE, CaffeRun, Comparison,
                         attribute_operations, compare_torch_side, diagnose_gradient, difference, first_beyond,
                         octave_dicts, rounding_bound, run_caffe_side, sampled, summarize, variant_of,
                         worst_gradient_iteration)
from mfv.loop import Swap, run_facet
from mfv.preprocess import Preprocessing
from mfv.schedule import Octave
from mfv.step import FacetNet, mean_numpy_1_11, means_numpy_1_11

REFERENCE_DATA = Path(__file__).resolve().parents[2] / "shared" / "reference-data"
MEAN_0 = REFERENCE_DATA / "mfv-original" / "mean_images" / "n03032252" / "mean_0.jpg"
MOVIE_THEATER = 498

SIZE = 16
SMALL_OCTAVES = (
    Octave(None, 0, 0.3, None, 3, 0.4, 0.4, 1, 2),        # integer steps: Python 2 keeps 1
    Octave("1", 0, 0.3, 1.25, 4, 0.01, 2, 1., 1.),         # zoom 16 -> 20, crops drawn, another layer
    Octave(None, 50, 0.2, 1.0, 2, 0.1, 2, 2., 2.),         # margin (of a 227 net: 4 of this 16 one)
)


# --------------------------------------------------------------------------------------
# without Caffe
# --------------------------------------------------------------------------------------

def test_measures_against_float64():
    rng = np.random.RandomState(0)
    ref = rng.uniform(-123, 151, (3, 8, 8)).astype(np.float32)
    cand = ref + rng.normal(0, 1e-3, ref.shape).astype(np.float32)
    d = difference(cand, ref)
    delta = cand.astype(np.float64) - ref.astype(np.float64)
    assert d["max_abs"] == np.abs(delta).max()
    assert d["rel_l2"] == pytest.approx(np.sqrt((delta ** 2).sum() / (ref.astype(np.float64) ** 2).sum()), rel=1e-12)
    assert d["bound"] == 2.0 ** -16                      # one ulp at 128-255
    assert rounding_bound(np.float32([0.75])) == 2.0 ** -24
    assert difference(np.zeros(3), np.zeros(3))["rel_l2"] == 0.0
    assert difference(np.ones(3), np.zeros(3))["rel_l2"] == float("inf")
    with pytest.raises(ValueError):
        difference(np.zeros(3), np.zeros(4))


def test_first_beyond_and_sampling():
    rows = [{"iteration": 0, "image": {"max_abs": 0.0, "bound": 1e-5}, "after_step": {"max_abs": 1e-5, "bound": 1e-5}},
            {"iteration": 1, "image": None, "after_step": {"max_abs": 2e-5, "bound": 1e-5}},
            {"iteration": 2, "after_denoise": {"max_abs": 2e-3, "bound": 1e-5}}]
    assert first_beyond(rows) == {"iteration": 1, "array": "after_step", "max_abs": 2e-5, "bound": 1e-5}
    assert first_beyond(rows, 1e-3)["iteration"] == 2
    assert first_beyond(rows, 1.0) is None
    assert sampled(25, 10) == [0, 10, 20, 24] and sampled(3, 0) == [0, 1, 2] and sampled(0, 5) == []


def test_octave_dicts_keep_the_originals_types():
    dicts = octave_dicts(schedule.MEAN_OCTAVES)
    assert dicts[0]["start_step_size"] == 1 and type(dicts[0]["start_step_size"]) is int
    assert type(dicts[1]["start_step_size"]) is float
    assert "scale" not in dicts[0] and dicts[1]["scale"] == 1.2 and "layer" not in dicts[0]
    assert octave_dicts(schedule.CENTER_BIAS_OCTAVES)[0]["layer"] == "prob"
    assert variant_of(schedule.MEAN_OCTAVES) == "mean" and variant_of(schedule.CENTER_BIAS_OCTAVES) == "center-bias"
    assert variant_of(SMALL_OCTAVES) is None


@pytest.fixture(scope="module")
def small_torch_net():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 6))
    return FacetNet(module, Preprocessing(input_size=(SIZE, SIZE)))


def torch_made_run(net, folder: Path, unit=2, seed=4, octaves=SMALL_OCTAVES, layer="3") -> CaffeRun:
    """A stand-in for the Caffe side, recorded from the torch loop itself (same files, same records)."""
    folder.mkdir(parents=True, exist_ok=True)
    run = CaffeRun(unit, seed, tuple(octaves), layer, 0, None, folder, input_size=(SIZE, SIZE))

    def start_from(iteration, image):
        np.save(folder / f"{iteration:04d}_image.npy", image)

    def observe(record, snap):
        for what in ("gradient", "after_step", "after_denoise"):
            np.save(folder / f"{record.iteration:04d}_{what}.npy", getattr(snap, what))
        run.records.append(dict(asdict(record), crop=list(record.crop), seconds=0.0, seconds_net=0.0,
                                seconds_tv=0.0))

    run.final = run_facet(net, unit, seed, octaves, layer=layer, progress=False, snapshot_every=0,
                          start_from=start_from, observe=observe).image
    return run


@pytest.mark.parametrize("sync", [False, True])
def test_comparison_of_a_run_with_itself_is_exact(small_torch_net, tmp_path, sync):
    twin = torch_made_run(small_torch_net, tmp_path)
    run = compare_torch_side(small_torch_net, twin, sync=sync, progress=False)
    s = summarize(run)
    assert s["iterations"] == 9 and s["crops_identical"] and s["step_sizes_identical"]
    assert s["objective_max_rel"] == 0 and s["gradient_max_rel_l2"] == 0 and s["after_step_max_abs"] == 0
    assert s["image_max_abs"] == 0 and s["first_beyond_rounding"] is None and s["first_gradient_departure"] is None
    assert s["final"]["max_abs"] == 0 and s["final"]["ssim"] == pytest.approx(1.0)
    replay = attribute_operations(small_torch_net, twin, every=2)
    assert [r["iteration"] for r in replay["iterations"]] == [0, 2, 4, 6, 8]
    assert all(r["step"]["max_abs"] == 0 and r["tv"]["max_abs"] == 0 and r["gradient"]["rel_l2"] == 0
               for r in replay["iterations"])
    assert [z["iteration"] for z in replay["zoom"]] == [3, 7] and all(z["max_abs"] == 0 for z in replay["zoom"])


def test_truncated_run_is_the_shorter_run(small_torch_net, tmp_path):
    full = torch_made_run(small_torch_net, tmp_path)
    for n in (5, 3):     # 3: an octave's end, where the next octave's zoom is not applied
        seen = full.truncated(n)
        stopped = run_facet(small_torch_net, 2, 4, SMALL_OCTAVES, layer="3", progress=False, iterations=n)
        assert seen.records == full.records[:n] and len(stopped.records) == n
        np.testing.assert_array_equal(seen.final, stopped.image)
    assert full.truncated(9) is full


def test_switches_show_in_the_comparison(small_torch_net, tmp_path):
    twin = torch_made_run(small_torch_net, tmp_path)
    s = summarize(compare_torch_side(small_torch_net, twin, swap=Swap(arithmetic="py3"), progress=False))
    assert s["crops_identical"] and not s["step_sizes_identical"] and s["denoise_weights_identical"]
    assert s["first_beyond_rounding"]["iteration"] == 1     # iteration 0's step is 1 under both divisions
    s = summarize(compare_torch_side(small_torch_net, twin, swap=Swap(rng=np.random.default_rng), progress=False))
    assert not s["crops_identical"] and s["after_step_max_abs"] is not None  # octave 0 has no crop draws


def test_report_files_and_self_contained_page(small_torch_net, tmp_path):
    from mfv.report import SCHEMA, build_report, write_report

    twin = torch_made_run(small_torch_net, tmp_path / "arrays")
    runs = {"faithful": compare_torch_side(small_torch_net, twin, progress=False),
            "modern": compare_torch_side(small_torch_net, twin, mode="modern", progress=False)}
    comparison = Comparison({"prototxt": "p", "caffemodel": None, "unit": 2, "seed": 4, "variant": "custom",
                             "octaves": octave_dicts(SMALL_OCTAVES), "layer": "3", "xy": 0, "start": "noise",
                             "sync": False, "iterations": 9, "every": 2}, twin, runs,
                            attribute_operations(small_torch_net, twin, every=2), [], {"caffe_side": {}})
    paths = write_report(comparison, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "caffe_final.npy", "compare.html", "compare.json", "torch_faithful_final.npy", "torch_modern_final.npy",
        "trajectories.png"]
    report = json.loads(paths["json"].read_text())
    assert report["schema"] == SCHEMA and len(report["runs"]["faithful"]["iterations"]) == 9
    assert report == json.loads(json.dumps(build_report(comparison) | {"created": report["created"]}))
    assert "never beyond float32 rounding" in report["verdict"]
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 6       # plot, Caffe, 2 x (torch, difference)
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing outside itself


# --------------------------------------------------------------------------------------
# with Caffe: numpy 1.11's mean, the transcription, a small net
# --------------------------------------------------------------------------------------

PY2_MEANS = r"""
import json, sys
import numpy as np
arrays = np.load("/mnt/arrays.npz")
print(json.dumps(dict((k, repr(float(arrays[k].mean()))) for k in arrays.files)))
"""


@pytest.mark.caffe
def test_mean_is_numpy_1_11s(caffe_backend, tmp_path):
    rng = np.random.RandomState(3)
    arrays = {f"a{k}": np.abs(rng.standard_cauchy(shape) * 1e-3).astype(np.float32)
              for k, shape in enumerate([(3, 227, 227)] * 12 + [(3, 50, 50), (7,), (8193,), (3, 130, 64)])}
    np.savez(tmp_path / "arrays.npz", **arrays)
    argv, env = caffe_backend.launch(["/usr/bin/python2.7", "-c", PY2_MEANS], [(tmp_path, "/mnt", "ro")])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    legacy = {k: float(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    assert {k: float(mean_numpy_1_11(a)) for k, a in arrays.items()} == legacy
    # the batched form on a stack of the twelve gradient-shaped ones, sample by sample
    stacked = [f"a{k}" for k in range(12)]
    assert means_numpy_1_11(np.stack([arrays[k] for k in stacked])).tolist() == [legacy[k] for k in stacked]
    # today's numpy differs on some of them, so the emulation is needed (measured: 7 of 16,
    # the 3x227x227 ones and the 8193-element one, which spans two of numpy 1.11's buffers)
    assert sum(float(a.mean()) != legacy[k] for k, a in arrays.items()) >= 1


@pytest.mark.caffe
def test_transcribed_tables_are_the_authors(caffe_worker):
    tables = caffe_worker.py2("mfv_legacy.tables")["tables"]
    for name, ours in (("mean", schedule.MEAN_OCTAVES), ("center-bias", schedule.CENTER_BIAS_OCTAVES)):
        assert tables[name] == octave_dicts(ours)                       # values
        steps = [[type(o[k]) for k in ("start_step_size", "end_step_size")] for o in tables[name]]
        assert steps == [[type(o.start_step_size), type(o.end_step_size)] for o in ours]  # int stays int


SMALL_PROTOTXT = """
name: "small"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 16
input_dim: 16
force_backward: true
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc8" type: "InnerProduct" bottom: "conv1" top: "fc8" inner_product_param { num_output: 6 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""
SMALL_CAFFE_OCTAVES = tuple(o._replace(layer="prob" if o.layer else None) for o in SMALL_OCTAVES)


@pytest.fixture(scope="module")
def small_caffe_net(tmp_path_factory, caffe_weights):
    from porting import load_caffe

    prototxt = tmp_path_factory.mktemp("small-net") / "small.prototxt"
    prototxt.write_text(SMALL_PROTOTXT)
    caffemodel = caffe_weights(prototxt, seed=1, filler="xavier")
    return prototxt, caffemodel, FacetNet.from_caffe(load_caffe(prototxt, caffemodel))


@pytest.mark.caffe
def test_small_net_loop_is_the_2016_loop(caffe_worker, small_caffe_net, tmp_path):
    prototxt, caffemodel, net = small_caffe_net
    caffe = run_caffe_side(caffe_worker, prototxt, caffemodel, 2, 4, SMALL_CAFFE_OCTAVES, folder=tmp_path,
                           progress=False, input_size=net.preprocessing.input_size)
    steps = [r["step_size"] for r in caffe.records]
    assert steps == [1, 1, 1, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    assert [type(s) for s in steps[:3]] == [int] * 3               # Python 2's integer '/'
    assert [r["layer"] for r in caffe.records] == ["fc8"] * 3 + ["prob"] * 4 + ["fc8"] * 2
    assert [r["image_shape"] for r in caffe.records] == [[16, 16]] * 3 + [[20, 20]] * 6
    assert caffe.final.shape == (20, 20, 3) and caffe.final.dtype == np.float32
    g = caffe.array(8, "gradient")                                 # margin 4: zero outside [4, 12)
    assert not g[:, :4].any() and not g[:, 12:].any() and g[:, 4:12, 4:12].any()
    for sync in (True, False):
        run = compare_torch_side(net, caffe, sync=sync, progress=False)
        s = summarize(run)
        assert s["crops_identical"] and s["step_sizes_identical"] and s["denoise_weights_identical"]
        assert s["objective_max_rel"] <= OBJECTIVE_TOLERANCE
        assert s["after_step_max_abs"] <= IMAGE_TOLERANCE and s["after_denoise_max_abs"] <= IMAGE_TOLERANCE
        assert run.rows[0]["image"]["max_abs"] == 0                # same noise start, drawn on both sides
    replay = attribute_operations(net, caffe, every=1)
    assert all(r["step"]["max_abs"] == 0 for r in replay["iterations"])           # numpy 1.11's step exactly
    assert all(r["tv"]["max_abs"] <= r["tv"]["bound"] for r in replay["iterations"])
    assert [z["max_abs"] for z in replay["zoom"]] == [0.0, 0.0]                   # scipy 0.17.0's zoom exactly


@pytest.mark.caffe
def test_cli_compare_on_a_small_net(caffe_worker, small_caffe_net, tmp_path, capsys):
    from mfv.cli import main

    from PIL import Image

    prototxt, caffemodel, _ = small_caffe_net
    start = tmp_path / "start.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (16, 16, 3)).astype(np.uint8)).save(start)
    out = tmp_path / "out"
    code = main(["compare", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--unit", "1",
                 "--init", str(start), "--seed", "2", "--out", str(out), "--iterations", "4", "--every", "2",
                 "--sync", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "faithful (synchronised): 4 iterations, crops identical, step sizes identical" in printed
    report = json.loads((out / "compare.json").read_text())
    assert report["settings"]["variant"] == "mean" and report["settings"]["iterations"] == 4
    assert set(report["runs"]) == {"faithful", "modern"} and report["runs"]["modern"]["sync"]
    assert [s["source"] for s in report["sources"]][:2] == ["framework arithmetic", "Python 2 step size"]
    assert report["sources"][-1]["source"] == "all of modern mode"
    with np.load(out / "snapshots.npz") as snaps:        # every 2 iterations, the first and the last
        assert sorted({k.split("/")[0] for k in snaps.files}) == ["0000", "0002", "0003"]
        assert {k.split("/", 1)[1] for k in snaps.files if k.startswith("0002/")} == {
            f"{side}/{what}" for side in ("caffe", "torch_faithful", "torch_modern")
            for what in ("input", "gradient", "after_step", "after_denoise")}
        np.testing.assert_array_equal(snaps["0002/torch_faithful/input"], snaps["0002/caffe/input"])  # synchronised
    python2_step = report["sources"][1]["per_step"]      # octave 0: step 1 (Python 2) against 1 + i/190
    assert python2_step["max"] > report["sources"][0]["per_step"]["max"]
    code = main(["compare", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--unit", "1",
                 "--out", str(out), "--iterations", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--iterations must be at least 1" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------
# with Caffe and CaffeNet (minutes)
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def caffenet(caffe_weights):
    from porting import load_caffe, models

    prototxt = models.path("caffenet")
    caffemodel = caffe_weights(prototxt, seed=0, filler="xavier")
    return prototxt, caffemodel, FacetNet.from_caffe(load_caffe(prototxt, caffemodel))


@pytest.fixture(scope="module")
def one_torch_thread():
    """On 2 shared cores one torch thread is about twice as fast per step (benchmarks/bench_mfv.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mean_image():
    if not MEAN_0.exists():
        pytest.skip(f"the authors' mean images are not here ({MEAN_0})")
    from mfv.means import load_rgb

    return load_rgb(MEAN_0)


def synchronised(worker, caffenet, folder, octaves, start, every):
    prototxt, caffemodel, net = caffenet
    caffe = run_caffe_side(worker, prototxt, caffemodel, MOVIE_THEATER, 0, octaves, start=start, folder=folder,
                           progress=False, input_size=net.preprocessing.input_size)
    run = compare_torch_side(net, caffe, sync=True, progress=False)
    return caffe, run, attribute_operations(net, caffe, every=every)


@pytest.fixture(scope="module")
def mean_sync(caffe_worker, caffenet, mean_image, one_torch_thread, tmp_path_factory):
    """All 370 iterations of the mean-image schedule from mean_0, synchronised."""
    folder = tmp_path_factory.mktemp("mean-sync")
    yield synchronised(caffe_worker, caffenet, folder, schedule.MEAN_OCTAVES, mean_image, every=10)
    shutil.rmtree(folder, ignore_errors=True)


def check_rounding_amplified(diagnosis):
    """porting.verify at a departing iteration: no layer of either framework adds more than
    float32 rounding; the net amplified it (a max-pooling winner or ReLU sign decided otherwise
    than in float64, or, for the prob objective, the softmax gradient's 1 - p cancelling as p -> 1)."""
    assert diagnosis["departure"] is None, diagnosis["verdict"]
    assert "No layer adds more than float32 rounding can explain" in diagnosis["verdict"], diagnosis["verdict"]


def check_synchronised(caffe, run, replay, iterations, worker, caffenet):
    """The issue's bounds for every iteration where both frameworks take the same discrete
    decisions; where they do not, the gradient is what departs (named, and by how much),
    and the worst such iteration is float32 rounding amplified, not an arithmetic fault."""
    s = summarize(run)
    assert s["iterations"] == len(caffe.records) == iterations
    assert s["crops_identical"] and s["step_sizes_identical"] and s["denoise_weights_identical"]
    assert s["objective_max_rel"] <= OBJECTIVE_TOLERANCE
    assert run.rows[0]["image"]["max_abs"] == 0                     # the start image, handed to both
    agrees = [row["gradient"]["rel_l2"] <= GRADIENT_AGREES for row in run.rows]
    for k, row in enumerate(run.rows):
        if agrees[k]:
            for what in ("after_step", "after_denoise"):
                assert row[what]["max_abs"] <= IMAGE_TOLERANCE, (row["iteration"], what, row[what])
        if k and agrees[k - 1]:     # the whole image entering k: step k - 1 (and a zoom) applied by torch
            assert row["image"]["max_abs"] <= IMAGE_TOLERANCE, (row["iteration"], "image", row["image"])
    # our step, TV and zoom on the Caffe side's own inputs: numpy 1.11 (step, every iteration),
    # scipy 0.17.0 (zoom) exactly; scikit-image 0.13.1 within float32 rounding (TV: float64
    # sums associated differently; measured 0 after the float32 cast). So every difference after
    # a step where the gradients depart is the gradient's.
    assert replay["steps"] == [0.0] * iterations
    assert all(r["tv"]["max_abs"] <= r["tv"]["bound"] for r in replay["iterations"])
    assert all(z["max_abs"] == 0 for z in replay["zoom"])
    worst = worst_gradient_iteration(replay)
    if worst is not None:
        prototxt, caffemodel, net = caffenet
        check_rounding_amplified(diagnose_gradient(worker, prototxt, caffemodel, caffe, worst, module=net.module))
    return s, agrees


@pytest.mark.caffe
@pytest.mark.slow
def test_mean_schedule_synchronised_all_iterations(mean_sync, caffe_worker, caffenet):
    caffe, run, replay = mean_sync
    s, agrees = check_synchronised(caffe, run, replay, 370, caffe_worker, caffenet)
    assert [r["step_size"] for r in caffe.records[:190]] == [1] * 190     # Python 2: 1 + (1 * i) / 190
    assert len(replay["zoom"]) == 2
    # the bounds above are not vacuous: measured, the gradients agree in 272 of the 370
    # iterations (there the crop after the step is within 6.1e-5 grey levels)
    assert sum(agrees) >= 1 and s["after_step_max_abs_gradient_agrees"] <= IMAGE_TOLERANCE


@pytest.mark.caffe
@pytest.mark.slow
def test_mean_schedule_free_running_with_report(caffe_worker, caffenet, mean_image, mean_sync, one_torch_thread,
                                                tmp_path, capsys):
    from mfv.cli import main

    prototxt, caffemodel, _ = caffenet
    start = tmp_path / "mean_0.png"       # the decoded start image, so both runs start from the same array
    from PIL import Image
    Image.fromarray(mean_image).save(start)
    out = tmp_path / "report"
    code = main(["compare", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--unit",
                 str(MOVIE_THEATER), "--init", str(start), "--seed", "0", "--out", str(out), "--iterations", "20",
                 "--every", "5", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "compare.json").read_text())
    caffe_sync, _, _ = mean_sync
    strip = ("seconds", "seconds_net", "seconds_tv")
    assert [{k: v for k, v in r.items() if k not in strip} for r in report["caffe"]["records"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in caffe_sync.records[:20]]   # deterministic
    free = report["runs"]["faithful"]
    s = free["summary"]
    assert not free["sync"] and s["iterations"] == 20
    assert s["crops_identical"] and s["step_sizes_identical"] and s["denoise_weights_identical"]
    departs = s["first_gradient_departure"]
    before = free["iterations"] if departs is None else free["iterations"][:departs]
    for row in before:
        assert row["objective"]["rel"] <= OBJECTIVE_TOLERANCE
        for what in ("image", "after_step", "after_denoise"):
            assert row[what]["max_abs"] <= IMAGE_TOLERANCE, (row["iteration"], what)
    if departs is not None:     # measured: iteration 0 (Caffe flips a pool2 winner and a relu4 sign)
        assert "the torch gradient first departs from Caffe's at iteration" in report["verdict"]
        check_rounding_amplified(report["diagnosis"])
        assert report["diagnosis"]["decision_notes"]
    assert [x["source"] for x in report["sources"]] == [
        "framework arithmetic", "Python 2 step size", "step casting", "TV padding", "TV today", "zoom",
        "random stream", "all of modern mode"]
    python2_step = report["sources"][1]["vs_faithful"]
    assert python2_step["max_abs"] > 1.0          # octave 0's step: 1 under Python 2, 1..1.1 under Python 3
    page = (out / "compare.html").read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "Sources of drift" in page


# The whole centre-bias schedule (530 iterations) synchronised took 19 minutes here
# (Caffe side 1.09 s per iteration, torch faithful 1.06 s, mostly its NumPy TV; 2 shared
# cores): too slow for CI. Measured once in full: crops, steps and weights identical,
# objective within 1.0e-5 relative; in the 204 iterations where the gradients agree the crop
# after the step is within 5.2e-4 grey levels; in the other 326 the prob objective's
# gradient is ill-conditioned (saturating softmax, flipped pooling winners: up to 2.9
# relative L2, 122 grey levels after a step of 11). The subset keeps every octave's kind of
# work (prob then fc8 objectives, zooms 227 -> 272 -> 326, the 50-pixel margin, the 6 -> 3
# step ramp, all with Python 2 arithmetic) with 8 iterations per octave: 40 iterations,
# 53 s on an idle machine (the whole file: 7.8 minutes, 5.4 of them the 370-iteration run).
CENTER_BIAS_SUBSET = tuple(o._replace(iter_n=8) for o in schedule.CENTER_BIAS_OCTAVES)


@pytest.mark.caffe
@pytest.mark.slow
def test_center_bias_schedule_synchronised_subset(caffe_worker, caffenet, one_torch_thread, tmp_path):
    caffe, run, replay = synchronised(caffe_worker, caffenet, tmp_path / "arrays", CENTER_BIAS_SUBSET, None, every=4)
    check_synchronised(caffe, run, replay, 40, caffe_worker, caffenet)
    shutil.rmtree(tmp_path / "arrays")
    assert [r["layer"] for r in caffe.records] == ["prob"] * 16 + ["fc8"] * 24
    assert [r["image_shape"][0] for r in caffe.records[::8]] == [227, 272, 326, 326, 326]
    assert [r["step_size"] for r in caffe.records[32:]] == [6.0 + (3.0 - 6.0) * i / 8 for i in range(8)]
