"""The resource budget and Caffe's own limits on shapes (hostile-file fuzzer findings).

Tiny prototxts that declare huge or impossible nets are refused from their shapes alone,
before anything is allocated: in Python a PortingError, from the CLI exit 2 with one line
naming the file, the layer and the problem. The hostile cases run in subprocesses under an
address-space limit (RLIMIT_AS), so an allocation of their declared size would fail the
test instead of passing slowly. Geometries Caffe computes cheaply (a pooling kernel or an
LRN window far beyond the blob) load and run, checked against Caffe's loops
(tests/numpy_ref.py) or closed forms. What Caffe 1.0 does with each was measured on real
Caffe (python3-caffe 1.0.0+git20180821, CPU):

- an empty blob (a 0 dim): the net may load, but the first forward aborts (``Check failed:
  data_``), and a weighted layer with an empty blob aborts at load (its filler);
- more than INT_MAX values in a blob: ``blob size exceeds INT_MAX`` (Blob::Reshape);
- an unsigned field above INT_MAX: read as a negative int (kernel -1: ``Filter dimensions
  cannot be zero``); int arithmetic that overflows gives meaningless sizes (a pad of
  2^31 - 1 gave a 4x4 output of zeros);
- LRN local_size 10^8 + 1: its padded-square blob passes INT_MAX at the first forward;
  local_size 10^6 + 1 (ACROSS) and 100001 (WITHIN, whose n * n divisor overflows) ran;
- a pooling kernel of 10^6 with pad 10^6 - 1 on 8x8: 2x2 output, fast (MAX exact; the AVE
  divisor 10^12 overflowed Caffe's int and gave values near -1e-9);
- duplicate layer names: caffemodel blobs go to the first layer of the name, last entry
  wins; a second weighted layer of that name keeps its filler values.
"""
import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import numpy_ref as ref
from porting import PortingError, load_caffe
from porting.budget import Budget, format_bytes, needs, parse_count, parse_size
from porting.graph import build_graph
from porting.layers import build_layer
from porting.layers import lrn as lrn_module
from porting.layers import pooling as pooling_module
from porting.parse import read_prototxt
from porting.upgrade import upgrade_net
from porting.write import write_caffemodel

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference-data"
LIMIT = 1536 << 20  # address space of each hostile subprocess (torch alone maps ~650 MiB)


def _input(*dims, name="data"):
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {shape} }} }} }}\n'


def _layer(name, type_, params="", bottom="data", top=None):
    return (f'layer {{ name: "{name}" type: "{type_}" bottom: "{bottom}" top: "{top or name}" '
            f'{params} }}\n')


def _pool(params):
    return _input(1, 3, 8, 8) + _layer("pool", "Pooling", f"pooling_param {{ {params} }}")


