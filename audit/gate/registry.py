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

**The version judged is the version written.** Given the ``identity`` recorded when the
version was loaded (:class:`audit.gate.loading.VersionIdentity`), the registry's record is
read again before every write (:func:`version_changes`), and the weights the version
points to now are re-hashed before the verdict tag and before the alias moves. A change
(deleted and registered again, other source, run, creation time or weights) raises
:class:`VersionChangedError`: no verdict tag, no alias change, and what this gate wrote
is removed again where it still holds the gate's value (an alias it set, its tags, its
alert); the error lists what was repaired.

**Alias writes never undo another client's.** The alias holder is read immediately
before each alias write (the move on PASS; the alert and the removal on a champion that
no longer passes) and again after it, and the gate acts only on the state read: a
champion moved away meanwhile gets no alert and is not removed, the alert names the
holder read right before it, and a move made right after the gate's write stays. What
another client did is listed in :attr:`GateOutcome.concurrent`.

**The window that remains.** MLflow has no compare-and-swap on aliases or tags: another
client's write between the gate's last read and its write (one request) is overwritten
by the gate's alias move, or removed by its revoke, and no read can tell. A version
replaced in that instant is seen by the read after the alias write, which takes the
gate's alias back. Weights overwritten in place after the last re-hash are not seen
(``model-audit verify`` re-checks a version later).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from audit.errors import AuditError, first_line
from audit.gate import tracking

if TYPE_CHECKING:
    from audit.gate.loading import VersionIdentity

__all__ = [
    "VERDICTS",
    "ON_CHAMPION_FAIL",
    "POLICIES",
    "describe_policy",
    "GateError",
    "GateWriteError",
    "GateOutcome",
    "VersionChangedError",
    "apply_verdict",
    "changed_line",
    "check_alias",
    "version_changes",
]

VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")
ON_CHAMPION_FAIL = ("keep", "revoke")
#: which PASSing versions the alias may move to: ``newer`` than its holder (the default), ``any``, or
#: ``none`` (tags only: the pipeline's own step moves the alias)
POLICIES = ("newer", "any", "none")
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


class GateError(AuditError, ValueError):
    """Bad input to the gate; nothing was written."""


