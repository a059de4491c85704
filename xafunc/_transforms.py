"""The public transforms: ``xderiv``, ``xjacobian``, ``xhessian``, ``xderivs`` and ``plan``.

Each transform validates ``func``, ``order``, ``argnums``, ``mode`` and ``chunk_size`` when it
is built and returns a function. At call time it checks the arguments, looks up (or builds) a
plan for this call signature -- shapes, dtypes, devices, the non-tensor arguments, argnums and
order -- and runs it. Plans are cached on the returned function, so a second call with the same
signature neither re-traces nor re-plans.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from . import _validate as V
from ._capture.trace import signature_key
from ._plan import Plan, build_plan
from ._typing import Argnums, Func, Mode


class _Transform:
    """The callable returned by every transform; holds the per-signature plan cache."""

    def __init__(
        self,
        name: str,
        func: Func,
        order: int,
        argnums: Argnums,
        has_aux: bool,
        mode: str,
        chunk_size: int | None,
        all_orders: bool,
    ) -> None:
        self.name = name
        self.func = func
        self.order = order
        self.argnums = argnums
        self.has_aux = has_aux
        self.mode = mode
        self.chunk_size = chunk_size
        self.all_orders = all_orders
        self._plans: dict[Any, Plan] = {}

    def plan_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
        key = signature_key(args, kwargs, self.func)
        plan = self._plans.get(key) if key is not None else None
        if plan is None:
            # a cached plan was built for arguments of this very signature, which passed these
            # checks then: only a new signature needs them
            argnums = V.normalize_argnums(self.name, self.argnums, len(args))
            V.check_diff_args(self.name, args, argnums)
            plan = build_plan(self, args, kwargs, argnums)
            if key is not None and plan.cacheable:
                self._plans[key] = plan
        return plan

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.plan_for(args, kwargs).run(args, kwargs)


def _make(
    name: str,
    func: Func,
    order: Any,
    argnums: Any,
    has_aux: Any,
    mode: Any,
    chunk_size: Any,
    all_orders: bool = False,
) -> Callable[..., Any]:
    V.check_callable(name, func)
    order = V.check_order(name, order)
    argnums = V.check_argnums(name, argnums)
    has_aux = V.check_bool(name, "has_aux", has_aux)
    mode = V.check_mode(name, mode)
    chunk_size = V.check_chunk_size(name, chunk_size)
    transform = _Transform(name, func, order, argnums, has_aux, mode, chunk_size, all_orders)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return transform(*args, **kwargs)

    wrapper._xafunc_transform = transform  # type: ignore[attr-defined]
    return wrapper


def xderiv(
    func: Func,
    order: int,
    argnums: Argnums = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """The ``order``-th derivative of ``func`` with respect to the arguments at ``argnums``.

    ``xderiv(f, k)(*args)`` returns what ``k`` nested ``torch.func.jacrev`` (or ``jacfwd``)
    calls with the same ``argnums`` return: the same pytree structure, leaf shapes
    ``out.shape + in.shape * k``, dtype and device, up to floating-point rounding.

    Args:
        func: A function of tensors (or pytrees of tensors) returning a tensor or a pytree of
            tensors (``(output, aux)`` when ``has_aux=True``).
        order: The derivative order, a positive int.
        argnums: Which positional argument(s) to differentiate: an int or a tuple of ints.
        has_aux: If True, ``func`` returns ``(output, aux)`` and the transform returns
            ``(derivative, aux)``; ``aux`` is not differentiated.
        mode: ``"auto"`` (the planner chooses), ``"forward"`` (pure forward/Taylor mode),
            ``"reverse"`` (pure reverse mode) or ``"reference"`` (nested torch.func, the
            strategy xafunc falls back on). Every mode returns the same numbers.
        chunk_size: If given, at most this many derivative directions are processed at once,
            bounding peak memory at the price of speed.

    Returns:
        A function taking the same arguments as ``func`` and returning the derivative.

    Example:
        >>> import torch
        >>> from xafunc import xderiv
        >>> x = torch.tensor([0.5, 2.0], dtype=torch.float64)
        >>> d3 = xderiv(lambda x: x.pow(3).sum(), order=3)(x)
        >>> d3.shape
        torch.Size([2, 2, 2])
        >>> [round(d3[i, j, k].item(), 10) for i, j, k in [(0, 0, 0), (1, 1, 1), (0, 1, 1)]]
        [6.0, 6.0, 0.0]
    """
    return _make("xderiv", func, order, argnums, has_aux, mode, chunk_size)


def xjacobian(
    func: Func,
    argnums: Argnums = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """The Jacobian of ``func``: ``xderiv(func, 1, ...)``, like ``torch.func.jacrev``.

    Example:
        >>> import torch
        >>> from xafunc import xjacobian
        >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> xjacobian(lambda x: A @ x)(torch.ones(2))
        tensor([[1., 2.],
                [3., 4.]])
    """
    return _make("xjacobian", func, 1, argnums, has_aux, mode, chunk_size)


def xhessian(
    func: Func,
    argnums: Argnums = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """The Hessian of ``func``: ``xderiv(func, 2, ...)``, like ``torch.func.hessian``.

    Example:
        >>> import torch
        >>> from xafunc import xhessian
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> xhessian(lambda x: x[0] ** 2 * x[1])(x)
        tensor([[4., 2.],
                [2., 0.]], dtype=torch.float64)
    """
    return _make("xhessian", func, 2, argnums, has_aux, mode, chunk_size)


def xderivs(
    func: Func,
    order: int,
    argnums: Argnums = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """Every derivative up to ``order`` from one call: ``(f(x), D^1 f(x), ..., D^order f(x))``.

    Entry ``k`` of the returned tuple is exactly what ``xderiv(func, k, argnums)`` returns (entry
    0 is the output of ``func`` itself), but the work is shared: one capture, one plan, one
    propagation. With ``has_aux=True`` the result is ``(derivatives, aux)``.

    Example:
        >>> import torch
        >>> from xafunc import xderivs
        >>> x = torch.tensor(0.0, dtype=torch.float64)
        >>> [round(d.item(), 10) + 0.0 for d in xderivs(torch.sin, 4)(x)]
        [0.0, 1.0, 0.0, -1.0, 0.0]
    """
    return _make("xderivs", func, order, argnums, has_aux, mode, chunk_size, all_orders=True)


def plan(
    func: Func,
    order: int,
    argnums: Argnums = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: int | None = None,
) -> Callable[..., Plan]:
    """Return ``args -> Plan``: how ``xderiv(func, order, ...)`` would compute for these args.

    The plan is printable: the strategy, the schedule of forward/reverse levels, estimated
    FLOPs and memory, and the reason for any fallback to nested torch.func. Nothing is
    differentiated; at most ``func`` is traced once.

    Example:
        >>> import torch
        >>> import xafunc
        >>> p = xafunc.plan(lambda x: x.tanh().sum(), order=2)(torch.ones(3))
        >>> p.order
        2
    """
    transform = _make("plan", func, order, argnums, has_aux, mode, chunk_size)
    t: _Transform = transform._xafunc_transform  # type: ignore[attr-defined]

    @functools.wraps(func)
    def planner(*args: Any, **kwargs: Any) -> Plan:
        return t.plan_for(args, kwargs)

    return planner


for _f in (xderiv, xjacobian, xhessian, xderivs, plan):
    _f.__module__ = "xafunc"
