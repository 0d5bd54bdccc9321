"""onednn-qlinear: static int8 Linears on oneDNN's fused int8 kernel (eager, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from fxopt.passes import QuantizeInt8
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxopt
from fxopt.ir import call_nodes, count_ops, ops
from fxopt.kernels.int8 import int8_linear_dynamic_tensor_op, int8_linear_op
from fxopt.lowering import lower_graph
from fxopt.lowering import onednn_qlinear as qlinear
from fxopt.testing import assert_outputs_close, run_pass

pytestmark = pytest.mark.skipif(qlinear.qlinear_unsupported_reason() is not None,
                                reason=str(qlinear.qlinear_unsupported_reason()))
kernel = torch.ops.onednn.qlinear_pointwise.default
CPU = torch.device("cpu")


class Block(nn.Module):
    """A transformer MLP block: up, GELU, down (a chain), a residual, then a ReLU head."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.head = nn.Linear(64, 256), nn.Linear(256, 64), nn.Linear(64, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x + self.down(torch.nn.functional.gelu(self.up(x)))
        return torch.relu(self.head(hidden))


def _static(model: nn.Module, x: torch.Tensor, **options) -> tuple[fxopt.OptimizedModule, list]:
    torch.manual_seed(1)
    calibration = [(torch.randn_like(x),) for _ in range(3)]
    quantize = QuantizeInt8(activations="static")
    return fxopt.compile(model, (x,), passes=[quantize], calibration=calibration, **options), calibration


class _CountCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def test_static_linears_run_on_qlinear_with_fused_activations_and_a_uint8_chain() -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 16, 64)
    opt, calibration = _static(model, x)
    assert count_ops(opt.graph_module, int8_linear_op) == 3  # the portable graph keeps fxopt's op
    lowered = lower_graph(opt.graph_module, "eager", CPU, "kernel").graph_module
    kernels = call_nodes(lowered, kernel)
    assert len(kernels) == 3 and count_ops(lowered, int8_linear_op, ops.gelu, ops.relu) == 0
    # (post-op, output dtype) per Linear: up fuses GELU and writes uint8 for down to read as is.
    assert [(n.args[10], n.args[9]) for n in kernels] == [
        ("gelu", torch.uint8), ("none", torch.float32), ("relu", torch.float32)]
    assert kernels[1].args[0] is kernels[0] and kernels[1].args[1] == kernels[0].args[7]
    assert count_ops(lowered, qlinear.quantize_u8) == 2  # x and hidden; up's output needs none
    assert "onednn.qlinear_pointwise" in lowered.code
    assert any("3 static int8 Linear(s) run on onednn.qlinear_pointwise (1 +gelu, 1 plain, 1 +relu); "
               "1 write uint8" in note for note in opt.report.notes), opt.report.notes
    assert not any("changed outputs" in note for note in opt.report.notes)
    with torch.no_grad():
        reference = model(x)
        assert float((opt(x) - reference).abs().max() / reference.abs().max()) < 0.05
    # the same numbers as the QDQ graph, up to a quantization step moved by float rounding
    qdq = run_pass(QuantizeInt8(activations="static"), model, (x,), calibration=calibration)
    drift = assert_outputs_close([opt(x)], qdq.outputs(), rtol=5e-3)
    assert drift < qdq.record.max_rel_err / 4


def test_the_kernel_is_what_runs() -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 8, 64)
    opt, _ = _static(model, x)
    with _CountCalls() as counter, torch.no_grad():
        opt(x)
    assert counter.calls.get("onednn.qlinear_pointwise.default") == 3
    assert "fxopt.int8_linear.default" not in counter.calls


def test_shared_inputs_are_quantized_once_and_other_batch_sizes_run() -> None:
    class Siblings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x).sum(-1, keepdim=True) * self.b(x)

    torch.manual_seed(0)
    model, x = Siblings().eval(), torch.randn(8, 64)
    opt, _ = _static(model, x)
    lowered = lower_graph(opt.graph_module, "eager", CPU, "kernel").graph_module
    assert count_ops(lowered, kernel) == 2 and count_ops(lowered, qlinear.quantize_u8) == 1
    bigger = torch.randn(13, 64)
    with torch.no_grad():
        reference = model(bigger)
        assert float((opt(bigger) - reference).abs().max() / reference.abs().max()) < 0.05


def _calls(gm: torch.fx.GraphModule, function: object) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is function]


