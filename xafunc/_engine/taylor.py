"""Run a captured aten graph on Taylor series: the forward (Taylor-mode) propagation."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .._rules import is_nondiff, lookup
from .._rules.series import expand_basis, has_series, materialize, primals


class Propagator:
    """A captured graph prepared for repeated propagation: node list, rules, last uses.

    Subclasses change what a propagated value is by overriding :meth:`carries` (does an
    argument structure hold a propagated value?), :meth:`strip` (the primals) and
    :meth:`apply` (run a rule); the collapsed Taylor mode of ``xlaplacian`` does.
    """

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
        self.steps = []
        for i, node in enumerate(nodes):
            rule, nondiff = None, False
            if node.op == "call_function" and node.target is not operator.getitem:
                nondiff = is_nondiff(node.target)
                rule = None if nondiff else self.rule_for(node)
            self.steps.append((node, frees.get(i, []), rule, nondiff))

    # ----------------------------------------------------------------- hooks
    def rule_for(self, node: torch.fx.Node) -> Any:
        return lookup(node.target)

    def carries(self, x: Any) -> bool:
        return has_series(x)

    def strip(self, x: Any) -> Any:
        return primals(x)

    def apply(self, rule: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if not getattr(rule, "basis_aware", False):  # NOTE [First-order basis]
            args, kwargs = expand_basis(args), {k: expand_basis(v) for k, v in kwargs.items()}
        if not getattr(rule, "unit_aware", False):
            args, kwargs = materialize(args), {k: materialize(v) for k, v in kwargs.items()}
        return rule(*args, **kwargs)

    def finish(self, value: Any) -> Any:
        return materialize(expand_basis(value))

    # ------------------------------------------------------------------- run
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

        for node, free, rule, nondiff in self.steps:
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
                elif not (self.carries(args) or self.carries(tuple(kwargs.values()))):
                    env[node] = target(*args, **kwargs)
                elif nondiff:
                    env[node] = target(*self.strip(args),
                                       **{k: self.strip(v) for k, v in kwargs.items()})
                else:
                    if rule is None:  # checked at plan time; kept as a safety net
                        raise NotImplementedError(f"no Taylor rule for {target}")
                    env[node] = self.apply(rule, args, kwargs)
            elif op == "output":
                return pytree.tree_map(
                    lambda a: self.finish(env[a]) if isinstance(a, torch.fx.Node) else a,
                    node.args[0])
            if node is stop_at:
                return self.finish(env[node])
            if override is not None and node is override[0]:
                env[node] = override[1](env[node])
            for n in free:
                env.pop(n, None)
        raise RuntimeError("graph has no output node")  # pragma: no cover
