"""ONNX export (fxopt.export_onnx) and the ONNX Runtime backend (backend="onnx")."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

import fxopt
from fxopt.backends import onnx as onnx_backend
from fxopt.ir import count_ops, ops
from fxopt.testing import assert_outputs_close


class GeluMLP(torch.nn.Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x), approximate=self.approximate))


def _ort_outputs(path: str, **feeds: torch.Tensor) -> list[torch.Tensor]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {k: v.numpy() for k, v in feeds.items()})]


def test_export_plain_model_keeps_gelu_one_node_and_matches_ort(tmp_path):
    torch.manual_seed(0)
    model = GeluMLP("tanh").eval()
    x = torch.randn(3, 8)
    path, report = fxopt.export_onnx(model, (x,), tmp_path / "mlp.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 20
    gelus = [n for n in proto.graph.node if n.op_type == "Gelu"]
    assert len(gelus) == 1
    assert [a.s for a in gelus[0].attribute if a.name == "approximate"] == [b"tanh"]
    assert [i.name for i in proto.graph.input] == ["x"]
    with torch.no_grad():
        assert_outputs_close(_ort_outputs(path, x=x), [model(x)])
    assert any("ONNX Runtime parity" in note for note in report.notes)


def test_export_optimized_module_and_refuse_passes_for_it(tmp_path):
    torch.manual_seed(0)
    model = GeluMLP().eval()
    x = torch.randn(2, 8)
    opt = fxopt.compile(model, (x,), passes=["remove-dropout"])
    path, report = fxopt.export_onnx(opt, (x,), tmp_path / "opt.onnx")
    assert report is opt.report
    with torch.no_grad():
        assert_outputs_close(_ort_outputs(path, x=x), [model(x)])
    with pytest.raises(fxopt.InputError, match="already optimized"):
        fxopt.export_onnx(opt, (x,), tmp_path / "again.onnx", passes=["remove-dropout"])


def test_export_keeps_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = GeluMLP().eval()
    path, _ = fxopt.export_onnx(model, (torch.randn(3, 8),), tmp_path / "dyn.onnx",
                                dynamic_shapes=({0: Dim("batch")},))
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 8
    x = torch.randn(7, 8)
    with torch.no_grad():
        assert_outputs_close(_ort_outputs(path, x=x), [model(x)])


def test_low_opset_is_noted(tmp_path):
    model = GeluMLP().eval()
    path, report = fxopt.export_onnx(model, (torch.randn(2, 8),), tmp_path / "o18.onnx", opset=18)
    assert not any(n.op_type == "Gelu" for n in onnx.load(path).graph.node)
    assert any("below opset 20" in note for note in report.notes)


def test_onnx_backend_runs_in_onnx_runtime_with_torch_tensors():
    torch.manual_seed(0)
    model = GeluMLP().eval()
    opt = fxopt.compile(model, (torch.randn(3, 8),), backend="onnx", dynamic_shapes=({0: Dim("batch")},))
    assert opt.report.backend == "onnx"
    note = next(n for n in opt.report.notes if n.startswith("ONNX Runtime"))
    assert "on CPUExecutionProvider" in note
    assert opt._runner.session.get_providers()[0] == "CPUExecutionProvider"
    for batch in (1, 2, 7):
        x = torch.randn(batch, 8)
        y = opt(x)
        assert isinstance(y, torch.Tensor)
        with torch.no_grad():
            assert_outputs_close([y], [model(x)])


def test_session_options_do_not_spin():
    options = onnx_backend.session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


@torch.library.custom_op("fxopt_test::times_two", mutates_args=())
def times_two(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@times_two.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class UsesCustomOp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxopt_test.times_two(self.fc(x))


def test_custom_op_needs_and_uses_a_registered_translation(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = UsesCustomOp().eval()
    x = torch.randn(2, 4)
    with pytest.raises(fxopt.BackendError, match="register_onnx_translation"):
        fxopt.export_onnx(model, (x,), tmp_path / "missing.onnx")

    from onnxscript import opset20 as op

    def times_two_onnx(x):
        return op.Add(x, x)

    monkeypatch.setattr(onnx_backend, "_TRANSLATIONS", {})
    onnx_backend.register_onnx_translation(torch.ops.fxopt_test.times_two.default, times_two_onnx)
    path, _ = fxopt.export_onnx(model, (x,), tmp_path / "custom.onnx")
    assert "Add" in [n.op_type for n in onnx.load(path).graph.node]
    with torch.no_grad():
        assert_outputs_close(_ort_outputs(path, x=x), [model(x)])


@pytest.mark.cuda
def test_onnx_backend_on_cuda():
    torch.manual_seed(0)
    model = GeluMLP().eval().cuda()
    x = torch.randn(4, 8, device="cuda")
    opt = fxopt.compile(model, (x,), backend="onnx", device="cuda")
    y = opt(x)
    assert y.device.type == "cuda"
    with torch.no_grad():
        assert_outputs_close([y], [model(x)])
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert "on CUDAExecutionProvider" in " ".join(opt.report.notes)
    else:
        assert any("no CUDAExecutionProvider" in n for n in opt.report.notes)


def reachable_tensor_bytes(root: object) -> int:
    """Bytes of the real tensor storages reachable from ``root`` through object references
    (modules, functions and classes are not followed: they lead to global state)."""
    import gc
    import types

    from torch._subclasses.fake_tensor import is_fake

    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor) and not obj.is_meta and not is_fake(obj):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(gc.get_referents(obj))
    return sum(storages.values())


def test_onnx_backend_module_leaves_the_weights_to_onnx_runtime():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(4, 512)
    opt = fxopt.compile(model, (x,), backend="onnx")
    # the session holds the only copy; the module keeps the graph without weight storage
    assert reachable_tensor_bytes(opt) < weight_bytes / 20
    assert count_ops(opt.graph_module, ops.linear) == 2
    constants = list(opt.graph_module.buffers())
    assert all(t.is_meta for t in constants) and (1024, 512) in [tuple(t.shape) for t in constants]
    with torch.no_grad():
        assert_outputs_close([opt(x)], [model(x)])
    with pytest.raises(fxopt.InputError, match="ONNX Runtime, which owns its weights"):
        fxopt.export_onnx(opt, (x,), "unused.onnx")


def _reachable(root: object, kind: type) -> list[object]:
    """The objects of type ``kind`` reachable from ``root`` (as :func:`reachable_tensor_bytes` walks)."""
    import gc
    import types

    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)
    seen: set[int] = set()
    found, stack = [], [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, kind):
            found.append(obj)
        stack.extend(gc.get_referents(obj))
    return found


class _KeepWeakrefs(fxopt.PassInstrument):
    """Weak references to the graph's constants after each pass: the tensors export reads."""

    def __init__(self) -> None:
        self.refs: list[Any] = []

    def after_pass(self, pass_: Any, gm: torch.fx.GraphModule, step: Any) -> None:
        self.refs = [weakref.ref(t) for t in [*gm.parameters(), *gm.buffers()]]


