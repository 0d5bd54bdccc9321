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
are in the details. Constraints: f is elementwise
(unit j's activation depends on h_j alone), both weights are constants, and neither
intermediate has other users. Cost model: every dropped unit saves in + out + 1 weights and
2 * (in + out) FLOPs per row, so any removal is cheaper.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.ir import (
    call_nodes,
    constant_users,
    infer_val,
    insert_linear,
    is_op,
    linear_parts,
    ops,
    replace_node,
)
from fxopt.lossy import (
    STRATEGIES,
    ActivationStats,
    BudgetedSearch,
    Pick,
    Site,
    fit_batches,
    observe,
)
from fxopt.pass_api import Pass, PassContext, PassResult

ELEMENTWISE = frozenset({ops.relu, ops.gelu, ops.silu, ops.sigmoid, ops.tanh, ops.hardswish, ops.hardsigmoid})


@dataclass(frozen=True)
class _Block:
    first: str
    act: str
    second: str
    order: torch.Tensor  # hidden units, most important first
    hidden: int
    params_per_unit: int


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
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0, got {self.budget}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        candidates: list[tuple[fx.Node, fx.Node, fx.Node]] = []
        for second in call_nodes(gm, ops.linear):
            act = second.args[0]
            if not is_op(act, ELEMENTWISE) or not is_op(act.args[0], ops.linear):
                continue
            first = act.args[0]
            result.match()
            reason = _block_reason(gm, first, act, second)
            if reason:
                result.skip(second, reason)
            else:
                candidates.append((first, act, second))
        if not candidates:
            return result
        # One observation of every block's hidden values, on the batches the choice is fitted on
        # only: ranking units on the held-out batches too would make their check optimistic.
        stats = observe(gm, [act for _, act, _ in candidates], fit_batches(ctx), features=True)
        sites: list[Site] = []
        for first, act, second in candidates:
            p1, p2 = linear_parts(gm, first), linear_parts(gm, second)
            assert p1 is not None and p2 is not None
            block = _Block(first.name, act.name, second.name, self._ranking(p2.weight, stats[act]),
                           p1.out_features, p1.in_features + 1 + p2.out_features)
            kept = tuple(range(self.multiple, block.hidden, self.multiple))[::-1]  # most kept first
            if not kept:
                result.skip(second, f"{block.hidden} hidden units leave nothing to drop at multiple={self.multiple}")
                continue
            sites.append(Site(f"{p1.name} -> {p2.name}", kept,
                              tuple((block.hidden - k) * block.params_per_unit for k in kept), block))

        def apply(trial: fx.GraphModule, choices: Mapping[str, object]) -> fx.GraphModule:
            self._apply(trial, sites, choices, stats)
            return trial

        outcome = BudgetedSearch(gm, ctx, sites, apply, self.budget, self.strategy).run()
        for site in sites:
            block: _Block = site.payload
            if site.name in outcome.refused:
                result.skip(block.second, _refusal(block, outcome.refused[site.name]))
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
            block: _Block = site.payload
            first = replaced.get(block.first, nodes[block.first])
            kept = int(choices[site.name])  # type: ignore[call-overload]
            replaced[block.second] = self._prune(gm, first, nodes[block.act], nodes[block.second],
                                                 block.order[:kept], stats_by_name[block.act])

    def _ranking(self, weight: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
        """Hidden units, most important first."""
        spread = stats.centered_rms if self.fold_mean else stats.rms
        score = spread * weight.double().norm(dim=0)
        return torch.argsort(score, descending=True, stable=True)

    def _prune(self, gm: fx.GraphModule, first: fx.Node, act: fx.Node, second: fx.Node,
               keep: torch.Tensor, stats: ActivationStats) -> fx.Node:
        """Keep only the hidden units ``keep``; returns the new second Linear."""
        p1, p2 = linear_parts(gm, first), linear_parts(gm, second)
        assert p1 is not None and p2 is not None
        keep = keep.sort().values
        bias2 = p2.bias
        if self.fold_mean:
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
        return new_second


def _refusal(block: _Block, pick: Pick) -> str:
    dropped = block.hidden - int(pick.tried or block.hidden)  # type: ignore[call-overload]
    if pick.split == "all":
        return (f"every hidden unit matters on held-out data: the count chosen on half the batches failed on the "
                f"other half, and on every batch dropping the {dropped} least important of {block.hidden} gives "
                f"output error {pick.error:.3g} > {pick.target:.3g} (half the budget)")
    return (f"every hidden unit matters: dropping the {dropped} least important of {block.hidden} "
            f"gives output error {pick.error:.3g} > {pick.target:.3g}")


def _block_reason(gm: fx.GraphModule, first: fx.Node, act: fx.Node, second: fx.Node) -> str | None:
    p1, p2 = linear_parts(gm, first), linear_parts(gm, second)
    if p1 is None or p2 is None:
        return "a weight or bias is not a constant"
    if p1.weight.dtype != p2.weight.dtype or not p1.weight.is_floating_point():
        return "the two Linears' weights are not of one floating-point dtype"
    for parts in (p1, p2):
        others = [u.name for u in constant_users(gm, parts.weight_node) if u is not parts.node]
        if others:
            return (f"the weight of {parts.node.name} is also used by {', '.join(sorted(others)[:3])}; "
                    "pruned copies would be stored in addition to it")
    for node, expected in ((first, act), (act, second)):
        if list(node.users) != [expected]:
            others = sorted(u.name for u in node.users if u is not expected)
            return f"the hidden values {node.name} are also used by {', '.join(others[:3])}"
    if act.args[1:] and any(isinstance(a, fx.Node) for a in act.args[1:]):
        return "the activation takes tensor arguments besides the hidden values"
    return None
