"""The ONNX backend: export the optimized graph with ``torch.onnx`` and run it in ONNX Runtime.

``lower_onnx`` (``fxopt.compile(..., backend="onnx")``) keeps the exported graph in an ONNX
Runtime session that takes and returns torch tensors; the session owns the weights, and the
module keeps the graph's structure only. :func:`export_graph` writes a checked ``.onnx`` file;
``fxopt.export_onnx`` (:mod:`fxopt.frontends.onnx_export`) is the user-facing entry point.

The registered lowerings for ``"onnx"`` (:mod:`fxopt.lowering`) rewrite their patterns first
and bring the onnxscript translations of the ops they write, and their parity tolerance.
Other custom ops (``torch.library``) are translated by the functions given to
:func:`register_onnx_translation`. Outputs that are not tensors (None, numbers) pass around
ONNX Runtime unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.backends import Lowered
from fxopt.backends.ort_runtime import (  # noqa: F401 - part of this module's interface
    CPU_DISABLED_OPTIMIZERS,
    OrtRunner,
    _node_providers,
    _Number,
    _ort_version,
    _Passthrough,
    ort_session,
    session_options,
)
from fxopt.errors import BackendError
from fxopt.ir import copy_graph_module
from fxopt.ir.derived import collect_let_go
from fxopt.lowering import lower_graph
from fxopt.verify import compare_outputs, exact_tolerance, run_graph

# Opset 20 is the first with a Gelu operator (both the erf and the tanh form): below it the
# exporter spells GELU out as a dozen elementwise nodes.
DEFAULT_OPSET = 20
# Above this many weight bytes the weights go to an external data file (ONNX's protobuf
# limit is 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30

_TRANSLATIONS: dict[Any, Callable[..., Any]] = {}
_NAME = re.compile(r"[^0-9a-zA-Z_]+")


def register_onnx_translation(op: Any, function: Callable[..., Any]) -> None:
    """Translate calls to ``op`` (an ``OpOverload``/custom op) with an onnxscript ``function``.

    The table is handed to ``torch.onnx.export(custom_translation_table=...)``, together
    with the translations of the lowerings that applied. A lowering brings its own
    (:meth:`fxopt.lowering.Lowering.onnx_translations`); this table is for custom ops a model
    calls itself.
    """
    _TRANSLATIONS[op] = function


def onnx_translations() -> dict[Any, Callable[..., Any]]:
    """A copy of the translations given to :func:`register_onnx_translation`."""
    return dict(_TRANSLATIONS)


# ---------------------------------------------------------------- export


@dataclass
class OnnxGraph:
    """A graph written to an ONNX file: where, how big, how to read its outputs back, and
    what the lowerings did on the way."""

    path: Path
    node_count: int
    input_names: list[str]
    # One entry per flat output of the torch graph: an int is the position among the ONNX
    # graph's outputs; a _Passthrough is a value that never enters ONNX.
    outputs: list[Any]
    parity_rtol: float | None  # from the lowerings that applied; None: exact float tolerance
    notes: list[str]


def export_graph(
    gm: fx.GraphModule,
    inputs: list[torch.Tensor],
    path: Path,
    signature: Any,
    opset: int = DEFAULT_OPSET,
    backend: str = "onnx",
    portable: bool = False,
    external_data: bool | None = None,
) -> OnnxGraph:
    """Write ``gm`` to ``path`` as checked ONNX, after the lowerings declared for ``backend``
    (another runtime that reads ONNX, such as OpenVINO, takes the graph with its own);
    ``gm`` itself is never changed. ``portable`` keeps the graph to the standard ONNX domain
    (no runtime's contrib ops). ``external_data``: write the weights to ``<path>.data`` (None:
    above :data:`EXTERNAL_DATA_BYTES` only)."""
    import onnx

    lowered = lower_graph(gm, backend, None, portable=portable)
    graph, outputs = _tensor_outputs(lowered.graph_module)
    translations = {**onnx_translations(), **lowered.onnx_translations()}
    graph.eval()  # the graph is ATen-level already; this only silences the exporter's warning
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(b.numel() * b.element_size() for b in graph.buffers())
    all_names = _output_names(signature, len(outputs))
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                graph,
                tuple(inputs),
                str(path),
                dynamo=True,
                verbose=False,
                opset_version=opset,
                input_names=input_names(signature),
                output_names=[all_names[i] for i, kind in enumerate(outputs) if not isinstance(kind, _Passthrough)],
                dynamic_shapes=_dynamic_shapes(graph),
                custom_translation_table=translations or None,
                external_data=weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data,
                report=False,
                verify=False,
                optimize=True,
            )
    except Exception as exc:
        raise BackendError(_export_failure(exc, graph, translations)) from exc
    _release_weights(program)
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise BackendError(f"the exported ONNX model failed onnx.checker: {_plain(str(exc))}") from exc
    model = onnx.load(str(path), load_external_data=False)
    return OnnxGraph(path, len(model.graph.node), input_names(signature), outputs,
                     lowered.parity_rtol(), lowered.notes)


def _release_weights(program: Any) -> None:
    """Let go of the weights the exporter's in-memory ONNX model holds, once it is written.

    Its constant values are views of the graph's torch tensors (and arrays the exporter's
    constant folding made from them), and the ONNX model outlives the export: onnxscript's
    rewrite rules keep the last graph they matched. Not only the initializers: a weight the
    folding replaced stays referenced from the graph's bookkeeping (the inputs' use counts).
    So every IR value reachable from the model loses its constant (a file is all fxopt
    keeps of an export)."""
    model = getattr(program, "model", None)
    if model is None:
        return
    try:
        from onnx_ir import Value
    except ImportError:  # older exporters use onnxscript's copy of the IR
        from onnxscript.ir import Value
    containers = (dict, list, tuple, set, frozenset)
    seen: set[int] = set()
    stack: list[Any] = [model]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Value):
            if obj.const_value is not None:
                obj.const_value = None
        elif not isinstance(obj, containers) and not type(obj).__module__.startswith(("onnx_ir", "onnxscript")):
            continue  # the IR's own objects and containers only: not torch, not the exporter's state
        stack.extend(gc.get_referents(obj))


def _tensor_outputs(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[Any]]:
    """``gm`` with only the outputs ONNX can carry, and where each flat output comes from.

    An output that is not computed by a node (None, an int the model returns) stays out of
    the ONNX graph and is handed back as it is; the eager backend returns it the same way.
    """
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = _graph_outputs(gm)
    layout: list[Any] = []
    kept: list[fx.Node] = []
    for value in values:
        if not isinstance(value, fx.Node):
            layout.append(_Passthrough(value))
            continue
        val = value.meta.get("val")
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
            kind = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}.get(type(val), type(val))
            layout.append(_Number(len(kept), kind))
        else:
            layout.append(len(kept))
        kept.append(value)
    if len(kept) == len(values) and isinstance(output.args[0], (tuple, list)):
        return gm, layout
    graph = copy_graph_module(gm)
    new_output = next(n for n in graph.graph.nodes if n.op == "output")
    names = {n.name: n for n in graph.graph.nodes}
    new_output.args = (tuple(names[n.name] for n in kept),)
    graph.recompile()
    return graph, layout


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _plain(text: str) -> str:
    """``text`` without terminal colour codes (the exporter's messages carry them)."""
    return _ANSI.sub("", text)


_CAUSE = re.compile(r"^<class '[\w.]*?(\w+)'>: (.+)$", re.MULTILINE)
_FAILED_NODE = re.compile(r"Error when translating node %\w+ : .*?target=torch\.ops\.([\w.]+)\]")


def _export_failure(exc: Exception, gm: fx.GraphModule, translations: dict[Any, Any]) -> str:
    """Why the export failed, in plain text, naming the ops that have no ONNX translation."""
    message = _plain(str(exc)).strip()
    # The exporter's first line is generic ("step 3/3"); its summary names the root cause.
    cause = _CAUSE.search(message)
    detail = f"{cause.group(1)}: {cause.group(2)}" if cause else (
        f"{type(exc).__name__}: {message.splitlines()[0]}" if message else type(exc).__name__)
    untranslated = _untranslated_ops(gm, translations)
    failing = _FAILED_NODE.search(message)  # the node whose translation raised, when named
    if failing and "::".join(failing.group(1).split(".")[:2]) not in {op.split(".")[0] for op in untranslated}:
        return (f"ONNX export failed translating {failing.group(1)} ({detail}); give a translation that handles "
                "it with fxopt.backends.onnx.register_onnx_translation")
    if untranslated:
        return (f"ONNX export failed: no ONNX translation for {', '.join(untranslated)} ({detail}); "
                "give one with fxopt.backends.onnx.register_onnx_translation, or from the lowering "
                "that writes the op")
    return (f"ONNX export failed: {detail}; an op without an ONNX translation needs "
            "fxopt.backends.onnx.register_onnx_translation")


def _untranslated_ops(gm: fx.GraphModule, translations: dict[Any, Any]) -> list[str]:
    """The ops of ``gm`` that neither the exporter's library nor ``translations`` cover."""
    names: list[str] = []
    with contextlib.suppress(Exception), _quiet_exporter():
        from torch.onnx._internal.exporter._registration import ONNXRegistry

        registry = ONNXRegistry.from_torchlib()
        for node in gm.graph.nodes:
            target = node.target
            if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
                continue
            if target in translations or registry.get_decomps(target):
                continue
            name = target.name()
            if name not in names:
                names.append(name)
    return names


@contextlib.contextmanager
def _quiet_exporter() -> Any:
    import logging

    # onnxscript's constant folder logs a warning for every node it could not evaluate and
    # leaves as it is (a bfloat16 reshape, say): nothing is wrong with the exported graph.
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript.optimizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _graph_outputs(gm: fx.GraphModule) -> list[Any]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0]
    return list(values) if isinstance(values, (list, tuple)) else [values]


