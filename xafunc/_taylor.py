"""Run a captured aten graph on Taylor series: the forward (Taylor-mode) propagation."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ._rules import is_nondiff, lookup
from ._series import Series, materialize


def _has_series(x: Any) -> bool:
    if isinstance(x, Series):
        return True
    if isinstance(x, (list, tuple)):
        return any(_has_series(v) for v in x)
    return False


def _primals(x: Any) -> Any:
    if isinstance(x, Series):
        return x.primal
    if isinstance(x, (list, tuple)):
        return type(x)(_primals(v) for v in x)
    return x


class Propagator:
    """A captured graph prepared for repeated propagation: node list and last uses."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        nodes = list(gm.graph.nodes)
        last_use: dict[Any, int] = {}
        for i, node in enumerate(nodes):
            for inp in node.all_input_nodes:
                last_use[inp] = i
        frees: dict[int, list[Any]] = {}
        for n, j in last_use.items():
            frees.setdefault(j, []).append(n)
        self.steps = [(node, frees.get(i, [])) for i, node in enumerate(nodes)]

    def __call__(self, *inputs: Any, stop_at: Any = None,
                 override: tuple[Any, Callable[[Any], Any]] | None = None) -> Any:
        """Propagate ``inputs`` (Series or tensors) through the graph.

        ``stop_at``: return that node's value instead of the outputs. ``override``:
        ``(node, fn)`` replaces the node's computed value ``v`` by ``fn(v)`` (the mixed
        schedule seeds a cut node with its own directions this way).
        """
        env: dict[Any, Any] = {}
        it = iter(inputs)
        gm = self.gm

        def load(a: Any) -> Any:
            return env[a]

        for node, free in self.steps:
            op = node.op
            if op == "placeholder":
                env[node] = next(it)
            elif op == "get_attr":
                env[node] = getattr(gm, node.target)
            elif op == "call_function":
                args = torch.fx.node.map_arg(node.args, load)
                kwargs = torch.fx.node.map_arg(node.kwargs, load)
                target = node.target
                if target is operator.getitem:
                    env[node] = args[0][args[1]]
                elif not (_has_series(args) or _has_series(tuple(kwargs.values()))):
                    env[node] = target(*args, **kwargs)
                elif is_nondiff(target):
                    env[node] = target(*_primals(args), **{k: _primals(v)
                                                          for k, v in kwargs.items()})
                else:
                    rule = lookup(target)
                    if rule is None:  # checked at plan time; kept as a safety net
                        raise NotImplementedError(f"no Taylor rule for {target}")
                    if not getattr(rule, "unit_aware", False):
                        args, kwargs = materialize(args), {k: materialize(v)
                                                           for k, v in kwargs.items()}
                    env[node] = rule(*args, **kwargs)
            elif op == "output":
                return pytree.tree_map(
                    lambda a: materialize(env[a]) if isinstance(a, torch.fx.Node) else a,
                    node.args[0])
            if node is stop_at:
                return materialize(env[node])
            if override is not None and node is override[0]:
                env[node] = override[1](env[node])
            for n in free:
                env.pop(n, None)
        raise RuntimeError("graph has no output node")  # pragma: no cover
