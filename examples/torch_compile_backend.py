"""Use fxopt as a torch.compile backend: no fxopt import needed once it is installed.

    python examples/torch_compile_backend.py
"""

from __future__ import annotations

import os

import torch
from torch import nn

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"


def main() -> None:
    torch.manual_seed(0)
    d_in, hidden = (16, 32) if SMALL else (512, 2048)
    model = nn.Sequential(
        nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 8)
    ).eval()

    compiled = torch.compile(model, backend="fxopt", dynamic=True,
                             options={"passes": ["remove-dropout", "fold-batchnorm"]})
    for batch in (2, 7, 5):
        x = torch.randn(batch, d_in)
        diff = (compiled(x) - model(x)).abs().max().item()
        print(f"batch {batch}: max abs difference {diff:.2e}")

    from fxopt.frontends.dynamo import last_reports

    for report in last_reports():
        print(report)

    # Changing a weight after compiling re-optimizes on the next call instead of
    # silently running the old frozen weights.
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    x = torch.randn(4, d_in)
    print("after a weight change: max abs difference", (compiled(x) - model(x)).abs().max().item())


if __name__ == "__main__":
    main()
