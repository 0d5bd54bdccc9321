"""The quantize-int8 pass: QDQ insertion, observers, layer filters, error budget, bad input."""

from __future__ import annotations

import pytest
import torch
from fxopt.passes import QuantizeInt8

import fxopt
from fxopt.errors import CaptureError, InputError, PassOptionError
from fxopt.ir import constants, ops
from fxopt.ir.qdq import qops
from fxopt.testing import assert_idempotent, assert_skipped, run_pass


def mlp(*sizes: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1]).eval()


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_dynamic_quantizes_every_linear_per_token() -> None:
    torch.manual_seed(0)
    model, x = mlp(64, 96, 32), torch.randn(3, 5, 64)
    run = run_pass("quantize-int8", model, (x,))
    assert run.record.applied == 2
    assert run.count(qops.dequantize_per_channel) == 2
    assert run.count(qops.choose_per_token) == 2 and run.count(qops.quantize_per_token) == 2
    assert run.count(qops.quantize_per_tensor) == 0
    int8 = [t for _, t in constants(run.after) if t.dtype == torch.int8]
    assert sorted(tuple(t.shape) for t in int8) == [(32, 96), (96, 64)]
    assert not any(t.dtype == torch.float32 and t.dim() == 2 for _, t in constants(run.after))
    assert run.record.after.weight_bytes < 0.3 * run.record.before.weight_bytes
    error = run.assert_outputs_match(rtol=0.05)
    assert 0 < error == pytest.approx(run.record.max_rel_err, rel=1e-3)


def test_dynamic_tensor_quantizes_activations_per_tensor_to_uint8() -> None:
    torch.manual_seed(0)
    model, x = mlp(64, 96, 32), torch.randn(3, 5, 64)
    run = run_pass(QuantizeInt8(activations="dynamic-tensor"), model, (x,))
    assert run.record.applied == 2
    assert run.count(qops.choose_per_tensor) == 2 and run.count(qops.quantize_per_tensor_dynamic) == 2
    assert run.count(qops.choose_per_token) == 0 and run.count(qops.dequantize_per_channel) == 2
    choose = next(n for n in run.after.graph.nodes if n.target == qops.choose_per_tensor)
    assert choose.args[1:3] == (0, 255) and choose.args[4] == torch.uint8
    error = run.assert_outputs_match(rtol=0.05)
    assert 0 < error == pytest.approx(run.record.max_rel_err, rel=1e-3)
    assert_idempotent(QuantizeInt8(activations="dynamic-tensor"), model, (x,))


def test_weights_are_symmetric_per_channel() -> None:
    torch.manual_seed(0)
    model, x = mlp(32, 48), torch.randn(4, 32)
    run = run_pass("quantize-int8", model, (x,))
    dq = next(n for n in run.after.graph.nodes if n.target == qops.dequantize_per_channel)
    qweight, scale = (getattr(run.after, a.target) for a in dq.args[:2])
    assert int(qweight.abs().max()) == 127 and int(qweight.min()) >= -127
    weight = model[0].weight.detach()
    torch.testing.assert_close(scale, weight.abs().amax(dim=1) / 127)
    assert float((qweight.float() * scale[:, None] - weight).abs().max()) <= float(scale.max()) / 2 + 1e-7


@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_static_activations_use_calibrated_per_tensor_scales(observer: str) -> None:
    torch.manual_seed(0)
    model, x = mlp(32, 64, 16), torch.randn(64, 32)
    calibration = [(torch.randn(64, 32),) for _ in range(3)]
    # max-error budgets punish clipping, which is what a percentile observer does on purpose
    quantize = QuantizeInt8(activations="static", observer=observer, percentile=99.9, budget=0.25)
    run = run_pass(quantize, model, (x,), calibration=calibration)
    assert run.record.applied == 2
    assert run.count(qops.quantize_per_tensor) == 2 and run.count(qops.choose_per_token) == 0
    first_scale = run.record.details[0]["input_scale"]
    observed = max(float(b[0].abs().max()) for b in [(x,), *calibration])
    if observer == "minmax":
        assert first_scale == pytest.approx(observed / 127)
    else:  # the largest per-batch 99.9th percentile of |x|: the 2046th of 2048 values
        kth = max(float(b[0].abs().flatten().kthvalue(2046).values) for b in [(x,), *calibration])
        assert first_scale == pytest.approx(kth / 127) and kth < observed
    run.assert_outputs_match(rtol=0.25)


def test_static_without_calibration_is_refused_with_reason() -> None:
    torch.manual_seed(0)
    run = run_pass(QuantizeInt8(activations="static"), mlp(32, 32), (torch.randn(4, 32),))
    assert not run.modified
    assert_skipped(run, "needs calibration batches")


def test_filters_and_size_rule_say_why() -> None:
    torch.manual_seed(0)
    model, x = mlp(32, 32, 32, 32, 8), torch.randn(4, 32)
    run = run_pass(QuantizeInt8(skip_first=True, exclude=r"^2$"), model, (x,))
    assert run.record.applied == 1  # only layer 4: 0 is first, 2 excluded, 6 (32->8) too small
    assert_skipped(run, "skip_first=True")
    assert_skipped(run, "matches exclude='^2$'")
    assert_skipped(run, "below 16")
    forced = run_pass(QuantizeInt8(force=True, include="^(4|6)$"), model, (x,))
    assert forced.record.applied == 2
    assert_skipped(forced, "does not match include")
    small = run_pass(QuantizeInt8(min_params=2000, skip_last=True), model, (x,))
    assert_skipped(small, "< min_params=2000")
    assert_skipped(small, "skip_last=True")


