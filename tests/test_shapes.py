"""The batch dimension is dynamic by default; other sizes through ``dynamic_shapes=``."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_transformer, token_ids
from torch import nn
from torch.export import Dim

import fxopt
from fxopt.demo import build_demo
from fxopt.ir import count_ops, ops


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_batch_is_dynamic_by_default() -> None:
    model = _mlp()
    opt = fxopt.compile(model, (torch.randn(4, 8),))
    assert opt.signature.inputs[0].shape == (None, 8)
    for batch in (1, 2, 5, 33):
        x = torch.randn(batch, 8)
        torch.testing.assert_close(opt(x), model(x))
    with pytest.raises(fxopt.InputError, match=r"expected shape \(4, 8\) \(dim 0 of any size\).*got shape \(3, 9\)"):
        opt(torch.randn(3, 9))


def test_inputs_sharing_the_batch_size_share_the_dynamic_batch() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(3, 5)
            self.table = nn.Parameter(torch.randn(7, 5))

        def forward(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self.a(x) * self.b(y) + self.table[rows].sum(0)

    model = TwoInputs().eval()
    x, y, rows = torch.randn(4, 6), torch.randn(4, 3), torch.tensor([0, 3, 6])
    opt = fxopt.compile(model, (x, y, rows))
    assert [spec.shape for spec in opt.signature.inputs] == [(None, 6), (None, 3), (3,)]
    x, y = torch.randn(9, 6), torch.randn(9, 3)
    torch.testing.assert_close(opt(x, y, rows), model(x, y, rows))


def test_batch_of_one_stays_static_with_a_note_and_a_hint() -> None:
    opt = fxopt.compile(_mlp(), (torch.randn(1, 8),))
    assert opt.signature.inputs[0].shape == (1, 8)
    assert any("example batch size is 1" in note for note in opt.report.notes)
    with pytest.raises(fxopt.InputError, match="dim 0 was captured static because the example's size there is 1.*batch of 2 or more"):
        opt(torch.randn(2, 8))


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).reshape(4, 2, 4).sum(1)  # only a batch of 4 fits


def test_model_that_fixes_the_batch_is_captured_static_with_a_note() -> None:
    model = FixedBatch().eval()
    x = torch.randn(4, 8)
    opt = fxopt.compile(model, (x,))
    assert opt.signature.inputs[0].shape == (4, 8)
    assert any("batch dimension" in note and "static" in note for note in opt.report.notes)
    torch.testing.assert_close(opt(x), model(x))


def test_static_opt_out() -> None:
    opt = fxopt.compile(_mlp(), (torch.randn(4, 8),), dynamic_shapes="static")
    assert opt.signature.inputs[0].shape == (4, 8)
    assert not any("batch" in note and "static" in note for note in opt.report.notes)
    with pytest.raises(fxopt.InputError, match=r"got shape \(5, 8\); dim 0 was captured static.*dynamic_shapes"):
        opt(torch.randn(5, 8))
    with pytest.raises(fxopt.InputError, match="dynamic_shapes must be"):
        fxopt.compile(_mlp(), (torch.randn(4, 8),), dynamic_shapes="dynamic")


def test_calibration_batches_may_have_another_batch_size() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    calibration = [(torch.randn(3, 32),), (torch.randn(50, 32),)]
    opt = fxopt.compile(model, (torch.randn(8, 32),), passes=[fxopt.passes.QuantizeInt8(activations="static")],
                        calibration=calibration)
    assert opt.report["quantize-int8"].applied == 3
    assert opt.report.notes and not any("no calibration data" in note for note in opt.report.notes)
    x = torch.randn(6, 32)
    with torch.no_grad():
        expected = model(x)
    assert float((opt(x) - expected).abs().max() / expected.abs().max()) < 0.05


def test_every_pass_works_with_a_symbolic_batch() -> None:
    model, (x,) = build_demo(batch=8, d_in=32, hidden=64)
    passes = ["remove-dropout", "fold-batchnorm", "swap-activations", "merge-consecutive", "merge-siblings",
              fxopt.passes.LowRank(energy=0.99), fxopt.passes.PruneHidden(budget=0.05), "quantize-int8"]
    opt = fxopt.compile(model, (x,), passes=passes, calibration=[(torch.randn(16, 32),)])
    assert opt.signature.inputs[0].shape == (None, 32)
    rolled_back = [r.name for r in opt.report.passes if r.rolled_back]
    assert rolled_back == []
    for name in ("remove-dropout", "fold-batchnorm", "merge-siblings", "quantize-int8"):
        assert opt.report[name].applied > 0, name
    for batch in (1, 3, 17):
        x = torch.randn(batch, 32)
        with torch.no_grad():
            outputs = model(x)
        for actual, expected in zip(opt(x), outputs):
            assert actual.shape == expected.shape
            assert float((actual - expected).abs().max() / expected.abs().max()) < 0.2


def test_dict_example_inputs_for_a_transformers_model() -> None:
    model = tiny_transformer("bert")
    ids = token_ids(batch=2, seq=8)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    opt = fxopt.compile(model, {"input_ids": ids, "attention_mask": mask}, passes=["remove-dropout"])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(opt(input_ids=ids, attention_mask=mask).last_hidden_state, expected)
    torch.testing.assert_close(opt(attention_mask=mask, input_ids=ids).last_hidden_state, expected)
    ids5 = token_ids(batch=5, seq=8)
    with torch.no_grad():
        expected5 = model(input_ids=ids5, attention_mask=torch.ones_like(ids5)).last_hidden_state
    torch.testing.assert_close(opt(input_ids=ids5, attention_mask=torch.ones_like(ids5)).last_hidden_state, expected5)


def test_sequence_length_through_dynamic_shapes() -> None:
    model = tiny_transformer("bert")
    ids = token_ids(batch=2, seq=8)
    batch, seq = Dim("batch"), Dim("seq", max=32)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    opt = fxopt.compile(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, dynamic_shapes=shapes,
                        passes=["remove-dropout", "merge-siblings"])
    assert opt.signature.inputs[0].shape == (None, None)
    for b, s in ((1, 5), (3, 16)):
        ids = token_ids(batch=b, seq=s)
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        actual = opt(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_onnx_backend_runs_any_batch_by_default(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    model = _mlp()
    opt = fxopt.compile(model, (torch.randn(4, 8),), backend="onnx")
    for batch in (1, 6):
        x = torch.randn(batch, 8)
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)
    path, _ = fxopt.export_onnx(model, (torch.randn(4, 8),), tmp_path / "m.onnx")
    dim = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value


def test_fresh_input_catches_a_pass_that_only_fits_the_examples() -> None:
    from dataclasses import dataclass
    from typing import ClassVar

    from fxopt.ir import add_constant, call_nodes
    from fxopt.pass_api import PassResult

    @dataclass(frozen=True)
    class FoldsTheExample(fxopt.Pass):
        """Claims to be exact; replaces the first Linear by its output on the example inputs."""

        name: ClassVar[str] = "test-folds-the-example"

        def __call__(self, gm, ctx):  # type: ignore[no-untyped-def]
            result = PassResult()
            linear = call_nodes(gm, ops.linear)[0]
            x = ctx.example_inputs[0]
            value = torch.nn.functional.linear(x, *(getattr(gm, a.target) for a in linear.args[1:]))
            linear.replace_all_uses_with(add_constant(gm, value, "folded"))
            gm.graph.erase_node(linear)
            result.apply()
            return result

    model = _mlp()
    x = torch.randn(4, 8)
    fooled = fxopt.compile(model, (x,), passes=[FoldsTheExample()], fresh_inputs=False, dynamic_shapes="static")
    assert fooled.report["test-folds-the-example"].status == "applied"
    with pytest.warns(UserWarning, match="rolled back"):
        checked = fxopt.compile(model, (x,), passes=[FoldsTheExample()], dynamic_shapes="static")
    assert checked.report["test-folds-the-example"].status == "rolled back"
    assert any("one fresh input" in note for note in checked.report.notes)
    assert count_ops(checked.graph_module, ops.linear) == 2


def test_lossy_search_never_fits_on_the_fresh_input() -> None:
    from fxopt.lossy import split_batches

    assert split_batches(2, fresh=1) == ([0], [])  # examples, fresh: the manager checks the fresh one
    assert split_batches(3, fresh=1) == ([0], [1])  # examples, one calibration batch, fresh
    assert split_batches(4, fresh=1) == ([0, 2], [1])
    assert split_batches(3, holdout=False, fresh=1) == ([0, 1], [])


class _MaskedTokens(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * mask.unsqueeze(-1)


def test_static_dim_hint_covers_every_input_and_keeps_the_batch_dynamic() -> None:
    # export wants an entry for every input and the same dimension dynamic in the inputs of
    # that size; a spec given by hand also replaces the default dynamic batch
    model = _MaskedTokens().eval()
    examples = {"x": torch.randn(2, 5, 8), "mask": torch.ones(2, 5)}
    opt = fxopt.compile(model, examples, passes=[])
    longer = {"x": torch.randn(3, 7, 8), "mask": torch.ones(3, 7)}
    with pytest.raises(fxopt.InputError, match="dim 1 was captured static") as refused:
        opt(**longer)
    hint = str(refused.value).split("dynamic_shapes=")[1].split(" (Dim is torch.export.Dim)")[0]
    assert hint == "{'x': {0: Dim.AUTO, 1: Dim.AUTO}, 'mask': {0: Dim.AUTO, 1: Dim.AUTO}}"
    opt = fxopt.compile(model, examples, passes=[], dynamic_shapes=eval(hint, {"Dim": Dim}))
    torch.testing.assert_close(opt(**longer), model(**longer))
