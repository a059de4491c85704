"""Rules for reductions that are not linear: max/min, variance, product, max pooling.

Piecewise-linear selections (``amax``, ``max.dim``, ``max_pool2d``) are linear on each piece:
the series of the selected entries, with ties shared equally as torch's own derivative does.
Variance and product are written in terms of the other rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import register
from .bilinear import mul_series
from .linear import _make_add, _mean, _reduce_dims, _shift, _sum, vmap_linear
from .series import Series, lift, map_coeffs, primal

aten = torch.ops.aten
prims = torch.ops.prims


def _dims(dim: Any, nd: int) -> list[int]:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(nd))
    if isinstance(dim, int):
        dim = [dim]
    return [d % max(nd, 1) for d in dim]


def _select_extreme(x: Series, y0: Tensor, dims: list[int], keepdim: bool) -> Series:
    """Series of ``amax``/``amin`` over ``dims``: the mean of the coefficients at the ties."""
    nd = x.primal.dim()
    yk = y0 if keepdim else _keep(y0, dims, nd)
    mask = (x.primal == yk).to(x.primal.dtype)
    weight = mask / mask.sum(dims, keepdim=True)
    cd = [d + 1 for d in dims]
    return Series(y0, map_coeffs(x, lambda c: (c * weight).sum(cd, keepdim=keepdim)))


def _keep(y: Tensor, dims: list[int], nd: int) -> Tensor:
    for d in sorted(dims):
        y = y.unsqueeze(d)
    return y


@register(aten.amax)
def _amax(x: Series, dim: Any = (), keepdim: bool = False) -> Series:
    y0 = torch.amax(x.primal, dim, keepdim)
    return _select_extreme(x, y0, _dims(dim, x.primal.dim()), keepdim)


@register(aten.amin)
def _amin(x: Series, dim: Any = (), keepdim: bool = False) -> Series:
    y0 = torch.amin(x.primal, dim, keepdim)
    return _select_extreme(x, y0, _dims(dim, x.primal.dim()), keepdim)


@register(aten.max.default)
def _max_all(x: Series) -> Series:
    return _select_extreme(x, torch.max(x.primal), list(range(x.primal.dim())), False)


@register(aten.min.default)
def _min_all(x: Series) -> Series:
    return _select_extreme(x, torch.min(x.primal), list(range(x.primal.dim())), False)


def _gather_at(x: Series, values: Tensor, indices: Tensor, dim: int, keepdim: bool
               ) -> tuple[Series, Tensor]:
    nd = x.primal.dim()
    d = _shift(dim, nd)
    idx = indices if keepdim else indices.unsqueeze(dim % max(nd, 1))

    def pick(c: Tensor) -> Tensor:
        out = c.gather(d, idx.unsqueeze(0).expand((c.shape[0],) + tuple(idx.shape)))
        return out if keepdim or nd == 0 else out.squeeze(d)

    return Series(values, map_coeffs(x, pick)), indices


@register(aten.max.dim)
def _max_dim(x: Series, dim: int, keepdim: bool = False) -> tuple[Series, Tensor]:
    return _gather_at(x, *torch.max(x.primal, dim, keepdim), dim, keepdim)


@register(aten.min.dim)
def _min_dim(x: Series, dim: int, keepdim: bool = False) -> tuple[Series, Tensor]:
    return _gather_at(x, *torch.min(x.primal, dim, keepdim), dim, keepdim)


def _selecting(op: Any) -> Any:
    """Rule for an op returning ``(values, indices)`` of entries it selects along a dimension
    (``sort``, ``topk``, ``kthvalue``, ``median``/``nanmedian``/``mode`` along ``dim``,
    ``cummax``/``cummin``): the coefficients at the returned indices, as torch's derivative
    (``value_selecting_reduction_backward``, ``cummaxmin_backward``) routes the gradient.
    ``dim`` and ``keepdim`` are read by their names in the op's schema; an op without
    ``keepdim`` keeps every dimension."""
    names = [a.name for a in op._schema.arguments[1:]]

    def rule(x: Series, *args: Any, **kwargs: Any) -> tuple[Series, Tensor]:
        values, indices = op(x.primal, *args, **kwargs)
        bound = {**dict(zip(names, args)), **kwargs}
        keepdim = bound.get("keepdim", False) if "keepdim" in names else True
        return _gather_at(x, values, indices, bound.get("dim", -1), keepdim)

    return rule


for _op in (aten.sort.default, aten.sort.stable, aten.topk.default, aten.kthvalue.default,
            aten.median.dim, aten.nanmedian.dim, aten.mode.default, aten.cummax.default,
            aten.cummin.default):
    register(_op)(_selecting(_op))


def _median_all(op: Any) -> Any:
    """``median(x)``, ``nanmedian(x)``: torch's derivative (``evenly_distribute_backward``)
    shares the gradient among the entries equal to the median, as at the ties of ``max``."""

    def rule(x: Series) -> Series:
        return _select_extreme(x, op(x.primal), list(range(x.primal.dim())), False)

    return rule


register(aten.median.default)(_median_all(aten.median.default))
register(aten.nanmedian.default)(_median_all(aten.nanmedian.default))


@register(aten.max_pool2d_with_indices, aten.max_pool1d_with_indices,
          aten.max_pool3d_with_indices)
def _max_pool(x: Series, kernel_size: Any, *args: Any) -> tuple[Series, Tensor]:
    op = {1: aten.max_pool1d_with_indices, 2: aten.max_pool2d_with_indices,
          3: aten.max_pool3d_with_indices}[len(kernel_size) if len(kernel_size) > 1 else
                                            _spatial(x.primal, kernel_size)]
    y0, idx = op(x.primal, kernel_size, *args)
    s = len(kernel_size) if len(kernel_size) > 1 else _spatial(x.primal, kernel_size)
    return _pooled_at(x, y0, idx, s), idx


@register(aten.adaptive_max_pool2d)
def _adaptive_max_pool2d(x: Series, output_size: Sequence[int]) -> tuple[Series, Tensor]:
    """As :func:`_max_pool` (``adaptive_max_pool1d`` reaches this operator). Not the 3-d
    one: run by the engine's reverse levels, torch crashed the process (segmentation fault)
    on ``adaptive_max_pool3d``, which the reference differentiates instead."""
    y0, idx = aten.adaptive_max_pool2d(x.primal, output_size)
    return _pooled_at(x, y0, idx, 2), idx


def _pooled_at(x: Series, y0: Tensor, idx: Tensor, s: int) -> Series:
    """The coefficients of ``x`` at the entries a max pool selected: ``idx`` indexes the last
    ``s`` (spatial) dimensions flattened, as torch's backward scatters the gradient."""

    def pick(c: Tensor) -> Tensor:
        flat = c.flatten(start_dim=c.dim() - s)
        i = idx.flatten(start_dim=idx.dim() - s)
        i = i.unsqueeze(0).expand((c.shape[0],) + tuple(i.shape))
        return flat.gather(-1, i).reshape((c.shape[0],) + tuple(y0.shape))

    return Series(y0, map_coeffs(x, pick))


