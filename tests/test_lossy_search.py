"""The budgeted search and the activation observer every lossy pass shares (fxopt.lossy)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest
import torch
import torch.fx as fx
from torch import nn

from fxopt.capture import capture
from fxopt.ir import add_constant, call_nodes, constant, ops
from fxopt.lossy import (
    BudgetedSearch,
    Site,
    collect_activations,
    estimated_trial_limit,
    first_passing,
    inputs_of,
    observe,
    split_batches,
)
from fxopt.manager import reference_outputs
from fxopt.pass_api import PassContext
from fxopt.session import pass_context
from fxopt.verify import compare_outputs, run_graph


class TwoBranches(nn.Module):
    """y = a(x) + b(x): branch a is 10x smaller than b, so damaging it costs less error."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 8, bias=False), nn.Linear(16, 8, bias=False)
        with torch.no_grad():
            self.a.weight.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


SHRINK = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # least to most aggressive: how much of a weight goes


def captured(model_type: type[nn.Module], rows: int, batches: int) -> tuple[fx.GraphModule, PassContext]:
    """A seeded model of ``model_type``, captured, with ``batches`` random batches of ``rows``
    rows and their reference outputs."""
    torch.manual_seed(0)
    model = model_type().eval()
    data = [[torch.randn(rows, 16)] for _ in range(batches)]
    gm = capture(model, tuple(data[0]))
    ctx = pass_context(data, calibrated=batches > 1, reference=reference_outputs(gm, data))
    return gm, ctx


def setup(batches: int = 1) -> tuple[fx.GraphModule, PassContext, list[Site], list[int]]:
    gm, ctx = captured(TwoBranches, 32, batches)
    # Branch a saves as much as branch b per level, but costs a tenth of the error.
    sites = [Site(n.name, SHRINK, tuple(100 * s for s in SHRINK)) for n in call_nodes(gm, ops.linear)]
    return gm, ctx, sites, []


def shrinking(calls: list[int]):
    def apply(trial: fx.GraphModule, choices: Mapping[str, object]) -> fx.GraphModule:
        calls.append(1)
        for node in list(trial.graph.nodes):
            if node.name in choices:
                weight = constant(trial, node.args[1]) * (1.0 - float(choices[node.name]))
                node.args = (node.args[0], add_constant(trial, weight, "shrunk"), *node.args[2:])
        return trial
    return apply


def measured(gm: fx.GraphModule, ctx: PassContext, apply, choices: Mapping[str, object]) -> float:
    from fxopt.ir import copy_graph_module

    trial = apply(copy_graph_module(gm), choices)
    trial.recompile()
    return max(compare_outputs(ref, run_graph(trial, b)).max_rel for b, ref in zip(ctx.batches, ctx.reference))


def test_each_combination_is_run_once_and_the_live_graph_is_untouched() -> None:
    gm, ctx, sites, calls = setup()
    before = str(gm.graph)
    search = BudgetedSearch(gm, ctx, sites, shrinking(calls), budget=0.05)
    first = search.error({sites[0].name: 0.5})
    assert search.error({sites[0].name: 0.5}) == first and search.trials == len(calls) == 1
    search.error({sites[0].name: 0.5, sites[1].name: 0.1})
    search.error({sites[1].name: 0.1, sites[0].name: 0.5})  # same combination, other order
    assert search.trials == len(calls) == 2
    assert search.error({}) == 0.0 and search.trials == 2
    outcome = search.run()
    assert outcome.trials == search.trials == len(calls)
    assert str(gm.graph) == before


