"""Does fxopt.tune's budget hold on data it never saw? The digits protocol, split by split.

An MLP (64-512-512-512-10, BatchNorm, Dropout) trained on a stratified 70% of scikit-learn's
digits (``random_state=0``, 40 epochs of AdamW, lr 2e-3); the other 30%, 540 images, is split
at random (seeds 0 .. splits-1) into validation rows that tune measures on and unseen rows it
never sees, and the accuracy drop of the tuned model is measured on the unseen rows. Two
settings (``--setting``, default both):

- ``small``: 128 validation rows, ``max_drop=0.01``. Too few to show a one-point drop at 95%:
  tune must say so up front and return no lossy rewrite (unseen drop 0 in every split).
- ``large``: 360 validation rows, 180 unseen, ``max_drop=0.02``: the unseen drop must stay
  within 2 points in at least 19 of 20 splits, and the tuned model be faster than eager.

Per split: the tuner's own speedup (over the model after the exact passes, its side-by-side
loop) and the speedup over the user's eager model, timed side by side here. ``--compare``
also runs ``confirm=False`` (the bound judged on every batch, no confirmation split) and
``confidence=None`` (point estimates) on the same splits.

    python examples/tune_digits_acceptance.py                       # 20 splits of each setting
    python examples/tune_digits_acceptance.py --setting large --splits 5 --compare

No download: the digits ship with scikit-learn. ``FXOPT_EXAMPLE_SMALL=1``: shorter training,
one split, a short search. Each setting ends with its last tuned model's report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fxopt
from fxopt.latency import measure_side_by_side

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


SETTINGS = {"small": (128, 0.01), "large": (360, 0.02)}  # validation rows of the 540, max_drop
ACCEPTANCE = {"confirm (default)": {}, "confirm=False": {"confirm": False}, "confidence=None": {"confidence": None}}


def speedup_over_eager(model: torch.nn.Module, opt: torch.nn.Module, example: torch.Tensor) -> float:
    with torch.no_grad():
        timings = measure_side_by_side({"eager": lambda: model(example), "tuned": lambda: opt(example)},
                                       warmup=3, repeats=30 if SMALL else 100)
    return timings["eager"].median / timings["tuned"].median


def run_setting(name: str, model: torch.nn.Module, example: torch.Tensor, x_held: torch.Tensor,
                y_held: torch.Tensor, args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    rows, max_drop = SETTINGS[name]
    print(f"\n== {name}: {rows} validation rows, {len(y_held) - rows} unseen, max_drop {max_drop:g}, "
          f"{args.splits} splits ==", flush=True)
    variants = ACCEPTANCE if args.compare else dict(list(ACCEPTANCE.items())[:1])
    results: dict[str, list[dict[str, float]]] = {label: [] for label in variants}
    for seed in range(args.splits):
        order = torch.randperm(len(y_held), generator=torch.Generator().manual_seed(seed))
        val, unseen = order[:rows], order[rows:]
        data = list(zip(x_held[val].split(90), y_held[val].split(90)))
        for label, options in variants.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt = fxopt.tune(model, (example,), data=data, metric="accuracy", max_drop=max_drop,
                                 time_budget_s=args.time_budget, repeats=3 if SMALL else 5, progress=False,
                                 **options)
            said = any("cannot show" in str(w.message) for w in caught) or any(
                "cannot show" in note for note in opt.report.notes)
            log = opt.report.search
            unseen_drop = accuracy(model, x_held[unseen], y_held[unseen]) - accuracy(opt, x_held[unseen], y_held[unseen])
            eager = speedup_over_eager(model, opt, example)
            results[label].append({"drop": log.final_drop, "unseen": unseen_drop, "tuner": log.final_speedup,
                                   "eager": eager, "said": said, "lossy": bool(log.chosen)})
            print(f"split {seed:>2} {label:<18} validation drop {log.final_drop:+.4f}"
                  + ("" if log.final_bound is None else f" (bound {log.final_bound:+.4f})")
                  + f", unseen drop {unseen_drop:+.4f}, tuner x{log.final_speedup:.2f}, eager x{eager:.2f}"
                  + (", said up front: data too small" if said else "") + ": "
                  + (", ".join(f"{site}={option}" for site, option in log.chosen.items()) or "unchanged"), flush=True)
    print(f"\n{name}: {'acceptance':<18} {'unseen drop <= max_drop':>24} {'worst':>8} {'lossy':>6} "
          f"{'said up front':>14} {'tuner speedup (median)':>23} {'faster than eager':>18}")
    for label, found in results.items():
        within = sum(r["unseen"] <= max_drop + 1e-9 for r in found)
        faster = f"{sum(r['eager'] > 1 for r in found)}/{len(found)}"
        print(f"{name}: {label:<18} {f'{within}/{len(found)}':>24} {max(r['unseen'] for r in found):>+8.4f} "
              f"{sum(r['lossy'] for r in found):>6} {sum(r['said'] for r in found):>14} "
              f"{statistics.median(r['tuner'] for r in found):>22.2f}x "
              f"{faster:>18}")
    print(f"\nthe last tuned model's report:\n{opt.report}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=[*SETTINGS, "both"], default="both")
    parser.add_argument("--splits", type=int, default=1 if SMALL else 20, help="random splits, seeds 0..splits-1")
    parser.add_argument("--time-budget", type=float, default=3.0 if SMALL else 12.0, help="seconds per tune")
    parser.add_argument("--compare", action="store_true", help="also confirm=False and confidence=None")
    args = parser.parse_args()

    model, example, x_held, y_held = trained_mlp()
    print(f"trained: accuracy {accuracy(model, x_held, y_held):.4f} on the {len(y_held)} held-out images")
    for name in SETTINGS if args.setting == "both" else [args.setting]:
        run_setting(name, model, example, x_held, y_held, args)


if __name__ == "__main__":
    main()
