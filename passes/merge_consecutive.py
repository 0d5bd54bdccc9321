"""Merge two Linears with nothing nonlinear between them into one.

    linear(linear(x, W1, b1), W2, b2)                    =>  linear(x, W2 @ W1, W2 @ b1 + b2)
    linear(view(linear(x, W1, b1), [*s, mid]), W2, b2)  =>  linear(reshape(x, [*s, in]), W2 @ W1, W2 @ b1 + b2)

Constraints: constant_linear, same_dtype, finite (merged weights, computed in float64); the
intermediate and the view have no other user (sole_user); neither Linear's weight or bias is
read elsewhere (private_linear: a tower applied twice would get two merged copies); the view
keeps the last dim (view-changes-last-dim), given as a number or -1 (symbolic-view-dim); it
moves to x as a reshape, since x may be non-contiguous at run time. Cost model (not_costlier):
in*out <= in*mid + mid*out, so a bottleneck 256 -> 8 -> 256 stays unless ``force=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.fx as fx

from fxopt.cost import linear_rows, linear_shape_flops
from fxopt.ir import infer_val, is_op, ops, replace_node, shape_of
from fxopt.ir.linear import LinearParts, insert_linear, linear_parts
from fxopt.rewrite import Match, Refusal, Rule, RulePass
from fxopt.rewrite.constraints import (
    constant_linear,
    finite,
    not_costlier,
    private_linear,
    same_dtype,
    sole_user,
)


@dataclass(eq=False)
class LinearPair(Match):
    first: fx.Node  # the Linear that ``node``, the second, reads (through ``view``, if any)
    view: fx.Node | None

    @cached_property
    def parts(self) -> tuple[LinearParts, LinearParts]:
        return linear_parts(self.gm, self.first), linear_parts(self.gm, self.node)  # type: ignore[return-value]

    @cached_property
    def merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        (p1, p2), dtype = self.parts, self.parts[1].weight.dtype
        w2 = p2.weight.double()
        biases = ([w2 @ p1.bias.double()] if p1.bias is not None else []) + ([p2.bias.double()] if p2.bias is not None else [])
        return (w2 @ p1.weight.double()).to(dtype), sum(biases).to(dtype) if biases else None


@dataclass(frozen=True)
class MergeLinearPair(Rule[LinearPair]):
    anchor = ops.linear
    force: bool = False

    def match(self, node: fx.Node, gm: fx.GraphModule) -> LinearPair | None:
        view = node.args[0] if is_op(node.args[0], ops.view, ops.reshape) else None
        first = view.args[0] if view is not None else node.args[0]
        return LinearPair(gm, node, first, view) if is_op(first, ops.linear) else None

    def check(self, m: LinearPair) -> Refusal | None:
        return (constant_linear(m.gm, m.first, m.node) or same_dtype(*(p.weight for p in m.parts))
                or sole_user(m.first, m.view or m.node) or sole_user(m.view, m.node)
                or private_linear(m.gm, m.first, m.node)
                or _view_keeps_last_dim(m) or self._cheaper(m) or finite(*m.merged))

    def _cheaper(self, m: LinearPair) -> Refusal | None:
        (p1, p2), rows = m.parts, linear_rows(m.node)
        d_in, mid, d_out = p1.in_features, p1.out_features, p2.out_features
        merged = linear_shape_flops(rows, d_in, d_out)
        separate = linear_shape_flops(rows, d_in, mid) + linear_shape_flops(rows, mid, d_out)
        return not_costlier(merged, separate, f"bottleneck {d_in} -> {mid} -> {d_out}: one {d_in}x{d_out} Linear "
                            f"costs more ({merged} FLOPs vs {separate}); set force=True to merge anyway",
                            force=self.force)

    def rewrite(self, m: LinearPair) -> None:
        (p1, p2), source = m.parts, m.parts[0].input
        if m.view is not None:  # the view moves onto x, as a reshape: x may be non-contiguous
            *rows, last = m.view.args[1]
            m.view.args, m.view.target = (source, [*rows, -1 if last == -1 else p1.in_features]), ops.reshape
            infer_val(m.view)
            source = m.view
        merged = insert_linear(m.gm, source, *m.merged, f"{p2.weight_node.target}_merged", before=m.node, like=m.node)
        replace_node(m.node, merged)
        m.gm.graph.erase_node(m.first)


def _view_keeps_last_dim(m: LinearPair) -> Refusal | None:
    if m.view is not None and shape_of(m.view)[-1] != shape_of(m.first)[-1]:  # type: ignore[index]
        return Refusal("view-changes-last-dim", "the view between the Linears changes the last dim")
    if m.view is not None and m.view.args[1][-1] not in (-1, m.parts[0].out_features):
        return Refusal("symbolic-view-dim", "the view's last dim is symbolic; cannot restate it for x")
    return None


@dataclass(frozen=True)
class MergeConsecutive(RulePass):
    name: ClassVar[str] = "merge-consecutive"
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ("swap-activations", "swap-activations-lossy")

    force: bool = False

    def rules(self) -> Sequence[Rule[Any]]:
        return [MergeLinearPair(force=self.force)]
