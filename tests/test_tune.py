"""fxopt.tune: the metric is kept on the data, the log has every candidate and why, bad input is
refused, and a lossy pass given a task-metric budget refuses what the metric cannot afford.

No test asserts a speedup: latency on a shared machine is noise; docs/tune.md has the numbers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import fxopt
from fxopt.capture import capture
from fxopt.errors import InputError
from fxopt.ir import copy_graph_module
from fxopt.lossy import BudgetedSearch, Site
from fxopt.lossy.task import TaskBudget, task_budget
from fxopt.pass_api import PassContext

FEATURES, HIDDEN, CLASSES = 32, 128, 4


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.BatchNorm1d(HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def _dataset(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, FEATURES, generator=generator)
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(123))
    return x, (x @ teacher).argmax(-1)


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    model = _model()
    x, y = _dataset(2048, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for batch in torch.randperm(len(x), generator=torch.Generator().manual_seed(2)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    x_val, y_val = _dataset(512, seed=3)  # never trained on
    return model, list(zip(x_val.split(128), y_val.split(128))), x[:32]


@pytest.fixture(scope="module")
def tuned(trained):
    model, data, example = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fxopt.tune(model, (example,), data=data, metric="accuracy", max_drop=0.02, time_budget_s=120,
                     repeats=3, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "tune changed the model"
    return opt


def _accuracy(run, data) -> float:
    with torch.no_grad():
        hits = sum(int((run(x).argmax(-1) == y).sum()) for x, y in data)
    return hits / sum(len(y) for _, y in data)


def test_the_tuned_model_keeps_the_metric_within_max_drop(trained, tuned) -> None:
    model, data, _ = trained
    baseline = _accuracy(model, data)
    assert baseline > 0.8  # the model learned the task: the metric means something
    drop = baseline - _accuracy(tuned, data)
    assert drop <= 0.02 + 1e-9
    log = tuned.report.search
    assert math.isclose(log.baseline_metric, baseline, abs_tol=1e-6)
    assert math.isclose(log.final_drop, drop, abs_tol=1e-6)  # the log reports what the module does


def test_holdout_keeps_the_metric_on_every_batch(trained) -> None:
    model, data, example = trained
    opt = fxopt.tune(model, (example,), data=data, metric="top1-agreement", max_drop=0.01, techniques="low-rank",
                     holdout=True, confirm=False, time_budget_s=60, repeats=3, progress=False)
    with torch.no_grad():
        agree = sum(int((opt(x).argmax(-1) == model(x).argmax(-1)).sum()) for x, _ in data)
    assert 1 - agree / sum(len(y) for _, y in data) <= 0.01 + 1e-9


def test_the_log_has_every_candidate_with_its_measurements_and_reason(tuned) -> None:
    log = tuned.report.search
    phases = [c.phase for c in log.candidates]
    assert phases[0] == "baseline" and phases[-1] == "final"
    singles = [c for c in log.candidates if c.phase == "single"]
    assert not log.stopped
    # every option (technique x level) on every site it applies to was measured alone, once
    assert len(singles) == log.options > 0
    assert len({tuple(c.choices.items()) for c in singles}) == len(singles)
    measured = {option.split("(")[0] for c in singles for option in c.choices.values()}
    assert measured == {t.name for t in fxopt.tune.list_techniques()}
    for candidate in log.candidates:
        assert candidate.reason, f"{candidate.name} has no reason"
        assert candidate.drop is None or math.isfinite(candidate.drop)
    for single in singles:
        # judged by the 95% upper bound of the drop, shown next to the point estimate
        assert single.bound is not None and single.bound >= single.drop
        if single.judged_drop > 0.02:
            assert not single.kept and "max_drop" in single.reason and single.speedup is None
            assert "95% bound" in single.reason
        else:
            assert single.speedup is not None and single.speedup > 0 and single.milliseconds > 0
            assert single.kept == (single.speedup >= 1.05), single
    if any(single.kept for single in singles):  # timing decides, so on a noisy machine none may be
        assert any(c.phase == "combined" for c in log.candidates)
    else:
        assert "the model is unchanged" in " ".join(log.notes)
    assert log.pareto and sum(row.chosen for row in log.pareto) == 1
    assert "Pareto front" in str(tuned.report) and "search log" in str(tuned.report)
    json.dumps(tuned.report.to_dict(), default=str)  # the report stays machine-readable


def test_the_chosen_model_is_what_the_log_says(trained, tuned) -> None:
    chosen = tuned.report.search.chosen
    graph = tuned.graph_module.graph
    if any(option.startswith("int8") for option in chosen.values()):
        assert "int8" in str(graph)
    if any(option.startswith("low-rank") for option in chosen.values()):
        assert "lowrank" in str(graph)


@pytest.mark.parametrize(("options", "message"), [
    ({"metric": "f1-macro"}, "unknown metric"),
    ({"max_drop": -0.01}, "max_drop must be"),
    ({"max_drop": float("nan")}, "max_drop must be"),
    ({"data": []}, "data is empty"),
    ({"data": lambda: iter(())}, "data is empty"),
    ({"data": [torch.randn(4, FEATURES)]}, "not an (inputs, labels) pair"),
    ({"techniques": ["sparsify"]}, "unknown technique"),
    ({"time_budget_s": 0}, "time_budget_s"),
])
def test_bad_input_is_refused_before_any_work(options, message) -> None:
    x, y = _dataset(16, seed=5)
    arguments = {"data": [(x, y)], "metric": "accuracy", "max_drop": 0.01, **options}
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fxopt.tune(_model().eval(), (x,), progress=False, **arguments)


def _captured(model: torch.nn.Module, example: torch.Tensor):
    gm = capture(model, (example,), {})
    return gm, gm.meta["fxopt_signature"]


def test_a_lossy_pass_with_a_task_budget_refuses_what_the_metric_cannot_afford(trained) -> None:
    model, data, example = trained
    gm, signature = _captured(model, example)
    low_rank = fxopt.get_pass("low-rank", budget=0.9, ratio=0.1, multiple=4, min_params=0)

    without = low_rank(copy_graph_module(gm), PassContext(batches=[[example]]))
    assert without.applied >= 1  # the output-error budget alone lets it factor

    with pytest.warns(UserWarning, match="no number of examples is enough for a max_drop of 0"):
        task = task_budget(gm, signature, data, "top1-agreement", 0.0)
    assert task.baseline == 1.0
    result = low_rank(copy_graph_module(gm), PassContext(batches=[[example]], task=task))
    assert result.applied < without.applied
    refused = [s for s in result.skipped if s.code == "over-budget"]
    assert refused, result.skipped


def test_compile_takes_a_task_budget_for_its_lossy_passes(trained) -> None:
    model, data, example = trained
    passes = ["remove-dropout", "fold-batchnorm", "low-rank(budget=0.9, ratio=0.1, multiple=4, min_params=0)"]
    loose = fxopt.compile(model, (example,), passes)
    with pytest.warns(UserWarning, match="no number of examples"):
        strict = fxopt.compile(model, (example,), passes, metric="top1-agreement", data=data, max_drop=0.0)
    assert loose.report["low-rank"].applied > strict.report["low-rank"].applied
    assert "over-budget" in strict.report["low-rank"].skipped
    with torch.no_grad():
        for x, _ in data:
            assert torch.equal(strict(x).argmax(-1), model(x).argmax(-1))
    with pytest.raises(InputError, match="together"):
        fxopt.compile(model, (example,), passes, metric="accuracy")


def test_budgeted_search_bounds_the_metric_drop_alone() -> None:
    """output_error=False: the budget is max_drop, in the metric's units, and each trial's drop is logged."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    x = torch.randn(64, 8)
    gm, signature = _captured(model, x)
    labels = model(x).argmax(-1)

    task = TaskBudget([[x]], [labels], lambda out, y: float((out.argmax(-1) == y).float().mean()), 0.1)
    task.set_reference(gm)
    ctx = PassContext(batches=[[x]], task=task)
    search = BudgetedSearch(gm, ctx, [Site("w", ("keep",))], lambda g, c: g, 0.1, output_error=False)
    outcome = search.run()
    assert outcome.choices == {"w": "keep"} and outcome.drop == 0.0
    assert [s for s in outcome.log if s["event"] == "trial"][0]["drop"] == 0.0
    with pytest.raises(ValueError, match="task budget"):
        BudgetedSearch(gm, PassContext(batches=[[x]]), [], lambda g, c: g, 0.1, output_error=False)


