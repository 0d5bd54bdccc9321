"""Remove dropout, which is the identity at inference.

    dropout(x, p, train=False)                =>  x
    native_dropout(x, p, train=False)[0]      =>  x     if the mask output is unused
    feature_dropout / alpha_dropout / feature_alpha_dropout (x, p, train=False)  =>  x

Also when ``p == 0``. Constraints: the dropout is inactive (``dropout_inactive``; with
``train=True`` and ``p > 0`` it is random, so it stays: ``dropout-active``); a native
dropout's mask output is unused (``mask-used``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.fx as fx

from fxopt.ir import ops, replace_node
from fxopt.rewrite import Match, Refusal, Rule, RulePass
from fxopt.rewrite.constraints import dropout_inactive


class DropoutIsIdentity(Rule[Match]):
    anchor = ops.dropouts - {ops.native_dropout}

    def match(self, node: fx.Node, gm: fx.GraphModule) -> Match:
        return Match(gm, node)

    def check(self, m: Match) -> Refusal | None:
        return dropout_inactive(m.node)

    def rewrite(self, m: Match) -> None:
        replace_node(m.node, m.node.args[0])


class NativeDropoutIsIdentity(DropoutIsIdentity):
    """``native_dropout`` returns ``(output, mask)``; only ``output`` can be replaced by x."""

    anchor = ops.native_dropout

    def check(self, m: Match) -> Refusal | None:
        refusal = dropout_inactive(m.node)
        if refusal is None and any(u.target is not operator.getitem or (u.args[1] != 0 and u.users)
                                   for u in m.node.users):
            return Refusal("mask-used", "the dropout mask output is used")
        return refusal

    def rewrite(self, m: Match) -> None:
        for user in list(m.node.users):
            if user.args[1] == 0:
                replace_node(user, m.node.args[0])
            else:
                m.gm.graph.erase_node(user)  # the unused mask
        m.gm.graph.erase_node(m.node)


@dataclass(frozen=True)
class RemoveDropout(RulePass):
    name: ClassVar[str] = "remove-dropout"
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ()  # first: later passes then see Linears next to each other

    def rules(self) -> Sequence[Rule[Any]]:
        return [DropoutIsIdentity(), NativeDropoutIsIdentity()]
