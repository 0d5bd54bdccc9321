"""Merge Linears that read the same input into one Linear whose output is split.

    linear(x, W1, b1), ..., linear(x, Wn, bn)
      =>  y = linear(x, [W1; ...; Wn], [b1; ...; bn]);  split_with_sizes(y, [o1, ..., on], -1)[i]
    linear(q(x), dq(Wq1, s1), b1), ..., linear(q(x), dq(Wqn, sn), bn)
      =>  y = linear(q(x), dq([Wq1; ...; Wqn], [s1; ...; sn]), [b1; ...; bn]);  split as above

The second form is the first after quantize-int8 (:mod:`fxopt.ir.qdq`): int8 weights per
output channel whose input is quantized alike (per token, per tensor at run time, or one static
scale and zero point); the input is then quantized once. Run after quantizing, the merge copies
int8 weights, never float ones; past the compile's memory bound float siblings, whose merged
weight is a copy of the model's, stay apart (copy-past-memory-bound).

A whole-graph pass (a group is all the Linears reading one node, the same way). Each member is
a constant_linear, or an int8 one whose constants its dequantize alone reads, whose weight and
bias it alone reads (private_linear: merging would copy a shared tensor and keep both), of one
dtype (same_dtype); members group by dtype and device, and a group of at least ``min_group``
merges (too-few-siblings). ``x`` may have any leading dims, output widths may differ, a missing
bias becomes zeros. Weights are concatenated at compile time. A split piece that is a graph
output (or a view of one) is copied to a contiguous tensor of its own, as the model returned.
Cost model (not_costlier): FLOPs and weights are unchanged; the bytes moved must not grow (the
input is read once instead of n times, in one GEMM).
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
    LinearWeights,
    add_constant,
    call_nodes,
    derived,
    infer_val,
    keep_pieces_valid,
    linear_weights,
    ops,
    replace_node,
    share_as,
    stacked,
    topo_order,
)
from fxopt.ir.qdq import match_qdq_linear
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import (
    NOT_CONSTANT,
    no_copy_past_memory_bound,
    not_costlier,
    private_constant,
    private_linear,
    same_dtype,
    sole_user,
)


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
        siblings: dict[object, list[fx.Node]] = {}
        large = ctx.evidence.past_memory_bound(gm)
        for node in call_nodes(gm, ops.linear):
            siblings.setdefault(_input_key(gm, node), []).append(node)
        for linears in siblings.values():
            if len(linears) < 2:
                continue
            result.match()
            kinds: dict[tuple[object, ...], list[LinearWeights]] = {}
            for node in linears:
                member = _sibling(gm, node)
                if isinstance(member, Refusal):
                    result.skip(node, member)
                    continue
                # an int8 weight's dequantize (range, output dtype) is the merged one's: one kind each
                form = () if member.weight.op == "get_attr" else (
                    member.weight.target, member.weight.args[2:], tuple(sorted(member.weight.kwargs.items())))
                kinds.setdefault((member.parts[0].dtype, member.parts[0].device, form), []).append(member)
            for group in kinds.values():
                refusal = self._group_refusal(group, len(kinds), large)
                if refusal:
                    for member in group:
                        result.skip(member.node, refusal)
                    continue
                _merge(gm, group)
                result.apply()
                result.stats["linears_merged"] += len(group)
        return result

    def _group_refusal(self, group: list[LinearWeights], kinds: int, large: bool) -> Refusal | None:
        if len(group) < self.min_group:
            other = " with the same dtype and device" if kinds > 1 else ""
            return Refusal("too-few-siblings", f"only {len(group)} sibling Linear(s){other} can merge here "
                                               f"(min_group={self.min_group})")
        rows = linear_rows(group[0].node)
        in_features, itemsize = int(group[0].parts[0].shape[1]), group[0].parts[0].element_size()
        separate = sum(linear_shape_bytes(rows, in_features, m.out_features, m.bias is not None, itemsize)
                       for m in group)
        merged = linear_shape_bytes(rows, in_features, sum(m.out_features for m in group),
                                    any(m.bias is not None for m in group), itemsize)
        copied = 0 if len(group[0].parts) > 1 else sum(m.parts[0].nbytes for m in group)  # int8: one tensor already
        return not_costlier(merged, separate, f"merging would move more memory ({merged} bytes vs {separate}): "
                            "the zero biases it adds outweigh reading the input once") or \
            no_copy_past_memory_bound(copied, large, "merging float siblings")


def _input_key(gm: fx.GraphModule, node: fx.Node) -> object:
    """What a Linear reads: its input node, or for an int8 one (quantize-int8's pattern) the
    float input and how it is quantized, so that siblings quantizing one input alike group."""
    qdq = match_qdq_linear(gm, node)
    if qdq is None:
        return node.args[0]
    return ("int8", qdq.x, qdq.input_scale, qdq.input_zero_point, qdq.dynamic_tensor)


def _sibling(gm: fx.GraphModule, node: fx.Node) -> LinearWeights | Refusal:
    """``node``'s weights, or why it cannot be a member of a group."""
    member = linear_weights(gm, node)
    if member is None:
        return Refusal(NOT_CONSTANT, f"the weight or bias of {node.name} is not a constant")
    if member.weight.op == "get_attr":
        refusal = private_linear(gm, node) or same_dtype(member.parts[0], member.bias)
    else:
        refusal = (private_constant(gm, member.part_nodes[0], member.weight, "int8 weight")
                   or private_constant(gm, member.part_nodes[1], member.weight, "weight scale")
                   or sole_user(member.weight, node) or private_constant(gm, member.bias_node, node, "bias"))
    return refusal or member


def _concatenated(group: list[LinearWeights]) -> tuple[torch.Tensor | None, ...]:
    """The siblings' weight constants (and biases, zeros where one has none) stacked: one copy
    per set of weights, shared by the graphs that share a model's weights (:mod:`fxopt.ir.derived`)."""
    parts = [stacked([m.parts[i] for m in group]) for i in range(len(group[0].parts))]
    if all(m.bias is None for m in group):
        return (*parts, None)
    like = group[0].bias if group[0].bias is not None else next(m.bias for m in group if m.bias is not None)
    return (*parts, torch.cat([m.bias if m.bias is not None else like.new_zeros(m.out_features) for m in group]))


def _merge(gm: fx.GraphModule, group: list[LinearWeights]) -> None:
    order = {node: i for i, node in enumerate(topo_order([m.node for m in group]))}
    group = sorted(group, key=lambda m: order[m.node])
    first, graph = group[0].node, gm.graph
    *parts, bias = derived([*(p for m in group for p in m.parts), *(m.bias for m in group)], "merge-siblings",
                           lambda: _concatenated(group))
    # Each sibling's quantized rows are held in the merged weight now: quantizing or merging the
    # same weights again (another candidate) finds those rows instead of copying the weights.
    row = 0
    for member in group:
        for made, merged in zip(member.parts, parts):
            share_as(made, merged[row:row + member.out_features])
        row += member.out_features
    names = [str(m.part_nodes[0].target) for m in group]
    prefix = os.path.commonprefix(names).rstrip("_")
    hint = (prefix or "_".join(n.removesuffix("_weight") for n in names)) + "_merged"
    constants = [add_constant(gm, part.contiguous(), hint if i == 0 else f"{hint}_{i}") for i, part in enumerate(parts)]
    with graph.inserting_before(first):
        weight = constants[0]
        if len(constants) > 1:  # the int8 form: the first sibling's dequantize over the stacked constants
            template = group[0].weight
            weight = graph.call_function(template.target, (*constants, *template.args[2:]), dict(template.kwargs))
            infer_val(weight)
        # the shared input, as it is now (merging an earlier group may have replaced it); an int8
        # group reads the first sibling's quantized input, the others' quantize nodes go
        args = (first.args[0], weight) if bias is None else (first.args[0], weight, add_constant(
            gm, bias.contiguous(), f"{hint}_bias"))
        merged = graph.call_function(ops.linear, args)
    infer_val(merged)
    # The merged Linear belongs to the modules its siblings share (q, k, v -> the attention).
    stacks = [m.node.meta.get("nn_module_stack") or {} for m in group]
    if shared := {k: v for k, v in stacks[0].items() if all(st.get(k) == v for st in stacks[1:])}:
        merged.meta["nn_module_stack"] = shared
    with graph.inserting_before(first):
        split = graph.call_function(ops.split_with_sizes, (merged, [m.out_features for m in group], -1))
        infer_val(split)
        pieces = [graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    for piece, member in zip(pieces, group):
        infer_val(piece)
        replace_node(member.node, piece)
    keep_pieces_valid(gm, pieces)

