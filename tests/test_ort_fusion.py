"""The ONNX backend writes ONNX Runtime's fused contrib ops itself (fxopt/lowering/ort_*.py)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_transformer, token_ids
from torch.export import Dim

import fxopt
from fxopt.kernels import ort_fused
from fxopt.lowering import lower_graph, registered_lowering
from fxopt.lowering.ort_skip_layer_norm import OrtSkipLayerNorm

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

MSFT = "com.microsoft"


def _ops(path: str) -> Counter[tuple[str, str]]:
    return Counter((n.domain or "", n.op_type) for n in onnx.load(path).graph.node)


def _padded_mask(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, ids.shape[1] // 2:] = 0  # a padded sample: the mask must be applied exactly
    return mask


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def _ort_run(path: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})[0])


@pytest.mark.slow
def test_bert_exports_contrib_ops_and_runs_any_batch_and_length(tmp_path):
    model = tiny_transformer("bert")  # 2 layers
    ids = token_ids(batch=2, seq=8)
    batch, seq = Dim("batch"), Dim("seq", max=32)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    opt = fxopt.compile(model, (ids, _padded_mask(ids)), dynamic_shapes=shapes)
    with registered_lowering(OrtSkipLayerNorm):  # opt-in: slower than Add + LayerNorm on CPU
        path, report = fxopt.export_onnx(opt, (ids, _padded_mask(ids)), tmp_path / "bert.onnx")
    ops = _ops(path)
    # merge-siblings packed Q/K/V into one Linear: the Attention op takes it whole
    assert ops[(MSFT, "Attention")] == 2 and ops[(MSFT, "MultiHeadAttention")] == 0
    assert ops[("", "Split")] == 0
    assert ops[(MSFT, "SkipLayerNormalization")] == 4  # after attention and after the MLP, per layer
    assert ops[(MSFT, "BiasGelu")] == 2
    assert ops[("", "Softmax")] == 0 and ops[("", "Gelu")] == 0
    assert ops[("", "LayerNormalization")] == 1  # the embeddings' LayerNorm has no residual
    notes = " | ".join(report.notes)
    assert "ort-skip-layer-norm: 4 residual LayerNorm(s)" in notes and "4 with the Linear's bias" in notes
    # The embeddings' LayerNorm adds a broadcast [1, S, C] position term: not two [B, S, C] inputs.
    assert "stays Add + LayerNorm: shape" in notes
    for b, s in ((2, 8), (3, 13), (1, 5)):
        ids = token_ids(batch=b, seq=s)
        mask = _padded_mask(ids)
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = _ort_run(path, {"input_ids": ids, "attention_mask": mask})
        assert _rel(actual, expected) < 1e-4


@pytest.mark.slow
def test_onnx_backend_fused_bert_matches_eager_with_padding():
    model = tiny_transformer("bert")
    ids = token_ids(batch=3, seq=8)
    mask = _padded_mask(ids)
    opt = fxopt.compile(model, (ids,), backend="onnx", example_kwargs={"attention_mask": mask})
    notes = " | ".join(opt.report.notes)
    assert "ort-attention: 2 attention(s) with a packed Q/K/V projection run as com.microsoft.Attention" in notes
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
    assert _rel(opt(ids, attention_mask=mask).last_hidden_state, expected) < 1e-4


@pytest.mark.parametrize(("passes", "op"), [(["remove-dropout", "merge-siblings"], "Attention"),
                                                 (["remove-dropout"], "MultiHeadAttention")])
def test_fully_padded_row_is_zero_attention_like_sdpa(passes, op):
    """A row of the batch that is all padding: SDPA gives its queries zero attention output
    (no key to attend to); the fused op must too, not NaN from a row of -inf scores."""
    model = tiny_transformer("bert")
    ids = token_ids(batch=3, seq=8)
    opt = fxopt.compile(model, (ids,), passes=passes, backend="onnx",
                        example_kwargs={"attention_mask": _padded_mask(ids)})
    assert any(f"run as com.microsoft.{op}" in n for n in opt.report.notes)
    ids = token_ids(batch=4, seq=8)
    mask = _padded_mask(ids)
    mask[1] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
    actual = opt(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(actual).all()
    assert _rel(actual, expected) < 1e-4


@pytest.mark.slow
def test_gpt2_causal_attention_fuses_and_pre_norm_residuals_stay(tmp_path):
    """GPT-2's causal mask is a tensor in the graph (no is_causal flag): MultiHeadAttention
    takes it as its bias. Its pre-norm residual sums feed the next residual too, which
    SkipLayerNormalization cannot hand on: those stay, with the reason."""
    model = tiny_transformer("gpt2")
    ids = token_ids()
    mask = _padded_mask(ids)
    with registered_lowering(OrtSkipLayerNorm):
        path, report = fxopt.export_onnx(model, (ids,), tmp_path / "gpt2.onnx", passes=["swap-activations"])
    ops = _ops(path)
    assert ops[(MSFT, "Attention")] == 2  # c_attn is one packed Q/K/V projection
    assert ops[("", "Gelu")] == 2 and ops[(MSFT, "FastGelu")] == 0  # tanh GELU is never BiasGelu
    notes = " | ".join(report.notes)
    assert "sum-used-elsewhere" in notes
    opt = fxopt.compile(model, (ids,), passes=["swap-activations"], backend="onnx",
                        example_kwargs={"attention_mask": mask})
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
    assert _rel(opt(ids, attention_mask=mask).last_hidden_state, expected) < 1e-4


@pytest.mark.slow
def test_llama_rotary_and_grouped_heads_still_match():
    """Rotary embeddings are applied after the head split: the query and key go back to
    [B, S, N*H] through a transpose; the repeated key/value heads make N heads."""
    model = tiny_transformer("llama")
    ids = token_ids()
    opt = fxopt.compile(model, (ids,), backend="onnx")
    assert any("2 attention(s) run as com.microsoft.MultiHeadAttention" in n for n in opt.report.notes)
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    assert _rel(opt(ids).last_hidden_state, expected) < 1e-4


class ResidualOut(torch.nn.Module):
    """A residual LayerNorm whose sum is also returned, and a causal-flag SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total = self.proj(x) + x
        q = x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        attn = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return self.norm(total), total, attn


