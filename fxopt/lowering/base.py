"""The lowering contract: what a lowering declares and what it reports."""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from fxopt.ir import size_hint, unique_attr_name
from fxopt.ir.derived import release_freed_memory

OnnxTranslations = Mapping[Any, Callable[..., Any]]


@dataclass
class LoweringResult:
    """What one lowering did to a graph: how many patterns became kernels, and notes
    (including why a pattern stayed as it was)."""

    lowered: int = 0
    notes: list[str] = field(default_factory=list)
    # Set when this run's kernels compute in a lower precision than the graph's outputs
    # (a bfloat16 GEMM): the parity tolerance of that precision, looser than the class's.
    parity_rtol: float | None = None
    # The measured choices made (fxopt.pipeline.timings.Choice.as_dict, with the "nodes"
    # they concern), for the report.
    choices: list[dict[str, Any]] = field(default_factory=list)
    # Graph constants (by ``get_attr`` target) that the kernels written here hold in a packed
    # form of their own, each with the function that gives the plain tensor back: the backend
    # may then keep them packed only (:class:`fxopt.backends.Lowered`).
    packed: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)


class PackedConstant(torch.nn.Module):
    """A constant packed for a kernel (oneDNN's blocked layout, a quantized engine's packed
    weight), held outside the module's state: the packed object is opaque (no storage to copy,
    move or save), and a copy shares it. ``unpacked()`` gives the plain tensor back."""

    def __init__(self, packed: Any, unpack: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.packed = packed
        self._unpack = unpack

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedConstant:
        return PackedConstant(self.packed, self._unpack)

    def unpacked(self) -> torch.Tensor:
        return self._unpack(self.packed)


def hold_packed(gm: fx.GraphModule, constant_node: fx.Node, packed: Any, unpack: Callable[[Any], torch.Tensor],
                result: LoweringResult, suffix: str) -> fx.Node:
    """A ``get_attr`` of ``packed``, the kernels' form of the constant ``constant_node`` reads,
    held by ``gm`` in a :class:`PackedConstant`; ``result.packed`` says how to unpack it, so that
    the module need not hold both (:class:`fxopt.backends.Lowered`)."""
    name = unique_attr_name(gm, f"{constant_node.target}_{suffix}")
    holder = PackedConstant(packed, unpack)
    gm.add_module(name, holder)
    result.packed[constant_node.target] = holder.unpacked
    scope = _RELEASING.get()
    if scope is not None:
        scope.packed(gm, str(constant_node.target), holder.unpacked)
    with warnings.catch_warnings():
        # fx warns that a plain attribute is no parameter or buffer: it is not meant to be one.
        warnings.simplefilter("ignore")
        return gm.graph.get_attr(f"{name}.packed")


class PlainCopies:
    """The graphs of one lowering that hold the plain constants its kernels pack, and the
    constants they let go of (:func:`releasing_packed`).

    A kernel that packs a weight (oneDNN's int8 layout) holds a copy of its own; until the
    lowering ends, each graph of it (the optimized graph, the graph stage, the kernels) still
    holds the plain weight too, so a large model's lowering held its int8 weights twice (a 1.1B
    Llama's: 0.7 GiB more at the top of its compile). Here a packed constant goes from those
    graphs as soon as nothing in the graph being lowered reads it and its pack unpacks to it
    exactly: each graph's reference becomes a placeholder on the meta device (as the optimized
    module holds it, :class:`fxopt.OptimizedModule`), and ``released`` says how to unpack it.
    Only these graphs' own references go: a tensor that something else holds (a stage kept for
    another candidate, the user's model) stays where it is, whole."""

    def __init__(self, graphs: Iterable[fx.GraphModule], before_first: Callable[[], Any] | None = None) -> None:
        self.graphs = list(graphs)
        self.released: dict[str, Callable[[], torch.Tensor]] = {}
        self._before_first = before_first  # what needs the graphs whole (their outputs), run once
        self._pending: list[tuple[fx.GraphModule, str, Callable[[], torch.Tensor]]] = []

    def packed(self, gm: fx.GraphModule, target: str, unpack: Callable[[], torch.Tensor]) -> None:
        """``gm``'s constant ``target`` is now held packed too (``unpack`` gives it back): it
        goes once ``gm`` no longer reads it (its kernel replaces the site after packing). A graph
        that is no copy of these graphs (a lowering measuring a site on a module of its own), or
        a constant they do not hold, is not theirs to let go of."""
        plain = gm._buffers.get(target)
        if plain is None or not any(graph._buffers.get(target) is plain for graph in self.graphs):
            return
        self._pending.append((gm, target, unpack))
        self.settle()

    def settle(self) -> None:
        """Let go of each packed constant that its graph no longer reads."""
        waiting, freed = [], False
        for gm, target, unpack in self._pending:
            if any(node.users for node in gm.graph.find_nodes(op="get_attr", target=target)):
                waiting.append((gm, target, unpack))
            else:
                freed = self._release(gm, target, unpack) or freed
        self._pending = waiting
        if freed:
            release_freed_memory()

    def restore(self) -> None:
        """Put each released constant back, unpacked, into the graphs that held it (a lowering
        that is not kept runs the optimized graph as it was)."""
        for target, unpack in self.released.items():
            for graph in self.graphs:
                held = graph._buffers.get(target)
                if held is not None and held.device.type == "meta":
                    graph.register_buffer(target, unpack())
        self.released.clear()

    def _release(self, gm: fx.GraphModule, target: str, unpack: Callable[[], torch.Tensor]) -> bool:
        plain = gm._buffers.get(target)  # a buffer of the graph's own (not of a submodule)
        if plain is None or plain.device.type == "meta" or target in self.released:
            return False
        try:
            exact = torch.equal(unpack(), plain)
        except Exception:  # a build whose packed layout does not read back
            exact = False
        if not exact:
            return False
        if self._before_first is not None:
            self._before_first()
            self._before_first = None
        placeholder = torch.empty_like(plain, device="meta")
        for graph in (gm, *self.graphs):
            if graph._buffers.get(target) is plain:
                graph.register_buffer(target, placeholder)
        self.released[target] = unpack
        return True


_ONE_COPY: contextvars.ContextVar[bool] = contextvars.ContextVar("fxopt_one_copy", default=False)


@contextlib.contextmanager
def holding_weights_once(on: bool = True) -> Iterator[None]:
    """While inside (``on``), a lowering that measured a kernel holding a weight twice (a
    quantized engine's pack beside the weight) faster than one holding it once chooses the
    latter at any speed: the compile is past its memory bound, where memory, not a few percent
    of speed, decides whether the model fits (:meth:`fxopt.evidence.Evidence.past_memory_bound`)."""
    token = _ONE_COPY.set(on)
    try:
        yield
    finally:
        _ONE_COPY.reset(token)


def weights_held_once() -> bool:
    """Whether a lowering must choose kernels that hold each weight once (:func:`holding_weights_once`)."""
    return _ONE_COPY.get()


_RELEASING: contextvars.ContextVar[PlainCopies | None] = contextvars.ContextVar("fxopt_releasing", default=None)


@contextlib.contextmanager
def releasing_packed(graphs: Iterable[fx.GraphModule],
                     before_first: Callable[[], Any] | None = None) -> Iterator[PlainCopies]:
    """While inside, the constants that kernels pack (:func:`hold_packed`) go from ``graphs``
    and from the graph being lowered as soon as they are held packed only (:class:`PlainCopies`);
    ``before_first`` runs once before the first goes (the graphs' outputs, while they are whole)."""
    scope = PlainCopies(graphs, before_first)
    token = _RELEASING.set(scope)
    try:
        yield scope
    finally:
        _RELEASING.reset(token)


# ``choose(op, site, candidates, inputs, prefer=...) -> Choice`` of a compile's
# fxopt.pipeline.timings.KernelTimings: which candidate (name -> callable on one of
# ``inputs``) runs at a site, measured on this machine (or cached, or the first, unmeasured).
Choose = Callable[..., Any]


def measured_inputs(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype,
                    device: torch.device | None = None) -> list[list[torch.Tensor]]:
    """One random input of each shape for a site's measurement, drawn from a generator of
    its own (the caller's random stream is left as it was)."""
    generator = torch.Generator().manual_seed(0)
    return [[torch.randn(shape, generator=generator).to(device=device, dtype=dtype)] for shape in shapes]


def measured_shapes(shape: Sequence[Any]) -> list[tuple[int, ...]]:
    """The sizes a site is measured at: the example shape, and where a dimension is symbolic
    (a dynamic batch) a second one, each symbolic dimension halved (doubled when 1)."""
    example = tuple(size_hint(d) for d in shape)
    dynamic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
    if not dynamic:
        return [example]
    second = list(example)
    for i in dynamic:
        second[i] = example[i] // 2 if example[i] > 1 else 2
    return [example, tuple(second)]


class Lowering:
    """A pattern-to-kernel rewrite a backend runs after the passes; see the module docstring.

    Subclasses set ``name`` (kebab-case) and implement ``applies`` and ``lower``.
    """

    name: ClassVar[str] = ""
    backends: ClassVar[tuple[str, ...]] = ("eager", "onnx")
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    # Relative error allowed between ONNX Runtime and the torch graph once this lowering
    # applied; None keeps the float tolerance of an exact rewrite.
    parity_rtol: ClassVar[float | None] = None
    # The lowerings this one must run after / before (names; :mod:`fxopt.ordering`, the
    # passes' scheme): a fused lowering that consumes a larger pattern goes before one that
    # consumes a part of it. Among lowerings free to run, the name decides.
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    # "graph": the kernels it writes are part of the optimized module's graph
    # (``opt.graph_module``), which stays exportable (its ops have ONNX translations).
    # "kernel": a device-specific kernel choice made only in the code that runs, after the
    # graph lowerings; ``opt.graph_module`` keeps the portable ops it replaced.
    stage: ClassVar[str] = "graph"
    # ONNX operator domains beyond the standard ones (``""``, ``"ai.onnx"``) that the kernels
    # it writes export to, e.g. ``("com.microsoft",)`` for ONNX Runtime's contrib ops. A
    # portable export (``export_onnx(..., portable=True)``) skips such lowerings.
    onnx_domains: ClassVar[tuple[str, ...]] = ()
    # True for a lowering that exists for speed and measures its sites: ``lower`` then takes
    # a ``choose`` keyword (a :data:`Choose`, or None when nothing is measured, e.g. for ONNX)
    # and rewrites a site only when the choice says its kernel is faster there.
    measured: ClassVar[bool] = False

    def probe(self, device: torch.device) -> str | None:
        """Why this lowering cannot run on ``device`` (None when it can)."""
        return None

    def applies(self, gm: fx.GraphModule) -> bool:
        """Whether ``gm`` holds this lowering's pattern (or the kernels it writes)."""
        raise NotImplementedError

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        """Rewrite the pattern in ``gm`` (in place) into kernels for ``device``."""
        raise NotImplementedError

    def onnx_translations(self) -> OnnxTranslations:
        """onnxscript functions for the custom ops this lowering writes."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
