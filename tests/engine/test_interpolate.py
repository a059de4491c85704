"""The full symmetric tensor from univariate Taylor coefficients (NOTE [Interpolation of mixed
partials]), by each of its three reconstructions: the dense matrix to the full tensor, the
dense matrix to the distinct partials and a gather, and the gathered non-zeros per row."""

from __future__ import annotations

import math

import pytest
import torch

from tests._compare import assert_tree_close
from xafunc._engine import interpolate

F64 = torch.float64

# the limits that select each reconstruction: (_FULL_LIMIT, _DENSE_LIMIT)
TIERS = {"full": (1 << 60, 1 << 60), "partials": (0, 1 << 60), "gathered": (0, 0)}


@pytest.fixture
def tier(request, monkeypatch):
    full, dense = TIERS[request.param]
    monkeypatch.setattr(interpolate, "_FULL_LIMIT", full)
    monkeypatch.setattr(interpolate, "_DENSE_LIMIT", dense)
    interpolate.interpolation_constants.cache_clear()  # built under the default limits
    yield request.param
    interpolate.interpolation_constants.cache_clear()  # built under these limits


@pytest.mark.parametrize("tier", list(TIERS), indirect=True)
@pytest.mark.parametrize("n, d", [(1, 3), (3, 2), (8, 2), (16, 2), (5, 3), (12, 3), (4, 4)])
def test_each_reconstruction_recovers_a_symmetric_tensor(tier, n, d):
    """``F_j = T[j, ..., j] / d!`` along every direction ``j`` (the ``d``-th Taylor
    coefficient of ``x -> T[x, ..., x] / d!``) gives back ``T``, for ``M = 3`` functions,
    from each reconstruction and under ``vmap`` (the engine's batched graphs)."""
    g = torch.Generator().manual_seed(n * 10 + d)
    T = torch.randn((3,) + (n,) * d, generator=g, dtype=F64)
    T = sum(T.permute(0, *(1 + i for i in p)) for p in _perms(d)) / math.factorial(d)
    V = interpolate.directions(n, d, dtype=F64)
    F = T.reshape(3, -1) @ _powers(V, d).T / math.factorial(d)  # (3, N)
    assert_tree_close(interpolate.symmetric_tensor(F.T, n, d), T)
    batched = torch.func.vmap(lambda f: interpolate.symmetric_tensor(f, n, d))
    assert_tree_close(batched(torch.stack([F.T, 2 * F.T])), torch.stack([T, 2 * T]))
    R, _, groups, _ = interpolate.interpolation_constants(n, d, F64, torch.device("cpu"))
    rows = None if R is None else R.shape[0]
    assert {"full": rows == n**d or n == 1, "partials": rows == F.shape[1],
            "gathered": R is None and groups is not None}[tier]


def test_the_default_reads_the_full_matrix_only_while_it_is_small():
    """A Hessian in 8 inputs reads the (64, 36) matrix; a third derivative in 12 inputs the
    (364, 364) one, not the (1728, 364) one (reading which bounded its product)."""
    interpolate.interpolation_constants.cache_clear()
    assert interpolate.interpolation_constants(8, 2, F64, torch.device("cpu"))[0].shape == (64, 36)
    assert interpolate.interpolation_constants(12, 3, F64, torch.device("cpu"))[0].shape == \
        (364, 364)


def _perms(d: int) -> list[tuple[int, ...]]:
    import itertools

    return list(itertools.permutations(range(d)))


def _powers(V: torch.Tensor, d: int) -> torch.Tensor:
    """``(N, n^d)``: row ``k`` the flattened ``v_k x ... x v_k``."""
    out = V
    for _ in range(d - 1):
        out = (out.unsqueeze(-1) * V.unsqueeze(1)).reshape(V.shape[0], -1)
    return out
