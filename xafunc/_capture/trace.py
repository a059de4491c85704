"""Tracing: a function and the tensors it reads, as one functional aten graph.

NOTE [Capture]
The tracer (:func:`~.tracer.record`, NOTE [Tracer]) records the aten operators ``func`` runs;
data-dependent Python control flow (``if x.sum() > 0``, ``.item()``) cannot be traced and
raises, which sends the request to the reference strategy instead of silently baking in one
branch. Composite operators are decomposed into a small core set (:mod:`.decompositions`), then
a second recording under ``functionalize`` removes in-place operators. :func:`capture` adds
what makes the graph *mean* what ``func`` means under torch.func:

* **Lifted tensors.** Every tensor ``func`` reads besides its arguments (closures, globals,
  module parameters and buffers, attributes; found by :func:`~.guards.walk`) is replaced, at
  the point of use, by a stand-in that is a graph input (``_StandIns``, a
  ``TorchFunctionMode``). The graph never holds the caller's tensors: they are read afresh on
  every call. A tensor that reaches an operator without having been found by the walk cannot be
  re-read, so capture fails rather than freezing it.
* **Stop-gradients.** ``detach`` stays in the graph, where it has a zero-derivative rule.
  ``x.data`` and ``t.detach_()`` are recorded as ``detach`` too, but nested torch.func cuts
  them at the innermost level only (``jacrev(jacrev(lambda x: x.data * x * x))`` is not ``2
  x.data``), so requests beyond first order on such a function run the reference
  (``Captured.level_local``). A write *through* a detached alias (``y.detach().mul_(0)``,
  ``y.data[0] = 1``, a view of either) makes the capture fail: torch changes ``y``'s values
  but not its derivative history, which only the reference reproduces. Operators that run
  while grad mode is off (``torch.no_grad()``, ``set_grad_enabled(False)``) have their
  outputs detached (the tracer's ``no_grad_cut``), exactly what autograd does;
  ``torch.inference_mode``, ``torch.autograd.Function`` subclasses (a custom backward
  defines the derivative, which a Taylor rule cannot see; the tracer tells its forward by
  grad mode and forward grad mode both off), torch function and dispatch modes
  the function enters (their Python code may change any operator's result), gradient hooks
  (``h.register_hook``) and reads of ``y.grad_fn`` (whose hooks cannot be seen) make the
  capture fail, so the reference honours them as torch.func does.
* **Side effects.** In-place updates of inputs (a train-mode BatchNorm's running statistics,
  a counter buffer) become, after functionalization, extra graph outputs: the new values,
  written back once per call after the derivative was computed (``Captured.mutated``), so a
  failed call changes nothing and a successful one updates buffers exactly as one torch.func
  call does.
* **Randomness.** Random operators are hoisted into a *prologue* graph whose outputs are extra
  inputs of the main graph, drawn once per call in program order by the same kernels eager
  code runs (``rand_like(x)`` becomes ``rand`` of ``x``'s shape, a fused ``native_dropout``
  becomes its mask times the input), so every part of a schedule sees one realisation and the
  draws match torch.func's after ``torch.manual_seed``. Tracing runs on values and draws too;
  the caller's RNG state is restored around it (NOTE [Tracer]).
"""

from __future__ import annotations

import contextlib
import operator
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

import torch
from torch import Tensor
from torch.fx import Graph, GraphModule, Node
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._device import DeviceContext
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as _dispatch_modes

from . import writes
from .contractions import products_as_contractions
from .decompositions import capture_overrides, decomposition_table
from .tracer import is_traced, record

aten = torch.ops.aten


class CaptureError(Exception):
    """The function could not be traced into an aten graph; the message says why."""


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:200]}"


# ------------------------------------------------------------------------------ tracing modes
def _swap(x: Any, table: dict[int, Tensor]) -> Any:
    if isinstance(x, Tensor):
        return table.get(id(x), x)
    if type(x) in (list, tuple):
        return type(x)(_swap(v, table) for v in x)
    if type(x) is dict:
        return {k: _swap(v, table) for k, v in x.items()}
    return x


