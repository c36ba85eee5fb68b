"""Batched facets (mfv.batch) against single runs (mfv.loop.run_facet), and `mfv facets`.

The batched forward/backward is not bit for bit a batch of one (a batched convolution
blocks its float32 sums differently; measured on the net below on this CPU: gradients
1.9e-9 apart, objectives 1e-6), and free-running MFV amplifies any rounding. So the
single run is synchronised on the batched run: before each of its iterations its crop
window is given the batched run's crop (``start_from``), and the step is checked
against a bound derived from float32 rounding (Higham's gamma_n for every dot product,
a ReLU decision counted as undecided where the exact pre-activation lies within the
forward's rounding bound), the denoising against the same TV call on the same input.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mfv import crops, tv
from mfv.batch import denoise_batch, load_means, parse_units, run_facets
from mfv.cli import main
from mfv.loop import run_facet
from mfv.preprocess import Preprocessing
from mfv.schedule import Octave
from mfv.step import FacetNet, central_mask, gradient_steps
from mfv_nets import write_small_net
from porting.errors import PortingError
from porting.rounding import U, gamma

SIZE = 16
OCTAVES = (
    Octave(None, 0, 0.3, None, 3, 0.4, 0.4, 1, 2),        # fc objective, integer steps
    Octave("1", 0, 0.3, 1.25, 3, 0.01, 2, 1., 1.),         # objective: the ReLU's output at (XY, XY)
    Octave(None, 57, 0.2, 1.0, 2, 0.1, 2, 2., 2.),         # margin 57 of 227: 4 of 16 (margin_for)
)
XY = 6


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 6))
    return FacetNet(module, Preprocessing(input_size=(SIZE, SIZE)))


def tasks_of():
    rng = np.random.RandomState(5)
    return [(2, 4, None), (1, 7, rng.uniform(0, 255, (18, 18, 3))), (3, 4, rng.uniform(0, 255, (16, 20, 3)))]


def bounds(net, x, unit, layer):
    """Float64 bounds for the crop ``x`` of the net above: (D, objective bound, exact
    activations of ``layer``, their bounds).

    D bounds |g_a - g_b| for two float32 gradients of the objective at ``x`` computed in
    any summation order. The backward of the Linear layer (one-hot row times W2) and of
    the ReLU (a mask) are exact, so g = conv_transpose(mask * v) with v = W2[unit]
    (fc objective) or a one-hot at (unit, XY, XY) (ReLU objective); each of its sums has
    at most 4*3*3 = 36 terms, error <= gamma(36) sum|terms|. The mask is the float32
    forward's ReLU decision: z > 0 exactly where |z_exact| > E = gamma(28)(|W1|*|x| + |b1|)
    (27 products and the bias), either way elsewhere. So
    D = |W1|^T * (undecided |v|) + 2 gamma(36) |W1|^T * ((decided on or undecided) |v|).
    """
    conv, linear = net.module[0], net.module[3]
    w1, b1 = conv.weight.detach().double(), conv.bias.detach().double()
    w2, b2 = linear.weight.detach().double(), linear.bias.detach().double()
    xt = torch.from_numpy(x[None]).double()
    with torch.no_grad():
        z = torch.nn.functional.conv2d(xt, w1, b1, stride=2)[0]
        e = gamma(28) * (torch.nn.functional.conv2d(xt.abs(), w1.abs(), b1.abs(), stride=2)[0])
    undecided = (z.abs() <= e).double()
    maybe_on = ((z > e).double() + undecided)
    if layer == "1":
        v = torch.zeros_like(z)
        v[unit, XY, XY] = 1.0
        acts, act_bound = z.clamp(min=0)[:, XY, XY], 2 * e[:, XY, XY]
    else:
        v = w2[unit].abs().reshape(z.shape)
        h = z.clamp(min=0) + e
        acts = w2 @ z.clamp(min=0).reshape(-1) + b2
        # |obj_a - obj_b| <= |W2| |h_a - h_b| + both roundings of a 197-term sum
        act_bound = w2.abs() @ (2 * e).reshape(-1) + 2 * gamma(197) * (w2.abs() @ h.reshape(-1) + b2.abs())

    def back(weights):
        return torch.nn.functional.conv_transpose2d(weights[None], w1.abs(), stride=2,
                                                    output_padding=1)[0, :, :SIZE, :SIZE]

    d = back(undecided * v) + 2 * gamma(36) * back(maybe_on * v)
    return d.numpy() * (1 + 1e-9), acts.numpy(), act_bound.numpy() * (1 + 1e-9)


def step_bound(x, g_a, g_b, d, m_a, m_b, step):
    """Bound on |after_step_a - after_step_b| when the gradients differ by at most d.

    apply_step forms f = fl32(step / m) with m the float32 mean of |g| (n = g.size
    non-negative terms: |m - mean| <= gamma(n + 1) mean), then clip(fl(x + fl(f g))), each
    operation rounding by at most U relative and the clip 1-Lipschitz:
    |f_a g_a - f_b g_b| <= f_a d + |g_b| |f_a - f_b|, plus the roundings of both products
    and both sums. |f_a - f_b| follows from the two computed means, whose gap is itself
    checked against mean(d)."""
    n = g_a.size
    assert abs(m_a - m_b) <= d.mean() + gamma(n + 2) * (m_a + m_b)
    if m_a == 0 or m_b == 0:
        assert m_a == m_b == 0
        return np.zeros_like(x, dtype=np.float64)
    f_a, f_b = step / m_a * (1 + 2 * U), step / m_b * (1 + 2 * U)
    df = step * abs(m_a - m_b) / (m_a * m_b) + 2 * U * (f_a + f_b)
    pa, pb = f_a * np.abs(g_a), f_b * np.abs(g_b)
    return (f_a * d + np.abs(g_b) * df + 2 * U * (pa + pb) + 2 * U * (2 * np.abs(x) + pa + pb)) * (1 + 1e-6)


def denoised_alone(net, after_step, weight, mode):
    prep = net.preprocessing
    return prep.to_net(tv.denoise(prep.from_net(after_step).astype(np.float64), weight, mode=mode))


@pytest.mark.parametrize("mode", ["faithful", "modern"])
def test_each_iteration_is_the_single_runs_within_rounding(net, mode):
    """Per iteration and facet, synchronised on the batched run's crop: the same crop
    offset, schedule and layer; the gradient within D; the stepped crop within its step
    bound (exactly equal where the gradient is masked out); the denoised crop the TV of
    its own stepped crop (faithful on the CPU: bit for bit the single call's, the fused
    sweep's per-image arithmetic not depending on the batch; otherwise within one float32
    unit in the last place of 255, the plain sweep or today's scikit-image differing from
    the batch by ~1e-12); the objective within its forward bound; the best unit equal or a
    near tie of the exact activations."""
    tasks = tasks_of()
    seen = {}
    batched = run_facets(net, tasks, OCTAVES, layer="3", xy=XY, mode=mode, progress=False, snapshot_every=4,
                         observe=lambda n, record, snap: seen.setdefault(n, []).append((record, snap)))
    total = sum(o.iter_n for o in OCTAVES)
    fused = mode == "faithful" and tv.fused_sweep() is not None
    for n, (unit, seed, start) in enumerate(tasks):
        ours = seen[n]
        assert len(ours) == total

        def sync(iteration, image):
            record, snap = ours[iteration]
            (oy, ox), image = record.crop, image.copy()
            image[:, oy:oy + SIZE, ox:ox + SIZE] = snap.input
            return image

        single = []
        run_facet(net, unit, seed, OCTAVES, start=start, layer="3", xy=XY, mode=mode, progress=False,
                  start_from=sync, observe=lambda record, snap: single.append((record, snap)))
        for (a, sa), (b, sb) in zip(ours, single):
            assert (a.iteration, a.octave, a.i, a.layer, a.image_shape, a.crop, a.step_size, a.denoise_weight) == \
                   (b.iteration, b.octave, b.i, b.layer, b.image_shape, b.crop, b.step_size, b.denoise_weight)
            np.testing.assert_array_equal(sa.input, sb.input)
            d, acts, act_bound = bounds(net, sa.input, unit, a.layer)
            if a.octave == 2:   # the margin: exactly zero outside [4, 12)
                d = d * central_mask(d.shape, 4)
                assert not sa.gradient[:, :4].any() and not sb.gradient[:, :4].any()
            assert (np.abs(sa.gradient - sb.gradient) <= d).all()
            bound = step_bound(sa.input, sa.gradient, sb.gradient, d, a.mean_abs_gradient, b.mean_abs_gradient,
                               a.step_size)
            assert (np.abs(sa.after_step - sb.after_step) <= bound).all()
            still = (sa.gradient == 0) & (sb.gradient == 0)   # x + f * 0 = x, then the same clip
            np.testing.assert_array_equal(sa.after_step[still], sb.after_step[still])
            alone = denoised_alone(net, sa.after_step, a.denoise_weight, mode)
            if fused:
                np.testing.assert_array_equal(sa.after_denoise, alone)
            else:
                np.testing.assert_allclose(sa.after_denoise, alone, rtol=0, atol=2.0 ** -15)
            assert abs(a.objective - b.objective) <= act_bound[unit]
            if a.best_unit != b.best_unit:   # only a near tie of the exact activations may flip
                i, j = a.best_unit, b.best_unit
                assert abs(acts[i] - acts[j]) <= act_bound[i] + act_bound[j]
    for result in batched:
        assert [s.iteration for s in result.snapshots] == [0, 4, 7]


def test_batched_draws_are_each_facets_own(net):
    """Crop offsets from each facet's own RandomState(seed), after its noise draws; each
    image zoomed on its own (18 -> 22, 20 -> 25 rows or columns)."""
    tasks = tasks_of()
    results = run_facets(net, tasks, OCTAVES, layer="3", xy=XY, progress=False, snapshot_every=0)
    for (unit, seed, start), result in zip(tasks, results):
        rng = np.random.RandomState(seed)
        crops.noise_start(rng, SIZE, SIZE)
        rows, cols = (SIZE, SIZE) if start is None else start.shape[:2]
        expected = [crops.crop_offsets(rng, rows, cols, SIZE, SIZE, 0.3) for _ in range(3)]
        rows, cols = round(rows * 1.25), round(cols * 1.25)
        expected += [crops.crop_offsets(rng, rows, cols, SIZE, SIZE, w) for w in (0.3,) * 3 + (0.2,) * 2]
        assert [r.crop for r in result.records] == expected
        assert result.records[-1].image_shape == (rows, cols) == result.image.shape[:2]
        assert result.snapshots == [] and len(result.records) == 8
    assert results[0].records[0].crop == (0, 0)   # 16 x 16 noise: nothing to draw


def test_gradient_steps_rejects_mismatched_arguments(net):
    xs = np.zeros((2, 3, SIZE, SIZE), np.float32)
    with pytest.raises(ValueError):
        gradient_steps(net, xs, "3", [1, 2, 3], 1.0)
    with pytest.raises(ValueError):
        gradient_steps(net, xs[0], "3", [1], 1.0)
    with pytest.raises(ValueError):
        run_facets(net, [], OCTAVES)
    with pytest.raises(ValueError):
        run_facets(net, [(1, 2, None)], OCTAVES, mode="fast")


def test_denoise_batch_is_tv_per_image():
    rng = np.random.RandomState(3)
    images = rng.uniform(0, 255, (3, 12, 10, 3))
    weights = [0.01, 0.4, 2.0]
    got = denoise_batch(images, weights, "faithful")
    for image, weight, out in zip(images, weights, got):
        expected = tv.denoise(image, weight, mode="faithful")
        if tv.fused_sweep() is not None:
            np.testing.assert_array_equal(out, expected)
        else:
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
        # modern: today's ring; today's scikit-image to the sweep's rounding (test_mfv_tv: 2e-12)
        np.testing.assert_allclose(denoise_batch(image[None], [weight], "modern")[0],
                                   tv.denoise(image, weight, mode="modern"), rtol=0, atol=2e-12)


def test_parse_units():
    assert parse_units("498,945") == [498, 945]
    assert parse_units("0-3, 7,2") == [0, 1, 2, 3, 7]
    for bad in ("", "a", "3-1", "-2", "0-99999999999", "1,,2"):
        with pytest.raises(PortingError):
            parse_units(bad)


# --------------------------------------------------------------------------------------
# mfv facets on a small Caffe net
# --------------------------------------------------------------------------------------

@pytest.fixture
def small_net(tmp_path):
    return write_small_net(tmp_path)


@pytest.fixture
def means(tmp_path):
    """mean_0.png (8-bit) and mean_1.npy (float64), as `mfv means` writes them."""
    folder = tmp_path / "means"
    folder.mkdir()
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 256, (24, 24, 3)).astype(np.uint8)).save(folder / "mean_0.png")
    np.save(folder / "mean_1.npy", rng.uniform(0, 255, (26, 24, 3)))
    return folder


def test_facets_cli_writes_each_facet_as_a_single_run(small_net, means, tmp_path, capsys):
    prototxt, caffemodel = small_net
    out = tmp_path / "out"
    code = main(["facets", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--units", "2,4",
                 "--means", str(means), "--out", str(out), "--iterations", "5", "--no-progress",
                 "--snapshot-every", "2"])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("unit 2 of fc8 (mean, faithful, seed 1): 2 facets from "
                                                       "mean_0.png..mean_1.npy, 5 iterations")
    starts = [np.asarray(Image.open(means / "mean_0.png"), np.float32), np.load(means / "mean_1.npy")]
    for unit in (2, 4):
        folder = out / str(unit)
        for k, start in enumerate(starts):
            stem = f"facet_fc8_{unit:04d}_mean_{k}_faithful_seed1"
            assert {p.name for p in folder.glob(stem + "*")} == {f"{stem}{s}" for s in
                                                                  (".png", ".npy", "_trace.json", "_snapshots.npz")}
            trace = json.loads((folder / f"{stem}_trace.json").read_text())
            rng = np.random.RandomState(1)
            crops.noise_start(rng, 24, 24)
            rows = start.shape[0]
            expected = [list(crops.crop_offsets(rng, rows, start.shape[1], 24, 24, 0.3)) for _ in range(5)]
            assert [t["crop"] for t in trace] == expected and [t["step_size"] for t in trace] == [1] * 5
            image = np.load(folder / f"{stem}.npy")
            assert image.shape == start.shape and np.abs(image - start).max() > 1.0   # it moved
            with np.load(folder / f"{stem}_snapshots.npz") as snaps:
                assert sorted({k.split("/")[0] for k in snaps.files}) == ["0000", "0002", "0004"]


def _file(name, data):
    def make(folder):
        (folder / name).write_bytes(data)
        return folder
    return make


def _array(name, array):
    def make(folder):
        np.save(folder / name, array)
        return folder
    return make


def huge_header() -> bytes:
    """A .npy whose header claims 240 GB (100000 x 100000 x 3 float64) over 80 bytes of data."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (100000, 100000, 3)})
    return buffer.getvalue() + bytes(80)


