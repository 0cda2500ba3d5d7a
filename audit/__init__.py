"""model-audit: explainability audits for PyTorch image classifiers.

``from audit import run_audit, AuditResult`` (loaded on first use: importing
``audit`` alone stays light).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["run_audit", "AuditResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("run_audit", "AuditResult"):
        from audit import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'audit' has no attribute {name!r}")
