"""Every spelling of a Linear becomes one ``aten.linear`` (with its bias folded in)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir import aten, count_ops, ops


class FalconLinear(nn.Linear):
    """transformers' FalconLinear: ``input @ self.weight.T`` plus the bias."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        hidden_states = input @ self.weight.T
        if self.bias is None:
            return hidden_states
        return hidden_states + self.bias


class Spellings(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.weight = nn.Parameter(torch.randn(6, 8))
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        y = {
            "numpy_T": lambda: x @ w.T,
            "mT": lambda: x @ w.mT,
            "matmul": lambda: torch.matmul(x, w.T),
            "t": lambda: x @ w.t(),
            "transpose": lambda: x @ w.transpose(0, 1),
        }[self.spelling]()
        return torch.relu(y)


@pytest.mark.parametrize("spelling", ["numpy_T", "mT", "matmul", "t", "transpose"])
@pytest.mark.parametrize("rank", [2, 3])
def test_matmul_by_transposed_constant_becomes_linear(spelling: str, rank: int) -> None:
    model = Spellings(spelling).eval()
    x = torch.randn(4, 8) if rank == 2 else torch.randn(2, 4, 8)
    gm = fxopt.capture(model, (x,))
    assert count_ops(gm, ops.linear) == 1
    assert count_ops(gm, ops.matmul, ops.mm, aten.numpy_T.default, aten.mT.default, ops.t) == 0
    torch.testing.assert_close(gm(x)[0], model(x))


@pytest.mark.parametrize("bias_first", [False, True])
def test_bias_add_folds_into_the_linear(bias_first: bool) -> None:
    class AddsBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = FalconLinear(8, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bias_first:
                return self.fc.bias + x @ self.fc.weight.T
            return self.fc(x)

    model = AddsBias().eval()
    x = torch.randn(3, 5, 8)
    gm = fxopt.capture(model, (x,))
    linear = next(n for n in gm.graph.nodes if n.target == ops.linear)
    assert len(linear.args) == 3 and linear.args[2] is not None
    assert count_ops(gm, ops.add) == 0
    torch.testing.assert_close(gm(x)[0], model(x))


class AddsWhatIsNotABias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8))
        self.table = nn.Parameter(torch.randn(4, 6))  # 2-D: not a bias

    def forward(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return (y + self.table) + (x @ self.weight.T + extra)  # a constant of the wrong shape; an input


def test_adds_that_are_not_a_bias_stay() -> None:
    model = AddsWhatIsNotABias().eval()
    x, extra = torch.randn(4, 8), torch.randn(4, 6)
    gm = fxopt.capture(model, (x, extra))
    assert count_ops(gm, ops.linear) == 2
    assert all(len(n.args) == 2 or n.args[2] is None for n in gm.graph.nodes if n.target == ops.linear)
    assert count_ops(gm, ops.add) == 3
    torch.testing.assert_close(gm(x, extra)[0], model(x, extra))


def test_falcon_style_linears_are_seen_by_passes() -> None:
    model = nn.Sequential(FalconLinear(8, 16), nn.ReLU(), FalconLinear(16, 16), FalconLinear(16, 4)).eval()
    x = torch.randn(4, 8)
    opt = fxopt.compile(model, (x,), passes=["merge-consecutive"])
    assert opt.report["merge-consecutive"].applied == 1
    assert count_ops(opt.graph_module, ops.linear) == 2
    torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)