# name -> (prototxt, the layer named in the message, a part of the problem). Each is a few
# hundred bytes; most declare nets of tens of GB to exabytes.
HOSTILE = {
    "int64_dims": (_input(2**40, 2**40, 2**40) + _layer("fc", "InnerProduct", "inner_product_param { num_output: 2 }"),
                   "data", "Input dim 1099511627776 does not fit Caffe's int (Caffe would read it as 0)"),
    "blob_over_int_max": (_input(1, 1, 65536, 32768), "data", "holds 2,147,483,648 values, more than Caffe's INT_MAX"),
    "params_over_int_max": (_input(1, 3, 224, 224) + _layer("fc", "InnerProduct", "inner_product_param { num_output: 400000 }"),
                            "fc", "parameter blob 0: shape 400000x150528 holds 60,211,200,000 values"),
    "33_axes": (_input(*[1] * 33), "data", "33 axes, more than Caffe's 32"),
    "zero_batch": (_input(0, 3, 8, 8) + _layer("conv", "Convolution", "convolution_param { num_output: 2 kernel_size: 3 }"),
                   "data", "shape 0x3x8x8 holds no values"),
    "zero_channels": (_input(1, 0, 8, 8) + _layer("lrn", "LRN", "lrn_param { local_size: 5 }"),
                      "data", "shape 1x0x8x8 holds no values"),
    "zero_output": (_input(1, 3, 1, 8) + _layer("pool", "Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"),
                    "pool", "pooling output would be empty"),
    "zero_num_output": (_input(1, 3) + _layer("fc", "InnerProduct", "inner_product_param { num_output: 0 }"),
                        "fc", "num_output must be positive"),
    "pool_kernel_uint32": (_pool("pool: AVE kernel_size: 4294967295 pad: 4294967290 stride: 1"),
                           "pool", "kernel size 4294967295 does not fit Caffe's int (Caffe would read it as -1)"),
    "pool_kernel_pad_near_2^31": (_pool("pool: MAX kernel_size: 2147483647 pad: 2147483646 stride: 2147483647"),
                                  "pool", "input plus padding (4294967300) overflows Caffe's int arithmetic"),
    "pool_ave_divisor": (_pool("pool: AVE kernel_size: 1000000 pad: 999999 stride: 1000000"),
                         "pool", "AVE window of 1,000,000,000,000 cells"),
    "pool_huge_output": (_pool("pool: MAX kernel_size: 1000000 pad: 999999 stride: 1"),
                         "pool", "more than Caffe's INT_MAX"),
    "conv_kernel_2^31": (_input(1, 3, 8, 8) + _layer("conv", "Convolution", "convolution_param { num_output: 2 kernel_size: 2147483648 }"),
                         "conv", "kernel_size 2147483648 does not fit Caffe's int"),
    "conv_pad_int_max": (_input(1, 3, 8, 8) + _layer("conv", "Convolution", "convolution_param { num_output: 2 kernel_size: 3 pad: 2147483647 }"),
                         "conv", "input plus padding (4294967302) overflows Caffe's int arithmetic"),
    "lrn_local_size_uint32": (_input(1, 3, 8, 8) + _layer("lrn", "LRN", "lrn_param { local_size: 4294967295 }"),
                              "lrn", "local_size 4294967295 does not fit Caffe's int"),
    "lrn_padded_square": (_input(1, 3, 8, 8) + _layer("lrn", "LRN", "lrn_param { local_size: 100000001 }"),
                          "lrn", "Caffe's padded-square blob shape 1x100000003x8x8 holds 6,400,000,192 values"),
    "lrn_within_divisor": (_input(1, 3, 8, 8) + _layer("lrn", "LRN", "lrn_param { local_size: 100001 norm_region: WITHIN_CHANNEL }"),
                           "lrn", "the AVE divisor n * n overflows Caffe's int"),
    # 6.0 GiB each for the input, the IP weights and two convolution tops, 23.8 GiB in all:
    # above what this process may allocate (RLIMIT_AS) and than the limits set below.
    "memory_budget": (_input(1, 1, 40000, 40000)
                      + _layer("fc", "InnerProduct", "inner_product_param { num_output: 1 }")
                      + _layer("conv", "Convolution", "convolution_param { num_output: 1 kernel_size: 1 }")
                      + _layer("relu", "ReLU", bottom="conv", top="conv"),
                      "fc", "needs 23.8 GiB for parameters and activations at batch 1 (this layer 6.0 GiB), above the limit of"),
}


def _limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def _run_limited(args, env=None):
    """``python args...`` under the address-space limit."""
    import os

    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          preexec_fn=_limit_address_space, env={**os.environ, **(env or {})}, timeout=300)


def _assert_one_line_exit_2(out, *named):
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    for text in named:
        assert text in out.stderr, out.stderr


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    paths = {}
    for name, (text, _, _) in HOSTILE.items():
        paths[name] = folder / f"{name}.prototxt"
        paths[name].write_text(text)
        assert len(text) < 600  # a few hundred bytes each
    return paths


_PROBE = textwrap.dedent("""
    import json, sys, torch
    from porting import PortingError, load_caffe
    for path in sys.argv[1:]:
        try:
            net = load_caffe(path)
            blobs = net(**{k: torch.ones(v) for k, v in net.inputs.items()})
            print(json.dumps({"path": path, "ok": {k: list(v.shape) for k, v in blobs.items()}}))
        except PortingError as err:
            print(json.dumps({"path": path, "refused": str(err)}))
""")


