"""The built-in presets: the candidates ``fxopt.compile(..., preset=...)`` chooses among.

``lossless``: every exact pass, in eager PyTorch (with its CPU kernel lowerings) or ONNX
Runtime, whichever runs faster. ``bf16``: the exact passes, then Linears in bfloat16 where a
1% output budget allows (float16 is a further candidate on CUDA). ``int8``: the exact passes,
then int8 Linears with activations per tensor (chosen at run time) or per token, in eager
PyTorch or ONNX Runtime, within the quantize-int8 pass's 5% budget (sibling Linears merged
after quantizing, as int8, in eager PyTorch); given calibration batches,
also static per-tensor activations (with and without smooth-quant) on oneDNN's fused int8
kernel, and on OpenVINO static int8 Linears (with and without smooth-quant) and an int8 query
and key in its fused attention (without calibration those candidates are dropped before they are compiled:
static scales need it), and held to a budget of 7e-2 or more, OpenVINO with the residual stream
and the embedding tables int8 as well (NNCF's default scheme); where those leave Linears float to stay within the budget (a preset
held to a tight one), bfloat16 Linears on eager and OpenVINO, on a CPU with a bf16 GEMM
unit. Where the optional
backend OpenVINO is installed, it is a candidate of each preset on CPU.
"""

from __future__ import annotations

from fxopt.presets import Candidate, Preset
from fxopt.registry import EXACT

INT8_PER_TENSOR = "quantize-int8(activations='dynamic-tensor')"
INT8_STATIC = "quantize-int8(activations='static', symmetric=False)"
# SmoothQuant where 1/s cannot be folded into the producer (BERT's LayerNorms also feed a
# residual) divides in a multiply of its own, which OpenVINO fuses into the quantization. The
# multiply keeps LayerNorm's output float32 there, where without it OpenVINO's LayerNorm writes
# int8: the OpenVINO static candidate runs with and without it (BERT-4L's hidden states, one
# thread, AMX: 6.40x eager without at 2.2e-2, 6.15x with at 1.4e-2; 8 s more compile).
SMOOTH_QUANT = "smooth-quant(explicit=True)"
# OpenVINO runs QuantizeLinear/DequantizeLinear pairs as int8 kernels, with either
# observer: the percentile one's scales held on BERT's fresh input for 16 of 17 Linears
# (min-max uint8: 15), min-max uint8 on Llama's for 15 of 16 (percentile: 2), so both are
# candidates (the min-max one continues from the eager smooth-quant candidate's graph). Its
# fused attention kernel computes Q @ K^T in int8 when the query and key are quantized.
INT8_STATIC_OPENVINO = "quantize-int8(activations='static', observer='percentile')"
INT8_ATTENTION = "quantize-attention"
# What OpenVINO + NNCF's default recipe quantizes besides: the residual stream around each
# LayerNorm (OpenVINO's LayerNorm then reads and writes int8) and the embedding tables. Its error
# is about NNCF default's (BERT-4L's hidden states: 5.0e-2 on the calibration batch, 6.8e-2 on
# the fresh input the preset's check draws, where NNCF's default measures 7.3e-2), which 5%
# refuses after the compile: built only where the preset is held to 7e-2 or more (the passes'
# budgets are lowered to the preset's, see fxopt.presets.within_budget).
INT8_LOOSE = ("quantize-residual(budget=1.0)", "quantize-embeddings(budget=1.0)")
LOOSE_BUDGET = 0.07
# Sibling Linears (Q, K, V; a gated MLP's gate and up) merge after quantizing, as int8: each
# is quantized (or left float) on its own, and no float copy of the merged weights is made
# (a 1.1B Llama's is 2.5 GB). Eager PyTorch runs one GEMM per group; ONNX Runtime and OpenVINO
# run the Linears unmerged faster (OpenVINO splits a merged one again), so theirs stay so.
MERGE = "merge-siblings"
UNMERGED = (MERGE,)
# Where the int8 recipes leave Linears float to stay within the budget (a tight one: held to
# 1.6e-2, BERT-4L keeps 2 of 17 int8, 1.16x eager), bfloat16 Linears may be the faster way to
# meet it on a CPU with a bf16 GEMM unit (AMX: 4.4-4.8x on OpenVINO, 3.1x eager, at 8.6e-3).
# They are fallbacks: not built where an int8 candidate kept every Linear (at the preset's own
# budget, BERT-4L's), nor on a CPU that would emulate bf16.
BF16_FALLBACK = "cast-bf16(budget=0.05)"

