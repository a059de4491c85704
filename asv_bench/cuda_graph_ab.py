"""CUDA-graph replay on and off, interleaved in one process, over the zoo's models (NOTE [CUDA
graphs]): inline xafunc calls as users write them, each replay result checked against the
interpreter's, and what ran. With ``--training``, over PINN training steps instead
(``benchmarks/training_cases.py``, both APIs): replay on runs the forward and the backward
graph replayed (NOTE [Backward graphs]), replay off the autograd-recorded interpreter; the
parameter gradients of the two are compared, and the torch.func strategy of the asv suite is
timed beside them.

    python asv_bench/cuda_graph_ab.py --cases models --json out.json     # on a GPU
    python asv_bench/cuda_graph_ab.py --training lap_2_64,d3_2_64 --json train.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # the zoo, and the xafunc of this checkout

from benchmarks.zoo import select  # noqa: E402

import xafunc  # noqa: E402
from xafunc._execute import cuda_graph  # noqa: E402
from xafunc._execute.executable import Executable  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, args, number: int) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(number):
        fn(*args)
    _sync()
    return (time.perf_counter() - t0) / number * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="models")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--number", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    ap.add_argument("--training", help="comma-separated training cases (or 'all')")
    opts = ap.parse_args()
    if opts.training:
        return training(opts)
    rows = []
    for case in select(opts.cases):
        xafunc.clear_cache()
        import gc

        gc.collect()
        built = case.build(torch.float32, opts.device)
        args = built.args
        fn = built.xafunc
        try:
            for _ in range(cuda_graph.WARM_UP + 2):
                out_on = fn(*args)
            cuda_graph.ENABLED = False
            out_off = fn(*args)
            cuda_graph.ENABLED = True
            flat_on = [t for t in torch.utils._pytree.tree_leaves(out_on)
                       if isinstance(t, torch.Tensor)]
            flat_off = [t for t in torch.utils._pytree.tree_leaves(out_off)
                        if isinstance(t, torch.Tensor)]
            err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                      for a, b in zip(flat_on, flat_off)) if flat_on else 0.0
            on, off = [], []
            for _ in range(opts.repeat):
                cuda_graph.ENABLED = True
                on.append(_time(fn, args, opts.number))
                cuda_graph.ENABLED = False
                off.append(_time(fn, args, opts.number))
            cuda_graph.ENABLED = True
            best = min(built.baselines, key=lambda k: _time(built.baselines[k], args, 3)
                       if _try(built.baselines[k], args) else float("inf"))
            eager = statistics.median(_time(built.baselines[best], args, 5) for _ in range(3))
            execs = sorted(set(_executors()))
            row = {"name": case.name, "on_ms": statistics.median(on),
                   "off_ms": statistics.median(off), "eager_best": best, "eager_ms": eager,
                   "rel_diff_on_off": err, "executors": execs}
        except Exception as e:  # noqa: BLE001
            row = {"name": case.name, "error": f"{type(e).__name__}: {e}"[:300]}
        _keep(rows, row, opts, "rows")
    _table(rows, f"{'case':16s} {'replay ms':>10s} {'interp ms':>10s} {'ratio':>6s} "
                 f"{'eager ms':>9s}  executor",
           lambda r: f"{r['name']:16s}",
           lambda r: f"{r['on_ms']:10.3f} {r['off_ms']:10.3f} {r['on_ms'] / r['off_ms']:6.2f} "
                     f"{r['eager_ms']:9.3f}  {'; '.join(r['executors'])[:150]}  "
                     f"(diff {r['rel_diff_on_off']:.1e})")
    return 0


def _table(rows: list, header: str, key, cells) -> None:  # type: ignore[no-untyped-def]
    """Print ``rows``: ``key(r)`` then ``cells(r)``, or the error a row carries."""
    print("\n" + header)
    for r in rows:
        print(f"{key(r)} " + (f"ERROR {r['error']}" if "error" in r else cells(r)))


def _keep(rows: list, row: dict, opts: argparse.Namespace, key: str) -> None:
    """Add ``row``, print it, and rewrite the JSON (a run cut short keeps its rows)."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"device": opts.device, "torch": torch.__version__, key: rows}, fh,
                      indent=1)


def training(opts: argparse.Namespace) -> int:
    from benchmarks.training_cases import TRAIN_CASES, get_train_case, make_step

    names = [c.name for c in TRAIN_CASES] if opts.training == "all" else \
        opts.training.split(",")
    rows = []
    for name in names:
        case = get_train_case(name)
        for api in ("backward", "func_grad"):
            try:
                step, grads = make_step(case, "xafunc", api, torch.float32, opts.device)
                base, _ = make_step(case, case.asv_baseline, api, torch.float32, opts.device)
                for _ in range(cuda_graph.WARM_UP + 2):
                    step()
                g_on = {k: v.clone() for k, v in grads().items()}
                cuda_graph.ENABLED = False
                step()
                g_off = grads()
                cuda_graph.ENABLED = True
                err = max(((g_on[k] - g_off[k]).abs().max()
                           / g_off[k].abs().max().clamp_min(1e-30)).item() for k in g_on)
                base()
                on, off, tf = [], [], []
                number = max(opts.number // 5, 3)
                for _ in range(opts.repeat):
                    cuda_graph.ENABLED = True
                    for exe in _all_executables():  # the recorded run marked them recording
                        exe.recording = False
                    on.append(_time(step, (), number))
                    cuda_graph.ENABLED = False
                    off.append(_time(step, (), number))
                    tf.append(_time(base, (), max(number // 3, 2)))
                cuda_graph.ENABLED = True
                row = {"name": name, "api": api, "on_ms": statistics.median(on),
                       "off_ms": statistics.median(off), "torch_func": case.asv_baseline,
                       "torch_func_ms": statistics.median(tf), "rel_diff_on_off": err}
            except Exception as e:  # noqa: BLE001
                cuda_graph.ENABLED = True
                row = {"name": name, "api": api, "error": f"{type(e).__name__}: {e}"[:300]}
            _keep(rows, row, opts, "training")
    _table(rows, f"{'case':16s} {'api':10s} {'replay ms':>10s} {'recorded ms':>11s} "
                 f"{'ratio':>6s} {'torch.func ms':>13s}",
           lambda r: f"{r['name']:16s} {r['api']:10s}",
           lambda r: f"{r['on_ms']:10.3f} {r['off_ms']:11.3f} {r['on_ms'] / r['off_ms']:6.2f} "
                     f"{r['torch_func_ms']:13.3f}  ({r['torch_func']}; "
                     f"diff {r['rel_diff_on_off']:.1e})")
    return 0


def _try(fn, args) -> bool:
    try:
        fn(*args)
        return True
    except Exception:  # noqa: BLE001
        return False


def _executors() -> list[str]:
    """Executor names of every live compiled graph (the cache is cleared before each case)."""
    out = []
    for fn in _all_executables():
        fast = fn._fast
        why = getattr(fast, "why_not_graph", None) if fast is not None else "no fast path"
        if why is None and getattr(fast, "cuda_graph", None) is None:
            why = f"not captured after {getattr(fast, '_calls', '?')} calls"
        out.append(fn.executor + (f" [not replayed: {why}]" if why else ""))
    return out


def _all_executables() -> list[Executable]:
    import gc

    return [o for o in gc.get_objects() if isinstance(o, Executable)]


if __name__ == "__main__":
    sys.exit(main())
