"""Graph simplification (:mod:`xafunc._optimize`): each pass removes nodes and keeps values
bit for bit; end to end, derivatives still match nested ``torch.func.jacrev`` (float64)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, jacrev, vmap
from torch.fx.experimental.proxy_tensor import make_fx

import xafunc
import xafunc._execute.compiler as compile_mod
from tests._compare import assert_tree_close, reference_deriv
from xafunc._capture.cache import CACHE
from xafunc._capture.tracer import record
from xafunc._execute.optimize import for_autograd, simplify

DT = torch.float64
aten = torch.ops.aten


def _ops(gm: torch.fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _bitwise(a: object, b: object) -> None:
    assert_tree_close(a, b, rtol=0.0, atol=0.0)


def _simplified(fn, *xs, fewer: bool = True):
    """Trace ``fn`` (fake mode), simplify, check the node count and bitwise outputs."""
    gm = record(fn, [*xs])
    before = len(_ops(gm))
    expected = fn(*xs)
    simplify(gm)
    after = len(_ops(gm))
    assert (after < before) if fewer else (after == before), (before, after, gm.code)
    _bitwise(gm(*xs), expected)
    return gm


# --------------------------------------------------------------------------- passes
def test_noop_reshapes_and_copies():
    def fn(x):
        y = x.view(2, 3).reshape(2, 3).expand(2, 3).clone()
        y = torch.ops.aten.alias(y).squeeze().unsqueeze(0).squeeze(0)
        return y.sin()

    gm = _simplified(fn, torch.randn(2, 3))
    assert _ops(gm) == [aten.sin.default]


@pytest.mark.parametrize("lo,hi,kept", [
    (2, 9, [aten.cos.default, aten.exp.default, aten.cat.default]),  # whole pieces
    (2, 5, [aten.cos.default]),  # exactly one piece
    (3, 5, [aten.cos.default, aten.slice.Tensor]),  # inside one piece
])
def test_slice_of_cat_keeps_the_pieces_it_covers(lo, hi, kept):
    def fn(a, b, c):  # pieces of 2, 3 and 4 columns; the slice drops the sin piece
        return torch.cat([a.sin(), b.cos(), c.exp()], 1)[:, lo:hi]

    gm = _simplified(fn, torch.randn(3, 2), torch.randn(3, 3), torch.randn(3, 4))
    assert _ops(gm) == kept, gm.code


def test_slice_of_cat_across_a_piece_boundary_stays():
    def fn(a, b):
        return torch.cat([a.sin(), b.cos()], 1)[:, 1:3]

    gm = _simplified(fn, torch.randn(3, 2), torch.randn(3, 3), fewer=False)
    assert aten.slice.Tensor in _ops(gm) and aten.sin.default in _ops(gm)


def test_split_undone_by_a_cat_and_cat_undone_by_a_split():
    """Pass 4e: what a chain of linear ops does to a series' coefficients."""
    def fn(a, b):
        x = torch.cat([a.sin(), b.cos()])  # pieces of 2 and 3 rows
        p, q = torch.split(x.t(), [4, 1], 1)  # along another dim: stays
        u, v = torch.split(x, [2, 3])  # the cat's own pieces
        w = torch.cat(torch.split(x * 2, [1, 4]))  # every piece, in order
        return u.exp(), v.tan(), w, p, q

    gm = _simplified(fn, torch.randn(2, 4), torch.randn(3, 4))
    ops = _ops(gm)
    assert ops.count(aten.split_with_sizes.default) == 1, gm.code  # only the t() one stays
    assert ops.count(aten.cat.default) == 1, gm.code
    # pieces in another order, or not all of them, stay
    gm = _simplified(lambda x: torch.cat(torch.split(x, [1, 2])[::-1]).sin(), torch.randn(3),
                     fewer=False)
    assert aten.cat.default in _ops(gm)
    def other_sizes(a, b):
        u, v = torch.split(torch.cat([a, b]), [3, 2])
        return u.sin(), v.cos()

    gm = _simplified(other_sizes, torch.randn(2), torch.randn(3), fewer=False)
    assert aten.split_with_sizes.default in _ops(gm)


def test_cat_and_split_of_unit_dim_reshapes_lose_the_reshapes():
    """Pass 4f: a ``cat`` of pieces reshaped only by inserting a size-1 dim, its rows through
    one ``mm``, and a ``split`` whose pieces are reshaped back -- what a rule folding a Taylor
    series' coefficients into one GEMM records -- keep no reshape; bit for bit. Where a
    piece's reshape is read elsewhere the cat stays as it is (nothing would be saved)."""
    w = torch.randn(32, 16, dtype=DT)

    def fn(a, b, c):
        cat = torch.cat([a.reshape(5, 1, 32), b.reshape(5, 1, 32), c.reshape(5, 1, 32)])
        y = torch.mm(cat.reshape(-1, 32), w).reshape(15, 1, 16)
        p, q, r = y.split([5, 5, 5])
        return p.reshape(5, 16) * q.reshape(5, 16) + r.reshape(5, 16)

    xs = [torch.randn(5, 32, dtype=DT) for _ in range(3)]
    views = (aten.reshape.default, aten.view.default)
    ops = _ops(_simplified(fn, *xs))
    assert not any(o in views for o in ops) and ops.count(aten.cat.default) == 1, ops
    assert ops.count(aten.split_with_sizes.default) == 1, ops

    def shared(a, b):
        ra = a.reshape(5, 1, 32)
        return torch.cat([ra, b.reshape(5, 1, 32)]), ra * 2

    gm = record(shared, [xs[0], xs[1]])
    simplify(gm)
    assert sum(o in views for o in _ops(gm)) == 2, gm.code
    _bitwise(gm(xs[0], xs[1]), shared(xs[0], xs[1]))


