"""The QDQ vocabulary: int8 Linear layers in the PT2E representation, and their matcher.

The quantize-int8 pass writes each quantized Linear with ``torch.ops.quantized_decomposed``
ops, which every backend understands (:func:`insert_qdq` writes it)::

    dynamic activations (per token, symmetric):
        s, zp = choose_qparams_per_token(x, int8)
        x'    = dequantize_per_token(quantize_per_token(x, s, zp, -128, 127), s, zp, -128, 127)
    static activations (per tensor, symmetric, scale from calibration):
        x'    = dequantize_per_tensor(quantize_per_tensor(x, s, 0, -128, 127), s, 0, -128, 127)
    static asymmetric activations (per tensor, uint8, scale and zero point from calibration):
        x'    = dequantize_per_tensor(quantize_per_tensor(x, s, zp, 0, 255, uint8), s, zp, 0, 255, uint8)
    dynamic per-tensor activations (asymmetric uint8, ONNX's DynamicQuantizeLinear scheme):
        s, zp = choose_qparams.tensor(x, 0, 255, eps, uint8)
        x'    = dequantize_per_tensor.tensor(quantize_per_tensor.tensor(x, s, zp, 0, 255), s, zp, 0, 255)
    weights (per output channel, symmetric, quantized once):
        W'    = dequantize_per_channel(Wq, sw, None, 0, -127, 127)
    y = linear(x', W', b)

:func:`match_qdq_linear` recognizes that pattern (and nothing looser), so a lowering can
replace it with one kernel.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.fx as fx

from fxopt.ir.constants import constant
from fxopt.ir.ops import is_op, ops
from fxopt.quant import QMAX, QMIN, TENSOR_EPS, UQMAX, UQMIN, WEIGHT_QMAX

qd = torch.ops.quantized_decomposed


class qops:
    """The quantized_decomposed ops of the QDQ pattern (matched by identity, never by name)."""

    choose_per_token = qd.choose_qparams_per_token.default
    quantize_per_token = qd.quantize_per_token.default
    dequantize_per_token = qd.dequantize_per_token.default
    quantize_per_tensor = qd.quantize_per_tensor.default
    dequantize_per_tensor = qd.dequantize_per_tensor.default
    dequantize_per_channel = qd.dequantize_per_channel.default
    choose_per_tensor = qd.choose_qparams.tensor
    quantize_per_tensor_dynamic = qd.quantize_per_tensor.tensor
    dequantize_per_tensor_dynamic = qd.dequantize_per_tensor.tensor


@dataclass
class QdqLinear:
    """A matched ``linear(dequantize(quantize(x)), dequantize_per_channel(Wq), b)``."""

    linear: fx.Node
    x: fx.Node
    qweight: fx.Node
    weight_scale: fx.Node
    bias: fx.Node | None
    input_scale: float | None  # None: dynamic (per token, or per tensor when dynamic_tensor)
    dynamic_tensor: bool = False
    input_zero_point: int | None = None  # static uint8 activations' zero point (None: symmetric int8)


def match_qdq_linear(gm: fx.GraphModule, linear: fx.Node) -> QdqLinear | None:
    """The QDQ pattern ending in ``linear``, or None when ``linear`` is not one."""
    if not is_op(linear, ops.linear) or linear.kwargs:
        return None
    xdq, wdq = linear.args[0], linear.args[1]
    bias = linear.args[2] if len(linear.args) > 2 else None
    if not is_op(wdq, qops.dequantize_per_channel) or wdq.args[2:7] != (None, 0, -WEIGHT_QMAX, WEIGHT_QMAX, torch.int8):
        return None
    qweight, weight_scale = wdq.args[0], wdq.args[1]
    qw, ws = constant(gm, qweight), constant(gm, weight_scale)
    if qw is None or ws is None or qw.dtype != torch.int8 or qw.dim() != 2 or ws.dtype != torch.float32:
        return None
    if bias is not None and constant(gm, bias) is None:
        return None
    if is_op(xdq, qops.dequantize_per_tensor_dynamic):
        xq, scale, zero = xdq.args[:3]
        if xdq.args[3:6] != (UQMIN, UQMAX, torch.uint8) or not is_op(xq, qops.quantize_per_tensor_dynamic):
            return None
        x = xq.args[0]
        if xq.args[1:6] != (scale, zero, UQMIN, UQMAX, torch.uint8) or not qparams_of_one_node(scale, zero):
            return None
        if not is_op(scale.args[0], qops.choose_per_tensor) or scale.args[0].args[:3] != (x, UQMIN, UQMAX):
            return None
        return QdqLinear(linear, x, qweight, weight_scale, bias, None, dynamic_tensor=True)
    if is_op(xdq, qops.dequantize_per_token):
        xq, scale, zero = xdq.args[:3]
        if xdq.args[3:6] != (QMIN, QMAX, torch.int8) or not is_op(xq, qops.quantize_per_token):
            return None
        x = xq.args[0]
        if xq.args[1:6] != (scale, zero, QMIN, QMAX, torch.int8):
            return None
        if not qparams_of_one_node(scale, zero):
            return None
        qparams = scale.args[0]
        if not is_op(qparams, qops.choose_per_token) or qparams.args != (x, torch.int8):
            return None
        return QdqLinear(linear, x, qweight, weight_scale, bias, None)
    if is_op(xdq, qops.dequantize_per_tensor):
        xq = xdq.args[0]
        if not is_op(xq, qops.quantize_per_tensor):
            return None
        scale, zero = xq.args[1], xq.args[2]
        if xq.args[2:6] == (zero, UQMIN, UQMAX, torch.uint8) and isinstance(zero, int) \
                and xdq.args[1:6] == (scale, zero, UQMIN, UQMAX, torch.uint8) and UQMIN <= zero <= UQMAX:
            return QdqLinear(linear, xq.args[0], qweight, weight_scale, bias, float(scale), input_zero_point=zero)
        if xq.args[2:6] != (0, QMIN, QMAX, torch.int8) or xdq.args[1:6] != (scale, 0, QMIN, QMAX, torch.int8):
            return None
        return QdqLinear(linear, xq.args[0], qweight, weight_scale, bias, float(scale))
    return None


def qparams_of_one_node(scale: fx.Node, zero: fx.Node) -> bool:
    """``scale, zero = qparams[0], qparams[1]`` of one choose_qparams node."""
    return (scale.target is operator.getitem and zero.target is operator.getitem
            and scale.args[0] is zero.args[0] and (scale.args[1], zero.args[1]) == (0, 1))


def has_qdq_linear(gm: fx.GraphModule) -> bool:
    """Whether any Linear of ``gm`` is written in the QDQ pattern."""
    return any(match_qdq_linear(gm, n) is not None for n in gm.graph.nodes)


def static_qdq(graph: fx.Graph, value: fx.Node, scale: float, dtype: torch.dtype | None = None) -> fx.Node:
    """``dequantize_per_tensor(quantize_per_tensor(value, scale))``, symmetric int8, inserted
    at the graph's insertion point; returns the dequantized node, of ``dtype`` (default:
    ``value``'s)."""
    quantized = graph.call_function(qops.quantize_per_tensor, (value, scale, 0, QMIN, QMAX, torch.int8))
    return graph.call_function(qops.dequantize_per_tensor, (quantized, scale, 0, QMIN, QMAX, torch.int8),
                               {"out_dtype": dtype or value.meta["val"].dtype})


