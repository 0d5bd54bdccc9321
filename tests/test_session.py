"""The Session owns one compilation: capture once, pipelines from shared stages, one evidence
store, a read-only PassContext, parity handed to backends as an argument."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

import fxopt
import fxopt.session
from fxopt.evidence import Evidence
from fxopt.pass_api import PassContext
from fxopt.registry import resolve_passes
from fxopt.report import Report
from fxopt.session import Session, SessionOptions, Stage, pass_context
from fxopt.verify import Parity


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_a_session_captures_once_however_many_pipelines_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    captures = []
    original = fxopt.session.capture
    monkeypatch.setattr(fxopt.session, "capture", lambda *a, **k: captures.append(1) or original(*a, **k))
    model, x = _mlp(), torch.randn(4, 16)
    session = Session(model, (x,))
    first = session.compile(resolve_passes(["remove-dropout"]), "eager")
    second = session.compile(resolve_passes(None), "eager")
    assert len(captures) == 1
    for opt in (first, second):
        assert torch.allclose(opt(x), model(x), atol=1e-6)
    # each lowered module owns its graph and its report
    assert first.graph_module is not second.graph_module and first.report is not second.report


def test_shared_prefixes_run_once_and_each_run_keeps_its_own_evidence() -> None:
    model, x = _mlp(), torch.randn(8, 16)
    session = Session(model, (x,), SessionOptions(calibration=[(torch.randn(8, 16),)]))
    exact = resolve_passes(["remove-dropout"])
    lossy = resolve_passes(["remove-dropout", "quantize-int8(activations='dynamic-tensor')"])
    a = session.run(exact, share_prefix=True)
    b = session.run(lossy, share_prefix=True)
    assert session.run(exact, share_prefix=True) is a  # the exact prefix ran once
    assert b.records[0] is a.records[0]  # the longer pipeline continued from it
    assert b.verification is not None and a.verification is not None
    assert b.verification.evidence is not a.verification.evidence  # forks, never shared in place
    assert b.verification.lossy_applied and not a.verification.lossy_applied


def test_each_lossy_pass_ends_a_shared_stage_and_stages_go_when_no_pipeline_continues_from_them() -> None:
    """An int8 preset's eager candidate adds merge-siblings after the search that its ONNX
    candidate ends with: the search runs once; once no pipeline still to run starts with a
    stage, it goes (and a later run makes it again)."""
    model, x = _mlp(), torch.randn(8, 16)
    session = Session(model, (x,), SessionOptions(progress=False))
    quantize, merge = resolve_passes(["quantize-int8(activations='dynamic-tensor', budget=1.0, force=True)",
                                      "merge-siblings"])
    merged = session.run([quantize, merge], share_prefix=True)
    alone = session.run([quantize], share_prefix=True)
    assert merged.records[0] is alone.records[0] and len(merged.records) == 2
    session.keep_stages_for([[quantize, merge]])  # still to run: nothing is dropped
    assert session.run([quantize], share_prefix=True) is alone
    session.keep_stages_for([])
    again = session.run([quantize], share_prefix=True)
    assert again is not alone and again.records[0] is not alone.records[0]


def test_a_kept_stage_is_taken_without_running_its_exact_prefix_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A preset keeps a candidate's search whole and lets its exact prefix go: building the
    candidate later continues from the search without running (and verifying) the exact
    passes again."""
    import fxopt.pipeline.manager as manager

    model, x = _mlp(), torch.randn(8, 16)
    session = Session(model, (x,), SessionOptions(progress=False))
    dropout, quantize, merge = resolve_passes(["remove-dropout", "quantize-int8(activations='dynamic-tensor', "
                                               "budget=1.0, force=True)", "merge-siblings"])
    searched = session.run([dropout, quantize], share_prefix=True)
    session.keep_stages_for([], ran=[[dropout, quantize]])  # the search whole, not its exact prefix
    assert (dropout,) not in session._stages
    runs = []
    monkeypatch.setattr(manager.PassManager, "run", lambda self, *a, **k: runs.append(self.passes) or None)
    assert session.run([dropout, quantize], share_prefix=True) is searched
    assert runs == []
    with pytest.raises(TypeError):  # the stub returns nothing: what matters is which passes it was given
        session.run([dropout, quantize, merge], share_prefix=True)
    assert [[p.name for p in passes] for passes in runs] == [["merge-siblings"]]


