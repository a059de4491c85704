"""Running a compiled graph: hoisted constant subexpressions and a TorchScript executor.

NOTE [Fast execution]
A compiled propagation (``compiler.py``) is a flat aten graph of a few dozen to a few hundred
small operators. Run by its FX ``forward``, each operator costs a Python call into the
dispatcher (about 1.5 us), which for PINN-sized problems is most of the run time. Three
executors run the same graph:

* **Plain calls** (every argument a plain tensor, no ``torch.func`` transform active -- the
  ``vmap`` fast path pops its own level first --, no gradient needed):
  - *hoisting*: nodes that depend only on the static inputs (the caller's weights: lifted from
    closures and modules, or passed as non-differentiated arguments, such as the parameter
    dict of ``functional_call``) and constants (transposes, slices, products of weights with the
    fixed seeds) are computed once by a *prologue* and cached with each input (held, for its
    identity), storage pointer and version counter; an in-place update of a weight (an optimiser
    step) bumps its counter and a new tensor changes the rest, either of which recomputes the
    prologue on the next call, as do the writes version counters miss (``w.data.mul_(2)``,
    fused optimisers; NOTE [Unversioned writes] in ``_capture/writes.py``);
  - *TorchScript*: the rest of the graph, with the hoisted values as inputs, is traced once
    by ``torch.jit.trace`` and run by its C++ interpreter (same aten kernels, same values, a
    fraction of the per-op cost), with pointwise ops writing into dead buffers
    (NOTE [Buffer reuse]), beneath the autograd dispatch keys (NOTE [Below autograd]); on a
    CPU, a small graph runs instead by PyTorch's static runtime, the same kernels at a lower
    cost per op (NOTE [Static runtime]);
  - or, with ``compile=True``, *inductor*: the same rest, still functional, compiled by
    torch.compile's code generator (NOTE [Inductor executor]);
  - on a GPU, the rest is replayed as one CUDA graph from its third call on
    (NOTE [CUDA graphs] in ``cuda_graph.py``).
* **Autograd and torch.func** (weights that require grad under grad mode, ``grad``/``jacrev``/
  ``vmap`` around the transform): the whole graph, traced once by TorchScript without hoisting
  or buffer reuse, runs under ``torch.jit.optimized_execution(False)``, so the interpreter
  dispatches every op exactly as eager code does -- autograd records the same nodes (no
  TorchScript autodiff) and functorch transforms the same ops -- at the interpreter's cost per
  op instead of Python's. A training loop on a CPU (calls recorded by autograd after a
  backward pass, or at the only grad level) instead runs a forward graph that keeps its
  activations and a backward graph, both by the plain executors (NOTE [Split graphs]).
  On a GPU, calls differentiated by autograd or at torch.func's grad levels instead apply
  the graph as one Function whose backward is a compiled graph too, both replayed (NOTE
  [Backward graphs] in ``backward.py``).
* **Anything else** (dispatch or function modes such as fake tensors and tracers, inside
  ``torch.compile``): the FX graph, which is exactly what the other two compute.

If tracing fails, the FX graph is used from then on.

NOTE [Inductor executor]
``compile=True`` hands the plain path's main part -- a flat, functional aten graph with the
hoisted values as inputs -- to ``torch._inductor.compile_fx.compile_fx``, the function behind
``torch.compile(backend="inductor")``, with the call's own tensors (detached, under
``no_grad``) as examples: no dynamo frame, no guards, so a call costs the generated code plus
a stride check. It fuses the pointwise chains of a Taylor propagation into a few C++/Triton
kernels that the interpreter would run one by one; inductor plans its own buffers, so the
buffer reuse pass is not applied. It compiles once per ``Executable`` (a captured signature
and plan: shapes, dtypes and devices are fixed); the code assumes the examples' strides, so a
later call whose inputs are laid out differently runs the functional FX graph instead of
recompiling. A failure to compile or to run the compiled code once, or code whose values
disagree with the eager graph's (NOTE [Checked compiles] in ``verify.py``), falls back to
TorchScript, and the reason is kept in ``executor``. The other executors are unchanged.
Inductor compiles with ``emulate_precision_casts``: by default it keeps the wider value of a
cast to a lower precision and back (``x.bfloat16().float()``), so the derivatives of a
function that rounds through bfloat16 came out 5e-2 off; with it, every cast rounds as the
eager kernels do. And its C++ kernels are generated for one thread (``cpp.threads``): for
more, torch 2.13 writes the accumulations of a scatter (the backward of an indexing) with
vectorised atomic adds whose index is wrong on tiled loops (``120*x0_inner`` for
``60*x0_inner``), out of bounds: a PINN training step's gradients 20-50 % off on two threads,
or a corrupted heap. The extern matrix products still use torch's threads.

NOTE [Inductor's small products]
A per-sample Hessian of a network of few inputs ends in a ``bmm`` of many tiny products,
``(256, 2, 64) @ (256, 64, 2)``: MKL's batched GEMM spends about 0.14 us per matrix on them
(35 us here, 140 us for 1024 samples; one CPU thread), where the same numbers as a product
and a sum over ``k``, one reduction inductor generates, take a few. Before the graph is
compiled, such a ``bmm`` on a CPU (results of ``m x n <= 64`` entries, ``m, n >= 2``, ``k >=
16``) becomes that product and sum, from a batch of 128 on: for 64 samples the batched GEMM
costs only a few microseconds, and a SIREN's third derivatives (64 products of ``4 x 64 x
2``) ran 5% slower rewritten. Per-sample Hessians under ``vmap`` (256 x 2 -> 64 -> 64 -> 1)
ran 10% faster with ``compile=True``. (Products with ``m`` or ``n`` of 1 inductor already
turns into reductions; ``16 x 16`` results ran slower as reductions.)
Unbatched, each ``mm``/``addmm`` is an external call in inductor's code (a GEMM, views of its
operands, a buffer of its own) that nothing fuses across: about 3 us apiece for the few-row
products of a Hessian of a network of few inputs -- ``(1, 64) @ (64, 64)`` for the primal,
``(8, 64) @ (64, 8)`` for each layer's curvature term -- of which a residual MLP of 8 blocks
has 31. Products of at most 24 rows and 16384 multiply-adds become a product and a sum too:
that residual MLP's compiled graph took 61 us instead of 140, its Hessian 150 us a call
instead of 243, a 6th-order jet 85 instead of 107, an unrolled LSTM's Hessian 239 instead of
291 and a GRU's Jacobian 111 instead of 149 (one thread). More rows or more work ran slower
as reductions: a SIREN's ``(64, 2) @ (2, 64)`` 10%; an LSTM's ``(24, 128) @ (128, 32)`` gave
back most of the gain above. The sums run in another order than the GEMM's: float rounding,
as the contract allows.

NOTE [Inductor's tanh]
On a CPU, inductor's code computes a float32 ``tanh`` at about 1.5 ns an element (25 us for
256 x 64 on one thread, as slow as eager ``torch.tanh``), where its ``exp`` takes 0.3 ns; a
tanh network's derivative graph has one per layer and batch. So before the graph is compiled,
each float32 ``tanh`` on a CPU becomes Cephes' float32 algorithm (``tanhf``) in aten ops, which
inductor fuses with its neighbours: with ``a = |x|``, ``sign(x) (a + a^3 P(a^2))`` (``P`` of
degree 4) where ``a < 0.625``, else ``sign(x) (1 - 2 / (exp(2a) + 1))``. Its relative error
was at most 1.2 float32 epsilons over 45 million values spread across the float32 range
(torch's: 0.5), float32 rounding as the contract allows; +-0, +-inf, NaN and subnormals give
torch's values, and the polynomial's argument is zeroed where its result is not taken, so
nothing there overflows. On a GPU, Triton's ``tanh`` is fast. Per-sample Hessians under
``vmap`` (256 x 2 -> 64 -> 64 -> 1) ran 8 % faster, a Fourier-feature PINN's Laplacian 6 %.
In the graphs compiled for training (forward and backward code, ``_compile_autograd``) the
formula is the forward of a Function whose backward is ``tanh``'s own, ``tanh_backward`` of
the output (``_CephesTanh``): differentiating the formula would give another derivative's
rounding, and ``exp`` overflows beyond ``a = 44`` (``inf / inf`` in its derivative). PINN
training steps with ``loss.backward()`` (2 -> 64 -> 64 -> 1 over 1024 points; medians of
three alternating processes) ran 10 % faster for a Laplacian (2.52 -> 2.26 ms), 6 % for third
derivatives, level for biharmonics, whose steps are dominated by products. A double backward
does not run this code (NOTE [Inductor executor], training).
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from torch._C._functorch import TransformType, get_unwrapped, maybe_get_level
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad
from torch.fx import Graph, GraphModule, Node

from .._capture.cache import outside_compiler
from .._capture.decompositions import tanhf
from .._capture.writes import STEPS, TOUCHES, counted, storage_key, touched
from .._engine.cost import matrix_product_flops
from . import cuda_graph
from .backward import differentiable, split_graphs, vjp_graph
from .kernels import numpy_kernels
from .optimize import for_autograd, power_of_two_scaling, pure_op
from .verify import CompiledCodeDisagrees, disagreement, random_ops, trained_disagreement

_FAILED: Any = object()
# hoisted values are kept alive between calls; beyond this many bytes the node is recomputed
_HOIST_LIMIT_BYTES = 64 * 2**20
#: a main part whose intermediate values take at most this many bytes in all, with at least
#: this many operators per output, runs by the static runtime on a CPU (NOTE [Static runtime])
STATIC_RUNTIME_BYTES = 4 * 2**20
STATIC_RUNTIME_OPS_PER_OUTPUT = 64


class InductorStats:
    """Process-wide counts of inductor compiles and of calls run by compiled code (what the
    tests check to prove which executor ran)."""

    compiles = 0
    failures = 0
    calls = 0
    autograd_calls = 0  # calls whose history autograd records (forward and backward compiled)
    seconds = 0.0  # spent compiling


def call_kind(args: tuple[Any, ...] | list[Any]) -> str:
    """``"plain"``: plain tensors, no transform, mode or compiler active; ``"transformed"``:
    torch.func transforms or functorch-wrapped tensors, nothing else; ``"other"``: modes,
    tracers, compilers (see NOTE [Fast execution])."""
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return "other"
    if torch.compiler.is_compiling():
        return "other"
    kind = "plain" if _peek_interpreter() is None else "transformed"
    for a in args:
        if not isinstance(a, Tensor):
            return "other"
        if _is_wrapped(a):  # (a functorch wrapper's type is Tensor)
            kind = "transformed"
        elif type(a) not in _PLAIN:
            return "other"
    return kind


def plain_call(args: tuple[Any, ...] | list[Any]) -> bool:
    """True when ``args`` are plain tensors and no transform, mode or compiler is active."""
    return call_kind(args) == "plain"


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_peek_interpreter = torch._C._functorch.peek_interpreter_stack
# module parameters and buffers arrive as lifted inputs: they are plain tensors too
_PLAIN = (Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", Tensor))


def _needs_grad(tensors: Any) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class Executable:
    """A simplified graph, callable like its ``GraphModule`` (see NOTE [Fast execution]).

    The last ``n_static`` inputs are *static*: tensors that usually stay the same between calls
    (the caller's weights, lifted from closures and modules or passed as non-differentiated
    arguments), so values computed from them and the graph's constants alone are hoisted into
    the cached prologue.
    """

    def __init__(self, gm: GraphModule, n_static: int = 0, compile: bool = False) -> None:
        self.gm = gm
        self.n_static = n_static
        self.compile = compile  # plain calls run inductor's code (NOTE [Inductor executor])
        self.consts: list[Tensor] = [
            getattr(gm, str(n.target)) for n in gm.graph.nodes
            if n.op == "get_attr" and isinstance(getattr(gm, str(n.target)), Tensor)]
        self._fast: Any = None  # _FastPath once built, _FAILED if it cannot be
        self._full: Any = None  # the whole graph traced (autograd / torch.func calls)
        self._recorded: GraphModule | None = None  # its FX graph (``recorded_graph``)
        # compile=True, calls recorded by autograd: inductor's forward and backward code per
        # layout and requires_grad pattern, or _FAILED (see ``_inductor_autograd``)
        self._trained: dict[Any, Any] = {}
        self.trained_failure: str | None = None  # why inductor could not, for such calls
        self.recording = False  # a backward pass asked for history: record it (NOTE [Recompute])
        # backward graphs by the inputs they differentiate (NOTE [Backward graphs])
        self._backward: dict[Any, tuple[Executable, list[int], list[bool]]] = {}
        self._reaching: dict[tuple[int, ...], list[bool]] = {}  # (``inputs_reaching``)
        # forward graphs that keep their activations and their backward graphs, by the
        # inputs they differentiate, or _FAILED (NOTE [Split graphs])
        self._split: dict[tuple[bool, ...], Any] = {}
        # set on a backward graph: the function it was traced from (differentiable by
        # autograd) and the one that computes it composably under any transform
        self.source: Callable[..., list[Any]] | None = None
        self.composable: Callable[..., list[Any]] | None = None
        out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outs, self._template = _template(out_node.args[0])
        self._outs: list[Any] = outs  # the flat outputs' nodes (or constants)
        # every output is a floating-point or complex tensor (none is non-differentiable)
        self.float_outputs = all(
            isinstance(v := getattr(o, "meta", {}).get("val"), Tensor)
            and (v.is_floating_point() or v.is_complex()) for o in outs)
        self._executor = "fx"

    @property
    def executor(self) -> str:
        """What runs plain calls (the fast path, once built) or else autograd's calls."""
        fast = self._fast
        text = fast.executor if fast is not None and fast is not _FAILED else self._executor
        if any(c is not _FAILED for c in self._trained.values()):
            text += "; calls recorded by autograd: inductor's forward and backward code"
        elif any(c is not _FAILED for c in self._split.values()):
            text += ("; calls recorded by autograd: a forward graph that keeps its activations "
                     "and a backward graph")
        if self.trained_failure is not None:
            text += f"; inductor failed for calls recorded by autograd: {self.trained_failure}"
        return text

    @property
    def has_backward_graphs(self) -> bool:
        """Whether gradients through this graph have run a backward graph (NOTE [Backward
        graphs])."""
        return bool(self._backward)

    @functools.cached_property
    def product_flops(self) -> float:
        """The FLOPs of the graph's matrix products."""
        return matrix_product_flops(self.gm.graph)

    @property
    def code(self) -> str:
        return self.gm.code

    @property
    def compile_seconds(self) -> float | None:
        """How long inductor took to compile this graph, or None if it does not run it."""
        fast = self._fast
        if fast is None or fast is _FAILED or not fast.inductor:
            return None
        return fast.compile_seconds  # type: ignore[no-any-return]

    @property
    def graph(self) -> Graph:
        return self.gm.graph

    def __call__(self, *args: Any) -> Any:
        mode = call_kind(args)
        if self.composable is not None and _differentiating(args):
            # a backward graph is never differentiated through its own operators
            # (NOTE [Backward graphs])
            if mode == "other" or not _grad_levels_only(live=False):
                return _fill(self._template, self.composable(*args))
            return _fill(self._template, _apply_graph_function(self, args))
        if mode == "plain":
            needs_grad = _needs_grad((*args, *self.consts))
            if needs_grad and self.compile and self.recording:
                # a backward pass has run: a training loop (NOTE [Inductor executor], training)
                out = self._inductor_autograd(args)
                if out is not None:
                    return out
            if needs_grad and self.recording and self._splits(args):
                # a training loop on a CPU: the forward keeps what a backward graph needs
                # (NOTE [Split graphs])
                split = self.split(args)
                if split is not _FAILED:
                    return _fill(self._template, _apply_split(self, split, *args))
            if not (needs_grad and self.recording) \
                    and self._fast_path(args, needs_grad) is not _FAILED:
                if not needs_grad:
                    return self._fast(args)
                if backward_graphs(args, replayed=self._fast.why_not_graph is None):
                    # on a GPU the forward and the backward graph are replayed as CUDA graphs
                    # (launch-bound otherwise; NOTE [Backward graphs])
                    return _fill(self._template, _apply_graph_function(self, args))
                # weights require grad: the result must carry autograd history, which is
                # recorded only if a backward pass ever asks for it (NOTE [Recompute])
                return _fill(self._template, _apply_recompute(self, *args))
        if mode == "transformed" and _grad_levels_only() and (
                self.compile or backward_graphs(args) or _keeps_activations(self, args)):
            # one Function at the grad levels: the plain fast path beneath them, and a
            # backward graph (NOTE [Backward graphs]); with compile=True both run inductor's
            # code (NOTE [Inductor executor], training); at the only grad level on a CPU, the
            # forward keeps its activations for the backward (NOTE [Saved activations at a
            # grad level])
            return _fill(self._template, _apply_graph_function(self, args))
        return self.op_by_op(args, mode)

    def _inductor_autograd(self, args: tuple[Any, ...]) -> Any:
        """The outputs, with autograd history, by inductor's forward and backward code for
        this graph, or None where it cannot run (see ``trained_code``)."""
        compiled = self.trained_code(args)
        if compiled is None:
            return None
        InductorStats.autograd_calls += 1
        return _fill(self._template, _apply_trained(self, compiled, *args))

    def trained_code(self, args: tuple[Any, ...]) -> Any:
        """Inductor's forward and backward code for this graph on plain ``args`` whose
        ``requires_grad`` marks the differentiated inputs (``compile_fx`` of such inputs runs
        AOTAutograd: its forward keeps what its backward needs), compiled on first use for the
        call's layout and ``requires_grad`` pattern; None where it cannot run (it failed to
        compile, or a constant of the graph requires grad)."""
        key = tuple((a.requires_grad, a.stride()) for a in args)
        compiled = self._trained.get(key)
        if compiled is None:
            if any(c.requires_grad for c in self.consts) or len(self._trained) >= 4:
                compiled = _FAILED
            else:
                compiled, why = _compile_autograd(self.recorded_graph, args)
                self.trained_failure = why or self.trained_failure
            self._trained[key] = compiled
        return None if compiled is _FAILED else compiled

    def inputs_reaching(self, given: tuple[int, ...]) -> list[bool]:
        """For each input, whether it reaches one of the flat outputs at ``given`` through
        differentiable operators: where autograd of the recorded graph gives a gradient and
        not None (inductor's backward code gives zeros instead)."""
        got = self._reaching.get(given)
        if got is None:
            todo = [self._outs[i] for i in given if isinstance(self._outs[i], Node)]
            seen: set[Node] = set()
            while todo:
                node = todo.pop()
                if node in seen or node.target is torch.ops.aten.detach.default:
                    continue
                seen.add(node)
                todo.extend(node.all_input_nodes)
            got = self._reaching[given] = [
                n in seen for n in self.gm.graph.nodes if n.op == "placeholder"]
        return got

    def composable_call(self, args: tuple[Any, ...]) -> Any:
        """What this graph computes, differentiable by autograd and any torch.func transform:
        its operators one by one, or for a backward graph (whose traced operators are not
        differentiable), ``torch.func.vjp`` of the graph it differentiates (NOTE [Backward
        graphs])."""
        if self.composable is not None:
            return _fill(self._template, self.composable(*args))
        return self.op_by_op(args, call_kind(args))

    def op_by_op(self, args: tuple[Any, ...], mode: str) -> Any:
        """The whole graph run operator by operator, so that autograd and every torch.func
        transform see each operator (TorchScript's interpreter, or FX under modes)."""
        if mode != "other" and self._full_path(args) is not _FAILED:
            with torch.jit.optimized_execution(False):
                return _fill(self._template, self._full(*args))
        return self.recorded_graph(*args)

    @property
    def recorded_graph(self) -> GraphModule:
        """The graph as it runs where autograd or a transform sees every operator
        (:func:`~.optimize.for_autograd`): what TorchScript traces, or runs as FX where it
        cannot."""
        if self._recorded is None:
            self._recorded = for_autograd(self.gm)
        return self._recorded

    def run_plain(self, args: tuple[Any, ...]) -> list[Any]:
        """The flat outputs for plain ``args`` without autograd history: the fast path, or
        the FX graph where there is none."""
        if self._fast_path(args) is not _FAILED:
            return list(self._fast.flat(args))
        return _flatten_like(self.gm(*args), self._template)

    def backward_graph(self, wanted: tuple[int, ...], given: tuple[int, ...]
                       ) -> tuple[Executable, list[int], list[bool]]:
        """The compiled backward graph for the inputs at ``wanted`` and cotangents of the
        outputs at ``given``, the outputs whose cotangents it takes and which of those inputs
        reach them (NOTE [Backward graphs]), built on first use."""
        got = self._backward.get((wanted, given))
        if got is None:
            graph = self.gm.graph
            ins = [n.meta["val"] for n in graph.nodes if n.op == "placeholder"]
            outs = [n.meta.get("val") if isinstance(n, Node) else n for n in self._outs]
            if self.source is not None:
                source = self.source
            else:
                gm, template = self.recorded_graph, self._template

                def source(*a: Tensor) -> list[Any]:
                    return _flatten_like(gm(*a), template)
            traced, cot_at, fn, reached = vjp_graph(source, ins, outs, wanted, given,
                                                    self.n_static)
            back = Executable(traced, self.n_static, self.compile)
            back.source = lambda *a: list(fn(*a))
            back.composable = functools.partial(_composable_vjp, self, wanted, cot_at)
            got = self._backward[wanted, given] = (back, cot_at, reached)
        return got

    def _splits(self, args: tuple[Any, ...]) -> bool:
        """Whether calls on plain ``args`` recorded by autograd run the split graphs (NOTE
        [Split graphs]): the default executor on a CPU, for a graph that is not a backward
        graph."""
        return not self.compile and self.source is None and BACKWARD_GRAPHS != "always" \
            and all(isinstance(a, Tensor) and a.device.type == "cpu" for a in args)

    def split(self, args: tuple[Any, ...]) -> Any:
        """The graphs of NOTE [Split graphs] for the inputs of ``args`` that require grad,
        built on first use, or ``_FAILED`` where they cannot be."""
        key = tuple(a.requires_grad for a in args)
        got = self._split.get(key)
        if got is None:
            graph = self.gm.graph
            ins = [n.meta["val"] for n in graph.nodes if n.op == "placeholder"]
            outs = [n.meta.get("val") if isinstance(n, Node) else n for n in self._outs]
            gm, template = self.recorded_graph, self._template

            def source(*a: Tensor) -> list[Any]:
                return _flatten_like(gm(*a), template)

            wanted = tuple(i for i, r in enumerate(key) if r)
            try:
                fwd, bwd, n_kept, slots = split_graphs(source, ins, outs, wanted, self.n_static)
                got = _SplitGraphs(Executable(fwd, self.n_static), Executable(bwd, self.n_static),
                                   n_kept, wanted, slots)
            except Exception:  # noqa: BLE001 - anything it cannot split is recorded instead
                got = _FAILED
            self._split[key] = got
        return got

    def _fast_path(self, args: tuple[Any, ...], needs_grad: bool = False) -> Any:
        fast = self._fast
        if fast is None:
            # with compile=True, a first call whose result autograd records runs TorchScript:
            # the one compile waits for the next call, which knows whether a backward pass ran
            # (NOTE [Inductor executor], training)
            fast = self._fast = self._build(args, inductor=self.compile and not needs_grad)
        elif self.compile and fast is not _FAILED and fast.inductor is None:
            # a second call without a backward pass in between, or compile=True set after
            # the fast path was built (timed candidates run TorchScript first; see
            # NOTE [Timing close candidates])
            fast.compile_inductor(args)
        return fast

    def _full_path(self, args: tuple[Any, ...]) -> Any:
        if self._full is None:
            self._full = _full_trace(self.recorded_graph, args)
            if self._full is not _FAILED and self._executor == "fx":
                self._executor = "torchscript (autograd)"
        return self._full

    def _build(self, args: tuple[Any, ...], inductor: bool) -> Any:
        try:
            fast = _FastPath(self.gm, self.n_static)
            if not (inductor and fast.compile_inductor(args)):
                fast.trace(args)
        except Exception:  # noqa: BLE001 - anything the fast path cannot do runs as FX
            return _FAILED
        return fast


