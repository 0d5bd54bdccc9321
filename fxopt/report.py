"""The optimization report: one row per pass, printable and machine-readable."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from fxopt.cost import Cost
from fxopt.pass_api import Skip


@dataclass
class PassRecord:
    """What one pass did to the graph, as measured by the manager."""

    name: str
    exact: bool
    status: str  # "applied", "no change", "rolled back"
    matched: int = 0
    applied: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # refusal code -> count
    before: Cost = Cost(0, 0, 0)
    after: Cost = Cost(0, 0, 0)
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    # A lossy pass's worst error on the batches its choice was not made on (None: nothing was
    # held out, or an exact pass), and whether a held-out failure made it choose again.
    heldout_error: float | None = None
    heldout_retry: bool = False
    budget: float | None = None
    seconds: float = 0.0
    message: str = ""
    # with a task budget: the metric drop of the pass's choice and its upper confidence bound
    metric_drop: float | None = None
    metric_drop_bound: float | None = None
    details: list[dict[str, Any]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

    def take_details(self, details: list[dict[str, Any]]) -> None:
        """Keep a pass's ``details`` and the held-out numbers the budgeted search put in them
        (``heldout_error``, ``heldout_retry``): the worst held-out error over the details."""
        self.details = list(details)
        heldout = [float(d["heldout_error"]) for d in self.details if d.get("heldout_error") is not None]
        self.heldout_error = max(heldout) if heldout else None
        self.heldout_retry = any(bool(d.get("heldout_retry")) for d in self.details)
        drops = [d for d in self.details if d.get("metric_drop") is not None]
        if drops:
            worst = max(drops, key=lambda d: d.get("metric_drop_bound", d["metric_drop"]))
            self.metric_drop, self.metric_drop_bound = worst["metric_drop"], worst.get("metric_drop_bound")

    def heldout_cell(self) -> str:
        """The report's "held-out err" cell: the error, "-" when nothing was held out, and a
        trailing "*" when the choice was made again on every batch after a held-out failure."""
        cell = "-" if self.heldout_error is None else f"{self.heldout_error:.2e}"
        return cell + ("*" if self.heldout_retry else "")

    @property
    def rolled_back(self) -> bool:
        return self.status == "rolled back"

    def skip_lines(self) -> list[str]:
        """One line per refusal code, commonest first: how many sites, and one example's detail."""
        lines = []
        for group, count in self.skipped.most_common():
            example = next((s for s in self.skips if s.group == group), None)
            if example is None or example.group != example.code:  # plain-text skips group by their text
                lines.append(f"skipped {count}x: {group}")
            else:
                lines.append(f"skipped {count}x [{group}]" + (f", e.g. {example.detail}" if example.detail else ""))
        return lines