def test_dynamic_per_tensor_activations_run_on_onednn_with_the_activation_fused() -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 16, 64)
    opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="dynamic-tensor")])
    lowered = lower_graph(opt.graph_module, "eager", CPU, "kernel").graph_module
    calls = _calls(lowered, qlinear.tensor_qlinear)
    assert len(calls) == 3 and count_ops(lowered, int8_linear_dynamic_tensor_op, ops.gelu, ops.relu) == 0
    assert sorted(c.args[5] for c in calls) == ["gelu", "none", "relu"]
    # the same uint8 activations as quantized::linear_dynamic: float rounding apart
    with torch.no_grad():
        torch.testing.assert_close(lowered(x)[0], opt.graph_module(x)[0], rtol=1e-3, atol=1e-3)


def test_dynamic_per_token_activations_run_on_onednn_with_their_row_scales() -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 16, 64)
    opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="dynamic")])
    lowered = lower_graph(opt.graph_module, "eager", CPU, "kernel").graph_module
    # the row scales come after the kernel: activations stay separate ops
    assert len(_calls(lowered, qlinear.token_qlinear)) == 3 and count_ops(lowered, int8_linear_op) == 0
    assert count_ops(lowered, ops.gelu) == count_ops(lowered, ops.relu) == 1
    # the same int8 activations as torch._int_mm's kernel: the integers agree, the rescale's rounding apart
    with torch.no_grad():
        torch.testing.assert_close(lowered(x)[0], opt.graph_module(x)[0], rtol=1e-4, atol=1e-4)


def test_probe_refusal_keeps_fxopts_kernel_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qlinear, "kernel_unsupported_reason", lambda device: "no oneDNN int8 here")
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 16, 64)
    opt, _ = _static(model, x)
    assert any("onednn-qlinear: not used on cpu" in note and "no oneDNN int8 here" in note
               for note in opt.report.notes), opt.report.notes
    with _CountCalls() as counter, torch.no_grad():
        out = opt(x)
    assert "onednn.qlinear_pointwise.default" not in counter.calls
    assert counter.calls.get("fxopt.int8_linear.default") == 3
    with torch.no_grad():
        reference = model(x)
    assert float((out - reference).abs().max() / reference.abs().max()) < 0.05


def test_unsupported_post_ops_stay_separate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qlinear, "supported_post_ops", lambda: frozenset({"relu"}))
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 16, 64)
    opt, _ = _static(model, x)
    lowered = lower_graph(opt.graph_module, "eager", CPU, "kernel").graph_module
    assert [n.args[10] for n in call_nodes(lowered, kernel)] == ["none", "none", "relu"]
    assert count_ops(lowered, ops.gelu) == 1


def test_the_probe_finds_the_kernel_and_its_post_ops() -> None:
    assert qlinear.qlinear_unsupported_reason() is None
    assert {"relu", "gelu:none"} <= qlinear.supported_post_ops()


def test_lowered_module_copies_and_saves(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 8, 64)
    opt, _ = _static(model, x)
    lowered = lower_graph(opt.graph_module, "eager", CPU, "kernel").graph_module
    clone = copy.deepcopy(lowered)  # the packed weights are shared, not copied
    with torch.no_grad():
        torch.testing.assert_close(clone(x), lowered(x))
    fxopt.save(opt, tmp_path / "static.fxopt")
    loaded = fxopt.load(tmp_path / "static.fxopt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), opt(x))


def test_packed_int8_weights_are_held_once_and_read_back_exactly(tmp_path) -> None:
    """The kernels' packed copy is the module's only copy of each int8 weight: the optimized
    graph holds meta tensors in their place and unpacks the very same integers when read
    (to inspect, copy or save it)."""
    from fxopt.quant import quantize_weight

    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 16, 64)
    opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="dynamic")], measure=False)
    held = opt._modules["graph_module"]
    assert len(opt._packed) == 3
    assert all(held.get_buffer(target).is_meta for target in opt._packed)
    graph = opt.graph_module
    assert graph is opt.graph_module  # one unpacked module while the caller holds it
    int8 = sorted((graph.get_buffer(target) for target in opt._packed), key=lambda t: tuple(t.shape))
    expected = sorted((quantize_weight(m.weight)[0] for m in (model.up, model.down, model.head)),
                      key=lambda t: tuple(t.shape))
    assert all(torch.equal(got, want) for got, want in zip(int8, expected))
    state = opt.state_dict()
    assert all(torch.equal(state[f"graph_module.{t}"], graph.get_buffer(t)) for t in opt._packed)
    with torch.no_grad():
        torch.testing.assert_close(graph(x)[0], opt(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(copy.deepcopy(opt)(x), opt(x), rtol=0, atol=0)
    fxopt.save(opt, tmp_path / "packed.fxopt")
    loaded = fxopt.load(tmp_path / "packed.fxopt")
    assert set(loaded._packed) == set(opt._packed)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), opt(x), rtol=0, atol=0)
