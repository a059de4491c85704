"""Full symmetric derivative tensors from univariate Taylor coefficients.

NOTE [Interpolation of mixed partials]
Along an integer direction ``j`` with ``|j| = d`` the ``d``-th Taylor coefficient of ``f`` is
``F_j = sum_{|i| = d} (d^i f / i!) j^i``. Griewank, Utke and Walther ("Evaluating higher
derivative tensors by forward propagation of univariate Taylor series", Math. Comp. 2000)
invert this for every multi-index ``i`` with ``|i| = d``:

    d^i f = sum_{|j| = d} gamma_ij F_j,
    gamma_ij = sum_{0 < k <= i} (-1)^{|i - k|} C(i, k) C(d k / |k|, j) (|k| / d)^d

(multi-index binomials, the second one generalised to real upper arguments). ``gamma_ij``
vanishes unless ``supp(j)`` is inside ``supp(i)``, so each row has at most ``C(2d - 1, d)``
entries and depends only on the counts of ``i``: it is computed once per composition of
``d`` and placed on the support of each ``i``. So the ``C(n + d - 1, d)`` distinct entries of
a symmetric ``d``-th derivative tensor cost as many univariate propagations -- not ``n^d``
(nor ``d!`` times the distinct ones) -- and the full tensor is a gather of them.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import Tensor


@functools.lru_cache(maxsize=64)
def combinations(n: int, d: int) -> tuple[tuple[int, ...], ...]:
    """Sorted index tuples ``c_1 <= ... <= c_d`` (one per multi-index ``|i| = d``), in
    lexicographic order."""
    return tuple(itertools.combinations_with_replacement(range(n), d))


def num_directions(n: int, d: int) -> int:
    return math.comb(n + d - 1, d)


def directions(n: int, d: int, start: int = 0, stop: int | None = None, *,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Rows ``start:stop`` of the direction matrix: row ``r`` is the multi-index ``i_r``."""
    combos = combinations(n, d)[start:stop]
    rows = torch.arange(len(combos)).repeat_interleave(d)
    cols = torch.tensor([c for combo in combos for c in combo], dtype=torch.long)
    out = torch.zeros(len(combos), n, dtype=dtype)
    out.index_put_((rows, cols), torch.ones(len(cols), dtype=dtype), accumulate=True)
    return out.to(device)


def _gbinom(r: float, k: int) -> float:
    out = 1.0
    for t in range(k):
        out *= (r - t) / (t + 1)
    return out


@functools.cache
def _template(counts: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], float], ...]:
    """``gamma_ij`` for ``i`` with the given positive counts on its support, as pairs
    (counts of ``j`` on that support, coefficient)."""
    d, q = sum(counts), len(counts)
    js = [j for j in itertools.product(range(d + 1), repeat=q) if sum(j) == d]
    out = []
    for j in js:
        total = 0.0
        for k in itertools.product(*(range(c + 1) for c in counts)):
            kk = sum(k)
            if kk == 0:
                continue
            term = (-1.0) ** (d - kk) * (kk / d) ** d
            for cm, km, jm in zip(counts, k, j):
                term *= math.comb(cm, km) * _gbinom(d * km / kk, jm)
            total += term
        if abs(total) > 1e-12:
            out.append((j, total))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _gamma(n: int, d: int) -> tuple[list[tuple[Tensor, Tensor, Tensor]], Tensor]:
    """Per composition group: (rows, cols ``(N_g, T)``, vals ``(N_g, T)``), and the inverse
    permutation putting the concatenated groups back into multi-index order."""
    combos = combinations(n, d)
    index = {c: r for r, c in enumerate(combos)}
    groups: dict[tuple[int, ...], tuple[list[int], list[list[int]]]] = {}
    for r, combo in enumerate(combos):
        support = sorted(set(combo))
        counts = tuple(combo.count(s) for s in support)
        rows, cols = groups.setdefault(counts, ([], []))
        rows.append(r)
        cols.append([
            index[tuple(s for s, c in zip(support, jc) for _ in range(c))]
            for jc, _ in _template(counts)
        ])
    out = []
    order = []
    for counts, (rows, cols) in groups.items():
        vals = torch.tensor([v for _, v in _template(counts)], dtype=torch.float64)
        out.append((torch.tensor(rows), torch.tensor(cols), vals))
        order.extend(rows)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return out, inverse