def test_a_candidate_quantizing_after_another_holds_no_int8_weight_of_its_own() -> None:
    """An int8 preset's candidates quantize the same weights: once the first merged its
    siblings' int8 weights (and its unmerged stage went), the second finds each sibling's
    int8 rows in the merged weight, and merging them again copies nothing; the one held
    stage (the first's, whole) gives a run that is still its own."""
    import gc

    transformers = pytest.importorskip("transformers")
    from fxopt.ir import constants

    torch.manual_seed(0)
    model = transformers.LlamaModel(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, use_cache=False)).eval()
    x = torch.randint(0, 300, (2, 16))
    session = Session(model, (x,), SessionOptions(progress=False))
    first = resolve_passes(["quantize-int8(activations='dynamic-tensor', budget=1.0)", "merge-siblings"])
    second = resolve_passes(["quantize-int8(activations='dynamic-tensor', budget=0.9)", "merge-siblings"])
    a = session.run(first, share_prefix=True)
    session.keep_stages_for([second], ran=[first])  # the first's stage whole, not its unmerged prefix
    gc.collect()
    b = session.run(second, share_prefix=True)
    int8 = lambda stage: [t for _, t in constants(stage.gm) if t.dtype == torch.int8]  # noqa: E731
    held = {t.untyped_storage().data_ptr() for t in int8(a)}
    assert any(r.name == "merge-siblings" and r.status == "applied" for r in a.records)
    assert all(t.untyped_storage().data_ptr() in held for t in int8(b))
    merged = lambda stage: next(r for r in stage.records if r.name == "merge-siblings").applied  # noqa: E731
    assert merged(b) == merged(a) > 0  # rows of one memory merge again, without a copy
    with torch.no_grad():
        expected = model(x).last_hidden_state
        for stage in (a, b):
            assert (stage.gm(x)[0] - expected).abs().max() / expected.abs().max() < 0.05


def test_pass_context_is_read_only_configuration() -> None:
    ctx = pass_context([[torch.randn(2, 3)]], reference=[[torch.ones(1)]])
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.reference = []  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.batches = []  # type: ignore[misc]
    assert torch.equal(ctx.reference[0][0], torch.ones(1))  # read through the evidence store
    assert ctx.values is None and ctx.original == []
    assert isinstance(PassContext(batches=[]).evidence, Evidence)


def test_evidence_fork_shares_what_was_measured_and_diverges_after() -> None:
    evidence = Evidence(reference=[[torch.zeros(1)]], runs=[([torch.zeros(1)], [torch.ones(1)])])
    evidence.values = object()
    twin = evidence.fork()
    assert twin.reference is evidence.reference and twin.values is None
    assert len(twin.take_runs()) == 1 and twin.runs == []
    assert len(evidence.runs) == 1  # the original still has the pre-pipeline run
    twin.reference = []
    assert evidence.reference != []


def test_no_measurement_rides_on_the_graph_meta() -> None:
    model, x = _mlp(), torch.randn(8, 16)
    opt = fxopt.compile(model, (x,), passes=["remove-dropout", "quantize-int8"],
                        calibration=[(torch.randn(8, 16),)])
    assert not any(key.endswith("_outputs") for key in opt.graph_module.meta)


def test_backends_receive_parity_as_an_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    import fxopt.backends
    from fxopt.backends.eager import lower_eager

    seen: dict[str, Any] = {}

    def with_parity(gm, signature, inputs, device, report, parity=None):
        seen["parity"] = parity
        return lower_eager(gm, signature, inputs, device, report, parity=parity)

    def without_parity(gm, signature, inputs, device, report):  # a plugin written before parity
        seen["plain"] = True
        return lower_eager(gm, signature, inputs, device, report)

    model, x = _mlp(), torch.randn(8, 16)
    for name, function in (("with-parity", with_parity), ("without-parity", without_parity)):
        with fxopt.backends.registered_backend(fxopt.backends.Backend(name, function)):
            opt = fxopt.compile(model, (x,), passes=["remove-dropout"], backend=name)
        assert torch.allclose(opt(x), model(x), atol=1e-6)
    parity = seen["parity"]
    assert isinstance(parity, Parity) and parity.known() is not None
    inputs, outputs = parity.known()
    assert torch.allclose(outputs[0], model(*inputs), atol=1e-6)  # the verified outputs, not a rerun
    assert seen["plain"]


def test_from_graph_sessions_verify_without_a_model() -> None:
    model, x = _mlp(), torch.randn(4, 16)
    gm = fxopt.capture(model, (x,))
    session = Session.from_graph(gm, [[x]], Report(), options=SessionOptions(strict=True))
    stage = session.run(resolve_passes(["remove-dropout"]))
    assert isinstance(stage, Stage) and stage.records[0].status == "applied"
    assert gm is not stage.gm  # the captured graph stays as it was
    opt = session.lower(stage, "eager")
    assert torch.allclose(opt(x), model(x), atol=1e-6)
