"""Peer systems for int8 comparisons: the same model run by fxopt and by what people use today.

    rows = fxopt.peers.compare(model, (ids,))          # every system in SYSTEMS, side by side
    print(fxopt.peers.format_rows(rows))

Each builder takes ``(model, example_inputs, workdir)`` and returns a :class:`System`: a
zero-argument callable that runs the model on those inputs, and its first output. Timings
come from :func:`fxopt.timing.measure_side_by_side` (interleaved, medians); errors are
measured against eager fp32 on the same inputs. ONNX Runtime sessions use as many threads
as PyTorch (``torch.get_num_threads()``) and do not spin (``session.intra_op.allow_spinning=0``),
so they do not steal cores from PyTorch between calls.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxopt.capture import normalize_example_inputs


@dataclass
class System:
    name: str
    run: Callable[[], Any]
    output: torch.Tensor


def _first(output: Any) -> torch.Tensor:
    while not isinstance(output, torch.Tensor):
        output = output[0] if isinstance(output, (tuple, list)) else output.to_tuple()[0]
    return output


def _ort_session(path: str | Path) -> Any:
    import onnxruntime as ort

    from fxopt.backends.onnx import session_options

    options = session_options()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads PyTorch gets
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_system(name: str, path: str | Path, inputs: Sequence[torch.Tensor]) -> System:
    session = _ort_session(path)
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    first = session.get_outputs()[0].name

    def run() -> Any:
        return session.run([first], feed)

    return System(name, run, torch.from_numpy(run()[0]))


def _export_fp32(model: torch.nn.Module, inputs: Sequence[torch.Tensor], workdir: Path) -> Path:
    path = workdir / "fp32.onnx"
    if not path.exists():
        from fxopt.backends.onnx import export_onnx

        export_onnx(model, tuple(inputs), path, passes=[], check_parity=False)
    return path


def eager_fp32(model: torch.nn.Module, inputs: Sequence[torch.Tensor], workdir: Path) -> System:
    def run() -> Any:
        with torch.no_grad():
            return model(*inputs)

    return System("eager fp32", run, _first(run()))


def ort_fp32(model: torch.nn.Module, inputs: Sequence[torch.Tensor], workdir: Path) -> System:
    return _ort_system("ORT fp32", _export_fp32(model, inputs, workdir), inputs)


def ort_quantize_dynamic(model: torch.nn.Module, inputs: Sequence[torch.Tensor], workdir: Path) -> System:
    """ONNX Runtime's own dynamic int8 (per-tensor uint8 activations) on the fp32 export."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer re-infers shapes and refuses the exporter's recorded intermediate shapes
    # ("Inferred shape and existing shape differ"), so it gets the graph without them.
    source = onnx.load(str(_export_fp32(model, inputs, workdir)))
    del source.graph.value_info[:]
    plain = workdir / "fp32_without_value_info.onnx"
    onnx.save(source, str(plain))
    target = workdir / "ort_quantize_dynamic.onnx"
    quantize_dynamic(str(plain), str(target), weight_type=QuantType.QInt8, per_channel=True)
    return _ort_system("ORT quantize_dynamic", target, inputs)


def torch_ao_dynamic_int8(model: torch.nn.Module, inputs: Sequence[torch.Tensor], workdir: Path) -> System:
    """torch.ao's dynamic int8 Linear (fbgemm/onednn, per-tensor activations)."""
    import copy
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)

    def run() -> Any:
        with torch.no_grad():
            return quantized(*inputs)

    return System("torch.ao dynamic int8", run, _first(run()))


def fxopt_int8_passes(activations: str = "dynamic", merge_siblings: bool = True) -> list[Any]:
    """fxopt's int8 pipeline: every default exact pass (dropout removed, activations fused,
    Linears that share an input merged: one activation quantization for Q, K and V), then
    quantize-int8.

    ``merge_siblings=False`` leaves Q, K and V apart. ONNX Runtime needs no merge to quantize
    their shared input once (its common-subexpression elimination merges the three
    DynamicQuantizeLinear nodes), and it copies a merged output into three tensors (Split):
    for per-tensor activations in ONNX Runtime, the unmerged graph is faster (docs/int8.md).
    """
    from fxopt.passes import QuantizeInt8
    from fxopt.registry import default_pipeline

    exact = [p for p in default_pipeline() if merge_siblings or p.name != "merge-siblings"]
    return [*exact, QuantizeInt8(activations=activations)]


