"""The arithmetic paths of Convolution/Deconvolution ("torch", "im2col") and InnerProduct
("torch", "blocked"): same semantics, other summation orders.

Each path's float32 tops and bottom diffs lie within the layer's own float32 rounding
bound (``forward_bound``/``backward_bound``: any order of the same terms) of the float64
layer, on inputs of a wide dynamic range; so do real Caffe's on the same layers; CaffeNet
with both Caffe-like paths passes ``porting.verify`` against Caffe. The blocked inner
product is shown to sum by blocks on a sum built so that one long chain loses what blocks
keep (the bound of the block structure, not a measured margin). MFV's FacetNet.from_caffe
blocks the inner products. Accuracy figures against Caffe on MFV crops:
benchmarks/bench_conv_accuracy.py.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import numpy_ref as ref
from porting import load_caffe
from porting.layers import build_layer
from porting.layers.convolution import CONV_PATHS, set_conv_path
from porting.layers.inner_product import BLOCK, INNER_PRODUCT_PATHS, blocked_linear, set_inner_product_path
from porting.write import write_caffemodel

# (conv path, inner product path): the port's default and Caffe's algorithms
PATHS = [("torch", "torch"), ("im2col", "blocked")]


def wide(shape, seed, low=-4, high=4):
    return ref.wide_range(shape, seed, low, high)


def _w(shape, seed):
    return ref.seeded_normal(shape, seed, 0.5)


# id, layer text, bottom shape, blob shapes
CASES = [
    ("conv-groups-asym", 'type: "Convolution" convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 '
     'stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 group: 2 }', (2, 4, 7, 6), [(4, 2, 3, 2), (4,)]),
    ("conv-k11-s4", 'type: "Convolution" convolution_param { num_output: 8 kernel_size: 11 stride: 4 }',
     (1, 3, 27, 27), [(8, 3, 11, 11), (8,)]),
    ("conv-dilated", 'type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 dilation: 2 pad: 2 '
     'stride: 2 bias_term: false }', (2, 3, 7, 6), [(3, 3, 3, 3)]),
    ("conv-window-past-input", 'type: "Convolution" convolution_param { num_output: 2 kernel_size: 5 stride: 2 }',
     (1, 3, 4, 4), [(2, 3, 5, 5), (2,)]),
    ("conv-1d", 'type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 }',
     (2, 3, 9), [(4, 3, 3), (4,)]),
    ("deconv", 'type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 4 stride: 2 pad: 1 }',
     (2, 3, 7, 6), [(3, 2, 4, 4), (2,)]),
    ("deconv-groups", 'type: "Deconvolution" convolution_param { num_output: 4 kernel_size: 3 stride: 3 group: 2 '
     'bias_term: false }', (1, 4, 3, 3), [(4, 2, 3, 3)]),
    ("ip-blocks", 'type: "InnerProduct" inner_product_param { num_output: 300 }', (2, 5, 6, 10),
     [(300, 300), (300,)]),
    ("ip-transpose", 'type: "InnerProduct" inner_product_param { num_output: 130 transpose: true }', (3, 20),
     [(20, 130), (130,)]),
]


def _layer(text, shape, blob_shapes, paths):
    blobs = [_w(s, 10 + i) for i, s in enumerate(blob_shapes)]
    layer = build_layer('top: "t" ' + text, [shape], blobs)
    set_conv_path(layer, paths[0])
    return set_inner_product_path(layer, paths[1])


def _run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    (top,) = layer(x)
    (grad,) = torch.autograd.grad(top, x, dy.to(top.dtype))
    return top.detach(), grad


def ratio(got, want, bound) -> float:
    """max |got - want| / bound (0 where equal)."""
    got, want = got.double(), want.double()
    r = torch.where(got == want, torch.zeros_like(got), (got - want).abs() / bound)
    return float(r.max())


def _bound_ratios(layer64, x64, dy64, top, grad):
    """(forward, backward) ratios of a framework's float32 top and bottom diff to the bounds."""
    exact_top, exact_grad = _run(layer64, x64, dy64)
    (fb,) = layer64.forward_bound([x64], [exact_top])
    (bb,) = layer64.backward_bound([x64], [top.double()], [exact_top], [dy64])
    return ratio(top, exact_top, fb), ratio(grad, exact_grad, bb)


