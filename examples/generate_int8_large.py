"""int8 weight-only generate() on a TinyLlama-1.1B-shaped random Llama (4.4 GB of float32
weights: run it alone), against eager, with an empty kernel-timing cache so every kernel choice
is measured now. See docs/generation.md.

    python examples/generate_int8_large.py
"""

import os
import tempfile
import time
import warnings

os.environ["FXOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxopt-fresh-")

import torch  # noqa: E402

import fxopt  # noqa: E402
from fxopt.latency import interleaved  # noqa: E402
from fxopt_bench.generate import GenerateSize, llama  # noqa: E402

warnings.simplefilter("ignore")
torch.set_num_threads(2)
SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"  # the test suite's run: a tiny Llama
size = (GenerateSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, batch=1, prompt=8, new=5)
        if SMALL else
        GenerateSize(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000, batch=1,
                     prompt=128, new=17))
torch.manual_seed(0)
lm = llama(size)
ids = torch.randint(0, size.vocab, (1, size.prompt))
mask = torch.ones_like(ids)
t = time.time()
opt = fxopt.compile(lm, {"input_ids": ids, "attention_mask": mask},
                    passes="remove-dropout,quantize-weights(activations='float32', budget=1.0)")
print(f"compile {time.time()-t:.0f}s", flush=True)
for r in opt.log.records:
    print(r.index, r.inputs[:1], [n for n in r.report.notes if "weight-only" in n])


def gen(m: torch.nn.Module, n: int) -> torch.Tensor:
    return m.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


with torch.no_grad():
    t = interleaved({"eager/full": lambda: gen(lm, size.new), "eager/prefill": lambda: gen(lm, 1),
                     "fxopt/full": lambda: gen(opt, size.new), "fxopt/prefill": lambda: gen(opt, 1)}, warmup=1, repeats=3)
for name in ("eager", "fxopt"):
    d = (t[f"{name}/full"].median - t[f"{name}/prefill"].median) / (size.new - 1)
    print(name, f"prefill {t[name+'/prefill'].median:.0f} ms, decode {d:.1f} ms/token")
print(opt.report)
