"""Shapes and requests of the model zoo, framework-free.

This module imports nothing but the standard library, so that the PyTorch zoo
(:mod:`benchmarks.zoo`) and the cross-framework anchors (``asv_bench/jax_zoo.py``, run in its
own JAX virtualenv, and ``asv_bench/torchjet_zoo.py``) build every case from the same numbers.

``MODELS`` maps an *anchor* name to the model and request; every zoo case names its anchor, and
the tanh-MLP cases of every formulation (``W @ x + b``, ``F.linear``, ``nn.Linear``, ...) share
one anchor per request, since JAX or torch-jet have one way to write them. A request is

* ``"deriv"``: the ``order``-th derivative tensor (``xderiv``; as ``order`` nested ``jacrev``);
* ``"laplacian"`` / ``"biharmonic"``: the operator applied to every output entry;
* ``"jet"``: every derivative of ``t -> f(x + t v)`` up to ``order`` along one direction.

``batch`` set means the request is made per sample under ``vmap`` over ``batch`` points.
"""

from __future__ import annotations

from typing import Any

#: tanh-MLP requests, each measured in every formulation of :data:`FORMULATIONS`.
MLP_REQUESTS: dict[str, dict[str, Any]] = {
    "hourglass": {"title": "Jacobian, hourglass", "widths": (1024, 16, 1024), "order": 1,
                  "vmap_batch": 8},
    "wide_in": {"title": "Jacobian, wide in", "widths": (1024, 256, 8), "order": 1,
                "vmap_batch": 8},
    "wide_out": {"title": "Jacobian, wide out", "widths": (8, 256, 1024), "order": 1,
                 "vmap_batch": 8},
    "hessian": {"title": "Hessian", "widths": (64, 256, 256, 1), "order": 2, "vmap_batch": 16},
    "order3": {"title": "order 3", "widths": (24, 96, 96, 6), "order": 3, "vmap_batch": 16},
    "order4": {"title": "order 4", "widths": (2, 32, 32, 3), "order": 4, "vmap_batch": 16},
}

#: How the same tanh MLP is written (issue 11, item 1). Each layer maps ``h`` to:
FORMULATIONS: dict[str, str] = {
    "mv": "W @ h + b (mv: matrix times 1-D vector)",
    "xWT": "h @ W.T + b",
    "linear": "F.linear(h, W, b)",
    "functional_call": "nn.Sequential of nn.Linear/nn.Tanh through functional_call(model, "
                       "params, (x,)), argnums=1",
    "module": "the nn.Sequential called directly",
    "einsum": "torch.einsum('oi,i->o', W, h) + b",
    "addmv": "torch.addmv(b, W, h)",
    "addmm": "torch.addmm(b, h[None], W.T)[0]",
    "matmul": "torch.matmul(h3, W.T) + b with h3 of shape (1, 1, width) (3-D by 2-D)",
    "bmm": "torch.bmm(h3, W.T[None]) + b (batch dimensions of size 1)",
    "baddbmm": "torch.baddbmm(b[None, None], h3, W.T[None])",
    "vmap": "W @ h + b, the request made per sample under torch.func.vmap (batch 'vmap_batch')",
}

#: Other models, one request each (the anchor name is the zoo case name).
MODELS: dict[str, dict[str, Any]] = {
    "resmlp": {"title": "residual MLP, 8 blocks, Hessian", "request": "deriv", "order": 2,
               "d_in": 8, "width": 64, "depth": 8, "d_out": 1},
    "siren": {"title": "SIREN PINN, order 3 (vmap)", "request": "deriv", "order": 3,
              "widths": (2, 64, 64, 64, 1), "w0": 30.0, "batch": 64},
    "fourier_pinn": {"title": "Fourier-feature PINN, Laplacian (vmap)", "request": "laplacian",
                     "order": 2, "d_in": 2, "n_freq": 32, "sigma": 2.0, "widths": (128, 128, 1),
                     "batch": 256},
    "convnet": {"title": "small conv net, Hessian in the image", "request": "deriv", "order": 2,
                "image": (1, 8, 8), "channels": (8, 8), "d_out": 1},
    "transformer": {"title": "transformer block, Jacobian", "request": "deriv", "order": 1,
                    "tokens": 8, "d_model": 32, "heads": 4, "mlp": 128},
    "lstm": {"title": "unrolled LSTM cell, Hessian", "request": "deriv", "order": 2,
             "steps": 6, "d_in": 4, "hidden": 32, "d_out": 1},
    "gru": {"title": "unrolled GRU cell, Jacobian", "request": "deriv", "order": 1,
            "steps": 6, "d_in": 4, "hidden": 32},
    "flow": {"title": "coupling flow log p, Hessian (vmap)", "request": "deriv", "order": 2,
             "dim": 16, "width": 64, "batch": 64},
    "mpnn": {"title": "message passing (index_add), Jacobian", "request": "deriv", "order": 1,
             "nodes": 16, "edges": 48, "features": 8, "hidden": 16},
    "vmap_hessians": {"title": "per-sample Hessians (vmap)", "request": "deriv", "order": 2,
                      "widths": (2, 64, 64, 1), "batch": 256},
    "vmap_laplacian": {"title": "per-sample Laplacians (vmap)", "request": "laplacian",
                       "order": 2, "widths": (12, 192, 192, 1), "batch": 128},
    "param_hessian": {"title": "loss Hessian in the parameters (argnums=0)", "request": "deriv",
                      "order": 2, "widths": (8, 48, 32, 1), "n_data": 64},
    "biharmonic": {"title": "biharmonic (vmap)", "request": "biharmonic", "order": 4,
                   "widths": (5, 128, 128, 1), "batch": 64},
    "jet6": {"title": "jet order 6, one direction", "request": "jet", "order": 6,
             "widths": (8, 128, 128, 8)},
}


def mlp_anchor(request: str, formulation: str) -> str:
    """The anchor of an MLP case: one per request, and one per request under vmap."""
    return f"mlp_{request}" + ("_vmap" if formulation == "vmap" else "")


def anchors() -> dict[str, dict[str, Any]]:
    """Every anchor (what JAX / torch-jet implement): ``name -> spec`` with ``request``,
    ``order``, ``batch`` (or None) and the model's shape fields."""
    out: dict[str, dict[str, Any]] = {}
    for req, spec in MLP_REQUESTS.items():
        base = {"model": "mlp", "request": "deriv", "order": spec["order"],
                "widths": spec["widths"], "title": spec["title"]}
        out[mlp_anchor(req, "mv")] = {**base, "batch": None}
        out[mlp_anchor(req, "vmap")] = {**base, "batch": spec["vmap_batch"],
                                         "title": spec["title"] + " (vmap)"}
    for name, spec in MODELS.items():
        out[name] = {"model": name, "batch": None, **spec}
    return out
