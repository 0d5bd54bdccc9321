"""``fxopt bench --models scale``: pass-manager time per node on deep graphs, and the peak
memory of ``fxopt.compile``, each probe in a fresh interpreter."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fxopt_bench.systems import state_cost

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
    for spec in probes:
        label = f"{spec['depth']} layers" if "depth" in spec else "wide mlp"
        progress(f"scale: {label} ...")
        out = subprocess.run([sys.executable, "-m", "fxopt_bench.scale", "--probe", json.dumps(spec)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"scale probe {spec} failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        progress(f"scale:   {row['nodes']} nodes, pass manager {row['pass_manager_s']:.2f}s "
                 f"({row['us_per_node']:.0f} us/node), peak +{row['peak_mb']:.0f} MB")
        results.append(row)
    return results


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child process of :func:`run_scale`."""
    import fxopt
    from fxopt.registry import default_pipeline
    from fxopt_bench.models import build_mlp

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
    rss_before, reset, compile_s, _ = _measured(lambda: fxopt.compile(model, inputs, passes=pipeline))
    peak = _rss_bytes("VmHWM") if reset else _maxrss_bytes()
    peak_growth = max(0, peak - rss_before)

    # Time: the pass manager alone, on a freshly captured graph.
    start = time.perf_counter()
    gm = fxopt.capture(model, inputs)
    capture_s = time.perf_counter() - start
    nodes = len(gm.graph.nodes)
    ctx = fxopt.PassContext(batches=[list(inputs)])
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


# ---------------------------------------------------------------- the 1.1B Llama shape

# TinyLlama-1.1B's shape (random weights): 3.85 GiB of fp32 weights at 22 layers.
LLAMA_1B_SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}
LLAMA_SEQUENCE = 128
TINY_LLAMA_SHAPE = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 1, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "vocab_size": 512}
# What each probe compiles, each in its own interpreter (a case killed for memory is a row).
LLAMA_CASES = {
    "model": "the model, built and run once (no compile)",
    "fxopt-lossless": "fxopt.compile(m, ids) (every exact pass, eager backend)",
    "fxopt-lossless-checkpoint": ("the model saved to a safetensors file and built again with fxopt.from_checkpoint "
                                  "(its weights memory-mapped), then fxopt.compile(m, ids)"),
    "fxopt-lossless-onnx": 'fxopt.compile(m, ids, backend="onnx") (the weights move into ONNX Runtime)',
    "torch-export": "torch.export.export(m, (ids,)) alone",
    "ort-quantize-dynamic": "torch.onnx.export (external data) + quantize_dynamic + InferenceSession",
    "fxopt-int8-weight-only": 'fxopt.compile(m, ids, passes=["remove-dropout", "quantize-weights"])',
    "fxopt-int8-weight-only-all": ('fxopt.compile(m, ids, passes=["remove-dropout", '
                                   '"quantize-weights(activations=\'float32\', budget=1.0)"]) (every Linear)'),
    "fxopt-preset-int8": 'fxopt.compile(m, ids, preset="int8")',
}


def run_scale_llama(layers: int = 22, cases: Sequence[str] | None = None,
                    progress: Callable[[str], None] | None = None, shape: dict[str, int] | None = None,
                    threads: int | None = None) -> list[dict[str, Any]]:
    """Compile s and peak RSS of a Llama of TinyLlama-1.1B's shape with ``layers`` layers
    (input 1 x 128), one row per case of :data:`LLAMA_CASES`, each in a fresh interpreter.

    Each case runs once on a tiny Llama first (imports, one-time initialization). The peak is
    the process's resident high-water mark (``VmHWM``, reset after the model is built and run
    once), the model included, over the model's fp32 weight bytes: the memory a
    machine needs for the case; the anonymous peak is the same without the pages of files
    (a memory-mapped checkpoint's weights, which the kernel can drop and read again), sampled
    every 10 ms; ``growth`` is the peak minus the RSS before the compile (what
    compiling adds); ``result`` is what the compiled artifact keeps resident (RSS after the
    compile, garbage collected and freed memory given back to the system, minus before).
    ``shape`` overrides the config's sizes.
    """
    import torch

    progress = progress or (lambda message: None)
    if layers < 1:
        raise ValueError(f"the Llama needs at least one layer, got {layers}")
    unknown = [c for c in cases or () if c not in LLAMA_CASES]
    if unknown:
        raise ValueError(f"unknown case {unknown[0]!r} (available: {', '.join(LLAMA_CASES)})")
    rows = []
    for case in cases or LLAMA_CASES:
        spec = {"case": case, "shape": {**LLAMA_1B_SHAPE, **(shape or {}), "num_hidden_layers": layers},
                "threads": threads or torch.get_num_threads()}
        progress(f"scale-llama: {layers} layers, {case} ...")
        out = subprocess.run([sys.executable, "-m", "fxopt_bench.scale", "--llama-probe", json.dumps(spec)],
                             capture_output=True, text=True, check=False)
        if out.returncode == 0:
            row = json.loads(out.stdout.strip().splitlines()[-1])
            seconds = "" if row["compile_s"] is None else f"{row['compile_s']:.1f}s, "
            progress(f"scale-llama:   {seconds}peak {row['peak_over_weights']:.2f}x the weights")
        else:
            why = (f"killed by signal {-out.returncode} (the out-of-memory killer, if SIGKILL)"
                   if out.returncode < 0 else (out.stderr.strip().splitlines() or ["no output"])[-1][:200])
            row = {"case": case, "layers": layers, "failed": why}
            progress(f"scale-llama:   failed: {why}")
        rows.append(row)
    return rows


