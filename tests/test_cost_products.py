"""The cost model counts every matrix-product spelling as a matrix product.

``torch.tanh(W @ x + b)`` used to reach the engine as a broadcast multiply and a sum: 50-80x
slower than ``F.linear`` and estimated as such. These tests pin (1) what each spelling is
captured as, (2) the multiply-adds ``graph_flops`` charges for each product op, and (3) that
the plans of one model written in every spelling carry the same estimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import xafunc
from xafunc._capture.trace import trace
from xafunc._engine.cost import graph_flops

F32 = torch.float32


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(3)


def _r(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=F32)


def _product_node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"
             and getattr(n.target, "__name__", "").split(".")[0] == name]
    assert len(nodes) == 1, f"expected one {name} in\n{gm.code}"
    return nodes[0]


# (spelling, function of the differentiated x, x's shape, the aten op it must reach,
#  the multiply-add FLOPs of that op: 2 per multiply-add, + one pass for the affine ones)
M, K, N, NB = 5, 4, 3, 2
SPELLINGS: list[tuple[str, Callable[..., Any], tuple[int, ...], str, float]] = []


def _spellings() -> list[tuple[str, Callable[..., Any], tuple[int, ...], str, float]]:
    g = _g()
    w, b, v, c = _r(M, K, g=g), _r(M, g=g), _r(K, g=g), _r(NB, K, N, g=g)
    w2, m2 = _r(K, N, g=g), _r(M, K, g=g)
    return [
        ("W@x", lambda x: w @ x, (K,), "mv", 2.0 * M * K),
        ("torch.mv", lambda x: torch.mv(w, x), (K,), "mv", 2.0 * M * K),
        ("matmul_3d_1d", lambda x: x @ v, (NB, M, K), "mv", 2.0 * NB * M * K),
        ("addmv", lambda x: torch.addmv(b, w, x), (K,), "addmv", 2.0 * M * K + M),
        ("x@W.T", lambda x: x @ w.T, (K,), "mm", 2.0 * M * K),
        ("linear_1d", lambda x: F.linear(x, w, b), (K,), "addmm", 2.0 * M * K + M),
        ("linear_2d", lambda x: F.linear(x, w, b), (N, K), "addmm", 2.0 * N * M * K + N * M),
        ("mm", lambda x: torch.mm(x, w2), (M, K), "mm", 2.0 * M * K * N),
        ("dot", lambda x: torch.dot(x, v), (K,), "dot", 2.0 * K),
        ("vdot", lambda x: torch.vdot(x, v), (K,), "vdot", 2.0 * K),
        ("addr", lambda x: torch.addr(m2, x, v), (M,), "addr", 2.0 * M * K),
        ("bmm", lambda x: torch.bmm(x, c), (NB, M, K), "bmm", 2.0 * NB * M * K * N),
        ("baddbmm", lambda x: torch.baddbmm(torch.ones(NB, M, N), x, c), (NB, M, K), "baddbmm",
         2.0 * NB * M * K * N + NB * M * N),
        ("matmul_batched", lambda x: x @ c, (NB, M, K), "bmm", 2.0 * NB * M * K * N),
        ("einsum", lambda x: torch.einsum("ij,j->i", w, x), (K,), "bmm", 2.0 * M * K),
        ("tensordot", lambda x: torch.tensordot(x, w2, dims=1), (M, K), "mm", 2.0 * M * K * N),
    ]


@pytest.mark.parametrize("idx", range(len(_spellings())), ids=[s[0] for s in _spellings()])
def test_each_spelling_is_a_counted_product(idx: int) -> None:
    name, f, shape, op, flops = _spellings()[idx]
    gm = trace(f, [torch.zeros(shape)])
    node = _product_node(gm, op)
    node_flops, _ = graph_flops(gm)
    assert node_flops[node] == flops, f"{name}: {op} counted {node_flops[node]}, not {flops}"
    # no broadcast multiply of the size of the matrix stands in for the product
    sizes = [math.prod(n.meta["val"].shape) for n in gm.graph.nodes
             if n.op == "call_function" and "mul" in str(n.target)]
    assert not sizes, f"{name} still multiplies elementwise:\n{gm.code}"


def test_convolution_counts_multiply_adds() -> None:
    g = _g()
    w = _r(4, 2, 3, 3, g=g)
    gm = trace(lambda x: F.conv2d(x, w, padding=1), [torch.zeros(1, 2, 5, 5)])
    node = _product_node(gm, "convolution")
    assert graph_flops(gm)[0][node] == 2.0 * (1 * 4 * 5 * 5) * (2 * 3 * 3)
    wt = _r(2, 4, 3, 3, g=g)  # transposed: in 2 -> out 4
    gm = trace(lambda x: F.conv_transpose2d(x, wt), [torch.zeros(1, 2, 5, 5)])
    node = _product_node(gm, "convolution")
    assert graph_flops(gm)[0][node] == 2.0 * (1 * 2 * 5 * 5) * (4 * 3 * 3)


def test_unit_seed_products_are_free_in_first_order_forward() -> None:
    """A product of a constant with (a view of) the differentiated vector costs no product in
    first-order forward mode: a row/column seed is a slice of the constant (all of its FLOPs
    are free), any other seed a scatter (all but one pass over the output)."""
    g = _g()
    w = _r(M, K, g=g)
    for f, shape, free in ((lambda x: w @ x, (K,), 2.0 * M * K),
                           (lambda x: x @ w.T, (K,), 2.0 * M * K),
                           (lambda x: F.linear(x, w), (K,), 2.0 * M * K),
                           (lambda x: torch.einsum("ij,j->i", w, x), (K,), 2.0 * M * K),
                           (lambda x: x @ w.T, (N, K), 2.0 * N * M * K - N * M),
                           (lambda x: w @ x.sin(), (K,), 0.0),  # not a view of the seed
                           (lambda x: x @ x, (K,), 0.0)):  # both operands differentiated
        gm = trace(_on_flat(f, shape), [torch.zeros(math.prod(shape))])
        assert graph_flops(gm)[1] == free, gm.code


def _on_flat(f: Callable[..., Any], shape: tuple[int, ...]) -> Callable[..., Any]:
    """``f`` of the flat differentiated vector, as the engine traces it."""
    return lambda z: f(z.reshape(shape))


def _mlp(sizes: tuple[int, ...], spelling: str) -> Callable[[torch.Tensor], torch.Tensor]:
    g = _g()
    ws = [_r(o, i, g=g) / i**0.5 for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [_r(o, g=g) * 0.1 for o in sizes[1:]]

    def lin(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if spelling == "F.linear":
            return F.linear(h, w, b)
        if spelling == "W@x+b":
            return w @ h + b
        if spelling == "x@W.T+b":
            return h @ w.T + b
        if spelling == "einsum":
            return torch.einsum("ij,j->i", w, h) + b
        if spelling == "addmv":
            return torch.addmv(b, w, h)
        if spelling == "(W*x).sum(-1)+b":  # a contraction written out (NOTE [Contractions])
            return (w * h).sum(-1) + b
        if spelling == "(x[:,None]*W.T).sum(0)+b":
            return (h[:, None] * w.T).sum(0) + b
        raise ValueError(spelling)

    def f(x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (w, b) in enumerate(zip(ws, bs)):
            h = lin(h, w, b)
            if i < len(ws) - 1:
                h = torch.tanh(h)
        return h

    return f


@pytest.mark.parametrize("sizes,order", [((64, 8, 64), 1), ((6, 24, 24, 2), 2),
                                         ((6, 24, 24, 2), 3)])
def test_every_spelling_plans_like_f_linear(sizes: tuple[int, ...], order: int) -> None:
    x = torch.randn(sizes[0], generator=_g())
    ref = xafunc.plan(_mlp(sizes, "F.linear"), order)(x)
    assert ref.strategy == "engine"
    expected = xafunc.xderiv(_mlp(sizes, "F.linear"), order)(x)
    for spelling in ("W@x+b", "x@W.T+b", "einsum", "addmv", "(W*x).sum(-1)+b",
                     "(x[:,None]*W.T).sum(0)+b"):
        p = xafunc.plan(_mlp(sizes, spelling), order)(x)
        assert p.strategy == "engine", (spelling, p.fallback)
        assert p.schedule == ref.schedule, (spelling, p.schedule, ref.schedule)
        assert p.est_flops == pytest.approx(ref.est_flops, rel=0.01), spelling
        # peaks follow each graph's live values (an add after mv keeps one tensor more than
        # addmm): the same order of magnitude, not the same bytes
        assert 0.5 <= p.est_peak_bytes / ref.est_peak_bytes <= 2.0, spelling
        actual = xafunc.xderiv(_mlp(sizes, spelling), order)(x)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# (x's shape, w's shape, f(x, w), rewritten into a matrix product?): written-out contractions
# (NOTE [Contractions]) and products that are not ones
CONTRACTIONS: dict[str, tuple[tuple[int, ...], tuple[int, ...], Callable[..., Any], bool]] = {
    "(W*h).sum(-1)": ((4,), (5, 4), lambda x, w: (w * x.tanh()).sum(-1).sin(), True),
    "keepdim": ((4,), (5, 4), lambda x, w: (w * x.tanh()).sum(1, keepdim=True).exp(), True),
    "(h[:,None]*W).sum(0)": ((4,), (4, 5), lambda x, w: (x.sin()[:, None] * w).sum(0).tanh(),
                             True),
    "batched": ((3, 4), (5, 4), lambda x, w: (x.tanh()[:, None, :] * w).sum(-1).sin(), True),
    "outer_reduce": ((3, 4), (5, 4),
                     lambda x, w: (x.sin()[:, None, :] * (w + 1)[None]).sum(2).tanh(), True),
    "two_summed_dims": ((2, 3), (4, 2, 3), lambda x, w: (w * x.exp()).sum((-1, -2)).sin(), True),
    "size_one_dims": ((1, 4), (5, 1, 4), lambda x, w: (w * x.tanh()).sum(-1, keepdim=True).sin(),
                      True),
    "both_depend_on_x": ((4,), (5, 4), lambda x, w: (x.tanh() * (w * x).sin()).sum(-1), True),
    "equal_shapes": ((5, 4), (5, 4), lambda x, w: (w * x.tanh()).sum(-1).sin(), False),
    "product_used_twice": ((4,), (5, 4),
                           lambda x, w: (lambda p: p.sum(-1).sin() + p.exp().sum())(w * x), False),
}


def _captured(f: Callable[..., Any], x: torch.Tensor, w: torch.Tensor) -> torch.fx.GraphModule:
    from torch.utils import _pytree as pytree

    from xafunc._capture.trace import capture

    leaves, spec = pytree.tree_flatten(((x, w), {}))
    cap = capture(f, leaves, spec, [])
    assert cap.graph is not None, cap.reason
    return cap.graph


@pytest.mark.parametrize("name", list(CONTRACTIONS))
def test_written_out_contractions_are_captured_as_products(name: str) -> None:
    """``(W * h).sum(-1)`` reaches the engine as a matrix product, with torch.func's
    derivatives in every schedule; products that are no contraction stay as they are."""
    from tests._compare import assert_tree_close, reference_deriv

    xs, ws, f, rewritten = CONTRACTIONS[name]
    g = _g()
    x = torch.randn(xs, generator=g, dtype=torch.float64)
    w = torch.randn(ws, generator=g, dtype=torch.float64)
    gm = _captured(f, x, w)
    reduced_products = [n for n in gm.graph.nodes if n.target is torch.ops.aten.sum.dim_IntList
                        and getattr(n.args[0], "target", None) is torch.ops.aten.mul.Tensor]
    products = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.mv.default)]
    assert (not reduced_products and products) if rewritten else reduced_products, gm.code
    fx = lambda x: f(x, w)  # noqa: E731
    for order in (1, 2, 3):
        expected = reference_deriv(fx, order)(x)
        for mode in ("auto", "forward", "reverse", "mixed"):
            with xafunc.strict():
                assert_tree_close(xafunc.xderiv(fx, order, mode=mode)(x), expected,
                                  msg=f"{name} order {order} {mode}")
    batch = torch.randn((3, *xs), generator=g, dtype=torch.float64)
    with xafunc.strict():
        assert_tree_close(torch.func.vmap(xafunc.xhessian(fx))(batch),
                          torch.func.vmap(reference_deriv(fx, 2))(batch))
