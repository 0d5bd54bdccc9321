"""fxopt.tune(..., recover=) on the digits MLP: over-budget options fine-tuned into the budget.

The MLP of examples/tune_digits_acceptance.py; each split draws 360 validation rows and 180
unseen ones from the 540 held-out images (seeds 0, 1, ...). ``fxopt.tune`` with low-rank at
``max_drop=0.02`` runs without and with ``recover=`` (the 1257 training images, no labels):
the log's ``recover`` rows say which refused options distillation brought within the budget,
and the unseen drop checks the result on rows neither step saw.

    python examples/tune_recover_digits.py --splits 3     # FXOPT_EXAMPLE_SMALL=1: shorter
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tune_digits_acceptance import accuracy, trained_mlp

import fxopt

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=1)
    parser.add_argument("--time-budget", type=float, default=3.0 if SMALL else 10.0, help="seconds per tune")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, example, x_held, y_held = trained_mlp()
    digits = load_digits()
    x_train, _, _, _ = train_test_split(digits.data, digits.target, test_size=0.3, stratify=digits.target,
                                        random_state=0)
    unlabelled = list((torch.tensor(x_train, dtype=torch.float32) / 16.0).split(64))
    recover = {"data": unlabelled, "epochs": 2 if SMALL else 10, "lr": 1e-3, "candidates": 1 if SMALL else 3}
    for seed in range(args.splits):
        order = torch.randperm(len(y_held), generator=torch.Generator().manual_seed(seed))
        val, unseen = order[:360], order[360:]
        data = list(zip(x_held[val].split(90), y_held[val].split(90)))
        for label, option in (("without recover", None), ("with recover", recover)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = fxopt.tune(model, (example,), data=data, metric="accuracy", max_drop=0.02,
                                 techniques="low-rank", time_budget_s=args.time_budget, repeats=3 if SMALL else 5,
                                 progress=False, recover=option)
            log = opt.report.search
            drop = accuracy(model, x_held[unseen], y_held[unseen]) - accuracy(opt, x_held[unseen], y_held[unseen])
            share = opt.report.final.params / opt.report.original.params
            print(f"split {seed} {label:<15}: unseen drop {drop:+.4f}, x{log.final_speedup:.2f}, "
                  f"parameters x{share:.3f}: " + (", ".join(f"{s}={o}" for s, o in log.chosen.items()) or "unchanged"))
            for candidate in log.candidates:
                if candidate.phase == "recover":
                    print(f"    recover {'kept' if candidate.kept else 'dropped'}: {candidate.describe()}: "
                          f"{candidate.reason}")
    print(f"\nthe last model's report:\n{opt.report}")


if __name__ == "__main__":
    main()
