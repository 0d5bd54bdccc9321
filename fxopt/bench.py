"""``fxopt bench``: fxopt against eager PyTorch and its peers, measured side by side.

For each model, every system is prepared first (compiled, exported, quantized: that time
is ``compile_s``), then all of them are timed in one interleaved loop
(:func:`fxopt.timing.measure_side_by_side`), so machine noise hits them alike. Speedups
are ratios of medians measured in that one run; errors are against eager fp32 outputs.

Systems are found at run time: a system whose pass or backend is not installed (or fails
to prepare) becomes a ``skipped`` row with the reason instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

ROW_FIELDS = ("system", "model", "median_ms", "speedup_vs_eager", "max_rel_err", "compile_s",
              "params", "weight_bytes", "flops", "status", "note")


@dataclass
class Row:
    """One system on one model. ``status`` is ``ok``, ``skipped`` or ``failed``."""

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


class Unavailable(Exception):
    """A system cannot run here (missing pass, backend, package or device); the message says why."""


@dataclass
class Prepared:
    """A system ready to time: ``run()`` returns the model's outputs for the bench inputs."""

    run: Callable[[], Any]
    compile_s: float
    params: int
    weight_bytes: int
    note: str = ""
    flops: int | None = None  # None: the model's own (unchanged) FLOPs


@dataclass
class BenchContext:
    """What systems share for one model: the model, inputs, device and a scratch directory."""

    name: str
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    device: torch.device
    workdir: Path
    _onnx_fp32: Path | None = None
    _onnx_error: str | None = None
    _flops: int | None = None

    def model_flops(self) -> int | None:
        """The unoptimized model's matmul FLOPs, from fxopt's capture and cost model."""
        if self._flops is None:
            from fxopt.capture import capture
            from fxopt.cost import graph_cost

            try:
                self._flops = graph_cost(capture(self.model, self.inputs)).flops
            except Exception:
                return None
        return self._flops

    def onnx_fp32(self) -> Path:
        """The eager model exported by ``torch.onnx.export`` (shared by the ORT systems)."""
        if self._onnx_error is not None:
            raise Unavailable(self._onnx_error)
        if self._onnx_fp32 is None:
            path = self.workdir / f"{self.name}-fp32.onnx"
            try:
                with _quiet():
                    torch.onnx.export(self.model, self.inputs, str(path), dynamo=True, verbose=False)
            except Exception as exc:
                self._onnx_error = f"torch.onnx.export failed: {_first_line(exc)}"
                raise Unavailable(self._onnx_error) from exc
            self._onnx_fp32 = path
        return self._onnx_fp32


# ---------------------------------------------------------------- systems

def _eager(ctx: BenchContext) -> Prepared:
    params, weight_bytes = state_cost(ctx.model)
    return Prepared(lambda: ctx.model(*ctx.inputs), 0.0, params, weight_bytes)


def _torch_compile(ctx: BenchContext) -> Prepared:
    start = time.perf_counter()
    try:
        compiled = torch.compile(ctx.model, backend="inductor")
        with torch.inference_mode(), _quiet():
            compiled(*ctx.inputs)  # compilation happens on the first call
    except Exception as exc:
        raise Unavailable(f"torch.compile failed: {_first_line(exc)}") from exc
    params, weight_bytes = state_cost(ctx.model)
    return Prepared(lambda: compiled(*ctx.inputs), time.perf_counter() - start, params, weight_bytes)


def _ort_fp32(ctx: BenchContext) -> Prepared:
    start = time.perf_counter()
    path = ctx.onnx_fp32()
    return _ort_prepared(ctx, path, start)


def _ort_int8(ctx: BenchContext) -> Prepared:
    if ctx.device.type != "cpu":
        raise Unavailable("ORT dynamic int8 quantization runs on CPU only")
    start = time.perf_counter()
    source = ctx.onnx_fp32()
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise Unavailable(f"onnxruntime.quantization is not available: {exc}") from exc
    import onnx

    # The exporter's value_info can disagree with ONNX shape inference, which the
    # quantizer runs; without it the quantizer infers the shapes itself.
    model = onnx.load(str(source))
    del model.graph.value_info[:]
    stripped = ctx.workdir / f"{ctx.name}-fp32-plain.onnx"
    onnx.save(model, str(stripped))
    target = ctx.workdir / f"{ctx.name}-ort-int8.onnx"
    try:
        with _quiet():
            quantize_dynamic(str(stripped), str(target), weight_type=QuantType.QInt8)
    except Exception as exc:
        raise Unavailable(f"onnxruntime quantize_dynamic failed: {_first_line(exc)}") from exc
    return _ort_prepared(ctx, target, start)


