"""Taylor mode: ``jet``, ``xlaplacian`` and ``xbiharmonic`` against nested torch.func (float64)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import xafunc
from xafunc import jet, xbiharmonic, xlaplacian
from xafunc._capture.cache import CACHE

DT = torch.float64


def _nested_jvp(f, x, v, k):
    """``D^k f(x)[v, ..., v]`` by ``k`` nested ``torch.func.jvp``."""
    h = f
    for _ in range(k):
        h = (lambda hh: (lambda y: jvp(hh, (y,), (v,))[1]))(h)
    return h(x)


def _close(a, b, rtol=1e-9, atol=1e-9):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


_W = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
_CW = torch.randn(3, 1, 3, generator=torch.Generator().manual_seed(2), dtype=DT)

# (name, function of a (4,) vector, input transform keeping it in the domain)
OPS = [
    ("tanh", torch.tanh, None),
    ("sigmoid", torch.sigmoid, None),
    ("sin", torch.sin, None),
    ("exp", torch.exp, None),
    ("log", torch.log, lambda x: x.abs() + 0.5),
    ("softplus", F.softplus, None),
    ("gelu", F.gelu, None),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), None),
    ("silu", F.silu, None),
    ("softmax", lambda x: torch.softmax(x, -1), None),
    ("log_softmax", lambda x: torch.log_softmax(x, -1), None),
    ("layer_norm", lambda x: F.layer_norm(x, (4,)), None),  # reference: _manual_layer_norm
    ("mul", lambda x: x * x.sin(), None),
    ("div", lambda x: x.cos() / (x * x + 1), None),
    ("pow", lambda x: (x.abs() + 0.5) ** 2.5, None),
    ("pow_tensor", lambda x: torch.pow(x.abs() + 0.5, x), None),
    ("sqrt", lambda x: torch.sqrt(x * x + 1), None),
    ("linear", lambda x: torch.tanh(F.linear(x, _W, _W[0])), None),
    ("matmul", lambda x: torch.outer(x, x) @ x.sin(), None),
    ("conv1d", lambda x: F.conv1d(x.reshape(1, 1, 4).sin(), _CW).flatten(), None),
    ("sum_prod", lambda x: (x.exp().sum() * x).tanh(), None),
    ("norm", lambda x: torch.linalg.vector_norm(x + 3.0), None),
]


def _manual_layer_norm(x):
    # nested torch.func.jvp through F.layer_norm is wrong from order 2 on (torch 2.x:
    # native_layer_norm's forward-AD formula is not itself differentiable correctly), so the
    # reference differentiates the same formula written out
    var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + 1e-5)


@pytest.mark.parametrize("name,f,dom", OPS, ids=[o[0] for o in OPS])
def test_jet_line_matches_nested_jvp(name, f, dom):
    x = torch.randn(4, dtype=DT)
    if dom is not None:
        x = dom(x)
    v = torch.randn(4, dtype=DT)
    K = 6 if name not in ("pow_tensor", "conv1d", "norm") else 4
    y, ser = jet(f, (x,), ((v,) + (None,) * (K - 1),))
    _close(y, f(x))
    assert len(ser) == K
    ref_f = _manual_layer_norm if name == "layer_norm" else f
    for k in range(1, K + 1):
        want = _nested_jvp(ref_f, x, v, k)
        _close(ser[k - 1], want, rtol=1e-8, atol=1e-10 * (1 + want.abs().max().item()))


def _curve_derivatives(f, primals, series, K):
    """Reference: derivatives at 0 of ``t -> f(x(t))`` with ``x(t) = x0 + sum s_k t^k / k!``."""
    def g(t):
        xs = [p + sum(c * t ** k / math.factorial(k) for k, c in enumerate(s, 1) if c is not None)
              for p, s in zip(primals, series, strict=False)]
        return f(*xs)
    t0 = torch.zeros((), dtype=DT)
    one = torch.ones((), dtype=DT)
    return [_nested_jvp(g, t0, one, k) for k in range(1, K + 1)]


def test_jet_convention_is_derivatives_of_curve():
    """Coefficients are derivatives (JAX jet convention), not Taylor coefficients."""
    f = lambda a, b: torch.tanh(a * b.sin()) + a.exp() * b  # noqa: E731
    a, b = torch.randn(3, dtype=DT), torch.randn(3, dtype=DT)
    sa = tuple(torch.randn(3, dtype=DT) for _ in range(4))
    sb = tuple(torch.randn(3, dtype=DT) for _ in range(4))
    y, ser = jet(f, (a, b), (sa, sb))
    ref = _curve_derivatives(f, (a, b), (sa, sb), 4)
    _close(y, f(a, b))
    for got, want in zip(ser, ref, strict=False):
        _close(got, want, rtol=1e-8, atol=1e-8)
    # closed form: exp along x(t) = t^2 / 2 (series (0, 1)): y'' = 1, y'''' = 3
    zero, one = torch.zeros((), dtype=DT), torch.ones((), dtype=DT)
    _, ds = jet(torch.exp, (zero,), ((zero, one, zero, zero),))
    _close(torch.stack(list(ds)), torch.tensor([0.0, 1.0, 0.0, 3.0], dtype=DT))


def test_jet_pytree_output_zero_terms_and_orders():
    x = torch.randn(2, 3, dtype=DT)
    v = torch.randn(2, 3, dtype=DT)
    c = torch.ones(5, dtype=DT)

    def f(x):
        return {"a": x.sin().sum(0), "b": (c, x @ x.T)}

    for K in (1, 2, 5):
        y, ser = jet(f, (x,), ((v,) + (None,) * (K - 1),))
        assert set(ser) == {"a", "b"}
        assert len(ser["a"]) == K and len(ser["b"][1]) == K
        for k in range(K):  # a constant output has zero series
            assert torch.equal(ser["b"][0][k], torch.zeros(5, dtype=DT))
        ref = _curve_derivatives(lambda x: f(x)["b"][1], (x,), ((v,) + (None,) * (K - 1),), K)
        for got, want in zip(ser["b"][1], ref, strict=False):
            _close(got, want)
        if K >= 2:  # x @ x.T is quadratic along a line: third derivative and up vanish
            for k in range(2, K):
                _close(ser["b"][1][k], torch.zeros(2, 2, dtype=DT))


@pytest.mark.fallback
def test_jet_fallback_data_dependent_control_flow():
    def f(x):
        if x.sum() > 0:  # not capturable: nested jvp fallback
            return x.sin()
        return x.cos()

    x, v = torch.rand(3, dtype=DT), torch.randn(3, dtype=DT)
    with xafunc.strict(), pytest.raises(xafunc.FallbackError,
                                             match="jet: .*values of a traced tensor"):
        jet(f, (x,), ((v, None, None),))
    y, ser = jet(f, (x,), ((v, None, None),))
    for k in range(1, 4):
        _close(ser[k - 1], _nested_jvp(torch.sin, x, v, k))


@pytest.mark.fallback
@pytest.mark.parametrize("reads_a_value", [False, True], ids=["engine", "reference"])
def test_jet_treats_no_grad_blocks_as_constants(reads_a_value):
    """A ``torch.no_grad()`` block is a constant in ``jet`` as in nested ``jacrev`` (NOTE
    [No-grad blocks under forward mode]), whether the engine runs (under strict) or the
    function reads a value in Python and the reference runs: both give the contraction of
    nested ``jacrev`` along ``v``. Nested ``jvp`` differentiates through the block (torch's
    forward mode ignores grad mode) and differs. Called under ``torch.no_grad()``, the
    reference's series carry no history."""
    from tests._compare import assert_tree_close

    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=DT,
                    requires_grad=True)

    def f(x):
        with torch.no_grad():
            c = x.abs().sum() + (w * w).sum()
        s = (2.0 if x.sum().item() > 0 else 3.0) if reads_a_value else 2.0
        return torch.sin(w @ x) * c * s + (x ** 3).sum() * c

    x = torch.tensor([0.3, -0.5, 0.9], dtype=DT)
    v = torch.tensor([1.0, 0.5, -0.3], dtype=DT)
    K = 3
    with xafunc.strict(not reads_a_value):
        y, ser = jet(f, (x,), ((v,) + (None,) * (K - 1),))
    if reads_a_value:  # the reference ran: strict refuses the call
        with xafunc.strict(), pytest.raises(xafunc.FallbackError):
            jet(f, (x,), ((v,) + (None,) * (K - 1),))
    D, expected = f, []
    for _ in range(K):
        D = jacrev(D)
        T = D(x)
        for _ in range(T.dim() - 1):
            T = T @ v
        expected.append(T)
    assert_tree_close(list(ser), expected)
    assert_tree_close(y, f(x))
    with pytest.raises(AssertionError):
        assert_tree_close(ser[1], _nested_jvp(f, x, v, 2))
    with torch.no_grad():
        _, quiet = jet(f, (x,), ((v,) + (None,) * (K - 1),))
    assert not any(t.requires_grad for t in quiet)
    assert_tree_close([t.detach() for t in quiet], [t.detach() for t in ser])


