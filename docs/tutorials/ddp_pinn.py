"""Train the Poisson PINN of ``pinn_poisson.py`` with DistributedDataParallel.

    torchrun --standalone --nproc-per-node 2 docs/tutorials/ddp_pinn.py [--steps 300]
             [--backend gloo|nccl] [--check]

One process per CPU core (``gloo``) or per GPU (``nccl``, the default when CUDA is available).
Every process holds a copy of the network and its share of the collocation points; DDP
averages the gradients during ``loss.backward()``. ``--check`` compares, after the first
backward, every rank's gradient with the gradient one process computes on all the points, and
exits with status 1 if they differ (float64, relative 1e-10).

What DDP wraps is the module whose ``forward`` computes the loss -- it *calls* the xafunc
transform on the plain network -- not the network itself; see ``ddp.rst`` for why.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pinn_poisson as P  # noqa: E402


class PoissonLoss(nn.Module):
    """``mean((lap u - f)^2) + w mean(u(boundary)^2)`` for ``u = self.model``."""

    def __init__(self, model: nn.Module, boundary_weight: float = 100.0) -> None:
        super().__init__()
        self.model = model
        self.lap = P.laplacian(model)  # the transform, built once around the plain network
        self.boundary_weight = boundary_weight

    def forward(self, interior: Tensor, f: Tensor, boundary: Tensor) -> Tensor:
        residual = self.lap(interior) - f
        return (residual ** 2).mean() + self.boundary_weight * (self.model(boundary) ** 2).mean()


def check_gradients(ddp: DDP, interior: Tensor, boundary: Tensor, device: torch.device) -> float:
    """Max relative difference between this rank's (averaged) gradient and the gradient of a
    fresh copy of the model on *all* the points, in one process."""
    single = PoissonLoss(P.make_model(seed=0).to(device))
    single(interior, P.forcing(interior), boundary).backward()
    worst = 0.0
    for p, q in zip(ddp.module.model.parameters(), single.model.parameters()):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        e = q.grad if q.grad is not None else torch.zeros_like(q)
        worst = max(worst, ((g - e).abs().max() / e.abs().max().clamp_min(1e-300)).item())
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None)
    parser.add_argument("--interior", type=int, default=512, help="points, all ranks together")
    parser.add_argument("--boundary", type=int, default=128, help="points, all ranks together")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)

    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)  # rank, world size, address: from torchrun's environment
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # one core per process
    if args.interior % world or args.boundary % world:
        raise SystemExit("the point counts must be multiples of the number of processes: the "
                         "average of equal-sized per-rank means is the mean over all points")

    # The same initial network everywhere (DDP also broadcasts rank 0's parameters) and the
    # same global point set; each rank takes its share.
    model = P.make_model(seed=0).to(device)
    ddp = DDP(PoissonLoss(model), device_ids=[device.index] if device.type == "cuda" else None)
    interior, boundary = (t.to(device) for t in P.collocation(args.interior, args.boundary, 0))
    my_interior = interior.chunk(world)[rank]
    my_boundary = boundary.chunk(world)[rank]
    my_f = P.forcing(my_interior)

    opt = torch.optim.Adam(ddp.parameters(), lr=2e-2)
    status = 0
    for step in range(args.steps):
        opt.zero_grad()
        loss = ddp(my_interior, my_f, my_boundary)
        loss.backward()  # DDP's hooks all-reduce (average) the gradients here
        if step == 0 and args.check:
            worst = check_gradients(ddp, interior, boundary, device)
            ok = worst < 1e-10
            # one write per line: the ranks share the terminal
            sys.stdout.write(f"[rank {rank}/{world}, {backend}] step 0: max relative |grad - "
                             f"one-process grad on all {args.interior}+{args.boundary} points| "
                             f"= {worst:.2e} ({'ok' if ok else 'MISMATCH'})\n")
            sys.stdout.flush()
            status = status or (0 if ok else 1)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step:4d}  loss {mean_loss.item() / world:.4e}", flush=True)
    if rank == 0:
        print(f"relative L2 error {P.relative_l2_error(model.cpu()):.2e}", flush=True)
    # both ranks leave together, and the DDP module (whose reducer holds the process group) is
    # freed before the group: a group torn down later, at interpreter exit, can abort there
    # ("terminate called without an active exception", seen on a loaded machine)
    dist.barrier()
    del opt, ddp
    gc.collect()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
