"""Rules, refusals and the driver that runs them.

A rule-based pass lists rules; :func:`apply_rules` visits the graph once, offers each node
to the rules, counts what matched and what applied, and runs a rule's ``rewrite`` only
after its ``check`` passed. A refused site becomes a skip with a :class:`Refusal`, whose
code the report groups by and tests assert. :mod:`fxopt.rewrite.constraints` holds the
conditions several rules share, each written once.
"""

from fxopt.rewrite import constraints
from fxopt.rewrite.driver import RulePass, apply_rules
from fxopt.rewrite.refusal import UNSPECIFIED, Refusal
from fxopt.rewrite.rule import Match, RefuseUnmatched, Rule

__all__ = ["UNSPECIFIED", "Match", "RefuseUnmatched", "Refusal", "Rule", "RulePass", "apply_rules", "constraints"]
