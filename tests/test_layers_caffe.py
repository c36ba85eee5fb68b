"""Every layer type against real Caffe 1.0 (the legacy stack), forward and input gradient.

Each case is a two-layer net (Input, then the layer under test) run by Caffe in the TEST
phase with seeded inputs and top diffs, and by the port loaded from the same prototxt and
caffemodel. Inputs carry exact zeros and ties where Caffe's rules decide (ReLU kinks, MAX
pooling and Eltwise MAX winners, ArgMax order). Errors are max |port - caffe| / max |caffe|
per top and per bottom diff; ``TOL`` holds the measured maxima (float32 on both sides,
different summation orders; LAYER_ERRORS_LOG records them) times ~4-5. Caffe's MAX
pooling backward of an empty window writes outside the blob, so that case is forward
only. Skips without the stack, fails in CI (PORTING_REQUIRE_CAFFE=1).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numpy_ref as ref
from porting import caffe_pb2, load_caffe
from porting.write import write_caffemodel

pytestmark = pytest.mark.caffe

# family -> bound on the relative error of tops and bottom diffs against Caffe (both float32)
TOL = {
    "exact": 0.0,  # data movement, ReLU/AbsVal/Threshold/Clip, MAX pooling and Eltwise MAX, ArgMax, Dropout: measured 0
    "sum": 1e-6,  # conv/deconv/InnerProduct/AVE pooling/Scale/Bias/Eltwise: measured max 2.6e-7 (ip top)
    "transcendental": 1e-6,  # LRN, Power, Exp, Log, BNLL, ELU, Sigmoid, TanH, Swish, Softmax, BatchNorm: measured max 2.1e-7 (swish diff)
}


def _relu_like(shape, seed):
    return np.maximum(ref.seeded_normal(shape, seed), 0).astype(np.float32)


def _ties(shape, seed, low=-1, high=1):
    return np.random.default_rng(seed).integers(low, high + 1, size=shape).astype(np.float32)


def _positive(shape, seed, low=0.2, high=3.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape).astype(np.float32)


# (id, layer text without name/bottoms/tops, bottom arrays, n_tops, blobs or None, family, backward?)
def _cases():
    n4 = (2, 3, 7, 6)
    c = []

    def add(id_, text, bottoms, family, blobs=None, n_tops=1, backward=True):
        c.append(pytest.param(text, bottoms, n_tops, blobs, family, backward, id=id_))

    w = lambda *s: ref.seeded_normal(s, sum(s) + len(s))  # noqa: E731  (seeded weights)
    add("conv-groups-asym", 'type: "Convolution" convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 '
        'stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 group: 2 }', [ref.seeded_normal((2, 4, 7, 6), 1)], "sum",
        [w(4, 2, 3, 2), w(4)])
    add("conv-dilated", 'type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 dilation: 2 pad: 2 '
        'stride: 2 bias_term: false }', [ref.seeded_normal(n4, 2)], "sum", [w(3, 3, 3, 3)])
    add("deconv", 'type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 4 stride: 2 pad: 1 }',
        [ref.seeded_normal(n4, 3)], "sum", [w(3, 2, 4, 4), w(2)])
    add("deconv-groups", 'type: "Deconvolution" convolution_param { num_output: 4 kernel_size: 3 stride: 3 group: 2 '
        'bias_term: false }', [ref.seeded_normal((1, 2, 3, 4), 4)], "sum", [w(2, 2, 3, 3)])
    add("ip-axis2-transpose", 'type: "InnerProduct" inner_product_param { num_output: 5 axis: 2 transpose: true }',
        [ref.seeded_normal(n4, 5)], "sum", [w(42, 5), w(5)])
    add("ip", 'type: "InnerProduct" inner_product_param { num_output: 4 }', [ref.seeded_normal(n4, 6)], "sum",
        [w(4, 126), w(4)])
    for i, (pool, geometry, shape) in enumerate([
            ("MAX", "kernel_size: 3 stride: 2", (2, 3, 13, 13)),  # CaffeNet pool, ceil rounding
            ("MAX", "kernel_size: 3 stride: 2", (2, 3, 6, 6)),  # ceil adds a partial window
            ("MAX", "kernel_size: 2 stride: 2 pad: 1", (1, 2, 3, 3)),  # clip rule drops a window
            ("AVE", "kernel_size: 2 stride: 2 pad: 1", (1, 2, 3, 3)),
            ("AVE", "kernel_size: 3 stride: 2 pad: 1", (2, 3, 5, 7)),  # divisor counts padding
            ("AVE", "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1", (1, 2, 7, 4)),
            ("MAX", "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 2 pad_w: 1", (1, 2, 2, 7)),
            ("MAX", "global_pooling: true", (2, 3, 5, 4)),
            ("AVE", "global_pooling: true", (2, 3, 5, 4)),
            ("MAX", "kernel_size: 3 stride: 2 round_mode: FLOOR", (1, 2, 6, 6)),
            ("AVE", "kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", (1, 2, 6, 6)),
            ("MAX", "kernel_size: 1 stride: 3", (1, 1, 5, 5))]):  # pad 0, stride > kernel: empty window
        family = "exact" if pool == "MAX" else "sum"
        # Caffe's backward of an empty MAX window writes before the blob's start (heap corruption)
        add(f"pool-{pool}-{i}", f'type: "Pooling" pooling_param {{ pool: {pool} {geometry} }}',
            [_relu_like(shape, 10 + i)], family, backward=i != 11)
    add("pool-max-plateaus", 'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 }',
        [_ties((1, 2, 6, 6), 30, 0, 1)], "exact")
    add("lrn-across", 'type: "LRN" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }',
        [_relu_like((2, 8, 4, 4), 31) * 50], "transcendental")
    add("lrn-across-strong", 'type: "LRN" lrn_param { local_size: 3 alpha: 1.5 beta: 0.5 k: 2 }',
        [ref.seeded_normal((1, 4, 3, 3), 32)], "transcendental")
    add("lrn-within", 'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }',
        [ref.seeded_normal((2, 2, 5, 4), 33)], "transcendental")
    add("relu", 'type: "ReLU"', [ref.seeded_normal(n4, 40, zeros=0.2)], "exact")
    add("relu-leaky", 'type: "ReLU" relu_param { negative_slope: 0.1 }', [ref.seeded_normal(n4, 41, zeros=0.2)], "sum")
    add("prelu", 'type: "PReLU"', [ref.seeded_normal(n4, 42, zeros=0.2)], "sum", [w(3)])
    add("prelu-shared", 'type: "PReLU" prelu_param { channel_shared: true }', [ref.seeded_normal(n4, 43, zeros=0.2)], "sum",
        "scalar")
    add("elu", 'type: "ELU" elu_param { alpha: 0.5 }', [ref.seeded_normal(n4, 44, zeros=0.2)], "transcendental")
    add("sigmoid", 'type: "Sigmoid"', [ref.seeded_normal(n4, 45, scale=4)], "transcendental")
    add("tanh", 'type: "TanH"', [ref.seeded_normal(n4, 46, scale=2)], "transcendental")
    add("absval", 'type: "AbsVal"', [ref.seeded_normal(n4, 47, zeros=0.2)], "exact")
    add("bnll", 'type: "BNLL"', [ref.seeded_normal(n4, 48, zeros=0.2, scale=10)], "transcendental")
    add("threshold", 'type: "Threshold" threshold_param { threshold: 0.3 }', [ref.seeded_normal(n4, 49)], "exact",
        backward=False)
    for i, (p, s, sh) in enumerate([(2, 1, 0), (2, -1.5, 2), (3, 0.5, 0), (0.5, 2, 3), (-0.75, 1, 1),
                                    (1, 2, 0.5), (0, 1, 2), (2, 0, 3)]):
        x = _positive(n4, 50 + i) if p != int(p) else ref.seeded_normal(n4, 50 + i)
        add(f"power-{i}", f'type: "Power" power_param {{ power: {p} scale: {s} shift: {sh} }}', [x],
            "transcendental")
    add("exp", 'type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', [ref.seeded_normal(n4, 60)], "transcendental")
    add("exp-e", 'type: "Exp"', [ref.seeded_normal(n4, 61)], "transcendental")
    add("log", 'type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }', [_positive(n4, 62)], "transcendental")
    add("log-e", 'type: "Log"', [_positive(n4, 63)], "transcendental")
    add("softmax", 'type: "Softmax"', [ref.seeded_normal(n4, 64, scale=3)], "transcendental")
    add("softmax-axis", 'type: "Softmax" softmax_param { axis: -1 }', [ref.seeded_normal(n4, 65, scale=3)], "transcendental")
    add("dropout", 'type: "Dropout" dropout_param { dropout_ratio: 0.5 }', [ref.seeded_normal(n4, 66)], "exact")
    # values on both bounds (Caffe passes the gradient there), and min > max (min everywhere)
    add("swish", 'type: "Swish"', [ref.seeded_normal(n4, 69, scale=4)], "transcendental")
    add("swish-beta", 'type: "Swish" swish_param { beta: 0.5 }', [ref.seeded_normal(n4, 70, scale=4)], "transcendental")
    add("clip", 'type: "Clip" clip_param { min: -0.5 max: 0.75 }', [_ties(n4, 67, -4, 4) * 0.25], "exact")
    add("clip-inverted", 'type: "Clip" clip_param { min: 1 max: -1 }', [_ties(n4, 68, -2, 2)], "exact")
    add("concat", 'type: "Concat" concat_param { axis: 1 }', [ref.seeded_normal((2, 3, 4), 70), ref.seeded_normal((2, 1, 4), 71)],
        "exact")
    add("concat-legacy-dim", 'type: "Concat" concat_param { concat_dim: 2 }',
        [ref.seeded_normal((2, 3, 4), 72), ref.seeded_normal((2, 3, 2), 73), ref.seeded_normal((2, 3, 1), 74)], "exact")
    add("slice", 'type: "Slice" slice_param { axis: 1 slice_point: 1 slice_point: 4 }', [ref.seeded_normal((2, 6, 3), 75)],
        "exact", n_tops=3)
    add("slice-equal", 'type: "Slice" slice_param { slice_dim: 2 }', [ref.seeded_normal((2, 3, 4), 76)], "exact", n_tops=2)
    add("tile", 'type: "Tile" tile_param { tiles: 3 }', [ref.seeded_normal(n4, 78)], "sum")
    add("tile-axis", 'type: "Tile" tile_param { axis: -1 tiles: 7 }', [ref.seeded_normal((2, 3, 4), 79)], "sum")
    add("split", 'type: "Split"', [ref.seeded_normal(n4, 77)], "exact", n_tops=3)
    add("eltwise-sum-coeff", 'type: "Eltwise" eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 }',
        [ref.seeded_normal(n4, 80), ref.seeded_normal(n4, 81), ref.seeded_normal(n4, 82)], "sum")
    add("eltwise-prod", 'type: "Eltwise" eltwise_param { operation: PROD }', [ref.seeded_normal(n4, 83), ref.seeded_normal(n4, 84)],
        "sum")
    add("eltwise-prod-unstable", 'type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }',
        [_positive(n4, 85), _positive(n4, 86), ref.seeded_normal(n4, 87)], "transcendental")
    add("eltwise-max-ties", 'type: "Eltwise" eltwise_param { operation: MAX }',
        [_ties(n4, 88), _ties(n4, 89), _ties(n4, 90)], "exact")
    add("reduction-sum", 'type: "Reduction" reduction_param { axis: 1 }', [ref.seeded_normal(n4, 130)], "sum")
    add("reduction-asum", 'type: "Reduction" reduction_param { operation: ASUM axis: 2 coeff: -0.5 }',
        [ref.seeded_normal(n4, 131, zeros=0.2)], "sum")
    add("reduction-sumsq", 'type: "Reduction" reduction_param { operation: SUMSQ axis: -1 coeff: 3 }',
        [ref.seeded_normal(n4, 132)], "sum")
    add("reduction-mean-scalar", 'type: "Reduction" reduction_param { operation: MEAN }', [_positive(n4, 133)], "sum")
    add("reduction-mean-coeff", 'type: "Reduction" reduction_param { operation: MEAN axis: 1 coeff: -3 }',
        [ref.seeded_normal(n4, 134)], "sum")
    add("batchnorm-global", 'type: "BatchNorm" batch_norm_param { use_global_stats: true eps: 0.001 }',
        [ref.seeded_normal(n4, 91)], "transcendental", [ref.seeded_normal((3,), 92), _positive((3,), 93), np.array([7.5], np.float32)])
    add("batchnorm-factor-zero", 'type: "BatchNorm"', [ref.seeded_normal(n4, 94)], "transcendental",
        [ref.seeded_normal((3,), 95), _positive((3,), 96), np.zeros(1, np.float32)])
    add("batchnorm-batch", 'type: "BatchNorm" batch_norm_param { use_global_stats: false }',
        [ref.seeded_normal(n4, 97, scale=2)], "transcendental", [np.zeros(3, np.float32)] * 2 + [np.zeros(1, np.float32)])
    add("scale", 'type: "Scale" scale_param { bias_term: true }', [ref.seeded_normal(n4, 100)], "sum", [w(3), w(3)])
    add("scale-axes", 'type: "Scale" scale_param { axis: 2 num_axes: -1 }', [ref.seeded_normal(n4, 101)], "sum", [w(7, 6)])
    add("scale-two-bottoms", 'type: "Scale" scale_param { axis: 1 bias_term: true }',
        [ref.seeded_normal(n4, 102), ref.seeded_normal((3, 7), 103)], "sum", [w(3, 7)])
    add("bias", 'type: "Bias"', [ref.seeded_normal(n4, 104)], "sum", [w(3)])
    add("bias-two-bottoms", 'type: "Bias" bias_param { axis: 0 }', [ref.seeded_normal(n4, 105), ref.seeded_normal((2, 3), 106)], "sum")
    add("flatten", 'type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', [ref.seeded_normal(n4, 110)], "exact")
    add("reshape", 'type: "Reshape" reshape_param { shape { dim: 0 dim: -1 dim: 3 } }', [ref.seeded_normal(n4, 111)], "exact")
    add("reshape-axis", 'type: "Reshape" reshape_param { shape { dim: 2 dim: 3 } axis: 2 num_axes: 1 }',
        [ref.seeded_normal((2, 3, 6, 5), 112)], "exact")
    add("crop", 'type: "Crop" crop_param { axis: 2 offset: 1 offset: 2 }',
        [ref.seeded_normal((2, 3, 7, 8), 113), ref.seeded_normal((1, 1, 4, 5), 114)], "exact")
    add("argmax", 'type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', [_ties(n4, 120, -2, 2)], "exact",
        backward=False)
    add("argmax-axis", 'type: "ArgMax" argmax_param { top_k: 2 axis: 1 }', [_ties(n4, 121, -1, 1)], "exact",
        backward=False)
    return c


def _prototxt(text, bottoms, n_tops):
    shapes = "".join(f" shape {{ {' '.join(f'dim: {d}' for d in b.shape)} }}" for b in bottoms)
    tops = " ".join(f'top: "b{i}"' for i in range(len(bottoms)))
    outs = " ".join(f'top: "out{i}"' for i in range(n_tops))
    ins = " ".join(f'bottom: "b{i}"' for i in range(len(bottoms)))
    return (f'name: "one"\nlayer {{ name: "input" type: "Input" {tops} input_param {{{shapes} }} }}\n'
            f'layer {{ name: "under_test" {ins} {outs} {text} }}\n')


@pytest.mark.parametrize("text,bottoms,n_tops,blobs,family,backward", _cases())
def test_layer_matches_caffe(caffe_worker, tmp_path, text, bottoms, n_tops, blobs, family, backward):
    prototxt = tmp_path / "one.prototxt"
    prototxt.write_text(_prototxt(text, bottoms, n_tops))
    caffemodel = None
    if blobs == "scalar":  # one zero-axis blob: no shape at all, as Caffe's Blob::ToProto saves it
        caffemodel = tmp_path / "one.caffemodel"
        net = caffe_pb2.NetParameter(layer=[caffe_pb2.LayerParameter(
            name="under_test", type=text.split('"')[1], blobs=[caffe_pb2.BlobProto(data=[0.25])])])
        caffemodel.write_bytes(net.SerializeToString())
    elif blobs:
        caffemodel = tmp_path / "one.caffemodel"
        type_name = text.split('"')[1]
        write_caffemodel(caffemodel, [("under_test", type_name, [np.asarray(b, np.float32) for b in blobs])])
    net = load_caffe(prototxt, caffemodel)
    inputs = {f"b{i}": b for i, b in enumerate(bottoms)}
    tops = [f"out{i}" for i in range(n_tops)]
    shapes = [net.graph.blob_shapes[t] for t in tops]
    diffs = {t: ref.seeded_normal(s, 200 + i) for i, (t, s) in enumerate(zip(tops, shapes))} if backward else None
    caffe = caffe_worker.run_net(prototxt, caffemodel, inputs=inputs, top_diffs=diffs)

    xs = {k: torch.tensor(v, requires_grad=backward) for k, v in inputs.items()}
    out = net(**xs)
    if backward:
        pairs = [(out[t], torch.tensor(diffs[t])) for t in tops if out[t].requires_grad]
        torch.autograd.backward([p for p, _ in pairs], [d for _, d in pairs])
    tol = TOL[family]
    for t in tops:
        err = ref.rel_err(out[t].detach().numpy(), caffe[f"blob/{t}/data"])
        ref.log_error(family, f"top {t}", err)
        assert err <= tol, f"top {t}: rel err {err:.3g} > {tol:g}"
    if backward:
        for name, x in xs.items():
            want = caffe[f"blob/{name}/diff"]
            got = np.zeros_like(want) if x.grad is None else x.grad.numpy()
            err = ref.rel_err(got, want)
            ref.log_error(family, f"diff {name}", err)
            assert err <= tol, f"diff {name}: rel err {err:.3g} > {tol:g}"


SILENCED = """name: "silenced"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
layer { name: "quiet" type: "Silence" bottom: "data" }
layer { name: "clip" type: "Clip" bottom: "data" top: "out" clip_param { min: -0.5 max: 0.5 } }
"""


def test_silence_adds_nothing_to_its_bottoms_diff(caffe_worker, tmp_path):
    """Silence has no tops and its Caffe backward zeroes its bottom's diff: with a second
    consumer of that bottom (Caffe splits it and adds the two diffs), the bottom's diff is
    that consumer's alone, bit for bit (the clipped values give it exact zeros as well)."""
    prototxt = tmp_path / "silenced.prototxt"
    prototxt.write_text(SILENCED)
    x, diff = ref.seeded_normal((2, 3, 4, 5), 140), ref.seeded_normal((2, 3, 4, 5), 141)
    caffe = caffe_worker.run_net(prototxt, None, inputs={"data": x}, top_diffs={"out": diff})
    xt = torch.tensor(x, requires_grad=True)
    out = load_caffe(prototxt)(data=xt)["out"]
    out.backward(torch.tensor(diff))
    np.testing.assert_array_equal(out.detach().numpy(), caffe["blob/out/data"])
    want = caffe["blob/data/diff"]
    np.testing.assert_array_equal(want, diff * ((x >= -0.5) & (x <= 0.5)))
    np.testing.assert_array_equal(xt.grad.numpy(), want)
