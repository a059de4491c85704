"""Replay of the fast path as a CUDA graph (NOTE [CUDA graphs] in ``_execute/cuda_graph.py``):
that it runs (replay counts and the executor's name), that every call's result equals the
interpreter's and nested ``jacrev``'s in float64, and that no buffer is ever stale or shared:
new points, weights updated in place or rebound, results kept across calls, other streams, a
caller's own graph capture, ``vmap``, random ops. CUDA only (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import xafunc
from tests._compare import assert_tree_close, reference_deriv
from tests.conftest import CUDA
from xafunc._capture.cache import CACHE
from xafunc._execute import cuda_graph
from xafunc._execute.cuda_graph import ReplayStats
from xafunc._execute.executable import Executable

cuda_only = pytest.mark.skipif(not CUDA, reason="CUDA is not available")

DT = torch.float64


def _weights(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 3), (24, 24), (1, 24)]
    return [(torch.randn(*s, generator=g, dtype=DT) / s[1] ** 0.5).cuda() for s in shapes]


W = _weights() if CUDA else []


def mlp(x: torch.Tensor) -> torch.Tensor:
    """A tanh MLP on the module-level weights ``W`` (read afresh on every call)."""
    h = x
    for w in W[:-1]:
        h = torch.tanh(w @ h)
    return (W[-1] @ h).squeeze(0)


def _executables(func: object) -> list[Executable]:
    return [fn for e in CACHE.entries(func) for p in e.plans.values() if p.program is not None
            for fn in p.program.compiler.fns.values() if isinstance(fn, Executable)]


def _interpreted(monkeypatch: pytest.MonkeyPatch, fn, *args):
    """``fn(*args)`` with replay off: the interpreter's result."""
    with monkeypatch.context() as m:
        m.setattr(cuda_graph, "ENABLED", False)
        return fn(*args)


def _x(seed: int) -> torch.Tensor:
    return torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=DT).cuda()


@cuda_only
def test_replay_runs_and_equals_interpreter_and_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    t = xafunc.xderiv(mlp, 3)
    before = ReplayStats.replays
    xs = [_x(i) for i in range(6)]
    outs = [t(x) for x in xs]
    assert ReplayStats.replays - before >= len(xs) - cuda_graph.WARM_UP + 1
    assert any("CUDA graph" in e.executor for e in _executables(mlp)), \
        [e.executor for e in _executables(mlp)]
    for x, out in zip(xs, outs):
        assert_tree_close(out, _interpreted(monkeypatch, t, x), rtol=1e-12, atol=1e-14)
        assert_tree_close(out, reference_deriv(mlp, 3)(x))


@cuda_only
def test_results_are_never_overwritten_by_later_calls() -> None:
    t = xafunc.xhessian(mlp)
    kept = [t(_x(i)) for i in range(6)]
    for i, out in enumerate(kept):
        assert_tree_close(out, reference_deriv(mlp, 2)(_x(i)))
    assert ReplayStats.replays > 0


@cuda_only
def test_weight_updates_are_seen() -> None:
    global W
    saved = W
    try:
        t = xafunc.xderiv(mlp, 2)
        x = _x(0)
        for _ in range(4):
            t(x)
        with torch.no_grad():
            W[1].mul_(1.5)  # in place: version counter
        assert_tree_close(t(x), reference_deriv(mlp, 2)(x))
        W = _weights(1)  # rebound: new lifted inputs
        assert_tree_close(t(x), reference_deriv(mlp, 2)(x))
        assert_tree_close(t(_x(3)), reference_deriv(mlp, 2)(_x(3)))
    finally:
        W = saved


@cuda_only
def test_strided_inputs_and_another_stream() -> None:
    t = xafunc.xhessian(mlp)
    base = torch.randn(3, 4, dtype=DT, device="cuda")
    for i in range(4):
        t(base[:, i].contiguous())
    x = base[:, 1]  # strided view: copied into the dense buffer by value
    assert_tree_close(t(x), reference_deriv(mlp, 2)(x))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = t(_x(5))
    torch.cuda.current_stream().wait_stream(side)
    assert_tree_close(out, reference_deriv(mlp, 2)(_x(5)))


@cuda_only
def test_vmap_replays_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    t = vmap(xafunc.xhessian(mlp))
    before = ReplayStats.replays
    for i in range(5):
        xs = torch.randn(16, 3, generator=torch.Generator().manual_seed(i), dtype=DT).cuda()
        out = t(xs)
        assert_tree_close(out, _interpreted(monkeypatch, t, xs), rtol=1e-12, atol=1e-14)
        assert_tree_close(out, vmap(reference_deriv(mlp, 2))(xs))
    assert ReplayStats.replays > before


