"""Int8 Linear layers: quantization math, the QDQ pattern, and the int8 kernel.

The ``quantize-int8`` pass writes each quantized Linear in the PT2E representation
(``torch.ops.quantized_decomposed``), which every backend understands::

    dynamic activations (per token, symmetric):
        s, zp = choose_qparams_per_token(x, int8)
        x'    = dequantize_per_token(quantize_per_token(x, s, zp, -128, 127), s, zp, -128, 127)
    static activations (per tensor, symmetric, scale from calibration):
        x'    = dequantize_per_tensor(quantize_per_tensor(x, s, 0, -128, 127), s, 0, -128, 127)
    weights (per output channel, symmetric, quantized once):
        W'    = dequantize_per_channel(Wq, sw, None, 0, -127, 127)
    y = linear(x', W', b)

Backends lower that pattern to one op, ``torch.ops.fxopt.int8_linear(x, Wq, sw, b, s)``,
which quantizes ``x`` exactly as the pattern does, multiplies int8 by int8 with int32
accumulation (``torch._int_mm``) and rescales once: ``y = acc * s_x[:, None] * sw + b``.
Only the int8 weights and their float32 scales stay in the module.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.fx as fx

from fxopt.cost import register_flops
from fxopt.ir import constant, is_op, numel_hint, shape_of, size_hint

qd = torch.ops.quantized_decomposed

QMIN, QMAX = -128, 127
WEIGHT_QMAX = 127  # weights use [-127, 127] so that the range is symmetric
# choose_qparams_per_token's floor on a row's absolute maximum (keeps all-zero rows finite).
MIN_ABS_MAX = 1e-5
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class qops:
    """The quantized_decomposed ops of the QDQ pattern (matched by identity, never by name)."""

    choose_per_token = qd.choose_qparams_per_token.default
    quantize_per_token = qd.quantize_per_token.default
    dequantize_per_token = qd.dequantize_per_token.default
    quantize_per_tensor = qd.quantize_per_tensor.default
    dequantize_per_tensor = qd.dequantize_per_tensor.default
    dequantize_per_channel = qd.dequantize_per_channel.default


# ---------------------------------------------------------------- quantization math


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(Wq [out, in] int8, scale [out] float32)``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / WEIGHT_QMAX
    qweight = torch.round(w / scale[:, None]).clamp(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
    return qweight.contiguous(), scale.contiguous()


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of a 2-D ``x``: ``(xq, scale [rows, 1])``.

    The same numbers as choose_qparams_per_token + quantize_per_token, so the int8 kernel
    agrees with the QDQ graph it replaces, in fewer passes over ``x``: max|x| as
    max(max x, -min x) needs no |x| buffer, and in float32 ``x / scale`` cannot leave
    [-127, 127] (scale is max|x| / 127), so the clamp is only needed for 16-bit inputs.
    """
    scale = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    if scale.dtype == torch.float16:
        scale = scale.float()
    scale = scale.clamp_(min=MIN_ABS_MAX).div_(QMAX)
    scaled = x.mul(1.0 / scale).round_()
    if scaled.dtype != torch.float32:
        scaled.clamp_(QMIN, QMAX)
    return scaled.to(torch.int8), scale


def quantize_per_tensor(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric per-tensor int8, as quantize_per_tensor(x, scale, 0, -128, 127) computes it."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    scaled = x * (1.0 / scale)
    return scaled.round_().clamp_(QMIN, QMAX).to(torch.int8)


def static_scale(abs_max: float) -> float:
    """The per-tensor scale for activations observed up to ``abs_max`` in magnitude."""
    return max(float(abs_max), MIN_ABS_MAX) / QMAX


# ---------------------------------------------------------------- the int8 kernel

# cuBLASLt's int8 GEMM (torch._int_mm on CUDA) takes more than 16 rows and in/out sizes
# that are multiples of 8; the CPU kernel takes any size.
CUDA_MIN_ROWS = 17
CUDA_MULTIPLE = 8


@torch.library.custom_op("fxopt::int8_linear", mutates_args=())
def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: float | None,
) -> torch.Tensor:
    """``linear(x, Wq * sw, b)`` with ``x`` quantized to int8 per token (``input_scale``
    None) or per tensor with ``input_scale``; int32 accumulation, one fused rescale."""
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features)
    if input_scale is None:
        xq, row_scale = quantize_per_token(rows)
    else:
        xq = quantize_per_tensor(rows, input_scale)
    acc = _int_mm(xq, qweight)
    # One pass casts and scales by rows, one more scales columns and adds the bias in place.
    if input_scale is None:
        out = torch.mul(acc, row_scale.float())
        if bias is None:
            out.mul_(weight_scale)
        else:
            torch.addcmul(bias.to(out.dtype), out, weight_scale, out=out)
    else:
        out = torch.mul(acc, weight_scale * input_scale)
        if bias is not None:
            out.add_(bias)
    return out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


