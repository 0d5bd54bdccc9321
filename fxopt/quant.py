"""Int8 quantization math shared by the quantize-int8 pass, the QDQ vocabulary and the kernels.

Weights are symmetric int8 per output channel in [-127, 127]; activations are symmetric int8
per token or per tensor, or asymmetric uint8 per tensor (ONNX's DynamicQuantizeLinear scheme,
at run time or with a calibrated scale and zero point).
The helpers compute the same numbers as ``torch.ops.quantized_decomposed``, so a kernel built
on them agrees with the QDQ graph it replaces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy
import torch

QMIN, QMAX = -128, 127
WEIGHT_QMAX = 127  # weights use [-127, 127] so that the range is symmetric
# choose_qparams_per_token's floor on a row's absolute maximum (keeps all-zero rows finite).
MIN_ABS_MAX = 1e-5
# Dynamic per-tensor activations: asymmetric uint8, as ONNX's DynamicQuantizeLinear; the
# scale's floor is the one PT2E's dynamic quantization uses.
UQMIN, UQMAX = 0, 255
TENSOR_EPS = float(torch.finfo(torch.float32).eps)
_F32_ZERO, _F32_LEVELS, _F32_EPS = numpy.float32(0), numpy.float32(UQMAX - UQMIN), numpy.float32(TENSOR_EPS)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Elements of a weight quantized at a time: a float chunk that stays in the CPU's cache,
# where whole-weight temporaries (tens of MB each on a large model) cost more than the math.
QUANTIZE_CHUNK = 1 << 18


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(Wq [out, in] int8, scale [out] float32)``."""
    qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    _quantize_rows_into(weight.detach(), qweight, scale)
    return qweight, scale


