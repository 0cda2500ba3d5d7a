"""The registry gate: tag an audited model version and move the promotion alias on PASS only.

:func:`apply_verdict` validates everything first (verdict, alias name, tags, that the
version exists), so bad input changes nothing. It then writes the version tags and,
only for PASS, moves the alias. A FAIL or INCONCLUSIVE never moves or removes the
current alias holder. If a write fails midway (e.g. the server went down), the
:class:`GateWriteError` lists the writes that happened and those that did not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from audit import tracking

__all__ = ["VERDICTS", "GateError", "GateWriteError", "GateOutcome", "apply_verdict", "check_alias"]

VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")
CORE_TAGS = ("audit.verdict", "audit.run_id", "audit.probe_digest")

# MLflow 3 alias rules (mlflow.utils.validation): letters, digits, _ and -, at most 255
# characters; "latest" (any case) and "v<digits>" / "V<digits>" are reserved.
_ALIAS_CHARS = re.compile(r"^[\w\-]+$")
_ALIAS_VERSION = re.compile(r"^[vV]\d+$")
_ALIAS_MAX = 255
_TAG_KEY_MAX = 250
_TAG_VALUE_MAX = 5000


class GateError(ValueError):
    """Bad input to the gate; nothing was written."""


class GateWriteError(RuntimeError):
    """A registry write failed after others succeeded (or before any did).

    Attributes:
        done: the writes that happened, in order.
        pending: the writes that did not happen.
    """

    def __init__(self, message: str, done: list[str], pending: list[str]) -> None:
        super().__init__(message)
        self.done = done
        self.pending = pending


@dataclass(frozen=True)
class GateOutcome:
    """What :func:`apply_verdict` did.

    Attributes:
        registered_name: the registered model.
        version: the audited version.
        verdict: the verdict applied.
        tags: the version tags written.
        alias: the promotion alias.
        alias_moved: whether the alias now points to ``version`` and did not before.
        previous_holder: the version the alias pointed to before (None if unset).
    """

    registered_name: str
    version: str
    verdict: str
    tags: dict[str, str] = field(default_factory=dict)
    alias: str = "champion"
    alias_moved: bool = False
    previous_holder: str | None = None


def check_alias(alias: str) -> str:
    """Return ``alias`` if MLflow accepts it as an alias name, else raise :class:`GateError`."""
    if not isinstance(alias, str) or not alias:
        raise GateError(f"alias must be a non-empty string such as 'champion'; got {alias!r}")
    if not _ALIAS_CHARS.match(alias):
        raise GateError(
            f"invalid alias {alias!r}: MLflow aliases may only contain letters, digits, '_' and '-' "
            f"(e.g. 'champion', 'prod-candidate')"
        )
    if len(alias) > _ALIAS_MAX:
        raise GateError(
            f"alias is {len(alias)} characters long; MLflow allows at most {_ALIAS_MAX}"
        )
    if alias.lower() == "latest" or _ALIAS_VERSION.match(alias):
        raise GateError(
            f"alias {alias!r} is reserved by MLflow ('latest' and 'v<number>' name versions); "
            f"choose another, e.g. 'champion'"
        )
    return alias


def _check_version(version: Any) -> str:
    text = str(version).strip()
    if not text.isdigit() or int(text) < 1:
        raise GateError(
            f"version must be a positive integer model version such as 3; got {version!r}"
        )
    return str(int(text))


def _tags(
    verdict: str, run_id: str, probe_digest: str, extra_tags: Mapping[str, Any] | None
) -> dict[str, str]:
    if verdict not in VERDICTS:
        raise GateError(f"verdict must be one of {list(VERDICTS)}; got {verdict!r}")
    for name, value in (("run_id", run_id), ("probe_digest", probe_digest)):
        if not isinstance(value, str) or not value.strip():
            raise GateError(
                f"{name} must be a non-empty string (the audit's MLflow run / the probe set digest); got {value!r}"
            )
    tags = {"audit.verdict": verdict, "audit.run_id": run_id, "audit.probe_digest": probe_digest}
    for key, value in (extra_tags or {}).items():
        if key in CORE_TAGS:
            raise GateError(
                f"extra_tags may not override {key!r}; pass it as an argument of apply_verdict"
            )
        if not isinstance(key, str) or not key or len(key) > _TAG_KEY_MAX:
            raise GateError(
                f"tag keys must be non-empty strings of at most {_TAG_KEY_MAX} characters; got {key!r}"
            )
        text = str(value)
        if len(text) > _TAG_VALUE_MAX:
            raise GateError(
                f"tag {key!r} has a value of {len(text)} characters; MLflow allows at most {_TAG_VALUE_MAX}"
            )
        tags[key] = text
    return tags


def _version_exists(client: Any, name: str, version: str) -> Any:
    """The registered model, after checking that it has ``version``; raises :class:`GateError` otherwise."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise GateError(
                f"registered model {name!r} does not exist in {client.tracking_uri}; "
                f"register the candidate first (audit.loading.log_model_safely(..., registered_name=...))"
            ) from err
        raise GateError(
            f"could not read registered model {name!r} from {client.tracking_uri}; nothing was written: {err}"
        ) from err
    try:
        client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            known = sorted(
                (int(v.version) for v in client.search_model_versions(f"name='{name}'")),
            )
            raise GateError(
                f"model {name!r} has no version {version}; its versions are {known or 'none'}"
            ) from err
        raise GateError(
            f"could not read {name!r} version {version}; nothing was written: {err}"
        ) from err
    return model


