"""The eager backend: the optimized GraphModule runs as PyTorch code on CPU or CUDA.

The registered lowerings (:mod:`fxopt.lowering`) that apply on the device rewrite their
patterns into kernels first, on a copy: the optimized graph itself stays as the passes left it.
Those that exist for speed keep a site's kernel only when it measures faster there, with the
compile's :class:`~fxopt.pipeline.timings.KernelTimings` (its choices go in ``report.kernels``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from fxopt.backends import Backend, Lowered, require_torch_device
from fxopt.ir import remove_unused_constants
from fxopt.ir.derived import collect_let_go, release_freed_memory
from fxopt.lowering import lower_graph
from fxopt.lowering.base import PlainCopies, releasing_packed
from fxopt.phases import phase
from fxopt.pipeline import timings
from fxopt.verify import Parity, compare_outputs, exact_tolerance, run_graph

# Constants this large are worth a garbage collection before the first packed one is let go
# (a cycle that holds them would keep them beside their packs).
COLLECT_BYTES = 64 << 20


def lower_eager(
    gm: fx.GraphModule,
    signature: Any,
    example_inputs: list[torch.Tensor],
    device: torch.device,
    report: Any,
    parity: Parity | None = None,
) -> Lowered:
    require_torch_device(device)
    known = parity.known() if parity is not None else None
    expected = None
    if known is not None and all(not isinstance(t, torch.Tensor) or t.device == device for t in known[0]):
        # The pass manager verified the optimized graph on these inputs (its smallest verified
        # batch, see Verification.smallest_known_outputs): parity is checked on the same ones.
        example_inputs, expected = known
    inputs = [t.to(device) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    packed: dict[str, Callable[[], torch.Tensor]] = {}
    reference = _Reference(gm, inputs, device, expected)

    def before_first_release() -> None:
        reference.outputs()  # while the graph is whole
        if sum(t.nbytes for t in gm.buffers()) >= COLLECT_BYTES:
            # A graph module and its graph refer to each other: a stage this graph was copied
            # from, which nothing holds now, still holds the weights until a collection finds it.
            collect_let_go()

    # The constants the kernels pack leave the optimized graph (and the lowering's copies of it)
    # as each is packed, not at the end: a large model's weights are not held twice.
    with releasing_packed([gm], before_first=before_first_release) as plain:
        both = _both_stages(gm, inputs, device, report, reference, packed, plain)
    if both is not None:
        graph, kernels = both
    else:
        plain.restore()  # the stages are checked one by one, from the optimized graph whole
        graph, outputs = _lowered(gm, "graph", inputs, device, report, reference.known, packed)
        kernels, _ = _lowered(graph, "kernel", inputs, device, report, outputs, packed)

    remove_unused_constants(kernels)  # what the kernels packed is held packed, not twice

    def run(*inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return kernels(*inputs)

    held = {**plain.released, **_packed_only(graph, kernels, packed, plain.released)}
    if held:
        size = sum(graph.get_buffer(target).nbytes for target in held)
        report.notes.append(f"{len(held)} weight(s) ({size / 2**20:.1f} MiB) are held only as the kernels pack "
                            "them; opt.graph_module unpacks them when read")
    return Lowered(graph, run, held)


def _packed_only(graph: fx.GraphModule, kernels: fx.GraphModule, packed: dict[str, Callable[[], torch.Tensor]],
                 released: Mapping[str, Any] = {}) -> dict[str, Callable[[], torch.Tensor]]:
    """The constants of ``graph`` that ``kernels`` reads only through a packed copy
    (``LoweringResult.packed``) which unpacks to exactly the same tensor: what the optimized
    module need not hold twice (besides those the lowering ``released`` already)."""
    read = {node.target for node in kernels.graph.nodes if node.op == "get_attr"}
    held = {}
    for target, unpack in packed.items():
        value = graph._buffers.get(target)  # a buffer of the graph's own (not of a submodule)
        if target in read or value is None or target in released:
            continue
        try:
            exact = torch.equal(unpack(), value)
        except Exception:  # a build whose packed layout does not read back
            exact = False
        if exact:
            held[target] = unpack
    if packed:
        release_freed_memory()  # the unpacked copies checked above, each under glibc's trim threshold
    return held


def _both_stages(gm: fx.GraphModule, inputs: list[Any], device: torch.device, report: Any,
                 reference: _Reference, packed: dict[str, Any],
                 plain: PlainCopies) -> tuple[fx.GraphModule, fx.GraphModule] | None:
    """The graph-stage and kernel-stage lowerings checked together, in one run of what will
    run (the kernels) against the optimized graph, within the looser of the two stages'
    tolerances; None when not both apply or they disagree (then each stage is checked on its
    own, so a stage at fault is left out alone). The graph stage joins ``plain``'s graphs."""
    choose = timings.current().choose
    graph_stage = lower_graph(gm, "eager", device, "graph", choose=choose)
    if not graph_stage.applied:
        return None
    plain.graphs.append(graph_stage.graph_module)
    kernel_stage = lower_graph(graph_stage.graph_module, "eager", device, "kernel", choose=choose)
    plain.settle()
    if not kernel_stage.applied:
        return None
    kernels = _on(kernel_stage.graph_module, device)
    try:
        expected, actual = _parity_runs(reference, kernels, inputs)
    except Exception:
        return None
    comparison = compare_outputs(expected, actual)
    limits = [rtol for rtol in (graph_stage.parity_rtol(), kernel_stage.parity_rtol()) if rtol is not None]
    limit = max(limits) if limits else exact_tolerance(comparison.worst_dtype)
    if comparison.mismatch or not comparison.within(limit):
        return None
    report.notes.extend(graph_stage.notes)
    report.notes.extend(kernel_stage.notes)
    report.kernels.extend(graph_stage.choices + kernel_stage.choices)
    packed.update(graph_stage.packed)
    packed.update(kernel_stage.packed)
    graph = _on(graph_stage.graph_module, device)
    graph.recompile()
    kernels.recompile()
    return graph, kernels


