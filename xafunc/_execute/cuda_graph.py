"""Replaying the fast path's main part as one CUDA graph.

NOTE [CUDA graphs]
On a GPU, a compiled derivative graph of PINN size is a few hundred kernels of a few
microseconds each, and the host's cost of launching them -- the interpreter and the
dispatcher, 5-15 us an op -- is the whole run time: measured on an H100 (torch 2.11), 1-2 ms
a call for the model zoo where JAX's fused code takes 0.07-0.2 ms. The plain fast path's
main part (NOTE [Fast execution]) is a fixed sequence of kernels for a fixed signature
(shapes, dtypes, device), so from its second call on it is captured once into a CUDA graph
(``torch.cuda.CUDAGraph``) and replayed: one launch for the whole graph.

What makes the replay return exactly what the interpreter would, every call:

* **Inputs are copied into the graph's own buffers**, laid out as the captured inputs were
  (same strides: the kernels read them as they read the originals). The call's arguments --
  the points *and* the weights -- are copied on every call, so the graph reads what the
  interpreter would read. Hoisted values are copied when the prologue recomputed them (they
  follow the weights' version counters and NOTE [Unversioned writes]).
  Buffers are loaded by value (``copy_`` takes any layout of a later argument), except that
  of a broadcast input (an expanded weight), which copies the input's storage span and so
  takes only the same strides: a later input laid out otherwise runs the interpreter.
* **Outputs are copied out** of the graph's buffers before they are returned: the next replay
  writes the same memory, and the caller owns what it receives.
* **Only graphs that are the same kernels every call are captured**: every value on the
  one CUDA device (a CPU scalar operand would be read once, at capture, and baked in; the
  0-dim CPU constants tracing leaves, such as the Python numbers autograd saves for a traced
  backward, are moved to the device with the hoisted values, and a graph whose inputs still
  span devices names the input in ``why_not``), no
  random op (torch.func draws from the generator at each call; a replay's draws would have
  to match them exactly, which is not worth the risk), no op whose output shape or a host
  value depends on the data (``nonzero``, boolean indexing, ``.item()``: those synchronise
  and cannot be captured), and at most ``_LIMIT_BYTES`` of intermediate values (the graph
  keeps its memory pool for its lifetime: the plan cache's LRU bounds how many are held).
* **No capture inside a capture**: a caller capturing its own CUDA graph around a transform
  gets the interpreter's kernels, captured into its graph.
* **Streams**: a replay runs on the current stream; a call from another stream first waits
  for the previous call's copies, so two streams never share the buffers at once.
* **Math modes** read when a kernel is chosen (TF32 and reduced-precision reductions for
  matrix products, TF32 for cuDNN, deterministic algorithms) are recorded at capture; a call
  under other settings captures again, as the interpreter would choose other kernels.

Any failure to capture (an op that synchronises after all, an allocator refusal) keeps the
interpreter for that graph, with the reason in ``why_not``. ``XAFUNC_CUDA_GRAPHS=0`` turns
replay off for a process. Replay runs the same kernels on the same values, so results equal
the interpreter's (tested on CUDA in ``tests/engine/test_cuda_graph.py``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx import Graph

#: replay is on unless the environment says ``XAFUNC_CUDA_GRAPHS=0``
ENABLED = os.environ.get("XAFUNC_CUDA_GRAPHS", "1") != "0"
# the graph's memory pool holds all its intermediates; larger graphs are not launch-bound
_LIMIT_BYTES = 256 * 2**20
# interpreter calls before capture (TorchScript profiles and optimises on its first runs)
WARM_UP = 3


class ReplayStats:
    """Process-wide counts (what the tests check to prove a graph was replayed)."""

    captures = 0
    failures = 0
    replays = 0


def why_not(graph: Graph) -> str | None:
    """Why ``graph`` (the main part, FX) cannot be captured, from its values alone; None if it
    can be (the call's inputs are checked by :func:`capturable`)."""
    device = None
    for node in graph.nodes:
        for v in _tensors(node):
            if v.device.type != "cuda" or (device is not None and v.device != device):
                return f"a value on {v.device}"
            device = v.device
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if torch.Tag.nondeterministic_seeded in target.tags:
            return f"a random op ({target})"
        if torch.Tag.data_dependent_output in target.tags or (
                torch.Tag.dynamic_output_shape in target.tags and not _integer_index(node)):
            return f"an op whose output depends on the data ({target})"
    if device is None:
        return "no CUDA values"
    peak = peak_bytes(graph)
    if peak > _LIMIT_BYTES:
        return f"{peak / 2**20:.0f} MiB of intermediates (over {_LIMIT_BYTES >> 20} MiB)"
    return None


def _tensors(node: Any) -> list[Tensor]:
    val = node.meta.get("val")
    return [v for v in (val if isinstance(val, (list, tuple)) else [val])
            if isinstance(v, Tensor)]


def peak_bytes(graph: Graph) -> int:
    """The most bytes of op results alive at once when ``graph`` runs in order (each result
    freed after its last use; views counted as new memory, so an upper bound): what the
    graph's memory pool holds."""
    nodes = list(graph.nodes)
    last = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    size = {n: sum(v.numel() * v.element_size() for v in _tensors(n))
            for n in nodes if n.op == "call_function"}
    live = peak = 0
    for i, n in enumerate(nodes):
        live += size.get(n, 0)
        peak = max(peak, live)
        live -= sum(size.get(a, 0) for a in set(n.all_input_nodes) if last[a] == i)
    return peak


def _integer_index(node: Any) -> bool:
    """``x[idx]`` with integer index tensors: its shape is the indices' (boolean masks are
    data-dependent)."""
    if node.target is not torch.ops.aten.index.Tensor:
        return False
    return all(i is None or (isinstance(v := i.meta.get("val"), Tensor)
                             and not v.dtype.is_floating_point and v.dtype != torch.bool)
               for i in node.args[1])


def input_problem(inputs: Sequence[Any]) -> str | None:
    """Why ``inputs`` (a graph's arguments, hoisted values and scalar operands) cannot be
    copied into one capture's buffers although the first is a tensor: the first one that is
    not a tensor on the first's device; None if there is none."""
    device = inputs[0].device
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            return f"its input {i} is a {type(t).__name__}"
        if t.device != device:
            return f"its input {i} (shape {tuple(t.shape)}) is on {t.device}, not {device}"
    return None


def capturable(inputs: Sequence[Any]) -> bool:
    """Replay may run for these inputs: all tensors on one CUDA device, no capture under way."""
    if not ENABLED or not inputs:
        return False
    device = inputs[0].device if isinstance(inputs[0], Tensor) else None
    if device is None or device.type != "cuda":
        return False
    if not all(isinstance(t, Tensor) and t.device == device for t in inputs):
        return False
    return not torch.cuda.is_current_stream_capturing()


def _getter(private: str, public: Callable[[], Any]) -> Callable[[], Any]:
    """torch's C getter (0.1 us) where this torch has it, else the public property (1 us)."""
    return getattr(torch._C, private, None) or public


_MODES = (
    torch.get_float32_matmul_precision,
    _getter("_get_cublas_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
    _getter("_get_cublas_allow_fp16_reduced_precision_reduction",
            lambda: torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction),
    _getter("_get_cublas_allow_bf16_reduced_precision_reduction",
            lambda: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
    _getter("_get_cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
    torch.are_deterministic_algorithms_enabled,
)


def math_modes() -> tuple[Any, ...]:
    """The global settings that change which kernels a graph's ops launch."""
    return tuple(get() for get in _MODES)


def _dense(t: Tensor) -> bool:
    """Each element of ``t`` at its own place in one block of ``numel`` elements (a
    permutation of a contiguous layout)."""
    expected = 1
    for n, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1),
                            key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= n
    return True


class _Slot:
    """A graph-owned buffer for the captured input ``t``: laid out as ``t`` where ``t`` is a
    permuted contiguous block, as the storage span of ``t`` where ``t`` is broadcast (an
    expanded weight: copying its span keeps it small), contiguous otherwise."""

    def __init__(self, t: Tensor) -> None:
        dense = _dense(t)
        self.by_value = dense or not any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride()))
        if self.by_value:  # loaded by value: ``copy_`` takes any layout of a later argument
            self.view = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) \
                if dense else torch.empty(t.shape, dtype=t.dtype, device=t.device)
            return
        self.stride = t.stride()
        self.span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
        self.flat = torch.empty(self.span, dtype=t.dtype, device=t.device)
        self.view = self.flat.as_strided(t.shape, t.stride(), 0)

    def load(self, t: Tensor) -> bool:
        """Copy ``t`` in; False if this buffer cannot take it (a broadcast input with other
        strides)."""
        if self.by_value:
            self.view.copy_(t)
        elif t.stride() == self.stride:
            self.flat.copy_(t.as_strided((self.span,), (1,), t.storage_offset()))
        else:
            return False
        return True