def test_hostile_nets_refused_in_python_under_an_address_space_limit(hostile):
    """One subprocess (RLIMIT_AS 1.5 GiB) loads every hostile net with the default budget:
    each is a PortingError of one printable line naming the file, the layer and the problem,
    and no case dies of an allocation (that would be an exception, not a line)."""
    out = _run_limited(["-c", _PROBE, *hostile.values()])
    assert out.returncode == 0, out.stderr[-3000:]
    results = {Path(r["path"]).stem: r for r in map(json.loads, out.stdout.splitlines())}
    assert set(results) == set(HOSTILE)
    for name, (_, layer, problem) in HOSTILE.items():
        message = results[name].get("refused")
        assert message is not None, (name, results[name])
        assert message.isprintable() and message.startswith(f"{hostile[name]}: layer {layer}"), (name, message)
        assert problem in message, (name, message)


@pytest.mark.parametrize("name", ["int64_dims", "pool_kernel_pad_near_2^31", "lrn_padded_square"])
def test_hostile_shapes_refused_by_the_cli(hostile, name, tmp_path):
    _, layer, problem = HOSTILE[name]
    out = _run_limited(["-m", "porting", "convert", hostile[name], "-o", tmp_path / "x.safetensors"])
    _assert_one_line_exit_2(out, str(hostile[name]), f"layer {layer}", problem)
    assert not (tmp_path / "x.safetensors").exists()


def test_memory_budget_from_option_and_environment(hostile, tmp_path):
    """The limit named in the message is the one set, by option or environment variable."""
    proto, output = hostile["memory_budget"], tmp_path / "x.safetensors"
    out = _run_limited(["-m", "porting", "convert", proto, "-o", output, "--memory-limit", "1G"])
    _assert_one_line_exit_2(out, f"{proto}: layer fc: needs 23.8 GiB", "above the limit of 1.0 GiB",
                            "(set --memory-limit or PORTING_MEMORY_LIMIT)")
    out = _run_limited(["-m", "porting", "convert", proto, "-o", output], env={"PORTING_MEMORY_LIMIT": "512M"})
    _assert_one_line_exit_2(out, "above the limit of 512.0 MiB")
    out = _run_limited(["-m", "porting", "convert", proto, "-o", output, "--memory-limit", "4x"])
    _assert_one_line_exit_2(out, "porting: --memory-limit: cannot read '4x' as a size")
    assert not output.exists()


def test_work_budget_refuses_a_small_net_of_huge_work(tmp_path):
    """64 MiB each of input, weights and output (a 1x1 convolution: no column buffer), but
    4096^3 = 6.9e10 multiply-adds per forward."""
    proto = tmp_path / "work.prototxt"
    proto.write_text(_input(1, 4096, 64, 64)
                     + _layer("conv", "Convolution", "convolution_param { num_output: 4096 kernel_size: 1 bias_term: false }"))
    with pytest.raises(PortingError) as err:
        load_caffe(proto, budget=Budget(work=10**10))
    assert str(err.value) == (f"{proto}: layer conv: needs 6.87e+10 multiply-adds for a forward at batch 1 "
                              "(this layer 6.87e+10), above the limit of 1e+10 (set --work-limit or PORTING_WORK_LIMIT)")
    out = _run_limited(["-m", "porting", "convert", proto, "-o", tmp_path / "x.safetensors", "--work-limit", "1e10"])
    _assert_one_line_exit_2(out, "needs 6.87e+10 multiply-adds")


def test_inspect_of_a_trillion_parameters_allocates_nothing(tmp_path):
    """500 InnerProduct layers of 2e9 weights each (10^12 parameters, 3.6 TiB): inspect
    prints their table and needs under a 1 GiB address-space limit."""
    proto = tmp_path / "trillion.prototxt"
    proto.write_text(_input(1, 100000) + "".join(
        _layer(f"fc{i}", "InnerProduct", "inner_product_param { num_output: 20000 }", top=f"fc{i}") for i in range(500)))
    out = subprocess.run([sys.executable, "-m", "porting", "inspect", proto], capture_output=True, text=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)), timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 + 501 + 2
    assert lines[-3].split()[-2:] == ["2,000,020,000", "yes"]  # fc499: 20000 x 100000 weights + 20000 biases
    assert lines[-2] == "input data (Input data): 1x100000, shape from input_param"
    assert lines[-1] == ("needs 3.6 TiB for parameters and activations at batch 1, "
                         "1e+12 multiply-adds per forward")


