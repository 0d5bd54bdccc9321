"""Running the benchmark: every system prepared, then all timed side by side.

For each model, every system is prepared first (compiled, exported, quantized: that time
is ``compile_s``), then all of them are timed in one interleaved loop
(:func:`fxopt_bench.timing.measure_side_by_side`), so machine noise hits them alike.
Speedups are ratios of medians measured in that one run, each with its spread; errors are
against eager fp32 outputs.

    rows = fxopt_bench.compare(model, (ids,))    # the int8 peers and fxopt's int8, side by side
    print(fxopt_bench.format_rows(rows))
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxopt_bench.models import fresh_inputs
from fxopt_bench.systems import (
    SYSTEMS,
    BenchContext,
    Prepared,
    Unavailable,
    find_system,
    first_line,
)
from fxopt_bench.timing import Timing, measure_side_by_side, speedup

ROW_FIELDS = ("system", "model", "median_ms", "speedup_vs_eager", "max_rel_err", "compile_s",
              "params", "weight_bytes", "flops", "status", "note", "q1_ms", "q3_ms",
              "speedup_low", "speedup_high", "within_noise", "max_abs_err", "kernels",
              "fresh_rel_err", "output_rel_errs", "fresh_output_rel_errs", "output_names")


@dataclass
class Row:
    """One system on one model. ``status`` is ``ok``, ``skipped`` or ``failed``.

    ``speedup_low``/``speedup_high`` bound the speedup by the two systems' quartiles
    (:class:`fxopt_bench.timing.Speedup`); ``within_noise`` says that range reaches 1.00x.
    ``kernels``: an fxopt system's kernel choices (its report's ``kernels``), None for the others.
    ``max_rel_err`` is on the bench inputs (the ones calibrated systems calibrate on),
    ``fresh_rel_err`` on inputs drawn alike from another seed (:func:`fxopt_bench.models.fresh_inputs`);
    each is the largest over the outputs, whose own errors are ``output_rel_errs`` and
    ``fresh_output_rel_errs`` (in the order of ``output_names`` where the model names them).
    """

    system: str
    model: str
    median_ms: float | None = None
    speedup_vs_eager: float | None = None
    max_rel_err: float | None = None
    compile_s: float | None = None
    params: int | None = None
    weight_bytes: int | None = None
    flops: int | None = None  # matmul FLOPs per call (fxopt's cost model)
    status: str = "ok"
    note: str = ""
    q1_ms: float | None = None
    q3_ms: float | None = None
    speedup_low: float | None = None
    speedup_high: float | None = None
    within_noise: bool | None = None
    max_abs_err: float | None = None
    kernels: list[dict[str, Any]] | None = None  # fxopt's kernel choices (report.kernels); None for peers
    fresh_rel_err: float | None = None
    output_rel_errs: list[float] | None = None
    fresh_output_rel_errs: list[float] | None = None
    output_names: list[str] | None = None


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["mlp"])
    systems: list[str] | None = None
    quick: bool = False
    device: str = "cpu"
    warmup: int | None = None
    repeats: int | None = None
    llama_layers: int = 22  # --models scale-llama: layers of the 1.1B Llama shape
    llama_cases: list[str] | None = None  # and which of fxopt_bench.scale.LLAMA_CASES (None: all)
    outputs: list[str] | None = None  # serve only these outputs (SelectedOutputs); None: all of them


def flat_outputs(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a model's output structure, in pytree order (ModelOutput included);
    NumPy arrays (ONNX Runtime, OpenVINO, CTranslate2) become tensors."""
    leaves = pytree.tree_leaves(outputs)
    if not leaves and hasattr(outputs, "to_tuple"):
        leaves = pytree.tree_leaves(outputs.to_tuple())
    tensors = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
        elif hasattr(leaf, "__array__") and not isinstance(leaf, (int, float, bool, str)):
            tensors.append(torch.as_tensor(leaf))
    return tensors


