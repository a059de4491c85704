"""Local Taylor rules, one per aten operator, by family.

A rule receives the operator's arguments with :class:`~xafunc._rules.series.Series` in place of
every tensor that depends on the differentiated inputs (constants stay plain tensors) and
returns the output as a Series (or a tuple/list of them for multi-output operators). Rules are
registered per ``OpOverload`` or per ``OpOverloadPacket`` (all overloads):

    @register(aten.tanh)
    def _tanh(x): ...

The families live in their own modules: :mod:`.linear` (ops linear in their tensor inputs),
:mod:`.bilinear` (products: mul, div, mm, convolution), :mod:`.elementwise` (unary functions
through Faà di Bruno) and :mod:`.reductions` (max, var, prod, norms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RULES: dict[Any, Callable[..., Any]] = {}

# Operators that never carry derivatives (comparisons, integer/index producers, factories):
# applied to primals, their output is a constant.
NONDIFF: set[Any] = set()


def register(*ops: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


def lookup(target: Any) -> Callable[..., Any] | None:
    rule = RULES.get(target)
    if rule is None and hasattr(target, "overloadpacket"):
        rule = RULES.get(target.overloadpacket)
    return rule


def is_nondiff(target: Any) -> bool:
    return target in NONDIFF or getattr(target, "overloadpacket", None) in NONDIFF


def has_rule(target: Any) -> bool:
    return lookup(target) is not None or is_nondiff(target)


def _load() -> None:
    from . import bilinear, elementwise, linear, reductions  # noqa: F401


_load()
