"""Guards: everything a captured graph depends on besides its arguments, checked on every call.

NOTE [Guards and lifted tensors]
A captured graph bakes in what Python decided while tracing: which tensors were read, every
scalar, string and flag, which callables ran, which branch was taken. torch.func never has this
problem because it re-runs Python on every call; a capturing library has to earn the same
guarantee (torch.compile's dynamo does it with guards; JAX's ``jit`` documents staleness as a
sharp edge instead). Before tracing, :func:`walk` visits everything the function can reach:

* from a Python function: its code object, default arguments, closure cells and the globals
  its code (and the code nested in it) names; from a bound method its ``__self__`` and
  function; from a ``functools.partial`` its function and bound arguments;
* from an ``nn.Module``: its class, training flag, parameters, buffers, submodules, forward
  hooks and every other attribute (and torch's global module hooks); from a tensor the Python
  attributes set on it (``w.scale = 2.0``); from a ``torch.compile``'d module or function, its
  original (which is what runs while it is traced); from an ``fx.GraphModule``
  (``symbolic_trace``, ``torch.export``'s ``.module()``), its generated ``forward`` instead of
  the graph it was generated from;
* from any other object: its class and its ``__dict__``/``__slots__``; from containers their
  items; from user-defined classes their methods and class attributes; from modules of the
  user's own code the attributes its code names.

Every value reached becomes one of three things:

* **lifted** (tensors): read afresh on every call and passed to the graph as an input, so
  ``W = new_tensor``, ``module.weight = nn.Parameter(...)``, ``load_state_dict(...,
  assign=True)``, a replaced buffer and in-place updates all give fresh results without a new
  capture; only shape, dtype and device are guarded;
* **guarded** by value (numbers, strings, dtypes, devices, ``None``, small sets, numpy arrays),
  by identity (library functions and modules, classes, opaque objects, held weakly where
  possible), by code object (Python functions), or by structure (container lengths and keys,
  ``__dict__`` sizes, empty hook tables);
* a **problem** that sends the function to the reference strategy, with the reason in the plan:
  Python-level randomness or clocks (``random``, ``time``, ``numpy.random``, reseeding torch),
  module backward hooks (they change what reverse mode computes), tensor subclasses, code of
  the user's that may test a tensor's exact type (``type(x) is torch.Tensor``: the trace's
  stand-ins are a subclass, torch.func's wrappers plain tensors), objects that can neither be
  looked into nor referenced weakly, or more state than it is worth guarding.

The walk is compiled into one straight-line Python function (``GuardSet.check``) that returns
the lifted tensors, or the index of the first guard that failed (``-1``: the structure itself
changed, e.g. an attribute or key vanished). It never holds the user's objects strongly except
library objects and classes, so a deleted model is collected. Over-approximation is deliberate:
a guard on state the function never uses costs a recapture at worst, a missing one a wrong
number.
"""

from __future__ import annotations

import copy
import dis
import enum
import functools
import logging
import math
import os
import random
import sys
import sysconfig
import types
import weakref
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .tracer import is_leaked

# beyond this many guards the state is not worth guarding: the function falls back
_MAX_GUARDS = 50_000
# containers of plain values longer than this are compared as a whole copy
_SCALAR_LIST_COPY = 64
_MAX_DEPTH = 40

_SCALARS: tuple[type, ...] = (bool, int, float, complex, str, bytes, type(None),
                              type(Ellipsis), type(NotImplemented), torch.dtype, torch.layout,
                              torch.memory_format, range, slice)
_DEVICE_LIKE = (torch.device, torch.Size)

# Python-level state that changes between calls: a captured graph would freeze one value
_IMPURE_MODULES = {"random", "time", "secrets", "uuid", "datetime"}
_IMPURE_NAMES = {
    "numpy": {"random"},
    "torch": {"manual_seed", "seed", "set_rng_state", "get_rng_state", "initial_seed",
              "fork_rng"},
    "os": {"urandom", "getpid", "environ", "getenv"},
}
# nn.Module attributes that cannot change what ``forward`` computes
_MODULE_SKIP = frozenset({
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_non_persistent_buffers_set", "_is_full_backward_hook",
    "_version",
    # RNNBase: a cache of its weight attributes (which are lifted) that ``forward`` rebuilds
    # whenever the weak references no longer point at them, as after every ``functional_call``
    "_flat_weights", "_flat_weight_refs",
})
# ``torch.fx.GraphModule`` attributes (``symbolic_trace``, ``torch.export``'s ``.module()``):
# the graph and what built it; what runs is the ``forward`` generated from it, walked instead
_GRAPH_MODULE_SKIP = frozenset({
    "_graph", "_code", "_lineno_map", "_prologue_start", "_tracer_cls", "_tracer_extras",
    "meta", "_replace_hooks", "_create_node_hooks", "_erase_node_hooks", "_deepcopy_hooks",
    "shape_env", "range_constraints", "_in_spec", "_out_spec", "validate_inputs", "train",
    "eval",
})
_GLOBAL_MODULE_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks",
                        "_global_forward_hooks_always_called",
                        "_global_forward_hooks_with_kwargs", "_global_backward_pre_hooks",
                        "_global_backward_hooks")
# a module's backward hooks wrap its inputs and outputs in autograd nodes that change the
# gradients reverse mode computes, which a graph of forward operators cannot see
_BACKWARD_HOOKS = ("_backward_pre_hooks", "_backward_hooks")
_HOOKS_REFERENCE = ("has backward hooks ({}), which change the derivatives reverse mode computes: "
                    "only nested torch.func runs them")


