"""Taylor-mode transforms: ``jet``, ``xlaplacian`` and ``xbiharmonic``.

These take the same path as every other transform: the function is looked up in the shared
capture cache (NOTE [The capture cache]) and a plan per request is built on the capture and
cached there. ``jet`` pushes truncated Taylor series through the captured graph
(:class:`~xafunc._engine.taylor.Propagator`); ``xlaplacian`` and ``xbiharmonic`` run the
collapsed Taylor mode of :mod:`xafunc._engine.collapsed`. A function the engine cannot run is
differentiated by nested ``torch.func.jvp`` along the same directions, on the captured graph
when there is one (NOTE [A reference that is right]).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import _validate as V
from ._capture.cache import CACHE, Entry, eager_under_compile, outside_compiler
from ._capture.request import Request, Split, output_split, write_back
from ._capture.trace import CaptureError, graph_problems
from ._engine.collapsed import Col, Collapsed, contract
from ._engine.taylor import Propagator
from ._execute.compiler import Compiler
from ._execute.executable import outside_transforms
from ._plan import empty_vmap_batch, level_local_reason, strict_checked
from ._reference import NoGradCuts, reference_mode
from ._rules.series import Series, UnitSeed, primal

__all__ = ["jet", "xlaplacian", "xbiharmonic"]


# =============================================================================== helpers
def _check_float(name: str, what: str, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: {what} must be a tensor, got {type(t).__name__}.")
    if t.layout is not torch.strided:
        raise TypeError(f"{name}: {what} is a {t.layout} tensor; derivatives are taken with "
                        "respect to dense tensors, as in torch.func. Pass x.to_dense().")
    if not (t.dtype.is_floating_point or t.dtype.is_complex):
        raise TypeError(f"{name}: {what} must have a floating-point dtype, got {t.dtype}. "
                        "Convert it with .float() or .double().")


def _tensor_leaves(name: str, out: Any) -> tuple[list[Tensor], Any]:
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


# ===================================================================================== jet
def jet(func: Callable[..., Any], primals: Sequence[Tensor],
        series: Sequence[Sequence[Tensor | None]], *, compile: bool = False
        ) -> tuple[Any, Any]:
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
    boundary.) ``.detach()`` and ``torch.no_grad()`` blocks are constants, as in every xafunc
    transform and in nested ``jacrev``; torch's forward mode (``jvp``, ``jacfwd``) ignores
    grad mode and differentiates through ``no_grad`` blocks.

    The function is captured once per call signature (shapes, dtypes, devices, ``K``) into an
    aten graph and every operator is applied to the whole series at once, so the cost grows
    like ``K^2`` to ``K^3`` elementwise operations per node rather than ``2^K`` as for nested
    ``jvp``. Functions the engine cannot capture (data-dependent control flow, operators
    without a Taylor rule) are computed with nested ``torch.func.jvp`` instead (its ``no_grad``
    blocks kept constant), with the same result. ``jet`` composes with ``torch.func.vmap``,
    ``grad``, ``jacrev`` and ``jvp``.

    Args:
        func: A function of ``len(primals)`` tensors returning a tensor or a pytree of tensors.
        primals: A tuple (or list) of floating-point tensors, the expansion point.
        series: A tuple with one entry per primal; each entry is a tuple of ``K >= 1`` tensors
            shaped like that primal (``None`` for a zero coefficient). Every entry must have
            the same ``K``.
        compile: The propagation is compiled once per pattern of ``None`` coefficients into
            one aten graph, run by TorchScript's interpreter; if True, calls with plain
            tensors that need no autograd history run it as code generated by
            torch.compile's inductor instead (see :func:`~xafunc.xderiv`).

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
    V.check_callable("jet", func)
    V.check_bool("jet", "compile", compile)
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

    return outside_compiler(_jet_run, func, primals, series, K, compile)


def _jet_run(func: Callable[..., Any], primals: tuple[Tensor, ...],
             series: Sequence[Sequence[Tensor | None]], K: int,
             compile: bool = False) -> tuple[Any, Any]:
    entry, lifted = CACHE.lookup(func, primals, {})
    key = Request("jet", K, compile=compile)
    plan = entry.plans.get(key)
    if plan is None:
        plan = entry.plans[key] = _jet_plan(entry, compile)
    return plan(func, primals, series, K, lifted)


def _jet_plan(entry: Entry, compile: bool = False) -> Callable[..., Any]:
    """The engine's propagation on the capture, or nested ``jvp`` when it cannot run."""
    cap = entry.captured
    if cap.graph is None or cap.level_local:
        return strict_checked("jet", cap.reason or level_local_reason(cap), _jet_reference)
    output_split("jet", cap, has_aux=False)
    problems = graph_problems(cap.graph, series_inputs=cap.n_args)
    if problems:
        return strict_checked("jet", "; ".join(problems), _jet_reference)
    prop = Propagator(cap.graph)
    n_out = cap.n_out
    n_prim = cap.n_args

    def propagate(primals: Sequence[Tensor], series: Sequence[Sequence[Tensor | None]],
                  K: int, others: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor],
                                                             list[Tensor]]:
        """Primal outputs, their ``K`` derivatives each (flat), mutation values."""
        inputs: list[Any] = []
        for p, s in zip(primals, series, strict=False):
            coeffs = [None if c is None else (c / math.factorial(k)).unsqueeze(0)
                      for k, c in enumerate(s, start=1)]
            inputs.append(Series(p, coeffs) if any(c is not None for c in coeffs) else p)
        outs = prop(*inputs, *others)
        prim, ser = [], []
        for o in outs[:n_out]:
            if isinstance(o, Series):
                prim.append(o.primal)
                for k in range(1, K + 1):
                    c = o.coeffs[k - 1] if k <= o.order else None
                    if c is None:
                        ser.append(torch.zeros_like(o.primal))
                    else:
                        ser.append(c.squeeze(0).expand(o.primal.shape) * math.factorial(k))
            else:
                prim.append(o)
                ser += [torch.zeros_like(o) for _ in range(K)]
        return prim, ser, [primal(o) for o in outs[n_out:]]

    # the propagation for each pattern of zero (None) coefficients is compiled like xderiv's
    # (NOTE [Compiled propagation]; NOTE [Inductor executor] with compile=True)
    compiler = Compiler(cap.n_lifted, compile)

    def run(func: Any, primals: tuple[Tensor, ...], series: Sequence[Sequence[Tensor | None]],
            K: int, lifted: tuple[Tensor, ...]) -> tuple[Any, Any]:
        targets = [(list(primals) + list(lifted))[i] for i in cap.mutated]
        others = [*cap.random_values(list(primals), lifted), *lifted]
        pattern = tuple(tuple(c is None for c in s) for s in series)
        coeffs = [c for s in series for c in s if c is not None]

        def eager(*flat: Tensor) -> list[Tensor]:
            ps, cs = flat[:n_prim], iter(flat[n_prim:n_prim + len(coeffs)])
            ss = [[None if none else next(cs) for none in nones] for nones in pattern]
            p, d, m = propagate(ps, ss, K, flat[n_prim + len(coeffs):])
            return [*p, *d, *m]

        flat = [*primals, *coeffs, *others]
        res = compiler.run(pattern, lambda: None, eager, flat[0], flat[1:])
        prim, ser, mutations = res[:n_out], res[n_out:n_out * (K + 1)], res[n_out * (K + 1):]
        write_back(targets, list(mutations))
        spec = cap.out_spec  # each leaf of series_out is the K-tuple of that output's terms
        return pytree.tree_unflatten(list(prim), spec), pytree.tree_unflatten(
            [tuple(ser[i * K:(i + 1) * K]) for i in range(n_out)], spec)

    run.compiler = compiler  # type: ignore[attr-defined]  # what runs it (tests, benchmarks)
    return run