def _torch_ao_int8(ctx: BenchContext) -> Prepared:
    if ctx.device.type != "cpu":
        raise Unavailable("torch.ao dynamic quantization runs on CPU only")
    start = time.perf_counter()
    try:
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = quantize_dynamic(copy.deepcopy(ctx.model), {torch.nn.Linear}, dtype=torch.qint8)
    except Exception as exc:
        raise Unavailable(f"torch.ao quantize_dynamic failed: {_first_line(exc)}") from exc
    params, weight_bytes = state_cost(quantized)
    return Prepared(lambda: quantized(*ctx.inputs), time.perf_counter() - start, params, weight_bytes)


def _fxopt_system(extra_pass: str | None, backend: str) -> Callable[[BenchContext], Prepared]:
    """fxopt with the default (exact) pipeline, optionally followed by one lossy pass."""

    def prepare(ctx: BenchContext) -> Prepared:
        import fxopt
        from fxopt.errors import FxoptError, UnknownPassError
        from fxopt.registry import default_pipeline, get_pass_type, parse_pass_spec

        passes: list[Any] = list(default_pipeline())
        if extra_pass is not None:
            name, _ = parse_pass_spec(extra_pass)
            try:
                get_pass_type(name)
            except UnknownPassError as exc:
                raise Unavailable(f"pass '{name}' is not installed") from exc
            passes.append(extra_pass)
        if backend != "eager":
            import importlib

            try:
                importlib.import_module(f"fxopt.backends.{backend}")
            except ImportError as exc:
                raise Unavailable(f"fxopt backend '{backend}' is not installed") from exc
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt = fxopt.compile(ctx.model, ctx.inputs, passes=passes, backend=backend,
                                    device=ctx.device)
        except FxoptError as exc:
            raise Unavailable(f"fxopt.compile failed: {_first_line(exc)}") from exc
        seconds = time.perf_counter() - start
        report = opt.report
        note = _pipeline_note(report, parse_pass_spec(extra_pass)[0] if extra_pass else None)
        if any("rolled back" in str(w.message) for w in caught) and "rolled back" not in note:
            note = (note + "; " if note else "") + "a pass was rolled back"
        return Prepared(lambda: opt(*ctx.inputs), seconds, report.final.params,
                        report.final.weight_bytes, note, report.final.flops)

    return prepare


def _pipeline_note(report: Any, extra_pass: str | None) -> str:
    """What the pipeline did, in a few words: applied counts and any rollback."""
    parts = []
    for record in report.passes:
        if record.status == "rolled back":
            parts.append(f"{record.name} rolled back ({record.message})")
        elif record.name == extra_pass:
            text = f"{record.name}: {record.applied}/{record.matched} applied"
            if record.skipped:
                reason, _ = record.skipped.most_common(1)[0]
                total = sum(record.skipped.values())
                text += f", {total} skipped" + (f", e.g. {reason}" if len(record.skipped) > 1 else f": {reason}")
            parts.append(text)
    applied = [f"{r.name} x{r.applied}" for r in report.passes if r.status == "applied" and r.name != extra_pass]
    if applied and extra_pass is None:
        parts.insert(0, ", ".join(applied))
    return "; ".join(parts)