def test_set_paths():
    conv = build_layer('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }', [(1, 2, 5, 5)])
    ip = build_layer('type: "InnerProduct" inner_product_param { num_output: 3 }', [(1, 4)])
    both = torch.nn.ModuleList([conv, ip])
    assert set_conv_path(both, "im2col") is both and conv.path == "im2col" and ip.path == "torch"
    assert set_inner_product_path(both, "blocked") is both and ip.path == "blocked"
    assert type(conv).path == "torch" and type(ip).path == "torch"  # the class default is untouched
    with pytest.raises(ValueError, match="one of torch, im2col"):
        set_conv_path(both, "winograd")
    with pytest.raises(ValueError, match="one of torch, blocked"):
        set_inner_product_path(both, "im2col")
    assert CONV_PATHS == ("torch", "im2col", "phases") and INNER_PRODUCT_PATHS == ("torch", "blocked")


def test_3d_convolution_keeps_torch():
    """F.unfold has no 3-D form: a 3-D layer computes exactly as on the torch path."""
    x = torch.tensor(wide((1, 2, 4, 4, 4), 3, -1, 1))
    layer = build_layer('type: "Convolution" convolution_param { num_output: 2 kernel_size: 2 pad: 1 }',
                        [tuple(x.shape)], [_w((2, 2, 2, 2, 2), 4), _w((2,), 5)])
    plain = layer(x)[0]
    assert torch.equal(set_conv_path(layer, "im2col")(x)[0], plain)


@pytest.mark.parametrize("paths", PATHS, ids=["-".join(p) for p in PATHS])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_path_within_rounding_bound(case, paths):
    _, text, shape, blob_shapes = case
    layer = _layer(text, shape, blob_shapes, paths)
    layer64 = _layer(text, shape, blob_shapes, PATHS[0]).double()  # the reference: the torch path
    x = torch.tensor(wide(shape, 1))
    dy = torch.tensor(wide(layer.top_shapes[0], 2, -2, 2))
    top, grad = _run(layer, x, dy)
    forward, backward = _bound_ratios(layer64, x.double(), dy.double(), top, grad)
    assert forward <= 1 and backward <= 1


def test_blocked_input_gradient_sums_by_blocks():
    """dx = dy W over N = 32 BLOCK outputs: one weight of 1 and 32 BLOCK - 1 weights of
    2^-25, half an ulp of 1. A single chain that starts at the 1 rounds every small term
    away (error 4095 * 2^-25 = 1.2e-4). Summed by blocks in any order, each block but the
    first is exactly BLOCK * 2^-25 and adding it to a number in [1, 2) is exact, so only the
    first block can lose, at most its BLOCK - 1 small terms: error <= 127 * 2^-25 = 3.8e-6."""
    n = 32 * BLOCK
    weight = torch.full((n, 3), 2.0 ** -25)
    weight[0] = 1.0
    x = torch.ones(1, 3, requires_grad=True)
    y = blocked_linear(x, weight)
    (dx,) = torch.autograd.grad(y, x, torch.ones(1, n))
    exact = 1 + (n - 1) * 2.0 ** -25
    assert (exact - dx.double()).abs().max() <= (BLOCK - 1) * 2.0 ** -25


# ------------------------------------------------------------------------------------------
# against real Caffe
# ------------------------------------------------------------------------------------------

