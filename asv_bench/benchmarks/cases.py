"""Benchmark cases shared by the asv suite and ``asv_bench/ratio_table.py``.

Every case is a tanh MLP ``x -> W_L(... tanh(W_1 x + b_1) ...) + b_L`` (``Linear`` layers with
``tanh`` between them, none after the last) and one derivative request on it. A case knows how
to build

* the xafunc transform (:meth:`Case.xafunc_fn`),
* every torch.func strategy a careful user would try (:meth:`Case.baselines`), and
* the arguments (:meth:`Case.make_args`),

so the asv classes in ``bench_*.py`` and the ratio table time exactly the same functions.

Taylor-mode cases (Laplacian, biharmonic, jet) need ``xafunc.xlaplacian``, ``xafunc.xbiharmonic``
and ``xafunc.jet``; :meth:`Case.available` is False for a version without them. Their calling
conventions are in :func:`_xafunc_taylor`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.func as tf

import xafunc

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

#: Baselines whose estimated peak intermediate size exceeds this are "unavailable".
DEFAULT_MEM_BUDGET = 4 * 2**30


# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------


def make_mlp(
    widths: Sequence[int], dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A tanh MLP with the given layer widths, as a pure function of one sample ``x``.

    The weights are drawn once (fixed seed, ``1/sqrt(fan_in)`` scaling so tanh does not
    saturate) and closed over; only ``x`` is differentiated.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for n_in, n_out in itertools.pairwise(widths):
        w = torch.randn(n_out, n_in, generator=gen) / math.sqrt(n_in)
        b = torch.randn(n_out, generator=gen) * 0.1
        layers.append((w.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)))
    last = len(layers) - 1

    def mlp(x: torch.Tensor) -> torch.Tensor:
        for i, (w, b) in enumerate(layers):
            x = torch.nn.functional.linear(x, w, b)
            if i != last:
                x = torch.tanh(x)
        return x

    return mlp


# --------------------------------------------------------------------------------------------
# torch.func strategies
# --------------------------------------------------------------------------------------------

Levels = tuple[str, ...]  # innermost first, each "fwd" or "rev"


def nesting_name(levels: Levels) -> str:
    """``("rev", "fwd")`` -> ``"jacfwd(jacrev)"`` (written outermost first, as users write it)."""
    names = ["jac" + lvl for lvl in reversed(levels)]
    return "(".join(names) + ")" * (len(names) - 1)


def nested(f: Callable[..., Any], levels: Levels) -> Callable[..., Any]:
    """``levels`` nested first-order torch.func transforms of ``f`` (innermost first)."""
    g = f
    for lvl in levels:
        g = tf.jacrev(g) if lvl == "rev" else tf.jacfwd(g)
    return g


def nestings(order: int) -> list[Levels]:
    """The nestings worth trying at ``order``: all ``2^k`` up to order 3, a subset above."""
    if order <= 3:
        return [tuple(p) for p in itertools.product(("rev", "fwd"), repeat=order)]
    # Order >= 4: reverse innermost (few cotangents) or pure forward; outer levels forward,
    # plus one rev-over-rev start. Pure reverse explodes (one vjp per entry of the inner result).
    return [
        ("rev",) + ("fwd",) * (order - 1),
        ("fwd",) * order,
        ("rev", "rev") + ("fwd",) * (order - 2),
    ]


def estimate_nesting_bytes(
    levels: Levels, n_in: int, n_out: int, widths: Sequence[int], batch: int, itemsize: int
) -> int:
    """Rough peak intermediate size of a nesting, from the shapes alone.

    Each ``jacfwd`` level vmaps over the ``n_in`` input directions; each ``jacrev`` level vmaps
    over every entry of the (already differentiated) output it sees, ``n_out * n_in^j`` at depth
    ``j``. The innermost function then runs with that many samples, keeping activations and
    their tangents for every layer.
    """
    mult, seen = batch, n_out
    for lvl in levels:
        mult *= seen if lvl == "rev" else n_in
        seen *= n_in
    return 2 * mult * sum(widths) * itemsize


def _trace_last2(t: torch.Tensor) -> torch.Tensor:
    return t.diagonal(dim1=-2, dim2=-1).sum(-1)


def _hvp_laplacian(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Laplacian of one sample as the trace of ``n`` Hessian-vector products (vmapped)."""
    g = tf.grad(lambda x: f(x).sum())

    def lap(x: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        hv = tf.vmap(lambda v: tf.jvp(g, (x,), (v,))[1])(eye)
        return _trace_last2(hv).reshape(1)

    return lap


def _nested_jvp(f: Callable[..., Any], order: int) -> Callable[..., Any]:
    """``(x, v) -> d^order/dt^order f(x + t v) at t = 0`` by ``order`` nested ``jvp`` calls."""

    def make(g: Callable[..., Any], v: torch.Tensor) -> Callable[..., Any]:
        return lambda x: tf.jvp(g, (x,), (v,))[1]

    def run(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = f
        for _ in range(order):
            g = make(g, v)
        return g(x)

    return run


def _xafunc_taylor(kind: str, f: Callable[..., Any], order: int) -> Callable[..., Any]:
    """The xafunc Taylor-mode transform for ``kind``:

    * ``xafunc.xlaplacian(f)(x)`` -> sum_i d^2 f / dx_i^2, shaped like ``f(x)``;
    * ``xafunc.xbiharmonic(f)(x)`` -> sum_ij d^4 f / dx_i^2 dx_j^2, shaped like ``f(x)``;
    * ``(x, v) -> xafunc.jet(f, (x,), ((v, None, ...),))``: every derivative of
      ``t -> f(x + t v)`` up to ``order`` (the baseline, nested ``jvp``, gives only the last).
    """
    if kind == "laplacian":
        return xafunc.xlaplacian(f)  # type: ignore[attr-defined]
    if kind == "biharmonic":
        return xafunc.xbiharmonic(f)  # type: ignore[attr-defined]
    if kind == "jet":
        rest = (None,) * (order - 1)

        def jet_line(x: torch.Tensor, v: torch.Tensor) -> Any:
            return xafunc.jet(f, (x,), ((v, *rest),))  # type: ignore[attr-defined]

        return jet_line
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark: a tanh MLP, a derivative request, the target ratio xafunc / best.

    ``kind`` is ``"deriv"`` (``xderiv(f, order)`` at one point), ``"vmap"`` (per-sample
    ``xderiv`` under ``torch.func.vmap`` over ``batch`` points), or a Taylor-mode request
    (``"laplacian"``, ``"biharmonic"``, ``"jet"``), vmapped when ``batch`` is set.
    """

    name: str
    title: str
    widths: tuple[int, ...]
    order: int
    target: float
    kind: str = "deriv"
    batch: int | None = None
    requires: str | None = None
    #: the strategy a careful user would pick (the asv ``time_torchfunc`` baseline)
    asv_baseline: str = ""
    tags: tuple[str, ...] = field(default=())

    @property
    def sizes(self) -> str:
        return "->".join(map(str, self.widths))

    @property
    def label(self) -> str:
        b = f" batch {self.batch}" if self.batch else ""
        return f"{self.title} {self.sizes}{b}"

    def available(self) -> bool:
        return self.requires is None or hasattr(xafunc, self.requires)

    # -- arguments -----------------------------------------------------------------------
    def make_args(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple:
        gen = torch.Generator().manual_seed(1)
        shape = (self.batch, self.widths[0]) if self.batch else (self.widths[0],)
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        if self.kind == "jet":
            v = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            return (x, v)
        return (x,)

    def sample_args(self, args: tuple) -> tuple:
        """One sample of ``args`` (for ``xafunc.plan`` on a vmapped case)."""
        return tuple(a[0] for a in args) if self.batch else args

    def mlp(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Callable:
        return make_mlp(self.widths, dtype=dtype, device=device)

    def _batched(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return tf.vmap(fn) if self.batch else fn

    # -- xafunc --------------------------------------------------------------------------
    def xafunc_fn(
        self, dtype: torch.dtype = torch.float32, device: str = "cpu", mode: str = "auto"
    ) -> Callable[..., Any]:
        """A fresh xafunc transform of a fresh MLP (no plan cached yet)."""
        f = self.mlp(dtype, device)
        if self.kind in ("deriv", "vmap"):
            return self._batched(xafunc.xderiv(f, self.order, mode=mode))
        return self._batched(_xafunc_taylor(self.kind, f, self.order))

    def plan(self, args: tuple, dtype: torch.dtype = torch.float32, device: str = "cpu",
             mode: str = "auto") -> Any:
        """``xafunc.plan`` for one sample, or None for Taylor-mode cases."""
        if self.kind not in ("deriv", "vmap"):
            return None
        return xafunc.plan(self.mlp(dtype, device), self.order, mode=mode)(
            *self.sample_args(args))

    # -- torch.func ----------------------------------------------------------------------
    def baselines(
        self, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> dict[str, tuple[Callable[..., Any], int]]:
        """Every torch.func strategy worth trying: ``name -> (function, estimated bytes)``."""
        f = self.mlp(dtype, device)
        n, m, k = self.widths[0], self.widths[-1], self.order
        batch = self.batch or 1
        item = torch.empty((), dtype=dtype).element_size()

        def est(levels: Levels, n_out: int = m) -> int:
            return estimate_nesting_bytes(levels, n, n_out, self.widths, batch, item)

        out: dict[str, tuple[Callable[..., Any], int]] = {}
        if self.kind in ("deriv", "vmap"):
            for levels in nestings(k):
                out[nesting_name(levels)] = (self._batched(nested(f, levels)), est(levels))
            if k == 2:
                out["hessian"] = (self._batched(tf.hessian(f)), est(("rev", "fwd")))
        elif self.kind == "laplacian":
            out["trace(hessian)"] = (
                self._batched(lambda x: _trace_last2(tf.hessian(f)(x))), est(("rev", "fwd")))
            out["trace(jacrev(jacrev))"] = (
                self._batched(lambda x: _trace_last2(nested(f, ("rev", "rev"))(x))),
                est(("rev", "rev")))
            out["vmap(hvp)"] = (self._batched(_hvp_laplacian(f)), est(("rev", "fwd")))
        elif self.kind == "biharmonic":
            d4 = nested(f, ("rev", "fwd", "fwd", "fwd"))
            out["einsum(D4 by jacfwd^3(jacrev))"] = (
                self._batched(lambda x: torch.einsum("oiijj->o", d4(x))),
                est(("rev", "fwd", "fwd", "fwd")))
            lap = _hvp_laplacian(f)
            out["vmap(hvp) of vmap(hvp)"] = (
                self._batched(_hvp_laplacian(lap)), est(("rev", "fwd", "rev", "fwd")))
        elif self.kind == "jet":
            out[f"jvp^{k}"] = (self._batched(_nested_jvp(f, k)), batch * 2**k * sum(
                self.widths) * item)
        else:
            raise ValueError(f"unknown case kind {self.kind!r}")
        return out

    def result_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Size of the xafunc result (what every strategy must at least allocate)."""
        item = torch.empty((), dtype=dtype).element_size()
        m = self.widths[-1] * (self.batch or 1)
        if self.kind in ("deriv", "vmap"):
            return m * self.widths[0] ** self.order * item
        if self.kind == "jet":
            return m * self.order * item
        return m * item


CASES: list[Case] = [
    Case("jac_hourglass", "Jacobian, hourglass", (2048, 32, 2048), 1, 0.30,
         asv_baseline="jacrev"),
    Case("jac_wide_in", "Jacobian, wide in", (2048, 512, 16), 1, 1.05, asv_baseline="jacrev"),
    Case("jac_wide_out", "Jacobian, wide out", (16, 512, 2048), 1, 1.05,
         asv_baseline="jacfwd"),
    Case("jac_uniform", "Jacobian, uniform", (256, 256, 256, 256), 1, 1.05,
         asv_baseline="jacrev"),
    Case("hess_scalar", "Hessian, scalar output", (128, 256, 256, 1), 2, 1.00,
         asv_baseline="jacrev(jacrev)"),
    Case("pinn_order3", "order 3, PINN-like", (3, 64, 64, 64, 1), 3, 0.20,
         asv_baseline="jacfwd(jacfwd(jacrev))"),
    Case("order4", "order 4", (2, 32, 32, 3), 4, 0.10,
         asv_baseline="jacfwd(jacfwd(jacfwd(jacrev)))"),
    Case("vmap_hessians", "per-sample Hessians (vmap)", (3, 64, 64, 1), 2, 0.35,
         kind="vmap", batch=512, asv_baseline="hessian"),
    Case("order3_32_128_8", "order 3", (32, 128, 8), 3, 0.50,
         asv_baseline="jacfwd(jacfwd(jacrev))"),
    Case("laplacian_batch", "Laplacian (vmap)", (16, 256, 256, 1), 2, 0.50,
         kind="laplacian", batch=256, requires="xlaplacian", asv_baseline="vmap(hvp)"),
    Case("laplacian_point", "Laplacian, one point", (50, 768, 768, 512, 512, 1), 2, 0.50,
         kind="laplacian", requires="xlaplacian", asv_baseline="vmap(hvp)"),
    Case("biharmonic", "biharmonic (vmap)", (5, 128, 128, 1), 4, 0.30,
         kind="biharmonic", batch=64, requires="xbiharmonic",
         asv_baseline="einsum(D4 by jacfwd^3(jacrev))"),
    Case("jet6", "jet order 6, one direction", (8, 128, 128, 8), 6, 0.10,
         kind="jet", requires="jet", asv_baseline="jvp^6"),
]

CASES_BY_NAME: dict[str, Case] = {c.name: c for c in CASES}


def get_case(name: str) -> Case:
    try:
        return CASES_BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown benchmark case {name!r}; valid names: {', '.join(CASES_BY_NAME)}"
        ) from None
