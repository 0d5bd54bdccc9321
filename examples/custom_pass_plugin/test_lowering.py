"""The plugin's lowering, found through the fxopt.lowerings entry point (install the package)."""

from __future__ import annotations

import torch
from fxopt_double_relu.lowering import LinearRelu, linear_relu_op
from torch import nn

import fxopt
from fxopt.ir import count_ops, ops
from fxopt.lowering import get_lowering
from fxopt.testing import assert_outputs_close


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU()).eval()


def test_lowering_is_found_through_its_entry_point() -> None:
    assert isinstance(get_lowering("linear-relu"), LinearRelu)


def test_eager_backend_runs_the_fused_kernel() -> None:
    model, x = mlp(), torch.randn(3, 8)
    opt = fxopt.compile(model, (x,), passes=[])
    assert count_ops(opt.graph_module, linear_relu_op) == 2
    assert count_ops(opt.graph_module, ops.linear, ops.relu) == 0
    assert any("linear-relu: 2 Linear+ReLU pair(s)" in note for note in opt.report.notes)
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))


def test_onnx_backend_exports_the_fused_kernel_through_its_translation() -> None:
    model, x = mlp(), torch.randn(3, 8)
    opt = fxopt.compile(model, (x,), passes=[], backend="onnx")
    assert any(note.startswith("linear-relu:") for note in opt.report.notes)
    with torch.no_grad():
        assert_outputs_close([opt(x)], [model(x)])
