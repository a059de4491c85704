"""Plans: how one request is computed on one capture, and why.

A :class:`Plan` is built once per (capture, request) and cached on the capture's cache entry
(NOTE [The capture cache]). It records the strategy (the engine or the nested torch.func
reference), the schedule, estimated costs and any fallback reason, and it runs the
computation. Under :func:`strict` (or ``XAFUNC_STRICT=1``) a fallback the user did not ask for
raises :class:`FallbackError` instead of running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._capture.cache import Entry
from ._capture.request import Request, Split, arg_tensors, write_back
from ._capture.trace import TensorMeta, capturing
from ._engine.memory import fmt_bytes
from ._reference import choose_levels, nested_derivative, reference_mode, run_nested
from ._validate import check_diff_args, normalize_argnums


class FallbackError(RuntimeError):
    """Raised under :func:`xafunc.strict` when a request would fall back to the reference."""


_STRICT = threading.local()


def strict_active() -> bool:
    level = getattr(_STRICT, "level", None)
    if level is None:
        return os.environ.get("XAFUNC_STRICT", "") not in ("", "0")
    return level > 0


@contextlib.contextmanager
def strict(enabled: bool = True) -> Iterator[None]:
    """Within this context, a fallback to the reference strategy raises instead of running.

    Every transform runs its request with the engine when it can and falls back to nested
    torch.func (the *reference*) otherwise, with the reason in the plan. ``strict()`` turns such
    a fallback into a :class:`FallbackError` naming the reason -- for tests that must prove the
    engine ran, or code that would rather fail than run slowly. ``mode="reference"`` is never
    an error. The environment variable ``XAFUNC_STRICT=1`` turns it on for a whole process;
    ``strict(False)`` turns it off inside.

    Example:
        >>> import torch, xafunc
        >>> with xafunc.strict():
        ...     xafunc.xhessian(lambda x: x.sin().sum())(torch.zeros(2)).shape
        torch.Size([2, 2])
    """
    previous = getattr(_STRICT, "level", None)
    _STRICT.level = 1 if enabled else 0
    try:
        yield
    finally:
        _STRICT.level = previous


Runner = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any], tuple[Tensor, ...]], Any]


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
        out_numel: Number of scalar outputs (``m``); ``None`` when the function could not be
            captured (it is only known by running it).
        result_numel: Number of scalar entries in the result (``m * n^order``), or ``None``.
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
    out_numel: int | None
    result_numel: int | None
    est_flops: float | None = None
    est_peak_bytes: float | None = None
    fallback: str | None = None
    details: list[str] = field(default_factory=list)
    runner: Runner | None = field(default=None, repr=False)
    program: Any = field(default=None, repr=False)  # the engine's Program, if it runs

    @property
    def execution(self) -> str | None:
        """What runs the engine's compiled graph (``"inductor (compile=True), compiled in
        1.2 s"``, ``"one compiled aten graph run by TorchScript; ..."``), or None when the
        engine does not run. It describes the last call: with ``compile=True`` the graph is
        compiled on the first call without gradient recording or torch.func transform."""
        if self.program is None:
            return None
        text: str = self.program.execution()
        return text.removeprefix("execution: ")

    def choose(self, s: Any) -> None:
        """Show the engine's schedule ``s`` (a ``Schedule``) as this plan's."""
        self.schedule = ((s.kind,) if s.kind else ()) + s.levels
        self.est_flops, self.est_peak_bytes = s.est_flops, s.est_peak_bytes

    def run(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
            lifted: tuple[Tensor, ...]) -> Any:
        assert self.runner is not None
        return self.runner(func, args, kwargs, lifted)

    def __str__(self) -> str:
        sched = " -> ".join(self.schedule)
        m = "?" if self.out_numel is None else self.out_numel
        size = "?" if self.result_numel is None else self.result_numel
        lines = [
            f"xafunc plan: {self.transform} order {self.order}, argnums {self.argnums}",
            f"  n = {self.in_numel} inputs, m = {m} outputs, result {size} entries",
            f"  strategy: {self.strategy} [{sched}] (innermost level first)",
        ]
        if self.est_flops is not None:
            lines.append(f"  estimated: {self.est_flops:.3g} FLOPs, peak "
                         f"{fmt_bytes(self.est_peak_bytes or 0)}")
        if self.fallback:
            lines.append(f"  fallback to nested torch.func: {self.fallback}")
        lines += [f"  {d}" for d in self.details]
        if self.program is not None:
            lines.append(f"  {self.program.execution()}")
            lines += [f"  {d}" for d in self.program.notes]
        return "\n".join(lines)


def build_plan(req: Request, entry: Entry, args: tuple[Any, ...], kwargs: dict[str, Any],
               lifted: tuple[Tensor, ...], name: str | None = None) -> Plan:
    """Choose and prepare the computation of ``req`` for one capture (validates the call;
    errors are reported under ``name``, the public transform called)."""
    plan = _build_plan(req, entry, args, kwargs, lifted, name or req.transform)
    if entry.changed_state is not None and entry.captured.graph is not None:
        plan.details.append(
            f"tracing changed Python state the function reads ({entry.changed_state}): this "
            "capture serves this call only (NOTE [Python side effects])")
    return plan


def _build_plan(req: Request, entry: Entry, args: tuple[Any, ...], kwargs: dict[str, Any],
                lifted: tuple[Tensor, ...], name: str) -> Plan:
    argnums = normalize_argnums(name, req.argnums, len(args))
    check_diff_args(name, args, argnums)
    in_numel = sum(leaf.numel() for a in argnums for leaf in pytree.tree_leaves(args[a]))
    cap = entry.captured
    if cap.graph is None:  # not captured: the reference runs the function itself
        return _reference_plan(req, argnums, in_numel, None, cap.reason or "not captured",
                               None)
    if cap.level_local and (req.order > 1 or req.all_orders):
        return _reference_plan(req, argnums, in_numel, None, level_local_reason(cap), None)
    split = Split(name, cap, args, kwargs, argnums, req.int_argnums, req.has_aux)
    m = split.layout.m
    common = dict(transform=req.transform, order=req.order, argnums=argnums, in_numel=in_numel,
                  out_numel=m, result_numel=m * in_numel ** req.order)
    if in_numel == 0 or m == 0:
        return Plan(strategy="engine", schedule=(), details=["empty result: nothing to compute"],
                    runner=_empty_runner(req, split), **common)  # type: ignore[arg-type]
    dtypes = {(leaf.dtype, leaf.device) for a in argnums
              for leaf in pytree.tree_leaves(args[a])}
    reason: str | None = "mode='reference' was requested"
    if req.mode != "reference" and len(dtypes) > 1:
        reason = ("differentiated inputs mix dtypes/devices "
                  f"({', '.join(sorted(f'{d}@{v}' for d, v in dtypes))}); the engine "
                  "concatenates them into one vector")
    elif req.mode != "reference":
        from ._engine.program import compile_program, first_order_basis

        z, others = _examples(split, args, kwargs, lifted)
        program, reason, schedules = compile_program(req, split, z, others,
                                                         split.n_static(len(lifted)), name)
        if program is not None:
            best = schedules[0]
            details = [] if program.chunk_size is None or program.chunk_size == req.chunk_size \
                else [f"directions processed {program.chunk_size} at a time to fit in memory"]
            if best.blocks is not None:
                details.append(
                    f"directions seeded one differentiated leaf at a time ({len(best.blocks)} "
                    "per-leaf blocks: a block skips every node its leaf does not reach"
                    + ("; Hessian symmetry: block a computes gradient blocks b >= a only, the "
                       "rest are mirrored" if best.symmetric else "")
                    + "; NOTE [Blocked directions])")
            if not best.kind and best.blocks is None \
                    and first_order_basis(in_numel, best.forward_degree):
                details.append(
                    f"first-order coefficients carried in the {in_numel} input directions, "
                    f"not the {best.directions} Taylor directions (NOTE [First-order basis])")
            details += [f"candidate {s.describe()}, peak {fmt_bytes(s.est_peak_bytes)}"
                        for s in schedules[:4]]
            if best.join is not None:
                details += ["join contractions (opt_einsum paths):"]
                details += [f"  {line}" for line in best.join.describe()]

            # NOTE [Non-finite results]: where the result may hold an infinity, the call
            # whose result does is answered by nested jacrev instead
            singular = _may_be_non_finite(cap.graph, split.diff)
            exact = None
            if singular is not None and cap.prologue is None and not cap.mutated:
                exact = _reference_plan(dataclasses.replace(req, mode="reverse"), argnums,
                                        in_numel, m, "a non-finite result", split,
                                        checked=False)
                details.append(f"a call whose result holds a NaN or an infinity ({singular} "
                               "can make one) is answered by nested jacrev, which places them "
                               "as torch.func does (NOTE [Non-finite results])")

            def run_engine(func: Any, a: tuple[Any, ...], k: dict[str, Any],
                           lift: tuple[Tensor, ...]) -> Any:
                out = program(a, k, lift)
                if exact is not None and not all_finite(out):
                    return exact.run(func, a, k, lift)
                return out

            plan = Plan(strategy="engine", schedule=(), details=details, runner=run_engine,
                        program=program, **common)  # type: ignore[arg-type]
            plan.choose(best)
            program.on_choose = plan.choose  # the schedule timing keeps on the first call
            return plan
    return _reference_plan(req, argnums, in_numel, m, reason, split)


# NOTE [Non-finite results]
# Where a derivative is infinite -- ``sqrt``, ``log``, ``1 / x`` at 0 -- the strategies
# place the IEEE special values differently: forward mode multiplies the infinite factor by
# the zero tangents of the other directions, ``inf * 0 = nan``, and a sum then spreads the
# NaN over entries that are finite. The gradient of ``sqrt(x).sum()`` at ``x = (0, 1, 4)``
# is ``(inf, 0.5, 0.25)`` by nested ``jacrev`` and was ``(inf, nan, nan)`` by forward mode
# (``jacfwd``'s answer too). The contract is nested ``jacrev``'s result, so a call whose
# result holds a NaN or an infinity is answered by nested ``jacrev`` of the captured graph
# instead. The check is one sum per result leaf (``sum`` is finite exactly when every entry
# is, short of an overflow of the sum, which only costs the slower path): 2.5 us for a 64
# KiB result alone, 46 us for 4 MiB, but 15-35 us after a 0.3-0.5 ms call (even an
# unrelated tiny sum costs 9 us there), 5-10% of a message-passing Jacobian. So it runs only
# where the captured function applies, to values that depend on the differentiated inputs,
# an operator outside ``_FINITE_OPS`` -- where finite inputs give finite values and
# derivatives of every order short of overflow: a division by such a value, ``sqrt``,
# ``log``, a fractional power, ``atan2`` have infinite values or slopes at finite points;
# ``exp`` only past overflow, like ``mul``; a division by a constant is infinite only where
# its value is. Tanh, sine, ReLU and exponential networks, and a mean aggregation dividing
# by node degrees, pay nothing. An overflow is not checked (``exp(800.)`` in a result spreads
# NaN as before). Not checked either: results on other devices than the CPU (the check
# would wait for the device), under dispatch modes and tracers, functions that draw random
# numbers or update buffers (a second evaluation would draw or update again), and the
# Taylor operators.
_FINITE_OPS = frozenset(getattr(torch.ops.aten, name).default if "." not in name else
                        getattr(getattr(torch.ops.aten, name.split(".")[0]), name.split(".")[1])
                        for name in (
    "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "rsub.Tensor",
    "mul.Tensor", "mul.Scalar", "neg", "addcmul", "mm", "bmm", "addmm", "addmv", "mv", "dot",
    "baddbmm", "sum.dim_IntList", "sum", "mean.dim", "mean", "cumsum", "view", "reshape",
    "_unsafe_view", "permute", "transpose.int", "t", "expand", "squeeze.dim", "squeeze.dims",
    "squeeze", "unsqueeze", "slice.Tensor", "select.int", "cat", "stack", "split.Tensor",
    "split_with_sizes", "clone", "alias", "flip", "roll", "index_select", "gather",
    "index.Tensor", "diagonal", "unbind.int", "narrow", "repeat", "detach", "_to_copy",
    "zeros", "ones", "full", "empty.memory_format", "arange.start_step", "arange",
    "scalar_tensor", "zeros_like", "ones_like", "full_like", "empty_like", "where.self",
    "masked_fill.Scalar", "clamp", "clamp_min", "clamp_max", "relu", "tanh", "sin", "cos",
    "sigmoid", "gelu", "silu", "leaky_relu", "hardtanh", "abs", "sign", "maximum", "minimum",
    "amax", "amin", "max.dim", "min.dim", "erf", "convolution", "embedding", "copy",
    "_softmax", "constant_pad_nd", "tanh_backward", "sigmoid_backward", "lift_fresh_copy",
    "index_put", "index_add", "scatter_add", "scatter.src", "var_mean.correction", "exp",
    "expm1", "exp2", "sinh", "cosh", "softplus", "elu", "celu", "_log_softmax", "logsumexp",
)) | {operator.getitem}


def _may_be_non_finite(gm: Any, diff: list[int]) -> str | None:
    """The first operator of the captured graph ``gm`` that can make an infinite derivative
    with respect to its inputs at ``diff`` (placeholder indices) where the values are finite,
    or None (see NOTE [Non-finite results]). Operators on values that do not depend on those
    inputs are never differentiated, and a division only where its divisor depends on them:
    ``a / c`` by a constant ``c`` is infinite where its derivative is."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    varying = {placeholders[i] for i in diff}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not any(a in varying for a in node.all_input_nodes):
            continue
        varying.add(node)
        if node.target in _FINITE_OPS:
            continue
        if node.target is torch.ops.aten.div.Tensor and node.args[1] not in varying:
            continue
        e = node.args[1] if node.target is torch.ops.aten.pow.Tensor_Scalar else None
        if isinstance(e, (int, float)) and not isinstance(e, bool) and e >= 1 and e == int(e):
            continue  # x ** k for a whole k >= 1
        return str(node.target).removeprefix("aten.").removesuffix(".default")
    return None


