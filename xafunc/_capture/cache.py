"""The process-wide capture cache shared by every transform.

NOTE [The capture cache]
Transforms are written inline (``xderiv(f, 3)(params, x)`` in a training loop, a fresh lambda
every step), so nothing may be cached on the transform object. Captures are cached once per
process, keyed on what the function *is*: its code object for Python functions and lambdas
(``functools.partial`` and bound methods unwrapped to theirs), the object itself for modules
and other callables -- all held weakly, so a deleted model is collected. Under each key sit up
to :data:`MAX_ENTRIES` captures, most recently used first; each holds

* the call signature it was traced for: shapes, strides, dtypes, devices and
  ``requires_grad`` of the argument tensors (a function may read a stride or
  ``is_contiguous()`` in Python, and ``view`` fails on some layouts), the values of scalar
  arguments, the pytree structure, the default dtype and device and the autocast state (a
  call under a torch function or dispatch mode of the user's runs the reference: a mode may
  change what any operator returns);
* its :class:`~.guards.GuardSet` (NOTE [Guards and lifted tensors]), which re-reads the lifted
  tensors on every call and checks everything else the graph baked in;
* the plans built on it, one per :class:`~.request.Request`, so ``xderiv(f, 1)`` and
  ``xderiv(f, 3)`` and ``xlaplacian(f)`` share one capture.

A call whose signature matches and whose guards hold is a *hit*; otherwise the function is
traced again (a *miss*; a *recapture* when an entry with the same signature failed its guards).

NOTE [Capture storms]
A capture costs 0.1-1 s; a function that needs a new one on most calls -- a time ``t`` or a
step counter passed as a Python number (numbers are part of the signature by value: a graph
bakes them in), a global it reads reassigned every step, a batch whose size changes every step
outside ``vmap`` -- would be traced on every call, 10-100 times slower than nested torch.func.
Once a function has been traced :data:`STORM_AFTER` times and on at least half of its calls,
calls that match none of its captures run the reference without being traced (torch.func's
speed), and a warning, once, names what keeps changing (the argument, or the guard that keeps
failing) and the remedy, as torch.compile's recompile limit does; the captures it has keep
serving the calls they match. :func:`cache_info` reads the counters,
:func:`clear_cache` empties the cache.

NOTE [Python side effects]
Tracing runs ``func`` once, on values. A function may change the Python state it reads while
it runs (a call counter, an annealing step on a module, a lazily built attribute); torch.func
runs it exactly once per call, so its side effects happen once and it reads the state they
left. Right after the trace the state is checked against what was walked: a failed guard, or
a tensor slot (``self.h``) now holding a tensor ``func`` computed, is a change. Running ``func``
again -- the reference, or a second trace -- would repeat the side
effects (a counter would count twice and the result would use the doubled count), so:

* a capture that changed the state it reads is used **for this call only** (it is not
  cached): its graph is what this one run of ``func`` computed, and the next call traces again
  (a lazily built attribute is built once, and the next capture is kept);
* a tensor ``func`` stored in its state while traced is a plain tensor of its values
  afterwards (``_Recorder.release``; the values torch.func leaves there, without their
  autograd history), read afresh by the next capture like any other; one it stored while the
  reference ran (a tensor of a torch.func transform that has returned) behaves as its value,
  and the walk sends the call to the reference, since only a run of ``func`` can store the
  next one;
* the retries of a failed trace (values baked, no grad) are skipped once the state changed;
* a function that changes its state on :data:`SELF_CHANGES` captures in a row runs the
  reference from then on without being traced (``func`` once per call, as torch.func).

Left over: a function whose trace *fails* and that changed its state while being traced runs
once more in the reference on that call (the trace stopped part-way: there is nothing to run).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .guards import _SCALARS, GuardSet, _compiled, compile_guards, walk
from .trace import Captured, capture, capturing, default_device, reference_context
from .tracer import VALUE_DEPENDENT, note_unversioned, unversioned

#: captures kept per function (least recently used evicted)
MAX_ENTRIES = 8
#: captures of one function (on at least half its calls) after which calls matching none of
#: them run the reference without being traced (NOTE [Capture storms])
STORM_AFTER = 8
#: captures in a row that changed the Python state they read, after which the function runs
#: the reference without being traced (NOTE [Python side effects])
SELF_CHANGES = 3


@dataclass(frozen=True)
class CacheInfo:
    """Counters of the capture cache (see :func:`xafunc.cache_info`).

    Attributes:
        hits: Calls that reused a capture.
        misses: Calls that traced the function (first calls and recaptures).
        recaptures: Misses caused by a failed guard: state the graph depends on changed.
        functions: Functions with captures in the cache now.
        entries: Captures in the cache now.
    """

    hits: int
    misses: int
    recaptures: int
    functions: int
    entries: int


@dataclass
class Entry:
    """One capture of a function and everything built on it."""

    sig: Hashable
    captured: Captured
    guards: GuardSet | None
    plans: dict[Any, Any] = field(default_factory=dict)
    # how the trace changed the Python state it reads (NOTE [Python side effects]); such an
    # entry has no guards and serves its call only
    changed_state: str | None = None
    # the argument leaves and lifted tensors its graph reads as batch-norm running statistics
    # (NOTE [Unversioned writes]), by position: noted again on every hit, since a tensor that
    # replaced the traced one there passes the guards
    running_stats: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())


@dataclass
class _Slot:
    entries: list[Entry] = field(default_factory=list)
    recaptures: int = 0
    calls: int = 0
    traced: int = 0  # calls that captured (NOTE [Capture storms])
    storm: str | None = None  # once set, why calls matching no capture run the reference
    last_traced: list[Hashable] | None = None  # the leaf keys of the last call traced
    self_changes: int = 0  # captures in a row that changed the state they read
    # once ``self_changes`` reached SELF_CHANGES: the reference entry of each signature
    reference: dict[Hashable, Entry] | None = None
    reference_reason: str = ""


def identity(func: Any) -> Any:
    """What a function *is*, for caching: code objects for Python functions."""
    while True:
        t = type(func)
        if t is types.FunctionType:
            # a ``torch.compile``'d function runs its original while captured (``trace``)
            compiled = _compiled(func)
            if compiled is None:
                return func.__code__
            func = compiled[1]
        elif t is types.MethodType:
            func = func.__func__
        elif isinstance(func, functools.partial):
            func = func.func
        else:
            return func


def _float_key(v: float) -> Any:
    return (v, math.copysign(1.0, v)) if v == v else ("nan", id(v))


def _layout(t: Tensor) -> Hashable:
    """A tensor's strides (sparse layouts have none: the layout itself)."""
    return t.stride() if t.layout is torch.strided else t.layout


