"""The project's one error base and the one "first line of an error" helper.

Every exception that model-audit raises for a user to see derives from :class:`AuditError`;
its ``str()`` is the one line the user reads (the problem and the fix). The commands
(``model-audit``, ``serve``, ``verify``, ``plan``) catch :class:`AuditError` in one place
each and turn it into that line on stderr with exit code :data:`EXIT_ERROR`. Classes keep
the standard-library base their callers catch as well (``class ProbeSetError(AuditError,
ValueError)``), so ``except ValueError`` still works.

This module imports no other audit module, so any module can import it.
"""

from __future__ import annotations

import sys
from typing import ClassVar

__all__ = ["AuditError", "EXIT_ERROR", "first_line", "report", "user_line"]

#: Exit code of every command for bad input, a broken model, an unreachable store or an interruption.
EXIT_ERROR = 2


class AuditError(Exception):
    """Base of every model-audit error a user can see: ``str(err)`` is the user's one line,
    naming the problem and the fix. A command maps it to exit code :data:`EXIT_ERROR`."""

    #: What the line is about, shown before it by :func:`user_line` where the message alone does
    #: not say it (``"bad probe set"`` for a probe set's errors); ``""`` for none.
    topic: ClassVar[str] = ""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of ``str(err)`` (surrounding whitespace removed), at most ``limit`` characters.

    ``""`` when the message is empty: callers that must say something add the type name,
    e.g. ``first_line(err) or type(err).__name__``.
    """
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    return line if limit is None else line[:limit]


def user_line(err: BaseException) -> str:
    """The one line a user reads for ``err``: an :class:`AuditError`'s message after its topic
    (``"bad probe set: row 7: ..."``); any other exception as ``"<type>: <first line>"``."""
    if isinstance(err, AuditError):
        line = first_line(err)
        return f"{err.topic}: {line}" if err.topic else line
    return f"{type(err).__name__}: {first_line(err)}"


def report(prog: str, err: AuditError) -> int:
    """Print ``err`` as ``"<prog>: error: <its one line>"`` on stderr; returns :data:`EXIT_ERROR`."""
    print(f"{prog}: error: {user_line(err)}", file=sys.stderr, flush=True)
    return EXIT_ERROR
