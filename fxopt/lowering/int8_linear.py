"""The int8 Linear lowering: QDQ Linears -> ``fxopt::int8_linear`` kernels.

    linear(dequantize(quantize(x)), dequantize_per_channel(Wq, sw), b)   (fxopt.ir.qdq)
      => int8_linear(x, Wq, sw, b, s)                 per-token or static per-tensor activations
      => int8_linear_dynamic_tensor(x, Wq, sw, b)     dynamic per-tensor uint8 activations
      => int8_linear_static_uint8(x, Wq, sw, b, s, zp) static per-tensor uint8 activations

On the eager backend the kernels (:mod:`fxopt.kernels.int8`) run on ``torch._int_mm`` or
PyTorch's quantized engine; in ONNX they export as ``MatMulInteger`` subgraphs that ONNX
Runtime runs on its integer kernels. Only the int8 weights and their float32 scales stay in
the module. A Linear the device cannot run in int8 (no int8 GEMM, a shape cuBLASLt refuses,
an integer input) stays as the QDQ graph: the same numbers in float, with the reason noted.
On the eager backend, with a ``choose`` (a measured choice, :mod:`fxopt.pipeline.timings`),
so does a Linear whose int8 kernel measures no faster than its QDQ graph at its shapes (a
CPU without an integer dot product, a GEMM too small to pay for quantizing its input).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import constant, is_op, shape_of
from fxopt.ir.qdq import QdqLinear, has_qdq_linear, match_qdq_linear
from fxopt.kernels import int8 as kernels
from fxopt.latency import Deferred
from fxopt.lowering.base import (
    Choose,
    Lowering,
    LoweringResult,
    OnnxTranslations,
    measured_inputs,
    measured_shapes,
    weights_held_once,
)
from fxopt.quant import FLOAT_DTYPES, MIN_ABS_MAX, QMAX, QMIN


class Int8Linear(Lowering):
    """QDQ Linears of the quantize-int8 pass -> fxopt's int8 GEMM kernels."""

    name = "int8-linear"
    backends = ("eager", "onnx")
    devices = ("cpu", "cuda")
    # Two correct int8 runtimes round the same activations, but float differences of 1e-7
    # in LayerNorm/GELU/softmax move some values across a rounding boundary, and each such
    # value is off by one quantization step; over wide layers that adds up to a few 1e-3
    # (BERT-base: ~4e-3 after two layers). 5e-2 leaves an order of magnitude of headroom
    # and still catches a wrong scale or zero point, which is off by far more.
    parity_rtol = 0.05
    measured = True

    def probe(self, device: torch.device) -> str | None:
        # Looked up on the module at call time, so tests can stand in for a device.
        return kernels.int8_unsupported_reason(str(device))

    def applies(self, gm: fx.GraphModule) -> bool:
        return has_qdq_linear(gm) or any(is_op(n, *kernels.INT8_LINEAR_OPS) for n in gm.graph.nodes)

    def lower(self, gm: fx.GraphModule, device: torch.device | None, choose: Choose | None = None) -> LoweringResult:
        return lower_int8_linears(gm, device, choose)

    def onnx_translations(self) -> OnnxTranslations:
        return {
            kernels.int8_linear_op: int8_linear_onnx,
            kernels.int8_linear_dynamic_tensor_op: int8_linear_dynamic_tensor_onnx,
            kernels.int8_linear_static_uint8_op: int8_linear_static_uint8_onnx,
        }