def test_cli_tune_prints_the_table_and_plots_it(tmp_path, trained, capsys, monkeypatch) -> None:
    import textwrap

    from fxopt.cli import main

    model, data, example = trained
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "net.py").write_text(textwrap.dedent(f"""
        import torch, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_tune import _model
        def build():
            model = _model()
            model.load_state_dict(torch.load({str(tmp_path / 'weights.pt')!r}))
            return model.eval()
    """))
    torch.save([list(pair) for pair in data], tmp_path / "data.pt")
    torch.save(example, tmp_path / "x.pt")
    arguments = ["tune", f"{tmp_path / 'net.py'}:build", "--inputs", str(tmp_path / "x.pt"),
                 "--data", str(tmp_path / "data.pt"), "--max-drop", "0.02", "--techniques", "int8,low-rank",
                 "--repeats", "3", "--confidence", "0.9", "--report-json", str(tmp_path / "report.json")]
    plotting = __import__("importlib").util.find_spec("matplotlib") is not None
    if plotting:
        arguments += ["--plot", str(tmp_path / "front.png")]
    assert main(arguments) == 0
    captured = capsys.readouterr()
    assert "Pareto front" in captured.out and "baseline" in captured.out
    assert "90% bound" in captured.out  # the drop is judged, and shown, at the confidence asked for
    assert "the search measured on the 256 examples of the even batches" in captured.out  # confirmed on the odd
    from fxopt.cli import _parser
    tune_options = ["tune", "net.py:build", "--inputs", "x.pt", "--data", "data.pt", "--max-drop", "0.02"]
    assert _parser().parse_args(tune_options).confirm is None
    assert _parser().parse_args([*tune_options, "--no-confirm"]).confirm is False
    # --recover: input batches from a file, handed to tune(recover=) as calibration batches are
    torch.save([example], tmp_path / "recover.pt")
    seen = {}
    monkeypatch.setattr(fxopt, "tune", lambda *a, **k: seen.update(k) or (_ for _ in ()).throw(SystemExit(7)))
    with pytest.raises(SystemExit) as stopped:
        main([*arguments[:6], "--max-drop", "0.02", "--recover", str(tmp_path / "recover.pt")])
    assert stopped.value.code == 7 and len(seen["recover"]) == 1 and torch.equal(seen["recover"][0][0], example)
    monkeypatch.undo()
    assert "fxopt tune: sensitivity" in captured.err  # progress while it searches
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["search"]["candidates"] and saved["search"]["pareto"]
    if plotting:
        assert (tmp_path / "front.png").stat().st_size > 1000
    assert main(["tune", f"{tmp_path / 'net.py'}:build", "--inputs", str(tmp_path / "x.pt"), "--data",
                 str(tmp_path / "data.pt"), "--max-drop", "-1"]) == 1
    assert "max_drop must be" in capsys.readouterr().err


