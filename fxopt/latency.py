"""Side-by-side latency: candidates timed interleaved (round-robin) after a warm-up, so
machine noise hits all of them alike; each gets the median of its rounds and its spread.
``fxopt.compile(preset=...)`` chooses among its candidates with it, the measured kernel and
lowering choices of a compile (:mod:`fxopt.pipeline.timings`) too; ``fxopt_bench.timing``
builds the benchmark's ratios and spreads on it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
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
    """The :class:`Timing` of each zero-argument callable, measured interleaved.

    ``max_seconds`` caps the timed rounds (after at least ``min_repeats`` of them): a compile
    that measures its kernel choices spends a bounded time on each."""
    with torch.inference_mode():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        start = time.perf_counter()
        rounds = 0
        while rounds < max(repeats, 1) or time.perf_counter() - start < min_seconds:
            if max_seconds is not None and rounds >= max(min_repeats, 1) \
                    and time.perf_counter() - start >= max_seconds:
                break
            for name, fn in candidates.items():
                samples[name].append(time_call(fn))
            rounds += 1
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
