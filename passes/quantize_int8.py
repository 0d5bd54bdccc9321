"""Quantize Linear layers to int8: per-channel weights, dynamic (or calibrated) activations.

    linear(x, W, b)  =>  linear(dequantize(quantize(x)), dequantize_per_channel(Wq, sw), b)
    where Wq = round(W / sw) in [-127, 127], sw = max|W[o, :]| / 127   (quantized once, here)
    and x is quantized per token at run time (activations="dynamic"), per tensor to uint8 with
    a scale and zero point chosen at run time (activations="dynamic-tensor", ONNX's
    DynamicQuantizeLinear scheme; fused kernels run it), both (activations="auto", the default:
    per tensor, and per token on the layers where per tensor breaks the budget), or per tensor with a scale observed on the calibration
    batches (activations="static", observer minmax|percentile; symmetric=False: uint8 with a
    calibrated zero point too, from the observed min and max)

Constraints (refusal codes): the layer is not left out by ``skip_first``, ``skip_last``,
``include`` or ``exclude`` (``excluded``); W is a constant 2-D matrix (``not-constant``) of
float32/float16/bfloat16 (``unsupported-dtype``) with finite values (``not-finite``); x is
floating point (``not-floating-point``); W has at least ``min_params`` entries and in and out
features are at least 16 (below that quantizing x costs more than the int8 GEMM saves,
unless force=True) (``too-small``); static activations need calibration batches
(``needs-calibration``); the search keeps the error within budget (``over-budget``). Which
layers to quantize is the budgeted search's (fxopt.lossy) choice, each layer a site with one
level: ``strategy="sensitivity"`` (default) quantizes every layer if that fits ``budget``, else
ranks the layers by weight bytes saved per unit of local error (the layer's own output error
with its input and weight quantized) and keeps the longest prefix of the ranking whose measured
output error fits; the rest get another round. Layers left float say why, with a measured error.
The choice is made on half of the batches and verified on the other; both errors are in the details. Static scales come from the one
activation observer, on every batch (sibling Linears share their input's scale).
Backends lower the pattern to ``fxopt::int8_linear`` (int8 x int8 -> int32 GEMM, one fused rescale) or, per tensor
dynamic, ``fxopt::int8_linear_dynamic_tensor`` (ONNX Runtime: DynamicQuantizeMatMul).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch.fx as fx
from fxopt.passes._quantize_int8_search import budget_refusal, choose_layers, observe_scales
from fxopt.passes._quantize_int8_weights import quantized_weights, without_rows_of_others

from fxopt.ir import add_constant, call_nodes, constant, module_path, ops
from fxopt.ir.qdq import insert_qdq
from fxopt.lossy import check_search_options
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import (
    EXCLUDED,
    calibrated,
    finite,
    floating_point,
    large_enough,
    quantizable_linear,
)

MIN_FEATURES = 16
ACTIVATIONS = ("auto", "dynamic", "dynamic-tensor", "static")


@dataclass(frozen=True)
class QuantizeInt8(Pass):
    name: ClassVar[str] = "quantize-int8"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("prune-hidden", "smooth-quant")

    budget: float = 0.05
    # "auto" (per tensor, per token where per tensor breaks the budget) | "dynamic" (per token)
    # | "dynamic-tensor" | "static" (per tensor, calibrated)
    activations: str = "auto"
    observer: str = "minmax"  # static only: "minmax" | "percentile"
    symmetric: bool = True  # static only: int8 around 0, or (False) uint8 with a zero point over [min, max]
    percentile: float = 99.99
    include: str = ""  # regex on the module path; only matching layers are quantized
    exclude: str = ""  # regex on the module path; matching layers stay float
    min_params: int = 0  # layers with fewer weights stay float
    skip_first: bool = False
    skip_last: bool = False
    force: bool = False
    strategy: str = "sensitivity"  # how the budget is spent across layers: "sensitivity" | "equal-share"

    def __post_init__(self) -> None:
        super().__post_init__()
        from fxopt.errors import PassOptionError

        if self.activations not in ACTIVATIONS:
            raise PassOptionError(f"quantize-int8: activations must be one of {', '.join(map(repr, ACTIVATIONS))}, "
                                  f"got {self.activations!r}")
        if self.observer not in ("minmax", "percentile"):
            raise PassOptionError(f"quantize-int8: observer must be 'minmax' or 'percentile', got {self.observer!r}")
        if not self.symmetric and (self.activations != "static" or self.observer != "minmax"):
            raise PassOptionError("quantize-int8: symmetric=False is for activations='static' with observer='minmax'")
        if not 0.0 < self.percentile <= 100.0:
            raise PassOptionError(f"quantize-int8: percentile must be in (0, 100], got {self.percentile}")
        check_search_options(self)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        linears = call_nodes(gm, ops.linear)
        position = {node: index for index, node in enumerate(linears)}
        candidates = result.admit(linears, lambda node: self._refusal(gm, node, position[node], len(linears)))
        if not candidates:
            return result
        scales: dict[str, Any] = {n.name: None for n in candidates}
        if self.activations == "static":
            refusal = calibrated(ctx, "static activation scales (activations='static')")
            if refusal is not None:
                for node in candidates:
                    result.skip(node, refusal)
                return result
            # The search trials static scales observed on its fit batches only, so that clipping
            # on the held-out ones shows; the committed scales cover every batch (wider, so they
            # clip less). Each batch is observed once for both.
            scales, fit_scales = observe_scales(self, gm, candidates, ctx)
        else:
            fit_scales = scales
        weights = quantized_weights(gm, candidates)
        if self.activations == "auto":
            return self._auto(gm, ctx, candidates, weights, scales, result)
        outcome = choose_layers(self, gm, ctx, candidates, weights, fit_scales, self._quantize,
                                lambda chosen: without_rows_of_others(weights, chosen))
        self._commit(gm, candidates, weights, scales, outcome, result)
        return result

    def _auto(self, gm: fx.GraphModule, ctx: PassContext, candidates: list[fx.Node], weights: dict,
              scales: dict, result: PassResult) -> PassResult:
        """Per tensor where the budget allows, then per token on the layers per tensor left float
        (their search trials carry the per-tensor layers, so the budget covers both)."""
        per_tensor = replace(self, activations="dynamic-tensor")
        first = choose_layers(per_tensor, gm, ctx, candidates, weights, scales, per_tensor._quantize)
        tensor_names = [n.name for n in candidates if n.name in first.choices]
        rest = [n for n in candidates if n.name not in first.choices]
        per_token = replace(self, activations="dynamic")

        def both(trial: fx.GraphModule, names: list[str], weights: dict, scales: dict) -> None:
            per_tensor._quantize(trial, tensor_names, weights, scales)
            per_token._quantize(trial, names, weights, scales)
        def committed(chosen: set[str]) -> dict:  # the weights its trials of the whole graph take too
            return without_rows_of_others(weights, {*tensor_names, *chosen})

        second = choose_layers(per_token, gm, ctx, rest, weights, scales, both, committed) if rest else None
        token_names = [] if second is None else [n.name for n in rest if n.name in second.choices]
        both(gm, token_names, committed(set(token_names)), scales)
        for node in candidates:
            outcome = first if node.name in tensor_names or second is None else second
            pick = outcome.refused.get(node.name)
            if pick is not None:
                result.skip(node, budget_refusal(pick))
            elif node.name in outcome.choices:
                activations = "dynamic-tensor" if outcome is first else "dynamic"
                result.apply()
                result.details.append({"node": node.name, "input_scale": None, "activations": activations,
                                       "error": outcome.picks[node.name].error, **outcome.details_for(node.name)})
        return result

    def _commit(self, gm: fx.GraphModule, candidates: list[fx.Node], weights: dict, scales: dict,
                outcome: Any, result: PassResult) -> None:
        for node in candidates:
            pick = outcome.refused.get(node.name)
            if pick is not None:
                result.skip(node, budget_refusal(pick))
        chosen = [n.name for n in candidates if n.name in outcome.choices]  # graph order
        self._quantize(gm, chosen, without_rows_of_others(weights, set(chosen)), scales)
        for name in chosen:
            result.apply()
            result.details.append({"node": name, "input_scale": scales[name], "activations": self.activations,
                                   "error": outcome.picks[name].error, **outcome.details_for(name)})

    def _refusal(self, gm: fx.GraphModule, node: fx.Node, index: int, count: int) -> Refusal | None:
        path = module_path(node)
        if self.skip_first and index == 0:
            return Refusal(EXCLUDED, "first Linear (skip_first=True)")
        if self.skip_last and index == count - 1:
            return Refusal(EXCLUDED, "last Linear (skip_last=True)")
        if self.include and not re.search(self.include, path):
            return Refusal(EXCLUDED, f"module path '{path}' does not match include={self.include!r}")
        if self.exclude and re.search(self.exclude, path):
            return Refusal(EXCLUDED, f"module path '{path}' matches exclude={self.exclude!r}")
        refusal = quantizable_linear(gm, node)
        if refusal is not None:
            return refusal
        weight = constant(gm, node.args[1])
        small_features = None
        if not self.force:
            small_features = large_enough(min(weight.shape), MIN_FEATURES, (
                f"{weight.shape[1]}->{weight.shape[0]} features: below {MIN_FEATURES}, quantizing the input "
                "costs more than the int8 GEMM saves (force=True overrides)"))
        return (floating_point(node.args[0])
                or finite(weight, what="the weight's values")
                or large_enough(weight.numel(), self.min_params, f"{weight.numel()} weights < min_params={self.min_params}")
                or small_features)

    def _quantize(self, gm: fx.GraphModule, names: list[str], weights: dict, scales: dict) -> None:
        nodes = {n.name: n for n in gm.graph.nodes}
        for name in names:
            linear = nodes[name]
            qweight, scale = weights[name]
            hint = str(linear.args[1].target)
            insert_qdq(gm, linear, add_constant(gm, qweight, f"{hint}_int8"),
                       add_constant(gm, scale, f"{hint}_int8_scale"), scales[name],
                       dynamic_tensor=self.activations == "dynamic-tensor")
        gm.recompile()