class _GatedMLP(torch.nn.Module):
    """Two bias-free sibling Linears on a 3-d input (as in a Llama MLP): merge-siblings makes
    their weights one new tensor, which the exporter transposes and folds into another, so the
    merged weight leaves the ONNX graph's initializers but not its bookkeeping."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(256, 512, bias=False)
        self.up = torch.nn.Linear(256, 512, bias=False)
        self.down = torch.nn.Linear(512, 256, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def test_onnx_backend_holds_one_copy_of_the_weights_in_the_session(tmp_path):
    torch.manual_seed(0)
    model = _GatedMLP().eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    user_storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    x = torch.randn(2, 4, 256)
    kept = _KeepWeakrefs()
    opt = fxopt.compile(model, (x,), passes=["merge-siblings"], backend="onnx", instruments=[kept])
    assert opt.report["merge-siblings"].applied == 1
    import gc

    gc.collect()
    # the merged weight is a new tensor that only the exported graph needed: it is gone
    folded = [ref for ref in kept.refs if ref() is None or ref().untyped_storage().data_ptr() not in user_storages]
    assert folded and all(ref() is None for ref in folded)
    # no ONNX model in memory besides the session's: neither a ModelProto nor the exporter's IR
    import onnx_ir

    assert not _reachable(opt, onnx.ModelProto) and not _reachable(opt, onnx_ir.Model)
    assert reachable_tensor_bytes(opt) < weight_bytes / 20
    # the session read its weights from an external data file, not from a protobuf in memory
    files = list(Path(opt._runner.files.name).iterdir())
    data = sum(f.stat().st_size for f in files if f.suffix == ".data")
    proto = next(f for f in files if f.suffix == ".onnx")
    assert data >= weight_bytes * 0.9 and proto.stat().st_size < weight_bytes / 20
    with torch.no_grad():
        assert_outputs_close([opt(x)], [model(x)])
    # saved and loaded like any ONNX Runtime module: the external data file travels with it
    fxopt.save(opt, tmp_path / "model.fxopt")
    loaded = fxopt.load(tmp_path / "model.fxopt")
    with torch.no_grad():
        assert_outputs_close([loaded(x)], [model(x)])


class ReturnsNonTensors(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.fc(x), "past": None, "layers": 2, "hidden": x.relu()}


def test_onnx_backend_passes_non_tensor_outputs_through(tmp_path):
    torch.manual_seed(0)
    model, x = ReturnsNonTensors().eval(), torch.randn(3, 8)
    opt = fxopt.compile(model, (x,), backend="onnx")
    out = opt(x)
    with torch.no_grad():
        expected = model(x)
    assert list(out) == ["logits", "past", "layers", "hidden"]
    assert out["past"] is None and out["layers"] == 2
    assert_outputs_close([out["logits"], out["hidden"]], [expected["logits"], expected["hidden"]])
    path, _ = fxopt.export_onnx(model, (x,), tmp_path / "dict.onnx")
    assert [o.name for o in onnx.load(path).graph.output] == ["logits", "hidden"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_onnx_backend_on_cuda_without_cuda_says_what_to_install_before_exporting(monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("the export ran before the device was checked")

    monkeypatch.setattr(onnx_backend, "export_graph", no_export, raising=False)
    with pytest.raises(fxopt.BackendError, match="CUDA build of PyTorch") as raised:
        fxopt.compile(GeluMLP().eval(), (torch.randn(2, 8),), backend="onnx", device="cuda")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "onnxruntime-gpu" in str(raised.value)


def test_export_failure_names_the_untranslated_op_in_plain_text(tmp_path):
    with pytest.raises(fxopt.BackendError) as raised:
        fxopt.export_onnx(UsesCustomOp().eval(), (torch.randn(2, 4),), tmp_path / "missing.onnx")
    message = str(raised.value)
    assert "no ONNX translation for fxopt_test::times_two" in message
    assert "\x1b" not in message


def test_drop_weights_empties_the_copy_it_is_given_and_never_the_graph_it_was_copied_from():
    from fxopt.ir import copy_graph_module

    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 4))

    root = torch.nn.Module()
    root.inner = Inner()
    root.register_buffer("scale", torch.randn(4))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("inner.weight")
    s = graph.get_attr("scale")
    graph.output(graph.call_function(torch.mul, (graph.call_function(torch.matmul, (x, w)), s)))
    original = torch.fx.GraphModule(root, graph)
    copy = copy_graph_module(original)
    onnx_backend.drop_weights(copy)
    assert copy.inner.weight.is_meta and copy.scale.is_meta and copy.inner.weight.shape == (4, 4)
    assert not original.inner.weight.is_meta and not original.scale.is_meta  # shared submodule untouched
    x = torch.randn(2, 4)
    assert torch.equal(original(x), (x @ original.inner.weight) * original.scale)


def test_export_failure_names_the_node_whose_translation_raised(monkeypatch):
    """When the exporter names the node it failed on, that op is the cause, not an op the
    exporter's library happens to lack elsewhere in the graph."""
    summary = ("<class 'TypeError'>: '>' not supported between instances of 'int' and 'SymbolicDim'\n"
               "<class 'torch.onnx._internal.exporter._errors.ConversionError'>: Error when translating node "
               "%sdpa : [num_users=1] = call_function[target=torch.ops.aten.scaled_dot_product_attention.default]"
               "(args = (%q, %k, %v), kwargs = {enable_gqa: True}).\n")
    monkeypatch.setattr(onnx_backend, "_untranslated_ops", lambda gm, translations: ["aten::to.dtype"])
    message = onnx_backend._export_failure(RuntimeError(summary), None, {})
    assert message.startswith("ONNX export failed translating aten.scaled_dot_product_attention.default "
                              "(TypeError: '>' not supported"), message
    assert "to.dtype" not in message