def _integers(outputs: Any) -> list[Tensor]:
    """The tensors of ``outputs`` that are not differentiable (integer or boolean)."""
    return [t for t in outputs if isinstance(t, Tensor) and not differentiable(t)]


def _integer_outputs(ctx: Any, exe: Executable, outputs: Any) -> None:
    """Marks ``exe``'s integer outputs non-differentiable, as autograd's operators make them."""
    if not exe.float_outputs:
        ctx.mark_non_differentiable(*_integers(outputs))


class _Recompute(torch.autograd.Function):
    """NOTE [Recompute]
    A call whose weights require grad under grad mode must return results with autograd
    history -- torch.func's would have it -- but most such calls (evaluating derivatives of an
    ``nn.Module``, whose parameters require grad by default) never run a backward pass, and
    recording every op of a derivative graph costs 2-4x its run time. So the graph runs on the
    fast path without recording, under one node of this function; its backward recomputes
    the graph with autograd recording (the whole graph by TorchScript, as eager code would
    record it) and differentiates that, ``create_graph`` included for double backward. The
    first backward marks the graph as *recording*: a training loop, which backpropagates every
    step, then records directly from the next call on instead of recomputing."""

    @staticmethod
    def forward(ctx: Any, exe: Executable, *args: Tensor) -> Any:  # type: ignore[override]
        ctx.exe = exe
        ctx.save_for_backward(*args)
        ctx.set_materialize_grads(False)  # an unused output contributes nothing, as in autograd
        flat = exe._fast.flat(args)  # (a Function's forward runs without grad mode)
        _integer_outputs(ctx, exe, flat)
        return tuple(flat)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:  # type: ignore[override]
        exe: Executable = ctx.exe
        exe.recording = True
        return (None, *_recorded_grads(exe, ctx.saved_tensors, grads))


