"""Fused oneDNN Linear lowering for the eager CPU backend.

    linear(x, W, b)             =>  mkldnn._linear_pointwise(x, W, b, "none")
    linear(x, W, b) -> act      =>  mkldnn._linear_pointwise(x, W, b, act)
        act in relu, gelu (exact or tanh), silu, sigmoid, tanh, hardswish, hardsigmoid,
        leaky_relu, hardtanh

Constraints: ``W`` (and ``b``) are float32 or bfloat16 constants of the input's dtype, with
at least 64 input and output features (smaller GEMMs gain nothing); the activation is the
Linear's only user. oneDNN applies the activation to the GEMM's output
while it is still in cache, and its fp32 GEMM (AVX-512/AMX kernels with the weight in its
blocked layout) is faster than PyTorch's default Linear on x86; in bfloat16 it runs on the
AVX512-BF16/AMX units. That is a guess about the CPU, so with a ``choose`` (a measured
choice, :mod:`fxopt.pipeline.timings`) a site is lowered only when the fused kernel measures
faster than PyTorch's Linear (+ activation) at its shapes, at the example batch size and a
second one when the batch is dynamic. The result differs from the unfused graph only by float rounding;
the backend checks that on the example inputs before it keeps the lowered graph.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import arg, constant, dtype_of, is_op, ops, shape_of
from fxopt.lowering.base import Choose, Lowering, LoweringResult, measured_inputs, measured_shapes
from fxopt.verify import exact_tolerance

aten = torch.ops.aten


# Each activation spelled as a oneDNN post-op: (name, scalars, algorithm), from the node's arguments.
def _gelu(node: fx.Node) -> tuple[str, list[float], str] | None:
    approximate = arg(node, 1, "approximate", "none")
    return ("gelu", [], approximate) if approximate in ("none", "tanh") else None


def _leaky_relu(node: fx.Node) -> tuple[str, list[float], str] | None:
    return ("leaky_relu", [float(arg(node, 1, "negative_slope", 0.01))], "none")


def _hardtanh(node: fx.Node) -> tuple[str, list[float], str] | None:
    return ("hardtanh", [float(arg(node, 1, "min_val", -1.0)), float(arg(node, 2, "max_val", 1.0))], "none")


POST_OPS: dict[Any, Any] = {
    ops.relu: lambda node: ("relu", [], "none"),
    ops.gelu: _gelu,
    ops.silu: lambda node: ("swish", [], "none"),
    ops.sigmoid: lambda node: ("sigmoid", [], "none"),
    ops.tanh: lambda node: ("tanh", [], "none"),
    ops.hardswish: lambda node: ("hardswish", [], "none"),
    ops.hardsigmoid: lambda node: ("hardsigmoid", [], "none"),
    aten.leaky_relu.default: _leaky_relu,
    aten.hardtanh.default: _hardtanh,
}
DTYPES = (torch.float32, torch.bfloat16)
# Below this many input and output features the GEMM is too small for oneDNN's blocked
# kernels to pay for their dispatch; PyTorch's own Linear stays.
MIN_FEATURES = 64


def _fused_linear() -> Any:
    return torch.ops.mkldnn._linear_pointwise.default


@functools.cache
def onednn_unsupported_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """Why this PyTorch build cannot run the fused oneDNN Linear in ``dtype`` (None: it can)."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn)"
    try:
        kernel = _fused_linear()
    except (AttributeError, RuntimeError):
        return "this PyTorch build has no mkldnn._linear_pointwise kernel"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bfloat16 support in oneDNN"
    x = torch.linspace(-2, 2, 24).reshape(3, 8).to(dtype)
    w = torch.linspace(-1, 1, 32).reshape(4, 8).to(dtype)
    b = torch.linspace(0, 1, 4).to(dtype)
    try:
        got = kernel(x, w, b, "gelu", [], "none").float()
    except RuntimeError as exc:
        return f"mkldnn._linear_pointwise failed a probe: {exc}"
    want = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), w.float(), b.float()))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    if not torch.allclose(got, want, rtol=tolerance, atol=tolerance):
        return "mkldnn._linear_pointwise disagreed with PyTorch's Linear on a probe"
    return None


