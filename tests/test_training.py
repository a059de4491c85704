"""Training through xafunc transforms in one process: parameter gradients and torch.compile.

* The parameter gradient of a PINN loss (Laplacian, biharmonic and third-derivative residuals
  under ``vmap``) equals the one through nested torch.func, with ``loss.backward()`` on an
  ``nn.Module`` and with ``torch.func.grad`` over ``functional_call`` parameters.
* ``torch.compile(train_step)`` where ``train_step`` calls a transform runs, gives the eager
  numbers step after step, and settles: after two or three warm-up steps, five more steps compile
  nothing new (``error_on_recompile``, and dynamo's frame counter stands still).
  The backend is ``aot_eager`` (dynamo + AOTAutograd, no code generation), which keeps the
  test at seconds on a 2-core machine; with the default inductor backend the same step gave the
  same numbers (to 3e-17) after a 90 s first compile.
* The tutorial's training script (``docs/tutorials/pinn_poisson.py``) runs with few steps and
  its loss falls.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacfwd, vmap

import xafunc
from tests._compare import assert_tree_close
from tests._pinn import (
    F64,
    PINNLoss,
    batch,
    forcing,
    functional_loss,
    grads_of,
    make_net,
    params_of,
)
from xafunc import xbiharmonic, xderiv, xlaplacian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, ATOL = 1e-9, 1e-12


# ------------------------------------------------------------- parameter gradients
def _xafunc_residual(u: Callable[..., Tensor], operator: str, argnums: int
                     ) -> Callable[..., Tensor]:
    if operator == "laplacian":
        return xlaplacian(u, argnums=argnums)
    if operator == "biharmonic":
        return xbiharmonic(u, argnums=argnums)
    d3 = xderiv(u, 3, argnums=argnums)
    return lambda *a: d3(*a)[..., 0, 0, 0] + d3(*a)[..., 1, 1, 1]


def _oracle_residual(u: Callable[..., Tensor], operator: str, argnums: int
                     ) -> Callable[..., Tensor]:
    """Nested torch.func only: Hessian trace, trace of trace of D^4, or two entries of D^3."""
    if operator == "laplacian":
        h = torch.func.hessian(u, argnums)
        return lambda *a: h(*a).diagonal(dim1=-2, dim2=-1).sum(-1)
    if operator == "biharmonic":
        d4 = jacfwd(jacfwd(torch.func.hessian(u, argnums), argnums), argnums)
        return lambda *a: d4(*a).diagonal(dim1=-2, dim2=-1).sum(-1) \
            .diagonal(dim1=-2, dim2=-1).sum(-1)
    d3 = jacfwd(jacfwd(torch.func.jacrev(u, argnums), argnums), argnums)
    return lambda *a: d3(*a)[..., 0, 0, 0] + d3(*a)[..., 1, 1, 1]


@pytest.mark.parametrize("operator", ["laplacian", "biharmonic", "order3"])
@pytest.mark.parametrize("how", ["backward", "func_grad"])
def test_parameter_gradient_matches_torch_func(operator: str, how: str) -> None:
    net = make_net(width=16)
    x, _ = batch(0, n=6)

    def loss_with(residual_of: Callable[..., Callable[..., Tensor]],
                  params: dict[str, Tensor]) -> Tensor:
        u = lambda p, xx: functional_call(net, p, (xx,))  # noqa: E731
        r = vmap(residual_of(u, operator, 1), in_dims=(None, 0))(params, x)
        return ((r - forcing(x)) ** 2).mean()

    expected = grad(lambda p: loss_with(_oracle_residual, p))(params_of(net))
    if how == "func_grad":
        got = grad(lambda p: loss_with(_xafunc_residual, p))(params_of(net))
    else:
        d = _xafunc_residual(net, operator, 0)
        ((vmap(d)(x) - forcing(x)) ** 2).mean().backward()
        got = grads_of(net)
    assert_tree_close(got, expected, rtol=RTOL, atol=ATOL)


# -------------------------------------------------------------------- torch.compile
def _frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def _run_compiled(make_step: Callable[[], tuple[Callable[..., Any], Callable[[], Any]]],
                  steps_warm: int = 2, steps_steady: int = 5) -> None:
    """Compile ``step`` (``aot_eager``), run it beside an eager twin, compare the state after
    every step, and check that the steady steps compile nothing."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        step_c, state_c = make_step()
        step_e, state_e = make_step()
        compiled = torch.compile(step_c, backend="aot_eager")
        frames_after_warmup = None
        for i in range(steps_warm + steps_steady):
            x, xb = batch(i)
            if i < steps_warm:
                out_c = compiled(x, xb)
            else:
                if frames_after_warmup is None:
                    frames_after_warmup = _frames()
                with torch._dynamo.config.patch(error_on_recompile=True):
                    out_c = compiled(x, xb)
            out_e = step_e(x, xb)
            assert_tree_close(out_c, out_e, rtol=RTOL, atol=ATOL, msg=f"step {i} output")
            assert_tree_close(state_c(), state_e(), rtol=RTOL, atol=ATOL,
                              msg=f"step {i} parameters")
        assert _frames() == frames_after_warmup, (
            f"dynamo converted {_frames() - frames_after_warmup} more frames during the "
            f"{steps_steady} steady steps")
    finally:
        torch._dynamo.reset()


