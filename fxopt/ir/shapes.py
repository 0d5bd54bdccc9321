"""Shape and dtype metadata: ``node.meta[\"val\"]`` and its (possibly symbolic) sizes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


# node.meta key: what the node's "val" was computed from (see _stamp). A node whose stamp
# still matches, and none of whose inputs' values changed, keeps its value.
STAMP = "fxopt_shape_stamp"


def propagate_shapes(gm: fx.GraphModule, *, incremental: bool = False) -> int:
    """Recompute ``meta["val"]`` of the graph's nodes from the placeholders' fake inputs.

    Symbolic sizes from capture survive: the placeholders keep their FakeTensors and the
    same fake mode evaluates the rest of the graph.

    ``incremental=True`` recomputes only the nodes whose value may have changed since the
    last propagation: those without a value, those whose op, arguments or (for a constant)
    tensor's size differ from what their value was computed from, and those an input of
    which got a value of another shape, dtype or strides. Everything else keeps its value,
    which a full propagation would recompute identically (a node's value is a function of
    its op, its arguments and its inputs' values). Returns how many nodes were recomputed.
    """
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = fake_mode_of(gm)
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        FakeTensorProp(gm, mode).propagate(*inputs)
        stamp_shapes(gm)
        return len(gm.graph.nodes)
    previous = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        if not incremental:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
            stamp_shapes(gm)
            return len(gm.graph.nodes)
        return _propagate_changed(gm, FakeTensorProp(gm, mode), mode)
    finally:
        mode.allow_non_fake_inputs = previous


def _propagate_changed(gm: fx.GraphModule, interpreter: Any, mode: Any) -> int:
    changed: set[fx.Node] = set()
    recomputed = 0
    with mode:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                node.meta["val"] = fx.node.map_arg(node.args[0], lambda n: n.meta.get("val"))
                continue
            stamp = _stamp(gm, node)
            recorded = node.meta.get(STAMP)
            # The key recorded with the stamp, not the current value: a pass may have set
            # the value itself (infer_val) without its users' values following.
            before = recorded[1] if recorded is not None else None
            if (recorded is not None and recorded[0] == stamp and "val" in node.meta
                    and _shape_key(node.meta["val"]) == before
                    and not any(i in changed for i in node.all_input_nodes)):
                continue
            interpreter.env = {i: i.meta.get("val") for i in node.all_input_nodes}
            interpreter.run_node(node)
            after = _shape_key(node.meta.get("val"))
            node.meta[STAMP] = (stamp, after)
            recomputed += 1
            if recorded is None or after != before:
                changed.add(node)
    interpreter.env = {}
    return recomputed


def stamp_shapes(gm: fx.GraphModule) -> None:
    """Record, for every node, what its current ``meta["val"]`` was computed from, so that
    an incremental :func:`propagate_shapes` trusts it until the node or its inputs change."""
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output") and "val" in node.meta:
            node.meta[STAMP] = (_stamp(gm, node), _shape_key(node.meta["val"]))


def _stamp(gm: fx.GraphModule, node: fx.Node) -> Any:
    """What ``node``'s value depends on besides its inputs' values: op, target, arguments
    (input nodes by name), and for a constant its tensor's dtype, sizes and strides."""
    extra: Any = None
    if node.op == "get_attr":
        obj: Any = gm
        for atom in str(node.target).split("."):
            obj = getattr(obj, atom, None)
        extra = (obj.dtype, tuple(obj.shape), obj.stride(), obj.device) if isinstance(obj, torch.Tensor) else id(obj)
    return (node.op, node.target, freeze_arguments(node.args, _tensor_shape_key),
            freeze_arguments(node.kwargs, _tensor_shape_key), extra)


def freeze_arguments(value: Any, tensor_key: Callable[[torch.Tensor], Any]) -> Any:
    """A node's arguments as a hashable, comparable key: input nodes by name, a tensor
    argument as ``tensor_key(tensor)`` says, NaN equal to itself. Shape stamps and the
    search's value reuse both decide "is this node the same computation" with it."""
    if isinstance(value, fx.Node):
        return ("%node", value.name)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(freeze_arguments(v, tensor_key) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, freeze_arguments(v, tensor_key)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", *(freeze_arguments(v, tensor_key) for v in (value.start, value.stop, value.step)))
    if isinstance(value, torch.Tensor):
        return tensor_key(value)
    if isinstance(value, float) and value != value:
        return ("nan",)
    return value


def _tensor_shape_key(value: torch.Tensor) -> Any:
    return ("tensor", id(value), value.dtype, tuple(value.shape))


def _shape_key(value: Any) -> Any:
    """What of a value its users' values can depend on: dtype, device, sizes, strides."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.device, tuple(map(str, value.shape)), tuple(map(str, value.stride())))
    if isinstance(value, (list, tuple)):
        return tuple(_shape_key(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
