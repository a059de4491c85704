"""Rules for operators linear in their differentiated inputs.

A linear map ``L`` sends a series to the series of its images: ``(L x)_k = L x_k``; zero
coefficients stay zero. Shape-only ops keep the direction dimension leading by reshaping to
``(B, *output.shape)``; ops with a ``dim`` argument shift it by one; the remaining ops are
batched over the direction dimension with ``torch.vmap``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import NONDIFF, register
from .series import (
    Coeff,
    Series,
    UnitSeed,
    batch_size,
    lift,
    map_coeffs,
    materialize,
    paired,
    primal,
    primals,
    unit_aware,
)

aten = torch.ops.aten
prims = torch.ops.prims


def _shift(dim: int, ndim: int) -> int:
    return dim % max(ndim, 1) + 1


# --------------------------------------------------------------------------- shape-only ops
def _make_reshape_rule(op: Any) -> Callable[..., Any]:
    @unit_aware
    def rule(x: Any, *args: Any, **kwargs: Any) -> Series:
        if x.unit is not None and x.unit.transposed:
            x = materialize(x)
        y0 = op(x.primal, *args, **kwargs)
        shape = tuple(y0.shape)
        coeffs = [c if c is None or isinstance(c, UnitSeed) else c.reshape((c.shape[0],) + shape)
                  for c in x.coeffs]
        return Series(y0, coeffs)

    return rule


for _op in (
    aten.view, aten.reshape, aten._unsafe_view, aten.squeeze, aten.unsqueeze, aten.alias,
    aten.clone, aten.contiguous, aten.view_copy, aten.squeeze_copy, aten.unsqueeze_copy,
    aten.alias_copy, aten.lift_fresh_copy, aten.lift_fresh, aten._reshape_alias, aten.flatten,
):
    register(_op)(_make_reshape_rule(_op))


def _same_order(x: Series, y0: Tensor) -> Series:
    """``x`` viewed with ``y0``'s shape, for a view that keeps the element order (the unit seed
    stays a unit seed; other coefficients are reshaped)."""
    if x.unit is not None and x.unit.transposed:
        x = materialize(x)
    shape = tuple(y0.shape)
    return Series(y0, [c if c is None or isinstance(c, UnitSeed)
                       else c.reshape((c.shape[0],) + shape) for c in x.coeffs])


def _keeps_order(shape: Sequence[int], perm: Sequence[int]) -> bool:
    """Does permuting ``shape`` by ``perm`` keep the dims of size > 1 in their order? Then the
    permuted tensor has the same row-major element order, and a unit seed stays one."""
    big = [d % max(len(shape), 1) for d in perm if shape[d % max(len(shape), 1)] != 1]
    return big == sorted(big)


def _transposed_unit(x: Series, y0: Tensor) -> Series | None:
    """The transpose ``y0`` of a matrix carrying a first-order unit seed, its seed flagged
    ``transposed`` (toggled): the matrix-product rules then still need no product."""
    if x.unit is None or x.primal.dim() != 2 or x.order != 1:
        return None
    return Series(y0, [UnitSeed(x.unit.offset, x.unit.count, not x.unit.transposed)])


@register(aten.permute, aten.permute_copy)
@unit_aware
def _permute(x: Series, dims: Sequence[int]) -> Series:
    y0 = x.primal.permute(list(dims))
    if x.unit is not None and _keeps_order(x.primal.shape, dims):
        return _same_order(x, y0)
    flagged = _transposed_unit(x, y0)
    if flagged is not None:
        return flagged
    x = materialize(x)
    nd = x.primal.dim()
    cdims = [0] + [_shift(d, nd) for d in dims]
    return Series(y0, map_coeffs(x, lambda c: c.permute(cdims)))


@register(aten.transpose, aten.transpose_copy)
@unit_aware
def _transpose(x: Series, d0: int, d1: int) -> Series:
    nd = x.primal.dim()
    y0 = x.primal.transpose(d0, d1)
    perm = list(range(nd))
    if nd:
        perm[d0 % nd], perm[d1 % nd] = perm[d1 % nd], perm[d0 % nd]
    if x.unit is not None and _keeps_order(x.primal.shape, perm):
        return _same_order(x, y0)
    flagged = _transposed_unit(x, y0) if perm != list(range(nd)) else None
    if flagged is not None:
        return flagged
    x = materialize(x)
    a, b = _shift(d0, nd), _shift(d1, nd)
    return Series(y0, map_coeffs(x, lambda c: c.transpose(a, b)))


@register(aten.t, aten.t_copy)
@unit_aware
def _t(x: Series) -> Series:
    if x.primal.dim() < 2:
        return Series(x.primal, x.coeffs)
    if x.unit is not None and 1 in x.primal.shape:
        return _same_order(x, x.primal.t())
    flagged = _transposed_unit(x, x.primal.t())
    if flagged is not None:
        return flagged
    x = materialize(x)
    return Series(x.primal.t(), map_coeffs(x, lambda c: c.transpose(1, 2)))


@register(aten.expand, aten.expand_copy)
def _expand(x: Series, size: Sequence[int], *, implicit: bool = False) -> Series:
    y0 = x.primal.expand(size)
    nd = y0.dim()
    return Series(y0, map_coeffs(x, lambda c: lift(c, nd).expand((c.shape[0],) + y0.shape)))


@register(prims.broadcast_in_dim)
def _broadcast_in_dim(x: Series, shape: Sequence[int], bdims: Sequence[int]) -> Series:
    y0 = prims.broadcast_in_dim(x.primal, shape, bdims)
    cb = [0] + [d + 1 for d in bdims]
    return Series(
        y0, map_coeffs(x, lambda c: prims.broadcast_in_dim(c, (c.shape[0],) + tuple(shape), cb))
    )


@register(aten.select, aten.select_copy)
def _select(x: Series, dim: int, index: int) -> Series:
    d = _shift(dim, x.primal.dim())
    return Series(aten.select(x.primal, dim, index), map_coeffs(x, lambda c: c.select(d, index)))


@register(aten.slice, aten.slice_copy)
def _slice(x: Series, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> Series:
    d = _shift(dim, x.primal.dim())
    return Series(
        aten.slice(x.primal, dim, start, end, step),
        map_coeffs(x, lambda c: aten.slice(c, d, start, end, step)),
    )


@register(aten.index)
def _index(x: Any, indices: Sequence[Any]) -> Series:
    if not isinstance(x, Series) or any(isinstance(i, Series) for i in indices):
        raise NotImplementedError("index: only the indexed tensor may carry derivatives")
    cidx = [None, *indices]
    return Series(aten.index(x.primal, indices), map_coeffs(x, lambda c: aten.index(c, cidx)))


@register(aten.split_with_sizes, aten.split, aten.split_with_sizes_copy, aten.split_copy)
@unit_aware
def _split(x: Series, sizes: Any, dim: int = 0) -> list[Any]:
    outs = torch.split(x.primal, sizes, dim)
    if x.unit is not None:
        blocked = _split_unit(x, outs, dim)
        if blocked is not None:
            return blocked
        x = materialize(x)
    d = _shift(dim, x.primal.dim())
    parts = [None if c is None else torch.split(c, sizes, d) for c in x.coeffs]
    return [
        Series(o, [None if p is None else p[i] for p in parts]) for i, o in enumerate(outs)
    ]


def _split_unit(x: Series, outs: Sequence[Tensor], dim: int) -> list[Any] | None:
    """Pieces of a unit seed split along its leading dim: the piece holding every seeded
    entry keeps a unit seed (offset shifted), the others are constants (zero coefficients),
    so a propagation seeded in one differentiated leaf never touches the other leaves'
    tangents (see NOTE [Blocked directions]). ``None`` when the seed straddles pieces."""
    seed = x.unit
    assert seed is not None
    if seed.transposed or x.order != 1 or (x.primal.dim() and dim % x.primal.dim() != 0):
        return None
    start, stop = seed.offset, seed.offset + seed.count
    pieces: list[Any] = []
    begin = 0
    for o in outs:
        end = begin + o.numel()
        if begin <= start and stop <= end:
            pieces.append(Series(o, [UnitSeed(start - begin, seed.count)]))
        elif stop <= begin or end <= start:
            pieces.append(o)
        else:
            return None
        begin = end
    return pieces


@register(aten.unbind)
def _unbind(x: Series, dim: int = 0) -> list[Series]:
    d = _shift(dim, x.primal.dim())
    parts = [None if c is None else c.unbind(d) for c in x.coeffs]
    return [
        Series(o, [None if p is None else p[i] for p in parts])
        for i, o in enumerate(x.primal.unbind(dim))
    ]


@register(aten.cat)
def _cat(tensors: Sequence[Any], dim: int = 0) -> Series:
    y0 = torch.cat([primal(t) for t in tensors], dim)
    d = _shift(dim, y0.dim())
    B = batch_size(tensors)
    assert B is not None
    K = max(t.order for t in tensors if isinstance(t, Series))
    coeffs: list[Coeff] = []
    for k in range(1, K + 1):
        parts = [t.coeff(k) if isinstance(t, Series) else None for t in tensors]
        if all(p is None for p in parts):
            coeffs.append(None)
            continue
        full = [
            p if p is not None else primal(t).new_zeros((B,) + tuple(primal(t).shape))
            for p, t in zip(parts, tensors)
        ]
        coeffs.append(torch.cat(full, d))
    return Series(y0, coeffs)


def _reduce_dims(dims: Any, nd: int) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(1, nd + 1))
    if isinstance(dims, int):
        dims = [dims]
    return [_shift(d, nd) for d in dims]


@register(aten.sum)
def _sum(x: Series, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Series:
    y0 = aten.sum(x.primal, dtype=dtype) if dim is None and not keepdim else torch.sum(
        x.primal, dim if dim is not None else [], keepdim=keepdim, dtype=dtype
    )
    dims = _reduce_dims(dim, x.primal.dim())
    if x.primal.dim() == 0:
        return Series(y0, x.coeffs)
    return Series(y0, map_coeffs(x, lambda c: torch.sum(c, dims, keepdim=keepdim, dtype=dtype)))


@register(prims.sum)
def _prims_sum(x: Series, dims: Any, *, output_dtype: Any = None) -> Series:
    y0 = prims.sum(x.primal, dims, output_dtype=output_dtype)
    cd = _reduce_dims(dims, x.primal.dim())
    if x.primal.dim() == 0:
        return Series(y0, x.coeffs)
    return Series(y0, map_coeffs(x, lambda c: torch.sum(c, cd)))


@register(aten.mean)
def _mean(x: Series, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Series:
    y0 = torch.mean(x.primal, dim if dim is not None else [], keepdim=keepdim, dtype=dtype)
    if x.primal.dim() == 0:
        return Series(y0, x.coeffs)
    dims = _reduce_dims(dim, x.primal.dim())
    return Series(y0, map_coeffs(x, lambda c: torch.mean(c, dims, keepdim=keepdim, dtype=dtype)))


@register(aten.neg)
def _neg(x: Series) -> Series:
    return Series(-x.primal, map_coeffs(x, torch.neg))


@register(aten._to_copy)
def _to_copy(x: Series, **kwargs: Any) -> Series:
    kw = {k: v for k, v in kwargs.items() if k in ("dtype", "device")}
    y0 = aten._to_copy(x.primal, **kwargs)
    if not y0.dtype.is_floating_point:
        return Series(y0, [None] * x.order)
    return Series(y0, map_coeffs(x, lambda c: c.to(**kw)))


@register(aten.detach, aten.detach_copy)
def _detach(x: Series) -> Tensor:
    # ``detach`` cuts derivatives, as under torch.func: the result is a constant.
    return x.primal.detach()


def _expand_to(c: Tensor, shape: Sequence[int]) -> Tensor:
    return lift(c, len(shape)).expand((c.shape[0],) + tuple(shape))


def _make_add(op: Any, sign: int) -> Callable[..., Any]:
    def rule(a: Any, b: Any, *, alpha: Any = 1) -> Series:
        y0 = op(primal(a), primal(b), alpha=alpha)
        shape = y0.shape
        K = max(s.order for s in (a, b) if isinstance(s, Series))
        coeffs: list[Coeff] = []
        scale = sign * alpha
        for k in range(1, K + 1):
            ca = a.coeff(k) if isinstance(a, Series) else None
            cb = b.coeff(k) if isinstance(b, Series) else None
            if cb is not None and scale != 1:
                cb = cb * scale
            if ca is None and cb is None:
                coeffs.append(None)
            elif cb is None:
                coeffs.append(_expand_to(ca, shape))  # type: ignore[arg-type]
            elif ca is None:
                coeffs.append(_expand_to(cb, shape))
            else:
                coeffs.append(_expand_to(lift(ca, len(shape)) + lift(cb, len(shape)), shape))
        return Series(y0, coeffs)

    return rule


register(aten.add)(_make_add(aten.add, 1))
register(aten.sub)(_make_add(aten.sub, -1))


@register(aten.rsub)
def _rsub(a: Any, b: Any, *, alpha: Any = 1) -> Series:
    # rsub(a, b, alpha) = b - alpha * a
    y0 = aten.rsub(primal(a), primal(b), alpha=alpha)
    neg_a = Series(-alpha * a.primal, map_coeffs(a, lambda c: -alpha * c)) \
        if isinstance(a, Series) else -alpha * a
    out = _make_add(aten.add, 1)(b, neg_a)
    return Series(y0, out.coeffs)


def _selected(cond: Tensor, a: Any, b: Any, y0: Tensor) -> Series:
    """``y0 = where(cond, a, b)`` as a series: each coefficient is picked entrywise from
    ``a``'s where ``cond`` holds and from ``b``'s elsewhere (zero for a constant)."""
    shape = tuple(y0.shape)
    zero = y0.new_zeros(())

    def pick(ca: Coeff, cb: Coeff) -> Tensor:
        ta = lift(ca, len(shape)) if ca is not None else zero
        tb = lift(cb, len(shape)) if cb is not None else zero
        return _expand_to(torch.where(cond, ta, tb), shape)

    return Series(y0, paired(a, b, pick))


@register(aten.where)
def _where(cond: Tensor, a: Any, b: Any) -> Series:
    if isinstance(cond, Series):
        cond = cond.primal
    return _selected(cond, a, b, torch.where(cond, primal(a), primal(b)))


# ------------------------------------------------------------------- generic vmap-batched ops
def vmap_linear(op: Any, positions: Sequence[int] = (0,), shape_only: Sequence[int] = ()
                ) -> Callable[..., Any]:
    """Rule for ``op`` jointly linear in the tensor arguments at ``positions``.

    Coefficient ``k`` is ``op`` applied, under ``torch.vmap`` over the direction dim, to the
    ``k``-th coefficients of those arguments (zero for constants there); the arguments at
    ``shape_only`` are read for their shape alone (the ``self`` of ``avg_pool2d_backward``), so
    their derivatives do not matter; other arguments must be constants.
    """

    def rule(*args: Any, **kwargs: Any) -> Series:
        for i, a in enumerate(args):
            if isinstance(a, Series) and i not in positions and i not in shape_only:
                raise NotImplementedError(f"{op}: argument {i} may not carry derivatives")
        pargs = list(primals(args))
        y0 = op(*pargs, **kwargs)
        K = max(a.order for a in args if isinstance(a, Series))
        coeffs: list[Coeff] = []
        for k in range(1, K + 1):
            cs = [args[p].coeff(k) if isinstance(args[p], Series) else None for p in positions]
            if all(c is None for c in cs):
                coeffs.append(None)
                continue
            call = list(pargs)
            in_dims: list[Any] = [None] * len(call)
            for p, c in zip(positions, cs):
                if c is None:
                    call[p] = torch.zeros_like(pargs[p])
                else:
                    call[p] = c
                    in_dims[p] = 0

            def f(*a: Any) -> Tensor:
                return op(*a, **kwargs)

            coeffs.append(torch.vmap(f, in_dims=tuple(in_dims))(*call))
        return Series(y0, coeffs)

    return rule


for _op, _pos in (
    (aten.gather, (0,)),
    (aten.embedding, (0,)),
    (aten.flip, (0,)),
    (aten.roll, (0,)),
    (aten.repeat, (0,)),
    (aten.avg_pool1d, (0,)),
    (aten.avg_pool2d, (0,)),
    (aten.avg_pool3d, (0,)),
    (aten._adaptive_avg_pool2d, (0,)),
    (aten.adaptive_avg_pool1d, (0,)),
    (aten.upsample_nearest1d, (0,)),
    (aten.upsample_nearest2d, (0,)),
    (aten.upsample_bilinear2d, (0,)),
    (aten.upsample_linear1d, (0,)),
    (aten.diagonal, (0,)),
    (aten.diagonal_scatter, (0, 1)),
    (aten.diagonal_copy, (0,)),
    (aten.diag_embed, (0,)),
    (aten.tril, (0,)),
    (aten.triu, (0,)),
    (aten.cumsum, (0,)),
    (aten.index_select, (0,)),
    (aten.narrow, (0,)),
    (aten.unfold, (0,)),
    (aten.im2col, (0,)),
    (aten.col2im, (0,)),
    (aten.trace, (0,)),
    (aten.movedim, (0,)),
    (aten.index_put, (0, 2)),
    (aten.scatter_add, (0, 3)),
    (aten.index_add, (0, 3)),
):
    register(_op)(vmap_linear(_op, _pos))

# Backward operators of the reverse levels (jacrev of the captured graph), linear in the
# incoming gradient; ``self`` only gives them the input's shape (``max_pool2d``'s uses the
# saved indices, not the values).
for _op in (aten.avg_pool2d_backward, aten.avg_pool3d_backward,
            aten._adaptive_avg_pool2d_backward, aten._adaptive_avg_pool3d_backward,
            aten.max_pool2d_with_indices_backward, aten.max_pool3d_with_indices_backward,
            aten.adaptive_max_pool2d_backward):
    register(_op)(vmap_linear(_op, (0,), shape_only=(1,)))
for _op in (aten.upsample_bilinear2d_backward, aten.upsample_nearest2d_backward,
            aten.upsample_linear1d_backward, aten.upsample_nearest1d_backward,
            aten.embedding_dense_backward):
    register(_op)(vmap_linear(_op, (0,)))
register(aten.scatter.src)(vmap_linear(aten.scatter.src, (0, 3)))


@register(aten.scatter.value)
def _scatter_value(x: Series, dim: int, index: Tensor, value: Any) -> Series:
    # affine in ``self``: the scattered positions hold a constant
    y0 = aten.scatter(x.primal, dim, index, value)
    d = _shift(dim, x.primal.dim())
    return Series(y0, map_coeffs(x, lambda c: aten.scatter(
        c, d, index.unsqueeze(0).expand((c.shape[0],) + tuple(index.shape)), 0)))


@register(aten.constant_pad_nd)
def _constant_pad_nd(x: Series, pad: Sequence[int], value: Any = 0) -> Series:
    # affine, not linear: the padding value is a constant, so the coefficients pad with zero
    y0 = aten.constant_pad_nd(x.primal, pad, value)
    return Series(y0, map_coeffs(x, lambda c: aten.constant_pad_nd(c, pad, 0)))


@register(aten.masked_fill)
def _masked_fill(x: Any, mask: Tensor, value: Any) -> Series:
    # derivatives.yaml: self ``grad.masked_fill(mask, 0)``, value ``masked_fill_backward``:
    # the filled entries follow ``value`` (zero when it is a constant), the others ``x``
    return _selected(mask, value, x, aten.masked_fill(primal(x), mask, primal(value)))


def _scatter_rule(op: Any) -> Callable[..., Any]:
    """``slice_scatter`` / ``select_scatter``: linear in (input, src), dim shifted by one."""

    def rule(inp: Any, src: Any, dim: int = 0, *args: Any) -> Series:
        x0, s0 = primal(inp), primal(src)
        y0 = op(x0, s0, dim, *args)
        d = _shift(dim, x0.dim())
        if op is aten.slice_scatter and len(args) >= 2 and args[1] is not None:
            args = (args[0], min(args[1], x0.shape[dim])) + tuple(args[2:])
        B = batch_size([inp, src])

        def scatter(ci: Coeff, cs: Coeff) -> Tensor:
            ci = ci if ci is not None else x0.new_zeros((B,) + tuple(x0.shape))
            cs = cs if cs is not None else s0.new_zeros((B,) + tuple(s0.shape))
            return op(ci, cs, d, *args)

        return Series(y0, paired(inp, src, scatter))

    return rule


register(aten.slice_scatter)(_scatter_rule(aten.slice_scatter))
register(aten.select_scatter)(_scatter_rule(aten.select_scatter))


@register(aten.copy)
def _copy(dst: Any, src: Any, non_blocking: bool = False) -> Any:
    """Functional ``copy``: the values of ``src`` broadcast into ``dst``'s shape and dtype."""
    y0 = aten.copy(primal(dst), primal(src), non_blocking)
    if not isinstance(src, Series):
        return y0
    shape = tuple(y0.shape)
    return Series(y0, map_coeffs(src, lambda c: _expand_to(c, shape).to(y0.dtype)))


