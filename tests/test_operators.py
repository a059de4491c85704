"""Operator coverage, as data: every case is compared against nested ``torch.func.jacrev``.

Each :class:`Case` builds a small composite function around one operator (the operator applied
to a nonlinear function of the input, or followed by one) so that derivatives up to order 3 are
non-trivial, plus tiny float64 inputs. ``test_operator`` runs every case at orders 1-3, in the
modes "auto", "forward" and "reverse", on every device, and checks ``xderiv`` against the
oracle with :func:`tests._compare.assert_tree_close`; it also checks the inputs were not
mutated.

Inputs avoid kinks and ties: arguments of relu / leaky_relu / elu / max / amax / max_pool are
distinct and at least 0.25 away from 0 (``away``), and ``pre`` (x + 0.3 sin x) is monotone and
sign-preserving, so it keeps them so; bases of log / div / pow are positive.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import xafunc
from tests._bugs import Bug, expect_bug
from tests._calls import record_calls
from tests._compare import assert_tree_close, assert_tree_equal, clone_tree, reference_deriv
from tests.conftest import DEVICES
from xafunc import xderiv

F64 = torch.float64
MODES = ("auto", "forward", "reverse")
ORDERS = (1, 2, 3)

Builder = Callable[["Inputs"], tuple[Callable[..., Any], tuple[Any, ...]]]


class Inputs:
    """Deterministic float64 tensors for one case (seeded from the case name) on one device."""

    def __init__(self, name: str, device: str) -> None:
        self.g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        self.device = device

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return self._to(torch.randn(shape, generator=self.g, dtype=F64) * scale)

    def pos(self, *shape: int, lo: float = 0.5, hi: float = 1.5) -> torch.Tensor:
        """Positive values in [lo, hi)."""
        return self._to(lo + (hi - lo) * torch.rand(shape, generator=self.g, dtype=F64))

    def away(self, *shape: int) -> torch.Tensor:
        """Distinct values with |v| >= 0.25, random signs: no ties, no kinks at 0."""
        n = 1
        for s in shape:
            n *= s
        mag = 0.25 + 0.15 * torch.randperm(n, generator=self.g).to(F64)
        sign = torch.randint(0, 2, (n,), generator=self.g).to(F64) * 2 - 1
        return self._to((mag * sign).reshape(shape))

    def index(self, values: list[Any]) -> torch.Tensor:
        return self._to(torch.tensor(values))

    def module(self, m: nn.Module) -> nn.Module:
        """Re-initialise ``m``'s parameters from this case's generator, in float64 on device."""
        m = m.to(F64)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=self.g, dtype=F64) * 0.7)
        return m.to(self.device)


def pre(x: torch.Tensor) -> torch.Tensor:
    """x + 0.3 sin x: smooth, strictly increasing, sign-preserving, |pre(x)| >= 0.7 |x|."""
    return x + 0.3 * torch.sin(x)


@dataclass(frozen=True)
class Case:
    name: str
    build: Builder
    argnums: int | tuple[int, ...] = 0
    orders: tuple[int, ...] = ORDERS
    bugs: tuple[Bug, ...] = ()  # known xafunc bugs this case may hit (see tests/_bugs.py)
    # The same function written with other operators, for the oracle, where nested torch.func
    # is itself wrong (see NOTE [Oracle for the norms]).
    oracle: Builder | None = None
    # The function draws random numbers: the transform and the oracle each run right after
    # the same ``torch.manual_seed``, so both see one realisation (torch.func's contract).
    random: bool = False


CASES: list[Case] = []


def case(name: str, argnums: int | tuple[int, ...] = 0, orders: tuple[int, ...] = ORDERS,
         bugs: tuple[Bug, ...] = (), oracle: Builder | None = None, random: bool = False
         ) -> Callable[[Builder], Builder]:
    def register(build: Builder) -> Builder:
        if any(c.name == name for c in CASES):
            raise ValueError(f"duplicate case name {name}")
        CASES.append(Case(name, build, argnums, orders, bugs, oracle, random))
        return build

    return register


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------


@case("relu")
def _(t: Inputs):
    return (lambda x: torch.relu(pre(x)).tanh() * x.cos()), (t.away(6),)


@case("relu_module")
def _(t: Inputs):
    m = nn.ReLU()
    return (lambda x: m(pre(x) * x.flip(0)).sin()), (t.away(5),)


@case("sigmoid")
def _(t: Inputs):
    return (lambda x: torch.sigmoid(x * x.roll(1, 0))), (t.randn(5),)


@case("tanh")
def _(t: Inputs):
    return (lambda x: torch.tanh(x * x.roll(1, 0) + 0.5 * x)), (t.randn(5),)


@case("softmax")
def _(t: Inputs):
    return (lambda x: F.softmax(pre(x), dim=-1)), (t.randn(2, 3),)


@case("softmax_dim0")
def _(t: Inputs):
    return (lambda x: torch.softmax(x.sin() * 2, dim=0)[0]), (t.randn(3, 2),)


@case("log_softmax")
def _(t: Inputs):
    return (lambda x: F.log_softmax(x.sin() * 2, dim=-1)), (t.randn(2, 3),)


@case("gelu_none")
def _(t: Inputs):
    return (lambda x: F.gelu(pre(x) * 1.5, approximate="none")), (t.randn(5),)


@case("gelu_tanh")
def _(t: Inputs):
    return (lambda x: F.gelu(pre(x) * 1.5, approximate="tanh")), (t.randn(5),)


@case("leaky_relu")
def _(t: Inputs):
    return (lambda x: F.leaky_relu(pre(x), 0.1).tanh() * x), (t.away(6),)


@case("softplus")
def _(t: Inputs):
    return (lambda x: F.softplus(pre(x) * 2)), (t.randn(5),)


@case("softplus_beta")
def _(t: Inputs):
    return (lambda x: F.softplus(x * x.roll(1, 0), beta=2.0, threshold=20.0)), (t.randn(5),)


@case("silu")
def _(t: Inputs):
    return (lambda x: F.silu(pre(x) * 1.3).tanh()), (t.randn(5),)


@case("elu")
def _(t: Inputs):
    return (lambda x: F.elu(pre(x), alpha=0.7).tanh() * x.cos()), (t.away(6),)


# --------------------------------------------------------------------------------------------
# linear algebra
# --------------------------------------------------------------------------------------------


@case("addmm")
def _(t: Inputs):
    b, w = t.randn(2, 2), t.randn(3, 2)
    return (lambda x: torch.addmm(b, x.tanh(), w, beta=0.5, alpha=1.5).sin()), (t.randn(2, 3),)


@case("addmm_weight", argnums=(1, 2))
def _(t: Inputs):
    def f(x, w, b):
        return torch.addmm(b, x.tanh(), w).tanh().sum(0)

    return f, (t.randn(2, 3), t.randn(3, 2), t.randn(2, 2))


@case("mm")
def _(t: Inputs):
    w = t.randn(3, 2)
    return (lambda x: torch.mm(x.sin(), w).tanh()), (t.randn(2, 3),)


@case("mm_weight", argnums=1)
def _(t: Inputs):
    return (lambda x, w: torch.mm(x, w.sin()).tanh()), (t.randn(2, 3), t.randn(3, 2))


@case("matmul")
def _(t: Inputs):
    return (lambda x: torch.matmul(x.sin(), x.cos().T)), (t.randn(2, 3),)


@case("matmul_batched")
def _(t: Inputs):
    w = t.randn(3, 2)
    return (lambda x: (x.tanh() @ w).sin()), (t.randn(2, 2, 3),)


@case("matmul_vec")
def _(t: Inputs):
    a = t.randn(2, 4)
    return (lambda x: torch.matmul(a, x.sin()) * torch.matmul(x, x)), (t.randn(4),)


@case("linear")
def _(t: Inputs):
    w, b = t.randn(3, 4), t.randn(3)
    return (lambda x: F.linear(x.tanh(), w, b).sin()), (t.randn(4),)


@case("linear_module")
def _(t: Inputs):
    m = t.module(nn.Linear(3, 2))
    return (lambda x: m(x.sin()).tanh()), (t.randn(2, 3),)


@case("linear_weight", argnums=1)
def _(t: Inputs):
    def f(x, w, b):
        return F.linear(x, w, b).tanh()

    return f, (t.randn(2, 3), t.randn(2, 3), t.randn(2))


@case("linear_weight_bias", argnums=(1, 2))
def _(t: Inputs):
    def f(x, w, b):
        return (F.linear(x, w, b).tanh() ** 2).sum()

    return f, (t.randn(2, 3), t.randn(2, 3), t.randn(2))


@case("mlp_params_dict", argnums=0, orders=(1, 2))
def _(t: Inputs):
    m = t.module(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    x = t.randn(2)
    return (lambda p: functional_call(m, p, (x,))), (params,)


# --------------------------------------------------------------------------------------------
# elementwise arithmetic
# --------------------------------------------------------------------------------------------


@case("mul")
def _(t: Inputs):
    c = t.randn(5)
    return (lambda x: x * x.sin() * c * 0.5), (t.randn(5),)


@case("mul_broadcast")
def _(t: Inputs):
    return (lambda x: torch.mul(x.sin(), x[0:1, :].T)), (t.randn(3, 3),)


@case("add")
def _(t: Inputs):
    return (lambda x: (x.sin() + x.cos() * 2 + 1.5).tanh()), (t.randn(5),)


@case("add_alpha_broadcast")
def _(t: Inputs):
    b = t.randn(3)
    return (lambda x: torch.add(x.sin(), (x + b).exp(), alpha=0.5).tanh()), (t.randn(2, 3),)


@case("sub")
def _(t: Inputs):
    return (lambda x: (x.sin() - x.cos() * x).tanh()), (t.randn(5),)


@case("sub_alpha")
def _(t: Inputs):
    return (lambda x: torch.sub(x.exp(), x.sin(), alpha=2.0) - 1.0), (t.randn(4),)


@case("rsub")
def _(t: Inputs):
    return (lambda x: (1.0 - x.sin() * x).tanh()), (t.randn(4),)


@case("div")
def _(t: Inputs):
    return (lambda x: x.cos() / (1.5 + x.sin() * x.roll(1, 0).tanh())), (t.randn(5),)


@case("div_scalar_numerator")
def _(t: Inputs):
    return (lambda x: 2.0 / (x * x.flip(0))), (t.pos(4),)


@case("div_by_constant")
def _(t: Inputs):
    return (lambda x: (x.sin() / 3.0).exp()), (t.randn(4),)


@case("pow_scalar_exponent")
def _(t: Inputs):
    return (lambda x: (x * 1.2).pow(2.5) + x.pow(3) * x.roll(1, 0)), (t.pos(4),)


@case("pow_tensor_exponent")
def _(t: Inputs):
    return (lambda x: torch.pow(x + 0.2, x.sin())), (t.pos(4),)


@case("pow_scalar_base")
def _(t: Inputs):
    return (lambda x: torch.pow(1.7, x.sin() * x)), (t.randn(4),)


@case("pow_operator")
def _(t: Inputs):
    return (lambda x: (x**2).sum() ** 0.5 * x), (t.pos(4),)


@case("exp")
def _(t: Inputs):
    return (lambda x: torch.exp(x.sin() * x.roll(1, 0))), (t.randn(5),)


@case("log")
def _(t: Inputs):
    return (lambda x: torch.log(x + x.sin() ** 2) * x.roll(1, 0)), (t.pos(5),)


# --------------------------------------------------------------------------------------------
# reductions
# --------------------------------------------------------------------------------------------


@case("sum")
def _(t: Inputs):
    return (lambda x: x.sin().sum(dim=1) ** 2 + x.sum() * x[:, 0]), (t.randn(2, 3),)


@case("sum_full")
def _(t: Inputs):
    return (lambda x: torch.sum(x.tanh() * x)), (t.randn(2, 3),)


@case("prod")
def _(t: Inputs):
    return (lambda x: pre(x).prod() * x), (t.away(4),)


@case("prod_dim")
def _(t: Inputs):
    return (lambda x: torch.prod(x.sin() + 1.2, dim=1)), (t.randn(2, 3),)


@case("mean")
def _(t: Inputs):
    return (lambda x: x.sin().mean(dim=0) * x.cos().mean()), (t.randn(2, 3),)


@case("var")
def _(t: Inputs):
    return (lambda x: x.sin().var(dim=1) + x.var()), (t.randn(2, 3),)


@case("var_correction0")
def _(t: Inputs):
    return (lambda x: torch.var(x.tanh() * x, dim=0, correction=0)), (t.randn(3, 2),)


@case("amax")
def _(t: Inputs):
    return (lambda x: pre(x).amax(dim=1).tanh() * x[:, 0]), (t.away(2, 3),)


@case("max_full")
def _(t: Inputs):
    return (lambda x: pre(x).max() * x.sin()), (t.away(5),)


@case("max_dim")
def _(t: Inputs):
    return (lambda x: torch.max(pre(x), dim=0).values.sin()), (t.away(3, 2),)


@case("sort")
def _(t: Inputs):
    return (lambda x: torch.sort(pre(x), dim=0, descending=True).values.cumsum(0).sin()), \
        (t.away(3, 2),)


@case("sort_stable")
def _(t: Inputs):
    return (lambda x: torch.sort(x.exp(), stable=True)[0] * x.cos()), (t.away(5),)


@case("topk")
def _(t: Inputs):
    return (lambda x: torch.topk(pre(x), 2, dim=1, largest=False).values.exp()), (t.away(2, 4),)


@case("kthvalue")
def _(t: Inputs):
    return (lambda x: torch.kthvalue(pre(x), 2, 1, keepdim=True).values.sin() * x), \
        (t.away(2, 3),)


@case("median_dim")
def _(t: Inputs):
    return (lambda x: torch.median(pre(x), 0).values.tanh()), (t.away(3, 2),)


@case("median_full")
def _(t: Inputs):
    return (lambda x: torch.median(pre(x)) * x.sin()), (t.away(5),)


@case("mode")
def _(t: Inputs):
    return (lambda x: torch.mode(torch.cat([pre(x), pre(x)[:1]])).values * x.exp()), \
        (t.away(4),)


@case("cummax")
def _(t: Inputs):
    return (lambda x: torch.cummax(pre(x), 0).values.sin()), (t.away(5),)


@case("cummin")
def _(t: Inputs):
    return (lambda x: torch.cummin(pre(x), 1).values.exp()), (t.away(2, 3),)


@case("quantile")
def _(t: Inputs):
    return (lambda x: torch.quantile(pre(x), torch.tensor([0.3, 0.8], dtype=x.dtype,
                                                           device=x.device), dim=1).exp()), \
        (t.away(2, 4),)


@case("nanquantile_any_all")
def _(t: Inputs):
    return (lambda x: torch.nanquantile(pre(x), 0.4) * x.sin()
            + torch.where(torch.any(x > 0) & torch.all(x < 9), x, -x).cos()), (t.away(5),)


@case("max_binary")
def _(t: Inputs):
    return (lambda x: torch.maximum(pre(x), x.flip(0) * 0.5).tanh()), (t.away(4),)


# --------------------------------------------------------------------------------------------
# shape and indexing
# --------------------------------------------------------------------------------------------


@case("permute")
def _(t: Inputs):
    c = t.randn(2, 2, 3)
    return (lambda x: (x.sin().permute(2, 0, 1) * c).tanh()), (t.randn(2, 3, 2),)


@case("t")
def _(t: Inputs):
    return (lambda x: x.sin().t() @ x.cos()), (t.randn(2, 3),)


@case("transpose")
def _(t: Inputs):
    c = t.randn(2, 3, 2)
    return (lambda x: (x.tanh().transpose(0, 2) * c).sum(0).sin()), (t.randn(2, 3, 2),)


@case("view")
def _(t: Inputs):
    w = t.randn(3, 2)
    return (lambda x: (x.sin().view(2, 3) @ w).tanh()), (t.randn(6),)


@case("flatten")
def _(t: Inputs):
    w = t.randn(6, 2)
    return (lambda x: torch.tanh(torch.flatten(x.sin()) @ w)), (t.randn(2, 3),)


@case("reshape")
def _(t: Inputs):
    w = t.randn(2, 2)
    return (lambda x: (x.sin().reshape(3, 2) @ w).tanh().reshape(-1)), (t.randn(2, 3),)


@case("unsqueeze_expand")
def _(t: Inputs):
    return (lambda x: (x.sin().unsqueeze(0).expand(2, 3) * x.unsqueeze(1)[:2]).tanh()), (
        t.randn(3),)


@case("index_basic_slice")
def _(t: Inputs):
    return (lambda x: (x.sin()[1:3, ::2] * x[0, :2]).tanh()), (t.randn(4, 3),)


@case("index_select_int")
def _(t: Inputs):
    idx = t.index([0, 2, 2, 4])
    return (lambda x: x.sin()[idx] * x[idx.flip(0)]), (t.randn(5),)


@case("index_int_2d")
def _(t: Inputs):
    rows, cols = t.index([0, 1, 1]), t.index([2, 0, 2])
    return (lambda x: (x.tanh()[rows, cols] * x[1, 1]).sin()), (t.randn(2, 3),)


@case("index_bool_mask")
def _(t: Inputs):
    mask = t.index([True, False, True, True, False, True])
    return (lambda x: (x.sin()[mask] * 2).tanh() * x[mask].cos()), (t.randn(6),)


@case("cat")
def _(t: Inputs):
    return (lambda x: torch.cat([x.sin(), x.cos() * x], dim=0).tanh()), (t.randn(2, 2),)


@case("stack")
def _(t: Inputs):
    return (lambda x: torch.stack([x.sin(), x.exp()], dim=1).prod(1)), (t.randn(3),)


@case("split")
def _(t: Inputs):
    def f(x):
        a, b = torch.split(x.sin(), [2, 3])
        return a.tanh(), b * b.sum()

    return f, (t.randn(5),)


@case("chunk")
def _(t: Inputs):
    def f(x):
        a, b, c = torch.chunk(x.sin(), 3)
        return a * b + c * c.exp()

    return f, (t.randn(6),)


# --------------------------------------------------------------------------------------------
# dropout, normalisation, embedding
# --------------------------------------------------------------------------------------------


@case("dropout_eval")
def _(t: Inputs):
    m = nn.Dropout(p=0.3).eval()
    return (lambda x: (F.dropout(pre(x), p=0.3, training=False) + m(x.sin())).tanh()), (
        t.randn(5),)


@case("dropout_train", random=True)
def _(t: Inputs):
    return (lambda x: F.dropout(pre(x), p=0.4, training=True).tanh() * x), (t.randn(6),)


@case("dropout_train_fixed_mask")
def _(t: Inputs):
    p = 0.4
    mask = t.index([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]).to(F64)
    return (lambda x: (pre(x) * mask / (1 - p)).tanh() * x.cos()), (t.randn(6),)


# NOTE [Oracle for the norms]
# In torch 2.13 nested torch.func derivatives of native_layer_norm / native_batch_norm
# (training) are wrong from order 3 on: jacrev(jacrev(jacrev(lambda x: F.layer_norm(x, (4,)))))
# differs from central finite differences of the (correct) second derivative by ~0.5, while the
# same function written with mean / var / rsqrt agrees to 1e-11 (and so does xafunc). Those
# cases therefore take their oracle from the written-out formula, built from the same inputs.


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _batch_norm_train(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5):
    dims = [0] + list(range(2, x.dim()))
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mu) / torch.sqrt(var + eps) * w.reshape(shape) + b.reshape(shape)


def _layer_norm_oracle(t: Inputs):
    w, b = t.randn(4), t.randn(4)
    return (lambda x: _layer_norm(pre(x), w, b).tanh()), (t.randn(2, 4),)


@case("layer_norm", oracle=_layer_norm_oracle)
def _(t: Inputs):
    w, b = t.randn(4), t.randn(4)
    return (lambda x: F.layer_norm(pre(x), (4,), w, b).tanh()), (t.randn(2, 4),)


@case("layer_norm_weight", argnums=(1, 2))
def _(t: Inputs):
    def f(x, w, b):
        return F.layer_norm(x, (3,), w, b).tanh().sum(0)

    return f, (t.randn(2, 3), t.randn(3), t.randn(3))


@case("batch_norm_eval")
def _(t: Inputs):
    rm, rv = t.randn(2), t.pos(2)
    w, b = t.randn(2), t.randn(2)
    return (lambda x: F.batch_norm(x.sin(), rm, rv, w, b, training=False, eps=1e-5).tanh()), (
        t.randn(3, 2),)


@case("batch_norm_eval_module")
def _(t: Inputs):
    m = t.module(nn.BatchNorm1d(2))
    with torch.no_grad():
        m.running_mean.copy_(t.randn(2))
        m.running_var.copy_(t.pos(2))
    m.eval()
    return (lambda x: m(x.sin()).tanh()), (t.randn(3, 2),)


def _batch_norm_train_oracle(t: Inputs):
    w, b = t.randn(2), t.randn(2)
    return (lambda x: _batch_norm_train(x.sin(), w, b).tanh()), (t.randn(3, 2),)


@case("batch_norm_train", oracle=_batch_norm_train_oracle)
def _(t: Inputs):
    w, b = t.randn(2), t.randn(2)
    return (lambda x: F.batch_norm(x.sin(), None, None, w, b, training=True).tanh()), (
        t.randn(3, 2),)


def _batch_norm_train_2d_oracle(t: Inputs):
    w, b = t.randn(2), t.randn(2)
    return (lambda x: _batch_norm_train(pre(x), w, b).sin().sum((2, 3))), (t.randn(2, 2, 2, 2),)


@case("batch_norm_train_2d", oracle=_batch_norm_train_2d_oracle)
def _(t: Inputs):
    w, b = t.randn(2), t.randn(2)

    def f(x):
        return F.batch_norm(pre(x), None, None, w, b, training=True).sin().sum((2, 3))

    return f, (t.randn(2, 2, 2, 2),)


@case("bilinear_module")
def _(t: Inputs):
    m = t.module(nn.Bilinear(3, 2, 2))
    x2 = t.randn(2, 2)
    return (lambda x: m(x, x2).tanh()), (t.randn(2, 3),)


@case("bilinear_weight", argnums=(1,))
def _(t: Inputs):
    x1, x2 = t.randn(2, 3), t.randn(2, 2)
    return (lambda b, w: F.bilinear(x1, x2 * b.sum(), w).sin()), (t.randn(2), t.randn(2, 3, 2))


@case("ndtri")
def _(t: Inputs):
    return (lambda p: torch.special.ndtri(torch.sigmoid(p)) * p), (t.randn(4),)


def _group_norm(x: torch.Tensor, groups: int, w: torch.Tensor, b: torch.Tensor,
                eps: float = 1e-5):
    g = x.reshape(x.shape[0], groups, -1)
    mu = g.mean(-1, keepdim=True)
    var = ((g - mu) ** 2).mean(-1, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return ((g - mu) / torch.sqrt(var + eps)).reshape(x.shape) * w.reshape(shape) \
        + b.reshape(shape)


def _group_norm_oracle(t: Inputs):
    w, b = t.randn(4), t.randn(4)
    return (lambda x: _group_norm(pre(x), 2, w, b).tanh()), (t.randn(1, 4, 2),)


# affine on CPU: torch's decomposition reshapes the folded scale with ``as_strided``
@case("group_norm", oracle=_group_norm_oracle)
def _(t: Inputs):
    w, b = t.randn(4), t.randn(4)
    return (lambda x: F.group_norm(pre(x), 2, w, b).tanh()), (t.randn(1, 4, 2),)


def _group_norm_module_oracle(t: Inputs):
    m = t.module(nn.GroupNorm(2, 4))
    return (lambda x: _group_norm(x.sin(), 2, m.weight, m.bias).sum((2, 3))), (
        t.randn(1, 4, 2, 2),)


@case("group_norm_module", oracle=_group_norm_module_oracle)
def _(t: Inputs):
    m = t.module(nn.GroupNorm(2, 4))
    return (lambda x: m(x.sin()).sum((2, 3))), (t.randn(1, 4, 2, 2),)


@case("group_norm_weight", argnums=(1, 2))
def _(t: Inputs):
    def f(x, w, b):
        return F.group_norm(x, 2, w, b).tanh().sum(0)

    return f, (t.randn(2, 4, 3), t.randn(4), t.randn(4))


@case("embedding_weight")
def _(t: Inputs):
    idx = t.index([[0, 2], [2, 4]])
    v = t.randn(3)
    return (lambda w: (F.embedding(idx, w).sin() @ v).tanh()), (t.randn(5, 3),)


@case("embedding_downstream")
def _(t: Inputs):
    idx = t.index([1, 3, 1])
    w = t.randn(4, 3)
    return (lambda x: (F.embedding(idx, w) @ x.sin()).tanh()), (t.randn(3),)


@case("embedding_module_both", argnums=(0, 1))
def _(t: Inputs):
    emb = t.module(nn.Embedding(4, 2))
    idx = t.index([3, 0, 3])

    def f(w, x):
        return (functional_call(emb, {"weight": w}, (idx,)) @ x).tanh().sum()

    return f, (emb.weight.detach().clone(), t.randn(2))


# --------------------------------------------------------------------------------------------
# convolution, pooling, resampling
# --------------------------------------------------------------------------------------------


@case("conv1d")
def _(t: Inputs):
    w, b = t.randn(3, 2, 3), t.randn(3)
    return (lambda x: F.conv1d(x.tanh(), w, b).sin()), (t.randn(1, 2, 5),)


@case("conv1d_weight", argnums=1)
def _(t: Inputs):
    def f(x, w):
        return F.conv1d(x, w, padding=1).tanh().pow(2).sum()

    return f, (t.randn(1, 2, 4), t.randn(2, 2, 2))


@case("conv2d")
def _(t: Inputs):
    w, b = t.randn(2, 1, 2, 2), t.randn(2)
    return (lambda x: F.conv2d(x.sin(), w, b).tanh()), (t.randn(1, 1, 3, 3),)


@case("conv2d_stride_padding")
def _(t: Inputs):
    w = t.randn(1, 2, 2, 2)
    return (lambda x: F.conv2d(pre(x), w, stride=2, padding=1).tanh()), (t.randn(1, 2, 3, 3),)


@case("conv2d_weight_bias", argnums=(1, 2))
def _(t: Inputs):
    def f(x, w, b):
        return F.conv2d(x, w, b).tanh().sum((0, 2, 3))

    return f, (t.randn(1, 1, 3, 3), t.randn(2, 1, 2, 2), t.randn(2))


@case("conv2d_module")
def _(t: Inputs):
    m = t.module(nn.Conv2d(1, 1, 2, dilation=1, padding=0))
    return (lambda x: m(x.sin()).exp()), (t.randn(1, 1, 3, 3),)


@case("conv_transpose2d")
def _(t: Inputs):
    w, b = t.randn(2, 1, 2, 2), t.randn(1)
    return (lambda x: F.conv_transpose2d(x.sin(), w, b).tanh()), (t.randn(1, 2, 2, 2),)


@case("conv_transpose2d_stride_weight", argnums=1)
def _(t: Inputs):
    def f(x, w):
        return F.conv_transpose2d(x, w, stride=2).tanh().sum((0, 1))

    return f, (t.randn(1, 1, 2, 2), t.randn(1, 2, 2, 2))


@case("max_pool2d")
def _(t: Inputs):
    return (lambda x: F.max_pool2d(pre(x), 2).tanh()), (t.away(1, 1, 4, 4),)


@case("max_pool2d_overlapping")
def _(t: Inputs):
    return (lambda x: F.max_pool2d(pre(x), 2, stride=1).sin()), (t.away(1, 1, 3, 3),)


@case("max_pool2d_module")
def _(t: Inputs):
    m = nn.MaxPool2d(2, stride=2, padding=1)
    return (lambda x: m(pre(x)).tanh()), (t.away(1, 1, 3, 3),)


@case("adaptive_max_pool1d")
def _(t: Inputs):
    return (lambda x: F.adaptive_max_pool1d(pre(x), 3).tanh()), (t.away(1, 2, 7),)


@case("adaptive_max_pool2d")
def _(t: Inputs):
    m = nn.AdaptiveMaxPool2d((2, 3))
    return (lambda x: m(pre(x)).sin()), (t.away(1, 1, 5, 4),)


@case("avg_pool2d")
def _(t: Inputs):
    return (lambda x: F.avg_pool2d(x.sin(), 2).tanh()), (t.randn(1, 1, 4, 4),)


@case("avg_pool2d_padding")
def _(t: Inputs):
    def f(x):
        return (F.avg_pool2d(x.sin(), 2, stride=1, padding=1, count_include_pad=False)
                .tanh().sum((2, 3)))

    return f, (t.randn(1, 2, 2, 2),)


@case("adaptive_avg_pool2d")
def _(t: Inputs):
    return (lambda x: F.adaptive_avg_pool2d(x.sin(), (2, 2)).tanh()), (t.randn(1, 1, 3, 4),)


@case("interpolate_nearest")
def _(t: Inputs):
    c = t.randn(1, 1, 4, 4)
    return (lambda x: (F.interpolate(x.sin(), scale_factor=2, mode="nearest") * c).tanh()
            .sum(-1)), (t.randn(1, 1, 2, 2),)


@case("upsample_nearest_module")
def _(t: Inputs):
    m = nn.Upsample(size=(3, 4), mode="nearest")
    c = t.randn(1, 1, 3, 4)
    return (lambda x: (m(pre(x)) * c).sum(-1).tanh()), (t.randn(1, 1, 2, 3),)


@case("interpolate_bilinear")
def _(t: Inputs):
    c = t.randn(1, 1, 4, 5)
    return (lambda x: (F.interpolate(x.sin(), size=(4, 5), mode="bilinear",
                                     align_corners=False) * c).sum(-1).tanh()), (
        t.randn(1, 1, 3, 3),)


@case("interpolate_bilinear_align_corners")
def _(t: Inputs):
    c = t.randn(1, 1, 4, 4)
    return (lambda x: (F.interpolate(x.tanh(), scale_factor=2, mode="bilinear",
                                     align_corners=True) * c).sum((-1, -2)).sin()), (
        t.randn(1, 2, 2, 2),)


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


@case("cross_entropy")
def _(t: Inputs):
    target = t.index([0, 3, 1])
    return (lambda x: F.cross_entropy(pre(x) * 2, target)), (t.randn(3, 4),)


@case("cross_entropy_none_smoothing")
def _(t: Inputs):
    target = t.index([2, 0])
    return (lambda x: F.cross_entropy(x.sin() * 2, target, reduction="none",
                                      label_smoothing=0.1)), (t.randn(2, 3),)


@case("cross_entropy_probs_target")
def _(t: Inputs):
    target = torch.softmax(t.randn(2, 3), dim=1)
    return (lambda x: F.cross_entropy(x.tanh() * 3, target)), (t.randn(2, 3),)


@case("mse_loss")
def _(t: Inputs):
    target = t.randn(2, 3)
    return (lambda x: F.mse_loss(x.tanh() * x, target)), (t.randn(2, 3),)


@case("mse_loss_sum_both", argnums=(0, 1))
def _(t: Inputs):
    return (lambda x, y: F.mse_loss(x.sin(), y.tanh(), reduction="sum")), (
        t.randn(3), t.randn(3))


# --------------------------------------------------------------------------------------------
# recurrent cells
# --------------------------------------------------------------------------------------------


@case("rnn_cell")
def _(t: Inputs):
    cell = t.module(nn.RNNCell(3, 2))
    h = t.randn(2, 2)
    return (lambda x: cell(x, h)), (t.randn(2, 3),)


@case("rnn_cell_relu_hidden", argnums=1)
def _(t: Inputs):
    cell = t.module(nn.RNNCell(2, 3, nonlinearity="tanh"))
    return (lambda x, h: cell(x, h).sin()), (t.randn(1, 2), t.randn(1, 3))


@case("lstm_cell", argnums=(0, 1))
def _(t: Inputs):
    cell = t.module(nn.LSTMCell(2, 2))

    def f(x, h, c):
        return cell(x, (h, c))  # tuple output (h', c')

    return f, (t.randn(1, 2), t.randn(1, 2), t.randn(1, 2))


@case("lstm_cell_weight_hh", orders=(1, 2))
def _(t: Inputs):
    cell = t.module(nn.LSTMCell(2, 2))
    x, h, c = t.randn(1, 2), t.randn(1, 2), t.randn(1, 2)

    def f(w):
        hn, cn = functional_call(cell, {"weight_hh": w}, (x, (h, c)), strict=False)
        return hn * cn

    return f, (cell.weight_hh.detach().clone(),)


@case("gru_cell")
def _(t: Inputs):
    cell = t.module(nn.GRUCell(3, 2))
    h = t.randn(2, 2)
    return (lambda x: cell(x, h)), (t.randn(2, 3),)


@case("gru_cell_params", orders=(1, 2))
def _(t: Inputs):
    cell = t.module(nn.GRUCell(2, 2))
    x, h = t.randn(1, 2), t.randn(1, 2)
    params = {k: v.detach().clone() for k, v in cell.named_parameters()}
    return (lambda p: functional_call(cell, p, (x, h)).sum()), (params,)


@case("rnn_relu_cell")
def _(t: Inputs):
    cell = t.module(nn.RNNCell(3, 2, nonlinearity="relu"))
    h = t.randn(2, 2)
    return (lambda x: cell(x.sin(), h).tanh() * x[:, :2]), (t.randn(2, 3),)


@case("gru_cell_unbatched", argnums=(0, 1))
def _(t: Inputs):
    cell = t.module(nn.GRUCell(2, 3))
    return (lambda x, h: cell(x, h)), (t.randn(2), t.randn(3))


@case("rnn_sequence")
def _(t: Inputs):
    m = t.module(nn.RNN(2, 3))
    return (lambda x: m(x)[0]), (t.randn(3, 2),)


@case("gru_sequence_batch_first", orders=(1, 2))
def _(t: Inputs):
    m = t.module(nn.GRU(2, 2, batch_first=True))
    h0 = t.randn(1, 2, 2)
    return (lambda x: m(x, h0)[1].sin()), (t.randn(2, 3, 2),)


@case("lstm_sequence")
def _(t: Inputs):
    m = t.module(nn.LSTM(2, 2))

    def f(x):
        out, (h, c) = m(x)
        return out.sum(-1), c

    return f, (t.randn(3, 2),)


# --------------------------------------------------------------------------------------------
# matrix products in every spelling (NOTE [Matrix products] in xafunc/_rules/bilinear.py)
# --------------------------------------------------------------------------------------------


@case("mv")
def _(t: Inputs):
    w = t.randn(3, 4)
    return (lambda x: torch.mv(w, x.sin()).tanh()), (t.randn(4),)


@case("mv_both", argnums=(0, 1))
def _(t: Inputs):
    return (lambda w, x: torch.mv(w.sin(), x * x).tanh()), (t.randn(2, 3), t.randn(3))


@case("matmul_2d_1d")  # torch.tanh(W @ x + b)
def _(t: Inputs):
    w, b = t.randn(3, 4), t.randn(3)
    return (lambda x: torch.tanh(w @ x + b) * x[:3]), (t.randn(4),)


@case("matmul_1d_2d")  # x @ W.T + b
def _(t: Inputs):
    w, b = t.randn(3, 4), t.randn(3)
    return (lambda x: torch.tanh(x @ w.T + b)), (t.randn(4),)


@case("matmul_3d_1d")
def _(t: Inputs):
    v = t.randn(4)
    return (lambda x: (x.tanh() @ v).sin()), (t.randn(2, 3, 4),)


@case("matmul_1d_3d")
def _(t: Inputs):
    c = t.randn(2, 4, 3)
    return (lambda x: (x.sin() @ c).tanh()), (t.randn(4),)


@case("matmul_broadcast_batch")
def _(t: Inputs):
    # kept tiny: nested jacrev^3 of a batch-broadcasting matmul takes 18 GiB at (2, 1, 2, 3)
    # @ (3, 3, 2) in torch 2.13 (so does the engine's pure-reverse schedule, which is torch's)
    c = t.randn(2, 2, 2)
    return (lambda x: (x.sin() @ c).tanh()), (t.randn(2, 1, 1, 2),)


@case("matmul_both_batched")
def _(t: Inputs):
    return (lambda x: torch.matmul(x.sin(), x.cos().transpose(-1, -2))), (t.randn(2, 2, 3),)


@case("linear_batch_dims")
def _(t: Inputs):
    w, b = t.randn(2, 3), t.randn(2)
    return (lambda x: F.linear(x.sin(), w, b).tanh()), (t.randn(2, 2, 3),)


@case("linear_0d_input")
def _(t: Inputs):
    w, v = t.randn(3, 4), t.randn(4)
    return (lambda x: torch.tanh(w @ (x * v)) * x), (t.randn(),)


@case("einsum_mv")
def _(t: Inputs):
    w = t.randn(3, 4)
    return (lambda x: torch.einsum("ij,j->i", w, x.sin()).tanh()), (t.randn(4),)


@case("einsum_rows")
def _(t: Inputs):
    w = t.randn(3, 4)
    return (lambda x: torch.einsum("bj,ij->bi", x, w).tanh()), (t.randn(2, 4),)


@case("einsum_batched_both")
def _(t: Inputs):
    return (lambda x: torch.einsum("bij,bkj->bik", x.sin(), x.tanh()).exp()), (
        t.randn(2, 2, 3),)


@case("addmv")
def _(t: Inputs):
    w, b = t.randn(3, 4), t.randn(3)
    return (lambda x: torch.addmv(b, w, x.sin(), beta=0.5, alpha=1.5).tanh()), (t.randn(4),)


@case("addmv_all", argnums=(0, 1, 2))
def _(t: Inputs):
    def f(b, w, x):
        return torch.addmv(b.sin(), w, x.tanh(), beta=0.5, alpha=1.5).tanh()

    return f, (t.randn(2), t.randn(2, 3), t.randn(3))


@case("addmm_bias_broadcast", argnums=(0, 1))
def _(t: Inputs):
    w = t.randn(3, 2)
    return (lambda b, x: torch.addmm(b.sin(), x.tanh(), w, alpha=0.5).tanh()), (
        t.randn(2), t.randn(3, 3))


@case("dot")
def _(t: Inputs):
    return (lambda x: torch.dot(x.sin(), x.cos()) * x), (t.randn(4),)


@case("dot_both", argnums=(0, 1))
def _(t: Inputs):
    return (lambda x, y: torch.dot(x, y.sin()).tanh() * y), (t.randn(3), t.randn(3))


@case("vdot")
def _(t: Inputs):
    v = t.randn(4)
    return (lambda x: torch.vdot(x.tanh(), v) * x.sin()), (t.randn(4),)


@case("inner")
def _(t: Inputs):
    v = t.randn(4)
    return (lambda x: torch.inner(x, v).sin() * x), (t.randn(4),)


@case("outer")
def _(t: Inputs):
    v = t.randn(2)
    return (lambda x: torch.outer(x.sin(), v).tanh() + torch.outer(x, x[:2]).sin()), (
        t.randn(3),)


@case("addr")
def _(t: Inputs):
    m, v = t.randn(3, 2), t.randn(2)
    return (lambda x: torch.addr(m, x.sin(), v, beta=0.5, alpha=2.0).tanh()), (t.randn(3),)


@case("addr_all", argnums=(0, 1, 2))
def _(t: Inputs):
    def f(m, u, v):
        return torch.addr(m.sin(), u.tanh(), v, beta=0.5, alpha=2.0).tanh()

    return f, (t.randn(2, 2), t.randn(2), t.randn(2))


@case("bmm")
def _(t: Inputs):
    c = t.randn(2, 3, 2)
    return (lambda x: torch.bmm(x.tanh(), c).sin()), (t.randn(2, 2, 3),)


@case("bmm_input_first")
def _(t: Inputs):
    c = t.randn(2, 2, 3)
    return (lambda x: torch.bmm(c, x).sin()), (t.randn(2, 3, 2),)


@case("bmm_both")
def _(t: Inputs):
    return (lambda x: torch.bmm(x.tanh(), x.transpose(1, 2).sin())), (t.randn(2, 2, 3),)


@case("baddbmm")
def _(t: Inputs):
    c, n = t.randn(2, 2, 2), t.randn(2, 3, 2)
    return (lambda x: torch.baddbmm(c, x.tanh(), n, beta=0.5, alpha=1.5).sin()), (
        t.randn(2, 2, 3),)


@case("baddbmm_all", argnums=(0, 1, 2))
def _(t: Inputs):
    def f(c, a, b):
        return torch.baddbmm(c.sin(), a.tanh(), b, beta=0.5, alpha=1.5).sin()

    # a broadcast bias; kept small: nested jacrev^3 of baddbmm with a broadcast bias takes
    # 6.4 GiB at (1, 2, 2), (2, 2, 3), (2, 3, 2) in torch 2.13
    return f, (t.randn(1, 1, 2), t.randn(2, 1, 2), t.randn(2, 2, 2))


@case("tensordot")
def _(t: Inputs):
    c = t.randn(2, 3, 2)
    return (lambda x: torch.tensordot(x.tanh(), c, dims=([0, 2], [0, 1])).sin()), (
        t.randn(2, 2, 3),)


@case("multi_dot")
def _(t: Inputs):
    a, b = t.randn(2, 3), t.randn(3, 3)
    return (lambda x: torch.linalg.multi_dot([a, b, x.sin()]).tanh()), (t.randn(3),)


# cdist: torch.func.jacrev of torch.cdist is wrong in torch 2.13 (batched _cdist_backward; it
# disagrees with torch.autograd.functional.jacobian at order 1) and raises from order 2
# (_cdist_backward has no derivative). These cases take their oracle from the written-out
# distance; test_cdist_first_order_matches_autograd checks the engine against torch's own
# first derivative.


def _pdist(x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
    d = x.unsqueeze(-2) - y.unsqueeze(-3)
    if p == 2:
        return (d * d).sum(-1).sqrt()
    return (d.abs() ** p).sum(-1) ** (1 / p)


def _cdist_case(p: float, rows: int = 3, cols: int = 2, dim: int = 2) -> tuple[Builder, Builder]:
    def build(t: Inputs, written: bool) -> Any:
        y = t.randn(cols, dim)
        x = t.randn(rows, dim)
        if written:
            return (lambda x: _pdist(pre(x), y, p).tanh()), (x,)
        return (lambda x: torch.cdist(pre(x), y, p=p).tanh()), (x,)

    return (lambda t: build(t, False)), (lambda t: build(t, True))


for _p, _name, _rows, _orders in ((2.0, "cdist", 3, ORDERS), (1.0, "cdist_p1", 3, ORDERS),
                                  (3.0, "cdist_p3", 3, ORDERS), (0.5, "cdist_p05", 2, ORDERS),
                                  (2.0, "cdist_mm_path", 26, (1, 2))):
    _build, _oracle = _cdist_case(_p, rows=_rows)
    case(_name, orders=_orders, oracle=_oracle)(_build)


def _pdist_pairs(x: torch.Tensor, p: float) -> torch.Tensor:
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1)
    return _pdist(x[i].unsqueeze(1), x[j].unsqueeze(1), p).reshape(-1)


def _pdist_case(p: float) -> tuple[Builder, Builder]:
    # F.pdist: torch cannot differentiate it twice (_pdist_backward has no derivative)
    def build(t: Inputs, written: bool) -> Any:
        x = t.randn(3, 2)
        if written:
            return (lambda x: _pdist_pairs(pre(x), p).tanh()), (x,)
        return (lambda x: F.pdist(pre(x), p).tanh()), (x,)

    return (lambda t: build(t, False)), (lambda t: build(t, True))


for _p, _name in ((2.0, "pdist"), (3.0, "pdist_p3")):
    _build, _oracle = _pdist_case(_p)
    case(_name, oracle=_oracle)(_build)


def _cdist_both_oracle(t: Inputs):
    return (lambda x, y: _pdist(x, y.sin(), 2.0).tanh()), (t.randn(2, 1, 2), t.randn(3, 2))


@case("cdist_both_batched", argnums=(0, 1), oracle=_cdist_both_oracle)
def _(t: Inputs):
    return (lambda x, y: torch.cdist(x, y.sin()).tanh()), (t.randn(2, 1, 2), t.randn(3, 2))


# --------------------------------------------------------------------------------------------
# piecewise functions with exact rules (NOTE [Kinks follow torch's backward formulas])
# --------------------------------------------------------------------------------------------


@case("hardtanh")
def _(t: Inputs):
    return (lambda x: F.hardtanh(pre(x), -0.6, 0.8).tanh() * x.cos()), (t.away(6),)


@case("relu6")
def _(t: Inputs):
    return (lambda x: F.relu6(pre(x) * 8).sin() * x), (t.away(6),)


@case("clamp_scalar")
def _(t: Inputs):
    return (lambda x: torch.clamp(pre(x), -0.5, 0.6).sin() * x), (t.away(6),)


@case("clamp_tensor_bounds")
def _(t: Inputs):
    def f(x):
        return torch.clamp(x.sin(), min=x.flip(0) * 0.5 - 0.3, max=x.roll(1, 0) * 0.5 + 0.3)

    return (lambda x: f(x).exp()), (t.randn(6),)


@case("clamp_min_tensor")
def _(t: Inputs):
    return (lambda x: torch.clamp_min(x.sin(), x.cos() * 0.5).tanh()), (t.randn(5),)


def _hardswish_oracle(t: Inputs):
    # torch's CUDA hardswish kernel multiplies by 1/6 rounded to float32, in float64 too
    # (a relative error of 3e-8 in the value); the engine computes x * (x + 3) / 6 exactly
    return (lambda x: (pre(x) * 3 * torch.clamp(pre(x) * 3 + 3, 0, 6) / 6).sin()), \
        (t.randn(6),)


@case("hardswish", oracle=_hardswish_oracle)
def _(t: Inputs):
    return (lambda x: F.hardswish(pre(x) * 3).sin()), (t.randn(6),)


def _hardsigmoid_oracle(t: Inputs):
    # torch 2.13 has no derivative for hardsigmoid_backward: nested jacrev raises from order 2
    return (lambda x: torch.clamp(pre(x) * 3 / 6 + 0.5, 0, 1).exp() * x), (t.randn(6),)


@case("hardsigmoid", oracle=_hardsigmoid_oracle)
def _(t: Inputs):
    return (lambda x: F.hardsigmoid(pre(x) * 3).exp() * x), (t.randn(6),)


@case("rrelu_eval")
def _(t: Inputs):
    return (lambda x: F.rrelu(pre(x), 0.1, 0.3, training=False).tanh() * x), (t.away(6),)


@case("celu")
def _(t: Inputs):
    return (lambda x: F.celu(pre(x), alpha=0.7).tanh()), (t.away(6),)


@case("selu")
def _(t: Inputs):
    return (lambda x: F.selu(pre(x)).sin()), (t.away(6),)


@case("threshold")
def _(t: Inputs):
    return (lambda x: F.threshold(pre(x), 0.1, -2.0).tanh()), (t.away(6),)


@case("softshrink")
def _(t: Inputs):
    return (lambda x: F.softshrink(pre(x), 0.1).sin()), (t.away(6),)


@case("logsigmoid")
def _(t: Inputs):
    return (lambda x: F.logsigmoid(pre(x) * 2)), (t.away(5),)


@case("minimum")
def _(t: Inputs):
    return (lambda x: torch.minimum(pre(x), x.flip(0) * 0.5).tanh()), (t.away(4),)


@case("fmax")
def _(t: Inputs):
    return (lambda x: torch.fmax(pre(x), x.flip(0) * 0.5).tanh()), (t.away(4),)


@case("fmin_both", argnums=(0, 1))
def _(t: Inputs):
    return (lambda x, y: torch.fmin(x.sin(), y * 0.5).exp()), (t.away(4), t.away(4))


@case("atan2_both", argnums=(0, 1))
def _(t: Inputs):
    return (lambda y, x: torch.atan2(y.sin(), x - 0.5 * y)), (t.randn(4), t.randn(4))


@case("atan2_broadcast")
def _(t: Inputs):
    return (lambda x: torch.arctan2(pre(x)[:, None], x.exp()[None, :] - 1.5)), (t.randn(4),)


@case("hypot_both", argnums=(0, 1))
def _(t: Inputs):
    return (lambda a, b: torch.hypot(a.sin(), b * a)), (t.randn(4), t.randn(4))


@case("copysign")
def _(t: Inputs):
    return (lambda x: torch.copysign(x.exp() - 1.1, -x.flip(0)) * x), (t.away(4),)


@case("dist")
def _(t: Inputs):
    return (lambda x: torch.dist(x.sin(), x.flip(0), p=3) * x), (t.randn(4),)


@case("addbmm", argnums=(0, 1))
def _(t: Inputs):
    return (lambda x, w: torch.addbmm(x[0].exp(), x.sin(), w, beta=0.5, alpha=2).tanh()), \
        (t.randn(2, 2, 3), t.randn(2, 3, 3))


@case("special_bessel")
def _(t: Inputs):
    return (lambda x: torch.special.i0(x) * torch.special.i1e(x.flip(0)) + torch.special.i0e(x)
            - torch.special.i1(x).sin()), (t.randn(4),)


@case("special_erfcx")
def _(t: Inputs):
    return (lambda x: torch.special.erfcx(3 * x) + torch.special.log_ndtr(4 * x.flip(0))), \
        (t.randn(4),)


@case("polygamma")
def _(t: Inputs):
    return (lambda x: torch.polygamma(1, x.exp() + 0.5) * torch.polygamma(0, x.cos() + 2)), \
        (t.randn(4),)


@case("remainder")
def _(t: Inputs):
    return (lambda x: torch.remainder(pre(x) * 3, 0.7) * x.cos()), (t.randn(5),)


@case("remainder_tensor")
def _(t: Inputs):
    return (lambda x: torch.remainder(x.exp() * 3, 0.5 + x.flip(0).sigmoid())), (t.randn(5),)


@case("remainder_other", argnums=1)
def _(t: Inputs):
    return (lambda x, y: torch.remainder(x, y.exp() + 0.3).sin()), (t.randn(4) * 3, t.randn(4))


@case("fmod")
def _(t: Inputs):
    return (lambda x: torch.fmod(pre(x) * 3, 0.7) * x.cos()), (t.randn(5),)


@case("fmod_tensor")
def _(t: Inputs):
    return (lambda x: torch.fmod(x.sinh() * 3, 0.5 + x.flip(0).sigmoid())), (t.randn(5),)


@case("pad_value")
def _(t: Inputs):
    return (lambda x: F.pad(x.sin(), (1, 2), value=1.5).tanh() * 2), (t.randn(2, 3),)


@case("masked_fill")
def _(t: Inputs):
    mask = t.index([True, False, True, False])
    return (lambda x: x.sin().masked_fill(mask, 0.7) * x), (t.randn(4),)


@case("masked_fill_tensor_value")
def _(t: Inputs):
    mask = t.index([True, False, True, False])
    return (lambda x: x.sin().masked_fill(mask, x[1] * x[3]) * x), (t.randn(4),)


# --------------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------------

CASE_BY_NAME = {c.name: c for c in CASES}


_SEED = 1234


def _expected(name: str, order: int, device: str) -> Any:
    """The oracle's answer (random cases: right after ``manual_seed(_SEED)``)."""
    c = CASE_BY_NAME[name]
    if c.random:
        f, args = (c.oracle or c.build)(Inputs(name, device))
        torch.manual_seed(_SEED)
        with _no_cudnn():
            return reference_deriv(f, order, c.argnums)(*args)
    return _expected_cached(name, order, device)


