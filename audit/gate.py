"""The registry gate: tag an audited model version and move the promotion alias on PASS only.

:func:`apply_verdict` validates everything first (verdict, alias name, tags, that the
version exists), so bad input changes nothing. It then writes, in an order where an
interruption at any point never leaves a misleading registry:

1. the version's old ``audit.verdict`` tag is removed, so no verdict ever sits beside
   the ``audit.run_id`` of another audit;
2. the evidence tags: ``audit.run_id``, ``audit.probe_digest`` and the extra tags
   (the job adds ``audit.weights_sha256``, ``audit.tool_version``, ``audit.audited_at``
   and ``audit.run_link``, the run's page in the MLflow UI);
3. ``audit.verdict``, last of the tags: a verdict tag always belongs to the run that
   ``audit.run_id`` names;
4. ``audit.history``: one line per audit of this version (time, verdict, run, tool
   version), newest first, so a re-audit keeps the earlier ones readable;
5. on PASS only, the alias moves to the version.

A FAIL or INCONCLUSIVE never moves the alias. When the version it judges is the
current alias holder (a re-audit of the champion), the alias stays by default
(``on_champion_fail="keep"``): serving that resolves ``models:/name@champion`` keeps
working, and the registered model gets the tag ``audit.champion_alert`` naming the
version, the verdict and the run, shown on the model's registry page until a PASS
moves the alias. ``on_champion_fail="revoke"`` removes the alias instead (and writes the
same alert). If a write fails midway (e.g. the server went down), the
:class:`GateWriteError` lists the writes that happened and those that did not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from audit import tracking

__all__ = [
    "VERDICTS",
    "ON_CHAMPION_FAIL",
    "GateError",
    "GateWriteError",
    "GateOutcome",
    "apply_verdict",
    "check_alias",
]

VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")
ON_CHAMPION_FAIL = ("keep", "revoke")
CORE_TAGS = ("audit.verdict", "audit.run_id", "audit.probe_digest", "audit.history")
HISTORY_TAG = "audit.history"
ALERT_TAG = "audit.champion_alert"

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
        alias_revoked: the alias was removed from this version (a re-audit of the
            champion that did not PASS, with ``on_champion_fail="revoke"``).
        champion_alert: the ``audit.champion_alert`` text written on the registered
            model, or None.
    """

    registered_name: str
    version: str
    verdict: str
    tags: dict[str, str] = field(default_factory=dict)
    alias: str = "champion"
    alias_moved: bool = False
    previous_holder: str | None = None
    alias_revoked: bool = False
    champion_alert: str | None = None


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


def _version_exists(client: Any, name: str, version: str) -> tuple[Any, Any]:
    """The registered model and the version; raises :class:`GateError` if either is missing."""
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
        mv = client.get_model_version(name, version)
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
    return model, mv


def _history(previous: str | None, line: str) -> str:
    """``line`` above the earlier history, cut at whole lines to MLflow's tag value limit."""
    lines = [line, *(previous or "").splitlines()]
    out: list[str] = []
    size = 0
    for ln in lines:
        size += len(ln) + (1 if out else 0)
        if size > _TAG_VALUE_MAX:
            break
        out.append(ln)
    return "\n".join(out)


def apply_verdict(
    registered_name: str,
    version: int | str,
    verdict: str,
    run_id: str,
    probe_digest: str,
    alias: str = "champion",
    client: Any = None,
    extra_tags: Mapping[str, Any] | None = None,
    *,
    on_champion_fail: str = "keep",
    history: str | None = None,
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
        extra_tags: more version tags, written with the evidence before the verdict
            (they may not override the ``audit.*`` tags above).
        on_champion_fail: what a non-PASS verdict on the current alias holder does:
            ``"keep"`` the alias (and write ``audit.champion_alert`` on the model) or
            ``"revoke"`` it (and write the alert).
        history: the line added to ``audit.history``; None writes
            ``"<verdict> run=<run_id>"``.

    Returns:
        A :class:`GateOutcome`.

    Raises:
        GateError: bad input or a missing model/version; nothing was written.
        GateWriteError: a write failed; its message lists what was and was not written.
    """
    tags = _tags(verdict, run_id, probe_digest, extra_tags)
    check_alias(alias)
    version = _check_version(version)
    if on_champion_fail not in ON_CHAMPION_FAIL:
        raise GateError(
            f"on_champion_fail must be one of {list(ON_CHAMPION_FAIL)}; got {on_champion_fail!r}"
        )
    if not isinstance(registered_name, str) or not registered_name:
        raise GateError(f"registered_name must be a non-empty string; got {registered_name!r}")
    client = client if client is not None else tracking.client()
    model, mv = _version_exists(client, registered_name, version)
    previous = (getattr(model, "aliases", None) or {}).get(alias)
    previous = str(previous) if previous is not None else None
    move = verdict == "PASS" and previous != version
    demoted = verdict != "PASS" and previous == version
    revoke = demoted and on_champion_fail == "revoke"
    old_tags = dict(getattr(mv, "tags", None) or {})
    model_tags = dict(getattr(model, "tags", None) or {})
    line = history or f"{verdict} run={run_id}"
    where = f"{registered_name} v{version}"

    def set_tag(k: str, v: str):
        return lambda: client.set_model_version_tag(registered_name, version, k, v)

    writes: list[tuple[str, Any]] = []
    if "audit.verdict" in old_tags:
        writes.append((
            f"remove the earlier audit.verdict={old_tags['audit.verdict']!r} of {where}",
            lambda: client.delete_model_version_tag(registered_name, version, "audit.verdict"),
        ))  # fmt: skip
    evidence = {k: v for k, v in tags.items() if k != "audit.verdict"}
    writes += [(f"tag {k}={v!r} on {where}", set_tag(k, v)) for k, v in evidence.items()]
    writes.append((f"tag audit.verdict={verdict!r} on {where}", set_tag("audit.verdict", verdict)))
    writes.append((
        f"tag {HISTORY_TAG} on {where}",
        set_tag(HISTORY_TAG, _history(old_tags.get(HISTORY_TAG), line)),
    ))  # fmt: skip
    alert = None
    if move:
        writes.append(
            (
                f"alias {alias!r} -> {where} (was v{previous})" if previous else f"alias {alias!r} -> {where}",
                lambda: client.set_registered_model_alias(registered_name, alias, version),
            )
        )
        if ALERT_TAG in model_tags:
            writes.append((
                f"remove the model tag {ALERT_TAG} of {registered_name}",
                lambda: client.delete_registered_model_tag(registered_name, ALERT_TAG),
            ))  # fmt: skip
    elif demoted:
        alert = (
            f"{alias} v{version} was re-audited {verdict} ({line}); "
            + (f"the alias {alias!r} was removed" if revoke else
               f"the alias {alias!r} stays until a version that PASSes replaces it")
        )  # fmt: skip
        writes.append((
            f"model tag {ALERT_TAG} on {registered_name}",
            lambda: client.set_registered_model_tag(registered_name, ALERT_TAG, alert[:_TAG_VALUE_MAX]),
        ))  # fmt: skip
        if revoke:
            writes.append((
                f"remove alias {alias!r} from {where}",
                lambda: client.delete_registered_model_alias(registered_name, alias),
            ))  # fmt: skip
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
                f"the registry write {what} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                f"written before it: {done or 'nothing'}; not written: {pending}.{alias_note} "
                f"A verdict tag is written after its evidence, so the registry shows no verdict that is not "
                f"its run's; re-run the audit once the registry answers.",
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
        alias_revoked=revoke,
        champion_alert=alert,
    )
