"""Writes to a tensor that its version counter does not count (NOTE [Unversioned writes]).

NOTE [Unversioned writes]
Hoisted values are cached with their inputs' version counters (``executable._stamps``), but
some writes in torch do not bump them:

* The batch-norm kernels update the running statistics in place. An ``nn.BatchNorm`` model run
  once in train mode, outside any transform, then differentiated in eval mode would reuse
  statistics from before that step. So the tracer notes the storage of every input a
  batch-norm operator reads as running statistics (``tracer.unversioned``), and their stamps
  never match. The capture cache notes again, on every call, the tensors passed where its
  graph reads them: a new tensor there (``bn.running_mean = ...``, another state dict for
  ``functional_call``) passes the guards and is written as the traced one was.
* Fused optimisers (``Adam(fused=True)``, ``SGD(fused=True)``, ...) write the parameters.
  Every optimiser step in the process is counted (a global post-step hook), and stamps taken
  before the last one never match.
* ``w.data`` is an alias of ``w`` with a version counter of its own: the hand-written SGD step
  ``p.data -= lr * p.grad``, ``w.data.mul_(2)``, ``w.data.copy_(v)`` write ``w`` and leave its
  counter alone, as does a NumPy array from ``w.numpy()``. Such writes go through an alias
  that must be taken first, so from the import of xafunc on, ``Tensor.data`` (read or
  assigned) and ``Tensor.numpy`` are wrapped: every alias taken is counted against its
  storage, and a stamp whose storages have had an alias taken since never matches (covering
  the aliases written and dropped between two calls, the common case, while ``loss.data`` in
  a training loop invalidates nothing); while an alias is alive the tensors on its storage are
  unversioned (covering an alias kept and written later, ``w = model.weight.data`` then
  ``w -= ...`` in the loop). Assigning
  ``w.data = v`` makes ``w`` an alias of ``v`` (and, for ``p2.data = p1.data``, of ``p1`` for
  as long as ``p2`` lives). The wrappers call torch's own descriptor and method and return
  what they return.
* Other processes write CPU tensors in shared memory (``model.share_memory()``, Hogwild
  training with ``torch.multiprocessing``) without this process's counters moving: such
  tensors are unversioned too.
* ``torch.distributed``'s collectives write the tensors they are given (``dist.broadcast(p,
  0)`` to start every rank from the same weights, ``dist.all_reduce(p)`` to average models)
  without bumping their counters. The collectives of ``torch.distributed`` are wrapped to
  count as an optimiser step does (DDP's own gradient buckets, written in C++, are gradients,
  not weights).

What stays unseen is what autograd cannot see either and no Python call announces: memory
shared with other code from the start (``torch.from_numpy(a)``, ``torch.as_tensor(a)``,
DLPack, ``frombuffer``) and aliases taken before xafunc was imported. After writing weights
that way, call :func:`xafunc.clear_cache` or write them through torch under
``torch.no_grad()``.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from .tracer import unversioned

#: Untracked writes that may have touched any tensor: optimiser steps. Stamps taken under an
#: older count never match.
STEPS = [0]
#: Aliases taken so far, in the process and per storage (data pointer -> count): a stamp taken
#: under an older total looks up its own storages' counts, so that ``loss.data`` in a training
#: loop recomputes nothing
TOUCHES = [0]
_TOUCHED: dict[int, int] = {}
_MAX_TOUCHED = 4096  # storages counted before the counts are forgotten (and all stamps)

# storage data pointer -> weak references to the live aliases of that storage (``.data``
# tensors, NumPy arrays)
_ALIASES: dict[int, list[weakref.ref[Any]]] = {}
_LOCK = threading.RLock()  # aliases are taken and die on any thread (re-entered: a weakref
# callback can run inside the locked block, when an allocation there collects a dead alias)


def _count_step(*_: Any) -> None:
    STEPS[0] += 1


def storage_key(t: Tensor) -> int | None:
    """The data pointer of ``t``'s storage (what aliases are counted by), or None."""
    try:
        return t.untyped_storage().data_ptr()  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - no storage (a wrapper or subclass being traced)
        return None


def _note_alias(owner: Tensor, alias: Any) -> None:
    """Count an alias of ``owner``'s storage and keep it (weakly) while it lives."""
    key = storage_key(owner)
    if key is None:  # which storage is not known: every stamp is stale
        STEPS[0] += 1
        return
    ref = weakref.ref(alias, lambda _: _forget(key))
    with _LOCK:
        if len(_TOUCHED) >= _MAX_TOUCHED and key not in _TOUCHED:
            _TOUCHED.clear()
            STEPS[0] += 1
        _TOUCHED[key] = _TOUCHED.get(key, 0) + 1
        TOUCHES[0] += 1
        _ALIASES.setdefault(key, []).append(ref)