@functools.cache
def _expected_cached(name: str, order: int, device: str) -> Any:
    """The oracle's answer, computed once per (case, order, device) and shared by the modes."""
    c = CASE_BY_NAME[name]
    f, args = (c.oracle or c.build)(Inputs(name, device))
    with _no_cudnn():
        return reference_deriv(f, order, c.argnums)(*args)


def _no_cudnn() -> Any:
    """The oracle runs torch's native CUDA kernels: torch.func cannot differentiate cuDNN's
    RNN (``nn.RNN``/``GRU``/``LSTM`` raise "Cannot access storage of TensorWrapper" under
    ``jacrev``), and the native kernels make an oracle independent of the cuDNN ones the engine
    may run."""
    return torch.backends.cudnn.flags(enabled=False)


def _params() -> list[Any]:
    out = []
    for c in CASES:
        for k in c.orders:
            for mode in MODES:
                out.append(pytest.param(c.name, k, mode, id=f"{c.name}-order{k}-{mode}"))
    return out


@pytest.mark.parametrize("name,order,mode", _params())
def test_operator(name: str, order: int, mode: str, device: str) -> None:
    c = CASE_BY_NAME[name]
    f, args = c.build(Inputs(name, device))
    before = clone_tree(args)
    with expect_bug(list(c.bugs), f, order, c.argnums, args, mode=mode):
        transform = xderiv(f, order, c.argnums, mode=mode)
        msg = f"xderiv({name}, order={order}, argnums={c.argnums}, mode={mode!r})"
        if c.random:
            torch.manual_seed(_SEED)
        actual = transform(*args)
        assert_tree_close(actual, _expected(name, order, device), msg=msg)
        if mode == "auto":
            # weights that require grad sent the call above through the FX graph; without
            # a gradient requirement the same plan runs the fast executor (NOTE [Fast
            # execution]), which must agree
            if c.random:
                torch.manual_seed(_SEED)
            with torch.no_grad():
                fast = transform(*args)
            assert_tree_close(fast, _expected(name, order, device), msg=msg + " (no_grad)")
    assert_tree_equal(args, before, msg="inputs were mutated")


