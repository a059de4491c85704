"""Plot xafunc's speedups from ``ratio_table.py --json`` and ``zoo_table.py --json``.

    python docs/make_bench_plot.py RESULTS.json [--out speedup.png] [--table table.rst]
                                   [--zoo ZOO.json] [--training TRAINING.json]

Ratio table: speedup is ``best torch.func time / xafunc time`` (``1 / ratio``), one bar per case
on a log axis, with the target speedup (``1 / target ratio``) marked on each bar. ``--table``
also writes the numbers as an RST table.

Model zoo (``--zoo``; by default ``zoo_results_cpu.json`` beside RESULTS.json when it exists),
written next to ``--out``:

* ``bench_zoo_models.png``: speedup of xafunc over the best eager torch.func strategy, over
  the torch.compile'd one and over each merged anchor (JAX, torch-jet), per model case;
* ``bench_zoo_formulations.png``: xafunc / best torch.func per MLP request and formulation
  (``W @ x + b``, ``F.linear``, ``nn.Linear``, ``einsum``, ...), as a heat map;
* ``bench_zoo_summary.rst`` and ``bench_zoo_table.rst``: the geometric means against issue
  11's targets, and every case's numbers.

Training steps (``--training``; by default ``training_results_cpu.json`` beside RESULTS.json):
``bench_training.png`` (step time of xafunc against the best eager torch.func step, with the
target ratio marked) and ``bench_training_table.rst``.

``docs/conf.py`` runs this at every build from the measured JSON committed under
``docs/_static/``; nothing in the plots is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def _load(path: str) -> dict[str, Any]:
    with open(path) as fh:
        return json.load(fh)


def plot(data: dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in data["cases"] if c.get("ratio")]
    labels = [c["label"] for c in cases]
    speedup = [1.0 / c["ratio"] for c in cases]
    target = [1.0 / c["target"] for c in cases]
    colors = ["tab:green" if c["pass"] else "tab:orange" for c in cases]

    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(cases) + 1.6))
    y = range(len(cases))
    ax.barh(y, speedup, color=colors, height=0.6, label="measured speedup")
    ax.scatter(target, y, marker="|", s=300, color="black", zorder=3, label="target")
    ax.axvline(1.0, color="grey", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the best torch.func strategy (higher is better)")
    m = data["meta"]
    ax.set_title(
        f"xafunc {m['xafunc']} ({m.get('commit') or '?'}) vs torch.func {m['torch']}, "
        f"{m['device']} {m['dtype']}, median of {m['repeat']}", fontsize=9)
    lo = min(speedup + target + [1.0]) / 1.5
    hi = max(speedup + target + [1.0]) * 1.5
    ax.set_xlim(lo, hi)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(data: dict[str, Any]) -> str:
    """The results as an RST list-table."""
    rows = [["case", "xafunc ms", "first call ms", "best torch.func", "best ms", "ratio",
             "target", "", "unavailable nestings"]]
    for c in data["cases"]:
        bad = [n for n, b in c["baselines"].items() if b["ms"] is None]
        rows.append([
            c["label"], f"{c['xafunc_ms']:.3g}", f"{c['xafunc_first_call_ms']:.3g}",
            f"``{c['best']}``" if c["best"] else "none",
            f"{c['best_ms']:.3g}" if c["best_ms"] else "-",
            f"{c['ratio']:.2f}" if c["ratio"] else "-", f"<= {c['target']:.2f}",
            "pass" if c["pass"] else "fail",
            ", ".join(f"``{n}``" for n in bad) or "-",
        ])
    for s in data.get("skipped", []):
        rows.append([s["label"], "-", "-", "-", "-", "-", "-", "skipped", s["reason"]])
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
        lines.append("   * - " + (row[0] or " "))
        lines += [f"     - {cell or ' '}" for cell in row[1:]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# the model zoo (zoo_table.py --json)
# --------------------------------------------------------------------------------------------


def _zoo_title(data: dict[str, Any]) -> str:
    m = data["meta"]
    return (f"xafunc {m['xafunc']} ({m.get('commit') or '?'}), torch {m['torch']}, "
            f"{m['device']} {m['dtype']}, {m.get('threads', '?')} threads, median of "
            f"{m['repeat']}, inline calls")


def plot_zoo_models(data: dict[str, Any], out: str) -> None:
    """Speedups per model case: over eager torch.func, torch.compile and each anchor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in data["cases"] if c["group"] == "model"]
    anchors = sorted({fw for c in cases for fw in c.get("anchors", {})})
    series = [("best eager torch.func", "tab:blue",
               [c.get("ratio") for c in cases]),
              ("torch.compile'd best", "tab:orange",
               [c.get("compile_ratio") for c in cases])]
    colors = ["tab:green", "tab:purple", "tab:brown"]
    for fw, col in zip(anchors, colors):
        series.append((fw, col, [c.get("anchors", {}).get(fw, {}).get("ratio")
                                 for c in cases]))
    missing = [name for name, _, ratios in series if not any(ratios)]  # e.g. --no-compile
    series = [s for s in series if any(s[2])] or series[:1]
    labels = [f"{c['name']} (k={c['order']})" for c in cases]
    n, k = len(cases), len(series)
    fig, ax = plt.subplots(figsize=(8.5, 0.32 * n * max(k, 2) / 2 + 1.8))
    h = 0.8 / k
    speed_all = [1.0]
    for j, (name, col, ratios) in enumerate(series):
        ys = [i + (j - (k - 1) / 2) * h for i in range(n)]
        sp = [1.0 / r if r else 0.0 for r in ratios]
        speed_all += [v for v in sp if v]
        ax.barh(ys, [v if v else float("nan") for v in sp], height=h, color=col,
                label=f"over {name}")
        for y, r in zip(ys, ratios):
            if not r:
                ax.text(1.0, y, "  n/a", va="center", fontsize=6, color=col)
    ax.axvline(1.0, color="grey", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(min(speed_all) / 1.5, max(speed_all) * 1.5)
    ax.set_xlabel("xafunc speedup (baseline time / xafunc time; right of the dashed line: "
                  "xafunc faster)", fontsize=8)
    ax.set_title("Model zoo: " + _zoo_title(data)
                 + (f"\n(not measured: {', '.join(missing)})" if missing else ""), fontsize=8)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_zoo_formulations(data: dict[str, Any], out: str) -> None:
    """Heat map of xafunc / best eager torch.func per MLP request (rows) and formulation."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    cases = [c for c in data["cases"] if c["group"] == "mlp"]
    reqs = list(dict.fromkeys(c["mlp_request"] for c in cases))
    forms = list(dict.fromkeys(c["formulation"] for c in cases))
    grid = [[math.nan] * len(forms) for _ in reqs]
    for c in cases:
        if c.get("ratio"):
            grid[reqs.index(c["mlp_request"])][forms.index(c["formulation"])] = c["ratio"]
    vals = [v for row in grid for v in row if v == v]
    fig, ax = plt.subplots(figsize=(9.5, 0.5 * len(reqs) + 2.0))
    if not cases:
        ax.axis("off")
        ax.text(0.5, 0.5, "no MLP formulation cases in this run (zoo_table.py --cases mlp)",
                ha="center", va="center", fontsize=9)
    if vals:
        lim = max(max(vals), 1 / min(vals), 1.01)
        im = ax.imshow(grid, cmap="RdYlGn_r", norm=LogNorm(1 / lim, lim), aspect="auto")
        fig.colorbar(im, ax=ax, label="xafunc / best torch.func (< 1: xafunc faster)")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "n/a" if v != v else f"{v:.2g}", ha="center", va="center",
                    fontsize=7)
    ax.set_xticks(range(len(forms)), forms, rotation=40, ha="right", fontsize=8)
    titles = {c["mlp_request"]: f"{c['title']} {c['sizes']}" for c in cases}
    ax.set_yticks(range(len(reqs)), [titles[r] for r in reqs], fontsize=8)
    ax.set_title("tanh MLPs, one per request, written every way: " + _zoo_title(data),
                 fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _ms(x: Any) -> str:
    return "-" if not x else f"{x:.3g}"


def _r(x: Any) -> str:
    return "-" if not x else (f"{x:.2f}" if x >= 0.1 else f"{x:.3f}")


def zoo_summary(data: dict[str, Any]) -> str:
    """The geometric means against issue 11's targets, as an RST list-table."""
    s, t = data["summary"], data.get("targets", {})
    rows = [["measure", "value", "over", "target"]]
    for key, what in (("geomean_all", "geometric mean, all cases, vs best eager torch.func"),
                      ("geomean_order3", "geometric mean, order >= 3, vs best eager"),
                      ("geomean_compile_order2",
                       "geometric mean, order >= 2, vs torch.compile'd best")):
        g = s.get(key) or {}
        rows.append([what, _r(g.get("value")), f"{g.get('n', 0)} cases",
                     f"<= {t.get(key, '-')}"])
    for key in sorted(k for k in s if k.startswith("geomean_") and k.endswith("_order2")
                      and k != "geomean_compile_order2"):
        g = s[key]
        rows.append([f"geometric mean, order >= 2, vs {key[8:-7]}", _r(g.get("value")),
                     f"{g.get('n', 0)} cases", "-"])
    rows.append(["parameter Hessian vs torch.func.hessian", _r(s.get("param_hessian_vs_hessian")),
                 "1 case", f"<= {t.get('param_hessian_vs_hessian', '-')}"])
    rows.append(["cases slower than the best eager nesting", str(len(s.get("losing", []))),
                 f"{len(data['cases'])} cases", "0"])
    spread = s.get("formulation_spread", {})
    if spread:
        worst = max(spread.values(), key=lambda v: v["spread"])
        rows.append(["largest spread of xafunc's time across MLP formulations",
                     f"{worst['spread']:.2f}x", f"{len(spread)} requests",
                     f"<= {t.get('formulation_spread', '-')}x"])
    return _list_table(rows)


def zoo_table(data: dict[str, Any]) -> str:
    """Every zoo case, as an RST list-table."""
    anchors = sorted({fw for c in data["cases"] for fw in c.get("anchors", {})})
    rows = [["case", "k", "xafunc ms", "plan", "best torch.func", "ms", "ratio",
             "torch.compile ms", "ratio", "compile s", "peak <= best"]
            + [f"{fw} ms / ratio" for fw in anchors] + ["check"]]
    for c in data["cases"]:
        comp = c.get("compile") or {}
        plan = c.get("plan_short") or "-"
        if c.get("fallback"):
            plan += f" ({c['fallback'].splitlines()[0]})"
        cms = _ms(comp.get("ms")) if comp.get("ms") else (comp.get("status") or "-")
        row = [c["name"], str(c["order"]), _ms(c.get("xafunc_ms")), plan.replace("*", r"\*"),
               f"``{c['best']}``" if c.get("best") else "-", _ms(c.get("best_ms")),
               _r(c.get("ratio")), cms, _r(c.get("compile_ratio")),
               f"{comp['compile_s']:.1f}" if comp.get("compile_s") else "-",
               {None: "-", True: "yes", False: "no"}[c.get("peak_ok")]]
        for fw in anchors:
            a = c.get("anchors", {}).get(fw, {})
            row.append(f"{_ms(a.get('ms'))} / {_r(a.get('ratio'))}" if a.get("ms") else "-")
        row.append(c["check"])
        rows.append(row)
    return _list_table(rows)


def _list_table(rows: list[list[str]]) -> str:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
        lines.append("   * - " + (row[0] or " "))
        lines += [f"     - {cell or ' '}" for cell in row[1:]]
    return "\n".join(lines) + "\n"


def write_zoo(path: str, outdir: str) -> None:
    data = _load(path)
    plot_zoo_models(data, os.path.join(outdir, "bench_zoo_models.png"))
    plot_zoo_formulations(data, os.path.join(outdir, "bench_zoo_formulations.png"))
    os.makedirs(outdir, exist_ok=True)
    m = data["meta"]
    header = (f"Measured {m['date']} on {m['device']} ({m.get('device_name')}), "
              f"xafunc {m['xafunc']} commit ``{m.get('commit')}``, torch {m['torch']}, "
              f"{m.get('threads')} threads, median of {m['repeat']} samples"
              + ("" if m.get("compile", True) else ", torch.compile skipped") + ".\n\n")
    with open(os.path.join(outdir, "bench_zoo_summary.rst"), "w") as fh:
        fh.write(header + zoo_summary(data))
    with open(os.path.join(outdir, "bench_zoo_table.rst"), "w") as fh:
        fh.write(zoo_table(data))


# ----------------------------------------------------------------------------------------
# training steps (training_table.py --json)
def _step_label(c: dict[str, Any]) -> str:
    return f"{c['label']} [{c['api']}]"


def plot_training(data: dict[str, Any], out: str) -> None:
    """Step time per case and API: xafunc (transform built inline) against the best eager
    torch.func step, with the issue's target ratio marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in data["cases"] if c.get("best_ms")]
    labels = [_step_label(c) for c in cases]
    n = len(cases)
    compiled = any(c.get("xafunc_compile_ms") for c in cases)
    fig, ax = plt.subplots(figsize=(8.5, (0.56 if compiled else 0.42) * n + 1.6))
    h = 0.27 if compiled else 0.38
    ys = list(range(n))
    bars = [("best_ms", None, "tab:blue", "best eager torch.func step"),
            ("xafunc_inline_ms", "ratio_inline", "tab:red",
             "xafunc step (transform built inline)")]
    if compiled:
        bars.append(("xafunc_compile_ms", "ratio_compile", "tab:orange",
                     "xafunc step, compile=True (inductor forward and backward)"))
    for k, (key, ratio, color, label) in enumerate(bars):
        off = (k - (len(bars) - 1) / 2) * h
        ax.barh([y + off for y in ys], [c.get(key) or 0 for c in cases], height=h,
                color=color, label=label)
        for y, c in zip(ys, cases):
            if ratio and c.get(ratio) is not None:
                ax.text(c[key] * 1.08, y + off, f"{c[ratio]:.2f}", va="center", fontsize=6)
    for y, c in zip(ys, cases):
        ax.plot([c["best_ms"] * c["target"]] * 2, [y - 0.45, y + 0.45], color="black", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (forward + backward; black tick: the issue's target, "
                  "ratio printed)", fontsize=8)
    m = data["meta"]
    ax.set_title(f"PINN training steps: xafunc {m['xafunc']} ({m.get('commit')}), torch "
                 f"{m['torch']}, {m['device']} {m['dtype']}, {m.get('threads')} thread(s), "
                 f"median of {m['repeat']}", fontsize=8)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6 / n - 0.05), ncol=2 if not compiled
              else 1, fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def training_table(data: dict[str, Any]) -> str:
    compiled = any(c.get("xafunc_compile_ms") for c in data["cases"])
    rows = [["case", "API", "xafunc inline ms", "xafunc held ms", "best torch.func",
             "ms", "ratio (inline)", "target"]
            + (["compile=True ms", "ratio (compile=True)"] if compiled else [])]
    for c in data["cases"]:
        rows.append([c["label"], c["api"], _ms(c.get("xafunc_inline_ms")),
                     _ms(c.get("xafunc_ms")), f"``{c.get('best')}``", _ms(c.get("best_ms")),
                     _r(c.get("ratio_inline")), f"<= {c['target']}"]
                    + ([_ms(c.get("xafunc_compile_ms")), _r(c.get("ratio_compile"))]
                       if compiled else []))
    return _list_table(rows)


def write_training(path: str, outdir: str) -> None:
    data = _load(path)
    plot_training(data, os.path.join(outdir, "bench_training.png"))
    with open(os.path.join(outdir, "bench_training_table.rst"), "w") as fh:
        fh.write(training_table(data))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="speedup plots from ratio_table.py / "
                                 "zoo_table.py --json")
    ap.add_argument("json", help="output of asv_bench/ratio_table.py --json")
    ap.add_argument("--out", default="bench_speedup.png", help="PNG to write")
    ap.add_argument("--table", help="also write an RST table here")
    ap.add_argument("--zoo", help="output of asv_bench/zoo_table.py --json (default: "
                    "zoo_results_cpu.json beside JSON, if it exists); its plots and tables "
                    "go next to --out")
    ap.add_argument("--training", help="output of asv_bench/training_table.py --json "
                    "(default: training_results_cpu.json beside JSON, if it exists)")
    opts = ap.parse_args(argv)
    data = _load(opts.json)
    plot(data, opts.out)
    if opts.table:
        os.makedirs(os.path.dirname(os.path.abspath(opts.table)), exist_ok=True)
        with open(opts.table, "w") as fh:
            fh.write(table(data))
    zoo = opts.zoo or os.path.join(os.path.dirname(os.path.abspath(opts.json)),
                                   "zoo_results_cpu.json")
    if opts.zoo or os.path.exists(zoo):
        write_zoo(zoo, os.path.dirname(os.path.abspath(opts.out)))
    training = opts.training or os.path.join(os.path.dirname(os.path.abspath(opts.json)),
                                             "training_results_cpu.json")
    if opts.training or os.path.exists(training):
        write_training(training, os.path.dirname(os.path.abspath(opts.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
