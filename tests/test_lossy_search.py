"""The budgeted search and the activation observer every lossy pass shares (fxopt.lossy)."""

from __future__ import annotations

from collections.abc import Mapping

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
    first_passing,
    inputs_of,
    observe,
    split_batches,
)
from fxopt.manager import reference_outputs
from fxopt.pass_api import PassContext
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


def setup(batches: int = 1) -> tuple[fx.GraphModule, PassContext, list[Site], list[int]]:
    torch.manual_seed(0)
    model = TwoBranches().eval()
    data = [[torch.randn(32, 16)] for _ in range(batches)]
    gm = capture(model, tuple(data[0]))
    ctx = PassContext(batches=data, calibrated=batches > 1)
    ctx.reference = reference_outputs(gm, data)
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
    ctx.reference = reference_outputs(gm, ctx.batches)
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
