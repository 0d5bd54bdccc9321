"""fxopt.pipeline.timings: measured choices, their on-disk cache, and the never-slower check.

Timings are injected (fxopt.pipeline.timings.fixed_timer): these tests assert what is
chosen, cached and measured, never how fast anything runs.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from fxopt.pipeline.timings import KernelTimings, current, fixed_timer, measuring

INPUTS = [[torch.ones(4)], [torch.ones(2)]]


def _candidates(calls):
    def make(name):
        def run(x):
            calls.append((name, x.shape[0]))
            return x * 2
        return run
    return {"fused": make("fused"), "plain": make("plain")}


def test_a_slower_candidate_is_dropped(tmp_path):
    calls = []
    timings = KernelTimings(tmp_path, measure=True, timer=fixed_timer({"fused": 2.0, "plain": 1.0}), fingerprint="m")
    choice = timings.choose("op", "x(4)", _candidates(calls), INPUTS, prefer="plain")
    assert (choice.name, choice.source) == ("plain", "measured")
    assert choice.times == {"fused": [2.0, 2.0], "plain": [1.0, 1.0]}
    assert {size for _, size in calls} == {4, 2}  # measured at both sizes
    faster = KernelTimings(tmp_path / "b", timer=fixed_timer({"fused": 0.5, "plain": 1.0}), fingerprint="m")
    assert faster.choose("op", "x(4)", _candidates([]), INPUTS, prefer="plain").name == "fused"


def test_a_candidate_must_win_at_every_size(tmp_path):
    # faster at the example size, slower at the second batch size: the preferred one stays
    timer = fixed_timer({"fused": [0.5, 3.0], "plain": 1.0})
    timings = KernelTimings(tmp_path, measure=True, timer=timer, fingerprint="m")
    assert timings.choose("op", "x", _candidates([]), INPUTS, prefer="plain").name == "plain"


def test_margin_keeps_the_preferred_within_noise(tmp_path):
    timings = KernelTimings(tmp_path, measure=True, timer=fixed_timer({"fused": 1.0, "plain": 0.99}),
                            fingerprint="m")
    assert timings.choose("op", "x", _candidates([]), INPUTS[:1], prefer="fused", margin=0.02).name == "fused"


def test_the_cache_is_json_on_disk_and_reused(tmp_path):
    first = KernelTimings(tmp_path, measure=True, timer=fixed_timer({"fused": 0.5, "plain": 1.0}), fingerprint="m")
    first.choose("op", "x", _candidates([]), INPUTS, prefer="plain")
    assert first.measurements == 2
    data = json.loads(first.path.read_text())
    assert data["fingerprint"] == "m" and len(data["entries"]) == 1
    calls = []
    again = KernelTimings(tmp_path, measure=True, timer=fixed_timer({"fused": 9.0, "plain": 1.0}), fingerprint="m")
    choice = again.choose("op", "x", _candidates(calls), INPUTS, prefer="plain")
    assert (choice.name, choice.source, again.measurements, calls) == ("fused", "cache", 0, [])
    # another machine (fingerprint), another site or other candidates measure again
    other = KernelTimings(tmp_path, measure=True, timer=fixed_timer({"fused": 9.0, "plain": 1.0}), fingerprint="n")
    assert other.choose("op", "x", _candidates([]), INPUTS, prefer="plain").name == "plain"
    assert again.choose("op", "y", _candidates([]), INPUTS, prefer="plain").source == "measured"


def test_a_deferred_candidate_is_made_only_where_the_choice_is_measured(tmp_path):
    """A candidate that packs a weight to run is made once when measured; a cached verdict
    (a second compile, or the whole model after its stand-in) makes none."""
    from fxopt.latency import Deferred

    made = []

    def candidates():
        return {"fused": Deferred(lambda: made.append("fused") or (lambda x: x * 2)), "plain": lambda x: x * 2}

    timer = fixed_timer({"fused": 0.5, "plain": 1.0})
    first = KernelTimings(tmp_path, measure=True, timer=timer, fingerprint="m")
    measured = candidates()
    assert first.choose("op", "x", measured, INPUTS, prefer="plain").source == "measured"
    assert made == ["fused"] and measured["fused"].value is not None
    cached = candidates()
    again = KernelTimings(tmp_path, measure=True, timer=timer, fingerprint="m")
    assert (again.choose("op", "x", cached, INPUTS, prefer="plain").name, made) == ("fused", ["fused"])
    assert cached["fused"].value is None
    assert torch.equal(cached["fused"](torch.ones(2)), torch.full((2,), 2.0)) and made == ["fused"] * 2


def test_verdicts_are_keyed_by_the_kernels_code(tmp_path, monkeypatch):
    from fxopt.pipeline import timings

    first = KernelTimings(tmp_path, measure=True, timer=fixed_timer({"fused": 0.5, "plain": 1.0}))
    assert first.fingerprint.endswith(f"kernels-{timings.kernels_version()}")
    first.choose("op", "x", _candidates([]), INPUTS, prefer="plain")
    # the same machine with other kernel code: the old verdict is not used
    monkeypatch.setattr(timings, "kernels_version", lambda: "changed")
    again = KernelTimings(tmp_path, measure=True, timer=fixed_timer({"fused": 9.0, "plain": 1.0}))
    assert again.path != first.path
    assert again.choose("op", "x", _candidates([]), INPUTS, prefer="plain").source == "measured"


def test_measuring_off_uses_the_cache_else_the_default_order(tmp_path):
    timings = KernelTimings(tmp_path, measure=False, timer=fixed_timer({"fused": 0.5, "plain": 1.0}), fingerprint="m")
    calls = []
    choice = timings.choose("op", "x", _candidates(calls), INPUTS, prefer="plain")
    assert (choice.name, choice.source, timings.measurements, calls) == ("fused", "default", 0, [])
    KernelTimings(tmp_path, timer=fixed_timer({"fused": 2.0, "plain": 1.0}), measure=True,
                  fingerprint="m").choose("op", "x", _candidates([]), INPUTS, prefer="plain")
    assert KernelTimings(tmp_path, measure=False, fingerprint="m").choose(
        "op", "x", _candidates([]), INPUTS, prefer="plain").name == "plain"


def test_a_corrupt_cache_is_measured_again(tmp_path):
    timings = KernelTimings(tmp_path, timer=fixed_timer({"fused": 0.5, "plain": 1.0}), measure=True, fingerprint="m")
    tmp_path.mkdir(exist_ok=True)
    timings.path.write_text("{not json")
    assert timings.choose("op", "x", _candidates([]), INPUTS, prefer="plain").source == "measured"
    assert json.loads(timings.path.read_text())["entries"]


def test_measuring_scopes_the_timings_a_compile_uses(tmp_path):
    mine = KernelTimings(tmp_path, measure=True, fingerprint="m")
    with measuring(mine) as active:
        assert current() is mine is active
        with measuring(False) as off:
            assert not off.measure and off.directory == mine.directory
        with measuring(True) as on:
            assert on is mine
    assert current() is not mine


def test_bad_candidates_are_refused(tmp_path):
    timings = KernelTimings(tmp_path, fingerprint="m")
    with pytest.raises(ValueError, match="no candidates"):
        timings.choose("op", "x", {}, INPUTS)
    with pytest.raises(ValueError, match="not one of"):
        timings.choose("op", "x", _candidates([]), INPUTS, prefer="other")


def test_a_candidate_that_fails_at_the_shape_is_left_out(tmp_path):
    def broken(x):
        raise RuntimeError("no kernel for this shape")

    timings = KernelTimings(tmp_path, measure=True, timer=fixed_timer({"fused": 0.1, "plain": 1.0}), fingerprint="m")
    choice = timings.choose("op", "x", {"fused": broken, "plain": lambda x: x}, INPUTS, prefer="plain")
    assert (choice.name, choice.times) == ("plain", {"plain": [1.0, 1.0]})
    with pytest.raises(RuntimeError, match="no kernel"):  # the preferred one must run
        timings.choose("op", "y", {"fused": lambda x: x, "plain": broken}, INPUTS, prefer="plain")


def test_the_cache_file_is_data_a_crafted_one_never_runs_and_is_measured_over(tmp_path) -> None:
    """The kernel-timing cache is JSON: a pickle payload in its place is never executed, and
    entries of the wrong shape are no verdict (the candidates are measured again)."""
    import json
    import os
    import pickle

    from fxopt.pipeline.timings import FORMAT, KernelTimings, fixed_timer

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    timings = KernelTimings(tmp_path, measure=True, timer=fixed_timer({"a": 2.0, "b": 1.0}),
                             fingerprint="test-machine")
    timings.path.parent.mkdir(parents=True, exist_ok=True)
    timings.path.write_bytes(pickle.dumps(Payload()))
    choice = timings.choose("op", "site", {"a": lambda: None, "b": lambda: None}, [[]])
    assert choice.name == "b" and choice.source == "measured" and not marker.exists()

    key = KernelTimings.key("op", "other", ["a", "b"])
    crafted = {"format": FORMAT, "fingerprint": "test-machine",
               "entries": {key: {"chosen": "a", "times": {"a": "rm -rf /", "b": [1.0]}}}}
    timings.path.write_text(json.dumps(crafted))
    fresh = KernelTimings(tmp_path, measure=True, timer=fixed_timer({"a": 2.0, "b": 1.0}),
                             fingerprint="test-machine")
    assert fresh.choose("op", "other", {"a": lambda: None, "b": lambda: None}, [[]]).source == "measured"
    assert json.loads(timings.path.read_text())["entries"][key]["chosen"] == "b"  # written as data again


def test_the_default_timer_stops_timing_a_candidate_that_cannot_win():
    from fxopt.pipeline.timings import side_by_side_timer

    calls = {"fast": 0, "slow": 0}

    times = side_by_side_timer()({"fast": _sleeper(calls, "fast", 0.001), "slow": _sleeper(calls, "slow", 0.05)})
    assert times["slow"] > 3 * times["fast"]
    assert calls["slow"] == 2 and calls["fast"] > 2, calls  # one warm-up and one timed round


def test_without_a_warm_up_a_slow_first_call_is_not_taken_for_a_slow_candidate():
    # The whole-graph check times graphs the compile already ran, with no warm-up call: a
    # candidate's first round may still hold a one-time cost (a weight packed on first use),
    # so nothing is dropped as hopeless before the second round, and the fastest round counts.
    from fxopt.pipeline.timings import side_by_side_timer

    calls = {"lazy": 0, "plain": 0}

    def lazy() -> None:
        calls["lazy"] += 1
        time.sleep(0.05 if calls["lazy"] == 1 else 0.001)

    def plain() -> None:
        calls["plain"] += 1
        time.sleep(0.004)

    times = side_by_side_timer(warmup=0)({"lazy": lazy, "plain": plain})
    assert calls["lazy"] >= 2 and calls["plain"] >= 2, calls
    assert times["lazy"] < times["plain"], times


def test_a_settled_timer_stops_once_the_preferred_candidate_clearly_leads():
    from fxopt.pipeline.timings import side_by_side_timer

    calls = {"preferred": 0, "other": 0}

    timer = side_by_side_timer(warmup=0, settled=0.10, max_seconds=10.0)
    times = timer({"preferred": _sleeper(calls, "preferred", 0.002), "other": _sleeper(calls, "other", 0.006)})
    assert calls == {"preferred": 1, "other": 1} and times["preferred"] < times["other"]  # one round
    # the other way round it is not settled: the preferred one may be paying a first call's cost
    calls.update(preferred=0, other=0)
    timer({"preferred": _sleeper(calls, "preferred", 0.006), "other": _sleeper(calls, "other", 0.002)})
    assert calls["preferred"] >= 2 and calls["other"] >= 2, calls


def _sleeper(calls: dict[str, int], name: str, seconds: float):
    def call() -> None:
        calls[name] += 1
        time.sleep(seconds)
    return call