def _foreach_copy(dst: list[Tensor], src: list[Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # pragma: no cover - torch < 2.2
        for d, t in zip(dst, src):
            d.copy_(t)


class CudaGraph:
    """``main`` captured for one layout of its inputs (see NOTE [CUDA graphs]); calling it
    returns ``main``'s outputs (copies), or None where the inputs do not fit the capture."""

    def __init__(self, main: Callable[..., Any], inputs: Sequence[Tensor], n_args: int,
                 hoisted: Any) -> None:
        self.n_args = n_args
        self.lock = threading.Lock()
        self.device = device = inputs[0].device
        with torch.no_grad(), torch.cuda.device(device):
            self.slots = [_Slot(t) for t in inputs]
            for slot, t in zip(self.slots, inputs):
                slot.load(t)
            views = [s.view for s in self.slots]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # cuBLAS handles, the interpreter's last profiling
                for _ in range(2):
                    main(*views)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outs = main(*views)
        self.graph = graph
        self.outs: list[Tensor] = list(outs)
        # the slots a call loads: (buffers loaded by value, their input indices, the other
        # slots' indices), for the arguments alone and for arguments and hoisted values
        self.plans = [self._plan(range(n)) for n in (n_args, len(self.slots))]
        self.hoisted = hoisted  # the hoisted list copied in (held: identity is the check)
        self.stream: Any = None
        self.done = torch.cuda.Event()
        self.modes = math_modes()  # the settings the captured kernels were chosen under

    def _plan(self, indices: range) -> tuple[list[Tensor], list[int], list[int]]:
        by_value = [i for i in indices if self.slots[i].by_value]
        return ([self.slots[i].view for i in by_value], by_value,
                [i for i in indices if not self.slots[i].by_value])

    def __call__(self, inputs: Sequence[Tensor], hoisted: Any) -> list[Tensor] | None:
        with self.lock, torch.no_grad(), torch.cuda.device(self.device):
            stream = torch.cuda.current_stream()
            if self.stream is not None and stream != self.stream:
                stream.wait_event(self.done)  # the last call's copies, on another stream
            buffers, by_value, spans = self.plans[hoisted is not self.hoisted]
            for i in spans:
                if not self.slots[i].load(inputs[i]):
                    self.hoisted = None  # some buffers hold this call's values now
                    return None
            if buffers:  # one multi-tensor launch instead of a copy kernel per input
                _foreach_copy(buffers, [inputs[i] for i in by_value])
            self.hoisted = hoisted
            self.graph.replay()
            copies: dict[int, Tensor] = {}  # outputs that are one tensor stay one tensor
            out = []
            for o in self.outs:
                if id(o) not in copies:
                    copies[id(o)] = o.clone()
                out.append(copies[id(o)])
            self.done.record(stream)
            self.stream = stream
        ReplayStats.replays += 1
        return out
