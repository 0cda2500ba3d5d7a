"""Hostile text made visible: the one escaping of invisible characters for every output.

A name (a registered model, a class in ``classes.txt``, a group, a run, a URI) is
data from someone else. Printed raw, a right-to-left override (U+202E) reorders what
follows it on the screen (``toy\\u202egpj.exe`` shows as ``toyexe.jpg``), a zero-width
character hides a difference, a carriage return or an escape sequence rewrites a
terminal line. :func:`visible` writes each such character as its escape
(``\\u202e``, ``\\x1b``), so the reader sees that it is there and what it is. It is
used by ``report.html``, ``report.md`` (:mod:`audit.report`; Jinja2's autoescaping
covers HTML syntax, not these) and the audit job's console lines (:mod:`audit.gate.job`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["visible"]


def visible(text: Any, keep: str = "") -> str:
    """``text`` with every character that :meth:`str.isprintable` rejects written as its escape.

    Escaped: C0 and C1 controls and DEL (``\\x1b``, ``\\r``, ``\\x85``), bidirectional
    marks, embeddings, overrides and isolates (U+061C, U+200E, U+200F, U+202A..U+202E,
    U+2066..U+2069), zero-width and other format characters (U+200B..U+200D, U+2060,
    U+FEFF), line and paragraph separators (U+2028, U+2029), separators other than the
    ASCII space (U+00A0), surrogates, private-use and unassigned code points. An
    escape is ``\\xNN`` below U+0100, ``\\uNNNN`` below U+10000, else ``\\UNNNNNNNN``
    (as Python's ``repr``). Characters in ``keep`` (e.g. ``"\\n\\t"`` for a block of
    text) stay as they are.

    Args:
        text: any value; it is converted with :func:`str`.
        keep: characters left as they are although not printable.

    Returns:
        The text with the same printable characters, each other one escaped.
    """
    s = str(text)
    if s.isprintable():  # the common case, in C: no copy
        return s
    return "".join(ch if ch.isprintable() or ch in keep else _escape(ch) for ch in s)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