# --------------------------------------------------------------------------- budget arithmetic
def test_needs_count_parameters_activations_batch_and_gradients(tmp_path):
    """conv 3x3 (2 -> 3 channels) and fc (27 -> 4) on a 1x2x5x5 input: 57 + 112 parameters;
    activations 50 (input) + 27 (conv) + 4 (fc) per item; the conv's column buffer 18 x 9
    values (kernel_dim x output pixels, one image, as Caffe's col_buffer_)."""
    proto = tmp_path / "small.prototxt"
    proto.write_text(_input(1, 2, 5, 5)
                     + _layer("conv", "Convolution", "convolution_param { num_output: 3 kernel_size: 3 }")
                     + _layer("fc", "InnerProduct", "inner_product_param { num_output: 4 }", bottom="conv"))
    graph = build_graph(upgrade_net(read_prototxt(proto)), shape_only=True)
    one = needs(graph)
    assert [row[1] for row in one.layers] == [4 * 50, 4 * (57 + 27 + 162), 4 * (112 + 4)]
    assert one.memory == 4 * (169 + 81 + 162)
    assert [row[2] for row in one.layers] == [50, 27 * 18, 4 * 27]  # one per top, then products
    ten = needs(graph, batch=10, backward=True)
    assert ten.memory == 2 * 4 * (169 + 810 + 162) and ten.work == 3 * 10 * (50 + 27 * 18 + 4 * 27)
    assert ten.summary() == ("needs 8.9 KiB for parameters, activations and their gradients at batch 10, "
                             "1.93e+04 multiply-adds per forward and backward")
    with pytest.raises(PortingError, match=r"layer data: needs 8.9 KiB .* \(this layer 3.9 KiB\), above the limit of 8.0 KiB"):
        build_graph(upgrade_net(read_prototxt(proto)), source=proto,
                    budget=Budget(memory=8 << 10, batch=10, backward=True))


@pytest.mark.parametrize("text,value", [("4G", 4 << 30), ("512M", 512 << 20), ("4GiB", 4 << 30), ("4GB", 4 * 10**9),
                                        ("1.5T", 3 << 39), ("17179869184", 17179869184), ("2k", 2048), (" 8 MB", 8 * 10**6),
                                        ("none", None), ("OFF", None)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text,value", [("1e13", 10**13), ("10T", 10**13), ("2.5G", 25 * 10**8), ("none", None)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["4x", "-1", "0", "", "1e999", "G", "4GiBs", "nan"])
def test_unreadable_limits_are_one_line_errors(text):
    with pytest.raises(PortingError) as err:
        parse_size(text, "PORTING_MEMORY_LIMIT")
    assert str(err.value).startswith("PORTING_MEMORY_LIMIT: ") and "\n" not in str(err.value)
    with pytest.raises(PortingError):
        parse_count(text + "B")


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1536, 206 * 10**9, 2**70)] == \
        ["0 B", "1023 B", "1.5 KiB", "191.9 GiB", "1.0 ZiB"]


def test_reference_nets_pass_the_default_budget():
    """AlexNet (60,965,224 parameters) and GoogLeNet (6,998,552) load at the default limit;
    their needs are these counts, their activations and the convolutions' column buffers
    (kernel_dim x output pixels of one image, none for a plain 1x1), in float32."""
    protos = {"bvlc_alexnet.deploy.prototxt": 60965224, "bvlc_googlenet.deploy.prototxt": 6998552}
    if not all((SHARED / "bvlc-prototxt" / p).exists() for p in protos):
        pytest.skip(f"reference prototxts not found under {SHARED}")
    for name, params in protos.items():
        net = load_caffe(SHARED / "bvlc-prototxt" / name)
        assert sum(p.numel() for p in net.parameters()) == params
        activations = sum(np.prod(s) for spec in net.graph.layers for s in spec.module.top_shapes)
        columns = 0
        for spec in net.graph.layers:
            if spec.type == "Convolution" and spec.module.workspace():
                out_c, in_c, kh, kw = spec.module.param_shapes[0]
                top = spec.module.top_shapes[0]
                columns += in_c * spec.module.group * kh * kw * top[2] * top[3]
        assert columns > 0 and needs(net.graph).memory == 4 * (params + activations + columns)


