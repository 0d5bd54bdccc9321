"""Backends as plugins, and the optional OpenVINO and Inductor backends.

OpenVINO tests skip where OpenVINO is not installed (``pip install 'fxopt[openvino]'``);
Inductor comes with torch. Models stay tiny: Inductor compiles every graph.
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
from conftest import tiny_transformer, token_ids
from torch import nn

import fxopt
from fxopt.backends import Backend, Lowered, backend_names, get_backend, registered_backend
from fxopt.presets import Candidate, Preset, registered_preset

PER_TENSOR = "quantize-int8(activations='dynamic-tensor')"
OPTIONAL = ["openvino", "inductor"]


def _mlp(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 2 * width), nn.BatchNorm1d(2 * width), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(2 * width, 16))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _needs(backend: str) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max())


def _quiet_compile(*args, **kwargs) -> fxopt.OptimizedModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.compile(*args, **kwargs)


# ---------------------------------------------------------------- the registry


def test_builtin_backends_are_entry_points() -> None:
    names = backend_names()
    assert {"eager", "onnx", "inductor"} <= set(names)
    assert "openvino" in backend_names(installed_only=False)


def test_unknown_backend_is_refused_before_capture() -> None:
    with pytest.raises(fxopt.BackendError, match="unknown backend 'tvm'.*available: .*eager"):
        fxopt.compile(nn.Linear(2, 2).eval(), (torch.randn(2, 2),), backend="tvm")


def test_a_backend_whose_package_is_missing_says_what_to_install() -> None:
    def never(*args):  # pragma: no cover - must not be reached
        raise AssertionError("lowered without its package")

    missing = Backend("needs-missing", never, requires=("fxopt_no_such_module",), extra="missing")
    with registered_backend(missing):
        assert "needs-missing" not in backend_names()
        assert "needs-missing" in backend_names(installed_only=False)
        with pytest.raises(fxopt.BackendError, match=r"fxopt_no_such_module.*pip install 'fxopt\[missing\]'"):
            fxopt.compile(nn.Linear(2, 2).eval(), (torch.randn(2, 2),), backend="needs-missing")
    assert "needs-missing" not in backend_names(installed_only=False)


def test_a_plugin_backend_runs_and_is_saved_by_lowering_again(tmp_path) -> None:
    calls = []

    def lower_plain(gm, signature, inputs, device, report):
        calls.append(device)
        report.notes.append("plain backend")
        return Lowered(gm, lambda *args: gm(*args))

    model, x = _mlp(), torch.randn(4, 32)
    with registered_backend(Backend("plain", lower_plain)):
        opt = fxopt.compile(model, (x,), backend="plain")
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)
        path = fxopt.save(opt, tmp_path / "plain.fxopt")
        loaded = fxopt.load(path)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(calls) == 2  # compiled, then lowered again on load


def test_openvino_refuses_cuda_clearly() -> None:
    pytest.importorskip("openvino")
    with pytest.raises(fxopt.BackendError, match="'openvino' runs on cpu only"):
        get_backend("openvino", "cuda")


def test_preset_drops_a_candidate_whose_backend_is_missing() -> None:
    missing = Backend("needs-missing", lambda *a: None, requires=("fxopt_no_such_module",), extra="missing")
    preset = Preset("test-missing-backend", "eager, or a backend that is not installed",
                    (Candidate(("remove-dropout",), "needs-missing"), Candidate(("remove-dropout",), "eager")))
    with registered_backend(missing), registered_preset(preset):
        opt = _quiet_compile(_mlp(), (torch.randn(4, 32),), preset="test-missing-backend")
    assert opt.report.backend == "eager"
    note = opt.report.notes[-1]
    assert "on needs-missing dropped: backend not available" in note
    assert "pip install 'fxopt[missing]'" in note


# ---------------------------------------------------------------- each optional backend


@pytest.mark.parametrize("backend", OPTIONAL)
def test_lossless_mlp_matches_eager_and_takes_another_batch(backend: str) -> None:
    _needs(backend)
    model, x = _mlp(), torch.randn(8, 32)
    opt = fxopt.compile(model, (x,), backend=backend)
    assert opt.report.backend == backend
    assert _rel(opt(x), model(x)) < 1e-4
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    other = torch.randn(5, 32)
    assert _rel(opt(other), model(other)) < 1e-4
    assert counters["stats"]["unique_graphs"] == graphs  # Inductor: the batch was compiled dynamic
    other = torch.randn(1, 32)
    assert _rel(opt(other), model(other)) < 1e-4
    applied = {r.name for r in opt.report.passes if r.applied}
    assert {"fold-batchnorm", "remove-dropout"} <= applied


@pytest.mark.parametrize("backend", OPTIONAL)
@pytest.mark.parametrize("int8", ["dynamic-tensor", "static"])
def test_int8_mlp_stays_within_the_pass_budget(backend: str, int8: str) -> None:
    _needs(backend)
    model, x = _mlp(), torch.randn(8, 32)
    calibration = [(torch.randn(8, 32),) for _ in range(4)]
    spec = f"quantize-int8(activations='{int8}', force=True)"
    opt = _quiet_compile(model, (x,), passes=["remove-dropout", "fold-batchnorm", spec], backend=backend,
                         calibration=calibration)
    record = next(r for r in opt.report.passes if r.name == "quantize-int8")
    assert record.applied == 2
    assert _rel(opt(x), model(x)) < 0.05
    other = torch.randn(3, 32)
    assert _rel(opt(other), model(other)) < 0.05


def test_openvino_runs_int8_kernels_and_lossless_in_f32() -> None:
    pytest.importorskip("openvino")
    # 256 wide: at the example's static shapes OpenVINO runs a narrower MLP as one fused f32 subgraph
    model, x = _mlp(256), torch.randn(8, 256)
    calibration = [(torch.randn(8, 256),) for _ in range(4)]
    lossless = fxopt.compile(model, (x,), backend="openvino")
    # the CPU plugin would pick bf16 by itself on CPUs that have it
    assert lossless._runner.config["INFERENCE_PRECISION_HINT"] == "f32"
    assert lossless._runner.precision() in ("f32", "float32")
    assert lossless._runner.config["INFERENCE_NUM_THREADS"] == torch.get_num_threads()
    assert lossless._runner.config.get("DYNAMIC_QUANTIZATION_GROUP_SIZE", 0) == 0
    assert _int8_layers(lossless) == 0
    for spec in ("quantize-int8(activations='static', force=True)", "quantize-int8(force=True)", PER_TENSOR):
        opt = _quiet_compile(model, (x,), passes=["fold-batchnorm", spec], backend="openvino",
                             calibration=calibration)
        assert _int8_layers(opt) == 2, spec


def _int8_layers(opt: fxopt.OptimizedModule) -> int:
    """FullyConnected layers OpenVINO runs as int8 GEMMs: int8 activations in (static QDQ),
    or int8 weights with activations it quantizes at run time (dynamic quantization on)."""
    runner = opt._runner
    dynamic = runner.config.get("DYNAMIC_QUANTIZATION_GROUP_SIZE", 0) > 0
    count = 0
    for op in runner.compiled.get_runtime_model().get_ordered_ops():
        if op.get_rt_info()["layerType"].astype(str) != "FullyConnected":
            continue
        types = [op.input(i).get_element_type().get_type_name() for i in range(2)]
        if types[0] in ("i8", "u8") or (dynamic and types[1] == "i8"):
            count += 1
    return count


@pytest.mark.slow
@pytest.mark.parametrize("backend", OPTIONAL)
def test_bert_lossless_and_int8(backend: str) -> None:
    _needs(backend)
    model = tiny_transformer("bert")
    ids = token_ids(4, 8)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = model(**inputs).last_hidden_state
    opt = fxopt.compile(model, inputs, backend=backend)
    assert _rel(opt(**inputs).last_hidden_state, expected) < 1e-4
    other = token_ids(2, 8)
    assert _rel(opt(input_ids=other, attention_mask=torch.ones_like(other)).last_hidden_state,
                model(input_ids=other, attention_mask=torch.ones_like(other)).last_hidden_state) < 1e-4
    if backend == "inductor":
        return  # one Inductor compile of BERT is enough for CI; the MLP covers its int8 graphs
    int8 = _quiet_compile(model, inputs, passes=["remove-dropout", PER_TENSOR], backend=backend)
    assert next(r for r in int8.report.passes if r.name == "quantize-int8").applied > 0
    assert _rel(int8(**inputs).last_hidden_state, expected) < 0.05


@pytest.mark.parametrize("backend", OPTIONAL)
def test_save_and_load(backend: str, tmp_path) -> None:
    _needs(backend)
    model, x = _mlp(), torch.randn(8, 32)
    opt = _quiet_compile(model, (x,), passes=["remove-dropout", "fold-batchnorm",
                                              "quantize-int8(force=True)"], backend=backend)
    loaded = fxopt.load(fxopt.save(opt, tmp_path / f"{backend}.fxopt"))
    assert loaded.report.backend == backend
    torch.testing.assert_close(loaded(x), opt(x), rtol=1e-5, atol=1e-6)
    other = torch.randn(3, 32)
    torch.testing.assert_close(loaded(other), opt(other), rtol=1e-5, atol=1e-6)
    if backend == "openvino":  # the loaded module runs the graph specialized to the example's shapes too
        assert loaded._runner.static_shapes == opt._runner.static_shapes == {"input": (8, 32)}


def test_openvino_runs_the_dynamic_graph_where_the_specialized_one_disagrees(monkeypatch) -> None:
    pytest.importorskip("openvino")
    from fxopt.backends.openvino import OpenVinoRunner

    run = OpenVinoRunner.run

    def specialized_off_by_one(self, inputs, general=False):
        outputs = run(self, inputs, general)
        specialized = self.static_shapes is not None and not general and tuple(inputs[0].shape) == (8, 32)
        return [out + 1.0 for out in outputs] if specialized else outputs

    monkeypatch.setattr(OpenVinoRunner, "run", specialized_off_by_one)
    model, x = _mlp(), torch.randn(8, 32)
    opt = _quiet_compile(model, (x,), passes=["remove-dropout", "fold-batchnorm"], backend="openvino")
    assert opt._runner.static_shapes is None
    assert any("disagreed with the graph" in note and "the dynamic graph runs every shape" in note
               for note in opt.report.notes)
    assert _rel(opt(x), model(x)) < 1e-4


def test_openvino_runs_a_bf16_graph_without_casts_specialized_to_the_example_shapes() -> None:
    pytest.importorskip("openvino")
    import onnx

    model, x = _mlp(), torch.randn(8, 32)
    opt = _quiet_compile(model, (x,), passes=["fold-batchnorm", "cast-bf16(budget=0.5)"], backend="openvino")
    assert next(r for r in opt.report.passes if r.name == "cast-bf16").applied == 2
    runner = opt._runner
    assert runner.config["INFERENCE_PRECISION_HINT"] == "bf16"
    exported = onnx.load(str(runner.exported.path), load_external_data=False)
    # the casts around the Linears are gone; the weights hold their bf16-rounded values in float32
    assert not [n for n in exported.graph.node if n.op_type == "Cast"]
    assert {init.data_type for init in exported.graph.initializer} == {onnx.TensorProto.FLOAT}
    weight = next(onnx.numpy_helper.to_array(init) for init in exported.graph.initializer
                  if init.dims == [64, 32] or list(init.dims) == [32, 64])
    assert torch.equal(torch.from_numpy(weight.copy()).bfloat16().float(), torch.from_numpy(weight.copy()))
    assert any("bfloat16 casts left to OpenVINO" in note for note in opt.report.notes)
    assert runner.static_shapes == {"input": (8, 32)} and not runner.general_compiled()
    assert _rel(opt(x), model(x)) < 0.03
    other = torch.randn(3, 32)  # another batch size: the dynamic graph, compiled on this call
    assert _rel(opt(other), model(other)) < 0.03
    assert runner.general_compiled()


@pytest.mark.parametrize("backend", OPTIONAL)
def test_through_torch_compile(backend: str) -> None:
    _needs(backend)
    from fxopt.frontends.dynamo import CompileLog

    model, x = _mlp(), torch.randn(8, 32)
    log = CompileLog()
    compiled = torch.compile(model, backend="fxopt", options={"backend": backend, "log": log,
                                                              "passes": ["fold-batchnorm"]})
    assert _rel(compiled(x), model(x)) < 1e-4
    assert [r.backend for r in log.reports] == [backend]
    assert all(record.fallback is None for record in log.records)


def test_cli_optimize_with_an_optional_backend(tmp_path) -> None:
    from fxopt.cli import main

    source = tmp_path / "mlp.py"
    source.write_text("import torch\n\ndef build():\n"
                      "    return torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU()).eval()\n")
    report = tmp_path / "report.json"
    assert main(["optimize", f"{source}:build", "--input-shape", "4,32", "--backend", "inductor",
                 "--report-json", str(report)]) == 0
    assert json.loads(report.read_text())["backend"] == "inductor"
    assert main(["optimize", f"{source}:build", "--input-shape", "4,32", "--backend", "tvm"]) == 1


# ---------------------------------------------------------------- fxopt bench rows


def test_bench_rows_for_the_optional_backends() -> None:
    import fxopt_bench as bench

    model, x = _mlp(), torch.randn(8, 32)
    systems = ["fxopt-inductor", "fxopt-openvino", "fxopt-int8-openvino", "fxopt-int8-pt-openvino"]
    config = bench.BenchConfig(systems=["eager", *systems], repeats=1, warmup=0)
    rows = {r.system: r for r in bench.run_model("mlp", model, (x,), config, lambda m: None)}
    assert rows["fxopt-inductor"].status == "ok" and rows["fxopt-inductor"].max_rel_err < 1e-4
    for name in systems[1:]:
        if importlib.util.find_spec("openvino") is None:
            assert rows[name].status == "skipped" and "openvino not installed" in rows[name].note
            continue
        assert rows[name].status == "ok", rows[name].note
        assert rows[name].max_rel_err < (1e-4 if name == "fxopt-openvino" else 0.05)


def test_torch_compile_refuses_an_unknown_backend_option() -> None:
    compiled = torch.compile(_mlp(), backend="fxopt", options={"backend": "tvm"})
    with pytest.raises(Exception, match="unknown backend 'tvm'"):
        compiled(torch.randn(4, 32))


@pytest.mark.cuda
def test_inductor_on_cuda() -> None:
    model, x = _mlp().cuda(), torch.randn(8, 32, device="cuda")
    opt = _quiet_compile(model, (x,), passes=["remove-dropout", "fold-batchnorm", "quantize-int8(force=True)"],
                         backend="inductor", device="cuda")
    assert opt(x).device.type == "cuda"
    assert _rel(opt(x), model(x)) < 0.05
    other = torch.randn(3, 32, device="cuda")
    assert _rel(opt(other), model(other)) < 0.05


def test_openvino_reports_its_own_error_against_the_model() -> None:
    pytest.importorskip("openvino")
    model, x = _mlp(), torch.randn(8, 32)
    passes = ["remove-dropout", "fold-batchnorm", PER_TENSOR]
    eager = _quiet_compile(model, (x,), passes=passes)
    openvino = _quiet_compile(model, (x,), passes=passes, backend="openvino")
    # OpenVINO quantizes with run-time scales of its own: its error is measured, not the graph's
    assert openvino.report.final_max_rel_err != eager.report.final_max_rel_err
    assert any(n.startswith("OpenVINO's outputs against the model's") for n in openvino.report.notes)
    with torch.no_grad():
        assert _rel(openvino(x), model(x)) <= openvino.report.final_max_rel_err + 1e-6


def test_openvino_int8_lowering_leaves_dynamic_activations_to_openvino() -> None:
    from fxopt.ir.qdq import has_qdq_linear, qops
    from fxopt.lowering import get_lowering, lower_graph

    captured = {}

    def keep(gm, signature, inputs, device, report):
        captured["gm"] = gm
        return Lowered(gm, lambda *args: gm(*args))

    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    with registered_backend(Backend("keep", keep)):
        _quiet_compile(model, (torch.randn(8, 48),), passes=["quantize-int8(force=True)"], backend="keep")
    gm = captured["gm"]
    lowering = get_lowering("openvino-int8")
    assert lowering.backends == ("openvino",)
    assert lower_graph(gm, "eager", torch.device("cpu"), "graph").applied != [lowering]
    lowered = lower_graph(gm, "openvino", torch.device("cpu"))
    assert lowered.applied == [lowering] and lowered.parity_rtol() == 0.05
    graph = lowered.graph_module
    assert not has_qdq_linear(graph) and has_qdq_linear(gm)  # the captured graph is untouched
    targets = {node.target for node in graph.graph.nodes}
    assert qops.dequantize_per_channel in targets and qops.quantize_per_token not in targets
    assert lowering.runtime_config(graph) == {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 16}  # gcd(48, 64)


# ---------------------------------------------------------------- OpenVINO's preferred graph form


class _Siblings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x).relu(), self.k(x), self.v(x) * 2], dim=-1)


def _graph_after_passes(model: nn.Module, inputs: tuple, passes: list, **options) -> torch.fx.GraphModule:
    captured = {}

    def keep(gm, signature, inputs, device, report):
        captured["gm"] = gm
        return Lowered(gm, lambda *args: gm(*args))

    with registered_backend(Backend("keep", keep)):
        _quiet_compile(model, inputs, passes=passes, backend="keep", **options)
    return captured["gm"]


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_openvino_splits_a_packed_linear_back_into_one_per_piece(int8: bool) -> None:
    from fxopt.ir import ops
    from fxopt.lowering import get_lowering, lower_graph
    from fxopt.verify import compare_outputs, run_graph

    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    passes = ["merge-siblings"] + (["quantize-int8(activations='static', budget=1.0)"] if int8 else [])
    gm = _graph_after_passes(_Siblings().eval(), (x,), passes, calibration=[(torch.randn(4, 8, 32),)])
    linears = lambda g: sum(n.target == ops.linear for n in g.graph.nodes)  # noqa: E731
    assert linears(gm) == 1  # merged by merge-siblings
    lowered = lower_graph(gm, "openvino", torch.device("cpu"))
    assert get_lowering("openvino-split-linear") in lowered.applied
    graph = lowered.graph_module
    assert linears(graph) == 3
    assert not any(n.target == ops.split_with_sizes for n in graph.graph.nodes)
    assert linears(gm) == 1  # the graph it was given is unchanged
    # each output channel comes from the same row of weights, scales and bias: the same values
    comparison = compare_outputs(run_graph(gm, [x]), run_graph(graph, [x]))
    assert comparison.max_rel <= 1e-6


def test_openvino_leaves_a_split_it_cannot_take_apart() -> None:
    from fxopt.lowering import get_lowering, lower_graph

    class SplitRows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> tuple:
            return self.fc(x).split([1, 3], dim=0)  # rows, not output channels

    gm = _graph_after_passes(SplitRows().eval(), (torch.randn(4, 32),), [])
    assert get_lowering("openvino-split-linear") not in lower_graph(gm, "openvino", torch.device("cpu")).applied


def test_openvino_int8_attention_runs_as_one_fused_kernel() -> None:
    pytest.importorskip("openvino")
    import onnx

    model = tiny_transformer("bert")
    torch.manual_seed(0)
    ids, mask = token_ids(2, 16), torch.ones(2, 16, dtype=torch.long)
    calibration = [(token_ids(2, 16), torch.ones(2, 16, dtype=torch.long)) for _ in range(2)]
    passes = ["exact", "quantize-int8(activations='static', observer='percentile', budget=0.2)",
              "quantize-attention(budget=0.2)"]
    opt = _quiet_compile(model, (ids, mask), passes=fxopt.presets.expand(passes), backend="openvino",
                         calibration=calibration)
    assert opt.report["quantize-attention"].applied == 2
    runner = opt._runner
    exported = onnx.load(str(runner.exported.path), load_external_data=False)
    assert [n.op_type for n in exported.graph.node].count("Attention") == 2
    layer_types = {op.get_rt_info()["layerType"].astype(str) for op in runner.compiled.get_runtime_model().get_ops()}
    assert "Softmax" not in layer_types  # attention is one fused kernel, not MatMul/Softmax/MatMul
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
        assert _rel(opt(ids, mask)[0], expected) <= opt.report.final_max_rel_err + 1e-6


def test_a_whole_graph_compilers_parity_allows_the_graphs_lowest_precision() -> None:
    """Inductor fuses the code between a bfloat16 graph's roundings (keeping float32 there): its
    parity with the graph is checked at bfloat16's tolerance, not float32's, and the result
    stays within the pass's budget of the model."""
    from fxopt.testing import run_pass
    from fxopt.verify import compiled_tolerance, exact_tolerance

    model, x = _mlp(), torch.randn(8, 32)
    run = run_pass("cast-bf16(budget=0.5)", model, (x,))
    assert compiled_tolerance(run.after, torch.float32) == exact_tolerance(torch.bfloat16)
    captured = run_pass("remove-dropout", model, (x,))
    assert compiled_tolerance(captured.after, torch.float32) == exact_tolerance(torch.float32)
    opt = _quiet_compile(model, (x,), passes=["fold-batchnorm", "cast-bf16(budget=0.05)"], backend="inductor")
    assert next(r for r in opt.report.passes if r.name == "cast-bf16").applied == 2
    assert any("Inductor" in note and "parity" in note for note in opt.report.notes)
    assert _rel(opt(x), model(x)) < 0.05
