"""Hostile model files (issue 9): each bad input is refused at its source with a
PortingError in Python and, from the CLI, exit 2 with exactly one line on stderr."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from porting import PortingError, load_caffe
from porting.saved import load_converted, save_converted
from porting.wire import varint
from porting.write import write_caffemodel


def run(*args):
    return subprocess.run([sys.executable, "-m", "porting", *map(str, args)], capture_output=True, text=True)


def assert_one_line_exit_2(out, *named):
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    for text in named:
        assert text in out.stderr, out.stderr


# --------------------------------------------------------------------------- layer names
# torch.nn.Module attributes and ModuleDict methods, an empty name, a dotted one.
ODD_NAMES = ["type", "train", "forward", "keys", "clear", "modules", "training", "_modules",
             "", "a.b", "layers", "0"]


def _net_named(conv: str, fc: str) -> str:
    return f"""name: "odd"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 2 dim: 5 dim: 5 }} }} }}
layer {{ name: "{conv}" type: "Convolution" bottom: "data" top: "c" convolution_param {{ num_output: 3 kernel_size: 3 }} }}
layer {{ name: "{fc}" type: "InnerProduct" bottom: "c" top: "fc" inner_product_param {{ num_output: 4 }} }}
"""


@pytest.mark.parametrize("name", ODD_NAMES)
def test_any_layer_name_works(name, tmp_path):
    """Caffe's Net::Init accepts any layer name, the empty one included; so does the port."""
    other = "fc" if name != "fc" else "other"
    proto = tmp_path / "odd.prototxt"
    proto.write_text(_net_named(name, other))
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((3, 2, 3, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
    f = [rng.standard_normal((4, 27)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]
    model = tmp_path / "odd.caffemodel"
    write_caffemodel(model, [(name, "Convolution", w), (other, "InnerProduct", f)])
    net = load_caffe(proto, model)
    assert list(net.params) == [name, other]
    np.testing.assert_array_equal(net.params[name][0].detach().numpy(), w[0])
    assert list(net.state_dict()) == [f"{name}.0", f"{name}.1", f"{other}.0", f"{other}.1"]
    x = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    blobs = net(x)
    assert torch.equal(net.layer_outputs[name][0], blobs["c"])
    assert list(net(x, end=name)) == ["data", "c"]
    out = tmp_path / "odd.safetensors"
    save_converted(net, out)
    back = load_converted(out)
    assert list(back.state_dict()) == list(net.state_dict())
    assert torch.equal(back(x)["fc"], blobs["fc"])
    back.load_state_dict(net.state_dict())
    assert run("inspect", proto, model).returncode == 0


# --------------------------------------------------------------------------- nesting
def _groups(field_no: int, n: int) -> bytes:
    return varint(field_no << 3 | 3) * n + varint(field_no << 3 | 4) * n


def _nested_model(where: str, n: int) -> bytes:
    """A V2 caffemodel with ``n`` nested unknown groups at the top level, in a layer or in a blob."""
    from porting import caffe_pb2

    blob = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[1]), data=[1.0]).SerializeToString()
    if where == "blob":
        blob += _groups(900, n)
    layer = caffe_pb2.LayerParameter(name="s", type="Scale").SerializeToString()
    layer += varint(7 << 3 | 2) + varint(len(blob)) + blob
    if where == "layer":
        layer += _groups(900, n)
    data = varint(100 << 3 | 2) + varint(len(layer)) + layer
    return data + _groups(50, n) if where == "top" else data


@pytest.mark.parametrize("where, limit", [("top", 100), ("layer", 99), ("blob", 98)])
def test_nested_groups_refused_where_protobuf_refuses(where, limit, tmp_path):
    """Groups nested past protobuf's recursion limit (100, counting the message depth) are
    refused with one line naming the file and the byte; protobuf itself draws the same line."""
    from porting import caffe_pb2
    from porting.parse import read_caffemodel

    for n in (limit, limit + 1, 5000):
        data = _nested_model(where, n)
        path = tmp_path / f"{where}{n}.caffemodel"
        path.write_bytes(data)
        try:
            caffe_pb2.NetParameter.FromString(data)
            protobuf_ok = True
        except Exception:
            protobuf_ok = False
        assert protobuf_ok == (n == limit)
        if protobuf_ok:
            assert read_caffemodel(path)["s"][0].data.tolist() == [1.0]
            continue
        with pytest.raises(PortingError) as err:
            read_caffemodel(path)
        assert path.name in str(err.value) and "byte " in str(err.value) and "\n" not in str(err.value)


def test_nested_groups_cli_one_line(tmp_path):
    proto = tmp_path / "s.prototxt"
    proto.write_text('layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 } } }\n'
                     'layer { name: "s" type: "Scale" bottom: "d" top: "d" }\n')
    model = tmp_path / "deep.caffemodel"
    model.write_bytes(_nested_model("layer", 1000))  # about 4 KB
    for command in ("inspect", "convert"):
        out = run(command, proto, model, *(["-o", tmp_path / "o.safetensors"] if command == "convert" else []))
        assert_one_line_exit_2(out, "deep.caffemodel", "byte ", "nested")


# --------------------------------------------------------------------------- names in messages
EVIL = r"a\nb\rc\x1b[2J\x07\x00d" + "x" * 500  # prototxt escapes: newline, CR, ESC, BEL, NUL

_INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }\n'
EVIL_NETS = {
    "type": _INPUT + f'layer {{ name: "l" type: "{EVIL}" bottom: "data" top: "t" }}\n',
    "layer": _INPUT + f'layer {{ name: "{EVIL}" type: "Convolution" bottom: "data" top: "c" '
                      'convolution_param { num_output: 3 kernel_size: 9 } }\n',  # kernel larger than the input
    "bottom": _INPUT + f'layer {{ name: "{EVIL}" type: "ReLU" bottom: "{EVIL}" top: "r" }}\n',
}


