"""Graph surgery: copy, replace, clean up and order nodes."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.constants import remove_unused_constants
from fxopt.ir.ops import is_op, ops


def copy_graph_module(gm: fx.GraphModule, *, lazy: bool = False) -> fx.GraphModule:
    """A structural copy: a new graph and module tree, sharing the constant tensors.

    Used to give a pass a working copy that can be thrown away (rollback) without
    copying weights; passes must never modify a constant in place (the manager checks).
    ``lazy``: the copy writes its Python code only when it is first called or its code is read
    (torch.fx's lazy graph module), not on every ``recompile()``: for a search's trials, which
    are run node by node if at all, and where writing a large graph's code cost more than the
    trial (a 1.1B Llama: 0.1 s a copy, about a third of its int8 search).
    """
    graph = fx.Graph()
    value_remap: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, value_remap)
    graph.output(out)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    return _sharing_constants(gm, graph, lazy)


def _sharing_constants(gm: fx.GraphModule, graph: fx.Graph, lazy: bool) -> fx.GraphModule:
    """A graph module of ``graph`` whose constants (buffers, parameters, modules) are ``gm``'s
    own tensors; a child graph module is copied (:func:`copy_graph_module`)."""
    root = torch.nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, copy_graph_module(child) if isinstance(child, fx.GraphModule) else child)
    for name, buf in gm._buffers.items():
        root.register_buffer(name, buf)
    for name, param in gm._parameters.items():
        root.register_parameter(name, param)
    new = (_lazy_graph_module_class() if lazy else fx.GraphModule)(root, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def subgraph_module(gm: fx.GraphModule, nodes: Iterable[fx.Node], outputs: Iterable[fx.Node]) -> fx.GraphModule:
    """``nodes`` of ``gm`` (in graph order) alone as a graph module that shares ``gm``'s
    constants: each value they read from another node is a placeholder of that node's name
    (a constant, its ``get_attr``), and the graph returns ``outputs``. Nodes keep their names
    and metadata, so what is chosen by node name applies to it as to ``gm``. Its code is
    written lazily (see :func:`copy_graph_module`)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def outside(node: fx.Node) -> fx.Node:
        if node not in env:
            env[node] = graph.get_attr(node.target) if node.op == "get_attr" else graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
        return env[node]

    for node in nodes:
        for source in node.all_input_nodes:
            if source not in env:
                outside(source)
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[node] for node in outputs))
    return _sharing_constants(gm, graph, lazy=True)


def _lazy_graph_module_class() -> type[fx.GraphModule]:
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # a torch without it: code is written eagerly
        return fx.GraphModule
    return _LazyGraphModule


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


def keep_pieces_valid(gm: fx.GraphModule, pieces: Iterable[fx.Node]) -> None:
    """``pieces`` stand for tensors of their own but are strided slices of one larger output
    (a split Linear's): a ``view`` of one that needs the old contiguous layout becomes a
    ``reshape`` (same values, copies only when it must), and a graph output that is a piece,
    or a view of one, gets a copy, as the model returned: ``out.view(-1)`` would fail on a
    slice, and it would keep the whole larger buffer alive."""
    pieces = set(pieces)
    for piece in pieces:
        for user in list(piece.users):
            if is_op(user, ops.view):
                try:
                    infer_val(user)
                except Exception:
                    user.target = ops.reshape
                    infer_val(user)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for value in output.all_input_nodes:
        source = value
        while is_op(source, ops.view, ops.reshape):
            source = source.args[0]
        if source in pieces:
            with gm.graph.inserting_before(output):
                own = gm.graph.call_function(ops.clone, (value,), {"memory_format": torch.contiguous_format})
            infer_val(own)
            output.replace_input_with(value, own)
