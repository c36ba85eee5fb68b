"""Recurrent layers (Caffe 1.0 recurrent_layer.cpp, lstm_layer.cpp, rnn_layer.cpp,
lstm_unit_layer.cpp): LSTMUnit, and LSTM and RNN unrolled over T time steps.

Caffe's LSTM and RNN build an internal net unrolled over the T steps of their input and run
it; the port computes the same arithmetic step by step. Bottoms, in Caffe's order:

- ``x``: (T, N, ...), 3 axes or more: T time steps of N independent streams, flattened
  from axis 2 to (T, N, D) (Caffe: an InnerProduct at axis 2);
- ``cont``: (T, N): sequence continuation indicators; 0 at t starts a new sequence (the
  state of t - 1 is multiplied by it). It gets no gradient (Caffe refuses to give one);
- ``x_static`` (optional): (N, ...), 2 axes or more, flattened from axis 1 to (N, S);
  its transform is added at every step;
- with ``recurrent_param.expose_hidden``: ``h_0`` (and ``c_0`` for LSTM), each (1, N, H),
  the state before step 1; without it the state starts at 0 (see below).

Tops: the outputs of all steps, (T, N, H) with H = ``num_output`` (LSTM: h_t; RNN: o_t);
with ``expose_hidden`` also ``h_T`` (and ``c_T`` for LSTM), each (1, N, H).

Parameter blobs, in Caffe's order (the unrolled net's parameters in layer order, each
shared one once), so a caffemodel written by Caffe loads as it is:

- LSTM: W_xc (4H, D), b_c (4H), [W_xc_static (4H, S)], W_hc (4H, H); the 4H gate rows are
  the blocks i, f, o, g in that order;
- RNN: W_xh (H, D), b_h (H), [W_xh_static (H, S)], W_hh (H, H), W_ho (H, H), b_o (H).

Per step t = 1..T (cont_t broadcast over H):

- LSTM: gates_t = W_hc (cont_t h_{t-1}) + W_xc x_t + b_c [+ W_xc_static x_static], then
  ``lstm_unit``: i, f, o = sigmoid of the i, f, o blocks (f taken as 0 where cont_t is 0,
  else cont_t sigmoid(.)), g = tanh of the g block; c_t = f c_{t-1} + i g; h_t = o tanh(c_t);
- RNN: h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static]);
  o_t = tanh(W_ho h_t + b_o).

Backward is Caffe's: autograd for the linear parts and the TanH layers (whose Caffe
backward is the derivative), and LSTMUnit's own formula (``_LSTMUnitFn``), which differs
from the derivative for a cont other than 0 or 1: Caffe takes f's derivative as f (1 - f)
with f = cont sigmoid(.), not cont sigmoid(.) (1 - sigmoid(.)).

Float32 rounding bounds (``forward_bound``/``backward_bound``, all three types) come from a
running error analysis (``_Err``): every operation of Caffe's CPU algorithm (the unrolled
net's InnerProducts, Eltwise sums, Scale by cont, TanH layers, LSTMUnit's own sigmoid and
tanh = 2 sigmoid(2x) - 1) and of the port's carries a bound propagated from its operands'
(first order in U), forward through the T steps and backward through time, where each
step's backward reads stored values whose forward bound it carries on.

Where the port differs from Caffe by design (both measured against Caffe 1.0 in
tests/test_layers_recurrent.py):

- with ``expose_hidden``, Caffe shares only the data of h_0/c_0 with the unrolled net and
  only the data of h_T/c_T with the tops: h_0 and c_0 get no gradient and diffs given to
  h_T and c_T reach nothing. The port does the same (those tops are detached).
- without ``expose_hidden``, Caffe starts each forward from the h_T/c_T its previous
  forward left (zeros for a fresh net); the port is stateless and starts from zeros: the
  same as Caffe's first forward, and as any forward whose cont is 0 at t = 1 for every
  stream (which makes the starting state irrelevant).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from porting.layers import CaffeLayer, caffe_int, count, int_arithmetic, register
from porting.rounding import ETA, LIBM, LIBM_ETA, U, gamma, stored_error


# ---------------------------------------------------------------- the LSTM unit arithmetic

def _gates(X, cont, hidden):
    """i, f, o, g of Caffe's LSTMUnit from the gate inputs X (..., 4H) and cont (...)."""
    i = torch.sigmoid(X[..., :hidden])
    s = torch.sigmoid(X[..., hidden:2 * hidden])
    k = cont.unsqueeze(-1)
    f = torch.where(k == 0, torch.zeros_like(s), k * s)  # Caffe: (cont == 0) ? 0 : cont * sigmoid
    o = torch.sigmoid(X[..., 2 * hidden:3 * hidden])
    g = torch.tanh(X[..., 3 * hidden:])
    return i, f, o, g