@pytest.mark.parametrize("case", sorted(EVIL_NETS))
def test_names_with_control_bytes_print_escaped_and_short(case, tmp_path):
    """A layer, blob or type name with newline, CR or escape bytes prints escaped and
    shortened: one line, no control byte on the terminal."""
    proto = tmp_path / "evil.prototxt"
    proto.write_text(EVIL_NETS[case])
    with pytest.raises(PortingError) as err:
        load_caffe(proto)
    message = str(err.value)
    assert message.isprintable() and len(message) < 400, message
    assert "a\\nb\\rc\\x1b[2J\\x07\\x00d" in message and "..." in message
    out = run("convert", proto, "-o", tmp_path / "o.safetensors")
    assert_one_line_exit_2(out, "evil.prototxt", "a\\nb\\rc\\x1b")
    assert out.stderr.rstrip("\n").isprintable()


def test_inspect_table_escapes_names(tmp_path):
    proto = tmp_path / "evil.prototxt"
    proto.write_text(_INPUT + f'layer {{ name: "{EVIL}" type: "ReLU" bottom: "data" top: "r" }}\n')
    out = run("inspect", proto)
    assert out.returncode == 0, out.stderr
    assert all(line.isprintable() for line in out.stdout.splitlines())
    assert len(out.stdout.splitlines()) == 7  # title, header, rule, a row per layer, the input, the needs


# --------------------------------------------------------------------------- output paths
SMALL = _INPUT + 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 2 } }\n'


@pytest.mark.parametrize("case", ["directory", "file-as-folder"])
def test_convert_output_path_refused_in_one_line(case, tmp_path):
    proto = tmp_path / "small.prototxt"
    proto.write_text(SMALL)
    (tmp_path / "plain").write_text("a file")
    target, problem = {"directory": (tmp_path, "is a directory"),
                       "file-as-folder": (tmp_path / "plain" / "o.safetensors", "not a folder")}[case]
    with pytest.raises(PortingError, match=problem):
        save_converted(load_caffe(proto), target)
    out = run("convert", proto, "-o", target)
    assert_one_line_exit_2(out, str(target), problem)
    assert not list(tmp_path.glob("**/*.part"))


def test_convert_creates_missing_output_folders(tmp_path):
    proto = tmp_path / "small.prototxt"
    proto.write_text(SMALL)
    out = run("convert", proto, "-o", tmp_path / "new" / "sub" / "o.safetensors")
    assert out.returncode == 0, out.stderr
    assert list(load_converted(tmp_path / "new" / "sub" / "o.safetensors").params) == ["fc"]


@pytest.mark.parametrize("body", [
    'layers { layer { name: "v0" type: "nope" } bottom: "data" top: "y" }\n',  # V0 upgrade refuses
    "",  # three input_dim values for one input
])
def test_inspect_upgrade_errors_name_the_file(body, tmp_path):
    proto = tmp_path / "old.prototxt"
    proto.write_text('input: "data"\ninput_dim: 1\ninput_dim: 2\ninput_dim: 3\n' + body)
    assert_one_line_exit_2(run("inspect", proto), "old.prototxt: ")


def test_double_data_beyond_float32_is_inf_without_warning(tmp_path):
    """Blob::FromProto casts double_data to float: beyond float32's range that is inf, as in
    C++, and no NumPy RuntimeWarning reaches the user's terminal."""
    import warnings

    from porting import caffe_pb2
    from porting.parse import read_caffemodel

    net = caffe_pb2.NetParameter()
    layer = net.layer.add(name="s", type="Scale")
    layer.blobs.add(shape=caffe_pb2.BlobShape(dim=[2]), double_data=[1e300, -1e300])
    path = tmp_path / "big.caffemodel"
    path.write_bytes(net.SerializeToString())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = read_caffemodel(path)["s"][0].data
    assert data.tolist() == [np.inf, -np.inf]


