"""``fxopt.finetune``: win back what a lossy rewrite lost, by distillation from the original.

    opt = fxopt.compile(model, (x,), ["low-rank(budget=0.2)"])        # or fxopt.tune(...)
    opt = fxopt.finetune(opt, model, data=[(x1,), (x2,), ...], epochs=5)

The optimized graph is an ``nn.Module``: its floating-point constants (low-rank factors, the
Linears pruning left, biases, norms) become trainable parameters of a copy, trained to match
the original model's outputs on the inputs given (no labels needed: the teacher's outputs are
the targets), with the KL divergence of the softmax at ``temperature`` for classifiers
(``loss="kl"``) or the mean squared error of every output (``loss="mse"``). Its quantized
Linears (quantize-int8's int8 Linears, whatever their activations; quantize-weights' int8 and
int4 weights) are trained by quantization-aware training (:mod:`fxopt.qat`): each becomes a
float weight fake-quantized on every step with a straight-through estimator, then is
quantized again. The result is lowered again for the same backend and checked against the
graph it lowers, as every compile's is; its report says what was trained and the loss and
top-1 agreement with the original before and after. Deterministic for a seed on CPU; neither
the original model nor ``optimized`` is modified.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx

from fxopt import qat
from fxopt.errors import InputError
from fxopt.ir import copy_graph_module
from fxopt.lossy.task import logits_of
from fxopt.verify import compare_outputs

LOSSES = ("kl", "mse")
SCHEDULES = ("constant", "cosine")


def finetune(
    optimized: Any,
    teacher: torch.nn.Module,
    data: Iterable[Any],
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    temperature: float = 2.0,
    loss: str = "kl",
    seed: int = 0,
    progress: bool = True,
    activation_scales: str = "learned",
    schedule: str = "constant",
    labels: Iterable[torch.Tensor] | None = None,
    label_weight: float = 0.5,
) -> Any:
    """Train ``optimized``'s floating-point constants to reproduce ``teacher`` on ``data``.

    Args:
        optimized: an :class:`fxopt.OptimizedModule` (from ``compile`` or ``tune``).
        teacher: the original model (never modified; an eval copy runs when it is training).
        data: input batches like the example inputs (a tensor, a tuple, a dict of keyword
            inputs), as ``calibration=`` takes them; no labels (for labelled pairs, pass
            ``[x for x, _ in pairs]``, and ``labels=[y for _, y in pairs]`` to use them).
        epochs, lr: passes over ``data`` and the AdamW learning rate.
        temperature, loss: ``"kl"`` (classifiers: KL divergence of the softmax at
            ``temperature``) or ``"mse"`` (every floating-point output).
        seed: the order of the batches each epoch.
        progress: one line per epoch on stderr.
        activation_scales: static int8 activation scales, ``"learned"`` with the weights or
            ``"refit"``: kept while training, then observed again on ``data`` (min-max).
        schedule: the learning rates, ``"constant"`` or ``"cosine"`` (from ``lr`` down to 0
            over the steps: the last steps move little, so the result depends less on the
            last batches; quantization-aware training is noisy without it).
        labels, label_weight: optional class indices, one tensor per batch of ``data``
            (classifiers): the loss is then ``(1 - label_weight)`` times the distillation
            loss plus ``label_weight`` times the cross entropy with the labels.

    Returns a new :class:`fxopt.OptimizedModule` lowered for ``optimized``'s backend.
    """
    from fxopt.module import OptimizedModule
    from fxopt.session import Session, Stage
    from fxopt.signature import split_example_inputs

    if not isinstance(optimized, OptimizedModule):
        raise InputError(f"optimized must be an fxopt.OptimizedModule, got {type(optimized).__name__}")
    if not isinstance(teacher, torch.nn.Module):
        raise InputError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if schedule not in SCHEDULES:
        raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if activation_scales not in qat.SCALES:
        raise InputError(f"activation_scales must be one of {', '.join(qat.SCALES)}, got {activation_scales!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs must be a positive integer, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0) or not (isinstance(temperature, (int, float)) and temperature > 0):
        raise InputError(f"lr and temperature must be positive numbers, got {lr!r} and {temperature!r}")
    signature = optimized.signature
    batches, structured = [], []
    if data is None or isinstance(data, torch.Tensor):
        raise InputError("data must be an iterable of input batches (a list of tensors, tuples or dicts)")
    for index, inputs in enumerate(data):
        args, kwargs = split_example_inputs(inputs)
        batches.append(signature.flatten(args, kwargs, what=f"data batch {index}, input"))
        structured.append((args, kwargs))
    if not batches:
        raise InputError("data is empty: give at least one batch of inputs")
    truth = _labels(labels, len(batches), label_weight)

    device = optimized.device
    if device is not None:
        batches = [[t.to(device) if isinstance(t, torch.Tensor) else t for t in flat] for flat in batches]
    if any(m.training for m in teacher.modules()):
        teacher = copy.deepcopy(teacher).eval()
    with torch.no_grad():
        targets = [_to(teacher(*args, **kwargs), device) for args, kwargs in structured]

    if any(t.is_meta for t in optimized.graph_module.buffers()):
        raise InputError(f"the {optimized.report.backend} backend keeps the weights in its own runtime: "
                         "finetune a model compiled for backend='eager', then compile the result")
    frozen, note, _ = distill_graph(optimized.graph_module, signature, batches, targets, epochs=epochs, lr=lr,
                                    temperature=temperature, loss=loss, seed=seed, progress=progress,
                                    activation_scales=activation_scales, schedule=schedule,
                                    labels=_to(truth, device), label_weight=label_weight)
    # the compile's own timings are not this step's; the final error is the trained graph's
    report = replace(optimized.report, notes=list(optimized.report.notes), passes=list(optimized.report.passes),
                     timings={}, total_seconds=0.0, kernels=[], memory={})
    report.final_max_abs_err, report.final_max_rel_err = _error(frozen, signature, batches, targets)
    report.notes.append(note)
    session = Session.from_graph(frozen, [*batches], report)
    return session.lower(Stage(frozen, list(report.passes)), report.backend, device)


def distill_graph(gm: fx.GraphModule, signature: Any, batches: list[list[Any]], targets: list[Any], *,
                  epochs: int, lr: float, temperature: float = 2.0, loss: str = "kl", seed: int = 0,
                  progress: bool = True, activation_scales: str = "learned", schedule: str = "constant",
                  label: str = "finetune", labels: list[torch.Tensor] | None = None, label_weight: float = 0.5) -> tuple[fx.GraphModule, str, tuple[float, float]]:
    """A trained copy of ``gm`` (its float constants, and its quantized Linears by QAT) whose
    outputs on the flat ``batches`` match ``targets`` (the teacher's, unflattened); returns it
    with the report's note and the top-1 agreement on ``batches`` before and after."""
    student = copy_graph_module(gm)
    quantized = qat.prepare(student, learn_scales=activation_scales == "learned")
    trained = _trainable(student) + [(f"{name}.{leaf}", p) for name, module in quantized
                                     for leaf, p in module.named_parameters() if p.requires_grad]
    if not trained:
        raise InputError("the optimized graph has no floating-point constants to train")
    scales = [p for target, p in trained if target.endswith(".log_scale")]
    groups = [{"params": [p for target, p in trained if not target.endswith(".log_scale")], "lr": lr}]
    optimizer = torch.optim.AdamW(groups + ([{"params": scales, "lr": qat.SCALE_LR}] if scales else []),
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * len(batches)
    decay = (lambda step: 0.5 * (1.0 + math.cos(math.pi * step / steps))) if schedule == "cosine" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)

    def objective(index: int) -> torch.Tensor:
        outputs = signature.unflatten(list(_as_list(student(*batches[index]))))
        value = _distillation_loss(outputs, targets[index], loss, temperature)
        if labels is None:
            return value
        hard = torch.nn.functional.cross_entropy(logits_of(outputs).float().flatten(0, -2), labels[index].flatten())
        return (1.0 - label_weight) * value + label_weight * hard

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(objective(i)) for i in range(len(batches))) / len(batches)

    before = mean_loss()
    agreement_before = _agreement(student, signature, batches, targets)
    for epoch in range(epochs):
        for index in torch.randperm(len(batches), generator=generator).tolist():
            optimizer.zero_grad()
            value = objective(index)
            try:
                value.backward()
            except RuntimeError as exc:  # an op without a gradient: say which
                raise InputError(f"fxopt.finetune cannot train through this graph: {exc}") from exc
            optimizer.step()
            scheduler.step()
        if progress:
            print(f"fxopt {label}: epoch {epoch + 1}/{epochs}, loss {mean_loss():.5f}", file=sys.stderr, flush=True)
    if activation_scales == "refit":
        qat.refit_scales(quantized, lambda: [student(*flat) for flat in batches])
    after = mean_loss()
    agreement_after = _agreement(student, signature, batches, targets)

    frozen = _frozen(student, [(target, p) for target, p in trained if not target.startswith(qat.PREFIX)])
    qat.convert(frozen, quantized)
    count = sum(p.numel() for _, p in trained)
    what = f"{count} parameters in {len(trained)} tensors trained by distillation"
    if labels is not None:
        what += f" and labels (weight {label_weight:g})"
    if quantized:
        what += ", " + qat.describe(quantized, activation_scales)
    note = (f"{label}: {what} ({loss}, {epochs} epochs, {len(batches)} batches, {schedule} lr {lr:g}): loss {before:.5f} -> {after:.5f}, "
            f"top-1 agreement with the original {agreement_before:.4f} -> {agreement_after:.4f} on the data")
    return frozen, note, (agreement_before, agreement_after)