class _StandIns(TorchFunctionMode):
    """Replace the caller's tensors by their graph-input stand-ins wherever they are used."""

    def __init__(self, table: dict[int, Tensor], callers: dict[int, Tensor],
                 value_buffers: list[tuple[int, int]], baked: dict[int, Tensor]) -> None:
        super().__init__()
        self.table = table
        # stand-in id -> the caller's tensor it stands for: an operator that returns its
        # argument itself (``w.add_(1)``, ``out=w``, a ``w.to(w.dtype)`` that converts nothing)
        # returns the caller's tensor, as in eager code, so ``self.u = normalize(.., out=self.u)``
        # stores no stand-in in the caller's state
        self.callers = callers
        self.value_buffers = value_buffers
        self.baked = baked
        self.made: dict[int, Tensor] = {}  # constants made from the baked tensors
        self.level_local: str | None = None
        # results of ``x.detach()`` / ``x.data`` (kept alive: their ids stay theirs)
        self.detached: dict[int, Tensor] = {}
        self.refused: str | None = None  # why the capture fails (``refuse``)

    def refuse(self, why: str) -> NoReturn:
        """Fail the capture: raise, and remember why, so that a function catching the error
        fails it all the same (as ``_Recorder.refuse``)."""
        if self.refused is None:
            self.refused = why
        raise CaptureError(why)

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func is Tensor.detach_:
            # later uses of the tensor read its detached value
            self.level_local = "detach_()"
            t = args[0]
            self.table[id(t)] = _swap(t, self.table).detach()
            return t
        if _from_differentiable_graph((args, kwargs)):
            self.refuse(_DIFFERENTIABLE_GRAPH)
        if _hooks_gradients(func, args):
            self.refuse(
                "it registers a hook on a tensor's gradient (x.register_hook) or reads a "
                "tensor's grad_fn (to hook or walk the autograd graph): only nested torch.func "
                "runs those")
        data = getattr(func, "__self__", None) in writes.DATA_DESCRIPTORS
        if data:
            self.level_local = "x.data"
        if self.detached and _writes_self(func) and args and self._detached_alias(args[0]):
            # torch writes the values through the shared storage but keeps the original's
            # derivative history: a graph cannot say both, nested torch.func can
            self.refuse(
                "it writes in place to a detached alias (x.detach() or x.data, or a view of "
                "one): the original tensor sees the new values with its derivative history "
                "unchanged, which only nested torch.func reproduces")
        if self.baked and any(id(t) in self.baked for t in pytree.tree_leaves((args, kwargs))
                              if isinstance(t, Tensor)):
            return self._with_baked(func, args, kwargs or {})
        args = _swap(args, self.table)
        kwargs = _swap(kwargs or {}, self.table)
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and not is_traced(t) and id(t) not in self.made \
                    and not self._guarded_value(t):
                self.refuse(
                    f"it reads a tensor (shape {tuple(t.shape)}, {t.dtype}) that xafunc found no "
                    "path to (closure, global, module attribute), so it could not be re-read on "
                    "each call")
        if data and getattr(func, "__name__", None) == "__get__":
            # a stop-gradient, recorded as one: the tracer takes the other shallow copies of a
            # tensor (autograd's saved values) for the tensor itself (NOTE [Tracer])
            out = args[0].detach()
            self.detached[id(out)] = out
            return out
        out = func(*args, **kwargs)
        if func is Tensor.detach:
            self.detached[id(out)] = out
        return _swap(out, self.callers)

    def _detached_alias(self, t: Any) -> bool:
        if not isinstance(t, Tensor):
            return False
        base = t._base if t._is_view() else None
        return id(t) in self.detached or (base is not None and id(base) in self.detached)

    def _with_baked(self, func: Any, args: Any, kwargs: Any) -> Any:
        """An operator reading a tensor baked into the graph (see ``capture``): Python reads of
        its values (``.item()``) return them, a boolean mask becomes the index tensors it
        selects (a shape known now), and anywhere else it is a constant of the graph."""
        from torch.utils._python_dispatch import _disable_current_modes

        # read the real values with no tracer or fake mode watching
        untraced = _disable_current_modes
        if func in _VALUE_READS:
            with untraced():
                return func(*args, **kwargs)

        def constant(t: Any, as_index: bool = False) -> Any:
            if not (isinstance(t, Tensor) and id(t) in self.baked):
                return t
            with untraced():  # copies of the values: constants of the graph
                made = t.nonzero(as_tuple=True) if as_index and t.dtype is torch.bool \
                    else t.detach().clone()
            for c in made if isinstance(made, tuple) else (made,):
                self.made[id(c)] = c
            return made

        if getattr(func, "__name__", None) == "__getitem__":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            flat: list[Any] = []
            for i in index:
                c = constant(i, as_index=True)
                flat.extend(c if isinstance(c, tuple) else (c,))
            args = (args[0], tuple(flat))
        args = pytree.tree_map(constant, args)
        kwargs = pytree.tree_map(constant, kwargs)
        return self.__torch_function__(func, (), args, kwargs)

    def _guarded_value(self, t: Tensor) -> bool:
        """A tensor viewing the memory of a numpy array guarded by value (``from_numpy``):
        a constant of the graph, re-captured when the array changes."""
        try:
            ptr = t.untyped_storage().data_ptr()
        except RuntimeError:
            return False
        return any(start <= ptr < start + max(size, 1) for start, size in self.value_buffers)


