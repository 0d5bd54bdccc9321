"""Real architectures from small configs through the ONNX Runtime backend and export."""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import tiny_transformer, token_ids

import fxopt
from fxopt.testing import assert_outputs_close

pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "t5"])
def test_onnx_backend_matches_eager(kind):
    model = tiny_transformer(kind)
    ids = token_ids()
    opt = fxopt.compile(model, (ids,), backend="onnx")
    assert any("on CPUExecutionProvider" in n for n in opt.report.notes)
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    assert_outputs_close([opt(ids).last_hidden_state], [expected])


@pytest.mark.slow
def test_gpt2_export_has_fused_gelu(tmp_path):
    """GPT-2's written-out tanh GELU becomes one ONNX Gelu node per layer after swap-activations."""
    model = tiny_transformer("gpt2")
    path, report = fxopt.export_onnx(model, (token_ids(),), tmp_path / "gpt2.onnx", passes=["swap-activations"])
    assert report["swap-activations"].applied == 2
    proto = onnx.load(path)
    assert sum(n.op_type == "Gelu" for n in proto.graph.node) == 2
    assert not any(n.op_type == "Tanh" for n in proto.graph.node)
    assert [o.name for o in proto.graph.output][0] == "last_hidden_state"
