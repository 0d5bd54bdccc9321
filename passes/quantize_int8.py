"""Quantize Linear layers to int8: per-channel weights, per-token (or calibrated) activations.

    linear(x, W, b)  =>  linear(dequantize(quantize(x)), dequantize_per_channel(Wq, sw), b)
    where Wq = round(W / sw) in [-127, 127], sw = max|W[o, :]| / 127   (quantized once, here)
    and x is quantized per token at run time (activations="dynamic"), per tensor to uint8 with
    a scale and zero point chosen at run time (activations="dynamic-tensor", ONNX's
    DynamicQuantizeLinear scheme), or per tensor with a scale observed on the calibration
    batches (activations="static", observer minmax|percentile; symmetric=False: uint8 with a
    calibrated zero point too, from the observed min and max)

Constraints (refusal codes): the layer is not left out by ``skip_first``, ``skip_last``,
``include`` or ``exclude`` (``excluded``); W is a constant 2-D matrix (``not-constant``) of
float32/float16/bfloat16 (``unsupported-dtype``) with finite values (``not-finite``); x is
floating point (``not-floating-point``); W has at least ``min_params`` entries and in and out
features are at least 16 (below that quantizing x costs more than the int8 GEMM saves,
unless force=True) (``too-small``); static activations need calibration batches
(``needs-calibration``); the search keeps the error within budget (``over-budget``). Which layers to quantize is the budgeted
search's (fxopt.lossy) choice, each layer a site with one level: ``strategy="sensitivity"``
(default) quantizes every layer if that fits ``budget``; else it ranks the layers by weight
bytes saved per unit of each one's local error (its own output's relative error with its
input and weight quantized, on its float input, from one run of the graph) and keeps the
longest prefix of the ranking whose measured output error fits (a search from the length the
estimates predict: a few measured trials, not two per layer); the layer after it stays float
and the rest get another round. Layers left float say why, with a measured error. The choice is made on one half of the batches and
verified on the other; both errors are in the details. Static scales come from the one
activation observer, on every batch (sibling Linears share their input's scale).
Backends lower the pattern to ``fxopt::int8_linear`` (int8 x int8 -> int32 GEMM, one fused rescale) or, per tensor
dynamic, ``fxopt::int8_linear_dynamic_tensor`` (ONNX Runtime: DynamicQuantizeMatMul).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from fxopt.ir import (
    add_constant,
    call_nodes,
    constant,
    module_path,
    ops,
)
from fxopt.ir.qdq import qops
from fxopt.lossy import (
    ActivationStats,
    BudgetedSearch,
    Outcome,
    Pick,
    Site,
    check_search_options,
    collect_activations,
    fit_indices,
    known_values,
    merge_stats,
    observe_each,
)
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.quant import (
    FLOAT_DTYPES,
    QMAX,
    QMIN,
    TENSOR_EPS,
    UQMAX,
    UQMIN,
    WEIGHT_QMAX,
    quantize_weight,
    static_asymmetric_qparams,
    static_scale,
)
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import (
    EXCLUDED,
    NEEDS_CALIBRATION,
    OVER_BUDGET,
    UNSUPPORTED_DTYPE,
    constant_linear,
    finite,
    floating_point,
    large_enough,
)
from fxopt.verify import compare_outputs

MIN_FEATURES = 16
# Rows of each layer's input its local error (the search's estimate) is measured on: the
# estimate only orders the search's trials, and these GEMMs would otherwise cost as much as
# a run of the model.
ESTIMATE_ROWS = 64
ACTIVATIONS = ("dynamic", "dynamic-tensor", "static")


@dataclass(frozen=True)
class QuantizeInt8(Pass):
    name: ClassVar[str] = "quantize-int8"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("prune-hidden", "smooth-quant")

    budget: float = 0.05
    activations: str = "dynamic"  # "dynamic" (per token) | "dynamic-tensor" | "static" (per tensor, calibrated)
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
            if not ctx.calibrated:
                for node in candidates:
                    result.skip(node, Refusal(NEEDS_CALIBRATION, (
                        "activations='static' needs calibration batches (calibration=[...]); "
                        "a scale from the example inputs alone could clip later inputs")))
                return result
            # The search trials static scales observed on its fit batches only, so that clipping
            # on the held-out ones shows; the committed scales cover every batch (wider, so they
            # clip less). Each batch is observed once for both.
            scales, fit_scales = self._observe(gm, candidates, ctx)
        else:
            fit_scales = scales
        weights = {n.name: quantize_weight(constant(gm, n.args[1])) for n in candidates}
        outcome = self._search(gm, ctx, candidates, weights, fit_scales)
        for node in candidates:
            pick = outcome.refused.get(node.name)
            if pick is not None:
                result.skip(node, _budget_refusal(pick))
        chosen = [n.name for n in candidates if n.name in outcome.choices]  # graph order
        self._quantize(gm, chosen, weights, scales)
        for name in chosen:
            result.apply()
            result.details.append({"node": name, "input_scale": scales[name], "error": outcome.picks[name].error,
                                   **outcome.details_for(name)})
        return result

    def _search(self, gm: fx.GraphModule, ctx: PassContext, candidates: list[fx.Node], weights: dict,
                scales: dict) -> Outcome:
        """Which layers to quantize: a site per layer, on or off, saving 3 of every 4 weight bytes,
        with its local error as the estimate the sensitivity strategy ranks by (measured only
        when quantizing every layer at once is over budget)."""
        local: dict[str, float] = {}
        running: list[BudgetedSearch] = []  # the search, while it runs (no cycle keeps its kept values after)

        def estimate_of(name: str):
            def estimate(level: object) -> float:
                if not local:
                    # Each layer's input in the float graph: from the one run of the starting
                    # graph that the search keeps for its trials to reuse.
                    sources = {n.name: n.args[0].name for n in candidates}
                    seen = running[0].starting_values(set(sources.values()))
                    local.update(self._local_errors(gm, candidates, weights, scales,
                                                    {name: seen[source] for name, source in sources.items()}))
                return local[name]
            return estimate

        sites = [Site(n.name, (True,), (3.0 * constant(gm, n.args[1]).numel(),), estimate=estimate_of(n.name))
                 for n in candidates]

        def apply(trial: fx.GraphModule, choices: Mapping[str, object]) -> fx.GraphModule:
            self._quantize(trial, [n.name for n in candidates if n.name in choices], weights, scales)
            return trial

        running.append(BudgetedSearch(gm, ctx, sites, apply, self.budget, self.strategy))
        try:
            return running[0].run()
        finally:
            running.clear()

    def _local_errors(self, gm: fx.GraphModule, candidates: list[fx.Node], weights: dict, scales: dict,
                      inputs: Mapping[str, list[torch.Tensor]]) -> dict[str, float]:
        """Each layer's own largest relative output error when its input and weight are
        quantized as :meth:`_quantize` would (the very QDQ pattern, on a one-layer graph), on
        ``inputs`` (each layer's input, per batch). On at most ``ESTIMATE_ROWS`` evenly spaced
        rows, plus the rows holding the input's smallest and largest value, so that a
        per-tensor dynamic scale comes out as on every row (rows of a Linear, and of a
        per-token scale, are independent)."""
        errors: dict[str, float] = {}
        with torch.no_grad():
            for node in candidates:
                bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                weight, bias = constant(gm, node.args[1]), None if bias is None else constant(gm, bias)
                quantized = _one_layer(weight, bias, node.meta["val"].dtype)
                linear = next(n for n in quantized.graph.nodes if n.target == ops.linear)
                qweight, weight_scale = weights[node.name]
                insert_qdq(quantized, linear, add_constant(quantized, qweight, "qweight", before=linear),
                           add_constant(quantized, weight_scale, "weight_scale", before=linear), scales[node.name],
                           dynamic_tensor=self.activations == "dynamic-tensor")
                quantized.recompile()
                worst = 0.0
                for x in inputs[node.name]:
                    rows = x.reshape(-1, x.shape[-1])
                    rows = rows[_sampled_rows(rows)]
                    comparison = compare_outputs([ops.linear(rows, weight, bias)], [quantized(rows)])
                    worst = max(worst, math.inf if comparison.mismatch else comparison.max_rel)
                errors[node.name] = worst
        return errors

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
        refusal = constant_linear(gm, node)
        if refusal is not None:
            return refusal
        weight = constant(gm, node.args[1])
        if weight.dtype not in FLOAT_DTYPES:
            return Refusal(UNSUPPORTED_DTYPE, f"weight dtype {weight.dtype} is not one of float32, float16, bfloat16")
        small_features = None
        if not self.force:
            small_features = large_enough(min(weight.shape), MIN_FEATURES, (
                f"{weight.shape[1]}->{weight.shape[0]} features: below {MIN_FEATURES}, quantizing the input "
                "costs more than the int8 GEMM saves (force=True overrides)"))
        return (floating_point(node.args[0])
                or finite(weight, what="the weight's values")
                or large_enough(weight.numel(), self.min_params, f"{weight.numel()} weights < min_params={self.min_params}")
                or small_features)

    def _observe(self, gm: fx.GraphModule, nodes: list[fx.Node], ctx: PassContext) -> tuple[dict[str, Any], dict[str, Any]]:
        """Per-tensor activation scales over every observable batch, and over the fit batches
        only: max |x| (minmax) or its largest per-batch percentile, per Linear (siblings
        reading one input share its statistics); ``(scale, zero_point)`` from min and max when
        not symmetric. One observation of each batch serves both (the example's values come
        from the manager's reference run when it kept them)."""
        batches = ctx.observable_batches
        fit = fit_indices(ctx)  # positions in ctx.batches, the same in its observable prefix
        sources = {n.name: n.args[0] for n in nodes}
        known = known_values(ctx, gm)
        if not self.symmetric:
            seen = collect_activations(gm, set(sources.values()), batches,
                                       reduce=lambda v: (float(v.min()), float(v.max())), known=known)

            def asymmetric(indices: list[int]) -> dict[str, Any]:
                return {name: static_asymmetric_qparams(min(seen[source][i][0] for i in indices),
                                                        max(seen[source][i][1] for i in indices))
                        for name, source in sources.items()}
            return asymmetric(list(range(len(batches)))), asymmetric(fit)
        percentile = self.percentile if self.observer == "percentile" else None
        each = observe_each(gm, set(sources.values()), batches, percentile=percentile, known=known)

        def symmetric(indices: list[int]) -> dict[str, Any]:
            scales = {}
            for name, source in sources.items():
                stats = merge_stats(each[i].get(source, ActivationStats()) for i in indices)
                scales[name] = static_scale(stats.percentile if percentile is not None and stats.percentile is not None
                                            else stats.abs_max)
            return scales
        return symmetric(list(range(len(batches)))), symmetric(fit)

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


def _budget_refusal(pick: Pick) -> Refusal:
    limit = f"budget {pick.target:g}"
    if pick.split != "fit":
        limit = f"{pick.target:g} (half the budget: chosen again on every batch after the held-out check failed)"
    if pick.others == 0:
        return Refusal(OVER_BUDGET, f"quantizing this layer alone gives output error {pick.error:.3g} > {limit}")
    if pick.others_error is not None and pick.others_error <= pick.target:
        return Refusal(OVER_BUDGET, f"with {pick.others} other layer(s) quantized it raises the output error to "
                                    f"{pick.error:.3g} > {limit}")
    # The others were not measured within budget without it: name the combination, not a culprit.
    return Refusal(OVER_BUDGET, f"quantized together with {pick.others} other layer(s) (the smallest such "
                                f"combination measured) it gives output error {pick.error:.3g} > {limit}")


def _one_layer(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> fx.GraphModule:
    """``x -> linear(x, weight, bias)`` as a graph, for :func:`insert_qdq` to rewrite like the real layer."""
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    graph = gm.graph
    x = graph.placeholder("x")
    w = graph.get_attr(_register(gm, weight, "weight"))
    b = None if bias is None else graph.get_attr(_register(gm, bias, "bias"))
    linear = graph.call_function(ops.linear, (x, w, b))
    linear.meta["val"] = torch.empty(0, dtype=dtype)
    graph.output(linear)
    return gm


def _register(gm: fx.GraphModule, tensor: torch.Tensor, name: str) -> str:
    gm.register_buffer(name, tensor)
    return name


def _sampled_rows(rows: torch.Tensor) -> torch.Tensor:
    """Indices of at most ``ESTIMATE_ROWS`` evenly spaced rows, plus those holding the smallest
    and the largest value (all rows when there are few)."""
    count, width = rows.shape
    if count <= ESTIMATE_ROWS + 2:
        return torch.arange(count)
    extremes = torch.stack([rows.argmin() // width, rows.argmax() // width])
    return torch.cat([torch.arange(0, count, -(-count // ESTIMATE_ROWS)), extremes]).unique()


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
            xq = graph.call_function(qops.quantize_per_tensor, (x, input_scale, 0, QMIN, QMAX, torch.int8))
            xdq = graph.call_function(qops.dequantize_per_tensor, (xq, input_scale, 0, QMIN, QMAX, torch.int8),
                                      {"out_dtype": dtype})
        wdq = graph.call_function(qops.dequantize_per_channel,
                                  (qweight, weight_scale, None, 0, -WEIGHT_QMAX, WEIGHT_QMAX, torch.int8),
                                  {"out_dtype": dtype})
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    linear.args = (xdq, wdq, bias)
    linear.kwargs = {}
