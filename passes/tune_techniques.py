"""The built-in techniques ``fxopt.tune`` chooses among, each calling its pass's own rewrite.

``bf16`` (cast-bf16), ``int8-dynamic`` (per token), ``int8-tensor`` (per tensor, scale
chosen at run time), ``int8-static`` (per tensor, scale observed on the calibration batches)
(quantize-int8), ``low-rank`` at a few ranks below break-even (low-rank), and
``prune-hidden`` to a few widths of a Linear -> activation -> Linear block (prune-hidden).
Registered through the ``fxopt.techniques`` entry-point group, like the presets.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import torch
import torch.fx as fx
from fxopt.passes._prune_hidden_search import unit_ranking
from fxopt.passes.cast_low_precision import cast_linears
from fxopt.passes.low_rank import exact_svd, factor_linear
from fxopt.passes.prune_hidden import prunable_blocks, prune_units
from fxopt.passes.quantize_int8 import MIN_FEATURES

from fxopt.cost import low_rank_break_even
from fxopt.ir import add_constant, call_nodes, constant, dtype_of, linear_parts, ops
from fxopt.ir.qdq import insert_qdq
from fxopt.lossy import inputs_of, observe
from fxopt.quant import FLOAT_DTYPES, quantize_weight, static_scale
from fxopt.tune.techniques import HIDDEN, Technique

RANK_SHARES = (0.75, 0.5, 0.25, 0.125)  # of the break-even rank, least aggressive first
WIDTH_SHARES = (0.75, 0.5, 0.25)  # of the hidden units kept, least aggressive first
MULTIPLE = 8


def _float_linears(gm: fx.GraphModule) -> dict[str, Any]:
    """Linears with constant float32 weights and float32 inputs, by name."""
    found = {}
    for node in call_nodes(gm, ops.linear):
        parts = linear_parts(gm, node)
        if parts is not None and parts.weight.dtype == torch.float32 and dtype_of(parts.input) == torch.float32:
            found[node.name] = parts
    return found


def _nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


# ---------------------------------------------------------------------- bf16


def _bf16_targets(gm: fx.GraphModule, state: Any) -> dict[str, tuple[Hashable, ...]]:
    return {name: (True,) for name in _float_linears(gm)}


def _bf16_apply(gm: fx.GraphModule, choices: Mapping[str, Hashable], state: Any, names: dict[str, str]) -> None:
    cast_linears(gm, [names.get(site, site) for site in choices], torch.bfloat16)


# ---------------------------------------------------------------------- int8


def _int8_targets(gm: fx.GraphModule, state: Any) -> dict[str, tuple[Hashable, ...]]:
    targets = {}
    for name, parts in _float_linears(gm).items():
        if parts.weight.dtype in FLOAT_DTYPES and min(parts.weight.shape) >= MIN_FEATURES:
            targets[name] = (True,)
    return targets


def _int8_prepare_static(gm: fx.GraphModule, batches: list[list[torch.Tensor]]) -> dict[str, float]:
    """Per-tensor input scales from the graph tuning starts from: a pruned block's kept units
    are a subset of those observed, so the scale still covers them."""
    linears = list(call_nodes(gm, ops.linear))
    return {name: static_scale(stats.abs_max) for name, stats in inputs_of(gm, linears, batches).items()}


def _int8_apply(mode: str) -> Any:
    def apply(gm: fx.GraphModule, choices: Mapping[str, Hashable], state: Any, names: dict[str, str]) -> None:
        nodes = _nodes(gm)
        for site in choices:
            linear = nodes[names.get(site, site)]
            qweight, scale = quantize_weight(constant(gm, linear.args[1]))
            hint = str(linear.args[1].target)
            insert_qdq(gm, linear, add_constant(gm, qweight, f"{hint}_int8"),
                       add_constant(gm, scale, f"{hint}_int8_scale"),
                       state[site] if mode == "static" else None, dynamic_tensor=mode == "dynamic-tensor")
        gm.recompile()

    return apply


# ---------------------------------------------------------------------- low-rank


def _ranks(in_features: int, out_features: int) -> tuple[int, ...]:
    break_even = low_rank_break_even(in_features, out_features)
    ranks = {MULTIPLE * max(1, math.floor(share * break_even / MULTIPLE)) for share in RANK_SHARES}
    return tuple(sorted((r for r in ranks if r < break_even), reverse=True))


def _low_rank_targets(gm: fx.GraphModule, state: Any) -> dict[str, tuple[Hashable, ...]]:
    targets = {}
    for name, parts in _float_linears(gm).items():
        ranks = _ranks(parts.in_features, parts.out_features)
        if ranks:
            targets[name] = ranks
    return targets


def _low_rank_apply(gm: fx.GraphModule, choices: Mapping[str, Hashable], state: dict, names: dict[str, str]) -> None:
    nodes = _nodes(gm)
    for site, rank in choices.items():
        node = nodes[names.get(site, site)]
        weight = linear_parts(gm, node).weight
        # A pruned neighbour changes the weight's shape, and with it the SVD; one per shape.
        key = (site, tuple(weight.shape))
        if key not in state:
            state[key] = exact_svd(weight)
        factor_linear(gm, node, int(rank), state[key])  # type: ignore[call-overload]
    gm.recompile()


# ---------------------------------------------------------------------- prune-hidden


def _prune_prepare(gm: fx.GraphModule, batches: list[list[torch.Tensor]]) -> dict[str, Any]:
    blocks = prunable_blocks(gm)
    stats = observe(gm, [act for _, act, _ in blocks], batches, features=True)
    prepared = {}
    for first, act, second in blocks:
        weight = linear_parts(gm, second).weight
        prepared[first.name + HIDDEN] = (first.name, act.name, second.name, unit_ranking(weight, stats[act]),
                                         stats[act], weight.shape[1])
    return prepared


def _prune_targets(gm: fx.GraphModule, state: dict) -> dict[str, tuple[Hashable, ...]]:
    targets = {}
    for site, (*_, hidden) in state.items():
        widths = {MULTIPLE * max(1, round(share * hidden / MULTIPLE)) for share in WIDTH_SHARES}
        widths = tuple(sorted((w for w in widths if w < hidden), reverse=True))
        if widths:
            targets[site] = widths
    return targets


def _prune_apply(gm: fx.GraphModule, choices: Mapping[str, Hashable], state: dict, names: dict[str, str]) -> None:
    for site in sorted(choices, key=list(state).index):  # graph order: a block's second Linear is the next one's first
        first, act, second, order, stats, _ = state[site]
        nodes = _nodes(gm)
        keep = order[: int(choices[site])]  # type: ignore[call-overload]
        new_first, new_second = prune_units(gm, nodes[names.get(first, first)], nodes[act],
                                            nodes[names.get(second, second)], keep, stats)
        names[first], names[second] = new_first.name, new_second.name
    gm.recompile()


# Structural rewrites (pruning, then factoring) rename Linears; the per-layer ones apply after.
_PER_LAYER = ("prune-hidden", "low-rank")

TECHNIQUES = (
    Technique("prune-hidden", "prune-hidden", _prune_targets, _prune_apply,
              lambda gm, batches: _prune_prepare(gm, batches),
              "keep the most important hidden units of a Linear -> activation -> Linear block"),
    Technique("low-rank", "low-rank", _low_rank_targets, _low_rank_apply, lambda gm, batches: {},
              "factor a Linear at a rank below break-even (truncated SVD)", after=("prune-hidden",)),
    Technique("bf16", "bf16", _bf16_targets, _bf16_apply, description="run a Linear in bfloat16",
              after=_PER_LAYER),
    Technique("int8-dynamic", "int8", _int8_targets, _int8_apply("dynamic"),
              description="int8 weights per channel, activations per token at run time", after=_PER_LAYER),
    Technique("int8-tensor", "int8", _int8_targets, _int8_apply("dynamic-tensor"),
              description="int8 weights per channel, activations per tensor at run time", after=_PER_LAYER),
    Technique("int8-static", "int8", _int8_targets, _int8_apply("static"), _int8_prepare_static,
              "int8 weights per channel, activations per tensor with a calibrated scale", after=_PER_LAYER),
)
