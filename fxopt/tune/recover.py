"""``fxopt.tune(..., recover=)``: train an over-budget candidate back within ``max_drop`` before giving it up.

After the search, each single option the budget refused (its drop alone over ``max_drop``),
nearest to the budget first, is added to the chosen model and the whole is fine-tuned by
distillation from the model after the exact passes on the ``recover`` inputs (no labels):
its float constants, and its int8 Linears by quantization-aware training
(:func:`fxopt.distill.distill_graph`). The result is lowered, its drop judged again on every
batch of ``data`` with the confidence bound, and, when it fits, timed side by side with the
current result; it replaces the result when it is faster by ``min_speedup``. Every attempt
is in the search log (phase ``recover``) with its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch.fx as fx

from fxopt.errors import InputError
from fxopt.latency import measure_side_by_side
from fxopt.lossy.acceptance import describe_drop, observed_drop, upper_bound
from fxopt.lossy.task import ALL
from fxopt.report import Report
from fxopt.verify import run_graph


@dataclass(frozen=True)
class RecoverOptions:
    """``recover=``: the input batches (``data``, like the example inputs, no labels) and how to train."""

    data: tuple[Any, ...]
    epochs: int = 5
    lr: float = 3e-4
    temperature: float = 2.0
    loss: str = "kl"
    schedule: str = "cosine"
    seed: int = 0
    candidates: int = 3  # over-budget options tried, nearest to the budget first


def recover_options(recover: Any) -> RecoverOptions | None:
    """``recover=`` as options: None, a list of input batches, or a dict with ``data`` and options."""
    if recover is None:
        return None
    if isinstance(recover, Mapping):
        known = {f.name for f in fields(RecoverOptions)}
        unknown = sorted(set(recover) - known)
        if unknown or "data" not in recover:
            raise InputError(f"recover= as a dict needs 'data' and takes {', '.join(sorted(known))}; "
                             f"got {', '.join(map(str, recover)) or 'nothing'}")
        options = RecoverOptions(**{**recover, "data": tuple(recover["data"])})
    elif isinstance(recover, (list, tuple)):
        options = RecoverOptions(tuple(recover))
    else:
        raise InputError("recover= takes a list of input batches (like the example inputs, no labels) or a "
                         f"dict with 'data' and training options, got {type(recover).__name__}")
    if not options.data:
        raise InputError("recover= has no input batches")
    if isinstance(options.candidates, bool) or not isinstance(options.candidates, int) or options.candidates < 1:
        raise InputError(f"recover= candidates must be a positive integer, got {options.candidates!r}")
    return options


def recover(tuner: Any, chosen: dict[str, Any], final: fx.GraphModule, options: RecoverOptions
            ) -> tuple[dict[str, Any], fx.GraphModule]:
    """Fine-tune the over-budget single options of ``tuner``'s log into ``chosen``; returns
    the choices and graph of the result (``chosen`` and ``final`` when none fits and is faster)."""
    from fxopt.backends import lower
    from fxopt.distill import distill_graph
    from fxopt.signature import split_example_inputs

    log, task = tuner.log, tuner.task
    refused = sorted((c for c in log.candidates if c.phase == "single" and not c.kept and c.judged_drop is not None
                      and c.judged_drop > task.max_drop), key=lambda c: c.judged_drop)
    by_labels = {(site, tuner.label(option)): option for site, levels in tuner.site_options().items() for option in levels}
    trials = [{site: by_labels[(site, label)] for site, label in c.choices.items()} for c in refused]
    if not trials:
        log.notes.append("recover: no single option was over max_drop: nothing to fine-tune")
        return chosen, final
    batches = []
    for index, inputs in enumerate(options.data):
        args, kwargs = split_example_inputs(inputs)
        batches.append(tuner.signature.flatten(args, kwargs, what=f"recover batch {index}, input"))
    targets = [tuner.signature.unflatten(list(run_graph(tuner.gm, flat))) for flat in batches]

    def lowered(gm: fx.GraphModule) -> Any:
        return lower(tuner.backend, gm, tuner.signature, tuner.batches[0], tuner.device, Report(backend=tuner.backend)).run

    current = tuner.runner(chosen)
    for trial in trials[:options.candidates]:
        labels = tuner.labels({**chosen, **trial})
        tuner.say(f"recover: fine-tuning {tuner.labels(trial)} ({options.epochs} epochs on {len(batches)} batches)")
        trained, note, _ = distill_graph(tuner.build({**chosen, **trial}), tuner.signature, batches, targets,
                                         epochs=options.epochs, lr=options.lr, temperature=options.temperature,
                                         loss=options.loss, seed=options.seed, progress=False,
                                         schedule=options.schedule, label="recover")
        run = lowered(trained)
        drop = task.drop(run, ALL)
        if tuner.confirmation is not None and drop <= task.max_drop:  # and on the rows no choice read
            drop = tuner.confirmation.drop(run, ALL)
        what = f"fine-tuned ({note.split(': ', 1)[1].split(' (')[0]}, {options.epochs} epochs)"
        if drop > task.max_drop:
            log.add("recover", labels, drop=drop, split=ALL,
                    reason=f"{what}: {describe_drop(drop)} still > max_drop {task.max_drop:g}")
            continue
        runners = {"baseline": tuner.runner({}), "current": current, "recovered": run}
        calls = {name: (lambda go=go: go(*tuner.batches[0])) for name, go in runners.items()}
        timings = measure_side_by_side(calls, warmup=2, repeats=3 * tuner.repeats)  # as the Pareto table
        ratio = timings["current"].median / timings["recovered"].median
        speedup = timings["baseline"].median / timings["recovered"].median
        entry = log.add("recover", labels, milliseconds=timings["recovered"].median, speedup=speedup,
                        metric=float(task.baseline or 0.0) - observed_drop(drop), drop=drop, split=ALL,
                        reason=f"{what}: {describe_drop(drop)} within max_drop {task.max_drop:g}")
        if ratio < tuner.min_speedup:
            entry.reason += f", but not faster than the result (x{ratio:.3f})"
            continue
        entry.kept = True
        entry.reason += f", x{ratio:.3f} over the result: it is the result"
        chosen, final, current = {**chosen, **trial}, trained, run
        log.chosen, log.final_speedup = dict(labels), speedup
        log.final_drop, log.final_bound = observed_drop(drop), upper_bound(drop)
        log.notes.append(f"recover: {tuner.labels(trial)} fine-tuned into max_drop and faster: the result "
                         "(the Pareto table was measured before it)")
    return chosen, final
