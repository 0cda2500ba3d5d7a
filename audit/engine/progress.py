"""Progress lines from inside long loops, with the time left: ``reporting(say)`` and ``task(...)``.

The audit job's stages (behaviour, maps, curves, sanity, counterfactuals) run loops
that take from a fraction of a second to many minutes. Each loop opens a
:func:`task` with its total (probes, forward passes) and advances it per chunk; while
a :func:`reporting` block is active in the same thread (the audit job opens one around
:func:`audit.pipeline.run_audit` with its ``progress`` function), a task prints a line at
most every ``every`` seconds::

    [model-audit]   curves (deletion, lerf; zero): 9,728/23,552 forwards (41%), 6 s, ~9 s left

and, when it ran longer than ``every``, one line when done. Outside a reporting
block (a training callback, a library call) a task costs one context-variable read and
prints nothing. The estimate is linear in the units done, which fits loops of equal
chunks (every unit of one task is the same kind of work).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["EVERY_S", "Task", "reporting", "task"]

#: seconds between two lines of one task
EVERY_S = 5.0

_REPORTER: ContextVar[tuple[Callable[[str], None], float] | None] = ContextVar(
    "model_audit_progress", default=None
)


@contextmanager
def reporting(say: Callable[[str], None], every: float | None = None) -> Iterator[None]:
    """Within this block, tasks in this thread report through ``say`` (at most every ``every`` s,
    default :data:`EVERY_S`)."""
    token = _REPORTER.set((say, float(EVERY_S if every is None else every)))
    try:
        yield
    finally:
        _REPORTER.reset(token)


class Task:
    """Units done of a known total; see the module docstring. Made by :func:`task`."""

    __slots__ = ("label", "total", "unit", "done", "_say", "_every", "_start", "_last")

    def __init__(
        self, label: str, total: int, unit: str, say: Callable[[str], None] | None, every: float
    ) -> None:
        self.label, self.total, self.unit = label, max(0, int(total)), unit
        self.done = 0
        self._say, self._every = say, every
        self._start = self._last = time.perf_counter()

    def advance(self, units: int = 1) -> None:
        """``units`` more done; prints a line when ``every`` seconds passed since the last."""
        self.done += units
        if self._say is None:
            return
        now = time.perf_counter()
        if now - self._last < self._every or self.done >= self.total:
            return
        self._last = now
        elapsed = now - self._start
        left = elapsed * (self.total - self.done) / max(self.done, 1)
        self._say(
            f"  {self.label}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%), "
            f"{elapsed:.0f} s, ~{left:.0f} s left"
        )

    def close(self) -> None:
        """One closing line when the task took longer than ``every``."""
        if self._say is None:
            return
        elapsed = time.perf_counter() - self._start
        if elapsed >= self._every:
            self._say(f"  {self.label}: {self.done:,} {self.unit} in {elapsed:.0f} s")
        self._say = None

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def task(label: str, total: int, unit: str = "probes") -> Task:
    """A :class:`Task` that reports through the active :func:`reporting` block (silent outside one)."""
    reporter = _REPORTER.get()
    say, every = reporter if reporter is not None else (None, EVERY_S)
    return Task(label, total, unit, say, every)
