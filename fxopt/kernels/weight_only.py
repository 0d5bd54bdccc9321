"""Weight-only quantized Linear kernels: ``torch.ops.fxopt.weight_only_linear`` and its packed form.

``weight_only_linear(x, q, s, z, b, bits, compute_dtype)`` is ``linear(x, (q - z) * s, b)``
with the weight stored as int8 values (:func:`fxopt.quant.quantize_weight_groupwise`: 8 bits
symmetric per output channel or per group, 4 bits asymmetric per group, kept unpacked) and
the GEMM computed in ``compute_dtype`` (float32, or bfloat16: the library kernels below are
only fast with bfloat16 activations on CPU). Its implementation dequantizes and runs
``F.linear``: portable, what the quantize-weights pass writes and what a saved model holds.

``weight_only_linear_packed(x, packed, qparams, b, kernel, group_size, out_features,
compute_dtype)`` runs one of :data:`PACKED_KERNELS` on weights packed for it (machine- and
version-specific layouts, made by the lowering, never saved):

    int8pack      aten._weight_int8pack_mm            8 bits, per output channel
    int4pack-cpu  aten._weight_int4pack_mm_for_cpu    4 bits, groups of 32..256 (torch >= 2.6)
    int4pack-cuda aten._weight_int4pack_mm            4 bits, bfloat16 on CUDA (sm80+)
    gemv-int8     fxopt's fused dequantize + GEMV       8 bits, per output channel, CPU
    gemv-int4     the same on packed int4               4 bits, groups of 32..256, CPU
                  (:mod:`fxopt.kernels.gemv`: C++ built for this CPU at first use)

A kernel missing from this torch build is left out (:meth:`PackedKernel.available`).

``matmul_nbits(x, B, scales, zero_points, b, K, N, bits, block_size)`` is ONNX Runtime's
``com.microsoft.MatMulNBits`` (the ONNX backend's form of the op, see
:mod:`fxopt.lowering.weight_only_onnx`), with its arithmetic in PyTorch for parity checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.cost import register_flops
from fxopt.ir import numel_hint, shape_of, size_hint
from fxopt.quant import dequantize_weight_groupwise

aten = torch.ops.aten
DEQUANTIZE_BLOCK_BYTES = 4 << 20
__all__ = ["PACKED_KERNELS", "PackedKernel", "matmul_nbits", "matmul_nbits_op", "weight_only_linear", "weight_only_linear_op",
           "weight_only_linear_packed", "weight_only_linear_packed_op"]


@torch.library.custom_op("fxopt::weight_only_linear", mutates_args=())
def weight_only_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """``linear(x, (q - z) * s, b)`` in ``compute_dtype``, returned in ``x``'s dtype.

    A large weight is dequantized a block of output rows at a time (``DEQUANTIZE_BLOCK_BYTES`` of
    float32), so that a forward through many quantized layers (the search's trials, a model
    that no kernel serves) never holds a whole float copy of a weight: at a billion parameters,
    freed whole-weight temporaries stay in the allocator's heap and set the compile's peak."""
    rows = max(1, DEQUANTIZE_BLOCK_BYTES // (4 * qweight.shape[1]))
    inputs = x.to(compute_dtype)
    outs = []
    for start in range(0, qweight.shape[0], rows):
        stop = start + rows
        zero_block = None if zero is None else zero[start:stop]
        weight = dequantize_weight_groupwise(qweight[start:stop], scale[start:stop], zero_block, compute_dtype)
        outs.append(torch.nn.functional.linear(inputs, weight, None if bias is None else bias[start:stop].to(compute_dtype)))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return out.to(x.dtype)


@weight_only_linear.register_fake
def _weight_only_linear_fake(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                             bias: torch.Tensor | None, bits: int, compute_dtype: torch.dtype) -> torch.Tensor:
    torch._check(qweight.dtype == torch.int8, lambda: f"qweight must be int8, got {qweight.dtype}")
    torch._check(x.shape[-1] == qweight.shape[1], lambda: "x and qweight disagree on in_features")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("fxopt::weight_only_linear_packed", mutates_args=())
def weight_only_linear_packed(
    x: torch.Tensor,
    packed: torch.Tensor,
    qparams: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: str,
    group_size: int,
    out_features: int,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """``weight_only_linear`` on weights packed by ``PACKED_KERNELS[kernel].pack``."""
    rows = x.reshape(-1, x.shape[-1]).to(compute_dtype)
    out = PACKED_KERNELS[kernel].run(rows, packed, qparams, group_size)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


@weight_only_linear_packed.register_fake
def _weight_only_linear_packed_fake(x: torch.Tensor, packed: torch.Tensor, qparams: torch.Tensor,
                                    bias: torch.Tensor | None, kernel: str, group_size: int, out_features: int,
                                    compute_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


weight_only_linear_op = torch.ops.fxopt.weight_only_linear.default
weight_only_linear_packed_op = torch.ops.fxopt.weight_only_linear_packed.default


def _flops(node: fx.Node) -> int:
    out, x = shape_of(node), shape_of(node.args[0])
    if out is None or x is None:
        return 0
    return 2 * numel_hint(out) * size_hint(x[-1])


register_flops(weight_only_linear_op, _flops)
register_flops(weight_only_linear_packed_op, _flops)


@torch.library.custom_op("fxopt::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 bias: torch.Tensor | None, k: int, n: int, bits: int, block_size: int) -> torch.Tensor:
    """MatMulNBits' arithmetic in PyTorch: unpack, ``(B - zero) * scale`` per block, matmul."""
    values = _unpack(packed.reshape(n, -1), bits)
    blocks = values.shape[1] // block_size
    if zero_points is None:
        zeros = torch.full((n, blocks), 2.0 ** (bits - 1))
    else:
        zeros = _unpack(zero_points.reshape(n, -1), bits)[:, :blocks].float()
    weight = (values.reshape(n, blocks, block_size).float() - zeros[..., None]) * scales.reshape(n, blocks, 1)
    out = torch.nn.functional.linear(x.float(), weight.reshape(n, -1)[:, :k], None if bias is None else bias.float())
    return out.to(x.dtype)