@register(operator.getitem)
def _getitem(x: Any, i: Any) -> Any:
    return x[i]


NONDIFF.update({
    aten.gt, aten.ge, aten.lt, aten.le, aten.eq, aten.ne, aten.logical_not, aten.logical_and,
    aten.logical_or, aten.sign, aten.floor, aten.ceil, aten.round, aten.trunc, aten.argmax,
    aten.argmin, aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like,
    aten.scalar_tensor, aten.arange, aten.full, aten.zeros, aten.ones, aten.empty,
    aten.isnan, aten.isinf, aten.sym_size, aten.sym_numel, aten.sym_stride,
    aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty,
    aten.eye, aten.floor_divide, aten.bitwise_and,
    aten.bitwise_or, aten.bitwise_not, aten.empty_strided,
    # boolean / integer results (derivatives.yaml: output_differentiability [False] or no
    # differentiable output)
    aten.logical_xor, aten.bitwise_xor, aten.isfinite, aten.isposinf, aten.isneginf,
    aten.signbit, aten.bucketize, aten.searchsorted, aten.any, aten.all, aten.count_nonzero,
    aten.isin,
    # fill.Scalar: ``self: zeros_like(grad)`` (fill.Tensor carries the value's derivative)
    aten.fill.Scalar,
})
