"""Factor a Linear into two thinner Linears with a truncated SVD (lossy).

    linear(x, W, b)  =>  linear(linear(x, Vh[:r]), U[:, :r] * S[:r], b)     W = U diag(S) Vh

Rank r: ``ratio`` (r = ratio * min(in, out)) or ``energy`` (smallest r keeping that share
of sum(S^2)) when given; otherwise the smallest rank whose model output error, measured on
the example and calibration batches, stays within the layer's share of ``budget`` (binary
search over multiples of ``multiple``). Layers go largest first, each measured on the whole
model with the earlier ones already factored, so the total stays within ``budget``.
Constraints: the weight is a floating-point constant with at least ``min_params`` entries;
r rounded up to ``multiple`` is below the break-even rank in*out/(in+out), where the two
factors would cost as much as W. The SVD runs in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.budget import BudgetSplit, first_passing
from fxopt.cost import low_rank_break_even
from fxopt.ir import (
    LinearParts,
    call_nodes,
    constant_users,
    copy_graph_module,
    insert_linear,
    linear_parts,
    ops,
    replace_node,
)
from fxopt.pass_api import Pass, PassContext, PassResult

Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LowRank(Pass):
    name: ClassVar[str] = "low-rank"
    exact: ClassVar[bool] = False
    default_order: ClassVar[int] = 60

    budget: float = 0.01
    energy: float | None = None
    ratio: float | None = None
    multiple: int = 8
    min_params: int = 65536

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0, got {self.budget}")
        if self.energy is not None and self.ratio is not None:
            raise ValueError("give energy or ratio, not both")
        for option in ("energy", "ratio"):
            value = getattr(self, option)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{option} must be in (0, 1], got {value}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        layers: list[LinearParts] = []
        for node in call_nodes(gm, ops.linear):
            result.match()
            parts = linear_parts(gm, node)
            reason = self._layer_reason(gm, parts)
            if parts is None or reason:
                result.skip(node, reason or "weight or bias is not a constant")
            else:
                layers.append(parts)
        layers.sort(key=lambda p: -p.weight.numel())
        shares = BudgetSplit(self.budget, len(layers))
        for parts in layers:
            svd = torch.linalg.svd(parts.weight.double(), full_matrices=False)
            rank, error, reason = self._choose_rank(gm, ctx, parts, shares.target(), svd)
            shares.spend(error if reason is None else None)
            if reason:
                result.skip(parts.node, reason)
                continue
            saved = parts.weight.numel() - rank * (parts.in_features + parts.out_features)
            result.details.append({"layer": parts.name, "shape": tuple(parts.weight.shape), "rank": rank,
                                   "params_saved": saved, "error": error})
            _factor(gm, parts, rank, svd)
            result.apply()
        return result

    def _layer_reason(self, gm: fx.GraphModule, parts: LinearParts | None) -> str | None:
        if parts is None:
            return None
        if not parts.weight.is_floating_point():
            return f"weight is {parts.weight.dtype}, not floating point"
        if parts.weight.numel() < self.min_params:
            return f"{parts.weight.numel()} weights, below the size threshold min_params={self.min_params}"
        break_even = low_rank_break_even(parts.in_features, parts.out_features)
        if self.multiple >= break_even:
            return (f"even rank {self.multiple} (multiple={self.multiple}) is not below the break-even rank "
                    f"{break_even:.1f}: no saving")
        others = [u.name for u in constant_users(gm, parts.weight_node) if u is not parts.node]
        if others:
            return (f"its weight tensor is also used by {', '.join(sorted(others)[:3])}; the factors "
                    "would be stored in addition to it")
        return None

    def _choose_rank(self, gm: fx.GraphModule, ctx: PassContext, parts: LinearParts,
                     target: float, svd: Svd) -> tuple[int, float | None, str | None]:
        """The rank to use and the model's error with it, or a reason to leave the layer."""
        break_even = low_rank_break_even(parts.in_features, parts.out_features)
        useful = [r for r in range(self.multiple, math.ceil(break_even), self.multiple) if r < break_even]
        errors: dict[int, float] = {}

        def error_at(rank: int) -> float:
            if rank not in errors:
                candidate = copy_graph_module(gm)
                node = next(n for n in candidate.graph.nodes if n.name == parts.node.name)
                candidate_parts = linear_parts(candidate, node)
                assert candidate_parts is not None
                _factor(candidate, candidate_parts, rank, svd)
                candidate.recompile()
                errors[rank] = ctx.output_error(candidate)
            return errors[rank]

        fixed = self._fixed_rank(parts, svd[1])
        if fixed is not None:
            rank, how = fixed
            if rank >= break_even:
                return 0, None, f"rank {rank} from {how} is not below the break-even rank {break_even:.1f}: no saving"
            if error_at(rank) > target:
                return 0, None, (f"rank {rank} from {how} gives output error {error_at(rank):.3g}, over this "
                                 f"layer's share of the budget ({target:.3g})")
            return rank, error_at(rank), None
        rank = first_passing(useful, lambda r: error_at(r) <= target)
        if rank is None:
            return 0, None, (f"no rank below the break-even rank {break_even:.1f} keeps the output error "
                             f"within budget (rank {useful[-1]}: {error_at(useful[-1]):.3g} > {target:.3g})")
        return rank, error_at(rank), None

    def _fixed_rank(self, parts: LinearParts, sigma: torch.Tensor) -> tuple[int, str] | None:
        if self.ratio is not None:
            rank, how = math.ceil(self.ratio * min(parts.weight.shape)), f"ratio={self.ratio}"
        elif self.energy is not None:
            share = (sigma.square().cumsum(0) / sigma.square().sum()).tolist()
            rank = next((i + 1 for i, s in enumerate(share) if s >= self.energy - 1e-12), len(share))
            how = f"energy={self.energy}"
        else:
            return None
        return min(_round_up(rank, self.multiple), min(parts.weight.shape)), how


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


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

