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


def _engine(plan: Any) -> bool:
    return plan.strategy == "engine"


# History: the first suite run found four reference-strategy bugs (jacfwd below another level
# on layer_norm / batch_norm, unnormalised negative int argnums, keyword arguments, leaf
# dtypes with mixed-dtype inputs); all were fixed in d35aa24 and their entries removed. Then
# the engine: basic slices under a rev + Taylor schedule ("invalid size, possible overflow?")
# and stale plans after model.train()/eval(), both fixed in b5cab34; stale plans after a
# Python attribute read by func changes, fixed by keying plans on that state. The engine's
# layer_norm / batch_norm at order >= 3 was right: nested torch.func is wrong there (see
# NOTE [Oracle for the norms] in test_operators.py).

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
