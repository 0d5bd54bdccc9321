"""Optimize a Llama decoder (grouped-query attention) built from a config.

    python examples/llama_from_config.py
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
        config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                                          use_cache=False)
        batch, seq = 2, 8
    else:
        config = transformers.LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                          num_key_value_heads=2, intermediate_size=1408, vocab_size=32000,
                                          use_cache=False)
        batch, seq = 4, 128
    model = transformers.LlamaModel(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))

    opt = fxopt.compile(model, (input_ids,))
    print(opt.report)
    diff = (opt(input_ids).last_hidden_state - model(input_ids).last_hidden_state).abs().max().item()
    print("last_hidden_state max abs difference:", diff)


if __name__ == "__main__":
    main()
