"""The one place that talks to MLflow: URIs, key names, runs."""

from __future__ import annotations

import os
import re

__all__ = ["DEFAULT_TRACKING_URI", "tracking_uri", "metric_key"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: the argument, else ``MLFLOW_TRACKING_URI``, else a local SQLite file.

    Never MLflow's own fallback: a bare ``./mlruns`` file store is refused by MLflow 3.
    """
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def metric_key(*parts: str) -> str:
    """Join ``parts`` with ``/`` into a valid MLflow key (``wolf|snow`` -> ``wolf_snow``)."""
    return "/".join(_BAD_KEY_CHARS.sub("_", p) for p in parts)