# NOTE [TorchScript]
# A TorchScript function or module runs its operators through a graph executor that, once it
# has profiled calls with inputs requiring grad, groups them into differentiable graphs: their
# forward runs with grad mode off under one autograd node of the executor's own. A trace cuts
# what runs with grad mode off (the derivative through the call came out zero), and torch's
# nested derivatives of such a call are wrong (torch 2.13: nested ``jacrev`` gives a Hessian
# of zero) -- also under ``torch.jit.optimized_execution(False)``, which an executor built
# before ignores. So a function reaching TorchScript code runs the reference, which flushes the
# executors of the TorchScript objects the walks met (:data:`TORCHSCRIPT`) and runs them
# unoptimized (``_reference.reference_mode``): their plain operators, whose derivatives are
# right at every order, flushed again afterwards so that the caller's next call builds them
# under the caller's settings. TorchScript the walk cannot see (a library's) fails the capture:
# a TorchScript call is no torch function, so the caller's tensors reach it without their
# stand-ins (the recorder refuses them: ``tracer.record``'s ``outside``), and its tensors may
# carry a differentiable graph's node (``trace._StandIns``).
TORCHSCRIPT: weakref.WeakSet[Any] = weakref.WeakSet()


def flush_torchscript() -> None:
    """Drop the graph executors of the TorchScript objects the walks met (NOTE
    [TorchScript]): the next call builds them afresh, under the executor settings then."""
    for obj in list(TORCHSCRIPT):
        if isinstance(obj, torch.jit.ScriptModule):
            for module in obj.modules():
                c: Any = module._c
                for name in c._method_names():
                    c._get_method(name)._debug_flush_compilation_cache()
        else:
            obj._debug_flush_compilation_cache()


def _escaped(t: Tensor) -> bool:
    """``t`` is a tensor of a torch.func transform that has returned (stored in Python state
    while the reference ran): only that transform could read it."""
    fx = torch._C._functorch
    if not fx.is_functorch_wrapped_tensor(t):
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return fx.maybe_get_level(t) not in {i.level() for i in retrieve_all_functorch_interpreters()}


def _compiled(obj: Any) -> tuple[str, Any] | None:
    """``(attribute, original)`` of a ``torch.compile``'d module or function, else None."""
    if "torch._dynamo" not in sys.modules:  # nothing is compiled before it is imported
        return None
    if isinstance(obj, torch.nn.Module):
        if isinstance(obj, sys.modules["torch._dynamo.eval_frame"].OptimizedModule):
            return "_orig_mod", obj._orig_mod
        return None
    original = getattr(obj, "_torchdynamo_orig_callable", None) \
        if type(obj) is types.FunctionType else None
    return None if original is None else ("_torchdynamo_orig_callable", original)


def _library_paths() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # xafunc itself
    return tuple(sorted(os.path.abspath(p) + os.sep for p in paths if p))


_LIBRARY_PATHS = _library_paths()
_LIBRARY_ROOTS = {"torch", "xafunc", "numpy", "opt_einsum", "functools", "operator", "math",
                  "builtins", "typing", "collections", "itertools", "abc", "types", "enum",
                  "dataclasses", "contextlib", "warnings", "weakref", "copy", "inspect"}


@functools.lru_cache(maxsize=4096)
def _library_file(filename: str) -> bool:
    """Code from the standard library, an installed package or xafunc itself: its module
    state is not guarded (only what is passed to it or closed over)."""
    if not filename or filename.startswith("<"):
        return filename.startswith("<frozen")
    return os.path.abspath(filename).startswith(_LIBRARY_PATHS)


def _library_module(mod: types.ModuleType) -> bool:
    root = mod.__name__.split(".")[0]
    if root in _LIBRARY_ROOTS or root in sys.builtin_module_names:
        return True
    return _library_file(getattr(mod, "__file__", None) or "")


def _library_class(cls: type) -> bool:
    mod = sys.modules.get(cls.__module__)
    if mod is None:
        return cls.__module__ in ("builtins",)
    return _library_module(mod)


# the special methods of a user's class that Python may call while ``func`` runs are walked
# (``__call__``, ``__getattr__``, a descriptor's ``__get__``, operators, ``__float__``, ...);
# these it does not call to compute a value
_UNCALLED_DUNDERS = frozenset({
    "__init__", "__new__", "__del__", "__repr__", "__str__", "__format__", "__init_subclass__",
    "__set_name__", "__class_getitem__", "__subclasshook__", "__reduce__", "__reduce_ex__",
    "__getstate__", "__setstate__", "__copy__", "__deepcopy__", "__dir__", "__sizeof__",
    "__post_init__"})
_METHOD_TYPES = (types.FunctionType, staticmethod, classmethod, property)


# what reads attributes by names the code may compute, or reads them all
_COMPUTED_NAMES = frozenset({"getattr", "vars", "__dict__", "__getattribute__", "attrgetter",
                             "methodcaller", "getattr_static", "asdict", "astuple"})
# the names of a test of a tensor's exact type (``type(x) is torch.Tensor``, ``x.__class__``),
# which the trace's stand-ins (a subclass of ``torch.Tensor``) fail where torch.func's
# wrappers (plain tensors) pass
_TENSOR_TYPES = frozenset({"Tensor", "Parameter"})
_TORCH_FUNCTION_TESTS = frozenset({"has_torch_function", "has_torch_function_unary",
                                   "has_torch_function_variadic"})
_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS",
                         "STORE_GLOBAL", "DELETE_GLOBAL"})


@dataclass(frozen=True)
class _Names:
    """What the names in a code object (and the code nested in it) say it reads."""

    # the globals it loads or stores by name. ``co_names`` also holds every attribute name,
    # and a global that shares one (a ``T`` beside ``x.T``, a ``weight`` beside
    # ``self.lin.weight``) must not be guarded: each change would trace it again
    globals: frozenset[str]
    # the modules it imports (absolutely: ``import cfg`` inside a function, then ``cfg.K``),
    # or names by string (``sys.modules["cfg"]``, ``importlib.import_module("cfg")``)
    imports: frozenset[str]
    # every name it uses, and the identifiers among its string constants: the attributes it
    # may read of a module (``cfg.K``, ``getattr(cfg, "K")``, ``vars(cfg)["K"]``)
    attributes: frozenset[str]
    # it reads attributes by names it computes (``getattr(cfg, name)``, ``vars(cfg)[k]``,
    # ``attrgetter(name)``), or all of them (``dataclasses.asdict(cfg)``)
    dynamic: bool
    # it runs code from strings (``eval``, ``exec``), whose reads no walk can see
    evaluates: bool
    # it may test a tensor's exact type: ``type(x) is torch.Tensor``, ``x.__class__``,
    # ``type(p) is nn.Parameter``, ``has_torch_function``
    tests_type: bool


