"""No wrong number on any path: stop-gradients, randomness, the fallback, edge inputs, side
effects and memory estimates (the families of silent wrong results a user would hit).

Every expected value is nested ``torch.func.jacrev`` (``reference_deriv``) in float64 or a
written-out formula. Cases the engine is meant to handle run under ``xafunc.strict()``, so they
prove the engine ran; cases meant to fall back assert the plan's strategy and reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import xafunc
from tests._compare import assert_tree_close, assert_tree_equal, clone_tree, reference_deriv
from xafunc import jet, xderiv, xderivs, xlaplacian

F64 = torch.float64
ORDERS = (1, 2, 3)
ENGINE_MODES = ("auto", "forward", "reverse", "mixed")


def _x(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=F64) * 0.8


# ------------------------------------------------------------------------- stop-gradients
class _STE(torch.autograd.Function):
    """A straight-through estimator: round forward, identity (times 2) backward."""

    @staticmethod
    def forward(x):
        return torch.round(x * 2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2

    @staticmethod
    def jvp(ctx, t):
        return t * 2


class _Clip(torch.autograd.Function):
    """A clipped gradient: the derivative is 1 inside [-0.5, 0.5], 0.1 outside."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.where(x.abs() < 0.5, 1.0, 0.1).to(g.dtype)


class _Reverse(torch.autograd.Function):
    """Gradient reversal whose forward returns its input itself (autograd makes the output a
    view of it, outside ``forward``)."""

    @staticmethod
    def forward(x):
        return x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return -g

    @staticmethod
    def jvp(ctx, t):
        return -t


# bound before any capture, as ``grad_reverse = GradReverse.apply`` is written: the call
# never looks ``apply`` up on the class again
_ste = _STE.apply
_reverse = _Reverse.apply


def _no_grad(x):
    with torch.no_grad():
        c = x.tanh()
    return (c * x.sin() + x * x).sum()


def _set_grad_enabled(x):
    torch.set_grad_enabled(False)
    c = x.exp()
    torch.set_grad_enabled(True)
    return (c * x * x).sum() + x.cos().prod()


def _nested_no_grad(x):
    with torch.no_grad():
        with torch.enable_grad():  # grad back on inside: this part is differentiated
            a = x.sin()
        b = a * x
    return (b * x.exp()).sum() + (a * a).sum()


def _detach_(x):
    y = x * 2.0
    y.detach_()
    return (y * x.sin()).sum()


def _grad_hook(x):
    h = x.sin()
    if h.requires_grad:  # nested jacrev doubles the gradient through h at every level
        h.register_hook(lambda g: g * 2)
    return (h * h).sum() + x.exp().sum()


def _grad_fn_hook(x):
    y = x.sin()
    if y.grad_fn is not None:  # a hook on the autograd node itself
        y.grad_fn.register_prehook(lambda grad_outputs: (grad_outputs[0] * 2,))
    return (y * y).sum() + x.exp().sum()


# name -> (function, engine runs it at every order?)
STOP_GRADIENTS = {
    "detach": (lambda x: (x * x.detach()).sin().sum() + x.detach().exp() @ x, True),
    "detach_view": (lambda x: (x[:2].detach() * x[1:]).tanh().sum(), True),
    "no_grad": (_no_grad, True),
    "set_grad_enabled": (_set_grad_enabled, True),
    "nested_enable_grad": (_nested_no_grad, True),
    # nested torch.func cuts these at the innermost level only: engine at order 1
    "data": (lambda x: (x.data * x * x).sum() + x.sin().sum(), False),
    "detach_": (_detach_, False),
    # a custom backward defines the derivative: always the reference
    "ste": (lambda x: (_STE.apply(x) * x.sin()).sum(), False),
    "clip": (lambda x: (_Clip.apply(x * 2) * x).sum(), False),
    "ste_bound": (lambda x: (_ste(x) * x.sin()).sum(), False),
    "reverse_bound": (lambda x: (_reverse(x) * x.sin()).sum() + _reverse(x.exp()).sum(), False),
    # a gradient hook changes what reverse mode computes: always the reference
    "grad_hook": (_grad_hook, False),
    "grad_fn_hook": (_grad_fn_hook, False),
}
# the functions that always run the reference -> why
CUSTOM = {"ste": "autograd.Function _STE", "clip": "autograd.Function _Clip",
          "ste_bound": "autograd.Function _STE", "reverse_bound": "autograd.Function _Reverse",
          "grad_hook": "register_hook", "grad_fn_hook": "grad_fn"}


@pytest.mark.fallback
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", list(STOP_GRADIENTS))
def test_stop_gradients_match_nested_jacrev(name, order):
    f, engine = STOP_GRADIENTS[name]
    x = _x()
    expected = reference_deriv(f, order)(x)
    for mode in (*ENGINE_MODES, "reference"):
        plan = xafunc.plan(f, order, mode=mode)(x)
        if mode == "reference":
            assert plan.strategy == "reference"
        elif name in CUSTOM:
            assert plan.strategy == "reference" and CUSTOM[name] in plan.fallback
        elif engine or order == 1:
            assert plan.strategy == "engine", plan
            with xafunc.strict():
                assert_tree_close(xderiv(f, order, mode=mode)(x), expected, msg=mode)
            continue
        else:
            assert plan.strategy == "reference" and "innermost level" in plan.fallback
        assert_tree_close(xderiv(f, order, mode=mode)(x), expected, msg=mode)


@pytest.mark.fallback
@pytest.mark.parametrize("name", ["detach", "no_grad", "set_grad_enabled", "ste", "clip",
                                  "ste_bound", "reverse_bound"])
def test_stop_gradients_in_taylor_transforms(name):
    f, _ = STOP_GRADIENTS[name]
    x = _x(4, seed=1)
    hess = reference_deriv(f, 2)(x)
    assert_tree_close(xlaplacian(f)(x), hess.diagonal().sum())
    v = _x(4, seed=2)
    if name == "clip":  # no jvp rule: jet's fallback is nested torch.func.jvp, which refuses
        with pytest.raises(NotImplementedError, match="jvp function"):
            jet(f, (x,), ((v, None),))
        return
    _, (d1, d2) = jet(f, (x,), ((v, None),))
    if name == "reverse_bound":
        # jet's reference is nested torch.func.jvp, which differentiates the custom jvp
        # rule's output again: not v @ hess @ v (the nested vjps) for this Function
        expected = torch.func.jvp(lambda y: torch.func.jvp(f, (y,), (v,))[1], (x,), (v,))[1]
        assert_tree_close(d2, expected)
        assert not torch.allclose(expected, v @ hess @ v)
    else:
        assert_tree_close(d2, v @ hess @ v)
    assert_tree_close(d1, reference_deriv(f, 1)(x) @ v)


@pytest.mark.fallback
@pytest.mark.parametrize("make", ["script", "trace"])
def test_torchscript_modules_get_right_derivatives_on_every_call(make):
    """A TorchScript module runs the reference. Under torch.func, torch 2.13's optimized
    executor specializes a scripted module and returns a Hessian of zero from the second call
    on (0.17 off here); the reference runs it unoptimized (NOTE [A reference that is
    right])."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 2)).to(torch.float64)
    x = _x()
    module = torch.jit.script(net) if make == "script" else torch.jit.trace(net, x)
    f = lambda x: module(x).sum()  # noqa: E731
    for order in (2, 2, 3, 2, 3):
        assert_tree_close(xderiv(f, order)(x), reference_deriv(lambda x: net(x).sum(), order)(x),
                          msg=f"order {order}")
    assert "TorchScript" in xafunc.plan(f, 2)(x).fallback


def _tanh_layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(w @ x)


@pytest.mark.fallback
def test_torchscript_used_by_the_caller_gets_right_derivatives():
    """Once TorchScript's executor has run a function or module on inputs requiring grad, it
    differentiates its own graphs: the capture cut them (a Jacobian of zero, on the engine)
    and nested torch.func gives a Hessian of zero (torch 2.13), also under
    ``optimized_execution(False)``. The reference flushes their executors and runs them
    unoptimized (NOTE [TorchScript]); the oracle is the same code in plain Python."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(4, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    layer = torch.jit.script(_tanh_layer)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 1)).to(F64)
    scripted, traced = torch.jit.script(net), torch.jit.trace(net, _x())
    cases = [(lambda x: layer(layer(x, w1), w2).pow(2).sum(),
              lambda x: _tanh_layer(_tanh_layer(x, w1), w2).pow(2).sum()),
             (lambda x: scripted(x).sum(), lambda x: net(x).sum()),
             (lambda x: traced(x).sum(), lambda x: net(x).sum())]
    x = _x()
    for f, plain in cases:
        for _ in range(2):  # the caller's own use: a backward pass, and torch.func
            xr = x.clone().requires_grad_()
            f(xr).backward()
            torch.func.jacrev(torch.func.jacrev(f))(x)
            for order in (1, 2, 3):
                assert_tree_close(xderiv(f, order)(x), reference_deriv(plain, order)(x))
        assert "TorchScript" in xafunc.plan(f, 2)(x).fallback


