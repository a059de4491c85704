"""Data-parallel training through xafunc transforms: DDP and FSDP2, 2 CPU processes, gloo.

One spawn of two processes (``torch.multiprocessing``, gloo, a file store in a temporary
folder: no ports) runs every scenario below for two SGD steps on its half of each batch and
saves, per step, the gradients it ends up with and the parameters after the step. The parent
computes the same two steps in one process on the concatenated batch and compares, rank by
rank, through :func:`tests._compare.assert_tree_close` at float64 tolerances. Each rank's loss
is the mean over its half, so the all-reduced average of the two equals the single-process
gradient of the mean over the whole batch.

Scenarios (see ``docs/tutorials/ddp.rst`` for why these and not others):

* ``ddp_laplacian``: ``DistributedDataParallel(PINNLoss(net))`` -- DDP wraps the module whose
  ``forward`` *calls* the transform on the plain network -- with ``loss.backward()``. The loss
  is the pure residual ``mean((lap u - f)^2)``, which does not depend on the output bias, so
  ``find_unused_parameters=True``;
* ``ddp_order3``: the same with the third-derivative residual ``u_xxx + u_yyy - f`` and a
  boundary term (every parameter used, DDP's default flags);
* ``functional``: ``torch.func.grad`` over ``functional_call(ddp.module, params, ...)`` and an
  explicit ``all_reduce`` of the gradients (DDP's hooks never fire without its ``forward``);
* ``fsdp2``: ``fully_shard(PINNLoss(net))`` (FSDP2) on the module that calls the transform;
  gradients and parameters are gathered with ``full_tensor()``; ``fsdp2_order3``: the same
  with the third-derivative residual and ``reshard_after_forward=True``.

``test_torchrun_recipe`` runs the documented launch command itself,
``torchrun --standalone --nproc-per-node 2 docs/tutorials/ddp_pinn.py --check``, for a few steps.

The tests skip where ``torch.distributed`` or gloo is unavailable.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.func import grad

from tests._compare import assert_tree_close
from tests._pinn import (
    PINNLoss,
    batch,
    functional_loss,
    grads_of,
    make_net,
    oracle_loss,
    params_of,
)

WORLD = 2
STEPS = 2
LR = 0.05
SCENARIOS = ("ddp_laplacian", "ddp_order3", "functional", "fsdp2", "fsdp2_order3")
SPAWN_TIMEOUT_S = 150
RTOL, ATOL = 1e-9, 1e-12


def _unavailable() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this build of torch"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this build of torch"
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))


def _config(name: str) -> tuple[str, bool]:
    """(operator, boundary term) of a scenario."""
    return {"ddp_laplacian": ("laplacian", False), "ddp_order3": ("order3", True),
            "functional": ("laplacian", True), "fsdp2": ("laplacian", True),
            "fsdp2_order3": ("order3", True)}[name]


# ------------------------------------------------------------------------- the workers
def _full(t: Any) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _run_ddp(name: str, rank: int) -> list[dict[str, Any]]:
    operator, boundary = _config(name)
    net = make_net()
    ddp = nn.parallel.DistributedDataParallel(
        PINNLoss(net, operator, boundary), find_unused_parameters=not boundary)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    out = []
    for step in range(STEPS):
        x, xb = batch(step)
        opt.zero_grad()
        ddp(x.chunk(WORLD)[rank], xb.chunk(WORLD)[rank]).backward()
        g = grads_of(net)
        opt.step()
        out.append({"grads": g, "params": params_of(net)})
    return out


def _run_functional(name: str, rank: int) -> list[dict[str, Any]]:
    operator, boundary = _config(name)
    net = make_net()
    ddp = nn.parallel.DistributedDataParallel(net)  # broadcasts rank 0's parameters
    loss_grad = grad(functional_loss(ddp.module, operator, boundary))
    params = dict(ddp.module.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=LR)
    out = []
    for step in range(STEPS):
        x, xb = batch(step)
        g = loss_grad({k: p.detach() for k, p in params.items()},
                      x.chunk(WORLD)[rank], xb.chunk(WORLD)[rank])
        for k, v in g.items():  # DDP's hooks did not run: average by hand
            dist.all_reduce(v)
            v /= WORLD
            params[k].grad = v
        opt.step()
        out.append({"grads": {k: v.clone() for k, v in g.items()}, "params": params_of(net)})
    return out


def _run_fsdp2(name: str, rank: int) -> list[dict[str, Any]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    operator, boundary = _config(name)
    mesh = init_device_mesh("cpu", (WORLD,))
    net = make_net()
    model = PINNLoss(net, operator, boundary)
    # the module that calls the transform, not its layers (see docs/tutorials/ddp.rst)
    fully_shard(model, mesh=mesh, **({"reshard_after_forward": True}
                                     if name == "fsdp2_order3" else {}))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for step in range(STEPS):
        x, xb = batch(step)
        opt.zero_grad()
        model(x.chunk(WORLD)[rank], xb.chunk(WORLD)[rank]).backward()
        g = {k: (_full(p.grad) if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype))
             for k, p in net.named_parameters()}
        opt.step()
        out.append({"grads": g,
                    "params": {k: _full(p).detach().clone() for k, p in net.named_parameters()}})
    return out


_RUNNERS = {"ddp_laplacian": _run_ddp, "ddp_order3": _run_ddp, "functional": _run_functional,
            "fsdp2": _run_fsdp2, "fsdp2_order3": _run_fsdp2}


def _run_collectives(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Weights written by collectives between calls (``broadcast`` to start every rank from
    rank 0's weights, ``all_reduce`` to sum the models), which bump no version counter (NOTE
    [Unversioned writes]): per write, xafunc's Hessian (weights held, values hoisted) and
    nested ``jacrev``'s, computed after it."""
    from torch.func import jacrev

    import xafunc

    torch.manual_seed(10 + rank)  # different weights per rank
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    u = lambda x: net(x).squeeze(-1)  # noqa: E731
    x = torch.tensor([0.3, -0.2], dtype=torch.float64)
    out = []
    with torch.no_grad():
        xafunc.xhessian(u)(x)  # cached: the values hoisted from the weights
        for write in (dist.broadcast, dist.all_reduce):
            for p in net.parameters():
                write(p, 0) if write is dist.broadcast else write(p)
            with xafunc.strict():
                out.append((xafunc.xhessian(u)(x), jacrev(jacrev(u))(x)))
    return out