def lower_int8_linears(gm: fx.GraphModule, device: torch.device | None,
                       choose: Choose | None = None) -> LoweringResult:
    """Rewrite every QDQ Linear of ``gm`` (in place) into an int8 kernel.

    ``device`` is where PyTorch will run the graph, or None for a graph bound for ONNX
    (whose int8 kernels ONNX Runtime provides). A pattern the device cannot run stays as it
    is (dequantize, then a float Linear: the same numbers, without the int8 speed) and the
    reason is noted. With ``choose`` (never for ONNX), a pattern is lowered only where its
    kernel measures faster than the pattern itself.
    """
    result = LoweringResult()
    kernel_names: set[str] = set()
    skipped: list[str] = []
    for candidate in list(gm.graph.nodes):
        # Matched one at a time: lowering a Linear replaces the node a later pattern reads
        # (Linear -> Linear chains), so a match taken before that would hold a stale node.
        match = match_qdq_linear(gm, candidate)
        if match is None:
            continue
        reason = _shape_reason(gm, match, device)
        if reason:
            skipped.append(f"'{match.linear.name}' stays dequantize->linear in float: {reason}")
            continue
        kernel, args = _kernel_call(match)
        if choose is not None and device is not None:
            chosen = _measured_fastest(gm, match, kernel, args, device, choose, result)
            if chosen is None:
                skipped.append(f"'{match.linear.name}' stays dequantize->linear in float: its int8 kernel "
                               "measured no faster at its shapes")
                continue
            args = chosen
        with gm.graph.inserting_before(match.linear):
            node = gm.graph.call_function(kernel, args)
        node.meta.update(match.linear.meta)
        kernel_names.add(f"fxopt::{node.target._opname}")
        match.linear.replace_all_uses_with(node)
        gm.graph.erase_node(match.linear)
        result.lowered += 1
    if result.lowered:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        result.notes.append(f"{result.lowered} Linear(s) run on int8 kernels ({', '.join(sorted(kernel_names))})")
    result.notes.extend(skipped)
    return result


def _kernel_call(match: QdqLinear) -> tuple[Any, tuple[Any, ...]]:
    """The int8 kernel that computes ``match`` and its arguments."""
    if match.dynamic_tensor:
        return kernels.int8_linear_dynamic_tensor_op, (match.x, match.qweight, match.weight_scale, match.bias)
    if match.input_zero_point is not None:
        return kernels.int8_linear_static_uint8_op, (match.x, match.qweight, match.weight_scale, match.bias,
                                                     match.input_scale, match.input_zero_point)
    return kernels.int8_linear_op, (match.x, match.qweight, match.weight_scale, match.bias, match.input_scale)


def _measured_fastest(gm: fx.GraphModule, match: QdqLinear, kernel: Any, args: tuple[Any, ...],
                      device: torch.device, choose: Choose, result: LoweringResult) -> tuple[Any, ...] | None:
    """The kernel's arguments if the int8 kernel is faster than the QDQ pattern it replaces (run
    as it stands in the graph) at ``match``'s shapes, as ``choose`` measured it, else None. A
    dynamic per-tensor Linear on CPU is measured on each exact quantized engine (oneDNN's
    kernels won from 64 rows up on an AVX-512 VNNI CPU, FBGEMM's for a few rows), and runs on
    the fastest. The choice goes in ``result.choices``."""
    pattern = _pattern_module(gm, match)
    x = match.x.meta["val"]
    shapes = measured_shapes(shape_of(match.x))
    weight = tuple(constant(gm, match.qweight).shape)
    variants = {"int8": args}
    if kernel is kernels.int8_linear_dynamic_tensor_op and device.type == "cpu":
        preferred = kernels.preferred_engine()
        variants.update({f"int8-{engine}": (*args, engine) for engine in kernels.exact_engines()
                         if engine != preferred and engine != "x86"})  # x86 runs FBGEMM's dynamic Linear
    # "+kernels": the int8 side is timed as it will run, after the kernel-stage lowerings
    # that take its op further (e.g. onto oneDNN's int8 kernel), not as the bare op.
    site = (f"x={'/'.join(map(str, shapes))} {str(x.dtype).removeprefix('torch.')} {device.type} w={weight} "
            f"kernel={kernel._opname}+kernels bias={match.bias is not None}")
    # each lowered (its weight packed) only where the choice is measured, not cached
    candidates = {name: Deferred(lambda variant=variant: _kernel_module(gm, match, kernel, variant, device, choose))
                  for name, variant in variants.items()}
    choice = choose("int8-linear", site, {**candidates, "qdq": pattern},
                    measured_inputs(shapes, x.dtype, device), prefer="qdq")
    name = _single_copy_where_close(choice.name, choice.times)
    result.choices.append({**choice.as_dict(), "chosen": name, "nodes": [match.linear.name]})
    for module in (c.value for c in candidates.values() if c.value is not None):
        # A graph module and its graph refer to each other: the packs a measured module holds
        # would wait for a garbage collection, a large model's sites' packs piling up till then.
        for child in list(module._modules):
            delattr(module, child)
    chosen = variants.get(name)
    if kernel is kernels.int8_linear_dynamic_tensor_op and device.type == "cpu":
        # the engines that lost hold a pack of the weight each: they go now, not with the weight
        engine = None if chosen is None else chosen[4] if len(chosen) > 4 else ""
        kernels.forget_packs(constant(gm, match.qweight), keep=engine)
    return chosen


