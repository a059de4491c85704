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

