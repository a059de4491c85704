"""The model zoo: xafunc against torch.func on models as users write them (issue 11).

Shared by the asv classes in :mod:`benchmarks.bench_zoo` and by ``asv_bench/zoo_table.py``;
the shapes live in the framework-free :mod:`benchmarks.zoo_spec` (also read by the JAX and
torch-jet anchor scripts).

Two groups of cases:

* ``mlp_<request>_<formulation>``: one tanh MLP per request (Jacobian hourglass, wide in, wide
  out, Hessian, order 3, order 4), written in every formulation of
  :data:`~benchmarks.zoo_spec.FORMULATIONS` (``W @ x + b``, ``x @ W.T + b``, ``F.linear``,
  ``nn.Linear`` through ``functional_call`` and called directly, ``einsum``, ``addmv``,
  ``addmm``, batched ``matmul``/``bmm``/``baddbmm``, and per sample under ``vmap``). Within a
  request the weights are the same, so every formulation computes the same numbers.
* one case per other model (:data:`~benchmarks.zoo_spec.MODELS`): residual MLP, SIREN,
  Fourier-feature PINN, conv net, transformer block, unrolled LSTM and GRU cells, a coupling
  flow, a message-passing layer, per-sample Hessians and Laplacians under ``vmap``, a loss
  Hessian in a parameter dict, a biharmonic and a 6th-order jet.

Every strategy is a function of the case's arguments that calls its transform **inline**, as
users write it: ``xafunc.xderiv(f, 3)(x)`` and ``jacrev(jacrev(jacrev(f)))(x)`` inside the
call, no transform built once (``Built.held`` is the held xafunc transform, for diagnosis).
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.func as tf
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import xafunc

from .cases import _hvp_laplacian, _nested_jvp, _trace_last2, nesting_name, nestings
from .zoo_spec import FORMULATIONS, MLP_REQUESTS, MODELS, mlp_anchor

Levels = tuple[str, ...]  # innermost first, each "fwd" or "rev"


# --------------------------------------------------------------------------------------------
# deterministic parameters
# --------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * scale


def _module(factory: Callable[[], nn.Module], seed: int, dtype: torch.dtype,
            device: str) -> nn.Module:
    """``factory()`` with its default initialisation drawn from ``seed`` (the caller's RNG is
    left alone), moved to ``dtype``/``device``, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = factory()
    return m.to(dtype=dtype, device=device).eval()