@pytest.mark.parametrize("make, problem", [
    (lambda d: d / "absent", "no such folder"),
    (lambda d: d, "no mean images"),
    (_file("mean_1.png", b""), "mean_0 is missing"),
    (_file("mean_0.npy", b"\x93NUMPY junk"), "cannot read array"),
    (_file("mean_0.png", b"not a png"), "cannot read image"),
    (_file("mean_0.npy", huge_header()), "cannot read array"),
    (_array("mean_0.npy", np.zeros((24, 24))), "expected an RGB image array"),
    (_array("mean_0.npy", np.full((24, 24, 3), np.nan)), "NaN"),
    (_array("mean_0.npy", np.zeros((20, 24, 3))), "smaller than the net's 24x24 input"),
], ids=["absent", "empty", "gap", "bad-npy", "bad-png", "huge-header", "not-rgb", "nan", "small"])
def test_facets_cli_bad_means_exit_2_with_one_line(small_net, tmp_path, capsys, make, problem):
    prototxt, caffemodel = small_net
    folder = tmp_path / "m"
    folder.mkdir()
    folder = make(folder)
    code = main(["facets", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--unit", "1",
                 "--means", str(folder), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len([line for line in err if not line.startswith("mfv: torch on")]) == 1
    assert problem in err[-1] and err[-1].startswith("mfv: ")
    assert not (tmp_path / "out").exists()


def test_facets_cli_bad_units_and_device(small_net, means, tmp_path, capsys):
    prototxt, caffemodel = small_net
    common = ["facets", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--means", str(means),
              "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(common + ["--unit", "6"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "mfv: --unit: unit 6 is out of range: fc8 has 6 units"
    assert main(common + ["--units", "1-x"]) == 2
    assert "--units" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(common + ["--unit", "1", "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["mfv: --device cuda: no CUDA device is available to torch"]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_facets_on_cuda_follow_the_cpu_run(small_net, means):
    """On CUDA the net and the TV (plain torch sweep, float64) run there; other kernels,
    so not bit for bit: the crops and schedule are the same, the first step within 1e-4
    grey levels of the CPU's (a float32 step on values up to 255 whose gradient differs
    by rounding; a GPU run can flip a ReLU only within rounding of zero)."""
    from porting.net import load_caffe

    prototxt, caffemodel = small_net
    starts = [rgb for _, rgb in load_means(means)]
    cpu_net = FacetNet.from_caffe(load_caffe(prototxt, caffemodel))
    gpu_net = FacetNet.from_caffe(load_caffe(prototxt, caffemodel))
    tasks = [(2, 1, s) for s in starts]
    cpu = run_facets(cpu_net, tasks, iterations=3, progress=False, snapshot_every=1)
    gpu = run_facets(gpu_net, tasks, iterations=3, progress=False, snapshot_every=1, device="cuda")
    assert gpu_net.device.type == "cuda"
    for a, b in zip(cpu, gpu):
        assert [r.crop for r in a.records] == [r.crop for r in b.records]
        assert np.abs(a.snapshots[0].after_step - b.snapshots[0].after_step).max() < 1e-4
