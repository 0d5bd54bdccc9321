"""Match elementwise formulas whatever order they were written in.

A formula built from ``+``, ``-``, ``*``, division by a number, negation and small integer
powers is expanded into a polynomial: a map from monomials (sorted tuples of "atom" nodes)
to coefficients. ``0.5*x*(1 + t)``, ``x*0.5 + (x*t)*0.5`` and ``(x + t*x) / 2`` all expand to
``{(x,): 0.5, (t, x): 0.5}``, so a pattern is written once, as a polynomial template::

    X = pattern.X
    SILU = (term(1.0, X, Call(ops.sigmoid, (term(1.0, X),))),)
    found = pattern.match(node, SILU, gm)  # Match(gm, node, x=<node>, interior=...) or None

Only the root and nodes with a single user are expanded: a value used elsewhere is an
atom, since a rewrite around it could not remove it anyway. ``Match.interior`` lists the
nodes the formula consists of.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt import rewrite
from fxopt.ir import arg, constant, is_op

aten = torch.ops.aten

Monomial = tuple[fx.Node, ...]
Polynomial = dict[Monomial, float]

_ADD = {aten.add.Tensor, aten.add.Scalar}
_SUB = {aten.sub.Tensor, aten.sub.Scalar}
_RSUB = {aten.rsub.Scalar, aten.rsub.Tensor}
_MUL = {aten.mul.Tensor, aten.mul.Scalar}
_DIV = {aten.div.Tensor, aten.div.Scalar}
_POW = {aten.pow.Tensor_Scalar}
_NEG = {aten.neg.default}
ARITHMETIC = frozenset(_ADD | _SUB | _RSUB | _MUL | _DIV | _POW | _NEG)

MAX_TERMS = 16
MAX_DEGREE = 6


class _Variable:
    def __repr__(self) -> str:
        return "X"


X = _Variable()
"""The variable of a template: one node, the same everywhere it appears."""


@dataclass(frozen=True)
class Call:
    """A template atom: a call to ``op`` whose first argument matches the template ``arg``.

    ``fixed`` lists further arguments that must have given values, as
    ``(position, keyword, value)`` triples (e.g. ``hardtanh``'s bounds).
    """

    op: Any
    arg: tuple[tuple[tuple[Any, ...], float], ...]
    fixed: tuple[tuple[int, str, float], ...] = ()


Template = tuple[tuple[tuple[Any, ...], float], ...]


def term(coefficient: float, *atoms: Any) -> tuple[tuple[Any, ...], float]:
    """One monomial of a template: ``coefficient`` times the product of ``atoms``."""
    return tuple(atoms), float(coefficient)


@dataclass(eq=False)
class Match(rewrite.Match):
    """``node`` (the root) computes the template with ``X = x``; ``interior`` are the
    formula's nodes, the root included: all of them are consumed by a rewrite of the root
    (``fxopt.rewrite.constraints.private_region`` says whether it removes them)."""

    x: fx.Node
    interior: frozenset[fx.Node]

    @property
    def nodes(self) -> frozenset[fx.Node]:
        return self.interior


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def polynomial(root: fx.Node, gm: fx.GraphModule | None = None) -> tuple[Polynomial, set[fx.Node]] | None:
    """The polynomial ``root`` computes, and the nodes expanded to get it (root included).

    None when ``root`` is not arithmetic or the expansion grows beyond a small formula.
    """
    if not is_op(root, ARITHMETIC):
        return None
    expanded: set[fx.Node] = set()
    try:
        poly = _expand(root, True, expanded, gm)
    except _NotPolynomial:
        return None
    return poly, expanded


class _NotPolynomial(Exception):
    pass


def _scalar(value: Any, gm: fx.GraphModule | None) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    tensor = constant(gm, value) if gm is not None else None
    if tensor is not None and tensor.dim() == 0 and tensor.is_floating_point():
        return float(tensor)
    return None


def _operand(value: Any, expanded: set[fx.Node], gm: fx.GraphModule | None) -> Polynomial:
    number = _scalar(value, gm)
    if number is not None:
        return {(): number}
    if not isinstance(value, fx.Node):
        raise _NotPolynomial
    return _expand(value, False, expanded, gm)


def _expand(node: fx.Node, is_root: bool, expanded: set[fx.Node], gm: fx.GraphModule | None) -> Polynomial:
    if not is_op(node, ARITHMETIC) or (not is_root and len(node.users) != 1):
        return {(node,): 1.0}
    expanded.add(node)
    a = node.args[0]
    if node.target in _NEG:
        return _scale(_operand(a, expanded, gm), -1.0)
    b = node.args[1]
    # export passes rsub.Scalar's and sub.Scalar's alpha positionally, add.Tensor's by keyword
    alpha = _scalar(arg(node, 2, "alpha", 1), gm)
    if alpha is None:
        raise _NotPolynomial
    if node.target in _ADD:
        return _add(_operand(a, expanded, gm), _scale(_operand(b, expanded, gm), alpha))
    if node.target in _SUB:
        return _add(_operand(a, expanded, gm), _scale(_operand(b, expanded, gm), -alpha))
    if node.target in _RSUB:
        return _add(_operand(b, expanded, gm), _scale(_operand(a, expanded, gm), -alpha))
    if node.target in _MUL:
        return _multiply(_operand(a, expanded, gm), _operand(b, expanded, gm))
    if node.target in _DIV:
        divisor = _scalar(b, gm)
        if divisor is None or divisor == 0 or node.kwargs.get("rounding_mode") is not None:
            raise _NotPolynomial
        return _scale(_operand(a, expanded, gm), 1.0 / divisor)
    exponent = _scalar(b, gm)  # pow
    if exponent is None or exponent != int(exponent) or not 1 <= exponent <= MAX_DEGREE:
        raise _NotPolynomial
    base = _operand(a, expanded, gm)
    result = base
    for _ in range(int(exponent) - 1):
        result = _multiply(result, base)
    return result


def _scale(poly: Polynomial, factor: float) -> Polynomial:
    return {m: c * factor for m, c in poly.items()}


def _add(p: Polynomial, q: Polynomial) -> Polynomial:
    out = dict(p)
    for monomial, coefficient in q.items():
        out[monomial] = out.get(monomial, 0.0) + coefficient
    return _trim(out)


def _multiply(p: Polynomial, q: Polynomial) -> Polynomial:
    out: Polynomial = {}
    for (m1, c1), (m2, c2) in itertools.product(p.items(), q.items()):
        monomial = tuple(sorted(m1 + m2, key=lambda n: n.name))
        if len(monomial) > MAX_DEGREE:
            raise _NotPolynomial
        out[monomial] = out.get(monomial, 0.0) + c1 * c2
    return _trim(out)


def _trim(poly: Polynomial) -> Polynomial:
    poly = {m: c for m, c in poly.items() if c != 0.0}
    if len(poly) > MAX_TERMS:
        raise _NotPolynomial
    return poly


def atoms(poly: Polynomial) -> list[fx.Node]:
    """The distinct atom nodes of ``poly``, in a stable order."""
    seen: dict[fx.Node, None] = {}
    for monomial in poly:
        for node in monomial:
            seen.setdefault(node, None)
    return list(seen)


def match(root: fx.Node, template: Template, gm: fx.GraphModule | None = None) -> Match | None:
    """Match ``root`` against ``template``, trying each atom of its polynomial as ``X``."""
    found = polynomial(root, gm)
    if found is None:
        return None
    poly, expanded = found
    for x in atoms(poly):
        interior = _match_poly(poly, template, x, gm)
        if interior is not None:
            return Match(gm, root, x, frozenset(expanded | interior))  # type: ignore[arg-type]
    return None


def match_any(root: fx.Node, templates: Iterable[Template], gm: fx.GraphModule | None = None) -> tuple[int, Match] | None:
    """The index of the first template ``root`` matches, and the match."""
    for index, template in enumerate(templates):
        found = match(root, template, gm)
        if found is not None:
            return index, found
    return None


def _match_poly(poly: Polynomial, template: Template, x: fx.Node, gm: fx.GraphModule | None) -> set[fx.Node] | None:
    """The nodes consumed when ``poly`` equals ``template`` with ``X = x``, else None."""
    if len(poly) != len(template):
        return None
    items = list(poly.items())
    for order in itertools.permutations(items):
        consumed: set[fx.Node] = set()
        for (monomial, coefficient), (t_atoms, t_coefficient) in zip(order, template):
            if not close(coefficient, t_coefficient):
                break
            found = _match_monomial(monomial, t_atoms, x, gm)
            if found is None:
                break
            consumed |= found
        else:
            return consumed
    return None


def _match_monomial(monomial: Monomial, t_atoms: tuple[Any, ...], x: fx.Node, gm: fx.GraphModule | None) -> set[fx.Node] | None:
    if len(monomial) != len(t_atoms):
        return None
    for order in set(itertools.permutations(monomial)):
        consumed: set[fx.Node] = set()
        for node, t_atom in zip(order, t_atoms):
            found = _match_atom(node, t_atom, x, gm)
            if found is None:
                break
            consumed |= found
        else:
            return consumed
    return None


def _match_atom(node: fx.Node, t_atom: Any, x: fx.Node, gm: fx.GraphModule | None) -> set[fx.Node] | None:
    if t_atom is X:
        return set() if node is x else None
    if not isinstance(t_atom, Call) or not is_op(node, t_atom.op) or node is x:
        return None
    for position, keyword, value in t_atom.fixed:
        given = _scalar(arg(node, position, keyword), gm)
        if given is None or not close(given, value):
            return None
    argument = node.args[0]
    if argument is x:
        sub: Polynomial = {(x,): 1.0}
        expanded: set[fx.Node] = set()
    else:
        found = polynomial(argument, gm) if isinstance(argument, fx.Node) else None
        if found is None:
            return None
        sub, expanded = found
    inner = _match_poly(sub, t_atom.arg, x, gm)
    return None if inner is None else {node} | expanded | inner


# ---------------------------------------------------------------- activation formulas

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715
_HARDTANH_0_6 = ((1, "min_val", 0.0), (2, "max_val", 6.0))
_CLAMP_0_6 = ((1, "min", 0.0), (2, "max", 6.0))
_X_PLUS_3 = (term(1.0, X), term(3.0))

GELU_TANH: Template = (term(0.5, X), term(0.5, X, Call(aten.tanh.default, (term(_C, X), term(_C * _A, X, X, X)))))
"""0.5*x*(1 + tanh(c*(x + 0.044715*x^3))), c = sqrt(2/pi): GPT-2's ``gelu_new``."""
GELU_TANH_SIGMOID: Template = (term(1.0, X, Call(aten.sigmoid.default, (term(2 * _C, X), term(2 * _C * _A, X, X, X)))),)
"""x*sigmoid(2c*(x + 0.044715*x^3)): the same function, since 1 + tanh(z) = 2*sigmoid(2z)."""
GELU_ERF: Template = (term(0.5, X), term(0.5, X, Call(aten.erf.default, (term(1 / math.sqrt(2.0), X),))))
SILU: Template = (term(1.0, X, Call(aten.sigmoid.default, (term(1.0, X),))),)
HARDSWISH_RELU6: Template = (term(1 / 6, X, Call(aten.relu6.default, _X_PLUS_3)),)
HARDSWISH_HARDTANH: Template = (term(1 / 6, X, Call(aten.hardtanh.default, _X_PLUS_3, _HARDTANH_0_6)),)
HARDSWISH_CLAMP: Template = (term(1 / 6, X, Call(aten.clamp.default, _X_PLUS_3, _CLAMP_0_6)),)
HARDSWISH_HARDSIGMOID: Template = (term(1.0, X, Call(aten.hardsigmoid.default, (term(1.0, X),))),)

ACTIVATION_LIKE = frozenset({aten.tanh.default, aten.sigmoid.default, aten.hardsigmoid.default, aten.erf.default,
                             aten.hardtanh.default, aten.clamp.default, aten.relu6.default})


def gated_by_activation(root: fx.Node, gm: fx.GraphModule | None = None) -> fx.Node | None:
    """The call ``f(...)`` when ``root`` computes ``x * f(g(x))`` for an activation-like ``f``
    (:data:`ACTIVATION_LIKE`), whatever its constants: every term has the factor ``x`` and
    one has ``f`` too. None otherwise. Lets a pass say that a formula looks like an activation
    but is none it knows (QuickGELU's ``x*sigmoid(1.702*x)``)."""
    found = polynomial(root, gm)
    if found is None:
        return None
    poly, _ = found
    for atom in atoms(poly):
        if not is_op(atom, ACTIVATION_LIKE) or not isinstance(atom.args[0], fx.Node):
            continue
        inner = polynomial(atom.args[0], gm)
        for x in set(atoms(inner[0])) if inner else {atom.args[0]}:
            if all(x in monomial for monomial in poly) and any(atom in monomial for monomial in poly):
                return atom
    return None
