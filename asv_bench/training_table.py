"""Print the training-step table: xafunc vs the best torch.func step vs torch.compile'd torch.func.

    python asv_bench/training_table.py [--cases lap_2_64,...] [--apis backward,func_grad]
                                       [--dtype float32] [--repeat 7] [--sample-ms 50]
                                       [--compile inductor|aot_eager|none] [--threads N]
                                       [--compile-tries 3] [--xafunc-compile]
                                       [--json out.json]

Each case (``asv_bench/benchmarks/training_cases.py``) is a PINN training step -- forward and
backward of ``mean over the batch of (D u(x))^2`` for a Laplacian, a biharmonic or a
third-order operator, the transform called inline -- through two APIs: ``loss.backward()`` on
an ``nn.Module`` (``backward``) and ``torch.func.grad`` over ``functional_call`` parameters
(``func_grad``).

For every case and API:

1. **gradient check** (float64, 8 points): xafunc's parameter gradient against every
   torch.func strategy's; the largest relative difference is reported, and a case whose check
   fails is not timed;
2. **eager round-robin**: after one warm-up step each, every round takes one timing sample of
   xafunc -- with its transform built once before the loop (``xafunc``) and built inside every
   step (``xafunc inline``, the way torch.func users write ``vmap(hessian(u))(x)``) -- and
   then of every torch.func strategy (alternating the order); the median over
   ``--repeat`` rounds is reported per step. A sample is ``number`` back-to-back steps, chosen
   so that it lasts about ``--sample-ms``. A strategy whose estimated memory exceeds
   ``--mem-budget-gib`` or whose first step takes longer than ``--first-call-timeout`` seconds
   is *unavailable*;
3. **compiled**: the fastest eager torch.func strategy's loss (``backward``) or gradient
   function (``func_grad``) through ``torch.compile(backend=--compile)`` -- or, where dynamo
   cannot compile it (higher-order functorch nestings often fail), the next fastest, up to
   ``--compile-tries``; after its compile (timed and reported, as are the failures), a second
   round-robin of xafunc, that eager step and the compiled step.

With ``--xafunc-compile`` the round-robin also times ``"xafunc inline compile=True"``: the
inline transform with ``compile=True``, whose derivative graph and its backward run inductor's
code (its first-step time in brackets includes the compiles).

Ratios are xafunc / best eager torch.func, for both ways of building the transform, with the
issue's target (0.35 for Laplacians, 0.2 for order >= 3; ``pass`` needs both), and xafunc /
compiled. ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # the cases, and the xafunc of this checkout

from benchmarks.training_cases import (  # noqa: E402
    APIS,
    INLINE,
    INLINE_COMPILE,
    TRAIN_CASES,
    TrainCase,
    get_train_case,
    make_step,
    strategies,
)

import xafunc  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}
GRAD_RTOL = 1e-9
XAFUNC = ("xafunc", INLINE, INLINE_COMPILE)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(step: Callable[[], Any], number: int, device: str) -> float:
    """Seconds per step over ``number`` back-to-back steps."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(number):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / number


def _number(step: Callable[[], Any], sample_ms: float, device: str) -> int:
    best = min(_time(step, 1, device) for _ in range(3))
    return max(1, min(1000, math.ceil(sample_ms / 1e3 / max(best, 1e-9))))


