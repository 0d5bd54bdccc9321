from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt.capture import capture
from fxopt.ir import copy_graph_module, ops
from fxopt.ir.qdq import qops
from fxopt.quant import static_scale
from fxopt.registry import resolve_passes
from fxopt.report import Report
from fxopt.session import Session, SessionOptions
from fxopt.testing import assert_skipped, run_pass
from fxopt.verify import compare_outputs, run_graph

LAYER_NORM = torch.ops.aten.layer_norm.default
INT8_STATIC = "quantize-int8(activations='static', observer='percentile')"


class Block(nn.Module):
    """A post-LayerNorm transformer block's residual stream: two residual sums, each into a
    LayerNorm; the first LayerNorm's output feeds a Linear and the next residual sum."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.mix, self.out = nn.Linear(width, width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x + self.out(torch.tanh(self.mix(x))))
        return self.norm2(h + self.down(F.gelu(self.up(h))))


def _batches(n: int = 4) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(2, 16, 64, generator=generator)] for _ in range(n)]


def _run(passes: list[str], budget_model: nn.Module | None = None):
    torch.manual_seed(0)
    model = budget_model or Block().eval()
    batches = _batches()
    gm = capture(model, tuple(batches[0]))
    session = Session.from_graph(copy_graph_module(gm), batches, Report(), options=SessionOptions(strict=True))
    return model, batches, session.run(resolve_passes(passes))


def _norm_inputs(gm: torch.fx.GraphModule) -> list[object]:
    return [n.args[0].target for n in gm.graph.nodes if n.target == LAYER_NORM]


def test_every_layer_norm_reads_an_int8_sum_and_the_residual_reads_the_linears_int8_input() -> None:
    model, batches, stage = _run([INT8_STATIC, "quantize-residual"])
    record = stage.records[-1]
    assert record.applied == 2
    gm = stage.gm
    assert _norm_inputs(gm) == [qops.dequantize_per_tensor] * 2
    norm1 = next(n for n in gm.graph.nodes if n.target == LAYER_NORM)
    quantize = next(u for u in norm1.users if u.target == qops.quantize_per_tensor)
    (shared,) = quantize.users
    residual = next(u for u in shared.users if u.target == ops.add)
    assert norm1 not in residual.args  # the residual reads the int8 tensor the Linear reads
    assert any(u.target == ops.linear for u in shared.users)
    # the Linear's input scale widened to the LayerNorm output's largest magnitude
    with torch.no_grad():
        widest = max(float(model.norm1(x + model.out(torch.tanh(model.mix(x)))).abs().max()) for (x,) in batches)
    assert quantize.args[1] == pytest.approx(static_scale(widest), rel=0.02)
    for detail in record.details:
        assert detail["error"] <= 0.05
    error = max(compare_outputs(run_graph(gm, b), [model(*b)]).max_rel for b in batches)
    assert 0 < error <= 0.05


def test_without_int8_linears_only_the_sums_are_quantized() -> None:
    _, _, stage = _run(["quantize-residual"])
    assert stage.records[-1].applied == 2
    gm = stage.gm
    assert _norm_inputs(gm) == [qops.dequantize_per_tensor] * 2
    norm1 = next(n for n in gm.graph.nodes if n.target == LAYER_NORM)
    assert any(u.target == ops.add for u in norm1.users)  # the residual reads the float output


def test_static_scales_need_calibration() -> None:
    model, x = Block().eval(), torch.randn(2, 16, 64)
    run = run_pass("quantize-residual", model, (x,))
    assert run.record.applied == 0
    assert_skipped(run, "calibration", code="needs-calibration")


def test_a_layer_norm_over_budget_stays_float_and_says_why() -> None:
    model = Block().eval()
    with torch.no_grad():  # one huge feature: a per-tensor scale leaves the rest a few codes
        model.out.bias[0] = 400.0
    run = run_pass("quantize-residual(budget=0.002)", model, (torch.randn(2, 16, 64),),
                   calibration=[tuple(b) for b in _batches(3)])
    assert run.record.applied < 2
    assert_skipped(run, "output error", code="over-budget")
    run.assert_outputs_match(rtol=0.002)