def llama_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child process of :func:`run_scale_llama`."""
    import gc

    import torch
    from transformers import LlamaConfig, LlamaModel

    from fxopt.ir.derived import release_freed_memory

    torch.set_num_threads(spec["threads"])
    case = spec["case"]
    # The case once on a tiny Llama first: its imports and one-time initialization (the ONNX
    # exporter's registries, ONNX Runtime, ~0.2-0.3 GiB) are no part of this model's cost. An
    # fxopt compile warms up past the tiny model's memory bound, as the measured model is past its
    # own: it takes the measured compile's path and imports what that imports, no more (a tiny
    # int8 preset races ONNX Runtime and OpenVINO candidates that a large model's drops unbuilt).
    tiny = LlamaModel(LlamaConfig(**TINY_LLAMA_SHAPE, use_cache=False)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _LLAMA_BUILDERS[case](tiny, torch.randint(0, TINY_LLAMA_SHAPE["vocab_size"], (1, 16)), memory_bound=1)
    del tiny
    _KEPT.clear()
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(**spec["shape"], use_cache=False)).eval()
    ids = torch.randint(0, spec["shape"]["vocab_size"], (1, LLAMA_SEQUENCE), generator=torch.Generator().manual_seed(0))
    params, weight_bytes = state_cost(model)
    mapped = case == "fxopt-lossless-checkpoint"
    if mapped:
        model = _from_checkpoint(model, LlamaModel, LlamaConfig(**spec["shape"], use_cache=False))
    with torch.no_grad():
        model(ids)
    built_peak = _rss_bytes("VmHWM")
    gc.collect()
    with _AnonymousPeak() as anonymous:
        rss_before, reset, compile_s, result = _measured(lambda: _LLAMA_BUILDERS[case](model, ids))
    peak = built_peak if case == "model" else _rss_bytes("VmHWM") if reset else _maxrss_bytes()
    gc.collect()
    release_freed_memory()  # what the allocator kept for reuse is not the artifact's
    resident = _rss_bytes("VmRSS") - rss_before
    return {"case": case, "layers": spec["shape"]["num_hidden_layers"], "params": params,
            "weight_bytes": weight_bytes, "compile_s": compile_s if case != "model" else None,
            "peak_bytes": peak, "peak_over_weights": peak / weight_bytes, "growth_bytes": max(0, peak - rss_before),
            "anonymous_peak_bytes": anonymous.peak, "result_bytes": max(0, resident),
            "weights_from": "memory-mapped checkpoint" if mapped else "memory",
            "peak_measure": "VmHWM reset" if reset else "ru_maxrss (not reset)", "result": result,
            "chose": preset_choice(_KEPT)}


def preset_choice(results: Sequence[Any]) -> str | None:
    """The candidate a preset chose (``"[exact, quantize-int8(...)] on eager"``), read from the
    report notes of ``results``; None where no preset ran."""
    for result in results:
        for note in getattr(getattr(result, "report", None), "notes", []):
            found = re.match(r"preset [\w-]+: chose (\[.*?\](?: \(exact without [^)]*\))? on [\w-]+)", note)
            if found:
                return found.group(1)
    return None


def _llama_lossless(model: Any, ids: Any, **options: Any) -> Any:
    import fxopt

    return _keep(fxopt.compile(model, (ids,), **options))


def _llama_lossless_onnx(model: Any, ids: Any, **options: Any) -> Any:
    import fxopt

    return _keep(fxopt.compile(model, (ids,), backend="onnx", **options))


def _from_checkpoint(model: Any, model_class: Any, config: Any) -> Any:
    """``model`` written to a safetensors file and built again from it with
    :func:`fxopt.from_checkpoint`; the file lives as long as the probe (the in-memory model goes
    when the caller drops it)."""
    import tempfile

    from safetensors.torch import save_model

    import fxopt

    folder = tempfile.TemporaryDirectory(prefix="fxopt-scale-checkpoint-")
    path = Path(folder.name) / "model.safetensors"
    save_model(model, str(path))
    _KEPT.append(folder)  # the file outlives the probe's measurements
    return fxopt.from_checkpoint(lambda: model_class(config), path)


class _AnonymousPeak:
    """The largest anonymous resident size (``RssAnon``: memory that is no file's pages) seen
    while the ``with`` block runs, sampled every 10 ms by a thread (0 where /proc has none)."""

    def __init__(self) -> None:
        self.peak = 0
        self._done = threading.Event()

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, _rss_bytes("RssAnon", fallback=False))

    def __enter__(self) -> _AnonymousPeak:
        self.peak = _rss_bytes("RssAnon", fallback=False)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes("RssAnon", fallback=False))


def _llama_export(model: Any, ids: Any, **_: Any) -> Any:
    import torch

    return _keep(torch.export.export(model, (ids,)))


def _llama_ort(model: Any, ids: Any, **_: Any) -> Any:
    import tempfile

    import torch

    from fxopt_bench.systems import ort_quantize, ort_session

    directory = tempfile.TemporaryDirectory(prefix="fxopt-scale-")
    source = Path(directory.name) / "llama.onnx"
    torch.onnx.export(model, (ids,), str(source), dynamo=True, external_data=True, verbose=False)
    target = ort_quantize(source, source.with_name("llama-int8.onnx"))
    return _keep(ort_session(target, torch.device("cpu")), directory)


def _llama_weight_only(model: Any, ids: Any, **options: Any) -> Any:
    import fxopt

    return _keep(fxopt.compile(model, (ids,), passes=["remove-dropout", "quantize-weights"], **options))


def _llama_weight_only_all(model: Any, ids: Any, **options: Any) -> Any:
    import fxopt

    passes = ["remove-dropout", "quantize-weights(activations='float32', budget=1.0)"]
    return _keep(fxopt.compile(model, (ids,), passes=passes, **options))


def _llama_preset(model: Any, ids: Any, **options: Any) -> Any:
    import fxopt
    from fxopt.presets import list_presets

    if "int8" not in {p.name for p in list_presets()}:
        return "no int8 preset"
    return _keep(fxopt.compile(model, (ids,), preset="int8", **options))


_KEPT: list[Any] = []  # the results stay alive until the probe reports what they hold


def _keep(*results: Any) -> str:
    _KEPT.extend(results)
    return type(results[0]).__name__


_LLAMA_BUILDERS: dict[str, Callable[..., Any]] = {  # (model, ids, **fxopt.compile options)
    "model": lambda model, ids, **_: "-",
    "fxopt-lossless": _llama_lossless,
    "fxopt-lossless-checkpoint": _llama_lossless,
    "fxopt-lossless-onnx": _llama_lossless_onnx,
    "torch-export": _llama_export,
    "ort-quantize-dynamic": _llama_ort,
    "fxopt-int8-weight-only": _llama_weight_only,
    "fxopt-int8-weight-only-all": _llama_weight_only_all,
    "fxopt-preset-int8": _llama_preset,
}


def format_scale_llama(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The table of :func:`run_scale_llama`: compile s, peak RSS and its ratio to the weights."""
    from fxopt_bench.output import _table

    header = ["case", "layers", "weights GiB", "compile s", "peak RSS GiB", "peak / weights",
              "anonymous peak / weights", "growth / weights", "result GiB"]
    body = []
    for r in rows:
        if "failed" in r:
            body.append([r["case"], str(r["layers"]), "-", "-", "-", "-", "-", "-", f"failed: {r['failed']}"])
            continue
        seconds = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        growth = "-" if r["compile_s"] is None else f"{r['growth_bytes'] / r['weight_bytes']:.2f}x"
        anonymous = f"{r['anonymous_peak_bytes'] / r['weight_bytes']:.2f}x" if r.get("anonymous_peak_bytes") else "-"
        body.append([r["case"], str(r["layers"]), f"{r['weight_bytes'] / 2**30:.2f}", seconds,
                     f"{r['peak_bytes'] / 2**30:.2f}", f"{r['peak_over_weights']:.2f}x", anonymous, growth,
                     f"{r['result_bytes'] / 2**30:.2f}"])
    choices = [f"{r['case']} chose {r['chose']}" for r in rows if r.get("chose")]
    return _table(header, body, markdown) + "".join(f"\n{line}" for line in choices)


def _measured(call: Callable[[], Any]) -> tuple[int, bool, float, Any]:
    """``call()`` from a reset peak-RSS mark: (RSS before, whether the mark was reset, seconds,
    its result)."""
    rss_before = _rss_bytes("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = call()
    return rss_before, reset, time.perf_counter() - start, result


def _rss_bytes(field_name: str, fallback: bool = True) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _maxrss_bytes() if fallback else 0


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


if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    print(json.dumps(probe(json.loads(sys.argv[2]))))
if __name__ == "__main__" and sys.argv[1:2] == ["--llama-probe"]:
    print(json.dumps(llama_probe(json.loads(sys.argv[2]))))
