"""xafunc against torch.func on tanh MLPs (cases in :mod:`cases`).

Each class times the xafunc transform (``time_xafunc``/``peakmem_xafunc``) beside the
torch.func strategy a careful user would pick (``time_torchfunc``/``peakmem_torchfunc``):

* ``mode="auto"``: xafunc chooses; torch.func runs ``Case.asv_baseline`` (the best nesting
  measured by ``ratio_table.py``);
* ``mode="forward"`` / ``"reverse"``: xafunc is forced to that mode; torch.func runs the pure
  ``jacfwd``/``jacrev`` nesting.

Functions are built in ``setup`` but not called there, so ``peakmem_*`` measures one strategy
only. The full sweep over every nesting is ``python asv_bench/ratio_table.py``.
"""

from __future__ import annotations

from .cases import DEFAULT_MEM_BUDGET, DTYPES, Case, get_case, nesting_name


class _CaseBench:
    """Shared setup and methods; subclasses only set ``params``."""

    param_names = ["case", "mode", "dtype"]
    params: list = []
    timeout = 180

    def _case(self, case: str) -> Case:
        return get_case(case)

    def setup(self, case: str, mode: str, dtype: str) -> None:
        c = self._case(case)
        if not c.available():
            raise NotImplementedError(f"xafunc has no {c.requires} yet")
        dt = DTYPES[dtype]
        self.args = c.make_args(dt)
        baselines = c.baselines(dt)
        if mode == "auto":
            name = c.asv_baseline
        else:
            name = nesting_name(("fwd" if mode == "forward" else "rev",) * c.order)
        fn, est_bytes = baselines[name]
        if est_bytes > DEFAULT_MEM_BUDGET:
            raise NotImplementedError(f"{name} needs about {est_bytes / 2**30:.0f} GiB")
        self.torchfunc = fn
        self.xafunc = c.xafunc_fn(dt, mode=mode)

    def time_xafunc(self, case: str, mode: str, dtype: str) -> None:
        self.xafunc(*self.args)

    def time_torchfunc(self, case: str, mode: str, dtype: str) -> None:
        self.torchfunc(*self.args)

    def peakmem_xafunc(self, case: str, mode: str, dtype: str) -> None:
        self.xafunc(*self.args)

    def peakmem_torchfunc(self, case: str, mode: str, dtype: str) -> None:
        self.torchfunc(*self.args)


class Jacobian(_CaseBench):
    """First order: hourglass, wide in, wide out, uniform; every mode."""

    params = [
        ["jac_hourglass", "jac_wide_in", "jac_wide_out", "jac_uniform"],
        ["auto", "forward", "reverse"],
        ["float32"],
    ]


class HigherOrder(_CaseBench):
    """Orders 2 to 4 at one point."""

    params = [
        ["hess_scalar", "pinn_order3", "order4", "order3_32_128_8"],
        ["auto"],
        ["float32"],
    ]


class VmapHessian(_CaseBench):
    """Per-sample Hessians under ``torch.func.vmap``."""

    params = [["vmap_hessians"], ["auto"], ["float32"]]


class Orders(_CaseBench):
    """One PINN-like network 3->64->64->64->1 at orders 1 to 4 (reverse innermost baseline)."""

    param_names = ["order", "mode", "dtype"]
    params = [[1, 2, 3, 4], ["auto"], ["float32"]]

    def _case(self, case: str) -> Case:  # here ``case`` is the order
        k = int(case)
        return Case(f"pinn_k{k}", f"order {k}", (3, 64, 64, 64, 1), k, 1.0,
                    asv_baseline=nesting_name(("rev",) + ("fwd",) * (k - 1)))


class Taylor(_CaseBench):
    """Taylor mode: Laplacian, biharmonic, jet (skipped until xafunc exports them)."""

    params = [["laplacian_batch", "laplacian_point", "biharmonic", "jet6"], ["auto"],
              ["float32"]]
