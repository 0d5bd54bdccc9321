"""The Inductor backend: the optimized graph compiled by TorchInductor, with freezing.

``fxopt.compile(..., backend="inductor")`` hands the graph the passes produced to
``torch.compile`` (CPU or CUDA) once, at lowering time, on the example inputs:

- **Graph-stage lowerings run first**, those the eager backend runs: the kernels they write
  are PyTorch custom ops with fake (shape) implementations, which Inductor calls as opaque
  kernels while it fuses the float code around them. Left to Inductor, the patterns they
  replace would be decomposed into float code around a float GEMM, losing the kernels'
  speed (docs/backends.md says which). Kernel-stage lowerings (oneDNN Linear+activation
  epilogues and prepacked weights) are eager-only choices: Inductor picks and prepacks its
  own GEMM kernels.
- **Freezing** (weights constant-folded and prepacked) is read from the global flag
  ``torch._inductor.config.freezing``; ``torch.compile(options={"freezing": True})`` is not
  honoured in torch 2.13. The flag is set only while the graph compiles, and only under
  ``torch.no_grad()`` (Inductor freezes inference graphs only); the compiled module runs
  under ``no_grad`` too, so grad mode never forces a recompile.
- **Dynamic sizes**: every size that is dynamic in the captured graph (the batch, by
  default; ``None`` in the signature's input shapes, so a loaded module keeps it) is marked
  dynamic, so another batch size runs the same compiled code (a batch of
  1 is specialized by Inductor and compiles once more).

The result must match the optimized graph on the example inputs (float tolerance of an
exact rewrite; an applied lowering may declare more), or the backend raises
:class:`~fxopt.errors.BackendError`. Threads: Inductor's CPU kernels use PyTorch's
(``torch.set_num_threads``).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
import torch.fx as fx

from fxopt.backends import Backend, Lowered, require_torch_device
from fxopt.errors import BackendError
from fxopt.lowering import lower_graph
from fxopt.verify import compare_outputs, compiled_tolerance, run_graph


def lower_inductor(
    gm: fx.GraphModule,
    signature: Any,
    example_inputs: list[torch.Tensor],
    device: torch.device,
    report: Any,
) -> Lowered:
    require_torch_device(device)
    inputs = [t.to(device) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    # The eager backend's graph stage: its kernels are PyTorch custom ops Inductor can call.
    lowered = lower_graph(gm, "eager", device, "graph")
    report.notes.extend(lowered.notes)
    graph = lowered.graph_module.to(device)
    graph.recompile()
    expected = run_graph(gm.to(device), inputs)
    start = time.perf_counter()
    compiled, outputs = compile_frozen(graph, _marked(signature, inputs))
    actual = _flat(outputs)
    seconds = time.perf_counter() - start
    comparison = compare_outputs(expected, actual)
    limit = compiled_tolerance(gm, comparison.worst_dtype)
    if lowered.parity_rtol() is not None:
        limit = max(limit, lowered.parity_rtol())
    detail = comparison.failure(limit)
    if detail is not None:
        raise BackendError(f"Inductor's compiled graph disagrees with the optimized graph: {detail}")
    kernels = ", ".join(lowering.name for lowering in lowered.applied)
    report.notes.append(f"Inductor (torch {torch.__version__}, freezing) compiled the graph in {seconds:.1f} s"
                        + (f" with the {kernels} kernels as custom ops" if kernels else "")
                        + f"; parity with the optimized graph: max rel err {comparison.max_rel:.2e}")

    def run(*inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return compiled(*inputs)

    return Lowered(graph, run)


def compile_frozen(graph: fx.GraphModule, inputs: list[Any]) -> tuple[Any, Any]:
    """``torch.compile(graph)``, compiled now on ``inputs`` with Inductor's freezing on for
    that compile only, and its outputs on ``inputs``."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(graph, backend="inductor")
    with inductor_config.patch(freezing=True), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            outputs = compiled(*inputs)
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise BackendError(f"Inductor could not compile the optimized graph: {type(exc).__name__}: "
                               f"{detail}") from exc
    return compiled, outputs


def _marked(signature: Any, inputs: list[Any]) -> list[Any]:
    """``inputs`` as new tensor objects (the caller's are left alone) with the sizes that are
    dynamic in the captured graph (``None`` in the signature's input shapes) marked dynamic."""
    specs = list(getattr(signature, "inputs", None) or [])
    marked = []
    for index, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            marked.append(value)
            continue
        alias = value.detach()
        shape = specs[index].shape if index < len(specs) else ()
        dims = [i for i, size in enumerate(shape) if size is None and i < alias.dim()]
        if dims:
            torch._dynamo.mark_dynamic(alias, dims)
        marked.append(alias)
    return marked


def _flat(outputs: Any) -> list[Any]:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


BACKEND = Backend(
    "inductor",
    lower_inductor,
    requires=("torch._inductor",),
    package="torch",
    devices=("cpu", "cuda"),
    description="the optimized graph compiled by TorchInductor with freezing (CPU, CUDA)",
)
