"""Training-step benchmark cases shared by ``bench_training.py`` and ``training_table.py``.

A case is a PINN-style training step: a tanh MLP ``u: R^n -> R`` (``nn.Linear`` layers, ``tanh``
between them), a batch of collocation points ``x``, and the loss ``mean over the batch of
(D u(x))^2`` for a differential operator ``D``:

* ``laplacian``: ``D u = sum_i d^2 u / dx_i^2``;
* ``biharmonic``: ``D u = sum_ij d^4 u / dx_i^2 dx_j^2``;
* ``order3``: ``D u = sum_ijk C_ijk d^3 u / dx_i dx_j dx_k``, a general third-order operator
  with fixed coefficients ``C`` (every mixed partial counts, so the full third derivative
  ``xderiv(u, 3)`` is needed).

One step is forward + backward with the transform called inline, through either API:

* ``backward``: ``loss.backward()`` on the ``nn.Module``'s parameters;
* ``func_grad``: ``torch.func.grad`` of the loss over ``functional_call`` parameters.

For every case, :func:`strategies` gives xafunc's residual and every torch.func way a careful
user would write it (nestings of ``jacfwd``/``jacrev``, ``hessian``, vmapped Hessian-vector
products, nested ``jvp`` along the directions), each as a ``(params, x) -> D u(x)`` function of
one point, built once. :func:`make_step` turns one into a step function of no arguments; its
strategy ``"xafunc inline"`` builds xafunc's transform inside every step instead.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.func as tf
from torch import Tensor, nn

import xafunc

Residual = Callable[[Any, Tensor], Tensor]  # (params, one point) -> (1,)
Fn2 = Callable[[Any, Tensor], Tensor]  # (params, one point) -> u, shape (1,)

APIS = ("backward", "func_grad")
INLINE = "xafunc inline"
INLINE_COMPILE = "xafunc inline compile=True"


@dataclass(frozen=True)
class TrainCase:
    name: str
    operator: str  # "laplacian" | "biharmonic" | "order3"
    widths: tuple[int, ...]
    batch: int
    #: the target ratio xafunc step / best torch.func step (issue: 0.35 Laplacian, 0.2 order >= 3)
    target: float
    #: the torch.func strategy timed beside xafunc in the asv suite
    asv_baseline: str

    @property
    def n(self) -> int:
        return self.widths[0]

    @property
    def label(self) -> str:
        return f"{self.operator} {'->'.join(map(str, self.widths))} batch {self.batch}"

    def make_module(self, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    seed: int = 0) -> nn.Module:
        gen = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(self.widths)):
            lin = nn.Linear(a, b)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(b, a, generator=gen) / math.sqrt(a))
                lin.bias.copy_(torch.randn(b, generator=gen) * 0.1)
            layers.append(lin)
            if i < len(self.widths) - 2:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers).to(device=device, dtype=dtype)

    def make_points(self, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    batch: int | None = None) -> Tensor:
        gen = torch.Generator().manual_seed(1)
        return torch.rand(batch or self.batch, self.n, generator=gen).to(device=device,
                                                                          dtype=dtype)

    def coefficients(self, dtype: torch.dtype, device: str) -> Tensor:
        """``C`` of the ``order3`` operator: fixed, symmetric, ``(n, n, n)``."""
        gen = torch.Generator().manual_seed(2)
        c = torch.randn(self.n, self.n, self.n, generator=gen, dtype=torch.float64)
        c = sum(c.permute(p) for p in itertools.permutations(range(3))) / 6  # type: ignore
        return c.to(device=device, dtype=dtype)

    def estimated_bytes(self, strategy: str, dtype: torch.dtype) -> int:
        """Rough peak of one step's saved activations, from the shapes (for skipping)."""
        n, item = self.n, torch.empty((), dtype=dtype).element_size()
        per_point = {"laplacian": n + 1, "biharmonic": 3 * n * n, "order3": n ** 3}[
            self.operator]
        if "jacrev(jacrev(jacrev" in strategy or "jacrev(jacrev(jacfwd" in strategy:
            per_point *= 4
        return 6 * self.batch * per_point * sum(self.widths) * item


# ----------------------------------------------------------------------------- residuals
def _trace2(t: Tensor) -> Tensor:
    return t.diagonal(dim1=-2, dim2=-1).sum(-1)


def _nested(f: Fn2, levels: tuple[str, ...]) -> Fn2:
    g = f
    for lvl in levels:
        g = tf.jacrev(g, argnums=1) if lvl == "rev" else tf.jacfwd(g, argnums=1)
    return g


def _nesting_name(levels: tuple[str, ...]) -> str:
    names = ["jac" + lvl for lvl in reversed(levels)]
    return "(".join(names) + ")" * (len(names) - 1)