def test_unpacked_projections_use_multi_head_attention():
    """Without merge-siblings, Q, K and V are three Linears: MultiHeadAttention takes them."""
    model = tiny_transformer("bert")
    ids = token_ids(batch=2, seq=8)
    opt = fxopt.compile(model, (ids,), passes=["remove-dropout"])
    lowered = lower_graph(opt.graph_module, "onnx", None)
    targets = Counter(n.target for n in lowered.graph_module.graph.nodes if n.op == "call_function")
    assert targets[ort_fused.multi_head_attention._opoverload] == 2
    assert targets[ort_fused.attention._opoverload] == 0
    torch.testing.assert_close(lowered.graph_module(ids)[0], opt.graph_module(ids)[0], rtol=1e-5, atol=1e-6)


def test_unfusable_patterns_are_left_alone_with_a_reason():
    model = ResidualOut().eval()
    x = torch.randn(2, 5, 16)
    opt = fxopt.compile(model, (x,), passes=[])
    with registered_lowering(OrtSkipLayerNorm):
        lowered = lower_graph(opt.graph_module, "onnx", None)
    gm = lowered.graph_module
    notes = " | ".join(lowered.notes)
    assert "stays Add + LayerNorm: sum-used-elsewhere" in notes
    assert "stays SDPA: causal-flag" in notes
    targets = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    assert targets[torch.ops.aten.layer_norm.default] == 1
    assert targets[torch.ops.aten.scaled_dot_product_attention.default] == 1
    assert targets[ort_fused.skip_layer_norm._opoverload] == 0


def test_lowered_graph_runs_in_torch_and_matches():
    """The fused ops have eager reference implementations: the lowered graph is runnable and
    is checked against the graph before lowering."""
    model = tiny_transformer("bert")
    ids = token_ids(batch=2, seq=8)
    mask = _padded_mask(ids)
    opt = fxopt.compile(model, (ids,), example_kwargs={"attention_mask": mask})
    with registered_lowering(OrtSkipLayerNorm):
        lowered = lower_graph(opt.graph_module, "onnx", None).graph_module
    targets = Counter(n.target for n in lowered.graph.nodes if n.op == "call_function")
    assert targets[ort_fused.attention._opoverload] == 2
    assert targets[ort_fused.skip_layer_norm._opoverload] == 4
    assert targets[ort_fused.bias_gelu._opoverload] == 2
    assert targets[torch.ops.aten.scaled_dot_product_attention.default] == 0
    flat = [ids, mask]
    expected = opt.graph_module(*flat)
    actual = lowered(*flat)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert opt.graph_module is not lowered  # the optimized graph itself is left as it was
    assert not any(n.target == ort_fused.attention._opoverload for n in opt.graph_module.graph.nodes)


