"""Dynamic int8 Linears on PyTorch's quantized engine hold the engine's packed weight alone.

    int8_linear_dynamic_tensor(x, Wq, sw, b, engine)  =>  engine_linear(x, pack(Wq, sw, b))

``fxopt::int8_linear_dynamic_tensor`` runs ``quantized::linear_dynamic`` on a weight it packs
for the engine at its first call and keeps beside ``Wq``: two copies of every int8 weight (three
on oneDNN's engine, whose pack keeps the weight it was given). Here, in the code that runs, the
Linear calls the same kernel on a pack made once; the graph's ``Wq`` is then read by nothing that
runs, and the eager backend keeps it only as the pack (``LoweringResult.packed``: the pack
unpacks to exactly ``Wq``, which the backend checks). The kernel, its engine and its numbers are
those the int8-linear lowering chose, so nothing is measured again. Constraints: CPU; a
constant int8 weight, scales and bias; an engine that runs this Linear exactly
(:func:`fxopt.kernels.int8.quantized_engine_unsupported_reason`). Activations of any float
dtype are computed in float32, as the op does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import constant, derived, is_op
from fxopt.kernels import int8 as kernels
from fxopt.lowering.base import Lowering, LoweringResult, hold_packed


class EnginePackedInt8(Lowering):
    """Dynamic per-tensor int8 Linears -> ``quantized::linear_dynamic`` on their packed weight."""

    name = "engine-packed-int8"
    backends = ("eager",)
    devices = ("cpu",)
    stage = "kernel"  # opt.graph_module keeps fxopt::int8_linear_dynamic_tensor (exportable)
    after = ("onednn-qlinear",)  # the Linears oneDNN's fused kernel did not take

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(_parts(gm, node) is not None for node in gm.graph.nodes)

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        result = LoweringResult()
        for node in list(gm.graph.nodes):
            parts = _parts(gm, node)
            if parts is None:
                continue
            packed = _pack(*parts)
            if packed is None:  # this engine does not run the Linear exactly
                continue
            with gm.graph.inserting_before(node):
                pack = hold_packed(gm, node.args[1], packed, _unpacked, result, "engine")
                kernel = gm.graph.call_function(engine_linear, (node.args[0], pack, int(parts[0].shape[0])))
            kernel.meta.update(node.meta)
            node.replace_all_uses_with(kernel)
            gm.graph.erase_node(node)
            result.lowered += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
        if result.lowered:
            result.notes.append(f"{result.lowered} dynamic int8 Linear(s) hold their quantized engine's packed weight only")
        return result


def _pack(qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, engine: str) -> Any:
    # derived(): the graphs of one model (a causal LM's prefill, decode) share one pack.
    return derived([qweight, weight_scale, bias], ("engine-pack", engine),
                   lambda: kernels.prepacked(qweight, weight_scale, bias, engine))


def _unpacked(packed: Any) -> torch.Tensor:
    """The plain int8 weight ``[out, in]`` of a quantized engine's pack."""
    weight, _ = packed.unpack()
    return weight.int_repr()


def engine_linear(x: torch.Tensor, packed: Any, out_features: int) -> torch.Tensor:
    """``fxopt::int8_linear_dynamic_tensor`` on a weight packed beforehand (its CPU path)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.quantized.linear_dynamic(rows.float(), packed, False)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


def _parts(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str] | None:
    """``(Wq, sw, b, engine)`` of a dynamic int8 Linear this lowering takes, with CPU constants
    and an engine that runs it exactly; else None."""
    if not is_op(node, kernels.int8_linear_dynamic_tensor_op):
        return None
    x, qweight, weight_scale, bias, engine = (list(node.args) + [None] * 5)[:5]
    tensors = [constant(gm, qweight), constant(gm, weight_scale)]
    bias_value = constant(gm, bias) if bias is not None else None
    if any(t is None or t.device.type != "cpu" for t in tensors) or (bias is not None and bias_value is None):
        return None
    engine = engine or kernels.preferred_engine() or ""
    if engine not in kernels.exact_engines():
        return None
    return tensors[0], tensors[1], bias_value, engine
