"""``fxopt.tune``: the fastest model within a task-metric budget, across every technique.

    opt = fxopt.tune(model, x, data=[(x_val, y_val)], metric="accuracy", max_drop=0.005)
    print(opt.report.search)          # every candidate, its latency, metric and fate; the Pareto table

``fxopt.tune`` is this module, callable as :func:`fxopt.tune.tune`. Techniques come from the ``fxopt.techniques`` entry-point group (:mod:`fxopt.tune.techniques`).
"""

import sys
import types
from typing import Any

from fxopt.lossy.task import METRICS, TaskBudget
from fxopt.tune.log import Candidate, ParetoRow, TuneLog
from fxopt.tune.search import tune
from fxopt.tune.techniques import (
    Technique,
    list_techniques,
    registered_technique,
    select_techniques,
)

__all__ = ["METRICS", "Candidate", "ParetoRow", "TaskBudget", "Technique", "TuneLog", "list_techniques",
           "registered_technique", "select_techniques", "tune"]


class _CallableModule(types.ModuleType):
    """``fxopt.tune(model, ...)`` calls :func:`tune`; ``fxopt.tune.TuneLog`` and the rest stay reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
