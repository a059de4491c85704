"""Gradients through compiled graphs with backward graphs (NOTE [Backward graphs]).

On a GPU, under ``torch.func.grad``/``vjp``/``jacrev`` and under autograd, a compiled graph is
applied as one ``autograd.Function``: its forward by the plain fast path, its backward by a
second compiled graph (the vector-Jacobian product, traced once), both replayed. These tests
run that path on every device (``BACKWARD_GRAPHS = "always"``; on a CPU it is not the default,
which one test checks), prove it ran (counted by ``BackwardStats``) and that every composition
a user writes around it -- first and second derivatives, ``jacrev`` of ``grad``, ``hessian``
(forward over reverse), ``vmap`` over cotangents, a double backward by plain autograd --
equals the same computation by nested torch.func (float64), including the compositions that
differentiate the backward graph itself, which must never be differentiated through its own
operators.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vjp, vmap

import xafunc
from tests._compare import assert_tree_close
from xafunc import xderiv, xjacobian, xlaplacian
from xafunc._execute import executable
from xafunc._execute.executable import BackwardStats

F64 = torch.float64
RTOL, ATOL = 1e-9, 1e-12


def _net(width: int = 8, seed: int = 0) -> torch.nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(),
                              torch.nn.Linear(width, width), torch.nn.Tanh(),
                              torch.nn.Linear(width, 1)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(p.shape[-1]))
    return net


NET = _net()
POINTS = torch.rand(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def u(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return functional_call(NET, p, (x,))


def params(device: str = "cpu") -> dict[str, Tensor]:
    return {k: v.detach().to(device) for k, v in NET.named_parameters()}


def _lap_ref(p: dict[str, Tensor], x: Tensor) -> Tensor:
    h = jacrev(jacrev(u, argnums=1), argnums=1)(p, x)  # (1, 2, 2)
    return h.diagonal(dim1=-2, dim2=-1).sum(-1)


def _loss(residual, device: str = "cpu") -> object:  # type: ignore[no-untyped-def]
    points = POINTS.to(device)
    return lambda p: vmap(residual, in_dims=(None, 0))(p, points).pow(2).mean()


XAFUNC_LOSS = _loss(xlaplacian(u, argnums=1))
REF_LOSS = _loss(_lap_ref)


@pytest.fixture(autouse=True)
def _backward_graphs_everywhere(request, monkeypatch):  # type: ignore[no-untyped-def]
    if "default_policy" not in request.node.name:
        monkeypatch.setattr(executable, "BACKWARD_GRAPHS", "always")


def _counted(fn):  # type: ignore[no-untyped-def]
    """``fn()`` and how many backward graphs ran while it did."""
    before = BackwardStats.calls
    out = fn()
    return out, BackwardStats.calls - before


@pytest.mark.parametrize("device", DEVICES)
def test_grad_runs_a_backward_graph_and_matches_torch_func(device: str) -> None:
    p = params(device)
    xloss = _loss(xlaplacian(u, argnums=1), device)
    rloss = _loss(_lap_ref, device)
    got, ran = _counted(lambda: grad(xloss)(p))
    assert ran >= 1
    assert_tree_close(got, grad(rloss)(p), rtol=RTOL, atol=ATOL)
    # and on later calls (cached graphs; replayed from the third on a GPU), with changed
    # weights
    for scale in (1.1, 0.9, 1.3):
        p2 = {k: v * scale for k, v in p.items()}
        assert_tree_close(grad(xloss)(p2), grad(rloss)(p2), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_module_training_steps_match_torch_func(device: str) -> None:
    """``loss.backward()`` on the module's own parameters, SGD steps (on a GPU through the
    backward graph, both graphs replayed), against the same steps by nested torch.func."""
    net_x, net_r = _net().to(device), _net().to(device)
    points = POINTS.to(device)
    lap_x = vmap(xlaplacian(lambda x: net_x(x)), in_dims=0)
    opt_x = torch.optim.SGD(net_x.parameters(), lr=0.05)
    opt_r = torch.optim.SGD(net_r.parameters(), lr=0.05)

    def lap_r(x: Tensor) -> Tensor:
        h = jacrev(jacrev(lambda z: net_r(z)))(x)
        return h.diagonal(dim1=-2, dim2=-1).sum(-1)

    before = BackwardStats.calls
    for _ in range(5):
        for opt, lap in ((opt_x, lap_x), (opt_r, vmap(lap_r))):
            opt.zero_grad()
            lap(points).pow(2).mean().backward()
            opt.step()
        assert_tree_close(dict(net_x.named_parameters()), dict(net_r.named_parameters()),
                          rtol=RTOL, atol=ATOL)
    assert BackwardStats.calls > before


@pytest.mark.parametrize("device", DEVICES)
def test_default_policy_uses_backward_graphs_on_the_gpu_only(device: str) -> None:
    """By default a GPU runs backward graphs (replayed); a CPU runs the forward recorded
    operator by operator instead, which is faster there (no recomputation)."""
    p = params(device)
    xloss = _loss(xlaplacian(u, argnums=1), device)
    got, ran = _counted(lambda: grad(xloss)(p))
    assert (ran > 0) == (device == "cuda")
    assert_tree_close(got, grad(_loss(_lap_ref, device))(p), rtol=RTOL, atol=ATOL)
    net = _net().to(device)
    _, ran = _counted(lambda: vmap(xlaplacian(lambda x: net(x)))(POINTS.to(device))
                      .pow(2).mean().backward())
    assert (ran > 0) == (device == "cuda")


def test_jacrev_over_a_vmapped_residual() -> None:
    """One jacrev: the backward graph runs under jacrev's vmap over the cotangents."""
    p = params()
    xres = vmap(xlaplacian(u, argnums=1), in_dims=(None, 0))
    rres = vmap(_lap_ref, in_dims=(None, 0))
    assert_tree_close(jacrev(xres)(p, POINTS), jacrev(rres)(p, POINTS), rtol=RTOL, atol=ATOL)


