"""Save an optimized module to one file and load it back, in this process or another.

    fxopt.save(opt, "model.fxopt")
    opt = fxopt.load("model.fxopt")
    print(fxopt.saving.describe("model.fxopt"))     # or: fxopt inspect model.fxopt

The file is data only (:mod:`fxopt.saving.archive`): a zip of JSON documents (the manifest,
the optimized graph as nodes and operator names, the call signature, the report, the
backend's state), the constants as a safetensors member (memory-mapped on load) and, for
the ONNX backend, the ONNX model and its external data as they are. Loading never
unpickles and never runs code the file carries: operators, functions and types are looked
up by name among torch, fxopt and the registered plugins (:mod:`fxopt.saving.trust`), and
anything else is refused with an error that names it. Files of the earlier pickle format
are refused too; ``fxopt.load(path, allow_pickle=True)`` reads one the user trusts, and
``fxopt.save`` writes it again in this format.

Loading rebuilds the runner: the eager backend runs the kernel stage of its lowering again
(kernels such as oneDNN's are chosen for the machine that loads the file, and checked
against the stored graph); the ONNX backend opens a new ONNX Runtime session on the stored
model. Another backend (:mod:`fxopt.backends`) whose runner has ``saved_state()`` stores
what it returns (JSON-able data, bytes, tensors, fxopt or plugin dataclasses) and its
``restore`` rebuilds the runner (OpenVINO compiles its stored ONNX files again); a backend
without one is lowered again from the stored graph (Inductor compiles it again). Nothing is
captured or optimized again. Loading needs the backend installed; the error says how.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from fxopt.errors import BackendError, FxoptError, InputError
from fxopt.saving.archive import Archive, is_archive, replace_atomically, write_archive
from fxopt.saving.graph import decode_graph, encode_graph
from fxopt.saving.legacy import ConstantsAsAttributes, is_pickle, load_pickled
from fxopt.saving.values import Sink, UnsafeFileError, decode, encode

__all__ = ["ConstantsAsAttributes", "UnsafeFileError", "describe", "inspect", "load", "save"]

FORMAT = "fxopt.OptimizedModule"
VERSION = 2
MANIFEST = "fxopt.json"
DOCUMENTS = ("graph.json", "signature.json", "report.json", "backend.json")


def save(optimized: Any, path: str | Any) -> str:
    """Write ``optimized`` (an :class:`fxopt.OptimizedModule`) to ``path``; returns the path.

    The file is written next to ``path`` first and moved into place when complete, so a
    failure leaves no partial file behind (and an existing file untouched).
    """
    from fxopt.module import OptimizedModule

    if not isinstance(optimized, OptimizedModule):
        raise InputError(f"fxopt.save takes what fxopt.compile returns, got {type(optimized).__name__}")
    backend = optimized.report.backend
    if backend == "onnx":
        state = _onnx_files(optimized)
    elif backend != "eager":
        state = _backend_state(optimized)
    else:
        state = None
    sink = Sink()
    documents = {
        MANIFEST: {"format": FORMAT, "version": VERSION, "fxopt_version": _fxopt_version(),
                   "torch_version": torch.__version__, "backend": backend,
                   "device": str(optimized.device) if optimized.device is not None else None},
        "graph.json": encode_graph(optimized.graph_module, sink.tensors),
        "signature.json": encode(optimized.signature, sink, where="the call signature"),
        "report.json": encode(optimized.report, sink, where="the report"),
        "backend.json": encode(state, sink, where=f"the {backend} backend's state"),
    }
    target = Path(path)
    replace_atomically(target, lambda partial: write_archive(partial, documents, sink.tensors, sink.blobs))
    return str(target)


def load(path: str | Any, *, allow_pickle: bool = False) -> Any:
    """Load a module written by :func:`save`; it runs on the device it was compiled for.

    ``allow_pickle=True`` also reads a file of the earlier, pickled format, which runs any
    code the file holds: only for a file you trust, to save it again in this format.
    """
    from fxopt.saving.trust import register_custom_ops

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    register_custom_ops()  # the operators a stored graph may call
    if not _is_fxopt_archive(path):
        if not is_pickle(path):
            raise FxoptError(f"{path} is not a file written by fxopt.save")
        if not allow_pickle:
            raise FxoptError(
                f"{path} is not a file written by fxopt.save in its current format: it is a pickle (written by "
                "torch.save, or in fxopt's earlier file format), and unpickling runs any code the file holds, so "
                "fxopt.load refuses it. If it is an fxopt file from a source you trust, convert it once: "
                f"fxopt.save(fxopt.load(path, allow_pickle=True), path) (see docs/shapes-and-saving.md)")
        payload = load_pickled(path)
        device = _device(payload["device"], path)
        return _build(payload["backend"], payload["graph_module"], payload["signature"], payload["report"],
                      payload["onnx"] if payload["backend"] == "onnx" else payload.get("backend_state"), device)
    with Archive(path) as archive:
        manifest = _manifest(archive)
        device = _device(manifest["device"], path)
        tensors = archive.read_constants()

        def tensor(key: str) -> torch.Tensor:
            if key not in tensors:
                raise UnsafeFileError(f"{path}: the file names tensor {key!r}, which it does not hold")
            return tensors[key]

        def read(name: str) -> Any:
            return decode(archive.json(name), tensor=tensor, blob=archive.blob)

        gm = decode_graph(archive.json("graph.json"), tensors, device)
        signature, report, state = read("signature.json"), read("report.json"), read("backend.json")
    return _build(manifest["backend"], gm, signature, report, state, device)


def inspect(path: str | Any) -> dict[str, Any]:
    """What a file written by :func:`save` holds, read without building anything: the
    manifest (backend, device, versions), the report, the graph's operators and the sizes of
    its constants and files."""
    from collections import Counter

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if not _is_fxopt_archive(path):
        what = "a pickle (torch.save, or fxopt's earlier file format)" if is_pickle(path) else "not an fxopt file"
        raise FxoptError(f"{path} is not a file written by fxopt.save in its current format: it is {what}")
    with Archive(path) as archive:
        manifest = _manifest(archive)
        graph = archive.json("graph.json")
        report = decode(archive.json("report.json"), tensor=lambda key: key, blob=lambda key: key)
        header = archive.constants_header()
        files = {info.filename: info.file_size for info in archive.zip.infolist()}
    ops = Counter(str(node["target"].get("op") or node["target"].get("function"))
                  for node in graph.get("nodes", []) if isinstance(node, dict) and node.get("op") == "call_function"
                  and isinstance(node.get("target"), dict))
    constants = {name: {"dtype": entry["dtype"], "shape": entry["shape"],
                        "bytes": entry["data_offsets"][1] - entry["data_offsets"][0]}
                 for name, entry in header.items()}
    return {**manifest, "report": report, "operators": dict(ops.most_common()), "constants": constants,
            "constant_bytes": sum(c["bytes"] for c in constants.values()), "files": files}


def describe(path: str | Any) -> str:
    """:func:`inspect`'s findings as text (what ``fxopt inspect`` prints)."""
    info = inspect(path)
    report = info["report"]
    lines = [f"{path}: fxopt file format {info['version']} (fxopt {info['fxopt_version']}, "
             f"torch {info['torch_version']})",
             f"backend: {info['backend']} on {info['device'] or 'cpu'}",
             f"passes: {', '.join(f'{r.name} ({r.status}, {r.applied} applied)' for r in report.passes) or 'none'}",
             f"constants: {len(info['constants'])} tensors, {info['constant_bytes'] / 1e6:.3g} MB "
             f"(memory-mapped on load)"]
    for name, entry in sorted(info["constants"].items(), key=lambda item: -item[1]["bytes"])[:5]:
        lines.append(f"  {name}: {entry['dtype']} {entry['shape']} ({entry['bytes'] / 1e6:.3g} MB)")
    lines.append("operators: " + ", ".join(f"{name} x{count}" for name, count in info["operators"].items()))
    lines.append("files: " + ", ".join(f"{name} ({size} B)" for name, size in info["files"].items()))
    lines.append(str(report))
    return "\n".join(lines)


