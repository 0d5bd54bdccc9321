"""prune-hidden's search description: its blocks as sites, their units ranked, its refusals.

Not a pass (a leading underscore): the helpers of :mod:`fxopt.passes.prune_hidden`. Each
Linear -> activation -> Linear block is a site of the budgeted search (:mod:`fxopt.lossy`);
its levels are the numbers of hidden units kept, multiples of ``multiple``, most kept first,
and the units go in the order :func:`unit_ranking` scores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.ir import linear_parts
from fxopt.lossy import ActivationStats, Pick, Site
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import OVER_BUDGET, large_enough


@dataclass(frozen=True)
class Block:
    first: str
    act: str
    second: str
    order: torch.Tensor  # hidden units, most important first
    hidden: int
    params_per_unit: int


def unit_ranking(second_weight: torch.Tensor, stats: ActivationStats, fold_mean: bool = True) -> torch.Tensor:
    """The hidden units of a block, most important first: by the size of the term each adds
    to the output once its mean is folded into the bias, std(f(h_j)) * ||W2[:, j]|| (rms
    instead of std without ``fold_mean``)."""
    spread = stats.centered_rms if fold_mean else stats.rms
    score = spread * second_weight.double().norm(dim=0)
    return torch.argsort(score, descending=True, stable=True)


def block_sites(gm: fx.GraphModule, candidates: list[tuple[fx.Node, fx.Node, fx.Node]],
                stats: dict[fx.Node, ActivationStats], multiple: int,
                fold_mean: bool) -> tuple[list[Site], list[tuple[fx.Node, Refusal]]]:
    """A site per block (its payload a :class:`Block`), and the blocks too small to prune
    with their refusal."""
    sites: list[Site] = []
    refused: list[tuple[fx.Node, Refusal]] = []
    for first, act, second in candidates:
        p1, p2 = linear_parts(gm, first), linear_parts(gm, second)
        assert p1 is not None and p2 is not None
        block = Block(first.name, act.name, second.name, unit_ranking(p2.weight, stats[act], fold_mean),
                      p1.out_features, p1.in_features + 1 + p2.out_features)
        kept = tuple(range(multiple, block.hidden, multiple))[::-1]  # most kept first
        too_small = large_enough(block.hidden, multiple + 1, f"{block.hidden} hidden units leave nothing "
                                                             f"to drop at multiple={multiple}")
        if too_small is not None:
            refused.append((second, too_small))
            continue
        sites.append(Site(f"{p1.name} -> {p2.name}", kept,
                          tuple((block.hidden - k) * block.params_per_unit for k in kept), block))
    return sites, refused


def budget_refusal(block: Block, pick: Pick) -> Refusal:
    """Why the search left a block whole, with the measured error that decided it."""
    dropped = block.hidden - int(pick.tried or block.hidden)  # type: ignore[call-overload]
    if pick.split == "all":
        return Refusal(OVER_BUDGET, (
            f"every hidden unit matters on held-out data: the count chosen on half the batches failed on the "
            f"other half, and on every batch dropping the {dropped} least important of {block.hidden} gives "
            f"output error {pick.error:.3g} > {pick.target:.3g} (half the budget)"))
    return Refusal(OVER_BUDGET, f"every hidden unit matters: dropping the {dropped} least important of "
                                f"{block.hidden} gives output error {pick.error:.3g} > {pick.target:.3g}")
