"""quantize-int8's estimate of a layer: its local error, which orders the search's trials.

Not a pass: a helper of :mod:`fxopt.passes._quantize_int8_search`. A layer's local error is its
own output's relative error with its input and weight quantized by the very QDQ pattern of the
pass (on a one-layer graph), on sampled rows of its float input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch
import torch.fx as fx

from fxopt.ir import add_constant, constant, ops, release_freed_memory
from fxopt.ir.qdq import insert_qdq
from fxopt.quant import QUANTIZE_CHUNK
from fxopt.verify import compare_outputs

# Rows of each layer's input its local error (the search's estimate) is measured on: the
# estimate only orders the trials; on every row these GEMMs cost as much as a model run.
ESTIMATE_ROWS = 64
# Weights of a layer its one-layer graph computes with at a time: a large layer's float copy
# of its int8 weight (tens of MB on a 1B model) costs more than the GEMMs on a few rows.
ESTIMATE_CHUNK = 4 * QUANTIZE_CHUNK


class Options(Protocol):
    """The option of the pass the estimate reads."""

    activations: str


def local_errors(options: Options, gm: fx.GraphModule, candidates: list[fx.Node], weights: dict, scales: dict,
                 inputs: Mapping[str, list[torch.Tensor]]) -> dict[str, float]:
    """Each layer's own largest relative output error when its input and weight are
    quantized as the pass would (the very QDQ pattern, on a one-layer graph), on ``inputs``
    (each layer's input, per batch). On at most ``ESTIMATE_ROWS`` evenly spaced rows, plus
    the rows holding the input's smallest and largest value, so that a per-tensor dynamic
    scale comes out as on every row (rows of a Linear, and of a per-token scale, are
    independent); a large layer's output channels a chunk at a time (each is its own)."""
    errors: dict[str, float] = {}
    with torch.no_grad():
        for node in candidates:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            weight, bias = constant(gm, node.args[1]), None if bias is None else constant(gm, bias)
            quantized = _one_layer(weight, bias, node.meta["val"].dtype)
            linear = next(n for n in quantized.graph.nodes if n.target == ops.linear)
            qweight, weight_scale = weights[node.name]
            qnode = add_constant(quantized, qweight, "qweight", before=linear)
            scale_node = add_constant(quantized, weight_scale, "weight_scale", before=linear)
            insert_qdq(quantized, linear, qnode, scale_node, scales[node.name],
                       dynamic_tensor=options.activations == "dynamic-tensor")
            # the one-layer graph's constants, by name: each output channel's row of each
            parts = {"weight": weight, "bias": bias, qnode.target: qweight, scale_node.target: weight_scale}
            quantized.recompile()
            worst = 0.0
            for rows in map(estimate_rows, inputs[node.name]):
                expected, actual = [], []
                step = max(1, ESTIMATE_CHUNK // weight.shape[1])
                for start in range(0, weight.shape[0], step):  # output channels are independent
                    chunk = {name: t[start:start + step] for name, t in parts.items() if t is not None}
                    for name, part in chunk.items():
                        setattr(quantized, name, part)
                    expected.append(ops.linear(rows, chunk["weight"], chunk.get("bias")))
                    actual.append(quantized(rows))
                comparison = compare_outputs([torch.cat(expected, -1)], [torch.cat(actual, -1)])
                worst = max(worst, math.inf if comparison.mismatch else comparison.max_rel)
            errors[node.name] = worst
            release_freed_memory()  # its dequantized weight: tens of MB on a large model
    return errors


def _one_layer(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> fx.GraphModule:
    """``x -> linear(x, weight, bias)`` as a graph, for :func:`insert_qdq` to rewrite like the real layer."""
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    gm.register_buffer("weight", weight)
    if bias is not None:
        gm.register_buffer("bias", bias)
    x, w = gm.graph.placeholder("x"), gm.graph.get_attr("weight")
    linear = gm.graph.call_function(ops.linear, (x, w, None if bias is None else gm.graph.get_attr("bias")))
    linear.meta["val"] = torch.empty(0, dtype=dtype)
    gm.graph.output(linear)
    return gm


def estimate_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` a local error is measured on (:func:`sampled_rows`); the same again on them."""
    rows = x.reshape(-1, x.shape[-1])
    return rows[sampled_rows(rows)]


def sampled_rows(rows: torch.Tensor) -> torch.Tensor:
    """Indices of at most ``ESTIMATE_ROWS`` evenly spaced rows, plus those holding the smallest
    and the largest value (all rows when there are few)."""
    count, width = rows.shape
    if count <= ESTIMATE_ROWS + 2:
        return torch.arange(count)
    extremes = torch.stack([rows.argmin() // width, rows.argmax() // width])
    return torch.cat([torch.arange(0, count, -(-count // ESTIMATE_ROWS)), extremes]).unique()
