"""Real architectures from small configs through the ONNX Runtime backend and export."""

from __future__ import annotations

import onnx
import pytest
import torch

import fxopt
from fxopt.testing import assert_outputs_close

transformers = pytest.importorskip("transformers")

VOCAB = 100


def _bert():
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.BertModel(config)


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config)


def _llama():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                      max_position_embeddings=64, use_cache=False)
    return transformers.LlamaModel(config)


def _t5():
    config = transformers.T5Config(num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=VOCAB,
                                   feed_forward_proj="gated-gelu")
    return transformers.T5EncoderModel(config)


MODELS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "t5": _t5}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_backend_matches_eager(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    opt = fxopt.compile(model, (ids,), backend="onnx")
    assert any("on CPUExecutionProvider" in n for n in opt.report.notes)
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    assert_outputs_close([opt(ids).last_hidden_state], [expected])


@pytest.mark.slow
def test_gpt2_export_has_fused_gelu(tmp_path):
    """GPT-2's written-out tanh GELU becomes one ONNX Gelu node per layer after swap-activations."""
    torch.manual_seed(0)
    model = _gpt2().eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    path, report = fxopt.export_onnx(model, (ids,), tmp_path / "gpt2.onnx", passes=["swap-activations"])
    assert report["swap-activations"].applied == 2
    proto = onnx.load(path)
    assert sum(n.op_type == "Gelu" for n in proto.graph.node) == 2
    assert not any(n.op_type == "Tanh" for n in proto.graph.node)
    assert [o.name for o in proto.graph.output][0] == "last_hidden_state"
