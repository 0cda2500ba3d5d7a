"""The defaults shipped in ``conf/`` (``audit.conf``): the engine's and the gate's.

Read by the config (:mod:`audit.config` lays a user's config over them) and by the
evidence (:mod:`audit.evidence.attribution`: the curves' steps and baseline), so both
import this module and neither imports the other for it.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

__all__ = ["default_config", "engine_defaults", "engine_steps_and_baseline"]


def default_config() -> dict[str, Any]:
    """The defaults shipped in ``conf/engine/default.yaml`` and ``conf/gate/default.yaml``."""
    import yaml

    root = resources.files("audit.conf")
    return {
        part: yaml.safe_load(root.joinpath(part, "default.yaml").read_text(encoding="utf-8"))
        for part in ("engine", "gate")
    }


@functools.cache
def engine_steps_and_baseline() -> tuple[int, str]:
    """The curves' ``steps`` and ``baseline`` of ``conf/engine/default.yaml``, read once."""
    engine = default_config()["engine"]
    return int(engine["steps"]), str(engine["baseline"])


def engine_defaults() -> dict[str, Any]:
    """The curves' ``steps`` and ``baseline`` of the audit engine (``conf/engine/default.yaml``).

    The defaults of :func:`audit.evidence.attribution.collect` and of the callbacks, so
    that a number means the same in a training run and in an audit run.
    """
    steps, baseline = engine_steps_and_baseline()
    return {"steps": steps, "baseline": baseline}
