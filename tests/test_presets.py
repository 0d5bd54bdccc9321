from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fxopt
from fxopt import presets
from fxopt.ir import call_nodes, constant, ops
from fxopt.registry import expand_exact


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 16)).eval()


def _note(opt: fxopt.OptimizedModule) -> str:
    return next(n for n in opt.report.notes if n.startswith("preset "))


def test_builtin_presets_are_found_through_entry_points() -> None:
    assert {p.name for p in presets.list_presets()} >= {"lossless", "bf16", "int8"}
    with pytest.raises(fxopt.InputError, match="unknown preset 'fastest'.*available: .*int8"):
        presets.get_preset("fastest")


def test_lossless_preset_is_exact_and_says_what_it_chose() -> None:
    model, x = _mlp(), torch.randn(32, 64)
    opt = fxopt.compile(model, (x,), preset="lossless")
    note = _note(opt)
    assert note.startswith("preset lossless: chose [exact] on ") and "ms" in note
    # each compiled candidate says how long building it took (its passes and lowering)
    head = note.split(";")[0]
    assert re.search(r"built in [0-9.e+-]+ s", head), head
    assert "[exact] on onnx" in note or "[exact] on eager" in note  # the other candidate, timed or dropped
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)
        fresh = torch.randn(7, 64)  # another batch size: the batch is dynamic
        torch.testing.assert_close(opt(fresh), model(fresh), rtol=1e-5, atol=1e-5)


def test_int8_preset_stays_within_its_budget_and_quantizes() -> None:
    model, x = _mlp(), torch.randn(32, 64)
    opt = fxopt.compile(model, (x,), preset="int8", calibration=[(torch.randn(32, 64),)])
    assert "within budget 0.05" in _note(opt)
    quantized = [r for r in opt.report.passes if r.name == "quantize-int8"]
    assert quantized and quantized[0].applied >= 1
    with torch.no_grad():
        reference = model(x)
        assert float((opt(x) - reference).abs().max() / reference.abs().max()) <= 0.05



def test_a_preset_held_to_a_tighter_budget_searches_within_it() -> None:
    from fxopt.registry import resolve_passes

    # each lossy pass's own budget comes down to the preset's; exact passes and smaller budgets stay
    passes = presets.within_budget(resolve_passes(["remove-dropout", "quantize-int8", "cast-bf16(budget=0.001)"]),
                                   0.02)
    assert [getattr(p, "budget", None) for p in passes] == [None, 0.02, 0.001]
    assert presets.within_budget(resolve_passes(["cast-bf16(budget=1)"]), 0.02)[0].budget == 0.02  # an int budget
    preset = presets.Preset("budget-test", "per-tensor int8", (
        presets.Candidate(("exact", "quantize-int8(activations='dynamic-tensor')"), "eager"),), budget=0.05)
    model, x = _mlp(), torch.randn(32, 64)
    with presets.registered_preset(preset):
        loose = fxopt.compile(model, (x,), preset="budget-test")
        tight = fxopt.compile(model, (x,), preset="budget-test", budget=0.007)
    assert "within budget 0.05" in _note(loose) and "within budget 0.007" in _note(tight)
    assert tight.report.final_max_rel_err <= 0.007 < loose.report.final_max_rel_err
    applied = {opt: next(r for r in opt.report.passes if r.name == "quantize-int8").applied for opt in (loose, tight)}
    assert applied[tight] < applied[loose]  # the search kept more Linears float to stay within it
    with pytest.raises(fxopt.InputError, match="budget= is a preset's"):
        fxopt.compile(model, (x,), passes=["quantize-int8"], budget=0.01)
    with pytest.raises(fxopt.InputError, match="positive"):
        fxopt.compile(model, (x,), preset="int8", budget=0.0)


def test_bf16_preset_runs_linears_in_bfloat16() -> None:
    model, x = _mlp(), torch.randn(32, 64)
    opt = fxopt.compile(model, (x,), preset="bf16", backend="eager")
    dtypes = {constant(opt.graph_module, n.args[1]).dtype for n in call_nodes(opt.graph_module, ops.linear)}
    assert torch.bfloat16 in dtypes
    with torch.no_grad():
        reference = model(x)
        assert float((opt(x) - reference).abs().max() / reference.abs().max()) <= 0.01