@pytest.mark.fallback
@pytest.mark.parametrize("operator", [xlaplacian, xbiharmonic])
def test_fixed_directions_made_under_grad_are_plain(operator):
    """The exact directions are cached process-wide: the first ones made under a grad level
    (here by the fallback for a function that reads ``.item()`` of its input) must be plain
    tensors, not wrappers of that level, and every later call must still be right."""
    from xafunc._taylor_ops import _fixed_directions

    _fixed_directions.cache_clear()
    W = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    f = lambda w, x: torch.sin(w @ x).pow(2).sum() + 0.0 * x.sum().item()  # noqa: E731
    x = torch.randn(3, dtype=DT, generator=torch.Generator().manual_seed(4))
    K = 2 if operator is xlaplacian else 4

    def ref(w):
        d = lambda y: f(w, y)  # noqa: E731
        for _ in range(K):
            d = jacrev(d)
        return torch.einsum("iijj->" if K == 4 else "ii->", d(x))

    for _ in range(2):
        _close(grad(lambda w: operator(f, argnums=1)(w, x))(W), grad(ref)(W))
        (dirs, *_), = [_fixed_directions(K, 3, DT, torch.device("cpu"))]
        assert not torch._C._functorch.is_functorch_wrapped_tensor(dirs)
        _close(operator(f, argnums=1)(W, x), ref(W))


