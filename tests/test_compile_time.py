"""Compile-time structure: how many graph runs a compile makes and on how many rows, shape
propagation that recomputes only what changed, a preset's shared capture and passes, the
search's reused values, and the report's timings. No wall-clock assertions: counts only."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn

import fxopt
from fxopt import presets
from fxopt.ir import copy_graph_module, propagate_shapes
from fxopt.ir.shapes import _shape_key
from fxopt.lossy.search import BudgetedSearch, Site
from fxopt.pass_api import PassContext
from fxopt.pipeline import PassInstrument, PassManager, reference_outputs
from fxopt.pipeline.verification import row_slices
from fxopt.registry import default_pipeline
from fxopt.session import pass_context
from fxopt.testing import compile_captured
from fxopt.verify import ReusingRunner, compare_outputs, run_graph


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 16)).eval()


class _SiblingHeads(nn.Module):
    """Two Linears reading one input (merge-siblings applies) after a dropout (remove-dropout applies)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.drop = nn.Dropout(0.1)
        self.a, self.b = nn.Linear(32, 48), nn.Linear(32, 48)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        return self.a(x) * self.b(x)


@pytest.fixture
def graph_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size (rows of the first input) of every graph run fxopt.compile makes."""
    import fxopt.backends.eager
    import fxopt.inputs
    import fxopt.pipeline.checks
    import fxopt.pipeline.manager
    import fxopt.pipeline.verification

    rows: list[int] = []
    original = fxopt.verify.run_graph

    def counting(gm: Any, inputs: Any) -> list[Any]:
        rows.append(int(inputs[0].shape[0]))
        return original(gm, inputs)

    for module in (fxopt.inputs, fxopt.backends.eager, fxopt.pipeline.checks, fxopt.pipeline.manager,
                   fxopt.pipeline.verification):
        monkeypatch.setattr(module, "run_graph", counting)
    return rows


def test_exact_passes_are_verified_on_row_slices_and_the_reference_runs_once(graph_runs: list[int]) -> None:
    model, x = _SiblingHeads(), torch.randn(16, 32)
    opt = fxopt.compile(model, (x,))
    applied = [r for r in opt.report.passes if r.status == "applied"]
    assert {r.name for r in applied} >= {"remove-dropout", "merge-siblings"}
    # Nothing ran on all 16 (or 17 fresh) rows: the example slice has 2 rows, the fresh one 3.
    assert set(graph_runs) <= {2, 3}
    # fresh check (reused as its reference) + example reference + 2 batches per applied pass
    # + the lowered kernels' parity run (the optimized graph's outputs are handed over).
    assert len(graph_runs) <= 2 + 2 * len(applied) + 1
    with torch.no_grad():
        for rows in (16, 5):
            batch = torch.randn(rows, 32)
            torch.testing.assert_close(opt(batch), model(batch), rtol=1e-5, atol=1e-5)


def test_exact_passes_applied_in_a_row_cost_one_verification(graph_runs: list[int]) -> None:
    opt = fxopt.compile(_SiblingHeads(), (torch.randn(16, 32),))
    applied = [r for r in opt.report.passes if r.status == "applied"]
    assert len(applied) >= 2
    # fresh check (its reference) + example reference + the 2 slices once for every applied
    # exact pass together + the lowered kernels' parity run
    assert len(graph_runs) <= 2 + 2 + 1
    assert all(r.message.startswith("verified together with") for r in applied)


def test_lossy_passes_still_see_every_row(graph_runs: list[int]) -> None:
    model, x = _mlp(), torch.randn(16, 64)
    opt = fxopt.compile(model, (x,), passes=[*default_pipeline(), "quantize-int8"])
    assert opt.report["quantize-int8"].status == "applied"
    assert 16 in graph_runs and 17 in graph_runs  # its budget is held on the example and the fresh input


def test_a_static_batch_is_verified_on_every_row(graph_runs: list[int]) -> None:
    fxopt.compile(_SiblingHeads(), (torch.randn(16, 32),), dynamic_shapes="static")
    assert set(graph_runs) == {16}


def test_row_slices_cut_only_the_dynamic_batch() -> None:
    gm = fxopt.capture(_mlp(), (torch.randn(8, 64),))
    batches = [[torch.randn(8, 64)], [torch.randn(9, 64)]]
    slices = row_slices(gm, batches, fresh_batches=1, rows=2)
    assert slices is not None and [s[0].shape[0] for s in slices] == [2, 3]
    static = fxopt.capture(_mlp(), (torch.randn(8, 64),), dynamic_shapes="static")
    assert row_slices(static, [[torch.randn(8, 64)]], 0, 2) is None


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_incremental_shape_propagation_equals_full(arch: str) -> None:
    from zoo import ARCHITECTURES

    build = next(a for a in ARCHITECTURES if a.name == arch).build
    model, args, kwargs = build()
    gm = fxopt.capture(model, args, kwargs)
    ctx = PassContext(batches=[])
    recomputed = []
    for pass_ in default_pipeline():
        working = copy_graph_module(gm)
        result = pass_(working, ctx)
        if not result.modified:
            continue
        working.graph.eliminate_dead_code()
        full = copy_graph_module(working)
        recomputed.append(propagate_shapes(working, incremental=True))
        propagate_shapes(full)
        for a, b in zip(working.graph.nodes, full.graph.nodes):
            assert a.name == b.name
            assert _shape_key(a.meta.get("val")) == _shape_key(b.meta.get("val")), a.format_node()
        gm = working
    assert recomputed, "no pass changed the graph"
    assert all(count < len(gm.graph.nodes) for count in recomputed)  # only what changed


class _CountPasses(PassInstrument):
    def __init__(self) -> None:
        self.runs: dict[str, int] = {}

    def before_pass(self, pass_: Any, gm: Any, step: Any) -> None:
        self.runs[pass_.describe()] = self.runs.get(pass_.describe(), 0) + 1


def test_preset_candidates_share_one_capture_and_their_common_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    import fxopt.session

    captures = []
    original = fxopt.session.capture

    def counting(*args: Any, **kwargs: Any) -> Any:
        captures.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fxopt.session, "capture", counting)
    counter = _CountPasses()
    preset = presets.Preset("shared-test", "two int8 candidates with one pipeline, one exact", (
        presets.Candidate(("exact", "quantize-int8(activations='dynamic-tensor')"), "eager"),
        presets.Candidate(("exact", "quantize-int8(activations='dynamic-tensor')"), "eager"),
        presets.Candidate(("exact", "quantize-int8"), "eager"),
        presets.Candidate(("exact",), "eager"),
    ), budget=0.05)
    with presets.registered_preset(preset):
        opt = fxopt.compile(_mlp(), (torch.randn(16, 64),), preset="shared-test", instruments=[counter])
    assert len(captures) == 1
    exact_runs = {name: count for name, count in counter.runs.items() if not name.startswith("quantize-int8")}
    assert exact_runs and set(exact_runs.values()) == {1}  # every exact pass ran once for four candidates
    quantize_runs = sorted(count for name, count in counter.runs.items() if name.startswith("quantize-int8"))
    assert quantize_runs == [1, 1]  # the two identical pipelines share their quantize-int8 run
    assert [r.name for r in opt.report.passes][: len(default_pipeline())] == [p.name for p in default_pipeline()]


def test_a_failing_candidate_is_dropped_and_the_others_compile() -> None:
    from fxopt.backends import Backend, registered_backend
    from fxopt.errors import BackendError

    def lower_broken(*args: object) -> object:
        raise BackendError("this backend cannot lower anything")

    preset = presets.Preset("failing-test", "one candidate's backend fails, one does not exist", (
        presets.Candidate(("exact",), "broken"),
        presets.Candidate(("exact",), "no-such-backend"),
        presets.Candidate(("exact",), "eager"),
    ))
    with presets.registered_preset(preset), registered_backend(Backend("broken", lower_broken)):
        opt = fxopt.compile(_mlp(), (torch.randn(16, 64),), preset="failing-test")
    note = next(n for n in opt.report.notes if n.startswith("preset "))
    assert "chose [exact] on eager" in note
    assert "[exact] on broken dropped: failed: this backend cannot lower anything" in note
    # a backend that is not there is known before anything is compiled
    assert "[exact] on no-such-backend dropped: backend not available: unknown backend" in note


def test_race_times_a_lone_candidate_once_and_stops_clearly_slower_ones() -> None:
    calls = {"fast": 0, "slow": 0}

    def fast() -> None:
        calls["fast"] += 1

    def slow() -> None:
        calls["slow"] += 1
        time.sleep(0.05)

    timings = presets.race({"fast": fast, "slow": slow}, repeats=10)
    assert timings["fast"].median < timings["slow"].median
    assert calls["slow"] == 1 + presets.RACE_ROUNDS  # warm-up + the rounds before it stopped
    assert presets.race({"only": fast}, repeats=10)["only"].samples == 1


def test_report_timings_cover_the_compile() -> None:
    opt = fxopt.compile(_SiblingHeads(), (torch.randn(16, 32),))
    report = opt.report
    assert {"capture", "reference", "verify", "shapes", "lowering", "pass:remove-dropout"} <= set(report.timings)
    assert report.total_seconds > 0
    assert sum(report.timings.values()) == pytest.approx(report.total_seconds, rel=0.02, abs=0.01)
    assert "time: compile" in str(report) and report.to_dict()["timings"] == report.timings


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="RSS is read from /proc")
def test_report_memory_says_which_phase_took_the_memory() -> None:
    # 64 MiB of weights, copied at capture (share_weights=False): fresh pages, whatever the
    # allocator holds already (above glibc's mmap threshold)
    model = nn.Sequential(nn.Linear(4096, 4096, bias=False)).eval()
    weight_mb = 4096 * 4096 * 4 / 1e6
    opt = fxopt.compile(model, (torch.randn(2, 4096),), passes=[], share_weights=False, measure=False,
                        fresh_inputs=False)
    memory = opt.report.memory
    assert set(memory) <= set(opt.report.timings) and "capture" in memory
    assert memory["capture"]["net_mb"] >= 0.9 * weight_mb and memory["capture"]["peak_mb"] >= 0.9 * weight_mb
    assert all(m["peak_mb"] >= 0 for m in memory.values())
    assert sum(m["net_mb"] for m in memory.values()) >= 0.9 * weight_mb  # the module holds the copy
    assert "memory: peak +" in str(opt.report) and opt.report.to_dict()["memory"] == memory


def _search_case() -> tuple[Any, PassContext, list[Site], Any]:
    from fxopt.ir import add_constant, call_nodes, constant, ops
    from fxopt.ir.qdq import insert_qdq
    from fxopt.quant import quantize_weight

    gm = fxopt.capture(_mlp(), (torch.randn(16, 64),))
    batches = [[torch.randn(16, 64)], [torch.randn(16, 64)]]
    ctx = pass_context(batches, reference=reference_outputs(gm, batches))
    linears = [n.name for n in call_nodes(gm, ops.linear)]
    weights = {}
    for node in call_nodes(gm, ops.linear):
        weights[node.name] = quantize_weight(constant(gm, node.args[1]))

    def apply(trial: Any, choices: Any) -> Any:
        nodes = {n.name: n for n in trial.graph.nodes}
        for name in linears:
            if name in choices:
                qweight, scale = weights[name]
                insert_qdq(trial, nodes[name], add_constant(trial, qweight, f"{name}_w8"),
                           add_constant(trial, scale, f"{name}_s"), None)
        return trial

    return gm, ctx, [Site(name, (True,)) for name in linears], apply


def test_search_trials_reuse_shared_values_without_changing_any_error() -> None:
    gm, ctx, sites, apply = _search_case()
    search = BudgetedSearch(gm, ctx, sites, apply, budget=1e-9, strategy="sensitivity", holdout=False)
    search.run()
    trials = [step for step in search.log if step["event"] == "trial"]
    assert len(trials) > 2 and search._runner.reused > 0
    for step in trials:  # each logged error is what running the trial graph itself gives
        graph = search.trial(step["choices"])
        worst = max(compare_outputs(ref, run_graph(graph, batch)).max_rel
                    for ref, batch in zip(ctx.reference, ctx.batches))
        assert step["error"] == worst


def test_reusing_runner_matches_running_the_graph() -> None:
    gm, ctx, sites, apply = _search_case()
    runner = ReusingRunner()
    batch = ctx.batches[0]
    runner.run(gm, batch, pin=True)
    for chosen in ([sites[2].name], [sites[1].name, sites[2].name], [sites[0].name]):
        trial = apply(copy_graph_module(gm), {name: True for name in chosen})
        trial.recompile()
        expected = run_graph(trial, batch)
        actual = runner.run(trial, batch)
        assert all(torch.equal(a, b) for a, b in zip(expected, actual))
    assert runner.reused > 0


def test_reusing_runner_past_its_bound_keeps_no_values_and_the_same_outputs() -> None:
    """Within the bound the pinned run is kept and a trial reuses it; a trial that would not fit
    beside it frees its values as it goes (no record) and still gives the graph's outputs."""
    gm, ctx, sites, apply = _search_case()
    batch = ctx.batches[0]
    sizing = ReusingRunner()
    sizing.run(gm, batch, pin=True)
    pinned = sizing.pinned_bytes(0)
    runner = ReusingRunner(max_bytes=pinned + pinned // 4)
    runner.run(gm, batch, pin=True)
    assert runner.pinned(0) and runner.lean_runs == 0
    for chosen in ([sites[2].name], [sites[0].name]):
        trial = apply(copy_graph_module(gm), {name: True for name in chosen})
        trial.recompile()
        expected = run_graph(trial, batch)
        actual = runner.run(trial, batch)
        assert all(torch.equal(a, b) for a, b in zip(expected, actual))
    assert runner.lean_runs == 2 and runner.reused > 0  # the pinned prefix, still reused
    assert runner._last.get(0, []) == []
    nothing = ReusingRunner(max_bytes=0)
    assert not nothing.would_keep(gm, 0) and ReusingRunner().would_keep(gm, 0)
    assert ReusingRunner(max_bytes=2 * pinned).would_keep(gm, 0)  # the shapes' estimate is near the real size
    assert all(torch.equal(a, b) for a, b in zip(run_graph(gm, batch), nothing.run(gm, batch, pin=True)))
    assert not nothing.has(0) and nothing.lean_runs == 1


def test_a_lean_run_of_a_graph_whose_live_nodes_ran_last_takes_their_outputs() -> None:
    """A search's final trial, then the graph its pass committed (the trial without its dead
    nodes): the second run is not made. A graph that reads another constant is run."""
    gm, ctx, sites, apply = _search_case()
    batch = ctx.batches[0]
    runner = ReusingRunner(max_bytes=0)  # a large model's: every run lean
    trial = apply(copy_graph_module(gm), {sites[0].name: True})
    trial.recompile()
    outputs = runner.run(trial, batch)
    committed = copy_graph_module(trial)
    assert committed.graph.eliminate_dead_code()  # the float weight the trial no longer reads
    committed.recompile()
    computed = runner.computed
    again = runner.run(committed, batch)
    assert runner.computed == computed and all(a is b for a, b in zip(outputs, again))
    another_batch = runner.run(committed, [torch.randn_like(batch[0])])  # the same key: checked, not trusted
    assert runner.computed > computed and not torch.equal(another_batch[0], outputs[0])
    computed = runner.computed
    other = copy_graph_module(committed)
    name = next(n.target for n in other.graph.nodes if n.op == "get_attr" and "_w8" in str(n.target))
    setattr(other, name, getattr(other, name).clone())  # the same values, another constant
    rerun = runner.run(other, batch)
    assert runner.computed > computed
    assert all(torch.equal(a, b) and a is not b for a, b in zip(outputs, rerun))


class _OneSiblingOverBudget(nn.Module):
    """Siblings ``a`` and ``b`` (quantized into rows of one int8 tensor), ``b`` over any small
    budget: each of its rows has one outlier that sets its scale, its other weights round to 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        with torch.no_grad():
            self.b.weight[:, 0] = 50.0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) + self.b(x))


def test_a_lean_run_takes_kept_outputs_only_where_the_output_node_is_the_same() -> None:
    """The same live nodes, their outputs in another order: run again, in that order."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    doubled, negated = graph.call_function(torch.mul, (x, 2.0)), graph.call_function(torch.neg, (x,))
    graph.output((doubled, negated))
    first = torch.fx.GraphModule(nn.Module(), graph)
    swapped = copy_graph_module(first)
    out = next(n for n in swapped.graph.nodes if n.op == "output")
    out.args = (tuple(reversed(out.args[0])),)
    swapped.recompile()
    runner, batch = ReusingRunner(max_bytes=0), [torch.arange(3.0)]
    a, b = runner.run(first, batch), runner.run(swapped, batch)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0]) and runner.computed == 4


