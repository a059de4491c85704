"""The test-suite's one comparison helper and its independent oracle.

Every numeric test compares through :func:`assert_tree_close`; every expected derivative comes
from :func:`reference_deriv`, which nests ``torch.func.jacrev`` directly. Nothing here imports
from ``xafunc``: the oracle must stay independent of the code under test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.func
from torch.utils import _pytree as pytree

__all__ = ["assert_tree_close", "reference_deriv", "reference_derivs", "clone_tree",
           "assert_tree_equal"]

_WORST = 8  # how many differing entries a failure message lists


def _path_str(path: tuple[Any, ...]) -> str:
    return "".join(str(k) for k in path) or "<root>"


def _leaf_close(a: torch.Tensor, e: torch.Tensor, rtol: float, atol: float, where: str) -> None:
    if type(a) is not type(e):  # e.g. a FakeTensor leaking out of a tracer
        raise AssertionError(f"{where}: tensor type mismatch: actual {type(a).__name__}, "
                             f"expected {type(e).__name__}")
    if a.shape != e.shape:
        raise AssertionError(f"{where}: shape mismatch: actual {tuple(a.shape)}, expected "
                             f"{tuple(e.shape)}")
    if a.dtype != e.dtype:
        raise AssertionError(f"{where}: dtype mismatch: actual {a.dtype}, expected {e.dtype}")
    if a.device != e.device:
        raise AssertionError(f"{where}: device mismatch: actual {a.device}, expected {e.device}")
    if a.layout != e.layout:
        raise AssertionError(f"{where}: layout mismatch: actual {a.layout}, expected {e.layout}")
    if a.numel() == 0:
        return
    if not (a.dtype.is_floating_point or a.dtype.is_complex):
        if not torch.equal(a, e):
            bad = (a != e).nonzero()[:_WORST].tolist()
            raise AssertionError(f"{where}: values differ (exact dtype {a.dtype}) at {bad}")
        return
    ad = a.detach().to("cpu", torch.float64 if not a.dtype.is_complex else torch.complex128)
    ed = e.detach().to("cpu", ad.dtype)
    diff = (ad - ed).abs()
    allowed = atol + rtol * ed.abs()
    # NaN only matches NaN, +inf only +inf (the excess of matching non-finite entries is 0).
    a_nan, e_nan = ad.isnan(), ed.isnan()
    same_inf = ad.isinf() & ed.isinf() & (ad == ed)
    excess = (diff - allowed).masked_fill(same_inf | (a_nan & e_nan), float("-inf"))
    excess = excess.masked_fill(a_nan ^ e_nan, float("inf")).nan_to_num(nan=float("inf"))
    if ad.is_complex():
        excess = excess.real
    bad = excess > 0
    if not bool(bad.any()):
        return
    n_bad = int(bad.sum())
    flat = excess.reshape(-1)
    k = min(_WORST, n_bad)
    worst = torch.topk(flat, k).indices.tolist()
    lines = [
        f"{where}: {n_bad} of {a.numel()} entries differ beyond atol={atol:g} + "
        f"rtol={rtol:g} * |expected| (shape {tuple(a.shape)}, dtype {a.dtype}); worst {k}:"
    ]
    for i in worst:
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() \
            else ()
        av, ev = ad.reshape(-1)[i].item(), ed.reshape(-1)[i].item()
        lines.append(f"    index {idx}: actual {av!r}, expected {ev!r}, "
                     f"|diff| {abs(av - ev):.3e}")
    worst_diff = diff.nan_to_num(nan=float("inf")).max().item()
    lines.append(f"  max |diff| over the leaf: {worst_diff:.3e}")
    raise AssertionError("\n".join(lines))


def assert_tree_close(actual: Any, expected: Any, *, rtol: float = 1e-7, atol: float = 1e-9,
                      msg: str = "") -> None:
    """Assert that two pytrees of tensors agree in structure, shapes, dtypes, devices and values.

    Checks, in order: the pytree structure (container types, tuple lengths, dict keys *and their
    order*), then for every leaf the type (``torch.Tensor`` vs a subclass such as a leaked
    ``FakeTensor``), shape, dtype, device and layout, and finally the
    values: ``|actual - expected| <= atol + rtol * |expected|`` elementwise, NaN only matching
    NaN and infinities only matching the same infinity. Non-tensor leaves must be equal.

    The defaults ``rtol=1e-7, atol=1e-9`` are the float64 tolerances of the suite: every
    derivative test runs in float64, where two correct ways of computing a third derivative
    agree to ~1e-13 relative, so the margin catches any real error while ignoring rounding.
    For float32 pass looser tolerances explicitly (e.g. ``rtol=1e-4, atol=1e-5``).

    On failure the message names the leaf's path and lists the worst differing entries with
    their indices, the actual and expected values and the absolute difference.
    """
    prefix = f"{msg}: " if msg else ""
    a_leaves, a_spec = pytree.tree_flatten_with_path(actual)
    e_leaves, e_spec = pytree.tree_flatten_with_path(expected)
    if a_spec != e_spec:
        raise AssertionError(f"{prefix}pytree structure mismatch:\n  actual:   {a_spec}\n"
                             f"  expected: {e_spec}")
    for (path, a), (_, e) in zip(a_leaves, e_leaves):
        where = prefix + "leaf " + _path_str(path)
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor):
                raise AssertionError(f"{where}: expected a Tensor, got {type(a).__name__} "
                                     f"({a!r})")
            _leaf_close(a, e, rtol, atol, where)
        else:
            if type(a) is not type(e) or a != e:
                raise AssertionError(f"{where}: non-tensor leaves differ: actual {a!r}, "
                                     f"expected {e!r}")


def assert_tree_equal(actual: Any, expected: Any, msg: str = "") -> None:
    """Bitwise equality of two pytrees (used to check that inputs were not mutated)."""
    assert_tree_close(actual, expected, rtol=0.0, atol=0.0, msg=msg)


def clone_tree(tree: Any) -> Any:
    """A deep copy of every tensor leaf (``detach().clone()``); other leaves are shared."""
    return pytree.tree_map(
        lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree
    )


def reference_deriv(f: Callable[..., Any], k: int, argnums: int | tuple[int, ...] = 0,
                    *, has_aux: bool = False) -> Callable[..., Any]:
    """The oracle: ``k`` nested ``torch.func.jacrev`` calls with the same ``argnums``.

    With ``has_aux=True`` ``f`` returns ``(output, aux)`` and the result is
    ``(derivative, aux)``, as ``torch.func.jacrev(..., has_aux=True)`` returns it.
    """
    if k < 1:
        raise ValueError("reference_deriv: k must be >= 1")
    g = torch.func.jacrev(f, argnums, has_aux=has_aux)
    for _ in range(k - 1):
        g = torch.func.jacrev(g, argnums, has_aux=has_aux)
    return g


def reference_derivs(f: Callable[..., Any], k: int, argnums: int | tuple[int, ...] = 0
                     ) -> Callable[..., tuple[Any, ...]]:
    """``args -> (f(*args), D^1, ..., D^k)``, each entry from :func:`reference_deriv`."""

    def run(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return (f(*args, **kwargs),) + tuple(
            reference_deriv(f, j, argnums)(*args, **kwargs) for j in range(1, k + 1)
        )

    return run
