"""fxopt.from_checkpoint: a model built with its weights memory-mapped from safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model

import fxopt

transformers = pytest.importorskip("transformers")


def _config(tie: bool = False, layers: int = 2) -> object:
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    tie_word_embeddings=tie, use_cache=False)


def _saved(tmp_path: Path, tie: bool = False) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config(tie)).eval()
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))  # a tied weight is saved once
    return model, path


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """The address ranges of this process mapped from ``path``."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _mapped(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in ranges)


@pytest.mark.parametrize("tie", [False, True])
def test_the_model_runs_on_the_checkpoints_memory_mapped_weights(tmp_path: Path, tie: bool) -> None:
    original, path = _saved(tmp_path, tie)
    loaded = fxopt.from_checkpoint(lambda: transformers.LlamaForCausalLM(_config(tie)), path)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert not loaded.training and not any(p.is_meta for p in loaded.parameters())
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    if Path("/proc/self/maps").exists():
        ranges = _file_mappings(path)
        assert ranges and all(_mapped(p, ranges) for p in loaded.parameters())  # no copy in memory


def test_a_compile_shares_the_mapped_weights_it_does_not_rewrite(tmp_path: Path) -> None:
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps")
    _, path = _saved(tmp_path)
    loaded = fxopt.from_checkpoint(lambda: transformers.LlamaForCausalLM(_config()), path)
    ids = torch.randint(0, 128, (2, 9))
    opt = fxopt.compile(loaded, (ids,), progress=False)
    ranges = _file_mappings(path)
    o_proj = loaded.model.layers[0].self_attn.o_proj.weight  # no pass rewrites it
    shared = [t for t in opt.graph_module.state_dict().values() if t.data_ptr() == o_proj.data_ptr()]
    assert shared and _mapped(shared[0], ranges)
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, loaded(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_sharded_checkpoint_by_its_index_or_its_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(_config()).eval()
    state = {name: t.contiguous() for name, t in original.state_dict().items() if "rotary" not in name}
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({name: state[name] for name in part}, str(tmp_path / file))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {n: f for f, part in halves.items() for n in part}}))
    ids = torch.randint(0, 128, (1, 7))
    for checkpoint in (index, tmp_path, sorted(tmp_path.glob("*.safetensors"))):
        loaded = fxopt.from_checkpoint(lambda: transformers.LlamaForCausalLM(_config()), checkpoint)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_with_the_names(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    with pytest.raises(fxopt.InputError, match=r"no parameter or buffer of the model: model\.layers\.1\."):
        fxopt.from_checkpoint(lambda: transformers.LlamaForCausalLM(_config(layers=1)), path)
    with pytest.raises(fxopt.InputError, match=r"not in the checkpoint: model\.layers\.2\."):
        fxopt.from_checkpoint(lambda: transformers.LlamaForCausalLM(_config(layers=3)), path)
    wider = transformers.LlamaConfig(**{**_config().to_dict(), "intermediate_size": 96})
    with pytest.raises(fxopt.InputError, match=r"shapes differ: model\.layers\.0\.mlp\.\w+_proj\.weight"):
        fxopt.from_checkpoint(lambda: transformers.LlamaForCausalLM(wider), path)
    pickled = tmp_path / "model.bin"
    torch.save({}, pickled)
    with pytest.raises(fxopt.InputError, match="not a .safetensors file"):
        fxopt.from_checkpoint(lambda: transformers.LlamaForCausalLM(_config()), pickled)
    with pytest.raises(fxopt.InputError, match="no such file"):
        fxopt.from_checkpoint(lambda: transformers.LlamaForCausalLM(_config()), tmp_path / "absent.safetensors")


def test_a_buffer_computed_from_a_parameter_at_build_time_is_named(tmp_path: Path) -> None:
    class Normalized(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 4))
            self.register_buffer("norm", self.weight.detach().norm(dim=1), persistent=False)

    path = tmp_path / "normalized.safetensors"
    save_model(Normalized(), str(path))
    with pytest.raises(fxopt.InputError, match="buffer\\(s\\) norm were computed from parameters"):
        fxopt.from_checkpoint(Normalized, path)


def test_saved_buffers_come_from_the_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    path = tmp_path / "bn.safetensors"
    save_model(model, str(path))
    loaded = fxopt.from_checkpoint(lambda: torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)), path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert torch.equal(loaded[1].running_var, model[1].running_var)


def test_building_under_the_checkpoint_allocates_no_weights() -> None:
    from fxopt.checkpoint import parameters_on_meta

    with parameters_on_meta():
        model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # running statistics are built as usual
    assert not torch.nn.Linear(2, 2).weight.is_meta  # only inside the block
