from __future__ import annotations

import pytest
import torch
from torch import nn

from fxopt.ir import ops
from fxopt.testing import assert_idempotent, assert_skipped, run_pass


def _trained(bn: nn.BatchNorm1d) -> nn.BatchNorm1d:
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if bn.affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_after_linear_is_folded(affine: bool, bias: bool) -> None:
    model = nn.Sequential(nn.Linear(8, 16, bias=bias), _trained(nn.BatchNorm1d(16, affine=affine)), nn.ReLU()).eval()
    run = run_pass("fold-batchnorm", model, (torch.randn(5, 8),))
    assert run.count_before(ops.batch_norm) == 1 and run.count(ops.batch_norm) == 0
    assert run.count(ops.linear) == 1
    assert run.assert_outputs_match() < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_before_linear_is_folded(bias: bool) -> None:
    model = nn.Sequential(_trained(nn.BatchNorm1d(8)), nn.Linear(8, 4, bias=bias)).eval()
    run = run_pass("fold-batchnorm", model, (torch.randn(5, 8),))
    assert run.count(ops.batch_norm) == 0
    run.assert_outputs_match()


def test_batchnorm_feeding_two_linears_folds_into_both() -> None:
    class Fan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.a, self.b = _trained(nn.BatchNorm1d(8)), nn.Linear(8, 3), nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.bn(x)
            return self.a(h), self.b(h)

    run = run_pass("fold-batchnorm", Fan().eval(), (torch.randn(4, 8),))
    assert run.count(ops.batch_norm) == 0
    run.assert_outputs_match()


class ChannelBN(nn.Module):
    """(N, C, L) input, Linear(L, L), BatchNorm1d(C) with L == C: BN normalizes channels, not features."""

    def __init__(self, size: int = 6) -> None:
        super().__init__()
        self.linear = nn.Linear(size, size)
        self.bn = _trained(nn.BatchNorm1d(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


def test_batchnorm_over_channels_not_features_is_refused() -> None:
    run = run_pass("fold-batchnorm", ChannelBN().eval(), (torch.randn(2, 6, 6),))
    assert run.count(ops.batch_norm) == 1
    assert not run.modified
    assert_skipped(run, "they coincide only for 2-D (N, C) activations", code="bn-not-on-features")


def test_batchnorm_before_linear_on_3d_input_is_refused() -> None:
    model = nn.Sequential(_trained(nn.BatchNorm1d(6)), nn.Linear(6, 6)).eval()
    run = run_pass("fold-batchnorm", model, (torch.randn(2, 6, 6),))
    assert run.count(ops.batch_norm) == 1
    assert_skipped(run, "BatchNorm normalizes dim 1 of a 3-D input", code="bn-not-on-features")


def test_batchnorm_in_training_mode_is_refused() -> None:
    class TrainBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4, track_running_stats=False)  # always uses batch statistics

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.linear(x))

    run = run_pass("fold-batchnorm", TrainBN().eval(), (torch.randn(8, 4),))
    assert run.count(ops.batch_norm) == 1
    assert_skipped(run, "training mode", code="bn-training")


def test_linear_output_used_elsewhere_is_refused() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.bn = nn.Linear(4, 4), _trained(nn.BatchNorm1d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.linear(x)
            return self.bn(h) + h

    run = run_pass("fold-batchnorm", Shared().eval(), (torch.randn(3, 4),))
    assert_skipped(run, "linear is also used by add", code="shared-intermediate", node="batch_norm")


def test_non_finite_statistics_are_refused() -> None:
    bn = _trained(nn.BatchNorm1d(4))
    with torch.no_grad():
        bn.running_var[1] = float("nan")
    model = nn.Sequential(nn.Linear(4, 4), bn).eval()
    run = run_pass("fold-batchnorm", model, (torch.randn(3, 4),))
    assert run.count(ops.batch_norm) == 1
    assert_skipped(run, "not finite", code="not-finite")


class TowerOnTwoInputs(nn.Module):
    """Linear -> BatchNorm applied to two inputs: the Linear's weight is read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(8, 16), _trained(nn.BatchNorm1d(16))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bn(self.linear(x)), self.bn(self.linear(z))


def test_shared_linear_weight_is_not_folded_into_copies() -> None:
    model, inputs = TowerOnTwoInputs().eval(), (torch.randn(5, 8), torch.randn(5, 8))
    run = run_pass("fold-batchnorm", model, inputs)
    assert run.count(ops.batch_norm) == 2 and run.record.matched == 2 and run.record.applied == 0
    assert_skipped(run, "its weight tensor is also used by", code="shared-constant")
    assert run.record.after.weight_bytes == run.record.before.weight_bytes


def test_fold_batchnorm_is_idempotent() -> None:
    model = nn.Sequential(nn.Linear(8, 16), _trained(nn.BatchNorm1d(16))).eval()
    assert_idempotent("fold-batchnorm", model, (torch.randn(5, 8),))