def all_finite(out: Any) -> bool:
    """Whether every floating tensor of ``out`` that can be checked without waiting for a
    device or entering a mode holds finite values only (NOTE [Non-finite results])."""
    if torch._C._len_torch_dispatch_stack():
        return True
    fx = torch._C._functorch
    for leaf in pytree.tree_leaves(out):
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
            continue
        base = leaf
        while fx.is_functorch_wrapped_tensor(base):
            base = fx.get_unwrapped(base)
        if type(base) is not Tensor or base.device.type != "cpu" or not base.numel():
            continue
        with torch._C._DisableFuncTorch(), torch.no_grad():
            if not math.isfinite(base.sum().item()):
                return False
    return True


def _examples(split: Split, args: tuple[Any, ...], kwargs: dict[str, Any],
              lifted: tuple[Tensor, ...]) -> tuple[Tensor, list[Any]]:
    """Example inputs for tracing, drawing no random numbers (random values by shape only)."""
    tensors = arg_tensors(args, kwargs)
    z = torch.cat([tensors[i].reshape(-1) for i in split.diff]) if len(split.diff) > 1 \
        else tensors[split.diff[0]].reshape(-1)
    cap = split.cap
    random: list[Any] = []
    if cap.prologue is not None:
        out_node = next(n for n in cap.prologue.graph.nodes if n.op == "output")
        for node in out_node.args[0]:
            v = node.meta["val"]
            random.append(TensorMeta(tuple(v.shape), v.dtype, v.device))
    return z, split.others(tensors, random, lifted)