def test_permute_of_unit_dims_is_a_reshape():
    def fn(x):  # (8, 1, 5) -> (8, 5, 1) -> (8, 5): the chain mm -> view -> permute -> view
        return x.view(8, 1, 5).permute(0, 2, 1).reshape(8, 5).sin()

    gm = _simplified(fn, torch.randn(40))
    assert _ops(gm) == [aten.reshape.default, aten.sin.default], gm.code
    gm = _simplified(lambda x: x.permute(1, 0, 2).sin(), torch.randn(2, 3, 4), fewer=False)
    assert aten.permute.default in _ops(gm)  # real transposes stay


def test_reshape_chain_becomes_one_reshape():
    def fn(x):
        return x.view(2, 6).view(3, 4).unsqueeze(0).view(4, 3).sin()

    gm = _simplified(fn, torch.randn(12))
    assert _ops(gm) == [aten.reshape.default, aten.sin.default]
    # a chain back to the original shape disappears
    gm = _simplified(lambda x: x.view(2, 6).view(3, 4).view(12).cos(), torch.randn(12))
    assert _ops(gm) == [aten.cos.default]


def test_reshape_chain_of_non_contiguous_input():
    def fn(x):
        return x.t().reshape(12).view(3, 4).view(4, 3).exp()

    x = torch.randn(3, 4)
    gm = _simplified(fn, x)
    _bitwise(gm(x), fn(x))
    xt = torch.randn(4, 3).t()  # a caller's non-contiguous input
    _bitwise(gm(xt), fn(xt))


def test_permutes():
    gm = _simplified(lambda x: x.permute(1, 0, 2).permute(1, 0, 2).sin(), torch.randn(2, 3, 4))
    assert _ops(gm) == [aten.sin.default]
    gm = _simplified(lambda x: x.transpose(0, 1).permute(2, 1, 0).sin(), torch.randn(2, 3, 4))
    assert _ops(gm).count(aten.permute.default) == 1
    gm = _simplified(lambda x: x.transpose(1, 1).sin(), torch.randn(2, 3))
    assert _ops(gm) == [aten.sin.default]


def test_arithmetic_identities():
    def fn(x):
        return ((x * 1.0) / 1 - 0 + (-0.0)).sin() + torch.ones(()) * x

    x = torch.tensor([-0.0, 0.0, 1.5, float("nan"), float("inf")])
    gm = _simplified(fn, x)
    assert aten.div.Tensor not in _ops(gm) and aten.sub.Tensor not in _ops(gm)
    assert _ops(gm).count(aten.mul.Tensor) == 0


def test_arithmetic_non_identities_stay():
    x = torch.tensor([-0.0, 1.0])
    # -0.0 + 0.0 is +0.0: kept, and the sign of zero survives
    gm = _simplified(lambda x: x + 0.0, x, fewer=False)
    assert torch.signbit(gm(x)).tolist() == [False, False]
    # type promotion and broadcasting change the result: kept
    i = torch.arange(3)
    _simplified(lambda i: i * 1.0, i, fewer=False)
    gm = _simplified(lambda x: x * torch.ones(2, 2), x)  # ones folded into a constant
    assert _ops(gm) == [aten.mul.Tensor]
    # integer zero is neutral
    gm = _simplified(lambda i: (i + 0).neg(), i)
    assert _ops(gm) == [aten.neg.default]


def test_common_subexpressions():
    def fn(a, b):
        return a.sin() * b + b * a.sin() + a * b + b * a

    gm = _simplified(fn, torch.randn(4), torch.randn(4))
    assert _ops(gm).count(aten.sin.default) == 1
    # a * b and b * a (real) are one product; sin(a) * b + b * sin(a) is then (...) * 2
    products = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor
                and all(isinstance(a, torch.fx.Node) for a in n.args)]
    assert len(products) == 2


def test_complex_products_keep_operand_order():
    a, b = torch.randn(4, dtype=torch.complex128), torch.randn(4, dtype=torch.complex128)
    gm = _simplified(lambda a, b: (a * b + b * a).exp(), a, b, fewer=False)
    assert _ops(gm).count(aten.mul.Tensor) == 2


def test_random_ops_are_not_merged_or_dropped():
    def fn(x):
        torch.rand_like(x)  # dead, but it advances the generator
        return torch.rand_like(x) + torch.rand_like(x)

    gm = record(fn, [torch.randn(3)])
    simplify(gm)
    assert _ops(gm).count(aten.rand_like.default) == 3
    torch.manual_seed(1)
    expected = fn(torch.randn(3))
    torch.manual_seed(1)
    _bitwise(gm(torch.randn(3)), expected)


