"""Pytrees, argnums, has_aux, kwargs, xderivs / xjacobian / xhessian, dtypes, repeated calls.

Everything is compared with the nested-jacrev oracle through ``assert_tree_close``, which also
checks the pytree structure (tuples vs lists, dict keys and their order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

import xafunc
from tests._compare import assert_tree_close, clone_tree, reference_deriv
from xafunc import xderiv, xderivs, xhessian, xjacobian
from xafunc._capture.cache import CACHE

F64 = torch.float64
ALL_MODES = ["auto", "forward", "reverse", "reference"]


def t(*shape, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(device)


def two_arg(x, y):
    return torch.tanh(x[:, None] * y.sin()).sum(0) + x.sum() * y.cos()


def small_model(device):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).to(F64).to(device)
    return m


# --------------------------------------------------------------------------------------------
# argnums
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_tuple_argnums_nested_tuples(order, mode, device):
    x, y = t(3, device=device, seed=1), t(2, device=device, seed=2)
    actual = xderiv(two_arg, order, argnums=(0, 1), mode=mode)(x, y)
    expected = reference_deriv(two_arg, order, (0, 1))(x, y)
    assert_tree_close(actual, expected)
    # explicit structure: order levels of 2-tuples, leaf shapes out + in_i + in_j + ...
    shapes = {(): (3,), (0,): (3,), (1,): (2,)}
    leaves, _ = pytree.tree_flatten_with_path(actual)
    assert len(leaves) == 2**order
    for path, leaf in leaves:
        idx = tuple(p.idx for p in path)
        assert len(idx) == order
        expected_shape = (2,) + sum((shapes[(i,)] for i in idx), ())
        assert tuple(leaf.shape) == expected_shape


def test_argnums_order_is_respected():
    x, y = t(3, seed=1), t(2, seed=2)
    d = xderiv(two_arg, 2, argnums=(1, 0))(x, y)
    assert_tree_close(d, reference_deriv(two_arg, 2, (1, 0))(x, y))
    assert d[0][1].shape == (2, 2, 3)  # d/dy then d/dx


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("argnums,positive", [(-1, 1), (-2, 0), ((-1,), (1,)),
                                              ((0, -1), (0, 1)), ((-1, -2), (1, 0))])
def test_negative_argnums(argnums, positive, order, mode):
    x, y = t(3, seed=1), t(2, seed=2)
    actual = xderiv(two_arg, order, argnums=argnums, mode=mode)(x, y)
    assert_tree_close(actual, reference_deriv(two_arg, order, positive)(x, y))
    assert_tree_close(actual, reference_deriv(two_arg, order, argnums)(x, y))
    assert_tree_close(actual, xderiv(two_arg, order, argnums=positive, mode=mode)(x, y))


def test_single_element_tuple_argnums_keeps_tuple():
    x, y = t(3, seed=1), t(2, seed=2)
    d = xderiv(two_arg, 2, argnums=(1,))(x, y)
    assert isinstance(d, tuple) and len(d) == 1 and isinstance(d[0], tuple)
    assert_tree_close(d, reference_deriv(two_arg, 2, (1,))(x, y))


def test_non_tensor_non_differentiated_args():
    def f(x, n, name, opt, w):
        assert isinstance(n, int) and name == "sq" and opt is None
        return (x**n * w).sin()

    x, w = t(3, seed=1), t(3, seed=2)
    actual = xderiv(f, 3)(x, 2, "sq", None, w)
    assert_tree_close(actual, reference_deriv(f, 3)(x, 2, "sq", None, w))


# --------------------------------------------------------------------------------------------
# pytree inputs and outputs
# --------------------------------------------------------------------------------------------


def _functional_model(device):
    """A small model as ``f(params, x)`` with its parameter dict and an input."""
    m = small_model(device)
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    return (lambda p, x: functional_call(m, p, (x,))), params, t(2, device=device, seed=3)


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("order", [1, 2])
def test_dict_params_functional_call_argnums0(order, mode, device):
    f, params, x = _functional_model(device)
    actual = xderiv(f, order, argnums=0, mode=mode)(params, x)
    expected = reference_deriv(f, order, 0)(params, x)
    assert_tree_close(actual, expected)
    assert isinstance(actual, dict) and list(actual) == list(params)
    if order == 2:
        for k1 in params:
            assert list(actual[k1]) == list(params)
            for k2 in params:
                assert actual[k1][k2].shape == (1,) + params[k1].shape + params[k2].shape


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dict_params_functional_call_argnums1(order, mode, device):
    f, params, x = _functional_model(device)
    actual = xderiv(f, order, argnums=1, mode=mode)(params, x)
    assert_tree_close(actual, reference_deriv(f, order, 1)(params, x))
    assert actual.shape == (1,) + (2,) * order


def test_model_fn_order3_wrt_params(device):
    """The README's promise: xderiv(model_fn, order=3)(params, x) works."""
    m = small_model(device)
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    x = t(2, device=device, seed=3)

    def model_fn(p, x):
        return functional_call(m, p, (x,))

    actual = xderiv(model_fn, order=3)(params, x)
    assert_tree_close(actual, reference_deriv(model_fn, 3, 0)(params, x))
    assert actual["0.weight"]["2.bias"]["0.bias"].shape == (1, 2, 2, 1, 2)


