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

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule

from .._capture.trace import TensorMeta, trace
from .optimize import simplify


def _differentiable(v: Any) -> bool:
    return isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())


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
    cot_at = [i for i in given if _differentiable(outs[i])]
    reached: list[bool] = []
    n_in, n_cot = len(ins), len(cot_at)
    n_dyn = n_in - n_static

    def vjp(*a: Tensor) -> tuple[Tensor, ...]:
        args = [*a[:n_dyn], *a[n_dyn + n_cot:]]
        cots = a[n_dyn:n_dyn + n_cot]
        with torch.enable_grad():
            # an input that already requires grad is differentiated in place, not detached:
            # when this function is differentiated in turn (its own backward graph is traced
            # through it), the gradients must stay functions of it
            xs = [x.detach().requires_grad_() if i in wanted and not x.requires_grad else x
                  for i, x in enumerate(args)]
            values = fn(*xs)
            pairs = [(values[i], c) for i, c in zip(cot_at, cots) if values[i].requires_grad]
            # create_graph: this function is differentiated in turn for a second derivative
            got = torch.autograd.grad([v for v, _ in pairs], [xs[i] for i in wanted],
                                      [c for _, c in pairs], allow_unused=True,
                                      create_graph=True) if pairs else [None] * len(wanted)
        reached[:] = [g is not None for g in got]
        return tuple(g if g is not None else torch.zeros_like(xs[i])
                     for i, g in zip(wanted, got))

    def meta(v: Tensor) -> TensorMeta:
        return TensorMeta(tuple(v.shape), v.dtype, v.device)

    examples = [*map(meta, ins[:n_dyn]), *(meta(outs[i]) for i in cot_at),
                *map(meta, ins[n_dyn:])]
    return simplify(trace(vjp, examples), inexact=True), cot_at, vjp, reached
