"""Rules for unary elementwise functions ``y = g(x)``.

Each rule supplies the scaled derivatives ``g^(j)(x_0) / j!`` for ``j = 1..K`` and
:func:`~xafunc._rules.series.compose_unary` combines them with the powers of ``x(t) - x_0`` (Faà di
Bruno's formula for univariate series). The Jacobian of an elementwise op is diagonal, so this
is a broadcast multiply per term; no ``n x n`` matrix is ever built.

Closed forms: tanh and sigmoid derivatives are polynomials in the output
(``tanh' = 1 - y^2``, ``sigmoid' = y - y^2``, and ``p_{j+1}(y) = p_j'(y) p_1(y)``; in series
of degree 3 or more with the factor ``1 - y^2`` formed accurately, NOTE [Higher derivatives of
tanh and sigmoid]); ``erf``
derivatives are Hermite polynomials times a Gaussian; ``log``, powers and the trigonometric
functions have the textbook formulas. Any other smooth elementwise operator gets its
derivatives from nested ``torch.func.jvp`` on the operator alone (no direction dimension, so
this is cheap), see :func:`generic_unary`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import register
from .series import Series, add, basis_aware, compose_unary, lift, primal, term

aten = torch.ops.aten

DerivFn = Callable[[Tensor, Tensor, int], "list[Tensor]"]


def unary(op: Any, derivs: DerivFn) -> Callable[..., Series]:
    """Rule for ``op(x, *consts)`` from ``derivs(x0, y0, K) -> [g^(j)(x0) for j in 1..K]``."""

    @basis_aware  # compose_unary keeps c_1 in a basis (NOTE [First-order basis])
    def rule(x: Series, *args: Any, **kwargs: Any) -> Series:
        y0 = op(x.primal, *args, **kwargs)
        ds = derivs(x.primal, y0, x.order)
        scaled = [None if d is None else d / math.factorial(j) for j, d in enumerate(ds, start=1)]
        return compose_unary(x, scaled, y0)

    return rule


def _poly_derivatives(p1: tuple[float, ...], K: int) -> list[tuple[float, ...]]:
    """Polynomials ``p_1..p_K`` (coefficients, lowest degree first) with
    ``p_{j+1} = p_j' * p_1``: the derivatives of functions with ``g' = p_1(g)``."""
    polys = [p1]
    for _ in range(K - 1):
        p = polys[-1]
        dp = tuple(i * p[i] for i in range(1, len(p))) or (0.0,)
        prod = [0.0] * (len(dp) + len(p1) - 1)
        for i, a in enumerate(dp):
            for j, b in enumerate(p1):
                prod[i + j] += a * b
        polys.append(tuple(prod))
    return polys


@functools.cache
def _polys(kind: str, K: int) -> list[tuple[float, ...]]:
    """``p_j / j!`` for ``j = 1..K``: the scaled derivatives as polynomials in the output."""
    p1 = {"tanh": (1.0, 0.0, -1.0), "sigmoid": (0.0, 1.0, -1.0)}[kind]
    return [tuple(c / math.factorial(j) for c in p)
            for j, p in enumerate(_poly_derivatives(p1, K), start=1)]


def _scalar(c: float) -> float | int:
    """``c`` as an ``int`` when integral: ``1 - y * y`` is then the very node torch's
    ``tanh_backward`` decomposition builds, so the graph simplifier merges the two."""
    return int(c) if float(c).is_integer() else c


def _horner(coeffs: list[float], t: Tensor) -> Tensor:
    """``sum_i coeffs[i] t^i`` (lowest degree first, degree >= 1) by Horner's rule, one
    operator per step: ``c_i + t * acc`` is an ``addcmul`` with ``c_i`` a constant of the graph
    (0-dim), a plain product where ``c_i = 0``. The first step ``c_{D-1} + c_D t`` is
    ``c - t`` / ``t + c`` / ``t * c`` where it can be (``1 - y * y`` is then the very node
    torch's ``tanh_backward`` decomposition builds, so the graph simplifier merges the two)."""
    *rest, c_lead = coeffs
    c = rest.pop()
    if c_lead == -1.0 and c != 0.0:
        acc = aten.sub.Tensor(_scalar(c), t)
    elif c_lead == 1.0:
        acc = t + _scalar(c) if c != 0.0 else t
    elif c == 0.0:
        acc = t * _scalar(c_lead)
    else:
        acc = torch.add(_constant(c, t), t, alpha=_scalar(c_lead))
    for c in reversed(rest):
        acc = acc * t if c == 0.0 else torch.addcmul(_constant(c, t), acc, t)
    return acc


def _constant(c: float, like: Tensor) -> Tensor:
    return torch.full((), c, dtype=like.dtype, device=like.device)


def _poly_values(polys: list[tuple[float, ...]], y: Tensor) -> list[Tensor]:
    """The polynomials (coefficients, lowest degree first) at ``y`` by Horner's rule: in
    ``z = y * y`` (shared) for a polynomial of one parity (tanh's: ``p(y) = q(z)`` or
    ``y q(z)``), in ``y`` otherwise (sigmoid's). A degree-``d`` polynomial costs about
    ``d / 2`` operators (tanh) or ``d`` (sigmoid), where summing scaled powers cost ``2 d``:
    at order 6 a tanh layer's polynomials take 16 operators instead of about 30."""
    z: Tensor | None = None
    out = []
    for p in polys:
        cs = list(p)
        while len(cs) > 1 and cs[-1] == 0.0:
            cs.pop()
        if len(cs) == 1:
            out.append(torch.full_like(y, cs[0]))
            continue
        even = all(c == 0.0 for c in cs[1::2])
        odd = all(c == 0.0 for c in cs[0::2])
        if not (even or odd):
            out.append(_horner(cs, y))
            continue
        q = cs[0::2] if even else cs[1::2]
        if len(q) == 1:  # c y (a constant is handled above)
            out.append(y if q[0] == 1.0 else y * _scalar(q[0]))
            continue
        if z is None:
            z = y * y
        v = _horner(q, z)
        out.append(v if even else v * y)
    return out


# NOTE [Higher derivatives of tanh and sigmoid]
# ``tanh^(j)(x) = P_j(y)``, a polynomial of degree ``j + 1`` in ``y = tanh(x)`` with the factor
# ``1 - y^2`` for every ``j``. Formed from ``y``, that factor cancels in the tails (``y``
# rounds towards 1), and the larger ``j`` the more the polynomial amplifies the loss; for
# ``sigmoid``, whose ``p_j`` are polynomials in ``y = sigmoid(x)`` with alternating
# coefficients centred on ``y = 1/2``, even at the centre. In float32, over ``|x| <= 12``,
# against the largest value: tanh's eighth derivative was 42 epsilons off, sigmoid's third 50,
# fifth 760 and eighth 86 000 -- and ``gelu(approximate="tanh")``'s sixth, composed from
# tanh's, 2 700 (its eighth 127 000, 1.5 %). So for a series of degree 3 or more:
#
# * ``tanh^(j) = sech^2(x) Q_j(y)`` with ``Q_j = P_j / (1 - y^2)`` (one parity, evaluated in
#   ``y^2``) and ``sech^2(x) = 4 sigmoid(2x) sigmoid(-2x)``, a product that keeps its relative
#   accuracy in both tails (within 2 epsilons; ``1 / cosh(x)^2`` is as accurate, but ATen's
#   ``cosh`` is slow and inductor does not fuse it as well: a biharmonic with ``compile=True``
#   took 1.4x as long);
# * ``sigmoid(x) = (1 + tanh(x / 2)) / 2``, so ``sigmoid^(j) = 2^-(j+1) P_j(u)`` with ``u =
#   tanh(x / 2) = sigmoid(x) - sigmoid(-x)``, i.e. ``v 2^(1-j) Q_j(u)`` with ``v = sigmoid(x)
#   sigmoid(-x)``.
#
# Now about 5 epsilons at the eighth derivative for both, and 15 at gelu's sixth. Series of
# degree 1 or 2 keep the form in ``y`` (at most 7 epsilons there, tails aside): torch's own
# ``tanh_backward`` and ``sigmoid_backward``, which the simplifier fuses with no extra kernel;
# the accurate factor costs four or five kernels on the primal (fused by ``compile=True``).


@functools.cache
def _quotients(kind: str, K: int) -> list[tuple[float, ...]]:
    """The polynomials ``_tanh_values``/``_sigmoid_values`` multiply their factor by, for
    ``j = 1..K``: ``Q_j / j!`` (tanh's ``P_j`` divided by ``1 - y^2``) times 4 for tanh (its
    factor is ``sech^2 / 4``), times ``2^(1-j)`` for sigmoid (NOTE [Higher derivatives of tanh
    and sigmoid])."""
    out = []
    for j, p in enumerate(_poly_derivatives((1.0, 0.0, -1.0), K), start=1):
        rem, q = list(p), [0.0] * (len(p) - 2)
        for i in range(len(p) - 1, 1, -1):  # long division by 1 - y^2, highest degree first
            q[i - 2] = -rem[i]
            rem[i - 2] += rem[i]
            rem[i] = 0.0
        assert all(abs(r) < 1e-9 * max(map(abs, p)) for r in rem), (j, rem)
        scale = 4.0 if kind == "tanh" else 2.0 ** (1 - j)
        out.append(tuple(c * scale / math.factorial(j) for c in q))
    return out


def _tanh_values(x: Tensor, y: Tensor, K: int) -> list[Tensor]:
    """``tanh^(j)(x) / j!`` for ``j = 1..K``, with ``y = tanh(x)``."""
    if K <= 2:
        return _poly_values(_polys("tanh", K), y)
    twice = x * 2
    quarter = torch.sigmoid(twice) * torch.sigmoid(-twice)  # sech^2(x) / 4
    return _times(quarter, _quotients("tanh", K), y)


def _sigmoid_values(x: Tensor, y: Tensor, K: int) -> list[Tensor]:
    """``sigmoid^(j)(x) / j!`` for ``j = 1..K``, with ``y = sigmoid(x)``."""
    if K <= 2:
        return _poly_values(_polys("sigmoid", K), y)
    neg = torch.sigmoid(-x)
    return _times(y * neg, _quotients("sigmoid", K), y - neg)


def _times(factor: Tensor, polys: list[tuple[float, ...]], t: Tensor) -> list[Tensor]:
    """``factor * p(t)`` for each polynomial ``p`` (a constant one: ``factor`` scaled)."""
    varying = iter(_poly_values([p for p in polys if any(p[1:])], t))
    return [factor * next(varying) if any(p[1:]) else factor if p[0] == 1.0 else factor * p[0]
            for p in polys]


@register(aten.tanh)
@basis_aware
def _tanh(x: Series) -> Series:
    y0 = aten.tanh(x.primal)
    return compose_unary(x, _tanh_values(x.primal, y0, x.order), y0)


@register(aten.sigmoid)
@basis_aware
def _sigmoid(x: Series) -> Series:
    y0 = aten.sigmoid(x.primal)
    return compose_unary(x, _sigmoid_values(x.primal, y0, x.order), y0)


# NOTE [Smooth functions written with kinks]
# torch decomposes some smooth functions into pieces with kinks that cancel: ``log_sigmoid``
# as ``min(x, 0) - log1p(exp(-|x|))`` (so also ``binary_cross_entropy_with_logits`` and
# ``multilabel_soft_margin_loss``, which call it). Differentiated piece by piece, each kink
# contributes its convention (``sign(0) = 0``), and the second derivative at 0 came out 0
# where torch's own formula (``log_sigmoid_double_backward``) gives the true -1/4. ``softplus``
# has a real switch at ``beta x = threshold``, and torch's formulas disagree there with each
# other: ``softplus_backward`` takes the smooth branch unless ``beta x > threshold``,
# ``softplus_double_backward`` keeps curvature only where ``beta x < threshold``. Both get
# rules in torch's formulas, with the derivatives of ``sigmoid`` (NOTE [Higher derivatives of
# tanh and sigmoid]).


def _sigmoid_tail(z: Tensor, s: Tensor, K: int, scale: float) -> list[Tensor]:
    """``scale^j g^(j)(z) / (j + 1)!`` for ``j = 1..K-1`` with ``g = sigmoid`` and
    ``s = g(z)``: the scaled derivatives from the second on of a function whose derivative is
    ``sigmoid(scale x)``, ``z = scale x``."""
    if K < 2:
        return []
    vals = _sigmoid_values(z, s, K - 1)
    return [v * (scale**j / (j + 1)) for j, v in enumerate(vals, start=1)]


@register(aten.softplus)
@basis_aware
def _softplus(x: Series, beta: float = 1.0, threshold: float = 20.0) -> Series:
    y0 = aten.softplus(x.primal, beta, threshold)
    z = x.primal * beta
    s = torch.sigmoid(z)
    first = torch.where(z > threshold, 1.0, s)
    smooth = z < threshold
    rest = [torch.where(smooth, v, 0.0) for v in _sigmoid_tail(z, s, x.order, beta)]
    return compose_unary(x, [first, *rest], y0)


@register(aten.log_sigmoid_forward)
@basis_aware
def _log_sigmoid(x: Series) -> tuple[Series, Tensor]:
    """``log sigmoid(x)``: first derivative ``sigmoid(-x)`` (accurate where ``sigmoid(x)``
    rounds to 1), then ``-sigmoid^(j-1)(x)`` as torch's double backward forms them."""
    y0, buffer = aten.log_sigmoid_forward(x.primal)
    rest = [-v for v in _sigmoid_tail(x.primal, torch.sigmoid(x.primal), x.order, 1.0)]
    return compose_unary(x, [torch.sigmoid(-x.primal), *rest], y0), buffer


register(aten.exp)(unary(aten.exp, lambda x, y, K: [y] * K))
# every derivative of expm1 is exp(x), computed as such: torch's formula ``result + 1`` cancels
# for negative x (all of exp(x) lost at x = -40 in float64, at -17 in float32); the elu family's
# decomposition (``_elu`` in ``_capture/decompositions.py``) is differentiated as exp too
register(aten.expm1)(unary(aten.expm1, lambda x, y, K: [torch.exp(x)] * K))


def _log_derivs(shift: float) -> DerivFn:
    def derivs(x0: Tensor, y0: Tensor, K: int) -> list[Tensor]:
        r = torch.reciprocal(x0 + shift) if shift else torch.reciprocal(x0)
        out, p = [], r
        for j in range(1, K + 1):
            out.append(p * ((-1) ** (j - 1) * math.factorial(j - 1)))
            p = p * r
        return out

    return derivs


register(aten.log)(unary(aten.log, _log_derivs(0.0)))
register(aten.log1p)(unary(aten.log1p, _log_derivs(1.0)))


def _entr_derivs(x0: Tensor, y0: Tensor, K: int) -> list[Tensor]:
    # ``-x log x``: ``-(1 + log x)`` (torch's formula: +inf at 0, NaN below), then
    # ``(-1)^(j+1) (j-2)! / x^(j-1)``. torch's decomposition, a ``where`` over ``x > 0`` and
    # ``x == 0``, had every derivative 0 at 0.
    out, r = [-(1 + torch.log(x0))], torch.reciprocal(x0)
    p = r
    for j in range(2, K + 1):
        out.append(p * ((-1) ** (j + 1) * math.factorial(j - 2)))
        p = p * r
    return out


register(aten.special_entr)(unary(aten.special_entr, _entr_derivs))


def _trig(first: str) -> DerivFn:
    def derivs(x0: Tensor, y0: Tensor, K: int) -> list[Tensor]:
        s, c = torch.sin(x0), torch.cos(x0)
        cycle = [c, -s, -c, s] if first == "sin" else [-s, -c, s, c]
        return [cycle[(j - 1) % 4] for j in range(1, K + 1)]

    return derivs


register(aten.sin)(unary(aten.sin, _trig("sin")))
register(aten.cos)(unary(aten.cos, _trig("cos")))


def _power_derivs(p: float, x0: Tensor, K: int) -> list[Tensor]:
    out = []
    coef = 1.0
    for j in range(1, K + 1):
        coef *= p - (j - 1)
        if coef == 0.0:
            out.append(torch.zeros_like(x0))
        elif float(p - j).is_integer() and p - j >= 0:
            out.append(coef * x0 ** int(p - j))
        else:
            out.append(coef * x0 ** (p - j))
    return out


def _pow_scalar(x: Series, exponent: Any) -> Series:
    y0 = aten.pow(x.primal, exponent)
    p = float(exponent)
    ds = _power_derivs(p, x.primal, x.order)
    return compose_unary(x, [d / math.factorial(j) for j, d in enumerate(ds, 1)], y0)


register(aten.pow.Tensor_Scalar)(_pow_scalar)
register(aten.sqrt)(lambda x: _rename(_pow_scalar(x, 0.5), aten.sqrt(x.primal)))
register(aten.rsqrt)(lambda x: _rename(_pow_scalar(x, -0.5), aten.rsqrt(x.primal)))


def _rename(s: Series, y0: Tensor) -> Series:
    return Series(y0, s.coeffs)


@register(aten.pow.Tensor_Tensor)
def _pow_tensor(a: Any, b: Any) -> Any:
    from .bilinear import mul_series

    base = a.primal if isinstance(a, Series) else a
    exponent = b.primal if isinstance(b, Series) else b
    y0 = torch.pow(base, exponent)
    held = None
    if isinstance(a, Series):  # the exponent held at its value: the elementwise power rule
        ds = _power_derivs_tensor(exponent, base, a.order)
        held = compose_unary(a, [d / math.factorial(j) for j, d in enumerate(ds, 1)], y0)
    if not isinstance(b, Series):
        return held
    # ``exp(b log a)``; where the base is 0 and the exponent is not negative, torch's
    # pow_backward_exponent is 0 (every order) and ``log a`` infinite: there the exponent is
    # held (its derivatives are 0), and the logarithm reads a base masked to 1
    zero = (base == 0) & (exponent >= 0)
    masked = torch.where(zero, 1.0, base)
    log_a = RULE_LOG(Series(masked, a.coeffs)) if isinstance(a, Series) else torch.log(masked)
    moved = RULE_EXP(mul_series(b, log_a)).coeffs
    fixed = held.coeffs if held is not None else [None] * len(moved)
    out: list[Any] = []
    for h, g in zip(fixed, moved):
        if g is None:
            out.append(h if h is None else torch.where(zero, h, 0.0))
        else:
            out.append(torch.where(zero, 0.0 if h is None else h, g))
    return Series(y0, out)


def _power_derivs_tensor(p: Tensor, x0: Tensor, K: int) -> list[Tensor]:
    # pow_backward_self: ``where(exponent == 0, 0, exponent * pow(self, exponent - 1))``, so
    # the j-th derivative is zero wherever one of the factors ``p - i`` (i < j) is, even
    # where ``pow(0, p - j)`` is infinite
    out, coef = [], torch.ones_like(p)
    for j in range(1, K + 1):
        coef = coef * (p - (j - 1))
        out.append(torch.where(coef == 0, 0, coef * torch.pow(x0, p - j)))
    return out


@register(aten.pow.Scalar)
def _pow_scalar_base(base: Any, x: Series) -> Series:
    """``base ** x``: derivatives ``base**x * log(base)**j`` (pow_backward_exponent); for a
    zero base torch returns 0 where ``x >= 0`` (every order), for a negative one NaN."""
    y0 = torch.pow(base, x.primal)
    b = float(base)
    lb = math.log(b) if b > 0 else (-math.inf if b == 0 else math.nan)
    derivs = [y0 * (lb**j / math.factorial(j)) for j in range(1, x.order + 1)]
    if b == 0:
        derivs = [torch.where(x.primal >= 0, 0, d) for d in derivs]
    return compose_unary(x, derivs, y0)


def _erf_derivs(x0: Tensor, y0: Tensor, K: int) -> list[Tensor]:
    # erf^(n+1) = (-1)^n H_n(x) g with g = erf'; the recursion runs on H_n(x) g, not on the
    # Hermite polynomials: past |x| ~ 1e154, H_2(x) = 4 x^2 - 2 overflows and inf * g = inf * 0
    # was NaN where every derivative is 0 (torch.func's too)
    g = (2.0 / math.sqrt(math.pi)) * torch.exp(-x0 * x0)
    out, q_prev, q = [], torch.zeros_like(x0), g  # H_{-1} g, H_0 g
    for n in range(K):
        out.append(((-1) ** n) * q)
        q_prev, q = q, 2 * x0 * q - 2 * n * q_prev
    return out


register(aten.erf)(unary(aten.erf, _erf_derivs))


def _erfcx_derivs(x0: Tensor, y0: Tensor, K: int) -> list[Tensor]:
    # erfcx' = 2x erfcx - 2/sqrt(pi); differentiating k times: y^(k+1) = 2x y^(k) + 2k y^(k-1)
    out, prev, cur = [], y0, 2 * x0 * y0 - 2.0 / math.sqrt(math.pi)
    for k in range(1, K + 1):
        out.append(cur)
        prev, cur = cur, 2 * x0 * cur + 2 * k * prev
    return out


register(aten.special_erfcx)(unary(aten.special_erfcx, _erfcx_derivs))


@register(aten.polygamma)
def _polygamma(n: int, x: Series) -> Series:
    """``polygamma(n, x)``: its j-th derivative is ``polygamma(n + j, x)``."""
    y0 = aten.polygamma(n, x.primal)
    derivs = [aten.polygamma(n + j, x.primal) / math.factorial(j) for j in range(1, x.order + 1)]
    return compose_unary(x, derivs, y0)


def _piecewise_linear(slope: Callable[[Tensor], Tensor]) -> DerivFn:
    def derivs(x0: Tensor, y0: Tensor, K: int) -> list[Tensor]:
        s = slope(x0)
        return [s] + [None] * (K - 1)  # type: ignore[list-item]

    return derivs


def _indicator(cond: Tensor, x0: Tensor) -> Tensor:
    """``cond`` as 0/1 in ``x0``'s dtype."""
    return cond.to(x0.dtype)


def _piecewise(x: Series, y0: Tensor, slope: Tensor) -> Series:
    """Series of a piecewise-linear function with local slope ``slope`` (zero curvature)."""
    return compose_unary(x, [slope] + [None] * (x.order - 1), y0)  # type: ignore[list-item]


@register(aten.copysign.Tensor, aten.copysign.Scalar)
def _copysign(a: Any, b: Any) -> Series:
    """``|a|`` with ``b``'s sign: torch's derivative in ``a`` is ``result / a`` (0 where
    ``a == 0``), in ``b`` zero."""
    y0 = aten.copysign(primal(a), primal(b))
    if not isinstance(a, Series):
        return Series(y0, [None] * b.order)
    slope = torch.where(a.primal == 0, 0, y0 / a.primal)
    return _piecewise(a, y0, slope)


@register(aten.hypot)
def _hypot(a: Any, b: Any) -> Series:
    """``sqrt(a^2 + b^2)`` by the product and power rules (at ``a = b = 0`` NaN, as torch's
    ``grad * self / result``)."""
    from .bilinear import mul_series
    from .linear import _make_add

    squares = [mul_series(v, v) if isinstance(v, Series) else v * v for v in (a, b)]
    return _rename(_pow_scalar(_make_add(aten.add, 1)(*squares), 0.5),
                   aten.hypot(primal(a), primal(b)))


# NOTE [Kinks follow torch's backward formulas]
# At a kink the derivative is whatever torch's own backward kernel returns there
# (tools/autograd/derivatives.yaml and the kernels it names), because that is what nested
# ``jacrev`` returns: relu ``result > 0`` (threshold_backward), leaky_relu ``x > 0``,
# hardtanh strict ``min < x < max``, clamp *inclusive* ``min <= x <= max`` (clamp_backward:
# "we return the subgradient 1" at the bounds), maximum/minimum half each at ties, fmax/fmin
# all to ``self`` at ties. (hardswish/hardsigmoid are decomposed at capture with the same care,
# see xafunc/_capture/decompositions.py.) Slopes are built in the input's dtype from the
# Python scalar, never through a float32 tensor.
register(aten.relu)(unary(aten.relu, _piecewise_linear(lambda x: (x > 0).to(x.dtype))))
_ABS = register(aten.abs)(unary(aten.abs, _piecewise_linear(torch.sign)))
# ``|z|`` of a complex ``z`` is not holomorphic (``sign`` is no derivative of it): the request
# runs the reference, as it would with no rule
_ABS.supports = lambda node: not node.args[0].meta["val"].dtype.is_complex  # type: ignore


@register(aten.leaky_relu)
def _leaky_relu(x: Series, negative_slope: float = 0.01) -> Series:
    y0 = aten.leaky_relu(x.primal, negative_slope)
    # 1 where x > 0, negative_slope elsewhere, computed in x's dtype: a Python float times a
    # float64 tensor is exact, where ``torch.where(c, 1.0, slope)`` would round it to float32
    pos = _indicator(x.primal > 0, x.primal)
    s = pos + (1 - pos) * negative_slope
    return _piecewise(x, y0, s)


@register(aten.hardtanh)
def _hardtanh(x: Series, min_val: float = -1.0, max_val: float = 1.0) -> Series:
    y0 = aten.hardtanh(x.primal, min_val, max_val)
    return _piecewise(x, y0, _indicator((x.primal > min_val) & (x.primal < max_val), x.primal))


def _clamp_scalar_slope(x0: Tensor, lo: Any, hi: Any) -> Tensor:
    inside = torch.ones_like(x0, dtype=torch.bool)
    if lo is not None:
        inside = inside & (x0 >= lo)
    if hi is not None:
        inside = inside & (x0 <= hi)
    return _indicator(inside, x0)


@register(aten.clamp.default)
def _clamp(x: Series, min: Any = None, max: Any = None) -> Series:
    y0 = aten.clamp(x.primal, min, max)
    return _piecewise(x, y0, _clamp_scalar_slope(x.primal, min, max))


@register(aten.clamp_min.default)
def _clamp_min(x: Series, min: Any) -> Series:
    return _piecewise(x, aten.clamp_min(x.primal, min), _clamp_scalar_slope(x.primal, min, None))


@register(aten.clamp_max.default)
def _clamp_max(x: Series, max: Any) -> Series:
    return _piecewise(x, aten.clamp_max(x.primal, max), _clamp_scalar_slope(x.primal, None, max))


def _select3(y0: Tensor, parts: list[tuple[Any, Tensor]]) -> Series:
    """``sum_i where(mask_i, s_i, 0)`` for series/constants ``s_i`` and disjoint masks: the
    series of a function that equals ``s_i`` on ``mask_i`` (piecewise selection)."""
    from .linear import _expand_to

    K = max(s.order for s, _ in parts if isinstance(s, Series))
    shape = tuple(y0.shape)
    nd = len(shape)
    zero = y0.new_zeros(())
    coeffs: list[Any] = []
    for k in range(1, K + 1):
        acc = None
        for s, mask in parts:
            c = s.coeff(k) if isinstance(s, Series) else None
            if c is None:
                continue
            term = torch.where(mask, lift(c, nd), zero)
            acc = term if acc is None else acc + term
        coeffs.append(None if acc is None else _expand_to(acc, shape))
    return Series(y0, coeffs)


@register(aten.clamp.Tensor)
def _clamp_tensor(x: Any, min: Any = None, max: Any = None) -> Any:
    """clamp with tensor bounds; the bounds may carry derivatives (clamp_backward and
    clamp_backward_min_max in derivatives.yaml)."""
    x0, lo, hi = primal(x), primal(min), primal(max)
    y0 = aten.clamp(x0, lo, hi)
    parts: list[tuple[Any, Tensor]] = []
    if lo is not None and hi is not None:
        parts.append((x, (x0 >= lo) & (x0 <= hi)))
        parts.append((min, (x0 < lo) & (lo < hi)))
        parts.append((max, (x0 > hi) | (hi < lo)))
    elif lo is not None:
        parts += [(x, x0 >= lo), (min, x0 < lo)]
    elif hi is not None:
        parts += [(x, x0 <= hi), (max, x0 > hi)]
    else:
        parts.append((x, torch.ones_like(x0, dtype=torch.bool)))
    return _select3(y0, parts)


@register(aten.clamp_min.Tensor)
def _clamp_min_tensor(x: Any, min: Any) -> Any:
    x0, lo = primal(x), primal(min)
    return _select3(aten.clamp_min(x0, lo), [(x, x0 >= lo), (min, x0 < lo)])


@register(aten.clamp_max.Tensor)
def _clamp_max_tensor(x: Any, max: Any) -> Any:
    x0, hi = primal(x), primal(max)
    return _select3(aten.clamp_max(x0, hi), [(x, x0 <= hi), (max, x0 > hi)])


def _half_split(a: Any, b: Any, a_wins: Tensor, tie: Tensor, y0: Tensor) -> Series:
    """maximum/minimum: the winner's series, the mean of both at ties (derivatives.yaml:
    ``where(self == other, grad / 2, grad)`` masked by the loser)."""
    from .linear import _expand_to

    K = max(s.order for s in (a, b) if isinstance(s, Series))
    shape = tuple(y0.shape)
    nd = len(shape)
    wa = _indicator(a_wins, y0) + _indicator(tie, y0) * 0.5
    wb = 1 - wa
    coeffs: list[Any] = []
    for k in range(1, K + 1):
        ca = a.coeff(k) if isinstance(a, Series) else None
        cb = b.coeff(k) if isinstance(b, Series) else None
        acc = None
        if ca is not None:
            acc = lift(ca, nd) * wa
        if cb is not None:
            t = lift(cb, nd) * wb
            acc = t if acc is None else acc + t
        coeffs.append(None if acc is None else _expand_to(acc, shape))
    return Series(y0, coeffs)


@register(aten.maximum)
def _maximum(a: Any, b: Any) -> Series:
    p, q = primal(a), primal(b)
    return _half_split(a, b, p > q, p == q, aten.maximum(p, q))


@register(aten.minimum)
def _minimum(a: Any, b: Any) -> Series:
    p, q = primal(a), primal(b)
    return _half_split(a, b, p < q, p == q, aten.minimum(p, q))


@register(aten.fmax)
def _fmax(a: Any, b: Any) -> Series:
    # derivatives.yaml: self gets grad where ``self >= other or other is nan`` (ties: self)
    p, q = primal(a), primal(b)
    a_wins = (p >= q) | q.isnan()
    return _select3(aten.fmax(p, q), [(a, a_wins), (b, ~a_wins)])


@register(aten.fmin)
def _fmin(a: Any, b: Any) -> Series:
    p, q = primal(a), primal(b)
    a_wins = (p <= q) | q.isnan()
    return _select3(aten.fmin(p, q), [(a, a_wins), (b, ~a_wins)])


@register(aten.atan2)
def _atan2(a: Any, b: Any) -> Series:
    """``z = atan2(a, b)`` from ``z' (a^2 + b^2) = b a' - a b'``, solved one coefficient at a
    time: with ``r = a^2 + b^2``, ``(k+1) r_0 z_{k+1} = w_k - sum_{j=1..k} (k+1-j) z_{k+1-j}
    r_j`` and ``w_k = sum_{j=0..k} (k+1-j) (b_j a_{k+1-j} - a_j b_{k+1-j})``. At ``a = b = 0``
    the first derivative is 0 and every higher one NaN, as torch's."""
    from .linear import _expand_to

    y0 = aten.atan2(primal(a), primal(b))
    shape = tuple(y0.shape)
    K = max(s.order for s in (a, b) if isinstance(s, Series))

    def c(x: Any, k: int) -> Any:
        t = term(x, k)
        return t if t is None or k == 0 else lift(t, len(shape))

    def mul(u: Any, v: Any, scale: float = 1.0) -> Any:
        return None if u is None or v is None else u * v * scale if scale != 1.0 else u * v

    r: list[Any] = [primal(a) * primal(a) + primal(b) * primal(b)]  # r[j], j >= 0
    z: list[Any] = [None]  # z[k], k >= 1
    for k in range(K):
        w = None
        for j in range(k + 1):
            m = float(k + 1 - j)
            w = add(w, mul(c(b, j), c(a, k + 1 - j), m))
            w = add(w, mul(c(a, j), c(b, k + 1 - j), -m))
        for j in range(1, k + 1):
            w = add(w, mul(z[k + 1 - j], r[j], -float(k + 1 - j)))
        if w is not None and k == 0:
            # atan2_backward gives 0 at the origin (orders >= 2: NaN, as 0 / 0 here)
            w = torch.where(r[0] == 0, 0.0, w / r[0])
        elif w is not None:
            w = w / (r[0] * (k + 1))
        z.append(w)
        nxt = None
        for i in range(k + 2):
            nxt = add(nxt, add(mul(c(a, i), c(a, k + 1 - i)), mul(c(b, i), c(b, k + 1 - i))))
        r.append(nxt)
    return Series(y0, [None if t is None else _expand_to(t, shape) for t in z[1:]])


def _mod_rule(op: Any, rounding: str) -> Callable[..., Series]:
    """remainder / fmod: ``self - q * other`` with the quotient ``q = div(self, other,
    rounding_mode)`` piecewise constant. derivatives.yaml: ``self: grad``, ``other: -grad *
    self.div(other, rounding_mode)``; every higher derivative is zero."""

    def rule(a: Any, b: Any) -> Series:
        from .linear import _expand_to

        p, q = primal(a), primal(b)
        y0 = op(p, q)
        shape = tuple(y0.shape)
        nd = len(shape)
        quot = None
        if isinstance(b, Series):
            quot = torch.div(p, q, rounding_mode=rounding)
        K = max(s.order for s in (a, b) if isinstance(s, Series))
        coeffs: list[Any] = []
        for k in range(1, K + 1):
            ca = a.coeff(k) if isinstance(a, Series) else None
            cb = b.coeff(k) if isinstance(b, Series) else None
            acc = None if ca is None else lift(ca, nd)
            if cb is not None:
                t = lift(cb, nd) * quot  # type: ignore[operator]  # set when b varies
                acc = -t if acc is None else acc - t
            coeffs.append(None if acc is None else _expand_to(acc, shape))
        return Series(y0, coeffs)

    return rule


register(aten.remainder)(_mod_rule(aten.remainder, "floor"))
register(aten.fmod)(_mod_rule(aten.fmod, "trunc"))


def generic_unary(op: Any) -> Callable[..., Series]:
    """Rule for any smooth elementwise ``op`` from nested ``torch.func.jvp`` on ``op`` alone."""

    def derivs(x0: Tensor, y0: Tensor, K: int) -> list[Tensor]:
        ones = torch.ones_like(x0)
        out = []
        g: Callable[[Tensor], Tensor] = op
        for _ in range(K):
            g = _jvp_of(g, ones)
            out.append(g(x0))
        return out

    return unary(op, derivs)


def _jvp_of(g: Callable[[Tensor], Tensor], ones: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: torch.func.jvp(g, (x,), (ones,))[1]


for _op in (aten.sinh, aten.cosh, aten.tan, aten.atan, aten.asin, aten.acos, aten.asinh,
            aten.acosh, aten.atanh, aten.erfc, aten.erfinv, aten.lgamma, aten.digamma,
            aten.log2, aten.log10, aten.exp2, aten.sgn, aten.i0, aten.special_i0e,
            aten.special_i1, aten.special_i1e, aten.special_ndtri):
    register(_op)(generic_unary(_op))


RULE_LOG = unary(aten.log, _log_derivs(0.0))
RULE_EXP = unary(aten.exp, lambda x, y, K: [y] * K)
