"""``fxopt bench`` output: text and markdown tables, JSON, a bar chart."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fxopt_bench.timing import SPREAD_LEGEND


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """One line per row; the speedup carries its spread (see :data:`SPREAD_LEGEND`)."""
    header = ["system", "model", "median ms", "speedup", "max rel err", "fresh err", "compile s", "params",
              "weight MB", "GFLOPs", "note"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["system"], r["model"], *["-"] * 8, f"{r['status']}: {r['note']}"])
            continue
        body.append([
            r["system"], r["model"], f"{r['median_ms']:.3f}", format_speedup(r),
            f"{r['max_rel_err']:.1e}", _error(r.get("fresh_rel_err")), f"{r['compile_s']:.1f}", _count(r["params"]),
            f"{r['weight_bytes'] / 1e6:.1f}" if r.get("weight_bytes") is not None else "-",
            f"{r['flops'] / 1e9:.3g}" if r.get("flops") is not None else "-", r["note"],
        ])
    return _table(header, body, markdown)


ERROR_LEGEND = ("max rel err: on the bench inputs (calibrated systems calibrate on them); fresh err: on inputs "
                "drawn alike from another seed; each the largest over the outputs, a largest absolute error over "
                "the output's largest magnitude")


def format_output_errors(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per row of a model with several outputs: each output's error on the fresh
    input, named where the model names its outputs, e.g.
    ``openvino-nncf-int8 / bert: last_hidden_state 1.4e-02, pooler_output 3.5e-02``."""
    lines = []
    for r in rows:
        errors = r.get("fresh_output_rel_errs")
        if r.get("status") != "ok" or not errors or len(errors) < 2:
            continue
        names = r.get("output_names") or [f"output {i}" for i in range(len(errors))]
        lines.append(f"{r['system']} / {r['model']}: " + ", ".join(f"{n} {_error(e)}" for n, e in zip(names, errors)))
    return lines


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def format_kernels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per fxopt row: its kernel choices (``report.kernels``) grouped by op, each
    chosen kernel with the number of sites that run it, and where the choices came from
    when not all were measured by this compile, e.g.
    ``fxopt / bert: onednn-linear 12x onednn, 4x aten; whole-graph 1x lowered``."""
    lines = []
    for r in rows:
        if r.get("kernels") is None:
            continue
        by_op: dict[str, Counter[str]] = {}
        sources: dict[str, Counter[str]] = {}
        for choice in r["kernels"]:
            by_op.setdefault(choice["op"], Counter())[choice["chosen"]] += 1
            sources.setdefault(choice["op"], Counter())[choice.get("source", "measured")] += 1
        parts = []
        for op, chosen in by_op.items():
            text = f"{op} " + ", ".join(f"{count}x {name}" for name, count in chosen.most_common())
            if set(sources[op]) != {"measured"}:
                text += " (" + ", ".join(f"{count} {source}" for source, count in sources[op].most_common()) + ")"
            parts.append(text)
        lines.append(f"{r['system']} / {r['model']}: " + ("; ".join(parts) if parts else "no kernel choices"))
    return lines


def format_speedup(row: dict[str, Any]) -> str:
    """``4.53x [4.40-4.61]``, with `` ~`` when the range reaches 1.00x (noise, not effect)."""
    if row.get("speedup_vs_eager") is None:
        return "-"
    text = f"{row['speedup_vs_eager']:.2f}x"
    if row.get("speedup_low") is not None and row["system"] != "eager":
        text += f" [{row['speedup_low']:.2f}-{row['speedup_high']:.2f}]"
        if row.get("within_noise"):
            text += " ~"
    return text


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


PEER_PACKAGES = ("openvino", "nncf", "ctranslate2", "torchao")


def format_machine(machine: dict[str, Any]) -> str:
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    peers = ", ".join(f"{p} {machine[p]}" for p in PEER_PACKAGES if machine.get(p))
    return (f"{machine['cpu']} ({machine['logical_cpus']} logical CPUs, torch threads {machine['torch_threads']}"
            f"{gpu}); torch {machine['torch']}, onnxruntime {machine.get('onnxruntime')}, "
            f"transformers {machine.get('transformers')}{', ' + peers if peers else ''}, Python {machine['python']}")


def write_markdown(result: dict[str, Any], path: str | Path, command: str, date: str | None = None) -> None:
    when = [f"Date: {date}", ""] if date else []
    parts = [*when, f"Machine: {format_machine(result['machine'])}", "", f"Command: `{command}`", ""]
    if result.get("outputs"):
        parts += [f"Outputs served: {', '.join(result['outputs'])}", ""]
    if result["rows"]:
        parts += [format_table(result["rows"], markdown=True), "", SPREAD_LEGEND, "", ERROR_LEGEND, ""]
        per_output = format_output_errors(result["rows"])
        if per_output:
            parts += ["Fresh-input error per output:", "", *(f"- {line}" for line in per_output), ""]
        kernels = format_kernels(result["rows"])
        if kernels:
            parts += ["Kernel choices:", "", *(f"- {line}" for line in kernels), ""]
    if result["scale"]:
        parts += [format_scale(result["scale"], markdown=True), ""]
    if result.get("scale_llama"):
        from fxopt_bench.scale import format_scale_llama

        parts += [format_scale_llama(result["scale_llama"], markdown=True), ""]
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
