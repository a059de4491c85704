"""Plans: how a derivative request is computed, and why.

A :class:`Plan` is built once per call signature and cached by the transform. It records the
strategy (the engine or the nested torch.func reference), the schedule, estimated costs and
any fallback reason, and it runs the computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch.utils import _pytree as pytree

from . import _validate as V
from ._reference import choose_levels, nested_derivative

if TYPE_CHECKING:
    from ._api import _Transform


@dataclass
class Plan:
    """A printable description of how one derivative request is computed.

    Attributes:
        transform: The public transform that built the plan (``"xderiv"``, ...).
        order: The derivative order.
        argnums: The differentiated positional arguments (normalised, non-negative).
        strategy: ``"engine"`` or ``"reference"`` (nested torch.func).
        schedule: For the reference, the nesting levels innermost first (``"rev"``/``"fwd"``).
        in_numel: Number of scalar inputs differentiated.
        out_numel: Number of scalar outputs.
        result_numel: Number of scalar entries in the result.
        fallback: Why the engine was not used, or ``None``.
        details: Free-form lines (segments, contraction paths, cost estimates).
    """

    transform: str
    order: int
    argnums: tuple[int, ...]
    strategy: str
    schedule: tuple[str, ...]
    in_numel: int
    out_numel: int
    result_numel: int
    fallback: str | None = None
    details: list[str] = field(default_factory=list)
    cacheable: bool = True
    runner: Callable[..., Any] | None = field(default=None, repr=False)

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        assert self.runner is not None
        return self.runner(*args, **kwargs)

    def __str__(self) -> str:
        lines = [
            f"xafunc plan: {self.transform} order {self.order}, argnums {self.argnums}",
            f"  inputs differentiated: {self.in_numel} scalars; outputs: {self.out_numel} "
            f"scalars; result: {self.result_numel} scalars",
            f"  strategy: {self.strategy}"
            + (f" ({' -> '.join(self.schedule)}, innermost first)" if self.schedule else ""),
        ]
        if self.fallback:
            lines.append(f"  fallback: {self.fallback}")
        lines += [f"  {d}" for d in self.details]
        return "\n".join(lines)


def _numel(tree: Any) -> int:
    return sum(leaf.numel() for leaf in pytree.tree_leaves(tree))


def build_plan(
    t: _Transform, args: tuple[Any, ...], kwargs: dict[str, Any], argnums: tuple[int, ...]
) -> Plan:
    """Choose and prepare the computation for one call signature."""
    out = V.check_output(t.name, t.func(*args, **kwargs), t.has_aux)
    in_numel = sum(_numel(args[a]) for a in argnums)
    out_numel = _numel(out)
    result_numel = out_numel * sum(in_numel**k for k in range(1, t.order + 1)) if t.all_orders \
        else out_numel * in_numel**t.order
    reason = "the derivative engine is not available for this request"
    levels = choose_levels(t.order, "auto" if t.mode == "reference" else t.mode, out_numel,
                           in_numel)
    argnums_arg = t.argnums if isinstance(t.argnums, int) else argnums
    runner = nested_derivative(
        t.func, levels, argnums_arg, has_aux=t.has_aux, chunk_size=t.chunk_size,
        all_orders=t.all_orders,
    )
    details = [f"estimated result size: {result_numel * _itemsize(out)} bytes"]
    return Plan(
        transform=t.name, order=t.order, argnums=argnums, strategy="reference",
        schedule=levels, in_numel=in_numel, out_numel=out_numel, result_numel=result_numel,
        fallback=None if t.mode == "reference" else reason, details=details, runner=runner,
    )


def _itemsize(tree: Any) -> int:
    leaves = pytree.tree_leaves(tree)
    return max((leaf.element_size() for leaf in leaves), default=4)


_ = math