def _recorded_grads(exe: Executable, args: tuple[Tensor, ...], grads: tuple[Tensor, ...]
                    ) -> list[Any]:
    """The gradients of ``args`` (None where not required) for the cotangents ``grads`` of the
    outputs, by the graph recomputed with autograd recording (NOTE [Recompute]); with grad
    mode on (a double backward asks for the graph of these), differentiable."""
    create = torch.is_grad_enabled()
    return _input_grads(_recorded_outputs(exe, args), grads, args, create_graph=create)


def _recorded_outputs(exe: Executable, args: tuple[Tensor, ...]) -> list[Any]:
    """The flat outputs of ``exe`` on plain ``args``, autograd recording every operator as
    eager code would (the whole graph by TorchScript, or FX where it cannot trace)."""
    with torch.enable_grad():
        if exe._full_path(args) is not _FAILED:
            with torch.jit.optimized_execution(False):
                return list(exe._full(*args))
        return _flatten_like(exe.recorded_graph(*args), exe._template)


def _input_grads(outs: list[Any], grads: tuple[Tensor, ...], inputs: Any,
                 **options: bool) -> list[Any]:
    """``torch.autograd.grad`` of ``outs`` with cotangents ``grads`` (None: the output
    contributes nothing) for those ``inputs`` that require grad; None for the others."""
    wanted = [i for i, a in enumerate(inputs) if a.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, grads)
             if g is not None and isinstance(o, Tensor) and o.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                              [g for _, g in pairs], allow_unused=True,
                              **options) if pairs else ()
    result: list[Any] = [None] * len(inputs)
    for i, g in zip(wanted, got):
        result[i] = g
    return result


class _SplitGraphs:
    """The forward graph that keeps its activations, its backward graph, how many values the
    forward keeps, the inputs differentiated, and where each one's gradient is among the
    backward's outputs (None: it reaches no output); see NOTE [Split graphs]."""

    __slots__ = ("forward", "backward", "n_kept", "wanted", "slots")

    def __init__(self, forward: Executable, backward: Executable, n_kept: int,
                 wanted: tuple[int, ...], slots: list[int | None]) -> None:
        self.forward, self.backward, self.n_kept = forward, backward, n_kept
        self.wanted, self.slots = wanted, slots


class _Split(torch.autograd.Function):
    """NOTE [Split graphs]
    A training loop on a CPU (a call recorded by autograd once a backward pass has run, NOTE
    [Recompute]; or a call at the only grad level, NOTE [Saved activations at a grad level])
    used to run the graph operator by operator with autograd recording each one, and
    autograd's backward node by node. Instead the graph is traced once with its
    vector-Jacobian product (``torch.autograd.grad`` of the recorded graph, NOTE [Tracer]),
    simplified as one graph and split in two (``backward.split_graphs``): what reads a
    cotangent is the *backward graph*, what reads an input is the *forward graph*, which
    returns the outputs and the values the backward graph reads, and what reads neither (the
    weights' transposes and products) is computed by either graph that needs it, hoisted and
    cached by its prologue. AOTAutograd's partition does the same for inductor; here both
    graphs run on the plain fast path (NOTE [Fast execution]), under one node of this
    Function: no per-operator recording, no autograd node per operator, and the
    simplification sees the forward and backward operators together. Measured on the PINN
    steps of ``asv_bench/training_table.py`` (one thread, recorded and split interleaved in
    one process, medians; ``loss.backward()`` / ``torch.func.grad``): third derivatives of
    2 -> 64 -> 64 -> 1 over 1024 points 11.4 -> 8.9 / 12.2 -> 11.4 ms, biharmonics 22.6 ->
    19.1 / 18.7 -> 17.9 ms (2 -> 64 -> 64 -> 1) and 35.9 -> 31.2 / 35.1 -> 32.3 ms (4 -> 128
    -> 128 -> 1), Laplacians 3.56 -> 3.41 / 4.93 -> 4.39 ms (2 -> 64 -> 64 -> 1) and 83.7 ->
    80.9 / 95.0 -> 85.0 ms (8 -> 128 -> 128 -> 1 over 4096 points); the Laplacian of 16 ->
    256 -> 256 -> 1, whose matrix products are most of its time, is level (26.7 / 28.3 ms).

    The backward takes a cotangent for every differentiable output: one that got none is
    zeros, and the gradients of inputs that reach none of the outputs that got one are None,
    as autograd's (``Executable.inputs_reaching``). The inputs are saved for backward, so an
    input written in place in between (a weight, by an optimiser step) raises autograd's
    error, as eager code would, instead of mixing old activations with new values. A double
    backward (``create_graph=True``) and a backward under a torch.func transform instead
    differentiate the graph recomputed with autograd recording, as ``_Recompute`` does: the
    backward graph's traced operators are not differentiable (NOTE [Backward graphs])."""

    @staticmethod
    def forward(ctx: Any, exe: Executable, split: _SplitGraphs,  # type: ignore[override]
                *args: Tensor) -> Any:
        ctx.exe, ctx.split, ctx.n_args = exe, split, len(args)
        ctx.set_materialize_grads(False)  # an unused output contributes nothing, as in autograd
        flat = split.forward.run_plain(args)
        n = len(flat) - split.n_kept
        result = tuple(flat[:n])
        # saved, not held by ``ctx``: a kept value may be an output, whose node holds ``ctx``
        ctx.save_for_backward(*args, *flat[n:])
        # the zeros standing for an unused differentiable output's cotangent
        ctx.zeros = [dict(size=t.shape, dtype=t.dtype, device=t.device)
                     if differentiable(t) else None for t in result]
        _integer_outputs(ctx, exe, result)
        return result

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:  # type: ignore[override]
        # a backward pass in a function torch.compile compiles runs eagerly: never traced
        return outside_compiler(_split_backward, ctx, grads)


def _split_backward(ctx: Any, grads: tuple[Tensor, ...]) -> tuple[Any, ...]:
    """``_Split.backward``."""
    saved = ctx.saved_tensors
    args, kept = saved[:ctx.n_args], saved[ctx.n_args:]
    exe: Executable = ctx.exe
    if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active() or any(
            g is not None and _is_wrapped(g) for g in grads):
        return (None, None, *_recorded_grads(exe, args, grads))
    split: _SplitGraphs = ctx.split
    cots = [g.contiguous() if g is not None else torch.zeros(**z)
            for g, z in zip(grads, ctx.zeros) if z is not None]
    n_dyn = len(args) - exe.n_static
    got = split.backward.run_plain((*args[:n_dyn], *kept, *cots, *args[n_dyn:]))
    SplitStats.calls += 1
    reached = exe.inputs_reaching(tuple(i for i, g in enumerate(grads) if g is not None))
    result: list[Any] = [None] * len(args)
    for i, slot in zip(split.wanted, split.slots):
        if slot is not None and reached[i]:
            result[i] = got[slot]
    return (None, None, *result)


class SplitStats:
    """Process-wide count of backward passes run by a split backward graph (NOTE [Split
    graphs]): what the tests check to prove that path ran."""

    calls = 0


class _Trained(torch.autograd.Function):
    """NOTE [Inductor executor], training: ``compile=True`` calls recorded by autograd, once a
    backward pass has run (a training loop: the first such call runs TorchScript under
    ``_Recompute``, and a second call without a backward in between compiles the no-grad code
    instead -- an evaluation loop), run inductor's forward code, which keeps what its backward
    code needs, on a private graph under one node of this function; a backward runs
    inductor's backward code. A double backward
    (``create_graph=True``) instead differentiates the graph recomputed with autograd
    recording, as ``_Recompute`` does: inductor's backward code is not differentiable."""

    @staticmethod
    def forward(ctx: Any, exe: Executable, compiled: Any,  # type: ignore[override]
                *args: Tensor) -> Any:
        ctx.exe = exe
        ctx.save_for_backward(*args)
        ctx.set_materialize_grads(False)  # an unused output contributes nothing, as in autograd
        with torch.enable_grad():
            inner = [a.detach().requires_grad_() if a.requires_grad else a for a in args]
            outs = list(compiled(*inner))
        ctx.inner, ctx.outs = inner, outs
        result = tuple(o.detach() for o in outs)
        _integer_outputs(ctx, exe, result)
        return result

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:  # type: ignore[override]
        # unpacked first: an argument written in place since the forward (a weight, by an
        # optimiser step) raises autograd's error, as eager code would, where inductor's
        # backward code would mix the old activations with the new values
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (None, None, *_recorded_grads(ctx.exe, saved, grads))
        # retain_graph: a caller's backward(retain_graph=True) may run this backward again;
        # inductor compiles the backward code on its first run, with xafunc's settings
        with _inductor_settings():
            got = _input_grads(ctx.outs, grads, ctx.inner, retain_graph=True)
        reached = ctx.exe.inputs_reaching(tuple(i for i, g in enumerate(grads) if g is not None))
        return (None, None, *[g if r else None for g, r in zip(got, reached, strict=True)])


# ``_Recompute.apply`` without ``Function.apply``'s Python prelude, which only matters under
# torch.func transforms (never active on the plain path that applies it): a few us a call
_apply_recompute = super(torch.autograd.Function, _Recompute).apply
_apply_trained = super(torch.autograd.Function, _Trained).apply
_apply_split = super(torch.autograd.Function, _Split).apply


class BackwardStats:
    """Process-wide count of backward graphs run (what the tests check to prove the path
    of NOTE [Backward graphs] ran)."""

    calls = 0


class _GraphFunction(torch.autograd.Function):
    """A compiled graph applied as one operation where it is differentiated (autograd, or
    torch.func's grad levels): its forward on the plain tensors beneath every level, its
    backward by the backward graph (NOTE [Backward graphs])."""

    @staticmethod
    def forward(exe: Executable, *args: Tensor) -> Any:  # type: ignore[override]
        return tuple(exe.run_plain(args))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.exe = inputs[0]
        ctx.save_for_backward(*inputs[1:])
        ctx.set_materialize_grads(False)  # an unused output contributes nothing, as in autograd
        ctx.mark_non_differentiable(*_integers(output))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:  # type: ignore[override]
        return (None, *_backward_by_graph(ctx, ctx.needs_input_grad[1:], grads))


def _backward_by_graph(ctx: Any, needs: tuple[bool, ...], grads: tuple[Tensor, ...],
                       values: list[Any] | None = None) -> list[Any]:
    """The gradients of a graph Function's tensor inputs (``needs``: which want one) by the
    backward graph (NOTE [Backward graphs]). At a grad level, ``values`` (plain tensors) are
    those gradients computed already: the backward graph is then applied as
    a Function that returns them, differentiable at the level as it would be, without
    computing them again (NOTE [Saved activations at a grad level])."""
    exe: Executable = ctx.exe
    # a pullback run after its transform exited holds wrappers of a dead level: their values
    args = tuple(map(_alive, ctx.saved_tensors))
    wanted = tuple(i for i, need in enumerate(needs) if need)
    given = tuple(i for i, g in enumerate(grads) if g is not None)
    result: list[Any] = [None] * len(args)
    if wanted and given:
        # (built, on first use, outside a torch.compile'd caller's frames, as transforms are)
        back, cot_at, reached = outside_compiler(exe.backward_graph, wanted, given)
        n_dyn = len(args) - exe.n_static
        back_args = (*args[:n_dyn], *(grads[i] for i in cot_at), *args[n_dyn:])
        if values is None:
            BackwardStats.calls += 1
            got = back(*back_args)
        else:
            known = _Saved()
            known.values = tuple(values[i] for i in wanted)
            with enable_single_level_autograd_function():
                got = _LevelGraphFunction.apply(  # type: ignore[attr-defined]
                    back, ctx.level, known, *back_args)
        for i, g, r in zip(wanted, got, reached):
            result[i] = g if r else None
    return result


