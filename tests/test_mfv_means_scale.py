"""`mfv means --classes-root`: many classes at once, codes cached per class, clustering as
Ray tasks or in-process with the same files, resumable, hostile inputs."""
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mfv.cli import main
from mfv.means import (MARKER, class_images, class_means, codes_file, image_codes, list_classes, list_images,
                       net_key)
from mfv.preprocess import Preprocessing
from mfv.step import FacetNet

CLASSES = ["alpha", "beta", "gamma"]
FAST = {"layer": "", "tsne_iterations": 500, "progress": False}


def make_classes(root: Path, per: int = 20, size: int = 12) -> Path:
    """Per class, ``per`` images of three kinds (reddish, greenish, bluish by i % 3) under
    noise, each class its own brightness: a net whose code is the mean colour separates
    the kinds."""
    rng = np.random.RandomState(0)
    for c, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per):
            base = np.full(3, 20.0 * c)
            base[i % 3] += 180
            pixels = np.clip(base + rng.normal(30, 12, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i:02d}.png")
    return root


class Counting(nn.Module):
    """Mean colour per channel (a 1x1 convolution, identity, then the spatial mean),
    counting the forward passes and the images through them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
            self.conv.bias.zero_()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.calls = self.images = 0

    def forward(self, x):
        self.calls += 1
        self.images += len(x)
        return self.pool(self.conv(x))


def counting_net() -> FacetNet:
    return FacetNet(Counting(), Preprocessing(input_size=(12, 12)))


def run(net, root, out, **options):
    warnings = options.pop("warnings", [])
    k = options.pop("k", 3)
    return class_means(net, class_images(list_classes(root), k), out, k=k, warn=warnings.append,
                       **{"m": 4, **FAST, **options})


def kind(path) -> int:
    return int(Path(path).stem[-2:]) % 3


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 CPUs for this module (one already running is used)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_reclustering_reads_the_cached_codes(tmp_path):
    root, out = make_classes(tmp_path / "classes"), tmp_path / "out"
    net = counting_net()
    first = run(net, root, out)
    assert first.encoded == 60 and net.module.images == 60 and net.module.calls == 3 * 2  # 20 = 16 + 4 a class
    assert sorted(first.clustered) == CLASSES and not first.up_to_date and not first.failed
    for name in CLASSES:
        summary = json.loads((out / name / "clusters.json").read_text())
        assert summary["k"] == 3 and len(summary["images"]) == 20
        for c in range(3):
            members = summary["clusters"][c]["members"]
            assert len(members) == 4 and len({kind(p) for p in members}) == 1  # one colour per cluster
            expected = np.mean([np.asarray(Image.open(p), np.float64) for p in members], axis=0)
            np.testing.assert_allclose(np.load(out / name / f"mean_{c}.npy"), expected, rtol=0, atol=1e-12)
        assert np.load(out / name / "embedding.npy").shape == (20, 2)
        assert (out / name / "embedding.png").stat().st_size > 10_000
        record = json.loads((out / name / MARKER).read_text())
        assert record["parameters"]["k"] == 3 and record["sizes"] and sum(record["sizes"]) == 20
    # the cache holds the single-class pipeline's codes, bit for bit
    paths = list_images([root / "beta"])
    with np.load(codes_file(out / "beta", "")) as cache:
        np.testing.assert_array_equal(cache["codes"], image_codes(net, paths, "", progress=False))
        assert list(cache["names"]) == [p.name for p in paths] and cache["readable"].all()
        assert str(cache["key"]) == net_key(net, "")
    net.module.calls = net.module.images = 0

    again = run(net, root, out, k=2, m=3)  # other k and m: clustering only, no forward pass
    assert net.module.calls == 0 and again.encoded == 0 and sorted(again.clustered) == CLASSES
    for name in CLASSES:
        assert json.loads((out / name / "clusters.json").read_text())["k"] == 2
        assert sorted(p.name for p in (out / name).glob("mean_*")) == [
            "mean_0.npy", "mean_0.png", "mean_1.npy", "mean_1.png"]  # k=3's mean_2 removed

    stamp = (out / "alpha" / "mean_0.npy").stat().st_mtime_ns
    same = run(net, root, out, k=2, m=3)  # same parameters: nothing to do
    assert sorted(same.up_to_date) == CLASSES and not same.clustered and net.module.calls == 0
    assert (out / "alpha" / "mean_0.npy").stat().st_mtime_ns == stamp


def test_the_cache_follows_the_images_and_the_net(tmp_path):
    root, out = make_classes(tmp_path / "classes"), tmp_path / "out"
    net = counting_net()
    run(net, root, out)
    # touched (same bytes, new mtime): the sha256 vouches for the code; reclustered, no forward pass
    touched = root / "alpha" / "img_03.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    result = run(net, root, out)
    assert result.encoded == 0 and result.clustered == ["alpha"] and sorted(result.up_to_date) == ["beta", "gamma"]
    # one image's pixels changed: that image alone goes through the net
    changed = root / "beta" / "img_05.png"
    Image.fromarray(np.full((12, 12, 3), 7, np.uint8)).save(changed)
    result = run(net, root, out)
    assert result.encoded == 1 and result.clustered == ["beta"]
    with np.load(codes_file(out / "beta", "")) as cache:
        row = list(cache["names"]).index("img_05.png")
        # BGR minus the mean; the sum of 144 equal integers is exact, the division (or a product
        # by a rounded 1/144) is within 2 half-ulps of 2**-17 near 100
        np.testing.assert_allclose(cache["codes"][row], [7 - 104, 7 - 117, 7 - 123], rtol=0, atol=2**-16)
    # an image added, one removed
    Image.open(root / "gamma" / "img_00.png").save(root / "gamma" / "img_20.png")
    (root / "gamma" / "img_19.png").unlink()
    result = run(net, root, out)
    assert result.encoded == 1 and result.clustered == ["gamma"]
    assert len(json.loads((out / "gamma" / "clusters.json").read_text())["images"]) == 20
    # other weights: every code is computed again
    with torch.no_grad():
        net.module.conv.bias.fill_(1.0)
    result = run(net, root, out)
    assert result.encoded == 60 and sorted(result.clustered) == CLASSES


def test_unreadable_images_and_caches(tmp_path):
    root, out = make_classes(tmp_path / "classes"), tmp_path / "out"
    (root / "alpha" / "broken.png").write_bytes(b"not a png")
    warnings = []
    net = counting_net()
    result = run(net, root, out, warnings=warnings)
    assert len(warnings) == 1 and "broken.png: cannot read image" in warnings[0] and "left out" in warnings[0]
    assert "\n" not in warnings[0]
    assert result.left_out == {"alpha": ["broken.png"]} and sorted(result.clustered) == CLASSES
    assert json.loads((out / "alpha" / MARKER).read_text())["left_out"] == ["broken.png"]
    assert len(json.loads((out / "alpha" / "clusters.json").read_text())["images"]) == 20
    # a damaged cache is computed again, with a warning; the unreadable image is tried again
    codes_file(out / "beta", "").write_bytes(b"PK\x03\x04 damaged")
    warnings.clear()
    result = run(net, root, out, k=2, warnings=warnings)
    assert result.encoded == 20 and sorted(result.clustered) == CLASSES
    assert any("cached codes unreadable" in w and "beta" in w for w in warnings)
    assert any("broken.png" in w for w in warnings)


def test_a_class_left_with_too_few_readable_images_fails_alone(tmp_path):
    root, out = make_classes(tmp_path / "classes"), tmp_path / "out"
    small = root / "small"
    small.mkdir()
    Image.open(root / "alpha" / "img_00.png").save(small / "a.png")
    Image.open(root / "alpha" / "img_01.png").save(small / "b.png")
    (small / "c.png").write_bytes(b"")
    (small / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run(counting_net(), root, out)
    assert list(result.failed) == ["small"] and "need at least 4 images" in result.failed["small"]
    assert sorted(result.clustered) == CLASSES and not (out / "small" / MARKER).exists()


def test_ray_tasks_and_in_process_write_the_same_files(ray_cluster, tmp_path):
    root = make_classes(tmp_path / "classes")
    net = counting_net()
    by_ray = run(net, root, tmp_path / "ray", ray=ray_cluster)
    assert sorted(by_ray.clustered) == CLASSES and by_ray.encoded == 60
    run(counting_net(), root, tmp_path / "here")
    for name in CLASSES:
        files = sorted(p.name for p in (tmp_path / "here" / name).iterdir())
        assert files == sorted(p.name for p in (tmp_path / "ray" / name).iterdir())
        for file in files:
            if file.endswith((".npy", ".json", ".npz")):
                assert (tmp_path / "ray" / name / file).read_bytes() == (tmp_path / "here" / name / file).read_bytes(), file
    net.module.calls = 0
    again = run(net, root, tmp_path / "ray", k=2, ray=ray_cluster)  # through Ray too: no forward pass
    assert net.module.calls == 0 and sorted(again.clustered) == CLASSES


def test_a_class_whose_ray_worker_dies_fails_alone(ray_cluster, tmp_path, monkeypatch):
    import mfv.means

    def dies_on_beta(out_dir, *args):
        from mfv.means import cluster_class  # in the worker: the real one

        if out_dir.endswith("beta"):
            os._exit(3)  # the worker process is lost, on every retry
        return cluster_class(out_dir, *args)

    monkeypatch.setattr(mfv.means, "cluster_class", dies_on_beta)
    warnings = []
    result = run(counting_net(), make_classes(tmp_path / "classes"), tmp_path / "out", ray=ray_cluster,
                 warnings=warnings)
    assert sorted(result.clustered) == ["alpha", "gamma"] and list(result.failed) == ["beta"]
    assert result.failed["beta"].startswith("Ray: ") and any(w.startswith("beta: Ray: ") for w in warnings)
    assert not (tmp_path / "out" / "beta" / MARKER).exists() and (tmp_path / "out" / "gamma" / MARKER).exists()


SMALL = """
name: "small"
input: "data"
input_shape { dim: 1 dim: 3 dim: 12 dim: 12 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 stride: 3 } }
layer { name: "fc7" type: "InnerProduct" bottom: "conv1" top: "fc7" inner_product_param { num_output: 8 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
"""


@pytest.fixture
def small_caffe(tmp_path):
    from porting.write import write_caffemodel

    prototxt = tmp_path / "small.prototxt"
    prototxt.write_text(SMALL)
    rng = np.random.RandomState(0)
    caffemodel = tmp_path / "small.caffemodel"
    write_caffemodel(caffemodel, [
        ("conv1", "Convolution", [rng.normal(0, 0.05, (4, 3, 3, 3)).astype(np.float32), np.zeros(4, np.float32)]),
        ("fc7", "InnerProduct", [rng.normal(0, 0.05, (8, 64)).astype(np.float32), np.zeros(8, np.float32)])])
    return ["--prototxt", str(prototxt), "--caffemodel", str(caffemodel)]


def test_cli_many_classes_with_synsets_on_ray(ray_cluster, small_caffe, tmp_path, capsys):
    root, out = make_classes(tmp_path / "classes"), tmp_path / "out"
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("gamma the third, a class\nalpha the first\nn0000 not here\n")
    code = main(["means", *small_caffe, "--classes-root", str(root), "--synsets", str(synsets), "-k", "2",
                 "-m", "3", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2 classes: 2 clustered, 0 up to date, 0 failed; 40 images through the net" in captured.out
    assert "1 folders not in" in captured.err and "(first: beta)" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "gamma"]
    record = json.loads((out / "gamma" / MARKER).read_text())
    assert record["label"] == "the third" and record["parameters"]["layer"] == "fc7"
    assert np.load(out / "gamma" / "mean_1.npy").shape == (12, 12, 3)
    with np.load(codes_file(out / "alpha", "fc7")) as cache:
        assert cache["codes"].shape == (20, 8) and (cache["codes"] >= 0).all()  # fc7 after relu7
    code = main(["means", *small_caffe, "--classes-root", str(root), "--synsets", str(synsets), "-k", "3",
                 "-m", "3", "--out", str(out), "--no-progress", "--no-ray"])
    assert code == 0
    assert "2 clustered, 0 up to date, 0 failed; 0 images through the net" in capsys.readouterr().out
    code = main(["means", *small_caffe, "--classes-root", str(root), "--synsets", str(synsets), "-k", "3",
                 "-m", "3", "--out", str(out), "--no-progress", "--no-ray"])
    assert code == 0 and "0 clustered, 2 up to date" in capsys.readouterr().out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_bad_inputs_are_one_line_and_exit_2(small_caffe, tmp_path, capsys):
    root = make_classes(tmp_path / "classes")
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    few = tmp_path / "few"
    make_classes(few, per=3)

    def fails(*args, expect):
        code = main(["means", *small_caffe, "--out", str(tmp_path / "out"), "--no-progress", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expect in err[0], err
        return err[0]

    fails("--classes-root", str(tmp_path / "missing"), expect="missing: no such folder")
    fails("--classes-root", str(tmp_path / "afile"), expect="afile: not a folder")
    fails("--classes-root", str(tmp_path / "empty"), expect="no class folders")
    fails("--classes-root", str(few), expect="alpha: 3 images, too few for 10 clusters")
    fails("--classes-root", str(root), str(root / "alpha"), expect="not both")
    fails(str(root / "alpha"), "--no-ray", expect="go with --classes-root")
    fails("--classes-root", str(root), "--address", f"127.0.0.1:{closed_port()}", "-k", "3",
          expect="no Ray cluster answers there")
    fails("--classes-root", str(root), "--address", "127.0.0.1:1", "--no-ray", "-k", "3", expect="contradict")
    fails("--classes-root", str(root), "--device", "toaster", expect="--device: not a torch device")
    if not torch.cuda.is_available():
        fails("--classes-root", str(root), "--device", "cuda", expect="no CUDA device")
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n0001 nothing\n")
    fails("--classes-root", str(root), "--synsets", str(synsets), expect="none of its folders is listed")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_codes_on_cuda_match_the_cpu(tmp_path):
    root = make_classes(tmp_path / "classes")
    on_cpu = run(counting_net(), root, tmp_path / "cpu")
    net = counting_net()
    net.module.to("cuda")
    on_gpu = run(net, root, tmp_path / "gpu")
    assert on_gpu.encoded == on_cpu.encoded == 60
    for name in CLASSES:
        with np.load(codes_file(tmp_path / "cpu" / name, "")) as a, np.load(codes_file(tmp_path / "gpu" / name, "")) as b:
            # means of 144 values below 256: float32 sums differ by at most a few ulps of 256 * 144
            np.testing.assert_allclose(a["codes"], b["codes"], rtol=0, atol=144 * 256 * 2**-23 * 4)
            assert str(a["key"]) == str(b["key"])  # the device is not part of the key
