"""JAX anchor for the model zoo: the same cases in JAX, as JSON for ``zoo_table.py --merge``.

JAX is a cross-framework reference, never a dependency of xafunc: run this script in its own
virtual environment (it imports only JAX, NumPy and the framework-free
``asv_bench/benchmarks/zoo_spec.py``)::

    python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax jaxlib numpy
    /tmp/jaxenv/bin/python asv_bench/jax_zoo.py --json jax.json           # every anchor
    /tmp/jaxenv/bin/python asv_bench/jax_zoo.py --cases 'mlp_order*,siren' --repeat 15
    python asv_bench/zoo_table.py --load zoo.json --merge jax.json        # add the column

Each *anchor* of ``zoo_spec.anchors()`` (one per zoo model; the MLP formulations of one
request share an anchor, since JAX has one way to write them) is implemented with the same
shapes, float32, weights drawn from a fixed NumPy seed (same distributions as the PyTorch zoo,
not the same numbers). Strategies, every one under ``jax.jit`` (and ``jax.vmap`` over the
batch where the case is per sample):

* derivative tensors: every nesting of ``jax.jacfwd``/``jax.jacrev`` up to order 3 (the same
  subset as the PyTorch zoo at order 4) and ``jax.hessian`` at order 2;
* Laplacian: trace of ``jax.hessian``, vmapped Hessian-vector products, and
  ``jax.experimental.jet`` along every coordinate direction (second coefficients summed);
* biharmonic: the fourth-derivative tensor contracted, Hessian-vector products of the
  Laplacian, and 4-jets along ``e_i`` and ``e_i +- e_j`` combined by polarisation;
* jet: ``jax.experimental.jet.jet`` with the series ``(v, 0, ..., 0)``, and nested ``jvp``.

Timing as in ``zoo_table.py``: the first call of each jitted strategy (trace + compile + run)
is its compile time; then one process, interleaved rounds, a sample being ``number`` calls
(about ``--sample-ms``), each call blocked until ready, median of ``--repeat``. Strategies whose
estimated intermediates (from the jaxpr's sizes) exceed ``--mem-budget-gib`` are skipped. The
strategies of one anchor are checked against each other (relative error); one that disagrees
is flagged and not counted as best.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks"))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import jet as jjet  # noqa: E402
from zoo_spec import anchors  # noqa: E402

Levels = tuple[str, ...]  # innermost first


# --------------------------------------------------------------------------------------------
# parameters and models
# --------------------------------------------------------------------------------------------


class _Init:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def normal(self, *shape: int, scale: float = 1.0) -> jnp.ndarray:
        return jnp.asarray(self.rng.standard_normal(shape) * scale, dtype=jnp.float32)

    def uniform(self, bound: float, *shape: int) -> jnp.ndarray:
        return jnp.asarray(self.rng.uniform(-bound, bound, shape), dtype=jnp.float32)

    def linear(self, n_in: int, n_out: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        """nn.Linear's default initialisation: U(-1/sqrt(n_in), 1/sqrt(n_in))."""
        b = 1 / math.sqrt(n_in)
        return self.uniform(b, n_out, n_in), self.uniform(b, n_out)


def _lin(p: tuple[jnp.ndarray, jnp.ndarray], h: jnp.ndarray) -> jnp.ndarray:
    w, b = p
    return h @ w.T + b


def _mlp(layers: list, h: jnp.ndarray, act: Callable = jnp.tanh) -> jnp.ndarray:
    for i, p in enumerate(layers):
        h = _lin(p, h)
        if i < len(layers) - 1:
            h = act(h)
    return h


def _mlp_layers(init: _Init, widths: tuple[int, ...], scaled: bool = False) -> list:
    if scaled:  # the MLP-formulation cases: W ~ N(0, 1/fan_in), b ~ N(0, 0.01)
        return [(init.normal(o, i, scale=1 / math.sqrt(i)), init.normal(o, scale=0.1))
                for i, o in itertools.pairwise(widths)]
    return [init.linear(i, o) for i, o in itertools.pairwise(widths)]


def _layer_norm(x: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps)