def test_equal_share_and_sensitivity_spend_the_budget_differently() -> None:
    gm, ctx, sites, calls = setup()
    a, b = sites[0].name, sites[1].name
    apply = shrinking(calls)
    equal = BudgetedSearch(gm, ctx, sites, apply, budget=0.05, strategy="equal-share").run()
    sensitive = BudgetedSearch(gm, ctx, sites, apply, budget=0.05, strategy="sensitivity").run()
    # Equal share: a (first) may only take half the budget; b gets what a left.
    assert measured(gm, ctx, apply, {a: equal.choices[a]}) <= 0.025
    assert equal.choices[a] < 0.5 and equal.choices[b] >= 0.02
    # Sensitivity: a saves most per unit of error, so it goes first and goes further.
    assert sensitive.choices[a] > equal.choices[a]
    assert [s["order"] for s in sensitive.log if s["event"] == "ranked"] == [[a, b]]
    for outcome in (equal, sensitive):
        assert outcome.fitted_error <= 0.05
        assert measured(gm, ctx, apply, outcome.choices) == pytest.approx(outcome.fitted_error)
        assert outcome.heldout_error is None and outcome.heldout_batches == 0  # one batch: nothing held out


def test_budget_too_small_refuses_every_site_with_the_least_aggressive_error() -> None:
    gm, ctx, sites, calls = setup()
    outcome = BudgetedSearch(gm, ctx, sites, shrinking(calls), budget=1e-6).run()
    assert outcome.choices == {}
    assert {name: pick.tried for name, pick in outcome.refused.items()} == {s.name: 0.02 for s in sites}
    assert all(pick.error > 1e-6 for pick in outcome.refused.values())


def test_every_step_is_logged() -> None:
    gm, ctx, sites, calls = setup(batches=2)
    outcome = BudgetedSearch(gm, ctx, sites, shrinking(calls), budget=0.05, strategy="sensitivity").run()
    events = [step["event"] for step in outcome.log]
    assert {"trial", "pick", "ranked", "combine", "verify"} <= set(events)
    assert sum(e == "trial" for e in events) == outcome.trials
    detail = outcome.details_for(sites[0].name)
    assert detail["heldout_batches"] == 1 and detail["heldout_error"] is not None
    assert detail["log"] and all(s.get("site", sites[0].name) == sites[0].name for s in detail["log"])


def test_choice_is_fitted_on_one_split_and_verified_on_the_other() -> None:
    assert split_batches(1) == ([0], [])
    assert split_batches(4) == ([0, 2], [1, 3])
    gm, ctx, sites, calls = setup(batches=2)
    outcome = BudgetedSearch(gm, ctx, sites, shrinking(calls), budget=0.05).run()
    trials = [s for s in outcome.log if s["event"] == "trial"]
    assert {s["split"] for s in trials} == {"fit", "held-out"}
    assert outcome.heldout_error is not None and outcome.heldout_error <= 0.05
    assert not outcome.retried


def test_a_choice_that_fails_on_held_out_data_is_made_again_on_every_batch() -> None:
    """Batch 1 (held out) is 20x larger along the inputs branch a reads, so a choice fitted on
    batch 0 alone damages a far more than batch 1 allows."""
    gm, ctx, sites, calls = setup(batches=2)
    a = sites[0].name
    torch.manual_seed(1)
    weight_a = constant(gm, next(n for n in gm.graph.nodes if n.name == a).args[1])
    direction = weight_a[0] / weight_a[0].norm()
    ctx.batches[1] = [ctx.batches[1][0] + 40 * torch.randn(32, 1) * direction]
    ctx = pass_context(ctx.batches, calibrated=ctx.calibrated, reference=reference_outputs(gm, ctx.batches))
    search = BudgetedSearch(gm, ctx, sites, shrinking(calls), budget=0.05, strategy="sensitivity")
    outcome = search.run()
    verify = next(s for s in outcome.log if s["event"] == "verify")
    assert verify["heldout"] > 0.05  # the fitted choice failed on the held-out batch
    assert outcome.retried and any(s["event"] == "retry" for s in outcome.log)
    assert outcome.heldout_error <= 0.05 * 0.5 and outcome.fitted_error <= 0.05 * 0.5


def test_first_passing_finds_the_boundary_with_few_calls() -> None:
    calls: list[int] = []

    def at_least_37(value: int) -> bool:
        calls.append(value)
        return value >= 37

    assert first_passing(list(range(100)), at_least_37) == 37
    assert len(calls) <= 8
    assert first_passing(list(range(10)), lambda v: False) is None
    assert first_passing([], lambda v: True) is None


