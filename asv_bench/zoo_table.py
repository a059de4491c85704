"""Print the zoo table: xafunc against torch.func and torch.compile on the model zoo (issue 11).

    python asv_bench/zoo_table.py                                  # every case, CPU float32
    python asv_bench/zoo_table.py --cases 'mlp_hessian_*,siren' --repeat 15 --json zoo.json
    python asv_bench/zoo_table.py --no-compile --cases models      # skip torch.compile
    python asv_bench/zoo_table.py --device cuda                    # on a GPU
    python asv_bench/zoo_table.py --cases 'mlp_order3_mv' --xafunc-compile  # + compile=True
    python asv_bench/zoo_table.py --load zoo.json --merge jax.json --merge torchjet.json

The cases (``asv_bench/benchmarks/zoo.py``, shapes in ``benchmarks/zoo_spec.py``) are tanh MLPs
in every formulation (``W @ x + b``, ``x @ W.T + b``, ``F.linear``, ``nn.Linear`` through
``functional_call`` and called directly, ``einsum``, ``addmv``, ``addmm``, batched
``matmul``/``bmm``/``baddbmm``, under ``vmap``) for six requests, and fourteen other models
(``--list`` prints them). ``--cases`` takes names, shell patterns (``'mlp_*_vmap'``) and the
groups ``mlp`` and ``models``.

Per case, in one process:

1. Every strategy is called **inline**, as users write it: ``xafunc.xderiv(f, 3)(x)``,
   ``jacrev(jacrev(f))(x)``, ``vmap(xafunc.xhessian(f))(xs)``, the transform built inside the
   timed call. xafunc's first call in the process is reported as *first call*; the same
   transform built once and reused (*held*) is timed beside it as a diagnostic (capture and
   planning cost versus engine cost).
2. The torch.func strategies are every ``jacfwd``/``jacrev`` nesting up to order 3 (a subset at
   order 4), ``hessian`` at order 2, the trace of ``hessian``/``jacrev(jacrev)`` and vmapped
   Hessian-vector products for Laplacians, nested ``jvp`` for jets. A strategy is
   *unavailable* when its estimated intermediates exceed ``--mem-budget-gib``, its first call
   takes longer than ``--first-call-timeout`` seconds, or it fails (out of memory or an error;
   the reason is recorded).
3. **Correctness before timing**: xafunc's result is compared with every available strategy's
   (float32 tolerance growing with the order). A strategy that disagrees is flagged and never
   counted as *best*; if xafunc agrees with none, the case is reported as ``MISMATCH`` on
   stderr and in the table, and xafunc is not timed.
4. The fastest agreeing eager strategy (after warm-up, fastest of three calls) is compiled
   with ``torch.compile(mode="default")`` after ``torch._dynamo.reset()``; its first call is
   the *compile time*, reported separately. Timing then runs under
   ``torch.compiler.set_stance("fail_on_recompile")``: a recompile drops the column with the
   reason instead of timing a recompiling function. ``--no-compile`` skips this column.
5. Interleaved timing: every round takes one sample of each strategy (order alternating), a
   sample being ``number`` back-to-back calls (``--number auto``: about ``--sample-ms`` each);
   the median over ``--repeat`` rounds is reported per call (helpers shared with
   ``ratio_table.py``).
   With ``--xafunc-compile``, xafunc with ``compile=True`` (its plain fast path compiled by
   inductor, NOTE [Inductor executor]) is one more interleaved strategy: its first two calls
   (plan, trace and inductor compile, which waits for the second call where the weights
   require grad; the capture is shared with the plain xafunc column) are timed apart and the
   inductor compile time read from ``InductorStats``; its result is checked like
   the others', and the column says whether the timed calls ran inductor's code.
6. Peak memory of one call per strategy: ``torch.cuda.max_memory_allocated`` on CUDA, the
   profiler's memory events on CPU (``ratio_table.cpu_peak_bytes``), after the timing; for
   xafunc on a CPU plus the largest block of intermediates a static runtime allocates inside
   its run (NOTE [Static runtime]), which those events do not see.

Printed: per case xafunc's time, the plan it chose (``xafunc.plan``: strategy and schedule,
the fallback reason if any), the best torch.func strategy and the ratio, the torch.compile'd
strategy's steady-state time and ratio with its compile time, peaks and ``peak <= best``;
then the geometric means issue 11 sets targets on (all cases <= 0.25; order >= 3 <= 0.10;
order >= 2 against torch.compile <= 0.7; the parameter Hessian <= 0.6 x ``torch.func.hessian``)
and the spread across the MLP formulations (<= 1.3x).

Cross-framework anchors run in their own environments (never dependencies of xafunc) and write
JSON that ``--merge`` adds as columns: ``asv_bench/jax_zoo.py`` (JAX ``jit`` of nested
``jacfwd``/``jacrev``, ``jax.hessian``, ``jax.experimental.jet``) and
``asv_bench/torchjet_zoo.py`` (torch-jet, Python >= 3.12). Their timings come from another
process, so those ratios are less precise than the interleaved ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # the zoo, and the xafunc of this checkout

from benchmarks.cases import DTYPES  # noqa: E402
from benchmarks.zoo import ZOO, Built, ZooCase, select  # noqa: E402
from benchmarks.zoo_spec import FORMULATIONS  # noqa: E402
from ratio_table import (  # noqa: E402
    Runner,
    _fmt_bytes,
    _fmt_ms,
    _is_oom,
    _meta,
    _number,
    _Timeout,
    _warm_up_torch_func,
    cpu_peak_bytes,
    time_limit,
)

#: issue 11's targets (CPU float32, steady state, inline calls)
TARGETS = {"case": 1.0, "geomean_all": 0.25, "geomean_order3": 0.10,
           "geomean_compile_order2": 0.7, "param_hessian_vs_hessian": 0.6,
           "formulation_spread": 1.3}


# --------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------


def tolerance(order: int) -> float:
    """Relative tolerance (max abs error over max abs value) of a float32 result of ``order``."""
    return min(2e-2, 2e-4 * 4 ** (order - 1))


def rel_error(got: Any, ref: Any) -> tuple[float, str | None]:
    """``max |got - ref| / max |ref|`` over every leaf, or ``(inf, why)`` when the pytrees or
    shapes differ."""
    g, gs = pytree.tree_flatten(got)
    r, rs = pytree.tree_flatten(ref)
    if gs != rs:
        return math.inf, f"structure {gs} vs {rs}"
    num = den = 0.0
    for a, b in zip(g, r, strict=True):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            continue
        if a.shape != b.shape:
            return math.inf, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        a64, b64 = a.detach().double(), b.detach().double()
        if not torch.isfinite(a64).all():
            return math.inf, "non-finite values"
        if a64.numel():
            num = max(num, (a64 - b64).abs().max().item())
            den = max(den, b64.abs().max().item())
    return num / max(den, 1e-30), None


# --------------------------------------------------------------------------------------------
# measuring one case
# --------------------------------------------------------------------------------------------


def _why(e: BaseException) -> str:
    if _is_oom(e):
        return "out of memory"
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def _plan_info(built: Built) -> dict[str, Any]:
    if built.plan is None:
        return {"plan_short": "- (no plan API)", "plan": None, "strategy": None,
                "schedule": None, "fallback": None}
    try:
        p = built.plan()
    except Exception as e:  # the table must not die on a planner bug
        return {"plan_short": f"plan failed: {_why(e)}", "plan": traceback.format_exc(),
                "strategy": None, "schedule": None, "fallback": None}
    sched = tuple(getattr(p, "schedule", ()) or ())
    short = str(p.strategy) + (f" ({'>'.join(sched)})" if sched else "")
    return {"plan_short": short, "plan": str(p), "strategy": str(p.strategy),
            "schedule": list(sched), "fallback": p.fallback}


def _first_call(runner: Runner, fn: Callable[..., Any], args: tuple, limit: float
                ) -> tuple[Any, float]:
    """``(result, seconds)`` of one call, under a time limit in seconds (raises _Timeout;
    ``math.inf``: none)."""
    with time_limit(0 if math.isinf(limit) else limit):
        runner.sync()
        t0 = time.perf_counter()
        out = fn(*args)
        runner.sync()
    return out, time.perf_counter() - t0


_PHASE_FILE: str | None = None


def _phase(name: str) -> None:
    """Record what the worker is doing, so that a crash (a segfault in compiled code, say) can
    be attributed by the parent process."""
    if _PHASE_FILE:
        with open(_PHASE_FILE, "w") as fh:
            fh.write(name)


def _static_runtime_blocks() -> Callable[[], int]:
    """Record the static runtimes xafunc builds from now on (NOTE [Static runtime]); the
    returned function gives the largest block of planned intermediates one of them allocates
    inside its run. The profiler's memory events do not see that block, so it is read from
    the runtime's own report (``StaticModule.benchmark`` prints it) on a copy of each."""
    from xafunc._execute import executable

    built: list[tuple[Any, list[torch.Tensor]]] = []
    # the library's own function, also when an earlier case of this process wrapped it
    real = getattr(executable._static_runtime, "__wrapped__", executable._static_runtime)

    def record(traced: Any, inputs: tuple[Any, ...]) -> Any:
        run = real(traced, inputs)
        if run is not None:
            built.append((torch._C._jit_to_static_module(traced.graph.copy()),
                          [t.detach() for t in inputs]))
        return run

    record.__wrapped__ = real  # type: ignore[attr-defined]
    executable._static_runtime = record
    known: list[int] = []

    def largest() -> int:
        if known:  # read once per case
            return known[0]
        most = 0
        for module, inputs in built:
            sys.stdout.flush()
            with tempfile.TemporaryFile() as tmp:
                saved = os.dup(1)
                os.dup2(tmp.fileno(), 1)
                try:
                    module.benchmark(inputs, {}, 1, 1)
                finally:
                    os.dup2(saved, 1)
                    os.close(saved)
                tmp.seek(0)
                text = tmp.read().decode(errors="replace")
            found = re.search(r"Total memory managed: (\d+) bytes", text)
            most = max(most, int(found.group(1)) if found else 0)
        known.append(most)
        return most

    return largest