def test_layer_that_breaks_the_budget_stays_float() -> None:
    torch.manual_seed(0)
    model = mlp(32, 64, 32)
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0  # feature 0 carries a huge outlier that does not matter
    x = torch.randn(16, 32)
    x[:, 0] = 1e4  # per-token scales set by the outlier flush the other features to zero
    run = run_pass(QuantizeInt8(budget=0.05), model, (x,))
    assert run.record.applied == 1
    assert_skipped(run, "output error", node="linear")
    assert run.record.max_rel_err <= 0.05
    assert_skipped(run_pass(QuantizeInt8(budget=1e-6), model, (x,)), "> budget 1e-06")


def test_idempotent() -> None:
    torch.manual_seed(0)
    assert_idempotent("quantize-int8", mlp(32, 48, 16), (torch.randn(4, 32),))


def test_float64_model_is_left_float_with_reason() -> None:
    torch.manual_seed(0)
    model = mlp(32, 32).double()
    run = run_pass("quantize-int8", model, (torch.randn(4, 32, dtype=torch.float64),))
    assert not run.modified
    assert_skipped(run, "float64 is not one of")


def test_model_without_linears_is_no_change() -> None:
    class Counts(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return ids * 2 + 1

    run = run_pass("quantize-int8", Counts().eval(), (torch.arange(8),))
    assert not run.modified and run.record.matched == 0


def test_integer_input_into_linear_is_a_clear_error() -> None:
    with pytest.raises((CaptureError, InputError), match="Long and Float"):
        fxopt.compile(torch.nn.Linear(4, 4).eval(), (torch.arange(8).reshape(2, 4),), passes=["quantize-int8"])


def test_integer_input_cast_to_float_is_quantized_within_budget() -> None:
    torch.manual_seed(0)

    class Counts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, counts: torch.Tensor) -> torch.Tensor:
            return self.fc(counts.float())

    model, counts = Counts().eval(), torch.randint(0, 1000, (8, 32))
    opt = fxopt.compile(model, (counts,), passes=["quantize-int8"])
    assert opt.report["quantize-int8"].applied == 1
    with torch.no_grad():
        assert rel_error(opt(counts), model(counts)) < 0.05


def test_calibration_batch_of_wrong_shape_is_an_input_error() -> None:
    with pytest.raises(InputError, match="calibration batch 0"):
        fxopt.compile(mlp(32, 32), (torch.randn(4, 32),), passes=[QuantizeInt8(activations="static")],
                      calibration=[(torch.randn(4, 31),)])


def test_bad_options_are_refused() -> None:
    with pytest.raises(PassOptionError, match="'dynamic', 'dynamic-tensor', 'static'"):
        QuantizeInt8(activations="per-token")
    with pytest.raises(PassOptionError, match="observer"):
        QuantizeInt8(observer="mse")


def test_linear_count_is_matched_not_silently_dropped() -> None:
    torch.manual_seed(0)
    run = run_pass("quantize-int8", mlp(32, 32, 32), (torch.randn(2, 32),))
    assert run.count_before(ops.linear) == 2 == run.count(ops.linear) == run.record.matched


# ---------------------------------------------------------------- sibling Linears, unseen data


class Attention(torch.nn.Module):
    """q, k and v read one input: three sibling Linears."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 32 ** 0.5, dim=-1)
        return self.o(scores @ self.v(x))


def test_static_with_sibling_linears_is_applied_within_budget() -> None:
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 8, 32)
    calibration = [(torch.randn(2, 8, 32),) for _ in range(3)]
    run = run_pass(QuantizeInt8(activations="static", budget=0.05), model, (x,), calibration=calibration)
    assert run.modified and run.record.applied == 4
    scales = {d["node"]: d["input_scale"] for d in run.record.details}
    observed = max(float(b[0].abs().max()) for b in [(x,), *calibration])
    assert scales["linear"] == scales["linear_1"] == scales["linear_2"] == pytest.approx(observed / 127)
    assert run.record.max_rel_err <= 0.05
    run.assert_outputs_match(rtol=0.05)


def test_layers_are_chosen_on_half_the_batches_and_hold_on_fresh_ones() -> None:
    torch.manual_seed(0)
    model = mlp(64, 128, 64)
    g = torch.Generator().manual_seed(1)
    x, calibration = torch.randn(16, 64, generator=g), [(torch.randn(16, 64, generator=g),) for _ in range(3)]
    opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(budget=0.02)], calibration=calibration)
    record = opt.report["quantize-int8"]
    assert record.applied == 2
    for detail in record.details:
        assert detail["heldout_batches"] == 2
        assert detail["fitted_error"] <= 0.02 and detail["heldout_error"] <= 0.02
    with torch.no_grad():
        fresh = [torch.randn(16, 64, generator=g) for _ in range(5)]
        assert max(rel_error(opt(f), model(f)) for f in fresh) <= 1.5 * 0.02


def test_equal_share_strategy_and_bad_strategy() -> None:
    torch.manual_seed(0)
    run = run_pass(QuantizeInt8(strategy="equal-share", budget=0.05), mlp(32, 48, 16), (torch.randn(8, 32),))
    assert run.record.applied == 2 and run.record.max_rel_err <= 0.05
    with pytest.raises(PassOptionError, match="strategy"):
        QuantizeInt8(strategy="fastest")
