"""Int8 Linear layers: quantization math, the QDQ pattern, and the int8 kernel.

The ``quantize-int8`` pass writes each quantized Linear in the PT2E representation
(``torch.ops.quantized_decomposed``), which every backend understands::

    dynamic activations (per token, symmetric):
        s, zp = choose_qparams_per_token(x, int8)
        x'    = dequantize_per_token(quantize_per_token(x, s, zp, -128, 127), s, zp, -128, 127)
    static activations (per tensor, symmetric, scale from calibration):
        x'    = dequantize_per_tensor(quantize_per_tensor(x, s, 0, -128, 127), s, 0, -128, 127)
    dynamic per-tensor activations (asymmetric uint8, ONNX's DynamicQuantizeLinear scheme):
        s, zp = choose_qparams.tensor(x, 0, 255, eps, uint8)
        x'    = dequantize_per_tensor.tensor(quantize_per_tensor.tensor(x, s, zp, 0, 255), s, zp, 0, 255)
    weights (per output channel, symmetric, quantized once):
        W'    = dequantize_per_channel(Wq, sw, None, 0, -127, 127)
    y = linear(x', W', b)

Backends lower that pattern to one op, ``torch.ops.fxopt.int8_linear(x, Wq, sw, b, s)``,
which quantizes ``x`` exactly as the pattern does, multiplies int8 by int8 with int32
accumulation (``torch._int_mm``) and rescales once: ``y = acc * s_x[:, None] * sw + b``.
Dynamic per-tensor Linears lower to ``torch.ops.fxopt.int8_linear_dynamic_tensor(x, Wq, sw, b)``,
which runs PyTorch's quantized engine (``quantized::linear_dynamic`` on prepacked weights:
quantization, u8 x s8 GEMM and rescale in one kernel) where a probe shows it exact, and
``torch._int_mm`` otherwise. Only the int8 weights and their float32 scales stay in the module.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

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
# Dynamic per-tensor activations: asymmetric uint8, as ONNX's DynamicQuantizeLinear; the
# scale's floor is the one PT2E's dynamic quantization uses.
UQMIN, UQMAX = 0, 255
TENSOR_EPS = float(torch.finfo(torch.float32).eps)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class qops:
    """The quantized_decomposed ops of the QDQ pattern (matched by identity, never by name)."""

    choose_per_token = qd.choose_qparams_per_token.default
    quantize_per_token = qd.quantize_per_token.default
    dequantize_per_token = qd.dequantize_per_token.default
    quantize_per_tensor = qd.quantize_per_tensor.default
    dequantize_per_tensor = qd.dequantize_per_tensor.default
    dequantize_per_channel = qd.dequantize_per_channel.default
    choose_per_tensor = qd.choose_qparams.tensor
    quantize_per_tensor_dynamic = qd.quantize_per_tensor.tensor
    dequantize_per_tensor_dynamic = qd.dequantize_per_tensor.tensor


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


def dynamic_tensor_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric uint8 ``(scale, zero_point)`` of all of ``x``, as choose_qparams.tensor(x, 0,
    255, eps, uint8) computes them (and, up to float rounding, ONNX's DynamicQuantizeLinear):
    scale = (max(max x, 0) - min(min x, 0)) / 255, zero_point = -round(min(min x, 0) / scale)."""
    low, high = torch.aminmax(x)
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = torch.clamp((high - low) / float(UQMAX - UQMIN), min=TENSOR_EPS).float()
    zero_point = (UQMIN - torch.round(low / scale).to(torch.int64)).clamp_(UQMIN, UQMAX)
    return scale, zero_point


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