class GateWriteError(AuditError, RuntimeError):
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
        previous_holder: the version the alias pointed to when read right before the gate's
            alias write or alert (None if unset).
        alias_revoked: the alias was removed from this version (a re-audit of the
            champion that did not PASS, with ``on_champion_fail="revoke"``).
        champion_alert: the ``audit.champion_alert`` text written on the registered
            model, or None.
        concurrent: what another client did to the alias while this gate wrote, as read
            right before and right after each alias write (the gate acts only on the state
            it read and never undoes another client's move); empty when nothing.
        held_back: why a PASS did not move the alias under ``policy`` (``newer``: the
            holder is a newer version; ``none``: the gate writes tags only), or None.
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
    concurrent: tuple[str, ...] = ()
    held_back: str | None = None


def describe_policy(policy: str, alias: str = "champion", on_champion_fail: str = "keep") -> str:
    """One line for reports: what a verdict of this audit may do to the alias under ``policy``."""
    move = {
        "newer": f"a PASS moves {alias!r} to this version only if it is newer than the version holding it",
        "any": f"a PASS moves {alias!r} to this version",
        "none": f"tags only: {alias!r} is moved by another step of the pipeline",
    }[policy]
    fail = "keeps the alias and alerts" if on_champion_fail == "keep" else "removes the alias"
    return (
        f"{move} (promote.policy={policy}); a FAIL or INCONCLUSIVE on the version holding it {fail}"
    )


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
                f"register the candidate first (audit.gate.loading.log_model_safely(..., registered_name=...))"
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


class VersionChangedError(GateError):
    """The audited version changed in the registry during the audit or the gate's writes.

    It was deleted and registered again under the same name and number, or its source now
    holds other weights. The gate then writes no verdict and moves no alias; what it had
    already written is removed again where it still holds what the gate wrote.

    Attributes:
        changes: ``"field: recorded -> now"`` for each part of the version that changed.
        repaired: what this gate had written and undid.
        left: what this gate did that stays (with the reason).
    """

    def __init__(
        self, message: str, changes: list[str], repaired: list[str], left: list[str]
    ) -> None:
        super().__init__(message)
        self.changes = changes
        self.repaired = repaired
        self.left = left


def version_changes(
    client: Any,
    identity: VersionIdentity,
    *,
    weights: bool = False,
    tracking_uri: str | None = None,
) -> list[str]:
    """What changed in the version ``identity`` names since it was recorded; ``[]`` when nothing did.

    The registry's record is read again (:func:`audit.gate.loading.read_identity`): a deleted
    version, another source, run or creation time is a change. With ``weights=True`` and
    a recorded digest, the weights file the version points to now is downloaded and
    hashed (:func:`audit.gate.loading.version_weights_sha256`); weights that can no longer be
    read count as changed. Registry errors other than "does not exist" propagate.
    """
    from audit.gate.loading import ModelLoadError, read_identity, version_weights_sha256

    now = read_identity(client, identity.registered_name, identity.version)
    if now is None:
        return [f"version {identity.version} was deleted"]
    changes = identity.differences(now)
    if not changes and not identity.same_version(now):
        changes = [f"record: {identity!r} -> {now!r}"]
    if changes or not weights or not identity.weights_sha256:
        return changes
    try:
        sha = version_weights_sha256(client, tracking_uri or client.tracking_uri, now)
    except ModelLoadError as err:
        return [f"weights_sha256: {identity.weights_sha256!r} -> unreadable ({first_line(err)})"]
    return identity.differences(replace(now, weights_sha256=sha))


def changed_line(identity: VersionIdentity, changes: list[str]) -> str:
    """The one sentence that says the version changed under the audit, naming what changed."""
    return (
        f"{identity.registered_name} v{identity.version} changed during the audit ({'; '.join(changes)}); "
        f"no verdict tag, no alias change: re-audit the version as it is now"
    )


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
    policy: str = "newer",
    history: str | None = None,
    identity: VersionIdentity | None = None,
    tracking_uri: str | None = None,
) -> GateOutcome:
    """Tag ``registered_name`` version ``version`` with the audit verdict; on PASS move ``alias`` to it.

    Args:
        registered_name: the registered model.
        version: the audited version.
        verdict: ``"PASS"``, ``"FAIL"`` or ``"INCONCLUSIVE"``.
        run_id: the MLflow run of the audit (tag ``audit.run_id``).
        probe_digest: the probe set digest (tag ``audit.probe_digest``).
        alias: the promotion alias, moved only on PASS.
        client: an ``MlflowClient``; None makes one for :func:`audit.gate.tracking.tracking_uri`.
        extra_tags: more version tags, written with the evidence before the verdict
            (they may not override the ``audit.*`` tags above).
        on_champion_fail: what a non-PASS verdict on the current alias holder does:
            ``"keep"`` the alias (and write ``audit.champion_alert`` on the model) or
            ``"revoke"`` it (and write the alert).
        policy: which PASSing version the alias moves to: ``"newer"`` only to a version
            newer (a higher version number) than its holder, so re-auditing an older version
            never takes the alias back; ``"any"`` to every PASSing version; ``"none"`` never
            (tags only, for pipelines whose own step moves the alias; ``on_champion_fail``
            must then be ``"keep"``). A PASS that does not move the alias says why
            (:attr:`GateOutcome.held_back`).
        history: the line added to ``audit.history``; None writes
            ``"<verdict> run=<run_id>"``.
        identity: what identified the version when it was judged
            (:attr:`audit.gate.loading.LoadedModel.identity`). Given, the registry's record is
            read again before every write and the weights re-hashed before the verdict tag
            and the alias move; any change raises :class:`VersionChangedError`.
        tracking_uri: where the weights are downloaded from for the re-hash; None uses
            ``client.tracking_uri``.

    Returns:
        A :class:`GateOutcome`.

    Raises:
        GateError: bad input or a missing model/version; nothing was written.
        VersionChangedError: the version changed; no verdict tag, no alias change, and what
            this gate wrote before it saw the change is removed (listed in the error).
        GateWriteError: a write failed; its message lists what was and was not written.
    """
    tags = _tags(verdict, run_id, probe_digest, extra_tags)
    check_alias(alias)
    version = _check_version(version)
    if on_champion_fail not in ON_CHAMPION_FAIL:
        raise GateError(
            f"on_champion_fail must be one of {list(ON_CHAMPION_FAIL)}; got {on_champion_fail!r}"
        )
    if policy not in POLICIES:
        raise GateError(f"policy must be one of {list(POLICIES)}; got {policy!r}")
    if policy == "none" and on_champion_fail == "revoke":
        raise GateError(
            "promote.policy=none writes tags only, but promote.on_champion_fail=revoke would remove the alias: "
            "set promote.on_champion_fail=keep, or another promote.policy"
        )
    if not isinstance(registered_name, str) or not registered_name:
        raise GateError(f"registered_name must be a non-empty string; got {registered_name!r}")
    if identity is not None and (identity.registered_name, str(identity.version)) != (
        registered_name,
        version,
    ):
        raise GateError(
            f"identity names {identity.registered_name} v{identity.version}, not {registered_name} v{version}; "
            f"pass the identity recorded when this version was loaded (LoadedModel.identity)"
        )
    client = client if client is not None else tracking.client()
    model, mv = _version_exists(client, registered_name, version)
    gate = _Gate(client, registered_name, version, alias, identity, tracking_uri, policy)
    if identity is not None:
        try:
            changes = version_changes(client, identity)
        except Exception as err:  # noqa: BLE001 - one line; nothing was written
            raise GateError(
                f"could not read {registered_name!r} version {version} again; nothing was written: "
                f"{type(err).__name__}: {first_line(err)}"
            ) from err
        if changes:
            raise VersionChangedError(
                f"{changed_line(identity, changes)}; nothing was written", changes, [], []
            )
    previous = (getattr(model, "aliases", None) or {}).get(alias)
    gate.previous = gate.previous_at_start = str(previous) if previous is not None else None
    return gate.run(
        tags,
        verdict,
        dict(getattr(mv, "tags", None) or {}),
        dict(getattr(model, "tags", None) or {}),
        history or f"{verdict} run={run_id}",
        on_champion_fail,
    )


