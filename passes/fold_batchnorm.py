"""Fold inference BatchNorm into an adjacent Linear.

    batch_norm(linear(x, W, b))  =>  linear(x, W * s[:, None], (b - mean) * s + beta)
    linear(batch_norm(x), W, b)  =>  linear(x, W * s[None, :], W @ (beta - mean * s) + b)
    where s = gamma / sqrt(var + eps)   (gamma = 1, beta = 0 when affine=False; b = 0 when absent)

Constraints: bn_running_stats (training=False); bn_normalizes_features (BatchNorm normalizes
dim 1, a Linear mixes the last dim: the same only for 2-D ``(N, C)`` activations); the
Linear's output has no other user (sole_user); constant_linear, and constant statistics; no
other layer reads the Linear's weight (private_linear: a folded copy would be stored next to
it); finite (every folded weight). A BatchNorm next to no Linear: no-adjacent-linear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.fx as fx

from fxopt.ir import add_constant, arg, constant, is_op, linear_parts, ops, replace_node
from fxopt.rewrite import Match, Refusal, RefuseUnmatched, Rule, RulePass
from fxopt.rewrite.constraints import (
    bn_normalizes_features,
    bn_running_stats,
    constant_linear,
    constant_or_absent,
    finite,
    private_linear,
    sole_user,
)


@dataclass(eq=False)
class BatchNormBesideLinear(Match):
    linears: list[fx.Node]  # the Linear the BatchNorm follows, or every Linear it feeds
    after_linear: bool

    @cached_property
    def folded(self) -> list[tuple[fx.Node, torch.Tensor, torch.Tensor]]:
        gamma, beta, mean, var = (constant(self.gm, n).double() if n is not None else None for n in self.node.args[1:5])
        scale = torch.rsqrt(var + float(arg(self.node, 7, "eps", 1e-5))) * (gamma if gamma is not None else 1.0)
        shift = (beta if beta is not None else 0.0) - mean * scale
        out = []
        for p in (linear_parts(self.gm, linear) for linear in self.linears):
            # fp32 at least; float64 copies of large weights would double the pass's peak memory
            w = p.weight.to(torch.promote_types(p.weight.dtype, torch.float32))
            b = p.bias.double() if p.bias is not None else 0.0
            if self.after_linear:
                new_w, new_b = w * scale.to(w.dtype)[:, None], b * scale + shift
            else:
                new_w, new_b = w * scale.to(w.dtype)[None, :], (w @ shift.to(w.dtype)).double() + b
            out.append((p.node, new_w.to(p.weight.dtype), new_b.to(p.weight.dtype)))
        return out


class FoldIntoLinear(Rule[BatchNormBesideLinear]):
    anchor = ops.batch_norm

    def match(self, node: fx.Node, gm: fx.GraphModule) -> BatchNormBesideLinear | None:
        if is_op(node.args[0], ops.linear):
            return BatchNormBesideLinear(gm, node, [node.args[0]], after_linear=True)
        users = list(node.users)
        if users and all(is_op(u, ops.linear) and u.args[0] is node and node not in u.args[1:] for u in users):
            return BatchNormBesideLinear(gm, node, users, after_linear=False)
        return None

    def check(self, m: BatchNormBesideLinear) -> Refusal | None:
        return (bn_running_stats(m.node)
                or bn_normalizes_features(m.linears[0] if m.after_linear else m.node.args[0])
                or (sole_user(m.linears[0], m.node) if m.after_linear else None)
                or constant_linear(m.gm, *m.linears) or private_linear(m.gm, *m.linears)
                or constant_or_absent(m.gm, *m.node.args[1:5], what="BatchNorm parameters or running statistics")
                or finite(*(t for _, w, b in m.folded for t in (w, b)), what="the folded weights"))

    def rewrite(self, m: BatchNormBesideLinear) -> None:
        for linear, weight, bias in m.folded:
            hint = f"{arg(linear, 1, 'weight').target}_bnfold"
            x = linear.args[0] if m.after_linear else m.node.args[0]
            linear.args = (x, add_constant(m.gm, weight.contiguous(), hint),
                           add_constant(m.gm, bias.contiguous(), f"{hint}_bias"))
            linear.kwargs = {}
        if m.after_linear:
            replace_node(m.node, m.linears[0])
        else:
            m.gm.graph.erase_node(m.node)


@dataclass(frozen=True)
class FoldBatchNorm(RulePass):
    name: ClassVar[str] = "fold-batchnorm"
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ("remove-dropout",)

    def rules(self) -> Sequence[Rule[Any]]:
        return [FoldIntoLinear(), RefuseUnmatched(
            Refusal("no-adjacent-linear", "BatchNorm is not adjacent to a Linear it can fold into"), ops.batch_norm)]
