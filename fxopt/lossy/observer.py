"""One activation observer for the data-aware lossy passes.

It runs the graph node by node on the calibration batches and reduces what flows through
the watched nodes to statistics, so no pass runs the graph itself::

    stats = observe(gm, [act], ctx.observable_batches, features=True)[act]
    stats.rms, stats.centered_rms          # per unit (last dim): prune-hidden's ranking
    observe(gm, xs, batches, percentile=99.9)[x].percentile   # static int8 scales

A value read by several consumers (the shared input of sibling q/k/v Linears) is observed
once; :func:`inputs_of` maps each consumer to the statistics of the value it reads, so
every consumer finds its own entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxopt.lossy.sites import fit_indices
from fxopt.quant import static_scales


@dataclass
class ActivationStats:
    """Statistics of one value over every batch.

    ``abs_max``: the largest magnitude seen. ``percentile``: the largest per-batch
    ``q``-th percentile of the magnitude (when asked for). ``rows``, ``mean`` and
    ``mean_square``: float64 moments of each feature of the last dim (when asked for).
    """

    abs_max: float = 0.0
    percentile: float | None = None
    rows: int = 0
    feature_sum: torch.Tensor | None = None
    feature_square_sum: torch.Tensor | None = None
    batches: int = 0

    @property
    def mean(self) -> torch.Tensor:
        assert self.feature_sum is not None, "observe(..., features=True) collects per-feature moments"
        return self.feature_sum / max(self.rows, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        assert self.feature_square_sum is not None, "observe(..., features=True) collects per-feature moments"
        return self.feature_square_sum / max(self.rows, 1)

    @property
    def rms(self) -> torch.Tensor:
        """Root-mean-square magnitude of each feature."""
        return self.mean_square.sqrt()

    @property
    def centered_rms(self) -> torch.Tensor:
        """Root-mean-square deviation of each feature from its mean (its standard deviation)."""
        return (self.mean_square - self.mean.square()).clamp_min(0).sqrt()


@dataclass
class _Reducer:
    percentile: float | None
    features: bool
    stats: dict[fx.Node, ActivationStats] = field(default_factory=dict)

    def __call__(self, node: fx.Node, value: Any) -> None:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return
        stats = self.stats.setdefault(node, ActivationStats())
        stats.batches += 1
        magnitude = value.detach().abs().float().flatten()
        if magnitude.numel():
            stats.abs_max = max(stats.abs_max, float(magnitude.max()))
        if self.percentile is not None:
            if magnitude.numel() > 1:
                rank = max(1, int(round(magnitude.numel() * self.percentile / 100.0)))
                stat = float(magnitude.kthvalue(rank).values)
            else:
                stat = float(magnitude.max()) if magnitude.numel() else 0.0
            stats.percentile = max(stats.percentile or 0.0, stat)
        if self.features and value.dim() > 0:
            rows = value.detach().double().reshape(-1, value.shape[-1])
            stats.rows += rows.shape[0]
            total, square = rows.sum(0), rows.square().sum(0)
            stats.feature_sum = total if stats.feature_sum is None else stats.feature_sum + total
            stats.feature_square_sum = square if stats.feature_square_sum is None else stats.feature_square_sum + square


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


def run_watching(gm: fx.GraphModule, nodes: Iterable[fx.Node], batches: Sequence[Sequence[torch.Tensor]],
                 sink: Callable[[fx.Node, Any], None], known: Mapping[int, Mapping[str, Any]] | None = None) -> None:
    """Run ``gm`` on every batch, handing each watched node's value to ``sink(node, value)``.
    ``known``: for some batch positions, every node's value on that batch by node name
    (:func:`known_values`): those batches are read from it instead of run."""
    watched = set(nodes)
    known = known or {}
    with torch.no_grad():
        for position, batch in enumerate(batches):
            values = known.get(position)
            if values is not None and all(node.name in values for node in watched):
                for node in gm.graph.nodes:  # graph order, as a run would hand them over
                    if node in watched:
                        sink(node, values[node.name])
                continue
            _Recorder(gm, watched, sink).run(*batch)


def known_values(ctx: Any, gm: fx.GraphModule) -> dict[int, Mapping[str, Any]]:
    """The node values of ``gm`` on the batches (by position in ``ctx.batches``, which is
    their position in ``ctx.observable_batches`` too) that the pass manager kept from a run
    of this very graph (``ctx.values``: its reference run on the example inputs, or the
    previous lossy pass's verification of the graph it committed): an observer reads them
    instead of running the graph on those batches again."""
    from fxopt.verify import ReusingRunner

    runner = getattr(ctx, "values", None)
    if not isinstance(runner, ReusingRunner):
        return {}
    return {index: runner.pinned_values(index) for index in runner.pinned_keys_for(gm, range(len(ctx.batches)))}


def observe(gm: fx.GraphModule, nodes: Iterable[fx.Node], batches: Sequence[Sequence[torch.Tensor]], *,
            percentile: float | None = None, features: bool = False,
            known: Mapping[int, Mapping[str, Any]] | None = None) -> dict[fx.Node, ActivationStats]:
    """Statistics of each of ``nodes`` over every batch (one run of the graph per batch):
    always the abs-max, the largest per-batch ``percentile`` of |value| when given, and
    per-feature moments when ``features``. Nodes whose value is not a floating-point
    tensor get no entry. ``known``: see :func:`run_watching`."""
    reducer = _Reducer(percentile, features)
    run_watching(gm, nodes, batches, reducer, known)
    return reducer.stats


def observe_each(gm: fx.GraphModule, nodes: Iterable[fx.Node], batches: Sequence[Sequence[torch.Tensor]], *,
                 percentile: float | None = None,
                 known: Mapping[int, Mapping[str, Any]] | None = None) -> list[dict[fx.Node, ActivationStats]]:
    """:func:`observe` of each batch on its own (abs-max and percentile; one run of the graph
    per batch in all), for a pass that reduces over several subsets of the batches (its fit
    batches, and all of them) without observing any batch twice: both statistics are maxima
    over batches, so :func:`merge_stats` of a subset's entries is what observing the subset
    would give."""
    nodes = list(nodes)
    reducers: list[_Reducer] = []

    def sink(node: fx.Node, value: Any) -> None:
        reducers[-1](node, value)

    for position, batch in enumerate(batches):
        reducers.append(_Reducer(percentile, False))
        run_watching(gm, nodes, [batch], sink, {0: known[position]} if known and position in known else None)
    return [reducer.stats for reducer in reducers]


def merge_stats(each: Iterable[ActivationStats]) -> ActivationStats:
    """One value's abs-max and percentile statistics over several batches (see :func:`observe_each`)."""
    merged = ActivationStats()
    for stats in each:
        merged.abs_max = max(merged.abs_max, stats.abs_max)
        if stats.percentile is not None:
            merged.percentile = max(merged.percentile or 0.0, stats.percentile)
        merged.batches += stats.batches
    return merged


def inputs_of(gm: fx.GraphModule, consumers: Iterable[fx.Node], batches: Sequence[Sequence[torch.Tensor]], *,
              percentile: float | None = None, features: bool = False,
              known: Mapping[int, Mapping[str, Any]] | None = None) -> dict[str, ActivationStats]:
    """Statistics of the first argument of each consumer, keyed by the consumer's name.

    Consumers that read the same value (sibling Linears on one input) share one entry of
    :func:`observe`, observed once; each still has its own key here. ``known``: see
    :func:`run_watching`.
    """
    consumers = list(consumers)
    sources = {c.name: c.args[0] for c in consumers if isinstance(c.args[0], fx.Node)}
    stats = observe(gm, set(sources.values()), batches, percentile=percentile, features=features, known=known)
    return {name: stats.get(source, ActivationStats()) for name, source in sources.items()}


def collect_activations(gm: fx.GraphModule, nodes: Iterable[fx.Node], batches: Sequence[Sequence[torch.Tensor]],
                        reduce: Callable[[torch.Tensor], Any] | None = None,
                        known: Mapping[int, Mapping[str, Any]] | None = None) -> dict[fx.Node, list[Any]]:
    """The value of each of ``nodes`` on each batch (``reduce(value)`` if given, to save
    memory). ``known``: see :func:`run_watching`."""
    watched = list(nodes)
    seen: dict[fx.Node, list[Any]] = {node: [] for node in watched}

    def sink(node: fx.Node, value: Any) -> None:
        value = value.detach() if isinstance(value, torch.Tensor) else value
        seen[node].append(reduce(value) if reduce is not None else value)

    run_watching(gm, watched, batches, sink, known)
    return seen


def static_scales_of(gm: fx.GraphModule, ctx: Any, values: Iterable[fx.Node]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-tensor symmetric scales of ``values`` (by node name) from their largest magnitudes:
    over every observable batch (what a pass commits) and over the fit batches alone (what its
    search's trials use, so that clipping on the held-out batches shows in their error)."""
    maxima = collect_activations(gm, values, ctx.observable_batches,
                                 reduce=lambda v: float(v.detach().abs().max()), known=known_values(ctx, gm))
    return static_scales(maxima, range(len(ctx.observable_batches))), static_scales(maxima, fit_indices(ctx))
