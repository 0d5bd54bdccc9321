"""Measured choices: which kernel runs at a site is decided by timing it on this machine.

A lowering that exists for speed (a fused oneDNN Linear, an int8 kernel variant) asks
:meth:`KernelTimings.choose` which of its candidates to run at each site: the candidates are
timed interleaved on inputs of the site's shape with the project's one timing loop
(:func:`fxopt.latency.interleaved`), at the example shape and, where the batch is
dynamic, at a second batch size; a candidate replaces the preferred one (the graph as it was)
only when it is faster at every size. The verdict and the times are cached on disk as JSON,
keyed by the machine's fingerprint (:func:`fxopt.isa.fingerprint`: CPU model and flags, CUDA
device, PyTorch version, threads) and the version of the kernels' code (:func:`kernels_version`:
a verdict measured on other kernel code is measured again), the op, the site's shapes and dtypes, and the candidates'
names, so a second compile of the same shapes measures nothing, as autotuning compilers do.

Modes: measuring on (the default; ``FXOPT_MEASURE=0`` in the environment turns it off),
measuring off (a cached verdict, else the candidates' own order, which the cost model set,
decides), and an injected ``timer`` (deterministic tests: fixed times, counted calls).
The cache directory is ``~/.cache/fxopt``, or ``$FXOPT_CACHE_DIR``.

:func:`measuring` makes a :class:`KernelTimings` the one a compile uses (the backends find it
with :func:`current`); :func:`never_slower` is the final check of a compile: the lowered
module against the captured graph, measured the same way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxopt import isa
from fxopt.ir import copy_graph_module
from fxopt.latency import Deferred, KeepPolicy, interleaved
from fxopt.phases import phase

CACHE_DIR_ENV = "FXOPT_CACHE_DIR"
MEASURE_ENV = "FXOPT_MEASURE"
FORMAT = 1

# Milliseconds per call of each named zero-argument callable.
Timer = Callable[[Mapping[str, Callable[[], Any]]], Mapping[str, float]]


def default_cache_dir() -> Path:
    """``$FXOPT_CACHE_DIR``, else ``~/.cache/fxopt``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fxopt"