def _lowered(gm: fx.GraphModule, stage: str, inputs: list[Any], device: torch.device, report: Any,
             expected: list[Any] | None, packed: dict[str, Any]) -> tuple[fx.GraphModule, list[Any] | None]:
    """``gm`` after the lowerings of ``stage``, and its outputs on ``inputs`` when they were
    computed (``expected``: ``gm``'s own, if already known); what the lowerings packed goes in
    ``packed`` (checked against the kernels kept by :func:`_packed_only`)."""
    lowered = lower_graph(gm, "eager", device, stage, choose=timings.current().choose)
    report.notes.extend(lowered.notes)
    packed.update(lowered.packed)
    if not lowered.applied:
        result, outputs = gm.to(device), expected
    else:
        result, outputs = _checked(gm, lowered, inputs, device, report, expected)
    result.recompile()
    return result, outputs


def _checked(gm: fx.GraphModule, lowered: Any, inputs: list[Any], device: torch.device, report: Any,
             expected: list[Any] | None) -> tuple[fx.GraphModule, list[Any] | None]:
    """The lowered graph when it agrees with the optimized one on the example inputs (within
    the loosest tolerance the applied lowerings declare, else float rounding); otherwise the
    optimized graph as it is, with the reason noted. Kernels differ from the ops they replace
    in accumulation order and in what a probe could not see, so this is checked on the
    model's own shapes rather than trusted. Returns the kept graph and its outputs."""
    kernels = lowered.graph_module.to(device)
    try:
        expected, actual = _parity_runs(_Reference(gm, inputs, device, expected), kernels, inputs)
    except Exception as exc:
        report.notes.append(f"lowered kernels failed on the example inputs ({type(exc).__name__}: {exc}); "
                            "the optimized graph runs without them")
        return gm.to(device), expected
    comparison = compare_outputs(expected, actual)
    limit = lowered.parity_rtol()
    if limit is None:
        limit = exact_tolerance(comparison.worst_dtype)
    if comparison.mismatch or not comparison.within(limit):
        names = ", ".join(lowering.name for lowering in lowered.applied)
        report.notes.append(f"lowerings {names} changed outputs on the example inputs "
                            f"(max rel error {comparison.max_rel:.3g} > {limit:g}); the optimized graph "
                            "runs without them")
        return gm.to(device), expected
    report.kernels.extend(lowered.choices)
    return kernels, actual


def _on(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """``gm`` on ``device``, the placeholders of the constants held packed only left on the meta
    device (:class:`~fxopt.lowering.base.PlainCopies`)."""
    return gm._apply(lambda t: t if t.device.type == "meta" else t.to(device))


class _Reference:
    """The optimized graph's outputs on the parity inputs: ``known`` ones (the pass manager's),
    else computed at most once, before a packed constant leaves the graph."""

    def __init__(self, gm: fx.GraphModule, inputs: list[Any], device: torch.device, known: list[Any] | None) -> None:
        self._gm, self._inputs, self._device, self.known = gm, inputs, device, known

    def outputs(self) -> list[Any]:
        if self.known is None:
            with torch.no_grad(), phase("parity"):
                self.known = run_graph(self._gm.to(self._device), self._inputs)
        return self.known


def _parity_runs(reference: _Reference, kernels: fx.GraphModule, inputs: list[Any]) -> tuple[list[Any], list[Any]]:
    """The optimized graph's outputs on ``inputs`` and the lowered kernels' outputs on them."""
    expected = reference.outputs()
    with torch.no_grad(), phase("parity"):
        return expected, run_graph(kernels, inputs)


BACKEND = Backend(
    "eager",
    lower_eager,
    description="the optimized graph run as PyTorch code, its kernel lowerings kept where they measure faster",
    shares_weights=True,
)