_IN_PLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                               "__ifloordiv__", "__imod__", "__ipow__", "__imatmul__",
                               "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"})


def _writes_self(func: Any) -> bool:
    """``func`` writes to its first argument: an in-place method (``mul_``, ``copy_``,
    ``zero_``, ``torch.relu_``, ...) or an in-place operator (``+=``, ``t[i] = v``)."""
    name = getattr(func, "__name__", "")
    if name in ("requires_grad_", "share_memory_", "detach_"):  # flags, not values
        return False
    return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS


# reads of a tensor's values into Python
_VALUE_READS = {Tensor.item, Tensor.tolist, Tensor.__float__, Tensor.__int__, Tensor.__bool__,
                Tensor.__index__}


# the ``grad_fn`` property of tensors
_GRAD_FN = torch._C.TensorBase.__dict__["grad_fn"]

def _hooks_gradients(func: Any, args: Any) -> bool:
    """``func`` registers a gradient hook, or reads ``y.grad_fn`` of a tensor of the trace
    (whose ``register_hook``/``register_prehook`` the tracer cannot see): either changes or
    may change the derivatives reverse mode computes. A caller's tensor read for its
    ``grad_fn`` (``register_parameter`` checks that it is a leaf) is not the trace's."""
    if func is Tensor.register_hook:
        return True
    return (getattr(func, "__self__", None) is _GRAD_FN
            and getattr(func, "__name__", None) == "__get__" and bool(args)
            and is_traced(args[0]))


def _from_differentiable_graph(tree: Any) -> bool:
    """A tensor of the trace in ``tree`` was made by a differentiable graph of TorchScript's
    executor (its forward ran with grad mode off, cut by the trace; NOTE [TorchScript])."""
    for t in pytree.tree_leaves(tree):
        if isinstance(t, Tensor) and is_traced(t):
            node = t.grad_fn
            if node is not None and type(node).__name__ == "CppFunction" \
                    and "DifferentiableGraph" in node.name():
                return True
    return False


_DIFFERENTIABLE_GRAPH = ("it runs TorchScript code whose executor differentiates its own graph "
                         "(NOTE [TorchScript])")
_WATCH = threading.local()
_TRACING = threading.local()


def capturing() -> bool:
    """True while :func:`capture` traces a function on this thread. A transform called inside
    the traced function then runs nested torch.func on its own function, which the outer trace
    records (a capture inside a capture would record into the outer graph twice)."""
    return getattr(_TRACING, "depth", 0) > 0


