"""``fxopt bench`` (the fxopt_bench package) on tiny models: the row schema, the systems,
the JSON/markdown outputs, the spread of every ratio (no speed is asserted)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxopt_bench as bench
from fxopt.cli import main
from fxopt_bench import output, scale
from fxopt_bench.models import fresh_inputs
from fxopt_bench.run import SelectedOutputs, output_names


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


def test_fresh_inputs_are_new_values_of_the_same_kind() -> None:
    ids = torch.randint(3, 50, (4, 16))
    mask = torch.randint(0, 2, (4, 16))
    x = torch.randn(4, 8) * 3 + 5
    fresh_ids, fresh_mask, fresh_x = fresh_inputs((ids, mask, x))
    assert fresh_ids.dtype == ids.dtype and fresh_ids.shape == ids.shape and not torch.equal(fresh_ids, ids)
    assert 3 <= int(fresh_ids.min()) and int(fresh_ids.max()) <= 49
    assert torch.equal(fresh_mask, mask)  # a 0/1 mask keeps its pattern
    assert fresh_x.shape == x.shape and not torch.allclose(fresh_x, x)
    assert abs(float(fresh_x.mean()) - 5) < 1.5 and 1.5 < float(fresh_x.std()) < 4.5


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.body(x))
        return hidden, torch.tanh(self.head(hidden))


def test_errors_are_measured_per_output_and_on_a_fresh_input(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = TwoOutputs().eval(), (torch.randn(6, 8),)

    def remembers_its_inputs(ctx: bench.BenchContext) -> bench.Prepared:
        # Right on the bench inputs, whatever it is given: only a fresh input shows it.
        answer = ctx.model(*ctx.inputs)
        return bench.Prepared(lambda *x: answer, 0.0, None, None)

    monkeypatch.setitem(bench.SYSTEMS, "remembers", bench.System("remembers", "replays its outputs",
                                                                  remembers_its_inputs))
    config = bench.BenchConfig(systems=["eager", "torch.ao-int8", "remembers"], repeats=1, warmup=0)
    rows = {r.system: r for r in bench.run_model("two", model, inputs, config, lambda m: None)}
    eager, ao, replay = rows["eager"], rows["torch.ao-int8"], rows["remembers"]
    assert eager.fresh_rel_err == 0.0 and eager.fresh_output_rel_errs == [0.0, 0.0]
    assert len(ao.output_rel_errs) == len(ao.fresh_output_rel_errs) == 2
    assert ao.max_rel_err == max(ao.output_rel_errs) > 0 and ao.fresh_rel_err == max(ao.fresh_output_rel_errs) > 0
    assert replay.max_rel_err == 0.0 and replay.fresh_rel_err > 0.1
    assert replay.status == "ok" and "fresh input" not in replay.note
    assert eager.output_names is None  # a tuple names nothing
    lines = output.format_output_errors([asdict(r) for r in rows.values()])
    assert lines[0] == "eager / two: output 0 0.0e+00, output 1 0.0e+00" and len(lines) == 3


def test_a_system_that_cannot_take_other_inputs_keeps_its_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def bench_inputs_only(ctx: bench.BenchContext) -> bench.Prepared:
        def run(*inputs: torch.Tensor) -> Any:
            if inputs:
                raise RuntimeError("compiled for the bench inputs only")
            return ctx.model(*ctx.inputs)

        return bench.Prepared(run, 0.0, None, None)

    monkeypatch.setitem(bench.SYSTEMS, "fixed", bench.System("fixed", "bench inputs only", bench_inputs_only))
    model, inputs = TwoOutputs().eval(), (torch.randn(6, 8),)
    config = bench.BenchConfig(systems=["eager", "fixed"], repeats=1, warmup=0)
    fixed = bench.run_model("two", model, inputs, config, lambda m: None)[1]
    assert fixed.status == "ok" and fixed.median_ms > 0 and fixed.max_rel_err == 0.0
    assert fixed.fresh_rel_err is None and "fresh input failed: compiled for the bench inputs only" in fixed.note
    table = bench.format_rows([{"name": "fixed", "ms": 1.0, "speedup": 1.0, "speedup_low": 1.0, "speedup_high": 1.0,
                                "within_noise": True, "max_abs_err": 0.0, "max_rel_err": 0.0, "fresh_rel_err": None}])
    assert table.splitlines()[1].rstrip().endswith("-")


def test_a_model_output_names_the_errors_of_its_outputs() -> None:
    transformers = pytest.importorskip("transformers")
    value = transformers.modeling_outputs.BaseModelOutputWithPooling(
        last_hidden_state=torch.zeros(2, 3, 4), pooler_output=torch.zeros(2, 4))
    assert output_names(value) == ["last_hidden_state", "pooler_output"]
    row = {"system": "s", "model": "bert", "status": "ok", "fresh_output_rel_errs": [0.014, 0.035],
           "output_names": ["last_hidden_state", "pooler_output"]}
    assert output.format_output_errors([row]) == ["s / bert: last_hidden_state 1.4e-02, pooler_output 3.5e-02"]


def test_outputs_serves_the_named_outputs_to_every_system(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    json_path = tmp_path / "bench.json"
    code = main(["bench", "--models", "bert", "--quick", "--systems", "eager,fxopt", "--outputs", "last_hidden_state",
                 "--repeats", "1", "--warmup", "0", "--json", str(json_path)])
    assert code == 0
    data = json.loads(json_path.read_text())
    assert data["outputs"] == ["last_hidden_state"]
    for row in data["rows"]:
        assert row["status"] == "ok" and len(row["fresh_output_rel_errs"]) == 1 and row["fresh_rel_err"] < 1e-4
    assert "outputs served: last_hidden_state" in capsys.readouterr().out


def test_selected_outputs_by_position_and_a_wrong_name_says_what_there_is() -> None:
    model, (x,) = TwoOutputs().eval(), (torch.randn(3, 8),)
    _, head = model(x)
    assert torch.equal(SelectedOutputs(model, ["1"])(x), head)
    assert SelectedOutputs(nn.Linear(8, 2), ["0"])(x).shape == (3, 2)  # the one output, not its first row
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50)
    bert = transformers.BertModel(config).eval()
    with pytest.raises(ValueError, match="no output 'logits'.*last_hidden_state"):
        SelectedOutputs(bert, ["logits"])(torch.randint(0, 50, (1, 4)))


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
    assert "Kernel choices:" in markdown and "- fxopt / mlp: " in markdown and "- eager / mlp" not in markdown
    out = capsys.readouterr()
    assert "speedup" in out.out and "[bench" in out.err


def test_vit_and_t5_run_under_fxopt_and_the_kernel_choices_are_printed(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    json_path = tmp_path / "bench.json"
    # The test run sets FXOPT_MEASURE=0 (conftest): every choice is the default, not measured.
    code = main(["bench", "--models", "vit,t5", "--quick", "--systems", "eager,fxopt",
                 "--repeats", "1", "--warmup", "0", "--json", str(json_path)])
    assert code == 0
    rows = {(r["system"], r["model"]): r for r in json.loads(json_path.read_text())["rows"]}
    assert set(rows) == {(s, m) for s in ("eager", "fxopt") for m in ("vit", "t5")}
    for model in ("vit", "t5"):
        eager, fx = rows["eager", model], rows["fxopt", model]
        assert eager["status"] == fx["status"] == "ok", fx["note"]
        assert fx["max_rel_err"] < 1e-4 and fx["flops"] == eager["flops"] > 0
        assert eager["kernels"] is None  # not an fxopt system: no choices, no line
        assert fx["kernels"] and all(k["source"] == "default" for k in fx["kernels"])
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.split("kernel choices")[1].splitlines()[1:] if " / " in line]
    assert [line.split(":")[0] for line in lines] == ["fxopt / vit", "fxopt / t5"]
    for line, model in zip(lines, ("vit", "t5")):
        choices = rows["fxopt", model]["kernels"]
        assert sum(int(n) for n in re.findall(r"(\d+)x ", line)) == len(choices)  # every site counted once
        assert sum(int(n) for n in re.findall(r"(\d+) default", line)) == len(choices)
        assert f"{choices[0]['op']} " in line


def test_kernel_choices_are_grouped_by_op_and_kernel() -> None:
    choices = [{"op": "onednn-linear", "site": str(i), "chosen": name, "source": "measured", "times": {}}
               for i, name in enumerate(["onednn"] * 3 + ["aten"])]
    choices.append({"op": "whole-graph", "site": "g", "chosen": "lowered", "source": "cache", "times": {}})
    rows = [bench.Row("fxopt", "bert", kernels=choices).__dict__, bench.Row("eager", "bert").__dict__,
            bench.Row("fxopt-onnx", "bert", kernels=[]).__dict__]
    assert output.format_kernels(rows) == [
        "fxopt / bert: onednn-linear 3x onednn, 1x aten; whole-graph 1x lowered (1 cache)",
        "fxopt-onnx / bert: no kernel choices",
    ]


def test_cli_rejects_unknown_names() -> None:
    assert main(["bench", "--systems", "eager,warp-drive"]) == 1
    assert main(["bench", "--models", "resnet"]) == 1
    for name in ("fxopt-int8@0.01", "fxopt-preset-int8@x", "fxopt-preset-int8@2", "fxopt-preset-int8@"):
        assert main(["bench", "--systems", f"eager,{name}"]) == 1, name


def test_a_preset_row_takes_a_budget_in_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxopt_bench import systems

    built: list[dict[str, Any]] = []
    monkeypatch.setattr(systems, "_fxopt", lambda **options: built.append(options) or (lambda ctx: None))
    system = systems.find_system("fxopt-preset-int8@0.014")
    assert system.name == "fxopt-preset-int8@0.014" and "budget=0.014" in system.description
    assert built == [{"preset": "int8", "calibrate": True, "budget": 0.014}]
    systems.find_system("fxopt-preset-bf16@0.02")
    assert built[-1] == {"preset": "bf16", "calibrate": False, "budget": 0.02}
    assert systems.find_system("fxopt-preset-int8") is bench.SYSTEMS["fxopt-preset-int8"]
    with pytest.raises(ValueError, match="fxopt-preset-int8@0.014"):
        bench.compare(nn.Linear(2, 2), torch.randn(1, 2), systems=["eager", "fxopt-int8@0.1"])


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


TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512}


@pytest.mark.parametrize("case", ["ort-quantize-dynamic", "fxopt-int8-weight-only", "fxopt-lossless-checkpoint"])
def test_scale_llama_probe_reports_compile_time_and_peak_over_the_weights(case: str) -> None:
    pytest.importorskip("transformers")
    if case.startswith("ort"):
        pytest.importorskip("onnxruntime")
    try:
        row = scale.llama_probe({"case": case, "shape": TINY_LLAMA, "threads": torch.get_num_threads()})
    finally:
        scale._KEPT.clear()
    params = 512 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 172 + 2 * 64) + 64
    assert row["params"] == params and row["weight_bytes"] == 4 * params
    assert row["compile_s"] > 0 and row["peak_bytes"] >= row["growth_bytes"] > 0
    assert row["peak_over_weights"] == pytest.approx(row["peak_bytes"] / row["weight_bytes"])
    assert row["result"] == ("InferenceSession" if case.startswith("ort") else "OptimizedModule")
    assert row["chose"] is None  # no preset ran
    assert row["weights_from"] == ("memory-mapped checkpoint" if case.endswith("checkpoint") else "memory")
    if Path("/proc/self/status").exists():
        assert 0 < row["anonymous_peak_bytes"] <= row["peak_bytes"]
    failed = {"case": "fxopt-preset-int8", "layers": 22, "failed": "killed by signal 9"}
    table = scale.format_scale_llama([{**row, "case": case}, failed])
    assert "peak / weights" in table and f"{row['peak_over_weights']:.2f}x" in table
    assert "failed: killed by signal 9" in table
    with pytest.raises(ValueError, match="unknown case 'nope'"):
        scale.run_scale_llama(layers=1, cases=["nope"])


def test_the_scale_table_says_which_candidate_a_preset_chose() -> None:
    class Compiled:
        class report:  # noqa: N801 - stands in for an OptimizedModule's report
            notes = ["preset int8: the model's weights (3.85 GiB) exceed ...",
                     "preset int8: chose [exact, quantize-int8(activations='dynamic-tensor')] (exact without "
                     "merge-siblings) on onnx (61 ms, err 0.043, built in 3.9 s); [exact] on eager 70 ms"]

    chose = scale.preset_choice([object(), Compiled()])
    assert chose == "[exact, quantize-int8(activations='dynamic-tensor')] (exact without merge-siblings) on onnx"
    row = {"case": "fxopt-preset-int8", "layers": 2, "weight_bytes": 2**30, "compile_s": 1.0, "peak_bytes": 2**31,
           "peak_over_weights": 2.0, "growth_bytes": 2**30, "anonymous_peak_bytes": 2**31, "result_bytes": 2**29,
           "chose": chose}
    assert scale.format_scale_llama([row]).splitlines()[-1] == f"fxopt-preset-int8 chose {chose}"


def test_tables_show_skipped_rows_with_their_reason() -> None:
    rows = [bench.Row("eager", "m", 1.0, 1.0, 0.0, 0.0, 10, 40).__dict__,
            bench.Row("fxopt-int8", "m", status="skipped", note="pass 'quantize-int8' is not installed").__dict__]
    text = output.format_table(rows)
    assert "skipped: pass 'quantize-int8' is not installed" in text
    assert output.format_table(rows, markdown=True).count("\n") == 3
    assert output.json_safe({"x": float("inf"), "y": [float("nan"), 1.5]}) == {"x": None, "y": [None, 1.5]}


# ---------------------------------------------------------------- spread

def test_a_speedup_carries_the_range_of_the_quartiles() -> None:
    timing = bench.Timing.of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (timing.median, timing.q1, timing.q3, timing.min, timing.max) == (3.0, 2.0, 4.0, 1.0, 5.0)
    clear = bench.speedup(bench.Timing(10.0, 9.0, 11.0, 8.0, 12.0, 5), bench.Timing(5.0, 4.5, 5.5, 4.0, 6.0, 5))
    assert clear.ratio == 2.0 and clear.low == pytest.approx(9 / 5.5) and clear.high == pytest.approx(11 / 4.5)
    assert not clear.within_noise and str(clear) == "2.00x [1.64-2.44]"
    noisy = bench.speedup(bench.Timing(10.0, 8.0, 12.0, 7.0, 13.0, 5), bench.Timing(9.5, 8.0, 11.0, 7.0, 12.0, 5))
    assert noisy.within_noise and str(noisy).endswith(" ~")


def test_the_table_shows_each_ratio_with_its_spread_and_flags_noise() -> None:
    eager = bench.Row("eager", "m", 10.0, 1.0, 0.0, 0.0, 10, 40, speedup_low=0.9, speedup_high=1.1).__dict__
    fast = bench.Row("fast", "m", 5.0, 2.0, 0.0, 0.0, 10, 40, speedup_low=1.8, speedup_high=2.2,
                     within_noise=False).__dict__
    same = bench.Row("same", "m", 9.9, 1.01, 0.0, 0.0, 10, 40, speedup_low=0.95, speedup_high=1.07,
                     within_noise=True).__dict__
    lines = output.format_table([eager, fast, same]).splitlines()
    assert "1.00x " in lines[2] and "[" not in lines[2]  # the baseline against itself: no range
    assert "2.00x [1.80-2.20]" in lines[3] and "~" not in lines[3]
    assert "1.01x [0.95-1.07] ~" in lines[4]


def test_timed_rows_have_a_consistent_spread() -> None:
    model, inputs = tiny()
    rows = bench.run_model("tiny", model, inputs, bench.BenchConfig(systems=["eager", "fxopt"], repeats=3, warmup=0),
                           lambda m: None)
    for row in rows:
        assert row.q1_ms <= row.median_ms <= row.q3_ms
        assert row.speedup_low <= row.speedup_vs_eager <= row.speedup_high
    assert rows[0].within_noise is None and isinstance(rows[1].within_noise, bool)


# ---------------------------------------------------------------- systems as data

PEERS = {"inductor-freezing", "ort-opt", "ort-opt-int8", "openvino", "openvino-bf16", "openvino-nncf-int8",
         "pt2e-x86-int8", "ct2", "ct2-int8"}


def test_systems_are_data_with_one_entry_per_name() -> None:
    from fxopt_bench.systems import SYSTEMS_LIST

    assert len({s.name for s in SYSTEMS_LIST}) == len(SYSTEMS_LIST) == len(bench.SYSTEMS)
    assert PEERS <= set(bench.SYSTEMS)
    for system in SYSTEMS_LIST:
        assert system.description and callable(system.build)


def test_a_system_whose_package_is_missing_is_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(ctx: bench.BenchContext) -> bench.Prepared:
        raise AssertionError("built although its package is missing")

    monkeypatch.setitem(bench.SYSTEMS, "needs-it", bench.System("needs-it", "x", never, ("fxopt_no_such_pkg",)))
    model, inputs = tiny()
    rows = bench.run_model("tiny", model, inputs, bench.BenchConfig(systems=["eager", "needs-it"], repeats=1, warmup=0),
                           lambda m: None)
    assert rows[1].status == "skipped" and rows[1].median_ms is None
    assert "fxopt_no_such_pkg not installed" in rows[1].note and "fxopt[peers]" in rows[1].note


def test_rollbacks_come_from_the_report_records() -> None:
    import fxopt
    from fxopt_bench.systems import pipeline_note

    report = fxopt.Report(passes=[
        fxopt.PassRecord("remove-dropout", True, "applied", matched=2, applied=2),
        fxopt.PassRecord("quantize-int8", False, "rolled back", message="error 0.2 exceeds the pass's budget 0.05"),
    ])
    assert pipeline_note(report, "quantize-int8") == "quantize-int8 rolled back (error 0.2 exceeds the pass's budget 0.05)"
    assert pipeline_note(report, None) == ("remove-dropout x2; quantize-int8 rolled back "
                                           "(error 0.2 exceeds the pass's budget 0.05)")


def test_the_core_does_not_carry_the_benchmark() -> None:
    import importlib.util
    import subprocess
    import sys

    for name in ("fxopt.bench", "fxopt.peers", "fxopt.bench_models", "fxopt.timing"):
        assert importlib.util.find_spec(name) is None, name
    code = "import fxopt, sys; print(sorted(m for m in sys.modules if m.startswith('fxopt_bench')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- the peers, on a tiny BERT

def tiny_bert() -> tuple[nn.Module, tuple[torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    return model, (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)),)


def peer_rows(systems: list[str], model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, bench.Row]:
    config = bench.BenchConfig(systems=["eager", *systems], repeats=1, warmup=0)
    return {r.system: r for r in bench.run_model("tiny-bert", model, inputs, config, lambda m: None)}


def assert_ran(row: bench.Row, max_rel_err: float) -> None:
    assert row.status == "ok", row.note
    assert row.max_rel_err < max_rel_err, (row.system, row.max_rel_err)
    assert row.median_ms > 0 and row.speedup_low <= row.speedup_vs_eager <= row.speedup_high


def test_openvino_f32_bf16_and_nncf_int8() -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    model, inputs = tiny_bert()
    rows = peer_rows(["openvino", "openvino-bf16", "openvino-nncf-int8"], model, inputs)
    assert_ran(rows["openvino"], 1e-5)  # the f32 hint: lossless
    assert_ran(rows["openvino-bf16"], 5e-2)
    assert rows["openvino-bf16"].note.startswith("inference precision ")
    assert_ran(rows["openvino-nncf-int8"], 5e-2)
    assert rows["openvino-nncf-int8"].weight_bytes < rows["openvino"].weight_bytes


def test_ctranslate2_float32_and_int8_on_bert_only() -> None:
    pytest.importorskip("ctranslate2")
    model, inputs = tiny_bert()
    rows = peer_rows(["ct2", "ct2-int8"], model, inputs)
    assert_ran(rows["ct2"], 1e-5)
    assert_ran(rows["ct2-int8"], 5e-2)
    assert rows["ct2-int8"].weight_bytes < rows["ct2"].weight_bytes
    assert model.config.to_dict().get("position_embedding_type") in (None, "absolute")  # config untouched
    mlp_model, mlp_inputs = tiny()
    other = peer_rows(["ct2"], mlp_model, mlp_inputs)["ct2"]
    assert other.status == "skipped" and "BERT" in other.note


def test_ort_transformers_optimizer_then_quantize_dynamic() -> None:
    pytest.importorskip("onnxruntime.transformers.optimizer")
    model, inputs = tiny_bert()
    rows = peer_rows(["ort", "ort-opt", "ort-opt-int8"], model, inputs)
    assert_ran(rows["ort-opt"], 1e-5)
    assert_ran(rows["ort-opt-int8"], 5e-2)
    assert rows["ort-opt-int8"].weight_bytes < rows["ort-opt"].weight_bytes


@pytest.mark.slow
def test_pt2e_x86_int8_and_inductor_freezing() -> None:
    pytest.importorskip("torchao")
    import torch._inductor.config as inductor_config

    model, inputs = tiny_bert()
    rows = peer_rows(["inductor-freezing", "pt2e-x86-int8"], model, inputs)
    assert_ran(rows["inductor-freezing"], 1e-4)
    assert_ran(rows["pt2e-x86-int8"], 5e-2)
    assert inductor_config.freezing is False  # set for the compile only, not left behind


@pytest.mark.slow
def test_inductor_freezing_really_freezes_next_to_a_plain_compile(tmp_path) -> None:
    # Frozen weights are constants of the compiled graph: a later change to the module's
    # weight shows in the plain compile's output and not in the frozen one's. Both compile
    # the same module, whose dynamo cache entry the frozen one must not reuse.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    inputs = (torch.randn(4, 8),)
    ctx = bench.BenchContext("tiny", model, inputs, torch.device("cpu"), tmp_path)
    plain = bench.SYSTEMS["torch.compile"].build(ctx)
    frozen = bench.SYSTEMS["inductor-freezing"].build(ctx)
    with torch.inference_mode():
        before = model(*inputs)
        torch.testing.assert_close(frozen.run(), before)
        model[0].weight.mul_(2.0)
        after = model(*inputs)
        torch.testing.assert_close(plain.run(), after)
        torch.testing.assert_close(frozen.run(), before)
    assert not torch.allclose(before, after)


def test_compile_time_cases_report_their_phases_and_calibrate_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import fxopt
    from fxopt_bench import compile_time

    seen: list[dict] = []
    compile_ = fxopt.compile

    def recording(model, inputs, **options):
        seen.append(options)
        return compile_(model, inputs, **options)

    monkeypatch.setattr(fxopt, "compile", recording)
    threads = torch.get_num_threads()  # run_compile_time sets one thread: restored after
    try:
        rows = compile_time.run_compile_time(["mlp"], ["lossless", "int8-calibrated"], quick=True)
    finally:
        torch.set_num_threads(threads)
    assert [row["case"] for row in rows] == ["lossless", "int8-calibrated"]
    assert all(row["seconds"] > 0 and "capture" in row["timings"] for row in rows)
    assert "pass:quantize-int8" in rows[1]["timings"]
    warm_up, lossless, int8_calibrated = seen  # a tiny model's compile first, for one-time imports
    assert "calibration" not in lossless and len(int8_calibrated["calibration"]) == 1
    with pytest.raises(ValueError, match="unknown case"):
        compile_time.run_compile_time(["mlp"], ["no-such-case"], quick=True)


def test_generate_task_times_prefill_and_decode_and_checks_tokens(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    torch._dynamo.reset()
    json_path = tmp_path / "generate.json"
    code = main(["bench", "--task", "generate", "--quick", "--systems", "eager,fxopt", "--repeats", "1",
                 "--warmup", "0", "--json", str(json_path)])
    torch._dynamo.reset()
    assert code == 0
    data = json.loads(json_path.read_text())
    rows = {row["system"]: row for row in data["generate"]}
    assert list(rows) == ["eager", "fxopt"]
    for row in rows.values():
        assert row["status"] == "ok", row["note"]
        assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] is not None
        assert row["generate_low"] <= row["generate_vs_eager"] <= row["generate_high"]
    assert rows["eager"]["identical"] and rows["eager"]["top1_agreement"] == 1.0
    # lossless: the same tokens as eager, every graph optimized (no "unoptimized" note)
    assert rows["fxopt"]["identical"] and rows["fxopt"]["top1_agreement"] == 1.0
    assert rows["fxopt"]["note"] == "" and 2 <= rows["fxopt"]["graphs"] <= 4
    # the lossless graph's frozen tensors: the parameters plus the rotary embedding's buffer
    assert 0 <= rows["fxopt"]["weight_bytes"] - rows["eager"]["weight_bytes"] < 0.01 * rows["eager"]["weight_bytes"]
    out = capsys.readouterr().out
    assert "decode ms/tok" in out and "fxopt" in out


def test_generate_task_reports_a_failing_system_as_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    from fxopt_bench import generate

    monkeypatch.setitem(generate.GENERATE_SYSTEMS, "inductor", {"backend": "no-such-backend"})
    torch._dynamo.reset()
    rows = generate.run_generate(quick=True, systems=["eager", "inductor"], repeats=1, warmup=0)
    torch._dynamo.reset()
    assert rows[0].status == "ok" and rows[0].prefill_ms is not None
    assert rows[1].status == "failed" and "no-such-backend" in rows[1].note
    assert main(["bench", "--task", "generate", "--systems", "eager,warp-drive"]) == 2
    assert main(["bench", "--task", "generate", "--markdown", "out.md"]) == 2


def _generate_rows(systems: list[str]) -> dict[str, Any]:
    from fxopt_bench import generate

    rows = generate.run_generate(quick=True, systems=["eager", *systems], repeats=1, warmup=0)
    return {row.system: row for row in rows}


@pytest.mark.parametrize("packages, lossless, quantized", [
    (["ctranslate2"], "ct2-generate", "ct2-int8-generate"),
    (["onnxruntime_genai"], "ort-genai-generate", "ort-genai-int4-generate"),
    (["openvino", "nncf"], "openvino-generate", "openvino-int8-generate"),
], ids=["ctranslate2", "onnxruntime-genai", "openvino"])
def test_generate_task_runs_a_converted_peer(packages: list[str], lossless: str, quantized: str) -> None:
    pytest.importorskip("transformers")
    for package in packages:
        pytest.importorskip(package)
    rows = _generate_rows([lossless, quantized])
    for name in (lossless, quantized):
        row = rows[name]
        assert row.status == "ok", row.note
        assert row.prefill_ms > 0 and row.decode_ms_per_token is not None and row.weight_bytes > 0
    # float32: eager's tokens, and eager's top-1 at every teacher-forced position
    assert rows[lossless].identical and rows[lossless].top1_agreement == 1.0
    # the quantized conversion stores int8/int4 Linears: well under the float32 file
    assert rows[quantized].weight_bytes < 0.8 * rows[lossless].weight_bytes
    assert 0.0 <= rows[quantized].top1_agreement <= 1.0


def test_generate_task_shows_the_peers_that_cannot_run_with_their_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    from fxopt_bench import generate, generate_peers

    monkeypatch.setattr(generate_peers, "_installed", lambda module: False)  # as if no peer were installed
    rows = _generate_rows(["llama-cpp-generate", "ct2-generate", "openvino-int8-generate"])
    assert rows["eager"].status == "ok"
    assert rows["llama-cpp-generate"].status == "skipped" and "GGUF" in rows["llama-cpp-generate"].note
    assert rows["ct2-generate"].status == "skipped" and "pip install ctranslate2" in rows["ct2-generate"].note
    assert rows["openvino-int8-generate"].status == "skipped" and "pip install openvino" in rows["openvino-int8-generate"].note
    table = generate.format_generate(list(rows.values()))
    assert re.search(r"llama-cpp-generate +skipped: llama-cpp-python has no binary wheel", table)
