"""One compilation, one owner: the Session.

Every entry point (``fxopt.compile``, presets, ``fxopt.tune``, the ``torch.compile``
frontend, ``fxopt.testing``) makes a :class:`Session` and asks it to ``run`` a pipeline and
``lower`` the result::

    session = Session(model, example_inputs, SessionOptions(calibration=batches))
    stage = session.run(resolve_passes(["remove-dropout", "quantize-int8"]))
    opt = session.lower(stage, "eager")

The session owns capture (once, however many pipelines run), the eval() copy of a model in
training mode, the guard on the user's model, the task budget, the fresh input, and the
compilation's one evidence store (:class:`fxopt.evidence.Evidence`). It is the only place in
the core that builds a :class:`~fxopt.PassManager` or a :class:`~fxopt.PassContext`.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxopt.capture import BATCH, Signature, capture, split_example_inputs
from fxopt.cost import graph_cost
from fxopt.errors import FxoptError, InputError
from fxopt.evidence import Evidence
from fxopt.inputs import (
    calibration_batches,
    check_keywords,
    device_of,
    distinct_calibration,
    fresh_batch,
    inference_copy,
)
from fxopt.ir import copy_graph_module
from fxopt.ir.derived import collect_let_go
from fxopt.lowering.base import holding_weights_once
from fxopt.module import OptimizedModule
from fxopt.pass_api import Pass, PassContext
from fxopt.phases import phase
from fxopt.pipeline import PassInstrument, PassManager, PrintProgress, UserModelUntouched
from fxopt.pipeline.timings import KernelTimings, current, measuring, never_slower
from fxopt.pipeline.verification import DEFAULT_VERIFY_ROWS, Verification
from fxopt.report import PassRecord, Report
from fxopt.verify import module_fingerprint

# A compile running longer than this reports its passes' progress on stderr (SessionOptions.progress).
LONG_COMPILE_SECONDS = 20.0


@dataclass
class SessionOptions:
    """How a session captures and verifies (``fxopt.compile``'s arguments of the same names)."""

    example_kwargs: Mapping[str, Any] | None = None
    calibration: Iterable[Any] | None = None
    dynamic_shapes: Any = None
    fresh_inputs: bool = True
    strict: bool = False
    instruments: Sequence[PassInstrument] = ()
    max_rounds: int = 1
    metric: Any = None
    data: Any = None
    max_drop: float | None = None
    confidence: float | None = 0.95
    agreement_data: Any = None
    verify_rows: int | None = DEFAULT_VERIFY_ROWS
    share_weights: bool = True  # the graph's unchanged constants are the model's tensors
    measure: bool = True  # kernel choices and the final graph timed on this machine (else the cache decides)
    # the most bytes of node values the evidence store keeps for a lossy pass (None: a share of
    # the model's weights, fxopt.evidence.Evidence.values_bound)
    memory_bound: int | None = None
    progress: bool | None = None  # stderr lines: None after LONG_COMPILE_SECONDS, True always, False never


@dataclass
class Captured:
    """The captured graph and the batches every pipeline of the session verifies on."""

    gm: fx.GraphModule
    batches: list[list[torch.Tensor]]
    report: Report
    user_model: UserModelUntouched | None
    fresh_batches: int = 0
    task: Any = None

    @property
    def signature(self) -> Signature:
        return self.gm.meta["fxopt_signature"]


@dataclass
class Stage:
    """A pipeline's result: its final graph, a report row per pass run, and the verification
    that holds what was measured of it (None when no pass ran)."""

    gm: fx.GraphModule
    records: list[PassRecord] = field(default_factory=list)
    verification: Verification | None = None


class Session:
    """One compilation of ``model`` on ``example_inputs``; see the module docstring."""

    def __init__(self, model: torch.nn.Module, example_inputs: Any, options: SessionOptions | None = None,
                 backend: str = "eager") -> None:
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.example_inputs = model, example_inputs
        self.options = options or SessionOptions()
        self.backend = backend
        self.fingerprint = module_fingerprint(model)
        self.started = time.perf_counter()  # a long compile reports its progress (SessionOptions.progress)
        self.evidence = Evidence(memory_bound=self.options.memory_bound, timings=kernel_timings(self.options.measure))
        self._captured: Captured | None = None
        self._capture_error: FxoptError | None = None
        # pipeline prefix -> its stage, for run(..., share_prefix=True)
        self._stages: dict[tuple[Pass, ...], Stage] = {}

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, batches: list[list[torch.Tensor]], report: Report, *,
                   options: SessionOptions | None = None, user_model: UserModelUntouched | None = None,
                   fresh_batches: int = 0, task: Any = None,
                   reference: list[list[Any]] | None = None) -> Session:
        """A session on an already captured graph (the ``torch.compile`` frontend, the tuner,
        the test kit): ``batches`` are its flat inputs, the example first; ``reference``, when
        known, the graph's outputs on them."""
        session = cls.__new__(cls)
        session.model, session.example_inputs = None, None
        session.options = options or SessionOptions(verify_rows=None)
        session.backend = report.backend
        session.fingerprint = None
        session.started = time.perf_counter()
        session.evidence = Evidence(reference=list(reference or []), memory_bound=session.options.memory_bound,
                                    timings=kernel_timings(session.options.measure))
        session._captured = Captured(gm, batches, report, user_model, fresh_batches, task)
        session._capture_error = None
        session._stages = {}
        return session

    # ------------------------------------------------------------------ capture

    @property
    def captured(self) -> Captured:
        """The captured graph and its batches, made on first use (a failure is kept and raised again)."""
        if self._capture_error is not None:
            raise self._capture_error
        if self._captured is None:
            try:
                self._captured = self._capture()
            except FxoptError as exc:
                self._capture_error = exc
                raise
        return self._captured

    def _capture(self) -> Captured:
        options = self.options
        args, kwargs = split_example_inputs(self.example_inputs, options.example_kwargs)
        if isinstance(self.example_inputs, Mapping):
            check_keywords(self.model, kwargs)
        report = Report(model=type(self.model).__name__, backend=self.backend)
        source = inference_copy(self.model, report)
        start = time.perf_counter()
        with phase("capture"):
            dynamic = BATCH if options.dynamic_shapes is None else options.dynamic_shapes
            gm = capture(source, args, kwargs, dynamic_shapes=dynamic, share_weights=options.share_weights)
        report.capture_seconds = time.perf_counter() - start
        report.notes.extend(gm.meta.pop("fxopt_notes", []))
        signature: Signature = gm.meta["fxopt_signature"]
        batches = [signature.flatten(args, kwargs, what="example input")]
        batches += distinct_calibration(batches[0], calibration_batches(signature, options.calibration), report)
        fresh = None
        if options.fresh_inputs:
            with phase("reference"):
                fresh, runs = fresh_batch(gm, batches[0], report)
            self.evidence.runs.extend(runs)
        if fresh is not None:
            batches.append(fresh)
        user_model = UserModelUntouched(self.model, gm.meta.get("fxopt_sources", {}), baseline=self.fingerprint)
        task = task_budget(gm, options.metric, options.data, options.max_drop, options.confidence,
                           options.agreement_data)
        if task is not None:
            report.notes.extend(filter(None, [task.unsupported()]))
        return Captured(gm, batches, report, user_model, int(fresh is not None), task)

    # ------------------------------------------------------------------ run

    def run(self, pipeline: Sequence[Pass], *, share_prefix: bool = False) -> Stage:
        """Run ``pipeline`` on the captured graph (which stays as it was). ``share_prefix``:
        reuse, and keep for later runs, the stage of the pipeline's exact prefix and of the
        longest prefix an earlier run ran (a preset's candidates); the pass manager works on
        copies, so each run continues from a shared graph with its own references."""
        captured = self.captured
        pipeline = tuple(pipeline)
        if not share_prefix or self.options.max_rounds > 1:  # rounds span the whole pipeline
            return self._run_from(Stage(captured.gm), pipeline)
        exact = 0
        while exact < len(pipeline) and pipeline[exact].exact:
            exact += 1
        # From the longest prefix a run reached, each lossy pass (with the exact ones before it)
        # ends a stage of its own: a pipeline that adds exact passes after another's lossy one
        # (merge-siblings after quantize-int8) continues from that one's search. The exact
        # prefix runs only where no longer stage is kept (a kept search's exact prefix may
        # have gone: running it again would cost a whole model's reference run for nothing).
        done = max((n for n in range(exact, len(pipeline) + 1) if pipeline[:n] in self._stages), default=exact)
        stage = self._shared_stage(pipeline[:done], 0)
        for end in range(done + 1, len(pipeline) + 1):
            if not pipeline[end - 1].exact or end == len(pipeline):
                stage, done = self._shared_stage(pipeline[:end], done), end
        return stage

    def keep_stages_for(self, pipelines: Iterable[Sequence[Pass]], ran: Iterable[Sequence[Pass]] = ()) -> None:
        """Drop the shared stages that none of ``pipelines`` (those still to run: a preset's
        candidates not built yet) starts with and that are not the end of one of ``ran`` (whose
        stages are wanted whole, not their prefixes), so that their graphs' new weights go now."""
        wanted, whole = [tuple(p) for p in pipelines], {tuple(p) for p in ran}
        unwanted = [key for key in self._stages if key not in whole and not any(p[:len(key)] == key for p in wanted)]
        for key in unwanted:
            del self._stages[key]
        if unwanted:
            collect_let_go()  # a graph module refers to itself: its weights would wait for a collection

    def _shared_stage(self, key: tuple[Pass, ...], start: int) -> Stage:
        if key in self._stages:
            return self._stages[key]
        if not key:
            return Stage(self.captured.gm)
        base = self._shared_stage(key[:start], 0) if start else Stage(self.captured.gm)
        self._stages[key] = self._run_from(base, key[start:])
        return self._stages[key]

    def _run_from(self, start: Stage, passes: tuple[Pass, ...]) -> Stage:
        """``passes`` after ``start`` (the captured graph, or a stage another run reached)."""
        if not passes:
            return start
        captured, options = self.captured, self.options
        instruments = list(options.instruments)
        if options.progress is not False and not any(isinstance(i, PrintProgress) for i in instruments):
            instruments.append(PrintProgress(delay=0.0 if options.progress else LONG_COMPILE_SECONDS,
                                             since=self.started))
        manager = PassManager(list(passes), strict=options.strict, instruments=instruments,
                              max_rounds=options.max_rounds, user_model=captured.user_model,
                              verify_rows=options.verify_rows)
        resume = start.verification.fork() if start.verification is not None else None
        if resume is not None:
            ctx = resume.ctx
        else:
            observable = len(captured.batches) - captured.fresh_batches
            ctx = PassContext(batches=captured.batches, calibrated=observable > 1,
                              fresh_batches=captured.fresh_batches, task=captured.task,
                              evidence=self.evidence.fork())
        gm, records = manager.run(start.gm, ctx, resume=resume)
        return Stage(gm, list(start.records) + list(records), manager.verification)

    # ------------------------------------------------------------------ lower

    def lower(self, stage: Stage, backend: str, device: str | torch.device | None = None,
              pipeline: Sequence[Pass] = (), *, owned: bool = False) -> OptimizedModule:
        """The report's error and cost columns, then ``stage``'s graph (a copy: stages are
        shared) lowered to ``backend`` and wrapped in an :class:`~fxopt.OptimizedModule`.
        ``owned``: nothing else will use ``stage`` (a plain compile's): it is pointed at the
        lowering's copy, so that its graph's new weights go as the lowering lets them go, even
        where the calling frame keeps the stage alive."""
        from fxopt.backends import lower

        captured = self.captured
        report = copy.deepcopy(captured.report)
        report.backend = backend
        if len(captured.batches) - captured.fresh_batches == 1 and not all(p.exact for p in pipeline):
            report.notes.append("no calibration data given: lossy passes were measured on the example inputs only")
        with phase("cost"):
            report.original = graph_cost(captured.gm)
        report.passes = [copy.deepcopy(r) for r in stage.records]
        gm = copy_graph_module(stage.gm)  # the lowered module owns its graph
        gm.meta.pop("fxopt_sources", None)  # lets the original weights go once nothing can need them
        verification = stage.verification.fork() if stage.verification is not None else None
        parity = None
        if verification is not None:
            with phase("verify"):
                # stage.gm: the same graph, whose outputs may be known (a preset's stand-in measured them)
                report.final_max_abs_err, report.final_max_rel_err = verification.final_error(stage.gm)
            if verification.slices is not None and report.passes:
                rows = sorted({int(b[0].shape[0]) for b in verification.slices if b and hasattr(b[0], "shape")})
                report.notes.append(f"exact passes were verified on the first {'/'.join(map(str, rows))} "
                                    "rows of each input (the batch is dynamic); lossy passes on every row")
            parity = verification.parity()
        # Nothing below needs the stage: where the caller does not keep it either (a plain
        # compile), the pipeline's new weights go as soon as the lowering drops its copy's
        # (a backend that owns its weights, once it has exported them). A caller's argument may
        # outlive this frame's reference (an interpreter hook such as torch.compile's frame
        # evaluation keeps the calling frame's arguments): an owned stage lets go of its graph.
        if owned:
            stage.gm = gm
        del stage
        with phase("cost"):
            report.final = graph_cost(gm)
        target = torch.device(device) if device is not None else device_of(captured.batches[0])
        report.device = str(target)
        start = time.perf_counter()
        with phase("lowering"), measuring(self.evidence.timings), \
                holding_weights_once(self.evidence.past_memory_bound(captured.gm)):
            runner = lower(backend, gm, captured.signature, captured.batches[0], target, report, parity)
        report.lower_seconds = time.perf_counter() - start
        return OptimizedModule(runner.graph_module, captured.signature, report, runner.run, target, runner.packed)

    def compile(self, pipeline: Sequence[Pass], backend: str, device: str | torch.device | None = None, *,
                share_prefix: bool = False, keep_for: Iterable[Sequence[Pass]] | None = None) -> OptimizedModule:
        """:meth:`run` then :meth:`lower`, a candidate's rollbacks reported and not warned
        about when prefixes are shared (a preset's candidates). ``keep_for``: the pipelines
        still to run after this one; once this one's passes ran, the shared stages none of them
        starts with go (:meth:`keep_stages_for`), before the lowering packs its own copy."""
        if share_prefix:  # a preset's candidate: the preset's race compares them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stage = self._run_keeping(pipeline, keep_for)
                kept = any(stage is other for other in self._stages.values())
                return self.lower(stage, backend, device, pipeline, owned=not kept)
        optimized = self.lower(self.run(pipeline), backend, device, pipeline, owned=True)
        # Speed is verified like numerics: the result runs the captured graph if that measures faster.
        captured = self.captured
        return never_slower(optimized, captured.gm, captured.batches[0], self.evidence.timings)

    def _run_keeping(self, pipeline: Sequence[Pass], keep_for: Iterable[Sequence[Pass]] | None) -> Stage:
        stage = self.run(pipeline, share_prefix=True)
        if keep_for is not None:
            self.keep_stages_for(keep_for)
        return stage

    def check_user_model(self) -> None:
        """Invariant 1: the user's model is as it was before the session began."""
        guard = self._captured.user_model if self._captured is not None else None
        baseline = guard.baseline if guard is not None else self.fingerprint  # retaken after a restore
        if self.model is not None and module_fingerprint(self.model) != baseline:  # pragma: no cover
            raise FxoptError("internal error: the user's model changed during compilation")


