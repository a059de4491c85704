"""Argument errors (type, message naming transform / argument / bad value), functions the engine
may not capture (they must still give the right numbers), and chunk_size."""

from __future__ import annotations

import re

import pytest
import torch

import xafunc
from tests._compare import assert_tree_close, reference_deriv
from xafunc import xderiv, xderivs, xhessian, xjacobian

F64 = torch.float64
MODES = ["auto", "forward", "reverse", "reference"]


def f2(x, y):
    return (x * y).sin().sum()


X = torch.tensor([0.3, -0.8], dtype=F64)
Y = torch.tensor([1.2, 0.4], dtype=F64)


# Every transform, called the same way: build(func, order=None, **kw) -> the transform.
TRANSFORMS = {
    "xderiv": lambda func, order=2, **kw: xderiv(func, order, **kw),
    "xjacobian": lambda func, order=None, **kw: xjacobian(func, **kw),
    "xhessian": lambda func, order=None, **kw: xhessian(func, **kw),
    "xderivs": lambda func, order=2, **kw: xderivs(func, order, **kw),
    "plan": lambda func, order=2, **kw: xafunc.plan(func, order, **kw),
}
ORDER_TRANSFORMS = {"xderiv": xderiv, "xderivs": xderivs, "plan": xafunc.plan}


def m(*parts: str) -> str:
    """A regex that finds ``parts`` in this order, anything in between (escaped literally)."""
    return ".*".join(re.escape(p) for p in parts)


# --------------------------------------------------------------------------------------------
# checked when the transform is built
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ORDER_TRANSFORMS))
@pytest.mark.parametrize("order,exc,shown", [
    (0, ValueError, "got 0"),
    (-1, ValueError, "got -1"),
    (1.5, TypeError, "got 1.5"),
    ("2", TypeError, "got '2'"),
    (None, TypeError, "got None"),
    (True, TypeError, "got True"),
    (2.0, TypeError, "got 2.0"),
    (torch.tensor(2), TypeError, "got tensor(2)"),
])
def test_bad_order(name, order, exc, shown):
    with pytest.raises(exc, match=m(f"{name}:", "order", shown)):
        ORDER_TRANSFORMS[name](f2, order)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("argnums,shown", [
    (1.0, "1.0"), ([0], "[0]"), ("0", "'0'"), ((0, "a"), "'a'"), (True, "True"),
    ((0, 1.0), "1.0"), (None, "None"), ((0, None), "None"),
])
def test_bad_argnums_type(name, argnums, shown):
    with pytest.raises(TypeError, match=m(f"{name}:", "argnums", shown)):
        TRANSFORMS[name](f2, argnums=argnums)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_empty_argnums(name):
    with pytest.raises(ValueError, match=m(f"{name}:", "argnums", "empty")):
        TRANSFORMS[name](f2, argnums=())


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("func,shown", [(3, "3"), (None, "None"), ("sin", "'sin'"),
                                        (torch.ones(2), "tensor")])
def test_func_not_callable(name, func, shown):
    with pytest.raises(TypeError, match=m(f"{name}:", "func", "callable", shown)):
        TRANSFORMS[name](func)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("chunk,exc,shown", [
    (0, ValueError, "got 0"), (-1, ValueError, "got -1"), (1.5, TypeError, "got 1.5"),
    ("2", TypeError, "got '2'"), (True, TypeError, "got True"),
])
def test_bad_chunk_size(name, chunk, exc, shown):
    with pytest.raises(exc, match=m(f"{name}:", "chunk_size", shown)):
        TRANSFORMS[name](f2, chunk_size=chunk)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("mode", ["sideways", "Forward", "", None, "rev", 1])
def test_unknown_mode(name, mode):
    with pytest.raises(ValueError, match=m(f"{name}:", "mode", repr(mode))):
        TRANSFORMS[name](f2, mode=mode)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("has_aux", [1, "yes", None])
def test_has_aux_not_bool(name, has_aux):
    with pytest.raises(TypeError, match=m(f"{name}:", "has_aux", repr(has_aux))):
        TRANSFORMS[name](f2, has_aux=has_aux)