def _empty_runner(req: Request, split: Split) -> Runner:
    """Zero-size inputs or outputs: the empty tensors jacrev returns, computed without the
    engine (the primal still runs, for aux and buffer updates)."""
    lay, dtype = split.layout, split.in_dtype

    def nest(shape: tuple[int, ...], level: int, k: int, like: Tensor) -> Any:
        if level == k:
            return like.new_zeros(shape, dtype=dtype if k else like.dtype)
        return pytree.tree_unflatten([nest(shape + s, level + 1, k, like)
                                      for s in lay.in_shapes], lay.in_spec)

    def run(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
            lifted: tuple[Tensor, ...]) -> Any:
        z, others, targets = split.inputs(args, kwargs, lifted)
        y, rest = split.flat_function()(z, *others)
        aux_leaves, mutations = split.split_aux(rest)

        def deriv(k: int) -> Any:
            return pytree.tree_unflatten([nest(shape, 0, k, y) for shape in lay.out_shapes],
                                         lay.out_spec)

        if req.all_orders:
            offset, ys = 0, []
            for shape in lay.out_shapes:
                size = math.prod(shape)
                ys.append(y[offset:offset + size].reshape(shape))
                offset += size
            value: Any = (pytree.tree_unflatten(ys, lay.out_spec),) + tuple(
                deriv(k) for k in range(1, req.order + 1))
        else:
            value = deriv(req.order)
        write_back(targets, mutations)
        if req.has_aux:
            return value, pytree.tree_unflatten(aux_leaves, lay.aux_spec)
        return value

    return run


