"""The ``fxopt`` command line: passes, demo, optimize, tune, inspect, bench."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fxopt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        else:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"fxopt {args.command}: error: {message} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fxopt")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxopt", description="Inference optimizer for PyTorch Linear layers, built on torch.fx.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version",
                        version=f"fxopt {_version()} (torch {torch.__version__})")
    # --debug is accepted after the subcommand too; SUPPRESS keeps the top-level value
    # unless the flag is given there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_parser = sub.add_parser

    def add_command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return add_parser(name, parents=[common], **kwargs)

    sub.add_parser = add_command  # type: ignore[method-assign]

    p = sub.add_parser("passes", help="list the registered passes")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("demo", help="optimize the built-in demo model end to end")
    p.add_argument("--passes", default=None, help="comma-separated pass list (default: every exact pass)")
    p.add_argument("--batch", type=int, default=64, help="batch size of the demo input (default 64)")
    p.add_argument("--repeats", type=int, default=30, help="timing repeats per candidate (default 30)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("optimize", help="optimize a model defined in a Python file")
    p.add_argument("target", help="FILE.py:ATTR, where ATTR is an nn.Module or a callable returning one")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="build the model with ATTR (a function) and take its weights memory-mapped from this "
                        "safetensors checkpoint: a file, an index or a folder of shards")
    p.add_argument("--input-shape", action="append", metavar="D0,D1,...",
                   help="shape of one random input (repeat for several inputs), e.g. 8,512")
    p.add_argument("--inputs", metavar="FILE",
                   help="example inputs from a file instead of random ones: .pt (a tensor, a tuple/list "
                        "of tensors, or a dict of keyword tensors) or .npz (arr_0, arr_1, ... positional; "
                        "other names as keyword inputs)")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration batches for lossy passes: .pt holding a list of batches (each like "
                        "--inputs), or .npz whose arrays stack the batches along a new first axis")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="dtype of each input (default float32)")
    p.add_argument("--passes", default=None, help="comma-separated pass list, e.g. 'remove-dropout,low-rank(energy=0.99)'")
    p.add_argument("--static", action="store_true",
                   help="every size as in the example inputs (default: the batch dimension is dynamic)")
    p.add_argument("--dynamic", action="append", metavar="INPUT:DIM",
                   help="also make this dim dynamic, e.g. input_ids:1 or 0:1 for a sequence length "
                        "(INPUT: forward's parameter name or position; repeatable)")
    p.add_argument("--preset", default=None, help="instead of --passes: lossless, bf16 or int8 (the fastest "
                   "verified recipe within the preset's budget; the report says what it chose)")
    p.add_argument("--backend", default=None,
                   help="eager (default), onnx, or an optional backend: openvino, inductor (see "
                        "docs/backends.md); with --preset, limits the preset to that backend")
    p.add_argument("--onnx", metavar="PATH", help="also export the optimized graph to ONNX (with ONNX "
                   "Runtime's fused contrib ops unless --portable-onnx)")
    p.add_argument("--portable-onnx", action="store_true",
                   help="with --onnx: standard ONNX operators only, for runtimes other than ONNX Runtime")
    p.add_argument("--report-json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--strict", action="store_true", help="fail instead of rolling back a failing pass")
    p.add_argument("--memory-bound", type=float, default=None, metavar="GIB",
                   help="GiB the compile may hold besides the model (node values a lossy pass keeps; with "
                        "--preset, built candidates; past it a preset races only eager candidates when the "
                        "model's weights exceed it). Default: derived from the model's weights")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("tune", help="the fastest model within a task-metric budget, choosing a technique per layer")
    p.add_argument("target", help="FILE.py:ATTR, where ATTR is an nn.Module or a callable returning one")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="build the model with ATTR (a function) and take its weights memory-mapped from this "
                        "safetensors checkpoint: a file, an index or a folder of shards")
    p.add_argument("--input-shape", action="append", metavar="D0,D1,...",
                   help="shape of one random example input, at the batch size latency matters for")
    p.add_argument("--inputs", metavar="FILE", help="example inputs from a file (.pt or .npz, as for optimize)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="dtype of each input (default float32)")
    p.add_argument("--data", metavar="FILE", required=True,
                   help=".pt holding a list of (inputs, labels) batches (for top1-agreement: a list of input "
                        "batches, like --calibration of optimize), held out from training")
    p.add_argument("--metric", default="accuracy",
                   help="accuracy (default) or top1-agreement (with the original model: no labels needed)")
    p.add_argument("--max-drop", type=float, required=True,
                   help="largest fall of the metric allowed, in its units (0.005: half a point of accuracy)")
    p.add_argument("--confidence", type=_confidence, default=0.95,
                   help="judge a drop by its one-sided upper bound at this confidence (default 0.95); "
                        "'none': by the drop measured on the data alone")
    p.add_argument("--techniques", default=None,
                   help="comma-separated techniques or families, e.g. int8,low-rank (default: every registered one: "
                        "prune-hidden, low-rank, bf16, int8-dynamic, int8-tensor, int8-static)")
    p.add_argument("--passes", default=None, help="exact passes to run first (default: every exact pass)")
    p.add_argument("--backend", default="eager", choices=["eager", "onnx"], help="where latency is measured")
    p.add_argument("--time-budget", type=float, default=120.0, metavar="SECONDS", help="search budget (default 120)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds per side-by-side measurement (default 20)")
    p.add_argument("--holdout", action="store_true",
                   help="choose on half the data batches and verify on the other half")
    p.add_argument("--no-confirm", dest="confirm", action="store_false", default=None,
                   help="choose and judge on every data batch (default: choose on the even batches, "
                        "confirm on the odd ones)")
    p.add_argument("--recover", metavar="FILE",
                   help="train an over-budget candidate back within --max-drop on these input batches (.pt "
                        "holding a list of batches, like --calibration of optimize; no labels) before "
                        "giving it up (see docs/accuracy.md)")
    p.add_argument("--plot", metavar="PATH", help="write the Pareto front as a PNG (needs matplotlib: fxopt[plot])")
    p.add_argument("--report-json", metavar="PATH", help="write the report, search log included, as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("inspect", help="what a file written by fxopt.save holds (backend, passes, report, "
                                       "constants), read without loading it")
    p.add_argument("file", help="a .fxopt file")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="side-by-side latency of fxopt against eager and the peers installed "
                                     "(pip install 'fxopt[peers]' for OpenVINO, NNCF, CTranslate2, torchao)")
    p.add_argument("--models", default="mlp", help="comma-separated models: mlp,bert,llama,gpt2,vit,t5,dlrm, and scale "
                   "(pass-manager time and memory on deep graphs), scale-llama (compile s and peak RSS on "
                   "TinyLlama-1.1B's shape, about 4 GiB per case: run it alone)")
    p.add_argument("--llama-layers", type=int, default=22, metavar="N",
                   help="layers of the scale-llama model (default 22, the 1.1B shape; fewer for a quick check)")
    p.add_argument("--llama-cases", default=None, metavar="A,B",
                   help="which scale-llama cases (default all: model, fxopt-lossless, fxopt-lossless-onnx, "
                        "torch-export, ort-quantize-dynamic, fxopt-int8-weight-only, fxopt-preset-int8)")
    p.add_argument("--systems", default=None,
                   help="comma-separated systems (default: all; a peer that is not installed is a skipped row)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    p.add_argument("--outputs", default=None, metavar="A,B",
                   help="serve only these outputs of each model (names of a transformers ModelOutput, e.g. "
                        "last_hidden_state, or positions): every system is given the model that returns them")
    p.add_argument("--json", metavar="PATH", help="write {machine, rows} as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write a markdown table")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of speedups (needs matplotlib)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per system (default 30, quick 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per system (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every system alike: PyTorch, ONNX Runtime, OpenVINO, CTranslate2 (default: PyTorch's default)")
    p.add_argument("--task", default="latency", choices=["latency", "generate"],
                   help="latency (default): one forward per model; generate: a random Llama's generate() "
                        "through torch.compile, prefill and decode ms/token per system (--systems from eager, "
                        "inductor, torchao-int8-weights, fxopt, fxopt-int8-weights, fxopt-int4-weights, and "
                        "fxopt-int8-weights-all, fxopt-int4-weights-all: every Linear quantized)")
    p.add_argument("--size", default=None, choices=["small", "tinyllama"],
                   help="--task generate: the Llama's shape: small (default; hidden 512, 4 layers, prompts 4 x 32) "
                        "or tinyllama (TinyLlama-1.1B's shape, 4.1 GB fp32: batch 1, prompt 128, 64 new tokens; "
                        "run it alone)")
    p.add_argument("--compile-time", action="store_true",
                   help="instead of latency: fxopt.compile's time and its per-phase breakdown for the lossless "
                        "pipeline, per-tensor int8 and the presets (--models, default bert; one thread unless --threads)")
    p.set_defaults(func=cmd_bench)
    return parser


def cmd_passes(args: argparse.Namespace) -> int:
    import fxopt

    types = fxopt.list_passes()
    width = max((len(t.name) for t in types), default=0)
    for pass_type in types:
        kind = "exact" if pass_type.exact else "lossy"
        print(f"{pass_type.name.ljust(width)}  {kind}  {pass_type.summary()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fxopt.demo import run_demo

    return run_demo(args.passes, batch=args.batch, repeats=args.repeats)


def cmd_inspect(args: argparse.Namespace) -> int:
    from fxopt.saving import describe, inspect

    if args.json:
        info = inspect(args.file)
        print(json.dumps({**info, "report": info["report"].to_dict()}, indent=2, default=str))
    else:
        print(describe(args.file))
    return 0


def load_target(target: str, checkpoint: str | None = None) -> torch.nn.Module:
    """``FILE.py:ATTR`` -> the module (ATTR may be a module or a zero-argument factory). With
    ``checkpoint`` (safetensors), ATTR must be a factory: the model is built by
    :func:`fxopt.from_checkpoint`, its weights memory-mapped from the checkpoint."""
    if ":" not in target:
        raise ValueError(f"target must look like FILE.py:ATTR, got {target!r}")
    file_name, attr = target.rsplit(":", 1)
    path = Path(file_name)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {file_name}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    if not hasattr(module, attr):
        raise AttributeError(f"{file_name} has no attribute {attr!r}")
    obj: Any = getattr(module, attr)
    if checkpoint is not None:
        if isinstance(obj, torch.nn.Module) or not callable(obj):
            raise TypeError(f"--checkpoint needs {target} to be a function that builds the model, "
                            f"not a {type(obj).__name__}")
        from fxopt.checkpoint import from_checkpoint

        return from_checkpoint(obj, checkpoint)
    if not isinstance(obj, torch.nn.Module) and callable(obj):
        obj = obj()
    if not isinstance(obj, torch.nn.Module):
        raise TypeError(f"{target} is a {type(obj).__name__}, not an nn.Module or a factory of one")
    return obj


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--input-shape must be comma-separated integers, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"--input-shape must be positive sizes, got {text!r}")
    return shape


def _model_and_examples(args: argparse.Namespace) -> tuple[Any, list[Any], dict[str, Any]]:
    """The target model and its example inputs, from --inputs FILE or random --input-shape."""
    if bool(args.inputs) == bool(args.input_shape):
        raise ValueError("give the example inputs either as --input-shape (random) or as --inputs FILE")
    model = load_target(args.target, args.checkpoint)
    if args.inputs:
        inputs, kwargs = load_inputs(args.inputs)
    else:
        inputs, kwargs = random_inputs(args.input_shape, args.dtype or []), {}
    return model, inputs, kwargs


def cmd_optimize(args: argparse.Namespace) -> int:
    import fxopt

    model, inputs, kwargs = _model_and_examples(args)
    calibration = load_calibration(args.calibration) if args.calibration else None
    dynamic_shapes = cli_dynamic_shapes(model, inputs, kwargs, static=args.static, dynamic=args.dynamic or [])
    if model.training:
        print("fxopt optimize: note: the model is in training mode; optimizing an eval() copy", file=sys.stderr)
    opt = fxopt.compile(model, tuple(inputs), passes=args.passes, backend=args.backend, strict=args.strict,
                        preset=args.preset,
                        example_kwargs=kwargs or None, calibration=calibration, dynamic_shapes=dynamic_shapes,
                        instruments=[fxopt.PrintProgress()],
                        memory_bound=None if args.memory_bound is None else int(args.memory_bound * 2**30))
    print(opt.report)
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(opt.report.to_dict(), indent=2, default=str))
        print(f"report written to {args.report_json}")
    if args.onnx:
        path, _ = fxopt.export_onnx(opt, tuple(inputs), args.onnx, portable=args.portable_onnx)
        print(f"ONNX written to {path}")
    return 0


def _confidence(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def cmd_tune(args: argparse.Namespace) -> int:
    import fxopt

    model, inputs, kwargs = _model_and_examples(args)
    data = load_labelled(args.data)
    opt = fxopt.tune(model, kwargs if kwargs and not inputs else tuple(inputs), data=data, metric=args.metric,
                     max_drop=args.max_drop, backend=args.backend, passes=args.passes, techniques=args.techniques,
                     time_budget_s=args.time_budget, repeats=args.repeats, holdout=args.holdout,
                     progress=not args.quiet, confidence=args.confidence, confirm=args.confirm,
                     recover=load_calibration(args.recover) if args.recover else None)
    print(opt.report)
    if args.plot:
        opt.report.search.plot(args.plot)
        print(f"Pareto plot written to {args.plot}")
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(opt.report.to_dict(), indent=2, default=str))
        print(f"report written to {args.report_json}")
    return 0


def load_labelled(path: str) -> list[Any]:
    """``fxopt tune --data``: a ``.pt`` list of ``(inputs, labels)`` pairs, or of input batches."""
    data = _read(path)
    if not isinstance(data, (list, tuple)) or not data:
        raise ValueError(f"{path}: data must be a non-empty list of (inputs, labels) batches")
    return [tuple(item) if isinstance(item, list) else item for item in data]


def cli_dynamic_shapes(model: torch.nn.Module, inputs: list[torch.Tensor], kwargs: dict[str, Any], *,
                       static: bool, dynamic: list[str]) -> Any:
    """``fxopt.compile``'s ``dynamic_shapes`` from ``--static`` / ``--dynamic INPUT:DIM``:
    the default dynamic batch, plus each named dim (``Dim.AUTO``)."""
    import inspect

    from fxopt.capture import batch_dynamic_shapes

    if static and dynamic:
        raise ValueError("--static and --dynamic contradict each other")
    if static:
        return "static"
    if not dynamic:
        return None
    names = list(inspect.signature(model.forward).parameters)
    spec = dict(batch_dynamic_shapes(model, tuple(inputs), kwargs) or {})
    auto = getattr(torch.export.Dim, "AUTO", None) or torch.export.Dim("dynamic")
    for item in dynamic:
        where, _, dim = item.rpartition(":")
        if not where or not dim.lstrip("-").isdigit():
            raise ValueError(f"--dynamic takes INPUT:DIM (e.g. input_ids:1), got {item!r}")
        name = names[int(where)] if where.isdigit() and int(where) < len(names) else where
        if name not in names:
            raise ValueError(f"--dynamic {item!r}: the model's forward has no input {where!r} "
                             f"(inputs: {', '.join(names)})")
        entry = dict(spec.get(name) or {})
        entry[int(dim)] = auto
        spec[name] = entry
    return spec


def random_inputs(shapes: list[str], dtypes: list[str]) -> list[torch.Tensor]:
    inputs = []
    for i, text in enumerate(shapes):
        dtype = DTYPES[dtypes[i]] if i < len(dtypes) else torch.float32
        shape = parse_shape(text)
        inputs.append(torch.randint(0, 2, shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape, dtype=dtype))
    return inputs


def load_inputs(path: str) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One batch from a ``.pt`` or ``.npz`` file: (positional inputs, keyword inputs)."""
    return _split_batch(_read(path), path)