def _labels(labels: Iterable[torch.Tensor] | None, count: int, weight: float) -> list[torch.Tensor] | None:
    """``labels`` checked against ``count`` batches: class indices, one tensor per batch."""
    if labels is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise InputError(f"label_weight must be a number in [0, 1], got {weight!r}")
    labels = list(labels) if not isinstance(labels, torch.Tensor) else None
    if labels is None or len(labels) != count or not all(isinstance(y, torch.Tensor) and not y.is_floating_point()
                                                         for y in labels):
        raise InputError(f"labels must be one tensor of class indices per batch of data ({count} batches)")
    return labels


def _to(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _as_list(outputs: Any) -> list[Any]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _trainable(student: fx.GraphModule) -> list[tuple[str, torch.nn.Parameter]]:
    """Make ``student``'s floating-point constants fresh trainable parameters (in place)."""
    trained: list[tuple[str, torch.nn.Parameter]] = []
    for node in student.graph.nodes:
        if node.op != "get_attr" or any(name == node.target for name, _ in trained):
            continue
        owner, _, leaf = node.target.rpartition(".")
        module = student.get_submodule(owner) if owner else student
        value = getattr(module, leaf)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            parameter = torch.nn.Parameter(value.detach().clone())
            setattr(module, leaf, parameter)
            trained.append((node.target, parameter))
    student.recompile()
    return trained


def _frozen(student: fx.GraphModule, trained: list[tuple[str, torch.nn.Parameter]]) -> fx.GraphModule:
    """The trained copy with its parameters back as plain constants (buffers), as captured graphs hold them."""
    for target, parameter in trained:
        owner, _, leaf = target.rpartition(".")
        module = student.get_submodule(owner) if owner else student
        delattr(module, leaf)
        module.register_buffer(leaf, parameter.detach().clone())
    student.recompile()
    return student


def _distillation_loss(outputs: Any, targets: Any, loss: str, temperature: float) -> torch.Tensor:
    if loss == "kl":
        student, teacher = logits_of(outputs).float(), logits_of(targets).float()
        return torch.nn.functional.kl_div(torch.log_softmax(student / temperature, -1),
                                          torch.log_softmax(teacher / temperature, -1),
                                          reduction="batchmean", log_target=True) * temperature ** 2
    pairs = [(o, t) for o, t in zip(_leaves(outputs), _leaves(targets)) if o.is_floating_point()]
    return sum(torch.nn.functional.mse_loss(o.float(), t.float()) for o, t in pairs) / max(len(pairs), 1)


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict) or hasattr(value, "values"):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    return []


def _error(student: fx.GraphModule, signature: Any, batches: list[Any], targets: list[Any]) -> tuple[float, float]:
    """The largest absolute and relative error of ``student``'s outputs against the teacher's on ``data``."""
    worst_abs = worst_rel = 0.0
    with torch.no_grad():
        for flat, target in zip(batches, targets):
            outputs = _leaves(signature.unflatten(_as_list(student(*flat))))
            comparison = compare_outputs(_leaves(target), outputs)
            worst_abs, worst_rel = max(worst_abs, comparison.max_abs), max(worst_rel, comparison.max_rel)
    return worst_abs, worst_rel


def _agreement(student: fx.GraphModule, signature: Any, batches: list[Any], targets: list[Any]) -> float:
    same = total = 0
    with torch.no_grad():
        for flat, target in zip(batches, targets):
            predicted = logits_of(signature.unflatten(_as_list(student(*flat)))).argmax(-1)
            expected = logits_of(target).argmax(-1)
            same += int((predicted == expected).sum())
            total += int(expected.numel())
    return same / total if total else float("nan")
