"""The quantize-int8 pass: QDQ insertion, observers, layer filters, error budget, bad input."""

from __future__ import annotations

import re

import pytest
import torch
from fxopt.passes import QuantizeInt8

import fxopt
from fxopt.errors import CaptureError, InputError, PassOptionError
from fxopt.ir import constants, ops
from fxopt.ir.qdq import qops
from fxopt.pass_api import PassContext
from fxopt.testing import assert_idempotent, assert_skipped, compile_captured, run_pass


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
    run = run_pass("quantize-int8(activations='dynamic')", model, (x,))
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


def test_auto_quantizes_per_tensor_where_the_budget_allows() -> None:
    torch.manual_seed(0)
    model, x = mlp(64, 96, 32), torch.randn(3, 5, 64)
    run = run_pass("quantize-int8", model, (x,))  # activations="auto", the default
    assert run.record.applied == 2 and run.count(qops.choose_per_tensor) == 2
    assert run.count(qops.choose_per_token) == 0
    assert [d["activations"] for d in run.record.details] == ["dynamic-tensor"] * 2
    assert run.assert_outputs_match(rtol=0.05) == pytest.approx(run.record.max_rel_err, rel=1e-3)


def test_auto_quantizes_per_token_the_layers_per_tensor_breaks() -> None:
    # One token holds a single value of 1000 on a feature the first layer ignores: one
    # per-tensor scale rounds every other token's inputs to a few levels; per token only that
    # token's scale is coarse, and its other values are 0.
    torch.manual_seed(0)
    model, x = mlp(64, 96, 32), torch.randn(3, 5, 64)
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0
    x[0, 0] = 0.0
    x[0, 0, 0] = 1000.0
    per_tensor = run_pass(QuantizeInt8(activations="dynamic-tensor"), model, (x,)).record
    assert per_tensor.skipped and {s.code for s in per_tensor.skips} == {"over-budget"}
    run = run_pass("quantize-int8", model, (x,))
    assert run.record.applied == 2 and run.record.max_rel_err <= 0.05
    chosen = {d["node"]: d["activations"] for d in run.record.details}
    assert chosen == {"linear": "dynamic", "linear_1": "dynamic-tensor"}
    assert run.count(qops.choose_per_token) == list(chosen.values()).count("dynamic") >= 1
    assert run.count(qops.choose_per_tensor) == list(chosen.values()).count("dynamic-tensor")
    run.assert_outputs_match(rtol=0.05)


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
    assert_skipped(run, "need calibration batches", code="needs-calibration")


def test_filters_and_size_rule_say_why() -> None:
    torch.manual_seed(0)
    model, x = mlp(32, 32, 32, 32, 8), torch.randn(4, 32)
    run = run_pass(QuantizeInt8(skip_first=True, exclude=r"^2$"), model, (x,))
    assert run.record.applied == 1  # only layer 4: 0 is first, 2 excluded, 6 (32->8) too small
    assert_skipped(run, "skip_first=True", code="excluded")
    assert_skipped(run, "matches exclude='^2$'", code="excluded")
    assert_skipped(run, "below 16", code="too-small")
    forced = run_pass(QuantizeInt8(force=True, include="^(4|6)$"), model, (x,))
    assert forced.record.applied == 2
    assert_skipped(forced, "does not match include", code="excluded")
    small = run_pass(QuantizeInt8(min_params=2000, skip_last=True), model, (x,))
    assert_skipped(small, "< min_params=2000", code="too-small")
    assert_skipped(small, "skip_last=True", code="excluded")


def test_small_layers_are_one_too_small_group() -> None:
    torch.manual_seed(0)
    model, x = mlp(32, 8, 12, 8, 4), torch.randn(4, 32)
    opt = fxopt.compile(model, (x,), passes=["quantize-int8"])
    record = opt.report["quantize-int8"]
    assert record.applied == 0 and record.skipped == {"too-small": 4}
    lines = [line for line in str(opt.report).splitlines() if "quantize-int8: skipped" in line]
    assert len(lines) == 1 and lines[0].strip().startswith("quantize-int8: skipped 4x [too-small], e.g. ")


def test_non_finite_weight_stays_float() -> None:
    torch.manual_seed(0)
    model = mlp(32, 32, 16)
    with torch.no_grad():
        model[0].weight[3, 5] = float("nan")
    run = run_pass("quantize-int8", model, (torch.randn(4, 32),))
    assert_skipped(run, "not finite", code="not-finite", node="linear")
    assert run.record.skipped["not-finite"] == 1


def test_layer_that_breaks_the_budget_stays_float() -> None:
    torch.manual_seed(0)
    model = mlp(32, 64, 32)
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0  # feature 0 carries a huge outlier that does not matter
    x = torch.randn(16, 32)
    x[:, 0] = 1e4  # per-token scales set by the outlier flush the other features to zero
    run = run_pass(QuantizeInt8(budget=0.05), model, (x,))
    assert run.record.applied == 1
    assert_skipped(run, "output error", code="over-budget", node="linear")
    assert run.record.max_rel_err <= 0.05
    assert_skipped(run_pass(QuantizeInt8(budget=1e-6), model, (x,)), "> budget 1e-06", code="over-budget")