# --------------------------------------------------------------------------- cheap in Caffe: computed
def _check_pool_against_caffe_loops(method, x, kernel, stride, pad):
    pooled = ref.pool_geometry(*x.shape[2:], kernel, stride, pad)
    text = (f'name: "pool" type: "Pooling" pooling_param {{ pool: {method} kernel_h: {kernel[0]} kernel_w: {kernel[1]} '
            f'stride_h: {stride[0]} stride_w: {stride[1]} pad_h: {pad[0]} pad_w: {pad[1]} }}')
    top, mask = ref.pool_forward(x, method, kernel, stride, pad, pooled)
    dy = ref.f32(np.random.default_rng(1).normal(size=top.shape))
    dx = ref.pool_backward(dy, x.shape, method, kernel, stride, pad, mask)
    magnitudes = {("top", 0): ref.pool_forward(np.abs(x), method, kernel, stride, pad, pooled)[0],
                  ("bottom diff", 0): ref.pool_backward(np.abs(dy), x.shape, method, kernel, stride, pad, mask)}
    ref.check_layer(text, [x], [dy], [top], [dx], tol32=6e-7, magnitudes=magnitudes)
    layer = build_layer(text, [x.shape])
    if method == "MAX":  # Caffe's mask: the first maximum in scan order, -1 for an empty window
        assert torch.equal(layer.decisions([torch.as_tensor(x)])[0], torch.as_tensor(mask))
    return top


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_kernel_far_beyond_the_input_runs_as_caffe(method):
    """Kernel 40000 with pad 39999 on 8x8 (and 6x5): Caffe's windows clipped to the image,
    without the 80000 x 80000 padded cover."""
    rng = np.random.default_rng(0)
    x = ref.f32(np.maximum(rng.normal(size=(2, 3, 8, 8)), 0))  # ReLU-style ties at 0
    top = _check_pool_against_caffe_loops(method, x, (40000, 40000), (40000, 20000), (39999, 39999))
    assert top.shape == (2, 3, 2, 3)
    x = ref.f32(rng.normal(size=(1, 2, 6, 5)))
    _check_pool_against_caffe_loops(method, x, (40000, 3), (17, 2), (39999, 1))


@settings(max_examples=ref.EXAMPLES, deadline=None)
@given(method=st.sampled_from(["MAX", "AVE"]), size=st.tuples(st.integers(1, 7), st.integers(1, 7)),
       kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)), stride=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       pad_frac=st.tuples(st.integers(0, 4), st.integers(0, 4)), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_clipped_pooling_path_matches_caffe_loops(method, size, kernel, stride, pad_frac, relu, seed):
    """The gathering path, forced on the small geometries of real nets, against Caffe's loops
    (forward, backward, and the MAX winners including ties and empty windows)."""
    pad = tuple(min(p, k - 1) for p, k in zip(pad_frac, kernel))
    assume(min(ref.pool_geometry(*size, kernel, stride, pad)) > 0)
    x = ref.f32(np.random.default_rng(seed).normal(size=(2, 2) + size))
    x = np.maximum(x, 0) if relu else x
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pooling_module, "_use_cover", lambda *args: False)
        _check_pool_against_caffe_loops(method, x, kernel, stride, pad)


def test_lrn_window_far_beyond_the_channels_runs_as_caffe():
    """ACROSS with local_size 2001 on 3 channels against Caffe's formula (forward, backward),
    and local_size 10^6 + 1: every window covers every channel, so scale = k + alpha/n * sum
    over all channels (Caffe ran this one)."""
    rng = np.random.default_rng(0)
    x = ref.f32(rng.normal(size=(2, 3, 4, 5)))
    top, scale = ref.lrn_across_forward(x, 2001, 2.0, 0.75, 1.5)
    dy = ref.f32(rng.normal(size=x.shape))
    dx = ref.lrn_across_backward(x, top, scale, dy, 2001, 2.0, 0.75)
    text = 'name: "n" type: "LRN" lrn_param { local_size: %d alpha: 2 beta: 0.75 k: 1.5 }'
    ref.check_layer(text % 2001, [x], [dy], [top], [dx], tol32=1e-5)
    layer = build_layer(text % 1000001, [x.shape]).double()
    y = layer(torch.as_tensor(x))[0].numpy()
    expected = x * (1.5 + 2.0 / 1000001 * (x ** 2).sum(axis=1, keepdims=True)) ** -0.75
    np.testing.assert_allclose(y, expected, rtol=1e-13)


