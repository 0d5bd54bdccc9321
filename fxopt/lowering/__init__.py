"""Lowerings: patterns of the optimized graph turned into kernels a backend runs.

A lowering is a plugin, found like a pass: through the ``fxopt.lowerings`` entry-point group
(the built-in int8 lowering takes that path too, so the core names none) or registered for a
scope with :func:`registered_lowering`. Each declares

- where it applies: ``backends`` (``"eager"``, ``"onnx"``), ``devices`` (``"cpu"``, ``"cuda"``)
  and ``probe(device)``, the reason it cannot run on a device (None when it can);
- ``applies(gm)``: whether the graph holds its pattern;
- ``lower(gm, device)``: the rewrite, in place on a copy the backend owns, with counts and
  notes for the report. ``device`` is where PyTorch runs the graph, or None for a graph
  bound for ONNX, whose kernels come from the ONNX translations;
- ``onnx_translations()``: onnxscript functions for the custom ops it writes;
- ``parity_rtol``: how far ONNX Runtime may drift from the torch graph once it applied.

Backends call :func:`lower_graph` and never name a lowering or a pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import copy_graph_module
from fxopt.lowering.base import (
    Choose,
    Lowering,
    LoweringResult,
    OnnxTranslations,
    measured_inputs,
    measured_shapes,
)
from fxopt.lowering.registry import (
    ENTRY_POINT_GROUP,
    get_lowering,
    lowerings,
    refresh,
    registered_lowering,
)

__all__ = [
    "ENTRY_POINT_GROUP", "Choose", "Lowering", "LoweredGraph", "LoweringResult", "OnnxTranslations",
    "get_lowering", "lower_graph", "lowerings", "measured_inputs", "measured_shapes", "refresh",
    "registered_lowering",
]


@dataclass
class LoweredGraph:
    """A graph after every applicable lowering, and what applied."""

    graph_module: fx.GraphModule
    applied: list[Lowering] = field(default_factory=list)
    run_rtols: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    choices: list[dict[str, Any]] = field(default_factory=list)  # the measured lowerings' choices
    packed: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)  # see LoweringResult.packed

    def onnx_translations(self) -> dict[Any, Callable[..., Any]]:
        table: dict[Any, Callable[..., Any]] = {}
        for lowering in self.applied:
            table.update(lowering.onnx_translations())
        return table

    def parity_rtol(self) -> float | None:
        """The loosest parity tolerance among the lowerings that applied and the runs that
        declared one (None: exact)."""
        limits = [lowering.parity_rtol for lowering in self.applied if lowering.parity_rtol is not None]
        limits += self.run_rtols
        return max(limits) if limits else None


def lower_graph(gm: fx.GraphModule, backend: str, device: torch.device | None,
                stage: str | None = None, portable: bool = False, choose: Choose | None = None) -> LoweredGraph:
    """Run every registered lowering that applies to ``gm`` on ``backend`` and ``device``
    (None: a device-neutral ONNX graph), of ``stage`` only when given ("graph" or "kernel");
    ``portable`` leaves out the lowerings whose kernels export to a runtime's own ONNX
    domain (``Lowering.onnx_domains``). ``choose`` is passed to the lowerings that measure
    their sites (``Lowering.measured``); without it they rewrite every site they match.
    ``gm`` is never changed: the lowerings work on a copy that shares its constants, made
    only when one applies."""
    result = LoweredGraph(gm)
    for lowering in lowerings():
        if stage is not None and lowering.stage != stage:
            continue
        if backend not in lowering.backends or not lowering.applies(result.graph_module):
            continue
        if portable and lowering.onnx_domains:
            result.notes.append(f"{lowering.name}: not used in a portable export "
                                f"(it writes {', '.join(lowering.onnx_domains)} ops)")
            continue
        reason = None
        if device is not None and device.type not in lowering.devices:
            reason = f"it runs on {', '.join(lowering.devices)} only"
        elif device is not None:
            reason = lowering.probe(device)
        if reason is not None:
            result.notes.append(f"{lowering.name}: not used on {device}, the graph runs as it is: {reason}")
            continue
        if result.graph_module is gm:
            result.graph_module = copy_graph_module(gm)
        if lowering.measured:
            outcome = lowering.lower(result.graph_module, device, choose=choose)
        else:
            outcome = lowering.lower(result.graph_module, device)
        result.choices.extend(outcome.choices)
        result.packed.update(outcome.packed)
        result.applied.append(lowering)
        if outcome.parity_rtol is not None:
            result.run_rtols.append(outcome.parity_rtol)
        result.notes.extend(f"{lowering.name}: {note}" for note in outcome.notes)
    return result