# OpenVINO is a candidate of each preset where it is installed (a candidate whose backend is
# missing is dropped with the reason): it runs fp32, bf16 and int8 BERT-like graphs faster
# than eager PyTorch on CPU (int8 activations quantized at run time by OpenVINO itself).
# Inductor is not a candidate: its compile (about a minute for BERT-4L cold on a loaded 2-core
# machine, 6-9 s with a warm cache) would dominate every preset's, for what it measured over the
# eager candidates: nothing on an AMD EPYC, 2-5% (fp32, bf16) on an AMX Xeon (docs/backends.md).

LOSSLESS = Preset(
    "lossless",
    "every exact pass; the fastest of eager PyTorch, ONNX Runtime and OpenVINO where installed",
    (
        Candidate((EXACT,), "eager"),
        Candidate((EXACT,), "onnx", devices=("cpu",)),
        Candidate((EXACT,), "openvino", devices=("cpu",)),
    ),
)

BF16 = Preset(
    "bf16",
    "exact passes, then Linears in bfloat16 (float16 on CUDA) within 1% output error",
    (
        Candidate((EXACT, "cast-bf16(budget=0.01)"), "eager"),
        Candidate((EXACT, "cast-fp16(budget=0.01)"), "eager", devices=("cuda",)),
        Candidate((EXACT, "cast-bf16(budget=0.01)"), "openvino", devices=("cpu",)),
    ),
    budget=0.01,
)

INT8 = Preset(
    "int8",
    "exact passes, then int8 Linears (static per-tensor with calibration, else dynamic per-tensor or "
    "per-token activations) within 5% output error",
    (
        Candidate((EXACT, INT8_STATIC, MERGE), "eager", devices=("cpu",), needs_calibration=True),
        Candidate((EXACT, SMOOTH_QUANT, INT8_STATIC, MERGE), "eager", devices=("cpu",),
                  needs_calibration=True),
        Candidate((EXACT, INT8_PER_TENSOR, MERGE), "eager"),
        Candidate((EXACT, INT8_PER_TENSOR), "onnx", devices=("cpu",), without=UNMERGED),
        Candidate((EXACT, SMOOTH_QUANT, INT8_STATIC_OPENVINO, INT8_ATTENTION), "openvino", devices=("cpu",),
                  needs_calibration=True, without=UNMERGED),
        Candidate((EXACT, SMOOTH_QUANT, INT8_STATIC, INT8_ATTENTION), "openvino", devices=("cpu",),
                  needs_calibration=True, without=UNMERGED),
        Candidate((EXACT, INT8_STATIC_OPENVINO, INT8_ATTENTION), "openvino", devices=("cpu",),
                  needs_calibration=True, without=UNMERGED),
        Candidate((EXACT, INT8_STATIC_OPENVINO, INT8_ATTENTION, *INT8_LOOSE), "openvino", devices=("cpu",),
                  needs_calibration=True, without=UNMERGED, min_budget=LOOSE_BUDGET),
        Candidate((EXACT, INT8_PER_TENSOR), "openvino", devices=("cpu",), without=UNMERGED),
        Candidate((EXACT, "quantize-int8(activations='dynamic')", MERGE), "eager"),
        Candidate((EXACT, BF16_FALLBACK), "eager", devices=("cpu",), cpu_unit="bf16_gemm", fallback=True),
        Candidate((EXACT, BF16_FALLBACK), "openvino", devices=("cpu",), cpu_unit="bf16_gemm", fallback=True),
    ),
    budget=0.05,
)

PRESETS = (LOSSLESS, BF16, INT8)
