from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt.ir import ops
from fxopt.testing import assert_idempotent, assert_skipped, run_pass


class AllSpellings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.dropout = nn.Dropout(0.3)
        self.alpha = nn.AlphaDropout(0.2)
        self.feature = nn.Dropout1d(0.2)
        self.feature_alpha = nn.FeatureAlphaDropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.linear(x))
        h = self.alpha(h)
        h = self.feature(h)
        return self.feature_alpha(h)


def test_every_dropout_spelling_is_removed() -> None:
    model, x = AllSpellings().eval(), torch.randn(2, 3, 6)
    run = run_pass("remove-dropout", model, (x,))
    assert run.count_before(ops.dropouts) == 4
    assert run.count(ops.dropouts) == 0
    assert run.record.applied == 4
    run.assert_outputs_match(rtol=0.0)


def test_native_dropout_at_inference() -> None:
    class Native(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = torch.ops.aten.native_dropout(x, 0.5, False)
            return out + 1

    run = run_pass("remove-dropout", Native().eval(), (torch.randn(4, 4),))
    assert run.count(ops.native_dropout) == 0
    run.assert_outputs_match(rtol=0.0)


def test_active_dropout_is_refused_with_reason() -> None:
    class Active(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x, 0.5, training=True)

    run = run_pass("remove-dropout", Active().eval(), (torch.randn(4, 4),))
    assert run.count(ops.dropout) == 1
    assert not run.modified
    assert_skipped(run, "dropout is active", code="dropout-active")


@pytest.mark.parametrize("model", [AllSpellings().eval(), nn.Sequential(nn.Linear(3, 3)).eval()])
def test_remove_dropout_is_idempotent(model: nn.Module) -> None:
    assert_idempotent("remove-dropout", model, (torch.randn(2, 3, 6) if isinstance(model, AllSpellings) else torch.randn(2, 3),))
