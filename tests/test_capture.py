from __future__ import annotations

import pytest
import torch
from conftest import tiny_transformer, token_ids
from torch import nn

import fxopt
from fxopt.ir import constants, count_ops, ops
from fxopt.verify import compare_outputs


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_capture_freezes_weights_as_constants_shared_with_the_model_or_copied() -> None:
    model = _mlp()
    params = {p.data_ptr() for p in model.parameters()}
    for share in (True, False):
        gm = fxopt.capture(model, (torch.randn(3, 8),), share_weights=share)
        assert [n.op for n in gm.graph.nodes].count("placeholder") == 1
        assert count_ops(gm, ops.linear) == 2
        frozen = dict(constants(gm))
        assert len(frozen) == 4
        shared = params & {t.data_ptr() for t in frozen.values()}
        assert shared == (params if share else set()), "shared: the model's tensors; else copies"
        assert not any(isinstance(t, nn.Parameter) for t in frozen.values())  # detached either way
        assert all("val" in n.meta for n in gm.graph.nodes if n.op != "output")


def test_captured_graph_matches_eager_on_two_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(3, 5)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) * self.b(y)

    model = TwoInputs().eval()
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    opt = fxopt.compile(model, (x, y), passes=[])
    assert torch.equal(opt(x, y), model(x, y))


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2", "t5"])
def test_transformers_models_capture_and_match(kind: str) -> None:
    model = tiny_transformer(kind)
    ids = token_ids()
    opt = fxopt.compile(model, (ids,), passes=[])
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    actual = opt(ids).last_hidden_state
    assert type(opt(ids)) is type(model(ids)), "output structure is preserved"
    assert compare_outputs([expected], [actual]).max_rel < 1e-5
    assert count_ops(opt.graph_module, ops.linear) > 0


def test_gpt2_conv1d_becomes_linear() -> None:
    gm = fxopt.capture(tiny_transformer("gpt2"), (token_ids(),))
    assert count_ops(gm, ops.addmm) == 0
    assert count_ops(gm, ops.linear) == 8  # c_attn, c_proj, c_fc, c_proj per layer


class _MatmulForms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 8))
        self.b1 = nn.Parameter(torch.randn(16))
        self.w2 = nn.Parameter(torch.randn(16, 4))  # [in, out], the Conv1D layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.b1, x, self.w1.t())
        return torch.mm(h, self.w2)


def test_addmm_and_mm_with_constant_weights_become_linear() -> None:
    model = _MatmulForms().eval()
    x = torch.randn(5, 8)
    gm = fxopt.capture(model, (x,))
    assert count_ops(gm, ops.addmm, ops.mm) == 0
    assert count_ops(gm, ops.linear) == 2
    assert compare_outputs([model(x)], [gm(x)[0]]).max_rel < 1e-6


def test_matmul_with_activation_weight_is_left_alone() -> None:
    class Bilinear(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.mm(x, y)

    gm = fxopt.capture(Bilinear(), (torch.randn(3, 4), torch.randn(4, 5)))
    assert count_ops(gm, ops.linear) == 0


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), _Branchy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow cannot be captured
            return x * 2
        return x


def test_capture_error_names_module_and_line() -> None:
    with pytest.raises(fxopt.CaptureError) as info:
        fxopt.capture(_DataDependent().eval(), (torch.randn(2, 4),))
    error = info.value
    assert error.module_path == "inner.1"
    assert error.source is not None and "test_capture.py" in error.source and "x.sum() > 0" in error.source
    assert "torch.cond" in str(error)


def test_wrong_input_shape_and_dtype_are_named() -> None:
    model = _mlp()
    opt = fxopt.compile(model, (torch.randn(3, 8),), passes=[])
    with pytest.raises(fxopt.InputError, match=r"input 0 \('input'\): expected shape \(3, 8\).*got shape \(3, 9\)"):
        opt(torch.randn(3, 9))
    with pytest.raises(fxopt.InputError, match="expected dtype torch.float32, got torch.float64"):
        opt(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(fxopt.InputError, match="structure"):
        opt(torch.randn(3, 8), torch.randn(3, 8))


def test_dynamic_batch_dimension() -> None:
    model = _mlp()
    batch = torch.export.Dim("batch")
    opt = fxopt.compile(model, (torch.randn(4, 8),), dynamic_shapes=({0: batch},))
    for n in (1, 3, 7):
        x = torch.randn(n, 8)
        assert compare_outputs([model(x)], [opt(x)]).max_rel < 1e-5


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > 0:
            return h
        return -h


def test_capture_failure_prints_nothing_and_keeps_torch_output(capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    with pytest.raises(fxopt.CaptureError) as info:
        fxopt.compile(DataDependent().eval(), (torch.randn(2, 4),))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert "def forward" in info.value.detail  # the partial graph torch printed
    assert "torch.cond" in str(info.value)
    assert any("def forward" in note for note in getattr(info.value.__cause__, "__notes__", []))


def test_params_count_distinct_tensors_the_graph_reads() -> None:
    class TiedAndUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Linear(16, 16, bias=False)
            self.decode = nn.Linear(16, 16, bias=False)
            self.decode.weight = self.encode.weight  # tied
            self.unused = nn.Linear(64, 64)  # never called

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decode(torch.relu(self.encode(x)))

    opt = fxopt.compile(TiedAndUnused().eval(), (torch.randn(2, 16),), passes=["remove-dropout"])
    assert opt.report.original.params == 16 * 16
    assert opt.report.original.weight_bytes == 16 * 16 * 4
    assert opt.report.final.params == 16 * 16


def test_t5_params_before_count_the_shared_embedding_once() -> None:
    model = tiny_transformer("t5")
    opt = fxopt.compile(model, (token_ids(),), passes=["remove-dropout"])
    assert opt.report.original.params == sum(p.numel() for p in model.parameters())
    assert opt.report.original.params == opt.report.final.params


def test_passes_are_reachable_from_a_fresh_import() -> None:
    import subprocess
    import sys

    code = ("import sys, fxopt; assert 'fxopt.passes' not in sys.modules; "
            "p = fxopt.passes.LowRank(energy=0.99); print(p.name, 'fxopt.passes' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "low-rank True"


class _PositionTable(nn.Module):
    """Token and position embeddings: the sequence length is bounded by the position table."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(32, 8)
        self.positions = nn.Embedding(16, 8)
        self.linear = nn.Linear(8, 8)
        self.register_buffer("position_ids", torch.arange(16)[None], persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(self.tokens(ids) + self.positions(self.position_ids[:, : ids.shape[1]]))


def test_a_dynamic_size_out_of_bounds_is_refused_with_exports_suggested_fix() -> None:
    from torch.export import Dim

    ids = torch.randint(0, 32, (2, 6))
    with pytest.raises(fxopt.CaptureError, match=r"torch\.export suggests seq = Dim\('seq', max=16\)"):
        fxopt.compile(_PositionTable().eval(), (ids,), dynamic_shapes={"ids": {1: Dim("seq")}})
