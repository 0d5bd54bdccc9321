"""``fxopt bench`` (the fxopt_bench package) on tiny models: the row schema, the systems,
the JSON/markdown outputs, the spread of every ratio (no speed is asserted)."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
from torch import nn

import fxopt_bench as bench
from fxopt.cli import main
from fxopt_bench import output, scale


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny() -> tuple[nn.Module, tuple[torch.Tensor]]:
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4))
    return model.eval(), (torch.randn(4, 8),)


def test_rows_have_the_schema_and_errors_against_eager() -> None:
    model, inputs = tiny()
    config = bench.BenchConfig(systems=["eager", "fxopt", "torch.ao-int8", "fxopt-lowrank"], repeats=2, warmup=1)
    messages: list[str] = []
    rows = bench.run_model("tiny", model, inputs, config, messages.append)
    assert [r.system for r in rows] == config.systems
    assert tuple(f.name for f in fields(bench.Row)) == bench.ROW_FIELDS
    by_system = {r.system: r for r in rows}
    eager = by_system["eager"]
    assert eager.status == "ok" and eager.speedup_vs_eager == pytest.approx(1.0) and eager.max_rel_err == 0.0
    assert eager.params == sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    fx_row = by_system["fxopt"]
    assert fx_row.status == "ok" and fx_row.median_ms > 0 and fx_row.compile_s > 0
    assert fx_row.max_rel_err < 1e-4
    assert fx_row.params < eager.params  # BatchNorm folded away
    assert "fold-batchnorm" in fx_row.note
    ao = by_system["torch.ao-int8"]
    assert ao.status == "ok" and ao.weight_bytes < eager.weight_bytes and 0 < ao.max_rel_err < 0.1
    lowrank = by_system["fxopt-lowrank"]
    assert lowrank.status in ("ok", "skipped")
    if lowrank.status == "skipped":
        assert lowrank.note == "pass 'low-rank' is not installed" and lowrank.median_ms is None
    assert any("timing" in m for m in messages) and any("preparing fxopt" in m for m in messages)


def test_a_failing_system_becomes_a_row_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: bench.BenchContext) -> bench.Prepared:
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(bench.SYSTEMS, "broken", bench.System("broken", "always fails", broken))
    model, inputs = tiny()
    rows = bench.run_model("tiny", model, inputs, bench.BenchConfig(systems=["eager", "broken"], repeats=1, warmup=0),
                           lambda m: None)
    assert rows[1].status == "failed" and "kernel exploded" in rows[1].note
    assert rows[0].status == "ok"


def test_cli_writes_json_and_markdown(tmp_path, capsys) -> None:
    json_path, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    code = main(["bench", "--models", "mlp", "--quick", "--systems", "eager,fxopt,fxopt-int8",
                 "--repeats", "1", "--warmup", "1", "--json", str(json_path), "--markdown", str(md_path)])
    assert code == 0
    data = json.loads(json_path.read_text())
    assert set(data) == {"machine", "rows", "scale"}
    assert {"cpu", "torch", "onnxruntime", "torch_threads", "logical_cpus"} <= set(data["machine"])
    assert [r["system"] for r in data["rows"]] == ["eager", "fxopt", "fxopt-int8"]
    for row in data["rows"]:
        assert set(row) == set(bench.ROW_FIELDS)
        assert row["model"] == "mlp"
    # the quick MLP's three Linears: 2 * batch * (in * out) summed, the same for every system
    flops = {row["system"]: row["flops"] for row in data["rows"]}
    assert flops["eager"] == flops["fxopt"] == flops["fxopt-int8"] > 0
    markdown = md_path.read_text()
    assert "| system | model | median ms |" in markdown and "| fxopt | mlp |" in markdown
    assert "fxopt bench" in markdown  # the command that reproduces it
    out = capsys.readouterr()
    assert "speedup" in out.out and "[bench" in out.err


def test_cli_rejects_unknown_names() -> None:
    assert main(["bench", "--systems", "eager,warp-drive"]) == 1
    assert main(["bench", "--models", "resnet"]) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_a_gpu_says_so(capsys) -> None:
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_scale_probe_reports_time_per_node_and_peak_memory() -> None:
    row = scale.probe({"depth": 3, "width": 4})
    assert row["layers"] == 3 and row["nodes"] > 3 * 4
    assert row["us_per_node"] == pytest.approx(row["pass_manager_s"] / row["nodes"] * 1e6)
    assert row["peak_mb"] >= 0 and row["weight_bytes"] > 0
    assert set(row["per_pass_s"]) == {t.name for t in __import__("fxopt").list_passes() if t.exact}


def test_tables_show_skipped_rows_with_their_reason() -> None:
    rows = [bench.Row("eager", "m", 1.0, 1.0, 0.0, 0.0, 10, 40).__dict__,
            bench.Row("fxopt-int8", "m", status="skipped", note="pass 'quantize-int8' is not installed").__dict__]
    text = output.format_table(rows)
    assert "skipped: pass 'quantize-int8' is not installed" in text
    assert output.format_table(rows, markdown=True).count("\n") == 3
    assert output.json_safe({"x": float("inf"), "y": [float("nan"), 1.5]}) == {"x": None, "y": [None, 1.5]}