def test_lrn_channel_sum_adds_only_shifts_that_reach_a_channel():
    """Bit for bit the sum over every shift of the zero-padded channels (as before the change)."""
    t = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(0)) ** 2
    for size in (1, 3, 5, 9, 11, 31):
        for front in {(size - 1) // 2, size - (size + 1) // 2}:
            padded = torch.nn.functional.pad(t, (0, 0, 0, 0, front, size - 1 - front))
            total = padded[:, 0:5].clone()
            for i in range(1, size):
                total.add_(padded[:, i:i + 5])
            assert torch.equal(lrn_module._window_sum_over_channels(t, size, front), total), (size, front)


def test_lrn_within_channel_window_far_beyond_the_plane():
    """WITHIN_CHANNEL, local_size 40001 on 8x8: the AVE pooling sub-layer clipped to the plane."""
    rng = np.random.default_rng(0)
    x = ref.f32(rng.normal(size=(1, 2, 8, 8)))
    top, _ = ref.lrn_within_forward(x, 40001, 3.0, 0.75)
    layer = build_layer('name: "n" type: "LRN" lrn_param { local_size: 40001 alpha: 3 beta: 0.75 '
                        'norm_region: WITHIN_CHANNEL }', [x.shape]).double()
    np.testing.assert_allclose(layer(torch.as_tensor(x))[0].numpy(), top, rtol=1e-12)


def test_convolution_window_wider_than_the_padded_input_gives_caffes_output(tmp_path):
    """Kernel 4x3, stride 2 on 3x5: C++ truncation gives (3 - 4) / 2 + 1 = 1 row; Caffe's
    im2col reads zeros past the input. Real Caffe gave 45.5 at both outputs for these
    weights (1..12) and bias 0.5 on an input of ones."""
    proto = tmp_path / "wide.prototxt"
    proto.write_text(_input(1, 1, 3, 5) + _layer("c", "Convolution",
                                                 "convolution_param { num_output: 1 kernel_h: 4 kernel_w: 3 stride: 2 }"))
    model = tmp_path / "wide.caffemodel"
    write_caffemodel(model, [("c", "Convolution", [np.arange(1, 13, dtype=np.float32).reshape(1, 1, 4, 3),
                                                    np.array([0.5], np.float32)])])
    net = load_caffe(proto, model)
    assert net(torch.ones(1, 1, 3, 5))["c"].tolist() == [[[[45.5, 45.5]]]]


# --------------------------------------------------------------------------- duplicate names
def _duplicate_net(second_type="Convolution"):
    conv = 'convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "constant" value: 7 } }'
    second = conv if second_type == "Convolution" else ""
    return (_input(1, 2, 3, 3) + _layer("c", "Convolution", conv, top="a")
            + _layer("c", second_type, second, bottom="a", top="b"))


def _duplicate_weights(path, entries):
    """A caffemodel with one "c" entry per (weight, bias) value pair."""
    blobs = [[np.full((2, 2, 1, 1), w, np.float32), np.full(2, b, np.float32)] for w, b in entries]
    write_caffemodel(path, [("c", "Convolution", b) for b in blobs])
    return path


def test_second_weighted_layer_of_a_name_is_refused(tmp_path):
    """Caffe would copy the caffemodel's "c" to the first layer only and keep filler values
    in the second; the port refuses the second, with or without a caffemodel."""
    proto = tmp_path / "dup.prototxt"
    proto.write_text(_duplicate_net())
    model = _duplicate_weights(tmp_path / "dup.caffemodel", [(1, 10), (2, 20)])
    for weights in (model, None):
        with pytest.raises(PortingError) as err:
            load_caffe(proto, weights)
        assert str(err.value).startswith(f"{proto}: layer c (layer 3): a weighted layer with the name of layer 2")
    out = subprocess.run([sys.executable, "-m", "porting", "convert", proto, model, "-o", tmp_path / "x.safetensors"],
                         capture_output=True, text=True)
    _assert_one_line_exit_2(out, "layer c (layer 3)", "rename one of them")


def test_duplicate_names_weights_go_to_the_first_layer_as_in_caffe(tmp_path, caffe_worker):
    """A convolution "c" then a ReLU "c": Caffe copies the caffemodel's "c" (the last of two
    entries) to the convolution; so does the port, and both compute the same blobs."""
    proto = tmp_path / "dup.prototxt"
    proto.write_text(_duplicate_net("ReLU"))
    model = _duplicate_weights(tmp_path / "dup.caffemodel", [(1, 10), (-2, 0.5)])
    x = np.random.default_rng(0).normal(size=(1, 2, 3, 3)).astype(np.float32)
    caffe = caffe_worker.run_net(proto, model, inputs={"data": x}, blobs=["a", "b"])
    net = load_caffe(proto, model)
    blobs = net(torch.as_tensor(x))
    np.testing.assert_array_equal(net.params["c"][0].detach().numpy(), np.full((2, 2, 1, 1), -2, np.float32))
    for blob in ("a", "b"):
        np.testing.assert_allclose(blobs[blob].detach().numpy(), caffe[f"blob/{blob}/data"], rtol=1e-6, atol=1e-6)
    assert (caffe["blob/b/data"] == np.maximum(caffe["blob/a/data"], 0)).all() and caffe["blob/b/data"].any()
    assert list(net(torch.as_tensor(x), end="c")) == ["data", "a"]  # pycaffe's end=: the first of the name


def test_duplicate_names_second_weighted_keeps_caffes_filler(tmp_path, caffe_worker):
    """What the refusal is about: in Caffe the second "c" keeps its filler (7), not the blobs."""
    proto = tmp_path / "dup.prototxt"
    proto.write_text(_duplicate_net())
    model = _duplicate_weights(tmp_path / "dup.caffemodel", [(1, 10), (2, 20)])
    caffe = caffe_worker.run_net(proto, model, inputs={"data": np.ones((1, 2, 3, 3), np.float32)}, blobs=["a", "b"])
    assert (caffe["blob/a/data"] == 2 * 2 + 20).all()  # the last "c" entry, in the first layer
    assert (caffe["blob/b/data"] == 7 * 24 * 2).all()  # the filler, in the second


def test_verify_and_export_check_the_budget_at_their_batch(tmp_path):
    """verify (with a backward) and export take the same options; the batch they run at is
    the one budgeted, and they refuse before starting the legacy stack or tracing."""
    proto, model = tmp_path / "fc.prototxt", tmp_path / "fc.caffemodel"
    proto.write_text(_input(1, 3, 8, 8) + _layer("fc", "InnerProduct", "inner_product_param { num_output: 10 }"))
    rng = np.random.default_rng(0)
    write_caffemodel(model, [("fc", "InnerProduct", [rng.standard_normal((10, 192)).astype(np.float32),
                                                     rng.standard_normal(10).astype(np.float32)])])
    # Parameters 7,720 bytes; activations (192 + 10) x 4 bytes a sample: 815,720 bytes at
    # batch 1000 for export's forward, twice that (1.6 MiB) with verify's gradients.
    out = _run_limited(["-m", "porting", "verify", proto, model, "--report", tmp_path / "r",
                        "--batch", "1000", "--memory-limit", "1M"])
    _assert_one_line_exit_2(out, f"{proto}: layer ", "needs 1.6 MiB", "at batch 1000", "above the limit of 1.0 MiB")
    assert not (tmp_path / "r").exists()
    out = _run_limited(["-m", "porting", "export", proto, model, "--onnx", tmp_path / "x.onnx",
                        "--batch", "1000", "--memory-limit", "512K"])
    _assert_one_line_exit_2(out, "needs 796.6 KiB", "at batch 1000", "above the limit of 512.0 KiB")
    assert not (tmp_path / "x.onnx").exists()
