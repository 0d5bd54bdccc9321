"""The ONNX Runtime residual-LayerNorm lowering: Add -> LayerNorm as ``fxopt::skip_layer_norm``.

    layer_norm(linear(x, W, b) + skip, [C], gamma, beta, eps)
      => skip_layer_norm(linear(x, W), skip, gamma, beta, b, eps)   (com.microsoft.SkipLayerNormalization)
    layer_norm(a + skip, [C], gamma, beta, eps)
      => skip_layer_norm(a, skip, gamma, beta, None, eps)

Constraints: both addends ``[B, S, C]`` of the same shape and float32/float16, the
normalization over the last axis only, a ``gamma``; the sum feeds the LayerNorm alone
(SkipLayerNormalization does not hand the sum on, so a residual read elsewhere stays an Add
and a LayerNormalization: refusal code ``sum-used-elsewhere``). A Linear's bias moves into
the op only when the Linear feeds nothing else.

Not registered by default: on CPU, ONNX Runtime's SkipLayerNormalization kernel measured
several times slower than the Add and LayerNormalization it replaces (docs/onnx.md), so the
ONNX backend also keeps ONNX Runtime's own SkipLayerNormFusion off there. Opt in with
``fxopt.lowering.registered_lowering(OrtSkipLayerNorm)`` (a GPU build, where the fused
kernel is the faster one).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir import arg, constant, dtype_of, is_op, ops, shape_of
from fxopt.kernels import ort_fused as kernels
from fxopt.lowering.base import Lowering, LoweringResult, OnnxTranslations
from fxopt.lowering.ort_attention import _same
from fxopt.rewrite.refusal import Refusal

aten = torch.ops.aten
LAYER_NORM = aten.layer_norm.default
_FLOATS = (torch.float32, torch.float16)


class OrtSkipLayerNorm(Lowering):
    """Residual Add + LayerNorm -> ONNX Runtime's SkipLayerNormalization, for the ONNX backend."""

    name = "ort-skip-layer-norm"
    backends = ("onnx",)
    onnx_domains = ("com.microsoft",)
    after = ("int8-linear",)  # which owns the quantized Linears and their biases

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(is_op(n, LAYER_NORM) and is_op(n.args[0], ops.add) for n in gm.graph.nodes)

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        return lower_skip_layer_norms(gm)

    def onnx_translations(self) -> OnnxTranslations:
        return {kernels.skip_layer_norm._opoverload: kernels.skip_layer_norm_onnx}


def skip_layer_norm_refusal(node: fx.Node) -> Refusal | None:
    """Why this ``layer_norm(a + b)`` cannot become SkipLayerNormalization (None when it can)."""
    total = node.args[0]
    if arg(total, 2, "alpha", 1) != 1:
        return Refusal("scaled-add", f"alpha={arg(total, 2, 'alpha')}")
    a, b = total.args[0], total.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return Refusal("scalar-addend", "one addend is a number")
    sa, sb, st = shape_of(a), shape_of(b), shape_of(total)
    if sa is None or sb is None or len(sa) != 3 or len(sa) != len(sb) or \
            not all(_same(x, y) for x, y in zip(sa, sb)):
        return Refusal("shape", f"addends {sa} and {sb}; SkipLayerNormalization takes two [B, S, C]")
    if not all(dtype_of(t) in _FLOATS and dtype_of(t) == dtype_of(a) for t in (a, b)):
        return Refusal("dtype", f"{dtype_of(a)} + {dtype_of(b)}")
    normalized = list(node.args[1])
    if len(normalized) != 1 or not _same(normalized[0], st[-1]):
        return Refusal("normalized-shape", f"normalized over {normalized}, not the last axis")
    if arg(node, 2, "weight") is None:
        return Refusal("no-gamma", "LayerNorm without a weight")
    if len(total.users) != 1:
        return Refusal("sum-used-elsewhere",
                       f"'{total.name}' also feeds {', '.join(u.name for u in total.users if u is not node)}")
    return None


def lower_skip_layer_norms(gm: fx.GraphModule) -> LoweringResult:
    """Rewrite every residual LayerNorm of ``gm`` that SkipLayerNormalization computes alike."""
    result = LoweringResult()
    skipped: list[str] = []
    with_bias = 0
    for node in list(gm.graph.nodes):
        if not (is_op(node, LAYER_NORM) and is_op(node.args[0], ops.add)):
            continue
        refusal = skip_layer_norm_refusal(node)
        if refusal is not None:
            skipped.append(f"'{node.name}' stays Add + LayerNorm: {refusal}")
            continue
        total = node.args[0]
        x, skip = total.args[0], total.args[1]
        x, bias = take_linear_bias(gm, x)
        if bias is None:
            skip, bias = take_linear_bias(gm, skip)
            if bias is not None:
                x, skip = skip, x  # the Linear's output is the op's input, the bias goes with it
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(
                kernels.skip_layer_norm._opoverload,
                (x, skip, arg(node, 2, "weight"), arg(node, 3, "bias"), bias, float(arg(node, 4, "eps", 1e-5))))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        gm.graph.erase_node(total)
        with_bias += bias is not None
        result.lowered += 1
    if result.lowered:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        result.notes.append(f"{result.lowered} residual LayerNorm(s) run as com.microsoft.SkipLayerNormalization "
                            f"({with_bias} with the Linear's bias folded in)")
    result.notes.extend(skipped)
    return result


def take_linear_bias(gm: fx.GraphModule, value: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """``value`` as a bias-free Linear and its bias node, when ``value`` is a Linear with a
    constant 1-D bias that feeds one node; else ``(value, None)``."""
    if not is_op(value, ops.linear) or len(value.users) != 1:
        return value, None
    bias = arg(value, 2, "bias")
    tensor = constant(gm, bias) if isinstance(bias, fx.Node) else None
    if tensor is None or tensor.dim() != 1 or dtype_of(value) != tensor.dtype:
        return value, None
    with gm.graph.inserting_before(value):
        bare = gm.graph.call_function(ops.linear, (value.args[0], arg(value, 1, "weight")))
    bare.meta.update(value.meta)
    value.replace_all_uses_with(bare)
    gm.graph.erase_node(value)
    return bare, bias
