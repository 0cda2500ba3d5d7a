"""``model-audit verify <uri>``: is a registry version's verdict genuine, and is it PASS?

MLflow's registry lets anyone with write rights set ``audit.verdict=PASS`` or the
``champion`` alias by hand; a deploy that reads them cannot tell a verdict the gate
wrote from one typed in. ``verify`` re-checks a version's verdict tags against the
audit run they name and against the weights the version points to *now*, in the one
store it is told (``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else
``./mlflow.db``, as the job; never another store), and exits:

* 0: every check below holds and the verdict is PASS;
* 1: a check fails (one line per failed check on stdout, naming what does not match),
  or the verdict is genuine but FAIL or INCONCLUSIVE (one line saying so);
* 2: bad input (a malformed URI, a store that does not exist, a server that does not
  answer, a model, version or alias that does not exist): one line on stderr.

The checks (:func:`check_version`), for version ``N`` of model ``m``:

1. the version has ``audit.verdict`` (one of PASS, FAIL, INCONCLUSIVE) and ``audit.run_id``;
2. that run exists in this store, is not deleted and is FINISHED;
3. the run's own tags: ``audit.verdict`` equals the version's; ``audit.model_registered_name``
   and ``audit.model_version`` name ``m`` and ``N``; ``audit.model_source`` and
   ``audit.model_created`` equal the version's source and creation time now (a version
   deleted and registered again under the same number has another creation time);
   ``audit.probe_digest`` and ``audit.tool_version`` equal the version's tags of those names;
4. the weights: the file the version's source holds now is downloaded into a temporary
   folder and hashed (:func:`audit.gate.loading.version_weights_sha256`; nothing is unpickled
   or built); its SHA-256 equals the run's ``audit.weights_sha256`` (and the version's
   tag of that name, where present);
5. what the caller requires, if anything: ``--probes <sha256>`` (the run's probe digest)
   and ``--min-tool-version <X.Y.Z>`` (the run's ``audit.tool_version``).

What a PASS from ``verify`` still trusts: the store itself. Whoever can write runs in it
can forge a run with matching tags; its access control is the trust anchor (docs/gate.md,
"Trust chain").
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from audit.errors import AuditError, first_line, report

__all__ = [
    "Requirements",
    "Verification",
    "VerifyError",
    "check_version",
    "main",
    "open_store",
    "parse_model_uri",
    "requirements",
    "resolve_version",
    "verify",
]

EXIT_VERIFIED, EXIT_NOT_VERIFIED, EXIT_ERROR = 0, 1, 2
#: Seconds the health check of an ``http(s)`` tracking server may take.
HEALTH_TIMEOUT = 5.0
TOOL_PREFIX = "model-audit "
_VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")
_RELEASE_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class VerifyError(AuditError, ValueError):
    """Bad input or an unreadable store: the message is the one line the user sees (exit 2)."""


@dataclass(frozen=True)
class Requirements:
    """What the caller requires of the audit beyond its being genuine.

    Attributes:
        probe_digest: the probe set's SHA-256 (hex) the audit must have used, or None.
        min_tool_version: the lowest model-audit release (``"0.1.0"``) that may have run it, or None.
    """

    probe_digest: str | None = None
    min_tool_version: str | None = None


@dataclass
class Verification:
    """The outcome of :func:`check_version` for one registry version.

    Attributes:
        registered_name: the registered model.
        version: the version checked.
        verdict: the version's ``audit.verdict`` tag as found (None when absent).
        run_id: the version's ``audit.run_id`` tag as found (None when absent).
        failures: one sentence per failed check; empty when the verdict is genuine.
    """

    registered_name: str
    version: str
    verdict: str | None = None
    run_id: str | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def genuine(self) -> bool:
        """The version has a verdict and every check of it holds."""
        return self.verdict is not None and not self.failures

    @property
    def passed(self) -> bool:
        """A genuine PASS: the one state in which a deploy may go on."""
        return self.genuine and self.verdict == "PASS"

    def lines(self) -> list[str]:
        """What ``verify`` prints: one line per failed check, or one line for a genuine verdict."""
        where = f"{self.registered_name} v{self.version}"
        if self.failures:
            return [f"{where}: NOT VERIFIED: {f}" for f in self.failures]
        if self.passed:
            return [f"{where}: VERIFIED: a genuine PASS by audit run {self.run_id}"]
        return [
            f"{where}: the verdict {self.verdict} is genuine (audit run {self.run_id}) but not PASS: do not deploy"
        ]


# --------------------------------------------------------------------------- input
def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``(name, version, alias)`` of ``models:/<name>/<version>`` or ``models:/<name>@<alias>``.

    Raises:
        VerifyError: any other form.
    """
    from audit.gate.registry import GateError, check_alias

    usage = "use models:/<name>/<version> (e.g. models:/snow-wolf/3) or models:/<name>@<alias> (e.g. models:/snow-wolf@champion)"
    if not isinstance(uri, str) or not uri.startswith("models:/"):
        raise VerifyError(f"cannot verify {uri!r}: not a registry URI; {usage}")
    rest = uri[len("models:/") :]
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        try:
            check_alias(alias)
        except GateError as err:
            raise VerifyError(f"cannot verify {uri!r}: {err}") from None
        version = None
    else:
        name, _, version = rest.rpartition("/")
        alias = None
        if not _VERSION_RE.fullmatch(version):
            raise VerifyError(
                f"cannot verify {uri!r}: version {version!r} is not a version number; {usage}"
            )
    if not name or "/" in name or any(ord(ch) < 32 for ch in name):
        raise VerifyError(
            f"cannot verify {uri!r}: {name!r} is not a registered model name; {usage}"
        )
    return name, version, alias


