"""merge-siblings on transformers models built from small configs (random weights)."""

import pytest
import torch
import torch.utils._pytree as pytree

from fxopt.ir import module_path, ops
from fxopt.testing import PassRun, assert_outputs_close, run_pass

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

LAYERS = 2


def assert_matches_eager(run: PassRun) -> None:
    """The rewritten graph's outputs against the eager model's (a ModelOutput, flattened)."""
    with torch.no_grad():
        expected = pytree.tree_leaves(run.model(*run.batches[0]))
    assert_outputs_close(run.outputs(), expected)


def test_bert_qkv_become_one_linear_per_layer() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=64, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    run = run_pass("merge-siblings", model, (ids,))
    assert run.count(ops.split_with_sizes) == LAYERS
    assert run.count_before(ops.linear) - run.count(ops.linear) == 2 * LAYERS
    splits = [n for n in run.after.graph.nodes if n.target == ops.split_with_sizes]
    assert all(list(s.args[1]) == [32, 32, 32] for s in splits)
    merged = [s.args[0] for s in splits]
    assert [module_path(m) for m in merged] == [f"encoder.layer.{i}.attention.self" for i in range(LAYERS)]
    assert_matches_eager(run)


def test_llama_gqa_qkv_and_gate_up_each_become_one_linear() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                                      max_position_embeddings=32, use_cache=False)
    model = transformers.LlamaModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    run = run_pass("merge-siblings", model, (ids,))
    widths = sorted(tuple(n.args[1]) for n in run.after.graph.nodes if n.target == ops.split_with_sizes)
    # q is 4 heads of 8, k and v 2 heads each; gate and up are 64 wide
    assert widths == [(32, 16, 16)] * LAYERS + [(64, 64)] * LAYERS
    assert run.count_before(ops.linear) == 7 * LAYERS
    assert run.count(ops.linear) == 4 * LAYERS
    assert_matches_eager(run)


class Seq2Seq(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).last_hidden_state


def test_t5_cross_attention_keys_and_values_merge_across_layers() -> None:
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=4,
                                   d_ff=64, d_kv=8, vocab_size=64, use_cache=False)
    model = Seq2Seq(transformers.T5Model(config)).eval()
    ids, dec = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 5))
    run = run_pass("merge-siblings", model, (ids, dec))
    # Every decoder layer's cross-attention k and v read the encoder output: one Linear for all
    # of them; each self-attention's q, k, v read one normed input: one Linear per attention.
    widths = sorted(len(n.args[1]) for n in run.after.graph.nodes if n.target == ops.split_with_sizes)
    assert widths == [3] * (2 * LAYERS) + [2 * LAYERS]
    # The cross-attention q reads the decoder state, not the encoder output: it stays alone.
    assert_matches_eager(run)
