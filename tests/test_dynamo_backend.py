"""torch.compile(model, backend="fxopt"): entry point, frozen weights, graph breaks, dynamic shapes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fxopt
from fxopt.frontends.dynamo import CompileLog
from fxopt.testing import assert_outputs_close


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Block(torch.nn.Module):
    def __init__(self, features: int = 8, out: int = 4) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(features, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.fc2 = torch.nn.Linear(16, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc(x))
        return self.fc2(h * torch.sigmoid(h))


def _block(seed: int = 0, **kwargs) -> Block:
    torch.manual_seed(seed)
    model = Block(**kwargs).eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _check(compiled, model, x):
    with torch.no_grad():
        expected = model(x)
    assert_outputs_close([compiled(x)], [expected])


def test_entry_point_works_in_a_fresh_interpreter():
    script = textwrap.dedent("""
        import sys, torch
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)).eval()
        assert "fxopt" not in sys.modules
        compiled = torch.compile(model, backend="fxopt", options={"passes": ["fold-batchnorm"]})
        x = torch.randn(4, 8)
        torch.testing.assert_close(compiled(x), model(x))
        from fxopt.frontends.dynamo import last_reports
        print(last_reports()[0]["fold-batchnorm"].status)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "applied"


def test_weights_are_frozen_and_weight_passes_apply():
    model = _block()
    log = CompileLog()
    compiled = torch.compile(model, backend="fxopt",
                             options={"passes": ["fold-batchnorm", "swap-activations"], "log": log, "strict": True})
    _check(compiled, model, torch.randn(4, 8))
    (record,) = log.records
    assert record.weights == 8  # fc, bn (4 tensors), fc2
    assert record.fallback is None
    report = record.report
    assert report["fold-batchnorm"].applied == 1
    assert report["swap-activations"].applied == 1
    assert report.final.params < report.original.params


@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "assign_data", "replace_parameter"])
def test_changed_weights_reoptimize(change):
    model = _block()
    log = CompileLog()
    compiled = torch.compile(model, backend="fxopt", options={"passes": ["fold-batchnorm"], "log": log})
    x = torch.randn(4, 8)
    _check(compiled, model, x)
    with torch.no_grad():
        if change == "in_place":
            model.fc.weight.mul_(2.0)
            model.bn.running_var.add_(1.0)
        elif change == "load_state_dict":
            model.load_state_dict(_block(seed=1).state_dict())
        elif change == "assign_data":
            model.fc.weight.data = torch.randn_like(model.fc.weight)
        else:
            model.fc2.weight = torch.nn.Parameter(torch.randn_like(model.fc2.weight))
    _check(compiled, model, x)
    assert sum(r.reoptimized for r in log.records) + (log.compiles - 1) >= 1
    if change != "replace_parameter":  # a new Parameter object may also make dynamo recompile
        assert log.records[0].reoptimized == 1
        assert "re-optimized because weight" in " ".join(log.records[0].report.notes)
    _check(compiled, model, x)  # and nothing changes again without a new change
    assert log.records[0].reoptimized <= 1


def test_changed_weights_can_raise_instead():
    model = _block()
    compiled = torch.compile(model, backend="fxopt", options={"on_weight_change": "raise", "log": CompileLog()})
    x = torch.randn(4, 8)
    _check(compiled, model, x)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    with pytest.raises(fxopt.BackendError, match="fc_bias' was modified after compiling"):
        compiled(x)


class TwoPieces(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = _block(out=8)
        self.second = _block(seed=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        torch._dynamo.graph_break()
        return self.second(h)


def test_graph_breaks_optimize_each_piece():
    model = TwoPieces().eval()
    log = CompileLog()
    compiled = torch.compile(model, backend="fxopt", options={"passes": ["fold-batchnorm"], "log": log})
    _check(compiled, model, torch.randn(4, 8))
    assert log.compiles == 2
    assert [r.report["fold-batchnorm"].applied for r in log.records] == [1, 1]
    assert "2 graph(s) compiled" in str(log)


def test_dynamic_batch_sizes():
    model = _block()
    log = CompileLog()
    compiled = torch.compile(model, backend="fxopt", dynamic=True, options={"passes": ["fold-batchnorm"], "log": log})
    for batch in (2, 7, 1, 5):
        _check(compiled, model, torch.randn(batch, 8))
    # one dynamic graph for every batch size >= 2; dynamo specializes size 1 on its own
    assert log.compiles == 2
    assert all(r.fallback is None for r in log.records)


def test_onnx_backend_through_torch_compile():
    model = _block()
    log = CompileLog()
    compiled = torch.compile(model, backend="fxopt", dynamic=True,
                             options={"backend": "onnx", "passes": ["fold-batchnorm"], "log": log})
    for batch in (2, 7):
        _check(compiled, model, torch.randn(batch, 8))
    assert log.compiles == 1
    report = log.records[0].report
    assert report.backend == "onnx"
    assert any("on CPUExecutionProvider" in n for n in report.notes)


def test_unknown_option_is_refused():
    compiled = torch.compile(_block(), backend="fxopt", options={"pases": ["fold-batchnorm"]})
    with pytest.raises(Exception, match="unknown fxopt backend option"):
        compiled(torch.randn(4, 8))


def test_training_mode_runs_unoptimized_with_a_reason():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))  # training mode
    log = CompileLog()
    compiled = torch.compile(model, backend="fxopt", options={"log": log})
    with pytest.warns(UserWarning, match="runs unoptimized"):
        y = compiled(torch.randn(4, 8))
    assert y.shape == (4, 8)
    assert "model.eval()" in log.records[0].fallback
    strict = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)), backend="fxopt",
                           options={"strict": True, "log": log})
    with pytest.raises(Exception, match="model.eval"):
        strict(torch.randn(4, 8))


def test_gpt2_through_torch_compile():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, n_positions=32, vocab_size=50,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    log = CompileLog()
    compiled = torch.compile(model, backend="fxopt", options={"passes": ["swap-activations"], "log": log})
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        actual = compiled(ids).last_hidden_state
    assert_outputs_close([actual], [expected])
    assert sum(r.report["swap-activations"].applied for r in log.records if r.fallback is None) == 1


@pytest.mark.cuda
def test_cuda_graph():
    model = _block().cuda()
    log = CompileLog()
    compiled = torch.compile(model, backend="fxopt", options={"passes": ["fold-batchnorm"], "log": log})
    x = torch.randn(4, 8, device="cuda")
    y = compiled(x)
    assert y.device.type == "cuda" and log.records[0].report.device.startswith("cuda")
    _check(compiled, model, x)


def test_writes_through_data_are_a_documented_snapshot_with_a_warning():
    torch.manual_seed(0)
    from fxopt.frontends.dynamo import FrozenWeightsWarning

    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    compiled = torch.compile(model, backend="fxopt")
    x = torch.randn(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            before = compiled(x)
    assert any(issubclass(w.category, FrozenWeightsWarning) and ".data" in str(w.message) for w in caught)
    with torch.no_grad():
        model[0].weight.data.mul_(2)  # bypasses the version counter: not seen, as the warning says
        assert torch.equal(compiled(x), before)
        assert not torch.allclose(model(x), before)
        torch._dynamo.reset()  # what the warning tells the user to do
        torch.testing.assert_close(torch.compile(model, backend="fxopt")(x), model(x))