@pytest.mark.fallback
@pytest.mark.parametrize("profiled", [False, True])
def test_torchscript_reached_through_a_library_fails_the_capture(monkeypatch, profiled):
    """TorchScript code the walk cannot see (a library's) gets the caller's weight itself, not
    its stand-in (a TorchScript call is no torch function): the graph held it as a constant,
    stale once the weight changed in place (0.56-1.6 off at orders 2-3). A tensor the function
    reads reaching an operator, and a differentiable graph's node on the tensors the code
    returns, fail the capture."""
    torch.manual_seed(0)
    w, w2 = torch.randn(4, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    monkeypatch.setattr(torch, "_xafunc_test_layer", torch.jit.script(_tanh_layer),
                        raising=False)
    f = lambda x: torch._xafunc_test_layer(torch._xafunc_test_layer(x, w), w2).sum()  # noqa: E731
    plain = lambda x: _tanh_layer(_tanh_layer(x, w), w2).sum()  # noqa: E731
    x = _x()
    if profiled:  # the executor has profiled calls needing grad: it differentiates itself
        for _ in range(2):
            xr = x.clone().requires_grad_()
            f(xr).backward()
    assert "TorchScript" in xafunc.plan(f, 1)(x).fallback
    for _ in range(2):
        for order in (1,) if profiled else (1, 2, 3):
            assert_tree_close(xderiv(f, order)(x), reference_deriv(plain, order)(x))
        with torch.no_grad():
            w.mul_(1.2)


@pytest.mark.fallback
def test_inference_mode_is_refused_as_torch_func_refuses_it():
    def f(x):
        with torch.inference_mode():
            c = x.sin()
        return c * x

    x = _x()
    assert "inference_mode" in xafunc.plan(f, 1)(x).fallback
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        jacrev(f)(x)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        xderiv(f, 1)(x)


_SCALE = [2.0]


class _ScaleSin(TorchFunctionMode):
    """A user's mode: ``sin`` scaled by a factor it reads from Python state."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out * _SCALE[0] if func in (torch.sin, torch.Tensor.sin) else out


class _ScaleSinDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out * _SCALE[0] if func is torch.ops.aten.sin.default else out


_MODES = {"function": _ScaleSin, "dispatch": _ScaleSinDispatch}


@pytest.mark.fallback
@pytest.mark.parametrize("kind", list(_MODES))
def test_a_mode_around_the_call_runs_the_reference(kind):
    """torch.func runs ``func`` under the user's torch function / dispatch mode, whose Python
    code may change any operator's result: such a call runs the reference, and a capture made
    without the mode is never reused under it (it was: 5.8 off)."""
    f = lambda x: x.sin().sum() * x.exp().sum()  # noqa: E731
    x = _x()
    xderiv(f, 2)(x)  # a capture without the mode
    for scale in (2.0, 5.0):
        _SCALE[0] = scale
        with _MODES[kind]():
            expected = reference_deriv(f, 2)(x)
            assert "mode" in xafunc.plan(f, 2)(x).fallback
            assert_tree_close(xderiv(f, 2)(x), expected, msg=scale)
    with xafunc.strict():  # and the engine again without it
        assert_tree_close(xderiv(f, 2)(x), reference_deriv(f, 2)(x))


@pytest.mark.fallback
@pytest.mark.parametrize("kind", list(_MODES))
def test_a_mode_entered_inside_the_function_runs_the_reference(kind):
    """A capture through a mode ``func`` enters would bake what the mode did on that call
    (stale once its state changes: 5.3 off), and a dispatch mode runs below autograd, where
    the recorded graph differentiates what the mode computed (1.9 off on the first call)."""
    mode = _MODES[kind]

    def f(x):
        with mode():
            y = x.sin()
        return (y * x.exp()).sum()

    x = _x()
    for scale in (2.0, 5.0):
        _SCALE[0] = scale
        assert f"{kind} mode {mode.__qualname__}" in xafunc.plan(f, 2)(x).fallback
        assert_tree_close(xderiv(f, 2)(x), reference_deriv(f, 2)(x), msg=scale)


@pytest.mark.fallback
@pytest.mark.filterwarnings("ignore:Error detected in")
def test_anomaly_detection_runs_the_reference():
    """Under ``torch.autograd.set_detect_anomaly(True)`` torch.func's backward passes are
    checked: a NaN gradient raises, naming the operator. Such a call runs the reference, so it
    raises as torch.func does (the engine returned the NaNs, and its planning printed an
    anomaly traceback of its own, for a check that read a traced value)."""
    f = lambda x: (x.sqrt() * x).sum()  # noqa: E731
    x = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    xderiv(f, 2)(x)  # a capture without anomaly detection
    with torch.autograd.set_detect_anomaly(True):
        assert "anomaly detection" in xafunc.plan(f, 2)(x).fallback
        with pytest.raises(RuntimeError, match="returned nan values"):
            jacrev(jacrev(f))(x)
        with pytest.raises(RuntimeError, match="returned nan values"):
            xderiv(f, 2)(x)
        g = lambda x: (x.sin() * x.exp()).sum()  # noqa: E731
        assert_tree_close(xderiv(g, 2)(_x()), reference_deriv(g, 2)(_x()))
    with xafunc.strict():  # and the engine again without it
        assert_tree_close(xderiv(g, 2)(_x()), reference_deriv(g, 2)(_x()))


def test_a_default_device_keeps_the_engine_and_keys_the_capture():
    """``with torch.device(...)`` / ``torch.set_default_device`` is a torch function mode too,
    but one the signature keys on: factories inside ``func`` allocate there."""
    f = lambda x: (x * torch.ones(3, dtype=F64)).sin().sum()  # noqa: E731
    x = _x()
    with xafunc.strict():
        with torch.device("cpu"):
            assert_tree_close(xderiv(f, 2)(x), reference_deriv(f, 2)(x))
        xderiv(f, 2)(x)
    with torch.device("meta"), pytest.raises(RuntimeError, match="device meta"):
        xderiv(f, 2)(x)  # not the capture made on the cpu: allocates as torch.func would


@pytest.mark.fallback
def test_strict_mode_raises_on_fallback():
    f = STOP_GRADIENTS["ste"][0]
    with xafunc.strict(), pytest.raises(xafunc.FallbackError, match="autograd.Function _STE"):
        xderiv(f, 2)(_x())
    with xafunc.strict():  # an explicit request for the reference is not a fallback
        xderiv(f, 2, mode="reference")(_x())
        with xafunc.strict(False):
            xderiv(f, 2)(_x())


# ---------------------------------------------------------------------------- randomness
def _bottleneck(p: float = 0.3) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Dropout(p), nn.Linear(24, 2),
                         nn.Tanh(), nn.Linear(2, 24), nn.Tanh(), nn.Linear(24, 6)).to(F64).train()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_dropout_one_realisation_per_call(order, mode):
    """Every part of a schedule (the mixed prefix and suffix included) uses the same mask, the
    one torch.func draws after the same seed, and the caller's RNG ends where torch.func's
    does."""
    net, x = _bottleneck(), _x(6)
    with xafunc.strict():
        torch.manual_seed(11)
        got = xderiv(net, order, mode=mode)(x)
        after = torch.rand(3)
    torch.manual_seed(11)
    expected = reference_deriv(net, order)(x)
    assert_tree_close(got, expected)
    assert_tree_equal(after, torch.rand(3))
    # a new call draws a new mask
    assert not torch.allclose(xderiv(net, order, mode=mode)(x), got)


def _forked(x):
    with torch.random.fork_rng():
        noise = torch.randn(3, dtype=F64)
    return (x.sin() * noise).pow(3).sum()


def _forked_imported(x):
    from torch.random import fork_rng
    with fork_rng():
        noise = torch.randn(3, dtype=F64)
    return (x.sin() * noise).pow(3).sum()


@pytest.mark.fallback
@pytest.mark.parametrize("f", [_forked, _forked_imported])
def test_fork_rng_leaves_the_callers_rng_where_torch_func_does(f):
    """``fork_rng`` restores the RNG its block drew from; the engine's hoisted draws advanced
    the caller's RNG instead, so every later draw differed from torch.func's."""
    x = _x()
    torch.manual_seed(7)
    got, after = xderiv(f, 2)(x), torch.rand(3)
    torch.manual_seed(7)
    assert_tree_close(got, reference_deriv(f, 2)(x))
    assert_tree_equal(after, torch.rand(3))
    assert "fork_rng" in xafunc.plan(f, 2)(x).fallback


def test_random_ops_inside_the_function():
    def f(x):
        noise = torch.randn(3, dtype=F64)
        keep = torch.bernoulli(torch.full((3,), 0.6, dtype=F64))
        return (x.sin() * noise * keep).sum() + (x * torch.rand_like(x)).exp().sum()

    x = _x()
    for order in (1, 2):
        with xafunc.strict():
            torch.manual_seed(5)
            got = xderiv(f, order)(x)
        torch.manual_seed(5)
        assert_tree_close(got, reference_deriv(f, order)(x))


def test_xderivs_shares_one_realisation_across_orders():
    net, x = _bottleneck(0.5), _x(6)
    torch.manual_seed(2)
    y, d1, d2 = xderivs(net, 2)(x)
    torch.manual_seed(2)
    assert_tree_close(y, net(x))  # the primal of that realisation
    torch.manual_seed(2)
    assert_tree_close(d2, reference_deriv(net, 2)(x))
    torch.manual_seed(2)
    assert_tree_close(d1, reference_deriv(net, 1)(x))


def test_planning_consumes_no_random_numbers():
    torch.manual_seed(7)
    xafunc.plan(lambda x: F.dropout(x, 0.5).sin().sum(), 2)(_x())
    xafunc.clear_cache()
    xderiv(lambda x: torch.randn(3, dtype=F64) @ x.exp(), 1)  # building draws nothing either
    after = torch.rand(4)
    torch.manual_seed(7)
    assert_tree_equal(after, torch.rand(4))


_SINGULAR = {
    "sqrt": (lambda x: x.sqrt().sum(), [0.0, 1.0, 4.0]),
    "log": (lambda x: (x.log() * x.sin()).sum(), [0.0, 1.0, 2.0]),
    "reciprocal": (lambda x: (1 / x).tanh(), [0.0, -1.0, 3.0]),
    "pow": (lambda x: (x.abs() ** 1.5).sum(), [0.0, 2.0, -1.0]),
    "quotient": (lambda x: (x.sin() / x.flip(0)).sum(), [0.5, 1.0, 0.0]),
}


def _same_specials(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(
        got[got.isinf()], want[want.isinf()]), (got, want)
    fin = want.isfinite()
    assert_tree_close(got[fin], want[fin])


@pytest.mark.parametrize("name", sorted(_SINGULAR))
@pytest.mark.parametrize("order", [1, 2, 3])
def test_infinite_derivatives_are_placed_as_nested_jacrev_places_them(name, order):
    """At a point where a derivative is infinite, forward mode multiplies the infinity by the
    zero tangents of the other directions and spreads ``nan`` over finite entries (the
    gradient of ``sqrt(x).sum()`` at ``(0, 1, 4)`` was ``(inf, nan, nan)``). Such a result is
    answered by nested jacrev (NOTE [Non-finite results]): the same NaNs, infinities and
    finite values as torch.func, plainly, under ``vmap`` (one singular sample among finite
    ones) and under ``grad``; at finite points the engine's plan runs, under ``strict``."""
    f, point = _SINGULAR[name]
    x = torch.tensor(point, dtype=torch.float64)
    want = reference_deriv(f, order)(x)
    with xafunc.strict():
        got = xderiv(f, order)(x)
        assert xafunc.plan(f, order)(x).strategy == "engine"
        assert any("NaN or an infinity" in d for d in xafunc.plan(f, order)(x).details)
        xs = torch.stack([x, x.abs() + 0.5, x.abs() + 1.0])
        got_v = torch.func.vmap(xderiv(f, order))(xs)
        ok = torch.func.vmap(xderiv(f, order))(xs[1:])  # finite everywhere: the engine's
    _same_specials(got, want)
    _same_specials(got_v, torch.func.vmap(reference_deriv(f, order))(xs))
    assert_tree_close(ok, torch.func.vmap(reference_deriv(f, order))(xs[1:]))
    g = torch.func.grad(lambda v: xderiv(f, order)(v).nan_to_num(0.0, 0.0, 0.0).sum())
    g_ref = torch.func.grad(lambda v: reference_deriv(f, order)(v).nan_to_num(0.0, 0.0, 0.0)
                            .sum())
    _same_specials(g(x), g_ref(x))


def test_only_operators_on_differentiated_values_are_checked_for_infinities():
    """The check of NOTE [Non-finite results] runs where an operator that can make an
    infinite derivative reads a value that depends on the differentiated input: not for a
    weight's ``sqrt`` or a division by constant degrees (a mean aggregation), nor for
    exponential networks; for a division by the input, yes."""
    w = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    x = torch.ones(3, dtype=F64)

    def checked(f) -> bool:
        return any("NaN or an infinity" in d for d in xafunc.plan(f, 2)(x).details)

    assert not checked(lambda x: (x * w.sqrt()).sin().sum())
    assert not checked(lambda x: (x / (w + 1)).sin().sum())
    assert not checked(lambda x: x.exp().sum())
    assert checked(lambda x: (w / x).sin().sum())
    assert checked(lambda x: (x * w).sqrt().sum())


@pytest.mark.fallback
def test_python_randomness_falls_back():
    import random

    f = lambda x: x * random.random()  # noqa: E731 - a value Python draws on every call
    assert "random" in xafunc.plan(f, 1)(_x()).fallback
    random.seed(0)
    got = xderiv(f, 1)(_x())
    random.seed(0)
    assert_tree_close(got, jacrev(f)(_x()))


@pytest.mark.fallback
@pytest.mark.parametrize("make", ["default_rng", "RandomState", "Random"])
def test_random_generator_objects_fall_back(make):
    """A numpy ``Generator`` (or ``RandomState``) held by the function draws new values on
    every call; the graph had frozen the first draw (0.18-0.65 off from the second call)."""
    import random

    import numpy as np

    gen = {"default_rng": lambda: np.random.default_rng(0),
           "RandomState": lambda: np.random.RandomState(0),
           "Random": lambda: random.Random(0)}[make]()
    holder = gen.bit_generator if make == "default_rng" else gen

    def draw():
        return [gen.random() for _ in range(3)] if make == "Random" else gen.random(3)

    def f(x):
        return (x * torch.as_tensor(draw(), dtype=x.dtype)).sin().sum()

    def state():
        return copy.deepcopy(holder.state if make == "default_rng" else
                             gen.get_state() if make == "RandomState" else gen.getstate())

    def restore(s):
        if make == "default_rng":
            holder.state = s
        else:
            (gen.set_state if make == "RandomState" else gen.setstate)(s)

    x = _x()
    assert "random number generator" in xafunc.plan(f, 2)(x).fallback
    for _ in range(3):
        before = state()
        got = xderiv(f, 2)(x)
        restore(before)
        assert_tree_close(got, reference_deriv(f, 2)(x))


# ------------------------------------------------------------------------------ fallback
def _layer_norm(x, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


@pytest.mark.fallback
def test_fallback_is_right_where_torch_nested_derivatives_are_wrong():
    """``logcumsumexp`` has no Taylor rule, so this falls back; the reference differentiates
    the captured (decomposed) graph, not torch's layer_norm kernel whose third derivative is
    wrong. The oracle is the formula (NOTE [Oracle for the norms] in test_operators)."""
    f = lambda x: torch.logcumsumexp(F.layer_norm(x, (5,)), 0).sin()  # noqa: E731
    oracle = lambda x: torch.logcumsumexp(_layer_norm(x), 0).sin()  # noqa: E731
    x = _x(5)
    plan = xafunc.plan(f, 3)(x)
    assert plan.strategy == "reference" and "logcumsumexp" in plan.fallback
    assert "captured" in plan.details[0]
    expected = reference_deriv(oracle, 3)(x)
    assert_tree_close(xderiv(f, 3)(x), expected)
    assert_tree_close(xderiv(f, 3, mode="reference")(x), expected)
    # the engine where it has every rule: maximum(layer_norm(x), -5)
    g = lambda x: torch.maximum(F.layer_norm(x, (5,)), torch.tensor(-0.2, dtype=F64)).sin()  # noqa: E731
    g_oracle = lambda x: torch.maximum(_layer_norm(x), torch.tensor(-0.2, dtype=F64)).sin()  # noqa: E731
    with xafunc.strict():
        assert_tree_close(xderiv(g, 3)(x), reference_deriv(g_oracle, 3)(x))


@pytest.mark.fallback
@pytest.mark.parametrize("order", [2, 3, 4])
def test_uncapturable_function_reference_decomposes_the_norms(order):
    """The formulas are applied from order 3 (nested jacrev of the norms is right to order 2),
    with and without auxiliary outputs."""
    def f(x):
        if x.sum() > 0:  # data-dependent control flow: nothing to capture
            return F.layer_norm(x, (4,)).sin()
        return F.layer_norm(x, (4,)).cos()

    def oracle(x):
        return _layer_norm(x).sin() if x.sum() > 0 else _layer_norm(x).cos()

    x = _x(4).abs() + 0.1
    assert "capture failed" in xafunc.plan(f, order)(x).fallback
    expected = reference_deriv(oracle, order)(x)
    assert_tree_close(xderiv(f, order)(x), expected)
    d, aux = xderiv(lambda x: (f(x), x * 2), order, has_aux=True)(x)
    assert_tree_close((d, aux), (expected, x * 2))


@pytest.mark.fallback
def test_uncapturable_function_reference_decomposes_instance_norm():
    """``instance_norm`` is a batch norm underneath, whose nested jacrev torch gets wrong from
    order 3 (0.25 off here): the reference runs its formula too, and updates the running
    statistics exactly as one eager call does."""
    norm = torch.nn.InstanceNorm1d(2, track_running_stats=True).to(F64).train()
    twin = copy.deepcopy(norm)

    def f(x):
        y = norm(x.reshape(1, 2, 3))
        return (y.sin() if x.sum() > 0 else y.cos()).sum()  # data-dependent: no capture

    def oracle(x):
        x3 = x.reshape(1, 2, 3)
        mu = x3.mean(-1, keepdim=True)
        y = (x3 - mu) / torch.sqrt(((x3 - mu) ** 2).mean(-1, keepdim=True) + norm.eps)
        return (y.sin() if x.sum() > 0 else y.cos()).sum()

    x = _x(6).abs() + 0.1
    plan = xafunc.plan(f, 3)(x)
    assert plan.strategy == "reference" and "capture failed" in plan.fallback
    assert_tree_close(xderiv(f, 3)(x), reference_deriv(oracle, 3)(x))
    twin(x.reshape(1, 2, 3))
    assert_tree_close([norm.running_mean, norm.running_var],
                      [twin.running_mean, twin.running_var])


@pytest.mark.fallback
def test_reference_never_picks_a_nesting_that_raises():
    """``cdist`` has no forward-mode formula: a wide first-order Jacobian would pick jacfwd.
    (torch 2.13's ``jacrev`` of ``cdist`` is itself wrong where a point pair coincides in a
    coordinate; the oracle is autograd's jacobian.)"""
    y = _x(4).reshape(2, 2)
    f = lambda x: torch.cdist(x.reshape(1, 2) * torch.ones(8, 1, dtype=F64), y).flatten()  # noqa: E731
    x = _x(2)
    with pytest.raises(Exception, match="forward"):
        torch.func.jacfwd(f)(x)
    expected = torch.autograd.functional.jacobian(f, x)
    assert_tree_close(xderiv(f, 1, mode="reference")(x), expected)
    with xafunc.strict():
        assert_tree_close(xderiv(f, 1)(x), expected)


# ---------------------------------------------------------------------------- edge inputs
@pytest.mark.parametrize("shape", [(0,), (2, 0)])
@pytest.mark.parametrize("order", ORDERS)
def test_empty_inputs_return_jacrevs_empty_result(shape, order):
    x = torch.zeros(shape, dtype=F64)
    f = lambda x: (x.sin() * 2).sum(-1, keepdim=True)  # noqa: E731
    assert_tree_close(xderiv(f, order)(x), reference_deriv(f, order)(x))
    g = lambda x: x.exp()  # noqa: E731 - empty output too
    assert_tree_close(xderiv(g, order)(x), reference_deriv(g, order)(x))


def test_empty_output_from_a_nonempty_input():
    x = _x()
    f = lambda x: x[:0].sin()  # noqa: E731
    assert_tree_close(xderiv(f, 2)(x), reference_deriv(f, 2)(x))


@pytest.mark.parametrize("order", ORDERS)
def test_empty_intermediate(order):
    """An empty value on the way (an empty gather, ``repeat(0)``) is never a mixed
    schedule's cut: with no directions to seed there, planning it raised."""
    x = _x()
    f = lambda x: x.gather(0, torch.zeros(0, dtype=torch.long)).sum()  # noqa: E731
    assert_tree_close(xderiv(f, order)(x), reference_deriv(f, order)(x))
    g = lambda x: x.sin().repeat(0).sum() + (x**3).sum()  # noqa: E731
    assert_tree_close(xderiv(g, order)(x), reference_deriv(g, order)(x))


@pytest.mark.parametrize("order", (1, 2))
def test_low_precision_casts_round_as_the_nesting_of_the_schedule(order):
    """Through casts to float16/bfloat16 torch rounds each tangent or cotangent where its value
    was rounded, so nested ``jacfwd`` and ``jacrev`` differ by the low precision's rounding;
    ``mode="reverse"`` returns nested ``jacrev``'s numbers, and a first-order forward mode
    ``jacfwd``'s (the Taylor arithmetic of a higher forward order rounds in its own way)."""
    w = torch.linspace(-1.0, 1.0, 24).reshape(8, 3)

    def u(x):
        return (torch.tanh(w @ x.bfloat16().float()).half() * 3).float().sin().sum()

    def nested(transform):
        g = u
        for _ in range(order):
            g = transform(g)
        return g(x)

    x = torch.linspace(0.1, 0.9, 3)
    reverse = nested(jacrev)
    assert_tree_close(xderiv(u, order, mode="reverse")(x), reverse, rtol=1e-6, atol=1e-7)
    if order == 1:
        forward = nested(torch.func.jacfwd)
        assert_tree_close(xderiv(u, 1, mode="forward")(x), forward, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(reverse, forward, rtol=1e-6, atol=1e-7)


@pytest.mark.fallback
def test_meta_tensors_give_torch_funcs_shapes():
    """Meta tensors (a model built under ``torch.device("meta")`` to size things) hold no
    values to trace: every transform answers by the reference, with torch.func's shapes, and
    the plan says why."""
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(F64)
        x = torch.empty(3, dtype=F64)
    u = lambda x: net(x).squeeze(-1)  # noqa: E731
    for order in (1, 2, 3):
        got, expected = xderiv(u, order)(x), reference_deriv(u, order)(x)
        assert got.is_meta and got.shape == expected.shape and got.dtype == F64
    assert xlaplacian(u)(x).shape == () and xafunc.xbiharmonic(u)(x).shape == ()
    assert jet(u, (x,), ((x, x),))[1][1].shape == ()
    plan = xafunc.plan(u, 2)(x)
    assert plan.strategy == "reference" and "meta tensors" in plan.fallback


def test_non_tensor_aux_is_refused():
    f = lambda x: (x.sin().sum(), 3.0)  # noqa: E731
    with pytest.raises(TypeError, match=r"xderiv: has_aux=True requires aux to be a tensor"):
        xderiv(f, 1, has_aux=True)(_x())


def test_the_argument_layout_is_traced_and_keys_the_capture():
    """A function may read a stride or ``is_contiguous()`` in Python, and ``view`` fails on
    some layouts: the trace sees the argument's own strides (it saw a contiguous copy, 24 off
    for a transposed argument), and a call with another layout is captured again."""
    f = lambda x: (x.stride(0) * x).sin().sum() + (x.is_contiguous() * x ** 3).sum()  # noqa: E731
    a = torch.randn(3, 4, dtype=F64)
    layouts = {"contiguous": a, "transposed": a.T.contiguous().T,
               "sliced": torch.randn(6, 8, dtype=F64)[::2, ::2]}
    with xafunc.strict():
        for name, x in [*layouts.items(), *layouts.items()]:
            assert_tree_close(xderiv(f, 2)(x), reference_deriv(f, 2)(x), msg=name)
    assert xafunc.cache_info().misses == 3
    g = lambda x: x.view(-1).sin().sum()  # noqa: E731
    xderiv(g, 2)(a)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        xderiv(g, 2)(layouts["transposed"])  # as torch.func: not the contiguous capture


# ---------------------------------------------------------------------------- side effects
def test_failed_call_leaves_the_callers_tensor_alone():
    x = _x()
    before = clone_tree(x)
    with pytest.raises(ValueError, match="in place"):
        xderiv(lambda x: x.mul_(2).sin(), 1)(x)
    assert_tree_equal(x, before)


def test_batch_norm_buffers_update_exactly_once_per_call():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).to(F64).train()
    twin = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).to(F64).train()
    twin.load_state_dict(net.state_dict())
    x = _x(15).reshape(5, 3)
    lin, bn = twin[0], twin[1]

    def stateless(x):  # the same map without the buffer update (torch.func refuses that)
        h = F.batch_norm(lin(x), None, None, bn.weight, bn.bias, True, 0.1, bn.eps)
        return h.tanh().sum(0)

    for step in (1, 2):
        with xafunc.strict():
            got = xderiv(lambda x: net(x).sum(0), 2)(x)
        assert_tree_close(got, reference_deriv(stateless, 2)(x))
        with torch.no_grad():
            twin(x)  # one eager call
        assert int(net[1].num_batches_tracked) == step
        assert_tree_close(dict(net.named_buffers()), dict(twin.named_buffers()))


@pytest.mark.parametrize("norm", ["batch", "instance", "functional_call"])
def test_running_statistics_updated_by_eager_steps_are_seen(norm):
    """torch's batch-norm kernels update running statistics in place without bumping their
    version counters (NOTE [Unversioned writes]): an eval-mode derivative after an eager
    train-mode step must use the new statistics, not values hoisted from the old ones."""
    torch.manual_seed(2)
    layer = (nn.InstanceNorm1d(4, affine=True, track_running_stats=True) if norm == "instance"
             else nn.BatchNorm1d(4))
    net = nn.Sequential(nn.Linear(3, 4), layer, nn.Tanh(), nn.Linear(4, 1)).to(F64).eval()
    state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    if norm == "instance":
        f = lambda x: net[3](net[2](net[1](net[0](x).reshape(1, 4, 1)).reshape(4))).sum()  # noqa: E731
    elif norm == "functional_call":
        f = lambda s, x: torch.func.functional_call(net, s, (x.unsqueeze(0),)).sum()  # noqa: E731
    else:
        f = lambda x: net(x.unsqueeze(0)).sum()  # noqa: E731
    x, before = _x(3, seed=4), None
    for step in range(3):
        with torch.no_grad():
            ref = (reference_deriv(f, 3, 1)(state, x) if norm == "functional_call"
                   else reference_deriv(f, 3)(x))
        with xafunc.strict():
            got = (xderiv(f, 3, argnums=1)(state, x) if norm == "functional_call"
                   else xderiv(f, 3)(x))
        assert_tree_close(got, ref, msg=f"after {step} eager train-mode steps")
        assert before is None or not torch.allclose(got, before), "the statistics moved"
        before = got
        net.train()
        with torch.no_grad():  # one eager step: the kernel writes the running statistics
            net[1](torch.randn(5, 4, 3, dtype=F64) if norm == "instance"
                   else torch.randn(5, 4, dtype=F64))
        net.eval()


@pytest.mark.parametrize("replace", ["attribute", "functional_call"])
def test_running_statistics_replaced_by_new_tensors_are_seen(replace):
    """Running statistics replaced by new tensors (an assignment, a new state dict for
    ``functional_call``) pass the guards -- the same shapes, read afresh on every call -- and
    the kernels then write *them* without bumping their counters: they are noted where the
    graph reads running statistics on every call, not only as the traced tensors (NOTE
    [Unversioned writes])."""
    torch.manual_seed(5)
    xafunc.clear_cache()
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    net = net.to(F64).eval()
    # (the count of batches, written with its counter bumped, would hide a stale cache)
    state = {**dict(net.named_parameters()), **{
        k: v for k, v in net.named_buffers() if not k.endswith("num_batches_tracked")}}
    if replace == "functional_call":
        f = lambda s, x: torch.func.functional_call(net, s, (x.unsqueeze(0),)).sum()  # noqa: E731
    else:
        f = lambda x: net(x.unsqueeze(0)).sum()  # noqa: E731
    x = _x(3, seed=6)
    for step in range(3):
        # new tensors, same values: the guards hold, the graph is reused
        if replace == "functional_call":
            state = {k: v.clone() if k.endswith(("_mean", "_var")) else v
                     for k, v in state.items()}
        else:
            net[1].running_mean = net[1].running_mean.clone()
            net[1].running_var = net[1].running_var.clone()
        for when in ("before", "after"):  # the first call caches what it may
            with torch.no_grad():
                ref = (reference_deriv(f, 2, 1)(state, x) if replace == "functional_call"
                       else reference_deriv(f, 2)(x))
            with torch.no_grad(), xafunc.strict():
                got = (xderiv(f, 2, argnums=1)(state, x) if replace == "functional_call"
                       else xderiv(f, 2)(x))
            assert_tree_close(got, ref, msg=f"step {step}, {when} the eager train-mode step")
            if when == "before":
                with torch.no_grad():  # the kernel writes the new tensors
                    batch = torch.randn(6, 3, dtype=F64) * 2 + 1
                    if replace == "functional_call":
                        torch.func.functional_call(net.train(), state, (batch,))
                    else:
                        net.train()(batch)
                net.eval()
    assert xafunc.cache_info().misses == 1  # one capture served every call


def _write_shared(net: nn.Module) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5).add_(0.25)


