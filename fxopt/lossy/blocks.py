"""Block by block: the budgeted search on a model whose values do not fit the memory bound.

Where the search cannot keep the starting graph's values (a 1B model's run holds more than
the compile's bound), each whole-model trial is a whole forward. Block by block, as
GPTQ-style tools and NNCF calibrate, a trial runs one block. The blocks are the spans of the
graph that repeated modules cover (``layers.0``, ``layers.1``, ...: a module path up to its
first index), in graph order; what is live across a span's end (the residual stream, the
mask, the rotary tables: small beside the weights) is kept from one block to the next.

    block k      error = its outputs with the choices so far (its inputs from the changed
                 blocks before it) against the starting graph's; the block may raise it to
                 its share, budget * (k + 1) / blocks (errors add up along the residual
                 stream). Its sites ranked by saving per estimated error: the longest prefix
                 within the share is taken, the next site refused, the rest another round.
    other sites  (a head after the blocks): whole-model trials on top, within the budget.
    the check    the whole model's output error on every batch of the split. Over the
                 budget, the shares shrink by the ratio missed and the blocks run again
                 (:data:`SHRINK_ROUNDS` times at most); then the whole-model strategy decides.

A block's trial is the block's own nodes (:class:`Block`, a graph of the span alone, made once)
with the block's own choices applied (``search.trial(..., of=block)``), run from the values
kept at its span's start: the other blocks' choices rewrite nodes its run does not reach
(their effect comes in through those values), and leaving them out keeps a trial's cost that of
its block, not of every choice made so far nor of copying the whole graph. Run span by span, a
graph computes exactly what a whole run computes (:func:`run_by_spans`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import derived, module_path, subgraph_module
from fxopt.ir.derived import release_freed_memory
from fxopt.lossy.sites import Choices, Level, Pick, Site
from fxopt.phases import progress
from fxopt.verify import compare_outputs, drop_dead_values, last_uses, run_node

# The search is a fxopt.lossy.search.BudgetedSearch (which imports this module): typed Any here.
Search = Any
SHRINK_ROUNDS = 2
_BLOCKWISE = "chosen block by block"
Values = dict[str, Any]


class SpanError(Exception):
    """A trial graph's span cannot be run from the kept values (a rewrite moved its end)."""


@dataclass(frozen=True)
class Span:
    """The nodes after the previous span's last one, up to ``last`` (the last node of the block
    ``key``); ``outputs``: its computed nodes used after it; ``sites``: the sites in it."""

    key: str
    last: str
    outputs: tuple[str, ...]
    sites: tuple[str, ...]


def block_key(path: str) -> str | None:
    """``layers.3`` for ``layers.3.mlp.up_proj``: the path up to its first index, one of a
    container's repeated modules (None: no index, or the model's own numbered children, the
    layers of a Sequential rather than repeated blocks)."""
    atoms = path.split(".")
    index = next((i for i, atom in enumerate(atoms) if atom.isdigit()), None)
    return None if not index else ".".join(atoms[: index + 1])


def _key(node: fx.Node) -> str | None:
    return block_key(module_path(node)) if node.meta.get("nn_module_stack") else None


def find_spans(gm: fx.GraphModule, site_names: Iterable[str]) -> list[Span] | None:
    """The graph's blocks as spans, in order, each with its sites; None unless there are two
    blocks or more, one after another (a block's computed nodes all before the next one's)."""
    nodes = list(gm.graph.nodes)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        key = _key(node) if node.op in ("call_function", "call_method", "call_module") else None
        if key is not None:
            first.setdefault(key, index)
            last[key] = index
    keys = sorted(first, key=first.__getitem__)
    if len(keys) < 2 or any(first[b] <= last[a] for a, b in zip(keys, keys[1:])):
        return None
    wanted = set(site_names)
    position = {node: index for index, node in enumerate(nodes)}
    spans, start = [], 0
    for key in keys:
        end = last[key]
        members = nodes[start:end + 1]
        outputs = tuple(n.name for n in members if n.op not in ("placeholder", "get_attr")
                        and any(position[user] > end for user in n.users))
        spans.append(Span(key, nodes[end].name, outputs,
                          tuple(n.name for n in members if n.name in wanted and _key(n) == key)))
        start = end + 1
    return spans


