"""The quantize-weights pass: int8 / int4 weight-only Linears within budget, refusals, kernels."""

from __future__ import annotations

import pytest
import torch
from fxopt.passes import QuantizeWeights

import fxopt
from fxopt.errors import OptionValueError
from fxopt.ir import constants, ops
from fxopt.kernels.weight_only import weight_only_linear_op, weight_only_linear_packed_op
from fxopt.lowering import lower_graph
from fxopt.lowering.weight_only_linear import candidates as kernel_candidates
from fxopt.quant import dequantize_weight_groupwise, quantize_weight_groupwise
from fxopt.quant_search import search_weight_groupwise
from fxopt.testing import assert_idempotent, assert_skipped, run_pass


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()


class Logits(torch.nn.Module):
    """A small random LlamaForCausalLM (hidden 64, 2 layers, grouped-query attention) -> logits."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        self.lm = transformers.LlamaForCausalLM(config).eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids, use_cache=False).logits


def weight_only_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target == weight_only_linear_op]


@pytest.mark.parametrize("bits, group_size", [(8, None), (8, 32), (4, 32), (4, 64)])
def test_groupwise_weights_round_trip_within_half_a_step(bits: int, group_size: int | None) -> None:
    weight = torch.randn(48, 128)
    q, scale, zero = quantize_weight_groupwise(weight, bits, group_size)
    assert q.dtype == torch.int8 and scale.shape == (48, 128 // (group_size or 128))
    assert (int(q.min()), int(q.max())) >= ((-127, -127) if bits == 8 else (0, 0))
    assert int(q.max()) <= (127 if bits == 8 else 15) and (zero is None) == (bits == 8)
    step = scale.repeat_interleave(group_size or 128, dim=1)
    assert bool(((dequantize_weight_groupwise(q, scale, zero) - weight).abs() <= step / 2 + 1e-6).all())
    q_float = q.float()  # computed in place, on a copy of its own: a float q stays as given
    assert torch.equal(dequantize_weight_groupwise(q_float, scale, zero), dequantize_weight_groupwise(q, scale, zero))
    assert torch.equal(q_float, q.float())


def test_int8_quantizes_every_linear_of_an_mlp_within_budget() -> None:
    model, x = mlp(), torch.randn(6, 64)
    run = run_pass("quantize-weights", model, (x,))
    assert run.record.applied == 2 and run.count(ops.linear) == 0 and len(weight_only_nodes(run.after)) == 2
    assert {d["bits"] for d in run.record.details} == {8}
    int8 = sorted(tuple(t.shape) for _, t in constants(run.after) if t.dtype == torch.int8)
    assert int8 == [(32, 128), (128, 64)]
    assert run.record.after.weight_bytes < 0.3 * run.record.before.weight_bytes
    error = run.assert_outputs_match(rtol=0.05)
    assert 0 < error <= 0.05


def test_int4_stores_unpacked_values_with_zero_points_and_backs_off_to_int8_over_budget() -> None:
    model, x = mlp(), torch.randn(6, 64)
    run = run_pass(QuantizeWeights(bits=4, group_size=32, budget=0.15), model, (x,))
    assert run.record.applied == 2 and {d["bits"] for d in run.record.details} == {4}
    node = weight_only_nodes(run.after)[0]
    q, scale, zero = (getattr(run.after, a.target) for a in node.args[1:4])
    assert q.dtype == zero.dtype == torch.int8 and 0 <= int(q.min()) and int(q.max()) <= 15
    assert scale.shape == zero.shape == (128, 2)
    assert run.assert_outputs_match(rtol=0.15) <= 0.15
    # int4 alone is over a tight budget on this model; each layer backs off to int8, not to float
    tight = run_pass(QuantizeWeights(bits=4, group_size=32, budget=0.02), model, (x,))
    assert tight.record.applied == 2 and {d["bits"] for d in tight.record.details} == {8}
    assert tight.assert_outputs_match(rtol=0.02) <= 0.02


def test_a_budget_no_level_fits_leaves_the_layers_float_with_a_reason() -> None:
    model, x = mlp(), torch.randn(6, 64)
    run = run_pass(QuantizeWeights(budget=1e-4), model, (x,))
    assert run.record.applied == 0 and run.count(ops.linear) == 2
    assert_skipped(run, "int8 alone gives output error", code="over-budget")


def test_in_features_that_do_not_divide_into_groups_are_refused() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    run = run_pass(QuantizeWeights(bits=4, group_size=32, budget=0.2), model, (torch.randn(4, 48),))
    assert run.record.applied == 1
    assert_skipped(run, "48 input features do not divide into groups of 32", code="indivisible-group")


def test_excluded_layers_stay_float() -> None:
    run = run_pass(QuantizeWeights(exclude=r"^2$"), mlp(), (torch.randn(6, 64),))
    assert run.record.applied == 1 and run.count(ops.linear) == 1
    assert_skipped(run, "matches exclude", code="excluded")


def test_bad_options_are_refused() -> None:
    with pytest.raises(OptionValueError, match="bits must be 8 or 4"):
        QuantizeWeights(bits=3)
    with pytest.raises(OptionValueError, match="group_size must be None or one of"):
        QuantizeWeights(bits=4, group_size=48)
    with pytest.raises(OptionValueError, match="activations must be one of"):
        QuantizeWeights(activations="float16")
    with pytest.raises(OptionValueError, match="scales must be one of 'weighted', 'absmax'"):
        QuantizeWeights(scales="gptq")


def test_the_pass_is_idempotent() -> None:
    assert_idempotent("quantize-weights(bits=4, group_size=32, budget=0.2)", mlp(), (torch.randn(6, 64),))


@pytest.mark.parametrize("spec, budget", [("quantize-weights", 0.05),
                                          ("quantize-weights(bits=4, group_size=32, budget=0.2)", 0.2)])
def test_llama_logits_within_budget_and_lowered_to_a_kernel(spec: str, budget: float) -> None:
    model, ids = Logits().eval(), torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        expected = model(ids)
    opt = fxopt.compile(model, (ids,), passes=[spec])
    record = next(r for r in opt.report.passes if r.name == "quantize-weights")
    # 2 layers x (q, k, v, o, gate, up, down) and lm_head
    assert record.applied + len(record.skipped) == 15 and record.applied >= 14
    assert len(weight_only_nodes(opt.graph_module)) == record.applied
    with torch.no_grad():
        got = opt(ids)
    assert float((got - expected).abs().max() / expected.abs().max()) <= budget
    # what runs: every weight-only Linear becomes the kernel measured fastest for its shape
    notes = "\n".join(opt.report.notes)
    assert "weight-only Linears run on" in notes, notes
    lowered = lower_graph(opt.graph_module, "eager", torch.device("cpu"))
    running = [n.target for n in lowered.graph_module.graph.nodes]
    assert running.count(weight_only_linear_packed_op) + running.count(weight_only_linear_op) == record.applied
    assert "weight-only-linear" in [lowering.name for lowering in lowered.applied]


def test_the_lowering_packs_for_a_library_kernel_where_one_runs() -> None:
    """int8 per channel with bfloat16 activations: the shape's packed kernel (aten's
    _weight_int8pack_mm) is a candidate; whichever is chosen, outputs agree with the op."""
    run = run_pass("quantize-weights", mlp(), (torch.randn(6, 64),))
    candidates = kernel_candidates(torch.device("cpu"), 8, 64, 64, 128, torch.bfloat16)
    if not candidates:
        pytest.skip("this torch build has no weight-only int8 kernel")
    lowered = lower_graph(run.after, "eager", torch.device("cpu"))
    x = torch.randn(5, 64)
    torch.testing.assert_close(lowered.graph_module(x)[0], run.after(x)[0], rtol=0.05, atol=0.02)


@pytest.mark.parametrize("spec, in_features", [("quantize-weights", 40),
                                               ("quantize-weights(bits=4, group_size=32, budget=0.2)", 64)])
def test_onnx_runs_weight_only_linears_as_matmul_nbits(spec: str, in_features: int, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()
    x = torch.randn(6, in_features)
    eager = fxopt.compile(model, (x,), passes=[spec])
    ort = fxopt.compile(model, (x,), passes=[spec], backend="onnx")
    assert any("2 weight-only Linears run as com.microsoft.MatMulNBits" in note for note in ort.report.notes)
    with torch.no_grad():
        expected, got = eager(x), ort(x)
    # ONNX Runtime computes in float32, the eager kernels in bfloat16: a bfloat16 step apart
    assert float((got - expected).abs().max() / expected.abs().max()) < 0.03
    fxopt.export_onnx(eager, (x,), tmp_path / "model.onnx")
    exported = onnx.load(str(tmp_path / "model.onnx"))
    assert [n.op_type for n in exported.graph.node].count("MatMulNBits") == 2


def test_save_and_load_keep_the_unpacked_weights_and_repack_at_load(tmp_path) -> None:
    model, x = mlp(), torch.randn(6, 64)
    opt = fxopt.compile(model, (x,), passes=["quantize-weights(bits=4, group_size=32, budget=0.2)"])
    path = tmp_path / "model.fxopt"
    fxopt.save(opt, path)
    saved = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert saved < 0.6 * sum(p.numel() * 4 for p in model.parameters())  # int8 values, not float32
    loaded = fxopt.load(path)
    assert len(weight_only_nodes(loaded.graph_module)) == 2
    with torch.no_grad():
        expected, got = opt(x), loaded(x)
    # the loaded model measures its kernels again; two kernels differ by bfloat16 rounding
    assert float((got - expected).abs().max() / expected.abs().max()) < 0.03


# ---------------------------------------------------------------- weighted scales


def outlier_features(rows: int = 6, features: int = 64) -> torch.Tensor:
    """Inputs whose first four features are 30x larger than the rest (as LLM activations' few
    large-magnitude channels): what rounds on those weights dominates the output error."""
    torch.manual_seed(1)
    x = torch.randn(rows, features)
    x[:, :4] *= 30
    return x


def weighted_error(weight: torch.Tensor, quantized: tuple, importance: torch.Tensor) -> float:
    return float(((dequantize_weight_groupwise(*quantized) - weight).square() * importance).sum())


@pytest.mark.parametrize("bits, group_size", [(8, None), (8, 32), (4, 32), (4, 128)])
def test_the_weighted_search_lowers_the_activation_weighted_error_of_absmax(bits: int, group_size: int | None) -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 256) * 0.05
    importance = outlier_features(32, 256).square().mean(0)
    absmax = weighted_error(weight, quantize_weight_groupwise(weight, bits, group_size), importance)
    weighted = search_weight_groupwise(weight, bits, group_size, importance)
    assert weighted_error(weight, weighted, importance) < 0.9 * absmax
    # with every feature alike it is a plain weight-MSE search: never worse than absmax
    plain = torch.ones(256)
    assert (weighted_error(weight, search_weight_groupwise(weight, bits, group_size), plain)
            <= weighted_error(weight, quantize_weight_groupwise(weight, bits, group_size), plain))


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32)])
def test_weighted_scales_keep_the_layout_every_kernel_takes(bits: int, group_size: int | None) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 128)
    weight[0, 5] = -weight.abs().max() * 1.5  # the largest magnitude negative: int8 uses -128
    threads = torch.get_num_threads()
    q, scale, zero = search_weight_groupwise(weight, bits, group_size, torch.rand(128))
    assert torch.get_num_threads() == threads  # the search runs on one thread, then gives them back
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48, 128 // (group_size or 128))
    if bits == 8:
        assert zero is None and int(q.min()) == -128 and int(q.max()) <= 127
    else:
        assert zero.dtype == torch.int8 and 0 <= int(zero.min()) and int(zero.max()) <= 15
        assert 0 <= int(q.min()) and int(q.max()) <= 15
    x = torch.randn(3, 128)
    expected = torch.nn.functional.linear(x, dequantize_weight_groupwise(q, scale, zero))
    torch.testing.assert_close(weight_only_linear_op(x, q, scale, zero, None, bits, torch.float32), expected)
    assert float((expected - x @ weight.t()).abs().max() / (x @ weight.t()).abs().max()) < (0.02 if bits == 8 else 0.2)


def test_the_full_int8_range_runs_on_matmul_nbits_and_int8pack() -> None:
    from fxopt.kernels.weight_only import PACKED_KERNELS, matmul_nbits
    from fxopt.lowering.weight_only_onnx import to_matmul_nbits

    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    weight[:, 3] = -weight.abs().amax(dim=1) * 1.5  # every row's largest magnitude is negative
    q, scale, zero = search_weight_groupwise(weight, 8, None)
    assert int(q.min()) == -128
    x = torch.randn(4, 64)
    expected = torch.nn.functional.linear(x, dequantize_weight_groupwise(q, scale, zero))
    packed, scales, zero_points, block = to_matmul_nbits(q, scale, zero, 8)
    torch.testing.assert_close(matmul_nbits(x, packed, scales, zero_points, None, 64, 32, 8, block), expected)
    int8pack = PACKED_KERNELS["int8pack"]
    if int8pack.available():
        packed, qparams = int8pack.pack(q, scale, zero, torch.float32)
        torch.testing.assert_close(int8pack.run(x, packed, qparams, 64), expected, rtol=1e-4, atol=1e-4)


def test_bad_search_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="bits in"):
        search_weight_groupwise(torch.randn(4, 32), 3, None)
    with pytest.raises(ValueError, match="do not divide into groups of 32"):
        search_weight_groupwise(torch.randn(4, 48), 4, 32)
    with pytest.raises(ValueError, match=r"importance must have shape \(32,\)"):
        search_weight_groupwise(torch.randn(4, 32), 8, None, torch.ones(16))


@pytest.mark.parametrize("spec", ["quantize-weights(bits=4, group_size=32, activations='float32', budget=1.0)",
                                  "quantize-weights(activations='float32', budget=1.0)"])
def test_weighted_scales_lower_the_output_error_where_a_few_input_features_dominate(spec: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    x = outlier_features(rows=64)
    with torch.no_grad():
        expected = model(x)

    def rms_error(run) -> float:  # noqa: ANN001 -- the output error over every row, not its worst element
        (got,) = run.outputs([x])
        return float((got - expected).square().mean().sqrt() / expected.square().mean().sqrt())

    weighted = run_pass(spec, model, (x,))
    absmax = run_pass(spec.replace(")", ", scales='absmax')"), model, (x,))
    assert weighted.record.applied == absmax.record.applied == 1
    assert rms_error(weighted) < 0.8 * rms_error(absmax)


def test_graphs_on_one_models_weights_share_one_quantized_copy_per_scale_method() -> None:
    """The first graph's statistics decide the shared copy (generate()'s prefill and decode)."""
    model = mlp()
    compiled = [fxopt.compile(model, (x,), passes=[spec]) for spec, x in (
        ("quantize-weights", torch.randn(6, 64)), ("quantize-weights", outlier_features(3)),
        ("quantize-weights(scales='absmax')", torch.randn(6, 64)))]
    first, second, absmax = ({t.untyped_storage().data_ptr() for t in opt.graph_module.buffers()
                              if t.dtype == torch.int8} for opt in compiled)
    assert len(first) == 2 and second == first and absmax.isdisjoint(first)
