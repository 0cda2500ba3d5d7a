"""One module per kind of evidence: ``measure`` a model on probes -> raw numbers.

Each module is named as the rule in :mod:`audit.rules` that judges its numbers.

The built-in kinds (:data:`BUILTIN_KINDS`) are measured by :func:`audit.pipeline.run_audit`
and judged by :func:`audit.rules.combine.decide` in code. A new kind is registered here
with :func:`register_kind` (one line, usually at the end of its evidence module):
``run_audit`` then measures it after the built-in ones and stores its raw numbers under
its name, ``decide`` adds its checks (corroborating), and the report shows them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from audit.errors import AuditError

__all__ = [
    "BUILTIN_KINDS",
    "EvidenceKind",
    "KindError",
    "register_kind",
    "unregister_kind",
    "registered_kinds",
    "get_kind",
]

#: The raw keys of the kinds that run_audit measures and decide judges in code.
BUILTIN_KINDS = ("behaviour", "synthesized", "methods", "clusters", "tcav", "dissection")

#: ``measure(model, probes, engine) -> raw | None``: JSON-ready numbers, or None when the
#: kind does not apply to these probes (nothing is stored then).
Measure = Callable[[Any, Any, Mapping[str, Any]], Any]
#: ``judge(raw, gate) -> checks``: :class:`audit.rules.base.Check` objects whose ``kind`` is
#: the kind's name (typed loosely here: this package must not import audit.rules, which
#: imports it).
Judge = Callable[[Any, Mapping[str, Any]], Sequence[Any]]


class KindError(AuditError, ValueError):
    """A kind of evidence that cannot be registered (a taken or built-in name)."""


@dataclass(frozen=True)
class EvidenceKind:
    """A kind of evidence added to the audit without editing the pipeline.

    Attributes:
        name: its raw key in ``report.json``'s ``evidence`` block, and its checks' ``kind``.
        measure: the model and probes -> plain numbers (``json.dumps`` accepts them), or
            None when the kind does not apply to these probes.
        judge: its rule (from ``audit/rules/<name>.py``): raw numbers and the gate
            thresholds -> checks. Without one, the raw numbers are only recorded.
    """

    name: str
    measure: Measure
    judge: Judge | None = None


_KINDS: dict[str, EvidenceKind] = {}


def register_kind(kind: EvidenceKind) -> EvidenceKind:
    """Add ``kind`` to every later audit; returns it.

    Raises:
        KindError: the name is empty, built in, or already registered to another kind.
    """
    if not kind.name or not isinstance(kind.name, str):
        raise KindError(f"evidence kind name {kind.name!r} is not a name: give a non-empty string")
    if kind.name in BUILTIN_KINDS:
        raise KindError(
            f"evidence kind name {kind.name!r} is built in ({', '.join(BUILTIN_KINDS)}): pick another name"
        )
    held = _KINDS.get(kind.name)
    if held is not None and held != kind:
        raise KindError(
            f"evidence kind {kind.name!r} is already registered: unregister_kind({kind.name!r}) first"
        )
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove the kind named ``name`` (nothing when it is not registered)."""
    _KINDS.pop(name, None)


def registered_kinds() -> tuple[EvidenceKind, ...]:
    """The registered extra kinds, in the order they were registered."""
    return tuple(_KINDS.values())


def get_kind(name: str) -> EvidenceKind | None:
    """The registered kind named ``name``, or None."""
    return _KINDS.get(name)
