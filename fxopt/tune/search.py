"""``fxopt.tune``: the fastest model whose task metric drops by at most ``max_drop``, choosing a
technique per layer and judging speed by latency measured in the chosen backend.

1. Capture, run the exact passes (``passes``), score the model on ``data``: the baseline.
2. Sensitivity, once: every option (technique x level) alone on every site, its metric drop
   measured on the fit half of ``data`` and its latency timed side by side with the baseline
   (the whole model with only that change). Options that cost more than ``max_drop`` or are
   not faster are dropped, with the reason.
3. Combination: :class:`fxopt.lossy.BudgetedSearch` with the ``sensitivity`` strategy over
   the sites (each site's levels: its kept options, by latency saved), the metric drop as
   the error (``ctx.task``; no output-error budget). Sites go in order of latency saved per
   metric lost; each takes its most saving option whose combined drop fits, and only if the
   combined model is also measured faster than without it (side by side). The choice is
   verified on the held-out half of ``data`` (and made again on every batch if it fails).
4. The chosen model is lowered and scored on every batch of ``data``; while its drop is over
   ``max_drop`` the option costing most metric per latency saved is taken back.
5. The Pareto front of everything measured is timed again side by side, chosen model included.
6. With a confidence bound, 1-5 ran on the even batches of ``data``; the choice is confirmed on
   the odd ones (:mod:`fxopt.tune.confirm`). A drop "fits" when its upper confidence bound does
   (:mod:`fxopt.lossy.acceptance`); with too few examples, tune says so up front and searches nothing.
7. With ``recover=``, over-budget options are fine-tuned into the budget (:mod:`fxopt.tune.recover`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from fxopt.capture import BATCH, Signature, capture, split_example_inputs
from fxopt.errors import InputError
from fxopt.ir import copy_graph_module, linear_parts
from fxopt.latency import Timing, measure_side_by_side
from fxopt.lossy import BudgetedSearch, Pick, Site
from fxopt.lossy.acceptance import DEFAULT_CONFIDENCE, describe_drop, observed_drop, upper_bound
from fxopt.lossy.task import ALL, FIT, TaskBudget, task_budget
from fxopt.pipeline import UserModelUntouched, reference_outputs
from fxopt.registry import resolve_passes
from fxopt.report import Report
from fxopt.session import Session, SessionOptions, Stage, pass_context
from fxopt.tune.confirm import confirm_choice, split_for_confirmation, unsupported_confirmation
from fxopt.tune.log import Candidate, ParetoRow, TuneLog, front, progress_printer
from fxopt.tune.recover import recover as run_recovery
from fxopt.tune.recover import recover_options
from fxopt.tune.techniques import HIDDEN, Technique, ordered, select_techniques
from fxopt.verify import compare_outputs, module_fingerprint, run_graph

Option = tuple[str, Hashable]  # (technique name, level)
Choices = Mapping[str, Option]
CHUNK = 12  # singles timed per interleaved loop, each loop with the baseline
SENSITIVITY_SHARE = 0.6  # of the time budget; the rest is for combining what was measured
MAX_CALIBRATION = 8  # data batches the techniques' statistics (static scales, unit ranking) read


def tune(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    data: Any,
    metric: Any,
    max_drop: float,
    backend: str = "eager",
    passes: Any = None,
    techniques: Any = None,
    time_budget_s: float = 120.0,
    device: str | torch.device | None = None,
    repeats: int = 20,
    min_speedup: float = 1.05,
    holdout: bool = False,
    progress: bool = True,
    confidence: float | None = DEFAULT_CONFIDENCE,
    agreement_data: Any = None,
    recover: Any = None,
    confirm: bool | None = None,
) -> Any:
    """Search per layer among fxopt's techniques for the fastest model within ``max_drop``.

    Args:
        model: the model; never modified.
        example_inputs: inputs at the batch size latency matters for (a tuple, one tensor, or
            a dict of keyword inputs); every latency is timed on them.
        data: batches of ``(inputs, labels)`` (inputs as ``example_inputs``), or a callable
            returning them; held out from training. For ``top1-agreement`` a batch may be its
            inputs alone.
        metric: ``"accuracy"``, ``"top1-agreement"`` (with the original model's top-1: no
            labels needed) or ``metric(outputs, labels) -> float``, higher is better.
        max_drop: the largest fall of the metric allowed, in its units (0.005: half a point of
            accuracy), on ``data``.
        backend: ``"eager"`` or ``"onnx"``: latency is measured there.
        passes: the exact passes to run first (None: every registered exact pass).
        techniques: technique or family names (``"int8"``, ``"low-rank"``, ...; None: all
            registered, see :func:`fxopt.tune.list_techniques`).
        time_budget_s: wall-clock budget of the search; when spent, the best model so far.
        repeats: timed rounds per side-by-side measurement.
        min_speedup: an option counts as faster only above this ratio (timing noise).
        holdout: choose on the even batches of ``data``, verify on the odd ones (choosing again
            on every batch with half of ``max_drop`` when that fails); default: every batch.
        progress: print progress lines on stderr.
        confidence: a drop fits ``max_drop`` only when its one-sided upper bound at this
            confidence does (:mod:`fxopt.lossy.acceptance`); ``None``: the drop measured on
            ``data`` alone, no allowance for sampling (it does not hold on unseen data).
        agreement_data: unlabelled input batches drawn like ``data``'s: for accuracy and
            top-1 agreement, the bound is taken on changed top-1 predictions over both.
        recover: input batches (no labels) to fine-tune over-budget options on after the
            search, or a dict with ``data`` and options (:mod:`fxopt.tune.recover`).
        confirm: choose on the even batches of ``data``, keep the choice as far as it passes on
            the odd ones (:mod:`fxopt.tune.confirm`); default: with ``confidence`` and 2+ batches.
            False: choose and judge on every batch (the bound then holds for one candidate).

    Returns an :class:`fxopt.OptimizedModule`; ``opt.report.search`` is the :class:`TuneLog`.
    """
    from fxopt.inputs import inference_copy

    started = time.perf_counter()
    chosen_techniques, recovery = select_techniques(techniques), recover_options(recover)
    if not isinstance(time_budget_s, (int, float)) or time_budget_s <= 0:
        raise InputError(f"time_budget_s must be a positive number of seconds, got {time_budget_s!r}")
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    pipeline = resolve_passes(passes)
    say = progress_printer(progress)

    args, kwargs = split_example_inputs(example_inputs)
    report = Report(model=type(model).__name__, backend=backend)
    fingerprint = module_fingerprint(model)
    source = inference_copy(model, report)
    captured = capture(source, args, kwargs, dynamic_shapes=BATCH)
    report.notes.extend(captured.meta.pop("fxopt_notes", []))
    signature: Signature = captured.meta["fxopt_signature"]
    example = signature.flatten(args, kwargs, what="example input")
    task = task_budget(captured, signature, data, metric, max_drop, confidence, agreement_data)
    selection, confirmation, note = split_for_confirmation(task, confirm, FIT if holdout else ALL)
    report.notes.extend(filter(None, [note]))
    batches = [example, *task.inputs[:MAX_CALIBRATION]]
    reference = reference_outputs(captured, batches)
    say(f"baseline {task.name} {task.baseline:.4f} on {len(task.inputs)} batches; running {len(pipeline)} exact passes")

    # Lossy passes given in ``passes`` keep the task budget as well as their own.
    user_model = UserModelUntouched(model, captured.meta.get("fxopt_sources", {}), baseline=fingerprint)
    session = Session.from_graph(captured, batches, report, user_model=user_model, task=task, reference=reference,
                                 options=SessionOptions(verify_rows=None, progress=None if progress else False))
    exact_stage = session.run(pipeline)
    start_graph = exact_stage.gm

    target = torch.device(device) if device is not None else (example[0].device if example else torch.device("cpu"))
    tuner = _Tuner(start_graph, signature, batches, selection, chosen_techniques, backend, target,
                   deadline=started + time_budget_s, sensitivity_deadline=started + SENSITIVITY_SHARE * time_budget_s,
                   repeats=repeats, min_speedup=min_speedup, say=say,
                   holdout=holdout, confirmation=confirmation)
    choices = tuner.run()
    if confirmation is not None:  # the baseline and drop on every batch; the bound that accepted the choice
        tuner.log.baseline_metric = float(task.baseline or 0.0)
        tuner.log.notes.append(f"the search measured on the {selection.examples()} examples of the even batches")
        if choices:
            tuner.log.final_drop = observed_drop(task.drop(tuner.runner(choices), ALL))
            tuner.log.final_bound = upper_bound(confirmation.drop(tuner.runner(choices), ALL))
    tuner.log.seconds = time.perf_counter() - started

    final_graph = tuner.build(choices)
    if recovery is not None:
        choices, final_graph = run_recovery(tuner, choices, final_graph, recovery)
    optimized = session.lower(Stage(final_graph, exact_stage.records), backend, target)
    report = optimized.report
    report.final_max_abs_err, report.final_max_rel_err = _drift(reference, final_graph, batches)
    report.search = tuner.log
    if module_fingerprint(model) != fingerprint:  # pragma: no cover - invariant 1
        raise RuntimeError("internal error: the user's model changed during tuning")
    say(f"done in {tuner.log.seconds:.1f}s: x{tuner.log.final_speedup:.2f} at a drop of {tuner.log.final_drop:+.4f}")
    return optimized


class _Tuner:
    """One search: the graph it starts from, the task, the techniques' state, the log."""

    def __init__(self, gm: fx.GraphModule, signature: Signature, batches: list[list[torch.Tensor]],
                 task: TaskBudget, techniques: Sequence[Technique], backend: str, device: torch.device, *,
                 deadline: float, sensitivity_deadline: float, repeats: int, min_speedup: float, say: Any,
                 holdout: bool = False, confirmation: TaskBudget | None = None) -> None:
        self.gm, self.signature, self.batches, self.task = gm, signature, batches, task
        self.techniques = {t.name: t for t in techniques}
        self.backend, self.device, self.holdout, self.sensitivity_deadline = backend, device, holdout, sensitivity_deadline
        self.deadline, self.repeats, self.min_speedup, self.say = deadline, repeats, min_speedup, say
        self.confirmation = confirmation  # rows the choice is tested on (None: not confirming)
        self.family = "all"  # the combination running now ("extend": growing the fastest one)
        self.plans: dict[str, dict[str, Option]] = {}  # each family's own combination, and "all"
        self.states = {t.name: t.prepare(gm, batches) for t in techniques}
        self.log = TuneLog(task.name, task.max_drop, backend, [t.name for t in techniques])
        self.log.confidence = task.confidence
        self._runners: dict[frozenset[tuple[str, Option]], Any] = {}
        self.ctx = pass_context([batches[0]], task=task, reference=[run_graph(gm, batches[0])])

    # ------------------------------------------------------------------ building and measuring

    def label(self, option: Option) -> str:
        return self.techniques[option[0]].label(option[1])

    def labels(self, choices: Choices) -> dict[str, str]:
        return {site: self.label(option) for site, option in choices.items()}

    def apply(self, gm: fx.GraphModule, choices: Choices) -> fx.GraphModule:
        """Every chosen option on ``gm``, technique by technique, structural ones first."""
        names: dict[str, str] = {}
        for technique in ordered(self.techniques.values()):
            mine = {site: option[1] for site, option in choices.items() if option[0] == technique.name}
            if mine:
                technique.apply(gm, mine, self.states[technique.name], names)
        gm.recompile()
        return gm

    def build(self, choices: Choices) -> fx.GraphModule:
        return self.apply(copy_graph_module(self.gm), choices)

    def runner(self, choices: Choices) -> Any:
        """The lowered model of ``choices``: ``run(*flat_inputs)`` (built once)."""
        from fxopt.backends import lower

        key = frozenset(choices.items())
        if key not in self._runners:
            lowered = lower(self.backend, self.build(choices), self.signature, self.batches[0], self.device,
                            Report(backend=self.backend))
            self._runners[key] = lowered.run
        return self._runners[key]

    def time(self, named: Mapping[str, Choices], repeats: int | None = None) -> dict[str, Timing]:
        """Side-by-side timings of the lowered models, one interleaved loop."""
        example = self.batches[0]
        runners = {name: self.runner(choices) for name, choices in named.items()}
        calls = {name: (lambda run=run: run(*example)) for name, run in runners.items()}
        return measure_side_by_side(calls, warmup=2, repeats=repeats or self.repeats)

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    # ------------------------------------------------------------------ the search

    def run(self) -> dict[str, Option]:
        base_timing = self.time({"baseline": {}})["baseline"]
        self.log.baseline_ms, self.log.baseline_metric = base_timing.median, float(self.task.baseline or 0.0)
        self.log.add("baseline", {}, milliseconds=base_timing.median, speedup=1.0, metric=self.task.baseline,
                     drop=0.0, split=ALL, kept=True, reason="the model after the exact passes")
        self.say(f"baseline {base_timing}")
        unsupported = self.task.unsupported(self.split_name) or (
            self.confirmation and unsupported_confirmation(self.confirmation))
        if unsupported is not None:  # no lossy change can pass: nothing to search (the report's note says why)
            self.log.notes.append("nothing searched: the data cannot support max_drop at this confidence")
            return self.finish({})
        search = BudgetedSearch(self.gm, self.ctx, [], self.apply, self.task.max_drop, "sensitivity",
                                choose_level=self.choose, holdout=self.holdout, output_error=False)
        sites = self.sensitivity(search)
        if not sites:
            self.log.notes.append("no option was both within max_drop and faster alone: the model is unchanged")
            return self.finish({})
        # One greedy combination per family of techniques and one over all of them: the
        # result is never slower than what one family reaches alone (timed side by side).
        plans = self.plans
        families = sorted({self.techniques[o[0]].family for s in sites for o in s.levels})
        for family in ["all", *(families if len(families) > 1 else [])]:  # "all" first: the budget may not last
            if self.out_of_time():
                self.log.stopped = self.log.stopped or f"time budget spent before the {family} combination"
                break
            self.family = family
            search.sites = [s for s in (self._restricted(site, family) for site in sites) if s.levels]
            outcome = search.run()
            plans[family] = dict(outcome.choices)  # type: ignore[arg-type]
            self.log.add("combined", self.labels(plans[family]), drop=outcome.drop, split=self.split_name,
                         kept=True, reason=self._verdict(family, outcome))
            self.say(f"combination over {family}: {len(plans[family])} sites changed")
        chosen = self.fastest(plans) if plans else {}
        self.family = "extend"
        search.sites = sites
        for site in sorted(sites, key=lambda s: -max(s.savings)):
            if site.name in chosen or self.out_of_time():
                continue
            pick = self.choose(search, site, self.task.max_drop, chosen)
            if pick.level is not None:
                chosen[site.name] = pick.level  # type: ignore[assignment]
        return self.finish(chosen, {s.name: s for s in sites})

    @property
    def split_name(self) -> str:
        return FIT if self.holdout else ALL

    def _restricted(self, site: Site, family: str) -> Site:
        keep = [i for i, o in enumerate(site.levels) if family == "all" or self.techniques[o[0]].family == family]
        return Site(site.name, tuple(site.levels[i] for i in keep), tuple(site.savings[i] for i in keep))

    def _verdict(self, family: str, outcome: Any) -> str:
        what = f"greedy over {family}" if family != "all" else "greedy over every technique"
        if outcome.retried:
            return f"{what}: chosen again on every batch after the held-out half failed"
        if outcome.heldout_error is not None:
            return f"{what}: fitted, held-out half within max_drop"
        return f"{what}: chosen on every batch of data"

    def fastest(self, plans: Mapping[str, dict[str, Option]]) -> dict[str, Option]:
        """The fastest of the combinations, timed side by side."""
        distinct: dict[frozenset, str] = {}
        for family, plan in plans.items():
            distinct.setdefault(frozenset(plan.items()), family)
        if len(distinct) == 1:
            return dict(plans[next(iter(distinct.values()))])
        timings = self.time({family: plans[family] for family in distinct.values()})
        best = min(timings, key=lambda family: timings[family].median)
        self.log.notes.append("combinations timed side by side: " + ", ".join(
            f"{family} {timings[family].median:.3f} ms" for family in timings) + f"; continuing from {best}")
        return dict(plans[best])

    def sensitivity(self, search: BudgetedSearch) -> list[Site]:
        """Every option alone on every site: drop (fit batches) and side-by-side speedup."""
        options: list[tuple[str, Option]] = []
        for technique in self.techniques.values():
            for site, levels in technique.targets(self.gm, self.states[technique.name]).items():
                options.extend((site, (technique.name, level)) for level in levels)
        # Largest layers first: they hold most of the latency, and a spent budget cuts the tail.
        size = {n.name: int(parts.weight.numel()) for n in self.gm.graph.nodes
                if (parts := linear_parts(self.gm, n)) is not None}
        options.sort(key=lambda item: -size.get(item[0].removesuffix(HIDDEN), 0))
        self.log.options = len(options)
        self.say(f"sensitivity: {len(options)} options on {len({site for site, _ in options})} sites")
        measured: list[tuple[str, Option, float]] = []
        saved: dict[tuple[str, Option], float] = {}
        for start in range(0, len(options), CHUNK):
            affordable = []
            for index, (site, option) in enumerate(options[start:start + CHUNK], start):
                if time.perf_counter() > self.sensitivity_deadline:
                    self.log.stopped = (f"{SENSITIVITY_SHARE:.0%} of the time budget spent on single options after "
                                        f"{index} of {len(options)}")
                    break
                search.error({site: option})
                drop = search.drop({site: option}) or 0.0
                measured.append((site, option, drop))
                if drop <= self.task.max_drop:
                    affordable.append((site, option, drop))
                else:  # no need to time what the metric cannot afford
                    self.log.add("single", self.labels({site: option}), split=self.split_name, drop=drop,
                                 metric=self.task.baseline_on(self.split_name) - observed_drop(drop),
                                 reason=f"{describe_drop(drop)} > max_drop {self.task.max_drop:g} (not timed)")
            if affordable:
                self._time_singles(affordable, saved)
            self.say(f"sensitivity: {len(measured)}/{len(options)} options measured")
            if self.log.stopped:
                break
        sites = []
        for site in dict.fromkeys(s for s, _, _ in measured):
            kept = sorted(((o, v) for (s, o), v in saved.items() if s == site), key=lambda item: item[1])
            if kept:
                sites.append(Site(site, tuple(o for o, _ in kept), tuple(v for _, v in kept)))
        return sites

    def _time_singles(self, singles: list[tuple[str, Option, float]], saved: dict[tuple[str, Option], float]) -> None:
        """Time options alone side by side with the baseline; keep the faster ones' savings."""
        timings = self.time({"baseline": {}, **{str(i): {site: option} for i, (site, option, _) in enumerate(singles)}})
        base = timings["baseline"].median
        for i, (site, option, drop) in enumerate(singles):
            speedup = base / timings[str(i)].median
            faster = speedup >= self.min_speedup
            self.log.add("single", self.labels({site: option}), milliseconds=timings[str(i)].median,
                         speedup=speedup, metric=self.task.baseline_on(self.split_name) - observed_drop(drop), drop=drop,
                         split=self.split_name, kept=faster,
                         reason="within max_drop and faster: a level of this site" if faster
                         else f"not faster alone (x{speedup:.3f} < x{self.min_speedup:g})")
            if faster:
                saved[(site, option)] = 1.0 - 1.0 / speedup  # share of the baseline's time saved

    def choose(self, search: BudgetedSearch, site: Site, target: float, base: Choices) -> Pick:
        """The most saving option of ``site`` whose combined drop fits and that makes the
        combined model faster than ``base`` alone (measured side by side)."""
        error = math.inf
        for option in reversed(site.levels):
            if self.out_of_time():
                self.log.stopped = self.log.stopped or "time budget spent during the combination"
                return Pick(None, error, tried=option, target=target, reason="time budget spent", others=len(base))
            trial = {**base, site.name: option}
            error = search.error(trial)
            if not base and self.family != "extend":  # alone: measured and logged by the sensitivity phase
                if error <= target:
                    return Pick(option, error, target=target)
                continue
            drop = search.drop(trial)
            if error > target:
                self.log.add(self.phase, self.labels(trial), drop=drop, split=self._split_of(search),
                             reason=f"combined {describe_drop(drop)} > {target:g}")
                continue
            timings = self.time({"baseline": {}, "without": base, "with": trial})
            ratio = timings["without"].median / timings["with"].median
            speedup = timings["baseline"].median / timings["with"].median
            candidate = self.log.add(self.phase, self.labels(trial), milliseconds=timings["with"].median,
                                     speedup=speedup, metric=self.task.baseline_on(self._split_of(search)) - observed_drop(drop or 0.0),
                                     drop=drop, split=self._split_of(search))
            if ratio < self.min_speedup:
                candidate.reason = f"not faster than without {site.name}'s {self.label(option)} (x{ratio:.3f})"
                continue
            candidate.kept, candidate.reason = True, f"x{ratio:.3f} over the model without it, drop fits"
            self.say(f"combine: {len(base) + 1} sites, x{speedup:.2f}, drop {drop:+.4f}")
            return Pick(option, error, target=target, others=len(base))
        return Pick(None, error, tried=site.levels[0] if site.levels else None, target=target,
                    reason="no option fits with the sites chosen before it", others=len(base))

    @property
    def phase(self) -> str:
        return "extend" if self.family == "extend" else f"combine:{self.family}"

    def _split_of(self, search: BudgetedSearch) -> str:
        return search.split if self.holdout else ALL

    def finish(self, chosen: dict[str, Option], sites: Mapping[str, Site] | None = None) -> dict[str, Option]:
        """Score the choice lowered, on every batch; back off while over ``max_drop``; then
        time the Pareto front side by side."""
        sites = sites or {}
        while True:
            drop = self.task.drop(self.runner(chosen), ALL)
            if drop <= self.task.max_drop or not chosen:
                break
            worst = max(chosen, key=lambda s: (getattr(self.single(s, chosen[s]), "drop", None) or 0.0)
                        / max(sites[s].saving(chosen[s]) if s in sites else 1e-9, 1e-9))
            self.log.add("back-off", self.labels(chosen), drop=drop, split=ALL,
                         reason=f"lowered model's {describe_drop(drop)} > {self.task.max_drop:g} on every batch: "
                                f"{worst} back to float")
            chosen = {s: o for s, o in chosen.items() if s != worst}
        return self.pareto(chosen, drop)

    def single(self, site: str, option: Option) -> Candidate | None:
        """The sensitivity phase's measurement of ``option`` alone on ``site`` (None: not measured)."""
        return next((c for c in self.log.candidates
                     if c.phase == "single" and c.choices == self.labels({site: option})), None)

    def pareto(self, chosen: dict[str, Option], chosen_drop: float) -> dict[str, Option]:
        """Time the chosen model, the baseline, each family's own combination and the front of
        the measured candidates side by side, each scored on every batch of ``data``; a family's
        combination or front candidate within ``max_drop`` measured faster than the choice
        (by ``min_speedup``) replaces it."""
        by_labels = {}
        for site, levels in self.site_options().items():
            for option in levels:
                by_labels[(site, self.label(option))] = option
        models: dict[str, dict[str, Option]] = {"baseline": {}, "combined": chosen}
        for family, plan in self.plans.items():
            if family != "all" and plan and plan not in models.values():
                models[f"{family} alone"] = plan
        measured = [c for c in self.log.candidates if c.speedup is not None and c.drop is not None and c.choices]
        for candidate in front(measured)[:8]:
            choices = {site: by_labels[(site, label)] for site, label in candidate.choices.items()}
            if choices not in models.values():
                models[candidate.name] = choices
        timings = self.time(models, repeats=3 * self.repeats)  # the numbers the table reports
        drops = {label: chosen_drop if label == "combined" else 0.0 if not choices
                 else self.task.drop(self.runner(choices), ALL) for label, choices in models.items()}
        best = min((label for label in models if label not in ("combined", "baseline")
                    and drops[label] <= self.task.max_drop), key=lambda label: timings[label].median, default=None)
        winner = "combined"
        if best is not None and timings["combined"].median / timings[best].median >= self.min_speedup:
            winner = best
            self.log.notes.append(f"{best} measured x{timings['combined'].median / timings[best].median:.2f} faster "
                                  f"than the combined choice side by side, within max_drop: it is the result")
        if self.confirmation is not None and models[winner]:
            confirmed = confirm_choice(self, models[winner])
            if confirmed != models[winner]:  # a prefix of the choice, or nothing: time it with the rest
                winner = "confirmed" if confirmed else "baseline"
                models[winner] = confirmed
                drops[winner] = self.task.drop(self.runner(confirmed), ALL) if confirmed else 0.0
                timings = self.time(models, repeats=3 * self.repeats)
        base = timings["baseline"].median
        rows = []
        for label, choices in models.items():
            timing = timings[label]
            observed = observed_drop(drops[label])
            rows.append(ParetoRow(label, self.labels(choices), timing.median, (timing.q1, timing.q3),
                                  base / timing.median, float(self.task.baseline or 0.0) - observed,
                                  observed, chosen=label == winner, bound=upper_bound(drops[label])))
        rows.sort(key=lambda r: r.speedup)
        final = models[winner]
        self.log.pareto = rows
        self.log.chosen = self.labels(final)
        self.log.final_drop, self.log.final_bound = observed_drop(drops[winner]), upper_bound(drops[winner])
        self.log.final_speedup = base / timings[winner].median
        self.log.add("final", self.labels(final), milliseconds=timings[winner].median,
                     speedup=self.log.final_speedup, metric=float(self.task.baseline or 0.0) - observed_drop(drops[winner]),
                     drop=drops[winner], split=ALL, kept=True,
                     reason="lowered, scored on every batch, timed side by side with the front")
        return final

    def site_options(self) -> dict[str, list[Option]]:
        """Every option of every site, technique by technique."""
        found: dict[str, list[Option]] = {}
        for technique in self.techniques.values():
            for site, levels in technique.targets(self.gm, self.states[technique.name]).items():
                found.setdefault(site, []).extend((technique.name, level) for level in levels)
        return found


def _drift(reference: list[list[Any]], gm: fx.GraphModule, batches: list[list[torch.Tensor]]) -> tuple[float, float]:
    worst_abs = worst_rel = 0.0
    for expected, batch in zip(reference, batches):
        comparison = compare_outputs(expected, run_graph(gm, batch))
        worst_abs, worst_rel = max(worst_abs, comparison.max_abs), max(worst_rel, comparison.max_rel)
    return worst_abs, worst_rel
