"""Third derivatives from forward tangents and second-order adjoints, joined node by node.

NOTE [Third derivatives by adjoints]
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
third set to zero). Linear nodes add nothing. So the whole third derivative costs one reverse
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

one product of ``(n m, entries)`` by ``(entries, n^2)`` per node (the ``s_j`` are the node's own
rule applied along the single direction ``1``). Any other nonlinear node (products of two
moving factors, reductions, multi-input functions) runs its rule along the ``C(n + 2, 3)``
integer directions of :mod:`.interpolate`, and ``y_3`` along them is interpolated into the
symmetric tensor (NOTE [Interpolation of mixed partials]).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._capture.trace import CaptureError, trace
from .._rules import LINEAR, is_nondiff, lookup
from .._rules.series import Series, UnitSeed
from .interpolate import num_directions, symmetric_tensor
from .taylor import Propagator

aten = torch.ops.aten

# product-like operators: linear unless every listed operand moves with ``z``
_PRODUCT_OPERANDS = {
    "mul": (0, 1), "mm": (0, 1), "bmm": (0, 1), "mv": (0, 1), "dot": (0, 1), "vdot": (0, 1),
    "outer": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "addmv": (1, 2), "addr": (1, 2),
    "convolution": (0, 1), "div": (1,),
}


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


def _pointwise(node: torch.fx.Node, moving: set[torch.fx.Node]) -> bool:
    """A pointwise operator of one moving tensor (the local terms' product form applies)."""
    tags = getattr(node.target, "tags", ())
    inputs = [a for a in node.all_input_nodes if a in moving]
    return torch.Tag.pointwise in tags and len(inputs) == 1 and isinstance(
        node.meta.get("val"), Tensor)


@dataclass
class AdjointJoin:
    """The nonlinear nodes of a captured graph and how their local terms are formed."""

    n: int  # differentiated inputs
    m: int  # outputs
    nodes: list[torch.fx.Node]
    pointwise: list[bool]
    inputs: list[list[torch.fx.Node]] = field(default_factory=list)  # tensor args per node
    outputs: list[int] = field(default_factory=list)  # tensor outputs per node

    @classmethod
    def of(cls, g0: torch.fx.GraphModule, n: int, m: int) -> AdjointJoin | None:
        moving = moving_nodes(g0)
        nodes = [nd for nd in g0.graph.nodes
                 if nd.op == "call_function" and _is_nonlinear(nd, moving)]
        if not nodes:
            return None
        join = cls(n, m, nodes, [_pointwise(nd, moving) for nd in nodes])
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
            out.append(sum(_numel(v) for v in vals))
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
    def third(self, prop: Propagator, z: Tensor, others: list[Any],
              dirs: Tensor | None) -> tuple[Tensor, Any]:
        """``D^3 y`` as ``(m, n, n, n)`` and aux; ``dirs``: the degree-3 directions (when a
        node needs them)."""
        n, m = self.n, self.m
        _, aux, ins, lams = prop(Series(z, [UnitSeed(0, n)]), *others)
        ins_it, lam_it = iter(ins), iter(lams)
        M: Tensor | None = None  # (n_i, n_j, n_k, m)
        F: Tensor | None = None  # y_3 along the directions, (N, m)
        for nd, pw, inputs, k in zip(self.nodes, self.pointwise, self.inputs, self.outputs):
            env = {a: next(ins_it) for a in inputs}
            lam = [next(lam_it) for _ in range(max(k, 1))]
            args = torch.fx.node.map_arg(nd.args, env.__getitem__)
            kwargs = torch.fx.node.map_arg(nd.kwargs, env.__getitem__)
            moving = [v for v in env.values() if isinstance(v, Series) and v.coeffs[0] is not None]
            if not moving:
                continue
            rule = lookup(nd.target)
            assert rule is not None
            if pw and len(moving) == 1:
                term = _pointwise_term(prop, rule, args, kwargs, moving[0], lam[0], n, m)
                if term is not None:
                    M = term if M is None else M + term
                continue
            assert dirs is not None
            term = _directional_term(prop, rule, args, kwargs, lam, dirs, n, m)
            if term is not None:
                F = term if F is None else F + term
        T = z.new_zeros((m, n, n, n))
        if M is not None:
            A = M.permute(3, 2, 0, 1)  # A[o, k, i, j] = M[k; i, j]
            T = A + A.permute(0, 2, 3, 1) + A.permute(0, 2, 1, 3)
        if F is not None:
            T = T + symmetric_tensor(F, n, 3).reshape(m, n, n, n)
        return T, aux


def _tangent(v: Any) -> Tensor | None:
    return v.coeffs[0] if isinstance(v, Series) else None


def _pointwise_term(prop: Propagator, rule: Any, args: Any, kwargs: Any, x: Series,
                    lam: Any, n: int, m: int) -> Tensor | None:
    """``M`` of one pointwise node of one moving input ``x`` (NOTE [Third derivatives by
    adjoints]) as ``(n_i, n_j, n_k, m)``, or None when its second and third derivatives
    vanish."""
    ones = x.primal.new_ones((1,) + tuple(x.primal.shape))
    probe = Series(x.primal, [ones, None, None])

    def put(v: Any) -> Any:
        return probe if v is x else (v.primal if isinstance(v, Series) else v)

    out = prop.apply(rule, torch.fx.node.map_aggregate(args, put),
                     {k: torch.fx.node.map_aggregate(v, put) for k, v in kwargs.items()})
    s2, s3 = out.coeffs[1], out.coeffs[2]
    if s2 is None and s3 is None:
        return None
    shape = tuple(out.primal.shape)
    a = x.coeffs[0]
    a = a.reshape((n,) + (1,) * (len(shape) - (a.dim() - 1)) + tuple(a.shape[1:])).expand(
        (n,) + shape)
    mu = _tangent(lam)
    lam0 = lam.primal if isinstance(lam, Series) else lam  # (m, *shape)
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


def _directional_term(prop: Propagator, rule: Any, args: Any, kwargs: Any, lam: list[Any],
                      dirs: Tensor, n: int, m: int) -> Tensor | None:
    """``y_3`` along the degree-3 directions from one node, ``(N, m)``."""

    def put(v: Any) -> Any:
        if isinstance(v, Series):
            c = v.coeffs[0]
            return Series(v.primal, [c, None, None], dirs) if c is not None else v.primal
        return v

    out = prop.apply(rule, torch.fx.node.map_aggregate(args, put),
                     {k: torch.fx.node.map_aggregate(v, put) for k, v in kwargs.items()})
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    N = dirs.shape[0]
    F: Tensor | None = None
    for o, lm in zip(outs, lam):
        if not isinstance(o, Series):
            continue
        lam0 = lm.primal if isinstance(lm, Series) else lm
        c2, c3 = o.coeffs[1], o.coeffs[2]
        terms = []
        if c3 is not None:
            terms.append(c3.reshape(N, -1) @ lam0.reshape(m, -1).t())
        mu = _tangent(lm)
        if c2 is not None and mu is not None:
            mu_v = (dirs @ mu.reshape(n, -1)).reshape(N, m, -1)
            terms.append((mu_v * c2.reshape(N, 1, -1)).sum(-1))
        for t in terms:
            F = t if F is None else F + t
    return F


def _numel(v: Any) -> int:
    try:
        return int(v.numel())
    except Exception:  # noqa: BLE001 - data-dependent sizes
        return 0


def adjoint_cost(join: AdjointJoin, flops0: float) -> float:
    """Estimated FLOPs: the reverse sweep (3 graph costs per cotangent, as :func:`estimate`)
    under first-order Taylor in ``n`` directions, and each node's local terms."""
    n, m = join.n, join.m
    cost = 3.0 * flops0 * m * (1 + n)
    N = num_directions(n, 3)
    for pw, size in zip(join.pointwise, join.sizes()):
        if pw:
            cost += size * (n * n + 2.0 * n * m * n * n + 6.0 * n * m)
        else:
            cost += size * N * (12.0 + 2.0 * n * (m + 1) + 4.0 * m)
    return cost


def adjoint_peak(join: AdjointJoin, itemsize: int, per_dir: float) -> float:
    """Estimated peak bytes: the first-order sweep's (``per_dir`` per direction) and the
    largest node's local terms."""
    n, m = join.n, join.m
    N = num_directions(n, 3)
    local = max((size * (n * n + 2 * n * m) if pw else size * N * (3 + m))
                for pw, size in zip(join.pointwise, join.sizes()))
    return n * per_dir + itemsize * (local + 2 * m * n ** 3)


def needs_directions(join: AdjointJoin) -> bool:
    return not all(join.pointwise)