def fxopt_int8_eager(model: torch.nn.Module, inputs: Sequence[torch.Tensor], workdir: Path,
                     passes: Any = None, name: str = "fxopt int8 eager") -> System:
    import fxopt

    passes = fxopt_int8_passes() if passes is None else list(passes)
    optimized = fxopt.compile(model, tuple(inputs), passes=passes, backend="eager")

    def run() -> Any:
        return optimized(*inputs)

    return System(name, run, _first(run()))


def fxopt_int8_onnx(model: torch.nn.Module, inputs: Sequence[torch.Tensor], workdir: Path,
                    passes: Any = None, name: str = "fxopt int8 ONNX") -> System:
    import fxopt

    passes = fxopt_int8_passes() if passes is None else list(passes)
    filename = name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx"
    path, _ = fxopt.export_onnx(model, tuple(inputs), workdir / filename, passes=passes)
    return _ort_system(name, path, inputs)


def fxopt_int8_tensor_eager(model: torch.nn.Module, inputs: Sequence[torch.Tensor], workdir: Path) -> System:
    """Per-tensor dynamic activations: PyTorch's quantized engine on prepacked weights."""
    return fxopt_int8_eager(model, inputs, workdir, fxopt_int8_passes("dynamic-tensor"),
                            name="fxopt int8 eager (per-tensor)")


def fxopt_int8_tensor_onnx(model: torch.nn.Module, inputs: Sequence[torch.Tensor], workdir: Path) -> System:
    """Per-tensor dynamic activations: ONNX Runtime's DynamicQuantizeMatMul."""
    return fxopt_int8_onnx(model, inputs, workdir, fxopt_int8_passes("dynamic-tensor", merge_siblings=False),
                           name="fxopt int8 ONNX (per-tensor)")


SYSTEMS: dict[str, Callable[..., System]] = {
    "eager fp32": eager_fp32,
    "ORT fp32": ort_fp32,
    "ORT quantize_dynamic": ort_quantize_dynamic,
    "torch.ao dynamic int8": torch_ao_dynamic_int8,
    "fxopt int8 eager": fxopt_int8_eager,
    "fxopt int8 ONNX": fxopt_int8_onnx,
    "fxopt int8 eager (per-tensor)": fxopt_int8_tensor_eager,
    "fxopt int8 ONNX (per-tensor)": fxopt_int8_tensor_onnx,
}


def compare(
    model: torch.nn.Module,
    example_inputs: Any,
    systems: Sequence[str] | None = None,
    *,
    repeats: int = 20,
    warmup: int = 3,
    workdir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Build each system, time them side by side and measure their error against eager fp32.

    Returns one row per system: ``name``, ``ms`` (median), ``speedup`` (vs eager fp32),
    ``max_abs_err`` and ``max_rel_err`` (vs eager fp32), or ``error`` when it failed to build.
    """
    from fxopt.timing import measure_side_by_side

    inputs = list(normalize_example_inputs(example_inputs))
    names = list(systems) if systems is not None else list(SYSTEMS)
    if "eager fp32" not in names:
        names.insert(0, "eager fp32")
    with tempfile.TemporaryDirectory(prefix="fxopt-peers-") as scratch:
        folder = Path(workdir) if workdir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        built: dict[str, System] = {}
        rows: dict[str, dict[str, Any]] = {}
        for name in names:
            try:
                built[name] = SYSTEMS[name](model, inputs, folder)
            except Exception as exc:  # a peer that cannot handle the model is a result too
                rows[name] = {"name": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        timings = measure_side_by_side({n: s.run for n, s in built.items()}, warmup=warmup, repeats=repeats)
    reference = built["eager fp32"].output.float()
    scale = float(reference.abs().max()) or 1.0
    for name, system in built.items():
        diff = float((system.output.float() - reference).abs().max())
        rows[name] = {"name": name, "ms": timings[name], "speedup": timings["eager fp32"] / timings[name],
                      "max_abs_err": diff, "max_rel_err": diff / scale}
    return [rows[n] for n in names]


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'system':<30} {'ms':>9} {'vs eager':>9} {'max abs err':>12} {'max rel err':>12}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['name']:<30} failed: {row['error']}")
        else:
            lines.append(f"{row['name']:<30} {row['ms']:>9.2f} {row['speedup']:>8.2f}x "
                         f"{row['max_abs_err']:>12.3e} {row['max_rel_err']:>12.3e}")
    return "\n".join(lines)