def _users(mode: Any) -> bool:
    """A torch function or dispatch mode of the user's: not a default device (which the
    signature keys on) nor one of xafunc's own."""
    return type(mode) is not DeviceContext and not type(mode).__module__.startswith("xafunc.")


def reference_context() -> str | None:
    """Why the context of a call makes it run the reference, neither traced nor cached, if it
    does:

    * the user's torch function or dispatch mode is active around it: torch.func runs
      ``func`` under it, and a mode may change what any operator returns from Python state no
      guard reads;
    * autograd's anomaly detection is on: torch.func's backward passes are checked (a NaN
      gradient raises, naming the operator that made it), which a derivative graph is not,
      and the checks read values that no trace may read."""
    if torch.is_anomaly_enabled():
        return "autograd anomaly detection is on (torch.autograd.set_detect_anomaly)"
    for i in range(torch._C._len_torch_function_stack()):
        mode = torch._C._get_function_stack_at(i)
        if _users(mode):
            return f"a torch function mode ({type(mode).__name__}) is active"
    if torch._C._len_torch_dispatch_stack():
        users = [type(m).__name__ for m in _dispatch_modes() if _users(m)]
        if users:
            return f"a torch dispatch mode ({users[0]}) is active"
    return None


def default_device() -> torch.device | None:
    """The device of the innermost ``with torch.device(...)`` / ``set_default_device``, if
    any (``torch.get_default_device()`` costs 14 us: it makes a tensor to find the index)."""
    for i in range(torch._C._len_torch_function_stack() - 1, -1, -1):
        mode = torch._C._get_function_stack_at(i)
        if type(mode) is DeviceContext:
            return mode.device  # type: ignore[no-any-return]
    return None


@contextlib.contextmanager
def _watch_modes() -> Iterator[list[str]]:
    """Record, while tracing, every torch function or dispatch mode of the user's entered: its
    Python code may change what any operator returns, from state no guard reads."""
    seen: list[str] = []
    enters = {cls: cls.__dict__["__enter__"] for cls in (TorchFunctionMode, TorchDispatchMode)}

    def enter(mode: Any) -> Any:
        kind = "function" if isinstance(mode, TorchFunctionMode) else "dispatch"
        if getattr(_WATCH, "seen", None) is not None and _users(mode):
            _WATCH.seen.append(f"it enters the torch {kind} mode {type(mode).__qualname__}, "
                               "which may change what any operator returns")
        return enters[TorchFunctionMode if kind == "function" else TorchDispatchMode](mode)

    _WATCH.seen = seen
    for cls in enters:
        cls.__enter__ = enter  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        for cls, method in enters.items():
            cls.__enter__ = method  # type: ignore[method-assign]
        _WATCH.seen = None


