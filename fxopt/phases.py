"""Compile phases: exclusive wall time and memory per phase of one compile (capture, passes,
lowering...), and the progress of the step running now.

A leaf module: code at every layer (capture, checks, backends, the lossy search) marks its
phase with :func:`phase` and reports progress with :func:`progress`, so it must import
nothing of fxopt's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# Compile phases, in the order they first run. Passes are timed as "pass:<name>"; work
# outside any named phase is "other".
PHASES = ("capture", "canonicalize", "reference", "passes", "shapes", "verify", "lowering", "parity")

_ACTIVE: ContextVar[PhaseTimer | None] = ContextVar("fxopt_phase_timer", default=None)
Listener = Callable[[int, int, str], None]
_LISTENER: ContextVar[Listener | None] = ContextVar("fxopt_progress_listener", default=None)


def resident_bytes() -> tuple[int, int] | None:
    """The process's resident set and its high-water mark (``VmRSS``, ``VmHWM``), in bytes;
    None where ``/proc/self/status`` does not exist (not Linux)."""
    try:
        with open("/proc/self/status", "rb") as status:
            text = status.read()
        values = []
        for key in (b"VmRSS:", b"VmHWM:"):
            start = text.index(key) + len(key)
            values.append(int(text[start:text.index(b"kB", start)]) * 1024)
        return values[0], values[1]
    except (OSError, ValueError):
        return None


class PhaseTimer:
    """Exclusive wall time and memory per phase of one compile.

    Phases nest (verification inside a pass's step, say): entering one pauses the one
    around it, so every second is counted once and the phases sum to the total. Code deep in
    the pipeline marks its phase with :func:`phase` without being handed the timer.

    Memory is charged the same way, from the process's resident set (Linux): ``peak_bytes``
    is how far each phase raised the process's peak RSS (they sum to the compile's peak
    growth: the phase with the largest share is where the peak was made), ``net_bytes`` the
    RSS each phase left behind (negative when it freed more than it kept).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self.net_bytes: dict[str, int] = {}
        self._stack: list[str] = []
        self._mark = 0.0
        self._memory: tuple[int, int] | None = None
        self._start = 0.0
        self.total = 0.0

    def _charge(self) -> None:
        now = time.perf_counter()
        memory = resident_bytes() if self._memory is not None else None
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
            if memory is not None and self._memory is not None:
                self.net_bytes[name] = self.net_bytes.get(name, 0) + memory[0] - self._memory[0]
                # a high-water mark reset by someone else (clear_refs) only ever lowers it
                self.peak_bytes[name] = self.peak_bytes.get(name, 0) + max(0, memory[1] - self._memory[1])
        self._mark = now
        self._memory = memory

    @contextmanager
    def running(self) -> Iterator[PhaseTimer]:
        """Time everything inside the ``with`` block; unnamed work is charged to "other"."""
        token = _ACTIVE.set(self)
        self._start = self._mark = time.perf_counter()
        self._memory = resident_bytes()
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


def progress(done: int, total: int, what: str) -> None:
    """``done`` of ``total`` units of work (``what``: "sites", "blocks"...) of the step running
    now are finished: the pass manager hands it to its instruments' ``progress`` hook (an ETA
    on stderr for a long compile). A no-op when nobody listens."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(done, total, what)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send the :func:`progress` reports made inside the block to ``listener``."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)
