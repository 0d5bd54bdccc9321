"""The built-in presets: the candidates ``fxopt.compile(..., preset=...)`` chooses among.

``lossless``: every exact pass, in eager PyTorch (with its CPU kernel lowerings) or ONNX
Runtime, whichever runs faster. ``bf16``: the exact passes, then Linears in bfloat16 where a
1% output budget allows (float16 is a further candidate on CUDA). ``int8``: the exact passes,
then int8 Linears with activations per tensor (chosen at run time) or per token, in eager
PyTorch or ONNX Runtime, within the quantize-int8 pass's 5% budget; given calibration batches,
also static per-tensor activations (with and without smooth-quant) on oneDNN's fused int8
kernel (without them those candidates are dropped: static scales need calibration).
"""

from __future__ import annotations

from fxopt.presets import EXACT, Candidate, Preset

INT8_PER_TENSOR = "quantize-int8(activations='dynamic-tensor')"
INT8_STATIC = "quantize-int8(activations='static', symmetric=False)"

LOSSLESS = Preset(
    "lossless",
    "every exact pass; the faster of eager PyTorch and ONNX Runtime",
    (Candidate((EXACT,), "eager"), Candidate((EXACT,), "onnx", devices=("cpu",))),
)

BF16 = Preset(
    "bf16",
    "exact passes, then Linears in bfloat16 (float16 on CUDA) within 1% output error",
    (
        Candidate((EXACT, "cast-bf16(budget=0.01)"), "eager"),
        Candidate((EXACT, "cast-fp16(budget=0.01)"), "eager", devices=("cuda",)),
    ),
    budget=0.01,
)

INT8 = Preset(
    "int8",
    "exact passes, then int8 Linears (static per-tensor with calibration, else dynamic per-tensor or "
    "per-token activations) within 5% output error",
    (
        Candidate((EXACT, INT8_STATIC), "eager", devices=("cpu",), note="needs calibration batches"),
        Candidate((EXACT, "smooth-quant", INT8_STATIC), "eager", devices=("cpu",),
                  note="needs calibration batches"),
        Candidate((EXACT, INT8_PER_TENSOR), "eager"),
        Candidate((EXACT, INT8_PER_TENSOR), "onnx", devices=("cpu",)),
        Candidate((EXACT, "quantize-int8"), "eager"),
    ),
    budget=0.05,
)

PRESETS = (LOSSLESS, BF16, INT8)
