"""Recording a function's aten operators into an FX graph.

NOTE [Tracer]
Every graph xafunc builds -- the capture of the user's function, the engine's traces of Taylor
propagations and reverse levels, batched (``vmap``) graphs, backward graphs -- is recorded by
:func:`record`. It does what torch's ``make_fx`` does: run the function once, below autograd
and functorch, and write down each aten operator that reaches the dispatcher, with the
decomposition table applied first (a decomposed operator is recorded as the operators its
decomposition runs). ``make_fx``, ``FakeTensorMode`` and every meta kernel written in Python
import ``torch._dynamo`` on first use: 1-2 s of a fresh process's first call, for a compiler
xafunc does not use. So the recording runs on values, through the same C++ kernels eager code
runs, and needs only the dispatcher:

* Each tensor of the trace is a :class:`_Traced`, a wrapper holding the value computed for it
  and the graph node that computes it. Autograd and functorch (``functionalize``, ``vmap``) run
  above it as they do above any tensor, so what they dispatch is what gets recorded.
* **Stop-gradients.** A ``detach()`` is recorded (a zero-derivative operator to the Taylor
  rules). Autograd also reaches the dispatcher with ``detach`` when it saves a tensor for
  backward (a shallow copy, made in C++ outside its own view handling, that it re-attaches to
  the graph when unpacking it under ``create_graph``): that is the tensor itself, not a cut,
  and is told apart by the dispatch state -- a real ``detach()`` arrives below
  ``ADInplaceOrView``. ``x.data`` is such a shallow copy too, so capture turns it into a
  ``detach()`` before it reaches the tracer (``trace._StandIns``). No dispatch mode may sit
  between the tracer and autograd (one that calls the operator again sends it back through
  autograd, and every copy would look like a ``detach()``): the capture's cut of what runs
  under ``no_grad`` is done here (``no_grad_cut``), and the recorder tells torch not to wrap it
  in dynamo's guard (``_should_skip_dynamo``).
* The inputs' values are copies of the examples (zeros for a shape-only example): a trace never
  writes to the caller's tensors, and values exist only while the function runs -- the graph
  keeps a :class:`ShapeTensor` (shape, dtype, strides, device; no data) in each node's
  ``meta["val"]``.
* A tensor that is not traced (``torch.tensor(...)`` data, a constant of the engine) becomes a
  constant of the graph. An operator whose tensor inputs are all constants is computed now and
  is a constant too (deterministic, nothing written: the same values on every call), so
  ``torch.tensor(2.0).item()`` reads 2.0 while tracing.
* **Values never steer the graph.** An operator that hands the values of a traced tensor to
  Python (``.item()``, ``bool(x.sum() > 0)``, ``torch.equal``) or whose output *shape* depends
  on them (``nonzero``, boolean masks, ``unique``) raises :class:`TraceError`, so the request
  runs the reference strategy instead of a graph that baked in one branch -- exactly as if the
  tensor had no values.
* Random operators draw while tracing (their values are unused); the caller's RNG state is
  restored afterwards. An operator given its own ``torch.Generator`` (``torch.rand(n,
  generator=g)``) raises before it draws: a graph cannot hold the generator, and the reference
  then draws from it exactly what torch.func would.
* Every input an operator of the batch-norm family reads as running statistics (arguments 3
  and 4, and the inputs they are computed from) is noted, by storage: those kernels write
  them without bumping their version counters, which the executor's cache trusts
  (:func:`unversioned`, NOTE [Unversioned writes] in ``writes.py``).
"""

from __future__ import annotations

import contextlib
import operator
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import torch
from torch import Tensor
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten

# operators whose arguments 3 and 4 are running statistics they may update without bumping
# their version counters (NOTE [Unversioned writes])
_RUNNING_STATS_OPS = {
    aten.batch_norm, aten._batch_norm_impl_index, aten.native_batch_norm,
    aten._native_batch_norm_legit, aten._native_batch_norm_legit_no_training,
    aten._native_batch_norm_legit_functional, aten._batch_norm_with_update,
    aten._batch_norm_no_update, aten.cudnn_batch_norm, aten.miopen_batch_norm,
}
# storage data pointer -> weak reference to the storage read as running statistics: the
# storage, not the tensor, is what those kernels write, and a weak reference to a tensor would
# stop ``torch.utils.swap_tensors`` (``nn.Module.to`` under
# ``torch.__future__.set_swap_module_params_on_conversion``) from swapping it
_UNVERSIONED: dict[int, weakref.ref[Any]] = {}


