"""A zoo of real architectures built from small configs with random weights (no downloads).

Each entry builds a model in eval mode and example inputs. ``python tests/zoo.py`` runs every
check on every model and prints (or writes, ``--markdown PATH``) the results table that
docs/architectures.md records; tests/test_zoo.py runs the same checks on a fast subset in CI
and on the whole set with ``FXOPT_ZOO=full``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SEQ = 8
BATCH = 2
VOCAB = 96


@dataclass(frozen=True)
class Arch:
    name: str
    family: str
    build: Callable[[], tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]]
    fast: bool = False  # part of the CI subset


def _ids(vocab: int = VOCAB, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq))


def _text(cls_name: str, config_name: str, **config: Any) -> Callable[[], tuple[torch.nn.Module, tuple, dict]]:
    def build() -> tuple[torch.nn.Module, tuple, dict]:
        import transformers as tf

        tf.logging.set_verbosity_error()
        cfg = getattr(tf, config_name)(**config)
        model = getattr(tf, cls_name)(cfg).eval()
        ids = _ids(min(VOCAB, getattr(cfg, "vocab_size", VOCAB)))
        return model, (ids,), {"attention_mask": torch.ones_like(ids)}
    return build


ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               vocab_size=VOCAB, max_position_embeddings=64)
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               vocab_size=VOCAB, max_position_embeddings=64, use_cache=False)


def _vit() -> tuple[torch.nn.Module, tuple, dict]:
    import transformers as tf

    cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_channels=3)
    return tf.ViTModel(cfg).eval(), (torch.randn(BATCH, 3, 32, 32),), {}


def _clip_text() -> tuple[torch.nn.Module, tuple, dict]:
    import transformers as tf

    cfg = tf.CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            vocab_size=VOCAB, max_position_embeddings=64)
    return tf.CLIPTextModel(cfg).eval(), (_ids(),), {}


def _clip_vision() -> tuple[torch.nn.Module, tuple, dict]:
    import transformers as tf

    cfg = tf.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=32, patch_size=8)
    return tf.CLIPVisionModel(cfg).eval(), (torch.randn(BATCH, 3, 32, 32),), {}


def _whisper_encoder() -> tuple[torch.nn.Module, tuple, dict]:
    import transformers as tf

    cfg = tf.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                           max_source_positions=8, max_target_positions=16, vocab_size=VOCAB,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    encoder = tf.WhisperModel(cfg).get_encoder().eval()
    return encoder, (torch.randn(BATCH, 16, 16),), {}


def _seq2seq(cls_name: str, config_name: str, **config: Any) -> Callable[[], tuple[torch.nn.Module, tuple, dict]]:
    def build() -> tuple[torch.nn.Module, tuple, dict]:
        import transformers as tf

        cfg = getattr(tf, config_name)(**config)
        model = getattr(tf, cls_name)(cfg).eval()
        ids = _ids()
        return model, (ids,), {"decoder_input_ids": _ids()}
    return build


SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
               max_position_embeddings=64, use_cache=False)


class DLRM(torch.nn.Module):
    """A DLRM-style recommender: bottom MLP on dense features, embedding bags for sparse ones,
    pairwise dot-product interaction, top MLP."""

    def __init__(self, dense: int = 13, tables: int = 4, rows: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.bottom = torch.nn.Sequential(torch.nn.Linear(dense, 64), torch.nn.ReLU(), torch.nn.Linear(64, dim),
                                          torch.nn.ReLU())
        self.embeddings = torch.nn.ModuleList(torch.nn.EmbeddingBag(rows, dim, mode="sum") for _ in range(tables))
        pairs = (tables + 1) * tables // 2
        self.top = torch.nn.Sequential(torch.nn.Linear(dim + pairs, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(64, 1))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)
        features = [x] + [table(sparse[:, i : i + 1]) for i, table in enumerate(self.embeddings)]
        stacked = torch.stack(features, dim=1)
        interactions = torch.bmm(stacked, stacked.transpose(1, 2))
        rows, cols = torch.triu_indices(stacked.shape[1], stacked.shape[1], offset=1)
        return torch.sigmoid(self.top(torch.cat([x, interactions[:, rows, cols]], dim=1)))


def _dlrm() -> tuple[torch.nn.Module, tuple, dict]:
    return DLRM().eval(), (torch.randn(BATCH * 4, 13), torch.randint(0, 50, (BATCH * 4, 4))), {}


class BNMLP(torch.nn.Module):
    """An MLP with BatchNorm and Dropout, the shape of tabular and recommender towers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
            torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.GELU(), torch.nn.Dropout(0.2),
            torch.nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _bn_mlp() -> tuple[torch.nn.Module, tuple, dict]:
    model = BNMLP()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model.eval(), (torch.randn(16, 32),), {}


