"""``fxopt.compile``: capture, run the verified pass pipeline, lower to a backend.

Each call is one :class:`fxopt.session.Session` (capture, the verified pipeline, lowering);
a preset's candidates share one session.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fxopt.cost import graph_cost
from fxopt.errors import FxoptError, InputError
from fxopt.generation import compile_generative, is_generative
from fxopt.inputs import FRESH_VECTORS, device_of, fresh_inputs_like, fresh_rows
from fxopt.ir.derived import collect_let_go
from fxopt.module import OptimizedModule
from fxopt.pass_api import Pass
from fxopt.phases import PhaseTimer
from fxopt.pipeline import PassInstrument
from fxopt.proxy import stand_ins
from fxopt.registry import expand_exact, resolve_passes
from fxopt.report import Report
from fxopt.session import Session, SessionOptions
from fxopt.signature import split_example_inputs

PassSpec = str | Pass | Iterable[str | Pass] | None

__all__ = ["FRESH_VECTORS", "OptimizedModule", "PassSpec", "compile", "fresh_inputs_like", "fresh_rows"]


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
    share_weights: bool = True,
    measure: bool = True,
    confidence: float | None = 0.95,
    agreement_data: Any = None,
    progress: bool | None = None,
    memory_bound: int | None = None,
    budget: float | None = None,
) -> OptimizedModule:
    """Optimize ``model`` for inference and return a module that runs the result.

    A transformers model that generates with a KV cache (``use_cache=True``) gives a
    :class:`fxopt.generation.GenerativeModule` instead, whose ``generate()`` runs the
    optimized prefill and decode graphs (see :mod:`fxopt.generation` and docs/generation.md).

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
        share_weights: the optimized module keeps the weights no pass changed as the model's
            own tensors (no second copy; writing to the model's weights in place afterwards
            changes them in the optimized module too: compile again after changing the model).
            False copies every weight (twice the memory).
        confidence: a lossy change is within ``max_drop`` only when the one-sided upper bound
            of its drop at this confidence is (see :mod:`fxopt.lossy.acceptance`); ``None``
            judges the drop measured on ``data`` alone (no allowance for sampling).
        agreement_data: unlabelled input batches that tighten an accuracy or top-1
            agreement bound (see ``fxopt.tune``).
        progress: None (default): once the compile has run for
            :data:`fxopt.session.LONG_COMPILE_SECONDS`, each pass and a lossy pass's sites are
            reported on stderr with the time left (:class:`fxopt.PrintProgress`); True: from
            the start; False: never. A ``PrintProgress`` in ``instruments`` replaces it.
        memory_bound: bytes the compile may hold besides the model: the node values a lossy
            pass keeps (past them a budgeted search goes block by block) and, with a preset,
            the built candidates held at once (past them they race as they are built, and a
            model whose weights alone exceed the bound races only the candidates whose backend
            shares its weights). None: as much as keeps them and the weights within 2 GiB,
            or 5% of the weights (see :mod:`fxopt.evidence`).
        budget: with a preset, the largest relative output error against the model its result
            may have, in place of the preset's own (``preset="int8", budget=0.01``): candidates
            over it are dropped, and each lossy pass searches within it. Passes take their
            own ``budget`` option instead (``"quantize-int8(budget=0.01)"``).
    """
    if is_generative(model):
        return compile_generative(model, example_inputs, passes, backend, device, strict, example_kwargs,
                                  share_weights, measure, unsupported={
                                      "preset": preset, "calibration": calibration, "metric": metric, "data": data,
                                      "max_drop": max_drop, "agreement_data": agreement_data,
                                      "instruments": tuple(instruments), "dynamic_shapes": dynamic_shapes,
                                      "max_rounds": max_rounds != 1, "memory_bound": memory_bound,
                                      "budget": budget})
    options = SessionOptions(
        example_kwargs=example_kwargs, calibration=calibration, dynamic_shapes=dynamic_shapes,
        fresh_inputs=fresh_inputs, strict=strict, instruments=instruments, max_rounds=max_rounds,
        metric=metric, data=data, max_drop=max_drop, share_weights=share_weights,
        measure=measure, confidence=confidence, agreement_data=agreement_data, progress=progress,
        memory_bound=memory_bound)
    if budget is not None and preset is None:
        raise InputError("budget= is a preset's output error budget; give a pass its own "
                         "(\"quantize-int8(budget=0.01)\") or use a preset")
    if preset is not None:
        chosen = _compile_preset(preset, model, example_inputs, passes, backend, device, options, budget)
        _give_back_freed_memory(chosen.report)  # the preset's session and candidates are gone
        return chosen
    backend = backend or "eager"
    pipeline = resolve_passes(passes)  # bad names fail before any expensive work
    from fxopt.backends import get_backend

    get_backend(backend, device)  # so do unknown or uninstalled backends
    timer = PhaseTimer()
    with timer.running():
        session = Session(model, example_inputs, options, backend)
        optimized = session.compile(pipeline, backend, device)
    _record_time(optimized.report, timer)
    session.check_user_model()
    del session
    _give_back_freed_memory(optimized.report)
    return optimized


def _record_time(report: Report, timer: PhaseTimer) -> None:
    report.timings = {name: seconds for name, seconds in timer.seconds.items() if seconds > 0}
    report.total_seconds = timer.total
    report.memory = {name: {"peak_mb": timer.peak_bytes.get(name, 0) / 1e6, "net_mb": timer.net_bytes.get(name, 0) / 1e6}
                     for name in timer.seconds if name in timer.net_bytes}


# A compile whose peak grew the process by this much has freed temporaries of about that size
# (a large model's int8 copies, a search's values, a dropped candidate) by its end.
GIVE_BACK_BYTES = 256 << 20


def _give_back_freed_memory(report: Report) -> None:
    """Return what a large compile freed (its session is gone) to the system: glibc keeps freed
    blocks for reuse, so without this the process stays near the compile's peak (a 1.1B
    Llama's int8 preset kept 1.4 GB so)."""
    peak_growth = sum(phase["peak_mb"] for phase in (report.memory or {}).values()) * 1e6
    if peak_growth >= GIVE_BACK_BYTES:
        collect_let_go()


