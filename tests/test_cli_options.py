from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from fxopt.cli import main

MODEL = """
import torch
class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)
    def forward(self, x, *, scale):
        return self.fc(x) * scale
def build():
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Dropout(0.1), torch.nn.ReLU()).eval()
def build_wide():
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
def build_kw():
    return Scaled().eval()
"""


@pytest.fixture
def model_file(tmp_path):
    source = tmp_path / "mymodel.py"
    source.write_text(textwrap.dedent(MODEL))
    return source


def test_version_names_fxopt_and_torch(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("fxopt ") and f"torch {torch.__version__}" in out


def test_debug_is_accepted_after_the_subcommand(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optimize", f"{tmp_path}/missing.py:build", "--input-shape", "4,16", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["optimize", f"{tmp_path}/missing.py:build", "--input-shape", "4,16"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_inputs_from_a_pt_file(model_file, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "inputs.pt"
    torch.save((torch.randn(4, 16),), inputs)
    report = tmp_path / "report.json"
    assert main(["optimize", f"{model_file}:build", "--inputs", str(inputs), "--passes", "remove-dropout",
                 "--report-json", str(report)]) == 0
    assert '"applied": 1' in report.read_text()


def test_keyword_inputs_from_an_npz_file(model_file, tmp_path) -> None:
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, np.random.randn(4, 16).astype(np.float32), scale=np.float32(2.0) * np.ones(1, np.float32))
    assert main(["optimize", f"{model_file}:build_kw", "--inputs", str(inputs)]) == 0


def test_calibration_from_files_reaches_lossy_passes(model_file, tmp_path, capsys) -> None:
    batches = tmp_path / "calib.pt"
    torch.save([(torch.randn(32, 64),) for _ in range(3)], batches)
    stacked = tmp_path / "calib.npz"
    np.savez(stacked, np.random.randn(3, 32, 64).astype(np.float32))
    for path in (batches, stacked):
        report = tmp_path / f"report-{path.suffix[1:]}.json"
        assert main(["optimize", f"{model_file}:build_wide", "--input-shape", "32,64", "--calibration",
                     str(path), "--passes", "quantize-int8", "--report-json", str(report)]) == 0
        data = json.loads(report.read_text())
        assert not any("no calibration data" in note for note in data["notes"])
        assert data["passes"][0]["applied"] == 2
    # keyword inputs, examples and calibration alike: Sequential.forward(input)
    example, by_name = tmp_path / "example-named.npz", tmp_path / "calib-named.npz"
    np.savez(example, input=np.random.randn(32, 64).astype(np.float32))
    np.savez(by_name, input=np.random.randn(3, 32, 64).astype(np.float32))
    assert main(["optimize", f"{model_file}:build_wide", "--inputs", str(example), "--calibration",
                 str(by_name), "--passes", "quantize-int8", "--report-json", str(report)]) == 0
    assert not any("no calibration data" in note for note in json.loads(report.read_text())["notes"])
    assert main(["optimize", f"{model_file}:build_wide", "--input-shape", "32,64", "--passes",
                 "quantize-int8", "--report-json", str(report)]) == 0
    assert any("no calibration data" in note for note in json.loads(report.read_text())["notes"])


def test_inputs_and_shapes_are_exclusive(model_file, tmp_path, capsys) -> None:
    assert main(["optimize", f"{model_file}:build"]) == 1
    assert "--input-shape" in capsys.readouterr().err


def test_optimize_with_a_preset(model_file, tmp_path, capsys) -> None:
    report = tmp_path / "report.json"
    assert main(["optimize", f"{model_file}:build_wide", "--input-shape", "32,64", "--preset", "lossless",
                 "--backend", "eager", "--report-json", str(report)]) == 0
    notes = json.loads(report.read_text())["notes"]
    assert any(note.startswith("preset lossless: chose [exact] on eager") for note in notes)


def test_dynamic_sequence_dim_from_the_command_line() -> None:
    import fxopt
    from fxopt.cli import cli_dynamic_shapes

    class PerToken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, 8)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.fc(tokens)

    model, x = PerToken().eval(), torch.randn(2, 5, 16)
    spec = cli_dynamic_shapes(model, [x], {}, static=False, dynamic=["tokens:1"])
    opt = fxopt.compile(model, (x,), dynamic_shapes=spec)
    longer = torch.randn(3, 9, 16)  # another batch and another sequence length
    with torch.no_grad():
        torch.testing.assert_close(opt(longer), model(longer))
    assert cli_dynamic_shapes(model, [x], {}, static=True, dynamic=[]) == "static"
    static = fxopt.compile(model, (x,), dynamic_shapes="static")
    with pytest.raises(fxopt.InputError):
        static(torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match="no input 'x'"):
        cli_dynamic_shapes(model, [x], {}, static=False, dynamic=["x:1"])
    with pytest.raises(ValueError, match="contradict"):
        cli_dynamic_shapes(model, [x], {}, static=True, dynamic=["0:1"])
