"""The budgeted search block by block (fxopt.lossy.blocks): a graph run span by span computes
what a whole run computes; the choice made block by block meets the budget on the whole model;
the search goes block by block where the model's values do not fit the memory bound."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxopt
from fxopt.ir import ops
from fxopt.lossy.blocks import block_key, find_spans, run_by_spans
from fxopt.lossy.observer import run_watching
from fxopt.registry import resolve_passes
from fxopt.testing import compile_captured
from fxopt.verify import compare_outputs

transformers = pytest.importorskip("transformers")

BUDGET = 0.01


def _llama(layers: int = 3) -> tuple[torch.nn.Module, list[list[torch.Tensor]]]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300, use_cache=False)
    model = transformers.LlamaModel(config).eval()
    batches = [[torch.randint(0, 300, (2, 16))] for _ in range(3)]
    return model, batches


def _compile(model: torch.nn.Module, batches: list[list[torch.Tensor]], spec: str, merge: bool = True,
             **options: object) -> object:
    gm = fxopt.capture(model, tuple(batches[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_captured(gm, batches, resolve_passes(["merge-siblings"] * merge + [spec]), **options)


def _record(optimized: object, name: str) -> object:
    return next(r for r in optimized.report.passes if r.name == name)


def test_block_key_is_a_module_path_up_to_its_first_index() -> None:
    assert block_key("layers.3.mlp.up_proj") == "layers.3"
    assert block_key("encoder.layer.11.attention.self.query") == "encoder.layer.11"
    assert block_key("lm_head") is None and block_key("0.weight") is None  # a Sequential's own layers


def test_a_graph_run_span_by_span_computes_exactly_what_a_whole_run_computes() -> None:
    model, batches = _llama()
    gm = fxopt.capture(model, tuple(batches[0]))
    linears = [n.name for n in gm.graph.nodes if n.target == ops.linear]
    spans = find_spans(gm, linears)
    assert spans is not None and [s.key for s in spans] == ["layers.0", "layers.1", "layers.2"]
    assert sorted(name for span in spans for name in span.sites) == sorted(linears)  # each Linear in its layer
    whole: dict[str, torch.Tensor] = {}
    watched = [n for n in gm.graph.nodes if any(n.name in span.outputs for span in spans)]
    run_watching(gm, watched, [batches[0]], lambda node, value: whole.__setitem__(node.name, value))
    by_spans: dict[str, torch.Tensor] = {}

    def seen(k: int, live: dict[str, object]) -> None:
        by_spans.update({name: live[name] for name in spans[k].outputs})

    run_by_spans(gm, spans, batches[0], seen)
    assert by_spans.keys() == whole.keys() and len(whole) >= len(spans)
    for name, value in whole.items():
        same = torch.equal(by_spans[name], value) if isinstance(value, torch.Tensor) else by_spans[name] == value
        assert same, name



def test_a_span_run_holds_only_the_values_a_later_node_reads(monkeypatch) -> None:
    """Run span by span, a graph holds what a whole run that keeps no values holds: after each
    node, only the values some later node reads (a large model's reference run)."""
    import sys

    import fxopt.lossy.blocks as blocks

    model, batches = _llama(2)
    gm = fxopt.capture(model, tuple(batches[0]))
    spans = find_spans(gm, [n.name for n in gm.graph.nodes if n.target == ops.linear])
    kept_past_last_use: list[str] = []
    checks = []
    drop = blocks.drop_dead_values

    def check(node: object, *args: object) -> None:  # after each node, before its dead values go
        caller = sys._getframe(1).f_locals
        checks.append(node)
        kept_past_last_use.extend(name for name in caller["env"] if caller["last"].get(name, -1) < caller["position"])
        drop(node, *args)

    monkeypatch.setattr(blocks, "drop_dead_values", check)
    run_by_spans(gm, spans, batches[0])
    assert len(checks) > 50 and kept_past_last_use == []


def test_a_blocks_own_graph_computes_what_its_span_of_the_whole_graph_computes() -> None:
    """The trials copy and run a block's nodes alone (fxopt.lossy.blocks.Block), not the whole
    graph: from the same kept values, each block gives the same values after it, bit for bit."""
    from fxopt.lossy.blocks import blocks_of, run_block, run_span

    model, batches = _llama()
    gm = fxopt.capture(model, tuple(batches[0]))
    spans = find_spans(gm, [n.name for n in gm.graph.nodes if n.target == ops.linear])
    assert spans is not None
    blocks = blocks_of(gm, spans)
    whole_nodes = len(gm.graph.nodes)
    live_whole: dict = {}
    live_block: dict = {}
    for k, (span, block) in enumerate(zip(spans, blocks)):
        assert len(block.gm.graph.nodes) < (whole_nodes if k == 0 else whole_nodes / 2)  # block 0 holds the constants
        assert {n.name for n in block.gm.graph.nodes if n.op == "call_function"} <= {n.name for n in gm.graph.nodes}
        live_whole = run_span(gm, spans, k, live_whole, batches[0])
        live_block = run_block(block.gm, block, live_block, batches[0])
        assert live_block.keys() == live_whole.keys() and set(span.outputs) <= live_block.keys()
        for name, value in live_whole.items():
            assert torch.equal(live_block[name], value) if isinstance(value, torch.Tensor) else live_block[name] == value


def test_where_the_values_do_not_fit_the_search_goes_block_by_block_and_meets_the_budget() -> None:
    model, batches = _llama()
    spec = f"quantize-int8(activations='dynamic-tensor', budget={BUDGET}, force=True)"
    blockwise = _compile(model, batches, spec, memory_bound=0)
    record = _record(blockwise, "quantize-int8")
    assert record.applied > 0 and record.skipped, record
    # each layer left float says it was refused block by block, and by which block's error
    assert all("chosen block by block" in skip.detail and "block layers." in skip.detail
               for skip in record.skips if skip.code == "over-budget"), record.skips
    steps = record.details[0]["log"]
    assert any(step["event"] == "blocks" for step in steps)
    # The whole-model check: the committed graph's output error over the fit batches is the
    # one reported, and it is within the budget.
    fitted = record.details[0]["fitted_error"]
    assert fitted <= BUDGET
    with torch.no_grad():
        error = max(compare_outputs([model(*batch)[0]], [blockwise(*batch)[0]]).max_rel for batch in batches[::2])
    assert error == pytest.approx(fitted, rel=0.05, abs=1e-4)


def test_with_room_for_the_values_the_search_stays_whole_model_unless_asked_for_blocks() -> None:
    model, batches = _llama()
    spec = f"quantize-int8(activations='dynamic-tensor', budget={BUDGET}, force=True)"
    whole = _record(_compile(model, batches, spec), "quantize-int8")
    assert not any(step["event"] == "blocks" for step in whole.details[0]["log"])
    asked = _record(_compile(model, batches, spec[:-1] + ", strategy='blocks')"), "quantize-int8")
    assert any(step["event"] == "blocks" for step in asked.details[0]["log"])
    assert asked.details[0]["fitted_error"] <= BUDGET


def test_block_by_block_and_whole_model_agree_where_every_layer_fits() -> None:
    model, batches = _llama(layers=2)
    spec = "quantize-weights(budget=0.5)"
    # without merge-siblings: past the memory bound it leaves float siblings apart (a copy)
    whole = _compile(model, batches, spec, merge=False)
    blockwise = _compile(model, batches, spec, merge=False, memory_bound=0)
    assert _record(whole, "quantize-weights").applied == _record(blockwise, "quantize-weights").applied > 0
    for batch in batches:
        assert torch.equal(whole(*batch)[0], blockwise(*batch)[0])


def test_a_blocks_trials_dequantize_each_int8_weight_once_and_compute_the_same() -> None:
    """run_span with a block's holder: what a node computes from constants alone (the int8
    weights' dequantize) is computed once for the block's trials, with the same outputs."""
    from fxopt.lossy.blocks import run_span
    from fxopt.session import Session, SessionOptions

    model, batches = _llama(layers=2)
    session = Session(model, tuple(batches[0]), SessionOptions(progress=False, fresh_inputs=False))
    stage = session.run(resolve_passes(["quantize-int8(activations='dynamic-tensor', budget=1.0, force=True)"]))
    gm = stage.gm
    spans = find_spans(gm, [n.name for n in gm.graph.nodes if n.target == ops.linear])
    assert spans is not None
    plain = run_span(gm, spans, 0, {}, batches[0])
    held: dict = {}
    first = run_span(gm, spans, 0, {}, batches[0], held)
    dequantized = len(held)
    assert dequantized > 0 and dequantized == sum(
        1 for n in _span_nodes(gm, spans[0]) if n.target is torch.ops.quantized_decomposed.dequantize_per_channel.default)
    again = run_span(gm, spans, 0, {}, batches[1], held)
    assert len(held) == dequantized  # the second trial computed none of them again
    assert plain.keys() == first.keys()
    for name, value in plain.items():
        assert torch.equal(first[name], value) if isinstance(value, torch.Tensor) else first[name] == value
    assert again.keys() == plain.keys()


def _span_nodes(gm: torch.fx.GraphModule, span: object) -> set:
    nodes = list(gm.graph.nodes)
    end = next(i for i, n in enumerate(nodes) if n.name == span.last)
    return set(nodes[:end + 1])