def _round_robin(steps: dict[str, Callable[[], Any]], numbers: dict[str, int], repeat: int,
                 device: str) -> dict[str, float]:
    """Median ms per step of each, interleaved: one sample of each per round, the order of all
    but the first alternating between rounds."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeat):
        order = list(steps)
        if r % 2:
            order = order[:1] + order[1:][::-1]
        for k in order:
            times[k].append(_time(steps[k], numbers[k], device))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def grad_check(case: TrainCase, api: str, device: str) -> dict[str, Any]:
    """float64, 8 points: max relative difference of every torch.func strategy's (and of the
    inline xafunc step's) parameter gradient from xafunc's."""
    names = list(strategies(case, lambda p, z: z, torch.float64, device))
    names = names[:1] + [INLINE] + names[1:]
    grads = {}
    for name in names:
        step, g = make_step(case, name, api, torch.float64, device, batch=8)
        step()
        grads[name] = {k: v.detach().clone() for k, v in g().items()}
    ref = grads["xafunc"]
    worst = 0.0
    for name in names[1:]:
        for k, e in grads[name].items():
            scale = e.abs().max().clamp_min(1e-300)
            worst = max(worst, ((ref[k] - e).abs().max() / scale).item())
    return {"max_rel_diff": worst, "ok": worst <= GRAD_RTOL, "against": names[1:]}


def measure(case: TrainCase, api: str, opts: argparse.Namespace) -> dict[str, Any]:
    dtype, device = DTYPES[opts.dtype], opts.device
    rec: dict[str, Any] = {"case": case.name, "label": case.label, "operator": case.operator,
                           "widths": list(case.widths), "batch": case.batch, "api": api,
                           "target": case.target}
    rec["grad_check"] = grad_check(case, api, device)
    if not rec["grad_check"]["ok"]:
        rec["status"] = "gradient mismatch"
        return rec

    budget = opts.mem_budget_gib * 2**30
    steps: dict[str, Callable[[], Any]] = {}
    numbers: dict[str, int] = {}
    first: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    names = list(strategies(case, lambda p, z: z, dtype, device))
    ours = [INLINE, INLINE_COMPILE] if opts.xafunc_compile else [INLINE]
    for name in names[:1] + ours + names[1:]:
        est = case.estimated_bytes(name, dtype)
        if name not in XAFUNC and est > budget:
            unavailable[name] = f"estimated {est / 2**30:.1f} GiB > {opts.mem_budget_gib:g} GiB"
            continue
        step, _ = make_step(case, name, api, dtype, device)
        t0 = time.perf_counter()
        try:
            step()
        except (MemoryError, torch.OutOfMemoryError):
            unavailable[name] = "out of memory"
            continue
        first[name] = (time.perf_counter() - t0) * 1e3
        if name not in XAFUNC and first[name] > opts.first_call_timeout * 1e3:
            unavailable[name] = f"first step {first[name] / 1e3:.1f} s > limit"
            continue
        steps[name] = step
        numbers[name] = _number(step, opts.sample_ms, device)
    ms = _round_robin(steps, numbers, opts.repeat, device)
    base = {k: v for k, v in ms.items() if k not in XAFUNC}
    rec.update(xafunc_ms=ms["xafunc"], xafunc_inline_ms=ms[INLINE],
               xafunc_first_ms=first["xafunc"], strategies=ms, first_step_ms=first,
               unavailable=unavailable)
    if not base:
        rec["status"] = "no torch.func strategy available"
        return rec
    best = min(base, key=base.__getitem__)
    rec.update(best=best, best_ms=base[best], ratio=ms["xafunc"] / base[best],
               ratio_inline=ms[INLINE] / base[best], status="ok")
    # the issue's step is the inline one (the transform written inside the step)
    rec["pass"] = max(rec["ratio"], rec["ratio_inline"]) <= case.target
    if INLINE_COMPILE in ms:
        rec.update(xafunc_compile_ms=ms[INLINE_COMPILE],
                   ratio_compile=ms[INLINE_COMPILE] / base[best],
                   pass_compile=ms[INLINE_COMPILE] / base[best] <= case.target)

    if opts.compile != "none":
        compiled = _compile_best(case, api, sorted(base, key=base.__getitem__), opts, rec)
        if compiled is None:
            return rec
        name, cstep = compiled
        trio = {"xafunc": steps["xafunc"], name: steps[name], "compiled": cstep}
        nums = {"xafunc": numbers["xafunc"], name: numbers[name],
                "compiled": _number(cstep, opts.sample_ms, device)}
        ms2 = _round_robin(trio, nums, opts.repeat, device)
        rec.update(compiled_ms=ms2["compiled"], xafunc_ms_vs_compiled=ms2["xafunc"],
                   eager_ms_vs_compiled=ms2[name],
                   ratio_compiled=ms2["xafunc"] / ms2["compiled"])
    return rec


def _compile_best(case: TrainCase, api: str, ranked: list[str], opts: argparse.Namespace,
                  rec: dict[str, Any]) -> tuple[str, Callable[[], Any]] | None:
    """Compile the fastest eager torch.func strategies in turn (at most ``--compile-tries``)
    until one compiles; record the compile time and every failure (first line only)."""
    failures: dict[str, str] = {}
    rec["compile_failures"] = failures
    quiet = [logging.getLogger(n) for n in ("torch._subclasses.fake_tensor", "torch._dynamo")]
    levels = [lg.level for lg in quiet]
    for name in ranked[:opts.compile_tries]:
        cstep, _ = make_step(case, name, api, DTYPES[opts.dtype], opts.device,
                             compile_backend=opts.compile)
        t0 = time.perf_counter()
        try:
            for lg in quiet:  # dynamo logs whole tracebacks before it raises
                lg.setLevel(logging.CRITICAL)
            cstep()
            cstep()  # a second call: any recompile after the first lands here, not in timing
        except Exception as e:  # report, do not die: the eager numbers stand
            failures[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
            continue
        finally:
            for lg, lvl in zip(quiet, levels, strict=True):
                lg.setLevel(lvl)
        rec.update(compiled=name, compile_s=time.perf_counter() - t0)
        return name, cstep
    return None


def _f(ms: float | None) -> str:
    return "-" if ms is None else (f"{ms:.3g}" if ms < 100 else f"{ms:.0f}")


def print_table(records: list[dict[str, Any]], compile_backend: str) -> None:
    head = ["case", "api", "xafunc ms", "inline ms", "best torch.func", "ms", "ratio",
            "inline ratio", "target", "pass", f"compiled ({compile_backend}) ms",
            "xafunc/compiled", "grad check (max rel)", "xafunc compile=True ms (ratio)"]
    rows = []
    for r in records:
        gc = r["grad_check"]
        rows.append([
            r["label"], r["api"], _f(r.get("xafunc_ms")), _f(r.get("xafunc_inline_ms")),
            r.get("best", r.get("status", "-")), _f(r.get("best_ms")),
            "-" if "ratio" not in r else f"{r['ratio']:.2f}",
            "-" if "ratio_inline" not in r else f"{r['ratio_inline']:.2f}",
            f"<= {r['target']:.2f}", "-" if "pass" not in r else ("PASS" if r["pass"] else "fail"),
            ("failed" if r.get("compile_failures") else "-") if "compiled_ms" not in r
            else f"{_f(r['compiled_ms'])} ({r['compiled']})",
            "-" if "ratio_compiled" not in r else f"{r['ratio_compiled']:.2f}",
            f"{gc['max_rel_diff']:.1e} {'ok' if gc['ok'] else 'MISMATCH'}",
            "-" if "ratio_compile" not in r else
            f"{_f(r['xafunc_compile_ms'])} ({r['ratio_compile']:.2f}, "
            f"{'PASS' if r['pass_compile'] else 'fail'})",
        ])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=False)]

    def line(cells: list[Any]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    print("\nEvery strategy (median ms per step; first step incl. capture/trace in brackets):")
    for r in records:
        if "strategies" not in r:
            continue
        print(f"  {r['label']}  [{r['api']}]")
        for name, v in sorted(r["strategies"].items(), key=lambda kv: kv[1]):
            print(f"    {name:28s} {_f(v):>8s}  [{_f(r['first_step_ms'][name])}]")
        for name, why in r["unavailable"].items():
            print(f"    {name:28s} {'n/a':>8s}  unavailable: {why}")
        if "compiled_ms" in r:
            print(f"    {'compiled ' + r['compiled']:28s} {_f(r['compiled_ms']):>8s}  "
                  f"[compile {r['compile_s']:.1f} s]  (same round: xafunc "
                  f"{_f(r['xafunc_ms_vs_compiled'])}, eager {_f(r['eager_ms_vs_compiled'])})")
        for name, why in r.get("compile_failures", {}).items():
            print(f"    {'compiled ' + name:28s} {'n/a':>8s}  torch.compile failed: {why}")


def _meta(opts: argparse.Namespace) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=_HERE, check=False).stdout.strip() or None
    except OSError:
        commit = None
    dev = torch.cuda.get_device_name() if opts.device.startswith("cuda") else platform.processor()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": opts.device, "device_name": dev or platform.machine(), "dtype": opts.dtype,
            "repeat": opts.repeat, "sample_ms": opts.sample_ms, "compile": opts.compile,
            "torch": torch.__version__, "xafunc": xafunc.__version__, "commit": commit,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help="comma-separated (default: all); known: "
                    + ", ".join(c.name for c in TRAIN_CASES))
    ap.add_argument("--apis", default=",".join(APIS), help="backward,func_grad (default both)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--sample-ms", type=float, default=50.0)
    ap.add_argument("--compile", default="inductor",
                    help="torch.compile backend for the compiled baseline, or none")
    ap.add_argument("--compile-tries", type=int, default=3,
                    help="compile at most this many torch.func strategies, fastest eager "
                         "first, until one compiles (3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--xafunc-compile", action="store_true",
                    help="add the step with xafunc's compile=True (inductor's forward and "
                         "backward code for the derivative graph)")
    ap.add_argument("--mem-budget-gib", type=float, default=4.0)
    ap.add_argument("--first-call-timeout", type=float, default=20.0)
    ap.add_argument("--json", metavar="PATH")
    opts = ap.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    apis = [a.strip() for a in opts.apis.split(",")]
    for a in apis:
        if a not in APIS:
            ap.error(f"unknown api {a!r}; known: {', '.join(APIS)}")
    cases = [get_train_case(n.strip()) for n in opts.cases.split(",")] if opts.cases \
        else TRAIN_CASES
    meta = _meta(opts)
    print(f"xafunc {meta['xafunc']} ({meta['commit']}), torch {meta['torch']}, {opts.device} "
          f"{meta['device_name']}, {opts.dtype}, {meta['threads']} threads, median of "
          f"{opts.repeat}, samples of ~{opts.sample_ms:g} ms\n", flush=True)
    records = []
    with warnings.catch_warnings():
        # torch's own deprecation notices (torch.jit, inductor) would land between the rows
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        for case in cases:
            for api in apis:
                print(f"  measuring {case.label} [{api}] ...", file=sys.stderr, flush=True)
                records.append(measure(case, api, opts))
    print_table(records, opts.compile)
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"meta": meta, "cases": records}, fh, indent=1)
        print(f"\nwrote {opts.json}")
    return 0 if all(r["grad_check"]["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
