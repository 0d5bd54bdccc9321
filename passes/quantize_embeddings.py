"""Quantize embedding tables to int8 rows (weight-only); the rows a lookup reads come back float.

    embedding(W, ids)  =>  mul(to(embedding(Wq, ids), dtype), embedding(s, ids))
    where W ~ Wq * s, quantized once: Wq = round(W / s) in [-127, 127], one s per row
    (max|W[row]| / 127, held as a [rows, 1] table of W's dtype)

A token-embedding table is the largest float tensor an int8 transformer keeps (BERT-base's
94 MB of its 124 MB of weights after quantize-int8): held as int8 rows it takes a quarter, and
a lookup reads a quarter of the bytes. Every backend runs the rewritten lookup as it is (ONNX:
``Gather`` of the int8 table and of the scales, ``Cast``, ``Mul``); OpenVINO gathers the int8
rows and scales them (BERT-4L, one thread, AMX: the gather 0.75 ms of float32 rows against
0.2 ms of int8 ones in OpenVINO's counters).

Constraints (refusal codes): W is a constant (``not-constant``) 2-D table of
float32/float16/bfloat16 (``unsupported-dtype``) with finite values (``not-finite``), read by
this lookup alone (``shared-constant``: a table tied to an output projection stays float for
it, so an int8 copy would only add memory). Which tables are quantized is the budgeted search's
choice (fxopt.lossy), each table a site (``over-budget`` with the measured error).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.ir import add_constant, call_nodes, constant, derived
from fxopt.lossy import check_search_options, search_switches
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.quant import FLOAT_DTYPES, quantize_weight
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import (
    NOT_CONSTANT,
    UNSUPPORTED_DTYPE,
    finite,
    private_constant,
)

EMBEDDING = torch.ops.aten.embedding.default
CAST = torch.ops.aten._to_copy.default


@dataclass(frozen=True)
class QuantizeEmbeddings(Pass):
    name: ClassVar[str] = "quantize-embeddings"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("quantize-int8", "quantize-attention", "quantize-residual")

    budget: float = 0.05
    strategy: str = "sensitivity"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_search_options(self)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        candidates = result.admit(call_nodes(gm, EMBEDDING), lambda node: _refusal(gm, node))
        if not candidates:
            return result
        # derived(): graphs sharing a model's weights (a causal LM's prefill and decode) share one
        # int8 copy of each table
        tables = {n.name: _quantized(constant(gm, n.args[0])) for n in candidates}
        search_switches(gm, ctx, result, candidates, lambda g, names: _quantize(g, names, tables), self.budget,
                        self.strategy, sites_noun="table(s)", rewritten="quantized")
        return result


def _refusal(gm: fx.GraphModule, node: fx.Node) -> Refusal | None:
    table = constant(gm, node.args[0])
    if table is None:
        return Refusal(NOT_CONSTANT, f"the table of {node.name} is not a constant")
    if table.dim() != 2 or table.dtype not in FLOAT_DTYPES:
        return Refusal(UNSUPPORTED_DTYPE, f"the table is {table.dim()}-D {table.dtype}, not a 2-D float32, "
                                          "float16 or bfloat16 one")
    return private_constant(gm, node.args[0], node, "table") or finite(table, what="the table's values")


def _quantized(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        rows, scale = quantize_weight(table)
        return rows, scale.to(table.dtype)[:, None].contiguous()
    return derived([table], ("quantize-embeddings",), make)


def _quantize(gm: fx.GraphModule, names: list[str], tables: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for lookup in [n for n in gm.graph.nodes if n.name in names]:
        rows, scale = tables[lookup.name]
        hint = f"{lookup.args[0].target}_int8"
        rows_node = add_constant(gm, rows, hint, before=lookup)
        scale_node = add_constant(gm, scale, f"{hint}_scale", before=lookup)
        ids, options = lookup.args[1], lookup.args[2:]
        with gm.graph.inserting_before(lookup):
            gathered = gm.graph.call_function(EMBEDDING, (rows_node, ids, *options))
            widened = gm.graph.call_function(CAST, (gathered,), {"dtype": scale.dtype})  # the table's
            scales = gm.graph.call_function(EMBEDDING, (scale_node, ids, *options))
            dequantized = gm.graph.call_function(torch.ops.aten.mul.Tensor, (widened, scales))
        dequantized.meta.update(lookup.meta)
        lookup.replace_all_uses_with(dequantized)
        gm.graph.erase_node(lookup)
    gm.recompile()