def touched(key: int | None) -> int:
    """How many aliases of the storage at ``key`` have been taken (since the counts were last
    forgotten)."""
    return _TOUCHED.get(key, 0) if key is not None else 0


def _forget(key: int) -> None:
    with _LOCK:
        refs = _ALIASES.get(key)
        if refs is not None:
            refs[:] = [r for r in refs if r() is not None]
            if not refs:
                del _ALIASES[key]


def counted(t: Tensor) -> bool:
    """Whether every write to ``t`` bumps its version counter as far as xafunc can tell: not a
    batch-norm running statistic, not in memory shared between processes, and no ``.data``
    or NumPy alias of its storage alive."""
    if unversioned(t) or _shared(t):
        return False
    return not _ALIASES or storage_key(t) not in _ALIASES


def _shared(t: Tensor) -> bool:
    """Whether ``t`` lives in CPU memory shared between processes (``share_memory_``, a tensor
    sent through ``torch.multiprocessing``), which other processes write unseen (Hogwild)."""
    try:
        return t.device.type == "cpu" and t.untyped_storage().is_shared()
    except Exception:  # noqa: BLE001 - no storage (a wrapper or subclass being traced)
        return False


#: torch's ``Tensor.data`` descriptor, and the property that wraps it: what a torch function mode
#: receives (as ``func.__self__``) for ``x.data`` (``trace._StandIns`` recognises both)
DATA_DESCRIPTORS: tuple[Any, ...] = (torch._C.TensorBase.__dict__["data"],)


def _install() -> None:
    global DATA_DESCRIPTORS
    base = DATA_DESCRIPTORS[0]
    to_numpy = torch._C.TensorBase.numpy

    def get_data(self: Tensor) -> Tensor:
        alias = base.__get__(self)
        _note_alias(self, alias)
        return alias  # type: ignore[no-any-return]

    def set_data(self: Tensor, value: Tensor) -> None:
        key = storage_key(value)
        if key is not None and key == storage_key(self):  # ``.to()`` that changed nothing
            base.__set__(self, value)
            return
        shared = key in _ALIASES
        base.__set__(self, value)
        # ``self`` now has ``value``'s storage under a version counter of its own: writes
        # through ``value`` are not counted while it lives, nor, where ``value`` was itself an
        # alias (``p2.data = p1.data``, tying two weights), writes through the other tensor
        # for as long as ``self`` lives
        _note_alias(self, value)
        if shared:
            _note_alias(self, self)

    @functools.wraps(to_numpy)
    def numpy(self: Tensor, *args: Any, **kwargs: Any) -> Any:
        array = to_numpy(self, *args, **kwargs)
        _note_alias(self, array)
        return array

    wrapped = property(get_data, set_data, doc=base.__doc__)
    torch.Tensor.data = wrapped  # type: ignore[assignment]
    DATA_DESCRIPTORS = (base, wrapped)
    torch.Tensor.numpy = numpy  # type: ignore[method-assign,assignment]


#: the collectives of ``torch.distributed`` that write tensors they are given
_COLLECTIVES = ("broadcast", "all_reduce", "reduce", "all_gather", "all_gather_into_tensor",
                "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
                "scatter", "gather", "recv", "irecv", "batch_isend_irecv",
                "all_reduce_coalesced", "all_gather_coalesced", "_all_gather_base",
                "_reduce_scatter_base")


def _counting(collective: Any) -> Any:
    @functools.wraps(collective)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return collective(*args, **kwargs)
        finally:
            _count_step()  # as an optimiser step

    return call


def _count_collectives() -> None:
    """Wrap the collectives in both namespaces users reach them by (NOTE [Unversioned
    writes])."""
    if not torch.distributed.is_available():
        return
    from torch.distributed import distributed_c10d

    for name in _COLLECTIVES:
        collective = getattr(distributed_c10d, name, None)
        if collective is None:
            continue
        wrapped = _counting(collective)
        for namespace in (torch.distributed, distributed_c10d):
            if getattr(namespace, name, None) is collective:
                setattr(namespace, name, wrapped)


register_optimizer_step_post_hook(_count_step)
_install()
_count_collectives()
