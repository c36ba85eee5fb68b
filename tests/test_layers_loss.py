"""Loss layers and Accuracy against real Caffe 1.0: loss values, bottom diffs, loss weights.

Each case is an Input layer feeding the layer under test. Two ways to run Caffe's backward:
``top_diffs`` (the worker zeroes every diff, writes the given diff into the loss top,
force_backward) and ``net_backward`` (Caffe's own Net::Forward then Net::Backward: each
loss top's diff holds its loss_weight, nothing zeroed). HingeLoss keeps its margins in its
bottom's diff between forward and backward, so only the second way shows its backward;
the nets with several loss layers and ``CaffeNet.loss`` use it too. Label bottoms get no
diff on either side (Caffe's AllowForceBackward is false for them); EuclideanLoss's second
bottom does, on both.

Tolerance (relative to the largest reference value, ``numpy_ref.rel_err``): every loss here
is a float32 sum of at most K non-negative terms, each from a few float32 operations and at
most 4 library calls (exp, log, tanh, sqrt), so each side is within gamma(K) + 4 LIBM of
the exact value (Higham: a sum of same-sign terms in any order); softmax-based layers add
2 U times the spread of the scores (the rounding of x - max moves exp by that much). Twice
that bounds port vs Caffe. Diffs are a softmax (or sigmoid) and one or two products: the
same bound. Accuracy's tops are counts and one division on both sides: equal. Skips without
the legacy stack, fails in CI (PORTING_REQUIRE_CAFFE=1).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numpy_ref as ref
from porting import load_caffe
from porting.errors import PortingError
from porting.layers import build_layer
from porting.rounding import LIBM, U, gamma


def _labels(shape, seed, classes, ignore=None, ignored=0.25):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, classes, size=shape).astype(np.float32)
    if ignore is not None:
        lab[rng.random(shape) < ignored] = ignore
    return lab


def _tol(bottoms):
    """2 (gamma(K + 2) + 4 LIBM + 2 U spread): K the values of the largest bottom, spread
    twice its largest magnitude (see the module docstring)."""
    k = max(b.size for b in bottoms)
    spread = 2 * float(np.abs(bottoms[0]).max())
    return 2 * (gamma(k + 2) + 4 * LIBM + 2 * U * spread)


def _prototxt(text, bottoms, n_tops, mode=None):
    """Input, then the layer under test. ``mode`` "net": force_backward, so the inputs get
    diffs from Caffe's own Net::Backward; "front": bottom 0 passes through a Bias layer of
    zeros first and no backward is forced, so Caffe computes the diff of the Bias's top
    ("front") only (InfogainLoss's H bottom aborts Caffe's backward when it is forced)."""
    shapes = "".join(f" shape {{ {' '.join(f'dim: {d}' for d in b.shape)} }}" for b in bottoms)
    tops = " ".join(f'top: "b{i}"' for i in range(len(bottoms)))
    outs = " ".join(f'top: "out{i}"' for i in range(n_tops))
    names = [f"b{i}" for i in range(len(bottoms))]
    front = ""
    if mode == "front":
        front, names[0] = 'layer { name: "front" type: "Bias" bottom: "b0" top: "front" }\n', "front"
    ins = " ".join(f'bottom: "{n}"' for n in names)
    type_name, _, rest = text.partition(" ")
    return (f'name: "one"\n{"force_backward: true" if mode == "net" else ""}\n'
            f'layer {{ name: "input" type: "Input" {tops} input_param {{{shapes} }} }}\n{front}'
            f'layer {{ name: "under_test" type: {type_name} {ins} {outs} {rest} }}\n')


N4 = (4, 5, 3, 2)


def _cases():
    c = []

    def add(id_, text, bottoms, n_tops=1, mode=None):
        c.append(pytest.param(text, bottoms, n_tops, mode, id=id_))

    x, x3 = ref.seeded_normal(N4, 1, scale=3), ref.seeded_normal((6, 4, 5), 2, scale=3)
    lab = _labels((4, 3, 2), 3, 5)
    lab_ign = _labels((4, 3, 2), 4, 5, ignore=2)  # 2 is a class too: ignored, not counted
    for mode in ("FULL", "VALID", "BATCH_SIZE", "NONE"):
        add(f"softmax-{mode}", f'"SoftmaxWithLoss" loss_param {{ ignore_label: 2 normalization: {mode} }}',
            [x, lab_ign])
    add("softmax-default", '"SoftmaxWithLoss"', [x, lab])
    add("softmax-normalize-false", '"SoftmaxWithLoss" loss_param { normalize: false ignore_label: 2 }',
        [x, lab_ign])
    add("softmax-normalize-true", '"SoftmaxWithLoss" loss_param { normalize: true ignore_label: 2 }',
        [x, lab_ign])
    add("softmax-axis-last", '"SoftmaxWithLoss" softmax_param { axis: -1 } loss_param { ignore_label: 0 }',
        [x3, _labels((6, 4), 5, 5, ignore=0)])
    add("softmax-all-ignored", '"SoftmaxWithLoss" loss_param { ignore_label: 1 }', [x3, np.ones((6, 5), np.float32)])
    add("softmax-underflow", '"SoftmaxWithLoss"', [ref.seeded_normal((3, 4), 6, scale=60), _labels((3,), 7, 4)])
    add("softmax-net", '"SoftmaxWithLoss" loss_weight: 2.5 loss_param { ignore_label: 2 }', [x, lab_ign],
        mode="net")
    h = np.random.default_rng(8).uniform(0, 2, size=(5, 5)).astype(np.float32)
    add("infogain", '"InfogainLoss"', [x, lab, h], mode="front")
    add("infogain-ignore-full", '"InfogainLoss" loss_param { ignore_label: 2 normalization: FULL } loss_weight: 0.5',
        [x, lab_ign, h], mode="front")
    add("infogain-axis-prob-top", '"InfogainLoss" infogain_loss_param { axis: 2 } loss_weight: 3 loss_weight: 0',
        [x3, _labels((6, 4), 9, 5), h], n_tops=2, mode="front")
    add("infogain-batch", '"InfogainLoss" loss_param { normalization: BATCH_SIZE ignore_label: 2 }',
        [x, lab_ign, h], mode="front")
    add("euclidean", '"EuclideanLoss"', [ref.seeded_normal((4, 3, 2), 10), ref.seeded_normal((4, 6), 11)])
    add("euclidean-net", '"EuclideanLoss" loss_weight: -1.5', [ref.seeded_normal((4, 3, 2), 12), ref.seeded_normal((4, 6), 13)],
        mode="net")
    logits = ref.seeded_normal(N4, 14, scale=4, zeros=0.1)  # exact zeros: Caffe's diff there is sigmoid(0) - t
    target = np.random.default_rng(15).uniform(0, 1, size=N4).astype(np.float32)
    hard = np.round(target)
    hard[np.random.default_rng(16).random(N4) < 0.2] = -1
    add("sigmoid-ce", '"SigmoidCrossEntropyLoss"', [logits, target])
    for mode in ("FULL", "VALID", "NONE"):
        add(f"sigmoid-ce-{mode}", f'"SigmoidCrossEntropyLoss" loss_param {{ ignore_label: -1 normalization: {mode} }}',
            [logits, hard])
    add("sigmoid-ce-normalize", '"SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 normalize: true }',
        [logits, hard])
    add("sigmoid-ce-net", '"SigmoidCrossEntropyLoss" loss_weight: 0.25', [logits, target], mode="net")
    scores = ref.seeded_normal((6, 5), 17, scale=1.2)
    add("hinge-l1-net", '"HingeLoss" loss_weight: 0.5', [scores, _labels((6,), 18, 5)], mode="net")
    add("hinge-ignore-label-unread-net", '"HingeLoss" loss_param { ignore_label: 0 }',  # Caffe reads no loss_param
        [scores, _labels((6,), 18, 5)], mode="net")
    add("hinge-l2-net", '"HingeLoss" hinge_loss_param { norm: L2 } loss_weight: 3',
        [ref.seeded_normal((6, 5, 1, 1), 19), _labels((6, 1), 20, 5)], mode="net")
    probs = np.random.default_rng(21).uniform(0, 1, size=(6, 5)).astype(np.float32)
    probs[0, :] = 1e-30  # below kLOG_THRESHOLD: clamped in the loss and in the diff
    add("multinomial", '"MultinomialLogisticLoss"', [probs, _labels((6, 1, 1, 1), 22, 5)])
    add("multinomial-net", '"MultinomialLogisticLoss" loss_weight: 2', [probs, _labels((6,), 23, 5)],
        mode="net")
    a, b = ref.seeded_normal((8, 3), 24, scale=0.5), ref.seeded_normal((8, 3), 25, scale=0.5)
    sim = np.array([1, 0, 0, 1, 0, 0.5, 2, 0], np.float32)  # 0.5 truncates to 0 (dissimilar)
    for legacy in ("false", "true"):
        add(f"contrastive-legacy-{legacy}", f'"ContrastiveLoss" contrastive_loss_param {{ margin: 1.5 '
            f'legacy_version: {legacy} }}', [a, b, sim])
    add("contrastive-net", '"ContrastiveLoss" loss_weight: 0.7', [a, b, sim], mode="net")
    # labels read by static_cast<int> (the port: a cast to int64, exported as ONNX Cast):
    # -0.5 and 0.99 are class 0, 4.9 class 4, -1.7 is ignore_label -1
    fractional = np.array([-0.5, 4.9, 2.5, -1.7, 0.99, 3], np.float32)
    add("softmax-fractional-labels", '"SoftmaxWithLoss" loss_param { ignore_label: -1 }',
        [ref.seeded_normal((6, 5), 40), fractional])
    add("softmax-fractional-labels-net", '"SoftmaxWithLoss" loss_param { ignore_label: -1 normalization: FULL }',
        [ref.seeded_normal((6, 5), 41), fractional], mode="net")
    return c


@pytest.mark.parametrize("text,bottoms,n_tops,mode", _cases())
def test_loss_layer_matches_caffe(caffe_worker, tmp_path, text, bottoms, n_tops, mode):
    prototxt = tmp_path / "one.prototxt"
    prototxt.write_text(_prototxt(text, bottoms, n_tops, mode))
    net = load_caffe(prototxt)
    inputs = {f"b{i}": b for i, b in enumerate(bottoms)}
    tops = [f"out{i}" for i in range(n_tops)]
    net_backward = mode is not None
    if net_backward:
        caffe = caffe_worker.run_net(prototxt, inputs=inputs, net_backward=True)
    else:  # a diff on every top; Caffe's backward ignores the probabilities top's
        diffs = {t: (ref.seeded_normal(net.graph.blob_shapes[t], 30 + i) if i else np.float32(-1.75))
                 for i, t in enumerate(tops)}
        caffe = caffe_worker.run_net(prototxt, inputs=inputs, top_diffs=diffs)

    xs = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    out = net(**xs)
    if net_backward:
        loss = net.loss()
        loss.backward()
        err = ref.rel_err(loss.detach().numpy(), caffe["loss"])
        ref.log_error("loss", "net loss", err)
        assert err <= _tol(bottoms), f"net loss {loss.item()} vs Caffe {caffe['loss']}"
    else:
        pairs = [(out[t], torch.tensor(diffs[t])) for t in tops if out[t].requires_grad]
        torch.autograd.backward([p for p, _ in pairs], [d for _, d in pairs])
    tol = _tol(bottoms)
    for t in tops:
        err = ref.rel_err(out[t].detach().numpy(), caffe[f"blob/{t}/data"])
        ref.log_error("loss", f"top {t}", err)
        assert err <= tol, f"top {t}: rel err {err:.3g} > {tol:.3g}"
    for name, x in xs.items():
        if mode == "front" and name != "b0":
            continue  # not computed by Caffe (no backward forced); the port gives them none
        want = caffe["blob/front/diff" if mode == "front" else f"blob/{name}/diff"]
        got = np.zeros_like(want) if x.grad is None else x.grad.numpy()
        err = ref.rel_err(got, want)
        ref.log_error("loss", f"diff {name}", err)
        assert err <= tol, f"diff {name}: rel err {err:.3g} > {tol:.3g}"


def _accuracy_cases():
    c = []
    ties = np.random.default_rng(40).integers(-2, 3, size=(8, 6)).astype(np.float32)  # many ties, decided by Caffe's >=
    lab = _labels((8,), 41, 6)
    for k in (1, 2, 3, 6):
        c.append(pytest.param(f'accuracy_param {{ top_k: {k} }}', [ties, lab], 2, id=f"ties-top{k}"))
    c.append(pytest.param('accuracy_param { top_k: 2 ignore_label: 3 }', [ties, _labels((8,), 42, 6, ignore=3)], 2,
                          id="ignore"))
    c.append(pytest.param('accuracy_param { axis: 2 top_k: 2 }',
                          [np.random.default_rng(43).integers(0, 3, size=(2, 3, 4, 5)).astype(np.float32), _labels((2, 3, 5), 44, 4)],
                          1, id="axis2"))
    c.append(pytest.param('accuracy_param { ignore_label: 0 }', [ties, np.zeros(8, np.float32)], 2, id="all-ignored"))
    return c


@pytest.mark.parametrize("params,bottoms,n_tops", _accuracy_cases())
def test_accuracy_matches_caffe(caffe_worker, tmp_path, params, bottoms, n_tops):
    """Forward only: Caffe's Accuracy backward is NOT_IMPLEMENTED. Counts and one division
    on both sides: equal bit for bit, ties included."""
    prototxt = tmp_path / "acc.prototxt"
    prototxt.write_text(_prototxt(f'"Accuracy" {params}', bottoms, n_tops))
    inputs = {f"b{i}": b for i, b in enumerate(bottoms)}
    caffe = caffe_worker.run_net(prototxt, inputs=inputs)
    xs = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    out = load_caffe(prototxt)(**xs)
    for i in range(n_tops):
        assert not out[f"out{i}"].requires_grad
        np.testing.assert_array_equal(out[f"out{i}"].numpy(), caffe[f"blob/out{i}/data"])


TWO_LOSSES = """name: "two"
force_backward: true
layer { name: "input" type: "Input" top: "x" top: "label" top: "target"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } shape { dim: 4 dim: 6 } } }
layer { name: "scale" type: "Power" bottom: "x" top: "y" power_param { scale: 0.5 shift: 0.25 } }
layer { name: "cls" type: "SoftmaxWithLoss" bottom: "y" bottom: "label" top: "cls" loss_weight: 0.3 }
layer { name: "reg" type: "EuclideanLoss" bottom: "y" bottom: "target" top: "reg" loss_weight: 2 }
layer { name: "hinge" type: "HingeLoss" bottom: "x" bottom: "label" top: "hinge" }
layer { name: "sum" type: "Reduction" bottom: "y" top: "sum" loss_weight: -0.125 }
"""


def test_net_loss_with_several_weighted_losses(caffe_worker, tmp_path):
    """CaffeNet.loss is Caffe's Net::Forward loss (0.3 cls + 2 reg + 1 hinge - 0.125 sum,
    a non-loss layer weighted too), and its backward Caffe's Net::Backward: x's diff adds
    the three paths through the Power layer and Caffe's split."""
    prototxt = tmp_path / "two.prototxt"
    prototxt.write_text(TWO_LOSSES)
    x, label, target = ref.seeded_normal((4, 6), 50, scale=2), _labels((4,), 51, 6), ref.seeded_normal((4, 6), 52)
    caffe = caffe_worker.run_net(prototxt, inputs={"x": x, "label": label, "target": target}, net_backward=True)
    net = load_caffe(prototxt)
    xt, tt = torch.tensor(x, requires_grad=True), torch.tensor(target, requires_grad=True)
    net(x=xt, label=torch.tensor(label), target=tt)
    loss = net.loss()
    want = (0.3 * caffe["blob/cls/data"] + 2 * caffe["blob/reg/data"] + caffe["blob/hinge/data"]
            - 0.125 * caffe["blob/sum/data"])
    assert abs(float(want) - float(caffe["loss"])) <= 1e-5 * abs(float(want))  # the weights are what Caffe used
    tol = _tol([x, target])
    assert ref.rel_err(loss.detach().numpy(), caffe["loss"]) <= tol
    loss.backward()
    assert ref.rel_err(xt.grad.numpy(), caffe["blob/x/diff"]) <= tol
    assert ref.rel_err(tt.grad.numpy(), caffe["blob/target/diff"]) <= tol


