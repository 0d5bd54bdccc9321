"""The built-in demo model: Linear+BatchNorm+Dropout blocks feeding sibling heads."""

from __future__ import annotations

import torch
from torch import nn


class DemoNet(nn.Module):
    """An MLP tower (Linear -> BatchNorm -> ReLU -> Dropout, twice) with three sibling heads,
    the shape of a recommendation or multi-task ranking model."""

    def __init__(self, d_in: int = 512, hidden: int = 1024, heads: tuple[int, ...] = (128, 64, 32)) -> None:
        super().__init__()
        self.tower = nn.Sequential(
            nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1),
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, width) for width in heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.tower(x)
        return tuple(head(h) for head in self.heads)


def build_demo(seed: int = 0, batch: int = 64, d_in: int = 512, hidden: int = 1024) -> tuple[DemoNet, tuple[torch.Tensor]]:
    """The demo model in eval mode with trained-looking BatchNorm statistics, and an input."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DemoNet(d_in, hidden)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    model.eval()
    return model, (torch.randn(batch, d_in, generator=generator),)
