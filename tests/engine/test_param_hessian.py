"""Per-leaf direction blocks (NOTE [Blocked directions]): Hessians and Jacobians in several
differentiated leaves, seeded one leaf at a time, with the symmetric half of a Hessian
mirrored. Every case is compared in float64 with nested ``jacrev`` and asserts which schedule
the plan chose, so the tests prove the blocked path ran (or did not)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.func as tf
from torch import nn

import xafunc
from tests._compare import assert_tree_close, reference_deriv
from xafunc._engine.blocked import blocked_fraction, leaf_blocks
from xafunc._rules.bilinear import _mm
from xafunc._rules.linear import _split, _t
from xafunc._rules.series import Series, UnitSeed, materialize

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def _estimates_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    """No timing of close candidates on the first call (NOTE [Timing close candidates]): the
    estimates alone pick the schedule, so the path each test asserts is deterministic."""
    monkeypatch.setattr("xafunc._engine.program.TUNE_FACTOR", 1.0)
    xafunc.clear_cache()


def _mlp(widths: tuple[int, ...], bias: bool = True) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(F64)


def _loss_case(widths: tuple[int, ...], bias: bool = True, n_data: int = 7
               ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    m = _mlp(widths, bias)
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(n_data, widths[0], dtype=F64)
    y = torch.randn(n_data, widths[-1], dtype=F64)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((tf.functional_call(m, p, (x,)) - y) ** 2).mean()

    return loss, (params, x, y)


def _plan(f: Callable[..., Any], order: int, argnums: Any, args: tuple[Any, ...],
          **kw: Any) -> xafunc.Plan:
    return xafunc.plan(f, order, argnums=argnums, **kw)(*args)


def _blocked(p: xafunc.Plan) -> bool:
    """Did the plan run the per-leaf block schedule?"""
    return p.program is not None and p.program.schedules[0].blocks is not None


def _check(f: Callable[..., Any], order: int, argnums: Any, args: tuple[Any, ...],
           expect_blocked: bool | None = True, **kw: Any) -> xafunc.Plan:
    got = xafunc.xderiv(f, order, argnums=argnums, **kw)(*args)
    assert_tree_close(got, reference_deriv(f, order, argnums)(*args), **TOL)
    p = _plan(f, order, argnums, args, **kw)
    got_again = p.run(f, args, {}, ())  # the plan's program: cached graphs, same numbers
    assert_tree_close(got_again, got, **TOL)
    if expect_blocked is not None:
        assert _blocked(p) == expect_blocked, str(p)
    return p


# ------------------------------------------------------------------ Hessians in parameters
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mlp_loss_hessian_in_parameter_dict(bias):
    f, args = _loss_case((4, 16, 16, 1), bias, n_data=16)
    p = _check(f, 2, 0, args)
    text = str(p)
    assert "per-leaf blocks" in text and "symmetric" in text, text
    assert p.schedule == ("rev", "fwd")


def test_blocked_beats_unblocked_estimate_on_the_zoo_shapes():
    f, args = _loss_case((8, 48, 32, 1), n_data=64)
    p = _plan(f, 2, 0, args)
    assert _blocked(p), str(p)
    best, plain = p.program.schedules[0], next(
        s for s in p.program.schedules if s.blocks is None and s.levels == ("rev", "fwd"))
    assert best.est_flops < 0.6 * plain.est_flops, str(p)


def test_leaf_that_does_not_affect_the_output():
    f0, (params, x, y) = _loss_case((4, 16, 16, 1), n_data=16)
    params = dict(params, unused=torch.randn(2, 3, dtype=F64))

    def f(p, x, y):
        return f0({k: v for k, v in p.items() if k != "unused"}, x, y) + 0 * p["unused"].sum()

    _check(f, 2, 0, (params, x, y))

    def g(p, x, y):  # "unused" never reaches the output at all
        return f0({k: v for k, v in p.items() if k != "unused"}, x, y)

    got = xafunc.xhessian(g)(params, x, y)
    assert_tree_close(got, reference_deriv(g, 2, 0)(params, x, y), **TOL)
    assert float(got["unused"]["unused"].abs().sum()) == 0.0


def test_argnums_tuple_of_tensors():
    W1, b1 = torch.randn(24, 6, dtype=F64), torch.randn(24, dtype=F64)
    W2, x = torch.randn(16, 24, dtype=F64), torch.randn(20, 6, dtype=F64)

    def f(W1, b1, W2, x):
        return (torch.tanh(torch.tanh(x @ W1.t() + b1) @ W2.t()) ** 2).mean()

    _check(f, 2, (0, 1, 2), (W1, b1, W2, x))
    _check(f, 2, (2, 0), (W1, b1, W2, x))  # leaves in another order than the layers


def test_argnums_tuple_of_tensors_and_vector_output():
    W1, W2 = torch.randn(4, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    b, x = torch.randn(4, dtype=F64), torch.randn(5, 3, dtype=F64)

    def f(W1, b, W2, x):  # (5, 2) outputs: every output's Hessian is symmetric on its own
        return torch.tanh(torch.tanh(x @ W1.t() + b) @ W2.t())

    _check(f, 2, (0, 1, 2), (W1, b, W2, x), expect_blocked=None)
    _check(f, 2, (2, 0), (W1, b, W2, x), expect_blocked=None)


def test_scalar_and_matrix_leaves_interleaved():
    a, W, c = torch.tensor(0.7, dtype=F64), torch.randn(3, 4, dtype=F64), torch.randn(4,
                                                                                        dtype=F64)
    x = torch.randn(6, 3, dtype=F64)

    def f(a, W, c, x):
        h = torch.sin(a * x) @ W
        return (torch.tanh(h + c) ** 2).sum() + a * (W * W).sum()

    p = _check(f, 2, (0, 1, 2), (a, W, c, x), expect_blocked=None)
    assert p.result_numel == (1 + 12 + 4) ** 2


def test_forced_blocked_schedule_in_chunks_and_mirrors_exactly():
    f, args = _loss_case((4, 16, 16, 1), n_data=16)
    p = _plan(f, 2, 0, args, chunk_size=40)
    assert _blocked(p), str(p)
    got = p.run(f, args, {}, ())
    assert_tree_close(got, reference_deriv(f, 2, 0)(*args), **TOL)
    names = list(got)
    for i, a in enumerate(names):  # the mirrored half is the exact transpose
        for b in names[:i]:
            ga, gb = got[a][b], got[b][a]
            na, nb = args[0][a].dim(), args[0][b].dim()
            perm = list(range(nb, nb + na)) + list(range(nb))
            assert torch.equal(ga, gb.permute(perm)), (a, b)


def test_hessian_under_vmap_over_data():
    f, (params, x, y) = _loss_case((3, 5, 1), n_data=4)
    xs, ys = torch.randn(3, 4, 3, dtype=F64), torch.randn(3, 4, 1, dtype=F64)
    got = torch.vmap(xafunc.xhessian(f), in_dims=(None, 0, 0))(params, xs, ys)
    want = torch.vmap(reference_deriv(f, 2, 0), in_dims=(None, 0, 0))(params, xs, ys)
    assert_tree_close(got, want, **TOL)


def test_small_problems_stay_unblocked():
    """Per-operator overhead dominates small problems: blocks would multiply the operators."""
    f, args = _loss_case((3, 6, 5, 1))
    _check(f, 2, 0, args, expect_blocked=False)


def test_single_leaf_has_no_blocked_candidate():
    W, x = torch.randn(4, 3, dtype=F64), torch.randn(5, 3, dtype=F64)

    def f(W, x):
        return torch.tanh(x @ W.t()).pow(2).sum()

    p = _check(f, 2, 0, (W, x), expect_blocked=False)
    assert "per-leaf blocks" not in str(p)


# ------------------------------------------------------------------ first order, forward
def test_forward_jacobian_in_blocks():
    W1, W2 = torch.randn(6, 2, dtype=F64), torch.randn(40, 6, dtype=F64)
    x = torch.randn(3, 2, dtype=F64)

    def f(W1, W2, x):  # 120 outputs, 52 inputs: forward mode, W2 enters late
        return torch.tanh(torch.tanh(x @ W1.t()) @ W2.t())

    p = _check(f, 1, (0, 1), (W1, W2, x), mode="forward")
    assert "per-leaf blocks" in str(p) and "symmetric" not in str(p.program.schedules[0]
                                                                     .describe())


# ------------------------------------------------------------------ the cost model
def test_blocked_fraction_prunes_the_early_layers_of_late_seeds():
    f, args = _loss_case((3, 5, 4, 1))
    p = _plan(f, 2, 0, args)
    g1 = p.program.props[1].gm
    blocks = leaf_blocks(p.program.layout.in_shapes)
    (sym, extra), (plain, _) = (blocked_fraction(g1, blocks, True),
                                blocked_fraction(g1, blocks, False))
    assert 0 < sym < plain < 1 and extra > 0


# ------------------------------------------------------------------ the rules underneath
def test_split_keeps_a_unit_seed_in_its_leaf_and_zeros_elsewhere():
    z = torch.randn(10, dtype=F64)
    pieces = _split(Series(z, [UnitSeed(4, 3)]), [3, 5, 2])
    assert not isinstance(pieces[0], Series) and not isinstance(pieces[2], Series)
    seed = pieces[1].unit
    assert seed is not None and (seed.offset, seed.count) == (1, 3)
    straddling = _split(Series(z, [UnitSeed(2, 3)]), [3, 5, 2])  # materialised
    eye = torch.eye(10, dtype=F64)[2:5]
    for piece, want in zip(straddling, torch.split(eye, [3, 5, 2], 1)):
        assert torch.equal(piece.coeffs[0], want)


@pytest.mark.parametrize("side", ["left", "right"])
def test_transposed_unit_seed_products_match_dense(side):
    W = torch.randn(4, 3, dtype=F64)  # seeded; W.t() is (3, 4)
    c = torch.randn(5, 3, dtype=F64) if side == "right" else torch.randn(4, 6, dtype=F64)
    for off, count in ((0, 12), (5, 4)):
        wt = _t(Series(W, [UnitSeed(off, count)]))
        assert wt.unit is not None and wt.unit.transposed
        dense = materialize(wt)
        assert torch.equal(dense.coeffs[0],
                           torch.eye(12, dtype=F64)[off:off + count].reshape(count, 4, 3)
                           .transpose(1, 2))
        got = _mm(c, wt) if side == "right" else _mm(wt, c)
        want = torch.matmul(c, dense.coeffs[0]) if side == "right" else \
            torch.matmul(dense.coeffs[0], c)
        assert torch.equal(got.coeffs[0], want)
        back = _t(wt)  # transposing twice gives the plain seed back
        assert back.unit is not None and not back.unit.transposed
