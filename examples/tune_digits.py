"""fxopt.tune on real data: scikit-learn's handwritten digits and an MLP trained in seconds.

Trains a 64-512-512-512-10 MLP (BatchNorm, Dropout) with a fixed seed, then asks fxopt.tune
for the fastest model within 0.5 and 1 point of accuracy drop on the validation split, and
compares it side by side (one interleaved timing loop) with the best that int8 alone and
low-rank alone reach within the same drops. Accuracy is also reported on a test split that
neither training nor tuning saw. Drops are judged by their 95% upper confidence bound (the
default): 359 validation rows cannot support half a point (598 are needed), so at 0.005
tune says so and changes nothing lossy; examples/tune_digits_acceptance.py compares the
bound with point estimates on unseen data.

    python examples/tune_digits.py            # FXOPT_EXAMPLE_SMALL=1: shorter training, one drop
"""

from __future__ import annotations

import os

import torch
from sklearn.datasets import load_digits

import fxopt
from fxopt.latency import measure_side_by_side

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"
torch.manual_seed(0)
# One thread: on a shared machine, two threads contending with other work time mostly noise.
torch.set_num_threads(1)


def mlp() -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    width = 64
    for _ in range(3):
        layers += [torch.nn.Linear(width, 512), torch.nn.BatchNorm1d(512), torch.nn.ReLU(), torch.nn.Dropout(0.2)]
        width = 512
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def splits() -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):  # epochs, not seconds: the same model on a busy machine
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()


def accuracy(run, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((run(x).argmax(-1) == y).float().mean())


def main() -> None:
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits()
    model = mlp()
    train(model, x_train, y_train, epochs=5 if SMALL else 12)
    example = (x_train[:64],)
    data = list(zip(x_val.split(90), y_val.split(90)))  # validation batches: what tune measures on
    print(f"trained: validation accuracy {accuracy(model, x_val, y_val):.4f}, test {accuracy(model, x_test, y_test):.4f}")

    drops = (0.01,) if SMALL else (0.005, 0.01)
    families = {"tune (every technique)": None, "int8 alone": "int8", "low-rank alone": "low-rank"}
    models: dict[str, torch.nn.Module] = {"eager PyTorch": model,
                                          "fxopt exact passes": fxopt.compile(model, example)}
    for drop in drops:
        for label, techniques in families.items():
            opt = fxopt.tune(model, example, data=data, metric="accuracy", max_drop=drop, techniques=techniques,
                             time_budget_s=20 if SMALL else 40, repeats=10 if SMALL else 20,
                             progress=False)
            models[f"{label} @ {drop:g}"] = opt
            if techniques is None and drop == drops[-1]:
                tuned = opt
    print(tuned.report)

    timings = measure_side_by_side({name: (lambda m=m: m(*example)) for name, m in models.items()},
                                   warmup=3, repeats=20 if SMALL else 100)
    base = timings["eager PyTorch"].median
    base_val = accuracy(model, x_val, y_val)
    base_test = accuracy(model, x_test, y_test)
    print("\nside by side (batch 64, one interleaved loop; speedup over eager PyTorch):")
    print(f"{'model':<32} {'latency ms (IQR)':<26} {'speedup':>8} {'val drop':>9} {'test drop':>9}")
    for name, m in models.items():
        t = timings[name]
        print(f"{name:<32} {str(t):<26} {base / t.median:>7.2f}x "
              f"{base_val - accuracy(m, x_val, y_val):>+9.4f} {base_test - accuracy(m, x_test, y_test):>+9.4f}")


if __name__ == "__main__":
    main()
