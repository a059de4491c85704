"""The derivative engine: capture once, propagate Taylor series, assemble torch.func pytrees.

NOTE [Schedules]
All differentiated leaves are concatenated into one vector ``z`` of ``n`` entries and all
outputs into ``y`` of ``m`` entries, so the request is the dense tensor ``D^K y (m, n^K)``.
A schedule with ``r`` reverse levels captures ``g_r = jacrev^r(y)`` (an aten graph: reverse mode
is traced once, not re-run through functorch's interpreter) and pushes univariate Taylor series
of degree ``d = K - r`` through it along the ``C(n + d - 1, d)`` integer directions of
:mod:`._interpolate`, which turns the ``d``-th coefficients into the symmetric tensor.
``r = 0`` is pure forward (Taylor) mode, ``r = K`` pure reverse mode. The reverse levels
differentiate the *captured* graph, already decomposed into core operators, not the user's
function: torch's own higher derivatives of some composite kernels are wrong (in torch 2.13
nested ``jacrev`` of ``native_layer_norm`` is wrong from order 3 on), those of the core
operators are not. The planner picks ``r``
from a cost model over the captured graph (:func:`estimate`). The result is split back into
the nesting of ``K`` ``jacrev`` calls: output structure, then ``K`` times the argnums structure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .._capture.request import Request, Split, write_back
from .._capture.trace import CaptureError, graph_problems, trace
from .._execute.compiler import Compiler
from .._rules.series import Series, UnitSeed
from .adjoint import adjoint_candidate, needs_directions
from .blocked import blocked_candidate, leaf_blocks, mirror_pieces
from .cost import Schedule, estimate, graph_flops, liveness, mixed_candidates
from .interpolate import (
    directions,
    interpolation_constants,
    num_directions,
    symmetric_tensor,
)
from .memory import check_batch, choose_chunk
from .taylor import Propagator

#: degree >= 2 Taylor levels seed their first coefficients in the unit basis (NOTE
#: [First-order basis]) when they have at least this many directions per input: the
#: expansions before each nonlinear rule cost a product and a kernel each, which fewer rows in
#: the linear maps must repay (a Hessian in 2 inputs, 3 directions, was 2.2x slower in it)
BASIS_MIN_RATIO = 3


def first_order_basis(n: int, d: int) -> bool:
    """Whether a degree-``d`` Taylor level in ``n`` inputs keeps its first coefficients in the
    ``n`` unit directions (NOTE [First-order basis])."""
    return d > 1 and num_directions(n, d) >= BASIS_MIN_RATIO * n


def _vmap_batch(t: Tensor) -> int:
    """How many samples ``vmap`` levels around us run at once (1 outside ``vmap``)."""
    fx = torch._C._functorch
    batch = 1
    while fx.is_functorch_wrapped_tensor(t):
        if fx.is_batchedtensor(t):
            inner = fx.get_unwrapped(t)
            batch *= inner.shape[fx.maybe_get_bdim(t)]
            t = inner
        else:
            t = fx.get_unwrapped(t)
    return batch


EXECUTION = ("execution: one compiled aten graph run by TorchScript; parts that depend only "
             "on the weights cached when no gradient or torch.func transform needs the "
             "graph's history (NOTE [Fast execution])")


def _label(s: Schedule) -> str:
    if s.kind:
        return s.kind
    return "/".join(s.levels) + (" blocked" if s.blocks is not None else "")


# candidates estimated within this factor of the best are timed on the first call, when the
# best is estimated at more than TUNE_MIN_FLOPS (below that, per-call overhead dominates and
# the estimates rank them well enough)
TUNE_FACTOR = 2.0
TUNE_MIN_FLOPS = 2e6
TUNE_MAX = 3  # candidates timed at most, one of each kind
# untimed runs of each before timing (the first compiles; TorchScript's profiling executor
# optimises a graph only after its first runs, which would otherwise be what is timed: the
# LSTM's two candidates measured within 5% of each other there, and flipped between
# processes, where their steady states differ by 25%), then interleaved timed rounds
WARM_RUNS = 3
TIMED_ROUNDS = 3


def _jacrev_levels(flat: Callable[..., Any], r: int, chunk_size: int | None,
                   traced: bool = False) -> Callable[..., Any]:
    """``r`` nested ``jacrev(..., argnums=0, has_aux=True)`` of ``flat``; ``chunk_size`` bounds
    the outermost level only (the one with the most cotangents) -- chunking every level
    multiplies the number of sequential calls level by level. ``traced``: to be traced (see
    :func:`_traced_jacrev`)."""
    g = flat
    for level in range(r):
        chunk = chunk_size if level == r - 1 else None
        g = _traced_jacrev(g, chunk) if traced else torch.func.jacrev(
            g, argnums=0, has_aux=True, chunk_size=chunk)
    return g


def _traced_jacrev(g: Callable[..., Any], chunk_size: int | None) -> Callable[..., Any]:
    """``torch.func.jacrev(g, argnums=0, has_aux=True, chunk_size=chunk_size)`` on the plain
    inputs of a trace: ``vmap`` of ``autograd.grad`` over the rows of the identity, as
    ``jacrev`` computes it, but without its ``vjp`` wrapper (which imports ``torch._dynamo`` on
    first use, NOTE [Tracer])."""

    def jac(z: Tensor, *others: Any) -> tuple[Tensor, Any]:
        with torch.enable_grad():
            # the trace's own input, marked in place: a ``detach`` would be recorded, and it is
            # a zero-derivative operator to the Taylor rules pushed through this graph later
            x = z if z.requires_grad else z.requires_grad_()
            y, aux = g(x, *others)
            n = y.numel()
            if not y.requires_grad or n == 0:
                return y.new_zeros(*y.shape, *z.shape), aux
            rows = torch.eye(n, dtype=y.dtype, device=y.device).reshape(n, *y.shape)

            def row(v: Tensor) -> Tensor:
                return torch.autograd.grad(y, x, v, create_graph=True,
                                           materialize_grads=True)[0]

            J = torch.vmap(row, chunk_size=chunk_size)(rows)
        return J.reshape(*y.shape, *z.shape), aux

    return jac


def _aux_primals(aux: Any) -> Any:
    """The aux outputs of a propagation without their Taylor coefficients."""
    return pytree.tree_map(lambda a: a.primal if isinstance(a, Series) else a, aux)


def _shaped(seed: Any, v: Tensor) -> Any:
    """A flat seed ``(B, numel)`` viewed in the shape of the node it seeds."""
    if isinstance(seed, UnitSeed):
        return seed
    return seed.reshape((seed.shape[0],) + tuple(v.shape))


class Program:
    """A captured, planned derivative computation for one call signature."""

    def __init__(self, split: Split, order: int, schedules: list[Schedule],
                 graphs: dict[Any, torch.fx.GraphModule], chunk_size: int | None,
                 all_orders: bool, has_aux: bool, n_static: int,
                 direct: dict[int, Callable[..., Any]] | None = None,
                 name: str = "xderiv", compile: bool = False) -> None:
        self.split, self.layout, self.order = split, split.layout, order
        self.name = name
        self.has_aux = has_aux
        self.schedules = schedules
        self.props = {key: Propagator(g) for key, g in graphs.items()}
        self.direct = direct or {}  # pure reverse levels run by torch.func, not traced
        self.chunk_size = chunk_size
        self.all_orders = all_orders
        self._seeds: dict[Any, Tensor] = {}
        self._free_bytes: int | None = None  # the device memory free at a batch check
        self.compiler = Compiler(n_static, compile)
        self._compiled = self.compiler.fns  # the compiled graphs, by schedule key
        self.compile_note: str | None = None
        # schedules whose estimates are close to the best one's: timed on the first call
        # (see NOTE [Timing close candidates])
        self.trials: list[Schedule] = []
        self.notes: list[str] = []
        # told the schedule the timing kept (the plan then shows it)
        self.on_choose: Callable[[Schedule], None] | None = None

    def _seed(self, n: int, d: int, start: int, stop: int, z: Tensor) -> Any:
        if d == 1:
            return UnitSeed(start, stop - start)
        key = (n, d, start, stop, z.dtype, z.device)
        seed = self._seeds.get(key)
        if seed is None:
            seed = self._seeds[key] = directions(n, d, start, stop, dtype=z.dtype,
                                                 device=z.device)
        return seed

    def _chunks(self, n: int, d: int) -> list[tuple[int, int]]:
        total = num_directions(n, d)
        chunk = self.chunk_size or total
        return [(start, min(start + chunk, total)) for start in range(0, total, chunk)]

    # ------------------------------------------------------------------ propagation
    def _coefficients(self, r: int, d: int, z: Tensor, others: list[Tensor]
                      ) -> tuple[Tensor, Tensor | None, Any]:
        """Primal output of ``g_r``, its ``d``-th coefficients ``(N, M)``, and aux."""
        if d == 0:  # plain evaluation: the graph's generated code, no interpreter
            fn = self.direct.get(r) or self.props[r].gm
            out, aux = fn(z, *others)
            return out, None, aux
        prop = self.props[r]
        n = z.shape[0]
        coeffs, primal_out, aux = [], None, None
        for start, stop in self._chunks(n, d):
            if not first_order_basis(n, d):
                x = Series(z, [self._seed(n, d, start, stop, z)] + [None] * (d - 1))
            else:  # the first coefficients in the unit basis (NOTE [First-order basis])
                x = Series(z, [UnitSeed(0, n)] + [None] * (d - 1),
                           self._seed(n, d, start, stop, z))
            out, aux = prop(x, *others)
            if isinstance(out, Series):
                primal_out = out.primal
                c = out.coeffs[d - 1]
            else:
                primal_out, c = out, None
            if c is None:
                c = primal_out.new_zeros((stop - start,) + tuple(primal_out.shape))
            coeffs.append(c.reshape(stop - start, -1))
        F = torch.cat(coeffs, 0) if len(coeffs) > 1 else coeffs[0]
        aux = _aux_primals(aux)
        return primal_out, F, aux  # type: ignore[return-value]

    def _dense_eager(self, r: int, d: int, z: Tensor, *others: Tensor) -> tuple[Tensor, Any]:
        n = z.shape[0]
        out, F, aux = self._coefficients(r, d, z, list(others))
        if F is None:
            return out.reshape(self._dense_shape(n, r)), aux
        T = symmetric_tensor(F, n, d)  # (m * n^r, n^d)
        return T.reshape(self._dense_shape(n, r + d)), aux

    def _dense_shape(self, n: int, k: int) -> tuple[int, ...]:
        """``(m, n, ..., n)``, or directly the result's shape when one tensor goes in and one
        comes out (the reshape is then part of the compiled graph, see :meth:`assemble`)."""
        shape = self.layout.single_shape(k) if k == self.order else None
        return shape or (self.layout.m,) + (n,) * k

    def dense(self, r: int, d: int, z: Tensor, others: list[Tensor]) -> tuple[Tensor, Any]:
        """``D^(r+d) y`` as ``(m, n, ..., n)`` and aux, through the compiled propagation
        (see NOTE [Compiled propagation] in ``_compile.py``)."""

        def prepare() -> None:  # real constants, made outside the trace
            n = z.shape[0]
            if d == 0:
                return
            for start, stop in self._chunks(n, d):
                self._seed(n, d, start, stop, z)
            if d > 1:
                interpolation_constants(n, d, z.dtype, z.device)

        def eager(z: Tensor, *others: Tensor) -> Any:
            return self._dense_eager(r, d, z, *others)

        # pure reverse levels run by torch.func stay eager (tracing would unroll every chunk)
        return self._run((r, d), None if r in self.direct else prepare, eager, z, others)

    def _run(self, key: Any, prepare: Callable[[], None] | None, eager: Callable[..., Any],
             z: Tensor, others: list[Tensor]) -> Any:
        out = self.compiler.run(key, prepare, eager, z, others)
        self.compile_note = self.compiler.note
        return out

    def execution(self) -> str:
        """The plan's ``execution:`` line (see NOTE [Fast execution])."""
        if self.compile_note:
            return self.compile_note
        if not self.compiler.wants_compile:
            exes = self.compiler.executables()
            line = EXECUTION
            if any("static runtime" in e.executor for e in exes):
                line += ("; plain calls of a small graph on a CPU run by PyTorch's static "
                         "runtime (NOTE [Static runtime])")
            if any("CUDA graph" in e.executor for e in exes):
                line += "; on the GPU, replayed as CUDA graphs (NOTE [CUDA graphs])"
            if any(e.has_backward_graphs for e in exes):
                line += ("; differentiated through compiled backward graphs (NOTE [Backward "
                         "graphs])")
            return line
        s = self.schedules[0]
        if self.all_orders:
            keys: list[Any] = [(0, k) for k in range(1, self.order + 1)]
        elif s.cut is not None:
            keys = [("mixed", s.cut.name)]
        elif s.adjoint is not None:
            keys = [("adjoint",)]
        elif s.blocks is not None:
            keys = [("blocked", s.reverse_levels, s.symmetric)]
        else:
            keys = [(s.reverse_levels, s.forward_degree)]
        if not self.all_orders and not s.kind and s.reverse_levels in self.direct:
            return ("execution: pure reverse levels run by torch.func, not compiled "
                    "(compile=True has no graph to compile)")
        return "execution: " + self.compiler.describe(keys)

    # ------------------------------------------------------------------ blocked directions
    def _blocked_eager(self, s: Schedule, z: Tensor, *others: Tensor) -> tuple[Any, Any]:
        """First-order Taylor along each leaf's unit directions in turn (NOTE [Blocked
        directions]): ``D (m, n)`` (``r = 0``) or, for a Hessian, the row blocks of ``D (m, n,
        n)`` as the blocks of the result (see :func:`mirror_pieces`)."""
        assert s.blocks is not None
        prop, r, n, m = self.props[s.reverse_levels], s.reverse_levels, z.shape[0], self.layout.m
        rows, aux = [], None
        for offset, count in s.blocks:
            lo = offset if s.symmetric else 0
            parts = []
            for start, stop in self._chunks(count, 1):
                out, aux = prop(Series(z, [UnitSeed(offset + start, stop - start)]), *others)
                c = out.coeffs[0] if isinstance(out, Series) else None
                p = out.primal if isinstance(out, Series) else out
                B = stop - start
                if c is None:
                    c = p.new_zeros((B,) + tuple(p.shape))
                c = c.reshape(B, m, -1) if r else c.reshape(B, m)
                parts.append(c.narrow(2, lo, n - lo) if r and lo else c)
            rows.append(torch.cat(parts, 0) if len(parts) > 1 else parts[0])
        aux = _aux_primals(aux)
        if r == 0:  # D[i, p] = rows[a][p - o_a, i]
            return [row.t().contiguous() for row in rows], aux
        if s.symmetric:
            return mirror_pieces(rows, list(s.blocks)), aux
        return [[row[:, :, ob:ob + cb].permute(1, 2, 0).contiguous() for row in rows]
                for ob, cb in s.blocks], aux

    def blocked(self, s: Schedule, z: Tensor, others: list[Tensor]) -> tuple[Any, Any]:
        """The blocks of ``D^(r+1) y`` by the per-leaf schedule ``s``, and aux."""

        def eager(z: Tensor, *others: Tensor) -> Any:
            return self._blocked_eager(s, z, *others)

        key = ("blocked", s.reverse_levels, s.symmetric)
        return self._run(key, lambda: None, eager, z, others)  # type: ignore[no-any-return]

    def assemble_blocks(self, pieces: Any, k: int) -> Any:
        """The pytree ``k`` nested ``jacrev`` calls return, from per-leaf blocks: ``pieces[a]``
        ``(m, n_a)`` (``k = 1``) or ``pieces[b][a]`` ``(m, n_b, n_a)`` (``k = 2``)."""
        lay, in_dtype = self.layout, self.split.in_dtype

        def nest(piece: Any, lo: int, hi: int, shape: tuple[int, ...], level: int,
                 lead: tuple[int, ...]) -> Any:
            if level == k:
                t = piece[lo:hi].reshape(shape + lead)
                return t if t.dtype == in_dtype else t.to(in_dtype)
            return pytree.tree_unflatten(
                [nest(piece[i], lo, hi, shape, level + 1, lead + tuple(s))
                 for i, s in enumerate(lay.in_shapes)], lay.in_spec)

        outs, offset = [], 0
        for shape in lay.out_shapes:
            size = math.prod(shape)
            outs.append(nest(pieces, offset, offset + size, tuple(shape), 0, ()))
            offset += size
        return pytree.tree_unflatten(outs, lay.out_spec)

    # ------------------------------------------------------------------ mixed schedule
    def _taylor_rows(self, n: int, d: int, z: Tensor, run: Callable[[Any], Any]) -> Tensor:
        """``(N, M)`` ``d``-th coefficients of ``run(seed_series)`` along degree-``d``
        directions in an ``n``-dimensional space (``z`` gives dtype and device)."""
        rows = []
        for start, stop in self._chunks(n, d):
            seed = self._seed(n, d, start, stop, z)
            out = run(seed)
            c = out.coeffs[d - 1] if isinstance(out, Series) else None
            p = out.primal if isinstance(out, Series) else out
            if c is None:
                c = p.new_zeros((stop - start,) + tuple(p.shape))
            rows.append(c.reshape(stop - start, -1))
        return torch.cat(rows, 0) if len(rows) > 1 else rows[0]

    def _mixed_eager(self, s: Schedule, z: Tensor, *others: Tensor) -> tuple[Tensor, Any]:
        prop, K, n, m, w = self.props[0], self.order, z.shape[0], self.layout.m, s.width
        H = []  # D^j h: (w, n^j)
        for j in range(1, K + 1):
            def prefix(seed: Any, j: int = j) -> Any:
                return prop(Series(z, [seed] + [None] * (j - 1)), *others, stop_at=s.cut)

            F = self._taylor_rows(n, j, z, prefix)
            H.append(symmetric_tensor(F, n, j).reshape((w,) + (n,) * j))
        S, aux = [], None
        for i in range(1, K + 1):
            def run(seed: Any, i: int = i) -> Any:
                nonlocal aux
                out, aux = prop(z, *others, override=(s.cut, lambda v: Series(
                    v, [_shaped(seed, v)] + [None] * (i - 1))))
                return out
            F = self._taylor_rows(w, i, z, run)
            S.append(symmetric_tensor(F, w, i).reshape((m,) + (w,) * i))
        assert s.join is not None
        D = s.join(S, H)
        aux = _aux_primals(aux)
        return D, aux

    def dense_mixed(self, s: Schedule, z: Tensor, others: list[Tensor]) -> tuple[Tensor, Any]:
        """``D^K y`` by the mixed schedule ``s`` (see NOTE [Cutting at a narrow node])."""

        def prepare() -> None:
            for dim in (z.shape[0], s.width):
                for d in range(2, self.order + 1):
                    for start, stop in self._chunks(dim, d):
                        self._seed(dim, d, start, stop, z)
                    interpolation_constants(dim, d, z.dtype, z.device)

        def eager(z: Tensor, *others: Tensor) -> Any:
            return self._mixed_eager(s, z, *others)

        return self._run(("mixed", s.cut.name), prepare, eager, z, others)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ adjoint schedule
    def dense_adjoint(self, s: Schedule, z: Tensor, others: list[Tensor]) -> tuple[Tensor, Any]:
        """``D^K y`` (``K`` 2 or 3) by forward tangents and adjoints (NOTE [Derivatives by
        adjoints])."""
        join, n = s.adjoint, z.shape[0]
        K = join.order

        def prepare() -> None:
            if needs_directions(join):
                self._seed(n, K, 0, num_directions(n, K), z)
                interpolation_constants(n, K, z.dtype, z.device)

        def eager(z: Tensor, *others: Tensor) -> Any:
            dirs = self._seed(n, K, 0, num_directions(n, K), z) if needs_directions(join) \
                else None
            T, aux = join.derivative(self.props["adjoint"], z, list(others), dirs)
            aux = _aux_primals(aux)
            return T.reshape(self._dense_shape(n, K)), aux

        return self._run(("adjoint",), prepare, eager, z, others)  # type: ignore[no-any-return]

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                 lifted: tuple[Tensor, ...]) -> Any:
        z, others, targets = self.split.inputs(args, kwargs, lifted)
        batch = _vmap_batch(z)
        if batch > 1:
            self._free_bytes = check_batch(self.name, self.schedules[0].est_peak_bytes, batch,
                                           z.device, self._free_bytes)
        if self.all_orders:
            results = []
            aux = None
            for k in range(0, self.order + 1):
                if k == 0:
                    y, _, aux = self._coefficients(0, 0, z, others)
                    results.append(self.assemble(y.reshape(-1), 0))
                    continue
                D, aux = self.dense(0, k, z, others)
                results.append(self.assemble(D, k))
            value: Any = tuple(results)
        else:
            if self.trials:
                self._time_trials(z, others)
            best = self.schedules[0]
            D, aux = self._run_schedule(best, z, others)
            value = self.assemble_blocks(D, self.order) if best.blocks is not None \
                else self.assemble(D, self.order)
        aux_leaves, mutations = self.split.split_aux(list(aux or ()))
        write_back(targets, mutations)
        if self.has_aux:
            return value, pytree.tree_unflatten(aux_leaves, self.layout.aux_spec)
        return value

    def _run_schedule(self, s: Schedule, z: Tensor, others: list[Tensor]) -> tuple[Tensor, Any]:
        if s.cut is not None:
            return self.dense_mixed(s, z, others)  # type: ignore[no-any-return]
        if s.adjoint is not None:
            return self.dense_adjoint(s, z, others)  # type: ignore[no-any-return]
        if s.blocks is not None:
            return self.blocked(s, z, others)
        return self.dense(s.reverse_levels, s.forward_degree, z, others)

    def _time_trials(self, z: Tensor, others: list[Tensor]) -> None:
        """NOTE [Timing close candidates]
        The cost model ranks schedules by estimated FLOPs, which is blind to per-op overhead,
        kernel efficiency and memory traffic. When other candidates are estimated within
        ``TUNE_FACTOR`` of the best and the work is large enough to matter, the first call
        runs each ``WARM_RUNS`` times (compiling it), then times ``TIMED_ROUNDS`` interleaved
        rounds and keeps the fastest (as cuDNN's benchmark mode does); the plan reports the
        times and the choice. One candidate of each kind is timed (the best-estimated mixed
        cut, not two of them)."""
        import time

        trials, self.trials = self.trials, []
        times = [math.inf] * len(trials)
        # with compile=True the candidates are timed on TorchScript and only the one kept is
        # compiled by inductor, on its next run (seconds per compile)
        self.compiler.set_compile(False)
        try:
            for _ in range(WARM_RUNS):  # compile, then TorchScript's profiling runs
                for s in trials:
                    self._run_schedule(s, z, others)
            for _ in range(TIMED_ROUNDS):  # the fastest, interleaved: robust to a busy moment
                for i, s in enumerate(trials):
                    t = time.perf_counter()
                    self._run_schedule(s, z, others)
                    times[i] = min(times[i], time.perf_counter() - t)
        finally:
            self.compiler.set_compile(self.compiler.wants_compile)
        best = min(range(len(trials)), key=times.__getitem__)
        chosen = trials[best]
        self.schedules = [chosen] + [s for s in self.schedules if s is not chosen]
        self.notes.append("timed on the first call: " + "; ".join(
            f"{_label(s)} {1e3 * t:.3f} ms" for s, t in zip(trials, times))
            + f" -> kept {_label(chosen)}")
        if self.on_choose is not None:
            self.on_choose(chosen)

    # ------------------------------------------------------------------- assembly
    def assemble(self, D: Tensor, k: int) -> Any:
        """Split ``D (m, n^k)`` into the pytree ``k`` nested ``jacrev`` calls return."""
        lay = self.layout
        in_dtype = self.split.in_dtype
        shape = lay.single_shape(k)
        if shape is not None:
            out = D if D.shape == shape else D.reshape(shape)
            return out if k == 0 or out.dtype == in_dtype else out.to(in_dtype)
        in_sizes = [math.prod(s) for s in lay.in_shapes]

        def nest(block: Tensor, lead: int, level: int) -> Any:
            # block: (*prefix, n, ..., n) with ``lead`` prefix dims; splitting one dim into a
            # leaf's shape is always a view, so no data is copied here.
            if level == k:
                # jacrev returns derivatives in the dtype of the differentiated input
                return block if k == 0 or block.dtype == in_dtype else block.to(in_dtype)
            parts = []
            for piece, shape in zip(torch.split(block, in_sizes, dim=lead), lay.in_shapes):
                piece = piece.reshape(piece.shape[:lead] + shape + piece.shape[lead + 1:])
                parts.append(nest(piece, lead + len(shape), level + 1))
            return pytree.tree_unflatten(parts, lay.in_spec)

        outs = []
        offset = 0
        for shape in lay.out_shapes:
            size = math.prod(shape)
            block = D[offset:offset + size]
            offset += size
            outs.append(nest(block.reshape(shape + block.shape[1:]), len(shape), 0))
        return pytree.tree_unflatten(outs, lay.out_spec)