@pytest.mark.parametrize("name,order", [(c.name, k) for c in CASES for k in c.orders])
def test_operator_reference_mode(name: str, order: int) -> None:
    """The reference strategy (nested torch.func on the captured, decomposed graph) is right
    on the whole catalogue too, where torch's own nested derivatives of composite kernels are
    not (the norms: see NOTE [Oracle for the norms])."""
    c = CASE_BY_NAME[name]
    f, args = c.build(Inputs(name, "cpu"))
    if c.random:
        torch.manual_seed(_SEED)
    actual = xderiv(f, order, c.argnums, mode="reference")(*args)
    assert_tree_close(actual, _expected(name, order, "cpu"), msg=f"{name} order {order}")


# NOTE [Operator coverage is checked on what the cases call]
# Every binding operator (and every spelling of a matrix product) must be *exercised* by some
# case: one eager run of the case's function, recorded by tests/_calls.py, must make the calls
# listed for it -- the torch function or aten operator itself, with the differentiated inputs
# reaching the argument that matters (``name@i``), with the ranks that make the spelling
# (``name(2,1)``) or the flag that selects the mode (``name[training=True]``). A requirement is
# a tuple of groups; one case must hit every group (each group: any one of its calls).
F_ = "torch.nn.functional."
_MATMUL = ("torch.matmul", "torch.Tensor.matmul")


