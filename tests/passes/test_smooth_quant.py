from __future__ import annotations

import pytest
import torch
from fxopt.passes import QuantizeInt8, SmoothQuant
from torch import nn

import fxopt
from fxopt.errors import PassOptionError
from fxopt.ir import constant, ops
from fxopt.testing import assert_skipped, run_pass


class PreNorm(nn.Module):
    """LayerNorm feeding two sibling Linears only, then a Linear feeding a Linear; the norm's
    weight gives a few channels large outliers, as trained transformers have."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.q, self.k = nn.Linear(64, 64), nn.Linear(64, 64)
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 32)
        with torch.no_grad():
            self.norm.weight[:4] = 40.0
            self.norm.bias.normal_()
            self.up.weight[:3] *= 30.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.down(self.up(self.q(h) * self.k(h)))


def _batches(n: int = 3) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 16, 64, generator=generator),) for _ in range(n)]


def test_outliers_move_into_the_weights_and_the_outputs_stay_the_same() -> None:
    torch.manual_seed(0)
    model, x = PreNorm().eval(), torch.randn(4, 16, 64)
    run = run_pass("smooth-quant", model, (x,), calibration=_batches())
    assert run.record.applied == 3  # q and k (one scale), down; up reads a product
    assert_skipped(run, "'mul'", code="not-foldable")
    run.assert_outputs_match(rtol=1e-4)
    assert run.count(ops.linear) == 4
    # The LayerNorm's output range per channel is flatter: its largest weight shrank.
    norms = [n for n in run.after.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    assert float(constant(run.after, norms[0].args[2]).abs().max()) < 40.0 / 2
    details = {tuple(d["linears"]): d for d in run.record.details}
    assert len(details) == 2 and any(len(names) == 2 for names in details)


def test_it_lets_static_int8_keep_its_accuracy() -> None:
    torch.manual_seed(0)
    model, x = PreNorm().eval(), torch.randn(4, 16, 64)
    calibration = _batches()
    static = QuantizeInt8(activations="static", budget=1.0)
    plain = fxopt.compile(model, (x,), passes=[static], calibration=calibration)
    smoothed = fxopt.compile(model, (x,), passes=[SmoothQuant(), static], calibration=calibration)
    test = torch.randn(4, 16, 64)
    with torch.no_grad():
        reference = model(test)
        plain_error = float((plain(test) - reference).abs().max() / reference.abs().max())
        smooth_error = float((smoothed(test) - reference).abs().max() / reference.abs().max())
    assert smooth_error < plain_error / 1.5, (smooth_error, plain_error)


def test_a_residual_reader_refuses_the_norm() -> None:
    class PostNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(32), nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(x)
            return h + self.fc(h)

    run = run_pass("smooth-quant", PostNorm().eval(), (torch.randn(8, 32),))
    assert not run.modified
    assert_skipped(run, "would see X / s", code="shared-intermediate")


def test_a_producer_it_cannot_fold_into_is_refused() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16)).eval()
    run = run_pass("smooth-quant", model, (torch.randn(8, 32),))
    assert_skipped(run, "neither a LayerNorm nor a Linear", code="not-foldable")
    assert run.record.applied == 0


def test_a_norm_without_affine_parameters_is_refused() -> None:
    model = nn.Sequential(nn.LayerNorm(32, elementwise_affine=False), nn.Linear(32, 16)).eval()
    run = run_pass("smooth-quant", model, (torch.randn(8, 32),))
    assert_skipped(run, "no affine weight", code="not-foldable")


def test_alpha_is_checked() -> None:
    with pytest.raises(PassOptionError, match="alpha"):
        SmoothQuant(alpha=1.5)


def test_not_in_the_default_pipeline() -> None:
    from fxopt.registry import default_pipeline

    assert "smooth-quant" not in [p.name for p in default_pipeline()]


class _PostNormBlock(nn.Module):
    """A post-norm residual block (BERT's): the norm's output feeds a residual and a Linear,
    the GELU's output a Linear; the norm gives a few channels large outliers."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(64), nn.Linear(64, 128), nn.Linear(128, 64)
        with torch.no_grad():
            self.norm.weight[:4] = 100.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        return self.down(torch.nn.functional.gelu(self.up(h))), h  # the block's update, the residual


def test_explicit_divides_where_the_producer_cannot_take_it() -> None:
    torch.manual_seed(0)
    model, x = _PostNormBlock().eval(), torch.randn(4, 16, 64)
    plain = run_pass("smooth-quant", model, (x,), calibration=_batches())
    assert plain.record.applied == 0
    assert_skipped(plain, code="shared-intermediate")
    assert_skipped(plain, code="not-foldable")
    run = run_pass("smooth-quant(explicit=True)", model, (x,), calibration=_batches())
    assert run.record.applied == 2  # up (its norm also feeds the residual) and down (after a GELU)
    assert all(d["explicit"] for d in run.record.details)
    run.assert_outputs_match(rtol=1e-4)
    multiplies = [n for n in run.after.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
    assert len(multiplies) == 2
    for mul in multiplies:  # only the Linears read the divided value; the residual reads the norm's own
        assert all(user.target is ops.linear for user in mul.users)
    norm = next(n for n in run.after.graph.nodes if n.target is torch.ops.aten.layer_norm.default)
    assert float(constant(run.after, norm.args[2]).abs().max()) == 100.0  # the norm is left as it was


class _NormFeedsResidual(nn.Module):
    """A LayerNorm with outlier channels whose output is both read by a Linear and kept
    as it is (a residual): 1/s cannot be folded into the norm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up = nn.LayerNorm(64), nn.Linear(64, 128)
        with torch.no_grad():
            self.norm.weight[:4] = 40.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        return self.up(h), h


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_explicit_lets_static_int8_keep_its_accuracy_where_the_norm_is_shared(seed: int) -> None:
    torch.manual_seed(seed)
    model, x = _NormFeedsResidual().eval(), torch.randn(4, 16, 64)
    calibration = _batches()
    static = QuantizeInt8(activations="static", budget=1.0)
    plain = fxopt.compile(model, (x,), passes=[static], calibration=calibration)
    smoothed = fxopt.compile(model, (x,), passes=[SmoothQuant(explicit=True), static], calibration=calibration)
    assert smoothed.report["smooth-quant"].applied == 1
    test = torch.randn(4, 16, 64)
    with torch.no_grad():
        reference = model(test)[0]
        plain_error = float((plain(test)[0] - reference).abs().max() / reference.abs().max())
        smooth_error = float((smoothed(test)[0] - reference).abs().max() / reference.abs().max())
    assert smooth_error < plain_error / 2, (smooth_error, plain_error)


def _relu_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64),
                          nn.BatchNorm1d(64), nn.GELU(), nn.Linear(64, 10))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model.eval()


def _rows(rows: int, seed: int) -> tuple[torch.Tensor]:
    return (torch.randn(rows, 32, generator=torch.Generator().manual_seed(seed)),)


def test_scales_are_fitted_without_the_held_out_batch() -> None:
    """The held-out batch (odd position: here the first calibration batch, after the example)
    must not shape s: static int8's held-out check after it would otherwise see that batch's
    channel ranges already migrated into the weights."""
    model = _relu_mlp()
    calibration = [_rows(2, 1), _rows(2, 2)]
    louder = [(calibration[0][0] * 50.0,), calibration[1]]
    runs = [run_pass(SmoothQuant(explicit=True), model, _rows(2, 0), calibration=c) for c in (calibration, louder)]
    scales = [[(d["min_scale"], d["max_scale"]) for d in run.record.details] for run in runs]
    assert runs[0].record.applied == 3 and scales[0] == scales[1]


def test_static_int8_after_it_stays_within_budget_on_new_data() -> None:
    """calibration=[example, other]: the held-out half is a real other batch (not a copy of the
    example), so clipping of the smoothed activations on new data shows before it is shipped."""
    model, example = _relu_mlp(), _rows(2, 0)
    passes = [*fxopt.registry.default_pipeline(), SmoothQuant(explicit=True), QuantizeInt8(activations="static")]
    optimized = fxopt.compile(model, example, passes=passes, calibration=[example, _rows(2, 1)])
    assert any("left out" in note for note in optimized.report.notes)
    for rows, seed in ((5, 5), (8, 8)):
        (x,) = _rows(rows, seed)
        with torch.no_grad():
            expected, actual = model(x), optimized(x)
        assert float((expected - actual).abs().max() / expected.abs().max()) <= 0.05
