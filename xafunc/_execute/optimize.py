"""Peephole simplification of the traced propagation graphs (:func:`simplify`).

NOTE [Graph simplification]
Tracing records every aten call the Taylor rules make, including bookkeeping that costs a
dispatch per call and computes nothing: views back to the shape they came from, chains of
reshapes, ``x * 1.0``, the same product built twice, dead ``detach``/``alias`` results. For
small problems that per-op overhead is the run time (more so under ``vmap``, where every op
goes through a batching rule). :func:`simplify` removes it with passes that are exact: the
simplified graph returns bit-identical values, on real tensors as well as under
``torch.func.vmap`` (graphs are traced with per-sample shapes and run on batched tensors, so
every shape test here is about the per-sample shapes in ``node.meta["val"]``, which is what
each op sees) and ``torch.func.grad`` (every rewrite replaces a differentiable expression by
one with the same value and the same derivative). Pass 6 runs first, then passes 1-5 in one
topological sweep repeated to a fixed point, then passes 8-14, then the sweep once more:

1. No-op reshapes: ``view``/``_unsafe_view``/``reshape``/``expand``/``squeeze``/
   ``unsqueeze``/``alias``/``clone`` whose output shape equals the input's are the input.
   ``clone`` may go because the graph is functional (``functionalize``): nothing writes into
   the clone or its source afterwards. ``detach`` stays: it has autograd meaning.
   A ``select`` of a size-1 dimension is a ``reshape`` dropping it (its derivative is
   a reshape too, where ``select``'s scatters into zeros).
2. Reshape chains: ``view(view(x, s1), s2)`` (any mix of the reshape family) is one
   ``reshape(x, s2)``. Every member reshapes in row-major order, so only the last shape
   matters. ``reshape``, not ``view``: the strides seen while tracing need not be the ones
   at run time (batched tensors, caller's inputs), see ``_capture._views_to_reshapes``.
3. Permutes: ``transpose``/``t``/``permute`` compose into one ``permute``; an identity
   permutation is the input, and one that only moves size-1 dims is a ``reshape`` (which
   pass 2 then merges with its neighbours).
4. Arithmetic identities with a Python scalar or a ``full``/``ones``/``zeros``/
   ``scalar_tensor`` operand: ``x * 1``, ``1 * x``, ``x / 1``, ``x - 0`` and ``x + 0`` are
   ``x`` (also with a constant of pass 6 whose entries are all ``1`` or ``0``) when the
   output's shape and dtype are ``x``'s (broadcasting or type promotion would
   change them otherwise). ``x + 0.0`` on floating ``x`` is only dropped when the zero is
   ``-0.0``: ``-0.0 + 0.0`` is ``+0.0``, which later divisions could tell apart.
   Also exact: ``x + x`` is ``x * 2``, ``(x * a) * b`` is ``x * (a * b)`` when ``a`` or ``b``
   is ``+-1``, and the only piece of a ``split_with_sizes`` into one piece is its input.
   ``(big * small) * 2^k`` becomes ``big * (small * 2^k)`` (one pass over the large tensor
   fewer; exact short of over- or underflow). A slice of a ``cat`` along its dim that covers
   whole pieces is the ``cat`` of those pieces (a slice inside one piece, a slice of it): the
   pieces it drops become dead code (how a symmetric block prunes its reverse pass, NOTE
   [Blocked directions]). A ``cat`` of all the pieces of a ``split_with_sizes`` along its dim
   is the split's input, and a piece of a split of a ``cat`` into the cat's pieces is that
   piece (a chain of linear ops, each concatenating a series' coefficients and splitting
   them again). A ``cat`` of pieces that are each reshaped only by inserting the same size-1
   dims is a reshape of the ``cat`` of the pieces, and a ``split_with_sizes`` of such a
   reshape, whose pieces are all reshaped by their readers, is the split of its source (the
   reshapes then merge with their neighbours, pass 2): a rule that folds a series'
   coefficients of a vector into one GEMM records ``2 K + 2`` reshapes around it, which go
   (order-4 MLP graph 84 -> 67 operators, 6th-order jet 156 -> 134).
5. Common subexpressions: a pure aten call (not mutating, not random, not ``empty``) with the
   same target, arguments and keyword arguments as an earlier one reuses it. ``mul``/``add``
   of two real tensors are put in a canonical operand order first (IEEE ``+``/``*`` commute
   exactly; complex products are left alone since kernels may fuse them differently).
   Scalars are compared with their type (``1`` and ``1.0`` promote differently) and sign
   of zero.
6. Constant subgraphs: pure ops whose inputs are all such ops (the ``full``,
   ``diagonal``, ``diagonal_scatter`` chain that builds a reverse-mode seed, say) are run once
   and become a constant of the graph, when small (at most ``_FOLD_NUMEL`` elements). Only
   chains that start at factories: nothing that reads a parameter (it may change in place
   between calls) or an input. They are evaluated by the same ops on the same device, so the
   constant is the value the graph would compute, and it carries no batch dimension or
   gradient under ``vmap``/``grad`` either way. A ``full_like``/``zeros_like``/``ones_like``
   of a row-major value is first the ``full`` of its (per-sample) shape, dtype and device:
   it reads nothing else of its input, and the reverse sweep's seed ``ones_like(y)`` then
   no longer keeps the primal output ``y`` -- often the whole last layer -- alive.
7. Dead code elimination (random ops count as impure and stay), then recompile.
8. Layout (NOTE [Broadcast operand layout]): a pointwise op that broadcasts a small,
   non-contiguous operand (a transposed weight slice, say) against a large one gets that
   operand copied to row-major first. Values are unchanged; only the output's strides are.
9. Row-major products and outputs (on request): ``mm(a, b).t()`` is computed as
   ``mm(b.t(), a.t())``, and a transposed ``bmm`` likewise, where nothing else reads the
   product (the same products; the BLAS may sum in another order), so what reads it runs
   row-major loops (:func:`_transposed_products`); and, as torch.func returns derivatives
   row-major, any other non-contiguous output of at most ``_OUTPUT_COPY_NUMEL`` elements is
   copied.
10. Fewer passes over large tensors (on request; exact in real arithmetic, rounding may differ
    in the last place): ``(big * s1) * s2`` is ``big * (s1 * s2)`` for small broadcast
    operands ``s1``, ``s2`` (also through a reshape that only inserts size-1 dimensions),
    and ``a * b + c`` is ``addcmul(c, a, b)``.
11. Shared-matrix batches (on request, the same products summed by another kernel): a ``bmm``
    of a batch by a matrix expanded over it is one ``mm`` (:func:`_shared_matrix_bmm`) where
    that is faster: a batch no larger than the matrix (``einsum("oi,i->o", w, h)`` under a
    Jacobian's directions: ``bmm`` reads the matrix once per batch entry, as a matrix-vector
    product each, 6x slower on a 1024 -> 256 -> 8 Jacobian, and copying the small operand
    where its reshape cannot be a view costs less than one read of the matrix); with the
    matrix on the right, also a row-major batch (the rows fold without a copy) and a batch of
    matrices with few rows (``_rows_fold``). The layouts are recomputed first
    (:func:`_refresh_layouts`): pass 8's copies make tensors downstream row-major that were
    recorded transposed. With the matrix on the left, a row (``m == 1``) is also one ``mm``
    where a batch entry is small, and a column (``k == 1``: outer products) multiplies the
    batch elementwise (:func:`_outer_products`): ``bmm`` runs a tiny GEMM per batch entry
    (a biharmonic's weights over its directions).
12. Unread rows of a product (on request, the same dot products by smaller GEMMs): the pieces
    of a ``split_with_sizes`` of ``mm(cat(pieces), w)`` along the rows, with the cat's sizes,
    are each ``mm(piece, w)`` when some piece is never read, so neither it nor what only it
    reads is computed (:func:`_rows_of_a_product`): through a last linear layer an order-``K``
    derivative reads only the top Taylor coefficient (order-4 MLP graph 63 -> 54 operators).
13. Activation derivatives (on request, one kernel's rounding for three): ``g * (1 - t * t)``
    of ``t = tanh(x)`` is ``tanh_backward(g, t)`` and ``g * ((1 - s) * s)`` of ``s =
    sigmoid(x)`` is ``sigmoid_backward(g, s)`` when the factor and its parts are read by
    nothing else (:func:`_activation_derivatives`): a GRU's Jacobian graph 263 -> 227
    operators, 7% faster.
14. Scalar factors (on request, before pass 10's ``addcmul``; rounding differs as the factor
    is applied elsewhere): a factor ``c`` of ``x * c``, ``x / c`` or ``-x`` is taken out and
    restored downstream where that scales the fewest elements, and only if fewer than ``x``
    has (:func:`_scalar_factors`). It passes through ops linear in that operand (products,
    sums, reshapes, ``tanh_backward``; an ``add``/``sub``/``addcmul`` it is added to, whose
    coefficient of the other term is divided by ``c``) and is restored for free in a
    coefficient (``add``/``sub``'s ``alpha``, ``addcmul``'s ``value``, another scalar
    factor), or on a product's smaller operand (a weight, hoisted), a smaller result, or just
    before a reader. A search that meets a node twice is dropped (two paths would each
    restore the factor). The signs and 2s of a training step's rules and vector-Jacobian
    products: 6 of a Laplacian's 44 large elementwise passes go, 15 of a biharmonic's 152;
    1-3% of the step.

:func:`for_autograd` makes the copy of a graph that runs when autograd records: there a ``bmm``
one of whose operands is the same matrix expanded over the batch (what ``matmul`` of a
non-contiguous batch by a weight records) is one ``mm``, and an ``addcmul`` is a product and a
sum (autograd's derivative of ``addcmul`` makes two more passes over the data).

A rewrite that would make an output of the graph the same tensor as an input, a constant or
another output (aliasing the caller could observe) is skipped. A graph with any mutating op
(not functional after all) is returned as it is.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any

import torch
from torch._prims_common import compute_elementwise_output_strides, make_contiguous_strides_for
from torch.fx import GraphModule, Node

from xafunc._capture.tracer import ShapeTensor

aten = torch.ops.aten

_RESHAPES = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default,
    aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
}
_NOOP_IF_SAME_SHAPE = _RESHAPES | {
    aten.expand.default, aten.alias.default, aten.clone.default,
}
_PERMUTES = {aten.permute.default, aten.transpose.int, aten.t.default}
_FACTORY_FILL = {
    aten.full.default: lambda n: n.args[1],
    aten.scalar_tensor.default: lambda n: n.args[0],
    aten.ones.default: lambda n: 1,
    aten.zeros.default: lambda n: 0,
}
_COMMUTATIVE = {aten.mul.Tensor, aten.add.Tensor}
_FOLD_NUMEL = 1 << 16
_FOLDED = "_folded_constant"
_LAYOUT_COPY = "xafunc_layout_copy"


def simplify(gm: GraphModule, inexact: bool = False) -> GraphModule:
    """Simplify ``gm`` in place (see NOTE [Graph simplification]) and return it; with
    ``inexact``, also passes 9 to 14 (for derivative graphs: their rounding may differ in the
    last place, as any two ways of computing a derivative do). Runs with no torch.func
    transform active: the constants it makes (folded, or sliced from others) must be plain
    tensors, not wrapped at a level of the call that happens to build the graph (AOTAutograd
    then refuses them, and they outlive the level)."""
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    with temporarily_clear_interpreter_stack():
        return _simplify(gm, inexact)


def _simplify(gm: GraphModule, inexact: bool) -> GraphModule:
    graph = gm.graph
    for node in graph.nodes:
        if node.op == "call_function" and _mutates(node.target):
            return gm
    graph.eliminate_dead_code()
    _fold_constants(gm)
    graph.eliminate_dead_code()
    _sweeps(gm)
    _contiguous_broadcast_operands(gm)
    if inexact:
        _small_batches_of_a_shared_matrix(gm)
        _rows_of_a_product(gm)
        _sweeps(gm)
        _transposed_products(gm)
        _contiguous_outputs(gm)
        _sweeps(gm)
        _activation_derivatives(gm)
        _scalar_factors(gm)
        _fuse_products(gm)
        gm.graph.eliminate_dead_code()
    _sweeps(gm)  # e.g. the transposes pass 9 puts around a weight
    graph.lint()
    gm.recompile()
    return gm


def _sweeps(gm: GraphModule) -> None:
    for _ in range(8):
        if not _sweep(gm):
            break
        gm.graph.eliminate_dead_code()


def _mutates(target: Any) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return bool(target._schema.is_mutable)


# ----------------------------------------------------------------------------- helpers
def _val(gm: GraphModule | None, node: Any) -> torch.Tensor | None:
    """The (fake or, for constants, real) tensor a node stands for, if known."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    if val is None and node.op == "get_attr":
        val = getattr(gm, str(node.target), None)
    return val if isinstance(val, torch.Tensor) else None


