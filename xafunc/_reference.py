"""The reference strategy: nested ``torch.func.jacfwd`` / ``jacrev``.

This is what users write by hand today. xafunc keeps it inside the package for two reasons:
it is the fallback whenever the engine cannot capture a function (data-dependent control
flow, an operator without a rule, closures over transformed tensors), and it is the oracle the
test-suite compares the engine against.

``levels`` lists the first-order transform used at each nesting level, innermost first:
``("rev", "fwd", "fwd")`` is ``jacfwd(jacfwd(jacrev(f)))``. Every nesting returns the same
pytree: for ``k`` levels the output structure, then for each leaf the ``argnums`` structure of
the innermost derivative, ..., then that of the outermost; leaf shapes are
``out.shape + in_1.shape + ... + in_k.shape``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.func

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


def choose_levels(order: int, mode: str, out_numel: int, in_numel: int,
                  mixed_dtypes: bool = False) -> tuple[Level, ...]:
    """The nesting the fallback uses: correct first, then as fast as the shapes allow.

    NOTE [Safe nestings]
    In torch 2.13 a ``jacfwd`` level *below* another level (``jacfwd(jacfwd(f))``,
    ``jacrev(jacfwd(f))``) gets ``native_layer_norm`` and ``native_batch_norm(training=True)``
    wrong (their saved mean/rstd carry no second-level tangent), and ``jacfwd`` levels give
    results the output's dtype where ``jacrev`` gives each input's. So for ``order >= 2`` the
    fallback nests reverse levels and allows forward mode only outermost
    (``jacfwd(jacrev(...jacrev(f)))``, fwd-over-rev as ``torch.func.hessian``), and uses pure
    reverse nesting when the differentiated inputs have different dtypes. For ``order == 1``
    ``forward``/``reverse`` force the mode and ``auto`` picks reverse when the output is no
    larger than the input.
    """
    if mode == "reverse" or mixed_dtypes:
        return ("rev",) * order
    if order == 1:
        if mode == "forward":
            return ("fwd",)
        return ("rev",) if out_numel <= in_numel else ("fwd",)
    return ("rev",) * (order - 1) + ("fwd",)