def compile_program(req: Request, split: Split, z: Tensor, others: list[Any], n_static: int,
                    name: str | None = None) -> tuple[Program | None, str | None, list[Schedule]]:
    """Plan ``req`` on a capture; returns ``(program, None, schedules)`` or
    ``(None, reason, [])``. ``z`` and ``others`` are example inputs (shapes only).

    Raises ``ValueError`` when the chosen schedule cannot fit in memory even in chunks.
    """
    order, mode, all_orders = req.order, req.mode, req.all_orders
    name = name or req.transform
    try:
        g0 = split.flat_graph([z, *others])
    except CaptureError as e:
        return None, f"capture failed ({e})", []
    problems = graph_problems(g0)
    if problems:
        return None, "; ".join(problems), []
    layout = split.layout
    if not all(isinstance(d, int) for shape in layout.out_shapes for d in shape):
        return None, "the output's shape depends on tensor values (e.g. boolean-mask indexing)", []
    n, m = layout.n, layout.m
    node_flops, seed_free = graph_flops(g0)
    flops0 = sum(node_flops.values())
    live, total = liveness(g0)
    itemsize = z.element_size()
    if all_orders or mode in ("forward", "mixed"):
        candidates = [0]
    elif mode == "reverse":
        candidates = [order]
    else:
        candidates = list(range(0, min(order, 2) + 1))
    schedules = [estimate(order, r, n, m, flops0, seed_free, itemsize, live, total)
                 for r in candidates]
    if not all_orders and (mode == "mixed" or (mode == "auto" and order <= 4)):
        schedules += mixed_candidates(g0, order, n, m, node_flops, seed_free, itemsize,
                                      live, limit=None if mode == "mixed" else 3)
        if mode == "mixed":
            schedules = [s for s in schedules if s.cut is not None] or schedules[:1]
    if order in (2, 3) and not all_orders and mode == "auto" and req.chunk_size is None \
            and not z.is_complex():
        adjoint = adjoint_candidate(g0, order, n, m, flops0, seed_free, itemsize, live, total)
        if adjoint is not None:
            schedules.append(adjoint)
    traced: dict[int, torch.fx.GraphModule] = {}  # reverse levels traced once, shared
    if not all_orders and mode in ("auto", "forward"):
        schedules += _blocked_candidates(schedules, layout.in_shapes, order, g0, z, others,
                                         traced)
    schedules.sort(key=lambda s: s.est_flops)
    # the cheapest candidate that fits and whose graphs the engine can run
    reasons: list[str] = []
    memory_error: ValueError | None = None
    for best in schedules:
        try:
            chunk = _chunk_of(name, best, z, req.chunk_size)
        except ValueError as e:
            memory_error = memory_error or e
            continue
        prepared = _prepare(best, g0, chunk, z, others, traced)
        if isinstance(prepared, str):
            reasons.append(prepared)
            continue
        graphs, direct = prepared
        ordered = [best] + [s for s in schedules if s is not best]
        trials = [best]
        if not all_orders and mode == "auto" and best.est_flops >= TUNE_MIN_FLOPS:
            for s in ordered[1:]:
                if len(trials) == TUNE_MAX or s.est_flops > TUNE_FACTOR * best.est_flops:
                    break
                if _label(s) in {_label(t) for t in trials}:
                    continue  # one of each kind: two mixed cuts estimated alike (after
                    # addmm and after its reshape) would crowd out a reverse level
                if not _fits(name, s, req.chunk_size, z, chunk):
                    continue  # the program runs one chunk size for all its schedules
                more = _prepare(s, g0, chunk, z, others, traced)
                if not isinstance(more, str):
                    graphs.update(more[0])
                    direct.update(more[1])
                    trials.append(s)
        program = Program(split, order, ordered, graphs, chunk, all_orders, req.has_aux,
                          n_static, direct, name, req.compile)
        if len(trials) > 1:
            program.trials = trials
        return program, None, ordered
    if memory_error is not None and not reasons:
        raise memory_error
    return None, "; ".join(dict.fromkeys(reasons)), []