def _alive(t: Tensor) -> Tensor:
    """``t`` without the wrappers of torch.func levels that have exited."""
    while maybe_get_level(t) == -2:  # functorch's mark of a dead wrapper
        t = get_unwrapped(t)
    return t


try:  # functorch's single-level machinery (torch/_functorch/autograd_function.py)
    from torch._C._functorch import _unwrap_for_grad, _wrap_for_grad
    from torch._functorch.autograd_function import enable_single_level_autograd_function
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
    from torch.autograd.forward_ad import _set_fwd_grad_enabled
    from torch.autograd.function import _SingleLevelFunction
    _SINGLE_LEVEL = True
except ImportError:  # pragma: no cover - older or newer torch: the generic path
    _SINGLE_LEVEL = False


def _apply_graph_function(exe: Executable, args: tuple[Any, ...]) -> Any:
    """``_GraphFunction.apply(exe, *args)``; at a grad level of torch.func
    :class:`_LevelGraphFunction` instead (NOTE [Grad levels without a generated Function]),
    and beneath the last one, where no input needs a gradient, the plain graph."""
    if torch._C._are_functorch_transforms_active():
        interpreter = retrieve_current_functorch_interpreter() if _SINGLE_LEVEL else None
        if interpreter is not None and interpreter.key() == TransformType.Grad:
            with enable_single_level_autograd_function():
                return _LevelGraphFunction.apply(  # type: ignore[attr-defined]
                    exe, interpreter.level(), _Saved(), *args)
    elif not _needs_grad(args):  # beneath the last level, nothing to record
        return tuple(exe.run_plain(args))
    return _GraphFunction.apply(exe, *args)


# NOTE [Grad levels without a generated Function]
# An ``autograd.Function`` applied under ``torch.func.grad`` goes through functorch's
# ``custom_function_call``, which generates a new Function class per call and level and maps
# pytrees and binds signatures around it: about 300 us a call on this CPU, against 60 us for
# one operator (a (1024, 64) product under ``grad``: 432 us as a Function, 139 us plain). The
# graph's Function at a grad level is what that machinery generates, written once
# (``generate_single_level_function``): applied to the level's tensors, its forward unwraps
# them, runs beneath the level (the next grad level the same way, or autograd), and wraps the
# outputs; ``setup_context`` and ``backward`` are :class:`_GraphFunction`'s, on the level's
# tensors. A step of ``torch.func.grad`` over a Laplacian residual with ``compile=True``
# (2 -> 64 -> 64 -> 1, 1024 points) takes 15% less time.

# NOTE [Saved activations at a grad level]
# With ``compile=True`` on a CPU, the graph's Function at the only grad level
# (``torch.func.grad`` or ``vjp`` of a training loss, no transform outside it) runs
# inductor's forward and backward code for the graph (``Executable.trained_code``, what
# ``loss.backward()``'s calls run: AOTAutograd's forward keeps the values its backward needs)
# on the plain tensors beneath the level, those the level differentiates marked as
# requiring grad; its backward runs the backward code on what the forward kept, through a
# nested ``torch.autograd.grad``. The backward graph (NOTE [Backward graphs]) would first
# recompute the forward values, matrix products included. That costs more than AOTAutograd's
# runtime wrappers and the nested backward pass (about 0.2 ms a step here) except for graphs
# with few product FLOPs, which keep the backward graph (``_SAVED_MIN_FLOPS``). Measured,
# ``torch.func.grad`` PINN steps (one thread, medians of three alternating processes):
#
# * biharmonic, 4 -> 128 -> 128 -> 1 over 256 points (4.2e8 product FLOPs): 26.7 -> 21.2 ms;
# * Laplacian, 16 -> 256 -> 256 -> 1 over 256 points (6.1e8): 31.3 -> 26.7 ms;
# * Laplacian, 8 -> 128 -> 128 -> 1 over 4096 points (1.4e9): 94.5 -> 78.2 ms;
# * Laplacian, 2 -> 64 -> 64 -> 1 over 1024 points (3.4e7): 3.06 -> 2.65 ms (measured with
#   NOTE [Inductor's tanh]'s training code; without it, the forward code's slow ``tanh``
#   made this case level and third derivatives of that network, 5.3e7, 10 % slower; with
#   it they are level);
# * Laplacians of 2 -> 32 -> 32 -> 1 over 128 points (1.1e6) and 2 -> 64 -> 64 -> 1 over
#   256 points (8.5e6): 0.94 -> 1.1 ms and 1.4 -> 1.45-2.2 ms, slower: below the bound.
#
# The default executor (no ``compile``) does the same with its split graphs on those plain
# tensors (NOTE [Split graphs], as ``loss.backward()``'s calls in a training loop run; the
# graph recorded by autograd operator by operator where it cannot be split), its backward by
# a nested ``torch.autograd.grad``, for every graph at the only grad level on a CPU
# (``_keeps_activations``). Before that, the graph was recorded at the level, each operator
# through functorch's wrappers, and functorch's backward accumulated the
# gradients of tensors read twice out of place (a biharmonic step: 55 ``add`` of 210 us
# each, where ``loss.backward()`` runs 19 ``add`` of 107 us and 36 ``add_`` of 31 us).
# Measured ``torch.func.grad`` steps, alternating processes (one thread): biharmonic
# 4 -> 128 -> 128 -> 1 over 256 points 47-53 -> 39 ms, 2 -> 64 -> 64 -> 1 25-31 -> 20-22 ms,
# third derivatives of 2 -> 64 -> 64 -> 1 over 1024 points 11.4-12.7 -> 9.8-10.2 ms;
# interleaved in one process, Laplacians and third derivatives of wider networks 3-8 %
# faster (these measured recording the graph beneath the level, before the split graphs,
# which took another 0-13 % off). ``jacrev`` over the parameters (its backward runs the
# backward graph under ``vmap``): 21 % faster over 128 points, 4 % slower over 16.
#
# A backward under another transform (``jacrev``'s ``vmap`` over the cotangents, ``grad`` of
# ``grad``, a pullback differentiated by a later ``grad``) and a GPU (not measured) run the
# backward graph. A backward at the live level (``torch.func.grad`` computing its result, or
# a user's ``autograd.grad(..., create_graph=True)`` inside it, which differentiates the
# gradients again at the same level) returns the gradients through the backward graph's
# Function with its forward's results given (``_Saved.values``): differentiable as the
# backward graph's are, with nothing recomputed unless they are differentiated (the extra
# Function costs about 0.2 ms a step, within the noise of the steps measured above, and the
# backward graph is traced, not compiled, on the first step).

#: the matrix products of a graph worth keeping its activations for (NOTE [Saved activations at
#: a grad level]): recomputing the forward's share of 2e7 FLOPs, and the values around them,
#: takes about what AOTAutograd's runtime and a nested backward pass cost a step (0.2 ms on
#: one CPU core)
_SAVED_MIN_FLOPS = 2e7


class _Saved:
    """What the forward of :class:`_LevelGraphFunction` kept for its backward: the plain
    inputs, those it differentiates marked ``requires_grad``, the outputs with their autograd
    history (inductor's code's, or the recorded graph's), and one of the level's tensors; or
    nothing (``inputs is None``: the backward graph runs). ``values``, set before the
    forward, are its results."""

    __slots__ = ("inputs", "outputs", "probe", "values")

    def __init__(self) -> None:
        self.inputs: list[Any] | None = None
        self.outputs: list[Tensor] = []
        self.probe: Tensor | None = None  # a tensor of the level: alive while the level is
        # given, the forward's plain results, computed already (``_backward_by_graph``)
        self.values: tuple[Tensor, ...] | None = None


def _saved_forward(exe: Executable, args: tuple[Any, ...], inner: tuple[Any, ...],
                   saved: _Saved) -> tuple[Tensor, ...] | None:
    """The outputs of ``exe`` on ``inner`` (``args`` unwrapped from the only grad level, which
    differentiates those of ``args`` that require grad) by inductor's training code with
    ``compile=True``, else by the graph recorded by autograd operator by operator, their
    history kept in ``saved`` (NOTE [Saved activations at a grad level]); None where it does
    not apply: off a CPU, on a backward graph (whose traced operators are not
    differentiable: NOTE [Backward graphs]), under another transform, where autograd
    records the plain tensors too, or with ``compile=True`` on a graph of few products."""
    if exe.source is not None or torch._C._are_functorch_transforms_active() \
            or not all(isinstance(a, Tensor) and a.device.type == "cpu" for a in inner) \
            or _needs_grad(inner) or (exe.compile and exe.product_flops < _SAVED_MIN_FLOPS) \
            or (not exe.compile and BACKWARD_GRAPHS == "always"):
        return None
    with torch.enable_grad():
        marked = tuple(a.detach().requires_grad_() if b.requires_grad else a
                       for a, b in zip(inner, args))
        if not any(a.requires_grad for a in marked):
            return None
        if exe.compile:
            compiled = exe.trained_code(marked)
            if compiled is None:
                return None
            saved.outputs = list(compiled(*marked))
            InductorStats.autograd_calls += 1
        elif exe._splits(marked) and (split := exe.split(marked)) is not _FAILED:
            saved.outputs = list(_apply_split(exe, split, *marked))  # NOTE [Split graphs]
        else:
            saved.outputs = _recorded_outputs(exe, marked)
    saved.inputs = list(marked)
    saved.probe = next(b for b in args if b.requires_grad)
    SavedStats.calls += 1
    return tuple(o.detach() for o in saved.outputs)


class SavedStats:
    """Process-wide count of forwards at a grad level that kept their activations for the
    backward (NOTE [Saved activations at a grad level]), either executor: what the tests
    check to prove that path ran."""

    calls = 0


def _keeps_activations(exe: Executable, args: tuple[Any, ...]) -> bool:
    """Whether a call of the default executor's graph at torch.func's levels applies it as
    one Function at the level that keeps its activations (NOTE [Saved activations at a grad
    level]): there is one level (``_grad_levels_only`` checks it is a grad level), the
    graph is not a backward graph, its tensors are on a CPU, and autograd records none of
    those the level does not wrap (weights that require grad, under ``grad`` over the
    inputs: recorded at the level as before)."""
    return _SINGLE_LEVEL and exe.source is None \
        and len(retrieve_all_functorch_interpreters()) == 1 \
        and all(isinstance(a, Tensor) and a.device.type == "cpu" for a in args) \
        and not _needs_grad([a for a in args if not _is_wrapped(a)])


def _saved_backward(ctx: Any, needs: tuple[bool, ...], grads: tuple[Tensor, ...]
                    ) -> list[Any] | None:
    """The gradients of a :class:`_LevelGraphFunction`'s inputs (``needs``: which want one)
    by the backward code on what its forward kept (NOTE [Saved activations at a grad level]),
    or None where the backward graph must run: the forward kept nothing, or another transform
    is active."""
    saved: _Saved = ctx.saved
    if saved.inputs is None or not all(
            a.requires_grad for a, need in zip(saved.inputs, needs) if need):
        return None
    levels = retrieve_all_functorch_interpreters()
    # at the level (``grad``), or after it has exited (``vjp``'s pullback; its number may be
    # reused by a later transform), and no other transform
    alive = saved.probe is not None and maybe_get_level(saved.probe) == ctx.level
    if len(levels) != (1 if alive else 0):
        return None
    plain = tuple(None if g is None else _unwrap_for_grad(g, ctx.level) for g in grads)
    with contextlib.ExitStack() as stack:
        if alive:
            stack.enter_context(levels[0].lower())
        stack.enter_context(torch.enable_grad())
        # retain_graph: a caller may run this backward again
        got = _input_grads(saved.outputs, plain, saved.inputs, retain_graph=True)
        got = [torch.zeros_like(a) if g is None and need else g
               for g, a, need in zip(got, saved.inputs, needs)]
    if not alive:
        return [g if need else None for g, need in zip(got, needs)]
    # the level may differentiate them again (``autograd.grad(..., create_graph=True)``
    # inside ``grad``): the backward graph's Function returns them, differentiable
    return _backward_by_graph(ctx, needs, grads, got)


