"""The verified pass pipeline: the manager, the checks it consults, the instruments around it.

    manager = PassManager(passes, checks=[MyCheck()], instruments=[PrintProgress()])
    gm, records = manager.run(gm, PassContext(batches=[inputs]))
"""

from __future__ import annotations

from fxopt.pipeline.checks import (
    BaseCheck,
    Check,
    FrozenConstantsUntouched,
    GraphLint,
    Numerics,
    Rejected,
    Unrecoverable,
    UserModelUntouched,
    as_float64,
    default_checks,
    rounding_verdict,
)
from fxopt.pipeline.instruments import (
    CostDelta,
    DumpGraphs,
    PassInstrument,
    PassTiming,
    PrintProgress,
    ReportRows,
    WarnOnRollback,
)
from fxopt.pipeline.manager import PassManager, reference_outputs
from fxopt.pipeline.step import PassStep

__all__ = [
    "BaseCheck",
    "Check",
    "CostDelta",
    "DumpGraphs",
    "FrozenConstantsUntouched",
    "GraphLint",
    "Numerics",
    "PassInstrument",
    "PassManager",
    "PassStep",
    "PassTiming",
    "PrintProgress",
    "Rejected",
    "ReportRows",
    "Unrecoverable",
    "UserModelUntouched",
    "WarnOnRollback",
    "as_float64",
    "default_checks",
    "reference_outputs",
    "rounding_verdict",
]
