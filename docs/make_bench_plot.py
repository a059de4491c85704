"""Plot xafunc's speedup over the best torch.func strategy from ``ratio_table.py --json``.

    python docs/make_bench_plot.py RESULTS.json [--out speedup.png] [--table table.rst]

Speedup is ``best torch.func time / xafunc time`` (``1 / ratio``), one bar per case on a log
axis, with the target speedup (``1 / target ratio``) marked on each bar. ``--table`` also writes
the numbers as an RST table. ``docs/conf.py`` runs this at every build from the measured JSON
committed under ``docs/_static/``; nothing in the plot is typed in by hand.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="speedup plot from ratio_table.py --json")
    ap.add_argument("json", help="output of asv_bench/ratio_table.py --json")
    ap.add_argument("--out", default="bench_speedup.png", help="PNG to write")
    ap.add_argument("--table", help="also write an RST table here")
    opts = ap.parse_args(argv)
    data = _load(opts.json)
    plot(data, opts.out)
    if opts.table:
        os.makedirs(os.path.dirname(os.path.abspath(opts.table)), exist_ok=True)
        with open(opts.table, "w") as fh:
            fh.write(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
