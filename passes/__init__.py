"""fxopt's built-in passes, one per module, registered through the ``fxopt.passes`` entry points.

Pass classes are importable from here by class name (``fxopt.passes.FoldBatchNorm``): the
name is looked up among the registered passes on first access, so importing fxopt stays
cheap and this file never lists the passes.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from fxopt.registry import list_passes

    for pass_type in list_passes():
        if pass_type.__name__ == name:
            return pass_type
    raise AttributeError(f"module 'fxopt.passes' has no attribute {name!r}")