def _spatial(x: Tensor, kernel_size: Sequence[int]) -> int:
    return 2 if len(kernel_size) == 1 and x.dim() >= 3 else 1


def _variance(x: Series, dim: Any, correction: float, keepdim: bool) -> Series:
    nd = x.primal.dim()
    dims = _dims(dim, nd)
    n = 1
    for d in dims:
        n *= x.primal.shape[d]
    centered = _make_add(aten.sub, -1)(x, _mean(x, dims, True))
    sq = mul_series(centered, centered)
    total = _sum(sq, dims, keepdim)
    denom = max(n - correction, 0)
    y0 = total.primal / denom
    return Series(y0, [None if c is None else c / denom for c in total.coeffs])


@register(aten.var.correction)
def _var(x: Series, dim: Any = None, *, correction: Any = None, keepdim: bool = False) -> Series:
    corr = 1.0 if correction is None else float(correction)
    return _variance(x, dim, corr, keepdim)


@register(aten.var.dim)
def _var_dim(x: Series, dim: Any = None, unbiased: bool = True, keepdim: bool = False) -> Series:
    return _variance(x, dim, 1.0 if unbiased else 0.0, keepdim)


@register(prims.var)
def _prims_var(x: Series, dims: Any, correction: float = 1.0, *, output_dtype: Any = None
               ) -> Series:
    return _variance(x, dims, float(correction), False)


@register(aten.var_mean.correction)
def _var_mean(x: Series, dim: Any = None, *, correction: Any = None, keepdim: bool = False
              ) -> tuple[Series, Series]:
    corr = 1.0 if correction is None else float(correction)
    dims = _dims(dim, x.primal.dim())
    return _variance(x, dims, corr, keepdim), _mean(x, dims, keepdim)


