"""Int8 Linear kernels: ``torch.ops.fxopt.int8_linear`` and ``int8_linear_dynamic_tensor``.

``int8_linear(x, Wq, sw, b, s)`` quantizes ``x`` exactly as the QDQ pattern of the
quantize-int8 pass does (per token when ``s`` is None, per tensor with scale ``s``),
multiplies int8 by int8 with int32 accumulation (``torch._int_mm``) and rescales once:
``y = acc * s_x[:, None] * sw + b``. ``int8_linear_dynamic_tensor(x, Wq, sw, b)`` quantizes
all of ``x`` to uint8 with one dynamic scale and zero point and runs PyTorch's quantized
engine (``quantized::linear_dynamic`` on prepacked weights: quantization, u8 x s8 GEMM and
rescale in one kernel) where a probe shows it exact, and ``torch._int_mm`` otherwise.
``int8_linear_static_uint8(x, Wq, sw, b, s, zp)`` quantizes ``x`` to uint8 with a calibrated
scale and zero point and runs ``torch._int_mm`` (on CPU the eager backend's oneDNN lowering
replaces it with ``onednn.qlinear_pointwise``).

Importing this module registers the ops, their fake implementations and FLOP counts; the
probes (:func:`int8_unsupported_reason`, :func:`quantized_engine_unsupported_reason`) run
on first use only.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.fx as fx

from fxopt.cost import register_flops
from fxopt.ir import numel_hint, shape_of, size_hint
from fxopt.quant import (
    FLOAT_DTYPES,
    QMAX,
    QMIN,
    WEIGHT_QMAX,
    dynamic_tensor_qparams,
    quantize_per_tensor,
    quantize_per_token,
)

__all__ = [
    "CUDA_MIN_ROWS", "CUDA_MULTIPLE", "FLOAT_DTYPES", "dynamic_tensor_qparams", "int8_linear",
    "INT8_LINEAR_OPS", "int8_linear_dynamic_tensor", "int8_linear_dynamic_tensor_op", "int8_linear_op",
    "int8_linear_static_uint8", "int8_linear_static_uint8_op",
    "forget_packs", "int8_unsupported_reason", "prepacked", "quantize_per_tensor", "quantize_per_token",
    "quantized_engine_unsupported_reason",
]

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
    engine: str = "",
) -> torch.Tensor:
    """``linear(x, Wq * sw, b)`` with all of ``x`` quantized to uint8 with one dynamic scale
    and zero point (:func:`dynamic_tensor_qparams`). On CPU it runs on PyTorch's quantized
    engine ``engine`` ("" for :func:`preferred_engine`; the lowering measures which is faster
    at a site's shapes), else on ``torch._int_mm``."""
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features)
    packed = prepacked(qweight, weight_scale, bias, engine) if rows.device.type == "cpu" else None
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
    engine: str = "",
) -> torch.Tensor:
    torch._check(qweight.dtype == torch.int8, lambda: f"qweight must be int8, got {qweight.dtype}")
    torch._check(x.shape[-1] == qweight.shape[1], lambda: "x and qweight disagree on in_features")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _dynamic_tensor_int_mm(rows: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    scale, zero_point = dynamic_tensor_qparams(rows)
    return _uint8_int_mm(rows, qweight, weight_scale, bias, scale, zero_point)


def _uint8_int_mm(rows: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The per-tensor uint8 Linear on ``torch._int_mm``, exact in integers: the uint8 activations
    are shifted by -128 into int8, and the zero point's correction folds into the bias."""
    shifted = (zero_point - 128).to(rows.dtype)
    xq = torch.round(rows * float(1.0 / scale.double())).add_(shifted).clamp_(QMIN, QMAX).to(torch.int8)
    acc = _int_mm(xq, qweight)
    # sum_k (xq_k + 128 - zp) * Wq[n, k] = acc + (128 - zp) * sum_k Wq[n, k]
    column_scale = weight_scale.float() * scale
    offset = column_scale * qweight.sum(dim=1, dtype=torch.int32).float() * (-shifted.float())
    if bias is not None:
        offset = offset + bias.float()
    return torch.addcmul(offset, acc, column_scale)


@torch.library.custom_op("fxopt::int8_linear_static_uint8", mutates_args=())
def int8_linear_static_uint8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: float,
    input_zero_point: int,
) -> torch.Tensor:
    """``linear(x, Wq * sw, b)`` with ``x`` quantized to uint8 with a calibrated scale and zero
    point: ``clamp(round(x / s) + zp, 0, 255)``."""
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features)
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    scale = torch.tensor(input_scale, dtype=torch.float32, device=x.device)
    zero_point = torch.tensor(input_zero_point, dtype=torch.int64, device=x.device)
    out = _uint8_int_mm(rows, qweight, weight_scale, bias, scale, zero_point)
    return out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