@torch.library.custom_op("fxopt::int8_linear_dynamic_tensor", mutates_args=())
def int8_linear_dynamic_tensor(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``linear(x, Wq * sw, b)`` with all of ``x`` quantized to uint8 with one dynamic scale
    and zero point (:func:`dynamic_tensor_qparams`)."""
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features)
    packed = _prepacked(qweight, weight_scale, bias) if rows.device.type == "cpu" else None
    if packed is not None:
        out = torch.ops.quantized.linear_dynamic(rows.float(), packed, False)
    else:
        out = _dynamic_tensor_int_mm(rows, qweight, weight_scale, bias)
    return out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


@int8_linear_dynamic_tensor.register_fake
def _int8_linear_dynamic_tensor_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    torch._check(qweight.dtype == torch.int8, lambda: f"qweight must be int8, got {qweight.dtype}")
    torch._check(x.shape[-1] == qweight.shape[1], lambda: "x and qweight disagree on in_features")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _dynamic_tensor_int_mm(rows: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """The per-tensor Linear on ``torch._int_mm``, exact in integers: the uint8 activations are
    shifted by -128 into int8, and the zero point's correction folds into the bias."""
    scale, zero_point = dynamic_tensor_qparams(rows)
    shifted = (zero_point - 128).to(rows.dtype)
    xq = torch.round(rows * float(1.0 / scale.double())).add_(shifted).clamp_(QMIN, QMAX).to(torch.int8)
    acc = _int_mm(xq, qweight)
    # sum_k (xq_k + 128 - zp) * Wq[n, k] = acc + (128 - zp) * sum_k Wq[n, k]
    column_scale = weight_scale.float() * scale
    offset = column_scale * qweight.sum(dim=1, dtype=torch.int32).float() * (-shifted.float())
    if bias is not None:
        offset = offset + bias.float()
    return torch.addcmul(offset, acc, column_scale)


# Weights prepacked for PyTorch's quantized engine, keyed by the int8 weight's id and kept
# only while that tensor lives.
_PACKED: dict[int, tuple[weakref.ref, tuple, object]] = {}


def _prepacked(qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> object | None:
    """``quantized::linear_prepack`` of ``(Wq, sw, b)``, packed once; None when the engine cannot
    run this Linear exactly (see :func:`quantized_engine_unsupported_reason`)."""
    engine = _quantized_engine()
    if engine is None or quantized_engine_unsupported_reason(engine) is not None:
        return None
    key = (engine, qweight._version, weight_scale.data_ptr(), weight_scale._version,
           None if bias is None else (bias.data_ptr(), bias._version, bias.dtype))
    entry = _PACKED.get(id(qweight))
    if entry is not None and entry[0]() is qweight and entry[1] == key:
        return entry[2]
    packed = _pack(engine, qweight, weight_scale, None if bias is None else bias.float())
    ident = id(qweight)
    _PACKED[ident] = (weakref.ref(qweight, lambda _: _PACKED.pop(ident, None)), key, packed)
    return packed


def _quantized_engine() -> str | None:
    # oneDNN's dynamic Linear measured fastest on AVX-512 VNNI (docs/int8.md); "x86" and
    # "fbgemm" run FBGEMM's kernels.
    supported = torch.backends.quantized.supported_engines
    return next((e for e in ("onednn", "x86", "fbgemm") if e in supported), None)


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _pack(engine: str, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> object:
    zeros = torch.zeros(qweight.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor types are deprecated upstream; the kernel is not
        weight = torch._make_per_channel_quantized_tensor(qweight, weight_scale.double(), zeros, 0)
        with _engine(engine):
            return torch.ops.quantized.linear_prepack(weight, bias)


@functools.cache
def quantized_engine_unsupported_reason(engine: str) -> str | None:
    """Why ``quantized::linear_dynamic`` on ``engine`` does not give the exact int32 sums of
    the QDQ graph (None when it does). Without VNNI, u8 x s8 kernels add pairs of products in
    int16 and saturate: activations of 255 against weights of 127 expose that."""
    try:
        qweight = torch.full((4, 64), WEIGHT_QMAX, dtype=torch.int8)
        qweight[1] = -WEIGHT_QMAX
        qweight[2, ::2] = -WEIGHT_QMAX
        weight_scale = torch.ones(4)
        x = torch.zeros(8, 64)
        x[:, 1:] = 255.0  # scale 1, zero point 0: the activations are these integers
        got = torch.ops.quantized.linear_dynamic(x, _pack(engine, qweight, weight_scale, None), False)
    except Exception as exc:  # no such engine in this build
        return f"quantized::linear_dynamic failed on engine '{engine}': {type(exc).__name__}: {str(exc).splitlines()[0]}"
    expected = x.double() @ qweight.double().t()
    if not torch.equal(got.double(), expected):
        return f"quantized::linear_dynamic on engine '{engine}' saturates int8 products (no VNNI)"
    return None


int8_linear_op = torch.ops.fxopt.int8_linear.default
int8_linear_dynamic_tensor_op = torch.ops.fxopt.int8_linear_dynamic_tensor.default


def _int8_linear_flops(node: fx.Node) -> int:
    out, w = shape_of(node), shape_of(node.args[1])
    if out is None or w is None:
        return 0
    return 2 * numel_hint(out[:-1]) * size_hint(w[0]) * size_hint(w[1])


register_flops(int8_linear_op, _int8_linear_flops)
register_flops(int8_linear_dynamic_tensor_op, _int8_linear_flops)


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
    input_scale: float | None  # None: dynamic (per token, or per tensor when dynamic_tensor)
    dynamic_tensor: bool = False


def insert_qdq(
    gm: fx.GraphModule,
    linear: fx.Node,
    qweight: fx.Node,
    weight_scale: fx.Node,
    input_scale: float | None = None,
    dynamic_tensor: bool = False,
) -> None:
    """Rewrite ``linear(x, W, b)`` into the QDQ pattern over the given int8 weight constants:
    activations per token (default), per tensor with ``input_scale``, or per tensor with a
    dynamic uint8 scale and zero point (``dynamic_tensor``)."""
    graph = gm.graph
    x = linear.args[0]
    dtype = linear.meta["val"].dtype
    with graph.inserting_before(linear):
        if dynamic_tensor:
            qparams = graph.call_function(qops.choose_per_tensor, (x, UQMIN, UQMAX, TENSOR_EPS, torch.uint8))
            scale = graph.call_function(operator.getitem, (qparams, 0))
            zero = graph.call_function(operator.getitem, (qparams, 1))
            xq = graph.call_function(qops.quantize_per_tensor_dynamic, (x, scale, zero, UQMIN, UQMAX, torch.uint8))
            xdq = graph.call_function(qops.dequantize_per_tensor_dynamic,
                                      (xq, scale, zero, UQMIN, UQMAX, torch.uint8), {"out_dtype": dtype})
        elif input_scale is None:
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
    if is_op(xdq, qops.dequantize_per_tensor_dynamic):
        xq, scale, zero = xdq.args[:3]
        if xdq.args[3:6] != (UQMIN, UQMAX, torch.uint8) or not is_op(xq, qops.quantize_per_tensor_dynamic):
            return None
        x = xq.args[0]
        if xq.args[1:6] != (scale, zero, UQMIN, UQMAX, torch.uint8) or not _qparams_of(scale, zero):
            return None
        if not is_op(scale.args[0], qops.choose_per_tensor) or scale.args[0].args[:3] != (x, UQMIN, UQMAX):
            return None
        return QdqLinear(linear, x, qweight, weight_scale, bias, None, dynamic_tensor=True)
    if is_op(xdq, qops.dequantize_per_token):
        xq, scale, zero = xdq.args[:3]
        if xdq.args[3:6] != (QMIN, QMAX, torch.int8) or not is_op(xq, qops.quantize_per_token):
            return None
        x = xq.args[0]
        if xq.args[1:6] != (scale, zero, QMIN, QMAX, torch.int8):
            return None
        if not _qparams_of(scale, zero):
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


def _qparams_of(scale: fx.Node, zero: fx.Node) -> bool:
    """``scale, zero = qparams[0], qparams[1]`` of one choose_qparams node."""
    return (scale.target is operator.getitem and zero.target is operator.getitem
            and scale.args[0] is zero.args[0] and (scale.args[1], zero.args[1]) == (0, 1))


# ---------------------------------------------------------------- lowering


@dataclass
class Int8Lowering:
    """What :func:`lower_int8_linears` did: how many Linears run int8, and why others do not."""

    lowered: int = 0
    skipped: list[tuple[str, str]] | None = None
    ops: set[str] = field(default_factory=set)

    def notes(self) -> list[str]:
        lines = []
        if self.lowered:
            lines.append(f"int8: {self.lowered} Linear(s) run on int8 kernels ({', '.join(sorted(self.ops))})")
        for name, reason in self.skipped or []:
            lines.append(f"int8: '{name}' stays dequantize->linear in float: {reason}")
        return lines


def has_qdq_linear(gm: fx.GraphModule) -> bool:
    return any(match_qdq_linear(gm, n) is not None for n in gm.graph.nodes)


def has_int8_linear(gm: fx.GraphModule) -> bool:
    return any(is_op(n, int8_linear_op) or is_op(n, int8_linear_dynamic_tensor_op) for n in gm.graph.nodes)


def lower_int8_linears(gm: fx.GraphModule, device: torch.device | None) -> Int8Lowering:
    """Rewrite every QDQ Linear of ``gm`` (in place) into ``fxopt::int8_linear``.

    ``device`` is where PyTorch will run the graph, or None for a graph bound for ONNX
    (whose int8 kernels ONNX Runtime provides). A pattern the device cannot run stays as it
    is (dequantize, then a float Linear: the same numbers, without the int8 speed) and the
    reason is returned.
    """
    result = Int8Lowering(skipped=[])
    unsupported: str | None = None
    probed = False
    for candidate in list(gm.graph.nodes):
        # Matched one at a time: lowering a Linear replaces the node a later pattern reads
        # (Linear -> Linear chains), so a match taken before that would hold a stale node.
        match = match_qdq_linear(gm, candidate)
        if match is None:
            continue
        if not probed:
            unsupported = int8_unsupported_reason(str(device)) if device is not None else None
            probed = True
        reason = unsupported or _shape_reason(gm, match, device)
        if reason:
            result.skipped.append((match.linear.name, reason))
            continue
        with gm.graph.inserting_before(match.linear):
            if match.dynamic_tensor:
                node = gm.graph.call_function(
                    int8_linear_dynamic_tensor_op, (match.x, match.qweight, match.weight_scale, match.bias))
            else:
                node = gm.graph.call_function(
                    int8_linear_op, (match.x, match.qweight, match.weight_scale, match.bias, match.input_scale))
        node.meta.update(match.linear.meta)
        result.ops.add(f"fxopt::{node.target._opname}")
        match.linear.replace_all_uses_with(node)
        gm.graph.erase_node(match.linear)
        result.lowered += 1
    if result.lowered:
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

    ``fxopt::int8_linear_dynamic_tensor`` exports as ONNX Runtime's own dynamic pattern,
    DynamicQuantizeLinear -> MatMulInteger(xq, Wq^T, zp) -> Cast -> Mul(s_x * sw) -> Add(b),
    which ONNX Runtime fuses into one DynamicQuantizeMatMul on prepacked weights.
    """
    from fxopt.backends.onnx import register_onnx_translation as register

    register(int8_linear_op, _int8_linear_onnx)
    register(int8_linear_dynamic_tensor_op, _int8_linear_dynamic_tensor_onnx)


def _int8_linear_dynamic_tensor_onnx(x, qweight, weight_scale, bias=None):  # type: ignore[no-untyped-def]
    from onnx import TensorProto
    from onnxscript import opset20 as op

    xq, scale, zero_point = op.DynamicQuantizeLinear(op.Cast(x, to=TensorProto.FLOAT))
    acc = op.MatMulInteger(xq, op.Transpose(qweight, perm=[1, 0]), zero_point)
    y = op.Mul(op.Cast(acc, to=TensorProto.FLOAT), op.Mul(scale, weight_scale))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=TensorProto.FLOAT))
    return op.CastLike(y, x)


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
