from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from fxopt.cli import main


def test_passes_lists_each_pass_with_kind_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold-batchnorm" in out and "exact" in out and "Fold inference BatchNorm" in out


def test_demo_runs_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--batch", "8", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "outputs match" in out and "speedup" in out and "fold-batchnorm" in out
    speedup_line = next(line for line in out.splitlines() if line.startswith("latency"))
    assert "IQR" in speedup_line and "x [" in speedup_line  # every ratio with its spread


def test_demo_judges_a_lossy_pass_against_its_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--passes", "quantize-int8", "--batch", "8", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if line.startswith("outputs"))
    assert verdict.startswith("outputs within budget") and "quantize-int8" in verdict and "DIFFER" not in out


def test_optimize_a_model_file(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "mymodel.py"
    source.write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Dropout(0.1), torch.nn.ReLU()).eval()
    """))
    report = tmp_path / "report.json"
    code = main(["optimize", f"{source}:build", "--input-shape", "4,16", "--passes", "remove-dropout",
                 "--report-json", str(report)])
    assert code == 0
    assert "remove-dropout" in capsys.readouterr().out
    assert '"applied": 1' in report.read_text()


def test_optimize_with_a_memory_bound_races_the_eager_candidates_only(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "mymodel.py"
    source.write_text("import torch\nmodel = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval()\n")
    assert main(["optimize", f"{source}:model", "--input-shape", "4,16", "--preset", "lossless",
                 "--memory-bound", "0"]) == 0
    out = capsys.readouterr().out
    assert "chose [exact] on eager" in out and "on onnx dropped: its backend would hold a copy" in out


def test_optimize_a_model_built_from_a_safetensors_checkpoint(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    import onnxruntime as ort
    from safetensors.torch import save_model

    source = tmp_path / "mymodel.py"
    source.write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Dropout(0.1), torch.nn.ReLU()).eval()
        model = build()
    """))
    torch.manual_seed(0)
    trained = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Dropout(0.1), torch.nn.ReLU())
    save_model(trained, str(tmp_path / "model.safetensors"))
    onnx_path = tmp_path / "model.onnx"
    code = main(["optimize", f"{source}:build", "--checkpoint", str(tmp_path), "--input-shape", "4,16",
                 "--passes", "remove-dropout", "--onnx", str(onnx_path)])
    assert code == 0 and "remove-dropout" in capsys.readouterr().out
    x = torch.randn(4, 16)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, trained.eval()(x).detach().numpy(), rtol=1e-5, atol=1e-5)  # its weights
    assert main(["optimize", f"{source}:model", "--checkpoint", str(tmp_path), "--input-shape", "4,16"]) == 1
    assert "--checkpoint needs" in capsys.readouterr().err


def test_errors_are_one_line_without_traceback(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optimize", f"{tmp_path}/missing.py:build", "--input-shape", "4,16"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err and "Traceback" not in err
    assert main(["optimize", "x.py", "--input-shape", "a,b"]) == 1
    assert "FILE.py:ATTR" in capsys.readouterr().err


def test_console_script_help() -> None:
    result = subprocess.run([sys.executable, "-m", "fxopt.cli", "optimize", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--input-shape" in result.stdout
