"""A task-metric budget: what a lossy choice may cost on the metric the user cares about.

The output-error budget of a lossy pass bounds how far the graph's outputs move; a task
budget bounds what that movement costs on labelled data (accuracy, agreement with the
original model's top-1, or any ``metric(outputs, labels) -> float``, higher is better)::

    task = TaskBudget(inputs, labels, metric, max_drop=0.005, unflatten=signature.unflatten)
    task.baseline = task.score(original_graph)
    ctx = PassContext(batches, task=task)      # every BudgetedSearch now also bounds the drop

``inputs`` are the graph's flat inputs per batch; ``baseline`` is the metric of the model the
drop is counted from (the original, so that drops of successive passes add up against one
``max_drop``). The batches split like the calibration batches do (even positions fit, odd
positions held out), so a choice is made on one half and verified on the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Metric = Callable[[Any, Any], float]
Runner = Callable[..., Any]

FIT, HELD_OUT, ALL = "fit", "held-out", "all"


def logits_of(outputs: Any) -> torch.Tensor:
    """The tensor a classification metric reads: the output itself, its ``logits``, or its first element."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, dict) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    if isinstance(outputs, (list, tuple)) and outputs:
        return logits_of(outputs[0])
    raise TypeError(f"cannot find logits in outputs of type {type(outputs).__name__}")


def accuracy(outputs: Any, labels: Any) -> float:
    """Share of rows whose arg-max class is the label."""
    predicted = logits_of(outputs).argmax(-1)
    labels = torch.as_tensor(labels, device=predicted.device)
    return float((predicted == labels).float().mean())


def top1(outputs: Any) -> torch.Tensor:
    """The arg-max class of every row: the labels of ``top1-agreement``."""
    return logits_of(outputs).argmax(-1)


# Named metrics; "top1-agreement" is accuracy against the original model's own top-1
# (the labels are its predictions, so no labels are needed).
METRICS: dict[str, Metric] = {"accuracy": accuracy, "top1-agreement": accuracy}
NEEDS_NO_LABELS = frozenset({"top1-agreement"})


def rows_of(labels: Any) -> int:
    """How much one batch weighs in the mean: its number of labels (1 when not a tensor)."""
    return int(labels.shape[0]) if isinstance(labels, torch.Tensor) and labels.dim() > 0 else 1


@dataclass
class TaskBudget:
    """Labelled batches, a metric and the largest drop of it a lossy choice may cause."""

    inputs: list[list[torch.Tensor]]
    labels: list[Any]
    metric: Metric
    max_drop: float
    unflatten: Callable[[list[Any]], Any] = lambda outputs: outputs[0] if len(outputs) == 1 else outputs
    baseline: float | None = None
    name: str = "metric"
    scores: dict[tuple[int, str], float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("a task budget needs at least one batch")
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"{len(self.inputs)} input batches but {len(self.labels)} label batches")
        if not (self.max_drop >= 0 and math.isfinite(self.max_drop)):
            raise ValueError(f"max_drop must be a finite number >= 0, got {self.max_drop}")

    def indices(self, split: str = ALL) -> list[int]:
        """The batches of ``split``: even positions fit, odd positions are held out (one batch: it fits)."""
        every = list(range(len(self.inputs)))
        if split == ALL or len(every) == 1:
            return every if split != HELD_OUT else []
        return every[0::2] if split == FIT else every[1::2]

    def score(self, run: Runner, split: str = ALL) -> float:
        """The metric of ``run`` (a graph module or any callable on the flat inputs), averaged
        over the batches of ``split`` weighted by their rows."""
        total = weight = 0.0
        with torch.no_grad():
            for index in self.indices(split):
                outputs = run(*self.inputs[index])
                if not isinstance(outputs, (list, tuple)):
                    outputs = [outputs]
                rows = rows_of(self.labels[index])
                total += rows * float(self.metric(self.unflatten(list(outputs)), self.labels[index]))
                weight += rows
        return total / weight if weight else math.nan

    def drop(self, run: Runner, split: str = ALL) -> float:
        """How far ``run``'s metric falls below ``baseline`` on ``split`` (negative: it rose)."""
        baseline = self.baseline_on(split)
        value = self.score(run, split)
        return math.inf if math.isnan(value) else baseline - value

    def baseline_on(self, split: str) -> float:
        """The baseline on one split's batches (measured once per split with ``reference``)."""
        if self.baseline is None:
            raise ValueError("TaskBudget.baseline is not set: score the reference model first")
        return self.scores.get((0, split), self.baseline)

    def set_reference(self, run: Runner) -> None:
        """Score the model drops are counted from, on every split."""
        for split in (ALL, FIT, HELD_OUT):
            if self.indices(split):
                self.scores[(0, split)] = self.score(run, split)
        self.baseline = self.scores[(0, ALL)]

    def in_budget_units(self, drop: float, budget: float) -> float:
        """``drop`` expressed in a pass's output-error budget: ``max_drop`` maps to ``budget``,
        so a share of one is the same share of the other (equal-share splits both alike)."""
        if drop <= 0:
            return 0.0
        if self.max_drop == 0 or not math.isfinite(budget):
            return math.inf if drop > self.max_drop else 0.0
        return budget * drop / self.max_drop


