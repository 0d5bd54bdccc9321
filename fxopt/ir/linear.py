"""Linear layers taken apart and built: the unit most passes rewrite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.constants import add_constant, constant
from fxopt.ir.ops import arg, is_op, ops
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


def constant_users(gm: fx.GraphModule, const_node: fx.Node) -> list[fx.Node]:
    """Every node reading the tensor behind ``const_node``, through any ``get_attr`` node
    (tied weights are one tensor registered under several names)."""
    tensor = constant(gm, const_node)
    if tensor is None:
        return []
    users: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            other = constant(gm, node)
            if other is not None and other.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                users.extend(node.users)
    return users


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
