"""Spending a lossy pass's error budget: searching for the cheapest rewrite that fits.

A lossy pass rewrites several sites (layers, blocks) one after another, measuring the
model's output error after each (``PassContext.output_error``). :class:`BudgetSplit` gives
each site a fair share of what is left, so the first site cannot spend the whole budget,
and the total never exceeds it because every measurement is of the whole rewrite so far.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def first_passing(candidates: Sequence[T], ok: Callable[[T], bool]) -> T | None:
    """The first candidate for which ``ok`` holds, by binary search.

    ``ok`` must be monotone over ``candidates`` (False ... False True ... True), e.g. "the
    error at this rank is within budget" over increasing ranks. None when none passes.
    ``ok`` is called about log2(len(candidates)) + 1 times.
    """
    lo, hi = 0, len(candidates) - 1
    if hi < 0 or not ok(candidates[hi]):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]


class BudgetSplit:
    """Shares of an error ``budget`` for ``sites`` rewritten one after another.

    Site ``i`` may raise the measured error to ``used + (budget - used) / sites_left``: an
    equal share of what remains, so a site that takes less (or is skipped) leaves more for
    the ones after it, and the last site may use everything left.
    """

    def __init__(self, budget: float, sites: int) -> None:
        self.budget = float(budget)
        self.left = max(int(sites), 1)
        self.used = 0.0

    def target(self) -> float:
        """The error the next site's rewrite may bring the whole model to."""
        return self.used + (self.budget - self.used) / max(self.left, 1)

    def spend(self, error: float | None) -> None:
        """Record the next site as done, with the model's error after it (None: skipped)."""
        if error is not None:
            self.used = max(self.used, error)
        self.left = max(self.left - 1, 1)
