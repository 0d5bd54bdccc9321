"""Merge Linears that read the same input into one Linear whose output is split.

    linear(x, W1, b1), ..., linear(x, Wn, bn)
      =>  y = linear(x, [W1; ...; Wn], [b1; ...; bn]);  split_with_sizes(y, [o1, ..., on], -1)[i]

A whole-graph pass (a group is all the Linears reading one node), checked with the same
constraints as the rules: each member is a constant_linear whose weight and bias are read
by it alone (private_linear: merging would copy a shared tensor and keep both) and of one
dtype (same_dtype); members are grouped by dtype and device, and a group merges when it has
at least ``min_group`` members (too-few-siblings). ``x`` may have any leading dims, output
widths may differ, a missing bias becomes zeros. Weights are concatenated at compile time.
A split piece that is a graph output (or a view of one) is copied to a contiguous tensor of
its own, as the model returned. Cost model (not_costlier): FLOPs and weights are unchanged;
the bytes moved must not grow (the input is read once instead of n times, in one GEMM).
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
    derived,
    infer_val,
    insert_linear,
    is_op,
    linear_parts,
    ops,
    replace_node,
    topo_order,
)
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import constant_linear, not_costlier, private_linear, same_dtype


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
        # matched and applied count sibling groups; every Linear left out is a skip
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
                refusal = constant_linear(gm, node) or private_linear(gm, node)
                parts = linear_parts(gm, node)
                refusal = refusal or same_dtype(parts.weight, parts.bias)  # type: ignore[union-attr]
                if refusal:
                    result.skip(node, refusal)
                    continue
                kinds.setdefault((parts.weight.dtype, parts.weight.device), []).append(parts)  # type: ignore[union-attr]
            for group in kinds.values():
                refusal = self._group_refusal(group, len(kinds))
                if refusal:
                    for parts in group:
                        result.skip(parts.node, refusal)
                    continue
                # the shared input, as it is now: merging an earlier group may have replaced it
                _merge(gm, group[0].node.args[0], group)
                result.apply()
                result.stats["linears_merged"] += len(group)
        return result

    def _group_refusal(self, group: list[LinearParts], kinds: int) -> Refusal | None:
        if len(group) < self.min_group:
            other = " with the same dtype and device" if kinds > 1 else ""
            return Refusal("too-few-siblings", f"only {len(group)} sibling Linear(s){other} can merge here "
                                               f"(min_group={self.min_group})")
        rows = linear_rows(group[0].node)
        itemsize = group[0].weight.element_size()
        separate = sum(linear_shape_bytes(rows, p.in_features, p.out_features, p.bias is not None, itemsize)
                       for p in group)
        merged = linear_shape_bytes(rows, group[0].in_features, sum(p.out_features for p in group),
                                    any(p.bias is not None for p in group), itemsize)
        return not_costlier(merged, separate, f"merging would move more memory ({merged} bytes vs {separate}): "
                            "the zero biases it adds outweigh reading the input once")


def _concatenated(group: list[LinearParts]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The siblings' weights (and biases, zeros where one has none) stacked: one copy per set of
    weights, shared by the graphs that share a model's weights (:mod:`fxopt.ir.derived`)."""
    weight = torch.cat([p.weight for p in group], 0)
    if all(p.bias is None for p in group):
        return weight, None
    return weight, torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in group])


def _merge(gm: fx.GraphModule, x: fx.Node, group: list[LinearParts]) -> None:
    order = {node: i for i, node in enumerate(topo_order([p.node for p in group]))}
    group = sorted(group, key=lambda p: order[p.node])
    first = group[0].node
    weight, bias = derived([*(p.weight for p in group), *(p.bias for p in group)], "merge-siblings",
                           lambda: _concatenated(group))
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
    _contiguous_outputs(gm, set(pieces))


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


def _contiguous_outputs(gm: fx.GraphModule, pieces: set[fx.Node]) -> None:
    """A graph output that is a split piece, or a view of one, is a strided window of the
    merged output where the model returned a tensor of its own: ``out.view(-1)`` would fail
    on it, and it would keep the whole merged buffer alive. Such an output gets a copy."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for value in output.all_input_nodes:
        source = value
        while is_op(source, ops.view, ops.reshape):
            source = source.args[0]
        if source in pieces:
            with gm.graph.inserting_before(output):
                copy = gm.graph.call_function(ops.clone, (value,), {"memory_format": torch.contiguous_format})
            infer_val(copy)
            output.replace_input_with(value, copy)