def test_weights_written_by_another_process_are_seen():
    """Hogwild training: ``share_memory()`` weights written in place by another process move
    no counter in this one (NOTE [Unversioned writes]); the values hoisted from them must not
    be reused."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(F64).share_memory()
    f = lambda x: net(x).squeeze(-1)  # noqa: E731
    x = _x(3, seed=9)
    with torch.no_grad(), xafunc.strict():
        before = xderiv(f, 2)(x)
        child = torch.multiprocessing.get_context("spawn").Process(target=_write_shared,
                                                                   args=(net,))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == 0
        got = xderiv(f, 2)(x)
    assert not torch.allclose(got, before), "the other process wrote the weights"
    assert_tree_close(got, reference_deriv(f, 2)(x))


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, foreach=True),
    lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
    lambda p: torch.optim.Adam(p, lr=0.1, foreach=False),
    lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=2),
], ids=["sgd_foreach", "adam_fused", "adam_single_tensor", "lbfgs"])
def test_optimizer_steps_between_calls_are_seen(make_optimizer):
    """An optimiser step between calls is seen, whichever kernel writes the weights: foreach and
    per-tensor ones bump the weights' version counters, fused ones do not (NOTE [Unversioned
    writes]); the values are hoisted (``no_grad``), so a stale cache would show."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)
    f = lambda x: net(x).sum()  # noqa: E731
    x = _x(3, seed=5)
    opt = make_optimizer(net.parameters())

    def closure():
        opt.zero_grad()
        loss = xlaplacian(f)(x).pow(2)
        loss.backward()
        return loss

    for step in range(3):
        with torch.no_grad(), xafunc.strict():  # the plain fast path, with hoisted values
            got = xlaplacian(f)(x)
        assert_tree_close(got, reference_deriv(f, 2)(x).trace(), msg=f"after {step} steps")
        opt.step(closure)