def test_valid_builds_do_not_raise():
    for mode in MODES:
        for chunk in (None, 1, 7):
            xderiv(f2, 3, argnums=(0, -1), mode=mode, chunk_size=chunk)


# --------------------------------------------------------------------------------------------
# checked when the transform is called
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("argnums", [2, -3, (0, 2), (5,), 100])
def test_argnums_out_of_range(name, argnums):
    t = TRANSFORMS[name](f2, argnums=argnums)
    with pytest.raises(ValueError, match=m(f"{name}:", f"argnums={argnums!r}", "range")):
        t(X, Y)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_no_positional_arguments(name):
    t = TRANSFORMS[name](lambda x=X: x.sin().sum())
    with pytest.raises(ValueError, match=m(f"{name}:", "argnums=0", "passed none",
                                           "positionally")):
        t(x=X)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("argnums", [(0, 0), (1, -1), (0, 1, 0), (-2, 0)])
def test_argnums_duplicated(name, argnums):
    t = TRANSFORMS[name](f2, argnums=argnums)
    with pytest.raises(ValueError, match=m(f"{name}:", f"argnums={argnums!r}", "duplicate")):
        t(X, Y)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("bad,shown", [
    (torch.tensor([1, 2]), "torch.int64"),
    (torch.tensor([1, 2], dtype=torch.int32), "torch.int32"),
    (torch.tensor([True, False]), "torch.bool"),
    (torch.tensor([1.0 + 1j, 2.0]), "torch.complex64"),
])
def test_non_float_tensor_at_differentiated_position(name, bad, shown):
    t = TRANSFORMS[name](f2, argnums=1)
    with pytest.raises(TypeError, match=m(f"{name}:", "argument 1", "dtype", shown)):
        t(X, bad)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensor_at_differentiated_position(name, layout):
    dense = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    bad = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    t = TRANSFORMS[name](lambda x, y: (x * y.to_dense()).sum(), argnums=1)
    with pytest.raises(TypeError, match=m(f"{name}:", "argument 1", str(bad.layout),
                                          "to_dense")):
        t(dense, bad)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensor_given_to_taylor_transforms(layout):
    dense = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    bad = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    for taylor in (xafunc.xlaplacian, xafunc.xbiharmonic):
        with pytest.raises(TypeError, match=m(taylor.__name__, str(bad.layout), "to_dense")):
            taylor(lambda x: x.to_dense().sin().sum())(bad)
    with pytest.raises(TypeError, match=m("jet", "primals[0]", str(bad.layout), "to_dense")):
        xafunc.jet(lambda x: x.to_dense().sin(), (bad,), ((bad,),))


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("bad,shown", [(1.5, "float (1.5)"), ("abc", "str ('abc')"),
                                       (3, "int (3)"), ([1.0, 2.0], "float (1.0)")])
def test_non_tensor_at_differentiated_position(name, bad, shown):
    t = TRANSFORMS[name](f2, argnums=1)
    with pytest.raises(TypeError, match=m(f"{name}:", "argument 1", shown)):
        t(X, bad)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_integer_tensor_inside_differentiated_dict(name):
    t = TRANSFORMS[name](lambda p: p["w"].sum() * 2.0)
    with pytest.raises(TypeError, match=m(f"{name}:", "argument 0", "torch.int64")):
        t({"w": torch.tensor([1, 2])})


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_differentiated_argument_without_tensors(name):
    t = TRANSFORMS[name](lambda p, x: x.sum(), argnums=0)
    with pytest.raises(ValueError, match=m(f"{name}:", "argument 0", "no tensors")):
        t({}, X)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("out,shown", [
    (1.5, "float (1.5)"), ([1.0, 2.0], "float (1.0)"), (None, "NoneType (None)"),
    ("y", "str ('y')"), ((torch.ones(1, dtype=F64), 2.0), "float (2.0)"),
])
def test_output_not_tensors(name, out, shown):
    t = TRANSFORMS[name](lambda x: out)
    with pytest.raises(TypeError, match=m(f"{name}:", "func", "return", shown)):
        t(X)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_integer_output_tensor(name, dtype):
    t = TRANSFORMS[name](lambda x: (x * 10).to(dtype))
    with pytest.raises(TypeError, match=m(f"{name}:", "func", "dtype", str(dtype))):
        t(X)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("out,shown", [(lambda x: x.sin(), "Tensor"),
                                       (lambda x: [x.sin(), x], "list"),
                                       (lambda x: (x.sin(), x, x), "tuple")])
