"""The techniques ``fxopt.tune`` chooses among per layer, found through an entry-point group.

A technique is data: a name, a family (what "int8 alone" means), the techniques it applies
``after``/``before`` (names, the passes' scheme, :mod:`fxopt.ordering`: structural rewrites
that rename Linears apply before the per-layer ones), and three functions::

    state = technique.prepare(gm, batches)             # once per tune: statistics, scales
    technique.targets(gm, state) -> {site: levels}     # where it applies, least aggressive first
    technique.apply(gm, {site: level}, state, names)   # rewrite in place

A site is a Linear's node name in the graph tuning starts from, or ``"<first>:hidden"`` for
the hidden units of a Linear -> activation -> Linear block. ``names`` maps each Linear of
that graph to its node now (an earlier technique may have replaced it); ``apply`` updates it for
the Linears it replaces. The built-in catalogue sits beside the passes and calls their own
rewrite functions; the core names none of them (``fxopt.techniques`` entry points).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch
import torch.fx as fx

from fxopt import ordering
from fxopt.errors import InputError
from fxopt.registrations import Registrations

ENTRY_POINT_GROUP = "fxopt.techniques"
HIDDEN = ":hidden"  # suffix of a block site: the hidden units after this Linear

Targets = Callable[[fx.GraphModule, Any], dict[str, tuple[Hashable, ...]]]
Apply = Callable[[fx.GraphModule, Mapping[str, Hashable], Any, dict[str, str]], None]
Prepare = Callable[[fx.GraphModule, list[list[torch.Tensor]]], Any]


@dataclass(frozen=True)
class Technique:
    """One way to change a site, at one of a few levels (ranks, widths, or a single ``True``)."""

    name: str
    family: str
    targets: Targets
    apply: Apply
    prepare: Prepare = lambda gm, batches: None
    description: str = ""
    after: tuple[str, ...] = ()  # techniques whose choices apply before this one's
    before: tuple[str, ...] = ()  # techniques whose choices apply after this one's

    def __post_init__(self) -> None:
        for field_name in ("targets", "apply", "prepare"):
            if not callable(getattr(self, field_name)):
                raise TypeError(f"technique {self.name!r}: {field_name} must be a function, got "
                                f"{getattr(self, field_name)!r} (a stage number? techniques order "
                                "themselves with after=/before= names)")

    def label(self, level: Hashable) -> str:
        """How one option reads in the log: ``int8-dynamic``, ``low-rank(64)``."""
        return self.name if level is True else f"{self.name}({level})"


_REGISTRATIONS: Registrations[Technique] = Registrations("techniques")


def _load() -> dict[str, Technique]:
    state = _REGISTRATIONS.current()
    if state.discovered is None:
        found: dict[str, Technique] = {}
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            value = entry.load()
            for technique in value if isinstance(value, (list, tuple)) else [value]:
                found.setdefault(technique.name, technique)
        state.discovered = found
    return state.merged()


def list_techniques() -> list[Technique]:
    """Every registered technique, in the order their choices apply (:func:`ordered`)."""
    return ordered(_load().values())


def ordered(techniques: Iterable[Technique]) -> list[Technique]:
    """``techniques`` in the order their choices apply: their ``after``/``before``
    declarations (through every registered technique), then the name."""
    chosen = {t.name: t for t in techniques}
    return [t for t in ordering.topological_order({**_load(), **chosen}.values(), "techniques") if t.name in chosen]


def select_techniques(names: Any = None) -> list[Technique]:
    """The techniques called ``names`` (technique or family names; None: all), in order."""
    known = list_techniques()
    if names is None:
        return known
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    chosen: list[Technique] = []
    for name in names:
        matching = [t for t in known if name in (t.name, t.family)]
        if not matching:
            raise InputError(f"unknown technique {name!r} (available: "
                             f"{', '.join(sorted({t.name for t in known} | {t.family for t in known}))})")
        chosen.extend(t for t in matching if t not in chosen)
    if not chosen:
        raise InputError("techniques must name at least one technique")
    return ordered(chosen)


@contextmanager
def registered_technique(technique: Technique) -> Iterator[Technique]:
    """Register ``technique`` for the length of a ``with`` block (tests, experiments)."""
    with _REGISTRATIONS.registered({technique.name: technique}):
        yield technique