def load_calibration(path: str) -> list[Any]:
    """Calibration batches from a file, each as ``fxopt.compile(calibration=...)`` takes them."""
    data = _read(path)
    if isinstance(data, dict) and path.endswith(".npz"):
        counts = {len(v) for v in data.values()}
        if len(counts) != 1:
            raise ValueError(f"{path}: every array must stack the same number of batches, got {sorted(counts)}")
        data = [{k: v[i] for k, v in data.items()} for i in range(counts.pop())]
    if not isinstance(data, (list, tuple)) or not data:
        raise ValueError(f"{path}: calibration data must be a non-empty list of batches")
    batches = []
    for batch in data:
        args, kwargs = _split_batch(batch, path)
        if args and kwargs:
            raise ValueError(f"{path}: a calibration batch is either positional (arr_0, arr_1, ... or a "
                             "tuple) or keyword inputs (named arrays or a dict), not both")
        batches.append(kwargs if kwargs else tuple(args))
    return batches


def _read(path: str) -> Any:
    """A data file's tensors, never unpickling Python objects: ``.npz`` arrays without
    object arrays (``allow_pickle=False``), ``.pt`` through ``torch.load(weights_only=True)``
    (tensors and lists, tuples and dicts of them)."""
    import pickle

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if file.suffix == ".npz":
        import numpy as np

        try:
            with np.load(file, allow_pickle=False) as archive:
                return {name: torch.from_numpy(archive[name]) for name in archive.files}
        except ValueError as exc:
            if "allow_pickle" not in str(exc):
                raise
            raise ValueError(f"{path}: holds object arrays (pickled Python objects), which fxopt never "
                             "loads; store numeric arrays only") from None
    if file.suffix in (".pt", ".pth"):
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line),
                         str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            raise ValueError(f"{path}: holds Python objects other than tensors ({found}), which fxopt never "
                             "unpickles; save tensors, or lists, tuples and dicts of tensors") from None
    raise ValueError(f"{path}: expected a .pt or .npz file")


def _split_batch(batch: Any, path: str) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [batch], {}
    if isinstance(batch, (list, tuple)):
        return list(batch), {}
    if isinstance(batch, dict):
        positional = sorted((k for k in batch if k.startswith("arr_") and k[4:].isdigit()),
                            key=lambda k: int(k[4:]))
        args = [batch[k] for k in positional]
        kwargs = {k: v for k, v in batch.items() if k not in positional}
        return args, kwargs
    raise ValueError(f"{path}: expected tensors, a tuple/list of tensors or a dict, got {type(batch).__name__}")


def cmd_bench(args: argparse.Namespace) -> int:
    from fxopt_bench.cli import run_bench_cli

    return run_bench_cli(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
