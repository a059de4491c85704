"""Rules for products: mul, div, matrix products and convolution (Leibniz rule).

For a bilinear ``p = a * b`` the Taylor coefficients are the Cauchy product
``p_k = sum_{i+j=k} a_i * b_j``; both factors move along the same direction, so their
direction dimensions pair up elementwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import register
from .series import (
    Coeff,
    Series,
    UnitSeed,
    basis_aware,
    cauchy,
    common_basis,
    compose_unary,
    expand_basis,
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

    basis, keep = common_basis((a, b))
    if basis is not None and not keep:
        a, b, basis = expand_basis(a), expand_basis(b), None
    # in a basis (NOTE [First-order basis]): c_1 = a_0 b_1 + a_1 b_0 stays in it, the higher
    # coefficients take the first ones expanded
    full = (expand_basis(a), expand_basis(b)) if basis is not None and K > 1 else (a, b)
    coeffs: list[Coeff] = []
    for k in range(1, K + 1):
        c = cauchy(a, b, k, mul) if k == 1 else cauchy(*full, k, mul)
        coeffs.append(None if c is None else c.expand((c.shape[0],) + shape))
    return Series(y0, coeffs, basis)


@register(aten.mul)
@basis_aware
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
@basis_aware  # linear in ``a``, or a product with a reciprocal (NOTE [First-order basis])
def _div(a: Any, b: Any, *, rounding_mode: Any = None) -> Any:
    if rounding_mode is not None:  # floor/trunc division is piecewise constant
        return aten.div(primal(a), primal(b), rounding_mode=rounding_mode)
    y0 = torch.div(primal(a), primal(b))
    if not isinstance(b, Series):
        shape = tuple(y0.shape)
        coeffs = [None if c is None else (lift(c, len(shape)) / b).expand((c.shape[0],) + shape)
                  for c in a.coeffs]
        return Series(y0, coeffs, a.basis)
    return mul_series(a, reciprocal_series(b), y0)


@register(aten.reciprocal)
@basis_aware
def _reciprocal(b: Series) -> Series:
    return reciprocal_series(b)


# ----------------------------------------------------------------------- matrix products
# NOTE [Matrix products]
# Every spelling of a matrix product reaches the engine as one of ``mm``, ``addmm``, ``bmm``,
# ``baddbmm``, ``mv``, ``addmv``, ``dot``, ``vdot``, ``addr`` (see NOTE [What the table keeps
# and what it expands] in xafunc/_capture/decompositions.py). Each rule views its operands as
# (batched) matrices -- a vector ``x`` of ``mv`` is the column ``(k, 1)``, the operands of
# ``dot`` a row and a column, those of ``addr`` a column and a row -- and runs
# :func:`_matmul_series`: one GEMM over all directions and coefficients when one operand is a
# constant, the Cauchy product of GEMMs when both carry series, and no product at all for a
# first-order unit seed (:func:`_unit_product`).


def _as_series_shape(x: Any, shape: tuple[int, ...]) -> Any:
    """``x`` reshaped to ``shape`` (a Series keeps its unit seed: reshapes preserve it)."""
    if not isinstance(x, Series):
        return x.reshape(shape)
    if x.unit is not None and x.unit.transposed:
        if tuple(x.primal.shape) == shape:
            return x
        x = materialize(x)
    coeffs = [c if c is None or isinstance(c, UnitSeed) else c.reshape((c.shape[0],) + shape)
              for c in x.coeffs]
    return Series(x.primal.reshape(shape), coeffs)


def _unit_product(a: Any, b: Any, y0: Tensor) -> Coeff:
    """First-order coefficient of ``a @ b`` when one side is a unit-vector seed.

    The seed ``c_1[t] = e_{offset + t}`` reshaped to a left operand ``(*batch, r, k)``: the
    product ``e_j @ b`` is zero except row ``i`` of batch ``beta`` (``j = (beta, i, l)``), which is
    row ``l`` of ``b``. For a right operand ``(*batch, k, n)`` (``j = (beta, l, q)``) it is column
    ``q``, equal to column ``l`` of ``a``. When the seed's non-contracted dims are all 1 (a
    row/column seed) these are plain slices of the constant; otherwise a scatter of those
    rows into zeros (a ``where`` against an identity mask, one pass, when the seed covers
    the whole operand). Either way no identity matrix is multiplied: Jacobians of functions that
    start with a linear layer (any spelling) cost no product there. A ``transposed`` seed (a
    matrix whose transpose is the seeded tensor, ``W.t()``) swaps how ``j`` splits into
    ``(i, l)`` (left) or ``(l, q)`` (right).
    """
    for s, other, left in ((a, b, True), (b, a, False)):
        if not isinstance(s, Series) or isinstance(other, Series) or s.unit is None:
            continue
        if any(c is not None for c in s.coeffs[1:]):
            continue
        sp, op = s.primal, other
        if sp.dim() < 2 or op.dim() < 2 or tuple(sp.shape[:-2]) != tuple(y0.shape[:-2]):
            continue
        B, off, flip = s.unit.count, s.unit.offset, s.unit.transposed
        batch = tuple(y0.shape[:-2])
        nb = math.prod(batch)
        if flip and (sp.dim() != 2 or nb != 1):
            continue
        if left:
            r, k = sp.shape[-2], sp.shape[-1]
            mat = op.expand(batch + tuple(op.shape[-2:])).reshape(nb, k, op.shape[-1])
            if r == 1 and nb == 1 and not flip:  # a row seed: rows of the constant
                return mat[0, off:off + B].reshape((B,) + tuple(y0.shape))
            if off == 0 and B == r * k and nb == 1:  # every entry seeded: one pass
                eye = torch.eye(r, dtype=torch.bool, device=sp.device)
                mask = eye.reshape((1, r, r, 1) if flip else (r, 1, r, 1))
                vals = mat[0].reshape((k, 1, 1, -1) if flip else (1, k, 1, -1))
                out = torch.where(mask, vals, y0.new_zeros(()))
                return out.reshape((B,) + tuple(y0.shape))
            j = torch.arange(off, off + B, device=sp.device)
            if flip:  # seeded entry (l, i) of the (k, r) transpose
                i, l, beta = j % r, j // r, j * 0
            else:
                l, i, beta = j % k, (j // k) % r, j // (k * r)
            rows = mat[beta, l]  # (B, n)
            out = y0.new_zeros((B, nb, r, mat.shape[-1]))
            out = out.index_put((torch.arange(B, device=sp.device), beta, i), rows)
            return out.reshape((B,) + tuple(y0.shape))
        k, n = sp.shape[-2], sp.shape[-1]
        mat = op.expand(batch + tuple(op.shape[-2:])).reshape(nb, op.shape[-2], k)
        if n == 1 and nb == 1 and not flip:  # a column seed: columns of the constant
            return mat[0, :, off:off + B].t().reshape((B,) + tuple(y0.shape))
        if off == 0 and B == k * n and nb == 1:  # every entry seeded: one pass
            eye = torch.eye(n, dtype=torch.bool, device=sp.device)
            mask = eye.reshape((n, 1, 1, n) if flip else (1, n, 1, n))
            vals = mat[0].t().reshape((1, k, -1, 1) if flip else (k, 1, -1, 1))
            out = torch.where(mask, vals, y0.new_zeros(()))
            return out.reshape((B,) + tuple(y0.shape))
        j = torch.arange(off, off + B, device=sp.device)
        if flip:  # seeded entry (q, l) of the (n, k) transpose
            l, q, beta = j % k, j // k, j * 0
        else:
            q, l, beta = j % n, (j // n) % k, j // (k * n)
        cols = mat[beta, :, l]  # (B, m)
        out = y0.new_zeros((B, nb, mat.shape[-2], n))  # written in place: row-major result
        out = aten.index_put(out, [torch.arange(B, device=sp.device), beta, None, q], cols)
        return out.reshape((B,) + tuple(y0.shape))
    return None


def matmul(p: Tensor, q: Tensor) -> Tensor:
    """``p @ q`` where at most one side carries a leading direction dim (``B``).

    ``p``/``q`` are matrices ``(m, k)``/``(k, n)`` or batches ``(nb, ., .)`` of them (``mm``,
    ``bmm``), plus the direction dim on the coefficient side. Against a constant, the directions
    are folded into the rows (or, for a constant on the left, the columns) of one GEMM per
    batch entry -- never ``B`` small products, never the constant expanded ``B`` times (what
    ``torch.matmul``'s broadcasting would do when it cannot fold). The folds are explicit
    reshapes, so they hold whatever strides the coefficient has, also under ``vmap``.
    """
    pb, qb = p.dim() - 2, q.dim() - 2  # batch dims of each side (the direction dim included)
    if p.shape[-1] == 1 and pb != qb and not (p.is_complex() or q.is_complex()):
        # inner size 1: each entry is one product, an outer product (exactly what the GEMM
        # computes; GEMMs with k = 1 are slow): broadcast the batch dims of the lower side
        lead = max(pb, qb) - min(pb, qb)
        lo, hi = (q, p) if pb > qb else (p, q)
        lo = lo.reshape((1,) * lead + tuple(lo.shape))
        a, b = (hi, lo) if pb > qb else (lo, hi)
        return a * b
    if pb > qb:  # p carries the directions: (B, [nb,] m, k) @ ([nb,] k, n)
        if qb == 0:
            if p.stride(-1) != 1 and p.stride(-2) == 1 and p.shape[-2] > 1:
                # transposed matrices (a reverse pass's ``g.t() @ h``): folding them into rows
                # would copy them; one batched GEMM reads them as they are
                p3 = p.reshape((-1,) + tuple(p.shape[-2:]))
                out = torch.bmm(p3, q.expand((p3.shape[0],) + tuple(q.shape)))
            else:
                out = torch.mm(p.reshape(-1, p.shape[-1]), q)
            return out.reshape(p.shape[:-1] + q.shape[-1:])
        if math.prod(q.shape[:-2]) == 1:
            return matmul(p, q.reshape(q.shape[-2:]))
        B, nb, m, k = p.shape[0], math.prod(q.shape[:-2]), p.shape[-2], p.shape[-1]
        pf = p.reshape(B, nb, m, k).transpose(0, 1).reshape(nb, B * m, k)
        out = torch.bmm(pf, q.reshape(nb, k, q.shape[-1]))  # (nb, B*m, n)
        out = out.reshape(nb, B, m, q.shape[-1]).transpose(0, 1)
        return out.reshape(p.shape[:-2] + (m, q.shape[-1]))
    if qb > pb:  # q carries the directions: ([nb,] m, k) @ (B, [nb,] k, n) = (q^T @ p^T)^T
        return matmul(q.transpose(-1, -2), p.transpose(-1, -2)).transpose(-1, -2)
    return torch.matmul(p, q)  # both or neither: a batched product of equal batch dims


def _matmul_series(a: Any, b: Any, y0: Tensor) -> Series:
    """Series of ``a @ b`` (matrices or batches of them, ``y0`` their product)."""
    K = _order(a, b)
    unit = _unit_product(a, b, y0)
    if unit is not None:
        return Series(y0, [unit] + [None] * (K - 1))
    a, b = materialize(a), materialize(b)
    if not isinstance(b, Series):  # one GEMM for all coefficients
        return Series(y0, map_coeffs(a, lambda c: matmul(c, b)))
    if not isinstance(a, Series):
        return Series(y0, map_coeffs(b, lambda c: matmul(a, c)))
    return Series(y0, [cauchy(a, b, k, matmul) for k in range(1, K + 1)])


def _viewed_product(a: Any, b: Any, a_shape: tuple[int, ...], b_shape: tuple[int, ...],
                    y0: Tensor) -> Series:
    """``a @ b`` with the operands viewed as matrices of the given shapes; the result has
    ``y0``'s shape."""
    am, bm = _as_series_shape(a, a_shape), _as_series_shape(b, b_shape)
    prod = _matmul_series(am, bm, y0.reshape(a_shape[:-1] + b_shape[-1:]))
    return _as_series_shape(prod, tuple(y0.shape))


def _affine(y0: Tensor, prod: Series | None, bias: Any, beta: Any, alpha: Any) -> Series:
    """``beta * bias + alpha * prod`` (``bias`` broadcast to ``y0``; ``beta = 0`` ignores it,
    as torch does)."""
    K = _order(*(x for x in (prod, bias) if x is not None))
    shape = tuple(y0.shape)
    coeffs: list[Coeff] = []
    for k in range(1, K + 1):
        c = prod.coeff(k) if prod is not None else None
        if c is not None and alpha != 1:
            c = c * alpha
        bk = bias.coeff(k) if isinstance(bias, Series) and beta != 0 else None
        if bk is not None:
            bk = lift(bk if beta == 1 else bk * beta, len(shape))
            c = bk.expand((bk.shape[0],) + shape) if c is None else c + bk
        coeffs.append(c)
    return Series(y0, coeffs)


def _carries(*xs: Any) -> bool:
    return any(isinstance(x, Series) for x in xs)


@register(aten.mm, aten.bmm)
@unit_aware
def _mm(a: Any, b: Any) -> Series:
    return _matmul_series(a, b, torch.matmul(primal(a), primal(b)))


@register(aten.addmm)
@unit_aware
def _addmm(bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1) -> Series:
    y0 = aten.addmm(primal(bias), primal(a), primal(b), beta=beta, alpha=alpha)
    prod = _matmul_series(a, b, y0) if _carries(a, b) else None
    return _affine(y0, prod, materialize(bias), beta, alpha)


@register(aten.baddbmm)
@unit_aware
def _baddbmm(bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1) -> Series:
    y0 = aten.baddbmm(primal(bias), primal(a), primal(b), beta=beta, alpha=alpha)
    prod = _matmul_series(a, b, y0) if _carries(a, b) else None
    return _affine(y0, prod, materialize(bias), beta, alpha)


@register(aten.mv)
@unit_aware
def _mv(a: Any, x: Any) -> Series:
    y0 = aten.mv(primal(a), primal(x))
    m, k = primal(a).shape
    return _viewed_product(a, x, (m, k), (k, 1), y0)


@register(aten.addmv)
@unit_aware
def _addmv(bias: Any, a: Any, x: Any, *, beta: Any = 1, alpha: Any = 1) -> Series:
    y0 = aten.addmv(primal(bias), primal(a), primal(x), beta=beta, alpha=alpha)
    m, k = primal(a).shape
    prod = _viewed_product(a, x, (m, k), (k, 1), y0) if _carries(a, x) else None
    return _affine(y0, prod, materialize(bias), beta, alpha)


@register(aten.dot)
@unit_aware
def _dot(a: Any, b: Any) -> Series:
    y0 = aten.dot(primal(a), primal(b))
    k = primal(a).shape[0]
    return _viewed_product(a, b, (1, k), (k, 1), y0)


def _conj(x: Any) -> Any:
    """``conj(x)`` (conj is real-linear: the coefficients are conjugated too)."""
    if isinstance(x, Series):
        if not x.primal.is_complex():
            return x
        return Series(x.primal.conj(), map_coeffs(materialize(x), torch.conj))
    return x.conj() if x.is_complex() else x


@register(aten.vdot)
@unit_aware
def _vdot(a: Any, b: Any) -> Series:
    """``vdot(a, b) = dot(conj(a), b)`` (conj is real-linear; a no-op on real tensors)."""
    y0 = aten.vdot(primal(a), primal(b))
    k = primal(a).shape[0]
    return _viewed_product(_conj(a), b, (1, k), (k, 1), y0)


@register(aten.addr)
@unit_aware
def _addr(bias: Any, u: Any, v: Any, *, beta: Any = 1, alpha: Any = 1) -> Series:
    y0 = aten.addr(primal(bias), primal(u), primal(v), beta=beta, alpha=alpha)
    m, n = primal(u).shape[0], primal(v).shape[0]
    prod = _viewed_product(u, v, (m, 1), (1, n), y0) if _carries(u, v) else None
    return _affine(y0, prod, materialize(bias), beta, alpha)


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


# ``outer``/``ger`` are composite (a broadcast multiply) and never reach a rule from capture;
# kept for graphs built by hand.
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


@register(aten.convolution_backward)
def _convolution_backward(
    grad: Any, x: Any, w: Any, bias_sizes: Any, stride: Any, padding: Any, dilation: Any,
    transposed: bool, output_padding: Any, groups: int, output_mask: Any,
) -> tuple[Any, Any, Any]:
    """The reverse levels' convolution backward: ``grad_input`` is bilinear in (grad, weight),
    ``grad_weight`` in (grad, input), ``grad_bias`` linear in grad (Leibniz rule for each,
    every product one vmapped ``convolution_backward`` over the direction dim)."""
    conf = (stride, padding, dilation, transposed, output_padding, groups)
    g0, x0, w0 = primal(grad), primal(x), primal(w)
    outs0 = aten.convolution_backward(g0, x0, w0, bias_sizes, *conf, output_mask)

    def part(i: int, gp: Tensor, other: Tensor) -> Tensor:
        """Output ``i`` for the gradient ``gp`` and the other operand (weight for the input's
        gradient, input for the weight's), either possibly with a direction dim."""
        mask = [j == i for j in range(3)]
        gb, ob = gp.dim() > g0.dim(), other.dim() > (w0 if i == 0 else x0).dim()

        def call(gg: Tensor, oo: Tensor) -> Tensor:
            xx, ww = (x0, oo) if i == 0 else (oo, w0)
            return aten.convolution_backward(gg, xx, ww, bias_sizes, *conf, mask)[i]

        if not gb and not ob:
            return call(gp, other)
        return torch.vmap(call, in_dims=(0 if gb else None, 0 if ob else None))(gp, other)

    results: list[Any] = []
    for i, (other, sel) in enumerate(((w, output_mask[0]), (x, output_mask[1]),
                                      (None, output_mask[2]))):
        y0 = outs0[i]
        if not sel or y0 is None:
            results.append(y0)
            continue
        if i == 2:
            if not isinstance(grad, Series):
                results.append(y0)
                continue
            results.append(Series(y0, map_coeffs(materialize(grad), lambda c: torch.vmap(
                lambda cc: aten.convolution_backward(cc, x0, w0, bias_sizes, *conf,
                                                     [False, False, True])[2])(c))))
            continue
        if not (isinstance(grad, Series) or isinstance(other, Series)):
            results.append(y0)
            continue
        K = _order(grad, other)
        ga, ob = materialize(grad), materialize(other)
        mul = functools.partial(part, i)
        results.append(Series(y0, [cauchy(ga, ob, k, mul) for k in range(1, K + 1)]))
    return results[0], results[1], results[2]