def test_dict_params_and_input_together():
    m = small_model("cpu")
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    x = t(2, seed=3)
    f = lambda p, x: functional_call(m, p, (x,)).squeeze(0)  # noqa: E731
    actual = xderiv(f, 2, argnums=(0, 1))(params, x)
    assert_tree_close(actual, reference_deriv(f, 2, (0, 1))(params, x))


def test_nested_pytree_input():
    def f(inp):
        a, (b, c) = inp["a"], inp["bc"]
        return (a.sin() * b.sum() + c.exp().prod()).tanh()

    inp = {"a": t(2, seed=1), "bc": (t(3, seed=2), t(1, seed=3))}
    for order in (1, 2):
        actual = xderiv(f, order)(inp)
        assert_tree_close(actual, reference_deriv(f, order)(inp))


def test_list_input_stays_list():
    def f(xs):
        return (xs[0] * xs[1].sum()).sin()

    xs = [t(2, seed=1), t(3, seed=2)]
    actual = xderiv(f, 2)(xs)
    assert isinstance(actual, list) and isinstance(actual[0], list)
    assert_tree_close(actual, reference_deriv(f, 2)(xs))


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_tuple_and_dict_outputs(order, mode):
    def f(x):
        return {"sin": x.sin() * x.prod(), "pair": (x.tanh().sum(), x.exp()[:1])}

    x = t(3, seed=4)
    actual = xderiv(f, order, mode=mode)(x)
    assert_tree_close(actual, reference_deriv(f, order)(x))
    assert list(actual) == ["sin", "pair"] and isinstance(actual["pair"], tuple)


def test_tuple_output_with_tuple_argnums():
    def f(x, y):
        return (x * y).sin(), (x.sum() * y).tanh()

    x, y = t(2, seed=1), t(2, seed=2)
    actual = xderiv(f, 2, argnums=(0, 1))(x, y)
    assert_tree_close(actual, reference_deriv(f, 2, (0, 1))(x, y))


def test_scalar_input_and_output():
    x = torch.tensor(0.7, dtype=F64)
    d = xderiv(lambda x: x.sin() * x.exp(), 3)(x)
    assert d.shape == ()
    assert_tree_close(d, reference_deriv(lambda x: x.sin() * x.exp(), 3)(x))


# reductions and scans along a dimension of a 0-d tensor (a scalar loss's ``.max()``)
SCALAR_REDUCTIONS = {
    "amax": lambda x: x.amax() * x.amin(0, keepdim=True),
    "max_min": lambda x: x.max() + x.min(0).values * x.max(0, keepdim=True)[0],
    "median_mode": lambda x: x.median() * x.median(0).values + x.mode(0).values
    + x.nanmedian(0).values * x.nanmedian(),
    "scans": lambda x: x.cummax(0).values * x.cummin(0).values,
    "logsumexp_softmax": lambda x: x.logsumexp(0) * x.softmax(0) + x.log_softmax(0),
    "aminmax_prod": lambda x: torch.aminmax(x)[1] * torch.aminmax(x, dim=0)[0] * x.prod(0),
    "var_std": lambda x: (x * 2).var(0, correction=0) + x.std(0, correction=0)
    + torch.var_mean(x * 3, 0, correction=0)[1] * x,
    "sort_topk": lambda x: x.sort().values * x.topk(1).values * x.kthvalue(1).values,
}


