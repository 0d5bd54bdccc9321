"""A task-metric budget: what a lossy choice may cost on the metric the user cares about.

The output-error budget of a lossy pass bounds how far the graph's outputs move; a task
budget bounds what that movement costs on labelled data (accuracy, agreement with the
original model's top-1, or any ``metric(outputs, labels) -> float``, higher is better)::

    task = TaskBudget(inputs, labels, metric, max_drop=0.005, unflatten=signature.unflatten)
    task.set_reference(original_graph)        # the baseline, and the outputs drops are paired with
    ctx = pass_context(batches, task=task)     # fxopt.session: every BudgetedSearch now also bounds the drop

``inputs`` are the graph's flat inputs per batch; ``baseline`` is the metric of the model the
drop is counted from (the original, so that drops of successive passes add up against one
``max_drop``). The batches split like the calibration batches do (even positions fit, odd
positions held out), so a choice is made on one half and verified on the other.

A drop is judged by its one-sided upper confidence bound at ``confidence`` (default 95%;
:mod:`fxopt.lossy.acceptance`), paired on the same examples before and after: :meth:`TaskBudget.drop`
returns a :class:`~fxopt.lossy.acceptance.Drop`, a float equal to that bound (the point estimate when ``confidence`` is
None) that also carries the point estimate and how it was measured.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fxopt.lossy.acceptance import (
    DEFAULT_CONFIDENCE,
    Drop,
    DropBound,
    bootstrap_bound,
    check_confidence,
    flip_bound,
    unsupported_message,
)

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
    """Labelled batches, a metric and the largest drop of it a lossy choice may cause, judged
    at ``confidence`` (None: on the point estimate alone)."""

    inputs: list[list[torch.Tensor]]
    labels: list[Any]
    metric: Metric
    max_drop: float
    unflatten: Callable[[list[Any]], Any] = lambda outputs: outputs[0] if len(outputs) == 1 else outputs
    baseline: float | None = None
    name: str = "metric"
    scores: dict[tuple[int, str], float] = field(default_factory=dict, repr=False)
    confidence: float | None = DEFAULT_CONFIDENCE
    # the reference model's outputs per batch: what a candidate is paired with
    reference: dict[int, list[Any]] = field(default_factory=dict, repr=False)
    # unlabelled input batches (flat) that widen the sample of a flip metric's bound: every
    # harmful flip changes the top-1, so the rate of changed top-1 over these and the labelled
    # inputs bounds the drop too (``agreement_data=``)
    agreement_inputs: list[list[torch.Tensor]] = field(default_factory=list, repr=False)
    agreement_reference: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("a task budget needs at least one batch")
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"{len(self.inputs)} input batches but {len(self.labels)} label batches")
        if not (self.max_drop >= 0 and math.isfinite(self.max_drop)):
            raise ValueError(f"max_drop must be a finite number >= 0, got {self.max_drop}")
        self.confidence = check_confidence(self.confidence)
        if self.agreement_inputs and not self.counts_flips:
            raise ValueError("unlabelled agreement inputs bound a flip metric only (accuracy, top1-agreement)")

    def indices(self, split: str = ALL) -> list[int]:
        """The batches of ``split``: even positions fit, odd positions are held out (one batch: it fits)."""
        return _split_positions(len(self.inputs), split)

    @property
    def counts_flips(self) -> bool:
        """Whether the metric is a share of right top-1 predictions (accuracy, top-1 agreement):
        then every example either keeps its outcome or flips, and the bound is exact."""
        return self.metric is accuracy

    def examples(self, split: str = ALL) -> int:
        """The examples a drop on ``split`` is measured on (every label of a flip metric; rows otherwise)."""
        if self.counts_flips:
            return sum(int(torch.as_tensor(self.labels[i]).numel()) for i in self.indices(split)) + sum(
                int(self.agreement_reference[i].numel()) for i in _split_positions(len(self.agreement_inputs), split))
        return sum(rows_of(self.labels[i]) for i in self.indices(split))

    def _outputs(self, run: Runner, index: int) -> list[Any]:
        with torch.no_grad():
            outputs = run(*self.inputs[index])
        return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]

    def _mean(self, outputs: dict[int, list[Any]]) -> float:
        total = weight = 0.0
        for index, flat in outputs.items():
            rows = rows_of(self.labels[index])
            total += rows * float(self.metric(self.unflatten(flat), self.labels[index]))
            weight += rows
        return total / weight if weight else math.nan

    def score(self, run: Runner, split: str = ALL) -> float:
        """The metric of ``run`` (a graph module or any callable on the flat inputs), averaged
        over the batches of ``split`` weighted by their rows."""
        return self._mean({index: self._outputs(run, index) for index in self.indices(split)})

    def drop(self, run: Runner, split: str = ALL) -> Drop:
        """How far ``run``'s metric falls below ``baseline`` on ``split`` (negative: it rose),
        as the budget judges it: the upper confidence bound, paired with the reference."""
        baseline = self.baseline_on(split)
        outputs = {index: self._outputs(run, index) for index in self.indices(split)}
        value = self._mean(outputs)
        if math.isnan(value):
            return Drop(DropBound(math.inf, math.inf, 0, self.confidence, "point"))
        observed = baseline - value
        if self.confidence is None or not outputs:
            return Drop(DropBound(observed, observed, self.examples(split), None, "point"))
        if any(index not in self.reference for index in outputs):
            raise ValueError("TaskBudget.reference is not set: call set_reference(model) to pair drops with it")
        if self.counts_flips:
            harmful = helpful = examples = 0
            for index, flat in outputs.items():
                labels = torch.as_tensor(self.labels[index])
                before = top1(self.unflatten(self.reference[index])).to(labels.device) == labels
                after = top1(self.unflatten(flat)).to(labels.device) == labels
                harmful += int((before & ~after).sum())
                helpful += int((~before & after).sum())
                examples += int(labels.numel())
            if self.agreement_inputs:
                return Drop(self._agreement_bound(run, outputs, split, observed, harmful, helpful))
            bound = flip_bound(harmful, helpful, examples, self.confidence)
            # the metric's own mean (weighted by rows) is the point estimate the budget always reported
            return Drop(DropBound(observed, max(bound.upper, observed), examples, self.confidence, "flips",
                                  harmful, helpful))
        return Drop(self._bootstrap(outputs, observed))

    def _agreement_bound(self, run: Runner, outputs: dict[int, list[Any]], split: str, observed: float,
                         harmful: int, helpful: int) -> DropBound:
        """The drop bounded by the rate of changed top-1 predictions over the labelled and the
        unlabelled inputs of ``split`` (exact binomial on the changes)."""
        changed = examples = 0
        for index, flat in outputs.items():
            before, after = top1(self.unflatten(self.reference[index])), top1(self.unflatten(flat))
            changed += int((before != after.to(before.device)).sum())
            examples += int(before.numel())
        for index in _split_positions(len(self.agreement_inputs), split):
            with torch.no_grad():
                flat = run(*self.agreement_inputs[index])
            after = top1(self.unflatten(list(flat) if isinstance(flat, (list, tuple)) else [flat]))
            before = self.agreement_reference[index]
            changed += int((before != after.to(before.device)).sum())
            examples += int(before.numel())
        upper = flip_bound(changed, 0, examples, self.confidence).upper
        return DropBound(observed, max(upper, observed), examples, self.confidence, "agreement", harmful, helpful)

    def _bootstrap(self, outputs: dict[int, list[Any]], observed: float) -> DropBound:
        """The paired bootstrap bound: rows resampled when every output and label has one row
        per example, whole batches (weighted by rows) otherwise."""
        indices = list(outputs)
        rowwise = all(isinstance(self.labels[i], torch.Tensor) and self.labels[i].dim() > 0
                      and all(isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == self.labels[i].shape[0]
                              for o in [*outputs[i], *self.reference[i]]) for i in indices)
        if rowwise:
            labels = torch.cat([self.labels[i] for i in indices])
            before = [torch.cat(parts) for parts in zip(*(self.reference[i] for i in indices))]
            after = [torch.cat(parts) for parts in zip(*(outputs[i] for i in indices))]

            def score(sample: np.ndarray) -> tuple[float, float]:
                rows = torch.as_tensor(sample, device=labels.device)
                return (float(self.metric(self.unflatten([o[rows] for o in before]), labels[rows])),
                        float(self.metric(self.unflatten([o[rows] for o in after]), labels[rows])))

            return bootstrap_bound(score, int(labels.shape[0]), observed, self.confidence)
        if len(indices) < 2:  # one batch whose rows cannot be resampled: no spread to measure
            return DropBound(observed, observed, self.examples(), None, "point")
        weights = np.array([rows_of(self.labels[i]) for i in indices], dtype=float)
        values = np.array([[float(self.metric(self.unflatten(source[i]), self.labels[i])) for i in indices]
                           for source in (self.reference, outputs)])

        def weighted(sample: np.ndarray) -> tuple[float, float]:
            w = weights[sample]
            return float(values[0, sample] @ w / w.sum()), float(values[1, sample] @ w / w.sum())

        return bootstrap_bound(weighted, int(weights.sum()), observed, self.confidence, weights=list(weights))

    def baseline_on(self, split: str) -> float:
        """The baseline on one split's batches (measured once per split with ``reference``)."""
        if self.baseline is None:
            raise ValueError("TaskBudget.baseline is not set: score the reference model first")
        return self.scores.get((0, split), self.baseline)

    def set_reference(self, run: Runner) -> None:
        """Score the model drops are counted from, on every split, and keep its outputs to pair with."""
        self.reference = {index: self._outputs(run, index) for index in self.indices(ALL)}
        self._score_reference()
        for index, flat in enumerate(self.agreement_inputs):
            with torch.no_grad():
                outputs = run(*flat)
            self.agreement_reference[index] = top1(self.unflatten(
                list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]))

    def _score_reference(self) -> None:
        for split in (ALL, FIT, HELD_OUT):
            if self.indices(split):
                self.scores[(0, split)] = self._mean({i: self.reference[i] for i in self.indices(split)})
        self.baseline = self.scores[(0, ALL)]

    def part(self, split: str) -> TaskBudget:
        """The batches of ``split`` (and the same share of the unlabelled agreement inputs) as a
        budget of their own, paired with the same reference outputs: rows one decision is made
        on, kept apart from the rows another is checked on."""
        keep, agree = self.indices(split), _split_positions(len(self.agreement_inputs), split)
        if not keep:
            raise ValueError(f"no batch falls in the {split} split of {len(self.inputs)} batches")
        part = TaskBudget([self.inputs[i] for i in keep], [self.labels[i] for i in keep], self.metric, self.max_drop,
                          unflatten=self.unflatten, name=self.name, confidence=self.confidence,
                          agreement_inputs=[self.agreement_inputs[i] for i in agree])
        part.reference = {new: self.reference[old] for new, old in enumerate(keep)}
        part.agreement_reference = {new: self.agreement_reference[old] for new, old in enumerate(agree)}
        part._score_reference()
        return part

    def unsupported(self, split: str = ALL) -> str | None:
        """Why the examples of ``split`` cannot support ``max_drop`` at ``confidence`` even when no
        prediction changes (flip metrics), or None."""
        if self.confidence is None or not self.counts_flips or not self.indices(split):
            return None
        return unsupported_message(self.max_drop, self.examples(split), self.confidence, self.name)

    def in_budget_units(self, drop: float, budget: float) -> float:
        """``drop`` expressed in a pass's output-error budget: ``max_drop`` maps to ``budget``,
        so a share of one is the same share of the other (equal-share splits both alike)."""
        if drop <= 0:
            return 0.0
        if self.max_drop == 0 or not math.isfinite(budget):
            return math.inf if drop > self.max_drop else 0.0
        return budget * drop / self.max_drop


