"""Lowerings as plugins: the registry, how backends apply them, their translations and tolerances."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import onnx
import pytest
import torch
import torch.fx as fx
from conftest import PLUGIN_DIR, plugin_metadata

import fxopt
from fxopt.ir import call_nodes, count_ops, ops
from fxopt.lowering import (
    ENTRY_POINT_GROUP,
    Lowering,
    LoweringResult,
    get_lowering,
    lowerings,
    registered_lowering,
)
from fxopt.lowering.int8_linear import Int8Linear
from fxopt.testing import assert_outputs_close


# A stand-in kernel that is off by ``error`` (relative), to see whose tolerance applies.
@torch.library.custom_op("fxopt_test_lowering::relu_kernel", mutates_args=())
def relu_kernel(x: torch.Tensor, error: float) -> torch.Tensor:
    return x.relu() * (1.0 + error)


@relu_kernel.register_fake
def _(x: torch.Tensor, error: float) -> torch.Tensor:
    return torch.empty_like(x)


relu_kernel_op = torch.ops.fxopt_test_lowering.relu_kernel.default


def relu_kernel_onnx(x, error):  # type: ignore[no-untyped-def]
    from onnxscript import opset20 as op

    return op.Mul(op.Relu(x), op.CastLike(op.Constant(value_float=1.0 + error), x))


class ReluKernel(Lowering):
    name = "test-relu-kernel"
    error = 0.0
    reason: str | None = None

    def probe(self, device: torch.device) -> str | None:
        return self.reason

    def applies(self, gm: fx.GraphModule) -> bool:
        return count_ops(gm, ops.relu, relu_kernel_op) > 0

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        result = LoweringResult()
        for relu in call_nodes(gm, ops.relu):
            relu.target, relu.args = relu_kernel_op, (relu.args[0], self.error)
            result.lowered += 1
        gm.recompile()
        result.notes.append(f"{result.lowered} ReLU(s) on the test kernel")
        return result

    def onnx_translations(self) -> dict:
        return {relu_kernel_op: relu_kernel_onnx}


def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


def test_builtin_int8_lowering_comes_from_the_entry_point_group() -> None:
    found = {e.name: e.value for e in entry_points(group=ENTRY_POINT_GROUP)}
    assert found["int8-linear"] == "fxopt.lowering.int8_linear:Int8Linear"
    assert isinstance(get_lowering("int8-linear"), Int8Linear)
    assert "int8-linear" in [lowering.name for lowering in lowerings()]
    with pytest.raises(KeyError, match="no lowering named 'nope'"):
        get_lowering("nope")


def test_scoped_lowering_runs_on_eager_on_a_copy_and_only_inside_its_scope() -> None:
    x = torch.randn(3, 8)
    with registered_lowering(ReluKernel) as lowering:
        assert lowering in lowerings()
        opt = fxopt.compile(model(), (x,), passes=[])
    assert count_ops(opt.graph_module, relu_kernel_op) == 1 and count_ops(opt.graph_module, ops.relu) == 0
    assert "test-relu-kernel: 1 ReLU(s) on the test kernel" in opt.report.notes
    assert "test-relu-kernel" not in [lowering.name for lowering in lowerings()]
    plain = fxopt.compile(model(), (x,), passes=[])
    assert count_ops(plain.graph_module, ops.relu) == 1 and count_ops(plain.graph_module, relu_kernel_op) == 0


def test_backend_and_device_restrictions_and_probe_are_honoured() -> None:
    x = torch.randn(3, 8)

    class OnnxOnly(ReluKernel):
        backends = ("onnx",)

    class CudaOnly(ReluKernel):
        devices = ("cuda",)

    class Refuses(ReluKernel):
        reason = "no such kernel in this build"

    with registered_lowering(OnnxOnly):
        assert count_ops(fxopt.compile(model(), (x,), passes=[]).graph_module, relu_kernel_op) == 0
    with registered_lowering(CudaOnly):
        opt = fxopt.compile(model(), (x,), passes=[], device="cpu")
        assert count_ops(opt.graph_module, relu_kernel_op) == 0
        assert any("test-relu-kernel: not used on cpu" in n and "cuda only" in n for n in opt.report.notes)
    with registered_lowering(Refuses):
        opt = fxopt.compile(model(), (x,), passes=[])
        assert count_ops(opt.graph_module, relu_kernel_op) == 0
        assert any(n.endswith("no such kernel in this build") for n in opt.report.notes)


def test_onnx_export_uses_the_lowerings_translation(tmp_path: Path) -> None:
    import onnxruntime as ort

    class Doubling(ReluKernel):
        error = 1.0  # relu(x) * 2: visible in the ONNX graph and its outputs

    torch.manual_seed(0)
    m, x = model(), torch.randn(3, 8)
    with registered_lowering(Doubling):
        path, _ = fxopt.export_onnx(m, (x,), tmp_path / "kernel.onnx", passes=[], check_parity=False)
    exported = [n.op_type for n in onnx.load(path).graph.node]
    assert "Relu" in exported and "Mul" in exported  # relu_kernel_onnx's graph
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = m[2](2 * m[1](m[0](x)))
    assert_outputs_close([torch.from_numpy(got)], [expected])


def test_parity_tolerance_comes_from_the_lowerings_that_applied() -> None:
    torch.manual_seed(0)
    m, x = model(), torch.randn(3, 8)

    class Approximate(ReluKernel):
        error = 1e-3  # past fp32's exact tolerance (1e-4)

    class ApproximateWithTolerance(Approximate):
        parity_rtol = 1e-2

    with registered_lowering(Approximate), pytest.raises(fxopt.BackendError, match="max relative error"):
        fxopt.compile(m, (x,), passes=[], backend="onnx")
    with registered_lowering(ApproximateWithTolerance):
        opt = fxopt.compile(m, (x,), passes=[], backend="onnx")
    with torch.no_grad():
        assert_outputs_close([opt(x)], [m(x)], rtol=1e-2)
    assert Int8Linear.parity_rtol == 0.05


def test_bad_lowerings_are_refused() -> None:
    class NoName(ReluKernel):
        name = ""

    class Spaces(ReluKernel):
        name = "Has Spaces"

    for bad in (NoName, Spaces):
        with pytest.raises(ValueError, match="kebab-case"), registered_lowering(bad):
            pass
    with pytest.raises(TypeError, match="not a fxopt Lowering"), registered_lowering(object()):  # type: ignore[arg-type]
        pass


def test_plugin_package_lowering_is_found_through_its_entry_point(tmp_path: Path) -> None:
    """The example plugin's lowering (a separate distribution) runs through the same path."""
    paths = [str(plugin_metadata(tmp_path)), str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PLUGIN_DIR / "test_lowering.py")],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=os.pathsep.join(paths)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout


