"""Second and third derivatives from forward tangents and adjoints, joined node by node.

NOTE [Derivatives by adjoints]
Let ``y`` (``m`` entries) be computed from ``z`` (``n`` entries) by the captured graph, and
look at one node ``x_e = g_e(inputs)``. Along a direction ``v`` every value has a Taylor
series ``c_0 + c_1 t + c_2 t^2 + c_3 t^3``. The degree-3 coefficient of ``y`` is linear in
what each node adds beyond its linear part -- its *sources* -- so with the adjoint
``lambda_e = dy / dx_e`` (one reverse sweep) it is a sum over nodes:

    y_3[v] = sum_e < lambda_e, r_3^e >,   r_3^e = [g_e's coefficient 3] - J_e (inputs' c_3).

``r_3^e`` still holds the inputs' second coefficients, which are themselves pushed forward
sources: moving them to the adjoint side turns ``lambda`` into its tangent
``mu_e[v] = D_v lambda_e`` (forward mode over the reverse sweep), and

    y_3[v] = sum_e < lambda_e, g_e's c_3 > + < mu_e[v], g_e's c_2 >,

both from ``g_e``'s Taylor rule applied to its inputs' *first* coefficients alone (second and
third set to zero). Linear nodes add nothing. At second order the same argument gives
``y_2[v] = sum_e < lambda_e, g_e's c_2 >`` -- a Hessian as one reverse sweep, forward tangents
and ``H = sum_e a^T diag(lambda_e g_e'') a``, with no tangent of the reverse sweep (which
forward-over-reverse pushes through every product). So the whole third derivative costs one reverse
sweep of the graph, a first-order forward sweep of it in the ``n`` unit directions (``z``'s
tangents and ``lambda``'s, ``mu``), and local terms at the nonlinear nodes -- where Taylor
mode over a reverse level (``r = 1``, degree 2) pushes ``C(n + 1, 2)`` second-order
directions through every matrix product, forward and back: for a tanh MLP of width 128 in 8
inputs the products see 17 rows instead of 89 (an edge-pushing scheme in the sense of Gower
and Mello, "A new framework for the computation of Hessians", and its third-order extension).

The local terms: for a pointwise ``g`` of one moving input with first coefficients ``a_i``
(the ``n`` unit directions) and scaled derivatives ``s_j = g^(j) / j!``,

    T_ijk = M[k; i, j] + M[i; j, k] + M[j; i, k],
    M[k; i, j] = sum_e sum_entries Q_k a_i a_j,   Q_k = 2 s_2 mu_k + 2 s_3 lambda a_k,

one product of ``(n^2, entries)`` by ``(entries, n m)`` per node (the ``s_j`` are the node's own
rule applied along the single direction ``1``); a Hessian's is ``a^T diag(2 s_2 lambda) a``.
The product of two moving factors with tangents ``a``, ``b`` has the same form with
``a_i b_j + a_j b_i`` in place of ``2 s_2 a_i a_j`` and no third derivative. Any other
nonlinear node (reductions, softmax, multi-input functions) runs its rule along the
``C(n + K - 1, K)`` integer directions of :mod:`.interpolate`, and ``y_K`` along them is
interpolated into the symmetric tensor (NOTE [Interpolation of mixed partials]).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._capture.trace import CaptureError, trace
from .._rules import LINEAR, is_nondiff, lookup
from .._rules.series import Series, UnitSeed, primal
from .cost import _PRODUCTS, Schedule, numel, reverse_elements
from .interpolate import num_directions, symmetric_tensor
from .taylor import Propagator

aten = torch.ops.aten

# product-like operators: linear unless every listed operand moves with ``z`` (the matrix
# products' operands as the cost model reads them)
_PRODUCT_OPERANDS = {name: spec[:2] for name, spec in _PRODUCTS.items()} | {
    "mul": (0, 1), "convolution": (0, 1), "div": (1,)}


def _name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def moving_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose value depends on the first placeholder through differentiable operators
    (a ``detach`` or an integer-valued operator stops the dependence)."""
    moving: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and not moving:
            moving.add(node)
        elif node.op == "call_function" and not is_nondiff(node.target) \
                and any(a in moving for a in node.all_input_nodes):
            moving.add(node)
    return moving