ARCHITECTURES: list[Arch] = [
    Arch("bert", "encoder", _text("BertModel", "BertConfig", **ENCODER), fast=True),
    Arch("distilbert", "encoder", _text("DistilBertModel", "DistilBertConfig", dim=32, n_layers=2, n_heads=4,
                                        hidden_dim=64, vocab_size=VOCAB, max_position_embeddings=64)),
    Arch("roberta", "encoder", _text("RobertaModel", "RobertaConfig", **ENCODER, pad_token_id=1)),
    Arch("albert", "encoder", _text("AlbertModel", "AlbertConfig", **ENCODER, embedding_size=16)),
    Arch("electra", "encoder", _text("ElectraModel", "ElectraConfig", **ENCODER, embedding_size=16)),
    Arch("deberta-v2", "encoder", _text("DebertaV2Model", "DebertaV2Config", **ENCODER)),
    Arch("mobilebert", "encoder", _text("MobileBertModel", "MobileBertConfig", hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
                                        embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                                        max_position_embeddings=64)),
    Arch("vit", "vision encoder", _vit, fast=True),
    Arch("clip-text", "encoder", _clip_text),
    Arch("clip-vision", "vision encoder", _clip_vision),
    Arch("whisper-encoder", "audio encoder", _whisper_encoder),
    Arch("bart", "seq2seq", _seq2seq("BartModel", "BartConfig", **SEQ2SEQ)),
    Arch("t5", "seq2seq", _seq2seq("T5Model", "T5Config", d_model=32, num_layers=2, num_decoder_layers=2,
                                    num_heads=4, d_ff=64, d_kv=8, vocab_size=VOCAB, use_cache=False)),
    Arch("marian", "seq2seq", _seq2seq("MarianModel", "MarianConfig", **SEQ2SEQ, pad_token_id=0,
                                       decoder_start_token_id=0)),
    Arch("llama", "decoder", _text("LlamaModel", "LlamaConfig", **DECODER, num_key_value_heads=2), fast=True),
    Arch("mistral", "decoder", _text("MistralModel", "MistralConfig", **DECODER, num_key_value_heads=2)),
    Arch("qwen2", "decoder", _text("Qwen2Model", "Qwen2Config", **DECODER, num_key_value_heads=2)),
    Arch("gemma", "decoder", _text("GemmaModel", "GemmaConfig", **DECODER, num_key_value_heads=2, head_dim=8)),
    Arch("phi", "decoder", _text("PhiModel", "PhiConfig", **DECODER)),
    Arch("falcon", "decoder", _text("FalconModel", "FalconConfig", hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, vocab_size=VOCAB, use_cache=False), fast=True),
    Arch("bloom", "decoder", _text("BloomModel", "BloomConfig", hidden_size=32, n_layer=2, n_head=4,
                                   vocab_size=VOCAB, use_cache=False)),
    Arch("gpt-neox", "decoder", _text("GPTNeoXModel", "GPTNeoXConfig", **DECODER)),
    Arch("opt", "decoder", _text("OPTModel", "OPTConfig", hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64,
                                 word_embed_proj_dim=32, use_cache=False)),
    Arch("gpt2", "decoder", _text("GPT2Model", "GPT2Config", n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                  n_positions=64, use_cache=False), fast=True),
    Arch("gptj", "decoder", _text("GPTJModel", "GPTJConfig", n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                  vocab_size=VOCAB, n_positions=64, use_cache=False)),
    Arch("dlrm", "recommender", _dlrm, fast=True),
    Arch("bn-mlp", "tabular MLP", _bn_mlp, fast=True),
]

CHECKS = ("capture", "linears seen", "default pipeline", "int8", "onnx", "torch.compile")


def linear_modules(model: torch.nn.Module) -> int:
    """Fully connected layers in the model: nn.Linear and GPT-2's Conv1D."""
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")


