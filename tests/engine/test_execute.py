"""The fast executor of compiled graphs (:mod:`xafunc._execute`): when it runs, that it returns
what the FX graph returns, and that it never serves stale or shared values.

NOTE [Fast execution] in ``_execute.py`` says when the fast path (hoisted constants +
TorchScript) is taken; everything else runs the FX graph. Values are compared against nested
``torch.func.jacrev`` in float64 through ``tests._compare``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import jacrev, vmap

import xafunc
from tests._compare import assert_tree_close
from xafunc._capture.cache import CACHE
from xafunc._execute.executable import Executable, plain_call

DT = torch.float64


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
        torch.nn.Linear(8, 2)).to(DT)


def _compiled(func: object) -> list[tuple[object, Executable]]:
    """``(key, graph)`` of the compiled graphs of every engine plan built for ``func``."""
    return [(k, fn) for e in CACHE.entries(func) for p in e.plans.values()
            if p.program is not None for k, fn in p.program.compiler.fns.items()
            if isinstance(fn, Executable)]


def _executables(func: object) -> list[Executable]:
    """The compiled graphs of every engine plan built for ``func``."""
    return [fn for _, fn in _compiled(func)]


def _hessian_ref(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return jacrev(jacrev(net))(x).detach()


def test_plain_call_uses_torchscript_and_matches():
    net = _net()
    x = torch.randn(3, dtype=DT)
    h = xafunc.xhessian(net)
    with torch.no_grad():
        out = h(x)
        again = h(x)
    assert_tree_close(out, _hessian_ref(net, x))
    assert_tree_close(again, out, rtol=0.0, atol=0.0)
    assert [e.executor.split(",")[0] for e in _executables(net)] == ["torchscript"]


def test_autograd_through_the_transform_recomputes_then_records():
    """Weights that require grad, grad mode on: the result carries autograd history and its
    gradients (first and second order) with respect to the weights match torch.func's. The
    first call runs the fast path under one recompute node (NOTE [Recompute]); once a backward
    pass has asked for history, calls record it directly."""
    net = _net(1)
    x = torch.randn(3, dtype=DT)
    h = xafunc.xhessian(net)
    out = h(x)
    assert out.requires_grad and type(out.grad_fn).__name__ == "_RecomputeBackward"
    (exe,) = _executables(net)
    assert exe.executor.startswith("torchscript") and not exe.recording
    params = list(net.parameters())

    def grads(value: torch.Tensor, create: bool = False) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(value.square().sum(), params, allow_unused=True,
                                   materialize_grads=True, create_graph=create)

    expected = grads(jacrev(jacrev(net))(x))
    assert_tree_close(grads(out), expected)
    assert exe.recording  # the backward pass switched this graph to recording
    again = h(x)
    assert type(again.grad_fn).__name__ != "_RecomputeBackward"
    assert_tree_close(grads(again), expected)
    # double backward through the recompute node
    fresh = _net(1)
    w0, w1 = list(fresh.parameters())[0], list(fresh.parameters())[2]
    g = torch.autograd.grad(xafunc.xhessian(fresh)(x).square().sum(), w0, create_graph=True)[0]
    g_ref = torch.autograd.grad(jacrev(jacrev(fresh))(x).square().sum(), w0,
                                create_graph=True)[0]
    assert_tree_close(torch.autograd.grad(g.sum(), w1)[0], torch.autograd.grad(g_ref.sum(), w1)[0])


def test_in_place_weight_updates_are_seen():
    """Hoisted values are recomputed when a weight changes in place (an optimiser step)."""
    net = _net(2)
    x = torch.randn(3, dtype=DT)
    h = xafunc.xhessian(net)
    with torch.no_grad():
        first = h(x)
        for p in net.parameters():
            p.mul_(1.5).add_(0.1)
        second = h(x)
    assert_tree_close(second, _hessian_ref(net, x))
    assert not torch.allclose(first, second)


def test_replaced_weight_data_is_seen():
    """``w.data = new`` does not bump the version counter but moves the storage."""
    net = _net(8)
    x = torch.randn(3, dtype=DT)
    h = xafunc.xhessian(net)
    with torch.no_grad():
        h(x)
        for p in net.parameters():
            p.data = p.data * 0.5 + 0.2
        out = h(x)
    assert_tree_close(out, _hessian_ref(net, x))


def test_static_outputs_are_fresh_tensors():
    """A derivative that depends only on the weights (the Jacobian of a linear map) comes
    from the cached prologue; every call must still return a tensor of its own."""
    w = torch.randn(4, 3, dtype=DT)
    w_before = w.clone()
    jac = xafunc.xjacobian(lambda x: w @ x)
    x = torch.randn(3, dtype=DT)
    first = jac(x)
    first.add_(100.0)  # must touch neither the weights nor a cached value
    assert_tree_close(w, w_before, rtol=0.0, atol=0.0)
    assert_tree_close(jac(x), w_before, rtol=0.0, atol=0.0)


def test_vmap_runs_the_fast_path():
    net = _net(3)
    xs = torch.randn(6, 3, dtype=DT)
    h = xafunc.xhessian(net)
    with torch.no_grad():
        out = vmap(h)(xs)
    assert_tree_close(out, vmap(jacrev(jacrev(net)))(xs).detach())
    assert "torchscript" in [e.executor.split(",")[0] for e in _executables(net)]


def _record_dispatch(exe: Executable) -> list[bool]:
    """Wrap ``exe``'s fast path so that each run of its main part records whether it ran
    beneath the autograd dispatch keys (NOTE [Below autograd])."""
    fast, seen = exe._fast, []
    main = fast.main

    def recorded(*args: torch.Tensor) -> object:
        seen.append(torch._C._dispatch_tls_is_dispatch_key_excluded(
            torch._C.DispatchKey.ADInplaceOrView))
        return main(*args)

    fast.main = recorded
    return seen


def test_plain_calls_run_beneath_the_autograd_keys():
    """NOTE [Below autograd]: a plain call's main part runs beneath autograd's dispatch keys
    -- without gradients, under the recompute node (weights that require grad) and under
    ``vmap`` --, but not while forward-mode AD or autocast act on the call; every value and
    the autograd history of the result are still torch.func's."""
    import torch.autograd.forward_ad as fwAD

    net = _net(5)
    x, xs = torch.randn(3, dtype=DT), torch.randn(4, 3, dtype=DT)
    h = xafunc.xhessian(net)
    with torch.no_grad():
        h(x), vmap(h)(xs)
    (_, single), (_, batched) = sorted(_compiled(net), key=lambda kv: "vmap" in str(kv[0]))
    seen = _record_dispatch(single)
    seen_batched = _record_dispatch(batched)
    with torch.no_grad():
        assert_tree_close(h(x), _hessian_ref(net, x))
        assert_tree_close(vmap(h)(xs), vmap(jacrev(jacrev(net)))(xs).detach())
    out = h(x)  # weights require grad: the recompute node
    assert type(out.grad_fn).__name__ == "_RecomputeBackward"
    params = list(net.parameters())
    got = torch.autograd.grad(out.square().sum(), params, allow_unused=True,
                              materialize_grads=True)
    expected = torch.autograd.grad(jacrev(jacrev(net))(x).square().sum(), params,
                                   allow_unused=True, materialize_grads=True)
    assert_tree_close(got, expected)
    assert seen == [True, True] and seen_batched == [True]
    with torch.no_grad():
        with fwAD.dual_level():
            assert_tree_close(h(x), _hessian_ref(net, x))
    assert seen == [True, True, False]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h(x)  # captured again: autocast's dtype is part of the signature
        (cast,) = [e for e in _executables(net) if e not in (single, batched)]
        seen_cast = _record_dispatch(cast)
        h(x)
    assert seen_cast == [False]


