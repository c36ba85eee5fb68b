"""MVN, SPP, Embed, Parameter, Im2col, BatchReindex, Filter and HDF5Output against real Caffe 1.0.

Each case is a small net (Input layers, then the layer under test, sometimes a partner)
run by Caffe in the TEST phase with seeded inputs and top diffs, and by the port from the
same prototxt and caffemodel; tops, bottom diffs and parameter diffs (``run_net``'s
``param/<layer>/<i>/diff``) are compared as max |port - caffe| / max |caffe|.

Tolerances (both sides float32; measured maxima with LAYER_ERRORS_LOG in ``TOL``): "exact"
(copies and MAX pooling: Parameter, Embed without bias, BatchReindex, Filter, SPP MAX of one
level) must be equal bit for bit; "order" (Im2col's col2im, SPP's sum over levels: the same
terms, at most 9, added in another order, each within gamma(8) of their magnitudes) and
"sum" (SPP AVE, Embed's bias) 1e-6; "mvn" (a mean, a root and a quotient: rounding of
order dim * 2^-24 of the row's scale, dim <= 60 here) 1e-6 as well. The MVN bound itself is
checked against Caffe in tests/test_bounds.py.

Under force_backward (run_net with top diffs) Caffe aborts in the backward of Embed,
BatchReindex and Filter: each refuses to send a gradient to its index bottom
(``test_caffe_refuses_to_backpropagate_to_indices``). Their backward is compared with
Caffe's Net::Backward without force_backward instead (``test_index_layers_backward_matches_caffe``:
the Embed table and bias, the gathered and filtered data, measured 0 but the bias' sum,
4.9e-8), and checked against NumPy loops written after Caffe's Backward_cpu (repeats,
NaN selectors, an empty selection).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numpy_ref as ref
from porting import load_caffe
from porting.errors import PortingError
from porting.write import write_caffemodel
from test_layers_caffe import _ties

TOL = {
    "exact": 0.0,  # measured 0
    "order": 1e-6,  # measured 1.2e-7 (Im2col diff, axis 2), SPP MAX levels 0
    "sum": 1e-6,  # measured 7.2e-8 (SPP AVE diff); Embed's bias top 0
    "mvn": 1e-6,  # measured 2.5e-7 (top), 2.1e-7 (diff)
}


def _inputs_text(shapes: dict) -> str:
    return "".join(f'layer {{ name: "in_{k}" type: "Input" top: "{k}" input_param {{ shape {{ '
                   f'{" ".join(f"dim: {d}" for d in s)} }} }} }}\n' for k, s in shapes.items())


def _layer(name, type_, bottoms, tops, body=""):
    return (f'layer {{ name: "{name}" type: "{type_}" ' + " ".join(f'bottom: "{b}"' for b in bottoms) + " "
            + " ".join(f'top: "{t}"' for t in tops) + f" {body} }}\n")


def _compare(caffe_worker, tmp_path, text, inputs, diff_tops, family, blobs=None, backward=True,
             grad_inputs=None):
    """Run both; assert tops (and diffs) within TOL[family]. Returns (caffe result, port net, port tops)."""
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text('name: "vision"\n' + text)
    caffemodel = None
    if blobs:
        caffemodel = tmp_path / "net.caffemodel"
        write_caffemodel(caffemodel, blobs)
    net = load_caffe(prototxt, caffemodel)
    grad_inputs = set(inputs) if grad_inputs is None else set(grad_inputs)
    xs = {k: torch.tensor(v, requires_grad=backward and k in grad_inputs) for k, v in inputs.items()}
    out = net(**xs)
    diffs = {t: ref.seeded_normal(tuple(out[t].shape), 300 + i) for i, t in enumerate(diff_tops)} if backward else None
    caffe = caffe_worker.run_net(prototxt, caffemodel, inputs=inputs, top_diffs=diffs, params=bool(blobs))
    tol = TOL[family]
    for t in diff_tops:
        want = caffe[f"blob/{t}/data"]
        assert out[t].shape == want.shape, f"top {t}: shape {tuple(out[t].shape)} != Caffe's {want.shape}"
        err = ref.rel_err(out[t].detach().numpy(), want)
        ref.log_error(family, f"top {t}", err)
        assert err <= tol, f"top {t}: rel err {err:.3g} > {tol:g}"
    if not backward:
        return caffe, net, out
    pairs = [(out[t], torch.tensor(diffs[t])) for t in diff_tops if out[t].requires_grad]
    torch.autograd.backward([p for p, _ in pairs], [d for _, d in pairs])
    for name in grad_inputs:
        want = caffe[f"blob/{name}/diff"]
        got = np.zeros_like(want) if xs[name].grad is None else xs[name].grad.numpy()
        err = ref.rel_err(got, want)
        ref.log_error(family, f"diff {name}", err)
        assert err <= tol, f"diff {name}: rel err {err:.3g} > {tol:g}"
    for layer, params in net.params.items():
        for i, p in enumerate(params):
            want = caffe[f"param/{layer}/{i}/diff"]
            got = np.zeros_like(want) if p.grad is None else p.grad.numpy()
            err = ref.rel_err(got, want)
            ref.log_error(family, f"param diff {layer}/{i}", err)
            assert err <= tol, f"param diff {layer}/{i}: rel err {err:.3g} > {tol:g}"
    return caffe, net, out


# ------------------------------------------------------------------------------------------ MVN

MVN_CASES = [
    ("default", (2, 3, 5, 4), ""),
    ("across-channels", (2, 3, 5, 4), "mvn_param { across_channels: true }"),
    ("mean-only", (2, 3, 5, 4), "mvn_param { normalize_variance: false }"),
    ("mean-only-across", (2, 3, 4, 5), "mvn_param { normalize_variance: false across_channels: true }"),
    ("large-eps", (2, 3, 5, 4), "mvn_param { eps: 0.5 }"),  # Caffe's backward is not the derivative here
    ("3-axis", (2, 3, 6), "mvn_param { across_channels: true eps: 0.01 }"),  # top (2, 3, 6, 1)
    ("2-axis-single-values", (2, 3), ""),  # one value per row: zero variance, y = 0, dx = g / eps
]


@pytest.mark.parametrize("shape,body", [pytest.param(s, b, id=i) for i, s, b in MVN_CASES])
def test_mvn_matches_caffe(caffe_worker, tmp_path, shape, body):
    text = _inputs_text({"x": shape}) + _layer("mvn", "MVN", ["x"], ["y"], body)
    x = ref.seeded_normal(shape, 1, scale=0.2) + np.float32(0.5)
    _, _, out = _compare(caffe_worker, tmp_path, text, {"x": x}, ["y"], "mvn")
    assert out["y"].dim() == 4  # Caffe's top is (num, channels, height, width)


def test_mvn_backward_is_caffes_formula_not_the_derivative(caffe_worker, tmp_path):
    """With eps comparable to the rows' standard deviation Caffe's (g - mean g - y mean(y g)) / d
    differs from the derivative of its forward; the port gives Caffe's."""
    shape = (1, 2, 4, 4)
    text = _inputs_text({"x": shape}) + _layer("mvn", "MVN", ["x"], ["y"], "mvn_param { eps: 0.5 }")
    x = ref.seeded_normal(shape, 2, scale=0.3)
    caffe, _, _ = _compare(caffe_worker, tmp_path, text, {"x": x}, ["y"], "mvn")
    xd = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    rows = xd.reshape(2, -1)
    c = rows - rows.mean(1, keepdim=True)
    y = c / (c.pow(2).mean(1, keepdim=True).sqrt() + 0.5)
    y.backward(torch.tensor(ref.seeded_normal(shape, 300), dtype=torch.float64).reshape(2, -1))
    assert ref.rel_err(xd.grad.numpy(), caffe["blob/x/diff"]) > 1e-2