SYSTEMS: dict[str, Callable[[BenchContext], Prepared]] = {
    "eager": _eager,
    "torch.compile": _torch_compile,
    "ort": _ort_fp32,
    "fxopt": _fxopt_system(None, "eager"),
    "fxopt-onnx": _fxopt_system(None, "onnx"),
    "fxopt-int8": _fxopt_system("quantize-int8", "eager"),
    "fxopt-int8-onnx": _fxopt_system("quantize-int8", "onnx"),
    "fxopt-int8-pt": _fxopt_system("quantize-int8(activations='dynamic-tensor')", "eager"),
    "fxopt-int8-pt-onnx": _fxopt_system("quantize-int8(activations='dynamic-tensor')", "onnx"),
    "fxopt-lowrank": _fxopt_system("low-rank", "eager"),
    "fxopt-prune": _fxopt_system("prune-hidden", "eager"),
    "torch.ao-int8": _torch_ao_int8,
    "ort-int8": _ort_int8,
}

SYSTEM_HELP = {
    "eager": "PyTorch eager, fp32 (the baseline)",
    "torch.compile": "torch.compile with Inductor, fp32",
    "ort": "torch.onnx.export + ONNX Runtime, fp32",
    "fxopt": "fxopt default lossless pipeline, eager backend",
    "fxopt-onnx": "fxopt default lossless pipeline, ONNX Runtime backend",
    "fxopt-int8": "fxopt lossless pipeline + quantize-int8, eager backend",
    "fxopt-int8-onnx": "fxopt lossless pipeline + quantize-int8, ONNX Runtime backend",
    "fxopt-int8-pt": "as fxopt-int8, activations quantized per tensor (dynamic-tensor), eager backend",
    "fxopt-int8-pt-onnx": "as fxopt-int8, activations quantized per tensor (dynamic-tensor), ONNX Runtime backend",
    "fxopt-lowrank": "fxopt lossless pipeline + low-rank (default budget), eager backend",
    "fxopt-prune": "fxopt lossless pipeline + prune-hidden (default budget), eager backend",
    "torch.ao-int8": "torch.ao.quantization.quantize_dynamic on nn.Linear, qint8",
    "ort-int8": "onnxruntime.quantization.quantize_dynamic of the fp32 export, QInt8",
}


def ort_session_options() -> Any:
    """ORT options for side-by-side timing: no busy-waiting threads stealing the other
    systems' cores between calls, and the same thread count PyTorch uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    return options


def _ort_prepared(ctx: BenchContext, path: Path, start: float) -> Prepared:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise Unavailable(f"onnxruntime is not installed: {exc}") from exc
    providers = ["CPUExecutionProvider"]
    if ctx.device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Unavailable("this onnxruntime build has no CUDAExecutionProvider")
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), ort_session_options(), providers=providers)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(ctx.inputs):
        raise Unavailable(f"the ONNX graph takes {len(names)} inputs, the model {len(ctx.inputs)}")
    feed = {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, ctx.inputs)}
    session.run(None, feed)
    params, weight_bytes = onnx_cost(path)

    def run() -> list[torch.Tensor]:
        return [torch.from_numpy(out) for out in session.run(None, feed)]

    return Prepared(run, time.perf_counter() - start, params, weight_bytes)


# ---------------------------------------------------------------- costs

def state_cost(module: torch.nn.Module) -> tuple[int, int]:
    """Parameters and bytes of a module's state (buffers included, shared tensors once),
    counted like fxopt's cost model: float and int8 tensors are parameters."""
    seen: set[tuple[int, int]] = set()
    params = weight_bytes = 0
    for value in module.state_dict().values():
        for tensor in _tensors_in(value):
            key = (_storage_key(tensor), tensor.numel())
            if key in seen:
                continue
            seen.add(key)
            weight_bytes += tensor.numel() * tensor.element_size()
            if tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.uint8, torch.qint8, torch.quint8):
                params += tensor.numel()
    return params, weight_bytes


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors_in(item)]
    return []


