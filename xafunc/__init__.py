"""xafunc: composable arbitrary-order derivative transforms for PyTorch."""

from ._api import plan as plan
from ._api import xderiv as xderiv
from ._api import xderivs as xderivs
from ._api import xhessian as xhessian
from ._api import xjacobian as xjacobian
from ._plan import Plan as Plan
from ._taylor_api import jet as jet
from ._taylor_api import xbiharmonic as xbiharmonic
from ._taylor_api import xlaplacian as xlaplacian

__all__ = ["Plan", "jet", "plan", "xbiharmonic", "xderiv", "xderivs", "xhessian",
           "xjacobian", "xlaplacian"]
__version__ = "0.1.0"
