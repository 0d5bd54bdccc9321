"""Side-by-side latency measurement: the only source of fxopt's speed claims.

Candidates are timed interleaved (round-robin) after a warm-up, so machine noise hits all
of them alike. Each gets the median of its repeats and its spread (quartiles, min, max);
a ratio of two medians comes with the range the two interquartile ranges allow
(:func:`speedup`), and is flagged when that range is wider than the effect itself.
The loop and the ratio are the core's (:mod:`fxopt.latency`), the one timing loop that
presets and ``fxopt demo`` use too; the benchmark names them here.
"""

from __future__ import annotations

from fxopt.latency import SPREAD_LEGEND, Speedup, Timing, measure_side_by_side, speedup

__all__ = ["SPREAD_LEGEND", "Speedup", "Timing", "measure_side_by_side", "speedup"]
