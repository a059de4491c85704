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

# Operators whose rules are linear in the series they receive (those of :mod:`.linear`): they
# add no second or higher derivatives of their own (NOTE [Derivatives by adjoints]).
LINEAR: set[Any] = set()

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


def refuses(node: Any) -> bool:
    """Whether the node's rule declines these arguments (a rule's ``supports(node)``, checked
    at plan time: ``scatter_reduce`` with ``reduce="prod"``)."""
    rule = lookup(node.target)
    supports = getattr(rule, "supports", None)
    return supports is not None and not supports(node)


def _load() -> None:
    import torch

    from . import linear  # noqa: F401 - registers its rules first (see LINEAR)

    linear_rules = {op: RULES[op] for op in RULES}
    from . import bilinear, elementwise, reductions  # noqa: F401
    from .series import basis_linear

    LINEAR.update(op for op, rule in linear_rules.items() if RULES.get(op) is rule)

    aten = torch.ops.aten
    # rules linear in each coefficient and blind to the number of directions keep a
    # first-order basis (NOTE [First-order basis]); matrix products while one side is constant
    for op in (aten.view, aten.reshape, aten._unsafe_view, aten.squeeze, aten.unsqueeze,
               aten.alias, aten.clone, aten.contiguous, aten._reshape_alias, aten.flatten,
               aten.permute, aten.transpose, aten.t, aten.expand, aten.select, aten.slice,
               aten.sum, aten.mean, aten.neg, aten.add, aten.sub):
        RULES[op] = basis_linear(RULES[op])
    for op in (aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.mv, aten.addmv):
        RULES[op] = basis_linear(RULES[op], bilinear=True)


_load()
