"""``fxopt bench --compile-time``: how long ``fxopt.compile`` takes, and where the time goes.

For each model, each compile case (the lossless pipeline, per-tensor int8, the lossless and
int8 presets) is compiled ``repeats`` times in this process at a fixed thread count (one by
default), after a warm-up compile of a tiny model so that one-time imports are not counted.
Each row is the fastest run's total and its per-phase breakdown (``Report.timings``):
capture, canonicalize, reference outputs, each pass (``pass:<name>``), shape propagation,
verification, lowering, the backend's parity check, a preset's timing of its candidates.

    python -m fxopt_bench.compile_time --models bert --cases lossless,int8
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

CASES: dict[str, dict[str, Any]] = {
    "lossless": {},
    "int8": {"passes": ("exact", "quantize-int8(activations='dynamic-tensor')")},
    "preset-lossless": {"preset": "lossless"},
    "preset-int8": {"preset": "int8"},
    # Three lossy passes in a row with calibration (the example inputs again, as the bench's
    # calibrated systems get them): what fxopt-int8-openvino compiles, on the eager backend.
    "int8-calibrated": {"passes": ("exact", "smooth-quant(explicit=True)",
                                   "quantize-int8(activations='static', observer='percentile')",
                                   "quantize-attention"), "calibrate": True},
    "preset-int8-calibrated": {"preset": "int8", "calibrate": True},
}
DEFAULT_CASES = ("lossless", "int8", "preset-lossless", "preset-int8")


def compile_case(model: torch.nn.Module, inputs: Any, case: str) -> Any:
    """``fxopt.compile`` as the case says; returns the optimized module."""
    import fxopt

    options = dict(CASES[case])
    if options.pop("calibrate", False):
        options["calibration"] = [inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.compile(model, inputs, **options)


def run_compile_time(models: Sequence[str] = ("bert",), cases: Sequence[str] = DEFAULT_CASES, *,
                     quick: bool = False, repeats: int = 1, threads: int = 1,
                     progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per (model, case): the fastest of ``repeats`` compiles, with its breakdown."""
    from fxopt_bench.models import MODELS, build_mlp

    progress = progress or (lambda message: None)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case {unknown[0]!r} (available: {', '.join(CASES)})")
    torch.set_num_threads(threads)
    compile_case(*build_mlp(depth=2, width=4), "lossless")  # imports and one-time initialization
    rows = []
    for name in models:
        model, inputs = MODELS[name].build(quick)
        for case in cases:
            best = None
            for _ in range(max(repeats, 1)):
                progress(f"compile time: {name} {case} ...")
                start = time.perf_counter()
                try:
                    report = compile_case(model, inputs, case).report
                except Exception as exc:  # a case a model cannot take (no Linear to quantize, say)
                    best = {"model": name, "case": case, "seconds": None, "error": f"{type(exc).__name__}: {exc}"}
                    break
                seconds = time.perf_counter() - start
                if best is None or seconds < best["seconds"]:
                    best = {"model": name, "case": case, "seconds": seconds, "timings": dict(report.timings),
                            "breakdown": report.timing_line(), "threads": threads}
            rows.append(best)
            progress(f"compile time:   {best.get('breakdown') or best.get('error')}")
    return rows


def format_compile_time(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'model':<8} {'case':<16} {'seconds':>8}  breakdown (exclusive seconds, largest first)"]
    for row in rows:
        if row.get("seconds") is None:
            lines.append(f"{row['model']:<8} {row['case']:<16} {'-':>8}  failed: {row['error']}")
            continue
        breakdown = row["breakdown"].split(": ", 1)[-1]
        lines.append(f"{row['model']:<8} {row['case']:<16} {row['seconds']:>8.2f}  {breakdown}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxopt_bench.compile_time", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    rows = run_compile_time([m for m in args.models.split(",") if m], [c for c in args.cases.split(",") if c],
                            quick=args.quick, repeats=args.repeats, threads=args.threads,
                            progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_compile_time(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
