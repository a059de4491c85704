"""The decomposition table capture traces with: composite operators into a small core set."""

from __future__ import annotations

from typing import Any

import torch


def _decompositions() -> dict[Any, Any]:
    from torch._decomp import core_aten_decompositions, get_decompositions

    aten = torch.ops.aten
    table = dict(core_aten_decompositions())
    table.update(get_decompositions([
        aten._softmax, aten._log_softmax, aten.gelu, aten.silu, aten.softplus, aten.elu,
        aten.native_layer_norm, aten.native_batch_norm, aten._native_batch_norm_legit,
        aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit_functional,
        aten.nll_loss_forward, aten.mse_loss, aten.logsumexp, aten.mish, aten.hardswish,
        aten.hardsigmoid, aten.celu, aten.selu, aten.glu, aten.huber_loss, aten.smooth_l1_loss,
        aten.binary_cross_entropy, aten.binary_cross_entropy_with_logits, aten.std,
        aten.linalg_vector_norm, aten.addcmul, aten.addcdiv, aten.lerp, aten.xlogy,
        aten.logit, aten.log_sigmoid_forward, aten.soft_margin_loss, aten.kl_div,
        aten.native_group_norm, aten.rrelu_with_noise, aten.frac,
    ]))
    # ``detach`` has a meaning (a zero-derivative rule) and random operators must run as eager
    # code runs them (see NOTE [Capture])
    for op in (aten.detach.default, aten.bernoulli.default, aten.native_dropout.default):
        table.pop(op, None)
    # our rules are simpler than these decompositions (which reach for prims)
    for op in (aten.var.correction, aten.var_mean.correction, aten.prod.dim_int,
               aten.prod.default, aten.mean.dim, aten.mean.default, aten.sum.default):
        table.pop(op, None)
    return table


_DECOMP: dict[Any, Any] | None = None


def decomposition_table() -> dict[Any, Any]:
    global _DECOMP
    if _DECOMP is None:
        _DECOMP = _decompositions()
    return _DECOMP
