"""What a function actually calls: the torch functions and aten operators of one eager run.

:func:`record_calls` runs ``f(*args)`` once under a ``TorchFunctionMode`` (Python-level torch
functions and ``Tensor`` methods: ``torch.nn.functional.linear``, ``torch.Tensor.__matmul__``)
and a ``TorchDispatchMode`` (the aten operators they reach: ``aten.addmm``, ``aten.mv``), and
tracks which tensors depend on the differentiated arguments (``argnums``). Each call is recorded
three ways, so that a requirement can be as specific as it needs:

* ``name``                     -- it was called (``"aten.relu"``, ``"torch.nn.functional.conv2d"``)
* ``name@i``                   -- it was called with its ``i``-th argument depending on the
  differentiated inputs (``"torch.nn.functional.embedding@1"``: a derivative w.r.t. the table)
* ``name(r0,r1,...)``          -- it was called on tensors of these ranks
  (``"torch.Tensor.matmul(2,1)"``: matrix times vector)
* ``name[key=value]``          -- it was called with this plain (bool/int/float/str) argument,
  ``key`` the keyword or the position (``"torch.nn.functional.dropout[training=True]"``)

``aten.index`` with a boolean index is also recorded as ``"aten.index[bool]"``.
Nothing here imports xafunc.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class _Taint:
    def __init__(self) -> None:
        self.ids: set[int] = set()
        self.keep: list[Any] = []  # keeps tainted tensors alive so their ids stay unique

    def mark(self, tree: Any) -> None:
        for t in pytree.tree_leaves(tree):
            if isinstance(t, torch.Tensor):
                self.ids.add(id(t))
                self.keep.append(t)

    def has(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.ids

    def any(self, tree: Any) -> bool:
        return any(self.has(t) for t in pytree.tree_leaves(tree))


def _record(calls: set[str], taint: _Taint, name: str, args: Any, kwargs: Any, out: Any
            ) -> None:
    calls.add(name)
    ranks = [a.dim() for a in args if isinstance(a, torch.Tensor)]
    calls.add(f"{name}({','.join(map(str, ranks))})")
    for key, v in [*enumerate(args), *(kwargs or {}).items()]:
        if isinstance(v, (bool, int, float, str)):
            calls.add(f"{name}[{key}={v}]")
    tainted = False
    for i, a in enumerate(args):
        if taint.any(a):
            calls.add(f"{name}@{i}")
            tainted = True
    for k, v in (kwargs or {}).items():
        if taint.any(v):
            calls.add(f"{name}@{k}")
            tainted = True
    if tainted:
        taint.mark(out)


class _Functions(TorchFunctionMode):
    def __init__(self, calls: set[str], taint: _Taint) -> None:
        super().__init__()
        self.calls, self.taint = calls, taint

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = resolve_name(func) or getattr(func, "__qualname__", repr(func))
        _record(self.calls, self.taint, name, args, kwargs, out)
        return out


class _Operators(TorchDispatchMode):
    def __init__(self, calls: set[str], taint: _Taint) -> None:
        super().__init__()
        self.calls, self.taint = calls, taint

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        _record(self.calls, self.taint, name, args, kwargs, out)
        if func.overloadpacket is torch.ops.aten.index and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.calls.add(f"{name}[bool]")
        return out


def record_calls(f: Callable[..., Any], args: tuple[Any, ...],
                 argnums: int | tuple[int, ...] = 0) -> set[str]:
    """The calls one eager run of ``f(*args)`` makes (see the module docstring)."""
    calls: set[str] = set()
    taint = _Taint()
    for a in (argnums,) if isinstance(argnums, int) else argnums:
        taint.mark(args[a])
    with _Operators(calls, taint), _Functions(calls, taint):
        f(*args)
    return calls
