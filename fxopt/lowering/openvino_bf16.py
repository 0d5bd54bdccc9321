"""Bfloat16 Linears for OpenVINO: the casts go, OpenVINO's bf16 inference precision runs them.

    to_f32(linear(to_bf16(x), W, b))       =>  linear(x, f32(W), f32(b))
    to_f32(act(linear(to_bf16(x), W, b)))  =>  act(linear(x, f32(W), f32(b)))
    W, b bfloat16 constants; f32(W) holds W's values exactly (every bfloat16 is a float32)

A graph that computes in bfloat16 (the ``cast-bf16`` pass) is compiled by OpenVINO with
``INFERENCE_PRECISION_HINT=bf16``: the CPU plugin then runs its GEMMs in bf16 by itself, from
the same bf16-rounded weights. The explicit Convert nodes around each Linear only split the
fusions it would make: BERT-4L at batch 8 x 128, one thread, an AMX Xeon, ran 99.5 ms with
them and 86-90 ms without. The backend's parity check (bf16's tolerance) and its error
measured against the model (:mod:`fxopt.backends.openvino`) cover what the plugin computes
differently from the graph.

Constraints: every bfloat16 value of the graph is a constant, a ``to_bf16`` of a float32
value, or a Linear or activation (relu, gelu, silu, sigmoid, tanh, hardswish, hardsigmoid) of
bfloat16 values, and every ``to_f32`` reads one of those; otherwise the graph is left as it is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import (
    add_constant,
    constant,
    dtype_of,
    infer_val,
    is_op,
    ops,
    remove_unused_constants,
)
from fxopt.lowering.base import Lowering, LoweringResult

to_copy = torch.ops.aten._to_copy.default
ACTIVATIONS = (ops.relu, ops.gelu, ops.silu, ops.sigmoid, ops.tanh, ops.hardswish, ops.hardsigmoid)


class OpenVinoBf16(Lowering):
    """Casts to and from bfloat16 around Linears -> float32 Linears of the same weights, run in
    bf16 by OpenVINO."""

    name = "openvino-bf16"
    backends = ("openvino",)
    devices = ("cpu",)
    before = ("openvino-split-linear",)

    def applies(self, gm: fx.GraphModule) -> bool:
        bf16 = [node for node in gm.graph.nodes if dtype_of(node) == torch.bfloat16]
        return bool(bf16) and all(_castable(gm, node) for node in bf16)

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        result = LoweringResult()
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and dtype_of(node) == torch.bfloat16:
                value = constant(gm, node)
                assert value is not None
                wide = add_constant(gm, value.float(), f"{node.target}_f32", before=node)
                node.replace_all_uses_with(wide)
                gm.graph.erase_node(node)
            elif is_op(node, to_copy) and set(node.kwargs) == {"dtype"}:
                source = node.args[0]
                if node.kwargs["dtype"] == torch.bfloat16 or dtype_of(source) == torch.float32:
                    node.replace_all_uses_with(source)
                    gm.graph.erase_node(node)
                    result.lowered += node.kwargs["dtype"] == torch.bfloat16
            elif dtype_of(node) == torch.bfloat16:
                infer_val(node)  # a Linear or activation: now of float32 values
        remove_unused_constants(gm)
        gm.recompile()
        result.notes.append(f"{result.lowered} bfloat16 casts left to OpenVINO's bf16 inference precision "
                            "(the Linears keep their bf16-rounded weights)")
        return result

    def runtime_config(self, gm: fx.GraphModule) -> dict[str, Any]:
        return {"INFERENCE_PRECISION_HINT": "bf16"}


def _castable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``, a bfloat16 value, is one this lowering turns into float32."""
    if node.op == "get_attr":
        return constant(gm, node) is not None
    if is_op(node, to_copy):
        return set(node.kwargs) == {"dtype"} and dtype_of(node.args[0]) == torch.float32
    if is_op(node, ops.linear, *ACTIVATIONS):
        return all(dtype_of(arg) == torch.bfloat16 for arg in node.args if isinstance(arg, fx.Node))
    return False
