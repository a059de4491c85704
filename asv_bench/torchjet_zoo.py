"""torch-jet anchor for the zoo's Taylor-mode cases, as JSON for ``zoo_table.py --merge``.

torch-jet (PyPI ``jet-for-pytorch``, Dangel et al., "Collapsing Taylor Mode Automatic
Differentiation", NeurIPS 2025) is a cross-framework reference, never a dependency of xafunc.
It needs Python >= 3.12 and torch >= 2.10, so it runs in its own virtual environment, on the
*same PyTorch models and weights* as the zoo (it imports ``asv_bench/benchmarks/zoo.py``, hence
this checkout on ``PYTHONPATH`` and opt_einsum)::

    ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/jetenv
    /tmp/jetenv/bin/pip install torch==2.13.0 jet-for-pytorch opt_einsum   # see below
    PYTHONPATH=. /tmp/jetenv/bin/python asv_bench/torchjet_zoo.py --json torchjet.json
    python asv_bench/zoo_table.py --load zoo.json --merge torchjet.json

Anchors (the zoo cases torch-jet can express: Laplacian, biharmonic, jet): ``fourier_pinn``,
``vmap_laplacian``, ``biharmonic``, ``jet6``. Strategies, each as torch-jet's own benchmark
(``jet/exp/exp01_benchmark_laplacian``) builds it -- the operator traced once on a mock input
(``capture_graph``), common subexpressions eliminated, then ``torch.func.vmap`` over the batch:

* ``jet.laplacian`` / ``jet.bilaplacian``, collapsed Taylor mode (the paper's method) and
  standard Taylor mode (``collapsed=False``);
* ``jet.jet`` along one direction with the series ``(v, 0, ..., 0)`` for ``jet6`` (traced
  and simplified the same way).

torch-jet transforms need a mock input and a trace, so they are built once (held), unlike the
zoo's inline calls. Each result is checked against torch.func on the same model (the zoo's
first baseline) before timing; timing is as in ``zoo_table.py`` (interleaved rounds, samples of
about ``--sample-ms``, median of ``--repeat``).

On the project's CPU machines the only torch wheel on disk is for CPython 3.11 and no CPU
build for cp312 is reachable, so the environment above gets PyPI's CUDA build of torch 2.13.0
for cp312 (about 3 GB of ``nvidia-*`` packages); it runs these CPU cases unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.func as tf

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

from benchmarks.cases import DTYPES  # noqa: E402
from benchmarks.zoo import ZOO_BY_NAME  # noqa: E402

#: zoo cases torch-jet can express, and the torch-jet operator for each
ANCHORS = {"fourier_pinn": "laplacian", "vmap_laplacian": "laplacian",
           "biharmonic": "bilaplacian", "jet6": "jet"}


def _simplified(op: Callable[..., Any], *mock: torch.Tensor) -> Callable[..., Any]:
    """torch-jet's pipeline: trace the operator, eliminate common subexpressions."""
    from jet import capture_graph, common_subexpression_elimination

    mod, _ = capture_graph(op, mock)
    common_subexpression_elimination(mod.graph)
    mod.recompile()
    return mod


def strategies(name: str, f: Callable[..., Any], args: tuple, batch: int | None
               ) -> dict[str, Callable[..., Any]]:
    import jet

    mock = args[0][0] if batch else args[0]
    out: dict[str, Callable[..., Any]] = {}
    kind = ANCHORS[name]
    if kind in ("laplacian", "bilaplacian"):
        op = jet.laplacian if kind == "laplacian" else jet.bilaplacian
        for collapsed in (True, False):
            label = f"jet.{kind} ({'collapsed' if collapsed else 'standard'}, CSE)"
            g = _simplified(op(f, (mock,), collapsed=collapsed), mock)
            out[label] = tf.vmap(g) if batch else g
    else:
        k = ZOO_BY_NAME[name].order
        jet_f = jet.jet(f, (mock,))

        def line(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            zeros = [torch.zeros_like(x)] * (k - 1)
            return jet_f((x, v, *zeros))[-1]

        # two distinct mock tensors: one object passed twice is traced as aliased inputs
        out["jet.jet (standard, CSE)"] = _simplified(line, mock, mock.clone())
    return out


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)
            ).item()


