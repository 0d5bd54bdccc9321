"""Compile phases: exclusive wall time per phase of one compile (capture, passes, lowering...).

A leaf module: code at every layer (capture, checks, backends) marks its phase with
:func:`phase`, so it must import nothing of fxopt's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# Compile phases, in the order they first run. Passes are timed as "pass:<name>"; work
# outside any named phase is "other".
PHASES = ("capture", "canonicalize", "reference", "passes", "shapes", "verify", "lowering", "parity")

_ACTIVE: ContextVar[PhaseTimer | None] = ContextVar("fxopt_phase_timer", default=None)


class PhaseTimer:
    """Exclusive wall time per phase of one compile.

    Phases nest (verification inside a pass's step, say): entering one pauses the one
    around it, so every second is counted once and the phases sum to the total. Code deep in
    the pipeline marks its phase with :func:`phase` without being handed the timer.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._mark = 0.0
        self._start = 0.0
        self.total = 0.0

    def _charge(self) -> None:
        now = time.perf_counter()
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
        self._mark = now

    @contextmanager
    def running(self) -> Iterator[PhaseTimer]:
        """Time everything inside the ``with`` block; unnamed work is charged to "other"."""
        token = _ACTIVE.set(self)
        self._start = self._mark = time.perf_counter()
        self._stack = ["other"]
        try:
            yield self
        finally:
            self._charge()
            self._stack = []
            self.total = time.perf_counter() - self._start
            _ACTIVE.reset(token)

    def enter(self, name: str) -> None:
        self._charge()
        self._stack.append(name)

    def exit(self) -> None:
        self._charge()
        self._stack.pop()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the time inside the block to ``name`` in the compile being timed (no-op when
    nothing is timed: a pass manager run on its own, a test)."""
    timer = _ACTIVE.get()
    if timer is None:
        yield
        return
    timer.enter(name)
    try:
        yield
    finally:
        timer.exit()


def current_timer() -> PhaseTimer | None:
    """The timer of the compile in progress, if any."""
    return _ACTIVE.get()