@pytest.mark.parametrize("name", sorted(SCALAR_REDUCTIONS))
def test_reductions_of_a_0d_tensor(name):
    """Each runs the engine (strict suite) on a 0-d input as on its 1-element vector; these
    rules raised IndexError (no dimension 0 beside the directions')."""
    f = SCALAR_REDUCTIONS[name]
    x = torch.tensor(0.7, dtype=F64)
    for k in (1, 2):
        d = xderiv(f, k)(x)
        assert d.shape == ()
        assert_tree_close(d, reference_deriv(f, k)(x), msg=f"order {k}")
    # torch's own jacrev raises for ``flip`` of a 0-d tensor: ``d^2/dx^2 x^2 = 2``
    assert_tree_close(xderiv(lambda x: x.flip(0) * x, 2)(x), torch.tensor(2.0, dtype=F64))


def test_matrix_input_and_output_shapes():
    x = t(2, 3, seed=5)
    f = lambda x: (x @ x.T).tanh()  # noqa: E731
    d = xderiv(f, 2)(x)
    assert d.shape == (2, 2, 2, 3, 2, 3)
    assert_tree_close(d, reference_deriv(f, 2)(x))


# --------------------------------------------------------------------------------------------
# has_aux, kwargs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_has_aux(order, mode):
    def f(x):
        y = (x.sin() * x.roll(1)).sum()
        return y, {"y": y.detach(), "x2": x * 2}

    x = t(3, seed=6)
    d, aux = xderiv(f, order, has_aux=True, mode=mode)(x)
    d_ref, aux_ref = reference_deriv(f, order, has_aux=True)(x)
    assert_tree_close(d, d_ref)
    assert_tree_close(aux, aux_ref)
    assert_tree_close(aux, {"y": f(x)[0], "x2": x * 2})


def test_has_aux_tuple_argnums_and_xderivs():
    def f(x, y):
        out = (x * y.sum()).tanh()
        return out, out.sum()

    x, y = t(2, seed=1), t(3, seed=2)
    d, aux = xderiv(f, 2, argnums=(0, 1), has_aux=True)(x, y)
    assert_tree_close(d, reference_deriv(f, 2, (0, 1), has_aux=True)(x, y)[0])
    assert_tree_close(aux, f(x, y)[1])
    derivs, aux2 = xderivs(f, 2, argnums=(0, 1), has_aux=True)(x, y)
    assert_tree_close(aux2, f(x, y)[1])
    assert_tree_close(derivs[0], f(x, y)[0])
    assert_tree_close(derivs[2], d)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_kwargs_are_passed_and_not_differentiated(mode):
    def f(x, *, scale, shift=0.0, w=None):
        return (x * scale + shift).sin() * (w if w is not None else 1.0)

    x, w = t(3, seed=1), t(3, seed=2)
    g = xderiv(f, 2, mode=mode)
    for scale, shift in [(2.0, 0.0), (3.0, 0.5), (2.0, 0.0)]:
        kw = dict(scale=scale, shift=shift, w=w)
        actual = g(x, **kw)
        expected = reference_deriv(lambda x: f(x, **kw), 2)(x)  # noqa: B023
        assert_tree_close(actual, expected, msg=f"scale={scale}, shift={shift}")


