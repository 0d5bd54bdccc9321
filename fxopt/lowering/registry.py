"""The lowering registry: lowerings are found through the ``fxopt.lowerings`` entry-point group.

Built-in lowerings and third-party plugins take the same path; the core names none of them.
Entry points are read and loaded on the first lookup, not at import. An entry point names a
:class:`~fxopt.lowering.base.Lowering` subclass (instantiated without arguments) or an
instance. :func:`registered_lowering` adds one for the duration of a ``with`` block
(:mod:`fxopt.registrations`, as every registry does).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

from fxopt import ordering
from fxopt.lowering.base import Lowering
from fxopt.registrations import Registrations

ENTRY_POINT_GROUP = "fxopt.lowerings"

_REGISTRATIONS: Registrations[Lowering] = Registrations("lowerings")


def refresh() -> None:
    """Forget the loaded entry points (after installing a plugin at run time)."""
    _REGISTRATIONS.current().discovered = None


def _discovered() -> dict[str, Lowering]:
    state = _REGISTRATIONS.current()
    # Read again when sys.path changed: a plugin put on the path (or taken off) is seen
    # without a refresh() call.
    if state.discovered is None or state.discovered_for != tuple(sys.path):
        found: dict[str, Lowering] = {}
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            found[entry.name] = _instance(entry.load(), f"entry point {entry.name!r} ({entry.value})")
            if found[entry.name].name != entry.name:
                raise ValueError(f"entry point {entry.name!r} loads a lowering named {found[entry.name].name!r}")
        state.discovered, state.discovered_for = found, tuple(sys.path)
    return state.discovered


def _instance(value: Any, what: str) -> Lowering:
    if isinstance(value, type) and issubclass(value, Lowering):
        value = value()
    if not isinstance(value, Lowering):
        raise TypeError(f"{what} is not a fxopt Lowering (subclass or instance): {value!r}")
    if not value.name or value.name != value.name.lower() or " " in value.name:
        raise ValueError(f"{what}: lowering name must be kebab-case, got {value.name!r}")
    if hasattr(value, "order"):
        raise ValueError(f"{what}: lowering {value.name!r} sets 'order', which fxopt no longer reads; "
                         "name the lowerings it runs after/before instead (after = (...), before = (...))")
    return value


def lowerings() -> list[Lowering]:
    """Every registered lowering, in the order backends run them: their ``after``/``before``
    declarations, then the name (:func:`fxopt.ordering.topological_order`).

    A lowering registered with :func:`registered_lowering` replaces an entry point of the
    same name while its scope lasts.
    """
    _discovered()
    by_name = _REGISTRATIONS.current().merged()
    return ordering.topological_order(by_name.values(), "lowerings")


def get_lowering(name: str) -> Lowering:
    """A registered lowering by name."""
    for lowering in lowerings():
        if lowering.name == name:
            return lowering
    names = ", ".join(lowering.name for lowering in lowerings()) or "none"
    raise KeyError(f"no lowering named {name!r} (registered: {names})")


@contextlib.contextmanager
def registered_lowering(lowering: Lowering | type[Lowering]) -> Iterator[Lowering]:
    """Register ``lowering`` (a subclass or an instance) until the block ends::

        with fxopt.lowering.registered_lowering(MyLowering):
            opt = fxopt.compile(model, inputs)
    """
    instance = _instance(lowering, f"{lowering!r}")
    with _REGISTRATIONS.registered({instance.name: instance}):
        yield instance
