"""The eager backend: the optimized GraphModule runs as PyTorch code on CPU or CUDA.

The registered lowerings (:mod:`fxopt.lowering`) that apply on the device rewrite their
patterns into kernels first, on a copy: the optimized graph itself stays as the passes left it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.backends import Lowered
from fxopt.errors import BackendError
from fxopt.lowering import lower_graph


def lower_eager(
    gm: fx.GraphModule,
    signature: Any,
    example_inputs: list[torch.Tensor],
    device: torch.device,
    report: Any,
) -> Lowered:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("device 'cuda' was requested but CUDA is not available on this machine")
    lowered = lower_graph(gm, "eager", device)
    report.notes.extend(lowered.notes)
    gm = lowered.graph_module.to(device)
    gm.recompile()

    def run(*inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return gm(*inputs)

    return Lowered(gm, run)
