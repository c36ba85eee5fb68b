"""`mfv sweep`: many units' facets as tasks, on a local Ray cluster (2 CPUs) and in-process,
on a small Caffe net with written weights and a few iterations per facet.

A killed worker (the task kills its own process after saving a facet, once, through
``mfv.sweep.KILL_ONCE_ENV``), a killed driver and a failing task: every facet still ends
with one set of outputs, written once, and the manifest says what happened.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfv import schedule
from mfv.cli import main
from mfv.sweep import KILL_ONCE_ENV, Model, Settings, find_units, run_sweep
from porting.errors import PortingError
from mfv_nets import write_small_net

ITERATIONS = 3
FACET_FILES = ("facet_{f}.png", "facet_{f}.npy", "facet_{f}_trace.json", "facet_{f}_snapshots.npz",
               "facet_{f}.json", "mean_{f}.png")


def write_inputs(folder: Path, units=(0, 1, 2), facets: int = 2) -> dict:
    """A small net (24 x 24 input, 6 fc8 units, seeded weights) and a means root with one
    numbered folder per unit holding mean_0.png ... (random 26 x 26 images)."""
    prototxt, caffemodel = write_small_net(folder)
    rng = np.random.RandomState(1)
    root = folder / "means"
    for unit in units:
        (root / str(unit)).mkdir(parents=True, exist_ok=True)
        for f in range(facets):
            image = rng.randint(0, 256, (26, 26, 3)).astype(np.uint8)
            Image.fromarray(image).save(root / str(unit) / f"mean_{f}.png")
    return {"prototxt": prototxt, "caffemodel": caffemodel, "root": root}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("sweep_inputs"))


@pytest.fixture(scope="module")
def kill_marker(tmp_path_factory):
    """The file whose removal arms one worker's suicide (set before Ray starts, so every
    worker inherits the variable; absent, it does nothing)."""
    return tmp_path_factory.mktemp("kill") / "kill-once"


@pytest.fixture(scope="module")
def ray_cluster(kill_marker):
    ray = pytest.importorskip("ray")
    os.environ[KILL_ONCE_ENV] = str(kill_marker)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    del os.environ[KILL_ONCE_ENV]


def model_of(inputs) -> Model:
    return Model(str(inputs["prototxt"]), str(inputs["caffemodel"]))


def sweep_args(inputs, out, units="0-2", facets=2, *extra) -> list[str]:
    return ["sweep", "--prototxt", str(inputs["prototxt"]), "--caffemodel", str(inputs["caffemodel"]),
            "--means-root", str(inputs["root"]), "--units", units, "--facets", str(facets), "--out", str(out),
            "--iterations", str(ITERATIONS), "--seed", "5", "--no-progress", *extra]


def outputs(out: Path) -> dict[str, list[str]]:
    """Every file under each unit folder (temporary files included, were any left)."""
    return {d.name: sorted(p.name for p in d.iterdir()) for d in sorted(out.iterdir()) if d.is_dir()}


def expected_outputs(units, facets) -> dict[str, list[str]]:
    return {str(u): sorted(name.format(f=f) for f in range(facets) for name in FACET_FILES) for u in units}


def records(out: Path) -> dict:
    return {(int(u), int(f)): r for u, by in json.loads((out / "manifest.json").read_text())["facets"].items()
            for f, r in by.items()}


def batch_facets(inputs, unit, facets, seed=5):
    """The facets of one task as `mfv facets` computes them, one batch (RGB float32 each)."""
    from porting.net import load_caffe

    from mfv.batch import run_facets
    from mfv.means import load_rgb
    from mfv.step import FacetNet

    net = FacetNet.from_caffe(load_caffe(inputs["prototxt"], inputs["caffemodel"]))
    tasks = [(unit, seed, load_rgb(inputs["root"] / str(unit) / f"mean_{f}.png").astype(np.float32)) for f in facets]
    return [r.image for r in run_facets(net, tasks, schedule.MEAN_OCTAVES, layer="fc8", progress=False,
                                        snapshot_every=0, iterations=ITERATIONS)]


def test_units_and_folders(inputs, tmp_path):
    found = find_units(inputs["root"], [0, 2], 2)
    assert [u.unit for u in found] == [0, 2] and found[1].means[1].endswith("2/mean_1.png")
    assert found[0].name is None and found[0].synset is None
    with pytest.raises(PortingError, match="no folder of mean images for unit 5"):
        find_units(inputs["root"], [5], 2)
    with pytest.raises(PortingError, match="no mean_2 image"):
        find_units(inputs["root"], [0], 3)
    # folders named by synset id, names from a synset list
    root = tmp_path / "by_synset"
    (root / "n02").mkdir(parents=True)
    for f in range(2):
        np.save(root / "n02" / f"mean_{f}.npy", np.full((24, 24, 3), 100.0))
    synsets = tmp_path / "synset_words.txt"
    synsets.write_text("n00 zero\nn01 one, uno\nn02 theater curtain, theatre curtain\n")
    [unit] = find_units(root, [2], 2, synsets)
    assert (unit.name, unit.synset, Path(unit.means[0]).name) == ("theater curtain", "n02", "mean_0.npy")
    with pytest.raises(PortingError, match="unit 7 has no line"):
        find_units(root, [7], 2, synsets)


def test_in_process_sweep_is_mfv_facets_and_a_rerun_does_nothing(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(sweep_args(inputs, out, "0,2", 2, "--no-ray")) == 0
    assert "4 facets run now, 4 done" in capsys.readouterr().out
    assert outputs(out) == expected_outputs([0, 2], 2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][0]["executor"] == "in-process" and manifest["failed"] == []
    assert manifest["settings"]["seed"] == 5 and manifest["settings"]["iterations"] == ITERATIONS
    for unit in (0, 2):
        for facet, image in enumerate(batch_facets(inputs, unit, [0, 1])):
            np.testing.assert_array_equal(np.load(out / str(unit) / f"facet_{facet}.npy"), image)
    for (unit, facet), record in records(out).items():
        trace = json.loads((out / str(unit) / f"facet_{facet}_trace.json").read_text())
        assert len(trace) == record["iterations"] == ITERATIONS and record["objective"] == trace[-1]["objective"]
        assert record["seed"] == 5 and record["start"].endswith(f"{unit}/mean_{facet}.png")
    before = records(out)
    assert main(sweep_args(inputs, out, "0,2", 2, "--no-ray")) == 0
    assert "0 facets run now, 4 done" in capsys.readouterr().out
    assert records(out) == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["facets_planned"] for r in manifest["runs"]] == [4, 0]
    # other settings into the same folder: refused, nothing run
    assert main(sweep_args(inputs, out, "0,2", 2, "--no-ray", "--mode", "modern")) == 2
    assert "mode differ" in capsys.readouterr().err


def test_a_killed_driver_resumes_with_only_the_rest(inputs, tmp_path, capsys):
    out, marker = tmp_path / "out", tmp_path / "kill-once"
    marker.touch()
    env = {**os.environ, KILL_ONCE_ENV: str(marker)}
    # in-process, the driver is the worker: it kills itself after saving unit 0's facet 0
    killed = subprocess.run([sys.executable, "-m", "mfv", *sweep_args(inputs, out, "0-2", 2, "--no-ray",
                                                                      "--facets-per-task", "2")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9 and not marker.exists()
    assert outputs(out) == {"0": sorted(name.format(f=0) for name in FACET_FILES)}
    first = json.loads((out / "0" / "facet_0.json").read_text())
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "0").iterdir()}
    assert main(sweep_args(inputs, out, "0-2", 2, "--no-ray", "--facets-per-task", "2")) == 0
    assert "5 facets run now, 6 done" in capsys.readouterr().out
    assert outputs(out) == expected_outputs([0, 1, 2], 2)
    done = records(out)
    assert done[(0, 0)] == first
    assert done[(0, 0)]["worker"]["pid"] != done[(0, 1)]["worker"]["pid"] == os.getpid()
    assert all((out / "0" / name).stat().st_mtime_ns == ns for name, ns in stamp.items())  # not written again
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(r["facets_planned"], r["finished"] is not None) for r in manifest["runs"]] == [(6, False), (5, True)]


def test_ray_sweep_survives_a_killed_worker(inputs, ray_cluster, kill_marker, tmp_path):
    out = tmp_path / "out"
    kill_marker.touch()
    units = find_units(inputs["root"], [0, 1, 2], 2)
    outcome = run_sweep(model_of(inputs), Settings(iterations=ITERATIONS, seed=5), units, out, facets=2,
                        facets_per_task=2, progress=False)
    assert not kill_marker.exists(), "no worker was killed"
    assert outcome.failed == [] and outcome.ran == 6
    assert outputs(out) == expected_outputs([0, 1, 2], 2)
    done = records(out)
    assert sorted(done) == [(u, f) for u in range(3) for f in range(2)]
    # the killed task's retry ran on another worker and did not run the facet saved before the kill
    split = [u for u in range(3) if done[(u, 0)]["worker"]["pid"] != done[(u, 1)]["worker"]["pid"]]
    assert len(split) == 1
    assert done[(split[0], 1)]["task_facets"] == 1 and done[(split[0], 0)]["task_facets"] == 2
    assert all(r["worker"]["pid"] != os.getpid() for r in done.values())
    assert "ray" in outcome.manifest["runs"][-1]["executor"] and "ray" in outcome.manifest["versions"]
    whole = next(u for u in range(3) if u != split[0])   # a task the kill did not split: as in-process
    np.testing.assert_array_equal(np.load(out / str(whole) / "facet_1.npy"), batch_facets(inputs, whole, [0, 1])[1])
    again = run_sweep(model_of(inputs), Settings(iterations=ITERATIONS, seed=5), units, out, facets=2,
                      progress=False)
    assert again.ran == 0 and records(out) == done


def test_ray_sweep_interrupted_then_resumed(inputs, ray_cluster, tmp_path):
    out = tmp_path / "out"
    units = find_units(inputs["root"], [0, 1, 2], 2)
    settings = Settings(iterations=ITERATIONS, seed=5)
    first = run_sweep(model_of(inputs), settings, units, out, facets=2, facets_per_task=1, stop_after=2,
                      progress=False, gallery=False)
    assert first.ran == 2 and sorted(records(out)) == [(0, 0), (0, 1)]
    before = records(out)
    second = run_sweep(model_of(inputs), settings, units, out, facets=2, facets_per_task=1, progress=False)
    assert second.ran == 4 and outputs(out) == expected_outputs([0, 1, 2], 2)
    after = records(out)
    assert {k: after[k] for k in before} == before
    assert min(after[k]["finished"] for k in after if k not in before) > max(r["finished"] for r in before.values())
    assert [r["facets_planned"] for r in second.manifest["runs"]] == [2, 4]
    # six tasks on two CPUs: a worker process served several and loaded the net once
    pids = {r["worker"]["pid"] for r in after.values()}
    assert len(pids) <= 3 and all(r["worker"]["net_loads"] == 1 for r in after.values())


def test_a_failing_task_is_retried_reported_and_the_rest_finish(inputs, ray_cluster, tmp_path, capsys):
    root = tmp_path / "means"
    for unit in (0, 1):
        (root / str(unit)).mkdir(parents=True)
        for f in range(2):
            shutil.copy(inputs["root"] / str(unit) / f"mean_{f}.png", root / str(unit) / f"mean_{f}.png")
    (root / "1" / "mean_1.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    args = sweep_args(inputs, out, "0-1", 2, "--facets-per-task", "1", "--retries", "1")
    args[args.index("--means-root") + 1] = str(root)
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "3 facets run now, 3 done" in captured.out and "1 tasks failed" in captured.out
    assert "unit 1 facets 1: PortingError:" in captured.err and "cannot read image" in captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    [failed] = manifest["failed"]
    assert failed["unit"] == 1 and failed["facets"] == [1] and "cannot read image" in failed["error"]
    assert sorted(records(out)) == [(0, 0), (0, 1), (1, 0)]
    assert not (out / "1" / "facet_1.png").exists()
    # fixed, a rerun does only that facet and clears the failure
    shutil.copy(inputs["root"] / "1" / "mean_1.png", root / "1" / "mean_1.png")
    assert main(args) == 0
    assert "1 facets run now, 4 done" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["failed"] == []


def test_a_task_the_cluster_cannot_hold_is_refused(inputs, ray_cluster, tmp_path, capsys):
    assert main(sweep_args(inputs, tmp_path / "out", "0", 2, "--gpus-per-task", "1")) == 2
    assert "a task asks for 1 GPUs and the Ray cluster has 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_in_process_sweep_on_cuda(inputs, tmp_path):
    out = tmp_path / "out"
    model = Model(str(inputs["prototxt"]), str(inputs["caffemodel"]), device="cuda")
    outcome = run_sweep(model, Settings(iterations=ITERATIONS, seed=5), find_units(inputs["root"], [0], 2), out,
                        facets=2, use_ray=False, progress=False)
    assert outcome.ran == 2 and all(r["worker"]["device"] == "cuda" for r in records(out).values())
    # the same crops and steps; float32 rounding of another device moves pixels far less than a grey level
    for f, image in enumerate(batch_facets(inputs, 0, [0, 1])):
        assert np.abs(np.load(out / "0" / f"facet_{f}.npy") - image).max() < 1.0


def test_bad_input_is_one_line(inputs, tmp_path, capsys):
    assert main(sweep_args(inputs, tmp_path / "out", "0-9", 2, "--no-ray")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no folder of mean images for unit 3" in err[0]
    assert main(sweep_args(inputs, tmp_path / "out", "0", 2, "--no-ray", "--address", "somewhere:6379")) == 2
    assert "--address and --no-ray" in capsys.readouterr().err
    (tmp_path / "means" / "6").mkdir(parents=True)
    shutil.copy(inputs["root"] / "0" / "mean_0.png", tmp_path / "means" / "6" / "mean_0.png")
    assert main(sweep_args({**inputs, "root": tmp_path / "means"}, tmp_path / "out", "6", 1, "--no-ray")) == 2
    assert "--units: unit 6 is out of range: fc8 has 6 units" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    assert main(sweep_args(inputs, tmp_path / "junk", "0", 2, "--no-ray")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("mfv: torch on")]
    assert len(err) == 1 and "manifest.json: cannot read the sweep manifest" in err[0]
    assert not (tmp_path / "out").exists()