def _same_meta(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is not None and b is not None and tuple(a.shape) == tuple(b.shape)
            and a.dtype == b.dtype and a.device == b.device)


def _replace(node: Node, new: Node, outputs: set[Node]) -> bool:
    """Use ``new`` for ``node`` unless that would alias an output with an input, a constant
    or another output."""
    if node in outputs and (new.op != "call_function" or new in outputs):
        return False
    _swap(node, new, outputs)
    return True


def _swap(node: Node, new: Node, outputs: set[Node]) -> None:
    node.replace_all_uses_with(new)
    if node in outputs:
        outputs.discard(node)
        outputs.add(new)


def _new(node: Node, target: Any, args: tuple[Any, ...]) -> Node:
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta.update(node.meta)
    return new


def _moves_unit_dims(shape: Any, p: list[int]) -> bool:
    """Whether permutation ``p`` of ``shape`` keeps the dims larger than 1 in their order."""
    big = [d for d in p if shape[d] != 1]
    return big == sorted(big)


def _perm(gm: GraphModule, node: Node) -> list[int] | None:
    val = _val(gm, node.args[0])
    if val is None:
        return None
    ndim, args = val.dim(), list[Any](node.args)
    if node.target is aten.t.default:
        return [1, 0] if ndim == 2 else list(range(ndim))
    if node.target is aten.transpose.int:
        if ndim == 0:
            return []
        p = list(range(ndim))
        a, b = (int(d) % ndim for d in args[1:3])
        p[a], p[b] = p[b], p[a]
        return p
    return [int(d) % ndim for d in args[1]] if ndim else []


def _constant(gm: GraphModule, arg: Any) -> Any:
    """A Python scalar, or the fill value of a factory node, else None."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return arg
    if isinstance(arg, Node) and arg.op == "call_function" and arg.target in _FACTORY_FILL:
        fill = _FACTORY_FILL[arg.target](arg)
        return fill if isinstance(fill, (int, float)) and not isinstance(fill, bool) else None
    if isinstance(arg, Node) and arg.op == "get_attr" and str(arg.target).startswith(_FOLDED):
        t = getattr(gm, str(arg.target))  # ours (pass 6), never a parameter that may change
        if t.numel() and not t.dtype.is_complex and t.dtype != torch.bool:
            first = t.reshape(-1)[0]
            if bool((t == first).all()):
                return first.item()
    return None


def _identity_operand(gm: GraphModule, node: Node) -> Node | None:
    """``x`` if ``node`` is ``x * 1``, ``1 * x``, ``x / 1``, ``x - 0`` or ``x + 0``."""
    t = node.target
    if t not in (aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor):
        return None
    if len(node.args) != 2 or (node.kwargs and set(node.kwargs) != {"alpha"}):
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    candidates = [(a, b)] + ([(b, a)] if t in (aten.mul.Tensor, aten.add.Tensor) else [])
    out = _val(gm, node)
    for x, c in candidates:
        if not isinstance(x, Node) or not _same_meta(_val(gm, x), out):
            continue
        value = _constant(gm, c)
        if value is None:
            continue
        if t in (aten.mul.Tensor, aten.div.Tensor) and value == 1:
            return x
        if t is aten.sub.Tensor and value == 0:
            return x
        if t is aten.add.Tensor and value == 0:
            # -0.0 + 0.0 == +0.0: only a negative zero (or an exact integer add) is neutral
            assert out is not None
            if not out.dtype.is_floating_point and not out.dtype.is_complex:
                return x
            if isinstance(value, float) and str(value) == "-0.0":
                return x
    return None


def _scalar_product(gm: GraphModule, node: Node) -> tuple[Node, float | int] | None:
    """``(x, c)`` when ``node`` equals ``x * c`` bit for bit: ``x + x`` (``c = 2``), or
    ``(x * a) * b`` with ``a`` or ``b`` equal to ``+-1`` (a sign flip is exact)."""
    out = _val(gm, node)
    if out is None or not out.dtype.is_floating_point or node.kwargs:
        return None
    args = node.args
    if node.target is aten.add.Tensor and len(args) == 2 and args[0] is args[1]:
        x = args[0]
        if isinstance(x, Node) and _same_meta(_val(gm, x), out):
            return x, 2
        return None
    if node.target is not aten.mul.Tensor or len(args) != 2:
        return None
    inner, b = args
    if not isinstance(inner, Node) or not isinstance(b, (int, float)) or isinstance(b, bool):
        return None
    if inner.target is not aten.mul.Tensor or inner.kwargs or len(inner.args) != 2:
        return None
    x, a = inner.args
    if not isinstance(x, Node) or not isinstance(a, (int, float)) or isinstance(a, bool):
        return None
    if not _same_meta(_val(gm, x), out) or (abs(a) != 1 and abs(b) != 1):
        return None
    return x, a * b


def power_of_two_scaling(gm: GraphModule | None, node: Node) -> tuple[Node, float] | None:
    """``(prod, c)`` when ``node`` is ``prod * c`` with ``c = +-2^k`` and ``prod`` a product of
    two floating tensors of ``node``'s dtype read only here: scaling either factor by ``c``
    instead gives the same value bit for bit (a power of two commutes with rounding, short of
    over- or underflow). ``gm`` holds the graph's constants (None: none are needed)."""
    if node.target is not aten.mul.Tensor or node.kwargs or len(node.args) != 2:
        return None
    prod, c = node.args
    if not isinstance(prod, Node) or not isinstance(c, (int, float)) or isinstance(c, bool):
        return None
    if c == 0 or not math.isfinite(c) or math.frexp(abs(c))[0] != 0.5:
        return None
    if (prod.target is not aten.mul.Tensor or prod.kwargs or len(prod.args) != 2
            or len(prod.users) != 1 or not all(isinstance(a, Node) for a in prod.args)):
        return None
    out = _val(gm, node)
    if out is None or not out.dtype.is_floating_point or any(
            v is None or v.dtype != out.dtype for v in (_val(gm, a) for a in prod.args)):
        return None
    return prod, c


