"""Core helpers the Linear passes share: cost shapes, Linear parts (the lossy search and observer: test_lossy_search.py)."""

import pytest
import torch
from torch import nn

from fxopt.capture import capture
from fxopt.cost import (
    linear_shape_bytes,
    linear_shape_flops,
    linear_shape_params,
    low_rank_break_even,
)
from fxopt.ir import call_nodes, constant_users, insert_linear, linear_parts, ops


def test_linear_shape_costs() -> None:
    assert linear_shape_flops(rows=8, in_features=4, out_features=3) == 2 * 8 * 4 * 3
    assert linear_shape_params(4, 3) == 15 and linear_shape_params(4, 3, bias=False) == 12
    assert linear_shape_bytes(8, 4, 3, True, 4) == 4 * (32 + 15 + 24)
    assert low_rank_break_even(256, 256) == 128


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_linear_parts_and_tied_weights() -> None:
    torch.manual_seed(0)
    gm = capture(Tied().eval(), (torch.randn(2, 8),))
    first, second = (linear_parts(gm, n) for n in call_nodes(gm, ops.linear))
    assert first is not None and second is not None
    assert (first.in_features, first.out_features) == (8, 8)
    assert second.node in constant_users(gm, first.weight_node)
    assert constant_users(gm, first.bias_node) == [first.node]


def test_insert_linear_sets_shape_metadata() -> None:
    torch.manual_seed(0)
    gm = capture(nn.Linear(8, 4).eval(), (torch.randn(3, 5, 8),))
    (node,) = call_nodes(gm, ops.linear)
    new = insert_linear(gm, node.args[0], torch.randn(6, 8), None, "extra", before=node)
    assert tuple(new.meta["val"].shape) == (3, 5, 6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_sees_every_nan_and_infinity(bad: float, dtype: torch.dtype) -> None:
    from fxopt.ir import all_finite

    tensor = torch.randn(64, 33).to(dtype)
    assert all_finite(tensor, None, torch.arange(3))
    tensor[17, 5] = bad
    assert not all_finite(torch.ones(2), tensor)