def _storage_key(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except Exception:  # quantized tensors on some builds
        return id(tensor)


def onnx_cost(path: Path) -> tuple[int, int]:
    """Parameters and bytes of an ONNX model's initializers (external data included)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    params = weight_bytes = 0
    for init in model.graph.initializer:
        numel = 1
        for d in init.dims:
            numel *= d
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        weight_bytes += numel * itemsize
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                              onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            params += numel
    return params, weight_bytes


# ---------------------------------------------------------------- running

@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["mlp"])
    systems: list[str] | None = None
    quick: bool = False
    device: str = "cpu"
    warmup: int | None = None
    repeats: int | None = None


def flat_outputs(outputs: Any) -> list[Any]:
    """The tensors of a model's output structure, in pytree order (ModelOutput included)."""
    leaves = pytree.tree_leaves(outputs)
    if not leaves and hasattr(outputs, "to_tuple"):
        leaves = pytree.tree_leaves(outputs.to_tuple())
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def run_model(name: str, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], config: BenchConfig,
              progress: Callable[[str], None]) -> list[Row]:
    """Prepare every system for one model, time them side by side, and return the rows."""
    from fxopt.timing import measure_side_by_side
    from fxopt.verify import compare_outputs

    device = torch.device(config.device)
    model = model.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    systems = config.systems or list(SYSTEMS)
    rows: dict[str, Row] = {}
    prepared: dict[str, Prepared] = {}
    with tempfile.TemporaryDirectory(prefix="fxopt-bench-") as tmp:
        ctx = BenchContext(name, model, inputs, device, Path(tmp))
        with torch.inference_mode():
            reference = flat_outputs(model(*inputs))
        for system in systems:
            progress(f"{name}: preparing {system} ...")
            start = time.perf_counter()
            try:
                prepared[system] = SYSTEMS[system](ctx)
            except Unavailable as exc:
                rows[system] = Row(system, name, status="skipped", note=str(exc))
                progress(f"{name}:   skipped: {exc}")
                continue
            except Exception as exc:  # a bug in a system must not hide the others' numbers
                rows[system] = Row(system, name, status="failed", note=f"{type(exc).__name__}: {_first_line(exc)}")
                progress(f"{name}:   failed: {type(exc).__name__}: {_first_line(exc)}")
                continue
            progress(f"{name}:   ready in {time.perf_counter() - start:.1f}s")
        for system, ready in list(prepared.items()):
            try:
                with torch.inference_mode():
                    comparison = compare_outputs(reference, flat_outputs(ready.run()))
            except Exception as exc:
                rows[system] = Row(system, name, status="failed", note=f"run failed: {_first_line(exc)}")
                del prepared[system]
                continue
            row = Row(system, name, compile_s=ready.compile_s, params=ready.params,
                      weight_bytes=ready.weight_bytes, note=ready.note,
                      flops=ready.flops if ready.flops is not None else ctx.model_flops())
            row.max_rel_err = float("inf") if comparison.mismatch else comparison.max_rel
            if comparison.mismatch:
                row.note = (row.note + "; " if row.note else "") + comparison.mismatch
            rows[system] = row
        warmup = config.warmup if config.warmup is not None else (1 if config.quick else 3)
        repeats = config.repeats if config.repeats is not None else (10 if config.quick else 30)
        if prepared:
            progress(f"{name}: timing {len(prepared)} systems interleaved, {warmup} warm-up + {repeats} repeats ...")
            times = measure_side_by_side({s: p.run for s, p in prepared.items()}, warmup=warmup, repeats=repeats)
            eager_ms = times.get("eager")
            for system, ms in times.items():
                rows[system].median_ms = ms
                if eager_ms is not None:
                    rows[system].speedup_vs_eager = eager_ms / ms
    return [rows[s] for s in systems]


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"machine": ..., "rows": [...], "scale": [...]}``."""
    from fxopt.bench_models import MODELS

    progress = progress or (lambda message: None)
    unknown = [s for s in (config.systems or []) if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system {unknown[0]!r} (available: {', '.join(SYSTEMS)})")
    unknown = [m for m in config.models if m not in MODELS and m != "scale"]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r} (available: {', '.join([*MODELS, 'scale'])})")
    result: dict[str, Any] = {"machine": machine_info(config.device), "rows": [], "scale": []}
    for name in config.models:
        if name == "scale":
            result["scale"] = run_scale(quick=config.quick, progress=progress)
            continue
        progress(f"{name}: building ({MODELS[name].description}{', quick size' if config.quick else ''}) ...")
        model, inputs = MODELS[name].build(config.quick)
        rows = run_model(name, model, inputs, config, progress)
        result["rows"].extend(asdict(r) for r in rows)
        del model
    return result


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
    for package in ("onnxruntime", "onnx", "transformers"):
        try:
            info[package] = __import__(package).__version__
        except Exception:
            info[package] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import fxopt

        info["fxopt"] = fxopt.__version__
        info["passes"] = [t.name for t in fxopt.list_passes()]
    except Exception:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- scale

SCALE_DEPTHS = (100, 1000, 2000)
QUICK_SCALE_DEPTHS = (25, 50, 100)


def run_scale(quick: bool = False, progress: Callable[[str], None] | None = None,
              depths: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Pass-manager time per node on deep MLPs, and peak memory of ``fxopt.compile``.

    Each probe runs in a fresh interpreter so its peak resident memory is its own: the
    kernel's high-water mark (VmHWM) is reset just before ``fxopt.compile`` and read right
    after. RSS sees every allocation (torch's CPU allocator, Python objects, fx graphs),
    which tracemalloc does not. The last probe is the wide benchmark MLP, whose weights
    dominate its memory, to relate the peak to the model's weight bytes. Each probe first
    compiles a tiny model, so one-time imports are not counted.
    """
    progress = progress or (lambda message: None)
    depths = list(depths or (QUICK_SCALE_DEPTHS if quick else SCALE_DEPTHS))
    probes: list[dict[str, Any]] = [{"depth": d, "width": 16} for d in depths]
    probes.append({"wide": True, "quick": quick})
    results = []
    for probe in probes:
        label = f"{probe['depth']} layers" if "depth" in probe else "wide mlp"
        progress(f"scale: {label} ...")
        out = subprocess.run([sys.executable, "-m", "fxopt.bench", "--probe", json.dumps(probe)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"scale probe {probe} failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        progress(f"scale:   {row['nodes']} nodes, pass manager {row['pass_manager_s']:.2f}s "
                 f"({row['us_per_node']:.0f} us/node), peak +{row['peak_mb']:.0f} MB")
        results.append(row)
    return results


def _probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child process of :func:`run_scale`."""
    import fxopt
    from fxopt.bench_models import build_mlp
    from fxopt.capture import capture
    from fxopt.pass_api import PassContext
    from fxopt.registry import default_pipeline

    if spec.get("wide"):
        model, inputs = build_mlp(spec.get("quick", False))
        name = "mlp (wide)"
    else:
        model, inputs = build_mlp(depth=spec["depth"], width=spec["width"])
        name = f"mlp x{spec['depth']}"
    params, weight_bytes = state_cost(model)
    pipeline = default_pipeline()
    # Warm up on a tiny model first: the first export imports and initializes ~100 MB of
    # torch machinery (dynamo, sympy, fake tensors) that is no part of compiling this model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxopt.compile(*build_mlp(depth=2, width=4), passes=pipeline)
    gc.collect()

    # Memory: the whole of fxopt.compile, from a reset high-water mark.
    rss_before = _rss_bytes("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxopt.compile(model, inputs, passes=pipeline)
    compile_s = time.perf_counter() - start
    peak = _rss_bytes("VmHWM") if reset else _maxrss_bytes()
    peak_growth = max(0, peak - rss_before)

    # Time: the pass manager alone, on a freshly captured graph.
    start = time.perf_counter()
    gm = capture(model, inputs)
    capture_s = time.perf_counter() - start
    nodes = len(gm.graph.nodes)
    ctx = PassContext(batches=[list(inputs)])
    start = time.perf_counter()
    _, records = fxopt.PassManager(pipeline).run(gm, ctx)
    manager_s = time.perf_counter() - start
    return {
        "model": name,
        "layers": spec.get("depth"),
        "nodes": nodes,
        "capture_s": capture_s,
        "pass_manager_s": manager_s,
        "us_per_node": manager_s / nodes * 1e6,
        "per_pass_s": {r.name: r.seconds for r in records},
        "compile_s": compile_s,
        "params": params,
        "weight_bytes": weight_bytes,
        "peak_mb": peak_growth / 1e6,
        "peak_over_weights": peak_growth / weight_bytes,
        "peak_measure": "VmHWM reset" if reset else "ru_maxrss (not reset: an upper bound on growth)",
    }


def _rss_bytes(field_name: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _maxrss_bytes()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------- output

def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    header = ["system", "model", "median ms", "speedup", "max rel err", "compile s", "params", "weight MB",
              "GFLOPs", "note"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["system"], r["model"], "-", "-", "-", "-", "-", "-", "-", f"{r['status']}: {r['note']}"])
            continue
        body.append([
            r["system"], r["model"], f"{r['median_ms']:.3f}",
            f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] is not None else "-",
            f"{r['max_rel_err']:.1e}", f"{r['compile_s']:.1f}", _count(r["params"]),
            f"{r['weight_bytes'] / 1e6:.1f}",
            f"{r['flops'] / 1e9:.3g}" if r.get("flops") is not None else "-", r["note"],
        ])
    return _table(header, body, markdown)


def format_scale(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    header = ["graph", "nodes", "capture s", "pass manager s", "us / node", "compile s", "weight MB",
              "peak MB during compile", "peak / weights"]
    body = [[r["model"], str(r["nodes"]), f"{r['capture_s']:.2f}", f"{r['pass_manager_s']:.2f}",
             f"{r['us_per_node']:.0f}", f"{r['compile_s']:.2f}", f"{r['weight_bytes'] / 1e6:.1f}",
             f"{r['peak_mb']:.0f}", f"{r['peak_over_weights']:.2f}x"] for r in rows]
    return _table(header, body, markdown)


def _table(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
        return "\n".join(lines)
    rows = [header, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for i, row in enumerate(rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    return "\n".join(lines)


def format_machine(machine: dict[str, Any]) -> str:
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    return (f"{machine['cpu']} ({machine['logical_cpus']} logical CPUs, torch threads {machine['torch_threads']}"
            f"{gpu}); torch {machine['torch']}, onnxruntime {machine.get('onnxruntime')}, "
            f"transformers {machine.get('transformers')}, Python {machine['python']}")


def write_markdown(result: dict[str, Any], path: str | Path, command: str) -> None:
    parts = [f"Machine: {format_machine(result['machine'])}", "", f"Command: `{command}`", ""]
    if result["rows"]:
        parts += [format_table(result["rows"], markdown=True), ""]
    if result["scale"]:
        parts += [format_scale(result["scale"], markdown=True), ""]
    Path(path).write_text("\n".join(parts))


def write_plot(result: dict[str, Any], path: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'fxopt[plot]'") from exc
    rows = [r for r in result["rows"] if r["status"] == "ok" and r["speedup_vs_eager"] is not None]
    models = list(dict.fromkeys(r["model"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models) * max(1, len(systems)) * 0.5), 4))
    for i, system in enumerate(systems):
        xs, ys = [], []
        for j, model in enumerate(models):
            for r in rows:
                if r["model"] == model and r["system"] == system:
                    xs.append(j + i * width)
                    ys.append(r["speedup_vs_eager"])
        ax.bar(xs, ys, width, label=system)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(models))], models)
    ax.set_ylabel("speedup vs eager (median, side by side)")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence exporters, quantizers and compilers that print progress to stdout or the log."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


# ---------------------------------------------------------------- CLI

def run_bench_cli(args: Any) -> int:
    """``fxopt bench``: see ``fxopt bench --help``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fxopt bench: --device cuda was requested but no CUDA device is available on this "
              "machine (torch.cuda.is_available() is False); rerun with --device cpu", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fxopt bench: --plot needs matplotlib: pip install 'fxopt[plot]'", file=sys.stderr)
            return 2
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else None
    config = BenchConfig(models=models, systems=systems, quick=args.quick, device=args.device,
                         repeats=getattr(args, "repeats", None), warmup=getattr(args, "warmup", None))
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[bench {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    result = run_bench(config, progress)
    print(f"machine: {format_machine(result['machine'])}")
    if result["rows"]:
        print(format_table(result["rows"]))
    if result["scale"]:
        print(format_scale(result["scale"]))
    command = "fxopt bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else f"fxopt bench --models {args.models}"
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
        print(f"JSON written to {args.json}")
    if args.markdown:
        write_markdown(result, args.markdown, command)
        print(f"markdown written to {args.markdown}")
    if args.plot:
        write_plot(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (strict JSON has no inf/NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    print(json.dumps(_probe(json.loads(sys.argv[2]))))