def _scale_small_operand(gm: GraphModule, node: Node) -> tuple[Node, Node, float] | None:
    """``(big, small, c)`` when ``node`` is ``(big * small) * c`` (see
    :func:`power_of_two_scaling`) with ``small`` broadcast against ``big``: ``big * (small *
    c)`` scales the small tensor instead of the large one."""
    found = power_of_two_scaling(gm, node)
    if found is None:
        return None
    prod, c = found
    out = _val(gm, node)
    a, b = prod.args
    va, vb = _val(gm, a), _val(gm, b)
    assert out is not None and va is not None and vb is not None
    assert isinstance(a, Node) and isinstance(b, Node)
    if vb.numel() < va.numel() and tuple(va.shape) == tuple(out.shape):
        return a, b, c
    if va.numel() < vb.numel() and tuple(vb.shape) == tuple(out.shape):
        return b, a, c
    return None


def _key(arg: Any) -> Any:
    """A hashable key equal only for arguments that are interchangeable."""
    if isinstance(arg, Node):
        return ("node", arg)
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__, tuple(_key(a) for a in arg))
    if isinstance(arg, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in arg.items())))
    if isinstance(arg, float):
        return ("float", repr(arg))
    if arg is None or isinstance(arg, (bool, int, str, torch.dtype, torch.device,
                                       torch.layout, torch.memory_format)):
        return (type(arg).__name__, arg)
    raise TypeError(type(arg))


def pure_op(target: Any) -> bool:
    """An aten call (or ``getitem``) without side effects or randomness."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target._schema.is_mutable or "empty" in target._schema.name:
        return False
    return torch.Tag.nondeterministic_seeded not in target.tags


# ------------------------------------------------------------------------------- sweep
def _sweep(gm: GraphModule) -> bool:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    outputs = set(out_node.all_input_nodes)
    seen: dict[Any, Node] = {}
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.users:
            continue
        t = node.target
        src = node.args[0] if node.args else None
        out = _val(gm, node)

        # 1. reshapes and copies that keep the shape
        if (t in _NOOP_IF_SAME_SHAPE and isinstance(src, Node)
                and not node.meta.get(_LAYOUT_COPY)):  # the copies of passes 8-9 stay
            if _same_meta(_val(gm, src), out) and _replace(node, src, outputs):
                changed = True
                continue
        # 1b. a select of a size-1 dimension is a reshape (which pass 2 then merges)
        if t is aten.select.int and isinstance(src, Node) and out is not None:
            src_val = _val(gm, src)
            if src_val is not None and src_val.shape[node.args[1]] == 1:
                new = _new(node, aten.reshape.default, (src, list(out.shape)))
                _swap(node, new, outputs)
                node, t, changed = new, new.target, True
        # 2. reshape chains: reshape the chain's root once
        if (t in _RESHAPES and isinstance(src, Node) and src.op == "call_function"
                and src.target in _RESHAPES and out is not None):
            root = src.args[0]
            root_val = _val(gm, root)
            if isinstance(root, Node) and root_val is not None:
                if _same_meta(root_val, out):
                    if _replace(node, root, outputs):
                        changed = True
                        continue
                else:
                    new = _new(node, aten.reshape.default, (root, list(out.shape)))
                    _swap(node, new, outputs)
                    node, t, src, changed = new, new.target, root, True
        # 3. permutes
        if t in _PERMUTES and isinstance(src, Node):
            p = _perm(gm, node)
            if p is not None:
                root = src
                if src.op == "call_function" and src.target in _PERMUTES:
                    inner = _perm(gm, src)
                    if inner is not None and isinstance(src.args[0], Node):
                        root, p = src.args[0], [inner[i] for i in p]
                root_val = _val(gm, root)
                if p == list(range(len(p))):
                    if _same_meta(root_val, out) and _replace(node, root, outputs):
                        changed = True
                        continue
                elif root_val is not None and out is not None and _moves_unit_dims(
                        root_val.shape, p):
                    # 3b. only size-1 dims move: the same elements in the same order
                    new = _new(node, aten.reshape.default, (root, list(out.shape)))
                    _swap(node, new, outputs)
                    changed = True
                    continue
                elif root is not src:
                    new = _new(node, aten.permute.default, (root, p))
                    _swap(node, new, outputs)
                    node, t, changed = new, new.target, True
        # 4. arithmetic identities
        x = _identity_operand(gm, node)
        if x is not None and _replace(node, x, outputs):
            changed = True
            continue
        # 4b. scalar factors: x + x is x * 2; (x * a) * b is x * (a * b) when a or b is +-1
        folded = _scalar_product(gm, node)
        if folded is not None:
            new = _new(node, aten.mul.Tensor, folded)
            _swap(node, new, outputs)
            node, t, changed = new, new.target, True
        # 4b'. a power-of-two factor moves onto the small operand of a broadcasting product
        moved = _scale_small_operand(gm, node)
        if moved is not None:
            big, small, c = moved
            with graph.inserting_before(node):
                scaled = graph.call_function(aten.mul.Tensor, (small, c))
            scaled.meta["val"] = _val(gm, small)
            new = _new(node, aten.mul.Tensor, (big, scaled))
            _swap(node, new, outputs)
            node, t, changed = new, new.target, True
        # 4c. the one piece of a split into one piece
        if (t is operator.getitem and isinstance(src, Node) and src.op == "call_function"
                and src.target is aten.split_with_sizes.default and node.args[1] == 0
                and isinstance(src.args[1], (list, tuple)) and len(src.args[1]) == 1
                and isinstance(src.args[0], Node)
                and _same_meta(_val(gm, src.args[0]), out)
                and _replace(node, src.args[0], outputs)):
            changed = True
            continue
        # 4d. a slice of a cat along the cat's dim that covers whole pieces (or lies in one)
        narrowed = _slice_of_cat(gm, node)
        if narrowed is not None:
            target, nargs = narrowed
            if target is None:
                if _replace(node, nargs[0], outputs):
                    changed = True
                    continue
            else:
                new = _new(node, target, nargs)
                _swap(node, new, outputs)
                changed = True
                continue
        # 4e. a split undone by a cat, or a cat undone by a split
        undone = _split_of_cat(gm, node)
        if undone is not None and _replace(node, undone, outputs):
            changed = True
            continue
        # 4f. a cat of pieces reshaped only by inserting size-1 dims is a reshape of the cat
        # of the pieces; a split of such a reshape is the split of its source, each piece
        # reshaped (the reshapes then merge with their neighbours: pass 2)
        viewed = _unit_view_of_cat(gm, node) or _split_of_unit_view(gm, node, outputs)
        if viewed is not None:
            _swap(node, viewed, outputs)
            changed = True
            continue
        # 5. common subexpressions
        if not pure_op(t):
            continue
        args = node.args
        if (t in _COMMUTATIVE and not node.kwargs and len(args) == 2
                and all(isinstance(a, Node) for a in args)):
            vals = [_val(gm, a) for a in args]
            if (out is not None and not out.dtype.is_complex
                    and all(v is not None and not v.dtype.is_complex for v in vals)):
                args = tuple(sorted(args, key=lambda a: order.get(a, -1)))
        try:
            key = (t, _key(args), _key(dict(node.kwargs)))
        except TypeError:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
        elif _replace(node, first, outputs):
            changed = True
    return changed


def _slice_of_cat(gm: GraphModule, node: Node) -> tuple[Any, tuple[Any, ...]] | None:
    """``slice(cat(pieces, d), d, start, end)`` (step 1) as ``(target, args)``: the ``cat`` of
    the pieces it covers when its bounds fall on piece boundaries (``target=None``: the one
    such piece itself), or a slice of the one piece it lies in. Exact: the same entries."""
    if node.target is not aten.slice.Tensor:
        return None
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1:]
    src, dim, start, end, step = args[:5]
    if step != 1 or not isinstance(src, Node) or src.op != "call_function" or \
            src.target is not aten.cat.default or src.kwargs:
        return None
    val, out = _val(gm, src), _val(gm, node)
    pieces = list(src.args[0])  # type: ignore[arg-type]
    vals = [_val(gm, p) for p in pieces]
    if val is None or out is None or not val.dim() or any(v is None for v in vals) or \
            not all(isinstance(p, Node) for p in pieces):
        return None
    cat_dim = src.args[1] if len(src.args) > 1 else 0
    if not all(isinstance(a, int) or a is None for a in (start, end)) or \
            not isinstance(dim, int) or not isinstance(cat_dim, int):
        return None
    nd = val.dim()
    d = dim % nd
    size = int(val.shape[d])
    if d != cat_dim % nd or any(v.dim() != nd for v in vals):  # type: ignore[union-attr]
        return None
    lo = start if isinstance(start, int) else 0
    hi = end if isinstance(end, int) else size
    lo, hi = (lo + size if lo < 0 else lo), (hi + size if hi < 0 else hi)
    lo, hi = max(0, min(lo, size)), max(0, min(hi, size))
    if (lo, hi) == (0, size) or hi <= lo:
        return None
    bounds, b = [], 0
    for v in vals:
        bounds.append((b, b + int(v.shape[d])))  # type: ignore[union-attr]
        b += int(v.shape[d])  # type: ignore[union-attr]
    inside = [i for i, (b0, b1) in enumerate(bounds) if b0 <= lo and hi <= b1]
    if inside:
        i = inside[0]
        b0, b1 = bounds[i]
        if (lo, hi) == (b0, b1):
            return (None, (pieces[i],)) if _same_meta(vals[i], out) else None
        return aten.slice.Tensor, (pieces[i], d, lo - b0, hi - b0)
    starts = [b0 for b0, _ in bounds]
    ends = [b1 for _, b1 in bounds]
    if lo not in starts or hi not in ends:
        return None
    covered = pieces[starts.index(lo):ends.index(hi) + 1]
    return aten.cat.default, (covered, d)


def _dim_of(node: Node, i: int, default: int, nd: int) -> int | None:
    d = node.args[i] if len(node.args) > i else node.kwargs.get("dim", default)
    return d % nd if isinstance(d, int) and nd else None


def _split_of_cat(gm: GraphModule, node: Node) -> Node | None:
    """Pass 4e: ``cat`` of every piece of one ``split_with_sizes``, in order and along the
    same dim, is the split's input; piece ``i`` of a ``split_with_sizes`` of a ``cat`` along
    the same dim, with the cat's piece sizes, is the cat's piece ``i`` (what a chain of linear
    ops does to a Taylor series whose coefficients its rule concatenates). Exact."""
    out = _val(gm, node)
    if out is None or not out.dim():
        return None
    nd = out.dim()
    if node.target is aten.cat.default and len(node.args[0]) > 1:  # type: ignore[arg-type]
        pieces = list(node.args[0])  # type: ignore[arg-type]
        split = pieces[0].args[0] if isinstance(pieces[0], Node) and \
            pieces[0].target is operator.getitem else None
        if not (isinstance(split, Node) and split.op == "call_function"
                and split.target is aten.split_with_sizes.default
                and len(split.args[1]) == len(pieces)  # type: ignore[arg-type]
                and all(isinstance(p, Node) and p.target is operator.getitem
                        and p.args == (split, i) for i, p in enumerate(pieces))
                and _dim_of(node, 1, 0, nd) == _dim_of(split, 2, 0, nd) is not None
                and isinstance(split.args[0], Node)
                and _same_meta(_val(gm, split.args[0]), out)):
            return None
        return split.args[0]
    if node.target is operator.getitem:
        split, i = node.args
        if not (isinstance(split, Node) and split.op == "call_function"
                and split.target is aten.split_with_sizes.default):
            return None
        cat = split.args[0]
        if not (isinstance(cat, Node) and cat.op == "call_function"
                and cat.target is aten.cat.default and isinstance(i, int)):
            return None
        pieces = list(cat.args[0])  # type: ignore[arg-type]
        vals = [_val(gm, p) if isinstance(p, Node) else None for p in pieces]
        d = _dim_of(split, 2, 0, nd)
        if (d is None or d != _dim_of(cat, 1, 0, nd) or any(v is None or v.dim() != nd
                                                           for v in vals)
                or [int(v.shape[d]) for v in vals] != list(split.args[1])  # type: ignore
                or not _same_meta(vals[i], out)):
            return None
        return pieces[i]  # type: ignore[no-any-return]
    return None


def _rows_of_a_product(gm: GraphModule) -> None:
    """Pass 12: pieces of ``split_with_sizes(mm(cat(pieces, 0), w), sizes, 0)`` with the cat's
    piece sizes are ``mm(piece, w)`` when some piece is never read: its rows are not computed,
    nor what only they read (a Taylor series through a last linear layer, of which an
    ``order``-th derivative reads the top coefficient alone). The same dot products, by
    smaller GEMMs, which may round differently."""
    graph = gm.graph
    for split in list(graph.nodes):
        if split.op != "call_function" or split.target is not aten.split_with_sizes.default:
            continue
        mm = split.args[0]
        if not (isinstance(mm, Node) and mm.op == "call_function"
                and mm.target is aten.mm.default and len(mm.users) == 1
                and _dim_of(split, 2, 0, 2) == 0):
            continue
        cat, w = mm.args
        if not (isinstance(cat, Node) and cat.op == "call_function"
                and cat.target is aten.cat.default and _dim_of(cat, 1, 0, 2) == 0):
            continue
        pieces = list(cat.args[0])  # type: ignore[arg-type]
        vals = [_val(gm, p) for p in pieces]
        users = list(split.users)
        if (any(v is None or v.dim() != 2 for v in vals)
                or [int(v.shape[0]) for v in vals] != list(split.args[1])  # type: ignore
                or not all(u.target is operator.getitem and isinstance(u.args[1], int)
                           for u in users)
                or len({u.args[1] for u in users}) == len(pieces)):
            continue
        for u in users:
            with graph.inserting_before(u):
                rows = graph.call_function(aten.mm.default, (pieces[u.args[1]], w))
            rows.meta["val"] = u.meta.get("val")
            u.replace_all_uses_with(rows)
    graph.eliminate_dead_code()


def _unit_source(gm: GraphModule, node: Any, d: int) -> tuple[Node, int] | None:
    """For ``node = reshape(x)`` that only inserts size-1 dims into ``x``: ``(x, j)`` with ``j``
    the dim of ``x`` that ``node``'s dim ``d`` is; else None."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in _RESHAPES
            and isinstance(node.args[0], Node)):
        return None
    x = node.args[0]
    vx, vn = _val(gm, x), _val(gm, node)
    if vx is None or vn is None:
        return None
    dims = _unit_dims(tuple(vx.shape), tuple(vn.shape))
    j = None if dims is None else dims[d]
    return None if j is None else (x, j)