def _is_nonlinear(node: torch.fx.Node, moving: set[torch.fx.Node]) -> bool:
    if node.target is operator.getitem or node not in moving:
        return False
    if node.target in LINEAR or getattr(node.target, "overloadpacket", None) in LINEAR:
        return False
    operands = _PRODUCT_OPERANDS.get(_name(node))
    if operands is not None:
        return all(i < len(node.args) and node.args[i] in moving for i in operands)
    return True  # anything else may have second derivatives: kept (only costs time)


def _form(node: torch.fx.Node, moving: set[torch.fx.Node]) -> str:
    """How a nonlinear node's local terms are formed: ``"pointwise"`` (a pointwise operator of
    one moving tensor), ``"product"`` (the product of two moving tensors), or
    ``"directional"`` (anything else: its rule along the integer directions)."""
    tags = getattr(node.target, "tags", ())
    inputs = [a for a in node.all_input_nodes if a in moving]
    if torch.Tag.pointwise not in tags or not isinstance(node.meta.get("val"), Tensor):
        return "directional"
    if len(inputs) == 1:
        return "pointwise"
    if node.target is aten.mul.Tensor and len(inputs) == 2:
        return "product"
    return "directional"


@dataclass
class AdjointJoin:
    """The nonlinear nodes of a captured graph and how their local terms are formed."""

    order: int  # 2 or 3
    n: int  # differentiated inputs
    m: int  # outputs
    nodes: list[torch.fx.Node]
    forms: list[str]  # per node, see ``_form``
    inputs: list[list[torch.fx.Node]] = field(default_factory=list)  # tensor args per node
    outputs: list[int] = field(default_factory=list)  # tensor outputs per node

    @classmethod
    def of(cls, g0: torch.fx.GraphModule, order: int, n: int, m: int) -> AdjointJoin | None:
        moving = moving_nodes(g0)
        nodes = [nd for nd in g0.graph.nodes
                 if nd.op == "call_function" and _is_nonlinear(nd, moving)]
        if not nodes:
            return None
        join = cls(order, n, m, nodes, [_form(nd, moving) for nd in nodes])
        for nd in nodes:
            join.inputs.append(list(dict.fromkeys(nd.all_input_nodes)))
            val = nd.meta.get("val")
            vals = val if isinstance(val, (tuple, list)) else [val]
            if not all(isinstance(v, Tensor) for v in vals):
                return None  # e.g. a list of tensors and integers: not supported here
            join.outputs.append(len(vals) if isinstance(val, (tuple, list)) else 0)
        return join

    def sizes(self) -> list[int]:
        out = []
        for nd in self.nodes:
            val = nd.meta["val"]
            vals = val if isinstance(val, (tuple, list)) else [val]
            out.append(sum(numel(v) for v in vals))
        return out

    # ------------------------------------------------------------------ the traced graph
    def graph(self, g0: torch.fx.GraphModule, z: Tensor,
              others: list[Any]) -> torch.fx.GraphModule | str:
        """``(z, *others) -> (y, aux, inputs, adjoints)`` traced: ``g0`` with the tensor
        arguments of every nonlinear node and the adjoints ``dy / dx_e`` (``(m, *shape)``) of
        their outputs, or why it cannot be traced."""
        new = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        out = new.graph_copy(g0.graph, env)
        extra_in = [env[a] for ins in self.inputs for a in ins]
        extra_out = []
        for nd, k in zip(self.nodes, self.outputs):
            if k == 0:
                extra_out.append(env[nd])
            else:
                extra_out += [new.call_function(operator.getitem, (env[nd], i)) for i in range(k)]
        new.output((out[0], out[1], extra_in, extra_out))  # type: ignore[index]
        gx = torch.fx.GraphModule(g0, new)
        m = self.m

        def adjoint(z: Tensor, *others: Any) -> Any:
            with torch.enable_grad():
                x = z if z.requires_grad else z.requires_grad_()  # see ``_traced_jacrev``
                y, aux, ins, outs = gx(x, *others)
                lams = [o.new_zeros((m,) + tuple(o.shape)) for o in outs]
                wrt = [i for i, o in enumerate(outs) if o.requires_grad and o.is_floating_point()]
                if wrt and y.requires_grad:
                    targets = [outs[i] for i in wrt]

                    def row(v: Tensor) -> tuple[Tensor, ...]:
                        return torch.autograd.grad(y, targets, v, create_graph=True,
                                                   materialize_grads=True)

                    if m == 1:
                        grads = [g.unsqueeze(0) for g in row(torch.ones_like(y))]
                    else:
                        grads = list(torch.vmap(row)(torch.eye(m, dtype=y.dtype,
                                                               device=y.device)))
                    for i, g in zip(wrt, grads):
                        lams[i] = g
            return y, aux, ins, lams

        try:
            return trace(adjoint, [z, *others])
        except CaptureError as e:
            return f"capture of the adjoints failed ({e})"

    # ------------------------------------------------------------------ the join
    def derivative(self, prop: Propagator, z: Tensor, others: list[Any],
                   dirs: Tensor | None) -> tuple[Tensor, Any]:
        """``D^K y`` as ``(m, n, ..., n)`` and aux; ``dirs``: the degree-``K`` directions (when
        a node needs them)."""
        n, m, K = self.n, self.m, self.order
        _, aux, ins, lams = prop(Series(z, [UnitSeed(0, n)]), *others)
        ins_it, lam_it = iter(ins), iter(lams)
        M: Tensor | None = None  # K = 3: (n_i, n_j, n_k, m); K = 2: the Hessian (m, n, n)
        F: Tensor | None = None  # y_K along the directions, (N, m)
        for nd, form, inputs, k in zip(self.nodes, self.forms, self.inputs, self.outputs):
            env = {a: next(ins_it) for a in inputs}
            lam = [next(lam_it) for _ in range(max(k, 1))]
            args = torch.fx.node.map_arg(nd.args, env.__getitem__)
            kwargs = torch.fx.node.map_arg(nd.kwargs, env.__getitem__)
            moving = [v for v in env.values() if isinstance(v, Series) and v.coeffs[0] is not None]
            if not moving:
                continue
            rule = lookup(nd.target)
            assert rule is not None
            if form != "directional":
                if form == "pointwise":
                    term = _pointwise_term(prop, rule, args, kwargs, moving[0], lam[0], K, n, m)
                else:  # linear in either factor alone: terms only where both move
                    term = _product_term(moving[0], moving[1], lam[0], K, n, m) \
                        if len(moving) == 2 else None
                if term is not None:
                    M = term if M is None else M + term
                continue
            assert dirs is not None
            term = _directional_term(prop, rule, args, kwargs, lam, dirs, K, n, m)
            if term is not None:
                F = term if F is None else F + term
        T = z.new_zeros((m,) + (n,) * K)
        if M is not None and K == 2:
            T = M
        elif M is not None:
            A = M.permute(3, 2, 0, 1)  # A[o, k, i, j] = M[k; i, j]
            T = A + A.permute(0, 2, 3, 1) + A.permute(0, 2, 1, 3)
        if F is not None:
            T = T + symmetric_tensor(F, n, K).reshape((m,) + (n,) * K)
        return T, aux


