"""Side-by-side latency measurement: the only source of fxopt's speed claims.

Candidates are timed interleaved (round-robin) after a warm-up, so machine noise hits all
of them alike. Each gets the median of its repeats and its spread (quartiles, min, max);
a ratio of two medians comes with the range the two interquartile ranges allow
(:func:`speedup`), and is flagged when that range is wider than the effect itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxopt.latency import Timing, measure_side_by_side

__all__ = ["SPREAD_LEGEND", "Speedup", "Timing", "measure_side_by_side", "speedup"]


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
