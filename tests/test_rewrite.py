"""The rule driver, refusals and the shared constraints (fxopt.rewrite)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.capture import capture
from fxopt.ir import call_nodes, ops, replace_node
from fxopt.pass_api import PassResult, Skip
from fxopt.rewrite import UNSPECIFIED, Match, Refusal, RefuseUnmatched, Rule, RulePass, apply_rules
from fxopt.rewrite import constraints as c
from fxopt.testing import assert_skipped, run_pass


class Relus(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.depth):
            x = torch.relu(x)
        return x


def _relus(depth: int = 3) -> fx.GraphModule:
    return capture(Relus(depth), (torch.randn(2, 3),))


class CollapseRelu(Rule[Match]):
    """relu(relu(x)) => relu(x), refusing whatever ``refuse`` names; records what it did."""

    anchor = ops.relu
    label = "collapsed"

    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.refuse = refuse
        self.rewritten: list[str] = []

    def match(self, node: fx.Node, gm: fx.GraphModule) -> Match | None:
        return Match(gm, node) if call_nodes(gm, ops.relu) and node.args[0] in call_nodes(gm, ops.relu) else None

    def check(self, m: Match) -> Refusal | None:
        return Refusal("told-to", f"refused {m.node.name}") if m.node.name in self.refuse else None

    def rewrite(self, m: Match) -> None:
        self.rewritten.append(m.node.name)
        replace_node(m.node, m.node.args[0])


# ---------------------------------------------------------------- the driver


def test_driver_counts_matched_applied_and_skipped() -> None:
    gm = _relus(4)
    rule = CollapseRelu(refuse={"relu_2"})
    result = apply_rules(gm, [rule])
    assert result.matched == 3 and result.applied == 2 and len(result.skipped) == 1
    assert result.matched == result.applied + len(result.skipped)
    assert result.stats["collapsed"] == 2 and result.modified
    assert result.skipped == [Skip("relu_2", "told-to", "refused relu_2")]
    assert len(call_nodes(gm, ops.relu)) == 2


def test_rewrite_runs_only_after_check_passed() -> None:
    gm = _relus(3)
    rule = CollapseRelu(refuse={"relu_1", "relu_2"})
    result = apply_rules(gm, [rule])
    assert rule.rewritten == [] and not result.modified
    assert result.reasons() == {"told-to": 2}


def test_first_matching_rule_wins_and_unmatched_anchors_are_refused() -> None:
    gm = _relus(2)
    leftover = RefuseUnmatched(Refusal("lonely", "a relu of no relu"), ops.relu)
    result = apply_rules(gm, [CollapseRelu(), leftover])
    assert result.matched == 2 and result.applied == 1
    assert [(s.node, s.code) for s in result.skipped] == [("relu", "lonely")]


class CollapseIntoOuter(Rule[Match]):
    """relu(relu(x)) => relu(x) by erasing the inner relu, which a reverse walk visits next."""

    anchor = ops.relu

    def __init__(self) -> None:
        self.offered: list[str] = []

    def match(self, node: fx.Node, gm: fx.GraphModule) -> Match | None:
        self.offered.append(node.name)
        inner = node.args[0]
        return Match(gm, node) if isinstance(inner, fx.Node) and inner.target == ops.relu else None

    def rewrite(self, m: Match) -> None:
        inner = m.node.args[0]
        m.node.args = (inner.args[0],)
        m.gm.graph.erase_node(inner)


def test_erased_nodes_are_not_offered_again() -> None:
    gm = _relus(3)
    rule = CollapseIntoOuter()
    result = apply_rules(gm, [rule], reverse=True)
    # relu_2 absorbs relu_1 and erases it; the walk's snapshot still lists relu_1 next
    assert rule.offered == ["relu_2", "relu"]
    assert result.applied == 1 and result.matched == 1
    gm.graph.lint()
    assert len(call_nodes(gm, ops.relu)) == 2


@dataclass(eq=False)
class PairMatch(Match):
    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        return (self.node, self.node.args[0])


class ClaimPair(Rule[PairMatch]):
    anchor = ops.relu

    def match(self, node: fx.Node, gm: fx.GraphModule) -> PairMatch | None:
        return PairMatch(gm, node) if getattr(node.args[0], "target", None) == ops.relu else None

    def check(self, m: PairMatch) -> Refusal | None:
        return Refusal("just-looking")


def test_nodes_a_match_consumed_are_not_anchors_again() -> None:
    result = apply_rules(_relus(4), [ClaimPair()], reverse=True)
    # relu_3 claims relu_2, relu_1 claims relu: two matches, not three
    assert [s.node for s in result.skipped] == ["relu_3", "relu_1"]


@dataclass(frozen=True)
class CollapseReluPass(RulePass):
    name: ClassVar[str] = "collapse-relu-test"
    exact: ClassVar[bool] = True

    def rules(self) -> Sequence[Rule[Any]]:
        return [CollapseRelu(refuse={"relu_2"})]


def test_rule_pass_runs_through_the_manager() -> None:
    run = run_pass(CollapseReluPass(), Relus(4), (torch.randn(2, 3),))
    assert run.record.matched == 3 and run.record.applied == 2
    assert run.count(ops.relu) == 2
    assert_skipped(run, code="told-to", node="relu_2")
    run.assert_outputs_match(rtol=0.0)


# ---------------------------------------------------------------- refusals, skips, report


def test_skip_takes_a_refusal_or_plain_text() -> None:
    result = PassResult()
    result.skip("a", Refusal("shared-constant", "its weight tensor is also used by b"))
    result.skip("b", "free text from an older pass")
    first, second = result.skipped
    assert (first.code, first.detail, first.reason) == ("shared-constant", "its weight tensor is also used by b",
                                                        "its weight tensor is also used by b")
    assert (second.code, second.reason) == (UNSPECIFIED, "free text from an older pass")
    assert result.reasons() == {"shared-constant": 1, "free text from an older pass": 1}
    assert str(Refusal("x", "y")) == "x: y" and str(Refusal("x")) == "x"
    assert fxopt.pass_api._UNSPECIFIED == UNSPECIFIED


class Bottlenecks(nn.Module):
    """Four bottleneck pairs of different widths: merge-consecutive refuses each, for one reason."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs = nn.ModuleList(nn.Sequential(nn.Linear(64, w), nn.Linear(w, 64)) for w in (2, 3, 4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for pair in self.pairs:
            x = torch.relu(pair(x))
        return x


