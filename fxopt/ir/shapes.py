"""Shape and dtype metadata: ``node.meta[\"val\"]`` and its (possibly symbolic) sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.constants import fake_mode_of


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_of(node: fx.Node) -> tuple[Any, ...] | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype_of(node: fx.Node) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def size_hint(dim: Any) -> int:
    """A concrete size for ``dim``: itself, or the example value behind a symbolic size."""
    if isinstance(dim, int):
        return dim
    # int(dim) would guard on the symbol and specialize the graph to the example size.
    from torch.fx.experimental import symbolic_shapes

    hint = getattr(symbolic_shapes, "optimization_hint", None) or getattr(symbolic_shapes, "hint_int", None)
    if hint is not None:
        try:
            return int(hint(dim))
        except Exception:
            pass
    return int(dim)


def numel_hint(shape: Sequence[Any]) -> int:
    total = 1
    for d in shape:
        total *= size_hint(d)
    return total


def propagate_shapes(gm: fx.GraphModule) -> None:
    """Recompute ``meta["val"]`` of every node from the placeholders' fake inputs.

    Symbolic sizes from capture survive: the placeholders keep their FakeTensors and the
    same fake mode evaluates the rest of the graph.
    """
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = fake_mode_of(gm)
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        FakeTensorProp(gm, mode).propagate(*inputs)
        return
    previous = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    finally:
        mode.allow_non_fake_inputs = previous

