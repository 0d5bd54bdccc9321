"""Remove the hidden units of a Linear -> activation -> Linear block that matter least (lossy).

    linear(f(linear(x, W1, b1)), W2, b2)
      =>  linear(f(linear(x, W1[K], b1[K])), W2[:, K], b2 + W2[:, D] @ mean(f(h_D)))
    K: the hidden units kept, D: the units dropped, f elementwise (relu, gelu, silu, ...)

Dropping unit j removes the term W2[:, j] * f(h_j) from the output. Units are scored on the
example and calibration batches by the size of that term once its mean is folded into b2:
std(f(h_j)) * ||W2[:, j]|| (with ``fold_mean=False``: rms(f(h_j)) * ||W2[:, j]||, b2 unchanged).
As many of the lowest-scoring units go as the block's share of ``budget`` allows (binary search
on the number kept, a multiple of ``multiple``, measured on the model's outputs); blocks go in
graph order, each measured with the earlier ones already pruned. Constraints: f is elementwise
(unit j's activation depends on h_j alone), both weights are constants, and neither
intermediate has other users. Cost model: every dropped unit saves in + out + 1 weights and
2 * (in + out) FLOPs per row, so any removal is cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.activations import FeatureStats, feature_statistics
from fxopt.budget import BudgetSplit, first_passing
from fxopt.ir import (
    call_nodes,
    constant_users,
    copy_graph_module,
    infer_val,
    insert_linear,
    is_op,
    linear_parts,
    ops,
    replace_node,
)
from fxopt.pass_api import Pass, PassContext, PassResult

ELEMENTWISE = frozenset({ops.relu, ops.gelu, ops.silu, ops.sigmoid, ops.tanh, ops.hardswish, ops.hardsigmoid})


@dataclass(frozen=True)
class PruneHidden(Pass):
    name: ClassVar[str] = "prune-hidden"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("low-rank",)

    budget: float = 0.01
    multiple: int = 8
    fold_mean: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0, got {self.budget}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        blocks: list[tuple[fx.Node, fx.Node, fx.Node]] = []
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
                blocks.append((first, act, second))
        shares = BudgetSplit(self.budget, len(blocks))
        pruned: dict[fx.Node, fx.Node] = {}  # a block's second Linear can be the next block's first
        for first, act, second in blocks:
            first = pruned.get(first, first)
            choice = self._choose(gm, ctx, first, act, second, shares.target())
            if isinstance(choice, str):
                shares.spend(None)
                result.skip(second, choice)
                continue
            keep, stats, error = choice
            shares.spend(error)
            p1, p2 = linear_parts(gm, first), linear_parts(gm, second)
            assert p1 is not None and p2 is not None
            hidden, kept = p1.out_features, len(keep)
            result.details.append({"block": f"{p1.name} -> {p2.name}", "hidden": hidden, "kept": kept,
                                   "params_saved": (hidden - kept) * (p1.in_features + 1 + p2.out_features),
                                   "error": error})
            pruned[second] = self._prune(gm, first, act, second, keep, stats)
            result.apply()
        return result

    def _choose(self, gm: fx.GraphModule, ctx: PassContext, first: fx.Node, act: fx.Node, second: fx.Node,
                target: float) -> tuple[torch.Tensor, FeatureStats, float] | str:
        """The units to keep (with the statistics and resulting error), or why none can go."""
        # Measured on the current graph, so earlier blocks' pruning is accounted for.
        stats = feature_statistics(gm, [act], ctx.batches)[act]
        order = self._ranking(gm, second, stats)
        hidden = len(order)
        sizes = list(range(self.multiple, hidden, self.multiple))
        errors: dict[int, float] = {}

        def error_with(kept: int) -> float:
            if kept not in errors:
                candidate = copy_graph_module(gm)
                by_name = {n.name: n for n in candidate.graph.nodes}
                self._prune(candidate, by_name[first.name], by_name[act.name], by_name[second.name],
                            order[:kept], stats)
                candidate.recompile()
                errors[kept] = ctx.output_error(candidate)
            return errors[kept]

        kept = first_passing(sizes, lambda k: error_with(k) <= target)
        if kept is not None:
            return order[:kept], stats, error_with(kept)
        if not sizes:
            return f"{hidden} hidden units leave nothing to drop at multiple={self.multiple}"
        return (f"every hidden unit matters: dropping the {hidden - sizes[-1]} least important of {hidden} "
                f"gives output error {error_with(sizes[-1]):.3g} > {target:.3g}")

    def _ranking(self, gm: fx.GraphModule, second: fx.Node, stats: FeatureStats) -> torch.Tensor:
        """Hidden units, most important first."""
        parts = linear_parts(gm, second)
        assert parts is not None
        spread = stats.centered_rms if self.fold_mean else stats.rms
        score = spread * parts.weight.double().norm(dim=0)
        return torch.argsort(score, descending=True, stable=True)

    def _prune(self, gm: fx.GraphModule, first: fx.Node, act: fx.Node, second: fx.Node,
               keep: torch.Tensor, stats: FeatureStats) -> fx.Node:
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
