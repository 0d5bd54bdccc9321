"""Intermediate activations of a graph on calibration data, for data-aware passes.

A lossy pass that needs to know what flows through the graph (which hidden units are
active, how large each feature is) asks for it here instead of running the graph itself::

    stats = feature_statistics(gm, [act_node], ctx.batches)[act_node]
    stats.rms          # per last-dim feature, over every row of every batch
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx


class _Recorder(fx.Interpreter):
    """Runs the graph node by node and hands the values of the watched nodes to ``sink``."""

    def __init__(self, gm: fx.GraphModule, watched: set[fx.Node], sink: Callable[[fx.Node, Any], None]) -> None:
        super().__init__(gm)
        self.watched = watched
        self.sink = sink

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node in self.watched:
            self.sink(node, value)
        return value


def collect_activations(
    gm: fx.GraphModule,
    nodes: Iterable[fx.Node],
    batches: Sequence[Sequence[torch.Tensor]],
    reduce: Callable[[torch.Tensor], Any] | None = None,
) -> dict[fx.Node, list[Any]]:
    """The value of each of ``nodes`` on each batch (``reduce(value)`` if given, to save memory)."""
    watched = set(nodes)
    seen: dict[fx.Node, list[Any]] = {node: [] for node in watched}

    def sink(node: fx.Node, value: Any) -> None:
        value = value.detach() if isinstance(value, torch.Tensor) else value
        seen[node].append(reduce(value) if reduce is not None else value)

    with torch.no_grad():
        for batch in batches:
            _Recorder(gm, watched, sink).run(*batch)
    return seen


@dataclass(frozen=True)
class FeatureStats:
    """First and second moments of each feature (last dim) of an activation, in float64."""

    rows: int
    mean: torch.Tensor
    mean_square: torch.Tensor

    @property
    def rms(self) -> torch.Tensor:
        """Root-mean-square magnitude of each feature."""
        return self.mean_square.sqrt()

    @property
    def centered_rms(self) -> torch.Tensor:
        """Root-mean-square deviation of each feature from its mean (its standard deviation)."""
        return (self.mean_square - self.mean.square()).clamp_min(0).sqrt()


def feature_statistics(
    gm: fx.GraphModule, nodes: Iterable[fx.Node], batches: Sequence[Sequence[torch.Tensor]]
) -> dict[fx.Node, FeatureStats]:
    """Per-feature statistics of each of ``nodes`` over every row of every batch."""

    def moments(value: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        rows = value.detach().double().reshape(-1, value.shape[-1])
        return rows.shape[0], rows.sum(0), rows.square().sum(0)

    stats: dict[fx.Node, FeatureStats] = {}
    for node, parts in collect_activations(gm, nodes, batches, reduce=moments).items():
        rows = sum(p[0] for p in parts)
        total = torch.stack([p[1] for p in parts]).sum(0)
        total_sq = torch.stack([p[2] for p in parts]).sum(0)
        stats[node] = FeatureStats(rows, total / max(rows, 1), total_sq / max(rows, 1))
    return stats