def test_jet_cache_and_composition_with_vmap_and_grad():
    W = torch.randn(5, 4, dtype=DT)
    f = lambda x: torch.tanh(x @ W.T).sum()  # noqa: E731
    xs, vs = torch.randn(6, 4, dtype=DT), torch.randn(6, 4, dtype=DT)
    out = vmap(lambda x, v: jet(f, (x,), ((v, None, None),))[1][2])(xs, vs)
    ref = torch.stack([_nested_jvp(f, x, v, 3) for x, v in zip(xs, vs, strict=False)])
    _close(out, ref)
    # grad of a third directional derivative w.r.t. the point
    g = grad(lambda x: jet(f, (x,), ((vs[0], None, None),))[1][2])(xs[0])
    g_ref = grad(lambda x: _nested_jvp(f, x, vs[0], 3))(xs[0])
    _close(g, g_ref)
    # the program was captured once for this signature
    assert len(CACHE.entries(f)) >= 1
    # a plain call runs the compiled propagation (TorchScript), with the same numbers
    x, v = xs[0], vs[0]
    with torch.no_grad():
        for _ in range(2):
            _close(jet(f, (x,), ((v, None, None),))[1][2], _nested_jvp(f, x, v, 3))
    runs = [p for e in CACHE.entries(f) for p in e.plans.values()]
    executors = {fn.executor for r in runs for fn in r.compiler.fns.values()
                 if hasattr(fn, "executor")}
    assert "torchscript" in executors, executors


def test_jet_validation():
    x = torch.randn(3)
    with pytest.raises(TypeError, match=r"jet: primals must be a tuple of tensors.*got Tensor"):
        jet(torch.sin, x, ((x,),))
    with pytest.raises(ValueError, match=r"jet: series must be a tuple with one entry per primal"):
        jet(torch.sin, (x, x), ((x,),))
    with pytest.raises(ValueError, match=r"jet: every series entry must have the same length K"):
        jet(lambda a, b: a * b, (x, x), ((x,), (x, x)))
    with pytest.raises(ValueError, match=r"jet: series\[0\]\[0\] has shape \(2,\) but primals"):
        jet(torch.sin, (x,), ((torch.ones(2),),))
    with pytest.raises(TypeError, match=r"jet: primals\[0\] must have a floating-point dtype"):
        jet(torch.sin, (torch.ones(3, dtype=torch.long),), ((x,),))


