"""Every spelling of a Linear becomes one ``aten.linear`` (with its bias folded in)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir import aten, count_ops, ops


class FalconLinear(nn.Linear):
    """transformers' FalconLinear: ``input @ self.weight.T`` plus the bias."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        hidden_states = input @ self.weight.T
        if self.bias is None:
            return hidden_states
        return hidden_states + self.bias


class Spellings(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.weight = nn.Parameter(torch.randn(6, 8))
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        y = {
            "numpy_T": lambda: x @ w.T,
            "mT": lambda: x @ w.mT,
            "matmul": lambda: torch.matmul(x, w.T),
            "t": lambda: x @ w.t(),
            "transpose": lambda: x @ w.transpose(0, 1),
        }[self.spelling]()
        return torch.relu(y)


@pytest.mark.parametrize("spelling", ["numpy_T", "mT", "matmul", "t", "transpose"])
@pytest.mark.parametrize("rank", [2, 3])
def test_matmul_by_transposed_constant_becomes_linear(spelling: str, rank: int) -> None:
    model = Spellings(spelling).eval()
    x = torch.randn(4, 8) if rank == 2 else torch.randn(2, 4, 8)
    gm = fxopt.capture(model, (x,))
    assert count_ops(gm, ops.linear) == 1
    assert count_ops(gm, ops.matmul, ops.mm, aten.numpy_T.default, aten.mT.default, ops.t) == 0
    torch.testing.assert_close(gm(x)[0], model(x))


@pytest.mark.parametrize("bias_first", [False, True])
def test_bias_add_folds_into_the_linear(bias_first: bool) -> None:
    class AddsBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = FalconLinear(8, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bias_first:
                return self.fc.bias + x @ self.fc.weight.T
            return self.fc(x)

    model = AddsBias().eval()
    x = torch.randn(3, 5, 8)
    gm = fxopt.capture(model, (x,))
    linear = next(n for n in gm.graph.nodes if n.target == ops.linear)
    assert len(linear.args) == 3 and linear.args[2] is not None
    assert count_ops(gm, ops.add) == 0
    torch.testing.assert_close(gm(x)[0], model(x))


class AddsWhatIsNotABias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8))
        self.table = nn.Parameter(torch.randn(4, 6))  # 2-D: not a bias

    def forward(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return (y + self.table) + (x @ self.weight.T + extra)  # a constant of the wrong shape; an input


def test_adds_that_are_not_a_bias_stay() -> None:
    model = AddsWhatIsNotABias().eval()
    x, extra = torch.randn(4, 8), torch.randn(4, 6)
    gm = fxopt.capture(model, (x, extra))
    assert count_ops(gm, ops.linear) == 2
    assert all(len(n.args) == 2 or n.args[2] is None for n in gm.graph.nodes if n.target == ops.linear)
    assert count_ops(gm, ops.add) == 3
    torch.testing.assert_close(gm(x, extra)[0], model(x, extra))


def test_falcon_style_linears_are_seen_by_passes() -> None:
    model = nn.Sequential(FalconLinear(8, 16), nn.ReLU(), FalconLinear(16, 16), FalconLinear(16, 4)).eval()
    x = torch.randn(4, 8)
    opt = fxopt.compile(model, (x,), passes=["merge-consecutive"])
    assert opt.report["merge-consecutive"].applied == 1
    assert count_ops(opt.graph_module, ops.linear) == 2
    torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)


class Casts(nn.Module):
    """What RMSNorm and rotary embeddings spell: casts to the dtype x has, and scaling by 1."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.linear(x.to(torch.float32)) * 1.0
        return h.to(x.device) + ids.to(torch.float32)[..., None] * 1  # an int cast is a real one


def test_casts_to_what_a_tensor_already_is_and_scaling_by_one_are_gone() -> None:
    model = Casts().eval()
    x, ids = torch.randn(2, 3, 8), torch.arange(6).reshape(2, 3)
    gm = fxopt.capture(model, (x, ids))
    names = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not [n for n in names if "_assert_tensor_metadata" in n], names
    # the int64 -> float32 cast stays, and the multiply of its float result by 1 goes
    casts = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("aten.to.")]
    assert len(casts) == 1 and casts[0].args[0].meta["val"].dtype == torch.int64, names
    assert count_ops(gm, aten.mul.Tensor) == 0, names
    torch.testing.assert_close(gm(x, ids)[0], model(x, ids), rtol=0, atol=0)


class MaskedAttention(nn.Module):
    """Attention whose mask is built as transformers builds one for a call without a mask
    (``arange(n) >= 0``, expanded to the batch), or from the input, or from a constant."""

    def __init__(self, mask: str) -> None:
        super().__init__()
        self.mask = mask
        self.register_buffer("keep", torch.tensor([True, True, False, True, True, True]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.view(x.shape[0], 2, 6, 4)
        n = q.shape[2]
        if self.mask == "all-true":
            mask = (torch.arange(n) >= 0)[None, None, None, :].expand(x.shape[0], -1, n, -1)
        elif self.mask == "all-zero":
            mask = torch.zeros(n).mul(2.0)[None, None, None, :].expand(x.shape[0], 1, n, n)
        elif self.mask == "constant-partial":
            mask = self.keep[None, None, None, :].expand(x.shape[0], -1, n, -1)
        else:  # "from-input": which keys count depends on the input
            mask = (x.view(x.shape[0], 6, 8)[:, :, 0] > -10)[:, None, None, :].expand(-1, 1, n, -1)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)


@pytest.mark.parametrize("mask, dropped", [("all-true", True), ("all-zero", True),
                                           ("constant-partial", False), ("from-input", False)])
def test_a_mask_that_masks_nothing_is_dropped(mask: str, dropped: bool) -> None:
    model = MaskedAttention(mask).eval()
    x = torch.randn(3, 48)
    gm = fxopt.capture(model, (x,))
    sdpa = [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 1
    kept = sdpa[0].args[3] if len(sdpa[0].args) > 3 else sdpa[0].kwargs.get("attn_mask")
    assert (kept is None) == dropped
    torch.testing.assert_close(gm(x)[0], model(x))
    said = [n for n in gm.meta["fxopt_notes"] if "attention mask" in n]
    assert said == (["canonicalize: 1 attention mask(s) computed from constants that mask nothing dropped: "
                     "attention runs unmasked"] if dropped else [])
    # the batch stays dynamic: another batch size runs through the graph
    other = torch.randn(5, 48)
    torch.testing.assert_close(gm(other)[0], model(other))


def test_computed_constant_evaluates_only_what_constants_alone_decide() -> None:
    from fxopt.ir import computed_constant

    class Values(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.arange(6.0))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            from_constants = (self.table * 2 + torch.arange(6)) >= 3
            from_input = self.table + x
            drawn = torch.rand(6) + self.table
            return from_constants, from_input, drawn

    gm = fxopt.capture(Values().eval(), (torch.randn(6),))
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    from_constants, from_input, drawn = outputs[:3]
    value = computed_constant(gm, from_constants)
    assert torch.equal(value, (torch.arange(6.0) * 2 + torch.arange(6)) >= 3)
    assert computed_constant(gm, from_input) is None  # reads the input
    assert computed_constant(gm, drawn) is None  # a random op is not a constant
    assert computed_constant(gm, from_constants, max_nodes=1) is None  # more calls than allowed
