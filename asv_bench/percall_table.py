"""Per-call cost of the capture cache (issue 10): held vs inline transforms vs nested torch.func.

Every case times, in one process and interleaved (median of ``--repeat`` samples of ``number``
back-to-back calls):

* **held**: the transform built once, called in the loop;
* **inline**: the transform written in the loop, ``xderiv(f, k)(x)``, as users write it (a
  fresh lambda where the case says so);
* **torch.func**: the nested ``jacrev`` a user would write, inline.

Two further comparisons: a 50-layer ``nn.Sequential`` called through its module against the
same network written with plain tensors (``F.linear``), and a module whose parameters require
grad under grad mode against ``torch.no_grad()``. ``--first-call`` measures the README model's
first call in fresh processes (``import torch`` excluded, ``import xafunc`` and everything the
first call imports included).

    python asv_bench/percall_table.py [--repeat 9] [--first-call 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import xafunc


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _nest(f: Callable[..., Any], k: int, argnums: int = 0) -> Callable[..., Any]:
    for _ in range(k):
        f = jacrev(f, argnums=argnums)
    return f


def cases() -> dict[str, dict[str, Callable[[], Any]]]:
    torch.manual_seed(0)
    readme = _mlp([3, 64, 1])
    params = dict(readme.named_parameters())
    f = lambda p, x: functional_call(readme, p, (x,))  # noqa: E731
    x3 = torch.randn(3)
    held_readme = xafunc.xderiv(f, 3, argnums=1)

    pinn = _mlp([2, 128, 128, 128, 1])
    u = lambda x: pinn(x).squeeze(-1)  # noqa: E731
    x2 = torch.randn(2)
    held_pinn = xafunc.xderiv(u, 3)

    hs = _mlp([2, 64, 64, 1])
    xs = torch.randn(256, 2)
    held_hs = vmap(xafunc.xhessian(lambda x: hs(x).squeeze(-1)))

    deep = _mlp([16] + [32] * 49 + [1])
    weights = [p.detach() for p in deep.parameters()]

    def plain(x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(0, len(weights) - 2, 2):
            h = torch.tanh(F.linear(h, weights[i], weights[i + 1]))
        return F.linear(h, weights[-2], weights[-1]).squeeze(-1)

    x16 = torch.randn(16)
    return {
        "README model, order 3 (functional_call)": {
            "held": lambda: held_readme(params, x3),
            "inline": lambda: xafunc.xderiv(f, 3, argnums=1)(params, x3),
            "torch.func": lambda: _nest(f, 3, 1)(params, x3),
        },
        "PINN 2-128x3-1, order 3": {
            "held": lambda: held_pinn(x2),
            "inline": lambda: xafunc.xderiv(lambda x: pinn(x).squeeze(-1), 3)(x2),
            "torch.func": lambda: _nest(u, 3)(x2),
        },
        "per-sample Hessians, vmap 256, 2-64-64-1": {
            "held": lambda: held_hs(xs),
            "inline": lambda: vmap(xafunc.xhessian(lambda x: hs(x).squeeze(-1)))(xs),
            "torch.func": lambda: vmap(_nest(lambda x: hs(x).squeeze(-1), 2))(xs),
        },
        "50-layer Sequential, Hessian": {
            "module": lambda: xafunc.xhessian(lambda x: deep(x).squeeze(-1))(x16),
            "plain tensors": lambda: xafunc.xhessian(plain)(x16),
        },
        "PINN order 3, weights require grad": {
            "grad mode": lambda: xafunc.xderiv(u, 3)(x2),
            "no_grad": lambda: _no_grad(lambda: xafunc.xderiv(u, 3)(x2)),
        },
    }


def _no_grad(fn: Callable[[], Any]) -> Any:
    with torch.no_grad():
        return fn()


def measure(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up: capture, plan, compile
        fn()
        fn()
    number = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        number[name] = max(1, int(0.02 / max(time.perf_counter() - t, 1e-6)))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            n = number[name]
            t = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t) / n)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


FIRST_CALL = """
import time, torch
t0 = time.perf_counter()
from torch.func import functional_call
import xafunc
model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
params = dict(model.named_parameters())
f = lambda p, x: functional_call(model, p, (x,))
d3 = xafunc.xderiv(f, order=3, argnums=1)(params, torch.randn(3))
print(time.perf_counter() - t0)
"""


def first_call(runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        res = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True,
                             check=True)
        out.append(float(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--first-call", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    for case, fns in cases().items():
        times = measure(fns, args.repeat)
        results[case] = times
        names = list(times)
        base = times[names[-1]]
        cells = ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
        ratios = ", ".join(f"{k}/{names[-1]} {times[k] / base:.2f}" for k in names[:-1])
        extra = ""
        if "held" in times:
            extra = f", inline - held {1e3 * (times['inline'] - times['held']):.0f} us"
        print(f"{case}: {cells}; {ratios}{extra}", flush=True)
    if args.first_call:
        fc = first_call(args.first_call)
        results["first call (README model, s)"] = fc
        print(f"first call, README model (import xafunc + first call, fresh process): "
              f"median {statistics.median(fc):.2f} s of {[round(v, 2) for v in fc]}")
    print(xafunc.cache_info())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
