"""Grouped-query attention for the ONNX export: the key and value heads repeated before attention.

    scaled_dot_product_attention(q, k, v, ..., enable_gqa=True)
      =>  scaled_dot_product_attention(q, repeat_interleave(k, r, 1), repeat_interleave(v, r, 1), ...)
    r = query heads // key heads

The same attention: with ``enable_gqa`` each group of ``r`` query heads reads one key/value
head, which is what repeating that head ``r`` times beside itself gives (the form
transformers' eager attention writes). The exporter's own translation of ``enable_gqa``
compares the head counts while building the graph and fails when they are symbolic, which
they are in a causal LM's decode graph: torch.compile marks every size of the KV cache
dynamic once the cache grew from empty. Here ``r`` comes from the sizes the graph was
captured with; a graph called later with another ratio of heads fails in ONNX Runtime
(its attention's head counts disagree), never computes something else. Static head counts
are rewritten too: the export of a graph marks its inputs' sizes dynamic whatever the fx
graph says of them, and the exporter's own ``enable_gqa`` path repeats the heads as well.

Constraints: ``enable_gqa`` is set, the query and key are 4-D, and at their captured sizes the
query heads are a multiple of the key heads.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir import infer_val, is_op, shape_of, size_hint
from fxopt.lowering.base import Lowering, LoweringResult

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


class OnnxRepeatKv(Lowering):
    """Attention with ``enable_gqa`` -> attention over repeated key/value heads, for the ONNX export."""

    name = "onnx-repeat-kv"
    backends = ("onnx",)

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(_repeats(node) for node in gm.graph.nodes)

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        result = LoweringResult()
        for node in list(gm.graph.nodes):
            repeats = _repeats(node)
            if not repeats:
                continue
            key, value = node.args[1:3]
            if repeats > 1:
                with gm.graph.inserting_before(node):
                    key, value = (gm.graph.call_function(aten.repeat_interleave.self_int, (tensor, repeats, 1))
                                  for tensor in (key, value))
                for repeated in (key, value):
                    infer_val(repeated)
            node.args = (node.args[0], key, value, *node.args[3:])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "enable_gqa"}
            result.lowered += 1
        if result.lowered:
            gm.recompile()
            result.notes.append(f"{result.lowered} grouped-query attention(s) export with their key/value heads "
                                "repeated")
        return result


def _repeats(node: fx.Node) -> int:
    """How many times each key/value head is repeated (0: not this pattern)."""
    if not is_op(node, SDPA) or not node.kwargs.get("enable_gqa", False) or len(node.args) < 3:
        return 0
    query, key = shape_of(node.args[0]), shape_of(node.args[1])
    if query is None or key is None or len(query) != 4 or len(key) != 4:
        return 0
    query_heads, key_heads = size_hint(query[1]), size_hint(key[1])
    if not key_heads or query_heads % key_heads:
        return 0
    return query_heads // key_heads
