"""Second and third derivatives by forward tangents and adjoints (NOTE [Derivatives by
adjoints], xafunc/_engine/adjoint.py).

The schedule is forced (every other candidate priced out) where the cost model would not pick
it, so that each kind of nonlinear node -- pointwise functions of one moving input (the product
form), products of two moving factors, reductions, multi-input functions (the directional form)
-- is checked against nested ``jacrev`` in float64; the default choice, the graph it runs and
training through it are checked on the MLPs the schedule is for.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import xafunc
from tests._compare import assert_tree_close, reference_deriv
from xafunc._capture.cache import CACHE

F64 = torch.float64
g = torch.Generator().manual_seed(0)
W1 = torch.randn(12, 5, generator=g, dtype=F64) / 2
W2 = torch.randn(12, 12, generator=g, dtype=F64) / 4
W3 = torch.randn(3, 12, generator=g, dtype=F64) / 3


def _layer_norm_by_hand(h: torch.Tensor) -> torch.Tensor:
    c = h - h.mean()
    return c / torch.sqrt((c * c).mean() + 1e-5)


FUNCS = {
    "tanh_mlp": lambda x: W3 @ torch.tanh(W2 @ torch.tanh(W1 @ x)),
    "scalar_sin": lambda x: (W3[0] * torch.tanh(W2 @ torch.sin(W1 @ x + 0.3))).sum(),
    "silu": lambda x: W3 @ ((W1 @ x) * torch.sigmoid(W1 @ x)),  # a product of two moving
    "gelu": lambda x: W3 @ F.gelu(W1 @ x),
    "powers": lambda x: (x * x * x).sum() + x[0] * x[1] * x[2] + (x ** 4).sum(),
    "division": lambda x: (1 / (1 + (W1 @ x) ** 2)).sum() + torch.exp(-(W1 @ x)).mean(),
    "log_pow": lambda x: torch.log1p((W1 @ x) ** 2).sum() + torch.sqrt(2 + (W1 @ x).cos()).sum(),
    "softmax": lambda x: torch.softmax(W1 @ x, 0) @ torch.arange(12.0, dtype=F64),
    "broadcast_const": lambda x: (torch.tanh(W1[:, :1] * x + W1[:, 1:2]) * W2[:, :5]).sum(0),
    "matrix_product": lambda x: torch.tanh(x.reshape(5, 1) @ x.reshape(1, 5) @ W1.T).sum(),
    "stop_gradient": lambda x: (torch.tanh(W1 @ x) * torch.tanh(W1 @ x).detach()).sum(),
    "piecewise": lambda x: (torch.relu(W1 @ x) ** 2).sum() + torch.amax(torch.tanh(W1 @ x)),
    "var": lambda x: torch.var(torch.sin(W1 @ x)) * (W1 @ x).prod(),
}


@pytest.fixture
def adjoint_only(only_schedule):
    """Price every other candidate out, so the adjoint schedule runs wherever it applies."""
    only_schedule("adjoint")


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("name", list(FUNCS))
def test_every_kind_of_node_against_nested_jacrev(adjoint_only, name, order):
    f = FUNCS[name]
    x = torch.linspace(-0.8, 0.9, 5, dtype=F64)
    xs = torch.stack([x, x.flip(0), 0.5 * x])
    with xafunc.strict():
        plan = xafunc.plan(f, order)(x)
        got = xafunc.xderiv(f, order)(x)
        batched = vmap(xafunc.xderiv(f, order))(xs)
    assert plan.schedule[0] == "adjoint", str(plan)
    assert_tree_close(got, reference_deriv(f, order)(x))
    assert_tree_close(batched, vmap(reference_deriv(f, order))(xs))


@pytest.mark.parametrize("order", [2, 3])
def test_each_form_on_each_device(adjoint_only, device, order):
    """The pointwise, product and directional forms where the tensors live (CUDA too)."""
    w1, w3 = W1.to(device), W3.to(device)
    funcs = [lambda x: w3 @ torch.tanh(w1 @ x),
             lambda x: w3 @ ((w1 @ x) * torch.sigmoid(w1 @ x)),
             lambda x: torch.softmax(w1 @ x, 0) @ w3[0]]
    x = torch.linspace(-0.8, 0.9, 5, dtype=F64, device=device)
    xs = torch.stack([x, x.flip(0)])
    for f in funcs:
        with xafunc.strict():
            plan = xafunc.plan(f, order)(x)
            got = [xafunc.xderiv(f, order)(x) for _ in range(4)]  # CUDA: replayed from call 3
            batched = vmap(xafunc.xderiv(f, order))(xs)
        assert plan.schedule[0] == "adjoint", str(plan)
        for g in got:
            assert_tree_close(g, reference_deriv(f, order)(x))
        assert_tree_close(batched, vmap(reference_deriv(f, order))(xs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_replayed_as_a_cuda_graph(adjoint_only):
    """The traced reverse sweep reads the Python numbers autograd saved (``-0.5 * ...``) as
    CPU constants: they move to the GPU, and the graph is replayed (the coupling flow of the
    zoo was not, on an H100)."""
    from xafunc._execute.cuda_graph import ReplayStats

    w1, w3 = W1.cuda(), W3.cuda()

    def f(x):
        y = torch.tanh(w1 @ x)
        return -0.5 * (y * y).sum() - 0.5 * 12 * math.log(2 * math.pi) + (w3 @ y).sum()

    before = ReplayStats.replays
    xs = [torch.linspace(-0.8, 0.9 - i / 10, 5, dtype=F64, device="cuda") for i in range(5)]
    with xafunc.strict():
        assert xafunc.plan(f, 2)(xs[0]).schedule[0] == "adjoint"
        outs = [xafunc.xhessian(f)(x) for x in xs]
    assert ReplayStats.replays > before
    for x, out in zip(xs, outs):
        assert_tree_close(out, reference_deriv(f, 2)(x))


@pytest.mark.parametrize("order", [2, 3])
def test_layer_norm_against_a_hand_written_oracle(adjoint_only, order):
    """torch's nested ``jacrev`` of ``layer_norm`` is wrong from order 3: the oracle spells
    the normalisation out."""
    x = torch.linspace(-0.8, 0.9, 5, dtype=F64)
    with xafunc.strict():
        got = xafunc.xderiv(lambda x: F.layer_norm(W1 @ x, (12,)) @ W3[1], order)(x)
    assert_tree_close(got, reference_deriv(lambda x: _layer_norm_by_hand(W1 @ x) @ W3[1],
                                           order)(x))


@pytest.mark.parametrize("order", [2, 3])
def test_pytree_arguments_and_aux(adjoint_only, order):
    """Two differentiated leaves (one a matrix), a constant argument and ``has_aux``: the
    result keeps nested ``jacrev``'s structure."""
    def f(a, b, c):
        h = torch.tanh(W1[:, :3] @ a + (W1[:, 3:] * b.sum(0)).sum(1) + c)
        return W3 @ h, {"h": h}

    a = torch.linspace(-0.5, 0.5, 3, dtype=F64)
    b = torch.linspace(0.1, 0.6, 4, dtype=F64).reshape(2, 2)
    c = torch.full((12,), 0.2, dtype=F64)
    with xafunc.strict():
        got, aux = xafunc.xderiv(f, order, argnums=(0, 1), has_aux=True)(a, b, c)
    want = reference_deriv(lambda a, b: f(a, b, c)[0], order, argnums=(0, 1))(a, b)
    assert_tree_close(got, want)
    assert_tree_close(aux, f(a, b, c)[1])