@int8_linear_static_uint8.register_fake
def _int8_linear_static_uint8_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: float,
    input_zero_point: int,
) -> torch.Tensor:
    torch._check(qweight.dtype == torch.int8, lambda: f"qweight must be int8, got {qweight.dtype}")
    torch._check(x.shape[-1] == qweight.shape[1], lambda: "x and qweight disagree on in_features")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# Weights prepacked for PyTorch's quantized engines, keyed by the int8 weight's id and the
# engine, and kept only while that tensor lives.
_PACKED: dict[tuple[int, str], tuple[weakref.ref, tuple, object]] = {}


def prepacked(qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               engine: str = "") -> object | None:
    """``quantized::linear_prepack`` of ``(Wq, sw, b)`` for ``engine`` ("": the preferred one),
    packed once; None when the engine cannot run this Linear exactly (see
    :func:`quantized_engine_unsupported_reason`)."""
    engine = engine or preferred_engine() or ""
    if engine not in exact_engines():
        return None
    key = (engine, qweight._version, weight_scale.data_ptr(), weight_scale._version,
           None if bias is None else (bias.data_ptr(), bias._version, bias.dtype))
    ident = (id(qweight), engine)
    entry = _PACKED.get(ident)
    if entry is not None and entry[0]() is qweight and entry[1] == key:
        return entry[2]
    packed = _pack(engine, qweight, weight_scale, None if bias is None else bias.float())
    _PACKED[ident] = (weakref.ref(qweight, lambda _: _PACKED.pop(ident, None)), key, packed)
    return packed


def forget_packs(qweight: torch.Tensor, keep: str | None = None) -> None:
    """Drop the packs of ``qweight`` made for engines other than ``keep`` ("": the preferred
    one; None: all): those a measurement made for the engines that lost, which would otherwise
    live as long as the weight."""
    keep = (keep or preferred_engine() or "") if keep is not None else None
    for engine in exact_engines():
        if engine != keep:
            _PACKED.pop((id(qweight), engine), None)


def preferred_engine() -> str | None:
    """The engine a dynamic int8 Linear runs on unless a measurement chose another: oneDNN's
    dynamic Linear measured fastest on AVX-512 VNNI from 64 rows up (docs/int8.md). "x86"
    and "fbgemm" run FBGEMM's kernels, which measured faster for a few rows."""
    supported = torch.backends.quantized.supported_engines
    return next((e for e in ("onednn", "x86", "fbgemm") if e in supported), None)


# oneDNN's quantized engine keeps the int8 weight it was given beside its packed copy (a 22 MiB
# weight's pack holds 49 MiB; FBGEMM's, and oneDNN's own qlinear_prepack, hold 22 MiB): a kernel
# on that engine runs a site only where it measured faster than one holding the weight once by
# more than this share.
TWO_COPIES_MARGIN = 0.05


def holds_weight_twice(engine: str) -> bool:
    """Whether a pack for ``engine`` ("": the preferred one) keeps the weight beside its packed
    copy (oneDNN's quantized engine does)."""
    return (engine or preferred_engine()) == "onednn"


def close_enough(times: Sequence[float], against: Sequence[float]) -> bool:
    """``times`` within :data:`TWO_COPIES_MARGIN` of ``against`` at every measured size."""
    return bool(times) and all(t <= a * (1 + TWO_COPIES_MARGIN) for t, a in zip(times, against))


