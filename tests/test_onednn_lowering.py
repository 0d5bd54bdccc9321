from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir import call_nodes, count_ops, ops
from fxopt.lowering import LoweringResult, lower_graph, registered_lowering
from fxopt.lowering import onednn_linear as onednn
from fxopt.lowering.base import Lowering

pytestmark = pytest.mark.skipif(onednn.onednn_unsupported_reason() is not None,
                                reason=str(onednn.onednn_unsupported_reason()))
fused = torch.ops.mkldnn._linear_pointwise.default


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 96), nn.SiLU(), nn.Linear(96, 64),
                         nn.Hardtanh(-0.5, 2.0), nn.Linear(64, 64), nn.Linear(64, 8)).eval()


def test_linears_and_their_activations_become_fused_kernels() -> None:
    model, x = _mlp(), torch.randn(16, 64)
    opt = fxopt.compile(model, (x,), passes=[])
    lowered = lower_graph(opt.graph_module, "eager", torch.device("cpu")).graph_module
    assert count_ops(lowered, fused) == 4
    assert count_ops(lowered, ops.gelu, ops.silu, torch.ops.aten.hardtanh.default) == 0
    assert count_ops(lowered, ops.linear) == 1  # 64 -> 8: too small to gain from oneDNN
    post_ops = sorted(node.args[3] for node in call_nodes(lowered, fused))
    assert post_ops == ["gelu", "hardtanh", "none", "swish"]
    assert any("4 Linears run as fused oneDNN kernels" in note for note in opt.report.notes)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


def test_three_dimensional_inputs_and_shared_activations() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = self.up(x)  # read twice: the ReLU cannot be fused into it
            return self.down(torch.relu(hidden)), hidden

    model, x = Block().eval(), torch.randn(2, 8, 64)
    opt = fxopt.compile(model, (x,), passes=[])
    lowered = lower_graph(opt.graph_module, "eager", torch.device("cpu")).graph_module
    assert [node.args[3] for node in call_nodes(lowered, fused)] == ["none", "none"]
    assert count_ops(lowered, ops.relu) == 1
    with torch.no_grad():
        for got, want in zip(opt(x), model(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_linears_fuse_after_cast_bf16() -> None:
    if onednn.onednn_unsupported_reason(torch.bfloat16):
        pytest.skip(onednn.onednn_unsupported_reason(torch.bfloat16))
    model, x = _mlp(), torch.randn(16, 64)
    opt = fxopt.compile(model, (x,), passes=["cast-bf16(budget=0.05)"])
    lowered = lower_graph(opt.graph_module, "eager", torch.device("cpu")).graph_module
    dtypes = {node.args[1].meta["val"].dtype for node in call_nodes(lowered, fused)}
    assert dtypes == {torch.bfloat16} and count_ops(lowered, fused) == 4
    # kept: compared with the bfloat16 graph at bfloat16's tolerance, not float32's
    assert any("4 Linears run as fused oneDNN kernels" in note for note in opt.report.notes)
    assert not any("changed outputs" in note for note in opt.report.notes), opt.report.notes
    with torch.no_grad():
        reference = model(x)
        assert float((opt(x) - reference).abs().max() / reference.abs().max()) <= 0.05


def test_not_used_when_the_probe_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn.OneDnnLinear, "probe", lambda self, device: "no oneDNN here")
    opt = fxopt.compile(_mlp(), (torch.randn(4, 64),), passes=[])
    assert any("onednn-linear: not used on cpu" in note and "no oneDNN here" in note for note in opt.report.notes)


class _Corrupting(Lowering):
    """A broken kernel: adds one to every Linear's output."""

    name = "corrupting-test-lowering"
    backends = ("eager",)
    before = ("int8-linear",)

    def applies(self, gm) -> bool:
        return count_ops(gm, ops.linear) > 0

    def lower(self, gm, device) -> LoweringResult:
        for node in call_nodes(gm, ops.linear):
            with gm.graph.inserting_after(node):
                bumped = gm.graph.call_function(torch.ops.aten.add.Tensor, (node, 1.0))
            node.replace_all_uses_with(bumped, delete_user_cb=lambda user, new=bumped: user is not new)
        gm.recompile()
        return LoweringResult(lowered=1)


def test_a_lowering_that_changes_outputs_is_dropped_with_a_note() -> None:
    model, x = _mlp(), torch.randn(8, 64)
    with registered_lowering(_Corrupting):
        opt = fxopt.compile(model, (x,), passes=[])
    assert any("changed outputs on the example inputs" in note for note in opt.report.notes)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)