def measure_case(case: ZooCase, opts: argparse.Namespace) -> dict[str, Any]:
    """Measure one case in this process (see the module docstring); a JSON-able record."""
    _phase("build")
    static_blocks = _static_runtime_blocks()
    dtype, device = DTYPES[opts.dtype], opts.device
    runner = Runner(device)
    built = case.build(dtype, device)
    args = built.args
    budget = int(opts.mem_budget_gib * 2**30)
    tol = tolerance(case.order)
    rec: dict[str, Any] = {
        "name": case.name, "label": case.label, "title": case.title, "group": case.group,
        "request": case.request, "order": case.order, "batch": case.batch,
        "formulation": case.formulation, "mlp_request": case.mlp_request, "anchor": case.anchor,
        "sizes": case.sizes, "recommended": built.recommended, "tolerance": tol,
    }

    # 1. xafunc, first call of the process for this function (capture + plan + run)
    _phase("xafunc first call")
    xres = None
    try:
        xres, dt = _first_call(runner, built.xafunc, args, math.inf)
        rec["xafunc_first_call_ms"] = dt * 1e3
        rec["xafunc_error"] = None
        xres = built.project(xres)
    except Exception as e:
        rec["xafunc_first_call_ms"] = None
        rec["xafunc_error"] = _why(e)
        rec["xafunc_traceback"] = traceback.format_exc()
    # after the first call: it may time close candidates and keep another schedule
    rec.update(_plan_info(built))

    # 2. every eager torch.func strategy: warm-up, availability, correctness
    fns: dict[str, Callable[..., Any]] = {}
    first: dict[str, float] = {}
    baselines: dict[str, dict[str, Any]] = {}
    for name, fn in built.baselines.items():
        _phase(f"eager {name}")
        b: dict[str, Any] = {"estimated_bytes": built.estimates[name], "ms": None,
                             "status": "ok", "reason": None, "peak_bytes": None,
                             "rel_error": None}
        baselines[name] = b
        if b["estimated_bytes"] > budget:
            b["status"] = "unavailable"
            b["reason"] = (f"estimated {b['estimated_bytes'] / 2**30:.1f} GiB > budget "
                           f"{opts.mem_budget_gib:g} GiB")
            continue
        try:
            out, dt = _first_call(runner, fn, args, opts.first_call_timeout)
        except _Timeout:
            b["status"], b["reason"] = "unavailable", f"first call > {opts.first_call_timeout:g} s"
            continue
        except Exception as e:
            b["status"], b["reason"] = "unavailable", _why(e)
            if runner.cuda:
                torch.cuda.empty_cache()
            continue
        b["first_call_ms"] = dt * 1e3
        if dt > opts.first_call_timeout:
            b["status"], b["reason"] = "unavailable", f"first call {dt:.1f} s > limit"
            continue
        if xres is not None:
            err, why = rel_error(xres, out)
            b["rel_error"] = err
            if not err <= tol:
                b["status"] = "disagrees"
                b["reason"] = why or f"relative error {err:.2e} > {tol:.0e} against xafunc"
        del out
        fns[name] = fn
        first[name] = dt

    agreeing = [k for k in fns if baselines[k]["status"] == "ok"]
    if rec["xafunc_error"]:
        rec["check"] = "xafunc failed"
    elif not fns:
        rec["check"] = "no baseline"
    elif not agreeing:
        rec["check"] = "MISMATCH"
    elif len(agreeing) < len(fns):
        rec["check"] = f"partial ({len(agreeing)}/{len(fns)})"
    else:
        rec["check"] = "ok"
    if rec["check"] == "MISMATCH" or rec["check"].startswith("partial"):
        errs = ", ".join(f"{k}: {baselines[k]['reason']}" for k in fns
                         if baselines[k]["status"] != "ok")
        print(f"\n*** {case.name}: xafunc DISAGREES with {errs}\n", file=sys.stderr, flush=True)
    if rec["check"] == "xafunc failed":
        print(f"\n*** {case.name}: xafunc raised {rec['xafunc_error']}\n", file=sys.stderr,
              flush=True)

    _phase("calibration")
    timed: dict[str, Callable[..., Any]] = {}
    if rec["check"] not in ("MISMATCH", "xafunc failed"):
        timed["xafunc"] = built.xafunc
        if not opts.no_held:
            try:
                built.held(*args)  # capture + plan once
                timed["xafunc (held)"] = built.held
            except Exception as e:  # pragma: no cover - inline worked, so this should too
                rec["held_error"] = _why(e)
    xc: dict[str, Any] = {"status": None, "reason": None, "first_call_s": None,
                          "inductor_s": None, "inductor": None, "ms": None, "rel_error": None}
    rec["xafunc_compile"] = xc
    if not opts.xafunc_compile:
        xc["status"], xc["reason"] = "skipped", "no --xafunc-compile"
    elif "xafunc" not in timed or built.xafunc_compile is None:
        xc["status"], xc["reason"] = "unavailable", "xafunc itself is not timed"
    else:
        _phase("xafunc compile=True first call")
        from xafunc._execute.executable import InductorStats

        print("    xafunc compile=True: compiling ...", file=sys.stderr, flush=True)
        seconds, failures = InductorStats.seconds, InductorStats.failures
        try:
            out, dt = _first_call(runner, built.xafunc_compile, args, opts.compile_timeout)
            err, why = rel_error(built.project(out), xres) if xres is not None else (0.0, None)
            xc["rel_error"] = err
            del out
            t0 = time.perf_counter()
            built.xafunc_compile(*args)  # (weights that require grad: this call compiles)
            xc["first_call_s"] = dt + time.perf_counter() - t0
            xc["inductor_s"] = InductorStats.seconds - seconds
            calls = InductorStats.calls
            built.xafunc_compile(*args)
            xc["inductor"] = InductorStats.calls > calls
            if InductorStats.failures > failures:
                xc["reason"] = "inductor failed, TorchScript runs it"
            elif not xc["inductor"]:
                xc["reason"] = "inductor does not run the timed calls"
            if built.plan_compile is not None:  # the schedule it kept, what ran it
                p = built.plan_compile()
                xc["schedule"] = list(p.schedule)
                xc["execution"] = p.execution
                xc["notes"] = list(getattr(p.program, "notes", []))
            if not err <= tol:
                xc["status"] = "disagrees"
                xc["reason"] = why or f"relative error {err:.2e} > {tol:.0e}"
            else:
                xc["status"] = "ok"
                timed["xafunc compile=True"] = built.xafunc_compile
        except _Timeout:
            xc["status"], xc["reason"] = "unavailable", f"first call > {opts.compile_timeout:g} s"
        except Exception as e:
            xc["status"], xc["reason"] = "unavailable", _why(e)
    timed.update(fns)
    numbers = {k: _number(opts, runner, fn, args) for k, fn in timed.items()}
    calib = {k: runner.call(fn, args)[0] for k, fn in fns.items()}

    # 3. torch.compile of the fastest agreeing eager strategy
    comp: dict[str, Any] = {"of": None, "ms": None, "compile_s": None, "status": None,
                            "reason": None, "peak_bytes": None}
    rec["compile"] = comp
    if opts.no_compile:
        comp["status"], comp["reason"] = "skipped", "--no-compile"
    elif not agreeing:
        comp["status"], comp["reason"] = "unavailable", "no agreeing eager strategy"
    else:
        best0 = min(agreeing, key=calib.__getitem__)
        comp["of"] = best0
        _phase(f"torch.compile of {best0}")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cfn = torch.compile(built.baselines[best0], mode="default")
        print(f"    compiling {best0} ...", file=sys.stderr, flush=True)
        try:
            out, dt = _first_call(runner, cfn, args, opts.compile_timeout)
            comp["compile_s"] = dt
            err, why = rel_error(out, xres) if xres is not None else (0.0, None)
            comp["rel_error"] = err
            del out
            breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
            comp["graph_breaks"] = breaks
            if not err <= tol:
                comp["status"] = "disagrees"
                comp["reason"] = why or f"relative error {err:.2e} > {tol:.0e}"
            else:
                comp["status"] = "ok"
                with torch.compiler.set_stance("fail_on_recompile"):
                    numbers["torch.compile"] = _number(opts, runner, cfn, args)
                timed["torch.compile"] = cfn
        except _Timeout:
            comp["status"], comp["reason"] = "unavailable", \
                f"compile > {opts.compile_timeout:g} s"
        except Exception as e:
            comp["status"], comp["reason"] = "unavailable", _why(e)

    # 4. interleaved rounds
    _phase("timing")
    times: dict[str, list[float]] = {k: [] for k in timed}
    faults: dict[str, list[float]] = {k: [] for k in timed}
    cuda_peaks: dict[str, int] = {}
    with torch.compiler.set_stance("fail_on_recompile"):
        for r in range(opts.repeat):
            order = list(timed)
            if r % 2:
                order = order[:1] + order[1:][::-1]
            for k in order:
                if k not in timed:
                    continue
                _phase(f"timing {k}")
                try:
                    dt, peak = runner.call(timed[k], args, numbers[k])
                except Exception as e:
                    if k != "torch.compile":
                        raise
                    comp["status"], comp["reason"] = "unavailable", \
                        f"during timing: {_why(e)}"
                    del timed[k]
                    times.pop(k)
                    continue
                times[k].append(dt)
                faults[k].append(runner.faults)
                if peak is not None:
                    cuda_peaks[k] = max(cuda_peaks.get(k, 0), peak)
        # 5. peaks
        _phase("peak memory")
        peaks: dict[str, int | None] = {}
        peak_errors: dict[str, str] = {}
        for k, fn in timed.items():
            _phase(f"peak memory {k}")
            try:
                peaks[k] = cuda_peaks.get(k) if runner.cuda else cpu_peak_bytes(fn, args)
                if not runner.cuda and k in ("xafunc", "xafunc (held)"):
                    peaks[k] = (peaks[k] or 0) + static_blocks()
            except Exception as e:  # torch's own bugs under the profiler: no peak, no crash
                peaks[k] = None
                peak_errors[k] = _why(e)

    med = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
    flt = {k: statistics.median(v) for k, v in faults.items() if v}
    rec["xafunc_ms"] = med.get("xafunc")
    rec["xafunc_held_ms"] = med.get("xafunc (held)")
    rec["xafunc_number"] = numbers.get("xafunc")
    rec["xafunc_peak_bytes"] = peaks.get("xafunc")
    rec["xafunc_faults"] = flt.get("xafunc")
    for name, b in baselines.items():
        if name in med:
            b["ms"], b["peak_bytes"], b["number"] = med[name], peaks.get(name), numbers[name]
            b["faults"] = flt[name]
        if name in peak_errors:
            b["peak_error"] = peak_errors[name]
    if "torch.compile" in med:
        comp["ms"], comp["peak_bytes"] = med["torch.compile"], peaks.get("torch.compile")
        comp["faults"] = flt["torch.compile"]
    if "xafunc compile=True" in med:
        xc["ms"], xc["peak_bytes"] = med["xafunc compile=True"], peaks.get("xafunc compile=True")
        xc["faults"] = flt["xafunc compile=True"]
    rec["baselines"] = baselines

    ok = {k: b["ms"] for k, b in baselines.items() if b["ms"] is not None and b["status"] == "ok"}
    rec["best"] = rec["best_ms"] = rec["ratio"] = rec["peak_ok"] = None
    rec["best_peak_bytes"] = None
    if ok:
        best = min(ok, key=ok.__getitem__)
        rec["best"], rec["best_ms"] = best, ok[best]
        rec["best_peak_bytes"] = baselines[best]["peak_bytes"]
        if rec["xafunc_ms"] is not None:
            rec["ratio"] = rec["xafunc_ms"] / ok[best]
            if rec["best_peak_bytes"] is not None and rec["xafunc_peak_bytes"] is not None:
                rec["peak_ok"] = rec["xafunc_peak_bytes"] <= rec["best_peak_bytes"]
    rec["compile_ratio"] = (rec["xafunc_ms"] / comp["ms"]
                            if comp["ms"] and rec["xafunc_ms"] is not None else None)
    xc["ratio"] = xc["ms"] / rec["best_ms"] if xc["ms"] and rec["best_ms"] else None
    xc["compile_ratio"] = xc["ms"] / comp["ms"] if xc["ms"] and comp["ms"] else None
    xc["vs_xafunc"] = xc["ms"] / rec["xafunc_ms"] if xc["ms"] and rec["xafunc_ms"] else None
    if "hessian" in baselines and baselines["hessian"]["ms"] and rec["xafunc_ms"] is not None:
        rec["ratio_vs_hessian"] = rec["xafunc_ms"] / baselines["hessian"]["ms"]
    return rec


