"""``compile=True``: the plain fast path runs inductor's code (NOTE [Inductor executor]).

Each inductor compile takes seconds on a CPU, so the cases are few and tiny; every test proves
which executor ran through :class:`InductorStats` (compiles and compiled calls counted by the
executor itself) or the plan's ``execution`` line, and compares with nested ``jacrev``.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable

import pytest
import torch

import xafunc
from xafunc._execute.executable import InductorStats

from ._compare import assert_tree_close, reference_deriv


@pytest.fixture(scope="module", autouse=True)
def _inductor_works() -> None:
    """Skip the module where inductor cannot build code (no C++ compiler, no inductor)."""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("inductor needs a C++ compiler for CPU code; none found")
    try:
        from torch._inductor.compile_fx import compile_fx  # noqa: F401

        torch.compile(lambda t: t.sin() + 1, backend="inductor")(torch.ones(2))
    except Exception as e:  # noqa: BLE001 - any failure means: not on this machine
        pytest.skip(f"inductor cannot compile here: {type(e).__name__}: {e}")


def _mlp(requires_grad: bool = False) -> torch.nn.Module:
    """(Weights that require grad make every call under grad mode a training call.)"""
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1)).double().requires_grad_(requires_grad)


def _counts() -> tuple[int, int]:
    return InductorStats.compiles, InductorStats.calls


def test_order3_mlp_runs_inductor_once_and_matches_jacrev() -> None:
    net = _mlp()

    def f(x: torch.Tensor) -> torch.Tensor:
        return net(x).sum()

    x = torch.randn(3, dtype=torch.float64)
    expected = reference_deriv(f, 3)(x)
    compiles, calls = _counts()
    assert_tree_close(xafunc.xderiv(f, 3, compile=True)(x), expected)
    assert _counts() == (compiles + 1, calls + 1)
    execution = xafunc.plan(f, 3, compile=True)(x).execution
    assert execution is not None and execution.startswith(
        "inductor (compile=True), compiled in "), execution
    # same signature, new tensors: the compiled code runs again, nothing is recompiled
    x2 = torch.randn(3, dtype=torch.float64)
    assert_tree_close(xafunc.xderiv(f, 3, compile=True)(x2), reference_deriv(f, 3)(x2))
    assert _counts() == (compiles + 1, calls + 2)
    # an argument laid out otherwise is another signature (a function may read its strides):
    # captured and compiled once more, and that code serves every call with its layout
    for _ in range(2):
        x3 = torch.randn(6, dtype=torch.float64)[::2]
        assert_tree_close(xafunc.xderiv(f, 3, compile=True)(x3), reference_deriv(f, 3)(x3))
    assert _counts() == (compiles + 2, calls + 4)
    # without compile=True the same function is planned (and run) apart, by TorchScript
    assert "TorchScript" in (xafunc.plan(f, 3)(x).execution or "")
    xafunc.xderiv(f, 3)(x)
    assert _counts() == (compiles + 2, calls + 4)

    # inside the caller's own torch.compile region the transform is a graph break and its
    # plain call runs the code compiled above
    @torch.compile(backend="eager", fullgraph=False)
    def outer(x: torch.Tensor) -> torch.Tensor:
        return xafunc.xderiv(f, 3, compile=True)(x.cos()) * 2

    assert_tree_close(outer(x), reference_deriv(f, 3)(x.cos()) * 2)
    assert _counts() == (compiles + 2, calls + 5)


def test_hessian_under_vmap(device: str) -> None:
    """(On a GPU inductor generates Triton kernels: the same counts and values.)"""
    net = _mlp().to(device)

    def f(x: torch.Tensor) -> torch.Tensor:
        return net(x).sum()

    xs = torch.randn(4, 3, dtype=torch.float64, device=device)
    expected = torch.func.vmap(reference_deriv(f, 2))(xs)
    compiles, calls = _counts()
    hess = torch.func.vmap(xafunc.xhessian(f, compile=True))
    assert_tree_close(hess(xs), expected)
    assert _counts() == (compiles + 1, calls + 1)
    assert_tree_close(hess(xs + 0), expected)
    assert _counts() == (compiles + 1, calls + 2)


def test_xlaplacian() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() * x.sum()).exp()

    x = torch.randn(3, dtype=torch.float64)
    expected = reference_deriv(f, 2)(x).diagonal(dim1=1, dim2=2).sum(-1)
    compiles, calls = _counts()
    lap = xafunc.xlaplacian(f, compile=True)
    assert_tree_close(lap(x), expected)
    assert_tree_close(lap(x), expected)
    assert _counts() == (compiles + 1, calls + 2)


def test_jet_compiles_its_propagation() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.tanh() * x.sum()).sin()

    x, v = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    # along a line, the k-th output coefficient is D^k f[v, ..., v]
    expected = [torch.einsum("oi,i->o", reference_deriv(f, 1)(x), v),
                torch.einsum("oij,i,j->o", reference_deriv(f, 2)(x), v, v)]
    compiles, calls = _counts()
    for _ in range(2):
        y, series = xafunc.jet(f, (x,), ((v, None),), compile=True)
        assert_tree_close(y, f(x))
        assert_tree_close(list(series), expected)
    assert _counts() == (compiles + 1, calls + 2)


def _graphs_given_to_inductor(monkeypatch: pytest.MonkeyPatch) -> list[set[object]]:
    """The operators of each graph handed to ``compile_fx`` from now on, appended as it is."""
    import torch._inductor.compile_fx as cfx

    given: list[set[object]] = []
    real = cfx.compile_fx

    def spy(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        given.append({n.target for n in gm.graph.nodes if n.op == "call_function"})
        return real(gm, inputs)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    return given


def test_float32_tanh_is_compiled_as_cephes_tanhf(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTE [Inductor's tanh]: inductor gets the float32 graph without ``tanh`` (and the
    float64 one with it), and the values still match nested ``jacrev``."""
    given = _graphs_given_to_inductor(monkeypatch)
    net = _mlp()
    net32 = copy.deepcopy(net).float()

    def f(x: torch.Tensor) -> torch.Tensor:
        return net(x).sum()

    def f32(x: torch.Tensor) -> torch.Tensor:
        return net32(x).sum()

    xs = torch.randn(16, 3, dtype=torch.float64) * 2
    expected = torch.func.vmap(reference_deriv(f, 2))(xs)
    got = torch.func.vmap(xafunc.xhessian(f32, compile=True))(xs.float())
    assert_tree_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert given and torch.ops.aten.tanh.default not in given[-1]
    assert torch.ops.aten.copysign.Tensor in given[-1]
    xafunc.xhessian(f, compile=True)(xs[0])
    assert torch.ops.aten.tanh.default in given[-1]