def measure(name: str, opts: argparse.Namespace) -> dict[str, Any]:
    from ratio_table import Runner, _number

    case = ZOO_BY_NAME[name]
    dtype = DTYPES[opts.dtype]
    runner = Runner(opts.device)
    built = case.build(dtype, opts.device)
    args = built.args
    f = case.model(dtype, opts.device).f
    rec: dict[str, Any] = {"anchor": name, "strategies": {}}
    ref_name = built.recommended if built.recommended in built.baselines else \
        next(iter(built.baselines))
    ref = built.baselines[ref_name](*args)
    tol = min(2e-2, 2e-4 * 4 ** (case.order - 1))
    fns: dict[str, Callable[..., Any]] = {}
    try:
        made = strategies(name, f, args, case.batch)
    except Exception as e:  # an op without a torch-jet rule, ...
        rec.update(status="unavailable", reason=f"{type(e).__name__}: {str(e)[:200]}",
                   best=None, best_ms=None, compile_s=None)
        return rec
    for label, fn in made.items():
        s: dict[str, Any] = {"ms": None, "status": "ok"}
        rec["strategies"][label] = s
        try:
            t0 = time.perf_counter()
            out = fn(*args)
            runner.sync()
            s["first_call_s"] = time.perf_counter() - t0
        except Exception as e:
            s["status"], s["reason"] = "unavailable", f"{type(e).__name__}: {str(e)[:200]}"
            continue
        err = _rel_error(out, ref)
        s["rel_error_vs_" + ref_name] = err
        if not err <= tol:
            s["status"], s["reason"] = "disagrees", f"relative error {err:.2e} vs {ref_name}"
            print(f"*** {name}: {label} disagrees with torch.func {ref_name} ({err:.2e})",
                  file=sys.stderr)
            continue
        fns[label] = fn
    numbers = {k: _number(opts, runner, fn, args) for k, fn in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(opts.repeat):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[k].append(runner.call(fns[k], args, numbers[k])[0])
    for k, ts in times.items():
        rec["strategies"][k].update(ms=statistics.median(ts) * 1e3, number=numbers[k])
    ok = {k: s["ms"] for k, s in rec["strategies"].items() if s["ms"] is not None}
    if ok:
        best = min(ok, key=ok.__getitem__)
        rec.update(best=best, best_ms=ok[best], status="ok",
                   compile_s=rec["strategies"][best]["first_call_s"])
    else:
        rec.update(best=None, best_ms=None, compile_s=None, status="unavailable",
                   reason="; ".join(f"{k}: {s.get('reason')}"
                                    for k, s in rec["strategies"].items()))
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help=f"comma-separated, from {', '.join(ANCHORS)} (default all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--number", default="auto")
    ap.add_argument("--sample-ms", type=float, default=20.0)
    ap.add_argument("--json", metavar="PATH")
    opts = ap.parse_args(argv)
    import jet

    names = [n.strip() for n in opts.cases.split(",")] if opts.cases else list(ANCHORS)
    for n in names:
        if n not in ANCHORS:
            ap.error(f"torch-jet has no anchor {n!r}; choose from {', '.join(ANCHORS)}")
    try:
        from importlib.metadata import version
        jet_version = version("jet-for-pytorch")
    except Exception:  # not installed as a distribution (a source checkout)
        jet_version = getattr(jet, "__version__", "unknown")
    meta = {"framework": "torch-jet", "torch_jet": jet_version, "torch": torch.__version__,
            "device": opts.device, "dtype": opts.dtype, "repeat": opts.repeat,
            "number": opts.number, "sample_ms": opts.sample_ms,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "script": "torchjet_zoo.py"}
    print(f"torch-jet {jet_version}, torch {torch.__version__}, {opts.device} {opts.dtype}, "
          f"median of {opts.repeat}\n")
    out = {}
    for n in names:
        print(f"  {n} ...", file=sys.stderr, flush=True)
        out[n] = rec = measure(n, opts)
        head = f"{rec['best']} {rec['best_ms']:.3g} ms" if rec.get("best") else \
            f"unavailable: {rec.get('reason')}"
        print(f"{n:16s} {head}")
        for k, s in rec["strategies"].items():
            val = f"{s['ms']:.3g} ms" if s["ms"] is not None else \
                f"n/a ({s['status']}: {s.get('reason')})"
            print(f"    {k:44s} {val}")
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"meta": meta, "anchors": out}, fh, indent=1)
        print(f"\nwrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