def _flat(outputs: Any) -> list[torch.Tensor]:
    import torch.utils._pytree as pytree

    if hasattr(outputs, "to_tuple"):
        outputs = outputs.to_tuple()
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def rel_error(expected: Any, actual: Any) -> float:
    """fxopt's own output comparison over the floating-point outputs (inf on a structural change)."""
    from fxopt.verify import compare_outputs

    comparison = compare_outputs(_flat(expected), _flat(actual))
    return float("inf") if comparison.mismatch else comparison.max_rel


def run_checks(arch: Arch, checks: tuple[str, ...] = CHECKS) -> dict[str, str]:
    """Every check on one architecture: 'ok ...' or the failure, per check."""
    import fxopt
    from fxopt.ir import count_ops, ops

    torch.manual_seed(0)
    model, args, kwargs = arch.build()
    with torch.no_grad():
        expected = model(*args, **kwargs)
    results: dict[str, str] = {}

    def attempt(name: str, body: Callable[[], str]) -> None:
        if name not in checks:
            return
        try:
            results[name] = body()
        except Exception as exc:  # the table records what failed and why
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            results[name] = f"FAIL {type(exc).__name__}: {message[:160]}"

    captured: dict[str, Any] = {}

    def capture() -> str:
        gm = fxopt.capture(model, args, kwargs)
        captured["gm"] = gm
        return f"ok, {len(gm.graph.nodes)} nodes"

    def linears_seen() -> str:
        gm = captured.get("gm")
        if gm is None:
            raise RuntimeError("capture failed")
        found, declared = count_ops(gm, ops.linear), linear_modules(model)
        if found < declared:
            raise AssertionError(f"{found} linear ops for {declared} Linear modules")
        return f"ok, {found}/{declared}"

    def compiled(passes: Any, budget: float) -> Callable[[], str]:
        def body() -> str:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = fxopt.compile(model, args, passes=passes, example_kwargs=kwargs)
            with torch.no_grad():
                error = rel_error(expected, opt(*args, **kwargs))
            if not error <= budget:
                raise AssertionError(f"rel error {error:.2e} > {budget:g}")
            rolled = [r.name for r in opt.report.passes if r.status == "rolled back"]
            applied = sum(r.applied for r in opt.report.passes)
            return f"ok, {applied} rewrites, err {error:.1e}" + (f", rolled back: {rolled}" if rolled else "")
        return body

    def onnx() -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = fxopt.compile(model, args, backend="onnx", example_kwargs=kwargs)
        with torch.no_grad():
            error = rel_error(expected, opt(*args, **kwargs))
        if not error <= 1e-4:
            raise AssertionError(f"rel error {error:.2e}")
        return f"ok, err {error:.1e}"

    def dynamo() -> str:
        torch._dynamo.reset()
        compiled_model = torch.compile(model, backend="fxopt")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            error = rel_error(expected, compiled_model(*args, **kwargs))
        if not error <= 1e-4:
            raise AssertionError(f"rel error {error:.2e}")
        return f"ok, err {error:.1e}"

    attempt("capture", capture)
    attempt("linears seen", linears_seen)
    attempt("default pipeline", compiled(None, 1e-4))
    attempt("int8", compiled(["quantize-int8"], 0.05))
    attempt("onnx", onnx)
    attempt("torch.compile", dynamo)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--markdown", metavar="PATH", help="write the results table as markdown")
    args = parser.parse_args(argv)
    chosen = [a for a in ARCHITECTURES if args.models is None or a.name in args.models.split(",")]
    rows = []
    failures = 0
    for arch in chosen:
        start = time.perf_counter()
        try:
            results = run_checks(arch)
        except Exception:
            traceback.print_exc()
            results = {c: "FAIL: model did not build" for c in CHECKS}
        failures += sum(1 for v in results.values() if v.startswith("FAIL"))
        rows.append((arch, results, time.perf_counter() - start))
        cells = " | ".join(results.get(c, "-") for c in CHECKS)
        print(f"{arch.name:16s} {time.perf_counter() - start:5.1f}s | {cells}", flush=True)
    if args.markdown:
        lines = ["| model | family | " + " | ".join(CHECKS) + " |", "|" + " --- |" * (len(CHECKS) + 2)]
        for arch, results, _ in rows:
            lines.append(f"| {arch.name} | {arch.family} | " + " | ".join(results.get(c, "-") for c in CHECKS) + " |")
        with open(args.markdown, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    print(f"{len(rows)} models, {failures} failed checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
