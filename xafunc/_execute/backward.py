"""The backward graph of a compiled graph, for gradients taken through it.

NOTE [Backward graphs]
A compiled graph differentiated by autograd, or under ``torch.func.grad``/``vjp``/``jacrev``,
normally runs op by op through the TorchScript interpreter with every operator recorded (at
the grad level: wrapped, recorded and unwrapped), and its backward runs node by node. On a GPU
that is a few hundred kernel launches each way, the whole step's time. There, such a call
applies the graph as one ``torch.autograd.Function`` (``executable._GraphFunction``):
functorch runs its ``forward`` on the plain tensors beneath every level, so the plain fast
path (hoisting, TorchScript, buffer reuse, CUDA-graph replay) computes the values, and its
``backward`` runs *another compiled graph*: the vector-Jacobian product of this one, traced
once (NOTE [Tracer]) through ``torch.autograd.grad`` of the graph (:func:`vjp_graph`) -- the
backward operators autograd itself would run, simplified like any propagation -- replayed
too. It takes the inputs and the cotangents and recomputes the forward values it needs
(nothing is saved between the two calls but the inputs). On a CPU the recomputation costs
more than recording saves (measured: 0.9-1.6x the recorded step), so a CPU records
(``executable.BACKWARD_GRAPHS``) -- except with ``compile=True`` at torch.func's grad levels,
where inductor fuses both graphs (measured: ``torch.func.grad`` PINN steps level with
recording for wide Laplacians, up to 3x faster for higher orders; NOTE [Inductor executor]),
unless the graph's products are large enough that keeping the forward values beats
recomputing them (NOTE [Saved activations at a grad level] in ``executable.py``).

A backward graph is never differentiated through its own operators: the trace records
autograd's saved values as ``detach``, so its operators compute the right values but not the
right derivatives. Differentiated where it runs as a ``Function`` (a grad level, or autograd:
``jacrev(grad(...))``, ``grad(grad(...))``, a double backward), its own backward graph is traced
from the function it was traced from (``Executable.source``, differentiable by autograd:
``create_graph``, and inputs that already require grad are not detached); under any other
differentiating transform (``jvp``, or ``jacrev``'s ``vmap`` over the cotangents with a grad
level outside) it is computed by ``torch.func.vjp`` of the forward graph run operator by
operator (``Executable.composable``). Under ``vmap`` alone it runs as any graph. The rules are
autograd's: a gradient is computed for the inputs that need one, an output without a
cotangent contributes nothing, an input that reaches none of the outputs with one gets
``None``, and an integer output is not differentiable.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.fx import Graph, GraphModule, Node

from .._capture.trace import TensorMeta, trace
from .optimize import simplify


def differentiable(v: Any) -> bool:
    return isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())


def _pullback(fn: Callable[..., list[Any]], xs: list[Any], cots: tuple[Tensor, ...],
              wanted: tuple[int, ...], cot_at: list[int], create_graph: bool
              ) -> tuple[list[Any], list[Tensor | None]]:
    """``fn``'s flat outputs on ``xs``, and the gradients of the inputs at ``wanted`` for the
    cotangents ``cots`` of the outputs at ``cot_at`` (None for an input that reaches none of
    them), by ``torch.autograd.grad``: what the backward graphs are traced from."""
    with torch.enable_grad():
        values = fn(*xs)
        pairs = [(values[i], c) for i, c in zip(cot_at, cots) if values[i].requires_grad]
        got = torch.autograd.grad([v for v, _ in pairs], [xs[i] for i in wanted],
                                  [c for _, c in pairs], allow_unused=True,
                                  create_graph=create_graph) if pairs else [None] * len(wanted)
    return values, list(got)


def _examples(ins: list[Tensor], outs: list[Any], cot_at: list[int], n_static: int
              ) -> list[TensorMeta]:
    """What a backward graph is traced on: ``fn``'s dynamic inputs, a cotangent of each
    output at ``cot_at``, and ``fn``'s static inputs, last."""
    def meta(v: Tensor) -> TensorMeta:
        return TensorMeta(tuple(v.shape), v.dtype, v.device)

    n_dyn = len(ins) - n_static
    return [*map(meta, ins[:n_dyn]), *(meta(outs[i]) for i in cot_at),
            *map(meta, ins[n_dyn:])]


def vjp_graph(fn: Callable[..., list[Any]], ins: list[Tensor], outs: list[Any],
              wanted: tuple[int, ...], given: tuple[int, ...], n_static: int
              ) -> tuple[GraphModule, list[int], Callable[..., tuple[Tensor, ...]], list[bool]]:
    """The backward graph of ``fn`` for the inputs at ``wanted`` and cotangents of the outputs
    at ``given`` (see NOTE [Backward graphs]), the indices of ``fn``'s flat outputs whose
    cotangents it takes (the differentiable ones of ``given``), the function it was traced from
    (differentiable by autograd: what its own backward graph is traced from), and for each input
    at ``wanted`` whether it reaches those outputs at all (autograd leaves the gradient of one
    that does not ``None``, as torch.func does).

    ``fn`` maps tensors like ``ins`` to flat outputs like ``outs`` (tensors or fake tensors:
    only their shapes, dtypes and devices are read), differentiably. The backward graph's
    inputs are ``fn``'s dynamic inputs, then one cotangent per output it takes, then ``fn``'s
    ``n_static`` static inputs (still last, so their products are hoisted as in any compiled
    graph); its outputs are the gradients of the inputs at ``wanted``, in order (zeros where an
    input does not reach the outputs)."""
    cot_at = [i for i in given if differentiable(outs[i])]
    reached: list[bool] = []
    n_dyn, n_cot = len(ins) - n_static, len(cot_at)

    def vjp(*a: Tensor) -> tuple[Tensor, ...]:
        args, cots = [*a[:n_dyn], *a[n_dyn + n_cot:]], a[n_dyn:n_dyn + n_cot]
        # an input that already requires grad is differentiated in place, not detached:
        # when this function is differentiated in turn (its own backward graph is traced
        # through it), the gradients must stay functions of it; create_graph: for that
        # second derivative
        xs = [x.detach().requires_grad_() if i in wanted and not x.requires_grad else x
              for i, x in enumerate(args)]
        _, got = _pullback(fn, xs, cots, wanted, cot_at, create_graph=True)
        reached[:] = [g is not None for g in got]
        return tuple(g if g is not None else torch.zeros_like(xs[i])
                     for i, g in zip(wanted, got))

    traced = trace(vjp, _examples(ins, outs, cot_at, n_static))
    return simplify(traced, inexact=True), cot_at, vjp, reached


