"""Checking inductor's code against the eager graph before it is used.

NOTE [Checked compiles]
``compile=True`` hands a derivative graph to inductor, whose code is not the eager kernels:
it fuses, reorders sums, uses its own math functions, and has had silent bugs on exactly the
graphs derivatives produce (torch 2.13 compiles ``add(mm(a, b), x, alpha=16)`` as ``mm(a, b) +
x``; on two threads its scatter-adds index out of bounds: NOTE [Inductor executor]). xafunc
works around those it knows, and checks the rest: right after compiling, the code runs once on
the call's own inputs and the graph runs once eagerly (its aten kernels, the ops the other
executors run); for calls recorded by autograd, forward and backward both run, the backward on
fixed pseudo-random cotangents (a private generator: the caller's random stream is untouched).
Where the two disagree beyond rounding the compiled code is dropped and the reason is kept in
the plan's ``execution`` line; the call runs TorchScript, as after a failed compile.

Rounding: inductor's sums and transcendental functions round differently, and a derivative
graph's cancellations amplify that, so each output may differ from the eager one by
``RTOL[dtype]`` times the largest finite magnitude among all the outputs of its dtype (1e-3
for float32, 1e-7 for float64, 5e-2 for 16-bit floats): far above rounding, far below the
bugs above (a dropped ``alpha`` was off by the whole term; the scatter bug by 20-50 %). Non-
finite entries must match exactly (NaN for NaN, an infinity of the same sign), integer and
boolean outputs exactly. A graph with random ops is not checked: the two runs would draw
different numbers (and the check would advance the caller's generator).

The check costs one eager run (and backward) per compile, against seconds of compiling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx import Graph

from .backward import differentiable

#: the largest difference allowed between compiled and eager outputs, relative to the largest
#: finite magnitude among all outputs of the dtype
RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-7, torch.complex128: 1e-7,
    torch.float32: 1e-3, torch.complex64: 1e-3,
    torch.float16: 5e-2, torch.bfloat16: 5e-2, torch.complex32: 5e-2,
}


class CompiledCodeDisagrees(RuntimeError):
    """Inductor's code gave other values than the eager graph (NOTE [Checked compiles])."""


def random_ops(graph: Graph) -> bool:
    """Whether ``graph`` draws random numbers."""
    return any(isinstance(n.target, torch._ops.OpOverload)
               and torch.Tag.nondeterministic_seeded in n.target.tags for n in graph.nodes)


def _largest(t: Tensor) -> float:
    finite = t[torch.isfinite(t)] if t.numel() else t
    return float(finite.abs().max()) if finite.numel() else 0.0


def disagreement(got: Sequence[Any], want: Sequence[Any],
                 names: Sequence[str] | None = None) -> str | None:
    """Where the compiled outputs ``got`` differ from the eager ``want`` beyond rounding
    (NOTE [Checked compiles]), in words (``names``: of each value, ``output i`` by default),
    or None where they agree."""
    if len(got) != len(want):
        return f"{len(got)} outputs where the eager graph gives {len(want)}"
    scale: dict[torch.dtype, float] = {}
    for e in want:
        if differentiable(e):
            scale[e.dtype] = max(scale.get(e.dtype, 0.0), _largest(e))
    for i, (a, e) in enumerate(zip(got, want)):
        name = names[i] if names is not None else f"output {i}"
        if not isinstance(e, Tensor):
            if a != e:
                return f"{name} is {a!r}, not {e!r}"
            continue
        if not isinstance(a, Tensor) or a.shape != e.shape or a.dtype != e.dtype:
            what = (f"{tuple(a.shape)} {a.dtype}" if isinstance(a, Tensor)
                    else type(a).__name__)
            return f"{name} is {what}, not {tuple(e.shape)} {e.dtype}"
        a = a.to(e.device)
        if not differentiable(e):
            if not torch.equal(a, e):
                return f"{name} ({e.dtype}) differs"
            continue
        finite = torch.isfinite(e)
        same_nonfinite = (a.isnan() == e.isnan()) & (finite | e.isnan() | (a == e))
        if not bool((torch.isfinite(a) == finite).all()) or not bool(same_nonfinite.all()):
            return f"{name} is not finite where the eager graph's is, or the reverse"
        if not e.numel():
            continue
        off = float((a - e).abs()[finite].max()) if bool(finite.any()) else 0.0
        allowed = RTOL.get(e.dtype, 1e-3) * scale[e.dtype]
        if off > allowed:
            return (f"{name} is off by {off:.3g} where the largest {e.dtype} output is "
                    f"{scale[e.dtype]:.3g} (rounding may account for {allowed:.2g})")
    return None


def trained_disagreement(compiled: Callable[..., Any], eager: Callable[..., Any],
                         args: Sequence[Any]) -> str | None:
    """Where ``compiled`` (inductor's forward, whose outputs carry its backward) and ``eager``
    (the graph, flat outputs) differ on ``args`` -- outputs, then the gradients of the inputs
    that require grad for fixed pseudo-random cotangents -- or None (NOTE [Checked
    compiles])."""
    gen = torch.Generator().manual_seed(0)
    cotangents: list[Tensor | None] = []

    def run(fn: Callable[..., Any]) -> list[Any]:
        inner = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a
                 for a in args]
        wrt = [t for t in inner if isinstance(t, Tensor) and t.requires_grad]
        with torch.enable_grad():
            outs = list(fn(*inner))
        if not cotangents:
            cotangents.extend(
                torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)
                if differentiable(o) else None for o in outs)
        pairs = [(o, c) for o, c in zip(outs, cotangents)
                 if c is not None and isinstance(o, Tensor) and o.requires_grad]
        grads: Sequence[Tensor | None] = [None] * len(wrt)
        if pairs and wrt:
            # retain_graph, as ``_Trained.backward`` runs it: inductor compiles the backward
            # code on its first run, donating buffers to it if that run frees the graph
            grads = torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs],
                                        allow_unused=True, retain_graph=True)
        names[:] = [f"output {i}" for i in range(len(outs))] + [
            f"the gradient of input {i}" for i, a in enumerate(args)
            if isinstance(a, Tensor) and a.requires_grad]
        return [o.detach() if isinstance(o, Tensor) else o for o in outs] + [
            torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]

    names: list[str] = []
    want = run(eager)
    return disagreement(run(compiled), want, names)
