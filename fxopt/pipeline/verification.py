"""What the numerics check runs graphs on, and the outputs it compares with.

Two sets of batches:

* the full batches (``ctx.batches``: example inputs, calibration batches, fresh inputs), on
  which lossy passes choose and are held to their budgets; the evidence store's ``reference``
  holds the current graph's outputs on them;
* their row slices: every batch cut to its first ``rows`` rows along the dynamic batch
  dimension (``rows + 1`` for a fresh batch, so the two sizes differ), on which exact
  passes are verified when the manager is given ``verify_rows``.

Why a slice verifies an exact pass: an exact rewrite claims the same function for every
input the graph accepts. A graph captured with a dynamic batch accepts every batch size,
and the slices exercise two sizes (``rows`` and ``rows + 1``, both above 1, so a rewrite
that mixes rows, specializes the batch size or broadcasts over it still shows) at the
model's own sizes in every other dimension. What the slice gives up is the values of the
rows left out, which an exact rewrite does not depend on; lossy passes, whose error does
depend on the values, are still measured and verified on every row of every batch. A
graph whose batch is static is verified on the full batches.

References are computed when first needed and kept until the graph changes: a pass
verified on slices leaves the full reference stale, and it is recomputed, on the current
graph, only before a lossy pass reads it (or for the final error once a lossy pass has
applied).

The final error against the model, once a lossy pass has applied, is measured against the
full outputs of the graph the first lossy pass started from (the *base*: the captured graph
after the exact passes) plus how far that graph is from the captured one on the row slices
(the exact passes' drift, float rounding): the error is within that sum of the error against
the captured graph's own outputs, which would otherwise cost another run of every full batch.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from fxopt.pass_api import PassContext
from fxopt.verify import Parity, ReusingRunner, compare_outputs, run_graph

DEFAULT_VERIFY_ROWS = 2


def batch_symbol(gm: fx.GraphModule) -> Any:
    """The symbol of the dynamic batch dimension (dim 0 of the first tensor input), or None
    when that size is static."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            size = value.shape[0]
            if isinstance(size, int):
                return None
            expr = size.node.expr
            return expr if expr.is_Symbol else None
    return None


def row_slices(gm: fx.GraphModule, batches: Sequence[Sequence[Any]], fresh_batches: int,
               rows: int) -> list[list[Any]] | None:
    """Each batch cut to its first ``rows`` rows (``rows + 1`` for the fresh batches) on the
    inputs whose dim 0 is the dynamic batch; None when the batch is static or no batch has
    more rows than its slice would (nothing to gain)."""
    symbol = batch_symbol(gm)
    if symbol is None or rows < 2:
        return None
    batched = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        value = node.meta.get("val")
        is_batched = (isinstance(value, torch.Tensor) and value.dim() >= 1
                      and not isinstance(value.shape[0], int) and value.shape[0].node.expr == symbol)
        batched.append(is_batched)
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if (dim > 0 or not is_batched) and not isinstance(size, int) and symbol in size.node.expr.free_symbols:
                    return None  # the batch size shows elsewhere too: cutting dim 0 alone would not fit
    slices, smaller = [], False
    for index, batch in enumerate(batches):
        keep = rows + (index >= len(batches) - fresh_batches)
        cut = []
        for tensor, is_batched in zip(batch, batched):
            if is_batched and isinstance(tensor, torch.Tensor) and tensor.shape[0] > keep:
                cut.append(tensor[:keep])
                smaller = True
            else:
                cut.append(tensor)
        slices.append(cut)
    return slices if smaller else None


