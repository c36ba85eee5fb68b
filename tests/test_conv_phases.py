"""Convolution's "phases" path (porting.layers.convolution.set_conv_path): a strided 2-D
layer's input gradient as one stride-1 convolution by output phase (phase_input_grad).

The float32 input gradient lies within the layer's ``backward_bound`` (any order of the same
products) of a float64 NumPy loop (tests/numpy_ref.py), on CaffeNet's conv1, GoogLeNet's
conv1 and odd geometries (sizes not a multiple of the stride, a kernel smaller than the
stride, asymmetric strides, groups, a window past the input, batch axes before the channel
axis); so do real Caffe's and the phases path's on the same layers. The forward, the
weights' and the bias's gradients are the "torch" path's bit for bit (the same calls);
stride-1, dilated, 1-D and 3-D layers keep the "torch" path; the weights' gradient is
computed only when asked for; no double backward (a clear error).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import numpy_ref as ref
from porting import load_caffe
from porting.layers import build_layer
from porting.layers.convolution import set_conv_path
from porting.write import write_caffemodel


def wide(shape, seed, low=-3, high=3):
    return ref.wide_range(shape, seed, low, high)


def _w(shape, seed):
    return ref.seeded_normal(shape, seed, 0.5)


# id, convolution_param text, bottom shape (axis 1 channels unless the text sets axis)
CASES = [
    ("caffenet-conv1", "num_output: 96 kernel_size: 11 stride: 4", (2, 3, 227, 227)),
    ("googlenet-conv1", "num_output: 64 kernel_size: 7 stride: 2 pad: 3", (1, 3, 224, 224)),
    ("odd-k3-s2-p1", "num_output: 5 kernel_size: 3 stride: 2 pad: 1", (2, 3, 13, 9)),
    ("k5-s3", "num_output: 4 kernel_size: 5 stride: 3 pad: 1", (2, 2, 17, 12)),
    ("k1-s2", "num_output: 3 kernel_size: 1 stride: 2", (2, 4, 9, 8)),
    ("k2-s3-pad", "num_output: 3 kernel_size: 2 stride: 3 pad: 2", (1, 2, 10, 7)),
    ("groups-k4-s2-p1", "num_output: 6 kernel_size: 4 stride: 2 pad: 1 group: 2", (2, 4, 11, 10)),
    ("asym-groups", "num_output: 4 kernel_h: 3 kernel_w: 5 stride_h: 3 stride_w: 2 pad_h: 1 pad_w: 2 group: 2 "
     "bias_term: false", (2, 4, 8, 13)),
    ("stride-one-axis", "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2", (1, 2, 6, 7)),
    ("window-past-input", "num_output: 2 kernel_size: 5 stride: 2", (1, 3, 4, 4)),
    ("stride-past-input", "num_output: 2 kernel_size: 3 stride: 9 pad: 1", (1, 2, 5, 6)),
    ("batch-axes", "num_output: 3 kernel_size: 3 stride: 2 axis: 2", (2, 3, 2, 7, 8)),
]


def _layer(param, shape, path, seed=10):
    text = f'top: "t" type: "Convolution" convolution_param {{ {param} }}'
    probe = build_layer(text, [shape])
    blobs = [_w(s, seed + i) for i, s in enumerate(probe.param_shapes)]
    return set_conv_path(build_layer(text, [shape], blobs), path)


def _uses_phases(tensor) -> bool:
    """Whether the autograd graph of ``tensor`` holds the phases path's Function."""
    return _node(tensor, "_PhaseInputGradBackward") is not None


def _run(layer, x, dy, params=False):
    """top, input gradient (and with ``params`` the parameters' gradients), and whether the
    phases path ran."""
    x = x.clone().requires_grad_(True)
    for blob in layer.blobs:
        blob.requires_grad_(params)
    (top,) = layer(x)
    wrt = [x] + (list(layer.blobs) if params else [])
    grads = torch.autograd.grad(top, wrt, dy.to(top.dtype))
    return top.detach(), grads, _uses_phases(top)


def ratio(got, want, bound) -> float:
    """max |got - want| / bound (0 where equal)."""
    got, want = got.double(), want.double()
    r = torch.where(got == want, torch.zeros_like(got), (got - want).abs() / bound)
    return float(r.max())


