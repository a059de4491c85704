"""Type aliases shared by the xafunc modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

Argnums = int | tuple[int, ...]
Mode = Literal["auto", "forward", "reverse", "mixed", "reference"]
MODES: tuple[str, ...] = ("auto", "forward", "reverse", "mixed", "reference")
Func = Callable[..., Any]
