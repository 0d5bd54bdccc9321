"""The budgeted search every lossy pass runs: which sites to change, and how far.

A lossy pass describes its options as data and leaves the trial-and-measure loop here::

    sites = [Site("fc1", levels=(64, 56, 48)), Site("fc2", levels=(32, 24))]   # least -> most aggressive
    def apply(gm, choices):            # choices: {site name: level}; rewrite a trial copy
        for name, rank in choices.items(): factor(gm, name, rank)
        return gm
    outcome = BudgetedSearch(gm, ctx, sites, apply, budget=0.01).run()
    apply(gm, outcome.choices)         # commit on the live graph
    for name, level in outcome.choices.items():
        result.details.append({"layer": name, "rank": level, **outcome.details_for(name)})
    for name, pick in outcome.refused.items():
        result.skip(name, f"rank {pick.tried}: error {pick.error:.3g} > {pick.target:.3g}")

A pass whose sites are nodes switched on or off (quantize this attention or not) hands all of
that to :func:`search_switches`.

One trial mechanism: every candidate is ``apply`` on a structural copy of the graph
(``fxopt.ir.copy_graph_module``), never the live graph, and its error against
``ctx.reference`` is memoised per split, so no combination is ever run twice.

Held-out verification: the batches (example inputs first, then calibration batches) are
split: even positions fit (the choice is made on them), odd positions are held out. The
chosen combination must also stay within the budget on the held-out batches. When it does
not, the fit batches did not represent the data: the strategy runs again measuring on
every batch, with half the budget (:mod:`fxopt.lossy.retry`) as a margin for what is still unseen, and
the outcome says so (``retried``). Both errors are reported. With one batch (no
calibration) nothing is held out, and ``heldout_error`` is None.

Task metric: when ``ctx.task`` holds a :class:`~fxopt.lossy.task.TaskBudget` (labelled
batches, a metric, ``max_drop``), a combination's error is the larger of its output error
and its metric drop expressed in budget units (``max_drop`` maps to ``budget``), so a choice
must keep both; the task's batches split into fit and held-out halves the same way, and
every trial's drop is in the log. ``output_error=False`` bounds the metric alone (then
``budget`` is ``max_drop``, in metric units).

Strategies (``strategy=``):
  ``equal-share``  sites in the given order; each may raise the error to an equal share of
                   what the earlier ones left (so the first cannot take everything), at the
                   most aggressive level that fits, found by binary search over its levels.
  ``sensitivity``  first every site at its most aggressive level at once; when that is over
                   budget, each site alone (its most aggressive level within budget), then the
                   sites in order of saving per unit of error, each at the most aggressive
                   level the combination so far still allows (backing off level by level).
                   When every site carries an ``estimate`` (a cheap guess of the error its
                   most aggressive level causes alone), the sites are ranked by saving per
                   unit of *estimated* error instead of being measured alone, and the largest
                   prefix of that ranking within budget is found by a search over its length
                   that starts where the estimates predict (one or two measured trials when
                   they are right, about 2 log2(sites) when not); the site after the prefix
                   is refused and the rest get another round on top, within
                   ``estimated_trial_limit(sites)`` trials. Every combination accepted is
                   measured; an estimate only orders the trials.
  ``blocks``       the ranked path block by block (:mod:`fxopt.lossy.blocks`), which
                   ``sensitivity`` takes by itself where the values do not fit the memory bound.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch.fx as fx

from fxopt.ir import copy_graph_module
from fxopt.lossy.blocks import block_by_block, spans_for
from fxopt.lossy.observer import run_watching
from fxopt.lossy.retry import RETRY
from fxopt.lossy.sites import (  # noqa: F401 - part of this module's interface
    STRATEGIES,
    Choices,
    Level,
    Outcome,
    Pick,
    Site,
    T,
    check_search_options,
    estimated_trial_limit,
    first_passing,
    fit_batches,
    fit_indices,
    split_batches,
)
from fxopt.pass_api import PassContext, PassResult
from fxopt.phases import progress
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import OVER_BUDGET
from fxopt.verify import ReusingRunner, compare_outputs, run_graph

LevelChooser = Callable[["BudgetedSearch", Site, float, Choices], Pick]
Apply = Callable[[fx.GraphModule, Choices], fx.GraphModule]

log = logging.getLogger("fxopt.lossy")

FIT, HELD_OUT, ALL = "fit", "held-out", "all"


@dataclass
class BudgetedSearch:
    """Trial ``sites`` at their ``levels`` through ``apply`` and choose within ``budget``.

    ``choose_level(search, site, target, base)`` picks one site's level given the choices
    already made (default: :meth:`most_aggressive`); a pass overrides it when its levels
    are only known as the search goes (low-rank grows its SVD sketch). ``holdout=False``
    fits on every batch. ``apply_whole`` (default: ``apply``) rewrites the trials of the
    whole graph (not of one block) where the pass commits a choice otherwise than a trial
    makes it (the same values, other constants): the search's last whole trial is then the
    graph the pass commits, whose verification takes that trial's outputs (a large model's
    lean run, :class:`~fxopt.verify.ReusingRunner`).
    """

    gm: fx.GraphModule
    ctx: PassContext
    sites: Sequence[Site]
    apply: Apply
    budget: float
    strategy: str = "equal-share"
    choose_level: LevelChooser | None = None
    holdout: bool = True
    output_error: bool = True  # False: only ctx.task's metric drop counts (budget in metric units)
    apply_whole: Apply | None = None
    trials: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    _errors: dict[tuple[str, frozenset[tuple[str, Level]]], float] = field(default_factory=dict)
    drops: dict[tuple[str, frozenset[tuple[str, Level]]], float] = field(default_factory=dict)
    _split: str = FIT
    _estimates: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        self.fit_indices, self.heldout_indices = split_batches(len(self.ctx.batches), self.holdout,
                                                               self.ctx.fresh_batches)
        if not self.output_error and self.ctx.task is None:
            raise ValueError("output_error=False needs a task budget (ctx.task) to measure instead")
        # The manager fills ctx.reference before any pass runs; a search started on its own
        # (a tuner, a test) measures against the graph it starts from.
        self.reference = self.ctx.reference or [run_graph(self.gm, batch) for batch in self.ctx.batches]
        # Trials share most of their nodes with the starting graph and with each other: the
        # runner computes only what a trial changed (same values, see ReusingRunner).
        self._runner = self.ctx.values if isinstance(self.ctx.values, ReusingRunner) else \
            ReusingRunner(max_bytes=self.ctx.evidence.values_bound(self.gm))
        self._starting_pinned: set[int] = set()  # batches whose pinned values are self.gm's
        self._trials_on: dict[int, int] = {}  # trials run on each batch

    @property
    def split(self) -> str:
        """The batches the strategy is choosing on now: "fit", or "all" after a held-out failure."""
        return self._split

    # ------------------------------------------------------------------ the one trial mechanism

    def trial(self, choices: Choices, runnable: bool = True, of: fx.GraphModule | None = None) -> fx.GraphModule:
        """``apply`` on a structural copy of the graph (or of ``of``, a part of it: one block's
        nodes, :func:`fxopt.ir.subgraph_module`): the live graph is never touched.
        ``runnable=False`` skips regenerating its code (the search's runner interprets it); a
        runnable one writes its code when first called."""
        apply = self.apply_whole if of is None and self.apply_whole is not None else self.apply
        candidate = apply(copy_graph_module(self.gm if of is None else of, lazy=True), dict(choices))
        if runnable:
            candidate.recompile()
        return candidate

    def error(self, choices: Choices, split: str | None = None) -> float:
        """The largest relative output error of ``choices`` against ``ctx.reference`` over the
        batches of ``split`` ("fit", "held-out", "all"; default: the batches the strategy is
        choosing on), memoised: each combination runs once per split."""
        split = split or self._split
        if split == ALL:
            return max(self.error(choices, FIT), self.error(choices, HELD_OUT))
        key = (split, frozenset(choices.items()))
        if key not in self._errors:
            if not choices:
                self._errors[key] = 0.0
            else:
                indices = self.fit_indices if split == FIT else self.heldout_indices
                self.trials += 1
                # a task metric runs the trial itself; the output error goes through the runner
                candidate = self.trial(choices, runnable=self.ctx.task is not None)
                error = self._output_error(candidate, indices) if self.output_error else 0.0
                task = self.ctx.task
                if task is not None and (task.indices(split) if self.holdout else split == FIT):
                    drop = task.drop(candidate, split if self.holdout else ALL)
                    self.drops[key] = drop
                    error = max(error, task.in_budget_units(drop, self.budget))
                self._errors[key] = error
                self.step("trial", split=split, choices=dict(choices), error=error,
                          **({"drop": self.drops[key]} if key in self.drops else {}))
        return self._errors[key]

    def measured(self, choices: Choices, split: str | None = None) -> float | None:
        """The error of ``choices`` if it was measured already on ``split`` (runs nothing)."""
        split = split or self._split
        if not choices:
            return 0.0
        if split == ALL:
            errors = [self.measured(choices, FIT), self.measured(choices, HELD_OUT)]
            return None if None in errors else max(errors)  # type: ignore[type-var]
        return self._errors.get((split, frozenset(choices.items())))

    def drop(self, choices: Choices, split: str | None = None) -> float | None:
        """The task metric's drop measured for ``choices`` (None without a task or a trial)."""
        split = split or self._split
        if split == ALL:
            drops = [d for d in (self.drop(choices, FIT), self.drop(choices, HELD_OUT)) if d is not None]
            return max(drops) if drops else None
        return self.drops.get((split, frozenset(choices.items())), 0.0 if not choices else None)

    def _output_error(self, gm: fx.GraphModule, indices: Sequence[int]) -> float:
        """Largest relative output error of ``gm`` against the reference on the given batches."""
        worst = 0.0
        for index in indices:
            if self._trials_on.get(index, 0):
                # From the second trial on a batch, the starting graph's values there pay for
                # themselves (a held-out batch's one verifying trial is cheaper without them).
                self._pin(index)
            self._trials_on[index] = self._trials_on.get(index, 0) + 1
            comparison = compare_outputs(self.reference[index], self._runner.run(gm, self.ctx.batches[index], index))
            if comparison.mismatch:
                return math.inf
            worst = max(worst, comparison.max_rel)
        return worst

    def _pin(self, index: int) -> dict[str, Any] | None:
        """The starting graph's values on batch ``index``, run once and kept for the trials to
        reuse (or those the runner was handed pinned, once confirmed to be this graph's); None
        when they do not fit the runner's memory bound (that run kept none, and is not repeated;
        where the graph's recorded shapes already say so, it is not made)."""
        if index not in self._starting_pinned:
            # A run made only to keep the values is not made where they cannot fit (a large model).
            if not self._runner.pinned_for(self.gm, index) and self._runner.would_keep(self.gm, index):
                self._runner.run(self.gm, self.ctx.batches[index], index, pin=True)
            self._starting_pinned.add(index)
        return self._runner.pinned_values(index) if self._runner.pinned(index) else None

    def starting_values(self, names: Iterable[str], reduce: Callable[[Any], Any] = lambda value: value
                        ) -> dict[str, list[Any]]:
        """The value of each named node of the starting graph on each fit batch (``reduce(value)``
        if given: what an estimate reads of it, so that a large model's run keeps no more),
        from the run of the starting graph that the trials reuse (made once per batch, and
        kept): a pass's estimates cost no run of the graph of their own."""
        values: dict[str, list[Any]] = {name: [] for name in names}
        for index in self.fit_indices:
            pinned = self._pin(index)
            if pinned is None:  # past the memory bound: a run that keeps only these, reduced as it goes
                reduced: dict[str, Any] = {}
                watched = [node for node in self.gm.graph.nodes if node.name in values]
                run_watching(self.gm, watched, [self.ctx.batches[index]],
                             lambda node, value, seen=reduced: seen.__setitem__(node.name, reduce(value)))
            else:
                reduced = {name: reduce(pinned[name]) for name in values}
            for name, seen in values.items():
                seen.append(reduced[name])
        return values

    def step(self, event: str, **fields: Any) -> None:
        """Record one step of the search (also as a debug message of the ``fxopt.lossy`` logger)."""
        entry = {"event": event, **fields}
        self.log.append(entry)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(" ".join(f"{k}={v}" for k, v in entry.items()))

    # ------------------------------------------------------------------ one site

    def most_aggressive(self, site: Site, levels: Sequence[Level], target: float, base: Choices) -> Pick:
        """The most aggressive of ``levels`` (least aggressive first) whose error, on top of
        ``base``, is within ``target``: a binary search that assumes error grows with
        aggressiveness, so it measures about log2(len(levels)) + 1 combinations; the least
        aggressive level is measured first, and a refusal names it."""
        ordered = list(levels)
        if not ordered:
            return Pick(None, math.inf)
        chosen = first_passing(ordered[::-1], lambda level: self.error({**base, site.name: level}) <= target)
        if chosen is None:
            return Pick(None, self.error({**base, site.name: ordered[0]}), ordered[0], target, others=len(base))
        return Pick(chosen, self.error({**base, site.name: chosen}), target=target, others=len(base))

    def pick(self, site: Site, target: float, base: Choices) -> Pick:
        """One site's level on top of ``base`` within ``target``, by the pass's ``choose_level``
        or :meth:`most_aggressive` over all its levels; logged."""
        chooser = self.choose_level or (lambda search, s, t, b: search.most_aggressive(s, s.levels, t, b))
        chosen = chooser(self, site, target, base)
        self.step("pick", site=site.name, level=chosen.level, error=chosen.error, target=target,
                  tried=chosen.tried)
        return chosen

    # ------------------------------------------------------------------ strategies

    def equal_share(self, budget: float) -> tuple[dict[str, Level], dict[str, Pick], dict[str, Pick]]:
        """Sites in order, each within ``used + (budget - used) / sites_left`` on top of the
        ones chosen before it. Returns the choices, the picks made and the refusals."""
        choices: dict[str, Level] = {}
        picks: dict[str, Pick] = {}
        refused: dict[str, Pick] = {}
        used, left = 0.0, max(len(self.sites), 1)
        for count, site in enumerate(self.sites, 1):
            target = used + (budget - used) / max(left, 1)
            chosen = self.pick(site, target, choices)
            progress(count, len(self.sites), "sites")
            if chosen.level is None:
                refused[site.name] = chosen
            else:
                choices[site.name] = chosen.level
                picks[site.name] = chosen
                used = max(used, chosen.error)
            left = max(left - 1, 1)
        return choices, picks, refused

    def sensitivity(self, budget: float) -> tuple[dict[str, Level], dict[str, Pick], dict[str, Pick]]:
        """Everything at once if it fits; else each site alone within ``budget``, then the sites
        by saving per unit of error, each backed off until the combination fits."""
        everything = {s.name: s.levels[-1] for s in self.sites if s.levels}
        if everything and self.choose_level is None and self.error(everything) <= budget:
            picks = {s.name: Pick(s.levels[-1], self.error(everything), target=budget) for s in self.sites}
            self.step("all-at-once", error=self.error(everything), target=budget)
            return everything, picks, {}
        if self._estimated(everything):
            spans = spans_for(self)
            chosen = block_by_block(self, budget, spans) if spans else None
            return chosen or self.estimated_sensitivity(budget)
        alone = {}
        for count, site in enumerate(self.sites, 1):
            alone[site.name] = self.pick(site, budget, {})
            progress(count, len(self.sites), "sites measured alone")
        refused = {name: p for name, p in alone.items() if p.level is None}

        def efficiency(site: Site) -> float:
            chosen = alone[site.name]
            return site.saving(chosen.level) / max(chosen.error, 1e-12)

        ranked = sorted((s for s in self.sites if alone[s.name].level is not None), key=efficiency, reverse=True)
        self.step("ranked", order=[s.name for s in ranked])
        choices: dict[str, Level] = {}
        picks: dict[str, Pick] = {}
        for count, site in enumerate(ranked, 1):
            best = alone[site.name].level
            if self.choose_level is not None:
                chosen = self.choose_level(self, site, budget, choices)
            else:  # back off from the level that fitted alone, one binary search
                chosen = self.most_aggressive(site, site.levels[: site.levels.index(best) + 1], budget, choices)
            self.step("combine", site=site.name, level=chosen.level, error=chosen.error, target=budget)
            if chosen.level is None:
                refused[site.name] = replace(chosen, target=budget, others=len(choices),
                                             others_error=self.measured(choices) if choices else None)
            else:
                choices[site.name] = chosen.level
                picks[site.name] = chosen
            progress(count, len(ranked), "sites combined")
        return choices, picks, refused

    def _estimated(self, everything: Choices) -> bool:
        """Whether the sensitivity strategy may rank by the sites' estimates: every site has
        one and levels, every site at once was measured (and is over budget), and no pass
        chooser finds levels as the search goes."""
        return (bool(self.sites) and self.choose_level is None and len(everything) == len(self.sites)
                and all(s.estimate is not None for s in self.sites))

    def values_fit(self) -> bool:
        """Whether a run of the starting graph could keep its values (the trials reuse them)."""
        return self._runner.would_keep(self.gm, self.fit_indices[0])

    def estimate(self, site: Site) -> float:
        """``site``'s estimated error at its most aggressive level (computed once per search)."""
        if site.name not in self._estimates:
            assert site.estimate is not None
            value = float(site.estimate(site.levels[-1]))
            self._estimates[site.name] = value if value == value and value >= 0.0 else math.inf  # NaN: last
        return self._estimates[site.name]

    def estimated_sensitivity(self, budget: float) -> tuple[dict[str, Level], dict[str, Pick], dict[str, Pick]]:
        """The sites ranked by saving per unit of estimated error, each at its most aggressive
        level, taken in rounds: the longest prefix of the sites still open that fits on top
        of those taken (every site still open at once is measured over budget first), then
        the site right after it is refused (the prefix with it was measured over budget) and
        the next round starts after it. At most :func:`estimated_trial_limit` trials; a site
        still open then is refused with the smallest over-budget combination measured that
        includes it (every site at once, at worst)."""
        def efficiency(site: Site) -> float:
            return site.saving(site.levels[-1]) / max(self.estimate(site), 1e-12)

        ranked = sorted(self.sites, key=efficiency, reverse=True)
        self.step("ranked", order=[s.name for s in ranked], by="estimate",
                  estimates=[self.estimate(s) for s in ranked])
        limit = self.trials + estimated_trial_limit(len(ranked))
        choices: dict[str, Level] = {}
        picks: dict[str, Pick] = {}
        refused: dict[str, Pick] = {}
        over: list[dict[str, Level]] = []  # combinations measured over budget, for the refusals
        rest = list(ranked)
        while rest:
            progress(len(ranked) - len(rest), len(ranked), "sites")
            every = _most_aggressive(choices, rest)
            if self.measured(every) is None and self.trials >= limit:
                break
            every_error = self.error(every)
            fits_whole = every_error <= budget
            self.step("prefix", length=len(rest), taken=len(choices), error=every_error, target=budget,
                      **({"chosen": True} if fits_whole else {}))
            if fits_whole:
                picks.update({s.name: Pick(s.levels[-1], every_error, target=budget, others=len(every) - 1)
                              for s in rest})
                choices, rest = every, []
                break
            over.append(every)
            fits, fails = self._longest_prefix(choices, rest, budget, limit, over)
            base = _most_aggressive(choices, rest[:fits])
            if fits:
                base_error = self.error(base)
                picks.update({s.name: Pick(s.levels[-1], base_error, target=budget, others=len(base) - 1)
                              for s in rest[:fits]})
                self.step("prefix", length=fits, taken=len(choices), error=base_error, target=budget, chosen=True)
            choices = base
            if fails - fits > 1:  # out of trials inside the round
                rest = rest[fits:]
                break
            culprit = rest[fits]
            refused[culprit.name] = Pick(None, self.error({**choices, culprit.name: culprit.levels[-1]}),
                                         culprit.levels[-1], budget, others=len(choices),
                                         others_error=self.error(choices))
            rest = rest[fits + 1:]
        for site in rest:
            smallest = min((c for c in over if site.name in c), key=len)
            others = {name: level for name, level in smallest.items() if name != site.name}
            refused[site.name] = Pick(None, self.error(smallest), site.levels[-1], budget, others=len(others),
                                      others_error=self.measured(others))
        progress(len(ranked), len(ranked), "sites")
        self.step("estimated", chosen=len(choices), refused=len(refused), trials_left=max(limit - self.trials, 0))
        return choices, picks, refused

    def _longest_prefix(self, base: Choices, rest: Sequence[Site], budget: float, limit: int,
                        over: list[dict[str, Level]]) -> tuple[int, int]:
        """The longest prefix of ``rest`` within ``budget`` on top of ``base``: (the longest
        length measured within budget, the shortest measured over it). The empty prefix is
        within budget and all of ``rest`` is known over it. Starts at the predicted length and steps
        1, 2, 4, ... away from it until the boundary is bracketed, then halves: 1 or 2 trials
        when the prediction is right, about 2 log2(len(rest)) at worst; stops at ``limit``."""
        fits, fails = 0, len(rest)

        def measure(length: int) -> bool:
            nonlocal fits, fails
            combination = _most_aggressive(base, rest[:length])
            error = self.error(combination)
            self.step("prefix", length=length, taken=len(base), error=error, target=budget)
            if error <= budget:
                fits = max(fits, length)
            else:
                fails = min(fails, length)
                over.append(combination)
            return error <= budget

        def affordable(length: int) -> bool:
            combination = _most_aggressive(base, rest[:length])
            return self.trials < limit or self.measured(combination) is not None

        guess = self._predicted_length(base, rest, budget)
        if 0 < guess < len(rest) and affordable(guess):
            upward = measure(guess)
            stride = 1
            while fails - fits > 1:
                probe = guess + stride if upward else guess - stride
                if not fits < probe < fails or not affordable(probe):
                    break
                measure(probe)
                stride *= 2
        while fails - fits > 1 and affordable((fits + fails) // 2):
            measure((fits + fails) // 2)
        return fits, fails

    def _predicted_length(self, base: Choices, rest: Sequence[Site], budget: float) -> int:
        """The longest prefix of ``rest`` predicted to fit on top of ``base``: a prefix's error
        taken as ``base``'s plus the rise of all of ``rest`` scaled by the prefix's share of
        their summed estimates (local errors add up along a path; the two measured points
        calibrate their units). Only where the search starts."""
        low = self.error(base)
        high = self.error(_most_aggressive(base, rest))
        total = sum(self.estimate(s) for s in rest)
        if not math.isfinite(high) or not math.isfinite(total) or total <= 0:
            return len(rest) // 2
        length, running = 0, 0.0
        for site in rest:
            running += self.estimate(site)
            if low + (high - low) * running / total > budget:
                break
            length += 1
        return length

    # ------------------------------------------------------------------ the whole search

    def run(self) -> Outcome:
        """Choose on the fit batches and verify on the held-out ones; when the held-out error is
        over budget, choose again on every batch aiming at :data:`fxopt.lossy.retry.RETRY`'s target."""
        strategy = self.equal_share if self.strategy == "equal-share" else self.sensitivity
        choices, picks, refused = strategy(self.budget)
        fitted = self.error(choices)
        task_heldout = self.ctx.task is not None and self.holdout and bool(self.ctx.task.indices(HELD_OUT))
        if not self.heldout_indices and not task_heldout:
            self.step("verify", fitted=fitted, heldout=None, note="one batch: nothing held out")
            return self._outcome(choices, picks, refused, fitted, None, False)
        heldout = self.error(choices, HELD_OUT)
        self.step("verify", fitted=fitted, heldout=heldout, budget=self.budget)
        if heldout <= self.budget:
            return self._outcome(choices, picks, refused, fitted, heldout, False)
        # The fit batches under-represent the data: the held-out ones join the choice, and a
        # margin stands in for the unseen data that is now missing.
        target = RETRY.after_heldout(self.budget)
        self.step("retry", heldout=heldout, measured_on="every batch", target=target)
        self._split = ALL
        try:
            choices, picks, refused = strategy(target)
        finally:
            self._split = FIT
        return self._outcome(choices, picks, refused, self.error(choices), self.error(choices, HELD_OUT), True)

    def _outcome(self, choices: dict[str, Level], picks: dict[str, Pick], refused: dict[str, Pick],
                 fitted: float, heldout: float | None, retried: bool) -> Outcome:
        if retried:
            refused = {name: replace(pick, split=ALL) for name, pick in refused.items()}
        return Outcome(choices, picks, refused, fitted, heldout, len(self.heldout_indices), self.log,
                       self.trials, retried,
                       None if self.ctx.task is None else self.drop(choices, ALL))


def _most_aggressive(base: Choices, sites: Sequence[Site]) -> dict[str, Level]:
    """``base`` with each of ``sites`` at its most aggressive level (a prefix the estimated
    sensitivity search measures)."""
    return {**base, **{site.name: site.levels[-1] for site in sites}}


def search_switches(gm: fx.GraphModule, ctx: PassContext, result: PassResult, candidates: Sequence[fx.Node],
                    rewrite: Callable[[fx.GraphModule, list[str]], None], budget: float, strategy: str, *,
                    sites_noun: str, rewritten: str = "rewritten",
                    rewrite_trial: Callable[[fx.GraphModule, list[str]], None] | None = None) -> list[str]:
    """A budgeted search whose sites are ``candidates`` switched on or off (one level each):
    ``rewrite(graph, names)`` rewrites the named nodes of a graph; ``rewrite_trial`` (default
    ``rewrite``) those of a trial, where a pass fits what it derives (static scales) on the fit
    batches only. Skips each refused node with its measured error (``over-budget``; the message
    names the other ``sites_noun`` ``rewritten`` with it), commits the chosen ones on ``gm`` and
    records each as applied with its details; returns their names."""
    trial_rewrite = rewrite_trial or rewrite

    def apply(trial: fx.GraphModule, choices: Choices) -> fx.GraphModule:
        trial_rewrite(trial, [n.name for n in candidates if n.name in choices])
        return trial

    sites = [Site(node.name, (True,)) for node in candidates]
    outcome = BudgetedSearch(gm, ctx, sites, apply, budget, strategy).run()
    for name, pick in outcome.refused.items():
        context = "alone" if pick.others == 0 else f"with {pick.others} other {sites_noun} {rewritten}"
        result.skip(name, Refusal(OVER_BUDGET, f"{rewritten} {context} the output error is {pick.error:.3g} "
                                               f"> budget {pick.target:g}"))
    chosen = [n.name for n in candidates if n.name in outcome.choices]
    rewrite(gm, chosen)
    for name in chosen:
        result.apply()
        result.details.append({"node": name, "error": outcome.picks[name].error, **outcome.details_for(name)})
    return chosen