def _single_copy_where_close(name: str, times: dict[str, list[float]]) -> str:
    """``name``, or FBGEMM's engine where ``name`` runs on oneDNN's (the preferred engine, whose
    pack holds the weight twice) and FBGEMM's measured close to it
    (:func:`fxopt.kernels.int8.close_enough`)."""
    if name != "int8" or not kernels.holds_weight_twice("") or not times.get("int8-fbgemm"):
        return name
    return "int8-fbgemm" if weights_held_once() or kernels.close_enough(times["int8-fbgemm"], times["int8"]) else name


def _kernel_module(gm: fx.GraphModule, match: QdqLinear, kernel: Any, args: tuple[Any, ...],
                   device: torch.device, choose: Choose) -> fx.GraphModule:
    """``kernel(x, *args[1:])`` as a module of its own, after the kernel-stage lowerings that
    apply to it on ``device`` (measured with ``choose`` like the graph's own sites)."""
    from fxopt.lowering import lower_graph  # the package imports this module

    owner, graph = torch.nn.Module(), fx.Graph()
    x = graph.placeholder("x")
    x.meta.update(match.x.meta)
    call_args: list[Any] = [x]
    for index, value in enumerate(args[1:]):
        if isinstance(value, fx.Node):
            owner.register_buffer(f"c{index}", constant(gm, value))
            value_node = graph.get_attr(f"c{index}")
            value_node.meta.update(value.meta)
            call_args.append(value_node)
        else:
            call_args.append(value)
    out = graph.call_function(kernel, tuple(call_args))
    out.meta.update(match.linear.meta)
    graph.output(out)
    lowered = lower_graph(fx.GraphModule(owner, graph), "eager", device, "kernel", choose=choose).graph_module
    lowered.recompile()
    return lowered


def _pattern_module(gm: fx.GraphModule, match: QdqLinear) -> fx.GraphModule:
    """The nodes that compute ``match.linear`` from ``match.x``, as a module of their own
    (sharing ``gm``'s constants)."""
    needed: list[fx.Node] = []
    seen: set[fx.Node] = {match.x}
    stack = [match.linear]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        needed.append(node)
        stack.extend(n for n in node.all_input_nodes if n not in seen)
    graph = fx.Graph()
    mapping = {match.x: graph.placeholder("x")}
    for node in gm.graph.nodes:  # in the graph's (topological) order
        if node in needed:
            mapping[node] = graph.node_copy(node, lambda n: mapping[n])
    graph.output(mapping[match.linear])
    return fx.GraphModule(gm, graph)


def _shape_reason(gm: fx.GraphModule, match: QdqLinear, device: torch.device | None) -> str | None:
    dtype = match.x.meta["val"].dtype if "val" in match.x.meta else None
    if dtype is not None and dtype not in FLOAT_DTYPES:
        return f"input dtype {dtype} is not one of float32, float16, bfloat16"
    if device is not None and device.type == "cuda":
        out_features, in_features = constant(gm, match.qweight).shape
        multiple = kernels.CUDA_MULTIPLE
        if in_features % multiple or out_features % multiple:
            return (f"CUDA's int8 GEMM needs in/out features that are multiples of {multiple}, "
                    f"got {in_features}x{out_features}")
    return None


