"""fxopt's canonical IR: an ATen-level ``fx.GraphModule`` with frozen weights.

Weights live on the module as buffers and enter the graph through ``get_attr`` nodes.
Every node carries ``node.meta["val"]`` (a FakeTensor, possibly with symbolic sizes).
Passes match ops through the vocabulary below, never by string names, and use the
helpers here to read and create constants so that no pass touches a tensor in place.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten


class ops:
    """The op vocabulary passes match against (one spelling per op, after canonicalization)."""

    linear = aten.linear.default
    addmm = aten.addmm.default
    mm = aten.mm.default
    matmul = aten.matmul.default
    t = aten.t.default
    transpose = aten.transpose.int
    permute = aten.permute.default
    view = aten.view.default
    reshape = aten.reshape.default
    batch_norm = aten.batch_norm.default
    dropout = aten.dropout.default
    native_dropout = aten.native_dropout.default
    feature_dropout = aten.feature_dropout.default
    alpha_dropout = aten.alpha_dropout.default
    feature_alpha_dropout = aten.feature_alpha_dropout.default
    split_with_sizes = aten.split_with_sizes.default
    split = aten.split.Tensor
    relu = aten.relu.default
    gelu = aten.gelu.default
    silu = aten.silu.default
    sigmoid = aten.sigmoid.default
    tanh = aten.tanh.default
    hardswish = aten.hardswish.default
    hardsigmoid = aten.hardsigmoid.default
    add = aten.add.Tensor
    mul = aten.mul.Tensor
    clone = aten.clone.default
    contiguous = aten.contiguous.default

    dropouts = frozenset({dropout, native_dropout, feature_dropout, alpha_dropout, feature_alpha_dropout})


def is_op(node: Any, *targets: Any) -> bool:
    """True when ``node`` is a ``call_function`` node calling one of ``targets``.

    ``targets`` may mix single ops and collections of ops.
    """
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    for target in targets:
        if isinstance(target, (set, frozenset, list, tuple)):
            if node.target in target:
                return True
        elif node.target == target:
            return True
    return False


def call_nodes(gm: fx.GraphModule, *targets: Any) -> list[fx.Node]:
    """Every node of ``gm`` that calls one of ``targets``, in graph order (a snapshot list)."""
    return [n for n in gm.graph.nodes if is_op(n, *targets)]


def count_ops(gm: fx.GraphModule, *targets: Any) -> int:
    return len(call_nodes(gm, *targets))


def op_histogram(gm: fx.GraphModule) -> Counter[str]:
    """How often each op is called: a readable summary for tests and reports."""
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node`` whether it was passed positionally or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# ---------------------------------------------------------------- constants


def is_constant(gm: fx.GraphModule, node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and isinstance(
        _lookup(gm, node.target), torch.Tensor
    )


def constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, or None when ``node`` is not a constant.

    ``None`` (an absent optional argument such as a Linear's bias) also gives None.
    """
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = _lookup(gm, node.target)
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
    tensor = tensor.detach()
    name = unique_attr_name(gm, name_hint)
    gm.register_buffer(name, tensor)
    graph = gm.graph
    anchor = before if before is not None else _first_non_placeholder(graph)
    with graph.inserting_before(anchor):
        node = graph.get_attr(name)
    node.meta["val"] = _fake_like(gm, tensor)
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


# ---------------------------------------------------------------- shapes


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_of(node: fx.Node) -> tuple[Any, ...] | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype_of(node: fx.Node) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def device_of(node: fx.Node) -> torch.device | None:
    v = val(node)
    return v.device if isinstance(v, torch.Tensor) else None


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