# ------------------------------------------------------------------------------------------ SPP

@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("height,shape", [(1, (2, 3, 9, 8)), (2, (2, 3, 9, 8)), (3, (2, 3, 9, 8)),
                                          (3, (1, 2, 13, 6)), (2, (1, 2, 2, 3))])
def test_spp_matches_caffe(caffe_worker, tmp_path, pool, height, shape):
    text = _inputs_text({"x": shape}) + _layer("spp", "SPP", ["x"], ["y"],
                                               f"spp_param {{ pyramid_height: {height} pool: {pool} }}")
    x = _ties(shape, 3, -2, 2) if pool == "MAX" else ref.seeded_normal(shape, 3)  # ties: Caffe's first maximum
    family = ("exact" if height == 1 else "order") if pool == "MAX" else "sum"
    _compare(caffe_worker, tmp_path, text, {"x": x}, ["y"], family)


# ------------------------------------------------------------------------------------------ Embed

def _embed_blobs(k, n, bias, seed=5):
    blobs = [ref.seeded_normal((k, n), seed)] + ([ref.seeded_normal((n,), seed + 1)] if bias else [])
    return [("embed", "Embed", blobs)]


@pytest.mark.parametrize("bias", [True, False])
def test_embed_forward_matches_caffe(caffe_worker, tmp_path, bias):
    index = np.array([[0, 3, 1, 4], [4, 4, 2, 0]], np.float32)
    index[0, 1] = 3.75  # Caffe truncates a non-integer index (static_cast<int>)
    body = f"embed_param {{ num_output: 6 input_dim: 5{'' if bias else ' bias_term: false'} }}"
    text = _inputs_text({"i": (2, 4)}) + _layer("embed", "Embed", ["i"], ["y"], body)
    _, net, out = _compare(caffe_worker, tmp_path, text, {"i": index}, ["y"], "sum" if bias else "exact",
                           blobs=_embed_blobs(5, 6, bias), backward=False)
    assert tuple(out["y"].shape) == (2, 4, 6)


