"""Compatibility name: the pass manager lives in :mod:`fxopt.pipeline`."""

from __future__ import annotations

from fxopt.pipeline import (
    DumpGraphs,
    PassInstrument,
    PassManager,
    PrintProgress,
    as_float64,
    reference_outputs,
    rounding_verdict,
)

__all__ = [
    "DumpGraphs",
    "PassInstrument",
    "PassManager",
    "PrintProgress",
    "as_float64",
    "reference_outputs",
    "rounding_verdict",
]