def test_unknown_strategy_is_refused() -> None:
    gm, ctx, sites, calls = setup()
    with pytest.raises(ValueError, match="equal-share, sensitivity"):
        BudgetedSearch(gm, ctx, sites, shrinking(calls), budget=0.05, strategy="greedy")


# ---------------------------------------------------------------- the observer


def test_observer_statistics_over_all_rows_and_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    batches = [[torch.randn(2, 5, 4)], [torch.randn(2, 5, 4) * 3]]
    gm = capture(model, (batches[0][0],))
    relu = next(n for n in gm.graph.nodes if n.target == ops.relu)
    stats = observe(gm, [relu], batches, features=True, percentile=50.0)[relu]
    with torch.no_grad():
        outputs = [model(b[0]) for b in batches]
    rows = torch.cat([o.reshape(-1, 3) for o in outputs]).double()
    assert stats.rows == 20 and stats.batches == 2
    assert torch.allclose(stats.mean, rows.mean(0))
    assert torch.allclose(stats.rms, rows.square().mean(0).sqrt())
    assert torch.allclose(stats.centered_rms, rows.std(0, unbiased=False), atol=1e-7)
    assert stats.abs_max == pytest.approx(float(rows.abs().max()))
    assert stats.percentile == pytest.approx(max(float(o.abs().flatten().kthvalue(15).values) for o in outputs))
    values = collect_activations(gm, [relu], batches[:1])[relu]
    assert torch.allclose(values[0], outputs[0])


def test_sibling_consumers_each_get_their_input_statistics() -> None:
    class QKV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q(x) + self.k(x) * self.v(x)

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    gm = capture(QKV().eval(), (x,))
    linears = call_nodes(gm, ops.linear)
    stats = inputs_of(gm, linears, [[x]])
    assert set(stats) == {n.name for n in linears} and len(stats) == 3
    assert all(s.abs_max == pytest.approx(float(x.abs().max())) for s in stats.values())


def test_a_search_outside_the_manager_measures_against_the_graph_it_starts_from() -> None:
    gm, ctx, sites, calls = setup()
    with_reference = BudgetedSearch(gm, ctx, sites, shrinking(calls), budget=0.05).error({sites[1].name: 0.1})
    alone = BudgetedSearch(gm, PassContext(batches=ctx.batches), sites, shrinking(calls), budget=0.05)
    assert alone.error({sites[1].name: 0.1}) == pytest.approx(with_reference) and with_reference > 0


# ---------------------------------------------------------------- sensitivity ranked by estimates


class ManyBranches(nn.Module):
    """y = sum_i b_i(x), branch i scaled by SCALES[i]: removing half of branch i costs error in
    proportion to its scale, so the sites' damage is known in order (smallest first)."""

    SCALES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(16, 8, bias=False) for _ in self.SCALES)
        with torch.no_grad():
            for branch, scale in zip(self.branches, self.SCALES):
                branch.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


def many_branches(batches: int = 1, estimates: bool = True, estimate_scale: list[float] | None = None):
    gm, ctx = captured(ManyBranches, 64, batches)
    linears = call_nodes(gm, ops.linear)
    weights = {n.name: float(constant(gm, n.args[1]).norm()) for n in linears}
    guesses = estimate_scale or [weights[n.name] for n in linears]
    sites = [Site(n.name, (0.5,), (100.0,), estimate=(lambda level, g=g: g * level) if estimates else None)
             for n, g in zip(linears, guesses)]
    return gm, ctx, sites, [n.name for n in linears]


def trial_of(outcome, combination: Mapping[str, object]) -> dict:
    """The logged trial that measured ``combination``."""
    return next(s for s in outcome.log if s["event"] == "trial" and s["choices"] == dict(combination))