# ----------------------------------------------------------------------------- Laplacian
def _mlp(sizes, seed=0, act=torch.nn.Tanh):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [torch.nn.Linear(a, b), act()]
    return torch.nn.Sequential(*layers[:-1]).to(DT)


def _hess_trace(f, x):
    H = hessian(f)(x)
    n = x.numel()
    return H.reshape(H.shape[: H.dim() - 2 * x.dim()] + (n, n)).diagonal(dim1=-2, dim2=-1).sum(-1)


def test_laplacian_closed_form_and_shapes():
    x = torch.randn(2, 3, dtype=DT)
    f = lambda x: torch.stack([(x ** 4).sum(), (x[0] * x[1]).sum(), x.sum()])  # noqa: E731
    lap = xlaplacian(f)(x)
    _close(lap, torch.stack([12 * (x ** 2).sum(), torch.zeros((), dtype=DT),
                             torch.zeros((), dtype=DT)]))


@pytest.mark.parametrize("act", [torch.nn.Tanh, torch.nn.SiLU, torch.nn.GELU, torch.nn.Softplus,
                                 torch.nn.Sigmoid])
def test_laplacian_vmap_functional_call_and_grad(act):
    net = _mlp([3, 12, 12, 2], act=act)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    xs = torch.randn(5, 3, dtype=DT)

    def u(p, x):
        return functional_call(net, p, (x,))

    lap = vmap(xlaplacian(u, argnums=1), in_dims=(None, 0))(params, xs)
    ref = vmap(lambda x: _hess_trace(lambda y: u(params, y), x))(xs)
    _close(lap, ref)
    # PINN-style loss: grad w.r.t. the parameters through the Laplacian
    src = torch.randn(5, 2, dtype=DT)

    def loss(p):
        return (vmap(xlaplacian(u, argnums=1), in_dims=(None, 0))(p, xs) - src).pow(2).mean()

    def loss_ref(p):
        return (vmap(lambda x: _hess_trace(lambda y: u(p, y), x))(xs) - src).pow(2).mean()

    g, g_ref = grad(loss)(params), grad(loss_ref)(params)
    for k in g:
        _close(g[k], g_ref[k])


@pytest.mark.parametrize("act", [torch.tanh, torch.sigmoid, torch.exp, torch.sin, torch.cos,
                                 lambda t: torch.log(t * t + 1.5)], ids=[
    "tanh", "sigmoid", "exp", "sin", "cos", "log"])
def test_laplacian_closed_form_elementwise_rules(act):
    """The collapsed degree-2 rules of the common activations (``_D2_UNARY``, some factored as
    ``g' (s + a r sum c_1^2)``): after a linear layer (no incoming sum) and after a nonlinear
    one (an incoming sum), also under vmap and with the weights differentiated."""
    g = torch.Generator().manual_seed(7)
    w1, w2, w3 = (torch.randn(*s, generator=g, dtype=DT) * 0.4
                  for s in ((6, 3), (6, 6), (2, 6)))

    def u(w, x):
        return w3 @ act(w @ act(w1 @ x))

    xs = torch.randn(4, 3, generator=g, dtype=DT)
    with xafunc.strict():
        lap = vmap(xlaplacian(u, argnums=1), in_dims=(None, 0))(w2, xs)
        dw = grad(lambda w: vmap(xlaplacian(u, argnums=1), in_dims=(None, 0))(w, xs).sum())(w2)
    ref = vmap(lambda x: _hess_trace(lambda y: u(w2, y), x))(xs)
    _close(lap, ref)
    _close(dw, grad(lambda w: vmap(lambda x: _hess_trace(lambda y: u(w, y), x))(xs).sum())(w2))