def _sgd_through_data(net, w, state):
    for p in net.parameters():
        p.data -= 0.1 * torch.ones_like(p)  # the hand-written SGD step of older tutorials


def _held_data_alias(net, w, state):
    if "alias" not in state:  # taken once, before the loop, and written every step
        state["alias"] = [p.data for p in net.parameters()]
    for a in state["alias"]:
        a.mul_(0.9)


def _held_numpy_view(net, w, state):
    if "view" not in state:
        state["view"] = w.detach().numpy()
    state["view"][:] *= 1.1


@pytest.mark.parametrize("write", [
    _sgd_through_data,
    lambda net, w, state: [p.data.mul_(1.5) for p in net.parameters()],
    lambda net, w, state: [p.data.copy_(torch.randn_like(p)) for p in net.parameters()],
    lambda net, w, state: w.data.add_(0.25),  # a closure's plain tensor
    _held_data_alias,
    _held_numpy_view,
], ids=["sgd_through_data", "data_mul", "data_copy", "closure_data", "held_data_alias",
        "held_numpy_view"])
def test_writes_through_untracked_aliases_are_seen(write):
    """Writes through ``.data`` and NumPy aliases bypass the version counters that the cache of
    hoisted values trusts; they are seen all the same (NOTE [Unversioned writes]), whether the
    alias is dropped at once or kept across calls. The values are hoisted (``no_grad``), so a
    stale cache would show."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)
    f = lambda x: net(torch.sin(w) @ x)  # noqa: E731  (``sin(w)`` is hoisted: a copy)
    x = _x(3, seed=6)
    state: dict[str, object] = {}
    before = None
    for step in range(3):
        with torch.no_grad(), xafunc.strict():
            got = xderiv(f, 2)(x)
        assert_tree_close(got, reference_deriv(f, 2)(x), msg=f"after {step} writes")
        assert before is None or not torch.allclose(got, before), "the weights moved"
        before = got
        with torch.no_grad():
            write(net, w, state)


@pytest.mark.parametrize("tie", ["data_of_another", "held_tensor"])
def test_storage_shared_by_assigning_data_is_seen(tie):
    """``w.data = v`` gives ``w`` the storage of ``v`` under a version counter of its own: an
    in-place write to ``v`` (``p1`` after ``p2.data = p1.data``, or a tensor the caller keeps)
    bumps only ``v``'s counter, and the values hoisted from ``w`` must follow all the same."""
    source = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(7))
    if tie == "data_of_another":
        source = nn.Parameter(source)
    w = torch.zeros(3, 3, dtype=F64)
    w.data = source.data if tie == "data_of_another" else source
    f = lambda x: (torch.sin(w) @ x).tanh().sum()  # noqa: E731  (``sin(w)`` is hoisted)
    x = _x(3, seed=8)
    for step in range(3):
        with torch.no_grad(), xafunc.strict():
            got = xderiv(f, 2)(x)
        assert_tree_close(got, reference_deriv(f, 2)(x), msg=f"after {step} writes")
        with torch.no_grad():
            source.mul_(0.8).add_(0.05)  # bumps the counter of ``source`` alone


