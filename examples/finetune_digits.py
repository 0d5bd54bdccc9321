"""fxopt.finetune on the digits MLP: low-rank to a quarter of the parameters, then distillation.

The MLP of examples/tune_digits_acceptance.py (64-512-512-512-10, 97.6% on the 540 held-out
images) is factored by low-rank at ``ratio=0.12`` (every Linear, 0.24x the parameters), which
alone loses tens of points; ``fxopt.finetune`` then trains the factors and biases to match
the original model's outputs on the 1257 training images, without their labels. Accuracy
drops are measured on the 540 held-out images, which neither step saw.

    python examples/finetune_digits.py        # FXOPT_EXAMPLE_SMALL=1: shorter training
"""

from __future__ import annotations

import os

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tune_digits_acceptance import accuracy, trained_mlp

import fxopt

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"


def main() -> None:
    model, example, x_held, y_held = trained_mlp()
    digits = load_digits()
    x_train, _, _, _ = train_test_split(digits.data, digits.target, test_size=0.3, stratify=digits.target,
                                        random_state=0)
    unlabelled = list((torch.tensor(x_train, dtype=torch.float32) / 16.0).split(64))
    base = accuracy(model, x_held, y_held)
    factored = fxopt.compile(model, (example,), ["remove-dropout", "fold-batchnorm",
                                                 "low-rank(budget=10, ratio=0.12, multiple=4, min_params=0)"])
    recovered = fxopt.finetune(factored, model, unlabelled, epochs=3 if SMALL else 60, lr=1e-3, temperature=2.0)
    print(recovered.report)
    share = factored.report.final.params / factored.report.original.params
    print(f"\nheld-out accuracy {base:.4f}; parameters x{share:.3f} of the original")
    print(f"low-rank alone:                 drop {base - accuracy(factored, x_held, y_held):+.4f}")
    print(f"low-rank + fxopt.finetune:      drop {base - accuracy(recovered, x_held, y_held):+.4f}")


if __name__ == "__main__":
    main()