def test_a_committed_search_is_verified_with_its_final_trials_outputs(monkeypatch) -> None:
    """A large model's lean runs: quantize-int8 commits ``a`` with its own copy of its int8
    rows (not ``b``'s beside them), and its whole-graph trials take that copy too, so the
    graph it commits is its final trial and the verification runs nothing on the example."""
    computed: list[int] = []
    run = ReusingRunner.run

    def counting(self: ReusingRunner, *args: Any, **kwargs: Any) -> Any:
        before = self.computed
        out = run(self, *args, **kwargs)
        computed.append(self.computed - before)
        return out

    monkeypatch.setattr(ReusingRunner, "run", counting)
    torch.manual_seed(1)
    x = torch.randn(32, 64)
    model = _OneSiblingOverBudget()
    opt = fxopt.compile(model, (x,), passes=["quantize-int8(activations='dynamic', budget=0.01)"],
                        memory_bound=0, progress=False)
    row = opt.report["quantize-int8"]
    assert [d["node"] for d in row.details] == ["linear", "linear_2"] and row.skipped == {"over-budget": 1}
    held = [t for _, t in fxopt.ir.constants(opt.graph_module) if t.dtype == torch.int8]
    assert held and all(t.untyped_storage().nbytes() == t.nbytes for t in held)  # no rows of b's held
    assert len(computed) >= 2 and computed[-2] > 0 and computed[-1] == 0  # the final trial, then its verification
    with torch.no_grad():
        expected = model(x)
        assert (opt(x) - expected).abs().max() / expected.abs().max() < 0.01