def test_outputs_sharing_storage_run_above_the_autograd_keys():
    """An output that is a view of the argument keeps autograd's view metadata and shared
    version counter, as eager code gives it (NOTE [Below autograd])."""
    f = lambda x: (x.sin().sum(), x.view(-1))  # noqa: E731
    jac = xafunc.xjacobian(f, has_aux=True)
    x = torch.randn(2, 3, dtype=DT)
    jac(x)
    (exe,) = _executables(f)
    assert exe._fast.below_autograd is False
    seen = _record_dispatch(exe)
    d, aux = jac(x)
    assert seen == [False]
    assert_tree_close(d, torch.cos(x))
    assert aux._base is x
    version = x._version
    aux.add_(1.0)
    assert x._version == version + 1


def test_output_aliasing_analysis():
    """:func:`_may_alias_outputs` on small graphs: fresh outputs are not aliased; an output
    that is an input, a view of one, returned twice, or a view of another output is; so is a
    graph that writes into an input."""
    from torch.fx import symbolic_trace

    from xafunc._execute.executable import _may_alias_outputs

    aten = torch.ops.aten

    def aliased(fn: object) -> bool:
        return _may_alias_outputs(symbolic_trace(fn).graph)

    assert not aliased(lambda x: (aten.mul.Tensor(x, 2), aten.sin.default(x)))
    assert not aliased(lambda x: aten.reshape.default(aten.mul.Tensor(x, 2), [-1]))
    assert aliased(lambda x: (aten.sin.default(x), x))
    assert aliased(lambda x: aten.reshape.default(x, [-1]))
    assert aliased(lambda x: (lambda y: (y, y))(aten.sin.default(x)))
    assert aliased(lambda x: (lambda y: (y, aten.permute.default(y, [1, 0])))(
        aten.sin.default(x)))
    assert aliased(lambda x: (lambda p: (p[0], p[1]))(
        aten.split_with_sizes.default(aten.sin.default(x), [1, 1])))
    assert aliased(lambda x: aten.sum.default(aten.mul_.Tensor(x, 2)))
    # a method or other callable is taken to alias its inputs
    assert aliased(lambda x: x.view(-1))
    assert not aliased(lambda x: aten.sin.default(x).view(-1))
    assert not aliased(lambda x: aten.mul_.Tensor(aten.sin.default(x), 2))


def _deep_net(seed: int = 0, depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(3, 16), torch.nn.Tanh()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(16, 16), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(16, 1)).to(DT)


def _count_static_runs(exe: Executable) -> list[int]:
    """Wrap ``exe``'s static runtime so that each of its runs is counted."""
    fast, runs = exe._fast, [0]
    static = fast.static
    assert static is not None, exe.executor

    def counted(*args: torch.Tensor) -> object:
        runs[0] += 1
        return static(*args)

    fast.static = counted
    return runs


