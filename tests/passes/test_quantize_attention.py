from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt.ir.qdq import qops
from fxopt.testing import assert_skipped, run_pass

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class Attention(nn.Module):
    """Two self-attention blocks (query, key, value projections, SDPA, output projection)."""

    def __init__(self, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList(nn.ModuleList(nn.Linear(width, width) for _ in range(4)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        for q, k, v, out in self.blocks:
            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)
            y = F.scaled_dot_product_attention(split(q(x)), split(k(x)), split(v(x)))
            x = x + out(y.transpose(1, 2).reshape(batch, tokens, width))
        return x


def _calibration(n: int = 3) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 16, 64, generator=generator),) for _ in range(n)]


def _quantized_inputs(gm: torch.fx.GraphModule) -> list[tuple[int, ...]]:
    """For each attention, which of its inputs come through a dequantize."""
    return [tuple(i for i, a in enumerate(n.args[:3]) if getattr(a, "target", None) == qops.dequantize_per_tensor)
            for n in gm.graph.nodes if n.target == SDPA]


def test_query_and_key_of_every_attention_are_quantized_within_budget() -> None:
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 16, 64)
    run = run_pass("quantize-attention", model, (x,), calibration=_calibration())
    assert run.record.applied == 2
    assert _quantized_inputs(run.after) == [(0, 1), (0, 1)]  # the value stays float
    error = run.assert_outputs_match(rtol=0.05)
    assert 0 < error  # int8 changed the outputs, within the budget
    for detail in run.record.details:
        assert detail["error"] <= 0.05


def test_static_scales_need_calibration() -> None:
    model, x = Attention().eval(), torch.randn(2, 16, 64)
    run = run_pass("quantize-attention", model, (x,))
    assert run.record.applied == 0
    assert_skipped(run, "calibration", code="needs-calibration")


def test_an_attention_over_budget_stays_float_and_says_why() -> None:
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 16, 64)
    with torch.no_grad():  # a few huge query values: one per-tensor scale leaves the rest a few codes
        model.blocks[1][0].bias[:2] = 300.0
    run = run_pass("quantize-attention(budget=0.005)", model, (x,), calibration=_calibration())
    assert run.record.applied < 2
    assert_skipped(run, "output error", code="over-budget")
    run.assert_outputs_match(rtol=0.005)


def test_budget_and_strategy_are_checked() -> None:
    from fxopt.errors import PassOptionError
    from fxopt.registry import resolve_passes

    with pytest.raises(PassOptionError, match="budget"):
        resolve_passes(["quantize-attention(budget=-1)"])
