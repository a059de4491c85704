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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .._capture.trace import CaptureError, graph_problems, trace
from .._execute.compiler import Compiler
from .._rules.series import Series, UnitSeed
from .cost import Schedule, estimate, graph_flops, mixed_candidates, numel, tainted_nodes
from .interpolate import (
    directions,
    interpolation_constants,
    num_directions,
    symmetric_tensor,
)
from .memory import choose_chunk
from .taylor import Propagator


@dataclass
class Layout:
    """Where the differentiated leaves and outputs sit in ``z`` and ``y``."""

    in_shapes: list[tuple[int, ...]]
    in_spec: Any  # pytree spec of the argnums structure (one level of a jacrev result)
    out_shapes: list[tuple[int, ...]]
    out_spec: Any
    aux_spec: Any

    @property
    def n(self) -> int:
        return sum(math.prod(s) for s in self.in_shapes)

    @property
    def m(self) -> int:
        return sum(math.prod(s) for s in self.out_shapes)

    def single_shape(self, k: int) -> tuple[int, ...] | None:
        """The ``k``-th derivative's shape when one tensor goes in and one comes out (the
        result is then ``D`` reshaped), else None."""
        if self.in_spec.is_leaf() and self.out_spec.is_leaf():
            return self.out_shapes[0] + self.in_shapes[0] * k
        return None


class Request:
    """One call signature's inputs, split into the differentiated leaves and the rest."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 argnums: tuple[int, ...], int_argnums: bool, has_aux: bool) -> None:
        self.func, self.has_aux = func, has_aux
        self.argnums, self.int_argnums = argnums, int_argnums
        leaves, self.spec = pytree.tree_flatten((args, kwargs))
        # positions of differentiated leaves in the flat list
        self.diff_pos: list[int] = []
        starts = []
        offset = 0
        for a in args:
            starts.append(offset)
            offset += len(pytree.tree_leaves(a))
        for a in argnums:
            k = len(pytree.tree_leaves(args[a]))
            self.diff_pos.extend(range(starts[a], starts[a] + k))
        diff = set(self.diff_pos)
        self.other_pos = [i for i, leaf in enumerate(leaves)
                          if i not in diff and isinstance(leaf, Tensor)]
        self.const_leaves = [None if (i in diff or isinstance(leaf, Tensor)) else leaf
                             for i, leaf in enumerate(leaves)]
        diff_struct = args[argnums[0]] if int_argnums else tuple(args[a] for a in argnums)
        self.in_spec = pytree.tree_structure(diff_struct)
        self.in_shapes = [tuple(leaves[i].shape) for i in self.diff_pos]
        self.in_dtype = leaves[self.diff_pos[0]].dtype

    def split(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, list[Tensor]]:
        # the plan's signature fixes the structure: with only tensor arguments, they are the
        # leaves (see ``signature_key``)
        plain = not kwargs and all(isinstance(a, Tensor) for a in args)
        leaves = args if plain else pytree.tree_leaves((args, kwargs))
        if len(self.diff_pos) > 1:
            z = torch.cat([leaves[i].reshape(-1) for i in self.diff_pos])
        else:
            z = leaves[self.diff_pos[0]]
            z = z if z.dim() == 1 else z.reshape(-1)
        return z, [leaves[i] for i in self.other_pos]

    def flat_function(self, layout_out: dict[str, Any]) -> Callable[..., Any]:
        """``(z, *others) -> (y, aux_leaves)`` with the call's structure rebuilt inside."""
        sizes = [math.prod(s) for s in self.in_shapes]
        shapes = self.in_shapes

        def flat(z: Tensor, *others: Tensor) -> Any:
            leaves = list(self.const_leaves)
            parts = torch.split(z, sizes) if len(sizes) > 1 else (z,)
            for pos, part, shape in zip(self.diff_pos, parts, shapes):
                leaves[pos] = part.reshape(shape)
            for pos, t in zip(self.other_pos, others):
                leaves[pos] = t
            args, kwargs = pytree.tree_unflatten(leaves, self.spec)
            out = self.func(*args, **kwargs)
            y, aux = out if self.has_aux else (out, ())
            ys, out_spec = pytree.tree_flatten(y)
            aux_leaves, aux_spec = pytree.tree_flatten(aux)
            layout_out["out_shapes"] = [tuple(t.shape) for t in ys]
            layout_out["out_spec"] = out_spec
            layout_out["aux_spec"] = aux_spec
            flat_y = torch.cat([t.reshape(-1) for t in ys]) if len(ys) != 1 else ys[0].reshape(-1)
            return flat_y, aux_leaves

        return flat


def _jacrev_levels(flat: Callable[..., Any], r: int, chunk_size: int | None
                   ) -> Callable[..., Any]:
    """``r`` nested ``jacrev`` of ``flat``; ``chunk_size`` bounds the outermost level only (the
    one with the most cotangents) -- chunking every level multiplies the number of sequential
    calls level by level."""
    g = flat
    for level in range(r):
        chunk = chunk_size if level == r - 1 else None
        g = torch.func.jacrev(g, argnums=0, has_aux=True, chunk_size=chunk)
    return g


def _shaped(seed: Any, v: Tensor) -> Any:
    """A flat seed ``(B, numel)`` viewed in the shape of the node it seeds."""
    if isinstance(seed, UnitSeed):
        return seed
    return seed.reshape((seed.shape[0],) + tuple(v.shape))


