"""Argument checks shared by every transform.

What can be checked when a transform is built (``func``, ``order``, ``argnums``, ``mode``,
``chunk_size``) is checked there; what depends on the arguments (argnums in range, tensor
dtypes, output types) is checked at call time. Every error names the transform, the argument,
the bad value and the remedy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from ._typing import MODES


def check_callable(name: str, func: Any) -> None:
    if not callable(func):
        raise TypeError(
            f"{name}: func must be callable, got {func!r} of type {type(func).__name__}. "
            f"Pass the function to differentiate, e.g. {name}(lambda x: x.sin())."
        )


def check_order(name: str, order: Any) -> int:
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(
            f"{name}: order must be a positive int, got {order!r} of type "
            f"{type(order).__name__}. Pass e.g. order=2 for second derivatives."
        )
    if order < 1:
        raise ValueError(
            f"{name}: order must be a positive int, got {order}. "
            "Pass order >= 1 (order=1 is the Jacobian)."
        )
    return order


def check_argnums(name: str, argnums: Any) -> int | tuple[int, ...]:
    if isinstance(argnums, bool) or not isinstance(argnums, (int, tuple)):
        raise TypeError(
            f"{name}: argnums must be an int or a tuple of ints, got {argnums!r} of type "
            f"{type(argnums).__name__}. Pass e.g. argnums=0 or argnums=(0, 1)."
        )
    if isinstance(argnums, tuple):
        if len(argnums) == 0:
            raise ValueError(
                f"{name}: argnums must not be an empty tuple. Pass at least one position, "
                "e.g. argnums=(0,)."
            )
        for a in argnums:
            if isinstance(a, bool) or not isinstance(a, int):
                raise TypeError(
                    f"{name}: argnums must contain only ints, got {a!r} of type "
                    f"{type(a).__name__} in {argnums!r}."
                )
    return argnums


def check_mode(name: str, mode: Any) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(
            f"{name}: mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}."
        )
    return mode


def check_chunk_size(name: str, chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"{name}: chunk_size must be None or a positive int, got {chunk_size!r} of type "
            f"{type(chunk_size).__name__}."
        )
    if chunk_size < 1:
        raise ValueError(
            f"{name}: chunk_size must be None or a positive int, got {chunk_size}. "
            "Pass chunk_size=None to process all directions at once, or a value >= 1."
        )
    return chunk_size


def check_bool(name: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: {arg} must be a bool, got {value!r} of type "
                        f"{type(value).__name__}. Pass {arg}=True or {arg}=False.")
    return value


def normalize_argnums(name: str, argnums: int | tuple[int, ...], nargs: int) -> tuple[int, ...]:
    """Resolve (possibly negative) argnums against the number of positional arguments."""
    items = argnums if isinstance(argnums, tuple) else (argnums,)
    out = []
    for a in items:
        if not nargs:
            raise ValueError(
                f"{name}: argnums={argnums!r} selects a positional argument, but the call passed "
                "none. Pass the inputs to differentiate positionally, e.g. "
                f"{name}(f)(x) rather than {name}(f)(x=x)."
            )
        if not -nargs <= a < nargs:
            raise ValueError(
                f"{name}: argnums={argnums!r} is out of range for a call with {nargs} positional "
                f"argument(s). Use argnums in [-{nargs}, {nargs - 1}]."
            )
        out.append(a % nargs)
    if len(set(out)) != len(out):
        raise ValueError(
            f"{name}: argnums={argnums!r} has duplicate positions. Each argument may be "
            "differentiated once; remove the duplicates."
        )
    return tuple(out)


def check_diff_args(name: str, args: tuple[Any, ...], argnums: tuple[int, ...]) -> None:
    """Differentiated arguments must be pytrees of real floating-point tensors."""
    for a in argnums:
        leaves = pytree.tree_leaves(args[a])
        if not leaves:
            raise ValueError(
                f"{name}: argument {a} (differentiated, argnums includes {a}) holds no tensors. "
                "Pass a tensor or a pytree of tensors there, or change argnums."
            )
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"{name}: argument {a} is differentiated but holds a {type(leaf).__name__} "
                    f"({leaf!r}); only tensors can be differentiated. Wrap it with "
                    "torch.tensor(...) or exclude it from argnums."
                )
            if leaf.layout is not torch.strided:
                raise TypeError(
                    f"{name}: argument {a} is differentiated but is a {leaf.layout} tensor; "
                    "derivatives are taken with respect to dense tensors, as in torch.func. "
                    "Pass x.to_dense() there (a sparse tensor the function only reads can stay "
                    "sparse outside argnums)."
                )
            if not leaf.dtype.is_floating_point:
                raise TypeError(
                    f"{name}: argument {a} is differentiated but has dtype {leaf.dtype}; "
                    "derivatives need a real floating-point dtype. Cast it with .double() or "
                    ".float(), or exclude it from argnums."
                )
