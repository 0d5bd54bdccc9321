"""Merge two Linears with nothing nonlinear between them into one.

    linear(linear(x, W1, b1), W2, b2)                    =>  linear(x, W2 @ W1, W2 @ b1 + b2)
    linear(view(linear(x, W1, b1), [*s, mid]), W2, b2)  =>  linear(view(x, [*s, in]), W2 @ W1, W2 @ b1 + b2)

Constraints: both weights (and biases, absent = 0) are finite constants of one dtype; a
view/reshape between them keeps the last dim (it only regroups rows); the intermediate has
no other user. Cost model: merge only when not more expensive, in*out <= in*mid + mid*out
(FLOPs per row, and weights), so a bottleneck (256 -> 8 -> 256) stays unless ``force=True``.
The merged weights are computed in float64 and cast back. Dropout between the two is
removed earlier in the pipeline by remove-dropout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.cost import linear_rows, linear_shape_flops
from fxopt.ir import (
    LinearParts,
    all_finite,
    call_nodes,
    infer_val,
    insert_linear,
    is_op,
    linear_parts,
    ops,
    replace_node,
    shape_of,
)
from fxopt.pass_api import Pass, PassContext, PassResult


@dataclass(frozen=True)
class MergeConsecutive(Pass):
    name: ClassVar[str] = "merge-consecutive"
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ("swap-activations", "swap-activations-lossy")

    force: bool = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        # Graph order: in a chain a -> b -> c, b absorbs a first, then c absorbs the merged b.
        for second in call_nodes(gm, ops.linear):
            between = second.args[0]
            view = between if is_op(between, ops.view, ops.reshape) else None
            first = view.args[0] if view is not None else between
            if not is_op(first, ops.linear):
                continue
            result.match()
            reason = self._merge(gm, first, view, second)
            if reason:
                result.skip(second, reason)
            else:
                result.apply()
        return result

    def _merge(self, gm: fx.GraphModule, first: fx.Node, view: fx.Node | None, second: fx.Node) -> str | None:
        p1, p2 = linear_parts(gm, first), linear_parts(gm, second)
        if p1 is None or p2 is None:
            return "a weight or bias is not a constant"
        if p1.weight.dtype != p2.weight.dtype:
            return f"the two Linears have different dtypes ({p1.weight.dtype}, {p2.weight.dtype})"
        for intermediate, expected in ((first, view or second), (view, second)):
            if intermediate is not None and list(intermediate.users) != [expected]:
                others = sorted(u.name for u in intermediate.users if u is not expected)
                return f"the intermediate {intermediate.name} is also used by {', '.join(others[:3])}"
        new_shape = None
        if view is not None:
            new_shape, reason = _view_shape(view, p1)
            if reason:
                return reason
        d_in, mid, d_out = p1.in_features, p1.out_features, p2.out_features
        rows = linear_rows(second)
        merged = linear_shape_flops(rows, d_in, d_out)
        separate = linear_shape_flops(rows, d_in, mid) + linear_shape_flops(rows, mid, d_out)
        if merged > separate and not self.force:
            return (f"bottleneck {d_in} -> {mid} -> {d_out}: one {d_in}x{d_out} Linear costs more "
                    f"({merged} FLOPs vs {separate}); set force=True to merge anyway")
        weight, bias = _merged_weights(p1, p2)
        if not all_finite(weight, bias):
            return "the weights are not finite; merging could move NaN/Inf"
        source = p1.input
        if view is not None:
            view.args = (p1.input, new_shape)
            try:
                infer_val(view)
            except Exception:  # x's strides do not allow a view; reshape gives the same values
                view.target = ops.reshape
                infer_val(view)
            source = view
        hint = f"{p2.weight_node.target}_merged"
        merged_node = insert_linear(gm, source, weight, bias, hint, before=second, like=second)
        replace_node(second, merged_node)
        gm.graph.erase_node(first)
        return None


def _view_shape(view: fx.Node, first: LinearParts) -> tuple[list[object] | None, str | None]:
    """The view's target shape with its last dim changed from ``mid`` to ``in``, or a reason."""
    before, after = shape_of(first.node), shape_of(view)
    if before is None or after is None or not after or after[-1] != before[-1]:
        return None, "the view between the Linears changes the last dim"
    shape = list(view.args[1])
    last = shape[-1]
    if last == -1:
        return shape, None
    if isinstance(last, int) and last == first.out_features:
        return shape[:-1] + [first.in_features], None
    return None, "the view's last dim is symbolic; cannot restate it for the merged input"


def _merged_weights(p1: LinearParts, p2: LinearParts) -> tuple[torch.Tensor, torch.Tensor | None]:
    w1, w2 = p1.weight.double(), p2.weight.double()
    bias = None
    if p1.bias is not None:
        bias = w2 @ p1.bias.double()
    if p2.bias is not None:
        bias = p2.bias.double() if bias is None else bias + p2.bias.double()
    dtype = p2.weight.dtype
    return (w2 @ w1).to(dtype), bias.to(dtype) if bias is not None else None