# --------------------------------------------------------------------------------- capture
class TensorMeta(NamedTuple):
    """Shape, dtype and device of a traced tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass
class Captured:
    """``func`` for one call signature as a functional aten graph (see NOTE [Capture]).

    The graph's inputs are the argument tensors (flattened ``(args, kwargs)`` order), then the
    random values of the prologue, then the lifted tensors; its outputs are the tensor leaves
    of ``func``'s output, then the new values of the mutated inputs.
    """

    graph: GraphModule | None = None
    prologue: GraphModule | None = None  # (arg tensors, lifted) -> random values
    reason: str | None = None  # why the engine cannot use this capture
    n_args: int = 0
    n_random: int = 0
    n_lifted: int = 0
    out_spec: Any = None
    out_leaves: list[Any] = field(default_factory=list)  # TensorMeta, or non-tensor values
    mutated: list[int] = field(default_factory=list)  # input index of each mutation output
    # ``x.data``/``detach_()``: nested torch.func detaches these at the innermost level only,
    # which the graph (a plain ``detach``) cannot express beyond first order
    level_local: str | None = None

    @property
    def n_out(self) -> int:
        return sum(isinstance(v, TensorMeta) for v in self.out_leaves)

    def random_values(self, arg_tensors: list[Any], lifted: tuple[Any, ...]) -> list[Tensor]:
        if self.prologue is None:
            return []
        return list(self.prologue(*arg_tensors, *lifted))


def capture(func: Callable[..., Any], leaves: list[Any], spec: Any,
            lifted: list[Tensor], value_buffers: list[tuple[int, int]] | None = None,
            baked: set[int] = frozenset(),  # type: ignore[assignment]
            grad: frozenset[int] = frozenset()) -> Captured:
    """Trace ``func`` called with the pytree ``(leaves, spec)`` of ``(args, kwargs)``, reading
    the tensors ``lifted`` (see NOTE [Capture]); tensors viewing ``value_buffers`` (memory
    guarded by value) may become constants, and so do the lifted tensors at indices ``baked``
    (their values guarded by the caller): a mask or a scalar read in Python then has a value
    while tracing. The argument tensors at (leaf) indices ``grad`` require grad while it is
    traced, as they do under nested ``torch.func.jacrev``."""
    tensor_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    arg_tensors = [leaves[i] for i in tensor_pos]
    meta: dict[str, Any] = {}
    _TRACING.depth = getattr(_TRACING, "depth", 0) + 1
    try:
        with _clear_functorch(), torch.inference_mode(False), _compiled_code_runs_eagerly():

            def run(*tensors: Tensor) -> list[Tensor]:
                pairs = [(t, s) for i, (t, s) in enumerate(zip(lifted, tensors[len(tensor_pos):]))
                         if i not in baked]
                table = {id(t): s for t, s in pairs}
                new = list(leaves)
                for i, t in zip(tensor_pos, tensors):
                    new[i] = t
                args, kwargs = pytree.tree_unflatten(new, spec)
                stand = _StandIns(table, {id(s): t for t, s in pairs}, value_buffers or [],
                                  {id(lifted[i]): lifted[i] for i in baked})
                with _watch_modes() as modes, torch.enable_grad(), stand:
                    out = func(*args, **kwargs)
                why = modes[0] if modes else stand.refused
                if why is None and _from_differentiable_graph(out):
                    why = _DIFFERENTIABLE_GRAPH
                if why is not None:  # (a refusal the function caught is one all the same)
                    raise CaptureError(why)
                out = _swap(out, table)
                meta["level_local"] = stand.level_local
                out_leaves, meta["spec"] = pytree.tree_flatten(out)
                meta["leaves"] = [TensorMeta(tuple(v.shape), v.dtype, v.device)
                                  if isinstance(v, Tensor) else v for v in out_leaves]
                return [v for v in out_leaves if isinstance(v, Tensor)]

            examples = [*arg_tensors, *lifted]
            flags = [i in grad or bool(leaves[i].requires_grad) for i in tensor_pos] + [
                bool(t.requires_grad) for t in lifted]
            with capture_overrides():
                g1 = record(run, examples, decomposition_table(), requires_grad=flags,
                            no_grad_cut=True,
                            outside=[t for i, t in enumerate(lifted) if i not in baked])
            g2 = record(torch.func.functionalize(g1), examples, requires_grad=flags)
    except CaptureError as e:
        return Captured(reason=str(e))
    except Exception as e:  # noqa: BLE001 - any tracing failure means "fall back"
        return Captured(reason=f"capture failed ({_first_line(e)})")
    finally:
        _TRACING.depth -= 1
    gm = products_as_contractions(canonicalize(g2))
    n_in = len(tensor_pos) + len(lifted)
    mutated = _mutation_outputs(gm, n_in)
    if any(i < len(tensor_pos) and arg_tensors[i].requires_grad for i in mutated) or any(
            i >= len(tensor_pos) and lifted[i - len(tensor_pos)].requires_grad for i in mutated):
        return Captured(reason="it modifies a tensor that requires grad in place")
    try:
        prologue, n_random = _hoist_random(gm, len(tensor_pos))
    except CaptureError as e:
        return Captured(reason=str(e))
    out_leaves = meta["leaves"]
    return Captured(graph=gm, prologue=prologue, n_args=len(tensor_pos), n_random=n_random,
                    n_lifted=len(lifted), out_spec=meta["spec"], out_leaves=out_leaves,
                    mutated=mutated, level_local=meta["level_local"])


@contextlib.contextmanager
def _clear_functorch() -> Iterator[None]:
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    with temporarily_clear_interpreter_stack():
        yield


@contextlib.contextmanager
def _compiled_code_runs_eagerly() -> Iterator[None]:
    """A ``torch.compile``'d module or function the traced function calls runs its original
    code, which is what gets recorded (the guards walk that code: ``guards._compiled``)."""
    if "torch._dynamo" not in sys.modules:  # nothing is compiled before it is imported
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


# ------------------------------------------------------------------------------ mutations
def _mutation_outputs(gm: GraphModule, n_in: int) -> list[int]:
    """Turn the trailing ``copy_(input, value)`` epilogue of a functionalized graph into extra
    outputs; returns the input index each one writes back to."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    index = {p: i for i, p in enumerate(placeholders)}
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    mutated: list[int] = []
    values: list[Node] = []
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.copy_.default \
                and node.args[0] in index:
            mutated.append(index[node.args[0]])
            values.append(node.args[1])
            node.replace_all_uses_with(node.args[1])
            graph.erase_node(node)
    if mutated:
        outs = out_node.args[0]
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        out_node.args = (tuple(outs) + tuple(values),)
    graph.eliminate_dead_code()
    gm.recompile()
    return mutated


