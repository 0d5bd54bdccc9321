"""A transformer end to end: tuned within an accuracy budget, and a compression over budget
won back by distillation, each judged on sequences no step saw.

A BertForSequenceClassification built from a small config (hidden 64, 2 layers, 4 heads,
random init: nothing downloaded) is trained here for about 45 s on a synthetic task with
structure to learn: every sequence of 16 tokens holds token A once and token B once, at
random positions among random filler tokens, and the label is whether A comes before B
(an order, so attention and positions matter; a bag of tokens cannot do better than 50%).

1. ``fxopt.tune(..., metric="accuracy", data=val, max_drop=0.02)`` on 768 labelled
   validation sequences (chosen on the even batches, confirmed on the odd ones).
2. A compression far past any sensible budget: every Linear factored by low-rank at
   ``ratio=0.03`` (rank 2 on the 64-wide Linears), then the feed-forward hidden units pruned
   with a budget of 10 (about 7% of the parameters left, embeddings included), then
   ``fxopt.finetune`` on 1024 unlabelled sequences. The trained model is robust (what it
   learned is one bit of order), so even this loses only a fraction of a point.

Accuracy is reported on 4000 test sequences drawn apart from both (another seed), and the
models are timed side by side.

    python examples/tune_bert_synthetic.py      # FXOPT_EXAMPLE_SMALL=1: a short smoke run
"""

from __future__ import annotations

import os
import time

import torch
import transformers

import fxopt
from fxopt.latency import measure_side_by_side

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"
VOCAB, SEQ, CLS, A, B = 32, 16, 1, 4, 5  # filler tokens are 6..31
torch.set_num_threads(1)  # on a shared machine, contended threads time mostly noise
transformers.logging.set_verbosity_error()


def sequences(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` sequences holding A and B once each; label 1 when A comes first."""
    ids = torch.randint(6, VOCAB, (rows, SEQ), generator=generator)
    where = torch.stack([torch.randperm(SEQ - 1, generator=generator)[:2] + 1 for _ in range(rows)])
    ids[torch.arange(rows), where[:, 0]] = A
    ids[torch.arange(rows), where[:, 1]] = B
    ids[:, 0] = CLS
    return ids, (where[:, 0] < where[:, 1]).long()


def trained_bert(steps: int) -> torch.nn.Module:
    hidden = 64
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=4 * hidden, max_position_embeddings=SEQ, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    model.config.return_dict = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids, labels = sequences(64, generator)
        optimizer.zero_grad()
        model(ids, labels=labels).loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def accuracy(model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    ids, labels = test
    with torch.no_grad():
        return sum(int((model(x).logits.argmax(-1) == y).sum()) for x, y in zip(ids.split(500), labels.split(500))) \
            / len(labels)


def main() -> None:
    started = time.perf_counter()
    model = trained_bert(60 if SMALL else 300)
    val = [sequences(128, torch.Generator().manual_seed(100 + i)) for i in range(6)]
    unlabelled = [sequences(64, torch.Generator().manual_seed(200 + i))[0] for i in range(16)]
    test = sequences(4000, torch.Generator().manual_seed(999))
    example = (val[0][0][:8],)
    base = accuracy(model, test)
    print(f"trained in {time.perf_counter() - started:.0f}s: accuracy {base:.4f} on {len(test[1])} test sequences",
          flush=True)

    tuned = fxopt.tune(model, example, data=val, metric="accuracy", max_drop=0.02, time_budget_s=5 if SMALL else 60,
                       repeats=3 if SMALL else 5, progress=False)
    log = tuned.report.search
    print(tuned.report)
    print(f"\ntune: x{log.final_speedup:.2f} (its own measurement) at a validation drop of {log.final_drop:+.4f}"
          + (f" (95% bound {log.final_bound:+.4f} on the confirmation rows)" if log.chosen else "")
          + f"; test drop {base - accuracy(tuned, test):+.4f}")

    factored = fxopt.compile(model, example, ["low-rank(budget=10, ratio=0.03, multiple=1, min_params=0)",
                                              "prune-hidden(budget=10, multiple=4)"])
    started = time.perf_counter()
    recovered = fxopt.finetune(factored, model, unlabelled, epochs=3 if SMALL else 30, lr=3e-3, schedule="cosine",
                               progress=False)
    seconds = time.perf_counter() - started
    share = factored.report.final.params / factored.report.original.params
    print(f"low-rank(ratio=0.03) + prune-hidden, x{share:.3f} of the parameters: test drop {base - accuracy(factored, test):+.4f}; "
          f"after fxopt.finetune ({seconds:.0f}s, {len(unlabelled)} unlabelled batches): "
          f"{base - accuracy(recovered, test):+.4f}")

    models = {"eager PyTorch": model, "tune": tuned, "low-rank": factored, "low-rank + finetune": recovered}
    timings = measure_side_by_side({name: (lambda m=m: m(*example)) for name, m in models.items()},
                                   warmup=3, repeats=20 if SMALL else 100)
    print("\nside by side (batch 8 x 16 tokens, one interleaved loop, one thread):")
    for name, m in models.items():
        print(f"  {name:<22} {timings[name]!s:<30} x{timings['eager PyTorch'].median / timings[name].median:.2f}  "
              f"test accuracy {accuracy(m, test):.4f}")


if __name__ == "__main__":
    main()