def test_embed_backward_is_caffes_scatter():
    """No gradient to the indices; the weights' gradient adds each top row's diff to the row
    it read (Caffe's axpy loop), the bias' the sum of all rows (its gemv)."""
    index = np.array([[0, 3, 1], [3, 3, 2]], np.float32)
    from porting.layers import build_layer

    w, b = ref.seeded_normal((4, 5), 6), ref.seeded_normal((5,), 7)
    layer = build_layer('top: "y" type: "Embed" embed_param { num_output: 5 input_dim: 4 }', [index.shape], [w, b])
    x = torch.tensor(index, requires_grad=True)
    (y,) = layer(x)
    g = ref.seeded_normal((2, 3, 5), 8)
    y.backward(torch.tensor(g))
    want_w = np.zeros_like(w)
    for n, k in enumerate(index.reshape(-1).astype(int)):
        want_w[k] += g.reshape(-1, 5)[n]
    np.testing.assert_allclose(layer.blobs[0].grad.numpy(), want_w, rtol=0, atol=4e-7)
    np.testing.assert_allclose(layer.blobs[1].grad.numpy(), g.reshape(-1, 5).sum(0), rtol=0, atol=1e-6)
    assert x.grad is None


# ------------------------------------------------------------------------------------------ Parameter

def test_parameter_matches_caffe(caffe_worker, tmp_path):
    """The top is the blob: its data, and its diff is the blob's diff (here through an Eltwise
    with an input, so the data's diff reaches the blob as Caffe's shared diff)."""
    shape = (2, 3, 4)
    text = (_inputs_text({"x": shape}) + _layer("param", "Parameter", [], ["p"], "parameter_param { shape { "
                                                "dim: 2 dim: 3 dim: 4 } }")
            + _layer("prod", "Eltwise", ["x", "p"], ["y"], "eltwise_param { operation: PROD }"))
    blobs = [("param", "Parameter", [ref.seeded_normal(shape, 9)])]
    caffe, net, out = _compare(caffe_worker, tmp_path, text, {"x": ref.seeded_normal(shape, 10)}, ["y"], "exact", blobs=blobs)
    np.testing.assert_array_equal(out["p"].detach().numpy(), caffe["blob/p/data"])
    np.testing.assert_array_equal(caffe["param/param/0/diff"], caffe["blob/p/diff"])


def test_parameter_alone_top_diff_is_blob_diff(caffe_worker, tmp_path):
    text = _layer("param", "Parameter", [], ["p"], "parameter_param { shape { dim: 3 dim: 2 } }")
    _compare(caffe_worker, tmp_path, text, {}, ["p"], "exact", blobs=[("param", "Parameter", [ref.seeded_normal((3, 2), 11)])])


# ------------------------------------------------------------------------------------------ Im2col

IM2COL_CASES = [
    ("k3-s2-p1-d2", (2, 3, 7, 6), "kernel_size: 3 stride: 2 pad: 1 dilation: 2"),
    ("asymmetric", (1, 2, 6, 7), "kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 2 pad_w: 0"),
    ("per-axis-repeated", (1, 2, 5, 6), "kernel_size: 2 kernel_size: 3 stride: 2 stride: 1 pad: 0 pad: 1"),
    ("window-past-input", (1, 1, 3, 4), "kernel_size: 5 stride: 3 pad: 0"),  # one window, zeros past the input
    ("1-d", (2, 3, 9), "kernel_size: 3 stride: 2 pad: 1"),
    ("3-d", (1, 2, 4, 5, 3), "kernel_size: 2 stride: 1 pad: 1 stride: 2 stride: 1"),
    ("axis-2", (2, 2, 3, 6, 5), "kernel_size: 3 axis: 2 pad: 1"),
    ("force-nd", (1, 2, 6, 5), "kernel_size: 3 stride: 2 force_nd_im2col: true"),
]