@functools.lru_cache(maxsize=4096)
def _names(code: types.CodeType) -> _Names:
    names, imports, strings = set(), set(), set()
    attributes = set(code.co_names)
    ins = list(dis.get_instructions(code))
    for i, op in enumerate(ins):
        if op.opname in _GLOBAL_OPS:
            names.add(str(op.argval))
        elif op.opname == "IMPORT_NAME" and i >= 2 and ins[i - 2].opname == "LOAD_CONST" \
                and ins[i - 2].argval == 0:
            imports.add(str(op.argval))
    for c in code.co_consts:
        if type(c) is str and all(part.isidentifier() for part in c.split(".")):
            strings |= {c, *c.split(".")}  # ``attrgetter("cfg.k")`` reads ``cfg`` and ``k``
    inner = [_names(c) for c in code.co_consts if isinstance(c, types.CodeType)]
    for n in inner:
        names |= n.globals
        imports |= n.imports
        attributes |= n.attributes
    attributes |= strings
    if "globals" in names:  # ``globals()["K"]``
        names |= {s for s in strings if s.isidentifier()}
    if attributes & {"modules", "import_module"}:
        imports |= {s for s in strings if s in sys.modules}
    return _Names(frozenset(names), frozenset(imports), frozenset(attributes),
                  any(n.dynamic for n in inner) or bool(_COMPUTED_NAMES & attributes),
                  any(n.evaluates for n in inner) or bool({"eval", "exec"} & names),
                  bool(_TORCH_FUNCTION_TESTS & attributes) or bool(
                      ("type" in names or "__class__" in attributes)
                      and _TENSOR_TYPES & attributes))


@functools.lru_cache(maxsize=1024)
def _deferrable(cls: type) -> bool:
    """A user's class whose library bases are ``object`` and ``nn.Module`` only."""
    return not _library_class(cls) and all(
        b in (object, torch.nn.Module) for b in cls.__mro__ if _library_class(b))


@functools.lru_cache(maxsize=1024)
def _library_names(cls: type) -> frozenset[str]:
    """The names the code of ``cls``'s library bases uses (``nn.Conv2d._conv_forward`` reads
    ``self.padding_mode``): attributes it may read whatever the user's code names."""
    names: set[str] = set()
    for base in cls.__mro__:
        if base is object or not _library_class(base):
            continue
        for value in vars(base).values():
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else \
                value.fget if isinstance(value, property) else value
            if isinstance(fn, types.FunctionType):
                names |= _names(fn.__code__).attributes
    return frozenset(names)


class Unguardable(Exception):
    """The function reaches state that cannot be guarded; the message says which."""


@dataclass
class LiftedTensor:
    """A tensor the function reads, and the guard-code expression that reads it."""

    tensor: Tensor
    var: str
    where: str


@dataclass
class Walk:
    """The result of :func:`walk`: guard code lines, lifted tensors and problems."""

    lines: list[str] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)
    consts: dict[str, Any] = field(default_factory=dict)
    lifted: list[LiftedTensor] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # memory of the numpy arrays guarded by value: tensors made from them (torch.from_numpy)
    # may be baked into the graph as constants
    value_buffers: list[tuple[int, int]] = field(default_factory=list)
    # state holds a tensor the function stored there while it was traced
    leaked: bool = False
    # every value reached was guarded or lifted (no ``Unguardable``): the guards then also
    # tell when the problems found could have gone away
    complete: bool = True

    def tensor_table(self) -> dict[int, LiftedTensor]:
        return {id(lt.tensor): lt for lt in self.lifted}


