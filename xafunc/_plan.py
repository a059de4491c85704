"""Plans: how a derivative request is computed, and why.

A :class:`Plan` is built once per call signature and cached by the transform. It records the
strategy (the engine or the nested torch.func reference), the schedule, estimated costs and
any fallback reason, and it runs the computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch.utils import _pytree as pytree

from . import _validate as V
from ._engine.memory import fmt_bytes
from ._reference import choose_levels, nested_derivative

if TYPE_CHECKING:
    from ._transforms import _Transform


@dataclass
class Plan:
    """A printable description of how one derivative request is computed.

    Attributes:
        transform: The public transform that built the plan (``"xderiv"``, ...).
        order: The derivative order.
        argnums: The differentiated positional arguments (normalised, non-negative).
        strategy: ``"engine"`` or ``"reference"`` (nested torch.func).
        schedule: The levels innermost first: ``"rev"`` for a reverse level, ``"fwd"`` for a
            forward (engine: Taylor) level.
        in_numel: Number of scalar inputs differentiated (``n``).
        out_numel: Number of scalar outputs (``m``).
        result_numel: Number of scalar entries in the result (``m * n^order``).
        est_flops: Estimated floating-point operations (engine only).
        est_peak_bytes: Estimated peak memory of the derivative computation (engine only).
        fallback: Why the engine was not used, or ``None``.
        details: Further lines: the candidate schedules and their estimated costs.
    """

    transform: str
    order: int
    argnums: tuple[int, ...]
    strategy: str
    schedule: tuple[str, ...]
    in_numel: int
    out_numel: int
    result_numel: int
    est_flops: float | None = None
    est_peak_bytes: float | None = None
    fallback: str | None = None
    details: list[str] = field(default_factory=list)
    cacheable: bool = True
    runner: Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = field(
        default=None, repr=False
    )

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        assert self.runner is not None
        return self.runner(args, kwargs)

    def __str__(self) -> str:
        sched = " -> ".join(self.schedule)
        lines = [
            f"xafunc plan: {self.transform} order {self.order}, argnums {self.argnums}",
            f"  n = {self.in_numel} inputs, m = {self.out_numel} outputs, result "
            f"{self.result_numel} entries",
            f"  strategy: {self.strategy} [{sched}] (innermost level first)",
        ]
        if self.est_flops is not None:
            lines.append(f"  estimated: {self.est_flops:.3g} FLOPs, peak "
                         f"{fmt_bytes(self.est_peak_bytes or 0)}")
        if self.fallback:
            lines.append(f"  fallback to nested torch.func: {self.fallback}")
        lines += [f"  {d}" for d in self.details]
        return "\n".join(lines)


def _numel(tree: Any) -> int:
    return sum(leaf.numel() for leaf in pytree.tree_leaves(tree))


_EXECUTION = ("execution: one compiled aten graph; constant parts cached, the rest run by "
              "TorchScript when no gradient or torch.func transform needs its history, "
              "else by FX")


def build_plan(
    t: _Transform, args: tuple[Any, ...], kwargs: dict[str, Any], argnums: tuple[int, ...]
) -> Plan:
    """Choose and prepare the computation for one call signature."""
    out = V.check_output(t.name, t.func(*args, **kwargs), t.has_aux)
    in_numel = sum(_numel(args[a]) for a in argnums)
    out_numel = _numel(out)
    result_numel = out_numel * in_numel**t.order
    common = dict(transform=t.name, order=t.order, argnums=argnums, in_numel=in_numel,
                  out_numel=out_numel, result_numel=result_numel)
    reason: str | None = "mode='reference' was requested"
    if t.mode != "reference":
        from ._engine.program import compile_program

        program, reason, schedules = compile_program(
            t.func, args, kwargs, argnums, isinstance(t.argnums, int), t.order, t.has_aux,
            t.mode, t.chunk_size, t.all_orders, t.name,
        )
        if program is not None:
            best = schedules[0]
            details = [] if program.chunk_size is None or program.chunk_size == t.chunk_size \
                else [f"directions processed {program.chunk_size} at a time to fit in memory"]
            details += [f"candidate {s.describe()}, peak {fmt_bytes(s.est_peak_bytes)}"
                        for s in schedules[:4]]
            if best.join is not None:
                details += ["join contractions (opt_einsum paths):"]
                details += [f"  {line}" for line in best.join.describe()]
            details.append(program.compile_note or _EXECUTION)
            return Plan(
                strategy="engine",
                schedule=(("mixed",) if best.cut is not None else ()) + best.levels,
                est_flops=best.est_flops, est_peak_bytes=best.est_peak_bytes,
                details=details, runner=program, **common,  # type: ignore[arg-type]
            )
    dtypes = {leaf.dtype for a in argnums for leaf in pytree.tree_leaves(args[a])}
    levels = choose_levels(t.order, "auto" if t.mode == "reference" else t.mode, out_numel,
                           in_numel, mixed_dtypes=len(dtypes) > 1)

    def run_reference(a: tuple[Any, ...], k: dict[str, Any]) -> Any:
        # torch.func transforms take positional arguments only: bind keywords first
        f = t.func if not k else (lambda *pos: t.func(*pos, **k))
        nested = nested_derivative(
            f, levels, argnums[0] if isinstance(t.argnums, int) else argnums,
            has_aux=t.has_aux, chunk_size=t.chunk_size, all_orders=t.all_orders,
        )
        return nested(*a)

    return Plan(
        strategy="reference", schedule=levels, fallback=reason, runner=run_reference,
        **common,  # type: ignore[arg-type]
    )
