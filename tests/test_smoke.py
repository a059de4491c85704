import torch

from tests._compare import assert_tree_close
from xafunc import xderiv


def test_third_derivative_of_cube_closed_form():
    x = torch.tensor([0.5, 2.0], dtype=torch.float64)
    d3 = xderiv(lambda x: x.pow(3).sum(), 3)(x)
    expected = torch.zeros(2, 2, 2, dtype=torch.float64)
    expected[0, 0, 0] = expected[1, 1, 1] = 6.0
    assert_tree_close(d3, expected)