if _SINGLE_LEVEL:
    class _LevelGraphFunction(_SingleLevelFunction):
        @staticmethod
        def forward(exe: Executable, level: int, saved: _Saved,  # type: ignore[override]
                    *args: Tensor) -> Any:
            interpreter = retrieve_current_functorch_interpreter()
            inner = tuple(_unwrap_for_grad(a, level) if isinstance(a, Tensor) else a
                          for a in args)
            with torch.enable_grad(), _set_fwd_grad_enabled(True), interpreter.lower():
                out = saved.values
                if out is None:
                    out = _saved_forward(exe, args, inner, saved)
                if out is None:
                    out = _apply_graph_function(exe, inner)
            return tuple(_wrap_for_grad(o, level) if isinstance(o, Tensor) else o for o in out)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            ctx.level, ctx.saved = inputs[1], inputs[2]
            _GraphFunction.setup_context(ctx, (inputs[0], *inputs[3:]), output)

        @staticmethod
        def backward(ctx: Any, *grads: Tensor) -> Any:  # type: ignore[override]
            needs = ctx.needs_input_grad[3:]
            got = _saved_backward(ctx, needs, grads)
            if got is None:
                got = _backward_by_graph(ctx, needs, grads)
            return (None, None, None, *got)


def _composable_vjp(exe: Executable, wanted: tuple[int, ...], cot_at: list[int],
                    *a: Tensor) -> list[Any]:
    """What ``exe``'s backward graph for ``wanted`` computes, by ``torch.func.vjp`` of
    ``exe`` itself: differentiable by any transform around it (NOTE [Backward graphs])."""
    n_cot = len(cot_at)
    n_dyn = len(a) - exe.n_static - n_cot
    args, cots = [*a[:n_dyn], *a[n_dyn + n_cot:]], a[n_dyn:n_dyn + n_cot]

    def outputs(*w: Tensor) -> tuple[Any, ...]:
        full = list(args)
        for i, t in zip(wanted, w):
            full[i] = t
        flat = _flatten_like(exe.composable_call(tuple(full)), exe._template)
        return tuple(flat[i] for i in cot_at)

    pull = torch.func.vjp(outputs, *[args[i] for i in wanted])[1]
    return list(pull(tuple(cots)))


def _differentiating(args: tuple[Any, ...]) -> bool:
    """True when autograd records the call or a torch.func transform that differentiates
    (``grad``, ``vjp``, ``jvp`` and the ``jac*`` built on them) is active."""
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return True
    return any(lv.key() in (TransformType.Grad, TransformType.Jvp)
               for lv in retrieve_all_functorch_interpreters())


#: where a compiled graph differentiated by autograd or at torch.func's grad levels runs as one
#: Function with a backward graph (NOTE [Backward graphs]): ``"cuda"``, on a GPU with CUDA-graph
#: replay on (both graphs replayed; on a CPU the forward recorded operator by operator is faster,
#: the backward graph recomputing the forward values it needs), or ``"always"`` (the tests)
BACKWARD_GRAPHS = "cuda"


def backward_graphs(args: Any, replayed: bool = True) -> bool:
    """Whether a graph differentiated on ``args`` (plain or functorch-wrapped tensors) runs
    with a backward graph (see :data:`BACKWARD_GRAPHS`); ``replayed``: its forward can be
    replayed as a CUDA graph."""
    if BACKWARD_GRAPHS == "always":
        return True
    return replayed and cuda_graph.ENABLED and bool(args) and all(
        isinstance(a, Tensor) and a.is_cuda for a in args)


def _grad_levels_only(live: bool = True) -> bool:
    """True when every torch.func transform active is a grad level (``grad``, ``vjp``,
    ``jacrev``'s forward), and (``live``) there is one."""
    levels = retrieve_all_functorch_interpreters()
    return (bool(levels) or not live) and all(lv.key() == TransformType.Grad for lv in levels)


def _inductor_settings(**more: Any) -> Any:
    """Inductor's configuration for xafunc's graphs (NOTE [Inductor executor]): casts to a
    lower precision round as the eager kernels do, and C++ kernels run on one thread."""
    from torch._inductor import config

    return config.patch({"emulate_precision_casts": True, "cpp.threads": 1, **more})


def _reason(e: Exception) -> str:
    """Why inductor could not be used, in one line of at most 160 characters."""
    reason = " ".join(f"{type(e).__name__}: {e}".split())
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _compile_autograd(gm: GraphModule, args: tuple[Any, ...]) -> tuple[Any, str | None]:
    """``gm`` (a graph as autograd records it, ``Executable.recorded_graph``) compiled by
    inductor for calls whose history autograd records (flat outputs; see
    ``Executable._inductor_autograd``), checked against the graph run eagerly (NOTE [Checked
    compiles]), and None; or ``_FAILED`` and why."""
    try:
        from torch._inductor.compile_fx import compile_fx

        graph = _copy(gm.graph)
        out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
        flat = _template(out_node.args[0])[0]
        if not all(isinstance(n, Node) for n in flat):
            return _FAILED, "an output of the graph is not a tensor"
        out_node.args = (tuple(flat),)
        eager = GraphModule(gm, _copy(graph))  # what the check runs (NOTE [Checked compiles])
        tanh_for_inductor(graph, training=True)
        coefficients_for_inductor(graph)
        start = time.perf_counter()
        # no donated buffers: a backward with retain_graph=True may run twice (the backward
        # code is compiled at its first call, under the same settings: ``_Trained.backward``)
        with warnings.catch_warnings(), torch._functorch.config.patch(donated_buffer=False), \
                _inductor_settings():
            warnings.simplefilter("ignore")
            # detached stand-ins (requiring grad as the arguments do): what inductor keeps of
            # its example inputs must not hold the caller's tensors, which
            # ``torch.utils.swap_tensors`` then refuses to swap
            compiled = compile_fx(GraphModule(gm, graph), [
                a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a
                for a in args])
            if not random_ops(gm.graph):  # NOTE [Checked compiles]
                why = trained_disagreement(cast(Callable[..., Any], compiled), eager, args)
                if why is not None:
                    raise CompiledCodeDisagrees(why)
    except Exception as e:  # noqa: BLE001 - inductor is an accelerator, not a requirement
        InductorStats.failures += 1
        return _FAILED, _reason(e)
    InductorStats.compiles += 1
    InductorStats.seconds += time.perf_counter() - start
    return compiled, None


def outside_transforms(make: Callable[[], Any]) -> Any:
    """``make()`` run with no torch.func transform active and inference mode off, so that the
    constants it makes for a trace, and the process-wide caches they come from (seeds,
    interpolation matrices), are plain tensors: under a grad level even a factory's result is
    wrapped at that level, and under ``torch.inference_mode`` it is an inference tensor, which
    autograd refuses to save; either outlives the call in a cache and breaks later calls
    (a third derivative evaluated under inference mode made every later one on as many inputs
    fail its backward)."""
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    with temporarily_clear_interpreter_stack(), torch.inference_mode(False):
        return make()


def _full_trace(gm: GraphModule, args: tuple[Any, ...]) -> Any:
    """The whole graph traced by TorchScript on plain stand-ins of ``args`` (see NOTE [Fast
    execution]), or ``_FAILED``. It is traced outside the torch.func transforms of the call
    that builds it: under a grad level even a factory's result (a stand-in, a scalar operand)
    is wrapped at that level, and a trace of wrapped stand-ins records no dependence on them
    (its gradients are zero)."""
    return outside_transforms(lambda: _trace_plain(gm, args))


def _trace_plain(gm: GraphModule, args: tuple[Any, ...]) -> Any:
    examples = tuple(torch.zeros(tuple(a.shape), dtype=a.dtype, device=a.device)
                     if isinstance(a, Tensor) else a for a in args)
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat, template = _template(out_node.args[0])
    if not all(isinstance(a, Node) for a in flat):
        return _FAILED
    graph = _copy(gm.graph)
    scalars = scalar_inputs(graph)  # NOTE [Scalar operands]
    full = GraphModule(gm, graph)

    def run(*a: Tensor) -> Any:
        out = full(*a)
        return tuple(_flatten_like(out, template))

    try:
        with warnings.catch_warnings(), torch.no_grad(), torch.jit.optimized_execution(False):
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(run, (*examples, *scalars), check_trace=False)
    except Exception:  # noqa: BLE001 - TorchScript is an accelerator, not a requirement
        return _FAILED
    if not scalars:
        return traced
    return lambda *a: traced(*a, *scalars)


def _flatten_like(out: Any, template: Any) -> list[Any]:
    if isinstance(template, int):
        return [out]
    return [leaf for o, t in zip(out, template) for leaf in _flatten_like(o, t)]


