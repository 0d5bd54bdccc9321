"""Merge Linears that read the same input into one Linear whose output is split.

    linear(x, W1, b1), ..., linear(x, Wn, bn)
      =>  y = linear(x, [W1; ...; Wn], [b1; ...; bn]);  split_with_sizes(y, [o1, ..., on], -1)[i]

Constraints: at least ``min_group`` Linears read the same node ``x`` (any number of leading
dims; output widths may differ); their weights and biases are constants of one dtype and
device; a missing bias becomes a zero-filled one; a Linear whose weight or bias tensor is
also read elsewhere stays, since merging would copy that tensor and keep both. The weights
are concatenated once, at compile time. Cost model: FLOPs and weights are unchanged; the
input is read once instead of n times, in one GEMM instead of n.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.cost import linear_rows, linear_shape_bytes
from fxopt.ir import (
    LinearParts,
    call_nodes,
    constant_users,
    infer_val,
    insert_linear,
    is_op,
    linear_parts,
    ops,
    replace_node,
    topo_order,
)
from fxopt.pass_api import Pass, PassContext, PassResult


@dataclass(frozen=True)
class MergeSiblings(Pass):
    name: ClassVar[str] = "merge-siblings"
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ("merge-consecutive",)

    min_group: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_group < 2:
            raise ValueError(f"min_group must be at least 2, got {self.min_group}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        siblings: dict[fx.Node, list[fx.Node]] = {}
        for node in call_nodes(gm, ops.linear):
            siblings.setdefault(node.args[0], []).append(node)
        for linears in siblings.values():
            if len(linears) < 2:
                continue
            result.match()
            kinds: dict[tuple[torch.dtype, torch.device], list[LinearParts]] = {}
            for node in linears:
                parts = linear_parts(gm, node)
                reason = _member_reason(gm, parts)
                if parts is None or reason:
                    result.skip(node, reason or "not a Linear with constant weights")
                    continue
                kinds.setdefault((parts.weight.dtype, parts.weight.device), []).append(parts)
            for group in kinds.values():
                reason = self._group_reason(group, len(kinds))
                if reason:
                    for parts in group:
                        result.skip(parts.node, reason)
                    continue
                # the shared input, as it is now: merging an earlier group may have replaced it
                _merge(gm, group[0].node.args[0], group)
                result.apply()
                result.stats["linears_merged"] += len(group)
        return result

    def _group_reason(self, group: list[LinearParts], kinds: int) -> str | None:
        if len(group) < self.min_group:
            other = " with the same dtype and device" if kinds > 1 else ""
            return (f"only {len(group)} sibling Linear(s){other} can merge here "
                    f"(min_group={self.min_group})")
        rows = linear_rows(group[0].node)
        itemsize = group[0].weight.element_size()
        separate = sum(linear_shape_bytes(rows, p.in_features, p.out_features, p.bias is not None, itemsize)
                       for p in group)
        merged = linear_shape_bytes(rows, group[0].in_features, sum(p.out_features for p in group),
                                    any(p.bias is not None for p in group), itemsize)
        if merged > separate:
            return (f"merging would move more memory ({merged} bytes vs {separate}): the zero biases "
                    "it adds outweigh reading the input once")
        return None


def _member_reason(gm: fx.GraphModule, parts: LinearParts | None) -> str | None:
    if parts is None:
        return "weight or bias is not a constant"
    for what, const_node in (("weight", parts.weight_node), ("bias", parts.bias_node)):
        if const_node is None:
            continue
        others = [u.name for u in constant_users(gm, const_node) if u is not parts.node]
        if others:
            return (f"its {what} tensor is also used by {', '.join(sorted(others)[:3])}; merging "
                    f"would copy it and keep both")
    if parts.bias is not None and parts.bias.dtype != parts.weight.dtype:
        return "bias and weight have different dtypes"
    return None


def _merge(gm: fx.GraphModule, x: fx.Node, group: list[LinearParts]) -> None:
    order = {node: i for i, node in enumerate(topo_order([p.node for p in group]))}
    group = sorted(group, key=lambda p: order[p.node])
    first = group[0].node
    weight = torch.cat([p.weight for p in group], 0)
    bias = None
    if any(p.bias is not None for p in group):
        bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in group])
    names = [str(p.weight_node.target) for p in group]
    prefix = os.path.commonprefix(names).rstrip("_")
    hint = (prefix or "_".join(n.removesuffix("_weight") for n in names)) + "_merged"
    merged = insert_linear(gm, x, weight, bias, hint, before=first)
    # The merged Linear belongs to the modules its siblings share (q, k, v -> the attention).
    stacks = [p.node.meta.get("nn_module_stack") or {} for p in group]
    shared = {k: v for k, v in stacks[0].items() if all(st.get(k) == v for st in stacks[1:])}
    if shared:
        merged.meta["nn_module_stack"] = shared
    with gm.graph.inserting_before(first):
        split = gm.graph.call_function(ops.split_with_sizes, (merged, [p.out_features for p in group], -1))
        infer_val(split)
        pieces = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    for piece, parts in zip(pieces, group):
        infer_val(piece)
        replace_node(parts.node, piece)
        _keep_views_valid(piece)


def _keep_views_valid(piece: fx.Node) -> None:
    """A split output is a strided slice of the merged output: a ``view`` that needs the
    old contiguous layout becomes a ``reshape`` (same values, copies only when it must)."""
    for user in list(piece.users):
        if is_op(user, ops.view):
            try:
                infer_val(user)
            except Exception:
                user.target = ops.reshape
                infer_val(user)
