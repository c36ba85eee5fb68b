"""Golden reference files (porting.verify.reference): dumped once with real Caffe 1.0, then
`porting verify --reference` without the legacy stack reaches the live verdict.

The golden verify runs where the legacy root points at a folder that does not exist (and
the chroot backend is forced), so a worker could not start: any attempt would fail.
A seeded bug (mutations.py's, injected into the port as it loads) fails against the
golden file as it fails live, at the same layer. A hostile golden file (another
caffemodel, truncated, a pickled member, another schema version, a missing array, a
foreign npz) exits 2 with one line naming the file.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mutations as M
from porting.cli import main
from porting.cli_verify import dump_reference
from porting.verify.reference import SCHEMA, SCHEMA_VERSION, read_golden

pytestmark = pytest.mark.caffe
ROOT = Path(__file__).resolve().parents[1]
MFV = M.NETS["caffenet"].prototxt

SMALL = """name: "small"
input: "data"
input_shape { dim: 2 dim: 3 dim: 12 dim: 12 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

_CAFFELESS = {"PORTING_LEGACY_ROOT": "/nonexistent/porting-legacy-root", "PORTING_BACKEND": "chroot"}


@pytest.fixture(scope="module")
def small(tmp_path_factory, caffe_weights):
    """(prototxt, caffemodel, golden) for the small net, the golden file by the CLI at batch 3."""
    folder = tmp_path_factory.mktemp("golden-small")
    prototxt = folder / "small.prototxt"
    prototxt.write_text(SMALL)
    weights = caffe_weights(prototxt, seed=3, filler="msra", bias_filler="gaussian", bias_std=0.1)
    golden = folder / "small.npz"
    assert main(["reference", "dump", str(prototxt), str(weights), "--batch", "3", "--seed", "5",
                 "--objective", "fc:2", "-o", str(golden)]) == 0
    return prototxt, weights, golden


def _verify_caffeless(prototxt, caffemodel, golden, report, *extra, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), **_CAFFELESS}
    return subprocess.run([sys.executable, "-m", "porting", "verify", str(prototxt), str(caffemodel),
                           "--reference", str(golden), "--report", str(report), *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _rows(report_dir) -> list[tuple]:
    report = json.loads((Path(report_dir) / "report.json").read_text())
    return [(r["key"], r["passed"], r.get("max_abs"), r.get("max_rel"), r.get("rel_l2"), r["vs_float64"])
            for r in report["rows"]]


def _report(report_dir) -> dict:
    return json.loads((Path(report_dir) / "report.json").read_text())


def _same_verdict(live, golden) -> None:
    a, b = _report(live), _report(golden)
    assert (a["passed"], a["exit_status"], a["summary"], a["departure"]) == \
           (b["passed"], b["exit_status"], b["summary"], b["departure"])
    assert _rows(live) == _rows(golden)
    assert a["inputs"]["batch"] == b["inputs"]["batch"] and a["objective"] == b["objective"]


def test_golden_file_contents(small, capsys):
    prototxt, weights, path = small
    golden = read_golden(path)
    prov = golden.provenance
    assert (prov["schema"], prov["schema_version"]) == (SCHEMA, SCHEMA_VERSION)
    assert prov["caffe"]["versions"]["caffe"] == "1.0.0" and prov["caffe"]["versions"]["blas"]
    assert prov["run"]["objective"] == "fc:2" and prov["run"]["inputs"]["seed"] == 5
    assert golden.inputs["data"].shape == (3, 3, 12, 12) and golden.inputs["data"].dtype == np.float32
    # every forward value, each layer's own (pre-in-place) output and the gradients
    for key in ("blob/conv1/data", "top/conv1/0/data", "top/relu1/0/data", "blob/data/diff", "top/fc/0/diff"):
        assert golden.arrays[key].shape[0] == 3, key
    assert not np.array_equal(golden.arrays["top/conv1/0/data"], golden.arrays["blob/conv1/data"])  # ReLU in place
    seed = golden.arrays["blob/fc/diff"]
    assert seed.shape == (3, 5) and np.array_equal(seed, np.eye(5, dtype=np.float32)[[2, 2, 2]])
    golden.check_model(prototxt, weights)
    assert main(["reference", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "porting-golden version 1" in shown and "caffe 1.0.0" in shown and "objective fc:2, batch 3" in shown


def test_small_net_same_verdict_without_caffe(small, tmp_path):
    prototxt, weights, golden = small
    assert main(["verify", str(prototxt), str(weights), "--batch", "3", "--seed", "5", "--objective", "fc:2",
                 "--report", str(tmp_path / "live")]) == 0
    done = _verify_caffeless(prototxt, weights, golden, tmp_path / "golden")
    assert done.returncode == 0, done.stderr
    assert "legacy Caffe" not in done.stderr  # no backend was even looked for
    _same_verdict(tmp_path / "live", tmp_path / "golden")
    assert _report(tmp_path / "golden")["inputs"]["reference"]["schema_version"] == SCHEMA_VERSION


def test_golden_file_travels_to_other_kernels(small, tmp_path):
    """Dumped with OpenBLAS forced to its SSE3 (Prescott) kernels, verified with PyTorch's
    default (no AVX) kernels: the verdict rests on rounding bounds, not on the machine."""
    prototxt, weights, _ = small
    golden = tmp_path / "prescott.npz"
    env = {**os.environ, "OPENBLAS_CORETYPE": "Prescott", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "porting", "reference", "dump", str(prototxt), str(weights),
                           "--batch", "3", "--seed", "5", "--objective", "fc:2", "-o", str(golden)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    machine = read_golden(golden).provenance["machine"]
    assert machine["blas_environment"]["OPENBLAS_CORETYPE"] == "Prescott"
    assert main(["verify", str(prototxt), str(weights), "--batch", "3", "--seed", "5", "--objective", "fc:2",
                 "--no-onnx", "--report", str(tmp_path / "live")]) == 0
    done = _verify_caffeless(prototxt, weights, golden, tmp_path / "golden", "--no-onnx",
                             env={"ATEN_CPU_CAPABILITY": "default"})
    assert done.returncode == 0, done.stderr
    live, moved = _report(tmp_path / "live"), _report(tmp_path / "golden")
    assert (live["passed"], live["departure"]) == (moved["passed"], moved["departure"]) == (True, None)
    assert [r["key"] for r in live["rows"]] == [r["key"] for r in moved["rows"]]


def _seed_bug(monkeypatch, mutate, layer):
    """Every net loaded from now on is the port with ``mutate(net, layer)`` applied."""
    import porting.net

    original = porting.net.load_caffe

    def load_caffe(*args, **kwargs):
        net = original(*args, **kwargs)
        mutate(net, layer)
        return net

    monkeypatch.setattr(porting.net, "load_caffe", load_caffe)


def test_small_net_seeded_bug_fails_against_golden(small, tmp_path, monkeypatch):
    prototxt, weights, golden = small
    _seed_bug(monkeypatch, M.lrn_alpha_whole, "norm1")
    assert main(["verify", str(prototxt), str(weights), "--batch", "3", "--seed", "5", "--objective", "fc:2",
                 "--no-onnx", "--report", str(tmp_path / "live")]) == 1
    for name, value in _CAFFELESS.items():
        monkeypatch.setenv(name, value)
    assert main(["verify", str(prototxt), str(weights), "--reference", str(golden), "--no-onnx",
                 "--report", str(tmp_path / "golden")]) == 1
    _same_verdict(tmp_path / "live", tmp_path / "golden")
    assert _report(tmp_path / "golden")["departure"]["layer"] == "norm1"


TRAIN_NET = """name: "tv"
layer { name: "data" type: "Data" top: "data" top: "label"
  data_param { source: "nowhere_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "drop1" type: "Dropout" bottom: "conv1" top: "conv1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_data_layers_train_phase_settings_travel_in_the_golden_file(caffe_weights, tmp_path):
    """--input-shape, --phase train and --dropout-seed are stored and reused: the golden
    verify of a net with a Data layer and TRAIN Dropout matches the live one."""
    from porting.layers.data_layers import caffe_net_with_inputs
    from porting.net import load_caffe
    from porting.write import write_prototxt

    prototxt = tmp_path / "tv.prototxt"
    prototxt.write_text(TRAIN_NET)
    twin = tmp_path / "with_inputs.prototxt"
    write_prototxt(twin, caffe_net_with_inputs(load_caffe(prototxt, input_shapes={"data": (2, 3, 8, 8)}).graph))
    weights = caffe_weights(twin, seed=6, filler="msra", bias_filler="gaussian", bias_std=0.1)
    run = ["--input-shape", "data=2,3,8,8", "--phase", "train", "--dropout-seed", "11"]
    golden = tmp_path / "tv.npz"
    assert main(["reference", "dump", str(prototxt), str(weights), *run, "-o", str(golden)]) == 0
    stored = read_golden(golden)
    assert stored.run["input_shapes"] == {"data": [2, 3, 8, 8]} and stored.run["dropout_seed"] == 11
    assert stored.arrays["blob/loss/data"].shape == ()  # Caffe's loss top has no axes; so does its copy
    labels = stored.inputs["label"]
    assert labels.shape == (2,) and set(labels) <= set(range(5))
    assert main(["verify", str(prototxt), str(weights), *run, "--no-onnx", "--report", str(tmp_path / "live")]) == 0
    done = _verify_caffeless(prototxt, weights, golden, tmp_path / "golden", "--no-onnx")
    assert done.returncode == 0, done.stderr
    _same_verdict(tmp_path / "live", tmp_path / "golden")
    dropped = stored.arrays["top/drop1/0/data"]
    assert 0 < np.count_nonzero(dropped) < np.count_nonzero(stored.arrays["top/relu1/0/data"])


# ---------------------------------------------------------------------------- hostile files

def _members(path) -> dict:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _provenance(members) -> dict:
    return json.loads(members["provenance.json"].tobytes())


def _with_provenance(members, prov) -> dict:
    return {**members, "provenance.json": np.frombuffer(json.dumps(prov).encode(), np.uint8)}


def _drop(members, key, from_manifest=False):
    out = {k: v for k, v in members.items() if k != key}
    if from_manifest:
        prov = _provenance(out)
        del prov["arrays"][key]
        out = _with_provenance(out, prov)
    return out


def _replace(members, key, new_key, value):
    """``key`` becomes ``new_key`` holding ``value``, in the members and the manifest alike."""
    out = {k: v for k, v in members.items() if k != key}
    prov = _provenance(out)
    del prov["arrays"][key]
    prov["arrays"][new_key] = {"shape": list(value.shape), "dtype": "<f4"}
    out[new_key] = value
    return _with_provenance(out, prov)


def _schema(members, version):
    prov = _provenance(members)
    prov["schema_version"] = version
    return _with_provenance(members, prov)


def _pickled(members):
    return {**members, "blob/fc/data": np.array([{"a": 1}, None], dtype=object)}


HOSTILE = {
    "truncated": (None, "not an intact npz archive"),
    "pickled": (_pickled, "blob/fc/data: holds Python objects (a pickle): not read"),
    "schema-2": (lambda m: _schema(m, 2), "schema version 2; this harness reads version 1"),
    "schema-0": (lambda m: _schema(m, 0), "schema version 0"),
    "missing-member": (lambda m: _drop(m, "top/conv1/0/diff"), "top/conv1/0/diff: missing: the manifest"),
    "missing-array": (lambda m: _drop(m, "blob/pool1/data", True), "missing array blob/pool1/data"),
    "missing-input": (lambda m: _drop(m, "input/data", True), "holds no input"),
    "foreign-npz": (lambda m: {"blob/fc/data": m["blob/fc/data"]}, "no provenance.json member"),
    "float64": (lambda m: {**m, "blob/fc/data": m["blob/fc/data"].astype(np.float64)}, "dtype <f8, expected <f4"),
    "bad-shape": (lambda m: {**m, "blob/fc/data": m["blob/fc/data"][:1]}, "shape 1x5, the manifest says 3x5"),
    "input-shape": (lambda m: _replace(m, "input/data", "input/data", np.zeros((3, 3, 10, 10), np.float32)),
                    "input/data: shape 3x3x10x10 does not fit the input 3x12x12 (per item)"),
    "input-renamed": (lambda m: _replace(m, "input/data", "input/pixels", m["input/data"]),
                      "input/data: inputs pixels do not match the net's (data)"),
    "worker-npz": (lambda m: _with_provenance(m, _provenance(m)["caffe"]),  # the worker's own result file
                   "schema None, not porting-golden: not a golden reference file"),
    "not-zip": (lambda m: b"golden\n", "cannot read: not an intact npz archive"),
    "compressed": (lambda m: _saved(m, np.savez_compressed), "compressed member"),
    "no-run": (lambda m: _with_provenance(m, {k: v for k, v in _provenance(m).items() if k != "run"}),
               "provenance.json run: missing or not a JSON object"),
}


def _saved(members, save=np.savez) -> bytes:
    buf = io.BytesIO()
    save(buf, **members)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_golden_file_exit_2_one_line(small, tmp_path, monkeypatch, capsys, case):
    prototxt, weights, golden = small
    change, words = HOSTILE[case]
    bad = tmp_path / f"{case}.npz"
    if change is None:
        data = golden.read_bytes()
        bad.write_bytes(data[: len(data) * 2 // 3])
    else:
        changed = change(_members(golden))
        bad.write_bytes(changed if isinstance(changed, bytes) else _saved(changed))
    for name, value in _CAFFELESS.items():
        monkeypatch.setenv(name, value)
    assert main(["verify", str(prototxt), str(weights), "--reference", str(bad), "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"porting: {bad}: ") and words in err, err
    assert not (tmp_path / "r").exists()


def test_golden_of_another_caffemodel_or_prototxt_exit_2(small, caffe_weights, tmp_path, monkeypatch, capsys):
    prototxt, weights, golden = small
    other = caffe_weights(prototxt, seed=4, filler="msra", bias_filler="gaussian", bias_std=0.1)
    renamed = tmp_path / "small.prototxt"
    renamed.write_text(SMALL.replace('name: "small"', 'name: "small2"'))
    for name, value in _CAFFELESS.items():
        monkeypatch.setenv(name, value)
    for args, place in (([prototxt, other], "net.caffemodel_sha256"), ([renamed, weights], "net.prototxt_sha256")):
        assert main(["verify", *map(str, args), "--reference", str(golden), "--report", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"porting: {golden}: {place}: was dumped from another"), err
    assert main(["verify", str(prototxt), str(weights), "--reference", str(golden), "--batch", "2",
                 "--report", str(tmp_path / "r")]) == 2
    assert "--batch is not taken with --reference" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_manifest_cannot_hide_a_huge_member(small, tmp_path):
    """A member whose header declares more than it holds is refused before its data is read."""
    prototxt, weights, golden = small
    members = _members(golden)
    bad = tmp_path / "huge.npz"
    with zipfile.ZipFile(golden) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "blob/fc/data.npy":
                buf = io.BytesIO()
                np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                                           "shape": (1 << 20, 1 << 20)})
                data = buf.getvalue() + data[len(buf.getvalue()):]
            dst.writestr(info.filename, data)
    assert members["blob/fc/data"].shape == (3, 5)
    with pytest.raises(Exception) as err:
        read_golden(bad)
    assert "blob/fc/data: declares shape 1048576x1048576, more than the member holds" in str(err.value)


def test_dump_is_atomic_on_refusal(small, tmp_path, capsys):
    prototxt, weights, _ = small
    out = tmp_path / "g.npz"
    assert main(["reference", "dump", str(prototxt), str(weights), "--objective", "nope", "-o", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- MFV CaffeNet

@pytest.fixture(scope="module")
def mfv(tmp_path_factory, caffe_worker, caffe_weights):
    if not MFV.exists():
        pytest.skip("MFV CaffeNet prototxt absent (shared reference data)")
    weights = caffe_weights(MFV, seed=0, filler="msra", bias_filler="gaussian", bias_std=0.1)
    golden = tmp_path_factory.mktemp("golden-mfv") / "caffenet.npz"
    dump_reference(MFV, weights, golden, objective="fc8:498", worker=caffe_worker)
    return weights, golden


def test_mfv_caffenet_same_verdict_and_seeded_bug(mfv, tmp_path, monkeypatch):
    weights, golden = mfv
    args = [str(MFV), str(weights), "--no-onnx"]
    assert main(["verify", *args, "--objective", "fc8:498", "--report", str(tmp_path / "live")]) == 0
    done = _verify_caffeless(MFV, weights, golden, tmp_path / "golden", "--no-onnx")
    assert done.returncode == 0, done.stderr
    _same_verdict(tmp_path / "live", tmp_path / "golden")
    assert len(_rows(tmp_path / "golden")) >= 70

    _seed_bug(monkeypatch, M.lrn_alpha_whole, "norm1")
    assert main(["verify", *args, "--objective", "fc8:498", "--report", str(tmp_path / "live-bug")]) == 1
    for name, value in _CAFFELESS.items():
        monkeypatch.setenv(name, value)
    assert main(["verify", *args, "--reference", str(golden), "--report", str(tmp_path / "golden-bug")]) == 1
    _same_verdict(tmp_path / "live-bug", tmp_path / "golden-bug")
    assert _report(tmp_path / "golden-bug")["departure"]["layer"] == "norm1"
