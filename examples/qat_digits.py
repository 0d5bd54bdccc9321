"""Quantization-aware training with fxopt.finetune: int8 on a digits MLP with activation outliers.

A 64-256-256-10 MLP (ReLU, Dropout) is trained on scikit-learn's digits (stratified 70/30 split,
``random_state=0``, 40 epochs of AdamW), then given activation outliers without changing its
function: each hidden layer gets 4 more units whose activation is a large constant (incoming
weights 0, bias ``OUTLIER``), read by the next layer with small random weights whose sum
times ``OUTLIER`` is taken off its bias (a constant unit is a bias in disguise, like the
constant "massive activations" of large language models). Per-tensor and per-token int8
activations must then cover a range set by those units, and SmoothQuant cannot remove them
(it divides channels by scales; a constant large value stays large relative to the others'
variation once its reader's weights take the scale).

It prints accuracy on the 540 test images (seen by no step): the float model; ``preset="int8"``
(eager) as it ships, within its 5% output-error budget (Linears over it stay float); each of the
preset's eager int8 recipes with every Linear it can quantize in int8 (no budget); and the best
of those after ``fxopt.finetune`` with quantization-aware training on the 1257 training images
without their labels.

    python examples/qat_digits.py         # FXOPT_EXAMPLE_SMALL=1: shorter training
"""

from __future__ import annotations

import os

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fxopt

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"
HIDDEN, EXTRA, OUTLIER, READ_SCALE = 256, 4, 5000.0, 0.1
# The preset's eager int8 recipes (passes/presets.py), with every Linear they can quantize (budget lifted).
UNBOUNDED = "budget=1000"
RECIPES = {
    "static uint8": ["remove-dropout", f"quantize-int8(activations='static', symmetric=False, {UNBOUNDED})"],
    "smooth-quant + static uint8": ["remove-dropout", "smooth-quant(explicit=True)",
                                    f"quantize-int8(activations='static', symmetric=False, {UNBOUNDED})"],
    "dynamic per tensor": ["remove-dropout", f"quantize-int8(activations='dynamic-tensor', {UNBOUNDED})"],
    "dynamic per token": ["remove-dropout", f"quantize-int8({UNBOUNDED})"],
}


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.3,
                                                        stratify=digits.target, random_state=0)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float32) / 16.0  # noqa: E731
    return as_tensor(x_train), torch.tensor(y_train), as_tensor(x_test), torch.tensor(y_test)


def trained_mlp(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(HIDDEN, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(5 if SMALL else 40):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def with_outliers(model: torch.nn.Sequential) -> torch.nn.Sequential:
    """The same function with ``EXTRA`` constant units of value ``OUTLIER`` in each hidden layer."""
    generator = torch.Generator().manual_seed(0)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    layers: list[torch.nn.Module] = []
    for index, linear in enumerate(linears):
        weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
        if index > 0:  # read the previous layer's constant units; their contribution leaves the bias
            reads = READ_SCALE * torch.randn(weight.shape[0], EXTRA, generator=generator)
            weight, bias = torch.cat([weight, reads], 1), bias - reads.sum(1) * OUTLIER
        if index < len(linears) - 1:  # EXTRA more units: weights 0, bias OUTLIER (ReLU keeps it)
            weight = torch.cat([weight, torch.zeros(EXTRA, weight.shape[1])], 0)
            bias = torch.cat([bias, torch.full((EXTRA,), OUTLIER)])
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        layers += [layer, torch.nn.ReLU()] if index < len(linears) - 1 else [layer]
    return torch.nn.Sequential(*layers).eval()


def accuracy(run, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((run(x).argmax(-1) == y).float().mean())


def main() -> None:
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = data()
    model = with_outliers(trained_mlp(x_train, y_train))
    example, calibration = x_train[:64], list(x_train.split(64))[:8]
    base = accuracy(model, x_test, y_test)
    print(f"float: accuracy {base:.4f} on the {len(y_test)} test images")

    preset = fxopt.compile(model, (example,), preset="int8", backend="eager", calibration=calibration)
    layers = preset.report["quantize-int8"]
    print(f"preset int8 (5% output budget, {layers.applied} of {layers.matched} Linears int8): "
          f"accuracy {accuracy(preset, x_test, y_test):.4f}")

    results = {}
    for name, passes in RECIPES.items():
        results[name] = fxopt.compile(model, (example,), passes, backend="eager", calibration=calibration)
        print(f"every Linear int8, {name} ({results[name].report['quantize-int8'].applied} Linears): "
              f"accuracy {accuracy(results[name], x_test, y_test):.4f}")
    best = max(results, key=lambda name: accuracy(results[name], x_test, y_test))
    ptq = accuracy(results[best], x_test, y_test)

    unlabelled = list(x_train.split(64))
    trained = fxopt.finetune(results[best], model, unlabelled, epochs=2 if SMALL else 20, lr=3e-4,
                                schedule="cosine")
    print(trained.report)
    qat = accuracy(trained, x_test, y_test)
    print(f"\nfloat                                 {base:.4f}")
    print(f"best post-training int8 ({best}) {ptq:.4f}  drop {base - ptq:+.4f}")
    print(f"after quantization-aware training      {qat:.4f}  drop {base - qat:+.4f} "
          f"({(ptq - qat) / (ptq - base) if ptq != base else float('nan'):.0%} of the drop recovered)")


if __name__ == "__main__":
    main()