def _fxopt_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fxopt")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def _is_fxopt_archive(path: Path) -> bool:
    if not is_archive(path):
        return False
    with Archive(path) as archive:
        return archive.has(MANIFEST)


def _manifest(archive: Archive) -> dict[str, Any]:
    manifest = archive.json(MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FxoptError(f"{archive.path} is not a file written by fxopt.save")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise FxoptError(f"{archive.path} was written by a newer fxopt (file format {version}, "
                         f"this fxopt reads up to {VERSION})")
    for key in ("backend", "device"):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            raise UnsafeFileError(f"{archive.path}: malformed {key} in {MANIFEST}")
    return manifest


def _device(name: str | None, path: Path) -> torch.device:
    device = torch.device(name) if name is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"{path} was compiled for {device}, but CUDA is not available on this machine")
    return device


def _build(backend: str, gm: torch.fx.GraphModule, signature: Any, report: Any, state: Any,
           device: torch.device) -> Any:
    from fxopt.module import OptimizedModule

    packed: dict[str, Any] = {}
    if backend == "onnx":
        runner = _onnx_runner(state, device)
    elif backend != "eager":
        gm, runner = _backend_runner(backend, state, gm, signature, report, device)
    else:
        gm, runner, packed = _lowered_again("eager", gm, signature, report, device)
    return OptimizedModule(gm, signature, report, runner, device, packed)


