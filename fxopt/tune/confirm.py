"""Confirmation: the search's choice judged once more, on rows it was not chosen on.

A confidence bound holds for one candidate: its true drop exceeds the bound in at most
``1 - confidence`` of random validation samples. A search checks the bound of dozens of
candidates on the same rows and keeps what fits, so it keeps the ones whose sample happened
to flatter them (multiple comparisons): the chosen model's bound no longer holds. So, by
default, ``fxopt.tune`` splits the labelled batches of ``data`` in two: the search chooses on
the *selection* batches (even positions), and its choice is then tested on the
*confirmation* batches (odd positions), which no decision has looked at.

The test is a fixed-sequence one, along a ladder of models fixed before the confirmation rows
are read. Each chosen site climbs from its mildest level to the chosen one: the levels its
technique lists before the chosen one (ranks and widths from large to small) that the search
kept for the site alone (within ``max_drop`` and faster), then the chosen one (low-rank 128,
then 64, then the chosen 32). The sites are ordered mildest first (smallest
bound of the chosen option's drop alone on the selection rows, then the largest saving). The
ladder adds every site at its first level, in that order, then moves every site one level
up, and so on, each rung a model; the rungs are tested in order, each by the bound at
``confidence`` on the confirmation rows, and the result is the last rung that passed before
the first one that failed (the model after the exact passes when the first fails). Testing hypotheses in an order fixed in advance and
stopping at the first failure keeps the chance of accepting any model whose true drop is
over ``max_drop`` within ``1 - confidence`` overall, with no correction for the number
tested; a Bonferroni correction over the candidates the search checks would need
``confidence`` raised to ``1 - 0.05 / 60`` for a typical 60, which 360 rows cannot meet
with a single flip.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from fxopt.lossy.acceptance import describe_drop
from fxopt.lossy.task import ALL, FIT, HELD_OUT, TaskBudget

CONFIRMATION = "confirmation"  # the split name the log gives the confirmation rows


def selection_and_confirmation(task: TaskBudget) -> tuple[TaskBudget, TaskBudget] | None:
    """The selection batches (even positions) and the confirmation batches (odd positions) of
    ``task`` as budgets of their own; None when it has a single batch."""
    if len(task.inputs) < 2:
        return None
    return task.part(FIT), task.part(HELD_OUT)


def split_for_confirmation(task: TaskBudget, confirm: bool | None,
                           selection_split: str = ALL) -> tuple[TaskBudget, TaskBudget | None, str | None]:
    """``(selection, confirmation, note)`` for ``fxopt.tune(confirm=)``: the budgets the search
    chooses on and its choice is confirmed on (None: no confirmation), and why the data cannot
    support the budget, if it cannot (a ``UserWarning`` as well, when ``task_budget`` did not
    already warn)."""
    from fxopt.errors import InputError

    parts = selection_and_confirmation(task) if confirm or (confirm is None and task.confidence is not None) else None
    if confirm and parts is None:
        raise InputError("confirm=True needs data in two batches or more: the even ones choose, the odd ones confirm")
    selection, confirmation = parts or (task, None)
    halves = confirmation and unsupported_confirmation(confirmation)
    if halves and task.unsupported() is None:
        warnings.warn(halves, UserWarning, stacklevel=3)
    unconfirmed = None
    if confirm is None and task.confidence is not None and parts is None:
        unconfirmed = ("data is a single batch, so the choice is not confirmed on rows it was not made on: "
                       "its bound holds for one candidate, not for the best of those the search tried "
                       "(give data in two batches or more)")
    return selection, confirmation, halves or selection.unsupported(selection_split) or unconfirmed


def unsupported_confirmation(confirmation: TaskBudget) -> str | None:
    """Why the confirmation rows cannot support ``max_drop`` at the confidence asked, or None."""
    message = confirmation.unsupported()
    if message is None:
        return None
    return (f"the choice is confirmed on the {confirmation.examples()} examples of the odd batches of data, "
            f"which no decision is made on: {message[0].lower()}{message[1:]}; the even batches choose, so data "
            f"needs about twice as many (confirm=False judges on every batch, a bound that does not hold for "
            f"the best of many candidates)")


def order_mildest_first(choices: Mapping[str, Any], alone: Mapping[str, tuple[float, float]]) -> list[str]:
    """The sites of ``choices`` by the bound of their option's drop alone (selection rows),
    then by the latency it saved alone, most first; ``alone``: site -> (bound, speedup)."""
    return sorted(choices, key=lambda site: (alone.get(site, (math.inf, 1.0))[0],
                                             -alone.get(site, (math.inf, 1.0))[1], site))


def ladder(tuner: Any, choices: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rungs confirmation tests, mildest first, the last one ``choices`` itself."""
    alone, levels = {}, {}
    options = tuner.site_options()
    for site, option in choices.items():
        single = tuner.single(site, option)
        alone[site] = (math.inf, 1.0) if single is None else (single.judged_drop, single.speedup or 1.0)
        same = [other for other in options.get(site, []) if other[0] == option[0]]
        before = same[:same.index(option)] if option in same else []  # a technique lists its levels mildest first
        levels[site] = [other for other in before if getattr(tuner.single(site, other), "kept", False)] + [option]
    order = order_mildest_first(choices, alone)
    rungs, current = [], {}
    for step in range(max(len(steps) for steps in levels.values())):
        for site in order:
            if step < len(levels[site]):
                current = {**current, site: levels[site][step]}
                rungs.append(current)
    return rungs


def confirm_choice(tuner: Any, choices: Mapping[str, Any]) -> dict[str, Any]:
    """The last rung of :func:`ladder` before the first that fails on the confirmation rows
    (nothing when the first fails); each test is logged (phase ``confirm``)."""
    confirmation: TaskBudget = tuner.confirmation
    rungs = ladder(tuner, choices)
    accepted: dict[str, Any] = {}
    for trial in rungs:
        drop = confirmation.drop(tuner.runner(trial), ALL)
        passed = drop <= confirmation.max_drop
        tuner.log.add("confirm", tuner.labels(trial), drop=drop, split=CONFIRMATION, kept=passed,
                      reason=f"{describe_drop(drop)} {'<=' if passed else '>'} max_drop {confirmation.max_drop:g} "
                             f"on the rows held out from the choice"
                             + ("" if passed else ": stop, the rung before it is the result"))
        if not passed:
            break
        accepted = trial
    kept = [site for site, option in choices.items() if accepted.get(site) == option]
    milder = [site for site in accepted if site not in kept]
    dropped = [site for site in choices if site not in accepted]
    tuner.log.notes.append(
        f"confirmed on the {confirmation.examples()} examples of the odd batches (no decision was made on them), "
        f"{len(rungs)} models tested in a fixed order, mildest first: {len(kept)} of the {len(choices)} sites chosen "
        f"on the even batches kept as chosen" + (f"; {', '.join(milder)} at a milder level" if milder else "")
        + (f"; {', '.join(dropped)} back to float" if dropped else ""))
    return accepted

