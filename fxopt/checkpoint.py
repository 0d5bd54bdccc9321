"""A model built from a safetensors checkpoint without a second copy of its weights.

``fxopt.from_checkpoint(build, path)`` calls ``build()`` (a function that constructs the
model, e.g. ``lambda: LlamaForCausalLM(config)``) with every parameter created on the meta
device, so construction allocates and initializes no weights, then assigns each parameter
(and each buffer the checkpoint holds, such as BatchNorm's statistics) the checkpoint's
tensor of that name. safetensors memory-maps the file: a weight is read
from disk when first used, and its pages are the file's (the kernel can drop them under
memory pressure and read them again), not a copy in the process's own memory. Buffers
the checkpoint does not hold (rotary frequencies) are built as usual.

``fxopt.compile`` then shares every weight no pass rewrites with this model, so a lossless
compile holds the checkpoint's pages plus what its passes made (merged weights), and a
quantizing one holds the quantized weights. The model's dtypes are the checkpoint's: a
bfloat16 checkpoint gives a bfloat16 model.

Accepted: one ``.safetensors`` file, a list of them (shards), a sharded checkpoint's
``*.safetensors.index.json``, or a directory holding either. A weight the model holds under two
names (``tie_word_embeddings``) is saved under one: both get it, and the model's
``tie_weights()``, when it has one, runs after; any other missing or unexpected name, or a shape
that differs, is an :class:`~fxopt.InputError` naming them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from fxopt.errors import InputError

Checkpoint = str | Path | Sequence[str | Path]


def from_checkpoint(build: Callable[[], torch.nn.Module], checkpoint: Checkpoint) -> torch.nn.Module:
    """``build()`` with its parameters taken from ``checkpoint`` (memory-mapped safetensors
    files), in eval mode. See the module docstring."""
    from safetensors import safe_open

    files = checkpoint_files(checkpoint)
    with parameters_on_meta():
        model = build()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"from_checkpoint: build() returned {type(model).__name__}, not a torch.nn.Module")
    expected = dict(model.named_parameters(remove_duplicate=False))
    saved_names = {**model.state_dict(keep_vars=True), **expected}  # persistent buffers too
    state: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                state[name] = handle.get_tensor(name)
    unexpected = sorted(set(state) - set(saved_names))
    if unexpected:
        raise InputError(f"from_checkpoint: {len(unexpected)} tensor(s) of the checkpoint are no parameter or "
                         f"buffer of the model: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{name} {tuple(state[name].shape)} (model: {tuple(t.shape)})"
             for name, t in saved_names.items() if name in state and state[name].shape != t.shape]
    if wrong:
        raise InputError(f"from_checkpoint: shapes differ: {'; '.join(wrong[:8])}")
    # A parameter the model holds under two names (an embedding tied to its output layer) is
    # saved under one of them: every name of it gets that tensor.
    names_of: dict[int, list[str]] = {}
    for name, param in expected.items():
        names_of.setdefault(id(param), []).append(name)
    for names in names_of.values():
        saved = next((state[name] for name in names if name in state), None)
        if saved is not None:
            state.update({name: saved for name in names})
    model.load_state_dict(state, strict=False, assign=True)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()  # ties the model makes itself, after the weights are in
    missing = [name for name, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if missing:
        raise InputError(f"from_checkpoint: {len(missing)} parameter(s) of the model are not in the checkpoint: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    unknown = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if unknown:
        raise InputError(f"from_checkpoint: buffer(s) {', '.join(unknown[:8])} were computed from parameters while "
                         "the model was built, before the checkpoint's values were in; build the model in memory "
                         "and load the checkpoint into it instead")
    return model.eval()


def checkpoint_files(checkpoint: Checkpoint) -> list[Path]:
    """The safetensors files of ``checkpoint`` (see :func:`from_checkpoint`), checked to exist."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if path.is_dir():
            index = sorted(path.glob("*.safetensors.index.json"))
            files = _indexed(index[0]) if index else sorted(path.glob("*.safetensors"))
            if not files:
                raise InputError(f"from_checkpoint: no .safetensors file in {path}")
            return files
        if path.name.endswith(".index.json"):
            return _indexed(path)
        paths = [path]
    else:
        paths = [Path(p) for p in checkpoint]
    for path in paths:
        if not path.is_file():
            raise InputError(f"from_checkpoint: no such file: {path}")
        if path.suffix != ".safetensors":
            raise InputError(f"from_checkpoint: {path.name} is not a .safetensors file (pickled checkpoints "
                             "run code when loaded and cannot be memory-mapped)")
    return paths


def _indexed(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"from_checkpoint: {index} is not a safetensors index ({exc})") from exc
    return checkpoint_files([index.parent / name for name in dict.fromkeys(weight_map.values())])


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to the meta device as it is
    registered, so the module's own initialization of it touches no memory; buffers are
    created as usual. It patches ``torch.nn.Module.register_parameter`` for the block's
    length: modules built by other threads meanwhile get meta parameters too."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            moved = module._parameters[name]
            module._parameters[name] = type(moved)(moved.to("meta"), requires_grad=moved.requires_grad)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