def _split_positions(count: int, split: str) -> list[int]:
    """Positions of ``split`` among ``count`` batches: even ones fit, odd ones are held out (one batch: it fits)."""
    every = list(range(count))
    if split == ALL or count == 1:
        return every if split != HELD_OUT else []
    return every[0::2] if split == FIT else every[1::2]


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


def task_budget(gm: Any, signature: Any, data: Any, metric: Any, max_drop: Any,
                confidence: float | None = DEFAULT_CONFIDENCE, agreement_data: Any = None) -> TaskBudget:
    """A :class:`TaskBudget` for a captured graph: ``data`` flattened like its inputs, the
    named or given ``metric``, and the graph's own score as the baseline (for
    ``top1-agreement`` the labels are the graph's own top-1 predictions). When ``data`` is too
    small to support ``max_drop`` at ``confidence`` this warns now, before any search
    (``TaskBudget.unsupported`` says why and how many examples are needed). ``agreement_data``:
    unlabelled input batches that widen the sample of an accuracy or top-1 agreement bound."""
    from fxopt.signature import split_example_inputs
    from fxopt.verify import run_graph

    name, function = resolve_metric(metric)
    drop = check_max_drop(max_drop)
    confidence = check_confidence(confidence)
    pairs = labelled_batches(data, needs_labels=name not in NEEDS_NO_LABELS)
    inputs, labels = [], []
    for index, (batch, label) in enumerate(pairs):
        args, kwargs = split_example_inputs(batch)
        flat = signature.flatten(args, kwargs, what=f"data batch {index}, input")
        inputs.append(flat)
        if name in NEEDS_NO_LABELS:
            label = top1(signature.unflatten(run_graph(gm, flat)))
        labels.append(label)
    agreement = _agreement_inputs(signature, agreement_data, function, confidence)
    task = TaskBudget(inputs, labels, function, drop, unflatten=signature.unflatten, name=name, confidence=confidence,
                      agreement_inputs=agreement)
    task.set_reference(gm)
    message = task.unsupported()
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=3)
    return task


def _agreement_inputs(signature: Any, agreement_data: Any, metric: Metric, confidence: float | None) -> list[Any]:
    """``agreement_data`` (input batches, or a callable returning them) flattened like the inputs."""
    from fxopt.errors import InputError

    if agreement_data is None:
        return []
    if metric is not accuracy:
        raise InputError("agreement_data= tightens the bound of accuracy and top1-agreement only")
    if confidence is None:
        raise InputError("agreement_data= tightens a confidence bound: it needs confidence= (not None)")
    if callable(agreement_data) and not isinstance(agreement_data, torch.nn.Module):
        agreement_data = agreement_data()
    if isinstance(agreement_data, torch.Tensor):
        raise InputError("agreement_data must be an iterable of input batches, not one tensor")
    flat = signature.flatten_each(agreement_data, "agreement_data")
    if not flat:
        raise InputError("agreement_data is empty: give at least one batch of inputs, or leave it out")
    return flat
