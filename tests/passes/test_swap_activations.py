"""swap-activations (exact formula fusion) and swap-activations-lossy (budgeted swaps)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_transformer, token_ids
from hypothesis import given, settings
from hypothesis import strategies as st

import fxopt
from fxopt.ir import ops
from fxopt.pattern import polynomial
from fxopt.testing import assert_idempotent, assert_outputs_close, assert_skipped, run_pass

aten = torch.ops.aten
FORMULA_OPS = (aten.tanh.default, aten.pow.Tensor_Scalar, aten.mul.Tensor, aten.add.Tensor, aten.sigmoid.default,
               aten.hardtanh.default, aten.clamp.default, aten.div.Tensor, aten.erf.default)
C = math.sqrt(2 / math.pi)


class Act(torch.nn.Module):
    """A Linear followed by ``fn``: ``fn`` receives the Linear's output."""

    def __init__(self, fn, features: int = 8) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(features, features)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.fc(x))


GELU_TANH_SPELLINGS = {
    "gpt2": lambda x: 0.5 * x * (1.0 + torch.tanh(C * (x + 0.044715 * torch.pow(x, 3.0)))),
    "fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "reordered": lambda x: (torch.tanh((x * x * x * 0.044715 + x) * C) + 1.0) * x / 2,
    "distributed": lambda x: x * 0.5 + x * 0.5 * torch.tanh(C * x + C * 0.044715 * x ** 3),
    "sigmoid": lambda x: x * torch.sigmoid(2 * C * (x + 0.044715 * x ** 3)),
}


@pytest.mark.parametrize("spelling", sorted(GELU_TANH_SPELLINGS))
def test_tanh_gelu_formulas_become_one_gelu(spelling):
    torch.manual_seed(0)
    model = Act(GELU_TANH_SPELLINGS[spelling]).eval()
    run = run_pass("swap-activations", model, (torch.randn(4, 8) * 3,))
    assert run.record.applied == 1
    gelus = [n for n in run.after.graph.nodes if n.target == ops.gelu]
    assert len(gelus) == 1 and gelus[0].kwargs == {"approximate": "tanh"}
    assert run.count(*FORMULA_OPS) == 0
    run.assert_outputs_match()
    with torch.no_grad():
        expected = F.gelu(model.fc(run.batches[0][0]), approximate="tanh")
    torch.testing.assert_close(run.outputs()[0], expected)


@pytest.mark.parametrize("fn, op", [
    (lambda x: x * torch.sigmoid(x), ops.silu),
    (lambda x: torch.sigmoid(x) * x, ops.silu),
    (lambda x: x * F.relu6(x + 3) / 6, ops.hardswish),
    (lambda x: x * (torch.clamp(3 + x, 0, 6) * (1 / 6)), ops.hardswish),
    (lambda x: F.hardtanh(x + 3, 0.0, 6.0) * x / 6, ops.hardswish),
    (lambda x: F.hardsigmoid(x) * x, ops.hardswish),
    (lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))), ops.gelu),
])
def test_silu_hardswish_and_erf_gelu_formulas(fn, op):
    torch.manual_seed(0)
    model = Act(fn).eval()
    run = run_pass("swap-activations", model, (torch.randn(4, 8) * 4,))
    assert run.record.applied == 1
    assert run.count(op) == 1
    assert run.count(*FORMULA_OPS) == 0
    run.assert_outputs_match()


def test_quick_gelu_is_not_silu_and_says_why():
    model = Act(lambda x: x * torch.sigmoid(1.702 * x)).eval()
    run = run_pass("swap-activations", model, (torch.randn(4, 8),))
    assert run.record.applied == 0 and run.count(ops.silu) == 0
    assert_skipped(run, "x*sigmoid(...) with constants that match no exact activation formula",
                   code="no-exact-formula")


def test_wrong_constant_is_not_matched():
    model = Act(lambda x: 0.5 * x * (1.0 + torch.tanh(C * (x + 0.04 * torch.pow(x, 3.0))))).eval()
    run = run_pass("swap-activations", model, (torch.randn(4, 8),))
    assert run.record.applied == 0 and run.count(ops.gelu) == 0
    assert_skipped(run, "match no exact activation formula", code="no-exact-formula")


def test_intermediate_used_elsewhere_is_refused():
    def fn(x):
        s = torch.sigmoid(x)
        return x * s + s

    run = run_pass("swap-activations", Act(fn).eval(), (torch.randn(4, 8),))
    assert run.record.matched == 1 and run.record.applied == 0
    assert_skipped(run, "sigmoid is also used by add", code="shared-intermediate")


