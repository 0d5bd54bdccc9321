"""Int8 in ONNX: the exported graph runs on ONNX Runtime's integer kernels and matches eager int8."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from fxopt.passes import QuantizeInt8

import fxopt
from fxopt.ir import count_ops
from fxopt.kernels.int8 import int8_linear_dynamic_tensor_op, int8_linear_op
from fxopt.testing import assert_outputs_close

INTEGER_KERNELS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm"}


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()


def ort_run(path: str, optimized: Path, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Run ``path`` in ONNX Runtime; returns the output and the op types of ORT's optimized graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out), [n.op_type for n in onnx.load(str(optimized)).graph.node]


@pytest.mark.parametrize("activations", ["dynamic", "dynamic-tensor", "static"])
def test_onnx_graph_runs_integer_kernels_and_matches_eager_int8(tmp_path: Path, activations: str) -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(4, 10, 64)
    calibration = [(torch.randn(4, 10, 64),)] if activations == "static" else None
    quantize = QuantizeInt8(activations=activations)
    eager = fxopt.compile(model, (x,), passes=[quantize], calibration=calibration)
    assert count_ops(eager.graph_module, int8_linear_op, int8_linear_dynamic_tensor_op) == 2
    path, report = fxopt.export_onnx(eager, (x,), tmp_path / "int8.onnx")
    assert any("ONNX Runtime parity" in note for note in report.notes)
    out, optimized_ops = ort_run(path, tmp_path / "int8.ort.onnx", x)
    assert sum(op in INTEGER_KERNELS for op in optimized_ops) == 2, optimized_ops
    assert "MatMul" not in optimized_ops and "Gemm" not in optimized_ops  # no float GEMM left
    int8_weights = [i for i in onnx.load(path).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) == 2
    assert_outputs_close([out], [eager(x)], rtol=1e-5)


def test_dynamic_tensor_exports_as_onnx_runtimes_fused_dynamic_matmul(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(4, 10, 64) + 0.5
    eager = fxopt.compile(model, (x,), passes=[QuantizeInt8(activations="dynamic-tensor")])
    path, _ = fxopt.export_onnx(eager, (x,), tmp_path / "dq.onnx")
    exported = [n.op_type for n in onnx.load(path).graph.node]
    assert exported.count("DynamicQuantizeLinear") == exported.count("MatMulInteger") == 2
    out, optimized_ops = ort_run(path, tmp_path / "dq.ort.onnx", x)
    # ONNX Runtime fuses quantization, integer GEMM, rescale and bias into one kernel per Linear
    assert optimized_ops.count("DynamicQuantizeMatMul") == 2, optimized_ops
    assert not {"DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul"} & set(optimized_ops), optimized_ops
    assert_outputs_close([out], [eager(x)], rtol=1e-5)


def test_export_onnx_with_passes_quantizes_a_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(8, 64)
    path, _ = fxopt.export_onnx(model, (x,), tmp_path / "plain.onnx", passes=["quantize-int8"])
    out, optimized_ops = ort_run(path, tmp_path / "plain.ort.onnx", x)
    # the default recipe quantizes these activations per tensor: ONNX Runtime's fused dynamic
    # kernel per Linear, the form quantize_dynamic gets, and no per-token arithmetic around it
    assert optimized_ops.count("DynamicQuantizeMatMul") == 2, optimized_ops
    assert not {"MatMulInteger", "ReduceMax", "Round"} & set(optimized_ops), optimized_ops
    eager = fxopt.compile(model, (x,), passes=["quantize-int8"])
    assert_outputs_close([out], [eager(x)], rtol=1e-5)
    with torch.no_grad():
        assert_outputs_close([out], [model(x)], rtol=0.05)


def test_onnx_backend_runs_the_qdq_graph_on_integer_kernels() -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(2, 7, 64)
    opt = fxopt.compile(model, (x,), passes=["quantize-int8"], backend="onnx")
    eager = fxopt.compile(model, (x,), passes=["quantize-int8"])
    assert_outputs_close([opt(x)], [eager(x)], rtol=1e-5)
    other = torch.randn(2, 7, 64)
    assert_outputs_close([opt(other)], [eager(other)], rtol=1e-5)


def test_peer_systems_build_and_agree_with_fp32() -> None:
    from fxopt_bench import compare

    torch.manual_seed(0)
    rows = compare(mlp(), (torch.randn(8, 64),), repeats=1, warmup=0)
    assert [r["name"] for r in rows] == ["eager fp32", "ORT fp32", "ORT quantize_dynamic",
                                         "torch.ao dynamic int8", "fxopt int8 eager", "fxopt int8 ONNX",
                                         "fxopt int8 eager (per-tensor)", "fxopt int8 ONNX (per-tensor)"]
    errors = {r["name"]: r.get("max_rel_err", r.get("error")) for r in rows}
    assert errors["ORT fp32"] < 1e-5, errors
    assert all(isinstance(e, float) and e < 0.05 for e in errors.values()), errors
    assert errors["fxopt int8 eager"] == pytest.approx(errors["fxopt int8 ONNX"], rel=1e-3)
    per_tensor = errors["fxopt int8 ONNX (per-tensor)"]
    assert per_tensor == pytest.approx(errors["fxopt int8 eager (per-tensor)"], rel=1e-3)
    # the scheme of ORT's quantize_dynamic (per-tensor uint8 activations, per-channel weights):
    # the same scheme as quantize_dynamic: errors of the same order
    assert errors["ORT quantize_dynamic"] / 2 < per_tensor < 2 * errors["ORT quantize_dynamic"], errors