class _FastPath:
    """The graph split into a cached prologue (static inputs and constants only) and a traced
    main part."""

    def __init__(self, gm: GraphModule, n_static: int) -> None:
        graph = _copy(gm.graph)  # rewritten below; the recorded graph serves the other paths
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.n_dynamic = len(placeholders) - n_static
        static_inputs = placeholders[self.n_dynamic:]
        static: set[Node] = set(static_inputs)
        for node in graph.nodes:
            if node.op == "get_attr":
                static.add(node)
            elif (node.op == "call_function" and pure_op(node.target)
                  and all(a in static for a in node.all_input_nodes)
                  and _small(node)):
                static.add(node)
        _scale_static_factors(graph, static)
        _column_major_thin_weights(graph, static)
        out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
        # values the main part needs from the static part (static inputs it reads directly
        # are passed as they are)
        hoisted = [n for n in graph.nodes if n in static and n.op != "placeholder" and any(
            u not in static for u in n.users)]
        if not all(isinstance(n.meta.get("val"), Tensor) or n.op == "get_attr"
                   for n in hoisted):
            raise TypeError("a value the main part needs from the prologue is not a tensor")
        const_nodes = [n for n in graph.nodes if n.op == "get_attr"]

        # prologue: static inputs, constants -> hoisted values
        pro = Graph()
        env: dict[Node, Node] = {}
        for n in static_inputs:
            env[n] = pro.placeholder(n.name)
        for n in const_nodes:
            env[n] = pro.placeholder(f"c{len(env)}")
        for n in graph.nodes:
            if n in static and n.op not in ("get_attr", "placeholder"):
                env[n] = pro.node_copy(n, lambda a: env[a])
        _row_major_batched_weights(pro, env, hoisted)
        pro.output(tuple(env[n] for n in hoisted))
        pro.eliminate_dead_code()
        self.prologue = GraphModule(gm, pro)
        self.consts = [getattr(gm, str(n.target)) for n in const_nodes]

        # main: arguments + hoisted values -> flat outputs (static outputs are copied, so the
        # caller never receives a cached tensor)
        main = Graph()
        env2: dict[Node, Node] = {}
        for n in placeholders:
            env2[n] = main.node_copy(n)
        for i, n in enumerate(hoisted):
            env2[n] = main.placeholder(f"hoisted{i}")
        for n in graph.nodes:
            if n.op == "call_function" and n not in static:
                env2[n] = main.node_copy(n, lambda a: env2[a])
        flat, self.out_template = _template(out_node.args[0])
        self.n_outputs = len(flat)
        outs = []
        for a in flat:
            if not isinstance(a, Node):
                raise TypeError("non-tensor output")
            v = env2[a]
            if a in static:
                v = main.call_function(torch.ops.aten.clone.default, (v,))
            outs.append(v)
        main.output(tuple(outs))
        self.functional = GraphModule(gm, main)  # inductor's input (no in-place rewrites)
        rewritten = _copy(main)
        reuse_buffers(rewritten)
        self.numpy_ops = numpy_kernels(rewritten)  # NOTE [NumPy kernels]
        # trailing inputs of ``main`` (NOTE [Scalar operands]); inductor's graph has none
        self.scalars = scalar_inputs(rewritten)
        self.main: Callable[..., Any] = GraphModule(gm, rewritten)
        # NOTE [Below autograd]: whether the main part may run beneath the autograd keys
        self.below_autograd = not _may_alias_outputs(rewritten)
        # NOTE [CUDA graphs]: why the main part cannot be replayed (None: it can be, once it
        # has run ``WARM_UP`` times), or the captured graph
        self.why_not_graph = cuda_graph.why_not(rewritten)
        self.cuda_graph: cuda_graph.CudaGraph | None = None
        self._calls = 0
        self.base = "fx"  # or "torchscript": what runs the main part without inductor
        # NOTE [Static runtime]: the main part run by PyTorch's static runtime, or None
        self.static: Callable[..., Any] | None = None
        self._ops, self._bytes = _size(rewritten)
        self.failure: str | None = None  # why inductor could not compile, if it could not
        # None: not tried; False: failed (the reason in ``executor``); else the compiled code
        self.inductor: Any = None
        self.compile_seconds: float | None = None
        self._strides: list[tuple[int, ...]] = []
        self._cache: tuple[list[Any] | None, list[Tensor]] | None = None

    def hoisted(self, args: tuple[Any, ...]) -> list[Tensor]:
        inputs = [*args[self.n_dynamic:], *self.consts]
        cache = self._cache
        if cache is not None and _unchanged(cache[0], inputs):
            return cache[1]
        with torch.no_grad():
            # views detached: a view holds its base tensor, which ``torch.utils.swap_tensors``
            # (``nn.Module.to`` under ``set_swap_module_params_on_conversion``) then refuses
            # to swap; the storage is shared all the same
            values = [v.detach() if v._is_view() else v for v in self.prologue(*inputs)]
        device = next((a.device for a in args[:self.n_dynamic]
                       if isinstance(a, Tensor) and a.device.type != "cpu"), None)
        if device is not None:
            # constants that tracing left on the CPU (autograd saves the Python number of
            # ``x * 0.5`` as a CPU 0-dim tensor, which a traced backward then reads) move to
            # the graph's device: the same value and type promotion, and every input of the
            # main part on one device, as a CUDA graph's capture needs (NOTE [CUDA graphs])
            values = [v.to(device) if v.dim() == 0 and v.device.type == "cpu"
                      and v.is_floating_point() else v for v in values]
        self._cache = (_stamps(inputs), values)
        return values

    def trace(self, args: tuple[Any, ...]) -> None:
        """Trace the main part with TorchScript; keep the FX main part if that fails."""
        inputs = (*args, *self.hoisted(args), *self.scalars)
        main = self.main

        def run(*a: Tensor) -> Any:
            return main(*a)

        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                if isinstance(main, GraphModule):
                    transpose_thin_products(main, inputs)
                # a traced function, not module: a third less overhead per call
                traced = torch.jit.trace(run, inputs, check_trace=False)
        except Exception:  # noqa: BLE001 - TorchScript is an accelerator, not a requirement
            return
        self.main, self.base = traced, "torchscript"
        if self.below_autograd and self._bytes <= STATIC_RUNTIME_BYTES and \
                self._ops >= STATIC_RUNTIME_OPS_PER_OUTPUT * self.n_outputs:
            self.static = _static_runtime(traced, inputs)

    @property
    def executor(self) -> str:
        if self.inductor:
            return f"inductor (compile=True), compiled in {self.compile_seconds:.2f} s"
        if self.failure is not None:
            return f"{self.base} (compile=True, but inductor failed: {self.failure})"
        if self.cuda_graph is not None:
            return f"{self.base}, replayed as a CUDA graph"
        numpy = f", {self.numpy_ops} ops by NumPy" if self.numpy_ops else ""
        if self.static is not None:
            return f"{self.base}, run by the static runtime{numpy}"
        return self.base + numpy

    def compile_inductor(self, args: tuple[Any, ...]) -> bool:
        """Compile the functional main part with inductor and run it once on ``args`` (see
        NOTE [Inductor executor]); on failure keep the current executor, say why in
        ``executor`` and return False."""
        self.inductor = False
        try:
            from torch._inductor.compile_fx import compile_fx

            inputs = [t.detach() for t in (*args, *self.hoisted(args))]
            start = time.perf_counter()
            # no size/stride assertions in the generated code: ``run`` below calls it only
            # with the strides it was compiled for (and an executable's shapes are fixed);
            # they cost 2-9% of a latency-bound graph's call
            with torch.no_grad(), warnings.catch_warnings(), \
                    _inductor_settings(size_asserts=False):
                warnings.simplefilter("ignore")
                # a callable here (other types are for ahead-of-time compilation)
                # (on a copy: inductor's passes may rewrite the graph they are given)
                graph = _copy(self.functional.graph)
                tanh_for_inductor(graph)
                coefficients_for_inductor(graph)
                small_products_for_inductor(graph)
                gm = GraphModule(self.functional, graph)
                transpose_thin_products(gm, tuple(inputs))
                compiled = cast(Callable[..., Any], compile_fx(gm, list(inputs)))
                got = compiled(*inputs)  # C++ or Triton builds may be deferred to this run
                if not random_ops(self.functional.graph):  # NOTE [Checked compiles]
                    why = disagreement(list(got), list(self.functional(*inputs)))
                    if why is not None:
                        raise CompiledCodeDisagrees(why)
            seconds = time.perf_counter() - start
            self.compile_seconds = seconds
        except Exception as e:  # noqa: BLE001 - inductor is an accelerator, not a requirement
            InductorStats.failures += 1
            self.failure = _reason(e)
            return False
        InductorStats.compiles += 1
        InductorStats.seconds += seconds
        self._strides = [t.stride() for t in inputs]
        self.inductor = compiled
        functional = self.functional
        strides = self._strides

        def run(*a: Tensor) -> Any:
            with torch.no_grad():
                if [t.stride() for t in a] != strides:
                    return functional(*a)  # compiled for other strides: run them as they are
                InductorStats.calls += 1
                return compiled(*a)

        self.main, self.scalars, self.static = run, [], None
        return True

    def __call__(self, args: tuple[Any, ...]) -> Any:
        return _fill(self.out_template, self.flat(args))

    def flat(self, args: tuple[Any, ...]) -> Any:
        """The graph's outputs for ``args``, flat (a sequence)."""
        hoisted = self.hoisted(args)
        inputs = (*args, *hoisted, *self.scalars)
        if self.why_not_graph is None and not self.inductor:
            out = self._replay(inputs, len(args), hoisted)
            if out is not None:
                return out
        if self.below_autograd and _nothing_above_autograd():
            if self.static is not None:
                return self.static(*inputs)
            with torch._C._AutoDispatchBelowADInplaceOrView():
                return self.main(*inputs)
        return self.main(*inputs)

    def _replay(self, inputs: tuple[Any, ...], n_args: int, hoisted: Any) -> Any:
        """The outputs by the CUDA graph (captured once the main part has run ``WARM_UP``
        times), or None: run the interpreter (NOTE [CUDA graphs])."""
        if not cuda_graph.capturable(inputs):
            if cuda_graph.ENABLED and inputs and isinstance(inputs[0], Tensor) \
                    and inputs[0].is_cuda:
                # inputs on several devices never become capturable: say so (executor)
                why = cuda_graph.input_problem(inputs)
                if why is not None:
                    self.why_not_graph = why
            return None
        graph = self.cuda_graph
        if graph is not None and graph.modes != cuda_graph.math_modes():
            graph = self.cuda_graph = None  # other kernels now: capture again
            self._calls = cuda_graph.WARM_UP - 1
        if graph is None:
            self._calls += 1
            if self._calls < cuda_graph.WARM_UP:
                return None
            try:
                graph = cuda_graph.CudaGraph(self.main, inputs, n_args, hoisted)
            except Exception as e:  # noqa: BLE001 - replay is an accelerator
                cuda_graph.ReplayStats.failures += 1
                reason = " ".join(f"{type(e).__name__}: {e}".split())
                self.why_not_graph = f"capture failed: {reason[:160]}"
                return None
            cuda_graph.ReplayStats.captures += 1
            self.cuda_graph = graph
        return graph(inputs, hoisted)


# NOTE [Below autograd]
# The main part of a plain call runs where nothing is recorded: no input requires grad under
# grad mode, or in a Function's forward (NOTE [Recompute]). Each of its operators would
# still pass the autograd and ADInplaceOrView dispatch keys, which under ``no_grad`` only
# check and redispatch -- about a fifth of a small graph's run time (one CPU thread: an
# unrolled LSTM's Hessian 783 -> 617 us, a residual MLP's 197 -> 146 us, a 6th-order jet's
# 127 -> 104 us). So it runs beneath them (``_AutoDispatchBelowADInplaceOrView``, as
# PyTorch's own custom-op kernels run): same kernels, same values. What those keys would
# have added is autograd metadata: no history (none is recorded here anyway), and views
# that do not know their base nor share its version counter. Every tensor the main part
# makes is its own, except that an output may be a view of an input or of another output
# (an output returned twice, a reshape of the argument); then a later in-place write to one
# would not bump the other's version counter, and autograd could miss it. Such graphs
# (:func:`_may_alias_outputs`) run above the keys. So do calls where something else acts
# at or above them (:func:`_nothing_above_autograd`): torch.func transforms (their grad
# levels are autograd), forward-mode AD's dual levels (the autograd kernels propagate
# tangents) and autocast (its keys are excluded with autograd's: the graph would run
# without the casts autocast applies to it today).


def _nothing_above_autograd() -> bool:
    """No torch.func transform, forward-AD dual level or autocast is active."""
    return not (torch._C._are_functorch_transforms_active()
                or torch._C._is_any_autocast_enabled() or forward_ad._current_level >= 0)


# NOTE [Static runtime]
# A plain call's main part is a few dozen to a few thousand small operators (an unrolled
# LSTM's Hessian: 1450), and TorchScript's interpreter spends about 0.6 us on each beyond its
# kernel. PyTorch's static runtime (``torch._C._jit_to_static_module``, built for inference
# serving) runs the same TorchScript graph with less: each op's kernel called through its
# out-variant into buffers a memory planner laid out once, without the dispatcher's round
# trips. On one CPU thread the main part ran 14-22 % faster for a residual MLP's Hessian, the
# LSTM's, a 6th-order jet and an order-4 MLP derivative (the last two below the rules that
# follow: a whole call gained 0-9 %), 3-8 % for SIREN, flow, GRU and per-sample Hessians, and
# level for kernel-bound graphs (a transformer block, Laplacians of 128 points). It is used on
# a CPU for a main part
# * whose intermediate values take at most ``STATIC_RUNTIME_BYTES`` in all: a larger graph is
#   bound by its kernels. Its planner lays the intermediates out in one block, allocated at the
#   start of every run and freed at its end (nothing is held between calls), 2-3x the peak of
#   TorchScript's run (each storage group takes its largest tensor's size): 37 KB for a
#   residual MLP's Hessian, 920 KB for a coupling flow's;
# * with at least ``STATIC_RUNTIME_OPS_PER_OUTPUT`` operators per output: the runtime runs
#   under ``InferenceMode``, so its outputs are inference tensors, which an in-place update
#   or autograd would refuse outside that mode; they are copied to ordinary tensors, about
#   1.6 us each, which for a 6th-order jet's 7 coefficients (248 operators) took what the
#   runtime saved;
# * that runs beneath the autograd keys (NOTE [Below autograd]: no output aliases an input or
#   another output) and when it may (no transform, dual level or autocast active).
# Two more facts of the runtime shape its use:
# * it holds the Python lock for the whole run and keeps per-run state in one runtime, which
#   the lock serialises;
# * when it is built, it runs twice on the tracing inputs (the second run on its planned
#   memory) and is kept only if both give TorchScript's outputs bit for bit, with the same
#   shapes, dtypes and strides once copied; otherwise TorchScript runs the graph.


def _static_runtime(traced: Any, inputs: tuple[Any, ...]) -> Callable[..., Any] | None:
    """``traced`` (a TorchScript function returning a tuple of tensors) as run by PyTorch's
    static runtime, returning ordinary tensors, or None where it does not apply or gives other
    outputs than ``traced`` on ``inputs`` (NOTE [Static runtime])."""
    if not all(isinstance(a, Tensor) and a.device.type == "cpu" and not a.is_inference()
               for a in inputs):
        return None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            module = torch._C._jit_to_static_module(traced.graph.copy())
            expected = traced(*inputs)
            runs = [module(*inputs), module(*inputs)]  # the second on planned memory
            if not all(_same_outputs(out, expected) for out in runs):
                return None
    except Exception:  # noqa: BLE001 - the static runtime is an accelerator
        return None

    def run(*a: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.clone() for t in module(*a))

    return run


def _same_outputs(out: Any, expected: Any) -> bool:
    """Whether the static runtime's outputs ``out``, once copied, are TorchScript's
    ``expected`` bit for bit: the same shapes, dtypes, strides, values and NaNs."""
    if not (isinstance(out, tuple) and isinstance(expected, tuple)
            and len(out) == len(expected)):
        return False
    for o, e in zip(out, expected, strict=True):
        if not (isinstance(o, Tensor) and isinstance(e, Tensor)):
            return False
        c = o.clone()
        if not (c.dtype == e.dtype and c.shape == e.shape and c.stride() == e.stride()
                and torch.equal(c.isnan(), e.isnan())
                and torch.equal(c.nan_to_num(0.0), e.nan_to_num(0.0))):
            return False
    return True


