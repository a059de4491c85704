"""xafunc: composable arbitrary-order derivative transforms for PyTorch."""

from ._capture.cache import CacheInfo as CacheInfo
from ._capture.cache import cache_info as cache_info
from ._capture.cache import clear_cache as clear_cache
from ._plan import FallbackError as FallbackError
from ._plan import Plan as Plan
from ._plan import strict as strict
from ._taylor_ops import jet as jet
from ._taylor_ops import xbiharmonic as xbiharmonic
from ._taylor_ops import xlaplacian as xlaplacian
from ._transforms import plan as plan
from ._transforms import xderiv as xderiv
from ._transforms import xderivs as xderivs
from ._transforms import xhessian as xhessian
from ._transforms import xjacobian as xjacobian

__all__ = ["CacheInfo", "FallbackError", "Plan", "cache_info", "clear_cache", "jet", "plan",
           "strict", "xbiharmonic", "xderiv", "xderivs", "xhessian", "xjacobian", "xlaplacian"]
__version__ = "0.2.0"

for _obj in (CacheInfo, FallbackError, Plan, cache_info, clear_cache, strict):
    _obj.__module__ = "xafunc"
del _obj