def _unit_forward(c_prev, X, cont):
    i, f, o, g = _gates(X, cont, c_prev.shape[-1])
    c = f * c_prev + i * g
    return c, o * torch.tanh(c)


class _LSTMUnitFn(torch.autograd.Function):
    """Caffe's LSTMUnitLayer::Backward_cpu: with t = tanh(c) and dc_ = dc + dh o (1 - t^2),
    dc_prev = dc_ f, di = dc_ g i (1 - i), df = dc_ c_prev f (1 - f), do = dh t o (1 - o),
    dg = dc_ i (1 - g^2); cont gets none."""

    @staticmethod
    def forward(ctx, c_prev, X, cont):
        c, h = _unit_forward(c_prev, X, cont)
        ctx.save_for_backward(c_prev, X, cont, c)
        return c, h

    @staticmethod
    def backward(ctx, dc, dh):
        c_prev, X, cont, c = ctx.saved_tensors
        dc = torch.zeros_like(c) if dc is None else dc
        dh = torch.zeros_like(c) if dh is None else dh
        i, f, o, g = _gates(X, cont, c.shape[-1])
        t = torch.tanh(c)
        dc_ = dc + dh * o * (1 - t * t)
        dX = torch.cat([dc_ * g * i * (1 - i), dc_ * c_prev * f * (1 - f),
                        dh * t * o * (1 - o), dc_ * i * (1 - g * g)], dim=-1)
        return dc_ * f, dX, None


def lstm_unit(c_prev, X, cont):
    """(c_t, h_t) of Caffe's LSTMUnit: c_prev (..., H), X (..., 4H) the gate inputs in the
    order i, f, o, g, cont (...); backward by Caffe's formula (plain ops, differentiated by
    autograd, when no gradient is wanted or during ONNX export)."""
    cont = cont.detach()  # Caffe: "Cannot backpropagate to sequence indicators"
    wants_grad = torch.is_grad_enabled() and (c_prev.requires_grad or X.requires_grad)
    if not wants_grad or torch.onnx.is_in_onnx_export():
        return _unit_forward(c_prev, X, cont)
    return _LSTMUnitFn.apply(c_prev, X, cont)


def _unit_work(values: int) -> int:
    """Operations of one LSTM unit per cell value: four gate functions, tanh(c), 5 products/sums."""
    return 10 * values


# ---------------------------------------------------------------- float32 rounding bounds
#
# Running error analysis, first order in U (porting.rounding): each value is carried as its
# exact float64 value ``v`` and a bound ``e`` on how far a float32 evaluation (Caffe's CPU
# algorithm or the port's) can be from it; each operation adds its own rounding to the
# errors of its operands, propagated by its derivative at the exact point.

class _Err:
    def __init__(self, v, e=None):
        self.v, self.e = v, torch.zeros_like(v) if e is None else e

    def __mul__(self, other):
        other = other if isinstance(other, _Err) else _Err(other)
        v = self.v * other.v
        return _Err(v, self.v.abs() * other.e + other.v.abs() * self.e + U * v.abs() + ETA)

    def __add__(self, other):
        other = other if isinstance(other, _Err) else _Err(other)
        v = self.v + other.v
        return _Err(v, self.e + other.e + U * v.abs())

    def one_minus(self):
        v = 1 - self.v
        return _Err(v, self.e + U * v.abs())

    def __getitem__(self, index):
        return _Err(self.v[index], self.e[index])


def _sum_any(terms):
    """A sum of terms in any order (Caffe's Eltwise SUM, the port's additions)."""
    return _Err(sum(t.v for t in terms),
                sum(t.e for t in terms) + gamma(len(terms) - 1) * sum(t.v.abs() for t in terms))


