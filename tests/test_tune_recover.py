"""fxopt.tune(..., recover=): an option the budget refuses alone is fine-tuned by distillation
and judged again with the confidence bound; without recover= it stays refused. Asserts on the
search log's reasons and bounds, never on timings."""

from __future__ import annotations

import pytest
import torch
from test_tune import _dataset, trained  # noqa: F401  (the fixture: a trained MLP and its validation data)

import fxopt
import fxopt.tune.recover as recover_module
from fxopt.errors import InputError
from fxopt.latency import Timing

MAX_DROP = 0.03
SITE, OPTION = "linear", "low-rank(16)"  # the 32->128 Linear at rank 16: alone, its bound is over MAX_DROP


def _tune(model, example, data, recover=None):
    return fxopt.tune(model, (example,), data=data, metric="accuracy", max_drop=MAX_DROP, techniques="low-rank",
                      time_budget_s=60, repeats=3, progress=False, recover=recover,
                      # every batch judges (no confirmation half): the data supports this budget only whole
                      confirm=False,
                      min_speedup=100.0)  # nothing counts as faster: the search keeps nothing, whatever the timings


def _entries(log, phase):
    return [c for c in log.candidates if c.phase == phase and c.choices.get(SITE) == OPTION]


def test_recover_fine_tunes_an_over_budget_option_into_the_budget(trained):  # noqa: F811
    model, data, example = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = _tune(model, example, data)
    refused = _entries(plain.report.search, "single")
    assert len(refused) == 1 and not refused[0].kept and refused[0].bound > MAX_DROP
    assert f"> max_drop {MAX_DROP:g}" in refused[0].reason
    assert SITE not in plain.report.search.chosen and not _entries(plain.report.search, "recover")

    unlabelled = list(_dataset(2048, seed=1)[0].split(64))  # the training inputs, without labels
    recovered = _tune(model, example, data, recover={"data": unlabelled, "epochs": 5, "lr": 1e-3, "candidates": 1})
    log = recovered.report.search
    [entry] = _entries(log, "recover")  # candidates=1: the refused option nearest to the budget, only
    assert entry.bound is not None and entry.bound <= MAX_DROP < refused[0].bound
    assert "fine-tuned (" in entry.reason and f"within max_drop {MAX_DROP:g}" in entry.reason
    assert not entry.kept and "not faster than the result" in entry.reason  # min_speedup: acceptable, not kept
    assert log.chosen == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_recovered_option_measured_faster_is_the_result(trained, monkeypatch):  # noqa: F811
    model, data, example = trained
    # The side-by-side timing of the recovery step, fixed: the recovered model 200 times as fast (min_speedup is 100).
    fixed = {"baseline": 2.0, "current": 2.0, "recovered": 0.01}
    monkeypatch.setattr(recover_module, "measure_side_by_side",
                        lambda calls, **_: {name: Timing.of([fixed[name]]) for name in calls})
    unlabelled = list(_dataset(2048, seed=1)[0].split(64))
    opt = _tune(model, example, data, recover={"data": unlabelled, "epochs": 5, "lr": 1e-3, "candidates": 1})
    log = opt.report.search
    [entry] = _entries(log, "recover")
    assert entry.kept and "x200.000 over the result: it is the result" in entry.reason
    assert log.chosen == {SITE: OPTION} and log.final_bound == entry.bound <= MAX_DROP
    # the returned model is the fine-tuned one: factored (fewer parameters), and within the budget on data
    assert opt.report.final.params < opt.report.original.params
    with torch.no_grad():
        hits = [int((opt(x).argmax(-1) == y).sum()) - int((model(x).argmax(-1) == y).sum()) for x, y in data]
    assert -sum(hits) / sum(len(y) for _, y in data) <= entry.drop + 1e-9


@pytest.mark.parametrize(("recover", "message"), [
    ("inputs.pt", "takes a list of input batches"),
    ({"epochs": 2}, "needs 'data'"),
    ({"data": [torch.zeros(2, 32)], "steps": 2}, "needs 'data' and takes"),
    ([], "no input batches"),
    ({"data": [torch.zeros(2, 32)], "candidates": 0}, "candidates must be a positive integer"),
])
def test_bad_recover_is_refused(trained, recover, message):  # noqa: F811
    model, data, example = trained
    with pytest.raises(InputError, match=message):
        _tune(model, example, data, recover=recover)
