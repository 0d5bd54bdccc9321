"""Statistical acceptance: an upper confidence bound of a paired metric drop.

A drop measured on a few examples is a sample: a candidate that loses nothing on 128 rows
may lose several points on the next thousand. A task budget therefore accepts a candidate
only when the one-sided upper confidence bound of its drop is within ``max_drop``, measured
paired (the same examples before and after):

- accuracy and top-1 agreement: every example either keeps its outcome or flips. The drop is
  ``(harmful - helpful) / n`` (right before and wrong after, and the other way), and it is at
  most the rate of harmful flips, whose exact binomial (Clopper-Pearson) upper bound is
  ``beta.ppf(confidence, harmful + 1, n - harmful)``. For top-1 agreement every flip is
  harmful and this is the exact bound of the drop; for accuracy helpful flips lower the
  point estimate but are not credited to the bound (conservative: crediting them exactly
  costs more confidence than it gains at the few flips a budget of a point or two allows).
- any other metric: a paired bootstrap (the same resampled rows scored before and after, a
  fixed seed), the ``confidence`` quantile of the resampled drops.

With zero flips the bound is ``1 - (1 - confidence) ** (1 / n)``: 128 examples bound a drop by
2.31 points at 95%, whatever the model does, so a budget of one point needs at least 299
(:func:`examples_needed`). ``confidence=None`` is the point estimate alone (the drop measured
on the data, no allowance for sampling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta

DEFAULT_CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def check_confidence(confidence: object) -> float | None:
    """``confidence`` as a float in (0, 1), or None (point estimates); a clear error otherwise."""
    from fxopt.errors import InputError

    if confidence is None:
        return None
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise InputError(f"confidence must be a number strictly between 0 and 1 (0.95: a one-sided 95% bound), "
                         f"or None for the point estimate alone; got {confidence!r}")
    return float(confidence)


def flip_rate_bound(flips: int, examples: int, confidence: float) -> float:
    """Exact (Clopper-Pearson) one-sided upper bound of a rate seen ``flips`` times in ``examples``."""
    if examples <= 0:
        return 1.0
    if not 0 <= flips <= examples:
        raise ValueError(f"flips must be between 0 and the {examples} examples, got {flips}")
    if flips == examples:
        return 1.0
    return float(beta.ppf(confidence, flips + 1, examples - flips))


def examples_needed(max_drop: float, confidence: float) -> int | None:
    """The fewest examples whose bound, with no prediction flipped, is within ``max_drop``
    (None: no number is enough, ``max_drop`` is 0). Any flip needs more."""
    if max_drop <= 0:
        return None
    if max_drop >= 1:
        return 1
    needed = math.ceil(math.log(1 - confidence) / math.log1p(-max_drop))
    # the closed form may land one off by rounding: settle it on the bound itself
    while needed > 1 and flip_rate_bound(0, needed - 1, confidence) <= max_drop:
        needed -= 1
    while flip_rate_bound(0, needed, confidence) > max_drop:
        needed += 1
    return needed


@dataclass(frozen=True)
class DropBound:
    """A paired drop measured on ``examples``: the point estimate and its upper bound."""

    observed: float  # the metric's fall on the data (negative: it rose)
    upper: float  # one-sided upper bound at ``confidence`` (``observed`` when confidence is None)
    examples: int
    confidence: float | None
    # "flips" (exact binomial on harmful flips), "agreement" (exact binomial on changed top-1
    # over labelled and unlabelled inputs), "bootstrap" or "point"
    method: str
    harmful: int | None = None  # flips: right before, wrong after
    helpful: int | None = None  # flips: wrong before, right after

    def describe(self) -> str:
        if self.confidence is None:
            return f"drop {self.observed:+.4f} on {self.examples} examples (point estimate)"
        flips = f", {self.harmful} harmful / {self.helpful} helpful flips" if self.harmful is not None else ""
        return (f"drop {self.observed:+.4f}, {self.confidence:.0%} bound {self.upper:+.4f} "
                f"({self.method}, {self.examples} examples{flips})")


class Drop(float):
    """A measured drop as a budget compares it: the float is the upper confidence bound (the
    point estimate when confidence is None); ``bound`` holds both and how they were measured."""

    bound: DropBound

    def __new__(cls, bound: DropBound) -> Drop:
        drop = super().__new__(cls, bound.upper)
        drop.bound = bound
        return drop

    def __reduce__(self) -> tuple[Any, tuple[DropBound]]:  # pickle and deepcopy (reports are saved, asdict'ed)
        return Drop, (self.bound,)

    @property
    def observed(self) -> float:
        return self.bound.observed


def observed_drop(drop: float) -> float:
    """The point estimate of a drop (a plain float is one already)."""
    return drop.observed if isinstance(drop, Drop) else float(drop)


def upper_bound(drop: float) -> float | None:
    """The upper confidence bound a drop was judged by (None: judged on the point estimate)."""
    if not isinstance(drop, Drop) or drop.bound.confidence is None:
        return None
    return drop.bound.upper


def describe_drop(drop: float) -> str:
    """A drop as a budget judged it, for a reason: the point estimate and its bound."""
    return drop.bound.describe() if isinstance(drop, Drop) else f"drop {drop:+.4f}"


def flip_bound(harmful: int, helpful: int, examples: int, confidence: float | None) -> DropBound:
    """The drop of a paired right/wrong outcome: ``(harmful - helpful) / examples`` and its bound."""
    if examples <= 0:
        raise ValueError("a drop needs at least one example")
    if harmful < 0 or helpful < 0 or harmful + helpful > examples:
        raise ValueError(f"{harmful} harmful and {helpful} helpful flips do not fit in {examples} examples")
    observed = (harmful - helpful) / examples
    if confidence is None:
        return DropBound(observed, observed, examples, None, "point", harmful, helpful)
    return DropBound(observed, flip_rate_bound(harmful, examples, confidence), examples, confidence, "flips",
                     harmful, helpful)


def bootstrap_bound(score: Callable[[np.ndarray], tuple[float, float]], examples: int, observed: float,
                    confidence: float | None, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                    weights: Sequence[float] | None = None) -> DropBound:
    """Paired bootstrap of a drop: ``score(indices) -> (before, after)`` scores the same
    resampled units (rows, or batches weighted by ``weights``) before and after; the bound
    is the ``confidence`` quantile of ``before - after`` over ``samples`` resamples."""
    if confidence is None:
        return DropBound(observed, observed, examples, None, "point")
    units = examples if weights is None else len(weights)
    generator = np.random.default_rng(seed)
    drops = np.empty(samples)
    for i in range(samples):
        before, after = score(generator.integers(0, units, units))
        drops[i] = before - after
    upper = float(np.quantile(drops, confidence, method="higher"))
    return DropBound(observed, max(upper, observed), examples, confidence, "bootstrap")


def unsupported_message(max_drop: float, examples: int, confidence: float, metric: str) -> str | None:
    """Why ``examples`` cannot support ``max_drop`` at ``confidence`` for a flip metric, or None."""
    floor = flip_rate_bound(0, examples, confidence)
    if floor <= max_drop:
        return None
    needed = examples_needed(max_drop, confidence)
    need = (f"at least {needed} examples are needed (more if any prediction flips)" if needed is not None
            else "no number of examples is enough for a max_drop of 0")
    return (f"{examples} examples cannot show that {metric} drops by at most {max_drop:g} at {confidence:.0%} "
            f"confidence: even with no prediction changed the bound is {floor:.4f}; {need}. "
            f"No lossy change will be accepted (confidence=None accepts on the point estimate alone)")