def _product(x: Series, dim: int | None, keepdim: bool) -> Series:
    if dim is None:
        flat = Series(x.primal.reshape(-1), [None if c is None else c.reshape(c.shape[0], -1)
                                              for c in x.coeffs])
        out = _product(flat, 0, False)
        return out
    from .linear import _unbind

    parts = _unbind(x, dim)
    acc = parts[0]
    for p in parts[1:]:
        acc = mul_series(acc, p)
    if keepdim:
        from .linear import _make_reshape_rule

        return _make_reshape_rule(aten.unsqueeze)(acc, dim % max(x.primal.dim(), 1))
    return acc


@register(aten.prod.dim_int)
def _prod_dim(x: Series, dim: int, keepdim: bool = False, *, dtype: Any = None) -> Series:
    return _product(x, dim, keepdim)


@register(aten.prod.default)
def _prod_all(x: Series, *, dtype: Any = None) -> Series:
    return _product(x, None, False)


@register(aten.cumprod)
def _cumprod(x: Series, dim: int, *, dtype: Any = None) -> Series:
    """Running products along ``dim`` (one series product per entry: the polynomial itself,
    exact also where entries are zero)."""
    from .linear import _cat, _make_reshape_rule, _unbind

    nd = x.primal.dim()
    if nd == 0:
        return x
    d = dim % nd
    unsq = _make_reshape_rule(aten.unsqueeze)
    parts = _unbind(x, d)
    acc = parts[0]
    outs = [unsq(acc, d)]
    for p in parts[1:]:
        acc = mul_series(acc, p)
        outs.append(unsq(acc, d))
    out = _cat(outs, d)
    y0 = torch.cumprod(x.primal, dim, dtype=dtype)
    return Series(y0, [None if c is None else c.to(y0.dtype) for c in out.coeffs])


@register(prims.prod)
def _prims_prod(x: Series, dims: Any, *, output_dtype: Any = None) -> Series:
    acc = x
    for d in sorted(_dims(dims, x.primal.dim()), reverse=True):
        acc = _product(acc, d, False)
    return acc


_ = (lift, _reduce_dims)


# ----------------------------------------------------------------- scatter / index reductions
def _reduce_into(op: Any, add: Any, pick: Any) -> Any:
    """``scatter_reduce`` / ``index_reduce`` (``op``; ``add`` and ``pick`` the matching
    ``scatter_add``/``gather`` or ``index_add``/``index_select``). ``sum`` and ``mean`` are
    linear in ``self`` and ``src``; ``amax``/``amin`` take the mean of the coefficients of
    every input equal to the result (``self`` where it counts), as torch's backward splits
    the gradient among ties; ``prod`` is declined at plan time (the request falls back)."""
    linear = vmap_linear(op, (0, 3))

    def rule(x: Any, dim: int, index: Tensor, src: Any, reduce: str, *,
             include_self: bool = True) -> Series:
        if reduce in ("sum", "mean"):
            return linear(x, dim, index, src, reduce, include_self=include_self)
        s0, r0 = primal(x), primal(src)
        y0 = op(s0, dim, index, r0, reduce, include_self=include_self)
        zeros = torch.zeros_like(s0)
        touched = add(zeros, dim, index, torch.ones_like(r0)) > 0
        keep = ((s0 == y0) & (touched.logical_not() | include_self)).to(s0.dtype)
        hit = (r0 == pick(y0, dim, index)).to(s0.dtype)
        count = keep + add(zeros, dim, index, hit)

        def combine(cx: Tensor, cs: Tensor) -> Tensor:
            return add(cx * keep, dim, index, cs * hit) / count

        K = max(a.order for a in (x, src) if isinstance(a, Series))
        coeffs: list[Any] = []
        for k in range(1, K + 1):
            cx = x.coeff(k) if isinstance(x, Series) else None
            cs = src.coeff(k) if isinstance(src, Series) else None
            present = cx if cx is not None else cs
            if present is None:
                coeffs.append(None)
                continue
            B = present.shape[0]
            coeffs.append(torch.vmap(combine)(
                cx if cx is not None else zeros.expand((B,) + zeros.shape),
                cs if cs is not None else torch.zeros_like(r0).expand((B,) + r0.shape)))
        return Series(y0, coeffs)

    rule.supports = lambda node: node.args[4] in ("sum", "mean", "amax", "amin")  # type: ignore
    return rule


register(aten.scatter_reduce.two)(_reduce_into(aten.scatter_reduce.two, torch.scatter_add,
                                               torch.gather))
register(aten.index_reduce.default)(_reduce_into(aten.index_reduce.default, torch.index_add,
                                                 torch.index_select))
