"""The OpenVINO backend: the optimized graph, QDQ int8 included, run by OpenVINO's CPU plugin.

``fxopt.compile(..., backend="openvino")`` (``pip install 'fxopt[openvino]'``) exports the
graph the passes produced with fxopt's ONNX exporter (:func:`fxopt.backends.onnx.export_graph`,
with the lowerings declared for ``"openvino"``, none built in) and compiles it with
``openvino.Core.compile_model``. The ONNX route is the one that turns fxopt's int8 graphs
into OpenVINO int8 kernels:

- **static activations** (``quantize-int8(activations='static')``): the QDQ pairs export as
  ``QuantizeLinear``/``DequantizeLinear``, which OpenVINO reads as ``FakeQuantize`` and runs as
  int8 ``FullyConnected`` layers (its low-precision transformations);
- **dynamic activations** (per token, or ``activations='dynamic-tensor'``): ONNX has no
  per-token quantize op and OpenVINO does not lower ``DynamicQuantizeLinear`` to an int8
  GEMM, so the activation quantize/dequantize is left out of the exported graph and the
  Linear keeps its int8 per-channel weights (``DequantizeLinear``); OpenVINO's CPU plugin
  then quantizes the activations itself at run time, each token in groups of the largest
  size dividing every such Linear's width (``DYNAMIC_QUANTIZATION_GROUP_SIZE``), and runs an
  int8 GEMM. A group is at least as fine as the graph's per-token or per-tensor scale, so
  the error stays within the int8 parity tolerance (checked). Static activations are the
  faster of the two in OpenVINO (no run-time quantization step).

Pitfalls handled here: the CPU plugin silently runs f32 graphs in bf16 on CPUs with bf16
support, so every graph is compiled with ``INFERENCE_PRECISION_HINT=f32`` unless the graph
itself computes in bfloat16 (the ``cast-bf16`` pass), which may run in bf16; it uses as many
threads as PyTorch (``INFERENCE_NUM_THREADS = torch.get_num_threads()`` at compile time); the
sizes that are symbolic in the graph (the batch, by default) stay dynamic in the ONNX graph,
so another batch size runs the same compiled model. CPU only.

The outputs must match the optimized graph on the example inputs (float tolerance; int8
graphs the int8 parity tolerance; bf16 graphs bf16's), or :class:`~fxopt.errors.BackendError`
is raised. The compiled model owns the weights: the module keeps the graph without them,
and :func:`fxopt.save` stores the exported ONNX files.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fxopt.backends import Backend, Lowered
from fxopt.errors import BackendError
from fxopt.ir import constant, copy_graph_module
from fxopt.ir.qdq import match_qdq_linear
from fxopt.verify import compare_outputs, exact_tolerance, run_graph

# The relative error two correct int8 runtimes may differ by (a value rounded to the
# neighbouring quantization step here and there adds up to a few 1e-3 on wide layers); a
# wrong scale or zero point is off by far more. The int8 lowering declares the same.
INT8_PARITY_RTOL = 0.05


def lower_openvino(
    gm: fx.GraphModule,
    signature: Any,
    example_inputs: list[torch.Tensor],
    device: torch.device,
    report: Any,
) -> Lowered:
    if device.type != "cpu":
        raise BackendError(f"backend 'openvino' runs on cpu only, not {device.type!r}; use device='cpu'")
    from fxopt.backends.onnx import export_graph, without_weights

    inputs = [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in example_inputs]
    graph, dynamic_widths = _without_dynamic_activation_qdq(gm)
    dynamic_linears = len(dynamic_widths)
    static_linears = sum(match_qdq_linear(graph, n) is not None for n in graph.graph.nodes)
    files = tempfile.TemporaryDirectory(prefix="fxopt-openvino-")
    exported = export_graph(graph, inputs, Path(files.name) / "model.onnx", signature, backend="openvino")
    config = compile_config(computes_in_bfloat16(gm), quantization_group(dynamic_widths))
    runner = OpenVinoRunner(exported, config)
    runner.files = files
    expected = run_graph(gm, inputs)
    actual = runner(*inputs)
    comparison = compare_outputs(expected, actual)
    limit = exact_tolerance(comparison.worst_dtype)
    if static_linears or dynamic_linears:
        limit = max(limit, INT8_PARITY_RTOL)
    if config["INFERENCE_PRECISION_HINT"] == "bf16":
        limit = max(limit, exact_tolerance(torch.bfloat16))
    if exported.parity_rtol is not None:
        limit = max(limit, exported.parity_rtol)
    if comparison.mismatch or not comparison.within(limit):
        detail = comparison.mismatch or f"max relative error {comparison.max_rel:.3g} > {limit:g}"
        raise BackendError(f"OpenVINO disagrees with the optimized graph: {detail}")
    report.notes.extend(exported.notes)
    if dynamic_linears or config["INFERENCE_PRECISION_HINT"] == "bf16":
        # OpenVINO computes differently from the graph here (its own activation scales, or bf16
        # beyond the graph's Linears): the error against the model is bounded by the graph's
        # plus OpenVINO's drift from it, so a preset's budget holds for what actually runs.
        report.final_max_rel_err += comparison.max_rel
    int8 = []
    if static_linears:
        int8.append(f"{static_linears} int8 Linears with static activations (QuantizeLinear/DequantizeLinear)")
    if dynamic_linears:
        int8.append(f"{dynamic_linears} int8 Linears with activations quantized at run time by OpenVINO "
                    f"in groups of {config['DYNAMIC_QUANTIZATION_GROUP_SIZE']}")
    report.notes.append(f"OpenVINO {openvino_version()} runs the graph on CPU ({runner.precision()} inference "
                        f"precision, {config['INFERENCE_NUM_THREADS']} threads"
                        + (f"; {'; '.join(int8)}" if int8 else "")
                        + f"); parity with the optimized graph: max rel err {comparison.max_rel:.2e}")
    return Lowered(without_weights(gm), runner)


def _without_dynamic_activation_qdq(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[int]]:
    """``gm`` with the run-time activation quantize/dequantize of each dynamic QDQ Linear
    left out (its int8 weights stay), and those Linears' input widths. OpenVINO quantizes
    those activations itself; see the module docstring. ``gm`` is not changed."""
    widths = []
    for node in gm.graph.nodes:
        match = match_qdq_linear(gm, node)
        if match is not None and match.input_scale is None:
            widths.append(int(constant(gm, match.qweight).shape[1]))
    if not widths:
        return gm, widths
    graph = copy_graph_module(gm)
    for node in list(graph.graph.nodes):
        match = match_qdq_linear(graph, node)
        if match is not None and match.input_scale is None:
            node.replace_input_with(node.args[0], match.x)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph, widths


def quantization_group(widths: list[int]) -> int:
    """OpenVINO's run-time activation quantization group for Linears of these input widths
    (0: off). The largest size that divides every width: OpenVINO's fast int8 path needs the
    group to divide the width (a group larger than it, meant as "per token", ran at float
    speed on BERT), and a group is at least as fine as the graph's per-token or per-tensor
    scale, so the error does not grow."""
    return math.gcd(*widths) if widths else 0


def computes_in_bfloat16(gm: fx.GraphModule) -> bool:
    """Whether any value of ``gm`` is a bfloat16 tensor (a graph the cast-bf16 pass changed)."""
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
            return True
    return False


def compile_config(bfloat16: bool, quantization_group: int) -> dict[str, Any]:
    """The CPU plugin's configuration for a graph: f32 unless the graph computes in bf16
    (the plugin would pick bf16 by itself on CPUs that have it), PyTorch's thread count,
    latency mode, and run-time activation quantization only where the graph asked for it."""
    return {
        "INFERENCE_PRECISION_HINT": "bf16" if bfloat16 else "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": quantization_group,
    }


def openvino_version() -> str:
    import openvino

    return str(openvino.__version__).split("-")[0]


class OpenVinoRunner:
    """Runs an exported graph compiled by OpenVINO: torch tensors in, the graph's flat
    outputs (torch tensors, and the non-tensor outputs that never entered ONNX) out."""

    files: Any = None  # the TemporaryDirectory holding the exported model

    def __init__(self, exported: Any, config: dict[str, Any]) -> None:
        import openvino as ov

        self.exported = exported
        self.config = dict(config)
        core = ov.Core()
        try:
            model = core.read_model(str(exported.path))
            self.compiled = core.compile_model(model, "CPU", self.config)
        except Exception as exc:
            raise BackendError(f"OpenVINO could not compile the exported graph: {exc}") from exc
        self.request = self.compiled.create_infer_request()
        used = {name for port in self.compiled.inputs for name in port.get_names()}
        self._feeds = [(position, name) for position, name in enumerate(exported.input_names) if name in used]
        self._layout = list(exported.outputs)

    def precision(self) -> str:
        return str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).split(":")[-1].strip(" >'")

    def __call__(self, *inputs: torch.Tensor) -> list[Any]:
        from fxopt.backends.onnx import OrtRunner

        feeds = {name: _numpy(inputs[position]) for position, name in self._feeds}
        results = self.request.infer(feeds)
        tensors = [torch.from_numpy(results[port].copy()) for port in self.compiled.outputs]
        return [OrtRunner._output(entry, tensors) for entry in self._layout]

    def saved_state(self) -> dict[str, Any]:
        """What :func:`restore` needs: the exported ONNX files (bytes) and the configuration."""
        import dataclasses

        directory = Path(self.files.name) if self.files is not None else self.exported.path.parent
        contents = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        return {"graph": dataclasses.replace(self.exported, path=Path(self.exported.path.name)),
                "files": contents, "config": self.config}


def _numpy(tensor: torch.Tensor) -> Any:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        raise BackendError("the OpenVINO runner takes no bfloat16 inputs; use float32")
    return tensor.contiguous().numpy()


def restore(state: dict[str, Any], graph_module: fx.GraphModule, signature: Any,
            device: torch.device) -> OpenVinoRunner:
    """A runner for a module :func:`fxopt.save` stored; the thread count is this process's."""
    import dataclasses

    if device.type != "cpu":
        raise BackendError(f"backend 'openvino' runs on cpu only, not {device.type!r}")
    files = tempfile.TemporaryDirectory(prefix="fxopt-openvino-")
    for name, data in state["files"].items():
        (Path(files.name) / name).write_bytes(data)
    exported = dataclasses.replace(state["graph"], path=Path(files.name) / state["graph"].path.name)
    config = {**state["config"], "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    runner = OpenVinoRunner(exported, config)
    runner.files = files
    return runner


BACKEND = Backend(
    "openvino",
    lower_openvino,
    requires=("openvino",),
    extra="openvino",
    devices=("cpu",),
    description="the optimized graph (QDQ int8 included) exported to ONNX and run by OpenVINO's CPU plugin",
    restore=restore,
)
