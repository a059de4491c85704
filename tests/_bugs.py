"""Known bugs of xafunc, expected to fail *only where they apply*.

xafunc computes a request either with its engine or with nested torch.func (the "reference"
strategy), and which one it picks changes as the engine grows. A static
``pytest.mark.xfail(strict=True)`` would then flip between XFAIL and a strict XPASS failure for
reasons unrelated to the bug. Instead each known bug carries a predicate over the public
:func:`xafunc.plan` of the request, and :func:`expect_bug` runs the test body under it:

* predicate false: the body runs normally (a failure is a real failure);
* predicate true and the body fails with the bug's exception: the test is XFAIL;
* predicate true and the body passes: the test FAILS ("XPASS(strict)"), so a fixed bug gets its
  entry removed here -- the strict-xfail contract, evaluated per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

import xafunc


@dataclass(frozen=True)
class Bug:
    name: str
    reason: str
    applies: Callable[..., bool]  # (plan, argnums, kwargs) -> bool
    raises: tuple[type[BaseException], ...] = (AssertionError,)


def _fwd_below_outermost(plan: Any) -> bool:
    """A forward level with another level outside it: jacfwd(jacfwd(.)) or jacrev(jacfwd(.))."""
    return "fwd" in tuple(plan.schedule)[:-1]


FWD_OVER_NORM = Bug(
    "fwd-over-norm",
    "the reference strategy nests torch.func.jacfwd, and in torch 2.13 a forward level below "
    "another level (jacfwd(jacfwd(f)), e.g. mode='forward' order 2, mode='auto' order 3) gets "
    "native_layer_norm / native_batch_norm(training=True) wrong: the saved mean and rstd carry "
    "no second-level tangent. Nested jacrev is right. Repro: "
    "xderiv(lambda x: F.layer_norm(x, (4,)), 2, mode='forward')(torch.randn(4).double())",
    lambda plan, argnums, kwargs: plan.strategy == "reference" and _fwd_below_outermost(plan),
)

NEG_INT_ARGNUMS = Bug(
    "negative-int-argnums",
    "the reference strategy passes a negative int argnums unnormalised to nested "
    "torch.func.jacfwd, which then differentiates the wrong thing at order >= 2. Repro: "
    "xderiv(lambda x, y: (x * y).sin().sum(), 2, argnums=-1, mode='reference')(x, y) is all "
    "zeros; argnums=1 is not",
    lambda plan, argnums, kwargs: (plan.strategy == "reference" and isinstance(argnums, int)
                                   and argnums < 0 and plan.order >= 2
                                   and "fwd" in tuple(plan.schedule)),
)

KWARGS = Bug(
    "kwargs",
    "the reference strategy forwards keyword arguments into torch.func.jacrev/jacfwd "
    "wrappers, which accept positional arguments only. Repro: xderiv(lambda x, *, s: x * s, 1, "
    "mode='reference')(x, s=2.0) raises TypeError: level0() got an unexpected keyword argument",
    lambda plan, argnums, kwargs: plan.strategy == "reference" and bool(kwargs),
    raises=(TypeError,),
)

MIXED_DTYPE = Bug(
    "mixed-dtype",
    "with differentiated inputs of different dtypes, the reference strategy's jacfwd levels "
    "give a leaf the output's dtype where nested jacrev gives the dtype of the input "
    "differentiated by that level. Repro: xderiv(lambda x, y: (x.double().sin() * y).sum(), 2, "
    "argnums=(0, 1), mode='reference')(x_float32, y_float64)[0][1].dtype is float32; "
    "jacrev(jacrev(...)) gives float64",
    lambda plan, argnums, kwargs: plan.strategy == "reference" and "fwd" in tuple(plan.schedule),
)


def plan_of(func: Callable[..., Any], order: int, argnums: Any, args: tuple[Any, ...],
            kwargs: dict[str, Any] | None = None, **options: Any) -> Any:
    return xafunc.plan(func, order, argnums, **options)(*args, **(kwargs or {}))


@contextmanager
def expect_bug(bugs: list[Bug] | Bug, func: Callable[..., Any], order: int, argnums: Any,
               args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
               **options: Any) -> Iterator[None]:
    """Run the body; XFAIL if one of ``bugs`` applies to this request and the body fails."""
    bugs = [bugs] if isinstance(bugs, Bug) else bugs
    if not bugs:
        yield
        return
    p = plan_of(func, order, argnums, args, kwargs, **options)
    active = [b for b in bugs if b.applies(p, argnums, kwargs or {})]
    if not active:
        yield
        return
    raises = tuple(e for b in active for e in b.raises)
    try:
        yield
    except raises as exc:
        pytest.xfail(f"known xafunc bug [{', '.join(b.name for b in active)}] "
                     f"({type(exc).__name__}): {active[0].reason}")
    pytest.fail(f"XPASS(strict): known xafunc bug [{', '.join(b.name for b in active)}] no "
                f"longer reproduces for this request (strategy {p.strategy}, schedule "
                f"{p.schedule}); remove it from tests/_bugs.py. {active[0].reason}")
