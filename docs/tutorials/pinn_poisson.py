"""Train a physics-informed network on Poisson's equation in 2-D with xafunc's ``xlaplacian``.

    python docs/tutorials/pinn_poisson.py [--steps 800] [--out DIR]

Solves ``lap u = f`` on the unit square with ``u = 0`` on its boundary, for
``f(x, y) = -2 pi^2 sin(pi x) sin(pi y)``, whose exact solution is
``u*(x, y) = sin(pi x) sin(pi y)``. The network is a ``2 -> 32 -> 32 -> 1`` tanh MLP; the loss
is the mean squared PDE residual at fixed interior collocation points plus a weighted mean
squared boundary value, minimised with Adam. The tutorial ``pinn_training.rst`` walks through
this file; ``docs/conf.py`` runs it at every docs build (unless its plots are up to date) to
draw the loss curve and the solution; ``tests/test_training.py`` runs it with few steps.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from xafunc import xlaplacian

DTYPE = torch.float64


def exact(x: Tensor) -> Tensor:
    """``u*(x, y) = sin(pi x) sin(pi y)``, shape ``(B, 1)``."""
    return torch.sin(math.pi * x).prod(-1, keepdim=True)


def forcing(x: Tensor) -> Tensor:
    """``f = lap u* = -2 pi^2 sin(pi x) sin(pi y)``, shape ``(B, 1)``."""
    return -2 * math.pi ** 2 * exact(x)


def make_model(seed: int = 0, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, width), nn.Tanh(),
        nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 1),
    ).to(DTYPE)


def laplacian(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``x (B, 2) -> lap u(x) (B, 1)``: the exact Laplacian at every point.

    ``xlaplacian(model)`` differentiates one point (``(2,) -> (1,)``); ``vmap`` maps it over
    the batch. Build it once and call it every step: the capture and plan are cached on it.
    """
    return vmap(xlaplacian(model))


def collocation(n_interior: int, n_boundary: int, seed: int) -> tuple[Tensor, Tensor]:
    """Uniform interior points and points spread evenly over the four sides."""
    g = torch.Generator().manual_seed(seed)
    interior = torch.rand(n_interior, 2, generator=g, dtype=DTYPE)
    t = torch.rand(n_boundary, generator=g, dtype=DTYPE)
    side = torch.arange(n_boundary) % 4
    zero_one = (side % 2).to(DTYPE)  # sides 0, 2: coordinate = 0; sides 1, 3: = 1
    boundary = torch.where((side < 2).unsqueeze(-1),
                           torch.stack([zero_one, t], -1),   # x = 0 or 1
                           torch.stack([t, zero_one], -1))   # y = 0 or 1
    return interior, boundary


def train(steps: int = 800, seed: int = 0, lr: float = 2e-2, n_interior: int = 512,
          n_boundary: int = 128, boundary_weight: float = 100.0) -> dict[str, Any]:
    """Adam on ``mean((lap u - f)^2) + boundary_weight * mean(u_boundary^2)``.

    Returns the per-step loss, the trained model and the wall time.
    """
    model = make_model(seed)
    lap = laplacian(model)
    interior, boundary = collocation(n_interior, n_boundary, seed)
    f = forcing(interior)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 20)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        residual = lap(interior) - f
        loss = (residual ** 2).mean() + boundary_weight * (model(boundary) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return {"loss": losses, "model": model, "seconds": time.perf_counter() - t0}


def relative_l2_error(model: nn.Module, n: int = 101) -> float:
    """``|u - u*| / |u*|`` on an ``n x n`` grid."""
    x = grid(n)
    with torch.no_grad():
        return ((model(x) - exact(x)).norm() / exact(x).norm()).item()


def grid(n: int) -> Tensor:
    s = torch.linspace(0, 1, n, dtype=DTYPE)
    return torch.stack(torch.meshgrid(s, s, indexing="xy"), -1).reshape(-1, 2)


def plot(result: dict[str, Any], out_dir: str) -> list[str]:
    """``pinn_loss.png`` (loss per step) and ``pinn_solution.png`` (network, exact, error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "pinn_loss.png"), os.path.join(out_dir, "pinn_solution.png")]

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.semilogy(result["loss"], lw=1)
    ax.set_xlabel("Adam step")
    ax.set_ylabel("loss")
    ax.set_title(f"PINN for Poisson's equation: {len(result['loss'])} steps in "
                 f"{result['seconds']:.1f} s", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    n = 101
    x = grid(n)
    with torch.no_grad():
        pred = result["model"](x).reshape(n, n)
    ref = exact(x).reshape(n, n)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    panels = [(pred, "network u(x, y)"), (ref, "exact sin(pi x) sin(pi y)"),
              ((pred - ref).abs(), "|error|")]
    for ax, (img, title) in zip(axes, panels):
        im = ax.imshow(img.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    axes[0].set_ylabel("y")
    fig.suptitle(f"relative L2 error {relative_l2_error(result['model']):.2e}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the two PNG plots")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation
    result = train(steps=args.steps, seed=args.seed)
    print(f"{args.steps} steps in {result['seconds']:.1f} s; loss {result['loss'][0]:.3e} -> "
          f"{result['loss'][-1]:.3e}; relative L2 error {relative_l2_error(result['model']):.2e}")
    if args.out:
        for p in plot(result, args.out):
            print("wrote", p)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
