"""The OpenVINO packed-Linear lowering: a Linear whose output is only split runs as one Linear per piece.

    split_with_sizes(linear(x, [W1; ...; Wn], [b1; ...; bn]), [o1, ..., on], -1)[i]
      =>  linear(x, Wi, bi)
    with an int8 weight dequantized per output channel sliced the same way:
    dequantize_per_channel([Q1; ...; Qn], [s1; ...; sn], axis 0)  =>  dequantize_per_channel(Qi, si)

The packed form is what merge-siblings writes for eager PyTorch, where one GEMM over the
shared input beats several. OpenVINO's CPU plugin runs the split along the last axis with a
reference kernel (7-10 ms a forward on BERT-4L at batch 8 x 128, one thread) and its int8
FullyConnected on a packed quantized weight through an older, slower path; one Linear per
piece is the form its own converter produces and the one it runs fastest. Each output
channel is computed from the same row of weights, scale and bias either way, so the pieces
are the same values (the backend's parity check confirms it on the example inputs).

Constraints: the Linear's only user is one ``split_with_sizes`` along its last dimension
whose users are all ``getitem``; the weight (or its int8 values and per-channel scales, with
no zero point) and bias are constants.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import add_constant, arg, constant, infer_val, is_op, ops
from fxopt.ir.qdq import qops
from fxopt.lowering.base import Lowering, LoweringResult


class OpenVinoSplitLinear(Lowering):
    """A packed Linear whose output is only split -> one Linear per piece, for OpenVINO."""

    name = "openvino-split-linear"
    backends = ("openvino",)
    devices = ("cpu",)
    before = ("openvino-int8",)  # which then sees each piece as a Linear of its own

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(_packed(gm, node) is not None for node in gm.graph.nodes)

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        result = LoweringResult()
        for node in list(gm.graph.nodes):
            packed = _packed(gm, node)
            if packed is None:
                continue
            split, sizes = packed
            _unpack(gm, node, split, sizes)
            result.lowered += 1
        if result.lowered:
            gm.graph.eliminate_dead_code()
            gm.recompile()
            result.notes.append(f"{result.lowered} packed Linears split back into one Linear per piece "
                                "(OpenVINO runs those faster than one Linear and a split)")
        return result


def _packed(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, list[int]] | None:
    """The split and its sizes when ``node`` is a Linear whose output is only split along its
    last dimension into pieces taken with getitem, over constant weights; else None."""
    if not is_op(node, ops.linear) or len(node.users) != 1:
        return None
    split = next(iter(node.users))
    if not is_op(split, ops.split_with_sizes) or split.args[0] is not node:
        return None
    value = node.meta.get("val")
    dim = arg(split, 2, "dim", 0)
    if not isinstance(value, torch.Tensor) or dim not in (-1, value.dim() - 1):
        return None
    if not all(user.op == "call_function" and user.target is operator.getitem for user in split.users):
        return None
    if _weight_parts(gm, node.args[1]) is None:
        return None
    bias = arg(node, 2, "bias", None)
    if bias is not None and constant(gm, bias) is None:
        return None
    return split, [int(size) for size in split.args[1]]


def _weight_parts(gm: fx.GraphModule, weight: Any) -> list[torch.Tensor] | None:
    """The constant tensors a weight is made of, all sliced along dim 0: the float weight,
    or the int8 values and per-channel scales of a weight dequantized per output channel."""
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        tensor = constant(gm, weight)
        return [tensor] if tensor is not None and tensor.dim() == 2 else None
    if not is_op(weight, qops.dequantize_per_channel):
        return None
    values, scales, zero_points, axis = (constant(gm, a) if isinstance(a, fx.Node) else a for a in weight.args[:4])
    if values is None or scales is None or zero_points is not None or axis != 0 or values.dim() != 2:
        return None
    return [values, scales]


def _unpack(gm: fx.GraphModule, linear: fx.Node, split: fx.Node, sizes: list[int]) -> None:
    graph = gm.graph
    weight = linear.args[1]
    parts = _weight_parts(gm, weight)
    assert parts is not None
    bias_node = arg(linear, 2, "bias", None)
    bias = constant(gm, bias_node) if bias_node is not None else None
    hint = str(parts[0].shape[0])
    pieces: list[fx.Node] = []
    start = 0
    with graph.inserting_before(split):
        for index, size in enumerate(sizes):
            rows = slice(start, start + size)
            start += size
            sliced = [add_constant(gm, part[rows].clone(), f"split_{hint}_{index}", before=split) for part in parts]
            if len(sliced) == 1:
                piece_weight = sliced[0]
            else:
                piece_weight = graph.call_function(weight.target, (sliced[0], sliced[1], *weight.args[2:]),
                                                   dict(weight.kwargs))
                infer_val(piece_weight)
            piece_bias = (add_constant(gm, bias[rows].clone(), f"split_{hint}_{index}_bias", before=split)
                          if bias is not None else None)
            piece = graph.call_function(ops.linear, (linear.args[0], piece_weight, piece_bias))
            infer_val(piece)
            pieces.append(piece)
    for user in list(split.users):
        user.replace_all_uses_with(pieces[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(split)
    graph.erase_node(linear)
