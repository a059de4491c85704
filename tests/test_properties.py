"""Property tests: random small architectures, random order / argnums / mode, vs the oracle.

Derandomized (``derandomize=True``) so CI is deterministic; example counts keep the file fast.
The order is lowered when the result would be large (``m * n**order`` entries), so every
example stays cheap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xafunc
from tests._compare import assert_tree_close, reference_deriv
from xafunc import xderiv

F64 = torch.float64
MAX_RESULT = 6000  # entries of the derivative tensor

ACTIVATIONS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "sin": torch.sin,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "silu": F.silu,
}

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _cap_order(order: int, n: int, m: int) -> int:
    while order > 1 and m * n**order > MAX_RESULT:
        order -= 1
    return order


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=F64) * scale


@st.composite
def mlp_problems(draw):
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 6)) for _ in range(depth + 1)]
    acts = [draw(st.sampled_from(sorted(ACTIVATIONS))) for _ in range(depth)]
    batched = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    n_weights = 2 * depth
    argnum = draw(st.integers(0, n_weights))  # 0: the input, k >= 1: weight / bias k - 1
    order = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["auto", "forward", "reverse"]))
    return widths, acts, batched, seed, argnum, order, mode


@settings(max_examples=30, **SETTINGS)
@given(mlp_problems())
def test_random_mlp(problem):
    xafunc.clear_cache()  # each example is a new program, not a capture storm
    widths, acts, batched, seed, argnum, order, mode = problem
    g = torch.Generator().manual_seed(seed)
    x = _randn(g, *((2, widths[0]) if batched else (widths[0],)))
    params = []
    for i in range(len(acts)):
        params.append(_randn(g, widths[i + 1], widths[i], scale=1.0 / widths[i] ** 0.5))
        params.append(_randn(g, widths[i + 1], scale=0.3))

    def mlp(x, *params):
        h = x
        for i, act in enumerate(acts):
            h = ACTIVATIONS[act](F.linear(h, params[2 * i], params[2 * i + 1]))
        return h

    args = (x, *params)
    n = args[argnum].numel()
    m = mlp(*args).numel()
    order = _cap_order(order, n, m)
    actual = xderiv(mlp, order, argnums=argnum, mode=mode)(*args)
    expected = reference_deriv(mlp, order, argnum)(*args)
    assert_tree_close(actual, expected,
                      msg=f"widths={widths} acts={acts} argnum={argnum} order={order} {mode}")


@st.composite
def conv_problems(draw):
    dim = draw(st.sampled_from([1, 2]))
    c_in, c_out = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    size = draw(st.integers(kernel + 1, 5 if dim == 1 else 4))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, kernel // 2))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    pool = draw(st.sampled_from(["none", "max", "avg"]))
    seed = draw(st.integers(0, 2**31 - 1))
    argnum = draw(st.sampled_from([0, 1, 2]))  # input, conv weight, conv bias
    order = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["auto", "forward", "reverse"]))
    return dim, c_in, c_out, kernel, size, stride, padding, act, pool, seed, argnum, order, mode


@settings(max_examples=25, **SETTINGS)
@given(conv_problems())
def test_random_conv_net(problem):
    xafunc.clear_cache()  # each example is a new program, not a capture storm
    dim, c_in, c_out, kernel, size, stride, padding, act, pool, seed, argnum, order, mode = problem
    g = torch.Generator().manual_seed(seed)
    spatial = (size,) * dim
    x = _randn(g, 1, c_in, *spatial)
    w = _randn(g, c_out, c_in, *((kernel,) * dim), scale=0.7)
    b = _randn(g, c_out, scale=0.3)
    conv = F.conv1d if dim == 1 else F.conv2d
    out_size = (size + 2 * padding - kernel) // stride + 1
    pool_k = 2 if out_size >= 2 else 1
    pooling = {
        "none": lambda h: h,
        "max": (F.max_pool1d if dim == 1 else F.max_pool2d),
        "avg": (F.avg_pool1d if dim == 1 else F.avg_pool2d),
    }[pool]

    def net(x, w, b):
        h = ACTIVATIONS[act](conv(x, w, b, stride=stride, padding=padding))
        h = pooling(h) if pool == "none" else pooling(h, pool_k)
        return torch.tanh(h.flatten(2).sum(-1))  # (1, c_out)

    args = (x, w, b)
    n, m = args[argnum].numel(), net(*args).numel()
    order = _cap_order(order, n, m)
    actual = xderiv(net, order, argnums=argnum, mode=mode)(*args)
    expected = reference_deriv(net, order, argnum)(*args)
    assert_tree_close(actual, expected, msg=f"{problem} (order used {order})")


@settings(max_examples=15, **SETTINGS)
@given(order=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       scales=st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=1, max_size=4))
def test_elementwise_composite_derivative_is_diagonal(order, seed, scales):
    """For an elementwise f the k-th derivative is zero off the diagonal and equals the scalar
    k-th derivative on it: a structural check independent of the oracle's nesting."""
    g = torch.Generator().manual_seed(seed)
    x = _randn(g, len(scales))
    c = torch.tensor(scales, dtype=F64)

    def f(x):
        return torch.tanh(c * x) * torch.sin(x) + torch.exp(0.3 * x)

    d = xderiv(f, order)(x)
    diag = torch.zeros_like(d)
    for i in range(x.numel()):
        xi = x[i]
        scalar = reference_deriv(lambda s: torch.tanh(c[i] * s) * torch.sin(s)  # noqa: B023
                                 + torch.exp(0.3 * s), order)(xi)
        diag[(i,) * (order + 1)] = scalar
    assert_tree_close(d, diag)



