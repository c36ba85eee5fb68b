"""`mfv compare`'s noise floor: the Caffe side run again under another OpenBLAS kernel path.

Without Caffe: the measures (``distance``) and the rule (``floor_verdict``) on constructed
numbers, the choice of the other kernel. With Caffe and a small net (seconds): a free-running
compare through the command line computes the floor for real with two Caffe runs under
different OpenBLAS kernels and thread counts; where one kernel uses fused multiply-add and
the other does not (Zen against Sandybridge here; Sandybridge against Haswell when
OPENBLAS_CORETYPE=SandyBridge is the default), the two Caffe runs differ bitwise (measured:
from iteration 0 on). Two kernels without FMA may round alike (measured: Sandybridge and
Prescott gave the same bits on this small net), so on a CPU without FMA that assertion is
replaced by checking the CPU lacks it. The JSON has the fields, and the verdict follows the rule.
"""
import json

import numpy as np
import pytest

from mfv.compare import (FLOOR_SIGMAS, OTHER_CORES, cpu_flags, differs_in_fma, distance,
                         floor_verdict, other_core)
from test_mfv_compare import SMALL_PROTOTXT


def measures(ssim, mean_abs, ssim_se=0.0, mean_abs_se=0.0, max_abs=10.0):
    return {"ssim": ssim, "mean_abs": mean_abs, "ssim_se": ssim_se, "mean_abs_se": mean_abs_se,
            "max_abs": max_abs}


def test_rule_on_constructed_numbers():
    # the numbers (port against Caffe, Caffe against itself under Sandybridge), no spread
    port, caffe = measures(0.732, 4.58, max_abs=125.6), measures(0.729, 4.53, max_abs=99.5)
    v = floor_verdict(port, caffe)
    assert v["ssim"]["within"] and not v["mean_abs"]["within"] and not v["within"]     # 4.58 > 4.53 + 0
    assert v["sentence"].startswith("The port is beyond Caffe's own noise floor")
    # with a spread, the margin is FLOOR_SIGMAS combined standard errors
    port["mean_abs_se"], caffe["mean_abs_se"] = 0.03, 0.04
    v = floor_verdict(port, caffe)
    assert v["mean_abs"]["margin"] == pytest.approx(FLOOR_SIGMAS * 0.05)
    assert v["within"] and v["sentence"].startswith("The port is within Caffe's own noise floor")
    # max |diff| does not decide
    assert floor_verdict(measures(0.9, 1.0, max_abs=1e6), measures(0.9, 1.0, max_abs=1.0))["within"]
    # each measure decides on its own, just inside and just outside the margin
    for ssim, within in ((0.70 - 2 * 0.005 + 1e-9, True), (0.70 - 2 * 0.005 - 1e-9, False)):
        v = floor_verdict(measures(ssim, 1.0, ssim_se=0.003), measures(0.70, 1.0, ssim_se=0.004))
        assert v["ssim"]["within"] is within and v["within"] is within and v["mean_abs"]["within"]
    for mean_abs, within in ((2.0 + 2 * 0.5 - 1e-9, True), (2.0 + 2 * 0.5 + 1e-9, False)):
        v = floor_verdict(measures(0.5, mean_abs, mean_abs_se=0.3), measures(0.5, 2.0, mean_abs_se=0.4))
        assert v["mean_abs"]["within"] is within and v["within"] is within


def test_rule_pairs_the_tiles():
    # both pairs drift most in the same tiles: the pairing removes that shared spread
    base = list(np.linspace(0.2, 0.9, 64))
    caffe = dict(measures(float(np.mean(base)), 1.0, ssim_se=0.03), ssim_tiles=base, mean_abs_tiles=[1.0] * 64)
    shift = [b - 0.01 + (0.001 if k % 2 else -0.001) for k, b in enumerate(base)]
    port = dict(measures(float(np.mean(shift)), 1.0, ssim_se=0.03), ssim_tiles=shift, mean_abs_tiles=[1.0] * 64)
    v = floor_verdict(port, caffe)
    assert v["ssim"]["margin"] == pytest.approx(2 * np.std(np.subtract(shift, base), ddof=1) / 8)
    assert v["ssim"]["margin"] < 0.001 and not v["ssim"]["within"] and not v["within"]   # 0.01 lower everywhere
    assert floor_verdict(dict(port, ssim_tiles=None), caffe)["within"]    # unpaired: margin 2 * 0.042


def test_distance_measures():
    rng = np.random.RandomState(0)
    a = rng.uniform(0, 255, (40, 48, 3))
    same = distance(a, a)
    assert same["ssim"] == pytest.approx(1.0) and same["mean_abs"] == 0 and same["max_abs"] == 0
    assert same["mean_abs_se"] == 0
    b = a.copy()
    b[:20] += 3.0                              # the top half off by 3 grey levels
    d = distance(b, a)
    assert d["mean_abs"] == pytest.approx(1.5) and d["max_abs"] == pytest.approx(3.0)
    # 8 x 8 tiles: 4 rows of tiles at 3, 4 at 0: standard deviation of the 64 tile means / 8
    assert d["mean_abs_se"] == pytest.approx(np.std([3.0] * 32 + [0.0] * 32, ddof=1) / 8)
    assert d["ssim"] < 1 and d["ssim_se"] > 0