def _quantize_rows_into(weight: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> None:
    """:func:`quantize_weight` of a 2-D ``weight``, written into ``qweight`` and ``scale``: on
    a CPU a few rows at a time (the same numbers: each row is its own)."""
    rows, columns = weight.shape
    step = rows if weight.device.type != "cpu" else max(1, QUANTIZE_CHUNK // max(1, columns))
    for start in range(0, rows, step):
        w = weight[start:start + step].float()
        # max |w| as max(max w, -min w): no |w| buffer
        row_scale = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_()).clamp_(min=1e-12).div_(WEIGHT_QMAX)
        scale[start:start + step] = row_scale
        qweight[start:start + step] = torch.div(w, row_scale[:, None]).round_().clamp_(-WEIGHT_QMAX, WEIGHT_QMAX)


def quantize_weights_stacked(weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_weight` of each of ``weights`` (alike in columns, dtype and device)
    written into consecutive rows of one int8 tensor and one scale vector: ``(Wq [sum out,
    in], scale [sum out])``. Sibling Linears quantized so merge as rows of memory already
    stacked (:func:`fxopt.ir.stacked`), without a copy."""
    rows = sum(int(w.shape[0]) for w in weights)
    device = weights[0].device
    qweight = torch.empty((rows, int(weights[0].shape[1])), dtype=torch.int8, device=device)
    scale = torch.empty(rows, dtype=torch.float32, device=device)
    row = 0
    for weight in weights:
        count = int(weight.shape[0])
        _quantize_rows_into(weight.detach(), qweight[row:row + count], scale[row:row + count])
        row += count
    return qweight, scale


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


def static_scales(maxima: Mapping[Any, Sequence[float]], batches: Iterable[int]) -> dict[str, float]:
    """Per-tensor symmetric int8 scale of each value (a graph node, by its name): its largest
    magnitude over the batches at the given positions (``maxima``: each value's largest
    magnitude per batch, as an observer collected them)."""
    chosen = list(batches)
    return {node.name: static_scale(max(seen[i] for i in chosen)) for node, seen in maxima.items()}


def static_asymmetric_qparams(low: float, high: float) -> tuple[float, int]:
    """Asymmetric uint8 ``(scale, zero_point)`` for activations observed in ``[low, high]``:
    the range widened to hold 0, spread over [0, 255] (the scheme of PT2E's x86 static
    quantization; a GELU's or ReLU's output spends no codes on negatives it never has)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = max((high - low) / float(UQMAX - UQMIN), MIN_ABS_MAX / QMAX)
    zero_point = min(max(UQMIN - round(low / scale), UQMIN), UQMAX)
    return scale, int(zero_point)


def dynamic_tensor_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric uint8 ``(scale, zero_point)`` of all of ``x``, as choose_qparams.tensor(x, 0,
    255, eps, uint8) computes them (and, up to float rounding, ONNX's DynamicQuantizeLinear):
    scale = (max(max x, 0) - min(min x, 0)) / 255, zero_point = -round(min(min x, 0) / scale)."""
    low, high = torch.aminmax(x)
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = torch.clamp((high - low) / float(UQMAX - UQMIN), min=TENSOR_EPS).float()
    zero_point = (UQMIN - torch.round(low / scale).to(torch.int64)).clamp_(UQMIN, UQMAX)
    return scale, zero_point


def dynamic_tensor_qparams_values(x: torch.Tensor) -> tuple[float, int]:
    """:func:`dynamic_tensor_qparams` as Python numbers, bit for bit, for the CPU's hot path
    (each call of a dynamic int8 Linear): from the extremes of a float32 tensor, the scale and
    zero point are computed on float32 scalars, in place of eight tensor ops of a few
    microseconds each."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0:
        extremes = torch.aminmax(x)
        low = min(numpy.float32(extremes.min.item()), _F32_ZERO)
        high = max(numpy.float32(extremes.max.item()), _F32_ZERO)
        if numpy.isfinite(low) and numpy.isfinite(high):  # NaN or inf: what the tensor ops make of them
            # float32 arithmetic, as the tensor ops do it: (high - low) / 255, at least eps; round half to even
            scale = max((high - low) / _F32_LEVELS, _F32_EPS)
            return float(scale), min(max(UQMIN - int(numpy.round(low / scale)), UQMIN), UQMAX)
    scale, zero_point = dynamic_tensor_qparams(x)
    return float(scale), int(zero_point)


# Weight-only quantization (the quantize-weights pass and fxopt.kernels.weight_only): the weight
# is stored as int8 values, one scale per output channel or per group of ``group_size`` input
# features. 8 bits: symmetric in [-127, 127], W ~ q * s. 4 bits: asymmetric in [0, 15] with an
# integer zero point per group, W ~ (q - z) * s: the layout of ONNX Runtime's MatMulNBits, kept
# unpacked (one value per int8) so that a saved model is portable; kernels pack it at lowering.
WEIGHT_ONLY_BITS = (8, 4)


def quantize_weight_groupwise(weight: torch.Tensor, bits: int, group_size: int | None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q [out, in] int8, scale [out, groups] float32, zero [out, groups] int8 | None)`` of a
    2-D ``weight``; ``group_size`` None: one group per output channel (the whole row)."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    size = in_features if group_size is None else group_size
    groups = w.reshape(out_features, in_features // size, size)
    if bits == 8:
        scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / WEIGHT_QMAX
        q = torch.round(groups / scale[..., None]).clamp(-WEIGHT_QMAX, WEIGHT_QMAX)
        zero = None
    elif bits == 4:
        low = groups.amin(dim=-1).clamp(max=0.0)
        high = groups.amax(dim=-1).clamp(min=0.0)
        scale = ((high - low) / 15.0).clamp(min=1e-12)
        zero = torch.round(-low / scale).clamp(0, 15)
        q = torch.round(groups / scale[..., None] + zero[..., None]).clamp(0, 15)
        zero = zero.to(torch.int8).contiguous()
    else:
        raise ValueError(f"weight-only quantization takes bits in {WEIGHT_ONLY_BITS}, got {bits}")
    return q.reshape(out_features, in_features).to(torch.int8).contiguous(), scale.contiguous(), zero


def dequantize_weight_groupwise(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``(q - zero) * scale`` (``zero`` None: 0) that
    :func:`quantize_weight_groupwise` approximates, in ``dtype``."""
    out_features, in_features = q.shape
    # one float copy, computed in place: a large weight's dequantization makes no second one
    groups = q.reshape(out_features, scale.shape[1], -1).to(torch.float32, copy=True)
    if zero is not None:
        groups.sub_(zero.to(torch.float32)[..., None])
    return groups.mul_(scale.to(torch.float32)[..., None]).reshape(out_features, in_features).to(dtype)