def requirements(probes: str | None = None, min_tool_version: str | None = None) -> Requirements:
    """Parse ``--probes`` and ``--min-tool-version``; raises :class:`VerifyError` naming the bad value."""
    digest = None
    if probes is not None:
        digest = probes.strip().lower()
        if not _DIGEST_RE.fullmatch(digest):
            raise VerifyError(
                f"--probes must be a probe set digest, 64 hex characters (ProbeSet.digest, the run tag "
                f"audit.probe_digest); got {probes!r}"
            )
    release = None
    if min_tool_version is not None:
        release = min_tool_version.strip()
        release = release[len(TOOL_PREFIX) :] if release.startswith(TOOL_PREFIX) else release
        if _release(release) is None:
            raise VerifyError(
                f"--min-tool-version must be a release such as 0.1.0; got {min_tool_version!r}"
            )
    return Requirements(probe_digest=digest, min_tool_version=release)


def _release(text: str) -> tuple[int, ...] | None:
    if not _RELEASE_RE.fullmatch(text):
        return None
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (4 - len(parts)))


def open_store(tracking_uri: str | None = None) -> tuple[Any, str]:
    """``(client, uri)`` for the named store, which must exist and answer; nothing is created.

    Raises:
        VerifyError: a SQLite file that does not exist, or a server that does not answer.
    """
    from audit.gate import tracking

    uri = tracking.tracking_uri(tracking_uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        if not tracking.reachable(uri, HEALTH_TIMEOUT):
            raise VerifyError(
                f"the MLflow tracking server at {uri} does not answer its health check within "
                f"{HEALTH_TIMEOUT:g} s; start it or fix --tracking-uri (or MLFLOW_TRACKING_URI)"
            )
    elif parsed.scheme == "sqlite":
        path = uri[len("sqlite:///") :].split("?", 1)[0]
        if path != ":memory:" and not (path and Path(path).is_file()):
            raise VerifyError(
                f"the MLflow store {uri} does not exist (no file {str(Path(path).absolute())!r}); "
                f"pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store that holds the model"
            )
    return tracking.client(uri), uri


def resolve_version(client: Any, name: str, version: str | None, alias: str | None) -> str:
    """The version number a URI names now (an alias is read from the registry).

    Raises:
        VerifyError: the model, version or alias does not exist, or the store cannot be read.
    """
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            return str(client.get_model_version_by_alias(name, alias).version)
        client.get_model_version(name, version)
        return str(version)
    except MlflowException as err:
        if err.error_code not in _NOT_FOUND:
            raise VerifyError(
                f"could not read {name!r} from {client.tracking_uri}: {first_line(err, 300) or type(err).__name__}"
            ) from None
    what = f"alias {alias!r}" if alias is not None else f"version {version}"
    raise VerifyError(
        f"registered model {name!r} has no {what} in {client.tracking_uri}: {_known(client, name)}"
    )


def _known(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
        versions = sorted(
            int(v.version) for v in client.search_model_versions(f"name='{_quote(name)}'")
        )
    except MlflowException:
        return "no such registered model; check the name and --tracking-uri"
    aliases = sorted(f"{a}->v{v}" for a, v in (model.aliases or {}).items())
    return f"its versions are {versions or 'none'}, its aliases {aliases or 'none'}"


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


# --------------------------------------------------------------------------- the checks
def check_version(
    client: Any, tracking_uri: str, name: str, version: str, require: Requirements | None = None
) -> Verification:
    """Every check of the module docstring for ``name`` version ``version``, read now from ``client``'s store.

    Raises:
        VerifyError: the version does not exist, or the store cannot be read.
    """
    from mlflow.exceptions import MlflowException

    from audit.gate.loading import VersionIdentity

    try:
        mv = client.get_model_version(
            name, version
        )  # one read: the tags and the identity of one moment
    except MlflowException as err:
        if err.error_code in _NOT_FOUND:
            raise VerifyError(
                f"registered model {name!r} has no version {version} in {tracking_uri}"
            ) from None
        raise VerifyError(
            f"could not read {name!r} version {version} from {tracking_uri}: {first_line(err, 300) or type(err).__name__}"
        ) from None
    identity = VersionIdentity(
        registered_name=name,
        version=str(mv.version),
        source=str(mv.source or ""),
        run_id=str(mv.run_id or ""),
        creation_timestamp=int(mv.creation_timestamp or 0),
    )
    tags = dict(mv.tags or {})
    out = Verification(name, str(version), tags.get("audit.verdict"), tags.get("audit.run_id"))
    if out.verdict is None:
        out.failures.append("no audit.verdict tag: no audit judged this version")
        return out
    run = _audit_run(client, tracking_uri, out)
    if run is not None:
        out.failures += _run_failures(run, tags, identity, name, str(version))
        out.failures += _weights_failures(client, tracking_uri, identity, run.data.tags, tags)
        out.failures += _required_failures(run.data.tags, require or Requirements())
    return out


def _audit_run(client: Any, tracking_uri: str, out: Verification) -> Any:
    """The run ``audit.run_id`` names, or None with the failure recorded."""
    from audit.gate.registry import VERDICTS

    if out.verdict not in VERDICTS:
        out.failures.append(
            f"audit.verdict is {_show(out.verdict)}, not one of {', '.join(VERDICTS)}"
        )
    if not out.run_id:
        out.failures.append("no audit.run_id tag: the verdict names no audit run")
        return None
    run = _get_run(client, out.run_id, tracking_uri)
    if run is None:
        out.failures.append(f"audit.run_id {_show(out.run_id)} names no run in {tracking_uri}")
    return run


def _get_run(client: Any, run_id: str, tracking_uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code in _NOT_FOUND:
            return None
        raise VerifyError(
            f"could not read run {run_id!r} from {tracking_uri}: {first_line(err, 300) or type(err).__name__}"
        ) from None


def _run_failures(
    run: Any, tags: dict[str, str], identity: Any, name: str, version: str
) -> list[str]:
    """The run's state and tags against the version's tags and its identity now."""
    rid = run.info.run_id
    out = []
    if run.info.lifecycle_stage != "active":
        out.append(f"audit run {rid} is {run.info.lifecycle_stage}")
    if run.info.status != "FINISHED":
        out.append(f"audit run {rid} is {run.info.status}, not FINISHED: it never completed")
    expected = [
        ("audit.verdict", tags.get("audit.verdict"), "the version's audit.verdict"),
        ("audit.model_registered_name", name, "this registered model"),
        ("audit.model_version", version, "this version"),
        ("audit.model_source", identity.source, "the version's source now"),
        (
            "audit.model_created",
            str(identity.creation_timestamp),
            "the version's creation time now",
        ),
        ("audit.probe_digest", tags.get("audit.probe_digest"), "the version's audit.probe_digest"),
        ("audit.tool_version", tags.get("audit.tool_version"), "the version's audit.tool_version"),
    ]
    got = run.data.tags
    for key, want, what in expected:
        if key not in got:
            out.append(
                f"audit run {rid} has no {key} tag (it was not written by a model-audit gate run)"
            )
        elif want is None:
            out.append(
                f"the version has no {key} tag to compare with run {rid}'s {_show(got[key])}"
            )
        elif got[key] != want:
            out.append(f"{key}: audit run {rid} says {_show(got[key])}, {what} is {_show(want)}")
    return out


def _weights_failures(
    client: Any, tracking_uri: str, identity: Any, run_tags: dict[str, str], tags: dict[str, str]
) -> list[str]:
    """The weights the version points to now, re-hashed, against the run's (and the version's) digest."""
    from audit.gate.loading import ModelLoadError, version_weights_sha256

    judged = run_tags.get("audit.weights_sha256")
    if not judged:
        return ["the audit run has no audit.weights_sha256 tag: it names no weights"]
    out = []
    if "audit.weights_sha256" in tags and tags["audit.weights_sha256"] != judged:
        out.append(
            f"audit.weights_sha256: the version's tag is {_show(tags['audit.weights_sha256'])}, "
            f"the audit run's {_show(judged)}"
        )
    try:
        now = version_weights_sha256(client, tracking_uri, identity)
    except ModelLoadError as err:
        return [
            *out,
            f"the weights the version points to cannot be re-hashed: {first_line(err, 300) or type(err).__name__}",
        ]
    if now != judged:
        out.append(
            f"weights: the file the version points to now has sha256 {now}, the audit judged {judged}"
        )
    return out


def _required_failures(run_tags: dict[str, str], require: Requirements) -> list[str]:
    out = []
    digest = run_tags.get("audit.probe_digest")
    if require.probe_digest is not None and digest != require.probe_digest:
        out.append(
            f"probes: the audit used probe set {_show(digest)}, --probes requires {require.probe_digest}"
        )
    if require.min_tool_version is not None:
        tool = run_tags.get("audit.tool_version") or ""
        release = _release(tool[len(TOOL_PREFIX) :]) if tool.startswith(TOOL_PREFIX) else None
        wanted = require.min_tool_version
        if release is None or release < (_release(wanted) or ()):
            out.append(
                f"tool version: the audit ran {_show(tool)}, --min-tool-version requires {wanted} or later"
            )
    return out


def _show(value: Any, limit: int = 100) -> str:
    """A tag value on one line, quoted and cut: tags are written by whoever has registry rights."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


# --------------------------------------------------------------------------- entry point
def verify(
    uri: str, tracking_uri: str | None = None, require: Requirements | None = None
) -> Verification:
    """Check the version that ``uri`` names now in the named store (see the module docstring).

    Raises:
        VerifyError: bad input (exit 2); nothing is written anywhere.
    """
    name, version, alias = parse_model_uri(uri)
    client, store = open_store(tracking_uri)
    number = resolve_version(client, name, version, alias)
    return check_version(client, store, name, number, require)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="model-audit verify",
        description="Exit 0 only when the registry version's audit verdict is genuine (its audit run, "
        "its weights now, its version identity all match) and PASS; 1 otherwise (one line per failed "
        "check); 2 for bad input.",
    )
    p.add_argument("uri", help="models:/<name>/<version> or models:/<name>@<alias>")
    p.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="the MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db); never another",
    )
    p.add_argument(
        "--probes",
        default=None,
        metavar="SHA256",
        help="require that the audit used this probe set (its digest, the run tag audit.probe_digest)",
    )
    p.add_argument(
        "--min-tool-version",
        default=None,
        metavar="X.Y.Z",
        help="require that model-audit X.Y.Z or later ran the audit",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``model-audit verify``: 0 genuine PASS, 1 not verified or not PASS, 2 bad input."""
    import os

    from audit.gate import tracking

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse printed its usage line
        return EXIT_VERIFIED if exit_.code in (0, None) else EXIT_ERROR
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tracking.bound_http_calls()
    try:
        result = verify(
            args.uri, args.tracking_uri, requirements(args.probes, args.min_tool_version)
        )
    except AuditError as err:
        return report("model-audit verify", err)
    except Exception as err:  # noqa: BLE001 - e.g. a store that fails mid-way: one line, exit 2
        print(
            f"model-audit verify: error: unexpected {type(err).__name__} while verifying {args.uri}: "
            f"{first_line(err, 300) or type(err).__name__} (nothing was written; if the input looks right, please report it)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_ERROR
    for line in result.lines():
        print(line, flush=True)
    return EXIT_VERIFIED if result.passed else EXIT_NOT_VERIFIED


if __name__ == "__main__":
    sys.exit(main())