def _tangent(v: Any) -> Tensor | None:
    return v.coeffs[0] if isinstance(v, Series) else None


def _pointwise_term(prop: Propagator, rule: Any, args: Any, kwargs: Any, x: Series,
                    lam: Any, K: int, n: int, m: int) -> Tensor | None:
    """``M`` of one pointwise node of one moving input ``x`` (NOTE [Derivatives by
    adjoints]) as ``(n_i, n_j, n_k, m)`` (``K = 3``) or its Hessian term ``(m, n, n)``
    (``K = 2``), or None when the node's higher derivatives vanish."""
    ones = x.primal.new_ones((1,) + tuple(x.primal.shape))
    probe = Series(x.primal, [ones] + [None] * (K - 1))

    def put(v: Any) -> Any:
        return probe if v is x else (v.primal if isinstance(v, Series) else v)

    out = prop.apply(rule, torch.fx.node.map_aggregate(args, put),
                     {k: torch.fx.node.map_aggregate(v, put) for k, v in kwargs.items()})
    s2, s3 = out.coeffs[1], out.coeffs[2] if K == 3 else None
    if s2 is None and s3 is None:
        return None
    shape = tuple(out.primal.shape)
    a = _tangents_as(x, shape, n)
    mu = _tangent(lam)
    lam0 = primal(lam)  # (m, *shape)
    if K == 2:  # H[o] = a^T diag(2 s_2 lambda[o]) a
        assert s2 is not None
        w = ((2 * s2) * lam0).unsqueeze(1) * a.unsqueeze(0)  # (m, n, *shape)
        return (w.reshape(m * n, -1) @ a.reshape(n, -1).t()).reshape(m, n, n)
    Q: Tensor | None = None  # (n, m, *shape)
    if s2 is not None and mu is not None:
        Q = (2 * s2) * mu
    if s3 is not None:
        q3 = ((2 * s3) * lam0).unsqueeze(0) * a.unsqueeze(1)
        Q = q3 if Q is None else Q + q3
    if Q is None:
        return None
    P = a.unsqueeze(1) * a.unsqueeze(0)  # (n, n, *shape)
    # P on the left: under autograd the operand read transposed gets the transposed gradient,
    # and P's is the larger one (its broadcast product's backward is 4x slower strided)
    return (P.reshape(n * n, -1) @ Q.reshape(n * m, -1).t()).reshape(n, n, n, m)