def _mlp(widths: list[int]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (p, q) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(p, q))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(F64)


@pytest.mark.parametrize("order", [2, 3])
def test_chosen_for_an_mlp_and_the_products_it_runs(order):
    """In 8 inputs the cost model picks the schedule. Every product with the hidden 32 x 32
    weight runs on at most ``n = 8`` rows: the ``C(9, 2) = 36`` second-order directions of
    Taylor mode over a reverse level never meet it (order 3), and a Hessian pushes the 8
    tangents through it once (forward), not also the reverse sweep's (forward-over-reverse)."""
    net = _mlp([8, 32, 32, 1])

    def f(x):
        return net(x).squeeze(-1)

    x = torch.linspace(-1, 1, 8, dtype=F64)
    xafunc.clear_cache()
    with xafunc.strict():
        got = xafunc.xderiv(f, order)(x)
    (entry,) = CACHE.entries(f)
    (plan,) = entry.plans.values()
    assert plan.schedule == ("adjoint", "rev", "fwd"), str(plan)
    assert "NOTE [Derivatives by adjoints]" in str(plan)
    assert_tree_close(got, reference_deriv(f, order)(x))
    graph = plan.program._compiled[("adjoint",)].graph
    rows = []
    for node in graph.nodes:
        if node.op != "call_function" or "mm" not in str(node.target):
            continue
        shapes = [tuple(a.meta["val"].shape) for a in node.all_input_nodes
                  if isinstance(a.meta.get("val"), torch.Tensor)]
        if (32, 32) in shapes:
            rows += [s[0] for s in shapes if len(s) == 2 and s != (32, 32)]
    assert rows and max(rows) <= 8, rows
    if order == 2:
        assert sum(r > 1 for r in rows) == 1, rows


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("api", ["backward", "func_grad"])
def test_training_through_it_matches_torch_func(api, order):
    """A PINN residual ``sum C . D^K u``: the parameter gradient by ``.backward()`` on the
    module and by ``torch.func.grad`` over ``functional_call`` equals nested torch.func's."""
    net = _mlp([3, 16, 16, 1])
    C = torch.randn((3,) * order, dtype=F64, generator=torch.Generator().manual_seed(1))
    x = torch.rand(6, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    params = {k: v.detach() for k, v in net.named_parameters()}
    eq = "bo" + "ijk"[:order] + "," + "ijk"[:order] + "->b"

    def u(p, z):
        return functional_call(net, p, (z,))

    def loss(dk):
        return lambda p: torch.einsum(eq, vmap(dk, in_dims=(None, 0))(p, x), C).pow(2).mean()

    want = grad(loss(reference_deriv(u, order, argnums=1)))(params)
    xafunc.clear_cache()
    with xafunc.strict():
        dk = xafunc.xderiv(u, order, argnums=1)
        if api == "func_grad":
            got = grad(loss(dk))(params)
        else:
            for p in net.parameters():
                p.grad = None
            loss(dk)(dict(net.named_parameters())).backward()
            got = {k: torch.zeros_like(p) if p.grad is None else p.grad  # the last bias
                   for k, p in net.named_parameters()}
        plan = xafunc.plan(u, order, argnums=1)(params, x[0])
    assert plan.schedule[0] == "adjoint", str(plan)
    assert_tree_close(got, want)


def test_not_a_candidate_for_other_orders_or_chunked_requests():
    net = _mlp([8, 16, 1])

    def f(x):
        return net(x).squeeze(-1)

    x = torch.linspace(-1, 1, 8, dtype=F64)
    for order, kwargs in ((1, {}), (4, {}), (3, {"chunk_size": 5}), (2, {"chunk_size": 5})):
        text = str(xafunc.plan(f, order, **kwargs)(x))
        assert "adjoint" not in text, (order, kwargs, text)
