"""fxopt.tune on a transformer: a small BertForSequenceClassification built from a config
(nothing downloaded), trained briefly on a synthetic task (does token 7 appear in the
sequence?), then tuned within 1 point of accuracy drop and compared side by side with the
best int8 alone and low-rank alone reach within the same drop.

    python examples/tune_transformer.py       # FXOPT_EXAMPLE_SMALL=1: fewer steps and techniques
"""

from __future__ import annotations

import os

import torch
import transformers

import fxopt
from fxopt.latency import measure_side_by_side

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"
VOCAB, SEQ, MARKER = 64, 16, 7
torch.manual_seed(0)
torch.set_num_threads(1)  # on a shared machine, contended threads time mostly noise
transformers.logging.set_verbosity_error()


def batch(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(8, VOCAB, (rows, SEQ), generator=generator)
    has = torch.rand(rows, generator=generator) < 0.5
    where = torch.randint(0, SEQ, (rows,), generator=generator)
    ids[has, where[has]] = MARKER
    return ids, has.long()


def main() -> None:
    hidden = 64 if SMALL else 128
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=1 if SMALL else 2,
                                     num_attention_heads=4, intermediate_size=4 * hidden,
                                     max_position_embeddings=SEQ, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    model.config.return_dict = True
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(60 if SMALL else 200):
        ids, labels = batch(32, generator)
        optimizer.zero_grad()
        model(ids, labels=labels).loss.backward()
        optimizer.step()
    model.eval()

    data = [batch(128, generator) for _ in range(2)]  # held out from training
    example = (data[0][0][:8],)
    with torch.no_grad():
        accuracy = sum(int((model(x).logits.argmax(-1) == y).sum()) for x, y in data) / sum(len(y) for _, y in data)
    print(f"trained: accuracy {accuracy:.4f} on {sum(len(y) for _, y in data)} held-out sequences")

    families = {"tune (every technique)": None, "int8 alone": "int8", "low-rank alone": "low-rank"}
    if SMALL:  # a smoke run: one search over two techniques
        families = {"tune (int8-dynamic + low-rank)": "int8-dynamic,low-rank"}
    models: dict[str, torch.nn.Module] = {"eager PyTorch": model,
                                          "fxopt exact passes": fxopt.compile(model, example)}
    for label, techniques in families.items():
        budget = 10 if SMALL else 30 if techniques is None else 15
        opt = fxopt.tune(model, example, data=data, metric="accuracy", max_drop=0.01, techniques=techniques,
                         time_budget_s=budget, repeats=5 if SMALL else 15, progress=False)
        models[label] = opt
        if label.startswith("tune"):
            print(opt.report)

    timings = measure_side_by_side({name: (lambda m=m: m(*example)) for name, m in models.items()},
                                   warmup=3, repeats=20 if SMALL else 100)
    base = timings["eager PyTorch"].median
    print("\nside by side (batch 8 x 16 tokens, one interleaved loop; speedup over eager PyTorch):")
    for name, m in models.items():
        with torch.no_grad():
            hits = sum(int((m(x).logits.argmax(-1) == y).sum()) for x, y in data)
        drop = accuracy - hits / sum(len(y) for _, y in data)
        print(f"{name:<28} {timings[name]!s:<28} {base / timings[name].median:>6.2f}x  drop {drop:+.4f}")


if __name__ == "__main__":
    main()
