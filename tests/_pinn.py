"""A small physics-informed network and its losses, shared by the training tests.

The network ``u: R^2 -> R^1`` is a ``2 -> 32 -> 32 -> 1`` tanh MLP in float64. The losses are
PDE residuals over a batch of collocation points, built from xafunc transforms under
:func:`torch.func.vmap` (one sample per call), plus an optional boundary term:

* ``"laplacian"``: ``mean((lap u(x) - f(x))^2)``, Poisson's equation with
  ``f = -2 pi^2 sin(pi x0) sin(pi x1)`` (exact solution ``sin(pi x0) sin(pi x1)``);
* ``"order3"``: ``mean((u_xxx + u_yyy - f(x))^2)`` from the full third derivative
  ``xderiv(u, 3)``.

The oracles (:func:`oracle_residual`) compute the same residuals with nested ``torch.func``
(``hessian`` / ``jacrev`` three times) and nothing from xafunc.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from xafunc import xderiv, xlaplacian

F64 = torch.float64
OPERATORS = ("laplacian", "order3")


def make_net(seed: int = 0, width: int = 32) -> nn.Sequential:
    """The ``2 -> width -> width -> 1`` tanh MLP, float64, deterministic initialisation."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                        nn.Linear(width, 1)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(p.shape[-1]))
    return net


def forcing(x: Tensor) -> Tensor:
    """``f(x) = -2 pi^2 sin(pi x0) sin(pi x1)``, shape ``(B, 1)`` for ``x`` of shape ``(B, 2)``."""
    return (-2 * math.pi ** 2 * torch.sin(math.pi * x).prod(-1)).unsqueeze(-1)


def batch(step: int, n: int = 16, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Interior points ``(n, 2)`` in the unit square and boundary points ``(n, 2)`` on it."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    x = torch.rand(n, 2, generator=g, dtype=F64)
    t = torch.rand(n, generator=g, dtype=F64)
    side = torch.arange(n) % 4
    xb = torch.stack([torch.where(side < 2, side.to(F64), t),
                      torch.where(side < 2, t, (side - 2).to(F64))], dim=-1)
    return x, xb


def residual_fn(u: Callable[..., Tensor], operator: str, argnums: int = 0,
                in_dims: tuple[int | None, ...] = (0,)) -> Callable[..., Tensor]:
    """``args -> D u`` per point, shape ``(B, 1)``, from xafunc under ``vmap``."""
    if operator == "laplacian":
        return vmap(xlaplacian(u, argnums=argnums), in_dims=in_dims)
    if operator == "order3":
        d3 = vmap(xderiv(u, 3, argnums=argnums), in_dims=in_dims)

        def third(*args: Tensor) -> Tensor:
            d = d3(*args)  # (B, 1, 2, 2, 2)
            return d[..., 0, 0, 0] + d[..., 1, 1, 1]

        return third
    raise ValueError(operator)


class PINNLoss(nn.Module):
    """``mean((D u(x) - f(x))^2) [+ mean(u(xb)^2)]`` for ``u = self.net``.

    The transform is built once, here, around the plain network; ``forward`` only calls it.
    This module -- not ``self.net`` -- is what DDP or ``fully_shard`` wraps.
    """

    def __init__(self, net: nn.Module, operator: str = "laplacian",
                 boundary: bool = False) -> None:
        super().__init__()
        self.net = net
        self.boundary = boundary
        self.residual = residual_fn(net, operator)

    def forward(self, x: Tensor, xb: Tensor) -> Tensor:
        loss = ((self.residual(x) - forcing(x)) ** 2).mean()
        if self.boundary:
            loss = loss + (self.net(xb) ** 2).mean()
        return loss


def functional_loss(net: nn.Module, operator: str = "laplacian", boundary: bool = False
                    ) -> Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]:
    """``(params, x, xb) -> loss``, the same loss through ``functional_call`` (for ``grad``)."""
    def u(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(net, params, (x,))

    res = residual_fn(u, operator, argnums=1, in_dims=(None, 0))

    def loss(params: dict[str, Tensor], x: Tensor, xb: Tensor) -> Tensor:
        out = ((res(params, x) - forcing(x)) ** 2).mean()
        if boundary:
            out = out + (u(params, xb) ** 2).mean()
        return out

    return loss


def oracle_residual(net: nn.Module, operator: str, x: Tensor) -> Tensor:
    """The residual operator by nested torch.func only (no xafunc), shape ``(B, 1)``."""
    if operator == "laplacian":
        h = vmap(torch.func.hessian(net))(x)  # (B, 1, 2, 2)
        return h.diagonal(dim1=-2, dim2=-1).sum(-1)
    d = vmap(jacrev(jacrev(jacrev(net))))(x)
    return d[..., 0, 0, 0] + d[..., 1, 1, 1]


def oracle_loss(net: nn.Module, operator: str, boundary: bool, x: Tensor, xb: Tensor) -> Tensor:
    loss = ((oracle_residual(net, operator, x) - forcing(x)) ** 2).mean()
    if boundary:
        loss = loss + (net(xb) ** 2).mean()
    return loss


def grads_of(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter's ``.grad`` (zeros where autograd left it ``None``), cloned."""
    return {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for k, p in module.named_parameters()}


def params_of(module: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters()}