# ------------------------------------------------------------------------------ randomness
# shape-only random operators: their tensor argument only says the shape and layout
_LIKE = {aten.rand_like.default, aten.randn_like.default, aten.randint_like.default}
# random operators whose output carries no derivative with respect to their tensor inputs
_NOISE = {getattr(getattr(aten, name), overload) for name, overload in (
    ("rand", "default"), ("randn", "default"), ("randint", "default"), ("randint", "low"),
    ("randperm", "default"), ("rand_like", "default"), ("randn_like", "default"),
    ("randint_like", "default"), ("bernoulli", "default"), ("bernoulli", "p"),
    ("bernoulli", "Tensor"), ("native_dropout", "default"), ("uniform", "default"),
    ("normal", "float_float"), ("exponential", "default"), ("geometric", "default"),
    ("cauchy", "default"), ("log_normal", "default"), ("multinomial", "default"),
    ("poisson", "default"),
) if hasattr(getattr(aten, name, None), overload)}


def _is_random(node: Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded in node.target.tags)


def _shape_only(graph: Graph, node: Node, arg: Node) -> Node:
    """An uninitialised tensor with ``arg``'s layout: all a shape-only random op needs."""
    v = arg.meta["val"]
    with graph.inserting_before(node):
        new = graph.call_function(aten.empty_strided.default,
                                  (list(v.shape), list(v.stride())),
                                  {"dtype": v.dtype, "device": v.device})
    new.meta["val"] = v
    return new


