"""The pass manager: verification, rollback, strict mode, instruments, the report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxopt
from fxopt.ir import add_constant, call_nodes, constant, ops
from fxopt.pass_api import PassContext, PassResult


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4)).eval()


@dataclass(frozen=True)
class ScaleFirstWeight(fxopt.Pass):
    """Multiply the first Linear's weight by ``factor`` (a deliberately wrong rewrite)."""

    name: ClassVar[str] = "test-scale-first-weight"
    exact: ClassVar[bool] = True
    factor: float = 2.0

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        linear = call_nodes(gm, ops.linear)[0]
        result.match()
        weight = constant(gm, linear.args[1])
        linear.update_arg(1, add_constant(gm, weight * self.factor, "scaled"))
        result.apply()
        return result


@dataclass(frozen=True)
class LossyScale(ScaleFirstWeight):
    name: ClassVar[str] = "test-lossy-scale"
    exact: ClassVar[bool] = False
    factor: float = 1.001
    budget: float = 0.01


@dataclass(frozen=True)
class MutatesConstant(fxopt.Pass):
    name: ClassVar[str] = "test-mutates-constant"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        weight = constant(gm, call_nodes(gm, ops.linear)[0].args[1])
        weight.mul_(1.0)
        return PassResult(modified=True)


def test_exact_pass_that_changes_outputs_is_rolled_back() -> None:
    model, x = _model(), torch.randn(4, 8)
    with pytest.warns(UserWarning, match="test-scale-first-weight.*rolled back"):
        opt = fxopt.compile(model, (x,), passes=["remove-dropout", ScaleFirstWeight()])
    record = opt.report["test-scale-first-weight"]
    assert record.status == "rolled back"
    assert "exact pass changed outputs" in record.message
    assert opt.report["remove-dropout"].status == "applied"
    assert torch.allclose(opt(x), model(x), atol=1e-6)


def test_strict_mode_names_the_pass_and_those_before_it() -> None:
    with pytest.raises(fxopt.PassFailedError) as info:
        fxopt.compile(_model(), (torch.randn(4, 8),), passes=["remove-dropout", ScaleFirstWeight()], strict=True)
    assert info.value.pass_name == "test-scale-first-weight"
    assert info.value.previous == ["remove-dropout"]
    assert "remove-dropout" in str(info.value)


def test_lossy_pass_within_budget_is_kept_and_beyond_is_rolled_back() -> None:
    model, x = _model(), torch.randn(4, 8)
    kept = fxopt.compile(model, (x,), passes=[LossyScale(factor=1.001)])
    record = kept.report["test-lossy-scale"]
    assert record.status == "applied" and 0 < record.max_rel_err <= 0.01
    assert kept.report.final_max_rel_err == pytest.approx(record.max_rel_err)
    with pytest.warns(UserWarning):
        refused = fxopt.compile(model, (x,), passes=[LossyScale(factor=1.5)])
    assert refused.report["test-lossy-scale"].status == "rolled back"
    assert "exceeds the pass's budget 0.01" in refused.report["test-lossy-scale"].message


def test_in_place_constant_mutation_always_raises() -> None:
    with pytest.raises(fxopt.PassFailedError, match="modified a frozen constant in place"):
        fxopt.compile(_model(), (torch.randn(2, 8),), passes=[MutatesConstant()])


def test_dump_graphs_instrument(tmp_path) -> None:
    fxopt.compile(_model(), (torch.randn(2, 8),), passes=["remove-dropout"],
                  instruments=[fxopt.DumpGraphs(tmp_path)])
    before = (tmp_path / "01-remove-dropout-before.txt").read_text()
    after = (tmp_path / "01-remove-dropout-after.txt").read_text()
    assert "aten.dropout" in before and "aten.dropout" not in after


def test_report_table_and_dict() -> None:
    opt = fxopt.compile(_model(), (torch.randn(2, 8),))
    text = str(opt.report)
    assert "remove-dropout" in text and "max rel err" in text and "params" in text
    data = opt.report.to_dict()
    from fxopt.registry import default_pipeline

    assert [p["name"] for p in data["passes"]] == [p.name for p in default_pipeline()]
    assert data["passes"][0]["name"] == "remove-dropout" and data["passes"][0]["applied"] == 1


def test_report_counts_reasons() -> None:
    class ActiveDropout(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.dropout(x, 0.0, training=True) + torch.nn.functional.dropout(x, 0.5, training=False)

    opt = fxopt.compile(ActiveDropout().eval(), (torch.randn(2, 3),), passes=["remove-dropout"])
    record = opt.report["remove-dropout"]
    assert record.matched == 2 and record.applied == 2


def test_exact_passes_in_a_row_are_verified_together_once() -> None:
    from fxopt.pipeline.manager import PassManager
    from fxopt.registry import resolve_passes

    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 8)
    gm = fxopt.capture(model, (x,))
    manager = PassManager(resolve_passes(["remove-dropout", "fold-batchnorm"]))
    out, records = manager.run(gm, PassContext(batches=[[x]]))
    assert [r.status for r in records] == ["applied", "applied"]
    # one reference run and one run of the final graph, not one run per pass
    assert manager.verification.forwards == 2
    assert "verified together with fold-batchnorm" in records[0].message
    assert "verified together with remove-dropout" in records[1].message
    assert all(r.max_rel_err <= 1e-5 for r in records)
    assert torch.allclose(out(x)[0], model(x), atol=1e-5)


def test_a_wrong_exact_pass_among_others_is_found_and_rolled_back_alone() -> None:
    model, x = _model(), torch.randn(4, 8)
    with pytest.warns(UserWarning, match="test-scale-first-weight.*rolled back") as caught:
        opt = fxopt.compile(model, (x,), passes=["remove-dropout", ScaleFirstWeight(), "merge-consecutive"])
    assert sum("rolled back" in str(w.message) for w in caught) == 1
    assert [r.name for r in opt.report.passes] == ["remove-dropout", "test-scale-first-weight", "merge-consecutive"]
    assert opt.report["test-scale-first-weight"].status == "rolled back"
    assert "exact pass changed outputs" in opt.report["test-scale-first-weight"].message
    assert opt.report["remove-dropout"].status == "applied"
    assert torch.allclose(opt(x), model(x), atol=1e-6)


@dataclass(frozen=True)
class OvershootsItsBudget(fxopt.Pass):
    """Scales the first weight by 1 + 1.5 * budget: a choice that misses its budget by half."""

    name: ClassVar[str] = "test-overshoots"
    exact: ClassVar[bool] = False
    budget: float = 0.01

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return ScaleFirstWeight(factor=1.0 + 1.5 * self.budget)(gm, ctx)


def test_a_lossy_pass_over_its_budget_is_run_again_with_a_tighter_target() -> None:
    model, x = nn.Linear(8, 4, bias=False).eval(), torch.randn(4, 8)
    opt = fxopt.compile(model, (x,), passes=[OvershootsItsBudget()])
    record = opt.report["test-overshoots"]
    assert record.status == "applied"
    assert record.message.startswith("the first choice went over (error 0.015 exceeds the pass's budget 0.01)")
    assert record.budget == 0.01  # held to the budget it was given, not the retry's target
    assert record.max_rel_err == pytest.approx(0.009, rel=1e-3)  # 1 + 0.9 * (0.01 * 0.01 / 0.015) * 1.5


def test_strict_mode_does_not_retry() -> None:
    with pytest.raises(fxopt.PassFailedError):
        fxopt.compile(nn.Linear(8, 4, bias=False).eval(), (torch.randn(4, 8),), passes=[OvershootsItsBudget()],
                      strict=True)