# --------------------------------------------------------------------------- a caffemodel that changes
# Each case runs in a child process: a SIGBUS (reading a mapped page the file no longer
# has) would kill the child, and so fail the test, instead of killing pytest.
_CHANGING = r'''
import gc, os, sys
import numpy as np, torch
from porting import PortingError, load_caffe
from porting.saved import load_converted, save_converted
from porting.write import write_caffemodel

folder, case = sys.argv[1], sys.argv[2]
proto, model = os.path.join(folder, "net.prototxt"), os.path.join(folder, "net.caffemodel")
open(proto, "w").write(sys.argv[3])
rng = np.random.default_rng(0)
w = [rng.standard_normal((3, 2, 3, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
f = [rng.standard_normal((4, 27)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]
write_caffemodel(model, [("conv", "Convolution", w), ("fc", "InnerProduct", f)])

def mapped():
    gc.collect()
    return [line for line in open("/proc/self/maps") if line.rstrip().endswith(os.path.realpath(model))]

if case == "after-load":
    net = load_caffe(proto, model)
    assert not mapped(), mapped()  # nothing refers to the file's map once loaded
    x = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    before = net(x)["fc"]
    with open(model, "r+b") as out:  # rewritten in place, shorter: Caffe's own snapshots truncate
        out.truncate(0)
        out.write(b"\x0a\x01x")
    assert torch.equal(net(x)["fc"], before)
    assert np.array_equal(net.params["conv"][0].detach().numpy(), w[0])
    save_converted(net, os.path.join(folder, "o.safetensors"))
    assert torch.equal(load_converted(os.path.join(folder, "o.safetensors"))(x)["fc"], before)
    from porting.cli import main  # the CLI on the rewritten file: one line, exit 2
    assert main(["convert", proto, model, "-o", os.path.join(folder, "p.safetensors")]) == 2
else:
    # the file shrinks while being read: after it was mapped, or after the walk (the data
    # pages are read later, by whoever holds the arrays)
    import mmap as mmap_module
    import porting.parse as parse
    real = parse.mmap.mmap if case == "after-map" else parse._walk

    def shrinking(*args, **kwargs):
        result = real(*args, **kwargs)
        os.truncate(model, 100)
        return result

    if case == "after-map":
        parse.mmap = type("M", (), {"mmap": staticmethod(shrinking), "ACCESS_COPY": mmap_module.ACCESS_COPY})
    else:
        parse._walk = shrinking
    try:
        load_caffe(proto, model)
        raise SystemExit("loaded a file that changed while being read")
    except PortingError as err:
        assert str(err) == f"{model}: the file changed while being read", err
print("ok")
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("case", ["after-load", "after-map", "after-walk"])
def test_caffemodel_changed_during_or_after_load(case, tmp_path):
    """Truncating or rewriting the caffemodel after load_caffe returns changes nothing (the
    net holds copies, the map is gone); while it is being read, it is a one-line error."""
    out = subprocess.run([sys.executable, "-c", _CHANGING, str(tmp_path), case, _net_named("conv", "fc")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stdout, out.stderr)


# --------------------------------------------------------------------------- Exp and Log constants
_EXP_SHIFTS = """layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }
layer { name: "pow" type: "Exp" bottom: "data" top: "pow" exp_param { base: 2 shift: 2147483648 } }
layer { name: "exp" type: "Exp" bottom: "data" top: "exp" exp_param { shift: 2147483648 } }
layer { name: "tiny" type: "Exp" bottom: "data" top: "tiny" exp_param { base: 3 shift: -2147483648 } }
"""


def test_exp_shift_beyond_float_range_is_inf_or_zero_as_in_caffe(tmp_path, caffe_worker):
    """ExpLayer's outer scale pow(base, shift) (exp(shift) for base e) overflows to inf or
    underflows to 0 in Caffe's float; the port computes the same tops (no OverflowError)."""
    proto = tmp_path / "exp.prototxt"
    proto.write_text(_EXP_SHIFTS)
    x = np.array([[-1.0, 0.5, 2.0]], np.float32)
    ours = {k: v.numpy() for k, v in load_caffe(proto)(torch.from_numpy(x)).items()}
    theirs = caffe_worker.run_net(proto, inputs={"data": x})
    for blob, expected in (("pow", np.inf), ("exp", np.inf), ("tiny", 0.0)):
        np.testing.assert_array_equal(theirs[f"blob/{blob}/data"], np.full((1, 3), expected, np.float32))
        np.testing.assert_array_equal(ours[blob], theirs[f"blob/{blob}/data"])


@pytest.mark.parametrize("kind,base,problem", [
    ("Log", "1", "log_param.base 1 has no logarithm (1 / log(base) is inf)"),
    ("Log", "inf", "log_param.base inf has an infinite logarithm"),
    ("Exp", "inf", "exp_param.base inf has an infinite logarithm"),
    ("Exp", "nan", "exp_param.base must be strictly positive (or -1 for e), got nan"),
])
def test_log_and_exp_bases_caffe_checks_refuse(kind, base, problem, tmp_path):
    """LogLayer and ExpLayer CHECK that log(base) (and for Log 1 / log(base)) is finite."""
    proto = tmp_path / "b.prototxt"
    proto.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
                     f'layer {{ name: "l" type: "{kind}" bottom: "data" top: "l" {kind.lower()}_param {{ base: {base} }} }}\n')
    assert_one_line_exit_2(run("inspect", proto), f"{proto}: layer l ({kind}): {problem}")


# --------------------------------------------------------------------------- strides beyond the input
_HUGE_STRIDE = """layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 2 dim: 5 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 2 pad: 1 stride: 65536 stride: 2147483647 } }
layer { name: "deconv" type: "Deconvolution" bottom: "conv" top: "deconv"
        convolution_param { num_output: 2 kernel_size: 3 stride: 2147483647 stride: 65536 } }
"""


def test_stride_beyond_the_input_forward_and_backward_match_caffe(tmp_path, caffe_worker):
    """One window per axis whatever the stride (a Deconvolution of one pixel: one placement):
    Caffe computes it; torch traps (SIGFPE) on a stride near 2^31, so the port passes the
    padded size (Deconvolution: 1). Small integers keep every sum exact, so the arrays
    must be equal bit for bit; run in a child process, where a trap fails the test instead
    of killing pytest."""
    proto, model = tmp_path / "stride.prototxt", tmp_path / "stride.caffemodel"
    proto.write_text(_HUGE_STRIDE)
    rng = np.random.default_rng(0)
    weight = rng.integers(-3, 4, (3, 2, 2, 2)).astype(np.float32)
    bias = rng.integers(-3, 4, 3).astype(np.float32)
    deconv = [rng.integers(-3, 4, (3, 2, 3, 3)).astype(np.float32), rng.integers(-3, 4, 2).astype(np.float32)]
    write_caffemodel(model, [("conv", "Convolution", [weight, bias]), ("deconv", "Deconvolution", deconv)])
    x = rng.integers(-5, 6, (2, 2, 5, 6)).astype(np.float32)
    g = rng.integers(-2, 3, (2, 2, 3, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x), np.save(tmp_path / "g.npy", g)
    child = subprocess.run([sys.executable, "-c", f"""
import numpy as np, torch
from porting import load_caffe
net = load_caffe({str(proto)!r}, {str(model)!r})
x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})).requires_grad_()
blobs = net(x)
top = blobs["deconv"]
top.backward(torch.from_numpy(np.load({str(tmp_path / 'g.npy')!r})))
np.save({str(tmp_path / 'top.npy')!r}, blobs["conv"].detach().numpy())
np.save({str(tmp_path / 'out.npy')!r}, top.detach().numpy()); np.save({str(tmp_path / 'dx.npy')!r}, x.grad.numpy())
"""], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-2000:]
    theirs = caffe_worker.run_net(proto, model, inputs={"data": x}, top_diffs={"deconv": g})
    np.testing.assert_array_equal(np.load(tmp_path / "top.npy"), theirs["blob/conv/data"])
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), theirs["blob/deconv/data"])
    np.testing.assert_array_equal(np.load(tmp_path / "dx.npy"), theirs["blob/data/diff"])
    assert theirs["blob/conv/data"].shape == (2, 3, 1, 1) and theirs["blob/deconv/data"].shape == (2, 2, 3, 3)


@pytest.mark.parametrize("second", [
    'layer { name: "again" type: "DummyData" top: "dummy" dummy_data_param { shape { dim: 2 dim: 3 } } }',
    'layer { name: "again" type: "ReLU" bottom: "data" top: "dummy" }',
    'layer { name: "twice" type: "Split" bottom: "data" top: "s" top: "s" }',
])
def test_top_produced_by_multiple_sources_is_refused(tmp_path, second):
    """Caffe's Net::AppendTop aborts on a top that already exists and is not in place (found by
    the 100,000-input fuzz campaign at seed 10, input 23,693: an Input top written again by a
    DummyData, whose two inputs then shared one fed array); the port refuses it in one line."""
    proto = tmp_path / "twice.prototxt"
    proto.write_text('layer { name: "data" type: "Input" top: "data" top: "dummy" '
                     'input_param { shape { dim: 2 dim: 3 } } }\n' + second + "\n")
    out = subprocess.run([sys.executable, "-m", "porting", "inspect", proto], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "produced by multiple sources" in out.stderr
