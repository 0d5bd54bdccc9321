import pytest
import torch
from fxopt.passes import PruneHidden
from torch import nn

import fxopt
from fxopt.ir import ops
from fxopt.testing import assert_idempotent, assert_skipped, run_pass


class Block(nn.Module):
    def __init__(self, d: int = 16, hidden: int = 64, act: nn.Module | None = None) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, hidden), act or nn.ReLU(), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def weak_block(strong: int = 32, hidden: int = 64, act: nn.Module | None = None) -> tuple[Block, torch.Tensor]:
    """A block where only the first ``strong`` hidden units reach the output noticeably."""
    block = Block(hidden=hidden, act=act).eval()
    with torch.no_grad():
        block.down.weight[:, strong:] *= 1e-5
    return block, torch.tensor(range(strong))


def kept_units(run: fxopt.testing.PassRun, block: Block) -> set[int]:
    """Which of the original hidden units survive, found by matching rows of W1."""
    (first,) = [n for n in run.after.graph.nodes if n.target == ops.linear and n.args[0].op == "placeholder"]
    weight = getattr(run.after, first.args[1].target)
    return {int((block.up.weight - row).abs().sum(1).argmin()) for row in weight}


def test_drops_the_units_that_do_not_reach_the_output() -> None:
    torch.manual_seed(0)
    block, strong = weak_block()
    x = torch.randn(64, 16)
    run = run_pass("prune-hidden", block, (x,))
    assert kept_units(run, block) == set(strong.tolist())
    (detail,) = run.record.details
    assert (detail["hidden"], detail["kept"]) == (64, 32)
    assert detail["params_saved"] == 32 * (16 + 1 + 16)
    assert run.record.before.params - run.record.after.params == detail["params_saved"]
    assert run.record.after.flops < run.record.before.flops
    run.assert_outputs_match(rtol=0.01)


def test_block_whose_units_all_matter_is_left_alone() -> None:
    torch.manual_seed(0)
    run = run_pass("prune-hidden", Block(hidden=32).eval(), (torch.randn(64, 16),))
    assert not run.modified
    assert_skipped(run, "every hidden unit matters: dropping the 8 least important of 32 gives output error")


def test_dead_units_go_at_no_cost() -> None:
    torch.manual_seed(0)
    block = Block().eval()
    with torch.no_grad():
        block.up.bias[40:] = -100.0  # never active on these inputs
    run = run_pass(PruneHidden(budget=1e-6), block, (torch.randn(64, 16),))
    assert run.record.details[0]["kept"] == 40
    assert run.assert_outputs_match() < 1e-6


def test_constant_units_are_folded_into_the_bias_for_any_activation() -> None:
    """sigmoid(0) != 0: a unit that is constant on the data still adds W2[:, j] * f(b1_j).
    Folding that mean into b2 removes it exactly; scoring by magnitude alone keeps it."""
    torch.manual_seed(0)
    block = Block(act=nn.Sigmoid()).eval()
    with torch.no_grad():
        block.up.weight[32:] = 0.0
        block.up.bias[32:] = 2.0
    x = torch.randn(64, 16)
    folded = run_pass(PruneHidden(budget=1e-5), block, (x,))
    assert folded.record.details[0]["kept"] == 32
    folded.assert_outputs_match(rtol=1e-5)
    unfolded = run_pass(PruneHidden(budget=1e-5, fold_mean=False), block, (x,))
    assert not unfolded.modified


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()])
def test_other_activations_and_leading_dims(act: nn.Module) -> None:
    torch.manual_seed(0)
    block, strong = weak_block(act=act)
    run = run_pass("prune-hidden", block, (torch.randn(4, 8, 16),))
    assert kept_units(run, block) == set(strong.tolist())
    run.assert_outputs_match(rtol=0.01)


def test_consecutive_blocks_share_a_linear() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    with torch.no_grad():
        model[2].weight[:, 48:] *= 1e-5
        model[4].weight[:, 40:] *= 1e-5
    run = run_pass("prune-hidden", model, (torch.randn(64, 16),))
    assert [(d["hidden"], d["kept"]) for d in run.record.details] == [(64, 48), (64, 40)]
    assert [d["block"] for d in run.record.details] == ["0 -> 2", "2 -> 4"]
    assert run.count(ops.linear) == 3
    run.assert_outputs_match(rtol=0.01)


def test_hidden_values_used_elsewhere_are_refused() -> None:
    class Tapped(Block):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.act(self.up(x))
            return self.down(h), h.mean()

    torch.manual_seed(0)
    run = run_pass("prune-hidden", Tapped().eval(), (torch.randn(8, 16),))
    assert_skipped(run, "are also used by")


