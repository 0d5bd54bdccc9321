"""``fxopt.export_onnx``: optimize (if needed), write a checked ``.onnx`` file, check parity.

It calls the API (``fxopt.compile`` for a plain model) and the ONNX backend's exporter, so it
sits above both; nothing below imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fxopt.api import OptimizedModule, compile
from fxopt.backends.onnx import (
    DEFAULT_OPSET,
    OrtRunner,
    export_graph,
    ort_session,
)
from fxopt.backends.onnx import check_parity as check_onnx_parity
from fxopt.errors import InputError
from fxopt.report import Report
from fxopt.signature import normalize_example_inputs
from fxopt.verify import run_graph


def export_onnx(
    model_or_optimized: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    passes: Any = None,
    dynamic_shapes: Any = None,
    opset: int | None = None,
    *,
    check_parity: bool = True,
    portable: bool = False,
) -> tuple[str, Report]:
    """Export an optimized model to ONNX and check it; returns ``(path, report)``.

    Args:
        model_or_optimized: an :class:`fxopt.OptimizedModule`, or a plain model, which is
            first optimized with ``fxopt.compile(model, example_inputs, passes=passes,
            dynamic_shapes=dynamic_shapes)``.
        example_inputs: a tuple of tensors the model can be called with.
        path: where to write the ``.onnx`` file.
        passes: the pipeline for a plain model (None: every exact pass).
        dynamic_shapes: for a plain model, forwarded to capture; the sizes that are dynamic
            in the optimized graph stay dynamic (symbolic) in the ONNX graph.
        opset: the ONNX opset, at least 20 by default so GELU stays one node.
        check_parity: run the file in ONNX Runtime (CPU) on ``example_inputs`` and raise
            :class:`fxopt.BackendError` unless it matches the optimized graph.
        portable: write standard ONNX operators only. By default the graph holds ONNX
            Runtime's fused contrib ops (``com.microsoft`` Attention, BiasGelu...), which
            other ONNX runtimes do not run.

    The report gets the lowerings' notes (which patterns became fused ONNX Runtime ops, and
    why others did not) and a note with the opset, node count and the parity error.
    """
    args = normalize_example_inputs(example_inputs)
    if isinstance(model_or_optimized, OptimizedModule):
        if passes is not None or dynamic_shapes is not None:
            raise InputError("passes and dynamic_shapes apply to a plain model; this model is already optimized")
        optimized = model_or_optimized
    elif isinstance(model_or_optimized, torch.nn.Module):
        optimized = compile(model_or_optimized, args, passes=passes, dynamic_shapes=dynamic_shapes)
    else:
        raise InputError(f"export_onnx takes an nn.Module or an OptimizedModule, got {type(model_or_optimized).__name__}")
    gm = optimized.graph_module
    if any(t.is_meta for t in gm.buffers()):
        raise InputError("this module runs in ONNX Runtime, which owns its weights; export the model itself, "
                         "or a module compiled with backend='eager'")
    signature = optimized.signature
    flat = [t.detach() for t in signature.flatten(args, None, what="example input")]
    path = Path(path)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    exported = export_graph(gm, flat, path, signature, opset, portable=portable)
    report = optimized.report
    report.notes.extend(exported.notes)  # what the lowerings wrote (contrib ops) and what they left
    note = f"ONNX export: {path} (opset {opset}, {exported.node_count} nodes)"
    if opset < DEFAULT_OPSET:
        note += f"; below opset {DEFAULT_OPSET} GELU is exported as elementwise nodes"
    if check_parity:
        cpu = torch.device("cpu")
        runner = OrtRunner(ort_session(path, cpu), exported, cpu)
        error = check_onnx_parity(run_graph(gm, flat), runner(*flat), exported.parity_rtol)
        note += f"; ONNX Runtime parity: max rel err {error:.2e}"
    report.notes.append(note)
    return str(path), report
