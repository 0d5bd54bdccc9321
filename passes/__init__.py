"""fxopt's built-in passes, one per module, registered through the ``fxopt.passes`` entry points.

Pass classes are importable from here (``fxopt.passes.FoldBatchNorm``); modules load on
first attribute access so importing fxopt stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_CLASSES = {
    "RemoveDropout": "remove_dropout",
    "FoldBatchNorm": "fold_batchnorm",
}

__all__ = sorted(_CLASSES)


def __getattr__(name: str) -> Any:
    module = _CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module 'fxopt.passes' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
