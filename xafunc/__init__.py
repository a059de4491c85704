"""xafunc: composable arbitrary-order derivative transforms for PyTorch."""

from ._api import plan as plan
from ._api import xderiv as xderiv
from ._api import xderivs as xderivs
from ._api import xhessian as xhessian
from ._api import xjacobian as xjacobian
from ._plan import Plan as Plan

__all__ = ["Plan", "plan", "xderiv", "xderivs", "xhessian", "xjacobian"]
__version__ = "0.1.0"