def _numpy_input_grad(layer, x, dy):
    """The float64 NumPy loop's input gradient (numpy_ref.conv_backward), batch axes folded;
    a window past the padded input reads zeros appended to it (as Caffe's im2col)."""
    flat = lambda a: a.reshape((-1,) + a.shape[layer.axis:])  # noqa: E731
    size = x.shape[layer.axis + 1:]
    short = [max(0, layer.kernel[i] - size[i] - 2 * layer.pad[i]) for i in range(len(size))]
    xs = np.pad(flat(x), [(0, 0), (0, 0)] + [(0, n) for n in short])
    dx, _, _ = ref.conv_backward(xs, layer.blobs[0].detach().double().numpy(), flat(dy),
                                 layer.stride, layer.pad, layer.dilation, layer.group, bias=False)
    return torch.tensor(dx[(Ellipsis,) + tuple(slice(0, n) for n in size)].reshape(x.shape))


def _backward_ratio(layer64, x64, dy64, top, grad):
    """The float32 input gradient's distance from the NumPy loop's, over the layer's bound."""
    with torch.no_grad():
        (exact_top,) = layer64(x64)
    (bound,) = layer64.backward_bound([x64], [top.double()], [exact_top], [dy64])
    return ratio(grad, _numpy_input_grad(layer64, x64.numpy(), dy64.numpy()), bound)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_phases_input_gradient_within_bound(case):
    _, param, shape = case
    layer = _layer(param, shape, "phases")
    layer64 = copy.deepcopy(layer).double()
    x = torch.tensor(wide(shape, 1))
    dy = torch.tensor(wide(layer.top_shapes[0], 2, -2, 2))
    top, (grad,), phased = _run(layer, x, dy)
    assert phased
    assert _backward_ratio(layer64, x.double(), dy.double(), top, grad) <= 1
    # the same decomposition in float64 is the NumPy loop's gradient to float64 rounding
    _, (grad64,), _ = _run(layer64, x.double(), dy.double())
    assert ref.rel_err(grad64.numpy(), _numpy_input_grad(layer64, x.double().numpy(), dy.double().numpy()).numpy()
                       ) <= 1e-10


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_phases_forward_and_parameter_gradients_are_torchs(case):
    """With the parameters requiring grad: the top, weight and bias gradients equal the
    "torch" path's bit for bit (F.conv2d and aten.convolution_backward on the same tensors)."""
    _, param, shape = case
    x = torch.tensor(wide(shape, 3, -1, 1))
    phases, plain = _layer(param, shape, "phases"), _layer(param, shape, "torch")
    dy = torch.tensor(wide(phases.top_shapes[0], 4, -1, 1))
    top, grads, phased = _run(phases, x, dy, params=True)
    top_t, grads_t, _ = _run(plain, x, dy, params=True)
    assert phased and torch.equal(top, top_t)
    assert all(torch.equal(a, b) for a, b in zip(grads[1:], grads_t[1:]))
    assert len(grads) == 1 + len(phases.blobs)


@pytest.mark.parametrize("param,shape", [
    ("num_output: 3 kernel_size: 3 pad: 1", (2, 2, 6, 7)),                           # stride 1
    ("num_output: 3 kernel_size: 3 stride: 2 dilation: 2 pad: 2", (1, 2, 9, 8)),     # dilated
    ("num_output: 3 kernel_size: 3 stride: 2 pad: 1", (2, 2, 9)),                    # 1-D
    ("num_output: 2 kernel_size: 2 stride: 2", (1, 2, 4, 4, 4)),                     # 3-D
], ids=["stride-1", "dilated", "1-d", "3-d"])
def test_other_layers_keep_torch(param, shape):
    x, layer = torch.tensor(wide(shape, 5, -1, 1)), _layer(param, shape, "phases")
    dy = torch.tensor(wide(layer.top_shapes[0], 6, -1, 1))
    top, grads, phased = _run(layer, x, dy, params=True)
    top_t, grads_t, _ = _run(set_conv_path(layer, "torch"), x, dy, params=True)
    assert not phased and torch.equal(top, top_t) and all(torch.equal(a, b) for a, b in zip(grads, grads_t))


def test_deconvolution_keeps_torch():
    text = 'type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 4 stride: 2 pad: 1 }'
    layer = build_layer(text, [(1, 3, 5, 5)], [_w((3, 2, 4, 4), 7), _w((2,), 8)])
    x = torch.tensor(wide((1, 3, 5, 5), 9, -1, 1))
    dy = torch.tensor(wide(layer.top_shapes[0], 10, -1, 1))
    top, (grad,), phased = _run(set_conv_path(layer, "phases"), x, dy)
    top_t, (grad_t,), _ = _run(set_conv_path(layer, "torch"), x, dy)
    assert not phased and torch.equal(top, top_t) and torch.equal(grad, grad_t)