@pytest.mark.parametrize("shape,body", [pytest.param(s, b, id=i) for i, s, b in IM2COL_CASES])
def test_im2col_matches_caffe(caffe_worker, tmp_path, shape, body):
    text = _inputs_text({"x": shape}) + _layer("cols", "Im2col", ["x"], ["y"], f"convolution_param {{ {body} }}")
    _compare(caffe_worker, tmp_path, text, {"x": ref.seeded_normal(shape, 12)}, ["y"], "order")


# ------------------------------------------------------------------------------------------ BatchReindex, Filter

def test_batch_reindex_forward_matches_caffe(caffe_worker, tmp_path):
    """Repeats, a left-out item and a non-integer index (Caffe truncates 2.5 to 2)."""
    text = _inputs_text({"x": (4, 3, 2), "p": (6,)}) + _layer("reindex", "BatchReindex", ["x", "p"], ["y"])
    p = np.array([3, 0, 0, 2.5, 1, 3], np.float32)
    _compare(caffe_worker, tmp_path, text, {"x": ref.seeded_normal((4, 3, 2), 13), "p": p}, ["y"], "exact", backward=False)


def test_batch_reindex_backward_accumulates():
    from porting.layers import build_layer

    layer = build_layer('top: "y" type: "BatchReindex"', [(4, 3), (5,)])
    x = torch.tensor(ref.seeded_normal((4, 3), 14), requires_grad=True)
    p = torch.tensor([3.0, 0.0, 0.0, 2.0, 3.0], requires_grad=True)
    g = ref.seeded_normal((5, 3), 15)
    layer(x, p)[0].backward(torch.tensor(g))
    want = np.zeros((4, 3), np.float32)  # Caffe: bot_diff[permut[n]] += top_diff[n], in order of n
    for n, k in enumerate([3, 0, 0, 2, 3]):
        want[k] += g[n]
    np.testing.assert_array_equal(x.grad.numpy(), want)
    assert p.grad is None


def test_batch_reindex_refuses_an_index_that_requires_grad_without_a_warning():
    """Found by the fuzzer (an input fed with requires_grad): the refusal of an index outside
    [0, N) read the value with float() of a tensor requiring grad, a UserWarning."""
    import warnings

    from porting.layers import build_layer

    layer = build_layer('top: "y" type: "BatchReindex"', [(4, 3), (2,)])
    x = torch.zeros((4, 3), requires_grad=True)
    p = torch.tensor([1.0, 4.0], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PortingError, match="index 4 is outside"):
            layer(x, p)


def test_filter_forward_matches_caffe(caffe_worker, tmp_path):
    text = _inputs_text({"x": (5, 3, 2), "z": (5, 2), "s": (5, 1)}) + \
        _layer("filter", "Filter", ["x", "z", "s"], ["fx", "fz"])
    s = np.array([[1], [0], [-2.5], [0], [1]], np.float32)
    _, net, out = _compare(caffe_worker, tmp_path, text, {"x": ref.seeded_normal((5, 3, 2), 16), "z": ref.seeded_normal((5, 2), 17), "s": s},
                           ["fx", "fz"], "exact", backward=False)
    assert net.graph.blob_shapes["fx"] == (5, 3, 2)  # declared: every item (Caffe's first Reshape)
    assert tuple(out["fx"].shape) == (3, 3, 2)  # at run time: the selected items


def test_filter_backward_scatters_and_empty_selection():
    from porting.layers import build_layer

    layer = build_layer('top: "a" type: "Filter"', [(4, 3), (4, 1)])
    x = torch.tensor(ref.seeded_normal((4, 3), 18), requires_grad=True)
    s = torch.tensor([[0.0], [1.0], [0.0], [float("nan")]])  # NaN is nonzero in C++ too
    (y,) = layer(x, s)
    g = ref.seeded_normal((2, 3), 19)
    y.backward(torch.tensor(g))
    want = np.zeros((4, 3), np.float32)
    want[1], want[3] = g[0], g[1]
    np.testing.assert_array_equal(x.grad.numpy(), want)
    (empty,) = layer(x, torch.zeros(4, 1))
    assert tuple(empty.shape) == (0, 3)