def _hoist_random(gm: GraphModule, n_args: int) -> tuple[GraphModule | None, int]:
    """Move random operators into a prologue graph (see NOTE [Capture]); the main graph gets
    their values as inputs placed after the argument tensors."""
    graph = gm.graph
    randoms = [n for n in graph.nodes if _is_random(n)]
    if not randoms:
        return None, 0
    for node in randoms:
        if node.target not in _NOISE and any(
                isinstance(a, Node) for a in node.all_input_nodes):
            raise CaptureError(f"it calls the random operator {node.target}, whose derivative "
                               "the engine cannot express")
    for node in randoms:
        if node.target in _LIKE:
            node.replace_input_with(node.args[0], _shape_only(graph, node, node.args[0]))
        elif node.target is aten.native_dropout.default and node.args[2] is not False:
            x, p = node.args[0], node.args[1]
            val = node.meta["val"]
            with graph.inserting_before(node):
                masked = graph.call_function(aten.native_dropout.default,
                                             (_shape_only(graph, node, x), p, node.args[2]))
                mask = graph.call_function(operator.getitem, (masked, 1))
                scaled = graph.call_function(aten.mul.Tensor, (x, mask))
                out = graph.call_function(aten.mul.Scalar,
                                          (scaled, 1.0 / (1.0 - p) if p < 1 else 0.0))
            masked.meta["val"], mask.meta["val"] = val, val[1]
            scaled.meta["val"] = out.meta["val"] = val[0]
            for use in list(node.users):
                use.replace_all_uses_with(out if use.args[1] == 0 else mask)
                graph.erase_node(use)
            graph.erase_node(node)
    # the values to hoist: each random tensor (the pieces of a random tuple)
    randoms = []
    for n in graph.nodes:
        if _is_random(n):
            randoms += [n] if isinstance(n.meta.get("val"), Tensor) else list(n.users)
    # the prologue: the random values and everything they depend on
    need: set[Node] = set()
    stack = list(randoms)
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        stack.extend(n.all_input_nodes)
    pro = Graph()
    env: dict[Node, Node] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            env[n] = pro.placeholder(n.name)
            env[n].meta = dict(n.meta)
        elif n in need:
            env[n] = pro.node_copy(n, lambda a: env[a])
    pro.output(tuple(env[r] for r in randoms))
    prologue = GraphModule(gm, pro)
    # the main graph: each random value becomes an input after the argument tensors
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    prev = placeholders[n_args - 1] if n_args else None
    for i, r in enumerate(randoms):
        if prev is None:
            ctx = graph.inserting_before(placeholders[0]) if placeholders else \
                graph.inserting_before(next(iter(graph.nodes)))
        else:
            ctx = graph.inserting_after(prev)
        with ctx:
            ph = graph.placeholder(f"random_{i}")
        ph.meta = dict(r.meta)
        r.replace_all_uses_with(ph)
        graph.erase_node(r)
        prev = ph
    for n in list(graph.nodes):  # random tuples whose pieces were hoisted
        if _is_random(n) and not n.users:
            graph.erase_node(n)
    graph.eliminate_dead_code()
    gm.recompile()
    return prologue, len(randoms)


# ------------------------------------------------------------------------ generic tracing
def trace(fn: Any, examples: list[Any]) -> GraphModule:
    """Trace ``fn(*examples)`` (tensors or other values) into a functional aten graph: the
    engine's own traces of propagations and reverse levels over a captured graph."""
    try:
        # the examples are plain: transforms around us, and the caller's inference mode, do
        # not apply
        with _clear_functorch(), torch.inference_mode(False):
            with capture_overrides():
                g1 = record(fn, examples, decomposition_table())
            g2 = record(torch.func.functionalize(g1), examples)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "fall back"
        raise CaptureError(_first_line(e)) from None
    return canonicalize(g2)


# op -> (position of dim, position of start; end follows), and how to read the sliced size
_SLICES = {aten.slice.Tensor: (1, 2), aten.slice_scatter.default: (2, 3),
           aten.slice_backward.default: (2, 3)}


def _clamp_slice(node: Node) -> None:
    """Normalise a slice's ``start``/``end`` to ``0 <= start <= end <= size`` as torch does."""
    dim_at, start_at = _SLICES[node.target]  # type: ignore[index]
    schema = node.target._schema.arguments  # type: ignore[union-attr]
    args = list(node.args) + [node.kwargs.get(a.name, a.default_value)
                              for a in schema[len(node.args):]]
    if node.target is aten.slice_backward.default:
        sizes = args[1]
    else:
        val = args[0].meta.get("val") if isinstance(args[0], Node) else None
        sizes = tuple(val.shape) if isinstance(val, Tensor) else None
    dim, start, end = args[dim_at], args[start_at], args[start_at + 1]
    if not (isinstance(sizes, (tuple, list)) and isinstance(dim, int)
            and all(type(v) is int for v in sizes)):
        return
    size = sizes[dim]
    start = 0 if start is None else start
    end = size if end is None else end
    if type(start) is not int or type(end) is not int:
        return
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, start), size)
    args[start_at], args[start_at + 1] = start, end
    node.args, node.kwargs = tuple(args), {}


