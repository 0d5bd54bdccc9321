"""The systems ``fxopt bench`` compares, as data: one :class:`System` per row, one builder
per peer.

A system is a name, a description, the packages it needs, and ``build(ctx) -> Prepared``:
a zero-argument callable that runs the model on the bench inputs, plus what preparing it
cost. :meth:`System.skip_reason` says, before anything is built, why a system cannot run
here (a package missing, a CPU-only peer on a GPU run); a builder raises
:class:`Unavailable` for reasons only the model reveals (CTranslate2 converts BERT only).
Either way the run gets a ``skipped`` row with the reason and goes on.

Each peer runs the recipe its own documentation recommends, with the pitfalls that would
make it look worse (or wrongly better) than it is handled:

- OpenVINO's CPU plugin picks bf16 by itself on CPUs that have it: the lossless row asks
  for f32 (``INFERENCE_PRECISION_HINT=f32``), the ``openvino-bf16`` row keeps the default.
- NNCF post-training quantization needs ``model_type=TRANSFORMER`` on transformer models
  (its defaults quantize the attention's softmax inputs and lose accuracy, ~5e-2).
- Inductor freezing is a global config flag (``torch._inductor.config.freezing``); the
  ``options={"freezing": True}`` of ``torch.compile`` is not honoured. It is set only while
  the system compiles.
- PT2E's x86 quantizer fails on a Linear whose output nothing uses, so dead code is
  eliminated from the exported graph first.
- CTranslate2's BERT converter reads ``position_embedding_type``, which transformers 5 no
  longer writes to the config.

Every system uses the same number of threads (``torch.get_num_threads()``), and ONNX
Runtime's threads do not spin between calls, so no system steals the others' cores.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PEERS_EXTRA = "pip install 'fxopt[peers]'"


class Unavailable(Exception):
    """A system cannot run here (missing pass, backend, package or device); the message says why."""


@dataclass
class Prepared:
    """A system ready to time: ``run()`` returns the model's outputs for the bench inputs,
    in whatever form the system produces them (tensors, NumPy arrays, a ModelOutput);
    ``run(*inputs)`` for other inputs of the same shapes and dtypes (the fresh-input error)."""

    run: Callable[..., Any]
    compile_s: float
    params: int | None
    weight_bytes: int | None
    note: str = ""
    flops: int | None = None  # None: the model's own (unchanged) FLOPs
    kernels: list[dict[str, Any]] | None = None  # fxopt's kernel choices (report.kernels); None for peers


@dataclass
class BenchContext:
    """What systems share for one model: the model, inputs, device, a scratch directory,
    and artifacts several systems build from (the ONNX export, the OpenVINO model)."""

    name: str
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    device: torch.device
    workdir: Path
    _shared: dict[str, Any] = field(default_factory=dict)
    _flops: int | None = None

    @property
    def config(self) -> Any:
        """The transformers config of the model, or None for other models."""
        return getattr(self.model, "config", None)

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, once per model: a failure is remembered and raised again."""
        if key not in self._shared:
            try:
                self._shared[key] = make()
            except Exception as exc:
                self._shared[key] = exc
        value = self._shared[key]
        if isinstance(value, Exception):
            raise value
        return value

    def model_flops(self) -> int | None:
        """The unoptimized model's matmul FLOPs, from fxopt's capture and cost model."""
        if self._flops is None:
            import fxopt

            try:
                with _quiet():
                    self._flops = fxopt.compile(self.model, self.inputs, passes=[]).report.original.flops
            except Exception:
                return None
        return self._flops

    def onnx_fp32(self) -> Path:
        """The eager model exported by ``torch.onnx.export`` (shared by the ORT systems)."""

        def export() -> Path:
            path = self.workdir / f"{self.name}-fp32.onnx"
            try:
                with _quiet():
                    torch.onnx.export(self.model, self.inputs, str(path), dynamo=True, verbose=False)
            except Exception as exc:
                cause = exc.__cause__  # the exporter's first line is generic; its cause says what failed
                detail = f" ({type(cause).__name__}: {first_line(cause)})" if cause is not None else ""
                raise Unavailable(f"torch.onnx.export failed: {first_line(exc)}{detail}") from exc
            return path

        return self.shared("onnx-fp32", export)