# ---------------------------------------------------------------- graph surgery


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A structural copy: a new graph and module tree, sharing the constant tensors.

    Used to give a pass a working copy that can be thrown away (rollback) without
    copying weights; passes must never modify a constant in place (the manager checks).
    """
    graph = fx.Graph()
    value_remap: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, value_remap)
    graph.output(out)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    root = torch.nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, copy_graph_module(child) if isinstance(child, fx.GraphModule) else child)
    for name, buf in gm._buffers.items():
        root.register_buffer(name, buf)
    for name, param in gm._parameters.items():
        root.register_parameter(name, param)
    new = fx.GraphModule(root, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Point every user of ``old`` at ``new`` and erase ``old``."""
    new.meta.setdefault("val", old.meta.get("val"))
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def cleanup(gm: fx.GraphModule) -> None:
    """Remove dead nodes and constants nobody reads, then regenerate the code."""
    gm.graph.eliminate_dead_code()
    remove_unused_constants(gm)
    gm.recompile()


def topo_order(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """``nodes`` sorted in graph order."""
    nodes = list(nodes)
    if not nodes:
        return []
    index = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return sorted(nodes, key=index.__getitem__)


def module_path(node: fx.Node) -> str:
    """The source module's path (``encoder.layer.0.attention.self.query``) when known."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path).replace("L['self'].", "").replace("L__self___", "")
    return node.name


def infer_val(node: fx.Node) -> Any:
    """Compute ``node.meta["val"]`` from its inputs' values (fake tensors), for new nodes.

    Lets a pass see the shape of a node it just created without re-propagating the graph.
    """
    import torch.utils._pytree as pytree
    from torch._guards import detect_fake_mode

    def value(a: Any) -> Any:
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    args = pytree.tree_map(value, node.args)
    kwargs = pytree.tree_map(value, node.kwargs)
    mode = detect_fake_mode(pytree.tree_leaves((args, kwargs)))
    if mode is None:
        result = node.target(*args, **kwargs)
    else:
        with mode:
            result = node.target(*args, **kwargs)
    node.meta["val"] = result
    return result


# ---------------------------------------------------------------- Linear layers


@dataclass(frozen=True)
class LinearParts:
    """``linear(x, W, b)`` taken apart, when ``W`` (and ``b`` if present) are constants."""

    node: fx.Node
    input: fx.Node
    weight_node: fx.Node
    weight: torch.Tensor
    bias_node: fx.Node | None
    bias: torch.Tensor | None

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def name(self) -> str:
        """A readable name for reports: the source module's path when known."""
        return module_path(self.node) or self.node.name


def linear_parts(gm: fx.GraphModule, node: fx.Node) -> LinearParts | None:
    """The pieces of a ``linear`` node whose weight is a 2-D constant and whose bias is a
    constant or absent; None for anything else."""
    if not is_op(node, ops.linear) or not isinstance(node.args[0], fx.Node):
        return None
    weight_node = arg(node, 1, "weight")
    bias_node = arg(node, 2, "bias")
    weight = constant(gm, weight_node)
    if weight is None or weight.dim() != 2:
        return None
    bias = constant(gm, bias_node)
    if bias_node is not None and bias is None:
        return None
    return LinearParts(node, node.args[0], weight_node, weight, bias_node, bias)


def constant_users(gm: fx.GraphModule, const_node: fx.Node) -> list[fx.Node]:
    """Every node reading the tensor behind ``const_node``, through any ``get_attr`` node
    (tied weights are one tensor registered under several names)."""
    tensor = constant(gm, const_node)
    if tensor is None:
        return []
    users: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            other = constant(gm, node)
            if other is not None and other.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                users.extend(node.users)
    return users


PROVENANCE_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def insert_linear(gm: fx.GraphModule, x: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None,
                  name_hint: str, *, before: fx.Node, like: fx.Node | None = None) -> fx.Node:
    """Add ``linear(x, weight, bias)`` before ``before``, with new constants and ``meta["val"]``.

    ``like``: the node this one stands for; its source module and stack trace are copied, so
    reports and later passes still name the layer (``module_path``).
    """
    w_node = add_constant(gm, weight.contiguous(), name_hint)
    args: tuple[Any, ...] = (x, w_node)
    if bias is not None:
        args += (add_constant(gm, bias.contiguous(), f"{name_hint}_bias"),)
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(ops.linear, args)
    if like is not None:
        node.meta.update({k: like.meta[k] for k in PROVENANCE_META if k in like.meta})
    infer_val(node)
    return node