def test_dead_code():
    def fn(x):
        x.cos().exp()
        x.detach()
        return x.sin()

    gm = _simplified(fn, torch.randn(3))
    assert _ops(gm) == [aten.sin.default]


def test_outputs_do_not_alias_inputs_or_each_other():
    x = torch.randn(3)
    gm = _simplified(lambda x: x.clone(), x, fewer=False)
    assert gm(x) is not x
    gm = _simplified(lambda x: (x.sin(), x.sin()), x, fewer=False)
    a, b = gm(x)
    assert a is not b


def test_constant_subgraphs_fold():
    def fn(x):
        eye = torch.zeros(3, 3).diagonal_scatter(torch.ones(3))
        return eye @ x

    gm = _simplified(fn, torch.randn(3, 2))
    assert _ops(gm) == [aten.mm.default]


def test_like_factories_become_constants():
    """``ones_like(y)``, the seed of a reverse sweep, reads only ``y``'s shape: it folds to a
    constant, and the ops that computed ``y`` for it alone are dead code."""
    def fn(x, w):
        y = torch.tanh(x @ w)  # computed only for its shape
        seed = torch.ones_like(y)
        return (seed @ w.T) * x + torch.full_like(x, 2.0) + torch.zeros_like(x)

    gm = _simplified(fn, torch.randn(1, 3), torch.randn(3, 4))
    # (``+ zeros`` stays: ``-0.0 + 0.0`` is ``+0.0``)
    assert _ops(gm) == [aten.permute.default, aten.mm.default, aten.mul.Tensor,
                        aten.add.Tensor, aten.add.Tensor], gm.code


def test_small_broadcast_operand_is_made_row_major():
    """NOTE [Broadcast operand layout]: ``h (8, 1, 64) * w.t() (3, 64)`` would come out with
    the size-3 dimension innermost; the small operand is copied so the output is row-major."""
    w = torch.randn(64, 3)
    h = torch.randn(8, 1, 64)

    def fn(h):
        return h * w.t()

    assert not fn(h).is_contiguous()
    gm = record(fn, [h])
    simplify(gm)
    assert aten.clone.default in _ops(gm)
    out = gm(h)
    assert out.is_contiguous()
    _bitwise(out, fn(h))
    # a large operand keeps its layout: nothing to gain from copying it
    # strides as given (``record`` makes its inputs contiguous, as every trace of xafunc's)
    gm = make_fx(lambda a, b: a * b, tracing_mode="fake")(torch.randn(64, 8).t(),
                                                          torch.randn(8, 1))
    simplify(gm)
    assert aten.clone.default not in _ops(gm)


def test_strided_broadcast_operand_of_a_row_major_output_is_copied():
    """NOTE [Broadcast operand layout]: ``h (8, 2, 64) * w.t() (2, 64)`` comes out row-major
    (``h`` decides the layout), but ``w.t()``'s last dimension has stride 2, so the inner loop
    would be strided: the small operand is copied. An operand whose last dimension is
    contiguous, or of size 1, is left alone."""
    w = torch.randn(64, 2)
    h = torch.randn(8, 2, 64)

    def fn(h):
        return h * w.t()

    assert fn(h).is_contiguous()
    gm = record(fn, [h])
    simplify(gm)
    assert aten.clone.default in _ops(gm), gm.code
    _bitwise(gm(h), fn(h))
    for other in (torch.randn(2, 64), torch.randn(1, 64).expand(2, 64),
                  torch.randn(1, 2).t()):
        gm = make_fx(lambda a, b: a * b, tracing_mode="fake")(h, other)
        simplify(gm)
        assert aten.clone.default not in _ops(gm), (other.stride(), gm.code)


def test_transposed_products_come_out_row_major():
    """Pass 9 (``inexact=True``): a transposed ``bmm``/``mm`` read (through a reshape) by a
    pointwise op is computed as the product of the transposed operands, so the op reads a
    row-major value; where a later permute undoes the transpose, the product stays."""
    a, b = torch.randn(8, 6, 4, dtype=DT), torch.randn(8, 4, 3, dtype=DT)
    c, m, n = torch.randn(8, 3, 1, 6, dtype=DT), torch.randn(5, 4, dtype=DT), \
        torch.randn(4, 6, dtype=DT)

    def fn(a, b, c, m, n):
        t = torch.bmm(a, b).transpose(1, 2).reshape(8, 3, 1, 6) * c
        u = (m @ n).t() * 2.0
        return t.sum(1), u

    gm = record(fn, [a, b, c, m, n])
    simplify(gm, inexact=True)
    for node in gm.graph.nodes:
        if node.target in (aten.bmm.default, aten.mm.default):
            assert not any(u.target in (aten.permute.default, aten.transpose.int,
                                        aten.t.default) for u in node.users), gm.code
            assert node.meta["val"].is_contiguous()
    assert_tree_close(gm(a, b, c, m, n), fn(a, b, c, m, n), rtol=1e-14, atol=1e-14)

    def undone(m, n):  # the transpose is undone downstream: nothing to gain
        return (m @ n).t().reshape(3, 2, 5).permute(2, 0, 1).sin()

    m, n = torch.randn(5, 4, dtype=DT), torch.randn(4, 6, dtype=DT)
    gm = record(undone, [m, n])
    simplify(gm, inexact=True)
    mm = next(node for node in gm.graph.nodes if node.target is aten.mm.default)
    assert mm.args[0].op == "placeholder" and mm.args[1].op == "placeholder", gm.code
    assert_tree_close(gm(m, n), undone(m, n), rtol=1e-14, atol=1e-14)