def _scaled_loss(loss):  # type: ignore[no-untyped-def]
    """A loss of two scalars ``(a, b)`` scaling the first and last weights."""
    p0 = params()

    def f(ab: Tensor) -> Tensor:
        p = dict(p0)
        p["0.weight"] = p0["0.weight"] * ab[0]
        p["4.weight"] = p0["4.weight"] * ab[1]
        return loss(p)

    return f


AB = torch.tensor([0.9, 1.2], dtype=F64)


@pytest.mark.parametrize("second", ["jacrev(grad)", "grad(grad)", "hessian", "jacfwd(grad)"])
def test_second_derivatives_differentiate_the_backward_graph_correctly(second: str) -> None:
    """Second derivatives whose outer level differentiates the backward graph: the answer
    must come from a differentiable formulation, never from the traced backward operators
    (whose saved values are detached)."""
    fx, fr = _scaled_loss(XAFUNC_LOSS), _scaled_loss(REF_LOSS)
    if second == "jacrev(grad)":
        got, want = jacrev(grad(fx))(AB), jacrev(grad(fr))(AB)
    elif second == "grad(grad)":
        got = grad(lambda ab: grad(fx)(ab)[0])(AB)
        want = grad(lambda ab: grad(fr)(ab)[0])(AB)
    elif second == "hessian":
        got, want = hessian(fx)(AB), hessian(fr)(AB)
    else:
        got, want = jacfwd(grad(fx))(AB), jacfwd(grad(fr))(AB)
    assert_tree_close(got, want, rtol=RTOL, atol=ATOL)


def test_double_backward_by_plain_autograd_over_grad() -> None:
    """``torch.func.grad`` inside, ``loss.backward()`` outside (a gradient penalty)."""
    ab_x = AB.clone().requires_grad_()
    ab_r = AB.clone().requires_grad_()
    gx = grad(_scaled_loss(XAFUNC_LOSS))(ab_x)
    gr = grad(_scaled_loss(REF_LOSS))(ab_r)
    gx.pow(2).sum().backward()
    gr.pow(2).sum().backward()
    assert_tree_close(ab_x.grad, ab_r.grad, rtol=RTOL, atol=ATOL)


def test_vjp_with_a_cotangent_and_an_unused_input() -> None:
    """``vjp`` of a two-output function where one input reaches only one output."""
    def fx(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        j = xjacobian(lambda z: torch.tanh(z * w).sum(), argnums=0)(x)
        return j, x.sum() * 2.0

    def fr(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        j = jacrev(lambda z: torch.tanh(z * w).sum(), argnums=0)(x)
        return j, x.sum() * 2.0

    x = torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(3))
    w = torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(4))
    cot = (torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(5)),
           torch.tensor(0.7, dtype=F64))
    (_, px), (_, pr) = vjp(fx, x, w), vjp(fr, x, w)
    assert_tree_close(px(cot), pr(cot), rtol=RTOL, atol=ATOL)


