"""PINN training steps: xafunc against torch.func (cases in :mod:`training_cases`).

One step is forward + backward of ``mean over the batch of (D u(x))^2`` with the transform
called inline, through ``loss.backward()`` on an ``nn.Module`` (``api="backward"``) or
``torch.func.grad`` over ``functional_call`` parameters (``api="func_grad"``). Each class
times xafunc (``time_xafunc``/``peakmem_xafunc``) beside the torch.func strategy named by the
case's ``asv_baseline`` (``time_torchfunc``/``peakmem_torchfunc``). ``setup`` builds the step
functions and runs each once, so the timings are steady-state (capture and plan excluded) --
except ``time_xafunc_inline``, whose step builds xafunc's transform inside the step, as
torch.func users write ``vmap(hessian(u))(x)``, and so measures xafunc's caching across
transform objects.

The full comparison -- every torch.func strategy, ``torch.compile``'d torch.func, a float64
gradient check, ratios and targets -- is ``python asv_bench/training_table.py``.
"""

from __future__ import annotations

import torch

from .training_cases import APIS, INLINE, get_train_case, make_step


class _TrainingBench:
    param_names = ["case", "api"]
    params: list = []
    timeout = 300

    def setup(self, case: str, api: str) -> None:
        c = get_train_case(case)
        self.xafunc, _ = make_step(c, "xafunc", api, torch.float32)
        self.xafunc_inline, _ = make_step(c, INLINE, api, torch.float32)
        self.torchfunc, _ = make_step(c, c.asv_baseline, api, torch.float32)
        self.xafunc()  # capture and plan outside the timing
        self.xafunc_inline()
        self.torchfunc()

    def time_xafunc(self, case: str, api: str) -> None:
        self.xafunc()

    def time_xafunc_inline(self, case: str, api: str) -> None:
        self.xafunc_inline()

    def time_torchfunc(self, case: str, api: str) -> None:
        self.torchfunc()

    def peakmem_xafunc(self, case: str, api: str) -> None:
        self.xafunc()

    def peakmem_torchfunc(self, case: str, api: str) -> None:
        self.torchfunc()


class TrainingLaplacian(_TrainingBench):
    """Laplacian residual: input 2 to 16, width 64 to 256, batch 256 to 4096."""

    params = [["lap_2_64", "lap_16_256", "lap_8_128_b4096"], list(APIS)]


class TrainingHigherOrder(_TrainingBench):
    """Biharmonic and third-order residuals."""

    params = [["bih_2_64", "bih_4_128", "d3_2_64", "d3_8_128"], list(APIS)]