def _hvp_diag(f: Fn2) -> Callable[[Any, Tensor, Tensor], Tensor]:
    """``(p, x, V) -> [v^T H v for v in V]`` by vmapped forward-over-reverse HVPs."""
    g = tf.grad(lambda p, x: f(p, x).sum(), argnums=1)

    def run(p: Any, x: Tensor, V: Tensor) -> Tensor:
        return tf.vmap(lambda v: tf.jvp(lambda z: g(p, z), (x,), (v,))[1] @ v)(V)

    return run


def _jvp_k(f: Fn2, k: int) -> Callable[[Any, Tensor, Tensor], Tensor]:
    """``(p, x, V) -> [D^k f(x)[v, ..., v] for v in V]`` by ``k`` nested ``jvp`` (vmapped)."""
    def along(p: Any, x: Tensor, v: Tensor) -> Tensor:
        g: Callable[[Tensor], Tensor] = lambda z: f(p, z)  # noqa: E731
        for _ in range(k):
            g = (lambda h: (lambda z: tf.jvp(h, (z,), (v,))[1]))(g)
        return g(x)

    return lambda p, x, V: tf.vmap(lambda v: along(p, x, v))(V)


def _biharmonic_dirs(n: int, dtype: torch.dtype, device: str) -> tuple[Tensor, Tensor]:
    """Directions ``e_i``, ``e_i +- e_j`` and weights with ``sum_r w_r D^4 u[v_r^4] = lap^2 u``."""
    eye = torch.eye(n, dtype=torch.float64)
    rows = [eye]
    if n > 1:
        i, j = torch.triu_indices(n, n, 1)
        rows += [eye[i] + eye[j], eye[i] - eye[j]]
    V = torch.cat(rows)
    w = torch.full((V.shape[0],), 1.0 / 6.0, dtype=torch.float64)
    w[:n] = 1.0 - (n - 1) / 3.0
    return V.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def xafunc_residual(case: TrainCase, f: Fn2, dtype: torch.dtype, device: str,
                    compile: bool = False) -> Residual:
    """xafunc's ``(params, x) -> D u(x)``: a fresh transform on every call of this function
    (``compile``: the transform's ``compile=True``, inductor's code for the derivative graph
    and, in training, its backward)."""
    if case.operator == "laplacian":
        return xafunc.xlaplacian(f, argnums=1, compile=compile)
    if case.operator == "biharmonic":
        return xafunc.xbiharmonic(f, argnums=1, compile=compile)
    if case.operator == "order3":
        C = case.coefficients(dtype, device)
        d3x = xafunc.xderiv(f, 3, argnums=1, compile=compile)
        return lambda p, x: torch.einsum("oijk,ijk->o", d3x(p, x), C)
    raise ValueError(case.operator)


def strategies(case: TrainCase, f: Fn2, dtype: torch.dtype, device: str
               ) -> dict[str, Residual]:
    """``name -> (params, x) -> D u(x)`` (shape ``(1,)``): ``"xafunc"`` first, then torch.func."""
    n = case.n
    out: dict[str, Residual] = {"xafunc": xafunc_residual(case, f, dtype, device)}
    if case.operator == "laplacian":
        h = tf.hessian(f, argnums=1)
        out["trace(hessian)"] = lambda p, x: _trace2(h(p, x))
        rr = _nested(f, ("rev", "rev"))
        out["trace(jacrev(jacrev))"] = lambda p, x: _trace2(rr(p, x))
        eye = torch.eye(n, dtype=dtype, device=device)
        hvp = _hvp_diag(f)
        out["vmap(hvp)"] = lambda p, x: hvp(p, x, eye).sum().reshape(1)
        j2 = _jvp_k(f, 2)
        out["vmap(jvp(jvp))"] = lambda p, x: j2(p, x, eye).sum(0)
    elif case.operator == "biharmonic":
        d4 = _nested(f, ("rev", "fwd", "fwd", "fwd"))
        out["einsum(jacfwd^3(jacrev))"] = lambda p, x: torch.einsum("oiijj->o", d4(p, x))
        eye = torch.eye(n, dtype=dtype, device=device)
        hvp_lap: Fn2 = lambda p, x: _hvp_diag(f)(p, x, eye).sum().reshape(1)  # noqa: E731
        hvp2 = _hvp_diag(hvp_lap)
        out["vmap(hvp) of vmap(hvp)"] = lambda p, x: hvp2(p, x, eye).sum().reshape(1)
        V, w = _biharmonic_dirs(n, dtype, device)
        j4 = _jvp_k(f, 4)
        out["weighted vmap(jvp^4)"] = lambda p, x: (w.unsqueeze(-1) * j4(p, x, V)).sum(0)
    elif case.operator == "order3":
        C = case.coefficients(dtype, device)
        for levels in itertools.product(("rev", "fwd"), repeat=3):
            d3 = _nested(f, levels)
            out[_nesting_name(levels)] = (
                lambda d: (lambda p, x: torch.einsum("oijk,ijk->o", d(p, x), C)))(d3)
    else:
        raise ValueError(case.operator)
    return out