def test_a_run_whose_recorded_values_exceed_the_allowance_is_lean_from_its_first_node(monkeypatch) -> None:
    """A run that cannot keep its values (a large model's) keeps none from the start, and gives
    back what each node reading a weight freed, rather than keeping values until they overflow."""
    import fxopt.verify as verify

    gm, ctx, _, _ = _search_case()
    batch = ctx.batches[0]
    sizing = ReusingRunner()
    sizing.run(gm, batch, pin=True)
    linear = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert verify._value_bytes(linear) < sizing.pinned_bytes(0) // 2  # room for its first values
    lean: list[str] = []  # the nodes after which the run held only live values
    worth = verify.worth_giving_back
    monkeypatch.setattr(verify, "worth_giving_back", lambda node, *args: lean.append(node.name) or worth(node, *args))
    runner = ReusingRunner(max_bytes=sizing.pinned_bytes(0) // 2)
    outputs = runner.run(gm, batch, pin=True)
    assert lean == [n.name for n in gm.graph.nodes if n.op != "output"]
    assert runner.lean_runs == 1 and not runner.has(0)
    assert all(torch.equal(a, b) for a, b in zip(run_graph(gm, batch), outputs))


def test_a_lean_run_gives_memory_back_where_a_weights_size_was_freed() -> None:
    """After a node that freed a weight-sized value, or whose op dequantized an integer weight
    inside; not after a dequantize node, whose output is the float copy it keeps."""
    from fxopt.ir.derived import RELEASE_BYTES
    from fxopt.verify import worth_giving_back

    graph = torch.fx.Graph()
    x, weight = graph.placeholder("x"), graph.get_attr("weight")
    dequantized = graph.call_function(torch.ops.aten._to_copy.default, (weight,))
    inside = graph.call_function(torch.ops.aten.sum.default, (weight,))  # reads it, returns little
    values = {x: torch.ones(4), weight: torch.zeros(RELEASE_BYTES // 4, dtype=torch.int8),
              dequantized: torch.zeros(RELEASE_BYTES // 4), inside: torch.zeros(())}
    assert not worth_giving_back(dequantized, [], values.get)
    assert worth_giving_back(inside, [], values.get)
    assert not worth_giving_back(x, [torch.zeros(16)], values.get)
    values[weight] = torch.zeros(RELEASE_BYTES // 8, dtype=torch.int8)  # its float copy under the size
    assert not worth_giving_back(inside, [], values.get)
    assert worth_giving_back(x, [values[dequantized]], values.get)  # a dequantized copy dropped


@pytest.mark.parametrize("lossy", ["quantize-int8(activations='dynamic', budget=0.008)",  # 1 of 3 fits
                                   "quantize-weights(bits=4, group_size=32, budget=0.05, strategy='equal-share')"])
def test_a_search_with_no_room_for_values_chooses_what_an_unbounded_one_does(
        lossy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a memory bound of 0 no run keeps values (every trial frees them as it goes, the
    starting graph's watched values come from a run of their own): the same trials, the same
    choices, the same errors."""
    from fxopt.registry import resolve_passes

    lean = []
    pins = []
    run = ReusingRunner.run

    def counting(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        lean.append(self.lean_runs)
        pins.append(kwargs.get("pin", False))
        return out

    monkeypatch.setattr(ReusingRunner, "run", counting)
    torch.manual_seed(2)
    x, calibration = torch.randn(16, 64), torch.randn(16, 64)
    reports = []
    for limit in (None, 0):
        lean.clear()
        pins.clear()
        gm = fxopt.capture(_mlp(), (x,))
        pipeline = resolve_passes(["remove-dropout", lossy])
        reports.append(compile_captured(gm, [[x], [calibration]], pipeline, verify_rows=None,
                                        memory_bound=limit).report)
        assert (max(lean) > 0) == (limit == 0)
        # no run is made only to pin values the bound cannot hold (the shapes say so first)
        assert any(pins) == (limit is None)
    unbounded, bounded = (r[lossy.split("(")[0]] for r in reports)
    assert unbounded.status == bounded.status and unbounded.applied == bounded.applied
    assert unbounded.skipped == bounded.skipped and bounded.applied > 0
    assert unbounded.max_rel_err == pytest.approx(bounded.max_rel_err)
    assert unbounded.details == bounded.details


def test_values_bound_keeps_a_small_models_values_and_a_share_of_a_large_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxopt import evidence
    from fxopt.cost import Cost

    small = fxopt.capture(_mlp(), (torch.randn(4, 64),))
    assert evidence.Evidence(memory_bound=123).values_bound(small) == 123
    for weights, bound in ((0, evidence.KEPT_VALUES_BYTES),
                           (2**30, evidence.KEPT_VALUES_BYTES - 2**30),  # the two together within 2 GiB
                           (4 * 2**30, int(evidence.KEPT_VALUES_SHARE * 4 * 2**30))):  # 5% of the weights
        monkeypatch.setattr(evidence, "graph_cost", lambda gm, size=weights: Cost(0, size, 0))
        assert evidence.Evidence().values_bound(small) == bound


def test_pass_manager_alone_still_verifies_every_row() -> None:
    gm = fxopt.capture(_SiblingHeads(), (torch.randn(16, 32),))
    manager = PassManager(default_pipeline())
    _, records = manager.run(gm, PassContext(batches=[[torch.randn(16, 32)]]))
    assert manager.verification is not None and manager.verification.slices is None
    assert any(r.status == "applied" for r in records)


def test_row_slices_change_no_lossy_choice_nor_the_final_error() -> None:
    from fxopt.registry import resolve_passes

    model = _mlp()
    x, fresh = torch.randn(16, 64), torch.randn(17, 64)
    pipeline = resolve_passes([*default_pipeline(), "quantize-int8(activations='dynamic-tensor', budget=0.01)"])
    results = []
    for rows in (2, None):
        gm = fxopt.capture(model, (x,))
        opt = compile_captured(gm, [[x], [fresh]], pipeline, fresh_batches=1, verify_rows=rows)
        results.append(opt.report)
    sliced, full = results
    assert [(r.name, r.status, r.applied) for r in sliced.passes] == [(r.name, r.status, r.applied) for r in full.passes]
    assert sliced["quantize-int8"].max_rel_err == full["quantize-int8"].max_rel_err
    # sliced: against the graph after the exact passes plus their drift on the slices (no extra run)
    assert sliced.final_max_rel_err == pytest.approx(full.final_max_rel_err, rel=1e-4)
    assert full.final_max_rel_err > 0


def test_race_stops_after_its_rounds_once_timing_took_its_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"a": 0, "b": 0}

    def run(name: str) -> Any:
        def call() -> None:
            calls[name] += 1
        return call

    monkeypatch.setattr(presets, "RACE_MARGIN", float("inf"))  # neither is ever clearly slower
    assert presets.race({"a": run("a"), "b": run("b")}, repeats=10)["a"].samples == 10  # fast: every round
    monkeypatch.setattr(presets, "RACE_SECONDS", 0.0)
    timings = presets.race({"a": run("a"), "b": run("b")}, repeats=10)
    assert timings["a"].samples == timings["b"].samples == presets.RACE_ROUNDS


def test_a_lossy_pass_reuses_the_reference_runs_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxopt.registry import resolve_passes
    from fxopt.verify import ReusingRunner

    pins: list[int] = []
    original = ReusingRunner.run

    def counting(self, gm, inputs, key=0, *, pin=False):
        pins.append(pin)
        return original(self, gm, inputs, key, pin=pin)

    monkeypatch.setattr(ReusingRunner, "run", counting)
    model, x, fresh = _mlp(), torch.randn(16, 64), torch.randn(17, 64)
    pipeline = resolve_passes([*default_pipeline(), "quantize-int8(activations='dynamic-tensor', budget=0.01)"])
    gm = fxopt.capture(model, (x,))
    opt = compile_captured(gm, [[x], [fresh]], pipeline, fresh_batches=1, verify_rows=2)
    record = opt.report["quantize-int8"]
    assert record.status == "applied"
    # the float graph ran once on the example, for the reference, and was kept: neither the
    # search nor the verification ran it again
    assert pins.count(True) == 1


class _TokenMLP(nn.Module):
    """A feed-forward block over sequences: each batch row gives its Linears 128 token vectors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(32, 128), nn.Linear(128, 32)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def test_fresh_rows_give_the_linears_enough_vectors_and_another_batch_size() -> None:
    from fxopt.inputs import FRESH_VECTORS, fresh_rows

    assert fresh_rows(8, 128) == 3  # BERT-like rows: 3 x 128 token vectors are plenty
    assert fresh_rows(8, 64) == -(-FRESH_VECTORS // 64)  # as many rows as give FRESH_VECTORS
    assert fresh_rows(16, 1) == 17  # one vector a row: the example's rows + 1
    assert fresh_rows(8, None) == 9  # no Linear to count for
    assert fresh_rows(2, 128) == 3 and fresh_rows(1, 128) == 2  # never more than one row over the example
    assert fresh_rows(3, 128) == 4  # never the example's own size
    for rows in range(1, 40):
        for per_row in (None, 1, 7, 64, 128, 4096):
            assert fresh_rows(rows, per_row) != rows


def test_a_sequence_models_fresh_input_is_its_own_slice_and_runs_once_per_graph(graph_runs: list[int]) -> None:
    model, x = _TokenMLP(), torch.randn(8, 128, 32)
    opt = fxopt.compile(model, (x,), passes=[*default_pipeline(), "quantize-int8(activations='dynamic-tensor')"])
    assert opt.report["quantize-int8"].status == "applied"
    fresh_rows = 3  # 384 token vectors; no more rows than the slice exact passes are verified on
    assert any(f"batch {fresh_rows} instead of 8" in note for note in opt.report.notes)
    # The fresh input (3 rows) is its own row slice: the captured graph runs on it once (the
    # fresh check), the int8 graph once (its verification; the float reference on it is the
    # one the fresh check computed), and the kernels' parity check runs there too, the
    # smallest verified batch. The example's full rows ran once more, for the int8 graph's
    # verification on it (its float reference runs through the search's runner).
    assert graph_runs.count(fresh_rows) <= 3
    assert set(graph_runs) <= {2, fresh_rows, 8}
    with torch.no_grad():
        for rows in (8, 5):
            batch = torch.randn(rows, 128, 32)
            torch.testing.assert_close(opt(batch), model(batch), rtol=0.05, atol=0.05)


def test_a_lossy_pass_after_another_starts_from_the_values_its_verification_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The float graph runs once per observable batch, for the reference before the first
    lossy pass (its values kept); the next lossy pass observes and trials on the values of
    the graph the first committed, kept by the first's verification: no observer runs, no
    second pin."""
    from fxopt.lossy import observer
    from fxopt.registry import resolve_passes

    events: list[tuple[str, int]] = []
    run, record = ReusingRunner.run, observer._Recorder.run

    def counting_run(self, gm, inputs, key=0, *, pin=False):
        events.append(("pin" if pin else "run", key))
        return run(self, gm, inputs, key, pin=pin)

    def counting_record(self, *args, **kwargs):
        events.append(("observe", int(args[0].shape[0])))
        return record(self, *args, **kwargs)

    monkeypatch.setattr(ReusingRunner, "run", counting_run)
    monkeypatch.setattr(observer._Recorder, "run", counting_record)
    torch.manual_seed(1)
    x, calibration, fresh = torch.randn(16, 64), torch.randn(16, 64), torch.randn(17, 64)
    gm = fxopt.capture(_mlp(), (x,))
    pipeline = resolve_passes([*default_pipeline(), "smooth-quant(explicit=True, budget=0.2)",
                               "quantize-int8(activations='static', budget=0.2)"])
    opt = compile_captured(gm, [[x], [calibration], [fresh]], pipeline, fresh_batches=1,
                            verify_rows=2)
    assert opt.report["smooth-quant"].status == opt.report["quantize-int8"].status == "applied"
    assert [e for e in events if e[0] == "pin"] == [("pin", 0), ("pin", 1)]
    assert not [e for e in events if e[0] == "observe"]
    # the fresh input is verified outside the runner: nothing observes it
    assert all(key in (0, 1) for _, key in events)


def test_kept_values_stay_within_their_memory_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the evidence store's memory bound the reference run keeps no more batches' values
    (bound 0: not even the example's): the choice and its error do not change, only what is run
    again."""
    from fxopt.evidence import KEPT_VALUES_BYTES
    from fxopt.pipeline import verification
    from fxopt.registry import resolve_passes

    kept: list[list[int]] = []
    keeping = verification.Verification._run_keeping_values

    def recording(self, *args, **kwargs):
        outputs = keeping(self, *args, **kwargs)
        kept.append(sorted(key for key in (0, 1, 2) if self.ctx.values.pinned(key)))
        return outputs

    monkeypatch.setattr(verification.Verification, "_run_keeping_values", recording)
    torch.manual_seed(1)
    x, calibration, fresh = torch.randn(16, 64), torch.randn(16, 64), torch.randn(17, 64)
    reports = []
    for limit in (KEPT_VALUES_BYTES, 0):
        gm = fxopt.capture(_mlp(), (x,))
        pipeline = resolve_passes([*default_pipeline(), "quantize-int8(activations='static', budget=0.2)"])
        reports.append(compile_captured(gm, [[x], [calibration], [fresh]], pipeline, fresh_batches=1, verify_rows=2,
                                        memory_bound=limit).report)
    assert kept == [[0, 1], []]  # never the fresh input's, which nothing observes
    unbounded, bounded = reports
    assert unbounded["quantize-int8"].status == bounded["quantize-int8"].status == "applied"
    assert unbounded["quantize-int8"].max_rel_err == pytest.approx(bounded["quantize-int8"].max_rel_err)
    assert unbounded["quantize-int8"].details == bounded["quantize-int8"].details
