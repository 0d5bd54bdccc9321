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
- OpenVINO and llama.cpp cannot run here; their rows say why (:func:`skipped_peer`).

Both converters read a tokenizer for the vocabulary: the folder gets a word-level one whose
token ``i`` is ``<t{i}>``, so token ids pass through unchanged.
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

from fxopt_bench.systems import Unavailable, _quiet, first_line

# Why a peer cannot run here: the row's note.
SKIPPED_PEERS = {
    "openvino": (
        "OpenVINO generation needs a stateful KV-cache model (optimum-intel's export, run by "
        "openvino-genai's LLMPipeline); optimum-intel's torchvision dependency installs torch 2.14 "
        "(CUDA wheels) over this torch, and fxopt's OpenVINO backend does not lower generation "
        "graphs (fxopt.compile of a causal LM takes the eager and onnx backends)"),
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


def make_peer(reference: torch.nn.Module, spec: dict[str, Any]) -> PeerLM:
    """The peer ``spec["peer"]`` built from ``reference`` (not modified); raises
    :class:`~fxopt_bench.systems.Unavailable` where it cannot run here."""
    peer = spec["peer"]
    if peer in SKIPPED_PEERS:
        raise Unavailable(SKIPPED_PEERS[peer])
    builders = {"ctranslate2": _ctranslate2, "onnxruntime-genai": _onnxruntime_genai}
    if peer not in builders:
        raise ValueError(f"unknown generation peer {peer!r}; choose from {[*builders, *SKIPPED_PEERS]}")
    module = peer.replace("-", "_")
    if not _installed(module):
        raise Unavailable(f"{module} is not installed: pip install {peer} (or 'fxopt[peers]')")
    with tempfile.TemporaryDirectory(prefix="fxopt-generate-peer-") as folder:
        return builders[peer](reference, spec, Path(folder))


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


def _ctranslate2(reference: torch.nn.Module, spec: dict[str, Any], folder: Path) -> PeerLM:
    import ctranslate2
    import numpy as np

    compute_type = spec["compute_type"]
    saved, vocabulary = _save(reference, folder)
    target = folder / "ct2"
    try:
        with _quiet():
            converter = ctranslate2.converters.TransformersConverter(str(saved))
            converter.convert(str(target), quantization=compute_type, force=True)
    except Exception as exc:
        raise RuntimeError(f"CTranslate2 conversion failed: {first_line(exc)}") from exc
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


def _onnxruntime_genai(reference: torch.nn.Module, spec: dict[str, Any], folder: Path) -> PeerLM:
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