def _one_layer(tmp_path, text, shape, blob_shapes):
    dims = " ".join(f"dim: {d}" for d in shape)
    prototxt = tmp_path / "one.prototxt"
    prototxt.write_text(f'name: "one"\nlayer {{ name: "input" type: "Input" top: "x" input_param {{ shape {{ {dims} '
                        f'}} }} }}\nlayer {{ name: "under_test" bottom: "x" top: "t" {text} }}\n')
    caffemodel = tmp_path / "one.caffemodel"
    blobs = [_w(s, 10 + i) for i, s in enumerate(blob_shapes)]
    write_caffemodel(caffemodel, [("under_test", text.split('"')[1], blobs)])
    return prototxt, caffemodel


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_paths_and_caffe_within_rounding_bound(caffe_worker, tmp_path, case):
    """Caffe's own top and bottom diff, and each path's, within the float64 layer's bound."""
    _, text, shape, blob_shapes = case
    prototxt, caffemodel = _one_layer(tmp_path, text, shape, blob_shapes)
    x = wide(shape, 1)
    net = load_caffe(prototxt, caffemodel)
    dy = wide(net.graph.blob_shapes["t"], 2, -2, 2)
    caffe = caffe_worker.run_net(prototxt, caffemodel, inputs={"x": x}, top_diffs={"t": dy})
    layer = next(s.module for s in net.graph.layers if s.name == "under_test")
    layer64 = copy.deepcopy(layer).double()  # loaded on the torch path: the reference
    x64, dy64 = torch.tensor(x).double(), torch.tensor(dy).double()
    ratios = {"caffe": _bound_ratios(layer64, x64, dy64, torch.tensor(caffe["blob/t/data"]),
                                     torch.tensor(caffe["blob/x/diff"]))}
    for paths in PATHS:
        set_conv_path(layer, paths[0]), set_inner_product_path(layer, paths[1])
        ratios["-".join(paths)] = _bound_ratios(layer64, x64, dy64, *_run(layer, torch.tensor(x), torch.tensor(dy)))
    assert all(f <= 1 and b <= 1 for f, b in ratios.values()), ratios


@pytest.mark.parametrize("paths", [("torch", "blocked"), ("im2col", "blocked")], ids=["mfv", "caffe-like"])
def test_caffenet_with_caffe_paths_verifies(caffe_worker, caffe_weights, paths):
    """CaffeNet (Caffe's Xavier weights) on an MFV-like start (noise around grey 175) with
    MFV's paths and with both Caffe-like ones: porting.verify against Caffe passes, every
    layer of both within its float32 bound or its flips classified."""
    from porting.verify import Objective, verify_port

    prototxt = Path(__file__).resolve().parents[1] / "porting" / "models" / "caffenet.prototxt"
    caffemodel = caffe_weights(prototxt, filler="xavier")
    net = set_inner_product_path(set_conv_path(load_caffe(prototxt, caffemodel), paths[0]), paths[1])
    rgb = np.random.RandomState(1).normal(175, 8, (227, 227, 3))
    x = (rgb[:, :, ::-1].transpose(2, 0, 1) - np.array([104.0, 117.0, 123.0])[:, None, None])[None].astype(np.float32)
    objective = Objective("fc8", 498, "fc8")
    reference = caffe_worker.run_net(prototxt, caffemodel, inputs={"data": x},
                                     top_diffs={"fc8": objective.seed((1, 1000))})
    verification, _ = verify_port(net, reference, {"data": x}, objective, names=("caffe", "port"))
    assert verification.passed, verification.summary


def test_mfv_blocks_inner_products_and_phases_convolutions():
    """MFV's FacetNet.from_caffe puts a port's inner products on the blocked path and its
    convolutions on the phases path unless told not to."""
    from mfv.step import FacetNet

    prototxt = Path(__file__).resolve().parents[1] / "porting" / "models" / "caffenet.prototxt"
    kinds = lambda net: {(type(m).__name__, m.path) for m in net.modules() if hasattr(m, "path")}  # noqa: E731
    assert kinds(FacetNet.from_caffe(load_caffe(prototxt)).module) == {("Convolution", "phases"),
                                                                       ("InnerProduct", "blocked")}
    assert kinds(FacetNet.from_caffe(load_caffe(prototxt), blocked_inner_products=False).module) == {
        ("Convolution", "phases"), ("InnerProduct", "torch")}
    assert kinds(FacetNet.from_caffe(load_caffe(prototxt), conv_phases=False).module) == {
        ("Convolution", "torch"), ("InnerProduct", "blocked")}