@dataclass(frozen=True)
class System:
    """One row of the benchmark: what it is, what it needs, and how to build it."""

    name: str
    description: str
    build: Callable[[BenchContext], Prepared]
    requires: tuple[str, ...] = ()  # importable modules; missing ones skip the system
    cpu_only: bool = False
    label: str = ""  # a longer display name (``compare`` rows)

    def skip_reason(self, ctx: BenchContext) -> str | None:
        """Why this system cannot run here, or None."""
        missing = [module for module in self.requires if not _importable(module)]
        if missing:
            return f"{', '.join(missing)} not installed ({PEERS_EXTRA})"
        if self.cpu_only and ctx.device.type != "cpu":
            return f"{self.name} runs on CPU only"
        return None

    @property
    def title(self) -> str:
        return self.label or self.name


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------- PyTorch

def _on_inputs(ctx: BenchContext, call: Callable[..., Any]) -> Callable[..., Any]:
    """A :attr:`Prepared.run`: ``call`` on the bench inputs, or on the inputs it is given."""
    return lambda *inputs: call(*(inputs or ctx.inputs))


def _eager(ctx: BenchContext) -> Prepared:
    params, weight_bytes = state_cost(ctx.model)
    return Prepared(_on_inputs(ctx, ctx.model), 0.0, params, weight_bytes)


def _inductor(freezing: bool) -> Callable[[BenchContext], Prepared]:
    def build(ctx: BenchContext) -> Prepared:
        start = time.perf_counter()
        compiled = _compile_with_inductor(ctx.model, ctx.inputs, freezing)
        params, weight_bytes = state_cost(ctx.model)
        return Prepared(_on_inputs(ctx, compiled), time.perf_counter() - start, params, weight_bytes)

    return build


def _compile_with_inductor(model: Callable[..., Any], inputs: tuple[torch.Tensor, ...], freezing: bool) -> Any:
    import torch._inductor.config as inductor_config

    try:
        # Dynamo keeps one cache per code object and reuses an entry compiled for the same
        # backend: a second torch.compile of the same model with backend="inductor" would
        # run the first one's graph, unfrozen. A backend of its own gets its own entry.
        compiled = torch.compile(model, backend=_frozen_inductor if freezing else "inductor")
        # Freezing is read from the global config while the graph is captured and compiled,
        # which is on the first call: the flag is set for that call only.
        with inductor_config.patch(freezing=freezing), torch.inference_mode(), _quiet():
            compiled(*inputs)
    except Exception as exc:
        raise Unavailable(f"torch.compile failed: {first_line(exc)}") from exc
    return compiled