class Program:
    """A captured, planned derivative computation for one call signature."""

    def __init__(self, request: Request, layout: Layout, order: int, schedules: list[Schedule],
                 graphs: dict[int, torch.fx.GraphModule], chunk_size: int | None,
                 all_orders: bool, direct: dict[int, Callable[..., Any]] | None = None) -> None:
        self.request, self.layout, self.order = request, layout, order
        self.schedules = schedules
        self.props = {r: Propagator(g) for r, g in graphs.items()}
        self.direct = direct or {}  # pure reverse levels run by torch.func, not traced
        self.chunk_size = chunk_size
        self.all_orders = all_orders
        self._seeds: dict[Any, Tensor] = {}
        self.compiler = Compiler()
        self._compiled = self.compiler.fns  # the compiled graphs, by schedule key
        self.compile_note: str | None = None

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
            x = Series(z, [self._seed(n, d, start, stop, z)] + [None] * (d - 1))
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
        aux = pytree.tree_map(lambda a: a.primal if isinstance(a, Series) else a, aux)
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
        aux = pytree.tree_map(lambda a: a.primal if isinstance(a, Series) else a, aux)
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

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        z, others = self.request.split(args, kwargs)
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
            s = self.schedules[0]
            if s.cut is not None:
                D, aux = self.dense_mixed(s, z, others)
            else:
                D, aux = self.dense(s.reverse_levels, s.forward_degree, z, others)
            value = self.assemble(D, self.order)
        if self.request.has_aux:
            return value, pytree.tree_unflatten(list(aux or ()), self.layout.aux_spec)
        return value

    # ------------------------------------------------------------------- assembly
    def assemble(self, D: Tensor, k: int) -> Any:
        """Split ``D (m, n^k)`` into the pytree ``k`` nested ``jacrev`` calls return."""
        lay = self.layout
        in_dtype = self.request.in_dtype
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


def compile_program(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                    argnums: tuple[int, ...], int_argnums: bool, order: int, has_aux: bool,
                    mode: str, chunk_size: int | None, all_orders: bool, name: str = "xderiv"
                    ) -> tuple[Program | None, str | None, list[Schedule]]:
    """Capture and plan; returns ``(program, None, schedules)`` or ``(None, reason, [])``.

    Raises ``ValueError`` when the chosen schedule cannot fit in memory even in chunks.
    """
    req = Request(func, args, kwargs, argnums, int_argnums, has_aux)
    diff_leaves = [pytree.tree_leaves(args[a]) for a in argnums]
    kinds = {(leaf.dtype, leaf.device) for leaves in diff_leaves for leaf in leaves}
    if len(kinds) > 1:
        return None, ("differentiated inputs mix dtypes/devices "
                      f"({', '.join(sorted(f'{d}@{v}' for d, v in kinds))}); the engine "
                      "concatenates them into one vector"), []
    z, others = req.split(args, kwargs)
    meta: dict[str, Any] = {}
    flat = req.flat_function(meta)
    try:
        g0 = trace(flat, [z, *others])
    except CaptureError as e:
        return None, f"capture failed ({e})", []
    problems = graph_problems(g0)
    if problems:
        return None, "; ".join(problems), []
    if not all(isinstance(d, int) for shape in meta["out_shapes"] for d in shape):
        return None, "the output's shape depends on tensor values (e.g. boolean-mask indexing)", []
    layout = Layout(req.in_shapes, req.in_spec, meta["out_shapes"], meta["out_spec"],
                    meta["aux_spec"])
    n, m = layout.n, layout.m
    node_flops, seed_free = graph_flops(g0)
    flops0 = sum(node_flops.values())
    max_numel = max((numel(nd.meta.get("val")) for nd in tainted_nodes(g0)), default=1)
    itemsize = z.element_size()
    if all_orders or mode in ("forward", "mixed"):
        candidates = [0]
    elif mode == "reverse":
        candidates = [order]
    else:
        candidates = list(range(0, min(order, 2) + 1))
    schedules = [estimate(order, r, n, m, flops0, seed_free, itemsize, max_numel)
                 for r in candidates]
    if not all_orders and (mode == "mixed" or (mode == "auto" and order <= 4)):
        schedules += mixed_candidates(g0, order, n, m, node_flops, seed_free, itemsize,
                                      max_numel, limit=None if mode == "mixed" else 3)
        if mode == "mixed":
            schedules = [s for s in schedules if s.cut is not None] or schedules[:1]
    schedules.sort(key=lambda s: s.est_flops)
    best = schedules[0]
    if best.cut is not None:  # mixed schedules run unchunked: check they fit, else go forward
        try:
            choose_chunk(name, result_bytes=best.est_peak_bytes, per_direction_bytes=1.0,
                         directions=1, chunk_size=None, device=z.device)
        except ValueError:
            schedules = [s for s in schedules if s.cut is None]
            best = schedules[0]
    chunk = choose_chunk(name, result_bytes=best.result_bytes,
                         per_direction_bytes=best.per_direction_bytes,
                         directions=best.directions, chunk_size=chunk_size, device=z.device)
    graphs = {0: g0}
    direct: dict[int, Callable[..., Any]] = {}
    for s in schedules[:1]:
        r = s.reverse_levels
        if r and s.forward_degree == 0 and (chunk is not None or r >= 2):
            # pure reverse mode with chunking or several levels: tracing would unroll every
            # chunk and level into one huge graph; torch.func runs it directly, still on the
            # captured graph (see NOTE [Schedules])
            direct[r] = _jacrev_levels(g0, r, chunk)
        elif r and r not in graphs:
            try:  # differentiate the captured (decomposed) graph: see NOTE [Schedules]
                graphs[r] = trace(_jacrev_levels(g0, r, chunk if s.forward_degree == 0
                                                 else None), [z, *others])
            except CaptureError as e:
                return None, f"capture of the reverse levels failed ({e})", []
            problems = graph_problems(graphs[r], series_inputs=int(s.forward_degree > 0))
            if problems:
                return None, "; ".join(problems), []
    program = Program(req, layout, order, schedules, graphs, chunk, all_orders, direct)
    return program, None, schedules