# The order lowerings ran in when they declared integer ``order``s (50, 100, 150, then name),
# per backend and stage: the only order a backend sees, since it runs those that list it.
ORDER_BEFORE_NAMES = {
    ("eager", "graph"): ["int8-linear"],
    ("eager", "kernel"): ["onednn-linear", "onednn-qlinear"],
    ("onnx", "graph"): ["ort-attention", "int8-linear", "ort-bias-gelu"],
    ("openvino", "graph"): ["openvino-split-linear", "openvino-int8"],
}


def test_lowerings_order_by_after_and_before_names_as_they_ran_by_numbers() -> None:
    from fxopt.lowering.ort_skip_layer_norm import OrtSkipLayerNorm

    builtin = [lowering for lowering in lowerings() if lowering.name in
               {name for names in ORDER_BEFORE_NAMES.values() for name in names}]
    for (backend, stage), expected in ORDER_BEFORE_NAMES.items():
        assert [lw.name for lw in builtin if backend in lw.backends and lw.stage == stage] == expected
    # Across backends only openvino-int8 moved (it was a 100 among the 100s), and ort-bias-gelu
    # since split-linear holds the oneDNN lowerings back; none of them runs beside another
    # backend's lowerings, so no backend's order changed.
    assert [lw.name for lw in builtin] == [
        "openvino-split-linear", "openvino-int8", "ort-attention", "int8-linear", "ort-bias-gelu",
        "onednn-linear", "onednn-qlinear"]
    with registered_lowering(OrtSkipLayerNorm):  # opt-in; after int8-linear, as its 150 said
        names = [lw.name for lw in lowerings() if "onnx" in lw.backends]
        assert names.index("int8-linear") < names.index("ort-skip-layer-norm")


