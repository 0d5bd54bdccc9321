"""The models ``fxopt bench`` measures, built from code and configs with random weights.

Each builder returns ``(model, example_inputs)`` with the model in eval mode. ``quick``
gives a smaller variant of the same architecture for fast runs and tests. Nothing is
downloaded: the transformers models come from configs, not from a hub.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BenchModel:
    name: str
    description: str
    build: Callable[[bool], tuple[nn.Module, tuple[torch.Tensor, ...]]]


def _settle_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give BatchNorm layers trained-looking statistics (fresh ones are the identity)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


class MLP(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout blocks, then a final Linear."""

    def __init__(self, widths: list[int], dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d_in, d_out in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_mlp(quick: bool = False, *, depth: int | None = None, width: int | None = None,
              batch: int | None = None) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """1024-4096-4096-1024 (batch 64); quick: 256-1024-1024-256 (batch 16).

    ``depth``/``width`` build a deep narrow MLP instead (the scale row's graphs).
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if depth is not None:
        w = width or 16
        widths = [w] * (depth + 1)
        batch = batch or 4
    elif quick:
        widths, batch = [256, 1024, 1024, 256], batch or 16
    else:
        widths, batch = [1024, 4096, 4096, 1024], batch or 64
    model = MLP(widths)
    _settle_batchnorm(model, generator)
    return model.eval(), (torch.randn(batch, widths[0], generator=generator),)


def build_bert(quick: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """BertModel(hidden 768, 4 layers, 12 heads, intermediate 3072), batch 8 x seq 128."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    if quick:
        config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=512, vocab_size=1000)
        batch, seq = 2, 32
    else:
        config = BertConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                            intermediate_size=3072)
        batch, seq = 8, 128
    model = BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def build_llama(quick: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """LlamaModel with grouped-query attention (12 heads, 4 KV heads), SiLU-gated MLP."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    if quick:
        config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                             use_cache=False)
        batch, seq = 2, 32
    else:
        config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                             num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                             use_cache=False)
        batch, seq = 4, 128
    model = LlamaModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def build_gpt2(quick: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """GPT2Model (Conv1D projections): 768 wide, 4 layers, 12 heads."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    if quick:
        config = GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=1000, n_positions=128,
                            use_cache=False)
        batch, seq = 2, 32
    else:
        config = GPT2Config(n_embd=768, n_layer=4, n_head=12, use_cache=False)
        batch, seq = 4, 128
    model = GPT2Model(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def build_vit(quick: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """ViTModel(hidden 768, 4 layers, 12 heads, intermediate 3072), batch 8 of 3 x 224 x 224,
    patch 16 (197 tokens); quick: 128 wide, 2 layers, batch 2 of 3 x 64 x 64 (17 tokens)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    if quick:
        config = ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=512, image_size=64, patch_size=16)
        batch = 2
    else:
        config = ViTConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                           intermediate_size=3072, image_size=224, patch_size=16)
        batch = 8
    model = ViTModel(config).eval()
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    return model, (pixels,)


def build_t5(quick: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """T5EncoderModel (the encoder only: one forward pass), d_model 512, 4 layers, 8 heads,
    d_ff 2048, batch 8 x 128; quick: d_model 128, 2 layers, 4 heads, batch 2 x 32."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    if quick:
        config = T5Config(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4, vocab_size=1000,
                          use_cache=False)
        batch, seq = 2, 32
    else:
        config = T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=4, num_heads=8, use_cache=False)
        batch, seq = 8, 128
    model = T5EncoderModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


class DLRM(nn.Module):
    """DLRM-style: a bottom MLP over dense features, embedding lookups for sparse ones,
    interaction by concatenation, a top MLP to one logit."""

    def __init__(self, dense: int, bottom: list[int], tables: int, rows: int, dim: int, top: list[int]) -> None:
        super().__init__()
        self.bottom = MLP([dense, *bottom], dropout=0.0)
        self.embeddings = nn.ModuleList(nn.Embedding(rows, dim) for _ in range(tables))
        self.top = MLP([bottom[-1] + tables * dim, *top, 1], dropout=0.0)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        features = [self.bottom(dense)]
        features += [table(sparse[:, i]) for i, table in enumerate(self.embeddings)]
        return self.top(torch.cat(features, dim=1))


def build_dlrm(quick: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Bottom MLP 13-512-256-128, 8 tables x 64, top MLP 1024-1024-512-1; batch 256."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if quick:
        model = DLRM(13, [64, 32], tables=4, rows=100, dim=16, top=[128, 64])
        batch, rows, tables = 16, 100, 4
    else:
        model = DLRM(13, [512, 256, 128], tables=8, rows=10_000, dim=64, top=[1024, 1024, 512])
        batch, rows, tables = 256, 10_000, 8
    _settle_batchnorm(model, generator)
    dense = torch.randn(batch, 13, generator=generator)
    sparse = torch.randint(0, rows, (batch, tables), generator=generator)
    return model.eval(), (dense, sparse)


def fresh_inputs(inputs: tuple[torch.Tensor, ...], seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Inputs of the same shapes drawn as the builders draw theirs, from another seed: what
    a calibrated system has not seen. Integers (token ids, table indices) are uniform over the
    example's range, floats normal with the example's mean and spread."""
    generator = torch.Generator().manual_seed(seed)
    fresh = []
    for tensor in inputs:
        source = tensor.detach().cpu()
        if source.dtype == torch.bool or source.numel() < 2 or (
                not source.is_floating_point() and bool(((source == 0) | (source == 1)).all())):
            drawn = source.clone()  # masks keep their pattern
        elif source.is_floating_point():
            drawn = torch.randn(source.shape, generator=generator, dtype=torch.float64)
            drawn = (drawn * source.double().std() + source.double().mean()).to(source.dtype)
        else:
            low, high = int(source.min()), int(source.max())
            drawn = torch.randint(low, high + 1, source.shape, generator=generator, dtype=source.dtype)
        fresh.append(drawn.to(tensor.device))
    return tuple(fresh)


MODELS: dict[str, BenchModel] = {
    "mlp": BenchModel("mlp", "MLP 1024-4096-4096-1024, BatchNorm + Dropout, batch 64", build_mlp),
    "bert": BenchModel("bert", "BertModel 768 wide, 4 layers, batch 8 x 128", build_bert),
    "llama": BenchModel("llama", "LlamaModel 768 wide, 4 layers, GQA 12/4 heads, batch 4 x 128", build_llama),
    "gpt2": BenchModel("gpt2", "GPT2Model 768 wide, 4 layers, batch 4 x 128", build_gpt2),
    "vit": BenchModel("vit", "ViTModel 768 wide, 4 layers, batch 8 of 224 x 224 images, patch 16", build_vit),
    "t5": BenchModel("t5", "T5EncoderModel 512 wide, 4 layers, 8 heads, batch 8 x 128", build_t5),
    "dlrm": BenchModel("dlrm", "DLRM-style: bottom MLP, 8 embedding tables, top MLP, batch 256", build_dlrm),
}
