import torch
from torch import nn

import fxopt
from fxopt.ir import ops
from fxopt.testing import assert_idempotent, assert_skipped, run_pass


class Chain(nn.Module):
    def __init__(self, *widths: int, bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ThroughView(nn.Module):
    """A Linear on 3-D input, flattened to rows, then a second Linear."""

    def __init__(self, last: int = 32) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(last, 8)
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).reshape(-1, self.last))


class SharedIntermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        return self.b(h), h.sum(-1)


def test_two_linears_become_one_with_merged_weights() -> None:
    torch.manual_seed(0)
    model, x = Chain(16, 32, 8).eval(), torch.randn(4, 5, 16)
    run = run_pass("merge-consecutive", model, (x,))
    assert run.count(ops.linear) == 1
    run.assert_outputs_match()
    (linear,) = [n for n in run.after.graph.nodes if n.target == ops.linear]
    weight, bias = (getattr(run.after, a.target) for a in linear.args[1:])
    first, second = model.layers
    expected_w = second.weight.double() @ first.weight.double()
    expected_b = second.weight.double() @ first.bias.double() + second.bias.double()
    assert torch.allclose(weight.double(), expected_w, atol=1e-6)
    assert torch.allclose(bias.double(), expected_b, atol=1e-6)
    assert run.record.after.flops < run.record.before.flops
    assert run.record.after.params < run.record.before.params


def test_chain_of_three_merges_into_one() -> None:
    torch.manual_seed(0)
    model = Chain(16, 64, 64, 16, bias=False).eval()
    run = run_pass("merge-consecutive", model, (torch.randn(8, 16),))
    assert run.count(ops.linear) == 1
    assert run.record.applied == 2
    run.assert_outputs_match()


def test_merges_through_a_view_that_keeps_the_last_dim() -> None:
    torch.manual_seed(0)
    model, x = ThroughView().eval(), torch.randn(2, 3, 16)
    run = run_pass("merge-consecutive", model, (x,))
    assert run.count(ops.linear) == 1
    run.assert_outputs_match()


def test_view_that_changes_the_last_dim_is_refused() -> None:
    torch.manual_seed(0)
    model, x = ThroughView(last=16).eval(), torch.randn(2, 3, 16)
    run = run_pass("merge-consecutive", model, (x,))
    assert run.count(ops.linear) == 2
    assert_skipped(run, "changes the last dim", code="view-changes-last-dim")


def test_dropout_between_is_removed_first() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    opt = fxopt.compile(model, (x,), passes=["remove-dropout", "merge-consecutive"], strict=True)
    assert fxopt.testing.count_ops(opt.graph_module, ops.linear) == 1
    fxopt.testing.assert_outputs_close([opt(x)], [model(x)])


def test_bottleneck_is_refused_unless_forced() -> None:
    torch.manual_seed(0)
    model, x = Chain(256, 8, 256).eval(), torch.randn(4, 256)
    run = run_pass("merge-consecutive", model, (x,))
    assert run.count(ops.linear) == 2
    assert_skipped(run, "bottleneck 256 -> 8 -> 256", code="not-cheaper")
    assert_skipped(run, "force=True")
    forced = run_pass(fxopt.passes.MergeConsecutive(force=True), model, (x,))
    assert forced.count(ops.linear) == 1
    assert forced.record.after.flops > forced.record.before.flops
    forced.assert_outputs_match()


def test_intermediate_used_elsewhere_is_refused() -> None:
    torch.manual_seed(0)
    run = run_pass("merge-consecutive", SharedIntermediate().eval(), (torch.randn(4, 16),))
    assert run.count(ops.linear) == 2
    assert_skipped(run, "is also used by", code="shared-intermediate")


def test_nonlinearity_between_is_not_matched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    run = run_pass("merge-consecutive", model, (torch.randn(4, 16),))
    assert run.record.matched == 0
    assert run.count(ops.linear) == 2


def test_float64_graph_stays_exact() -> None:
    torch.manual_seed(0)
    model = Chain(32, 64, 16).eval().to(torch.float64)
    run = run_pass("merge-consecutive", model, (torch.randn(4, 32, dtype=torch.float64),))
    assert run.count(ops.linear) == 1
    assert run.assert_outputs_match() < 1e-12


def test_idempotent() -> None:
    torch.manual_seed(0)
    assert_idempotent("merge-consecutive", Chain(16, 32, 8).eval(), (torch.randn(4, 16),))
    assert_idempotent("merge-consecutive", Chain(256, 8, 256).eval(), (torch.randn(4, 256),))


class ViewBetween(nn.Module):
    """``view`` (not ``reshape``) between the Linears: it moves onto the model's input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).view(-1, 32))


def test_moved_view_accepts_a_non_contiguous_input() -> None:
    # the example input is contiguous, so a view onto x would pass every check at compile time
    torch.manual_seed(0)
    model = ViewBetween().eval()
    opt = fxopt.compile(model, (torch.randn(2, 3, 16),), passes=["merge-consecutive"], strict=True)
    assert fxopt.testing.count_ops(opt.graph_module, ops.linear) == 1
    transposed = torch.randn(2, 16, 3).transpose(1, 2)  # the shape the model takes, not contiguous
    assert not transposed.is_contiguous()
    with torch.no_grad():
        fxopt.testing.assert_outputs_close([opt(transposed)], [model(transposed)])
    assert fxopt.testing.count_ops(opt.graph_module, ops.view) == 0


class TowerOnTwoInputs(nn.Module):
    """One two-layer tower applied to two inputs: each Linear's weight is read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 64)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b(self.a(x)), self.b(self.a(z))


def test_shared_weights_are_not_merged_into_two_copies() -> None:
    # 64 -> 32 -> 64 costs the same FLOPs merged, but two merged copies would double the weights
    torch.manual_seed(0)
    model, inputs = TowerOnTwoInputs().eval(), (torch.randn(4, 64), torch.randn(4, 64))
    run = run_pass("merge-consecutive", model, inputs)
    assert run.count(ops.linear) == 4 and run.record.matched == 2 and run.record.applied == 0
    assert_skipped(run, "weight tensor is also used by", code="shared-constant")
    assert run.record.after.params == run.record.before.params
    opt = fxopt.compile(model, inputs, strict=True)  # the default pipeline
    assert opt.report.final.weight_bytes <= opt.report.original.weight_bytes
    with torch.no_grad():
        fxopt.testing.assert_outputs_close(list(opt(*inputs)), list(model(*inputs)))