def test_aliases_leave_torch_and_the_cache_alone(monkeypatch):
    """The wrappers of ``Tensor.data`` and ``Tensor.numpy`` return what torch's do; calls that
    take no alias keep the cached hoisted values, and an alias taken recomputes them once."""
    import xafunc._execute.executable as executable

    p = nn.Parameter(torch.randn(3, dtype=F64))
    alias = p.data
    assert type(alias) is torch.Tensor and not alias.requires_grad
    assert alias.data_ptr() == p.data_ptr() and alias._version == 0
    p.data = torch.zeros(3, dtype=F64)
    assert p.requires_grad and type(p) is nn.Parameter and p.sum().item() == 0.0
    t = torch.arange(3.0)
    t.numpy()[0] = 7.0
    assert t[0].item() == 7.0

    stamps = []
    take = executable._stamps
    monkeypatch.setattr(executable, "_stamps", lambda ts: stamps.append(1) or take(ts))
    # ``.to()`` assigns ``param.data``: a new tensor, then (a second time) the same one
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64).to(F64)
    h = xafunc.xhessian(net)
    x = _x(3)
    with torch.no_grad(), xafunc.strict():
        h(x)
        first = len(stamps)
        for _ in range(3):
            h(x)
        assert first >= 1 and len(stamps) == first  # cached: no alias taken
        net[0].weight.data  # an alias, dropped at once  # noqa: B018
        h(x)
        assert len(stamps) == first + 1
        h(x)
        assert len(stamps) == first + 1
        loss = (net(x) ** 2).sum()
        for _ in range(3):  # aliases of other tensors (a training loop's ``loss.data``)
            loss.data.item()
            loss.detach().numpy()
            h(x)
        assert len(stamps) == first + 1


