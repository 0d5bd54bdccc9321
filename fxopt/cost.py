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

from fxopt.ir import constants, numel_hint, ops, shape_of, size_hint

FlopCounter = Callable[[fx.Node], int]
_FLOP_COUNTERS: dict[object, FlopCounter] = {}


def register_flops(op: object, counter: FlopCounter) -> None:
    """Declare how many FLOPs a call to ``op`` costs (from its node's shapes)."""
    _FLOP_COUNTERS[op] = counter


def linear_shape_flops(rows: int, in_features: int, out_features: int) -> int:
    """FLOPs of a Linear ``in_features -> out_features`` applied to ``rows`` rows (bias ignored)."""
    return 2 * rows * in_features * out_features


def linear_shape_params(in_features: int, out_features: int, bias: bool = True) -> int:
    """Parameters of a Linear ``in_features -> out_features``."""
    return in_features * out_features + (out_features if bias else 0)


def linear_shape_bytes(rows: int, in_features: int, out_features: int, bias: bool, itemsize: int) -> int:
    """Memory traffic of one Linear call: read the input and the weights, write the output."""
    return itemsize * (rows * in_features + linear_shape_params(in_features, out_features, bias)
                       + rows * out_features)


def low_rank_break_even(in_features: int, out_features: int) -> float:
    """The rank at which ``Linear(in, r) -> Linear(r, out)`` has as many weights as ``Linear(in, out)``.

    A factorization saves parameters and FLOPs only for ranks strictly below it.
    """
    return in_features * out_features / (in_features + out_features)


def linear_rows(node: fx.Node) -> int:
    """How many rows a ``linear`` node multiplies: the product of its output's leading dims."""
    out_shape = shape_of(node)
    return numel_hint(out_shape[:-1]) if out_shape is not None else 0


def linear_flops(node: fx.Node) -> int:
    out_shape, w_shape = shape_of(node), shape_of(node.args[1])
    if out_shape is None or w_shape is None:
        return 0
    return linear_shape_flops(linear_rows(node), size_hint(w_shape[-1]), size_hint(w_shape[0]))


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


def used_constants(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The distinct constant tensors that some node of ``gm`` reads."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    tensors = []
    for name, tensor in constants(gm):
        if name not in read:
            continue
        key = (tensor.untyped_storage().data_ptr() or id(tensor), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        tensors.append(tensor)
    return tensors


@dataclass(frozen=True)
class Cost:
    params: int
    weight_bytes: int
    flops: int


def graph_cost(gm: fx.GraphModule) -> Cost:
    """Parameters and weight bytes of the distinct tensors the graph reads, and its FLOPs.

    A constant no node reads is not counted, and tied weights (one tensor under several
    names, e.g. T5's shared embedding) count once.
    """
    params = weight_bytes = 0
    for tensor in used_constants(gm):
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

