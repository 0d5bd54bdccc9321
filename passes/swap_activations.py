"""Replace hand-written activation formulas with the fused activation op.

    0.5*x*(1 + tanh(c*(x + 0.044715*x^3)))     =>  gelu(x, approximate="tanh")   c = sqrt(2/pi)
    x*sigmoid(2c*(x + 0.044715*x^3))           =>  gelu(x, approximate="tanh")
    0.5*x*(1 + erf(x/sqrt(2)))                  =>  gelu(x)
    x*sigmoid(x)                                =>  silu(x)
    x*relu6(x + 3)/6   (relu6 or hardtanh/clamp to [0, 6])  =>  hardswish(x)
    x*hardsigmoid(x)                            =>  hardswish(x)

Formulas are matched as polynomials (fxopt.pattern), so every ordering of the sums and
products matches, and constants agree to a relative 1e-6. Constraints: floating_point (x);
same_shape_and_dtype (the result and x: no broadcast, no promotion); private_region (no
intermediate is used outside the formula, or fusing would not remove it). ``x*f(g(x))`` for
an activation-like f that matches no formula is refused: no-exact-formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.fx as fx

from fxopt import pattern
from fxopt.ir import ops, replace_node
from fxopt.pattern import ARITHMETIC, Template
from fxopt.rewrite import Match, Refusal, Rule, RulePass
from fxopt.rewrite.constraints import floating_point, private_region, same_shape_and_dtype

TANH = (("approximate", "tanh"),)


@dataclass(frozen=True)
class Formula(Rule[pattern.Match]):
    template: Template
    op: Any
    kwargs: tuple[tuple[str, Any], ...] = ()
    label: str = ""
    anchor = ARITHMETIC

    def match(self, node: fx.Node, gm: fx.GraphModule) -> pattern.Match | None:
        return pattern.match(node, self.template, gm)

    def check(self, m: pattern.Match) -> Refusal | None:
        return (floating_point(m.x) or same_shape_and_dtype(m.node, m.x)
                or private_region(m.interior - {m.node}, m.interior))

    def rewrite(self, m: pattern.Match) -> None:
        with m.gm.graph.inserting_before(m.node):
            fused = m.gm.graph.call_function(self.op, (m.x,), dict(self.kwargs))
        fused.meta["val"] = m.node.meta.get("val")
        replace_node(m.node, fused)  # the rest of the formula is dead now; the manager removes it


@dataclass(eq=False)
class NearMiss(Match):
    activation: fx.Node


class NoExactFormula(Rule[NearMiss]):
    """``x * f(g(x))`` for an activation-like ``f`` that no formula covers: left, and reported."""

    anchor = ARITHMETIC

    def match(self, node: fx.Node, gm: fx.GraphModule) -> NearMiss | None:
        activation = pattern.gated_by_activation(node, gm)
        return NearMiss(gm, node, activation) if activation is not None else None

    def check(self, m: NearMiss) -> Refusal | None:
        name = m.activation.target.__name__.split(".")[0]  # type: ignore[union-attr]
        return Refusal("no-exact-formula", f"x*{name}(...) with constants that match no exact activation formula "
                                           "(e.g. QuickGELU's sigmoid(1.702*x)); left as written")


RULES: tuple[Rule[Any], ...] = (
    Formula(pattern.GELU_TANH, ops.gelu, TANH, label="gelu_tanh"),
    Formula(pattern.GELU_TANH_SIGMOID, ops.gelu, TANH, label="gelu_tanh"),
    Formula(pattern.GELU_ERF, ops.gelu, label="gelu"),
    Formula(pattern.SILU, ops.silu, label="silu"),
    Formula(pattern.HARDSWISH_RELU6, ops.hardswish, label="hardswish"),
    Formula(pattern.HARDSWISH_HARDTANH, ops.hardswish, label="hardswish"),
    Formula(pattern.HARDSWISH_CLAMP, ops.hardswish, label="hardswish"),
    Formula(pattern.HARDSWISH_HARDSIGMOID, ops.hardswish, label="hardswish"),
    NoExactFormula(),
)


@dataclass(frozen=True)
class SwapActivations(RulePass):
    name: ClassVar[str] = "swap-activations"
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ("fold-batchnorm",)
    reverse: ClassVar[bool] = True  # outermost formulas first: the root of a formula comes after its parts

    def rules(self) -> Sequence[Rule[Any]]:
        return RULES