def _jet_reference(func: Callable[..., Any], primals: tuple[Tensor, ...],
                   series: Sequence[Sequence[Tensor | None]], K: int,
                   lifted: tuple[Tensor, ...]) -> tuple[Any, Any]:
    """Nested ``torch.func.jvp`` on ``t -> func(x(t))``: derivatives at ``t = 0``; ``func``
    runs once, its ``no_grad`` blocks constants (NOTE [No-grad blocks under forward mode])."""
    t0 = torch.zeros((), dtype=primals[0].dtype, device=primals[0].device)
    out_spec: list[Any] = []

    def curve(t: Tensor) -> list[Tensor]:
        xs = []
        for p, s in zip(primals, series, strict=False):
            x = p
            for k, c in enumerate(s, start=1):
                if c is not None:
                    x = x + c * (t ** k / math.factorial(k))
            xs.append(x)
        with torch.enable_grad(), NoGradCuts():  # as the capture traces it
            leaves, spec = _tensor_leaves("jet", func(*xs))
        out_spec.append(spec)
        return leaves

    recording = torch.is_grad_enabled()
    with reference_mode(safe_norms=True):
        y, ds = _jvp_derivatives(curve, t0, K)
    if not recording:  # (``func`` ran with grad mode on: nothing of it is kept)
        y, ds = [t.detach() for t in y], [[t.detach() for t in d] for d in ds]
    ser = [tuple(d[j] for d in ds) for j in range(len(y))]
    return pytree.tree_unflatten(list(y), out_spec[0]), pytree.tree_unflatten(ser, out_spec[0])