def test_has_aux_with_non_pair_output(name, out, shown):
    t = TRANSFORMS[name](out, has_aux=True)
    with pytest.raises(TypeError, match=m(f"{name}:", "has_aux=True", "tuple", shown)):
        t(X)


# --------------------------------------------------------------------------------------------
# functions the engine may not capture: still the right numbers
# --------------------------------------------------------------------------------------------


def branchy(x):
    if x.sum() > 0:
        return torch.sin(x) * x.prod()
    return torch.cos(x).exp()


def inplace_intermediate(x):
    y = x.clone()
    y.mul_(2)
    y.add_(x.sin())
    z = torch.zeros_like(x)
    z.copy_(y.tanh())
    z[0] = x[0] * x[1]  # setitem on an intermediate
    z.add_(x.cos()).exp_()
    return z


def value_dependent_loop(x):
    n = 1 + int(x.detach().abs().sum() * 2)  # 2..: depends on the value, not the shape
    y = x
    for _ in range(n):
        y = torch.tanh(y * 1.3 + 0.1)
    return y


def item_dependent_scale(x):
    s = float(x.detach().max())
    return (x * s).sin()


UNCAPTURABLE = {
    "branchy": branchy,
    "inplace_intermediate": inplace_intermediate,
    "value_dependent_loop": value_dependent_loop,
    "item_dependent_scale": item_dependent_scale,
}


@pytest.mark.fallback
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("fname", list(UNCAPTURABLE))
def test_uncapturable_functions_give_right_numbers(fname, order, mode):
    f = UNCAPTURABLE[fname]
    plan = xafunc.plan(f, order, mode=mode)(torch.tensor([0.3, 0.5, -0.1], dtype=F64))
    if fname == "inplace_intermediate":  # in-place ops on intermediates are functionalized
        assert plan.strategy == ("reference" if mode == "reference" else "engine")
    else:  # Python decides from tensor values: nothing sound to capture
        assert plan.strategy == "reference"
        if mode != "reference":
            assert "depends on the values of a traced tensor" in plan.fallback
    g = xderiv(f, order, mode=mode)  # one transform, reused: a cached plan must not go stale
    for x in (torch.tensor([0.3, 0.5, -0.1], dtype=F64),
              torch.tensor([-0.3, -0.5, 0.1], dtype=F64),   # other branch, same signature
              torch.tensor([0.9, 1.4, -0.2], dtype=F64),    # more loop iterations
              torch.tensor([0.3, 0.5, -0.1], dtype=F64)):   # back to the first
        assert_tree_close(g(x), reference_deriv(f, order)(x), msg=f"{fname} at {x.tolist()}")


def test_branch_on_non_tensor_argument():
    def f(x, flag):
        return x.sin() if flag else x.cos() * x

    g = xderiv(f, 2)
    for flag in (True, False, True):
        assert_tree_close(g(X, flag), reference_deriv(f, 2)(X, flag))


# --------------------------------------------------------------------------------------------
# chunk_size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_chunk_size_gives_same_numbers(order, mode):
    w = torch.tensor([[0.5, -1.0, 0.2], [0.3, 0.8, -0.6]], dtype=F64)

    def f(x):
        return torch.tanh(w @ x.sin()) * x[:2].exp()

    x = torch.tensor([0.2, -0.4, 0.7], dtype=F64)
    expected = reference_deriv(f, order)(x)
    for chunk in ((None, 1, 2, 1000) if order < 3 else (1, 2)):
        assert_tree_close(xderiv(f, order, chunk_size=chunk, mode=mode)(x), expected,
                          msg=f"chunk_size={chunk}")


def test_output_without_tensors_is_a_clear_error():
    with pytest.raises(ValueError, match=r"xderiv: func returned no tensors"):
        xderiv(lambda x: (), 1)(torch.ones(2, dtype=torch.float64))
