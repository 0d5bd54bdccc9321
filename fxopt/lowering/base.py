"""The lowering contract: what a lowering declares and what it reports."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from fxopt.ir import size_hint, unique_attr_name

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
    with warnings.catch_warnings():
        # fx warns that a plain attribute is no parameter or buffer: it is not meant to be one.
        warnings.simplefilter("ignore")
        return gm.graph.get_attr(f"{name}.packed")


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
