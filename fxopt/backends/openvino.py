"""The OpenVINO backend: the optimized graph run by OpenVINO's CPU plugin.

``fxopt.compile(..., backend="openvino")`` (``pip install 'fxopt[openvino]'``) runs the
lowerings declared for ``"openvino"``, exports the graph with fxopt's ONNX exporter
(:func:`fxopt.backends.onnx.export_graph`) and compiles it with
``openvino.Core.compile_model``. The ONNX route is the one on which OpenVINO's own graph
transformations turn fxopt's lower-precision patterns into its kernels; a lowering may give
the CPU plugin settings for the graph it wrote (``runtime_config(gm)``), which this backend
applies. See docs/backends.md for what each lowering does.

Pitfalls handled here: the CPU plugin silently runs f32 graphs in bf16 on CPUs with bf16
support, so every graph is compiled with ``INFERENCE_PRECISION_HINT=f32`` unless the graph
itself computes in bfloat16 (the ``cast-bf16`` pass), which may run in bf16; it uses as many
threads as PyTorch (``INFERENCE_NUM_THREADS = torch.get_num_threads()`` at compile time); the
sizes that are symbolic in the graph (the batch, by default) stay dynamic in the ONNX graph,
and the runner compiles it twice: specialized to the example inputs' shapes (which OpenVINO
runs faster), and, on the first call with other shapes, dynamic. CPU only.

The outputs must match the optimized graph on the example inputs (float tolerance, or what
the applied lowerings declare, or bf16's for bf16 graphs), or
:class:`~fxopt.errors.BackendError` is raised; where OpenVINO computes differently from the
graph by more than float rounding, its drift is added to the report's error against the
model. The compiled model owns the weights: the module keeps the graph without them, and
:func:`fxopt.save` stores the exported ONNX files.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fxopt.backends import Backend, Lowered
from fxopt.errors import BackendError
from fxopt.lowering import lower_graph
from fxopt.verify import Parity, compare_outputs, compiled_tolerance, exact_tolerance, run_graph


def lower_openvino(
    gm: fx.GraphModule,
    signature: Any,
    example_inputs: list[torch.Tensor],
    device: torch.device,
    report: Any,
    parity: Parity | None = None,
) -> Lowered:
    if device.type != "cpu":
        raise BackendError(f"backend 'openvino' runs on cpu only, not {device.type!r}; use device='cpu'")
    from fxopt.backends.onnx import export_graph, without_weights

    inputs = [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in example_inputs]
    lowered = lower_graph(gm, "openvino", device)
    files = tempfile.TemporaryDirectory(prefix="fxopt-openvino-")
    # the lowerings ran: the exporter finds none of their patterns left to lower again
    exported = export_graph(lowered.graph_module, inputs, Path(files.name) / "model.onnx", signature,
                            OPENVINO_OPSET, backend="openvino")
    config = compile_config(computes_in_bfloat16(gm))
    for lowering in lowered.applied:
        runtime_config = getattr(lowering, "runtime_config", None)
        if runtime_config is not None:
            config.update(runtime_config(lowered.graph_module))
    runner = OpenVinoRunner(exported, config, [tuple(t.shape) if isinstance(t, torch.Tensor) else None
                                               for t in inputs])
    runner.files = files
    parity = parity or Parity()
    known = parity.known()
    if known is not None:
        # The pass manager verified the optimized graph on these inputs (its smallest verified
        # batch, see Verification.smallest_known_outputs): parity is checked on the same ones.
        check_inputs, expected = [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in known[0]], known[1]
    else:
        check_inputs, expected = inputs, run_graph(gm, inputs)
    comparison = compare_outputs(expected, runner(*check_inputs))
    exact = exact_tolerance(comparison.worst_dtype)
    # a bf16 graph (and only it) runs at OpenVINO's bf16 inference precision: bf16's tolerance
    limit = max([compiled_tolerance(gm, comparison.worst_dtype)]
                + [rtol for rtol in (lowered.parity_rtol(), exported.parity_rtol) if rtol is not None])
    disagreement = comparison.failure(limit)
    if runner.static_shapes is not None:
        # The graph specialized to the example's shapes is OpenVINO's other compile of the
        # same graph: it must agree with the graph too, or the dynamic graph runs every shape.
        if disagreement is None and runner.general_compiled():
            # the check ran the dynamic graph (on other shapes than the example's)
            specialized = compare_outputs(runner.run(inputs, general=True), runner.run(inputs)).failure(limit)
        elif disagreement is not None and not runner.general_compiled():
            specialized = disagreement  # the check ran the specialized graph
            comparison = compare_outputs(expected, runner.run(check_inputs, general=True))
            disagreement = comparison.failure(limit)
        else:
            specialized = None
        if specialized is not None:
            runner.despecialize()
            report.notes.append(f"OpenVINO's graph compiled for the example shapes disagreed with the graph "
                                f"({specialized}): the dynamic graph runs every shape")
    if disagreement is not None:
        raise BackendError(f"OpenVINO disagrees with the optimized graph: {disagreement}")
    report.notes.extend(lowered.notes)
    # the exporter ran the same lowerings again, finding nothing left to do: no repeated notes
    report.notes.extend(note for note in exported.notes if note not in lowered.notes)
    if comparison.max_rel > exact:
        # OpenVINO computes differently from the graph here (scales of its own, bf16 beyond
        # the graph's Linears): a preset's budget must hold for what actually runs. Its own
        # outputs are measured against the model's on every batch the passes were measured on
        # when those are known; else the graph's error plus OpenVINO's drift bounds it.
        measured = parity.error_against_model(runner)
        if measured is not None:
            report.final_max_abs_err, report.final_max_rel_err = measured
            report.notes.append(f"OpenVINO's outputs against the model's: max rel err {measured[1]:.2e}")
        else:
            report.final_max_rel_err += comparison.max_rel
    report.notes.append(f"OpenVINO {openvino_version()} runs the graph on CPU ({runner.precision()} inference "
                        f"precision, {config['INFERENCE_NUM_THREADS']} threads); parity with the optimized "
                        f"graph: max rel err {comparison.max_rel:.2e}")
    if runner.static_shapes is not None:
        shapes = ", ".join("x".join(map(str, shape)) for shape in runner.static_shapes.values())
        report.notes.append(f"OpenVINO runs the graph compiled for the example shapes ({shapes}); other "
                            "shapes run the dynamic graph, compiled on their first call")
    runner.release_general()  # the checks are done: only a call with other shapes needs it again
    return Lowered(without_weights(gm), runner)


# Opset 23 carries scaled_dot_product_attention as one Attention node, which OpenVINO reads
# as its ScaledDotProductAttention and runs as one fused attention kernel; below 23 the
# exporter spells it out as MatMul/Softmax/MatMul with a NaN guard between them that
# OpenVINO does not fuse.
OPENVINO_OPSET = 23


def computes_in_bfloat16(gm: fx.GraphModule) -> bool:
    """Whether any value of ``gm`` is a bfloat16 tensor (a graph the cast-bf16 pass changed)."""
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
            return True
    return False


def compile_config(bfloat16: bool) -> dict[str, Any]:
    """The CPU plugin's configuration for a graph: f32 unless the graph computes in bf16
    (the plugin would pick bf16 by itself on CPUs that have it), PyTorch's thread count,
    latency mode. Lowerings add theirs (``runtime_config``)."""
    return {
        "INFERENCE_PRECISION_HINT": "bf16" if bfloat16 else "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    }


@functools.cache
def _core() -> Any:
    import openvino as ov

    return ov.Core()


def openvino_version() -> str:
    import openvino

    return str(openvino.__version__).split("-")[0]


class OpenVinoRunner:
    """Runs an exported graph compiled by OpenVINO: torch tensors in, the graph's flat
    outputs (torch tensors, and the non-tensor outputs that never entered ONNX) out."""

    files: Any = None  # the TemporaryDirectory holding the exported model

    def __init__(self, exported: Any, config: dict[str, Any],
                 static_shapes: Sequence[Sequence[int] | None] | None = None) -> None:
        self.exported = exported
        self.config = dict(config)
        self._core = _core()
        model = self._read()
        used = {name for port in model.inputs for name in port.get_names()}
        self._feeds = [(position, name) for position, name in enumerate(exported.input_names) if name in used]
        self._layout = list(exported.outputs)
        # OpenVINO runs a graph whose sizes are all known faster than the same graph with a
        # dynamic batch (BERT-4L in bf16, one thread: 86 against 91 ms on an AMX Xeon): the
        # runner compiles the graph at the example inputs' shapes, as torch.compile
        # specializes, and compiles the dynamic graph only when a call brings other shapes.
        self.static_shapes: dict[str, tuple[int, ...]] | None = None
        if static_shapes is not None and model.is_dynamic():
            shapes = {name: tuple(int(size) for size in static_shapes[position])
                      for position, name in self._feeds if static_shapes[position] is not None}
            if len(shapes) == len(self._feeds):
                try:
                    model.reshape({name: list(shape) for name, shape in shapes.items()})
                    self.static_shapes = shapes
                except Exception:  # a size the graph fixes otherwise: keep it dynamic
                    model = self._read()
        self.compiled, self.request = self._compile(model)
        self._general: tuple[Any, Any] | None = None  # the dynamic graph, compiled on demand

    def _read(self) -> Any:
        try:
            return self._core.read_model(str(self.exported.path))
        except Exception as exc:
            raise BackendError(f"OpenVINO could not read the exported graph: {exc}") from exc

    def _compile(self, model: Any) -> tuple[Any, Any]:
        try:
            compiled = self._core.compile_model(model, "CPU", self.config)
        except Exception as exc:
            raise BackendError(f"OpenVINO could not compile the exported graph: {exc}") from exc
        return compiled, compiled.create_infer_request()

    def despecialize(self) -> None:
        """Run every shape on the dynamic graph (the specialized one disagreed with it)."""
        if self._general is None:
            self._general = self._compile(self._read())
        self.compiled, self.request = self._general
        self.static_shapes, self._general = None, None

    def release_general(self) -> None:
        """Drop the dynamic graph's compiled model (it holds the weights again); a call with
        other shapes compiles it anew."""
        self._general = None

    def precision(self) -> str:
        return str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).split(":")[-1].strip(" >'")

    def __call__(self, *inputs: torch.Tensor) -> list[Any]:
        return self.run(inputs)

    def run(self, inputs: Sequence[torch.Tensor], general: bool = False) -> list[Any]:
        """The outputs on ``inputs``: from the graph specialized to their shapes where it is,
        else (or when ``general``) from the dynamic graph."""
        from fxopt.backends.onnx import OrtRunner

        feeds = {name: _numpy(inputs[position]) for position, name in self._feeds}
        request = self.request
        if self.static_shapes is not None and (general or any(
                feeds[name].shape != shape for name, shape in self.static_shapes.items())):
            if self._general is None:
                self._general = self._compile(self._read())
            request = self._general[1]
        results = request.infer(feeds)
        tensors = [torch.from_numpy(results[index].copy()) for index in range(len(self.compiled.outputs))]
        return [OrtRunner._output(entry, tensors) for entry in self._layout]

    def general_compiled(self) -> bool:
        """Whether the dynamic graph is compiled beside the specialized one."""
        return self._general is not None

    def saved_state(self) -> dict[str, Any]:
        """What :func:`restore` needs: the exported ONNX files (bytes) and the configuration."""
        import dataclasses

        directory = Path(self.files.name) if self.files is not None else self.exported.path.parent
        contents = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        shapes = None if self.static_shapes is None else {name: list(shape) for name, shape in self.static_shapes.items()}
        return {"graph": dataclasses.replace(self.exported, path=Path(self.exported.path.name)),
                "files": contents, "config": self.config, "static_shapes": shapes}


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
    from fxopt.saving import unpack_files

    files = unpack_files(state["files"], "fxopt-openvino-")  # refuses names that are not plain file names
    exported = dataclasses.replace(state["graph"], path=Path(files.name) / state["graph"].path.name)
    config = {**state["config"], "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    # files saved before shapes were specialized hold no "static_shapes": those stay dynamic
    stored = state.get("static_shapes")
    shapes = None if stored is None else [stored.get(name) for name in exported.input_names]
    runner = OpenVinoRunner(exported, config, shapes)
    runner.files = files
    return runner


BACKEND = Backend(
    "openvino",
    lower_openvino,
    requires=("openvino",),
    extra="openvino",
    devices=("cpu",),
    description="the optimized graph exported to ONNX and run by OpenVINO's CPU plugin",
    restore=restore,
)