def test_third_order_residual_under_grad() -> None:
    p = params()

    def res_x(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return xderiv(u, 3, argnums=1)(p, x)[..., 0, 0, 0]

    def res_r(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return jacrev(jacrev(jacrev(u, argnums=1), argnums=1), argnums=1)(p, x)[..., 0, 0, 0]

    got, ran = _counted(lambda: grad(_loss(res_x))(p))
    assert ran >= 1
    assert_tree_close(got, grad(_loss(res_r))(p), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_penalty_by_plain_double_backward(device: str) -> None:
    """``autograd.grad(..., create_graph=True)`` then ``backward()`` of the gradient's norm,
    all by plain autograd on an ``nn.Module``: the backward graph is differentiated in turn."""
    net_x, net_r = _net().to(device), _net().to(device)
    points = POINTS.to(device)

    def lap_r(x: Tensor) -> Tensor:
        h = jacrev(jacrev(lambda z: net_r(z)))(x)
        return h.diagonal(dim1=-2, dim2=-1).sum(-1)

    for net, lap in ((net_x, vmap(xlaplacian(lambda x: net_x(x)))), (net_r, vmap(lap_r))):
        loss = lap(points).pow(2).mean()
        # the last bias does not reach a Laplacian
        g = torch.autograd.grad(loss, list(net.parameters()), create_graph=True,
                                allow_unused=True)
        sum(t.pow(2).sum() for t in g if t is not None).backward()
    # the last bias's gradient stays None, as torch's does
    assert net_x[-1].bias.grad is None and net_r[-1].bias.grad is None
    assert_tree_close([p.grad for p in list(net_x.parameters())[:-1]],
                      [p.grad for p in list(net_r.parameters())[:-1]], rtol=RTOL, atol=ATOL)


def test_the_plan_says_when_backward_graphs_ran() -> None:
    net = _net()

    def f(z: Tensor) -> Tensor:
        return net(z)

    before = str(xafunc.plan(f, 3)(POINTS[0])).splitlines()[-1]
    assert "backward graphs" not in before
    vmap(xderiv(f, 3))(POINTS)[..., 0, 0, 0].pow(2).mean().backward()
    assert "compiled backward graphs" in str(xafunc.plan(f, 3)(POINTS[0])).splitlines()[-1]


def test_grad_levels_apply_the_graph_without_functorchs_generated_function(monkeypatch
                                                                           ) -> None:
    """NOTE [Grad levels without a generated Function]: under ``grad`` (and ``grad`` of
    ``grad``) the graph's Function is applied at each level by xafunc's own single-level
    Function -- functorch's generic path, which generates a class per call, is made to raise
    here -- with the same gradients as nested torch.func, an auxiliary output that is the
    input itself included."""
    import torch._functorch.autograd_function as functorch_af

    def generic(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("functorch's generic custom-Function path ran")

    monkeypatch.setattr(functorch_af, "generate_single_level_function", generic)
    p = params()
    got, ran = _counted(lambda: grad(XAFUNC_LOSS)(p))
    assert ran >= 1
    assert_tree_close(got, grad(REF_LOSS)(p), rtol=RTOL, atol=ATOL)
    fx, fr = _scaled_loss(XAFUNC_LOSS), _scaled_loss(REF_LOSS)
    assert_tree_close(grad(lambda ab: grad(fx)(ab)[0])(AB),
                      grad(lambda ab: grad(fr)(ab)[0])(AB), rtol=RTOL, atol=ATOL)

    def with_aux(x: Tensor) -> tuple[Tensor, Tensor]:
        return (x.sin() * x).sum(), x

    def loss_x(x: Tensor) -> Tensor:
        d, aux = xderiv(with_aux, 1, has_aux=True)(x)
        return (d * aux).sum()

    def loss_r(x: Tensor) -> Tensor:
        d, aux = jacrev(with_aux, has_aux=True)(x)
        return (d * aux).sum()

    x = torch.tensor([0.3, -1.1, 0.8], dtype=F64)
    assert_tree_close(grad(loss_x)(x), grad(loss_r)(x), rtol=RTOL, atol=ATOL)