def _layer(text, shapes, tops=('top: "l"',)):
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(len(shapes)))
    return build_layer(f'name: "t" type: {text} {bottoms} {" ".join(tops)}', shapes)


@pytest.mark.parametrize("text,shapes,label", [
    ('"SoftmaxWithLoss"', [(2, 3), (2,)], [0, 3]),
    ('"SoftmaxWithLoss" loss_param { ignore_label: 3 }', [(2, 3), (2,)], [3, -1]),
    ('"HingeLoss"', [(2, 3), (2,)], [0, 5]),
    ('"MultinomialLogisticLoss"', [(2, 3), (2,)], [0, float("nan")]),
    ('"InfogainLoss"', [(2, 3), (2,), (3, 3)], [0, 7])])
def test_label_out_of_range_is_a_clear_error(text, shapes, label):
    """Caffe only DCHECKs labels (a release build reads outside the blob): the port refuses
    at run time with a PortingError naming the layer, the label and its index."""
    layer = _layer(text, shapes)
    bottoms = [torch.rand(s) for s in shapes]
    bottoms[1] = torch.tensor(label, dtype=torch.float32)
    with pytest.raises(PortingError, match=r"^layer t \(\w+\): label .* at index 1 is outside \[0, 3\)"):
        layer(*bottoms)
    acc = _layer('"Accuracy"', [(2, 3), (2,)], tops=('top: "a"',))
    with pytest.raises(PortingError, match="outside"):
        acc(torch.rand(2, 3), torch.tensor([0.0, 3.0]))


