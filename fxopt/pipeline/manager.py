"""The pass manager: order, copy, run, consult the checks, commit or roll back.

Each pass gets a structural copy of the current graph (new nodes, shared constant
tensors), so rolling back is dropping the copy. After the pass, the manager consults its
checks (:mod:`fxopt.pipeline.checks`: frozen constants, the user's model, graph lint,
numerics, and any the caller adds); the first to object rolls the pass back, and
``strict=True`` raises :class:`~fxopt.PassFailedError` instead, naming the pass and the
passes run before it. A pass that raises or returns something other than a
:class:`~fxopt.PassResult` is rolled back the same way.

Everything else is an instrument (:mod:`fxopt.pipeline.instruments`): the report rows,
cost, timing, the rollback warning, dumps and progress. Passes contain none of it.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import InputError, PassFailedError
from fxopt.ir import copy_graph_module
from fxopt.lossy.retry import RETRY
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.phases import listening, phase
from fxopt.pipeline.checks import (
    Check,
    Numerics,
    Rejected,
    Unrecoverable,
    UserModelUntouched,
    default_checks,
)
from fxopt.pipeline.instruments import (
    CostDelta,
    PassInstrument,
    PassTiming,
    ReportRows,
    WarnOnRollback,
    user_stacklevel,
)
from fxopt.pipeline.step import PassStep
from fxopt.pipeline.verification import Verification, row_slices
from fxopt.registry import PassOrderWarning, order_violations
from fxopt.report import PassRecord
from fxopt.verify import ReusingRunner, run_graph, same_inputs

log = logging.getLogger("fxopt")



def reference_outputs(gm: fx.GraphModule, batches: list[list[torch.Tensor]], start: int = 0) -> list[list[Any]]:
    """The captured graph's outputs on every batch; export traces with fake tensors, so a
    mismatch it did not check (a dtype, say) surfaces here, as a clear error."""
    outputs = []
    for index, batch in enumerate(batches, start):
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


def _reference_reusing(gm: fx.GraphModule, batches: list[list[Any]], verification: Verification) -> list[list[Any]]:
    """:func:`reference_outputs`, taking the outputs of runs already made on the same inputs
    (the evidence store's pre-pipeline ``runs``, left by the fresh-input check) instead of
    running again."""
    known = verification.evidence.take_runs()  # the captured graph's: no later graph may take them
    outputs: list[list[Any]] = []
    for index, batch in enumerate(batches):
        reused = next((out for inputs, out in known if same_inputs(inputs, batch)), None)
        if reused is None:
            reused = reference_outputs(gm, [batch], start=index)[0]
            verification.forwards += 1
        outputs.append(reused)
    return outputs


class PassManager:
    """Runs ``passes`` over a graph, in the given order, checking each; see the module docstring.

    Args:
        passes: the pipeline. The order is the caller's: an order that breaks a pass's
            declared ``after`` warns (:class:`fxopt.registry.PassOrderWarning`) and runs as given.
        strict: raise :class:`~fxopt.PassFailedError` instead of rolling back.
        verify: compare outputs (the numerics check). Without it the graph is still linted
            and cleaned up after every pass.
        instruments: hooks around the pipeline and each pass, outside the built-in ones.
        checks: checks consulted after the built-in ones.
        max_rounds: run the pipeline again while some pass keeps changing the graph.
        user_model: the check guarding the user's model (``compile`` builds it with the
            frozen values that restore the model); it runs before the graph checks, so a
            model a pass touched is restored whatever else is wrong with the pass.
        watched_module: shorthand for ``user_model=UserModelUntouched(watched_module)``,
            which detects but cannot restore.
        verify_rows: verify exact passes on the first ``verify_rows`` rows of each batch
            (one more on a fresh batch) when the graph's batch is dynamic; None verifies
            every pass on every row. Lossy passes always see every row
            (:mod:`fxopt.pipeline.verification` says why this is sound).
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        strict: bool = False,
        verify: bool = True,
        instruments: Sequence[PassInstrument] = (),
        checks: Sequence[Check] = (),
        max_rounds: int = 1,
        user_model: Check | None = None,
        watched_module: torch.nn.Module | None = None,
        verify_rows: int | None = None,
    ) -> None:
        self.passes = list(passes)
        self.verify_rows = verify_rows
        self.verification: Verification | None = None
        self.strict = strict
        self.verify = verify
        self.max_rounds = max_rounds
        if user_model is None and watched_module is not None:
            user_model = UserModelUntouched(watched_module)
        self.checks: list[Check] = default_checks(verify=verify, user_model=user_model) + list(checks)
        self._rows = ReportRows()
        # The caller's instruments are outermost: they see each finished row (see instruments).
        self.instruments: list[PassInstrument] = [
            WarnOnRollback(), *instruments, self._rows, CostDelta(), PassTiming()
        ]
        _warn_about_order(self.passes)

    def run(self, gm: fx.GraphModule, ctx: PassContext,
            resume: Verification | None = None) -> tuple[fx.GraphModule, list[PassRecord]]:
        """Run the pipeline on ``gm``; returns the final graph and one report row per pass run.

        ``self.verification`` keeps the references afterwards: the final error
        (:meth:`Verification.final_error`) and the outputs a backend's parity check can reuse.
        ``resume`` continues from another run's references (``Verification.fork()`` of it;
        ``ctx`` is its ``ctx``): ``gm`` must be that run's final graph.
        """
        if resume is not None:
            verification = resume
        else:
            verification = self._start(gm, ctx)
        self.verification = verification
        for check in self.checks:
            if isinstance(check, Numerics):
                check.verification = verification
        try:
            return self._run(gm, ctx)
        finally:
            ctx.evidence.drop_values()  # node values kept for lossy passes: not held past the pipeline

    def _start(self, gm: fx.GraphModule, ctx: PassContext) -> Verification:
        with phase("reference"):
            slices = None
            if self.verify and self.verify_rows is not None:
                slices = row_slices(gm, ctx.batches, ctx.fresh_batches, self.verify_rows)
            if slices is not None:
                verification = Verification(gm, ctx, slices)
                try:
                    # The full reference waits until a lossy pass needs it: an exact-only
                    # pipeline never runs the full batches.
                    ctx.evidence.slice_reference = ctx.evidence.slice_original = _reference_reusing(
                        gm, slices, verification)
                    return verification
                except InputError:
                    log.debug("the captured graph does not run on row slices; verifying on every row")
            verification = Verification(gm, ctx, None)
            evidence = ctx.evidence
            if not evidence.reference:
                evidence.reference = reference_outputs(gm, ctx.batches)
                verification.forwards += len(ctx.batches)
            evidence.full_current = True
            if not evidence.original:
                evidence.original = list(evidence.reference)
        return verification

    def _run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, list[PassRecord]]:
        done: list[str] = []
        for instrument in self.instruments:
            instrument.enter(self.passes)
        try:
            for round_ in range(1, max(1, self.max_rounds) + 1):
                changed = False
                for segment in _exact_runs(self.passes):
                    gm, segment_changed = self._run_segment(segment, gm, ctx, done, round_)
                    changed |= segment_changed
                if not changed:
                    break
        finally:
            for instrument in self.instruments:
                instrument.exit()
        return gm, list(self._rows.records)

    def _run_segment(self, segment: list[tuple[int, Pass]], gm: fx.GraphModule, ctx: PassContext,
                     done: list[str], round_: int) -> tuple[fx.GraphModule, bool]:
        """Run consecutive passes; exact ones in a row are verified together once (see
        :class:`~fxopt.pipeline.checks.Numerics`), and one by one only when that fails."""
        numerics = next((c for c in self.checks if isinstance(c, Numerics)), None)
        together = (numerics is not None and self.verification is not None and len(segment) > 1
                    and all(pass_.exact for _, pass_ in segment))
        if not together:
            return self._run_passes(segment, gm, ctx, done, round_)
        start, rows, names = gm, len(self._rows.records), len(done)
        numerics.deferred = True
        try:
            gm, changed = self._run_passes(segment, gm, ctx, done, round_)
        finally:
            numerics.deferred = False
        if not changed or numerics.verify_together(start, gm, self._rows.records[rows:], ctx):
            return gm, changed
        # The rewrites together changed the outputs: run them again, each verified on its own,
        # so that the one at fault is rolled back (instruments see these passes twice).
        log.debug("exact passes %s verified together failed; verifying them one by one",
                  ", ".join(pass_.name for _, pass_ in segment))
        del self._rows.records[rows:]
        del done[names:]
        return self._run_passes(segment, start, ctx, done, round_)

    def _run_passes(self, segment: list[tuple[int, Pass]], gm: fx.GraphModule, ctx: PassContext,
                    done: list[str], round_: int) -> tuple[fx.GraphModule, bool]:
        changed = False
        for index, pass_ in segment:
            if not all(instrument.should_run(pass_, gm) for instrument in self.instruments):
                log.debug("pass %s skipped by an instrument", pass_.name)
                continue
            record = PassRecord(pass_.name, pass_.exact, "no change", budget=pass_.budget_or_none)
            step = PassStep(pass_, index, len(self.passes), round_, record)
            for instrument in self.instruments:
                instrument.before_pass(pass_, gm, step)

            def report(done_: int, total: int, what: str, pass_: Pass = pass_, step: PassStep = step) -> None:
                for instrument in self.instruments:
                    instrument.progress(pass_, step, done_, total, what)

            with listening(report):
                gm = self._run_one(step, gm, ctx, done)
            for instrument in reversed(self.instruments):
                instrument.after_pass(pass_, gm, step)
            done.append(pass_.name)
            changed |= record.status == "applied"
        return gm, changed

    def _run_one(self, step: PassStep, gm: fx.GraphModule, ctx: PassContext, done: list[str]) -> fx.GraphModule:
        """Copy, run, consult the checks; returns the graph to keep."""
        pass_ = step.pass_
        if not pass_.exact and self.verification is not None:
            evidence = ctx.evidence
            with phase("reference"):
                # a lossy pass measures against ctx.reference (and reuses the values kept)
                self.verification.ensure_full(gm, keep_values=True)
            if evidence.values is None:
                # The reference was current (a lossy pass before this one committed it) but no
                # values of this graph were kept: the search and the verification share one runner.
                evidence.values = ReusingRunner(max_bytes=evidence.values_bound(gm))
            kept = gm
            try:
                kept = self._run_checked(step, gm, ctx, done)
                kept = self._retry_within_budget(step, gm, kept, ctx, done)
                return kept
            finally:
                # The kept graph's values on the example (the verification's run of what the
                # pass committed) serve a lossy pass right after this one, which starts from
                # that graph; nothing else is held past the pass.
                runner = evidence.values
                evidence.values = runner.carried_over(kept) if isinstance(runner, ReusingRunner) else None
        ctx.evidence.drop_values()  # an exact pass changes the graph: values kept for a lossy one are stale
        return self._run_checked(step, gm, ctx, done)

    def _retry_within_budget(self, step: PassStep, gm: fx.GraphModule, kept: fx.GraphModule,
                             ctx: PassContext, done: list[str]) -> fx.GraphModule:
        """A lossy pass whose choice, made on the batches it fits on, went over its budget on
        the others (the fresh input, say) runs once more with a target tightened by what was
        measured, so that it backs off some of its rewrites instead of losing them all; the
        verification still holds it to the budget it was given."""
        numerics = next((c for c in self.checks if isinstance(c, Numerics)), None)
        pass_ = step.pass_
        over = numerics.over_budget if numerics is not None else None
        if (step.record.status != "rolled back" or over is None or self.strict
                or not dataclasses.is_dataclass(pass_) or not hasattr(pass_, "budget")):
            return kept
        error, budget, example_error = over
        # The choice was made on batches like the example inputs: aim lower by as much as the
        # others measured worse than those (the one retry policy, fxopt.lossy.retry).
        target = RETRY.after_unseen(budget, error, example_error)
        if not target > 0.0:
            return kept
        first = step.record.message
        step.pass_ = dataclasses.replace(pass_, budget=target)
        step.record.status, step.record.message, step.result = "no change", "", None
        try:
            kept = self._run_checked(step, gm, ctx, done)
        finally:
            step.pass_ = pass_
        retried = f"the first choice went over ({first}); chosen again within {target:.3g}"
        step.record.message = retried + (f"; {step.record.message}" if step.record.message else "")
        return kept

    def _run_checked(self, step: PassStep, gm: fx.GraphModule, ctx: PassContext, done: list[str]) -> fx.GraphModule:
        pass_ = step.pass_
        for check in self.checks:
            check.before(gm, ctx)
        with phase("copy"):
            working = copy_graph_module(gm)
        try:
            failure = self._call(pass_, working, ctx, step)
            # Checks run even after the pass failed: they restore what it may have touched.
            objection = self._consult(step, working, gm, ctx)
        except Unrecoverable as damage:
            raise PassFailedError(pass_.name, str(damage), done) from damage
        rejected = failure or objection
        if rejected is not None:
            step.record.status = "rolled back"
            step.record.message = str(rejected)
            if self.strict:
                raise PassFailedError(pass_.name, str(rejected), done) from rejected.__cause__
            return gm
        if not step.modified:
            return gm
        for check in self.checks:
            check.commit(working, ctx)
        if not self.verify and self.verification is not None:
            self.verification.commit(pass_.exact, None)
        step.record.status = "applied"
        return working

    @staticmethod
    def _call(pass_: Pass, working: fx.GraphModule, ctx: PassContext, step: PassStep) -> Rejected | None:
        try:
            with phase(f"pass:{pass_.name}"):
                result = pass_(working, ctx)
        except Exception as exc:
            log.debug("pass %s raised", pass_.name, exc_info=True)
            rejected = Rejected(f"raised {type(exc).__name__}: {exc}")
            rejected.__cause__ = exc
            return rejected
        if not isinstance(result, PassResult):
            return Rejected(f"returned {type(result).__name__} instead of a PassResult")
        step.result = result
        return None

    def _consult(self, step: PassStep, working: fx.GraphModule, previous: fx.GraphModule,
                 ctx: PassContext) -> Rejected | None:
        """The first check's objection to ``working``, or None when all accept it."""
        for check in self.checks:
            try:
                reason = check.after(step, working, previous, ctx)
            except Rejected as rejected:
                return rejected
            if reason is not None:
                return Rejected(reason)
        return None


def _exact_runs(passes: Sequence[Pass]) -> list[list[tuple[int, Pass]]]:
    """The pipeline cut into segments: each run of consecutive exact passes is one, each
    lossy pass one of its own; items are (1-based position, pass)."""
    segments: list[list[tuple[int, Pass]]] = []
    for index, pass_ in enumerate(passes, 1):
        if pass_.exact and segments and segments[-1][-1][1].exact:
            segments[-1].append((index, pass_))
        else:
            segments.append([(index, pass_)])
    return segments


def _warn_about_order(passes: Sequence[Pass]) -> None:
    for problem in order_violations(passes):
        warnings.warn(f"fxopt: {problem}; running the passes in the order given",
                      PassOrderWarning, stacklevel=user_stacklevel())
