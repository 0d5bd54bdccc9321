"""Merged or split siblings, measured: a packed Linear runs as one Linear per piece where that is faster.

    split_with_sizes(linear(x, [W1; ...; Wn], [b1; ...; bn]), [o1, ..., on], -1)[i]
      =>  linear(x, Wi, bi)        (Wi, bi: views of the packed rows, no new memory)

merge-siblings packs Linears that read one input into one GEMM (Q, K and V; a gated MLP's
gate and up) because one larger GEMM usually beats several: the input is read once and the
kernel has more columns to block over. "Usually" depends on the CPU, the shapes and the
kernel, so on the eager CPU backend each packed site is measured both ways at its shapes
(the project's one timing loop, :mod:`fxopt.pipeline.timings`, cached per machine): the
packed GEMM and its split, against one GEMM per piece. A site is split only when the pieces
measure faster; without a measurement (``choose`` None) the packed form stays. Each output
channel is computed from the same row of weights and bias either way; the split pieces are
contiguous, where the packed form's pieces are strided views of its output (what the pieces'
readers then cost is not part of the measurement). The oneDNN lowering runs after this one
and sees each piece as a Linear of its own.

Constraints: what :func:`fxopt.ir.packed_linear` matches (the packed Linear's only user is one
``split_with_sizes`` along its last dimension whose users are all ``getitem``), with a float
weight (int8 ones are the int8 lowerings' to choose) of the input's dtype.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir import PackedLinear, dtype_of, packed_linear, shape_of, unpack_linear
from fxopt.lowering.base import Choose, Lowering, LoweringResult, measured_inputs, measured_shapes


class SplitLinear(Lowering):
    """A packed Linear -> one Linear per piece, where that measures faster (eager, CPU)."""

    name = "split-linear"
    backends = ("eager",)
    devices = ("cpu",)
    stage = "kernel"  # a choice for this machine: opt.graph_module keeps the packed Linear
    # before the Linear kernel choices: oneDNN's fused Linear then sees each piece
    before = ("onednn-linear", "onednn-qlinear")
    measured = True

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(_float_packed(gm, node) is not None for node in gm.graph.nodes)

    def lower(self, gm: fx.GraphModule, device: torch.device | None, choose: Choose | None = None) -> LoweringResult:
        result = LoweringResult()
        kept = 0
        for node in list(gm.graph.nodes):
            packed = _float_packed(gm, node)
            if packed is None:
                continue
            if choose is None or not _split_measured_faster(packed, choose, result):
                kept += 1
                continue
            unpack_linear(gm, packed, share=True)
            result.lowered += 1
        if result.lowered:
            gm.graph.eliminate_dead_code()
            gm.recompile()
            result.notes.append(f"{result.lowered} packed Linear(s) run as one Linear per piece (measured faster "
                                "than one GEMM and a split at their shapes)")
        if kept and choose is not None:
            result.notes.append(f"{kept} packed Linear(s) stay one GEMM: measured no slower than one per piece")
        return result


def _float_packed(gm: fx.GraphModule, node: fx.Node) -> PackedLinear | None:
    packed = packed_linear(gm, node)
    if packed is None or len(packed.weight_parts) != 1:
        return None
    weight = packed.weight_parts[0]
    if not weight.is_floating_point() or dtype_of(node.args[0]) != weight.dtype:
        return None
    if len(shape_of(node.args[0]) or ()) < 2:
        return None
    return packed


def _split_measured_faster(packed: PackedLinear, choose: Choose, result: LoweringResult) -> bool:
    """Whether one Linear per piece measures faster than the packed Linear and its split at
    the site's shapes (``choose``: measured, or found in the cache); recorded in ``result``."""
    weight, bias, sizes = packed.weight_parts[0], packed.bias, packed.sizes
    rows = torch.tensor(sizes).cumsum(0).tolist()
    pieces = [(weight[start:stop], None if bias is None else bias[start:stop])
              for start, stop in zip([0, *rows[:-1]], rows)]

    def merged(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(torch.nn.functional.linear(x, weight, bias), sizes, -1)

    def split(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.nn.functional.linear(x, w, b) for w, b in pieces]

    shapes = measured_shapes(shape_of(packed.linear.args[0]))
    site = (f"x={'/'.join(map(str, shapes))} w={tuple(weight.shape)} pieces={sizes} "
            f"{str(weight.dtype).removeprefix('torch.')} bias={bias is not None}")
    choice = choose("split-linear", site, {"merged": merged, "split": split},
                    measured_inputs(shapes, weight.dtype), prefer="merged")
    result.choices.append({**choice.as_dict(), "nodes": [packed.linear.name]})
    return choice.name == "split"