def test_a_plugin_lowering_declares_what_it_runs_before() -> None:
    class Fused(ReluKernel):
        name = "a-fused-linear"  # its name alone would put it first; before= must hold anyway
        before = ("int8-linear",)

    class Later(ReluKernel):
        name = "aa-after-int8"
        after = ("int8-linear",)

    with registered_lowering(Fused), registered_lowering(Later):
        names = [lw.name for lw in lowerings()]
        assert names.index("a-fused-linear") < names.index("int8-linear") < names.index("aa-after-int8")

    class Cycle(ReluKernel):
        name = "z-cycle"
        after = ("int8-linear",)
        before = ("ort-attention",)  # ort-attention runs before int8-linear

    with registered_lowering(Cycle), pytest.raises(fxopt.FxoptError, match="lowerings' .* form a cycle"):
        lowerings()


def test_a_lowering_that_still_sets_order_is_refused_with_the_way_out() -> None:
    class Numbered(ReluKernel):
        name = "numbered"
        order = 50

    with pytest.raises(ValueError, match=r"sets 'order'.*after = \(\.\.\.\), before = \(\.\.\.\)"), \
            registered_lowering(Numbered):
        pass


def _bf16_graph() -> tuple[fx.GraphModule, torch.Tensor]:
    from fxopt.testing import run_pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(8, 32)
    run = run_pass("cast-bf16(budget=0.5)", model, (x,))
    assert run.record.applied == 2
    return run.after, x


def test_openvino_bf16_drops_the_casts_and_keeps_the_bf16_rounded_weights_in_float32() -> None:
    """The rewrite alone (no OpenVINO needed): no bfloat16 value or cast is left, each weight
    holds its bfloat16 values as float32, and the graph computes what the bf16 graph does up
    to the activations' bf16 rounding, which OpenVINO's bf16 precision applies instead."""
    from fxopt.ir import constants, dtype_of
    from fxopt.ir.surgery import copy_graph_module
    from fxopt.lowering.openvino_bf16 import OpenVinoBf16, to_copy

    gm, x = _bf16_graph()
    lowering = OpenVinoBf16()
    assert lowering.applies(gm)
    lowered = copy_graph_module(gm)
    to_bf16 = [n for n in call_nodes(gm, to_copy) if n.kwargs.get("dtype") == torch.bfloat16]
    assert len(to_bf16) == 1 and len(call_nodes(gm, to_copy)) == 2  # into bf16 once, back once
    result = lowering.lower(lowered, torch.device("cpu"))
    assert result.lowered == 1 and "1 bfloat16 casts" in result.notes[0]
    assert not any(dtype_of(n) == torch.bfloat16 for n in lowered.graph.nodes)
    assert not call_nodes(lowered, to_copy)
    weights = [t for _, t in constants(lowered) if t.dim() == 2]
    assert len(weights) == 2 and all(w.dtype == torch.float32 and torch.equal(w.bfloat16().float(), w)
                                     for w in weights)
    assert_outputs_close(lowered(x), gm(x), rtol=2e-2)
    assert lowering.runtime_config(lowered) == {"INFERENCE_PRECISION_HINT": "bf16"}


def test_openvino_bf16_leaves_a_graph_with_other_bf16_arithmetic_alone() -> None:
    """A bfloat16 value that is not a constant, a cast, a Linear or an activation (a multiply
    here): the lowering does not apply, and the graph keeps its casts."""
    from fxopt.ir import infer_val
    from fxopt.lowering.openvino_bf16 import OpenVinoBf16

    gm, _ = _bf16_graph()
    first = call_nodes(gm, ops.linear)[0]
    with gm.graph.inserting_after(first):
        doubled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (first, 2.0))
    first.replace_all_uses_with(doubled, delete_user_cb=lambda user: user is not doubled)
    infer_val(doubled)
    gm.recompile()
    assert doubled.meta["val"].dtype == torch.bfloat16
    assert not OpenVinoBf16().applies(gm)