def split_labelled(items: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``[(inputs, labels), ...]`` -> (inputs per batch, labels per batch)."""
    inputs, labels = [], []
    for item in items:
        inputs.append(item[0])
        labels.append(item[1])
    return inputs, labels


def resolve_metric(metric: Any) -> tuple[str, Metric]:
    """A metric's name and function: one of :data:`METRICS` by name, or a callable."""
    from fxopt.errors import InputError

    if isinstance(metric, str):
        if metric not in METRICS:
            raise InputError(f"unknown metric {metric!r} (named metrics: {', '.join(METRICS)}; "
                             "or pass a function metric(outputs, labels) -> float, higher is better)")
        return metric, METRICS[metric]
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    raise InputError(f"metric must be a name ({', '.join(METRICS)}) or a function, got {type(metric).__name__}")


def check_max_drop(max_drop: Any) -> float:
    from fxopt.errors import InputError

    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) \
            or max_drop < 0:
        raise InputError(f"max_drop must be a finite number >= 0 (in the metric's units, e.g. 0.005 for half a "
                         f"point of accuracy), got {max_drop!r}")
    return float(max_drop)


def labelled_batches(data: Any, needs_labels: bool) -> list[tuple[Any, Any]]:
    """``data`` (an iterable of ``(inputs, labels)``, or a callable returning one) as a list of
    pairs; without labels (``needs_labels=False``) a batch may be the inputs alone."""
    from fxopt.errors import InputError

    if data is None:
        raise InputError("data is required: batches of (inputs, labels) to measure the metric on")
    if callable(data) and not isinstance(data, torch.nn.Module):
        data = data()
    if isinstance(data, torch.Tensor):
        raise InputError("data must be an iterable of (inputs, labels) batches, not one tensor")
    items = list(data)
    if not items:
        raise InputError("data is empty: give at least one batch of (inputs, labels)")
    pairs = []
    for index, item in enumerate(items):
        if isinstance(item, (tuple, list)) and len(item) == 2:
            pairs.append((item[0], item[1]))
        elif not needs_labels:
            pairs.append((item, None))
        else:
            raise InputError(f"data batch {index} is not an (inputs, labels) pair")
        if needs_labels and pairs[-1][1] is None:
            raise InputError(f"data batch {index} has no labels (the metric needs them)")
    return pairs


def task_budget(gm: Any, signature: Any, data: Any, metric: Any, max_drop: Any) -> TaskBudget:
    """A :class:`TaskBudget` for a captured graph: ``data`` flattened like its inputs, the
    named or given ``metric``, and the graph's own score as the baseline (for
    ``top1-agreement`` the labels are the graph's own top-1 predictions)."""
    from fxopt.signature import split_example_inputs
    from fxopt.verify import run_graph

    name, function = resolve_metric(metric)
    drop = check_max_drop(max_drop)
    pairs = labelled_batches(data, needs_labels=name not in NEEDS_NO_LABELS)
    inputs, labels = [], []
    for index, (batch, label) in enumerate(pairs):
        args, kwargs = split_example_inputs(batch)
        flat = signature.flatten(args, kwargs, what=f"data batch {index}, input")
        inputs.append(flat)
        if name in NEEDS_NO_LABELS:
            label = top1(signature.unflatten(run_graph(gm, flat)))
        labels.append(label)
    task = TaskBudget(inputs, labels, function, drop, unflatten=signature.unflatten, name=name)
    task.set_reference(gm)
    return task
