"""Remove the hidden units of a Linear -> activation -> Linear block that matter least (lossy).

    linear(f(linear(x, W1, b1)), W2, b2)
      =>  linear(f(linear(x, W1[K], b1[K])), W2[:, K], b2 + W2[:, D] @ mean(f(h_D)))
    K: the hidden units kept, D: the units dropped, f elementwise (relu, gelu, silu, ...)

Dropping unit j removes the term W2[:, j] * f(h_j) from the output. Units are scored on the
example and calibration batches by the size of that term once its mean is folded into b2:
std(f(h_j)) * ||W2[:, j]|| (with ``fold_mean=False``: rms(f(h_j)) * ||W2[:, j]||, b2 unchanged).
Each block is a site of the budgeted search (fxopt.lossy): its levels are the numbers of units
kept, multiples of ``multiple``, fewest last. ``strategy="equal-share"`` (default): blocks in
graph order, as many of the lowest-scoring units go as the block's share of ``budget`` allows,
measured with the earlier blocks pruned; ``"sensitivity"``: the blocks that save most per unit
of error first. The choice is made on one half of the batches and verified on the other
(held-out) half; a choice over budget there is tightened and searched again, and both errors
are in the details. Constraints (refusal codes): f is elementwise (unit j's activation
depends on h_j alone; ``not-elementwise``), both weights are constants (``not-constant``) of
one floating-point dtype (``dtype-mismatch``, ``not-floating-point``) read by their Linear
alone (``shared-constant``), neither intermediate has other users (``shared-intermediate``),
the block has more than ``multiple`` hidden units (``too-small``), and dropping the
least important units keeps the error within the block's share (``over-budget``). Cost model: every dropped unit saves in + out + 1 weights and
2 * (in + out) FLOPs per row, so any removal is cheaper.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
from fxopt.passes._prune_hidden_search import Block, block_sites, budget_refusal

from fxopt.ir import (
    call_nodes,
    infer_val,
    insert_linear,
    is_op,
    linear_parts,
    ops,
    replace_node,
)
from fxopt.lossy import (
    ActivationStats,
    BudgetedSearch,
    Site,
    check_search_options,
    fit_batches,
    observe,
)
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import (
    NOT_ELEMENTWISE,
    SHARED_INTERMEDIATE,
    constant_linear,
    floating_weight,
    private_constant,
    same_dtype,
)

ELEMENTWISE = frozenset({ops.relu, ops.gelu, ops.silu, ops.sigmoid, ops.tanh, ops.hardswish, ops.hardsigmoid})


@dataclass(frozen=True)
class PruneHidden(Pass):
    name: ClassVar[str] = "prune-hidden"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("low-rank",)

    budget: float = 0.01
    multiple: int = 8
    fold_mean: bool = True
    strategy: str = "equal-share"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_search_options(self)
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        candidates: list[tuple[fx.Node, fx.Node, fx.Node]] = []
        for second in call_nodes(gm, ops.linear):
            act = second.args[0]
            if not is_op(act, ELEMENTWISE) or not is_op(act.args[0], ops.linear):
                continue
            first = act.args[0]
            result.match()
            refusal = _block_refusal(gm, first, act, second)
            if refusal is not None:
                result.skip(second, refusal)
            else:
                candidates.append((first, act, second))
        if not candidates:
            return result
        # One observation of every block's hidden values, on the batches the choice is fitted on
        # only: ranking units on the held-out batches too would make their check optimistic.
        stats = observe(gm, [act for _, act, _ in candidates], fit_batches(ctx), features=True)
        sites, too_small = block_sites(gm, candidates, stats, self.multiple, self.fold_mean)
        for node, refusal in too_small:
            result.skip(node, refusal)

        def apply(trial: fx.GraphModule, choices: Mapping[str, object]) -> fx.GraphModule:
            self._apply(trial, sites, choices, stats)
            return trial

        outcome = BudgetedSearch(gm, ctx, sites, apply, self.budget, self.strategy).run()
        for site in sites:
            block: Block = site.payload
            if site.name in outcome.refused:
                result.skip(block.second, budget_refusal(block, outcome.refused[site.name]))
                continue
            kept = int(outcome.choices[site.name])
            result.details.append({"block": site.name, "hidden": block.hidden, "kept": kept,
                                   "params_saved": (block.hidden - kept) * block.params_per_unit,
                                   "error": outcome.picks[site.name].error, **outcome.details_for(site.name)})
            result.apply()
        self._apply(gm, sites, outcome.choices, stats)
        return result

    def _apply(self, gm: fx.GraphModule, sites: list[Site], choices: Mapping[str, object],
               stats: dict[fx.Node, ActivationStats]) -> None:
        """Prune the chosen blocks of ``gm`` (the live graph or a trial copy), in graph order."""
        nodes = {n.name: n for n in gm.graph.nodes}
        stats_by_name = {node.name: s for node, s in stats.items()}
        replaced: dict[str, fx.Node] = {}  # a block's second Linear can be the next block's first
        for site in sites:
            if site.name not in choices:
                continue
            block: Block = site.payload
            first = replaced.get(block.first, nodes[block.first])
            kept = int(choices[site.name])  # type: ignore[call-overload]
            replaced[block.second] = prune_units(gm, first, nodes[block.act], nodes[block.second],
                                                 block.order[:kept], stats_by_name[block.act], self.fold_mean)[1]


def prunable_blocks(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """Every Linear -> elementwise activation -> Linear block the pass may prune
    (first, activation, second), in graph order."""
    blocks = []
    for second in call_nodes(gm, ops.linear):
        act = second.args[0]
        if is_op(act, ELEMENTWISE) and is_op(act.args[0], ops.linear):
            first = act.args[0]
            if _block_refusal(gm, first, act, second) is None and linear_parts(gm, first).out_features > 8:
                blocks.append((first, act, second))
    return blocks


def prune_units(gm: fx.GraphModule, first: fx.Node, act: fx.Node, second: fx.Node, keep: torch.Tensor,
                stats: ActivationStats, fold_mean: bool = True) -> tuple[fx.Node, fx.Node]:
    """Keep only the hidden units ``keep`` of one block (folding the mean of the dropped
    ones into the second bias with ``fold_mean``), as the pass does once it has chosen how
    many; returns the new first and second Linears."""
    p1, p2 = linear_parts(gm, first), linear_parts(gm, second)
    assert p1 is not None and p2 is not None
    keep = keep.sort().values
    bias2 = p2.bias
    if fold_mean:
        dropped = torch.ones(p2.in_features, dtype=torch.bool)
        dropped[keep] = False
        shift = p2.weight.double()[:, dropped] @ stats.mean[dropped]
        bias2 = (shift + (p2.bias.double() if p2.bias is not None else 0.0)).to(p2.weight.dtype)
    hint1, hint2 = str(p1.weight_node.target), str(p2.weight_node.target)
    bias1 = p1.bias[keep] if p1.bias is not None else None
    new_first = insert_linear(gm, p1.input, p1.weight[keep], bias1, f"{hint1}_pruned", before=first, like=first)
    act.replace_input_with(first, new_first)
    infer_val(act)
    new_second = insert_linear(gm, act, p2.weight[:, keep], bias2, f"{hint2}_pruned", before=second,
                               like=second)
    replace_node(second, new_second)
    gm.graph.erase_node(first)
    return new_first, new_second


def _block_refusal(gm: fx.GraphModule, first: fx.Node, act: fx.Node, second: fx.Node) -> Refusal | None:
    refusal = constant_linear(gm, first, second)
    if refusal is not None:
        return refusal
    p1, p2 = linear_parts(gm, first), linear_parts(gm, second)
    assert p1 is not None and p2 is not None
    refusal = (same_dtype(p1.weight, p2.weight)
               or floating_weight(p1.weight, "the two Linears' weights are not of one floating-point dtype")
               or private_constant(gm, p1.weight_node, first, f"{first.name} weight")
               or private_constant(gm, p2.weight_node, second, f"{second.name} weight"))
    if refusal is not None:
        return refusal
    for node, expected in ((first, act), (act, second)):
        if list(node.users) != [expected]:
            others = sorted(u.name for u in node.users if u is not expected)
            return Refusal(SHARED_INTERMEDIATE, f"the hidden values {node.name} are also used by {', '.join(others[:3])}")
    if act.args[1:] and any(isinstance(a, fx.Node) for a in act.args[1:]):
        return Refusal(NOT_ELEMENTWISE, "the activation takes tensor arguments besides the hidden values")
    return None