@cuda_only
def test_inside_a_callers_capture_the_interpreter_is_captured() -> None:
    t = xafunc.xhessian(mlp)
    x = _x(0)
    for _ in range(4):
        t(x)  # our own graph exists
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        t(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = t(static)
    static.copy_(_x(7))
    graph.replay()
    torch.cuda.synchronize()
    assert_tree_close(out, reference_deriv(mlp, 2)(_x(7)))


def _random_ops(e: Executable) -> list[object]:
    return [n.target for n in e.graph.nodes if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded in n.target.tags]


@cuda_only
@pytest.mark.fallback
def test_dropout_draws_match_torch_func_under_replay() -> None:
    """The engine draws dropout's mask in the primal pass and feeds it to the derivative
    graph, which has no random op and is replayed; a graph that drew would not be."""

    def f(x):
        return torch.nn.functional.dropout(mlp(x).expand(4), 0.5, training=True).sum()

    t = xafunc.xjacobian(f)
    before = ReplayStats.replays
    for i in range(5):
        torch.manual_seed(i)
        out = t(_x(i))
        torch.manual_seed(i)
        assert_tree_close(out, reference_deriv(f, 1)(_x(i)))
    exes = _executables(f)
    assert all("CUDA graph" not in e.executor for e in exes if _random_ops(e))
    if exes:  # the engine ran (not the reference): its derivative graph was replayed
        assert ReplayStats.replays > before


@cuda_only
def test_cpu_scalar_operands_are_not_captured() -> None:
    scale = torch.tensor(2.0, dtype=DT)  # a CPU 0-dim tensor in a CUDA graph

    def f(x):
        return mlp(x) * scale

    t = xafunc.xhessian(f)
    for i in range(4):
        assert_tree_close(t(_x(i)), reference_deriv(f, 2)(_x(i)))
    scale.fill_(3.0)
    assert_tree_close(t(_x(0)), reference_deriv(f, 2)(_x(0)))


# the buffers and the eligibility check, on the CPU (no capture needed)


def test_slots_copy_values_and_keep_the_captured_layout() -> None:
    from xafunc._execute.cuda_graph import _Slot

    x = torch.randn(4, 3, dtype=DT)
    dense = _Slot(x.t())
    assert dense.view.stride() == x.t().stride()
    y = torch.randn(3, 4, dtype=DT)  # a later argument laid out otherwise: copied by value
    assert dense.load(y) and torch.equal(dense.view, y)
    w = torch.randn(5, dtype=DT)
    expanded = _Slot(w.expand(3, 5))  # broadcast: the storage span is copied
    assert expanded.flat.numel() == 5 and expanded.view.stride() == (0, 1)
    w2 = torch.randn(5, 7, dtype=DT)[:, 2]
    assert not expanded.load(w2.expand(3, 5))  # broadcast with other strides: refused
    assert not expanded.load(torch.randn(3, 5, dtype=DT))  # not broadcast: the interpreter
    w3 = torch.randn(5, dtype=DT)
    assert expanded.load(w3.expand(3, 5)) and torch.equal(expanded.view, w3.expand(3, 5))
    gapped = _Slot(x[:, 1])  # strided: a contiguous buffer, loaded by value
    assert gapped.view.is_contiguous()
    assert gapped.load(y[2]) and torch.equal(gapped.view, y[2])
    empty = _Slot(torch.empty(0, 3, dtype=DT))
    assert empty.load(torch.empty(0, 3, dtype=DT))


def test_random_ops_are_refused() -> None:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(3, device="meta")
    y = graph.call_function(torch.ops.aten.bernoulli.p, (x, 0.5))
    y.meta["val"] = torch.empty(3, device="meta")
    graph.output((y,))
    assert cuda_graph.why_not(graph) == "a value on meta"
    if CUDA:
        for n in (x, y):
            n.meta["val"] = torch.empty(3, device="cuda")
        assert cuda_graph.why_not(graph) == "a random op (aten.bernoulli.p)"


def test_cpu_graphs_are_never_captured() -> None:
    def f(x):
        return torch.tanh(x).sum()

    t = xafunc.xhessian(f)
    for _ in range(4):
        t(torch.randn(3, dtype=DT))
    exes = _executables(f)
    assert exes and all(e._fast.why_not_graph == "a value on cpu" for e in exes)
    assert all(e._fast.cuda_graph is None for e in exes)


def test_inputs_on_several_devices_are_named() -> None:
    """A graph whose inputs (arguments, hoisted values, scalar operands) are not all on the
    first one's device is never captured; the reason names the input (the executor's report)."""
    x, w = torch.ones(3, device="meta"), torch.ones(2, 2, device="meta")
    assert cuda_graph.input_problem([x, w]) is None
    assert cuda_graph.input_problem([x, w, torch.tensor(2.0)]) == \
        "its input 2 (shape ()) is on cpu, not meta"
    assert cuda_graph.input_problem([x, 1.5]) == "its input 1 is a float"


def test_cpu_constants_move_to_the_arguments_device() -> None:
    """0-dim CPU constants of a graph (tracing leaves them, e.g. the Python numbers autograd
    saves for a traced backward) reach the main part on the arguments' device, so that its
    inputs can be captured; on the CPU they stay. (``meta`` stands in for a GPU.)"""
    def f(x, w):
        return (x * w).sum() * torch.tensor(0.5, dtype=DT) + torch.tanh(w).sum()

    from torch.fx.experimental.proxy_tensor import make_fx

    from xafunc._execute.executable import _FastPath

    fast = _FastPath(make_fx(f)(torch.ones(3), torch.ones(3)), 1)
    meta = fast.hoisted((torch.ones(3, device="meta"), torch.ones(3, device="meta")))
    assert meta and all(v.device.type == "meta" for v in meta)
    cpu = fast.hoisted((torch.ones(3), torch.ones(3)))
    assert any(v.dim() == 0 for v in cpu) and all(v.device.type == "cpu" for v in cpu)


def test_peak_bytes_frees_each_value_after_its_last_use() -> None:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(1000, device="meta")  # an input: not the pool's
    nodes = [x]
    for _ in range(5):  # a chain: two values alive at a time
        nodes.append(graph.call_function(torch.ops.aten.sin.default, (nodes[-1],)))
        nodes[-1].meta["val"] = torch.empty(1000, device="meta")
    graph.output((nodes[-1],))
    assert cuda_graph.peak_bytes(graph) == 2 * 4000


@cuda_only
@pytest.mark.parametrize("operator", ["laplacian", "order3"])
def test_training_then_evaluation_match_torch_func(operator: str) -> None:
    """SGD on a PINN loss with inline transforms and ``loss.backward()`` (recorded graphs, not
    replayed: NOTE [Recompute]), then evaluation without gradients (replayed): the
    parameters after every step and the evaluated residuals equal a nested-torch.func twin's."""
    from tests._pinn import batch, forcing, make_net, oracle_residual, residual_fn

    net, twin = make_net(width=16).cuda(), make_net(width=16).cuda()
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=1e-3) for m in (net, twin))
    for step in range(4):
        x = batch(step)[0].cuda()
        for o, residual in ((opt, residual_fn(net, operator)),
                            (opt_twin, lambda xx: oracle_residual(twin, operator, xx))):
            o.zero_grad()
            ((residual(x) - forcing(x)) ** 2).mean().backward()
            o.step()
        assert_tree_close(dict(net.named_parameters()), dict(twin.named_parameters()),
                          rtol=1e-9, atol=1e-12, msg=f"step {step}")
    before = ReplayStats.replays
    with torch.no_grad():
        for step in range(4, 9):
            x = batch(step)[0].cuda()
            assert_tree_close(residual_fn(net, operator)(x), oracle_residual(twin, operator, x),
                              rtol=1e-9, atol=1e-12, msg=f"evaluation {step}")
    assert ReplayStats.replays > before


def test_math_modes_follow_the_flags() -> None:
    before = cuda_graph.math_modes()
    old = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = not old
        assert cuda_graph.math_modes() != before
    finally:
        torch.backends.cudnn.allow_tf32 = old
    assert cuda_graph.math_modes() == before


@cuda_only
def test_a_changed_math_mode_captures_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """TF32 turned on after capture: the next call captures again (the interpreter would
    pick TF32 kernels now) and equals the interpreter's result under the same setting."""
    w = torch.randn(64, 64, device="cuda") / 8

    def f(x):
        return torch.tanh(w @ torch.tanh(w @ x)).sum()

    t = xafunc.xhessian(f)
    x = torch.randn(64, device="cuda")
    for _ in range(4):
        t(x)
    captures = ReplayStats.captures
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        for _ in range(4):
            out = t(x)
        assert ReplayStats.captures > captures
        assert_tree_close(out, _interpreted(monkeypatch, t, x), rtol=1e-3, atol=1e-5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