# ========================================================================== the operators
_METHODS = ("exact", "randomized")
_DISTRIBUTIONS = ("rademacher", "gaussian")


class _Operator:
    """``sum_r w_r D^K f[v_r, ..., v_r] * scale`` for a fixed or random direction set."""

    def __init__(self, name: str, K: int, func: Callable[..., Any], argnums: Any, method: Any,
                 num_samples: Any, generator: Any, distribution: Any,
                 compile: Any = False) -> None:
        V.check_callable(name, func)
        V.check_bool(name, "compile", compile)
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
        self.request = Request(name, K, argnums, method=method, num_samples=num_samples,
                               distribution=distribution, compile=compile)

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
        return _fixed_directions(self.K, n, dtype, device)

    # --------------------------------------------------------------------------- calls
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return outside_compiler(self.run, *args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if empty_vmap_batch(args, kwargs):  # nothing to compute: nested torch.func's shapes
            argnums = V.normalize_argnums(self.name, self.argnums, len(args))
            return _raw_reference(argnums, isinstance(self.argnums, int))(self, args, kwargs, ())
        # traced as nested jacrev runs it -- the arguments differentiated require grad, which
        # ``func`` may test -- so the capture is also ``xderiv``'s of the same arguments
        differentiated = tuple(sorted(V.normalize_argnums(self.name, self.argnums, len(args))))
        entry, lifted = CACHE.lookup(self.func, args, kwargs, differentiated)
        plan = entry.plans.get(self.request)
        if plan is None:
            plan = entry.plans[self.request] = _operator_plan(self, entry, args, kwargs, lifted)
        return plan(self, args, kwargs, lifted)


def _operator_plan(op: _Operator, entry: Entry, args: tuple[Any, ...], kwargs: dict[str, Any],
                   lifted: tuple[Tensor, ...]) -> Callable[..., Any]:
    """Collapsed Taylor mode on the capture, or nested ``jvp`` along the directions."""
    from ._plan import _examples

    name = op.name
    argnums = V.normalize_argnums(name, op.argnums, len(args))
    for a in argnums:
        for leaf in pytree.tree_leaves(args[a]):
            _check_float(name, "a differentiated argument", leaf)
    int_argnums = isinstance(op.argnums, int)
    cap = entry.captured
    if cap.graph is None or cap.level_local:
        return strict_checked(name, cap.reason or level_local_reason(cap),
                              _raw_reference(argnums, int_argnums))
    split = Split(name, cap, args, kwargs, argnums, int_argnums, False)
    z, others = _examples(split, args, kwargs, lifted)
    try:
        g0 = split.flat_graph([z, *others])
    except CaptureError as e:
        return strict_checked(name, f"capture failed ({e})", _graph_reference(split, op.K))
    problems = graph_problems(g0)
    if problems:
        return strict_checked(name, "; ".join(problems), _graph_reference(split, op.K))
    return _collapsed_engine(split, g0, op.K, split.n_static(len(lifted)), op.request.compile)


def _unflatten(s: Tensor, split_layout: Any) -> Any:
    """A flat ``(m,)`` result as the function's output structure."""
    outs, offset = [], 0
    for shape in split_layout.out_shapes:
        size = math.prod(shape)
        outs.append(s[offset:offset + size].reshape(shape))
        offset += size
    return pytree.tree_unflatten(outs, split_layout.out_spec)


def _col_primal(v: Any) -> Any:
    return v.primal if isinstance(v, (Col, Series)) else v


def _collapsed_engine(split: Split, g0: Any, K: int, n_static: int,
                      compile: bool = False) -> Callable[..., Any]:
    runner = Collapsed(g0, K)
    compiler = Compiler(n_static, compile)
    fixed: list[Any] = []  # the exact method's directions, made before the first trace

    def run(op: _Operator, args: tuple[Any, ...], kwargs: dict[str, Any],
            lifted: tuple[Tensor, ...]) -> Any:
        z, others, targets = split.inputs(args, kwargs, lifted)

        def prepare() -> None:
            # fixed directions are constants of the compiled graph: plain tensors, made once,
            # before its first trace, outside any transform and outside the trace
            if not fixed:
                fixed[:] = op.directions(z.shape[0], z.dtype, z.device)

        def eager(z: Tensor, *others: Tensor) -> list[Tensor]:
            # random directions are drawn on every call, where the caller's transforms apply
            dirs, weights, scale, unit_offset = (
                fixed if op.method == "exact" else op.directions(z.shape[0], z.dtype, z.device))
            first: Any = dirs if unit_offset is None else UnitSeed(unit_offset, dirs.shape[0])
            y, rest = runner(weights, Col(z, [first] + [None] * (K - 2), None), *others)
            if isinstance(y, Col) and y.s is not None:
                s = y.s * scale
            else:
                s = torch.zeros_like(_col_primal(y))
            return [s, *[_col_primal(r) for r in rest]]

        if op.method == "exact":  # fixed directions: compile (see NOTE [Compiled propagation])
            res = compiler.run("exact", prepare, eager, z, list(others))
        else:  # fresh random directions on every call
            res = eager(z, *others)
        write_back(targets, list(res[1:]))
        return _unflatten(res[0], split.layout)

    run.compiler = compiler  # type: ignore[attr-defined]  # what runs it (tests, benchmarks)
    return run


def _jvp_along(g: Callable[[Tensor], Tensor], z: Tensor, dirs: Tensor,
               weights: Tensor | None, scale: float, K: int) -> Tensor:
    """``scale * sum_r w_r D^K g(z)[v_r, ..., v_r] / K!`` by nested ``jvp``, vmapped over the
    directions (one at a time if the function cannot be vmapped)."""

    def along(v: Tensor) -> Tensor:
        t0 = torch.zeros((), dtype=z.dtype, device=z.device)
        _, ds = _jvp_derivatives(lambda t: g(z + t * v), t0, K)
        return ds[-1]  # D^K g[v, ..., v]

    try:
        top = torch.func.vmap(along)(dirs)
    except RuntimeError:  # e.g. data-dependent control flow: one direction at a time
        top = torch.stack([along(v) for v in dirs])
    return contract(top / math.factorial(K), weights) * scale


def _jacrev_along(g: Callable[[Tensor], Tensor], z: Tensor, dirs: Tensor,
                  weights: Tensor | None, scale: float, K: int) -> Tensor:
    """As :func:`_jvp_along`, by ``K`` nested ``jacrev`` contracted with the directions: the
    function itself may hold ``torch.no_grad`` blocks, which forward-mode AD would ignore."""
    D = g
    for _ in range(K):
        D = torch.func.jacrev(D)
    T = D(z)  # (m, n, ..., n)
    T = torch.einsum("...j,rj->...r", T, dirs)
    for _ in range(K - 1):
        T = torch.einsum("...jr,rj->...r", T, dirs)
    return contract(T.movedim(-1, 0) / math.factorial(K), weights) * scale


def _graph_reference(split: Split, K: int) -> Callable[..., Any]:
    flat = split.flat_function()

    def run(op: _Operator, args: tuple[Any, ...], kwargs: dict[str, Any],
            lifted: tuple[Tensor, ...]) -> Any:
        z, others, targets = split.inputs(args, kwargs, lifted)
        dirs, weights, scale, _ = op.directions(z.shape[0], z.dtype, z.device)
        res = _jvp_along(lambda x: flat(x, *others)[0], z, dirs, weights, scale, K)
        if targets:
            write_back(targets, flat(z, *others)[1])
        return _unflatten(res, split.layout)

    return run


def _raw_reference(argnums: tuple[int, ...], int_argnums: bool) -> Callable[..., Any]:
    """Nested ``jacrev`` of the function itself (it could not be captured), contracted with
    the directions (``_jacrev_along``)."""

    def run(op: _Operator, args: tuple[Any, ...], kwargs: dict[str, Any],
            lifted: tuple[Tensor, ...]) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        starts, index = [], 0
        for a in args:
            starts.append(index)
            index += len(pytree.tree_leaves(a))
        pos = [p for a in argnums for p in range(starts[a], starts[a] + len(
            pytree.tree_leaves(args[a])))]
        shapes = [leaves[p].shape for p in pos]
        # (sizes, not -1: a tensor vmapped over zero samples reshapes only to explicit sizes)
        z = torch.cat([leaves[p].reshape(leaves[p].numel()) for p in pos])
        out_info: dict[str, Any] = {}

        def g(x: Tensor) -> Tensor:
            new = list(leaves)
            for p, part, shape in zip(pos, torch.split(x, [math.prod(s) for s in shapes]),
                                      shapes):
                new[p] = part.reshape(shape)
            a, k = pytree.tree_unflatten(new, spec)
            ys, out_info["spec"] = _tensor_leaves(op.name, op.func(*a, **k))
            out_info["shapes"] = [tuple(y.shape) for y in ys]
            return torch.cat([y.reshape(y.numel()) for y in ys])

        dirs, weights, scale, _ = op.directions(z.shape[0], z.dtype, z.device)
        with reference_mode(safe_norms=True):
            res = _jacrev_along(g, z, dirs, weights, scale, op.K)
        outs, offset = [], 0
        for shape in out_info["shapes"]:
            size = math.prod(shape)
            outs.append(res[offset:offset + size].reshape(shape))
            offset += size
        return pytree.tree_unflatten(outs, out_info["spec"])

    return run


@functools.lru_cache(maxsize=64)
def _fixed_directions(K: int, n: int, dtype: torch.dtype, device: torch.device
                      ) -> tuple[Tensor, Tensor | None, float, int | None]:
    """The exact methods' directions: ``e_i`` (Laplacian), ``e_i``, ``e_i +- e_j``
    (biharmonic); plain tensors, made outside any torch.func transform (under a grad level a
    factory's result is wrapped at that level, and the cache outlives it)."""
    if K == 2:
        return outside_transforms(lambda: torch.eye(n, dtype=dtype, device=device)), None, \
            2.0, 0
    return outside_transforms(lambda: _biharmonic_directions(n, dtype, device))


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
                   num_samples: Any, generator: Any, distribution: Any,
                   compile: Any) -> Callable[..., Any]:
    op = _Operator(name, K, func, argnums, method, num_samples, generator, distribution,
                   compile)

    def wrapper(*a: Any, **k: Any) -> Any:
        return op(*a, **k)

    try:
        functools.update_wrapper(wrapper, func)
    except (AttributeError, TypeError):  # pragma: no cover - exotic callables
        pass
    return wrapper


