"""A large model's preset race on stand-ins (fxopt.proxy): a stand-in runs a sample of the
model's blocks as a candidate's passes left them; past the memory bound each candidate's passes
run on the whole model, the stand-ins race, and only the fastest is lowered whole."""

from __future__ import annotations

import pytest
import torch

import fxopt
import fxopt.proxy
from fxopt.ir import constants, ops
from fxopt.proxy import kept_blocks, stand_in
from fxopt.session import Session

transformers = pytest.importorskip("transformers")


def _llama(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300, use_cache=False)
    return transformers.LlamaModel(config).eval()


def test_a_stand_in_runs_the_first_two_blocks_and_some_spread_to_the_last_each_on_its_own_weights() -> None:
    assert kept_blocks(22) == [0, 1, 11, 21] and kept_blocks(8) == [0, 1, 4, 7]
    model, x = _llama(8), torch.randint(0, 300, (2, 16))
    gm = fxopt.capture(model, (x,))
    cut, what = stand_in(gm)
    assert what == "blocks 0, 1, 4, 7 of 8"
    held = {name.split("_")[1] for name, _ in constants(cut) if name.startswith("layers_")}
    assert held == {"0", "1", "4", "7"}
    shared = {t.untyped_storage().data_ptr() for _, t in constants(gm)}
    assert all(t.untyped_storage().data_ptr() in shared for _, t in constants(cut))  # no copy
    assert len(list(n for n in cut.graph.nodes if n.target == ops.linear)) == 4 * 7

    # It computes the model's layers 0, 1, 4 and 7 one after another, and the final norm.
    layers = model.layers
    with torch.no_grad():
        h = model.embed_tokens(x)
        positions = torch.arange(x.shape[1])[None]
        rotary = model.rotary_emb(h, positions)
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
        for k in (0, 1, 4, 7):
            h = layers[k](h, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
            h = h[0] if isinstance(h, tuple) else h
        expected = model.norm(h)
        torch.testing.assert_close(cut(x)[0], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gm(x)[0], model(x).last_hidden_state, rtol=0, atol=0)  # the graph is as it was


def test_a_model_with_few_or_no_repeated_blocks_has_no_stand_in() -> None:
    x = torch.randint(0, 300, (2, 16))
    assert stand_in(fxopt.capture(_llama(5), (x,))) is None
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)).eval()
    assert stand_in(fxopt.capture(mlp, (torch.randn(2, 8),))) is None


def test_past_the_memory_bound_the_int8_candidates_race_on_stand_ins_and_one_is_lowered_whole(monkeypatch) -> None:
    model, x = _llama(8), torch.randint(0, 300, (2, 16))
    events: list[object] = []
    cut, run = fxopt.proxy.stand_in, Session.run
    monkeypatch.setattr(fxopt.proxy, "stand_in", lambda gm: events.append("cut") or cut(gm))
    monkeypatch.setattr(Session, "run", lambda self, pipeline, **kw: events.append(
        tuple(str(p) for p in pipeline if not p.exact)) or run(self, pipeline, **kw))
    opt = fxopt.compile(model, (x,), preset="int8", backend="eager", memory_bound=1 << 16)
    # every candidate searched the whole model before the first stand-in was cut (none is held
    # while another searches); the first cut only asks whether the captured graph has one
    first_cut = events.index("cut", 1)
    assert len({e for e in events[:first_cut] if e and e != "cut"}) == 2, events
    notes = [n for n in opt.report.notes if n.startswith("preset int8")]
    assert "a stand-in of a sample of its blocks was lowered and raced" in notes[0], notes
    summary = notes[1]
    assert summary.count("ms on its stand-in") == 2 and "fastest of 2 within budget 0.05" in summary, summary
    assert summary.count("not lowered whole: ") == 1
    assert not any(n.startswith("a stand-in") for n in opt.report.notes)  # the whole model was lowered
    with torch.no_grad():
        expected = model(x).last_hidden_state
        error = (opt(x)[0] - expected).abs().max() / expected.abs().max()
    assert error <= 0.05 and opt.report.final_max_rel_err <= 0.05
    linears = [n for n in opt.graph_module.graph.nodes if n.target == ops.linear]
    assert len(linears) < 8 * 7  # the whole model was quantized
    # merge-siblings, exact and after the search, ran on the stand-ins for the race and on the
    # whole model for the one lowered whole: its groups there span more than a stand-in's 4 blocks
    merged = next(r for r in opt.report.passes if r.name == "merge-siblings")
    assert merged.status == "applied" and merged.applied > 2 * 4, merged
