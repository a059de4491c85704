"""Requests: what a transform asks of a captured function, and how a call's tensors divide.

A :class:`Request` is the one description every transform builds (``xderiv``, ``xderivs``,
``plan``, ``jet``, ``xlaplacian``, ``xbiharmonic``): hashable, it keys the plans cached on a
capture. A :class:`Split` is a request's view of one capture: which argument tensors are
differentiated (concatenated into the vector ``z``), which are constants, which graph outputs
are the differentiated output ``y`` and which are auxiliary, and the flat function
``(z, *others) -> (y, aux + mutations)`` the engine works on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .guards import _SCALARS
from .trace import Captured, TensorMeta, trace


@dataclass(frozen=True)
class Request:
    """One transform's parameters (validated when the transform was built)."""

    transform: str
    order: int
    argnums: int | tuple[int, ...] = 0
    has_aux: bool = False
    mode: str = "auto"
    chunk_size: int | None = None
    all_orders: bool = False
    method: str = "exact"  # xlaplacian / xbiharmonic
    num_samples: int | None = None
    distribution: str = "rademacher"
    compile: bool = False  # run the plain fast path through inductor (NOTE [Inductor executor])

    @property
    def int_argnums(self) -> bool:
        return isinstance(self.argnums, int)


def arg_tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The tensor leaves of ``(args, kwargs)`` in flattening order (the capture's inputs)."""
    if not kwargs and all(type(a) is Tensor for a in args):
        return list(args)
    out: list[Any] = []
    if _plain_tensors((args, kwargs), out):
        return out
    return [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)]


def _plain_tensors(obj: Any, out: list[Any]) -> bool:
    """Append the tensors of ``obj`` to ``out`` in torch's pytree order; False when ``obj``
    holds other containers (namedtuples, registered pytree nodes), which ``arg_tensors``
    leaves to torch's pytree (several times slower). The same walk as the cache's
    ``_structure``."""
    t = type(obj)
    if t is dict or t is list or t is tuple:
        for v in (obj.values() if t is dict else obj):
            if isinstance(v, Tensor):
                out.append(v)
            elif not _plain_tensors(v, out):
                return False
        return True
    if isinstance(obj, Tensor):
        out.append(obj)
        return True
    return t in _SCALARS


@dataclass
class Layout:
    """Where the differentiated leaves and outputs sit in ``z`` and ``y``."""

    in_shapes: list[tuple[int, ...]]
    in_spec: Any  # pytree spec of the argnums structure (one level of a jacrev result)
    out_shapes: list[tuple[int, ...]]
    out_spec: Any
    aux_spec: Any

    @property
    def n(self) -> int:
        return sum(math.prod(s) for s in self.in_shapes)

    @property
    def m(self) -> int:
        return sum(math.prod(s) for s in self.out_shapes)

    def single_shape(self, k: int) -> tuple[int, ...] | None:
        """The ``k``-th derivative's shape when one tensor goes in and one comes out (the
        result is then ``D`` reshaped), else None."""
        if self.in_spec.is_leaf() and self.out_spec.is_leaf():
            return self.out_shapes[0] + self.in_shapes[0] * k
        return None


def output_split(name: str, cap: Captured, has_aux: bool) -> tuple[int, Any, Any]:
    """``(number of differentiated output leaves, their spec, aux spec)`` after checking that
    the output is what torch.func accepts: tensors, ``(output, aux)`` with ``has_aux``."""
    spec, leaves = cap.out_spec, cap.out_leaves
    if has_aux:
        if not (spec.type is tuple and spec.num_children == 2):
            raise TypeError(
                f"{name}: has_aux=True requires func to return a tuple (output, aux), got "
                f"{_kind(spec, leaves)}. Return (output, aux) or pass has_aux=False.")
        out_spec, aux_spec = spec.children()
        n_y = out_spec.num_leaves
        for leaf in leaves[n_y:]:
            if not isinstance(leaf, TensorMeta):
                raise TypeError(
                    f"{name}: has_aux=True requires aux to be a tensor or a pytree of tensors "
                    f"(as torch.func does), got a {type(leaf).__name__} ({leaf!r}). Return it "
                    "as a tensor, e.g. torch.tensor(value).")
    else:
        out_spec, aux_spec, n_y = spec, pytree.tree_structure(()), len(leaves)
    ys = leaves[:n_y]
    if not ys:
        raise ValueError(f"{name}: func returned no tensors; there is nothing to differentiate. "
                         "Return a tensor or a pytree of tensors.")
    for leaf in ys:
        if not isinstance(leaf, TensorMeta):
            raise TypeError(
                f"{name}: func must return a tensor or a pytree of tensors, got a "
                f"{type(leaf).__name__} ({leaf!r}). Return torch tensors (use has_aux=True to "
                "return extra non-differentiated values).")
        if not (leaf.dtype.is_floating_point or leaf.dtype.is_complex):
            raise TypeError(
                f"{name}: func returned a tensor of dtype {leaf.dtype}; derivatives need a "
                "floating-point output. Cast the output with .float() or .double().")
    return n_y, out_spec, aux_spec


def _kind(spec: Any, leaves: list[Any]) -> str:
    if spec.is_leaf():
        return "Tensor" if isinstance(leaves[0], TensorMeta) else type(leaves[0]).__name__
    return getattr(spec.type, "__name__", str(spec.type))


