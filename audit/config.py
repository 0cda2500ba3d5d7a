"""The audit's config: the shipped defaults, merging a partial config over them, and validation."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from audit.defaults import default_config
from audit.engine.model import AttributionError
from audit.errors import AuditError
from audit.evidence.attribution import check_names
from audit.methods.registry import METHODS, check_options
from audit.metrics.sanity import MODES as SANITY_MODES

__all__ = [
    "AuditConfigError",
    "BrokenModelError",
    "INT_RANGES",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_text",
    "default_config",
    "merge_config",
    "check_config",
    "value_at",
]

#: The range (inclusive) of every integer key of the engine, stated in the comments of
#: ``conf/engine/default.yaml`` (and so in docs/options.md). The upper bounds are far above what a
#: real audit needs; they keep a typo (``engine.steps=16000000``) from running for days or
#: exhausting memory before anything is checked. Probe counts (``*_probes``, ``tcav.probes``,
#: ``dissection.probes``) are caps: a smaller probe set uses every probe.
INT_RANGES: dict[str, tuple[int, int]] = {
    "engine.steps": (1, 1024),
    "engine.max_batch": (1, 4096),
    "engine.workers": (0, 64),
    "engine.attribution_probes": (1, 65536),
    "engine.sanity_probes": (0, 4096),
    "engine.seed": (0, 2**32 - 1),
    "engine.clusters": (1, 64),
    "engine.synthesized_probes": (0, 65536),
    "engine.tcav.examples": (
        10,
        4096,
    ),  # audit.evidence.concepts.MIN_EXAMPLES: a CAV from fewer images is noise
    "engine.tcav.random_concepts": (2, 500),  # the t-test needs two scores on each side
    "engine.tcav.probes": (1, 65536),
    "engine.dissection.probes": (1, 65536),
    "engine.dissection.show": (0, 256),
    "engine.dissection.actmax_steps": (0, 4096),
    "engine.devices": (1, 1024),
    "engine.num_nodes": (1, 1024),
}


class AuditConfigError(AuditError, ValueError):
    """A bad audit config or an input that does not fit (names the key and the fix)."""


class BrokenModelError(AuditConfigError):
    """The model returns NaN or Inf logits: it is broken, and is never audited or promoted.

    A subclass of :class:`AuditConfigError`, so the job maps it to exit 2 (bad input).
    """


@functools.cache
def _shipped() -> dict[str, Any]:
    """:func:`default_config`, read once (never handed out: callers get their own copy)."""
    return default_config()


def merge_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The defaults with ``config`` (``{"engine": {...}, "gate": {...}}``, partial) laid over them.

    Raises:
        AuditConfigError: an unknown key (a typo must not silently fall back to a default).
    """
    base = default_config()
    if config is None:
        return base
    cfg = _to_dict(config)
    unknown = sorted(set(cfg) - set(base))
    if unknown:
        raise AuditConfigError(
            f"unknown audit config section(s) {unknown}; valid sections are engine and gate"
        )
    for part, over in cfg.items():
        _merge_into(base[part], _to_dict(over or {}), part)
    return base


