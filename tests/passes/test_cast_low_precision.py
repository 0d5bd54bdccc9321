from __future__ import annotations

import pytest
import torch
from fxopt.passes import CastBF16, CastFP16
from torch import nn

import fxopt
from fxopt.ir import call_nodes, constant, ops
from fxopt.testing import assert_skipped, run_pass

to_copy = torch.ops.aten._to_copy.default


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16)).eval()


def _linear_dtypes(gm) -> list[torch.dtype]:
    return [constant(gm, node.args[1]).dtype for node in call_nodes(gm, ops.linear)]


def test_linears_run_in_bfloat16_within_budget() -> None:
    model, x = _mlp(), torch.randn(32, 64)
    run = run_pass(CastBF16(budget=0.02), model, (x,), calibration=[(torch.randn(32, 64),)])
    assert run.record.status == "applied" and run.record.applied == 3
    assert _linear_dtypes(run.after) == [torch.bfloat16] * 3
    # one cast in, one cast out: the casts between the layers cancel (bf16 -> f32 -> bf16 is exact)
    assert len(call_nodes(run.after, to_copy)) == 2
    out = run.outputs()[0]
    assert out.dtype == torch.float32
    with torch.no_grad():
        reference = model(x)
    error = float((out - reference).abs().max() / reference.abs().max())
    assert 0 < error <= 0.02  # really bf16, and within the budget
    assert run.record.max_rel_err <= 0.02


def test_activation_stays_with_its_linear_in_low_precision() -> None:
    run = run_pass(CastBF16(budget=0.05), _mlp(), (torch.randn(16, 64),))
    gelu = call_nodes(run.after, ops.gelu)[0]
    assert gelu.meta["val"].dtype == torch.bfloat16


def test_a_tiny_budget_refuses_with_its_code() -> None:
    run = run_pass(CastBF16(budget=1e-7), _mlp(), (torch.randn(16, 64),))
    assert run.record.applied == 0
    assert_skipped(run, code="over-budget")
    assert _linear_dtypes(run.after) == [torch.float32] * 3


def test_low_precision_linears_are_left_alone() -> None:
    model = _mlp().to(torch.bfloat16)
    run = run_pass(CastBF16(budget=0.05), model, (torch.randn(16, 64, dtype=torch.bfloat16),))
    assert run.record.applied == 0
    assert_skipped(run, code="not-float32")


def test_fp16_variant() -> None:
    run = run_pass(CastFP16(budget=0.02), _mlp(), (torch.randn(16, 64),))
    assert run.record.applied == 3
    assert _linear_dtypes(run.after) == [torch.float16] * 3


def test_bad_dtype_option_is_refused() -> None:
    with pytest.raises(fxopt.PassOptionError, match="dtype"):
        CastBF16(dtype="int8")


def test_compiled_bf16_model_matches_on_fresh_inputs() -> None:
    model, x = _mlp(), torch.randn(32, 64)
    opt = fxopt.compile(model, (x,), passes=["cast-bf16"], calibration=[(torch.randn(32, 64),)])
    fresh = torch.randn(32, 64)
    with torch.no_grad():
        reference = model(fresh)
    assert float((opt(fresh) - reference).abs().max() / reference.abs().max()) <= 0.03
