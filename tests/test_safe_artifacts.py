"""Nothing fxopt reads runs code from the file: saved models, CLI data files, the search log.

Each reader is handed a payload that would create a marker file when unpickled or built;
the marker must never appear and the error must name the problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_transformer, token_ids
from safetensors.torch import load as load_safetensors
from torch import nn

import fxopt
from fxopt.cli import main
from fxopt.saving.graph import decode_graph, encode_graph
from fxopt.saving.values import UnsafeFileError


class _Payload:
    """Unpickling this creates ``marker``: what a malicious file would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 16)).eval()


def _saved(tmp_path: Path, backend: str = "eager", passes: list[str] | None = None) -> tuple[Path, Any, torch.Tensor]:
    x = torch.randn(4, 32)
    opt = fxopt.compile(_mlp(), (x,), passes=passes or ["remove-dropout"], backend=backend)
    return Path(fxopt.save(opt, tmp_path / f"{backend}.fxopt")), opt, x


def _rewrite(path: Path, name: str, change: Any) -> None:
    """Replace member ``name`` of the archive with ``change(its JSON)``, the rest as it was."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    members[name] = json.dumps(change(json.loads(members[name]))).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)


# ---------------------------------------------------------------- the model file


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-save-zip", "legacy-pickle"])
def test_a_pickle_never_runs_and_the_error_says_how_to_convert(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "model.fxopt"
    torch.save({"format": "fxopt.OptimizedModule", "payload": _Payload(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(fxopt.FxoptError, match=r"it is a pickle.*fxopt\.save\(fxopt\.load\(path, allow_pickle=True\), path\)") as info:
        fxopt.load(path)
    assert "unpickling runs any code" in str(info.value)
    with pytest.raises(fxopt.FxoptError, match="is not a file written by fxopt.save"):
        fxopt.saving.inspect(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.exists()


def test_an_earlier_pickled_file_converts_with_allow_pickle(tmp_path: Path) -> None:
    """The earlier format (a torch.save of the module's parts) loads only when allowed, and
    saves again as a data-only file that loads without it."""
    from fxopt.ir import copy_graph_module
    from fxopt.saving import ConstantsAsAttributes

    x = torch.randn(4, 32)
    opt = fxopt.compile(_mlp(), (x,), passes=["remove-dropout", "quantize-int8"])
    graph_module = copy_graph_module(opt.graph_module)
    graph_module.meta = {}
    graph_module._tracer_cls = ConstantsAsAttributes
    old = tmp_path / "old.fxopt"
    torch.save({"format": "fxopt.OptimizedModule", "version": 1, "torch_version": torch.__version__,
                "backend": "eager", "device": "cpu", "graph_module": graph_module, "signature": opt.signature,
                "report": opt.report, "onnx": None, "backend_state": None}, old)
    with pytest.raises(fxopt.FxoptError, match="allow_pickle=True"):
        fxopt.load(old)
    trusted = fxopt.load(old, allow_pickle=True)
    assert torch.equal(trusted(x), opt(x))
    converted = fxopt.load(fxopt.save(trusted, old))
    assert zipfile.ZipFile(old).namelist()[0] == "fxopt.json"
    assert torch.equal(converted(x), opt(x))


def test_the_file_is_data_only(tmp_path: Path) -> None:
    path, opt, x = _saved(tmp_path, passes=["remove-dropout", "quantize-int8(activations='dynamic')"])
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert not any(name.endswith(".pkl") for name in names)
        graph = json.loads(archive.read("graph.json"))
        constants = archive.read("constants.safetensors")
    assert {"fxopt.json", "graph.json", "signature.json", "report.json", "constants.safetensors"} <= set(names)
    targets = [n["target"] for n in graph["nodes"] if n["op"] == "call_function"]
    assert {"op": "fxopt::int8_linear.default"} in targets and {"op": "aten::gelu.default"} in targets
    stored = load_safetensors(constants)  # any safetensors reader opens the member
    int8 = [name for name, t in stored.items() if t.dtype == torch.int8]
    assert len(int8) == 2
    torch.testing.assert_close(stored[int8[0]], getattr(opt.graph_module, int8[0]))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_constants_are_memory_mapped_from_the_file(tmp_path: Path) -> None:
    from fxopt.saving.archive import Archive

    path, opt, _ = _saved(tmp_path)
    with Archive(path) as archive:
        tensors = archive.read_constants()
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(address, 16) for address in line.split()[0].split("-"))
            regions.append((start, end))
    assert tensors and regions
    for name, tensor in tensors.items():
        assert any(start <= tensor.data_ptr() < end for start, end in regions), name  # mapped, not copied
        assert tensor.data_ptr() % tensor.element_size() == 0
        torch.testing.assert_close(tensor, getattr(opt.graph_module, name))


INJECTED = "__import__('os').system('touch {marker}')"


@pytest.mark.parametrize("attack", ["function", "namespace", "file-op", "type", "get-attr", "placeholder",
                                    "keyword", "onnx-file-name"])
def test_a_crafted_file_is_refused_and_runs_nothing(tmp_path: Path, attack: str) -> None:
    backend = "onnx" if attack == "onnx-file-name" else "eager"
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    path, _, _ = _saved(tmp_path, backend)
    marker = tmp_path / "marker"
    injected = INJECTED.format(marker=marker)

    def first(graph: dict[str, Any], op: str) -> dict[str, Any]:
        return next(n for n in graph["nodes"] if n["op"] == op)

    def change(graph: dict[str, Any]) -> dict[str, Any]:
        node = first(graph, "call_function")
        if attack == "function":
            node["target"] = {"function": "os.system"}
            node["args"] = {"__tuple__": [f"touch {marker}"]}
        elif attack == "namespace":
            node["target"] = {"op": "evil::system.default"}
        elif attack == "file-op":
            node["target"] = {"op": "aten::from_file.default"}
            node["args"] = {"__tuple__": [str(marker), True, 4]}
        elif attack == "get-attr":
            attribute = first(graph, "get_attr")
            old, new = attribute["target"], f'p")+{injected}+("'
            attribute["target"] = new
            graph["constants"][new] = graph["constants"].pop(old)
        elif attack == "placeholder":
            first(graph, "placeholder")["target"] = f"x={injected}"
        elif attack == "keyword":
            node["kwargs"] = {f"approximate={injected}, x": "none"}
        return graph

    expected = {"function": "Python function 'os.system'", "namespace": "evil::system.default is not from torch",
                "file-op": "aten::from_file.default reads or writes files", "type": "subprocess.Popen",
                "get-attr": "not a plain Python identifier", "placeholder": "not a plain Python identifier",
                "keyword": "not a plain Python identifier", "onnx-file-name": "not a plain file name"}[attack]
    if attack == "type":
        _rewrite(path, "report.json", lambda report: {**report, "__dataclass__": "subprocess:Popen",
                                                        "fields": {"args": f"touch {marker}"}})
    elif attack == "onnx-file-name":
        def rename(state: dict[str, Any]) -> dict[str, Any]:
            files = state["files"]
            files["../escaped.onnx"] = files.pop(next(iter(files)))
            return state

        _rewrite(path, "backend.json", rename)
    else:
        _rewrite(path, "graph.json", change)
    with pytest.raises(UnsafeFileError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        fxopt.load(path)
    assert not marker.exists()
    assert not (tmp_path.parent / "escaped.onnx").exists()


def test_any_op_of_the_fxopt_namespace_loads(tmp_path: Path) -> None:
    """A custom op added to ``torch.ops.fxopt`` later round-trips with no change to saving."""
    name = "fxopt::saving_test_scale"
    if not hasattr(torch.ops.fxopt, "saving_test_scale"):
        @torch.library.custom_op(name, mutates_args=())
        def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
            return x * factor

        scale.register_fake(lambda x, factor: torch.empty_like(x))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    weight = graph.get_attr("weight")
    y = graph.call_function(torch.ops.fxopt.saving_test_scale.default, (graph.call_function(
        torch.ops.aten.mm.default, (x, weight)), 2.5))
    graph.output((y,))
    gm = torch.fx.GraphModule({"weight": torch.randn(3, 5)}, graph)
    tensors: dict[str, torch.Tensor] = {}
    data = json.loads(json.dumps(encode_graph(gm, tensors)))
    rebuilt = decode_graph(data, tensors, torch.device("cpu"))
    inputs = torch.randn(2, 3)
    torch.testing.assert_close(rebuilt(inputs), gm(inputs))
    assert [n.target for n in rebuilt.graph.nodes] == [n.target for n in gm.graph.nodes]


def _round_trip(op: Any) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output((graph.call_function(op, (x, graph.get_attr("weight"), None)),))
    gm = torch.fx.GraphModule({"weight": torch.randn(4, 3)}, graph)
    tensors: dict[str, torch.Tensor] = {}
    return decode_graph(json.loads(json.dumps(encode_graph(gm, tensors))), tensors, torch.device("cpu"))


def test_a_registered_plugins_ops_load_and_others_are_refused(tmp_path: Path, monkeypatch) -> None:
    """A plugin's namespace (named after its package) is trusted once the plugin is installed;
    an op of any other namespace is refused even when it is registered in the process."""
    from conftest import PLUGIN_DIR, plugin_metadata

    import fxopt.saving.trust as trust

    if not hasattr(torch.ops, "saving_untrusted") or not hasattr(torch.ops.saving_untrusted, "linear"):
        @torch.library.custom_op("saving_untrusted::linear", mutates_args=())
        def untrusted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return torch.nn.functional.linear(x, weight, bias)

    with pytest.raises(fxopt.FxoptError, match="saving_untrusted::linear.default is not from torch, fxopt or a "
                                               "registered plugin"):
        _round_trip(torch.ops.saving_untrusted.linear.default)
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.syspath_prepend(str(plugin_metadata(tmp_path)))
    assert "fxopt_double_relu" in trust.plugin_packages()
    from fxopt_double_relu.lowering import linear_relu_op

    rebuilt = _round_trip(linear_relu_op)
    assert [n.target for n in rebuilt.graph.nodes if n.op == "call_function"] == [linear_relu_op]
    x = torch.randn(2, 3)
    torch.testing.assert_close(rebuilt(x)[0], torch.relu(x @ rebuilt.weight.T))


def test_a_transformers_model_loads_in_a_fresh_process(tmp_path: Path) -> None:
    """The output type (a transformers ModelOutput) is found in transformers' own modeling
    module: no pickle, and nothing but that module is imported to find it."""
    model = tiny_transformer("bert")
    ids = token_ids()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    opt = fxopt.compile(model, inputs, passes=["remove-dropout"])
    path = fxopt.save(opt, tmp_path / "bert.fxopt")
    torch.save((inputs, opt(**inputs).last_hidden_state), tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch, fxopt
        loaded = fxopt.load({path!r})
        inputs, expected = torch.load({str(tmp_path / 'io.pt')!r})
        out = loaded(**inputs)
        assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions", type(out)
        assert torch.equal(out.last_hidden_state, expected)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# ---------------------------------------------------------------- the search log


def test_a_crafted_search_log_is_refused(tmp_path: Path) -> None:
    """A tuned model's search log (fxopt.tune.log.TuneLog) is read as data: a candidate that
    names a type outside fxopt is refused and nothing is built."""
    from fxopt.tune.log import TuneLog

    x = torch.randn(4, 32)
    opt = fxopt.compile(_mlp(), (x,), passes=["remove-dropout"])
    opt.report.search = TuneLog("accuracy", 0.01, "eager", ["int8"])
    opt.report.search.add("baseline", {}, milliseconds=1.0, kept=True, reason="the reference")
    path = Path(fxopt.save(opt, tmp_path / "tuned.fxopt"))
    loaded = fxopt.load(path)
    assert loaded.report.search == opt.report.search  # the log round-trips as data
    marker = tmp_path / "marker"

    def poison(report: dict[str, Any]) -> dict[str, Any]:
        candidate = report["fields"]["search"]["fields"]["candidates"][0]
        candidate["__dataclass__"] = "os:system"
        candidate["fields"] = {"command": f"touch {marker}"}
        return report

    _rewrite(path, "report.json", poison)
    with pytest.raises(UnsafeFileError, match="os.system, which is not a type of fxopt"):
        fxopt.load(path)
    assert not marker.exists()


# ---------------------------------------------------------------- the CLI's data files


MODEL = """
import torch
def build():
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval()
"""


@pytest.mark.parametrize("option", ["--inputs", "--calibration", "--data"])
def test_a_pickled_cli_data_file_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str) -> None:
    (tmp_path / "net.py").write_text(textwrap.dedent(MODEL))
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save([(torch.randn(4, 16), _Payload(marker))], evil)
    good = tmp_path / "x.pt"
    torch.save((torch.randn(4, 16),), good)
    target = f"{tmp_path / 'net.py'}:build"
    if option == "--data":
        argv = ["tune", target, "--inputs", str(good), "--data", str(evil), "--max-drop", "0.1"]
    elif option == "--calibration":
        argv = ["optimize", target, "--inputs", str(good), "--calibration", str(evil)]
    else:
        argv = ["optimize", target, "--inputs", str(evil)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "evil.pt: holds Python objects other than tensors" in error and "never unpickles" in error
    assert "exec" in error  # names what the file asked for
    assert not marker.exists()


def test_an_npz_with_object_arrays_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "net.py").write_text(textwrap.dedent(MODEL))
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.npz"
    objects = np.empty(1, dtype=object)
    objects[0] = _Payload(marker)
    np.savez(evil, arr_0=np.random.randn(4, 16).astype(np.float32), arr_1=objects)
    assert main(["optimize", f"{tmp_path / 'net.py'}:build", "--inputs", str(evil)]) == 1
    assert "evil.npz: holds object arrays (pickled Python objects)" in capsys.readouterr().err
    assert not marker.exists()


def test_inspect_prints_what_a_file_holds_without_loading_it(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path, opt, _ = _saved(tmp_path, passes=["remove-dropout", "quantize-int8(activations='dynamic')"])
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "backend: eager on cpu" in out
    assert "passes: remove-dropout (applied, 1 applied), quantize-int8 (applied, 2 applied)" in out
    weight_bytes = 64 * 32 + 16 * 64 + (64 + 16) * 4 * 2  # int8 weights, f32 scales and biases
    assert f"constants: 6 tensors, {weight_bytes / 1e6:.3g} MB" in out
    assert "fxopt::int8_linear.default x2" in out and str(opt.report).splitlines()[1] in out
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "eager" and info["constant_bytes"] == weight_bytes
    assert info["report"]["passes"][1]["applied"] == 2
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
    assert main(["inspect", str(tmp_path / "other.pt")]) == 1
    assert "it is a pickle" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_module_loads_on_cuda(tmp_path: Path) -> None:
    x = torch.randn(4, 32, device="cuda")
    opt = fxopt.compile(_mlp(), (x,), passes=["remove-dropout", "quantize-int8"], device="cuda")
    loaded = fxopt.load(fxopt.save(opt, tmp_path / "cuda.fxopt"))
    assert all(t.device.type == "cuda" for t in loaded.graph_module.buffers())
    torch.testing.assert_close(loaded(x), opt(x))
