"""Static asymmetric activations: quantize-int8(activations='static', symmetric=False), the
fxopt::int8_linear_static_uint8 kernel, its oneDNN lowering and its ONNX export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fxopt.passes import QuantizeInt8
from torch import nn

import fxopt
from fxopt.errors import PassOptionError
from fxopt.ir import call_nodes, count_ops
from fxopt.ir.qdq import qops
from fxopt.kernels import int8
from fxopt.lowering import lower_graph
from fxopt.lowering import onednn_qlinear as qlinear
from fxopt.quant import quantize_weight, static_asymmetric_qparams
from fxopt.testing import assert_outputs_close, run_pass

qd = torch.ops.quantized_decomposed
ASYMMETRIC = QuantizeInt8(activations="static", symmetric=False)


def _gelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 64)).eval()


def _calibration() -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 64, generator=generator),) for _ in range(3)]


def test_qparams_cover_the_observed_range_and_zero() -> None:
    scale, zero = static_asymmetric_qparams(-0.17, 4.0)
    assert zero == round(0.17 / scale) and abs(scale - 4.17 / 255) < 1e-9
    assert static_asymmetric_qparams(0.5, 2.0) == (2.0 / 255, 0)  # the range holds zero
    assert static_asymmetric_qparams(-3.0, -1.0)[1] == 255


def test_the_pass_writes_uint8_qdq_with_a_zero_point() -> None:
    run = run_pass(QuantizeInt8(activations="static", symmetric=False, budget=1.0), _gelu_mlp(),
                   (torch.randn(32, 64),), calibration=_calibration())
    quantizers = call_nodes(run.after, qops.quantize_per_tensor)
    assert len(quantizers) == 3
    assert all(q.args[3:6] == (0, 255, torch.uint8) and 0 <= q.args[2] <= 255 for q in quantizers)
    assert quantizers[1].args[2] < 64  # after a GELU: barely any negative codes
    assert all(d["input_scale"][0] > 0 for d in run.record.details)


def test_it_is_more_accurate_than_symmetric_after_a_gelu() -> None:
    x, calibration = torch.randn(32, 64), _calibration()
    errors = {}
    for symmetric in (True, False):
        run = run_pass(QuantizeInt8(activations="static", symmetric=symmetric, budget=1.0, include="^2$"),
                       _gelu_mlp(), (x,), calibration=calibration)
        errors[symmetric] = run.record.max_rel_err
    assert errors[False] < errors[True] / 1.3, errors


def test_options_are_checked() -> None:
    with pytest.raises(PassOptionError, match="symmetric=False"):
        QuantizeInt8(activations="dynamic-tensor", symmetric=False)
    with pytest.raises(PassOptionError, match="symmetric=False"):
        QuantizeInt8(activations="static", observer="percentile", symmetric=False)


@pytest.mark.parametrize("with_bias", [True, False])
def test_the_kernel_matches_the_qdq_graph(with_bias: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 7, 48).relu() - 0.1
    qweight, weight_scale = quantize_weight(torch.randn(24, 48))
    bias = torch.randn(24) if with_bias else None
    scale, zero = static_asymmetric_qparams(float(x.min()), float(x.max()))
    got = int8.int8_linear_static_uint8(x, qweight, weight_scale, bias, scale, zero)
    xdq = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, scale, zero, 0, 255, torch.uint8),
                                   scale, zero, 0, 255, torch.uint8)
    want = torch.nn.functional.linear(xdq, qweight.float() * weight_scale[:, None], bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eager_lowers_to_the_kernel_then_to_onednn_with_the_zero_point() -> None:
    model, x = _gelu_mlp(), torch.randn(32, 64)
    opt = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="static", symmetric=False, budget=1.0)],
                        calibration=_calibration())
    assert count_ops(opt.graph_module, int8.int8_linear_static_uint8_op) == 3
    with torch.no_grad():
        reference = model(x)
        assert float((opt(x) - reference).abs().max() / reference.abs().max()) < 0.05
    if qlinear.qlinear_unsupported_reason() is not None:
        pytest.skip(qlinear.qlinear_unsupported_reason())
    lowered = lower_graph(opt.graph_module, "eager", torch.device("cpu"), "kernel").graph_module
    kernels = call_nodes(lowered, torch.ops.onednn.qlinear_pointwise.default)
    zero_points = [int(n.args[5]) for n in call_nodes(opt.graph_module, int8.int8_linear_static_uint8_op)]
    assert [n.args[2] for n in kernels] == zero_points
    # up + GELU writes uint8 with down's scale and zero point; down + ReLU with the head's
    assert [(n.args[9], n.args[8]) for n in kernels[:2]] == [(torch.uint8, zero_points[1]),
                                                           (torch.uint8, zero_points[2])]
    qdq = run_pass(QuantizeInt8(activations="static", symmetric=False, budget=1.0), model, (x,),
                   calibration=_calibration())
    drift = assert_outputs_close([opt(x)], qdq.outputs(), rtol=5e-3)
    assert drift < qdq.record.max_rel_err / 4


def test_onnx_export_runs_on_integer_kernels(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model, x = _gelu_mlp(), torch.randn(32, 64)
    eager = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="static", symmetric=False, budget=1.0)],
                          calibration=_calibration())
    path, report = fxopt.export_onnx(eager, (x,), tmp_path / "static.onnx")
    assert any("ONNX Runtime parity" in note for note in report.notes)
    import onnx

    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("MatMulInteger") + ops.count("QuantizeLinear") >= 6 and "MatMul" not in ops