def input_names(signature: Any) -> list[str]:
    """The ONNX graph's input names: the model's argument names, made valid and unique."""
    return _unique([_NAME.sub("_", name) or f"input_{i}" for i, name in enumerate(signature.leaf_names)])


def _output_names(signature: Any, count: int) -> list[str]:
    """Names from the output structure (``last_hidden_state``, ``0``...) where it has them."""
    names = [f"output_{i}" for i in range(count)]
    with contextlib.suppress(Exception):
        tree = pytree.tree_unflatten(list(range(count)), signature.out_spec)
        leaves, _ = pytree.tree_flatten_with_path(tree)
        if len(leaves) == count:
            named = [_NAME.sub("_", pytree.keystr(keypath)).strip("_") for keypath, _ in leaves]
            names = [n if n and not n[0].isdigit() else f"output_{n or i}" for i, n in enumerate(named)]
    return _unique(names)


def _unique(names: Sequence[str]) -> list[str]:
    seen: Counter[str] = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return out


def _dynamic_shapes(gm: fx.GraphModule) -> tuple[dict[int, Any], ...] | None:
    """Keep every size that is symbolic in the graph dynamic in the ONNX graph."""
    from torch.export import Dim

    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        shape = value.shape if isinstance(value, torch.Tensor) else ()
        specs.append({i: Dim.AUTO for i, d in enumerate(shape) if not isinstance(d, int)})
    return tuple(specs) if any(specs) else None


