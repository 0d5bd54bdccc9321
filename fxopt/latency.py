"""Side-by-side latency: candidates timed interleaved (round-robin) after a warm-up, so
machine noise hits all of them alike; each gets the median of its rounds and its spread.

:func:`interleaved` is fxopt's one timing loop: ``fxopt.compile(preset=...)`` races its
candidates on it (:func:`fxopt.presets.race`), ``fxopt demo`` and ``fxopt bench``
(``fxopt_bench.timing``) measure with :func:`measure_side_by_side`, which is that loop run to
the end, and :func:`speedup` turns two timings into a ratio with its spread.
The measured kernel and lowering choices of a compile (:mod:`fxopt.pipeline.timings`) time
their candidates on it too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call of one candidate over the timed rounds."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    samples: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Timing:
        ordered = sorted(values)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), q1, q3, ordered[0], ordered[-1], len(ordered))

    def __str__(self) -> str:
        return f"{self.median:.3f} ms (IQR {self.q1:.3f}-{self.q3:.3f})"


def measure_side_by_side(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
    min_repeats: int = 3,
) -> dict[str, Timing]:
    """The :class:`Timing` of each zero-argument callable, measured interleaved (``max_seconds``,
    ``min_repeats``: see :func:`interleaved`)."""
    return interleaved(candidates, warmup=warmup, repeats=repeats, min_seconds=min_seconds,
                       max_seconds=max_seconds, min_repeats=min_repeats)


class Deferred:
    """A candidate that costs something to make (a packed weight, a lowered module), for
    :meth:`fxopt.pipeline.timings.KernelTimings.choose`: ``build()`` makes the callable, only
    where the choice is measured (a cached verdict builds nothing); ``value`` is what was
    built, if anything."""

    def __init__(self, build: Callable[[], Callable[..., Any]]) -> None:
        self.build = build
        self.value: Callable[..., Any] | None = None

    def made(self) -> Callable[..., Any]:
        if self.value is None:
            self.value = self.build()
        return self.value

    def __call__(self, *args: Any) -> Any:
        return self.made()(*args)


# ``keep(round, samples, elapsed)``: after each round, the candidates to go on timing (from
# those still timed, whose samples it gets); none left ends the timing.
KeepPolicy = Callable[[int, Mapping[str, list[float]], float], Iterable[str]]


def interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_seconds: float = 0.0,
    keep: KeepPolicy | None = None,
    max_seconds: float | None = None,
    min_repeats: int = 3,
) -> dict[str, Timing]:
    """The timing loop: ``warmup`` calls of each candidate, then rounds that call each one
    once, timed (each round starting with the next candidate), until ``repeats`` rounds ran
    and ``min_seconds`` passed (seconds counted from the first timed round), or ``keep`` stops
    timing every candidate. ``max_seconds`` caps the timed rounds (after at least
    ``min_repeats`` of them): a compile that measures its kernel choices spends a bounded time
    on each. Each candidate's :class:`Timing` is over the rounds it ran."""
    with torch.inference_mode():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        running = dict(candidates)
        start = time.perf_counter()
        rounds = 0
        while running and (rounds < max(repeats, 1) or time.perf_counter() - start < min_seconds):
            if max_seconds is not None and rounds >= max(min_repeats, 1) \
                    and time.perf_counter() - start >= max_seconds:
                break
            # Each round starts one candidate further along: the call right after another
            # candidate's finds the caches holding that one's weights, and a fixed order
            # would charge that to the same candidate every round (up to 10% on an int8 MLP).
            order = list(running.items())
            shift = rounds % len(order)
            for name, fn in order[shift:] + order[:shift]:
                samples[name].append(time_call(fn))
            rounds += 1
            if keep is not None:
                kept = set(keep(rounds, {name: samples[name] for name in running}, time.perf_counter() - start))
                running = {name: fn for name, fn in running.items() if name in kept}
    return {name: Timing.of(values) for name, values in samples.items()}


def time_call(fn: Callable[[], Any]) -> float:
    """Milliseconds one call of ``fn`` takes, the device's queued work included."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return (time.perf_counter() - start) * 1e3


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Speedup:
    """``baseline / candidate`` of the medians, with the range of the same ratio taken
    between their quartiles: ``low`` = baseline q1 / candidate q3, ``high`` = baseline q3 /
    candidate q1."""

    ratio: float
    low: float
    high: float

    @property
    def within_noise(self) -> bool:
        """The spread is wider than the effect: the range reaches 1.00x, so the rounds
        cannot tell which of the two is faster."""
        return self.low <= 1.0 <= self.high

    def __str__(self) -> str:
        flag = " ~" if self.within_noise else ""
        return f"{self.ratio:.2f}x [{self.low:.2f}-{self.high:.2f}]{flag}"


SPREAD_LEGEND = ("speedup [low-high]: the median ratio, and the same ratio taken between the two "
                 "systems' quartiles; ~: the spread is wider than the effect (the range reaches 1.00x)")


def speedup(baseline: Timing, candidate: Timing) -> Speedup:
    """How many times faster ``candidate`` is than ``baseline``, with its spread."""
    return Speedup(baseline.median / candidate.median, baseline.q1 / candidate.q3,
                   baseline.q3 / candidate.q1)