def test_inexact_pass_fuses_products():
    """Pass 10 (``inexact=True``): ``s1 * reshape(big * s2)`` multiplies the large tensor
    once and ``a * b + c`` is one ``addcmul``; the values agree to rounding."""
    big, s1, s2 = torch.randn(8, 3, 16, dtype=DT), torch.randn(8, 1, 1, 16, dtype=DT), \
        torch.randn(8, 1, 16, dtype=DT)
    w, bias = torch.randn(16, 5, dtype=DT), torch.randn(5, dtype=DT)

    def fn(big, s1, s2, w, bias):
        t = s1 * (big * s2).reshape(8, 3, 1, 16)
        u = t * s1 + big.reshape(8, 3, 1, 16)
        return torch.mm(u.reshape(24, 16), w) + bias

    args = (big, s1, s2, w, bias)
    gm = record(fn, [*args])
    simplify(gm, inexact=True)
    ops = _ops(gm)
    big_products = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor
                    and n.meta["val"].numel() == big.numel()]
    assert len(big_products) == 1, gm.code
    assert aten.addcmul.default in ops, gm.code
    assert_tree_close(gm(*args), fn(*args))
    # a factor that expands the product (here along dim 2) is not a small operand of it
    e = torch.randn(8, 1, 5, 16, dtype=DT)
    expand = lambda big, s2, e: (big * s2).reshape(8, 3, 1, 16) * e  # noqa: E731
    gm = record(expand, [big, s2, e])
    simplify(gm, inexact=True)
    assert_tree_close(gm(big, s2, e), expand(big, s2, e))
    # without inexact=True the graph keeps every product (bit-for-bit passes only)
    gm = record(fn, [*args])
    simplify(gm)
    assert aten.addcmul.default not in _ops(gm)
    _bitwise(gm(*args), fn(*args))


def test_autograd_copy_makes_batched_products_with_a_shared_matrix_one_mm():
    """``matmul`` of a non-contiguous batch by a weight expands the weight and calls ``bmm``;
    under autograd that sums an ``(N, k, n)`` per-batch weight gradient. The graph run when
    autograd records (:func:`for_autograd`) has one ``mm`` instead, with the weight on either
    side, and the original graph is untouched; values and gradients agree, also under
    ``vmap``."""
    a = torch.randn(6, 4, 5, dtype=DT).transpose(1, 2)  # (6, 5, 4), not contiguous
    b = torch.randn(6, 3, 4, dtype=DT).transpose(1, 2)  # (6, 4, 3)
    w_right, w_left = torch.randn(4, 3, dtype=DT), torch.randn(2, 5, dtype=DT)

    def fn(a, b, w_right, w_left):
        return torch.matmul(a, w_right), torch.matmul(w_left, a), torch.bmm(a, b)

    args = (a, b, w_right, w_left)
    # strides as given (``record`` makes its inputs contiguous, as every trace of xafunc's)
    gm = simplify(make_fx(fn, tracing_mode="fake")(*args), inexact=True)
    assert _ops(gm).count(aten.bmm.default) == 3, gm.code
    ag = for_autograd(gm)
    assert _ops(gm).count(aten.bmm.default) == 3, gm.code
    ops = _ops(ag)
    assert ops.count(aten.bmm.default) == 1 and ops.count(aten.mm.default) == 2, ag.code
    assert_tree_close(ag(*args), fn(*args))
    loss = lambda *xs: sum(o.sin().sum() for o in ag(*xs))  # noqa: E731
    expected = lambda *xs: sum(o.sin().sum() for o in fn(*xs))  # noqa: E731
    assert_tree_close(grad(loss, argnums=(0, 1, 2, 3))(*args),
                      grad(expected, argnums=(0, 1, 2, 3))(*args))
    batch = torch.randn(2, *a.shape, dtype=DT)
    assert_tree_close(vmap(ag, in_dims=(0, None, None, None))(batch, b, w_right, w_left),
                      vmap(fn, in_dims=(0, None, None, None))(batch, b, w_right, w_left))
    plain = make_fx(lambda a, b: torch.bmm(a, b), tracing_mode="fake")(a, b)
    assert for_autograd(plain) is plain  # nothing to change: the graph itself


def test_autograd_copy_unfuses_addcmul():
    """The graph run when autograd records has a product and a sum where the simplified graph
    has ``addcmul`` (pass 10): autograd differentiates ``addcmul`` with two more passes over
    the data. Values and gradients agree; the simplified graph keeps its ``addcmul``."""
    a, b, c = (torch.randn(16, 8, dtype=DT) for _ in range(3))

    def fn(a, b, c):
        return (a * b + c).sin()

    gm = simplify(record(fn, [a, b, c]), inexact=True)
    assert aten.addcmul.default in _ops(gm), gm.code
    ag = for_autograd(gm)
    assert aten.addcmul.default in _ops(gm) and aten.addcmul.default not in _ops(ag), ag.code
    assert_tree_close(ag(a, b, c), fn(a, b, c))
    loss = lambda *xs: ag(*xs).sum()  # noqa: E731
    expected = lambda *xs: fn(*xs).sum()  # noqa: E731
    assert_tree_close(grad(loss, argnums=(0, 1, 2))(a, b, c),
                      grad(expected, argnums=(0, 1, 2))(a, b, c))


