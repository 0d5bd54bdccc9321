"""Quantize Linear weights only (int8 per output channel, or int4 group-wise); activations stay float.

    linear(x, W, b)  =>  weight_only_linear(x, Wq, s, z, b, bits, dtype)
    where W ~ (Wq - z) * s, quantized once, here: bits=8: Wq = round(W / s), z = 0, one s per
    output channel (or per group of group_size inputs); bits=4: Wq in [0, 15] with s and an
    integer z per group of group_size inputs (the group's range widened to hold 0); the GEMM
    runs in dtype (activations="bfloat16" | "float32"). scales="absmax": s from the group's
    range (8 bits: max|W| / 127, Wq in [-127, 127]); scales="weighted": each group's clip ratio
    (and 4-bit zero point) minimizes sum_k E[x_k^2] (W_k - What_k)^2, with E[x_k^2] the mean
    square of input feature k on the example and calibration batches (fxopt.quant_search;
    8 bits: Wq in [-128, 127])

Constraints (refusal codes): the layer is not left out by ``exclude`` (``excluded``); W is a
constant 2-D matrix (``not-constant``) of float32/float16/bfloat16 (``unsupported-dtype``) with
finite values (``not-finite``); x is floating point (``not-floating-point``); the in features
divide into groups of ``group_size`` (``indivisible-group``); the search keeps the error within
budget (``over-budget``). Which layers to quantize, and how far, is the budgeted search's
(fxopt.lossy) choice: each layer is a site with levels 8 bits, then (bits=4) 4 bits; a layer
4 bits would put over budget stays at 8 bits, one that 8 bits would stays float. The sensitivity
strategy ranks layers by bytes saved per unit of error: with one level (bits=8) their weight's
relative quantization error estimates it; with two, each layer is measured alone.
The backends lower ``fxopt::weight_only_linear`` to the fastest measured kernel (the eager
backend: ``aten._weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``, ``_weight_int4pack_mm``
on CUDA, or the op itself: dequantize + ``F.linear``); ONNX writes ``com.microsoft.MatMulNBits``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.ir import add_constant, call_nodes, constant, derived, module_path, ops
from fxopt.kernels.weight_only import weight_only_linear_op
from fxopt.lossy import BudgetedSearch, Pick, Site, check_search_options, inputs_of, known_values
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.quant import dequantize_weight_groupwise, quantize_weight_groupwise
from fxopt.quant_search import search_weight_groupwise
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import (
    EXCLUDED,
    OVER_BUDGET,
    finite,
    floating_point,
    quantizable_linear,
)

INDIVISIBLE_GROUP = "indivisible-group"
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP = 128
ACTIVATIONS = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SCALES = ("weighted", "absmax")


@dataclass(frozen=True)
class QuantizeWeights(Pass):
    name: ClassVar[str] = "quantize-weights"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("prune-hidden", "low-rank", "smooth-quant", "merge-siblings")

    budget: float = 0.05
    bits: int = 8  # 8: symmetric int8; 4: asymmetric int4 with zero points
    group_size: int | None = None  # inputs sharing a scale: None = per output channel (bits=8), 128 (bits=4)
    activations: str = "bfloat16"  # the GEMM's dtype: "bfloat16" (fast library kernels on CPU) | "float32"
    scales: str = "weighted"  # "weighted": clip search weighted by the inputs' mean squares | "absmax"
    exclude: str = ""  # regex on the module path; matching layers stay float
    strategy: str = "sensitivity"

    def __post_init__(self) -> None:
        super().__post_init__()
        from fxopt.errors import OptionValueError

        if self.bits not in (8, 4):
            raise OptionValueError(f"quantize-weights: bits must be 8 or 4, got {self.bits}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise OptionValueError(f"quantize-weights: group_size must be None or one of {GROUP_SIZES}, "
                                   f"got {self.group_size}")
        if self.activations not in ACTIVATIONS:
            raise OptionValueError(f"quantize-weights: activations must be one of {', '.join(map(repr, ACTIVATIONS))}, "
                                   f"got {self.activations!r}")
        if self.scales not in SCALES:
            raise OptionValueError(f"quantize-weights: scales must be one of {', '.join(map(repr, SCALES))}, "
                                   f"got {self.scales!r}")
        check_search_options(self)

    @property
    def levels(self) -> tuple[tuple[int, int | None], ...]:
        """(bits, group size) per level, least aggressive first: int8 before int4."""
        group = self.group_size if self.group_size is not None or self.bits == 8 else DEFAULT_INT4_GROUP
        return ((8, group),) if self.bits == 8 else ((8, None), (4, group))

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        candidates = result.admit(call_nodes(gm, ops.linear), lambda node: self._refusal(gm, node))
        if not candidates:
            return result
        # derived(): graphs sharing a model's weights (torch.compile's prefill and decode) share one
        # quantized copy of each, made when first asked for (bits=4: int8 only where tried); with
        # weighted scales, the statistics of the first graph to quantize a weight decide its copy.
        importance = _input_mean_squares(gm, candidates, ctx) if self.scales == "weighted" else {}
        weights = {n.name: constant(gm, n.args[1]) for n in candidates}
        quantized = functools.cache(lambda name, level: _quantized(weights[name], level, self.scales, importance.get(name)))
        # Estimates rank on/off sites without a trial each; with two levels each layer is
        # measured alone so that one int4 puts over budget can back off to int8.
        one_level = len(self.levels) == 1
        sites = [Site(n.name, self.levels, tuple(_saving(constant(gm, n.args[1]), bits) for bits, _ in self.levels),
                      estimate=_estimate(constant(gm, n.args[1]), quantized, n.name) if one_level else None)
                 for n in candidates]

        def apply(trial: fx.GraphModule, choices: Mapping[str, object]) -> fx.GraphModule:
            self._quantize(trial, choices, quantized)
            return trial

        outcome = BudgetedSearch(gm, ctx, sites, apply, self.budget, self.strategy).run()
        for node in candidates:
            pick = outcome.refused.get(node.name)
            if pick is not None:
                result.skip(node, _budget_refusal(pick))
        self._quantize(gm, outcome.choices, quantized)
        for node in candidates:
            if node.name in outcome.choices:
                bits, group = outcome.choices[node.name]
                result.apply()
                result.details.append({"node": node.name, "bits": bits, "group_size": group,
                                       "activations": self.activations, "error": outcome.picks[node.name].error,
                                       **outcome.details_for(node.name)})
        return result

    def _quantize(self, gm: fx.GraphModule, choices: Mapping[str, object], quantized: Callable) -> None:
        dtype = ACTIVATIONS[self.activations]
        for linear in [n for n in gm.graph.nodes if n.name in choices]:
            level = choices[linear.name]
            q, scale, zero = quantized(linear.name, level)
            hint = f"{linear.args[1].target}_int{level[0]}"
            q_node = add_constant(gm, q, hint, before=linear)
            scale_node = add_constant(gm, scale, f"{hint}_scale", before=linear)
            zero_node = None if zero is None else add_constant(gm, zero, f"{hint}_zero", before=linear)
            bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
            with gm.graph.inserting_before(linear):
                node = gm.graph.call_function(weight_only_linear_op,
                                              (linear.args[0], q_node, scale_node, zero_node, bias, level[0], dtype))
            node.meta.update(linear.meta)
            linear.replace_all_uses_with(node)
            gm.graph.erase_node(linear)
        gm.recompile()

    def _refusal(self, gm: fx.GraphModule, node: fx.Node) -> Refusal | None:
        path = module_path(node)
        if self.exclude and re.search(self.exclude, path):
            return Refusal(EXCLUDED, f"module path '{path}' matches exclude={self.exclude!r}")
        refusal = quantizable_linear(gm, node)
        if refusal is not None:
            return refusal
        weight = constant(gm, node.args[1])
        in_features = weight.shape[1]
        for _, group in self.levels:
            if group is not None and in_features % group:
                return Refusal(INDIVISIBLE_GROUP, f"{in_features} input features do not divide into groups of "
                                                  f"{group} (group_size={group})")
        return floating_point(node.args[0]) or finite(weight, what="the weight's values")


def _quantized(weight: torch.Tensor, level: tuple[int, int | None], scales: str,
               importance: torch.Tensor | None) -> tuple:
    search = functools.partial(search_weight_groupwise, importance=importance)
    make = quantize_weight_groupwise if scales == "absmax" else search
    return derived([weight], ("quantize-weights", scales, *level), lambda: make(weight, *level))


def _input_mean_squares(gm: fx.GraphModule, linears: list[fx.Node], ctx: PassContext) -> dict[str, torch.Tensor]:
    """E[x_k^2] of each Linear's input features over the observable batches (siblings reading
    one input share one observation; the example's values come from the manager's run)."""
    stats = inputs_of(gm, linears, ctx.observable_batches, features=True, known=known_values(ctx, gm))
    return {name: s.mean_square.float() for name, s in stats.items() if s.feature_square_sum is not None}


def _saving(weight: torch.Tensor, bits: int) -> float:
    """Weight bytes a level saves (4-bit values are resident packed two to a byte)."""
    return weight.numel() * (weight.element_size() - bits / 8)


def _estimate(weight: torch.Tensor, quantized: Callable, name: str):  # noqa: ANN202
    """The relative (Frobenius) error of the weight at a level: a cheap stand-in for the output
    error that quantizing this layer alone causes, used only to order the search's trials."""
    def estimate(level: object) -> float:
        q, scale, zero = quantized(name, level)
        w = weight.detach().float()
        return float(dequantize_weight_groupwise(q, scale, zero).sub_(w).norm() / w.norm().clamp(min=1e-12))
    return estimate


def _budget_refusal(pick: Pick) -> Refusal:
    level = f"int{pick.tried[0]}" if isinstance(pick.tried, tuple) else "quantized"
    context = f" with {pick.others} other layer(s) quantized" if pick.others else " alone"
    return Refusal(OVER_BUDGET, pick.reason or f"{level}{context} gives output error {pick.error:.3g} > budget {pick.target:g}")