def _unit_view_of_cat(gm: GraphModule, node: Node) -> Node | None:
    """Pass 4f, cat: ``cat([reshape(x_i), ...], d)`` whose reshapes all only insert size-1
    dims, the same ones, is ``reshape(cat([x_i, ...], j), shape)`` (``j``: the dim of ``x_i``
    that ``d`` is). Exact: the same entries in the same order."""
    out = _val(gm, node)
    if node.target is not aten.cat.default or out is None or not out.dim():
        return None
    d = _dim_of(node, 1, 0, out.dim())
    pieces = list(node.args[0])  # type: ignore[arg-type]
    if d is None or len(pieces) < 2:
        return None
    found = [_unit_source(gm, p, d) for p in pieces]
    if any(f is None for f in found) or any(len(p.users) != 1 for p in pieces):
        return None  # (a piece's reshape read elsewhere stays: nothing saved)
    sources = [f[0] for f in found]  # type: ignore[index]
    js = {f[1] for f in found}  # type: ignore[index]
    vals = [_val(gm, x) for x in sources]
    if len(js) != 1 or len({v.dim() for v in vals}) != 1:  # type: ignore[union-attr]
        return None
    j = js.pop()
    rest = {tuple(v.shape[:j]) + tuple(v.shape[j + 1:]) for v in vals}  # type: ignore
    if len(rest) != 1:
        return None
    first = vals[0]
    assert first is not None
    shape = list(first.shape)
    shape[j] = sum(int(v.shape[j]) for v in vals if v is not None)
    with node.graph.inserting_before(node):
        cat = _call(node, aten.cat.default, (sources, j), _row_major(shape, first))
        return _call(node, aten.reshape.default, (cat, list(out.shape)), out)


def _split_of_unit_view(gm: GraphModule, node: Node, outputs: set[Node]) -> Node | None:
    """Pass 4f, split: ``split_with_sizes(reshape(x), sizes, d)`` whose reshape only inserts
    size-1 dims is the split of ``x`` along the dim ``j`` that ``d`` is, each piece reshaped
    to the shape it had (every user a ``getitem`` whose readers reshape it). Exact. Returns
    the new split; its ``getitem`` users are rewired here."""
    out = _val(gm, node.args[0]) if node.args else None
    if node.target is not aten.split_with_sizes.default or out is None or not out.dim():
        return None
    d = _dim_of(node, 2, 0, out.dim())
    found = None if d is None else _unit_source(gm, node.args[0], d)
    users = list(node.users)
    # only where it saves operators: the reshape read by this split alone, and every piece
    # reshaped by all its readers (the reshapes back then merge with theirs)
    if found is None or len(node.args[0].users) != 1 or not all(  # type: ignore[union-attr]
            u.target is operator.getitem and isinstance(u.args[1], int)
            and _val(gm, u) is not None and u not in outputs and u.users
            and all(r.target in _RESHAPES for r in u.users) for u in users):
        return None
    x, j = found
    vx = _val(gm, x)
    assert vx is not None
    sizes = list(node.args[1])  # type: ignore[arg-type]
    with node.graph.inserting_before(node):
        split = node.graph.call_function(aten.split_with_sizes.default, (x, sizes, j))
    split.meta["val"] = pieces = list(ShapeTensor.like(vx).split(sizes, j))  # (vx: a constant?)
    for u in users:
        i, vu = u.args[1], _val(gm, u)
        assert isinstance(i, int) and vu is not None
        with node.graph.inserting_before(u):
            piece = _call(u, operator.getitem, (split, i), pieces[i])
            back = _call(u, aten.reshape.default, (piece, list(vu.shape)), vu)
        u.replace_all_uses_with(back)
    return split


# ------------------------------------------------------------------- constant subgraphs
_LIKE_FILL = {
    aten.full_like.default: lambda n: n.args[1],
    aten.zeros_like.default: lambda n: 0,
    aten.ones_like.default: lambda n: 1,
}


def _fold_constants(gm: GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        # a factory ``*_like(x)`` reads only ``x``'s shape, dtype and device, which are fixed
        # per graph: it is the ``full`` they give (row-major, as ``x`` was traced), and no
        # longer keeps ``x`` alive -- the seed of a reverse sweep, ``ones_like(y)``, no longer
        # needs the primal ``y`` (its last layer becomes dead code)
        fill = _LIKE_FILL.get(node.target) if node.op == "call_function" else None
        val = node.meta.get("val")
        if (fill is None or not isinstance(val, torch.Tensor) or val.layout != torch.strided
                or not val.is_contiguous() or not isinstance(fill(node), (int, float, bool))):
            continue
        with graph.inserting_before(node):
            full = graph.call_function(aten.full.default, (list(val.shape), fill(node)), {
                "dtype": val.dtype, "layout": torch.strided, "device": val.device,
                "pin_memory": False})
        full.meta.update(node.meta)
        node.replace_all_uses_with(full)
        graph.erase_node(node)
    values: dict[Node, Any] = {}
    for node in graph.nodes:
        if node.op != "call_function" or not pure_op(node.target):
            continue
        if not all(a in values for a in node.all_input_nodes):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: values[a])
        try:
            value = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - leave anything that does not run as it is
            continue
        leaves = value if isinstance(value, (list, tuple)) else [value]
        if all(isinstance(v, torch.Tensor) and v.numel() <= _FOLD_NUMEL and _plain(v)
               for v in leaves):
            values[node] = value
    for node, value in values.items():
        users = [u for u in node.users if u not in values]
        if not isinstance(value, torch.Tensor) or not users or any(
                u.op == "output" for u in users):
            continue
        with graph.inserting_before(node):
            const = graph.get_attr(_new_constant(gm, value))
        const.meta.update(node.meta)
        for u in users:
            u.replace_input_with(node, const)