def check_parity(expected: list[Any], actual: list[Any], rtol: float | None = None) -> float:
    """The max relative error of ONNX Runtime's outputs against the torch graph's; raises
    :class:`BackendError` past ``rtol`` (None: the float tolerance of an exact rewrite)."""
    comparison = compare_outputs(expected, actual)
    if comparison.mismatch:
        raise BackendError(f"ONNX Runtime disagrees with the optimized graph: {comparison.mismatch}")
    # ONNX Runtime fuses and reorders float math (LayerNorm, GELU, attention), so fp32 gets
    # the same headroom an exact pass gets; a lowering may declare more.
    limit = exact_tolerance(comparison.worst_dtype)
    if rtol is not None:
        limit = max(limit, rtol)
    if comparison.max_rel > limit:
        raise BackendError(f"ONNX Runtime disagrees with the optimized graph: max relative error "
                           f"{comparison.max_rel:.3g} > {limit:g}")
    return comparison.max_rel


# ---------------------------------------------------------------- runtime


def lower_onnx(
    gm: fx.GraphModule,
    signature: Any,
    example_inputs: list[torch.Tensor],
    device: torch.device,
    report: Any,
) -> Lowered:
    """Export ``gm`` and run it in an ONNX Runtime session (CUDA provider when possible).

    The session owns the weights from then on: ``gm`` (which the caller hands over: a copy it
    owns) keeps its structure and metadata with its constants moved to the meta device once
    they are exported, before the session loads, so the module does not hold a second copy
    and the two copies are not resident together where nothing else holds ``gm``'s tensors.
    The weights go to an external data file, written tensor by tensor, so no protobuf holding
    them all is built in memory (a plain export peaks at ~3x the weights, this at ~1.1x).
    """
    _check_device(device)
    inputs = [t.detach() for t in example_inputs]
    # Export and the reference run happen where the graph's weights are; the ONNX file is
    # device-neutral and the session decides where it runs.
    where = next((t.device for t in gm.buffers()), None)
    home = [t.to(where) for t in inputs] if where is not None else inputs
    # The exported files stay on disk while the runner lives (fxopt.save stores them: the
    # session cannot give its weights back); the directory goes when the runner does.
    files = tempfile.TemporaryDirectory(prefix="fxopt-onnx-")
    workdir = files.name
    exported = export_graph(gm, home, Path(workdir) / "model.onnx", signature, DEFAULT_OPSET, external_data=True)
    expected = run_graph(gm, home)
    # The file has the weights now: the graph (the lowering's own copy) lets go of them before
    # the session loads its copy, so the two are not resident together.
    drop_weights(gm)
    collect_let_go()  # the pipeline's objects that held them sit in reference cycles
    session = ort_session(exported.path, device, profile_dir=workdir)
    runner = OrtRunner(session, exported, device)
    runner.exported, runner.files = exported, files
    actual = runner(*inputs)  # profiled: tells which provider runs each node
    placement = _node_providers(session.end_profiling())
    error = check_parity(expected, actual, exported.parity_rtol)
    report.notes.extend(exported.notes)
    where = ", ".join(f"{count} on {provider}" for provider, count in placement.most_common())
    report.notes.append(f"ONNX Runtime {_ort_version()} runs {sum(placement.values())} nodes: {where or 'none'} "
                        f"(session providers: {', '.join(session.get_providers())}); "
                        f"parity with the optimized graph: max rel err {error:.2e}")
    if device.type == "cuda" and runner.provider != "CUDAExecutionProvider":
        report.notes.append("CUDA was requested but this ONNX Runtime has no CUDAExecutionProvider: "
                            "running on CPU and copying inputs and outputs (install onnxruntime-gpu)")
    return Lowered(gm, runner)


