"""quantize-int8's search description: which layers to quantize, and what each one costs.

Not a pass: the helpers of :mod:`fxopt.passes.quantize_int8`. Each layer is a site of the
budgeted search (:mod:`fxopt.lossy`) with one level; its estimate is its local error (its own
output's error, input and weight quantized, on its float input); static activation scales come
from the one activation observer; a layer left float gets a refusal that says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch.fx as fx
from fxopt.passes._quantize_int8_estimate import estimate_rows, local_errors

from fxopt.ir import constant
from fxopt.lossy import (
    ActivationStats,
    BudgetedSearch,
    Outcome,
    Pick,
    Site,
    collect_activations,
    fit_indices,
    known_values,
    merge_stats,
    observe_each,
)
from fxopt.pass_api import PassContext
from fxopt.quant import static_asymmetric_qparams, static_scale
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import OVER_BUDGET


class Options(Protocol):
    """The options of the pass that the search reads."""

    budget: float
    activations: str
    observer: str
    symmetric: bool
    percentile: float
    strategy: str


Quantize = Callable[[fx.GraphModule, list[str], dict, dict], None]


def choose_layers(options: Options, gm: fx.GraphModule, ctx: PassContext, candidates: list[fx.Node],
                  weights: dict, scales: dict, quantize: Quantize,
                  committed: Callable[[set[str]], dict] | None = None) -> Outcome:
    """Which layers to quantize: a site per layer, on or off, saving 3 of every 4 weight bytes,
    with its local error as the estimate the sensitivity strategy ranks by (measured only
    when quantizing every layer at once is over budget). ``quantize(gm, names, weights,
    scales)`` rewrites a trial the way the pass does; ``committed(names)``: the weights the
    pass commits ``names`` with, which a trial of the whole graph takes too."""
    local: dict[str, float] = {}
    running: list[BudgetedSearch] = []  # the search, while it runs (no cycle keeps its kept values after)

    def estimate_of(name: str) -> Callable[[object], float]:
        def estimate(level: object) -> float:
            if not local:
                # Each layer's float input: from the starting graph's run the trials reuse.
                sources = {n.name: n.args[0].name for n in candidates}
                seen = running[0].starting_values(set(sources.values()), reduce=estimate_rows)
                local.update(local_errors(options, gm, candidates, weights, scales,
                                          {name: seen[source] for name, source in sources.items()}))
            return local[name]
        return estimate

    sites = [Site(n.name, (True,), (3.0 * constant(gm, n.args[1]).numel(),), estimate=estimate_of(n.name))
             for n in candidates]

    def apply(trial: fx.GraphModule, choices: Mapping[str, object], whole: bool = False) -> fx.GraphModule:
        names = [n.name for n in candidates if n.name in choices]
        quantize(trial, names, committed(set(names)) if whole and committed else weights, scales)
        return trial

    running.append(BudgetedSearch(gm, ctx, sites, apply, options.budget, options.strategy,
                                  apply_whole=lambda trial, choices: apply(trial, choices, whole=True)))
    try:
        return running[0].run()
    finally:
        running.clear()


def observe_scales(options: Options, gm: fx.GraphModule, nodes: list[fx.Node],
                   ctx: PassContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-tensor activation scales over every observable batch, and over the fit batches
    only: max |x| (minmax) or its largest per-batch percentile, per Linear (siblings
    reading one input share its statistics); ``(scale, zero_point)`` from min and max when
    not symmetric. One observation of each batch serves both (the example's values come
    from the manager's reference run when it kept them)."""
    batches = ctx.observable_batches
    fit = fit_indices(ctx)  # positions in ctx.batches, the same in its observable prefix
    sources = {n.name: n.args[0] for n in nodes}
    known = known_values(ctx, gm)
    if not options.symmetric:
        seen = collect_activations(gm, set(sources.values()), batches,
                                   reduce=lambda v: (float(v.min()), float(v.max())), known=known)

        def asymmetric(indices: list[int]) -> dict[str, Any]:
            return {name: static_asymmetric_qparams(min(seen[source][i][0] for i in indices),
                                                    max(seen[source][i][1] for i in indices))
                    for name, source in sources.items()}
        return asymmetric(list(range(len(batches)))), asymmetric(fit)
    percentile = options.percentile if options.observer == "percentile" else None
    each = observe_each(gm, set(sources.values()), batches, percentile=percentile, known=known)

    def symmetric(indices: list[int]) -> dict[str, Any]:
        scales = {}
        for name, source in sources.items():
            stats = merge_stats(each[i].get(source, ActivationStats()) for i in indices)
            scales[name] = static_scale(stats.percentile if percentile is not None and stats.percentile is not None
                                        else stats.abs_max)
        return scales
    return symmetric(list(range(len(batches)))), symmetric(fit)


def budget_refusal(pick: Pick) -> Refusal:
    """Why the search left a layer float, with the measured error that decided it."""
    if pick.reason:  # the search's own account (a choice made block by block)
        return Refusal(OVER_BUDGET, pick.reason)
    limit = f"budget {pick.target:g}"
    if pick.split != "fit":
        limit = f"{pick.target:g} (half the budget: chosen again on every batch after the held-out check failed)"
    if pick.others == 0:
        return Refusal(OVER_BUDGET, f"quantizing this layer alone gives output error {pick.error:.3g} > {limit}")
    if pick.others_error is not None and pick.others_error <= pick.target:
        return Refusal(OVER_BUDGET, f"with {pick.others} other layer(s) quantized it raises the output error to "
                                    f"{pick.error:.3g} > {limit}")
    # The others were not measured within budget without it: name the combination, not a culprit.
    return Refusal(OVER_BUDGET, f"quantized together with {pick.others} other layer(s) (the smallest such "
                                f"combination measured) it gives output error {pick.error:.3g} > {limit}")
