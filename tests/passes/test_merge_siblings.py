import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir import ops
from fxopt.testing import assert_idempotent, assert_skipped, run_pass


class Heads(nn.Module):
    """Three projections of one input, grouped-query style: q wider than k and v, v without bias."""

    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.q = nn.Linear(d, 32)
        self.k = nn.Linear(d, 16)
        self.v = nn.Linear(d, 16, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = self.q(x).view(*x.shape[:-1], 4, 8)
        return q, self.k(x) * 2, self.v(x).relu()


class CrossAttention(nn.Module):
    """T5 cross-attention: k and v read the encoder output, q reads the decoder state."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, dec: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        scores = self.q(dec) @ self.k(enc).transpose(-1, -2)
        return scores.softmax(-1) @ self.v(enc)


class TiedSibling(nn.Module):
    """``a`` runs on two inputs, so its weight is read by two Linears."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, 8)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.a(x), self.b(x), self.a(z)


def test_merges_unequal_widths_and_mixed_bias_into_one_linear() -> None:
    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 5, 24)
    run = run_pass("merge-siblings", model, (x,))
    assert run.count_before(ops.linear) == 3
    assert run.count(ops.linear) == 1
    assert run.count(ops.split_with_sizes) == 1
    (split,) = [n for n in run.after.graph.nodes if n.target == ops.split_with_sizes]
    assert list(split.args[1]) == [32, 16, 16]
    run.assert_outputs_match()
    assert run.record.after.flops == run.record.before.flops


def test_any_number_of_leading_dims() -> None:
    torch.manual_seed(0)
    for shape in [(24,), (7, 24), (2, 3, 4, 24)]:
        model, x = Heads().eval(), torch.randn(*shape)
        run = run_pass("merge-siblings", model, (x,))
        assert run.count(ops.linear) == 1, shape
        run.assert_outputs_match()


def test_partial_group_merges_only_the_siblings() -> None:
    torch.manual_seed(0)
    model = CrossAttention().eval()
    run = run_pass("merge-siblings", model, (torch.randn(2, 3, 16), torch.randn(2, 7, 16)))
    assert run.count(ops.linear) == 2  # q alone, k+v merged
    assert run.count(ops.split_with_sizes) == 1
    assert run.record.applied == 1
    run.assert_outputs_match()


def test_weight_used_elsewhere_is_left_alone() -> None:
    torch.manual_seed(0)
    model = TiedSibling().eval()
    run = run_pass("merge-siblings", model, (torch.randn(4, 16), torch.randn(4, 16)))
    assert not run.modified
    assert run.count(ops.linear) == 3
    assert_skipped(run, "weight tensor is also used by", code="shared-constant", node="linear")
    assert_skipped(run, "only 1 sibling", code="too-few-siblings")


def test_min_group_option() -> None:
    torch.manual_seed(0)
    model = CrossAttention().eval()
    inputs = (torch.randn(2, 3, 16), torch.randn(2, 7, 16))
    run = run_pass(fxopt.passes.MergeSiblings(min_group=3), model, inputs)
    assert not run.modified
    assert_skipped(run, "only 2 sibling Linear(s) can merge here (min_group=3)", code="too-few-siblings")


def test_constants_are_concatenated_at_compile_time() -> None:
    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 5, 24)
    run = run_pass("merge-siblings", model, (x,))
    assert run.count(torch.ops.aten.cat.default) == 0
    (linear,) = [n for n in run.after.graph.nodes if n.target == ops.linear]
    weight = getattr(run.after, linear.args[1].target)
    bias = getattr(run.after, linear.args[2].target)
    assert torch.equal(weight, torch.cat([model.q.weight, model.k.weight, model.v.weight]))
    assert torch.equal(bias[-16:], torch.zeros(16))


def test_idempotent() -> None:
    torch.manual_seed(0)
    assert_idempotent("merge-siblings", Heads().eval(), (torch.randn(2, 5, 24),))
    assert_idempotent("merge-siblings", TiedSibling().eval(), (torch.randn(4, 16), torch.randn(4, 16)))


def test_bad_option_is_refused() -> None:
    try:
        fxopt.get_pass("merge-siblings", min_group=1)
    except fxopt.PassOptionError as exc:
        assert "min_group" in str(exc)
    else:
        raise AssertionError("min_group=1 was accepted")


