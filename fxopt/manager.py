"""The pass manager: run passes in order, verify each one, roll back what fails.

After every pass that says it modified the graph, the manager cleans the graph up, lints
it, re-propagates shapes, and compares its outputs with the previous graph's on every
batch (example inputs and calibration data). An exact pass must agree to the dtype's
floating-point tolerance; a lossy pass must stay inside its ``budget``. A pass that
raises, breaks its contract or fails a check is rolled back: the manager kept the
previous graph, so rollback is dropping the working copy. ``strict=True`` raises instead.

Timing is measured here and graph dumps are instruments: passes contain neither.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fxopt.cost import graph_cost
from fxopt.errors import InputError, PassFailedError
from fxopt.ir import cleanup, constants, copy_graph_module, propagate_shapes
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.report import PassRecord
from fxopt.verify import compare_outputs, exact_tolerance, lint, module_fingerprint, run_graph

log = logging.getLogger("fxopt")


def reference_outputs(gm: fx.GraphModule, batches: list[list[torch.Tensor]]) -> list[list[Any]]:
    """The captured graph's outputs on every batch; export traces with fake tensors, so a
    mismatch it did not check (a dtype, say) surfaces here, as a clear error."""
    outputs = []
    for index, batch in enumerate(batches):
        try:
            outputs.append(run_graph(gm, batch))
        except Exception as exc:
            what = "the example inputs" if index == 0 else f"calibration batch {index - 1}"
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InputError(
                f"the captured model fails on {what}: {type(exc).__name__}: {message}; check that "
                "model(*example_inputs) runs in eager mode with these inputs' shapes and dtypes"
            ) from exc
    return outputs



class PassInstrument:
    """Hooks around each pass (in the spirit of TVM's pass instruments)."""

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, index: int, total: int) -> None:
        pass

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, record: PassRecord) -> None:
        pass


class DumpGraphs(PassInstrument):
    """Write the graph before and after each pass as text files in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._step = 0

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, index: int, total: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._step += 1
        (self.directory / f"{self._step:02d}-{pass_.name}-before.txt").write_text(str(gm.graph))

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, record: PassRecord) -> None:
        (self.directory / f"{self._step:02d}-{pass_.name}-after.txt").write_text(
            f"# status: {record.status}\n{gm.graph}"
        )


class PrintProgress(PassInstrument):
    """One line per pass on stderr, for long runs."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, index: int, total: int) -> None:
        print(f"[fxopt] pass {index}/{total}: {pass_.describe()} ...", file=self.stream, flush=True)

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, record: PassRecord) -> None:
        print(f"[fxopt]   {record.status}: applied {record.applied}, skipped "
              f"{sum(record.skipped.values())}, {record.seconds:.2f}s", file=self.stream, flush=True)


class _Rejected(Exception):
    """A pass's output failed a check; carries the reason for the report."""


