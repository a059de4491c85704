"""NumPy's vectorised ``tanh``, ``sin`` and ``cos`` for the plain fast path on a CPU.

NOTE [NumPy kernels]
ATen's CPU ``tanh`` runs about one element per 2.7 ns on one thread of this project's CPU,
for float32 as for float64 and whatever the instruction set (``ATEN_CPU_CAPABILITY`` makes no
difference), where its ``sigmoid`` takes 0.4 ns and NumPy's ``tanh`` ufunc, vectorised since
NumPy 1.22, 0.4 ns (float32; float64 1.8 ns against ATen's 5): 170 us against 25 us for a
1024 x 64 layer. Its float32 ``sin`` and ``cos`` take 1.3 ns, NumPy's 0.55 (NumPy's float64
ones are slower than ATen's). A tanh network's derivative graph applies ``tanh`` to every
hidden layer's pre-activations, batch times width elements (for per-sample Hessians of 256
points through two 64-wide layers, 18 % of the call), a SIREN ``sin``.

So in the main part of the plain fast path -- no autograd, no transform, plain tensors (NOTE
[Fast execution]) -- each of these ops (``KERNELS``: the dtypes NumPy is faster in, on a
tensor of at least ``min_numel`` elements, below which the dispatch into Python, about 4 us,
costs more than it saves) runs the ``xafunc`` op of its name (``tanh_`` in place where NOTE
[Buffer reuse] made it so), registered here with a CPU kernel that calls the ufunc on the
tensor's memory. The kernel runs ATen's op instead when ATen would spread the work over
enough threads to be faster (it splits a tensor into 32768-element chunks, one per thread;
NumPy's ufunc runs on one), for a tensor NumPy cannot view (not strided, negated or
conjugated lazily) and for one that requires grad (NumPy refuses it). Autograd's recorded
graphs, torch.func's transforms, inductor's code and GPUs keep ATen's ops. NumPy's
floating-point warnings (``sin(inf)``) are silenced: ATen returns the same NaN without one.

Over 3.8 million values spread across the float32 range, NumPy's float32 ``tanh`` is within
1.35 ulps of the exact value (ATen's: 0.51), ``sin`` and ``cos`` within 1.45 (0.61); its
float64 ``tanh`` is within 1 ulp of ATen's; all give ATen's values and signs at +-0, +-inf, NaN
and subnormals. That is float rounding, as the contract allows (inductor's code computes
float32 ``tanh`` within 1.2 ulps, NOTE [Inductor's tanh]); a call's result may differ from an
autograd-recorded call's in the last bits. Measured on one thread, in one process,
interleaved (medians of nine), over 1024 points of a 2 -> 64 -> 64 -> 1 network: tanh,
per-sample Hessians 1.74 -> 1.30 ms and Laplacians 3.6 -> 2.8 ms (width 128); Laplacians over
4096 points 6.4 -> 5.4 ms; SIREN (``sin``) Laplacians 1.21 -> 1.00 ms, Hessians 1.37 -> 1.20
ms; biharmonics, whose time is in products, level; the zoo's per-sample Hessians (256 points)
and Fourier-feature PINN 6 % faster.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.fx import Graph

#: ATen splits an elementwise op's work into chunks of this many elements, one per thread
_ATEN_GRAIN = 32768


class Kernel(NamedTuple):
    """A NumPy ufunc standing in for an ATen op on a CPU (NOTE [NumPy kernels])."""

    ufunc: Any
    dtypes: tuple[torch.dtype, ...]
    #: the fewest elements worth the dispatch into Python (about 4 us)
    min_numel: int
    #: from this many threads working on the tensor on, ATen's kernel is the faster
    aten_threads: int
    #: NumPy warns of invalid values (``sin(inf)``), which ATen returns silently
    quiet: bool = False


KERNELS = {
    "tanh": Kernel(np.tanh, (torch.float32, torch.float64), 4096, 5),
    "sin": Kernel(np.sin, (torch.float32,), 8192, 3, quiet=True),
    "cos": Kernel(np.cos, (torch.float32,), 8192, 3, quiet=True),
}

# ``Tensor.numpy`` is wrapped to count aliases of weights (NOTE [Unversioned writes]); these
# arrays view the graph's own buffers and are dropped at once
_to_numpy = torch._C.TensorBase.numpy
_aten = torch.ops.aten


def numpy_can(kernel: Kernel, x: Tensor) -> bool:
    """Whether NumPy's ufunc should run on ``x`` (NOTE [NumPy kernels])."""
    threads = min(torch.get_num_threads(), max(1, x.numel() // _ATEN_GRAIN))
    return threads < kernel.aten_threads and not x.requires_grad and not x.is_neg() \
        and not x.is_conj() and x.layout is torch.strided


def _apply(kernel: Kernel, x: Tensor, out: Tensor) -> None:
    if kernel.quiet:
        with np.errstate(invalid="ignore"):
            kernel.ufunc(_to_numpy(x), out=_to_numpy(out))
    else:
        kernel.ufunc(_to_numpy(x), out=_to_numpy(out))


def _define(lib: Any, name: str, kernel: Kernel) -> None:
    aten, aten_ = getattr(_aten, name).default, getattr(_aten, name + "_").default

    def functional(x: Tensor) -> Tensor:
        if not numpy_can(kernel, x):
            return aten(x)  # type: ignore[no-any-return]
        out = torch.empty_like(x)
        _apply(kernel, x, out)
        return out

    def inplace(x: Tensor) -> Tensor:
        if not (numpy_can(kernel, x) and x.is_contiguous()):
            return aten_(x)  # type: ignore[no-any-return]
        _apply(kernel, x, x)
        return x

    lib.define(f"{name}(Tensor x) -> Tensor")
    lib.define(f"{name}_(Tensor(a!) x) -> Tensor(a!)")
    lib.impl(name, functional, "CPU")
    lib.impl(name + "_", inplace, "CPU")


_LIB = torch.library.Library("xafunc", "DEF")
# aten op -> (the op standing in for it, its kernel)
_REPLACE: dict[Any, tuple[Any, Kernel]] = {}
for _name, _kernel in KERNELS.items():
    _define(_LIB, _name, _kernel)
    for _suffix in ("", "_"):
        _REPLACE[getattr(_aten, _name + _suffix).default] = (
            getattr(torch.ops.xafunc, _name + _suffix).default, _kernel)


def numpy_kernels(graph: Graph) -> int:
    """Make each ATen op of ``KERNELS`` (or its in-place form) in ``graph`` -- the main part of
    a plain fast path -- on a CPU tensor of a dtype and size its ufunc serves the ``xafunc``
    op standing in for it (NOTE [NumPy kernels]); the number rewritten."""
    done = 0
    for node in graph.nodes:
        got = _REPLACE.get(node.target) if node.op == "call_function" else None
        val = node.meta.get("val")
        if got is None or not isinstance(val, Tensor) or val.device.type != "cpu" \
                or val.dtype not in got[1].dtypes or val.numel() < got[1].min_numel:
            continue
        node.target = got[0]
        done += 1
    return done
