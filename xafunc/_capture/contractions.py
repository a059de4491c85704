"""Broadcast products reduced by a sum, captured as the matrix products they are.

NOTE [Contractions]
``(W * h).sum(-1)`` is ``W @ h`` and ``(h[:, None] * W).sum(0)`` is ``h @ W``, written as a
broadcast multiply and a sum. Propagated along ``B`` directions, the multiply materialises a
``(B, m, n)`` tensor per Taylor coefficient where a matrix product gives ``(B, m)`` (a Hessian
of a 64->256->256->1 tanh MLP written so ran 15x slower than written ``W @ h``; see NOTE [What
the table keeps and what it expands] for ``mv``, which torch's own table turns into this
form). Capture therefore rewrites ``sum(mul(a, b), dims)`` into ``torch.einsum`` of ``a`` and
``b``, traced into the graph (its matrix product and views), where the product is a
*contraction*: some summed dimension is spanned by both operands, and some kept dimension by
exactly one (a dimension of size 1 that the product broadcasts is spanned by the other only).
Products of equal shapes (``(u * v).sum(-1)``, a batch of dot products) stay as they are: a
matrix product would add only views. The values are the same up to the order of the
additions, as between ``W @ h`` and ``(W * h).sum(-1)`` in eager code.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

aten = torch.ops.aten


def products_as_contractions(gm: GraphModule) -> GraphModule:
    """``gm`` with every ``sum(mul(a, b), dims)`` that is a contraction computed by
    ``torch.einsum`` (NOTE [Contractions])."""
    from .trace import trace

    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        found = _contraction(node)
        if found is None:
            continue
        (a, b), shapes, equation, out_shape = found
        try:
            sub = trace(_einsum(equation, shapes, out_shape), [a.meta["val"], b.meta["val"]])
        except Exception:  # noqa: BLE001 - the product and sum stay as they are
            continue
        if any(n.op == "get_attr" for n in sub.graph.nodes):
            continue  # (no constants to carry over: einsum of two inputs makes none)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            out = graph.graph_copy(sub.graph, {placeholders[0]: a, placeholders[1]: b})
        mul = node.args[0]
        node.replace_all_uses_with(out)  # type: ignore[arg-type]
        graph.erase_node(node)
        graph.erase_node(mul)  # type: ignore[arg-type]
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return gm


def _einsum(equation: str, shapes: list[list[int]], out_shape: list[int]
            ) -> Callable[[Tensor, Tensor], Tensor]:
    def contract(x: Tensor, y: Tensor) -> Tensor:
        return torch.einsum(equation, x.reshape(shapes[0]),
                            y.reshape(shapes[1])).reshape(out_shape)

    return contract


def _contraction(node: Node) -> Any:
    """For ``sum(mul(a, b), dims)`` that is a contraction (NOTE [Contractions]): the operands,
    the shapes they are reshaped to (their size-1 dimensions dropped), the einsum equation and
    the sum's output shape; else None."""
    if node.op != "call_function" or node.target is not aten.sum.dim_IntList \
            or node.kwargs.get("dtype") is not None or len(node.args) < 2 \
            or not node.args[1]:
        return None
    mul = node.args[0]
    if not (isinstance(mul, Node) and mul.target is aten.mul.Tensor and len(mul.users) == 1
            and len(mul.args) == 2 and not mul.kwargs
            and all(isinstance(x, Node) for x in mul.args)):
        return None
    a, b = mul.args
    vals = [n.meta.get("val") for n in (a, b, mul, node)]  # type: ignore[union-attr]
    if not all(isinstance(v, Tensor) for v in vals):
        return None
    va, vb, vp, vo = cast("list[Tensor]", vals)
    if not (va.dtype == vb.dtype == vp.dtype == vo.dtype and va.is_floating_point()):
        return None
    rank = vp.dim()
    if rank > len(string.ascii_letters):
        return None
    summed = {int(d) % rank for d in cast("list[int]", node.args[1])}

    def spans(v: Tensor, i: int) -> bool:
        j = i - (rank - v.dim())
        return j >= 0 and v.shape[j] != 1

    if not any(spans(va, i) and spans(vb, i) for i in summed) or not any(
            spans(va, i) != spans(vb, i) for i in range(rank) if i not in summed):
        return None
    letters = string.ascii_letters

    def subscripts(v: Tensor) -> str:
        return "".join(letters[j + rank - v.dim()] for j in range(v.dim()) if v.shape[j] != 1)

    kept = "".join(letters[i] for i in range(rank) if i not in summed and vp.shape[i] != 1)
    shapes = [[s for s in v.shape if s != 1] for v in (va, vb)]
    return (a, b), shapes, f"{subscripts(va)},{subscripts(vb)}->{kept}", list(vo.shape)
