"""Task budgets judged by the upper confidence bound of the drop: a candidate within budget on
its point estimate but not on its bound is refused, one whose bound fits is accepted, and data
too small for the budget is said so before any search, with the number of examples needed."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
from scipy.stats import beta

import fxopt
from fxopt.capture import capture
from fxopt.lossy import BudgetedSearch, Site
from fxopt.lossy.task import TaskBudget, accuracy, task_budget
from fxopt.pass_api import PassContext

ROWS, FEATURES, CLASSES = 400, 8, 4
BUDGET = 0.03  # of the bias search


def _problem():
    """A linear classifier, labels it gets right on all but 40 rows, and the rows it is surest of."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, FEATURES, generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, CLASSES).eval()
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(-1).clone()
    labels[:40] = (labels[:40] + 1) % CLASSES  # the model is wrong on these
    return model, x, labels, logits


def _flipping(logits: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, to: torch.Tensor):
    """A candidate model: the reference's logits, except that ``rows`` predict ``to``."""
    override = torch.zeros_like(logits)
    override[rows, to] = 100.0

    def run(batch: torch.Tensor) -> torch.Tensor:
        index = (batch[:, :1] == x[:, 0][None]).float().argmax(-1)  # each row's position in x
        return logits[index] + override[index]

    return run


def _task(x, labels, model, max_drop, confidence=0.95, batches=2) -> TaskBudget:
    task = TaskBudget(list(map(lambda t: [t], x.chunk(batches))), list(labels.chunk(batches)), accuracy, max_drop,
                      confidence=confidence)
    task.set_reference(model)
    return task


def test_the_drop_is_the_exact_binomial_bound_of_the_harmful_flips():
    model, x, labels, logits = _problem()
    task = _task(x, labels, model, max_drop=0.02)
    # 5 rows the model got right now predict a wrong class; 2 it got wrong now predict their label
    harmful = torch.arange(100, 105)
    helpful = torch.arange(0, 2)
    rows = torch.cat([harmful, helpful])
    to = torch.cat([(labels[harmful] + 1) % CLASSES, labels[helpful]])
    drop = task.drop(_flipping(logits, x, rows, to))
    assert drop.observed == pytest.approx(3 / ROWS)
    assert (drop.bound.harmful, drop.bound.helpful, drop.bound.examples) == (5, 2, ROWS)
    assert float(drop) == pytest.approx(beta(6, ROWS - 5).ppf(0.95), rel=1e-9)
    # the point estimate (0.75 points) is within a 2-point budget, the bound (2.3 points) is not
    assert drop.observed <= task.max_drop < drop
    again = pickle.loads(pickle.dumps(drop))  # a drop survives the copies a report goes through
    assert again == drop and again.bound == drop.bound and copy.deepcopy(drop).bound == drop.bound
    # the old behaviour: the point estimate alone
    assert float(_task(x, labels, model, 0.02, confidence=None).drop(_flipping(logits, x, rows, to))) \
        == pytest.approx(3 / ROWS)


def _head_search(confidence):
    """A budgeted search over one site, the classifier's bias: each level pushes one class up,
    flipping more rows the larger it is."""
    model, x, labels, _ = _problem()
    gm = capture(model, (x,), {})
    bias_name = next(n.target for n in gm.graph.nodes if n.op == "get_attr" and "bias" in str(n.target))
    task = _task(x, labels, gm, max_drop=BUDGET, confidence=confidence)

    def apply(candidate, choices):
        offset = choices.get("bias", 0.0)
        bias = getattr(candidate, bias_name).detach().clone()
        bias[0] += offset
        setattr(candidate, bias_name, torch.nn.Parameter(bias, requires_grad=False))
        return candidate

    def harmful(offset: float) -> tuple[int, int]:  # computed here, independently of fxopt
        with torch.no_grad():
            before = model(x).argmax(-1)
            shifted = model(x) + torch.nn.functional.one_hot(torch.tensor(0), CLASSES) * offset
            after = shifted.argmax(-1)
        return int(((before == labels) & (after != labels)).sum()), int(((before != labels) & (after == labels)).sum())

    levels = (0.01, 0.02, 0.03, 0.1)
    search = BudgetedSearch(gm, PassContext(batches=[[x]], task=task), [Site("bias", levels)], apply, BUDGET,
                            strategy="sensitivity", holdout=False, output_error=False)
    return search, levels, harmful


