"""Backends lower the optimized graph to something that runs.

A backend is a function ``(gm, signature, example_inputs, device, report) -> Lowered``.
Each runs the registered lowerings that apply to it (:func:`fxopt.lowering.lower_graph`)
and names none: kernels for fused or lower-precision patterns come in as lowering plugins.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import BackendError


@dataclass
class Lowered:
    """A lowered graph: ``run(*flat_inputs)`` returns the flat outputs."""

    graph_module: fx.GraphModule
    run: Callable[..., Any]


_BACKENDS = {
    "eager": "fxopt.backends.eager:lower_eager",
    "onnx": "fxopt.backends.onnx:lower_onnx",
}


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def lower(
    name: str,
    gm: fx.GraphModule,
    signature: Any,
    example_inputs: list[torch.Tensor],
    device: torch.device,
    report: Any,
) -> Lowered:
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r} (available: {', '.join(backend_names())})")
    module_name, func_name = _BACKENDS[name].split(":")
    try:
        lowering = getattr(importlib.import_module(module_name), func_name)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} is not available: {exc}") from exc
    return lowering(gm, signature, example_inputs, device, report)