def _linear(x, W, b=None):
    """x W^T (+ b): a GEMM over K = W's columns (+1 for Caffe's bias), any order."""
    v = torch.nn.functional.linear(x.v, W, b)
    mag = torch.nn.functional.linear(x.v.abs(), W.abs(), None if b is None else b.abs())
    k = W.shape[1] + (b is not None)
    return _Err(v, torch.nn.functional.linear(x.e, W.abs()) + gamma(k) * mag + k * ETA)


def _sigmoid(a):
    """Caffe's LSTMUnit sigmoid 1 / (1 + exp(-x)) (exp, a sum, a quotient) or torch's."""
    v = torch.sigmoid(a.v)
    return _Err(v, v * (1 - v) * a.e + (LIBM + 2 * U) * v + LIBM_ETA)


def _tanh_unit(a):
    """Caffe's LSTMUnit tanh 2 sigmoid(2x) - 1 (the sigmoid's error, doubled, one sum), or
    torch's tanh (LIBM relative)."""
    v = torch.tanh(a.v)
    local = 2 * (LIBM + 2 * U) * torch.sigmoid(2 * a.v) + (LIBM + U) * v.abs() + 2 * LIBM_ETA
    return _Err(v, (1 - v * v) * a.e + local)


def _tanh(a):
    """Caffe's TanH layer (std::tanh) or torch's: LIBM relative."""
    v = torch.tanh(a.v)
    return _Err(v, (1 - v * v) * a.e + LIBM * v.abs() + LIBM_ETA)


def _unit_gates_err(X, cont, hidden):
    """``_gates`` in _Err."""
    i = _sigmoid(X[..., :hidden])
    f = _sigmoid(X[..., hidden:2 * hidden]) * _Err(cont.unsqueeze(-1))  # exactly 0 where cont is 0
    return i, f, _sigmoid(X[..., 2 * hidden:3 * hidden]), _tanh_unit(X[..., 3 * hidden:])


def _unit_err(c_prev, X, cont):
    """(c_t, h_t) of the LSTM unit with their bounds."""
    i, f, o, g = _unit_gates_err(X, cont, c_prev.v.shape[-1])
    c = f * c_prev + i * g
    return c, o * _tanh_unit(c)


def _unit_backward_err(c_prev, X, cont, c, dc, dh):
    """(dc_prev, dX) of Caffe's LSTMUnit backward (``_LSTMUnitFn``) with their bounds: the
    gates recomputed from X, tanh from the stored c."""
    i, f, o, g = _unit_gates_err(X, cont, c.v.shape[-1])
    t = _tanh_unit(c)
    dc_ = dc + dh * o * (t * t).one_minus()
    dX = [dc_ * g * i * i.one_minus(), dc_ * c_prev * f * f.one_minus(),
          dh * t * o * o.one_minus(), dc_ * i * (g * g).one_minus()]
    return dc_ * f, _Err(torch.cat([d.v for d in dX], dim=-1), torch.cat([d.e for d in dX], dim=-1))


def _linear_backward(d, W):
    """d W: the bottom diff of an InnerProduct (x W^T) from its top diff d, a GEMM over
    K = W's rows, any order."""
    k = W.shape[0]
    return _Err(d.v @ W, d.e @ W.abs() + gamma(k) * (d.v.abs() @ W.abs()) + k * ETA)


