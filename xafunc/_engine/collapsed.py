"""Collapsed Taylor propagation: weighted sums of top-degree Taylor coefficients.

NOTE [Collapsed Taylor mode]
Differential operators such as the Laplacian ``sum_i d^2 f / dx_i^2`` are *weighted sums of
top-degree Taylor coefficients* along a fixed set of directions ``v_1 .. v_N``:
``L f = sum_r w_r c_K(v_r)``. Every Taylor rule produces its top coefficient as
``c_K_out = Df[c_K_in] + R(c_1 .. c_{K-1})``: linear in ``c_K_in``, nonlinear only in the lower
coefficients. So the weighted sum over directions can be pushed through the graph node by node
(Dangel, Siebert, Zeinhofer and Walther, "Collapsing Taylor mode automatic differentiation",
2024): ``s_out = Df[s_in] + sum_r w_r R_r`` with ``s = sum_r w_r c_K(v_r)``. The engine
propagates ``c_1 .. c_{K-1}`` along the ``N`` directions and ``s`` as one extra direction row
of ``c_1`` (row ``N``): the rules treat rows independently and ``c_1`` of a row is exactly
``Df`` applied to it, so ``Df[s_in]`` costs one more row in each matrix product, and rows
``N`` of the higher coefficients (never read) absorb the rest. For the Laplacian (``K = 2``)
this halves the work compared with propagating ``c_2`` along every direction; the first
linear layer applied to the unit seeds is free (:class:`~xafunc._rules.series.UnitSeed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._rules.series import Series, UnitSeed, materialize, nested_any, nested_map
from .taylor import Propagator


class Col:
    """A value in collapsed propagation: ``primal``, ``coeffs = [c_1 .. c_{K-1}]`` along the
    ``N`` directions (``None`` = zero) and ``s``, the weighted sum of the top coefficient
    ``c_K`` over the directions (``None`` = zero)."""

    __slots__ = ("primal", "coeffs", "s")

    def __init__(self, primal: Tensor, coeffs: list[Any], s: Tensor | None) -> None:
        self.primal, self.coeffs, self.s = primal, coeffs, s


def _has_col(x: Any) -> bool:
    return nested_any(x, lambda v: isinstance(v, Col))


def _col_primals(x: Any) -> Any:
    return nested_map(x, lambda v: v.primal if isinstance(v, Col) else v)


def _has_s(x: Any) -> bool:
    return nested_any(x, lambda v: isinstance(v, Col) and v.s is not None)


def _lower_series(x: Any) -> Any:
    """Every ``Col`` as the order-``K`` series ``[c_1 .. c_{K-1}, 0]`` along the directions."""
    return nested_map(x, lambda v: Series(v.primal, v.coeffs + [None])
                      if isinstance(v, Col) else v)


def _sum_series(x: Any) -> Any:
    """Every ``Col`` with a collapsed sum as the first-order series ``[s]`` (one direction);
    the others as constants: the second call computes ``Df[s]``."""
    def one(v: Any) -> Any:
        if not isinstance(v, Col):
            return v
        return v.primal if v.s is None else Series(v.primal, [v.s.unsqueeze(0)])

    return nested_map(x, one)


# Closed-form degree-2 rules for the elementwise operators that dominate networks:
# ``c_1 <- g' c_1`` and ``s <- g' s + (g''/2) sum_r c_1r^2``. Each returns ``(g', r, a)``:
# where ``g''/2 = a r g'`` (tanh, sigmoid, exp, log), the sum is factored as
# ``g' (s + a r sum_r c_1r^2)`` -- one fused ``addcmul`` and one product, fewer elementwise
# passes (and fewer backward ones when a training step differentiates them); ``a = None``:
# ``r`` is ``g''/2`` itself (sin, cos).
D2 = tuple[Tensor, Tensor | float, float | None]


def _d2_tanh(x: Tensor, y: Tensor) -> D2:
    return 1 - y * y, y, -1.0


def _d2_sigmoid(x: Tensor, y: Tensor) -> D2:
    return y * (1 - y), 0.5 - y, 1.0


def _d2_exp(x: Tensor, y: Tensor) -> D2:
    return y, 0.5, 1.0


def _d2_sin(x: Tensor, y: Tensor) -> D2:
    return torch.cos(x), -0.5 * y, None


def _d2_cos(x: Tensor, y: Tensor) -> D2:
    return -torch.sin(x), -0.5 * y, None


def _d2_log(x: Tensor, y: Tensor) -> D2:
    r = torch.reciprocal(x)
    return r, r, -0.5


_aten = torch.ops.aten
_D2_UNARY: dict[Any, tuple[Any, Callable[[Tensor, Tensor], D2]]] = {
    _aten.tanh.default: (torch.tanh, _d2_tanh),
    _aten.sigmoid.default: (torch.sigmoid, _d2_sigmoid),
    _aten.exp.default: (torch.exp, _d2_exp),
    _aten.sin.default: (torch.sin, _d2_sin),
    _aten.cos.default: (torch.cos, _d2_cos),
    _aten.log.default: (torch.log, _d2_log),
}


class Collapsed(Propagator):
    """Runs a captured graph propagating ``c_1 .. c_{K-1}`` along ``N`` directions and the
    weighted sum of ``c_K`` (see NOTE [Collapsed Taylor mode]).

    Each operator's rule runs once on the directions (``c_K`` in = 0, so its ``c_K`` out is
    the nonlinear part ``R``, summed with the weights right away) and, when some input
    carries a collapsed sum, once more on ``s`` as a first-order series (``Df[s]``).
    """

    def __init__(self, gm: torch.fx.GraphModule, K: int) -> None:
        self.K = K
        self.weights: Tensor | None = None
        super().__init__(gm)

    def rule_for(self, node: torch.fx.Node) -> Any:
        fast = _D2_UNARY.get(node.target) if self.K == 2 else None
        if fast is not None and len(node.args) == 1 and not node.kwargs:
            return ("unary2",) + fast
        return super().rule_for(node)

    def carries(self, x: Any) -> bool:
        return _has_col(x)

    def strip(self, x: Any) -> Any:
        return _col_primals(x)

    def finish(self, value: Any) -> Any:
        return value

    def apply(self, rule: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        K, weights = self.K, self.weights
        if isinstance(rule, tuple):  # closed-form degree-2 elementwise rule
            x = args[0]
            y0 = rule[1](x.primal)
            c1 = x.coeffs[0]
            if c1 is None and x.s is None:
                return y0
            if isinstance(c1, UnitSeed):
                c1 = materialize(Series(x.primal, [c1])).coeffs[0]
            g1, r, a = rule[2](x.primal, y0)
            s = x.s
            if c1 is not None:
                if weights is not None:
                    sq = contract(c1 * c1, weights)
                elif c1.is_complex():
                    sq = (c1 * c1).sum(0)
                else:  # one fused pass: sum_r c_1r^2
                    sq = torch.linalg.vecdot(c1, c1, dim=0)
                if a is None:  # r = g''/2
                    s = r * sq if s is None else g1 * s + r * sq
                elif s is None:  # g' a r sum
                    s = g1 * (r * sq) * a if a != 1 else g1 * (r * sq)
                elif isinstance(r, Tensor):  # g' (s + a r sum)
                    s = g1 * torch.addcmul(s, r, sq, value=a)
                else:
                    s = g1 * (s + (a * r) * sq)
                c1 = g1 * c1
            elif s is not None:
                s = g1 * s
            return Col(y0, [c1], s)
        sargs = _lower_series(args)
        skw = {k: _lower_series(v) for k, v in kwargs.items()}
        if not getattr(rule, "unit_aware", False):
            sargs, skw = materialize(sargs), {k: materialize(v) for k, v in skw.items()}
        out = rule(*sargs, **skw)
        lin = None
        if _has_s(args) or _has_s(tuple(kwargs.values())):
            lin = rule(*_sum_series(args), **{k: _sum_series(v) for k, v in kwargs.items()})
        return _merge(out, lin, K, weights)

    def __call__(self, weights: Tensor | None, *inputs: Any,  # type: ignore[override]
                 stop_at: Any = None, override: Any = None) -> Any:
        self.weights = weights
        try:
            return super().__call__(*inputs)
        finally:
            self.weights = None


def _merge(out: Any, lin: Any, K: int, weights: Tensor | None) -> Any:
    """Combine the rule's output on the directions with ``Df[s]`` into ``Col`` values."""
    if isinstance(out, Series):
        cs = list(out.coeffs[:K - 1]) + [None] * max(0, K - 1 - out.order)
        top = out.coeffs[K - 1] if out.order >= K else None
        s = None if top is None else contract(top, weights)
        if isinstance(lin, Series) and lin.coeffs[0] is not None:
            ls = lin.coeffs[0][0]
            s = ls if s is None else s + ls
        return Col(out.primal, cs, s)
    if isinstance(out, (list, tuple)):
        lins = lin if isinstance(lin, (list, tuple)) else [None] * len(out)
        return type(out)(_merge(o, li, K, weights) for o, li in zip(out, lins, strict=False))
    return out


def contract(top: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return top.sum(0)
    return torch.tensordot(weights.to(top.dtype), top, dims=1)
