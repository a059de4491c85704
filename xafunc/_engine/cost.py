"""The cost model: estimated FLOPs and peak memory of each candidate schedule.

Costs are read off the captured graph (:func:`graph_flops`): every node that depends on the
differentiated vector ``z`` costs its output size, matrix products and convolutions their
multiply-adds. A schedule's cost scales that graph cost by the number of directions and
reverse cotangents it propagates (:func:`estimate`, :func:`mixed_candidates`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .interpolate import num_directions
from .mixed import Join, cut_nodes


@dataclass
class Schedule:
    """One candidate computation and its estimated cost."""

    reverse_levels: int
    forward_degree: int
    directions: int
    est_flops: float
    est_peak_bytes: float
    result_bytes: float = 0.0
    per_direction_bytes: float = 0.0
    cut: Any = None  # mixed schedules: the fx node separating z from y
    width: int = 0  # its number of entries
    join: Join | None = None
    blocks: tuple[tuple[int, int], ...] | None = None  # per-leaf direction blocks
    symmetric: bool = False  # blocks keep gradient blocks b >= a only (mirrored)
    adjoint: Any = None  # derivatives by adjoints (orders 2, 3): the ``AdjointJoin``

    @property
    def kind(self) -> str:
        """``"mixed"``, ``"adjoint"``, or ``""`` for plain levels (the plan's schedule prefix)."""
        return "mixed" if self.cut is not None else "adjoint" if self.adjoint is not None else ""

    @property
    def levels(self) -> tuple[str, ...]:
        return ("rev",) * self.reverse_levels + ("fwd",) * self.forward_degree

    def describe(self) -> str:
        if self.cut is not None:
            return (f"mixed: Taylor degree {self.forward_degree} to {self.cut.name} "
                    f"(width {self.width}), Taylor in its {self.width} coordinates after it, "
                    f"Faà di Bruno join over set partitions: {self.est_flops:.3g} FLOPs")
        if self.adjoint is not None:
            return (f"adjoint: first-order Taylor along the {self.directions} input directions "
                    f"and one reverse sweep, order-{self.adjoint.order} terms joined at the "
                    f"{len(self.adjoint.nodes)} nonlinear nodes (NOTE [Derivatives by "
                    f"adjoints]): {self.est_flops:.3g} FLOPs")
        text = (f"r={self.reverse_levels} reverse + degree {self.forward_degree} Taylor along "
                f"{self.directions} directions")
        if self.blocks is not None:
            text += f" in {len(self.blocks)} per-leaf blocks"
            if self.symmetric:
                text += ", symmetric (gradient blocks b >= a)"
        return f"{text}: {self.est_flops:.3g} FLOPs"



_LINEAR_FREE = {"view", "reshape", "_unsafe_view", "permute", "t", "transpose", "expand",
                "unsqueeze", "squeeze", "alias", "slice", "select", "split_with_sizes",
                "clone", "detach", "getitem"}

# Views that keep a first-order unit seed a unit seed (see ``UnitSeed`` and the
# unit-aware rules of xafunc/_rules/linear.py): reshapes always, permutes and transposes when
# they keep the dims of size > 1 in order.
_SEED_RESHAPES = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "alias", "clone",
                  "lift_fresh_copy", "flatten"}
_SEED_PERMUTES = {"permute", "transpose", "t"}

# Matrix-product family: op name -> (index of the left operand, index of the right operand,
# how the operands are viewed as matrices: "mm" as they are, "mv" right operand a column,
# "dot" a row times a column, "outer" a column times a row), and whether an
# ``alpha * product + beta * bias`` adds one more pass over the output.
_PRODUCTS = {
    "mm": (0, 1, "mm", False), "bmm": (0, 1, "mm", False),
    "addmm": (1, 2, "mm", True), "baddbmm": (1, 2, "mm", True),
    "mv": (0, 1, "mv", False), "addmv": (1, 2, "mv", True),
    "dot": (0, 1, "dot", False), "vdot": (0, 1, "dot", False),
    "outer": (0, 1, "outer", False), "addr": (1, 2, "outer", True),
}


def _val(a: Any) -> Tensor | None:
    v = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
    return v if isinstance(v, Tensor) else None