def _check_device(device: torch.device) -> None:
    """Refuse a device the session could not hand tensors to, before the export starts."""
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise BackendError(f"the ONNX backend runs on cpu or cuda, not {device.type!r}")
    if not torch.cuda.is_available():
        import onnxruntime as ort

        wanted = ["a CUDA build of PyTorch (torch.cuda.is_available() is False here)"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            wanted.append("onnxruntime-gpu (this ONNX Runtime has no CUDAExecutionProvider)")
        raise BackendError(f"backend='onnx' with device 'cuda' needs {' and '.join(wanted)}; "
                           "or use device='cpu'")


def drop_weights(gm: fx.GraphModule) -> None:
    """Move the constants of ``gm`` (a copy the caller owns, as ``copy_graph_module`` makes
    it) to the meta device in place: the graph, shapes and metadata stay inspectable, and the
    weights go when nothing else holds them. Submodules that are not graph modules are shared
    between such copies: they are replaced by meta copies, never changed."""
    memo: dict[int, Any] = {}

    def meta(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in memo:  # tied constants stay tied
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = torch.nn.Parameter(empty, requires_grad=False) if isinstance(
                tensor, torch.nn.Parameter) else empty
        return memo[id(tensor)]

    def drop(module: torch.nn.Module) -> None:
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is not None and not tensor.is_meta:
                    table[name] = meta(tensor)  # type: ignore[assignment]
        for name, value in list(vars(module).items()):  # constants set as plain tensor attributes
            if isinstance(value, torch.Tensor) and not value.is_meta:
                setattr(module, name, meta(value))
        for name, child in list(module._modules.items()):
            if isinstance(child, fx.GraphModule):
                drop(child)
            elif child is not None:
                module._modules[name] = without_weights(child)

    drop(gm)


def without_weights(gm: Any) -> Any:
    """A copy of ``gm`` (a module) whose constants are meta tensors: the graph, shapes and metadata
    stay inspectable, no weight memory is held. ``gm`` is not changed."""
    memo: dict[int, Any] = {}
    for param in gm.parameters():
        memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
    for buffer in gm.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree's deprecated LeafSpec check on copy
        return copy.deepcopy(gm, memo)
