"""Does fxopt.tune's budget hold on data it never saw? Point estimates against confidence bounds.

The protocol of docs/tune.md ("How acceptance works"): an MLP (64-512-512-512-10, BatchNorm,
Dropout) trained on a stratified 70% of scikit-learn's digits (``random_state=0``, 40 epochs
of AdamW, lr 2e-3); the other 30%, 540 images, is split at random (seeds 0, 1, ...) into
validation rows that tune measures on and unseen rows it never sees. For each split, tune
runs with ``confidence=None`` (the drop measured on the validation rows) and with the
default 95% bound, and the accuracy drop of its result is measured on the unseen rows.

    python examples/tune_digits_acceptance.py --rows 360 --max-drop 0.02 --splits 3
    python examples/tune_digits_acceptance.py --rows 128 --max-drop 0.01 --splits 3

No download: the digits ship with scikit-learn. ``FXOPT_EXAMPLE_SMALL=1``: shorter training,
one split, a short search. The last tuned model's report is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fxopt

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"
torch.set_num_threads(1)  # one thread: timings on a shared machine are noise enough


def trained_mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MLP, an example batch from the training split, and the 540 held-out images."""
    digits = load_digits()
    x_train, x_held, y_train, y_held = train_test_split(digits.data, digits.target, test_size=0.3,
                                                        stratify=digits.target, random_state=0)
    x_train = torch.tensor(x_train, dtype=torch.float32) / 16.0
    y_train = torch.tensor(y_train)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    width = 64
    for _ in range(3):
        layers += [torch.nn.Linear(width, 512), torch.nn.BatchNorm1d(512), torch.nn.ReLU(), torch.nn.Dropout(0.2)]
        width = 512
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(5 if SMALL else 40):
        for batch in torch.randperm(len(x_train)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    return model, x_train[:64], torch.tensor(x_held, dtype=torch.float32) / 16.0, torch.tensor(y_held)


def accuracy(run, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((run(x).argmax(-1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=360, help="validation rows of the 540 (the rest are unseen)")
    parser.add_argument("--max-drop", type=float, default=0.02)
    parser.add_argument("--splits", type=int, default=1 if SMALL else 3, help="random splits, seeds 0..splits-1")
    parser.add_argument("--time-budget", type=float, default=3.0 if SMALL else 10.0, help="seconds per tune")
    args = parser.parse_args()

    model, example, x_held, y_held = trained_mlp()
    print(f"trained: accuracy {accuracy(model, x_held, y_held):.4f} on the {len(y_held)} held-out images; "
          f"{args.rows} validation rows, {len(y_held) - args.rows} unseen, max_drop {args.max_drop:g}")
    results: dict[str, list[tuple[float, float, float]]] = {"confidence=None": [], "confidence=0.95": []}
    for seed in range(args.splits):
        order = torch.randperm(len(y_held), generator=torch.Generator().manual_seed(seed))
        val, unseen = order[:args.rows], order[args.rows:]
        data = list(zip(x_held[val].split(90), y_held[val].split(90)))
        for label, confidence in (("confidence=None", None), ("confidence=0.95", 0.95)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the report's note says it too
                opt = fxopt.tune(model, (example,), data=data, metric="accuracy", max_drop=args.max_drop,
                                 confidence=confidence, time_budget_s=args.time_budget, repeats=3 if SMALL else 5,
                                 progress=False)
            log = opt.report.search
            unseen_drop = accuracy(model, x_held[unseen], y_held[unseen]) - accuracy(opt, x_held[unseen], y_held[unseen])
            results[label].append((log.final_drop, unseen_drop, log.final_speedup))
            print(f"split {seed} {label:<16} validation drop {log.final_drop:+.4f}"
                  + ("" if log.final_bound is None else f" (bound {log.final_bound:+.4f})")
                  + f", unseen drop {unseen_drop:+.4f}, x{log.final_speedup:.2f}: "
                  + (", ".join(f"{site}={option}" for site, option in log.chosen.items()) or "unchanged"), flush=True)
    print(f"\nthe last model's report:\n{opt.report}")
    print(f"\n{'':<16} {'unseen drop <= max_drop':>24} {'worst unseen drop':>18} {'median speedup':>15}")
    for label, rows in results.items():
        within = sum(unseen <= args.max_drop + 1e-9 for _, unseen, _ in rows)
        speedups = sorted(s for _, _, s in rows)
        print(f"{label:<16} {f'{within}/{len(rows)}':>24} {max(u for _, u, _ in rows):>+18.4f} "
              f"{speedups[len(speedups) // 2]:>14.2f}x")


if __name__ == "__main__":
    main()