class Verification:
    """Which batches a pass is verified on and which outputs it is compared with (see the
    module docstring); what it runs is kept in the compilation's evidence store
    (``ctx.evidence``, :class:`fxopt.evidence.Evidence`)."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, slices: list[list[Any]] | None) -> None:
        self.ctx = ctx
        self.evidence = ctx.evidence
        self.slices = slices
        self.evidence.full_current = bool(self.evidence.reference)  # the reference is the current graph's
        self.captured = gm  # for the original outputs, computed only if a lossy pass needs them
        self.forwards = 0  # graph runs made here (tests count them)

    def fork(self) -> Verification:
        """An independent copy to continue another pipeline from the same graph (a preset's
        candidates share their exact passes): what was measured is shared, never written in place."""
        twin = copy.copy(self)
        twin.ctx = dataclasses.replace(self.ctx, evidence=self.evidence.fork())
        twin.evidence = twin.ctx.evidence
        return twin

    @property
    def lossy_applied(self) -> bool:
        return self.evidence.lossy_applied

    def run(self, gm: fx.GraphModule, batches: Sequence[Sequence[Any]],
            known: Sequence[list[Any] | None] = ()) -> list[list[Any]]:
        """``gm``'s outputs on each batch, taken from ``known`` where it holds them."""
        known = list(known) + [None] * (len(batches) - len(known))
        self.forwards += sum(outputs is None for outputs in known)
        return [run_graph(gm, list(batch)) if outputs is None else outputs for batch, outputs in zip(batches, known)]

    def _run_keeping_values(self, gm: fx.GraphModule, batches: Sequence[Sequence[Any]],
                            known: Sequence[list[Any] | None]) -> list[list[Any]]:
        """:meth:`run`, keeping every node's value on the batches a pass may observe (all but
        the fresh ones) in the evidence store for the lossy pass about to read this reference
        (its observers, trials and verification reuse them; the manager drops them after the
        pass), within the store's memory bound."""
        bound = self.evidence.values_bound(gm)
        runner = ReusingRunner(max_bytes=bound)
        observable = len(batches) - self.ctx.fresh_batches
        outputs = []
        kept = 0  # bytes of the values pinned so far
        for index, batch in enumerate(batches):
            if index < observable and kept < bound:
                self.forwards += 1
                outputs.append(runner.run(gm, list(batch), index, pin=True))
                kept += runner.pinned_bytes(index)
            else:
                outputs += self.run(gm, [batch], [known[index]])
        self.evidence.values = runner
        return outputs

    def _shared_outputs(self, source: Sequence[Sequence[Any]] | None, outputs: list[list[Any]] | None,
                        target: Sequence[Sequence[Any]] | None) -> list[list[Any] | None]:
        """For each batch of ``target``, the current graph's outputs on it when ``source`` holds
        the very same batch (a batch no longer than its slice is its own slice: the fresh input)
        with ``outputs`` known for it; else None."""
        if target is None:
            return []
        if source is None or outputs is None:
            return [None] * len(target)
        return [result if _same_batch(a, b) else None for a, b, result in zip(source, target, outputs)]

    def sliced_for(self, exact: bool) -> bool:
        """Whether a pass of this kind is verified on the row slices."""
        return exact and self.slices is not None

    def batches_for(self, exact: bool) -> list[list[Any]]:
        return self.slices if self.sliced_for(exact) else self.ctx.batches  # type: ignore[return-value]

    def reference_for(self, gm: fx.GraphModule, exact: bool) -> list[list[Any]]:
        """The outputs of ``gm`` (the current graph) that a pass of this kind is compared with."""
        evidence = self.evidence
        if self.sliced_for(exact):
            if evidence.slice_reference is None:
                known = self._shared_outputs(self.ctx.batches, evidence.reference if evidence.full_current else None,
                                             self.slices)
                evidence.slice_reference = self.run(gm, self.slices or [], known)
            return evidence.slice_reference
        self.ensure_full(gm)
        return evidence.reference

    def ensure_full(self, gm: fx.GraphModule, keep_values: bool = False) -> None:
        """Make the evidence's reference the outputs of ``gm`` on the full batches;
        ``keep_values``: when they are computed, also keep every node's value on the example
        inputs (for the lossy pass about to run)."""
        evidence = self.evidence
        if evidence.full_current and evidence.reference:
            return
        known = evidence.known_outputs(gm)
        if known is not None:
            evidence.reference = known
        else:
            shared = self._shared_outputs(self.slices, evidence.slice_reference, self.ctx.batches)
            evidence.reference = (self._run_keeping_values(gm, self.ctx.batches, shared) if keep_values
                                  else self.run(gm, self.ctx.batches, shared))
            evidence.know_outputs(gm, evidence.reference)
        evidence.full_current = True
        if not evidence.original and gm is self.captured:
            evidence.original = evidence.captured_outputs["full"] = list(evidence.reference)
        if evidence.base_outputs is None and not evidence.lossy_applied:
            evidence.base_outputs = list(evidence.reference)
            evidence.base_drift = self._slice_drift()

    def _slice_drift(self) -> tuple[float, float]:
        """Max abs and relative error of the current graph against the captured one on the
        row slices (zero when nothing changed the graph or there are no slices)."""
        evidence = self.evidence
        if evidence.slice_original is None or evidence.slice_reference is None:
            return 0.0, 0.0
        worst_abs = worst_rel = 0.0
        for expected, actual in zip(evidence.slice_original, evidence.slice_reference):
            comparison = compare_outputs(expected, actual)
            worst_abs, worst_rel = max(worst_abs, comparison.max_abs), max(worst_rel, comparison.max_rel)
        return worst_abs, worst_rel

    def commit(self, exact: bool, outputs: list[list[Any]] | None) -> None:
        """The graph that produced ``outputs`` (on the batches of its kind) is now current;
        the other set's reference is stale."""
        evidence = self.evidence
        if outputs is None:  # committed without being run (verification off): nothing is known
            evidence.slice_reference, evidence.full_current = None, False
            return
        if self.sliced_for(exact):
            evidence.slice_reference, evidence.full_current = outputs, False
        else:
            evidence.reference, evidence.full_current = outputs, True
            evidence.slice_reference = None
            evidence.lossy_applied |= not exact

    def final_error(self, gm: fx.GraphModule) -> tuple[float, float]:
        """Max abs and relative error of ``gm`` (the final graph) against the captured graph:
        on the full batches once a lossy pass has applied, on the slices of an exact-only run."""
        if self.slices is not None and not self.lossy_applied:
            return self._slice_drift()  # zero when nothing changed the graph
        self.ensure_full(gm)
        model_outputs, (worst_abs, worst_rel) = self.model_outputs()
        for expected, actual in zip(model_outputs, self.evidence.reference):
            comparison = compare_outputs(expected, actual)
            worst_abs, worst_rel = max(worst_abs, comparison.max_abs), max(worst_rel, comparison.max_rel)
        return worst_abs, worst_rel

    def model_outputs(self) -> tuple[list[list[Any]], tuple[float, float]]:
        """The outputs errors against the model are measured with, on the full batches, and
        what must be added to such an error (max abs, max rel): the captured graph's outputs
        when known, with nothing to add; else the base graph's with its drift (module docstring)."""
        evidence = self.evidence
        if evidence.original:
            return evidence.original, (0.0, 0.0)
        if evidence.base_outputs is not None:
            return evidence.base_outputs, evidence.base_drift
        if "full" not in evidence.captured_outputs:
            evidence.captured_outputs["full"] = self.run(self.captured, self.ctx.batches)
        evidence.original = evidence.captured_outputs["full"]
        return evidence.original, (0.0, 0.0)

    def parity(self) -> Parity:
        """What a backend checks its lowering against (:class:`fxopt.verify.Parity`): the
        smallest batch whose outputs are known without running anything, and, once a lossy
        pass applied, the model's outputs on every batch."""
        inputs, outputs = self.smallest_known_outputs() or (None, None)
        if not self.lossy_applied:
            return Parity(inputs, outputs)
        model_outputs, drift = self.model_outputs()
        return Parity(inputs, outputs, self.ctx.batches, model_outputs, drift)

    def smallest_known_outputs(self) -> tuple[list[Any], list[Any]] | None:
        """The smallest batch (fewest input elements) the current graph's outputs are known on
        without running anything, and those outputs: what a backend's parity check runs on.
        A lowering claims the graph's function on every input it accepts, so any verified
        batch shows a kernel that disagrees; the smallest costs least."""
        evidence = self.evidence
        known: list[tuple[list[Any], list[Any]]] = []
        if evidence.full_current and evidence.reference:
            known += zip(self.ctx.batches, evidence.reference)
        if self.slices is not None and evidence.slice_reference is not None:
            known += zip(self.slices, evidence.slice_reference)
        if not known:
            return None
        return min(known, key=lambda pair: sum(t.numel() for t in pair[0] if isinstance(t, torch.Tensor)))


def _same_batch(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
