"""Print the ratio table: xafunc against every torch.func strategy, per benchmark case.

    python asv_bench/ratio_table.py [--device cpu|cuda] [--dtype float32|bfloat16]
                                    [--repeat 7] [--number auto|N] [--json out.json]
                                    [--cases name,...]

For each case (see ``asv_bench/benchmarks/cases.py``) it times xafunc and every torch.func
strategy a careful user would try, in one process and interleaved: after one warm-up call of
each, every round takes one timing sample of xafunc and then one of each baseline, and the
median over ``--repeat`` rounds is reported. A sample is ``number`` back-to-back calls, as in
asv and ``timeit``: with ``--number auto`` (the default) each strategy's ``number`` is chosen
from its warm-up call so that a sample lasts about ``--sample-ms``; ``--number 1`` times
single calls, each right after the other strategies ran (colder caches, more noise). The
times reported are per call. xafunc's first call (fresh transform: trace + plan + run) is
reported separately. A baseline is *unavailable* when its estimated intermediate size exceeds
``--mem-budget-gib``, when its first call takes longer than ``--first-call-timeout`` seconds,
or when it runs out of memory. ratio = xafunc / best available baseline; the target and a
pass/fail column are printed beside it, with the plan xafunc chose. Peak memory of one call
per strategy comes from ``torch.cuda.max_memory_allocated`` on CUDA and from the profiler's
memory events on CPU (:func:`cpu_peak_bytes`), measured after the timing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # the cases, and the xafunc of this checkout

from benchmarks.cases import CASES, DTYPES, Case, get_case  # noqa: E402

import xafunc  # noqa: E402


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_Timeout` in the main thread after ``seconds`` (POSIX only; else no-op).

    The signal is delivered between Python bytecodes, so one long kernel can overrun it;
    the measured first-call time is checked against the limit as well.
    """
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Timeout

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def minor_faults() -> int:
    """The process's minor page faults so far: pages the kernel mapped in on first touch.
    Allocations of a few MiB that glibc's ``malloc`` gives back to the system on ``free``
    (above its mmap and trim thresholds, which adapt as the process runs) fault their pages
    in again on every call, at about a microsecond a page, whatever computed them."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Runner:
    """Times calls on one device, synchronising CUDA and tracking its peak memory, and counts
    the minor page faults of the last timed calls (``faults``: per call)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.faults = 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def call(self, fn: Callable[..., Any], args: tuple, number: int = 1
             ) -> tuple[float, int | None]:
        """Seconds per call over ``number`` calls of ``fn(*args)``, and the peak bytes a call
        allocated (CUDA)."""
        peak = None
        if self.cuda:
            self.sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        f0 = minor_faults()
        t0 = time.perf_counter()
        for _ in range(number):
            out = fn(*args)
            del out
        self.sync()
        dt = (time.perf_counter() - t0) / number
        self.faults = (minor_faults() - f0) / number
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() - base
        return dt, peak


def _number(opts: argparse.Namespace, runner: Runner, fn: Callable[..., Any], args: tuple) -> int:
    """Calls per timing sample: ``--number``, or enough for ``--sample-ms`` (at most 1000),
    from the fastest of two calls after the warm-up, or of three when one is shorter than a
    sample (the first calls after it may still be settling: TorchScript profiles its first
    runs, allocators grow, xafunc captures its CUDA graph on a GPU's third call -- one such
    call alone once set ``number`` to 1 there, timing latency where the rest timed
    throughput)."""
    if opts.number != "auto":
        return int(opts.number)
    target = opts.sample_ms / 1e3
    times = [runner.call(fn, args)[0] for _ in range(2)]
    if min(times) < target:
        times.append(runner.call(fn, args)[0])
    return max(1, min(1000, math.ceil(target / max(min(times), 1e-9))))


