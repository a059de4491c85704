"""Call signatures: what a cached plan depends on."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch.utils import _pytree as pytree


def _leaf_key(leaf: Any) -> Hashable:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), leaf.dtype, leaf.device.type, leaf.device.index)
    if isinstance(leaf, Hashable):
        try:
            hash(leaf)
            return ("V", type(leaf), leaf)
        except TypeError:
            pass
    return ("O", id(leaf))


def signature_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable | None:
    """A hashable key for everything about a call that a plan depends on.

    Tensors contribute shape, dtype and device (under ``vmap`` the per-sample shape); other
    leaves their value, or their identity when unhashable.
    """
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (str(spec), tuple(_leaf_key(leaf) for leaf in leaves))