@register("LSTMUnit")
class LSTMUnit(CaffeLayer):
    """Bottoms c_{t-1} (1, N, H), gate inputs X (1, N, 4H), cont (1, N); tops c_t, h_t (1, N, H)."""

    verified_by = ("tests/test_layers_recurrent.py", "tests/test_bounds.py")

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.expect_bottoms(3)
        _expect_tops(spec, 2, self.type_name)
        c_prev, X, cont = self.bottom_shapes
        for k, shape in enumerate(self.bottom_shapes):
            axes = 2 if k == 2 else 3
            if len(shape) != axes or shape[0] != 1 or shape[1] != c_prev[1]:
                raise ValueError(f"LSTMUnit bottom {k} must be 1 x N{' x ...' if axes == 3 else ''} "
                                 f"({axes} axes, N = {c_prev[1] if len(c_prev) > 1 else '?'}), got "
                                 f"{'x'.join(map(str, shape)) or '()'}")
        if X[2] != 4 * c_prev[2]:
            raise ValueError(f"LSTMUnit gate inputs must have 4 x {c_prev[2]} = {4 * c_prev[2]} channels "
                             f"(i, f, o, g), got {X[2]}")
        self.top_shapes = [c_prev, c_prev]

    def forward(self, c_prev, X, cont):
        return lstm_unit(c_prev, X, cont)

    def work(self) -> int:
        return _unit_work(count(self.bottom_shapes[0]))

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        c, h = _unit_err(_Err(bottoms[0]), _Err(bottoms[1]), bottoms[2])
        return [c.e, h.e]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Caffe's formula, reading its stored c.
        c_prev, X, cont = bottoms
        dc, dh = (_Err(torch.zeros_like(exact_tops[0]) if d is None else d) for d in top_diffs)
        c = _Err(exact_tops[0], stored_error(tops[0], exact_tops[0]))
        dc_prev, dX = _unit_backward_err(_Err(c_prev), _Err(X), cont, c, dc, dh)
        return [dc_prev.e, dX.e, None]


# ---------------------------------------------------------------- LSTM and RNN

def _expect_tops(spec, n: int, type_name: str) -> None:
    tops = getattr(spec, "tops", None)
    if tops is not None and len(tops) != n:
        raise ValueError(f"{type_name} takes {n} top blob(s), got {len(tops)}")


# The two arithmetics the steps of LSTM and RNN are written in once: torch's (the forward)
# and _Err's (the rounding bounds; float64 values).
_TORCH = SimpleNamespace(wrap=lambda v: v, linear=torch.nn.functional.linear, tanh=torch.tanh, unit=lstm_unit,
                         sum=lambda terms: sum(terms[1:], terms[0]), cat=lambda xs: torch.cat(xs, dim=0))
_ERR = SimpleNamespace(wrap=_Err, linear=lambda x, W, b=None: _linear(x, W.double(), None if b is None else b.double()),
                       tanh=_tanh, unit=_unit_err, sum=_sum_any,
                       cat=lambda xs: _Err(torch.cat([x.v for x in xs]), torch.cat([x.e for x in xs])))

# The port runs one Python step per time step (about 20 torch calls, measured 0.1-0.3 ms on a
# loaded CPU), whatever the sizes: counted as the multiply-adds that time buys (~1e6 at a few
# 1e9 per second), so a long sequence of tiny steps (T up to INT_MAX from a few-line
# prototxt) meets the work limit instead of running for days.
STEP_WORK = 10**6