def _fits(name: str, s: Schedule, chunk_size: int | None, z: Tensor,
          chunk: int | None) -> bool:
    """Schedule ``s`` fits in memory with the chunk size ``chunk`` chosen for the best one."""
    try:
        return _chunk_of(name, s, z, chunk_size) == chunk
    except ValueError:
        return False


def _chunk_of(name: str, s: Schedule, z: Tensor, chunk_size: int | None = None) -> int | None:
    """The chunk size schedule ``s`` runs with (``ValueError`` if it cannot fit); mixed and
    adjoint schedules run unchunked, so they must fit whole."""
    if s.kind:
        choose_chunk(name, result_bytes=s.result_bytes,
                     per_direction_bytes=max(s.est_peak_bytes - s.result_bytes, 1.0),
                     directions=1, chunk_size=None, device=z.device)
    return choose_chunk(name, result_bytes=s.result_bytes,
                        per_direction_bytes=s.per_direction_bytes, directions=s.directions,
                        chunk_size=chunk_size, device=z.device)


# a blocked variant is only estimated (its reverse level traced) for candidates estimated
# within this factor of the best one: blocks rarely save more
BLOCKED_FACTOR = 8.0


def _blocked_candidates(schedules: list[Schedule], in_shapes: list[tuple[int, ...]],
                        order: int, g0: torch.fx.GraphModule, z: Tensor, others: list[Any],
                        traced: dict[int, torch.fx.GraphModule]) -> list[Schedule]:
    """Per-leaf block variants (NOTE [Blocked directions]) of the first-order Taylor
    candidates (``r <= 1`` reverse levels under degree 1) when ``z`` has several leaves."""
    blocks = leaf_blocks(in_shapes)
    if len(blocks) < 2 or any(c == 0 for _, c in blocks) or not schedules or z.is_complex():
        return []  # (complex inputs: jacrev's Hessian convention is not symmetric)
    best = min(s.est_flops for s in schedules)
    out = []
    for base in schedules:
        r = base.reverse_levels
        if base.cut is not None or base.forward_degree != 1 or r > 1 or \
                base.est_flops > BLOCKED_FACTOR * best:
            continue
        g = g0 if r == 0 else _traced_reverse(g0, r, z, others, traced)
        if isinstance(g, str):
            continue
        out.append(blocked_candidate(base, g, blocks, symmetric=r == 1 and order == 2))
    return out


