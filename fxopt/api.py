"""``fxopt.compile``: capture, run the verified pass pipeline, lower to a backend."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from fxopt.capture import Signature, capture, normalize_example_inputs
from fxopt.cost import graph_cost
from fxopt.errors import FxoptError, InputError
from fxopt.pass_api import Pass, PassContext
from fxopt.pipeline import PassInstrument, PassManager, UserModelUntouched, reference_outputs
from fxopt.registry import resolve_passes
from fxopt.report import Report
from fxopt.verify import compare_outputs, module_fingerprint

PassSpec = str | Pass | Iterable[str | Pass] | None


class OptimizedModule(torch.nn.Module):
    """The optimized model: call it like the original.

    ``graph_module`` is the optimized fx graph and ``report`` says how it was made.
    Inputs are checked against the captured signature (count, dtype, static sizes).
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


def compile(  # noqa: A001 - mirrors torch.compile
    model: torch.nn.Module,
    example_inputs: Any,
    passes: PassSpec = None,
    backend: str = "eager",
    device: str | torch.device | None = None,
    strict: bool = False,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    calibration: Iterable[Any] | None = None,
    dynamic_shapes: Any = None,
    instruments: Sequence[PassInstrument] = (),
    max_rounds: int = 1,
) -> OptimizedModule:
    """Optimize ``model`` for inference and return a module that runs the result.

    Args:
        model: the model; never modified.
        example_inputs: a tuple of tensors ``model`` can be called with (one tensor is fine).
        passes: pass names, configured pass objects, or ``"a,b(opt=1)"``; None runs
            every registered exact pass.
        backend: ``"eager"`` (PyTorch, CPU or CUDA) or ``"onnx"`` (ONNX Runtime).
        device: where the optimized module runs; defaults to the example inputs' device.
        strict: raise :class:`fxopt.PassFailedError` when a pass fails instead of rolling back.
        example_kwargs: keyword arguments for the call, if any.
        calibration: an iterable of input tuples for lossy passes and their error budgets.
        dynamic_shapes: forwarded to ``torch.export`` (e.g. ``{"x": {0: Dim("batch")}}``).
        instruments: pass instruments (progress printing, graph dumps).
        max_rounds: run the pipeline again while passes keep changing the graph.
    """
    pipeline = resolve_passes(passes)  # bad names fail before any expensive work
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = normalize_example_inputs(example_inputs)
    report = Report(model=type(model).__name__, backend=backend)
    fingerprint = module_fingerprint(model)
    source = _inference_copy(model, report)

    start = time.perf_counter()
    gm = capture(source, args, example_kwargs, dynamic_shapes=dynamic_shapes)
    report.capture_seconds = time.perf_counter() - start
    signature: Signature = gm.meta["fxopt_signature"]
    batches = [signature.flatten(args, example_kwargs, what="example input")]
    batches += _calibration_batches(signature, calibration)
    user_model = UserModelUntouched(model, gm.meta.get("fxopt_sources", {}), baseline=fingerprint)

    optimized = optimize_captured(
        gm,
        batches,
        pipeline,
        report=report,
        backend=backend,
        device=device,
        strict=strict,
        instruments=instruments,
        max_rounds=max_rounds,
        user_model=user_model,
    )
    if module_fingerprint(model) != user_model.baseline:  # pragma: no cover - invariant 1
        raise FxoptError("internal error: the user's model changed during compilation")
    return optimized


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
) -> OptimizedModule:
    """The steps after capture, shared by every entry point: verified passes, then lowering.

    ``gm`` is a captured graph (``fxopt.capture`` output, with ``meta["fxopt_signature"]``);
    ``batches`` are its flat inputs, the example inputs first, then calibration batches.
    """
    from fxopt.backends import lower

    signature: Signature = gm.meta["fxopt_signature"]
    if len(batches) == 1 and not all(p.exact for p in pipeline):
        report.notes.append("no calibration data given: lossy passes were measured on the example inputs only")
    ctx = PassContext(batches=batches, calibrated=len(batches) > 1)
    ctx.reference = reference_outputs(gm, batches)

    report.original = graph_cost(gm)
    manager = PassManager(
        pipeline,
        strict=strict,
        instruments=instruments,
        max_rounds=max_rounds,
        user_model=user_model,
    )
    if pipeline:
        gm, report.passes = manager.run(gm, ctx)
        report.final_max_abs_err, report.final_max_rel_err = _drift(ctx)
    gm.meta.pop("fxopt_sources", None)  # lets the original weights go once nothing can need them
    report.final = graph_cost(gm)

    target = torch.device(device) if device is not None else _device_of(batches[0])
    report.device = str(target)
    start = time.perf_counter()
    runner = lower(backend, gm, signature, batches[0], target, report)
    report.lower_seconds = time.perf_counter() - start
    return OptimizedModule(runner.graph_module, signature, report, runner.run, target)


def _inference_copy(model: torch.nn.Module, report: Report) -> torch.nn.Module:
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if not training:
        return model
    message = (
        f"model is in training mode ({', '.join(training[:3])}{'...' if len(training) > 3 else ''}); "
        "fxopt optimized an eval() copy and left your model as it was"
    )
    warnings.warn(f"fxopt: {message}", stacklevel=3)
    report.notes.append(message)
    return copy.deepcopy(model).eval()


def _calibration_batches(signature: Signature, calibration: Iterable[Any] | None) -> list[list[torch.Tensor]]:
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        raise InputError("calibration must be an iterable of input tuples, e.g. [(x1,), (x2,)], not one tensor")
    batches = []
    for index, batch in enumerate(calibration):
        args = normalize_example_inputs(batch)
        batches.append(signature.flatten(args, None, what=f"calibration batch {index}, input"))
    return batches


def _drift(ctx: PassContext) -> tuple[float, float]:
    """Max abs and relative error of the final graph against the captured one."""
    worst_abs = worst_rel = 0.0
    for expected, actual in zip(ctx.original, ctx.reference):
        comparison = compare_outputs(expected, actual)
        worst_abs, worst_rel = max(worst_abs, comparison.max_abs), max(worst_rel, comparison.max_rel)
    return worst_abs, worst_rel


def _device_of(inputs: list[torch.Tensor]) -> torch.device:
    return inputs[0].device if inputs else torch.device("cpu")