def _new_constant(gm: GraphModule, value: torch.Tensor) -> str:
    """The name of a new constant of ``gm`` holding ``value`` (a non-persistent buffer)."""
    name = f"{_FOLDED}{sum(k.startswith(_FOLDED) for k in dir(gm))}"
    gm.register_buffer(name, value, persistent=False)
    return name


def _plain(t: torch.Tensor) -> bool:
    """A real tensor: not fake (an enclosing trace) nor wrapped by a torch.func transform."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(t, FakeTensor) or type(t) is not torch.Tensor:
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


# ------------------------------------------------------------------------------ layout
# NOTE [Broadcast operand layout]
# TensorIterator gives a pointwise op's output the stride order of its operands, and a
# broadcast operand decides it wherever the others have size-1 dimensions: ``h (512, 1, 64) *
# w (3, 64)`` with ``w`` a slice of a transposed weight (strides ``(1, 3)``) comes out with
# the size-3 dimension innermost. Every later op on it then runs 3-element inner loops, and
# reshapes of it copy: 10x slower than row-major on the per-sample Hessian graph. Copying the
# small operand (here 192 numbers, against 98k in the output) is cheap and makes the output
# row-major. Where the output is row-major already, a broadcast operand whose last dimension
# is not contiguous still makes the inner loop strided, not vectorised: ``h (1024, 2, 64) *
# w (2, 64)``, ``w`` a transposed weight, took 146 us against 60 us with ``w`` copied (the
# first layer of a Laplacian training step, NOTE [Split graphs]). Only done for operands at
# most 1/4 of the output, so the copy never costs more than a fraction of the op itself (and
# a copy of a weight's transpose is hoisted: computed once, not per call).
_BROADCAST_COPY_RATIO = 4


def _contiguous_broadcast_operands(gm: GraphModule) -> None:
    graph = gm.graph
    copies: dict[Node, Node] = {}
    for node in list(graph.nodes):
        t = node.target
        if (node.op != "call_function" or not isinstance(t, torch._ops.OpOverload)
                or torch.Tag.pointwise not in t.tags):
            continue
        out = _val(gm, node)
        if out is None:
            continue
        for arg in node.args:
            v = _val(gm, arg)
            if (v is None or v.dim() < 2 or v.is_contiguous()
                    or v.numel() * _BROADCAST_COPY_RATIO > out.numel()
                    or (out.is_contiguous() and (v.shape[-1] == 1 or v.stride(-1) == 1))):
                continue
            assert isinstance(arg, Node)
            copy = copies.get(arg)
            if copy is None:
                with graph.inserting_after(arg):
                    copy = graph.call_function(aten.clone.default, (arg,),
                                               {"memory_format": torch.contiguous_format})
                copy.meta["val"] = v.clone(memory_format=torch.contiguous_format)
                copy.meta[_LAYOUT_COPY] = True
                copies[arg] = copy
            node.replace_input_with(arg, copy)


_OUTPUT_COPY_NUMEL = 1 << 16


def _transposed_products(gm: GraphModule) -> None:
    """Pass 9: ``mm(a, b).t()`` is ``mm(b.t(), a.t())``, and a ``bmm``'s transpose likewise,
    where nothing else reads the product and the transpose's readers (through reshapes and
    permutes) see a non-row-major value: the result is row-major, so the operators that
    read it do not run strided loops (a third-order PINN step's backward summed a
    transposed ``(1024, 2, 1, 64)`` product in 261-273 us, 46 us row-major). Where later
    permutes undo the transpose, the value they end with is row-major already: left alone."""
    graph = gm.graph
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    outputs = set(out_node.all_input_nodes)
    changed = False
    for node in list(graph.nodes):
        src = node.args[0] if node.args else None
        if (node.op != "call_function" or node.target not in _PERMUTES
                or not isinstance(src, Node)
                or src.target not in (aten.mm.default, aten.bmm.default)
                or len(src.users) != 1 or src in outputs):
            continue
        val = _val(gm, node)
        d = val.dim() if val is not None else 0
        swap = [*range(d - 2), d - 1, d - 2]
        if val is None or d < 2 or _perm(gm, node) != swap:
            continue
        end = node
        while len(end.users) == 1 and (user := next(iter(end.users))).op == "call_function" \
                and (user.target in _RESHAPES or user.target in _PERMUTES):
            end = user
        seen = _val(gm, end)
        if seen is None or seen.is_contiguous():
            continue
        a, b = src.args
        with graph.inserting_before(node):
            bt = graph.call_function(aten.permute.default, (b, swap))
            at = graph.call_function(aten.permute.default, (a, swap))
            new = graph.call_function(src.target, (bt, at))
        for n, v in ((bt, _val(gm, b)), (at, _val(gm, a))):
            if v is not None:
                n.meta["val"] = v.transpose(-1, -2)
        new.meta["val"] = val.contiguous()
        _swap(node, new, outputs)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        _refresh_layouts(gm)  # what reads the products is row-major now


def _contiguous_outputs(gm: GraphModule) -> None:
    graph = gm.graph
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    for node in list(out_node.all_input_nodes):
        val = _val(gm, node)
        if val is None or node.op != "call_function" or val.is_contiguous():
            continue
        if val.numel() <= _OUTPUT_COPY_NUMEL:
            with graph.inserting_before(out_node):
                new = graph.call_function(aten.clone.default, (node,),
                                          {"memory_format": torch.contiguous_format})
            new.meta["val"] = val.contiguous()
            new.meta[_LAYOUT_COPY] = True
        else:
            continue
        out_node.replace_input_with(node, new)
    graph.eliminate_dead_code()


# ------------------------------------------------------------------ pass 10: fewer passes
def _unit_dims(src: tuple[int, ...], dst: tuple[int, ...]) -> list[int | None] | None:
    """For a reshape ``src -> dst`` that only inserts size-1 dimensions: for each ``dst``
    dimension, the ``src`` dimension it is (``None`` for an inserted one); else ``None``."""
    out: list[int | None] = []
    j = 0
    for d in dst:
        if j < len(src) and src[j] == d:
            out.append(j)
            j += 1
        elif d == 1:
            out.append(None)
        else:
            return None
    return out if j == len(src) else None


def _fuse_products(gm: GraphModule) -> None:
    graph = gm.graph
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    outputs = set(out_node.all_input_nodes)
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.users:
            continue
        new = _reassociate(gm, node) or _fused_add(gm, node)
        if new is not None:
            _swap(node, new, outputs)


def for_autograd(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` for runs that record autograd history (see NOTE [Fast execution]):
    every ``bmm`` one of whose operands is a matrix expanded over the batch is one ``mm``
    (:func:`_shared_matrix_bmm`), and every ``addcmul`` a product and a sum
    (:func:`_unfused_addcmul`). Without recording, the ``bmm`` form of a batch larger than
    the matrix is as fast or faster (it reads a transposed batch without copying it; smaller
    batches are one ``mm`` in every graph, pass 11); under autograd its backward builds the
    matrix's gradient per batch entry and sums it, an intermediate the batch size times the
    matrix (256 x 256 x 256 in a PINN training step)."""
    graph = copy.deepcopy(gm.graph)  # new nodes, the same meta values and constants
    new = GraphModule(gm, graph)
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    outputs = set(out_node.all_input_nodes)
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.users:
            mm = _shared_matrix_bmm(new, node) or _unfused_addcmul(new, node)
            if mm is not None:
                _swap(node, mm, outputs)
                changed = True
    if not changed:
        return gm
    graph.eliminate_dead_code()
    new.recompile()
    return new


def _unfused_addcmul(gm: GraphModule, node: Node) -> Node | None:
    """``addcmul(c, a, b)`` -> ``c + a * b`` for the graph autograd records: the same
    products and sum, but autograd differentiates ``addcmul`` with two more passes over the
    data (each factor's gradient is ``grad * (other * value)``, the scaling a pass of its own
    even for ``value = 1``), 15% of a biharmonic training step whose Taylor rules use it."""
    if node.target is not aten.addcmul.default or set(node.kwargs) - {"value"} \
            or len(node.args) != 3:
        return None
    c, a, b = node.args
    out, va, vb = _val(gm, node), _val(gm, a), _val(gm, b)
    if out is None or va is None or vb is None:
        return None
    with node.graph.inserting_before(node):
        prod = _call(node, aten.mul.Tensor, (a, b),
                     _row_major(list(torch.broadcast_shapes(va.shape, vb.shape)), out))
        new = _call(node, aten.add.Tensor, (c, prod), out)
    value = node.kwargs.get("value", 1)
    if value != 1:  # pass 14's scalar factor
        new.kwargs = {"alpha": value}
    return new


