"""The evidence store: everything one compilation measured, owned in one place.

A :class:`fxopt.session.Session` makes one :class:`Evidence` per compilation; the pass
manager's :class:`~fxopt.pipeline.verification.Verification` decides *what* to run and
writes what it ran here; passes read it through their read-only
:class:`~fxopt.PassContext` (``ctx.reference``, ``ctx.values``, ``ctx.evidence``):

* ``reference``: the current graph's outputs on every full batch (``ctx.batches``), once
  computed; ``slice_reference`` the same on the row slices exact passes are verified on;
* ``original`` / ``slice_original``: the captured graph's outputs on the same;
* ``values``: a :class:`fxopt.verify.ReusingRunner` holding the current graph's node values
  on the batches a lossy pass may observe (kept within :meth:`Evidence.values_bound`);
* ``runs``: outputs of the captured graph computed before the pipeline (the fresh-input
  check), taken as references instead of running again;
* ``base_outputs`` / ``base_drift``: the full outputs of the graph the first lossy pass
  started from and that graph's drift from the captured one (see verification);
* ``timings``: the kernel-timing measurements, when the session holds a timing cache.

Nothing here runs a graph. :meth:`fork` gives a preset's next candidate its own store that
shares what was measured so far (never written in place) and diverges from there.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import Any

from fxopt.cost import graph_cost

# The memory the node values kept for a lossy pass (the reference's on the batches it observes,
# the search's last trials) may take: as much as keeps them and the graph's weights within
# KEPT_VALUES_BYTES together, or KEPT_VALUES_SHARE of the weights, whichever is more. A small
# model keeps its values (a transformer's at batch 8 x 128 are several times its weights, and
# reusing them makes its search's trials cheap); a large one's compile peaks at the model,
# what the passes make and a small share on top: past the bound a run keeps no values and
# holds only the live ones (fxopt.verify.ReusingRunner), and later calibration batches are
# run without keeping theirs.
KEPT_VALUES_BYTES = 2 * 2**30
KEPT_VALUES_SHARE = 0.05


@dataclass
class Evidence:
    """What one compilation measured; see the module docstring."""

    reference: list[list[Any]] = field(default_factory=list)
    original: list[list[Any]] = field(default_factory=list)
    values: Any = None  # a fxopt.verify.ReusingRunner, or None
    runs: list[tuple[list[Any], list[Any]]] = field(default_factory=list)
    slice_reference: list[list[Any]] | None = None
    slice_original: list[list[Any]] | None = None
    full_current: bool = False  # ``reference`` is the current graph's
    lossy_applied: bool = False
    base_outputs: list[list[Any]] | None = None
    base_drift: tuple[float, float] = (0.0, 0.0)
    memory_bound: int | None = None  # bytes; None: ``values_bound`` derives it from the graph
    timings: Any = None  # the session's kernel-timing cache, when it has one
    # The captured graph's full outputs and any graph's whose full outputs were computed, by
    # graph id (the graph held weakly: a candidate's graph, and its quantized weights, go when
    # its pipeline lets it go): shared by forks, never written in place.
    captured_outputs: dict[str, list[list[Any]]] = field(default_factory=dict)
    full_outputs: dict[int, tuple[weakref.ref, list[list[Any]]]] = field(default_factory=dict)

    def fork(self) -> Evidence:
        """An independent store that starts from what this one knows (a preset's candidates
        continue from one graph); the shared measurements are never written in place."""
        twin = copy.copy(self)
        twin.values = None  # node values belong to one pipeline's lossy pass
        return twin

    def take_runs(self) -> list[tuple[list[Any], list[Any]]]:
        """The pre-pipeline runs, removed from the store: they are the captured graph's, and
        no later graph may take them for its own."""
        runs, self.runs = self.runs, []
        return runs

    def known_outputs(self, gm: Any) -> list[list[Any]] | None:
        """``gm``'s full outputs, where they were computed."""
        known = self.full_outputs.get(id(gm))
        return known[1] if known is not None and known[0]() is gm else None

    def know_outputs(self, gm: Any, outputs: list[list[Any]]) -> None:
        for key in [key for key, (graph, _) in self.full_outputs.items() if graph() is None]:
            del self.full_outputs[key]  # a graph let go: its id may be another's now
        self.full_outputs[id(gm)] = (weakref.ref(gm), outputs)

    def values_bound(self, gm: Any) -> int:
        """The bytes of node values this store may keep while a lossy pass runs on ``gm``."""
        if self.memory_bound is not None:
            return self.memory_bound
        return _bound_for(graph_cost(gm).weight_bytes)

    def past_memory_bound(self, gm: Any) -> bool:
        """Whether ``gm``'s weights alone exceed :meth:`values_bound`: a large model, whose
        compile makes no copy of its weights that it can do without (a preset's candidates race
        on stand-ins, float siblings are not merged into a copy)."""
        weights = graph_cost(gm).weight_bytes  # weighed once, for the bound too
        return weights > (self.memory_bound if self.memory_bound is not None else _bound_for(weights))

    def drop_values(self) -> None:
        """Release the kept node values (a pass changed the graph, or the pipeline ended)."""
        self.values = None


def _bound_for(weights: int) -> int:
    """The default :meth:`Evidence.values_bound` of a graph with ``weights`` bytes of weights."""
    return max(KEPT_VALUES_BYTES - weights, int(KEPT_VALUES_SHARE * weights))
