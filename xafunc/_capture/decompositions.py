"""The decomposition table capture traces with: composite operators into a small core set.

NOTE [What the table keeps and what it expands]
PyTorch's ``core_aten_decompositions`` is written for compilers, not for Taylor propagation, and
some of its entries are harmful here:

* Matrix products must reach the engine as matrix products. The table turns ``mv`` into
  ``(W * x).sum(1)`` (and ``dot``/``vdot`` likewise): propagated along ``B`` directions the
  broadcast product materialises a ``(B, m, n)`` tensor per coefficient where a GEMM gives
  ``(B, m)``, 50-80x slower for ``torch.tanh(W @ x + b)`` than for ``F.linear``. ``mv``,
  ``dot``, ``vdot``, ``addr`` and ``baddbmm`` are therefore popped and have native rules in
  :mod:`xafunc._rules.bilinear`, as ``mm``, ``addmm``, ``bmm`` and ``addmv`` (never in the
  table) do. ``matmul``, ``einsum``, ``tensordot``, ``linear`` and ``inner`` stay: they expand
  into those products plus views. ``outer``/``ger`` are composite in C++ and expand to a
  broadcast multiply, which costs exactly the product's ``m * n`` multiplies.
* ``hardswish``/``hardsigmoid`` are decomposed by torch into clamps whose kinks (inclusive)
  differ from torch's own backward formulas, and ``elu``/``celu``/``selu`` into a ``where``
  whose higher derivatives at 0 differ from ``elu_double_backward``; they get decompositions
  that reproduce torch's formulas at every order (:func:`_hardswish`, :func:`_hardsigmoid`,
  :func:`_elu`).
* The recurrent cells (``rnn_tanh_cell``, ``rnn_relu_cell``, ``gru_cell``, ``lstm_cell``) are
  composite in C++ and update a product of the (constant) hidden-state weights *in place* with
  a traced tensor (``linear(hx, w_hh, b_hh).add_(linear(input, w_ih, b_ih))``); functionalize
  then asserts ("mutating a non-functional tensor with a functional tensor"). They are
  replaced by the same formulas written without in-place operators.
* ``cdist`` picks between a matrix-product formula and ``_cdist_forward``, neither of which can
  be differentiated beyond first order by torch (``_cdist_backward`` has no derivative). Both
  are replaced by differences and norms with torch's first-order convention at coincident
  points (zero derivative where the distance is zero).
* ``rrelu`` in eval mode is ``leaky_relu`` with slope ``(lower + upper) / 2``
  (``rrelu_with_noise_backward``); the C++ composite would route it through the mutating
  ``rrelu_with_noise`` instead.
* Zeros, poles and tails: torch's ``xlogy``/``xlog1py``/``entr``/``binary_cross_entropy``
  decompositions mask or clamp with a ``where`` that drops derivatives torch's own formulas
  keep, ``log_ndtr``/``sinc``/the Bessel functions evaluate branches whose unselected side is
  infinite (NaN in a reverse level) or cancels, ``std``/``vector_norm``/``nll_loss`` divide by
  a zero torch's backward masks. Each has a decomposition that reproduces torch's
  derivative formulas (the functions' docstrings say how), checked at those points in every
  schedule (tests/test_rules_exact.py, ``KINKS``).
* Reductions and scans of a 0-d tensor run on its 1-element vector (their rules need a
  dimension), and the saved statistics of layer and batch norm are detached (torch's
  autograd leaves them non-differentiable).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree


def _rnn_cell(nonlinearity: Any) -> Any:
    def cell(input: Any, hx: Any, w_ih: Any, w_hh: Any, b_ih: Any = None, b_hh: Any = None
             ) -> Any:
        return nonlinearity(F.linear(hx, w_hh, b_hh) + F.linear(input, w_ih, b_ih))

    return cell


def _gru_cell(input: Any, hx: Any, w_ih: Any, w_hh: Any, b_ih: Any = None, b_hh: Any = None
              ) -> Any:
    # aten/src/ATen/native/RNN.cpp, GRUCell (CPU path)
    ir, iz, in_ = F.linear(input, w_ih, b_ih).chunk(3, 1)
    hr, hz, hn = F.linear(hx, w_hh, b_hh).chunk(3, 1)
    reset = torch.sigmoid(hr + ir)
    update = torch.sigmoid(hz + iz)
    new = torch.tanh(in_ + hn * reset)
    return (hx - new) * update + new


def _lstm_cell(input: Any, hx: Any, w_ih: Any, w_hh: Any, b_ih: Any = None, b_hh: Any = None
               ) -> Any:
    # aten/src/ATen/native/RNN.cpp, LSTMCell (CPU path)
    h, c = hx[0], hx[1]
    gates = F.linear(h, w_hh, b_hh) + F.linear(input, w_ih, b_ih)
    i, f, g, o = gates.chunk(4, 1)
    cy = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    hy = torch.sigmoid(o) * torch.tanh(cy)
    return hy, cy


def _rrelu_with_noise(x: Any, noise: Any, lower: float = 0.125, upper: float = 1.0 / 3.0,
                     training: bool = False, generator: Any = None) -> Any:
    if training:  # a random slope per entry: traced as it is (the noise is drawn per call)
        return NotImplemented
    # eval: leaky_relu with the mean slope, and ``noise`` is not touched (rrelu_with_noise)
    return torch.ops.aten.leaky_relu(x, (lower + upper) / 2)


def _hardsigmoid(x: Any) -> Any:
    """hardsigmoid_backward: slope 1/6 on the open interval ``-3 < x < 3`` only (derivatives.
    yaml); every higher derivative zero. Values as the kernel, ``(x + 3) / 6`` inside."""
    inside = (x > -3) & (x < 3)
    return torch.where(inside, (x + 3) / 6, (x >= 3).to(x.dtype))


def _hardswish(x: Any) -> Any:
    """hardswish_backward (the CPU kernel): ``0`` for ``x <= -3``, ``x / 3 + 1/2`` for
    ``-3 < x < 3``, ``1`` from 3 on; its own derivative ``1/3`` on the open interval only
    (derivatives.yaml). The middle piece is used on the open interval only."""
    inside = (x > -3) & (x < 3)
    return torch.where(inside, x * (x + 3) / 6, torch.where(x >= 3, x, 0.0))


def _elu(x: Any, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> Any:
    """elu_backward (``is_result=False``) takes the negative branch at ``x = 0``, slope
    ``alpha * scale * input_scale``; its derivative (elu_double_backward) masks with
    ``x < 0``, so every higher derivative is 0 there. At ``x = 0`` the value 0 is therefore
    continued by that line (zero curvature). The negative branch sees ``x`` only where it is
    taken (0 elsewhere): ``expm1`` of a large positive ``x`` is ``inf``, and a derivative of
    the ``where`` would multiply that by the zero it routes to the branch not taken (NaN,
    where ``elu_backward`` gives the positive branch's 0)."""
    negcoef = alpha * scale
    zero = x == 0
    xn = torch.where(x > 0, 0.0, x) * input_scale
    # expm1's value, exp's derivatives: torch differentiates expm1 as ``result + 1``, which
    # cancels for negative x (every derivative 0 from x = -40 in float64), where its elu
    # kernels use exp; ``e - e.detach()`` is 0 in value and exp(x) in every derivative
    e = torch.exp(xn)
    smooth = torch.expm1(xn.detach()) + (e - e.detach())
    neg = torch.where(zero, xn * negcoef, smooth * negcoef)
    return torch.where(x > 0, x * scale, neg)


def _celu(x: Any, alpha: float = 1.0) -> Any:
    return _elu(x, alpha, 1.0, 1.0 / alpha)


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _selu(x: Any) -> Any:
    return _elu(x, _SELU_ALPHA, _SELU_SCALE)


def _safe_root(s: Any, root: Any) -> Any:
    """``root(s)`` for ``s >= 0`` with value and every derivative zero where ``s == 0``
    (``_cdist_backward`` returns 0 for coincident points)."""
    zero = s == 0
    return torch.where(zero, 0.0, root(torch.where(zero, 1.0, s)))


def _zeros(size: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
           pin_memory: Any = None) -> Any:
    """A dense zero tensor for autograd's ``_efficientzerotensor`` (the double backward of
    ``sgn``/``abs``, ...): torch's ZeroTensor met by the tracer's operators under ``vmap``
    crashed the process (segmentation fault) tracing a second reverse level."""
    return torch.zeros(size, dtype=dtype, layout=layout, device=device)


def _log_sigmoid_backward(grad_output: Any, self: Any, buffer: Any) -> Any:
    """``grad * sigmoid(-x)``: its derivative is log_sigmoid_double_backward's. torch's
    decomposition, ``grad * (max_deriv - sign * z / (1 + z))`` with ``z = exp(-|x|)``, has a
    zero derivative at ``x = 0`` (``sign(0) = 0``) where torch's is -1/4 (NOTE [Smooth
    functions written with kinks])."""
    return grad_output * torch.sigmoid(-self)


def _softplus_backward(grad_output: Any, self: Any, beta: float, threshold: float) -> Any:
    """softplus_backward's value (the smooth branch unless ``beta x > threshold``) with
    softplus_double_backward's derivative (curvature only where ``beta x < threshold``)."""
    z = self * beta
    s = torch.sigmoid(z)
    s = torch.where(z < threshold, s, s.detach())
    return torch.where(z > threshold, grad_output, grad_output * s)


def _reduce(loss: Any, reduction: int) -> Any:
    # torch/_decomp/decompositions.py apply_loss_reduction (0 none, 1 mean, 2 sum)
    return loss.mean() if reduction == 1 else loss.sum() if reduction == 2 else loss


def _huber_loss(input: Any, target: Any, reduction: int = 1, delta: float = 1.0) -> Any:
    """torch's decomposition squares ``|d|``, whose second derivative at ``d = 0`` is then
    ``2 sign(0)^2 = 0``; this one squares ``d``. huber_loss_backward takes the quadratic
    branch on the closed interval ``|d| <= delta`` (its double backward too), so does this."""
    d = input - target
    z = d.abs()
    return _reduce(torch.where(z <= delta, 0.5 * d * d, delta * (z - 0.5 * delta)), reduction)


def _smooth_l1_loss(input: Any, target: Any, reduction: int = 1, beta: float = 1.0) -> Any:
    """As :func:`_huber_loss` (``d * d``, not ``|d|^2``). smooth_l1_loss_double_backward keeps
    curvature on the open interval ``|d| < beta`` only, as torch's decomposition's branch."""
    d = input - target
    z = d.abs()
    if beta == 0:
        return _reduce(z, reduction)
    return _reduce(torch.where(z < beta, 0.5 * d * d / beta, z - 0.5 * beta), reduction)


def _std(x: Any, dim: Any = None, *, correction: Any = None, keepdim: bool = False) -> Any:
    """``sqrt(var)`` with value and every derivative zero where the variance is zero, as
    std_backward (``masked_fill_(result == 0, 0)``); torch's decomposition gave NaN there."""
    return _safe_root(torch.var(x, dim, correction=correction, keepdim=keepdim), torch.sqrt)


def _std_mean(x: Any, dim: Any = None, *, correction: Any = None, keepdim: bool = False
              ) -> Any:
    var, mean = torch.var_mean(x, dim, correction=correction, keepdim=keepdim)
    return _safe_root(var, torch.sqrt), mean


def _branches(select: Any, x: Any, inside: Any, outside: Any, at_in: float,
              at_out: float) -> Any:
    """``where(select, inside(x), outside(x))`` with each branch reading ``x`` masked to where
    it is selected (``at_in``/``at_out`` elsewhere), so that an unselected branch -- a pole,
    an overflow, a cancelling quotient -- neither reaches the value nor sends ``0 * inf`` into
    a reverse level."""
    return torch.where(select, inside(torch.where(select, x, at_in)),
                       outside(torch.where(select, at_out, x)))


def _series(coeffs: list[float], z: Any) -> Any:
    """``sum_k coeffs[k] z^k`` by Horner's rule."""
    out = z * coeffs[-1] + coeffs[-2]
    for c in reversed(coeffs[:-2]):
        out = out * z + c
    return out


_SINC_SERIES = [(-1) ** k / math.factorial(2 * k + 1) for k in range(16)]


def _sinc(x: Any) -> Any:
    """``sin(u) / u`` at ``u = pi x``, and its series ``sum_k (-u^2)^k / (2k + 1)!`` (to
    ``u^30``: the derivatives of its remainder to order 10 stay below 1e-16) where ``|u| < 2``,
    where the quotient's higher derivatives cancel (order 7 at ``u = 0.14``: 6e-5 off by the
    quotient's Taylor rule, 8e-7 by torch's nested ``jvp``, 1e-15 by the series). Below
    ``|u| = 2`` the series' terms stay below its value's magnitude (no cancellation in the
    value); with the switch at ``|u| = 1`` the quotient's derivatives just above it were off,
    over ``|x| <= 1`` and against the largest value, by 4 600 float64 epsilons at order 6 and
    1.6e7 at order 10 (2 200 and 3.2e7 in float32), now 56 and 17 000 (69 and 22 000). torch's
    decomposition, ``where(u == 0, 1, sin(u) / u)``, has every derivative 0 at 0, and torch's
    own backward formula is 0 / 0 there (NaN from the second derivative on); the true second
    derivative is ``-pi^2 / 3``."""
    u = x * math.pi
    return _branches(u.abs() < 2.0, u, lambda v: _series(_SINC_SERIES, v * v),
                     lambda v: torch.sin(v) / v, 0.0, 1.0)


#: Cephes' float32 ``tanhf``: ``tanh(a) = a + a^3 P(a^2)`` for ``a < 0.625`` (``P`` by
#: ascending powers)
_TANHF_P = [-3.33332819422e-1, 1.33314422036e-1, -5.37397155531e-2, 2.06390887954e-2,
            -5.70498872745e-3]


def tanhf(x: Any) -> Any:
    """float32 ``tanh`` as Cephes computes it (within 1.2 float32 epsilons; NOTE [Inductor's
    tanh]): with ``a = |x|``, ``a + a^3 P(a^2)`` below 0.625, else ``1 - 2 / (exp(2a) + 1)``,
    each branch on a masked input, then the sign of ``x`` (also for ``-0.0``, which the sum
    would turn into ``+0.0``). ``x``: a tensor, or an FX proxy to write it into a graph."""
    def near(a: Any) -> Any:
        z = a * a
        return a + a * z * _series(_TANHF_P, z)

    def far(a: Any) -> Any:
        return 1.0 - 2.0 / (torch.exp(2.0 * a) + 1.0)

    a = x.abs()
    return aten.copysign.Tensor(_branches(a < 0.625, a, near, far, 0.0, 1.0), x)


def _float_pair(a: Any, b: Any) -> tuple[Any, Any]:
    """Two operands, either a Python number, as tensors of their promoted floating dtype."""
    like = a if isinstance(a, torch.Tensor) else b
    dtype = torch.result_type(a, b)
    if not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.get_default_dtype()

    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v if v.dtype == dtype else v.to(dtype)
        return torch.scalar_tensor(v, dtype=dtype, device=like.device)

    return cast(a), cast(b)


def _x_log(log: Any, pole: float) -> Any:
    """``xlogy`` (``log``, pole 0) or ``xlog1py`` (``log1p``, pole -1): ``a * log(b)``, 0
    where ``a == 0``, with the derivatives of torch's formulas (derivatives.yaml): ``log(b)``
    for ``a``, masked where ``a == 0`` and ``b`` is at or below the pole, and ``a / b`` for
    ``b``. torch's decomposition, ``where(a == 0, 0, a * log(b))``, has every derivative 0
    where ``a == 0``: the second derivative of ``xlogy(x, x + 1)`` at 0 came out 0 where it
    is 2. Where ``a == 0`` and ``b`` is infinite the value is 0 and the derivative in ``a``
    0 (torch's: infinite)."""

    def x_log(a: Any, b: Any) -> Any:
        a, b = _float_pair(a, b)
        zero = a == 0
        masked = zero & ((b <= pole) | (b == math.inf))
        return a * log(torch.where(masked, pole + 1.0, b))

    return x_log


def _logit(x: Any, eps: float | None = None) -> Any:
    """``logit`` as ``log(x) - log1p(-x)`` on torch's clamp to ``[eps, 1 - eps]``. torch's
    decomposition, ``log(x / (1 - x))``, differentiates to ``inf / inf``, NaN, at ``x = 1``
    where torch's derivative (``1 / (x (1 - x))``) is infinite; this one's is ``1 + inf``."""
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if eps is not None:
        x = torch.where(x < eps, eps, torch.where(x > 1 - eps, 1 - eps, x))
    return torch.log(x) - torch.log1p(-x)


def _log_ndtr(x: Any) -> Any:
    """torch's decomposition (``log(erfcx(-t) / 2) - t^2`` below 1, ``log1p(-erfc(t) / 2)``
    above, ``t = x / sqrt(2)``), each branch on a masked input: at ``x = -40`` the unselected
    branch is ``log1p(-1)``, whose infinite derivative times the zero a reverse level sends
    it was NaN."""
    def below(t: Any) -> Any:
        return torch.log(torch.special.erfcx(-t) / 2) - t * t

    def above(t: Any) -> Any:
        return torch.log1p(-torch.erfc(t) / 2)

    return _branches(x < 1.0, x * 0.7071067811865476, below, above, 0.0, 1.0)


def _bessel(op: Any, n: int, scaled: bool) -> Any:
    """``I_n(x)`` (``n`` 0 or 1; ``scaled``: times ``exp(-|x|)``) as its power series
    ``(x/2)^n sum_m (x^2/4)^m / (m! (m+n)!)`` (20 terms) where ``|x| < 2`` and torch's
    operator elsewhere, each on a masked input. torch's derivative formulas divide by ``x``
    (``i1' = i0 - i1 / x``) and cancel near 0: at ``x = 1e-8`` torch's and the nested-``jvp``
    third derivative of ``i0`` were wrong in the first digit, at ``1e-4`` the fourth of
    ``i1`` by 3000%; the series' derivatives are exact to rounding. ``exp(-|x|)`` keeps
    torch's convention at 0 (``sgn(0) = 0``)."""
    coeffs = [1.0 / (math.factorial(m) * math.factorial(m + n)) for m in range(20)]

    def series(x: Any) -> Any:
        out = _series(coeffs, x * x * 0.25)
        if n == 1:
            out = out * (x * 0.5)
        return out * torch.exp(-x.abs()) if scaled else out

    def bessel(x: Any) -> Any:
        return _branches(x.abs() < 2.0, x, series, op, 0.0, 2.0)

    return bessel


# binary_cross_entropy's epsilons: a float in its backward kernel (Loss.cpp), a double in its
# double backward (FunctionsManual.cpp)
_BCE_EPS_FLOAT = 9.999999960041972e-13
_BCE_EPS = 1e-12


def _binary_cross_entropy(p: Any, y: Any, weight: Any = None, reduction: int = 1) -> Any:
    """torch's value (logarithms clamped at -100) with the derivatives of torch's formulas:
    ``(p - y) / max(p (1 - p), eps)`` (binary_cross_entropy_backward), then ``Q''`` with
    ``Q'' = (p^2 - 2py + y) / ((p + eps)^2 (1 - p + eps)^2)`` (its double backward) and
    that formula's derivatives. Written ``v(p^) + T1(p^) u + Q(p) - Q(p^) - Q'(p^) u`` with
    ``p^ = p.detach()``, ``u = p - p^``, ``Q`` in closed form (partial fractions). Every term
    is finite on ``[0, 1]``: torch's decomposition, ``max(log p, -100)``, differentiated
    ``log`` at a probability of exactly 0 or 1 -- a saturated sigmoid in float32 -- and the
    whole gradient came out NaN where torch's is finite."""
    dtype = p.dtype
    low = dtype in (torch.float16, torch.bfloat16)
    if low:  # in float32, as torch's decomposition (pw_cast_for_opmath)
        p, y = p.float(), y.float()
        weight = weight.float() if weight is not None else None
    e = _BCE_EPS
    fixed = p.detach()
    u = p - fixed
    s = 1 + 2 * e
    A, C, G = (e * e + y * s) / (s * s), ((1 - y) * s + e * e) / (s * s), 2 * e * (1 + e) / s**3

    def q(x: Any) -> Any:
        a, b = x + e, (1 - x) + e
        return -A * torch.log(a) - C * torch.log(b) - G * (a * torch.log(a) - a) \
            - G * (b * torch.log(b) - b)

    def dq(x: Any) -> Any:
        a, b = x + e, (1 - x) + e
        return -A / a + C / b - G * (torch.log(a) - torch.log(b))

    value = (y - 1) * torch.clamp_min(torch.log1p(-fixed), -100) \
        - y * torch.clamp_min(torch.log(fixed), -100)
    slope = (fixed - y) / torch.clamp_min(fixed * (1 - fixed), _BCE_EPS_FLOAT)
    loss = value + slope * u + (q(p) - q(fixed)) - dq(fixed) * u
    if weight is not None:
        loss = loss * weight
    loss = loss.mean() if reduction == 1 else loss.sum() if reduction == 2 else loss
    return loss.to(dtype) if low else loss


def _nll_loss(torch_decomposition: Any) -> Any:
    """``nll_loss``/``nll_loss2d`` forward with the mean over no counted target (every target
    ``ignore_index``, all weights 0) NaN in value, as torch's, but with zero derivatives, as
    nll_loss_backward's: torch's decomposition divides by the zero total weight, and the
    whole gradient of a padding-only batch came out NaN."""

    def nll(x: Any, target: Any, weight: Any, reduction: int, ignore_index: int) -> Any:
        if reduction != 1:
            return torch_decomposition(x, target, weight, reduction, ignore_index)
        total, count = torch_decomposition(x, target, weight, 2, ignore_index)
        empty = count == 0
        mean = total / torch.where(empty, 1.0, count)
        return torch.where(empty, math.nan, mean), count

    return nll


def _multilabel_margin_loss_forward(input: Any, target: Any, reduction: int) -> Any:
    """torch's decomposition with the target slots after the first ``-1`` masked: torch's
    (torch/_decomp/decompositions.py) gathers ``input[0]`` into those slots and keeps their
    hinge terms, so its value and every derivative were wrong whenever a target row is
    padded with ``-1`` and those terms are positive (the eager kernel ignores them)."""
    shape = target.shape
    input, target = torch.atleast_2d(input), torch.atleast_2d(target)
    dim = input.shape[1]
    idx = torch.arange(dim, device=target.device)
    end = torch.amin(torch.where(target == -1, idx, dim), dim=-1, keepdim=True)
    counted = idx < end
    u = torch.gather(input, -1, torch.where(counted, target, 0))
    is_target = torch.any(idx == torch.where(counted, target, -1).unsqueeze(-1), dim=1)
    z = (1.0 - u.T.unsqueeze(-1) + input).clamp_min(0) / dim
    z = torch.where(is_target | ~counted.T.unsqueeze(-1), 0, z)
    if reduction == 1:
        z = z.sum(dim=(0, -1)).mean()
    elif reduction == 2:
        z = z.sum()
    else:
        z = z.sum(dim=(0, -1))
    return z, is_target.to(input.dtype).reshape(shape)


def _as_strided(x: Any, size: Any, stride: Any, storage_offset: Any = None) -> Any:
    """``as_strided`` that lays a contiguous tensor out contiguously again -- a reshape, as
    torch's CPU ``group_norm`` decomposition writes one (``w.contiguous().as_strided([N, C],
    [C, 1])``) -- is that reshape; any other view is recorded as it is (no rule: the
    request falls back)."""
    size, stride = list(size), list(stride)
    expected, step = [], 1
    for n in reversed(size):
        expected.append(step)
        step *= max(int(n), 1)
    expected.reverse()
    contiguous_layout = all(s == e for n, s, e in zip(size, stride, expected) if n != 1)
    if (x.is_contiguous() and contiguous_layout and math.prod(size) == x.numel()
            and storage_offset in (None, x.storage_offset())):
        return x.reshape(size)
    return NotImplemented


def _cdist_direct(x1: Any, x2: Any, p: float) -> Any:
    """``cdist`` from the differences ``x1_i - x2_j``, with the first derivatives of
    ``_cdist_backward`` (aten/src/ATen/native/cpu/DistanceOpsKernel.cpp) at coincident points
    and ties: zero where the distance is zero; for ``p < 1`` zero where a coordinate
    difference is zero; for ``p = inf`` every coordinate attaining the maximum gets its full
    sign (not a share)."""
    diff = x1.unsqueeze(-2) - x2.unsqueeze(-3)
    if p == 0:
        return (diff != 0).to(x1.dtype).sum(-1)
    if math.isinf(p):
        a = diff.abs()
        dist = a.amax(-1)
        ties = (a == dist.unsqueeze(-1)).to(x1.dtype)
        through = (a * ties).sum(-1)  # the derivative _cdist_backward takes at ties
        return dist.detach() + (through - through.detach())
    return _p_norm(diff, p, [-1])


def _p_norm(x: Any, p: float, dims: Any, keepdim: bool = False) -> Any:
    """``sum(|x|^p) ** (1 / p)`` over ``dims`` (``0 < p < inf``) with torch's derivatives
    (``norm_backward``, ``_cdist_backward``): value and every derivative zero where the norm
    is zero, and for ``p < 1`` a zero derivative at zero entries (``|x|^(p - 1)`` masked)."""
    if p == 1:
        return x.abs().sum(dims, keepdim=keepdim)
    if p == 2:
        return _safe_root((x * x).sum(dims, keepdim=keepdim), torch.sqrt)
    if p < 1:
        zero = x == 0
        powed = torch.where(zero, 0.0, torch.where(zero, 1.0, x).abs() ** p)
    else:
        powed = x.abs() ** p
    return _safe_root(powed.sum(dims, keepdim=keepdim), lambda s: s ** (1.0 / p))


def _pdist_forward(x: Any, p: float = 2.0) -> Any:
    """``pdist``: the distances of the pairs ``i < j``, with ``cdist``'s conventions at
    coincident points and ties (both backward kernels share them)."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    return _cdist_direct(x[i].unsqueeze(1), x[j].unsqueeze(1), p).reshape(-1)


def _vector_norm(torch_decomposition: Any) -> Any:
    """The ``p``-norm, ``0 < p < inf``, with value and every derivative zero at the zero
    vector, as torch's ``norm_backward`` (``masked_fill_(norm == 0, 0)``) has them; torch's
    decomposition, ``sum(|x|^p) ** (1 / p)``, gives NaN there (the 2-norm from the third
    derivative on: ``F.normalize`` of a zero row; the 3-norm from the first). For ``p < 1``
    a zero entry has a zero derivative (torch masks ``|x|^(p - 1)`` there). ``p`` 0 or
    infinite and complex tensors: torch's decomposition."""

    def norm(x: Any, ord: Any = 2, dim: Any = None, keepdim: bool = False, *,
             dtype: Any = None) -> Any:
        p = float(ord)
        if not 0 < p < math.inf or x.is_complex():
            return torch_decomposition(x, ord, dim, keepdim, dtype=dtype)
        if dtype is not None:
            x = x.to(dtype)
        dims = list(range(x.dim())) if dim is None or len(dim) == 0 else dim
        return _p_norm(x, p, dims, keepdim)

    return norm


def _cdist_forward(x1: Any, x2: Any, p: float, compute_mode: Any = None) -> Any:
    return _cdist_direct(x1, x2, p)


def _euclidean_dist(x1: Any, x2: Any) -> Any:
    """``cdist``'s matrix-product path (p = 2, more than 25 rows): ``|x1|^2 + |x2|^2 - 2 x1
    x2^T`` clamped at 0, with a zero derivative where that is 0 (_euclidean_dist_backward
    masks ``res == 0``)."""
    sq = (x1 * x1).sum(-1, keepdim=True) + (x2 * x2).sum(-1).unsqueeze(-2) \
        - 2 * (x1 @ x2.transpose(-1, -2))
    nonpos = sq <= 0
    return torch.where(nonpos, 0.0, torch.sqrt(torch.where(nonpos, 1.0, sq)))


def _bilinear(input1: Any, input2: Any, weight: Any, bias: Any = None) -> Any:
    out = torch.einsum("...i,oij,...j->...o", input1, weight, input2)
    return out if bias is None else out + bias


# NOTE [Recurrent cells at capture]
# ``rnn_tanh_cell`` & co. and the whole-sequence ``rnn_tanh``/``gru``/``lstm`` are
# CompositeImplicitAutograd: tracing (NOTE [Tracer]) sees them expanded in C++ before any
# decomposition table is consulted (torch's own Python versions of the sequence ops, registered
# in the table and at that dispatch key, only run under the Python dispatcher, which tracing
# does not enable). Their C++ kernels update ``linear(hx, w_hh, b_hh)`` in place with the traced
# ``linear(input, ...)``; when ``hx`` and the weights are constants of the trace (a closed-over
# hidden state, a module's weights), functionalize then asserts ("mutating a non-functional
# tensor with a functional tensor"). :func:`capture_overrides` is a ``TorchFunctionMode`` that
# capture enters around tracing: it sends the cells to the formulas of RNN.cpp written without
# in-place updates, and the sequence ops to torch's own decompositions of them
# (torch/_decomp/decompositions.py). ``bilinear`` (C++ composite: ``_trilinear``, which has no
# rule) is sent to its einsum. Nothing else is touched.
_REPLACED: dict[Any, Any] = {
    torch.rnn_tanh_cell: _rnn_cell(torch.tanh),
    torch.rnn_relu_cell: _rnn_cell(torch.relu),
    torch.gru_cell: _gru_cell,
    torch.lstm_cell: _lstm_cell,
    torch.bilinear: _bilinear,
}
# sequence op -> (overload of the padded-input form, of the packed form, position of the
# argument that is a list only in the padded form)
_SEQUENCES: dict[Any, tuple[str, int]] = {
    torch.rnn_tanh: ("rnn_tanh", 2),
    torch.rnn_relu: ("rnn_relu", 2),
    torch.gru: ("gru", 2),
    torch.lstm: ("lstm", 1),
}


def _sequence_impl(func: Any, args: Any) -> Any:
    name, pos = _SEQUENCES[func]
    packet = getattr(torch.ops.aten, name)
    overload = packet.input if isinstance(args[pos], (list, tuple)) else packet.data
    from torch._decomp import decomposition_table as registered

    return registered[overload]


class _CaptureOverrides(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        impl = _REPLACED.get(func)
        if impl is None and func in _SEQUENCES:
            # without oneDNN: on CPU torch's ``lstm`` decomposition otherwise emits the fused
            # ``mkldnn_rnn_layer``, which has no derivative rule
            enabled = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
            try:
                return _sequence_impl(func, args)(*args, **(kwargs or {}))
            finally:
                torch._C._set_mkldnn_enabled(enabled)
        return (impl or func)(*args, **(kwargs or {}))


def capture_overrides() -> TorchFunctionMode:
    """The context tracing runs in (see NOTE [Recurrent cells at capture])."""
    return _CaptureOverrides()


def _addbmm(input: Any, batch1: Any, batch2: Any, *, beta: Any = 1, alpha: Any = 1) -> Any:
    # torch has no decomposition; the sum of the batch's products (beta = 0 ignores input)
    out = torch.bmm(batch1, batch2).sum(0)
    out = out if alpha == 1 else out * alpha
    return out if beta == 0 else out + (input if beta == 1 else input * beta)


def _scalar_as_vector(fn: Any) -> Any:
    """``fn`` on a 0-d tensor as on its 1-element vector (outputs back to 0-d): the rules of
    reductions and scans along a dimension read a dimension a 0-d tensor lacks (``x.max()``,
    ``x.logsumexp(0)`` of a scalar raised IndexError)."""

    def run(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() != 0:
            return fn(x, *args, **kwargs)
        out = fn(x.reshape(1), *args, **kwargs)
        return pytree.tree_map(lambda t: t.reshape(()) if isinstance(t, torch.Tensor) else t,
                               out)

    return run


aten = torch.ops.aten
# operators along a dimension whose rules need one (see :func:`_scalar_as_vector`), and
# ``flip``, which torch's own ``vmap`` cannot batch on a 0-d tensor
_SCALAR_AS_VECTOR = (
    aten.amax.default, aten.amin.default, aten.aminmax.default, aten.max.default,
    aten.max.dim, aten.min.default, aten.min.dim, aten.median.default, aten.median.dim,
    aten.nanmedian.default, aten.nanmedian.dim, aten.mode.default, aten.cummax.default,
    aten.cummin.default, aten.prod.dim_int, aten.var.correction, aten.var_mean.correction,
    aten.sort.default, aten.sort.stable, aten.topk.default, aten.kthvalue.default,
    aten.flip.default,
)


def _detach_outputs(fn: Any, kept: int) -> Any:
    """``fn`` with its outputs from ``kept`` on detached: the saved statistics of layer and
    batch norm (``mean``, ``rstd``, new running statistics), which torch's autograd leaves
    non-differentiable (their derivative formulas read ``grad`` alone; ``native_group_norm``'s
    read ``grads[1]``, ``grads[2]`` and are differentiable), so that their derivatives are
    zero as in torch, not those of the formulas that compute them."""

    def run(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        return tuple(o if i < kept or not isinstance(o, torch.Tensor) else o.detach()
                     for i, o in enumerate(out))

    return run


# operator -> how many leading outputs are differentiable (see :func:`_detach_outputs`)
_DIFFERENTIABLE_OUTPUTS = {
    aten.native_layer_norm.default: 1, aten.native_batch_norm.default: 1,
    aten._native_batch_norm_legit.default: 1, aten._native_batch_norm_legit.no_stats: 1,
    aten._native_batch_norm_legit_no_training.default: 1,
    aten._native_batch_norm_legit_functional.default: 1,
}


def _decompositions() -> dict[Any, Any]:
    from torch._decomp import _core_aten_decompositions_post_autograd, get_decompositions

    # ``core_aten_decompositions()`` adds an entry for every CompositeImplicitAutograd op, each
    # the op's own C++ decomposition, which tracing applies anyway; building them costs 0.4 s
    # of the first call
    table = dict(_core_aten_decompositions_post_autograd())
    table.update(get_decompositions([
        aten._softmax, aten._log_softmax, aten.gelu, aten.silu, aten.elu,
        aten.native_layer_norm, aten.native_batch_norm, aten._native_batch_norm_legit,
        aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit_functional,
        aten.nll_loss_forward, aten.mse_loss, aten.logsumexp, aten.mish,
        aten.celu, aten.selu, aten.glu, aten.huber_loss, aten.smooth_l1_loss,
        aten.binary_cross_entropy, aten.binary_cross_entropy_with_logits, aten.std,
        aten.linalg_vector_norm, aten.addcmul, aten.addcdiv, aten.lerp, aten.xlogy,
        aten.logit, aten.soft_margin_loss, aten.kl_div,
        aten.native_group_norm, aten.frac, aten.dist,
    ]))
    # ``detach`` has a meaning (a zero-derivative rule) and random operators must run as eager
    # code runs them (see NOTE [Capture])
    for op in (aten.detach.default, aten.bernoulli.default, aten.native_dropout.default):
        table.pop(op, None)
    # our rules are simpler than these decompositions (which reach for prims)
    for op in (aten.var.correction, aten.var_mean.correction, aten.prod.dim_int,
               aten.prod.default, aten.mean.dim, aten.mean.default, aten.sum.default):
        table.pop(op, None)
    # matrix products and kinks with native rules: see NOTE [What the table keeps and what it
    # expands]
    for op in (aten.mv.default, aten.dot.default, aten.vdot.default, aten.addr.default,
               aten.baddbmm.default):
        table.pop(op, None)
    # smooth functions decomposed into kinks: rules (NOTE [Smooth functions written with
    # kinks])
    for op in (aten.softplus.default, aten.log_sigmoid_forward.default,
               aten.special_entr.default):
        table.pop(op, None)
    table.update({
        aten.hardswish.default: _hardswish,
        aten.hardsigmoid.default: _hardsigmoid,
        aten.elu.default: _elu,
        aten.celu.default: _celu,
        aten.selu.default: _selu,
        aten.rrelu_with_noise.default: _rrelu_with_noise,
        aten._cdist_forward.default: _cdist_forward,
        aten._pdist_forward.default: _pdist_forward,
        aten._euclidean_dist.default: _euclidean_dist,
        aten.addbmm.default: _addbmm,
        aten._efficientzerotensor.default: _zeros,
        aten.log_sigmoid_backward.default: _log_sigmoid_backward,
        aten.softplus_backward.default: _softplus_backward,
        aten.huber_loss.default: _huber_loss,
        aten.smooth_l1_loss.default: _smooth_l1_loss,
        aten.std.correction: _std,
        aten.std_mean.correction: _std_mean,
        aten.sinc.default: _sinc,
        aten.special_log_ndtr.default: _log_ndtr,
        aten.logit.default: _logit,
        aten.as_strided.default: _as_strided,
        aten.multilabel_margin_loss_forward.default: _multilabel_margin_loss_forward,
        aten.binary_cross_entropy.default: _binary_cross_entropy,
        aten.i0.default: _bessel(aten.i0.default, 0, False),
        aten.special_i0e.default: _bessel(aten.special_i0e.default, 0, True),
        aten.special_i1.default: _bessel(aten.special_i1.default, 1, False),
        aten.special_i1e.default: _bessel(aten.special_i1e.default, 1, True),
        aten.xlogy.Tensor: _x_log(torch.log, 0.0),
        aten.xlogy.Scalar_Self: _x_log(torch.log, 0.0),
        aten.xlogy.Scalar_Other: _x_log(torch.log, 0.0),
        aten.special_xlog1py.default: _x_log(torch.log1p, -1.0),
        aten.special_xlog1py.self_scalar: _x_log(torch.log1p, -1.0),
        aten.special_xlog1py.other_scalar: _x_log(torch.log1p, -1.0),
        aten.linalg_vector_norm.default: _vector_norm(table[aten.linalg_vector_norm.default]),
        aten.nll_loss_forward.default: _nll_loss(table[aten.nll_loss_forward.default]),
        aten.nll_loss2d_forward.default: _nll_loss(table[aten.nll_loss2d_forward.default]),
    })
    for op in _SCALAR_AS_VECTOR:
        table[op] = _scalar_as_vector(table.get(op, op))
    for op, kept in _DIFFERENTIABLE_OUTPUTS.items():
        table[op] = _detach_outputs(table[op], kept)
    out: dict[Any, Any] = {}
    for key, fn in table.items():
        op = cast(Any, key)
        if not getattr(getattr(op, "_schema", None), "is_mutable", False):
            out[op] = _unguarded(fn)
            continue
        # an in-place operator's wrapper is what writes the result into ``self`` (see NOTE
        # [Decompositions without dynamo's guard]): with a functional twin in the table, the
        # twin without the guard and a copy into ``self`` (torch's ``register_inplace``);
        # otherwise the wrapped decomposition as registered
        name = op.overloadpacket.__name__
        twin = getattr(getattr(aten, name[:-1], None), op._overloadname, None) \
            if name.endswith("_") and not name.endswith("__") else None
        out[op] = _in_place(_unguarded(table[twin])) if twin in table else fn
    return out


def _in_place(functional: Any) -> Any:
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.copy_(functional(self, *args, **kwargs))

    return run


# NOTE [Decompositions without dynamo's guard]
# Many of torch's reference decompositions (``torch._refs``: gelu, softplus, logsumexp, lerp,
# addcmul, frac, ...) sit under wrappers -- ``out=`` handling, Python-scalar arguments, type
# promotion and upcasting of half precision -- one of which is ``torch._disable_dynamo``, which
# imports ``torch._dynamo`` on its first call (1-2 s of a first call, NOTE [Tracer]). When the
# tensor arguments are all float32 or all float64 and there is no ``out=``, none of those
# wrappers changes anything (nothing to promote, cast, upcast or copy), so the decomposition's
# own body runs; any other call goes through the wrappers as torch registered them. Never for
# an operator that writes to an argument: the wrapper of an in-place variant (``lerp_``,
# ``addcmul_``, ``elu_``, ``tril_``, ``zero_``, ...) is what copies the out-of-place body's
# result into ``self``; stripped, ``x.lerp_(y, w)`` left ``x`` as it was, and every derivative
# through it was silently wrong.
_PLAIN_FLOATS = (torch.float32, torch.float64)


def _unguarded(fn: Any) -> Any:
    body = fn
    while getattr(body, "__wrapped__", None) is not None:
        body = body.__wrapped__
    if body is fn:
        return fn

    def run(*args: Any, **kwargs: Any) -> Any:
        dtypes = {t.dtype for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        if kwargs.get("out") is None and len(dtypes) == 1 and dtypes <= set(_PLAIN_FLOATS):
            return body(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


_DECOMP: dict[Any, Any] | None = None


def decomposition_table() -> dict[Any, Any]:
    global _DECOMP
    if _DECOMP is None:
        _DECOMP = _decompositions()
    return _DECOMP
