"""``fxopt.compile``: capture, run the verified pass pipeline, lower to a backend."""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.capture import BATCH, Signature, capture, split_example_inputs
from fxopt.cost import graph_cost
from fxopt.errors import FxoptError, InputError
from fxopt.ir import copy_graph_module
from fxopt.pass_api import Pass, PassContext
from fxopt.pipeline import PassInstrument, PassManager, UserModelUntouched
from fxopt.pipeline.instruments import user_stacklevel
from fxopt.pipeline.verification import DEFAULT_VERIFY_ROWS, Verification, row_slices
from fxopt.registry import resolve_passes
from fxopt.report import PhaseTimer, Report, phase
from fxopt.verify import KNOWN_OUTPUTS, MODEL_OUTPUTS, RUN_OUTPUTS, module_fingerprint, run_graph

PassSpec = str | Pass | Iterable[str | Pass] | None


class OptimizedModule(torch.nn.Module):
    """The optimized model: call it like the original.

    ``graph_module`` is the optimized fx graph and ``report`` says how it was made.
    Inputs are checked against the captured signature (count, dtype, static sizes).

    Save it with :func:`fxopt.save` (``torch.save`` cannot pickle a lowered module and
    says so). Its dtype and device are fixed at compile time: ``.half()``, ``.to(dtype)``
    and ``.to(other_device)`` raise; compile the converted model instead.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        signature: Signature,
        report: Report,
        runner: Any = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.signature = signature
        self.report = report
        self.device = device
        self._runner = runner

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> OptimizedModule:
        # nn.Module's .half()/.to()/.cuda() convert the weights one by one behind the
        # lowered runner's back (an ONNX Runtime session, int8 kernels): find out what ``fn``
        # would do on an empty tensor of each kind held here, and refuse any change.
        # The module's device, not the tensors': an ONNX Runtime module keeps meta tensors.
        home = self.device or torch.device("cpu")
        kinds = {(t.dtype, home) for t in [*self.graph_module.buffers(), *self.graph_module.parameters()]}
        for dtype, device in sorted(kinds, key=str):
            probe = fn(torch.empty(0, dtype=dtype, device=device))
            if isinstance(probe, torch.Tensor) and (probe.dtype, probe.device) != (dtype, device):
                change = f"dtype {dtype} to {probe.dtype}" if probe.dtype != dtype else f"device {device} to {probe.device}"
                what = (f"fxopt.compile(model.to({probe.dtype}), example_inputs converted the same way)"
                        if probe.dtype != dtype else f"fxopt.compile(model, example_inputs, device='{probe.device}')")
                raise FxoptError(f"an optimized module cannot change its {change} after compilation: "
                                 f"its graph was verified and lowered for the original; compile again with {what}")
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        _discard_partial_torch_save()
        raise FxoptError("an optimized module cannot be pickled (torch.save): its lowered runner is not "
                         "picklable; use fxopt.save(opt, path) and fxopt.load(path)")

    def __deepcopy__(self, memo: dict[int, Any]) -> OptimizedModule:
        # The runner (lowered kernels, an ONNX Runtime session) holds no state between runs:
        # the copy shares it and gets its own graph, signature and report.
        return OptimizedModule(copy.deepcopy(self.graph_module, memo), copy.deepcopy(self.signature, memo),
                               copy.deepcopy(self.report, memo), self._runner, self.device)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.signature.flatten(args, kwargs)
        if self.device is not None:
            for position, tensor in enumerate(flat):
                if tensor.device.type != self.device.type:
                    raise InputError(
                        f"input {position} ('{self.signature.leaf_names[position]}') is on "
                        f"{tensor.device}, but the optimized module runs on {self.device}"
                    )
        runner = self._runner if self._runner is not None else self.graph_module
        outputs = runner(*flat)
        if not isinstance(outputs, (list, tuple)):
            outputs = (outputs,)
        return self.signature.unflatten(list(outputs))

    def extra_repr(self) -> str:
        return f"backend={self.report.backend}, device={self.report.device}"


def _discard_partial_torch_save() -> None:
    """Remove the file a failing ``torch.save(opt, path)`` has already created.

    torch.save opens (and truncates) ``path`` before it pickles anything, so raising from
    ``__reduce_ex__`` would otherwise leave a truncated, unloadable file behind.
    """
    import os
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "save" and frame.f_globals.get("__name__") == "torch.serialization":
            target = frame.f_locals.get("f")
            if isinstance(target, (str, os.PathLike)):
                with contextlib.suppress(OSError):
                    os.remove(target)
            return
        frame = frame.f_back


def compile(  # noqa: A001 - mirrors torch.compile
    model: torch.nn.Module,
    example_inputs: Any,
    passes: PassSpec = None,
    backend: str | None = None,
    device: str | torch.device | None = None,
    strict: bool = False,
    *,
    preset: str | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    calibration: Iterable[Any] | None = None,
    dynamic_shapes: Any = None,
    instruments: Sequence[PassInstrument] = (),
    max_rounds: int = 1,
    fresh_inputs: bool = True,
    metric: Any = None,
    data: Any = None,
    max_drop: float | None = None,
    confidence: float | None = 0.95,
    agreement_data: Any = None,
) -> OptimizedModule:
    """Optimize ``model`` for inference and return a module that runs the result.

    Args:
        model: the model; never modified.
        example_inputs: a tuple of tensors ``model`` can be called with (one tensor is
            fine), or a dict of keyword inputs (``{"input_ids": ids, "attention_mask": mask}``).
        passes: pass names, configured pass objects, or ``"a,b(opt=1)"``; None runs
            every registered exact pass.
        backend: ``"eager"`` (PyTorch, CPU or CUDA; the default), ``"onnx"`` (ONNX Runtime), or
            an optional one: ``"openvino"``, ``"inductor"`` (see :mod:`fxopt.backends`).
            With a preset, None lets the preset choose and a name limits it to that backend.
        device: where the optimized module runs; defaults to the example inputs' device.
        strict: raise :class:`fxopt.PassFailedError` when a pass fails instead of rolling back.
        preset: ``"lossless"``, ``"bf16"``, ``"int8"`` (or a plugin's preset; see
            :mod:`fxopt.presets`): compile each of the preset's candidates, keep those within
            its budget and return the fastest, measured side by side on the example inputs.
            The report's notes say what was chosen and why. Not combined with ``passes``.
        example_kwargs: keyword arguments for the call, if any.
        calibration: an iterable of input tuples (or dicts) for lossy passes and their
            error budgets; their batch size may differ from the examples' when the batch is
            dynamic.
        dynamic_shapes: ``None`` (default): the batch dimension (dim 0 of every input whose
            dim 0 equals the first input's) is dynamic where the model allows it, static
            otherwise (the report says why); ``"static"``: every size as in the examples; or
            a ``torch.export`` spec for full control (``{"x": {0: Dim("batch"), 1: Dim("seq")}}``).
        instruments: pass instruments (progress printing, graph dumps).
        max_rounds: run the pipeline again while passes keep changing the graph.
        fresh_inputs: also verify every pass on one fresh input drawn like the examples
            (other values; another batch size where the batch is dynamic, see ``fresh_rows``).
        metric, data, max_drop: a task-metric budget every lossy pass keeps besides its
            output-error budget: ``metric`` (``"accuracy"``, ``"top1-agreement"`` or
            ``metric(outputs, labels) -> float``, higher is better) may fall by at most
            ``max_drop`` on ``data`` (batches of ``(inputs, labels)``); see ``fxopt.tune``.
        confidence: a lossy change is within ``max_drop`` only when the one-sided upper bound
            of its drop at this confidence is (see :mod:`fxopt.lossy.acceptance`); ``None``
            judges the drop measured on ``data`` alone (no allowance for sampling).
        agreement_data: unlabelled input batches that tighten an accuracy or top-1
            agreement bound (see ``fxopt.tune``).
    """
    if preset is not None:
        return _compile_preset(
            preset, model, example_inputs, passes, backend, device, strict, example_kwargs=example_kwargs,
            calibration=calibration, dynamic_shapes=dynamic_shapes, instruments=instruments,
            max_rounds=max_rounds, fresh_inputs=fresh_inputs, metric=metric, data=data, max_drop=max_drop,
            confidence=confidence, agreement_data=agreement_data)
    backend = backend or "eager"
    pipeline = resolve_passes(passes)  # bad names fail before any expensive work
    from fxopt.backends import get_backend

    get_backend(backend, device)  # so do unknown or uninstalled backends
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    timer = PhaseTimer()
    with timer.running():
        captured = _capture_for_compile(model, example_inputs, example_kwargs, calibration, dynamic_shapes,
                                        fresh_inputs, backend)
        optimized = optimize_captured(
            captured.gm,
            captured.batches,
            pipeline,
            report=captured.report,
            backend=backend,
            device=device,
            strict=strict,
            instruments=instruments,
            max_rounds=max_rounds,
            user_model=captured.user_model,
            fresh_batches=captured.fresh_batches,
            task=_task_budget(captured.gm, captured.gm.meta["fxopt_signature"], metric, data, max_drop,
                              confidence, captured.report, agreement_data),
        )
    _record_time(optimized.report, timer)
    if module_fingerprint(model) != captured.user_model.baseline:  # pragma: no cover - invariant 1
        raise FxoptError("internal error: the user's model changed during compilation")
    return optimized


@dataclass
class _Captured:
    """A captured model and its verification data: what every candidate of a preset shares."""

    gm: fx.GraphModule
    batches: list[list[torch.Tensor]]
    report: Report
    user_model: UserModelUntouched
    fresh_batches: int


def _capture_for_compile(model: torch.nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None,
                         calibration: Iterable[Any] | None, dynamic_shapes: Any, fresh_inputs: bool,
                         backend: str) -> _Captured:
    args, kwargs = split_example_inputs(example_inputs, example_kwargs)
    if isinstance(example_inputs, Mapping):
        _check_keywords(model, kwargs)
    report = Report(model=type(model).__name__, backend=backend)
    fingerprint = module_fingerprint(model)
    source = _inference_copy(model, report)

    start = time.perf_counter()
    with phase("capture"):
        gm = capture(source, args, kwargs, dynamic_shapes=BATCH if dynamic_shapes is None else dynamic_shapes)
    report.capture_seconds = time.perf_counter() - start
    report.notes.extend(gm.meta.pop("fxopt_notes", []))
    signature: Signature = gm.meta["fxopt_signature"]
    batches = [signature.flatten(args, kwargs, what="example input")]
    batches += _distinct_calibration(batches[0], _calibration_batches(signature, calibration), report)
    fresh = None
    if fresh_inputs:
        with phase("reference"):
            fresh = _fresh_batch(gm, batches[0], report)
    if fresh is not None:
        batches.append(fresh)
    user_model = UserModelUntouched(model, gm.meta.get("fxopt_sources", {}), baseline=fingerprint)
    return _Captured(gm, batches, report, user_model, int(fresh is not None))


def _record_time(report: Report, timer: PhaseTimer) -> None:
    report.timings = {name: seconds for name, seconds in timer.seconds.items() if seconds > 0}
    report.total_seconds = timer.total


def _compile_preset(name: str, model: torch.nn.Module, example_inputs: Any, passes: PassSpec,
                    backend: str | None, device: str | torch.device | None, strict: bool,
                    **options: Any) -> OptimizedModule:
    from fxopt import presets

    if passes is not None:
        raise InputError("give either passes= or preset=, not both (a preset chooses its passes)")
    preset = presets.get_preset(name)
    if backend is not None:
        candidates = tuple(c for c in preset.candidates if c.backend == backend)
        if not candidates:
            raise InputError(f"preset {name!r} has no candidate for backend {backend!r}")
        preset = presets.Preset(preset.name, preset.description, candidates, preset.budget)
    for every_candidate_reads in ("calibration", "data", "agreement_data"):
        if options.get(every_candidate_reads) is not None and not callable(options[every_candidate_reads]):
            options[every_candidate_reads] = list(options[every_candidate_reads])
    args, kwargs = split_example_inputs(example_inputs, options["example_kwargs"])
    leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    target = torch.device(device) if device is not None else _device_of(leaves)

    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    timer = PhaseTimer()
    with timer.running():
        stages = _SharedStages(model, example_inputs, device, strict, options)
        if options["max_rounds"] > 1:  # rounds span the whole pipeline: nothing to share
            def build(candidate: presets.Candidate) -> OptimizedModule:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a candidate's rollbacks are reported, not raised
                    return compile(model, example_inputs, presets.expand(candidate.passes), candidate.backend,
                                   device, strict, **options)
        else:
            build = stages.build
        chosen, trials = presets.choose(
            preset, target, build,
            measure_error=lambda module: module.report.final_max_rel_err,
            run_example=lambda module: lambda: module(*args, **kwargs),
            calibrated=bool(options.get("calibration")))
    chosen.report.notes.append(presets.summary(preset, trials, chosen))
    _record_time(chosen.report, timer)
    if module_fingerprint(model) != stages.fingerprint:  # pragma: no cover - invariant 1
        raise FxoptError("internal error: the user's model changed during compilation")
    return chosen


class _SharedStages:
    """A preset's candidates compiled from shared work: the model is captured once, and a
    pipeline prefix (the exact passes, say) runs once for every candidate that starts with
    it; each candidate continues from that graph (the pass manager works on copies) with its
    own references, and lowers a copy of its own final graph."""

    def __init__(self, model: torch.nn.Module, example_inputs: Any, device: str | torch.device | None,
                 strict: bool, options: dict[str, Any]) -> None:
        self.model, self.example_inputs, self.device, self.strict = model, example_inputs, device, strict
        self.options = options
        self.fingerprint = module_fingerprint(model)
        self._captured: _Captured | None = None
        self._task: Any = None
        self._capture_error: FxoptError | None = None
        # pipeline prefix (tuple of passes) -> (graph, report rows, verification state)
        self._stages: dict[tuple[Pass, ...], tuple[fx.GraphModule, list[Any], Verification]] = {}

    def captured(self) -> _Captured:
        if self._capture_error is not None:
            raise self._capture_error
        if self._captured is None:
            try:
                self._captured = _capture_for_compile(
                    self.model, self.example_inputs, self.options["example_kwargs"], self.options["calibration"],
                    self.options["dynamic_shapes"], self.options["fresh_inputs"], "eager")
            except FxoptError as exc:
                self._capture_error = exc
                raise
            gm = self._captured.gm
            self._task = _task_budget(gm, gm.meta["fxopt_signature"], self.options["metric"],
                                      self.options["data"], self.options["max_drop"],
                                      self.options.get("confidence", 0.95), self._captured.report,
                                      self.options.get("agreement_data"))
        return self._captured

    def build(self, candidate: Any) -> OptimizedModule:
        from fxopt import presets

        pipeline = resolve_passes(presets.expand(candidate.passes))
        captured = self.captured()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a candidate's rollbacks are reported, not raised
            exact = 0
            while exact < len(pipeline) and pipeline[exact].exact:
                exact += 1
            gm, records, verification = self._stage(tuple(pipeline[:exact]), None, captured)
            if exact < len(pipeline):
                # continue from the longest prefix another candidate already ran (its exact
                # passes, or those and some of its lossy ones)
                start = max((n for n in range(exact, len(pipeline)) if tuple(pipeline[:n]) in self._stages),
                            default=exact)
                gm, records, verification = self._stage(tuple(pipeline), (tuple(pipeline[:start]), start), captured)
        report = copy.deepcopy(captured.report)
        report.backend = candidate.backend
        calibration_batches = len(captured.batches) - captured.fresh_batches
        if calibration_batches == 1 and not all(p.exact for p in pipeline):
            report.notes.append("no calibration data given: lossy passes were measured on the example inputs only")
        with phase("cost"):
            report.original = graph_cost(captured.gm)
        report.passes = [copy.deepcopy(r) for r in records]
        final = copy_graph_module(gm)  # the lowered module owns its graph
        final.meta.pop(RUN_OUTPUTS, None)
        final.meta.pop("fxopt_sources", None)
        signature: Signature = final.meta["fxopt_signature"]
        return _finish(final, verification.fork() if verification is not None else None, report,
                       candidate.backend, self.device, signature, captured.batches)

    def _stage(self, key: tuple[Pass, ...], prefix: tuple[tuple[Pass, ...], int] | None,
               captured: _Captured) -> tuple[fx.GraphModule, list[Any], Verification | None]:
        if key in self._stages:
            return self._stages[key]
        if not key:
            return captured.gm, [], None
        start_gm, start_records, start_verification = captured.gm, [], None
        passes = key
        if prefix is not None:
            start_gm, start_records, start_verification = self._stage(prefix[0], None, captured)
            passes = key[prefix[1]:]
        ctx = PassContext(batches=captured.batches, calibrated=len(captured.batches) - captured.fresh_batches > 1,
                          fresh_batches=captured.fresh_batches, task=self._task)
        manager = PassManager(list(passes), strict=self.strict, instruments=self.options["instruments"],
                              user_model=captured.user_model, verify_rows=DEFAULT_VERIFY_ROWS)
        resume = start_verification.fork() if start_verification is not None else None
        gm, records = manager.run(start_gm, resume.ctx if resume is not None else ctx, resume=resume)
        self._stages[key] = (gm, list(start_records) + list(records), manager.verification)
        return self._stages[key]


def optimize_captured(
    gm: fx.GraphModule,
    batches: list[list[torch.Tensor]],
    pipeline: Sequence[Pass],
    *,
    report: Report,
    backend: str = "eager",
    device: str | torch.device | None = None,
    strict: bool = False,
    instruments: Sequence[PassInstrument] = (),
    max_rounds: int = 1,
    user_model: UserModelUntouched | None = None,
    fresh_batches: int = 0,
    verify_rows: int | None = DEFAULT_VERIFY_ROWS,
    task: Any = None,
) -> OptimizedModule:
    """The steps after capture, shared by every entry point: verified passes, then lowering.

    ``gm`` is a captured graph (``fxopt.capture`` output, with ``meta["fxopt_signature"]``);
    ``batches`` are its flat inputs, the example inputs first, then calibration batches,
    then ``fresh_batches`` inputs drawn like the examples (verification only).
    ``verify_rows``: exact passes are verified on that many rows of each batch when the
    batch is dynamic (None: on every row; see :mod:`fxopt.pipeline.verification`).
    """

    signature: Signature = gm.meta["fxopt_signature"]
    calibration_batches = len(batches) - fresh_batches
    if calibration_batches == 1 and not all(p.exact for p in pipeline):
        report.notes.append("no calibration data given: lossy passes were measured on the example inputs only")
    ctx = PassContext(batches=batches, calibrated=calibration_batches > 1, fresh_batches=fresh_batches, task=task)

    with phase("cost"):
        report.original = graph_cost(gm)
    manager = PassManager(
        pipeline,
        strict=strict,
        instruments=instruments,
        max_rounds=max_rounds,
        user_model=user_model,
        verify_rows=verify_rows,
    )
    verification = None
    if pipeline:
        gm, report.passes = manager.run(gm, ctx)
        verification = manager.verification
    gm.meta.pop(RUN_OUTPUTS, None)
    gm.meta.pop("fxopt_sources", None)  # lets the original weights go once nothing can need them
    return _finish(gm, verification, report, backend, device, signature, batches)


def _finish(gm: fx.GraphModule, verification: Verification | None, report: Report, backend: str,
            device: str | torch.device | None, signature: Signature,
            batches: list[list[torch.Tensor]]) -> OptimizedModule:
    """The final error and cost in the report, then lowering to ``backend``."""
    from fxopt.backends import lower

    if verification is not None:
        with phase("verify"):
            report.final_max_abs_err, report.final_max_rel_err = verification.final_error(gm)
        if verification.slices is not None and report.passes:
            rows = [int(batch[0].shape[0]) for batch in verification.slices if batch and hasattr(batch[0], "shape")]
            report.notes.append(f"exact passes were verified on the first {'/'.join(map(str, sorted(set(rows))))} "
                                "rows of each input (the batch is dynamic); lossy passes on every row")
    with phase("cost"):
        report.final = graph_cost(gm)

    target = torch.device(device) if device is not None else _device_of(batches[0])
    report.device = str(target)
    known = verification.smallest_known_outputs() if verification is not None else None
    if known is not None:
        # The backend's parity check compares its lowered graph with these outputs instead
        # of running the optimized graph again (fxopt.verify.known_outputs).
        gm.meta[KNOWN_OUTPUTS] = known
    if verification is not None and verification.lossy_applied:
        # A backend that computes differently from the graph measures its own error with these.
        model_outputs, drift = verification.model_outputs()
        gm.meta[MODEL_OUTPUTS] = (verification.ctx.batches, model_outputs, drift)
    start = time.perf_counter()
    try:
        with phase("lowering"):
            runner = lower(backend, gm, signature, batches[0], target, report)
    finally:
        gm.meta.pop(KNOWN_OUTPUTS, None)
        gm.meta.pop(MODEL_OUTPUTS, None)
    report.lower_seconds = time.perf_counter() - start
    runner.graph_module.meta.pop(KNOWN_OUTPUTS, None)
    runner.graph_module.meta.pop(MODEL_OUTPUTS, None)
    return OptimizedModule(runner.graph_module, signature, report, runner.run, target)


def _task_budget(gm: fx.GraphModule, signature: Signature, metric: Any, data: Any, max_drop: Any,
                 confidence: float | None, report: Report, agreement_data: Any = None) -> Any:
    """The task-metric budget of ``compile(metric=, data=, max_drop=)``: all three or none (a
    report note when ``data`` cannot support ``max_drop`` at ``confidence``)."""
    if metric is None and data is None and max_drop is None:
        return None
    if metric is None or data is None or max_drop is None:
        raise InputError("a task-metric budget needs metric=, data= and max_drop= together")
    from fxopt.lossy.task import task_budget

    task = task_budget(gm, signature, data, metric, max_drop, confidence, agreement_data)
    report.notes.extend(filter(None, [task.unsupported()]))
    return task


def _check_keywords(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    try:
        inspect.signature(model.forward).bind(**kwargs)
    except TypeError as exc:
        raise InputError(
            "example_inputs must be a tuple of tensors (or one tensor), or a dict of the "
            f"model's keyword arguments; {type(model).__name__}.forward cannot take {sorted(kwargs)}: {exc}"
        ) from None
    except ValueError:
        pass  # no inspectable signature: export will say what is wrong


def _inference_copy(model: torch.nn.Module, report: Report) -> torch.nn.Module:
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if not training:
        return model
    message = (
        f"model is in training mode ({', '.join(training[:3])}{'...' if len(training) > 3 else ''}); "
        "fxopt optimized an eval() copy and left your model as it was"
    )
    warnings.warn(f"fxopt: {message}", stacklevel=user_stacklevel())
    report.notes.append(message)
    return copy.deepcopy(model).eval()


def _calibration_batches(signature: Signature, calibration: Iterable[Any] | None) -> list[list[torch.Tensor]]:
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        raise InputError("calibration must be an iterable of input tuples, e.g. [(x1,), (x2,)], not one tensor")
    batches = []
    for index, batch in enumerate(calibration):
        args, kwargs = split_example_inputs(batch)
        batches.append(signature.flatten(args, kwargs, what=f"calibration batch {index}, input"))
    return batches


def _distinct_calibration(example: list[torch.Tensor], calibration: list[list[torch.Tensor]],
                          report: Report) -> list[list[torch.Tensor]]:
    """The calibration batches less copies of the example inputs or of an earlier batch, unless
    that leaves none: lossy passes fit on every other batch and verify on the rest, so a copy
    of a fitted batch in the held-out half would make the held-out check see no new data
    (``calibration=[example, other]`` is the common way to ask for it)."""
    kept: list[list[torch.Tensor]] = []
    for batch in calibration:
        if not any(_same_batch(batch, seen) for seen in (example, *kept)):
            kept.append(batch)
    if kept and len(kept) < len(calibration):
        dropped = len(calibration) - len(kept)
        report.notes.append(f"{dropped} calibration batch(es) identical to the example inputs or an earlier batch "
                            "left out, so that the held-out check sees other data")
        return kept
    return calibration


def _same_batch(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        (x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y))
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x is y or x == y
        for x, y in zip(a, b))


def _fresh_batch(gm: fx.GraphModule, example: list[torch.Tensor], report: Report) -> list[torch.Tensor] | None:
    """One more input drawn like the examples, to verify passes beyond the values (and the
    batch size) they were captured with; None, with a note, when the captured graph does
    not run cleanly on it."""
    try:
        fresh, described = fresh_inputs_like(gm, example)
        # Checked on the rows exact passes are verified on (all of them for a static batch);
        # the pass manager reuses these outputs as its reference on them.
        rows = _verified_rows(gm, fresh, fresh=True)
        try:
            outputs = run_graph(gm, rows)
        except Exception:
            if rows is fresh:
                raise
            rows = fresh  # not on a slice: the pass manager will verify on every row
            outputs = run_graph(gm, rows)
        gm.meta[RUN_OUTPUTS] = [(rows, outputs)]
    except Exception as exc:
        report.notes.append(f"no fresh verification input: the captured graph fails on one ({type(exc).__name__})")
        return None
    if not _finite(outputs) and _finite(run_graph(gm, example if rows is fresh else _verified_rows(gm, example, False))):
        report.notes.append("no fresh verification input: the captured graph's outputs on one are not finite")
        return None
    report.notes.append(f"verified on the example inputs and one fresh input drawn like them ({described})")
    return fresh


def _verified_rows(gm: fx.GraphModule, batch: list[torch.Tensor], fresh: bool) -> list[torch.Tensor]:
    cut = row_slices(gm, [batch], int(fresh), DEFAULT_VERIFY_ROWS)
    return cut[0] if cut else batch


def _finite(outputs: list[Any]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point())


def fresh_inputs_like(gm: fx.GraphModule, example: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
    """Inputs like ``example`` with other values, and another batch size where it is dynamic.

    Float rows are random convex mixtures of the example's rows (a random rescaling when
    there is one row); integers are drawn among the example's values; booleans and 0/1
    masks repeat the example's pattern. Every size symbol that dim 0 of some input uses
    takes :func:`fresh_rows` of its example value; other dynamic sizes keep the example's
    value. Returns the inputs and a description for the report.
    """
    values = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    known: dict[Any, int] = {}  # size symbol -> its value in the examples
    grow: set[Any] = set()
    for value, tensor in zip(values, example):
        if not isinstance(value, torch.Tensor):
            continue
        for dim, size in enumerate(value.shape):
            if isinstance(size, int):
                continue
            expr = size.node.expr
            if expr.is_Symbol:
                known[expr] = int(tensor.shape[dim])
            if dim == 0:
                grow.update(expr.free_symbols)
    per_row = _linear_vectors_per_row(gm, known, grow)
    fresh_values = {s: fresh_rows(v, per_row) if s in grow else v for s, v in known.items()}
    shapes = []
    for value, tensor in zip(values, example):
        shape = list(tensor.shape)
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                expr = None if isinstance(size, int) else size.node.expr
                if expr is not None and expr.free_symbols <= set(known):
                    shape[dim] = int(expr.subs({s: fresh_values[s] for s in expr.free_symbols}))
        shapes.append(shape)
    generator = torch.Generator().manual_seed(len(example))
    fresh = [_draw_like(tensor, shape, generator) for tensor, shape in zip(example, shapes)]
    sizes = {tuple(t.shape) for t in example} != {tuple(s) for s in map(tuple, shapes)}
    if not sizes:
        return fresh, "other values, same shapes"
    rows = {int(t.shape[0]) for t, shape in zip(example, shapes) if t.dim() and t.shape[0] != shape[0]}
    fresh_sizes = {shape[0] for t, shape in zip(example, shapes) if t.dim() and t.shape[0] != shape[0]}
    return fresh, f"other values, batch {'/'.join(map(str, sorted(fresh_sizes)))} instead of {'/'.join(map(str, sorted(rows)))}"


# A fresh input gives the median Linear at least this many input vectors (rows of the matrix
# it multiplies), so a lossy pass's error on it is a max over that many samples; see fresh_rows.
FRESH_VECTORS = 256


def fresh_rows(example_rows: int, vectors_per_row: int | None) -> int:
    """The fresh input's batch size where the batch is dynamic: one row more than the example,
    or fewer rows when each row gives the Linears many vectors (a sequence of tokens): as few
    as give the median Linear ``FRESH_VECTORS`` input vectors, at least ``DEFAULT_VERIFY_ROWS + 1``
    (the fresh input is then its own row slice, verified once for exact and lossy passes alike).
    Never the example's own size, so the fresh input exercises another batch size; a fresh
    run costs a fraction of an example run on sequence models (BERT-4L, 8 x 128: 3 rows)."""
    more = example_rows + 1
    if not vectors_per_row:
        return more
    rows = max(DEFAULT_VERIFY_ROWS + 1, -(-FRESH_VECTORS // vectors_per_row))
    if rows >= more:
        return more
    return rows if rows != example_rows else more


def _linear_vectors_per_row(gm: fx.GraphModule, known: dict[Any, int], batch: set[Any]) -> int | None:
    """How many input vectors one row of the dynamic batch gives the median Linear (its
    input's size over every dim but the last, per batch row); None without Linears."""
    from fxopt.ir.ops import call_nodes, ops

    counts = []
    for node in call_nodes(gm, ops.linear):
        value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            continue
        vectors = 1
        for size in value.shape[:-1]:
            if not isinstance(size, int):
                expr = size.node.expr
                if not expr.free_symbols <= set(known):
                    break
                size = expr.subs({s: 1 if s in batch else known[s] for s in expr.free_symbols})
                if not size.is_Integer:
                    break
            vectors *= int(size)
        else:
            counts.append(vectors)
    if not counts:
        return None
    return sorted(counts)[len(counts) // 2]


def _draw_like(example: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    source = example.detach().cpu()
    if source.numel() == 0 or source.dim() == 0 or list(source.shape[1:]) != shape[1:]:
        return example.clone() if list(example.shape) == shape else torch.zeros(shape, dtype=example.dtype, device=example.device)
    rows = source.shape[0]
    if source.dtype == torch.bool or source.is_complex() or bool(((source == 0) | (source == 1)).all()):
        drawn = source.index_select(0, torch.arange(shape[0]) % rows)  # masks keep their pattern
    elif source.is_floating_point():
        if rows == 1:
            scale = torch.empty(shape[0], *[1] * (source.dim() - 1), dtype=torch.float64).uniform_(0.5, 1.5, generator=generator)
            drawn = (source.double() * scale).to(source.dtype)
        else:
            # Convex mixtures of the example rows: other values, each inside the examples'
            # range and span, so data confined to a subspace stays there (a lossy pass's
            # error on it is the error on data like the examples).
            weights = torch.empty(shape[0], rows, dtype=torch.float64).exponential_(generator=generator)
            weights = weights / weights.sum(1, keepdim=True)
            drawn = (weights @ source.double().reshape(rows, -1)).reshape(shape).to(source.dtype)
    else:
        pool = source.reshape(-1)  # integers (token ids, indices) are drawn among the examples' values
        picks = torch.randint(0, pool.numel(), (int(torch.Size(shape).numel()),), generator=generator)
        drawn = pool[picks].reshape(shape)
    return drawn.to(example.device)


def _device_of(inputs: list[torch.Tensor]) -> torch.device:
    return inputs[0].device if inputs else torch.device("cpu")