def _tangents_as(x: Series, shape: tuple[int, ...], n: int) -> Tensor:
    """``x``'s first coefficients ``(n, *x.shape)`` broadcast to ``(n, *shape)``."""
    a = x.coeffs[0]
    lead = (1,) * (len(shape) - (a.dim() - 1))
    return a.reshape((n,) + lead + tuple(a.shape[1:])).expand((n,) + shape)


def _product_term(x: Series, y: Series, lam: Any, K: int, n: int, m: int) -> Tensor | None:
    """The local terms of ``x * y``, both moving: ``D^2 = a_i b_j + a_j b_i`` and no third
    derivative, as :func:`_pointwise_term` returns them."""
    shape = torch.broadcast_shapes(x.primal.shape, y.primal.shape)
    a, b = _tangents_as(x, tuple(shape), n), _tangents_as(y, tuple(shape), n)
    if K == 2:  # H[o] = (lambda[o] a)^T b + its transpose
        lam0 = primal(lam)
        w = lam0.unsqueeze(1) * a.unsqueeze(0)  # (m, n, *shape)
        H = (w.reshape(m * n, -1) @ b.reshape(n, -1).t()).reshape(m, n, n)
        return H + H.transpose(1, 2)
    mu = _tangent(lam)
    if mu is None:
        return None
    ab = a.unsqueeze(1) * b.unsqueeze(0)  # (n, n, *shape)
    P = ab + ab.transpose(0, 1)
    return (P.reshape(n * n, -1) @ mu.reshape(n * m, -1).t()).reshape(n, n, n, m)


