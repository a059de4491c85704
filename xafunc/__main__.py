"""``python -m xafunc``: the demo.

Third derivatives of a small built-in model (a tanh MLP R^3 -> R^2, the shape of a
physics-informed network) with respect to its input, checked against nested torch.func, with
the median time of both.
"""

from __future__ import annotations

import argparse
import time

import torch


def _median_time(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    from torch.func import functional_call, jacfwd, jacrev

    import xafunc

    parser = argparse.ArgumentParser(prog="python -m xafunc", description=__doc__)
    parser.add_argument("--order", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=7)
    opts = parser.parse_args(argv)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 2),
    ).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, dtype=torch.float64)

    def model_fn(p, x):  # type: ignore[no-untyped-def]
        return functional_call(model, p, (x,))

    k = opts.order
    ours = xafunc.xderiv(model_fn, order=k, argnums=1)
    ref = jacrev(model_fn, argnums=1)
    for _ in range(k - 1):
        ref = jacfwd(ref, argnums=1)

    d_ours = ours(params, x)
    d_ref = ref(params, x)
    err = (d_ours - d_ref).abs().max().item()
    print(f"model: tanh MLP 3 -> 64 -> 64 -> 2 (float64); derivative order {k} w.r.t. the input")
    print(f"result shape: {tuple(d_ours.shape)}  (out.shape + in.shape * {k})")
    print("D^k f[0, 0, ..., 0] =", d_ours.reshape(2, -1)[0, 0].item())
    print(f"max |xafunc - torch.func| = {err:.3e}")
    print(xafunc.plan(model_fn, order=k, argnums=1)(params, x))
    t_ours = _median_time(lambda: ours(params, x), opts.repeat)
    t_ref = _median_time(lambda: ref(params, x), opts.repeat)
    print(f"median of {opts.repeat}: xafunc {t_ours * 1e3:.2f} ms, "
          f"torch.func jacfwd^{k - 1}(jacrev) {t_ref * 1e3:.2f} ms, ratio {t_ours / t_ref:.2f}")
    if not torch.allclose(d_ours, d_ref, rtol=1e-9, atol=1e-10):
        print("MISMATCH against torch.func")
        return 1
    print("check against torch.func: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
