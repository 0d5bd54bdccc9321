"""Weight-only Linears in ONNX: ``fxopt::weight_only_linear`` -> ONNX Runtime's ``MatMulNBits``.

    weight_only_linear(x, q, s, z, b, bits, dtype)
      => matmul_nbits(x, B, scales, zero_points, b, K, N, bits, block_size)   -> com.microsoft.MatMulNBits

``B`` is ``[N, blocks, block_size * bits / 8]`` uint8 (4 bits: two values a byte, the first in
the low nibble; blocks of ``K`` padded to ``block_size``), ``scales`` ``[N * blocks]`` float32,
``zero_points`` (4 bits) packed like ``B``, one row per output; 8-bit weights are symmetric and
stored with 128 added (MatMulNBits' default zero point). A per-channel int8 scale is repeated
over blocks of 32 (or of K, when K is a smaller power of two). The GEMM runs in float32 in
ONNX Runtime (bfloat16 activations are an eager-kernel choice).
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from fxopt.ir import add_constant, constant, is_op
from fxopt.kernels import weight_only as kernels
from fxopt.kernels.weight_only import matmul_nbits_op
from fxopt.lowering.base import Lowering, LoweringResult, OnnxTranslations

PER_CHANNEL_BLOCK = 32


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 rows of ``values`` (0 .. 2**bits - 1), two 4-bit values a byte (low nibble first)."""
    values = values.to(torch.uint8)
    if bits == 8:
        return values.contiguous()
    if values.shape[1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    return (values[:, 0::2] | (values[:, 1::2] << 4)).contiguous()


def to_matmul_nbits(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """``(B, scales, zero_points, block_size)`` in MatMulNBits' layout for a quantized weight."""
    n, k = q.shape
    if scale.shape[1] == 1:  # per output channel: the same scale in every block
        block = min(PER_CHANNEL_BLOCK, k) if k & (k - 1) == 0 else PER_CHANNEL_BLOCK
        blocks = -(-k // block)
        scale = scale.expand(n, blocks)
        zero = None if zero is None else zero.expand(n, blocks)
    else:
        block, blocks = k // scale.shape[1], scale.shape[1]
    values = q.to(torch.int16) + (128 if bits == 8 else 0)
    padding = blocks * block - k
    if padding:
        values = torch.nn.functional.pad(values, (0, padding), value=128 if bits == 8 else 0)
    packed = _pack(values, bits).reshape(n, blocks, block * bits // 8)
    zero_points = None if zero is None else _pack(zero.to(torch.int16), bits)
    return packed, scale.float().reshape(-1).contiguous(), zero_points, block


class WeightOnlyMatMulNBits(Lowering):
    """Weight-only Linears -> ONNX Runtime's MatMulNBits, for the ONNX backend."""

    name = "weight-only-matmul-nbits"
    backends = ("onnx",)
    onnx_domains = ("com.microsoft",)
    # float32 in ONNX Runtime against the eager graph's bfloat16 GEMMs
    parity_rtol = 0.05

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(is_op(n, kernels.weight_only_linear_op) for n in gm.graph.nodes)

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        result = LoweringResult()
        for node in list(gm.graph.nodes):
            if not is_op(node, kernels.weight_only_linear_op):
                continue
            x, q_node, s_node, z_node, bias, bits, _ = node.args
            q = constant(gm, q_node)
            packed, scales, zero_points, block = to_matmul_nbits(
                q, constant(gm, s_node), None if z_node is None else constant(gm, z_node), bits)
            hint = str(q_node.target)
            args = [add_constant(gm, packed, f"{hint}_nbits", before=node),
                    add_constant(gm, scales, f"{hint}_nbits_scales", before=node),
                    None if zero_points is None else add_constant(gm, zero_points, f"{hint}_nbits_zeros", before=node)]
            with gm.graph.inserting_before(node):
                lowered = gm.graph.call_function(matmul_nbits_op, (x, *args, bias, q.shape[1], q.shape[0], bits, block))
            lowered.meta.update(node.meta)
            node.replace_all_uses_with(lowered)
            gm.graph.erase_node(node)
            result.lowered += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
        result.notes.append(f"{result.lowered} weight-only Linears run as com.microsoft.MatMulNBits")
        return result

    def onnx_translations(self) -> OnnxTranslations:
        return {matmul_nbits_op: matmul_nbits_onnx}


@functools.cache
def _matmul_nbits_schema():  # type: ignore[no-untyped-def]
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    optional, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    inputs = [("A", "T1", single), ("B", "T2", single), ("scales", "T1", single), ("zero_points", "T3", optional),
              ("g_idx", "T4", optional), ("bias", "T1", optional)]
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter(name, kind, param_option=option) for name, kind, option in inputs],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "", required=False)
                    for name in ("K", "N", "bits", "block_size", "accuracy_level")],
    )
    return Op(Opset("com.microsoft", 1), "MatMulNBits", schema)


def matmul_nbits_onnx(x, packed, scales, zero_points=None, bias=None, k: int = 0, n: int = 0,  # type: ignore[no-untyped-def]
                      bits: int = 4, block_size: int = 32):
    from onnx import TensorProto
    from onnxscript import opset20 as op

    xf = op.Cast(x, to=TensorProto.FLOAT)
    y = _matmul_nbits_schema()(xf, packed, scales, zero_points, None, None, K=k, N=n, bits=bits, block_size=block_size)
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=TensorProto.FLOAT))
    return op.CastLike(y, x)
