"""The ONNX backend: export the optimized graph with ``torch.onnx`` and run it in ONNX Runtime.

``export_onnx`` writes a checked ``.onnx`` file whose outputs agree with the optimized graph
when run by ONNX Runtime; ``lower_onnx`` (``fxopt.compile(..., backend="onnx")``) keeps the
exported graph in an ONNX Runtime session that takes and returns torch tensors.

fxopt's own ops (``torch.library`` custom ops, e.g. int8 kernels) are translated by the
onnxscript functions given to :func:`register_onnx_translation`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.backends import Lowered
from fxopt.errors import BackendError, InputError
from fxopt.ir import copy_graph_module
from fxopt.report import Report
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

    The table is handed to ``torch.onnx.export(custom_translation_table=...)``; it is how a
    part of fxopt that adds its own ops (registered with ``torch.library``) makes them
    exportable, e.g. as a QuantizeLinear/MatMulInteger/DequantizeLinear subgraph.
    """
    _TRANSLATIONS[op] = function


def onnx_translations() -> dict[Any, Callable[..., Any]]:
    """A copy of the registered translations."""
    return dict(_TRANSLATIONS)


# ---------------------------------------------------------------- export


def export_onnx(
    model_or_optimized: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    passes: Any = None,
    dynamic_shapes: Any = None,
    opset: int | None = None,
    *,
    check_parity: bool = True,
) -> tuple[str, Report]:
    """Export an optimized model to ONNX and check it; returns ``(path, report)``.

    Args:
        model_or_optimized: an :class:`fxopt.OptimizedModule`, or a plain model, which is
            first optimized with ``fxopt.compile(model, example_inputs, passes=passes,
            dynamic_shapes=dynamic_shapes)``.
        example_inputs: a tuple of tensors the model can be called with.
        path: where to write the ``.onnx`` file.
        passes: the pipeline for a plain model (None: every exact pass).
        dynamic_shapes: for a plain model, forwarded to capture; the sizes that are dynamic
            in the optimized graph stay dynamic (symbolic) in the ONNX graph.
        opset: the ONNX opset, at least 20 by default so GELU stays one node.
        check_parity: run the file in ONNX Runtime (CPU) on ``example_inputs`` and raise
            :class:`fxopt.BackendError` unless it matches the optimized graph.

    The report gets a note with the opset, node count and the parity error.
    """
    from fxopt.api import OptimizedModule, compile
    from fxopt.capture import normalize_example_inputs

    args = normalize_example_inputs(example_inputs)
    if isinstance(model_or_optimized, OptimizedModule):
        if passes is not None or dynamic_shapes is not None:
            raise InputError("passes and dynamic_shapes apply to a plain model; this model is already optimized")
        optimized = model_or_optimized
    elif isinstance(model_or_optimized, torch.nn.Module):
        optimized = compile(model_or_optimized, args, passes=passes, dynamic_shapes=dynamic_shapes)
    else:
        raise InputError(f"export_onnx takes an nn.Module or an OptimizedModule, got {type(model_or_optimized).__name__}")
    signature = optimized.signature
    flat = [t.detach() for t in signature.flatten(args, None, what="example input")]
    gm = optimized.graph_module
    path = Path(path)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    node_count = _export(gm, flat, path, signature, opset)
    report = optimized.report
    note = f"ONNX export: {path} (opset {opset}, {node_count} nodes)"
    if opset < DEFAULT_OPSET:
        note += f"; below opset {DEFAULT_OPSET} GELU is exported as elementwise nodes"
    if check_parity:
        session = _session(path, torch.device("cpu"), profile_dir=None)
        expected = run_graph(gm, flat)
        actual = _OrtRunner(session, _input_names(signature), torch.device("cpu"))(*flat)
        error = _check_parity(expected, actual, _quantized(gm))
        note += f"; ONNX Runtime parity: max rel err {error:.2e}"
    report.notes.append(note)
    return str(path), report