def _node(tensor, name):
    """The first node called ``name`` in the autograd graph of ``tensor``, or None."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == name:
            return fn
        todo.extend(f for f, _ in fn.next_functions)
    return None


def test_parameter_gradients_only_when_asked():
    """The weights' node (torch's ConvolutionBackward0 of the input detached) runs only for a
    backward that asks for them: not for the input's gradient alone (MFV)."""
    layer = _layer("num_output: 4 kernel_size: 3 stride: 2 pad: 1", (1, 2, 9, 8), "phases")
    x = torch.tensor(wide((1, 2, 9, 8), 14, -1, 1)).requires_grad_(True)
    ran = []
    for wrt in ([x], [x, layer.blobs[0]], [layer.blobs[1]]):
        (top,) = layer(x)
        _node(top, "ConvolutionBackward0").register_hook(lambda *_: ran.append(len(wrt)))
        torch.autograd.grad(top.sum(), wrt)
    assert ran == [2, 1]


def test_in_place_after_and_no_double_backward():
    """The top is a tensor of its own (not a view): an in-place ReLU after it gives the
    out-of-place ReLU's gradient bit for bit; create_graph raises a clear error."""
    shape, param = (2, 4, 9, 8), "num_output: 4 kernel_h: 3 kernel_w: 4 stride_h: 2 stride_w: 3 pad: 1 group: 2"
    layer = _layer(param, shape, "phases")
    x = torch.tensor(wide(shape, 11, -1, 1))
    dy = torch.tensor(wide(layer.top_shapes[0], 12, -1, 1))
    grads = []
    for relu in (torch.relu_, torch.relu):
        xs = x.clone().requires_grad_(True)
        (top,) = layer(xs)
        grads.append(torch.autograd.grad(relu(top), xs, dy)[0])
        assert _uses_phases(top)
    assert torch.equal(*grads) and grads[0].abs().max() > 0
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(layer(x.clone().requires_grad_(True))[0].sum(), layer.blobs[0], create_graph=True)


# ------------------------------------------------------------------------------------------
# against real Caffe
# ------------------------------------------------------------------------------------------
CAFFE_CASES = [c for c in CASES if c[0] in ("caffenet-conv1", "googlenet-conv1", "groups-k4-s2-p1", "asym-groups",
                                            "k1-s2", "window-past-input")]


@pytest.mark.caffe
@pytest.mark.parametrize("case", CAFFE_CASES, ids=[c[0] for c in CAFFE_CASES])
def test_phases_and_caffe_within_bound(caffe_worker, tmp_path, case):
    """Caffe's bottom diff and the phases path's, each within the float64 layer's bound of
    the NumPy loop's input gradient, on the same seeded weights, input and top diff."""
    _, param, shape = case
    dims = " ".join(f"dim: {d}" for d in shape)
    prototxt = tmp_path / "one.prototxt"
    prototxt.write_text(f'name: "one"\nlayer {{ name: "input" type: "Input" top: "x" input_param {{ shape {{ {dims} '
                        f'}} }} }}\nlayer {{ name: "c" type: "Convolution" bottom: "x" top: "t" '
                        f'convolution_param {{ {param} }} }}\n')
    layer = _layer(param, shape, "phases")
    caffemodel = tmp_path / "one.caffemodel"
    write_caffemodel(caffemodel, [("c", "Convolution", [b.detach().numpy() for b in layer.blobs])])
    x, dy = wide(shape, 1), wide(layer.top_shapes[0], 2, -2, 2)
    caffe = caffe_worker.run_net(prototxt, caffemodel, inputs={"x": x}, top_diffs={"t": dy})
    net = set_conv_path(load_caffe(prototxt, caffemodel), "phases")
    loaded = next(s.module for s in net.graph.layers if s.name == "c")
    layer64 = copy.deepcopy(loaded).double()
    x64, dy64 = torch.tensor(x).double(), torch.tensor(dy).double()
    top, (grad,), phased = _run(loaded, torch.tensor(x), torch.tensor(dy))
    assert phased
    ratios = {"phases": _backward_ratio(layer64, x64, dy64, top, grad),
              "caffe": _backward_ratio(layer64, x64, dy64, torch.tensor(caffe["blob/t/data"]),
                                       torch.tensor(caffe["blob/x/diff"]))}
    assert all(r <= 1 for r in ratios.values()), ratios