def _broadcast_matrix(gm: GraphModule, node: Any) -> Node | None:
    """The source of a ``(k, n)`` matrix that ``node`` broadcasts over a batch ``[N, k, n]``,
    or None: ``expand(w, [N, k, n])``, or ``reshape(expand(w, [N, 1, ..., k, n]), [N, k, n])``
    (an einsum's form) of a ``w`` with ``k * n`` entries that varies along neither the batch
    nor the size-1 dimensions. Every batch entry is then ``w.reshape(k, n)``."""
    if not isinstance(node, Node):
        return None
    out = _val(gm, node)
    if out is None or out.dim() != 3:
        return None
    if node.target is aten.reshape.default and isinstance(node.args[0], Node):
        node = node.args[0]
    if node.target is not aten.expand.default or not isinstance(node.args[0], Node):
        return None
    src, shape = node.args[0], list(node.args[1])
    v = _val(gm, src)
    if (v is None or len(shape) < 3 or shape[0] != out.shape[0]
            or shape[-2:] != list(out.shape[1:]) or math.prod(shape[1:-2]) != 1
            or v.dim() > len(shape) or v.numel() != out.shape[1] * out.shape[2]):
        return None
    aligned = [1] * (len(shape) - v.dim()) + list(v.shape)
    return src if aligned[0] == 1 and aligned[1:] == shape[1:] else None


def _matrix(node: Node, src: Node, k: int, n: int) -> Node:
    """``src`` (see :func:`_broadcast_matrix`) as a ``(k, n)`` matrix, inserted before
    ``node``."""
    v = src.meta["val"]
    if tuple(v.shape) == (k, n):
        return src
    return _call(node, aten.reshape.default, (src, [k, n]), v.reshape(k, n))


def _shared_matrix_bmm(gm: GraphModule, node: Node) -> Node | None:
    """A batched product with one operand the same matrix for every batch entry (``matmul``
    of a non-contiguous batch by a weight expands the weight and calls ``bmm``) is one ``mm``:
    ``bmm(a, expand(w))`` -> ``mm(a.reshape(N*m, k), w).reshape(N, m, n)`` and
    ``bmm(expand(w), b)`` -> ``mm(w, b.permute(1, 0, 2).reshape(k, N*n))`` viewed back. Under
    autograd the ``bmm`` form also makes the weight's gradient a per-batch ``(N, k, n)`` tensor
    summed afterwards (a 256x larger intermediate in a PINN training step)."""
    vals = _real_operands(gm, node, 2) if node.target is aten.bmm.default else None
    if vals is None:
        return None
    (a, b), (va, vb, out) = node.args, vals
    n_batch, m, k = va.shape
    n = vb.shape[2]
    g = node.graph
    src = _broadcast_matrix(gm, b)
    if src is not None and _broadcast_matrix(gm, a) is None:
        with g.inserting_before(node):
            w = _matrix(node, src, k, n)
            a2 = _call(node, aten.reshape.default, (a, [n_batch * m, k]),
                       va.reshape(n_batch * m, k))
            prod = _call(node, aten.mm.default, (a2, w), out.reshape(n_batch * m, n))
            return _call(node, aten.reshape.default, (prod, [n_batch, m, n]), out)
    src = _broadcast_matrix(gm, a)
    if src is not None and _broadcast_matrix(gm, b) is None:
        with g.inserting_before(node):
            w = _matrix(node, src, m, k)
            if n == 1:  # a batch of vectors: (b (N, k) @ w.T).reshape(N, m, 1), row-major
                b2 = _call(node, aten.reshape.default, (b, [n_batch, k]),
                           vb.reshape(n_batch, k))
                wt = _call(node, aten.permute.default, (w, [1, 0]),
                           w.meta["val"].permute(1, 0))
                prod = _call(node, aten.mm.default, (b2, wt), out.reshape(n_batch, m))
                return _call(node, aten.reshape.default, (prod, [n_batch, m, 1]), out)
            bt = _call(node, aten.permute.default, (b, [1, 0, 2]), vb.permute(1, 0, 2))
            b2 = _call(node, aten.reshape.default, (bt, [k, n_batch * n]),
                       bt.meta["val"].reshape(k, n_batch * n))
            prod = _call(node, aten.mm.default, (w, b2), out.new_empty((m, n_batch * n)))
            p3 = _call(node, aten.reshape.default, (prod, [m, n_batch, n]),
                       prod.meta["val"].reshape(m, n_batch, n))
            return _call(node, aten.permute.default, (p3, [1, 0, 2]),
                         p3.meta["val"].permute(1, 0, 2))
    return None


# Operators whose layout a storage-less tensor computes in C++ (their Python meta kernels would
# import torch._dynamo, NOTE [Tracer]); pointwise operators follow TensorIterator's rule.
_LAYOUT_OPS = {aten.permute.default, aten.reshape.default, aten.view.default,
               aten._unsafe_view.default, aten.expand.default, aten.unsqueeze.default,
               aten.squeeze.dim, aten.transpose.int, aten.t.default, aten.slice.Tensor,
               aten.select.int, aten.alias.default, aten.clone.default, aten.mm.default,
               aten.bmm.default, aten.sum.dim_IntList}


def _layout(node: Node, vals: list[Any]) -> torch.Tensor | None:
    """The layout ``node`` computes from operands of layouts ``vals`` (None: unknown)."""
    old, op = node.meta["val"], node.target
    assert isinstance(op, torch._ops.OpOverload)
    if op in _LAYOUT_OPS:
        args = [ShapeTensor.like(v) if isinstance(v, torch.Tensor) else v for v in vals]
        out = op(*args, **node.kwargs)
        return out if isinstance(out, torch.Tensor) else None
    if torch.Tag.pointwise not in op.tags or node.kwargs:
        return None
    tensors = [ShapeTensor.like(v).expand(old.shape) for v in vals
               if isinstance(v, torch.Tensor) and v.dim()]
    if not tensors:
        return None
    stride = compute_elementwise_output_strides(*tensors)
    return ShapeTensor(old.shape, stride, old.dtype, old.device)


def _refresh_layouts(gm: GraphModule) -> None:
    """Recompute the strides in ``meta["val"]`` from the operands' (shapes are unchanged):
    the layout copies of passes 8-9 change the layouts downstream of them, which the recorded
    values predate. Strides steer only speed (which kernel, whether to copy), never values;
    a node of another operator keeps its recorded value."""
    for node in gm.graph.nodes:
        old = node.meta.get("val")
        if (node.op != "call_function" or not isinstance(old, torch.Tensor)
                or not isinstance(node.target, torch._ops.OpOverload)):
            continue
        vals = [_val(gm, a) if isinstance(a, Node) else a for a in node.args]
        if any(isinstance(a, Node) and v is None for a, v in zip(node.args, vals, strict=True)):
            continue
        try:
            new = _layout(node, vals)
        except Exception:  # an operand this rule does not cover: keep what was recorded
            continue
        if new is not None and new.shape == old.shape:
            node.meta["val"] = new


def _expanded_constants(gm: GraphModule) -> None:
    """A 3-D constant of the graph that is one matrix expanded over its first dimension
    (stride 0: traced from a tensor expanded outside the trace) becomes ``expand`` of that
    matrix, the form :func:`_broadcast_matrix` reads."""
    graph = gm.graph
    for node in list(graph.nodes):
        value = getattr(gm, str(node.target), None) if node.op == "get_attr" else None
        if (not isinstance(value, torch.Tensor) or value.dim() != 3 or value.stride(0) != 0
                or value.shape[0] < 2 or not _plain(value)):
            continue
        with graph.inserting_before(node):
            one = graph.get_attr(_new_constant(gm, value[:1].clone()))
            new = graph.call_function(aten.expand.default, (one, list(value.shape)))
        one.meta["val"] = value[:1].clone()
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _small_batches_of_a_shared_matrix(gm: GraphModule) -> None:
    """Pass 11 of NOTE [Graph simplification]."""
    graph = gm.graph
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    outputs = set(out_node.all_input_nodes)
    _expanded_constants(gm)
    _refresh_layouts(gm)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.bmm.default or not node.users:
            continue
        a, b = node.args
        wa, wb = _broadcast_matrix(gm, a), _broadcast_matrix(gm, b)
        if (wa is None) == (wb is None):
            continue
        w, other = (wa, b) if wa is not None else (wb, a)
        vw, vo = _val(gm, w), _val(gm, other)
        if vw is None or vo is None:
            continue
        if wa is not None and (outer := _outer_products(gm, node, wa)) is not None:
            _swap(node, outer, outputs)
            continue
        va = _val(gm, a)
        row = wa is not None and va is not None and va.shape[1] == 1 \
            and vo.shape[1] * vo.shape[2] <= _ROW_COPY_NUMEL
        if vo.numel() > vw.numel() and not row \
                and not (wb is not None and _rows_fold(vo, vw)):
            continue
        mm = _shared_matrix_bmm(gm, node)
        if mm is not None:
            _swap(node, mm, outputs)


def _outer_products(gm: GraphModule, node: Node, src: Node) -> Node | None:
    """``bmm(expand(w), b)`` with ``w`` an ``(m, 1)`` column and ``b`` a batch of ``(1, n)``
    rows, as the broadcast product ``w.reshape(1, m, 1) * b``: ``bmm`` runs one tiny GEMM per
    batch entry, the outer products of a ``(4, 1)`` column with 1024 rows of 64 in 787 us
    against 41 us (a biharmonic's weights over its directions, in its backward pass)."""
    vals = _real_operands(gm, node, 2)
    if vals is None:
        return None
    (_, b), (va, _, out) = node.args, vals
    _, m, k = va.shape
    if k != 1:
        return None
    with node.graph.inserting_before(node):
        w = _matrix(node, src, m, 1)
        wv = _call(node, aten.reshape.default, (w, [1, m, 1]), w.meta["val"].reshape(1, m, 1))
        return _call(node, aten.mul.Tensor, (wv, b), out)


