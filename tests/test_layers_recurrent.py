"""LSTMUnit, LSTM and RNN against real Caffe 1.0 (the legacy stack): forward, the gradients
of every bottom and of every parameter blob, and Caffe's refusals of bad bottoms and tops.

Each case is a two-layer net (Input, then the layer under test) run by Caffe in the TEST
phase with seeded inputs and top diffs, and by the port loaded from the same prototxt and
the caffemodel Caffe's own fillers wrote (gaussian weights and biases, std 0.5, so gates
are neither all saturated nor all linear). ``cont`` holds a 0 in mid-sequence (a state
reset), and in a few cases also 0.5 or 0.25, where Caffe's LSTMUnit backward is not the
derivative of its forward (it takes f (1 - f) with f = cont sigmoid(.) as f's derivative;
autograd of the forward there is off by 17-19% of the largest x diff).

Errors are max |port - caffe| / max |caffe| per array (numpy_ref.rel_err). Tolerances:

- ``unit``: one LSTMUnit, elementwise: a few sigmoid/tanh calls and products per value, each
  within a few float32 ulps on both sides (Caffe's tanh is 2 sigmoid(2x) - 1, torch's is
  tanh: they differ by ~1 ulp of 1 near 0), so a few 1e-7 of the largest value; measured max
  9.7e-8 (top h; LAYER_ERRORS_LOG); bound 1e-6, the ``transcendental`` family of
  tests/test_layers_caffe.py.
- ``recurrent``: T steps, each a dot product of D + H (LSTM: 4 gates) terms in an order that
  differs between the two BLAS paths, then the transcendental step; the error of a step is
  carried into the next through W_hh/W_hc (gain at most |W| |tanh'| ~ 1 here) and the
  backward through time adds the same again, so the per-step error of the ``sum`` and
  ``transcendental`` families (<= 1e-6 each) grows at most ~2T-fold: bound 2T x 5e-7 = 4e-6
  at T = 4; measured max 5.0e-7 over these cases (RNN diff x; LSTM at most 3.2e-7).

Beyond these tolerances, each framework's tops and bottom diffs (Caffe's and the port's,
float32) are held to the layer's own a-priori rounding bound around the float64 evaluation
at the same bottoms (``forward_bound``/``backward_bound``): measured at most 0.09 of it,
while the bounds stay below 1e-4 (tops) and 1e-3 (diffs) of the largest value.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import numpy_ref as ref
from porting import load_caffe
from porting.errors import PortingError
from porting.layers import build_layer
from porting.legacy import CaffeError
from porting.rounding import vjp

TOL = {"unit": 1e-6, "recurrent": 4e-6}
T, N, H = 4, 2, 5
X_SHAPE = (T, N, 3, 2)       # flattened from axis 2: D = 6
STATIC_SHAPE = (N, 2, 3)     # flattened from axis 1: S = 6


def _dims(shape):
    return " ".join(f"dim: {d}" for d in shape)


def _net(layer_text, bottoms: dict, tops):
    """An Input layer feeding ``bottoms`` (name -> shape) to the layer "rec" with ``tops``."""
    names = " ".join(f'top: "{b}"' for b in bottoms)
    shapes = " ".join(f"shape {{ {_dims(s)} }}" for s in bottoms.values())
    ins = " ".join(f'bottom: "{b}"' for b in bottoms)
    outs = " ".join(f'top: "{t}"' for t in tops)
    return (f'name: "recurrent"\nlayer {{ name: "input" type: "Input" {names} input_param {{ {shapes} }} }}\n'
            f'layer {{ name: "rec" {ins} {outs} {layer_text} }}\n')


def _run_both(caffe_worker, prototxt, caffemodel, inputs, top_diffs):
    """(caffe result, port blobs, port input grads by name, port param grads, the port's layer)."""
    caffe = caffe_worker.run_net(prototxt, caffemodel, inputs=inputs, top_diffs=top_diffs, params=True,
                                 capture_tops=False)
    net = load_caffe(prototxt, caffemodel)
    xs = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    out = net(**xs)
    pairs = [(out[t], torch.tensor(d)) for t, d in top_diffs.items() if out[t].requires_grad]
    torch.autograd.backward([p for p, _ in pairs], [d for _, d in pairs])
    grads = {k: (np.zeros(v.shape, np.float32) if x.grad is None else x.grad.numpy())
             for (k, x), v in zip(xs.items(), inputs.values())}
    params = [np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.numpy()
              for p in net.params.get("rec", [])]
    layer = next(spec.module for spec in net.graph.layers if spec.name == "rec")
    return caffe, out, grads, params, layer


def _ratio(got, exact, bound):
    """max |got - exact| / bound (0 where both are 0)."""
    err = (torch.as_tensor(got, dtype=torch.float64) - exact).abs()
    return float(torch.where(err == 0, torch.zeros_like(err), err / bound).max())


def _check_forward_bound(layer, inputs, caffe, out, tops):
    """Caffe's and the port's float32 tops are within the layer's forward bound of the float64
    evaluation at the same bottoms, and the bound is tight: well under 1e-4 of the tops
    (a weight 1e-3 off moves them beyond it: test_bound_is_not_vacuous)."""
    layer64 = copy.deepcopy(layer).double()
    xs = [torch.tensor(v, dtype=torch.float64) for v in inputs.values()]
    with torch.no_grad():
        exact = list(layer64(*xs))
    bounds = layer64.forward_bound(xs, exact)
    for t, y, b in zip(tops, exact, bounds):
        for who, got in (("caffe", caffe[f"blob/{t}/data"]), ("port", out[t].detach().numpy())):
            ratio = _ratio(got, y, b)
            ref.log_error("bound-ratio", f"{who} top {t}", ratio)
            assert ratio <= 1, f"{who} top {t}: {ratio:.3g} x its bound"
        assert float(b.max()) < 1e-4 * float(y.abs().max()), f"top {t}: loose bound"
    return layer64, xs, exact, bounds


def _check(name, got, want, family):
    err = ref.rel_err(got, want)
    ref.log_error(family, name, err)
    assert err <= TOL[family], f"{name}: rel err {err:.3g} > {TOL[family]:g}"


# ---------------------------------------------------------------- LSTMUnit alone

def test_lstm_unit_matches_caffe(caffe_worker, tmp_path):
    """c_t, h_t and the diffs of c_{t-1} and the gate inputs, with cont 0, 1 and 0.5."""
    n, h = 4, 3
    inputs = {"c_prev": ref.seeded_normal((1, n, h), 1, 2.0), "X": ref.seeded_normal((1, n, 4 * h), 2, 3.0),
              "cont": np.array([[0, 1, 0.5, 1]], np.float32)}
    prototxt = tmp_path / "unit.prototxt"
    prototxt.write_text(_net('type: "LSTMUnit"', {k: v.shape for k, v in inputs.items()}, ["c", "h"]))
    diffs = {"c": ref.seeded_normal((1, n, h), 3), "h": ref.seeded_normal((1, n, h), 4)}
    caffe, out, grads, _, layer = _run_both(caffe_worker, prototxt, None, inputs, diffs)
    for t in ("c", "h"):
        _check(f"top {t}", out[t].detach().numpy(), caffe[f"blob/{t}/data"], "unit")
    for b in ("c_prev", "X"):
        _check(f"diff {b}", grads[b], caffe[f"blob/{b}/diff"], "unit")
    assert not caffe["blob/cont/diff"].any() and not grads["cont"].any()
    layer64, xs, exact, _ = _check_forward_bound(layer, inputs, caffe, out, ["c", "h"])
    # backward bound: each framework's bottom diffs against Caffe's formula in float64 at its
    # own stored c (the port's c here; Caffe's c differs from it by rounding only)
    g64 = [torch.tensor(diffs[t], dtype=torch.float64) for t in ("c", "h")]
    exact_grads = vjp(layer64, xs, g64)
    for who, tops_f, got in (("caffe", [caffe["blob/c/data"], caffe["blob/h/data"]],
                              [caffe["blob/c_prev/diff"], caffe["blob/X/diff"]]),
                             ("port", [out["c"].detach().numpy(), out["h"].detach().numpy()],
                              [grads["c_prev"], grads["X"]])):
        bounds = layer64.backward_bound(xs, [torch.tensor(t, dtype=torch.float64) for t in tops_f], exact, g64)
        assert bounds[2] is None and exact_grads[2] is None
        for name, g, e, b in zip(("c_prev", "X"), got, exact_grads, bounds):
            ratio = _ratio(g, e, b)
            ref.log_error("bound-ratio", f"{who} diff {name}", ratio)
            assert ratio <= 1, f"{who} diff {name}: {ratio:.3g} x its bound"
            assert float(b.max()) < 1e-4 * float(e.abs().max())
    assert np.abs(caffe["blob/X/diff"]).max() > 0.1 and np.abs(caffe["blob/c_prev/diff"]).max() > 0.1
    # The f block of the cont = 0.5 stream: Caffe's f (1 - f) is not the derivative of
    # 0.5 sigmoid(.) (what autograd of the forward would give); the port follows Caffe.
    X = torch.tensor(inputs["X"], dtype=torch.float64, requires_grad=True)
    c_prev = torch.tensor(inputs["c_prev"], dtype=torch.float64)
    cont = torch.tensor(inputs["cont"], dtype=torch.float64)
    s = torch.sigmoid(X[..., h:2 * h])
    c = cont.unsqueeze(-1) * s * c_prev + torch.sigmoid(X[..., :h]) * torch.tanh(X[..., 3 * h:])
    hh = torch.sigmoid(X[..., 2 * h:3 * h]) * torch.tanh(c)
    torch.autograd.backward([c, hh], [torch.tensor(diffs["c"], dtype=torch.float64),
                                      torch.tensor(diffs["h"], dtype=torch.float64)])
    derivative, caffe_f = X.grad.numpy()[0, 2, h:2 * h], caffe["blob/X/diff"][0, 2, h:2 * h]
    assert np.abs(derivative - caffe_f).max() > 100 * TOL["unit"] * np.abs(caffe_f).max()
    np.testing.assert_allclose(grads["X"][0, 2, h:2 * h], caffe_f, rtol=0, atol=TOL["unit"] * np.abs(caffe_f).max())


# ---------------------------------------------------------------- LSTM and RNN

def _recurrent_case(kind, static, expose, fractional=False):
    """Bottoms (name -> array) and tops of an LSTM or RNN case."""
    cont = np.array([[0, 0], [1, 1], [1, 0], [1, 1]], np.float32)  # stream 1 restarts at t = 2
    if expose:
        cont[0] = 1  # the exposed h_0 (and c_0) carry into step 1 of stream 0
    if fractional:  # cont scales the state; LSTMUnit's backward takes f (1 - f), f = cont sigmoid
        cont[1, 0], cont[3, 1] = 0.5, 0.25
    inputs = {"x": ref.seeded_normal(X_SHAPE, 10, 1.5), "cont": cont}
    if static:
        inputs["x_static"] = ref.seeded_normal(STATIC_SHAPE, 11)
    tops = ["out"]
    if expose:
        inputs["h_0"] = ref.seeded_normal((1, N, H), 12, 0.8)
        tops.append("h_T")
        if kind == "LSTM":
            inputs["c_0"] = ref.seeded_normal((1, N, H), 13, 2.0)
            tops.append("c_T")
    return inputs, tops


@pytest.mark.parametrize("expose", [False, True], ids=["", "expose"])
@pytest.mark.parametrize("static", [False, True], ids=["", "static"])
@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_recurrent_matches_caffe(caffe_worker, caffe_weights, tmp_path, kind, static, expose):
    _check_recurrent(caffe_worker, caffe_weights, tmp_path, kind, static, expose)


@pytest.mark.parametrize("kind,static,expose", [("LSTM", True, True), ("LSTM", False, False), ("RNN", False, True)])
def test_recurrent_with_fractional_cont_matches_caffe(caffe_worker, caffe_weights, tmp_path, kind, static, expose):
    _check_recurrent(caffe_worker, caffe_weights, tmp_path, kind, static, expose, fractional=True)


def _check_recurrent(caffe_worker, caffe_weights, tmp_path, kind, static, expose, fractional=False):
    inputs, tops = _recurrent_case(kind, static, expose, fractional)
    text = (f'type: "{kind}" recurrent_param {{ num_output: {H} expose_hidden: {str(expose).lower()} }}')
    prototxt = tmp_path / f"{kind}.prototxt"
    prototxt.write_text(_net(text, {k: v.shape for k, v in inputs.items()}, tops))
    caffemodel = caffe_weights(prototxt, seed=3, filler="gaussian", std=0.5, bias_filler="gaussian", bias_std=0.5)
    diffs = {t: ref.seeded_normal((T, N, H) if t == "out" else (1, N, H), 20 + i) for i, t in enumerate(tops)}
    caffe, out, grads, params, layer = _run_both(caffe_worker, prototxt, caffemodel, inputs, diffs)

    for t in tops:
        _check(f"top {t}", out[t].detach().numpy(), caffe[f"blob/{t}/data"], "recurrent")
    layer64, xs, exact, _ = _check_forward_bound(layer, inputs, caffe, out, tops)
    g64 = [torch.tensor(diffs[t], dtype=torch.float64) for t in tops]
    exact_grads = vjp(layer64, xs, g64)
    names = list(inputs)
    for who, tops_f, got in (("caffe", [caffe[f"blob/{t}/data"] for t in tops],
                              [caffe[f"blob/{b}/diff"] for b in names]),
                             ("port", [out[t].detach().numpy() for t in tops], [grads[b] for b in names])):
        bounds = layer64.backward_bound(xs, [torch.tensor(t, dtype=torch.float64) for t in tops_f], exact, g64)
        for name, g, e, b in zip(names, got, exact_grads, bounds):
            if name in ("cont", "h_0", "c_0"):
                assert e is None and b is None, name
                continue
            ratio = _ratio(g, e, b)
            ref.log_error("bound-ratio", f"{who} diff {name}", ratio)
            assert ratio <= 1, f"{who} diff {name}: {ratio:.3g} x its bound"
            # looser than the tops' (the diffs of x_static sum T steps of 4H gate diffs that
            # cancel), yet far from vacuous
            assert float(b.max()) < 1e-3 * float(e.abs().max()), f"diff {name}: loose bound"
    if kind == "LSTM" and expose:  # h_T is the last step of the output h, in both
        np.testing.assert_array_equal(caffe["blob/h_T/data"], caffe["blob/out/data"][-1:])
        np.testing.assert_array_equal(out["h_T"].detach().numpy(), out["out"].detach().numpy()[-1:])
    for b in ("x", "x_static"):
        if b in inputs:
            _check(f"diff {b}", grads[b], caffe[f"blob/{b}/diff"], "recurrent")
            assert np.abs(caffe[f"blob/{b}/diff"]).max() > 0.01
    # Caffe gives cont, h_0 and c_0 no gradient (h_0/c_0 share only their data with the
    # unrolled net), and diffs given to h_T/c_T reach nothing.
    for b in ("cont", "h_0", "c_0"):
        if b in inputs:
            assert not caffe[f"blob/{b}/diff"].any(), b
            assert not grads[b].any(), b
    n_params = sum(1 for k in caffe if k.startswith("param/rec/") and not k.endswith("/diff"))
    assert n_params == len(params) == {"LSTM": 4, "RNN": 6}[kind] - (0 if static else 1)
    for i, got in enumerate(params):
        assert got.shape == caffe[f"param/rec/{i}"].shape
        _check(f"param diff {i}", got, caffe[f"param/rec/{i}/diff"], "recurrent")


def test_exposed_state_diffs_reach_nothing(caffe_worker, caffe_weights, tmp_path):
    """Diffs on h_T and c_T alone (none on the output): Caffe's gradients are all zero."""
    inputs, tops = _recurrent_case("LSTM", False, True)
    text = f'type: "LSTM" recurrent_param {{ num_output: {H} expose_hidden: true }}'
    prototxt = tmp_path / "lstm.prototxt"
    prototxt.write_text(_net(text, {k: v.shape for k, v in inputs.items()}, tops))
    caffemodel = caffe_weights(prototxt, seed=4, filler="gaussian", std=0.5, bias_filler="gaussian", bias_std=0.5)
    diffs = {"out": np.zeros((T, N, H), np.float32), "h_T": ref.seeded_normal((1, N, H), 30), "c_T": ref.seeded_normal((1, N, H), 31)}
    caffe, _, grads, params, _ = _run_both(caffe_worker, prototxt, caffemodel, inputs, diffs)
    for b in inputs:
        assert not caffe[f"blob/{b}/diff"].any() and not grads[b].any(), b
    for i, got in enumerate(params):
        assert not caffe[f"param/rec/{i}/diff"].any() and not got.any(), i


# ---------------------------------------------------------------- refusals

def _lstm(bottoms, tops=("out",), expose=False, kind="LSTM", num_output=H):
    return (f'type: "{kind}" recurrent_param {{ num_output: {num_output} expose_hidden: {str(expose).lower()} }}',
            bottoms, list(tops))


REFUSED = {
    # bottom shapes as name -> shape; all refused by Caffe's RecurrentLayer/LSTMUnit checks
    "T-mismatch": _lstm({"x": (4, 2, 3), "cont": (3, 2)}),
    "N-mismatch": _lstm({"x": (4, 2, 3), "cont": (4, 3)}),
    "cont-3-axes": _lstm({"x": (4, 2, 3), "cont": (4, 2, 1)}),
    "x-1-axis": _lstm({"x": (4,), "cont": (4, 1)}),
    "x-2-axes": _lstm({"x": (4, 2), "cont": (4, 2)}, kind="RNN"),  # Caffe's input InnerProduct is at axis 2
    "static-1-axis": _lstm({"x": (4, 2, 3), "cont": (4, 2), "s": (2,)}),
    "static-N-mismatch": _lstm({"x": (4, 2, 3), "cont": (4, 2), "s": (3, 2)}),
    "one-bottom": _lstm({"x": (4, 2, 3)}),
    "too-many-bottoms": _lstm({"x": (4, 2, 3), "cont": (4, 2), "s": (2, 2), "e": (1, 2, 5)}),
    "expose-without-c0": _lstm({"x": (4, 2, 3), "cont": (4, 2), "h0": (1, 2, 5)}, ("out", "hT", "cT"), True),
    "expose-h0-shape": _lstm({"x": (4, 2, 3), "cont": (4, 2), "h0": (1, 2, 4)}, ("out", "hT"), True, "RNN"),
    "expose-one-top": _lstm({"x": (4, 2, 3), "cont": (4, 2), "h0": (1, 2, 5)}, ("out",), True, "RNN"),
    "num-output-0": _lstm({"x": (4, 2, 3), "cont": (4, 2)}, kind="RNN", num_output=0),
    "unit-gates-not-4H": ('type: "LSTMUnit"', {"c": (1, 2, 3), "X": (1, 2, 10), "cont": (1, 2)}, ["c1", "h1"]),
    "unit-cont-3-axes": ('type: "LSTMUnit"', {"c": (1, 2, 3), "X": (1, 2, 12), "cont": (1, 2, 1)}, ["c1", "h1"]),
    "unit-two-steps": ('type: "LSTMUnit"', {"c": (2, 2, 3), "X": (2, 2, 12), "cont": (2, 2)}, ["c1", "h1"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_bottoms_refused_like_caffe(caffe_worker, tmp_path, case):
    """The port refuses at load (PortingError) what Caffe refuses at setup (CaffeError)."""
    text, bottoms, tops = REFUSED[case]
    prototxt = tmp_path / f"{case}.prototxt"
    prototxt.write_text(_net(text, bottoms, tops))
    with pytest.raises(PortingError):
        load_caffe(prototxt)
    with pytest.raises(CaffeError):
        caffe_worker.run_net(prototxt, inputs={}, capture_tops=False)


def test_recurrent_param_shapes_and_work():
    """Parameter blobs in Caffe's order and shapes (as pycaffe's net.params shows them)."""
    lstm = build_layer(f'type: "LSTM" {" ".join(f"bottom: {b!r}" for b in "xcs")} top: "o" '
                       f'recurrent_param {{ num_output: {H} }}'.replace("'", '"'), [X_SHAPE, (T, N), STATIC_SHAPE])
    assert lstm.param_shapes == [(4 * H, 6), (4 * H,), (4 * H, 6), (4 * H, H)]
    rnn = build_layer('type: "RNN" bottom: "x" bottom: "c" top: "o" top: "h" '
                      f'recurrent_param {{ num_output: {H} expose_hidden: true }}', [X_SHAPE, (T, N), (1, N, H)])
    assert rnn.param_shapes == [(H, 6), (H,), (H, H), (H, H), (H,)]
    assert rnn.top_shapes == [(T, N, H), (1, N, H)]
    assert lstm.work() > 0 and rnn.work() > 0 and lstm.workspace() > 0
    with pytest.raises(ValueError, match="cont"):
        build_layer('type: "RNN" bottom: "x" bottom: "c" top: "o" recurrent_param { num_output: 2 }',
                    [(3, 2, 4), (2, 2)])


def test_caffe_carries_state_across_forwards_the_port_does_not(caffe_worker, caffe_weights, tmp_path):
    """Without expose_hidden, Caffe starts each forward from the h_T/c_T its previous forward
    left (RecurrentLayer::Forward_cpu copies them to h_0/c_0); the port starts from zeros,
    which is Caffe's first forward of a fresh net. With cont 1 at t = 1 the two differ on the
    second forward of the same Caffe net."""
    inputs, tops = _recurrent_case("LSTM", False, False)
    inputs["cont"][0] = 1
    prototxt = tmp_path / "stateful.prototxt"
    prototxt.write_text(_net(f'type: "LSTM" recurrent_param {{ num_output: {H} }}',
                             {k: v.shape for k, v in inputs.items()}, tops))
    caffemodel = caffe_weights(prototxt, seed=5, filler="gaussian", std=0.5, bias_filler="gaussian", bias_std=0.5)
    first, second = (caffe_worker.run_net(prototxt, caffemodel, inputs=inputs, capture_tops=False)["blob/out/data"]
                     for _ in range(2))
    port = load_caffe(prototxt, caffemodel)(**{k: torch.tensor(v) for k, v in inputs.items()})["out"].detach().numpy()
    _check("top out (first forward)", port, first, "recurrent")
    assert ref.rel_err(second[0], first[0]) > 1e-2  # step 1 read the previous forward's state


@pytest.mark.parametrize("kind,static,expose", [("LSTM", True, False), ("RNN", True, True)])
def test_another_number_of_streams_at_run_time(caffe_worker, caffe_weights, tmp_path, kind, static, expose):
    """Declared with N = 2, run with N = 3 (Caffe's Reshape takes a new N; T it refuses)."""
    inputs, tops = _recurrent_case(kind, static, expose)
    prototxt = tmp_path / f"{kind}-n.prototxt"
    text = f'type: "{kind}" recurrent_param {{ num_output: {H} expose_hidden: {str(expose).lower()} }}'
    prototxt.write_text(_net(text, {k: v.shape for k, v in inputs.items()}, tops))
    caffemodel = caffe_weights(prototxt, seed=6, filler="gaussian", std=0.5, bias_filler="gaussian", bias_std=0.5)
    more = {k: (np.concatenate([v, v[:, :1] * 0.5], axis=1) if k in ("x", "cont", "h_0", "c_0")
                else np.concatenate([v, v[:1] * -1], axis=0)) for k, v in inputs.items()}
    caffe = caffe_worker.run_net(prototxt, caffemodel, inputs=more, capture_tops=False)
    out = load_caffe(prototxt, caffemodel)(**{k: torch.tensor(v) for k, v in more.items()})
    for t in tops:
        assert caffe[f"blob/{t}/data"].shape[1] == 3
        _check(f"top {t} (N = 3)", out[t].detach().numpy(), caffe[f"blob/{t}/data"], "recurrent")