@pytest.mark.parametrize("layer,problem", [
    ('type: "SoftmaxWithLoss" bottom: "x" bottom: "bad" top: "l"', "number of labels"),
    ('type: "SoftmaxWithLoss" bottom: "x" bottom: "short" top: "l"', "same first dimension"),
    ('type: "SoftmaxWithLoss" bottom: "x" top: "l"', "takes 2 bottom"),
    ('type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "l" top: "p"', "second top"),
    ('type: "InfogainLoss" bottom: "x" bottom: "label" bottom: "h" top: "l" top: "p"',
     "loss_weight must be unspecified"),
    ('type: "EuclideanLoss" bottom: "x" bottom: "bad" top: "l"', "same dimension"),
    ('type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "bad" top: "l"', "same count"),
    ('type: "InfogainLoss" bottom: "x" bottom: "label" top: "l" infogain_loss_param { source: "h.binaryproto" }',
     "source .* is not supported"),
    ('type: "InfogainLoss" bottom: "x" bottom: "label" bottom: "bad" top: "l"', "must be 5x5"),
    ('type: "ContrastiveLoss" bottom: "x" bottom: "x" top: "l"', "takes 3 bottom"),
    ('type: "ContrastiveLoss" bottom: "x" bottom: "short" bottom: "label" top: "l"', "same first dimension"),
    ('type: "ContrastiveLoss" bottom: "x" bottom: "x" bottom: "short" top: "l"', "3 values for 4 pairs"),
    ('type: "InfogainLoss" bottom: "x" bottom: "label" bottom: "h" top: "l" loss_param { normalize: true }',
     "normalize"),
    ('type: "Accuracy" bottom: "x" bottom: "label" top: "a" accuracy_param { top_k: 6 }', "top_k"),
    ('type: "Accuracy" bottom: "x" bottom: "bad" top: "a"', "number of labels"),
    ('type: "Accuracy" bottom: "x" bottom: "label" top: "a" loss_weight: 1 loss_weight: 2', "loss_weight"),
])
def test_bad_bottoms_are_porting_errors(tmp_path, layer, problem):
    prototxt = tmp_path / "bad.prototxt"
    prototxt.write_text('layer { name: "in" type: "Input" top: "x" top: "label" top: "bad" top: "short" top: "h"\n'
                        '  input_param { shape { dim: 4 dim: 5 } shape { dim: 4 } shape { dim: 4 dim: 3 }'
                        ' shape { dim: 3 } shape { dim: 5 dim: 5 } } }\n'
                        f'layer {{ name: "under_test" {layer} }}\n')
    with pytest.raises(PortingError, match=problem):
        load_caffe(prototxt)