#: the most entries ``k * n`` of a batch entry for which ``bmm(expand(w), b)`` of a row ``w``
#: is one ``mm`` of the batch copied to ``(k, N * n)``: ``bmm`` costs about 350 ns an entry
#: (a GEMV each), the copy about 0.2 ns a number (a biharmonic's weighted sum of 4
#: directions of 64 over 1024 points: 377 us by ``bmm``, 55 us)
_ROW_COPY_NUMEL = 1024


def _rows_fold(batch: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``bmm(batch, expand(w))`` (``batch`` ``(N, m, k)``, ``w`` ``k * n`` entries) is
    faster as one ``mm`` of the batch's rows even where the batch outnumbers the matrix: when
    the rows fold without a copy (a row-major batch: the ``mm`` reads the same numbers, and
    ``bmm`` packs ``w`` once per entry, 1.0-3.3x slower measured on CPU), or when each entry
    has few rows (``8 m < n``: the packing costs ``k n`` per entry, the copy ``m k``; 1.1-3x
    slower measured for ``m`` = 2-16, ``n`` = 24-256)."""
    _, m, k = batch.shape
    n = w.numel() // max(k, 1)
    rows = all(size == 1 or stride == want for size, stride, want in
               zip(batch.shape, batch.stride(), (m * k, k, 1), strict=True))
    return rows or 8 * m < n


def _real_operands(gm: GraphModule, node: Node, n: int, kwargs: tuple[str, ...] = ()
                   ) -> list[torch.Tensor] | None:
    """The values of ``node``'s ``n`` tensor operands, if it is a call on real floating tensors
    of one dtype with no keyword arguments but ``kwargs``, else None."""
    if set(node.kwargs) - set(kwargs) or len(node.args) != n or \
            not all(isinstance(a, Node) for a in node.args):
        return None
    vals = [_val(gm, a) for a in node.args] + [_val(gm, node)]
    if any(v is None for v in vals):
        return None
    dtypes = {v.dtype for v in vals if v is not None}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return None
    return vals  # type: ignore[return-value]


def _real_binary(gm: GraphModule, node: Node, target: Any, kwargs: tuple[str, ...] = ()
                 ) -> torch.Tensor | None:
    """The value of ``node`` if it is ``target`` applied to two real floating tensors of one
    dtype, else None."""
    if node.target is not target:
        return None
    vals = _real_operands(gm, node, 2, kwargs)
    return None if vals is None else vals[2]


def _reassociate(gm: GraphModule, node: Node) -> Node | None:
    """``s1 * [reshape](big * s2)`` -> ``[reshape](big) * (s1 * [reshape](s2))`` where ``s1``,
    ``s2`` broadcast against ``big``, which has the output's shape (after the reshape, which
    may only insert size-1 dimensions)."""
    out = _real_binary(gm, node, aten.mul.Tensor)
    if out is None:
        return None
    shape = tuple(out.shape)
    for inner, s1 in (node.args, node.args[::-1]):
        assert isinstance(inner, Node) and isinstance(s1, Node)
        v1 = _val(gm, s1)
        assert v1 is not None
        reshape = None
        if inner.target is aten.reshape.default and isinstance(inner.args[0], Node):
            reshape, inner = inner, inner.args[0]
        if (v1.numel() >= out.numel() or inner.target is not aten.mul.Tensor
                or len(inner.users) != 1 or (reshape is not None and len(reshape.users) != 1)
                or _real_operands(gm, inner, 2) is None):
            continue
        for big, s2 in (inner.args, inner.args[::-1]):
            vb, v2 = _val(gm, big), _val(gm, s2)
            assert vb is not None and v2 is not None
            if v2.numel() >= vb.numel():
                continue
            dims = _unit_dims(tuple(vb.shape), shape)
            if dims is None or (reshape is None and tuple(vb.shape) != shape):
                continue
            padded = (1,) * (vb.dim() - v2.dim()) + tuple(v2.shape)
            s2_shape = [1 if j is None else padded[j] for j in dims]
            small_shape = torch.broadcast_shapes(tuple(v1.shape), tuple(s2_shape))
            if math.prod(small_shape) >= out.numel():
                continue
            with node.graph.inserting_before(node):
                if reshape is not None:
                    big = _call(node, aten.reshape.default, (big, list(shape)),
                                vb.reshape(shape))
                    s2 = _call(node, aten.reshape.default, (s2, s2_shape), v2.reshape(s2_shape))
                both = _call(node, aten.mul.Tensor, (s1, s2), v1.new_empty(small_shape))
                return _call(node, aten.mul.Tensor, (big, both), out)
    return None


def _fused_add(gm: GraphModule, node: Node) -> Node | None:
    """``a * b + c`` -> ``addcmul(c, a, b)`` (one pass instead of two). Not ``mm(a, b) + bias``
    -> ``addmm``: on CPU that is slower than the two ops for ``(512, 64) x (64, 64)``."""
    alpha = node.kwargs.get("alpha", 1)  # c + alpha * (a * b): pass 14's scalar factor
    out = _real_binary(gm, node, aten.add.Tensor, ("alpha",))
    if out is None:
        return None
    for prod, c in (node.args, node.args[::-1]) if alpha == 1 else (node.args[::-1],):
        assert isinstance(prod, Node) and isinstance(c, Node)
        if len(prod.users) != 1 or prod.kwargs:
            continue
        if prod.target is aten.mul.Tensor and _real_operands(gm, prod, 2) is not None:
            with node.graph.inserting_before(node):
                new = _call(node, aten.addcmul.default, (c, *prod.args), out)
            if alpha != 1:
                new.kwargs = {"value": alpha}
            return new
    return None


def _activation_derivatives(gm: GraphModule) -> None:
    """Pass 13 of NOTE [Graph simplification]: ``g * (1 - t * t)`` with ``t = tanh(x)`` is
    ``tanh_backward(g, t)`` and ``g * ((1 - s) * s)`` with ``s = sigmoid(x)`` is
    ``sigmoid_backward(g, s)``: one kernel for three, where the factor and its parts are read
    by nothing else, of real floating tensors of one dtype (the kernels broadcast ``g`` and
    the activation's output as ``mul`` does)."""
    graph = gm.graph
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    outputs = set(out_node.all_input_nodes)
    for node in list(graph.nodes):
        out = _real_binary(gm, node, aten.mul.Tensor)
        if out is None or not node.users:
            continue
        for factor, g in (node.args, node.args[::-1]):
            y, target = _activation_output(factor)
            if target is not None and _same_meta(_val(gm, y), _val(gm, factor)):
                with graph.inserting_before(node):
                    _swap(node, _call(node, target, (g, y), out), outputs)
                break
    graph.eliminate_dead_code()


def _activation_output(factor: Any) -> tuple[Any, Any]:
    """``(t, tanh_backward)`` if ``factor`` is ``1 - t * t`` of ``t = tanh(x)``, ``(s,
    sigmoid_backward)`` if it is ``(1 - s) * s`` of ``s = sigmoid(x)`` (either order), read
    only by the product being fused; else ``(None, None)``."""
    def one_minus(n: Any) -> Any:  # the ``v`` of a single-use ``1 - v``
        if not isinstance(n, Node) or n.kwargs or len(n.args) != 2 or len(n.users) != 1:
            return None
        one, v = n.args if n.target is aten.sub.Tensor else \
            n.args[::-1] if n.target is aten.rsub.Scalar else (None, None)
        return v if type(one) in (int, float) and one == 1 and isinstance(v, Node) else None

    if not isinstance(factor, Node) or len(factor.users) != 1:
        return None, None
    square = one_minus(factor)
    if (isinstance(square, Node) and square.target is aten.mul.Tensor and not square.kwargs
            and len(square.users) == 1 and len(square.args) == 2
            and square.args[0] is square.args[1]
            and getattr(square.args[0], "target", None) is aten.tanh.default):
        return square.args[0], aten.tanh_backward.default
    if factor.target is aten.mul.Tensor and not factor.kwargs and len(factor.args) == 2:
        for a, b in (factor.args, factor.args[::-1]):
            if getattr(b, "target", None) is aten.sigmoid.default and one_minus(a) is b:
                return b, aten.sigmoid_backward.default
    return None, None


def _row_major(shape: list[int], like: torch.Tensor) -> ShapeTensor:
    """The layout of a new row-major tensor of ``shape`` with ``like``'s dtype and device."""
    return ShapeTensor(shape, make_contiguous_strides_for(shape), like.dtype, like.device)


def _call(where: Node, target: Any, args: tuple[Any, ...], val: torch.Tensor) -> Node:
    new = where.graph.call_function(target, args)
    new.meta["val"] = val
    return new


# ----------------------------------------------------------------------------- pass 14
#: ops linear in the operand at these positions: a scalar factor of it passes through them
_LINEAR_IN: dict[Any, tuple[int, ...]] = {
    aten.mul.Tensor: (0, 1), aten.div.Tensor: (0,), aten.mm.default: (0, 1),
    aten.bmm.default: (0, 1), aten.sum.dim_IntList: (0,), aten.sum.default: (0,),
    aten.mean.dim: (0,), aten.tanh_backward.default: (0,),
    aten.sigmoid_backward.default: (0,), aten.detach.default: (0,),
    aten.select.int: (0,), aten.slice.Tensor: (0,),
    **{t: (0,) for t in _NOOP_IF_SAME_SHAPE | _PERMUTES},
}
#: ops whose result is a view (restoring a factor after one would copy it)
_VIEWS = _RESHAPES | _PERMUTES | {aten.expand.default, aten.alias.default, aten.detach.default,
                                  aten.select.int, aten.slice.Tensor}
#: the products whose other tensor operand may take the factor instead
_PRODUCTS = {aten.mul.Tensor, aten.mm.default, aten.bmm.default}
#: the most nodes one factor's search visits
_SCALE_SEARCH = 48


def _scale_source(gm: GraphModule, node: Node) -> tuple[Node, float] | None:
    """``(x, c)`` when ``node`` is ``x * c``, ``c * x``, ``x / c`` or ``-x`` of a real floating
    tensor ``x`` with ``node``'s shape and dtype, ``c`` a finite nonzero Python number."""
    out = _val(gm, node)
    if out is None or not out.dtype.is_floating_point or node.kwargs:
        return None
    args: tuple[Any, ...] = node.args
    x: Any
    c: Any
    if node.target is aten.neg.default and len(args) == 1:
        x, c = args[0], -1.0
    elif node.target is aten.mul.Tensor and len(args) == 2:
        x, c = args if isinstance(args[0], Node) else args[::-1]
    elif node.target is aten.div.Tensor and len(args) == 2 and _number(args[1]):
        x, c = args[0], 1.0 / args[1] if args[1] else 0.0
    else:
        return None
    if not isinstance(x, Node) or not _number(c) or c == 0 or not math.isfinite(c):
        return None
    return (x, float(c)) if _same_meta(_val(gm, x), out) else None


def _number(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


class _ScalePlan:
    """How to take a scalar factor ``c`` out of a value and restore it downstream at the
    least cost (:func:`_scalar_factors`): ``actions`` say where, ``cost`` counts the elements
    scaled; None once the search meets a node twice (two paths would both restore it)."""

    def __init__(self, gm: GraphModule, dtype: torch.dtype, outputs: set[Node]) -> None:
        self.gm, self.dtype, self.outputs = gm, dtype, outputs
        self.seen: set[Node] = set()

    def size(self, node: Any) -> float:
        """Elements scaled to restore the factor on ``node``: a broadcast (stride-0) value
        would be materialised, so it is never chosen."""
        val = _val(self.gm, node)
        if val is None or any(s == 0 and n > 1 for s, n in zip(val.stride(), val.shape)):
            return math.inf
        return float(val.numel())

    def user(self, user: Node, node: Node) -> tuple[float, list[tuple[Any, ...]]] | None:
        """Restore the factor for ``user``, which reads ``node``."""
        if user in self.seen or len(self.seen) >= _SCALE_SEARCH:
            return None
        self.seen.add(user)
        options: list[tuple[float, list[tuple[Any, ...]]]] = [
            (self.size(node), [("before", user, node)])]
        at = [i for i, a in enumerate(user.args) if a is node]
        val = _val(self.gm, user)
        if (user.op == "call_function" and len(at) == 1 and node not in user.kwargs.values()
                and val is not None and val.dtype == self.dtype):
            i = at[0]
            absorbed = self.absorbs(user, i)
            if absorbed is not None:
                options.append((0.0, [absorbed]))
            divide = self.accumulates(user, i)
            if divide is not None:  # c a + b = c (a + b / c), and so on
                options.append((self.size(user), [divide, ("after", user)]))
                if user not in self.outputs:
                    through = self.users(user)
                    if through is None:
                        return None
                    options.append((through[0], [divide, *through[1]]))
            if i in _LINEAR_IN.get(user.target, ()) and _no_kwargs_that_matter(user):
                other = [j for j, a in enumerate(user.args) if isinstance(a, Node) and j != i]
                if user.target in _PRODUCTS and other:
                    options.append((self.size(user.args[other[0]]),
                                    [("other", user, other[0])]))
                if user.target not in _VIEWS:
                    options.append((self.size(user), [("after", user)]))
                if user not in self.outputs:
                    through = self.users(user)
                    if through is None:
                        return None
                    options.append(through)
        return min(options, key=lambda o: o[0])

    def users(self, node: Node) -> tuple[float, list[tuple[Any, ...]]] | None:
        """Restore the factor for every user of ``node``."""
        cost, actions = 0.0, []
        for u in list(node.users):
            got = self.user(u, node)
            if got is None:
                return None
            cost += got[0]
            actions += got[1]
        return cost, actions

    def accumulates(self, user: Node, i: int) -> tuple[Any, ...] | None:
        """An action dividing the coefficient of what ``user`` adds to operand ``i`` by the
        factor, if ``user`` is an ``add``, ``sub`` or ``addcmul`` of tensors and ``i`` the
        operand added to: the factor then passes through ``user``."""
        t, args, kw = user.target, user.args, user.kwargs
        if i != 0 or not all(isinstance(a, Node) for a in args):
            return None
        if t in (aten.add.Tensor, aten.sub.Tensor) and len(args) == 2 and set(kw) <= {"alpha"}:
            return ("divide", user, "alpha")
        if t is aten.addcmul.default and len(args) == 3 and set(kw) <= {"value"}:
            return ("divide", user, "value")
        return None

    def absorbs(self, user: Node, i: int) -> tuple[Any, ...] | None:
        """An action folding the factor into ``user``'s own coefficient, if it has one for
        operand ``i``: ``add``/``sub``'s ``alpha``, ``addcmul``'s ``value``, a scalar product,
        quotient or negation."""
        t, args, kw = user.target, user.args, user.kwargs
        if t in (aten.add.Tensor, aten.sub.Tensor) and len(args) == 2 and \
                set(kw) <= {"alpha"} and isinstance(args[1 - i], Node):
            if i == 1:
                return ("alpha", user)
            a, b = (_val(self.gm, x) for x in args)
            out = _val(self.gm, user)
            if t is aten.add.Tensor and not kw and a is not None and b is not None \
                    and out is not None and a.shape == b.shape == out.shape \
                    and a.stride() == b.stride() == out.stride():
                return ("swap", user)
            return None
        if t is aten.addcmul.default and len(args) == 3 and set(kw) <= {"value"} and i > 0:
            return ("value", user)
        if t is aten.mul.Tensor and not kw and len(args) == 2 and _number(args[1 - i]):
            return ("scalar", user)
        if t is aten.div.Tensor and not kw and i == 0 and len(args) == 2 and _number(args[1]) \
                and args[1] != 0:
            return ("scalar", user)
        if t is aten.neg.default and not kw:
            return ("scalar", user)
        return None


def _no_kwargs_that_matter(node: Node) -> bool:
    """No keyword arguments that would change what a linear op computes (a sum's ``dtype``)."""
    return not node.kwargs or (node.target in _NOOP_IF_SAME_SHAPE and
                               set(node.kwargs) <= {"memory_format"})


def _scalar_factors(gm: GraphModule) -> None:
    """Pass 14 of NOTE [Graph simplification]: a scalar factor -- ``x * c``, ``x / c``,
    ``-x`` -- is taken out and restored downstream where that scales fewer elements: through
    linear ops (products, sums, reshapes) to a coefficient that takes it for free (``add``'s
    ``alpha``, ``addcmul``'s ``value``, another scalar factor), a product's smaller operand (a
    weight, hoisted), or a smaller value (:class:`_ScalePlan`)."""
    graph = gm.graph
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.users:
            continue
        found = _scale_source(gm, node)
        outputs = set(out_node.all_input_nodes)
        if found is None or node in outputs:
            continue
        x, c = found
        val = _val(gm, node)
        assert val is not None
        plan = _ScalePlan(gm, val.dtype, outputs)
        got = plan.users(node)
        if got is None or got[0] >= val.numel():
            continue
        for action in got[1]:
            _restore(gm, action, c)
        node.replace_all_uses_with(x)
        graph.erase_node(node)


def _restore(gm: GraphModule, action: tuple[Any, ...], c: float) -> None:
    """Apply one action of a :class:`_ScalePlan` for the factor ``c``."""
    kind, user = action[0], action[1]
    graph = gm.graph

    def scaled(src: Node, factor: float) -> Node:
        val = _val(gm, src)
        assert val is not None
        return _call(user, aten.mul.Tensor, (src, factor), ShapeTensor(
            val.shape, compute_elementwise_output_strides(val), val.dtype, val.device))

    if kind == "before":
        with graph.inserting_before(user):
            user.replace_input_with(action[2], scaled(action[2], c))
    elif kind == "after":
        with graph.inserting_after(user):
            new = scaled(user, c)
        user.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    elif kind == "other":
        j = action[2]
        with graph.inserting_before(user):
            other = scaled(user.args[j], c)
        user.args = tuple(other if k == j else a for k, a in enumerate(user.args))
    elif kind == "alpha":
        alpha = user.kwargs.get("alpha", 1) * c
        user.kwargs = {} if alpha == 1 else {"alpha": alpha}
    elif kind == "swap":
        a, b = user.args
        user.args, user.kwargs = (b, a), ({} if c == 1 else {"alpha": c})
    elif kind == "divide":
        name = action[2]
        coefficient = user.kwargs.get(name, 1) / c
        user.kwargs = {} if coefficient == 1 else {name: coefficient}
    elif kind == "value":
        value = user.kwargs.get("value", 1) * c
        user.kwargs = {} if value == 1 else {"value": value}
    elif user.target is aten.neg.default:  # "scalar"
        user.target, user.args = aten.mul.Tensor, (user.args[0], -c)
    elif user.target is aten.div.Tensor:
        user.target, user.args = aten.mul.Tensor, (user.args[0], c / user.args[1])
    else:
        i = 0 if _number(user.args[0]) else 1
        user.args = tuple(a * c if k == i else a for k, a in enumerate(user.args))