def test_running_statistics_are_noted_by_storage():
    """The hoisting cache distrusts exactly the running statistics' counters (the others keep
    caching), told apart by the storage the kernels write (a view of it too; never by ``==``,
    which is elementwise on tensors)."""
    from xafunc._capture.tracer import unversioned
    from xafunc._execute.executable import _stamps

    net = nn.BatchNorm1d(4).to(F64).eval()
    with xafunc.strict():
        xderiv(lambda x: net(x.unsqueeze(0)).sum(), 2)(_x(4))
    mean, var, weight = net.running_mean, net.running_var, net.weight
    assert unversioned(mean) and unversioned(var)
    assert not unversioned(weight) and not unversioned(mean.clone())
    assert unversioned(mean[1:]) and unversioned(mean.detach())
    stamps = _stamps([mean, weight])
    assert stamps is not None and stamps[2][0][2] is None and stamps[2][1][2] == weight._version


def test_failed_call_leaves_module_buffers_alone(monkeypatch):
    import xafunc._engine.memory as memory

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(F64).train()
    before = clone_tree(dict(net.named_buffers()))
    x = _x(6).reshape(2, 3)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    with pytest.raises(ValueError, match="memory"):
        xderiv(lambda x: net(x).sum(0), 3)(x)  # cannot fit: refused before running
    assert_tree_equal(dict(net.named_buffers()), before)


# ------------------------------------------------------------------------- memory estimates
def _measured_peak(fn, *args) -> int:
    """Peak bytes held at once during ``fn(*args)`` (CPU profiler memory events; the graph
    runs through FX, whose allocations the profiler sees one op at a time)."""
    from torch.profiler import ProfilerActivity, profile

    import xafunc._execute.executable as executable

    real_plain_call = executable.plain_call
    executable.plain_call = lambda args: False
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(*args)
            del out
    finally:
        executable.plain_call = real_plain_call
    points = []
    for e in prof.events():
        own = e.cpu_memory_usage
        if e.name != "[memory]":
            own -= sum(c.cpu_memory_usage for c in e.cpu_children)
        if own:
            points.append((e.time_range.start, own))
    current = peak = 0
    for _, delta in sorted(points):
        current += delta
        peak = max(peak, current)
    return peak


def _mlp(sizes):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


@pytest.mark.parametrize("sizes,order,mode", [
    ([8, 64, 64, 4], 1, "forward"), ([8, 64, 64, 4], 2, "forward"),
    ([8, 64, 64, 4], 3, "forward"), ([8, 64, 64, 4], 2, "reverse"),
    ([8, 64, 64, 4], 3, "reverse"), ([4, 256, 256, 32], 1, "reverse"),
    ([4, 256, 256, 32], 2, "reverse"), ([4, 256, 256, 32], 3, "forward"),
    ([3, 64, 64, 2], 3, "reverse"),
])
def test_memory_estimate_bounds_the_measured_peak(sizes, order, mode):
    net, x = _mlp(sizes), torch.randn(sizes[0])
    est = xafunc.plan(net, order, mode=mode)(x).est_peak_bytes
    with torch.no_grad():
        g = xderiv(net, order, mode=mode)
        g(x)
        real = _measured_peak(g, x)
    assert 0.5 <= est / real <= 2.0, (est, real)


def test_reverse_levels_count_their_cotangent_basis():
    """Pure reverse mode at order 3 builds an ``N x N`` cotangent basis per level: a 50-input
    conv net (N = 250 000 at the last level) must be chunked or refused, never attempted."""
    torch.manual_seed(0)
    c1, c2 = nn.Conv2d(2, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def f(x):
        return torch.tanh(c2(torch.tanh(c1(x.reshape(1, 2, 5, 5))))).flatten()

    with pytest.raises(ValueError, match=r"one direction at a time needs about .*GiB.*mode='auto'"):
        xafunc.plan(f, 3, mode="reverse")(torch.randn(50))
    est = xafunc.plan(f, 3)(torch.randn(50)).est_peak_bytes  # auto: a schedule that fits
    assert est < 2 ** 30


def test_request_that_cannot_fit_fails_before_allocating(monkeypatch):
    import xafunc._engine.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * 2 ** 10)
    net, x = _mlp([16, 64, 64, 16]), torch.randn(16)
    with pytest.raises(ValueError, match=r"xderiv: the result alone needs 256\.0 KiB"):
        xderiv(net, 3)(x)
    net2 = _mlp([4, 256, 4])
    with pytest.raises(ValueError, match=r"chunk_size=1000 needs about .* Pass chunk_size="):
        xderiv(net2, 3, chunk_size=1000, mode="forward")(torch.randn(4))


def test_batch_that_cannot_fit_under_vmap_fails_before_allocating(monkeypatch):
    import xafunc._engine.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 ** 20)
    f = lambda x: torch.tanh(x @ torch.ones(8, 64, dtype=F64)).sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"xhessian: under vmap, a batch of 4096 samples needs "
                                         r"about .* chunk_size=\d+ .* to torch.func.vmap"):
        torch.func.vmap(xafunc.xhessian(f))(torch.randn(4096, 8, dtype=F64))
    xs = torch.randn(4, 8, dtype=F64)
    assert_tree_close(torch.func.vmap(xafunc.xhessian(f))(xs),
                      torch.func.vmap(reference_deriv(f, 2))(xs))


