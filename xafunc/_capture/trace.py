"""Call signatures: what a cached plan depends on."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .decompositions import capture_overrides, decomposition_table


def _leaf_key(leaf: Any) -> Hashable:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), leaf.dtype, leaf.device.type, leaf.device.index)
    if isinstance(leaf, Hashable):
        try:
            hash(leaf)
            return ("V", type(leaf), leaf)
        except TypeError:
            pass
    return ("O", id(leaf))


def signature_key(args: tuple[Any, ...], kwargs: dict[str, Any], func: Any = None
                  ) -> Hashable | None:
    """A hashable key for everything about a call that a plan depends on.

    Tensors contribute shape, dtype and device (under ``vmap`` the per-sample shape); other
    leaves their value, or their identity when unhashable. With ``func``, the training flags
    of the ``nn.Module`` objects it reaches (see :func:`module_state`) are part of the key, so
    ``model.eval()`` after a call re-plans instead of replaying the training-mode graph.
    """
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):  # the common call
        key: tuple[Any, ...] = ("tensors", tuple((a.shape, a.dtype, a.device) for a in args))
    else:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (str(spec), tuple(_leaf_key(leaf) for leaf in leaves))
    return key if func is None else key + (module_state(func),)


_SCALARS = (bool, int, float, complex, str, type(None))


def _reachable(func: Any, depth: int = 0) -> tuple[list[torch.nn.Module], list[Any]]:
    """What a callable reads besides its arguments: ``nn.Module`` objects (itself, a bound
    ``self``, closure cells, globals named in its code, ``functools.partial`` arguments) and
    the Python scalars among those closure cells and globals (two levels of calls deep)."""
    if isinstance(func, torch.nn.Module):
        return [func], []
    if depth > 2:
        return [], []
    mods: list[torch.nn.Module] = []
    scalars: list[Any] = []
    candidates: list[Any] = []
    if hasattr(func, "__self__"):
        candidates.append(func.__self__)
    if hasattr(func, "func") and hasattr(func, "args"):  # functools.partial
        candidates += [func.func, *func.args, *getattr(func, "keywords", {}).values()]
    for cell in getattr(func, "__closure__", None) or ():
        try:
            candidates.append(cell.cell_contents)
        except ValueError:  # empty cell
            pass
    code, globs = getattr(func, "__code__", None), getattr(func, "__globals__", None)
    if code is not None and globs is not None:
        candidates += [globs[name] for name in code.co_names if name in globs]
    for c in candidates:
        if isinstance(c, torch.nn.Module):
            mods.append(c)
        elif isinstance(c, _SCALARS):
            scalars.append(c)
        elif callable(c) and not isinstance(c, type) and (
                hasattr(c, "__code__") or hasattr(c, "__self__")):
            m, sc = _reachable(c, depth + 1)
            mods += m
            scalars += sc
    return mods, scalars


def module_state(func: Any) -> Hashable:
    """The Python state a traced graph may have baked in: for every module ``func`` reaches,
    the training flags and plain-scalar attributes of it and its submodules; and the scalar
    closure cells and globals it reads. Part of the plan cache key, so changing any of them
    re-plans instead of replaying a stale graph."""
    mods, scalars = _reachable(func)
    state = []
    for m in mods:
        for sub in m.modules():
            attrs = tuple(sorted((k, v) for k, v in vars(sub).items()
                                 if isinstance(v, _SCALARS) and not k.startswith("_")))
            state.append((id(sub), sub.training, attrs))
    return tuple(state), tuple((type(v), v) for v in scalars)


# --------------------------------------------------------------------------------- tracing
# NOTE [Capture]
# ``make_fx`` in fake mode records the aten operators ``func`` runs for these shapes without
# computing anything; data-dependent Python control flow (``if x.sum() > 0``) cannot be traced
# that way and raises, which sends the request to the nested torch.func fallback instead of
# silently baking in one branch. A second ``make_fx`` pass under ``functionalize`` removes the
# in-place operators that decompositions introduce. Composite operators are decomposed into a
# small core set with PyTorch's own decomposition tables, so rules exist for a small set.


class CaptureError(Exception):
    """The function could not be traced into an aten graph; the message says why."""


def trace(fn: Any, examples: list[Any]) -> torch.fx.GraphModule:
    """Trace ``fn(*examples)`` (tensors or other values) into a functional aten graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    fakes = [
        torch.empty(tuple(e.shape), dtype=e.dtype, device=e.device)
        if isinstance(e, torch.Tensor) else e
        for e in examples
    ]
    try:
        with capture_overrides():
            g1 = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake",
                         _allow_non_fake_inputs=True)(*fakes)
        g2 = make_fx(torch.func.functionalize(g1), tracing_mode="fake",
                     _allow_non_fake_inputs=True)(*fakes)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "fall back"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CaptureError(f"{type(e).__name__}: {msg[:200]}") from None
    return _canonicalize(g2)


def _canonicalize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite operators whose traced form is fragile into equivalent robust ones.

    * ``view``/``_unsafe_view`` -> ``reshape``: ``make_fx`` records ``reshape`` as ``view``
      when the traced (fake) strides allowed it; real tensors -- batched under ``vmap``, or
      produced by kernels that choose other layouts -- may not. ``reshape`` is a view whenever
      one is possible and a copy otherwise.
    * functional ``copy(dst, src)`` (from functionalization) -> ``expand(_to_copy(src))`` to
      ``dst``'s shape and dtype: same values, and differentiable (torch has no derivative for
      ``aten::copy``, which reverse levels over the captured graph need).
    """
    aten = torch.ops.aten
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
        elif node.target is aten.copy.default and all(
                isinstance(a, torch.fx.Node) for a in node.args[:2]):
            dst = node.args[0].meta.get("val")
            if not isinstance(dst, torch.Tensor):
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


def graph_problems(gm: torch.fx.GraphModule, series_inputs: int = 1) -> list[str]:
    """Reasons the engine cannot run this graph: operators without rules on the path of the
    first ``series_inputs`` placeholders (the ones carrying Taylor series), wrapped constants."""
    from .._rules import has_rule

    problems = []
    tainted: set[Any] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and len(tainted) < series_inputs:
            tainted.add(node)
            continue
        if node.op == "call_function" and any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
        if node in tainted and node.op == "call_function" and not has_rule(node.target):
            problems.append(f"no Taylor rule for {node.target}")
        elif node.op == "get_attr":
            value = getattr(gm, node.target)
            if isinstance(value, torch.Tensor) and _is_wrapped(value):
                problems.append(
                    "the function closes over a tensor that an enclosing torch.func transform "
                    "is transforming; pass it as an argument instead"
                )
    return sorted(set(problems))


def _is_wrapped(t: torch.Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - older torch
        return False
