"""The public transforms: ``xderiv``, ``xjacobian``, ``xhessian``, ``xderivs`` and ``plan``.

Each transform validates ``func``, ``order``, ``argnums``, ``mode`` and ``chunk_size`` when it
is built and returns a function. At call time it looks the function up in the process-wide
capture cache (NOTE [The capture cache]): a call whose signature matches and whose guards hold
reuses the capture and the plan built for this request on it, so transforms written inline in
a loop cost what a held transform costs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from . import _validate as V
from ._capture.cache import CACHE, eager_under_compile, outside_compiler
from ._capture.request import Request
from ._plan import Plan, build_plan, empty_batch_plan, empty_vmap_batch
from ._typing import Argnums, Func, Mode


class _Transform:
    """The callable every transform returns: a function and a :class:`Request`. It wraps
    ``func`` as ``functools.wraps`` would (``__wrapped__``, ``__name__``, ``__doc__``, ...,
    read from ``func`` when asked), without copying them on every call of the transform."""

    __slots__ = ("func", "request", "name")

    def __init__(self, func: Func, request: Request) -> None:
        self.func = func
        self.request = request
        self.name = request.transform  # the public name errors are reported under

    @property
    def __wrapped__(self) -> Func:
        return self.func

    @property
    def __name__(self) -> str:  # type: ignore[override]
        # (``vmap`` reads it three times a call; an ``nn.Module`` has none, and looking it up
        # on one raises and catches an AttributeError in ``Module.__getattr__``, 2 us)
        func = self.func
        own = vars(func).get("__name__") if isinstance(func, torch.nn.Module) else \
            getattr(func, "__name__", None)
        return own if isinstance(own, str) else type(func).__name__

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return getattr(self.func, "__doc__", None)

    @property
    def __module__(self) -> str | None:  # type: ignore[override]
        return getattr(self.func, "__module__", None)

    def __repr__(self) -> str:
        return f"<xafunc.{self.name} of {self.func!r}>"

    def plan_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Plan, Any]:
        differentiated = tuple(sorted(V.normalize_argnums(self.name, self.request.argnums,
                                                          len(args))))
        entry, lifted = CACHE.lookup(self.func, args, kwargs, differentiated)
        plan = entry.plans.get(self.request)
        if plan is None:
            plan = build_plan(self.request, entry, args, kwargs, lifted, self.name)
            entry.plans[self.request] = plan
        return plan, lifted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return outside_compiler(self.run, *args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if empty_vmap_batch(args, kwargs):
            return empty_batch_plan(self.request, args, self.name).run(self.func, args, kwargs,
                                                                       ())
        plan, lifted = self.plan_for(args, kwargs)
        return plan.run(self.func, args, kwargs, lifted)


def _make(
    name: str,
    func: Func,
    order: Any,
    argnums: Any,
    has_aux: Any,
    mode: Any,
    chunk_size: Any,
    compile: Any = False,
    all_orders: bool = False,
) -> _Transform:
    V.check_callable(name, func)
    # transforms are built inline, every call: validate each distinct set of parameters once
    # (by repr: True and 1 must not share an entry)
    key = (name, repr(order), repr(argnums), repr(has_aux), repr(mode), repr(chunk_size),
           repr(compile), all_orders)
    request = _REQUESTS.get(key)
    if request is None:
        request = Request(name, V.check_order(name, order), V.check_argnums(name, argnums),
                          V.check_bool(name, "has_aux", has_aux), V.check_mode(name, mode),
                          V.check_chunk_size(name, chunk_size), all_orders,
                          compile=V.check_bool(name, "compile", compile))
        if len(_REQUESTS) < 4096:
            _REQUESTS[key] = request
    return _Transform(func, request)


_REQUESTS: dict[Any, Request] = {}


def _wrap(func: Func, call: Callable[..., Any]) -> Callable[..., Any]:
    try:
        return functools.wraps(func)(call)
    except (AttributeError, TypeError):  # pragma: no cover - exotic callables
        return call


@eager_under_compile
def xderiv(
    func: Func,
    order: int,
    argnums: Argnums = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: int | None = None,
    compile: bool = False,
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
        compile: If True, calls with plain tensors that need no autograd history (no
            gradient recording, no torch.func transform around the call except a ``vmap``
            directly around it) run the engine's compiled graph as code generated by
            torch.compile's inductor instead of TorchScript. The first such call compiles,
            which takes seconds; it pays when the transform is called many times with the
            same shapes. In training -- calls with plain tensors recorded by autograd, or
            under ``torch.func.grad`` -- inductor's forward and backward code runs the graph
            too (a double backward of a recorded call differentiates the graph recorded op by
            op instead). Other calls, and the reference strategy, run as without it; if
            inductor cannot compile, TorchScript runs the graph. The plan's ``execution``
            line says which executor ran and how long compiling took.

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
    t = _make("xderiv", func, order, argnums, has_aux, mode, chunk_size, compile)
    return t


@eager_under_compile
def xjacobian(
    func: Func,
    argnums: Argnums = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: int | None = None,
    compile: bool = False,
) -> Callable[..., Any]:
    """The Jacobian of ``func``: ``xderiv(func, 1, ...)``, like ``torch.func.jacrev``.

    The arguments are :func:`xderiv`'s, ``compile`` included.

    Example:
        >>> import torch
        >>> from xafunc import xjacobian
        >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> xjacobian(lambda x: A @ x)(torch.ones(2))
        tensor([[1., 2.],
                [3., 4.]])
    """
    t = _make("xjacobian", func, 1, argnums, has_aux, mode, chunk_size, compile)
    return t


@eager_under_compile
def xhessian(
    func: Func,
    argnums: Argnums = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: int | None = None,
    compile: bool = False,
) -> Callable[..., Any]:
    """The Hessian of ``func``: ``xderiv(func, 2, ...)``, like ``torch.func.hessian``.

    The arguments are :func:`xderiv`'s, ``compile`` included.

    Example:
        >>> import torch
        >>> from xafunc import xhessian
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> xhessian(lambda x: x[0] ** 2 * x[1])(x)
        tensor([[4., 2.],
                [2., 0.]], dtype=torch.float64)
    """
    t = _make("xhessian", func, 2, argnums, has_aux, mode, chunk_size, compile)
    return t


@eager_under_compile
def xderivs(
    func: Func,
    order: int,
    argnums: Argnums = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: int | None = None,
    compile: bool = False,
) -> Callable[..., Any]:
    """Every derivative up to ``order`` from one call: ``(f(x), D^1 f(x), ..., D^order f(x))``.

    Entry ``k`` of the returned tuple is exactly what ``xderiv(func, k, argnums)`` returns (entry
    0 is the output of ``func`` itself), but the work is shared: one capture, one plan, one
    propagation. With ``has_aux=True`` the result is ``(derivatives, aux)``. The arguments are
    :func:`xderiv`'s; with ``compile=True`` each order's graph is compiled by inductor.

    Example:
        >>> import torch
        >>> from xafunc import xderivs
        >>> x = torch.tensor(0.0, dtype=torch.float64)
        >>> [round(d.item(), 10) + 0.0 for d in xderivs(torch.sin, 4)(x)]
        [0.0, 1.0, 0.0, -1.0, 0.0]
    """
    t = _make("xderivs", func, order, argnums, has_aux, mode, chunk_size, compile,
              all_orders=True)
    return t


@eager_under_compile
def plan(
    func: Func,
    order: int,
    argnums: Argnums = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    chunk_size: int | None = None,
    compile: bool = False,
) -> Callable[..., Plan]:
    """Return ``args -> Plan``: how ``xderiv(func, order, ...)`` would compute for these args.

    The plan is printable: the strategy, the schedule of forward/reverse levels, estimated
    FLOPs and memory, the reason for any fallback to nested torch.func, and what executes the
    compiled graph. Nothing is differentiated; at most ``func`` is traced once. The arguments
    are :func:`xderiv`'s: ``compile=True`` returns the plan ``xderiv(..., compile=True)`` runs,
    whose ``execution`` reads ``"inductor (compile=True), compiled in 1.23 s"`` once it has
    run.

    Example:
        >>> import torch
        >>> import xafunc
        >>> p = xafunc.plan(lambda x: x.tanh().sum(), order=2)(torch.ones(3))
        >>> p.order
        2
    """
    # validated as ``plan``, planned as the ``xderiv`` request it describes, so the plan is
    # the one ``xderiv`` runs (with what its first call measured)
    t = _make("plan", func, order, argnums, has_aux, mode, chunk_size, compile)
    t.request = dataclasses.replace(t.request, transform="xderiv")

    def planner(*args: Any, **kwargs: Any) -> Plan:
        # through the call boundary, as the call itself: the capture it plans on is the call's
        return outside_compiler(t.plan_for, args, kwargs)[0]

    return _wrap(func, planner)


for _f in (xderiv, xjacobian, xhessian, xderivs, plan):
    _f.__module__ = "xafunc"