def build_model(anchor: str, spec: dict[str, Any]) -> tuple[Callable, tuple, int]:
    """``(f, args, argnums)`` for one sample of the anchor's model (batch added later)."""
    init = _Init(0)
    xin = _Init(1)
    model = spec["model"]
    if model == "mlp":
        layers = _mlp_layers(init, spec["widths"], scaled=True)
        return (lambda x: _mlp(layers, x)), (xin.normal(spec["widths"][0]),), 0
    if model in ("vmap_hessians", "vmap_laplacian", "biharmonic", "jet6"):
        layers = _mlp_layers(init, spec["widths"])
        args = (xin.normal(spec["widths"][0]),)
        if model == "jet6":
            args = (*args, _Init(2).normal(spec["widths"][0]))
        return (lambda x: _mlp(layers, x)), args, 0
    if model == "resmlp":
        inp = init.linear(spec["d_in"], spec["width"])
        blocks = [init.linear(spec["width"], spec["width"]) for _ in range(spec["depth"])]
        out = init.linear(spec["width"], spec["d_out"])

        def resmlp(x: jnp.ndarray) -> jnp.ndarray:
            h = _lin(inp, x)
            for p in blocks:
                h = h + jnp.tanh(_lin(p, h))
            return _lin(out, h)

        return resmlp, (xin.normal(spec["d_in"]),), 0
    if model == "siren":
        w0, widths = spec["w0"], spec["widths"]
        layers = []
        for j, (i, o) in enumerate(itertools.pairwise(widths)):
            bound = 1 / i if j == 0 else math.sqrt(6 / i) / w0
            layers.append((init.uniform(bound, o, i), init.uniform(1 / math.sqrt(i), o)))

        def siren(x: jnp.ndarray) -> jnp.ndarray:
            h = x
            for p in layers[:-1]:
                h = jnp.sin(w0 * _lin(p, h))
            return _lin(layers[-1], h)

        return siren, (xin.normal(widths[0], scale=0.5),), 0
    if model == "fourier_pinn":
        B = init.normal(spec["n_freq"], spec["d_in"], scale=spec["sigma"])
        layers = _mlp_layers(init, (2 * spec["n_freq"], *spec["widths"]))

        def fourier(x: jnp.ndarray) -> jnp.ndarray:
            z = 2 * math.pi * (x @ B.T)
            return _mlp(layers, jnp.concatenate([jnp.sin(z), jnp.cos(z)], -1))

        return fourier, (xin.normal(spec["d_in"], scale=0.5),), 0
    if model == "convnet":
        c, hh, ww = spec["image"]
        c1, c2 = spec["channels"]
        k1 = init.uniform(1 / math.sqrt(c * 9), c1, c, 3, 3)
        b1 = init.uniform(1 / math.sqrt(c * 9), c1)
        k2 = init.uniform(1 / math.sqrt(c1 * 9), c2, c1, 3, 3)
        b2 = init.uniform(1 / math.sqrt(c1 * 9), c2)
        fc = init.linear(c2 * ((hh + 1) // 2) * ((ww + 1) // 2), spec["d_out"])

        def conv(x: jnp.ndarray, k: jnp.ndarray, b: jnp.ndarray, stride: int) -> jnp.ndarray:
            y = jax.lax.conv_general_dilated(x[None], k, (stride, stride), ((1, 1), (1, 1)),
                                             dimension_numbers=("NCHW", "OIHW", "NCHW"))[0]
            return y + b[:, None, None]

        def convnet(x: jnp.ndarray) -> jnp.ndarray:
            h = jnp.tanh(conv(x, k1, b1, 1))
            h = jnp.tanh(conv(h, k2, b2, 2))
            return _lin(fc, h.reshape(-1))

        return convnet, (xin.normal(c, hh, ww),), 0
    if model == "transformer":
        d, nh, t = spec["d_model"], spec["heads"], spec["tokens"]
        qkv, proj = init.linear(d, 3 * d), init.linear(d, d)
        fc1, fc2 = init.linear(d, spec["mlp"]), init.linear(spec["mlp"], d)

        def block(x: jnp.ndarray) -> jnp.ndarray:
            dh = d // nh
            q, k, v = jnp.split(_lin(qkv, _layer_norm(x)), 3, axis=-1)
            q, k, v = (z.reshape(t, nh, dh).transpose(1, 0, 2) for z in (q, k, v))
            att = jax.nn.softmax(q @ k.transpose(0, 2, 1) / math.sqrt(dh), axis=-1)
            x = x + _lin(proj, (att @ v).transpose(1, 0, 2).reshape(t, d))
            return x + _lin(fc2, jax.nn.gelu(_lin(fc1, _layer_norm(x)), approximate=False))

        return block, (xin.normal(t, d),), 0
    if model in ("lstm", "gru"):
        hid, d_in = spec["hidden"], spec["d_in"]
        g = 4 if model == "lstm" else 3
        bound = 1 / math.sqrt(hid)
        w_ih, w_hh = init.uniform(bound, g * hid, d_in), init.uniform(bound, g * hid, hid)
        b_ih, b_hh = init.uniform(bound, g * hid), init.uniform(bound, g * hid)
        head = init.linear(hid, spec["d_out"]) if spec.get("d_out") else None
        sig = jax.nn.sigmoid

        def rnn(x: jnp.ndarray) -> jnp.ndarray:
            h = jnp.zeros(hid, x.dtype)
            c = jnp.zeros(hid, x.dtype)
            for t in range(x.shape[0]):
                gi, gh = w_ih @ x[t] + b_ih, w_hh @ h + b_hh
                if model == "lstm":
                    i, f, gg, o = jnp.split(gi + gh, 4)
                    c = sig(f) * c + sig(i) * jnp.tanh(gg)
                    h = sig(o) * jnp.tanh(c)
                else:
                    ir, iz, inn = jnp.split(gi, 3)
                    hr, hz, hn = jnp.split(gh, 3)
                    r, z = sig(ir + hr), sig(iz + hz)
                    h = (1 - z) * jnp.tanh(inn + r * hn) + z * h
            return _lin(head, h) if head is not None else h

        return rnn, (xin.normal(spec["steps"], d_in),), 0
    if model == "flow":
        dim, width = spec["dim"], spec["width"]
        half = dim // 2
        net, sc, sh = init.linear(half, width), init.linear(width, dim - half), \
            init.linear(width, dim - half)

        def flow(x: jnp.ndarray) -> jnp.ndarray:
            x1, x2 = x[:half], x[half:]
            h = jnp.tanh(_lin(net, x1))
            s = jnp.tanh(_lin(sc, h))
            y = jnp.concatenate([x1, x2 * jnp.exp(s) + _lin(sh, h)])
            return -0.5 * (y * y).sum() - 0.5 * dim * math.log(2 * math.pi) + s.sum()

        return flow, (xin.normal(dim),), 0
    if model == "mpnn":
        n, e, fdim, hid = spec["nodes"], spec["edges"], spec["features"], spec["hidden"]
        rng = np.random.default_rng(7)
        src, dst = jnp.asarray(rng.integers(0, n, e)), jnp.asarray(rng.integers(0, n, e))
        msg, upd = init.linear(2 * fdim, hid), init.linear(fdim + hid, fdim)

        def mpnn(x: jnp.ndarray) -> jnp.ndarray:
            m = jnp.tanh(_lin(msg, jnp.concatenate([x[src], x[dst]], -1)))
            agg = jnp.zeros((n, hid), x.dtype).at[dst].add(m)
            deg = jnp.maximum(jnp.zeros(n, x.dtype).at[dst].add(1.0), 1.0)
            return jnp.tanh(_lin(upd, jnp.concatenate([x, agg / deg[:, None]], -1)))

        return mpnn, (xin.normal(n, fdim),), 0
    if model == "param_hessian":
        widths = spec["widths"]
        params = {}
        for j, (i, o) in enumerate(itertools.pairwise(widths)):
            params[f"{2 * j}.weight"], params[f"{2 * j}.bias"] = init.linear(i, o)
        xs = xin.normal(spec["n_data"], widths[0])
        ys = _Init(2).normal(spec["n_data"], widths[-1])
        nl = len(widths) - 1

        def loss(p: dict, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
            layers = [(p[f"{2 * j}.weight"], p[f"{2 * j}.bias"]) for j in range(nl)]
            return ((_mlp(layers, x) - y) ** 2).mean()

        return loss, (params, xs, ys), 0
    raise ValueError(f"no JAX model for {anchor!r}")


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------


def nestings(order: int) -> list[Levels]:
    """Same set as the PyTorch zoo (``benchmarks/cases.py``)."""
    if order <= 3:
        return [tuple(p) for p in itertools.product(("rev", "fwd"), repeat=order)]
    return [("rev",) + ("fwd",) * (order - 1), ("fwd",) * order,
            ("rev", "rev") + ("fwd",) * (order - 2)]


def nesting_name(levels: Levels) -> str:
    names = ["jac" + lvl for lvl in reversed(levels)]
    return "(".join(names) + ")" * (len(names) - 1)


def _nest(f: Callable, levels: Levels, argnums: int = 0) -> Callable:
    g = f
    for lvl in levels:
        g = (jax.jacrev if lvl == "rev" else jax.jacfwd)(g, argnums=argnums)
    return g


def _multiplier(levels: Levels, n_in: int, n_out: int) -> int:
    mult, seen = 1, n_out
    for lvl in levels:
        mult *= seen if lvl == "rev" else n_in
        seen *= n_in
    return mult


def _trace(h: jnp.ndarray) -> jnp.ndarray:
    return jnp.trace(h, axis1=-2, axis2=-1)


def _hvp_laplacian(f: Callable) -> Callable:
    g = jax.grad(lambda x: f(x).sum())

    def lap(x: jnp.ndarray) -> jnp.ndarray:
        eye = jnp.eye(x.shape[-1], dtype=x.dtype)
        hv = jax.vmap(lambda v: jax.jvp(g, (x,), (v,))[1])(eye)
        return _trace(hv).reshape(1)

    return lap


def _jet_directional(f: Callable, order: int) -> Callable:
    """``(x, V) -> d^order/dt^order f(x + t v)`` for every row ``v`` of ``V`` (one jet each)."""
    zeros = [None] * (order - 1)

    def one(x: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
        series = [v] + [jnp.zeros_like(x) for _ in zeros]
        _, out = jjet.jet(f, (x,), (series,))
        return out[-1]

    return jax.vmap(one, in_axes=(None, 0))


def _jet_laplacian(f: Callable) -> Callable:
    d2 = _jet_directional(f, 2)
    return lambda x: d2(x, jnp.eye(x.shape[-1], dtype=x.dtype)).sum(0)


def _jet_biharmonic(f: Callable) -> Callable:
    """sum_ij f_iijj from 4-jets: along e_i (f_iiii) and e_i +- e_j, since
    D4[e_i + e_j] + D4[e_i - e_j] = 2 f_iiii + 12 f_iijj + 2 f_jjjj."""
    d4 = _jet_directional(f, 4)

    def bih(x: jnp.ndarray) -> jnp.ndarray:
        n = x.shape[-1]
        eye = jnp.eye(n, dtype=x.dtype)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        plus = jnp.stack([eye[i] + eye[j] for i, j in pairs])
        minus = jnp.stack([eye[i] - eye[j] for i, j in pairs])
        diag = d4(x, eye)  # (n, *out)
        pm = d4(x, plus) + d4(x, minus)  # (pairs, *out)
        ii = jnp.asarray([i for i, _ in pairs])
        jj = jnp.asarray([j for _, j in pairs])
        mixed = (pm - 2 * diag[ii] - 2 * diag[jj]) / 12  # f_iijj for i < j
        return diag.sum(0) + 2 * mixed.sum(0)

    return bih


def _nested_jvp(f: Callable, order: int) -> Callable:
    def run(x: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
        g = f
        for _ in range(order):
            g = (lambda h: lambda y: jax.jvp(h, (y,), (v,))[1])(g)
        return g(x)

    return run


def strategies(spec: dict[str, Any], f: Callable, sample: tuple, argnums: int
               ) -> dict[str, tuple[Callable, Levels | None]]:
    """``name -> (per-sample function of the arguments, nesting levels for the estimate)``."""
    req, k = spec["request"], spec["order"]
    out: dict[str, tuple[Callable, Levels | None]] = {}
    if req == "deriv":
        for lv in nestings(k):
            out[nesting_name(lv)] = (_nest(f, lv, argnums), lv)
        if k == 2:
            out["hessian"] = (jax.hessian(f, argnums=argnums), ("rev", "fwd"))
    elif req == "laplacian":
        out["trace(hessian)"] = (lambda x: _trace(jax.hessian(f)(x)), ("rev", "fwd"))
        out["vmap(hvp)"] = (_hvp_laplacian(f), ("rev", "fwd"))
        out["jet along e_i"] = (_jet_laplacian(f), ("fwd", "fwd"))
    elif req == "biharmonic":
        d4 = _nest(f, ("rev", "fwd", "fwd", "fwd"))
        out["einsum(D4 by jacfwd^3(jacrev))"] = (lambda x: jnp.einsum("oiijj->o", d4(x)),
                                                 ("rev", "fwd", "fwd", "fwd"))
        out["vmap(hvp) of vmap(hvp)"] = (_hvp_laplacian(_hvp_laplacian(f)),
                                         ("rev", "fwd", "rev", "fwd"))
        out["jet along e_i, e_i+-e_j"] = (_jet_biharmonic(f), ("fwd",) * 4)
    elif req == "jet":
        def jet_line(x: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
            series = [v] + [jnp.zeros_like(x)] * (k - 1)
            return jjet.jet(f, (x,), (series,))[1][-1]

        out["jax.experimental.jet"] = (jet_line, None)
        out[f"jvp^{k}"] = (_nested_jvp(f, k), None)
    else:
        raise ValueError(req)
    return out


def _act_bytes(f: Callable, sample: tuple, argnums: int) -> int:
    """Bytes of the intermediates of one forward pass that depend on the differentiated
    argument (from the jaxpr; weights and their transposes do not count), plus the output."""
    jaxpr = jax.make_jaxpr(f)(*sample).jaxpr
    counts = [len(jax.tree_util.tree_leaves(a)) for a in sample]
    start = sum(counts[:argnums])
    dep = set(jaxpr.invars[start:start + counts[argnums]])
    total = 0
    for eqn in jaxpr.eqns:
        if any(type(v).__name__ != "Literal" and v in dep for v in eqn.invars):
            for v in eqn.outvars:
                dep.add(v)
                total += int(np.prod(v.aval.shape, dtype=np.int64)) * v.aval.dtype.itemsize
    return total


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def _call(fn: Callable, args: tuple, number: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / number


def _rel_error(a: Any, b: Any) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb, strict=True)):
        return math.inf
    num = max((float(jnp.abs(x - y).max()) for x, y in zip(la, lb, strict=True) if x.size),
              default=0.0)
    den = max((float(jnp.abs(y).max()) for y in lb if y.size), default=0.0)
    return num / max(den, 1e-30)


def measure(anchor: str, spec: dict[str, Any], opts: argparse.Namespace) -> dict[str, Any]:
    f, sample, argnums = build_model(anchor, spec)
    batch = spec.get("batch")
    act = _act_bytes(f, sample[:1] if spec["request"] == "jet" else sample, argnums)
    diff = sample[argnums]
    n_in = sum(x.size for x in jax.tree_util.tree_leaves(diff))
    n_out = int(np.prod(np.shape(f(*(sample[:1] if spec["request"] == "jet" else sample)))))
    if batch:  # every batched case has one argument: samples spread around the first
        (x,) = sample
        args = (jnp.stack([x] * batch) + 0.1 * _Init(3).normal(batch, *x.shape),)
    else:
        args = sample
    rec: dict[str, Any] = {"anchor": anchor, "request": spec["request"], "order": spec["order"],
                           "batch": batch, "strategies": {}}
    fns: dict[str, Callable] = {}
    results: dict[str, Any] = {}
    for name, (g, levels) in strategies(spec, f, sample, argnums).items():
        key = f"jit(vmap({name}))" if batch else f"jit({name})"
        est = (batch or 1) * 2 * act * (_multiplier(levels, n_in, n_out) if levels else 2 ** 6)
        s: dict[str, Any] = {"estimated_bytes": est, "ms": None, "status": "ok"}
        rec["strategies"][key] = s
        if est > opts.mem_budget_gib * 2**30:
            s["status"], s["reason"] = "unavailable", \
                f"estimated {est / 2**30:.1f} GiB > budget {opts.mem_budget_gib:g} GiB"
            continue
        fn = jax.jit(jax.vmap(g) if batch else g)
        try:
            t0 = time.perf_counter()
            out = fn(*args)
            jax.block_until_ready(out)
            s["compile_s"] = time.perf_counter() - t0
        except Exception as e:  # XLA errors, out of memory
            s["status"], s["reason"] = "unavailable", f"{type(e).__name__}: {str(e)[:160]}"
            continue
        if s["compile_s"] > opts.first_call_timeout:
            s["status"], s["reason"] = "unavailable", \
                f"first call {s['compile_s']:.1f} s > {opts.first_call_timeout:g} s"
            continue
        results[key] = out
        fns[key] = fn
    if results:  # cross-check: every strategy against the first one
        ref_key = next(iter(results))
        tol = min(2e-2, 2e-4 * 4 ** (spec["order"] - 1))
        for key, out in results.items():
            err = _rel_error(out, results[ref_key])
            rec["strategies"][key]["rel_error_vs_" + ref_key] = err
            if not err <= tol:
                rec["strategies"][key]["status"] = "disagrees"
                rec["strategies"][key]["reason"] = \
                    f"relative error {err:.2e} against {ref_key}"
                print(f"*** {anchor}: {key} disagrees with {ref_key} ({err:.2e})",
                      file=sys.stderr)
        rec["result_shapes"] = [list(x.shape) for x in jax.tree_util.tree_leaves(
            results[ref_key])][:4]
    numbers = {}
    for key, fn in fns.items():
        if opts.number != "auto":
            numbers[key] = int(opts.number)
        else:
            sec = min(_call(fn, args) for _ in range(3))
            numbers[key] = max(1, min(1000, math.ceil(opts.sample_ms / 1e3 / max(sec, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(opts.repeat):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for key in order:
            times[key].append(_call(fns[key], args, numbers[key]))
    for key, ts in times.items():
        rec["strategies"][key]["ms"] = statistics.median(ts) * 1e3
        rec["strategies"][key]["number"] = numbers[key]
    ok = {k: s["ms"] for k, s in rec["strategies"].items()
          if s["ms"] is not None and s["status"] == "ok"}
    if ok:
        best = min(ok, key=ok.__getitem__)
        rec.update(best=best, best_ms=ok[best], compile_s=rec["strategies"][best]["compile_s"],
                   status="ok")
    else:
        rec.update(best=None, best_ms=None, compile_s=None, status="unavailable",
                   reason="no strategy ran")
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help="comma-separated anchor names or shell patterns "
                    "(default: all; --list shows them)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--number", default="auto")
    ap.add_argument("--sample-ms", type=float, default=20.0)
    ap.add_argument("--mem-budget-gib", type=float, default=4.0)
    ap.add_argument("--first-call-timeout", type=float, default=120.0,
                    help="a strategy whose first call (compile included) takes longer is "
                         "unavailable (120 s)")
    ap.add_argument("--json", metavar="PATH")
    opts = ap.parse_args(argv)
    all_anchors = anchors()
    if opts.list:
        for name, spec in all_anchors.items():
            print(f"{name:22s} {spec['title']}")
        return 0
    names = list(all_anchors)
    if opts.cases:
        pats = [p.strip() for p in opts.cases.split(",") if p.strip()]
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        if not names:
            ap.error(f"no anchor matches {opts.cases!r}; anchors: {', '.join(all_anchors)}")
    meta = {
        "framework": "jax", "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
        "device": str(jax.devices()[0]), "dtype": "float32", "repeat": opts.repeat,
        "number": opts.number, "sample_ms": opts.sample_ms, "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "script": "jax_zoo.py",
    }
    print(f"JAX {meta['jax']} on {meta['device']}, float32, median of {opts.repeat}\n")
    out: dict[str, Any] = {}
    for name in names:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        out[name] = rec = measure(name, all_anchors[name], opts)
        best = f"{rec['best']} {rec['best_ms']:.3g} ms (compile {rec['compile_s']:.1f} s)" \
            if rec["best"] else rec.get("reason")
        print(f"{name:22s} {best}")
        for key, s in rec["strategies"].items():
            val = f"{s['ms']:.3g} ms" if s["ms"] is not None else f"n/a ({s.get('reason')})"
            flag = "" if s["status"] == "ok" else f"  {s['status'].upper()}"
            print(f"    {key:44s} {val}{flag}")
        if opts.json:  # rewritten after each case: a run cut short keeps what it measured
            with open(opts.json, "w") as fh:
                json.dump({"meta": meta, "anchors": out}, fh, indent=1)
    if opts.json:
        print(f"\nwrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
