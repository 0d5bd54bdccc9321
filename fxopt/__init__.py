"""fxopt: an inference optimizer for the fully connected layers of PyTorch models.

    opt = fxopt.compile(model, example_inputs, passes=["remove-dropout", "fold-batchnorm"])
    y = opt(*example_inputs)
    print(opt.report)
"""

from __future__ import annotations

import importlib
from typing import Any

from fxopt import kernels  # noqa: F401  (registers torch.ops.fxopt.*, so saved programs load)
from fxopt.api import OptimizedModule, compile
from fxopt.capture import capture
from fxopt.checkpoint import from_checkpoint
from fxopt.errors import (
    BackendError,
    CaptureError,
    FxoptError,
    InputError,
    PassFailedError,
    PassOptionError,
    UnknownPassError,
)
from fxopt.pass_api import Pass, PassContext, PassResult, Skip
from fxopt.pipeline import DumpGraphs, PassInstrument, PassManager, PrintProgress
from fxopt.registry import get_pass, list_passes, register_pass
from fxopt.report import PassRecord, Report
from fxopt.saving import load, save

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CaptureError",
    "DumpGraphs",
    "FxoptError",
    "InputError",
    "OptimizedModule",
    "Pass",
    "PassContext",
    "PassFailedError",
    "PassInstrument",
    "PassManager",
    "PassOptionError",
    "PassRecord",
    "PassResult",
    "PrintProgress",
    "Report",
    "Skip",
    "UnknownPassError",
    "capture",
    "compile",
    "export_onnx",
    "finetune",
    "from_checkpoint",
    "get_pass",
    "list_passes",
    "load",
    "passes",
    "register_pass",
    "save",
    "tune",
]


def __getattr__(name: str) -> Any:
    # ``fxopt.passes`` (the built-in pass classes) is imported on first use, so that
    # ``import fxopt`` stays cheap and ``fxopt.passes.LowRank`` works without importing it.
    if name in ("passes", "tune"):  # fxopt.tune: the tuner, a callable module
        return importlib.import_module(f"fxopt.{name}")
    raise AttributeError(f"module 'fxopt' has no attribute {name!r}")


def finetune(*args: Any, **kwargs: Any) -> Any:
    """Train an optimized model's float constants by distillation; see :func:`fxopt.distill.finetune`."""
    from fxopt.distill import finetune as _finetune

    return _finetune(*args, **kwargs)


def export_onnx(*args: Any, **kwargs: Any) -> Any:
    """Export an optimized model to ONNX; see :func:`fxopt.frontends.onnx_export.export_onnx`."""
    from fxopt.frontends.onnx_export import export_onnx as _export_onnx

    return _export_onnx(*args, **kwargs)
