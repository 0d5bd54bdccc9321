"""Shared fixtures: small models built from configs (random weights, no downloads)."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")


def pytest_configure(config: pytest.Config) -> None:
    # What a compile keeps must not depend on how fast this machine ran a kernel during the
    # test run: measured choices are off unless a test injects its own timings
    # (fxopt.pipeline.timings.measuring), and nothing is cached in the user's home.
    os.environ.setdefault("FXOPT_MEASURE", "0")
    # fxopt's native weight-only GEMV is compiled at first use (about a minute): only
    # tests/test_gemv.py builds it, so every other test runs the same without a compiler.
    os.environ.setdefault("FXOPT_NATIVE_KERNELS", "0")
    os.environ.setdefault("FXOPT_CACHE_DIR", tempfile.mkdtemp(prefix="fxopt-test-cache-"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_transformer(kind: str) -> torch.nn.Module:
    """A transformers model of ``kind`` (bert, llama, gpt2, t5) with tiny sizes, in eval mode."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, vocab_size=64, max_position_embeddings=32))
    elif kind == "llama":
        model = tf.LlamaModel(tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                                             max_position_embeddings=32, use_cache=False))
    elif kind == "gpt2":
        model = tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                           use_cache=False, bos_token_id=0, eos_token_id=0))
    elif kind == "t5":
        model = tf.T5EncoderModel(tf.T5Config(d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8,
                                              vocab_size=64))
    else:
        raise ValueError(kind)
    return model.eval()


PLUGIN_DIR = Path(__file__).resolve().parent.parent / "examples" / "custom_pass_plugin"


def plugin_metadata(directory: Path) -> Path:
    """Write the example plugin's installed metadata (a dist-info with its entry points, taken
    from its pyproject.toml) into ``directory``, as ``pip install`` would; returns the folder
    to put on sys.path next to the plugin's source."""
    lines: list[str] = []
    group = None
    for line in (PLUGIN_DIR / "pyproject.toml").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            group = line.split('"')[1] if line.startswith("[project.entry-points.") else None
            if group:
                lines.append(f"[{group}]")
        elif group and "=" in line:
            lines.append(line.replace('"', ""))
    dist = directory / "fxopt_double_relu-0.1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fxopt-double-relu\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return directory


def token_ids(batch: int = 2, seq: int = 8, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))
