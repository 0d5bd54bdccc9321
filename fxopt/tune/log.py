"""What ``fxopt.tune`` tried: every candidate with its measured latency, metric and fate, and
the Pareto table (latency against metric) of the ones worth keeping."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Candidate:
    """One model the search built and measured.

    ``choices``: site -> technique (``int8-dynamic``, ``low-rank(64)``); ``speedup``: the
    baseline's median latency over this one's, timed side by side in one interleaved loop;
    ``drop``: the metric's fall below the baseline (on ``split``: the batches it was measured
    on), the point estimate; ``bound``: its one-sided upper confidence bound, what the budget
    was checked against (None: judged on the point estimate, ``confidence=None``); ``kept``:
    whether the search went on with it, and ``reason`` why (not).
    """

    name: str
    # "baseline", "single" (one option alone), "combine:<family>" (a step of one greedy
    # combination), "combined" (its result), "extend" (growing the fastest), "back-off", "final"
    phase: str
    choices: dict[str, str]
    milliseconds: float | None = None
    speedup: float | None = None
    metric: float | None = None
    drop: float | None = None
    split: str = "fit"
    kept: bool = False
    reason: str = ""
    bound: float | None = None

    @property
    def judged_drop(self) -> float | None:
        """The drop the budget was checked against: the bound, or the point estimate without one."""
        return self.bound if self.bound is not None else self.drop

    def describe(self) -> str:
        return ", ".join(f"{site}: {option}" for site, option in self.choices.items()) or "(nothing changed)"


@dataclass
class ParetoRow:
    """One model on the latency/metric front, measured side by side with the others."""

    label: str
    choices: dict[str, str]
    milliseconds: float
    spread: tuple[float, float]  # interquartile range of the latency, ms
    speedup: float
    metric: float
    drop: float
    chosen: bool = False
    bound: float | None = None  # upper confidence bound of ``drop``


@dataclass
class TuneLog:
    """The search log of one ``fxopt.tune`` run (``opt.report.search``)."""

    metric: str
    max_drop: float
    backend: str
    techniques: list[str]
    baseline_ms: float = 0.0
    baseline_metric: float = 0.0
    candidates: list[Candidate] = field(default_factory=list)
    pareto: list[ParetoRow] = field(default_factory=list)
    chosen: dict[str, str] = field(default_factory=dict)
    final_drop: float = 0.0
    final_bound: float | None = None  # upper confidence bound of final_drop (None: point estimates)
    confidence: float | None = None
    final_speedup: float = 1.0
    seconds: float = 0.0
    options: int = 0  # single options (technique x level x site) the sensitivity phase had to measure
    stopped: str = ""  # why the search stopped early (the time budget), if it did
    notes: list[str] = field(default_factory=list)

    def add(self, phase: str, choices: dict[str, str], **fields: Any) -> Candidate:
        drop = fields.get("drop")
        if hasattr(drop, "bound"):  # a fxopt.lossy.acceptance.Drop: its point estimate, and its bound when it has one
            fields["drop"] = drop.bound.observed
            fields.setdefault("bound", None if drop.bound.confidence is None else drop.bound.upper)
        candidate = Candidate(f"c{len(self.candidates)}", phase, dict(choices), **fields)
        self.candidates.append(candidate)
        return candidate

    def pareto_table(self) -> str:
        """The front as a table: latency (median, IQR), speedup, metric and drop."""
        bound = f"{self.confidence:.0%} bound" if self.confidence is not None else "bound"
        header = ["model", "latency ms (IQR)", "speedup", self.metric, "drop", bound, "techniques"]
        rows = [header]
        for row in self.pareto:
            rows.append([row.label + (" *" if row.chosen else ""),
                         f"{row.milliseconds:.3f} ({row.spread[0]:.3f}-{row.spread[1]:.3f})",
                         f"x{row.speedup:.2f}", f"{row.metric:.4f}", f"{row.drop:+.4f}",
                         "-" if row.bound is None else f"{row.bound:+.4f}", _short(row.choices)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        kept = sum(c.kept for c in self.candidates)
        judged = (f" (its {self.confidence:.0%} upper bound)" if self.confidence is not None
                  else " (point estimates)")
        lines = [f"fxopt tune: {self.metric} within a drop of {self.max_drop:g}{judged} on {self.backend}; "
                 f"{len(self.candidates)} candidates measured ({kept} kept) in {self.seconds:.1f}s"
                 + (f"; stopped early: {self.stopped}" if self.stopped else "")]
        bound = "" if self.final_bound is None else f" ({self.confidence:.0%} bound {self.final_bound:+.4f})"
        lines.append(f"chosen: x{self.final_speedup:.2f} at a drop of {self.final_drop:+.4f}{bound}: "
                     f"{_short(self.chosen)}")
        lines.append("search log (drop <= its upper bound):" if self.confidence is not None else "search log:")
        for c in self.candidates:
            measured = []
            if c.speedup is not None:
                measured.append(f"x{c.speedup:.2f}")
            if c.drop is not None:
                bound = "" if c.bound is None else f" <= {c.bound:+.4f}"
                measured.append(f"drop {c.drop:+.4f}{bound} ({c.split})")
            verdict = "kept" if c.kept else "dropped"
            lines.append(f"  {c.name:>4} {c.phase:<14} {verdict:<7} {' '.join(measured):<40} "
                         f"{c.describe()}: {c.reason}")
        if self.pareto:
            lines.append("Pareto front (measured side by side; * chosen):")
            lines.extend("  " + line for line in self.pareto_table().splitlines())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Write the front and every measured candidate as a PNG (needs matplotlib: the ``plot`` extra)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("plotting needs matplotlib: pip install 'fxopt[plot]'") from exc
        figure, axes = plt.subplots(figsize=(6, 4))
        points = [c for c in self.candidates if c.speedup is not None and c.drop is not None]
        axes.scatter([c.speedup for c in points], [c.drop for c in points], s=12, c="lightgray",
                     label="candidates")
        front = sorted(self.pareto, key=lambda r: r.speedup)
        axes.plot([r.speedup for r in front], [r.drop for r in front], "o-", label="Pareto front")
        for row in front:
            axes.annotate(row.label, (row.speedup, row.drop), fontsize=7)
        axes.axhline(self.max_drop, color="red", linestyle="--", label=f"max_drop {self.max_drop:g}")
        axes.set_xlabel("speedup over the baseline (side by side)")
        axes.set_ylabel(f"{self.metric} drop")
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)


def _short(choices: dict[str, str]) -> str:
    if not choices:
        return "-"
    return ", ".join(f"{site}={option}" for site, option in choices.items())


def front(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both speedup and drop, fastest first (one per choice)."""
    unique: dict[tuple, Candidate] = {}
    for c in candidates:
        key = tuple(sorted(c.choices.items()))
        if key not in unique or (c.speedup or 0) > (unique[key].speedup or 0):
            unique[key] = c
    pool = list(unique.values())
    front = [c for c in pool
             if not any((o.speedup or 0) > (c.speedup or 0) and (o.drop or 0) <= (c.drop or 0) for o in pool)]
    return sorted(front, key=lambda c: -(c.speedup or 0))


def progress_printer(enabled: bool) -> Any:
    """``say(message)``: a progress line on stderr when ``enabled``."""

    def say(message: str) -> None:
        if enabled:
            print(f"fxopt tune: {message}", file=sys.stderr, flush=True)

    return say