def _frozen_inductor(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
    """Inductor, as a backend distinct from ``"inductor"`` (see :func:`_compile_with_inductor`)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph, example_inputs)


def _torch_ao_dynamic_int8(ctx: BenchContext) -> Prepared:
    start = time.perf_counter()
    try:
        from torch.ao.quantization import quantize_dynamic

        with _quiet():
            quantized = quantize_dynamic(copy.deepcopy(ctx.model), {torch.nn.Linear}, dtype=torch.qint8)
    except Exception as exc:
        raise Unavailable(f"torch.ao quantize_dynamic failed: {first_line(exc)}") from exc
    params, weight_bytes = state_cost(quantized)
    return Prepared(_on_inputs(ctx, quantized), time.perf_counter() - start, params, weight_bytes)


def _pt2e_api() -> tuple[Any, Any, Any]:
    """prepare_pt2e, convert_pt2e and the x86 Inductor quantizer module, from torchao
    (where PT2E lives since torch 2.10) or from torch.ao on older torch."""
    try:
        with _quiet():
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except Exception:
        try:
            import torch.ao.quantization.quantizer.x86_inductor_quantizer as x86  # type: ignore[no-redef]
            from torch.ao.quantization.quantize_pt2e import (  # type: ignore[no-redef]
                convert_pt2e,
                prepare_pt2e,
            )
        except ImportError as exc:
            raise Unavailable(f"PT2E quantization needs torchao ({PEERS_EXTRA})") from exc
    return prepare_pt2e, convert_pt2e, x86


def _pt2e_x86_int8(ctx: BenchContext) -> Prepared:
    """Static int8 (per-channel weights, per-tensor activations calibrated on the bench
    inputs) with the x86 Inductor quantizer, compiled by Inductor with freezing, so that
    the quantized patterns become oneDNN int8 kernels on prepacked weights."""
    prepare_pt2e, convert_pt2e, x86 = _pt2e_api()
    start = time.perf_counter()
    try:
        with _quiet():
            graph = torch.export.export(ctx.model, ctx.inputs).module()
            graph.graph.eliminate_dead_code()
            graph.recompile()
            quantizer = x86.X86InductorQuantizer()
            quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                prepared(*ctx.inputs)  # calibration
            quantized = convert_pt2e(prepared)
    except Exception as exc:
        raise Unavailable(f"PT2E quantization failed: {first_line(exc)}") from exc
    compiled = _compile_with_inductor(quantized, ctx.inputs, freezing=True)
    params, weight_bytes = state_cost(quantized)
    return Prepared(_on_inputs(ctx, compiled), time.perf_counter() - start, params, weight_bytes)


# ---------------------------------------------------------------- ONNX Runtime

def _ort_fp32(ctx: BenchContext) -> Prepared:
    start = time.perf_counter()
    return _ort_prepared(ctx, ctx.onnx_fp32(), start)


def _ort_int8(ctx: BenchContext) -> Prepared:
    """ONNX Runtime's dynamic int8 (per-tensor uint8 activations, per-channel weights)."""
    start = time.perf_counter()
    target = ort_quantize(ctx.onnx_fp32(), ctx.workdir / f"{ctx.name}-ort-int8.onnx")
    return _ort_prepared(ctx, target, start)


def _ort_transformers_optimized(ctx: BenchContext) -> Path:
    """The fp32 export after ``onnxruntime.transformers.optimizer`` (fused LayerNorm, GELU,
    attention where it recognizes the pattern), told the model's heads and width."""

    def optimize() -> Path:
        from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

        config = ctx.config
        model_type = getattr(config, "model_type", None)
        if model_type not in MODEL_TYPES:
            model_type = "bert"  # the generic transformer fusions
        target = ctx.workdir / f"{ctx.name}-ort-optimized.onnx"
        try:
            with _quiet():
                optimized = optimize_model(str(ctx.onnx_fp32()), model_type=model_type,
                                           num_heads=getattr(config, "num_attention_heads", 0) or 0,
                                           hidden_size=getattr(config, "hidden_size", 0) or 0)
                optimized.save_model_to_file(str(target))
        except Unavailable:
            raise
        except Exception as exc:
            raise Unavailable(f"onnxruntime.transformers.optimizer failed: {first_line(exc)}") from exc
        return target

    return ctx.shared("ort-optimized", optimize)


def _ort_optimized_fp32(ctx: BenchContext) -> Prepared:
    start = time.perf_counter()
    return _ort_prepared(ctx, _ort_transformers_optimized(ctx), start)


def _ort_optimized_int8(ctx: BenchContext) -> Prepared:
    start = time.perf_counter()
    source = _ort_transformers_optimized(ctx)
    target = ort_quantize(source, ctx.workdir / f"{ctx.name}-ort-optimized-int8.onnx")
    return _ort_prepared(ctx, target, start)


def ort_quantize(source: Path, target: Path) -> Path:
    """ONNX Runtime's ``quantize_dynamic`` of ``source`` (int8 per-channel weights) into
    ``target``; a model with external data keeps its quantized weights external too."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer re-infers shapes and refuses the exporter's recorded intermediate shapes
    # ("Inferred shape and existing shape differ"), so it gets the graph without them. The
    # weights are not loaded here: the copy sits beside ``source``, so its external data resolves.
    model = onnx.load(str(source), load_external_data=False)
    del model.graph.value_info[:]
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    plain = source.with_name(target.stem + "-input.onnx")
    onnx.save(model, str(plain))
    del model
    try:
        with _quiet():
            # DefaultTensorType: the transformers optimizer's fused ops (SkipLayerNormalization,
            # BiasGelu) live in the com.microsoft domain, which shape inference cannot type.
            quantize_dynamic(str(plain), str(target), weight_type=QuantType.QInt8, per_channel=True,
                             use_external_data_format=external,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    except Exception as exc:
        raise Unavailable(f"onnxruntime quantize_dynamic failed: {first_line(exc)}") from exc
    return target


def ort_session(path: Path, device: torch.device) -> Any:
    """An ONNX Runtime session with fxopt's own session options (no spinning threads, as
    many intra-op threads as PyTorch), so fxopt's ONNX rows and the peers' run alike."""
    import onnxruntime as ort

    from fxopt.backends.onnx import session_options

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Unavailable("this onnxruntime build has no CUDAExecutionProvider")
        providers.insert(0, "CUDAExecutionProvider")
    options = session_options()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers)


def _ort_prepared(ctx: BenchContext, path: Path, start: float) -> Prepared:
    session = ort_session(path, ctx.device)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(ctx.inputs):
        raise Unavailable(f"the ONNX graph takes {len(names)} inputs, the model {len(ctx.inputs)}")

    def feed_of(inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
        return {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, inputs)}

    feed = feed_of(ctx.inputs)
    session.run(None, feed)
    params, weight_bytes = onnx_cost(path)

    def run(*inputs: torch.Tensor) -> Any:
        return session.run(None, feed_of(inputs) if inputs else feed)

    return Prepared(run, time.perf_counter() - start, params, weight_bytes)


# ---------------------------------------------------------------- OpenVINO

def _openvino_model(ctx: BenchContext) -> Any:
    def convert() -> Any:
        import openvino as ov

        try:
            with _quiet():
                return ov.convert_model(ctx.model, example_input=ctx.inputs)
        except Exception as exc:
            raise Unavailable(f"openvino.convert_model failed: {first_line(exc)}") from exc

    return ctx.shared("openvino", convert)


def _openvino(precision: str | None) -> Callable[[BenchContext], Prepared]:
    """OpenVINO's CPU plugin; ``precision`` None keeps the plugin's default inference
    precision (bf16 on CPUs with bf16 support, f32 elsewhere)."""

    def build(ctx: BenchContext) -> Prepared:
        start = time.perf_counter()
        return _openvino_prepared(ctx, _openvino_model(ctx), precision, start)

    return build


def _openvino_nncf_int8(transformer: bool = True) -> Callable[[BenchContext], Prepared]:
    """NNCF post-training quantization (int8 weights and activations, calibrated on the
    bench inputs) of the OpenVINO model, run in f32 elsewhere; ``transformer``: with
    ``model_type=TRANSFORMER`` on a transformers model (else NNCF's default recipe)."""

    def build(ctx: BenchContext) -> Prepared:
        return _nncf_quantized(ctx, transformer and ctx.config is not None)

    return build


def _nncf_quantized(ctx: BenchContext, transformer: bool) -> Prepared:
    import nncf

    start = time.perf_counter()
    source = _openvino_model(ctx)
    sample = tuple(t.detach().cpu().numpy() for t in ctx.inputs)
    options: dict[str, Any] = {"subset_size": 1}
    if transformer:
        options["model_type"] = nncf.ModelType.TRANSFORMER
    try:
        with _quiet():
            quantized = nncf.quantize(source, nncf.Dataset([sample if len(sample) > 1 else sample[0]]), **options)
    except Exception as exc:
        raise Unavailable(f"nncf.quantize failed: {first_line(exc)}") from exc
    return _openvino_prepared(ctx, quantized, "f32", start)


def _openvino_prepared(ctx: BenchContext, model: Any, precision: str | None, start: float) -> Prepared:
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    core = ov.Core()
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def feed_of(inputs: Sequence[torch.Tensor]) -> list[Any]:
        return [tensor.detach().cpu().numpy() for tensor in inputs]

    feed = feed_of(ctx.inputs)

    def run(*inputs: torch.Tensor) -> Any:
        return request.infer(feed_of(inputs) if inputs else feed).to_tuple()

    run()
    params, weight_bytes = openvino_cost(model)
    chosen = str(compiled.get_property("INFERENCE_PRECISION_HINT")).split(":")[-1].strip(" >'")
    note = "" if precision is not None else f"inference precision {chosen}"
    return Prepared(run, time.perf_counter() - start, params, weight_bytes, note)


# ---------------------------------------------------------------- CTranslate2

def _ctranslate2(quantization: str | None) -> Callable[[BenchContext], Prepared]:
    """CTranslate2's encoder on the BERT model, converted with its transformers converter
    from the model saved locally (nothing downloaded)."""

    def build(ctx: BenchContext) -> Prepared:
        import ctranslate2
        import numpy as np

        if getattr(ctx.config, "model_type", None) != "bert":
            raise Unavailable("CTranslate2's encoder converter is used for the BERT model only")
        if len(ctx.inputs) != 1:
            raise Unavailable("the CTranslate2 encoder row feeds input ids only")
        start = time.perf_counter()
        source = _saved_transformers_model(ctx)
        target = ct2_convert(source, ctx.workdir / f"{ctx.name}-ct2-{quantization or 'float32'}", quantization,
                             Unavailable)
        encoder = ctranslate2.Encoder(str(target), device="cpu", compute_type=quantization or "float32",
                                      intra_threads=torch.get_num_threads(), inter_threads=1)
        ids = ctx.inputs[0].tolist()

        def run(*inputs: torch.Tensor) -> Any:
            output = encoder.forward_batch(inputs[0].tolist() if inputs else ids)
            pooled = output.pooler_output
            return (np.asarray(output.last_hidden_state),
                    *(() if pooled is None else (np.asarray(pooled),)))

        run()
        weight_bytes = sum(f.stat().st_size for f in target.glob("*.bin"))
        return Prepared(run, time.perf_counter() - start, None, weight_bytes)

    return build


def _saved_transformers_model(ctx: BenchContext) -> Path:
    def save() -> Path:
        folder = ctx.workdir / f"{ctx.name}-transformers"
        with _quiet():
            ctx.model.save_pretrained(str(folder))
        # transformers 5 no longer writes position_embedding_type, which the BERT converter
        # reads; the file gets it, the user's config is left alone.
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config.setdefault("position_embedding_type", "absolute")
        config_path.write_text(json.dumps(config))
        return folder

    return ctx.shared("transformers-saved", save)


# ---------------------------------------------------------------- fxopt

def _fxopt(passes: Callable[[], list[Any]] | None = None, backend: str = "eager",
           preset: str | None = None, calibrate: bool = False,
           budget: float | None = None) -> Callable[[BenchContext], Prepared]:
    """fxopt with a pass list (names or pass objects), or with a preset (held to ``budget``
    when given); ``calibrate`` hands it the bench inputs as calibration data, as the calibrated
    int8 peers get them."""

    def build(ctx: BenchContext) -> Prepared:
        import fxopt

        options: dict[str, Any] = {"backend": backend, "device": ctx.device}
        if calibrate:
            options["calibration"] = [ctx.inputs]
        lossy: list[str] = []
        if preset is not None:
            options.update(preset=preset, backend=None)  # the preset chooses its backend
            if budget is not None:
                options["budget"] = budget
        else:
            pipeline = passes() if passes is not None else _default_pipeline()
            lossy = [_require_pass(item) for item in pipeline if isinstance(item, str)]
            options["passes"] = pipeline
        if backend != "eager":
            from fxopt.backends import unavailable_reason

            reason = unavailable_reason(backend, ctx.device)
            if reason is not None:
                raise Unavailable(reason)
        start = time.perf_counter()
        try:
            with _quiet():
                opt = fxopt.compile(ctx.model, ctx.inputs, **options)
        except fxopt.FxoptError as exc:
            raise Unavailable(f"fxopt.compile failed: {first_line(exc)}") from exc
        seconds = time.perf_counter() - start
        report = opt.report
        return Prepared(_on_inputs(ctx, opt), seconds, report.final.params, report.final.weight_bytes,
                        pipeline_note(report, lossy), report.final.flops, list(report.kernels))

    return build


def _default_pipeline() -> list[Any]:
    from fxopt.registry import default_pipeline

    return list(default_pipeline())


def _require_pass(spec: str) -> str:
    """The name of the pass ``spec`` names; Unavailable when it is not installed."""
    import fxopt
    from fxopt.registry import parse_pass_spec

    name, _ = parse_pass_spec(spec)
    try:
        fxopt.get_pass(name)
    except fxopt.UnknownPassError as exc:
        raise Unavailable(f"pass '{name}' is not installed") from exc
    except fxopt.FxoptError:
        pass  # installed, but needs options: the spec supplies them
    return name


def _with(spec: str, *, without: Sequence[str] = ()) -> Callable[[], list[Any]]:
    """The default exact pipeline, less ``without``, followed by the pass ``spec``."""
    return lambda: [*(p for p in _default_pipeline() if p.name not in without), spec]


def pipeline_note(report: Any, lossy: str | Sequence[str] | None = ()) -> str:
    """What the pipeline did, in a few words: the named (lossy) passes' applied and skipped
    counts, or the exact passes' applied counts, and every rollback (from the report's records)."""
    lossy = [lossy] if isinstance(lossy, str) else list(lossy or ())
    parts = []
    for record in report.passes:
        if record.status == "rolled back":
            parts.append(f"{record.name} rolled back ({record.message})")
        elif record.name in lossy:
            text = f"{record.name}: {record.applied}/{record.matched} applied"
            if record.skipped:
                reason, _ = record.skipped.most_common(1)[0]
                total = sum(record.skipped.values())
                text += f", {total} skipped" + (f", e.g. {reason}" if len(record.skipped) > 1 else f": {reason}")
            parts.append(text)
    applied = [f"{r.name} x{r.applied}" for r in report.passes if r.status == "applied" and r.name not in lossy]
    if applied and not lossy:
        parts.insert(0, ", ".join(applied))
    return "; ".join(parts)


# ---------------------------------------------------------------- the systems

PER_TENSOR = "quantize-int8(activations='dynamic-tensor')"
PER_TOKEN = "quantize-int8(activations='dynamic')"
STATIC = "quantize-int8(activations='static', symmetric=False)"
STATIC_PERCENTILE = "quantize-int8(activations='static', observer='percentile')"

SYSTEMS_LIST: tuple[System, ...] = (
    System("eager", "PyTorch eager, fp32 (the baseline)", _eager, label="eager fp32"),
    # fp32 peers
    System("torch.compile", "torch.compile with Inductor, fp32", _inductor(freezing=False)),
    System("inductor-freezing", "torch.compile with Inductor and freezing (weights constant-folded, "
           "prepacked), fp32", _inductor(freezing=True)),
    System("ort", "torch.onnx.export + ONNX Runtime, fp32", _ort_fp32, ("onnxruntime",), label="ORT fp32"),
    System("ort-opt", "torch.onnx.export + onnxruntime.transformers.optimizer + ONNX Runtime, fp32",
           _ort_optimized_fp32, ("onnxruntime",), cpu_only=True),
    System("openvino", "OpenVINO CPU, f32 (INFERENCE_PRECISION_HINT=f32)", _openvino("f32"),
           ("openvino",), cpu_only=True),
    System("openvino-bf16", "OpenVINO CPU, default precision hint (bf16 where the CPU has it)",
           _openvino(None), ("openvino",), cpu_only=True),
    System("ct2", "CTranslate2 encoder, float32 (BERT only)", _ctranslate2(None), ("ctranslate2",),
           cpu_only=True),
    # fxopt lossless
    System("fxopt", "fxopt default lossless pipeline, eager backend", _fxopt()),
    System("fxopt-onnx", "fxopt default lossless pipeline, ONNX Runtime backend", _fxopt(backend="onnx")),
    System("fxopt-openvino", "fxopt default lossless pipeline, OpenVINO backend (f32)",
           _fxopt(backend="openvino"), ("openvino",), cpu_only=True, label="fxopt OpenVINO"),
    System("fxopt-inductor", "fxopt default lossless pipeline, Inductor backend (freezing)",
           _fxopt(backend="inductor"), label="fxopt Inductor"),
    # int8 peers
    System("torch.ao-int8", "torch.ao.quantization.quantize_dynamic on nn.Linear, qint8",
           _torch_ao_dynamic_int8, cpu_only=True, label="torch.ao dynamic int8"),
    System("ort-int8", "onnxruntime.quantization.quantize_dynamic of the fp32 export, QInt8 per-channel",
           _ort_int8, ("onnxruntime",), cpu_only=True, label="ORT quantize_dynamic"),
    System("ort-opt-int8", "onnxruntime.transformers.optimizer, then quantize_dynamic (QInt8 per-channel)",
           _ort_optimized_int8, ("onnxruntime",), cpu_only=True),
    System("pt2e-x86-int8", "PT2E static int8 with X86InductorQuantizer, calibrated on the inputs, "
           "Inductor with freezing", _pt2e_x86_int8, ("torchao",), cpu_only=True),
    System("openvino-nncf-int8", "OpenVINO + NNCF post-training int8 (model_type TRANSFORMER on "
           "transformers), calibrated on the inputs", _openvino_nncf_int8(), ("openvino", "nncf"),
           cpu_only=True),
    System("openvino-nncf-int8-default", "OpenVINO + NNCF post-training int8, NNCF's default recipe "
           "(no model_type), calibrated on the inputs", _openvino_nncf_int8(transformer=False),
           ("openvino", "nncf"), cpu_only=True),
    System("ct2-int8", "CTranslate2 encoder, int8 (BERT only)", _ctranslate2("int8"), ("ctranslate2",),
           cpu_only=True),
    # fxopt int8
    System("fxopt-int8", "fxopt lossless pipeline + quantize-int8 (default activations='auto': per tensor, "
           "per token where per tensor breaks the budget), eager backend",
           _fxopt(_with("quantize-int8")), label="fxopt int8 eager"),
    System("fxopt-int8-onnx", "fxopt lossless pipeline + quantize-int8 (default activations='auto'), "
           "ONNX Runtime backend", _fxopt(_with("quantize-int8"), "onnx"), label="fxopt int8 ONNX"),
    System("fxopt-int8-token", "as fxopt-int8, every layer's activations per token (activations='dynamic'), "
           "eager backend", _fxopt(_with(PER_TOKEN)), label="fxopt int8 eager (per-token)"),
    System("fxopt-int8-pt", "as fxopt-int8, activations quantized per tensor (dynamic-tensor), eager backend",
           _fxopt(_with(PER_TENSOR)), label="fxopt int8 eager (per-tensor)"),
    # ONNX Runtime quantizes a shared input once by itself (CSE of DynamicQuantizeLinear)
    # and pays a Split for a merged Q/K/V: per-tensor int8 in ORT is faster unmerged.
    System("fxopt-int8-pt-onnx", "as fxopt-int8-pt without merge-siblings, ONNX Runtime backend",
           _fxopt(_with(PER_TENSOR, without=("merge-siblings",)), "onnx"),
           label="fxopt int8 ONNX (per-tensor)"),
    System("fxopt-int8-static", "as fxopt-int8, activations per tensor (uint8, scale and zero point calibrated on the "
           "inputs, as the peers), eager backend (oneDNN's int8 kernel)", _fxopt(_with(STATIC), calibrate=True),
           label="fxopt int8 eager (static)"),
    System("fxopt-int8-static-sq", "as fxopt-int8-static, smooth-quant before quantize-int8",
           _fxopt(lambda: [*_default_pipeline(), "smooth-quant", STATIC], calibrate=True),
           label="fxopt int8 eager (static, smooth-quant)"),
    # Static activations (QuantizeLinear/DequantizeLinear pairs) become OpenVINO int8 kernels
    # with no run-time quantization step, and a quantized query and key its int8 fused
    # attention; calibrated on the bench inputs, as the NNCF and PT2E rows are.
    System("fxopt-int8-openvino", "fxopt lossless pipeline + smooth-quant (explicit) + quantize-int8 "
           "(static per-tensor activations, percentile observer, calibrated on the inputs) + quantize-attention, "
           "OpenVINO backend",
           _fxopt(lambda: [*_default_pipeline(), "smooth-quant(explicit=True)", STATIC_PERCENTILE,
                           "quantize-attention"], "openvino", calibrate=True), ("openvino",), cpu_only=True,
           label="fxopt int8 OpenVINO (static)"),
    # Every tensor NNCF's default recipe quantizes: the Linears (without smooth-quant), Q @ K^T,
    # the residual stream around each LayerNorm and the embedding tables. Held to 7.5e-2, the
    # error NNCF's default recipe measures on BERT-4L's hidden states on the fresh input fxopt's
    # own check draws (7.3e-2; 5% refuses both recipes there).
    System("fxopt-int8-openvino-full", "fxopt lossless pipeline + quantize-int8 (static per-tensor "
           "activations, percentile observer, calibrated on the inputs) + quantize-attention + "
           "quantize-residual + quantize-embeddings (budget=0.075), OpenVINO backend",
           _fxopt(lambda: [*_default_pipeline(), STATIC_PERCENTILE, "quantize-attention",
                           "quantize-residual(budget=0.075)", "quantize-embeddings(budget=0.075)"], "openvino",
                  calibrate=True), ("openvino",), cpu_only=True,
           label="fxopt int8 OpenVINO (static, int8 residual and embeddings)"),
    # OpenVINO quantizes the activations of a dynamic int8 Linear itself, in groups, on its
    # int8 kernels; the graph's int8 weights are used as they are.
    System("fxopt-int8-pt-openvino", "as fxopt-int8-pt, OpenVINO backend (int8 weights, activations "
           "quantized at run time by OpenVINO)", _fxopt(_with(PER_TENSOR), "openvino"), ("openvino",),
           cpu_only=True, label="fxopt int8 OpenVINO (dynamic)"),
    System("fxopt-preset-lossless", "fxopt.compile(preset='lossless'): the exact passes, the faster "
           "backend", _fxopt(preset="lossless")),
    System("fxopt-preset-bf16", "fxopt.compile(preset='bf16'): Linears in bfloat16 within 1% output "
           "error", _fxopt(preset="bf16")),
    System("fxopt-preset-int8", "fxopt.compile(preset='int8'): the fastest verified int8 recipe "
           "for the device, calibrated on the inputs (as the peers)", _fxopt(preset="int8", calibrate=True)),
    System("fxopt-preset-int8-tight", "as fxopt-preset-int8, held to budget=0.016 (1.6% output error)",
           _fxopt(preset="int8", calibrate=True, budget=0.016)),
    System("fxopt-preset-int8-0.035", "as fxopt-preset-int8, held to budget=0.035 (the error OpenVINO + "
           "NNCF's TRANSFORMER recipe measures on BERT-4L)", _fxopt(preset="int8", calibrate=True, budget=0.035)),
    # fxopt, other lossy passes
    System("fxopt-lowrank", "fxopt lossless pipeline + low-rank (default budget), eager backend",
           _fxopt(_with("low-rank"))),
    System("fxopt-prune", "fxopt lossless pipeline + prune-hidden (default budget), eager backend",
           _fxopt(_with("prune-hidden"))),
)

SYSTEMS: dict[str, System] = {system.name: system for system in SYSTEMS_LIST}

# The preset rows that take a budget in their name (``fxopt-preset-int8@0.014``), with the
# preset each compiles and whether it calibrates on the inputs.
BUDGETED_PRESETS = {"fxopt-preset-lossless": ("lossless", False), "fxopt-preset-bf16": ("bf16", False),
                    "fxopt-preset-int8": ("int8", True)}


def find_system(name: str) -> System | None:
    """The system called ``name``: one of :data:`SYSTEMS`, or a preset row held to another
    budget, ``<preset row>@<budget>`` (``fxopt-preset-int8@0.014``); None when there is none."""
    if name in SYSTEMS:
        return SYSTEMS[name]
    base, _, budget_text = name.partition("@")
    if base not in BUDGETED_PRESETS:
        return None
    try:
        budget = float(budget_text)
    except ValueError:
        return None
    if not 0 < budget < 1:
        return None
    preset, calibrate = BUDGETED_PRESETS[base]
    return System(name, f"as {base}, held to budget={budget:g}", _fxopt(preset=preset, calibrate=calibrate, budget=budget))


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


def openvino_cost(model: Any) -> tuple[int, int]:
    """Parameters and bytes of an OpenVINO model's constants (float and int8 ones are
    parameters, as in fxopt's cost model)."""
    params = weight_bytes = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        weight_bytes += op.get_byte_size()
        kind = str(op.get_element_type())
        if any(t in kind for t in ("f32", "f16", "bf16", "f64", "i8", "u8", "float", "int8")):
            numel = 1
            for d in op.get_output_shape(0):
                numel *= int(d)
            params += numel
    return params, weight_bytes


# ---------------------------------------------------------------- helpers

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # the colours some exporters put in their messages


def first_line(exc: BaseException) -> str:
    text = ANSI_ESCAPE.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ct2_convert(source: Path, target: Path, quantization: str | None, error: type[Exception]) -> Path:
    """A saved transformers model converted by CTranslate2 into ``target`` (``error`` raised
    with the converter's reason when it fails)."""
    import ctranslate2

    try:
        with _quiet():
            converter = ctranslate2.converters.TransformersConverter(str(source))
            converter.convert(str(target), quantization=quantization, force=True)
    except Exception as exc:
        raise error(f"CTranslate2 conversion failed: {first_line(exc)}") from exc
    return target


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence exporters, quantizers and compilers that print progress to stdout or the log."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