def _directional_term(prop: Propagator, rule: Any, args: Any, kwargs: Any, lam: list[Any],
                      dirs: Tensor, K: int, n: int, m: int) -> Tensor | None:
    """``y_K`` along the degree-``K`` directions from one node, ``(N, m)``."""

    def put(v: Any) -> Any:
        if isinstance(v, Series):
            c = v.coeffs[0]
            return Series(v.primal, [c] + [None] * (K - 1), dirs) if c is not None \
                else v.primal
        return v

    out = prop.apply(rule, torch.fx.node.map_aggregate(args, put),
                     {k: torch.fx.node.map_aggregate(v, put) for k, v in kwargs.items()})
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    N = dirs.shape[0]
    F: Tensor | None = None
    for o, lm in zip(outs, lam):
        if not isinstance(o, Series):
            continue
        lam0 = primal(lm)
        c2, c3 = o.coeffs[1], o.coeffs[2] if K == 3 else None
        terms = []
        if c3 is not None:
            terms.append(c3.reshape(N, -1) @ lam0.reshape(m, -1).t())
        mu = _tangent(lm)
        if K == 2 and c2 is not None:
            terms.append(c2.reshape(N, -1) @ lam0.reshape(m, -1).t())
        elif c2 is not None and mu is not None:
            mu_v = (dirs @ mu.reshape(n, -1)).reshape(N, m, -1)
            terms.append((mu_v * c2.reshape(N, 1, -1)).sum(-1))
        for t in terms:
            F = t if F is None else F + t
    return F


def adjoint_cost(join: AdjointJoin, flops0: float, seed_free: float) -> float:
    """Estimated FLOPs (the units of :func:`~.cost.estimate`): the graph and its reverse sweep
    (3 graph costs per cotangent) and first-order tangents in ``n`` directions -- of the graph
    alone at order 2, of the graph and its reverse sweep at order 3 -- plus each nonlinear
    node's local terms."""
    n, m, K = join.n, join.m, join.order
    if K == 2:
        cost = 3.0 * flops0 * m + n * max(flops0 - seed_free, 0.05 * flops0)
    else:
        cost = 3.0 * flops0 * m * (1 + n)
    N = num_directions(n, K)
    for form, size in zip(join.forms, join.sizes()):
        if form != "directional":
            local = 2.0 * m * n * n if K == 2 else n * n + 2.0 * n * m * n * n
            cost += size * (local * (2 if form == "product" else 1) + 6.0 * n * m)
        else:  # the first coefficients expanded to N directions, the rule, the contraction
            cost += size * N * (2.0 * n + 4.0 * K + (2.0 * n * m if K == 3 else 0.0) + 4.0 * m)
    return cost


def adjoint_peak(join: AdjointJoin, itemsize: int, per_dir: float) -> float:
    """Estimated peak bytes: the first-order sweep's (``per_dir`` per direction) and the
    largest node's local terms."""
    n, m, K = join.n, join.m, join.order
    N = num_directions(n, K)
    # K = 3: the pair products (n^2 per entry) and Q; K = 2: the weighted tangents (m n per
    # entry, twice for a product); directional: K coefficients and the expanded adjoint
    local = max((size * N * (K + m) if form == "directional" else
                 size * (2 * n * n + 2 * n * m) if K == 3 else size * 2 * n * (m + 1))
                for form, size in zip(join.forms, join.sizes()))
    return n * per_dir + itemsize * (local + 2 * m * n ** K)


def needs_directions(join: AdjointJoin) -> bool:
    return "directional" in join.forms


def adjoint_candidate(g0: torch.fx.GraphModule, order: int, n: int, m: int, flops0: float,
                      seed_free: float, itemsize: int, live: int, total: int
                      ) -> Schedule | None:
    """The schedule of NOTE [Derivatives by adjoints] for ``order`` 2 or 3, or None when
    the graph has no nonlinear node (or one it does not handle)."""
    join = AdjointJoin.of(g0, order, n, m)
    if join is None:
        return None
    result = float(itemsize * m * n**order)
    fixed = float(itemsize * total)
    per_dir = float(itemsize * reverse_elements(1, m, n, live, total))
    peak = adjoint_peak(join, itemsize, per_dir) + result + fixed
    return Schedule(1, 1, n, adjoint_cost(join, flops0, seed_free), peak, result, 0.0,
                    adjoint=join)