def _size(graph: Graph) -> tuple[int, int]:
    """How many operators ``graph`` runs, and the bytes of every value they make (an upper
    bound on what a memory planner lays out for them)."""
    ops = total = 0
    for n in graph.nodes:
        if n.op == "call_function":
            ops += 1
            v = n.meta.get("val")
            for t in v if isinstance(v, (list, tuple)) else (v,):
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
    return ops, total


def _may_alias_outputs(graph: Graph) -> bool:
    """Whether an output of ``graph`` may share storage with an input, a constant or another
    output, or an operator may write into an input: a view or in-place operator's result
    (any argument with an alias annotation) is taken to share its argument's storage, and
    an unknown callable its arguments'."""
    root: dict[Node, Node] = {}
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            root[n] = n
            continue
        if n.op == "output":
            continue
        sources: list[Any] = []
        target = n.target if n.op == "call_function" else None
        if target is operator.getitem:
            sources = [n.args[0]]
        elif isinstance(target, torch._ops.OpOverload):
            schema = target._schema
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is None:
                    continue
                value = n.args[i] if i < len(n.args) else n.kwargs.get(arg.name)
                sources.append(value)
                if arg.alias_info.is_write and isinstance(value, Node) \
                        and root[value].op != "call_function":
                    return True  # writes into an input or a constant
        else:
            sources = list(n.all_input_nodes)
        roots = {root[s] for s in sources if isinstance(s, Node)}
        if len(roots) > 1:
            return True
        root[n] = roots.pop() if roots else n
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = [root[o] for o in _template(out_node.args[0])[0] if isinstance(o, Node)]
    return len(set(outs)) < len(outs) or any(o.op != "call_function" for o in outs)


def _row_major_batched_weights(pro: Graph, env: dict[Node, Node], hoisted: list[Node]) -> None:
    """A weight broadcast over a batch for ``bmm`` (``expand(permute(w), [N, k, n])``, what
    ``vmap`` makes of ``x @ w.T``) is hoisted; copy the transposed matrix to row-major in the
    prologue before expanding it (once per weight update): ``bmm`` over a batch of transposed
    matrices runs 1.6-1.9x slower than over row-major ones (as fast as one ``mm``, measured
    at 128 x (12 x 192) @ (192 x 192) on one CPU thread). Values are unchanged."""
    for n in hoisted:
        src = n.args[0] if n.target is torch.ops.aten.expand.default else None
        if not isinstance(src, Node) or src not in env:
            continue
        val = src.meta.get("val")
        if (not isinstance(val, Tensor) or val.dim() != 2 or val.is_contiguous()
                or not all(u.target is torch.ops.aten.bmm.default for u in n.users)):
            continue
        expand, source = env[n], env[src]
        with pro.inserting_before(expand):
            copy = pro.call_function(torch.ops.aten.clone.default, (source,),
                                     {"memory_format": torch.contiguous_format})
        expand.replace_input_with(source, copy)


def _scale_static_factors(graph: Graph, static: set[Node]) -> None:
    """``(x * s) * c`` with ``s`` static and ``c`` a power of two (the ``2`` of a symmetric
    term; :func:`~.optimize.power_of_two_scaling`) is ``x * (s * c)``: the scaled factor joins
    ``static`` and is hoisted (if small enough to keep, as every hoisted value), one op fewer
    per call."""
    aten = torch.ops.aten
    for node in list(graph.nodes):
        found = None if node in static else power_of_two_scaling(None, node)
        if found is None or found[0] in static:
            continue
        prod, c = found
        i = next((i for i, f in enumerate(prod.args)
                  if isinstance(f, Node) and f in static and _small(f)), None)
        factor = prod.args[i] if i is not None else None
        if not isinstance(factor, Node):
            continue
        with graph.inserting_before(prod):
            scaled = graph.call_function(aten.mul.Tensor, (factor, c))
        scaled.meta["val"] = factor.meta["val"]
        static.add(scaled)
        prod.args = tuple(scaled if j == i else f for j, f in enumerate(prod.args))
        node.replace_all_uses_with(prod)
        graph.erase_node(node)


def _column_major_thin_weights(graph: Graph, static: set[Node]) -> None:
    """A static row-major right operand ``w`` ``(k, n)`` of ``mm``/``addmm`` with ``2 <= n <=
    8`` and ``k >= 16`` -- a first layer's weight in a reverse sweep, ``ct @ w`` -- is read
    from a column-major copy made in the prologue (once per weight update): MKL's GEMM takes
    1.5-6x longer over the row-major matrix (``(1024, 256) @ (256, 2)``: 300 us against 52 us;
    ``(512, 64) @ (64, 2)``: 36 against 9; float32 and float64, one CPU thread; for ``n = 1``
    and ``k = 2`` the row-major one is as fast or faster). Values are unchanged; the copies
    join ``static``."""
    aten = torch.ops.aten
    made: dict[Node, Node] = {}
    for node in list(graph.nodes):
        if node.target not in (aten.mm.default, aten.addmm.default) or node in static:
            continue
        w = node.args[-1]
        val = w.meta.get("val") if isinstance(w, Node) else None
        if (w not in static or not isinstance(val, Tensor) or val.dim() != 2
                or not val.is_contiguous() or not 2 <= val.shape[1] <= 8 or val.shape[0] < 16):
            continue
        col = made.get(w)
        if col is None:
            with graph.inserting_before(node):
                t = graph.call_function(aten.permute.default, (w, [1, 0]))
                copy = graph.call_function(aten.clone.default, (t,),
                                           {"memory_format": torch.contiguous_format})
                col = made[w] = graph.call_function(aten.permute.default, (copy, [1, 0]))
            t.meta["val"] = val.permute(1, 0)
            copy.meta["val"] = t.meta["val"].clone(memory_format=torch.contiguous_format)
            col.meta["val"] = copy.meta["val"].permute(1, 0)
            static.update((t, copy, col))
        node.args = (*node.args[:-1], col)


# NOTE [Thin products]
# MKL's CPU GEMM is slow at a product ``A (M, K) @ B (K, N)`` with few columns (``N`` 2-8)
# and many rows: ``(1024, 256) @ (256, 8)``, the tangents of a forward Jacobian through a wide
# layer, takes 300 us, while the same numbers as ``(B^T @ A^T)^T`` -- an ``(8, 1024)`` result
# -- take 78 us; ``(1024, 64) @ (64, 8)`` with ``B`` a transposed weight (a layer's tangents
# in a per-sample Hessian under ``vmap``) 42-72 us against 20 (one CPU thread, float32;
# float64 alike). The main part, traced on its first call, computes such a product as
# ``permute(mm(permute(B), permute(A)))`` and leaves the result transposed: the pointwise ops
# reading it follow its layout, where a copy back to row-major would cost more than half of
# what the transposed product saves (12 us of 1024 x 8). An output of the graph that was
# row-major and no longer is gets that copy (the graph runs once more to find them), so
# callers see the layouts they saw before. Measured over ``N`` in 2-16, ``M`` 32-4096, ``K``
# 2-512 and the four row/column-major layouts of the operands: the transposed product pays
# (1.1-36x) for ``N <= 8`` and ``K >= 16`` once ``M * K`` reaches 16384 (8192 if ``A`` is
# column-major), and where ``A`` is row-major and ``B`` column-major (the layout of ``x @
# W.T``, and the one the thin static weights above are copied to) from ``M = 512`` rows on
# (1.1-7.8x; 0.6-1.7x below); not for ``N >= 16``. Coupling-flow Hessians under ``vmap``
# (64 x 16 -> 64 -> 1) ran 8% faster with that last case, 7% with ``compile=True``, where
# inductor is handed the rewritten graph. The operands' layouts are those of the first call,
# read by running the graph once (not for a graph with random ops, whose run would draw from
# the caller's generator); any later layout gives the same values.
_THIN_COLUMNS = (2, 8)
_THIN_MIN_MK: dict[tuple[str | None, str | None], int] = {
    ("row", "row"): 16384, ("col", "row"): 8192, ("col", "col"): 8192}
#: rows from which a product of a row-major ``A`` by a column-major ``B`` (a transposed weight)
#: with 2-8 columns runs transposed, its result left transposed (no copy)
_THIN_ROW_COL_ROWS = 512


def _major(t: Any) -> str | None:
    if not isinstance(t, Tensor) or t.dim() != 2:
        return None
    if t.stride(1) == 1 and t.stride(0) == t.shape[1]:
        return "row"
    if t.stride(0) == 1 and t.stride(1) == t.shape[0]:
        return "col"
    return None