class SelectedOutputs(torch.nn.Module):
    """``model`` serving only some of its outputs (``fxopt bench --outputs``): what an
    embedding server that reads BertModel's ``last_hidden_state`` runs. ``outputs`` are
    names of a transformers ModelOutput or positions in a tuple (``"0"``); one gives a
    tensor, several a tuple. ``config`` is the model's (NNCF's transformer recipe reads it)."""

    def __init__(self, model: torch.nn.Module, outputs: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.outputs = [int(o) if o.isdigit() else o for o in outputs]
        self.config = getattr(model, "config", None)

    def forward(self, *inputs: torch.Tensor) -> Any:
        result = self.model(*inputs)
        if isinstance(result, torch.Tensor):
            result = (result,)  # one output: position 0, not the tensor's first row
        picked = []
        for key in self.outputs:
            try:
                picked.append(result[key])
            except (KeyError, IndexError, TypeError) as exc:
                names = list(result.keys()) if hasattr(result, "keys") else f"{len(result)} positions"
                raise ValueError(f"the model has no output {key!r} (it has {names})") from exc
        return picked[0] if len(picked) == 1 else tuple(picked)


def output_names(outputs: Any) -> list[str] | None:
    """The names of a model's outputs in :func:`flat_outputs` order (a transformers
    ModelOutput's keys), or None when they have none."""
    if not hasattr(outputs, "keys"):
        return None
    names = [str(key) for key in outputs.keys()]
    if len(names) != len(flat_outputs(outputs)):
        return None  # a nested value: the flat order is not the keys'
    return names


def output_errors(expected: Sequence[torch.Tensor],
                  actual: Sequence[torch.Tensor]) -> tuple[float, list[float], str | None]:
    """``(max abs error, each output's rel error, mismatch)`` of ``actual`` against ``expected``.

    The relative error of each output is its largest absolute error over its largest finite
    magnitude, so near-zero elements do not inflate it (0 for an output with no finite
    element); a structural difference (count, shape, NaN pattern) is a mismatch instead, with
    infinite errors.
    """
    if len(expected) != len(actual):
        return float("inf"), [float("inf")], f"{len(actual)} outputs instead of {len(expected)}"
    max_abs, relative = 0.0, []
    for index, (e, a) in enumerate(zip(expected, actual)):
        if tuple(e.shape) != tuple(a.shape):
            return float("inf"), [float("inf")], (f"output {index} has shape {tuple(a.shape)} instead of "
                                                  f"{tuple(e.shape)}")
        e, a = e.detach().cpu().double(), a.detach().cpu().double()
        if not torch.equal(torch.isnan(e), torch.isnan(a)):
            return float("inf"), [float("inf")], f"output {index}: NaN pattern differs"
        finite = torch.isfinite(e) & torch.isfinite(a)
        if not finite.any():
            relative.append(0.0)
            continue
        diff = (e[finite] - a[finite]).abs().max().item()
        scale = e[finite].abs().max().item()
        max_abs = max(max_abs, diff)
        relative.append(diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return max_abs, relative, None


def run_model(name: str, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], config: BenchConfig,
              progress: Callable[[str], None], workdir: str | Path | None = None) -> list[Row]:
    """Prepare every system for one model, time them side by side, and return the rows."""
    device = torch.device(config.device)
    model = model.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    systems = config.systems or list(SYSTEMS)
    _check_systems(systems)
    rows: dict[str, Row] = {}
    prepared: dict[str, Prepared] = {}
    with tempfile.TemporaryDirectory(prefix="fxopt-bench-") as scratch:
        folder = Path(workdir) if workdir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        ctx = BenchContext(name, model, inputs, device, folder)
        fresh = fresh_inputs(inputs)
        with torch.inference_mode():
            output = model(*inputs)
            reference, fresh_reference = flat_outputs(output), flat_outputs(model(*fresh))
        names = output_names(output)
        for system_name in systems:
            system = find_system(system_name)
            reason = system.skip_reason(ctx)
            if reason is not None:
                rows[system_name] = Row(system_name, name, status="skipped", note=reason)
                progress(f"{name}: skipping {system_name}: {reason}")
                continue
            progress(f"{name}: preparing {system_name} ...")
            start = time.perf_counter()
            try:
                prepared[system_name] = system.build(ctx)
            except Unavailable as exc:
                rows[system_name] = Row(system_name, name, status="skipped", note=str(exc))
                progress(f"{name}:   skipped: {exc}")
                continue
            except Exception as exc:  # a bug in a system must not hide the others' numbers
                rows[system_name] = Row(system_name, name, status="failed",
                                        note=f"{type(exc).__name__}: {first_line(exc)}")
                progress(f"{name}:   failed: {type(exc).__name__}: {first_line(exc)}")
                continue
            progress(f"{name}:   ready in {time.perf_counter() - start:.1f}s")
        for system_name, ready in list(prepared.items()):
            try:
                with torch.inference_mode():
                    actual = flat_outputs(ready.run())
                max_abs, relative, mismatch = output_errors(reference, actual)
            except Exception as exc:
                rows[system_name] = Row(system_name, name, status="failed", note=f"run failed: {first_line(exc)}")
                del prepared[system_name]
                continue
            row = Row(system_name, name, compile_s=ready.compile_s, params=ready.params,
                      weight_bytes=ready.weight_bytes, note=ready.note,
                      flops=ready.flops if ready.flops is not None else ctx.model_flops(),
                      max_abs_err=max_abs, max_rel_err=max(relative, default=0.0), kernels=ready.kernels,
                      output_names=names, output_rel_errs=None if mismatch else relative)
            fresh_problem = None
            try:  # a system that cannot take other inputs still has its bench-input row
                with torch.inference_mode():
                    fresh_actual = flat_outputs(ready.run(*fresh))
                _, fresh_relative, fresh_mismatch = output_errors(fresh_reference, fresh_actual)
                row.fresh_rel_err = max(fresh_relative, default=0.0)
                if fresh_mismatch:
                    fresh_problem = f"fresh input: {fresh_mismatch}"
                else:
                    row.fresh_output_rel_errs = fresh_relative
            except Exception as exc:
                fresh_problem = f"fresh input failed: {first_line(exc)}"
            for problem in (mismatch, fresh_problem):
                if problem:
                    row.note = (row.note + "; " if row.note else "") + problem
            rows[system_name] = row
        warmup = config.warmup if config.warmup is not None else (1 if config.quick else 3)
        repeats = config.repeats if config.repeats is not None else (10 if config.quick else 30)
        if prepared:
            progress(f"{name}: timing {len(prepared)} systems interleaved, {warmup} warm-up + {repeats} repeats ...")
            times = measure_side_by_side({s: p.run for s, p in prepared.items()}, warmup=warmup, repeats=repeats)
            for system_name, timing in times.items():
                _fill_timing(rows[system_name], timing, times.get("eager"))
    return [rows[s] for s in systems]


def _fill_timing(row: Row, timing: Timing, eager: Timing | None) -> None:
    row.median_ms, row.q1_ms, row.q3_ms = timing.median, timing.q1, timing.q3
    if eager is None:
        return
    ratio = speedup(eager, timing)
    row.speedup_vs_eager, row.speedup_low, row.speedup_high = ratio.ratio, ratio.low, ratio.high
    row.within_noise = ratio.within_noise if row.system != "eager" else None


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"machine": ..., "rows": [...], "scale": [...]}``."""
    from fxopt_bench.models import MODELS
    from fxopt_bench.scale import run_scale, run_scale_llama

    progress = progress or (lambda message: None)
    _check_systems(config.systems or [])
    unknown = [m for m in config.models if m not in MODELS and m not in ("scale", "scale-llama")]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r} (available: {', '.join([*MODELS, 'scale', 'scale-llama'])})")
    result: dict[str, Any] = {"machine": machine_info(config.device), "rows": [], "scale": []}
    if config.outputs:
        result["outputs"] = list(config.outputs)
    for name in config.models:
        if name == "scale":
            result["scale"] = run_scale(quick=config.quick, progress=progress)
            continue
        if name == "scale-llama":
            result["scale_llama"] = run_scale_llama(layers=config.llama_layers, cases=config.llama_cases,
                                                    progress=progress)
            continue
        progress(f"{name}: building ({MODELS[name].description}{', quick size' if config.quick else ''}) ...")
        model, inputs = MODELS[name].build(config.quick)
        if config.outputs:
            model = SelectedOutputs(model, config.outputs)
        rows = run_model(name, model, inputs, config, progress)
        result["rows"].extend(asdict(r) for r in rows)
        del model
    return result


def _check_systems(names: Sequence[str]) -> None:
    unknown = [s for s in names if find_system(s) is None]
    if unknown:
        raise ValueError(f"unknown system {unknown[0]!r} (available: {', '.join(SYSTEMS)}; and a preset row "
                         f"held to another budget, e.g. fxopt-preset-int8@0.014)")


INT8_COMPARISON = ("eager", "ort", "ort-int8", "torch.ao-int8", "fxopt-int8", "fxopt-int8-onnx",
                   "fxopt-int8-pt", "fxopt-int8-pt-onnx")


def compare(
    model: torch.nn.Module,
    example_inputs: Any,
    systems: Sequence[str] | None = None,
    *,
    repeats: int = 20,
    warmup: int = 3,
    workdir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Build each system (default: :data:`INT8_COMPARISON`), time them side by side and
    measure their error against eager fp32.

    Returns one row per system: ``name`` (the system's display name), ``ms`` (median),
    ``speedup`` (vs eager fp32) with ``speedup_low``/``speedup_high``, ``max_abs_err`` and
    ``max_rel_err`` (on ``example_inputs``), ``fresh_rel_err`` (on inputs drawn alike from
    another seed, :func:`fxopt_bench.models.fresh_inputs`), or ``error`` when it could not be
    built or run.
    """
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    names = list(systems) if systems is not None else list(INT8_COMPARISON)
    if "eager" not in names:
        names.insert(0, "eager")
    config = BenchConfig(systems=names, repeats=repeats, warmup=warmup)  # run_model checks the names
    results = []
    for row in run_model("model", model, inputs, config, lambda message: None, workdir=workdir):
        title = find_system(row.system).title
        if row.status != "ok":
            results.append({"name": title, "error": f"{row.status}: {row.note}"})
            continue
        results.append({"name": title, "ms": row.median_ms, "speedup": row.speedup_vs_eager,
                        "speedup_low": row.speedup_low, "speedup_high": row.speedup_high,
                        "within_noise": row.within_noise,
                        "max_abs_err": row.max_abs_err, "max_rel_err": row.max_rel_err,
                        "fresh_rel_err": row.fresh_rel_err})
    return results


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`compare` as a table, speedups with their spread."""
    lines = [f"{'system':<30} {'ms':>9} {'vs eager':>22} {'max abs err':>12} {'max rel err':>12} {'fresh err':>12}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['name']:<30} {row['error']}")
            continue
        flag = " ~" if row["within_noise"] else ""
        ratio = f"{row['speedup']:.2f}x [{row['speedup_low']:.2f}-{row['speedup_high']:.2f}]{flag}"
        lines.append(f"{row['name']:<30} {row['ms']:>9.2f} {ratio:>22} "
                     f"{row['max_abs_err']:>12.3e} {row['max_rel_err']:>12.3e} "
                     + (f"{row['fresh_rel_err']:>12.3e}" if row["fresh_rel_err"] is not None else f"{'-':>12}"))
    return "\n".join(lines)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": device,
    }
    for package in ("onnxruntime", "onnx", "transformers", "openvino", "nncf", "ctranslate2", "torchao"):
        info[package] = _version(package)
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import fxopt

        info["fxopt"] = fxopt.__version__
        info["passes"] = [t.name for t in fxopt.list_passes()]
    except Exception:
        pass
    return info


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
