"""Text generation through fxopt: a Llama's generate() with torch.compile(backend="fxopt").

    python examples/generate_llama.py            # hidden 512, 4 layers, prompts 4 x 32, 32 new tokens

Prints decode ms/token and prefill ms for eager, Inductor, fxopt lossless, and fxopt with
int8 and int4 weight-only Linears (quantize-weights), each as a ratio to eager measured in
the same run (interleaved rounds), and each system's teacher-forced top-1 agreement with
eager on the tokens eager generated. Random weights, two threads.
"""

from __future__ import annotations

import os
import warnings

import torch
import transformers

from fxopt.frontends.dynamo import CompileLog
from fxopt.latency import measure_side_by_side

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"
SYSTEMS = {  # name -> torch.compile arguments (None: eager)
    "eager": None,
    "inductor": {},
    "fxopt lossless": {"backend": "fxopt"},
    "fxopt int8 weight-only": {"backend": "fxopt", "options": {"passes": ["remove-dropout", "quantize-weights"]}},
    "fxopt int4 weight-only": {"backend": "fxopt", "options": {
        "passes": ["remove-dropout", "quantize-weights(bits=4, budget=0.3)"]}},
}


def build() -> tuple[transformers.LlamaConfig, dict[str, torch.Tensor]]:
    if SMALL:
        config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, vocab_size=256)
        return config, {"batch": 2, "prompt": 8, "new": 4}
    config = transformers.LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=1408, vocab_size=32000)
    return config, {"batch": 4, "prompt": 32, "new": 32}


def main() -> None:
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    # Every copy's forward is one code object to dynamo, so the copies share its recompile limit
    # (8 by default): each compiled copy adds its prefill and decode graphs.
    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)
    config, size = build()
    reference = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (size["batch"], size["prompt"]))
    mask = torch.ones_like(ids)
    models, logs = {}, {}
    for name, compile_args in SYSTEMS.items():
        if SMALL and name in ("inductor", "fxopt int4 weight-only"):
            continue  # the test run: Inductor builds C++ per graph, minutes on a small machine
        lm = transformers.LlamaForCausalLM(config).eval()
        lm.load_state_dict(reference.state_dict())
        if compile_args is not None:
            options = dict(compile_args.get("options", {}))
            if compile_args.get("backend") == "fxopt":
                logs[name] = options["log"] = CompileLog()
            lm.forward = torch.compile(lm.forward, backend=compile_args.get("backend", "inductor"),
                                       options=options or None)
        models[name] = lm

    def generate(lm: torch.nn.Module, tokens: int) -> torch.Tensor:
        return lm.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        expected = generate(reference, size["new"])
        agreement, identical = {}, {}
        for name, lm in models.items():
            out = generate(lm, size["new"])  # compiles prefill and decode graphs
            identical[name] = torch.equal(out, expected)
            want = reference(expected).logits.argmax(-1)[:, size["prompt"] - 1:-1]
            got = lm(expected).logits.argmax(-1)[:, size["prompt"] - 1:-1]
            agreement[name] = float((got == want).float().mean())
    calls = {f"{name}/full": (lambda lm=lm: generate(lm, size["new"])) for name, lm in models.items()}
    calls.update({f"{name}/prefill": (lambda lm=lm: generate(lm, 1)) for name, lm in models.items()})
    timings = measure_side_by_side(calls, warmup=1, repeats=2 if SMALL else 5)
    decode = {name: (timings[f"{name}/full"].median - timings[f"{name}/prefill"].median) / (size["new"] - 1)
              for name in models}
    print(f"Llama hidden {config.hidden_size}, {config.num_hidden_layers} layers, prompts "
          f"{size['batch']} x {size['prompt']}, {size['new']} new tokens, {torch.get_num_threads()} threads")
    print(f"{'system':<24} {'decode ms/token':>15} {'x eager':>8} {'prefill ms':>10} {'x eager':>8} "
          f"{'top-1 agree':>11} {'identical':>9} {'graphs':>6}")
    for name in models:
        prefill = timings[f"{name}/prefill"].median
        graphs = str(logs[name].compiles) if name in logs else "-"
        print(f"{name:<24} {decode[name]:>15.2f} {decode['eager'] / decode[name]:>7.2f}x {prefill:>10.1f} "
              f"{timings['eager/prefill'].median / prefill:>7.2f}x {agreement[name]:>11.3f} "
              f"{'yes' if identical[name] else 'no':>9} {graphs:>6}")
    for name, log in logs.items():
        for record in log.records:
            kernels = [note for note in record.report.notes if note.startswith("weight-only-linear")]
            print(f"{name}, graph {record.index} ({', '.join(record.inputs[:1])}): {kernels[0] if kernels else '-'}")
    decode_graph = next(r for r in logs["fxopt int8 weight-only"].records if r.inputs and r.inputs[0].endswith(", 1]"))
    print(f"\nfxopt report of the int8 weight-only decode graph:\n{decode_graph.report}")


if __name__ == "__main__":
    main()
