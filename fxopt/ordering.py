"""The one ordering scheme: things that run in sequence declare names, not numbers.

Passes, lowerings and tune techniques each have a ``name`` and may declare ``after`` (the
names of those it must run after) and ``before`` (those it must run before). A name not
among the things being ordered constrains nothing. :func:`topological_order` is the order
every registry uses: each runs after what it must, and among those free to run, the name
decides, so the order is stable and does not depend on how things were found.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any, TypeVar

from fxopt.errors import FxoptError

T = TypeVar("T")


class OrderError(FxoptError, ValueError):
    """The ``after``/``before`` declarations form a cycle, so no order satisfies them all."""


def predecessors(items: Iterable[Any]) -> dict[str, set[str]]:
    """Each item's name -> the names of the items it must run after: those its ``after``
    names, and those whose ``before`` names it (among ``items``)."""
    items = list(items)
    names = {item.name for item in items}
    waiting_on: dict[str, set[str]] = {item.name: set() for item in items}
    for item in items:
        waiting_on[item.name].update(a for a in getattr(item, "after", ()) if a in names and a != item.name)
        for follower in getattr(item, "before", ()):
            if follower in names and follower != item.name:
                waiting_on[follower].add(item.name)
    return waiting_on


def topological_order(items: Iterable[T], what: str = "passes") -> list[T]:
    """``items`` ordered so each runs after those it must (see :func:`predecessors`); among
    the ones free to run, the name decides.

    Raises :class:`OrderError` naming a cycle (``what`` says what is ordered, for the message).
    """
    by_name = {item.name: item for item in items}  # type: ignore[attr-defined]
    waiting_on = predecessors(by_name.values())
    unblocks: dict[str, list[str]] = {name: [] for name in by_name}
    for name, before_it in waiting_on.items():
        for predecessor in before_it:
            unblocks[predecessor].append(name)
    ready = [name for name, before_it in waiting_on.items() if not before_it]
    heapq.heapify(ready)
    ordered: list[T] = []
    while ready:
        name = heapq.heappop(ready)
        ordered.append(by_name[name])
        for follower in unblocks[name]:
            waiting_on[follower].discard(name)
            if not waiting_on[follower]:
                heapq.heappush(ready, follower)
    if len(ordered) < len(by_name):
        stuck = {name: before_it for name, before_it in waiting_on.items() if before_it}
        raise OrderError(f"the {what}' 'after'/'before' declarations form a cycle: {_cycle(stuck)}")
    return ordered


def _cycle(waiting_on: dict[str, set[str]]) -> str:
    """One cycle among the items a topological sort could not place, as ``a -> b -> a``
    (read: a runs after b, which runs after a)."""
    path = [min(waiting_on)]
    while path.count(path[-1]) < 2:
        path.append(min(waiting_on[path[-1]]))
    start = path.index(path[-1])
    return " -> ".join(path[start:])
