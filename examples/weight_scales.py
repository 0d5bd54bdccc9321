"""Weight-only quantization's scales, absmax against activation-weighted, on the bench's small
random Llama (hidden 512, 4 layers, vocabulary 32000; prompts 4 x 32, 32 new tokens): relative
logit error and teacher-forced top-1 agreement with eager, as `fxopt bench --task generate`
counts it, on eager's generated tokens and on 16 random texts of 64 tokens. Every Linear is
quantized (budget 1.0), as the bench's "-all" systems. See docs/passes/quantize-weights.md.

    python examples/weight_scales.py
"""

import os
import time
import warnings

import torch

import fxopt
from fxopt_bench.generate import FULL, GenerateSize, llama

warnings.simplefilter("ignore")
SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"  # the test suite's run: a tiny Llama
size = GenerateSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, batch=2, prompt=8,
                    new=4) if SMALL else FULL
SPECS = {
    "int8 absmax": "quantize-weights(activations='float32', budget=1.0, scales='absmax')",
    "int8 weighted": "quantize-weights(activations='float32', budget=1.0, scales='weighted')",
    "int4 absmax": "quantize-weights(bits=4, budget=1.0, scales='absmax')",
    "int4 weighted": "quantize-weights(bits=4, budget=1.0, scales='weighted')",
}
if SMALL:  # one compile keeps the suite's run short
    SPECS = {"int4 weighted": SPECS["int4 weighted"]}
torch.manual_seed(0)
lm = llama(size)
ids = torch.randint(0, size.vocab, (size.batch, size.prompt))
mask = torch.ones_like(ids)
texts = torch.randint(0, size.vocab, (16, 64))


def generate(model: torch.nn.Module) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=size.new, min_new_tokens=size.new,
                          do_sample=False, pad_token_id=0)


with torch.no_grad():
    tokens = generate(lm)
    expected = [lm(tokens).logits, lm(texts).logits]
print(f"{'scales':14s} {'top-1 generated':>16s} {'top-1 texts':>12s} {'max rel logit err':>18s} "
      f"{'mean rel logit err':>19s} {'compile s':>10s}")
for name, spec in SPECS.items():
    start = time.perf_counter()
    opt = fxopt.compile(lm, {"input_ids": ids, "attention_mask": mask}, passes=["remove-dropout", spec])
    with torch.no_grad():
        generate(opt)  # both graphs exist now
        seconds = time.perf_counter() - start
        got = [opt(tokens).logits, opt(texts).logits]
    generated = slice(size.prompt - 1, -1)  # the positions that predicted eager's generated tokens
    agree_generated = (got[0].argmax(-1)[:, generated] == expected[0].argmax(-1)[:, generated]).float().mean()
    agree_texts = (got[1].argmax(-1) == expected[1].argmax(-1)).float().mean()
    errors = torch.cat([((g - e).abs() / e.abs().amax(-1, keepdim=True)).flatten() for g, e in zip(got, expected)])
    print(f"{name:14s} {float(agree_generated):16.3f} {float(agree_texts):12.3f} {float(errors.max()):18.4f} "
          f"{float(errors.mean()):19.5f} {seconds:10.1f}", flush=True)
    report = opt.report
    del opt
    torch._dynamo.reset()  # each copy's graphs count against one forward's recompile limit
print(report)