def test_laplacian_plain_vmap_tuple_argnums_and_other_ops():
    W = torch.randn(4, 6, dtype=DT)

    def f(x, y):
        h = torch.softmax(x @ W, -1) * torch.log1p(y.exp()).sum()
        return F.layer_norm(h, (6,)).sin() / (1 + y.sum() ** 2)

    x, y = torch.randn(4, dtype=DT), torch.randn(2, dtype=DT)
    got = xlaplacian(f, argnums=(0, 1))(x, y)
    z = torch.cat([x, y])
    ref = _hess_trace(lambda z: f(z[:4], z[4:]), z)
    _close(got, ref)
    xs = torch.randn(3, 4, dtype=DT)
    _close(vmap(xlaplacian(f), in_dims=(0, None))(xs, y),
           torch.stack([_hess_trace(lambda x: f(x, y), x) for x in xs]))


@pytest.mark.fallback
def test_laplacian_fallback_path():
    def f(x):
        return x.sin().sum() if x.sum() > 0 else x.cos().sum()

    x = torch.rand(4, dtype=DT)
    with xafunc.strict(), pytest.raises(xafunc.FallbackError,
                                             match="xlaplacian: .*values of a traced tensor"):
        xlaplacian(f)(x)
    _close(xlaplacian(f)(x), -x.sin().sum())


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_laplacian_randomized_is_unbiased(distribution):
    A = torch.randn(4, 4, dtype=DT)
    H = A + A.T  # f = x^T A x / 1 ... Hessian of 0.5 x^T H x is H
    f = lambda x: 0.5 * x @ H @ x + x.sin().sum()  # noqa: E731
    x = torch.randn(4, dtype=DT)
    exact = xlaplacian(f)(x)
    _close(exact, torch.trace(H) - x.sin().sum())
    S = 4000
    Hx = H - torch.diag(x.sin())
    gen = torch.Generator().manual_seed(0)
    est = vmap(xlaplacian(f, method="randomized", num_samples=1, generator=gen,
                          distribution=distribution), randomness="different")(x.expand(S, 4))
    # variance of v^T H v: 2 sum_{i!=j} H_ij^2 (Rademacher), 2 ||H||_F^2 (Gaussian)
    off = Hx - torch.diag(torch.diagonal(Hx))
    var = 2 * (off ** 2).sum() if distribution == "rademacher" else 2 * (Hx ** 2).sum()
    assert est.var().item() == pytest.approx(var.item(), rel=0.2)
    assert abs(est.mean() - exact) < 5 * math.sqrt(var / S)
    # one call with many samples: same estimator, averaged
    many = xlaplacian(f, method="randomized", num_samples=S, generator=gen,
                      distribution=distribution)(x)
    assert abs(many - exact) < 5 * math.sqrt(var / S)


def test_laplacian_validation():
    f = lambda x: x.sin().sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"xlaplacian: method must be one of .*got 'nope'"):
        xlaplacian(f, method="nope")
    with pytest.raises(ValueError, match=r"method='randomized' needs num_samples.*got None"):
        xlaplacian(f, method="randomized")
    with pytest.raises(ValueError, match=r"num_samples is only used with method='randomized'"):
        xlaplacian(f, num_samples=3)
    with pytest.raises(TypeError, match=r"xlaplacian: argnums must be an int .*got '0'"):
        xlaplacian(f, argnums="0")
    with pytest.raises(TypeError, match=r"xlaplacian: func must be callable, got 3"):
        xlaplacian(3)
    with pytest.raises(ValueError, match=r"xlaplacian: argnums=2 is out of range"):
        xlaplacian(f, argnums=2)(torch.ones(2))


# ---------------------------------------------------------------------------- biharmonic
def _biharmonic_ref(f, x):
    D = jacfwd(jacfwd(jacfwd(jacrev(f))))(x)
    n = x.numel()
    D = D.reshape(D.shape[: D.dim() - 4] + (n, n, n, n))
    return torch.einsum("...iijj->...", D)


def test_biharmonic_closed_form():
    for n in (1, 2, 4):
        x = torch.randn(n, dtype=DT)
        got = xbiharmonic(lambda x: (x ** 2).sum() ** 2)(x)  # |x|^4: 8 n (n + 2)
        _close(got, torch.tensor(8.0 * n * (n + 2), dtype=DT))


