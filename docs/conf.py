"""Sphinx configuration for the xafunc documentation.

Build:   sphinx-build -W -b html docs docs/_build/html
Doctest: sphinx-build -W -b doctest docs docs/_build/doctest

Three things are generated at build time, never by hand, into git-ignored folders:

* ``api/generated/``: the API reference, one autosummary entry per name in ``xafunc.__all__``
  (a new public name appears without editing any page);
* ``_generated/bench_speedup.png`` and ``_generated/bench_table.rst``: the benchmark plot and
  table, from the measured JSON in ``_static/`` (see ``make_bench_plot.py``);
* ``_generated/pinn_loss.png`` and ``_generated/pinn_solution.png``: the PINN tutorial's loss
  curve and solution, from a real training run of ``tutorials/pinn_poisson.py`` (about 5-10 s
  on one core; skipped while the plots are newer than the script and the package).

Intersphinx (torch, opt_einsum, Python) is used only for the inventories that can be reached
(or are cached under ``docs/_intersphinx/<name>.inv``), so an offline ``-W`` build passes.
Set ``XAFUNC_DOCS_INTERSPHINX=0`` to skip the probe, ``=1`` to require every inventory.
"""

from __future__ import annotations

import os
import sys
import threading
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # document the xafunc of this checkout
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "tutorials"))  # the tutorials' scripts, for doctests

import xafunc  # noqa: E402

project = "xafunc"
author = "xafunc developers"
copyright = "xafunc developers"
release = version = xafunc.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "_generated", "_intersphinx", "Thumbs.db", ".DS_Store"]
html_theme = "alabaster"
html_static_path = ["_static"]
html_theme_options = {"description": "arbitrary-order derivative transforms for PyTorch"}

# -- autodoc / autosummary / napoleon ------------------------------------------------------
autosummary_generate = True
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# `plan` and `Plan` would collide on case-insensitive file systems
autosummary_filename_map = {"xafunc.Plan": "xafunc.Plan-class"}

# -- doctest -------------------------------------------------------------------------------
doctest_global_setup = """
import torch
import xafunc
torch.manual_seed(0)
"""
doctest_default_flags = (
    __import__("doctest").ELLIPSIS
    | __import__("doctest").NORMALIZE_WHITESPACE
    | __import__("doctest").DONT_ACCEPT_TRUE_FOR_1
)

# -- intersphinx with an offline fallback --------------------------------------------------
_INVENTORIES = {
    "python": "https://docs.python.org/3",
    "torch": "https://docs.pytorch.org/docs/stable",
    "opt_einsum": "https://optimized-einsum.readthedocs.io/en/stable",
}


def _reachable(urls: dict[str, str], timeout: float = 4.0) -> set[str]:
    """The names whose ``objects.inv`` answers within ``timeout`` seconds (probed in parallel,
    in daemon threads, so a hanging DNS lookup cannot stall the build)."""
    ok: set[str] = set()

    def probe(name: str, url: str) -> None:
        try:
            with urllib.request.urlopen(url + "/objects.inv", timeout=timeout) as r:
                if r.status == 200:
                    ok.add(name)
        except Exception:
            pass

    threads = [threading.Thread(target=probe, args=kv, daemon=True) for kv in urls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return set(ok)


def _intersphinx_mapping() -> dict[str, tuple[str, str | None]]:
    setting = os.environ.get("XAFUNC_DOCS_INTERSPHINX", "auto").strip().lower()
    cached = {n: os.path.join(HERE, "_intersphinx", f"{n}.inv") for n in _INVENTORIES}
    mapping = {n: (u, cached[n]) for n, u in _INVENTORIES.items() if os.path.exists(cached[n])}
    remote = {n: u for n, u in _INVENTORIES.items() if n not in mapping}
    if setting in ("1", "on", "yes", "true"):
        mapping.update({n: (u, None) for n, u in remote.items()})
    elif setting in ("auto", "") and remote:
        live = _reachable(remote)
        mapping.update({n: (remote[n], None) for n in live})
        missing = sorted(set(remote) - live)
        if missing:
            print(f"[xafunc docs] intersphinx offline for {', '.join(missing)}: "
                  "links to those docs are left as plain text")
    return mapping


intersphinx_mapping = _intersphinx_mapping()
intersphinx_timeout = 10

# -- generated pages -----------------------------------------------------------------------


def _write_if_changed(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path) as fh:
            if fh.read() == text:
                return
    with open(path, "w") as fh:
        fh.write(text)


def _api_listing() -> None:
    """``api/generated/public.rst``: an autosummary of every name in ``xafunc.__all__``."""
    names = list(xafunc.__all__)
    functions = [n for n in names if not isinstance(getattr(xafunc, n), type)]
    classes = [n for n in names if isinstance(getattr(xafunc, n), type)]
    lines = ["Public names", "============", "", ".. currentmodule:: xafunc", ""]
    for title, group in (("Transforms and functions", functions), ("Classes", classes)):
        if not group:
            continue
        lines += [title, "-" * len(title), "", ".. autosummary::", "   :toctree: .",
                  "   :nosignatures:", ""]
        lines += [f"   {n}" for n in group] + [""]
    _write_if_changed(os.path.join(HERE, "api", "generated", "public.rst"), "\n".join(lines))


def _bench_plot() -> None:
    import make_bench_plot

    make_bench_plot.main([
        os.path.join(HERE, "_static", "bench_results_cpu.json"),
        "--out", os.path.join(HERE, "_generated", "bench_speedup.png"),
        "--table", os.path.join(HERE, "_generated", "bench_table.rst"),
    ])


def _newest_mtime(folder: str) -> float:
    return max(os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(folder)
               for f in fs if f.endswith(".py"))


def _pinn_plots() -> None:
    """Train the tutorial's PINN and plot it, unless the plots are newer than its sources."""
    out = os.path.join(HERE, "_generated")
    plots = [os.path.join(out, n) for n in ("pinn_loss.png", "pinn_solution.png")]
    script = os.path.join(HERE, "tutorials", "pinn_poisson.py")
    sources = max(os.path.getmtime(script), _newest_mtime(os.path.dirname(xafunc.__file__)))
    if all(os.path.exists(p) and os.path.getmtime(p) > sources for p in plots):
        return
    import pinn_poisson

    print("[xafunc docs] training the tutorial PINN for its plots")
    pinn_poisson.main(["--out", out])


_api_listing()
_bench_plot()
_pinn_plots()