class PassManager:
    """Runs ``passes`` over a graph, verifying each; see the module docstring."""

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        strict: bool = False,
        verify: bool = True,
        instruments: Sequence[PassInstrument] = (),
        max_rounds: int = 1,
        watched_module: torch.nn.Module | None = None,
        restore_watched: Callable[[], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.strict = strict
        self.verify = verify
        self.instruments = list(instruments)
        self.max_rounds = max_rounds
        # The user's model: a pass that touches it is rolled back and the model restored.
        self.watched_module = watched_module
        self.restore_watched = restore_watched

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, list[PassRecord]]:
        if not ctx.reference:
            ctx.reference = reference_outputs(gm, ctx.batches)
        if not ctx.original:
            ctx.original = list(ctx.reference)
        records: list[PassRecord] = []
        done: list[str] = []
        for _ in range(max(1, self.max_rounds)):
            changed = False
            for index, pass_ in enumerate(self.passes, 1):
                for instrument in self.instruments:
                    instrument.before_pass(pass_, gm, index, len(self.passes))
                gm, record = self._run_one(pass_, gm, ctx, done)
                for instrument in self.instruments:
                    instrument.after_pass(pass_, gm, record)
                records.append(record)
                done.append(pass_.name)
                changed |= record.status == "applied"
            if not changed:
                break
        return gm, records

    def _run_one(
        self, pass_: Pass, gm: fx.GraphModule, ctx: PassContext, done: list[str]
    ) -> tuple[fx.GraphModule, PassRecord]:
        start = time.perf_counter()
        before = graph_cost(gm)
        record = PassRecord(pass_.name, pass_.exact, "no change", before=before, after=before,
                            budget=pass_.budget_or_none)
        working = copy_graph_module(gm)
        frozen = [t for _, t in constants(gm)]
        versions = [t._version for t in frozen]
        fingerprint = module_fingerprint(self.watched_module) if self.watched_module is not None else None
        try:
            try:
                result = pass_(working, ctx)
            except Exception as exc:
                log.debug("pass %s raised", pass_.name, exc_info=True)
                raise _Rejected(f"raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(result, PassResult):
                raise _Rejected(f"returned {type(result).__name__} instead of a PassResult")
            record.matched, record.applied = result.matched, result.applied
            record.skipped = result.reasons()
            record.skips = list(result.skipped)
            record.details = list(result.details)
            if [t._version for t in frozen] != versions:
                # The previous graph shares these tensors, so there is nothing to roll back to.
                raise PassFailedError(pass_.name, "modified a frozen constant in place; "
                                      "passes must add new constants instead", done)
            if fingerprint is not None and module_fingerprint(self.watched_module) != fingerprint:
                if self.restore_watched is not None:
                    self.restore_watched()
                raise _Rejected("modified the user's model (restored from fxopt's frozen copy)")
            if result.modified:
                new_outputs = self._check(pass_, working, ctx, record, gm) if self.verify else None
                if new_outputs is not None:
                    ctx.reference = new_outputs
                gm = working
                record.status = "applied"
                record.after = graph_cost(gm)
        except _Rejected as rejected:
            record.status = "rolled back"
            record.message = str(rejected)
            record.after = before
            if self.strict:
                raise PassFailedError(pass_.name, str(rejected), done) from rejected.__cause__
            warnings.warn(f"fxopt: pass '{pass_.name}' rolled back: {rejected}", stacklevel=4)
        record.seconds = time.perf_counter() - start
        return gm, record

    def _check(self, pass_: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord,
               previous: fx.GraphModule) -> list[list[Any]]:
        reason = lint(gm)
        if reason:
            raise _Rejected(reason)
        try:
            cleanup(gm)  # regenerating code is the first thing a malformed graph trips over
        except Exception as exc:
            raise _Rejected(f"graph lint failed: {type(exc).__name__}: {exc}") from exc
        try:
            propagate_shapes(gm)
        except Exception as exc:
            raise _Rejected(f"shape propagation failed: {type(exc).__name__}: {exc}") from exc
        outputs: list[list[Any]] = []
        worst = None
        for inputs, expected in zip(ctx.batches, ctx.reference):
            try:
                actual = run_graph(gm, inputs)
            except Exception as exc:
                raise _Rejected(f"the rewritten graph failed to run: {type(exc).__name__}: {exc}") from exc
            comparison = compare_outputs(expected, actual)
            worst = comparison if worst is None else worst.merge(comparison)
            outputs.append(actual)
        assert worst is not None
        record.max_abs_err, record.max_rel_err = worst.max_abs, worst.max_rel
        if worst.mismatch:
            raise _Rejected(worst.mismatch)
        if pass_.exact:
            limit = exact_tolerance(worst.worst_dtype)
            if not worst.within(limit):
                verdict = rounding_verdict(previous, gm, ctx.batches, ctx.reference, outputs)
                if verdict is None:
                    raise _Rejected(f"exact pass changed outputs: max rel error {worst.max_rel:.3g} > {limit:g}")
                record.message = verdict
        else:
            budget = pass_.budget_or_none or 0.0
            if worst.max_rel > budget:
                raise _Rejected(f"error {worst.max_rel:.3g} exceeds the pass's budget {budget:g}")
        return outputs


ROUNDING_FACTOR = 4.0


def rounding_verdict(
    previous: fx.GraphModule,
    rewritten: fx.GraphModule,
    batches: list[list[torch.Tensor]],
    previous_outputs: list[list[Any]],
    rewritten_outputs: list[list[Any]],
) -> str | None:
    """Whether an exact rewrite that missed the tolerance only rounded differently.

    An output that is a small difference of large terms moves, relative to itself, by far
    more than the tolerance when a rewrite reorders the sums. Evaluating the previous graph
    in float64 tells rounding from a change of function: the rewritten graph must be about
    as close to that reference as the previous graph is (within ``ROUNDING_FACTOR``, and at
    least one ulp of the output's scale). Returns the report's explanation, or None when
    the difference is not explained by rounding (or float64 cannot run the graph).
    """
    try:
        reference = as_float64(previous)
        worst_new = worst_old = 0.0
        for inputs, old, new in zip(batches, previous_outputs, rewritten_outputs):
            wide = run_graph(reference, [t.double() if t.is_floating_point() else t for t in inputs])
            for truth, a, b in zip(wide, old, new):
                if not isinstance(truth, torch.Tensor) or not a.is_floating_point():
                    continue
                finite = torch.isfinite(truth)
                truth_f, a_f, b_f = truth[finite], a.double()[finite], b.double()[finite]
                if truth_f.numel() == 0:
                    continue
                ulp = torch.finfo(a.dtype).eps * float(truth_f.abs().max())
                err_old = max(float((a_f - truth_f).abs().max()), ulp)
                err_new = float((b_f - truth_f).abs().max())
                if err_new > ROUNDING_FACTOR * err_old:
                    return None
                worst_new, worst_old = max(worst_new, err_new), max(worst_old, err_old)
    except Exception:
        return None
    return (f"outputs moved past the tolerance, but only by rounding: against a float64 evaluation "
            f"the rewritten graph errs by {worst_new:.2e}, the previous one by {worst_old:.2e}")


def as_float64(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose floating-point constants are float64 (for reference runs)."""
    wide = copy_graph_module(gm)
    for name, buffer in list(wide._buffers.items()):
        if buffer is not None and buffer.is_floating_point():
            wide.register_buffer(name, buffer.double())
    wide.recompile()
    return wide