def insert_qdq(
    gm: fx.GraphModule,
    linear: fx.Node,
    qweight: fx.Node,
    weight_scale: fx.Node,
    input_scale: float | tuple[float, int] | None = None,
    dynamic_tensor: bool = False,
) -> None:
    """Rewrite ``linear(x, W, b)`` into the QDQ pattern (:mod:`fxopt.ir.qdq`) over the given
    int8 weight constants: activations per token (default), per tensor with ``input_scale``
    (symmetric int8; a ``(scale, zero_point)`` pair: uint8), or per tensor with a dynamic
    uint8 scale and zero point (``dynamic_tensor``)."""
    graph = gm.graph
    x = linear.args[0]
    dtype = linear.meta["val"].dtype
    with graph.inserting_before(linear):
        if dynamic_tensor:
            qparams = graph.call_function(qops.choose_per_tensor, (x, UQMIN, UQMAX, TENSOR_EPS, torch.uint8))
            scale = graph.call_function(operator.getitem, (qparams, 0))
            zero = graph.call_function(operator.getitem, (qparams, 1))
            xq = graph.call_function(qops.quantize_per_tensor_dynamic, (x, scale, zero, UQMIN, UQMAX, torch.uint8))
            xdq = graph.call_function(qops.dequantize_per_tensor_dynamic,
                                      (xq, scale, zero, UQMIN, UQMAX, torch.uint8), {"out_dtype": dtype})
        elif input_scale is None:
            qparams = graph.call_function(qops.choose_per_token, (x, torch.int8))
            scale = graph.call_function(operator.getitem, (qparams, 0))
            zero = graph.call_function(operator.getitem, (qparams, 1))
            xq = graph.call_function(qops.quantize_per_token, (x, scale, zero, QMIN, QMAX, torch.int8))
            xdq = graph.call_function(qops.dequantize_per_token,
                                      (xq, scale, zero, QMIN, QMAX, torch.int8, dtype))
        elif isinstance(input_scale, tuple):
            scale, zero = input_scale
            xq = graph.call_function(qops.quantize_per_tensor, (x, scale, zero, UQMIN, UQMAX, torch.uint8))
            xdq = graph.call_function(qops.dequantize_per_tensor, (xq, scale, zero, UQMIN, UQMAX, torch.uint8),
                                      {"out_dtype": dtype})
        else:
            xdq = static_qdq(graph, x, input_scale, dtype)
        wdq = graph.call_function(qops.dequantize_per_channel,
                                  (qweight, weight_scale, None, 0, -WEIGHT_QMAX, WEIGHT_QMAX, torch.int8),
                                  {"out_dtype": dtype})
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    linear.args = (xdq, wdq, bias)
    linear.kwargs = {}
