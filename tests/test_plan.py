"""``xafunc.plan``: the printable Plan, its strategy / fallback, what it records."""

from __future__ import annotations

import pytest
import torch

import xafunc
from tests._compare import assert_tree_equal, clone_tree
from xafunc import Plan

F64 = torch.float64


def f2(x, y):
    return torch.tanh(x[:, None] * y).sum(0)  # (2,) from x (3,), y (2,)


X = torch.linspace(-0.5, 0.7, 3, dtype=F64)
Y = torch.tensor([0.4, -1.1], dtype=F64)


def check_consistent(p: Plan) -> None:
    assert isinstance(p, Plan)
    assert p.strategy in ("engine", "reference")
    s = str(p)
    assert isinstance(s, str) and p.strategy in s
    if p.strategy == "reference":
        assert isinstance(p.fallback, str) and p.fallback, "a fallback needs a reason"
        assert p.fallback in s, "the printed plan must show the fallback reason"
    else:
        assert p.fallback is None


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse", "reference"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_plan_records_request(order, mode):
    p = xafunc.plan(f2, order, argnums=(0, 1), mode=mode)(X, Y)
    check_consistent(p)
    assert p.order == order
    assert tuple(p.argnums) == (0, 1)
    assert p.in_numel == 5 and p.out_numel == 2
    assert p.result_numel == 2 * 5**order
    assert len(p.schedule) == order
    assert f"order {order}" in str(p)
    assert p.strategy == ("reference" if mode == "reference" else "engine")
    if mode == "forward":
        assert tuple(p.schedule) == ("fwd",) * order
    if mode == "reverse":
        assert tuple(p.schedule) == ("rev",) * order


def test_reference_mode_gives_reference_strategy():
    p = xafunc.plan(f2, 2, mode="reference")(X, Y)
    assert p.strategy == "reference"
    check_consistent(p)
    assert "reference" in str(p)


@pytest.mark.parametrize("argnums,normalised", [(-1, (1,)), (0, (0,)), ((-1, 0), (1, 0)),
                                                ((1,), (1,))])
def test_plan_normalises_argnums(argnums, normalised):
    p = xafunc.plan(f2, 2, argnums=argnums)(X, Y)
    assert tuple(p.argnums) == normalised
    assert str(normalised) in str(p) or str(list(normalised)) in str(p)


def test_plan_for_uncapturable_function_is_consistent():
    def branchy(x):
        if x.sum() > 0:
            return x.sin()
        return x.cos()

    p = xafunc.plan(branchy, 3)(X)
    check_consistent(p)
    assert p.strategy == "reference" and p.fallback.startswith("capture failed")
    assert p.out_numel is None and "m = ?" in str(p)


def test_plan_has_aux_dict_params_and_transform_name():
    params = {"w": torch.ones(2, 3, dtype=F64), "b": torch.zeros(2, dtype=F64)}

    def f(p, x):
        y = torch.tanh(p["w"] @ x + p["b"])
        return y.sum(), y

    p = xafunc.plan(f, 2, argnums=0, has_aux=True)(params, X)
    check_consistent(p)
    assert p.strategy == "engine" and p.transform == "xderiv"  # the plan xderiv runs
    assert p.in_numel == 8 and p.out_numel == 1 and p.result_numel == 64


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_plan_does_not_mutate_or_differentiate(mode):
    calls = []

    def f(x):
        calls.append(1)
        return x.sin()

    x = X.clone()
    before = clone_tree(x)
    p = xafunc.plan(f, 3, mode=mode)(x)
    assert_tree_equal(x, before)
    check_consistent(p)
    assert len(calls) <= 1, "plan traces func at most once and runs nothing"
    # ``calls`` is state ``f`` reads and changes: the capture would serve one call only
    # (NOTE [Python side effects])
    if mode == "auto":
        assert p.strategy == "engine" and "serves this call only" in str(p)
    else:
        assert p.strategy == "reference"


def test_timing_keeps_one_candidate_of_each_kind_and_the_plan_shows_the_kept_one(monkeypatch):
    """NOTE [Timing close candidates]: the order-3 Jacobian of a 24 -> 48 -> 48 -> 6 MLP has
    r=0, two mixed cuts estimated alike (after ``addmm`` and after its reshape) and r=1 within
    the timing factor; one mixed cut is timed, so r=1 is too. The schedule the timing keeps
    is the plan's ``schedule`` (here r=1, made the fastest), and the result is the oracle's."""
    from tests._compare import assert_tree_close, reference_deriv
    from xafunc._engine import program as P

    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(48, 24, generator=g, dtype=torch.float64) / 5,
          torch.randn(48, 48, generator=g, dtype=torch.float64) / 10,
          torch.randn(6, 48, generator=g, dtype=torch.float64) / 10]

    def f(x):
        h = torch.tanh(torch.nn.functional.linear(x, ws[0]))
        h = torch.tanh(torch.nn.functional.linear(h, ws[1]))
        return torch.nn.functional.linear(h, ws[2])

    timed: list[str] = []
    run = P.Program._run_schedule

    def slow_unless_reverse(self, s, z, others):
        timed.append(P._label(s))
        if s.reverse_levels == 0:
            import time
            time.sleep(0.02)  # every other schedule looks slower than r=1
        return run(self, s, z, others)

    monkeypatch.setattr(P.Program, "_run_schedule", slow_unless_reverse)
    # the Taylor and mixed candidates only: the adjoint one is estimated far cheaper
    monkeypatch.setattr(P, "adjoint_candidate", lambda *args: None)
    x = torch.randn(24, generator=g, dtype=torch.float64)
    t = xafunc.xderiv(f, 3)
    out = t(x)
    plan = xafunc.plan(f, 3)(x)
    # one mixed cut, run WARM_RUNS times untimed and TIMED_ROUNDS times timed
    assert timed.count("mixed") == P.WARM_RUNS + P.TIMED_ROUNDS, timed
    assert "rev/fwd/fwd" in timed, timed
    assert plan.schedule == ("rev", "fwd", "fwd"), str(plan)
    assert "kept rev/fwd/fwd" in str(plan)
    assert_tree_close(out, reference_deriv(f, 3)(x))
