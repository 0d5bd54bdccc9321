"""Pass instruments: code that watches the pipeline without being part of a pass.

The hooks follow TVM's pass instruments. For one ``PassManager.run``:

    enter(passes)
    for each pass:  should_run(pass_, gm)   -- any False: the pass is skipped, no other hook
                    before_pass(pass_, gm, step)
                    ... the pass runs (progress(pass_, step, done, total, what) as it reports
                        its sites or blocks through fxopt.phases.progress), the checks are
                        consulted, commit or roll back ...
                    after_pass(pass_, gm, step)   -- gm is the graph kept
    exit()          -- also when a pass raises under strict mode

``before_pass`` runs in list order and ``after_pass`` in reverse, so instruments nest like
context managers. The manager puts its own instruments innermost, in this order: the
report row, cost, timing; an instrument the caller adds therefore sees the finished row
(``step.record``: status, counts, cost, errors, seconds) in ``after_pass``, and its own
work is not part of the pass's time.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.fx as fx

from fxopt.cost import graph_cost
from fxopt.pass_api import Pass
from fxopt.pipeline.step import PassStep
from fxopt.report import PassRecord


class PassInstrument:
    """Base class of instruments; every hook does nothing by default."""

    def enter(self, passes: Sequence[Pass]) -> None:
        """The pipeline starts; ``passes`` is one round, in order."""

    def exit(self) -> None:
        """The pipeline ended (normally or not)."""

    def should_run(self, pass_: Pass, gm: fx.GraphModule) -> bool:
        """False skips the pass: it does not run and gets no report row."""
        return True

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        """``pass_`` is about to run on a copy of ``gm``."""

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        """``pass_`` ran; ``gm`` is the graph the manager kept (the previous one after a
        rollback or no change)."""

    def progress(self, pass_: Pass, step: PassStep, done: int, total: int, what: str) -> None:
        """``pass_`` finished ``done`` of ``total`` units of ``what`` (sites, blocks)."""


class ReportRows(PassInstrument):
    """Builds the report's rows: what each pass matched, applied and skipped, and why."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []

    def enter(self, passes: Sequence[Pass]) -> None:
        self.records = []

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        record, result = step.record, step.result
        if result is not None:
            record.matched, record.applied = result.matched, result.applied
            record.skipped = result.reasons()
            record.skips = list(result.skipped)
            record.take_details(result.details)
        self.records.append(record)


class CostDelta(PassInstrument):
    """Params, FLOPs and weight bytes before and after each pass."""

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        step.record.before = step.record.after = graph_cost(gm)

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        if step.record.status == "applied":
            step.record.after = graph_cost(gm)


class PassTiming(PassInstrument):
    """Wall time of each pass, its copy and its checks (``record.seconds``)."""

    def __init__(self) -> None:
        self._start = 0.0

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        self._start = time.perf_counter()

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        step.record.seconds = time.perf_counter() - self._start


class WarnOnRollback(PassInstrument):
    """A ``UserWarning`` for each pass rolled back (strict mode raises instead)."""

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        if step.record.rolled_back:
            warnings.warn(f"fxopt: pass '{pass_.name}' rolled back: {step.record.message}",
                          stacklevel=user_stacklevel())


class DumpGraphs(PassInstrument):
    """Write the graph before and after each pass as text files in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._step = 0

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._step += 1
        (self.directory / f"{self._step:02d}-{pass_.name}-before.txt").write_text(str(gm.graph))

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        (self.directory / f"{self._step:02d}-{pass_.name}-after.txt").write_text(
            f"# status: {step.record.status}\n{gm.graph}"
        )


class PrintProgress(PassInstrument):
    """Lines on stderr for long runs: one as each pass starts and ends, and the pass's own
    progress (sites, blocks) with an estimate of the time left, at most every ``every``
    seconds. Nothing is printed until ``delay`` seconds after ``since`` (a ``time.perf_counter()``
    value; default: when the pipeline starts), so a compile that stays short stays quiet
    (``fxopt.compile`` adds one with a delay from the compile's start unless told not to).
    """

    def __init__(self, stream: Any = None, delay: float = 0.0, every: float = 5.0,
                 since: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.delay, self.every, self.since = delay, every, since
        self._start = self._printed = 0.0
        self._announced: PassStep | None = None
        # the work being counted now (a pass's sites, then its blocks...): when it began, and
        # when the last report of any came (where the next count begins)
        self._stage: tuple[PassStep, str] | None = None
        self._stage_start = self._last_report = 0.0

    def enter(self, passes: Sequence[Pass]) -> None:
        self._start = time.perf_counter() if self.since is None else self.since

    def _say(self, message: str) -> None:
        print(f"[fxopt] {message}", file=self.stream, flush=True)
        self._printed = time.perf_counter()

    def _announce(self, step: PassStep) -> bool:
        """Whether to print now (past the delay); the pass's start line first, once."""
        if time.perf_counter() - self._start < self.delay:
            return False
        if self._announced is not step:
            self._announced = step
            self._say(f"pass {step.index}/{step.total}: {step.pass_.describe()} ...")
        return True

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        self._last_report = time.perf_counter()
        self._announce(step)

    def progress(self, pass_: Pass, step: PassStep, done: int, total: int, what: str) -> None:
        now = time.perf_counter()
        if self._stage != (step, what):
            self._stage, self._stage_start = (step, what), self._last_report
        self._last_report = now
        if done < total and now - self._printed < self.every or not self._announce(step):
            return
        elapsed = now - self._stage_start
        left = f", about {_duration(elapsed / done * (total - done))} left" if 0 < done < total else ""
        self._say(f"  {pass_.name}: {done}/{total} {what}, {_duration(elapsed)}{left}")

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, step: PassStep) -> None:
        if self._announced is not step and not self._announce(step):
            return
        record = step.record
        self._say(f"  {record.status}: applied {record.applied}, skipped "
                  f"{sum(record.skipped.values())}, {record.seconds:.2f}s")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f} min"


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised by the caller at the first frame
    outside fxopt (the user's call to ``fxopt.compile``, say)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("fxopt"):
        frame, level = frame.f_back, level + 1
    return level