def test_other_core():
    fma = {"avx", "avx2", "fma"}
    assert other_core("Zen", fma) == "SandyBridge" and other_core("Haswell", fma) == "SandyBridge"
    assert other_core("Sandybridge", fma) == "Haswell"           # OpenBLAS's spelling of its name
    assert other_core("Sandybridge", {"avx"}) == "Prescott" and other_core("Prescott", set()) == "SandyBridge"
    assert differs_in_fma("Zen", "Sandybridge") and differs_in_fma("Sandybridge", "Haswell")
    assert not differs_in_fma("Sandybridge", "Prescott") and not differs_in_fma("Zen", "Haswell")
    assert set(OTHER_CORES) == {"SandyBridge", "Haswell", "Prescott"}


# --------------------------------------------------------------------------------------
# with Caffe
# --------------------------------------------------------------------------------------

@pytest.mark.caffe
def test_worker_env_sets_the_kernel(caffe_backend):
    from porting.legacy import Worker

    with Worker(backend=caffe_backend, start=False) as default:
        mine = default.openblas()
    coretype = other_core(mine["core"])
    with Worker(backend=caffe_backend, start=False, env={"OPENBLAS_CORETYPE": coretype}, blas_threads=1) as other:
        assert other.inside_env()["OPENBLAS_CORETYPE"] == coretype
        assert other.openblas() == {"core": {"SandyBridge": "Sandybridge"}.get(coretype, coretype), "threads": 1}


@pytest.mark.caffe
def test_cli_compare_reports_the_floor(caffe_worker, caffe_weights, tmp_path, capsys):
    from PIL import Image

    from mfv.cli import main

    prototxt = tmp_path / "small.prototxt"
    prototxt.write_text(SMALL_PROTOTXT)
    caffemodel = caffe_weights(prototxt, seed=1, filler="xavier")
    start = tmp_path / "start.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (16, 16, 3)).astype(np.uint8)).save(start)
    common = ["compare", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--unit", "1",
              "--init", str(start), "--seed", "2", "--iterations", "6", "--every", "3", "--no-progress",
              "--no-modern", "--no-sources"]
    out = tmp_path / "out"
    assert main(common + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "compare.json").read_text())
    floor = report["floor"]
    kernels = floor["kernels"]
    assert kernels["reference"]["core"].lower() != kernels["other"]["core"].lower()
    assert kernels["other"]["coretype"] in OTHER_CORES
    assert kernels["reference"]["threads"] != kernels["other"]["threads"]
    # two Caffe runs under kernels on either side of fused multiply-add are not the same run
    # (on a CPU without FMA both kernels lack it and may round alike: then nothing to assert)
    if kernels["other"]["differs_in_fma"]:
        assert not floor["bitwise_equal"] and floor["caffe_vs_caffe"]["max_abs"] > 0
    else:
        assert "fma" not in cpu_flags()
    assert len(floor["objective"]["other"]) == 6 and floor["objective"]["first_differs"] is not None
    for pair in ("caffe_vs_caffe", "port_vs_caffe"):
        assert set(floor[pair]) >= {"ssim", "max_abs", "mean_abs", "rel_l2", "ssim_se", "mean_abs_se"}
    caffe_final = np.load(out / "caffe_final.npy")
    port = np.load(out / "torch_faithful_final.npy")
    assert floor["port_vs_caffe"]["max_abs"] == np.abs(port.astype(np.float64) - caffe_final).max()
    other = np.load(out / "caffe_other_final.npy")
    assert floor["caffe_vs_caffe"]["max_abs"] == np.abs(other.astype(np.float64) - caffe_final).max()
    assert len(floor["caffe_vs_caffe"]["ssim_tiles"]) == len(floor["port_vs_caffe"]["mean_abs_tiles"]) == 64
    # the verdict is the rule applied to the reported numbers, and the sentence says it
    verdict = floor_verdict(floor["port_vs_caffe"], floor["caffe_vs_caffe"])
    assert floor["verdict"] == json.loads(json.dumps(verdict))
    sentence = verdict["sentence"]
    assert sentence.startswith(f"The port is {'within' if verdict['within'] else 'beyond'} Caffe's own noise floor")
    assert sentence in report["verdict"] and sentence in printed and report["floor_rule"]
    page = (out / "compare.html").read_text()
    assert "Caffe vs Caffe (other BLAS kernel: " in page and "noise floor" in page
    assert page.count("data:image/png;base64,") == 6       # plot, Caffe, torch, its difference, Caffe again, its
    # --no-floor, and synchronised runs (one step from Caffe's image each: no free-running floor)
    for extra in (["--no-floor"], ["--sync"]):
        folder = tmp_path / extra[0].strip("-")
        assert main(common + extra + ["--out", str(folder)]) == 0
        assert json.loads((folder / "compare.json").read_text())["floor"] is None
