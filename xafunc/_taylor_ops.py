"""Taylor-mode transforms: ``jet``, ``xlaplacian`` and ``xbiharmonic``.

NOTE [Collapsed Taylor mode]
Differential operators such as the Laplacian ``sum_i d^2 f / dx_i^2`` are *weighted sums of
top-degree Taylor coefficients* along a fixed set of directions ``v_1 .. v_N``:
``L f = sum_r w_r c_K(v_r)``. Every Taylor rule produces its top coefficient as
``c_K_out = Df[c_K_in] + R(c_1 .. c_{K-1})``: linear in ``c_K_in``, nonlinear only in the lower
coefficients. So the weighted sum over directions can be pushed through the graph node by node
(Dangel, Siebert, Zeinhofer and Walther, "Collapsing Taylor mode automatic differentiation",
2024): ``s_out = Df[s_in] + sum_r w_r R_r`` with ``s = sum_r w_r c_K(v_r)``. The engine
propagates ``c_1 .. c_{K-1}`` along the ``N`` directions and ``s`` as one extra direction row
of ``c_1`` (row ``N``): the rules treat rows independently and ``c_1`` of a row is exactly
``Df`` applied to it, so ``Df[s_in]`` costs one more row in each matrix product, and rows
``N`` of the higher coefficients (never read) absorb the rest. For the Laplacian (``K = 2``)
this halves the work compared with propagating ``c_2`` along every direction; the first
linear layer applied to the unit seeds is free (:class:`~xafunc._rules.series.UnitSeed`).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._capture.trace import CaptureError, graph_problems, signature_key, trace
from ._engine.taylor import Propagator
from ._execute.compiler import Compiler
from ._rules.series import Series, UnitSeed, materialize, nested_any, nested_map

__all__ = ["jet", "xlaplacian", "xbiharmonic"]


# =============================================================================== helpers
def _check_callable(name: str, func: Any) -> None:
    if not callable(func):
        raise TypeError(f"{name}: func must be callable, got {func!r} of type "
                        f"{type(func).__name__}.")


def _check_float(name: str, what: str, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: {what} must be a tensor, got {type(t).__name__}.")
    if not (t.dtype.is_floating_point or t.dtype.is_complex):
        raise TypeError(f"{name}: {what} must have a floating-point dtype, got {t.dtype}. "
                        "Convert it with .float() or .double().")


def _flatten_output(name: str, out: Any) -> tuple[list[Tensor], Any]:
    leaves, spec = pytree.tree_flatten(out)
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{name}: func must return a tensor or a pytree of tensors, got a "
                            f"leaf of type {type(leaf).__name__}.")
    if not leaves:
        raise ValueError(f"{name}: func returned no tensors.")
    return leaves, spec


def _jvp_derivatives(g: Callable[[Tensor], Any], t: Tensor, K: int) -> tuple[Any, list[Any]]:
    """``g(t), [g'(t), ..., g^(K)(t)]`` for a function of a scalar ``t`` by nested ``jvp``.

    Level ``j`` returns the tuple ``(g, g', ..., g^(j))``; its ``jvp`` along ``1`` returns
    ``(g', ..., g^(j+1))`` as tangents, so one nesting ``K`` deep yields every order.
    """
    def level0(s: Tensor) -> tuple[Any, ...]:
        return (g(s),)

    h: Callable[[Tensor], tuple[Any, ...]] = level0
    for _ in range(K):
        def h(s: Tensor, _h: Callable[[Tensor], tuple[Any, ...]] = h) -> tuple[Any, ...]:
            p, tng = torch.func.jvp(_h, (s,), (torch.ones_like(s),))  # type: ignore[misc]
            return tuple(p) + (tng[-1],)
    out = h(t)
    return out[0], list(out[1:])


class _FuncCache:
    """Per-function caches that do not keep the function alive (weak keys where possible)."""

    def __init__(self) -> None:
        self._weak: weakref.WeakKeyDictionary[Any, dict[Hashable, Any]] = \
            weakref.WeakKeyDictionary()

    def get(self, func: Any) -> dict[Hashable, Any] | None:
        try:
            return self._weak.setdefault(func, {})
        except TypeError:  # not weak-referenceable or not hashable: no caching
            return None


# ===================================================================================== jet
_JET_CACHE = _FuncCache()


class _JetProgram:
    """A captured graph for ``jet`` at one signature (``None`` graph: use the fallback)."""

    def __init__(self, func: Callable[..., Any], primals: Sequence[Tensor]) -> None:
        meta: dict[str, Any] = {}

        def flat(*xs: Tensor) -> list[Tensor]:
            leaves, spec = _flatten_output("jet", func(*xs))
            meta["spec"] = spec
            return leaves

        self.reason: str | None = None
        self.propagator: Any = None
        try:
            gm = trace(flat, list(primals))
        except CaptureError as e:
            self.reason = f"capture failed ({e})"
            return
        problems = graph_problems(gm, series_inputs=len(primals))
        if problems:
            self.reason = "; ".join(problems)
            return
        self.propagator = Propagator(gm)
        self.out_spec = meta["spec"]


def jet(func: Callable[..., Any], primals: Sequence[Tensor],
        series: Sequence[Sequence[Tensor | None]]) -> tuple[Any, Any]:
    """Push a truncated Taylor series through ``func`` (Taylor-mode automatic differentiation).

    The input curve is ``x_i(t) = primals[i] + sum_{k=1..K} series[i][k-1] t^k / k!`` and the
    result describes ``y(t) = func(*x(t))`` the same way:
    ``y(t) = primal_out + sum_k series_out[k-1] t^k / k! + O(t^(K+1))``.

    Convention (the same as ``jax.experimental.jet``): the coefficients are **derivatives of
    the curve**, ``series[i][k-1] = d^k x_i / dt^k (0)`` -- i.e. ``k!`` times the plain Taylor
    coefficient -- and ``series_out[k-1] = d^k y / dt^k (0)``. In particular, for a straight
    line (``series[i] = (v_i, 0, ..., 0)``), ``series_out[k-1] = D^k f(x)[v, ..., v]``, the
    ``k``-th directional derivative, which is what ``k`` nested ``torch.func.jvp`` calls along
    ``v`` return. (Internally xafunc works with plain Taylor coefficients and converts at the
    boundary.)

    The function is captured once per call signature (shapes, dtypes, devices, ``K``) into an
    aten graph and every operator is applied to the whole series at once, so the cost grows
    like ``K^2`` to ``K^3`` elementwise operations per node rather than ``2^K`` as for nested
    ``jvp``. Functions the engine cannot capture (data-dependent control flow, operators
    without a Taylor rule) are computed with nested ``torch.func.jvp`` instead, with the same
    result. ``jet`` composes with ``torch.func.vmap``, ``grad``, ``jacrev`` and ``jvp``.

    Args:
        func: A function of ``len(primals)`` tensors returning a tensor or a pytree of tensors.
        primals: A tuple (or list) of floating-point tensors, the expansion point.
        series: A tuple with one entry per primal; each entry is a tuple of ``K >= 1`` tensors
            shaped like that primal (``None`` for a zero coefficient). Every entry must have
            the same ``K``.

    Returns:
        ``(primal_out, series_out)``: ``primal_out = func(*primals)``; ``series_out`` has the
        structure of ``primal_out`` with every tensor replaced by a tuple of ``K`` tensors
        (the derivatives of ``y(t)``, zeros where they vanish). For a tensor output it is
        simply a tuple of ``K`` tensors.

    Example:
        >>> import math, torch
        >>> from xafunc import jet
        >>> x, v = torch.tensor(0.3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
        >>> y, (d1, d2, d3) = jet(torch.exp, (x,), ((v, None, None),))
        >>> all(math.isclose(d.item(), math.exp(0.3)) for d in (y, d1, d2, d3))
        True
        >>> # y(t) = sin(t^2 / 2): y'' (0) = 1 and y'''' (0) = 0, y^(6) (0) = -15 * 1
        >>> zero = torch.tensor(0.0, dtype=torch.float64)
        >>> _, ds = jet(torch.sin, (zero,), ((zero, v, zero, zero, zero, zero),))
        >>> [round(d.item(), 10) for d in ds]
        [0.0, 1.0, 0.0, 0.0, 0.0, -15.0]
    """
    _check_callable("jet", func)
    if isinstance(primals, Tensor) or not isinstance(primals, (tuple, list)):
        raise TypeError("jet: primals must be a tuple of tensors, e.g. (x,), got "
                        f"{type(primals).__name__}.")
    if isinstance(series, Tensor) or not isinstance(series, (tuple, list)) \
            or len(series) != len(primals):
        raise ValueError("jet: series must be a tuple with one entry per primal (each a tuple "
                         f"of K coefficient tensors); got {len(primals)} primals.")
    primals = tuple(primals)
    K = None
    for i, (p, s) in enumerate(zip(primals, series, strict=False)):
        _check_float("jet", f"primals[{i}]", p)
        if isinstance(s, Tensor) or not isinstance(s, (tuple, list)) or len(s) == 0:
            raise TypeError(f"jet: series[{i}] must be a non-empty tuple of coefficient tensors "
                            "(one per order), e.g. (v,) or (v, a).")
        if K is None:
            K = len(s)
        elif len(s) != K:
            raise ValueError(f"jet: every series entry must have the same length K; series[0] "
                             f"has {K}, series[{i}] has {len(s)}.")
        for k, c in enumerate(s):
            if c is None:
                continue
            _check_float("jet", f"series[{i}][{k}]", c)
            if c.shape != p.shape:
                raise ValueError(f"jet: series[{i}][{k}] has shape {tuple(c.shape)} but "
                                 f"primals[{i}] has shape {tuple(p.shape)}; they must match.")
    assert K is not None

    cache = _JET_CACHE.get(func)
    key = (signature_key(primals, {}, func), K)
    prog = cache.get(key) if cache is not None else None
    if prog is None:
        prog = _JetProgram(func, primals)
        if cache is not None:
            cache[key] = prog
    if prog.propagator is not None:
        return _jet_engine(prog, primals, series, K)
    return _jet_reference(func, primals, series, K)


def _jet_engine(prog: _JetProgram, primals: tuple[Tensor, ...],
                series: Sequence[Sequence[Tensor | None]], K: int) -> tuple[Any, Any]:
    inputs = []
    for p, s in zip(primals, series, strict=False):
        coeffs = [None if c is None else (c / math.factorial(k)).unsqueeze(0)
                  for k, c in enumerate(s, start=1)]
        inputs.append(Series(p, coeffs) if any(c is not None for c in coeffs) else p)
    outs = prog.propagator(*inputs)
    prim, ser = [], []
    for o in outs:
        if isinstance(o, Series):
            prim.append(o.primal)
            cs = []
            for k in range(1, K + 1):
                c = o.coeffs[k - 1] if k <= o.order else None
                if c is None:
                    cs.append(torch.zeros_like(o.primal))
                else:
                    cs.append(c.squeeze(0).expand(o.primal.shape) * math.factorial(k))
            ser.append(tuple(cs))
        else:
            prim.append(o)
            ser.append(tuple(torch.zeros_like(o) for _ in range(K)))
    spec = prog.out_spec  # each leaf of series_out is the K-tuple of that output's terms
    return pytree.tree_unflatten(prim, spec), pytree.tree_unflatten(ser, spec)


def _jet_reference(func: Callable[..., Any], primals: tuple[Tensor, ...],
                   series: Sequence[Sequence[Tensor | None]], K: int) -> tuple[Any, Any]:
    """Nested ``torch.func.jvp`` on ``t -> func(x(t))``: derivatives at ``t = 0``."""
    t0 = torch.zeros((), dtype=primals[0].dtype, device=primals[0].device)

    def curve(t: Tensor) -> list[Tensor]:
        xs = []
        for p, s in zip(primals, series, strict=False):
            x = p
            for k, c in enumerate(s, start=1):
                if c is not None:
                    x = x + c * (t ** k / math.factorial(k))
            xs.append(x)
        leaves, _ = _flatten_output("jet", func(*xs))
        return leaves

    y, ds = _jvp_derivatives(curve, t0, K)
    _, spec = pytree.tree_flatten(func(*primals))
    ser = [tuple(d[j] for d in ds) for j in range(len(y))]
    return pytree.tree_unflatten(list(y), spec), pytree.tree_unflatten(ser, spec)


# ============================================================ collapsed Taylor propagation
class _Col:
    """A value in collapsed propagation: ``primal``, ``coeffs = [c_1 .. c_{K-1}]`` along the
    ``N`` directions (``None`` = zero) and ``s``, the weighted sum of the top coefficient
    ``c_K`` over the directions (``None`` = zero)."""

    __slots__ = ("primal", "coeffs", "s")

    def __init__(self, primal: Tensor, coeffs: list[Any], s: Tensor | None) -> None:
        self.primal, self.coeffs, self.s = primal, coeffs, s


def _has_col(x: Any) -> bool:
    return nested_any(x, lambda v: isinstance(v, _Col))


def _col_primals(x: Any) -> Any:
    return nested_map(x, lambda v: v.primal if isinstance(v, _Col) else v)


def _has_s(x: Any) -> bool:
    return nested_any(x, lambda v: isinstance(v, _Col) and v.s is not None)


def _lower_series(x: Any) -> Any:
    """Every ``_Col`` as the order-``K`` series ``[c_1 .. c_{K-1}, 0]`` along the directions."""
    return nested_map(x, lambda v: Series(v.primal, v.coeffs + [None])
                      if isinstance(v, _Col) else v)


def _sum_series(x: Any) -> Any:
    """Every ``_Col`` with a collapsed sum as the first-order series ``[s]`` (one direction);
    the others as constants: the second call computes ``Df[s]``."""
    def one(v: Any) -> Any:
        if not isinstance(v, _Col):
            return v
        return v.primal if v.s is None else Series(v.primal, [v.s.unsqueeze(0)])

    return nested_map(x, one)


# Closed-form (g', g''/2) for the elementwise operators that dominate networks: the degree-2
# collapsed rule is then c_1 <- g' c_1, s <- g' s + (g''/2) sum_r c_1r^2, two passes over c_1.
def _d2_tanh(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    g1 = 1 - y * y
    return g1, -y * g1


def _d2_sigmoid(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    g1 = y * (1 - y)
    return g1, g1 * (0.5 - y)


def _d2_exp(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return y, 0.5 * y


def _d2_sin(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return torch.cos(x), -0.5 * y


def _d2_cos(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return -torch.sin(x), -0.5 * y


def _d2_log(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    r = torch.reciprocal(x)
    return r, -0.5 * r * r


_aten = torch.ops.aten
_D2_UNARY: dict[Any, tuple[Any, Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]]] = {
    _aten.tanh.default: (torch.tanh, _d2_tanh),
    _aten.sigmoid.default: (torch.sigmoid, _d2_sigmoid),
    _aten.exp.default: (torch.exp, _d2_exp),
    _aten.sin.default: (torch.sin, _d2_sin),
    _aten.cos.default: (torch.cos, _d2_cos),
    _aten.log.default: (torch.log, _d2_log),
}


class _Collapsed(Propagator):
    """Runs a captured graph propagating ``c_1 .. c_{K-1}`` along ``N`` directions and the
    weighted sum of ``c_K`` (see NOTE [Collapsed Taylor mode]).

    Each operator's rule runs once on the directions (``c_K`` in = 0, so its ``c_K`` out is
    the nonlinear part ``R``, summed with the weights right away) and, when some input
    carries a collapsed sum, once more on ``s`` as a first-order series (``Df[s]``).
    """

    def __init__(self, gm: torch.fx.GraphModule, K: int) -> None:
        self.K = K
        self.weights: Tensor | None = None
        super().__init__(gm)

    def rule_for(self, node: torch.fx.Node) -> Any:
        fast = _D2_UNARY.get(node.target) if self.K == 2 else None
        if fast is not None and len(node.args) == 1 and not node.kwargs:
            return ("unary2",) + fast
        return super().rule_for(node)

    def carries(self, x: Any) -> bool:
        return _has_col(x)

    def strip(self, x: Any) -> Any:
        return _col_primals(x)

    def finish(self, value: Any) -> Any:
        return value

    def apply(self, rule: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        K, weights = self.K, self.weights
        if isinstance(rule, tuple):  # closed-form degree-2 elementwise rule
            x = args[0]
            y0 = rule[1](x.primal)
            c1 = x.coeffs[0]
            if c1 is None and x.s is None:
                return y0
            if isinstance(c1, UnitSeed):
                c1 = materialize(Series(x.primal, [c1])).coeffs[0]
            g1, h2 = rule[2](x.primal, y0)
            s = None if x.s is None else g1 * x.s
            if c1 is not None:
                if weights is not None:
                    sq = _contract(c1 * c1, weights)
                elif c1.is_complex():
                    sq = (c1 * c1).sum(0)
                else:  # one fused pass: sum_r c_1r^2
                    sq = torch.linalg.vecdot(c1, c1, dim=0)
                s = h2 * sq if s is None else s + h2 * sq
                c1 = g1 * c1
            return _Col(y0, [c1], s)
        sargs = _lower_series(args)
        skw = {k: _lower_series(v) for k, v in kwargs.items()}
        if not getattr(rule, "unit_aware", False):
            sargs, skw = materialize(sargs), {k: materialize(v) for k, v in skw.items()}
        out = rule(*sargs, **skw)
        lin = None
        if _has_s(args) or _has_s(tuple(kwargs.values())):
            lin = rule(*_sum_series(args), **{k: _sum_series(v) for k, v in kwargs.items()})
        return _merge(out, lin, K, weights)

    def __call__(self, weights: Tensor | None, *inputs: Any,  # type: ignore[override]
                 stop_at: Any = None, override: Any = None) -> Any:
        self.weights = weights
        try:
            return super().__call__(*inputs)
        finally:
            self.weights = None


def _merge(out: Any, lin: Any, K: int, weights: Tensor | None) -> Any:
    """Combine the rule's output on the directions with ``Df[s]`` into ``_Col`` values."""
    if isinstance(out, Series):
        cs = list(out.coeffs[:K - 1]) + [None] * max(0, K - 1 - out.order)
        top = out.coeffs[K - 1] if out.order >= K else None
        s = None if top is None else _contract(top, weights)
        if isinstance(lin, Series) and lin.coeffs[0] is not None:
            ls = lin.coeffs[0][0]
            s = ls if s is None else s + ls
        return _Col(out.primal, cs, s)
    if isinstance(out, (list, tuple)):
        lins = lin if isinstance(lin, (list, tuple)) else [None] * len(out)
        return type(out)(_merge(o, li, K, weights) for o, li in zip(out, lins, strict=False))
    return out


def _contract(top: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return top.sum(0)
    return torch.tensordot(weights.to(top.dtype), top, dims=1)


# ========================================================================== the operators
class _Request:
    """Flattening of one call: the differentiated leaves concatenated into ``z``."""

    def __init__(self, name: str, func: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], argnums: tuple[int, ...]) -> None:
        self.func = func
        leaves, self.spec = pytree.tree_flatten((args, kwargs))
        starts, offset = [], 0
        for a in args:
            starts.append(offset)
            offset += len(pytree.tree_leaves(a))
        self.diff_pos: list[int] = []
        for a in argnums:
            k = len(pytree.tree_leaves(args[a]))
            self.diff_pos.extend(range(starts[a], starts[a] + k))
        for i in self.diff_pos:
            _check_float(name, "a differentiated argument", leaves[i])
        diff = set(self.diff_pos)
        self.other_pos = [i for i, leaf in enumerate(leaves)
                          if i not in diff and isinstance(leaf, Tensor)]
        self.const_leaves = [None if (i in diff or isinstance(leaf, Tensor)) else leaf
                             for i, leaf in enumerate(leaves)]
        self.in_shapes = [tuple(leaves[i].shape) for i in self.diff_pos]
        self.sizes = [math.prod(s) for s in self.in_shapes]
        self.n = sum(self.sizes)
        self.name = name
        self.out_spec: Any = None

    def split(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, list[Tensor]]:
        leaves = pytree.tree_leaves((args, kwargs))
        if len(self.diff_pos) == 1:
            z = leaves[self.diff_pos[0]].reshape(-1)
        else:
            z = torch.cat([leaves[i].reshape(-1) for i in self.diff_pos])
        return z, [leaves[i] for i in self.other_pos]

    def flat(self, z: Tensor, *others: Tensor) -> list[Tensor]:
        leaves = list(self.const_leaves)
        parts = (z,) if len(self.sizes) == 1 else torch.split(z, self.sizes)
        for pos, part, shape in zip(self.diff_pos, parts, self.in_shapes, strict=False):
            leaves[pos] = part.reshape(shape)
        for pos, t in zip(self.other_pos, others, strict=False):
            leaves[pos] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        ys, self.out_spec = _flatten_output(self.name, self.func(*args, **kwargs))
        return ys


class _Compiled:
    def __init__(self, req: _Request, K: int, z: Tensor, others: list[Tensor]) -> None:
        self.req = req
        self.runner: _Collapsed | None = None
        self.reason: str | None = None
        self.compiler = Compiler()
        try:
            gm = trace(req.flat, [z, *others])
        except CaptureError as e:
            self.reason = f"capture failed ({e})"
            return
        problems = graph_problems(gm, series_inputs=1)
        if problems:
            self.reason = "; ".join(problems)
            return
        self.out_spec = req.out_spec
        self.runner = _Collapsed(gm, K)


_METHODS = ("exact", "randomized")
_DISTRIBUTIONS = ("rademacher", "gaussian")


class _Operator:
    """``sum_r w_r D^K f[v_r, ..., v_r] * scale`` for a fixed or random direction set."""

    def __init__(self, name: str, K: int, func: Callable[..., Any], argnums: Any, method: Any,
                 num_samples: Any, generator: Any, distribution: Any) -> None:
        _check_callable(name, func)
        if isinstance(argnums, bool) or not isinstance(argnums, (int, tuple)) or (
                isinstance(argnums, tuple) and (not argnums or any(
                    isinstance(a, bool) or not isinstance(a, int) for a in argnums))):
            raise TypeError(f"{name}: argnums must be an int or a non-empty tuple of ints, "
                            f"got {argnums!r}.")
        if method not in _METHODS:
            raise ValueError(f"{name}: method must be one of {_METHODS}, got {method!r}.")
        if method == "randomized":
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) \
                    or num_samples < 1:
                raise ValueError(f"{name}: method='randomized' needs num_samples, a positive "
                                 f"int, got {num_samples!r}.")
        elif num_samples is not None:
            raise ValueError(f"{name}: num_samples is only used with method='randomized'.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{name}: generator must be a torch.Generator or None.")
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(f"{name}: distribution must be one of {_DISTRIBUTIONS}, got "
                             f"{distribution!r}.")
        self.name, self.K, self.func, self.argnums = name, K, func, argnums
        self.method, self.num_samples = method, num_samples
        self.generator, self.distribution = generator, distribution
        self._cache: dict[Hashable, _Compiled] = {}
        self._dirs: dict[Hashable, tuple[Tensor, Tensor | None, float, int | None]] = {}

    # ----------------------------------------------------------------------- directions
    def directions(self, n: int, dtype: torch.dtype, device: torch.device
                   ) -> tuple[Tensor, Tensor | None, float, int | None]:
        """``(V (N, n), weights (N,) or None = ones, scale, unit_offset)``."""
        if self.method == "randomized":
            S = self.num_samples
            g = self.generator
            gdev = g.device if g is not None else device
            if self.distribution == "rademacher":
                V = torch.randint(0, 2, (S, n), generator=g, device=gdev).to(device, dtype)
                V = 2 * V - 1
            else:
                V = torch.randn((S, n), generator=g, device=gdev, dtype=dtype).to(device)
            if self.K == 2:  # E[v^T H v] = tr H; v^T H v = 2 c_2(v)
                return V, None, 2.0 / S, None
            if self.distribution == "rademacher":
                raise ValueError(f"{self.name}: the randomized biharmonic estimator needs "
                                 "distribution='gaussian' (Rademacher fourth moments differ).")
            return V, None, 24.0 / (3.0 * S), None  # E[D^4f[v^4]] = 3 lap^2 f, D^4 = 24 c_4
        key = (n, dtype, device)
        hit = self._dirs.get(key)
        if hit is not None:
            return hit
        out: tuple[Tensor, Tensor | None, float, int | None]
        if self.K == 2:
            out = (torch.eye(n, dtype=dtype, device=device), None, 2.0, 0)
        else:
            out = _biharmonic_directions(n, dtype, device)
        self._dirs[key] = out
        return out

    # --------------------------------------------------------------------------- calls
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        name = self.name
        argnums = (self.argnums,) if isinstance(self.argnums, int) else self.argnums
        norm = []
        for a in argnums:
            if not -len(args) <= a < len(args):
                raise ValueError(f"{name}: argnums {self.argnums!r} is out of range for "
                                 f"{len(args)} positional arguments.")
            norm.append(a % len(args))
        key = (signature_key(args, kwargs, self.func), tuple(norm))
        comp = self._cache.get(key)
        if comp is None:
            req = _Request(name, self.func, args, kwargs, tuple(norm))
            z, others = req.split(args, kwargs)
            comp = _Compiled(req, self.K, z, others)
            self._cache[key] = comp
        z, others = comp.req.split(args, kwargs)
        V, weights, scale, unit_offset = self.directions(comp.req.n, z.dtype, z.device)
        if comp.runner is None:
            return self._reference(comp.req, z, others, V, weights, scale)
        runner = comp.runner

        def eager(z: Tensor, *others: Tensor) -> list[Tensor]:
            first: Any = V if unit_offset is None else UnitSeed(unit_offset, V.shape[0])
            outs = runner(weights, _Col(z, [first] + [None] * (self.K - 2), None), *others)
            res = []
            for o in outs:
                if isinstance(o, _Col) and o.s is not None:
                    res.append(o.s * scale)
                else:
                    p = o.primal if isinstance(o, _Col) else o
                    res.append(torch.zeros_like(p))
            return res

        if self.method == "exact":  # fixed directions: compile (see NOTE [Compiled propagation])
            res = comp.compiler.run("exact", lambda: None, eager, z, list(others))
        else:  # fresh random directions on every call
            res = eager(z, *others)
        return pytree.tree_unflatten(list(res), comp.out_spec)

    def _reference(self, req: _Request, z: Tensor, others: list[Tensor], V: Tensor,
                   weights: Tensor | None, scale: float) -> Any:
        """Nested ``torch.func.jvp`` along every direction (vmapped), weighted and summed."""
        K = self.K

        def along(v: Tensor) -> list[Tensor]:
            t0 = torch.zeros((), dtype=z.dtype, device=z.device)
            _, ds = _jvp_derivatives(lambda t: req.flat(z + t * v, *others), t0, K)
            return ds[-1]  # D^K f[v, ..., v]

        try:
            top = torch.func.vmap(along)(V)
        except RuntimeError:  # e.g. data-dependent control flow: one direction at a time
            per = [along(v) for v in V]
            top = [torch.stack(cs) for cs in zip(*per, strict=False)]
        res = []
        for c in top:
            c = c / math.factorial(K)  # as a Taylor coefficient, like the engine
            res.append(_contract(c, weights) * scale)
        return pytree.tree_unflatten(res, req.out_spec)


def _biharmonic_directions(n: int, dtype: torch.dtype, device: torch.device
                           ) -> tuple[Tensor, Tensor, float, None]:
    """Directions ``e_i`` and ``e_i +- e_j`` (``i < j``) with weights such that
    ``sum_r w_r Q(v_r) = lap^2 f`` for ``Q(v) = D^4 f[v, v, v, v]``.

    ``Q(e_i + e_j) + Q(e_i - e_j) = 2 f_iiii + 2 f_jjjj + 12 f_iijj``, so
    ``lap^2 f = sum_i f_iiii + 2 sum_{i<j} f_iijj
    = (1 - (n - 1) / 3) sum_i Q(e_i) + (1 / 6) sum_{i<j} [Q(e_i + e_j) + Q(e_i - e_j)]``.
    """
    eye = torch.eye(n, dtype=torch.float64)
    rows = [eye]
    if n > 1:
        i, j = torch.triu_indices(n, n, 1)
        rows += [eye[i] + eye[j], eye[i] - eye[j]]
    V = torch.cat(rows).to(device=device, dtype=dtype)
    w = torch.full((V.shape[0],), 1.0 / 6.0, dtype=torch.float64)
    w[:n] = 1.0 - (n - 1) / 3.0
    return V, w.to(device=device, dtype=dtype), 24.0, None


def _make_operator(name: str, K: int, func: Callable[..., Any], argnums: Any, method: Any,
                   num_samples: Any, generator: Any, distribution: Any) -> Callable[..., Any]:
    op = _Operator(name, K, func, argnums, method, num_samples, generator, distribution)
    def wrapper(*a: Any, **k: Any) -> Any:
        return op(*a, **k)

    try:
        functools.update_wrapper(wrapper, func)
    except (AttributeError, TypeError):  # pragma: no cover - exotic callables
        pass
    wrapper._xafunc_operator = op  # type: ignore[attr-defined]
    return wrapper


def xlaplacian(func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, *,
               method: str = "exact", num_samples: int | None = None,
               generator: torch.Generator | None = None,
               distribution: str = "rademacher") -> Callable[..., Any]:
    """The Laplacian ``sum_i d^2 f / dx_i^2`` of every output entry of ``func``.

    ``xlaplacian(f)(*args)`` has the structure and shapes of ``f(*args)``; entry ``j`` is the
    trace of the Hessian of output entry ``j`` with respect to the argument(s) at ``argnums``
    (several arguments, or a pytree argument, are treated as one concatenated vector).

    ``method="exact"`` pushes degree-2 Taylor series along the ``n`` unit directions ``e_i``
    (``c_2(e_i) = (1/2) d^2 f / dx_i^2``) and sums ``2 c_2`` over the directions *while*
    propagating (collapsed Taylor mode, see the module notes): one forward pass carrying
    ``n + 1`` first-order rows, without ever forming the Hessian.

    ``method="randomized"`` is Hutchinson's estimator: with ``num_samples`` independent
    directions ``v`` with ``E[v v^T] = I`` (``distribution="rademacher"``: entries +-1, the
    default, lowest variance; or ``"gaussian"``), ``(1/S) sum_s v_s^T H v_s`` is an unbiased
    estimate of ``tr H``. Directions are drawn from ``generator`` (or the global RNG) at each
    call. Under ``torch.func.vmap`` pass ``randomness="different"`` (independent directions
    per sample) or ``"same"``.

    Functions the engine cannot capture are computed with nested ``torch.func.jvp`` along the
    same directions. The result composes with ``torch.func.vmap`` (e.g. per-sample Laplacians
    of collocation points) and ``torch.func.grad`` / ``jacrev`` (e.g. PINN losses).

    Args:
        func: A function returning a tensor or a pytree of tensors.
        argnums: The positional argument(s) to differentiate: an int or a tuple of ints.
        method: ``"exact"`` or ``"randomized"``.
        num_samples: Number of random directions (``method="randomized"`` only).
        generator: A ``torch.Generator`` for the random directions.
        distribution: ``"rademacher"`` or ``"gaussian"`` (``method="randomized"``).

    Returns:
        A function with the signature of ``func`` returning the Laplacian(s).

    Example:
        >>> import torch
        >>> from xafunc import xlaplacian
        >>> f = lambda x: (x ** 3).sum() + x[0] * x[1]   # Laplacian: 6 * sum(x)
        >>> x = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
        >>> xlaplacian(f)(x).item()
        15.0
    """
    return _make_operator("xlaplacian", 2, func, argnums, method, num_samples, generator,
                          distribution)


def xbiharmonic(func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, *,
                method: str = "exact", num_samples: int | None = None,
                generator: torch.Generator | None = None,
                distribution: str = "gaussian") -> Callable[..., Any]:
    """The biharmonic ``lap^2 f = sum_{i,j} d^4 f / dx_i^2 dx_j^2`` of every output entry.

    Conventions as :func:`xlaplacian`. With ``Q(v) = D^4 f[v, v, v, v] = 24 c_4(v)``:

    * ``method="exact"`` uses the ``n^2`` directions ``e_i`` and ``e_i +- e_j`` (``i < j``):
      ``Q(e_i + e_j) + Q(e_i - e_j) = 2 f_iiii + 2 f_jjjj + 12 f_iijj``, hence
      ``lap^2 f = (1 - (n-1)/3) sum_i Q(e_i) + (1/6) sum_{i<j} [Q(e_i + e_j) + Q(e_i - e_j)]``,
      a fixed weighted sum of degree-4 Taylor coefficients, collapsed during propagation.
    * ``method="randomized"`` with standard Gaussian ``v`` (``distribution="gaussian"``, the
      only supported one): ``E[v_i v_j v_k v_l] = d_ij d_kl + d_ik d_jl + d_il d_jk`` gives
      ``E[Q(v)] = 3 lap^2 f``, so ``(1 / (3 S)) sum_s Q(v_s)`` is unbiased.

    Args:
        func: A function returning a tensor or a pytree of tensors.
        argnums: The positional argument(s) to differentiate: an int or a tuple of ints.
        method: ``"exact"`` or ``"randomized"``.
        num_samples: Number of random directions (``method="randomized"`` only).
        generator: A ``torch.Generator`` for the random directions.
        distribution: ``"gaussian"`` (``method="randomized"``).

    Returns:
        A function with the signature of ``func`` returning the biharmonic(s).

    Example:
        >>> import torch
        >>> from xafunc import xbiharmonic
        >>> f = lambda x: (x ** 2).sum() ** 2   # |x|^4 in n = 3 dims: lap^2 = 8 n (n + 2) = 120
        >>> round(xbiharmonic(f)(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)).item(), 8)
        120.0
    """
    return _make_operator("xbiharmonic", 4, func, argnums, method, num_samples, generator,
                          distribution)


for _f in (jet, xlaplacian, xbiharmonic):
    _f.__module__ = "xafunc"