def test_small_batches_of_a_shared_matrix_become_one_mm():
    """Pass 11: the reverse level of ``einsum("oi,i->o", w, h)`` multiplies each of the output
    directions by the weight expanded over them (``bmm`` reading the matrix once per
    direction, a matrix-vector product each); with the batch no larger than the matrix it is
    one ``mm``, row-major like ``jacrev``'s result, with the oracle's values. A large batch
    keeps its ``bmm`` (the test above)."""
    torch.manual_seed(3)
    w1, w2 = torch.randn(32, 256, dtype=DT), torch.randn(4, 32, dtype=DT)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oi,i->o", w2, torch.tanh(torch.einsum("oi,i->o", w1, x)))

    x = torch.randn(256, dtype=DT)
    jac = xafunc.xjacobian(f)
    with torch.no_grad():
        got = jac(x)
    assert_tree_close(got, jacrev(f)(x))
    assert got.is_contiguous()
    plans = [p for e in CACHE.entries(f) for p in e.plans.values()]
    assert [p.strategy for p in plans] == ["engine"]
    graphs = [fn.gm for p in plans for fn in p.program.compiler.fns.values()
              if hasattr(fn, "gm")]
    batched = [n for g in graphs for n in g.graph.nodes if n.target is aten.bmm.default
               and n.meta["val"].shape[0] > 1]  # the forward einsum is a bmm of batch 1
    assert graphs and not batched, graphs[0].code
    assert any(aten.mm.default in _ops(g) for g in graphs)


def test_shared_matrix_bmm_of_row_major_or_short_batches_become_one_mm():
    """Pass 11 where the batch outnumbers the matrix: a row-major batch folds into one ``mm``
    without a copy, and a transposed batch of matrices with few rows (``8 m < n``) is copied
    and multiplied in one ``mm`` (``bmm`` packs the matrix once per entry); a transposed batch
    of taller matrices keeps its ``bmm``. The layout is the one the graph runs with: below,
    pass 8 makes ``h * s`` row-major, which its recorded layout predates."""
    torch.manual_seed(4)
    w = torch.randn(4, 24, dtype=DT)
    row = torch.randn(30, 6, 4, dtype=DT)
    tall = torch.randn(30, 4, 16, dtype=DT).transpose(1, 2)  # (30, 16, 4): m = 16
    short = torch.randn(30, 4, 2, dtype=DT).transpose(1, 2)  # (30, 2, 4): m = 2

    def fn(r, t, s, w):
        return tuple(torch.bmm(x, w.expand(30, 4, 24)) for x in (r, t, s))

    args = (row, tall, short, w)
    # strides as given (``record`` makes its inputs contiguous, as every trace of xafunc's)
    gm = simplify(make_fx(fn, tracing_mode="fake")(*args), inexact=True)
    ops = _ops(gm)
    assert ops.count(aten.bmm.default) == 1 and ops.count(aten.mm.default) == 2, gm.code
    assert_tree_close(gm(*args), fn(*args))

    s = torch.randn(4, 6, dtype=DT).t()  # a transposed weight slice, broadcast over h

    def copied(h, w):
        return torch.bmm(h * s, w.expand(30, 4, 24))

    h = torch.randn(30, 1, 4, dtype=DT)
    assert not (h * s).is_contiguous()
    gm = simplify(record(copied, [h, w]), inexact=True)
    assert aten.clone.default in _ops(gm) and aten.bmm.default not in _ops(gm), gm.code
    assert_tree_close(gm(h, w), copied(h, w))


def test_shared_column_or_row_on_the_left_of_a_batch_is_no_bmm():
    """Pass 11 with the matrix on the left, over a batch that outnumbers it: a column
    (``(m, 1)``: outer products) is a broadcast product, a row (``(1, k)``) over small batch
    entries one ``mm`` of the batch copied; a 3-D constant expanded outside the trace (stride
    0) counts as the expand of its one matrix. A taller matrix keeps its ``bmm``."""
    torch.manual_seed(5)
    col, row, tall = torch.randn(4, 1, dtype=DT), torch.randn(1, 4, dtype=DT), \
        torch.randn(3, 4, dtype=DT)
    rows, batch = torch.randn(64, 1, 8, dtype=DT), torch.randn(64, 4, 8, dtype=DT)
    const = torch.randn(1, 4, dtype=DT).expand(64, 1, 4)  # read as a constant by the trace

    def fn(rows, batch):
        return (torch.bmm(col.expand(64, 4, 1), rows), torch.bmm(row.expand(64, 1, 4), batch),
                torch.bmm(const, batch), torch.bmm(tall.expand(64, 3, 4), batch))

    gm = simplify(record(fn, [rows, batch]), inexact=True)
    ops = _ops(gm)
    assert ops.count(aten.bmm.default) == 1 and ops.count(aten.mm.default) == 2, gm.code
    assert aten.mul.Tensor in ops
    assert_tree_close(gm(rows, batch), fn(rows, batch))


