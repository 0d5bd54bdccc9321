"""Factor a Linear into two thinner Linears with a truncated SVD (lossy).

    linear(x, W, b)  =>  linear(linear(x, Vh[:r]), U[:, :r] * S[:r], b)     W ~ U diag(S) Vh

Rank r: ``ratio`` (r = ratio * min(in, out)) or ``energy`` (smallest r keeping that share
of sum(S^2)) when given; otherwise the smallest rank whose model output error stays within
the layer's share of ``budget`` (binary search over multiples of ``multiple``). Each layer is
a site of the budgeted search (fxopt.lossy), its levels the ranks: ``strategy="equal-share"``
(default) goes largest layer first, each measured on the whole model with the earlier ones
already factored; ``"sensitivity"`` factors first the layers that save most per unit of error.
The choice is made on one half of the batches (example inputs, 2nd calibration batch, ...)
and verified on the other; a choice over budget on the held-out half is tightened and searched
again, and both errors are in the details.
Constraints (refusal codes): the weight is a constant (``not-constant``), floating point
(``not-floating-point``), with at least ``min_params`` entries (``too-small``) and read by
this Linear alone (``shared-constant``); r rounded up to ``multiple`` is below the
break-even rank in*out/(in+out), where the two factors would cost as much as W
(``no-saving``); the model's error at r is within the layer's share of the budget
(``over-budget``).
SVD (``svd="auto"``): a full float64 SVD when min(in, out) <= 512; above, a seeded randomized
SVD of the top q triplets (fxopt.linalg), q = ``sketch_rank`` grown (doubled, or past the rank
extrapolated from the sketch's decay) while rank q is over the target. When the spectrum looks
too flat to fit below break-even, one projection at the largest useful rank is measured
first, and the layer is refused if even that is over the target. Every factorization is
measured on the model, so an approximate SVD can raise the rank or refuse, never exceed the
budget.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
from fxopt.passes._low_rank_search import Svd, Svds, choose_rank, saving, search_refusal, svds_of

from fxopt.cost import low_rank_break_even
from fxopt.ir import LinearParts, call_nodes, insert_linear, linear_parts, ops, replace_node
from fxopt.lossy import BudgetedSearch, Pick, Site, check_search_options
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import (
    NO_SAVING,
    constant_linear,
    floating_weight,
    large_enough,
    private_constant,
)


@dataclass(frozen=True)
class LowRank(Pass):
    name: ClassVar[str] = "low-rank"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("merge-consecutive",)

    budget: float = 0.01
    energy: float | None = None
    ratio: float | None = None
    multiple: int = 8
    min_params: int = 65536
    svd: str = "auto"
    sketch_rank: int = 256
    strategy: str = "equal-share"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_search_options(self)
        if self.energy is not None and self.ratio is not None:
            raise ValueError("give energy or ratio, not both")
        for option in ("energy", "ratio"):
            value = getattr(self, option)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{option} must be in (0, 1], got {value}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")
        if self.svd not in ("auto", "exact", "randomized"):
            raise ValueError(f"svd must be 'auto', 'exact' or 'randomized', got {self.svd!r}")
        if self.sketch_rank < 1:
            raise ValueError(f"sketch_rank must be >= 1, got {self.sketch_rank}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        layers: list[LinearParts] = []
        for node in call_nodes(gm, ops.linear):
            result.match()
            parts = linear_parts(gm, node)
            refusal = constant_linear(gm, node) or self._layer_refusal(gm, parts)
            if refusal is not None:
                result.skip(node, refusal)
            else:
                assert parts is not None
                layers.append(parts)
        layers.sort(key=lambda p: -p.weight.numel())
        sites = [Site(parts.node.name, (), payload=parts, saving_of=saving(parts)) for parts in layers]
        factors: dict[tuple[str, Hashable], Svd] = {}  # (site, SVD key) -> the factorization a level uses
        svds: dict[str, Svds] = {}  # per site, kept across the search's rounds
        codes: dict[str, str] = {}  # a refusal's detail (what a Pick carries) -> its code

        def apply(trial: fx.GraphModule, choices: Mapping[str, Hashable]) -> fx.GraphModule:
            nodes = {n.name: n for n in trial.graph.nodes}
            for name, level in choices.items():
                rank, key = level  # type: ignore[misc]
                parts = linear_parts(trial, nodes[name])
                assert parts is not None
                _factor(trial, parts, rank, factors[(name, key)])
            return trial

        def choose(search: BudgetedSearch, site: Site, target: float, base: Mapping[str, Hashable]) -> Pick:
            def error_at(svd: Svd, key: Hashable, rank: int) -> float:
                factors[(site.name, key)] = svd
                return search.error({**base, site.name: (rank, key)})

            parts = site.payload
            if site.name not in svds:
                svds[site.name] = svds_of(self, parts.weight)
            rank, error, refusal, key = choose_rank(self, parts, svds[site.name], target, error_at)
            if refusal is not None:
                codes[refusal.detail] = refusal.code
                return Pick(None, error if error is not None else math.inf, target=target, reason=refusal.detail)
            return Pick((rank, key), error if error is not None else 0.0, target=target)

        outcome = BudgetedSearch(gm, ctx, sites, apply, self.budget, self.strategy, choose_level=choose).run()
        for site in sites:
            parts = site.payload
            if site.name in outcome.refused:
                result.skip(parts.node, search_refusal(outcome.refused[site.name], codes))
                continue
            rank = outcome.choices[site.name][0]  # type: ignore[index]
            saved = parts.weight.numel() - rank * (parts.in_features + parts.out_features)
            result.details.append({"layer": parts.name, "shape": tuple(parts.weight.shape), "rank": rank,
                                   "params_saved": saved, "error": outcome.picks[site.name].error,
                                   **outcome.details_for(site.name)})
            result.apply()
        apply(gm, outcome.choices)
        return result

    def _layer_refusal(self, gm: fx.GraphModule, parts: LinearParts | None) -> Refusal | None:
        if parts is None:
            return None
        break_even = low_rank_break_even(parts.in_features, parts.out_features)
        no_saving = None
        if self.multiple >= break_even:
            no_saving = Refusal(NO_SAVING, f"even rank {self.multiple} (multiple={self.multiple}) is not below the "
                                           f"break-even rank {break_even:.1f}: no saving")
        return (floating_weight(parts.weight, f"weight is {parts.weight.dtype}, not floating point")
                or large_enough(parts.weight.numel(), self.min_params,
                                f"{parts.weight.numel()} weights, below the size threshold min_params={self.min_params}")
                or no_saving
                or private_constant(gm, parts.weight_node, parts.node))


def exact_svd(weight: torch.Tensor) -> Svd:
    """The float64 SVD ``_factor`` takes (for a layer factored at a given rank, outside a search)."""
    return Svds(weight, exact=True).top(min(weight.shape))


def factor_linear(gm: fx.GraphModule, node: fx.Node, rank: int, svd: Svd | None = None) -> None:
    """Replace the Linear ``node`` by its rank-``rank`` factorization (``svd`` of its weight,
    computed exactly when not given), as the pass does once it has chosen the rank."""
    parts = linear_parts(gm, node)
    assert parts is not None, f"{node.name} is not a Linear with constant weights"
    _factor(gm, parts, rank, svd if svd is not None else exact_svd(parts.weight))


def _factor(gm: fx.GraphModule, parts: LinearParts, rank: int, svd: Svd) -> None:
    u, s, vh = svd
    dtype = parts.weight.dtype
    hint = str(parts.weight_node.target)
    x = parts.node.args[0]  # current input: an earlier layer's rewrite may have replaced parts.input
    down = insert_linear(gm, x, vh[:rank].to(dtype), None, f"{hint}_lowrank_in", before=parts.node,
                         like=parts.node)
    up = insert_linear(gm, down, (u[:, :rank] * s[:rank]).to(dtype), parts.bias, f"{hint}_lowrank_out",
                       before=parts.node, like=parts.node)
    replace_node(parts.node, up)
