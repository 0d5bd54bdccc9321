"""Save an optimized module to one file and load it back, in this process or another.

    fxopt.save(opt, "model.fxopt")
    opt = fxopt.load("model.fxopt")

The file holds the optimized ``fx.GraphModule`` (pickled as its generated code and its
constants, the way ``torch.save`` stores any GraphModule), the call signature (the pytree
specs that map the user's call to the graph's inputs and back), the report, and for the
ONNX backend the ONNX model that ONNX Runtime runs (its bytes, and any external weight
files). Loading rebuilds the runner: the eager backend runs the graph as it is (fxopt's
int8 kernels are registered by importing :mod:`fxopt.int8`); the ONNX backend opens a new
ONNX Runtime session on the stored model. Nothing is captured or verified again.

The file is a pickle (``torch.load(weights_only=False)``): load only files you trust.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from fxopt.errors import BackendError, FxoptError, InputError

FORMAT = "fxopt.OptimizedModule"
VERSION = 1


def save(optimized: Any, path: str | os.PathLike[str]) -> str:
    """Write ``optimized`` (an :class:`fxopt.OptimizedModule`) to ``path``; returns the path.

    The file is written next to ``path`` first and moved into place when complete, so a
    failure leaves no partial file behind (and an existing file untouched).
    """
    from fxopt.api import OptimizedModule
    from fxopt.ir import copy_graph_module

    if not isinstance(optimized, OptimizedModule):
        raise InputError(f"fxopt.save takes what fxopt.compile returns, got {type(optimized).__name__}")
    backend = optimized.report.backend
    if backend not in ("eager", "onnx"):
        raise BackendError(f"fxopt.save supports the eager and onnx backends, not {backend!r}")
    graph_module = copy_graph_module(optimized.graph_module)  # shares the constants
    graph_module.meta = {}  # fake tensors and capture bookkeeping are not part of the file
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": torch.__version__,
        "backend": backend,
        "device": str(optimized.device) if optimized.device is not None else None,
        "graph_module": graph_module,
        "signature": optimized.signature,
        "report": optimized.report,
        "onnx_files": _onnx_files(optimized) if backend == "onnx" else None,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        torch.save(payload, partial)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return str(target)


def load(path: str | os.PathLike[str]) -> Any:
    """Load a module written by :func:`save`; it runs on the device it was compiled for."""
    import fxopt.int8  # noqa: F401 - registers the int8 custom ops a saved graph may call
    from fxopt.api import OptimizedModule

    try:
        with warnings.catch_warnings():
            # torch 2.13 warns while unpickling its own pytree specs (LeafSpec)
            warnings.simplefilter("ignore", FutureWarning)
            payload = torch.load(path, weights_only=False, map_location=None)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise FxoptError(f"{path} is not a file written by fxopt.save: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FxoptError(f"{path} is not a file written by fxopt.save")
    if payload["version"] > VERSION:
        raise FxoptError(f"{path} was written by a newer fxopt (file format {payload['version']}, "
                         f"this fxopt reads up to {VERSION})")
    device = torch.device(payload["device"]) if payload["device"] is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"{path} was compiled for {device}, but CUDA is not available on this machine")
    gm, signature, report = payload["graph_module"], payload["signature"], payload["report"]
    if payload["backend"] == "onnx":
        runner = _onnx_runner(payload["onnx_files"], signature, device)
    else:
        runner = eager_runner(gm)
    return OptimizedModule(gm, signature, report, runner, device)


def eager_runner(gm: torch.fx.GraphModule) -> Any:
    """Runs ``gm`` as the eager backend does: under ``no_grad``, returning its flat outputs."""
    def run(*inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return gm(*inputs)

    return run


# ---------------------------------------------------------------- ONNX


def _onnx_files(optimized: Any) -> dict[str, bytes]:
    """The ONNX model the module's session runs, as ``{file name: bytes}`` (the model and
    any external weight files), exported again from the same graph."""
    from fxopt.backends import onnx as onnx_backend

    gm = optimized.graph_module
    weights = next(iter(gm.buffers()), None)
    home = weights.device if weights is not None else torch.device("cpu")
    inputs = [_placeholder_input(spec, home) for spec in optimized.signature.inputs]
    with tempfile.TemporaryDirectory(prefix="fxopt-save-") as workdir:
        model_path = Path(workdir) / "model.onnx"
        onnx_backend._export(gm, inputs, model_path, optimized.signature, onnx_backend.DEFAULT_OPSET)
        return {p.name: p.read_bytes() for p in Path(workdir).iterdir() if p.is_file()}


def _placeholder_input(spec: Any, device: torch.device) -> torch.Tensor:
    # Export traces shapes and dtypes; values do not matter (zeros are valid token ids).
    return torch.zeros(spec.example_shape, dtype=spec.dtype, device=device)


def _onnx_runner(files: dict[str, bytes], signature: Any, device: torch.device) -> Any:
    from fxopt.backends import onnx as onnx_backend

    # ONNX Runtime reads external weight files relative to the model's path, and keeps
    # what it needs in memory once the session exists.
    with tempfile.TemporaryDirectory(prefix="fxopt-load-") as workdir:
        for name, data in files.items():
            (Path(workdir) / name).write_bytes(data)
        session = onnx_backend._session(Path(workdir) / "model.onnx", device, profile_dir=None)
    return onnx_backend._OrtRunner(session, onnx_backend._input_names(signature), device)
