"""Helpers for pass authors: run one pass on a small module and assert what it did.

    run = fxopt.testing.run_pass("fold-batchnorm", model, (x,))
    assert run.count(ops.batch_norm) == 0
    run.assert_outputs_match()
    fxopt.testing.assert_skipped(run, code="bn-training")
    fxopt.testing.assert_idempotent("fold-batchnorm", model, (x,))

``run_pass`` goes through the real pass manager, so the rewrite is verified exactly as in
``fxopt.compile`` (``strict=True`` by default: a failed check raises).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.capture import capture, normalize_example_inputs
from fxopt.ir import count_ops, op_histogram
from fxopt.pass_api import Pass, Skip
from fxopt.registry import resolve_passes
from fxopt.report import PassRecord, Report
from fxopt.session import Session, SessionOptions
from fxopt.verify import compare_outputs, exact_tolerance, module_fingerprint, run_graph

__all__ = ["PassRun", "assert_idempotent", "assert_outputs_close", "assert_skipped", "count_ops",
           "op_histogram", "run_pass"]


@dataclass
class PassRun:
    """One pass applied to a captured module: the graphs before and after, and the record."""

    before: fx.GraphModule
    after: fx.GraphModule
    record: PassRecord
    batches: list[list[torch.Tensor]]
    model: torch.nn.Module

    @property
    def modified(self) -> bool:
        return self.record.status == "applied"

    def count(self, *ops: Any) -> int:
        """How many calls to ``ops`` the rewritten graph has."""
        return count_ops(self.after, *ops)

    def count_before(self, *ops: Any) -> int:
        return count_ops(self.before, *ops)

    def outputs(self, inputs: Sequence[torch.Tensor] | None = None) -> list[Any]:
        return run_graph(self.after, list(inputs) if inputs is not None else self.batches[0])

    def assert_outputs_match(self, rtol: float | None = None, inputs: Sequence[torch.Tensor] | None = None) -> float:
        """Assert the rewritten graph matches the original eager model; returns the relative error."""
        batch = list(inputs) if inputs is not None else self.batches[0]
        with torch.no_grad():
            expected = self.model(*batch)
        expected_flat = pytree.tree_leaves(expected)  # tuples, dicts, transformers ModelOutputs
        return assert_outputs_close(self.outputs(batch), expected_flat, rtol)


def run_pass(
    pass_: str | Pass,
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    calibration: Iterable[Any] | None = None,
    strict: bool = True,
) -> PassRun:
    """Capture ``model`` (which must be in eval mode), run one pass through the manager."""
    args = normalize_example_inputs(example_inputs)
    fingerprint = module_fingerprint(model)
    before = capture(model, args)
    batches = [list(args)] + [list(normalize_example_inputs(b)) for b in (calibration or [])]
    (pass_obj,) = resolve_passes([pass_])
    from fxopt.ir import copy_graph_module

    session = Session.from_graph(copy_graph_module(before), batches, Report(), options=SessionOptions(strict=strict))
    stage = session.run([pass_obj])
    assert module_fingerprint(model) == fingerprint, "the pass modified the user's model"
    return PassRun(before, stage.gm, stage.records[0], batches, model)


def compile_captured(gm: fx.GraphModule, batches: list[list[torch.Tensor]], pipeline: Sequence[Pass], *,
                     fresh_batches: int = 0, verify_rows: int | None = 2, memory_bound: int | None = None,
                     backend: str = "eager") -> Any:
    """``pipeline`` on an already captured graph (``batches``: its flat inputs, the example
    first, the last ``fresh_batches`` for verification only), lowered to ``backend``: one
    session's run and lower, as ``fxopt.compile`` does after capture."""
    options = SessionOptions(verify_rows=verify_rows)
    if memory_bound is not None:
        options.memory_bound = memory_bound
    session = Session.from_graph(gm, batches, Report(), options=options, fresh_batches=fresh_batches)
    return session.compile(list(pipeline), backend)


def assert_outputs_close(actual: Sequence[Any], expected: Sequence[Any], rtol: float | None = None) -> float:
    """Assert two flat output lists agree (default: the dtype's exact tolerance)."""
    comparison = compare_outputs(list(expected), list(actual))
    assert comparison.mismatch is None, comparison.mismatch
    limit = exact_tolerance(comparison.worst_dtype) if rtol is None else rtol
    assert comparison.max_rel <= limit, f"max relative error {comparison.max_rel:.3g} > {limit:g}"
    return comparison.max_rel


def assert_skipped(run: PassRun, reason: str | None = None, *, code: str | None = None,
                   node: str | None = None) -> None:
    """Assert the pass left some node alone (``node`` if given) with refusal ``code`` and a
    detail containing ``reason``. A ``reason`` alone also matches a skip whose code it is,
    so ``assert_skipped(run, "shared-constant")`` works too."""
    assert reason is not None or code is not None, "give a refusal code, a reason, or both"

    def fits(skip: Skip) -> bool:
        if code is not None and skip.code != code:
            return False
        if reason is not None and reason not in skip.detail and (code is not None or reason != skip.code):
            return False
        return node is None or skip.node == node

    skips = run.record.skips
    wanted = " and ".join(part for part in (code and f"code {code!r}", reason and f"reason containing {reason!r}")
                          if part)
    assert any(fits(s) for s in skips), (
        f"no skip with {wanted}; skips were: {[(s.node, s.code, s.detail) for s in skips]}")


def assert_idempotent(pass_: str | Pass, model: torch.nn.Module, example_inputs: Any) -> None:
    """Running the pass a second time on its own output changes nothing."""
    first = run_pass(pass_, model, example_inputs)
    (pass_obj,) = resolve_passes([pass_])
    stage = Session.from_graph(first.after, first.batches, Report(), options=SessionOptions(strict=True)).run([pass_obj])
    again, records = stage.gm, stage.records
    assert records[0].status == "no change", (
        f"second run of {pass_obj.name} changed the graph again (applied {records[0].applied})"
    )
    assert op_histogram(again) == op_histogram(first.after)