def test_compile_backward_train_step_matches_eager() -> None:
    """``torch.compile`` of a whole step: transform, ``loss.backward()``, ``opt.step()``."""
    def make_step() -> tuple[Callable[..., Tensor], Callable[[], Any]]:
        net = make_net()
        model = PINNLoss(net, "laplacian", boundary=True)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)

        def train_step(x: Tensor, xb: Tensor) -> Tensor:
            opt.zero_grad()
            loss = model(x, xb)
            loss.backward()
            opt.step()
            return loss.detach()

        return train_step, lambda: params_of(net)

    # the first step captures, the second captures once more (``cache_info`` counts a
    # recapture) and records, and the third is the first whose backward runs a split backward
    # graph (NOTE [Split graphs]): dynamo converts that Python frame once, then
    _run_compiled(make_step, steps_warm=3)


# dynamo traces torch.func.grad's body itself, where a graph break is impossible: the
# transform then runs inside dynamo's own functorch tracing and falls back to the reference
@pytest.mark.fallback
def test_compile_func_grad_train_step_matches_eager() -> None:
    """``torch.compile`` of a functional step: ``torch.func.grad`` of the loss, then SGD."""
    def make_step() -> tuple[Callable[..., dict[str, Tensor]], Callable[[], Any]]:
        net = make_net()
        loss_grad = grad(functional_loss(net, "laplacian", boundary=True))
        state = {"p": params_of(net)}

        def train_step(x: Tensor, xb: Tensor) -> dict[str, Tensor]:
            g = loss_grad(state["p"], x, xb)
            state["p"] = {k: v - 0.05 * g[k] for k, v in state["p"].items()}
            return g

        return train_step, lambda: state["p"]

    _run_compiled(make_step)


def test_compile_breaks_cleanly_around_transform() -> None:
    """Compiling a step that calls a transform (here on one point, not under ``vmap``, whose
    body dynamo traces itself) converts no more frames than compiling the same step with the
    transform explicitly hidden behind ``torch.compiler.disable``: the transform is one clean
    graph break, dynamo never traces into the capture machinery."""
    import torch._dynamo

    def frames_for(hide: bool) -> int:
        torch._dynamo.reset()
        before = _frames()
        net = make_net()

        def residual(x: Tensor) -> Tensor:
            return xafunc.xhessian(lambda y: net(y).sum())(x).diagonal().sum()

        res = torch.compiler.disable(residual) if hide else residual

        def train_step(x: Tensor, xb: Tensor) -> Tensor:
            loss = res(x[0]) ** 2 + net(xb).pow(2).mean()
            loss.backward()
            return loss.detach()

        step = torch.compile(train_step, backend="aot_eager")
        for i in range(2):
            step(*batch(i))
        return _frames() - before

    from xafunc._capture import cache

    traced_into: list[bool] = []
    lookup = cache.CACHE.lookup

    def spy(*args: Any, **kwargs: Any) -> Any:
        traced_into.append(torch.compiler.is_compiling())
        return lookup(*args, **kwargs)

    cache.CACHE.lookup = spy  # type: ignore[method-assign]
    try:
        hidden = frames_for(hide=True)
        raw = frames_for(hide=False)
    finally:
        cache.CACHE.lookup = lookup  # type: ignore[method-assign]
        torch._dynamo.reset()
    assert traced_into and not any(traced_into), "dynamo traced into the capture cache"
    # building the transform and calling it are two graph breaks where the hidden residual is
    # one: a few resume frames more per compiled step, nothing traced inside xafunc
    assert raw <= hidden + 12, (
        f"dynamo converted {raw} frames with the transform inline, {hidden} with it behind "
        "torch.compiler.disable")