# Caffe's own backward of the index layers: Net::Backward without force_backward (run_net's
# net_backward), from a loss_weight on a Scale after the layer (its diff: the Scale's random
# weights), so Caffe never asks for the index bottom's gradient. The data come from a
# Parameter layer (a bottom that needs backward), whose blob diff is the data's diff.
INDEX_BACKWARD = [
    ("embed", {"i": np.array([[0, 3, 1, 4], [4, 4, 2, 3.5]], np.float32)},
     _layer("embed", "Embed", ["i"], ["y"], "embed_param { num_output: 6 input_dim: 5 }")
     + _layer("scale", "Scale", ["y"], ["z"], "scale_param { axis: 2 } loss_weight: 1"),
     [("embed", "Embed", [ref.seeded_normal((5, 6), 26), ref.seeded_normal((6,), 27)]), ("scale", "Scale", [ref.seeded_normal((6,), 28)])]),
    ("batch-reindex", {"p": np.array([3, 0, 0, 2.5, 1, 3], np.float32)},
     _layer("param", "Parameter", [], ["d"], "parameter_param { shape { dim: 4 dim: 3 dim: 2 } }")
     + _layer("reindex", "BatchReindex", ["d", "p"], ["y"])
     + _layer("scale", "Scale", ["y"], ["z"], "scale_param { axis: 1 num_axes: 2 } loss_weight: 1"),
     [("param", "Parameter", [ref.seeded_normal((4, 3, 2), 29)]), ("scale", "Scale", [ref.seeded_normal((3, 2), 30)])]),
    ("filter", {"s": np.array([[1], [0], [-2.5], [0], [1]], np.float32)},
     _layer("param", "Parameter", [], ["d"], "parameter_param { shape { dim: 5 dim: 3 dim: 2 } }")
     + _layer("filter", "Filter", ["d", "s"], ["y"])
     + _layer("scale", "Scale", ["y"], ["z"], "scale_param { axis: 1 num_axes: 2 } loss_weight: 1"),
     [("param", "Parameter", [ref.seeded_normal((5, 3, 2), 31)]), ("scale", "Scale", [ref.seeded_normal((3, 2), 32)])]),
]


@pytest.mark.parametrize("inputs,text,blobs", [pytest.param(i, t, b, id=n) for n, i, t, b in INDEX_BACKWARD])
def test_index_layers_backward_matches_caffe(caffe_worker, tmp_path, inputs, text, blobs):
    """Every parameter diff (the Embed table and bias, the gathered or filtered data) equal
    to Caffe's: each is a copy or a sum of <= 3 products of the Scale's weights."""
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(_inputs_text({k: v.shape for k, v in inputs.items()}) + text)
    caffemodel = tmp_path / "net.caffemodel"
    write_caffemodel(caffemodel, blobs)
    caffe = caffe_worker.run_net(prototxt, caffemodel, inputs=inputs, params=True, net_backward=True)
    net = load_caffe(prototxt, caffemodel)
    out = net(**{k: torch.tensor(v) for k, v in inputs.items()})
    np.testing.assert_array_equal(out["z"].detach().numpy(), caffe["blob/z/data"])
    np.testing.assert_array_equal(caffe["blob/z/diff"], np.ones_like(caffe["blob/z/diff"]))  # the loss weight
    out["z"].backward(torch.ones_like(out["z"]))
    for layer, params in net.params.items():
        for i, p in enumerate(params):
            want = caffe[f"param/{layer}/{i}/diff"]
            err = ref.rel_err(p.grad.numpy(), want)
            ref.log_error("order", f"param diff {layer}/{i}", err)
            assert err <= TOL["order"], f"param diff {layer}/{i}: rel err {err:.3g}"