def test_a_tuned_model_saves_and_loads_with_its_search_log(tmp_path, trained, tuned) -> None:
    _, data, _ = trained
    fxopt.save(tuned, tmp_path / "tuned.fxopt")
    loaded = fxopt.load(tmp_path / "tuned.fxopt")
    x = data[0][0]
    with torch.no_grad():
        assert torch.allclose(loaded(x), tuned(x), atol=1e-5)
    assert loaded.report.search.chosen == tuned.report.search.chosen


def test_techniques_order_by_after_names_as_they_did_by_stage_numbers() -> None:
    from fxopt.tune import techniques

    # stages 0, 1, 2, then name: the order before techniques declared after= names
    assert [t.name for t in techniques.list_techniques()] == [
        "prune-hidden", "low-rank", "bf16", "int8-dynamic", "int8-static", "int8-tensor"]
    assert [t.name for t in techniques.select_techniques("int8-static,bf16,prune-hidden")] == [
        "prune-hidden", "bf16", "int8-static"]
    early = techniques.Technique("zz-structural", "zz", lambda gm, s: {}, lambda *a: None, before=("prune-hidden",))
    with techniques.registered_technique(early):
        assert [t.name for t in techniques.select_techniques("low-rank,zz-structural")] == [
            "zz-structural", "low-rank"]  # through prune-hidden, which is not chosen
    with pytest.raises(TypeError, match="stage number"):
        techniques.Technique("old", "old", 2, lambda gm, s: {}, lambda *a: None)  # type: ignore[arg-type]
