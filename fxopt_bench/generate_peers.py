"""Generation peers outside PyTorch for ``fxopt bench --task generate``.

Each peer converts the bench's Llama with its own tool, from the model saved to a temporary
folder (nothing downloaded), and comes back as a :class:`PeerLM`: ``generate()`` with the
arguments the bench passes Hugging Face's, and a call that returns teacher-forced logits. So
:func:`fxopt_bench.generate.run_generate` checks and times a peer as it does every other
system, in its one interleaved loop.

- CTranslate2 (``ctranslate2.Generator``): greedy ``generate_batch`` with the prompt forwarded
  at once (``include_prompt_in_result=False``), logits from ``forward_batch``. Weight bytes: the
  converted ``model.bin``.
- ONNX Runtime GenAI (``onnxruntime_genai``): its model builder exports the Llama with
  ``GroupQueryAttention`` and, for int8/int4, ``MatMulNBits`` weights (its CPU defaults: blocks
  of 32, ``accuracy_level=4``: activations quantized to int8 in the MatMul); its own decoding
  loop. Teacher-forced logits come one appended token at a time (it returns the last
  position's logits only). Weight bytes: the ONNX files.
- OpenVINO: the model's forward with its KV cache as plain tensors, traced by
  ``openvino.convert_model`` and made stateful (the cache lives in OpenVINO's state, as in
  optimum-intel's export), weights optionally compressed by NNCF (``compress_weights``); the
  greedy loop is Python's, one ``infer`` per token. Weight bytes: the model's constants.
- llama.cpp cannot run here; its row says why (``SKIPPED_PEERS``).

CTranslate2's and ONNX Runtime GenAI's converters read a tokenizer for the vocabulary: the
folder gets a word-level one whose token ``i`` is ``<t{i}>``, so token ids pass through
unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fxopt_bench.systems import Unavailable, _quiet, ct2_convert, first_line

# Why a peer cannot run here: the row's note.
SKIPPED_PEERS = {
    "llama.cpp": (
        "llama-cpp-python has no binary wheel on PyPI (source only: a CMake build of llama.cpp), "
        "and the model would need a GGUF conversion (llama.cpp's convert_hf_to_gguf.py)"),
}


@dataclass
class PeerLM:
    """A converted model that the bench drives as a transformers causal LM: greedy
    ``generate()`` of exactly ``max_new_tokens`` (the end token is suppressed until then, as
    ``min_new_tokens`` does), and ``lm(ids).logits`` for every position of ``ids``."""

    generate_tokens: Callable[[torch.Tensor, int], torch.Tensor]  # (prompt ids, new) -> prompt + new ids
    logits: Callable[[torch.Tensor], torch.Tensor]  # ids -> [batch, length, vocab]
    weight_bytes: int

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, min_new_tokens: int | None = None, do_sample: bool = False,
                 pad_token_id: int | None = None) -> torch.Tensor:
        if do_sample or min_new_tokens not in (None, max_new_tokens):
            raise ValueError("a generation peer decodes greedily, exactly max_new_tokens tokens")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("a generation peer takes unpadded prompts of one length")
        return self.generate_tokens(input_ids, max_new_tokens)

    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits(input_ids))


def make_peer(reference: torch.nn.Module, spec: dict[str, Any], ids: torch.Tensor) -> PeerLM:
    """The peer ``spec["peer"]`` built from ``reference`` (not modified); raises
    :class:`~fxopt_bench.systems.Unavailable` where it cannot run here. ``ids``: the bench's
    prompts (OpenVINO's model is traced on them, its batch size fixed)."""
    peer = spec["peer"]
    if peer in SKIPPED_PEERS:
        raise Unavailable(SKIPPED_PEERS[peer])
    builders = {"ctranslate2": _ctranslate2, "onnxruntime-genai": _onnxruntime_genai, "openvino": _openvino}
    if peer not in builders:
        raise ValueError(f"unknown generation peer {peer!r}; choose from {[*builders, *SKIPPED_PEERS]}")
    module = peer.replace("-", "_")
    if not _installed(module):
        raise Unavailable(f"{module} is not installed: pip install {peer} (or 'fxopt[peers]')")
    with tempfile.TemporaryDirectory(prefix="fxopt-generate-peer-") as folder:
        return builders[peer](reference, spec, Path(folder), ids)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _save(reference: torch.nn.Module, folder: Path) -> tuple[Path, list[str]]:
    """The model and a word-level tokenizer of its ids, saved for a converter."""
    import transformers
    from tokenizers import Tokenizer, models

    config = reference.config
    vocabulary = [f"<t{i}>" for i in range(config.vocab_size)]

    def token(index: int | None, default: int) -> str:
        return vocabulary[index if isinstance(index, int) else default]

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocabulary)}, unk_token=vocabulary[0])),
        bos_token=token(config.bos_token_id, 0), eos_token=token(config.eos_token_id, 0), unk_token=vocabulary[0])
    saved = folder / "transformers"
    with _quiet():
        reference.save_pretrained(str(saved))
        tokenizer.save_pretrained(str(saved))
    return saved, vocabulary