def _to_dict(obj: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        pass
    if isinstance(obj, Mapping):
        return {k: _to_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


_FREE = {"engine.method_options"}


def _merge_into(base: dict[str, Any], over: Mapping[str, Any], where: str) -> None:
    for key, value in over.items():
        path = f"{where}.{key}"
        if key not in base:
            raise AuditConfigError(
                f"unknown config key {path!r}; valid keys under {where} are {sorted(base)}"
            )
        if isinstance(base[key], dict) and path not in _FREE:
            if not isinstance(value, Mapping):
                raise AuditConfigError(
                    f"{path} must be a mapping with keys {sorted(base[key])}; got {value!r}"
                )
            _merge_into(base[key], value, path)
        else:
            base[key] = _to_dict(value)


# --------------------------------------------------------------------------- the config type-check kit
# One kit for every config key: the engine's and the gate's (check_config below) and the job's own
# (audit.gate.job.check_job_config). Each check names the key, the value received and the fix, and
# raises AuditConfigError; YAML and Hydra overrides give strings where a type was meant
# (promote.tags='false'), so no value is coerced.


def value_at(cfg: Mapping[str, Any], path: str) -> Any:
    """The value at the dotted ``path`` of nested mappings (``"gate.context_gap.fail"``)."""
    node: Any = cfg
    for part in path.split("."):
        node = node[part]
    return node


def check_bool(cfg: Mapping[str, Any], path: str) -> bool:
    """The boolean at ``path``; a string such as ``'false'`` is refused with the unquoted fix."""
    value = value_at(cfg, path)
    if not isinstance(value, bool):
        quoted = isinstance(value, str) and value.strip().lower() in ("true", "false")
        hint = f" (a string: write {path}={value.strip().lower()} without quotes)" if quoted else ""
        raise AuditConfigError(f"{path} must be true or false; got {value!r}{hint}")
    return value


def check_text(cfg: Mapping[str, Any], path: str, *, optional: bool = False) -> str | None:
    """The non-empty string at ``path`` (None too, with ``optional``)."""
    value = value_at(cfg, path)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise AuditConfigError(f"{path} must be a non-empty string; got {value!r}")
    return value


def check_choice(cfg: Mapping[str, Any], path: str, choices: Sequence[Any]) -> Any:
    """The value at ``path`` when it is one of ``choices``."""
    value = value_at(cfg, path)
    if value not in choices:
        raise AuditConfigError(f"{path} must be one of {list(choices)}; got {value!r}")
    return value


def check_number(
    cfg: Mapping[str, Any],
    path: str,
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """The finite number (not a boolean) at ``path`` in ``[low, high]`` (an end open where asked)."""
    node = value_at(cfg, path)
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        raise AuditConfigError(f"{path} must be a number; got {node!r}")
    bad_low = node <= low if open_low else node < low
    bad_high = node >= high if open_high else node > high
    if bad_low or bad_high:
        lo, hi = ("(" if open_low else "["), (")" if open_high else "]")
        raise AuditConfigError(
            f"{path}={node} is out of range: it must lie in {lo}{low}, {high}{hi}; "
            f"set it in conf/gate or on the command line, e.g. {path}=<value in range>"
        )
    return float(node)


def check_int(value: Any, path: str, low: int, high: int, example: Any) -> int:
    """``value`` when it is an integer in ``[low, high]``; else :class:`AuditConfigError` naming
    ``path``, the value, the range and a fix (``path=example``). Booleans are not integers."""
    rng = f"(its range is {low}..{high}; e.g. {path}={example})"
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise AuditConfigError(f"{path} must be an integer >= {low}; got {value!r} {rng}")
    if value > high:
        raise AuditConfigError(f"{path} must be an integer <= {high}; got {value!r} {rng}")
    return value


def _integer(cfg: Mapping[str, Any], path: str) -> int:
    """The engine's integer at ``path``, checked against :data:`INT_RANGES` (the default as the example)."""
    return check_int(
        value_at(cfg, path), path, *INT_RANGES[path], example=value_at(_shipped(), path)
    )


def check_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a merged config (every threshold in range, names known); returns it.

    Raises:
        AuditConfigError: naming the key, the allowed range or names, and the fix.
    """
    engine = cfg["engine"]
    check_number(cfg, "gate.confidence", 0.5, 1.0, open_low=True, open_high=True)
    for part in ("context_gap", "flip_rate"):
        p = check_number(cfg, f"gate.{part}.pass", 0.0, 1.0)
        f = check_number(cfg, f"gate.{part}.fail", 0.0, 1.0, open_low=True)
        if not p < f:
            raise AuditConfigError(
                f"gate.{part}.pass ({p}) must be below gate.{part}.fail ({f}), e.g. pass=0.05 fail=0.15"
            )
    check_number(cfg, "gate.attribution.fail", -1.0, 1.0)
    check_bool(cfg, "gate.attribution.veto")
    check_number(
        cfg, "gate.faithfulness.min_gain", 0.0, 1.0
    )  # below 0, chance (SRG 0 on average) could pass
    check_number(cfg, "gate.faithfulness.min_advantage", -1.0, 1.0)
    check_number(cfg, "gate.sanity.max_similarity", -1.0, 1.0, open_low=True)
    methods = engine["methods"]
    if isinstance(methods, str) or not isinstance(methods, Sequence):
        raise AuditConfigError(
            f"engine.methods must be a list of names, e.g. [gradcam, lrp]; got {methods!r}"
        )
    try:
        check_names(list(methods), ())
    except ValueError as err:
        raise AuditConfigError(f"engine.methods: {err}") from None
    options = engine["method_options"] or {}
    if not isinstance(options, Mapping):
        raise AuditConfigError(
            f"engine.method_options must be a mapping method -> options, e.g. {{gradcam: {{layer: features}}}}; "
            f"got {options!r}"
        )
    extra = sorted(set(options) - set(methods))
    if extra:
        raise AuditConfigError(
            f"engine.method_options has options for {extra}, which are not in engine.methods {list(methods)}"
        )
    for m, opts in options.items():
        if opts is not None and not isinstance(opts, Mapping):
            raise AuditConfigError(
                f"engine.method_options.{m} must be a mapping option -> value, e.g. {{layer: features}}; got {opts!r}"
            )
        try:  # option names are known without a model; bad values are found in run_audit
            check_options(m, METHODS[m], dict(opts or {}))
        except AttributionError as err:
            raise AuditConfigError(f"engine.method_options.{m}: {err}") from None
    _integer(cfg, "engine.steps")
    _integer(cfg, "engine.max_batch")
    _integer(cfg, "engine.workers")  # DataLoader processes that decode a streamed folder; 0: none
    _integer(cfg, "engine.attribution_probes")
    _integer(cfg, "engine.sanity_probes")
    if engine["sanity_mode"] not in SANITY_MODES:
        raise AuditConfigError(
            f"engine.sanity_mode must be full (one randomization of every layer) or cascade "
            f"(one step per layer, slow); got {engine['sanity_mode']!r}"
        )
    _integer(cfg, "engine.seed")
    _integer(cfg, "engine.clusters")
    _integer(cfg, "engine.synthesized_probes")
    check_number(cfg, "engine.synthesized_max_object", 0.0, 1.0, open_low=True)
    tcav = engine["tcav"]
    check_bool(cfg, "engine.tcav.enabled")
    if tcav["layer"] is not None and (
        not isinstance(tcav["layer"], str) or not tcav["layer"].strip()
    ):
        raise AuditConfigError(
            f"engine.tcav.layer must be a module name such as 'features' or null (the last feature map); got {tcav['layer']!r}"
        )
    _integer(cfg, "engine.tcav.examples")
    _integer(cfg, "engine.tcav.random_concepts")
    _integer(cfg, "engine.tcav.probes")
    dis = engine["dissection"]
    check_bool(cfg, "engine.dissection.enabled")
    if dis["layer"] is not None and (not isinstance(dis["layer"], str) or not dis["layer"].strip()):
        raise AuditConfigError(
            f"engine.dissection.layer must be a module name such as 'features' or null (the last feature map); "
            f"got {dis['layer']!r}"
        )
    check_number(cfg, "engine.dissection.quantile", 0.0, 1.0, open_low=True, open_high=True)
    check_number(cfg, "engine.dissection.iou_threshold", 0.0, 1.0, open_high=True)
    _integer(cfg, "engine.dissection.probes")
    _integer(cfg, "engine.dissection.show")
    _integer(cfg, "engine.dissection.actmax_steps")
    if engine["baseline"] not in ("zero", "mean", "blur"):
        raise AuditConfigError(
            f"engine.baseline must be zero, mean or blur; got {engine['baseline']!r}"
        )
    also = engine["also_baselines"]
    if (
        isinstance(also, str)
        or not isinstance(also, Sequence)
        or any(b not in ("zero", "mean", "blur") for b in also)
    ):
        raise AuditConfigError(
            f"engine.also_baselines must be a list of zero, mean and blur (e.g. [blur], or [] for none); got {also!r}"
        )
    if engine["baseline"] in also or len(set(also)) != len(also):
        raise AuditConfigError(
            f"engine.also_baselines {list(also)} repeats a baseline (engine.baseline is {engine['baseline']!r}); "
            f"name each baseline once"
        )
    if engine["device"] not in ("auto", "cpu", "cuda"):
        raise AuditConfigError(f"engine.device must be auto, cpu or cuda; got {engine['device']!r}")
    if engine["device"] == "cuda" and not torch.cuda.is_available():
        raise AuditConfigError(
            "engine.device=cuda but no CUDA device is available; use auto or cpu"
        )
    _integer(cfg, "engine.devices")
    _integer(cfg, "engine.num_nodes")
    if engine["strategy"] not in ("auto", "ddp"):  # audit.engine.distributed.STRATEGIES
        raise AuditConfigError(
            f"engine.strategy must be auto or ddp (both run DDP through Lightning when engine.devices * "
            f"engine.num_nodes > 1); got {engine['strategy']!r}"
        )
    return dict(cfg)
