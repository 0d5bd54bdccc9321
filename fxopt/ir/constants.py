"""Frozen constants: read them, add new ones, drop unused ones; never write one in place."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx


def constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, or None when ``node`` is not a constant.

    ``None`` (an absent optional argument such as a Linear's bias) also gives None.
    """
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = _lookup(gm, node.target)
    return value if isinstance(value, torch.Tensor) else None


def computed_constant(gm: fx.GraphModule, node: Any, max_nodes: int = 32,
                      max_numel: int = 1 << 22) -> torch.Tensor | None:
    """The value of ``node`` when it is computed from constants and literals alone (a mask
    built from ``arange``, a constant's transform), else None.

    Evaluates at most ``max_nodes`` ATen calls producing at most ``max_numel`` elements each
    (their shapes are read from the graph before anything runs); a value that depends on an
    input, a size, a random op or anything but a deterministic ATen call is not a constant.
    """
    order: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(current: fx.Node) -> bool:
        if current in seen:
            return True
        seen.add(current)
        if current.op == "get_attr":
            return constant(gm, current) is not None
        if current.op != "call_function" or not isinstance(current.target, torch._ops.OpOverload):
            return False
        if torch.Tag.nondeterministic_seeded in current.target.tags or len(order) >= max_nodes:
            return False
        fake = current.meta.get("val")
        if not isinstance(fake, torch.Tensor) or any(not isinstance(d, int) for d in fake.shape):
            return False
        if fake.numel() > max_numel or not all(visit(n) for n in current.all_input_nodes):
            return False
        order.append(current)
        return True

    if not isinstance(node, fx.Node) or not visit(node):
        return None
    values: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for current in order:
            args, kwargs = fx.node.map_arg((current.args, current.kwargs),
                                           lambda n: values[n] if n in values else constant(gm, n))
            values[current] = current.target(*args, **kwargs)
    value = values[node] if node in values else constant(gm, node)
    return value if isinstance(value, torch.Tensor) else None


def _lookup(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for atom in str(target).split("."):
        if not hasattr(obj, atom):
            return None
        obj = getattr(obj, atom)
    return obj


_NAME_CLEAN = re.compile(r"[^0-9a-zA-Z_]+")


def unique_attr_name(module: torch.nn.Module, hint: str, prefix: str = "c_") -> str:
    """A valid attribute name from ``hint`` (``encoder.layer.0.weight`` ->
    ``encoder_layer_0_weight``) that ``module`` does not use yet."""
    base = _NAME_CLEAN.sub("_", hint).strip("_") or "const"
    if base[0].isdigit():
        base = prefix + base
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, name_hint: str, *, before: fx.Node | None = None) -> fx.Node:
    """Register ``tensor`` as a new frozen constant and return a ``get_attr`` node for it.

    The node is inserted at the top of the graph's constants (or before ``before``),
    and gets ``meta["val"]`` so shape propagation and cost models see it at once.
    """
    given, tensor = tensor, tensor.detach()
    name = unique_attr_name(gm, name_hint)
    gm.register_buffer(name, tensor)
    graph = gm.graph
    anchor = before if before is not None else _first_non_placeholder(graph)
    with graph.inserting_before(anchor):
        node = graph.get_attr(name)
    # The tensor given, not the new detached one: the fake mode's memo knows it when a search's
    # trials add the same constant again and again.
    node.meta["val"] = _fake_like(gm, tensor if given.requires_grad else given)
    return node


def _first_non_placeholder(graph: fx.Graph) -> fx.Node:
    for node in graph.nodes:
        if node.op != "placeholder":
            return node
    raise AssertionError("graph has no output node")


def fake_mode_of(gm: fx.GraphModule) -> Any:
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def _fake_like(gm: fx.GraphModule, tensor: torch.Tensor) -> Any:
    mode = fake_mode_of(gm)
    if mode is None:
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    return mode.from_tensor(tensor, static_shapes=True)


def remove_unused_constants(gm: fx.GraphModule) -> int:
    """Delete constants no ``get_attr`` node refers to any more; returns how many."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    removed = 0
    for name in list(gm._buffers):
        if name not in used:
            del gm._buffers[name]
            removed += 1
    for name in list(gm._parameters):
        if name not in used:
            del gm._parameters[name]
            removed += 1
    return removed


def constants(gm: fx.GraphModule) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor the graph's ``get_attr`` nodes refer to, each once."""
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in seen:
            seen.add(node.target)
            value = _lookup(gm, node.target)
            if isinstance(value, torch.Tensor):
                yield str(node.target), value


def all_finite(*tensors: torch.Tensor | None) -> bool:
    """True when no element of the given tensors is NaN or infinite (None is skipped).

    Reads the max and min instead of ``isfinite(t).all()``, whose temporaries (``abs``
    and two masks) cost about twice the weight's size at their peak: a NaN makes both
    NaN, an infinity makes one of them infinite.
    """
    for tensor in tensors:
        if tensor is None or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        low, high = torch.aminmax(tensor)
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            return False
    return True