def _ctranslate2(reference: torch.nn.Module, spec: dict[str, Any], folder: Path, ids: torch.Tensor) -> PeerLM:
    import ctranslate2
    import numpy as np

    compute_type = spec["compute_type"]
    saved, vocabulary = _save(reference, folder)
    target = ct2_convert(saved, folder / "ct2", compute_type, RuntimeError)
    generator = ctranslate2.Generator(str(target), device="cpu", compute_type=compute_type,
                                      intra_threads=torch.get_num_threads(), inter_threads=1)

    def generate_tokens(ids: torch.Tensor, new: int) -> torch.Tensor:
        prompts = [[vocabulary[i] for i in row] for row in ids.tolist()]
        results = generator.generate_batch(prompts, max_length=new, min_length=new, beam_size=1,
                                           sampling_topk=1, include_prompt_in_result=False)
        return torch.cat([ids, torch.tensor([r.sequences_ids[0] for r in results], dtype=ids.dtype)], 1)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(generator.forward_batch(ids.tolist())).copy())

    return PeerLM(generate_tokens, logits, (target / "model.bin").stat().st_size)


def _onnxruntime_genai(reference: torch.nn.Module, spec: dict[str, Any], folder: Path,
                       ids: torch.Tensor) -> PeerLM:
    import numpy as np
    import onnxruntime_genai as og
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    saved, _ = _save(reference, folder)
    target = folder / "onnx"
    arguments = (reference.config.model_type, str(saved), str(target), spec["precision"], "cpu",
                 str(folder / "cache"))
    try:
        with _quiet():
            create_model(*arguments, **parse_extra_options(*arguments, []))
    except Exception as exc:
        raise RuntimeError(f"ONNX Runtime GenAI's model builder failed: {first_line(exc)}") from exc
    config_path = target / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {}).update(
        intra_op_num_threads=torch.get_num_threads(), inter_op_num_threads=1)
    config_path.write_text(json.dumps(config))
    weight_bytes = sum(f.stat().st_size for f in target.iterdir() if f.name.startswith("model.onnx"))
    model = og.Model(str(target))  # loaded: the folder may go

    def generator(batch: int, length: int) -> Any:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=batch)
        return og.Generator(model, params)

    def generate_tokens(ids: torch.Tensor, new: int) -> torch.Tensor:
        run = generator(ids.shape[0], ids.shape[1] + new)
        run.append_tokens(ids.numpy().astype(np.int32))
        while not run.is_done():
            run.generate_next_token()
        return torch.from_numpy(np.stack([run.get_sequence(i) for i in range(ids.shape[0])])).to(ids.dtype)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in ids.numpy().astype(np.int32):  # one token at a time: every position's logits
            run = generator(1, len(row))
            steps = []
            for token in row:
                run.append_tokens(np.array([[token]], dtype=np.int32))
                steps.append(np.asarray(run.get_logits()).reshape(-1))
            rows.append(np.stack(steps))
        return torch.from_numpy(np.stack(rows))

    return PeerLM(generate_tokens, logits, weight_bytes)


