"""The model zoo (:mod:`benchmarks.zoo`) in asv, for tracking over commits.

Each case times xafunc beside the torch.func strategy that torch.func's documentation suggests
for the request (``Built.recommended``: ``jacrev`` when the output is no wider than the input,
else ``jacfwd``; reverse innermost and forward outside at higher orders; vmapped
Hessian-vector products for Laplacians; nested ``jvp`` for jets), every transform called
inline as users write it:

* ``ZooMLP`` / ``ZooModels``: ``time_xafunc``/``peakmem_xafunc`` beside
  ``time_torchfunc``/``peakmem_torchfunc``;
* ``ZooMLPCompiled`` / ``ZooModelsCompiled``: ``time_torchcompile``, the same strategy under
  ``torch.compile`` (compiled and called once in ``setup``, so only steady state is timed).

The full comparison -- every nesting, the fastest one compiled, correctness checks, compile
times -- is ``python asv_bench/zoo_table.py``. Select parameter combinations with a regex on
``name(params)``, e.g. ``asv run --python=same --bench "ZooMLP.*'hessian', 'linear'"``.
"""

from __future__ import annotations

from typing import Any

from .cases import DEFAULT_MEM_BUDGET
from .zoo import MODEL_CASES, ZOO_BY_NAME, Built
from .zoo_spec import FORMULATIONS, MLP_REQUESTS


def _build(name: str) -> tuple[Built, Any]:
    b = ZOO_BY_NAME[name].build()
    rec = b.recommended
    if b.estimates[rec] > DEFAULT_MEM_BUDGET:
        raise NotImplementedError(f"{rec} needs about {b.estimates[rec] / 2**30:.0f} GiB")
    return b, b.baselines[rec]


class _Zoo:
    timeout = 600

    def _name(self, *params: str) -> str:
        raise NotImplementedError

    def setup(self, *params: str) -> None:
        built, self.torchfunc = _build(self._name(*params))
        self.args = built.args
        self.xafunc = built.xafunc

    def time_xafunc(self, *params: str) -> None:
        self.xafunc(*self.args)

    def time_torchfunc(self, *params: str) -> None:
        self.torchfunc(*self.args)

    def peakmem_xafunc(self, *params: str) -> None:
        self.xafunc(*self.args)

    def peakmem_torchfunc(self, *params: str) -> None:
        self.torchfunc(*self.args)


class _ZooCompiled:
    timeout = 1200

    def _name(self, *params: str) -> str:
        raise NotImplementedError

    def setup(self, *params: str) -> None:
        import torch

        built, fn = _build(self._name(*params))
        self.args = built.args
        torch._dynamo.reset()
        self.compiled = torch.compile(fn, mode="default")
        self.compiled(*self.args)  # compile outside the timing

    def time_torchcompile(self, *params: str) -> None:
        self.compiled(*self.args)


class _MLP:
    """tanh MLPs: every request (Jacobian hourglass, wide in, wide out, Hessian, order 3,
    order 4) in every formulation of ``zoo_spec.FORMULATIONS``."""

    param_names = ["request", "formulation"]
    params = [list(MLP_REQUESTS), list(FORMULATIONS)]

    def _name(self, request: str, formulation: str) -> str:
        return f"mlp_{request}_{formulation}"


class _Models:
    """Residual MLP, SIREN, Fourier PINN, conv net, transformer block, LSTM/GRU, coupling
    flow, message passing, vmapped Hessians and Laplacians, parameter Hessian, biharmonic,
    jet."""

    param_names = ["case"]
    params = [MODEL_CASES]

    def _name(self, case: str) -> str:
        return case


class ZooMLP(_MLP, _Zoo):
    __doc__ = _MLP.__doc__


class ZooModels(_Models, _Zoo):
    __doc__ = _Models.__doc__


class ZooMLPCompiled(_MLP, _ZooCompiled):
    __doc__ = _MLP.__doc__


class ZooModelsCompiled(_Models, _ZooCompiled):
    __doc__ = _Models.__doc__