def test_batch_check_reads_device_memory_again_only_for_large_batches(monkeypatch):
    """The free memory is read on the first call under vmap, then again only when a batch
    needs more than ``RECHECK_FRACTION`` of that reading (``mem_get_info`` on a GPU is a
    driver call); a batch that no longer fits is still refused before running."""
    import xafunc._engine.memory as memory

    free = [2 ** 30]
    reads = []

    def available(device):
        reads.append(free[0])
        return free[0]

    monkeypatch.setattr(memory, "available_bytes", available)
    f = lambda x: torch.tanh(x @ torch.ones(8, 64, dtype=F64)).sum()  # noqa: E731
    hess = torch.func.vmap(xafunc.xhessian(f))
    xs = torch.randn(16, 8, dtype=F64)
    expected = torch.func.vmap(reference_deriv(f, 2))(xs)
    assert_tree_close(hess(xs), expected)
    first = len(reads)  # planning's reads (choose_chunk) and the batch check's
    for _ in range(3):
        assert_tree_close(hess(xs), expected)
    assert len(reads) == first
    # a batch needing more than that share of the last reading reads again, and is refused
    # when it no longer fits
    cpu = torch.device("cpu")
    assert memory.check_batch("xhessian", 100.0, 10, cpu, free=2 ** 20) == 2 ** 20
    assert len(reads) == first
    free[0] = 4000
    assert memory.check_batch("xhessian", 100.0, 10, cpu, free=3000) == 4000
    assert len(reads) == first + 1
    free[0] = 1000
    with pytest.raises(ValueError, match="under vmap, a batch of 10 samples needs about"):
        memory.check_batch("xhessian", 100.0, 10, cpu, free=3000)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_a_function_differentiating_itself_with_autograd(order):
    """A function that takes the gradient of its own input with ``torch.autograd.grad`` (the
    PINN idiom ``x if x.requires_grad else x.detach().requires_grad_()``): inside nested
    ``jacrev`` the input requires grad, so it is differentiated, never detached; the capture
    traces it the same way (differentiated arguments require grad), and autograd's own copies
    of the tensors it saves are the tensors themselves, not stop-gradients (NOTE [Tracer])."""
    torch.manual_seed(0)
    W = torch.randn(5, 3, dtype=F64)

    def f(x):
        with torch.enable_grad():
            y = x if x.requires_grad else x.detach().requires_grad_()
            u = (torch.tanh(W @ y) ** 2).sum()
            return torch.autograd.grad(u, y, create_graph=True)[0]

    x = _x(3)
    with xafunc.strict():
        assert_tree_close(xderiv(f, order)(x), reference_deriv(f, order)(x))
        assert_tree_close(xderiv(f, order, mode="forward")(x), reference_deriv(f, order)(x))
    assert xafunc.plan(f, order)(x).strategy == "engine"


_WF = torch.linspace(-1.0, 1.2, 15, dtype=F64).reshape(5, 3).sin()


def _u(x):
    return (torch.tanh(_WF @ x + 0.1) * torch.arange(1.0, 6.0, dtype=x.dtype)).sum()


# functions that take derivatives inside with torch.func or xafunc (a PINN's residual)
TRANSFORMS_INSIDE = {
    "grad": lambda x: (torch.func.grad(_u)(x) ** 2).sum(),
    "jacrev": lambda x: torch.func.jacrev(lambda y: torch.tanh(_WF @ y))(x).sin().sum(),
    "hessian": lambda x: torch.func.hessian(_u)(x).trace() * x.sum(),
    "xderiv": lambda x: (xderiv(_u, 1)(x) ** 2).sum(),
}


@pytest.mark.parametrize("name", list(TRANSFORMS_INSIDE))
def test_transforms_inside_the_function_keep_the_engine(name):
    """torch.func's ``vmap`` (under ``jacrev``/``hessian``, and xafunc's reference of an inner
    transform) removes its batch dimension by an operator its C++ dispatches with the trace's
    torch function modes still active: they took the values the recorder computes for tensors
    the function had read, and the capture failed (reference). The recorder hides itself from
    them; the engine runs, with nested torch.func's numbers."""
    f = TRANSFORMS_INSIDE[name]
    x = _x(3)
    with xafunc.strict():
        for order in (1, 2):
            assert_tree_close(xderiv(f, order)(x), reference_deriv(f, order)(x))
        assert_tree_close(xlaplacian(f)(x), reference_deriv(f, 2)(x).diagonal().sum())


# ----------------------------------------------------------------------- in-place operators
_W = torch.linspace(-1.0, 1.2, 20, dtype=F64).reshape(5, 4).cos()


def _lin(x: torch.Tensor) -> torch.Tensor:
    return _W @ x


#: in-place spellings whose decompositions wrap an out-of-place body (the wrapper writes the
#: result into ``self``; NOTE [Decompositions without dynamo's guard]), and a few recorded as
#: they are
IN_PLACE = {
    "lerp_": lambda x: _lin(x).lerp_(_lin(x).sin(), 0.3).pow(2).sum(),
    "addcmul_": lambda x: _lin(x).addcmul_(_lin(x).sin(), _lin(x).cos(), value=0.5).pow(2).sum(),
    "addcdiv_": lambda x: _lin(x).addcdiv_(_lin(x).sin(), _lin(x).exp(), value=0.5).sum(),
    "elu_inplace": lambda x: F.elu(_lin(x), inplace=True).pow(2).sum(),
    "elu_module": lambda x: nn.ELU(inplace=True)(_lin(x)).pow(2).sum(),
    "celu_inplace": lambda x: F.celu(_lin(x), inplace=True).pow(2).sum(),
    "mish_inplace": lambda x: F.mish(_lin(x), inplace=True).pow(2).sum(),
    "threshold_inplace": lambda x: F.threshold(_lin(x), 0.1, 0.0, inplace=True).pow(3).sum(),
    "tril_": lambda x: torch.outer(x, x.sin()).tril_().pow(2).sum(),
    "triu_": lambda x: torch.outer(x, x.sin()).triu_(1).pow(2).sum(),
    "zero_": lambda x: (_lin(x) * _lin(x).clone().zero_()).sum() + _lin(x).pow(3).sum(),
    "sinc_": lambda x: _lin(x).sinc_().pow(2).sum(),
    "deg2rad_": lambda x: _lin(x).deg2rad_().sin().sum(),
    "xlogy_": lambda x: (_lin(x).exp() + 0).xlogy_(_lin(x).exp() + 1).sum(),
    "silu_module": lambda x: nn.SiLU(inplace=True)(_lin(x)).pow(2).sum(),
    "relu_module": lambda x: nn.ReLU(inplace=True)(_lin(x)).pow(3).sum(),
    "masked_fill_": lambda x: _lin(x).masked_fill_(_lin(x) > 0.5, 0.0).pow(3).sum(),
}


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("name", list(IN_PLACE))
def test_in_place_operators_write_their_result(name, order):
    """``y.lerp_(...)``, ``F.elu(y, inplace=True)``, ``t.tril_()``, ...: the derivative is
    that of the written value (a stripped in-place wrapper returned the derivative of ``y``
    as it was, 26-900% off)."""
    f = IN_PLACE[name]
    x = torch.tensor([0.3, -0.7, 0.9, 0.2], dtype=F64)
    with xafunc.strict():
        got = xderiv(f, order)(x)
    assert_tree_close(got, reference_deriv(f, order)(x))


def _write_through(alias, write):
    def f(x: torch.Tensor) -> torch.Tensor:
        y = _lin(x).exp().clone()  # (exp's backward reads its output: not written)
        write(alias(y))
        return (y * _lin(x)).sum()

    return f


DETACHED_WRITES = {
    "detach_mul_": _write_through(lambda y: y.detach(), lambda a: a.mul_(0.5)),
    "data_setitem": _write_through(lambda y: y.data, lambda a: a.__setitem__(0, 2.0)),
    "detach_view_zero_": _write_through(lambda y: y.detach()[1:3], lambda a: a.zero_()),
    "detach_iadd": _write_through(lambda y: y.detach(), lambda a: a.__iadd__(1.0)),
}


@pytest.mark.fallback
@pytest.mark.parametrize("name", list(DETACHED_WRITES))
def test_writes_through_a_detached_alias_fall_back(name):
    """torch writes through the shared storage but keeps the original tensor's derivative
    history (the values change, the derivatives do not): nested torch.func's answer, which a
    graph cannot express, so the request falls back and says why (the engine returned the
    derivative of the new values, 50% off)."""
    f = DETACHED_WRITES[name]
    x = torch.tensor([0.3, -0.7, 0.9, 0.2], dtype=F64)
    for order in (1, 2):
        assert "detached alias" in (xafunc.plan(f, order)(x).fallback or "")
        assert_tree_close(xderiv(f, order)(x), reference_deriv(f, order)(x))