def test_float32_training_graphs_take_tanh_as_cephes_with_tanh_backward(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTE [Inductor's tanh], training: the graph compiled for a ``loss.backward()`` step
    computes each float32 ``tanh`` by the formula in a Function whose backward is
    ``tanh_backward`` of its output (no ``aten.tanh`` left), and the parameter gradients match
    torch.func's float64 ones to float32 rounding. Far from zero, where the formula's own
    derivative would be ``inf / inf``, the gradient is ``tanh``'s."""
    from xafunc._execute.executable import _CephesTanh

    given = _graphs_given_to_inductor(monkeypatch)
    net = _mlp(requires_grad=True)
    net32 = copy.deepcopy(net).float()
    xs = torch.randn(6, 3, dtype=torch.float64)
    names = [k for k, _ in net.named_parameters() if k != "2.bias"]

    def loss(module: torch.nn.Module, compile: bool | None) -> torch.Tensor:
        def u(x: torch.Tensor) -> torch.Tensor:
            return module(x).squeeze(-1)

        if compile is None:
            hess = torch.func.vmap(reference_deriv(u, 2))(xs)
            return hess.diagonal(dim1=-2, dim2=-1).sum(-1).pow(2).mean()
        lap = torch.func.vmap(xafunc.xlaplacian(u, compile=compile))(xs.float())
        return lap.pow(2).mean()

    weights = dict(net.named_parameters())
    expected = torch.autograd.grad(loss(net, None), [weights[k] for k in names])
    weights32 = dict(net32.named_parameters())
    trained = InductorStats.autograd_calls
    for step in range(3):
        got = torch.autograd.grad(loss(net32, True), [weights32[k] for k in names])
        assert_tree_close([g.double() for g in got], list(expected), rtol=1e-4, atol=1e-5,
                          msg=f"step {step}")
    assert InductorStats.autograd_calls > trained
    assert _CephesTanh.apply in given[-1] and torch.ops.aten.tanh.default not in given[-1]

    x = torch.tensor([0.0, 0.3, -0.7, 3.0, -50.0, 1e30], requires_grad=True)
    (slope,) = torch.autograd.grad(_CephesTanh.apply(x).sum(), x)
    exact = 1 - torch.tanh(x.detach().double()) ** 2
    assert_tree_close(slope.double(), exact, rtol=1e-6, atol=1e-7)


def test_cephes_tanhf_matches_tanh_to_float32_rounding() -> None:
    """The rewritten ``tanh`` (run eagerly here; inductor computes the same formula) is within
    1.5 float32 epsilons of the float64 ``tanh``, and exact at +-0, +-inf, NaN and the
    subnormals, signs included."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from xafunc._execute.executable import tanh_for_inductor

    gm = make_fx(torch.tanh)(torch.ones(2))
    assert tanh_for_inductor(gm.graph) == 1
    gm.recompile()
    mags = torch.cat([torch.logspace(-44, 2, 20001, dtype=torch.float64),
                      torch.linspace(0.5, 0.75, 20001, dtype=torch.float64),
                      torch.tensor([0.625, 44.0, 45.0, 89.0, 1e30], dtype=torch.float64)])
    x = torch.cat([mags, -mags]).float()
    out = gm(x)
    exact = torch.tanh(x.double())
    rel = ((out.double() - exact).abs() / exact.abs()).max().item()
    assert rel <= 1.5 * torch.finfo(torch.float32).eps, rel
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45,
                            -1e-45, 2e-40])
    assert_tree_close(gm(special), torch.tanh(special), rtol=0.0, atol=0.0)
    assert torch.equal(gm(special).signbit(), torch.tanh(special).signbit())
    # float64 graphs keep torch's tanh
    assert tanh_for_inductor(make_fx(torch.tanh)(torch.ones(2, dtype=torch.float64)).graph) == 0


def test_evaluation_calls_with_trainable_weights_run_the_no_grad_code() -> None:
    """Derivatives of a module whose weights require grad, called without ``no_grad`` and never
    backpropagated (an evaluation loop): the first call runs TorchScript, the second compiles
    the no-grad code, and its result still carries history (NOTE [Recompute])."""
    net = _mlp(requires_grad=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        return net(x).sum()

    x = torch.randn(3, dtype=torch.float64)
    compiles, calls = _counts()
    trained = InductorStats.autograd_calls
    for step in range(3):
        got = xafunc.xhessian(f, compile=True)(x)
        assert_tree_close(got.detach(), reference_deriv(f, 2)(x), msg=f"call {step}")
    assert _counts() == (compiles + 1, calls + 2), "TorchScript first, then the no-grad code"
    assert InductorStats.autograd_calls == trained
    weights = [net[0].weight, net[0].bias]
    expected = torch.autograd.grad(torch.func.hessian(f)(x).sum(), weights)
    assert_tree_close(list(torch.autograd.grad(got.sum(), weights)), list(expected))


def test_training_steps_run_inductor_forward_and_backward() -> None:
    """A PINN step with ``loss.backward()``: the first step runs TorchScript, then calls
    recorded by autograd run inductor's forward and backward code (NOTE [Inductor executor],
    training), compiled once; gradients, a double backward and a backward run twice
    (``retain_graph``) match torch.func's."""
    net = _mlp(requires_grad=True)
    xs = torch.randn(5, 3, dtype=torch.float64)
    params = dict(net.named_parameters())

    def u(x: torch.Tensor) -> torch.Tensor:
        return net(x).squeeze(-1)

    def loss() -> torch.Tensor:
        return torch.func.vmap(xafunc.xlaplacian(u, compile=True))(xs).pow(2).mean()

    def reference_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        def f(x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(net, p, (x,)).squeeze(-1)

        hess = torch.func.vmap(reference_deriv(f, 2))(xs)
        return hess.diagonal(dim1=-2, dim2=-1).sum(-1).pow(2).mean()

    names = [k for k in params if k != "2.bias"]  # the last bias does not reach a Laplacian
    weights = [params[k] for k in names]
    expected = torch.autograd.grad(reference_loss(params), weights, create_graph=True)
    second = torch.autograd.grad(sum(g.sum() for g in expected), weights)
    compiles, calls = InductorStats.compiles, InductorStats.autograd_calls
    for step in range(3):
        net.zero_grad()
        loss().backward()
        assert_tree_close([p.grad for p in weights], list(expected), msg=f"step {step}")
    assert (InductorStats.compiles, InductorStats.autograd_calls) == (compiles + 1, calls + 2)
    out = loss()
    first = torch.autograd.grad(out, weights, retain_graph=True)
    assert_tree_close(list(first), list(expected))
    assert_tree_close(list(torch.autograd.grad(out, weights)), list(expected), msg="again")
    got = torch.autograd.grad(loss(), weights, create_graph=True)
    assert_tree_close(list(torch.autograd.grad(sum(g.sum() for g in got), weights)),
                      list(second), msg="double backward")
    assert InductorStats.autograd_calls == calls + 4


@pytest.mark.parametrize("mode", ["saved", "recomputed", "default"])
def test_torch_func_grad_steps_run_one_function_at_the_level(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.func.grad`` over ``functional_call`` parameters of a vmapped third derivative:
    the graph is one Function at the grad level, and the gradient is torch.func's. With
    compile=True and enough product FLOPs (``saved``: the bound lowered to this small
    graph's) it runs inductor's forward and backward code, compiled once (NOTE [Saved
    activations at a grad level]); with fewer (``recomputed``) its forward and its backward
    graph run inductor's code, compiled once each (NOTE [Backward graphs]); without compile
    (``default``) its forward is recorded by autograd beneath the level and differentiated
    there (NOTE [Saved activations at a grad level]). A pullback run twice gives the same;
    the pullback under a later ``grad`` and ``jacrev`` (its backward under ``vmap``) run the
    backward graph, ``grad`` of ``grad`` too with compile=True, and a double backward inside
    the level (``autograd.grad(..., create_graph=True)`` within ``grad``) differentiates the
    gradients through it."""
    from xafunc._execute import executable
    from xafunc._execute.executable import BackwardStats, SavedStats

    if mode == "saved":
        monkeypatch.setattr(executable, "_SAVED_MIN_FLOPS", 0.0)
    compiled = mode != "default"
    keeps = mode != "recomputed"
    xafunc.clear_cache()  # graphs compiled by the other cases are not reused

    net = _mlp()
    params = {k: v.detach() for k, v in net.named_parameters()}
    xs = torch.randn(4, 3, dtype=torch.float64)

    def residual(p: dict[str, torch.Tensor], x: torch.Tensor,
                 compile: bool | None) -> torch.Tensor:
        def f(x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(net, p, (x,)).squeeze(-1)

        d3 = reference_deriv(f, 3)(x) if compile is None else xafunc.xderiv(
            f, 3, compile=compile)(x)
        return d3.sum()

    def loss(p: dict[str, torch.Tensor], compile: bool | None) -> torch.Tensor:
        return torch.func.vmap(residual, in_dims=(None, 0, None))(p, xs, compile).pow(2).mean()

    expected = torch.func.grad(loss)(params, None)
    compiles, backward = InductorStats.compiles, BackwardStats.calls
    trained, kept = InductorStats.autograd_calls, SavedStats.calls
    for step in range(2):
        assert_tree_close(torch.func.grad(loss)(params, compiled), expected, msg=f"step {step}")
    # the forward and backward code once, or the forward and the backward graph; or nothing
    assert InductorStats.compiles == compiles + {"saved": 1, "recomputed": 2, "default": 0}[mode]
    assert (InductorStats.autograd_calls, SavedStats.calls, BackwardStats.calls) == {
        "saved": (trained + 2, kept + 2, backward),
        "recomputed": (trained, kept, backward + 2),
        "default": (trained, kept + 2, backward)}[mode]
    backward = BackwardStats.calls
    value, pull = torch.func.vjp(lambda p: loss(p, compiled), params)
    for again in range(2):
        assert_tree_close(pull(torch.ones_like(value))[0], expected, msg=f"pullback {again}")
    assert (BackwardStats.calls == backward) == keeps
    backward = BackwardStats.calls
    # the pullback differentiated by a later grad (its level number reused): the backward
    # graph, on the values of the exited level's tensors
    slope = torch.func.grad(lambda s: pull(s)[0]["0.weight"].sum())(torch.ones_like(value))
    assert_tree_close(slope, expected["0.weight"].sum(), msg="grad of the pullback")
    assert BackwardStats.calls > backward
    backward = BackwardStats.calls

    # jacrev's backward runs under vmap over the cotangents: the backward graph
    weight = params["0.weight"]

    def per_point(w: torch.Tensor, compile: bool | None) -> torch.Tensor:
        p = {**params, "0.weight": w}
        return torch.func.vmap(residual, in_dims=(None, 0, None))(p, xs, compile)

    jac = torch.func.jacrev(per_point)(weight, compiled)
    assert_tree_close(jac, torch.func.jacrev(per_point)(weight, None), msg="jacrev")
    assert BackwardStats.calls > backward
    # grad of grad: the inner level's backward is differentiated by the outer one
    backward = BackwardStats.calls

    def grad_norm(w: torch.Tensor, compile: bool | None) -> torch.Tensor:
        g = torch.func.grad(lambda v: per_point(v, compile).pow(2).mean())(w)
        return g.pow(2).sum()

    assert_tree_close(torch.func.grad(grad_norm)(weight, compiled),
                      torch.func.grad(grad_norm)(weight, None), msg="grad of grad")
    assert (BackwardStats.calls > backward) == compiled  # default: recorded op by op

    # a double backward inside the level: its gradients are differentiated there again
    def inner_norm(w: torch.Tensor, compile: bool | None) -> torch.Tensor:
        (g,) = torch.autograd.grad(per_point(w, compile).pow(2).mean(), w, create_graph=True)
        return g.pow(2).sum()

    assert_tree_close(torch.func.grad(inner_norm)(weight, compiled),
                      torch.func.grad(inner_norm)(weight, None), msg="double backward")


def test_grad_over_inputs_with_trainable_weights_records_at_the_level() -> None:
    """``torch.func.grad`` over the points of a loss whose network's weights require grad:
    autograd records the weights beneath the level, so the default executor records the graph
    at the level as before, keeping no activations beneath it (NOTE [Saved activations at a
    grad level]); the gradient with respect to the points, and then to the weights, are
    torch.func's."""
    from xafunc._execute.executable import BackwardStats, SavedStats

    net = _mlp(requires_grad=True)
    xs = torch.randn(4, 3, dtype=torch.float64)

    def loss(x: torch.Tensor, ref: bool) -> torch.Tensor:
        def f(y: torch.Tensor) -> torch.Tensor:
            return net(y).squeeze(-1)

        lap = (lambda y: reference_deriv(f, 2)(y).trace()) if ref else xafunc.xlaplacian(f)
        return torch.func.vmap(lap)(x).pow(2).sum()

    kept, backward = SavedStats.calls, BackwardStats.calls
    got = torch.func.grad(loss)(xs, False)
    expected = torch.func.grad(loss)(xs, True)
    assert_tree_close(got, expected)
    weights = list(net.parameters())[:2]
    assert_tree_close(torch.autograd.grad(got.sum(), weights),
                      torch.autograd.grad(expected.sum(), weights), msg="weights")
    # recorded op by op at the level: neither kept activations nor a backward graph
    assert (SavedStats.calls, BackwardStats.calls) == (kept, backward)


def test_casts_to_lower_precision_round_as_in_eager_code() -> None:
    """Inductor keeps the wider value of a cast to a lower precision and back unless told to
    emulate it (NOTE [Inductor executor]): the derivatives of a function that rounds through
    bfloat16 were 5e-2 off. Plain calls and a training step give the default executor's
    numbers; those are torch.func's to the rounding of the low precision (torch's ``jacfwd``
    and ``jacrev`` themselves differ by 1e-3 here: each rounds its tangents or cotangents at
    the casts in its own order)."""
    w = torch.linspace(-1.0, 1.0, 24).reshape(8, 3).requires_grad_()

    def u(x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(w @ x.bfloat16().float())
        return (h.half() * 3).float().sin().sum()

    x = torch.linspace(0.1, 0.9, 3)
    compiles, calls = _counts()
    with torch.no_grad():
        for order in (1, 2):
            got = xafunc.xderiv(u, order, compile=True)(x)
            assert_tree_close(got, xafunc.xderiv(u, order)(x), rtol=1e-6, atol=1e-6,
                              msg=f"order {order}, compiled vs not")
            assert_tree_close(got, reference_deriv(u, order)(x), rtol=1e-2, atol=5e-3,
                              msg=f"order {order}")
    assert _counts() == (compiles + 2, calls + 2)
    xs = torch.linspace(-1.0, 1.0, 12).reshape(4, 3)

    def grad_of_loss(lap: Callable[..., torch.Tensor]) -> torch.Tensor:
        return torch.autograd.grad(torch.func.vmap(lap)(xs).pow(2).mean(), w)[0]

    default = grad_of_loss(xafunc.xlaplacian(u))
    autograd_calls = InductorStats.autograd_calls
    for step in range(2):  # the second step runs inductor's forward and backward code
        got = grad_of_loss(xafunc.xlaplacian(u, compile=True))
        assert_tree_close(got, default, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    assert InductorStats.autograd_calls == autograd_calls + 1
    expected = grad_of_loss(lambda x: torch.func.jacrev(torch.func.jacrev(u))(x).trace())
    assert_tree_close(default, expected, rtol=1e-2, atol=5e-3)


@pytest.mark.parametrize("compile", [False, True])
def test_weights_written_between_forward_and_backward_raise_as_in_torch(compile: bool) -> None:
    """A weight written in place after the forward (an optimiser step before ``backward``) makes
    autograd's backward raise, eager and torch.func alike; inductor's backward code would mix
    the activations it saved with the new values, so ``compile=True`` training steps check
    the versions of what they differentiate too."""
    net = _mlp(requires_grad=True)
    xs = torch.randn(4, 3, dtype=torch.float64)

    def loss() -> torch.Tensor:
        u = lambda x: net(x).squeeze(-1)  # noqa: E731
        return torch.func.vmap(xafunc.xlaplacian(u, compile=compile))(xs).pow(2).mean()

    autograd_calls = InductorStats.autograd_calls
    for _ in range(2):  # the second step is a training step's code (inductor's, compile=True)
        loss().backward()
    assert InductorStats.autograd_calls == autograd_calls + compile
    out = loss()
    with torch.no_grad():
        net[0].weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_kernels_are_generated_for_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """On more than one thread torch 2.13's C++ code for a scatter's accumulation (the
    backward of an indexing) writes out of bounds (NOTE [Inductor executor]): a random
    program's training step on two threads had gradients 20-50 % off, or a corrupted heap, in
    about half of the processes. So every graph inductor compiles for xafunc -- the no-grad
    code, a training step's forward and its backward, compiled at its first run -- is
    generated for one thread (and with casts emulated), whatever torch's thread count; the
    step, run with two threads, matches torch.func."""
    from torch._inductor import config
    from torch._inductor.graph import GraphLowering

    seen: list[tuple[int, bool]] = []  # the settings of every graph inductor generates code for
    codegen = GraphLowering.codegen

    def spy(self: GraphLowering, *args: object, **kwargs: object) -> object:
        seen.append((config.cpp.threads, config.emulate_precision_casts))
        return codegen(self, *args, **kwargs)

    monkeypatch.setattr(GraphLowering, "codegen", spy)
    net = _mlp(requires_grad=True)
    xs = torch.randn(4, 3, dtype=torch.float64)

    def u(x: torch.Tensor) -> torch.Tensor:
        return net(x).squeeze(-1)

    params = dict(net.named_parameters())
    names = [k for k in params if k != "2.bias"]  # the last bias does not reach a Hessian

    def grads(hessian: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        loss = torch.func.vmap(hessian)(xs).pow(2).mean()
        return list(torch.autograd.grad(loss, [params[k] for k in names]))

    expected = grads(torch.func.jacrev(torch.func.jacrev(u)))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for step in range(3):  # TorchScript, then inductor's forward and backward code
            assert_tree_close(grads(xafunc.xhessian(u, compile=True)), expected,
                              msg=f"step {step}")
        with torch.no_grad():
            xafunc.xhessian(u, compile=True)(xs[0])
            xafunc.xhessian(u, compile=True)(xs[0])  # the second no-grad call compiles
    finally:
        torch.set_num_threads(threads)
    assert len(seen) >= 3 and set(seen) == {(1, True)}, seen


def test_failed_compile_falls_back_to_torchscript(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.compile_fx as inductor

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(inductor, "compile_fx", broken)

    def f(x: torch.Tensor) -> torch.Tensor:
        return x.tanh().sum() * x.sum()

    x = torch.randn(3, dtype=torch.float64)
    compiles, calls = _counts()
    assert_tree_close(xafunc.xderiv(f, 3, compile=True)(x), reference_deriv(f, 3)(x))
    assert _counts() == (compiles, calls)
    execution = xafunc.plan(f, 3, compile=True)(x).execution or ""
    assert execution.startswith("torchscript (compile=True, but inductor failed: RuntimeError: "
                                "no compiler today)"), execution


def _transforms(compile: object) -> list[object]:
    f = torch.sin
    return [lambda: xafunc.xderiv(f, 2, compile=compile),
            lambda: xafunc.xjacobian(f, compile=compile),
            lambda: xafunc.xhessian(f, compile=compile),
            lambda: xafunc.xderivs(f, 2, compile=compile),
            lambda: xafunc.plan(f, 2, compile=compile),
            lambda: xafunc.xlaplacian(f, compile=compile),
            lambda: xafunc.xbiharmonic(f, compile=compile),
            lambda: xafunc.jet(f, (torch.ones(()),), ((torch.ones(()),),), compile=compile)]


@pytest.mark.parametrize("i, name", enumerate(
    ["xderiv", "xjacobian", "xhessian", "xderivs", "plan", "xlaplacian", "xbiharmonic", "jet"]))
def test_compile_must_be_a_bool(i: int, name: str) -> None:
    with pytest.raises(TypeError, match=f"^{name}: compile must be a bool, got 'yes' of type "
                                        "str. Pass compile=True or compile=False."):
        _transforms("yes")[i]()  # type: ignore[operator]


def _count_small_product_rewrites(monkeypatch: pytest.MonkeyPatch
                                  ) -> tuple[list[int], Callable[[torch.fx.Graph], int]]:
    """A list that collects the number of products each later compile rewrites (NOTE
    [Inductor's small products]), and the rewrite itself."""
    from xafunc._execute import executable as ex

    rewritten: list[int] = []
    original = ex.small_products_for_inductor

    def counted(graph: torch.fx.Graph) -> int:
        rewritten.append(original(graph))
        return rewritten[-1]

    monkeypatch.setattr(ex, "small_products_for_inductor", counted)
    return rewritten, original


def test_products_of_few_rows_become_reductions_for_inductor(monkeypatch) -> None:
    """The Hessian of a residual tanh network in its 4 inputs multiplies 1- and 4-row
    matrices by the 16 x 16 weights: inductor gets them as products and sums (NOTE
    [Inductor's small products]); the rewrite ran and the compiled code gives nested
    ``jacrev``'s numbers; alone, the rewrite gives ``mm``'s and ``addmm``'s values and leaves
    products of many rows or many multiply-adds alone."""
    rewritten, original = _count_small_product_rewrites(monkeypatch)
    torch.manual_seed(22)
    w = [torch.randn(16, 16, dtype=torch.float64) / 4 for _ in range(3)]
    w_in, b = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ w_in.T + b)
        for m in w:
            h = h + torch.tanh(torch.addmm(b, h.unsqueeze(0), m).squeeze(0))
        return h.sum()

    x = torch.randn(4, dtype=torch.float64)
    compiles, calls = _counts()
    got = xafunc.xhessian(f, compile=True)(x)
    assert _counts() == (compiles + 1, calls + 1)
    assert sum(rewritten) >= 4, rewritten
    assert_tree_close(got, reference_deriv(f, 2)(x))

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.mm(a, b)

    def addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.addmm(c, a, b)

    for rows, inner, cols, expected in ((4, 16, 16, 1), (24, 16, 32, 1), (25, 8, 8, 0),
                                        (8, 64, 64, 0)):
        a, b, c = torch.randn(rows, inner), torch.randn(inner, cols), torch.randn(cols)
        for fn, args in ((mm, (a, b)), (addmm, (c, a, b))):
            gm = torch.fx.experimental.proxy_tensor.make_fx(fn)(*args)
            for node, value in zip(gm.graph.find_nodes(op="placeholder"), args, strict=True):
                node.meta["val"] = value
            for node in gm.graph.nodes:
                if node.op == "call_function":
                    node.meta["val"] = fn(*args)
            assert original(gm.graph) == expected, (fn.__name__, rows, inner, cols)
            gm.recompile()
            assert_tree_close(gm(*args), fn(*args), rtol=1e-5, atol=1e-5)


def test_small_batched_products_become_reductions_for_inductor(monkeypatch) -> None:
    """Per-sample Hessians of a 2 -> 16 -> 16 -> 1 network under ``vmap`` end in a ``bmm`` of
    128 products of ``2 x 16 x 2``, which inductor gets as a product and a sum (NOTE [Inductor's
    small products]): the rewrite ran, and the compiled code gives nested ``jacrev``'s
    numbers; the rewritten graph alone gives ``bmm``'s."""
    rewritten, original = _count_small_product_rewrites(monkeypatch)
    torch.manual_seed(21)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                              torch.nn.Tanh(), torch.nn.Linear(16, 1))
    net = net.double().requires_grad_(False)

    def f(x: torch.Tensor) -> torch.Tensor:
        return net(x).sum()

    xs = torch.randn(128, 2, dtype=torch.float64)
    compiles, calls = _counts()
    got = torch.func.vmap(xafunc.xhessian(f, compile=True))(xs)
    assert _counts() == (compiles + 1, calls + 1)
    assert sum(rewritten) >= 1, rewritten
    assert_tree_close(got, torch.func.vmap(reference_deriv(f, 2))(xs))

    # the rewrite on its own, run by FX: bmm's values up to rounding; small batches untouched
    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b)

    for batch, expected in ((128, 1), (64, 0)):
        a, b = torch.randn(batch, 3, 32), torch.randn(batch, 32, 2)
        gm = torch.fx.experimental.proxy_tensor.make_fx(product)(a, b)
        for node in gm.graph.nodes:  # the metadata the engine's graphs carry
            if node.op != "output":
                node.meta["val"] = {"a_1": a, "b_1": b}.get(node.name, product(a, b))
        assert original(gm.graph) == expected
        gm.recompile()
        assert_tree_close(gm(a, b), torch.bmm(a, b), rtol=1e-5, atol=1e-6)


def test_inductor_keeps_the_coefficients_of_sums() -> None:
    """Inductor (torch 2.13) compiles ``add(mm(a, b), x, alpha=16)`` as ``mm(a, b) + x``
    (pytorch/pytorch#167313: its ``add``/``addmm`` patterns drop the coefficients). The graphs
    xafunc hands it have them as products (``coefficients_for_inductor``), which it compiles
    right; ``beta=0`` still ignores a NaN input."""
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    from xafunc._execute.executable import coefficients_for_inductor

    aten = torch.ops.aten

    def f(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, v: torch.Tensor
          ) -> tuple[torch.Tensor, ...]:
        def mm() -> torch.Tensor:  # one for each sum: the pattern matches a single reader
            return aten.mm.default(a.t(), b)

        nan = c * float("nan")
        return (aten.add.Tensor(mm(), c, alpha=16.0), aten.add.Tensor(c, mm(), alpha=-3.0),
                aten.sub.Tensor(c, mm(), alpha=0.5), aten.addmm.default(c, a.t(), b, alpha=2.0),
                aten.addmm.default(c, a.t(), b, beta=0.5, alpha=2.0).relu(),
                aten.addmm.default(nan, a.t(), b, beta=0, alpha=2.0),
                aten.addmv.default(v, c, v, beta=3.0))

    args = (torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64),
            torch.randn(8, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    gm = make_fx(f)(*args)
    assert coefficients_for_inductor(gm.graph) == 7
    gm.recompile()
    assert_tree_close(gm(*args), f(*args))
    assert_tree_close(tuple(compile_fx(gm, list(args))(*args)), f(*args))


def _corrupting_inductor(monkeypatch: pytest.MonkeyPatch, training: bool) -> list[int]:
    """From now on, inductor's code for graphs whose example inputs require grad
    (``training``) or for the others is wrong: plain code's first output is off by 1 %,
    training code's gradients twice what they should be (its forward right). Returns a list
    that counts the corrupted compiles."""
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx
    made: list[int] = []

    class Doubled(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
            return t.view_as(t)

        @staticmethod
        def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
            return 2 * g

    def corrupt(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        code = real(gm, inputs)
        if any(t.requires_grad for t in inputs) != training:
            return code
        made.append(1)

        def wrong(*args: torch.Tensor) -> list[torch.Tensor]:
            outs = list(code(*args))
            if training:
                return [Doubled.apply(o) if o.requires_grad else o for o in outs]
            return [outs[0] * 1.01, *outs[1:]]

        return wrong

    monkeypatch.setattr(cfx, "compile_fx", corrupt)
    return made


def test_compiled_code_that_disagrees_with_the_eager_graph_is_not_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTE [Checked compiles]: code whose outputs differ from the graph run eagerly (here 1 %
    off: an inductor bug) is dropped on its first run, before any result reaches the caller;
    the call runs TorchScript and the plan says why."""
    made = _corrupting_inductor(monkeypatch, training=False)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() * x.sum()).exp().sum()

    x = torch.randn(3, dtype=torch.float64)
    compiles, calls = _counts()
    for _ in range(2):
        assert_tree_close(xafunc.xderiv(f, 3, compile=True)(x), reference_deriv(f, 3)(x))
    assert made and _counts() == (compiles, calls)
    execution = xafunc.plan(f, 3, compile=True)(x).execution or ""
    assert execution.startswith("torchscript (compile=True, but inductor failed: "
                                "CompiledCodeDisagrees: output 0 is off by "), execution


def test_compiled_training_code_whose_gradients_disagree_is_not_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTE [Checked compiles], training: forward and backward code are both checked, the
    backward on fixed cotangents; code whose gradients are wrong (its forward right) is
    dropped, the steps run the split graphs, and their gradients are torch.func's."""
    made = _corrupting_inductor(monkeypatch, training=True)
    net = _mlp(requires_grad=True)
    xs = torch.randn(4, 3, dtype=torch.float64)
    weights = [p for k, p in net.named_parameters() if k != "2.bias"]

    def u(x: torch.Tensor) -> torch.Tensor:
        return net(x).squeeze(-1)

    def lap(x: torch.Tensor) -> torch.Tensor:
        return reference_deriv(u, 2)(x).diagonal().sum()

    expected = torch.autograd.grad(torch.func.vmap(lap)(xs).pow(2).mean(), weights)
    trained = InductorStats.autograd_calls
    for step in range(3):
        hess = torch.func.vmap(xafunc.xhessian(u, compile=True))(xs)
        loss = hess.diagonal(dim1=-2, dim2=-1).sum(-1).pow(2).mean()
        got = torch.autograd.grad(loss, weights)
        assert_tree_close(list(got), list(expected), msg=f"step {step}")
    assert made and InductorStats.autograd_calls == trained
    from xafunc._capture.cache import CACHE

    executors = [fn.executor for e in CACHE.entries(u) for p in e.plans.values()
                 if p.program is not None for fn in p.program.compiler.fns.values()
                 if hasattr(fn, "executor")]
    assert any("; inductor failed for calls recorded by autograd: CompiledCodeDisagrees: the "
               "gradient of input " in text for text in executors), executors


def test_the_check_of_compiled_code_tells_rounding_from_wrong_values() -> None:
    """``disagreement`` (NOTE [Checked compiles]): differences within the dtype's tolerance
    of the largest output pass; larger ones, other non-finite entries, shapes, dtypes or
    integers do not."""
    from xafunc._execute.verify import disagreement

    e = torch.tensor([1000.0, 1.0, float("nan"), float("inf"), 0.0])
    assert disagreement([e.clone()], [e]) is None
    assert disagreement([e + 0.5], [e]) is None  # 5e-4 of the largest: float32 rounding
    assert disagreement([e + 2.0], [e]) is not None
    for bad in (float("nan"), 1.0):
        f = e.clone()
        f[3] = bad
        assert disagreement([f], [e]) is not None
    f = e.clone()
    f[4] = float("-inf")
    assert disagreement([f], [e]) is not None
    assert disagreement([e.double()], [e]) is not None
    assert disagreement([e[:4]], [e]) is not None
    assert disagreement([torch.tensor([1, 2])], [torch.tensor([1, 3])]) is not None
    # the scale is per dtype over all outputs: a zero output may differ by rounding of the
    # others
    assert disagreement([torch.full((2,), 1e-5), e], [torch.zeros(2), e]) is None
    assert disagreement([torch.full((2,), 1e-5, dtype=torch.float64), e],
                        [torch.zeros(2, dtype=torch.float64), e]) is not None