def _leaf_key(leaf: Any, objects: list[Any]) -> Hashable:
    t = type(leaf)
    if isinstance(leaf, Tensor):
        return (leaf.shape, leaf.dtype, leaf.device, leaf.requires_grad, _layout(leaf))
    if t is float:
        return (t, _float_key(leaf))
    if t in _SCALARS or t in (torch.device, torch.Size):
        return (t, leaf)
    objects.append(leaf)  # walked and guarded like closure state
    return ("object", t)


def _global_state() -> Hashable:
    """The process-wide settings a capture depends on: the default dtype and device; per
    device whether autocast is on and to which dtype it casts (a graph captured under bfloat16
    autocast has its casts recorded: never reuse it under float16). Inference mode is never on
    here: the call boundary turns it off (:func:`_eager_call`)."""
    cpu, cuda = torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")
    return (torch.get_default_dtype(), cpu and torch.get_autocast_dtype("cpu"),
            cuda and torch.get_autocast_dtype("cuda"),
            default_device())  # where factories allocate


def signature(args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[Hashable, list[Any] | None, Any, list[Any]]:
    """``(key, leaves, spec, objects)`` of a call; ``leaves``/``spec`` are None on the fast
    path (every argument a tensor), where the arguments are the leaves."""
    if not kwargs and all(type(a) is Tensor for a in args):
        fast: Hashable = tuple((a.shape, a.dtype, a.device, a.requires_grad, _layout(a))
                               for a in args)
        return (fast, _global_state()), None, None, []
    objects: list[Any] = []
    # without keyword arguments the positional ones alone (a 3-tuple, never equal to the
    # 2-tuple of both)
    structure = _structure(args, objects) if not kwargs else \
        _pair(_structure(args, objects), _structure(kwargs, objects))
    if structure is not None:  # plain containers: no TreeSpec needed unless we capture
        return (structure, _global_state()), None, None, objects
    objects = []
    leaves, spec = pytree.tree_flatten((args, kwargs))
    key = (spec, tuple(_leaf_key(leaf, objects) for leaf in leaves))
    return (key, _global_state()), leaves, spec, objects


def _pair(a: Hashable | None, b: Hashable | None) -> Hashable | None:
    return None if a is None or b is None else (a, b)


def _structure(obj: Any, objects: list[Any]) -> Hashable | None:
    """A key for ``obj`` made of exact dicts, lists and tuples whose leaves are tensors, None
    or scalars -- the same leaves, in the same order, as torch's pytree gives, each keyed by
    :func:`_leaf_key` -- or None for anything else (namedtuples, registered pytree nodes,
    other objects), which ``signature`` flattens with torch's pytree (3x slower)."""
    t = type(obj)
    if t is dict or t is list or t is tuple:
        parts: list[Hashable] = []
        for v in (obj.values() if t is dict else obj):
            if isinstance(v, Tensor):  # (``_leaf_key`` of a tensor, inline: a parameter dict)
                parts.append((v.shape, v.dtype, v.device, v.requires_grad, _layout(v)))
                continue
            part = _structure(v, objects)
            if part is None:
                return None
            parts.append(part)
        return (t, tuple(obj) if t is dict else len(obj), tuple(parts))
    if isinstance(obj, Tensor) or t in _SCALARS:
        return _leaf_key(obj, objects)
    return None


class CaptureCache:
    """See NOTE [The capture cache]."""

    def __init__(self) -> None:
        self._slots: weakref.WeakKeyDictionary[Any, _Slot] = weakref.WeakKeyDictionary()
        self._lock = threading.RLock()
        self.hits = self.misses = self.recaptures = 0

    def lookup(self, func: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any], differentiated: tuple[int, ...] = ()
               ) -> tuple[Entry, tuple[Tensor, ...]]:
        """The capture for this call and its lifted tensors, read now. ``differentiated``:
        the positional arguments a reverse-mode request differentiates, which require grad
        while ``func`` is traced, as they do inside nested ``torch.func.jacrev`` (a function
        may test ``x.requires_grad``, or differentiate itself with ``torch.autograd.grad``)."""
        if capturing():  # see ``capturing``: a fresh, uncached reference entry
            return Entry(None, Captured(reason="called inside a function being captured"),
                         None), ()
        why = reference_context()
        if why is not None:
            return Entry(None, Captured(reason=why), None), ()
        sig, leaves, spec, objects = signature(args, kwargs)
        if differentiated:
            sig = (sig, differentiated)
        key = identity(func)
        try:
            slot = self._slots.get(key)
        except TypeError:  # not weakly referenceable: never cached
            slot = None
            key = None
        failed: tuple[Entry, int] | None = None
        if slot is not None:
            for i, entry in enumerate(slot.entries):
                if entry.sig != sig or entry.guards is None:
                    continue
                lifted = entry.guards.check(func, objects)
                if type(lifted) is tuple:
                    self.hits += 1
                    slot.calls += 1
                    if entry.running_stats != ((), ()):
                        _note_running_stats(entry, args, kwargs, leaves, lifted)
                    if i:
                        slot.entries.insert(0, slot.entries.pop(i))
                    return entry, lifted
                if failed is None:  # the most recent capture's failing guard
                    failed = (entry, lifted)
        if slot is not None and slot.reference is not None:
            ref = slot.reference.get(sig)
            if ref is None:
                ref = slot.reference[sig] = Entry(sig, Captured(reason=slot.reference_reason),
                                                  None)
            self.hits += 1
            return ref, ()
        with self._lock:
            if slot is not None and slot.storm is not None:  # NOTE [Capture storms]
                self.hits += 1
                return Entry(sig, Captured(reason=slot.storm), None), ()
            self.misses += 1
            if leaves is None:
                leaves, spec = pytree.tree_flatten((args, kwargs))
            grad = _leaves_of(args, differentiated) if differentiated else frozenset()
            entry, lifted = _capture_entry(func, sig, leaves, spec, objects, grad)
            if key is None:
                return entry, lifted
            if slot is None:
                slot = self._slots.setdefault(key, _Slot())
            slot.self_changes = slot.self_changes + 1 if entry.changed_state else 0
            if slot.self_changes >= SELF_CHANGES:
                slot.reference = {}
                slot.reference_reason = (
                    f"it changes Python state it reads on every call ({entry.changed_state}): "
                    "running the graph of one call would repeat neither the change nor what "
                    "depends on it")
            if entry.guards is None:
                return entry, lifted
            if failed is not None:
                self.recaptures += 1
                slot.recaptures += 1
            slot.calls += 1
            slot.traced += 1
            traced = [_leaf_key(leaf, []) for leaf in leaves]
            if slot.traced >= STORM_AFTER and 2 * slot.traced >= slot.calls:
                slot.storm = _storm(func, slot, traced, leaves, spec, failed)
            slot.last_traced = traced
            slot.entries.insert(0, entry)
            del slot.entries[MAX_ENTRIES:]
            return entry, lifted

    def entries(self, func: Any) -> list[Entry]:
        """The captures of ``func`` in the cache, most recently used first."""
        try:
            slot = self._slots.get(identity(func))
        except TypeError:
            return []
        return list(slot.entries) if slot is not None else []

    def info(self) -> CacheInfo:
        slots = list(self._slots.values())
        return CacheInfo(self.hits, self.misses, self.recaptures, len(slots),
                         sum(len(s.entries) for s in slots))

    def clear(self) -> None:
        with self._lock:
            self._slots = weakref.WeakKeyDictionary()
            self.hits = self.misses = self.recaptures = 0


