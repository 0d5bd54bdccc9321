"""A large model's stand-in for a preset's race: the model cut to its first blocks.

A preset builds each candidate and times the ones within its budget side by side. On a model
whose weights exceed the compile's memory bound that is the costly part: each build is a whole
search, a whole verification and a lowering, and each built candidate holds an int8 copy of the
weights of its own (a 1.1B Llama's two eager int8 candidates held together took the compile to
twice the model's weights). The repeated blocks of a transformer are alike, and a candidate's
kernels are chosen per site and shape, the same in every block: the candidates rank on the
model's first blocks as they rank on the whole (as TVM tunes one task for each distinct
subgraph, not each occurrence). So they race on a cut of :data:`PROXY_BLOCKS` blocks (a few
percent of the weights), and the whole model builds the fastest alone, the next only when one
misses the budget there (:func:`fxopt.presets.choose`).

    the cut   the captured graph without the blocks after the first PROXY_BLOCKS: what follows
              the last block (a final norm, a head) reads, in place of the last block's
              values, those of block PROXY_BLOCKS - 1 at the same place in its node sequence.
              The two blocks must run the same ops on values of the same shapes and dtypes;
              where they do not (or there are too few blocks), there is no proxy.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.fx as fx

from fxopt.ir import copy_graph_module, module_path, remove_unused_constants
from fxopt.lossy.blocks import Span, block_key, find_spans

if TYPE_CHECKING:
    from fxopt.session import Session

# Blocks the proxy keeps: the first (where a model's preamble, its masks and rotary tables, is
# computed) and one like every later one.
PROXY_BLOCKS = 2
# A proxy is worth its builds only where it leaves out most of the model.
MIN_BLOCKS = 3 * PROXY_BLOCKS


@dataclass
class Proxy:
    """A session on the cut graph, and what it is (for the report)."""

    session: Session
    what: str


def proxy_session(session: Session) -> Proxy | None:
    """A session on ``session``'s captured graph cut to its first blocks (the module
    docstring), sharing its batches and kernel timings; None where the model has no such cut
    or its budget is a task metric (measured on the whole model's outputs only)."""
    from fxopt.session import Session

    captured = session.captured
    if captured.task is not None:
        return None
    cut = cut_after_blocks(captured.gm, PROXY_BLOCKS)
    if cut is None:
        return None
    gm, blocks = cut
    options = dataclasses.replace(session.options, progress=False, instruments=())
    proxy = Session.from_graph(gm, captured.batches, copy.deepcopy(captured.report), options=options,
                               fresh_batches=captured.fresh_batches)
    proxy.evidence.timings = session.evidence.timings  # one kernel-timing cache for both
    return Proxy(proxy, f"the model's first {PROXY_BLOCKS} of {blocks} blocks")


def cut_after_blocks(gm: fx.GraphModule, count: int) -> tuple[fx.GraphModule, int] | None:
    """A copy of ``gm`` (sharing its constants) without its blocks after the first ``count``,
    and how many blocks ``gm`` has; None where there is no such cut (the module docstring)."""
    spans = find_spans(gm, ())
    if spans is None or len(spans) < max(MIN_BLOCKS, count + 1) or count < 2:
        return None
    cut = copy_graph_module(gm)
    nodes = list(cut.graph.nodes)
    index = {node.name: i for i, node in enumerate(nodes)}
    kept, last = _calls(nodes, index, spans, count - 1), _calls(nodes, index, spans, len(spans) - 1)
    if len(kept) != len(last) or any(not _alike(a, b) for a, b in zip(kept, last)):
        return None
    end = index[spans[-1].last]
    counterpart = dict(zip(last, kept))
    for node in last:
        node.replace_all_uses_with(counterpart[node], delete_user_cb=lambda user: index[user.name] > end)
    # The later blocks' nodes go, those torch.fx keeps as impure too (attention, which may
    # draw dropout masks): the stand-in does not run those blocks.
    dropped = {span.key for span in spans[count:]}
    for node in reversed(list(cut.graph.nodes)):
        if not node.users and node.op.startswith("call") and _key(node) in dropped:
            cut.graph.erase_node(node)
    cut.graph.eliminate_dead_code()
    if any(_key(node) in dropped for node in cut.graph.nodes if node.op.startswith("call")):
        return None  # one of them is still read
    remove_unused_constants(cut)
    cut.delete_all_unused_submodules()
    cut.recompile()
    return cut, len(spans)


def _calls(nodes: list[fx.Node], index: dict[str, int], spans: list[Span], k: int) -> list[fx.Node]:
    """The computing nodes of block ``k``'s span, in order."""
    start = index[spans[k - 1].last] + 1 if k else 0
    return [n for n in nodes[start:index[spans[k].last] + 1] if n.op.startswith("call")]


def _key(node: fx.Node) -> str | None:
    return block_key(module_path(node)) if node.meta.get("nn_module_stack") else None


def _alike(a: fx.Node, b: fx.Node) -> bool:
    """The same op on values of the same shapes and dtypes (where known)."""
    if (a.op, a.target) != (b.op, b.target):
        return False
    va, vb = a.meta.get("val"), b.meta.get("val")
    if hasattr(va, "shape") and hasattr(vb, "shape"):
        return tuple(va.shape) == tuple(vb.shape) and va.dtype == vb.dtype
    return True
