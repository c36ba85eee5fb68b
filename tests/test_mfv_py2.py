"""The modules both sides share (schedule, crops, tv, zoom) under the 2016 stack's Python 2.7.

Inside the legacy root, Python 2.7 with numpy 1.11 imports our modules, evaluates the
original schedule formulas with Python 2's own ``/``, draws crops from numpy 1.11 and
runs our NumPy TV reference (the torch version needs torch, which the 2016 stack lacks) next
to scikit-image 0.13.1; the results must equal ours under Python 3.
"""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mfv import crops, schedule

SHARED = ("schedule.py", "crops.py", "tv.py", "zoom.py")

PY2_CHECK = r"""
import json, sys
sys.path.insert(0, "/mnt")
import numpy as np
from mfv import crops, schedule, tv, zoom
from skimage.restoration import denoise_tv_bregman
out = {"native": [], "ours": []}
for table in (schedule.MEAN_OCTAVES, schedule.CENTER_BIAS_OCTAVES):
    for o in table:
        for i in range(o.iter_n):
            # the 2016 formulas, Python 2's own division
            out["native"].append([o.start_step_size + ((o.end_step_size - o.start_step_size) * i) / o.iter_n,
                                  o.start_denoise_weight - (o.start_denoise_weight - (o.end_denoise_weight) * i) / o.iter_n])
            out["ours"].append([schedule.step_size(o, i), schedule.denoise_weight(o, i)])
rng = np.random.RandomState(11)
crops.noise_start(rng, 227, 227)
out["crops"] = [crops.crop_offsets(rng, 272, 272, 227, 227, 0.3) for _ in range(30)]
image = np.random.RandomState(0).uniform(0, 255, (30, 40, 3))
out["tv_gap"] = float(np.abs(tv.denoise_tv_bregman_0131_numpy(image, 0.3) - denoise_tv_bregman(image, 0.3, max_iter=100, eps=1e-3)).max())
out["zoom_shape"] = list(zoom.zoom_octave(np.zeros((3, 227, 227), np.float32), 1.2).shape)
print(json.dumps(out))
"""


@pytest.mark.caffe
def test_shared_modules_under_python27(caffe_backend, tmp_path):
    package = tmp_path / "mfv"
    package.mkdir()
    for name in SHARED:
        shutil.copy(Path(schedule.__file__).with_name(name), package / name)
    (package / "__init__.py").write_text("")
    argv, env = caffe_backend.launch(["/usr/bin/python2.7", "-c", PY2_CHECK], [(tmp_path, "/mnt", "ro")])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    ours_py3 = [[schedule.step_size(o, i), schedule.denoise_weight(o, i)]
                for table in (schedule.MEAN_OCTAVES, schedule.CENTER_BIAS_OCTAVES)
                for o in table for i in range(o.iter_n)]
    assert got["native"] == got["ours"] == ours_py3     # exact values
    kinds = [[type(v).__name__ for v in pair] for pair in ours_py3]
    assert [[type(v).__name__ for v in pair] for pair in got["native"]] == kinds   # int stays int
    assert kinds[0] == ["int", "float"]
    rng = np.random.RandomState(11)
    crops.noise_start(rng, 227, 227)
    assert [tuple(c) for c in got["crops"]] == [crops.crop_offsets(rng, 272, 272, 227, 227, 0.3) for _ in range(30)]
    assert got["tv_gap"] < 2e-12        # same bound as tests/test_mfv_tv.py (measured 3.4e-13)
    assert got["zoom_shape"] == [3, 272, 272]


PY2_STEP = r"""
import numpy as np
x, g = np.load("/mnt/x.npy"), np.load("/mnt/g.npy")
bias = np.float32([104.0, 117.0, 123.0])[:, np.newaxis, np.newaxis]
out = {}
for k, step in enumerate([1, 2, 1.5, 11., 1.0052631578947369]):
    data = x.copy()
    data[:] += step / np.abs(g).mean() * g          # the 2016 step, numpy 1.11 casting
    out["step%d" % k] = np.clip(data, -bias, 255 - bias)
out["mean_abs"] = np.array([np.abs(g).mean()])
asimg = np.dstack((out["step0"] + bias)[::-1]).astype(np.float64)    # deprocess for the TV
out["asimg"] = asimg
out["back"] = np.float32(np.rollaxis(asimg, 2)[::-1]) - bias          # preprocess after it
np.savez("/mnt/out.npz", **out)
"""

STEPS = [1, 2, 1.5, 11., 1.0052631578947369]


@pytest.mark.caffe
def test_step_arithmetic_is_numpy_1_11(caffe_backend, tmp_path):
    from mfv.preprocess import CAFFENET
    from mfv.step import apply_step

    rng = np.random.RandomState(5)
    x = CAFFENET.to_net(rng.uniform(0, 255, (227, 227, 3)))
    g = (rng.standard_normal((3, 227, 227)) * 1e-3).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "g.npy", g)
    argv, env = caffe_backend.launch(["/usr/bin/python2.7", "-c", PY2_STEP], [(tmp_path, "/mnt", "rw")])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(tmp_path / "out.npz") as legacy:
        lo, hi = CAFFENET.bounds()
        for k, step in enumerate(STEPS):
            ours, mean_abs = apply_step(x, g, step, lo, hi, "faithful")
            assert mean_abs.dtype == np.float32 and mean_abs == legacy["mean_abs"][0]
            np.testing.assert_array_equal(ours, legacy[f"step{k}"])
        rgb = CAFFENET.from_net(legacy["step0"]).astype(np.float64)
        np.testing.assert_array_equal(rgb, legacy["asimg"])
        np.testing.assert_array_equal(CAFFENET.to_net(rgb), legacy["back"])