def test_default_pipeline_merges_the_demo_heads() -> None:
    from fxopt.demo import build_demo
    from fxopt.registry import default_pipeline

    names = [p.name for p in default_pipeline()]
    assert names.index("remove-dropout") < names.index("merge-consecutive") < names.index("merge-siblings")
    assert "low-rank" not in names and "prune-hidden" not in names
    model, (x,) = build_demo(batch=8, d_in=64, hidden=128)
    opt = fxopt.compile(model, (x,), strict=True)
    assert opt.report["merge-siblings"].applied == 1
    graph = opt.graph_module
    (split,) = [n for n in graph.graph.nodes if n.target == ops.split_with_sizes]
    assert list(split.args[1]) == [128, 64, 32]
    assert fxopt.testing.count_ops(graph, ops.linear) == 3  # two tower layers and the merged heads
    with torch.no_grad():
        fxopt.testing.assert_outputs_close(list(opt(x)), list(model(x)))


class _ChainedGroups(nn.Module):
    """A second sibling group reads the output of a member of the first group."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(3))
        self.b = nn.ModuleList(nn.Linear(4, 3, bias=False) for _ in range(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        first, second, third = (layer(x) for layer in self.a)
        return self.b[0](first) + self.b[1](first), second, third


def test_group_reading_a_merged_sibling_uses_the_current_input() -> None:
    # found by the random-graph fuzzer: the second group kept a reference to the replaced Linear
    run = run_pass("merge-siblings", _ChainedGroups().eval(), (torch.randn(2, 4),))
    assert run.record.applied == 2
    assert run.count(ops.linear) == 2
    run.assert_outputs_match()


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(8, 12), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q(x), self.k(x)


def test_outputs_are_contiguous_tensors_of_their_own() -> None:
    # a split piece is a strided window of the merged output: out.view(-1) fails on it, and it
    # keeps the whole merged buffer alive
    torch.manual_seed(0)
    for model, x in [(TwoHeads().eval(), torch.randn(3, 5, 8)), (Heads().eval(), torch.randn(2, 5, 24))]:
        opt = fxopt.compile(model, (x,), passes=["merge-siblings"], strict=True)
        assert opt.report["merge-siblings"].applied == 1
        with torch.no_grad():
            outputs, expected = opt(x), model(x)
        for out, want in zip(outputs, expected):
            assert out.is_contiguous() and out.untyped_storage().nbytes() == out.numel() * out.element_size()
            torch.testing.assert_close(out.view(-1), want.reshape(-1))


def _int8_stage(model: nn.Module, x: torch.Tensor, passes: list[str], calibration: list | None = None):
    from fxopt.registry import resolve_passes
    from fxopt.session import Session, SessionOptions

    session = Session(model, (x,), SessionOptions(calibration=calibration, fresh_inputs=False))
    return session.run(resolve_passes(passes))


@pytest.mark.parametrize("activations", ["dynamic-tensor", "dynamic", "static"])
def test_int8_siblings_merge_after_quantizing(activations: str) -> None:
    """q, k, v quantized alike -> one int8 Linear over the stacked int8 rows and scales, its input
    quantized once; the outputs are the unmerged int8 graph's."""
    from fxopt.ir import constant
    from fxopt.ir.qdq import match_qdq_linear, qops

    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 5, 24)
    calibration = [(torch.randn(2, 5, 24),) for _ in range(3)] if activations == "static" else None
    quantize = f"quantize-int8(activations='{activations}', budget=1.0, force=True)"
    alone = _int8_stage(model, x, [quantize], calibration)
    merged = _int8_stage(model, x, [quantize, "merge-siblings"], calibration)
    record = merged.records[-1]
    assert record.status == "applied" and record.applied == 1
    (linear,) = [n for n in merged.gm.graph.nodes if n.target is ops.linear]
    qdq = match_qdq_linear(merged.gm, linear)
    assert qdq is not None and qdq.x.op == "placeholder"
    weight, scales = constant(merged.gm, qdq.qweight), constant(merged.gm, qdq.weight_scale)
    assert weight.dtype == torch.int8 and tuple(weight.shape) == (64, 24) and tuple(scales.shape) == (64,)
    # no float copy of the stacked weights: every float constant is a bias or a scale
    assert all(t.dtype == torch.int8 or t.dim() == 1 for t in merged.gm.state_dict().values())
    quantizers = (qops.quantize_per_tensor_dynamic, qops.quantize_per_token, qops.quantize_per_tensor)
    assert sum(n.target in quantizers for n in merged.gm.graph.nodes) == 1
    before = [n for n in alone.gm.graph.nodes if n.target is ops.linear]
    parts = torch.cat([constant(alone.gm, match_qdq_linear(alone.gm, n).qweight) for n in before])
    assert torch.equal(weight, parts)
    # quantize-int8 wrote the siblings' rows into one tensor, which the merged Linear reads as
    # it is: no copy (both sessions quantize the model's same weights, found once: derived())
    first = constant(alone.gm, match_qdq_linear(alone.gm, before[0]).qweight)
    assert weight.data_ptr() == first.data_ptr() and weight.untyped_storage().nbytes() == 64 * 24
    for expected, actual in zip(alone.gm(x), merged.gm(x)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # quantizing again after the merge finds the same rows, each sibling its own
    again = _int8_stage(model, x, [quantize], calibration)
    for expected, actual in zip(alone.gm(x), again.gm(x)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_sibling_the_search_leaves_float_leaves_no_int8_rows_behind() -> None:
    """k's rows each hold one large weight, on an input that is zero, among the others (its
    per-channel int8 step rounds them coarsely), so the budget keeps k float: q and v are
    quantized into memory of their own, not rows of a tensor that also holds k's, and merge as
    before."""
    from fxopt.ir import constant
    from fxopt.ir.qdq import match_qdq_linear

    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 5, 24)
    x[..., 0] = 0.0
    with torch.no_grad():
        model.k.weight[:, 0] = 50.0
    stage = _int8_stage(model, x, ["quantize-int8(activations='dynamic-tensor', budget=0.05, force=True)"])
    record = stage.records[-1]
    assert record.applied == 2 and record.skipped["over-budget"] == 1
    assert [s.node for s in record.skips] == ["linear_1"]  # k
    for node in stage.gm.graph.nodes:
        qdq = match_qdq_linear(stage.gm, node) if node.target is ops.linear else None
        if qdq is not None:
            weight = constant(stage.gm, qdq.qweight)
            assert weight.untyped_storage().nbytes() == weight.numel()
    merged = _int8_stage(model, x, ["quantize-int8(activations='dynamic-tensor', budget=0.05, force=True)",
                                    "merge-siblings"])
    assert merged.records[-1].applied == 1
    for expected, actual in zip(stage.gm(x), merged.gm(x)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_a_sibling_left_float_does_not_merge_with_int8_ones() -> None:
    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 5, 24)
    quantize = "quantize-int8(activations='dynamic-tensor', budget=1.0, force=True, exclude='^q$')"
    stage = _int8_stage(model, x, [quantize, "merge-siblings"])
    assert stage.records[-1].applied == 1  # k and v; q reads x itself, not x quantized
    linears = [n for n in stage.gm.graph.nodes if n.target is ops.linear]
    assert len(linears) == 2
    torch.testing.assert_close(stage.gm(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)


def test_int8_siblings_too_few_to_merge_are_left_apart_with_the_reason() -> None:
    """k and v quantized alike, q left float: with min_group=3 the int8 pair is too few, and
    each says so; the graph keeps three Linears and the int8 one's outputs."""
    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 5, 24)
    quantize = "quantize-int8(activations='dynamic-tensor', budget=1.0, force=True, exclude='^q$')"
    stage = _int8_stage(model, x, [quantize, "merge-siblings(min_group=3)"])
    record = stage.records[-1]
    assert record.applied == 0 and record.skipped["too-few-siblings"] == 2
    assert all("only 2 sibling Linear(s)" in s.detail for s in record.skips if s.code == "too-few-siblings")
    assert sum(1 for n in stage.gm.graph.nodes if n.target is ops.linear) == 3
    alone = _int8_stage(model, x, [quantize])
    for expected, actual in zip(alone.gm(x), stage.gm(x)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_past_the_memory_bound_float_siblings_stay_apart_and_int8_ones_merge() -> None:
    """In a model whose weights exceed the compile's memory bound, merging float siblings would
    copy the model's weights: refused, with the reason; int8 siblings merge (no copy)."""
    from fxopt.registry import resolve_passes
    from fxopt.session import Session, SessionOptions

    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 5, 24)
    bound = SessionOptions(fresh_inputs=False, memory_bound=1024)  # below the model's 7 KiB of weights
    floats = Session(model, (x,), bound).run(resolve_passes(["merge-siblings"])).records[-1]
    assert floats.status != "applied"
    assert [(s.code, s.detail) for s in floats.skips] == [("copy-past-memory-bound", (
        "merging float siblings would copy 6144 bytes of the model's weights, and they exceed the compile's "
        "memory bound (memory_bound= raises it)"))] * 3
    unbounded = Session(model, (x,), SessionOptions(fresh_inputs=False)).run(resolve_passes(["merge-siblings"]))
    assert unbounded.records[-1].status == "applied"
    quantize = "quantize-int8(activations='dynamic', budget=1.0, force=True)"
    int8 = Session(model, (x,), bound).run(resolve_passes([quantize, "merge-siblings"])).records[-1]
    assert int8.status == "applied" and int8.applied == 1
