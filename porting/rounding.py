"""Float32 rounding arithmetic: the a-priori error bounds the layers' ``forward_bound`` and
``backward_bound`` are built from.

The model is the standard one of Higham, "Accuracy and Stability of Numerical Algorithms",
2nd ed. (SIAM 2002), ch. 2-3: every basic operation (+, -, *, /, sqrt) returns
fl(a op b) = (a op b)(1 + d), |d| <= U = 2**-24 (IEEE float32, round to nearest), and a
sum or dot product of n terms computed in *any* order, with or without FMA, satisfies
|fl(s) - s| <= gamma(n) * sum |terms|, gamma(n) = n U / (1 - n U). A product or quotient
that underflows adds an absolute error of at most ``ETA`` = 2**-150 instead (gradual
underflow; a framework that flushes subnormals to zero can exceed this, and should be
caught). A library function (exp, log, pow, tanh, ...) is assumed within ``LIBM_ULPS``
ulps of the true value; one ulp of a float32 y is at most 2 U |y|, so its relative error
is at most ``LIBM`` = 2 * LIBM_ULPS * U (glibc's float functions are within 1 ulp, SLEEF's
vectorised ones torch uses within 1 to 3.5 ulps), and ``LIBM_ETA`` absolute where the
result is subnormal. Every bound is first order in U; a step Caffe computes in double
(``1. + exp(x)`` in BNLL) counts ``U64`` = 2**-53.

All tensors here are float64; a bound is in the units of the value it bounds.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

U = 2.0 ** -24   # unit roundoff of IEEE float32, round to nearest
ETA = 2.0 ** -150  # absolute error of one product/quotient that underflows (gradual underflow)
LIBM_ULPS = 4  # assumed accuracy of exp, log, pow, tanh, ... in float32 ulps (scalar or vectorised)
LIBM = 2 * LIBM_ULPS * U  # relative error of one such call
LIBM_ETA = 2 * LIBM_ULPS * ETA  # its absolute error where the result is subnormal (or flushed to 0)
U64 = 2.0 ** -53  # unit roundoff of float64, for the few steps Caffe computes in double


def gamma(n: float) -> float:
    """Higham's gamma_n = n*u / (1 - n*u): the relative bound on a chain of n roundings."""
    return n * U / (1.0 - n * U)


@contextmanager
def magnitude_twin(module):
    """A copy of ``module`` whose parameters are their absolute values (None if it has none).

    Applied to |x| it gives the sum of |terms| a dot-product bound needs. Made once per
    layer and shared by every framework checked there; dropped on exit.
    """
    if not any(True for _ in module.parameters()):
        yield None
        return
    nested = any(m is not module and any(True for _ in m.parameters(recurse=False)) for m in module.modules())
    if nested:  # parameters in sub-modules: copy the whole thing
        twin = copy.deepcopy(module)
        for p in twin.parameters():
            p.data = p.data.abs()
    else:  # share everything but the parameters (no copy of the weights besides |W|)
        twin = copy.copy(module)
        twin._parameters = {k: (None if p is None else torch.nn.Parameter(p.detach().abs(), requires_grad=False))
                            for k, p in module._parameters.items()}
    yield twin


@contextmanager
def abs_weights(module, twin=None):
    """``twin`` when given, else ``module`` with its parameters replaced by |parameters| for a while."""
    if twin is not None:
        yield twin
        return
    saved = [p.data for p in module.parameters()]
    try:
        for p in module.parameters():
            p.data = p.data.abs()
        yield module
    finally:
        for p, data in zip(module.parameters(), saved):
            p.data = data


def stored_error(top, exact_top):
    """|top - exact_top| for a framework's stored float32 top, as far as float64 can tell:
    the difference plus the float64 rounding of the exact top (U64 |y|). A backward that
    reads its stored top (Caffe's often do) carries this error on."""
    return (top - exact_top).abs() + U64 * exact_top.abs()


def magnitude(module, bottoms, abs_module=None):
    """The layer with |parameters| applied to |bottoms|: per top, the sum of |terms| of a
    layer that is linear in each input (a dot product, a scale, a sum)."""
    with torch.no_grad(), abs_weights(module, abs_module) as twin:
        return list(twin(*[b.abs() for b in bottoms]))


def vjp(module, bottoms, grads):
    """The layer's own backward: gradients with respect to ``bottoms`` given ``grads`` per top
    (None where a top gets none); None for a bottom that receives no gradient."""
    xs = [b.detach().clone().requires_grad_(True) for b in bottoms]
    with torch.enable_grad():
        ys = module(*xs)
        pairs = [(y, g) for y, g in zip(ys, grads) if g is not None and y.requires_grad]
        if not pairs:
            return [None] * len(xs)
        out = torch.autograd.grad([y for y, _ in pairs], xs, [g for _, g in pairs], allow_unused=True)
    return [None if o is None else o.detach() for o in out]


def magnitude_vjp(module, bottoms, grads, abs_module=None):
    """``vjp`` of the layer with |parameters| at |bottoms| and |grads|: the sum of |terms| of
    each bottom gradient of a layer that is linear in each input."""
    with abs_weights(module, abs_module) as twin:
        return vjp(twin, [b.abs() for b in bottoms], [None if g is None else g.abs() for g in grads])