def _lowered_again(backend: str, gm: torch.fx.GraphModule, signature: Any, report: Any,
                   device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    """The backend's lowering again, on inputs shaped like the examples: for the eager
    backend the kernel-stage lowerings (oneDNN, say) pick the kernels for this machine and
    are checked (the stored graph is already graph-lowered, so that stage finds nothing new)."""
    from fxopt.backends import lower

    scratch = dataclasses.replace(report, notes=[])  # the stored report already has the notes
    generator = torch.Generator().manual_seed(0)
    inputs = [_input_like(spec, generator).to(device) for spec in signature.inputs]
    _values_from(gm, inputs)
    lowered = lower(backend, gm, signature, inputs, device, scratch)
    return lowered.graph_module, lowered.run, lowered.packed


def _values_from(gm: torch.fx.GraphModule, inputs: list[Any]) -> None:
    """Each node's value (``meta["val"]``, which a stored graph does not keep) from inputs shaped
    like the examples, so that the kernel-stage lowerings that read shapes and dtypes (oneDNN's
    float and int8 Linears) apply as they did at compile time; left without when that fails."""
    from fxopt.ir.shapes import propagate_shapes

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs) or any("val" in n.meta for n in gm.graph.nodes):
        return
    for node, value in zip(placeholders, inputs):
        node.meta["val"] = value
    try:
        propagate_shapes(gm)
    except Exception:  # a graph fake tensors cannot run: the lowerings that need values skip it
        for node in gm.graph.nodes:
            node.meta.pop("val", None)


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
    """A plugin backend's runner: restored from its saved state, or lowered again."""
    from fxopt.backends import get_backend

    backend = get_backend(name, device)  # says what to install when the backend is missing
    if state is not None and backend.restore is not None:
        return gm, backend.restore(state, gm, signature, device)
    gm, runner, _ = _lowered_again(name, gm, signature, report, device)
    return gm, runner


def _input_like(spec: Any, generator: torch.Generator) -> torch.Tensor:
    if spec.dtype.is_floating_point:
        return torch.randn(spec.example_shape, generator=generator).to(spec.dtype)
    if spec.dtype == torch.bool:
        return torch.ones(spec.example_shape, dtype=torch.bool)
    return torch.zeros(spec.example_shape, dtype=spec.dtype)  # valid token ids and indices


# ---------------------------------------------------------------- files of ONNX runtimes


def unpack_files(files: dict[str, bytes], prefix: str) -> tempfile.TemporaryDirectory[str]:
    """Write stored model files into a new temporary directory (ONNX Runtime and OpenVINO
    read external weight files next to the model); the directory lives as long as the
    returned object. A name that is not a plain file name is refused."""
    directory = tempfile.TemporaryDirectory(prefix=prefix)
    for name, data in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or "\\" in name:
            directory.cleanup()
            raise UnsafeFileError(f"the file stores a model file named {name!r}, which is not a plain file name")
        if not isinstance(data, bytes):
            directory.cleanup()
            raise UnsafeFileError(f"the stored model file {name!r} is not bytes")
        (Path(directory.name) / name).write_bytes(data)
    return directory


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
    from fxopt.backends.onnx import OnnxGraph, OrtRunner, ort_session

    if not isinstance(stored, dict) or not isinstance(stored.get("graph"), OnnxGraph):
        raise UnsafeFileError("the file's ONNX backend state is malformed")
    files = unpack_files(stored.get("files") or {}, "fxopt-onnx-")
    exported = dataclasses.replace(stored["graph"], path=Path(files.name) / Path(stored["graph"].path).name)
    runner = OrtRunner(ort_session(exported.path, device), exported, device)
    runner.exported, runner.files = exported, files
    return runner