def test_biharmonic_vmap_functional_call_and_grad():
    net = _mlp([3, 8, 8, 1])
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    xs = torch.randn(4, 3, dtype=DT)

    def u(p, x):
        return functional_call(net, p, (x,)).squeeze(-1)

    got = vmap(xbiharmonic(u, argnums=1), in_dims=(None, 0))(params, xs)
    ref = vmap(lambda x: _biharmonic_ref(lambda y: u(params, y), x))(xs)
    _close(got, ref)

    def loss(p):
        return vmap(xbiharmonic(u, argnums=1), in_dims=(None, 0))(p, xs).pow(2).sum()

    def loss_ref(p):
        return vmap(lambda x: _biharmonic_ref(lambda y: u(p, y), x))(xs).pow(2).sum()

    g, g_ref = grad(loss)(params), grad(loss_ref)(params)
    for k in g:
        _close(g[k], g_ref[k], rtol=1e-8, atol=1e-8)


@pytest.mark.fallback
def test_biharmonic_other_ops_and_fallback():
    def f(x):
        return torch.stack([F.silu(x).prod(), torch.softmax(x, 0)[0], (x.sin() / (2 + x)).sum()])

    x = torch.randn(3, dtype=DT)
    with xafunc.strict():
        _close(xbiharmonic(f)(x), _biharmonic_ref(f, x))

    def g(x):
        return (x ** 3).sum() * x[0] if x.sum() > -10 else x.sum()

    with xafunc.strict(), pytest.raises(xafunc.FallbackError,
                                             match="xbiharmonic: .*values of a traced tensor"):
        xbiharmonic(g)(x)
    _close(xbiharmonic(g)(x), _biharmonic_ref(lambda x: (x ** 3).sum() * x[0], x))


def test_biharmonic_randomized_is_unbiased():
    f = lambda x: (x ** 2).sum() ** 2 + x.prod() * x[0] ** 3  # noqa: E731
    x = torch.randn(3, dtype=DT)
    exact = xbiharmonic(f)(x)
    S = 4000
    gen = torch.Generator().manual_seed(0)
    est = vmap(xbiharmonic(f, method="randomized", num_samples=1, generator=gen),
               randomness="different")(x.expand(S, 3))
    assert abs(est.mean() - exact) < 5 * est.std() / math.sqrt(S)
    with pytest.raises(ValueError, match=r"randomized biharmonic estimator needs "
                       r"distribution='gaussian'"):
        xbiharmonic(f, method="randomized", num_samples=2, distribution="rademacher")(x)


# ------------------------------------------------------------------------------- surface
def test_public_surface_and_docstring_examples():
    for fn in (jet, xlaplacian, xbiharmonic):
        assert fn.__module__ == "xafunc"
        assert fn.__name__ in xafunc.__all__
        assert getattr(xafunc, fn.__name__) is fn
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        for test in doctest.DocTestFinder().find(fn, fn.__name__, globs={}):
            runner.run(test)
        assert runner.failures == 0 and runner.tries > 0


@pytest.mark.parametrize(("kind", "ops"), [("tanh", 16), ("sigmoid", 27)])
def test_activation_polynomials_by_horner(kind: str, ops: int) -> None:
    """tanh's and sigmoid's scaled derivatives are polynomials in the output (``_polys``),
    evaluated by Horner's rule -- in ``y * y`` for tanh's, each odd or even: their values equal
    the polynomials summed term by term (float64, orders 1-8, ``y`` in ``(-1, 1)``), and at
    order 6 the six polynomials cost ``ops`` operators once the constants are folded (summing
    scaled powers cost 29 and 50)."""
    from xafunc._capture.tracer import record
    from xafunc._execute.optimize import simplify
    from xafunc._rules.elementwise import _poly_values, _polys

    y = torch.rand(64, generator=torch.Generator().manual_seed(5), dtype=DT) * 2 - 1
    for k in range(1, 9):
        polys = _polys(kind, k)
        for p, got in zip(polys, _poly_values(polys, y), strict=True):
            expected = sum(c * y ** i for i, c in enumerate(p))
            _close(got, expected)
    gm = simplify(record(lambda y: tuple(_poly_values(_polys(kind, 6), y)), [y]))
    assert sum(n.op == "call_function" for n in gm.graph.nodes) == ops, gm.code
