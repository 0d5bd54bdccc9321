"""The ONNX Runtime bias-GELU lowering: a Linear's bias and its exact GELU as ``fxopt::bias_gelu``.

    gelu(linear(x, W, b), approximate='none')  => bias_gelu(linear(x, W), b, 'none')   (com.microsoft.BiasGelu)

Only the exact (erf) GELU is lowered: FastGelu is the tanh approximation, so it never stands
in for it, and a tanh GELU (GPT-2's, after swap-activations) stays ONNX's own one-node
``Gelu(approximate='tanh')``. Constraints: the Linear feeds the GELU alone, its bias is a
constant 1-D tensor of the output's dtype (float32/float16).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir import arg, dtype_of, is_op, ops
from fxopt.kernels import ort_fused as kernels
from fxopt.lowering.base import Lowering, LoweringResult, OnnxTranslations
from fxopt.lowering.ort_skip_layer_norm import take_linear_bias


class OrtBiasGelu(Lowering):
    """Linear bias + exact GELU -> ONNX Runtime's BiasGelu, for the ONNX backend."""

    name = "ort-bias-gelu"
    backends = ("onnx",)
    onnx_domains = ("com.microsoft",)
    after = ("int8-linear",)  # which owns the quantized Linears and their biases

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(is_op(n, ops.gelu) and is_op(n.args[0], ops.linear) for n in gm.graph.nodes)

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        result = LoweringResult()
        for node in list(gm.graph.nodes):
            if not (is_op(node, ops.gelu) and is_op(node.args[0], ops.linear)):
                continue
            approximate = arg(node, 1, "approximate", "none")
            if dtype_of(node) not in (torch.float32, torch.float16) or approximate != "none":
                continue
            bare, bias = take_linear_bias(gm, node.args[0])
            if bias is None:
                continue
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(kernels.bias_gelu._opoverload, (bare, bias, approximate))
            fused.meta.update(node.meta)
            node.replace_all_uses_with(fused)
            gm.graph.erase_node(node)
            result.lowered += 1
        if result.lowered:
            gm.recompile()
            result.notes.append(f"{result.lowered} Linear bias + GELU run as com.microsoft.BiasGelu")
        return result

    def onnx_translations(self) -> OnnxTranslations:
        return {kernels.bias_gelu._opoverload: kernels.bias_gelu_onnx}
