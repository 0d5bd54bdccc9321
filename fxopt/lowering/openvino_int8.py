"""The OpenVINO int8 lowering: QDQ Linears in the form OpenVINO runs on its int8 kernels.

    linear(dequantize_per_tensor(quantize_per_tensor(x, s)), dequantize_per_channel(Wq, sw), b)
      => unchanged: exported as QuantizeLinear/DequantizeLinear, which OpenVINO reads as
         FakeQuantize and runs as an int8 FullyConnected          (static activations)
    linear(dequantize(quantize(x, choose_qparams(x))), dequantize_per_channel(Wq, sw), b)
      => linear(x, dequantize_per_channel(Wq, sw), b)              (dynamic activations)
         with OpenVINO quantizing x itself at run time (DYNAMIC_QUANTIZATION_GROUP_SIZE)

ONNX has no per-token quantize op, and OpenVINO does not turn ``DynamicQuantizeLinear`` into
an int8 GEMM; it does quantize the activations of a Linear with int8 weights itself, in
groups along each token. The group is the largest size dividing every such Linear's input
width: OpenVINO's fast path needs the group to divide the width (a group wider than the
Linear, meant as "per token", ran at float speed on BERT), and a group is at least as fine
as the graph's per-token or per-tensor scale. :meth:`OpenVinoInt8.runtime_config` gives the
OpenVINO backend that setting for a lowered graph.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import constant, is_op
from fxopt.ir.ops import ops
from fxopt.ir.qdq import has_qdq_linear, match_qdq_linear, qops
from fxopt.lowering.base import Lowering, LoweringResult
from fxopt.quant import WEIGHT_QMAX


class OpenVinoInt8(Lowering):
    """QDQ Linears -> the form OpenVINO's CPU plugin runs in int8; see the module docstring."""

    name = "openvino-int8"
    backends = ("openvino",)
    devices = ("cpu",)
    # OpenVINO's int8 kernels and its own activation scales against the graph's emulated
    # int8: a value here and there rounds to the neighbouring step (a few 1e-3 on wide
    # layers; run-time groups ~2e-2 on BERT); a wrong scale is off by far more.
    parity_rtol = 0.05

    def applies(self, gm: fx.GraphModule) -> bool:
        return has_qdq_linear(gm)

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        result = LoweringResult()
        static = 0
        for node in list(gm.graph.nodes):
            match = match_qdq_linear(gm, node)
            if match is None:
                continue
            if match.input_scale is not None:
                static += 1
                continue
            node.replace_input_with(node.args[0], match.x)
            result.lowered += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
        if static:
            result.notes.append(f"{static} Linears with static activations run as OpenVINO int8 kernels "
                                "(QuantizeLinear/DequantizeLinear)")
        if result.lowered:
            result.notes.append(f"{result.lowered} Linears with dynamic activations keep their int8 weights; "
                                f"OpenVINO quantizes their activations at run time in groups of "
                                f"{_group(_weight_only_widths(gm))}")
        return result

    def runtime_config(self, gm: fx.GraphModule) -> dict[str, Any]:
        """OpenVINO's CPU plugin setting for a graph this lowering rewrote: run-time
        activation quantization for the Linears that kept int8 weights only (0: off)."""
        return {"DYNAMIC_QUANTIZATION_GROUP_SIZE": _group(_weight_only_widths(gm))}


def _weight_only_widths(gm: fx.GraphModule) -> list[int]:
    """The input widths of the Linears whose weights are int8 (dequantized per channel) and
    whose activations are not quantized in the graph."""
    widths = []
    for node in gm.graph.nodes:
        if not is_op(node, ops.linear) or len(node.args) < 2:
            continue
        weight, x = node.args[1], node.args[0]
        if not is_op(weight, qops.dequantize_per_channel) or weight.args[4:6] != (-WEIGHT_QMAX, WEIGHT_QMAX):
            continue
        if is_op(x, qops.dequantize_per_tensor, qops.dequantize_per_token, qops.dequantize_per_tensor_dynamic):
            continue
        qweight = constant(gm, weight.args[0])
        if qweight is not None and qweight.dim() == 2:
            widths.append(int(qweight.shape[1]))
    return widths


def _group(widths: list[int]) -> int:
    return math.gcd(*widths) if widths else 0