def test_estimates_rank_the_sites_and_a_few_measured_trials_find_the_longest_prefix_within_budget() -> None:
    gm, ctx, sites, order = many_branches()
    apply = shrinking([])
    everything = measured(gm, ctx, apply, {s.name: 0.5 for s in sites})
    budget = 0.4 * everything
    outcome = BudgetedSearch(gm, ctx, sites, apply, budget=budget, strategy="sensitivity").run()
    # Far fewer trials than each site alone plus each site combined (2 per site).
    assert outcome.trials <= 1 + estimated_trial_limit(len(sites)) < 2 * len(sites)
    assert not any(s["event"] == "pick" for s in outcome.log)  # no site was measured alone
    ranked = next(s for s in outcome.log if s["event"] == "ranked")
    assert ranked["order"] == order and ranked["by"] == "estimate"  # cheapest damage first
    # The choice is the sites that damage least, and its error is measured, logged and within budget.
    chosen = [name for name in order if name in outcome.choices]
    assert chosen == order[:len(chosen)] and 0 < len(chosen) < len(order)
    assert outcome.fitted_error <= budget
    assert outcome.fitted_error == pytest.approx(measured(gm, ctx, apply, outcome.choices))
    assert trial_of(outcome, outcome.choices)["error"] == outcome.fitted_error
    assert [s["error"] for s in outcome.log if s["event"] == "prefix" and s.get("chosen")][-1] == outcome.fitted_error
    # One more of the ranked sites would have broken the budget: that too was measured.
    assert measured(gm, ctx, apply, {name: 0.5 for name in order[:len(chosen) + 1]}) > budget
    for name, pick in outcome.refused.items():
        # Every refusal carries the measured error of a combination with the site in it.
        combination = trial_of(outcome, {**{n: 0.5 for n in outcome.choices}, name: 0.5}) \
            if pick.others == len(outcome.choices) else \
            next(s for s in outcome.log if s["event"] == "trial" and name in s["choices"]
                 and len(s["choices"]) == pick.others + 1 and s["error"] == pick.error)
        assert pick.level is None and pick.tried == 0.5 and pick.error > budget
        assert combination["error"] == pytest.approx(measured(gm, ctx, apply, combination["choices"]))
    first_out = order[len(chosen)]
    assert outcome.refused[first_out].others == len(chosen)  # its own ranked prefix, which fitted
    assert outcome.refused[first_out].others_error == pytest.approx(outcome.fitted_error)


def test_a_wrong_estimate_only_orders_trials_the_choice_is_still_measured_within_budget() -> None:
    # The estimates say the opposite of the truth: the most damaging sites look cheapest.
    gm, ctx, sites, order = many_branches(estimate_scale=[1.0 / s for s in ManyBranches.SCALES])
    apply = shrinking([])
    budget = 0.4 * measured(gm, ctx, apply, {s.name: 0.5 for s in sites})
    outcome = BudgetedSearch(gm, ctx, sites, apply, budget=budget, strategy="sensitivity").run()
    assert outcome.fitted_error <= budget
    assert outcome.fitted_error == pytest.approx(measured(gm, ctx, apply, outcome.choices))
    assert outcome.trials <= 1 + estimated_trial_limit(len(sites))
    assert all(pick.error > budget for pick in outcome.refused.values())


def test_without_estimates_the_sensitivity_strategy_measures_every_site_alone_as_before() -> None:
    gm, ctx, sites, order = many_branches(estimates=False)
    apply = shrinking([])
    budget = 0.4 * measured(gm, ctx, apply, {s.name: 0.5 for s in sites})
    outcome = BudgetedSearch(gm, ctx, sites, apply, budget=budget, strategy="sensitivity").run()
    events = [s["event"] for s in outcome.log]
    fit_alone = [s["site"] for s in outcome.log if s["event"] == "pick" and s["level"] is not None]
    assert events.count("pick") == len(sites) and "prefix" not in events
    # every site at once, each alone, then each that fitted alone on top of the ones before it
    # (the first of those is the same combination as itself alone)
    assert outcome.trials == 1 + len(sites) + len(fit_alone) - 1
    assert outcome.fitted_error <= budget


