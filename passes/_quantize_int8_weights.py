"""quantize-int8's int8 weights: each candidate's, siblings' in consecutive rows of one tensor."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from fxopt.ir import constant, derived
from fxopt.quant import quantize_weight, quantize_weights_stacked


def quantized_weights(gm: fx.GraphModule, candidates: list[fx.Node]) -> dict[str, tuple[Any, Any]]:
    """Each candidate's ``(int8 weight, scale)``. Siblings (Linears reading one value, with
    weights alike in columns, dtype and device) are quantized into consecutive rows of one
    tensor, so that merge-siblings stacks them after quantizing without a copy (on a 1.1B
    Llama, 0.2 GB of merged int8 weights). Made once per set of weights (:func:`derived`): the
    graphs of one model (a causal LM's prefill, decode) share one int8 copy."""
    groups: dict[Any, list[tuple[fx.Node, Any]]] = {}
    for node in candidates:
        weight = constant(gm, node.args[1])
        groups.setdefault((node.args[0], weight.shape[1], weight.dtype, weight.device), []).append((node, weight))
    weights: dict[str, tuple[Any, Any]] = {}
    for members in groups.values():
        if len(members) == 1:
            node, weight = members[0]
            weights[node.name] = derived([weight], ("quantize-int8",), lambda w=weight: quantize_weight(w))
            continue
        tensors = [weight for _, weight in members]
        qweight, scale = derived(tensors, ("quantize-int8", "stacked"), lambda t=tensors: quantize_weights_stacked(t))
        row = 0
        for node, weight in members:
            rows = slice(row, row + int(weight.shape[0]))
            weights[node.name] = (qweight[rows], scale[rows])
            row = rows.stop
    return weights


def without_rows_of_others(weights: dict[str, tuple[Any, Any]], chosen: set[str]) -> dict[str, tuple[Any, Any]]:
    """``weights`` with the chosen ones that share their memory with a Linear left float copied
    out of it: a sibling's int8 rows are not held for a Linear that does not use them."""
    holders: dict[int, list[str]] = {}
    for name, (qweight, _) in weights.items():
        holders.setdefault(qweight.untyped_storage().data_ptr(), []).append(name)
    compact = dict(weights)
    for names in holders.values():
        if len(names) > 1 and not chosen.issuperset(names):
            for name in chosen.intersection(names):
                qweight = weights[name][0]
                if qweight.nbytes == qweight.untyped_storage().nbytes():
                    continue  # all of its memory (a tied weight's): no other Linear's rows in it
                compact[name] = tuple(derived([part], ("quantize-int8", "own rows"), lambda p=part: p.clone())
                                      for part in weights[name])
    return compact