def test_detached_values_read_or_copied_still_run_the_engine():
    x = torch.tensor([0.3, -0.7, 0.9, 0.2], dtype=F64)
    for f in (lambda x: (x.detach() * _lin(x).sum()).sum(),
              lambda x: (x.detach().clone().mul_(2) * x.sin()).sum()):
        with xafunc.strict():
            assert_tree_close(xderiv(f, 2)(x), reference_deriv(f, 2)(x))


def test_two_norm_at_the_zero_vector():
    """``F.normalize`` of a zero row, a norm of a vector that is zero: torch's first derivative
    there is 0 (``norm_backward`` masks ``norm == 0``), and the engine's too (it was NaN); from
    second order on torch's own nested derivative is NaN where the function is constant zero
    (``normalize(0 * x)``), and the engine's is that constant's, 0."""
    x = torch.tensor([0.3, -0.7, 0.9, 0.2], dtype=F64)
    zero_row = lambda x: F.normalize(torch.stack([x, x * 0]), dim=1).sum()  # noqa: E731
    zero_part = lambda x: torch.linalg.vector_norm(  # noqa: E731
        torch.cat([x[:2] * 0, x[2:]]).view(2, 2), dim=1).pow(2).sum()
    one_row = lambda x: F.normalize(torch.stack([x]), dim=1).sum()  # noqa: E731
    parts = lambda x: torch.linalg.vector_norm(x[2:]).pow(2)  # noqa: E731
    with xafunc.strict():
        for f, nonzero_part in ((zero_row, one_row), (zero_part, parts)):
            assert_tree_close(xderiv(f, 1)(x), reference_deriv(f, 1)(x))
            for order in (2, 3):
                got = xderiv(f, order)(x)
                assert not got.isnan().any()
                assert_tree_close(got, reference_deriv(nonzero_part, order)(x))


def _is_plain(t):  # a helper the function calls: walked like the function
    return type(t) is torch.Tensor


EXACT_TYPE_TESTS = {
    "type_is": lambda x: x.sin().sum() if type(x) is torch.Tensor else x.cos().sum(),
    "class_eq": lambda x: (x.exp() if x.__class__ == torch.Tensor else x.cos()).sum(),
    "type_in": lambda x: (x.exp() if type(x) in (torch.Tensor,) else x.cos()).sum(),
    "type_name": lambda x: (x.exp() if type(x).__name__ == "Tensor" else x.cos()).sum(),
    "has_torch_function": lambda x: (
        x.cos() if torch.overrides.has_torch_function((x,)) else x.exp()).sum(),
    "in_a_helper": lambda x: (x.exp() if _is_plain(x) else x.cos()).sum(),
}


@pytest.mark.fallback
@pytest.mark.parametrize("name", list(EXACT_TYPE_TESTS))
def test_exact_type_tests_fall_back(name):
    """torch.func's wrappers are plain tensors, the trace's stand-ins a subclass: a test of a
    tensor's exact type took the other branch in the trace (1.3-3.6 off). Code that may make
    one runs the reference and the plan says why; ``isinstance`` keeps the engine."""
    f = EXACT_TYPE_TESTS[name]
    x = _x()
    for order in (1, 2):
        assert "exact type" in (xafunc.plan(f, order)(x).fallback or "")
        assert_tree_close(xderiv(f, order)(x), reference_deriv(f, order)(x))


def test_isinstance_tests_keep_the_engine():
    f = lambda x: x.sin().sum() if isinstance(x, torch.Tensor) else x.cos().sum()  # noqa: E731
    with xafunc.strict():
        assert_tree_close(xderiv(f, 2)(_x()), reference_deriv(f, 2)(_x()))


_C = (1 + 2j, 3 - 1j, 0.5j)


def test_conjugated_constants_are_folded_conjugated():
    """``c * c.conj()`` of a tensor made inside the function is computed while tracing: the
    recorder ran the kernel on the conjugate view with the dispatcher's ``Conjugate`` key set
    aside, so it read ``c`` (``c * c``, 7.9 off). The engine runs, with ``|c|^2``."""

    def f(x):
        c = torch.tensor(_C, dtype=torch.complex128)
        return ((c * c.conj()).real * x.sin() + torch.vdot(c, c).real * x).sum()

    x = _x()
    with xafunc.strict():
        for order in (1, 2):
            assert_tree_close(xderiv(f, order)(x), reference_deriv(f, order)(x))


@pytest.mark.fallback
def test_absolute_value_of_a_complex_intermediate_falls_back():
    """``|z|`` is not holomorphic: the real rule's ``sign`` raised on a complex ``z`` (orders
    2-3 of ``auto``). Such a graph runs the reference, which the plan says."""
    f = lambda x: (torch.exp(1j * x) * (1 + 2j) + x).abs().pow(3).sum()  # noqa: E731
    x = _x()
    for order in (1, 2, 3):
        assert "aten.abs.default with these arguments ('a torch.complex128 tensor',)" in \
            xafunc.plan(f, order)(x).fallback
        assert_tree_close(xderiv(f, order)(x), reference_deriv(f, order)(x))


def _caught_float(x):
    try:
        s = float(x.sum())
    except Exception:  # noqa: BLE001 - what a user's fallback looks like
        s = 1.0
    return (x * s).sin().sum()


def _caught_item_index(x):
    try:
        i = int(x.argmax().item())
    except Exception:  # noqa: BLE001
        i = 0
    return x[i] ** 3 + x.sum()




@pytest.mark.fallback
@pytest.mark.parametrize("f", [_caught_float, _caught_item_index])
def test_a_refused_trace_the_function_catches_is_refused_all_the_same(f):
    """A trace refuses a value read by raising; a function that caught the error went on
    with its handler's value, which the graph then baked in (1.7-12 off). The trace
    remembers the refusal and the request runs the reference."""
    for x in (torch.tensor([0.1, 0.2, 0.9], dtype=F64), torch.tensor([-2.0, 0.5, 0.1], dtype=F64)):
        assert "Python control flow" in (xafunc.plan(f, 2)(x).fallback or "")
        assert_tree_close(xderiv(f, 2)(x), reference_deriv(f, 2)(x))


# --------------------------------------------------------------- far from the origin
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("act", [F.elu, F.selu, lambda t: F.celu(t, 3.0)],
                         ids=["elu", "selu", "celu3"])
def test_exponential_linear_units_far_from_zero(act, mode, dtype):
    """``elu``/``selu``/``celu`` at pre-activations of +-100 to 1700: the positive branch's
    derivatives are exactly zero and the negative branch's are ``exp`` of the input, as
    torch's own elu kernels give them. The decomposition used to take ``expm1`` of every
    input -- ``inf`` beyond 88 (float32) or 709, so a derivative of its ``where`` (reverse
    levels, and any backward through the result) was NaN -- and its derivative as
    ``expm1(x) + 1``, which cancels for negative x: third derivatives 0 (elu) or 0.2 % off
    (celu, alpha 3) at x = -100 in float64. Checked on the derivatives and on their gradient
    in the weights, for every schedule."""
    W = (torch.tensor([[1.0, -2.0], [-3.0, 0.5], [2.0, 1.0]], dtype=F64) * 1000).requires_grad_()
    x = torch.tensor([0.3, -0.7], dtype=F64)  # pre-activations 1700, -1250, -100

    def f(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return act(w.to(dtype) @ x.to(dtype)).sum()

    def values(deriv: object) -> tuple[torch.Tensor, torch.Tensor]:
        d = deriv(W, x)
        (g,) = torch.autograd.grad(d.double().pow(2).sum(), W)
        return d.double(), g

    with xafunc.strict():
        got = values(xafunc.xderiv(f, 3, argnums=1, mode=mode))
    expected = values(reference_deriv(f, 3, argnums=1))
    assert not any(t.isnan().any() for t in got)
    tol = {"rtol": 1e-4, "atol": 1e-12} if dtype == torch.float32 else {}
    assert_tree_close(got, expected, **tol)


def test_every_derivative_of_expm1_is_exp_of_the_input():
    """``expm1``'s derivatives are ``exp(x)``, not torch's ``expm1(x) + 1``, which is 0 from
    x = -40 on (float64)."""
    x = torch.tensor([-40.0, -5.0, 0.0, 3.0], dtype=F64)
    with xafunc.strict():
        d3 = xderiv(lambda t: torch.expm1(t).sum(), 3)(x)
    assert_tree_close(torch.diagonal(torch.diagonal(d3)), torch.exp(x), rtol=1e-13, atol=0)
