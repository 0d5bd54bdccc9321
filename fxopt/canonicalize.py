"""Canonicalization: one spelling per op, so each pass matches exactly one form.

    addmm(b, x, t(W))             =>  linear(x, W, b)
    mm(x, t(W))                   =>  linear(x, W)
    addmm(b, x, W')  (W' [in,out]) =>  linear(x, W'^T, b)       the GPT-2 Conv1D form
    matmul(x, W')    (W' [in,out]) =>  linear(x, W'^T)
    view(linear(view(x, [-1, in]), W, b), [*lead, out])  =>  linear(x, W, b)
                                     when lead is x's leading shape

Weights must be frozen constants; anything else is left as it is.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir import add_constant, cleanup, constant, is_op, ops, shape_of, val


def canonicalize(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place into canonical form; returns the number of rewrites."""
    rewrites = 0
    for node in list(gm.graph.nodes):
        if is_op(node, ops.addmm, ops.mm, ops.matmul):
            rewrites += _matmul_to_linear(gm, node)
    for node in list(gm.graph.nodes):
        if is_op(node, ops.linear):
            rewrites += _drop_flatten_around_linear(node)
    if rewrites:
        cleanup(gm)
    return rewrites


def _weight_out_in(gm: fx.GraphModule, node: fx.Node, rhs: fx.Node) -> fx.Node | None:
    """A constant node holding the ``[out, in]`` weight that ``x @ rhs`` multiplies by."""
    if is_op(rhs, ops.t) or (
        is_op(rhs, ops.transpose) and sorted(int(d) % 2 for d in rhs.args[1:3]) == [0, 1]
    ) or (is_op(rhs, ops.permute) and list(rhs.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])):
        source = rhs.args[0]
        weight = constant(gm, source)
        if weight is not None and weight.dim() == 2:
            return source
        return None
    weight = constant(gm, rhs)
    if weight is not None and weight.dim() == 2:
        return add_constant(gm, weight.t().contiguous(), f"{rhs.target}_t")
    return None


def _matmul_to_linear(gm: fx.GraphModule, node: fx.Node) -> int:
    if node.target == ops.addmm:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return 0
        bias, x, rhs = node.args[:3]
        bias_value = constant(gm, bias)
        if bias_value is None or bias_value.dim() != 1:
            return 0
    else:
        x, rhs = node.args[:2]
        bias = None
    x_val, rhs_val = val(x), val(rhs)
    if not isinstance(rhs_val, torch.Tensor) or rhs_val.dim() != 2:
        return 0
    if not isinstance(x_val, torch.Tensor) or x_val.dim() < (2 if node.target != ops.matmul else 1):
        return 0
    weight = _weight_out_in(gm, node, rhs)
    if weight is None:
        return 0
    with gm.graph.inserting_before(node):
        linear = gm.graph.call_function(ops.linear, (x, weight, bias) if bias is not None else (x, weight))
    linear.meta = dict(node.meta)
    node.replace_all_uses_with(linear)
    gm.graph.erase_node(node)
    return 1


def _drop_flatten_around_linear(linear: fx.Node) -> int:
    flat = linear.args[0]
    if not is_op(flat, ops.view, ops.reshape) or len(flat.users) != 1:
        return 0
    users = list(linear.users)
    if len(users) != 1 or not is_op(users[0], ops.view, ops.reshape):
        return 0
    unflat = users[0]
    x = flat.args[0]
    x_shape, flat_shape, out_shape = shape_of(x), shape_of(flat), shape_of(unflat)
    if x_shape is None or flat_shape is None or out_shape is None or len(flat_shape) != 2:
        return 0
    if len(x_shape) < 2 or flat_shape[-1] != x_shape[-1]:
        return 0
    if tuple(out_shape[:-1]) != tuple(x_shape[:-1]):
        return 0
    linear.replace_input_with(flat, x)
    linear.meta["val"] = val(unflat)
    unflat.replace_all_uses_with(linear)
    linear.graph.erase_node(unflat)
    return 1
