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
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.cost import low_rank_break_even
from fxopt.ir import (
    LinearParts,
    call_nodes,
    insert_linear,
    linear_parts,
    ops,
    replace_node,
)
from fxopt.linalg import project, randomized_svd
from fxopt.lossy import BudgetedSearch, Pick, Site, check_search_options, first_passing
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import (
    NO_SAVING,
    OVER_BUDGET,
    constant_linear,
    floating_weight,
    large_enough,
    private_constant,
)

Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Choice = tuple[int, float | None, Refusal | None, Hashable]
EXACT_SVD_MAX_SIDE = 512  # a full float64 SVD of a 512 x 512 weight takes a fraction of a second


@dataclass(frozen=True)
class LowRank(Pass):
    name: ClassVar[str] = "low-rank"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("merge-siblings",)

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
        sites = [Site(parts.node.name, (), payload=parts, saving_of=_saving(parts)) for parts in layers]
        factors: dict[tuple[str, Hashable], Svd] = {}  # (site, SVD key) -> the factorization a level uses
        svds: dict[str, _Svds] = {}  # per site, kept across the search's rounds
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
                exact = self.svd == "exact" or (self.svd == "auto" and min(parts.weight.shape) <= EXACT_SVD_MAX_SIDE)
                svds[site.name] = _Svds(parts.weight, exact)
            rank, error, refusal, key = self._choose_rank(parts, svds[site.name], target, error_at)
            if refusal is not None:
                codes[refusal.detail] = refusal.code
                return Pick(None, error if error is not None else math.inf, target=target, reason=refusal.detail)
            return Pick((rank, key), error if error is not None else 0.0, target=target)

        outcome = BudgetedSearch(gm, ctx, sites, apply, self.budget, self.strategy, choose_level=choose).run()
        for site in sites:
            parts = site.payload
            if site.name in outcome.refused:
                result.skip(parts.node, _refusal(outcome.refused[site.name], codes))
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

    def _choose_rank(self, parts: LinearParts, svds: _Svds, target: float,
                     measure: Callable[[Svd, Hashable, int], float]) -> Choice:
        """The rank, the model's error with it and the key of the factors to use (a
        :class:`_Svds` sketch size, "exact" or "projection"), or a refusal to leave the layer."""
        break_even = low_rank_break_even(parts.in_features, parts.out_features)
        useful = [r for r in range(self.multiple, math.ceil(break_even), self.multiple) if r < break_even]
        top = useful[-1]
        exact = svds.exact
        projections: list[Svd] = []

        def key_of(svd: Svd) -> Hashable:
            """What identifies a factorization across calls: the sketch it comes from."""
            if any(svd is p for p in projections):
                return "projection"
            return "exact" if exact else svd[1].numel()

        def error_at(svd: Svd, rank: int) -> float:
            return measure(svd, key_of(svd), rank)

        def top_projection() -> tuple[Svd, float]:
            """A rank-``top`` factorization and the share of sum(S^2) it keeps (a lower bound)."""
            left, right, energy = project(svds.weight, top)
            projections.append((left, torch.ones(top, dtype=left.dtype), right))
            return projections[-1], energy / svds.total

        if self.ratio is not None or self.energy is not None:
            rank, how, svd = self._fixed_rank(svds, break_even, top, top_projection)
            if rank is None or rank >= break_even or svd is None:
                needed = f"rank {rank}" if rank is not None else f"a rank above {top}"
                return 0, None, Refusal(NO_SAVING, f"{needed} from {how} is not below the break-even rank "
                                                   f"{break_even:.1f}: no saving"), None
            if error_at(svd, rank) > target:
                return 0, error_at(svd, rank), Refusal(OVER_BUDGET, (
                    f"rank {rank} from {how} gives output error {error_at(svd, rank):.3g}, "
                    f"over this layer's share of the budget ({target:.3g})")), None
            return rank, error_at(svd, rank), None, key_of(svd)

        def within(svd: Svd) -> Callable[[int], bool]:
            return lambda r: error_at(svd, r) <= target

        def no_rank(svd: Svd, how: str = "") -> Choice:
            return 0, error_at(svd, top), Refusal(OVER_BUDGET, (
                f"no rank below the break-even rank {break_even:.1f} keeps the output error within "
                f"budget (rank {top}{how}: {error_at(svd, top):.3g} > {target:.3g})")), None

        sketch, top_checked = top if exact else min(_round_up(self.sketch_rank, self.multiple), top), False
        while True:
            svd = svds.top(sketch)
            rank = first_passing([r for r in useful if r <= sketch], within(svd))
            if rank is not None:
                return rank, error_at(svd, rank), None, key_of(svd)
            if sketch == top:
                return no_rank(svd, "" if exact else ", randomized SVD")
            guess = _extrapolated_rank(svd[1], error_at(svd, sketch), target)
            if guess > top and not top_checked:  # a flat spectrum: one measurement before any larger sketch
                top_checked, (projection, _) = True, top_projection()
                if not within(projection)(top):
                    return no_rank(projection, ", randomized projection")
            sketch = self._next_sketch(sketch, top, guess)

    def _fixed_rank(self, svds: _Svds, break_even: float, top: int,
                    top_projection: Callable[[], tuple[Svd, float]]) -> tuple[int | None, str, Svd | None]:
        """The rank ``ratio`` or ``energy`` asks for (None: above ``top``) and an SVD covering it."""
        most = min(svds.weight.shape)
        if self.ratio is not None:
            rank = min(_round_up(math.ceil(self.ratio * most), self.multiple), most)
            return rank, f"ratio={self.ratio}", svds.top(rank) if rank < break_even else None
        assert self.energy is not None
        how = f"energy={self.energy}"
        sketch, top_checked = most if svds.exact else min(_round_up(self.sketch_rank, self.multiple), top), False
        while True:
            svd = svds.top(sketch)
            kept = (svd[1].double().square().cumsum(0) / svds.total).tolist()
            needed = next((i + 1 for i, share in enumerate(kept) if share >= self.energy - 1e-12), None)
            if needed is not None or svds.exact:
                return min(_round_up(needed or len(kept), self.multiple), most), how, svd
            if sketch == top:
                return None, how, None
            guess = _extrapolated_rank(svd[1], math.sqrt(max(1 - kept[-1], 0.0)), math.sqrt(1 - self.energy))
            if guess > top and not top_checked:  # the kept share is a lower bound, so this may refuse early
                top_checked = True
                if top_projection()[1] < self.energy - 1e-12:
                    return None, how, None
            sketch = self._next_sketch(sketch, top, guess)

    def _next_sketch(self, sketch: int, top: int, guess: float) -> int:
        """Double the sketch, or grow it past the extrapolated rank when that is further and below
        ``top`` (a guess beyond ``top`` was just contradicted by the rank-``top`` projection)."""
        reach = _round_up(math.ceil(1.25 * guess), self.multiple) if guess < top else 0
        return min(top, max(2 * sketch, reach))


