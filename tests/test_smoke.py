import torch

from tests._compare import assert_tree_close
from xafunc import xderiv


def test_third_derivative_of_cube_closed_form():
    x = torch.tensor([0.5, 2.0], dtype=torch.float64)
    d3 = xderiv(lambda x: x.pow(3).sum(), 3)(x)
    expected = torch.zeros(2, 2, 2, dtype=torch.float64)
    expected[0, 0, 0] = expected[1, 1, 1] = 6.0
    assert_tree_close(d3, expected)


def test_a_fresh_process_traces_without_importing_torch_compiler():
    """NOTE [Tracer]: the README quick start's first calls, in a fresh process, run the engine
    (strict) -- forward and reverse schedules, ``vmap``, ``xlaplacian``, and torch's own
    decompositions of GELU, LayerNorm and softplus (NOTE [Decompositions without dynamo's
    guard]) -- without importing ``torch._dynamo`` (1-2 s of a first call: make_fx, fake
    tensors, Python meta kernels and torch.func's ``jacrev`` all import it), and equal nested
    jacrev."""
    import subprocess
    import sys

    script = """
import sys, torch
from torch.func import functional_call
import xafunc
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
params = dict(model.named_parameters())
f = lambda p, x: functional_call(model, p, (x,))
x = torch.randn(3)
with xafunc.strict():
    d3 = xafunc.xderiv(f, order=3, argnums=1)(params, x)
    xs = torch.randn(8, 3)
    hs = torch.vmap(xafunc.xhessian(f, argnums=1), in_dims=(None, 0))(params, xs)
    lap = torch.vmap(xafunc.xlaplacian(lambda x: f(params, x)))(xs)
    y, d1, d2 = xafunc.xderivs(f, 2, argnums=1)(params, x)
    # torch's reference decompositions (GELU, LayerNorm, softplus) without dynamo's guard
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.GELU(), torch.nn.LayerNorm(8),
                             torch.nn.Softplus(), torch.nn.Linear(8, 1))
    h2 = xafunc.xhessian(lambda x: m2(x).sum())(x)
assert "torch._dynamo" not in sys.modules, "the first call imported torch._dynamo"
torch.save({"d3": d3, "hs": hs, "lap": lap, "d2": d2, "h2": h2, "x": x, "xs": xs,
            "state": model.state_dict(), "state2": m2.state_dict()}, sys.argv[1])
"""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/out.pt"
        proc = subprocess.run([sys.executable, "-c", script, out], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = torch.load(out)
    from torch.func import functional_call, jacrev

    model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    model.load_state_dict(got["state"])
    f = lambda x: functional_call(model, dict(model.named_parameters()), (x,))  # noqa: E731
    assert_tree_close(got["d3"], jacrev(jacrev(jacrev(f)))(got["x"]).detach(), rtol=1e-4,
                      atol=1e-5)
    hs = torch.stack([jacrev(jacrev(f))(x).detach() for x in got["xs"]])
    assert_tree_close(got["hs"], hs, rtol=1e-4, atol=1e-5)
    assert_tree_close(got["lap"], hs.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-4, atol=1e-5)
    assert_tree_close(got["d2"], jacrev(jacrev(f))(got["x"]).detach(), rtol=1e-4, atol=1e-5)
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.GELU(), torch.nn.LayerNorm(8),
                             torch.nn.Softplus(), torch.nn.Linear(8, 1))
    m2.load_state_dict(got["state2"])
    h2 = jacrev(jacrev(lambda x: m2(x).sum()))(got["x"]).detach()  # order 2: jacrev is right
    assert_tree_close(got["h2"], h2, rtol=1e-4, atol=1e-5)