def note_unversioned(t: Tensor) -> None:
    """Note that ``t``'s storage may be written without its version counter changing."""
    try:
        storage = t.untyped_storage()
    except Exception:  # noqa: BLE001 - no storage (a wrapper or subclass being traced)
        return
    key = storage.data_ptr()
    ref = _UNVERSIONED.get(key)
    if ref is not None and ref() is storage:
        return

    def forget(dead: weakref.ref[Any]) -> None:
        if _UNVERSIONED.get(key) is dead:  # not a newer storage's entry at the same address
            del _UNVERSIONED[key]

    _UNVERSIONED[key] = weakref.ref(storage, forget)


def unversioned(t: Tensor) -> bool:
    """Whether ``t`` may be written in place without its version counter changing (a
    recorded function read its storage as batch-norm running statistics; NOTE [Unversioned
    writes])."""
    if not _UNVERSIONED:
        return False
    try:
        storage = t.untyped_storage()
    except Exception:  # noqa: BLE001 - no storage: nothing was noted for it
        return False
    ref = _UNVERSIONED.get(storage.data_ptr())
    return ref is not None and ref() is storage


class TraceError(Exception):
    """An operator could not be recorded; the message says which and why."""


# the message of a trace that needed values (capture then retries with small tensors baked in)
VALUE_DEPENDENT = "Python control flow or a shape depends on the values of a traced tensor"


class ShapeTensor(Tensor):
    """A tensor with a shape, dtype, strides and device but no values: what a recorded graph
    keeps of each node (``node.meta["val"]``). Operators on it compute only layouts."""

    @staticmethod
    def __new__(cls, shape: Any, stride: Any, dtype: torch.dtype, device: torch.device,
                storage_offset: Any = 0) -> ShapeTensor:
        return Tensor._make_wrapper_subclass(  # type: ignore[attr-defined,no-any-return]
            cls, tuple(shape), strides=tuple(stride), storage_offset=storage_offset,
            dtype=dtype, device=device, requires_grad=False)

    @staticmethod
    def like(t: Tensor) -> ShapeTensor:
        return ShapeTensor(t.shape, t.stride(), t.dtype, t.device, t.storage_offset())

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    def __repr__(self) -> str:  # type: ignore[override]
        return f"ShapeTensor({tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (),  # type: ignore[override]
                           kwargs: Any = None) -> Any:
        # a graph pass deriving a rewritten node's layout from its input's (``t()``,
        # ``permute``, ``contiguous``, ...): computed on storage-less tensors of the same layout
        device = next(t.device for t in pytree.tree_leaves((args, kwargs))
                      if isinstance(t, Tensor))

        def unwrap(x: Any) -> Any:
            if isinstance(x, ShapeTensor):
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype,
                                           device="meta").as_strided(
                    x.shape, x.stride(), x.storage_offset())
            return x

        out = func(*pytree.tree_map(unwrap, args or ()),
                   **pytree.tree_map(unwrap, kwargs or {}))
        return pytree.tree_map(
            lambda t: ShapeTensor(t.shape, t.stride(), t.dtype, device, t.storage_offset())
            if isinstance(t, Tensor) else t, out)