@pytest.mark.parametrize("type_,text,inputs", [
    ("Embed", _layer("embed", "Embed", ["i"], ["y"], "embed_param { num_output: 2 input_dim: 3 }"),
     {"i": np.array([0, 2], np.float32)}),
    ("BatchReindex", _layer("r", "BatchReindex", ["x", "i"], ["y"]), {"i": np.array([1, 0], np.float32)}),
    ("Filter", _layer("f", "Filter", ["x", "i"], ["y"]), {"i": np.array([1, 0], np.float32)}),
])
def test_caffe_refuses_to_backpropagate_to_indices(caffe_worker, tmp_path, type_, text, inputs):
    """Under force_backward Caffe backpropagates to every bottom, the index one too, and these
    layers abort; the port gives the index bottom no gradient."""
    from porting.legacy_worker import CaffeError

    inputs = {**inputs, "x": ref.seeded_normal((2, 3), 20)} if "x" in text else inputs
    blobs = [("embed", "Embed", [ref.seeded_normal((3, 2), 21), ref.seeded_normal((2,), 22)])] if type_ == "Embed" else None
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(_inputs_text({k: v.shape for k, v in inputs.items()}) + text)
    caffemodel = None
    if blobs:
        caffemodel = tmp_path / "net.caffemodel"
        write_caffemodel(caffemodel, blobs)
    shape = load_caffe(prototxt, caffemodel).graph.blob_shapes["y"]
    with pytest.raises(CaffeError, match="(?i)backprop"):
        caffe_worker.run_net(prototxt, caffemodel, inputs=inputs, top_diffs={"y": ref.seeded_normal(shape, 23)})


# ------------------------------------------------------------------------------------------ HDF5Output

def test_hdf5_output_is_a_sink_that_writes_nothing(caffe_worker, tmp_path):
    """Caffe writes its bottoms to file_name; the port accepts the layer, writes nothing (the
    file is never created) and runs the rest of the net as Caffe does. Caffe's HDF5Output
    cannot run in the legacy stack (H5Fcreate fails there, in any folder), so the port with
    the sink is compared with Caffe without it: the sink has no tops and its Caffe backward
    does nothing, so removing it changes nothing else in Caffe's net."""
    target = tmp_path / "never.h5"
    net_text = (_inputs_text({"x": (2, 3, 4), "label": (2, 1)})
                + _layer("clip", "Clip", ["x"], ["y"], "clip_param { min: -0.5 max: 0.5 }"))
    sink = _layer("out", "HDF5Output", ["x", "label"], [], f'hdf5_output_param {{ file_name: "{target}" }}')
    inputs = {"x": ref.seeded_normal((2, 3, 4), 24), "label": ref.seeded_normal((2, 1), 25)}
    caffe, _, _ = _compare(caffe_worker, tmp_path, net_text, inputs, ["y"], "exact", grad_inputs=["x"])
    port = load_caffe_text(tmp_path, net_text + sink)
    x = torch.tensor(inputs["x"], requires_grad=True)
    out = port(x=x, label=torch.tensor(inputs["label"]))
    out["y"].backward(torch.tensor(ref.seeded_normal((2, 3, 4), 300)))
    np.testing.assert_array_equal(out["y"].detach().numpy(), caffe["blob/y/data"])
    np.testing.assert_array_equal(x.grad.numpy(), caffe["blob/x/diff"])
    assert not target.exists()


def load_caffe_text(tmp_path, text):
    path = tmp_path / "sink.prototxt"
    path.write_text(text)
    return load_caffe(path)


# ------------------------------------------------------------------------------------------ refusals