def test_idempotent() -> None:
    torch.manual_seed(0)
    assert_idempotent("quantize-int8", mlp(32, 48, 16), (torch.randn(4, 32),))


def test_float64_model_is_left_float_with_reason() -> None:
    torch.manual_seed(0)
    model = mlp(32, 32).double()
    run = run_pass("quantize-int8", model, (torch.randn(4, 32, dtype=torch.float64),))
    assert not run.modified
    assert_skipped(run, "float64 is not one of", code="unsupported-dtype")


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


# ---------------------------------------------------------------- the search's estimates


@pytest.mark.parametrize("activations,symmetric,rows", [
    ("dynamic", True, 24), ("dynamic-tensor", True, 24), ("dynamic-tensor", True, 300),
    ("static", True, 24), ("static", False, 300)])
def test_local_error_is_the_layer_quantized_as_the_pass_would(activations: str, symmetric: bool, rows: int) -> None:
    """The estimate the search ranks layers by: one layer's own error, with its input and
    weight quantized by the very QDQ pattern of the pass (on sampled rows of a large input,
    which include the extremes a per-tensor scale is set by)."""
    from fxopt.passes._quantize_int8_estimate import local_errors, sampled_rows
    from fxopt.passes._quantize_int8_search import observe_scales

    from fxopt.capture import capture
    from fxopt.ir import call_nodes, copy_graph_module
    from fxopt.quant import quantize_weight
    from fxopt.verify import compare_outputs, run_graph

    torch.manual_seed(0)
    x = torch.randn(rows, 48)
    x[rows // 2 + 1, 3] = 40.0  # an outlier off the evenly spaced rows: it sets a per-tensor scale
    gm = capture(torch.nn.Linear(48, 40).eval(), (x,))
    node = call_nodes(gm, ops.linear)[0]
    pass_ = QuantizeInt8(activations=activations, symmetric=symmetric)
    weights = {node.name: quantize_weight(constants_of(gm, node))}
    scales = observe_scales(pass_, gm, [node], PassContext(batches=[[x]]))[0] if activations == "static" else {node.name: None}
    estimate = local_errors(pass_, gm, [node], weights, scales, {node.name: [x]})[node.name]
    trial = copy_graph_module(gm)
    pass_._quantize(trial, [node.name], weights, scales)
    expected, actual = run_graph(gm, [x])[0], run_graph(trial, [x])[0]
    sampled = sampled_rows(x)
    assert len(sampled) <= min(rows, 66) and int(x.abs().max(1).values.argmax()) in sampled.tolist()
    assert estimate > 0
    assert estimate == pytest.approx(compare_outputs([expected[sampled]], [actual[sampled]]).max_rel, rel=1e-5)
    if rows <= 66:
        assert estimate == pytest.approx(compare_outputs([expected], [actual]).max_rel, rel=1e-5)


@pytest.mark.parametrize("activations", ["dynamic", "dynamic-tensor"])
def test_a_large_layers_local_error_is_the_same_a_chunk_of_channels_at_a_time(activations, monkeypatch) -> None:
    """A large layer's estimate runs its one-layer graph on a few output channels at a time
    (each channel's weight row, scale and bias): the error of the layer computed whole."""
    import fxopt.passes._quantize_int8_estimate as estimate

    from fxopt.capture import capture
    from fxopt.ir import call_nodes
    from fxopt.quant import quantize_weight

    torch.manual_seed(0)
    x = torch.randn(40, 48)
    gm = capture(torch.nn.Linear(48, 100).eval(), (x,))
    node = call_nodes(gm, ops.linear)[0]
    pass_ = QuantizeInt8(activations=activations)
    weights = {node.name: quantize_weight(constants_of(gm, node))}
    errors = []
    for chunk in (1 << 30, 48 * 7):  # whole, then 7 channels at a time (the last chunk has 2)
        monkeypatch.setattr(estimate, "ESTIMATE_CHUNK", chunk)
        errors.append(estimate.local_errors(pass_, gm, [node], weights, {node.name: None}, {node.name: [x]}))
    assert errors[0][node.name] > 0 and errors[1][node.name] == pytest.approx(errors[0][node.name], rel=1e-6)


def constants_of(gm, node) -> torch.Tensor:
    from fxopt.ir import constant

    return constant(gm, node.args[1])


def test_over_budget_all_at_once_ranks_by_local_error_and_measures_few_combinations() -> None:
    from fxopt.lossy import estimated_trial_limit

    torch.manual_seed(0)
    model, x = mlp(*[48] * 13), torch.randn(32, 48)
    everything = run_pass(QuantizeInt8(budget=1.0, activations="dynamic"), model, (x,)).record.max_rel_err
    budget = 0.5 * everything
    run = run_pass(QuantizeInt8(budget=budget, activations="dynamic"), model, (x,))
    record = run.record
    # the last layer alone breaks the budget (its error reaches the output undamped) although
    # its local error is the smallest: it is refused, measured alone, and the others are kept
    assert record.applied == 11 and record.max_rel_err <= budget
    log = record.details[0]["log"]
    trials = record.details[0]["trials"]
    # each layer alone and each combined would be 2 per layer; the ranked prefix needs a few
    assert trials <= 1 + estimated_trial_limit(12) < 2 * 12
    assert [s["by"] for s in log if s["event"] == "ranked"] == ["estimate"]
    chosen = [s for s in log if s["event"] == "prefix" and s.get("chosen")][-1]
    assert chosen["error"] == record.details[0]["fitted_error"] == pytest.approx(record.max_rel_err, rel=1e-5)
    [skip] = record.skips
    assert skip.code == "over-budget" and skip.node == "linear_11"
    assert skip.detail.startswith("quantizing this layer alone gives output error")
    # the number in the refusal is a measured one: the trial of that layer alone, in the log
    measured = float(re.search(r"output error ([0-9.e-]+) >", skip.detail).group(1))
    alone = [s["error"] for s in log if s["event"] == "prefix" and s["length"] == 1 and s["taken"] == 0]
    assert measured > budget and alone and f"{alone[0]:.3g}" == f"{measured:.3g}"


def test_refusal_names_a_combination_when_its_other_layers_were_not_measured_within_budget() -> None:
    from fxopt.passes._quantize_int8_search import budget_refusal

    from fxopt.lossy import Pick

    alone = budget_refusal(Pick(None, 0.08, True, 0.05))
    raises = budget_refusal(Pick(None, 0.06, True, 0.05, others=3, others_error=0.04))
    together = budget_refusal(Pick(None, 0.09, True, 0.05, others=7, others_error=None))
    assert alone.detail == "quantizing this layer alone gives output error 0.08 > budget 0.05"
    assert raises.detail == "with 3 other layer(s) quantized it raises the output error to 0.06 > budget 0.05"
    assert together.detail.startswith("quantized together with 7 other layer(s)")
    assert together.detail.endswith("it gives output error 0.09 > budget 0.05")
    assert {alone.code, raises.code, together.code} == {"over-budget"}


def test_static_scales_are_observed_on_every_batch_but_the_fresh_one() -> None:
    from fxopt.quant import static_scale
    from fxopt.registry import resolve_passes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32)).eval()
    x, calibration, fresh = torch.randn(8, 32), torch.randn(8, 32) * 2, torch.randn(9, 32) * 100
    gm = fxopt.capture(model, (x,))
    pipeline = resolve_passes(["quantize-int8(activations='static', budget=1.0, force=True)"])
    opt = compile_captured(gm, [[x], [calibration], [fresh]], pipeline, fresh_batches=1)
    (detail,) = opt.report["quantize-int8"].details
    # the fresh input is there to verify on: its 100x larger values set no scale
    assert detail["input_scale"] == pytest.approx(static_scale(float(torch.cat([x, calibration]).abs().max())))


