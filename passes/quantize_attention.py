"""Quantize the query and key of scaled-dot-product attention to int8, for int8 attention kernels.

    scaled_dot_product_attention(q, k, v, ...)
      =>  scaled_dot_product_attention(dequantize(quantize(q, sq)), dequantize(quantize(k, sk)), v, ...)
    where s = max|x| / 127 over the calibration batches (static, per tensor, symmetric int8)

So that ``Q @ K^T`` can run as an int8 GEMM: OpenVINO's fused attention kernel reads the
quantized query and key as int8 (the scheme of its own post-training quantizer, which leaves
the value and the softmax output in float). Eager PyTorch and ONNX Runtime have no such
kernel and run the pattern as float emulation, slower than no quantization: this pass is
opt-in, for the OpenVINO backend (the int8 preset's OpenVINO candidate runs it after
quantize-int8).

Constraints (refusal codes): q and k are floating point (``not-floating-point``) of
float32/float16/bfloat16 (``unsupported-dtype``); static scales need calibration batches
(``needs-calibration``); which attentions are quantized is the budgeted search's choice
(fxopt.lossy), each attention a site: all at once if that fits ``budget``, else the ones
that cost least error first (``over-budget`` with the measured error for the rest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.ir import is_op
from fxopt.ir.qdq import static_qdq
from fxopt.lossy import check_search_options, search_switches, static_scales_of
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.quant import FLOAT_DTYPES
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import NOT_FLOATING_POINT, UNSUPPORTED_DTYPE, calibrated

SDPA = torch.ops.aten.scaled_dot_product_attention.default
QUANTIZED_INPUTS = (0, 1)  # query, key


@dataclass(frozen=True)
class QuantizeAttention(Pass):
    name: ClassVar[str] = "quantize-attention"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("quantize-int8",)

    budget: float = 0.05
    strategy: str = "sensitivity"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_search_options(self)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        candidates = result.admit((n for n in gm.graph.nodes if is_op(n, SDPA)), _refusal)
        if not candidates:
            return result
        refusal = calibrated(ctx, "static query and key scales")
        if refusal is not None:
            for node in candidates:
                result.skip(node, refusal)
            return result
        values = {node.args[i] for node in candidates for i in QUANTIZED_INPUTS}
        scales, fit_scales = static_scales_of(gm, ctx, values)
        search_switches(gm, ctx, result, candidates, lambda g, names: _quantize(g, names, scales), self.budget,
                        self.strategy, sites_noun="attention(s)", rewritten="quantized",
                        rewrite_trial=lambda g, names: _quantize(g, names, fit_scales))
        return result


def _refusal(node: fx.Node) -> Refusal | None:
    for index in QUANTIZED_INPUTS:
        value = node.args[index].meta.get("val") if isinstance(node.args[index], fx.Node) else None
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return Refusal(NOT_FLOATING_POINT, f"input {index} of '{node.name}' is not a floating-point tensor")
        if value.dtype not in FLOAT_DTYPES:
            return Refusal(UNSUPPORTED_DTYPE, f"input {index} of '{node.name}' is {value.dtype}")
    return None


def _quantize(gm: fx.GraphModule, names: list[str], scales: dict[str, float]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in names:
        attention = nodes[name]
        args = list(attention.args)
        for index in QUANTIZED_INPUTS:
            with gm.graph.inserting_before(attention):
                args[index] = static_qdq(gm.graph, args[index], scales[args[index].name])
        attention.args = tuple(args)
    gm.recompile()