def _mlp_layers(widths: Sequence[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(W, b)`` per layer, ``W ~ N(0, 1/fan_in)`` so tanh does not saturate (float32, CPU)."""
    gen = _gen(seed)
    return [(_randn(gen, o, i, scale=1 / math.sqrt(i)), _randn(gen, o, scale=0.1))
            for i, o in itertools.pairwise(widths)]


def _sequential(widths: Sequence[int], act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    mods: list[nn.Module] = []
    for j, (i, o) in enumerate(itertools.pairwise(widths)):
        mods.append(nn.Linear(i, o))
        if j < len(widths) - 2:
            mods.append(act())
    return nn.Sequential(*mods)


# --------------------------------------------------------------------------------------------
# the tanh MLP in every formulation
# --------------------------------------------------------------------------------------------


def _mlp_function(formulation: str, layers: list[tuple[torch.Tensor, torch.Tensor]]
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP of ``layers`` written as ``formulation`` (a function of one 1-D sample)."""
    last = len(layers) - 1
    if formulation in ("matmul", "bmm", "baddbmm"):
        def layer3(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if formulation == "matmul":
                return torch.matmul(h, w.T) + b
            if formulation == "bmm":
                return torch.bmm(h, w.T.unsqueeze(0)) + b
            return torch.baddbmm(b.view(1, 1, -1), h, w.T.unsqueeze(0))

        def mlp3(x: torch.Tensor) -> torch.Tensor:
            h = x.view(1, 1, -1)
            for i, (w, b) in enumerate(layers):
                h = layer3(h, w, b)
                if i != last:
                    h = torch.tanh(h)
            return h.reshape(-1)

        return mlp3

    layer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    if formulation in ("mv", "vmap"):
        def layer(h, w, b):  # noqa: E306
            return w @ h + b
    elif formulation == "xWT":
        def layer(h, w, b):
            return h @ w.T + b
    elif formulation == "linear":
        layer = F.linear
    elif formulation == "einsum":
        def layer(h, w, b):
            return torch.einsum("oi,i->o", w, h) + b
    elif formulation == "addmv":
        def layer(h, w, b):
            return torch.addmv(b, w, h)
    elif formulation == "addmm":
        def layer(h, w, b):
            return torch.addmm(b, h.unsqueeze(0), w.T).squeeze(0)
    else:
        raise ValueError(f"unknown formulation {formulation!r}")

    def mlp(x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (w, b) in enumerate(layers):
            h = layer(h, w, b)
            if i != last:
                h = torch.tanh(h)
        return h

    return mlp


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


@dataclass
class Model:
    """A function and its arguments: ``f(*args)`` for one sample, or for every sample under
    ``vmap(..., in_dims)`` when ``in_dims`` is set; ``argnums`` is differentiated."""

    f: Callable[..., Any]
    args: tuple
    argnums: int = 0
    in_dims: tuple | None = None


class ResMLP(nn.Module):
    def __init__(self, d_in: int, width: int, depth: int, d_out: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = h + torch.tanh(blk(h))
        return self.out(h)


class Siren(nn.Module):
    """SIREN (Sitzmann et al. 2020): ``sin(w0 * (W h + b))`` layers with their initialisation."""

    def __init__(self, widths: Sequence[int], w0: float) -> None:
        super().__init__()
        self.w0 = w0
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(widths))
        with torch.no_grad():
            for j, lin in enumerate(self.layers):
                n = lin.in_features
                bound = 1 / n if j == 0 else math.sqrt(6 / n) / w0
                lin.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for lin in self.layers[:-1]:
            h = torch.sin(self.w0 * lin(h))
        return self.layers[-1](h)


class FourierPINN(nn.Module):
    """Random Fourier features (Tancik et al. 2020) in front of a tanh MLP."""

    def __init__(self, d_in: int, n_freq: int, sigma: float, widths: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("B", torch.randn(n_freq, d_in) * sigma)
        self.mlp = _sequential((2 * n_freq, *widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 2 * math.pi * (x @ self.B.T)
        return self.mlp(torch.cat([torch.sin(z), torch.cos(z)], dim=-1))


class ConvNet(nn.Module):
    def __init__(self, image: Sequence[int], channels: Sequence[int], d_out: int) -> None:
        super().__init__()
        c, h, w = image
        self.conv1 = nn.Conv2d(c, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, stride=2, padding=1)
        self.fc = nn.Linear(channels[1] * ((h + 1) // 2) * ((w + 1) // 2), d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (C, H, W), one image
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return self.fc(h.flatten())


class TransformerBlock(nn.Module):
    """Pre-norm block: layer_norm, softmax self-attention, layer_norm, GELU MLP, residuals."""

    def __init__(self, d_model: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp)
        self.fc2 = nn.Linear(mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (tokens, d_model)
        t, d = x.shape
        dh = d // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(t, self.heads, dh).transpose(0, 1) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dh), dim=-1)
        x = x + self.proj((att @ v).transpose(0, 1).reshape(t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class UnrolledRNN(nn.Module):
    """``nn.LSTMCell`` / ``nn.GRUCell`` unrolled over the rows of ``x`` (steps, d_in)."""

    def __init__(self, cell: str, d_in: int, hidden: int, d_out: int | None) -> None:
        super().__init__()
        self.kind = cell
        self.cell = nn.LSTMCell(d_in, hidden) if cell == "lstm" else nn.GRUCell(d_in, hidden)
        self.head = nn.Linear(hidden, d_out) if d_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(self.cell.hidden_size)
        c = x.new_zeros(self.cell.hidden_size)
        for t in range(x.shape[0]):
            if self.kind == "lstm":
                h, c = self.cell(x[t], (h, c))
            else:
                h = self.cell(x[t], h)
        return self.head(h) if self.head is not None else h


class CouplingFlow(nn.Module):
    """log p(x) of one RealNVP affine coupling layer over a standard normal base."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.half = dim // 2
        self.net = nn.Linear(self.half, width)
        self.scale = nn.Linear(width, dim - self.half)
        self.shift = nn.Linear(width, dim - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (dim,) -> scalar
        x1, x2 = x[: self.half], x[self.half:]
        h = torch.tanh(self.net(x1))
        s = torch.tanh(self.scale(h))
        y2 = x2 * torch.exp(s) + self.shift(h)
        y = torch.cat([x1, y2])
        log_det = s.sum()
        return -0.5 * (y * y).sum() - 0.5 * y.numel() * math.log(2 * math.pi) + log_det


class MessagePassing(nn.Module):
    """One message-passing layer on a fixed random graph: messages from (source, target)
    features, summed per target with ``index_add``, mean by in-degree (``scatter_add``)."""

    def __init__(self, nodes: int, edges: int, features: int, hidden: int) -> None:
        super().__init__()
        gen = _gen(7)
        self.register_buffer("src", torch.randint(0, nodes, (edges,), generator=gen))
        self.register_buffer("dst", torch.randint(0, nodes, (edges,), generator=gen))
        self.msg = nn.Linear(2 * features, hidden)
        self.upd = nn.Linear(features + hidden, features)
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (nodes, features)
        m = torch.tanh(self.msg(torch.cat([x[self.src], x[self.dst]], dim=-1)))
        agg = x.new_zeros(x.shape[0], self.hidden).index_add(0, self.dst, m)
        ones = x.new_ones(self.dst.shape[0])
        deg = x.new_zeros(x.shape[0]).scatter_add(0, self.dst, ones).clamp(min=1)
        return torch.tanh(self.upd(torch.cat([x, agg / deg[:, None]], dim=-1)))


def _x(seed: int, *shape: int, dtype: torch.dtype, device: str, scale: float = 1.0
       ) -> torch.Tensor:
    return _randn(_gen(seed), *shape, scale=scale).to(dtype=dtype, device=device)


def _build_model(name: str, dtype: torch.dtype, device: str) -> Model:
    s = MODELS[name]
    batch = s.get("batch")

    def inputs(*shape: int, scale: float = 1.0) -> torch.Tensor:
        full = (batch, *shape) if batch else shape
        return _x(1, *full, dtype=dtype, device=device, scale=scale)

    dims = (0,) if batch else None
    if name == "resmlp":
        m = _module(lambda: ResMLP(s["d_in"], s["width"], s["depth"], s["d_out"]), 0, dtype,
                    device)
        return Model(m, (inputs(s["d_in"]),), in_dims=dims)
    if name == "siren":
        m = _module(lambda: Siren(s["widths"], s["w0"]), 0, dtype, device)
        return Model(m, (inputs(s["widths"][0], scale=0.5),), in_dims=dims)
    if name == "fourier_pinn":
        m = _module(lambda: FourierPINN(s["d_in"], s["n_freq"], s["sigma"], s["widths"]), 0,
                    dtype, device)
        return Model(m, (inputs(s["d_in"], scale=0.5),), in_dims=dims)
    if name == "convnet":
        m = _module(lambda: ConvNet(s["image"], s["channels"], s["d_out"]), 0, dtype, device)
        return Model(m, (inputs(*s["image"]),), in_dims=dims)
    if name == "transformer":
        m = _module(lambda: TransformerBlock(s["d_model"], s["heads"], s["mlp"]), 0, dtype,
                    device)
        return Model(m, (inputs(s["tokens"], s["d_model"]),), in_dims=dims)
    if name in ("lstm", "gru"):
        m = _module(lambda: UnrolledRNN(name, s["d_in"], s["hidden"], s.get("d_out")), 0,
                    dtype, device)
        return Model(m, (inputs(s["steps"], s["d_in"]),), in_dims=dims)
    if name == "flow":
        m = _module(lambda: CouplingFlow(s["dim"], s["width"]), 0, dtype, device)
        return Model(m, (inputs(s["dim"]),), in_dims=dims)
    if name == "mpnn":
        m = _module(lambda: MessagePassing(s["nodes"], s["edges"], s["features"], s["hidden"]),
                    0, dtype, device)
        return Model(m, (inputs(s["nodes"], s["features"]),), in_dims=dims)
    if name in ("vmap_hessians", "vmap_laplacian", "biharmonic"):
        m = _module(lambda: _sequential(s["widths"]), 0, dtype, device)
        return Model(m, (inputs(s["widths"][0]),), in_dims=dims)
    if name == "jet6":
        m = _module(lambda: _sequential(s["widths"]), 0, dtype, device)
        n = s["widths"][0]
        return Model(m, (inputs(n), _x(2, n, dtype=dtype, device=device)))
    if name == "param_hessian":
        m = _module(lambda: _sequential(s["widths"]), 0, dtype, device)
        params = {k: v.detach() for k, v in m.named_parameters()}
        xs = _x(1, s["n_data"], s["widths"][0], dtype=dtype, device=device)
        ys = _x(2, s["n_data"], s["widths"][-1], dtype=dtype, device=device)

        def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return ((tf.functional_call(m, p, (x,)) - y) ** 2).mean()

        return Model(loss, (params, xs, ys), argnums=0)
    raise ValueError(f"no builder for model {name!r}")


def _build_mlp(request: str, formulation: str, dtype: torch.dtype, device: str) -> Model:
    spec = MLP_REQUESTS[request]
    widths = spec["widths"]
    layers = [(w.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device))
              for w, b in _mlp_layers(widths)]
    if formulation == "vmap":
        x = _x(1, spec["vmap_batch"], widths[0], dtype=dtype, device=device)
        return Model(_mlp_function("mv", layers), (x,), in_dims=(0,))
    x = _x(1, widths[0], dtype=dtype, device=device)
    if formulation in ("functional_call", "module"):
        model = _module(lambda: _sequential(widths), 0, dtype, device)
        with torch.no_grad():
            for lin, (w, b) in zip(model[::2], layers, strict=True):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
        if formulation == "module":
            return Model(model, (x,))
        params = dict(model.named_parameters())

        def f(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return tf.functional_call(model, p, (x,))

        return Model(f, (params, x), argnums=1)
    return Model(_mlp_function(formulation, layers), (x,))


# --------------------------------------------------------------------------------------------
# strategies (every transform built inside the call)
# --------------------------------------------------------------------------------------------


def _nest(f: Callable[..., Any], levels: Levels, argnums: int) -> Callable[..., Any]:
    g = f
    for lvl in levels:
        g = (tf.jacrev if lvl == "rev" else tf.jacfwd)(g, argnums=argnums)
    return g


def _inline(make: Callable[[], Callable[..., Any]], in_dims: tuple | None
            ) -> Callable[..., Any]:
    """``(*args) -> make()(*args)``, under ``vmap(in_dims)`` when set: the transform is built
    inside every call, as users write ``jacrev(jacrev(f))(x)``."""
    if in_dims is None:
        def call(*args: Any) -> Any:
            return make()(*args)
    else:
        def call(*args: Any) -> Any:
            return tf.vmap(make(), in_dims=in_dims)(*args)
    return call


def _vname(name: str, in_dims: tuple | None) -> str:
    return f"vmap({name})" if in_dims is not None else name


def _numel(tree: Any) -> int:
    return sum(t.numel() for t in pytree.tree_leaves(tree))


def activation_bytes(f: Callable[..., Any], args: tuple, argnums: int) -> int:
    """Bytes autograd saves for one backward of ``f(*args)`` (weights and constants excluded)
    plus the output: the per-sample memory that every vmapped direction of a nesting
    repeats."""
    diff = pytree.tree_map(lambda t: t.detach().requires_grad_(), args[argnums])
    call_args = (*args[:argnums], diff, *args[argnums + 1:])
    inputs = {id(t) for t in pytree.tree_leaves(diff)}
    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (t.data_ptr(), t.numel())
        base = t if t._base is None else t._base
        weight = base.grad_fn is None and id(base) not in inputs  # a parameter, a constant
        if key not in seen and not weight:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = f(*call_args)
    return total + sum(t.numel() * t.element_size() for t in pytree.tree_leaves(out))


def _nest_multiplier(levels: Levels, n_in: int, n_out: int) -> int:
    """How many copies of the per-sample activations a nesting holds at once: each ``jacfwd``
    level vmaps over the ``n_in`` input directions, each ``jacrev`` level over every entry of
    the (already differentiated) output it sees."""
    mult, seen = 1, n_out
    for lvl in levels:
        mult *= seen if lvl == "rev" else n_in
        seen *= n_in
    return mult


@dataclass
class Built:
    """Everything one case needs, built fresh: see :meth:`ZooCase.build`."""

    args: tuple
    #: the xafunc call as users write it (transform built inside the call)
    xafunc: Callable[..., Any]
    #: the xafunc transform built once (diagnostic: capture cost vs. engine cost)
    held: Callable[..., Any]
    #: ``name -> inline call`` of every torch.func strategy worth trying
    baselines: dict[str, Callable[..., Any]]
    #: ``name -> estimated peak bytes`` (rough; a nesting above the budget is skipped)
    estimates: dict[str, int]
    #: the strategy torch.func's documentation suggests (asv's ``time_torchfunc``)
    recommended: str
    #: ``() -> xafunc.Plan`` for one sample, or None (Taylor-mode operators have no plan)
    plan: Callable[[], Any] | None = None
    #: maps xafunc's result onto what the baselines return (identity but for ``jet``)
    project: Callable[[Any], Any] = field(default=lambda r: r)
    #: the xafunc call with ``compile=True`` (inductor executor), inline like ``xafunc``
    xafunc_compile: Callable[..., Any] | None = None
    #: ``() -> xafunc.Plan`` of the ``compile=True`` call for one sample, or None
    plan_compile: Callable[[], Any] | None = None


@dataclass(frozen=True)
class ZooCase:
    """One model and one derivative request on it."""

    name: str
    title: str
    group: str  # "mlp" or "model"
    request: str  # "deriv", "laplacian", "biharmonic", "jet"
    order: int
    anchor: str  # the zoo_spec anchor (what the JAX / torch-jet scripts implement)
    sizes: str
    batch: int | None = None
    formulation: str | None = None
    mlp_request: str | None = None

    @property
    def label(self) -> str:
        b = f", vmap {self.batch}" if self.batch else ""
        form = f" [{self.formulation}]" if self.formulation else ""
        return f"{self.title} {self.sizes}{form}{b}"

    def model(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Model:
        if self.group == "mlp":
            assert self.mlp_request is not None and self.formulation is not None
            return _build_mlp(self.mlp_request, self.formulation, dtype, device)
        return _build_model(self.name, dtype, device)

    def build(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Built:
        """A fresh model (fixed seeds), its arguments, and every strategy as an inline call."""
        m = self.model(dtype, device)
        f, a, dims, k = m.f, m.argnums, m.in_dims, self.order
        sample = tuple(t[0] if d == 0 else t for t, d in zip(m.args, dims, strict=True)) \
            if dims else m.args
        if self.request == "jet":  # the arguments are (x, v); f takes x
            sample = sample[:1]
        batch = self.batch or 1
        n = _numel(sample[a])
        out = f(*sample)
        n_out = _numel(out)
        act = activation_bytes(f, sample, a)

        def est(levels: Levels) -> int:
            return batch * _nest_multiplier(levels, n, n_out) * 2 * act

        base: dict[str, Callable[..., Any]] = {}
        ests: dict[str, int] = {}

        def add(name: str, make: Callable[[], Callable[..., Any]], nbytes: int) -> None:
            key = _vname(name, dims)
            base[key] = _inline(make, dims)
            ests[key] = nbytes

        plan = None
        project: Callable[[Any], Any] = lambda r: r  # noqa: E731
        if self.request == "deriv":
            for levels in nestings(k):
                add(nesting_name(levels), lambda lv=levels: _nest(f, lv, a), est(levels))
            if k == 2:
                add("hessian", lambda: tf.hessian(f, argnums=a), est(("rev", "fwd")))
            make_x = lambda c=False: xafunc.xderiv(f, k, argnums=a, compile=c)  # noqa: E731
            plan = lambda c=False: xafunc.plan(f, k, argnums=a, compile=c)(*sample)  # noqa: E731
            rec = (("rev",) if n_out <= n else ("fwd",)) if k == 1 else \
                ("rev",) + ("fwd",) * (k - 1)
            recommended = _vname(nesting_name(rec), dims)
        elif self.request == "laplacian":
            add("trace(hessian)", lambda: lambda x: _trace_last2(tf.hessian(f)(x)),
                est(("rev", "fwd")))
            add("trace(jacrev(jacrev))",
                lambda: lambda x: _trace_last2(_nest(f, ("rev", "rev"), 0)(x)),
                est(("rev", "rev")))
            add("vmap(hvp)", lambda: _hvp_laplacian(f), est(("rev", "fwd")))
            make_x = lambda c=False: xafunc.xlaplacian(f, compile=c)  # noqa: E731
            recommended = _vname("vmap(hvp)", dims)
        elif self.request == "biharmonic":
            add("einsum(D4 by jacfwd^3(jacrev))",
                lambda: lambda x: torch.einsum(
                    "oiijj->o", _nest(f, ("rev", "fwd", "fwd", "fwd"), 0)(x)),
                est(("rev", "fwd", "fwd", "fwd")))
            add("vmap(hvp) of vmap(hvp)", lambda: _hvp_laplacian(_hvp_laplacian(f)),
                est(("rev", "fwd", "rev", "fwd")))
            make_x = lambda c=False: xafunc.xbiharmonic(f, compile=c)  # noqa: E731
            recommended = _vname("vmap(hvp) of vmap(hvp)", dims)
        elif self.request == "jet":
            add(f"jvp^{k}", lambda: _nested_jvp(f, k), 2**k * act)
            rest = (None,) * (k - 1)
            make_x = lambda c=False: lambda x, v: xafunc.jet(  # noqa: E731
                f, (x,), ((v, *rest),), compile=c)
            project = lambda r: r[1][-1]  # noqa: E731  (the k-th coefficient)
            recommended = f"jvp^{k}"
        else:
            raise ValueError(f"unknown request {self.request!r}")
        held = tf.vmap(make_x(), in_dims=dims) if dims else make_x()
        return Built(args=m.args, xafunc=_inline(make_x, dims), held=held, baselines=base,
                     estimates=ests, recommended=recommended, plan=plan, project=project,
                     xafunc_compile=_inline(lambda: make_x(True), dims),
                     plan_compile=None if plan is None else lambda: plan(True))


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------


def _sizes(widths: Sequence[int]) -> str:
    return "->".join(map(str, widths))


def _model_sizes(name: str) -> str:
    s = MODELS[name]
    if "widths" in s:
        return _sizes(s["widths"])
    return {
        "resmlp": lambda: f"{s['d_in']}->{s['width']}x{s['depth']}->{s['d_out']}",
        "fourier_pinn": lambda: f"{s['d_in']}->{2 * s['n_freq']}->" + _sizes(s["widths"]),
        "convnet": lambda: "x".join(map(str, s["image"])) + "->" + "->".join(
            f"{c}ch" for c in s["channels"]) + f"->{s['d_out']}",
        "transformer": lambda: f"{s['tokens']}x{s['d_model']}, {s['heads']} heads",
        "lstm": lambda: f"{s['steps']}x{s['d_in']}->{s['hidden']}->{s['d_out']}",
        "gru": lambda: f"{s['steps']}x{s['d_in']}->{s['hidden']}",
        "flow": lambda: f"{s['dim']}->{s['width']}->1",
        "mpnn": lambda: f"{s['nodes']}x{s['features']}, {s['edges']} edges",
    }[name]()


def _make_cases() -> list[ZooCase]:
    cases = []
    for req, spec in MLP_REQUESTS.items():
        for form in FORMULATIONS:
            cases.append(ZooCase(
                name=f"mlp_{req}_{form}", title=spec["title"], group="mlp", request="deriv",
                order=spec["order"], anchor=mlp_anchor(req, form), sizes=_sizes(spec["widths"]),
                batch=spec["vmap_batch"] if form == "vmap" else None, formulation=form,
                mlp_request=req))
    for name, spec in MODELS.items():
        cases.append(ZooCase(
            name=name, title=spec["title"], group="model", request=spec["request"],
            order=spec["order"], anchor=name, sizes=_model_sizes(name), batch=spec.get("batch")))
    return cases


ZOO: list[ZooCase] = _make_cases()
ZOO_BY_NAME: dict[str, ZooCase] = {c.name: c for c in ZOO}
MLP_CASES = [c.name for c in ZOO if c.group == "mlp"]
MODEL_CASES = [c.name for c in ZOO if c.group == "model"]


def select(patterns: str | None) -> list[ZooCase]:
    """Cases matching a comma-separated list of names, shell patterns (``mlp_hessian_*``,
    ``*_vmap``) or the groups ``mlp`` / ``models``; all cases for None. Unknown names raise."""
    if not patterns:
        return list(ZOO)
    chosen: list[str] = []
    for pat in (p.strip() for p in patterns.split(",") if p.strip()):
        hits = MLP_CASES if pat == "mlp" else MODEL_CASES if pat == "models" else \
            [n for n in ZOO_BY_NAME if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"no zoo case matches {pat!r}; cases: {', '.join(ZOO_BY_NAME)}")
        chosen += [h for h in hits if h not in chosen]
    return [ZOO_BY_NAME[n] for n in chosen]