@matmul_nbits.register_fake
def _matmul_nbits_fake(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                       bias: torch.Tensor | None, k: int, n: int, bits: int, block_size: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


matmul_nbits_op = torch.ops.fxopt.matmul_nbits.default
register_flops(matmul_nbits_op, _flops)


def _unpack(rows: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return rows
    return torch.stack([rows & 0xF, rows >> 4], dim=-1).reshape(rows.shape[0], -1)


# ---------------------------------------------------------------- packed kernels


@dataclass(frozen=True)
class PackedKernel:
    """A library weight-only GEMM: which weights it takes, how to pack them, how to run it."""

    name: str
    bits: int
    devices: tuple[str, ...]
    op: str  # the aten op it needs (missing in older torch builds)
    pack: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype], tuple[torch.Tensor, torch.Tensor]]
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    group_sizes: tuple[int, ...] | None = None  # None: per output channel only
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    # Shape limits checked before the kernel ever runs: _weight_int8pack_mm on CPU crashes the
    # process (no error) when in features are not a multiple of 16 (torch 2.13, x86).
    in_multiple: int = 16
    out_multiple: int = 1
    requires: Callable[[], bool] | None = None  # whether it exists here; default: the aten op does
    # An op the lowered graph may call itself, on float32 activations of any rank, with
    # (x, packed, qparams) and, for groups, the group size: no Python between the graph and the
    # kernel (the custom op's wrapper costs about as much as a decode step's small GEMV).
    direct: Callable[[], Any] | None = None

    def available(self) -> bool:
        return self.requires() if self.requires is not None else hasattr(aten, self.op)

    def takes(self, bits: int, group_size: int, in_features: int, out_features: int, device: torch.device,
              dtype: torch.dtype) -> bool:
        """Whether this kernel can run a Linear quantized so, on ``device`` in ``dtype``."""
        if bits != self.bits or device.type not in self.devices or dtype not in self.dtypes or not self.available():
            return False
        if in_features % self.in_multiple or out_features % self.out_multiple:
            return False
        if self.group_sizes is None:
            return group_size == in_features
        return group_size in self.group_sizes and in_features % group_size == 0


