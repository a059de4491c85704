"""First-order coefficients kept in the input basis (NOTE [First-order basis]).

A degree-``d`` Taylor level (``d >= 2``) along the ``N = C(n + d - 1, d)`` integer directions
carries its first coefficients as ``n`` rows in the unit basis wherever ``N >= 3 n``; rules
linear in each coefficient keep them there, products and elementwise functions keep ``c_1`` and
expand it for the higher coefficients, every other rule receives them expanded. Each test
forces the basis on (``BASIS_MIN_RATIO = 0``) or off, proves from the plan which ran, and
compares with nested ``torch.func.jacrev`` in float64, over functions that pass the basis
through every rule that keeps it, and through rules that must expand it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap

import xafunc
from tests._compare import assert_tree_close, reference_deriv
from xafunc._engine import program

F64 = torch.float64
BASIS = "NOTE [First-order basis]"


def _w(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * 0.5


W1, W2, W3 = _w(6, 4, seed=1), _w(6, 6, seed=2), _w(2, 6, seed=3)
B1 = _w(6, seed=4)


def _mlp(x):  # addmm, tanh, sigmoid, the product of two series, sum
    h = torch.tanh(F.linear(x, W1, B1))
    h = torch.sigmoid(h @ W2.T) * h
    return (W3 @ h).sum()


def _shapes(x):  # reshape, permute, transpose, expand, select, slice, mean, neg, sub, mv
    m = (x[:, None] * x[None, :].sin()).reshape(2, 8).permute(1, 0)
    h = torch.exp(-m.t().reshape(16)[:6]) - torch.mv(W2[:, :4], x).neg()
    return h.expand(3, 6).mean(0).pow(2).sum() + h[2] * h.select(0, 4)


def _expanding(x):  # rules without the basis: both sides of a matrix product, softmax's max
    a = torch.softmax(W1 @ x, 0)
    b = (x.reshape(2, 2) @ x.reshape(2, 2).cos()).reshape(4)
    return (a[:4] / (1.5 + b.tanh())).sum() + torch.dot(a, a)


def _division(x):  # division by a constant and by a series, the reciprocal, a normalisation
    h = torch.tanh(W1 @ x) / B1.abs().add(1)
    c = h - h.mean()
    n = c / torch.sqrt((c * c).mean() + 0.1)  # (torch's nested jacrev of layer_norm is wrong)
    return (n / (2 + h.sin())).sum() + torch.reciprocal(3 + x * x).prod()


def _bmm(x):  # bmm / baddbmm / addmv with a constant side
    h = torch.bmm(x.reshape(1, 1, 4).expand(3, 1, 4), W1[:4].T.expand(3, 4, 4))
    h = torch.baddbmm(h, h.tanh(), W2[:4, :4].expand(3, 4, 4))
    return torch.addmv(B1[:4], W2[:4, :4], h.sum((0, 1)).sin()).prod()


FUNCS = {"mlp": _mlp, "shapes": _shapes, "expanding": _expanding, "division": _division,
         "bmm": _bmm}


@pytest.fixture(params=[True, False], ids=["basis", "no-basis"])
def basis(request, monkeypatch):
    monkeypatch.setattr(program, "BASIS_MIN_RATIO", 0 if request.param else 10**9)
    # the Taylor schedules under test, not the third-order adjoint one (tests/engine/
    # test_adjoint.py runs these functions through that)
    monkeypatch.setattr(program, "adjoint_candidate", lambda *args: None)
    xafunc.clear_cache()
    yield request.param
    xafunc.clear_cache()


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("name", list(FUNCS))
def test_derivatives_with_and_without_the_basis(basis, name, order):
    f, x = FUNCS[name], torch.linspace(-0.7, 0.9, 4, dtype=F64)
    with xafunc.strict():
        got = xafunc.xderiv(f, order)(x)
        plan = xafunc.plan(f, order)(x)
    assert_tree_close(got, reference_deriv(f, order)(x))
    dense = "mixed" not in plan.schedule and plan.schedule.count("fwd") >= 2
    assert (BASIS in str(plan)) == (basis and dense), str(plan)


def test_under_vmap_and_chunked(basis):
    xs = torch.linspace(-1, 1, 12, dtype=F64).reshape(3, 4)
    with xafunc.strict():
        got = vmap(xafunc.xderiv(_mlp, 3))(xs)
        chunked = xafunc.xderiv(_mlp, 3, chunk_size=7)(xs[0])
    assert_tree_close(got, vmap(jacrev(jacrev(jacrev(_mlp))))(xs))
    assert_tree_close(chunked, got[0])


def test_the_default_keeps_the_basis_only_where_directions_outnumber_inputs(monkeypatch):
    """``C(n + 1, 2) >= 3 n`` from ``n = 5`` on: a Hessian of a 2-input function expands
    nothing (measured 2.2x slower in the basis), a third derivative in 8 inputs keeps it (on
    the Taylor schedule: the adjoint one, cheaper here, is left out)."""
    monkeypatch.setattr(program, "adjoint_candidate", lambda *args: None)
    assert not program.first_order_basis(2, 2) and not program.first_order_basis(4, 2)
    assert program.first_order_basis(5, 2) and program.first_order_basis(8, 2)
    assert not program.first_order_basis(8, 1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 1)).to(F64)
    f = lambda x: net(x).squeeze(-1)  # noqa: E731
    x = torch.linspace(-1, 1, 8, dtype=F64)
    with xafunc.strict():
        got = xafunc.xderiv(f, 3)(x)
        plan = xafunc.plan(f, 3)(x)
    assert plan.schedule == ("rev", "fwd", "fwd") and BASIS in str(plan)
    assert_tree_close(got, reference_deriv(f, 3)(x))