def kernel_timings(measure: bool) -> KernelTimings:
    """The kernel-timing cache a session measures with (the enclosing ``measuring`` block's, or
    the default on-disk one); with ``measure=False``, the same without new measurements."""
    timings = current()
    return timings if measure or not timings.measure else timings.without_measuring()


def task_budget(gm: fx.GraphModule, metric: Any, data: Any, max_drop: Any, confidence: float | None = 0.95,
                agreement_data: Any = None) -> Any:
    """The task-metric budget of ``compile(metric=, data=, max_drop=)``: all three or none;
    ``confidence``, ``agreement_data``: see :func:`fxopt.lossy.task.task_budget`."""
    if metric is None and data is None and max_drop is None:
        return None
    if metric is None or data is None or max_drop is None:
        raise InputError("a task-metric budget needs metric=, data= and max_drop= together")
    from fxopt.lossy.task import task_budget as make_budget

    return make_budget(gm, gm.meta["fxopt_signature"], data, metric, max_drop, confidence, agreement_data)


def pass_context(batches: list[list[torch.Tensor]], *, task: Any = None,
                 reference: list[list[Any]] | None = None, calibrated: bool = False,
                 fresh_batches: int = 0) -> PassContext:
    """A pass context on its own evidence, for code that calls a pass or a search directly
    (the tuner's trials): ``reference``, when known, the graph's outputs on ``batches``."""
    return PassContext(batches=batches, calibrated=calibrated, fresh_batches=fresh_batches, task=task,
                       evidence=Evidence(reference=list(reference or [])))