@dataclass
class Report:
    """What ``fxopt.compile`` did: capture, every pass, lowering."""

    model: str = ""
    backend: str = "eager"
    device: str = "cpu"
    capture_seconds: float = 0.0
    lower_seconds: float = 0.0
    passes: list[PassRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    original: Cost = Cost(0, 0, 0)
    final: Cost = Cost(0, 0, 0)
    final_max_rel_err: float = 0.0
    final_max_abs_err: float = 0.0
    # The measured choices of the lowering (fxopt.pipeline.timings.Choice.as_dict): per site,
    # the kernel that runs and the times of the candidates, and the whole-graph check.
    kernels: list[dict[str, Any]] = field(default_factory=list)
    search: Any = None  # fxopt.tune's search log (a TuneLog), when the model was tuned
    # Where compile time went: phase -> seconds, exclusive (a phase inside another is not
    # counted twice), so the phases sum to ``total_seconds`` (see :class:`fxopt.phases.PhaseTimer`).
    timings: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    # Where memory went, per phase of ``timings`` (Linux; empty elsewhere): ``peak_mb``, how far
    # the phase raised the process's peak resident memory (the phases sum to the compile's
    # peak growth), and ``net_mb``, the resident memory it left behind (negative: it freed).
    memory: dict[str, dict[str, float]] = field(default_factory=dict)

    def timing_line(self) -> str:
        """The compact breakdown: ``compile 1.93s: capture 0.81, verify 0.52, ...``, largest first."""
        parts = sorted(self.timings.items(), key=lambda item: -item[1])
        return (f"compile {self.total_seconds:.2f}s: "
                + ", ".join(f"{name} {seconds:.2f}" for name, seconds in parts if seconds >= 0.005))

    def memory_line(self) -> str:
        """The compact memory breakdown: ``memory: peak +812 MB (verify +500, capture +300),
        kept +120 MB (lowering +150, passes -30)``, largest first; "" without measurements."""
        if not self.memory:
            return ""

        def spelled(key: str) -> str:
            parts = sorted(((name, m[key]) for name, m in self.memory.items()), key=lambda item: -abs(item[1]))
            total = sum(value for _, value in parts)
            shown = ", ".join(f"{name} {value:+.0f}" for name, value in parts if abs(value) >= 1)
            return f"{total:+.0f} MB" + (f" ({shown})" if shown else "")

        return f"memory: peak {spelled('peak_mb')}, kept {spelled('net_mb')}"

    def kernel_lines(self) -> list[str]:
        """One line per measured choice: the site, the kernel that runs, and the candidates'
        times (ms, at each measured batch size) with where they came from."""
        lines = []
        for k in self.kernels:
            times = k.get("times") or {}
            ordered = [k["chosen"]] + [name for name in times if name != k["chosen"]]
            spelled = " vs ".join(f"{name} {'/'.join(f'{t:.3f}' for t in times[name])} ms"
                                  for name in ordered if name in times)
            where = ", ".join(k.get("nodes", []))
            lines.append(f"{k['op']} [{where}] {k['site']}: {k['chosen']} runs"
                         + (f" ({spelled}; {k['source']})" if spelled else " (not measured)"))
        return lines

    def __getitem__(self, name: str) -> PassRecord:
        """The record of the (last) run of the pass called ``name``."""
        for record in reversed(self.passes):
            if record.name == name:
                return record
        raise KeyError(f"no pass named {name!r} in this report (ran: {[r.name for r in self.passes]})")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for record, original in zip(data["passes"], self.passes):
            record["skipped"] = dict(original.skipped)  # refusal code -> count (asdict garbles a Counter)
        return data

    def __str__(self) -> str:
        header = ["pass", "kind", "status", "matched", "applied", "skipped", "params", "GFLOPs",
                  "weight MB", "max abs err", "max rel err", "held-out err", "time s"]
        rows = [header]
        for r in self.passes:
            rows.append([
                r.name,
                "exact" if r.exact else f"lossy<={r.budget:g}" if r.budget is not None else "lossy",
                r.status,
                str(r.matched),
                str(r.applied),
                str(sum(r.skipped.values())),
                _arrow(r.before.params, r.after.params, _count),
                _arrow(r.before.flops, r.after.flops, lambda v: f"{v / 1e9:.3g}"),
                _arrow(r.before.weight_bytes, r.after.weight_bytes, lambda v: f"{v / 1e6:.3g}"),
                f"{r.max_abs_err:.2e}",
                f"{r.max_rel_err:.2e}",
                r.heldout_cell(),
                f"{r.seconds:.2f}",
            ])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [f"fxopt report: {self.model} -> {self.backend} on {self.device} "
                 f"(capture {self.capture_seconds:.2f}s, lowering {self.lower_seconds:.2f}s)"]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if not self.passes:
            lines.append("(no passes ran: nothing to do)")
        for r in self.passes:
            lines.extend(f"  {r.name}: {line}" for line in r.skip_lines())
            if r.message:
                lines.append(f"  {r.name}: {r.message}")
            if r.metric_drop is not None:
                bound = "" if r.metric_drop_bound is None else f", upper bound {r.metric_drop_bound:+.4f}"
                lines.append(f"  {r.name}: metric drop {r.metric_drop:+.4f}{bound} on data")
        lines.append(
            f"total: params {_arrow(self.original.params, self.final.params, _count)}, "
            f"GFLOPs {_arrow(self.original.flops, self.final.flops, lambda v: f'{v / 1e9:.3g}')}, "
            f"weight MB {_arrow(self.original.weight_bytes, self.final.weight_bytes, lambda v: f'{v / 1e6:.3g}')}, "
            f"max rel err vs original {self.final_max_rel_err:.2e}"
        )
        if any(r.heldout_retry for r in self.passes):
            lines.append("held-out err *: the choice made on half the batches failed on the other half and was "
                         "made again on every batch")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.extend(f"kernel: {line}" for line in self.kernel_lines())
        if self.search is not None:
            lines.append(str(self.search))
        if self.timings:
            lines.append(f"time: {self.timing_line()}")
        if self.memory:
            lines.append(self.memory_line())
        return "\n".join(lines)


def _count(value: int) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e3:
        return f"{value / 1e3:.3g}k"
    return str(value)


def _arrow(before: int, after: int, fmt: Any) -> str:
    return fmt(before) if before == after else f"{fmt(before)}->{fmt(after)}"
