"""Side-by-side latency measurement: the only source of fxopt's speed claims.

Candidates are timed interleaved (round-robin) after a warm-up, so machine noise hits all
of them alike, and each gets the median of its repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch


def measure_side_by_side(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_seconds: float = 0.0,
) -> dict[str, float]:
    """Median milliseconds per call of each zero-argument callable, measured interleaved."""
    with torch.inference_mode():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        start = time.perf_counter()
        rounds = 0
        while rounds < repeats or time.perf_counter() - start < min_seconds:
            for name, fn in candidates.items():
                _sync()
                t0 = time.perf_counter()
                fn()
                _sync()
                samples[name].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
    return {name: statistics.median(values) for name, values in samples.items()}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