def level_local_reason(cap: Any) -> str:
    return (f"it uses {cap.level_local}, which nested torch.func detaches at the innermost "
            "level only (unlike .detach()); the function itself is differentiated")


def fallback_allowed(name: str, reason: str | None) -> None:
    """Raise :class:`FallbackError` under :func:`strict`: the engine cannot run a request
    (except inside a capture, where the outer graph records the reference and the outer
    transform's engine runs it)."""
    if strict_active() and not capturing():
        raise FallbackError(f"{name}: the engine cannot run this request and strict mode "
                            f"forbids the fallback to nested torch.func: {reason}")


def strict_checked(name: str, reason: str | None, run: Callable[..., Any]) -> Callable[..., Any]:
    """``run``, refusing (on every call, cached or not) while :func:`strict` is active."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        fallback_allowed(name, reason)
        return run(*args, **kwargs)

    return checked


def empty_vmap_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``vmap`` batches a tensor argument over zero samples (at any of its levels).
    The engine's programs flatten and reshape per sample, which an empty batch leaves
    ambiguous; nested torch.func returns the empty result, so such a call runs it."""
    if not torch._C._are_functorch_transforms_active():
        return False
    fx = torch._C._functorch
    for t in arg_tensors(args, kwargs):
        while isinstance(t, Tensor) and fx.is_batchedtensor(t):
            inner = fx.get_unwrapped(t)
            if inner.shape[fx.maybe_get_bdim(t)] == 0:
                return True
            t = inner
    return False


