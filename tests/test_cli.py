"""`porting convert` / `porting inspect`: exit 0 on success, 2 with one line on bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

from porting import load_caffe, models
from porting.upgrade import upgrade_net
from porting.parse import read_prototxt

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference-data"
NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 4 } }
"""


def run(*args):
    return subprocess.run([sys.executable, "-m", "porting", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.prototxt"
    path.write_text(NET)
    return path


def test_inspect_prints_table(small):
    out = run("inspect", small)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "layer" in lines[1] and "output shape" in lines[1]
    row = next(l for l in lines if l.startswith("conv "))
    assert "1x3x3x3" in row and "57" in row and row.rstrip().endswith("yes")  # 3*2*3*3 + 3 params


def test_inspect_marks_unsupported_layers(tmp_path):
    # Every type Caffe 1.0 registers is supported now: a fork's type (SSD's PriorBox) stands
    # for an unsupported one.
    path = tmp_path / "fork.prototxt"
    path.write_text(NET + 'layer { name: "rnn" type: "PriorBox" bottom: "fc" top: "rnn" }\n'
                    'layer { name: "py" type: "Python" bottom: "fc" top: "py" }\n')
    out = run("inspect", path)
    assert out.returncode == 0
    assert [l.split()[-1] for l in out.stdout.splitlines() if l.startswith(("rnn", "py "))] == ["NO", "NO"]
    conv = run("convert", path, "-o", tmp_path / "x.safetensors")
    assert conv.returncode == 2
    assert conv.stderr.count("\n") == 1 and "rnn (PriorBox)" in conv.stderr and "py (Python" in conv.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_writes_loadable_file(small, tmp_path):
    out = run("convert", small, "-o", tmp_path / "small.safetensors")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "small.safetensors").stat().st_size > 0


@pytest.mark.parametrize("case", ["missing", "syntax", "truncated", "foreign"])
def test_bad_input_is_one_line_exit_2(case, small, tmp_path):
    model = tmp_path / "w.caffemodel"
    if case == "missing":
        args = [tmp_path / "nope.prototxt"]
    elif case == "syntax":
        bad = tmp_path / "bad.prototxt"
        bad.write_text('name: "x"\nlayer { name: "a" type: "ReLU" bottom: "x" top: "x"\n  relu_param { negative_slope: oops } }\n')
        args = [bad]
    elif case == "truncated":
        model.write_bytes(b"\x0a\x05small\xa2\x06\xff\xff\x01")  # a layer field that claims more bytes than exist
        args = [small, model]
    else:
        model.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)))
        args = [small, model]
    out = run("convert", *args, "-o", tmp_path / "o.safetensors")
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    named = {"missing": "nope.prototxt", "syntax": "bad.prototxt:", "truncated": "w.caffemodel", "foreign": "w.caffemodel"}
    assert named[case] in out.stderr
    if case == "syntax":
        assert "line 3" in out.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_shipped_caffenet_equals_mfv_deploy():
    mfv = SHARED / "mfv-original" / "deploy_alexnet_updated.prototxt"
    if not mfv.exists():
        pytest.skip("reference data absent")
    ours, theirs = (upgrade_net(read_prototxt(p)) for p in (models.path("caffenet"), mfv))
    assert ours.layer == theirs.layer and ours.force_backward == theirs.force_backward
    assert load_caffe(models.path("caffenet")).graph.blob_shapes["fc8"] == (1, 1000)


# A V0 net whose ReLU carries num_output (Caffe's upgrade logs it and drops it), then
# either a valid layer or one of an unknown V0 type.
_V0_NOTE = ("input: 'data' input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 3 "
            "layers { layer { name: 'r' type: 'relu' num_output: 3 } bottom: 'data' top: 'data' } ")


def test_upgrade_note_printed_once_after_success(tmp_path):
    proto = tmp_path / "old.prototxt"
    proto.write_text(_V0_NOTE)
    out = run("inspect", proto)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        f"porting: {proto}: layer r: V0 parameter num_output does not apply to layer type 'relu'; dropped"]


def test_upgrade_note_not_printed_when_the_net_is_refused(tmp_path):
    """The refusal is the one line on stderr; the notes of a net refused are left out."""
    proto = tmp_path / "old.prototxt"
    proto.write_text(_V0_NOTE + "layers { layer { name: 'x' type: 'warp' } bottom: 'data' top: 'y' }")
    for command in (["inspect", proto], ["convert", proto, "-o", tmp_path / "o.safetensors"]):
        out = run(*command)
        assert out.returncode == 2 and out.stderr.splitlines() == [
            f"porting: {proto}: layer x: unknown V0 layer type 'warp'"], out.stderr
