"""An example lowering plugin: Linear followed by ReLU runs as one fused kernel.

    relu(linear(x, W, b))  =>  fxopt_double_relu::linear_relu(x, W, b)
    if W is a constant and the ReLU is the Linear's only user

The kernel applies the ReLU in place on the GEMM's output (one pass over the result instead
of two, one buffer instead of two); in ONNX it is MatMul -> Add -> Relu, which ONNX Runtime
fuses into its own kernels. The same numbers either way, so the parity tolerance stays exact.
It is found through the ``fxopt.lowerings`` entry point in this package's pyproject.toml,
the path fxopt's built-in lowerings take.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import call_nodes, constant, is_op, ops
from fxopt.lowering import Lowering, LoweringResult, OnnxTranslations


@torch.library.custom_op("fxopt_double_relu::linear_relu", mutates_args=())
def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias).relu_()


@linear_relu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


linear_relu_op = torch.ops.fxopt_double_relu.linear_relu.default


def linear_relu_onnx(x: Any, weight: Any, bias: Any = None) -> Any:
    from onnxscript import opset20 as op

    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, bias)
    return op.Relu(y)


class LinearRelu(Lowering):
    """relu(linear(x, W, b)) -> one fused Linear+ReLU kernel."""

    name = "linear-relu"
    backends = ("eager", "onnx")
    devices = ("cpu", "cuda")
    before = ("int8-linear", "onednn-linear")  # lowerings that consume a bare Linear

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(self._linear(gm, relu) is not None for relu in call_nodes(gm, ops.relu))

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        result = LoweringResult()
        for relu in call_nodes(gm, ops.relu):
            linear = self._linear(gm, relu)
            if linear is None:
                continue
            x, weight, *rest = linear.args
            with gm.graph.inserting_before(relu):
                fused = gm.graph.call_function(linear_relu_op, (x, weight, rest[0] if rest else None))
            fused.meta.update(relu.meta)
            relu.replace_all_uses_with(fused)
            gm.graph.erase_node(relu)
            gm.graph.erase_node(linear)
            result.lowered += 1
        if result.lowered:
            gm.recompile()
            result.notes.append(f"{result.lowered} Linear+ReLU pair(s) run as one kernel")
        return result

    def onnx_translations(self) -> OnnxTranslations:
        return {linear_relu_op: linear_relu_onnx}

    @staticmethod
    def _linear(gm: fx.GraphModule, relu: fx.Node) -> fx.Node | None:
        linear = relu.args[0]
        if not is_op(linear, ops.linear) or linear.kwargs or len(linear.users) != 1:
            return None
        if constant(gm, linear.args[1]) is None:  # a QDQ Linear is another lowering's
            return None
        return linear