def empty_batch_plan(req: Request, args: tuple[Any, ...], name: str) -> Plan:
    """The plan of a call that ``vmap`` batches over zero samples (:func:`empty_vmap_batch`):
    nested torch.func on the function itself, allowed under :func:`strict` (the engine has
    nothing to compute)."""
    argnums = normalize_argnums(name, req.argnums, len(args))
    in_numel = sum(leaf.numel() for a in argnums for leaf in pytree.tree_leaves(args[a]))
    return _reference_plan(req, argnums, in_numel, None, "vmap over an empty batch: nested "
                           "torch.func gives its empty result", None, checked=False)


def _reference_plan(req: Request, argnums: tuple[int, ...], in_numel: int, m: int | None,
                    reason: str | None, split: Split | None, checked: bool = True) -> Plan:
    """Nested torch.func on the captured graph (or on ``func`` when there is none); refused
    under :func:`strict` unless requested (``mode="reference"``) or not ``checked``."""
    explicit = req.mode == "reference"
    # the function itself: nested jacrev exactly (a forward level would differentiate through
    # torch.no_grad blocks, which forward-mode AD ignores)
    levels = choose_levels(req.order, "auto" if explicit else req.mode, m, in_numel) \
        if split is not None else ("rev",) * req.order
    argspec = argnums[0] if req.int_argnums else argnums
    state: dict[str, tuple[str, ...]] = {"levels": levels}
    plan = Plan(transform=req.transform, order=req.order, argnums=argnums,
                strategy="reference", schedule=levels, in_numel=in_numel, out_numel=m,
                result_numel=None if m is None else m * in_numel ** req.order,
                fallback=reason)
    plan.details.append("differentiates " + ("the captured (decomposed) graph"
                                              if split is not None else
                                              "the function itself (normalisation layers as "
                                              "their formulas)"))

    def run(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
            lifted: tuple[Tensor, ...]) -> Any:
        if split is not None:
            g, targets = _graph_function(split, args, kwargs, lifted)
            has_aux = True
        else:
            def g(*pos: Any) -> Any:
                return func(*pos, **kwargs)
            targets, has_aux = None, req.has_aux

        def make(lv: tuple[str, ...]) -> Callable[..., Any]:
            return nested_derivative(g, lv, argspec, has_aux=has_aux,
                                     chunk_size=req.chunk_size, all_orders=req.all_orders)

        # nested jacrev of the norms is right to order 2
        with reference_mode(safe_norms=split is None and req.order >= 3):
            out, ran = run_nested(make, state["levels"], args)
        if ran != state["levels"]:
            state["levels"] = plan.schedule = ran
        if split is None:
            return out
        value, (aux_leaves, mutations) = out
        assert targets is not None
        write_back(targets, list(mutations))
        if req.has_aux:
            return value, pytree.tree_unflatten(list(aux_leaves), split.layout.aux_spec)
        return value

    plan.runner = run if explicit or not checked else strict_checked(req.transform, reason, run)
    return plan


def _graph_function(split: Split, args: tuple[Any, ...], kwargs: dict[str, Any],
                    lifted: tuple[Tensor, ...]) -> tuple[Callable[..., Any], list[Tensor]]:
    """``(*args) -> (output, (aux leaves, mutation values))`` computed by the captured graph
    (random values drawn once, now), and the tensors the mutations are written back to."""
    cap = split.cap
    graph = cap.graph
    assert graph is not None
    tensors = arg_tensors(args, kwargs)
    random = cap.random_values(tensors, lifted)
    targets = [(tensors + list(lifted))[i] for i in cap.mutated]
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensor_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    n_y, n_aux = split.n_y, split.n_aux
    out_spec = split.layout.out_spec

    def g(*pos: Any) -> Any:
        new_leaves = pytree.tree_leaves((pos, kwargs))
        ts = [new_leaves[i] for i in tensor_pos]
        outs = graph(*ts, *random, *lifted)
        y = pytree.tree_unflatten(list(outs[:n_y]), out_spec)
        return y, (tuple(outs[n_y:n_y + n_aux]), tuple(outs[n_y + n_aux:]))

    del leaves, spec
    return g, targets
