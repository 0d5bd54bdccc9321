"""Save an optimized module to one file and load it back, in this process or another.

    fxopt.save(opt, "model.fxopt")
    opt = fxopt.load("model.fxopt")

The file holds the optimized ``fx.GraphModule`` (pickled as its generated code and its
constants, the way ``torch.save`` stores any GraphModule), the call signature (the pytree
specs that map the user's call to the graph's inputs and back), the report, and for the
ONNX backend the ONNX model that ONNX Runtime runs (its bytes, and any external weight
files). Loading rebuilds the runner: the eager backend runs the kernel stage of its lowering
again (kernels such as oneDNN's are chosen for the machine that loads the file, and checked
against the stored graph); the custom ops a stored graph calls are registered first (the
registered lowerings and their kernels, the QDQ ops of :mod:`fxopt.ir.qdq`). The ONNX
backend opens a new ONNX Runtime session on the stored model. Nothing is captured or
optimized again.

Other backends (:mod:`fxopt.backends`): a runner with a ``saved_state()`` method stores what
it returns, and the backend's ``restore`` rebuilds the runner from it (OpenVINO stores its
exported ONNX files and compiles them again on load). A backend without one is lowered again
from the stored graph when the file is loaded (Inductor compiles the graph again: loading
takes its compile time). Loading needs the backend installed; the error says how.

The file is a pickle (``torch.load(weights_only=False)``): load only files you trust.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from fxopt.errors import BackendError, FxoptError, InputError

FORMAT = "fxopt.OptimizedModule"
VERSION = 1


class ConstantsAsAttributes(torch.fx.Tracer):
    """The tracer that rebuilds a stored graph on load (a pickled GraphModule is re-traced
    from its code). torch.fx's default tracer runs an op whose inputs are all buffers while
    tracing, so a buffer-only step (``to(token_type_ids, int64)``) would be folded into a
    new constant, and fails outright on the ONNX backend's weightless meta buffers; reading
    every buffer through ``get_attr`` keeps the graph as it was saved."""

    proxy_buffer_attributes = True


def save(optimized: Any, path: str | os.PathLike[str]) -> str:
    """Write ``optimized`` (an :class:`fxopt.OptimizedModule`) to ``path``; returns the path.

    The file is written next to ``path`` first and moved into place when complete, so a
    failure leaves no partial file behind (and an existing file untouched).
    """
    from fxopt.ir import copy_graph_module
    from fxopt.module import OptimizedModule

    if not isinstance(optimized, OptimizedModule):
        raise InputError(f"fxopt.save takes what fxopt.compile returns, got {type(optimized).__name__}")
    backend = optimized.report.backend
    state = _backend_state(optimized) if backend not in ("eager", "onnx") else None
    graph_module = copy_graph_module(optimized.graph_module)  # shares the constants
    graph_module.meta = {}  # fake tensors and capture bookkeeping are not part of the file
    graph_module._tracer_cls = ConstantsAsAttributes
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": torch.__version__,
        "backend": backend,
        "device": str(optimized.device) if optimized.device is not None else None,
        "graph_module": graph_module,
        "signature": optimized.signature,
        "report": optimized.report,
        "onnx": _onnx_files(optimized) if backend == "onnx" else None,
        "backend_state": state,
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
    import fxopt.ir.qdq  # noqa: F401 - registers the quantize/dequantize ops a QDQ graph calls
    from fxopt.lowering.registry import lowerings
    from fxopt.module import OptimizedModule

    lowerings()  # imports every registered lowering and the custom ops its kernels add

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
        runner = _onnx_runner(payload["onnx"], device)
    elif payload["backend"] != "eager":
        gm, runner = _backend_runner(payload["backend"], payload.get("backend_state"), gm, signature, report, device)
    else:
        gm, runner = _eager_runner(gm, signature, report, device)
    return OptimizedModule(gm, signature, report, runner, device)


def _eager_runner(gm: torch.fx.GraphModule, signature: Any, report: Any, device: torch.device) -> tuple[Any, Any]:
    """The eager backend's lowering again: the kernel-stage lowerings (oneDNN, say) pick the
    kernels for this machine, checked on inputs shaped like the examples (the stored graph
    is already graph-lowered, so that stage finds nothing new)."""
    from fxopt.backends import lower

    scratch = dataclasses.replace(report, notes=[])  # the stored report already has the notes
    generator = torch.Generator().manual_seed(0)
    inputs = [_input_like(spec, generator).to(device) for spec in signature.inputs]
    lowered = lower("eager", gm, signature, inputs, device, scratch)
    return lowered.graph_module, lowered.run


def _backend_state(optimized: Any) -> Any:
    """What a plugin backend's runner stores (its ``saved_state()``), or None when the
    backend is lowered again from the stored graph on load, which needs the graph's weights."""
    from fxopt.backends import get_backend

    backend = get_backend(optimized.report.backend)
    saved_state = getattr(optimized._runner, "saved_state", None)
    if saved_state is not None and backend.restore is not None:
        return saved_state()
    if any(t.device.type == "meta" for t in (*optimized.graph_module.parameters(),
                                             *optimized.graph_module.buffers())):
        raise BackendError(f"the {backend.name} backend keeps no weights in the module and has no "
                           "saved_state/restore: it cannot be saved")
    return None