# ---------------------------------------------------------------------------------- steps
def make_step(case: TrainCase, strategy: str, api: str, dtype: torch.dtype = torch.float32,
              device: str = "cpu", batch: int | None = None, compile_backend: str | None = None
              ) -> tuple[Callable[[], Any], Callable[[], dict[str, Tensor]]]:
    """``(step, grads)``: ``step()`` runs one forward + backward (transform called inline);
    ``grads()`` returns the parameter gradients of the last step, keyed by parameter name.

    ``strategy`` is a name from :func:`strategies` (the residual function is built once, before
    the first step) or ``"xafunc inline"``: xafunc's transform is built *inside* every step,
    ``vmap(xlaplacian(u))(x)`` as torch.func users write ``vmap(hessian(u))(x)``; it then
    relies on xafunc's own caching across transform objects (``"xafunc inline compile=True"``:
    the same with ``compile=True``).

    With ``compile_backend`` the loss (``backward``) or the gradient function (``func_grad``)
    goes through ``torch.compile(..., backend=compile_backend)``.
    """
    module = case.make_module(dtype, device)
    x = case.make_points(dtype, device, batch)

    def residual(f: Fn2) -> Callable[[Any, Tensor], Tensor]:
        """The batched residual: built once, or (``"xafunc inline"``) on every call."""
        if strategy in (INLINE, INLINE_COMPILE):
            compile = strategy == INLINE_COMPILE
            return lambda p, z: tf.vmap(xafunc_residual(case, f, dtype, device, compile),
                                        in_dims=(None, 0))(p, z)
        return tf.vmap(strategies(case, f, dtype, device)[strategy], in_dims=(None, 0))

    if api == "backward":
        fn2: Fn2 = lambda p, z: module(z)  # noqa: E731
        res = residual(fn2)

        def loss() -> Tensor:
            return res({}, x).pow(2).mean()

        lossc = torch.compile(loss, backend=compile_backend) if compile_backend else loss
        params = dict(module.named_parameters())

        def step() -> Tensor:
            for p in params.values():
                p.grad = None
            out = lossc()
            out.backward()
            return out

        def grads() -> dict[str, Tensor]:
            return {k: (p.grad if p.grad is not None else torch.zeros_like(p))
                    for k, p in params.items()}

        return step, grads
    if api == "func_grad":
        fn2 = lambda p, z: tf.functional_call(module, p, (z,))  # noqa: E731
        res = residual(fn2)
        g = tf.grad(lambda p: res(p, x).pow(2).mean())
        gc = torch.compile(g, backend=compile_backend) if compile_backend else g
        p0 = {k: v.detach() for k, v in module.named_parameters()}
        last: dict[str, dict[str, Tensor]] = {}

        def step_f() -> dict[str, Tensor]:
            last["g"] = gc(p0)
            return last["g"]

        return step_f, lambda: last["g"]
    raise ValueError(api)


TRAIN_CASES: list[TrainCase] = [
    TrainCase("lap_2_64", "laplacian", (2, 64, 64, 1), 1024, 0.35, "vmap(hvp)"),
    TrainCase("lap_16_256", "laplacian", (16, 256, 256, 1), 256, 0.35, "vmap(hvp)"),
    TrainCase("lap_8_128_b4096", "laplacian", (8, 128, 128, 1), 4096, 0.35, "vmap(hvp)"),
    TrainCase("bih_2_64", "biharmonic", (2, 64, 64, 1), 1024, 0.20,
              "einsum(jacfwd^3(jacrev))"),
    TrainCase("bih_4_128", "biharmonic", (4, 128, 128, 1), 256, 0.20,
              "einsum(jacfwd^3(jacrev))"),
    TrainCase("d3_2_64", "order3", (2, 64, 64, 1), 1024, 0.20, "jacfwd(jacfwd(jacrev))"),
    TrainCase("d3_8_128", "order3", (8, 128, 128, 1), 256, 0.20, "jacfwd(jacfwd(jacrev))"),
]
TRAIN_CASES_BY_NAME = {c.name: c for c in TRAIN_CASES}


def get_train_case(name: str) -> TrainCase:
    try:
        return TRAIN_CASES_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown training case {name!r}; valid: "
                         f"{', '.join(TRAIN_CASES_BY_NAME)}") from None