def _matrix_shapes(kind: str, a: Tensor, b: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if kind == "mv":
        return tuple(a.shape), (int(b.shape[0]), 1)
    if kind == "dot":
        return (1, int(a.shape[0])), (int(b.shape[0]), 1)
    if kind == "outer":
        return (int(a.shape[0]), 1), (1, int(b.shape[0]))
    return tuple(a.shape), tuple(b.shape)


def _keeps_order(shape: tuple[int, ...], perm: list[int]) -> bool:
    big = [d for d in perm if shape[d] != 1]
    return big == sorted(big)


def _seed_view(node: torch.fx.Node, name: str, seed_views: set[Any]) -> bool:
    """Is ``node`` a view of a seed view that the rules keep a unit seed?"""
    if not node.args or node.args[0] not in seed_views:
        return False
    if name in _SEED_RESHAPES:
        return True
    if name in _SEED_PERMUTES:
        src = _val(node.args[0])
        if src is None:
            return False
        nd = src.dim()
        if name == "t":
            perm = list(range(nd))[::-1]
        elif name == "permute":
            perm = [int(d) % max(nd, 1) for d in node.args[1]]  # type: ignore[union-attr,arg-type]
        else:
            perm = list(range(nd))
            if nd:
                d0 = int(node.args[1]) % nd  # type: ignore[arg-type]
                d1 = int(node.args[2]) % nd  # type: ignore[arg-type]
                perm[d0], perm[d1] = perm[d1], perm[d0]
        return _keeps_order(tuple(src.shape), perm)
    return False


def product_flops(node: torch.fx.Node, name: str, size: int) -> tuple[float, Any, Any, Any]:
    """``(flops, left, right, matrix shapes)`` of a matrix-product family node: two FLOPs per
    multiply-add, plus one pass over the output for ``addmm``-like ops."""
    ia, ib, kind, affine = _PRODUCTS[name]
    a, b = node.args[ia], node.args[ib]
    av, bv = _val(a), _val(b)
    if av is None or bv is None:
        return float(size), a, b, None
    sa, sb = _matrix_shapes(kind, av, bv)
    f = 2.0 * size * sa[-1] if kind != "outer" else float(size)
    if affine:
        f += size
    return f, a, b, (sa, sb)


def matrix_product_flops(graph: torch.fx.Graph) -> float:
    """The multiply-adds (two FLOPs each) of every matrix-product family node of ``graph``."""
    total = 0.0
    for node in graph.nodes:
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.op == "call_function" and name in _PRODUCTS:
            total += product_flops(node, name, numel(node.meta.get("val")))[0]
    return total


def graph_flops(gm: torch.fx.GraphModule) -> tuple[dict[Any, float], float]:
    """Rough FLOPs of each node that depends on ``z`` (the first input), and the part of them
    that first-order forward mode does not spend.

    Elementwise and reduction nodes cost their output size, view-like nodes nothing, and the
    matrix-product family (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``mv``, ``addmv``, ``dot``,
    ``vdot``, ``outer``, ``addr``, ``convolution``) its multiply-adds, whichever way the user
    spelled the product (see NOTE [Matrix products] in xafunc/_rules/bilinear.py). A product
    of a constant with a view of ``z`` that keeps the unit seed costs no product in
    first-order forward mode (``_unit_product``): a row or column seed is a slice of the
    constant (free), any other seed a scatter of its rows (one pass over the output)."""
    flops: dict[Any, float] = {}
    seed_free = 0.0
    tainted = set(tainted_nodes(gm))
    seed_views: set[Any] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and not seed_views:
            seed_views.add(node)
            continue
        if node not in tainted or node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        size = numel(node.meta.get("val"))
        f = 0.0
        if name in _PRODUCTS:
            f, a, b, shapes = product_flops(node, name, size)
            for s, other, left in ((a, b, True), (b, a, False)):
                if s in seed_views and other not in tainted and shapes is not None:
                    sa, sb = shapes
                    seed = sa if left else sb
                    y_batch = tuple(node.meta["val"].shape[:-2]) if name in (
                        "mm", "bmm", "addmm", "baddbmm") else ()
                    if len(seed) < 2 or tuple(seed[:-2]) != y_batch:
                        continue
                    slice_ = math.prod(seed[:-2]) == 1 and (seed[-2] if left else seed[-1]) == 1
                    seed_free += f if slice_ else max(f - size, 0.0)
                    break
        elif name == "convolution":
            xv, w = _val(node.args[0]), _val(node.args[1])
            per = math.prod(w.shape[1:]) if w is not None else 1
            transposed = bool(node.args[6]) if len(node.args) > 6 else False
            if transposed and xv is not None:
                f = 2.0 * numel(xv) * per  # each input entry scatters into out/groups * kernel
            else:
                f = 2.0 * size * per
        elif name in _LINEAR_FREE:
            if _seed_view(node, name, seed_views):
                seed_views.add(node)
        else:
            f = float(size)
        flops[node] = f
    return flops, seed_free


def tainted_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes that depend on the first placeholder (the differentiated vector ``z``)."""
    out: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and not seen:
            seen.add(node)
            out.append(node)
        elif node.op == "call_function" and any(a in seen for a in node.all_input_nodes):
            seen.add(node)
            out.append(node)
    return out


def numel(val: Any) -> int:
    """Static element count of a traced value (0 when unknown or data-dependent)."""
    if not isinstance(val, Tensor):
        return 0
    try:
        return int(val.numel())
    except Exception:  # noqa: BLE001 - unbacked symbolic sizes (boolean-mask indexing)
        return 0


_VIEWS = {"view", "reshape", "_unsafe_view", "permute", "t", "transpose", "expand",
          "unsqueeze", "squeeze", "alias", "slice", "select", "detach", "getitem"}


def liveness(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """``(live, total)``: the most elements of values depending on ``z`` alive at once while
    the graph runs, and all such elements (what a backward pass saves). Views allocate
    nothing."""
    nodes = list(gm.graph.nodes)
    tainted = set(tainted_nodes(gm))
    size = {}
    for nd in tainted:
        name = getattr(nd.target, "__name__", str(nd.target)).split(".")[0]
        size[nd] = 0 if name in _VIEWS else numel(nd.meta.get("val"))
    last = {}
    for i, nd in enumerate(nodes):
        for a in nd.all_input_nodes:
            last[a] = i
    dying: dict[int, list[Any]] = {}
    for nd, i in last.items():
        dying.setdefault(i, []).append(nd)
    live = peak = total = 0
    for i, nd in enumerate(nodes):
        live += size.get(nd, 0)
        total += size.get(nd, 0)
        peak = max(peak, live)
        for d in dying.get(i, ()):
            live -= size.get(d, 0)
    return max(peak, 1), max(total, 1)


def reverse_elements(r: int, m: int, n: int, live: int, total: int) -> float:
    """Elements live at once while evaluating ``jacrev^r`` of the graph once.

    One evaluation of the graph keeps ``live`` elements at once (:func:`liveness`). A reverse
    level over a function with ``N`` outputs (``m`` for the first level, ``m n^(k-1)`` for
    level ``k``) builds the ``N x N`` basis of its cotangents and runs one backward pass per
    cotangent, vmapped: ``mem_k = N^2 + N mem_(k-1)``; the forward values the backward passes
    read (``total``) are saved once (not counted here).
    """
    mem = float(live)
    N = float(m)
    for _ in range(r):
        mem = N * N + N * mem
        N *= n
    return mem


# a Taylor coefficient of each live value per direction and degree, plus the rule's temporaries
_TAYLOR_FACTOR = 2.0


def estimate(order: int, r: int, n: int, m: int, flops0: float, seed_free: float,
             itemsize: int, live: int, total: int) -> Schedule:
    """Cost of ``r`` reverse levels followed by degree ``K - r`` Taylor propagation.

    A reverse level multiplies the graph cost by about 3 per cotangent (``m`` cotangents for
    the first level, ``n`` for later ones); Taylor propagation of degree ``d`` along
    ``C(n + d - 1, d)`` directions costs about ``d`` graph evaluations per direction.
    Memory (:func:`reverse_elements`): pure reverse mode is chunked over the cotangents of its
    outermost level (``m n^(K-1)`` of them, each with its basis row and one evaluation of the
    inner levels); Taylor propagation over ``r`` traced reverse levels keeps ``d`` coefficients
    of every live value of that graph per direction.
    """
    d = order - r
    graph = flops0 if r == 0 else 3.0 * flops0 * m * (3.0 * n) ** (r - 1)
    if r == 0 and d == 1:
        graph = max(flops0 - seed_free, flops0 * 0.05)
    dirs = num_directions(n, d) if d > 0 else 1
    flops = graph * dirs * max(d, 1)
    result = float(itemsize * m * n**order)
    fixed = float(itemsize * total) if r else 0.0  # forward values the reverse levels save
    if d == 0:  # pure reverse: "directions" are the outermost level's cotangents
        dirs = m * n ** (r - 1)
        per_dir = float(itemsize * (dirs + reverse_elements(r - 1, m, n, live, total)))
    else:  # Taylor coefficients (and rule temporaries) of every live value per direction
        factor = _TAYLOR_FACTOR if r == 0 else 1.0
        per_dir = float(itemsize * d * factor * reverse_elements(r, m, n, live, total))
    return Schedule(r, d, dirs, flops, dirs * per_dir + result + fixed, result + fixed, per_dir)


def mixed_candidates(g0: torch.fx.GraphModule, order: int, n: int, m: int,
                     node_flops: dict[Any, float], seed_free: float, itemsize: int,
                     live: int, limit: int | None) -> list[Schedule]:
    """Mixed schedules at the narrowest cut nodes narrower than the input (all with
    ``limit=None``)."""
    # (an empty cut -- ``x.gather(0, empty)`` -- carries no directions)
    cuts = [c for c in cut_nodes(g0)
            if 0 < numel(c.meta["val"]) and (limit is None or numel(c.meta["val"]) < n)]
    cuts.sort(key=lambda c: numel(c.meta["val"]))
    order_of = {nd: i for i, nd in enumerate(g0.graph.nodes)}
    out = []
    for c in cuts[:limit]:
        w = numel(c.meta["val"])
        prefix = sum(f for nd, f in node_flops.items() if order_of[nd] <= order_of[c])
        suffix = sum(node_flops.values()) - prefix
        cost = 0.0
        for j in range(1, order + 1):
            pf = max(prefix - seed_free, 0.05 * prefix) if j == 1 else prefix
            cost += num_directions(n, j) * j * pf + num_directions(w, j) * j * suffix
        join = Join.plan(order, m, w, n)
        cost += join.cost
        dirs = max(num_directions(n, order), num_directions(w, order))
        result = float(itemsize * m * n**order)
        peak = itemsize * (w * n**order + m * w**order
                           + _TAYLOR_FACTOR * dirs * order * live) + result
        out.append(Schedule(0, order, dirs, cost, float(peak), result, 0.0, c, w, join))
    return out