def test_reference_attention_equals_sdpa_with_a_boolean_mask():
    q, k, v = (torch.randn(2, 5, 12) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    out = ort_fused.multi_head_attention(q, k, v, mask, 3, 0.5)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 5, 3, 4).transpose(1, 2)

    expected = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask,
                                                                scale=0.5)
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(2, 5, 12))


@pytest.mark.slow
def test_int8_projections_feed_fused_attention():
    model = tiny_transformer("bert")
    ids = token_ids(batch=2, seq=8)
    passes = ["remove-dropout", "quantize-int8(activations='dynamic-tensor')"]
    opt = fxopt.compile(model, (ids,), passes=passes, backend="onnx")
    notes = " | ".join(opt.report.notes)
    assert "int8-linear:" in notes
    assert "ort-attention: 2 attention(s) run as com.microsoft.MultiHeadAttention" in notes
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    assert _rel(opt(ids).last_hidden_state, expected) < 0.05


def test_skip_layer_norm_is_opt_in_and_the_cpu_session_keeps_add_and_layer_norm(tmp_path):
    """On CPU, ONNX Runtime's SkipLayerNormalization is slower than Add + LayerNormalization:
    fxopt writes none by default and keeps ONNX Runtime from fusing them itself."""
    import json

    from fxopt.backends.onnx import ort_session

    model = tiny_transformer("bert")
    ids = token_ids(batch=2, seq=8)
    path, report = fxopt.export_onnx(model, (ids,), tmp_path / "bert.onnx")
    assert _ops(path)[(MSFT, "SkipLayerNormalization")] == 0
    assert not any(n.startswith("ort-skip-layer-norm") for n in report.notes)
    session = ort_session(tmp_path / "bert.onnx", torch.device("cpu"), profile_dir=str(tmp_path))
    session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with open(session.end_profiling()) as f:
        ran = {e["args"]["op_name"] for e in json.load(f) if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    assert "LayerNormalization" in ran and "SkipLayerNormalization" not in ran
    assert "Attention" in ran and "BiasGelu" in ran


def test_portable_export_writes_standard_onnx_only(tmp_path):
    model = tiny_transformer("bert")
    ids = token_ids(batch=2, seq=8)
    opt = fxopt.compile(model, (ids, _padded_mask(ids)))
    path, report = fxopt.export_onnx(opt, (ids, _padded_mask(ids)), tmp_path / "bert.onnx", portable=True)
    ops = _ops(path)
    assert not [op for op in ops if op[0] not in ("", "ai.onnx")]  # no runtime's own domain
    assert ops[("", "Softmax")] == 2 and ops[("", "Gelu")] == 2
    notes = " | ".join(report.notes)
    assert "ort-attention: not used in a portable export (it writes com.microsoft ops)" in notes
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=_padded_mask(ids)).last_hidden_state
    actual = _ort_run(path, {"input_ids": ids, "attention_mask": _padded_mask(ids)})
    assert _rel(actual, expected) < 1e-4


class _GroupedAttention(torch.nn.Module):
    """Four query heads over two key/value heads, as SDPA's ``enable_gqa`` takes them."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def test_grouped_query_attention_exports_with_its_key_value_heads_repeated():
    from fxopt.ir import count_ops
    from fxopt.lowering.onnx_repeat_kv import SDPA

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    opt = fxopt.compile(_GroupedAttention(), (q, k, v), backend="onnx")
    assert any(note.startswith("onnx-repeat-kv: 1 grouped-query attention(s)") for note in opt.report.notes)
    lowered = lower_graph(opt.graph_module, "onnx", None).graph_module
    # each key/value head repeated twice; no attention is left asking for enable_gqa
    assert count_ops(lowered, torch.ops.aten.repeat_interleave.self_int) == 2
    assert not [n for n in lowered.graph.nodes if n.target is SDPA and n.kwargs.get("enable_gqa")]
    with torch.no_grad():  # ONNX Runtime's outputs are the model's
        torch.testing.assert_close(opt(q, k, v), _GroupedAttention()(q, k, v))


def test_attention_without_grouped_heads_is_not_repeated():
    from fxopt.lowering.onnx_repeat_kv import OnnxRepeatKv

    q = torch.randn(1, 4, 6, 8)

    class Plain(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    gm = fxopt.capture(Plain(), (q, q.clone(), q.clone()))
    assert not OnnxRepeatKv().applies(gm)
