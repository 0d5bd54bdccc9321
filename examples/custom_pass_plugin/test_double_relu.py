"""The plugin's own unit tests, written with fxopt.testing."""

from __future__ import annotations

import torch
from torch import nn

from fxopt.ir import ops
from fxopt.testing import assert_idempotent, run_pass


def test_double_relu_collapses() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU()).eval()
    run = run_pass("double-relu", model, (torch.randn(2, 4),))
    assert run.count_before(ops.relu) == 2 and run.count(ops.relu) == 1
    assert run.record.matched == 1 and run.record.applied == 1
    run.assert_outputs_match()


def test_double_relu_is_idempotent() -> None:
    model = nn.Sequential(nn.ReLU(), nn.ReLU()).eval()
    assert_idempotent("double-relu", model, (torch.randn(2, 4),))