@functools.cache
def exact_engines() -> tuple[str, ...]:
    """The quantized engines of this build that run a dynamic int8 Linear exactly (oneDNN's
    and FBGEMM's, where :func:`quantized_engine_unsupported_reason` finds nothing)."""
    supported = torch.backends.quantized.supported_engines
    return tuple(e for e in ("onednn", "x86", "fbgemm")
                 if e in supported and quantized_engine_unsupported_reason(e) is None)


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _pack(engine: str, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor types are deprecated upstream; the kernel is not
        weight = quantized_view(qweight, weight_scale)
        with _engine(engine):
            return torch.ops.quantized.linear_prepack(weight, bias)


def quantized_view(qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``qweight`` (int8 ``[out, in]``) as a per-channel ``qint8`` tensor with ``weight_scale``,
    on ``qweight``'s own memory where this build allows it. oneDNN's engine keeps the quantized
    weight it packs: made by ``torch._make_per_channel_quantized_tensor`` (a copy), every weight
    was held three times while a graph was lowered (the graph's int8, that copy, the blocked
    pack); viewing the int8 memory, twice."""
    scales, zeros = weight_scale.double(), torch.zeros(qweight.shape[0], dtype=torch.int64)
    if qweight.is_contiguous() and qweight.device.type == "cpu" and _quantized_views_work():
        return _on_memory_of(qweight, torch._empty_per_channel_affine_quantized(
            [0], scales=scales, zero_points=zeros, axis=0, dtype=torch.qint8))
    return torch._make_per_channel_quantized_tensor(qweight, scales, zeros, 0)


def integer_view(quantized: torch.Tensor) -> torch.Tensor:
    """A quantized (``quint8``/``qint8``) tensor's integers as a ``uint8``/``int8`` tensor on
    its own memory where this build allows it, else ``int_repr()`` (a copy: 106 us of a
    64 x 4096 activation's 134 us quantization on one thread of an AMX Xeon, the view 28 us)."""
    dtype = torch.uint8 if quantized.dtype == torch.quint8 else torch.int8
    if quantized.device.type == "cpu" and _quantized_views_work():
        return _on_memory_of(quantized, torch.empty(0, dtype=dtype))
    return quantized.int_repr()


def _on_memory_of(source: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """``empty`` (a tensor of another dtype, integer or quantized, of the same element size)
    set to ``source``'s memory, shape and strides."""
    return empty.set_(source.untyped_storage(), source.storage_offset(), source.shape, source.stride())


@functools.cache
def _quantized_views_work() -> bool:
    """Whether a ``qint8`` tensor can be set to an int8 tensor's memory in this build and reads
    back as that int8 tensor, and a ``uint8`` one to a ``quint8`` tensor's (else
    :func:`quantized_view` and :func:`integer_view` copy)."""
    qweight = torch.tensor([[1, -2, 3], [-127, 5, 127]], dtype=torch.int8)[1:]
    try:
        view = _on_memory_of(qweight, torch._empty_per_channel_affine_quantized(
            [0], scales=torch.ones(1, dtype=torch.double), zero_points=torch.zeros(1, dtype=torch.int64), axis=0,
            dtype=torch.qint8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            activations = torch.quantize_per_tensor(torch.tensor([[-1.0, 0.5], [0.25, 2.0]]), 0.02, 128, torch.quint8)
        integers = _on_memory_of(activations, torch.empty(0, dtype=torch.uint8))
        return (view.data_ptr() == qweight.data_ptr() and torch.equal(view.int_repr(), qweight)
                and torch.equal(integers, activations.int_repr()))
    except Exception:  # noqa: BLE001 - any failure means: copy
        return False


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
int8_linear_static_uint8_op = torch.ops.fxopt.int8_linear_static_uint8.default


def _int8_linear_flops(node: fx.Node) -> int:
    out, w = shape_of(node), shape_of(node.args[1])
    if out is None or w is None:
        return 0
    return 2 * numel_hint(out[:-1]) * size_hint(w[0]) * size_hint(w[1])


INT8_LINEAR_OPS = (int8_linear_op, int8_linear_dynamic_tensor_op, int8_linear_static_uint8_op)
for _op in INT8_LINEAR_OPS:
    register_flops(_op, _int8_linear_flops)


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