def test_constants_made_while_a_transform_is_active_are_plain_tensors():
    """A graph may be simplified while the call that builds it runs under a torch.func
    transform (a biharmonic's batched graph, built inside ``torch.func.grad`` of a training
    loss): the constants passes 6 and 11 make (folded, or the one matrix of an expanded 3-D
    constant) must be plain tensors, not wrapped at that level: they outlive it, and
    AOTAutograd (``compile=True`` training) refused them."""
    const = torch.randn(1, 4, dtype=DT).expand(64, 1, 4)
    batch = torch.randn(64, 4, 8, dtype=DT)

    def fn(batch):
        return torch.bmm(const, batch) * torch.ones(3, 1, 1, dtype=DT).sum()

    gm = record(fn, [batch])

    def build(w: torch.Tensor) -> torch.Tensor:
        simplify(gm, inexact=True)
        return w.sum()

    grad(build)(torch.ones(2, dtype=DT))
    consts = [getattr(gm, str(n.target)) for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(consts) >= 2 and aten.bmm.default not in _ops(gm), gm.code
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(c) for c in consts)
    assert_tree_close(gm(batch), fn(batch))


def test_unread_rows_of_a_product_are_not_computed():
    """Pass 12: only the rows of ``mm(cat(pieces), w)`` that are read are computed, by a
    product of their piece alone; what only the unread rows needed is dead code."""
    def fn(a, b, w):
        rows = torch.mm(torch.cat([a.sin(), b.cos()]), w)
        return torch.split(rows, [2, 3])[1]

    args = (torch.randn(2, 4, dtype=DT), torch.randn(3, 4, dtype=DT), torch.randn(4, 5, dtype=DT))
    gm = record(fn, list(args))
    expected = fn(*args)
    simplify(gm, inexact=True)
    assert _ops(gm) == [aten.cos.default, aten.mm.default], gm.code
    assert_tree_close(gm(*args), expected)

    def every_row(a, b, w):  # every piece read: one product stays
        return [r * 2 for r in torch.split(torch.mm(torch.cat([a.sin(), b.cos()]), w), [2, 3])]

    gm = record(every_row, list(args))
    simplify(gm, inexact=True)
    assert _ops(gm).count(aten.mm.default) == 1, gm.code


def test_activation_derivatives_are_one_kernel():
    """Pass 13: ``g * ((1 - s) * s)`` of a sigmoid and ``g * (1 - t * t)`` of a tanh are
    ``sigmoid_backward``/``tanh_backward`` (broadcasting as the product did), with the values
    and the derivatives (``grad``, ``vmap``) of the unfused graph; a factor read twice
    stays."""
    def fn(x, g, h):
        s, t = torch.sigmoid(x), torch.tanh(x)
        return g * (aten.sub.Tensor(1, s) * s), (aten.sub.Tensor(1, t * t)) * h

    args = (torch.randn(3, 4, dtype=DT), torch.randn(5, 3, 4, dtype=DT),
            torch.randn(3, 4, dtype=DT))
    gm = record(fn, list(args))
    expected = fn(*args)
    simplify(gm, inexact=True)
    ops = _ops(gm)
    assert aten.sigmoid_backward.default in ops and aten.tanh_backward.default in ops, gm.code
    assert aten.mul.Tensor not in ops and aten.sub.Tensor not in ops, gm.code
    assert_tree_close(gm(*args), expected)
    assert_tree_close(torch.func.grad(lambda x: gm(x, *args[1:])[0].sum())(args[0]),
                      torch.func.grad(lambda x: fn(x, *args[1:])[0].sum())(args[0]))
    assert_tree_close(torch.func.vmap(gm)(*[a.unsqueeze(0) for a in args]),
                      tuple(e.unsqueeze(0) for e in expected))

    def shared(x, g):  # a factor or a part of one read elsewhere too: not fused
        t, s = torch.tanh(x), torch.sigmoid(x)
        d, sq, o = aten.sub.Tensor(1, t * t), t * t * 3, aten.sub.Tensor(1, s)
        return g * d, d * 2, g * aten.sub.Tensor(1, sq), sq, g * (o * s), o * 2

    gm = record(shared, [args[0], args[2]])
    simplify(gm, inexact=True)
    ops = _ops(gm)
    assert aten.tanh_backward.default not in ops, gm.code
    assert aten.sigmoid_backward.default not in ops, gm.code


