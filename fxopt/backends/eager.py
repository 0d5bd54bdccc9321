"""The eager backend: the optimized GraphModule runs as PyTorch code on CPU or CUDA.

Quantized Linears (the QDQ pattern of the quantize-int8 pass) are lowered to fxopt's int8
kernel (:func:`fxopt.int8.lower_int8_linears`); the rest runs as it is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.backends import Lowered
from fxopt.errors import BackendError
from fxopt.ir import copy_graph_module


def lower_eager(
    gm: fx.GraphModule,
    signature: Any,
    example_inputs: list[torch.Tensor],
    device: torch.device,
    report: Any,
) -> Lowered:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("device 'cuda' was requested but CUDA is not available on this machine")
    from fxopt.int8 import has_qdq_linear, lower_int8_linears

    if has_qdq_linear(gm):
        gm = copy_graph_module(gm)  # the captured QDQ graph stays as it is
        report.notes.extend(lower_int8_linears(gm, device).notes())
    gm = gm.to(device)
    gm.recompile()

    def run(*inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return gm(*inputs)

    return Lowered(gm, run)