class _Traced(Tensor):
    """A tensor of a trace: its value now, and the node that computes it (NOTE [Tracer])."""

    _value: Tensor
    _node: Node | None  # None: a constant not used by the graph yet
    _recorder: _Recorder

    @staticmethod
    def __new__(cls, value: Tensor, node: Node | None, recorder: _Recorder,
                requires_grad: bool = False) -> _Traced:
        t = Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, value.size(), strides=value.stride(), storage_offset=value.storage_offset(),
            dtype=value.dtype, layout=value.layout, device=value.device,
            requires_grad=requires_grad)
        t._value, t._node, t._recorder = value, node, recorder
        if recorder.made is not None:
            recorder.made.append(weakref.ref(t))
        return t  # type: ignore[no-any-return]

    @property
    def constant(self) -> bool:
        """Its value is the same on every call (made from constants only)."""
        return self._node is None or self._node.op == "get_attr"

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Traced({tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (),  # type: ignore[override]
                           kwargs: Any = None) -> Any:
        # reached with the recorder's mode set aside (code that disables the current modes)
        recorder = next(t._recorder for t in pytree.tree_leaves((args, kwargs))
                        if isinstance(t, _Traced))
        if not recorder.active:
            # one the traced function stored in Python state (``self.h = h``) and reads later:
            # it is its value, as a tensor torch.func's transforms leak is (NOTE [Python side
            # effects] in ``cache.py``)
            return func(*pytree.tree_map(_resolved, args or ()),
                        **pytree.tree_map(_resolved, kwargs or {}))
        return recorder.dispatch(func, args, kwargs or {})


def is_leaked(t: Any) -> bool:
    """``t`` is a tensor of a finished trace (stored in Python state while it ran)."""
    return isinstance(t, _Traced) and not t._recorder.active


def is_traced(t: Any) -> bool:
    """``t`` is a tensor of a running trace, possibly inside torch.func's wrappers."""
    if not isinstance(t, Tensor):
        return False
    fx = torch._C._functorch
    while fx.is_functorch_wrapped_tensor(t):
        t = fx.get_unwrapped(t)
    if torch._is_functional_tensor(t):
        t = torch._from_functional_tensor(t)
    return isinstance(t, (_Traced, ShapeTensor))


_BELOW_AUTOGRAD = torch._C.DispatchKey.ADInplaceOrView
_DATA_DEPENDENT = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
# operators returning Python values that depend only on layouts
_LAYOUT_QUERIES = {aten.is_same_size.default, aten.sym_size.int, aten.sym_stride.int,
                   aten.sym_numel.default, aten.sym_storage_offset.default}


def _reads_values(func: Any, args: Any) -> bool:
    """``func`` hands values to Python, or the shape of its output depends on them."""
    if func in _LAYOUT_QUERIES:
        return False
    if not any(t in func.tags for t in _DATA_DEPENDENT):
        return not any("Tensor" in str(r.type) for r in func._schema.returns) \
            and not func._schema.is_mutable
    if func is aten.index.Tensor:  # integer indices: the shape is the indices'
        return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in args[1] if i is not None)
    return True


