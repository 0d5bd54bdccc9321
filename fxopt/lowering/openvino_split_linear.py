"""The OpenVINO packed-Linear lowering: a Linear whose output is only split runs as one Linear per piece.

    split_with_sizes(linear(x, [W1; ...; Wn], [b1; ...; bn]), [o1, ..., on], -1)[i]
      =>  linear(x, Wi, bi)
    with an int8 weight dequantized per output channel sliced the same way:
    dequantize_per_channel([Q1; ...; Qn], [s1; ...; sn], axis 0)  =>  dequantize_per_channel(Qi, si)

The packed form is what merge-siblings writes for eager PyTorch, where one GEMM over the
shared input beats several. OpenVINO's CPU plugin runs the split along the last axis with a
reference kernel (7-10 ms a forward on BERT-4L at batch 8 x 128, one thread) and its int8
FullyConnected on a packed quantized weight through an older, slower path; one Linear per
piece is the form its own converter produces and the one it runs fastest. Each output
channel is computed from the same row of weights, scale and bias either way, so the pieces
are the same values (the backend's parity check confirms it on the example inputs).

Constraints: the Linear's only user is one ``split_with_sizes`` along its last dimension
whose users are all ``getitem``; the weight (or its int8 values and per-channel scales, with
no zero point) and bias are constants.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir import packed_linear, unpack_linear
from fxopt.lowering.base import Lowering, LoweringResult


class OpenVinoSplitLinear(Lowering):
    """A packed Linear whose output is only split -> one Linear per piece, for OpenVINO."""

    name = "openvino-split-linear"
    backends = ("openvino",)
    devices = ("cpu",)
    before = ("openvino-int8",)  # which then sees each piece as a Linear of its own

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(packed_linear(gm, node) is not None for node in gm.graph.nodes)

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        result = LoweringResult()
        for node in list(gm.graph.nodes):
            packed = packed_linear(gm, node)
            if packed is None:
                continue
            unpack_linear(gm, packed)
            result.lowered += 1
        if result.lowered:
            gm.graph.eliminate_dead_code()
            gm.recompile()
            result.notes.append(f"{result.lowered} packed Linears split back into one Linear per piece "
                                "(OpenVINO runs those faster than one Linear and a split)")
        return result