def _on(*names: str, at: tuple[int | str, ...] = (0,)) -> set[str]:
    """``name@i`` for every name and position: the call had that argument differentiated."""
    return {f"{n}@{i}" for n in names for i in at}


def _ranks(*ranks: int) -> set[str]:
    return {f"{n}({','.join(map(str, ranks))})" for n in _MATMUL}


REQUIRED: dict[str, tuple[set[str], ...]] = {
    # activations
    "relu": (_on("aten.relu"),), "sigmoid": (_on("aten.sigmoid"),),
    "softmax": (_on("aten._softmax"),), "log_softmax": (_on("aten._log_softmax"),),
    "tanh": (_on("aten.tanh"),),
    "gelu_none": (_on(F_ + "gelu"), {F_ + "gelu[approximate=none]"}),
    "gelu_tanh": (_on(F_ + "gelu"), {F_ + "gelu[approximate=tanh]"}),
    "leaky_relu": (_on("aten.leaky_relu"),), "softplus": (_on("aten.softplus"),),
    "silu": (_on("aten.silu"),), "elu": (_on(F_ + "elu"),), "celu": (_on("aten.celu"),),
    "selu": (_on(F_ + "selu"),), "hardtanh": (_on(F_ + "hardtanh"),),
    "relu6": (_on(F_ + "relu6"),), "hardswish": (_on("aten.hardswish"),),
    "hardsigmoid": (_on("aten.hardsigmoid"),),
    "rrelu_eval": (_on(F_ + "rrelu"), {F_ + "rrelu[training=False]"}),
    "threshold": (_on("aten.threshold"),), "softshrink": (_on("aten.softshrink"),),
    "logsigmoid": (_on("aten.log_sigmoid_forward"),),
    "clamp": (_on("aten.clamp"),), "clamp_min_bound": (_on("aten.clamp", at=(1,)),),
    "clamp_max_bound": (_on("aten.clamp", at=(2,)),),
    "clamp_min_tensor": (_on("aten.clamp_min", at=(1,)),),
    "maximum": (_on("aten.maximum"),), "minimum": (_on("aten.minimum"),),
    "fmax": (_on("aten.fmax"),), "fmin": (_on("aten.fmin"), _on("aten.fmin", at=(1,))),
    # elementwise arithmetic
    "mul": (_on("aten.mul"),), "add": (_on("aten.add"),), "sub": (_on("aten.sub"),),
    "rsub": (_on("aten.rsub"),), "div": (_on("aten.div"), _on("aten.div", at=(1,))),
    "pow": (_on("aten.pow"),), "pow_exponent": (_on("aten.pow", at=(1,)),),
    "exp": (_on("aten.exp"),), "log": (_on("aten.log"),),
    "remainder": (_on("aten.remainder"),), "remainder_other": (_on("aten.remainder", at=(1,)),),
    "fmod": (_on("aten.fmod"),), "fmod_other": (_on("aten.fmod", at=(1,)),),
    "pad_value": (_on("aten.constant_pad_nd"),),
    "masked_fill": (_on("aten.masked_fill"),),
    "masked_fill_value": (_on("aten.masked_fill", at=(2,)),),
    # reductions
    "sum": (_on("aten.sum"),), "prod": (_on("aten.prod"),), "mean": (_on("aten.mean"),),
    "var": (_on("aten.var"),), "amax": (_on("aten.amax"),), "max": (_on("aten.max"),),
    # shape and indexing
    "permute": (_on("torch.Tensor.permute"),), "t": (_on("torch.Tensor.t"),),
    "transpose": (_on("torch.Tensor.transpose"),), "view": (_on("torch.Tensor.view"),),
    "flatten": (_on("torch.flatten"),), "reshape": (_on("torch.Tensor.reshape"),),
    "index_basic": (_on("aten.slice"),), "index_select_int": (_on("aten.index"),),
    "index_bool": (_on("aten.index"), {"aten.index[bool]"}),
    "cat": (_on("aten.cat"),), "stack": (_on("torch.stack"),),
    "split": (_on("torch.functional.split", "torch.Tensor.split"),),
    "chunk": (_on("torch.chunk", "torch.Tensor.chunk"),),
    # dropout, normalisation, embedding
    "dropout_eval": (_on(F_ + "dropout"), {F_ + "dropout[training=False]"}),
    "dropout_train": (_on(F_ + "dropout"), {F_ + "dropout[training=True]"},
                      _on("aten.bernoulli", "aten.bernoulli_", "aten.native_dropout")),
    "layer_norm": (_on("aten.native_layer_norm"),),
    "layer_norm_weight": (_on("aten.native_layer_norm", at=(2,)),),
    "batch_norm_eval": (_on(F_ + "batch_norm"), {F_ + "batch_norm[training=False]"}),
    "batch_norm_train": (_on(F_ + "batch_norm"), {F_ + "batch_norm[training=True]"}),
    "group_norm": (_on(F_ + "group_norm"),),
    "group_norm_weight": (_on("aten.native_group_norm", at=(1, 2)),),
    "embedding_weight": (_on(F_ + "embedding", at=(1,)),),
    "embedding_downstream": ({F_ + "embedding"}, _on("aten.mv", "aten.mm", at=(1,))),
    # convolution, pooling, resampling
    "conv1d": (_on(F_ + "conv1d"),), "conv1d_weight": (_on(F_ + "conv1d", at=(1,)),),
    "conv2d": (_on(F_ + "conv2d"),), "conv2d_weight": (_on(F_ + "conv2d", at=(1,)),),
    "conv_transpose2d": (_on(F_ + "conv_transpose2d"),),
    "max_pool2d": (_on("aten.max_pool2d_with_indices"),),
    "avg_pool2d": (_on("aten.avg_pool2d"),),
    "adaptive_avg_pool2d": (_on("aten._adaptive_avg_pool2d"),),
    "interpolate_nearest": (_on("aten.upsample_nearest2d"),),
    "interpolate_bilinear": (_on("aten.upsample_bilinear2d"),),
    # losses
    "cross_entropy": (_on(F_ + "cross_entropy"),), "mse_loss": (_on(F_ + "mse_loss"),),
    # matrix products in every spelling
    # (``resolve_name`` reports ``torch.mm`` as its alias ``torch.spmm``)
    "mm": (_on("torch.mm", "torch.spmm"),),
    "mm_weight": (_on("torch.mm", "torch.spmm", at=(1,)),),
    "addmm": (_on("torch.addmm", at=(1, 2)),), "addmm_bias": (_on("torch.addmm"),),
    "matmul": (_on(*_MATMUL, at=(0, 1)),),
    "matmul_2d_1d": (_ranks(2, 1), _on("aten.mv", at=(1,))),
    "matmul_1d_2d": (_ranks(1, 2), _on(*_MATMUL)),
    "matmul_batched": (_ranks(3, 2), _on(*_MATMUL)),
    "matmul_3d_1d": (_ranks(3, 1), _on(*_MATMUL)),
    "matmul_1d_3d": (_ranks(1, 3), _on(*_MATMUL)),
    "matmul_batch_broadcast": (_ranks(4, 3), _on(*_MATMUL)),
    "linear": (_on(F_ + "linear"),), "linear_weight": (_on(F_ + "linear", at=(1,)),),
    "linear_bias": (_on(F_ + "linear", at=(2,)),),
    "einsum": (_on("torch.functional.einsum", at=(1, 2)),),
    "einsum_both": (_on("torch.functional.einsum", at=(1,)),
                    _on("torch.functional.einsum", at=(2,))),
    "mv": (_on("torch.mv", at=(1,)),), "mv_matrix": (_on("torch.mv"),),
    "addmv": (_on("torch.addmv", at=(2,)),),
    "addmv_all": (_on("torch.addmv"), _on("torch.addmv", at=(1,)), _on("torch.addmv", at=(2,))),
    "dot": (_on("torch.dot"),), "dot_both": (_on("torch.dot"), _on("torch.dot", at=(1,))),
    "vdot": (_on("torch.vdot"),), "inner": (_on("torch.inner"),),
    "outer": (_on("torch.outer"),),
    "addr": (_on("torch.addr", at=(1,)),),
    "addr_all": (_on("torch.addr"), _on("torch.addr", at=(1,)), _on("torch.addr", at=(2,))),
    "bmm": (_on("torch.bmm"),), "bmm_right": (_on("torch.bmm", at=(1,)),),
    "baddbmm": (_on("torch.baddbmm", at=(1,)),),
    "baddbmm_all": (_on("torch.baddbmm"), _on("torch.baddbmm", at=(1,)),
                    _on("torch.baddbmm", at=(2,))),
    "tensordot": (_on("torch.functional.tensordot"),),
    "multi_dot": (_on("torch.linalg.multi_dot"),),
    "cdist": (_on("torch.functional.cdist"),),
    "cdist_x2": (_on("torch.functional.cdist", at=(1,)),),
    # recurrent cells and sequences
    "rnn_cell": (_on("torch.rnn_tanh_cell"),),
    "rnn_cell_hidden": (_on("torch.rnn_tanh_cell", at=(1,)),),
    "rnn_relu_cell": (_on("torch.rnn_relu_cell"),),
    "lstm_cell": (_on("torch.lstm_cell"),), "lstm_cell_weight": (_on("torch.lstm_cell", at=(3,)),),
    "gru_cell": (_on("torch.gru_cell"),), "gru_cell_params": (_on("torch.gru_cell", at=(2,)),),
    "rnn": (_on("torch.rnn_tanh"),), "gru": (_on("torch.gru"),), "lstm": (_on("torch.lstm"),),
}