# ------------------------------------------------------------------ the tutorial script
def _load_tutorial() -> Any:
    path = os.path.join(ROOT, "docs", "tutorials", "pinn_poisson.py")
    spec = importlib.util.spec_from_file_location("pinn_poisson", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pinn_tutorial_script_trains() -> None:
    """The tutorial's code, with few steps: the loss falls and the result is well formed."""
    tut = _load_tutorial()
    t0 = time.perf_counter()
    result = tut.train(steps=60, seed=0)
    elapsed = time.perf_counter() - t0
    losses = result["loss"]
    assert len(losses) == 60 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    # the residual the tutorial trains on is the exact Laplacian: check it at a few points
    net: nn.Module = result["model"]
    x = torch.rand(5, 2, dtype=F64)
    h = vmap(torch.func.hessian(net))(x)  # (5, 1, 2, 2)
    assert_tree_close(tut.laplacian(net)(x), h.diagonal(dim1=-2, dim2=-1).sum(-1),
                      rtol=RTOL, atol=ATOL)
    assert elapsed < 60, f"60 tutorial steps took {elapsed:.0f} s"


# ------------------------------------------------------- the training benchmark's strategies
def _load_training_cases() -> Any:
    path = os.path.join(ROOT, "asv_bench", "benchmarks", "training_cases.py")
    spec = importlib.util.spec_from_file_location("_xafunc_bench_training_cases", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("operator", ["laplacian", "biharmonic", "order3"])
def test_training_benchmark_strategies_compute_the_same_step(operator: str) -> None:
    """``asv_bench/training_table.py`` compares equal work: on a small case every torch.func
    strategy gives xafunc's residuals and parameter gradients, through both APIs."""
    tc = _load_training_cases()
    case = tc.TrainCase("tiny", operator, (3, 8, 8, 1), 3, 1.0, "")
    module = case.make_module(F64)
    x = case.make_points(F64)
    found = tc.strategies(case, lambda p, z: module(z), F64, "cpu")
    assert list(found)[0] == "xafunc" and len(found) >= 3
    values = {k: vmap(f, in_dims=(None, 0))({}, x).detach() for k, f in found.items()}
    for name, v in values.items():
        assert_tree_close(v, values["xafunc"], rtol=RTOL, atol=ATOL, msg=name)
    for api in tc.APIS:
        grads = {}
        for name in [*found, tc.INLINE]:
            step, g = tc.make_step(case, name, api, F64)
            step()
            grads[name] = g()
        for name, g in grads.items():
            assert_tree_close(g, grads["xafunc"], rtol=RTOL, atol=ATOL, msg=f"{api} {name}")


@pytest.mark.parametrize("compile", [False, True])
def test_a_parameter_the_derivative_does_not_reach_gets_no_gradient(compile: bool) -> None:
    """The last bias does not reach a second-order coefficient: torch.func leaves its
    ``.grad`` None, which optimisers skip (Adam's weight decay and moments included). The
    node over the graph gave a zero tensor for the output nobody used (the coefficients'
    primal), and inductor's backward code a zero for every input; both give None now, and
    the other gradients are torch.func's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    v = torch.randn(5, 2, dtype=torch.float64)

    def ours() -> Tensor:
        return vmap(lambda a, b: xafunc.jet(lambda y: net(y).sum(), (a,), ((b, b * 0),),
                                            compile=compile)[1][1])(x, v)

    def theirs() -> Tensor:
        def second(a: Tensor, b: Tensor) -> Tensor:
            first = lambda y: torch.func.jvp(lambda z: net(z).sum(), (y,), (b,))[1]  # noqa: E731
            return torch.func.jvp(first, (a,), (b,))[1]
        return vmap(second)(x, v)

    def grads(fn: Callable[[], Tensor]) -> list[Tensor | None]:
        net.zero_grad(set_to_none=True)
        fn().pow(2).mean().backward()
        return [p.grad for p in net.parameters()]

    from xafunc._execute.executable import InductorStats

    expected = grads(theirs)
    assert expected[-1] is None
    ours()  # a call without a backward first: the next one recomputes (NOTE [Recompute])
    before = InductorStats.autograd_calls
    for _ in range(3):  # then records (or, with compile=True, runs inductor's backward code)
        got = grads(ours)
        assert got[-1] is None
        assert_tree_close(got[:-1], expected[:-1])
    assert (InductorStats.autograd_calls > before) == compile  # inductor's code ran, or not


# ------------------------------------------------------------- split graphs (training loop)
def _split_calls() -> int:
    from xafunc._execute.executable import SplitStats

    return SplitStats.calls


@pytest.mark.parametrize("operator", ["laplacian", "biharmonic", "order3"])
@pytest.mark.parametrize("how", ["backward", "func_grad"])
def test_training_loop_steps_run_the_split_graphs(operator: str, how: str) -> None:
    """NOTE [Split graphs]: from the second step of a training loop on a CPU, the forward
    keeps its activations and a backward graph computes the gradients. Five SGD steps (the
    weights change in place between steps, so both graphs' cached prologues are recomputed)
    give torch.func's parameters at every step, and the split backward ran on each step
    after the first."""
    net_x, net_t = make_net(width=16), make_net(width=16)
    x, _ = batch(0, n=6)
    opt_x = torch.optim.SGD(net_x.parameters(), lr=1e-3)
    opt_t = torch.optim.SGD(net_t.parameters(), lr=1e-3)
    d = _xafunc_residual(net_x, operator, 0)
    oracle = _oracle_residual(lambda p, xx: functional_call(net_t, p, (xx,)), operator, 1)
    before = _split_calls()
    for step in range(5):
        opt_t.zero_grad()
        r = vmap(oracle, in_dims=(None, 0))(dict(net_t.named_parameters()), x)
        ((r - forcing(x)) ** 2).mean().backward()
        opt_t.step()
        opt_x.zero_grad()
        if how == "func_grad":
            loss = lambda p: ((vmap(_xafunc_residual(  # noqa: E731
                lambda q, xx: functional_call(net_x, q, (xx,)), operator, 1),
                in_dims=(None, 0))(p, x) - forcing(x)) ** 2).mean()
            for name, g in grad(loss)(params_of(net_x)).items():
                net_x.get_parameter(name).grad = g
        else:
            ((vmap(d)(x) - forcing(x)) ** 2).mean().backward()
        assert_tree_close(grads_of(net_x), grads_of(net_t), rtol=RTOL, atol=ATOL,
                          msg=f"step {step}")
        opt_x.step()
    assert _split_calls() - before >= 4


def test_split_graphs_keep_autograd_semantics() -> None:
    """The split Function behaves as the operators autograd would record: a second backward
    through a retained graph gives the same gradients again, a non-contiguous cotangent is
    taken as it is, a double backward (a gradient penalty) differentiates the graph recorded
    operator by operator, and a weight written in place between the forward and the
    backward raises autograd's error instead of mixing old activations with new weights."""
    net = make_net(width=8)
    x, _ = batch(0, n=5)
    lap = vmap(xlaplacian(net))
    oracle = vmap(lambda xx: torch.func.hessian(net)(xx).diagonal(dim1=-2, dim2=-1).sum(-1))
    w = torch.linspace(-1.0, 2.0, 10, dtype=F64).reshape(2, 5).t()  # non-contiguous weights

    def grads(loss: Tensor, **kw: Any) -> list[Tensor]:
        # the last bias reaches no second derivative: None, for autograd and xafunc alike
        got = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True, **kw)
        assert got[-1] is None
        return list(got[:-1])

    def expected(loss_of: Callable[[Tensor], Tensor]) -> list[Tensor]:
        return grads(loss_of(oracle(x)))

    lap(x).sum().backward()  # the first backward recomputes; the loop records from then on
    net.zero_grad()
    before = _split_calls()

    # retain_graph, twice, and a cotangent that is a transposed view
    out = lap(x)
    loss = (out * w[:, :1]).sum()
    g1 = grads(loss, retain_graph=True)
    g2 = grads(loss)
    want = expected(lambda o: (o * w[:, :1]).sum())
    assert_tree_close(g1, want, rtol=RTOL, atol=ATOL)
    assert_tree_close(g2, want, rtol=RTOL, atol=ATOL)
    assert _split_calls() - before == 2

    # double backward: the gradient's norm differentiated again
    def penalty(o: Tensor) -> Tensor:
        gs = torch.autograd.grad(o.pow(2).sum(), list(net.parameters())[:-1],
                                 create_graph=True)
        return sum(g.pow(2).sum() for g in gs)  # type: ignore[return-value]

    assert_tree_close(grads(penalty(lap(x))), expected(penalty), rtol=1e-8, atol=1e-10)

    # a weight written in place before the backward
    out = lap(x).pow(2).sum()
    with torch.no_grad():
        net[0].weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
