"""Exact rules: constants in the input's dtype, kinks as torch's backward formulas, cdist.

The operator catalogue (tests/test_operators.py) checks every rule at generic points with a
relative tolerance of 1e-7, which cannot see a slope rounded through float32 (0.1 + 1.5e-9 in
float64 is 1.5e-8 off, relatively). Here:

* slopes of piecewise-linear functions must equal torch's own first derivative *exactly*, in
  float64 and float32, and smooth functions with Python-scalar constants to a few ulps;
* at the kinks themselves (``relu`` at 0, ``clamp`` at its bounds, ``hardswish`` at +-3, ties of
  ``maximum``/``fmax``, the jumps of ``remainder``/``fmod``) every order and every mode must
  return what nested ``jacrev`` returns, i.e. follow torch's derivative formulas
  (tools/autograd/derivatives.yaml);
* ``cdist``'s first derivative must match ``torch.autograd.functional.jacobian`` (torch.func's
  ``jacrev`` of ``cdist`` is itself wrong in torch 2.13), including coincident points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from tests._compare import assert_tree_close, reference_deriv
from tests.conftest import SCHEDULE_LABELS, schedule_applies, schedule_label
from xafunc import plan, xderiv

F64, F32 = torch.float64, torch.float32
MODES = ("auto", "forward", "reverse")


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# --------------------------------------------------------------------------------------------
# constants in the input's dtype
# --------------------------------------------------------------------------------------------

# piecewise-linear: the derivative is exactly a slope built from the Python scalars
PIECEWISE_LINEAR: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "leaky_relu_odd": lambda x: F.leaky_relu(x, 0.3337),
    "rrelu_eval": lambda x: F.rrelu(x, 0.1, 0.3, training=False),
    "hardtanh": lambda x: F.hardtanh(x, -0.3, 0.7),
    "relu6": lambda x: F.relu6(x * 7),
    "clamp": lambda x: torch.clamp(x, -0.3, 0.7),
    "threshold": lambda x: F.threshold(x, 0.1, -2.0),
    "softshrink": lambda x: F.softshrink(x, 0.3),
    "remainder": lambda x: torch.remainder(x, 0.7),
    "fmod": lambda x: torch.fmod(x, 0.7),
}

# smooth pieces with constants: a few ulps (torch's kernels order the operations differently)
SMOOTH_CONSTANTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": lambda x: F.elu(x, alpha=0.7),
    "selu": lambda x: F.selu(x),
    "softplus": lambda x: F.softplus(x, beta=2.0, threshold=3.0),
    "hardswish": lambda x: F.hardswish(x * 4),
    "gelu_none": lambda x: F.gelu(x * 2),
    "gelu_tanh": lambda x: F.gelu(x * 2, approximate="tanh"),
    "silu": lambda x: F.silu(x * 2),
    "mish": lambda x: F.mish(x * 2),
    "logsigmoid": lambda x: F.logsigmoid(x * 2),
    "logit_eps": lambda x: torch.logit(x.sigmoid(), eps=0.3),
    "huber": lambda x: F.huber_loss(x, torch.zeros_like(x), reduction="none", delta=0.7),
}


def _points(dtype: torch.dtype) -> torch.Tensor:
    # both sides of every kink used above, none on a kink
    return torch.tensor([-2.3, -0.9, -0.45, -0.05, 0.07, 0.2, 0.45, 0.8, 1.7, 2.9],
                        dtype=dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(PIECEWISE_LINEAR))
def test_piecewise_linear_slopes_are_exact(name: str, dtype: torch.dtype, mode: str) -> None:
    f = PIECEWISE_LINEAR[name]
    x = _points(dtype)
    expected = torch.func.jacrev(f)(x)
    actual = xderiv(f, 1, mode=mode)(x)
    assert_tree_close(actual, expected, rtol=0.0, atol=0.0, msg=f"{name} {dtype} {mode}")


def test_leaky_relu_slope_is_the_float64_scalar() -> None:
    """The value itself, not only agreement with torch: 0.1 as a float64, not 0.1f."""
    x = _points(F64)
    d = xderiv(lambda x: F.leaky_relu(x, 0.1), 1, mode="forward")(x).diagonal()
    assert d[x < 0].eq(0.1).all() and d[x > 0].eq(1.0).all()
    assert not d[x < 0].eq(float(torch.tensor(0.1, dtype=F32))).any()


@pytest.mark.parametrize("mode", MODES)
def test_hardsigmoid_slope_is_exact(mode: str) -> None:
    """1/6 in the input's dtype. (torch's own hardsigmoid_backward multiplies by ``1.0f / 6``:
    in float64 nested jacrev returns 0.16666667163372, 3e-8 relatively off; xafunc returns the
    float64 1/6. In float32 the two agree bit for bit.)"""
    f = lambda x: F.hardsigmoid(x * 4)  # noqa: E731
    x = _points(F64)
    inside = ((x * 4 > -3) & (x * 4 < 3)).to(F64)
    assert_tree_close(xderiv(f, 1, mode=mode)(x), torch.diag(inside * 4 / 6), rtol=0, atol=0)
    x32 = _points(F32)
    assert_tree_close(xderiv(f, 1, mode=mode)(x32), torch.func.jacrev(f)(x32), rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_celu_input_scale_is_exact(mode: str) -> None:
    """celu's ``1 / alpha`` in float64. (derivatives.yaml differentiates celu as
    ``elu_backward(grad, alpha, 1, 1.0 / alpha.toFloat(), ...)``: nested jacrev of ``F.celu``
    in float64 is off by ~1.6e-8 relatively; the oracle here is the written-out formula.)"""
    x = _points(F64)
    for k in (1, 2, 3):
        expected = reference_deriv(lambda x: torch.where(x > 0, x, 0.7 * torch.expm1(x / 0.7)),
                                   k)(x)
        actual = xderiv(lambda x: F.celu(x, alpha=0.7), k, mode=mode)(x)
        assert_tree_close(actual, expected, rtol=8 * _eps(F64), atol=8 * _eps(F64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(SMOOTH_CONSTANTS))
def test_smooth_constants_to_a_few_ulps(name: str, dtype: torch.dtype, mode: str) -> None:
    """First derivatives to 8 ulps; second derivatives, which torch and the Taylor rules form
    with different cancellations, to 1e-9 relative in float64 (a constant rounded through
    float32 would be ~1e-8 off) and 1e-4 in float32."""
    f = SMOOTH_CONSTANTS[name]
    x = _points(dtype)
    tol = {1: (8 * _eps(dtype), 8 * _eps(dtype)),
           2: (1e-9, 1e-12) if dtype == F64 else (1e-4, 1e-5)}
    for k in (1, 2):
        expected = reference_deriv(f, k)(x)
        actual = xderiv(f, k, mode=mode)(x)
        rtol, atol = tol[k]
        assert_tree_close(actual, expected, rtol=rtol, atol=atol,
                          msg=f"{name} {dtype} {mode} order {k}")


TANH_SIGMOID_FAMILY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": F.softplus, "silu": F.silu,
    "logsigmoid": F.logsigmoid, "mish": F.mish,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@pytest.mark.parametrize("name", sorted(TANH_SIGMOID_FAMILY))
def test_tanh_and_sigmoid_high_orders_in_float32(name: str) -> None:
    """NOTE [Higher derivatives of tanh and sigmoid]: float32 derivatives of order 3 to 8 (6 for
    ``gelu(approximate="tanh")``, whose cubic argument the composition amplifies) over ``|x|
    <= 12``, within 32 float32 epsilons of the largest value. As polynomials in the output
    they were off by 42 (tanh), 53 000 (sigmoid), 1 600 (mish) and 2 700 (gelu, sixth)
    epsilons. The oracle: nested ``torch.func.grad`` in float64, by torch's own formulas."""
    f = TANH_SIGMOID_FAMILY[name]
    x = torch.linspace(-12, 12, 241, dtype=F32)
    for k in (3, 5, 6) if name == "gelu_tanh" else (3, 5, 8):
        g: Callable[..., Any] = f
        for _ in range(k):
            g = torch.func.grad(g)
        expected = torch.func.vmap(g)(x.to(F64)).to(F32)
        actual = torch.func.vmap(xderiv(f, k))(x)
        scale = expected.abs().max().item()
        assert_tree_close(actual, expected, rtol=0.0, atol=32 * _eps(F32) * scale,
                          msg=f"{name} order {k}")


