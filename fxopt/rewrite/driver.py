"""The one driver every rule-based pass runs on: traversal, counting, check before rewrite."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch.fx as fx

from fxopt.ir import is_op
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.rewrite.rule import Rule


def apply_rules(gm: fx.GraphModule, rules: Sequence[Rule[Any]], result: PassResult | None = None, *,
                reverse: bool = False) -> PassResult:
    """Offer every node of ``gm`` to ``rules`` once, in graph order (``reverse``: from the
    output back, so an outer pattern is found before the patterns inside it).

    A node goes to the first rule whose anchor it calls and whose ``match`` accepts it; that
    counts as matched. Then the rule's ``check`` either refuses (a skip with its refusal) or
    passes and ``rewrite`` runs (counted as applied). So ``matched == applied + skipped``.
    Nodes an earlier rewrite erased, and nodes an earlier match consumed, are not offered.
    """
    result = result if result is not None else PassResult()
    consumed: set[fx.Node] = set()
    nodes = list(gm.graph.nodes)
    for node in reversed(nodes) if reverse else nodes:
        if node in consumed or getattr(node, "_erased", False):
            continue
        for rule in rules:
            if not is_op(node, rule.anchor):
                continue
            found = rule.match(node, gm)
            if found is None:
                continue
            result.match()
            consumed.update(found.nodes)
            refusal = rule.check(found)
            if refusal is not None:
                result.skip(found.node, refusal)
            else:
                rule.rewrite(found)
                result.apply()
                if rule.label:
                    result.stats[rule.label] += 1
            break
    return result


class RulePass(Pass):
    """A pass that is a list of rules run by :func:`apply_rules`.

    Subclasses are frozen dataclasses like every pass; ``rules()`` builds the rules from the
    pass's options. ``reverse = True`` visits the graph from the output back.
    """

    reverse: ClassVar[bool] = False

    def rules(self) -> Sequence[Rule[Any]]:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return apply_rules(gm, self.rules(), reverse=self.reverse)