# --------------------------------------------------------------------------------------------
# xderivs, xjacobian, xhessian
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("argnums", [0, (0, 1), 1, -1])
def test_xderivs_equals_each_xderiv(argnums, mode, device):
    def f(x, y):
        return {"a": (x[:, None] * y).tanh(), "b": (x.sum() * y.exp()).sum()}

    x, y = t(2, device=device, seed=1), t(2, device=device, seed=2)
    out = xderivs(f, 3, argnums=argnums, mode=mode)(x, y)
    assert isinstance(out, tuple) and len(out) == 4
    assert_tree_close(out[0], f(x, y))
    for j in (1, 2, 3):
        assert_tree_close(out[j], xderiv(f, j, argnums=argnums, mode=mode)(x, y),
                          msg=f"D^{j}: xderivs vs xderiv")
    for j in (1, 2, 3):
        assert_tree_close(out[j], reference_deriv(f, j, argnums)(x, y),
                          msg=f"D^{j}: xderivs vs oracle")


def test_xderivs_order1():
    x = t(3, seed=2)
    out = xderivs(torch.sin, 1)(x)
    assert len(out) == 2
    assert_tree_close(out[0], x.sin())
    assert_tree_close(out[1], torch.diag(x.cos()))


def test_transforms_wrap_func_like_functools_wraps():
    """Like torch.func's transforms, the returned callable carries ``func``'s name, docstring,
    module and signature (``__wrapped__``)."""
    import inspect

    def energy(x, scale=2.0):
        """The energy."""
        return (scale * x.sin()).sum()

    for transform in (xderiv(energy, 3), xjacobian(energy), xhessian(energy),
                      xderivs(energy, 2)):
        assert transform.__name__ == "energy" and transform.__doc__ == "The energy."
        assert transform.__module__ == energy.__module__ and transform.__wrapped__ is energy
        assert str(inspect.signature(transform)) == "(x, scale=2.0)"
    assert xhessian(nn.Linear(2, 1)).__name__ == "Linear"
    assert_tree_close(xhessian(energy)(t(3)), reference_deriv(energy, 2)(t(3)))


@pytest.mark.parametrize("mode", ALL_MODES)
def test_xjacobian_xhessian(mode, device):
    x, y = t(3, device=device, seed=1), t(2, device=device, seed=2)
    assert_tree_close(xjacobian(two_arg, mode=mode)(x, y), torch.func.jacrev(two_arg)(x, y))
    assert_tree_close(xjacobian(two_arg, argnums=(0, 1), mode=mode)(x, y),
                      torch.func.jacfwd(two_arg, argnums=(0, 1))(x, y))
    scalar = lambda x, y: two_arg(x, y).sum()  # noqa: E731
    assert_tree_close(xhessian(scalar, argnums=1, mode=mode)(x, y),
                      torch.func.hessian(scalar, argnums=1)(x, y))
    assert_tree_close(xhessian(scalar, argnums=(0, 1), mode=mode)(x, y),
                      torch.func.hessian(scalar, argnums=(0, 1))(x, y))
    assert_tree_close(xhessian(scalar, mode=mode)(x, y), xderiv(scalar, 2, mode=mode)(x, y))


def test_chunk_size_with_tuple_argnums_and_dicts():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(2, 2), nn.Tanh()).to(F64)
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    x = t(2, seed=3)
    f = lambda p, x: functional_call(m, p, (x,)).sum()  # noqa: E731
    expected = reference_deriv(f, 2, (0, 1))(params, x)
    for chunk in (1, 3):
        for mode in ALL_MODES:
            actual = xderiv(f, 2, argnums=(0, 1), chunk_size=chunk, mode=mode)(params, x)
            assert_tree_close(actual, expected, msg=f"chunk_size={chunk} mode={mode}")


# --------------------------------------------------------------------------------------------
# dtypes, devices, repeated calls
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_float32_stays_float32(mode, device):
    x = t(3, seed=2).float().to(device)
    f = lambda x: (x.sin() * x.roll(1)).tanh()  # noqa: E731
    d = xderiv(f, 3, mode=mode)(x)
    assert d.dtype == torch.float32 and d.device == x.device
    assert_tree_close(d, reference_deriv(f, 3)(x), rtol=1e-4, atol=1e-5)
    # and it is the float64 answer, up to float32 rounding
    assert_tree_close(d.double(), xderiv(f, 3, mode=mode)(x.double()), rtol=1e-4, atol=1e-5)