def spans_for(search: Search) -> list[Span] | None:
    """The blocks ``search`` chooses block by block: with ``strategy="blocks"``, or where its
    starting graph's values do not fit the memory bound (each whole-model trial would be a
    whole run); an output-error budget only (a task metric runs the whole model)."""
    if search.ctx.task is not None or not (search.strategy == "blocks" or not search.values_fit()):
        return None
    spans = find_spans(search.gm, [site.name for site in search.sites])
    return spans if spans and any(span.sites for span in spans) else None


def run_span(gm: fx.GraphModule, spans: Sequence[Span], k: int, live: Values, batch: Sequence[Any],
             held: dict[int, torch.Tensor] | None = None) -> Values:
    """Run span ``k`` of ``gm`` (a trial graph of the spans' graph) from ``live``, the values
    live at its start (span 0: from ``batch``); the values live after it. ``held``: given by
    one block's trials, what a node computes from constants alone (an int8 weight dequantized
    to float: the same tensors in trial after trial) is made once (:func:`fxopt.ir.derived`)
    and kept alive there, by storage, until the block is done."""
    nodes = list(gm.graph.nodes)
    index = {node.name: i for i, node in enumerate(nodes)}
    if spans[k].last not in index or (k and spans[k - 1].last not in index):
        raise SpanError(f"block {spans[k].key}: its end is not in the trial graph")
    start, end = (index[spans[k - 1].last] + 1 if k else 0), index[spans[k].last]
    env = dict(live)
    inputs = iter(gm.graph._codegen.process_inputs(*batch))

    def value(node: fx.Node) -> Any:
        if node.name in env:
            return env[node.name]
        if node.op == "get_attr":  # a constant a rewrite placed outside the span
            return run_node(gm, node, value)
        raise SpanError(f"block {spans[k].key}: {node.name} is neither live at its start nor in it")

    last = {node.name: position for node, position in last_uses(gm).items()}
    constants = {node.name for node in nodes if node.op == "get_attr"}
    with torch.no_grad():  # a model's parameters require grad: no autograd graph keeps a block's values
        for position, node in enumerate(nodes[start:end + 1], start):
            if node.op == "output":
                raise SpanError(f"block {spans[k].key}: the graph's output lies inside it")
            if node.op == "placeholder":
                env[node.name] = next(inputs)
                continue
            env[node.name] = _computed(gm, node, value, held)
            # as a run that keeps no values: only what a later node reads
            drop_dead_values(node, env, [name for name in env if last.get(name, -1) <= position], value,
                             constants.__contains__)
    return {name: v for name, v in env.items() if last.get(name, -1) > end}


@dataclass(frozen=True)
class Block:
    """Span ``k``'s nodes alone (:func:`fxopt.ir.subgraph_module`: a placeholder for each value
    it reads from before it), the trials' starting graph; ``carried``: the values live after
    the span (the names :func:`run_span` keeps); ``inputs``: the whole graph's placeholders,
    by name, in the order ``flatten`` (the whole graph's) gives its inputs from a batch."""

    gm: fx.GraphModule
    carried: frozenset[str]
    inputs: tuple[str, ...]
    flatten: Callable[..., Any]


def blocks_of(gm: fx.GraphModule, spans: Sequence[Span]) -> list[Block]:
    """A :class:`Block` for each span of ``gm``: built once, copied by each trial instead of
    the whole graph (a 1.1B Llama's graph is 15,000 nodes; a block's, 700)."""
    nodes = list(gm.graph.nodes)
    index = {node.name: i for i, node in enumerate(nodes)}
    last = last_uses(gm)
    inputs = tuple(node.name for node in nodes if node.op == "placeholder")
    blocks, start = [], 0
    for span in spans:
        end = index[span.last]
        members = nodes[start:end + 1]
        if any(node.op == "output" for node in members):
            raise SpanError(f"block {span.key}: the graph's output lies inside it")
        carried = frozenset(node.name for node in nodes[:end + 1] if last[node] > end)
        outputs = [node for node in members if node.name in carried]
        blocks.append(Block(subgraph_module(gm, members, outputs), carried, inputs, gm.graph._codegen.process_inputs))
        start = end + 1
    return blocks