@pytest.mark.parametrize("symmetric", [True, False])
def test_static_scales_observe_each_batch_once_or_read_the_reference_runs_values(
        monkeypatch: pytest.MonkeyPatch, symmetric: bool) -> None:
    """The committed scales (every observable batch) and the search's (its fit batches) come
    from one observation of each batch; under the pass manager, from the values its
    reference run kept, with no run of the graph of their own."""
    from fxopt.passes._quantize_int8_search import observe_scales

    from fxopt.lossy import observer
    from fxopt.quant import static_asymmetric_qparams, static_scale
    from fxopt.registry import resolve_passes

    runs: list[int] = []
    original = observer._Recorder.run

    def counting(self, *args, **kwargs):
        runs.append(int(args[0].shape[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(observer._Recorder, "run", counting)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32)).eval()
    x, first, second, fresh = torch.randn(8, 32), torch.randn(6, 32) * 2, torch.randn(5, 32) * 3, torch.randn(9, 32)
    gm = fxopt.capture(model, (x,))
    pipeline = resolve_passes([f"quantize-int8(activations='static', symmetric={symmetric}, budget=1.0, force=True)"])
    opt = compile_captured(gm, [[x], [first], [second], [fresh]], pipeline, fresh_batches=1)
    (detail,) = opt.report["quantize-int8"].details
    assert runs == []  # the reference run before the pass kept every observable batch's values
    seen, fit = torch.cat([x, first, second]), torch.cat([x, second])  # fit: batches 0 and 2

    def scale(values: torch.Tensor) -> object:
        return (static_scale(float(values.abs().max())) if symmetric
                else static_asymmetric_qparams(float(values.min()), float(values.max())))

    assert detail["input_scale"] == pytest.approx(scale(seen))
    # On its own (no values kept), each batch is observed once for both sets of scales.
    node = next(n for n in gm.graph.nodes if n.target is ops.linear)
    pass_ = QuantizeInt8(activations="static", symmetric=symmetric)
    committed, fitted = observe_scales(pass_, gm, [node], PassContext(batches=[[x], [first], [second], [fresh]], fresh_batches=1))
    assert sorted(runs) == [5, 6, 8]
    assert committed[node.name] == pytest.approx(scale(seen)) and fitted[node.name] == pytest.approx(scale(fit))