class _Gate:
    """One gate's writes, each preceded by the reads that make it safe (see the module docstring)."""

    def __init__(
        self,
        client: Any,
        name: str,
        version: str,
        alias: str,
        identity: VersionIdentity | None,
        tracking_uri: str | None,
        policy: str = "newer",
    ) -> None:
        self.client, self.name, self.version, self.alias, self.policy = (
            client,
            name,
            version,
            alias,
            policy,
        )
        self.identity, self.tracking_uri = identity, tracking_uri
        self.where = f"{name} v{version}"
        self.previous: str | None = None  # the holder read last, before an alias write
        self.previous_at_start: str | None = None  # the holder read when the gate started
        self.done: list[str] = []
        self.plan: list[str] = []
        self.concurrent: list[str] = []
        self.version_tags: dict[str, str] = {}  # written by this gate
        self.model_tags: dict[str, str] = {}  # written by this gate
        self.removed_verdict: str | None = None
        self.old_history: str | None = None
        self.alias_set = False  # this gate set the alias on the version
        self.held: str | None = None  # why a PASS left the alias where it is (the policy)

    # ----------------------------------------------------------------- the writes, in order
    def run(
        self,
        tags: dict[str, str],
        verdict: str,
        old_tags: dict[str, str],
        model_tags: dict[str, str],
        line: str,
        on_champion_fail: str,
    ) -> GateOutcome:
        move = (
            verdict == "PASS"
            and self.previous != self.version
            and self._held_back(self.previous) is None
        )
        demoted = verdict != "PASS" and self.previous == self.version
        self.old_history = old_tags.get(HISTORY_TAG)
        evidence = {k: v for k, v in tags.items() if k != "audit.verdict"}
        self.plan = (
            (
                [self._label_remove_verdict(old_tags["audit.verdict"])]
                if "audit.verdict" in old_tags
                else []
            )
            + [f"tag {k}={v!r} on {self.where}" for k, v in evidence.items()]
            + [
                f"tag audit.verdict={verdict!r} on {self.where}",
                f"tag {HISTORY_TAG} on {self.where}",
            ]
            + ([self._label_alias(self.previous)] if move else [])
            + (
                [f"remove the model tag {ALERT_TAG} of {self.name}"]
                if move and ALERT_TAG in model_tags
                else []
            )
            + ([f"model tag {ALERT_TAG} on {self.name}"] if demoted else [])
            + (
                [f"remove alias {self.alias!r} from {self.where}"]
                if demoted and on_champion_fail == "revoke"
                else []
            )
        )
        if "audit.verdict" in old_tags:
            self._remove_old_verdict(old_tags["audit.verdict"])
        for key, value in evidence.items():
            self._tag(key, value, weights=False)
        self._tag(
            "audit.verdict", verdict, weights=True
        )  # a verdict tag on swapped weights is a lie too
        self._tag(HISTORY_TAG, _history(self.old_history, line), weights=False)
        outcome = {"alias_moved": False, "alias_revoked": False, "champion_alert": None}
        if verdict == "PASS" and self.policy == "none":
            outcome["held_back"] = self._held_back(self.previous)
        elif verdict == "PASS":
            outcome["alias_moved"] = self._promote()
            outcome["held_back"] = self.held
        else:
            outcome.update(self._demote(verdict, line, on_champion_fail))
        return GateOutcome(
            registered_name=self.name,
            version=self.version,
            verdict=verdict,
            tags=tags,
            alias=self.alias,
            previous_holder=self.previous,
            concurrent=tuple(self.concurrent),
            **outcome,
        )

    def _remove_old_verdict(self, old: str) -> None:
        label = self._label_remove_verdict(old)
        self._write(
            label,
            lambda: self.client.delete_model_version_tag(self.name, self.version, "audit.verdict"),
        )
        self.removed_verdict = old

    def _tag(self, key: str, value: str, *, weights: bool) -> None:
        label = (
            f"tag {key}={value!r} on {self.where}"
            if key != HISTORY_TAG
            else f"tag {key} on {self.where}"
        )
        self._write(
            label,
            lambda: self.client.set_model_version_tag(self.name, self.version, key, value),
            weights=weights,
        )
        self.version_tags[key] = value

    def _promote(self) -> bool:
        """PASS: the alias moves to the version unless it holds it already; True when the move stands."""
        label = self._label_alias(self.previous)
        holder = self._checked(label, self._holder, weights=True)
        self.previous = holder
        self._unplan(label)
        if holder == self.version:
            return False
        self.held = self._held_back(holder)
        if self.held is not None:
            self._unplan(f"remove the model tag {ALERT_TAG} of {self.name}")
            return False
        label = self._label_alias(holder)
        if holder != self.previous_at_start:
            self.concurrent.append(
                f"another client moved alias {self.alias!r} from {_v(self.previous_at_start)} to {_v(holder)} "
                f"during the gate; this PASS moves it to v{self.version} (was {_v(holder)})"
            )
        self._write(
            label,
            lambda: self.client.set_registered_model_alias(self.name, self.alias, self.version),
            check=False,
        )
        self.alias_set = True
        after = self._checked(
            f"read back alias {self.alias!r} of {self.name}", self._holder, pending=False
        )
        if after != self.version:
            self.concurrent.append(
                f"another client moved alias {self.alias!r} to {_v(after)} right after the gate set it on "
                f"v{self.version}; left as it is"
            )
            self._unplan(f"remove the model tag {ALERT_TAG} of {self.name}")
            return False
        if ALERT_TAG in self._read(lambda: dict(self.client.get_registered_model(self.name).tags)):
            self._write(
                f"remove the model tag {ALERT_TAG} of {self.name}",
                lambda: self.client.delete_registered_model_tag(self.name, ALERT_TAG),
            )
        return True

    def _demote(self, verdict: str, line: str, on_champion_fail: str) -> dict[str, Any]:
        """A verdict that is not PASS on the version that holds the alias right now: the alert, maybe the revoke."""
        label = f"model tag {ALERT_TAG} on {self.name}"
        initial = self.previous
        holder = self.previous = self._checked(label, self._holder)
        if holder != self.version:
            if initial == self.version:
                self.concurrent.append(
                    f"another client moved alias {self.alias!r} from v{self.version} to {_v(holder)} during the "
                    f"gate; v{self.version} no longer holds it: no alert, nothing removed"
                )
            self._unplan(label)
            self._unplan(f"remove alias {self.alias!r} from {self.where}")
            return {}
        # revoke only the champion the gate started with: an alias another client put on this
        # version during the gate is theirs, and stays (with the alert)
        revoke = on_champion_fail == "revoke" and initial == self.version
        if on_champion_fail == "revoke" and not revoke:
            self._unplan(f"remove alias {self.alias!r} from {self.where}")
            self.concurrent.append(
                f"another client moved alias {self.alias!r} from {_v(initial)} to v{self.version} during the gate; "
                f"not removed (the gate never removes an alias another client set): the alert says so"
            )
        alert = (
            f"{self.alias} v{self.version} was re-audited {verdict} ({line}); "
            + (
                f"the alias {self.alias!r} was removed"
                if revoke
                else f"the alias {self.alias!r} stays until a version that PASSes replaces it"
            )
        )[:_TAG_VALUE_MAX]
        self._write(
            label,
            lambda: self.client.set_registered_model_tag(self.name, ALERT_TAG, alert),
            check=False,
        )
        self.model_tags[ALERT_TAG] = alert
        if not revoke:
            return {"champion_alert": alert}
        return self._revoke(alert)

    def _revoke(self, alert: str) -> dict[str, Any]:
        label = f"remove alias {self.alias!r} from {self.where}"
        holder = self._checked(label, self._holder)
        if holder != self.version:
            self.previous = holder
            self._unplan(label)
            try:
                undone = self._undo_model_tag(ALERT_TAG)
            except Exception as err:  # noqa: BLE001 - said in the outcome; the alias is what matters
                undone = f"its alert on {self.name} could not be removed: {type(err).__name__}"
            self.concurrent.append(
                f"another client moved alias {self.alias!r} to {_v(holder)} before the gate removed it from "
                f"v{self.version}; left there" + (f" ({undone})" if undone else "")
            )
            return {}
        self._write(
            label,
            lambda: self.client.delete_registered_model_alias(self.name, self.alias),
            check=False,
        )
        after = self._read(self._holder)
        if after is not None:
            self.concurrent.append(
                f"another client set alias {self.alias!r} on {_v(after)} right after the gate removed it from "
                f"v{self.version}; left as it is"
            )
        return {"alias_revoked": True, "champion_alert": alert}

    def _held_back(self, holder: str | None) -> str | None:
        """Why the policy keeps a PASS from moving the alias off ``holder``, or None when it may move."""
        if self.policy == "none":
            return (
                f"promote.policy=none: tags only, the alias {self.alias!r} is moved by another step"
            )
        if (
            self.policy == "newer"
            and holder is not None
            and holder != self.version
            and int(holder) > int(self.version)
        ):
            return (
                f"promote.policy=newer: v{self.version} is older than v{holder}, which holds {self.alias!r}; "
                f"re-auditing an older version never takes the alias back (promote.policy=any would)"
            )
        return None

    # ----------------------------------------------------------------- reads and checks
    def _holder(self) -> str | None:
        holder = (getattr(self.client.get_registered_model(self.name), "aliases", None) or {}).get(
            self.alias
        )
        return str(holder) if holder is not None else None

    def _changes(self, weights: bool) -> list[str]:
        if self.identity is None:
            return []
        return version_changes(
            self.client, self.identity, weights=weights, tracking_uri=self.tracking_uri
        )

    def _checked(
        self, label: str, read: Callable[[], Any], weights: bool = False, pending: bool = True
    ) -> Any:
        """``read()`` after checking that the version is unchanged; a failure is reported as
        the step ``label``'s (a write still pending when ``pending``)."""
        try:
            changes = self._changes(weights)
            value = None if changes else read()
        except Exception as err:  # re-raised with the list of what happened
            raise self._write_error(label, err, pending) from err
        if changes:
            self._refuse(changes)
        return value

    def _read(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception as err:  # re-raised with the list of what happened
            raise self._write_error("reading the registry back", err, pending=False) from err

    def _write(
        self, label: str, write: Callable[[], Any], *, weights: bool = False, check: bool = True
    ) -> None:
        if check:
            self._checked(label, lambda: None, weights=weights)
        try:
            write()
        except Exception as err:  # re-raised with the list of what happened
            self._refuse_if_changed()  # e.g. the version deleted between the check and the write
            raise self._write_error(label, err) from err
        self.done.append(label)
        self._unplan(label)

    def _unplan(self, label: str) -> None:
        if label in self.plan:
            self.plan.remove(label)

    def _write_error(
        self, label: str, err: Exception, pending_label: bool = True
    ) -> GateWriteError:
        pending = [label] * pending_label + [w for w in self.plan if w != label]
        alias_note = ""
        if any(w.startswith(f"alias {self.alias!r} ->") for w in pending) and not self.alias_set:
            alias_note = f" The alias {self.alias!r} was not moved (still {_v(self.previous)})."
        first = first_line(err)
        return GateWriteError(
            f"the registry step {label} failed ({type(err).__name__}: {first}); "
            f"written before it: {self.done or 'nothing'}; not written: {pending}.{alias_note} "
            f"A verdict tag is written after its evidence, so the registry shows no verdict that is not "
            f"its run's; re-run the audit once the registry answers.",
            done=list(self.done),
            pending=pending,
        )

    # ----------------------------------------------------------------- the version changed: undo, refuse
    def _refuse_if_changed(self) -> None:
        """After a failed write: :meth:`_refuse` when the version changed (a read that fails too changes nothing)."""
        try:
            changes = self._changes(weights=False)
        except Exception:  # noqa: BLE001 - the write's own error is the one reported
            return
        if changes:
            self._refuse(changes)

    def _refuse(self, changes: list[str]) -> None:  # only called with an identity (see _changes)
        """Undo what this gate wrote where it still holds what the gate wrote; raise :class:`VersionChangedError`."""
        repaired: list[str] = []
        left: list[str] = []
        for undo in (self._undo_alias, self._undo_version_tags):
            try:
                repaired += undo()
            except Exception as err:  # noqa: BLE001 - reported in the error, the change is what matters
                left.append(f"could not finish undoing ({type(err).__name__}: {first_line(err)})")
        try:
            undone = self._undo_model_tag(ALERT_TAG)
        except Exception as err:  # noqa: BLE001 - reported in the error
            undone = ""
            left.append(f"could not remove the model tag {ALERT_TAG} ({type(err).__name__})")
        repaired += [undone] if undone else []
        if self.removed_verdict is not None:
            left.append(
                f"the earlier audit.verdict={self.removed_verdict!r} of {self.where}, removed first, is "
                f"not put back (it judged weights the version may no longer have)"
            )
        said = (
            f"; repaired: {'; '.join(repaired)}" if repaired else "; this gate had written nothing"
        )
        said += f"; left: {'; '.join(left)}" if left else ""
        raise VersionChangedError(
            changed_line(self.identity, changes) + said, changes, repaired, left
        )

    def _undo_alias(self) -> list[str]:
        if not self.alias_set or self._holder() != self.version:
            return []  # never set by this gate, or another client's move since: theirs stays
        self.client.delete_registered_model_alias(self.name, self.alias)
        self.alias_set = False
        before = (
            f"; it was on v{self.previous} before, not put back (set it again once that version is checked)"
            if self.previous
            else ""
        )
        return [f"removed alias {self.alias!r} from {self.where}, set by this gate{before}"]

    def _undo_version_tags(self) -> list[str]:
        from audit.gate.loading import read_identity

        now = read_identity(self.client, self.name, self.version)
        if now is None or not self.version_tags:
            return []  # the version is gone, with whatever this gate wrote on it
        same = self.identity is not None and self.identity.same_version(now)
        current = dict(self.client.get_model_version(self.name, self.version).tags or {})
        out: list[str] = []
        for key, value in reversed(
            list(self.version_tags.items())
        ):  # the verdict before its evidence
            if current.get(key) != value:
                continue  # not on this record (it went with a deleted one) or another client's since
            if key == HISTORY_TAG and same and self.old_history:
                self.client.set_model_version_tag(self.name, self.version, key, self.old_history)
                out.append(f"put back the earlier {key} of {self.where}")
            else:
                self.client.delete_model_version_tag(self.name, self.version, key)
                out.append(f"removed {key} from {self.where}")
        return out

    def _undo_model_tag(self, key: str) -> str:
        mine = self.model_tags.pop(key, None)
        if (
            mine is None
            or dict(self.client.get_registered_model(self.name).tags or {}).get(key) != mine
        ):
            return ""
        self.client.delete_registered_model_tag(self.name, key)
        return f"removed the model tag {key} this gate wrote on {self.name}"

    # ----------------------------------------------------------------- labels
    def _label_remove_verdict(self, old: str) -> str:
        return f"remove the earlier audit.verdict={old!r} of {self.where}"

    def _label_alias(self, holder: str | None) -> str:
        return f"alias {self.alias!r} -> {self.where}" + (f" (was v{holder})" if holder else "")


def _v(holder: str | None) -> str:
    return f"v{holder}" if holder else "nowhere (unset)"
