"""``fxopt.compile`` for a model that generates: a transformers causal LM with a KV cache.

``fxopt.compile(lm, ids, passes=[...])`` on a transformers model that can ``generate()`` and
uses a cache returns a :class:`GenerativeModule`: ``opt.generate(...)`` is Hugging Face's own
decoding loop (cache, sampling, stopping criteria) over fxopt's optimized graphs, and ``opt(ids)``
is one optimized forward. One graph cannot serve both a prefill and a decode step (the cache
is an input of one and not of the other, and its length changes every token), so the forward
is compiled through fxopt's torch.compile backend with dynamic shapes: prefill and decode are
each captured, optimized, verified on the example's real inputs and lowered once, and a decode
graph serves every later token. Compiling generates ``warmup_tokens`` tokens from the example
prompt, so both graphs exist (and were checked) when ``fxopt.compile`` returns.

The weights are the model's own tensors (``share_weights``, as ``fxopt.compile``'s default):
nothing is copied, and what passes derive from a weight (int8 or int4 copies, packed layouts)
is made once and shared by the graphs (:mod:`fxopt.ir.derived`). The model is never written;
change its weights in place afterwards and the next call re-optimizes the graph that froze
them (see :mod:`fxopt.frontends.dynamo`).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from fxopt.errors import FxoptError, InputError
from fxopt.frontends.dynamo import CompileLog
from fxopt.report import Report
from fxopt.signature import split_example_inputs

DEFAULT_WARMUP_TOKENS = 2


def is_generative(model: torch.nn.Module) -> bool:
    """A transformers model that generates with a KV cache: its forward returns the cache, which
    a single captured graph cannot (``use_cache=False`` models compile as one graph)."""
    transformers = sys.modules.get("transformers")  # a model of it means it is imported already
    if transformers is None:
        return False
    GenerationMixin = transformers.GenerationMixin  # noqa: N806
    config = getattr(model, "config", None)
    return (isinstance(model, GenerationMixin) and bool(getattr(config, "use_cache", False))
            and callable(getattr(model, "can_generate", None)) and model.can_generate())


class GenerativeModule(torch.nn.Module):
    """A causal LM whose forward runs fxopt's graphs: ``generate()`` as the model's own.

    ``report`` is the prefill graph's report (``reports`` has one per graph: prefill, decode,
    and any later ones dynamo adds), ``log`` the :class:`fxopt.frontends.dynamo.CompileLog`.
    Attributes the module does not have (``config``, ``generation_config``, ``device``...)
    are the model's.
    """

    def __init__(self, lm: torch.nn.Module, log: CompileLog, compile_seconds: float) -> None:
        super().__init__()
        self.lm = lm  # a shallow copy of the user's model whose forward is the compiled one
        self.log = log
        self.compile_seconds = compile_seconds

    @property
    def reports(self) -> list[Report]:
        return self.log.reports

    @property
    def report(self) -> Report:
        return self.log.reports[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _compiled_mode():
            return self.lm(*_plain(args), **_plain(kwargs))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``transformers.GenerationMixin.generate`` over the optimized graphs."""
        with _compiled_mode():
            return self.lm.generate(*_plain(args), **_plain(kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["lm"], name)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise FxoptError("a GenerativeModule is not saved: it holds torch.compile's graphs. Save the model "
                         "and compile it again after loading")

    def __repr__(self) -> str:
        return f"GenerativeModule({type(self.lm).__name__}, {self.log.compiles} graph(s))"


def compile_generative(model: torch.nn.Module, example_inputs: Any, passes: Any, backend: str | None,
                       device: Any, strict: bool, example_kwargs: Mapping[str, Any] | None,
                       share_weights: bool, measure: bool, unsupported: Mapping[str, Any],
                       warmup_tokens: int = DEFAULT_WARMUP_TOKENS) -> GenerativeModule:
    """See the module docstring; called by :func:`fxopt.compile`."""
    given = sorted(name for name, value in unsupported.items()
                   if value is not None and value is not False and not (isinstance(value, tuple) and not value))
    if given:
        raise InputError(f"{', '.join(given)}: not supported when compiling a model that generates "
                         f"({type(model).__name__} with use_cache=True); give passes= (a lossy pass keeps "
                         "its own error budget), or build the model with use_cache=False to compile one "
                         "forward graph")
    if device is not None and torch.device(device) != _device_of(model):
        raise InputError(f"device={device!r}: compile a generating model where it runs (it is on "
                         f"{_device_of(model)}); move the model first")
    backend = backend or "eager"
    if backend not in ("eager", "onnx"):
        raise InputError(f"backend={backend!r}: a generating model compiles through torch.compile's "
                         "graphs, which fxopt lowers to 'eager' or 'onnx'")
    args, kwargs = split_example_inputs(example_inputs, example_kwargs)
    log = CompileLog()
    lm = copy.copy(model)  # shares the modules and weights; only its forward differs
    lm.forward = torch.compile(type(model).forward.__get__(lm, type(lm)), backend="fxopt", dynamic=True, options={
        "passes": passes, "backend": backend, "strict": strict, "log": log, "share_weights": share_weights,
        "measure": measure})
    start = time.perf_counter()
    generation = {"max_new_tokens": warmup_tokens, "min_new_tokens": warmup_tokens, "do_sample": False}
    config = getattr(model, "generation_config", None)
    if getattr(config, "pad_token_id", None) is None:
        generation["pad_token_id"] = getattr(config, "eos_token_id", None) or 0
    with _compiled_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
        lm.generate(*_plain(args), **_plain(kwargs), **generation)
    if not log.records:
        raise FxoptError(f"torch.compile handed fxopt no graph while {type(model).__name__} generated "
                         "from the example prompt")
    return GenerativeModule(lm, log, time.perf_counter() - start)


def _compiled_mode() -> contextlib.ExitStack:
    """The mode the graphs were compiled in (no grad, outside inference mode): dynamo guards on
    it, so a call under ``torch.inference_mode()`` would otherwise compile another pair."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def _plain(values: Any) -> Any:
    """Inference tensors (made under ``torch.inference_mode()``) as ordinary ones: dynamo guards
    on the difference too."""
    if isinstance(values, Mapping):
        return {k: _plain_tensor(v) for k, v in values.items()}
    return tuple(_plain_tensor(v) for v in values)


def _plain_tensor(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def _device_of(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")