class _Recurrent(CaffeLayer):
    """What LSTM and RNN share: Caffe's RecurrentLayer bottoms, tops and shape checks."""

    verified_by = ("tests/test_layers_recurrent.py", "tests/test_bounds.py")
    param_fields = ("recurrent_param",)
    n_states = 1   # recurrent state blobs: h (RNN), h and c (LSTM)
    gate_factor = 1  # rows of the input transforms per hidden value (LSTM: 4 gates)

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        rp = spec.param.recurrent_param
        self.hidden = caffe_int(rp.num_output, "num_output")
        if self.hidden <= 0:
            raise ValueError("recurrent_param.num_output must be positive")
        self.expose = bool(rp.expose_hidden)
        exposed = self.n_states if self.expose else 0
        self.expect_bottoms(2 + exposed, 3 + exposed)
        _expect_tops(spec, 1 + exposed, self.type_name)
        self.static = len(self.bottom_shapes) == 3 + exposed
        x, cont = self.bottom_shapes[:2]
        if len(x) < 3:  # Caffe's input transform is an InnerProduct at axis 2
            raise ValueError(f"{self.type_name} bottom 0 (x) must have at least 3 axes (T x N x ...), "
                             f"got {len(x)}")
        self.T, self.N = x[0], x[1]
        if cont != (self.T, self.N):
            raise ValueError(f"{self.type_name} bottom 1 (cont) must be T x N = {self.T}x{self.N}, got "
                             f"{'x'.join(map(str, cont)) or '()'}")
        self.D = count(x, 2)
        if self.static:
            xs = self.bottom_shapes[2]
            if len(xs) < 2 or xs[0] != self.N:  # an InnerProduct at axis 1 in Caffe
                raise ValueError(f"{self.type_name} bottom 2 (x_static) must be N x ... (2 axes or more) with "
                                 f"N = {self.N}, got "
                                 f"{'x'.join(map(str, xs)) or '()'}")
            self.S = count(xs, 1)
        state = (1, self.N, self.hidden)
        for k in range(2 + self.static, len(self.bottom_shapes)):
            if self.bottom_shapes[k] != state:
                raise ValueError(f"{self.type_name} bottom {k} (hidden state) must be 1x{self.N}x{self.hidden}, "
                                 f"got {'x'.join(map(str, self.bottom_shapes[k])) or '()'}")
        rows = int_arithmetic(self.gate_factor * self.hidden, f"{self.gate_factor} x num_output")
        self.param_shapes = [(rows, self.D), (rows,)] + ([(rows, self.S)] if self.static else [])
        self.top_shapes = [(self.T, self.N, self.hidden)] + [state] * exposed

    def _inputs(self, bottoms, ops):
        """The input transform x W^T + b of all steps (T, N, rows), the static one (N, rows) or
        None, cont (T, N), the initial states (detached: Caffe gives h_0 and c_0 no gradient)
        and the index of the next parameter blob."""
        x, cont = bottoms[0], bottoms[1].detach()  # cont gets no gradient in Caffe
        T, N = x.shape[:2]  # N may differ from the declared one (Caffe reshapes; T it refuses to change)
        xw = ops.linear(ops.wrap(x.reshape(T, N, -1)), self.blobs[0], self.blobs[1])
        static = None
        if self.static:
            static = ops.linear(ops.wrap(bottoms[2].reshape(N, -1)), self.blobs[2])
        if self.expose:
            states = [ops.wrap(s.detach()) for s in bottoms[2 + self.static:]]
        else:
            states = [ops.wrap(x.new_zeros((1, N, self.hidden))) for _ in range(self.n_states)]
        return xw, static, cont, states, 2 + self.static

    def _run(self, bottoms, ops, trace=None):  # pragma: no cover
        """The tops by ``ops``' arithmetic; ``trace`` (a list) gets what each step's backward
        reads."""
        raise NotImplementedError

    def forward(self, *bottoms):
        tops = self._run(bottoms, _TORCH)
        return (tops[0],) + tuple(t.detach() for t in tops[1:])  # h_T, c_T: no gradient (Caffe's)

    def forward_bound(self, bottoms, exact_tops, abs_module=None):
        # The step arithmetic of both frameworks in _Err (a step's sum of the recurrent product,
        # the input transform and the static transform, in any order: Caffe's Eltwise, the
        # port's additions).
        with torch.no_grad():
            return [t.e for t in self._run([b.double() for b in bottoms], _ERR)]

    def backward_bound(self, bottoms, tops, exact_tops, top_diffs, abs_module=None):
        # Backward through time in _Err: the stored values each step's backward reads carry
        # their forward bounds; diffs given to h_T/c_T reach nothing (Caffe's); cont, h_0 and
        # c_0 get no gradient.
        trace = []
        with torch.no_grad():
            self._run([b.double() for b in bottoms], _ERR, trace)
            d_out = top_diffs[0] if top_diffs[0] is not None else torch.zeros_like(exact_tops[0])
            d_steps = self._backward_steps(_Err(d_out.double()), trace)  # the diff of each step's sum
            out = [_linear_backward(_Err(torch.cat([d.v for d in d_steps]), torch.cat([d.e for d in d_steps])),
                                    self.blobs[0].double()).e.reshape(bottoms[0].shape), None]
            if self.static:  # Caffe: a Split sums the T diffs of the static transform
                ds = _sum_any([d[0] for d in d_steps])
                out.append(_linear_backward(ds, self.blobs[2].double()).e.reshape(bottoms[2].shape))
        return out + [None] * (len(bottoms) - len(out))

    def _work_inputs(self) -> int:
        """The input transforms, plus STEP_WORK per time step (see there)."""
        rows = self.gate_factor * self.hidden
        return (self.T * self.N * rows * (self.D + 1) + (self.N * rows * self.S if self.static else 0)
                + self.T * STEP_WORK)

    def describe(self) -> str:
        return f"{self.hidden}" + (" static" if self.static else "") + (" expose_hidden" if self.expose else "")