class OneDnnLinear(Lowering):
    """Linear (+ a following activation) -> one fused oneDNN call, on CPU."""

    name = "onednn-linear"
    backends = ("eager",)
    devices = ("cpu",)
    # A CPU kernel choice: opt.graph_module keeps the portable Linear (and stays exportable).
    stage = "kernel"
    after = ("int8-linear",)  # a kernel choice for the graph the graph-stage lowerings wrote
    measured = True

    def probe(self, device: torch.device) -> str | None:
        return onednn_unsupported_reason(torch.float32)

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(self._weights(gm, node) is not None for node in gm.graph.nodes)

    @staticmethod
    def _weights(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
        if not is_op(node, ops.linear) or not isinstance(node.args[0], fx.Node):
            return None
        weight_node, bias_node = arg(node, 1, "weight"), arg(node, 2, "bias")
        weight = constant(gm, weight_node)
        if weight is None or weight.dim() != 2 or weight.dtype not in DTYPES:
            return None
        if min(weight.shape) < MIN_FEATURES:
            return None
        if bias_node is not None:
            bias = constant(gm, bias_node)
            if bias is None or bias.dtype != weight.dtype:
                return None
        if dtype_of(node.args[0]) != weight.dtype or len(shape_of(node.args[0]) or ()) < 2:
            return None
        return weight_node, bias_node

    def lower(self, gm: fx.GraphModule, device: torch.device | None, choose: Choose | None = None) -> LoweringResult:
        result = LoweringResult()
        fused: dict[str, int] = {}
        slower = 0
        refused_bf16 = onednn_unsupported_reason(torch.bfloat16)
        for node in list(gm.graph.nodes):
            weights = self._weights(gm, node)
            if weights is None:
                continue
            dtype = constant(gm, weights[0]).dtype
            if dtype == torch.bfloat16 and refused_bf16:
                result.notes.append(f"'{node.name}' stays a bfloat16 Linear: {refused_bf16}")
                continue
            post_op, out = ("none", [], "none"), node
            users = list(node.users)
            if len(users) == 1 and users[0].target in POST_OPS and users[0].args[0] is node:
                spelled = POST_OPS[users[0].target](users[0])
                if spelled is not None:
                    post_op, out = spelled, users[0]
            name, scalars, algorithm = post_op
            if choose is not None and not _measured_faster(gm, node, out, weights, post_op, choose, result):
                slower += 1
                continue
            with gm.graph.inserting_before(out):
                kernel = gm.graph.call_function(
                    _fused_linear(), (node.args[0], weights[0], weights[1], name, scalars, algorithm))
            kernel.meta.update(out.meta)
            out.replace_all_uses_with(kernel)
            if out is not node:
                gm.graph.erase_node(out)
            gm.graph.erase_node(node)
            fused[name] = fused.get(name, 0) + 1
            result.lowered += 1
            if dtype != torch.float32:
                # Two bfloat16 GEMMs may round their outputs one bfloat16 step apart.
                result.parity_rtol = max(result.parity_rtol or 0.0, exact_tolerance(dtype))
        if result.lowered:
            spelled = ", ".join(f"{count} {'plain' if name == 'none' else '+' + name}"
                                for name, count in sorted(fused.items()))
            result.notes.append(f"{result.lowered} Linears run as fused oneDNN kernels ({spelled})")
        if slower:
            result.notes.append(f"{slower} Linear(s) stay PyTorch's Linear: the fused oneDNN kernel measured "
                                "no faster at their shapes")
        gm.recompile()
        return result


def _measured_faster(gm: fx.GraphModule, node: fx.Node, out: fx.Node, weights: tuple[fx.Node, fx.Node | None],
                     post_op: tuple[str, list[float], str], choose: Choose, result: LoweringResult) -> bool:
    """Whether the fused kernel is faster than PyTorch's Linear (+ the activation ``out``) at
    ``node``'s shapes, as ``choose`` measured it (or found it cached); the choice goes in
    ``result.choices``."""
    weight = constant(gm, weights[0])
    bias = constant(gm, weights[1]) if weights[1] is not None else None
    shapes = measured_shapes(shape_of(node.args[0]))
    name, scalars, algorithm = post_op
    kernel = _fused_linear()

    def fused(x: torch.Tensor) -> torch.Tensor:
        return kernel(x, weight, bias, name, scalars, algorithm)

    def unfused(x: torch.Tensor) -> torch.Tensor:
        y = node.target(x, weight, bias)
        return y if out is node else out.target(y, *out.args[1:], **out.kwargs)

    site = (f"x={'/'.join(map(str, shapes))} w={tuple(weight.shape)} {str(weight.dtype).removeprefix('torch.')} "
            f"bias={bias is not None} post={name}:{algorithm}:{scalars}")
    inputs = measured_inputs(shapes, weight.dtype)
    choice = choose("onednn-linear", site, {"onednn": fused, "aten": unfused}, inputs, prefer="aten")
    result.choices.append({**choice.as_dict(), "nodes": [node.name]})
    return choice.name == "onednn"
