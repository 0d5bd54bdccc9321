"""The op vocabulary passes match against, and helpers to find and read calls."""

from __future__ import annotations

from collections import Counter
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