def test_a_candidate_within_budget_on_its_point_estimate_but_not_its_bound_is_refused():
    search, levels, harmful = _head_search(0.95)
    flips = {level: harmful(level) for level in levels}
    points = {level: (b - c) / ROWS for level, (b, c) in flips.items()}
    bounds = {level: beta(b + 1, ROWS - b).ppf(0.95) for level, (b, _) in flips.items()}
    # the levels span the three cases: bound fits; point fits but bound does not; neither
    assert any(bounds[level] <= BUDGET for level in levels)
    assert any(points[level] <= BUDGET < bounds[level] for level in levels)
    outcome = search.run()
    accepted = max((level for level in levels if bounds[level] <= BUDGET), default=None)
    assert outcome.choices == {"bias": accepted}
    # each trial logs the drop it was judged by: the bound, with the point estimate in it
    for step in (s for s in outcome.log if s["event"] == "trial"):
        level = step["choices"]["bias"]
        assert float(step["drop"]) == pytest.approx(bounds[level], rel=1e-9)
        assert step["drop"].observed == pytest.approx(points[level], abs=1e-6)  # a float32 mean
    summary = outcome.summary()
    assert summary["metric_drop"] == pytest.approx(points[accepted], abs=1e-6)
    assert summary["metric_drop_bound"] == pytest.approx(bounds[accepted])

    # on the point estimate alone the search takes a level the bound refused
    loose, _, _ = _head_search(None)
    chosen = loose.run().choices["bias"]
    assert points[chosen] <= BUDGET < bounds[chosen]


def test_too_few_examples_are_said_before_searching_with_the_count_needed():
    model, x, labels, _ = _problem()
    gm = capture(model, (x,), {})
    signature = gm.meta["fxopt_signature"]
    data = [(x[:128], labels[:128])]
    with pytest.warns(UserWarning, match=r"128 examples cannot .* at least 299 examples are needed"):
        task = task_budget(gm, signature, data, "accuracy", 0.01)
    assert "299" in task.unsupported()
    # a perfect candidate (the model itself) is still over budget: nothing lossy is accepted
    assert task.drop(gm).observed == 0.0 and task.drop(gm) > 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert task_budget(gm, signature, data, "accuracy", 0.01, confidence=None).unsupported() is None
        assert task_budget(gm, signature, [(x[:300], labels[:300])], "accuracy", 0.01).unsupported() is None


def test_compile_reports_the_unsupported_budget_and_refuses_every_lossy_change():
    model, x, labels, _ = _problem()
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, CLASSES)).eval()
    with torch.no_grad():  # a middle layer of rank 4 and a little noise: low-rank factors it nearly exactly
        wide[2].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8 + 1e-3 * torch.randn(64, 64))
    passes = ["low-rank(budget=0.9, ratio=0.1, multiple=4, min_params=0)"]
    data = [(x[:128], wide(x[:128]).argmax(-1))]
    with pytest.warns(UserWarning, match="299"):
        strict = fxopt.compile(wide, (x[:32],), passes, metric="top1-agreement", data=data, max_drop=0.01)
    assert strict.report["low-rank"].applied == 0
    assert any("299" in note for note in strict.report.notes)
    loose = fxopt.compile(wide, (x[:32],), passes, metric="top1-agreement", data=data, max_drop=0.01,
                          confidence=None)
    assert loose.report["low-rank"].applied > 0
    assert "metric drop" in str(loose.report)
    json.dumps(strict.report.to_dict(), default=str)  # the report stays machine-readable
    json.dumps(loose.report.to_dict(), default=str)


def test_tune_says_up_front_that_the_data_cannot_support_the_budget():
    model, x, labels, _ = _problem()
    with pytest.warns(UserWarning, match="299"):
        opt = fxopt.tune(model, (x[:32],), data=[(x[:128], labels[:128])], metric="accuracy", max_drop=0.01,
                         time_budget_s=30, repeats=2, progress=False)
    log = opt.report.search
    assert log.chosen == {} and log.final_drop == 0.0
    assert not [c for c in log.candidates if c.phase == "single"]  # nothing was searched
    assert any("nothing searched" in note for note in log.notes) and any("299" in note for note in opt.report.notes)