def run_block(trial: fx.GraphModule, block: Block, live: Values, batch: Sequence[Any],
              held: dict[int, torch.Tensor] | None = None) -> Values:
    """Run ``trial`` (a trial graph of ``block.gm``) from ``live``, the values live at the
    block's start (the whole graph's inputs from ``batch``): the values live after it, as
    :func:`run_span` gives them for the whole graph's trial. ``held``: as for :func:`run_span`."""
    env: Values = {}
    given: Values | None = None

    def value(node: fx.Node) -> Any:
        if node.name not in env:
            raise SpanError(f"{node.name} is read before the trial computes it")
        return env[node.name]

    with torch.no_grad():
        for node in trial.graph.nodes:
            if node.op == "output":
                continue
            if node.op == "placeholder":
                if node.name in live:
                    env[node.name] = live[node.name]
                    continue
                if given is None:
                    given = dict(zip(block.inputs, block.flatten(*batch)))
                if node.name not in given:
                    raise SpanError(f"{node.name} is neither live at the block's start nor an input")
                env[node.name] = given[node.name]
            else:
                env[node.name] = _computed(trial, node, value, held)
    after = {name: v for name, v in live.items() if name in block.carried}
    after.update((name, v) for name, v in env.items() if name in block.carried)
    return after


def _computed(gm: fx.GraphModule, node: fx.Node, value: Callable[[fx.Node], Any],
              held: dict[int, torch.Tensor] | None) -> Any:
    """``node``'s value: made once across a block's trials where it reads constants alone
    (``held`` given: :func:`_folded`), else computed."""
    if held is not None and _of_constants(node):
        return _folded(gm, node, value, held)
    return run_node(gm, node, value)