class IntSilu(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def test_integer_x_is_refused():
    run = run_pass("swap-activations", IntSilu(), (torch.arange(-4, 4).reshape(2, 4),))
    assert run.record.matched == 1 and run.count(ops.silu) == 0
    assert_skipped(run, "not a floating-point tensor", code="not-floating-point")


def test_idempotent_on_gpt2_formula():
    assert_idempotent("swap-activations", Act(GELU_TANH_SPELLINGS["gpt2"]).eval(), (torch.randn(4, 8),))


def test_gpt2_new_gelu_is_fused_in_every_layer():
    pytest.importorskip("transformers")
    model = tiny_transformer("gpt2")
    ids = token_ids()
    opt = fxopt.compile(model, (ids,), passes=["swap-activations"], strict=True)
    record = opt.report["swap-activations"]
    assert record.applied == 2 and record.matched == 2
    assert sum(n.target == ops.gelu for n in opt.graph_module.graph.nodes) == 2
    assert not any(n.target == aten.tanh.default for n in opt.graph_module.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).last_hidden_state, model(ids).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_t5_gated_gelu_is_fused():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(d_model=32, num_layers=1, num_heads=4, d_ff=64, d_kv=8, vocab_size=64,
                                   feed_forward_proj="gated-gelu")
    model = transformers.T5EncoderModel(config).eval()
    ids = token_ids()
    run = run_pass("swap-activations", model, (ids,))
    assert run.record.applied == 1 and run.count(ops.gelu) == 1
    with torch.no_grad():
        assert_outputs_close(run.outputs()[:1], [model(ids).last_hidden_state])


# ---------------------------------------------------------------- lossy


def test_lossy_swaps_report_error_within_budget():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.SiLU(),
                                torch.nn.Linear(32, 4)).eval()
    calibration = [(torch.randn(16, 8),) for _ in range(3)]
    swap = fxopt.passes.SwapActivationsLossy(mapping="gelu->gelu_tanh, silu->hardswish", budget=0.05)
    run = run_pass(swap, model, (torch.randn(16, 8),), calibration=calibration)
    assert run.record.applied == 2
    assert run.count(ops.silu) == 0 and run.count(ops.hardswish) == 1
    assert [n.kwargs for n in run.after.graph.nodes if n.target == ops.gelu] == [{"approximate": "tanh"}]
    swaps = {d["swap"]: d["error"] for d in run.record.details}
    assert set(swaps) == {"gelu->gelu_tanh", "silu->hardswish"}
    assert 0 < swaps["gelu->gelu_tanh"] <= swaps["silu->hardswish"] <= 0.05  # errors accumulate in order
    assert run.record.max_rel_err <= 0.05
    run.assert_outputs_match(rtol=0.05)


def test_lossy_swap_over_budget_is_refused():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).eval()
    swap = fxopt.passes.SwapActivationsLossy(mapping="gelu->relu", budget=1e-4)
    run = run_pass(swap, model, (torch.randn(16, 8),))
    assert run.record.applied == 0 and run.count(ops.relu) == 0
    assert_skipped(run, "gelu->relu gives relative output error")


def test_sigmoid_to_hardsigmoid():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sigmoid()).eval()
    swap = fxopt.passes.SwapActivationsLossy(mapping="sigmoid->hardsigmoid", budget=0.1)
    run = run_pass(swap, model, (torch.randn(16, 8),))
    assert run.count(ops.hardsigmoid) == 1 and run.count(ops.sigmoid) == 0
    run.assert_outputs_match(rtol=0.1)


def test_lossy_mapping_is_validated_and_not_in_default_pipeline():
    with pytest.raises(fxopt.PassOptionError, match="unsupported swap"):
        fxopt.passes.SwapActivationsLossy(mapping="relu->gelu")
    with pytest.raises(fxopt.PassOptionError, match="mapped twice"):
        fxopt.passes.SwapActivationsLossy(mapping="gelu->relu,gelu->gelu_tanh")
    assert fxopt.get_pass("swap-activations-lossy", mapping="silu->hardswish").budget_or_none == 0.01
    from fxopt.registry import default_pipeline

    names = [p.name for p in default_pipeline()]
    assert "swap-activations" in names and "swap-activations-lossy" not in names


def test_lossy_without_mapping_does_nothing_and_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    run = run_pass("swap-activations-lossy", model, (torch.randn(4, 8),))
    assert run.record.status == "no change"
    assert_skipped(run, "no mapping given")


# ---------------------------------------------------------------- random spellings

A = 0.044715
INNER = [lambda x: x + A * torch.pow(x, 3), lambda x: A * x * x * x + x, lambda x: x * (1 + A * x * x),
         lambda x: x + x ** 3 * A]
SCALED = [lambda v: C * v, lambda v: v * C, lambda v: v / (1 / C)]
OUTER = [lambda x, t: 0.5 * x * (1 + t), lambda x, t: x * (1 + t) * 0.5, lambda x, t: (t + 1) * x / 2,
         lambda x, t: x * 0.5 + 0.5 * x * t, lambda x, t: (x + x * t) * 0.5, lambda x, t: 0.5 * (x + t * x)]


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(INNER), st.sampled_from(SCALED), st.sampled_from(OUTER))
def test_any_spelling_of_tanh_gelu_is_fused_exactly(inner, scaled, outer):
    model = Act(lambda x: outer(x, torch.tanh(scaled(inner(x))))).eval()
    run = run_pass("swap-activations", model, (torch.randn(4, 8) * 3,))
    assert run.record.applied == 1
    assert run.count(ops.gelu) == 1 and run.count(*FORMULA_OPS) == 0
    run.assert_outputs_match()


class Formula(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def test_alpha_given_positionally_is_read():
    # export passes rsub's alpha positionally: rsub(-x, 3, alpha=2) = 3 + 2x, so this is not
    # hardswish. For |x| >= 3 both clamp alike, so the example inputs cannot tell them apart.
    model = Formula(lambda x: x * F.relu6(torch.rsub(-x, 3, alpha=2)) / 6).eval()
    torch.manual_seed(0)
    far = torch.randn(4, 8).sign() * (3 + torch.rand(4, 8))
    run = run_pass("swap-activations", model, (far,))
    assert run.count(ops.hardswish) == 0
    near = torch.linspace(-2, 2, 32).reshape(4, 8)
    assert not torch.allclose(F.hardswish(near), model(near))
    run.assert_outputs_match(inputs=[near])
    (rsub,) = [n for n in run.after.graph.nodes if n.target == aten.rsub.Scalar]
    assert rsub.args[2] == 2 and not rsub.kwargs  # the spelling this test is about
    poly, _ = polynomial(rsub)
    assert poly == {(): 3.0, (rsub.args[0].args[0],): 2.0}
