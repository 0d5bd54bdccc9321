"""A large model's preset race on a stand-in (fxopt.proxy): the model cut to its first blocks
computes what a model of those blocks computes; past the memory bound the candidates race
there and only the fastest within the budget is built for the whole model."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.ir import constants
from fxopt.proxy import PROXY_BLOCKS, cut_after_blocks

transformers = pytest.importorskip("transformers")


def _config(layers: int) -> object:
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=300, use_cache=False)


def _llama(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaModel(_config(layers)).eval()


def test_the_cut_computes_what_the_models_first_blocks_compute_and_holds_only_their_weights() -> None:
    model, x = _llama(7), torch.randint(0, 300, (2, 16))
    gm = fxopt.capture(model, (x,))
    cut, blocks = cut_after_blocks(gm, PROXY_BLOCKS)
    assert blocks == 7
    first = transformers.LlamaModel(_config(PROXY_BLOCKS)).eval()
    first.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < PROXY_BLOCKS})
    with torch.no_grad():
        expected = first(x).last_hidden_state
        torch.testing.assert_close(cut(x)[0], expected, rtol=0, atol=0)
        torch.testing.assert_close(gm(x)[0], model(x).last_hidden_state, rtol=0, atol=0)  # the graph is as it was
    held = {name for name, _ in constants(cut)}
    assert held and all(not name.startswith(("layers_2", "layers_6")) for name in held)
    shared = {t.untyped_storage().data_ptr() for _, t in constants(gm)}
    assert all(t.untyped_storage().data_ptr() in shared for _, t in constants(cut))  # no copy


def test_a_model_with_few_or_no_repeated_blocks_has_no_cut() -> None:
    x = torch.randint(0, 300, (2, 16))
    assert cut_after_blocks(fxopt.capture(_llama(3), (x,)), PROXY_BLOCKS) is None
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)).eval()
    assert cut_after_blocks(fxopt.capture(mlp, (torch.randn(2, 8),)), PROXY_BLOCKS) is None


def test_past_the_memory_bound_the_int8_candidates_race_on_the_cut_and_one_is_built_whole() -> None:
    model, x = _llama(6), torch.randint(0, 300, (2, 16))
    opt = fxopt.compile(model, (x,), preset="int8", backend="eager", memory_bound=1 << 16)
    notes = [n for n in opt.report.notes if n.startswith("preset int8")]
    assert "raced on a stand-in (the model's first 2 of 6 blocks)" in notes[0], notes
    summary = notes[1]
    assert summary.count("ms on the stand-in") == 2 and summary.count("built in") == 1, summary
    assert "not built: " in summary and "fastest of 2 within budget 0.05" in summary
    with torch.no_grad():
        expected = model(x).last_hidden_state
        error = (opt(x)[0] - expected).abs().max() / expected.abs().max()
    assert error <= 0.05 and opt.report.final_max_rel_err <= 0.05