def _storm(func: Any, slot: _Slot, traced: list[Hashable], leaves: list[Any], spec: Any,
           failed: tuple[Entry, Any] | None) -> str:
    """Why ``func`` keeps being traced, for the plan; warned once (NOTE [Capture storms])."""
    before = slot.last_traced or []
    changed = [i for i, (a, b) in enumerate(zip(before, traced)) if a != b] \
        if len(before) == len(traced) else []
    if failed is not None:
        guards = failed[0].guards
        assert guards is not None
        why = f"state it reads keeps changing (last failing guard: {guards.describe(failed[1])})"
        remedy = ("Pass values that change as tensor arguments (read afresh on every call) "
                  "instead of Python state.")
    elif changed:
        paths = [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(
            pytree.tree_unflatten(leaves, spec))[0]]
        why = "its arguments keep changing: " + ", ".join(
            f"{('args' if paths[i].startswith('[0]') else 'kwargs') + paths[i][3:]} "
            f"({_shown(leaves[i])}, was {_shown(before[i])})" for i in changed)
        remedy = ""
        if any(not isinstance(leaves[i], Tensor) for i in changed):
            remedy += ("Pass a number that changes as a tensor (torch.tensor(value)), which is "
                       "read afresh on every call. ")
        if any(isinstance(leaves[i], Tensor) for i in changed):
            remedy += ("Keep tensor shapes to a few (pad the batch), or map a per-sample "
                       "function over the batch with torch.vmap, whose batch size is not part "
                       "of the capture.")
    else:
        why, remedy = f"its calls need more captures than the {MAX_ENTRIES} kept", ""
    warnings.warn(
        f"xafunc: {_name(func)} was traced on {slot.traced} of its {slot.calls} calls: {why}. "
        "From now on, calls that match none of its captures run nested torch.func without "
        f"being traced. {remedy}".rstrip(), stacklevel=_caller_level())
    return (f"{why}; it was traced on {slot.traced} of its {slot.calls} calls, so calls that "
            "match none of its captures run without being traced (NOTE [Capture storms])")