# ---------------------------------------------------------------- ONNX translations
#
# Per token:  s = max(|x|, 1e-5) / 127 over the last axis; xq = Round(x * (1/s));
# y = Cast<float>(MatMulInteger(Cast<uint8>(xq + 128), Wq^T, zero_point=128)) * s * sw + b.
# Per tensor: the same with the fixed scale and a Clip to [-128, 127]. The op order mirrors
# the torch kernel, so both round the same activations to the same integers.
#
# Dynamic per tensor exports as ONNX Runtime's own dynamic pattern,
# DynamicQuantizeLinear -> MatMulInteger(xq, Wq^T, zp) -> Cast -> Mul(s_x * sw) -> Add(b),
# which ONNX Runtime fuses into one DynamicQuantizeMatMul on prepacked weights.


def int8_linear_dynamic_tensor_onnx(x, qweight, weight_scale, bias=None, engine=""):  # type: ignore[no-untyped-def]
    from onnx import TensorProto
    from onnxscript import opset20 as op

    xq, scale, zero_point = op.DynamicQuantizeLinear(op.Cast(x, to=TensorProto.FLOAT))
    acc = op.MatMulInteger(xq, op.Transpose(qweight, perm=[1, 0]), zero_point)
    y = op.Mul(op.Cast(acc, to=TensorProto.FLOAT), op.Mul(scale, weight_scale))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=TensorProto.FLOAT))
    return op.CastLike(y, x)


def int8_linear_static_uint8_onnx(x, qweight, weight_scale, bias=None, input_scale=1.0,  # type: ignore[no-untyped-def]
                                  input_zero_point=0):
    from onnx import TensorProto
    from onnxscript import opset20 as op

    scale = op.Constant(value_float=float(input_scale))
    zero_point = op.Constant(value=_uint8_scalar(int(input_zero_point)))
    xq = op.QuantizeLinear(op.Cast(x, to=TensorProto.FLOAT), scale, zero_point)
    acc = op.MatMulInteger(xq, op.Transpose(qweight, perm=[1, 0]), zero_point)
    y = op.Mul(op.Cast(acc, to=TensorProto.FLOAT), op.Mul(scale, weight_scale))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=TensorProto.FLOAT))
    return op.CastLike(y, x)


def int8_linear_onnx(x, qweight, weight_scale, bias=None, input_scale=None):  # type: ignore[no-untyped-def]
    from onnx import TensorProto
    from onnxscript import opset20 as op

    xf = op.Cast(x, to=TensorProto.FLOAT)
    weight_t = op.Transpose(qweight, perm=[1, 0])
    if input_scale is None:
        amax = op.ReduceMax(op.Abs(xf), op.Constant(value_ints=[-1]), keepdims=1)
        scale = op.Div(op.Max(amax, op.Constant(value_float=MIN_ABS_MAX)), op.Constant(value_float=float(QMAX)))
        rounded = op.Round(op.Mul(xf, op.Reciprocal(scale)))
    else:
        inverse = op.Constant(value_float=float(torch.tensor(1.0 / input_scale, dtype=torch.float32)))
        rounded = op.Clip(op.Round(op.Mul(xf, inverse)), op.Constant(value_float=float(QMIN)),
                          op.Constant(value_float=float(QMAX)))
        scale = op.Constant(value_float=float(input_scale))
    # The int8 values shifted by 128 into uint8 with zero point 128: the same integers, on
    # ONNX Runtime's fast u8 x s8 GEMM (its s8 x s8 path is several times slower on CPU).
    shifted = op.Cast(op.Add(rounded, op.Constant(value_float=128.0)), to=TensorProto.UINT8)
    zero_point = op.Constant(value=_uint8_scalar(128))
    acc = op.Cast(op.MatMulInteger(shifted, weight_t, zero_point), to=TensorProto.FLOAT)
    if input_scale is None:
        y = op.Mul(op.Mul(acc, scale), weight_scale)
    else:
        y = op.Mul(acc, op.Mul(weight_scale, scale))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=TensorProto.FLOAT))
    return op.CastLike(y, x)


def _uint8_scalar(value: int) -> Any:
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(value, dtype=np.uint8))