# --------------------------------------------------------------------------------------------
# one fresh process per case
# --------------------------------------------------------------------------------------------


def _worker_argv(opts: argparse.Namespace, case: str, out: str, no_compile: bool) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", case, "--worker-out", out,
            "--device", opts.device, "--dtype", opts.dtype, "--repeat", str(opts.repeat),
            "--number", str(opts.number), "--sample-ms", str(opts.sample_ms),
            "--compile-timeout", str(opts.compile_timeout),
            "--mem-budget-gib", str(opts.mem_budget_gib),
            "--first-call-timeout", str(opts.first_call_timeout)]
    if no_compile:
        argv.append("--no-compile")
    if opts.no_held:
        argv.append("--no-held")
    if opts.compile_cache:
        argv.append("--compile-cache")
    if opts.xafunc_compile:
        argv.append("--xafunc-compile")
    return argv


def _signal_name(rc: int) -> str:
    import signal

    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc}"


def run_isolated(case: ZooCase, opts: argparse.Namespace) -> dict[str, Any]:
    """Measure ``case`` in a fresh Python process (``--worker``), so a crash -- a segfault in
    torch.compile'd code, say -- costs one column or one case, not the run. A crash while
    compiling or running the compiled strategy reruns the case without torch.compile and
    records why."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "record.json")
        crashes: list[str] = []
        for no_compile in ([opts.no_compile, True] if not opts.no_compile else [True]):
            proc = subprocess.run(_worker_argv(opts, case.name, out, no_compile), check=False)
            if proc.returncode == 0 and os.path.exists(out):
                with open(out) as fh:
                    rec = json.load(fh)
                if crashes:
                    of = crashes[-1].split("torch.compile of ", 1)[1] \
                        if "torch.compile of " in crashes[-1] else None
                    rec["compile"].update(status="crashed", reason=crashes[-1], of=of)
                return rec
            phase = "?"
            if os.path.exists(out + ".phase"):
                with open(out + ".phase") as fh:
                    phase = fh.read()
            why = f"worker died ({_signal_name(proc.returncode)}) during {phase}"
            print(f"\n*** {case.name}: {why}\n", file=sys.stderr, flush=True)
            crashes.append(why)
            if "compile" not in phase:
                break
    return {"name": case.name, "label": case.label, "title": case.title, "group": case.group,
            "request": case.request, "order": case.order, "batch": case.batch,
            "formulation": case.formulation, "mlp_request": case.mlp_request,
            "anchor": case.anchor, "sizes": case.sizes, "check": "crashed", "crash": crashes,
            "plan_short": "-", "plan": None, "fallback": None, "best": None, "best_ms": None,
            "ratio": None, "compile_ratio": None, "xafunc_ms": None, "baselines": {},
            "compile": {"of": None, "ms": None, "compile_s": None, "status": "crashed",
                        "reason": crashes[-1] if crashes else None},
            "tolerance": tolerance(case.order), "xafunc_error": crashes[-1] if crashes else None}


# --------------------------------------------------------------------------------------------
# anchors (JAX, torch-jet) from their own scripts
# --------------------------------------------------------------------------------------------


def merge_anchor(records: list[dict[str, Any]], data: dict[str, Any]) -> str:
    """Add ``rec["anchors"][framework]`` (best strategy, ms, ratio) from an anchor script's
    JSON; returns the framework's name."""
    fw = data["meta"]["framework"]
    for r in records:
        a = data["anchors"].get(r["anchor"])
        entry: dict[str, Any] = {"best": None, "ms": None, "ratio": None, "compile_s": None,
                                 "status": "not implemented"}
        if a is not None:
            entry.update(best=a.get("best"), ms=a.get("best_ms"), compile_s=a.get("compile_s"),
                         status=a.get("status", "ok"), reason=a.get("reason"))
            if entry["ms"] and r.get("xafunc_ms") is not None:
                entry["ratio"] = r["xafunc_ms"] / entry["ms"]
        r.setdefault("anchors", {})[fw] = entry
    return fw