@functools.cache
def _calls_of(name: str) -> frozenset[str]:
    c = CASE_BY_NAME[name]
    f, args = c.build(Inputs(name, "cpu"))
    return frozenset(record_calls(f, args, c.argnums))


# Cases the engine cannot run, and why: everything else must run on the engine in every mode
# (a fallback to nested torch.func would make the comparison above test torch, not xafunc).
FALLBACK: dict[str, str] = {}


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_engine_runs_the_case(name: str) -> None:
    c = CASE_BY_NAME[name]
    f, args = c.build(Inputs(name, "cpu"))
    for k in c.orders:
        for mode in MODES:
            p = xafunc.plan(f, k, c.argnums, mode=mode)(*args)
            where = f"{name} order {k} mode {mode}"
            if name in FALLBACK:
                assert p.strategy == "reference", where
                assert FALLBACK[name] in (p.fallback or ""), (where, p.fallback)
            else:
                assert p.strategy == "engine", (where, p.fallback)


def test_every_required_operator_has_a_case() -> None:
    """Each binding operator is called by some case, the way the requirement says (see NOTE
    [Operator coverage is checked on what the cases call])."""
    missing = []
    for op, groups in REQUIRED.items():
        if not any(all(calls & group for group in groups)
                   for calls in (_calls_of(c.name) for c in CASES)):
            missing.append(op)
    assert not missing, f"operators no case calls as required: {missing}"