@int8_linear.register_fake
def _int8_linear_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: float | None,
) -> torch.Tensor:
    torch._check(qweight.dtype == torch.int8, lambda: f"qweight must be int8, got {qweight.dtype}")
    torch._check(x.shape[-1] == qweight.shape[1], lambda: "x and qweight disagree on in_features")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _int_mm(xq: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """``xq [M, K] @ qweight[N, K]^T`` in int32; pads the rows CUDA's kernel needs."""
    rows = xq.shape[0]
    if xq.is_cuda and rows < CUDA_MIN_ROWS:
        xq = torch.nn.functional.pad(xq, (0, 0, 0, CUDA_MIN_ROWS - rows))
        return torch._int_mm(xq, qweight.t())[:rows]
    return torch._int_mm(xq, qweight.t())


int8_linear_op = torch.ops.fxopt.int8_linear.default


def _int8_linear_flops(node: fx.Node) -> int:
    out, w = shape_of(node), shape_of(node.args[1])
    if out is None or w is None:
        return 0
    return 2 * numel_hint(out[:-1]) * size_hint(w[0]) * size_hint(w[1])


register_flops(int8_linear_op, _int8_linear_flops)


@functools.cache
def int8_unsupported_reason(device: str) -> str | None:
    """Why ``device`` cannot run int8 GEMMs (None when it can): a small probe, once per device."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        return f"no int8 GEMM on device type '{dev.type}'"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        a = torch.arange(-64, 64, dtype=torch.int8, device=dev).reshape(32, 4).repeat(1, 8)
        b = torch.arange(-32, 32, dtype=torch.int8, device=dev).reshape(32, 2).repeat(1, 16)
        got = torch._int_mm(a, b).cpu()
    except Exception as exc:  # no int8 kernel for this build or GPU
        return f"torch._int_mm failed on {device}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    expected = a.cpu().long() @ b.cpu().long()
    if not torch.equal(got.long(), expected):
        return f"torch._int_mm gives wrong results on {device}"
    return None


# ---------------------------------------------------------------- the QDQ pattern


@dataclass
class QdqLinear:
    """A matched ``linear(dequantize(quantize(x)), dequantize_per_channel(Wq), b)``."""

    linear: fx.Node
    x: fx.Node
    qweight: fx.Node
    weight_scale: fx.Node
    bias: fx.Node | None
    input_scale: float | None  # None: dynamic per-token


def insert_qdq(
    gm: fx.GraphModule,
    linear: fx.Node,
    qweight: fx.Node,
    weight_scale: fx.Node,
    input_scale: float | None = None,
) -> None:
    """Rewrite ``linear(x, W, b)`` into the QDQ pattern over the given int8 weight constants."""
    graph = gm.graph
    x = linear.args[0]
    dtype = linear.meta["val"].dtype
    with graph.inserting_before(linear):
        if input_scale is None:
            qparams = graph.call_function(qops.choose_per_token, (x, torch.int8))
            scale = graph.call_function(operator.getitem, (qparams, 0))
            zero = graph.call_function(operator.getitem, (qparams, 1))
            xq = graph.call_function(qops.quantize_per_token, (x, scale, zero, QMIN, QMAX, torch.int8))
            xdq = graph.call_function(qops.dequantize_per_token,
                                      (xq, scale, zero, QMIN, QMAX, torch.int8, dtype))
        else:
            xq = graph.call_function(qops.quantize_per_tensor, (x, input_scale, 0, QMIN, QMAX, torch.int8))
            xdq = graph.call_function(qops.dequantize_per_tensor, (xq, input_scale, 0, QMIN, QMAX, torch.int8),
                                      {"out_dtype": dtype})
        wdq = graph.call_function(qops.dequantize_per_channel,
                                  (qweight, weight_scale, None, 0, -WEIGHT_QMAX, WEIGHT_QMAX, torch.int8),
                                  {"out_dtype": dtype})
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    linear.args = (xdq, wdq, bias)
    linear.kwargs = {}


def match_qdq_linear(gm: fx.GraphModule, linear: fx.Node) -> QdqLinear | None:
    """The QDQ pattern ending in ``linear``, or None when ``linear`` is not one."""
    from fxopt.ir import ops

    if not is_op(linear, ops.linear) or linear.kwargs:
        return None
    xdq, wdq = linear.args[0], linear.args[1]
    bias = linear.args[2] if len(linear.args) > 2 else None
    if not is_op(wdq, qops.dequantize_per_channel) or wdq.args[2:7] != (None, 0, -WEIGHT_QMAX, WEIGHT_QMAX, torch.int8):
        return None
    qweight, weight_scale = wdq.args[0], wdq.args[1]
    qw, ws = constant(gm, qweight), constant(gm, weight_scale)
    if qw is None or ws is None or qw.dtype != torch.int8 or qw.dim() != 2 or ws.dtype != torch.float32:
        return None
    if bias is not None and constant(gm, bias) is None:
        return None
    if is_op(xdq, qops.dequantize_per_token):
        xq, scale, zero = xdq.args[:3]
        if xdq.args[3:6] != (QMIN, QMAX, torch.int8) or not is_op(xq, qops.quantize_per_token):
            return None
        x = xq.args[0]
        if xq.args[1:6] != (scale, zero, QMIN, QMAX, torch.int8):
            return None
        if not (scale.target is operator.getitem and zero.target is operator.getitem and scale.args[0] is zero.args[0]
                and (scale.args[1], zero.args[1]) == (0, 1)):
            return None
        qparams = scale.args[0]
        if not is_op(qparams, qops.choose_per_token) or qparams.args != (x, torch.int8):
            return None
        return QdqLinear(linear, x, qweight, weight_scale, bias, None)
    if is_op(xdq, qops.dequantize_per_tensor):
        xq = xdq.args[0]
        if not is_op(xq, qops.quantize_per_tensor):
            return None
        scale = xq.args[1]
        if xq.args[2:6] != (0, QMIN, QMAX, torch.int8) or xdq.args[1:6] != (scale, 0, QMIN, QMAX, torch.int8):
            return None
        return QdqLinear(linear, xq.args[0], qweight, weight_scale, bias, float(scale))
    return None


# ---------------------------------------------------------------- lowering


@dataclass
class Int8Lowering:
    """What :func:`lower_int8_linears` did: how many Linears run int8, and why others do not."""

    lowered: int = 0
    skipped: list[tuple[str, str]] | None = None

    def notes(self) -> list[str]:
        lines = []
        if self.lowered:
            lines.append(f"int8: {self.lowered} Linear(s) run on int8 kernels (fxopt::int8_linear)")
        for name, reason in self.skipped or []:
            lines.append(f"int8: '{name}' stays dequantize->linear in float: {reason}")
        return lines


def has_qdq_linear(gm: fx.GraphModule) -> bool:
    return any(match_qdq_linear(gm, n) is not None for n in gm.graph.nodes)


def has_int8_linear(gm: fx.GraphModule) -> bool:
    return any(is_op(n, int8_linear_op) for n in gm.graph.nodes)


def lower_int8_linears(gm: fx.GraphModule, device: torch.device | None) -> Int8Lowering:
    """Rewrite every QDQ Linear of ``gm`` (in place) into ``fxopt::int8_linear``.

    ``device`` is where PyTorch will run the graph, or None for a graph bound for ONNX
    (whose int8 kernels ONNX Runtime provides). A pattern the device cannot run stays as it
    is (dequantize, then a float Linear: the same numbers, without the int8 speed) and the
    reason is returned.
    """
    result = Int8Lowering(skipped=[])
    matches = [m for m in (match_qdq_linear(gm, n) for n in list(gm.graph.nodes)) if m is not None]
    if not matches:
        return result
    unsupported = int8_unsupported_reason(str(device)) if device is not None else None
    for match in matches:
        reason = unsupported or _shape_reason(gm, match, device)
        if reason:
            result.skipped.append((match.linear.name, reason))
            continue
        with gm.graph.inserting_before(match.linear):
            node = gm.graph.call_function(
                int8_linear_op, (match.x, match.qweight, match.weight_scale, match.bias, match.input_scale)
            )
        node.meta.update(match.linear.meta)
        match.linear.replace_all_uses_with(node)
        gm.graph.erase_node(match.linear)
        result.lowered += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return result


def _shape_reason(gm: fx.GraphModule, match: QdqLinear, device: torch.device | None) -> str | None:
    dtype = match.x.meta["val"].dtype if "val" in match.x.meta else None
    if dtype is not None and dtype not in FLOAT_DTYPES:
        return f"input dtype {dtype} is not one of float32, float16, bfloat16"
    if device is not None and device.type == "cuda":
        out_features, in_features = constant(gm, match.qweight).shape
        if in_features % CUDA_MULTIPLE or out_features % CUDA_MULTIPLE:
            return (f"CUDA's int8 GEMM needs in/out features that are multiples of {CUDA_MULTIPLE}, "
                    f"got {in_features}x{out_features}")
    return None


# ---------------------------------------------------------------- ONNX


def register_onnx_translation() -> None:
    """Make ``fxopt::int8_linear`` exportable: ONNX Runtime runs it as ``MatMulInteger``.

    Per token:  s = max(|x|, 1e-5) / 127 over the last axis; xq = Round(x * (1/s));
    y = Cast<float>(MatMulInteger(Cast<uint8>(xq + 128), Wq^T, zero_point=128)) * s * sw + b.
    Per tensor: the same with the fixed scale and a Clip to [-128, 127]. The op order mirrors
    the torch kernel, so both round the same activations to the same integers.
    """
    from fxopt.backends.onnx import register_onnx_translation as register

    register(int8_linear_op, _int8_linear_onnx)


def _int8_linear_onnx(x, qweight, weight_scale, bias=None, input_scale=None):  # type: ignore[no-untyped-def]
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


def _uint8_scalar(value: int):  # type: ignore[no-untyped-def]
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(value, dtype=np.uint8))
