"""Lossy rewriting: the budgeted search every lossy pass runs, and the activation observer.

``search``: :class:`BudgetedSearch` (one trial mechanism with memoised
measurement; ``equal-share`` and ``sensitivity`` strategies; choice on one split of the
batches, verification on the other); ``sites``: :class:`Site`, :class:`Pick`, :class:`Outcome` and
the split of the batches into those a choice is fitted on and those that verify it. ``observer``: :func:`observe`, :func:`inputs_of`,
:func:`observe_each` with :func:`merge_stats`, :func:`known_values` (the example's values the
manager kept).
``task``: :class:`TaskBudget`, a task-metric budget (labelled data, a metric, ``max_drop``)
that a search keeps besides the output-error budget, judged by ``acceptance``: the one-sided
upper confidence bound of a paired drop (exact binomial on flips, paired bootstrap otherwise)
and the examples a budget needs.
"""

from fxopt.lossy.observer import (
    ActivationStats,
    collect_activations,
    inputs_of,
    known_values,
    merge_stats,
    observe,
    observe_each,
    static_scales_of,
)
from fxopt.lossy.search import BudgetedSearch, search_switches
from fxopt.lossy.sites import (
           STRATEGIES,
           Outcome,
           Pick,
           Site,
           check_search_options,
           estimated_trial_limit,
           first_passing,
           fit_batches,
           fit_indices,
           split_batches,
)
from fxopt.lossy.task import METRICS, TaskBudget

__all__ = ["METRICS", "STRATEGIES", "TaskBudget", "ActivationStats", "BudgetedSearch", "Outcome", "Pick", "Site", "check_search_options", "collect_activations",
           "estimated_trial_limit", "search_switches",
           "first_passing", "fit_batches", "fit_indices", "inputs_of", "known_values", "merge_stats", "observe", "observe_each",
           "split_batches", "static_scales_of"]