def test_report_groups_skips_by_code() -> None:
    opt = fxopt.compile(Bottlenecks().eval(), (torch.randn(4, 64),), passes=["merge-consecutive"])
    record = opt.report["merge-consecutive"]
    assert record.skipped == {"not-cheaper": 4}
    assert len({s.detail for s in record.skips}) == 4  # the details differ: sizes
    lines = [line for line in str(opt.report).splitlines() if "skipped" in line and "merge-consecutive:" in line]
    assert len(lines) == 1 and "skipped 4x [not-cheaper], e.g. bottleneck 64 -> 2 -> 64" in lines[0]
    data = opt.report.to_dict()["passes"][0]
    assert data["skipped"] == {"not-cheaper": 4}
    assert {s["code"] for s in data["skips"]} == {"not-cheaper"} and all(s["detail"] for s in data["skips"])


def test_report_keeps_plain_text_skips_apart() -> None:
    record = fxopt.report.PassRecord("p", True, "no change", skips=[Skip("a", UNSPECIFIED, "one"),
                                                                     Skip("b", UNSPECIFIED, "two")])
    record.skipped.update(s.group for s in record.skips)
    assert record.skip_lines() == ["skipped 1x: one", "skipped 1x: two"]


def test_assert_skipped_by_code_and_reason() -> None:
    run = run_pass(CollapseReluPass(), Relus(4), (torch.randn(2, 3),))
    assert_skipped(run, "told-to")  # a reason that is the code
    assert_skipped(run, "refused relu_2", code="told-to")
    with pytest.raises(AssertionError, match="no skip with code 'other'"):
        assert_skipped(run, code="other")
    with pytest.raises(AssertionError):
        assert_skipped(run, "refused relu_1", code="told-to")


# ---------------------------------------------------------------- constraints


class Shapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.a(x)
        return self.b(h), h.sum(), F.linear(x, w), x.int() + 1


def _nodes(model: nn.Module, *inputs: torch.Tensor) -> tuple[fx.GraphModule, list[fx.Node]]:
    gm = capture(model.eval(), inputs)
    return gm, [n for n in gm.graph.nodes if n.op == "call_function"]


