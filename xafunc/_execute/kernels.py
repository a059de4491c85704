"""NumPy's vectorised ``tanh`` for the plain fast path on a CPU (NOTE [NumPy's tanh]).

NOTE [NumPy's tanh]
ATen's CPU ``tanh`` runs about one element per 2.7 ns on one thread of this project's CPU,
for float32 as for float64 and whatever the instruction set (``ATEN_CPU_CAPABILITY`` makes no
difference), where its ``sigmoid`` takes 0.4 ns and NumPy's own ``tanh`` ufunc, vectorised
since NumPy 1.22, 0.4 ns (float32; float64 1.8 ns against ATen's 5): 170 us against 25 us
for a 1024 x 64 layer. A tanh network's derivative graph applies it to every hidden layer's
pre-activations, batch times width elements: for per-sample Hessians of 256 points through
two 64-wide layers, 18 % of the call.

So in the main part of the plain fast path -- no autograd, no transform, plain tensors
(NOTE [Fast execution]) -- every float32 or float64 ``tanh`` on a CPU of at least
``MIN_NUMEL`` elements runs ``xafunc::tanh`` (``tanh_`` in place where NOTE [Buffer reuse]
made it so), an operator registered here whose CPU kernel calls ``numpy.tanh`` on the
tensor's memory. Below ``MIN_NUMEL`` the dispatch into Python (about 4 us) costs more than it
saves. The kernel runs ATen's ``tanh`` instead when ATen would spread the work over five or
more threads (it splits a tensor into 32768-element chunks, one per thread; NumPy's ufunc
runs on one), for a tensor that is not a plain strided view of memory NumPy can read, and for
one that requires grad (which NumPy refuses; only through ``detach``, which costs more).
Autograd's recorded graphs, torch.func's transforms, inductor's code and GPUs keep ATen's
``tanh``.

NumPy's float32 ``tanh`` is within 1.35 float32 ulps of the exact value over 3.8 million
values spread across the float32 range (ATen's: 0.51), and its float64 ``tanh`` within 1 ulp
of ATen's; both give ATen's values and signs at +-0, +-inf, NaN and subnormals. That is float
rounding, as the contract allows (inductor's code computes float32 ``tanh`` within 1.2 ulps,
NOTE [Inductor's tanh]); a call's result may differ from an autograd-recorded call's in the
last bits. Measured on one thread, in one process, interleaved (medians of nine): over
1024 points of a 2 -> 64 -> 64 -> 1 tanh network, per-sample Hessians 1.74 -> 1.30 ms and
Laplacians 3.6 -> 2.8 ms (width 128); Laplacians over 4096 points 6.4 -> 5.4 ms; biharmonics,
whose time is in products, level; the zoo's per-sample Hessians (256 points) 10 % faster.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.fx import Graph

#: the fewest elements a ``tanh`` must have to run NumPy's kernel (NOTE [NumPy's tanh])
MIN_NUMEL = 4096
#: ATen's ``tanh`` splits its work into chunks of this many elements, one per thread
_ATEN_GRAIN = 32768
#: from this many threads on ATen's ``tanh`` is faster than NumPy's single-threaded ufunc
_ATEN_THREADS = 5

# ``Tensor.numpy`` is wrapped to count aliases of weights (NOTE [Unversioned writes]); these
# arrays view the graph's own buffers and are dropped at once
_to_numpy = torch._C.TensorBase.numpy
_aten = torch.ops.aten


def _numpy_can(x: Tensor) -> bool:
    """Whether NumPy's ``tanh`` should run on ``x`` (NOTE [NumPy's tanh])."""
    threads = min(torch.get_num_threads(), max(1, x.numel() // _ATEN_GRAIN))
    return threads < _ATEN_THREADS and not x.requires_grad and not x.is_neg() \
        and not x.is_conj() and x.layout is torch.strided


def _tanh(x: Tensor) -> Tensor:
    if not _numpy_can(x):
        return _aten.tanh.default(x)  # type: ignore[no-any-return]
    out = torch.empty_like(x)
    np.tanh(_to_numpy(x), out=_to_numpy(out))
    return out


def _tanh_(x: Tensor) -> Tensor:
    if not (_numpy_can(x) and x.is_contiguous()):
        return _aten.tanh_.default(x)  # type: ignore[no-any-return]
    a = _to_numpy(x)
    np.tanh(a, out=a)
    return x


_LIB = torch.library.Library("xafunc", "DEF")
_LIB.define("tanh(Tensor x) -> Tensor")
_LIB.define("tanh_(Tensor(a!) x) -> Tensor(a!)")
_LIB.impl("tanh", _tanh, "CPU")
_LIB.impl("tanh_", _tanh_, "CPU")
_REPLACE: dict[Any, Any] = {_aten.tanh.default: torch.ops.xafunc.tanh.default,
                            _aten.tanh_.default: torch.ops.xafunc.tanh_.default}


def numpy_tanh(graph: Graph) -> int:
    """Make each float32/float64 ``tanh`` (or ``tanh_``) on a CPU of at least ``MIN_NUMEL``
    elements in ``graph`` -- the main part of a plain fast path -- ``xafunc::tanh`` (NOTE
    [NumPy's tanh]); the number rewritten."""
    done = 0
    for node in graph.nodes:
        target = _REPLACE.get(node.target) if node.op == "call_function" else None
        val = node.meta.get("val")
        if target is None or not isinstance(val, Tensor) or val.device.type != "cpu" \
                or val.dtype not in (torch.float32, torch.float64) or val.numel() < MIN_NUMEL:
            continue
        node.target = target
        done += 1
    return done
