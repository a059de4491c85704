"""xafunc: composable arbitrary-order derivative transforms for PyTorch."""

from ._plan import Plan as Plan
from ._taylor_ops import jet as jet
from ._taylor_ops import xbiharmonic as xbiharmonic
from ._taylor_ops import xlaplacian as xlaplacian
from ._transforms import plan as plan
from ._transforms import xderiv as xderiv
from ._transforms import xderivs as xderivs
from ._transforms import xhessian as xhessian
from ._transforms import xjacobian as xjacobian

__all__ = ["Plan", "jet", "plan", "xbiharmonic", "xderiv", "xderivs", "xhessian",
           "xjacobian", "xlaplacian"]
__version__ = "0.1.0"