def test_bad_confidence_is_refused():
    model, x, labels, _ = _problem()
    with pytest.raises(fxopt.errors.InputError, match="confidence"):
        fxopt.tune(model, (x[:32],), data=[(x, labels)], metric="accuracy", max_drop=0.01, confidence=95,
                   progress=False)


def test_unlabelled_agreement_data_widens_the_sample_of_the_bound():
    model, x, labels, logits = _problem()
    gm = capture(model, (x,), {})
    signature = gm.meta["fxopt_signature"]
    data = [(x[:128], labels[:128])]
    unlabelled = [x[128:278], x[278:]]  # 272 more rows, no labels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 400 examples in all support one point: no warning
        task = task_budget(gm, signature, data, "top1-agreement", 0.01, agreement_data=unlabelled)
    assert task.examples() == ROWS and task.unsupported() is None
    assert float(task.drop(gm)) == pytest.approx(1 - 0.05 ** (1 / ROWS), rel=1e-9)  # no change in 400
    # 3 changed top-1 predictions: 1 among the labelled rows, 2 among the unlabelled ones
    rows = torch.tensor([5, 200, 300])
    candidate = _flipping(logits, x, rows, (logits[rows].argmax(-1) + 1) % CLASSES)
    drop = task.drop(candidate)
    assert drop.bound.method == "agreement" and drop.observed == pytest.approx(1 / 128)
    assert float(drop) == pytest.approx(beta(4, ROWS - 3).ppf(0.95), rel=1e-9)
    # without them: the 128 labelled rows alone, 1 harmful flip
    with pytest.warns(UserWarning, match="299"):
        alone = task_budget(gm, signature, data, "top1-agreement", 0.01)
    assert float(alone.drop(candidate)) == pytest.approx(beta(2, 127).ppf(0.95), rel=1e-9)
    assert float(alone.drop(candidate)) > float(drop)


def test_agreement_data_is_refused_where_it_cannot_bound():
    model, x, labels, _ = _problem()
    gm = capture(model, (x,), {})
    signature = gm.meta["fxopt_signature"]
    data = [(x[:128], labels[:128])]
    with pytest.raises(fxopt.errors.InputError, match="accuracy and top1-agreement only"):
        task_budget(gm, signature, data, lambda out, y: 0.0, 0.01, agreement_data=[x])
    with pytest.raises(fxopt.errors.InputError, match="needs confidence"):
        task_budget(gm, signature, data, "accuracy", 0.01, confidence=None, agreement_data=[x])
    with pytest.raises(fxopt.errors.InputError, match="agreement_data is empty"):
        task_budget(gm, signature, data, "accuracy", 0.01, agreement_data=[])


def test_other_metrics_take_a_paired_bootstrap_bound():
    model, x, labels, logits = _problem()

    def margin(outputs, y):  # a metric that is not a share of right top-1 predictions
        return float(outputs.gather(1, y[:, None]).mean() - outputs.mean())

    task = TaskBudget([[x[:200]], [x[200:]]], [labels[:200], labels[200:]], margin, 0.05)
    task.set_reference(model)
    assert task.drop(model).bound.method == "bootstrap" and float(task.drop(model)) == 0.0
    rows = torch.arange(100, 130)
    candidate = _flipping(logits, x, rows, (labels[rows] + 1) % CLASSES)
    drop = task.drop(candidate)
    assert drop.bound.method == "bootstrap" and float(drop) > drop.observed > 0
    assert float(task.drop(candidate)) == float(drop)  # a fixed seed: the same bound again
    # batches resampled when rows cannot be: labels that are not tensors
    coarse = TaskBudget([[x[:200]], [x[200:]]], [labels[:200].tolist(), labels[200:].tolist()],
                        lambda out, y: margin(out, torch.tensor(y)), 0.05)
    coarse.set_reference(model)
    assert coarse.drop(candidate).bound.method == "bootstrap"
