"""The vocabulary of a budgeted search: sites and their levels, a pick, an outcome, and which
batches a choice is fitted on and which verify it."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fxopt.pass_api import PassContext

Level = Hashable
T = TypeVar("T")
Choices = Mapping[str, Level]

STRATEGIES = ("equal-share", "sensitivity", "blocks")
# log events about the whole combination, not one site: every site's details show them
_GLOBAL_EVENTS = frozenset({"all-at-once", "ranked", "prefix", "estimated", "verify", "retry", "blocks"})


@dataclass(frozen=True, eq=False)
class Site:
    """A place in the graph a lossy pass may change.

    ``name`` identifies it in the report and in ``choices``; ``levels`` are the rewrites it
    allows, least aggressive first (ranks descending, widths descending, a single ``True``
    for on/off); ``savings`` (same length, optional) is what each level saves (parameters,
    FLOPs), used by the sensitivity strategy to rank sites (``saving_of`` computes it when the
    levels are found as the search goes); ``payload`` is the pass's own.

    ``estimate(level)`` (optional) is a cheap guess of the output error ``level`` causes on
    its own (a layer's local error, say), in the units of the budget. The sensitivity strategy
    ranks by it instead of measuring every site alone when all the sites have one; it is
    called only when every site at once is over budget, and only for the most aggressive
    level. It orders trials and never stands in for a measured error.
    """

    name: str
    levels: tuple[Level, ...]
    savings: tuple[float, ...] = ()
    payload: Any = None
    saving_of: Callable[[Level], float] | None = None  # for levels only known as the search goes
    estimate: Callable[[Level], float] | None = None

    def saving(self, level: Level) -> float:
        """What ``level`` saves: from ``saving_of``, ``savings``, or its position in ``levels``."""
        if self.saving_of is not None:
            return float(self.saving_of(level))
        index = self.levels.index(level)
        return float(self.savings[index]) if self.savings else float(index + 1)


@dataclass(frozen=True)
class Pick:
    """The level chosen for one site (None: left alone) and the error of the combination
    measured with it (on ``split``), or, for a refusal, the level tried and its error."""

    level: Level | None
    error: float
    tried: Level | None = None
    target: float = 0.0
    # The batches ``error`` is over: "fit", or "all" when the choice fitted on half the batches
    # failed on the held-out half and the search chose again on every batch (target: fxopt.lossy.retry.RETRY.after_heldout).
    split: str = "fit"
    reason: str | None = None  # a chooser's own explanation of a refusal
    others: int = 0  # how many other sites were already changed when this was measured
    # For a refusal with others: the measured error of those others without this site (None
    # when that combination was not measured, e.g. a longer ranked prefix found over budget).
    others_error: float | None = None


@dataclass
class Outcome:
    """What the search chose: the level per site, the fitted and held-out errors of the
    whole combination, the sites it left alone (with the pick that refused them) and a log
    of every step."""

    choices: dict[str, Level]
    picks: dict[str, Pick]
    refused: dict[str, Pick]
    fitted_error: float
    heldout_error: float | None
    heldout_batches: int
    log: list[dict[str, Any]]
    trials: int
    retried: bool = False  # the fitted choice failed on held-out data; this one was made on every batch
    drop: float | None = None  # with a task budget: the metric drop of the choice (worst split)

    def summary(self) -> dict[str, Any]:
        """The numbers a pass puts in each of its details: fitted and held-out error."""
        summary = {"fitted_error": self.fitted_error, "heldout_error": self.heldout_error,
                   "heldout_batches": self.heldout_batches, "heldout_retry": self.retried}
        if self.drop is not None:
            # the point estimate, and the upper confidence bound the budget judged it by
            bound = getattr(self.drop, "bound", None)
            summary["metric_drop"] = float(self.drop) if bound is None else bound.observed
            if bound is not None and bound.confidence is not None:
                summary["metric_drop_bound"] = bound.upper
        return summary

    def details_for(self, site: str) -> dict[str, Any]:
        """:meth:`summary`, the number of trials, and the steps of the log that concern
        ``site`` or the whole combination (trials themselves are counted, not listed)."""
        steps = [s for s in self.log if s.get("site") == site or s["event"] in _GLOBAL_EVENTS]
        return {**self.summary(), "trials": self.trials, "log": steps}




def check_search_options(pass_: Any) -> None:
    """Refuse a lossy pass's ``budget`` below zero or an unknown ``strategy``, naming the pass
    (:class:`fxopt.errors.OptionValueError`). For ``__post_init__`` of every lossy pass."""
    from fxopt.errors import OptionValueError

    if pass_.budget < 0:
        raise OptionValueError(f"{pass_.name}: budget must be >= 0, got {pass_.budget}")
    if pass_.strategy not in STRATEGIES:
        raise OptionValueError(f"{pass_.name}: strategy must be one of {', '.join(STRATEGIES)}, "
                               f"got {pass_.strategy!r}")


def estimated_trial_limit(sites: int) -> int:
    """The most trials the sensitivity strategy measures, after every site at once, when it
    ranks ``sites`` sites by their estimates: two binary searches over them, and two more."""
    return 2 * math.ceil(math.log2(sites + 1)) + 2


def first_passing(candidates: Sequence[T], ok: Callable[[T], bool]) -> T | None:
    """The first candidate for which ``ok`` holds, by binary search.

    ``ok`` must be monotone over ``candidates`` (False ... False True ... True), e.g. "the
    error at this rank is within budget" over increasing ranks. None when none passes.
    ``ok`` is called about log2(len(candidates)) + 1 times, the last candidate first.
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


def split_batches(count: int, holdout: bool = True, fresh: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the batches a choice is fitted on (even positions: the example inputs,
    the 2nd calibration batch, ...) and of those it is verified on (odd positions); with one
    batch, or ``holdout=False``, every batch fits and none is held out. The last ``fresh``
    batches (``PassContext.fresh_batches``) are in neither: the manager verifies on them."""
    indices = list(range(count - fresh))
    if holdout and len(indices) > 1:
        return indices[0::2], indices[1::2]
    return indices, []


def fit_indices(ctx: PassContext, holdout: bool = True) -> list[int]:
    """The positions in ``ctx.batches`` of the batches a pass may fit on (see :func:`fit_batches`)."""
    return split_batches(len(ctx.batches), holdout, ctx.fresh_batches)[0]


def fit_batches(ctx: PassContext, holdout: bool = True) -> list[list[Any]]:
    """The batches a pass may fit statistics on (ranking, means) without seeing the
    held-out ones: fitting on those would make the held-out check optimistic."""
    return [ctx.batches[i] for i in fit_indices(ctx, holdout)]
