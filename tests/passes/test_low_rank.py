import math

import pytest
import torch
from fxopt.passes import LowRank
from torch import nn

import fxopt
from fxopt.ir import ops
from fxopt.linalg import randomized_svd
from fxopt.testing import assert_idempotent, assert_skipped, run_pass
from fxopt.verify import compare_outputs


def spectrum_weight(out_features: int, in_features: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A weight with singular values ``sigma`` and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, len(sigma), generator=g, dtype=torch.float64))
    return (u * sigma) @ v.T


def decaying(n: int, rate: float = 4.0) -> torch.Tensor:
    return torch.exp(-torch.arange(n, dtype=torch.float64) / rate)


def linear_with(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer.eval()


def truncated_error(layer: nn.Linear, x: torch.Tensor, rank: int) -> float:
    """Output error of ``layer`` with its weight truncated to ``rank``, computed directly."""
    u, s, vh = torch.linalg.svd(layer.weight.double(), full_matrices=False)
    approx = ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()
    with torch.no_grad():
        return compare_outputs([layer(x)], [nn.functional.linear(x, approx, layer.bias)]).max_rel


def test_default_picks_the_smallest_rank_within_budget() -> None:
    torch.manual_seed(0)
    layer, x = linear_with(spectrum_weight(128, 128, decaying(128))), torch.randn(32, 128)
    run = run_pass(LowRank(min_params=0), layer, (x,))
    assert run.count(ops.linear) == 2
    (detail,) = run.record.details
    rank = detail["rank"]
    assert rank % 8 == 0 and rank < 64
    assert truncated_error(layer, x, rank) <= 0.01 < truncated_error(layer, x, rank - 8)
    assert detail["params_saved"] == 128 * 128 - rank * 256
    assert run.record.before.params - run.record.after.params == detail["params_saved"]
    assert run.record.after.flops < run.record.before.flops
    assert detail["error"] == pytest.approx(run.record.max_rel_err, rel=1e-3)
    run.assert_outputs_match(rtol=0.01)


def test_random_init_is_full_rank_and_skipped() -> None:
    torch.manual_seed(0)
    run = run_pass(LowRank(min_params=0), nn.Linear(128, 128).eval(), (torch.randn(32, 128),))
    assert not run.modified
    assert_skipped(run, "no rank below the break-even rank 64.0 keeps the output error within budget", code="over-budget")


def test_energy_option_keeps_that_share_of_the_spectrum() -> None:
    torch.manual_seed(0)
    sigma = decaying(96, rate=3.0)
    layer = linear_with(spectrum_weight(96, 160, sigma))
    run = run_pass(LowRank(energy=0.999, budget=0.5, min_params=0), layer, (torch.randn(16, 160),))
    share = (sigma.square().cumsum(0) / sigma.square().sum()).tolist()
    needed = next(i + 1 for i, s in enumerate(share) if s >= 0.999)
    assert run.record.details[0]["rank"] == math.ceil(needed / 8) * 8


def test_ratio_option_and_the_break_even_refusal() -> None:
    torch.manual_seed(0)
    layer, x = linear_with(spectrum_weight(128, 128, decaying(128))), torch.randn(16, 128)
    run = run_pass(LowRank(ratio=0.25, budget=0.5, min_params=0), layer, (x,))
    assert run.record.details[0]["rank"] == 32
    refused = run_pass(LowRank(ratio=0.5, budget=0.5, min_params=0), layer, (x,))
    assert not refused.modified
    assert_skipped(refused, "rank 64 from ratio=0.5 is not below the break-even rank 64.0: no saving", code="no-saving")


def test_fixed_rank_over_budget_is_refused() -> None:
    torch.manual_seed(0)
    layer, x = linear_with(spectrum_weight(128, 128, decaying(128))), torch.randn(16, 128)
    run = run_pass(LowRank(ratio=0.0625, budget=0.001, min_params=0), layer, (x,))
    assert not run.modified
    assert_skipped(run, "rank 8 from ratio=0.0625 gives output error", code="over-budget")


def test_size_threshold() -> None:
    torch.manual_seed(0)
    layer = linear_with(spectrum_weight(128, 128, decaying(128)))
    run = run_pass(LowRank(), layer, (torch.randn(4, 128),))
    assert_skipped(run, "below the size threshold min_params=65536", code="too-small")


def test_several_small_layers_give_one_grouped_report_line() -> None:
    """Four Linears below min_params, each with its own size in the detail, are one line of
    the report under their code, not four lines of prose."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 24),
                          nn.ReLU(), nn.Linear(24, 8)).eval()
    opt = fxopt.compile(model, (torch.randn(4, 16),), passes=[LowRank()])
    record = opt.report["low-rank"]
    assert record.matched == 4 and record.applied == 0
    assert record.skipped == {"too-small": 4}
    assert len({s.detail for s in record.skips}) == 4  # the details differ: sizes
    lines = [line for line in str(opt.report).splitlines() if line.strip().startswith("low-rank: skipped")]
    assert lines == ["  low-rank: skipped 4x [too-small], e.g. 512 weights, below the size threshold "
                     "min_params=65536"]
    assert opt.report.to_dict()["passes"][0]["skipped"] == {"too-small": 4}


def test_layers_share_the_budget_and_the_total_stays_within_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(linear_with(spectrum_weight(96, 96, decaying(96), seed=i)) for i in range(3)))
    run = run_pass(LowRank(budget=0.02, min_params=0), model, (torch.randn(32, 96),))
    assert run.record.applied == 3
    assert run.count(ops.linear) == 6
    assert max(d["error"] for d in run.record.details) <= 0.02
    run.assert_outputs_match(rtol=0.02)
    assert {d["layer"] for d in run.record.details} == {"0", "1", "2"}


def test_idempotent_when_the_spectrum_has_a_gap() -> None:
    torch.manual_seed(0)
    sigma = torch.cat([torch.ones(8, dtype=torch.float64), torch.full((56,), 1e-7, dtype=torch.float64)])
    layer = linear_with(spectrum_weight(64, 64, sigma))
    run = run_pass(LowRank(min_params=0), layer, (torch.randn(8, 64),))
    assert run.record.details[0]["rank"] == 8
    assert_idempotent(LowRank(min_params=0), layer, (torch.randn(8, 64),))


# ---------------------------------------------------------------- calibration data


def test_calibration_batches_enter_the_measured_error() -> None:
    """Inputs confined to the top 8 right singular directions need only rank 8; calibration
    data that covers every direction makes the pass keep a higher rank."""
    torch.manual_seed(0)
    weight = spectrum_weight(128, 128, decaying(128, rate=6.0))
    layer = linear_with(weight)
    top = torch.linalg.svd(weight, full_matrices=False)[2][:8].float()
    narrow, wide = torch.randn(32, 8) @ top, torch.randn(32, 128)
    alone = fxopt.compile(layer, (narrow,), passes=[LowRank(min_params=0)])
    calibrated = fxopt.compile(layer, (narrow,), passes=[LowRank(min_params=0)], calibration=[(wide,)])
    assert alone.report["low-rank"].details[0]["rank"] == 8
    assert calibrated.report["low-rank"].details[0]["rank"] > 8
    assert truncated_error(layer, wide, calibrated.report["low-rank"].details[0]["rank"]) <= 0.01
    assert any("no calibration data" in note for note in alone.report.notes)
    assert not any("no calibration data" in note for note in calibrated.report.notes)


def test_wrong_shape_calibration_batch_names_the_batch() -> None:
    layer = nn.Linear(16, 16).eval()
    x = torch.randn(4, 16)
    with pytest.raises(fxopt.InputError, match="calibration batch 1"):
        fxopt.compile(layer, (x,), passes=[LowRank(min_params=0)], calibration=[(x,), (torch.randn(4, 15),)])


def test_weight_used_elsewhere_is_left_alone() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = linear_with(spectrum_weight(128, 128, decaying(128)))

        def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.proj(x), self.proj(z)

    torch.manual_seed(0)
    run = run_pass(LowRank(min_params=0), Shared().eval(), (torch.randn(4, 128), torch.randn(4, 128)))
    assert not run.modified
    assert_skipped(run, "its weight tensor is also used by", code="shared-constant")


# ---------------------------------------------------------------- randomized SVD (large layers)


def decaying_mlp(width: int, rates: tuple[float, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, rate in enumerate(rates):
        layers += [linear_with(spectrum_weight(width, width, decaying(width, rate), seed=i)), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def test_randomized_svd_chooses_ranks_within_one_multiple_of_the_exact_svd() -> None:
    """Sketches start at rank 16 and double: the 48-rank layer needs two of them."""
    torch.manual_seed(0)
    model, x = decaying_mlp(160, (3.0, 6.0, 14.0)), torch.randn(32, 160)
    exact = run_pass(LowRank(min_params=0, svd="exact"), model, (x,))
    randomized = run_pass(LowRank(min_params=0, svd="randomized", sketch_rank=16), model, (x,))
    exact_ranks = {d["layer"]: d["rank"] for d in exact.record.details}
    randomized_ranks = {d["layer"]: d["rank"] for d in randomized.record.details}
    assert exact_ranks.keys() == randomized_ranks.keys() == {"0", "2", "4"}
    assert max(exact_ranks.values()) > 32  # a layer the first sketch cannot cover
    for layer, rank in exact_ranks.items():
        assert rank <= randomized_ranks[layer] <= rank + 8
    assert randomized.record.max_rel_err <= 0.01
    randomized.assert_outputs_match(rtol=0.01)


def test_randomized_energy_rank_is_within_one_multiple_of_the_exact_rank() -> None:
    torch.manual_seed(0)
    layer, x = linear_with(spectrum_weight(192, 160, decaying(160, rate=8.0))), torch.randn(16, 160)
    options = {"energy": 0.9999, "budget": 0.5, "min_params": 0}
    exact = run_pass(LowRank(**options, svd="exact"), layer, (x,)).record.details[0]["rank"]
    randomized = run_pass(LowRank(**options, svd="randomized", sketch_rank=16), layer, (x,)).record.details[0]["rank"]
    assert exact > 16 and exact <= randomized <= exact + 8


def test_randomized_full_rank_layer_is_refused_after_one_sketch(monkeypatch: pytest.MonkeyPatch) -> None:
    import fxopt.passes._low_rank_search as low_rank

    sketches: list[int] = []

    def counting_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sketches.append(rank)
        return randomized_svd(a, rank)

    monkeypatch.setattr(low_rank, "randomized_svd", counting_svd)
    torch.manual_seed(0)
    run = run_pass(LowRank(min_params=0, svd="randomized", sketch_rank=16), nn.Linear(256, 256).eval(),
                   (torch.randn(32, 256),))
    assert not run.modified
    assert sketches == [16]  # then one projection at rank 120, and no sketch of 32, 64, 120
    assert_skipped(run, "no rank below the break-even rank 128.0 keeps the output error within budget "
                        "(rank 120, randomized projection:")


def test_a_flat_spectrum_that_fits_below_break_even_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """100 equal singular values: the sketches see no decay, the rank-120 projection fits, so
    the sketches keep growing (16, 32, 64, 120) until one holds the whole spectrum."""
    import fxopt.passes._low_rank_search as low_rank

    sketches: list[int] = []

    def counting_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sketches.append(rank)
        return randomized_svd(a, rank)

    monkeypatch.setattr(low_rank, "randomized_svd", counting_svd)
    torch.manual_seed(0)
    sigma = torch.cat([torch.ones(100, dtype=torch.float64), torch.full((156,), 1e-6, dtype=torch.float64)])
    layer, x = linear_with(spectrum_weight(256, 256, sigma)), torch.randn(32, 256)
    exact = run_pass(LowRank(min_params=0, svd="exact"), layer, (x,)).record.details[0]["rank"]
    run = run_pass(LowRank(min_params=0, svd="randomized", sketch_rank=16), layer, (x,))
    assert exact == run.record.details[0]["rank"] == 104
    assert sketches == [16, 32, 64, 120]
    run.assert_outputs_match(rtol=0.01)


def test_randomized_svd_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    model, x = decaying_mlp(128, (4.0,)), torch.randn(16, 128)
    state = torch.get_rng_state()
    first = fxopt.compile(model, (x,), passes=[LowRank(min_params=0, svd="randomized", sketch_rank=8)])
    assert torch.equal(torch.get_rng_state(), state)
    second = fxopt.compile(model, (x,), passes=[LowRank(min_params=0, svd="randomized", sketch_rank=8)])
    assert first.report["low-rank"].details == second.report["low-rank"].details
    assert torch.equal(first(x), second(x))


def test_only_layers_above_the_exact_svd_size_are_sketched(monkeypatch: pytest.MonkeyPatch) -> None:
    import fxopt.passes._low_rank_search as low_rank

    sketched: list[tuple[int, ...]] = []

    def counting_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sketched.append(tuple(a.shape))
        return randomized_svd(a, rank)

    monkeypatch.setattr(low_rank, "EXACT_SVD_MAX_SIDE", 64)
    monkeypatch.setattr(low_rank, "randomized_svd", counting_svd)
    torch.manual_seed(0)
    model = nn.Sequential(linear_with(spectrum_weight(96, 64, decaying(64), seed=1)), nn.ReLU(),
                          linear_with(spectrum_weight(96, 96, decaying(96), seed=2))).eval()
    run = run_pass(LowRank(min_params=0), model, (torch.randn(16, 64),))
    assert run.record.applied == 2
    assert sketched == [(96, 96)]


# ---------------------------------------------------------------- budgets on unseen data


def fresh_error(opt: torch.nn.Module, model: torch.nn.Module, make) -> float:
    g = torch.Generator().manual_seed(100)
    worst = 0.0
    for _ in range(5):
        x = make(g)
        with torch.no_grad():
            worst = max(worst, compare_outputs([model(x)], [opt(x)]).max_rel)
    return worst


def test_rank_is_fitted_on_half_the_batches_and_holds_on_fresh_ones() -> None:
    model = decaying_mlp(128, (10.0, 10.0))
    g = torch.Generator().manual_seed(1)
    x, calibration = torch.randn(4, 128, generator=g), [(torch.randn(4, 128, generator=g),) for _ in range(2)]
    opt = fxopt.compile(model, (x,), passes=[LowRank(min_params=0)], calibration=calibration)
    record = opt.report["low-rank"]
    assert record.applied == 2
    for detail in record.details:
        assert detail["heldout_batches"] == 1
        assert detail["fitted_error"] <= 0.01 and detail["heldout_error"] <= 0.01
    assert fresh_error(opt, model, lambda g: torch.randn(4, 128, generator=g)) <= 1.5 * 0.01


def test_a_rank_that_fails_on_held_out_data_is_chosen_again_on_every_batch() -> None:
    """The example spans 8 directions, the calibration batch all of them: rank 8, fitted on
    the example, fails on the held-out calibration batch, so the rank is chosen again on both
    with half the budget, and holds on fresh wide inputs."""
    torch.manual_seed(0)
    weight = spectrum_weight(128, 128, decaying(128, rate=6.0))
    layer = linear_with(weight)
    top = torch.linalg.svd(weight, full_matrices=False)[2][:8].float()
    narrow, wide = torch.randn(32, 8) @ top, torch.randn(32, 128)
    opt = fxopt.compile(layer, (narrow,), passes=[LowRank(min_params=0)], calibration=[(wide,)])
    (detail,) = opt.report["low-rank"].details
    assert detail["heldout_retry"] and detail["rank"] > 8
    assert detail["heldout_error"] <= 0.005 and detail["fitted_error"] <= 0.005
    assert any(step["event"] == "retry" for step in detail["log"])
    assert fresh_error(opt, layer, lambda g: torch.randn(32, 128, generator=g)) <= 0.01
    record = opt.report["low-rank"]
    assert record.heldout_retry and record.heldout_error == detail["heldout_error"]
    (row,) = [line for line in str(opt.report).splitlines() if line.startswith("low-rank ")]
    assert f"{detail['heldout_error']:.2e}*" in row.split()


def test_sensitivity_strategy_stays_within_budget() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(linear_with(spectrum_weight(96, 96, decaying(96, rate), seed=i))
                            for i, rate in enumerate((3.0, 12.0))))
    run = run_pass(LowRank(budget=0.02, min_params=0, strategy="sensitivity"), model, (torch.randn(32, 96),))
    assert [d["layer"] for d in run.record.details] == ["0"] and run.record.max_rel_err <= 0.02
    assert_skipped(run, "no rank below the break-even rank 48.0", code="over-budget", node="linear_1")
    run.assert_outputs_match(rtol=0.02)
