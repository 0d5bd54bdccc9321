"""Collapse repeated ReLU.

    relu(relu(x))  =>  relu(x)

Always exact: ReLU is idempotent. No constraint: when something else also reads the inner
ReLU, it stays for that reader and the outer one still goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.fx as fx

from fxopt.ir import is_op, ops, replace_node
from fxopt.rewrite import Match, Rule, RulePass


class ReluOfRelu(Rule[Match]):
    anchor = ops.relu

    def match(self, node: fx.Node, gm: fx.GraphModule) -> Match | None:
        return Match(gm, node) if is_op(node.args[0], ops.relu) else None

    def rewrite(self, m: Match) -> None:
        replace_node(m.node, m.node.args[0])


@dataclass(frozen=True)
class DoubleRelu(RulePass):
    name: ClassVar[str] = "double-relu"
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ("fold-batchnorm",)

    def rules(self) -> Sequence[Rule[Any]]:
        return [ReluOfRelu()]