class _DecodeStep(torch.nn.Module):
    """One forward of a causal LM with its KV cache as plain tensors, for tracing:
    ``(ids, mask, positions, *past keys and values) -> (last position's logits, *present)``."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import transformers

        cache = transformers.DynamicCache(config=self.lm.config)
        # set, not update(): a first update() concatenates onto a 1-D empty tensor, which
        # OpenVINO's Concat refuses
        for layer, keys, values in zip(cache.layers, past[0::2], past[1::2]):
            layer.device, layer.keys, layer.values, layer.is_initialized = keys.device, keys, values, True
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        return (out.logits[:, -1], *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


def _openvino(reference: torch.nn.Module, spec: dict[str, Any], folder: Path, ids: torch.Tensor) -> PeerLM:
    """The traced decode step made stateful (the KV cache lives in OpenVINO's state, as
    optimum-intel's export does it), weights compressed by NNCF where ``spec["weights"]`` says."""
    import numpy as np
    import openvino as ov
    from openvino._offline_transformations import apply_make_stateful_transformation

    config = reference.config
    batch, layers = ids.shape[0], config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past = [torch.zeros(batch, config.num_key_value_heads, 0, head_dim) for _ in range(2 * layers)]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    try:
        with _quiet(), torch.no_grad():
            model = ov.convert_model(_DecodeStep(reference), example_input=(ids, torch.ones_like(ids), positions, *past))
    except Exception as exc:
        raise RuntimeError(f"OpenVINO conversion failed: {first_line(exc)}") from exc
    names = ["input_ids", "attention_mask", "position_ids"] + [f"past.{i}" for i in range(2 * layers)]
    for port, name in zip(model.inputs, names):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, ["logits"] + [f"present.{i}" for i in range(2 * layers)]):
        port.get_tensor().set_names({name})
    # a static batch: the state starts as [batch, kv heads, 0, head dim]
    model.reshape({name: ov.PartialShape([batch, -1] if i < 3 else [batch, config.num_key_value_heads, -1, head_dim])
                   for i, name in enumerate(names)})
    apply_make_stateful_transformation(model, {f"past.{i}": f"present.{i}" for i in range(2 * layers)})
    if spec.get("weights"):
        import nncf

        with _quiet():
            model = nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, spec["weights"]))
    weight_bytes = sum(op.get_byte_size() for op in model.get_ops() if op.get_type_name() == "Constant")
    compiled = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32", **spec.get("options", {})})
    request = compiled.create_infer_request()
    eos = reference.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def step(tokens: np.ndarray, start: int) -> np.ndarray:
        length = start + tokens.shape[1]
        request.infer({"input_ids": tokens, "attention_mask": np.ones((batch, length), np.int64),
                       "position_ids": np.broadcast_to(np.arange(start, length), tokens.shape)})
        return request.get_tensor("logits").data

    def generate_tokens(prompt: torch.Tensor, new: int) -> torch.Tensor:
        if prompt.shape[0] != batch:
            raise ValueError(f"the OpenVINO peer was traced for a batch of {batch}, not {prompt.shape[0]}")
        request.reset_state()
        tokens, position, generated = prompt.numpy().astype(np.int64), 0, []
        for _ in range(new):
            logits = step(tokens, position).copy()
            position += tokens.shape[1]
            logits[:, eos] = -np.inf  # as min_new_tokens: no end token before the last
            tokens = logits.argmax(-1)[:, None]
            generated.append(tokens)
        return torch.cat([prompt, torch.from_numpy(np.concatenate(generated, 1)).to(prompt.dtype)], 1)

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        request.reset_state()  # one token at a time: the graph returns the last position's logits
        values = tokens.numpy().astype(np.int64)
        return torch.from_numpy(np.stack([step(values[:, i:i + 1], i).copy() for i in range(values.shape[1])], 1))

    return PeerLM(generate_tokens, logits, weight_bytes)
