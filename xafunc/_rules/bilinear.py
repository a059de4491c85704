"""Rules for products: mul, div, matrix products and convolution (Leibniz rule).

For a bilinear ``p = a * b`` the Taylor coefficients are the Cauchy product
``p_k = sum_{i+j=k} a_i * b_j``; both factors move along the same direction, so their
direction dimensions pair up elementwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import register
from .series import (
    Coeff,
    Series,
    cauchy,
    compose_unary,
    lift,
    map_coeffs,
    materialize,
    primal,
    unit_aware,
)

aten = torch.ops.aten
prims = torch.ops.prims


def _order(*xs: Any) -> int:
    return max(x.order for x in xs if isinstance(x, Series))


def mul_series(a: Any, b: Any, y0: Tensor | None = None) -> Series:
    """Elementwise product of two series (or a series and a constant) with broadcasting."""
    if y0 is None:
        y0 = primal(a) * primal(b)
    shape = tuple(y0.shape)
    nd = len(shape)
    K = _order(a, b)
    a_nd = primal(a).dim() if isinstance(primal(a), Tensor) else 0
    b_nd = primal(b).dim() if isinstance(primal(b), Tensor) else 0

    def mul(p: Any, q: Any) -> Tensor:
        # p/q carry a direction dim when their rank exceeds the operand's own rank
        if isinstance(p, Tensor) and p.dim() > a_nd:
            p = lift(p, nd)
        if isinstance(q, Tensor) and q.dim() > b_nd:
            q = lift(q, nd)
        return p * q

    coeffs: list[Coeff] = []
    for k in range(1, K + 1):
        c = cauchy(a, b, k, mul)
        coeffs.append(None if c is None else c.expand((c.shape[0],) + shape))
    return Series(y0, coeffs)


@register(aten.mul)
def _mul(a: Any, b: Any) -> Series:
    return mul_series(a, b, aten.mul(primal(a), primal(b)))


def reciprocal_series(b: Series) -> Series:
    """``1 / b``: derivatives ``(-1)^j j! b^-(j+1)``, scaled by ``1/j!``."""
    r = torch.reciprocal(b.primal)
    derivs, p = [], r
    for j in range(1, b.order + 1):
        p = p * r
        derivs.append(p if j % 2 == 0 else -p)
    return compose_unary(b, derivs, r)


@register(aten.div, prims.div)
def _div(a: Any, b: Any, *, rounding_mode: Any = None) -> Any:
    if rounding_mode is not None:  # floor/trunc division is piecewise constant
        return aten.div(primal(a), primal(b), rounding_mode=rounding_mode)
    y0 = torch.div(primal(a), primal(b))
    if not isinstance(b, Series):
        shape = tuple(y0.shape)
        coeffs = [None if c is None else (lift(c, len(shape)) / b).expand((c.shape[0],) + shape)
                  for c in a.coeffs]
        return Series(y0, coeffs)
    return mul_series(a, reciprocal_series(b), y0)


@register(aten.reciprocal)
def _reciprocal(b: Series) -> Series:
    return reciprocal_series(b)


# ----------------------------------------------------------------------- matrix products
def _unit_product(a: Any, b: Any) -> Coeff:
    """First-order coefficient of ``a @ b`` when one side is a unit-vector seed.

    A seed ``e_j`` reshaped to a row ``(1, n)`` times a constant ``b`` is row ``j`` of ``b``;
    a column seed ``(n, 1)`` after a constant ``a`` is column ``j`` of ``a``. This skips
    multiplying by an identity matrix for Jacobians of functions that start with a linear layer.
    """
    for s, other, left in ((a, b, True), (b, a, False)):
        if not isinstance(s, Series) or isinstance(other, Series) or s.unit is None:
            continue
        if any(c is not None for c in s.coeffs[1:]):
            continue
        B, off = s.unit.count, s.unit.offset
        if left and s.primal.dim() == 2 and s.primal.shape[0] == 1:
            return other[off:off + B].unsqueeze(1)
        if not left and s.primal.dim() == 2 and s.primal.shape[1] == 1:
            return other.t()[off:off + B].unsqueeze(-1)
    return None


def matmul(p: Tensor, q: Tensor) -> Tensor:
    """``torch.matmul`` for a coefficient with a leading direction dim against a matrix.

    Kept 3-D (or more) against 2-D so that ``torch.matmul`` folds all leading dims into one
    GEMM -- also under ``vmap``, whose rule for a batched 2-D ``mm`` would instead expand the
    matrix per sample into a ``bmm``. ``contiguous`` lets the fold happen without falling
    back to one small product per direction.
    """
    if q.dim() == 2 and p.dim() > 2:
        return torch.matmul(p.contiguous(), q)
    if p.dim() == 2 and q.dim() > 2:  # a @ c_b = (c_b^T @ a^T)^T
        return torch.matmul(q.transpose(-1, -2).contiguous(), p.t()).transpose(-1, -2)
    return torch.matmul(p, q)


def _matmul_series(a: Any, b: Any, y0: Tensor) -> Series:
    K = _order(a, b)
    unit = _unit_product(a, b)
    if unit is not None:
        return Series(y0, [unit] + [None] * (K - 1))
    a, b = materialize(a), materialize(b)
    if not isinstance(b, Series):  # one GEMM for all coefficients
        return Series(y0, map_coeffs(a, lambda c: matmul(c, b)))
    if not isinstance(a, Series):
        return Series(y0, map_coeffs(b, lambda c: matmul(a, c)))
    return Series(y0, [cauchy(a, b, k, matmul) for k in range(1, K + 1)])


@register(aten.mm, aten.bmm)
@unit_aware
def _mm(a: Any, b: Any) -> Series:
    return _matmul_series(a, b, torch.matmul(primal(a), primal(b)))


@register(aten.addmm)
@unit_aware
def _addmm(bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1) -> Series:
    y0 = aten.addmm(primal(bias), primal(a), primal(b), beta=beta, alpha=alpha)
    bias = materialize(bias)
    prod = _matmul_series(a, b, y0) if (isinstance(a, Series) or isinstance(b, Series)) else None
    K = _order(bias, a, b)
    coeffs: list[Coeff] = []
    for k in range(1, K + 1):
        c = prod.coeff(k) if prod is not None else None
        if c is not None and alpha != 1:
            c = c * alpha
        bk = bias.coeff(k) if isinstance(bias, Series) else None
        if bk is not None:
            bk = lift(bk * beta, 2).expand((bk.shape[0],) + tuple(y0.shape))
            c = bk if c is None else c + bk
        coeffs.append(c)
    return Series(y0, coeffs)


@register(aten.baddbmm)
def _baddbmm(bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1) -> Series:
    y0 = aten.baddbmm(primal(bias), primal(a), primal(b), beta=beta, alpha=alpha)
    prod = _matmul_series(a, b, y0)
    scaled = Series(y0, [None if c is None else c * alpha for c in prod.coeffs])
    if not isinstance(bias, Series):
        return scaled
    from .linear import _make_add

    out = _make_add(aten.add, 1)(scaled, Series(primal(bias) * beta,
                                                 [None if c is None else c * beta
                                                  for c in bias.coeffs]))
    return Series(y0, out.coeffs)


def _einsum_bilinear(spec: str) -> Callable[..., Series]:
    sa, rest = spec.split(",")
    sb, so = rest.split("->")

    def rule(a: Any, b: Any) -> Series:
        y0 = torch.einsum(spec, primal(a), primal(b))
        a_nd, b_nd = len(sa), len(sb)

        def mul(p: Tensor, q: Tensor) -> Tensor:
            pa = ("z" + sa) if p.dim() > a_nd else sa
            pb = ("z" + sb) if q.dim() > b_nd else sb
            return torch.einsum(f"{pa},{pb}->z{so}", p, q)

        K = _order(a, b)
        return Series(y0, [cauchy(a, b, k, mul) for k in range(1, K + 1)])

    return rule


register(aten.mv)(_einsum_bilinear("ij,j->i"))
register(aten.dot)(_einsum_bilinear("i,i->"))
register(aten.outer)(_einsum_bilinear("i,j->ij"))


# ---------------------------------------------------------------------------- convolution
@register(aten.convolution)
def _convolution(
    x: Any, w: Any, bias: Any, stride: Any, padding: Any, dilation: Any, transposed: bool,
    output_padding: Any, groups: int,
) -> Series:
    conf = (stride, padding, dilation, transposed, output_padding, groups)
    x0, w0 = primal(x), primal(w)
    y0 = aten.convolution(x0, w0, primal(bias), *conf)
    batched_input = x0.dim() == w0.dim()

    def conv(p: Tensor, q: Tensor) -> Tensor:
        p_b, q_b = p.dim() > x0.dim(), q.dim() > w0.dim()
        if q_b:
            in_dims = (0 if p_b else None, 0)
            return torch.vmap(
                lambda pp, qq: aten.convolution(pp, qq, None, *conf), in_dims=in_dims
            )(p, q)
        if not batched_input:  # the direction dim plays the role of the batch dim
            return aten.convolution(p, q, None, *conf)
        B = p.shape[0]
        out = aten.convolution(p.reshape((-1,) + tuple(p.shape[2:])), q, None, *conf)
        return out.reshape((B,) + tuple(y0.shape))

    K = _order(x, w, bias)
    coeffs: list[Coeff] = []
    spatial = y0.dim() - (2 if batched_input else 1)
    for k in range(1, K + 1):
        c = cauchy(x, w, k, conv) if (isinstance(x, Series) or isinstance(w, Series)) else None
        bk = bias.coeff(k) if isinstance(bias, Series) else None
        if bk is not None:
            view = (bk.shape[0],) + (1,) * int(batched_input) + (bk.shape[1],) + (1,) * spatial
            bk = bk.reshape(view).expand((bk.shape[0],) + tuple(y0.shape))
            c = bk if c is None else c + bk
        coeffs.append(c)
    return Series(y0, coeffs)