def _scalings(gm: torch.fx.GraphModule, numel: int) -> list[object]:
    """The scalar products and negations in ``gm`` of at least ``numel`` elements."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and (
        n.target is aten.neg.default or n.target is aten.mul.Tensor and any(
            isinstance(a, (int, float)) for a in n.args)) and n.meta["val"].numel() >= numel]


def test_scalar_factors_move_to_where_they_cost_least():
    """Pass 14: a scalar factor of a large value moves to a product's smaller operand, into
    ``sub``'s ``alpha`` and ``addcmul``'s ``value`` (also through the operand they add to),
    or past a sum to its smaller result; values and derivatives (``grad``, ``vmap``) agree,
    and a factor that would cost more elsewhere stays."""
    def fn(x, w, c, u):
        h = torch.mm(x * 3.0, w)  # -> mm(x, w * 3)
        g = c - (-h) * 0.5  # -> sub(c, h, alpha=-1.5), with the factor 3
        a = torch.addcmul(u * 2.0, u, c)  # -> 2 * addcmul(u, u, c, value=0.5)
        return torch.sin(g), (h * 2).sum(0), a.sum(1)

    args = (torch.randn(64, 16, dtype=DT), torch.randn(16, 8, dtype=DT),
            torch.randn(64, 8, dtype=DT), torch.randn(64, 8, dtype=DT))
    gm = record(fn, list(args))
    assert len(_scalings(gm, 512)) == 5, gm.code
    expected = fn(*args)
    simplify(gm, inexact=True)
    assert _scalings(gm, 512) == [], gm.code
    assert_tree_close(gm(*args), expected)
    loss = lambda *xs: sum(o.sin().sum() for o in gm(*xs))  # noqa: E731
    want = lambda *xs: sum(o.sin().sum() for o in fn(*xs))  # noqa: E731
    assert_tree_close(grad(loss, argnums=(0, 1, 2, 3))(*args),
                      grad(want, argnums=(0, 1, 2, 3))(*args))
    assert_tree_close(vmap(gm)(*[a.unsqueeze(0) for a in args]),
                      tuple(e.unsqueeze(0) for e in expected))

    def stays(x, w):  # the product and its reader are as large as the scaled value
        return torch.tanh(x * 3.0) * 2.0, torch.mm(x * 3.0, w * w)

    args = (torch.randn(64, 16, dtype=DT), torch.randn(16, 64, dtype=DT))
    gm = record(stays, list(args))
    simplify(gm, inexact=True)
    assert len(_scalings(gm, 1024)) == 2, gm.code
    assert_tree_close(gm(*args), stays(*args))


_FACTORS = [2.0, -1.0, 0.5, 3, -2.0, 1e-3]
#: what pass 14 rewrites and what stops it: ``(a, b, c, w, n)`` -> a new value
_FACTOR_OPS = [
    lambda a, b, c, w, n: a * c, lambda a, b, c, w, n: -a, lambda a, b, c, w, n: a / c,
    lambda a, b, c, w, n: torch.mm(a, w), lambda a, b, c, w, n: torch.mm(w.t(), a),
    lambda a, b, c, w, n: a.sum(0, keepdim=True).expand(n, n) * b,
    lambda a, b, c, w, n: aten.add.Tensor(a, b, alpha=c),
    lambda a, b, c, w, n: aten.sub.Tensor(a, b, alpha=c),
    lambda a, b, c, w, n: torch.addcmul(a, b, a, value=c), lambda a, b, c, w, n: torch.tanh(a),
    lambda a, b, c, w, n: a.t().reshape(n, n) * c, lambda a, b, c, w, n: a * b,
    lambda a, b, c, w, n: torch.cat([a[: n // 2], b[n // 2:]], 0),
    lambda a, b, c, w, n: aten.tanh_backward.default(a, torch.tanh(b)),
    lambda a, b, c, w, n: a.sum(1)[:, None] + b,
    lambda a, b, c, w, n: aten.add.Tensor(a * c, torch.mm(b, w)),
    lambda a, b, c, w, n: torch.addcmul(a * c, b, w).sum(0, keepdim=True) - a,
]


def _factor_program(ops: list[tuple[int, int, int, int]], n: int):
    """A random graph of :data:`_FACTOR_OPS` reading earlier values by index; some values are
    outputs, some through a scaled sum."""
    def f(x: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vals, outs = [x, u], []
        for k, i, j, ci in ops:
            c = _FACTORS[ci]
            v = _FACTOR_OPS[k](vals[i % len(vals)], vals[j % len(vals)], c, w, n)
            vals.append(v)
            if (i + j) % 4 == 0:
                outs.append(v.sum(0) * c if k % 2 else v)
        return (*outs, vals[-1])
    return f


@settings(deadline=None, derandomize=True, database=None, max_examples=150)
@given(st.lists(st.tuples(st.integers(0, len(_FACTOR_OPS) - 1), st.integers(0, 20),
                          st.integers(0, 20), st.integers(0, len(_FACTORS) - 1)),
                min_size=2, max_size=12),
       st.sampled_from([4, 6]))
def test_scalar_factors_on_random_graphs_keep_values_and_gradients(ops, n):
    """Pass 14 on random graphs of factors, products, sums, sums with coefficients and their
    readers (float64): the values and the gradient of the simplified graph are the graph's."""
    g = torch.Generator().manual_seed(len(ops))
    args = [torch.randn(n, n, generator=g, dtype=DT) for _ in range(3)]
    f = _factor_program(ops, n)
    gm = simplify(record(f, list(args)), inexact=True)
    assert_tree_close(gm(*args), f(*args), rtol=1e-10, atol=1e-10)
    loss = lambda x, fn: sum(o.sin().sum() for o in fn(x, *args[1:]))  # noqa: E731
    assert_tree_close(grad(loss)(args[0], gm), grad(loss)(args[0], f), rtol=1e-9, atol=1e-9)


