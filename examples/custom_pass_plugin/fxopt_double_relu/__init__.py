"""Collapse repeated ReLU.

    relu(relu(x))  =>  relu(x)

Always exact: ReLU is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

import fxopt
from fxopt.ir import call_nodes, is_op, ops, replace_node


@dataclass(frozen=True)
class DoubleRelu(fxopt.Pass):
    name: ClassVar[str] = "double-relu"
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ("fold-batchnorm",)

    def __call__(self, gm: fx.GraphModule, ctx: fxopt.PassContext) -> fxopt.PassResult:
        result = fxopt.PassResult()
        for node in call_nodes(gm, ops.relu):
            if not is_op(node.args[0], ops.relu):
                continue
            result.match()
            replace_node(node, node.args[0])
            result.apply()
        return result