def _of_constants(node: fx.Node) -> bool:
    """``node`` is a deterministic op whose every input is a constant (a ``get_attr``)."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded not in target.tags
            and bool(node.all_input_nodes) and all(n.op == "get_attr" for n in node.all_input_nodes))


def _folded(gm: fx.GraphModule, node: fx.Node, value: Callable[[fx.Node], Any], held: dict[int, torch.Tensor]) -> Any:
    constants = [value(n) for n in node.all_input_nodes]
    if not all(isinstance(c, torch.Tensor) for c in constants):
        return run_node(gm, node, value)
    place = {n: i for i, n in enumerate(node.all_input_nodes)}  # which constant goes where
    how = ("constants-only", node.target, fx.node.map_arg(node.args, place.__getitem__),
           tuple(sorted(fx.node.map_arg(node.kwargs, place.__getitem__).items())))
    result = derived(constants, how, lambda: run_node(gm, node, value))
    for tensor in result if isinstance(result, tuple) else (result,):
        if isinstance(tensor, torch.Tensor):
            held[tensor.untyped_storage().data_ptr()] = tensor
    return result


def run_by_spans(gm: fx.GraphModule, spans: Sequence[Span], batch: Sequence[Any],
                 seen: Callable[[int, Values], None] = lambda k, live: None) -> Values:
    """Every span of ``gm`` in order on ``batch`` (``seen(k, live)`` after each); what is live
    after the last one."""
    live: Values = {}
    for k in range(len(spans)):
        live = run_span(gm, spans, k, live, batch)
        seen(k, live)
    return live


def block_by_block(search: Search, budget: float, spans: Sequence[Span]
                   ) -> tuple[dict[str, Level], dict[str, Pick], dict[str, Pick]] | None:
    """The search's choice block by block (the module docstring); None when the whole-model
    check still fails after the shares shrank (the caller's whole-model strategy decides)."""
    try:
        return _block_by_block(search, budget, spans)
    except SpanError as exc:
        search.step("blocks", note=f"whole-model trials instead: {exc}")
        return None


def _block_by_block(search: Search, budget: float, spans: Sequence[Span]
                    ) -> tuple[dict[str, Level], dict[str, Pick], dict[str, Pick]] | None:
    indices = search.fit_indices if search.split == "fit" else sorted({*search.fit_indices, *search.heldout_indices})
    batches = search.ctx.batches
    reference: dict[int, dict[int, list[Any]]] = {b: {} for b in indices}
    for b in indices:
        run_by_spans(search.gm, spans, batches[b],
                     lambda k, live, b=b: reference[b].__setitem__(k, [live[n] for n in spans[k].outputs]))
    blocks = blocks_of(search.gm, spans)
    by_name = {site.name: site for site in search.sites}
    in_blocks = {name for span in spans for name in span.sites}
    rest = [site for site in search.sites if site.name not in in_blocks]
    scale = 1.0
    for attempt in range(SHRINK_ROUNDS + 1):
        choices: dict[str, Level] = {}
        picks: dict[str, Pick] = {}
        refused: dict[str, Pick] = {}
        live: dict[int, Values] = {b: {} for b in indices}
        for k, span in enumerate(spans):
            share = scale * budget * (k + 1) / len(spans)
            runs: dict[frozenset[tuple[str, Level]], tuple[float, dict[int, Values]]] = {}
            held: dict[int, torch.Tensor] = {}  # the block's dequantized weights, for its trials

            def measure(combination: Choices, k: int = k, span: Span = span, share: float = share,
                        runs: dict = runs, start: dict[int, Values] = live, held: dict = held) -> float:
                key = frozenset(combination.items())
                if key not in runs:
                    # The block's own choices, on the block's own nodes: what the others
                    # rewrite lies outside it.
                    trial = search.trial({name: level for name, level in combination.items() if name in span.sites},
                                         runnable=False, of=blocks[k].gm)
                    worst, after = 0.0, {}
                    for b in indices:
                        after[b] = run_block(trial, blocks[k], start[b], batches[b], held)
                        if any(name not in after[b] for name in span.outputs):
                            raise SpanError(f"block {span.key}: a rewrite replaced one of its outputs")
                        comparison = compare_outputs(reference[b][k], [after[b][n] for n in span.outputs])
                        worst = max(worst, math.inf if comparison.mismatch else comparison.max_rel)
                    search.trials += 1
                    search.step("block-trial", block=span.key, choices=dict(combination), error=worst, target=share)
                    runs[key] = (worst, after)
                return runs[key][0]

            where = f"block {span.key}'s output error"
            choices = _take(search, [by_name[n] for n in span.sites], choices, measure, share, picks, refused, where)
            measure(choices)
            live = runs[frozenset(choices.items())][1]
            # the block's trials and dequantized weights go, and their memory back to the system,
            # before the next block's are made (a large model's blocks are tens of MB each)
            del measure, runs, held
            release_freed_memory()
            progress(k + 1, len(spans), "blocks")
        choices = _take(search, rest, choices, search.error, budget, picks, refused, "the output error")
        final = search.error(choices)
        search.step("blocks", attempt=attempt, chosen=len(choices), refused=len(refused), error=final, target=budget)
        if final <= budget:
            return choices, picks, refused
        scale *= 0.9 * budget / final if math.isfinite(final) and final > 0 else 0.5
    return None


def _take(search: Search, sites: Sequence[Site], base: dict[str, Level], measure: Callable[[Choices], float],
          target: float, picks: dict[str, Pick], refused: dict[str, Pick], where: str) -> dict[str, Level]:
    """``base`` with the longest prefix of ``sites`` (ranked by saving per estimated error,
    each at its most aggressive level) within ``target``, round after round: the site after
    each round's prefix is refused, with ``where`` naming what its error is of."""
    def efficiency(site: Site) -> float:
        return site.saving(site.levels[-1]) / max(search.estimate(site), 1e-12)

    open_ = sorted(sites, key=efficiency, reverse=True)
    taken = dict(base)

    def with_(count: int) -> dict[str, Level]:
        return {**taken, **{site.name: site.levels[-1] for site in open_[:count]}}

    while open_:
        if measure(with_(len(open_))) <= target:
            fits = len(open_)
        elif measure(taken) > target:  # the sites changed before already use this share
            every, before = measure(with_(len(open_))), measure(taken)
            for site in open_:
                refused[site.name] = Pick(None, every, site.levels[-1], target, others=len(taken) + len(open_) - 1,
                                          others_error=before, reason=(
                    f"{_BLOCKWISE}: the {len(taken)} layer(s) changed before it already bring {where} to "
                    f"{before:.3g} > {target:.3g}"))
            return taken
        else:
            fits, fails = 0, len(open_)
            while fails - fits > 1:
                middle = (fits + fails) // 2
                fits, fails = (middle, fails) if measure(with_(middle)) <= target else (fits, middle)
        chosen = with_(fits)
        error = measure(chosen)
        picks.update({site.name: Pick(site.levels[-1], error, target=target, others=len(chosen) - 1)
                      for site in open_[:fits]})
        if fits < len(open_):
            culprit = open_[fits]
            refused[culprit.name] = _refusal(culprit, measure(chosen | {culprit.name: culprit.levels[-1]}), target,
                                             chosen, error, where)
        taken, open_ = chosen, open_[fits + 1:]
    return taken


def _refusal(site: Site, error: float, target: float, others: Mapping[str, Level], others_error: float,
             where: str) -> Pick:
    reason = f"{_BLOCKWISE}: with {len(others)} other layer(s) changed, it raises {where} to {error:.3g} > {target:.3g}"
    return Pick(None, error, site.levels[-1], target, others=len(others), others_error=others_error, reason=reason)
