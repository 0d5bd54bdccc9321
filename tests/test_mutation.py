"""Models that write to their own state are refused; in-place ops on fresh values become functional."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir import aten, count_ops, ops


class CallCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x) * self.calls


class RunningMean(nn.Module):
    """An exponential moving average updated in forward, as in EMA/statistics layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("average", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        with torch.no_grad():
            self.average.mul_(0.9).add_(0.1 * y.mean(0))
        return y - self.average


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stats = RunningMean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stats(x)


class CopiesIntoBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("last", torch.zeros(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last[:, :2].copy_(x[:, :2])  # a write through a view of the buffer
        return self.fc(x) + self.last


class WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.fc(x)


@pytest.mark.parametrize(
    ("model", "buffer", "module"),
    [(CallCounter(), "calls", "<root>"), (RunningMean(), "average", "<root>"),
     (Encoder(), "stats.average", "stats"), (CopiesIntoBuffer(), "last", "<root>")],
    ids=["counter", "ema", "nested-ema", "copy-into-view"],
)
def test_writes_to_buffers_are_refused_naming_buffer_and_module(model: nn.Module, buffer: str, module: str) -> None:
    model.eval()
    x = torch.randn(2, 4)
    with pytest.raises(fxopt.CaptureError) as info:
        fxopt.compile(model, (x,), passes=[])
    error = info.value
    assert f"writes to its buffer '{buffer}'" in str(error)
    assert error.module_path == module
    assert error.source is not None and "test_mutation.py" in error.source
    assert torch.equal(dict(model.named_buffers())[buffer], torch.zeros_like(dict(model.named_buffers())[buffer]))


def test_write_to_an_input_is_refused() -> None:
    with pytest.raises(fxopt.CaptureError, match="writes to its input 'x' in place"):
        fxopt.compile(WritesItsInput().eval(), (torch.randn(2, 4),), passes=[])


class InPlaceActivations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.drop = nn.Dropout(0.3, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = torch.relu_(h)
        h = self.drop(h)
        h.mul_(2).add_(1)
        h = nn.functional.hardswish(h, inplace=True)
        h = nn.functional.silu(h, inplace=True)
        h = h.clone().clamp_(-3, 3)
        return self.fc2(nn.functional.gelu(h))


def test_in_place_ops_on_fresh_values_become_functional() -> None:
    model = InPlaceActivations().eval()
    x = torch.randn(5, 8)
    gm = fxopt.capture(model, (x,))
    in_place = [n.target for n in gm.graph.nodes if n.op == "call_function" and str(n.target).split(".")[-2].endswith("_")]
    assert in_place == []
    assert count_ops(gm, ops.relu, ops.dropout, ops.hardswish, ops.silu, ops.mul, ops.add) == 6
    opt = fxopt.compile(model, (x,), passes=["remove-dropout"])
    assert opt.report["remove-dropout"].applied == 1
    assert count_ops(opt.graph_module, ops.dropouts) == 0
    torch.testing.assert_close(opt(x), model(x))


class ReadsBeforeAndAfter(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 3
        before = h.sum()
        h.relu_()
        return h + before  # the read after the write must see the new value


class WritesThroughAView(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 3
        flat = h.view(-1)
        h.relu_()
        return flat * 2  # the view sees the write


def test_readers_after_the_write_see_the_new_value() -> None:
    x = torch.randn(3, 4)
    gm = fxopt.capture(ReadsBeforeAndAfter().eval(), (x,))
    assert count_ops(gm, aten.relu_.default) == 0
    torch.testing.assert_close(gm(x)[0], ReadsBeforeAndAfter()(x))


def test_write_seen_through_a_view_stays_in_place() -> None:
    x = torch.randn(3, 4)
    gm = fxopt.capture(WritesThroughAView().eval(), (x,))
    assert count_ops(gm, aten.relu_.default) == 1  # no functional spelling is provably the same
    opt = fxopt.compile(WritesThroughAView().eval(), (x,), passes=[])
    torch.testing.assert_close(opt(x), WritesThroughAView()(x))


def test_functionalized_buffer_mutation_in_the_graph_signature_is_refused() -> None:
    from fxopt.capture import freeze

    model = CallCounter().eval()
    with torch.no_grad():
        exported = torch.export.export(model, (torch.randn(2, 4),), strict=False).run_decompositions()
    assert exported.graph_signature.buffers_to_mutate  # the write is a graph output here, not an add_
    with pytest.raises(fxopt.CaptureError, match="writes to its buffer 'calls'") as info:
        freeze(exported, model)
    assert info.value.module_path == "<root>"
