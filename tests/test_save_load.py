"""fxopt.save / fxopt.load round-trip in a fresh interpreter; what an optimized module refuses."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_transformer, token_ids
from torch import nn

import fxopt


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 16)).eval()


def _load_and_run(path: Path, inputs: Path) -> str:
    """Load ``path`` in a new interpreter and compare it with the outputs saved in ``inputs``."""
    code = textwrap.dedent(f"""
        import torch, fxopt
        opt = fxopt.load({str(path)!r})
        x, expected, other = torch.load({str(inputs)!r})
        got = opt(x)
        assert torch.equal(got, expected), (got - expected).abs().max()
        assert opt(other).shape[0] == other.shape[0]
        print(opt.report.backend, type(opt).__name__, sum(r.applied for r in opt.report.passes))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("backend", "passes"),
    [("eager", ["remove-dropout"]), ("eager", ["remove-dropout", "quantize-int8"]), ("onnx", ["remove-dropout"]),
     ("openvino", ["remove-dropout", "quantize-int8"]), ("inductor", ["remove-dropout"])],
    ids=["eager", "eager-int8", "onnx", "openvino-int8", "inductor"],
)
def test_save_and_load_in_a_fresh_process(tmp_path: Path, backend: str, passes: list[str]) -> None:
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    if backend == "openvino":
        pytest.importorskip("openvino")
    model = _mlp()
    x = torch.randn(4, 32)
    opt = fxopt.compile(model, (x,), passes=passes, backend=backend)
    if "quantize-int8" in passes:
        assert opt.report["quantize-int8"].applied == 2
    path = fxopt.save(opt, tmp_path / "model.fxopt")
    assert [p.name for p in tmp_path.iterdir()] == ["model.fxopt"]  # no partial file left behind
    torch.save((x, opt(x), torch.randn(9, 32)), tmp_path / "inputs.pt")
    applied = sum(r.applied for r in opt.report.passes)
    assert _load_and_run(Path(path), tmp_path / "inputs.pt") == f"{backend} OptimizedModule {applied}"


def test_loaded_transformer_keeps_its_call_and_output_structure(tmp_path: Path) -> None:
    model = tiny_transformer("bert")
    ids = token_ids()
    opt = fxopt.compile(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, passes=["remove-dropout"])
    fxopt.save(opt, tmp_path / "bert.fxopt")
    loaded = fxopt.load(tmp_path / "bert.fxopt")
    mask = torch.ones_like(ids)
    assert type(loaded(input_ids=ids, attention_mask=mask)) is type(opt(input_ids=ids, attention_mask=mask))
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).last_hidden_state,
                               opt(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert str(loaded.report) == str(opt.report)
    with pytest.raises(fxopt.InputError, match="structure"):
        loaded(ids)


def test_torch_save_points_to_fxopt_save_and_leaves_no_file(tmp_path: Path) -> None:
    opt = fxopt.compile(_mlp(), (torch.randn(4, 32),))
    target = tmp_path / "model.pt"
    with pytest.raises(fxopt.FxoptError, match=r"fxopt.save\(opt, path\)") as info:
        torch.save(opt, target)
    assert "\n" not in str(info.value)
    assert not target.exists()


def test_load_refuses_other_files(tmp_path: Path) -> None:
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(fxopt.FxoptError, match="not a file written by fxopt.save"):
        fxopt.load(tmp_path / "other.pt")
    with pytest.raises(fxopt.InputError, match="takes what fxopt.compile returns"):
        fxopt.save(_mlp(), tmp_path / "model.fxopt")


@pytest.mark.parametrize("convert", ["half", "bfloat16", "double", "to-dtype"])
def test_dtype_conversion_is_refused_with_what_to_do(convert: str) -> None:
    model = _mlp()
    x = torch.randn(4, 32)
    opt = fxopt.compile(model, (x,))
    with pytest.raises(fxopt.FxoptError, match=r"compile again with fxopt.compile\(model.to\(torch\."):
        if convert == "to-dtype":
            opt.to(torch.float16)
        else:
            getattr(opt, convert)()
    torch.testing.assert_close(opt(x), model(x))  # nothing was converted


def test_same_device_and_dtype_moves_are_no_ops() -> None:
    model = _mlp()
    x = torch.randn(4, 32)
    opt = fxopt.compile(model, (x,))
    assert opt.to("cpu") is opt and opt.float() is opt and opt.cpu() is opt
    torch.testing.assert_close(opt(x), model(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_move_is_refused() -> None:
    opt = fxopt.compile(_mlp(), (torch.randn(4, 32),))
    with pytest.raises(fxopt.FxoptError, match="device='cuda"):
        opt.cuda()


@pytest.mark.parametrize("backend", ["eager", "onnx", "openvino", "inductor"])
def test_deepcopy_gives_an_independent_working_module(backend: str) -> None:
    import copy

    if backend in ("onnx", "openvino"):
        pytest.importorskip("onnxruntime" if backend == "onnx" else "openvino")
    model = _mlp()
    x = torch.randn(4, 32)
    opt = fxopt.compile(model, (x,), backend=backend)
    twin = copy.deepcopy(opt)
    assert twin.graph_module is not opt.graph_module
    torch.testing.assert_close(twin(x), opt(x))
    assert str(twin.report) == str(opt.report)


class _ConstantIndex(nn.Module):
    """A step that reads only a buffer, like transformers' ``token_type_ids.to(int64)``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 8)
        self.register_buffer("order", torch.randperm(16).int())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[:, self.order.to(device=x.device, dtype=torch.int64)])


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_load_keeps_steps_that_read_only_constants(tmp_path: Path, backend: str) -> None:
    # Loading re-traces the stored graph's code; a step on constants alone must stay a step
    # of the graph: run while tracing, it would fail on the ONNX backend's weightless (meta)
    # constants and fold into a new constant on the eager one.
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _ConstantIndex().eval()
    x = torch.randn(4, 16)
    opt = fxopt.compile(model, (x,), backend=backend)
    loaded = fxopt.load(fxopt.save(opt, tmp_path / "model.fxopt"))
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    other = torch.randn(7, 16)
    torch.testing.assert_close(loaded(other), model(other), rtol=1e-5, atol=1e-6)

    def steps(gm: torch.fx.GraphModule) -> list[str]:
        return sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function")

    assert steps(loaded.graph_module) == steps(opt.graph_module)