def _backend_runner(name: str, state: Any, gm: torch.fx.GraphModule, signature: Any, report: Any,
                    device: torch.device) -> tuple[Any, Any]:
    """A plugin backend's runner: restored from its saved state, or lowered again from the
    stored graph (inputs shaped like the examples, as for the eager backend)."""
    from fxopt.backends import get_backend, lower

    backend = get_backend(name, device)  # says what to install when the backend is missing
    if state is not None and backend.restore is not None:
        return gm, backend.restore(state, gm, signature, device)
    scratch = dataclasses.replace(report, notes=[])
    generator = torch.Generator().manual_seed(0)
    inputs = [_input_like(spec, generator).to(device) for spec in signature.inputs]
    lowered = lower(name, gm, signature, inputs, device, scratch)
    return lowered.graph_module, lowered.run


def _input_like(spec: Any, generator: torch.Generator) -> torch.Tensor:
    if spec.dtype.is_floating_point:
        return torch.randn(spec.example_shape, generator=generator).to(spec.dtype)
    if spec.dtype == torch.bool:
        return torch.ones(spec.example_shape, dtype=torch.bool)
    return torch.zeros(spec.example_shape, dtype=spec.dtype)  # valid token ids and indices


# ---------------------------------------------------------------- ONNX


def _onnx_files(optimized: Any) -> dict[str, Any]:
    """The ONNX model the module's session runs: its files (the model and any external
    weight files) as bytes, and how the runner maps them to the graph's inputs and outputs."""
    runner = optimized._runner
    exported, files = getattr(runner, "exported", None), getattr(runner, "files", None)
    if exported is None or files is None:
        raise BackendError("this ONNX Runtime module does not keep its exported model; compile it again to save it")
    directory = Path(files.name)
    contents = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and p.suffix != ".json"}
    return {"graph": dataclasses.replace(exported, path=Path(exported.path.name)), "files": contents}


def _onnx_runner(stored: dict[str, Any], device: torch.device) -> Any:
    from fxopt.backends.onnx import OrtRunner, ort_session

    # ONNX Runtime reads external weight files relative to the model's path, so the files
    # go back into a directory that lives as long as the runner.
    files = tempfile.TemporaryDirectory(prefix="fxopt-onnx-")
    for name, data in stored["files"].items():
        (Path(files.name) / name).write_bytes(data)
    exported = dataclasses.replace(stored["graph"], path=Path(files.name) / stored["graph"].path.name)
    runner = OrtRunner(ort_session(exported.path, device), exported, device)
    runner.exported, runner.files = exported, files
    return runner
