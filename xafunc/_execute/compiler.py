"""Compiling a propagation: trace it once, run the generated graph on every call.

NOTE [Compiled propagation]
The first call traces the whole propagation -- every rule, the interpolation, the joins -- into
one flat aten graph (NOTE [Tracer]), simplified by :func:`~xafunc._execute.optimize.simplify`,
so later calls run generated code: no rule dispatch, no ``None`` bookkeeping, no Python per
coefficient; the graph runs through :class:`~xafunc._execute.executable.Executable` (NOTE
[Fast execution]). Constants (seeds, interpolation matrices) must be built by ``prepare``
before tracing so that they enter the graph as constants. If the propagation cannot be traced
(values that decide shapes), it runs eagerly.

NOTE [Batched fast path]
Run per sample under ``vmap``, every operator of the compiled graph goes through functorch's
batching rules. When the innermost transform is the ``vmap`` that batches our inputs, we
instead trace ``vmap(eager)`` on the underlying batched tensors once (tracing turns it into
plain batched operators) and run that, re-attaching the batch dimension to the results. Its
level is popped while the graph runs, so the tensors it batched do not pass through its
batching rules: alone, the fast executor applies; under ``grad`` levels (a PINN loss
differentiated by ``torch.func.grad``), the tensors are the grad levels' and the graph is
applied there as one operation on a GPU (NOTE [Backward graphs]), or op by op at those levels
only on a CPU (the PINN training steps of ``asv_bench/training_table.py`` under
``torch.func.grad``: up to 1.4x faster than the per-sample graph through the ``vmap`` level
too, a third-order residual in 2 inputs the most, none slower by more than the noise).
Anything else (other transforms in between, inputs batched at different levels, a layout
beyond the ``MAX_BATCHED_LAYOUTS`` traced per propagation) takes the general path. So do the
first ``TRACE_AFTER - 1`` calls of a layout other than the first: tracing one costs 0.1-0.2 s,
what some 200 calls save over the general path (itself 3-4x faster than nested torch.func
through ``vmap``), so only a batch size that keeps coming back is traced -- not each of the
sizes of a loop whose batch size grows or is drawn at random every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._capture.trace import CaptureError, trace
from .executable import Executable, map_tensors, outside_transforms
from .optimize import simplify

_NO_FAST_PATH: Any = object()
#: batched graphs traced per propagation; a call with another layout (a new batch size, say,
#: every step) runs per sample through vmap's batching rules instead of tracing again (tens of
#: milliseconds each) into a cache that would grow without bound
MAX_BATCHED_LAYOUTS = 8
#: calls of a batched layout (other than a propagation's first) after which it is traced
TRACE_AFTER = 16
#: layouts met and not traced (yet), counted per compiler
_MAX_SIGHTED = 256


class Compiler:
    """Compiled graphs of one plan's propagations, by key (and batch layout under vmap)."""

    def __init__(self, n_static: int = 0, compile: bool = False) -> None:
        self.fns: dict[Any, Callable[..., Any]] = {}
        self._layouts: dict[Any, int] = {}  # batched graphs traced per key
        self._sighted: dict[Any, int] = {}  # calls of batched layouts not traced (yet)
        self.note: str | None = None
        self.n_static = n_static  # the last inputs are static (see ``Executable``)
        # plain calls run inductor's code (NOTE [Inductor executor]); ``set_compile`` may
        # turn it off while candidates are timed
        self.compile = compile
        self.wants_compile = compile

    def set_compile(self, enabled: bool) -> None:
        """Turn the inductor executor on or off for the graphs built from now on and for
        those already built (they compile on their next plain call)."""
        self.compile = enabled
        for fn in self.fns.values():
            if isinstance(fn, Executable):
                fn.compile = enabled

    def executables(self) -> list[Executable]:
        """The compiled graphs built so far."""
        return [fn for fn in self.fns.values() if isinstance(fn, Executable)]

    def describe(self, keys: list[Any] | None = None) -> str:
        """What runs the compiled graphs of ``keys`` (all if None; batched variants under
        ``vmap`` included) with ``compile=True``: ``"inductor (compile=True), compiled in
        1.23 s"``, or why not."""
        exes = [fn for k, fn in self.fns.items() if isinstance(fn, Executable) and (
            keys is None or k in keys
            or (isinstance(k, tuple) and len(k) == 4 and k[1] == "vmap" and k[0] in keys))]
        seconds = [s for s in (e.compile_seconds for e in exes) if s is not None]
        parts = []
        if seconds:
            graphs = f"{len(seconds)} graphs " if len(seconds) > 1 else ""
            parts.append(f"inductor (compile=True), {graphs}compiled in {sum(seconds):.2f} s")
        parts += [e.executor for e in exes if e.compile_seconds is None and e.executor != "fx"]
        if not parts:
            return ("inductor (compile=True), compiled on the first call without gradient "
                    "recording or torch.func transform")
        return "; ".join(dict.fromkeys(parts))

    def run(self, key: Any, prepare: Callable[[], None] | None, eager: Callable[..., Any],
            z: Tensor, others: list[Tensor]) -> Any:
        """``eager(z, *others)``, through its compiled graph (built on first use).

        ``prepare=None`` means: do not compile, run ``eager``.
        """
        batched = self._run_batched(key, prepare, eager, z, others)
        if batched is not None:
            return batched
        fn = self.fns.get(key)
        if fn is None:
            if prepare is None:
                fn = eager
            else:
                outside_transforms(prepare)
                fn = self._trace(eager, [z, *others])
            self.fns[key] = fn
        return fn(z, *others)

    def _run_batched(self, key: Any, prepare: Callable[[], None] | None,
                     eager: Callable[..., Any], z: Tensor, others: list[Tensor]) -> Any:
        fx = torch._C._functorch
        if prepare is None or not fx.is_batchedtensor(z):
            return None
        level = fx.maybe_get_level(z)
        if fx.maybe_current_level() != level:
            return None
        phys, dims = [], []
        for v in [z, *others]:
            if fx.is_batchedtensor(v):
                if fx.maybe_get_level(v) != level:
                    return None
                inner, bdim = fx.get_unwrapped(v), fx.maybe_get_bdim(v)
            else:
                inner, bdim = v, None
            phys.append(inner)
            dims.append(bdim)
        bkey = (key, "vmap", tuple(dims), tuple(tuple(p.shape) for p in phys))
        fn = self.fns.get(bkey)
        if fn is None:
            traced = self._layouts.get(key, 0)
            if traced >= MAX_BATCHED_LAYOUTS:
                return None
            calls = self._sighted.get(bkey, 0) + 1
            if traced and calls < TRACE_AFTER:  # traced once it keeps coming back
                if len(self._sighted) >= _MAX_SIGHTED:
                    self._sighted.clear()
                self._sighted[bkey] = calls
                return None
            self._sighted.pop(bkey, None)
            self._layouts[key] = traced + 1
            outside_transforms(prepare)
            try:
                fn = Executable(simplify(trace(torch.vmap(eager, in_dims=tuple(dims)), phys),
                                           inexact=True), self._n_static(dims), self.compile)
            except CaptureError:
                fn = _NO_FAST_PATH
            self.fns[bkey] = fn
        if fn is _NO_FAST_PATH:
            return None
        # ours is the innermost transform: run the batched graph outside it, on the tensors
        # it batches (plain, or wrapped by the transforms around it, which still apply): no
        # per-op trip through its batching rules (see NOTE [Fast execution])
        saved = fx.pop_dynamic_layer_stack()
        try:
            out = fn(*phys)
        finally:
            fx.push_dynamic_layer_stack(saved)
        return map_tensors(lambda t: fx._add_batch_dim(t, 0, level), out)

    def _n_static(self, dims: list[int | None]) -> int:
        """Static inputs of a batched trace: the trailing unbatched ones among the static."""
        n = 0
        for d in reversed(dims[len(dims) - self.n_static:] if self.n_static else []):
            if d is not None:
                break
            n += 1
        return n

    def _trace(self, eager: Callable[..., Any], examples: list[Tensor]) -> Callable[..., Any]:
        try:
            return Executable(simplify(trace(eager, examples), inexact=True), self.n_static,
                              self.compile)
        except CaptureError as e:
            self.note = f"propagation runs eagerly ({e})"
            return eager
