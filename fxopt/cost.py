"""Cost model: parameters, weight bytes and matmul FLOPs of a graph.

FLOPs count multiply-adds as two operations and cover the ops that dominate
fully connected models (linear, matmul, attention). Ops added by other parts of fxopt
(int8 kernels, say) declare their cost with :func:`register_flops`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.ir import constants, is_op, numel_hint, ops, shape_of, size_hint

FlopCounter = Callable[[fx.Node], int]
_FLOP_COUNTERS: dict[object, FlopCounter] = {}


def register_flops(op: object, counter: FlopCounter) -> None:
    """Declare how many FLOPs a call to ``op`` costs (from its node's shapes)."""
    _FLOP_COUNTERS[op] = counter


def linear_flops(node: fx.Node) -> int:
    out_shape, w_shape = shape_of(node), shape_of(node.args[1])
    if out_shape is None or w_shape is None:
        return 0
    rows = numel_hint(out_shape[:-1])
    return 2 * rows * size_hint(w_shape[0]) * size_hint(w_shape[-1])


def _matmul_flops(node: fx.Node) -> int:
    a, b, out = shape_of(node.args[0]), shape_of(node.args[1]), shape_of(node)
    if a is None or b is None or out is None or not a:
        return 0
    return 2 * numel_hint(out) * size_hint(a[-1])


def _addmm_flops(node: fx.Node) -> int:
    a, out = shape_of(node.args[1]), shape_of(node)
    if a is None or out is None:
        return 0
    return 2 * numel_hint(out) * size_hint(a[-1])


def _sdpa_flops(node: fx.Node) -> int:
    q, k = shape_of(node.args[0]), shape_of(node.args[1])
    if q is None or k is None:
        return 0
    # QK^T and attention @ V: two matmuls of [.., Lq, E] x [.., E, Lk]
    return 4 * numel_hint(q[:-1]) * size_hint(k[-2]) * size_hint(q[-1])


register_flops(ops.linear, linear_flops)
register_flops(ops.mm, _matmul_flops)
register_flops(ops.matmul, _matmul_flops)
register_flops(torch.ops.aten.bmm.default, _matmul_flops)
register_flops(ops.addmm, _addmm_flops)
register_flops(torch.ops.aten.scaled_dot_product_attention.default, _sdpa_flops)


@dataclass(frozen=True)
class Cost:
    params: int
    weight_bytes: int
    flops: int


def graph_cost(gm: fx.GraphModule) -> Cost:
    params = weight_bytes = 0
    for _, tensor in constants(gm):
        weight_bytes += tensor.numel() * tensor.element_size()
        if tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.uint8):
            params += tensor.numel()
    flops = 0
    for node in gm.graph.nodes:
        if node.op == "call_function":
            counter = _FLOP_COUNTERS.get(node.target)
            if counter is not None:
                flops += counter(node)
    return Cost(params, weight_bytes, flops)


def node_flops(node: fx.Node) -> int:
    counter = _FLOP_COUNTERS.get(node.target) if node.op == "call_function" else None
    return counter(node) if counter else 0


def is_costed(node: fx.Node) -> bool:
    return is_op(node, set(_FLOP_COUNTERS))