class _Walker:
    def __init__(self) -> None:
        self.w = Walk()
        self.n = 0
        self.seen: dict[int, tuple[str, Any]] = {}
        self.keep: list[Any] = []  # objects whose ids are in ``seen`` stay alive while walking
        self.module_hooks = False
        # the user's modules reached, by id: [module, its guard variable, depth, whether code
        # reading it as a global or an import computes names], the attribute names all the
        # user's code walked uses, and whether any computes names; see :meth:`finish`
        self.user_modules: dict[int, list[Any]] = {}
        self.read_names: set[str] = set()
        self.dynamic = False
        # class and instance attributes walked only once some code names them: (name, value,
        # expression, where, depth); and the classes whose bodies were visited
        self.named: list[tuple[str, Any, str, str, int]] = []
        self.bodies: set[int] = set()

    # ------------------------------------------------------------------ codegen
    def var(self, expr: str) -> str:
        self.n += 1
        name = f"v{self.n}"
        self.w.lines.append(f"{name} = {expr}")
        return name

    def const(self, value: Any, weak: bool = False) -> str:
        name = f"K{len(self.w.consts)}"
        self.w.consts[name] = weakref.ref(value) if weak else value
        return f"{name}()" if weak else name

    def guard(self, cond: str, desc: str) -> None:
        if len(self.w.descriptions) >= _MAX_GUARDS:
            raise Unguardable(f"it reaches more than {_MAX_GUARDS} values to guard")
        i = len(self.w.descriptions)
        self.w.descriptions.append(desc)
        self.w.lines.append(f"if not ({cond}): return {i}")

    def problem(self, msg: str) -> None:
        if msg not in self.w.problems:
            self.w.problems.append(msg)

    # ------------------------------------------------------------------ walking
    def walk(self, obj: Any, v: str, where: str, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise Unguardable(f"{where} is nested more than {_MAX_DEPTH} levels deep")
        t = type(obj)
        if t in _SCALARS or isinstance(obj, enum.Enum):
            self.scalar(obj, v, where)
            return
        if t in _DEVICE_LIKE:
            self.guard(f"type({v}) is {self.const(t)} and {v} == {self.const(obj)}",
                       f"{where} == {obj!r}")
            return
        seen = self.seen.get(id(obj))
        if seen is not None:
            self.guard(f"{v} is {seen[0]}", f"{where} is the same object as {seen[1]}")
            return
        self.seen[id(obj)] = (v, where)
        self.keep.append(obj)
        compiled = _compiled(obj)
        if compiled is not None:  # what runs is the original code (``trace``): walk that
            self.guard(f"type({v}) is {self.const(t)}", f"{where} is compiled")
            self.walk(compiled[1], self.var(f"{v}.{compiled[0]}"), f"{where} (its original)",
                      depth + 1)
        elif isinstance(obj, Tensor):
            self.tensor(obj, v, where, depth)
        elif isinstance(obj, type):
            self.cls(obj, v, where, depth)
        elif t is types.FunctionType:
            self.function(obj, v, where, depth)
        elif t is types.MethodType:
            self.guard(f"type({v}) is {self.const(t)}", f"{where} is a bound method")
            self.walk(obj.__func__, self.var(f"{v}.__func__"), f"{where}.__func__", depth + 1)
            self.walk(obj.__self__, self.var(f"{v}.__self__"), f"{where}.__self__", depth + 1)
        elif t is types.BuiltinFunctionType or t is types.BuiltinMethodType:
            self.builtin(obj, v, where, depth)
        elif t is types.ModuleType:
            self.module(obj, v, where, depth)
        elif isinstance(obj, torch.jit.ScriptModule):  # before nn.Module: it is one
            self.guard(f"{v} is {self.const(obj, weak=True)}", f"{where} is the same module")
            TORCHSCRIPT.add(obj)
            self.problem(f"cannot guard the state it reads: {where} is a TorchScript module "
                         "(torch.jit.script or trace), whose code and attributes live in C++")
        elif isinstance(obj, torch.jit.ScriptFunction):
            self.guard(f"{v} is {self.const(obj)}", f"{where} is the same function")
            TORCHSCRIPT.add(obj)
            self.problem(f"{where} is a TorchScript function (torch.jit.script or trace), whose "
                         "autograd runs differentiable graphs of its own (NOTE [TorchScript])")
        elif isinstance(obj, torch.nn.Module):
            self.nn_module(obj, v, where, depth)
        elif t is functools.partial:
            self.guard(f"type({v}) is {self.const(t)}", f"{where} is a functools.partial")
            self.walk(obj.func, self.var(f"{v}.func"), f"{where}.func", depth + 1)
            self.walk(obj.args, self.var(f"{v}.args"), f"{where}.args", depth + 1)
            self.walk(obj.keywords, self.var(f"{v}.keywords"), f"{where}.keywords", depth + 1)
        elif t in (tuple, list, deque) or (isinstance(obj, tuple) and hasattr(t, "_fields")):
            self.sequence(obj, v, where, depth)
        elif t in (dict, OrderedDict, defaultdict):
            self.mapping(obj, v, where, depth)
        elif t in (set, frozenset):
            if not all(type(e) in _SCALARS for e in obj):
                raise Unguardable(f"{where} is a set of objects, which cannot be guarded")
            self.guard(f"type({v}) is {self.const(t)} and {v} == {self.const(frozenset(obj))}",
                       f"{where} == {obj!r}")
        elif t in (staticmethod, classmethod):
            self.walk(obj.__func__, self.var(f"{v}.__func__"), f"{where}.__func__", depth + 1)
        elif t is property:
            for part in ("fget", "fset"):
                self.walk(getattr(obj, part), self.var(f"{v}.{part}"), f"{where}.{part}",
                          depth + 1)
        elif t is types.CellType:
            try:
                contents = obj.cell_contents
            except ValueError:
                self.guard(f"_empty_cell({v})", f"{where} is unbound")
                return
            self.walk(contents, self.var(f"{v}.cell_contents"), where, depth + 1)
        elif t.__module__ == "numpy" and t.__name__ == "ndarray":
            self.ndarray(obj, v, where)
        elif isinstance(obj, torch.Generator):
            try:  # weakly where torch allows it; before torch 2.13 a Generator takes no weakref
                ref = self.const(obj, weak=True)
            except TypeError:
                ref = self.const(obj)
            self.guard(f"{v} is {ref}", f"{where} is the same generator")
        elif isinstance(obj, logging.Logger):
            # what it writes is a side effect, made when the function is traced (as a
            # ``print`` is); what code may branch on is whether a level is enabled
            level = obj.getEffectiveLevel()
            self.guard(f"{v} is {self.const(obj, weak=True)} and {v}.disabled is "
                       f"{obj.disabled} and {v}.getEffectiveLevel() == {level}",
                       f"{where} is the same logger, at level {level}")
        elif isinstance(obj, random.Random) or str(t.__module__).startswith("numpy.random"):
            # (a numpy Generator, RandomState or bit generator: its module is numpy.random's;
            # a class may define ``__module__`` as a property, as xafunc's transforms do)
            self.problem(f"it uses a random number generator ({where}, a {t.__name__}), "
                         "whose results change between calls")
        elif isinstance(obj, Iterator):
            self.problem(f"{where} is an iterator ({t.__name__}), whose position advances on "
                         "every call")
        elif isinstance(obj, (dict, list, tuple)):  # a subclass (AttrDict, EasyDict, Counter)
            if isinstance(obj, dict):
                self.mapping(obj, v, where, depth)
            else:
                self.sequence(obj, v, where, depth)
            self.instance(obj, v, where, depth)  # and its attributes and class
        elif t is bytearray or (t.__module__ == "array" and t.__name__ == "array"):
            self.guard(f"type({v}) is {self.const(t)} and {v} == {self.const(copy.copy(obj))}",
                       f"{where} has the same contents")
        else:
            self.instance(obj, v, where, depth)

    def scalar(self, obj: Any, v: str, where: str) -> None:
        t = type(obj)
        if t is bool:
            self.guard(f"{v} is {obj}", f"{where} is {obj}")
        elif t is float and (obj == 0.0 or obj != obj):  # -0.0 vs 0.0, nan
            self.guard(f"type({v}) is float and _same_float({v}, {obj!r})",
                       f"{where} == {obj!r}")
        elif t in (type(None), type(Ellipsis), type(NotImplemented)):
            self.guard(f"{v} is {self.const(obj)}", f"{where} is {obj!r}")
        else:
            self.guard(f"type({v}) is {self.const(t)} and {v} == {self.const(obj)}",
                       f"{where} == {obj!r}")

    def tensor(self, obj: Tensor, v: str, where: str, depth: int) -> None:
        if is_leaked(obj) or _escaped(obj):
            self.w.leaked = True
            self.problem(f"{where} holds a tensor the function stored there while it was "
                         "traced or differentiated (state it writes on every call: NOTE "
                         "[Python side effects])")
            return
        if type(obj) not in (Tensor, torch.nn.Parameter, torch.nn.Buffer) and not _plain_like(obj):
            self.guard(f"type({v}) is {self.const(type(obj))}", f"{where} is a {type(obj)}")
            self.problem(f"{where} is a tensor subclass ({type(obj).__name__}); xafunc captures "
                         "plain tensors only")
            return
        self.w.lifted.append(LiftedTensor(obj, v, where))
        if obj.__dict__:  # Python attributes set on the tensor (``w.scale = 2.0``)
            self.walk(obj.__dict__, self.var(f"{v}.__dict__"), f"{where}.__dict__", depth + 1)

    def cls(self, obj: type, v: str, where: str, depth: int) -> None:
        self.guard(f"{v} is {self.const(obj)}", f"{where} is {obj.__qualname__}")
        if not _library_class(obj):
            self.class_body(obj, v, where, depth)

    def class_body(self, cls: type, v: str, where: str, depth: int) -> None:
        """Methods and class attributes of a user-defined class and its user-defined bases:
        the special methods Python may call and the overrides of a library base's methods
        (``forward``, ``_conv_forward``: library code calls them) now; the others once some
        code walked names them (``self.helper()``, ``self.scale``), in :meth:`finish` -- a
        method nothing calls (a ``log`` reading a loss history) must not guard what it reads."""
        library = set().union(*(vars(b) for b in cls.__mro__ if _library_class(b)))
        for base in cls.__mro__:
            if base is object or _library_class(base) or id(base) in self.bodies:
                continue
            self.bodies.add(id(base))
            bv = self.var(f"{self.const(base)}.__dict__")
            for name, value in list(vars(base).items()):
                dunder = name.startswith("__") and name.endswith("__")
                if dunder and (name in _UNCALLED_DUNDERS or type(value) not in _METHOD_TYPES):
                    continue
                if isinstance(value, (types.MemberDescriptorType, types.GetSetDescriptorType)):
                    continue
                if dunder or name in library:
                    self.walk(value, self.var(f"{bv}[{name!r}]"), f"{base.__qualname__}.{name}",
                              depth + 1)
                else:
                    self.named.append((name, value, f"{bv}[{name!r}]",
                                       f"{base.__qualname__}.{name}", depth + 1))

    def attribute(self, cls: type, name: str, value: Any, expr: str, where: str,
                  depth: int) -> None:
        """An instance attribute: walked now, or -- a public attribute of a user's class (built
        on ``object`` or ``nn.Module`` only) that no library base's code reads (``self.losses``,
        ``self.step`` kept beside a model) -- once some code walked names it, in
        :meth:`finish`; appending a loss to a history ``forward`` never reads must not trace
        the function again. A subclass of another library class is walked whole: its base may
        read every attribute (pydantic's ``model_dump``, in compiled code)."""
        if name.startswith("_") or not _deferrable(cls) or name in _library_names(cls):
            self.walk(value, self.var(expr), where, depth)
        else:
            self.named.append((name, value, expr, where, depth))

    def function(self, fn: types.FunctionType, v: str, where: str, depth: int) -> None:
        code = fn.__code__
        self.guard(f"type({v}) is _function and {v}.__code__ is {self.const(code)}",
                   f"{where} is {fn.__qualname__} (same code)")
        if fn.__defaults__:
            self.walk(fn.__defaults__, self.var(f"{v}.__defaults__"), f"{where}.__defaults__",
                      depth + 1)
        else:
            self.guard(f"not {v}.__defaults__", f"{where} has no default arguments")
        if fn.__kwdefaults__:
            self.walk(fn.__kwdefaults__, self.var(f"{v}.__kwdefaults__"),
                      f"{where}.__kwdefaults__", depth + 1)
        names = _names(code)
        for i, (name, cell) in enumerate(zip(code.co_freevars, fn.__closure__ or ())):
            cv = self.var(f"{v}.__closure__[{i}]")
            self.walk(cell, cv, f"{where}: closure variable {name!r}", depth + 1)
            contents = _cell_contents(cell)
            if type(contents) is types.ModuleType:
                self.read_by(contents, names)
        if fn.__dict__ and not _library_file(code.co_filename):  # ``f.scale = 2.0``
            self.walk(fn.__dict__, self.var(f"{v}.__dict__"), f"{where}.__dict__", depth + 1)
        if _library_file(code.co_filename):
            if fn.__name__ in _IMPURE_NAMES.get((fn.__module__ or "").split(".")[0], ()):
                self.problem(f"it uses {fn.__module__}.{fn.__name__}, whose results change "
                             "between calls")  # (``from torch.random import fork_rng``)
            self.impure_names(fn.__globals__, names.globals, where)
            return
        g = fn.__globals__
        gv = None
        self.read_names |= names.attributes
        self.dynamic |= names.dynamic
        if names.evaluates and not {"eval", "exec"} & names.globals & set(g):
            self.problem(f"{where} runs code from a string (eval or exec), whose reads cannot "
                         "be guarded")
        if names.tests_type:
            self.problem(f"{where} may test a tensor's exact type (type(x) is torch.Tensor, "
                         "x.__class__, has_torch_function), which the trace's stand-ins fail; "
                         "test isinstance(x, torch.Tensor) to keep the engine")
        for name in sorted(names.globals):
            if name not in g:
                continue
            gv = gv or self.var(f"{v}.__globals__")
            value = g[name]
            self.walk(value, self.var(f"{gv}[{name!r}]"), f"global {name!r} of {fn.__qualname__}",
                      depth + 1)
            if type(value) is types.ModuleType:
                self.read_by(value, names)
        for name in sorted(names.imports):  # ``import cfg`` / ``from cfg import K`` inside
            mod = sys.modules.get(name)
            if type(mod) is not types.ModuleType:
                continue
            self.walk(mod, self.var(f"{self.const(sys.modules)}[{name!r}]"),
                      f"module {name!r} imported by {fn.__qualname__}", depth + 1)
            self.read_by(mod, names)

    def impure_names(self, g: dict[str, Any], names: frozenset[str], where: str) -> None:
        for name in names:
            value = g.get(name)
            if type(value) is types.ModuleType and value.__name__ in _IMPURE_MODULES:
                self.problem(f"{where} uses the {value.__name__!r} module, whose results change "
                             "between calls")

    def builtin(self, obj: Any, v: str, where: str, depth: int) -> None:
        owner = getattr(obj, "__self__", None)
        mod = getattr(obj, "__module__", None) or ""
        if mod.split(".")[0] in _IMPURE_MODULES or (
                isinstance(owner, types.ModuleType) and owner.__name__ in _IMPURE_MODULES):
            self.problem(f"{where} calls {mod}.{obj.__name__}, whose results change between calls")
        if owner is None or isinstance(owner, types.ModuleType):
            self.guard(f"{v} is {self.const(obj)}", f"{where} is {obj!r}")
            return
        # a method bound to an object: the object is part of the state
        self.guard(f"type({v}) is {self.const(type(obj))} and {v}.__name__ == "
                   f"{obj.__name__!r}", f"{where} is .{obj.__name__}")
        self.walk(owner, self.var(f"{v}.__self__"), f"{where}.__self__", depth + 1)

    def module(self, mod: types.ModuleType, v: str, where: str, depth: int) -> None:
        self.guard(f"{v} is {self.const(mod)}", f"{where} is module {mod.__name__}")
        if mod.__name__ in _IMPURE_MODULES:
            self.problem(f"it uses the {mod.__name__!r} module ({where}), whose results change "
                         "between calls")
        if not _library_module(mod):
            self.user_modules[id(mod)] = [mod, v, depth, False]

    def finish(self) -> None:
        """The class and instance attributes some code walked names (see :meth:`class_body`,
        :meth:`attribute`), and the attributes of the user's modules reached (as a global, an
        import, a closure, an attribute ``self.cfg = config`` or an argument) that any code
        walked names (``config.SCALE``, ``getattr(config, "SCALE")``): the module may be
        passed on, so every reader counts. When some code computes the names it reads
        (``getattr(o, name)``), every data attribute and user module too, and when the code
        reading a module as a global or an import does (``getattr(activations, name)``), its
        functions and classes as well. Walked last, and again while walking them reaches more
        code."""
        walked: dict[int, set[str]] = {}
        grew = True
        while grew:
            grew = False
            named, self.named = self.named, []
            for name, value, expr, where, depth in named:
                if name in self.read_names or self.dynamic:
                    grew = True
                    self.walk(value, self.var(expr), where, depth)
                else:
                    self.named.append((name, value, expr, where, depth))
            for mod, v, depth, computed in list(self.user_modules.values()):
                attrs = mod.__dict__
                want = {n for n in self.read_names if n in attrs}
                if self.dynamic:
                    want |= {n for n, value in attrs.items() if (
                        type(value) is not types.ModuleType or not _library_module(value))
                        and (computed or not callable(value))}
                new = {n for n in want if not n.startswith("__")} - walked.setdefault(
                    id(mod), set())
                if not new:
                    continue
                grew = True
                walked[id(mod)] |= new
                d = self.var(f"{v}.__dict__")
                for name in sorted(new):
                    self.walk(attrs[name], self.var(f"{d}[{name!r}]"), f"{mod.__name__}.{name}",
                              depth + 1)

    def read_by(self, mod: types.ModuleType, names: _Names) -> None:
        """``mod`` is a global or an import of code that uses ``names``: a user's module has
        those of its attributes walked, a library module may not be read for what changes
        between calls (``np.random``, ``os.environ``)."""
        entry = self.user_modules.get(id(mod))
        if entry is not None:
            entry[3] = entry[3] or names.dynamic
        root = mod.__name__.split(".")[0]
        bad = _IMPURE_NAMES.get(root, set()) & names.attributes
        if bad and (root != "os" or "environ" in bad or "getenv" in bad or "urandom" in bad):
            self.problem(f"it uses {mod.__name__}.{sorted(bad)[0]}, whose results change "
                         "between calls")

    def nn_module(self, m: torch.nn.Module, v: str, where: str, depth: int) -> None:
        cls = type(m)
        self.guard(f"type({v}) is {self.const(cls)}", f"{where} is a {cls.__qualname__}")
        if not self.module_hooks:
            self.module_hooks = True
            mm = sys.modules["torch.nn.modules.module"]
            for name in _GLOBAL_MODULE_HOOKS:
                hooks = getattr(mm, name)
                hv = self.var(f"{self.const(mm)}.{name}")
                if hooks and name.startswith("_global_backward"):
                    self.guard(f"{hv}", f"torch has global backward hooks ({name})")
                    self.problem("torch " + _HOOKS_REFERENCE.format(name))
                elif hooks:
                    self.walk(hooks, hv, f"torch.nn.modules.module.{name}", depth + 1)
                else:
                    self.guard(f"not {hv}", f"no global module hooks ({name})")
        d = vars(m)
        dv = self.var(f"{v}.__dict__")
        self.guard(f"len({dv}) == {len(d)}", f"{where} has the same attributes")
        backward = [k for k in _BACKWARD_HOOKS if d.get(k)]
        if backward:
            self.guard(" and ".join(f"{dv}[{k!r}]" for k in backward), f"{where} has backward "
                       "hooks")
            self.problem(f"{where} " + _HOOKS_REFERENCE.format(", ".join(backward)))
        empty_hooks = [k for k in d if k.startswith(("_forward", "_backward"))
                       and isinstance(d[k], dict) and not d[k] and k not in _MODULE_SKIP]
        if empty_hooks:  # one check for all the (usually empty) hook tables
            self.guard(" or ".join(f"{dv}[{k!r}]" for k in empty_hooks).join(("not (", ")")),
                       f"{where} has no hooks")
        graph_module = isinstance(m, torch.fx.GraphModule)
        if graph_module:  # its generated code (a new function on every ``recompile()``)
            self.walk(cls.forward, self.var(f"type({v}).forward"), f"{where}.forward",
                      depth + 1)
        for k in d:
            if k in _MODULE_SKIP or k in empty_hooks or (graph_module and k in _GRAPH_MODULE_SKIP):
                continue
            value = d[k]
            label = f"{where}.{k}"
            if k in ("_parameters", "_buffers", "_modules"):
                kv = self.var(f"{dv}[{k!r}]")
                if k == "_modules":  # iteration order matters (``nn.Sequential``)
                    self.guard(f"{_keys(kv)} == {self.const(tuple(value))}", f"{label} keys")
                else:  # read by name: the count catches an added or removed entry
                    self.guard(f"len({kv}) == {len(value)}", f"{label} keys")
                for name, item in value.items():
                    self.walk(item, self.var(f"{kv}[{name!r}]"), f"{where}.{name}", depth + 1)
            elif type(value) is bool:  # the training flag and other switches
                self.guard(f"{dv}[{k!r}] is {value}", f"{label} is {value}")
            else:
                self.attribute(cls, k, value, f"{dv}[{k!r}]", label, depth + 1)
        if not _library_class(cls):
            self.class_body(cls, v, where, depth)

    def sequence(self, obj: Any, v: str, where: str, depth: int) -> None:
        t = type(obj)
        if len(obj) > _SCALAR_LIST_COPY and all(type(e) in _SCALARS for e in obj):
            self.guard(f"type({v}) is {self.const(t)} and {v} == {self.const(t(obj))}",
                       f"{where} has the same contents")
            return
        self.guard(f"type({v}) is {self.const(t)} and len({v}) == {len(obj)}",
                   f"{where} has length {len(obj)}")
        if t is not deque and hasattr(t, "_fields"):
            self.cls(t, self.var(f"type({v})"), f"type of {where}", depth)
        for i, item in enumerate(obj):
            self.walk(item, self.var(f"{v}[{i}]"), f"{where}[{i}]", depth + 1)

    def mapping(self, obj: dict[Any, Any], v: str, where: str, depth: int) -> None:
        t = type(obj)
        keys = tuple(obj)
        if not all(type(k) in _SCALARS for k in keys):
            raise Unguardable(f"{where} is a dict with non-scalar keys")
        self.guard(f"type({v}) is {self.const(t)} and {_keys(v)} == {self.const(keys)}",
                   f"{where} has keys {list(keys)[:8]}")
        if isinstance(obj, defaultdict):
            self.walk(obj.default_factory, self.var(f"{v}.default_factory"),
                      f"{where}.default_factory", depth + 1)
        for k in keys:
            self.walk(obj[k], self.var(f"{v}[{self.const(k)}]"), f"{where}[{k!r}]", depth + 1)

    def ndarray(self, obj: Any, v: str, where: str) -> None:
        if obj.dtype == object:
            raise Unguardable(f"{where} is a numpy array of Python objects")
        self.guard(f"type({v}) is {self.const(type(obj))} and _np_equal({v}, "
                   f"{self.const(obj.copy())})", f"{where} has the same values")
        self.w.value_buffers.append((obj.ctypes.data, obj.nbytes))

    def instance(self, obj: Any, v: str, where: str, depth: int) -> None:
        t = type(obj)
        self.guard(f"type({v}) is {self.const(t)}", f"{where} is a {t.__qualname__}")
        d = getattr(obj, "__dict__", None)
        slots = [s for c in t.__mro__ for s in getattr(c, "__slots__", ())
                 if isinstance(s, str) and s not in ("__dict__", "__weakref__")]
        if d is None and not slots:
            # opaque: compare by identity, weakly where possible
            try:
                ref = self.const(obj, weak=True)
            except TypeError:
                if not _library_class(t):
                    raise Unguardable(f"{where} (a {t.__qualname__}) can neither be looked "
                                      "into nor referenced weakly") from None
                ref = self.const(obj)
            self.guard(f"{v} is {ref}", f"{where} is the same object")
            return
        if isinstance(d, dict):
            dv = self.var(f"{v}.__dict__")
            self.guard(f"len({dv}) == {len(d)}", f"{where} has the same attributes")
            for k, value in list(d.items()):
                if type(k) is not str:
                    continue
                self.attribute(t, k, value, f"{dv}[{k!r}]", f"{where}.{k}", depth + 1)
        for s in slots:
            if hasattr(obj, s):
                self.walk(getattr(obj, s), self.var(f"{v}.{s}"), f"{where}.{s}", depth + 1)
        if not _library_class(t):
            self.class_body(t, v, where, depth)


def _keys(v: str) -> str:
    return f"tuple({v})"


def _plain_like(t: Tensor) -> bool:
    """Tensors of a trace (ours, or torch's fake ones) behave as plain tensors for capture."""
    from torch._subclasses.fake_tensor import FakeTensor

    from .tracer import is_traced

    return isinstance(t, FakeTensor) or is_traced(t)


def _same_float(a: float, b: float) -> bool:
    if b != b:
        return a != a
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _np_equal(a: Any, b: Any) -> bool:
    return bool(a.shape == b.shape and a.dtype == b.dtype
                and (a == b).all() if a.dtype.kind not in "fc"
                else a.shape == b.shape and a.dtype == b.dtype
                and ((a == b) | ((a != a) & (b != b))).all())


def _same_tensor(t: Any, ref: Tensor) -> bool:
    return (isinstance(t, Tensor) and t.dtype is ref.dtype and t.shape == ref.shape
            and t.device == ref.device and bool(torch.equal(t, ref)))


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # unbound
        return None


def _empty_cell(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return True
    return False


_HELPERS = {"_same_float": _same_float, "_np_equal": _np_equal, "_empty_cell": _empty_cell,
            "_function": types.FunctionType, "_same_tensor": _same_tensor}


def walk(func: Any, arg_objects: list[Any]) -> Walk:
    """Visit everything ``func`` (the root ``F``) and the non-tensor argument objects (the roots
    ``A[i]``) can reach; see NOTE [Guards and lifted tensors]."""
    w = _Walker()
    try:
        w.walk(func, "F", "the function")
        for i, a in enumerate(arg_objects):
            w.walk(a, w.var(f"A[{i}]"), f"argument object {i}")
        w.finish()
    except Unguardable as e:
        w.w.problems.append(f"cannot guard the state it reads: {e}")
        w.w.complete = False
    except RecursionError:
        w.w.problems.append("cannot guard the state it reads: it is nested too deeply")
        w.w.complete = False
    return w.w


@dataclass
class GuardSet:
    """A compiled guard function and what its checks mean.

    ``check(F, A)`` returns the lifted tensors (a tuple) when every guard holds, else the index
    of the failing guard (``-1`` when the state's structure changed).
    """

    check: Callable[[Any, Any], Any]
    descriptions: list[str]
    where: list[str]  # where each returned lifted tensor is read

    def describe(self, code: int) -> str:
        if code < 0:
            return "the structure of the state it reads changed (an attribute, key or cell " \
                   "disappeared)"
        return self.descriptions[code]


def compile_guards(w: Walk, used: list[int], baked: Sequence[int] = ()) -> GuardSet:
    """The guard function of walk ``w`` returning the lifted tensors at indices ``used``.

    Every lifted tensor is checked for the shape, dtype, device and ``requires_grad`` it was
    traced with, and for being a tensor at all -- also those no graph reads, whose metadata
    Python code may still have read (``x * o.shape[0]``, ``x.expand_as(o)``, ``if
    o.requires_grad``: a replaced ``o`` or a frozen parameter gave the stale result); each
    one at indices ``baked`` (a constant of the graph, see ``capture``) for its values.
    """
    lines = list(w.lines)
    descriptions = list(w.descriptions)
    consts = dict(w.consts)
    for i in baked:
        lt = w.lifted[i]
        k = len(consts)
        consts[f"K{k}"] = lt.tensor.detach().clone()
        descriptions.append(f"{lt.where} has the values it was captured with (they decide "
                            "shapes or Python values in the graph)")
        lines.append(f"if not _same_tensor({lt.var}, K{k}): return {len(descriptions) - 1}")
    out = []
    returned = set(used)
    for i in [*used, *(j for j in range(len(w.lifted)) if j not in returned and j not in baked)]:
        lt = w.lifted[i]
        t = lt.tensor
        k = len(consts)
        consts[f"K{k}"], consts[f"K{k + 1}"] = t.dtype, t.shape
        descriptions.append(f"{lt.where} is a tensor of shape {tuple(t.shape)}, {t.dtype}, "
                            f"on {t.device}, requires_grad={t.requires_grad}")
        # a tenth of the cost of comparing ``device`` objects
        if t.device.type == "cpu":
            where_ = f"{lt.var}.is_cpu"
        elif t.device.type == "cuda":
            where_ = f"{lt.var}.is_cuda and {lt.var}.get_device() == {t.get_device()}"
        else:
            consts[f"K{k + 2}"] = t.device
            where_ = f"{lt.var}.device == K{k + 2}"
        flag = "" if t.requires_grad else "not "
        lines.append(f"if not (isinstance({lt.var}, _Tensor) and {lt.var}.dtype is K{k} and "
                     f"{lt.var}.shape == K{k + 1} and {where_} and "
                     f"{flag}{lt.var}.requires_grad): return {len(descriptions) - 1}")
        if i in returned:
            out.append(lt.var)
    body = "\n        ".join(lines) or "pass"
    ret = f"({', '.join(out)},)" if out else "()"
    src = ("def __xafunc_guard(F, A):\n"
           "    try:\n"
           f"        {body}\n"
           "    except Exception:\n"
           "        return -1\n"
           f"    return {ret}\n")
    namespace: dict[str, Any] = {**_HELPERS, **consts, "_Tensor": Tensor}
    exec(compile(src, "<xafunc guard>", "exec"), namespace)  # noqa: S102 - generated code
    return GuardSet(namespace["__xafunc_guard"], descriptions, [w.lifted[i].where for i in used])