def _shown(leaf: Any) -> str:
    """A leaf, or its key (``_leaf_key``), as the storm warning shows it."""
    if isinstance(leaf, Tensor):
        leaf = _leaf_key(leaf, [])
    if type(leaf) is tuple and len(leaf) == 5 and isinstance(leaf[0], torch.Size):
        dense = type(leaf[4]) is not tuple or torch.empty_strided(
            leaf[0], leaf[4], device="meta").is_contiguous()
        return f"shape {tuple(leaf[0])}, {leaf[1]}" + ("" if dense else f", strides {leaf[4]}")
    if type(leaf) is tuple and len(leaf) == 2 and type(leaf[0]) is type:  # a scalar's key
        value = leaf[1]
        return repr(value[0] if leaf[0] is float and type(value) is tuple else value)
    return repr(leaf)


def _caller_level() -> int:
    """The ``stacklevel`` of a warning that points at the user's call of a transform: the
    first frame outside xafunc and torch (torch.compile's wrappers sit in between)."""
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and _library_frame(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _library_frame(filename: str) -> bool:
    return any(f"{os.sep}{pkg}{os.sep}" in filename for pkg in ("xafunc", "torch"))


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or type(func).__qualname__


def _leaves_of(args: tuple[Any, ...], positions: tuple[int, ...]) -> frozenset[int]:
    """Indices, among the leaves of ``(args, kwargs)``, of those of ``args`` at ``positions``."""
    out: list[int] = []
    start = 0
    for i, a in enumerate(args):
        n = len(pytree.tree_leaves(a))
        if i in positions:
            out.extend(range(start, start + n))
        start += n
    return frozenset(out)


def _capture_entry(func: Callable[..., Any], sig: Hashable, leaves: list[Any], spec: Any,
                   objects: list[Any], grad: frozenset[int]
                   ) -> tuple[Entry, tuple[Tensor, ...]]:
    if any(isinstance(v, Tensor) and v.is_meta for v in leaves):
        # no values to trace, bake or simplify on: the reference gives torch.func's shapes
        return Entry(sig, Captured(reason="its arguments are meta tensors, which hold no "
                                          "values to trace"), None), ()
    w = walk(func, objects)
    if w.problems:
        # nothing is traced, the reference runs ``func``; cached (the walk costs as much as a
        # small reference call) where every value reached was guarded: the same state has the
        # same problems
        reason = "; ".join(w.problems)
        guards = compile_guards(w, []) if w.complete and not w.leaked else None
        return Entry(sig, Captured(reason=reason), guards,
                     changed_state=reason if w.leaked else None), ()
    tensors = [lt.tensor for lt in w.lifted]
    cap = capture(func, leaves, spec, tensors, w.value_buffers, grad=grad)

    def replaced(indices: list[int], now: tuple[Tensor, ...]) -> str | None:
        return next((f"{w.lifted[i].where} was replaced by a tensor it computed"
                     for i, t in zip(indices, now) if t is not tensors[i]), None)

    def state_change() -> str | None:
        """How the run of ``func`` changed the state it reads, or None (NOTE [Python side
        effects]): a failed guard, or a tensor slot it filled with a tensor of its own."""
        everything = list(range(len(tensors)))
        guard = compile_guards(w, everything)
        now = guard.check(func, objects)
        return guard.describe(now) if type(now) is not tuple else replaced(everything, now)

    def unchanged() -> bool:  # a retry runs ``func`` again
        return state_change() is None

    if cap.graph is None and grad and cap.reason and _WRITES_GRAD_LEAF in cap.reason \
            and unchanged():
        # it writes to an argument it differentiates, which torch.func refuses too: traced
        # without requires_grad, the request reports that write (``request.Split``)
        grad = frozenset()
        cap = capture(func, leaves, spec, tensors, w.value_buffers)
    baked: list[int] = []
    if cap.graph is None and cap.reason and VALUE_DEPENDENT in cap.reason:
        # values read in Python or deciding shapes: bake the small non-float (and 0-dim)
        # tensors it reads into the graph, guarded by value, and try again
        baked = [i for i, t in enumerate(tensors) if t.numel() <= _BAKE_LIMIT
                 and (not t.is_floating_point() or t.dim() == 0)]
        if baked and unchanged():
            retry = capture(func, leaves, spec, tensors, w.value_buffers, set(baked), grad)
            cap = retry if retry.graph is not None else cap
            baked = baked if retry.graph is not None else []
    used = _prune_lifted(cap, len(tensors))
    used = [i for i in used if i not in baked]
    guards = compile_guards(w, used, baked)
    lifted = guards.check(func, objects)
    changed: str | None
    if type(lifted) is not tuple:
        changed = guards.describe(lifted)
    else:  # the tensors the graph reads were just re-read; the others need their own guard
        changed = replaced(used, lifted) or (
            state_change() if len(used) < len(tensors) else None)
    if changed is not None:
        # running ``func`` changed the state it reads (NOTE [Python side effects])
        # (never reused: no guards)
        if cap.graph is not None:  # this call's graph: ``func`` ran once, as under torch.func
            return Entry(sig, cap, None, changed_state=changed), tuple(
                w.lifted[i].tensor for i in used)
        cap = Captured(reason=f"it changes Python state it reads ({changed})")
        return Entry(sig, cap, None, changed_state=changed), ()
    stats = (tuple(i for i, v in enumerate(leaves) if isinstance(v, Tensor) and unversioned(v)),
             tuple(i for i, t in enumerate(lifted) if unversioned(t)))
    return Entry(sig, cap, guards, running_stats=stats), lifted


def _note_running_stats(entry: Entry, args: tuple[Any, ...], kwargs: dict[str, Any],
                        leaves: list[Any] | None, lifted: tuple[Tensor, ...]) -> None:
    """Note the tensors this call passes where ``entry``'s graph reads running statistics
    (NOTE [Unversioned writes])."""
    at_leaves, at_lifted = entry.running_stats
    if at_leaves:
        if leaves is None:
            leaves = pytree.tree_flatten((args, kwargs))[0]
        for i in at_leaves:
            note_unversioned(leaves[i])
    for i in at_lifted:
        note_unversioned(lifted[i])


_WRITES_GRAD_LEAF = "leaf Variable that requires grad is being used in an in-place operation"
_BAKE_LIMIT = 4096  # elements of a tensor baked into a graph (its values are guarded)


def _prune_lifted(cap: Captured, n_lifted: int) -> list[int]:
    """Drop the lifted inputs no graph reads; returns the indices of those kept."""
    if cap.graph is None:
        return []
    first_main = cap.n_args + cap.n_random
    main = [n for n in cap.graph.graph.nodes if n.op == "placeholder"][first_main:]
    pro: list[Any] = [n for n in cap.prologue.graph.nodes if n.op == "placeholder"][
        cap.n_args:] if cap.prologue is not None else [None] * n_lifted
    mutated = {i - cap.n_args for i in cap.mutated if i >= cap.n_args}
    used = [i for i in range(n_lifted)
            if main[i].users or (pro[i] is not None and pro[i].users) or i in mutated]
    keep = set(used)
    for i in range(n_lifted):
        if i not in keep:
            cap.graph.graph.erase_node(main[i])
            if pro[i] is not None:
                cap.prologue.graph.erase_node(pro[i])  # type: ignore[union-attr]
    cap.graph.recompile()
    if cap.prologue is not None:
        cap.prologue.recompile()
    remap = {old: new for new, old in enumerate(used)}
    cap.mutated = [i if i < cap.n_args else cap.n_args + remap[i - cap.n_args]
                   for i in cap.mutated]
    cap.n_lifted = len(used)
    return used


CACHE = CaptureCache()


_EAGER: Any = None


def eager_under_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a public transform so that torch.compile treats building and calling it as
    one graph break (see :func:`outside_compiler`)."""

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        return outside_compiler(fn, *args, **kwargs)

    return inner


def outside_compiler(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (by :func:`_eager_call`), never traced by torch.compile: once
    ``torch._dynamo`` is loaded, through ``torch._dynamo.disable``, so that a transform in a
    compiled function is one clean graph break, run eagerly (dynamo would otherwise trace into
    the capture machinery, while it compiles the caller and at run time, when a graph break
    hands it every frame called)."""
    if "torch._dynamo" not in sys.modules:  # nothing is compiled before it is imported
        return _eager_call(fn, *args, **kwargs)
    global _EAGER
    if _EAGER is None:
        from torch._dynamo import disable

        _EAGER = disable(_eager_call)
    return _EAGER(fn, *args, **kwargs)


def _eager_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with inference mode off and the caller's grad mode (off, under
    inference mode), as torch.func's derivative transforms run the function: their results
    are plain tensors, which autograd may save later, without history (weights that require
    grad are not recorded)."""
    if torch.is_inference_mode_enabled():
        grad = torch.is_grad_enabled()  # (leaving inference mode turns grad mode on)
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def cache_info() -> CacheInfo:
    """Counters of xafunc's capture cache: hits, misses, recaptures and its size.

    Every transform shares one process-wide cache of captured functions (keyed weakly on the
    function's code object, or the module/callable object), so transforms written inline reuse
    the work of earlier calls. A *recapture* means state the captured graph depends on changed
    (a Python scalar, a module flag, a hook, ...), which is detected by guards and costs a new
    trace, never a stale result.

    Example:
        >>> import torch, xafunc
        >>> xafunc.clear_cache()
        >>> f = lambda x: x.sin().sum()
        >>> for _ in range(3):
        ...     _ = xafunc.xhessian(f)(torch.ones(2))
        >>> info = xafunc.cache_info()
        >>> (info.misses, info.hits)
        (1, 2)
    """
    return CACHE.info()


def clear_cache() -> None:
    """Empty xafunc's capture cache and reset its counters (see :func:`cache_info`)."""
    CACHE.clear()