# ------------------------------------------------------------------ random graphs, not MLPs
BLOCKS = ["linear", "residual", "attention", "norm", "stopgrad", "no_grad", "dropout",
          "product", "conv"]


def _norm(h: torch.Tensor, formula: bool) -> torch.Tensor:
    # torch's own nested derivatives of layer_norm are wrong from order 3 (NOTE [Oracle for
    # the norms] in test_operators): the oracle runs the same map written out
    if formula:
        mu = h.mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
    return F.layer_norm(h, h.shape[-1:])


def _block(kind: str, h: torch.Tensor, p: list[torch.Tensor], act, formula: bool
           ) -> torch.Tensor:
    w = h.shape[-1]
    if kind == "linear":
        return act(F.linear(h, p[0], p[1]))
    if kind == "residual":
        return h + act(h @ p[0].T)
    if kind == "product":
        return h * act(p[0] @ h + p[1])
    if kind == "attention":  # two tokens of width w/2, softmax attention, residual
        t = h.reshape(2, w // 2)
        q, k, v = t @ p[2][: w // 2, : w // 2], t @ p[3][: w // 2, : w // 2], t
        att = torch.softmax(q @ k.T / (w // 2) ** 0.5, dim=-1)
        return (t + att @ v).reshape(w)
    if kind == "norm":
        return _norm(h, formula) * (1 + 0.1 * p[1]) + 0.1 * p[1].flip(0)
    if kind == "stopgrad":
        return h * h.detach().tanh() + act(h)
    if kind == "no_grad":
        with torch.no_grad():
            scale = h.exp()
        return act(h) * scale
    if kind == "dropout":
        return F.dropout(act(h), 0.3, training=True)
    if kind == "conv":  # a 1-d convolution over the hidden vector
        return act(F.conv1d(h.reshape(1, 1, w), p[1][:3].reshape(1, 1, 3), padding=1)
                   ).reshape(w)
    raise ValueError(kind)


@st.composite
def graph_problems(draw):
    depth = draw(st.integers(1, 3))
    kinds = [draw(st.sampled_from(BLOCKS)) for _ in range(depth)]
    width = draw(st.sampled_from([4, 6]))
    n_in, m = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    seed = draw(st.integers(0, 2**31 - 1))
    order = draw(st.integers(1, 3))
    return kinds, width, n_in, m, act, seed, order


@settings(max_examples=15, **SETTINGS)
@given(graph_problems())
def test_random_graphs_every_mode_agrees_with_the_oracle(problem):
    """Residual, attention, normalisation, convolution, stop-gradient, no_grad and dropout
    blocks in random order: every engine mode (under strict, so the engine ran) equals nested
    jacrev of the same realisation, and the modes equal each other."""
    xafunc.clear_cache()  # each example is a new program, not a capture storm
    kinds, width, n_in, m, act_name, seed, order = problem
    g = torch.Generator().manual_seed(seed)
    act = ACTIVATIONS[act_name]
    w_in = _randn(g, width, n_in, scale=0.8)
    w_out = _randn(g, m, width, scale=0.5)
    params = [[_randn(g, width, width, scale=0.5), _randn(g, width, scale=0.3),
               _randn(g, width, width, scale=0.5), _randn(g, width, width, scale=0.5)]
              for _ in kinds]
    x = _randn(g, n_in)

    def make(formula: bool):
        def f(x):
            h = torch.tanh(w_in @ x)
            for kind, p in zip(kinds, params):
                h = _block(kind, h, p, act, formula)
            return w_out @ h

        return f

    order = _cap_order(order, n_in, m)
    torch.manual_seed(seed % 1000)
    expected = reference_deriv(make(True), order)(x)
    results = {}
    for mode in ("auto", "forward", "reverse", "mixed"):
        torch.manual_seed(seed % 1000)
        results[mode] = xderiv(make(False), order, mode=mode)(x)
        assert_tree_close(results[mode], expected, msg=f"{problem} {mode}")
    for mode in ("forward", "reverse", "mixed"):
        assert_tree_close(results[mode], results["auto"], msg=f"{problem} {mode} vs auto")


# ---------------------------------------------------------------------- guards (staleness)
class _Obj:
    pass


class _Slots:
    __slots__ = ("v",)


class _Getter:
    def __init__(self, v):
        self._v = v

    @property
    def v(self):
        return self._v

    @v.setter
    def v(self, value):
        self._v = value


class _AttrDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def _holder(kind: str, value):
    """A container of ``value`` and the step (attribute name or key) that reads it."""
    import types

    if kind in ("dict", "list"):
        return ({"v": value}, "v") if kind == "dict" else ([0.0, value], 1)
    holder = {"obj": _Obj, "slots": _Slots, "property": _Getter, "attrdict": _AttrDict,
              "namespace": types.SimpleNamespace, "module": types.ModuleType}[kind]
    obj = holder("_xafunc_state") if kind == "module" else holder.__new__(holder)
    if kind == "attrdict":
        dict.__init__(obj)
    setattr(obj, "_v" if kind == "property" else "v", value)
    return obj, "v"


def _get(obj, step, computed: bool):
    if isinstance(step, int) or type(obj) is dict:
        return obj[step]
    return getattr(obj, "".join(step)) if computed else obj.v


def _put(obj, step, value):
    if isinstance(step, int) or type(obj) is dict:
        obj[step] = value
    else:
        setattr(obj, step, value)


HOLDERS = ["dict", "list", "obj", "slots", "property", "attrdict", "namespace", "module"]


def _follow(obj, steps):
    for step in steps:
        obj = _get(obj, step, False)
    return obj


@st.composite
def state_problems(draw):
    kinds = [draw(st.sampled_from(HOLDERS)) for _ in range(draw(st.integers(1, 3)))]
    reach = draw(st.sampled_from(["closure", "default", "argument", "module_attribute"]))
    computed = draw(st.booleans())  # read by ``getattr(o, name)`` with a computed name
    replace = draw(st.integers(0, len(kinds) - 1))  # 0: the leaf in place, i: the holder i
    return kinds, reach, computed, replace


@settings(max_examples=40, **SETTINGS)
@given(state_problems())
def test_state_read_through_any_path_is_never_stale(problem):
    """Python state read through a random chain of holders (dicts, lists, objects, slots,
    properties, dict subclasses, namespaces, modules), reached a random way and read by
    attribute or by a computed name, then changed (the leaf in place, or a holder replaced by
    a changed copy): every call equals nested jacrev of the function as it is then."""
    import copy

    xafunc.clear_cache()
    kinds, reach, computed, replace = problem
    root, steps = 1.5, []
    for kind in reversed(kinds):
        root, step = _holder(kind, root)
        steps.insert(0, step)

    def read(obj):
        for step in steps:
            obj = _get(obj, step, computed)
        return obj

    def change(value):
        if replace == 0 or "module" in kinds[replace:]:  # the leaf, in place
            _put(_follow(root, steps[:-1]), steps[-1], value)
            return
        new = copy.deepcopy(_follow(root, steps[:replace]))  # holder ``replace``, replaced
        _put(_follow(new, steps[replace:-1]), steps[-1], value)
        _put(_follow(root, steps[:replace - 1]), steps[replace - 1], new)

    if reach == "closure":
        def f(x):
            return (x.sin() * read(root)).sum() + (x ** 3).sum()
    elif reach == "default":
        def f(x, s=root):
            return (x.sin() * read(s)).sum() + (x ** 3).sum()
    elif reach == "argument":
        def f(x, s=None):
            return (x.sin() * read(s)).sum() + (x ** 3).sum()
    else:
        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.state = root

            def forward(self, x):
                return (x.sin() * read(self.state)).sum() + (x ** 3).sum()

        f = Model()
    x = torch.randn(3, dtype=F64, generator=torch.Generator().manual_seed(len(kinds)))
    kw = {"s": root} if reach == "argument" else {}
    for value in (1.5, 3.0, 0.5):
        change(value)
        expected = reference_deriv(lambda x: f(x, **kw), 2)(x)
        with xafunc.strict():
            assert_tree_close(xafunc.xhessian(f)(x, **kw), expected, msg=f"{problem} {value}")
