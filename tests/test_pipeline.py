"""The pipeline's plug points: checks the manager consults, instruments around each pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxopt
from fxopt.capture import capture
from fxopt.ir import add_constant, call_nodes, constant, copy_graph_module, count_ops, ops
from fxopt.pass_api import PassContext, PassResult
from fxopt.pipeline import BaseCheck, PassInstrument, PassManager, PassStep, Rejected
from fxopt.verify import run_graph


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4)).eval()


def _captured(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, PassContext]:
    return capture(model, (x,)), PassContext(batches=[[x]])


@dataclass(frozen=True)
class ScaleFirstWeight(fxopt.Pass):
    """Multiply the first Linear's weight by ``factor`` (wrong unless the factor is 1)."""

    name: ClassVar[str] = "test-scale"
    factor: float = 2.0

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        linear = call_nodes(gm, ops.linear)[0]
        result.match()
        linear.update_arg(1, add_constant(gm, constant(gm, linear.args[1]) * self.factor, "scaled"))
        result.apply()
        return result


@dataclass(frozen=True)
class LeavesDeadNodes(fxopt.Pass):
    """Adds a relu nobody reads and says it modified the graph."""

    name: ClassVar[str] = "test-dead-nodes"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        linear = call_nodes(gm, ops.linear)[0]
        with gm.graph.inserting_after(linear):
            gm.graph.call_function(torch.ops.aten.relu.default, (linear,))
        result = PassResult()
        result.apply()
        return result