def test_estimated_choice_is_verified_on_held_out_data_and_made_again_on_every_batch_when_it_fails() -> None:
    gm, ctx, sites, order = many_branches(batches=2)
    apply = shrinking([])
    # The held-out batch is large along the least damaging branch, which the estimates put first.
    weight = constant(gm, next(n for n in gm.graph.nodes if n.name == order[0]).args[1])
    ctx.batches[1] = [ctx.batches[1][0] + 400 * torch.randn(64, 1) * weight[0] / weight[0].norm()]
    ctx = pass_context(ctx.batches, calibrated=ctx.calibrated, reference=reference_outputs(gm, ctx.batches))
    budget = 0.4 * measured(gm, pass_context(ctx.batches[:1], reference=ctx.reference[:1]), apply,
                            {s.name: 0.5 for s in sites})
    outcome = BudgetedSearch(gm, ctx, sites, apply, budget=budget, strategy="sensitivity").run()
    verify = next(s for s in outcome.log if s["event"] == "verify")
    assert verify["heldout"] > budget and outcome.retried
    assert outcome.fitted_error <= budget * 0.5 and outcome.heldout_error <= budget * 0.5
    assert all(pick.split == "all" and pick.error > budget * 0.5 for pick in outcome.refused.values())
    assert outcome.trials <= 2 * (1 + estimated_trial_limit(len(sites))) + 2


def test_everything_within_budget_needs_no_estimate() -> None:
    gm, ctx, sites, order = many_branches()
    asked: list[str] = []
    sites = [replace(s, estimate=lambda level, name=s.name: asked.append(name) or 1.0) for s in sites]
    outcome = BudgetedSearch(gm, ctx, sites, shrinking([]), budget=1.0, strategy="sensitivity").run()
    assert outcome.trials == 1 and len(outcome.choices) == len(sites) and asked == []


def test_starting_values_come_from_the_one_run_of_the_starting_graph_the_trials_reuse() -> None:
    gm, ctx, sites, order = many_branches(batches=3)
    search = BudgetedSearch(gm, ctx, sites, shrinking([]), budget=0.05, strategy="sensitivity")
    search.error({s.name: 0.5 for s in sites})
    x = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    values = search.starting_values([*order, x])
    fit = [ctx.batches[i] for i in search.fit_indices]
    assert len(fit) == 2 and all(len(v) == 2 for v in values.values())  # the fit batches only
    expected = collect_activations(gm, [n for n in gm.graph.nodes if n.name in order], fit)
    for node, seen in expected.items():
        assert all(torch.equal(a, b) for a, b in zip(values[node.name], seen))
    assert all(torch.equal(a, b[0]) for a, b in zip(values[x], fit))
    # that run is the one the later trials reuse: neither asking again nor a trial runs it again
    computed, trials = search._runner.computed, search.trials
    search.starting_values(order)
    assert search._runner.computed == computed and search.trials == trials
    search.error({order[-1]: 0.5})
    assert search._runner.computed - computed < len(gm.graph.nodes)  # only the nodes that changed


def test_one_retry_policy_serves_the_search_and_the_manager() -> None:
    """The held-out retry of the search and the unseen-data retry of the manager read one
    policy object: its targets are the ones they aim at."""
    import fxopt.lossy.search as search
    import fxopt.pipeline.manager as manager
    from fxopt.lossy.retry import RETRY, RetryPolicy

    assert search.RETRY is RETRY and manager.RETRY is RETRY
    assert RETRY.after_heldout(0.1) == pytest.approx(0.05)
    # fitted at 0.02 under a 0.05 budget, 0.08 on unseen data: aim 4x lower than the fitted error
    assert RETRY.after_unseen(0.05, 0.08, 0.02) == pytest.approx(0.05 * 0.02 / 0.08 * 0.9)
    # the fitted batches over budget too: aim below the budget by the same ratio
    assert RETRY.after_unseen(0.05, 0.2, 0.1) == pytest.approx(0.05 * 0.05 / 0.2 * 0.9)
    assert RETRY.after_unseen(0.05, 0.0, 0.0) == 0.0
    assert RetryPolicy(heldout_share=0.25).after_heldout(0.1) == pytest.approx(0.025)