@pytest.mark.fallback
@pytest.mark.parametrize("compiler", ["script", "trace"])
def test_torchscript_modules_run_nested_torch_func(compiler):
    """A ``torch.jit.script``/``trace`` module keeps its code and attributes in C++, where the
    guards cannot look: it runs nested torch.func (as ``jacrev`` of it does), saying why,
    instead of failing inside the walk of its submodules."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(torch.float64)
    x = t(3, seed=3)
    scripted = torch.jit.script(net) if compiler == "script" else torch.jit.trace(net, (x,))
    plan = xafunc.plan(scripted, 2)(x)
    assert plan.strategy == "reference" and "TorchScript module" in plan.fallback
    assert_tree_close(xhessian(scripted)(x), reference_deriv(net, 2)(x))


@pytest.mark.fallback
@pytest.mark.parametrize("mode", ALL_MODES)
def test_mixed_dtype_arguments(mode):
    """Leaf dtypes follow nested jacrev: float32 and float64 inputs, float64 output (the
    engine concatenates the inputs into one vector, so this runs the reference)."""
    def f(x, y):
        return (x.double().sin() * y).sum()

    x, y = t(2, seed=1).float(), t(2, seed=2)
    plan = xafunc.plan(f, 2, argnums=(0, 1), mode=mode)(x, y)
    assert plan.strategy == "reference"
    assert mode == "reference" or "mix dtypes" in plan.fallback
    actual = xderiv(f, 2, argnums=(0, 1), mode=mode)(x, y)
    assert_tree_close(actual, reference_deriv(f, 2, (0, 1))(x, y), rtol=1e-6, atol=1e-7)


def test_repeated_calls_with_new_shapes_and_values():
    g = xderiv(lambda x: (x.sin() * x.sum()).tanh(), 2)
    for n, seed in [(2, 1), (3, 2), (2, 3), (4, 4), (3, 5)]:
        x = t(n, seed=seed)
        assert_tree_close(g(x), reference_deriv(lambda x: (x.sin() * x.sum()).tanh(), 2)(x),
                          msg=f"n={n} seed={seed}")


def test_inputs_not_mutated_and_no_grad_leak():
    m = small_model("cpu")
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    x = t(2, seed=3)
    before = clone_tree((params, x))
    own = clone_tree(dict(m.named_parameters()))
    versions = [p._version for p in m.parameters()]
    f = lambda p, x: functional_call(m, p, (x,))  # noqa: E731
    out = xderiv(f, 3, argnums=(0, 1))(params, x)
    assert_tree_close((params, x), before, rtol=0, atol=0)
    assert all(not leaf.requires_grad for leaf in pytree.tree_leaves(out))
    # capture swapped in stand-ins for the module's own parameters: never written, never left
    # requiring anything new, still the module's parameters
    assert_tree_close(clone_tree(dict(m.named_parameters())), own, rtol=0, atol=0)
    assert [p._version for p in m.parameters()] == versions
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in m.parameters())


def test_closed_over_tensor_updated_in_place_between_calls():
    """A training loop: the same transform is called after an optimizer step on the model."""
    m = small_model("cpu")
    d2 = xhessian(lambda x: m(x).sum())
    x = t(2, seed=3)
    first = d2(x)
    assert_tree_close(first, reference_deriv(lambda x: m(x).sum(), 2)(x))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5).add_(0.1)
    second = d2(x)
    assert_tree_close(second, reference_deriv(lambda x: m(x).sum(), 2)(x),
                      msg="after the parameters changed in place")
    assert not torch.allclose(first, second)


def test_argument_weights_updated_between_calls():
    """Weights passed as a non-differentiated argument (a ``functional_call`` parameter dict)
    are static inputs whose products are hoisted out of the per-call graph: an optimiser step,
    a new dict and a ``.data`` swap between calls must all be seen."""
    m = small_model("cpu")
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    f = lambda p, x: functional_call(m, p, (x,)).sum()  # noqa: E731
    x = t(2, seed=3)
    results = []

    def check(msg):
        got = xhessian(f, argnums=1)(params, x)
        assert_tree_close(got, reference_deriv(f, 2, 1)(params, x), msg=msg)
        results.append(got)

    check("first call")
    check("same weights")
    plans = [p for e in CACHE.entries(f) for p in e.plans.values() if p.program is not None]
    static = {e.n_static for p in plans for e in p.program.compiler.executables()}
    assert static == {len(params)}, "the weight arguments are static inputs"
    with torch.no_grad():
        for v in params.values():
            v.mul_(1.5).add_(0.1)  # an optimiser step, in place
    check("after an in-place update")
    params = {k: v * 0.5 for k, v in params.items()}
    check("a new dict of new tensors")
    params["0.weight"].data = params["0.weight"].data * -2.0
    check("after a .data swap")
    assert not any(torch.allclose(a, b) for a, b in zip(results, results[2:]))


def test_module_train_eval_toggle_between_calls():
    class MaskedDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.tensor([1.0, 0.0, 1.0], dtype=F64))

        def forward(self, x):
            return x * self.mask / 0.5 if self.training else x

    m = nn.Sequential(nn.Linear(3, 3), MaskedDropout(), nn.Tanh()).to(F64)
    f = lambda x: m(x.sin())  # noqa: E731
    g = xderiv(f, 2)
    x = t(3, seed=7)
    for training in (True, False, True):
        m.train(training)
        assert_tree_close(g(x), reference_deriv(f, 2)(x), msg=f"training={training}")


def test_python_attribute_changed_between_calls():
    """A Python float read by func (an annealed temperature) changes between calls."""
    class Temperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.temperature = 1.0

        def forward(self, x):
            return torch.tanh(x / self.temperature) * x.sum()

    m = Temperature()
    f = lambda x: m(x)  # noqa: E731
    g = xderiv(f, 2)
    x = t(2, seed=8)
    for temperature in (1.0, 2.0, 0.5):
        m.temperature = temperature
        assert_tree_close(g(x), reference_deriv(f, 2)(x), msg=f"temperature={temperature}")


def test_batch_norm_module_eval_and_functional_train():
    """batch_norm in eval (running stats) and train (batch statistics, no running-stat update)."""
    bn = nn.BatchNorm1d(2).to(F64).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0]))
    x = t(3, 2, seed=8)
    f_eval = lambda x: bn(x.sin()).tanh().sum(0)  # noqa: E731
    assert_tree_close(xderiv(f_eval, 2, mode="reverse")(x), reference_deriv(f_eval, 2)(x))
    f_train = lambda x: F.batch_norm(x.sin(), None, None, training=True).tanh().sum(0)  # noqa
    assert_tree_close(xderiv(f_train, 2, mode="reverse")(x), reference_deriv(f_train, 2)(x))


@pytest.mark.parametrize("batch", [1, 512])
def test_coefficients_share_one_product_only_while_small_under_vmap(batch, monkeypatch):
    """``map_coeffs`` concatenates the Taylor coefficients for one matrix product only while
    they are small: under ``vmap`` the batched graph is traced from per-sample rules, so the
    threshold must count the batch (a copy of 512 samples' coefficients costs more than the
    product call it saves). On forward-over-reverse, whose reverse sweep has coefficients
    to share (the adjoint schedule, cheaper here, has none)."""
    from xafunc._engine import program

    monkeypatch.setattr(program, "adjoint_candidate", lambda *args: None)
    xafunc.clear_cache()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                        nn.Linear(64, 1)).to(torch.float64)
    f = lambda x: net(x).squeeze(-1)  # noqa: E731
    xs = t(batch, 2, seed=1)
    with xafunc.strict():
        got = torch.func.vmap(xhessian(f))(xs)
    assert_tree_close(got, torch.func.vmap(reference_deriv(f, 2))(xs))
    plans = [p for e in CACHE.entries(f) for p in e.plans.values() if p.program is not None]
    graphs = [e.graph for p in plans for e in p.program.compiler.executables()]
    cats = sum(n.target is torch.ops.aten.cat.default for g in graphs for n in g.nodes)
    assert graphs and (cats > 0) == (batch == 1), cats