def test_mutating_graph_is_left_alone():
    def fn(x):
        y = x.view(x.shape)
        y.add_(1.0)
        return y * 1.0

    gm = record(fn, [torch.randn(3)])
    before = [(n.op, n.target) for n in gm.graph.nodes]
    simplify(gm)
    assert [(n.op, n.target) for n in gm.graph.nodes] == before


def test_vmap_and_grad_of_a_simplified_graph():
    def fn(x):
        y = x.view(2, 3).view(6).unsqueeze(0).squeeze(0) * 1.0
        z = y.reshape(3, 2).t().t()
        return (z.tanh() * z.tanh()).sum() + (y - 0).sin().sum()

    gm = _simplified(fn, torch.randn(6, dtype=DT))
    xs = torch.randn(5, 6, dtype=DT)
    _bitwise(vmap(gm)(xs), vmap(fn)(xs))
    _bitwise(vmap(grad(gm))(xs), vmap(grad(fn))(xs))
    _bitwise(vmap(gm, in_dims=1)(xs.t()), vmap(fn, in_dims=1)(xs.t()))


# ----------------------------------------------------------------------- end to end
def _mlp(sizes: list[int], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b, dtype=DT), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


_NET = _mlp([3, 8, 8, 1])
_CONV = torch.nn.Conv1d(2, 3, 3, dtype=DT)


def _mlp_f(x):
    return _NET(x).squeeze(-1)


def _views(x):
    y = x.view(2, 2).t().reshape(4).unsqueeze(0).permute(1, 0).squeeze(1)
    return (y * y.roll(1)).sin().sum() * 1.0 + y[0] - 0


def _conv(x):
    return _CONV(x.view(1, 2, 3).expand(1, 2, 3).repeat(1, 1, 2)).tanh().sum()


def _softmax(x):
    return (F.softmax(x.view(2, 2), -1) * x.view(2, 2).permute(1, 0)).sum()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_tanh_mlp_orders(k):
    x = torch.randn(3, dtype=DT)
    assert_tree_close(xafunc.xderiv(_mlp_f, k)(x), reference_deriv(_mlp_f, k)(x))


@pytest.mark.parametrize("f,n", [(_views, 4), (_conv, 6), (_softmax, 4)],
                         ids=["views", "conv", "softmax"])
@pytest.mark.parametrize("k", [2, 3])
def test_functions(f, n, k):
    x = torch.randn(n, dtype=DT)
    assert_tree_close(xafunc.xderiv(f, k)(x), reference_deriv(f, k)(x))


@pytest.mark.parametrize("f,n", [(_mlp_f, 3), (_views, 4), (_softmax, 4)],
                         ids=["mlp", "views", "softmax"])
def test_under_vmap_and_grad(f, n):
    xs = torch.randn(5, n, dtype=DT)
    assert_tree_close(vmap(xafunc.xderiv(f, 2))(xs), vmap(reference_deriv(f, 2))(xs))
    assert_tree_close(vmap(xafunc.xhessian(f))(xs), vmap(jacrev(jacrev(f)))(xs))

    def trace_h(g):
        return lambda x: torch.diagonal(g(x)).sum()

    x = xs[0]
    assert_tree_close(grad(trace_h(xafunc.xhessian(f)))(x),
                      grad(trace_h(jacrev(jacrev(f))))(x))


def test_compiled_graph_shrinks(monkeypatch):
    import xafunc._engine.program as program

    monkeypatch.setattr(program, "adjoint_candidate", lambda *args: None)  # Taylor mode here
    net = _mlp([3, 64, 64, 64, 1])

    def f(x):
        return net(x).squeeze(-1)

    def compiled(g):
        xafunc.clear_cache()
        g(x)
        (entry,) = CACHE.entries(f)
        (plan,) = entry.plans.values()
        return plan.program._compiled[(0, 3)]

    x = torch.randn(3, dtype=DT)
    gm = compiled(xafunc.xderiv(f, 3))
    with monkeypatch.context() as m:
        m.setattr(compile_mod, "simplify", lambda gm, **kwargs: gm)
        raw = compiled(xafunc.xderiv(f, 3))
    # trace() already removes dead code, so the raw graph has none; the peephole passes
    # (reshape chains, identities, CSE) still remove some of what is left (131 -> 119 ops,
    # a layout copy of the output included)
    assert len(_ops(gm)) < 0.95 * len(_ops(raw)), (len(_ops(gm)), len(_ops(raw)))
    # nothing dead, no detach/alias left, no reshape of a reshape
    reshapes = {aten.reshape.default, aten.view.default, aten.squeeze.dims,
                aten.unsqueeze.default}
    for node in gm.graph.nodes:
        assert node.op in ("output", "placeholder") or node.users or \
            node.target is operator.getitem
        assert node.target not in (aten.alias.default, aten.detach.default)
        if node.target in reshapes:
            assert getattr(node.args[0], "target", None) not in reshapes
    # passes 9-10 (inexact=True for derivative graphs) may round differently in the last place
    weights = CACHE.lookup(f, (x,), {})[1]  # the network's weights are graph inputs
    assert_tree_close(gm(x, *weights), raw(x, *weights))
