"""``fxopt bench --task generate``: a Llama's ``generate()`` through ``torch.compile``.

Every system runs on one random-weight Llama's weights: eager runs it as is, Inductor compiles
the ``forward`` of a shallow copy with ``dynamic=True`` (decode is one graph from its first
step), torchao quantizes a deep copy first, and the fxopt systems are ``fxopt.compile(lm,
prompt, passes=...)``; the peers of other runtimes (CTranslate2, ONNX Runtime GenAI) convert it
(:mod:`fxopt_bench.generate_peers`). Each generates once to compile its prefill and decode graphs, and then
all systems are timed interleaved (:func:`fxopt_bench.timing.measure_side_by_side`): a full generation of
``new`` tokens and a one-token generation (the prefill). Decode ms/token is their difference
over ``new - 1`` tokens. Quality is the teacher-forced top-1 agreement with eager on the
tokens eager generated, and whether the generated tokens are identical to eager's.

    rows = run_generate(quick=True, systems=["eager", "fxopt"])
    print(format_generate(rows))
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fxopt_bench.generate_peers import PeerLM, make_peer
from fxopt_bench.systems import Unavailable, first_line
from fxopt_bench.timing import Timing, measure_side_by_side, speedup

# name -> how the system is made. None: eager. {"backend": ...}: torch.compile of the model's
# forward with that backend ("torchao": quantized with torchao first). {"passes": ...}:
# fxopt.compile(lm, prompt, passes=...), whose generate() runs fxopt's prefill and decode graphs.
GENERATE_SYSTEMS: dict[str, dict[str, Any] | None] = {
    "eager": None,
    "inductor": {"backend": "inductor"},
    "torchao-int8-weights": {"backend": "inductor", "torchao": "Int8WeightOnlyConfig"},
    "fxopt": {"passes": None},
    # float32 activations: fxopt's own GEMV (gemv-int8) is the fastest int8 kernel where it
    # builds, and more exact than the library's bfloat16 ones; int4: the library's bfloat16 kernel.
    "fxopt-int8-weights": {"passes": ["remove-dropout", "quantize-weights(activations='float32')"]},
    "fxopt-int4-weights": {"passes": ["remove-dropout", "quantize-weights(bits=4, budget=0.3)"]},
    # Every Linear quantized, as torchao does (budget 1.0: the output error is reported, not
    # bounded). A random-weight model's logits are nearly flat, so at 22 layers a 5% output
    # budget keeps most Linears float; agreement with eager is the measure of quality here.
    "fxopt-int8-weights-all": {"passes": [
        "remove-dropout", "quantize-weights(activations='float32', budget=1.0)"]},
    "fxopt-int4-weights-all": {"passes": ["remove-dropout", "quantize-weights(bits=4, budget=1.0)"]},
    "fxopt-int4-weights-all-float32": {"passes": [
        "remove-dropout", "quantize-weights(bits=4, activations='float32', budget=1.0)"]},
    # int8 weights and activations quantized per tensor at run time, every Linear (as
    # CTranslate2's and ONNX Runtime GenAI's int8 rows quantize their activations): on CPU each
    # Linear runs on the quantized engine its lowering measured fastest (FBGEMM's for a decode
    # step's one row on AVX-512 VNNI).
    "fxopt-int8-dynamic-all": {"passes": [
        "remove-dropout", "quantize-int8(activations='dynamic-tensor', budget=1.0)"]},
    # {"peer": ...}: converted and run by another runtime (fxopt_bench.generate_peers).
    # CTranslate2's int8 on CPU: int8 weights per output channel, activations quantized per
    # row at run time (it has no weight-only int8 with float activations on CPU).
    "ct2-generate": {"peer": "ctranslate2", "compute_type": "float32"},
    "ct2-int8-generate": {"peer": "ctranslate2", "compute_type": "int8_float32"},
    "ort-genai-generate": {"peer": "onnxruntime-genai", "precision": "fp32"},
    "ort-genai-int8-generate": {"peer": "onnxruntime-genai", "precision": "int8"},
    "ort-genai-int4-generate": {"peer": "onnxruntime-genai", "precision": "int4"},
    # OpenVINO: the traced decode step, stateful, f32 (its CPU default keeps the KV cache in
    # uint8: the lossless row asks for f32). Compressed weights: NNCF's compress_weights at its
    # defaults (int8: asymmetric per channel; int4: symmetric groups of 128, the embedding and
    # lm_head int8), run at OpenVINO's defaults for them (activations quantized in groups of 32,
    # uint8 KV cache).
    "openvino-generate": {"peer": "openvino", "options": {"KV_CACHE_PRECISION": "f32"}},
    "openvino-int8-generate": {"peer": "openvino", "weights": "INT8_ASYM"},
    "openvino-int4-generate": {"peer": "openvino", "weights": "INT4_SYM"},
    "llama-cpp-generate": {"peer": "llama.cpp"},
}
# The peers are asked for by name (--systems): each holds a converted copy of the weights.
DEFAULT_SYSTEMS = ["eager", "inductor", "fxopt", "fxopt-int8-weights", "fxopt-int4-weights"]


@dataclass
class GenerateSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    prompt: int
    new: int


FULL = GenerateSize(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1408, vocab=32000,
                    batch=4, prompt=32, new=32)
QUICK = GenerateSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256,
                     batch=2, prompt=8, new=4)
# TinyLlama-1.1B's shape (4.1 GB of fp32 weights): run it alone on the machine.
TINYLLAMA = GenerateSize(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000,
                         batch=1, prompt=128, new=64)
SIZES = {"small": FULL, "quick": QUICK, "tinyllama": TINYLLAMA}


@dataclass
class GenerateRow:
    """One system. ``status`` is ``ok``, ``skipped`` or ``failed`` (``note`` says why)."""

    system: str
    status: str = "ok"
    note: str = ""
    prefill_ms: float | None = None
    decode_ms_per_token: float | None = None
    decode_vs_eager: float | None = None
    prefill_vs_eager: float | None = None
    prefill_low: float | None = None
    prefill_high: float | None = None
    generate_vs_eager: float | None = None  # the whole generation, with its spread
    generate_low: float | None = None
    generate_high: float | None = None
    weight_bytes: int | None = None
    top1_agreement: float | None = None
    identical: bool | None = None
    graphs: int | None = None
    compile_s: float | None = None
    log: Any = field(default=None, repr=False)  # the fxopt CompileLog, for fxopt systems


def llama(size: GenerateSize) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(hidden_size=size.hidden, num_hidden_layers=size.layers,
                                      num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                                      intermediate_size=size.intermediate, vocab_size=size.vocab)
    return transformers.LlamaForCausalLM(config).eval()


def run_generate(quick: bool = False, systems: list[str] | None = None, repeats: int | None = None,
                 warmup: int | None = None, progress: Callable[[str], None] = lambda message: None,
                 size: GenerateSize | None = None) -> list[GenerateRow]:
    """Compile, check and time every system; a system that is missing or fails is a row with
    its reason. The first system must be ``eager`` (the reference).

    Every system runs on the reference model's own weights (a shallow copy of it, or
    fxopt.compile's shared weights), so memory grows by what a system adds (quantized or merged
    weights), not by a copy of the model per system; torchao quantizes a deep copy."""
    import transformers

    names = systems or list(DEFAULT_SYSTEMS)
    unknown = [n for n in names if n not in GENERATE_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown generate systems {unknown}; choose from {list(GENERATE_SYSTEMS)}")
    if "eager" not in names:
        names = ["eager", *names]
    size = size or (QUICK if quick else FULL)
    transformers.logging.set_verbosity_error()
    # Each copy's forward is one code object to dynamo, so the copies share its recompile limit
    # (8 by default); every compiled copy adds its prefill and decode graphs.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch.manual_seed(0)
    reference = llama(size)
    ids = torch.randint(0, size.vocab, (size.batch, size.prompt))
    mask = torch.ones_like(ids)

    def generate(lm: torch.nn.Module, tokens: int) -> torch.Tensor:
        return lm.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=0)

    rows = {name: GenerateRow(name, weight_bytes=resident_bytes(reference.parameters())) for name in names}
    models: dict[str, torch.nn.Module | PeerLM] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        progress("eager: generating the reference tokens")
        expected = generate(reference, size.new)
        want = reference(expected).logits.argmax(-1)[:, size.prompt - 1:-1]
    for name in names:  # not under inference_mode: the compiled graphs were made (and guard) under no_grad
        row = rows[name]
        progress(f"{name}: compiling and checking")
        try:
            start = time.perf_counter()
            lm = _make_system(reference, GENERATE_SYSTEMS[name], ids, mask)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = generate(lm, size.new)  # compiles the prefill and decode graphs (if not yet)
                row.compile_s = time.perf_counter() - start
                got = lm(expected).logits.argmax(-1)[:, size.prompt - 1:-1]
        except Exception as exc:  # noqa: BLE001 -- a peer that fails is a row with its reason, not a crash
            skipped = isinstance(exc, (ImportError, Unavailable))
            row.status, row.note = ("skipped" if skipped else "failed"), _reason(exc)
            continue
        row.identical = torch.equal(out, expected)
        row.top1_agreement = float((got == want).float().mean())
        log = getattr(lm, "log", None)
        if log is not None:
            row.log, row.graphs = log, log.compiles
            fallbacks = [r.fallback for r in log.records if r.fallback]
            if fallbacks:
                row.note = f"{len(fallbacks)} graph(s) unoptimized: {fallbacks[0]}"
            graphs = [r.module() for r in log.records]
            row.weight_bytes = resident_bytes(t for g in graphs if g is not None for t in g.graph_module.buffers())
        elif isinstance(lm, PeerLM):
            row.weight_bytes = lm.weight_bytes
        elif GENERATE_SYSTEMS[name] is not None and GENERATE_SYSTEMS[name].get("torchao"):
            row.weight_bytes = resident_bytes(lm.parameters())
        models[name] = lm
    progress(f"timing {len(models)} systems side by side")
    calls: dict[str, Callable[[], Any]] = {}
    for name, lm in models.items():
        calls[f"{name}/full"] = lambda lm=lm: generate(lm, size.new)
        calls[f"{name}/prefill"] = lambda lm=lm: generate(lm, 1)
    with torch.no_grad():
        timings = measure_side_by_side(calls, warmup=warmup if warmup is not None else 1,
                                       repeats=repeats or (2 if quick else 5))
    _fill_timings(rows, timings, size.new)
    return list(rows.values())


def _make_system(reference: torch.nn.Module, spec: dict[str, Any] | None, ids: torch.Tensor,
                 mask: torch.Tensor) -> torch.nn.Module | PeerLM:
    if spec is None:
        return reference
    if "peer" in spec:
        return make_peer(reference, spec, ids)
    if "passes" in spec:
        import fxopt

        return fxopt.compile(reference, {"input_ids": ids, "attention_mask": mask}, passes=spec["passes"])
    if spec.get("torchao"):
        import torchao.quantization

        lm = copy.deepcopy(reference)
        torchao.quantization.quantize_(lm, getattr(torchao.quantization, spec["torchao"])())
    else:
        lm = copy.copy(reference)  # the same modules and weights, a forward of its own
    lm.forward = torch.compile(type(lm).forward.__get__(lm, type(lm)), backend=spec["backend"], dynamic=True)
    return lm


def resident_bytes(tensors: Any) -> int:
    """Bytes of the distinct memory behind ``tensors`` (views and shared weights counted once)."""
    storages = {}
    for tensor in tensors:
        for leaf in _plain_tensors(tensor):
            storage = leaf.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a tensor subclass (torchao's quantized weights), or itself."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [leaf for name in names for leaf in _plain_tensors(getattr(tensor, name))]
    return [tensor]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Unavailable):
        return str(exc)
    inner = getattr(exc, "inner_exception", None)  # dynamo wraps a backend's error
    cause = inner if isinstance(inner, BaseException) else exc
    return f"{type(cause).__name__}: {first_line(cause)}"


def _fill_timings(rows: dict[str, GenerateRow], timings: dict[str, Timing], new: int) -> None:
    if "eager/full" not in timings:
        return
    eager_full, eager_prefill = timings["eager/full"], timings["eager/prefill"]
    eager_decode = (eager_full.median - eager_prefill.median) / (new - 1)
    for name, row in rows.items():
        if f"{name}/full" not in timings:
            continue
        full, prefill = timings[f"{name}/full"], timings[f"{name}/prefill"]
        row.prefill_ms = prefill.median
        row.decode_ms_per_token = (full.median - prefill.median) / (new - 1)
        if row.decode_ms_per_token > 0:
            row.decode_vs_eager = eager_decode / row.decode_ms_per_token
        ratio = speedup(eager_prefill, prefill)
        row.prefill_vs_eager, row.prefill_low, row.prefill_high = ratio.ratio, ratio.low, ratio.high
        ratio = speedup(eager_full, full)
        row.generate_vs_eager, row.generate_low, row.generate_high = ratio.ratio, ratio.low, ratio.high


def _ratio(value: float | None, low: float | None = None, high: float | None = None) -> str:
    if value is None:
        return "-"
    if low is None or high is None:
        return f"{value:.2f}x"
    noise = "~" if low <= 1.0 <= high else ""
    return f"{noise}{value:.2f}x [{low:.2f}-{high:.2f}]"


def format_generate(rows: list[GenerateRow], size: GenerateSize | None = None) -> str:
    """The rows as a plain-text table; failed and skipped rows show their reason."""
    header = ["system", "prefill ms", "x eager", "decode ms/tok", "x eager", "generate x eager",
              "weight MB", "top-1 agree", "identical", "graphs"]
    table = [header]
    for row in rows:
        if row.status != "ok":
            table.append([row.system, f"{row.status}: {row.note}"] + [""] * (len(header) - 2))
            continue
        table.append([
            row.system,
            f"{row.prefill_ms:.1f}" if row.prefill_ms is not None else "-",
            _ratio(row.prefill_vs_eager, row.prefill_low, row.prefill_high),
            f"{row.decode_ms_per_token:.2f}" if row.decode_ms_per_token is not None else "-",
            _ratio(row.decode_vs_eager),
            _ratio(row.generate_vs_eager, row.generate_low, row.generate_high),
            f"{row.weight_bytes / 1e6:.2f}" if row.weight_bytes is not None else "-",
            f"{row.top1_agreement:.3f}" if row.top1_agreement is not None else "-",
            {True: "yes", False: "no", None: "-"}[row.identical],
            str(row.graphs) if row.graphs is not None else "-",
        ])
    widths = [max(len(line[i]) for line in table if len(line) == len(header) and line[1] and
                  not line[1].startswith(("failed", "skipped"))) for i in range(len(header))]
    lines = []
    for line in table:
        if line[1].startswith(("failed:", "skipped:")):
            lines.append(f"{line[0]:<{widths[0]}}  {line[1]}")
        else:
            lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                                   enumerate(zip(line, widths))).rstrip())
    notes = [f"{row.system}: {row.note}" for row in rows if row.status == "ok" and row.note]
    title = ""
    if size is not None:
        title = (f"Llama hidden {size.hidden}, {size.layers} layers, {size.heads} heads ({size.kv_heads} KV), "
                 f"vocab {size.vocab}; prompts {size.batch} x {size.prompt}, {size.new} new tokens, "
                 f"{torch.get_num_threads()} threads\n")
    legend = ("decode ms/tok = (generate ms - prefill ms) / (new tokens - 1); its ratio is of medians. "
              "top-1 agree: teacher-forced on eager's tokens.")
    return title + "\n".join(lines + notes + [legend])
