"""Linear layers taken apart and built: the unit most passes rewrite."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.constants import add_constant, constant
from fxopt.ir.ops import arg, is_op, ops
from fxopt.ir.qdq import qops
from fxopt.ir.surgery import infer_val, module_path


@dataclass(frozen=True)
class LinearParts:
    """``linear(x, W, b)`` taken apart, when ``W`` (and ``b`` if present) are constants."""

    node: fx.Node
    input: fx.Node
    weight_node: fx.Node
    weight: torch.Tensor
    bias_node: fx.Node | None
    bias: torch.Tensor | None

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def name(self) -> str:
        """A readable name for reports: the source module's path when known."""
        return module_path(self.node) or self.node.name


def linear_parts(gm: fx.GraphModule, node: fx.Node) -> LinearParts | None:
    """The pieces of a ``linear`` node whose weight is a 2-D constant and whose bias is a
    constant or absent; None for anything else."""
    if not is_op(node, ops.linear) or not isinstance(node.args[0], fx.Node):
        return None
    weight_node = arg(node, 1, "weight")
    bias_node = arg(node, 2, "bias")
    weight = constant(gm, weight_node)
    if weight is None or weight.dim() != 2:
        return None
    bias = constant(gm, bias_node)
    if bias_node is not None and bias is None:
        return None
    return LinearParts(node, node.args[0], weight_node, weight, bias_node, bias)


@dataclass(frozen=True)
class LinearWeights:
    """A Linear over constant weight rows: ``[W]``, or ``[Wq, s]`` under a per-output-channel
    ``dequantize`` (quantize-int8's weights); ``weight`` is the Linear's weight argument (the
    ``get_attr`` of W, or the dequantize node) and ``part_nodes`` the ``get_attr`` of each part."""

    node: fx.Node
    weight: fx.Node
    parts: list[torch.Tensor]
    part_nodes: list[fx.Node]
    bias_node: fx.Node | None
    bias: torch.Tensor | None

    @property
    def out_features(self) -> int:
        return int(self.parts[0].shape[0])


def linear_weights(gm: fx.GraphModule, node: fx.Node) -> LinearWeights | None:
    """``node`` as a :class:`LinearWeights`, or None when its weight is neither form (or its
    bias is not a constant)."""
    if not is_op(node, ops.linear) or not isinstance(node.args[0], fx.Node):
        return None
    weight, bias_node = arg(node, 1, "weight"), arg(node, 2, "bias")
    parts = weight_parts(gm, weight)
    bias = constant(gm, bias_node)
    if parts is None or (bias_node is not None and bias is None):
        return None
    part_nodes = [weight] if weight.op == "get_attr" else list(weight.args[:2])
    return LinearWeights(node, weight, parts, part_nodes, bias_node, bias)


def constant_users(gm: fx.GraphModule, const_node: fx.Node) -> list[fx.Node]:
    """Every node reading the tensor behind ``const_node``, through any ``get_attr`` node
    (tied weights are one tensor registered under several names; rows of one memory that do
    not overlap, such as siblings' int8 weights held as a merged weight's rows, are not)."""
    tensor = constant(gm, const_node)
    if tensor is None:
        return []
    users: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            other = constant(gm, node)
            if other is not None and _overlap(other, tensor):
                users.extend(node.users)
    return users


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share memory (the elements each spans in its storage)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        start = t.storage_offset() * t.element_size()
        extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
        return start, start + (extent if t.numel() else 0) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


PROVENANCE_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def insert_linear(gm: fx.GraphModule, x: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None,
                  name_hint: str, *, before: fx.Node, like: fx.Node | None = None) -> fx.Node:
    """Add ``linear(x, weight, bias)`` before ``before``, with new constants and ``meta["val"]``.

    ``like``: the node this one stands for; its source module and stack trace are copied, so
    reports and later passes still name the layer (``module_path``).
    """
    w_node = add_constant(gm, weight.contiguous(), name_hint)
    args: tuple[Any, ...] = (x, w_node)
    if bias is not None:
        args += (add_constant(gm, bias.contiguous(), f"{name_hint}_bias"),)
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(ops.linear, args)
    if like is not None:
        node.meta.update({k: like.meta[k] for k in PROVENANCE_META if k in like.meta})
    infer_val(node)
    return node