def _compile_preset(name: str, model: torch.nn.Module, example_inputs: Any, passes: PassSpec,
                    backend: str | None, device: str | torch.device | None,
                    options: SessionOptions, budget: float | None = None) -> OptimizedModule:
    """Every candidate of preset ``name`` compiled in one session (capture and shared pipeline
    prefixes run once), those over budget dropped, the fastest kept."""
    from fxopt import presets

    if passes is not None:
        raise InputError("give either passes= or preset=, not both (a preset chooses its passes)")
    preset = presets.get_preset(name)
    if budget is not None:
        preset = presets.with_budget(preset, budget)
    if backend is not None:
        candidates = tuple(c for c in preset.candidates if c.backend == backend)
        if not candidates:
            raise InputError(f"preset {name!r} has no candidate for backend {backend!r}")
        preset = presets.Preset(preset.name, preset.description, candidates, preset.budget)
    for every_candidate_reads in ("calibration", "data", "agreement_data"):
        value = getattr(options, every_candidate_reads)
        if value is not None and not callable(value):
            setattr(options, every_candidate_reads, list(value))
    args, kwargs = split_example_inputs(example_inputs, options.example_kwargs)
    leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    target = torch.device(device) if device is not None else device_of(leaves)

    timer = PhaseTimer()
    with timer.running():
        session = Session(model, example_inputs, options)

        def pipeline_of(candidate: presets.Candidate) -> list[Pass]:
            return presets.within_budget(resolve_passes(expand_exact(candidate.passes, candidate.without)),
                                         budget)

        still_to_build: list[list[Pass]] = []

        def build(candidate: presets.Candidate) -> OptimizedModule:
            return session.compile(pipeline_of(candidate), candidate.backend, device, share_prefix=True,
                                   keep_for=still_to_build)

        def building(after: list[presets.Candidate]) -> None:
            # what the candidates built after this one do not continue from goes once its
            # passes ran (a large model's stages hold quantized copies of its weights)
            still_to_build.clear()
            for candidate in after:
                try:
                    still_to_build.append(pipeline_of(candidate))
                except FxoptError:  # it fails when it is built, with the reason
                    continue

        hold_bytes = session.evidence.values_bound(session.captured.gm)
        weight_bytes = graph_cost(session.captured.gm).weight_bytes
        proxy = stand_ins(session, device, pipeline_of, still_to_build) if weight_bytes > hold_bytes else None
        chosen, trials = presets.choose(
            preset, target, build,
            measure_error=lambda module: module.report.final_max_rel_err,
            run_example=lambda module: lambda: module(*args, **kwargs),
            calibrated=bool(options.calibration),
            # the candidates held at once share the compile's one memory bound
            hold_bytes=hold_bytes, size_of=lambda module: module.report.final.weight_bytes,
            building=building, weight_bytes=weight_bytes, proxy=proxy)
        session.keep_stages_for([])
    if proxy is not None and any(t.proxy_milliseconds is not None for t in trials):
        chosen.report.notes.append(
            f"preset {name}: the model's weights ({weight_bytes / 2**30:.2f} GiB) exceed the compile's memory "
            f"bound ({hold_bytes / 2**30:.2f} GiB): each candidate's passes ran on the whole model, a stand-in of "
            "a sample of its blocks was lowered and raced, and only the fastest was lowered whole")
    chosen.report.notes.append(presets.summary(preset, trials, chosen))
    _record_time(chosen.report, timer)
    session.check_user_model()
    return chosen
