"""What a registry holds, and the one way to register something for a ``with`` block.

Every registry (passes, lowerings, backends, presets, tune techniques) keeps its entries in a
:class:`Registrations`: the ones registered at run time by name, and those read from its
entry-point group (cached; ``None`` until read). ``registrations.registered({name: value})``
is a ``with`` block inside which the registry sees those entries too (over an entry point of
the same name); anything registered inside the block, and entry points read inside it, end
with it. The block's state lives in a context variable, so threads and tasks that never
entered it keep seeing the process-wide entries::

    with fxopt.lowering.registered_lowering(MyLowering):   # each registry's own spelling of
        opt = fxopt.compile(model, inputs)                 # Registrations.registered
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Entries(Generic[T]):
    """One registry's entries: ``registered`` at run time, and ``discovered`` from its entry
    points (``None``: not read yet; ``discovered_for`` says what they were read from)."""

    registered: dict[str, T] = field(default_factory=dict)
    discovered: dict[str, Any] | None = None
    discovered_for: Any = None

    def merged(self) -> dict[str, Any]:
        """The discovered entries with the registered ones over them."""
        return {**(self.discovered or {}), **self.registered}


class Registrations(Generic[T]):
    """A registry's :class:`Entries`, process-wide, or those of the innermost ``with
    registered(...)`` block the current thread or task is in."""

    def __init__(self, registry: str) -> None:
        self._process: Entries[T] = Entries()
        self._scoped: ContextVar[Entries[T] | None] = ContextVar(f"fxopt_scoped_{registry}", default=None)

    def current(self) -> Entries[T]:
        return self._scoped.get() or self._process

    @contextmanager
    def registered(self, entries: Mapping[str, T]) -> Iterator[Entries[T]]:
        """``entries`` (name -> value) registered until the block ends, with whatever else is
        registered or read from entry points inside it."""
        outer = self.current()
        token = self._scoped.set(Entries({**outer.registered, **entries}, outer.discovered, outer.discovered_for))
        try:
            yield self.current()
        finally:
            self._scoped.reset(token)
