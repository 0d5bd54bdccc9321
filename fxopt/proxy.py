"""A large model's stand-in for a preset's race: a sample of its blocks, as each candidate left them.

A preset builds each candidate and times the ones within its budget side by side. On a model
whose weights exceed the compile's memory bound, each built candidate holds a copy of the
weights of its own, packed for its kernels (a 1.1B Llama's two eager int8 candidates, built
and raced whole, took the compile to twice the model's weights), and each lowering and
verification is a whole model's. What a candidate's passes choose (which layers its budget lets
it quantize) is the whole model's search's to make: on a few blocks alone a budget buys
something else. But how fast what they chose runs is a sum over blocks that are alike: the
repeated blocks of a transformer run the same kernels at the same shapes, so a sample of them,
spread over the depth, runs as the whole does in proportion (as TVM tunes one task for each
distinct subgraph, not each occurrence).

So each candidate's passes up to its search run on the whole model (its stage is verified
there, its error is the whole model's), every candidate's before any stand-in is made (a
stand-in held while the next candidate searches would add to that search's evidence, at the
top of the compile; candidates' quantized weights are one copy, :mod:`fxopt.ir.derived`).
Then each stage's graph is cut to :data:`STAND_IN_BLOCKS` of its blocks, the exact passes after its search run on that cut alone (:func:`split_exact_tail`),
and only that is lowered; the stand-ins race, and only the fastest stage is lowered whole
(:func:`fxopt.presets.choose`), its exact passes run then.

    the cut   the stage's graph with blocks left out: the first two blocks stay (the first
              computes the model's preamble, its masks and rotary tables), then blocks spread
              evenly to the last. A block after a left-out one reads, in place of its values,
              those of the last block kept before it: the blocks' values live after them (the
              residual stream) must match in number, shapes and dtypes, else there is no cut.
              The stand-in computes nothing the model computes; it runs what it runs.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from fxopt.ir import copy_graph_module, remove_unused_constants
from fxopt.lossy.blocks import Span, find_spans

if TYPE_CHECKING:
    from fxopt.pass_api import Pass
    from fxopt.presets import Proxy
    from fxopt.session import Session

# Blocks a stand-in keeps: the first two and two more, spread over the depth (the last among them).
STAND_IN_BLOCKS = 4
# A stand-in is worth its lowering only where it leaves out most of the model.
MIN_BLOCKS = 2 * STAND_IN_BLOCKS


def kept_blocks(blocks: int, keep: int = STAND_IN_BLOCKS) -> list[int]:
    """Which of ``blocks`` blocks a stand-in keeps: 0, 1, then ``keep - 2`` more evenly spread
    up to the last."""
    rest = keep - 2
    return [0, 1] + [round(1 + (i + 1) * (blocks - 2) / rest) for i in range(rest)]


def stand_ins(session: Session, device: str | torch.device | None, pipeline_of: Callable[[Any], list[Pass]],
              still_to_build: list[list[Pass]]) -> Proxy | None:
    """A large model's stand-ins for its preset's race (:func:`fxopt.presets.choose`), or None
    where its graph has no cut: each candidate's passes run on the model, their stage is kept
    for the candidate's whole lowering (``still_to_build``: the pipelines of the candidates
    after it, which the preset keeps up to date), and a sample of its blocks is lowered."""
    from fxopt import presets
    from fxopt.session import Session, Stage

    if stand_in(session.captured.gm) is None:
        return None
    ran: list[list[Pass]] = []

    def search(candidate: presets.Candidate) -> Stage:
        searched, _ = split_exact_tail(pipeline_of(candidate))
        stage = session.run(searched, share_prefix=True)
        if searched not in ran:
            ran.append(searched)
        session.keep_stages_for(still_to_build, ran=ran)  # its stage whole, not its prefixes
        return stage

    def build(candidate: presets.Candidate) -> Any:
        pipeline = pipeline_of(candidate)
        stage, (_, tail) = search(candidate), split_exact_tail(pipeline)
        cut = stand_in(stage.gm)
        if cut is None:  # its blocks no longer alike: the candidates are built whole
            raise presets.NoStandIn(candidate)
        graph, records = cut[0], list(stage.records)
        if tail:  # the exact passes after its search run on the stand-in alone, checked against it
            # the model's memory bound, not the stand-in's: its passes choose as on the model
            options = dataclasses.replace(session.options,
                                          memory_bound=session.evidence.values_bound(session.captured.gm))
            on_cut = Session.from_graph(graph, session.captured.batches, copy.deepcopy(session.captured.report),
                                        options=options)
            after = on_cut.run(tail)
            graph, records = after.gm, records + after.records
        module = session.lower(Stage(graph, records), candidate.backend, device, pipeline)
        module.report.notes.append(f"a stand-in: {cut[1]}")
        if stage.verification is not None:  # the model's error, not the stand-in's
            module.report.final_max_abs_err, module.report.final_max_rel_err = \
                stage.verification.fork().final_error(stage.gm)
        return module

    def drop(candidate: presets.Candidate) -> None:
        searched, _ = split_exact_tail(pipeline_of(candidate))
        if searched in ran:
            ran.remove(searched)
        session.keep_stages_for(still_to_build, ran=ran)

    return presets.Proxy(build, drop, search)


def split_exact_tail(pipeline: list[Pass]) -> tuple[list[Pass], list[Pass]]:
    """``pipeline`` up to its last lossy pass, and the exact passes after it. A candidate's
    stage is kept for its whole lowering up to its search: the exact passes after it (the int8
    preset's merge-siblings, whose float merged siblings are new weights) run on its stand-in
    while the candidates race, and on the whole model only for the one lowered whole."""
    last = max((i for i, p in enumerate(pipeline) if not p.exact), default=-1)
    return list(pipeline[:last + 1]), list(pipeline[last + 1:])


def stand_in(gm: fx.GraphModule) -> tuple[fx.GraphModule, str] | None:
    """A copy of ``gm`` (sharing its constants) that runs a sample of its blocks (the module
    docstring), and what it keeps, for the report; None where there is no such cut."""
    spans = find_spans(gm, ())
    if spans is None or len(spans) < MIN_BLOCKS:
        return None
    kept = kept_blocks(len(spans))
    cut = copy_graph_module(gm)
    nodes = list(cut.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    by_name = {node.name: node for node in nodes}
    previous = 1
    for k in range(2, len(spans)):
        if k in kept:
            previous = k
            continue
        left, instead = _outputs(spans[k], by_name), _outputs(spans[previous], by_name)
        if len(left) != len(instead) or not all(map(_alike, left, instead)):
            return None
        end = position[by_name[spans[k].last]]
        for node, replacement in zip(left, instead):
            node.replace_all_uses_with(replacement, delete_user_cb=lambda user, end=end: position[user] > end)
    # The left-out blocks' nodes go, those torch.fx keeps as impure too (attention, which may
    # draw dropout masks): the stand-in does not run those blocks.
    left_out = {node for k, span in enumerate(spans) if k not in kept
                for node in nodes[position[by_name[spans[k - 1].last]] + 1:position[by_name[span.last]] + 1]}
    for node in reversed(nodes):
        if node in left_out and not node.users and node.op.startswith("call"):
            cut.graph.erase_node(node)
    cut.graph.eliminate_dead_code()
    if any(node in left_out for node in cut.graph.nodes if node.op.startswith("call")):
        return None  # one of them is still read
    remove_unused_constants(cut)
    cut.delete_all_unused_submodules()
    cut.recompile()
    return cut, f"blocks {', '.join(map(str, kept))} of {len(spans)}"


def _outputs(span: Span, by_name: dict[str, fx.Node]) -> list[fx.Node]:
    return [by_name[name] for name in span.outputs]


def _alike(a: fx.Node, b: fx.Node) -> bool:
    """Values of the same shape and dtype (where known)."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    if hasattr(va, "shape") and hasattr(vb, "shape"):
        return tuple(va.shape) == tuple(vb.shape) and va.dtype == vb.dtype
    return va is None and vb is None
