from __future__ import annotations

import torch
from torch import nn

import fxopt
from fxopt.ir import constants
from fxopt.quant import quantize_weight
from fxopt.testing import assert_skipped, run_pass

EMBEDDING = torch.ops.aten.embedding.default


class Embedder(nn.Module):
    """Token and position tables summed, normalized and projected (BERT's embedding block)."""

    def __init__(self, vocabulary: int = 500, width: int = 32, tied: bool = False) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocabulary, width), nn.Embedding(16, width)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocabulary, bias=False)
        if tied:
            self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])
        return self.head(self.norm(self.tokens(ids) + self.positions(positions)))


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(seed))


def test_tables_become_int8_rows_with_a_scale_per_row_within_budget() -> None:
    torch.manual_seed(0)
    model = Embedder().eval()
    run = run_pass("quantize-embeddings", model, (_ids(),))
    assert run.record.applied == 2
    tables = [dict(constants(run.after))[n.args[0].target] for n in run.after.graph.nodes if n.target == EMBEDDING]
    # each lookup pair: the int8 rows and their [rows, 1] float scales
    assert [t.dtype for t in tables].count(torch.int8) == 2
    assert all(t.shape[1] == 1 for t in tables if t.dtype != torch.int8)
    # the int8 table is the weight's per-row symmetric quantization, and the float one is gone
    rows, _ = quantize_weight(model.tokens.weight)
    assert any(torch.equal(t, rows) for t in tables)
    assert not any(t.shape == rows.shape and torch.equal(t, model.tokens.weight) for _, t in constants(run.after))
    error = run.assert_outputs_match(rtol=0.05, inputs=[_ids(1)])
    assert 0 < error


def test_a_table_tied_to_an_output_projection_stays_float_and_says_why() -> None:
    model = Embedder(tied=True).eval()
    run = run_pass("quantize-embeddings", model, (_ids(),))
    assert run.record.applied == 1  # the position table
    assert_skipped(run, "also used by", code="shared-constant")


def test_a_table_over_budget_stays_float_and_says_why() -> None:
    model = Embedder().eval()
    with torch.no_grad():  # one huge value per row: a per-row scale leaves the rest a few codes
        model.tokens.weight[:, 0] = 1e3
        model.norm.weight[0] = 0.0
    run = run_pass("quantize-embeddings(budget=0.001)", model, (_ids(),))
    assert run.record.applied < 2
    assert_skipped(run, "output error", code="over-budget")
    run.assert_outputs_match(rtol=0.001)


def test_the_int8_lookup_runs_on_every_backend() -> None:
    torch.manual_seed(0)
    model = Embedder().eval()
    for backend in ("eager", "onnx"):
        opt = fxopt.compile(model, (_ids(),), passes=["quantize-embeddings"], backend=backend)
        x = _ids(2)
        with torch.no_grad():
            expected = model(x)
        assert (opt(x) - expected).abs().max() / expected.abs().max() < 0.05
        assert opt.report["quantize-embeddings"].applied == 2
        saved = opt.report.original.weight_bytes - opt.report.final.weight_bytes
        table_bytes = model.tokens.weight.numel() * 4 + model.positions.weight.numel() * 4
        assert saved >= 0.7 * table_bytes  # int8 rows (and a scale per row) for float32 ones