def test_loss_weights_default_and_given():
    """Caffe's SetLossWeights: 1 on a loss layer's only top, the given ones otherwise, 0
    on any other layer's tops."""
    from porting.layers.loss import loss_weights

    assert loss_weights(_layer('"SoftmaxWithLoss"', [(2, 3), (2,)])) == [1.0]
    assert loss_weights(_layer('"SoftmaxWithLoss"', [(2, 3), (2,)], tops=())) == [1.0]  # Caffe's auto top
    assert loss_weights(_layer('"InfogainLoss" loss_weight: 0.5 loss_weight: 2', [(2, 3), (2,), (3, 3)],
                               tops=('top: "l"', 'top: "p"'))) == [0.5, 2.0]
    assert loss_weights(_layer('"Accuracy"', [(2, 3), (2,)], tops=('top: "a"', 'top: "b"'))) == [0.0, 0.0]
    assert loss_weights(_layer('"ReLU"', [(2, 3)], tops=('top: "r"',))) == [0.0]


def test_softmax_with_loss_second_top_is_refused_as_caffe_refuses_it(caffe_worker, tmp_path):
    """Caffe 1.0 cannot set up SoftmaxWithLoss with two tops (its inner Softmax copies the
    two loss weights and has one top); the port refuses the same prototxt."""
    from porting.legacy_worker import CaffeError

    prototxt = tmp_path / "two_tops.prototxt"
    prototxt.write_text(_prototxt('"SoftmaxWithLoss" loss_weight: 1 loss_weight: 0',
                                  [ref.seeded_normal((2, 3), 60), _labels((2,), 61, 3)], 2))
    with pytest.raises(CaffeError, match="loss_weight must be unspecified"):
        caffe_worker.run_net(prototxt, inputs={"b0": ref.seeded_normal((2, 3), 60), "b1": _labels((2,), 61, 3)})
    with pytest.raises(PortingError, match="second top"):
        load_caffe(prototxt)


def test_accuracy_and_hinge_decisions():
    """Accuracy's decision per position is "counted correct", its margin the nearest other
    score to the label's (0 at a tie); Hinge's is m > 0, its margin |1 + s x|."""
    x = torch.tensor([[3.0, 1.0, 3.0], [0.5, 2.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    label = torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64)
    acc = _layer('"Accuracy" accuracy_param { top_k: 2 ignore_label: 1 }', [(3, 3), (3,)], tops=('top: "a"',))
    assert acc.decisions([x, label])[0].tolist() == [[True], [True], [False]]
    assert acc.decision_margins([x, label])[0].tolist() == [[0.0], [0.5], [float("inf")]]
    assert acc(x, label)[0].item() == 1.0  # the tie at 3 counts against, yet 2 <= top_k
    hinge = _layer('"HingeLoss"', [(3, 3), (3,)])
    assert hinge.decisions([x, label])[0].tolist() == [[False, True, True], [True, True, False], [True, False, True]]
    assert hinge.decision_margins([x, label])[0][0].tolist() == [2.0, 2.0, 4.0]