# --------------------------------------------------------------------------------------------
# summary and printing
# --------------------------------------------------------------------------------------------


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    def gm(key: str, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        vals = [r[key] for r in records if pred(r) and r.get(key)]
        return {"value": _geomean(vals), "n": len(vals)}

    s: dict[str, Any] = {
        "geomean_all": gm("ratio", lambda r: True),
        "geomean_order3": gm("ratio", lambda r: r["order"] >= 3),
        "geomean_compile_order2": gm("compile_ratio", lambda r: r["order"] >= 2),
        "losing": sorted(([r["name"], r["ratio"]] for r in records
                          if r.get("ratio") and r["ratio"] > TARGETS["case"]),
                         key=lambda x: -x[1]),
        "failed": [[r["name"], r["check"]] for r in records
                   if r["check"] in ("MISMATCH", "xafunc failed") or
                   r["check"].startswith("partial")],
        "fallbacks": [[r["name"], r["fallback"]] for r in records if r.get("fallback")],
        "peak_above_best": [r["name"] for r in records if r.get("peak_ok") is False],
    }
    def gm_xc(key: str, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        vals = [r["xafunc_compile"][key] for r in records
                if pred(r) and (r.get("xafunc_compile") or {}).get(key)]
        return {"value": _geomean(vals), "n": len(vals)}

    s["geomean_xc_all"] = gm_xc("ratio", lambda r: True)
    s["geomean_xc_compile_order2"] = gm_xc("compile_ratio", lambda r: r["order"] >= 2)
    s["geomean_xc_vs_xafunc"] = gm_xc("vs_xafunc", lambda r: True)
    ph = [r for r in records if r["name"] == "param_hessian" and r.get("ratio_vs_hessian")]
    s["param_hessian_vs_hessian"] = ph[0]["ratio_vs_hessian"] if ph else None
    spread: dict[str, dict[str, float]] = {}
    faults: dict[str, dict[str, float | None]] = {}
    for r in records:
        # per-sample under vmap is batch times the work: not comparable with the others
        if r["group"] == "mlp" and r.get("xafunc_ms") and r["formulation"] != "vmap":
            spread.setdefault(r["mlp_request"], {})[r["formulation"]] = r["xafunc_ms"]
            faults.setdefault(r["mlp_request"], {})[r["formulation"]] = r.get("xafunc_faults")
    s["formulation_spread"] = {}
    for req, v in spread.items():
        lo, hi = min(v, key=v.__getitem__), max(v, key=v.__getitem__)
        s["formulation_spread"][req] = {
            "min_ms": v[lo], "max_ms": v[hi], "fastest": lo, "slowest": hi,
            "spread": v[hi] / v[lo], "n": len(v),
            "fastest_faults": faults[req][lo], "slowest_faults": faults[req][hi]}
    anchors = sorted({fw for r in records for fw in r.get("anchors", {})})
    for fw in anchors:
        s[f"geomean_{fw}_order2"] = gm_fw = {"value": _geomean(
            [r["anchors"][fw]["ratio"] for r in records
             if r["order"] >= 2 and r.get("anchors", {}).get(fw, {}).get("ratio")])}
        gm_fw["n"] = sum(1 for r in records if r["order"] >= 2 and
                         r.get("anchors", {}).get(fw, {}).get("ratio"))
    return s


def _ratio(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2f}" if x >= 0.1 else f"{x:.3f}")


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _faults(n: float | None) -> str:
    """Minor page faults per call, where there are any (see ``ratio_table.minor_faults``)."""
    return f"  {n:.0f} page faults/call" if n and n >= 0.5 else ""


def _plan_cell(r: dict[str, Any]) -> str:
    """The plan in one short cell (the fallback's full reason is listed below the table)."""
    s = r["plan_short"]
    if r.get("fallback"):
        s += ": " + r["fallback"].splitlines()[0]
    return s if len(s) <= 48 else s[:47] + "~"


def print_table(records: list[dict[str, Any]], summary: dict[str, Any], cuda: bool) -> None:
    anchors = sorted({fw for r in records for fw in r.get("anchors", {})})
    head = ["case", "k", "xafunc ms", "held ms", "plan", "best torch.func", "ms", "ratio",
            "compile ms", "ratio", "compile s", "xafunc peak", "best peak", "peak<=best",
            "check"]
    with_xc = any((r.get("xafunc_compile") or {}).get("status") not in (None, "skipped")
                  for r in records)
    if with_xc:
        head += ["xafunc compile=True ms", "vs best", "vs compile", "vs xafunc",
                 "inductor s"]
    for fw in anchors:
        head += [f"{fw} ms", "ratio"]
    rows = []
    for r in records:
        c = r["compile"]
        cms = _fmt_ms(c["ms"]) if c["ms"] else {"skipped": "-", "crashed": "CRASH"}.get(
            c["status"], "n/a")
        row = [r["name"], str(r["order"]), _fmt_ms(r.get("xafunc_ms")),
               _fmt_ms(r.get("xafunc_held_ms")), _plan_cell(r), r["best"] or "none",
               _fmt_ms(r["best_ms"]), _ratio(r["ratio"]), cms, _ratio(r["compile_ratio"]),
               "-" if c["compile_s"] is None else f"{c['compile_s']:.1f}",
               _fmt_bytes(r.get("xafunc_peak_bytes")), _fmt_bytes(r.get("best_peak_bytes")),
               "-" if r.get("peak_ok") is None else ("yes" if r["peak_ok"] else "NO"),
               r["check"]]
        if with_xc:
            x = r.get("xafunc_compile") or {}
            ms = _fmt_ms(x["ms"]) + ("" if x.get("inductor") else " (not inductor)") \
                if x.get("ms") else (x.get("status") or "n/a")
            row += [ms, _ratio(x.get("ratio")), _ratio(x.get("compile_ratio")),
                    _ratio(x.get("vs_xafunc")),
                    "-" if x.get("inductor_s") is None else f"{x['inductor_s']:.1f}"]
        for fw in anchors:
            a = r.get("anchors", {}).get(fw, {})
            row += [_fmt_ms(a.get("ms")) if a.get("ms") else "n/a", _ratio(a.get("ratio"))]
        rows.append(row)
    print(_table(head, rows))

    print("\nGeometric means of xafunc / baseline (issue 11 targets):")
    for key, what in (("geomean_all", "all cases vs best eager torch.func"),
                      ("geomean_order3", "order >= 3 vs best eager torch.func"),
                      ("geomean_compile_order2", "order >= 2 vs torch.compile'd best")):
        g = summary[key]
        val = "-" if g["value"] is None else f"{g['value']:.3f}"
        print(f"  {what:40s} {val:>7s}  over {g['n']:3d} cases  (target <= {TARGETS[key]})")
    if with_xc:
        for key, what in (("geomean_xc_all", "compile=True, all vs best eager"),
                          ("geomean_xc_compile_order2",
                           "compile=True, order >= 2 vs torch.compile"),
                          ("geomean_xc_vs_xafunc", "compile=True vs xafunc (TorchScript)")):
            g = summary[key]
            val = "-" if g["value"] is None else f"{g['value']:.3f}"
            print(f"  {what:40s} {val:>7s}  over {g['n']:3d} cases")
    for fw in anchors:
        g = summary[f"geomean_{fw}_order2"]
        val = "-" if g["value"] is None else f"{g['value']:.3f}"
        print(f"  {'order >= 2 vs ' + fw:40s} {val:>7s}  over {g['n']:3d} cases")
    ph = summary["param_hessian_vs_hessian"]
    print(f"  {'parameter Hessian vs torch.func.hessian':40s} "
          f"{'-' if ph is None else f'{ph:.3f}':>7s}  (target <= "
          f"{TARGETS['param_hessian_vs_hessian']})")
    n_lose = len(summary["losing"])
    print(f"  cases slower than the best eager nesting: {n_lose}"
          + (": " + ", ".join(f"{n} {x:.2f}x" for n, x in summary["losing"]) if n_lose else ""))
    if summary["peak_above_best"]:
        print("  peak above the best nesting's: " + ", ".join(summary["peak_above_best"]))

    if summary["formulation_spread"]:
        print("\nSpread of xafunc's time across MLP formulations (max / min, target <= 1.3; "
              "vmap excluded, it does batch times the work):")
        for req, s in summary["formulation_spread"].items():
            print(f"  {req:10s} {s['spread']:7.2f}x  fastest {s['fastest']} "
                  f"{_fmt_ms(s['min_ms'])} ms{_faults(s.get('fastest_faults'))}, slowest "
                  f"{s['slowest']} {_fmt_ms(s['max_ms'])} ms{_faults(s.get('slowest_faults'))}"
                  f"  ({s['n']} formulations)")

    bad = [r for r in records if r["check"] != "ok"]
    if bad:
        print("\nCorrectness and failures:")
        for r in bad:
            print(f"  {r['name']}: {r['check']}"
                  + (f" -- {r['xafunc_error']}" if r.get("xafunc_error") else ""))
            for name, b in r["baselines"].items():
                if b["status"] == "disagrees":
                    print(f"    {name} disagrees: {b['reason']}")
    if summary["fallbacks"]:
        print("\nFallbacks to nested torch.func (the plan's reason):")
        for name, why in summary["fallbacks"]:
            print(f"  {name}: {why}")

    how = "torch.cuda.max_memory_allocated" if cuda else "profiler memory events"
    print(f"\nEvery strategy (median ms per call; peak of one call by {how}):")
    for r in records:
        print(f"  {r['name']}: {r['label']}  [check {r['check']}, tolerance {r['tolerance']:g}]")
        print(f"    {'xafunc (inline)':40s} {_fmt_ms(r.get('xafunc_ms')):>9s}  peak "
              f"{_fmt_bytes(r.get('xafunc_peak_bytes'))}  first call "
              f"{_fmt_ms(r.get('xafunc_first_call_ms'))} ms{_faults(r.get('xafunc_faults'))}")
        if r.get("xafunc_held_ms") is not None:
            print(f"    {'xafunc (held transform)':40s} {_fmt_ms(r['xafunc_held_ms']):>9s}")
        x = r.get("xafunc_compile") or {}
        if x.get("status") not in (None, "skipped"):
            state = (f"{_fmt_ms(x['ms']):>9s}  peak {_fmt_bytes(x.get('peak_bytes'))}, first "
                     f"two calls {x['first_call_s']:.1f} s (inductor {x['inductor_s']:.1f} s)"
                     if x.get("ms") else f"{'n/a':>9s}  {x['status']}")
            if x.get("reason"):
                state += f"  {x['reason']}"
            print(f"    {'xafunc compile=True':40s} {state}")
            if x.get("schedule") is not None:
                print(f"    {'':40s} schedule {'>'.join(x['schedule'])}; "
                      + "; ".join([x.get("execution") or "", *x.get("notes", [])]))
        for name, b in r["baselines"].items():
            if b["ms"] is None:
                print(f"    {name:40s} {'n/a':>9s}  {b['status']}: {b['reason']}")
                continue
            tag = "  <- best" if name == r["best"] else ""
            if b["status"] != "ok":
                tag = f"  {b['status'].upper()}: {b['reason']}"
            print(f"    {name:40s} {_fmt_ms(b['ms']):>9s}  peak {_fmt_bytes(b['peak_bytes'])} "
                  f"(est. {_fmt_bytes(b['estimated_bytes'])}){_faults(b.get('faults'))}{tag}")
        c = r["compile"]
        if c["of"] or c["status"] == "crashed":
            state = (f"{_fmt_ms(c['ms']):>9s}  peak {_fmt_bytes(c['peak_bytes'])}, compile "
                     f"{c['compile_s']:.1f} s, {c.get('graph_breaks', 0)} graph breaks"
                     if c["ms"] else f"{'n/a':>9s}  {c['status']}: {c['reason']}")
            print(f"    {'torch.compile(' + (c['of'] or '?') + ')':40s} {state}")
        for fw, a in r.get("anchors", {}).items():
            val = f"{_fmt_ms(a['ms']):>9s}  ({a['best']})" if a.get("ms") else \
                f"{'n/a':>9s}  {a.get('status')}: {a.get('reason') or ''}"
            print(f"    {fw:40s} {val}")
    print("\nPlans xafunc chose:")
    for r in records:
        if r.get("plan"):
            print(f"  {r['name']}:")
            for ln in str(r["plan"]).splitlines()[:5]:
                print(f"    {ln}")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _quiet_torch(opts: argparse.Namespace) -> None:
    """No deprecation chatter from torch's own internals between the rows; cold compiles
    unless ``--compile-cache``."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
    if not opts.compile_cache:
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for the method.")
    ap.add_argument("--cases", help="comma-separated names, shell patterns or the groups "
                    "'mlp' / 'models' (default: all; --list shows them)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--repeat", type=int, default=7, help="timed rounds (default 7)")
    ap.add_argument("--number", default="auto",
                    help="calls per timing sample: auto (about --sample-ms) or an int")
    ap.add_argument("--sample-ms", type=float, default=20.0,
                    help="target length of one timing sample with --number auto (20)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--xafunc-compile", action="store_true",
                    help="add the column xafunc compile=True (inductor executor)")
    ap.add_argument("--no-held", action="store_true",
                    help="skip timing the held xafunc transform (diagnostic column)")
    ap.add_argument("--compile-timeout", type=float, default=900.0,
                    help="torch.compile's first call limit in seconds (900)")
    ap.add_argument("--mem-budget-gib", type=float, default=4.0,
                    help="skip strategies whose estimated intermediates exceed this (4)")
    ap.add_argument("--first-call-timeout", type=float, default=10.0,
                    help="an eager strategy whose first call takes longer is unavailable (10 s)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--load", metavar="PATH",
                    help="print (and --merge into) an earlier --json instead of measuring")
    ap.add_argument("--merge", metavar="PATH", action="append", default=[],
                    help="add an anchor column from jax_zoo.py / torchjet_zoo.py --json "
                         "(repeatable)")
    ap.add_argument("--no-isolate", action="store_true",
                    help="measure every case in this process instead of one fresh process per "
                         "case (a crash then ends the run)")
    ap.add_argument("--compile-cache", action="store_true",
                    help="let torch.compile use its on-disk caches (default off: every compile "
                         "is cold, as a user's first)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.list:
        for c in ZOO:
            print(f"{c.name:28s} {c.label}")
        print("\nformulations: " + "; ".join(f"{k}: {v}" for k, v in FORMULATIONS.items()))
        return 0
    if opts.repeat < 1:
        ap.error("--repeat must be >= 1")
    if opts.number != "auto" and not (opts.number.isdigit() and int(opts.number) >= 1):
        ap.error("--number must be auto or a positive int")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch.cuda.is_available() is False")

    _quiet_torch(opts)
    if opts.worker:  # one case, in a fresh process started by run_isolated
        global _PHASE_FILE
        _PHASE_FILE = opts.worker_out + ".phase"
        _phase("warm-up")
        _warm_up_torch_func(opts.device)
        rec = measure_case(select(opts.worker)[0], opts)
        with open(opts.worker_out, "w") as fh:
            json.dump(rec, fh, default=str)
        return 0

    if opts.load:
        with open(opts.load) as fh:
            data = json.load(fh)
        meta, records = data["meta"], data["cases"]
        if opts.cases:
            keep = {c.name for c in select(opts.cases)}
            records = [r for r in records if r["name"] in keep]
    else:
        try:
            cases = select(opts.cases)
        except ValueError as e:
            ap.error(str(e))
        meta = _meta(opts)
        meta.update(script="zoo_table.py", compile=not opts.no_compile,
                    xafunc_compile=opts.xafunc_compile,
                    compile_cache=opts.compile_cache, isolate=not opts.no_isolate,
                    first_call_timeout_s=opts.first_call_timeout)
        where = os.path.dirname(os.path.abspath(sys.modules["xafunc"].__file__ or "?"))
        print(f"xafunc {meta['xafunc']} ({meta['commit']}) from {where}, torch {meta['torch']}, "
              f"{opts.device} "
              f"{meta['device_name']}, {opts.dtype}, {meta['threads']} threads, median of "
              f"{opts.repeat} samples of {opts.number} call(s), {len(cases)} cases\n",
              flush=True)
        if opts.no_isolate:
            _warm_up_torch_func(opts.device)
        records = []
        for i, case in enumerate(cases, 1):
            print(f"  [{i}/{len(cases)}] {case.name}: {case.label} ...", file=sys.stderr,
                  flush=True)
            t0 = time.perf_counter()
            records.append(measure_case(case, opts) if opts.no_isolate else
                           run_isolated(case, opts))
            records[-1]["wall_s"] = time.perf_counter() - t0
            if opts.json:  # what is done so far survives a run cut short (--load prints it)
                with open(opts.json, "w") as fh:
                    json.dump({"meta": meta, "cases": records}, fh, indent=1, default=str)
    anchor_meta = {}
    for path in opts.merge:
        with open(path) as fh:
            data = json.load(fh)
        anchor_meta[merge_anchor(records, data)] = data["meta"]
    summary = summarize(records)
    print_table(records, summary, str(meta["device"]).startswith("cuda"))
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"meta": meta, "anchors": anchor_meta, "targets": TARGETS,
                       "summary": summary, "cases": records}, fh, indent=1, default=str)
        print(f"\nwrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
