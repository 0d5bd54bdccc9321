"""Quantization-aware training: the quantized Linears of an optimized graph, trainable.

``fxopt.finetune`` (:mod:`fxopt.distill`) calls :func:`prepare` on its copy of the graph, then
trains, then :func:`convert`::

    int8_linear(x, Wq, sw, b, s)  or  linear(dequantize(quantize(x)), dequantize_per_channel(Wq, sw), b)
      =>  fake_quant_linear(x, b)     W = Wq * sw a float parameter, fake-quantized per output
                                      channel on every step, x fake-quantized as the layer's
                                      recipe quantizes it (per token, per tensor at run time,
                                      or per tensor with a calibrated scale, then learned)
      =>  (after training) the QDQ pattern (:mod:`fxopt.ir.qdq`) over the requantized weight,
          for the backend to lower to its int8 kernel again

    weight_only_linear(x, q, s, z, b, bits, dtype)
      =>  fake_quant_linear(x, b)     W = (q - z) * s fake-quantized group-wise at ``bits``
      =>  weight_only_linear(x, q', s', z', b, bits, dtype)

Rounding passes the gradient straight through (the straight-through estimator); values a
static scale clips get none. Weight scales are refit from the weight on every step; a static
activation scale is learned (LSQ: the gradient of the fake-quantized value with respect to
the scale, on its logarithm) or, with ``activation_scales="refit"``, kept during training
and observed again (min-max over ``data``) after it. Zero points stay as calibrated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import add_constant, constant, is_op, ops, remove_unused_constants
from fxopt.ir.qdq import insert_qdq, match_qdq_linear
from fxopt.kernels import int8 as int8_kernels
from fxopt.kernels.weight_only import weight_only_linear_op
from fxopt.quant import (
    MIN_ABS_MAX,
    QMAX,
    QMIN,
    TENSOR_EPS,
    UQMAX,
    UQMIN,
    WEIGHT_QMAX,
    dequantize_weight_groupwise,
    quantize_weight,
    quantize_weight_groupwise,
    static_asymmetric_qparams,
    static_scale,
)

SCALES = ("learned", "refit")
# The learning rate of the log-scales: AdamW moves each by about this much per step (1%
# relative), whatever the weights' rate, so a scale can halve within a short fine-tuning.
SCALE_LR = 1e-2
PREFIX = "fxopt_qat_"  # the fake-quant submodules' names in the training copy


@dataclass
class Scheme:
    """How one Linear is quantized: ``activations`` is ``"dynamic"`` (per token),
    ``"dynamic-tensor"``, ``"static"`` (``input_scale``, and ``zero_point`` for uint8) or
    ``"float"`` (weight-only, ``bits`` and ``group_size``, the GEMM in ``compute_dtype``)."""

    activations: str
    input_scale: float | None = None
    zero_point: int | None = None
    bits: int = 8
    group_size: int | None = None
    compute_dtype: torch.dtype = torch.float32

    def describe(self) -> str:
        if self.activations == "float":
            return f"weight-only int{self.bits}"
        return f"int8 ({self.activations} activations)"


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class FakeQuantLinear(torch.nn.Module):
    """A Linear whose weight and input are rounded as its quantized form rounds them."""

    def __init__(self, weight: torch.Tensor, scheme: Scheme) -> None:
        super().__init__()
        self.scheme = scheme
        self.weight = torch.nn.Parameter(weight.detach().float().clone())
        self.log_scale: torch.nn.Parameter | None = None
        if scheme.activations == "static":
            self.log_scale = torch.nn.Parameter(torch.tensor(math.log(scheme.input_scale)))
        self.observed: tuple[float, float] | None = None  # (min, max) of x while observing
        self.observing = False

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        scheme = self.scheme
        if self.observing:
            low, high = float(x.detach().min()), float(x.detach().max())
            self.observed = (low, high) if self.observed is None else (min(self.observed[0], low),
                                                                        max(self.observed[1], high))
        if scheme.activations == "float":
            dtype = scheme.compute_dtype
            out = torch.nn.functional.linear(x.to(dtype), self.quantized_weight().to(dtype),
                                             None if bias is None else bias.to(dtype))
            return out.to(x.dtype)
        return torch.nn.functional.linear(self.quantized_input(x).to(x.dtype), self.quantized_weight().to(x.dtype),
                                          bias)

    def quantized_weight(self) -> torch.Tensor:
        w, scheme = self.weight, self.scheme
        if scheme.activations != "float" or (scheme.bits == 8 and scheme.group_size is None):
            scale = w.detach().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / WEIGHT_QMAX
            return ste_round(w / scale).clamp(-WEIGHT_QMAX, WEIGHT_QMAX) * scale
        out_features, in_features = w.shape
        groups = w.reshape(out_features, -1, scheme.group_size or in_features)
        plain = groups.detach()
        if scheme.bits == 8:
            scale = plain.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / WEIGHT_QMAX
            q = ste_round(groups / scale).clamp(-WEIGHT_QMAX, WEIGHT_QMAX) * scale
        else:
            low, high = plain.amin(dim=-1, keepdim=True).clamp(max=0.0), plain.amax(dim=-1, keepdim=True).clamp(min=0.0)
            scale = ((high - low) / 15.0).clamp(min=1e-12)
            zero = torch.round(-low / scale).clamp(0, 15)
            q = (ste_round(groups / scale + zero).clamp(0, 15) - zero) * scale
        return q.reshape(out_features, in_features)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        scheme, x = self.scheme, x.float()
        if scheme.activations == "dynamic":
            scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=MIN_ABS_MAX) / QMAX
            return ste_round(x / scale).clamp(QMIN, QMAX) * scale
        if scheme.activations == "dynamic-tensor":
            plain = x.detach()
            low, high = plain.min().clamp(max=0.0), plain.max().clamp(min=0.0)
            scale = ((high - low) / float(UQMAX - UQMIN)).clamp(min=TENSOR_EPS)
            zero = (UQMIN - torch.round(low / scale)).clamp(UQMIN, UQMAX)
            return (ste_round(x / scale + zero).clamp(UQMIN, UQMAX) - zero) * scale
        assert self.log_scale is not None
        scale = self.log_scale.exp()
        if scheme.zero_point is None:
            return ste_round(x / scale).clamp(QMIN, QMAX) * scale
        zero = float(scheme.zero_point)
        return (ste_round(x / scale + zero).clamp(UQMIN, UQMAX) - zero) * scale


def prepare(gm: fx.GraphModule, learn_scales: bool = True) -> list[tuple[str, FakeQuantLinear]]:
    """Replace every quantized Linear of ``gm`` (in place) by a :class:`FakeQuantLinear` call;
    returns the new submodules by name, in graph order."""
    modules: list[tuple[str, FakeQuantLinear]] = []
    for node in list(gm.graph.nodes):
        found = _quantized_linear(gm, node)
        if found is None:
            continue
        x, weight, bias, scheme = found
        module = FakeQuantLinear(weight, scheme)
        if module.log_scale is not None and not learn_scales:
            module.log_scale.requires_grad_(False)
        name = f"{PREFIX}{len(modules)}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (x, bias))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        modules.append((name, module))
    if modules:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        remove_unused_constants(gm)  # the int8 weights and scales the fake-quant modules replace
        gm.recompile()
    return modules


def _quantized_linear(gm: fx.GraphModule, node: fx.Node
                      ) -> tuple[fx.Node, torch.Tensor, fx.Node | None, Scheme] | None:
    """``(x, float weight, bias node, scheme)`` of a quantized Linear ending in ``node``."""
    if is_op(node, ops.linear):
        match = match_qdq_linear(gm, node)
        if match is None:
            return None
        weight = constant(gm, match.qweight).float() * constant(gm, match.weight_scale)[:, None]
        if match.dynamic_tensor:
            scheme = Scheme("dynamic-tensor")
        elif match.input_scale is None:
            scheme = Scheme("dynamic")
        else:
            scheme = Scheme("static", match.input_scale, match.input_zero_point)
        return match.x, weight, match.bias, scheme
    if is_op(node, *int8_kernels.INT8_LINEAR_OPS):
        x, qweight, weight_scale, bias = node.args[:4]
        weight = constant(gm, qweight).float() * constant(gm, weight_scale)[:, None]
        if node.target == int8_kernels.int8_linear_dynamic_tensor_op:
            scheme = Scheme("dynamic-tensor")
        elif node.target == int8_kernels.int8_linear_static_uint8_op:
            scheme = Scheme("static", float(node.args[4]), int(node.args[5]))
        else:
            scale = node.args[4] if len(node.args) > 4 else None
            scheme = Scheme("dynamic") if scale is None else Scheme("static", float(scale))
        return x, weight, bias, scheme
    if is_op(node, weight_only_linear_op):
        x, qweight, scale, zero, bias, bits, dtype = node.args
        q, s = constant(gm, qweight), constant(gm, scale)
        z = None if zero is None else constant(gm, zero)
        group = None if s.shape[1] == 1 else q.shape[1] // s.shape[1]
        return x, dequantize_weight_groupwise(q, s, z), bias, Scheme("float", bits=bits, group_size=group,
                                                                      compute_dtype=dtype)
    return None


def refit_scales(modules: list[tuple[str, FakeQuantLinear]], run_all: Callable[[], Any]) -> None:
    """Observe every static input's range again (min-max, with ``run_all()`` running the data
    through the trained graph) and set its scale from it, as calibration does."""
    static = [m for _, m in modules if m.log_scale is not None]
    if not static:
        return
    for module in static:
        module.observing, module.observed = True, None
    try:
        with torch.no_grad():
            run_all()
    finally:
        for module in static:
            module.observing = False
    for module in static:
        if module.observed is None:
            continue
        low, high = module.observed
        if module.scheme.zero_point is None:
            scale = static_scale(max(abs(low), abs(high)))
        else:
            scale, zero = static_asymmetric_qparams(low, high)
            module.scheme.zero_point = zero
        module.log_scale.data.fill_(math.log(scale))


def convert(gm: fx.GraphModule, modules: list[tuple[str, FakeQuantLinear]]) -> None:
    """Replace each fake-quant call of ``gm`` (in place) by its quantized form, requantized."""
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name, module in modules:
        call = calls[name]
        x, bias = call.args
        scheme = module.scheme
        weight = module.weight.detach()
        if scheme.activations == "float":
            q, scale, zero = quantize_weight_groupwise(weight, scheme.bits, scheme.group_size)
            q_node = add_constant(gm, q, f"{name}_int{scheme.bits}", before=call)
            scale_node = add_constant(gm, scale, f"{name}_int{scheme.bits}_scale", before=call)
            zero_node = None if zero is None else add_constant(gm, zero, f"{name}_int{scheme.bits}_zero", before=call)
            with gm.graph.inserting_before(call):
                new = gm.graph.call_function(weight_only_linear_op, (x, q_node, scale_node, zero_node, bias,
                                                                     scheme.bits, scheme.compute_dtype))
        else:
            qweight, weight_scale = quantize_weight(weight)
            with gm.graph.inserting_before(call):
                new = gm.graph.call_function(ops.linear, (x, None, bias))
            new.meta.update(call.meta)
            input_scale: float | tuple[float, int] | None = None
            if module.log_scale is not None:
                value = float(module.log_scale.detach().exp())
                input_scale = value if scheme.zero_point is None else (value, scheme.zero_point)
            insert_qdq(gm, new, add_constant(gm, qweight, f"{name}_int8", before=new),
                       add_constant(gm, weight_scale, f"{name}_int8_scale", before=new), input_scale,
                       dynamic_tensor=scheme.activations == "dynamic-tensor")
        new.meta.update(call.meta)
        call.replace_all_uses_with(new)
        gm.graph.erase_node(call)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    remove_unused_constants(gm)
    gm.recompile()


def describe(modules: list[tuple[str, FakeQuantLinear]], scales: str) -> str:
    """``"3 Linears by quantization-aware training (int8 (static activations) x3; scales learned)"``."""
    kinds: dict[str, int] = {}
    for _, module in modules:
        kinds[module.scheme.describe()] = kinds.get(module.scheme.describe(), 0) + 1
    listed = ", ".join(f"{kind} x{count}" for kind, count in kinds.items())
    static = any(m.log_scale is not None for _, m in modules)
    return (f"{len(modules)} quantized Linear(s) by quantization-aware training ({listed}"
            f"{f'; static activation scales {scales}' if static else ''}; straight-through rounding)")
