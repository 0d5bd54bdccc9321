"""Hypothesis strategies for random fully connected models.

A model is a list of blocks applied to a running activation ``h`` of shape
``(*lead, width)``. Each block is one of: Linear (with or without bias), a chain of
Linears, BatchNorm (only where it is defined: 2-D activations, or over dim 1 of 3-D ones),
Dropout, an activation, a residual add, a view/reshape round trip, and a sibling fan-out
(several Linears reading ``h`` whose outputs are summed, concatenated, or returned as extra
outputs). Sizes include 1; leading dims vary (batch only, or batch plus extra dims).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Block:
    kind: str
    sizes: tuple[int, ...] = ()  # output widths of the Linears it holds
    bias: tuple[bool, ...] = ()
    option: str = ""  # activation name, fan-out combination, BatchNorm placement


@dataclass(frozen=True)
class ModelSpec:
    d_in: int
    lead: tuple[int, ...]  # leading dims of the input (batch first)
    blocks: tuple[Block, ...]
    dtype: str = "float32"
    seed: int = 0
    bn_affine: bool = True

    def describe(self) -> str:
        body = ", ".join(f"{b.kind}{list(b.sizes) if b.sizes else ''}{'/' + b.option if b.option else ''}"
                         for b in self.blocks)
        return f"x{(*self.lead, self.d_in)} {self.dtype}: {body}"


class FuzzNet(nn.Module):
    """A model built from a :class:`ModelSpec`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList()
        width = spec.d_in
        for block in spec.blocks:
            module, width = _build_block(block, width, spec)
            self.layers.append(module)

    def forward(self, x: torch.Tensor) -> Any:
        h = x
        extra: list[torch.Tensor] = []
        for block, module in zip(self.spec.blocks, self.layers):
            h = _apply_block(block, module, h, extra)
        return (h, *extra) if extra else h


def _linear(d_in: int, d_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=bias)


def _build_block(block: Block, width: int, spec: ModelSpec) -> tuple[nn.Module, int]:
    if block.kind == "linear":
        return _linear(width, block.sizes[0], block.bias[0]), block.sizes[0]
    if block.kind == "chain":
        layers, w = [], width
        for size, bias in zip(block.sizes, block.bias):
            layers.append(_linear(w, size, bias))
            w = size
        return nn.Sequential(*layers), w
    if block.kind == "batchnorm":
        return nn.BatchNorm1d(width, affine=spec.bn_affine), width
    if block.kind == "dropout":
        return nn.Dropout(0.3), width
    if block.kind == "act":
        return ACTIVATIONS[block.option](), width
    if block.kind == "residual":
        # h + Linear(h): the Linear keeps the width
        return _linear(width, width, block.bias[0]), width
    if block.kind == "view":
        return nn.Identity(), width
    if block.kind == "fanout":
        heads = nn.ModuleList(_linear(width, s, b) for s, b in zip(block.sizes, block.bias))
        if block.option == "sum":
            return heads, block.sizes[0]
        if block.option == "cat":
            return heads, sum(block.sizes)
        return heads, block.sizes[0]  # "outputs": the first head continues, the rest are returned
    raise AssertionError(block.kind)


def _apply_block(block: Block, module: nn.Module, h: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
    if block.kind in ("linear", "chain", "dropout", "act"):
        return module(h)
    if block.kind == "batchnorm":
        if h.dim() == 2:
            return module(h)
        # BatchNorm1d normalizes dim 1: move features there and back
        return module(h.transpose(1, -1)).transpose(1, -1)
    if block.kind == "residual":
        return h + module(h)
    if block.kind == "view":
        lead, width = h.shape[:-1], h.shape[-1]
        flat = h.reshape(-1, width)
        return flat.view(*lead, width)
    if block.kind == "fanout":
        outs = [head(h) for head in module]
        if block.option == "sum":
            total = outs[0]
            for out in outs[1:]:
                total = total + out
            return total
        if block.option == "cat":
            return torch.cat(outs, dim=-1)
        extra.extend(outs[1:])
        return outs[0]
    raise AssertionError(block.kind)


sizes = st.sampled_from([1, 2, 3, 4, 5, 8, 16, 17, 32])


@st.composite
def blocks(draw: st.DrawFn, lead_dims: int) -> Block:
    kinds = ["linear", "chain", "batchnorm", "dropout", "act", "residual", "view", "fanout"]
    kind = draw(st.sampled_from(kinds))
    if kind == "linear":
        return Block(kind, (draw(sizes),), (draw(st.booleans()),))
    if kind == "chain":
        n = draw(st.integers(2, 3))
        return Block(kind, tuple(draw(sizes) for _ in range(n)), tuple(draw(st.booleans()) for _ in range(n)))
    if kind == "act":
        return Block(kind, option=draw(st.sampled_from(sorted(ACTIVATIONS))))
    if kind == "residual":
        return Block(kind, bias=(draw(st.booleans()),))
    if kind == "fanout":
        n = draw(st.integers(2, 3))
        option = draw(st.sampled_from(["sum", "cat", "outputs"]))
        if option == "sum":
            width = draw(sizes)
            widths = (width,) * n
        else:
            widths = tuple(draw(sizes) for _ in range(n))
        return Block(kind, widths, tuple(draw(st.booleans()) for _ in range(n)), option)
    if kind == "batchnorm" and lead_dims > 2:
        return Block("dropout")  # BatchNorm1d takes (N, C) or (N, C, L) only
    return Block(kind)


@st.composite
def model_specs(draw: st.DrawFn, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> ModelSpec:
    """A random model: 1-6 blocks over an input of shape ``(*lead, d_in)``."""
    lead = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5]), min_size=1, max_size=3)))
    spec_blocks = tuple(draw(st.lists(blocks(len(lead) + 1), min_size=1, max_size=6)))
    # BatchNorm in training-free eval mode needs at least one element per channel; with
    # batch 1 it still works in eval, so no constraint beyond the block filter above.
    return ModelSpec(
        d_in=draw(sizes),
        lead=lead,
        blocks=spec_blocks,
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**16)),
        bn_affine=draw(st.booleans()),
    )


def build(spec: ModelSpec) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model (eval mode, trained-looking BatchNorm statistics) and an input."""
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    model = FuzzNet(spec)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.25)
                if module.affine:
                    module.weight.copy_(torch.randn(n, generator=generator))
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.5)
    dtype = DTYPES[spec.dtype]
    model = model.to(dtype).eval()
    x = torch.randn(*spec.lead, spec.d_in, generator=generator).to(dtype)
    return model, (x,)


@dataclass
class Snapshot:
    """Everything of a model the "nothing lost" property protects, copied bit for bit."""

    tree: list[tuple[str, str, bool]]
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module) -> Snapshot:
        tree = [(name, type(m).__name__, m.training) for name, m in model.named_modules()]
        state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        return cls(tree, state)

    def assert_same(self, model: nn.Module) -> None:
        after = Snapshot.of(model)
        assert after.tree == self.tree, "module tree or train/eval flags changed"
        assert after.state.keys() == self.state.keys(), "state_dict keys changed"
        for name, before in self.state.items():
            now = after.state[name]
            assert now.dtype == before.dtype and now.shape == before.shape, f"{name} changed dtype or shape"
            # bitwise: NaN-safe and sign-of-zero-safe
            assert torch.equal(_bits(now), _bits(before)), f"{name} changed"


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes: NaN == NaN, and -0.0 != 0.0."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)
