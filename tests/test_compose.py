"""Composability with torch.func: vmap, grad, jacrev, jacfwd, functional_call; no mutation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

from tests._compare import assert_tree_close, assert_tree_equal, clone_tree, reference_deriv
from xafunc import xderiv, xderivs, xhessian, xjacobian

F64 = torch.float64


def rnd(*shape, seed=0, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(device)


def mlp(params, x):
    h = torch.tanh(params["w1"] @ x + params["b1"])
    return torch.sin(params["w2"] @ h + params["b2"])  # (2,)


def make_params(device="cpu", seed=0):
    return {"w1": rnd(3, 2, seed=seed, device=device), "b1": rnd(3, seed=seed + 1, device=device),
            "w2": rnd(2, 3, seed=seed + 2, device=device),
            "b2": rnd(2, seed=seed + 3, device=device)}


def stack_trees(trees):
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


def index_tree(tree, i):
    return {k: v[i] for k, v in tree.items()}


# --------------------------------------------------------------------------------------------
# vmap
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_vmap_over_inputs_equals_loop(mode, device):
    params, xs = make_params(device), rnd(4, 2, seed=9, device=device)
    d3 = xderiv(mlp, 3, argnums=1, mode=mode)
    batched = vmap(d3, in_dims=(None, 0))(params, xs)
    looped = torch.stack([d3(params, x) for x in xs])
    assert batched.shape == (4, 2, 2, 2, 2)
    assert_tree_close(batched, looped)
    assert_tree_close(batched, torch.stack([reference_deriv(mlp, 3, 1)(params, x) for x in xs]))


def test_vmap_over_params_derivative():
    """Per-sample third derivatives w.r.t. the parameters dict (a nested dict result)."""
    params, xs = make_params(), rnd(3, 2, seed=9)
    d = xderiv(lambda p, x: mlp(p, x).sum(), 2, argnums=0)
    batched = vmap(d, in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        expected = reference_deriv(lambda p, x: mlp(p, x).sum(), 2, 0)(params, x)
        assert_tree_close({k: {k2: v2[i] for k2, v2 in v.items()} for k, v in batched.items()},
                          expected, msg=f"sample {i}")


def test_vmap_over_params_and_inputs_together(device):
    ps = [make_params(device, seed=10 * i) for i in range(3)]
    stacked, xs = stack_trees(ps), rnd(3, 2, seed=5, device=device)
    d2 = xhessian(mlp, argnums=1)
    batched = vmap(d2, in_dims=(0, 0))(stacked, xs)
    for i in range(3):
        assert_tree_close(batched[i], reference_deriv(mlp, 2, 1)(ps[i], xs[i]), msg=f"i={i}")
    # ... and a derivative w.r.t. the batched params themselves
    dp = vmap(xjacobian(mlp, argnums=0), in_dims=(0, 0))(stacked, xs)
    for i in range(3):
        assert_tree_close(index_tree(dp, i), reference_deriv(mlp, 1, 0)(ps[i], xs[i]),
                          msg=f"i={i}")


def test_nested_vmap():
    params = make_params()
    xs = rnd(2, 3, 2, seed=6)
    f = xderiv(mlp, 2, argnums=1)
    out = vmap(vmap(f, in_dims=(None, 0)), in_dims=(None, 0))(params, xs)
    assert out.shape == (2, 3, 2, 2, 2)
    for i in range(2):
        for j in range(3):
            assert_tree_close(out[i, j], reference_deriv(mlp, 2, 1)(params, xs[i, j]))


@pytest.mark.parametrize("request_", ["xjacobian", "xhessian", "xderivs", "xlaplacian",
                                      "xbiharmonic", "nested"])
def test_vmap_over_an_empty_batch(request_):
    """``vmap`` over zero samples returns torch.func's empty results (shapes, dtypes, pytree),
    before and after the same transform has run on a non-empty batch, under strict mode: there
    is nothing to compute, so it is not a fallback."""
    import xafunc

    params = make_params()
    g = lambda x: mlp(params, x).sum()  # noqa: E731
    ours, theirs = {
        "xjacobian": (xjacobian(g), jacrev(g)),
        "xhessian": (xhessian(g), jacrev(jacrev(g))),
        "xderivs": (xderivs(g, 2), lambda x: (g(x), jacrev(g)(x), jacrev(jacrev(g))(x))),
        "xlaplacian": (xafunc.xlaplacian(g), lambda x: jacrev(jacrev(g))(x).trace()),
        "xbiharmonic": (xafunc.xbiharmonic(g),
                        lambda x: torch.einsum("iijj->", jacrev(jacrev(jacrev(jacrev(g))))(x))),
        "nested": (vmap(xhessian(g)), vmap(jacrev(jacrev(g)))),
    }[request_]
    for batch in ((0, 2), (3, 2), (0, 2)):
        xs = rnd(*batch, seed=4) if request_ != "nested" else rnd(2, *batch, seed=4)
        with xafunc.strict():
            got = vmap(ours)(xs)
        assert_tree_close(got, vmap(theirs)(xs), msg=f"batch {batch}")


def test_vmap_xderivs_and_tuple_argnums():
    params, xs, ws = make_params(), rnd(3, 2, seed=1), rnd(3, 2, seed=2)

    def g(x, w):
        return (mlp(params, x * w) * w.sum()).sum()

    out = vmap(xderivs(g, 2, argnums=(0, 1)))(xs, ws)
    for i in range(3):
        expected = (g(xs[i], ws[i]),) + tuple(
            reference_deriv(g, k, (0, 1))(xs[i], ws[i]) for k in (1, 2))
        got = torch.utils._pytree.tree_map(lambda v: v[i], out)  # noqa: B023
        assert_tree_close(got, expected, msg=f"i={i}")


def test_vmap_with_functional_call_module():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(F64)
    params = dict(model.named_parameters())
    f = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    xs = rnd(5, 2, seed=4)
    hs = vmap(xhessian(f, argnums=1), in_dims=(None, 0))(params, xs)
    assert hs.shape == (5, 1, 2, 2)
    for i in range(5):
        assert_tree_close(hs[i], reference_deriv(f, 2, 1)(params, xs[i]))


# --------------------------------------------------------------------------------------------
# nesting with torch.func and with itself
# --------------------------------------------------------------------------------------------


def scalar_f(x):
    return torch.sin(x).prod() + (x[0] * x.exp()).sum() * torch.tanh(x).sum()


@pytest.fixture
def x3():
    return rnd(3, seed=11, scale=0.8)


def test_xjacobian_of_xjacobian_is_hessian(x3):
    expected = reference_deriv(scalar_f, 2)(x3)
    assert_tree_close(xjacobian(xjacobian(scalar_f))(x3), expected)
    assert_tree_close(torch.func.hessian(scalar_f)(x3), expected)  # sanity of the oracle


def test_jacrev_of_xjacobian_is_hessian(x3):
    assert_tree_close(jacrev(xjacobian(scalar_f))(x3), reference_deriv(scalar_f, 2)(x3))


def test_jacfwd_of_xjacobian_is_hessian(x3):
    assert_tree_close(jacfwd(xjacobian(scalar_f))(x3), reference_deriv(scalar_f, 2)(x3))


def test_xjacobian_of_grad_is_hessian(x3):
    assert_tree_close(xjacobian(grad(scalar_f))(x3), reference_deriv(scalar_f, 2)(x3))


def test_xhessian_of_xjacobian_is_third_derivative(x3):
    assert_tree_close(xhessian(xjacobian(scalar_f))(x3), reference_deriv(scalar_f, 3)(x3))
    assert_tree_close(xjacobian(xhessian(scalar_f))(x3), reference_deriv(scalar_f, 3)(x3))


def test_jacrev_of_xderiv3_is_fourth(x3):
    assert_tree_close(jacrev(xderiv(scalar_f, 3))(x3), reference_deriv(scalar_f, 4)(x3))


def test_grad_of_xhessian_scalar_wrt_params():
    """grad w.r.t. params of a loss built from an input-Hessian (physics-informed style)."""
    params, x = make_params(), rnd(2, seed=12)

    def loss_x(p):
        h = xhessian(lambda p, x: mlp(p, x).sum(), argnums=1)(p, x)
        return (h.diagonal().sum() ** 2) + h[0, 1]

    def loss_ref(p):
        h = reference_deriv(lambda p, x: mlp(p, x).sum(), 2, 1)(p, x)
        return (h.diagonal().sum() ** 2) + h[0, 1]

    assert_tree_close(loss_x(params), loss_ref(params))
    assert_tree_close(grad(loss_x)(params), grad(loss_ref)(params))


def test_grad_of_xderiv3_scalar_wrt_weight_tensor():
    w, x = rnd(3, 2, seed=13), rnd(2, seed=14)
    f = lambda w, x: torch.tanh(w @ x).sum()  # noqa: E731
    lx = lambda w: xderiv(f, 3, argnums=1)(w, x).pow(2).sum()  # noqa: E731
    lr = lambda w: reference_deriv(f, 3, 1)(w, x).pow(2).sum()  # noqa: E731
    assert_tree_close(grad(lx)(w), grad(lr)(w))


def test_autograd_backward_through_xhessian():
    """Plain torch.autograd (requires_grad leaves, .backward()) through xhessian."""
    w = rnd(3, 2, seed=15).requires_grad_()
    x = rnd(2, seed=16)
    f = lambda w, x: torch.tanh(w @ x).sum()  # noqa: E731
    xhessian(f, argnums=1)(w, x).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    reference_deriv(f, 2, 1)(w2, x).sum().backward()
    assert_tree_close(w.grad, w2.grad)


def test_xderiv_inside_vmap_inside_grad():
    params, xs = make_params(), rnd(3, 2, seed=17)

    def loss(p, deriv):
        return vmap(deriv(lambda p, x: mlp(p, x)[0], 2, argnums=1), in_dims=(None, 0))(
            p, xs).pow(2).sum()

    assert_tree_close(grad(loss)(params, xderiv), grad(loss)(params, reference_deriv_kw))


def reference_deriv_kw(f, k, argnums):
    return reference_deriv(f, k, argnums)


# --------------------------------------------------------------------------------------------
# no mutation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse", "reference"])
def test_inputs_never_mutated(mode):
    params, x = make_params(), rnd(2, seed=18)
    before = clone_tree((params, x))
    xderiv(mlp, 3, argnums=(0, 1), mode=mode)(params, x)
    xderivs(mlp, 2, argnums=1, mode=mode)(params, x)
    vmap(xhessian(mlp, argnums=1, mode=mode), in_dims=(None, 0))(params, x.expand(2, 2))
    assert_tree_equal((params, x), before, msg="inputs were mutated")


def test_function_with_inplace_on_intermediate_does_not_touch_input():
    x = rnd(3, seed=19)
    before = x.clone()

    def f(x):
        y = x.clone()
        y.mul_(2).sin_()
        return y * x

    assert_tree_close(xderiv(f, 3)(x), reference_deriv(f, 3)(x))
    assert_tree_equal(x, before)
