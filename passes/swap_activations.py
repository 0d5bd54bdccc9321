"""Replace hand-written activation formulas with the fused activation op.

    0.5*x*(1 + tanh(c*(x + 0.044715*x^3)))     =>  gelu(x, approximate="tanh")   c = sqrt(2/pi)
    x*sigmoid(2c*(x + 0.044715*x^3))           =>  gelu(x, approximate="tanh")
    0.5*x*(1 + erf(x/sqrt(2)))                  =>  gelu(x)
    x*sigmoid(x)                                =>  silu(x)
    x*relu6(x + 3)/6   (relu6 or hardtanh/clamp to [0, 6])  =>  hardswish(x)
    x*hardsigmoid(x)                            =>  hardswish(x)

Formulas are matched as polynomials (fxopt.pattern), so every ordering of the sums and
products matches, and constants agree to a relative 1e-6. Constraints: x is a
floating-point tensor and the formula's result has x's shape and dtype; no intermediate
value is used outside the formula (otherwise the rewrite would not remove it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from fxopt.ir import dtype_of, is_op, ops, replace_node, shape_of, topo_order
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.pattern import ARITHMETIC, Call, Template, X, atoms, match_any, polynomial, term

aten = torch.ops.aten
C = math.sqrt(2.0 / math.pi)
A = 0.044715
_TANH_ARG = (term(C, X), term(C * A, X, X, X))
_SIGMOID_ARG = (term(2 * C, X), term(2 * C * A, X, X, X))
_RELU6 = dict(arg=(term(1.0, X), term(3.0)), fixed=((1, "min_val", 0.0), (2, "max_val", 6.0)))
_CLAMP06 = dict(arg=(term(1.0, X), term(3.0)), fixed=((1, "min", 0.0), (2, "max", 6.0)))

# (name, template, replacement op, replacement kwargs)
REWRITES: tuple[tuple[str, Template, Any, dict[str, Any]], ...] = (
    ("gelu_tanh", (term(0.5, X), term(0.5, X, Call(ops.tanh, _TANH_ARG))), ops.gelu, {"approximate": "tanh"}),
    ("gelu_tanh", (term(1.0, X, Call(ops.sigmoid, _SIGMOID_ARG)),), ops.gelu, {"approximate": "tanh"}),
    ("gelu", (term(0.5, X), term(0.5, X, Call(aten.erf.default, (term(1 / math.sqrt(2.0), X),)))), ops.gelu, {}),
    ("silu", (term(1.0, X, Call(ops.sigmoid, (term(1.0, X),))),), ops.silu, {}),
    ("hardswish", (term(1 / 6, X, Call(aten.relu6.default, (term(1.0, X), term(3.0)))),), ops.hardswish, {}),
    ("hardswish", (term(1 / 6, X, Call(aten.hardtanh.default, **_RELU6)),), ops.hardswish, {}),
    ("hardswish", (term(1 / 6, X, Call(aten.clamp.default, **_CLAMP06)),), ops.hardswish, {}),
    ("hardswish", (term(1.0, X, Call(ops.hardsigmoid, (term(1.0, X),))),), ops.hardswish, {}),
)
_ACTIVATION_LIKE = frozenset({ops.tanh, ops.sigmoid, ops.hardsigmoid, aten.erf.default,
                              aten.hardtanh.default, aten.clamp.default, aten.relu6.default})


@dataclass(frozen=True)
class SwapActivations(Pass):
    name: ClassVar[str] = "swap-activations"
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ("fold-batchnorm",)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        done: set[fx.Node] = set()
        templates = [template for _, template, _, _ in REWRITES]
        # Outermost formulas first: the root of a formula comes after its parts.
        for node in reversed(list(gm.graph.nodes)):
            if node in done or not is_op(node, ARITHMETIC):
                continue
            found = match_any(node, templates, gm)
            if found is None:
                reason = _near_miss(node, gm)
                if reason:
                    result.skip(node, reason)
                continue
            index, m = found
            done |= m.interior
            label, _, op, kwargs = REWRITES[index]
            result.match()
            reason = _check(m)
            if reason:
                result.skip(node, reason)
                continue
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(op, (m.x,), dict(kwargs))
            fused.meta["val"] = node.meta.get("val")
            replace_node(node, fused)
            for dead in reversed(topo_order(m.interior - {node})):
                if not dead.users:
                    gm.graph.erase_node(dead)
            result.stats[label] += 1
            result.apply()
        return result


def _check(m: Any) -> str | None:
    x_dtype = dtype_of(m.x)
    if x_dtype is None or not x_dtype.is_floating_point:
        return f"x is not a floating-point tensor ({x_dtype})"
    if dtype_of(m.root) != x_dtype or shape_of(m.root) != shape_of(m.x):
        return "the formula's result differs from x in shape or dtype (broadcast or type promotion)"
    escaping = m.escaping()
    if escaping:
        return (f"intermediate '{escaping[0].name}' is also used outside the formula: "
                "fusing would not remove it")
    return None


def _near_miss(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """A reason when ``node`` computes ``x * f(g(x))`` for an activation-like ``f`` that no rule covers."""
    found = polynomial(node, gm)
    if found is None:
        return None
    poly, _ = found
    for atom in atoms(poly):
        if not is_op(atom, _ACTIVATION_LIKE) or not isinstance(atom.args[0], fx.Node):
            continue
        inner = polynomial(atom.args[0], gm)
        inner_atoms = set(atoms(inner[0])) if inner else {atom.args[0]}
        if any(other in inner_atoms for monomial in poly if atom in monomial for other in monomial):
            return (f"x*{atom.target.__name__.split('.')[0]}(...) with constants that match no exact "
                    "activation formula (e.g. QuickGELU's sigmoid(1.702*x)); left as written")
    return None
