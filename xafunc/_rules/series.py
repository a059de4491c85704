"""Truncated Taylor series along a batch of directions: the value every rule works on.

NOTE [Taylor mode along directions]
For a function ``f`` and a direction ``v`` the curve ``t -> f(x + t v)`` has the Taylor series
``sum_k c_k t^k`` with ``c_k = D^k f(x)[v, ..., v] / k!`` (coefficients are *not*
factorial-scaled in the sense of JAX's jet: ``c_k`` is the plain Taylor coefficient, so that
products of series are Cauchy products). A :class:`Series` holds ``c_0`` (the primal, shape
``S``) and ``c_1 .. c_K``, each of shape ``(B, *S)`` for ``B`` directions propagated at once,
or ``None`` where the coefficient is known to be zero (e.g. ``c_2`` of a linear layer's output
when the input moves along a straight line). Rules map series to series, one aten operator at a
time; every coefficient is an ordinary tensor, so the whole propagation is plain torch code that
``vmap``, ``grad`` and the other torch.func transforms can transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Coeff = Tensor | None


class UnitSeed:
    """A first coefficient made of unit vectors, not yet materialised.

    Stands for ``c_1[b] = e_{offset + b}`` (``b < count``) reshaped to the primal's shape: the
    seed of a first-order (Jacobian) propagation. Shape-only rules pass it through and
    matrix-product rules turn ``e_j @ W`` into row ``j`` of ``W`` (see ``_unit_product``), so
    a function that starts with a linear layer never multiplies by an identity matrix. Every
    other rule sees it materialised (:func:`materialize`).

    ``transposed``: the primal is a matrix ``(p, q)`` (both sizes above 1) whose *transpose*
    ``(q, p)`` is the seeded row-major tensor, e.g. ``W.t()`` of a seeded weight ``W`` (what
    ``nn.Linear`` multiplies by). Transposes toggle it, the matrix-product rules read it, and
    reshapes materialise such a seed first (its element order is not the primal's).
    """

    __slots__ = ("offset", "count", "transposed")

    def __init__(self, offset: int, count: int, transposed: bool = False) -> None:
        self.offset, self.count, self.transposed = offset, count, transposed

    @property
    def shape(self) -> tuple[int]:
        return (self.count,)


class Series:
    """``primal`` plus Taylor coefficients ``coeffs[k - 1] = c_k`` of shape ``(B, *primal.shape)``.

    ``coeffs[0]`` may be a :class:`UnitSeed`; rules marked ``unit_aware`` handle it, all others
    receive it materialised. With ``basis`` (a ``(B, n)`` matrix), ``coeffs[0]`` holds the
    first coefficients in an ``n``-vector basis, ``(n, *primal.shape)``: ``c_1 = basis @
    coeffs[0]`` (NOTE [First-order basis]).
    """

    __slots__ = ("primal", "coeffs", "basis")

    def __init__(self, primal: Tensor, coeffs: Sequence[Any], basis: Tensor | None = None):
        self.primal = primal
        self.coeffs = list(coeffs)
        self.basis = basis

    @property
    def unit(self) -> UnitSeed | None:
        c = self.coeffs[0] if self.coeffs else None
        return c if isinstance(c, UnitSeed) else None

    @property
    def order(self) -> int:
        return len(self.coeffs)

    def coeff(self, k: int) -> Coeff:
        """``c_k`` (``k >= 1``), or ``None`` when zero."""
        return self.coeffs[k - 1]

    def nonzero(self) -> bool:
        return any(c is not None for c in self.coeffs)

    def __repr__(self) -> str:
        cs = ", ".join("0" if c is None else "x".join(map(str, c.shape)) for c in self.coeffs)
        return f"Series(primal={tuple(self.primal.shape)}, coeffs=[{cs}])"


def nested_any(x: Any, pred: Callable[[Any], bool]) -> bool:
    """``pred`` holds for some value in ``x`` or, recursively, in its lists and tuples."""
    if isinstance(x, (list, tuple)):
        return any(nested_any(v, pred) for v in x)
    return pred(x)


def nested_map(x: Any, fn: Callable[[Any], Any]) -> Any:
    """``x`` with ``fn`` applied to every value inside its (nested) lists and tuples."""
    if isinstance(x, (list, tuple)):
        return type(x)(nested_map(v, fn) for v in x)
    return fn(x)


def _materialize_one(x: Any) -> Any:
    if not isinstance(x, Series) or x.unit is None:
        return x
    seed, p = x.unit, x.primal
    # a plain tensor, not ``p.new_zeros``: under ``vmap`` (the batched fast path traces the
    # rules under it) that would be a batched tensor, and the seed -- the same for every
    # sample -- and every product of it with the weights would be materialised per sample
    eye = torch.zeros((seed.count, p.numel()), dtype=p.dtype, device=p.device)
    eye.diagonal(seed.offset).fill_(1)
    if seed.transposed:  # seeded in the transpose's row-major order
        c = eye.reshape((seed.count,) + tuple(p.shape)[::-1]).transpose(1, 2)
    else:
        c = eye.reshape((seed.count,) + tuple(p.shape))
    return Series(p, [c] + x.coeffs[1:], x.basis)


def materialize(x: Any) -> Any:
    """``x`` with any :class:`UnitSeed` (also inside lists/tuples) replaced by real tensors."""
    return nested_map(x, _materialize_one)


# NOTE [First-order basis]
# Along the ``N = C(n + d - 1, d)`` directions of a degree-``d`` Taylor level (``d >= 2``), the
# first coefficients are linear in the direction: ``c_1(v) = J v``. The engine seeds them in
# the ``n`` unit vectors (``Series.basis``: the ``(N, n)`` direction matrix), so every linear
# map -- above all each matrix product -- runs on ``n`` rows instead of ``N`` (a third-order
# tensor in 8 inputs: 8 instead of 36). Rules that are linear in each coefficient separately
# and blind to the number of directions (reshapes, permutes, sums, additions, products with a
# constant; :func:`basis_linear`) keep the basis; the product, the division and the
# elementwise functions keep it for ``c_1`` and use the expanded ``c_1`` in the higher
# coefficients, which are not linear in the direction; every other rule receives the
# coefficients expanded (:func:`expand_basis`), as do the outputs.


def expand_basis(x: Any) -> Any:
    """``x`` (a Series, or lists/tuples of values) with first coefficients kept in a basis
    expanded to one row per direction."""
    return nested_map(x, _expand_one)


def _expand_one(x: Any) -> Any:
    if not isinstance(x, Series) or x.basis is None:
        return x
    c = x.coeffs[0]
    if c is None:
        return Series(x.primal, x.coeffs)
    if isinstance(c, UnitSeed):
        c = _materialize_one(Series(x.primal, [c])).coeffs[0]
    basis = x.basis
    full = (basis @ c.reshape(c.shape[0], -1)).reshape((basis.shape[0],) + tuple(c.shape[1:]))
    return Series(x.primal, [full] + x.coeffs[1:])


def common_basis(values: Any) -> tuple[Tensor | None, bool]:
    """The one basis of the Series among ``values`` that have a first coefficient, and whether
    they can stay in it (all in that basis, none with an expanded first coefficient)."""
    found: list[Tensor] = []
    full = False

    def visit(v: Any) -> Any:
        nonlocal full
        if isinstance(v, Series) and v.coeffs and v.coeffs[0] is not None:
            if v.basis is None:
                full = True
            elif not any(b is v.basis for b in found):
                found.append(v.basis)
        return v

    nested_map(list(values), visit)
    if not found:
        return None, True
    return found[0], len(found) == 1 and not full


def _with_basis(out: Any, basis: Tensor) -> Any:
    def put(v: Any) -> Any:
        if isinstance(v, Series):
            v.basis = basis
        return v

    return nested_map(out, put)


def basis_linear(rule: Callable[..., Any], bilinear: bool = False) -> Callable[..., Any]:
    """``rule`` for Series whose first coefficients are kept in one basis (NOTE [First-order
    basis]), for a rule linear in each coefficient separately that treats the leading
    (direction) dim as a batch; ``bilinear``: linear only while one operand carries
    coefficients (a matrix product). Anything else expands first."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        values = [*args, *kwargs.values()]
        basis, keep = common_basis(values)
        if basis is None:
            return rule(*args, **kwargs)
        if keep and bilinear:
            keep = sum(isinstance(v, Series) and v.nonzero() for v in values) <= 1
        if not keep:
            return rule(*expand_basis(args), **{k: expand_basis(v) for k, v in kwargs.items()})
        return _with_basis(rule(*args, **kwargs), basis)

    wrapped.unit_aware = getattr(rule, "unit_aware", False)  # type: ignore[attr-defined]
    wrapped.basis_aware = True  # type: ignore[attr-defined]
    return wrapped


def basis_aware(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a rule as handling Series with a first-order basis itself."""
    fn.basis_aware = True  # type: ignore[attr-defined]
    return fn


def plain_unit(c: Any) -> bool:
    """Is ``c`` a unit seed in the row-major order of its primal (one that reshapes keep)?"""
    return isinstance(c, UnitSeed) and not c.transposed


def unit_aware(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a rule as handling :class:`UnitSeed` coefficients itself."""
    fn.unit_aware = True  # type: ignore[attr-defined]
    return fn


def is_series(x: Any) -> bool:
    return isinstance(x, Series)


def primal(x: Any) -> Any:
    return x.primal if isinstance(x, Series) else x


def primals(x: Any) -> Any:
    """``x`` with every Series (also inside lists/tuples) replaced by its primal."""
    return nested_map(x, primal)


def has_series(x: Any) -> bool:
    return nested_any(x, is_series)


def term(x: Any, k: int) -> Any:
    """Coefficient ``k`` of ``x`` (``k = 0`` is the primal); constants have zero coefficients."""
    if k == 0:
        return primal(x)
    return x.coeffs[k - 1] if isinstance(x, Series) else None


def lift(c: Tensor, ndim: int) -> Tensor:
    """View a coefficient ``(B, *S)`` as ``(B, 1, ..., 1, *S)`` with ``ndim`` trailing dims.

    Needed wherever a coefficient broadcasts against a tensor of higher rank: the direction
    dimension must stay leading.
    """
    extra = ndim - (c.dim() - 1)
    if extra <= 0:
        return c
    return c.reshape(c.shape[:1] + (1,) * extra + c.shape[1:])


def add(a: Coeff, b: Coeff) -> Coeff:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def paired(a: Any, b: Any, fn: Callable[[Coeff, Coeff], Tensor]) -> list[Coeff]:
    """``fn(a_k, b_k)`` for ``k = 1..K`` for an op jointly linear in two operands (``None``
    for a constant's or zero coefficient; ``None`` out when both are)."""
    K = max(s.order for s in (a, b) if isinstance(s, Series))
    out: list[Coeff] = []
    for k in range(1, K + 1):
        ca = a.coeff(k) if isinstance(a, Series) else None
        cb = b.coeff(k) if isinstance(b, Series) else None
        out.append(None if ca is None and cb is None else fn(ca, cb))
    return out


def cauchy(
    a: Any, b: Any, k: int, mul: Callable[[Tensor, Tensor], Tensor]
) -> Coeff:
    """``sum_{i+j=k} mul(a_i, b_j)``: coefficient ``k`` of a bilinear op applied to two series.

    ``mul`` must broadcast a leading direction dimension; ``a_0``/``b_0`` have none.
    """
    out: Coeff = None
    for i in range(k + 1):
        ai, bj = term(a, i), term(b, k - i)
        if ai is None or bj is None or (i == 0 and k == 0):
            continue
        out = add(out, mul(ai, bj))
    return out


# Below this many elements in all, coefficients are concatenated so that a linear map runs
# once (per-call overhead dominates); above it each runs separately (the concatenation would
# be an extra pass over memory that costs more than the call it saves).
CONCAT_LIMIT = 1 << 16


def _physical_numel(t: Tensor) -> int:
    """Elements ``t`` occupies: under ``vmap`` (the batched fast path traces the rules under
    it) its logical size times the batch sizes."""
    fx = torch._C._functorch
    while fx.is_functorch_wrapped_tensor(t):
        t = fx.get_unwrapped(t)
    return t.numel()


def map_coeffs(x: Series, fn: Callable[[Tensor], Tensor]) -> list[Coeff]:
    """Apply a linear map (with the direction dim leading) to every coefficient."""
    present = [c for c in x.coeffs if c is not None]
    if not present:
        return [None] * x.order
    if len(present) == 1 or sum(_physical_numel(c) for c in present) > CONCAT_LIMIT:
        mapped = [fn(c) for c in present]
    else:
        sizes = [c.shape[0] for c in present]
        mapped = list(fn(torch.cat(present, 0)).split(sizes, 0))
    it = iter(mapped)
    return [None if c is None else next(it) for c in x.coeffs]


def zeros_like_coeff(p: Tensor, batch: int) -> Tensor:
    return p.new_zeros((batch,) + tuple(p.shape))


def batch_size(values: Sequence[Any]) -> int | None:
    for v in values:
        if isinstance(v, Series):
            for c in v.coeffs:
                if c is not None:
                    return int(c.shape[0])
    return None


def compose_unary(x: Series, scaled_derivs: Sequence[Coeff], y0: Tensor) -> Series:
    """Faà di Bruno for univariate series: ``y = g(x)`` from ``g^(j)(x_0) / j!``, ``j = 1..K``.

    ``y_k = sum_j g^(j)(x_0) / j! * [t^k] (x(t) - x_0)^j``; the powers of ``x(t) - x_0`` are
    built by repeated truncated Cauchy products, so the cost is ``O(K^3)`` elementwise products
    per node, independent of the input dimension.
    """
    basis = x.basis if x.coeffs and x.coeffs[0] is not None else None
    first: Coeff = None
    if basis is not None:  # c_1 stays in the basis; the higher terms need it expanded
        first = materialize(x).coeffs[0]
        x = expand_basis(x)
    K = x.order
    ndim = y0.dim()
    dx: list[Coeff] = [None]
    dx += [None if c is None else lift(c, ndim) for c in x.coeffs]
    out: list[Coeff] = [None] * (K + 1)
    power: list[Coeff] = list(dx)  # power[k] = [t^k] (x - x0)^j, currently j = 1
    for j in range(1, K + 1):
        if j > 1:
            new: list[Coeff] = [None] * (K + 1)
            for k in range(j, K + 1):
                acc: Coeff = None
                for i in range(j - 1, k):
                    p, q = power[i], dx[k - i]
                    if p is not None and q is not None:
                        acc = add(acc, p * q)
                new[k] = acc
            power = new
        g = scaled_derivs[j - 1]
        if g is None:  # g^(j) vanishes identically (piecewise-linear functions)
            continue
        for k in range(j, K + 1):
            pk = power[k]
            if basis is not None and k == 1:
                pk = lift(first, ndim)  # type: ignore[arg-type]
            if pk is not None:
                out[k] = add(out[k], g * pk)
    return Series(y0, out[1:], basis)