class Split:
    """A request's view of one capture (see the module docstring)."""

    def __init__(self, name: str, cap: Captured, args: tuple[Any, ...],
                 kwargs: dict[str, Any], argnums: tuple[int, ...], int_argnums: bool,
                 has_aux: bool) -> None:
        self.cap = cap
        # the tensor leaves (capture inputs) of each argument; the differentiated ones are
        # concatenated in argnums order, as jacrev's tuple of results is ordered
        starts, counts, index = [], [], 0
        for a in args:
            k = sum(isinstance(leaf, Tensor) for leaf in pytree.tree_leaves(a))
            starts.append(index)
            counts.append(k)
            index += k
        self.diff = [p for a in argnums for p in range(starts[a], starts[a] + counts[a])]
        diff_set = set(self.diff)
        tensors = arg_tensors(args, kwargs)
        self.rest = [i for i in range(len(tensors)) if i not in diff_set]
        struct = args[argnums[0]] if int_argnums else tuple(args[a] for a in argnums)
        self.in_spec = pytree.tree_structure(struct)
        self.in_shapes = [tuple(tensors[i].shape) for i in self.diff]
        self.in_dtype = tensors[self.diff[0]].dtype
        self.n_y, out_spec, aux_spec = output_split(name, cap, has_aux)
        outs = [leaf for leaf in cap.out_leaves if isinstance(leaf, TensorMeta)]
        self.layout = Layout(self.in_shapes, self.in_spec,
                             [tuple(v.shape) for v in outs[:self.n_y]], out_spec, aux_spec)
        self.n_aux = len(outs) - self.n_y
        mutated_args = [i for i in cap.mutated if i < cap.n_args and i in diff_set]
        if mutated_args:
            raise ValueError(
                f"{name}: func modifies a differentiated argument in place (argument tensor "
                f"{mutated_args[0]}), which torch.func refuses too ('a leaf Variable that "
                "requires grad is being used in an in-place operation'). Compute a new tensor "
                "instead (x = x * 2, not x.mul_(2)).")
        self.sizes = [math.prod(s) for s in self.in_shapes]
        self._flat: GraphModule | None = None

    # ------------------------------------------------------------------ per call
    def inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any],
               lifted: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """``(z, others, targets)``: the differentiated vector, the graph's other inputs
        (random values, constant arguments, lifted tensors: the last :meth:`n_static` are
        static) and the tensors mutations are written back to."""
        tensors = arg_tensors(args, kwargs)
        if len(self.diff) == 1:
            z = tensors[self.diff[0]]
            z = z if z.dim() == 1 else z.reshape(-1)
        else:
            z = torch.cat([tensors[i].reshape(-1) for i in self.diff])
        others = self.others(tensors, self.cap.random_values(tensors, lifted), lifted)
        targets = [(tensors + list(lifted))[i] for i in self.cap.mutated]
        return z, others, targets

    def others(self, tensors: list[Any], random: list[Any], lifted: Any) -> list[Any]:
        """The flat function's inputs after ``z``, in its order: the random values, the
        constant argument tensors (of the call's ``tensors``), the lifted tensors."""
        return [*random, *(tensors[i] for i in self.rest), *lifted]

    def n_static(self, n_lifted: int) -> int:
        """How many of the flat function's last inputs are *static* (see ``Executable``): the
        constant arguments and the lifted tensors, which usually stay the same between calls
        (weights, passed in a dict to ``functional_call`` or read from closures and modules),
        so the values computed from them alone are hoisted out of the per-call graph."""
        return len(self.rest) + n_lifted

    def flat_graph(self, examples: list[Tensor]) -> GraphModule:
        """``(z, *others) -> (y, aux + mutations)`` traced from the capture (``examples``:
        ``[z, *others]`` for shapes; ``others`` ordered as :meth:`inputs` gives them)."""
        if self._flat is None:
            self._flat = trace(self.flat_function(), examples)
        return self._flat

    def flat_function(self) -> Callable[..., Any]:
        cap, diff, rest, sizes, shapes = self.cap, self.diff, self.rest, self.sizes, \
            self.in_shapes
        n_args, n_random, n_y = cap.n_args, cap.n_random, self.n_y
        graph = cap.graph
        assert graph is not None

        def flat(z: Tensor, *others: Tensor) -> tuple[Tensor, list[Tensor]]:
            tensors: list[Any] = [None] * n_args
            parts = torch.split(z, sizes) if len(sizes) > 1 else (z,)
            for pos, part, shape in zip(diff, parts, shapes):
                tensors[pos] = part.reshape(shape)
            for pos, t in zip(rest, others[n_random:]):
                tensors[pos] = t
            # the capture's inputs: argument tensors, random values, lifted tensors
            outs = graph(*tensors, *others[:n_random], *others[n_random + len(rest):])
            ys = outs[:n_y]
            y = torch.cat([t.reshape(-1) for t in ys]) if len(ys) != 1 else ys[0].reshape(-1)
            return y, list(outs[n_y:])

        return flat

    def split_aux(self, aux: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The user's aux leaves and the mutation values."""
        return aux[:self.n_aux], aux[self.n_aux:]


def write_back(targets: list[Tensor], values: list[Tensor]) -> None:
    """Apply a call's in-place updates (buffers, counters) once, after it succeeded."""
    if not targets:
        return
    with torch.no_grad():
        for t, v in zip(targets, values):
            t.copy_(v)
