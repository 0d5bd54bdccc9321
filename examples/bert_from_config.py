"""Optimize a BERT encoder built from a config (random weights, nothing downloaded).

    python examples/bert_from_config.py
"""

from __future__ import annotations

import os

import torch
import transformers

import fxopt

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"


def main() -> None:
    torch.manual_seed(0)
    if SMALL:
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=128)
        batch, seq = 2, 8
    else:
        config = transformers.BertConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                                         intermediate_size=3072)
        batch, seq = 8, 128
    model = transformers.BertModel(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)

    opt = fxopt.compile(model, (input_ids,), example_kwargs={"attention_mask": attention_mask})
    print(opt.report)
    out = opt(input_ids, attention_mask=attention_mask)
    ref = model(input_ids, attention_mask=attention_mask)
    print("last_hidden_state max abs difference:",
          (out.last_hidden_state - ref.last_hidden_state).abs().max().item())


if __name__ == "__main__":
    main()