def _traced_reverse(g0: torch.fx.GraphModule, r: int, z: Tensor, others: list[Any],
                    traced: dict[int, torch.fx.GraphModule]) -> torch.fx.GraphModule | str:
    """``jacrev^r`` of the captured graph, traced (once per ``r``), or why it cannot be."""
    g = traced.get(r)
    if g is None:
        try:  # differentiate the captured (decomposed) graph: see NOTE [Schedules]
            g = traced[r] = trace(_jacrev_levels(g0, r, None, traced=True), [z, *others])
        except CaptureError as e:
            return f"capture of the reverse levels failed ({e})"
    return g


def _prepare(s: Schedule, g0: torch.fx.GraphModule, chunk: int | None, z: Tensor,
             others: list[Any], traced: dict[int, torch.fx.GraphModule] | None = None
             ) -> tuple[dict[int, Any], dict[int, Any]] | str:
    """The graphs schedule ``s`` runs (its reverse levels traced over the captured graph), or
    why the engine cannot run them."""
    graphs: dict[Any, Any] = {0: g0}
    direct: dict[int, Callable[..., Any]] = {}
    r = s.reverse_levels
    if s.adjoint is not None:
        g = s.adjoint.graph(g0, z, others)
        if isinstance(g, str):
            return g
        problems = graph_problems(g)
        if problems:
            return "; ".join(problems)
        graphs["adjoint"] = g
        return graphs, direct
    if r and s.forward_degree == 0 and (chunk is not None or r >= 2):
        # pure reverse mode with chunking or several levels: tracing would unroll every
        # chunk and level into one huge graph; torch.func runs it directly, still on the
        # captured graph (see NOTE [Schedules])
        direct[r] = _jacrev_levels(g0, r, chunk)
    elif r:  # one level, unchunked (chunking the directions of a Taylor level above)
        g = _traced_reverse(g0, r, z, others, {} if traced is None else traced)
        if isinstance(g, str):
            return g
        graphs[r] = g
        problems = graph_problems(graphs[r], series_inputs=int(s.forward_degree > 0))
        if problems:
            return "; ".join(problems)
    return graphs, direct