class _Layouts(torch.fx.Interpreter):
    """Runs a graph once, recording the operand layouts and inner size of the ``wanted``
    matrix products."""

    def __init__(self, gm: GraphModule, wanted: set[Node]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[Node, tuple[tuple[str | None, str | None], int]] = {}

    def run_node(self, n: Node) -> Any:
        if n in self.wanted:
            a, b = (self.env[x] for x in n.args[:2])  # type: ignore[index]
            self.seen[n] = ((_major(a), _major(b)), a.shape[1])
        return super().run_node(n)


def transpose_thin_products(gm: GraphModule, inputs: tuple[Any, ...]) -> None:
    """Compute the CPU matrix products of ``gm`` that NOTE [Thin products] speeds up as
    transposed products (``inputs``: a call's, to read the operands' layouts)."""
    aten = torch.ops.aten
    wanted = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.target is aten.mm.default else None
        if (isinstance(val, Tensor) and val.device.type == "cpu"
                and val.dtype in (torch.float32, torch.float64)
                and _THIN_COLUMNS[0] <= val.shape[1] <= _THIN_COLUMNS[1] < val.shape[0]):
            wanted.add(node)
    if not wanted or random_ops(gm.graph):
        return  # (the probe run would draw from the caller's generator)
    probe = _Layouts(gm, wanted)
    before = probe.run(*inputs)
    graph = gm.graph
    done = False
    for node, (layouts, k) in probe.seen.items():
        m = node.meta["val"].shape[0]
        if layouts == ("row", "col") and k >= 2 and m >= _THIN_ROW_COL_ROWS:
            pass
        elif k < 16 or m * k < _THIN_MIN_MK.get(layouts, math.inf):
            continue
        a, b = node.args
        with graph.inserting_before(node):
            bt = graph.call_function(aten.permute.default, (b, [1, 0]))
            at = graph.call_function(aten.permute.default, (a, [1, 0]))
            product = graph.call_function(aten.mm.default, (bt, at))
            back = graph.call_function(aten.permute.default, (product, [1, 0]))
        back.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(back)
        graph.erase_node(node)
        done = True
    if done:
        gm.recompile()
        _keep_output_layouts(gm, inputs, before)


def _keep_output_layouts(gm: GraphModule, inputs: tuple[Any, ...], before: Any) -> None:
    """Copy to row-major each output of ``gm`` that was row-major in ``before`` (the outputs
    of the graph as it was, for ``inputs``) and no longer is (NOTE [Thin products])."""
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    nodes, was, now = out_node.args[0], before, gm(*inputs)
    if not isinstance(nodes, (tuple, list)):
        nodes, was, now = (nodes,), (was,), (now,)
    fixed = list(nodes)
    for i, (node, b, a) in enumerate(zip(nodes, was, now, strict=True)):
        if (isinstance(node, Node) and isinstance(a, Tensor) and isinstance(b, Tensor)
                and b.is_contiguous() and not a.is_contiguous()):
            with gm.graph.inserting_before(out_node):
                fixed[i] = gm.graph.call_function(torch.ops.aten.clone.default, (node,),
                                                  {"memory_format": torch.contiguous_format})
            fixed[i].meta["val"] = node.meta.get("val")
    if fixed != list(nodes):
        out_node.args = (type(nodes)(fixed) if isinstance(out_node.args[0], (tuple, list))
                         else fixed[0],)
        gm.recompile()


def tanh_for_inductor(graph: Graph, training: bool = False) -> int:
    """Rewrite each float32 ``tanh`` on a CPU in ``graph`` as :func:`tanhf`, which inductor
    fuses and vectorises (NOTE [Inductor's tanh]); for a graph AOTAutograd differentiates
    (``training``), as :class:`_CephesTanh`, whose backward is ``tanh``'s. The number
    rewritten."""
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    done = 0
    for node in list(graph.nodes):
        val = node.meta.get("val")
        if node.target is not torch.ops.aten.tanh.default or not isinstance(val, Tensor) \
                or val.dtype != torch.float32 or val.device.type != "cpu":
            continue
        with graph.inserting_before(node):
            if training:
                out = graph.call_function(_CephesTanh.apply, (node.args[0],))
            else:
                out = tanhf(torch.fx.Proxy(node.args[0], tracer)).node  # type: ignore[arg-type]
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    return done


class _CephesTanh(torch.autograd.Function):
    """``tanh`` by :func:`tanhf` in a graph inductor compiles for training (NOTE [Inductor's
    tanh]): its backward is ``tanh``'s, ``tanh_backward`` of the output, so the formula is
    never differentiated."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        y = tanhf(x)
        ctx.save_for_backward(y)
        return y  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward.default(grad, y)


_SCALED_PRODUCTS = {torch.ops.aten.addmm.default: torch.ops.aten.mm.default,
                    torch.ops.aten.addmv.default: torch.ops.aten.mv.default,
                    torch.ops.aten.baddbmm.default: torch.ops.aten.bmm.default}


def coefficients_for_inductor(graph: Graph) -> int:
    """Rewrite the coefficients of ``graph``'s sums as products of their own: ``add(a, b,
    alpha=c)`` (and ``sub``) as ``add(a, b * c)``, ``addmm(x, a, b, beta=s, alpha=c)`` (and
    ``addmv``, ``baddbmm``) as ``x * s + mm(a, b) * c``. Inductor's pattern passes that turn
    ``add`` of an ``mm`` into ``addmm`` and back drop them (torch 2.13: ``add(mm(a, b), x,
    alpha=16)`` compiled to ``mm(a, b) + x``; pytorch/pytorch#167313), where the products fuse
    into the same pointwise kernel. The number rewritten."""
    aten = torch.ops.aten
    done = 0
    for node in list(graph.nodes):
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, Tensor):
            continue
        if node.target in (aten.add.Tensor, aten.sub.Tensor) and \
                node.kwargs.get("alpha", 1) != 1 and len(node.args) == 2 and \
                isinstance(node.args[1], Node):
            with graph.inserting_before(node):
                b = graph.call_function(aten.mul.Tensor, (node.args[1], node.kwargs["alpha"]))
            b.meta["val"] = node.args[1].meta.get("val")
            node.args, node.kwargs = (node.args[0], b), {}
        elif node.target in _SCALED_PRODUCTS and set(node.kwargs) <= {"beta", "alpha"} and \
                len(node.args) == 3 and (node.kwargs.get("beta", 1) != 1
                                         or node.kwargs.get("alpha", 1) != 1):
            beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
            bias = node.args[0]
            with graph.inserting_before(node):
                out = graph.call_function(_SCALED_PRODUCTS[node.target], node.args[1:])
                out.meta["val"] = val
                if alpha != 1:
                    out = graph.call_function(aten.mul.Tensor, (out, alpha))
                    out.meta["val"] = val
                if beta not in (0, 1):
                    bias = graph.call_function(aten.mul.Tensor, (bias, beta))
                    bias.meta["val"] = node.args[0].meta.get("val")
                if beta != 0:  # (beta = 0 ignores the input, NaNs included)
                    out = graph.call_function(aten.add.Tensor, (bias, out))
                    out.meta["val"] = val
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        else:
            continue
        done += 1
    return done


def small_products_for_inductor(graph: Graph) -> int:
    """Rewrite each small CPU matrix product of ``graph`` as a product and a sum, one
    reduction inductor fuses with its neighbours (NOTE [Inductor's small products]): a ``bmm``
    over a batch of 128 or more products (``m n <= 64``, ``m, n >= 2``, ``k >= 16``), and an
    ``mm``/``addmm`` of few rows (``m <= 24``, ``m n k <= 16384``); the number rewritten."""
    aten = torch.ops.aten
    done = 0
    for node in list(graph.nodes):
        val = node.meta.get("val")
        if node.target not in _SMALL_PRODUCTS or node.kwargs or not isinstance(val, Tensor) \
                or val.dtype not in (torch.float32, torch.float64) or val.device.type != "cpu":
            continue  # (kwargs: addmm's beta and alpha)
        bias, (a, b) = (node.args[0], node.args[1:3]) if node.target is aten.addmm.default \
            else (None, node.args[:2])
        aval = a.meta.get("val") if isinstance(a, Node) else None
        if not isinstance(aval, Tensor) or aval.dtype != val.dtype \
                or not _small_product(node, val.shape, aval.shape[-1]):
            continue
        with graph.inserting_before(node):
            left = graph.call_function(aten.unsqueeze.default, (a, -1))
            right = graph.call_function(aten.unsqueeze.default, (b, -3))
            prod = graph.call_function(aten.mul.Tensor, (left, right))
            out = graph.call_function(aten.sum.dim_IntList, (prod, [-2]))
            if bias is not None:
                out = graph.call_function(aten.add.Tensor, (out, bias))
        out.meta["val"] = val
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    return done


_SMALL_PRODUCTS = {torch.ops.aten.bmm.default, torch.ops.aten.mm.default,
                   torch.ops.aten.addmm.default}


def _small_product(node: Node, shape: Any, k: int) -> bool:
    """Whether the product ``node`` of result ``shape`` over an inner dimension ``k`` runs
    faster as a reduction in inductor's code (NOTE [Inductor's small products])."""
    if node.target is torch.ops.aten.bmm.default:
        return shape[0] >= 128 and min(shape[1:]) >= 2 and shape[1] * shape[2] <= 64 \
            and k >= 16
    return shape[0] <= 24 and shape[0] * shape[1] * k <= 16384


def _copy(graph: Graph) -> Graph:
    """A copy of ``graph`` (nodes and their metadata)."""
    new = Graph()
    new.output(new.graph_copy(graph, {}))
    return new


def _stamps(tensors: list[Tensor]) -> list[Any] | None:
    """What hoisted values depend on (NOTE [Unversioned writes]): ``[optimiser steps, aliases
    taken, per tensor (the tensor itself -- held, so that a new tensor that reuses its memory
    is never mistaken for it, and not by a weak reference, which would stop
    ``torch.utils.swap_tensors`` from swapping it --, data pointer, version counter -- None,
    never equal, for a tensor written without bumping it --, storage and its aliases
    taken)]``."""
    try:
        return [STEPS[0], TOUCHES[0], [
            (t, t.data_ptr(), t._version if counted(t) else None, key, touched(key))
            for t in tensors for key in (storage_key(t),)]]
    except (RuntimeError, TypeError):  # inference tensors have no version counter: never cache
        return None


def _unchanged(stamps: list[Any] | None, tensors: list[Tensor]) -> bool:
    if stamps is None or stamps[0] != STEPS[0] or len(stamps[2]) != len(tensors):
        return False
    for (held, ptr, version, _, _), t in zip(stamps[2], tensors):
        if held is not t or t._version != version or t.data_ptr() != ptr:
            return False
    if stamps[1] != TOUCHES[0]:  # aliases were taken since: of these tensors' storages?
        if any(touched(key) != n for _, _, _, key, n in stamps[2]):
            return False
        stamps[1] = TOUCHES[0]
    return True


# NOTE [Buffer reuse]
# The main part never runs under autograd, so a pointwise op whose first operand is a buffer
# nothing else reads any more may write its result there (``mul`` -> ``mul_``): one
# allocation and one cold buffer fewer per op, about a fifth of the time of a chain of large
# pointwise ops. The operand must own its storage -- the fresh result of a pointwise op, a
# matrix product or a copy, of an op that itself reused such a buffer, or the one reshape or
# permute of such a buffer (never an expand, an input or a hoisted value) -- have this op as
# its only user, and already have the result's shape and dtype (no broadcasting into it, no
# type promotion).
_RESHAPES = {torch.ops.aten.reshape.default, torch.ops.aten.view.default,
             torch.ops.aten._unsafe_view.default, torch.ops.aten.permute.default,
             torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim}
_FRESH = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
          torch.ops.aten.clone.default}


def _inplace(target: Any) -> Any:
    """The in-place overload of a pointwise aten op (``aten.mul.Tensor`` ->
    ``aten.mul_.Tensor``), or None."""
    if (not isinstance(target, torch._ops.OpOverload)
            or torch.Tag.pointwise not in target.tags or target._schema.is_mutable):
        return None
    packet = getattr(torch.ops.aten, target._schema.name.split("::")[-1] + "_", None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def reuse_buffers(graph: Graph) -> None:
    """Rewrite pointwise ops in place where NOTE [Buffer reuse] allows."""
    owned: set[Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        inplace = _inplace(target)
        x = node.args[0] if node.args else None
        val, xval = node.meta.get("val"), getattr(x, "meta", {}).get("val")
        if (inplace is not None and isinstance(x, Node) and x in owned and len(x.users) == 1
                and isinstance(val, Tensor) and isinstance(xval, Tensor)
                and val.shape == xval.shape and val.dtype == xval.dtype
                and all(a is not x for a in node.args[1:])):
            node.target = inplace
            owned.add(node)
        elif target in _FRESH or _inplace(target) is not None:
            owned.add(node)
        elif (target in _RESHAPES and isinstance(x, Node) and x in owned
              and len(x.users) == 1):
            owned.add(node)  # the only view of a buffer nobody else reads, or a copy


# NOTE [Scalar operands]
# FX graphs keep Python numbers in tensor slots (``aten.mul.Tensor(x, 0.5)``); dispatch wraps
# each as a double (or long) "wrapped number" tensor, and a float32 op converts it on every
# call (``to`` -> ``_to_copy`` -> ``empty_strided`` -> ``copy_``: four dispatches around one
# multiply, a third of the calls of a Taylor propagation). TorchScript does the same with the
# constants it records, whatever their dtype. The graphs TorchScript runs therefore take each
# number as an extra input: a 0-dim tensor of the op's result dtype, made once. Only where that
# is the same arithmetic: CPU ops with a float32/float64 result (the wrapped number, and an
# integer tensor operand, are cast to exactly that dtype before they are used; a 0-dim float
# operand decides the result dtype just as the wrapped number does); half precision types
# compute with the scalar in float32 and are left alone.
_SCALAR_OPS = {getattr(torch.ops.aten, name).Tensor
               for name in ("mul", "add", "sub", "div", "mul_", "add_", "sub_", "div_")}
_SCALAR_DTYPES = (torch.float32, torch.float64)


def scalar_inputs(graph: Graph) -> list[Tensor]:
    """Replace the Python-number operands of CPU float arithmetic in ``graph`` by new trailing
    inputs (NOTE [Scalar operands]); their values, in input order."""
    # new inputs go after the existing ones (before the first node that is not an input)
    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    made: dict[tuple[Any, ...], Node] = {}
    values: list[Tensor] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SCALAR_OPS \
                or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        val = node.meta.get("val")
        if not (isinstance(val, Tensor) and val.dtype in _SCALAR_DTYPES
                and val.device.type == "cpu"):
            continue
        args = list(node.args)
        for i, (a, other) in enumerate((args, args[::-1])):
            if type(a) in (int, float) and isinstance(other, Node):
                key = (val.dtype, type(a), a)
                if key not in made:
                    with graph.inserting_before(first):
                        made[key] = graph.placeholder(f"_scalar{len(made)}")
                    values.append(torch.tensor(a, dtype=val.dtype))
                args[i] = made[key]
                node.args = tuple(args)
                break
    return values


def _small(node: Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    total = 0
    for v in vals:
        if not isinstance(v, Tensor):
            return False
        total += v.numel() * v.element_size()
    return total <= _HOIST_LIMIT_BYTES


def _template(obj: Any, flat: list[Any] | None = None) -> tuple[list[Any], Any]:
    """``obj`` (nested tuples and lists) as its leaves and a template of leaf indices; torch's
    pytree functions cost ~10 us per call here, this costs ~1."""
    flat = [] if flat is None else flat
    if isinstance(obj, (tuple, list)):
        return flat, type(obj)(_template(o, flat)[1] for o in obj)
    flat.append(obj)
    return flat, len(flat) - 1


def _fill(template: Any, flat: Any) -> Any:
    if isinstance(template, int):
        return flat[template]
    return type(template)(_fill(t, flat) for t in template)


def map_tensors(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """``fn`` applied to every tensor in nested tuples and lists (a fast ``tree_map``)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, o) for o in obj)
    return obj
