"""Mixed schedules: Taylor mode up to a narrow node, Taylor mode in its coordinates after it,
joined by Faà di Bruno's formula over set partitions.

NOTE [Cutting at a narrow node]
If every path from the differentiated input ``z`` (``n`` entries) to the output ``y`` (``m``
entries) runs through one node ``h`` (``w`` entries) -- a layer boundary of an MLP, the
bottleneck of an hourglass -- then ``y = S(h(z))`` and the ``K``-th derivative is the
multivariate Faà di Bruno formula

    D^K y [i_1..i_K] = sum over set partitions P = {B_1..B_q} of {1..K} of
                       D^q S [D^|B_1| h [i_B_1], ..., D^|B_q| h [i_B_q]].

The prefix derivatives ``D^j h`` (``w x n^j``) come from Taylor propagation along directions
in ``z``-space, the suffix derivatives ``D^i S`` (``m x w^i``) from Taylor propagation along
directions in ``h``-space, so the expensive suffix sees ``C(w + i - 1, i)`` directions instead
of ``C(n + K - 1, K)``. Each partition's term is one multi-operand contraction, e.g. for
``K = 3`` and ``P = {{1}, {2, 3}}`` ``"oab,ai,bjk->oijk"``; its contraction order is planned by
``opt_einsum`` once per shape (``contract_expression``) and reused on every call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import opt_einsum
import torch
from torch import Tensor


def cut_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes every path from the first placeholder to the first output passes through.

    In topological order a node ``v`` separates source and sink iff no edge between nodes on
    source-sink paths jumps over it: ``max_{pos(a) < pos(v)} pos(succ(a)) <= pos(v)``.
    """
    nodes = list(gm.graph.nodes)
    pos = {nd: i for i, nd in enumerate(nodes)}
    source = next(nd for nd in nodes if nd.op == "placeholder")
    output = next(nd for nd in nodes if nd.op == "output")
    sink = output.args[0][0]
    if not isinstance(sink, torch.fx.Node):
        return []
    forward = {source}
    for nd in nodes:
        if nd.op == "call_function" and any(a in forward for a in nd.all_input_nodes):
            forward.add(nd)
    backward = {sink}
    for nd in reversed(nodes):
        if nd in backward:
            backward.update(nd.all_input_nodes)
    relevant = [nd for nd in nodes if nd in forward and nd in backward]
    rel = set(relevant)
    cuts, reach = [], -1
    for nd in relevant:
        i = pos[nd]
        if nd is not source and nd is not sink and reach <= i and _is_tensor(nd):
            cuts.append(nd)
        succ = [pos[u] for u in nd.users if u in rel]
        if succ:
            reach = max(reach, max(succ))
    return cuts


def _is_tensor(nd: torch.fx.Node) -> bool:
    val = nd.meta.get("val")
    if not isinstance(val, Tensor):
        return False
    try:
        return all(isinstance(int(s), int) for s in val.shape)
    except Exception:  # noqa: BLE001 - data-dependent sizes
        return False


@functools.cache
def set_partitions(k: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """All set partitions of ``{0..k-1}``, blocks sorted (Bell(k) of them)."""
    if k == 0:
        return ((),)
    out = []
    for p in set_partitions(k - 1):
        for b in range(len(p)):  # put k-1 into an existing block
            out.append(tuple(blk + (k - 1,) if j == b else blk for j, blk in enumerate(p)))
        out.append(p + ((k - 1,),))
    return tuple(out)


@dataclass
class Join:
    """``D^k y`` from suffix ``S_i (m, w^i)`` and prefix ``H_j (w, n^j)`` for one order ``k``."""

    k: int
    equations: list[str]
    expressions: list[Any]
    cost: float

    @classmethod
    def plan(cls, k: int, m: int, w: int, n: int) -> Join:
        sym = opt_einsum.get_symbol
        out_idx = "".join(sym(1 + k + t) for t in range(k))
        eqs, exprs, cost = [], [], 0.0
        for part in set_partitions(k):
            q = len(part)
            a = [sym(1 + t) for t in range(q)]
            terms = [sym(0) + "".join(a)]
            shapes: list[tuple[int, ...]] = [(m,) + (w,) * q]
            for t, block in enumerate(part):
                terms.append(a[t] + "".join(sym(1 + k + i) for i in block))
                shapes.append((w,) + (n,) * len(block))
            eq = ",".join(terms) + "->" + sym(0) + out_idx
            _, info = opt_einsum.contract_path(eq, *shapes, shapes=True)
            cost += float(info.opt_cost)
            eqs.append(eq)
            exprs.append(opt_einsum.contract_expression(eq, *shapes))
        return cls(k, eqs, exprs, cost)

    def __call__(self, S: list[Tensor], H: list[Tensor]) -> Tensor:
        total: Tensor | None = None
        for part, expr in zip(set_partitions(self.k), self.expressions):
            term = expr(S[len(part) - 1], *[H[len(b) - 1] for b in part], backend="torch")
            total = term if total is None else total + term
        assert total is not None
        return total

    def describe(self) -> list[str]:
        lines = []
        for eq, expr in zip(self.equations, self.expressions):
            steps = "; ".join(c[2] if isinstance(c[2], str) else str(c[2])
                              for c in getattr(expr, "contraction_list", []))
            lines.append(f"{eq}  [{steps}]")
        return lines
