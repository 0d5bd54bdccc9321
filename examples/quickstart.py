"""Quickstart: optimize a small MLP recommender head and inspect what changed.

    python examples/quickstart.py
"""

from __future__ import annotations

import os

import torch
from torch import nn

import fxopt

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"


class Ranker(nn.Module):
    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2),
        )
        self.click = nn.Linear(hidden, 1)
        self.dwell = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.click(h), self.dwell(h)


def main() -> None:
    torch.manual_seed(0)
    d_in, hidden, batch = (16, 32, 4) if SMALL else (256, 1024, 64)
    model = Ranker(d_in, hidden).eval()
    x = torch.randn(batch, d_in)

    opt = fxopt.compile(model, (x,))  # the default pipeline: every exact pass
    print(opt.report)

    click, dwell = opt(x)
    ref_click, ref_dwell = model(x)
    print("max abs difference:", max((click - ref_click).abs().max().item(), (dwell - ref_dwell).abs().max().item()))
    print(opt.graph_module.code)


if __name__ == "__main__":
    main()
