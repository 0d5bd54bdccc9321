"""Quantize a transformer's residual stream to int8 around each LayerNorm, for OpenVINO's int8 LayerNorm.

    layer_norm(add(a, b), ...)  =>  layer_norm(dequantize(quantize(add(a, b), s)), ...)
    add(y, r)                   =>  add(dequantize(quantize(y, s_y)), r)
      where y = layer_norm(...) is read by int8 Linears as dequantize(quantize(y, t)): the
      residual reads that same int8 tensor, whose scale t widens to s_y
    s = max|x| / 127 over the calibration batches (static, per tensor, symmetric int8)

OpenVINO runs a LayerNorm that reads and writes int8 as one int8 kernel: BERT's residual sum
then enters its LayerNorm as int8, and the LayerNorm's output reaches the next Linears and the
next residual add as one int8 tensor, where without this pass it writes a float32 tensor and an
int8 copy of it (BERT-4L, one thread, AMX: 1.06-1.07x the OpenVINO int8 graph without it). The
Linears' input scale widens to the LayerNorm output's largest magnitude: a percentile scale
clips the outliers the residual carries (BERT-4L's output error 0.24 clipped, 0.044 widened).
Eager PyTorch and ONNX Runtime run the quantize/dequantize pairs as float emulation, slower:
this pass is opt-in, for the OpenVINO backend, after quantize-int8's static activations and
quantize-attention (the int8 preset's candidate for budgets of 7e-2 or more: see
docs/presets-and-kernels.md).

Constraints (refusal codes): the LayerNorm reads an add (others are not candidates) of
float32/float16/bfloat16 values (``unsupported-dtype``); only a symmetric int8 per-tensor
quantization of the output (quantize-int8's static one) is shared with the residual, others
leave the residual float; static scales need calibration batches (``needs-calibration``);
which LayerNorms are quantized is the budgeted search's choice (fxopt.lossy), each LayerNorm a
site: all at once if that fits ``budget``, else the ones that cost least error first
(``over-budget`` with the measured error for the rest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.ir import is_op, ops
from fxopt.ir.qdq import qops, static_qdq
from fxopt.lossy import check_search_options, search_switches, static_scales_of
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.quant import FLOAT_DTYPES
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import UNSUPPORTED_DTYPE, calibrated

LAYER_NORM = torch.ops.aten.layer_norm.default


@dataclass(frozen=True)
class QuantizeResidual(Pass):
    name: ClassVar[str] = "quantize-residual"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("quantize-int8", "quantize-attention")

    budget: float = 0.05
    strategy: str = "sensitivity"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_search_options(self)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        matches = (n for n in gm.graph.nodes if is_op(n, LAYER_NORM) and is_op(n.args[0], ops.add))
        candidates = result.admit(matches, _refusal)
        if not candidates:
            return result
        refusal = calibrated(ctx, "static residual scales")
        if refusal is not None:
            for node in candidates:
                result.skip(node, refusal)
            return result
        values = {node.args[0] for node in candidates} | {node for node in candidates if _shared_quantizations(node)}
        scales, fit_scales = static_scales_of(gm, ctx, values)
        search_switches(gm, ctx, result, candidates, lambda g, names: _quantize(g, names, scales), self.budget,
                        self.strategy, sites_noun="LayerNorm(s)", rewritten="quantized",
                        rewrite_trial=lambda g, names: _quantize(g, names, fit_scales))
        return result


def _refusal(node: fx.Node) -> Refusal | None:
    value = node.args[0].meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dtype not in FLOAT_DTYPES:
        dtype = getattr(value, "dtype", type(value).__name__)
        return Refusal(UNSUPPORTED_DTYPE, f"the residual sum '{node.args[0].name}' is {dtype}")
    return None


def _shared_quantizations(norm: fx.Node) -> list[fx.Node]:
    """The symmetric int8 per-tensor quantizations of the LayerNorm's output (its Linears'
    inputs), when the output feeds a residual add too: that add reads their int8 tensor."""
    if not any(is_op(user, ops.add) for user in norm.users):
        return []
    return [user for user in norm.users if is_op(user, qops.quantize_per_tensor) and isinstance(user.args[1], float)
            and user.args[2] == 0 and user.args[5] == torch.int8]


def _quantize(gm: fx.GraphModule, names: list[str], scales: dict[str, float]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in names:
        norm = nodes[name]
        total = norm.args[0]
        with gm.graph.inserting_before(norm):
            norm.args = (static_qdq(gm.graph, total, scales[total.name]), *norm.args[1:])
        quantizations = _shared_quantizations(norm)
        if not quantizations:
            continue
        widened = scales[norm.name]
        for quantize in quantizations:
            quantize.args = (norm, widened, *quantize.args[2:])
            for dequantize in list(quantize.users):
                dequantize.args = (quantize, widened, *dequantize.args[2:])
        shared = next((user for quantize in quantizations for user in quantize.users), None)
        if shared is None:
            continue
        for residual in [user for user in norm.users if is_op(user, ops.add)]:
            residual.args = tuple(shared if a is norm else a for a in residual.args)
    gm.recompile()