def _export(gm: fx.GraphModule, inputs: list[torch.Tensor], path: Path, signature: Any, opset: int) -> int:
    """Write ``gm`` to ``path`` as checked ONNX; returns the number of nodes."""
    import onnx

    gm = _with_int8_kernels(gm)

    gm.eval()  # the graph is ATen-level already; this only silences the exporter's warning
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(b.numel() * b.element_size() for b in gm.buffers())
    try:
        with _quiet_exporter():
            torch.onnx.export(
                gm,
                tuple(inputs),
                str(path),
                dynamo=True,
                verbose=False,
                opset_version=opset,
                input_names=_input_names(signature),
                output_names=_output_names(signature, len(_graph_outputs(gm))),
                dynamic_shapes=_dynamic_shapes(gm),
                custom_translation_table=onnx_translations() or None,
                external_data=weight_bytes > EXTERNAL_DATA_BYTES,
                report=False,
                verify=False,
                optimize=True,
            )
    except Exception as exc:
        raise BackendError(f"ONNX export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                           "; an op without an ONNX translation needs fxopt.backends.onnx.register_onnx_translation") from exc
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise BackendError(f"the exported ONNX model failed onnx.checker: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    return len(model.graph.node)


def _with_int8_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """Quantized Linears (QDQ or already lowered) as fxopt::int8_linear, which exports as
    MatMulInteger; the graph is copied, never changed."""
    from fxopt.int8 import (
        has_int8_linear,
        has_qdq_linear,
        lower_int8_linears,
        register_onnx_translation,
    )

    if has_qdq_linear(gm):
        gm = copy_graph_module(gm)
        lower_int8_linears(gm, None)
    if has_int8_linear(gm):
        register_onnx_translation()
    return gm


@contextlib.contextmanager
def _quiet_exporter() -> Any:
    import logging

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _graph_outputs(gm: fx.GraphModule) -> list[Any]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0]
    return list(values) if isinstance(values, (list, tuple)) else [values]


def _input_names(signature: Any) -> list[str]:
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


# Two correct int8 runtimes round the same activations, but float differences of 1e-7 in
# LayerNorm/GELU/softmax move some values across a rounding boundary, and each such value
# is off by one quantization step; over wide layers that adds up to a few 1e-3 (BERT-base:
# ~4e-3 after two layers). The limit is the quantize-int8 pass's default error budget.
INT8_PARITY_RTOL = 0.05


def _quantized(gm: fx.GraphModule) -> bool:
    from fxopt.int8 import has_int8_linear, has_qdq_linear

    return has_int8_linear(gm) or has_qdq_linear(gm)


def _check_parity(expected: list[Any], actual: list[Any], quantized: bool = False) -> float:
    comparison = compare_outputs(expected, actual)
    if comparison.mismatch:
        raise BackendError(f"ONNX Runtime disagrees with the optimized graph: {comparison.mismatch}")
    # ONNX Runtime fuses and reorders float math (LayerNorm, GELU, attention), so fp32 gets
    # the same headroom an exact pass gets.
    limit = INT8_PARITY_RTOL if quantized else exact_tolerance(comparison.worst_dtype)
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
    """Export ``gm`` and run it in an ONNX Runtime session (CUDA provider when possible)."""
    inputs = [t.detach() for t in example_inputs]
    # Export and the reference run happen where the graph's weights are; the ONNX file is
    # device-neutral and the session decides where it runs.
    weights = next(iter(gm.buffers()), None)
    home = [t.to(weights.device) for t in inputs] if weights is not None else inputs
    with tempfile.TemporaryDirectory(prefix="fxopt-onnx-") as workdir:
        path = Path(workdir) / "model.onnx"
        _export(gm, home, path, signature, DEFAULT_OPSET)
        session = _session(path, device, profile_dir=workdir)
        runner = _OrtRunner(session, _input_names(signature), device)
        expected = run_graph(gm, home)
        actual = runner(*inputs)  # profiled: tells which provider runs each node
        placement = _node_providers(session.end_profiling())
    error = _check_parity(expected, actual, _quantized(gm))
    where = ", ".join(f"{count} on {provider}" for provider, count in placement.most_common())
    report.notes.append(f"ONNX Runtime {_ort_version()} runs {sum(placement.values())} nodes: {where or 'none'} "
                        f"(session providers: {', '.join(session.get_providers())}); "
                        f"parity with the optimized graph: max rel err {error:.2e}")
    if device.type == "cuda" and runner.provider != "CUDAExecutionProvider":
        report.notes.append("CUDA was requested but this ONNX Runtime has no CUDAExecutionProvider: "
                            "running on CPU and copying inputs and outputs (install onnxruntime-gpu)")
    return Lowered(gm, runner)


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


def _session(path: Path, device: torch.device, profile_dir: str | None) -> Any:
    import onnxruntime as ort

    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    try:
        return ort.InferenceSession(str(path), session_options(profile_dir), providers=providers)
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


class _OrtRunner:
    """Calls an ONNX Runtime session with torch tensors and returns torch tensors."""

    def __init__(self, session: Any, input_names: list[str], device: torch.device) -> None:
        self.session = session
        self.device = device
        self.provider = session.get_providers()[0]
        used = {i.name for i in session.get_inputs()}  # the exporter drops unused inputs
        self._feeds = [(position, name) for position, name in enumerate(input_names) if name in used]
        self._output_names = [o.name for o in session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if self.provider == "CUDAExecutionProvider":
            return self._run_cuda(inputs)
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