def _worker(rank: int, folder: str) -> None:
    """One rank: every scenario in turn, results to ``folder/rank{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results: dict[str, Any] = {}
        for name in SCENARIOS:
            t0 = time.perf_counter()
            results[name] = _RUNNERS[name](name, rank)
            results[name + ":seconds"] = time.perf_counter() - t0
        results["collectives"] = _run_collectives(rank)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the parent
def _single_process(name: str) -> list[dict[str, Any]]:
    """The same steps in one process on the whole batch, with ``loss.backward()``."""
    operator, boundary = _config(name)
    net = make_net()
    model = PINNLoss(net, operator, boundary)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    out = []
    for step in range(STEPS):
        x, xb = batch(step)
        opt.zero_grad()
        model(x, xb).backward()
        g = grads_of(net)
        opt.step()
        out.append({"grads": g, "params": params_of(net)})
    return out


def _spawn(folder: str) -> None:
    """Run the ranks to completion (their results in ``folder``); raises
    ``ProcessExitedException`` if a rank dies, ``pytest.fail`` past ``SPAWN_TIMEOUT_S``."""
    t0 = time.perf_counter()
    ctx = torch.multiprocessing.start_processes(
        _worker, args=(folder,), nprocs=WORLD, join=False, start_method="spawn")
    while not ctx.join(timeout=1.0):  # raises if a rank raised, with its traceback
        if time.perf_counter() - t0 > SPAWN_TIMEOUT_S:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    t0 = time.perf_counter()
    folder = str(tmp_path_factory.mktemp("ddp"))
    try:
        _spawn(folder)
    except torch.multiprocessing.ProcessExitedException as e:
        # gloo's C++ threads very rarely abort a rank (about 1 run in 10 on a busy 2-core
        # machine: SIGABRT, "terminate called without an active exception", inside DDP's
        # backward, no Python traceback). A rank that *raised* fails at once (ProcessRaised-
        # Exception); one killed by a signal gets one fresh try, and a second death fails.
        if e.signal_name is None:
            raise
        print(f"\n[distributed] rank {e.error_index} died by {e.signal_name}; spawning again")
        folder = str(tmp_path_factory.mktemp("ddp"))
        _spawn(folder)
    results = {r: torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(WORLD)}
    print(f"\n[distributed] {WORLD} ranks, spawn + all scenarios: "
          f"{time.perf_counter() - t0:.1f} s")
    return results


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_rank_matches_single_process(spawned: dict[int, dict[str, Any]],
                                           name: str) -> None:
    expected = _single_process(name)
    for rank in range(WORLD):
        got = spawned[rank][name]
        assert len(got) == STEPS
        for step in range(STEPS):
            for what in ("grads", "params"):
                a, e = got[step][what], expected[step][what]
                worst = max((a[k] - e[k]).abs().max().item() for k in e)
                print(f"[distributed] {name:13s} rank {rank} step {step} {what:6s} "
                      f"max |diff| vs one process: {worst:.2e} "
                      f"({spawned[rank][name + ':seconds']:.1f} s on this rank)")
                assert_tree_close(a, e, rtol=RTOL, atol=ATOL,
                                  msg=f"{name}, rank {rank}, step {step}, {what}")


@pytest.mark.parametrize("name", SCENARIOS)
def test_single_process_gradient_matches_torch_func(name: str) -> None:
    """The single-process reference is itself right: xafunc's parameter gradient of the loss
    equals the one through nested torch.func (``hessian`` / ``jacrev`` three times)."""
    operator, boundary = _config(name)
    net = make_net()
    x, xb = batch(0)
    PINNLoss(net, operator, boundary)(x, xb).backward()
    got = grads_of(net)
    net.zero_grad()
    oracle_loss(net, operator, boundary, x, xb).backward()
    assert_tree_close(got, grads_of(net), rtol=RTOL, atol=ATOL)


def test_ranks_saw_different_data(spawned: dict[int, dict[str, Any]]) -> None:
    """The check has teeth: before the all-reduce each rank's gradient differs, so equal
    gradients on both ranks mean they were averaged (not merely computed on the same data)."""
    operator, boundary = _config("ddp_laplacian")
    local = []
    for rank in range(WORLD):
        net = make_net()
        x, xb = batch(0)
        PINNLoss(net, operator, boundary)(x.chunk(WORLD)[rank], xb.chunk(WORLD)[rank]).backward()
        local.append(grads_of(net))
    with pytest.raises(AssertionError):
        assert_tree_close(local[0], local[1], rtol=RTOL, atol=ATOL)
    with pytest.raises(AssertionError):
        assert_tree_close(local[0], spawned[0]["ddp_laplacian"][0]["grads"], rtol=RTOL,
                          atol=ATOL)


def test_weights_written_by_collectives_are_seen(spawned: dict[int, dict[str, Any]]) -> None:
    """After ``dist.broadcast`` and ``dist.all_reduce`` wrote a model's weights (no version
    counter moves), each rank's derivative is that of the written weights, not one hoisted
    from its own initial ones (seeded apart); after the broadcast the ranks agree."""
    for rank in range(WORLD):
        for i, (got, expected) in enumerate(spawned[rank]["collectives"]):
            assert_tree_close(got, expected, rtol=RTOL, atol=ATOL,
                              msg=f"rank {rank}, after {('broadcast', 'all_reduce')[i]}")
    assert_tree_close(spawned[0]["collectives"][0][0], spawned[1]["collectives"][0][0],
                      rtol=RTOL, atol=ATOL)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_recipe() -> None:
    """The DDP recipe's script, launched as the docs say, passes its own gradient check."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(WORLD), os.path.join(ROOT, "docs", "tutorials", "ddp_pinn.py"), "--steps", "3",
           "--interior", "64", "--boundary", "16", "--backend", "gloo", "--check"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    checks = re.findall(r"\[rank \d+/\d+, gloo\] step 0: [^\n]*? \((?:ok|MISMATCH)\)", out)
    assert len(checks) == WORLD and all(c.endswith("(ok)") for c in checks), out[-4000:]
    print("\n" + "\n".join(checks))