def split_graphs(fn: Callable[..., list[Any]], ins: list[Tensor], outs: list[Any],
                 wanted: tuple[int, ...], n_static: int
                 ) -> tuple[GraphModule, GraphModule, int, list[int | None]]:
    """The forward graph of ``fn`` that keeps what its backward needs, and that backward
    graph (NOTE [Split graphs]), for the inputs at ``wanted`` and a cotangent of every
    differentiable output.

    ``fn`` is as for :func:`vjp_graph`. The forward graph takes ``fn``'s inputs and returns
    its flat outputs, then the values it keeps. The backward graph takes ``fn``'s dynamic
    inputs, the kept values, one cotangent per differentiable output and ``fn``'s static
    inputs (last, so their products are hoisted), and returns the gradients of the inputs
    at ``wanted`` that reach the outputs. Also returned: how many values the forward keeps,
    and for each input at ``wanted`` the position of its gradient among the backward graph's
    outputs, or None where it reaches no output (autograd's ``None``)."""
    cot_at = [i for i, o in enumerate(outs) if differentiable(o)]
    n_out, n_cot = len(outs), len(cot_at)
    n_dyn = len(ins) - n_static
    reached: list[bool] = []

    def joint(*a: Tensor) -> tuple[Any, ...]:
        args, cots = [*a[:n_dyn], *a[n_dyn + n_cot:]], a[n_dyn:n_dyn + n_cot]
        xs = [x.detach().requires_grad_() if i in wanted else x for i, x in enumerate(args)]
        values, got = _pullback(fn, xs, cots, wanted, cot_at, create_graph=False)
        reached[:] = [g is not None for g in got]
        plain = [v.detach() if isinstance(v, Tensor) else v for v in values]
        return (*plain, *(g for g in got if g is not None))

    gm = simplify(trace(joint, _examples(ins, outs, cot_at, n_static)), inexact=True)
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    dynamic = set(placeholders[:n_dyn])
    cotangents = placeholders[n_dyn:n_dyn + n_cot]
    static = placeholders[n_dyn + n_cot:]
    # a node is of the backward if it reads a cotangent, of the forward if it reads a dynamic
    # input; the others (static inputs, constants) are computed by either graph that needs
    # them, so the backward graph's prologue caches them as the forward graph's does
    backward: set[Node] = set(cotangents)
    forward: set[Node] = set(dynamic)
    for node in nodes:
        if node.op != "call_function":
            continue
        if any(a in backward for a in node.all_input_nodes):
            backward.add(node)
        elif any(a in forward for a in node.all_input_nodes):
            forward.add(node)
    results = list(nodes[-1].args[0])
    values, grads = results[:n_out], results[n_out:]
    if any(isinstance(v, Node) and v in backward for v in values):
        raise TypeError("a forward output reads a cotangent")
    kept = [n for n in nodes if n in forward and n not in dynamic
            and any(u in backward for u in n.users)]

    def copy(graph: Graph, env: dict[Node, Any], skip: set[Node]) -> None:
        for node in nodes:
            if node.op in ("call_function", "get_attr") and node not in skip:
                env[node] = graph.node_copy(node, lambda a: env[a])

    fwd = Graph()
    env: dict[Node, Any] = {n: fwd.node_copy(n) for n in (*placeholders[:n_dyn], *static)}
    copy(fwd, env, backward)
    fwd.output(tuple(env[v] if isinstance(v, Node) else v for v in values)
               + tuple(env[n] for n in kept))
    bwd = Graph()
    env = {n: bwd.node_copy(n) for n in placeholders[:n_dyn]}
    for i, n in enumerate(kept):
        env[n] = bwd.placeholder(f"kept{i}")
        env[n].meta = dict(n.meta)
    for n in (*cotangents, *static):
        env[n] = bwd.node_copy(n)
    copy(bwd, env, forward)
    bwd.output(tuple(env[g] for g in grads))
    forward_gm, backward_gm = GraphModule(gm, fwd), GraphModule(gm, bwd)
    for g in (forward_gm, backward_gm):
        g.graph.eliminate_dead_code()
        g.graph.lint()
        g.recompile()
    slots = list(itertools.accumulate(reached, initial=0))
    return forward_gm, backward_gm, len(kept), [
        slots[k] if r else None for k, r in enumerate(reached)]