def _pack_int8(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return q.contiguous(), scale[:, 0].to(dtype).contiguous()


def _scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[groups, out, 2]``: the int4pack kernels compute ``(q - 8) * s + m``, so the zero
    point ``z`` (``W = (q - z) * s``) becomes ``m = (8 - z) * s``."""
    offset = (8.0 - zero.float()) * scale.float()
    return torch.stack([scale.float().t(), offset.t()], dim=-1).to(dtype).contiguous()


def _pack_int4_cpu(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    packed = aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    return packed, _scales_and_zeros(scale, zero, dtype)


def _pack_int4_cuda(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = q.to(torch.uint8)
    nibbles = (pairs[:, ::2] << 4 | pairs[:, 1::2]).contiguous()  # the uint8 [out, in / 2] layout of torch >= 2.5
    return aten._convert_weight_to_int4pack(nibbles, 8), _scales_and_zeros(scale, zero, dtype)


def _pack_gemv_int8(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return q.contiguous(), scale[:, 0].float().contiguous()


def _pack_gemv_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from fxopt.kernels import gemv

    group = q.shape[1] // scale.shape[1]
    return gemv.pack_int4_groups(q, group), torch.stack([scale.float(), zero.float()]).contiguous()


def _gemv_available() -> bool:
    from fxopt.kernels import gemv

    return gemv.available()


PACKED_KERNELS: dict[str, PackedKernel] = {kernel.name: kernel for kernel in (
    # fxopt's own fused dequantize + GEMV (fxopt.kernels.gemv), float32 arithmetic: first of the
    # 8-bit kernels, as the one that reads the weights at the memory's speed (the timing loop,
    # with one weight hot in cache, would let a kernel that is slow from memory look as fast)
    PackedKernel("gemv-int8", 8, ("cpu",), "", _pack_gemv_int8,
                 lambda rows, packed, qparams, group: torch.ops.fxopt_gemv.int8_gemv(
                     rows.float().contiguous(), packed, qparams),
                 in_multiple=1, requires=_gemv_available, direct=lambda: torch.ops.fxopt_gemv.int8_gemv.default),
    PackedKernel("int8pack", 8, ("cpu", "cuda"), "_weight_int8pack_mm", _pack_int8,
                 lambda rows, packed, qparams, group: aten._weight_int8pack_mm(rows, packed, qparams)),
    PackedKernel("int4pack-cpu", 4, ("cpu",), "_weight_int4pack_mm_for_cpu", _pack_int4_cpu,
                 lambda rows, packed, qparams, group: aten._weight_int4pack_mm_for_cpu(rows, packed, group, qparams),
                 group_sizes=(32, 64, 128, 256), out_multiple=16),
    PackedKernel("int4pack-cuda", 4, ("cuda",), "_weight_int4pack_mm", _pack_int4_cuda,
                 lambda rows, packed, qparams, group: aten._weight_int4pack_mm(rows, packed, group, qparams),
                 group_sizes=(32, 64, 128, 256), dtypes=(torch.bfloat16,)),
    # 4 bits: the library's bfloat16 kernel first (it measured faster than gemv-int4 here).
    PackedKernel("gemv-int4", 4, ("cpu",), "", _pack_gemv_int4,
                 lambda rows, packed, qparams, group: torch.ops.fxopt_gemv.int4_gemv(
                     rows.float().contiguous(), packed, qparams, group),
                 group_sizes=(32, 64, 128, 256), in_multiple=1, requires=_gemv_available,
                 direct=lambda: torch.ops.fxopt_gemv.int4_gemv.default),
)}