#: Lines the profiler writes straight to file descriptor 2 on every start and stop (kineto's
#: USDT probes) and for memory freed that was allocated before it started (harmless here: such
#: frees only lower the running total, which starts at zero): noise between the table's rows.
PROFILER_NOISE = ("USDT:", "allocated before the profiling started")


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Run the body with file descriptor 2 captured; afterwards write back every captured
    line but the profiler's known noise (:data:`PROFILER_NOISE`), so real errors and
    warnings still show."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not any(n in line for n in PROFILER_NOISE):
                    sys.stderr.write(line)
            sys.stderr.flush()


def cpu_peak_bytes(fn: Callable[..., Any], args: tuple) -> int:
    """Peak bytes one call of ``fn(*args)`` holds at once on CPU, from the profiler's memory
    events: each op's own allocations and frees (net of its children's) in time order, and
    the allocations outside ops. The result counts; memory held before the call does not.
    The profiler's own chatter on stderr is filtered out (:func:`quiet_profiler`)."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU],
                                   profile_memory=True) as prof:
        out = fn(*args)
        del out
    points = []
    for e in prof.events():
        own = e.cpu_memory_usage
        if e.name != "[memory]":
            own -= sum(c.cpu_memory_usage for c in e.cpu_children)
        if own:
            points.append((e.time_range.start, own))
    current = peak = 0
    for _, delta in sorted(points, key=lambda p: p[0]):
        current += delta
        peak = max(peak, current)
    return peak


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e)


def _plan_summary(case: Case, args: tuple, dtype: torch.dtype, device: str) -> tuple[str, str]:
    """(one-line strategy, full printed plan) of what xafunc chose; ``-`` if not applicable."""
    try:
        p = case.plan(args, dtype, device)
    except Exception as e:  # the table must not die on a planner bug
        return f"plan failed: {type(e).__name__}", f"plan failed: {e}"
    if p is None:
        return "-", "-"
    sched = getattr(p, "schedule", ())
    short = str(p.strategy) + (f" ({'>'.join(sched)})" if sched else "")
    return short, str(p)


def measure_case(case: Case, opts: argparse.Namespace) -> dict[str, Any]:
    """Time one case: xafunc and every baseline, interleaved; returns a JSON-able record."""
    dtype, device = DTYPES[opts.dtype], opts.device
    runner = Runner(device)
    args = case.make_args(dtype, device)
    budget = int(opts.mem_budget_gib * 2**30)
    rec: dict[str, Any] = {
        "name": case.name, "label": case.label, "title": case.title, "sizes": case.sizes,
        "order": case.order, "kind": case.kind, "batch": case.batch, "target": case.target,
        "result_bytes": case.result_bytes(dtype),
    }
    rec["plan_short"], rec["plan"] = _plan_summary(case, args, dtype, device)

    # xafunc: fresh transform, first call (trace + plan + run), then it is warm.
    fns: dict[str, Callable[..., Any]] = {}
    numbers: dict[str, int] = {}
    t0 = time.perf_counter()
    xf = case.xafunc_fn(dtype, device)
    first, peak = runner.call(xf, args)
    rec["xafunc_first_call_ms"] = (time.perf_counter() - t0) * 1e3
    rec["xafunc_peak_bytes"] = peak
    fns["xafunc"] = xf
    numbers["xafunc"] = _number(opts, runner, xf, args)

    baselines: dict[str, dict[str, Any]] = {}
    for name, (fn, est) in case.baselines(dtype, device).items():
        b: dict[str, Any] = {"estimated_bytes": est, "ms": None, "status": "ok", "reason": None,
                             "peak_bytes": None}
        baselines[name] = b
        if est > budget:
            b["status"] = "unavailable"
            b["reason"] = f"estimated {est / 2**30:.1f} GiB > budget {opts.mem_budget_gib:g} GiB"
            continue
        try:
            with time_limit(opts.first_call_timeout):
                dt, peak = runner.call(fn, args)  # warm-up
        except _Timeout:
            b["status"], b["reason"] = "unavailable", f"first call > {opts.first_call_timeout:g} s"
            continue
        except Exception as e:
            if not _is_oom(e):
                raise
            b["status"], b["reason"] = "unavailable", "out of memory"
            if runner.cuda:
                torch.cuda.empty_cache()
            continue
        b["first_call_ms"], b["peak_bytes"] = dt * 1e3, peak
        if dt > opts.first_call_timeout:
            b["status"], b["reason"] = "unavailable", f"first call {dt:.1f} s > limit"
            continue
        fns[name] = fn
        numbers[name] = b["number"] = _number(opts, runner, fn, args)

    # interleaved rounds: xafunc, then every baseline, once per round
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, int] = {}
    for r in range(opts.repeat):
        order = list(fns)
        if r % 2:  # alternate the order so no strategy always runs right after another
            order = order[:1] + order[1:][::-1]
        for k in order:
            dt, peak = runner.call(fns[k], args, numbers[k])
            times[k].append(dt)
            if peak is not None:
                peaks[k] = max(peaks.get(k, 0), peak)

    rec["xafunc_ms"] = statistics.median(times["xafunc"]) * 1e3
    rec["xafunc_number"] = numbers["xafunc"]
    rec["xafunc_peak_bytes"] = peaks.get("xafunc", rec["xafunc_peak_bytes"])
    for name, b in baselines.items():
        if name in times:
            b["ms"] = statistics.median(times[name]) * 1e3
            b["peak_bytes"] = peaks.get(name, b["peak_bytes"])
    if not runner.cuda:  # CPU peaks from the profiler, one call each, outside the timing
        rec["xafunc_peak_bytes"] = cpu_peak_bytes(fns["xafunc"], args)
        for name, b in baselines.items():
            if name in fns:
                b["peak_bytes"] = cpu_peak_bytes(fns[name], args)
    rec["baselines"] = baselines
    ok = {k: b["ms"] for k, b in baselines.items() if b["ms"] is not None}
    if ok:
        best = min(ok, key=ok.__getitem__)
        rec["best"], rec["best_ms"] = best, ok[best]
        rec["ratio"] = rec["xafunc_ms"] / ok[best]
        rec["pass"] = rec["ratio"] <= case.target
        best_peak = baselines[best]["peak_bytes"]
        rec["peak_ok"] = None if best_peak is None or rec["xafunc_peak_bytes"] is None \
            else rec["xafunc_peak_bytes"] <= best_peak
    else:
        rec["best"] = rec["best_ms"] = rec["ratio"] = rec["pass"] = rec["peak_ok"] = None
    return rec


def _fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else (f"{ms:.3g}" if ms < 100 else f"{ms:.0f}")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return "-"


def print_table(records: list[dict[str, Any]], skipped: list[tuple[str, str]],
                cuda: bool) -> None:
    head = ["case", "xafunc ms", "1st call ms", "best torch.func", "best ms", "ratio",
            "target", "pass", "peak <= best's", "plan"]
    rows = []
    for r in records:
        rows.append([
            r["label"], _fmt_ms(r["xafunc_ms"]), _fmt_ms(r["xafunc_first_call_ms"]),
            r["best"] or "none available", _fmt_ms(r["best_ms"]),
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}", f"<= {r['target']:.2f}",
            "-" if r["pass"] is None else ("PASS" if r["pass"] else "fail"),
            "-" if r.get("peak_ok") is None else ("yes" if r["peak_ok"] else "NO"),
            r["plan_short"],
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    for name, why in skipped:
        print(f"{name}: skipped ({why})")

    how = "torch.cuda.max_memory_allocated" if cuda else "profiler memory events"
    print(f"\nEvery strategy (median ms, peak memory of one call by {how}; unavailable ones "
          "with the reason):")
    for r in records:
        print(f"  {r['label']}   [result {_fmt_bytes(r['result_bytes'])}]")
        print(f"    {'xafunc':34s} {_fmt_ms(r['xafunc_ms']):>9s}  "
              f"peak {_fmt_bytes(r['xafunc_peak_bytes'])}")
        for name, b in r["baselines"].items():
            if b["ms"] is None:
                print(f"    {name:34s} {'n/a':>9s}  unavailable: {b['reason']}")
            else:
                star = "  <- best" if name == r["best"] else ""
                print(f"    {name:34s} {_fmt_ms(b['ms']):>9s}  peak "
                      f"{_fmt_bytes(b['peak_bytes'])} (est. {_fmt_bytes(b['estimated_bytes'])})"
                      f"{star}")
    print("\nPlans xafunc chose:")
    for r in records:
        print(f"  {r['label']}:")
        for ln in str(r["plan"]).splitlines()[:4]:
            print(f"    {ln}")


def _meta(opts: argparse.Namespace) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=_HERE, check=False,
        ).stdout.strip() or None
    except OSError:
        commit = None
    dev = torch.cuda.get_device_name() if opts.device.startswith("cuda") else platform.processor()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": opts.device, "device_name": dev or platform.machine(), "dtype": opts.dtype,
        "repeat": opts.repeat, "number": opts.number, "sample_ms": opts.sample_ms,
        "torch": torch.__version__, "xafunc": xafunc.__version__,
        "commit": commit, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "mem_budget_gib": opts.mem_budget_gib, "first_call_timeout_s": opts.first_call_timeout,
        # glibc malloc's and torch's allocator settings from the environment, which decide
        # the page faults of large allocations (``minor_faults``); empty: their defaults
        "malloc_env": {k: v for k, v in os.environ.items()
                       if k.startswith("MALLOC_")
                       or k in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")},
    }


def _warm_up_torch_func(device: str) -> None:
    """Pay torch.func's one-off per-process start-up before anything is timed, so the first
    case's numbers (and xafunc's first-call overhead) do not include it."""
    import torch.func as tf

    x = torch.ones(2, device=device)
    tf.vmap(tf.hessian(lambda v: v.tanh().sum()))(x.expand(2, 2))
    tf.jacfwd(tf.jacrev(torch.tanh))(x)
    tf.jvp(torch.tanh, (x,), (x,))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--repeat", type=int, default=7, help="timed rounds (>= 7 recommended)")
    ap.add_argument("--number", default="auto",
                    help="calls per timing sample: auto (about --sample-ms each) or an int; "
                         "1 times single, cold calls (default auto)")
    ap.add_argument("--sample-ms", type=float, default=20.0,
                    help="target length of one timing sample with --number auto (20)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--cases", help="comma-separated case names (default: all); "
                    f"known: {', '.join(c.name for c in CASES)}")
    ap.add_argument("--mem-budget-gib", type=float, default=4.0,
                    help="skip baselines whose estimated intermediates exceed this (4)")
    ap.add_argument("--first-call-timeout", type=float, default=5.0,
                    help="a baseline whose first call takes longer is unavailable (5 s)")
    opts = ap.parse_args(argv)
    if opts.repeat < 1:
        ap.error("--repeat must be >= 1")
    if opts.number != "auto" and not (opts.number.isdigit() and int(opts.number) >= 1):
        ap.error("--number must be auto or a positive int")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch.cuda.is_available() is False")

    cases = [get_case(n.strip()) for n in opts.cases.split(",")] if opts.cases else CASES
    meta = _meta(opts)
    print(f"xafunc {meta['xafunc']} ({meta['commit']}), torch {meta['torch']}, "
          f"{opts.device} {meta['device_name']}, {opts.dtype}, {meta['threads']} threads, "
          f"median of {opts.repeat} samples of {opts.number} call(s)\n", flush=True)
    _warm_up_torch_func(opts.device)
    records, skipped = [], []
    for case in cases:
        if not case.available():
            skipped.append((case.label, f"xafunc has no {case.requires} yet"))
            continue
        print(f"  measuring {case.label} ...", file=sys.stderr, flush=True)
        records.append(measure_case(case, opts))
    print_table(records, skipped, opts.device.startswith("cuda"))
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"meta": meta, "cases": records,
                       "skipped": [{"label": a, "reason": b} for a, b in skipped]}, fh,
                      indent=1)
        print(f"\nwrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