_SCALAR_OVERLOADS = {aten.mul.Scalar: aten.mul.Tensor, aten.div.Scalar: aten.div.Tensor,
                     aten.add.Scalar: aten.add.Tensor, aten.sub.Scalar: aten.sub.Tensor}


def canonicalize(gm: GraphModule) -> GraphModule:
    """Rewrite operators whose traced form is fragile into equivalent robust ones.

    * ``view``/``_unsafe_view`` -> ``reshape``: tracing records ``reshape`` as ``view``
      when the traced (contiguous) strides allowed it; real tensors -- batched under ``vmap``, or
      produced by kernels that choose other layouts -- may not. ``reshape`` is a view whenever
      one is possible and a copy otherwise.
    * functional ``copy(dst, src)`` (from functionalization) -> ``expand(_to_copy(src))`` to
      ``dst``'s shape and dtype: same values, and differentiable (torch has no derivative for
      ``aten::copy``, which reverse levels over the captured graph need).
    * ``slice``/``slice_scatter``/``slice_backward`` bounds clamped to the dimension
      (``x[k:]`` records ``end=2**63 - 1``): the same slice, and functorch's batching of the
      scatter forms otherwise builds an ``arange`` to that end and fails, which sent ``vmap``
      of a function slicing its input off the batched fast path.
    * ``mul``/``div``/``add``/``sub`` ``.Scalar`` -> ``.Tensor`` with the same Python number:
      torch implements the former as the latter on the number wrapped as a tensor, so the
      values are identical, and the graph passes (``x * 1`` is ``x``, common subexpressions,
      NOTE [Scalar operands]) see one form (addmm's decomposition scales its bias by
      ``mul.Scalar(b, 1)``).
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
        elif node.target in _SCALAR_OVERLOADS and len(node.args) == 2 \
                and type(node.args[1]) in (int, float) and isinstance(node.args[0], Node):
            node.target = _SCALAR_OVERLOADS[node.target]
        elif node.target in _SLICES:
            _clamp_slice(node)
        elif node.target is aten.copy.default and all(
                isinstance(a, Node) for a in node.args[:2]):
            dst = node.args[0].meta.get("val")
            if not isinstance(dst, Tensor):
                continue
            with graph.inserting_before(node):
                cast = graph.call_function(aten._to_copy.default, (node.args[1],),
                                           {"dtype": dst.dtype, "device": dst.device})
                new = graph.call_function(aten.expand.default, (cast, list(dst.shape)))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _describe(arg: Any) -> Any:
    """An operator's argument in a plan: a tensor by its dtype, anything else as it is."""
    val = arg.meta.get("val") if isinstance(arg, Node) else None
    return f"a {val.dtype} tensor" if val is not None and hasattr(val, "dtype") else arg


def graph_problems(gm: GraphModule, series_inputs: int = 1) -> list[str]:
    """Operators without a Taylor rule on the path of the first ``series_inputs`` placeholders
    (the ones carrying Taylor series)."""
    from .._rules import has_rule, refuses

    problems = []
    tainted: set[Any] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and len(tainted) < series_inputs:
            tainted.add(node)
            continue
        if node.op == "call_function" and any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
        if node in tainted and node.op == "call_function":
            if not has_rule(node.target):
                problems.append(f"no Taylor rule for {node.target}")
            elif refuses(node):
                problems.append(f"no Taylor rule for {node.target} with these arguments "
                                f"{tuple(_describe(a) for a in node.args)}")
    return sorted(set(problems))
