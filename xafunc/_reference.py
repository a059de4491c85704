"""The reference strategy: nested ``torch.func.jacfwd`` / ``jacrev``.

This is what users write by hand today. xafunc keeps it inside the package for two reasons:
it is the fallback whenever the engine cannot run a function (data-dependent control flow, an
operator without a rule, a custom ``autograd.Function``), and ``mode="reference"`` lets users
compare.

NOTE [A reference that is right]
torch's own nested derivatives are wrong in places (torch 2.13: nested ``jacrev`` of
``native_layer_norm`` and ``native_batch_norm(training=True)`` -- so ``instance_norm``, a
batch norm underneath -- from order 3, nested
``jvp``/``jacfwd`` of ``layer_norm`` from order 2): their composite backward formulas do not
carry higher-order terms. So the reference differentiates the *captured* graph whenever there
is one -- decomposed into core operators, whose derivatives are right -- and only otherwise the
user's function itself, with the normalisation functions replaced by their formulas
(:class:`SafeNorms`, from order 3: nested ``jacrev`` of the norms is right to order 2, and the
mode costs a Python call per operator). It nests reverse levels only, except a first-order
Jacobian of a wider output (forward mode), and falls back to pure reverse nesting if a forward
level raises (e.g. ``torch.cdist`` has no forward-mode formula), so it is never slower than
plain nested ``jacrev`` and never fails where that works. TorchScript functions and modules
run under the reference with their executors flushed and unoptimized (:func:`reference_mode`,
NOTE [TorchScript]): torch 2.13's optimized executor, once it has profiled calls requiring
grad, returns second derivatives of zero.

``levels`` lists the first-order transform used at each nesting level, innermost first:
``("rev", "fwd")`` is ``jacfwd(jacrev(f))``. Every nesting returns the same pytree: for ``k``
levels the output structure, then for each leaf the ``argnums`` structure of the innermost
derivative, ..., then that of the outermost; leaf shapes are
``out.shape + in_1.shape + ... + in_k.shape``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.func
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

Level = str  # "fwd" or "rev"


def _first_order(
    level: Level, g: Callable[..., Any], argnums: int | tuple[int, ...], chunk_size: int | None
) -> Callable[..., Any]:
    if level == "rev":
        return torch.func.jacrev(g, argnums, has_aux=True, chunk_size=chunk_size)
    if level == "fwd":
        return torch.func.jacfwd(g, argnums, has_aux=True)
    raise ValueError(f"unknown nesting level {level!r}; expected 'fwd' or 'rev'")


def nested_derivative(
    func: Callable[..., Any],
    levels: Sequence[Level],
    argnums: int | tuple[int, ...],
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
    all_orders: bool = False,
) -> Callable[..., Any]:
    """Return ``args -> derivative`` computed by nesting first-order torch.func transforms.

    With ``all_orders=True`` the function returns ``(f(x), D^1 f(x), ..., D^k f(x))`` from one
    nested evaluation: each level passes its own result outward as auxiliary output.
    With ``has_aux=True`` the result is ``(derivative, aux)``.
    """
    if not has_aux and not all_orders:  # the plain nesting: no auxiliary outputs to carry
        f = func
        for level in levels:
            f = (torch.func.jacrev(f, argnums, chunk_size=chunk_size) if level == "rev" else
                 torch.func.jacfwd(f, argnums) if level == "fwd" else
                 _first_order(level, f, argnums, chunk_size))
        return f

    def level0(*args: Any, **kwargs: Any) -> Any:
        out = func(*args, **kwargs)
        y, aux = out if has_aux else (out, ())  # jacfwd accepts only tensors in aux
        return y, (aux, (y,) if all_orders else ())

    g: Callable[..., Any] = level0
    for level in levels:
        jac = _first_order(level, g, argnums, chunk_size)

        def g(*args: Any, _jac: Callable[..., Any] = jac, **kwargs: Any) -> Any:
            d, (aux, lower) = _jac(*args, **kwargs)
            return d, (aux, lower + (d,) if all_orders else ())

    def derivative(*args: Any, **kwargs: Any) -> Any:
        d, (aux, lower) = g(*args, **kwargs)
        result = lower if all_orders else d
        return (result, aux) if has_aux else result

    return derivative


def choose_levels(order: int, mode: str, out_numel: int | None, in_numel: int
                  ) -> tuple[Level, ...]:
    """The nesting the reference uses (see NOTE [A reference that is right])."""
    if order == 1 and mode != "reverse" and (
            mode == "forward" or (out_numel is not None and out_numel > in_numel)):
        return ("fwd",)
    return ("rev",) * order


def run_nested(make: Callable[[tuple[Level, ...]], Callable[..., Any]],
               levels: tuple[Level, ...], args: tuple[Any, ...]) -> tuple[Any, tuple[Level, ...]]:
    """``make(levels)(*args)``; if a forward level raises (an operator without a forward-mode
    formula), pure reverse nesting instead. Returns the result and the nesting that ran."""
    try:
        return make(levels)(*args), levels
    except (RuntimeError, NotImplementedError):
        if "fwd" not in levels:
            raise
        rev = ("rev",) * len(levels)
        return make(rev)(*args), rev


# -------------------------------------------------------------------- normalisation formulas
def _layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dims, keepdim=True)
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def _batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None = None, bias: Tensor | None = None,
                training: bool = False, momentum: float | None = 0.1,
                eps: float = 1e-5) -> Tensor:
    shape = [1, -1] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    if training or running_mean is None or running_var is None:
        mean = x.mean(dims)
        xc = x - mean.reshape(shape)
        var = (xc * xc).mean(dims)
        if training and running_mean is not None and running_var is not None:
            count = x.numel() // x.shape[1]
            m = 0.1 if momentum is None else momentum
            with torch.no_grad():
                running_mean.mul_(1 - m).add_(mean.detach() * m)
                running_var.mul_(1 - m).add_(var.detach() * (m * count / max(count - 1, 1)))
    else:
        mean, var = running_mean, running_var
        xc = x - mean.reshape(shape)
    y = xc * torch.rsqrt(var + eps).reshape(shape)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y + bias.reshape(shape) if bias is not None else y


def _instance_norm(x: Tensor, running_mean: Tensor | None = None,
                   running_var: Tensor | None = None, weight: Tensor | None = None,
                   bias: Tensor | None = None, use_input_stats: bool = True,
                   momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    n, c = x.shape[0], x.shape[1]
    shape = [1, c] + [1] * (x.dim() - 2)
    if use_input_stats:  # a batch norm of one sample with a channel per (sample, channel)
        y = _batch_norm(x.reshape(1, n * c, *x.shape[2:]), None, None, training=True,
                        eps=eps).reshape(x.shape)
        if running_mean is not None and running_var is not None:
            # as torch updates them (in C++, below torch.func's levels): the mean over the
            # samples of each one's update, from the values of ``x``
            from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

            fx = torch._C._functorch
            v = x
            while fx.is_gradtrackingtensor(v):
                v = fx.get_unwrapped(v)
            with temporarily_clear_interpreter_stack(), torch.no_grad():
                per = v.detach().reshape(n, c, -1)
                running_mean.mul_(1 - momentum).add_(per.mean(-1).mean(0) * momentum)
                running_var.mul_(1 - momentum).add_(per.var(-1).mean(0) * momentum)
    else:
        assert running_mean is not None and running_var is not None
        y = (x - running_mean.reshape(shape)) * torch.rsqrt(running_var + eps).reshape(shape)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y + bias.reshape(shape) if bias is not None else y


def _group_norm(x: Tensor, num_groups: int, weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    n, c = x.shape[0], x.shape[1]
    g = x.reshape(n, num_groups, -1)
    mean = g.mean(-1, keepdim=True)
    gc = g - mean
    var = (gc * gc).mean(-1, keepdim=True)
    y = (gc * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = [1, c] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y + bias.reshape(shape) if bias is not None else y


class NoGradCuts(TorchFunctionMode):
    """NOTE [No-grad blocks under forward mode]
    ``torch.no_grad()`` does not apply to forward-mode AD (torch documents it): nested
    ``jvp`` differentiates through a ``no_grad`` block that nested ``jacrev`` treats as a
    constant, so ``jacfwd`` and ``jacrev`` of such a function disagree. xafunc's contract is
    ``jacrev``'s -- the capture detaches what runs with grad mode off, at every order -- and a
    reference that differentiates the user's function by forward mode (``jet``'s) runs it under
    this mode: every torch call made with grad mode off returns its tensors detached, which
    under ``jvp`` have no tangent."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            return out
        # a tensor the call returns as it was given (``add_``, ``requires_grad_``) stays itself
        given = {id(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        return pytree.tree_map_only(Tensor, lambda t: t if id(t) in given else t.detach(), out)


@contextlib.contextmanager
def reference_mode(safe_norms: bool) -> Iterator[None]:
    """How the reference runs the user's function (NOTE [A reference that is right]):
    TorchScript unoptimized (NOTE [TorchScript]), and with ``safe_norms`` the norms as their
    formulas."""
    from ._capture.guards import flush_torchscript

    with torch.jit.optimized_execution(False):
        flush_torchscript()
        try:
            if safe_norms:
                with SafeNorms():
                    yield
            else:
                yield
        finally:
            flush_torchscript()


class SafeNorms(TorchFunctionMode):
    """Run ``layer_norm``/``batch_norm``/``instance_norm``/``group_norm`` as their formulas,
    whose nested derivatives torch gets right (see NOTE [A reference that is right])."""

    _FORMULAS: dict[Any, Callable[..., Tensor]] = {
        F.layer_norm: _layer_norm, torch.layer_norm: _layer_norm,
        F.batch_norm: _batch_norm, F.group_norm: _group_norm, torch.group_norm: _group_norm,
        F.instance_norm: _instance_norm,
    }

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        formula = self._FORMULAS.get(func)
        if formula is not None:
            return formula(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
