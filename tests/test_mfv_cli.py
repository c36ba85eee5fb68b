"""`mfv means` and `mfv facet` end to end on a small Caffe net with written weights."""
import json

import numpy as np
import pytest
from PIL import Image

from mfv.cli import main
from mfv.files import truncating_uint8
from mfv_nets import write_small_net

@pytest.fixture
def small_net(tmp_path):
    return write_small_net(tmp_path)


def test_facet_from_a_mean_image(small_net, tmp_path, capsys, monkeypatch):
    from mfv import schedule

    # the published table with fewer iterations per octave (the loop's cost is not under test)
    short = tuple(o._replace(iter_n=n) for o, n in zip(schedule.MEAN_OCTAVES, (6, 5, 3, 2)))
    monkeypatch.setitem(schedule.VARIANTS, "mean", short)
    prototxt, caffemodel = small_net
    start = tmp_path / "start.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (24, 24, 3)).astype(np.uint8)).save(start)
    out = tmp_path / "out"
    code = main(["facet", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--unit", "2",
                 "--init", str(start), "--seed", "3", "--out", str(out), "--name", "f", "--no-progress",
                 "--snapshot-every", "5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "16 iterations" in printed and "(mean, faithful)" in printed
    trace = json.loads((out / "f_trace.json").read_text())
    assert len(trace) == 16 and trace[-1]["image_shape"] == [29, 29]  # 24 -> zoom 1.2 -> 29
    assert [t["step_size"] for t in trace[:6]] == [1] * 6  # Python 2 integer division
    image = np.load(out / "f.npy")
    assert image.shape == (29, 29, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "f.png")), truncating_uint8(image))
    with np.load(out / "f_snapshots.npz") as snaps:
        assert sorted({k.split("/")[0] for k in snaps.files}) == ["0000", "0005", "0010", "0015"]


def test_means_on_a_folder(small_net, tmp_path, capsys):
    prototxt, caffemodel = small_net
    folder = tmp_path / "class"
    folder.mkdir()
    rng = np.random.RandomState(2)
    for i in range(20):
        Image.fromarray(rng.randint(0, 256, (30 + i, 24, 3)).astype(np.uint8)).save(folder / f"{i:02d}.jpg")
    out = tmp_path / "means"
    code = main(["means", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "-k", "2", "-m", "3",
                 "--out", str(out), "--no-progress", str(folder)])
    assert code == 0
    assert "20 images, fc7 codes, 2 clusters" in capsys.readouterr().out
    for c in range(2):
        assert np.load(out / f"mean_{c}.npy").shape == (24, 24, 3)  # squashed to the input size
        assert (out / f"mean_{c}.png").exists()
    assert len(json.loads((out / "clusters.json").read_text())["clusters"][0]["members"]) == 3


def test_bad_input_is_one_line_and_exit_2(small_net, tmp_path, capsys):
    prototxt, caffemodel = small_net
    code = main(["facet", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--unit", "0",
                 "--layer", "fc9", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "no layer named 'fc9'" in err and len(err.strip().splitlines()) == 1
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(small)
    code = main(["facet", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--unit", "0",
                 "--init", str(small), "--out", str(tmp_path)])
    assert code == 2 and "smaller than the net's 24x24 input" in capsys.readouterr().err
    code = main(["means", "--prototxt", str(prototxt), "--out", str(tmp_path), str(tmp_path / "nothing")])
    assert code == 2 and "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["facet", "--prototxt", str(prototxt), "--unit", "0", "--out", str(tmp_path), "--mean", "1,2"])