class _Recorder(TorchDispatchMode):
    """Write every operator that reaches the dispatcher into ``graph`` (see NOTE [Tracer])."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's ``__torch_dispatch__`` in ``torch._dynamo.disable`` unless the
        # mode says no, which imports dynamo on first use; xafunc's transforms never run under
        # dynamo (``outside_compiler``)
        return False

    def __init__(self, decompositions: dict[Any, Any], no_grad_cut: bool,
                 outside: Sequence[Tensor] = ()) -> None:
        super().__init__()
        self.no_grad_cut = no_grad_cut
        # the storages of the caller's tensors the graph reads through its inputs: none of them
        # may become a constant (``_node``)
        self.outside = {p for p in map(_storage, outside) if p}
        self.graph = Graph()
        self.root = torch.nn.Module()
        self.decompositions = decompositions
        self.expanding: set[Any] = set()  # operators whose decomposition is running
        self.constants: dict[int, Node] = {}
        self.keep: list[Tensor] = []  # constants stay alive (their ids key ``constants``)
        self.active = False
        self.running_stats: set[Node] = set()  # inputs read as running statistics
        # capture: every tensor of the trace, to find those the function stored in Python
        # state (``release``)
        self.made: list[weakref.ref[_Traced]] | None = [] if no_grad_cut else None
        self.refused: str | None = None  # why the trace failed (``refuse``)

    def refuse(self, why: str) -> NoReturn:
        """Fail the trace: raise, and remember why, so that a function catching the error
        (``try: s = float(x.sum()) except Exception: s = 1.0``) fails it all the same rather
        than baking in what its handler computed."""
        if self.refused is None:
            self.refused = why
        raise TraceError(why)

    def release(self) -> None:
        """Turn the tensors of the finished trace that the function stored in Python state
        (``self.cache = w.t()``, ``self.grid = torch.linspace(...)``) into plain tensors of
        their values, what torch.func leaves there for values that do not depend on the
        differentiated inputs: a ``_Traced`` there would make every later call run the
        reference (``guards``: a leaked tensor), fail ``deepcopy`` and ``torch.save``.
        The trace holds none of them any more, so any other reference is the caller's."""
        if self.made is None:
            return
        alive = [t for t in (r() for r in self.made) if t is not None]
        self.made = None  # no weak references left: ``swap_tensors`` refuses those
        for t in alive:
            # references: ``alive``, the loop variable, ``getrefcount``'s argument
            if sys.getrefcount(t) > 3:
                plain = t._value.detach()
                try:
                    torch.utils.swap_tensors(t, plain)
                except RuntimeError:  # saved by autograd, say: it stays a ``_Traced``
                    pass

    def _note_running_stats(self, stats: Any) -> None:
        """Note the inputs ``stats`` are computed from (NOTE [Unversioned writes])."""
        todo = [t._node for t in stats if isinstance(t, _Traced) and t._node is not None]
        seen: set[Node] = set()
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                if node.op == "placeholder":
                    self.running_stats.add(node)
                todo.extend(node.all_input_nodes)

    def placeholder(self, name: str, example: Any, requires_grad: bool) -> Any:
        node = self.graph.placeholder(name)
        if not isinstance(example, Tensor) and not _is_meta(example):
            return example
        if type(example) in (Tensor, torch.nn.Parameter, torch.nn.Buffer) and not (
                torch._C._functorch.is_functorch_wrapped_tensor(example)
                or torch._is_functional_tensor(example)):
            with torch.no_grad():  # with the example's strides, which ``func`` may read
                value = example.detach().clone(memory_format=torch.contiguous_format) \
                    if torch._debug_has_internal_overlap(example) == 1 else \
                    torch.empty_strided(example.shape, example.stride(), dtype=example.dtype,
                                        device=example.device).copy_(example)
        else:  # shape-only, or wrapped by a transform (whose values are not this shape's)
            value = torch.zeros(tuple(example.shape), dtype=example.dtype,
                                device=example.device)
        node.meta["val"] = ShapeTensor.like(value)
        grad = requires_grad and (value.is_floating_point() or value.is_complex())
        return _Traced(value, node, self, grad)

    def _node(self, x: Any) -> Any:
        if isinstance(x, _Traced):
            if x._recorder is not self:
                self.refuse("a tensor of another trace reached this one")
            if x._node is None:
                x._node = self._node(x._value)
            return x._node
        if isinstance(x, ShapeTensor):
            self.refuse("a shape-only tensor reached an operator")
        if isinstance(x, Tensor):
            node = self.constants.get(id(x))
            if node is None:
                if self.outside and _storage(x) in self.outside:
                    # it reached an operator without its stand-in -- passed to TorchScript or
                    # other C++ code that calls no Python: a constant would freeze its values
                    self.refuse(f"a tensor it reads (shape {tuple(x.shape)}) reached an "
                                "operator through code the capture cannot see into "
                                "(TorchScript, a C++ extension)")
                name = f"_tensor_constant{len(self.constants)}"
                setattr(self.root, name, x)
                first = next((n for n in self.graph.nodes if n.op != "placeholder"), None)
                with self.graph.inserting_before(first):
                    node = self.graph.get_attr(name)
                node.meta["val"] = ShapeTensor.like(x)
                self.constants[id(x)] = node
                self.keep.append(x)
            return node
        return x

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        # an operator that reaches here from torch's C++ (torch.func's ``_remove_batch_dim``)
        # finds the torch function modes of the trace active, which would take the values
        # computed here for tensors the function read: none of them sees the recording
        with torch._C.DisableTorchFunction():
            return self.dispatch(func, args, kwargs or {})

    def _cut(self, func: Any, out: Any) -> Any:
        """With ``no_grad_cut``, an operator run with grad mode off has its outputs detached,
        exactly what autograd does (see NOTE [Capture])."""
        if not self.no_grad_cut or torch.is_grad_enabled() or func is aten.detach.default \
                or func._schema.is_mutable:
            return out

        def cut(t: Any) -> Any:
            if not isinstance(t, _Traced) or not (t.is_floating_point() or t.is_complex()):
                return t
            node = self.graph.create_node("call_function", aten.detach.default,
                                          (self._node(t),), {}, name="detach")
            node.meta["val"] = ShapeTensor.like(t._value)
            return _Traced(t._value.detach(), node, self)

        return pytree.tree_map(cut, out)

    def dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if self.no_grad_cut:
            if torch.is_inference_mode_enabled():
                self.refuse("it uses torch.inference_mode")
            if not (torch.is_grad_enabled() or torch._C._is_fwd_grad_enabled()):
                # both off: a torch.autograd.Function's forward runs, or autograd makes the
                # view of an input it returns (``torch.no_grad()`` leaves forward grad on)
                self.refuse(f"it applies the torch.autograd.Function {_applied_function()}, "
                            "whose custom backward defines its derivative")
        if func.overloadpacket in _RUNNING_STATS_OPS:
            self._note_running_stats(args[3:5])
        if kwargs.get("generator") is not None:
            self.refuse("it draws random numbers from its own torch.Generator")
        # a decomposition may call its own operator (on a masked input, say): that call is
        # recorded as it is
        decomposition = None if func in self.expanding else self.decompositions.get(func)
        if decomposition is not None:
            self.expanding.add(func)
            try:
                with self:
                    out = decomposition(*args, **kwargs)
            finally:
                self.expanding.discard(func)
            if out is not NotImplemented:
                return out
        with self:
            out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
        if func is aten.detach.default and isinstance(args[0], _Traced) and \
                not torch._C._dispatch_tls_is_dispatch_key_excluded(_BELOW_AUTOGRAD):
            # not a ``detach()`` (which reaches here below autograd's view handling) but a
            # shallow copy autograd makes of a tensor it saves: the same value, differentiable
            # again when autograd unpacks it, so the same node
            return _Traced(args[0]._value.detach(), args[0]._node, self)
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        traced = any(isinstance(t, _Traced) and not t.constant for t in leaves)
        random = torch.Tag.nondeterministic_seeded in func.tags
        if not traced and leaves and not random:
            if func._schema.is_mutable:
                self.refuse(f"it writes to a constant tensor in place ({func})")
            # constants only: computed now, a constant (a graph input only where used)
            out = func(*pytree.tree_map(_resolved, args), **pytree.tree_map(_resolved, kwargs))
            return pytree.tree_map(
                lambda v: _Traced(v, None, self) if isinstance(v, Tensor) else v, out)
        if traced and _reads_values(func, args):
            self.refuse(f"{VALUE_DEPENDENT} ({func})")
        node_args, node_kwargs = pytree.tree_map(self._node, (tuple(args), kwargs))
        values: dict[int, _Traced] = {}

        def value(x: Any) -> Any:
            if isinstance(x, _Traced):
                values[id(x._value)] = x
                return x._value
            return x

        out = func(*pytree.tree_map(value, args), **pytree.tree_map(value, kwargs))
        node = self.graph.create_node("call_function", func, node_args, node_kwargs,
                                      name=func.overloadpacket.__name__)
        node.meta["val"] = pytree.tree_map(
            lambda v: ShapeTensor.like(v) if isinstance(v, Tensor) else v, out)

        def wrap(v: Tensor, at: Node) -> _Traced:
            same = values.get(id(v))
            if same is not None:  # written in place: later uses read the new node
                same._node = at
                return same
            return _Traced(v, at, self)

        if torch.Tag.inplace_view in func.tags:
            # the wrapper takes the new shape as well (what ``return_and_correct_aliasing``
            # does for torch's own wrapper tensors)
            from torch.utils._mode_utils import no_dispatch

            with no_dispatch():
                func(*args, **kwargs)
        if isinstance(out, Tensor):
            return self._cut(func, wrap(out, node))
        if isinstance(out, (tuple, list)):
            items = []
            for i, v in enumerate(out):
                if isinstance(v, Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["val"] = ShapeTensor.like(v)
                    v = wrap(v, item)
                items.append(v)
            return self._cut(func, type(out)(items))
        return out


def _applied_function() -> str:
    """The name of the ``torch.autograd.Function`` being applied, found on the Python stack:
    ``Function.apply``'s frame (its class is ``cls`` there), else a frame of its ``forward``."""
    frame: Any = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code is _APPLY:
            return getattr(frame.f_locals.get("cls"), "__qualname__", "?")
        qualname = getattr(code, "co_qualname", "")  # Python 3.11+
        if code.co_name == "forward" and "." in qualname:
            return qualname.rsplit(".", 1)[0]
        frame = frame.f_back
    return "?"


_APPLY = torch.autograd.function.Function.__dict__["apply"].__func__.__code__


def _storage(t: Tensor) -> int:
    """The address of ``t``'s storage, or 0 (none, or empty)."""
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return 0


def _resolved(x: Any) -> Any:
    """The value of ``x`` for a kernel called with it now: a lazily conjugated or negated view
    (``c.conj()``) resolved, because its wrapper does not carry the conjugate bit and the
    dispatcher has set the ``Conjugate`` and ``Negative`` keys aside by the time the recorder
    runs, so the kernel would read the view as its base (``c * c.conj()`` was ``c * c``)."""
    v = x._value if isinstance(x, _Traced) else x
    if isinstance(v, Tensor) and (v.is_conj() or v.is_neg()):
        return v.resolve_conj().resolve_neg()
    return v


def _is_meta(x: Any) -> bool:
    return all(hasattr(x, a) for a in ("shape", "dtype", "device")) and not isinstance(x, type)


@contextlib.contextmanager
def _same_rng() -> Iterator[None]:
    """Tracing must not consume or change the caller's random state."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def record(fn: Callable[..., Any], examples: list[Any],
           decompositions: dict[Any, Any] | None = None,
           requires_grad: Sequence[bool] | None = None, no_grad_cut: bool = False,
           outside: Sequence[Tensor] = ()) -> GraphModule:
    """``fn(*examples)`` recorded as a graph with one input per example and ``fn``'s output
    (a pytree) as its output. Tensor examples, or shape-only ones (anything with ``shape``,
    ``dtype`` and ``device``), are traced from copies of their values (zeros for shape-only
    ones; floating-point ones require grad where ``requires_grad`` says so, none by
    default); other values are passed as they are and their inputs go unused.
    ``no_grad_cut`` (capture): outputs of operators run with grad mode off are detached, and
    ``torch.inference_mode`` fails the trace; so does any of the tensors ``outside`` (or a view
    of one) reaching an operator, which only their stand-ins may."""
    recorder = _Recorder(decompositions or {}, no_grad_cut, outside)
    with _disable_current_modes(), _same_rng():
        flags = requires_grad or [False] * len(examples)
        traced = [recorder.placeholder(f"arg{i}_1", e, g)
                  for i, (e, g) in enumerate(zip(examples, flags))]
        recorder.active = True
        try:
            try:
                with recorder:
                    out = fn(*traced)
            except Exception as e:
                if recorder.refused is None or isinstance(e, TraceError):
                    raise
                raise TraceError(recorder.refused) from e  # (wrapped by TorchScript, say)
            if recorder.refused is not None:  # raised, and caught by ``fn``
                raise TraceError(recorder.refused)
            recorder.graph.output(pytree.tree_map(recorder._node, out))
        finally:
            recorder.active = False
            del traced
            out = None
            recorder.release()
    placeholders = [n for n in recorder.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, examples):
        if node in recorder.running_stats and isinstance(example, Tensor):
            note_unversioned(example)
    return GraphModule(recorder.root, recorder.graph)
