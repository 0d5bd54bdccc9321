"""Presets: named recipes that pick the fastest verified pipeline and backend for a device.

A preset is data: a budget and a list of candidates, each a pipeline (pass specs, with
``"exact"`` standing for every registered exact pass in order, less those the candidate runs
elsewhere in its list or leaves out with ``without``) and a backend, optionally limited to
some devices. ``fxopt.compile(model, inputs, preset="int8")`` compiles every
candidate that applies (a candidate whose backend is not installed, or whose arithmetic this
CPU would emulate, is dropped, with the reason and the install command in the report; a
fallback only where the candidates before it left sites alone for the budget), drops the ones whose output error on the
example and calibration data exceeds the preset's budget or whose passes all rolled back (or
whose compile failed), times the rest side by side (interleaved, median; :func:`race` stops
timing the clearly slower ones after a few rounds) on the example inputs and keeps the
fastest. Each candidate holds a backend's copy of the weights: when the ones built so far
exceed the compile's memory bound (a large model), they race there and only the fastest is
kept, so that beside the candidate being built what is held stays within the bound (or is one
candidate). A model whose weights alone exceed the bound races only the candidates whose
backend computes with the graph's own tensors (``Backend.shares_weights``), where there are
any: the others would each hold a copy of the weights; and where the model has repeated blocks,
its candidates' passes run on the whole model but race on stand-ins, a sample of its blocks as
each candidate left them (:mod:`fxopt.proxy`): only the fastest is lowered whole. The
report says what was chosen, the measured times of the others, and why any was dropped.

The candidates share work: the model is captured once, the exact passes they start with run
once, and a candidate whose pipeline begins with another's up to one of its lossy passes (the
same pipeline on another backend, or more passes after it) continues from that one's graph;
each continues from that graph with its own references and lowers its own copy. After each
build, what no candidate still to build continues from is let go.

Presets are found like passes, through the ``fxopt.presets`` entry-point group (the built-in
ones are declared beside the passes), so the core names no pass.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch

from fxopt import isa, latency
from fxopt.errors import FxoptError, InputError
from fxopt.ir.derived import collect_let_go
from fxopt.latency import Timing
from fxopt.phases import phase
from fxopt.registrations import Registrations
from fxopt.rewrite.constraints import OVER_BUDGET

ENTRY_POINT_GROUP = "fxopt.presets"


@dataclass(frozen=True)
class Candidate:
    """One way to meet a preset: passes (names or specs; ``"exact"`` expands) and a backend."""

    passes: tuple[str, ...]
    backend: str = "eager"
    devices: tuple[str, ...] = ("cpu", "cuda")
    note: str = ""
    without: tuple[str, ...] = ()  # exact passes that ``"exact"`` leaves out here
    # A recipe that only means what it says with calibration batches (static activation
    # scales): without them it is dropped before anything is compiled for it.
    needs_calibration: bool = False
    # A recipe that is only fast where the CPU runs its arithmetic natively: the
    # :class:`fxopt.isa.Isa` property naming that GEMM unit ("bf16_gemm"). On a CPU where it
    # is "none" (emulated, slower than float32) the candidate is dropped before it is compiled.
    cpu_unit: str | None = None
    # A recipe worth its compile only where the candidates before it fell short: it is built
    # only when none of those built within the budget left a site alone to stay within it (its
    # lossy passes refused none over budget). bf16 Linears beside int8 ones: an int8 Linear is
    # not slower than a bf16 one at the same site, so where an int8 recipe kept every Linear,
    # bf16 could only lose the race; where the budget made them keep most float, it wins.
    # Past the compile's memory bound it is not built (its rewrite copies the weights).
    fallback: bool = False
    # A recipe whose error only a loose budget admits: built only where the preset is held to
    # at least this budget (below it, its verification would refuse it after its compile).
    min_budget: float | None = None

    def __post_init__(self) -> None:
        if self.cpu_unit is not None and self.cpu_unit not in isa.GEMM_UNITS:
            raise InputError(f"Candidate(cpu_unit={self.cpu_unit!r}): must be one of {', '.join(isa.GEMM_UNITS)}")

    def describe(self) -> str:
        without = f" (exact without {', '.join(self.without)})" if self.without else ""
        return f"[{', '.join(self.passes)}]{without} on {self.backend}"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    candidates: tuple[Candidate, ...]
    # The largest relative output error a candidate may have against the model (None: exact).
    budget: float | None = None


_REGISTRATIONS: Registrations[Preset] = Registrations("presets")


def _load() -> dict[str, Preset]:
    state = _REGISTRATIONS.current()
    if state.discovered is None:
        found: dict[str, Preset] = {}
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            value = entry.load()
            for preset in value if isinstance(value, (list, tuple)) else [value]:
                found.setdefault(preset.name, preset)
        state.discovered = found
    return state.merged()


def list_presets() -> list[Preset]:
    return sorted(_load().values(), key=lambda preset: preset.name)


def get_preset(name: str) -> Preset:
    presets = _load()
    if name not in presets:
        raise InputError(f"unknown preset {name!r} (available: {', '.join(sorted(presets))})")
    return presets[name]


@contextmanager
def registered_preset(preset: Preset) -> Iterator[Preset]:
    """Register ``preset`` for the length of a ``with`` block (tests, experiments)."""
    with _REGISTRATIONS.registered({preset.name: preset}):
        yield preset


def with_budget(preset: Preset, budget: float) -> Preset:
    """``preset`` held to ``budget`` (relative output error against the model) instead of its
    own: the candidates over it are dropped (:func:`choose`), and each lossy pass of a
    candidate searches within it too (:func:`within_budget`)."""
    if not budget > 0:
        raise InputError(f"budget must be a positive relative output error, got {budget!r}")
    return dataclasses.replace(preset, budget=budget)


def within_budget(passes: Sequence[Any], budget: float | None) -> list[Any]:
    """``passes`` (resolved :class:`~fxopt.pass_api.Pass` objects) with every lossy one's own
    ``budget`` option lowered to ``budget`` where it is larger (a pass's budget is its output
    error against the model, as a preset's is)."""
    if budget is None:
        return list(passes)
    return [dataclasses.replace(p, budget=budget)
            if hasattr(p, "budget") and p.budget_or_none is not None and p.budget_or_none > budget else p
            for p in passes]


@dataclass
class Trial:
    candidate: Candidate
    module: Any = None
    error: float | None = None
    milliseconds: float | None = None
    dropped: str | None = None
    seconds: float | None = None  # building it: the passes it did not share, its lowering
    proxy_milliseconds: float | None = None  # its stand-in's time (Proxy)
    left_over_budget: int | None = None  # sites its lossy passes left alone to stay within their budget


def choose(
    preset: Preset,
    device: torch.device,
    build: Callable[[Candidate], Any],
    measure_error: Callable[[Any], float],
    run_example: Callable[[Any], Callable[[], Any]],
    *,
    repeats: int = 10,
    calibrated: bool = True,
    hold_bytes: int | None = None,
    size_of: Callable[[Any], int] = lambda module: 0,
    building: Callable[[list[Candidate]], None] | None = None,
    weight_bytes: int = 0,
    proxy: Proxy | None = None,
) -> tuple[Any, list[Trial]]:
    """Compile each candidate for ``device`` with ``build``, keep those within the budget,
    time them side by side (:func:`race`) and return the fastest module and every trial.
    ``calibrated``: whether calibration batches were given (else the candidates that need
    them are dropped uncompiled). ``hold_bytes``: how many bytes of built candidates
    (``size_of`` each, its weights) may be held at once; when the ones held exceed it, they
    race there and only the fastest is kept (None: no bound, one race at the end).
    ``building``: told before each build which candidates are still to be built after it
    (what shared work to keep once its passes have run). ``weight_bytes``: the model's; past
    ``hold_bytes`` a candidate whose backend would hold a copy of them of its own is dropped
    unbuilt where one whose backend shares them remains. ``proxy``: stand-ins for the model
    to race the candidates on (:func:`_by_proxy`) where more than one is left to build."""
    trials = [Trial(c) for c in preset.candidates if device.type in c.devices]
    if not trials:
        raise InputError(f"preset {preset.name!r} has no candidate for device {device.type!r}")
    for trial in trials:
        trial.dropped = _unavailable(trial.candidate, device)
        if trial.dropped is None and trial.candidate.needs_calibration and not calibrated:
            trial.dropped = "needs calibration batches (calibration=[...]), none were given"
        least = trial.candidate.min_budget
        if trial.dropped is None and least is not None and not (preset.budget is not None and preset.budget >= least):
            trial.dropped = f"built only at a budget of {least:g} or more (the error its recipe costs)"
    if hold_bytes is not None and weight_bytes > hold_bytes:
        _share_weights_past_the_bound(trials, weight_bytes, hold_bytes)
        for trial in trials:
            if trial.dropped is None and trial.candidate.fallback:
                trial.dropped = (f"a fallback, not built past the compile's memory bound ({hold_bytes / 2**30:.2f} "
                                 "GiB): its rewrite copies the weights")
    if proxy is not None and sum(t.dropped is None for t in trials) > 1:
        chosen = _by_proxy(preset, trials, proxy, build, measure_error, run_example, repeats, building)
        if chosen is not None:
            return chosen
    held: list[Trial] = []
    for index, trial in enumerate(trials):
        if trial.dropped is None and trial.candidate.fallback:
            trial.dropped = _not_needed(trials[:index])
        if trial.dropped is not None:
            continue
        if building is not None:
            building([t.candidate for t in trials[index + 1:] if t.dropped is None])
        if not _build(trial, build, measure_error, preset.budget):
            continue
        held.append(trial)
        # Each candidate holds a backend's copy of the weights: past the bound (a large model),
        # the held ones race now and the slower go, so that no more than the bound and one
        # candidate are ever held; a small model's candidates all race once, at the end.
        if len(held) > 1 and hold_bytes is not None and sum(size_of(t.module) for t in held) > hold_bytes:
            held = [_fastest(held, run_example, repeats)]
    if not held:
        _none_met(preset, trials)
    best = _fastest(held, run_example, repeats) if len(held) > 1 or held[0].milliseconds is None else held[0]
    return best.module, trials


def _not_needed(before: Sequence[Trial]) -> str | None:
    """Why a fallback candidate is not built: a candidate before it (not a fallback: the
    fallbacks are alternatives to each other) met the budget without leaving a site alone to
    stay within it (None: none did, so it is built)."""
    for trial in before:
        if trial.dropped is None and not trial.candidate.fallback and trial.left_over_budget == 0:
            return (f"a fallback, not built: {trial.candidate.describe()} met the budget without leaving a site "
                    "alone for it")
    return None


def _none_met(preset: Preset, trials: Sequence[Trial]) -> None:
    reasons = "; ".join(f"{t.candidate.describe()}: {t.dropped}" for t in trials)
    raise FxoptError(f"preset {preset.name!r}: no candidate met its budget ({reasons})")


def _build(trial: Trial, build: Callable[[Candidate], Any], measure_error: Callable[[Any], float],
           budget: float | None) -> bool:
    """Build ``trial``'s candidate and check it against ``budget``: whether it is kept (else
    ``trial.dropped`` says why, and it is let go)."""
    start = time.perf_counter()
    try:
        trial.module = build(trial.candidate)
    except FxoptError as exc:
        trial.dropped = f"failed: {exc}"
        return False
    finally:
        trial.seconds = time.perf_counter() - start
    lossy = [r for r in trial.module.report.passes if not r.exact]
    # a rewrite that only prepares for a later one (smooth-quant) is no recipe on its own
    prepares = {r.name: _prepares(r.name) for r in lossy}
    preparing = [r for r in lossy if prepares[r.name]]
    recipe = [r for r in lossy if not prepares[r.name]]
    trial.left_over_budget = sum(r.skipped.get(OVER_BUDGET, 0) for r in lossy)
    if lossy and not any(r.status == "applied" for r in recipe):
        trial.dropped = "its lossy passes changed nothing (" + ", ".join(
            f"{r.name}: {r.status}" for r in recipe) + ")" + "".join(
            f"; {r.name} {r.status}, which only prepares for them" for r in preparing)
    else:
        trial.error = measure_error(trial.module)
        limit = budget if budget is not None else 1e-4
        if not trial.error <= limit:
            trial.dropped = f"output error {trial.error:.3g} > {limit:g}"
    if trial.dropped is not None:
        _let_go(trial)  # a dropped candidate's weights (a backend's own copy) go now
        return False
    return True


def _prepares(name: str) -> bool:
    """Whether the registered pass ``name`` only prepares for a later one (``Pass.prepares``)."""
    from fxopt.registry import get_pass_type

    try:
        return bool(get_pass_type(name).prepares)
    except FxoptError:  # not registered here (a record from elsewhere): a pass of its own
        return False


class NoStandIn(Exception):  # noqa: N818 - a signal, not an error: the race goes on without stand-ins
    """Raised by :attr:`Proxy.build` where a candidate's passes left no stand-in to cut."""


@dataclass
class Proxy:
    """Stand-ins for the model that the candidates race on (:mod:`fxopt.proxy`): ``build``
    runs a candidate's passes on the model and lowers a stand-in of their result, its report
    giving the model's error; ``drop`` lets go of a dropped candidate's passes' result;
    ``search``, run for every candidate before any stand-in is built, runs the passes on the
    model alone (``build`` then continues from their result), so that no stand-in is held while
    another candidate's search keeps its evidence."""

    build: Callable[[Candidate], Any]
    drop: Callable[[Candidate], None] = lambda candidate: None
    search: Callable[[Candidate], None] = lambda candidate: None


def _by_proxy(preset: Preset, trials: list[Trial], proxy: Proxy, build: Callable[[Candidate], Any],
              measure_error: Callable[[Any], float], run_example: Callable[[Any], Callable[[], Any]],
              repeats: int, building: Callable[[list[Candidate]], None] | None) -> tuple[Any, list[Trial]] | None:
    """Each candidate's passes run (``proxy.search``), then each one's stand-in built and
    checked against the budget (its error is the model's), those within it raced; then, fastest first, each is built whole until one is
    within the budget: the only one lowered whole, unless one fails there. None where a
    candidate's passes left no stand-in (:class:`NoStandIn`): the caller builds them whole."""
    live = [t for t in trials if t.dropped is None]
    searched: dict[int, float] = {}
    for index, trial in enumerate(live):
        if building is not None:
            building([t.candidate for t in live[index + 1:]])
        start = time.perf_counter()
        try:
            proxy.search(trial.candidate)
        except FxoptError as exc:
            trial.dropped = f"failed: {exc}"
            proxy.drop(trial.candidate)
        searched[id(trial)] = time.perf_counter() - start
    live = [t for t in live if t.dropped is None]
    raced: list[tuple[Trial, Trial]] = []
    for index, trial in enumerate(live):
        if building is not None:
            building([t.candidate for t in live[index + 1:]])
        stand_in = Trial(trial.candidate)
        try:
            kept = _build(stand_in, proxy.build, measure_error, preset.budget)
            stand_in.seconds = (stand_in.seconds or 0.0) + searched[id(trial)]
        except NoStandIn:  # the ones raced so far are built whole; the dropped stay dropped
            for earlier, _ in raced:
                earlier.error = earlier.seconds = None
            return None
        if kept:
            trial.error, trial.seconds = stand_in.error, stand_in.seconds
            raced.append((trial, stand_in))
        else:
            trial.dropped = stand_in.dropped
            proxy.drop(trial.candidate)
    if raced:
        with phase("timing"):
            timings = race({str(i): run_example(s.module) for i, (_, s) in enumerate(raced)}, repeats=repeats)
        for i, (trial, stand_in) in enumerate(raced):
            trial.proxy_milliseconds = timings[str(i)].median
            stand_in.module = None
        collect_let_go()
    order = sorted((trial for trial, _ in raced), key=lambda t: t.proxy_milliseconds or 0.0)
    best = None
    for trial in order:
        if building is not None:
            building([])  # the others' stages go before this one is lowered whole
        searched = trial.seconds or 0.0
        if _build(trial, build, measure_error, preset.budget):
            trial.seconds = searched + (trial.seconds or 0.0)
            best = trial
            break
    if best is None:
        _none_met(preset, trials)
    for trial in order[order.index(best) + 1:]:
        trial.dropped = (f"not lowered whole: {trial.proxy_milliseconds:.3g} ms on its stand-in against the "
                         f"chosen one's {best.proxy_milliseconds:.3g} ms")
    return _fastest([best], run_example, repeats).module, trials


def _share_weights_past_the_bound(trials: list[Trial], weight_bytes: int, hold_bytes: int) -> None:
    """A model whose weights alone exceed the memory bound races only the candidates whose
    backend computes with the graph's own tensors, when there are any: one that exports the
    graph (ONNX Runtime, OpenVINO) would hold a copy of its own beside the model and the
    candidate held, and its compile copies them again. ``memory_bound=`` raises the bound;
    ``backend=`` keeps only that backend's candidates, which are then built."""
    from fxopt.backends import shares_weights

    if not any(t.dropped is None and shares_weights(t.candidate.backend) for t in trials):
        return
    for trial in trials:
        if trial.dropped is None and not shares_weights(trial.candidate.backend):
            trial.dropped = (f"its backend would hold a copy of the weights of its own ({weight_bytes / 2**30:.2f} GiB "
                             f"before the passes), past the compile's memory bound ({hold_bytes / 2**30:.2f} GiB); "
                             "memory_bound= raises it, backend= races that backend alone")


def _fastest(held: list[Trial], run_example: Callable[[Any], Callable[[], Any]], repeats: int) -> Trial:
    """Time ``held`` side by side (:func:`race`; a lone one once, for the report), let all but
    the fastest go and return it. Each keeps the median of its latest race."""
    with phase("timing"):
        timings = race({str(i): run_example(t.module) for i, t in enumerate(held)}, repeats=repeats)
    for i, trial in enumerate(held):
        trial.milliseconds = timings[str(i)].median
    best = min(held, key=lambda t: t.milliseconds or 0.0)
    for trial in held:
        if trial is not best:
            _let_go(trial)
    return best


def _let_go(trial: Trial) -> None:
    """Drop ``trial``'s module now. A graph module refers to itself (its graph, its nodes), so
    without a collection its weights would wait for the next one."""
    trial.module = None
    collect_let_go()


def _unavailable(candidate: Candidate, device: torch.device) -> str | None:
    """Why ``candidate`` cannot run here: its backend is not installed or not on ``device``,
    or the CPU emulates the arithmetic it needs (:attr:`Candidate.cpu_unit`)."""
    from fxopt.backends import unavailable_reason

    reason = unavailable_reason(candidate.backend, device)
    if reason is not None:
        return f"backend not available: {reason}"
    if candidate.cpu_unit is not None and device.type == "cpu" and getattr(isa.detect(), candidate.cpu_unit) == "none":
        unit = candidate.cpu_unit.removesuffix("_gemm")
        return f"this CPU has no {unit} GEMM unit (it would emulate {unit}, slower than float32)"
    return None


RACE_ROUNDS = 2  # rounds every candidate runs before the clearly slower ones stop
RACE_MARGIN = 1.10  # a candidate whose fastest run is this much slower than the best median stops
RACE_SECONDS = 2.0  # after RACE_ROUNDS, rounds go on (up to ``repeats``) only while timing took less


def race(candidates: dict[str, Callable[[], Any]], *, repeats: int = 10) -> dict[str, Timing]:
    """Interleaved timing (one warm-up each, then rounds) that stops timing a candidate once
    its fastest run is ``RACE_MARGIN`` slower than the best median after ``RACE_ROUNDS``
    rounds, and stops altogether when one is left, or, past ``RACE_ROUNDS``, once timing has
    taken ``RACE_SECONDS``: a model whose runs take a second is not timed ten times over to
    separate candidates within 10% of each other (either is a good choice), while one whose
    runs take milliseconds gets every round. A lone candidate runs twice and keeps the second
    (the first call of a module pays its one-time set-up). Each candidate's
    timing is over the rounds it ran. The loop is :func:`fxopt.latency.interleaved`."""
    if len(candidates) == 1:
        return latency.measure_side_by_side(candidates, warmup=1, repeats=1)
    return latency.interleaved(candidates, warmup=1, repeats=repeats, keep=_still_racing)


def _still_racing(round_: int, samples: Mapping[str, list[float]], elapsed: float) -> list[str]:
    """The race's policy for :func:`fxopt.latency.interleaved`: who is timed next round."""
    names = list(samples)
    if round_ >= RACE_ROUNDS and len(names) > 1:
        best = min(statistics.median(samples[name]) for name in names)
        names = [name for name in names if min(samples[name]) <= best * RACE_MARGIN]
    if len(names) == 1 or (round_ >= RACE_ROUNDS and elapsed > RACE_SECONDS):
        return []
    return names


def summary(preset: Preset, trials: Sequence[Trial], chosen: Any) -> str:
    """The report's note: what was chosen, and what the others measured or why they were dropped."""
    parts = []
    for trial in trials:
        if trial.module is chosen:
            continue
        if trial.dropped:
            parts.append(f"{trial.candidate.describe()} dropped: {trial.dropped}")
        else:
            parts.append(f"{trial.candidate.describe()} {trial.milliseconds:.3g} ms, err {trial.error:.2g}"
                         f"{_built(trial)}")
    best = next(t for t in trials if t.module is chosen)
    head = (f"preset {preset.name}: chose {best.candidate.describe()} ({best.milliseconds:.3g} ms, "
            f"err {best.error:.2g}{_built(best)}, fastest of {_raced(trials)} within "
            f"{'exact tolerance' if preset.budget is None else f'budget {preset.budget:g}'})")
    return head + ("; " + "; ".join(parts) if parts else "")


def _raced(trials: Sequence[Trial]) -> int:
    """How many candidates the chosen one was timed against (on a stand-in or on the model)."""
    return sum(t.dropped is None or t.proxy_milliseconds is not None for t in trials)


def _built(trial: Trial) -> str:
    on_proxy = "" if trial.proxy_milliseconds is None else f", {trial.proxy_milliseconds:.3g} ms on its stand-in"
    return on_proxy + ("" if trial.seconds is None else f", built in {trial.seconds:.3g} s")