def _deriv4_ref(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return jacrev(jacrev(jacrev(jacrev(net))))(x).detach()


def test_small_graphs_run_by_the_static_runtime():
    """NOTE [Static runtime]: a small graph of many operators per output runs by PyTorch's
    static runtime on plain calls, without gradients, under the recompute node and under
    ``vmap``; its results are torch.func's, ordinary tensors of their own (an in-place update
    and autograd accept them, a later call does not write them), and gradients through the
    recompute node are torch.func's."""
    net = _deep_net()
    x, xs = torch.randn(3, dtype=DT), torch.randn(4, 3, dtype=DT)
    d4 = xafunc.xderiv(net, 4)
    with torch.no_grad():
        d4(x), vmap(d4)(xs)
    exes = _executables(net)
    assert len(exes) == 2 and all(e.executor == "torchscript, run by the static runtime"
                                  for e in exes), [e.executor for e in exes]
    runs = [_count_static_runs(e) for e in exes]
    with torch.no_grad():
        first = d4(x)
        second = d4(x)
        assert_tree_close(vmap(d4)(xs), vmap(jacrev(jacrev(jacrev(jacrev(net)))))(xs).detach())
    expected = _deriv4_ref(net, x)
    assert_tree_close(first, expected)
    assert not first.is_inference() and first.data_ptr() != second.data_ptr()
    version = first._version
    first.add_(1.0)  # an inference tensor would refuse this outside inference mode
    assert first._version == version + 1
    assert_tree_close(second, expected)  # not written by the first call's update
    w = torch.ones((), dtype=DT, requires_grad=True)
    (second * w).sum().backward()  # saved for backward: no inference tensor
    assert_tree_close(w.grad, expected.sum())
    out = d4(x)  # weights require grad: the recompute node
    assert type(out.grad_fn).__name__ == "_RecomputeBackward"
    params = list(net.parameters())
    got = torch.autograd.grad(out.square().sum(), params, allow_unused=True,
                              materialize_grads=True)
    assert_tree_close(got, torch.autograd.grad(
        jacrev(jacrev(jacrev(jacrev(net))))(x).square().sum(), params, allow_unused=True,
        materialize_grads=True))
    assert sorted(r[0] for r in runs) == [1, 3]  # three single calls, one batched
    assert "static runtime" in str(xafunc.plan(net, 4)(x))


def test_the_static_runtime_is_kept_only_where_it_matches_torchscript(monkeypatch):
    """Built, the static runtime runs on the tracing inputs; a runtime whose outputs differ
    from TorchScript's in a value, a NaN or a stride is never used."""
    from xafunc._execute import executable as ex

    real = torch._C._jit_to_static_module

    def changed(how: str):  # a runtime whose outputs differ from TorchScript's
        def build(graph: torch._C.Graph) -> object:
            module = real(graph)

            def run(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
                outs = list(module(*args))
                first = outs[0].clone()
                if how == "value":  # one unit in the last place
                    first.view(-1)[0] = torch.nextafter(first.view(-1)[0],
                                                        torch.tensor(float("inf"), dtype=DT))
                elif how == "nan":
                    first.view(-1)[0] = float("nan")
                else:  # the same values laid out column-major
                    dims = list(reversed(range(first.dim())))
                    first = first.permute(dims).contiguous().permute(dims)
                outs[0] = first
                return tuple(outs)
            return run
        return build

    net, x = _deep_net(1), torch.randn(3, dtype=DT)
    for how in ("value", "nan", "stride", "none"):
        xafunc.clear_cache()
        if how != "none":
            monkeypatch.setattr(torch._C, "_jit_to_static_module", changed(how))
        with torch.no_grad():
            assert_tree_close(xafunc.xderiv(net, 4)(x), _deriv4_ref(net, x))
        monkeypatch.setattr(torch._C, "_jit_to_static_module", real)
        (exe,) = _executables(net)
        assert (exe._fast.static is None) == (how != "none"), (how, exe.executor)
    # where it does not apply: too many outputs per operator, too many bytes
    monkeypatch.setattr(ex, "STATIC_RUNTIME_OPS_PER_OUTPUT", 10**6)
    xafunc.clear_cache()
    with torch.no_grad():
        xafunc.xderiv(net, 4)(x)
    assert [e.executor for e in _executables(net)] == ["torchscript"]
    monkeypatch.setattr(ex, "STATIC_RUNTIME_OPS_PER_OUTPUT", 1)
    monkeypatch.setattr(ex, "STATIC_RUNTIME_BYTES", 0)
    xafunc.clear_cache()
    with torch.no_grad():
        xafunc.xderiv(net, 4)(x)
    assert [e.executor for e in _executables(net)] == ["torchscript"]


def test_the_static_runtime_under_threads():
    """Calls from several threads at once (the runtime keeps one state per graph, which the
    Python lock serialises) all return torch.func's values."""
    import threading

    net = _deep_net(2)
    xs = torch.randn(8, 3, dtype=DT)
    d4 = xafunc.xderiv(net, 4)
    with torch.no_grad():
        d4(xs[0])
    (exe,) = _executables(net)
    assert "static runtime" in exe.executor
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(20):
                results[i] = d4(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        assert_tree_close(results[i], _deriv4_ref(net, x))


def test_inference_tensors_have_no_version_counter():
    net = _net(4)
    x = torch.randn(3, dtype=DT)
    with torch.inference_mode():
        for p in net.parameters():
            p.data = p.data.clone()  # inference tensors as weights
        h = xafunc.xhessian(net)
        out = h(x)
        again = h(x)
    with torch.no_grad():
        expected = _hessian_ref(net, x.clone())
    assert_tree_close(out, expected)
    assert_tree_close(again, expected)


def test_constants_made_under_inference_mode_serve_later_calls():
    """The process-wide constants a propagation is traced with (seeds, interpolation
    matrices) are ordinary tensors even when first made under ``torch.inference_mode``: a
    third derivative evaluated there once, then another model's third derivatives (the same
    cached constants) backpropagated, and differentiated by ``jacrev``, are torch.func's
    (inference tensors in those caches made every later backward raise)."""
    xafunc.clear_cache()
    from xafunc._engine import interpolate

    interpolate.interpolation_constants.cache_clear()
    x = torch.randn(3, dtype=DT)
    with torch.inference_mode():
        xafunc.xderiv(_net(5), 3)(x)
    net = _net(6)
    for _ in range(2):
        net.zero_grad(set_to_none=True)
        xafunc.xderiv(net, 3)(x).sum().backward()
    grads = [p.grad for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    jacrev(jacrev(jacrev(net)))(x).sum().backward()
    assert_tree_close(grads, [p.grad for p in net.parameters()])
    assert_tree_close(jacrev(lambda y: xafunc.xderiv(net, 3)(y).sum())(x),
                      jacrev(lambda y: jacrev(jacrev(jacrev(net)))(y).sum())(x))


def test_plain_call_conditions():
    x = torch.randn(2)
    assert plain_call((x,))
    assert not plain_call((x, 1.0))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not plain_call((mode.from_tensor(x),))

    seen = []

    def probe(v: torch.Tensor) -> torch.Tensor:
        seen.append(plain_call((v,)))
        return v

    vmap(probe)(torch.randn(3, 2))
    assert seen == [False]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_fast_and_fx_paths_agree(order: int):
    """The same transform, called with and without a gradient requirement, gives the same
    numbers through the two executors."""
    net = _net(5)
    x = torch.randn(3, dtype=DT)
    d = xafunc.xderiv(net, order)
    slow = d(x).detach()
    with torch.no_grad():
        fast = d(x)
    assert_tree_close(fast, slow)


def test_results_are_row_major_like_torch_func():
    """Pass 9 of NOTE [Graph simplification]: derivatives come back contiguous, as
    ``jacrev``'s do (an hourglass Jacobian is ``mm(...).t()`` before the rewrite)."""
    torch.manual_seed(6)
    w1, w2 = torch.randn(4, 64, dtype=DT), torch.randn(64, 4, dtype=DT)

    def hourglass(x: torch.Tensor) -> torch.Tensor:
        return w2 @ torch.tanh(w1 @ x)

    x = torch.randn(64, dtype=DT)
    net = _net(7)
    results = {
        "jacobian": (xafunc.xjacobian(hourglass)(x), jacrev(hourglass)(x)),
        "order 3": (xafunc.xderiv(net, 3)(x[:3]), jacrev(jacrev(jacrev(net)))(x[:3])),
        "vmap hessian": (vmap(xafunc.xhessian(net))(x[:12].reshape(4, 3)),
                         vmap(jacrev(jacrev(net)))(x[:12].reshape(4, 3))),
    }
    for name, (got, expected) in results.items():
        assert_tree_close(got, expected.detach(), msg=name)
        assert got.is_contiguous(), name


def test_buffer_reuse_rewrites_only_dead_owned_buffers():
    """NOTE [Buffer reuse]: ops write into operands nothing else reads; inputs, values read
    twice and expanded views are never written."""
    from xafunc._capture.tracer import record
    from xafunc._execute.executable import reuse_buffers

    def fn(a, b, c):
        t = (a * b).reshape(4, 1, 3) * c     # a * b: fresh, read once -> reused
        u = torch.tanh(t)                    # t read once -> tanh_
        kept = a + 1.0                       # read twice below: not overwritten
        e = (a * 2.0).expand(4, 3)           # a view that overlaps itself: never written
        return u * 2.0, kept * b + kept, e + 1.0

    args = (torch.randn(1, 3), torch.randn(4, 3), torch.randn(4, 1, 3))
    before = [a.clone() for a in args]
    gm = record(fn, [*args])
    reuse_buffers(gm.graph)
    gm.recompile()
    mutated = [n for n in gm.graph.nodes if n.op == "call_function"
               and getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable]
    assert len(mutated) >= 3, gm.code
    for n in mutated:
        assert n.args[0].op != "placeholder"
        assert n.args[0].target is not torch.ops.aten.expand.default
    assert_tree_close(gm(*args), fn(*args), rtol=0.0, atol=0.0)
    assert_tree_close(list(args), before, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_scalar_operands_become_inputs_of_the_op_dtype(dtype):
    """NOTE [Scalar operands]: Python numbers in CPU float32/float64 arithmetic become 0-dim
    inputs of the result dtype (no per-call conversion of a wrapped number), numbers first
    included (``1 - x`` is ``sub(1, x)``), with exactly the values eager dispatch gives;
    integer operands promote as they would; half precision is left alone."""
    from xafunc._capture.tracer import record
    from xafunc._execute.executable import scalar_inputs

    def fn(x, n):
        a = torch.ops.aten.sub.Tensor(1, x * 1.3333333333333333)
        b = torch.ops.aten.div.Tensor(x, 3) + torch.ops.aten.mul.Tensor(0.1, x)
        c = torch.ops.aten.add.Tensor(x, 2.5, alpha=2)  # alpha: left as it is
        return a, b, c, n * 0.7, torch.ops.aten.div.Tensor(n, 3)

    args = (torch.randn(5, dtype=dtype), torch.arange(5))
    gm = record(fn, [*args])
    graph = gm.graph
    values = scalar_inputs(graph)
    new = torch.fx.GraphModule(gm, graph)
    numbers = [a for n in graph.nodes if n.op == "call_function" for a in n.args
               if type(a) in (int, float)]
    # one input per distinct (dtype, number); the integer tensor's ops compute in float32
    expected = [(torch.float32, 0.7), (torch.float32, 3)]
    if dtype == torch.float16:
        assert 2.5 in numbers and 1.3333333333333333 in numbers
    else:
        assert numbers == [2.5], new.code  # only the alpha case keeps its number
        expected += [(dtype, 1), (dtype, 1.3333333333333333), (dtype, 3), (dtype, 0.1)]
    assert sorted((str(v.dtype), v.item()) for v in values) == sorted(
        {(str(t), torch.tensor(v, dtype=t).item()) for t, v in expected})
    got = new(*args, *values)
    assert_tree_close(list(got), list(fn(*args)), rtol=0.0, atol=0.0)
    assert [t.dtype for t in got] == [t.dtype for t in fn(*args)]


def test_plain_calls_convert_no_scalars():
    """Through the transforms, a TorchScript-run Taylor propagation dispatches no ``to``
    (NOTE [Scalar operands]); plain and autograd paths agree with the oracle."""
    from torch.profiler import profile

    net = _net(8).float()
    x = torch.randn(3)
    d = xafunc.xderiv(net, 3)
    with torch.no_grad():
        d(x)
        with profile() as prof:
            fast = d(x)
    names = [e.name for e in prof.events()]
    assert "aten::tanh_" in names or "aten::tanh" in names  # the compiled graph ran
    assert "aten::to" not in names, sorted(set(names))
    assert [e.executor.split(",")[0] for e in _executables(net)] == ["torchscript"]
    assert_tree_close(fast, jacrev(jacrev(jacrev(net.double())))(x.double()).float().detach(),
                      rtol=1e-4, atol=1e-5)


def test_batched_weights_are_row_major_in_the_prologue():
    """A weight that ``vmap`` broadcasts over the batch for ``bmm`` (``expand(permute(w))``)
    is copied to row-major once, in the cached prologue, before it is expanded; the numbers
    are the oracle's."""
    torch.manual_seed(9)
    w1, w2, w3 = (torch.randn(*s, dtype=DT) for s in ((16, 3), (16, 16), (2, 16)))

    def u(x: torch.Tensor) -> torch.Tensor:
        # the narrow last layer keeps a bmm (each batch entry a tall transposed matrix, pass
        # 11 of NOTE [Graph simplification]); the other products are one mm each
        return (w3 @ torch.tanh(w2 @ torch.tanh(w1 @ x))).sum(-1, keepdim=True)

    xs = torch.randn(8, 3, dtype=DT)
    lap = vmap(xafunc.xlaplacian(u))
    with torch.no_grad():
        got = lap(xs)
        assert_tree_close(lap(xs), got, rtol=0.0, atol=0.0)
    expected = vmap(lambda x: jacrev(jacrev(u))(x).diagonal(dim1=-2, dim2=-1).sum(-1))(xs)
    assert_tree_close(got, expected.detach())
    fast = [fn._fast for e in CACHE.entries(u) for p in e.plans.values()
            for fn in p.compiler.fns.values() if isinstance(fn, Executable)]
    assert fast, "the batched fast path did not run"
    expands = [n for f in fast for n in f.prologue.graph.nodes
               if n.target is torch.ops.aten.expand.default]
    assert expands and all(n.args[0].target is torch.ops.aten.clone.default for n in expands), \
        fast[0].prologue.code


def test_thin_weights_are_column_major_in_the_prologue():
    """The reverse sweep's product with a first layer's weight (``(k, n)``, ``n`` 2-8, ``k >=
    16``: MKL is slow over it row-major) reads a column-major copy made once in the cached
    prologue; the numbers are the oracle's."""
    torch.manual_seed(11)
    w1, w2, w3 = (torch.randn(*s, dtype=DT) / 4 for s in ((32, 3), (32, 32), (1, 32)))

    def u(x: torch.Tensor) -> torch.Tensor:
        return (w3 @ torch.tanh(w2 @ torch.tanh(w1 @ x))).sum()

    xs = torch.randn(16, 3, dtype=DT)
    hess = vmap(xafunc.xhessian(u))
    with torch.no_grad():
        got = hess(xs)
        assert_tree_close(hess(xs), got, rtol=0.0, atol=0.0)
    assert_tree_close(got, vmap(jacrev(jacrev(u)))(xs).detach())
    fast = [fn._fast for fn in _executables(u)]
    assert fast, "the batched fast path did not run"
    aten = torch.ops.aten
    copies = [n for f in fast for n in f.prologue.graph.nodes  # permute(clone(permute(w1)))
              if n.target is aten.clone.default and tuple(n.args[0].meta["val"].shape) == (3, 32)
              and any(u.target is aten.permute.default for u in n.users)]
    assert copies, fast[0].prologue.code


def _assert_transposed_product(f, got, oracle, dtype) -> None:
    """``got`` is the float64 ``oracle`` to ``dtype``'s rounding, and ``f``'s traced graphs
    run the ``(8, 1024)`` product transposed, never the ``(1024, 8)`` one."""
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    assert_tree_close(got, oracle.to(dtype), **tol)
    main = [e._fast.main for e in _executables(f)]
    assert main and all(isinstance(m, torch.jit.ScriptFunction) for m in main), main
    products = [tuple(n.output().type().sizes()) for m in main for n in m.graph.nodes()
                if n.kind() == "aten::mm"]
    assert (8, 1024) in products and (1024, 8) not in products, products


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thin_products_are_computed_transposed(dtype: torch.dtype):
    """A forward Jacobian's tangents through a wide layer, ``(1024, 256) @ (256, 8)`` (MKL is
    4x slower over it than over the transposed product), run as ``(B^T A^T)^T``, copied back
    to row-major (NOTE [Thin products]): the oracle's numbers, a contiguous result."""
    torch.manual_seed(13)
    w1, w2 = torch.randn(256, 8, dtype=dtype) / 3, torch.randn(1024, 256, dtype=dtype) / 16

    def f(x: torch.Tensor) -> torch.Tensor:
        return w2 @ torch.tanh(w1 @ x)

    x = torch.randn(8, dtype=dtype)
    jac = xafunc.xjacobian(f)
    got = jac(x)
    assert got.is_contiguous()
    oracle = jacrev(lambda x: w2.double() @ torch.tanh(w1.double() @ x))(x.double())
    # the product the traced graph runs: (8, 256) @ (256, 1024)
    _assert_transposed_product(f, got, oracle, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thin_products_by_a_transposed_weight_stay_transposed(dtype: torch.dtype):
    """Per-sample Hessians under ``vmap`` push the tangents of 64 samples x 16 directions
    through ``h @ W2.T`` with ``W2`` of 8 rows: a row-major ``(1024, 64)`` by a column-major
    ``(64, 8)``, which runs as ``(W2 @ h^T)^T``, an ``(8, 1024)`` product left transposed for
    the ops that read it (NOTE [Thin products]): the oracle's numbers, contiguous results."""
    torch.manual_seed(14)
    w1, w2 = torch.randn(64, 16, dtype=dtype) / 4, torch.randn(8, 64, dtype=dtype) / 8

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.tanh(x @ w1.T) @ w2.T).sum()

    xs = torch.randn(64, 16, dtype=dtype)
    got = vmap(xafunc.xhessian(f))(xs)
    assert got.is_contiguous()
    oracle = vmap(jacrev(jacrev(lambda x: torch.tanh(
        torch.tanh(x @ w1.double().T) @ w2.double().T).sum())))(xs.double())
    _assert_transposed_product(f, got, oracle, dtype)


def test_power_of_two_factors_move_onto_hoisted_weights():
    """``(x * s) * 2`` with ``s`` computed from the weights alone (a symmetric term of the
    adjoint Hessian) runs as ``x * (s * 2)``, the scaled factor cached in the prologue: the
    per-call graph has no product by 2 left; the numbers are the oracle's."""
    net = _net(3)
    x = torch.randn(3, dtype=DT)
    h = xafunc.xhessian(lambda x: net(x).sum())
    with torch.no_grad():
        got = h(x)
    assert_tree_close(got, jacrev(jacrev(lambda x: net(x).sum()))(x).detach())
    fast = [e._fast for e in _executables(h.__wrapped__)]
    assert fast, "the fast path did not run"
    aten = torch.ops.aten

    def by_two(g: torch.fx.Graph) -> list[torch.fx.Node]:
        return [n for n in g.nodes if n.target is aten.mul.Tensor and n.args[1] == 2]

    assert not any(by_two(f.functional.graph) for f in fast), fast[0].functional.code
    assert any(by_two(f.prologue.graph) for f in fast), fast[0].prologue.code


def test_unit_seeds_are_not_materialised_per_sample_under_vmap():
    """A first-order seed that a rule materialises (here ``x[:3]`` and ``x[3:]`` slice it) is
    the same for every sample: under ``vmap`` it stays one ``(n, k)`` constant (it was
    ``(batch, n, k)``), and so do its products with the weights, which the prologue hoists."""
    torch.manual_seed(12)
    w = torch.randn(32, 3, dtype=DT) / 2

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w @ x[:3]).sum() + (x[3:] ** 3).sum()

    xs = torch.randn(40, 5, dtype=DT)
    hess = vmap(xafunc.xhessian(f))
    with torch.no_grad():
        got = hess(xs)
    assert_tree_close(got, vmap(jacrev(jacrev(f)))(xs).detach())
    fast = [fn._fast for fn in _executables(f)]
    assert fast, "the batched fast path did not run"
    shapes = {tuple(t.shape) for f_ in fast for t in f_.consts if t.is_floating_point()}
    assert {(5, 3), (5, 2)} <= shapes, shapes
    assert not any(s[:2] == (40, 5) and s[-1] in (2, 3) and len(s) == 3 for s in shapes), shapes


def test_vmap_of_a_function_slicing_its_input_runs_the_batched_fast_path():
    """``x[k:]`` records ``end=2**63 - 1``; capture clamps slice bounds to the dimension, so
    the batched trace of the propagation (whose reverse level scatters into slices) succeeds
    and ``vmap`` runs the plain batched graph, not the functorch one. Open, negative and
    out-of-range bounds keep their meaning."""
    torch.manual_seed(10)
    w = torch.randn(4, 3, dtype=DT)

    def f(x: torch.Tensor) -> torch.Tensor:
        a, b, c = x[:3], x[3:], x[-2:100]
        return (torch.tanh(w @ a).sum() * b.exp().sum() + c.sin().prod()).reshape(())

    xs = torch.randn(5, 6, dtype=DT)
    with torch.no_grad():
        got = vmap(xafunc.xhessian(f))(xs)
    assert_tree_close(got, vmap(jacrev(jacrev(f)))(xs))
    executors = [e.executor for e in _executables(f)]
    assert executors and all(e.startswith("torchscript") for e in executors), executors


def _residual_net(p, x):  # type: ignore[no-untyped-def]
    return torch.func.functional_call(_RESIDUAL_NET, p, (x,)).sum()


_RESIDUAL_NET = _net(3)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_graphs_first_run_under_grad_are_traced_outside_it(
        batched: bool, split: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph whose first call differentiated operator by operator comes under
    ``torch.func.grad`` (a PINN loss of parameters) is traced by TorchScript outside the
    transform: traced inside it, on stand-ins wrapped at the grad level, it recorded no
    dependence on its inputs and every gradient was zero. Under ``vmap`` the batched graph
    runs beneath the ``vmap`` level, at the grad level only (NOTE [Batched fast path]). On a
    CPU the graph is split instead (NOTE [Split graphs]): its two graphs run on the plain
    tensors beneath the level; without them, it is recorded operator by operator."""
    from xafunc._execute.executable import SplitStats

    if not split:
        monkeypatch.setattr(Executable, "_splits", lambda self, args: False)
    before = SplitStats.calls
    xafunc.clear_cache()
    p = {k: v.detach() for k, v in _RESIDUAL_NET.named_parameters()}
    xs = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=DT)

    def loss(h):  # type: ignore[no-untyped-def]
        if batched:
            return lambda q: vmap(h, in_dims=(None, 0))(q, xs).pow(2).sum()
        return lambda q: h(q, xs[0]).pow(2).sum()

    with xafunc.strict():
        got = torch.func.grad(loss(xafunc.xhessian(_residual_net, argnums=1)))(p)
    ref = torch.func.grad(loss(jacrev(jacrev(_residual_net, argnums=1), argnums=1)))(p)
    assert_tree_close(got, ref)
    assert got["0.weight"].abs().max() > 0  # (the last bias does not reach a Hessian)
    fns = _graphs(_residual_net, batched)
    want = "a backward graph" if split else "torchscript (autograd)"
    assert fns and all(fn.executor.endswith(want) for fn in fns), [fn.executor for fn in fns]
    assert (SplitStats.calls > before) == split


def _graphs(func: object, batched: bool) -> list[Executable]:
    """The compiled graphs of ``func``'s plans traced per sample, or (``batched``) beneath
    ``vmap`` (NOTE [Batched fast path])."""
    return [fn for k, fn in _compiled(func)
            if (isinstance(k, tuple) and len(k) == 4 and k[1] == "vmap") == batched]


@pytest.mark.parametrize("second", ["hessian", "jvp(grad)", "jacrev(vmap)"])
def test_transforms_around_the_batched_graph_at_grad_levels(second: str) -> None:
    """Second derivatives of a PINN loss in the parameters, and ``jacrev`` of the per-point
    residuals, differentiate the batched graph that runs beneath ``vmap`` at the grad levels
    (NOTE [Batched fast path]): forward over reverse, and reverse under ``vmap`` over the
    cotangents, equal nested torch.func (float64)."""
    xafunc.clear_cache()
    p = {k: v.detach() for k, v in _RESIDUAL_NET.named_parameters()}
    xs = torch.randn(4, 3, generator=torch.Generator().manual_seed(6), dtype=DT)
    ref_h = jacrev(jacrev(_residual_net, argnums=1), argnums=1)

    def residuals(h):  # type: ignore[no-untyped-def]
        return lambda q: vmap(h, in_dims=(None, 0))(q, xs)

    def loss(h):  # type: ignore[no-untyped-def]
        return lambda q: residuals(h)(q).pow(2).mean()

    def run(h):  # type: ignore[no-untyped-def]
        if second == "hessian":
            return torch.func.hessian(loss(h))(p)
        if second == "jvp(grad)":
            t = {k: torch.ones_like(v) for k, v in p.items()}
            return torch.func.jvp(torch.func.grad(loss(h)), (p,), (t,))
        return jacrev(residuals(h))(p)

    with xafunc.strict():
        got = run(xafunc.xhessian(_residual_net, argnums=1))
    assert_tree_close(got, run(ref_h))
    assert _graphs(_residual_net, batched=True)


def test_graphs_run_as_fx_where_torchscript_cannot_run_as_autograd_records_them(monkeypatch):
    """Where TorchScript cannot trace a graph that autograd or a grad level records (made to
    fail here), the FX graph that runs is the one rewritten for recording: a product with a
    weight broadcast over the batch is one ``mm``, not a ``bmm`` whose backward builds the
    weight's gradient per batch entry (a Laplacian training step ran 2x slower that way)."""
    from xafunc._execute import executable

    monkeypatch.setattr(executable, "_full_trace", lambda gm, args: executable._FAILED)
    xafunc.clear_cache()
    p = {k: v.detach() for k, v in _RESIDUAL_NET.named_parameters()}
    xs = torch.randn(16, 3, generator=torch.Generator().manual_seed(7), dtype=DT)

    def loss(h):  # type: ignore[no-untyped-def]
        return lambda q: vmap(h, in_dims=(None, 0))(q, xs).pow(2).mean()

    lap = lambda q, x: jacrev(jacrev(_residual_net, argnums=1), argnums=1)(q, x).trace()  # noqa: E731
    with xafunc.strict():
        torch.func.grad(loss(xafunc.xlaplacian(_residual_net, argnums=1)))(p)  # (traces)
        with torch.profiler.profile() as prof:
            got = torch.func.grad(loss(xafunc.xlaplacian(_residual_net, argnums=1)))(p)
    assert_tree_close(got, torch.func.grad(loss(lap))(p))
    ops = {e.name for e in prof.events()}
    assert "aten::mm" in ops and "aten::bmm" not in ops, sorted(o for o in ops if "mm" in o)


def test_batched_graphs_per_propagation_are_bounded(monkeypatch):
    """A batched graph is traced per layout (batch size): the first on its first call, the
    others on their ``TRACE_AFTER``-th (until then per sample through vmap's batching rules,
    faster than nested torch.func, instead of a 0.1 s trace), and past ``MAX_BATCHED_LAYOUTS``
    of them never, so a loop whose batch size changes every step neither re-traces every step
    nor grows the cache without bound. Every size gets the oracle's numbers."""
    from xafunc._execute import compiler

    monkeypatch.setattr(compiler, "MAX_BATCHED_LAYOUTS", 3)
    monkeypatch.setattr(compiler, "TRACE_AFTER", 2)
    xafunc.clear_cache()
    net = _net(4)
    traced = []
    with xafunc.strict():
        for b in (2, 3, 4, 5, 6, 2, 3, 3, 5, 6, 6, 2):
            xs = torch.randn(b, 3, generator=torch.Generator().manual_seed(b), dtype=DT)
            assert_tree_close(vmap(xafunc.xhessian(net))(xs), vmap(jacrev(jacrev(net)))(xs))
            traced.append(len(_graphs(net, batched=True)))
    assert traced == [1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3] and _graphs(net, batched=False)


# ------------------------------------------------------------------ NOTE [NumPy kernels]
def _tanh_values(dtype: torch.dtype) -> torch.Tensor:
    """8192 values (``min_numel`` of every kernel) across ``dtype``'s range, the special ones
    first."""
    g = torch.Generator().manual_seed(0)
    tiny = torch.finfo(dtype).tiny
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), tiny / 4,
                            -tiny / 4, 1e-30, -1e-30, 9.0, -9.0, 20.0, 800.0], dtype=dtype)
    spread = torch.cat([torch.linspace(-12, 12, 4000, dtype=dtype),
                        torch.logspace(-40, 1.3, 2000, dtype=dtype),
                        torch.randn(8192, generator=g, dtype=dtype) * 3])
    return torch.cat([special, -spread])[:8192]


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where NaN, and the same sign bits (``-0.0`` is not ``0.0``)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(a.signbit(), b.signbit())


@pytest.mark.parametrize("name,dtype", [("tanh", torch.float32), ("tanh", torch.float64),
                                        ("sin", torch.float32), ("cos", torch.float32)])
def test_numpy_kernels(name, dtype):
    """Each ``xafunc`` op standing in for an ATen op (NumPy's ufunc, NOTE [NumPy kernels]),
    functional and in place, is within 1.5 ulps (float32) or 2 (float64) of the exact value,
    gives torch's values and signs at +-0, +-inf, NaN and subnormals, silently, for
    contiguous, transposed and expanded inputs; a tensor that requires grad, and a large one
    spread over many threads, get ATen's result."""
    import warnings

    from xafunc._execute import kernels

    kernel = kernels.KERNELS[name]
    assert dtype in kernel.dtypes
    ours, ours_ = getattr(torch.ops.xafunc, name), getattr(torch.ops.xafunc, name + "_")
    theirs = getattr(torch, name)
    x = _tanh_values(dtype)
    assert x.numel() >= kernel.min_numel
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's "invalid value" for sin(inf) stays quiet
        got = ours(x)
    exact = theirs(x.double())
    spacing = torch.nextafter(exact.to(dtype).abs(), torch.tensor(float("inf"), dtype=dtype)
                              ).double() - exact.to(dtype).abs().double()
    finite = exact.isfinite()
    ulps = ((got.double() - exact).abs() / spacing)[finite]
    assert ulps.max() <= (1.5 if dtype == torch.float32 else 2.0), ulps.max()
    assert_tree_close(got, theirs(x), rtol=4 * torch.finfo(dtype).eps,
                      atol=4 * torch.finfo(dtype).eps)
    assert _same_values(got[:9], theirs(x[:9]))  # +-0, +-inf, NaN, subnormals, tiny
    for form in (x.reshape(128, 64).t(), x[:128].expand(64, 128)):
        assert_tree_close(ours(form), theirs(form), rtol=4 * torch.finfo(dtype).eps,
                          atol=4 * torch.finfo(dtype).eps)
    inplace = x.clone()
    assert ours_(inplace) is inplace
    assert _same_values(inplace, got)
    w = x.clone().requires_grad_()
    with torch.no_grad():
        assert _same_values(ours(w), theirs(w))
    big = torch.randn(8 * kernels._ATEN_GRAIN, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert not kernels.numpy_can(kernel, big)
        assert _same_values(ours(big), theirs(big))
        torch.set_num_threads(1)
        assert kernels.numpy_can(kernel, big)
    finally:
        torch.set_num_threads(threads)


def test_large_tanh_layers_run_numpys_kernel():
    """A plain call whose graph applies ``tanh`` to ``min_numel`` elements or more runs
    ``xafunc::tanh`` there, and ATen's ``tanh`` in a graph of fewer, with torch.func's
    numbers; the recompute node (weights that require grad) runs the same fast path, and the
    gradient through it (the recorded graph, ATen's ``tanh``) is torch.func's."""
    from xafunc._execute import compiler, kernels

    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                              torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(DT)

    def u(x):
        return net(x).sum()

    xs = torch.randn(kernels.KERNELS["tanh"].min_numel // 64, 2, dtype=DT)
    h = vmap(xafunc.xhessian(u))
    ref = vmap(jacrev(jacrev(u)))
    with torch.no_grad():
        out, few = h(xs), h(xs[:4])
        for _ in range(compiler.TRACE_AFTER - 1):  # a second batch size: traced once it
            few = h(xs[:4])                          # has kept coming back
    assert_tree_close(out, ref(xs).detach())
    assert_tree_close(few, ref(xs[:4]).detach())
    mains = [str(e._fast.main.graph) for e in _executables(u) if e._fast is not None]
    assert len(mains) == 2  # the two batched graphs (the per-sample one ran under vmap)
    assert sum("xafunc::tanh" in g for g in mains) == 1, mains
    recorded = h(xs)
    assert recorded.requires_grad
    assert_tree_close(recorded.detach(), out, rtol=0.0, atol=0.0)
    recorded.sum().backward()
    grads = [p.grad for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    ref(xs).sum().backward()
    assert_tree_close(grads, [p.grad for p in net.parameters()])


class _Sine(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(3.0 * x)


def test_float32_sine_layers_run_numpys_kernel():
    """A float32 SIREN's per-sample Laplacians run ``xafunc::sin`` in the plain fast path,
    with the float64 oracle's numbers to float32 accuracy."""
    from xafunc._execute import kernels

    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), _Sine(), torch.nn.Linear(64, 64), _Sine(),
                              torch.nn.Linear(64, 1))
    net.requires_grad_(False)
    xs = torch.rand(kernels.KERNELS["sin"].min_numel // 64, 2)

    def u(x):
        return net(x).sum()

    got = vmap(xafunc.xlaplacian(u))(xs)
    net64 = copy.deepcopy(net).double()
    want = vmap(lambda x: torch.diagonal(jacrev(jacrev(lambda y: net64(y).sum()))(x)).sum())(
        xs.double())
    assert_tree_close(got.double(), want, rtol=2e-4, atol=2e-3)
    graphs = [fn for e in CACHE.entries(u) for run in e.plans.values()
              for fn in run.compiler.fns.values() if isinstance(fn, Executable)]
    assert any("xafunc::sin" in str(e._fast.main.graph) for e in graphs), \
        [e.executor for e in graphs]