# --------------------------------------------------------------------------------------------
# kinks: every order, every mode, exactly where torch's formulas switch
# --------------------------------------------------------------------------------------------


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=F64)


# name -> (function, args, argnums, orders)
KINKS: dict[str, tuple[Callable[..., Any], tuple[Any, ...], Any, tuple[int, ...]]] = {
    "relu_at_0": (torch.relu, (_t(0.0, 1.0, -1.0),), 0, (1, 2, 3)),
    "abs_at_0": (torch.abs, (_t(0.0, 1.0, -1.0),), 0, (1, 2, 3)),
    "leaky_relu_at_0": (lambda x: F.leaky_relu(x, 0.2), (_t(0.0, 1.0, -1.0),), 0, (1, 2, 3)),
    "hardtanh_at_bounds": (lambda x: F.hardtanh(x, -0.5, 0.5), (_t(-0.5, 0.5, 0.1, 0.9),), 0,
                           (1, 2, 3)),
    "relu6_at_0_and_6": (F.relu6, (_t(0.0, 6.0, 3.0, -1.0),), 0, (1, 2, 3)),
    "clamp_at_bounds": (lambda x: torch.clamp(x, -0.5, 0.5), (_t(-0.5, 0.5, 0.1, 0.9),), 0,
                        (1, 2, 3)),
    "clamp_min_above_max": (lambda x: torch.clamp(x, 0.5, -0.5), (_t(-0.5, 0.5, 0.1),), 0,
                            (1, 2)),
    "clamp_min_at_bound": (lambda x: torch.clamp_min(x, 0.0), (_t(0.0, 1.0, -1.0),), 0, (1, 2)),
    "clamp_max_at_bound": (lambda x: torch.clamp_max(x, 0.0), (_t(0.0, 1.0, -1.0),), 0, (1, 2)),
    "clamp_tensor_bounds_ties": (
        lambda x, lo, hi: torch.clamp(x, lo, hi),
        (_t(0.0, 1.0, 0.5, 2.0, 0.3), _t(0.0, 0.0, 0.5, 1.0, 0.3),
         _t(1.0, 1.0, 0.5, 0.0, 0.3)), (0, 1, 2), (1, 2)),
    "clamp_min_tensor_tie": (lambda x, lo: torch.clamp_min(x, lo),
                             (_t(0.0, 1.0, -1.0), _t(0.0, 0.5, 0.5)), (0, 1), (1, 2)),
    "clamp_max_tensor_tie": (lambda x, hi: torch.clamp_max(x, hi),
                             (_t(0.0, 1.0, -1.0), _t(0.0, 0.5, 0.5)), (0, 1), (1, 2)),
    "hardswish_at_pm3": (F.hardswish, (_t(-3.0, 3.0, 0.5, -4.0, 4.0),), 0, (1, 2, 3)),
    "hardsigmoid_at_pm3": (F.hardsigmoid, (_t(-3.0, 3.0, 0.5, -4.0, 4.0),), 0, (1,)),
    "threshold_at_threshold": (lambda x: F.threshold(x, 0.5, -1.0), (_t(0.5, 1.0, 0.0),), 0,
                               (1, 2)),
    "softshrink_at_lambda": (lambda x: F.softshrink(x, 0.5), (_t(0.5, -0.5, 1.0, 0.0),), 0,
                             (1, 2)),
    "hardshrink_at_lambda": (lambda x: F.hardshrink(x, 0.5), (_t(0.5, -0.5, 1.0, 0.0),), 0,
                             (1, 2)),
    "elu_at_0": (lambda x: F.elu(x, 0.7), (_t(0.0, 1.0, -1.0),), 0, (1, 2, 3)),
    "celu_at_0": (lambda x: F.celu(x, 0.7), (_t(0.0, 1.0, -1.0),), 0, (1, 2, 3)),
    "maximum_ties": (torch.maximum, (_t(1.0, 2.0, 0.5), _t(1.0, 1.0, 0.7)), (0, 1), (1, 2)),
    "minimum_ties": (torch.minimum, (_t(1.0, 2.0, 0.5), _t(1.0, 1.0, 0.7)), (0, 1), (1, 2)),
    "fmax_ties": (torch.fmax, (_t(1.0, 2.0, 0.5), _t(1.0, 1.0, 0.7)), (0, 1), (1, 2)),
    "fmin_ties": (torch.fmin, (_t(1.0, 2.0, 0.5), _t(1.0, 1.0, 0.7)), (0, 1), (1, 2)),
    "fmax_nan": (torch.fmax, (_t(1.0, math.nan, 0.5), _t(math.nan, 1.0, 0.7)), (0, 1), (1,)),
    "amax_ties": (lambda x: x.amax(), (_t(1.0, 1.0, 0.5),), 0, (1, 2)),
    "max_dim_ties": (lambda x: x.max(0).values, (_t(1.0, 1.0, 0.5),), 0, (1, 2)),
    "remainder_at_jumps": (torch.remainder, (_t(1.0, -1.0, 0.3, 1.2), _t(0.5, 0.5, 0.7, -0.5)),
                           (0, 1), (1, 2, 3)),
    "fmod_at_jumps": (torch.fmod, (_t(1.0, -1.0, -1.3, 1.2), _t(0.5, 0.5, 0.7, -0.5)),
                      (0, 1), (1, 2, 3)),
    "sign_times_x_at_0": (lambda x: torch.sign(x) * x, (_t(0.0, 1.0, -1.0),), 0, (1, 2)),
    # smooth functions torch decomposes into kinks that cancel (NOTE [Smooth functions written
    # with kinks]) and the switches of softplus, huber and smooth_l1
    "logsigmoid_at_0": (F.logsigmoid, (_t(0.0, 1.0, -1.0),), 0, (1, 2, 3)),
    "bce_with_logits_at_0": (
        lambda x: F.binary_cross_entropy_with_logits(x, _t(0.3, 1.0, 0.0), reduction="none",
                                                     pos_weight=_t(2.0, 1.0, 0.5)),
        (_t(0.0, 0.0, 2.0),), 0, (1, 2, 3)),
    "multilabel_soft_margin_at_0": (
        lambda x: F.multilabel_soft_margin_loss(x[None], _t(1.0, 0.0, 1.0)[None]),
        (_t(0.0, 1.0, 0.0),), 0, (1, 2)),
    "softplus_at_threshold": (lambda x: F.softplus(x, beta=2.0, threshold=1.0),
                              (_t(0.5, 0.4, 1.0),), 0, (1, 2, 3)),
    "huber_at_0_and_delta": (lambda x: F.huber_loss(x, x * 0, reduction="none", delta=0.5),
                             (_t(0.0, 0.5, -0.5, 0.2),), 0, (1, 2, 3)),
    "smooth_l1_at_0_and_beta": (
        lambda x: F.smooth_l1_loss(x, x * 0, reduction="none", beta=0.5),
        (_t(0.0, 0.5, -0.5, 0.2),), 0, (1, 2, 3)),
    "std_of_a_constant": (lambda x: (x * 0 + 1).std() + torch.std_mean(x * 0, 0)[0],
                          (_t(1.0, 2.0, 3.0),), 0, (1, 2, 3)),
    "atan2_at_the_origin": (torch.atan2, (_t(0.0, 1.0), _t(0.0, 0.5)), (0, 1), (1,)),
    # zeros and poles torch's decompositions mask with a ``where`` that drops the derivatives
    # torch's formulas keep (xlogy, xlog1py, entr) or that leaks ``0 * inf`` into a reverse
    # level (log_ndtr's unselected branch, the p-norm's root at 0)
    "xlogy_xlog1py_at_0": (
        lambda x: torch.xlogy(x, x + 1) + torch.xlogy(x, _t(0.0, 1.0, 2.0))
        + torch.special.xlog1py(x, x) + torch.special.xlog1py(x, _t(-1.0, 0.5, 3.0)),
        (_t(0.0, 1.0, 2.0),), 0, (1, 2, 3)),
    "entr_at_0": (torch.special.entr, (_t(0.0),), 0, (1, 2, 3)),
    # torch's first derivative is infinite at 0 and 1 (log(x / (1 - x)) differentiated to NaN
    # at 1); its higher ones are NaN there, ours the one-sided limits (user guide)
    "logit_at_1": (torch.logit, (_t(1.0),), 0, (1,)),
    "logit_at_0": (torch.logit, (_t(0.0),), 0, (1,)),
    "logit_eps_at_bounds": (lambda x: torch.logit(x, eps=0.1),
                            (_t(0.05, 0.1, 0.9, 0.95, 0.5),), 0, (1, 2, 3)),
    "pow_zero_base_tensor_exponent": (torch.pow, (_t(0.0, 1.0, 2.0, 0.0), _t(2.0, 3.0, 0.0, 1.0)),
                                      (0, 1), (1,)),
    "log_ndtr_tails": (torch.special.log_ndtr, (_t(-40.0, -10.0, 0.5, 40.0),), 0, (1, 2)),
    # (at -40 torch's third derivative is 3e-4 off: the oracle holds only nearer the middle)
    "log_ndtr_tails_order_3": (torch.special.log_ndtr, (_t(-10.0, 0.5, 40.0),), 0, (3,)),
    "vector_norm_p3_at_0": (lambda x: torch.linalg.vector_norm(x.reshape(2, 2), 3, dim=1),
                            (_t(0.0, 0.0, 1.0, -2.0),), 0, (1,)),
    "vector_norm_p_below_1_at_0": (
        lambda x: torch.linalg.vector_norm(x.reshape(3, 2), 0.5, dim=1)
        + torch.linalg.vector_norm(x.reshape(3, 2), 1, dim=1),
        (_t(0.0, 0.0, 0.0, -2.0, 1.0, 3.0),), 0, (1,)),
    # scatter/index reductions: ties split as torch's backward splits them
    "scatter_reduce_amax_ties": (
        lambda x: x[:2].scatter_reduce(0, torch.tensor([0, 0, 1, 1]), x[1:5], "amax")
        * torch.zeros(3, dtype=F64).scatter_reduce(
            0, torch.tensor([0, 0, 2, 2]), x[:4] ** 2, "amin", include_self=False).sum(),
        (_t(1.0, 1.0, 0.5, 2.0, 2.0),), 0, (1, 2, 3)),
    "scatter_reduce_mean_sum_2d": (
        lambda x: x.reshape(2, 3).scatter_reduce(1, torch.tensor([[0, 0], [2, 1]]),
                                                 x[:4].reshape(2, 2).sin(), "mean")
        + x.reshape(2, 3).scatter_reduce(1, torch.tensor([[1, 1], [0, 0]]),
                                         x[2:].reshape(2, 2) ** 2, "sum", include_self=False),
        (_t(0.3, -1.0, 0.5, 2.0, 0.7, -0.2),), 0, (1, 2, 3)),
    "index_reduce_amax_mean": (
        lambda x: x[:4].reshape(2, 2).index_reduce(0, torch.tensor([0, 0, 1]),
                                                   x[2:8].reshape(3, 2), "amax")
        + x[:4].reshape(2, 2).index_reduce(0, torch.tensor([1, 1, 1]),
                                           x[2:8].reshape(3, 2).cos(), "mean",
                                           include_self=False),
        (_t(0.3, 1.0, 0.5, 1.0, 0.7, -0.2, 0.5, 1.0),), 0, (1, 2, 3)),
    "nanmedian_ties_and_nan": (lambda x: torch.cat([x, _t(math.nan)]).nanmedian() * x.sum()
                               + x.reshape(2, 2).nanmedian(),
                               (_t(1.0, 1.0, 0.5, 2.0),), 0, (1, 2)),
    # pdist at coincident points and p = inf ties: cdist's conventions (_pdist_backward)
    "pdist_coincident_and_ties": (
        lambda x: F.pdist(x.reshape(3, 2)) + F.pdist(x.reshape(3, 2), math.inf)
        + F.pdist(x.reshape(3, 2), 3.0),
        (_t(0.5, 1.0, 0.5, 1.0, 1.5, 2.0),), 0, (1,)),
    # targets padded with -1: torch's decomposition counted the padded slots
    "multilabel_margin_padded": (
        lambda x: F.multilabel_margin_loss(x.reshape(2, 4),
                                           torch.tensor([[3, -1, 0, 1], [0, 1, 2, -1]])),
        (_t(-0.72, -0.4, -0.6, 0.18, -0.86, 1.1, -1.07, 0.12),), 0, (1,)),
    # probabilities of exactly 0 and 1 (a saturated sigmoid): torch's formulas clamp
    "bce_saturated": (lambda p: F.binary_cross_entropy(p, _t(0.3, 0.3, 1.0, 0.0, 0.3),
                                                       reduction="none"),
                      (_t(0.0, 1.0, 1.0, 0.0, 0.4),), 0, (1, 2)),
    # a batch whose every target is ignored: the mean is NaN, its derivatives torch's zeros
    "cross_entropy_all_ignored": (
        lambda x: F.cross_entropy(x.reshape(2, 3), torch.tensor([-100, -100])) * 0
        + F.cross_entropy(x.reshape(1, 3, 2), torch.tensor([[-100, -100]])) * 0
        + F.nll_loss(x.reshape(2, 3), torch.tensor([0, 2])),
        (_t(0.0, 1.0, -1.0, 2.0, 0.0, 0.5),), 0, (1, 2)),
    "bce_weighted": (
        lambda p: F.binary_cross_entropy(p, _t(0.3, 1.0, 0.0), weight=_t(2.0, 1.0, 0.5)),
        (_t(0.2, 0.7, 0.4),), 0, (1, 2, 3)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(KINKS))
def test_kinks_follow_torch(name: str, mode: str) -> None:
    f, args, argnums, orders = KINKS[name]
    for k in orders:
        expected = reference_deriv(f, k, argnums)(*args)
        actual = xderiv(f, k, argnums, mode=mode)(*args)
        assert_tree_close(actual, expected, msg=f"{name} order {k} mode {mode}")
        p = plan(f, k, argnums, mode=mode)(*args)
        assert p.strategy == "engine", f"{name}: fell back ({p.fallback})"


@pytest.mark.parametrize("kind", ["rev1", "rev2", "adjoint"])
def test_kinks_follow_torch_in_every_schedule(only_schedule, kind: str) -> None:
    """Mode ``"auto"`` may put reverse levels under Taylor levels, or take the adjoint
    schedule: then the Taylor rules meet torch's backward operators (``log_sigmoid_backward``,
    ``softplus_backward``, ...) as the decomposition table writes them, whose own kinks must
    follow torch's double-backward formulas too."""
    only_schedule(kind)
    ran = 0
    for name, (f, args, argnums, orders) in KINKS.items():
        for k in orders:
            if not schedule_applies(kind, k):
                continue
            p = plan(f, k, argnums)(*args)
            assert p.strategy == "engine", f"{name}: fell back ({p.fallback})"
            if not schedule_label(p).startswith(SCHEDULE_LABELS[kind]):
                continue  # the kind does not apply (an adjoint needs a nonlinear node)
            ran += 1
            assert_tree_close(xderiv(f, k, argnums)(*args),
                              reference_deriv(f, k, argnums)(*args),
                              msg=f"{name} order {k} schedule {schedule_label(p)}")
    assert ran >= 15


@pytest.mark.parametrize("kind", ["taylor", "rev1", "rev2", "adjoint"])
def test_sinc_at_zero_has_its_series_derivatives(only_schedule, kind: str) -> None:
    """``sinc`` is smooth at 0 with ``sinc^(j)(0) = (-1)^(j/2) pi^j / (j + 1)`` for even ``j``
    and 0 for odd: torch's nested derivative is NaN there from the second on, and its
    decomposition ``where(x == 0, 1, sin(pi x) / (pi x))`` differentiated by pieces gave 0.
    Every schedule agrees (a reverse level differentiates the captured series, not torch's
    backward formula). Away from 0 (and inside the series' interval), nested ``jacrev``."""
    only_schedule(kind)
    x = _t(0.0, 0.7, -1.3, 0.02)
    for k in (1, 2, 3, 4):
        if not schedule_applies(kind, k):
            continue
        assert schedule_label(plan(torch.sinc, k)(x)).startswith(SCHEDULE_LABELS[kind])
        d = xderiv(torch.sinc, k)(x)
        diag = d.reshape(4, -1)[:, 0]  # d[0, 0, ..., 0]: the derivative at x[0] = 0
        exact = 0.0 if k % 2 else (-1) ** (k // 2) * math.pi**k / (k + 1)
        assert_tree_close(diag[0], torch.tensor(exact, dtype=F64), msg=f"order {k} at 0")
        rest = x[1:]
        assert_tree_close(xderiv(torch.sinc, k)(rest), reference_deriv(torch.sinc, k)(rest),
                          msg=f"order {k} off 0")


def test_sinc_high_orders_near_the_series_switch() -> None:
    """The 4th and 6th derivatives of ``sinc`` over ``|x| <= 1`` in float64, within 16 and 640
    epsilons of the largest value (measured: 7 and 304), against derivatives taken by
    ``mpmath`` at 40 digits (an oracle outside torch: torch's nested derivatives of ``sinc`` are
    0 / 0 at 0). With the series only below ``|pi x| = 1`` the quotient's just above it were 31
    and 1 211 off."""
    mpmath = pytest.importorskip("mpmath")
    xs = [i / 20 for i in range(-20, 21)]
    x = torch.tensor(xs, dtype=F64)
    with mpmath.workdps(40):
        for k in (4, 6):
            expected = torch.tensor([float(mpmath.diff(lambda t: mpmath.sinc(mpmath.pi * t),
                                                       mpmath.mpf(v), k)) for v in xs], dtype=F64)
            actual = torch.func.vmap(xderiv(torch.sinc, k))(x)
            tol = {4: 16, 6: 640}[k] * _eps(F64) * expected.abs().max().item()
            assert_tree_close(actual, expected, rtol=0.0, atol=tol, msg=f"order {k}")


@pytest.mark.fallback
def test_scatter_reduce_prod_falls_back_with_its_reason() -> None:
    """``reduce="prod"`` has no rule (the other reductions of the same operator do): the plan
    says so before anything runs, and the reference gives torch's numbers."""
    f = lambda x: torch.ones(2, dtype=F64).scatter_reduce(  # noqa: E731
        0, torch.tensor([0, 0, 1]), x, "prod")
    x = _t(0.5, 2.0, 3.0)
    p = plan(f, 2)(x)
    assert p.strategy == "reference" and "'prod'" in p.fallback
    assert_tree_close(xderiv(f, 2)(x), reference_deriv(f, 2)(x))


def test_saved_statistics_of_the_norms_are_constants_as_in_torch() -> None:
    """``native_layer_norm``/``native_batch_norm`` return the mean and inverse deviation they
    save, which torch's autograd leaves non-differentiable (zero derivatives);
    ``native_group_norm``'s are differentiable. Called directly, each output's derivatives
    are torch's."""
    x = _t(0.3, -1.0, 0.5, 2.0, 0.7, -0.2)
    fs = {
        "layer": lambda x: torch.native_layer_norm(x.reshape(2, 3), (3,), None, None, 1e-5),
        "batch": lambda x: torch.native_batch_norm(x.reshape(3, 2), None, None, None, None,
                                                   True, 0.1, 1e-5),
        "group": lambda x: torch.native_group_norm(x.reshape(1, 2, 3), None, None, 1, 2, 3, 1,
                                                   1e-5),
    }
    for name, f in fs.items():
        for k in (1, 2):
            assert_tree_close(xderiv(f, k)(x), reference_deriv(f, k)(x), msg=f"{name} {k}")


def test_bce_of_a_saturated_sigmoid() -> None:
    """A float32 sigmoid saturates to exactly 0 or 1: torch's binary_cross_entropy formulas
    clamp (``max(p (1 - p), eps)`` with a float ``eps``) and give finite derivatives, where
    differentiating ``max(log p, -100)`` gave NaN for the whole gradient. The first
    derivative at 0 and 1 is torch's to rounding (its float epsilon, not 1e-12)."""
    z = torch.tensor([20.0, -20.0, 0.5, -0.3])
    t = torch.tensor([1.0, 0.0, 1.0, 0.0])
    f = lambda z: F.binary_cross_entropy(torch.sigmoid(z), t)  # noqa: E731
    for k in (1, 2):
        assert_tree_close(xderiv(f, k)(z), reference_deriv(f, k)(z), rtol=1e-5, atol=1e-7,
                          msg=f"order {k}")
    p, y = _t(0.0, 1.0, 0.5), _t(0.3, 0.3, 1.0)
    g = lambda p: F.binary_cross_entropy(p, y, reduction="sum")  # noqa: E731
    assert_tree_close(xderiv(g, 1)(p), reference_deriv(g, 1)(p), rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("mode", ["auto", "forward"])
def test_erf_far_out_has_zero_derivatives(mode: str) -> None:
    """``erf``'s derivatives are ``H_n(x) exp(-x^2)``, zero in floating point far out; past
    ``|x| ~ 1e154`` the Hermite polynomial alone overflows, and ``inf * 0`` was NaN from the
    third order (torch.func gives 0 there, and NaN itself from the fourth). The Taylor rule
    gives 0 at every order now, also through ``gelu``; nearer in it equals the reference.
    (``mode="reverse"`` nests torch's own backward formulas, which overflow as torch.func's
    do.)"""
    far = torch.tensor([1e160, -1e200, 1e300], dtype=F64)
    near = torch.tensor([0.3, -1.7, 4.0], dtype=F64)
    for f in (lambda x: torch.erf(x).sum(), lambda x: F.gelu(x).sum()):
        for k in (1, 2, 3, 4):
            got = xderiv(f, k, mode=mode)(far)
            assert not got.isnan().any(), (k, got)
            assert (got == 0).all() or k == 1, (k, got)
            assert_tree_close(xderiv(f, k, mode=mode)(near), reference_deriv(f, k)(near),
                              msg=f"order {k}")


@pytest.mark.parametrize("kind", ["taylor", "rev1", "rev2"])
def test_bessel_near_zero_has_its_series_derivatives(only_schedule, kind: str) -> None:
    """``i0``, ``i1`` and their scaled forms near 0: torch's derivative formulas divide by
    ``x`` and cancel (its nested third derivative of ``i0`` at ``1e-8`` is wrong in the first
    digit), so the oracle is mpmath's. Every schedule reads the captured power series."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 30
    bessel = {
        "i0": (torch.special.i0, lambda t: mpmath.besseli(0, t)),
        "i1": (torch.special.i1, lambda t: mpmath.besseli(1, t)),
        "i0e": (torch.special.i0e, lambda t: mpmath.besseli(0, t) * mpmath.exp(-abs(t))),
        "i1e": (torch.special.i1e, lambda t: mpmath.besseli(1, t) * mpmath.exp(-abs(t))),
    }
    only_schedule(kind)
    points = (1e-8, -1e-4, 0.3, 1.9, 2.5)
    for name, (op, exact) in bessel.items():
        f = lambda x, op=op: op(x).sum()  # noqa: E731
        for k in (1, 2, 3, 4):
            if not schedule_applies(kind, k):
                continue
            x = _t(*points)
            assert schedule_label(plan(f, k)(x)).startswith(SCHEDULE_LABELS[kind])
            d = xderiv(f, k)(x).reshape((len(points),) * k)
            diag = torch.stack([d[(i,) * k] for i in range(len(points))])
            want = torch.tensor([float(mpmath.diff(exact, v, k)) for v in points], dtype=F64)
            assert_tree_close(diag, want, rtol=1e-12, atol=1e-14, msg=f"{name} order {k}")


@pytest.mark.parametrize("mode", ["forward"])
def test_pow_tensor_exponent_at_zero_base(mode: str) -> None:
    """``x ** [0, 1, 2]`` at ``x = 0``: pow_backward_self is ``where(exponent == 0, 0, ...)``,
    so the Taylor rule never forms ``0 * inf``: D1 = diag(0, 1, 0), D2 = 2 at the squared
    entry, D3 = 0. Nested jacrev instead returns NaN from order 2 on (also on the diagonal:
    the ``0 * pow(0, -1)`` of the unselected ``where`` branch leaks through its batched
    double backward), and so does every schedule with reverse levels, which are torch's own
    autograd; the forward (Taylor) values are checked directly."""
    e = _t(0.0, 1.0, 2.0)
    f = lambda x: torch.pow(x, e)  # noqa: E731
    x = _t(0.0, 0.0, 0.0)
    d1, d2, d3 = (xderiv(f, k, mode=mode)(x) for k in (1, 2, 3))
    assert_tree_close(d1, torch.diag(_t(0.0, 1.0, 0.0)), rtol=0, atol=0)
    expected2 = torch.zeros(3, 3, 3, dtype=F64)
    expected2[2, 2, 2] = 2.0
    assert_tree_close(d2, expected2, rtol=0, atol=0)
    assert_tree_close(d3, torch.zeros(3, 3, 3, 3, dtype=F64), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# cdist against torch's own first derivative
# --------------------------------------------------------------------------------------------


def _cdist_inputs(p: float, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows + (99 if math.isinf(p) else int(p * 10)))
    y = torch.randn(cols, 3, generator=g, dtype=F64)
    x = torch.randn(rows, 3, generator=g, dtype=F64)
    x[0] = y[1]  # a coincident pair: distance 0
    x[1, 0] = y[0, 0]  # one coordinate difference exactly 0
    return x, y


@pytest.mark.parametrize("rows,cols", [(3, 4), (27, 3), (3, 27)], ids=["small", "mm27x3",
                                                                      "mm3x27"])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5, math.inf], ids=lambda p: f"p{p}")
def test_cdist_first_order_matches_autograd(p: float, rows: int, cols: int) -> None:
    x, y = _cdist_inputs(p, rows, cols)
    f = lambda x: torch.cdist(x, y, p=p)  # noqa: E731
    expected = jacobian(f, x)
    for mode in MODES:
        assert_tree_close(xderiv(f, 1, mode=mode)(x), expected, rtol=1e-10, atol=1e-12,
                          msg=f"cdist p={p} mode {mode}")
    assert plan(f, 1)(x).strategy == "engine"


def test_torch_func_jacrev_of_cdist_is_wrong() -> None:
    """Why the operator cases take cdist's oracle from the written-out distance: in torch 2.13
    ``jacrev(cdist)`` disagrees with autograd's own Jacobian (fails once this is fixed)."""
    x, y = _cdist_inputs(1.0, 3, 4)
    f = lambda x: torch.cdist(x, y, p=1.0)  # noqa: E731
    assert not torch.allclose(torch.func.jacrev(f)(x), jacobian(f, x))


def test_cdist_inf_ties_match_autograd() -> None:
    y = _t(0.0, 0.0, 0.0).reshape(1, 3)
    x = _t(0.7, -0.7, 0.1).reshape(1, 3)  # |dx0| == |dx1| == the distance
    f = lambda x: torch.cdist(x, y, p=math.inf)  # noqa: E731
    assert_tree_close(xderiv(f, 1, mode="forward")(x), jacobian(f, x))


# --------------------------------------------------------------------------------------------
# matrix products in float32 (the catalogue runs float64)
# --------------------------------------------------------------------------------------------


def _products() -> dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...], Any]]:
    g = torch.Generator().manual_seed(7)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(s, generator=g, dtype=F64)

    w, b, v, c3 = r(5, 4), r(5), r(4), r(3, 4, 2)
    return {
        "W@x+b": (lambda x: torch.tanh(w @ x + b), (r(4),), 0),
        "x@W.T+b": (lambda x: torch.tanh(x @ w.T + b), (r(4),), 0),
        "linear": (lambda x: torch.tanh(F.linear(x, w, b)), (r(4),), 0),
        "einsum": (lambda x: torch.tanh(torch.einsum("ij,j->i", w, x) + b), (r(4),), 0),
        "addmv": (lambda x: torch.tanh(torch.addmv(b, w, x)), (r(4),), 0),
        "addmm_batch": (lambda x: torch.tanh(torch.addmm(b, x, w.T)), (r(3, 4),), 0),
        "dot": (lambda x: torch.dot(x.sin(), v) * x, (r(4),), 0),
        "addr": (lambda x: torch.addr(w, x.sin(), v).tanh(), (r(5),), 0),
        "bmm": (lambda x: torch.bmm(x.tanh(), c3).sin(), (r(3, 2, 4),), 0),
        "baddbmm": (lambda x: torch.baddbmm(x[:, :, :2], x.tanh(), c3, beta=0.5).sin(),
                    (r(3, 2, 4),), 0),
        "matmul_broadcast": (lambda x: (x.sin() @ c3).tanh(), (r(2, 1, 2, 4),), 0),
        "weights": (lambda w_, x: torch.tanh(w_ @ x.sin()), (r(3, 4), r(4)), (0, 1)),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(_products()))
def test_matrix_products_float32(name: str, mode: str) -> None:
    f, args64, argnums = _products()[name]
    args32 = tuple(a.float() for a in args64)
    for k in (1, 2):
        expected = reference_deriv(f, k, argnums)(*args64)
        actual = xderiv(_cast_closure(f), k, argnums, mode=mode)(*args32)
        expected32 = torch.utils._pytree.tree_map(lambda t: t.float(), expected)
        assert_tree_close(actual, expected32, rtol=1e-4, atol=1e-5, msg=f"{name} order {k}")


def _cast_closure(f: Callable[..., Any]) -> Callable[..., Any]:
    """``f`` with its float64 closure tensors replaced by float32 copies."""
    import types

    cells = f.__closure__ or ()
    new_cells = tuple(
        types.CellType(c.cell_contents.float()) if isinstance(c.cell_contents, torch.Tensor)
        else c for c in cells)
    return types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__,
                              new_cells or None)
