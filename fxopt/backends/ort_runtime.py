"""Running an exported graph in ONNX Runtime: the session fxopt opens (its options and
providers), where its nodes ran, and :class:`OrtRunner`, which calls it with torch tensors."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxopt.errors import BackendError


# What an exported graph's output position holds besides a tensor ONNX computed:
@dataclass(frozen=True)
class _Passthrough:
    value: Any


@dataclass(frozen=True)
class _Number:
    """A SymInt/float output ONNX computes as a 0-d tensor; returned as a Python number."""

    index: int
    kind: type


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def session_options(profile_dir: str | None = None) -> Any:
    """The session options fxopt uses.

    Intra-op threads do not spin while waiting for work (``session.intra_op.allow_spinning=0``):
    spinning threads keep every core busy between calls, which slows down PyTorch and anything
    else on the machine for little gain at inference batch sizes. The session uses as many
    intra-op threads as PyTorch does (``torch.set_num_threads`` sets both), where ONNX
    Runtime's own default would count physical cores only.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "profile")
    return options


# ONNX Runtime's graph rewrites that make a CPU session slower: its CPU SkipLayerNormalization
# kernel measured ~7x slower than the Add + LayerNormalization it fuses ([8, 128, 768], one
# thread: 8.0 ms against 1.1 ms; docs/onnx.md), ~4% of BERT-base's time in float32.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def ort_session(path: Path, device: torch.device, profile_dir: str | None = None) -> Any:
    """An ONNX Runtime session for ``path`` with fxopt's options, on CUDA when ``device`` is
    a CUDA device and this ONNX Runtime has the CUDA provider. On CPU the rewrites in
    :data:`CPU_DISABLED_OPTIMIZERS` are off."""
    import onnxruntime as ort

    providers: list[Any] = ["CPUExecutionProvider"]
    disabled: list[str] = list(CPU_DISABLED_OPTIMIZERS)
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        disabled = []
    try:
        return ort.InferenceSession(str(path), session_options(profile_dir), providers=providers,
                                    disabled_optimizers=disabled or None)
    except Exception as exc:
        raise BackendError(f"ONNX Runtime could not load the exported graph: {exc}") from exc


def _node_providers(profile_path: str) -> Counter[str]:
    """How many graph nodes each execution provider ran, from an ONNX Runtime profile."""
    nodes: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        with open(profile_path) as f:
            events = json.load(f)
        for event in events:
            args = event.get("args") or {}
            if event.get("cat") == "Node" and "provider" in args:
                nodes[event["name"].removesuffix("_kernel_time")] = args["provider"]
    with contextlib.suppress(OSError):
        os.remove(profile_path)
    return Counter(nodes.values())


class OrtRunner:
    """Calls an ONNX Runtime session with torch tensors and returns the graph's flat outputs
    as torch tensors (and the non-tensor outputs that never entered ONNX)."""

    exported: Any = None  # lower_onnx keeps these two for fxopt.save
    files: Any = None  # the TemporaryDirectory holding the exported model

    def __init__(self, session: Any, exported: Any, device: torch.device) -> None:  # an OnnxGraph
        self.session = session
        self.device = device
        self.provider = session.get_providers()[0]
        used = {i.name for i in session.get_inputs()}  # the exporter drops unused inputs
        self._feeds = [(position, name) for position, name in enumerate(exported.input_names) if name in used]
        self._output_names = [o.name for o in session.get_outputs()]
        self._layout = list(exported.outputs)

    def __call__(self, *inputs: torch.Tensor) -> list[Any]:
        if self.provider == "CUDAExecutionProvider":
            tensors = self._run_cuda(inputs)
        else:
            tensors = self._run_cpu(inputs)
        return [self._output(entry, tensors) for entry in self._layout]

    @staticmethod
    def _output(entry: Any, tensors: list[torch.Tensor]) -> Any:
        if isinstance(entry, _Passthrough):
            return entry.value
        if isinstance(entry, _Number):
            return entry.kind(tensors[entry.index].item())
        return tensors[entry]

    def _run_cpu(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feeds = {}
        for position, name in self._feeds:
            tensor = inputs[position].detach()
            if tensor.dtype == torch.bfloat16:
                raise BackendError("ONNX Runtime's CPU runner takes no bfloat16 inputs; use float32 or float16")
            feeds[name] = tensor.cpu().contiguous().numpy()
        outputs = self.session.run(None, feeds)
        return [torch.from_numpy(o).to(self.device) for o in outputs]

    def _run_cuda(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        keep_alive = []
        for position, name in self._feeds:
            tensor = inputs[position].detach().to(self.device).contiguous()
            keep_alive.append(tensor)
            binding.bind_input(name, "cuda", tensor.device.index or 0, _numpy_dtype(tensor.dtype),
                               tuple(tensor.shape), tensor.data_ptr())
        for name in self._output_names:
            binding.bind_output(name, "cuda", self.device.index or 0)
        self.session.run_with_iobinding(binding)
        outputs = []
        for value in binding.get_outputs():
            if hasattr(value, "to_dlpack"):
                outputs.append(torch.utils.dlpack.from_dlpack(value.to_dlpack()))
            else:
                outputs.append(torch.from_numpy(value.numpy()).to(self.device))
        return outputs


def _numpy_dtype(dtype: torch.dtype) -> Any:
    import numpy as np

    return np.dtype(str(dtype).removeprefix("torch."))