class _Svds:
    """Truncated SVDs of one weight, computed as far as asked: exact (float64, all triplets at
    once) or randomized (float32 or wider, the top ``rank`` triplets, recomputed when more are asked)."""

    def __init__(self, weight: torch.Tensor, exact: bool) -> None:
        self.exact = exact
        self.weight = weight.double() if exact else weight.to(torch.promote_types(weight.dtype, torch.float32))
        self.total = float(weight.double().square().sum())  # ||W||_F^2 = sum(S^2)
        self._svd: Svd | None = None

    def top(self, rank: int) -> Svd:
        if self._svd is None or (not self.exact and self._svd[1].numel() < rank):
            self._svd = (torch.linalg.svd(self.weight, full_matrices=False) if self.exact
                         else randomized_svd(self.weight, rank))
            if self.exact:
                self.total = float(self._svd[1].square().sum())
        return self._svd


def _extrapolated_rank(sigma: torch.Tensor, error: float, target: float) -> float:
    """The rank at which ``error`` (measured at rank ``len(sigma)``) would fall to ``target`` if the
    singular values kept decaying geometrically as over the sketch's second half and the error
    followed the first one dropped. Only a guess, to order the work: every rank is measured.
    """
    half = len(sigma) // 2
    if half == 0 or not 0 < target < error < math.inf:
        return math.inf
    decay = float(sigma[-1] / sigma[-1 - half]) if float(sigma[-1 - half]) > 0 else 0.0
    if not 0 < decay < 1:
        return math.inf if decay >= 1 else float(len(sigma))
    return len(sigma) + half * math.log(target / error) / math.log(decay)


def _saving(parts: LinearParts) -> Callable[[Hashable], float]:
    """Parameters saved by a level (rank, SVD key) of this layer."""
    return lambda level: parts.weight.numel() - level[0] * (parts.in_features + parts.out_features)  # type: ignore[index]


def _refusal(pick: Pick, codes: Mapping[str, str]) -> Refusal:
    """The skip of a layer the search left alone: ``no-saving`` when no rank below break-even
    exists, otherwise ``over-budget``."""
    reason = pick.reason or f"output error {pick.error:.3g} > {pick.target:.3g}"
    code = codes.get(pick.reason or "", OVER_BUDGET)
    if pick.split == "all":
        return Refusal(code, f"the rank chosen on half the batches failed on the held-out half; chosen again on "
                             f"every batch with half the budget: {reason}")
    return Refusal(code, reason)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def exact_svd(weight: torch.Tensor) -> Svd:
    """The float64 SVD ``_factor`` takes (for a layer factored at a given rank, outside a search)."""
    return _Svds(weight, exact=True).top(min(weight.shape))


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