@functools.lru_cache(maxsize=16)
def full_index(n: int, d: int) -> Tensor:
    """For every index tuple in ``[n]^d`` (row-major), the rank of its sorted version."""
    grids = torch.cartesian_prod(*[torch.arange(n)] * d).reshape(-1, d) if d > 1 else \
        torch.arange(n).reshape(-1, 1)
    srt = grids.sort(dim=1).values
    weights = torch.tensor([n ** (d - 1 - t) for t in range(d)], dtype=torch.long)
    keys = (srt * weights).sum(1)
    combos = torch.tensor(combinations(n, d), dtype=torch.long).reshape(-1, d)
    ckeys = (combos * weights).sum(1)
    return torch.searchsorted(ckeys, keys)


def partials(F: Tensor, n: int, d: int) -> Tensor:
    """``d^i f`` for every ``|i| = d`` (rows in multi-index order) from ``F`` ``(N, M)``, the
    ``d``-th Taylor coefficients along the directions of :func:`directions`."""
    if d == 1:
        return F
    _, _, groups, inverse = interpolation_constants(n, d, F.dtype, F.device)
    assert groups is not None and inverse is not None
    parts = [torch.einsum("t,gtm->gm", vals, F[cols]) for cols, vals in groups]
    return torch.cat(parts, 0)[inverse]


_DENSE_LIMIT = 1 << 20  # entries of a dense reconstruction matrix
# up to this many entries the dense matrix maps the coefficients to the full tensor directly;
# above, to the N distinct partials only, which are then gathered: the full matrix repeats
# each row of the other about n^d / N times, and reading it bounds the product (the full
# (1728, 364) matrix of a third derivative in 12 inputs: 316 us against 4 outputs' columns)
_FULL_LIMIT = 1 << 15


@functools.lru_cache(maxsize=32)
def _dense(n: int, d: int, full: bool) -> Tensor:
    """``G (N, N)`` with ``G @ F`` the distinct partials in multi-index order, or (``full``)
    ``R (n^d, N)`` with ``R @ F`` the flattened full tensor: gamma gathered per entry."""
    groups, inverse = _gamma(n, d)
    N = len(inverse)
    G = torch.zeros(N, N, dtype=torch.float64)
    for rows, cols, vals in groups:
        g = len(rows)
        G[rows.repeat_interleave(cols.shape[1]), cols.reshape(-1)] = vals.repeat(g)
    return G[full_index(n, d)] if full else G


@functools.lru_cache(maxsize=32)
def interpolation_constants(
    n: int, d: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor | None, Tensor, list[tuple[Tensor, Tensor]] | None, Tensor | None]:
    """Everything :func:`symmetric_tensor` needs, built once per dtype/device: a dense
    reconstruction matrix (to the full tensor, or to the distinct partials), or else the
    gather index groups and their inverse permutation, and the full index.

    The engine calls this before tracing a propagation, so that these tensors enter the
    traced graph as constants instead of being rebuilt on every call.
    """
    idx = full_index(n, d).to(device)
    N = num_directions(n, d)
    if n**d * N <= _FULL_LIMIT or N * N <= _DENSE_LIMIT:
        dense = _dense(n, d, n**d * N <= _FULL_LIMIT)
        return dense.to(dtype=dtype, device=device), idx, None, None
    groups, inverse = _gamma(n, d)
    converted = [(cols.to(device), vals.to(dtype=dtype, device=device))
                 for _, cols, vals in groups]
    return None, idx, converted, inverse.to(device)


def symmetric_tensor(F: Tensor, n: int, d: int) -> Tensor:
    """The full derivative tensor ``(M, n, ..., n)`` from ``d``-th coefficients ``F (N, M)``.

    Small requests use one matrix product with a cached dense reconstruction matrix (one
    GEMM, batched well under ``vmap``), larger ones one product to the distinct partials and a
    gather; the largest gather the few non-zeros per row.
    """
    if d == 1:
        return F.t()
    R, idx, _, _ = interpolation_constants(n, d, F.dtype, F.device)
    if R is None:
        full = partials(F, n, d)[idx]  # (n^d, M)
    else:
        full = R @ F
        if full.shape[0] != idx.shape[0]:  # the distinct partials
            full = full[idx]
    return full.t().reshape((F.shape[1],) + (n,) * d)