@eager_under_compile
def xlaplacian(func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, *,
               method: str = "exact", num_samples: int | None = None,
               generator: torch.Generator | None = None,
               distribution: str = "rademacher", compile: bool = False) -> Callable[..., Any]:
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

    Functions the engine cannot run are computed by nested torch.func along the same
    directions (``jvp`` on the captured graph, or ``jacrev`` of the function itself contracted
    with them, which keeps its ``no_grad`` blocks constant as the engine does). The result
    composes with ``torch.func.vmap`` (e.g. per-sample Laplacians of collocation points) and
    ``torch.func.grad`` / ``jacrev`` (e.g. PINN losses).

    Args:
        func: A function returning a tensor or a pytree of tensors.
        argnums: The positional argument(s) to differentiate: an int or a tuple of ints.
        method: ``"exact"`` or ``"randomized"``.
        num_samples: Number of random directions (``method="randomized"`` only).
        generator: A ``torch.Generator`` for the random directions.
        distribution: ``"rademacher"`` or ``"gaussian"`` (``method="randomized"``).
        compile: If True, ``method="exact"`` runs its compiled graph as code generated by
            torch.compile's inductor on calls with plain tensors (with its backward code
            in training, see :func:`~xafunc.xderiv`); ``"randomized"`` draws new directions
            every call and is never compiled.

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
                          distribution, compile)


@eager_under_compile
def xbiharmonic(func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, *,
                method: str = "exact", num_samples: int | None = None,
                generator: torch.Generator | None = None,
                distribution: str = "gaussian", compile: bool = False) -> Callable[..., Any]:
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
        compile: If True, ``method="exact"`` runs its compiled graph as code generated by
            torch.compile's inductor on calls with plain tensors (with its backward code
            in training, see :func:`~xafunc.xderiv`); ``"randomized"`` draws new directions
            every call and is never compiled.

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
                          distribution, compile)


for _f in (jet, xlaplacian, xbiharmonic):
    _f.__module__ = "xafunc"