def test_sole_user_and_private_region() -> None:
    gm, _ = _nodes(Shapes(), torch.randn(2, 4), torch.randn(4, 4))
    first, second, third = call_nodes(gm, ops.linear)
    assert c.sole_user(second, *second.users) is None
    assert c.sole_user(None, second) is None
    refusal = c.sole_user(first, second)
    assert refusal.code == c.SHARED_INTERMEDIATE and "linear is also used by sum" in refusal.detail
    assert c.private_region([first], [second, *first.users]) is None
    assert c.private_region([first], [second]).code == c.SHARED_INTERMEDIATE


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight  # tied: one tensor, two names
        self.c.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.c(x)


def test_private_constant_sees_tied_weights() -> None:
    gm, _ = _nodes(Tied(), torch.randn(2, 4))
    a, b, only = call_nodes(gm, ops.linear)
    refusal = c.private_constant(gm, a.args[1], a)
    assert refusal.code == c.SHARED_CONSTANT and "its weight tensor is also used by linear_1" in refusal.detail
    assert c.private_linear(gm, b).code == c.SHARED_CONSTANT
    assert c.private_constant(gm, a.args[2], a, "bias") is None  # a's bias is its own
    assert c.private_linear(gm, only) is None
    assert c.private_constant(gm, None, only) is None


def test_constant_linear_and_constant_or_absent() -> None:
    gm, _ = _nodes(Shapes(), torch.randn(2, 4), torch.randn(4, 4))
    first, second, from_input = call_nodes(gm, ops.linear)
    assert c.constant_linear(gm, first, second) is None
    refusal = c.constant_linear(gm, first, from_input)
    assert refusal.code == c.NOT_CONSTANT and from_input.name in refusal.detail
    assert c.constant_or_absent(gm, first.args[1], None) is None
    assert c.constant_or_absent(gm, from_input.args[1]).code == c.NOT_CONSTANT


def test_finite_same_dtype_and_costs() -> None:
    assert c.finite(torch.ones(3), None, 2.0) is None
    assert c.finite(torch.tensor([1.0, float("nan")])).code == c.NOT_FINITE
    assert c.finite(torch.tensor([float("inf")]), what="the folded weights").detail.startswith("the folded weights")
    assert c.same_dtype(torch.ones(1), None, torch.zeros(2)) is None
    assert c.same_dtype(torch.ones(1), torch.ones(1, dtype=torch.float16)).code == c.DTYPE_MISMATCH
    assert c.not_costlier(10, 10, "equal") is None
    assert c.not_costlier(11, 10, "more") == Refusal(c.NOT_CHEAPER, "more")
    assert c.not_costlier(11, 10, "more", force=True) is None


def test_floating_point_and_same_shape_and_dtype() -> None:
    gm, _ = _nodes(Shapes(), torch.randn(2, 4), torch.randn(4, 4))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    as_int = next(n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.meta.get("val"), "dtype", None) == torch.int32)
    (total,) = call_nodes(gm, torch.ops.aten.sum.default)
    first = call_nodes(gm, ops.linear)[0]
    assert c.floating_point(x) is None
    assert c.floating_point(as_int).code == c.NOT_FLOATING_POINT
    assert c.same_shape_and_dtype(first, x) is None
    assert c.same_shape_and_dtype(total, x).code == c.CHANGES_SHAPE_OR_DTYPE


class BatchNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.eval_bn, self.train_bn = nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False)

    def forward(self, flat: torch.Tensor, seq: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.eval_bn(flat), self.eval_bn(seq), self.train_bn(flat)


def test_batchnorm_constraints() -> None:
    gm, _ = _nodes(BatchNorms(), torch.randn(3, 4), torch.randn(3, 4, 5))
    on_flat, on_seq, training = call_nodes(gm, ops.batch_norm)
    assert c.bn_running_stats(on_flat) is None
    assert c.bn_running_stats(training).code == c.BN_TRAINING
    assert c.bn_normalizes_features(on_flat.args[0]) is None
    refusal = c.bn_normalizes_features(on_seq.args[0])
    assert refusal.code == c.BN_NOT_ON_FEATURES and "3-D input" in refusal.detail


class Dropouts(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.dropout(x, 0.5, training=False), F.dropout(x, 0.0, training=True), F.dropout(x, 0.5, training=True)


def test_dropout_inactive() -> None:
    gm, _ = _nodes(Dropouts(), torch.randn(2, 3))
    off, zero, active = call_nodes(gm, ops.dropouts)
    assert c.dropout_inactive(off) is None and c.dropout_inactive(zero) is None
    assert c.dropout_inactive(active) == Refusal(c.DROPOUT_ACTIVE, "dropout is active (train=True, p>0): it is "
                                                                   "random, not the identity")
