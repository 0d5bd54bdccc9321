"""Checks: what the manager consults before it keeps a pass's graph.

A check snapshots what it guards before a pass runs (``before``) and judges the pass's
working graph afterwards (``after``): it returns a reason to reject the graph, or None.
A rejected pass is rolled back. A check that needs to keep an exception's traceback raises
:class:`Rejected` instead of returning the reason, and one that finds damage rollback
cannot undo raises :class:`Unrecoverable` (the manager raises even without ``strict``).
``commit`` tells a check the graph it passed was kept.

Checks run in order, and every check sees the working graph as the previous checks left
it: :class:`GraphLint` cleans the graph up and re-propagates shapes before
:class:`Numerics` runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.fx as fx

from fxopt.ir import cleanup, constants, copy_graph_module, propagate_shapes
from fxopt.pass_api import PassContext
from fxopt.phases import phase
from fxopt.pipeline.step import PassStep
from fxopt.pipeline.verification import Verification
from fxopt.verify import compare_outputs, exact_tolerance, lint, module_fingerprint, run_graph


class Rejected(Exception):
    """A check refuses the pass's graph; the message is the report's reason."""


class Unrecoverable(Exception):
    """The pass did damage that dropping its working copy cannot undo."""


@runtime_checkable
class Check(Protocol):
    """What the manager asks of a check. Subclass :class:`BaseCheck` for no-op defaults."""

    def before(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Snapshot what this check guards; ``gm`` is the graph the pass will get a copy of."""

    def after(self, step: PassStep, working: fx.GraphModule, previous: fx.GraphModule,
              ctx: PassContext) -> str | None:
        """Why ``working`` (the pass's output) must be rolled back, or None to accept it.

        ``step.result`` is the pass's :class:`~fxopt.PassResult`; ``step.record`` is its
        report row, where a check writes what it measured.
        """

    def commit(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """The graph this check accepted is now the current graph."""


class BaseCheck:
    """A check that accepts everything; subclasses override what they need."""

    def before(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        pass

    def after(self, step: PassStep, working: fx.GraphModule, previous: fx.GraphModule,
              ctx: PassContext) -> str | None:
        return None

    def commit(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        pass


class FrozenConstantsUntouched(BaseCheck):
    """No constant was written in place: the previous graph shares these tensors, so a pass
    that writes one has damaged the graph rollback would return to."""

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []
        self._versions: list[int] = []

    def before(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self._tensors = [tensor for _, tensor in constants(gm)]
        self._versions = [tensor._version for tensor in self._tensors]

    def after(self, step: PassStep, working: fx.GraphModule, previous: fx.GraphModule,
              ctx: PassContext) -> str | None:
        if [tensor._version for tensor in self._tensors] != self._versions:
            raise Unrecoverable("modified a frozen constant in place; passes must add new constants instead "
                                "(the graph's constants are the model's own weights unless compiled with "
                                "share_weights=False: the model's weights were changed too)")
        return None


class UserModelUntouched(BaseCheck):
    """The user's model is as it was (invariant 1): module tree, train/eval flags, tensors.

    ``sources`` maps the model's state names to fxopt's frozen copies of their values
    (``gm.meta["fxopt_sources"]`` after a capture with ``share_weights=False``); with them,
    a model a pass wrote to is restored before the pass is rolled back. ``baseline`` is the fingerprint to hold the
    model to (default: taken now); restoring writes values back, which moves tensor version
    counters, so the baseline is retaken after a restore.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sources: Mapping[str, torch.Tensor] | None = None,
        baseline: Any = None,
    ) -> None:
        self.model = model
        self.sources = dict(sources or {})
        self.baseline = baseline if baseline is not None else module_fingerprint(model)
        self._flags = [(module, module.training) for module in model.modules()]

    def after(self, step: PassStep, working: fx.GraphModule, previous: fx.GraphModule,
              ctx: PassContext) -> str | None:
        if module_fingerprint(self.model) == self.baseline:
            return None
        if not self.sources:
            return "modified the user's model"
        self.restore()
        return "modified the user's model (restored from fxopt's frozen copy)"

    def restore(self) -> None:
        for module, training in self._flags:
            module.training = training
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, frozen in self.sources.items():
                if name in state and state[name].shape == frozen.shape:
                    state[name].copy_(frozen)
        self.baseline = module_fingerprint(self.model)


class GraphLint(BaseCheck):
    """The graph is well formed: fx lint, no dangling attributes, one output. Then it is
    cleaned up (dead nodes, unused constants, regenerated code) and its shape metadata
    re-propagated, which are the first things a malformed graph trips over."""

    def after(self, step: PassStep, working: fx.GraphModule, previous: fx.GraphModule,
              ctx: PassContext) -> str | None:
        if not step.modified:
            return None
        with phase("lint"):
            reason = lint(working)
            if reason:
                return reason
            try:
                cleanup(working)
            except Exception as exc:
                raise Rejected(f"graph lint failed: {type(exc).__name__}: {exc}") from exc
        try:
            with phase("shapes"):
                # Only the nodes the pass created or rewired, and those downstream whose
                # inputs' shapes changed: the rest keep the metadata the previous graph had.
                propagate_shapes(working, incremental=True)
        except Exception as exc:
            raise Rejected(f"shape propagation failed: {type(exc).__name__}: {exc}") from exc
        return None


class Numerics(BaseCheck):
    """The new graph's outputs against the previous graph's.

    An exact pass must agree to the dtype's tolerance, or, failing that, err against a
    float64 evaluation no more than the previous graph does (:func:`rounding_verdict`); a
    lossy pass must stay inside its ``budget``. Writes max abs and relative error (and the
    rounding verdict) into the pass's report row; on commit the new outputs become the
    reference the next pass is compared with (``ctx.reference`` for the full batches).

    The batches are ``verification``'s (set by the manager): every row of every batch, or,
    for an exact pass when the manager verifies on row slices, the first rows of each (see
    :mod:`fxopt.pipeline.verification` for why that still verifies the rewrite).
    """

    def __init__(self) -> None:
        self._outputs: list[list[Any]] | None = None
        self._exact = True
        self.verification: Verification | None = None
        # Set by the manager while it runs exact passes in a row: they are verified together
        # afterwards (verify_together), each on its own only if that fails.
        self.deferred = False
        # (error, budget, error on the example inputs) when the last lossy pass checked went
        # over its budget
        self.over_budget: tuple[float, float, float] | None = None

    def after(self, step: PassStep, working: fx.GraphModule, previous: fx.GraphModule,
              ctx: PassContext) -> str | None:
        self._outputs = None
        self.over_budget = None
        if not step.modified or (self.deferred and step.pass_.exact):
            return None
        with phase("verify"):
            return self._verify(step, working, previous, ctx)

    def verify_together(self, start: fx.GraphModule, final: fx.GraphModule, records: list[Any],
                        ctx: PassContext) -> bool:
        """Whether ``final`` (``start`` after exact passes run without their own check) agrees
        with ``start`` to float rounding; if so it becomes the reference and each applied
        pass's row holds the error of the rewrites together. An exact rewrite claims the same
        function, so rewrites that together keep every output each kept it (errors cancelling
        across passes to within rounding is not a failure a rewrite makes); when they do not
        agree, the manager verifies each pass on its own to find the one at fault."""
        if self.verification is None:
            return False
        verification = self.verification
        with phase("verify"):
            batches = verification.batches_for(True)
            reference = verification.reference_for(start, True)
            try:
                worst, _, outputs = _run_and_compare(verification, final, batches, reference)
            except Exception:
                return False
        if worst is not None and (worst.mismatch or not worst.within(exact_tolerance(worst.worst_dtype))):
            return False
        applied = [record for record in records if record.status == "applied"]
        for record in applied:
            if worst is not None:
                record.max_abs_err, record.max_rel_err = worst.max_abs, worst.max_rel
            if len(applied) > 1 and not record.message:
                others = ", ".join(r.name for r in applied if r is not record)
                record.message = f"verified together with {others}"
        verification.commit(True, outputs)
        return True

    def _verify(self, step: PassStep, working: fx.GraphModule, previous: fx.GraphModule,
                ctx: PassContext) -> str | None:
        if self.verification is None or self.verification.ctx is not ctx:
            self.verification = Verification(previous, ctx, None)
        verification = self.verification
        pass_ = step.pass_
        self._exact = pass_.exact
        batches = verification.batches_for(pass_.exact)
        reference = verification.reference_for(previous, pass_.exact)
        # The previous graph's values on the example inputs (kept by the reference run before
        # a lossy pass): nodes the pass left as they were are not computed again.
        values = ctx.values if not pass_.exact else None
        try:
            worst, example_error, outputs = _run_and_compare(verification, working, batches, reference, values)
        except Exception as exc:
            raise Rejected(f"the rewritten graph failed to run: {type(exc).__name__}: {exc}") from exc
        if worst is None:  # no batches: nothing to compare
            return None
        record = step.record
        record.max_abs_err, record.max_rel_err = worst.max_abs, worst.max_rel
        if worst.mismatch:
            return worst.mismatch
        if pass_.exact:
            limit = exact_tolerance(worst.worst_dtype)
            if not worst.within(limit):
                verdict = rounding_verdict(previous, working, batches, reference, outputs)
                if verdict is None:
                    return f"exact pass changed outputs: max rel error {worst.max_rel:.3g} > {limit:g}"
                record.message = verdict
        else:
            # the budget the pass was asked for (a retry runs it with a tighter target of its own)
            budget = record.budget if record.budget is not None else (pass_.budget_or_none or 0.0)
            if worst.max_rel > budget:
                self.over_budget = (worst.max_rel, budget, example_error)
                return f"error {worst.max_rel:.3g} exceeds the pass's budget {budget:g}"
        self._outputs = outputs
        return None

    def commit(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if self._outputs is not None and self.verification is not None:
            self.verification.commit(self._exact, self._outputs)
        self._outputs = None


def _run_and_compare(verification: Verification, gm: fx.GraphModule, batches: list[list[Any]],
                     reference: list[list[Any]], values: Any = None) -> tuple[Any, float, list[list[Any]]]:
    """Run ``gm`` on each batch (through ``values``, a ReusingRunner, when given: every batch
    but the fresh ones, whose values no pass observes, and those too where it kept values to
    reuse) and compare with ``reference``: the worst comparison (None without batches), the
    relative error on the first batch (the example inputs, which every pass chooses on) and
    the outputs. An exception from running the graph propagates."""
    outputs: list[list[Any]] = []
    worst = None
    example_error = 0.0
    for index, (inputs, expected) in enumerate(zip(batches, reference)):
        if values is not None and (index < len(batches) - verification.ctx.fresh_batches or values.has(index)):
            verification.forwards += 1
            actual = values.run(gm, list(inputs), index)
        else:
            actual = verification.run(gm, [inputs])[0]
        comparison = compare_outputs(expected, actual)
        if index == 0:
            example_error = comparison.max_rel
        worst = comparison if worst is None else worst.merge(comparison)
        outputs.append(actual)
    return worst, example_error, outputs


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


def default_checks(*, verify: bool = True, user_model: Check | None = None) -> list[Check]:
    """The built-in checks, in the order they run: frozen constants, the user's model (when
    given), graph lint, and numerics (unless ``verify`` is False: lint and cleanup still run,
    so the graph stays well formed and the backends see no dead nodes)."""
    checks: list[Check] = [FrozenConstantsUntouched()]
    if user_model is not None:
        checks.append(user_model)
    checks.append(GraphLint())
    if verify:
        checks.append(Numerics())
    return checks
