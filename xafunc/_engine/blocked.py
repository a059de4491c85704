"""Per-leaf direction blocks: first-order Taylor levels seeded one differentiated leaf at a time.

NOTE [Blocked directions]
The engine differentiates one concatenated vector ``z`` (NOTE [Schedules]), but ``z`` is made of
separate leaves -- the tensors of a parameter dict, several argnums -- that the captured graph
splits apart first (``split_with_sizes``). A first-order Taylor level along all ``n`` unit
directions at once carries an ``n``-row tangent through every node that depends on *any* leaf.
Seeded one leaf ``a`` at a time (``n_a`` unit directions, offsets inside ``a``), the split rule
hands the other leaves constants (zero tangents, ``_split_unit`` in ``_rules/linear.py``), so:

* a node that does not depend on leaf ``a`` propagates no tangent for block ``a`` at all (the
  layers before the one ``a`` enters, e.g. for a later layer's weight);
* the seed stays a unit seed through the leaf's views (also the ``W.t()`` of a linear layer:
  a ``transposed`` :class:`~xafunc._rules.series.UnitSeed`), so its first product with a
  constant is a copy of rows or columns, not a GEMM against a one-hot basis;
* **symmetry** (order 2 as one reverse level under first-order Taylor, ``[rev -> fwd]``): row
  block ``a`` of ``D^2 y_i`` equals the transpose of column block ``a``, so block ``a`` only
  needs the gradient blocks ``b >= a``; the propagation slices its output to those columns and
  the graph simplifier (slice of a ``cat`` along its pieces, then dead code elimination) drops
  the reverse pass that would compute the others -- for a later leaf, the backward pass
  through every earlier layer. The blocks ``b < a`` are mirrored from earlier rows
  (:func:`mirror_pieces`); the result is exactly symmetric.

The cost model (:func:`blocked_fraction`) reads the same facts off the graph it propagates
(``g_r``): which nodes each block's seed reaches, which nodes the kept gradient blocks need,
and which products are seed copies; it scales the unblocked candidate's estimate by the share
of per-direction work that remains, and the planner takes the blocked variant when it is
cheaper (or times both on the first call when they are close, NOTE [Timing close candidates]).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor

from .cost import _PRODUCTS, _SEED_PERMUTES, _SEED_RESHAPES, Schedule, graph_flops, numel

Block = tuple[int, int]  # (offset in z, number of entries)

_FOLLOW = {"view", "reshape", "_unsafe_view", "alias", "clone", "squeeze", "unsqueeze"}


def leaf_blocks(in_shapes: list[tuple[int, ...]]) -> list[Block]:
    """``(offset, count)`` of each differentiated leaf inside ``z``."""
    blocks, offset = [], 0
    for shape in in_shapes:
        size = math.prod(shape)
        blocks.append((offset, size))
        offset += size
    return blocks


def _name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _seed_masks(gm: torch.fx.GraphModule, blocks: list[Block]) -> tuple[dict[Any, int], Any]:
    """For every node, the bit mask of the blocks whose seed reaches it; and ``z``."""
    nodes = list(gm.graph.nodes)
    z = next(nd for nd in nodes if nd.op == "placeholder")
    everything = (1 << len(blocks)) - 1
    mask: dict[Any, int] = {z: everything}
    piece_mask: dict[Any, list[int]] = {}
    for nd in nodes:
        if nd.op != "call_function":
            continue
        v = z.meta["val"]
        dim = nd.args[2] if len(nd.args) > 2 else nd.kwargs.get("dim", 0)
        if _name(nd) in ("split_with_sizes", "split") and nd.args[0] is z and v.dim() and \
                int(dim) % v.dim() == 0:  # type: ignore[call-overload]
            sizes = nd.args[1]
            row = math.prod(v.shape[1:]) if v.dim() > 1 else 1
            if isinstance(sizes, int):
                sizes = [min(sizes, v.shape[0] - s) for s in range(0, v.shape[0], sizes)]
            masks, begin = [], 0
            for size in sizes:
                end = begin + int(size) * row
                masks.append(sum(1 << i for i, (o, c) in enumerate(blocks)
                                 if o < end and begin < o + c))
                begin = end
            piece_mask[nd] = masks
            mask[nd] = 0
            continue
        if nd.target is operator.getitem and nd.args[0] in piece_mask:
            mask[nd] = piece_mask[nd.args[0]][int(nd.args[1])]  # type: ignore[call-overload]
            continue
        m = 0
        for a in nd.all_input_nodes:
            m |= mask.get(a, 0)
        if nd.args and nd.args[0] in piece_mask and m == 0:
            m = everything  # the split's list used as a whole
        mask[nd] = m
    return mask, z


def _output_pieces(gm: torch.fx.GraphModule, blocks: list[Block]) -> tuple[list[Any], set[Any]]:
    """The ``cat`` pieces that hold the gradient blocks of ``g_1``'s output (one per leaf), and
    the nodes on the way from that ``cat`` to the output; ``([], set())`` when the output is
    not built that way (then nothing is pruned)."""
    out = next(nd for nd in gm.graph.nodes if nd.op == "output")
    y = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    n = sum(c for _, c in blocks)
    chain: set[Any] = set()
    node = y
    while isinstance(node, torch.fx.Node):
        chain.add(node)
        name = _name(node)
        val = node.meta.get("val")
        if name == "cat":
            pieces = list(node.args[0])  # type: ignore[arg-type]
            dim = node.args[1] if len(node.args) > 1 else 0
            if not isinstance(val, Tensor) or not isinstance(dim, int) or not val.dim() or \
                    dim % val.dim() != val.dim() - 1 or val.shape[-1] != n:
                return [], set()
            sizes = [int(p.meta["val"].shape[-1]) for p in pieces]
            if sizes != [c for _, c in blocks]:
                return [], set()
            return pieces, chain
        if name in _FOLLOW and isinstance(val, Tensor) and val.dim() and val.shape[-1] == n:
            node = node.args[0]
        elif node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node) and \
                _name(node.args[0]) in ("split_with_sizes", "split") and \
                len(node.args[0].users) == 1 and isinstance(node.args[0].args[1], (list, tuple)) \
                and len(node.args[0].args[1]) == 1:  # type: ignore[arg-type]
            node = node.args[0].args[0]
        else:
            return [], set()
    return [], set()


def _needed_masks(gm: torch.fx.GraphModule, blocks: list[Block], symmetric: bool
                  ) -> dict[Any, int]:
    """For every node, the bit mask of the blocks whose kept output needs its tangent: all of
    them without symmetry; with it, block ``a`` keeps the gradient pieces ``b >= a``."""
    everything = (1 << len(blocks)) - 1
    nodes = list(gm.graph.nodes)
    pieces, chain = _output_pieces(gm, blocks) if symmetric else ([], set())
    need: dict[Any, int] = {}
    out = nodes[-1]
    y = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    if pieces:
        for b, p in enumerate(pieces):
            need[p] = need.get(p, 0) | ((1 << (b + 1)) - 1)  # blocks a <= b
        for nd in chain:
            need[nd] = everything
    else:
        need[y] = everything
    for nd in reversed(nodes):
        m = need.get(nd, 0)
        if not m or nd in chain:
            continue
        for a in nd.all_input_nodes:
            need[a] = need.get(a, 0) | m
    return need


def blocked_fraction(gm: torch.fx.GraphModule, blocks: list[Block], symmetric: bool
                     ) -> tuple[float, int]:
    """``(share, extra)``: the share of the unblocked first-order propagation's work (all
    ``n`` directions through every node that depends on ``z``) that per-leaf blocks keep
    (NOTE [Blocked directions]), and how many more rule applications they make (each block
    runs its own propagation: more, smaller operators)."""
    node_flops, _ = graph_flops(gm)
    seeds, z = _seed_masks(gm, blocks)
    need = _needed_masks(gm, blocks, symmetric)
    n = sum(c for _, c in blocks)
    full = n * sum(node_flops.values())
    applied = sum(bin(seeds.get(nd, 0) & need.get(nd, 0)).count("1") for nd in node_flops)
    extra = max(applied - len(node_flops), 0)
    if full <= 0:
        return 1.0, extra
    # seed views: a leaf's own piece and the views the rules keep a unit seed
    seed_view: dict[Any, int] = {}
    for nd in gm.graph.nodes:
        if nd.op != "call_function":
            continue
        if nd.target is operator.getitem and nd.args[0] is not z and \
                isinstance(nd.args[0], torch.fx.Node) and nd.args[0].args and \
                nd.args[0].args[0] is z:
            m = seeds.get(nd, 0)
            if m and m & (m - 1) == 0:
                seed_view[nd] = m
        elif nd.args and nd.args[0] in seed_view and (
                _name(nd) in _SEED_RESHAPES or
                (_name(nd) in _SEED_PERMUTES and nd.meta["val"].dim() == 2)):
            seed_view[nd] = seed_view[nd.args[0]]
    kept = 0.0
    for nd, f in node_flops.items():
        m = seeds.get(nd, 0) & need.get(nd, 0)
        if not m:
            continue
        name = _name(nd)
        if name in _PRODUCTS:
            ia, ib = _PRODUCTS[name][:2]
            for s, other in ((nd.args[ia], nd.args[ib]), (nd.args[ib], nd.args[ia])):
                sm = seed_view.get(s, 0)
                if sm and not (seeds.get(other, 0) & sm):
                    # a seed copy for that block: one pass over the output
                    kept += blocks[sm.bit_length() - 1][1] * float(numel(nd.meta.get("val")))
                    m &= ~sm
        for i, (_, c) in enumerate(blocks):
            if m >> i & 1:
                kept += c * f
    return min(kept / full, 1.0), extra


# A dispatched operator costs about as much as this many FLOPs (a few microseconds at the
# ~10 GFLOP/s of one CPU core), and a rule emits about two; only the blocked candidate adds
# operators over its base, so only it is charged for them.
OP_FLOPS = 2e4
OPS_PER_RULE = 2


def blocked_candidate(base: Schedule, gm: torch.fx.GraphModule, blocks: list[Block],
                      symmetric: bool) -> Schedule:
    """``base`` (a first-order Taylor level over ``r`` reverse levels) run in per-leaf blocks."""
    frac, extra = blocked_fraction(gm, blocks, symmetric)
    flops = base.est_flops * frac + OP_FLOPS * OPS_PER_RULE * extra
    return Schedule(base.reverse_levels, base.forward_degree, base.directions,
                    flops, base.est_peak_bytes, base.result_bytes,
                    base.per_direction_bytes, blocks=tuple(blocks), symmetric=symmetric)


def mirror_pieces(rows: list[Tensor], blocks: list[Block]) -> list[list[Tensor]]:
    """Blocks ``P[b][a] = D[:, b, a]`` ``(m, n_b, n_a)`` of ``D (m, n, n)`` (``D[i, q, p]`` the
    derivative along direction ``p`` of gradient entry ``q``) from the symmetric rows
    ``rows[a] (n_a, m, n - o_a)``: block ``a``'s directions against gradient entries from
    ``o_a`` on. Entries below the diagonal blocks are mirrored; every block is made row-major
    (one pass over the result)."""
    out: list[list[Tensor]] = []
    for b, (ob, cb) in enumerate(blocks):
        row: list[Tensor] = []
        for a, (oa, ca) in enumerate(blocks):
            if a <= b:  # D[i, q in b, p in a] = rows[a][p, i, q - o_a]
                piece = rows[a][:, :, ob - oa:ob - oa + cb].permute(1, 2, 0)
            else:  # symmetry: D[i, q, p] = D[i, p, q] = rows[b][q, i, p - o_b]
                piece = rows[b][:, :, oa - ob:oa - ob + ca].permute(1, 0, 2)
            row.append(piece.contiguous())
        out.append(row)
    return out