@functools.cache
def kernels_version() -> str:
    """A hash of the code that candidates run (``fxopt/kernels`` and ``fxopt/lowering``): a
    faster version of a kernel under the same name must not lose to the verdict of its old one."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in ("kernels", "lowering"):
        for source in sorted((root / folder).glob("*.py")):
            digest.update(source.name.encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def measuring_by_default() -> bool:
    """False when ``$FXOPT_MEASURE`` is ``0``, ``off``, ``false`` or ``no``."""
    return os.environ.get(MEASURE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def side_by_side_timer(*, warmup: int = 1, repeats: int = 15, max_seconds: float = 0.1,
                       min_repeats: int = 2, settled: float | None = None) -> Timer:
    """The default timer: the fastest round of each candidate in
    :func:`~fxopt.latency.interleaved`, at most ``max_seconds`` of timed rounds per
    site and size after ``min_repeats`` rounds (a slow candidate, such as a QDQ graph that
    dequantizes its weight on every call, is not timed for long; one more than :data:`HOPELESS`
    times slower than the fastest after a round is not timed again). The fastest, not the median: another process taking the core only ever
    adds time, so on a shared machine the fastest round is the steadiest estimate of what a
    kernel costs (the median moves with the load). ``settled``: once the first candidate (the
    preferred one) is faster than every other by more than this fraction, timing stops, after
    any round (a first round's one-time costs only ever slow a candidate down)."""
    # Without a warm-up, the first round may hold a candidate's one-time cost (a lazily packed
    # weight): nothing is dropped as hopeless before a second round.
    keep = _drop_hopeless if warmup > 0 else _drop_hopeless_after_first
    min_repeats = min_repeats if warmup > 0 else max(min_repeats, 2)
    if settled is not None:
        keep = _until_first_leads(settled, keep)

    def timer(candidates: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
        timings = interleaved(candidates, warmup=warmup, repeats=repeats, max_seconds=max_seconds,
                              min_repeats=min_repeats, keep=keep)
        return {name: timing.min for name, timing in timings.items()}
    return timer


HOPELESS = 3.0
# A whole graph measured faster than the other by more than this fraction in one round needs
# no second: five times the noise (NOISE) that two runs of one graph show on a shared machine.
SETTLED = 0.10


def _drop_hopeless(rounds: int, samples: Mapping[str, list[float]], elapsed: float) -> list[str]:
    """Candidates still worth a round: a kernel more than :data:`HOPELESS` times slower than
    the fastest cannot win, and timing it again is where a compile's measuring time goes (a
    library kernel that dequantizes its weight on every call, at a prefill's shape)."""
    best = min(min(values) for values in samples.values())
    return [name for name, values in samples.items() if min(values) <= HOPELESS * best]


def _drop_hopeless_after_first(rounds: int, samples: Mapping[str, list[float]], elapsed: float) -> list[str]:
    return list(samples) if rounds < 2 else _drop_hopeless(rounds, samples, elapsed)


def _until_first_leads(margin: float, then: KeepPolicy) -> KeepPolicy:
    def keep(rounds: int, samples: Mapping[str, list[float]], elapsed: float) -> Iterable[str]:
        first, *others = samples
        if others and all(min(samples[first]) * (1.0 + margin) < min(samples[name]) for name in others):
            return []
        return then(rounds, samples, elapsed)
    return keep


def fixed_timer(times: Mapping[str, float | Sequence[float]]) -> Timer:
    """A deterministic timer for tests: each candidate is called once (so a broken one still
    fails) and "takes" ``times[name]`` ms; a sequence gives the times of successive calls."""
    calls: dict[str, int] = {}

    def timer(candidates: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
        result = {}
        for name, fn in candidates.items():
            fn()
            value = times[name]
            if isinstance(value, Sequence):
                value = value[min(calls.get(name, 0), len(value) - 1)]
            calls[name] = calls.get(name, 0) + 1
            result[name] = float(value)
        return result
    return timer


@dataclass
class Choice:
    """What :meth:`KernelTimings.choose` decided at one site."""

    op: str
    site: str
    name: str
    source: str  # "measured", "cache" (measured by an earlier compile) or "default" (not measured)
    times: dict[str, list[float]] = field(default_factory=dict)  # candidate -> ms at each measured size

    def describe(self) -> str:
        """``onednn 0.412 ms vs aten 0.530 ms (measured)``; sizes joined by ``/``."""
        if not self.times:
            return f"{self.name} (not measured: the default order)"
        ordered = [self.name] + [name for name in self.times if name != self.name]
        spelled = " vs ".join(f"{name} {'/'.join(f'{t:.3f}' for t in self.times[name])} ms" for name in ordered)
        return f"{spelled} ({self.source})"

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, "site": self.site, "chosen": self.name, "source": self.source, "times": self.times}


class KernelTimings:
    """Measured choices and their on-disk cache (one JSON file per machine fingerprint).

    ``measure``: time candidates that are not cached (False: a cached verdict, else the
    default). ``timer``: how candidates are timed (default: :func:`side_by_side_timer`).
    ``measurements`` counts the candidate sets this object timed. ``warm_timer`` times
    candidates that have already run in this process (whole graphs the compile ran; default:
    the same loop without its warm-up call, as the fastest of at least two rounds leaves out
    a first call's one-time cost anyway, and settled after one round where the preferred
    candidate leads every other by more than :data:`SETTLED`).
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, measure: bool | None = None,
                 timer: Timer | None = None, fingerprint: str | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.measure = measuring_by_default() if measure is None else measure
        self.timer = timer or side_by_side_timer()
        self.warm_timer = timer or side_by_side_timer(warmup=0, settled=SETTLED)
        self.fingerprint = fingerprint or f"{isa.fingerprint()} kernels-{kernels_version()}"
        self.measurements = 0
        self._entries: dict[str, Any] | None = None

    def without_measuring(self) -> KernelTimings:
        """The same cache and timer, with measuring off."""
        return KernelTimings(self.directory, measure=False, timer=self.timer, fingerprint=self.fingerprint)

    @property
    def path(self) -> Path:
        digest = hashlib.sha256(self.fingerprint.encode()).hexdigest()[:16]
        return self.directory / f"kernel-timings-{digest}.json"

    @staticmethod
    def key(op: str, site: str, candidates: Sequence[str]) -> str:
        return json.dumps([op, site, sorted(candidates)])

    def cached(self, op: str, site: str, candidates: Sequence[str]) -> dict[str, Any] | None:
        entry = self._load().get(self.key(op, site, candidates))
        if not isinstance(entry, dict) or entry.get("chosen") not in candidates:
            return None
        times = entry.get("times")
        # The file is data someone could have edited: anything but names and lists of
        # numbers is no verdict, and the candidates are measured again.
        if not isinstance(times, dict) or not all(
                isinstance(name, str) and isinstance(values, list)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                for name, values in times.items()):
            return None
        return entry

    def choose(self, op: str, site: str, candidates: Mapping[str, Callable[..., Any]],
               inputs: Sequence[Sequence[Any]], *, prefer: str | None = None, margin: float = 0.0,
               warm: bool = False) -> Choice:
        """Which of ``candidates`` (name -> callable on one of ``inputs``, or a
        :class:`Deferred` one, made only where they are measured) runs at ``site``.

        ``inputs`` holds one argument list per size to measure (the example shape, then a
        second batch size where the batch is dynamic). ``prefer`` (default: the first
        candidate) is kept unless another is faster than it by more than ``margin`` (a
        fraction) at every size; unmeasured, the first candidate (the cost model's order)
        runs. ``site`` names the shapes and dtypes: it is part of the cache key.
        """
        if not candidates:
            raise ValueError(f"{op}: no candidates to choose from")
        names = list(candidates)
        prefer = names[0] if prefer is None else prefer
        if prefer not in candidates:
            raise ValueError(f"{op}: preferred candidate {prefer!r} is not one of {names}")
        entry = self.cached(op, site, names)
        if entry is not None:
            return Choice(op, site, entry["chosen"], "cache", {k: list(v) for k, v in entry["times"].items()})
        if not self.measure or len(names) == 1:
            return Choice(op, site, names[0], "default")
        # made outside the timing loop
        runnable = {name: c.made() if isinstance(c, Deferred) else c for name, c in candidates.items()}
        times: dict[str, list[float]] = {name: [] for name in names}
        timer = self.warm_timer if warm else self.timer
        for args in inputs:
            # the preferred candidate first: a settled timer stops once it clearly leads
            order = [prefer, *(name for name in runnable if name != prefer)]
            calls = {name: (lambda fn=runnable[name], args=args: fn(*args)) for name in order if name in runnable}
            try:
                measured = timer(calls)
            except Exception:
                # A kernel that fails at this shape is no candidate here; the preferred one
                # (the graph as it was) must run, so its failure is the caller's error.
                failed = [name for name, call in calls.items() if name != prefer and _fails(call)]
                if not failed:
                    raise
                for name in failed:
                    runnable.pop(name)
                    times.pop(name)
                measured = timer({name: calls[name] for name in runnable})
            self.measurements += 1
            for name in runnable:
                times[name].append(float(measured[name]))
        chosen = _winner(times, prefer, margin)
        self._store(op, site, names, chosen, times)
        return Choice(op, site, chosen, "measured", times)

    def _load(self) -> dict[str, Any]:
        if self._entries is None:
            self._entries = {}
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # absent, or unreadable: measured again
                data = {}
            if isinstance(data, dict) and data.get("format") == FORMAT and data.get("fingerprint") == self.fingerprint:
                self._entries = dict(data.get("entries", {}))
        return self._entries

    def _store(self, op: str, site: str, names: Sequence[str], chosen: str, times: dict[str, list[float]]) -> None:
        entries = self._load()
        entries[self.key(op, site, names)] = {"chosen": chosen, "times": times}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Entries another process wrote since this one read the file are kept.
            try:
                on_disk = json.loads(self.path.read_text(encoding="utf-8")).get("entries", {})
            except (OSError, ValueError, AttributeError):
                on_disk = {}
            merged = {**on_disk, **entries} if isinstance(on_disk, dict) else entries
            data = {"format": FORMAT, "fingerprint": self.fingerprint, "entries": merged}
            fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".kernel-timings-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(data, file, indent=1, sort_keys=True)
            os.replace(temporary, self.path)  # atomic: a reader never sees half a file
        except OSError:
            pass  # a read-only home: the choice still holds for this compile


def _fails(call: Callable[[], Any]) -> bool:
    try:
        with torch.inference_mode():
            call()
    except Exception:
        return True
    return False


def _winner(times: Mapping[str, Sequence[float]], prefer: str, margin: float) -> str:
    """The candidate faster than ``prefer`` by more than ``margin`` at every size, the fastest
    of those by total time; else ``prefer``."""
    baseline = times[prefer]
    better = [name for name, ts in times.items() if name != prefer
              and all(t * (1.0 + margin) < b for t, b in zip(ts, baseline))]
    return min(better, key=lambda name: sum(times[name])) if better else prefer


_active: ContextVar[KernelTimings | None] = ContextVar("fxopt_kernel_timings", default=None)


def current() -> KernelTimings:
    """The :class:`KernelTimings` of the compile in progress (see :func:`measuring`), else a
    default one (measuring on unless ``$FXOPT_MEASURE`` says off, the default directory)."""
    return _active.get() or KernelTimings()


@contextlib.contextmanager
def measuring(setting: KernelTimings | bool | None = None) -> Iterator[KernelTimings]:
    """Make ``setting`` the timings the compiles inside the block use: a :class:`KernelTimings`,
    or True/None (the enclosing one, else a default) or False (the same with measuring off)."""
    if isinstance(setting, KernelTimings):
        timings = setting
    else:
        timings = current()
        if setting is False and timings.measure:
            timings = timings.without_measuring()
    token = _active.set(timings)
    try:
        yield timings
    finally:
        _active.reset(token)


# The lowered module is kept unless the captured graph is faster by more than this fraction:
# closer than that, two runs of one graph on a shared machine disagree as much.
NOISE = 0.02


def never_slower(optimized: Any, captured: torch.fx.GraphModule, inputs: Sequence[Any],
                 timings: KernelTimings | None = None) -> Any:
    """``optimized`` (an :class:`~fxopt.api.OptimizedModule` on the eager backend), or, when
    it measures slower than ``captured`` (the graph as captured) beyond noise on ``inputs``
    (flat example inputs), the captured graph in its place, with a note in the report.
    The verdict is cached like a kernel choice, keyed by both graphs' code and the shapes.

    Lossless compiles only: a lossy pass that applied (int8, low rank, pruning) was asked
    for, and trades accuracy for size as well as speed, so its graph is not swapped for the
    float one; choosing among such recipes by speed is what presets do."""
    timings = timings or current()
    report = optimized.report
    if report.backend != "eager" or optimized.device is None or optimized.device.type != "cpu":
        return optimized
    if any(not record.exact and record.status == "applied" for record in report.passes):
        return optimized
    flat = [t.to(optimized.device) if isinstance(t, torch.Tensor) else t for t in inputs]
    runner = optimized._runner if optimized._runner is not None else optimized.graph_module

    run_captured = _without_grad(captured)
    # What runs is the optimized graph with the kernels chosen at its sites.
    chosen = json.dumps([[k["op"], k["site"], k["chosen"]] for k in report.kernels])
    whole = captured.code + optimized.graph_module.code + chosen
    site = f"{hashlib.sha256(whole.encode()).hexdigest()[:20]}|{_shapes(flat)}"
    with phase("measure"):
        choice = timings.choose("whole-graph", site, {"lowered": runner, "captured": run_captured}, [flat],
                                prefer="lowered", margin=NOISE, warm=True)
    report.kernels.append({**choice.as_dict(), "nodes": ["whole graph"]})
    if choice.name == "lowered":
        return optimized
    report.notes.append("nothing could be made faster: the optimized graph measured slower than the captured "
                        f"graph ({choice.describe()}), so the captured graph runs")
    # The report's totals describe what runs: the captured graph, exact by definition.
    report.final, report.final_max_abs_err, report.final_max_rel_err = report.original, 0.0, 0.0
    # The captured graph is the session's, shared by its pipelines: the module gets its own copy.
    kept = copy_graph_module(captured)
    return type(optimized)(kept, optimized.signature, report, _without_grad(kept), optimized.device)


def _without_grad(gm: torch.fx.GraphModule) -> Callable[..., Any]:
    """``gm`` as a runner: called under ``torch.no_grad()``, as the backends' runners are."""

    def run(*args: Any) -> Any:
        with torch.no_grad():
            return gm(*args)

    return run


def _shapes(values: Sequence[Any]) -> str:
    return ",".join(f"{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor)
                    else type(v).__name__ for v in values)
