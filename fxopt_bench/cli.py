"""``fxopt bench``: the command line of the benchmark (``fxopt bench --help``)."""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fxopt_bench.output import (
    ERROR_LEGEND,
    format_kernels,
    format_machine,
    format_output_errors,
    format_scale,
    format_table,
    json_safe,
    write_markdown,
    write_plot,
)
from fxopt_bench.run import BenchConfig, run_bench
from fxopt_bench.timing import SPREAD_LEGEND


def run_bench_cli(args: Any) -> int:
    """Run ``fxopt bench`` with the parsed arguments; returns the exit status."""
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
    if getattr(args, "compile_time", False):
        from fxopt_bench.compile_time import format_compile_time, run_compile_time

        models = [m.strip() for m in args.models.split(",") if m.strip()]
        explicit = any(arg.startswith("--models") for arg in sys.argv)  # the latency default (mlp) is not this one
        rows = run_compile_time(models if explicit else ["bert"], quick=args.quick,
                                repeats=getattr(args, "repeats", None) or 1, threads=getattr(args, "threads", None) or 1,
                                progress=lambda message: print(message, file=sys.stderr, flush=True))
        print(format_compile_time(rows))
        return 0
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "task", "latency") == "generate":
        return _run_generate_cli(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else None
    outputs = [o.strip() for o in args.outputs.split(",") if o.strip()] if getattr(args, "outputs", None) else None
    config = BenchConfig(models=models, systems=systems, quick=args.quick, device=args.device, outputs=outputs,
                         repeats=getattr(args, "repeats", None), warmup=getattr(args, "warmup", None),
                         llama_layers=getattr(args, "llama_layers", None) or 22,
                         llama_cases=[c.strip() for c in args.llama_cases.split(",") if c.strip()]
                         if getattr(args, "llama_cases", None) else None)
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[bench {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    result = run_bench(config, progress)
    print(f"machine: {format_machine(result['machine'])}")
    if result.get("outputs"):
        print(f"outputs served: {', '.join(result['outputs'])}")
    if result["rows"]:
        print(format_table(result["rows"]))
        print(SPREAD_LEGEND)
        print(ERROR_LEGEND)
        per_output = format_output_errors(result["rows"])
        if per_output:
            print("fresh-input error per output:")
            print("\n".join(f"  {line}" for line in per_output))
        kernels = format_kernels(result["rows"])
        if kernels:
            print("kernel choices (op: sites per chosen kernel):")
            print("\n".join(f"  {line}" for line in kernels))
    if result["scale"]:
        print(format_scale(result["scale"]))
    if result.get("scale_llama"):
        from fxopt_bench.scale import format_scale_llama

        print(format_scale_llama(result["scale_llama"]))
    command = ("fxopt bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"]
               else f"fxopt bench --models {args.models}")
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
        print(f"JSON written to {args.json}")
    if args.markdown:
        today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        write_markdown(result, args.markdown, command, date=today)
        print(f"markdown written to {args.markdown}")
    if args.plot:
        write_plot(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _run_generate_cli(args: Any) -> int:
    from dataclasses import asdict

    from fxopt_bench.generate import QUICK, SIZES, format_generate, run_generate
    from fxopt_bench.run import machine_info

    if args.device != "cpu":
        print("fxopt bench: --task generate runs on the CPU only", file=sys.stderr)
        return 2
    if args.markdown or args.plot:
        print("fxopt bench: --task generate writes --json only (no --markdown or --plot)", file=sys.stderr)
        return 2
    systems = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else None
    size = QUICK if args.quick else SIZES[getattr(args, "size", None) or "small"]
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[bench {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    try:
        rows = run_generate(quick=args.quick, systems=systems, repeats=getattr(args, "repeats", None),
                            warmup=getattr(args, "warmup", None), progress=progress, size=size)
    except ValueError as exc:
        print(f"fxopt bench: {exc}", file=sys.stderr)
        return 2
    machine = machine_info("cpu")
    print(f"machine: {format_machine(machine)}")
    print(format_generate(rows, size))
    if args.json:
        records = [{k: v for k, v in asdict(row).items() if k != "log"} for row in rows]
        Path(args.json).write_text(json.dumps(json_safe({"machine": machine, "generate": records}), indent=2,
                                              allow_nan=False))
        print(f"JSON written to {args.json}")
    return 0
