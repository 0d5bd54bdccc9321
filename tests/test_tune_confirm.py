"""The tuner's choice is confirmed on rows no decision was made on: a fixed-sequence test along
a ladder of models, mildest first, each by the exact binomial bound on the confirmation rows
(known flips -> the known decision), and data whose confirmation half cannot support the
budget is said so before searching."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import beta

import fxopt
from fxopt.lossy.task import FIT, HELD_OUT, TaskBudget, accuracy
from fxopt.tune.confirm import (
    confirm_choice,
    ladder,
    order_mildest_first,
    selection_and_confirmation,
)
from fxopt.tune.log import Candidate, TuneLog

ROWS, BATCHES, FEATURES, CLASSES = 400, 4, 8, 4  # batches of 100: rows 100-199 and 300-399 confirm


def _problem():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, FEATURES, generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, CLASSES).eval()
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(-1)  # right on every row: any changed prediction is a harmful flip
    task = TaskBudget([[t] for t in x.chunk(BATCHES)], list(labels.chunk(BATCHES)), accuracy, max_drop=0.02)
    task.set_reference(model)
    return model, x, labels, logits, task


class _Tuner:
    """What confirm_choice reads of the tuner: options ``(technique, level)`` per site, each
    flipping known rows, with their measurements alone (bound of the drop, speedup)."""

    def __init__(self, x, logits, confirmation, flips: dict[tuple[str, tuple], list[int]],
                 alone: dict[tuple[str, tuple], tuple[float, float]]) -> None:
        self.x, self.logits, self.confirmation, self.flips, self.alone = x, logits, confirmation, flips, alone
        self.log = TuneLog("accuracy", 0.02, "eager", [])

    def labels(self, choices):
        return {site: f"{option[0]}({option[1]})" for site, option in choices.items()}

    def site_options(self):
        found: dict[str, list[tuple]] = {}
        for site, option in self.alone:
            found.setdefault(site, []).append(option)
        return found

    def single(self, site, option):
        bound, speedup = self.alone[(site, option)]
        return Candidate("c", "single", self.labels({site: option}), speedup=speedup, drop=0.0, bound=bound,
                         kept=True)

    def runner(self, choices):
        rows = [row for site, option in choices.items() for row in self.flips[(site, option)]]
        override = torch.zeros_like(self.logits)
        override[rows, (self.logits[rows].argmax(-1) + 1) % CLASSES] = 100.0

        def run(batch):
            index = (batch[:, :1] == self.x[:, 0][None]).float().argmax(-1)
            return self.logits[index] + override[index]

        return run


def test_the_selection_and_confirmation_halves_are_the_even_and_odd_batches():
    _, _, labels, _, task = _problem()
    selection, confirmation = selection_and_confirmation(task)
    assert selection.examples() == confirmation.examples() == 200
    assert torch.equal(torch.cat(confirmation.labels), torch.cat([labels[100:200], labels[300:400]]))
    assert confirmation.baseline == pytest.approx(1.0) and task.part(FIT).baseline == pytest.approx(1.0)
    assert selection_and_confirmation(task.part(HELD_OUT).part(FIT)) is None  # one batch: nothing to confirm on


def test_sites_are_tested_mildest_first_and_kept_up_to_the_first_failure():
    _, x, _, logits, task = _problem()
    confirmation = task.part(HELD_OUT)
    # 0 harmful flips on 200 rows: bound 1.49 points, within 2; one flip: 2.35 points, over
    assert beta(1, 200).ppf(0.95) <= 0.02 < beta(2, 199).ppf(0.95)
    rank = ("low-rank", 32)
    # b flips selection rows only, c one confirmation row
    flips = {("a", rank): [], ("b", rank): [0, 1, 2], ("c", rank): [150]}
    alone = {("a", rank): (0.005, 2.0), ("b", rank): (0.01, 2.0), ("c", rank): (0.015, 2.0)}
    tuner = _Tuner(x, logits, confirmation, flips, alone)
    accepted = confirm_choice(tuner, {"c": rank, "b": rank, "a": rank})
    assert accepted == {"a": rank, "b": rank}
    tested = [c for c in tuner.log.candidates if c.phase == "confirm"]
    assert [list(c.choices) for c in tested] == [["a"], ["a", "b"], ["a", "b", "c"]]
    assert [c.kept for c in tested] == [True, True, False]
    assert tested[0].bound == pytest.approx(beta(1, 200).ppf(0.95))
    assert tested[2].bound == pytest.approx(beta(2, 199).ppf(0.95)) and tested[2].split == "confirmation"
    assert "c back to float" in tuner.log.notes[-1]

    # the mildest site failing stops the sequence: nothing is kept, though b alone would pass
    tuner = _Tuner(x, logits, confirmation, {("a", rank): [120], ("b", rank): []},
                   {("a", rank): (0.0, 2.0), ("b", rank): (0.01, 2.0)})
    assert confirm_choice(tuner, {"a": rank, "b": rank}) == {}
    assert len([c for c in tuner.log.candidates if c.phase == "confirm"]) == 1


def test_a_site_climbs_its_milder_levels_first_and_keeps_the_last_that_passed():
    _, x, _, logits, task = _problem()
    mild, chosen, faster = ("low-rank", 128), ("low-rank", 32), ("low-rank", 16)
    # a at rank 32 flips a confirmation row, at rank 128 none; b flips none; rank 16 comes after
    # the choice in the technique's levels (mildest first), so it is no rung
    flips = {("a", mild): [], ("a", chosen): [110], ("a", faster): [], ("b", chosen): []}
    # rank 128 timed faster alone than rank 32 (noise): the order is the technique's, not the timing's
    alone = {("a", mild): (0.0, 3.5), ("a", chosen): (0.0, 3.0), ("a", faster): (0.0, 4.0), ("b", chosen): (0.01, 2.0)}
    tuner = _Tuner(x, logits, task.part(HELD_OUT), flips, alone)
    assert ladder(tuner, {"a": chosen, "b": chosen}) == [{"a": mild}, {"a": mild, "b": chosen},
                                                         {"a": chosen, "b": chosen}]
    assert confirm_choice(tuner, {"a": chosen, "b": chosen}) == {"a": mild, "b": chosen}
    assert "a at a milder level" in tuner.log.notes[-1]


def test_order_is_by_the_bound_alone_then_by_the_larger_speedup():
    alone = {"x": (0.01, 1.5), "y": (0.01, 3.0), "z": (0.0, 1.1)}
    assert order_mildest_first({"x": 1, "y": 1, "z": 1, "unmeasured": 1}, alone) == ["z", "y", "x", "unmeasured"]


def test_tune_says_when_the_confirmation_half_cannot_support_the_budget():
    model, x, labels, _, _ = _problem()
    data = [(x[:200], labels[:200]), (x[200:], labels[200:])]  # 400 rows support 1 point (299 needed), 200 do not
    with pytest.warns(UserWarning, match="twice as many"):
        opt = fxopt.tune(model, (x[:32],), data=data, metric="accuracy", max_drop=0.01, time_budget_s=30, repeats=2,
                         progress=False)
    log = opt.report.search
    assert log.chosen == {} and any("nothing searched" in note for note in log.notes)
    assert any("confirmed on the 200 examples" in note and "299" in note for note in opt.report.notes)
    single = fxopt.tune(model, (x[:32],), data=[(x, labels)], metric="accuracy", max_drop=0.02, techniques="bf16",
                        time_budget_s=10, repeats=2, progress=False)
    assert any("not confirmed" in note for note in single.report.notes)
    assert not [c for c in single.report.search.candidates if c.phase == "confirm"]
    with pytest.raises(fxopt.errors.InputError, match="two batches"):
        fxopt.tune(model, (x[:32],), data=[(x, labels)], metric="accuracy", max_drop=0.01, confirm=True,
                   progress=False)