def test_calibration_data_decides_which_units_matter() -> None:
    """Units 32.. fire only for inputs with x[:, 0] > 0, which only the calibration data has."""
    torch.manual_seed(0)
    block = Block().eval()
    with torch.no_grad():
        block.up.weight[32:] = 0.0
        block.up.weight[32:, 0] = 1.0
        block.up.bias[32:] = 0.0
    example = torch.randn(64, 16)
    example[:, 0] = -example[:, 0].abs() - 0.1
    calibration = torch.randn(64, 16)
    calibration[:, 0] = calibration[:, 0].abs() + 1
    alone = fxopt.compile(block, (example,), passes=[PruneHidden(budget=1e-6)])
    calibrated = fxopt.compile(block, (example,), passes=[PruneHidden(budget=1e-6)], calibration=[(calibration,)])
    assert alone.report["prune-hidden"].details[0]["kept"] == 32
    assert calibrated.report["prune-hidden"].applied == 0
    assert "every hidden unit matters" in calibrated.report["prune-hidden"].skips[0].reason


def test_idempotent() -> None:
    torch.manual_seed(0)
    block, _ = weak_block()
    assert_idempotent("prune-hidden", block, (torch.randn(64, 16),))


def test_weight_used_elsewhere_is_refused() -> None:
    class TwoInputs(Block):
        def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.down(self.act(self.up(x))), self.up(z)

    torch.manual_seed(0)
    run = run_pass("prune-hidden", TwoInputs().eval(), (torch.randn(8, 16), torch.randn(8, 16)))
    assert not run.modified
    assert_skipped(run, "is also used by")


# ---------------------------------------------------------------- budgets on unseen data


def spectrum_weight(out_features: int, in_features: int, rate: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(-torch.arange(in_features, dtype=torch.float64) / rate)
    u, _ = torch.linalg.qr(torch.randn(out_features, in_features, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=g, dtype=torch.float64))
    return ((u * sigma) @ v.T).float()


def decaying_spectrum_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    with torch.no_grad():
        model[0].weight.copy_(spectrum_weight(256, 64, rate=4.0, seed=1))
    return model


def rarely_active_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    with torch.no_grad():  # each unit fires on about 0.6% of inputs
        model[0].bias.copy_(-2.5 * model[0].weight.norm(dim=1))
    return model


def fresh_error(opt: torch.nn.Module, model: torch.nn.Module, rows: int, batches: int = 5) -> float:
    """The largest relative error over fresh batches drawn like the example and calibration data."""
    from fxopt.verify import compare_outputs

    g = torch.Generator().manual_seed(100)
    worst = 0.0
    for _ in range(batches):
        x = torch.randn(rows, 64, generator=g)
        with torch.no_grad():
            worst = max(worst, compare_outputs([model(x)], [opt(x)]).max_rel)
    return worst


# Measured on the batches it chose on, the old search stayed within 0.01 on both models but
# erred 0.03-0.07 (decaying spectrum) and 0.55 (rare units) on fresh batches: a choice fitted
# on few rows overfits them. Fitted on half the batches and verified on the other half, the
# choice holds on fresh data within 1.5x the budget (the margin for a max-error metric over
# more rows than were seen).
@pytest.mark.parametrize(("make", "rows", "calibration"), [(decaying_spectrum_mlp, 8, 1),
                                                           (decaying_spectrum_mlp, 8, 3),
                                                           (rarely_active_mlp, 32, 1),
                                                           (rarely_active_mlp, 32, 3)])
def test_budget_holds_on_fresh_batches(make, rows: int, calibration: int) -> None:
    model = make()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 64, generator=g)
    batches = [(torch.randn(rows, 64, generator=g),) for _ in range(calibration)]
    opt = fxopt.compile(model, (x,), passes=[PruneHidden(budget=0.01)], calibration=batches)
    record = opt.report["prune-hidden"]
    assert record.max_rel_err <= 0.01
    assert fresh_error(opt, model, rows) <= 1.5 * 0.01
    for detail in record.details:
        assert detail["heldout_error"] <= 0.01 and detail["fitted_error"] <= 0.01
    if not record.applied:
        assert "every hidden unit matters" in record.skips[0].reason


def test_prunable_block_is_still_pruned_and_reports_both_errors() -> None:
    torch.manual_seed(0)
    block, strong = weak_block()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    calibration = [(torch.randn(64, 16, generator=g),) for _ in range(3)]
    opt = fxopt.compile(block, (x,), passes=[PruneHidden()], calibration=calibration)
    (detail,) = opt.report["prune-hidden"].details
    assert detail["kept"] == 32
    assert detail["heldout_batches"] == 2 and detail["heldout_error"] <= 0.01 and detail["fitted_error"] <= 0.01
    assert not detail["heldout_retry"]
    assert any(step["event"] == "verify" for step in detail["log"])
    with torch.no_grad():
        fresh = torch.randn(64, 16, generator=g)
        assert float((opt(fresh) - block(fresh)).abs().max() / block(fresh).abs().max()) <= 0.015


def test_sensitivity_strategy_prunes_the_cheaper_block_first() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    with torch.no_grad():
        model[2].weight[:, 48:] *= 1e-5
        model[4].weight[:, 40:] *= 1e-5
    run = run_pass(PruneHidden(strategy="sensitivity"), model, (torch.randn(64, 16),))
    assert sorted((d["hidden"], d["kept"]) for d in run.record.details) == [(64, 40), (64, 48)]
    run.assert_outputs_match(rtol=0.01)
    with pytest.raises(ValueError, match="strategy"):
        PruneHidden(strategy="fastest")
