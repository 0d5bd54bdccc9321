"""Remove dropout, which is the identity at inference.

    dropout(x, p, train=False)                =>  x
    native_dropout(x, p, train=False)[0]      =>  x     if the mask output is unused
    feature_dropout / alpha_dropout / feature_alpha_dropout (x, p, train=False)  =>  x

Also when ``p == 0``. A dropout with ``train=True`` and ``p > 0`` is random, so it stays,
with its reason in the report.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from fxopt.ir import arg, call_nodes, ops, replace_node
from fxopt.pass_api import Pass, PassContext, PassResult


@dataclass(frozen=True)
class RemoveDropout(Pass):
    name: ClassVar[str] = "remove-dropout"
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ()  # first: later passes then see Linears next to each other

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in call_nodes(gm, ops.dropouts):
            result.match()
            x = node.args[0]
            p = float(arg(node, 1, "p", 0.5))
            train = arg(node, 2, "train", True)
            if train and p > 0:
                result.skip(node, "dropout is active (train=True, p>0): it is random, not the identity")
                continue
            if node.target == ops.native_dropout:
                users = [u for u in node.users if u.users or u.args[1] == 0]
                if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
                    result.skip(node, "the dropout mask output is used")
                    continue
                for user in list(node.users):
                    if user.args[1] == 0:
                        replace_node(user, x)
                    else:
                        gm.graph.erase_node(user)  # the unused mask
                gm.graph.erase_node(node)
            else:
                replace_node(node, x)
            result.apply()
        return result