def apply_verdict(
    registered_name: str,
    version: int | str,
    verdict: str,
    run_id: str,
    probe_digest: str,
    alias: str = "champion",
    client: Any = None,
    extra_tags: Mapping[str, Any] | None = None,
) -> GateOutcome:
    """Tag ``registered_name`` version ``version`` with the audit verdict; on PASS move ``alias`` to it.

    Args:
        registered_name: the registered model.
        version: the audited version.
        verdict: ``"PASS"``, ``"FAIL"`` or ``"INCONCLUSIVE"``.
        run_id: the MLflow run of the audit (tag ``audit.run_id``).
        probe_digest: the probe set digest (tag ``audit.probe_digest``).
        alias: the promotion alias, moved only on PASS.
        client: an ``MlflowClient``; None makes one for :func:`audit.tracking.tracking_uri`.
        extra_tags: more version tags (may not override the three ``audit.*`` tags).

    Returns:
        A :class:`GateOutcome`.

    Raises:
        GateError: bad input or a missing model/version; nothing was written.
        GateWriteError: a write failed; its message lists what was and was not written.
    """
    tags = _tags(verdict, run_id, probe_digest, extra_tags)
    check_alias(alias)
    version = _check_version(version)
    if not isinstance(registered_name, str) or not registered_name:
        raise GateError(f"registered_name must be a non-empty string; got {registered_name!r}")
    client = client if client is not None else tracking.client()
    model = _version_exists(client, registered_name, version)
    previous = (getattr(model, "aliases", None) or {}).get(alias)
    previous = str(previous) if previous is not None else None
    move = verdict == "PASS" and previous != version

    writes: list[tuple[str, Any]] = [
        (
            f"tag {k}={v!r} on {registered_name} v{version}",
            lambda k=k, v=v: client.set_model_version_tag(registered_name, version, k, v),
        )
        for k, v in tags.items()
    ]
    if move:
        writes.append(
            (
                f"alias {alias!r} -> {registered_name} v{version} (was v{previous})"
                if previous
                else f"alias {alias!r} -> {registered_name} v{version}",
                lambda: client.set_registered_model_alias(registered_name, alias, version),
            )
        )
    done: list[str] = []
    for i, (what, write) in enumerate(writes):
        try:
            write()
        except Exception as err:  # re-raised with the list of what happened
            pending = [w for w, _ in writes[i:]]
            alias_note = (
                f" The alias {alias!r} was not moved (still {'v' + previous if previous else 'unset'})."
                if move
                else ""
            )
            raise GateWriteError(
                f"the registry write {what} failed ({type(err).__name__}: {err}); "
                f"written before it: {done or 'nothing'}; not written: {pending}.{alias_note} "
                f"The writes are idempotent: re-run apply_verdict once the registry answers.",
                done=list(done),
                pending=pending,
            ) from err
        done.append(what)
    return GateOutcome(
        registered_name=registered_name,
        version=version,
        verdict=verdict,
        tags=tags,
        alias=alias,
        alias_moved=move,
        previous_holder=previous,
    )