REFUSED = [
    ("mvn-5-axes", {"x": (1, 2, 2, 2, 2)}, _layer("l", "MVN", ["x"], ["y"]), "at most 4 axes"),
    ("spp-level-beyond-image", {"x": (1, 1, 7, 5)}, _layer("l", "SPP", ["x"], ["y"], "spp_param { pyramid_height: 3 }"),
     "smaller than the kernel"),
    ("spp-3-axes", {"x": (1, 2, 5)}, _layer("l", "SPP", ["x"], ["y"], "spp_param { pyramid_height: 1 }"), "4-axis"),
    ("spp-height-0", {"x": (1, 2, 5, 5)}, _layer("l", "SPP", ["x"], ["y"]), "pyramid_height"),
    ("embed-no-input-dim", {"i": (2,)}, _layer("l", "Embed", ["i"], ["y"], "embed_param { num_output: 2 }"),
     "input_dim"),
    ("embed-no-num-output", {"i": (2,)}, _layer("l", "Embed", ["i"], ["y"], "embed_param { input_dim: 2 }"),
     "num_output"),
    ("im2col-no-kernel", {"x": (1, 2, 5, 5)}, _layer("l", "Im2col", ["x"], ["y"], "convolution_param { stride: 2 }"),
     "kernel_size"),
    ("im2col-kernel-0", {"x": (1, 2, 5, 5)}, _layer("l", "Im2col", ["x"], ["y"],
                                                     "convolution_param { kernel_size: 0 }"), "nonzero"),
    ("reindex-2-axis-index", {"x": (3, 2), "i": (2, 1)}, _layer("l", "BatchReindex", ["x", "i"], ["y"]), "1 axis"),
    ("filter-selector-not-singleton", {"x": (3, 2), "s": (3, 2)}, _layer("l", "Filter", ["x", "s"], ["y"]),
     "selector"),
    ("filter-first-dims-differ", {"x": (3, 2), "s": (4, 1)}, _layer("l", "Filter", ["x", "s"], ["y"]), "first dim"),
    ("filter-tops-count", {"x": (3, 2), "s": (3, 1)}, _layer("l", "Filter", ["x", "s"], ["y", "z"]), "one top"),
    ("hdf5-one-bottom", {"x": (3, 2)}, _layer("l", "HDF5Output", ["x"], [], 'hdf5_output_param { file_name: '
                                                                           '"refused.h5" }'), "bottom"),
]
# Caffe checks HDF5Output's nums only in its forward, after creating the file, which it cannot
# do in the legacy stack: this refusal is the port's alone (Caffe's CHECK_EQ read from its source).
PORT_ONLY = [("hdf5-num-differs", {"x": (3, 2), "z": (2, 2)},
              _layer("l", "HDF5Output", ["x", "z"], [], 'hdf5_output_param { file_name: "refused.h5" }'), "same num")]


@pytest.mark.parametrize("shapes,text,message", [pytest.param(s, t, m, id=i) for i, s, t, m in REFUSED])
def test_configurations_caffe_refuses(caffe_worker, tmp_path, shapes, text, message):
    """The port refuses at load (PortingError naming the layer); Caffe refuses at setup or at
    its first forward."""
    from porting.legacy_worker import CaffeError

    prototxt = tmp_path / "bad.prototxt"
    prototxt.write_text(_inputs_text(shapes) + text)
    with pytest.raises(PortingError, match=message) as info:
        load_caffe(prototxt)
    assert "layer l" in str(info.value)
    inputs = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    with pytest.raises(CaffeError):
        caffe_worker.run_net(prototxt, None, inputs=inputs)


@pytest.mark.parametrize("shapes,text,message", [pytest.param(s, t, m, id=i) for i, s, t, m in PORT_ONLY])
def test_configurations_the_port_refuses(tmp_path, shapes, text, message):
    prototxt = tmp_path / "bad.prototxt"
    prototxt.write_text(_inputs_text(shapes) + text)
    with pytest.raises(PortingError, match=message):
        load_caffe(prototxt)


@pytest.mark.parametrize("type_,body,inputs,message", [
    ("Embed", "embed_param { num_output: 2 input_dim: 3 }", {"i": [0.0, 3.0]}, "outside the table"),
    ("Embed", "embed_param { num_output: 2 input_dim: 3 }", {"i": [-1.0, 0.0]}, "outside the table"),
    ("BatchReindex", "", {"x": [[1.0], [2.0]], "i": [0.0, 2.0]}, "outside"),
    ("BatchReindex", "", {"x": [[1.0], [2.0]], "i": [-0.5, 1.0]}, "outside"),
])
def test_index_out_of_range_is_a_clear_error(caffe_worker, tmp_path, type_, body, inputs, message):
    """At run time (the values are not known at load): a PortingError, not a read outside the
    table; Caffe's BatchReindex CHECK-fails (its Embed checks are debug-only: not compared)."""
    from porting.legacy_worker import CaffeError

    arrays = {k: np.array(v, np.float32) for k, v in inputs.items()}
    bottoms = ["i"] if type_ == "Embed" else ["x", "i"]
    prototxt = tmp_path / "idx.prototxt"
    prototxt.write_text(_inputs_text({k: v.shape for k, v in arrays.items()}) + _layer("l", type_, bottoms, ["y"], body))
    net = load_caffe(prototxt)
    with pytest.raises(PortingError, match=message):
        net(**{k: torch.tensor(v) for k, v in arrays.items()})
    if type_ == "BatchReindex":
        with pytest.raises(CaffeError, match="reindex"):
            caffe_worker.run_net(prototxt, None, inputs=arrays)