@dataclass(frozen=True)
class PackedLinear:
    """A Linear whose output is only split along its last dimension into pieces taken with
    getitem (what merge-siblings writes), over constant weights sliced along dim 0: the float
    weight, or the int8 values and per-channel scales of a weight dequantized per output channel."""

    linear: fx.Node
    split: fx.Node
    sizes: list[int]
    weight_parts: list[torch.Tensor]
    bias: torch.Tensor | None


def packed_linear(gm: fx.GraphModule, node: fx.Node) -> PackedLinear | None:
    """``node`` as a :class:`PackedLinear`, or None when it is not one."""
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
    parts = weight_parts(gm, node.args[1])
    if parts is None:
        return None
    bias_node = arg(node, 2, "bias", None)
    bias = constant(gm, bias_node) if bias_node is not None else None
    if bias_node is not None and bias is None:
        return None
    return PackedLinear(node, split, [int(size) for size in split.args[1]], parts, bias)


def weight_parts(gm: fx.GraphModule, weight: Any) -> list[torch.Tensor] | None:
    """The constants a Linear's weight argument is made of, each with one row per output
    channel: ``[W]`` for a constant 2-D ``W``, ``[Wq, sw]`` for ``dequantize_per_channel(Wq,
    sw)`` over axis 0 without zero points; None for anything else."""
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        tensor = constant(gm, weight)
        return [tensor] if tensor is not None and tensor.dim() == 2 else None
    if not is_op(weight, qops.dequantize_per_channel):
        return None
    values, scales, zero_points, axis = (constant(gm, a) if isinstance(a, fx.Node) else a for a in weight.args[:4])
    if values is None or scales is None or zero_points is not None or axis != 0 or values.dim() != 2:
        return None
    return [values, scales]


def unpack_linear(gm: fx.GraphModule, packed: PackedLinear, *, share: bool = False) -> list[fx.Node]:
    """Replace ``packed`` by one Linear per piece, each over rows of the packed constants:
    the same values per output channel. ``share``: the pieces' constants are views of the
    packed ones (no new memory), else copies (a backend that takes ownership of each)."""
    graph, linear, split = gm.graph, packed.linear, packed.split
    weight = linear.args[1]
    hint = str(packed.weight_parts[0].shape[0])
    pieces: list[fx.Node] = []
    start = 0

    def rows_of(tensor: torch.Tensor, rows: slice) -> torch.Tensor:
        return tensor[rows] if share else tensor[rows].clone()

    with graph.inserting_before(split):
        for index, size in enumerate(packed.sizes):
            rows = slice(start, start + size)
            start += size
            sliced = [add_constant(gm, rows_of(part, rows), f"split_{hint}_{index}", before=split)
                      for part in packed.weight_parts]
            if len(sliced) == 1:
                piece_weight = sliced[0]
            else:
                piece_weight = graph.call_function(weight.target, (sliced[0], sliced[1], *weight.args[2:]),
                                                   dict(weight.kwargs))
                infer_val(piece_weight)
            piece_bias = (add_constant(gm, rows_of(packed.bias, rows), f"split_{hint}_{index}_bias", before=split)
                          if packed.bias is not None else None)
            piece = graph.call_function(ops.linear, (linear.args[0], piece_weight, piece_bias))
            piece.meta.update({k: linear.meta[k] for k in PROVENANCE_META if k in linear.meta})
            infer_val(piece)
            pieces.append(piece)
    for user in list(split.users):
        user.replace_all_uses_with(pieces[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(split)
    graph.erase_node(linear)
    return pieces
