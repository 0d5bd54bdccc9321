"""``fxopt.finetune``: win back what a lossy rewrite lost, by distillation from the original.

    opt = fxopt.compile(model, (x,), ["low-rank(budget=0.2)"])        # or fxopt.tune(...)
    opt = fxopt.finetune(opt, model, data=[(x1,), (x2,), ...], epochs=5)

The optimized graph is an ``nn.Module``: its floating-point constants (low-rank factors, the
Linears pruning left, biases, norms) become trainable parameters of a copy, trained to match
the original model's outputs on the inputs given (no labels needed: the teacher's outputs are
the targets), with the KL divergence of the softmax at ``temperature`` for classifiers
(``loss="kl"``) or the mean squared error of every output (``loss="mse"``). Constants that are
not floating point (int8 weights) stay as they are: quantization-aware training is not part of
this. The result is lowered again for the same backend; its report says what was trained and
the loss and top-1 agreement with the original before and after. Deterministic for a seed on
CPU; neither the original model nor ``optimized`` is modified.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import InputError
from fxopt.ir import copy_graph_module
from fxopt.lossy.task import logits_of
from fxopt.verify import compare_outputs

LOSSES = ("kl", "mse")


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
) -> Any:
    """Train ``optimized``'s floating-point constants to reproduce ``teacher`` on ``data``.

    Args:
        optimized: an :class:`fxopt.OptimizedModule` (from ``compile`` or ``tune``).
        teacher: the original model (never modified; an eval copy runs when it is training).
        data: input batches like the example inputs (a tensor, a tuple, a dict of keyword
            inputs), as ``calibration=`` takes them; no labels (for labelled pairs, pass
            ``[x for x, _ in pairs]``).
        epochs, lr: passes over ``data`` and the AdamW learning rate.
        temperature, loss: ``"kl"`` (classifiers: KL divergence of the softmax at
            ``temperature``) or ``"mse"`` (every floating-point output).
        seed: the order of the batches each epoch.
        progress: one line per epoch on stderr.

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

    if any(m.training for m in teacher.modules()):
        teacher = copy.deepcopy(teacher).eval()
    with torch.no_grad():
        targets = [teacher(*args, **kwargs) for args, kwargs in structured]

    student, trained = _trainable_copy(optimized.graph_module)
    if not trained:
        raise InputError("the optimized graph has no floating-point constants to train")
    if any(p.is_meta for _, p in trained):
        raise InputError(f"the {optimized.report.backend} backend keeps the weights in its own runtime: "
                         "finetune a model compiled for backend='eager', then compile the result")
    optimizer = torch.optim.AdamW([p for _, p in trained], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)

    def objective(index: int) -> torch.Tensor:
        outputs = signature.unflatten(list(_as_list(student(*batches[index]))))
        return _distillation_loss(outputs, targets[index], loss, temperature)

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
            except RuntimeError as exc:  # an op without a gradient (int8 kernels): say which
                raise InputError(f"fxopt.finetune cannot train through this graph: {exc}") from exc
            optimizer.step()
        if progress:
            print(f"fxopt finetune: epoch {epoch + 1}/{epochs}, loss {mean_loss():.5f}", file=sys.stderr, flush=True)
    after = mean_loss()
    agreement_after = _agreement(student, signature, batches, targets)

    frozen = _frozen(student, trained)
    # the compile's own timings are not this step's; the final error is the trained graph's
    report = replace(optimized.report, notes=list(optimized.report.notes), passes=list(optimized.report.passes),
                     timings={}, total_seconds=0.0, memory={})
    report.final_max_abs_err, report.final_max_rel_err = _error(frozen, signature, batches, targets)
    count = sum(p.numel() for _, p in trained)
    report.notes.append(
        f"finetune: {count} parameters in {len(trained)} constants trained by distillation ({loss}, {epochs} epochs, "
        f"{len(batches)} batches): loss {before:.5f} -> {after:.5f}, top-1 agreement with the original "
        f"{agreement_before:.4f} -> {agreement_after:.4f} on the data")
    session = Session.from_graph(frozen, [*batches], report)
    return session.lower(Stage(frozen, list(report.passes)), report.backend, optimized.device)


def _as_list(outputs: Any) -> list[Any]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _trainable_copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[tuple[str, torch.nn.Parameter]]]:
    """A copy of ``gm`` whose floating-point constants are fresh trainable parameters."""
    student = copy_graph_module(gm)
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
    return student, trained


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
