"""A rule: a pattern anchored on one op, a check that may refuse, and a rewrite.

    class DropoutIsIdentity(Rule[Match]):
        anchor = ops.dropout
        def match(self, node, gm): return Match(gm, node)        # or None: not this pattern
        def check(self, m): return dropout_inactive(m.node)      # a Refusal, or None
        def rewrite(self, m): replace_node(m.node, m.node.args[0])

``match`` only recognizes the shape of the pattern; every condition that can fail for a
reason worth reporting belongs in ``check``, so a refused site is counted and explained
instead of silently ignored. ``rewrite`` runs only after ``check`` returned None and may
then assume everything ``check`` verified. Values that both need (folded weights, a new
shape) are computed once, as cached properties of the match.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch.fx as fx

from fxopt.rewrite.refusal import Refusal


@dataclass(eq=False)
class Match:
    """One site a rule found. ``node`` is the anchor: the node the driver offered the rule,
    on which a refusal is reported."""

    gm: fx.GraphModule
    node: fx.Node

    @property
    def nodes(self) -> Collection[fx.Node]:
        """Every node this match consumes; the driver offers none of them to a later match."""
        return (self.node,)


M = TypeVar("M", bound=Match)


class Rule(Generic[M]):
    """A rewrite of one pattern. Subclasses set ``anchor`` (an op, or a collection of ops:
    the driver offers ``match`` only nodes calling one of them) and implement ``match`` and
    ``rewrite``; ``check`` refuses nothing unless overridden. ``label``, when set, is also
    counted in the pass's stats each time the rule applies (e.g. which activation)."""

    anchor: Any = ()
    label: str = ""

    def match(self, node: fx.Node, gm: fx.GraphModule) -> M | None:
        raise NotImplementedError

    def check(self, match: M) -> Refusal | None:
        return None

    def rewrite(self, match: M) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class RefuseUnmatched(Rule[Match]):
    """Catches every anchor node the rules before it did not match, and refuses it.

    Listed last, it makes a pass report the sites it looked at but found no rewrite for
    (a BatchNorm next to no Linear) instead of passing over them in silence.
    """

    refusal: Refusal
    anchor: Any  # required in practice: the base class's empty default matches nothing

    def match(self, node: fx.Node, gm: fx.GraphModule) -> Match | None:
        return Match(gm, node)

    def check(self, match: Match) -> Refusal | None:
        return self.refusal