def test_coverage_check_can_fail() -> None:
    """The check above is not satisfied by names: ``tanh`` does not call ``t``, and a case
    computing with a fixed mask does not call dropout."""
    assert not _on("torch.Tensor.t") & _calls_of("tanh")
    train = REQUIRED["dropout_train"]
    assert not all(_calls_of("dropout_train_fixed_mask") & g for g in train)
    assert not all(_calls_of("dropout_eval") & g for g in train)


_ = DEVICES  # the device fixture comes from conftest; DEVICES documents the parameter list


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_layer_norm_order3_against_finite_differences(mode: str) -> None:
    """Independent check behind NOTE [Oracle for the norms]: central differences of the
    (agreed) second derivative give the third."""
    x = torch.tensor([[0.3, -0.5, 1.2, 0.8], [0.1, 0.9, -0.7, 0.4]], dtype=F64)
    f = lambda x: F.layer_norm(x, (4,))  # noqa: E731
    d2 = reference_deriv(f, 2)
    eps = 1e-5
    cols = []
    for e in torch.eye(8, dtype=F64):
        e = e.reshape(2, 4)
        cols.append((d2(x + eps * e) - d2(x - eps * e)) / (2 * eps))
    fd = torch.stack(cols, -1).reshape((2, 4) * 4)
    assert_tree_close(xderiv(f, 3, mode=mode)(x), fd, rtol=1e-5, atol=1e-6)