@register("LSTM")
class LSTM(_Recurrent):
    n_states = 2
    gate_factor = 4

    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        self.param_shapes.append((4 * self.hidden, self.hidden))  # W_hc

    def _run(self, bottoms, ops, trace=None):
        xw, static, cont, (h, c), k = self._inputs(bottoms, ops)
        W_hc = self.blobs[k]
        hs = []
        for t in range(cont.shape[0]):
            cont_t = cont[t:t + 1]  # (1, N)
            terms = [ops.linear(h * ops.wrap(cont_t.unsqueeze(-1)), W_hc), xw[t:t + 1]]
            gates = ops.sum(terms + ([static] if static is not None else []))
            c_prev, (c, h) = c, ops.unit(c, gates, cont_t)
            hs.append(h)
            if trace is not None:
                trace.append((c_prev, gates, c, cont_t))
        return [ops.cat(hs), h, c][:3 if self.expose else 1]

    def _backward_steps(self, d_out, trace):
        W_hc = self.blobs[2 + self.static].double()
        dh_rec = dc = _Err(torch.zeros_like(d_out.v[:1]))
        d_steps = [None] * len(trace)
        for t in reversed(range(len(trace))):
            c_prev, gates, c, cont_t = trace[t]
            dc, d_steps[t] = _unit_backward_err(c_prev, gates, cont_t, c, dc, d_out[t:t + 1] + dh_rec)
            dh_rec = _linear_backward(d_steps[t], W_hc) * _Err(cont_t.unsqueeze(-1))
        return d_steps

    def work(self) -> int:
        H = self.hidden
        return self._work_inputs() + self.T * self.N * 4 * H * (H + 1) + _unit_work(self.T * self.N * H)

    def workspace(self) -> int:
        """Gate inputs of every step (kept for the backward) and the states of every step."""
        return self.T * self.N * self.hidden * (4 + 4 + 2)


@register("RNN")
class RNN(_Recurrent):
    def __init__(self, spec, bottom_shapes):
        super().__init__(spec, bottom_shapes)
        H = self.hidden
        self.param_shapes += [(H, H), (H, H), (H,)]  # W_hh, W_ho, b_o

    def _run(self, bottoms, ops, trace=None):
        xw, static, cont, (h,), k = self._inputs(bottoms, ops)
        W_hh, W_ho, b_o = self.blobs[k:k + 3]
        outs = []
        for t in range(cont.shape[0]):
            terms = [ops.linear(h * ops.wrap(cont[t:t + 1].unsqueeze(-1)), W_hh), xw[t:t + 1]]
            h = ops.tanh(ops.sum(terms + ([static] if static is not None else [])))
            outs.append(ops.tanh(ops.linear(h, W_ho, b_o)))
            if trace is not None:
                trace.append((h, outs[-1], cont[t:t + 1]))
        return [ops.cat(outs), h][:2 if self.expose else 1]

    def _backward_steps(self, d_out, trace):
        # Caffe's TanH backward d (1 - y^2) with its stored y; the IPs' bottom diffs.
        k = 2 + self.static
        W_hh, W_ho = self.blobs[k].double(), self.blobs[k + 1].double()
        dh_rec = _Err(torch.zeros_like(d_out.v[:1]))
        d_steps = [None] * len(trace)
        for t in reversed(range(len(trace))):
            h, o, cont_t = trace[t]
            dh = _linear_backward(d_out[t:t + 1] * (o * o).one_minus(), W_ho) + dh_rec
            d_steps[t] = dh * (h * h).one_minus()
            dh_rec = _linear_backward(d_steps[t], W_hh) * _Err(cont_t.unsqueeze(-1))
        return d_steps

    def work(self) -> int:
        H = self.hidden
        return self._work_inputs() + self.T * self.N * H * (2 * H + 4)

    def workspace(self) -> int:
        """The input transform and the hidden states, pre-activations and outputs of every step."""
        return self.T * self.N * self.hidden * 5