def _cpu_with(monkeypatch: pytest.MonkeyPatch, *flags: str) -> None:
    from fxopt import isa

    monkeypatch.setattr(isa, "detect", lambda: isa.from_parts("test CPU", "x86_64", "AVX512", flags))


def test_a_candidate_whose_arithmetic_the_cpu_would_emulate_is_dropped_unbuilt(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from fxopt.latency import Timing

    monkeypatch.setattr(presets, "race", lambda runs, repeats=10: {k: Timing.of([1.0]) for k in runs})
    preset = presets.Preset("units", "float32, and bf16 where the CPU has a unit for it", (
        presets.Candidate(("exact",), note="float32"),
        presets.Candidate(("exact",), note="bf16", cpu_unit="bf16_gemm")), budget=0.05)
    module = SimpleNamespace(report=SimpleNamespace(passes=[]))
    built: list[str] = []

    def dropped(*flags: str) -> list[str | None]:
        _cpu_with(monkeypatch, *flags)
        trials = presets.choose(preset, torch.device("cpu"), lambda c: built.append(c.note) or module,
                                measure_error=lambda m: 0.0, run_example=lambda m: lambda: None)[1]
        return [t.dropped for t in trials]

    assert dropped("avx512f", "avx512_vnni", "avx2") == [
        None, "this CPU has no bf16 GEMM unit (it would emulate bf16, slower than float32)"]
    assert built == ["float32"]
    built.clear()
    for unit in (("amx_tile", "amx_bf16"), ("avx512f", "avx512_bf16")):
        assert dropped(*unit) == [None, None]
    assert built == ["float32", "bf16"] * 2
    with pytest.raises(fxopt.InputError, match="must be one of int8_gemm, bf16_gemm"):
        presets.Candidate(("exact",), cpu_unit="bf16")


def test_a_fallback_is_built_only_where_the_candidates_before_it_left_sites_alone_for_the_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import Counter
    from types import SimpleNamespace

    from fxopt.latency import Timing
    from fxopt.report import PassRecord

    monkeypatch.setattr(presets, "race", lambda runs, repeats=10: {k: Timing.of([1.0]) for k in runs})
    preset = presets.Preset("fallback-test", "a recipe, and a fallback", (
        presets.Candidate(("exact", "quantize-int8"), note="int8"),
        presets.Candidate(("exact", "cast-bf16"), note="bf16", fallback=True),
        presets.Candidate(("exact", "cast-bf16"), "onnx", note="bf16 onnx", fallback=True)), budget=0.05)
    built: list[str] = []

    def dropped(left_alone: int, weight_bytes: int = 0) -> list[str | None]:
        record = PassRecord("quantize-int8", exact=False, status="applied", applied=3,
                            skipped=Counter({"over-budget": left_alone, "not-float32": 1}))
        module = SimpleNamespace(report=SimpleNamespace(passes=[record]))
        trials = presets.choose(preset, torch.device("cpu"), lambda c: built.append(c.note) or module,
                                measure_error=lambda m: 0.0, run_example=lambda m: lambda: None,
                                hold_bytes=2**30, weight_bytes=weight_bytes)[1]
        return [t.dropped for t in trials]

    # the fallbacks are alternatives to each other: the first one built does not stop the next
    assert dropped(left_alone=2) == [None, None, None] and built == ["int8", "bf16", "bf16 onnx"]
    built.clear()
    reason = "a fallback, not built: [exact, quantize-int8] on eager met the budget without leaving a site alone for it"
    assert dropped(left_alone=0) == [None, reason, reason] and built == ["int8"]
    built.clear()
    past_the_bound = dropped(left_alone=2, weight_bytes=2**31)
    assert past_the_bound[1] is not None and past_the_bound[1].startswith("a fallback, not built past the compile's memory")
    assert past_the_bound[2] is not None and past_the_bound[2].startswith("its backend would hold a copy")
    assert built == ["int8"]


def test_held_to_a_budget_no_int8_linear_meets_the_int8_preset_runs_linears_in_bfloat16(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU with a bf16 unit, the int8 preset's bf16 candidates meet a budget under every
    Linear's int8 error, where its int8 candidates change nothing and are dropped."""
    _cpu_with(monkeypatch, "amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_vnni", "avx512_bf16")
    model, x = _mlp(), torch.randn(32, 64)
    x[:, :4] *= 50  # outlier channels: int8 activations lose the rest; bfloat16 keeps its relative precision
    opt = fxopt.compile(model, (x,), preset="int8", budget=0.006)
    note = _note(opt)
    assert note.startswith("preset int8: chose [exact, cast-bf16(budget=0.05)] on "), note
    assert "quantize-int8: no change" in note
    dtypes = [constant(opt.graph_module, n.args[1]).dtype for n in call_nodes(opt.graph_module, ops.linear)]
    assert torch.bfloat16 in dtypes
    with torch.no_grad():
        reference = model(x)
        assert float((opt(x) - reference).abs().max() / reference.abs().max()) <= 0.006


def test_candidates_over_budget_or_without_effect_are_dropped_with_reasons() -> None:
    preset = presets.Preset("tight-test", "int8 held to an impossible budget", (
        presets.Candidate(("exact", "quantize-int8(budget=1e-9)"), "eager"),
        presets.Candidate(("exact",), "eager"),
    ), budget=1e-3)
    with presets.registered_preset(preset):
        opt = fxopt.compile(_mlp(), (torch.randn(16, 64),), preset="tight-test")
    note = _note(opt)
    assert note.startswith("preset tight-test: chose [exact] on eager")
    assert "dropped: its lossy passes changed nothing (quantize-int8: no change)" in note


def test_a_candidate_that_only_smoothed_is_dropped_as_one_that_changed_nothing() -> None:
    """smooth-quant applied but the quantization after it did not: a float model with extra
    multiplies is no int8 recipe (it could race fastest on a model too small for int8 to pay)."""
    preset = presets.Preset("smoothed-only-test", "smooth-quant, then a quantization that takes nothing", (
        presets.Candidate(("exact", "smooth-quant(explicit=True)", "quantize-int8(include='^no_such_layer$')"),
                          "eager"),
        presets.Candidate(("exact", "quantize-int8(activations='dynamic-tensor')"), "eager"),
    ), budget=0.05)
    with presets.registered_preset(preset):
        opt = fxopt.compile(_mlp(), (torch.randn(16, 64),), preset="smoothed-only-test",
                            calibration=[(torch.randn(16, 64),)])
    note = _note(opt)
    assert note.startswith("preset smoothed-only-test: chose [exact, quantize-int8(activations='dynamic-tensor')]")
    assert ("dropped: its lossy passes changed nothing (quantize-int8: no change); smooth-quant applied, "
            "which only prepares for them") in note, note


def test_no_candidate_within_budget_is_an_error() -> None:
    preset = presets.Preset("impossible-test", "bf16 within 1e-9", (
        presets.Candidate(("exact", "cast-bf16(budget=1)"), "eager"),), budget=1e-9)
    with presets.registered_preset(preset), pytest.raises(fxopt.FxoptError, match="no candidate met its budget"):
        fxopt.compile(_mlp(), (torch.randn(16, 64),), preset="impossible-test")


def test_preset_and_passes_are_exclusive() -> None:
    with pytest.raises(fxopt.InputError, match="passes= or preset="):
        fxopt.compile(_mlp(), (torch.randn(4, 64),), passes=["remove-dropout"], preset="int8")
    with pytest.raises(fxopt.InputError, match="no candidate for backend 'tvm'"):
        fxopt.compile(_mlp(), (torch.randn(4, 64),), preset="int8", backend="tvm")


def test_presets_and_the_bench_time_with_the_one_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """fxopt.latency.interleaved is the only timing loop: the preset race, the benchmark's
    measure_side_by_side (and so ``fxopt demo``'s) all run through it."""
    from fxopt import latency
    from fxopt_bench import timing

    loop, calls = latency.interleaved, []

    def recording(candidates, **options):  # type: ignore[no-untyped-def]
        calls.append((sorted(candidates), options.get("keep") is not None))
        return loop(candidates, **options)

    monkeypatch.setattr(latency, "interleaved", recording)
    runs = {"a": 0, "b": 0}

    def run(name: str):  # type: ignore[no-untyped-def]
        return lambda: runs.__setitem__(name, runs[name] + 1)

    race = presets.race({"a": run("a"), "b": run("b")}, repeats=3)
    assert calls == [(["a", "b"], True)]  # the race: the loop with its stopping policy
    assert race["a"].samples == runs["a"] - 1 and race["a"].samples >= 1  # one warm-up, then its rounds
    assert presets.race({"a": run("a")}, repeats=3)["a"].samples == 1
    assert calls[-1] == (["a"], False)
    bench = timing.measure_side_by_side({"a": run("a"), "b": run("b")}, warmup=1, repeats=4)
    assert calls[-1] == (["a", "b"], False)
    assert bench["a"].samples == bench["b"].samples == 4
    assert timing.speedup is latency.speedup and timing.measure_side_by_side is latency.measure_side_by_side


def test_each_round_of_the_timing_loop_starts_with_the_next_candidate() -> None:
    """The call after another candidate's finds that one's weights in the caches: which
    candidate that is rotates, so no candidate pays for its place in the order every round."""
    from fxopt import latency

    calls: list[str] = []
    timings = latency.interleaved({name: (lambda name=name: calls.append(name)) for name in "abc"},
                                  warmup=0, repeats=4)
    assert calls == list("abc" "bca" "cab" "abc")
    assert all(timing.samples == 4 for timing in timings.values())


def _memory_case(monkeypatch: pytest.MonkeyPatch, hold_bytes: int | None):
    """Four candidates (one over budget), each built after a collection records which of the
    earlier ones are still alive; a race makes the later of each pair the faster."""
    import gc
    import weakref
    from types import SimpleNamespace

    from fxopt.latency import Timing
    from fxopt.report import PassRecord

    class Built:
        def __init__(self, error: float) -> None:
            self.error = error
            self.report = SimpleNamespace(passes=[PassRecord("lossy", exact=False, status="applied")])

    errors = {"over": 0.5, "slow": 0.01, "fast": 0.01, "fastest": 0.01}
    built: dict[str, weakref.ref] = {}
    alive_when_built: dict[str, list[str]] = {}

    def build(candidate: presets.Candidate) -> Built:
        gc.collect()
        alive_when_built[candidate.note] = [name for name, ref in built.items() if ref() is not None]
        module = Built(errors[candidate.note])
        built[candidate.note] = weakref.ref(module)
        return module

    raced: list[list[str]] = []

    def race(runs: dict, repeats: int = 10) -> dict:
        raced.append(list(runs))  # positions among the candidates held: the later, the faster
        return {key: Timing.of([1.0 / (1 + int(key))]) for key in runs}

    monkeypatch.setattr(presets, "race", race)
    preset = presets.Preset("memory-test", "four candidates", tuple(
        presets.Candidate(("exact",), "eager", note=note) for note in errors), budget=0.05)
    chosen, trials = presets.choose(preset, torch.device("cpu"), build, measure_error=lambda m: m.error,
                                    run_example=lambda m: lambda: None, hold_bytes=hold_bytes,
                                    size_of=lambda m: 10)
    gc.collect()
    alive = [name for name, ref in built.items() if ref() is not None]
    return preset, chosen, trials, built, alive_when_built, raced, alive


def test_past_the_memory_bound_candidates_race_as_they_come_and_only_the_chosen_outlives_the_choice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A dropped candidate is let go as soon as it is dropped; past the bound (two candidates of
    10 bytes over 15), the held ones race as each is added and the slower goes at once: at
    most two built candidates (each a backend's copy of the weights) are ever held."""
    preset, chosen, trials, built, alive_when_built, raced, alive = _memory_case(monkeypatch, hold_bytes=15)
    assert chosen.error == 0.01 and built["fastest"]() is chosen
    assert alive_when_built == {"over": [], "slow": [], "fast": ["slow"], "fastest": ["fast"]}
    assert raced == [["0", "1"]] * 2  # the first within budget is not timed alone
    assert alive == ["fastest"] and [t.module for t in trials] == [None, None, None, chosen]
    assert trials[0].dropped == "output error 0.5 > 0.05" and trials[1].milliseconds == 1.0
    assert presets.summary(preset, trials, chosen).startswith("preset memory-test: chose [exact] on eager (0.5 ms")


def test_within_the_memory_bound_candidates_race_once_at_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    _, chosen, trials, built, alive_when_built, raced, alive = _memory_case(monkeypatch, hold_bytes=None)
    assert alive_when_built == {"over": [], "slow": [], "fast": ["slow"], "fastest": ["slow", "fast"]}
    assert raced == [["0", "1", "2"]] and built["fastest"]() is chosen and alive == ["fastest"]
    assert [t.milliseconds for t in trials] == [None, 1.0, 0.5, 1 / 3]


def test_a_lone_candidate_within_budget_is_timed_once_for_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from fxopt.latency import Timing

    raced: list[list[str]] = []

    def race(runs: dict, repeats: int = 10) -> dict:
        raced.append(list(runs))
        return {key: Timing.of([3.0]) for key in runs}

    monkeypatch.setattr(presets, "race", race)
    preset = presets.Preset("lone", "one candidate", (presets.Candidate(("exact",), "eager"),), budget=0.05)
    module = SimpleNamespace(report=SimpleNamespace(passes=[]))
    chosen, trials = presets.choose(preset, torch.device("cpu"), lambda c: module, measure_error=lambda m: 0.0,
                                    run_example=lambda m: lambda: None, hold_bytes=0)
    assert chosen is module and raced == [["0"]] and trials[0].milliseconds == 3.0


def test_before_each_build_the_preset_says_which_candidates_are_still_to_be_built_after_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a session keeps for later candidates (their shared stages) follows this list: a
    candidate dropped before it is built (it needs calibration) is not waited for."""
    from types import SimpleNamespace

    from fxopt.latency import Timing

    monkeypatch.setattr(presets, "race", lambda runs, repeats=10: {k: Timing.of([1.0]) for k in runs})
    candidates = (presets.Candidate(("exact",), note="a"), presets.Candidate(("exact",), note="b"),
                  presets.Candidate(("exact",), note="static", needs_calibration=True),
                  presets.Candidate(("exact",), note="c"))
    told: list[list[str]] = []
    module = SimpleNamespace(report=SimpleNamespace(passes=[]))
    presets.choose(presets.Preset("order", "four", candidates, budget=0.05), torch.device("cpu"),
                   lambda c: module, measure_error=lambda m: 0.0, run_example=lambda m: lambda: None,
                   calibrated=False, building=lambda still: told.append([c.note for c in still]))
    assert told == [["b", "c"], ["c"], []]


def test_exact_leaves_out_the_passes_a_candidate_runs_elsewhere_or_without() -> None:
    names = lambda specs: [p if isinstance(p, str) else p.name for p in specs]  # noqa: E731
    full = names(expand_exact(["exact"]))
    assert "merge-siblings" in full
    after = names(expand_exact(["exact", "quantize-int8", "merge-siblings"]))
    assert after == [n for n in full if n != "merge-siblings"] + ["quantize-int8", "merge-siblings"]
    assert names(expand_exact(["exact", "quantize-int8"], without=("merge-siblings",))) == \
        [n for n in full if n != "merge-siblings"] + ["quantize-int8"]
    from fxopt.registry import get_pass

    assert names(expand_exact(["exact", get_pass("merge-siblings")])).count("merge-siblings") == 1


def test_past_the_memory_bound_backends_that_copy_the_weights_are_not_built(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose weights exceed the bound races only candidates on a backend that computes
    with the graph's own tensors (eager): ONNX Runtime's would hold a copy of its own. Without
    such a candidate (``backend="onnx"``), the others are built as before."""
    from types import SimpleNamespace

    from fxopt.latency import Timing

    monkeypatch.setattr(presets, "race", lambda runs, repeats=10: {k: Timing.of([1.0]) for k in runs})
    module = SimpleNamespace(report=SimpleNamespace(passes=[]))
    both = presets.Preset("two", "eager and onnx", (presets.Candidate(("exact",), "eager"),
                                                    presets.Candidate(("exact",), "onnx")), budget=0.05)
    builds: list[str] = []

    def choose(preset: presets.Preset, weight_bytes: int) -> list[presets.Trial]:
        return presets.choose(preset, torch.device("cpu"), lambda c: builds.append(c.backend) or module,
                              measure_error=lambda m: 0.0, run_example=lambda m: lambda: None,
                              hold_bytes=2**30, weight_bytes=weight_bytes)[1]

    trials = choose(both, weight_bytes=4 * 2**30)
    assert builds == ["eager"] and trials[1].dropped.startswith("its backend would hold a copy of the weights")
    assert "4.00 GiB" in trials[1].dropped and "memory_bound=" in trials[1].dropped
    builds.clear()
    assert [t.dropped for t in choose(both, weight_bytes=2**20)] == [None, None] and builds == ["eager", "onnx"]
    builds.clear()
    only_onnx = presets.Preset("one", "onnx", both.candidates[1:], budget=0.05)
    assert choose(only_onnx, weight_bytes=4 * 2**30)[0].dropped is None and builds == ["onnx"]


def test_a_compile_past_its_memory_bound_races_the_eager_candidates_only() -> None:
    model, x = _mlp(), torch.randn(8, 64)
    opt = fxopt.compile(model, (x,), preset="lossless", memory_bound=0)
    note = _note(opt)
    assert "chose [exact] on eager" in note
    assert "[exact] on onnx dropped: its backend would hold a copy of the weights" in note
    assert torch.allclose(opt(x), model(x), atol=1e-5)


@pytest.mark.parametrize("preset", [None, "lossless"])
def test_a_large_compile_gives_what_it_freed_back_once_its_session_is_gone(
        monkeypatch: pytest.MonkeyPatch, preset: str | None) -> None:
    import fxopt.api

    released: list[int] = []
    monkeypatch.setattr(fxopt.api, "collect_let_go", lambda: released.append(1))
    model, x = _mlp(), torch.randn(8, 64)
    monkeypatch.setattr(fxopt.api, "GIVE_BACK_BYTES", 2**40)  # a small compile: nothing to give back
    fxopt.compile(model, (x,), preset=preset)
    assert released == []
    monkeypatch.setattr(fxopt.api, "GIVE_BACK_BYTES", 0)
    opt = fxopt.compile(model, (x,), preset=preset)
    assert released == [1] and torch.allclose(opt(x), model(x), atol=1e-5)


def test_with_stand_ins_the_fastest_is_built_whole_and_the_next_only_if_that_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate's stand-in is built (its error the model's: one over the budget is
    dropped and let go) and the stand-ins race; the whole model then builds them fastest first
    until one is within the budget (here the fastest's whole build fails), the slower ones not
    at all."""
    from types import SimpleNamespace

    from fxopt.latency import Timing

    speed = {"slow": 3.0, "fast": 2.0, "fastest": 1.0, "over": 0.5}
    error = {"slow": 0.01, "fast": 0.02, "fastest": 0.01, "over": 0.5}

    def module(note: str, ms: float) -> SimpleNamespace:
        return SimpleNamespace(report=SimpleNamespace(passes=[]), note=note, error=error[note], ms=ms)

    def race(runs: dict, repeats: int = 10) -> dict:
        return {key: Timing.of([run()]) for key, run in runs.items()}

    def build(candidate: presets.Candidate) -> SimpleNamespace:
        whole_builds.append(candidate.note)
        if candidate.note == "fastest":
            raise fxopt.FxoptError("its lowering failed")
        return module(candidate.note, 9.0)

    monkeypatch.setattr(presets, "race", race)
    stand_ins: list[str] = []
    whole_builds: list[str] = []
    dropped: list[str] = []
    proxy = presets.Proxy(lambda c: stand_ins.append(c.note) or module(c.note, speed[c.note]),
                          drop=lambda c: dropped.append(c.note))
    preset = presets.Preset("proxy-test", "four", tuple(presets.Candidate(("exact",), note=n) for n in speed),
                            budget=0.05)
    chosen, trials = presets.choose(preset, torch.device("cpu"), build, measure_error=lambda m: m.error,
                                    run_example=lambda m: lambda: m.ms, proxy=proxy)
    assert stand_ins == ["slow", "fast", "fastest", "over"] and dropped == ["over"]
    assert whole_builds == ["fastest", "fast"] and chosen.note == "fast" and chosen.ms == 9.0
    by_note = {t.candidate.note: t for t in trials}
    assert by_note["over"].dropped == "output error 0.5 > 0.05"
    assert by_note["fastest"].dropped == "failed: its lowering failed" and by_note["fastest"].module is None
    assert by_note["slow"].dropped == "not lowered whole: 3 ms on its stand-in against the chosen one's 2 ms"
    assert by_note["fast"].proxy_milliseconds == 2.0 and by_note["fast"].milliseconds == 9.0


def test_where_a_candidate_leaves_no_stand_in_the_candidates_are_built_whole_and_raced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from fxopt.latency import Timing

    monkeypatch.setattr(presets, "race", lambda runs, repeats=10: {k: Timing.of([run()]) for k, run in runs.items()})

    def stand_in(candidate: presets.Candidate) -> SimpleNamespace:
        if candidate.note == "b":
            raise presets.NoStandIn(candidate)
        return SimpleNamespace(report=SimpleNamespace(passes=[]), error=0.0, ms=1.0)

    whole: list[str] = []
    preset = presets.Preset("fallback", "two", (presets.Candidate(("exact",), note="a"),
                                                presets.Candidate(("exact",), note="b")), budget=0.05)
    chosen, trials = presets.choose(
        preset, torch.device("cpu"),
        lambda c: whole.append(c.note) or SimpleNamespace(report=SimpleNamespace(passes=[]), error=0.0,
                                                          ms={"a": 2.0, "b": 1.0}[c.note]),
        measure_error=lambda m: m.error, run_example=lambda m: lambda: m.ms, proxy=presets.Proxy(stand_in))
    assert whole == ["a", "b"] and chosen.ms == 1.0
    assert [t.proxy_milliseconds for t in trials] == [None, None] and [t.milliseconds for t in trials] == [2.0, 1.0]


def test_a_candidate_for_loose_budgets_is_built_only_when_the_preset_is_held_to_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from fxopt.latency import Timing

    monkeypatch.setattr(presets, "race", lambda runs, repeats=10: {k: Timing.of([1.0]) for k in runs})
    candidates = (presets.Candidate(("exact",), note="tight"),
                  presets.Candidate(("exact",), note="loose", min_budget=0.07))
    module = SimpleNamespace(report=SimpleNamespace(passes=[]))
    for budget, built in ((0.05, ["tight"]), (0.07, ["tight", "loose"]), (0.1, ["tight", "loose"])):
        seen: list[str] = []

        def build(candidate: presets.Candidate, seen: list[str] = seen) -> SimpleNamespace:
            seen.append(candidate.note)
            return module

        _, trials = presets.choose(presets.Preset("loose", "two", candidates, budget=budget), torch.device("cpu"),
                                   build, measure_error=lambda m: 0.0, run_example=lambda m: lambda: None)
        assert seen == built
        if budget < 0.07:
            assert trials[1].dropped == "built only at a budget of 0.07 or more (the error its recipe costs)"