class NoWiderThan(BaseCheck):
    """A custom check: refuses any graph with a Linear wider than ``limit`` outputs."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: list[str] = []

    def after(self, step: PassStep, working: fx.GraphModule, previous: fx.GraphModule,
              ctx: PassContext) -> str | None:
        self.seen.append(step.pass_.name)
        widths = [constant(working, n.args[1]).shape[0] for n in call_nodes(working, ops.linear)]
        if max(widths) > self.limit:
            return f"a Linear has {max(widths)} outputs, over the limit of {self.limit}"
        return None


@dataclass(frozen=True)
class WidenFirstLinear(fxopt.Pass):
    """Pads the first Linear with zero rows it then slices off: exact, but wider."""

    name: ClassVar[str] = "test-widen"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        linear = call_nodes(gm, ops.linear)[0]
        weight, bias = constant(gm, linear.args[1]), constant(gm, linear.args[2])
        rows = weight.shape[0]
        wide_w = torch.cat([weight, torch.zeros_like(weight)])
        wide_b = torch.cat([bias, torch.zeros_like(bias)])
        with gm.graph.inserting_before(linear):
            w = add_constant(gm, wide_w, "wide_w")
            b = add_constant(gm, wide_b, "wide_b")
        with gm.graph.inserting_after(linear):
            wide = gm.graph.call_function(torch.ops.aten.linear.default, (linear.args[0], w, b))
        with gm.graph.inserting_after(wide):
            narrow = gm.graph.call_function(torch.ops.aten.slice.Tensor, (wide, -1, 0, rows))
        linear.replace_all_uses_with(narrow)
        gm.graph.erase_node(linear)
        result = PassResult()
        result.match()
        result.apply()
        return result


def test_custom_check_rejects_a_pass_which_is_rolled_back_with_its_reason() -> None:
    model, x = _model(), torch.randn(4, 8)
    gm, ctx = _captured(model, x)
    check = NoWiderThan(16)
    with pytest.warns(UserWarning, match="test-widen.*rolled back: a Linear has 32 outputs"):
        kept, records = PassManager([fxopt.get_pass("remove-dropout"), WidenFirstLinear()],
                                    checks=[check]).run(gm, ctx)
    assert [r.status for r in records] == ["applied", "rolled back"]
    assert records[1].message == "a Linear has 32 outputs, over the limit of 16"
    assert check.seen == ["remove-dropout", "test-widen"]
    assert [constant(kept, n.args[1]).shape[0] for n in call_nodes(kept, ops.linear)] == [16, 4]
    assert torch.allclose(run_graph(kept, [x])[0], model(x), atol=1e-6)

    # Without the check the same rewrite passes every built-in check (it is exact) ...
    widened, records = PassManager([WidenFirstLinear()]).run(capture(model, (x,)), PassContext(batches=[[x]]))
    assert records[0].status == "applied" and records[0].max_rel_err < 1e-6
    # ... and under strict mode the custom check's reason is the error.
    with pytest.raises(fxopt.PassFailedError, match="'test-widen' failed: a Linear has 32 outputs"):
        PassManager([WidenFirstLinear()], strict=True, checks=[NoWiderThan(16)]).run(*_captured(model, x))


def test_a_check_raising_rejected_keeps_the_cause_under_strict() -> None:
    class Refuses(BaseCheck):
        def after(self, step, working, previous, ctx):
            if step.modified:
                try:
                    raise RuntimeError("underlying")
                except RuntimeError as exc:
                    raise Rejected("refused for a reason") from exc
            return None

    with pytest.raises(fxopt.PassFailedError, match="refused for a reason") as info:
        PassManager([fxopt.get_pass("remove-dropout")], strict=True, checks=[Refuses()]).run(
            *_captured(_model(), torch.randn(2, 8)))
    assert isinstance(info.value.__cause__, RuntimeError)


class Recorder(PassInstrument):
    """Logs every hook call; skips the passes named in ``skip``."""

    def __init__(self, label: str, calls: list[str], skip: tuple[str, ...] = ()) -> None:
        self.label, self.calls, self.skip = label, calls, skip

    def enter(self, passes):
        self.calls.append(f"{self.label}.enter({','.join(p.name for p in passes)})")

    def exit(self):
        self.calls.append(f"{self.label}.exit")

    def should_run(self, pass_, gm):
        self.calls.append(f"{self.label}.should_run({pass_.name})")
        return pass_.name not in self.skip

    def before_pass(self, pass_, gm, step):
        self.calls.append(f"{self.label}.before({pass_.name} {step.index}/{step.total})")

    def after_pass(self, pass_, gm, step):
        record = step.record
        assert record.seconds > 0 and record.before.params > 0  # the built-in row is finished
        self.calls.append(f"{self.label}.after({pass_.name}: {record.status}, applied {record.applied})")


def test_instrument_hooks_run_in_tvm_order_and_should_run_skips_a_pass() -> None:
    calls: list[str] = []
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 2)).eval()
    x = torch.randn(4, 8)
    instruments = [Recorder("a", calls), Recorder("b", calls, skip=("fold-batchnorm",))]
    opt = fxopt.compile(model, (x,), passes=["remove-dropout", "fold-batchnorm"], instruments=instruments)
    assert calls == [
        "a.enter(remove-dropout,fold-batchnorm)", "b.enter(remove-dropout,fold-batchnorm)",
        "a.should_run(remove-dropout)", "b.should_run(remove-dropout)",
        "a.before(remove-dropout 1/2)", "b.before(remove-dropout 1/2)",
        # after-hooks nest: the last instrument in is the first out
        "b.after(remove-dropout: applied, applied 1)", "a.after(remove-dropout: applied, applied 1)",
        "a.should_run(fold-batchnorm)", "b.should_run(fold-batchnorm)",
        "a.exit", "b.exit",
    ]
    assert [r.name for r in opt.report.passes] == ["remove-dropout"]  # the skipped pass has no row
    assert count_ops(opt.graph_module, ops.batch_norm) == 1
    assert torch.allclose(opt(x), model(x), atol=1e-5)


def test_instruments_exit_when_strict_mode_raises() -> None:
    calls: list[str] = []
    with pytest.raises(fxopt.PassFailedError):
        fxopt.compile(_model(), (torch.randn(2, 8),), passes=[ScaleFirstWeight()], strict=True,
                      instruments=[Recorder("a", calls)])
    assert calls[-1] == "a.exit"


@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node")  # the broken pass's doing
def test_cleanup_and_lint_run_without_numeric_verification() -> None:
    model, x = _model(), torch.randn(4, 8)
    gm, ctx = _captured(model, x)
    relus = count_ops(gm, ops.relu)
    after, records = PassManager([LeavesDeadNodes()], verify=False).run(gm, ctx)
    assert records[0].status == "applied"
    assert count_ops(after, ops.relu) == relus  # the dead relu was cleaned up
    # verify=False drops only the numerics check: a wrong rewrite is kept ...
    wrong, records = PassManager([ScaleFirstWeight()], verify=False).run(*_captured(model, x))
    assert records[0].status == "applied" and records[0].max_rel_err == 0.0
    assert not torch.allclose(run_graph(wrong, [x])[0], model(x))
    # ... while a malformed graph is still refused.
    with pytest.warns(UserWarning, match="rolled back: node '.*' reads attribute 'missing'"):
        _, records = PassManager([DanglingAttribute()], verify=False).run(*_captured(model, x))
    assert records[0].status == "rolled back"


@dataclass(frozen=True)
class DanglingAttribute(fxopt.Pass):
    name: ClassVar[str] = "test-dangling"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        linear = call_nodes(gm, ops.linear)[0]
        with gm.graph.inserting_before(linear):
            linear.update_arg(1, gm.graph.get_attr("missing"))
        return PassResult(modified=True)


def test_user_model_is_restored_even_when_the_pass_also_breaks_numerics() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    weight = model[0].weight.detach().clone()
    expected = model(x)

    @dataclass(frozen=True)
    class ScribblesAndBreaks(ScaleFirstWeight):
        name: ClassVar[str] = "test-scribbles-and-breaks"

        def __call__(self, gm, ctx):
            with torch.no_grad():
                model[0].weight.mul_(3)
            return super().__call__(gm, ctx)

    with pytest.warns(UserWarning, match="modified the user's model \\(restored"):
        opt = fxopt.compile(model, (x,), passes=[ScribblesAndBreaks()], share_weights=False)
    assert opt.report["test-scribbles-and-breaks"].status == "rolled back"
    assert torch.equal(model[0].weight, weight)
    assert torch.allclose(opt(x), expected)

    # Sharing the weights (the default), the write reaches the graph's constants too: nothing
    # to restore from, so the compile stops and says the model's weights were changed.
    with pytest.raises(fxopt.PassFailedError, match="model's weights were changed too"):
        fxopt.compile(model, (x,), passes=[ScribblesAndBreaks()])


def test_untouched_weights_are_the_models_own_tensors_and_rewritten_ones_are_new() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 8)
    opt = fxopt.compile(model, (x,), passes=["fold-batchnorm"])
    pointers = {t.untyped_storage().data_ptr() for t in opt.graph_module.buffers()}
    assert model[2].weight.untyped_storage().data_ptr() in pointers  # untouched: shared
    assert model[0].weight.untyped_storage().data_ptr() not in pointers  # folded: a new tensor
    assert torch.allclose(opt(x), model(x), atol=1e-5)
    copied = fxopt.compile(model, (x,), passes=["fold-batchnorm"], share_weights=False)
    assert model[2].weight.untyped_storage().data_ptr() not in {
        t.untyped_storage().data_ptr() for t in copied.graph_module.buffers()}


def test_a_pass_that_raises_is_rolled_back_and_strict_chains_its_exception() -> None:
    @dataclass(frozen=True)
    class Raises(fxopt.Pass):
        name: ClassVar[str] = "test-raises"

        def __call__(self, gm, ctx):
            raise KeyError("boom")

    gm, ctx = _captured(_model(), torch.randn(2, 8))
    with pytest.warns(UserWarning, match="test-raises' rolled back: raised KeyError"):
        _, records = PassManager([Raises()]).run(copy_graph_module(gm), ctx)
    assert records[0].status == "rolled back"
    with pytest.raises(fxopt.PassFailedError, match="raised KeyError") as info:
        PassManager([fxopt.get_pass("remove-dropout"), Raises()], strict=True).run(gm, ctx)
    assert info.value.previous == ["remove-dropout"]
    assert isinstance(info.value.__cause__, KeyError)


def test_pass_context_has_no_log_hook() -> None:
    assert not hasattr(PassContext(batches=[]), "log")


class _CountProgress(PassInstrument):
    def __init__(self) -> None:
        self.reports: list[tuple[str, int, int, str]] = []

    def progress(self, pass_: fxopt.Pass, step: PassStep, done: int, total: int, what: str) -> None:
        self.reports.append((pass_.name, done, total, what))


def test_a_lossy_search_reports_its_sites_with_increasing_counts_and_print_progress_says_what_is_left() -> None:
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    x = torch.randn(32, 64)
    counted, stream = _CountProgress(), io.StringIO()
    opt = fxopt.compile(model, (x,), passes=["quantize-int8(budget=0.05, strategy='equal-share')"],
                        instruments=[counted, fxopt.PrintProgress(stream, every=0.0)], measure=False)
    assert opt.report["quantize-int8"].matched == 3
    sites = [(done, total, what) for name, done, total, what in counted.reports if name == "quantize-int8"]
    assert [done for done, _, _ in sites] == [1, 2, 3] and {(total, what) for _, total, what in sites} == {(3, "sites")}
    printed = stream.getvalue()
    assert "pass 1/1: quantize-int8" in printed and "quantize-int8: 1/3 sites" in printed and "left" in printed
    assert "quantize-int8: 3/3 sites" in printed


def test_print_progress_stays_quiet_for_a_short_pipeline_and_compile_adds_it_unless_told_not_to(capsys) -> None:
    import io

    stream = io.StringIO()
    fxopt.compile(_model(), (torch.randn(4, 8),), passes=["remove-dropout"],
                  instruments=[fxopt.PrintProgress(stream, delay=60.0)])
    assert stream.getvalue() == ""
    fxopt.compile(_model(), (torch.randn(4, 8),), passes=["remove-dropout"], progress=True)
    assert "[fxopt] pass 1/1: remove-dropout" in capsys.readouterr().err
    fxopt.compile(_model(), (torch.randn(4, 8),), passes=["remove-dropout"], progress=False)
    fxopt.compile(_model(), (torch.randn(4, 8),), passes=["remove-dropout"])  # short: quiet
    assert capsys.readouterr().err == ""
