"""What only a GPU can check. Marked ``cuda``: skipped without one; on a GPU machine run
``pytest -m cuda`` (docs/gpu.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir import call_nodes, constant, ops

pytestmark = pytest.mark.cuda


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 64)).eval()


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


@pytest.mark.parametrize("pass_name", ["cast-bf16", "cast-fp16"])
def test_low_precision_linears_on_cuda(pass_name: str) -> None:
    model, x = _mlp().cuda(), torch.randn(64, 256, device="cuda")
    opt = fxopt.compile(model, (x,), passes=[pass_name], calibration=[(torch.randn(64, 256, device="cuda"),)])
    low = {"cast-bf16": torch.bfloat16, "cast-fp16": torch.float16}[pass_name]
    dtypes = {constant(opt.graph_module, n.args[1]).dtype for n in call_nodes(opt.graph_module, ops.linear)}
    assert dtypes == {low}
    with torch.no_grad():
        assert _rel(opt(x), model(x)) <= 0.01


def test_int8_per_tensor_runs_int_mm_on_cuda() -> None:
    model, x = _mlp().cuda(), torch.randn(64, 256, device="cuda")
    opt = fxopt.compile(model, (x,), passes=["quantize-int8(activations='dynamic-tensor')"], device="cuda")
    assert any("int8" in note for note in opt.report.notes)
    with torch.no_grad():
        assert _rel(opt(x), model(x)) <= 0.05


def test_dynamic_batch_on_cuda() -> None:
    model = _mlp().cuda()
    opt = fxopt.compile(model, (torch.randn(8, 256, device="cuda"),))
    for batch in (1, 3, 128):
        x = torch.randn(batch, 256, device="cuda")
        with torch.no_grad():
            assert _rel(opt(x), model(x)) <= 1e-4


def test_torch_compile_backend_on_cuda_bert() -> None:
    import transformers as tf

    model = tf.BertModel(tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, vocab_size=100)).eval().cuda()
    ids = torch.randint(0, 100, (2, 16), device="cuda")
    compiled = torch.compile(model, backend="fxopt")
    with torch.no_grad():
        assert _rel(compiled(ids).last_hidden_state, model(ids).last_hidden_state) <= 1e-4


def test_bench_runs_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    from fxopt.cli import main

    assert main(["bench", "--models", "mlp", "--quick", "--device", "cuda"]) == 0
    assert "fxopt" in capsys.readouterr().out
