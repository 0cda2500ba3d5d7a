"""``model-audit serve``: audit each new model version that MLflow's registry webhooks announce.

A small HTTP receiver (stdlib :class:`http.server.ThreadingHTTPServer`) for the model
registry webhooks of OSS MLflow (3.3+). A delivery is checked in this order, and only a
request that passes every step changes anything:

1. ``POST /`` with a ``Content-Length`` of at most :data:`MAX_BODY` bytes (411 / 413);
2. the HMAC-SHA256 signature, compared in constant time, before the body is parsed (401);
3. the signed timestamp within ``--max-age`` seconds of now (401) and a delivery id not
   seen before (409): a captured delivery cannot be replayed;
4. the JSON body: event ``model_version.created`` is audited; ``model_version_alias.created``
   of the promotion alias and ``model_version_tag.set`` of an ``audit.*`` key are judged (below);
   any other event is answered 200 and ignored; names, versions, aliases and keys are parsed
   strictly (400).

Judged events (:class:`Watcher`, its own thread, so that no check waits behind an audit): a
registry webhook only notifies, and anyone with registry rights can set the ``champion``
alias or ``audit.verdict=PASS`` by hand. The registry is read again when the check runs
(never the payload) and the version is checked as ``model-audit verify`` does
(:func:`audit.gate.verify.check_version`). The promotion alias (``promote.alias``) pointing to a
version without a genuine PASS, or an ``audit.verdict`` that is present and not genuine, is
FLAGGED: a log line and the registered model tag ``audit.alias_alert`` /
``audit.verdict_alert``; with ``--on-unverified-alias revoke`` the alias (only while it still
points to that version, read again right before) or the forged verdict (only while the
version still has that verdict and run id) is removed too. A version with no verdict yet is
nothing to flag for a tag event (the gate removes the old verdict first and writes the new
one after its evidence); for the alias it is judged again a few seconds later while it has
an ``audit.run_id``, then flagged. MLflow's payloads (``mlflow/webhooks/types.py``):
``ModelVersionAliasCreatedPayload`` ``name``, ``alias``, ``version``;
``ModelVersionTagSetPayload`` ``name``, ``version``, ``key``, ``value``.

An accepted delivery is answered 202 at once and queued; one worker thread runs the
audits one after another, each as a ``python -m audit`` (``model-audit``) subprocess
with the server's Hydra overrides plus ``model.uri=models:/<name>/<version>``, so each
audit writes the run, the version's tags and the ``champion`` alias exactly as the
``model-audit`` command does (:mod:`audit.gate.job`). One log line per audit gives the
version, the verdict and the exit code; a failing audit never stops the server.
SIGTERM or SIGINT: stop accepting, SIGTERM the running audit (the job closes its run
KILLED and exits 2, its own signal handling), drop the queue (logged), exit 0.

What MLflow does (mlflow 3.17, ``mlflow/webhooks/``), which this module is built to:

* ``delivery.py::_send_webhook_request`` POSTs ``json.dumps({"entity", "action",
  "timestamp", "data"})`` (plus ``"workspace"`` when workspaces are on) encoded as UTF-8,
  with the headers of ``constants.py``: ``X-MLflow-Delivery-Id`` (a uuid4),
  ``X-MLflow-Timestamp`` (unix seconds) and, when the webhook has a secret,
  ``X-MLflow-Signature: v1,<base64 HMAC-SHA256>``;
* ``delivery.py::_generate_hmac_signature`` signs ``f"{delivery_id}.{timestamp}.{payload}"``
  with the secret (both UTF-8): the body bytes exactly as sent, so they are verified raw,
  never re-serialized;
* ``server/handlers.py`` (create model version) sends event ``model_version.created`` with
  the data of ``types.py::ModelVersionCreatedPayload``: ``name``, ``version`` (a string),
  ``source``, ``run_id``, ``tags``, ``description``;
* delivery is asynchronous (``_webhook_delivery_executor``, a thread pool) after the version
  is created; each request has a timeout of ``MLFLOW_WEBHOOK_REQUEST_TIMEOUT`` (30 s) and
  ``MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES`` (3) retries with backoff 1, 2, 4 s, only on
  429/500/502/503/504 and connection errors (``_create_webhook_session``); the retries
  resend the same headers, so the same timestamp: ``--max-age`` should stay above ~150 s.
  Any other status is ignored by MLflow (``_send_webhook_with_error_handling`` does not
  look at it), so 4xx here never causes a retry; ``MlflowClient.test_webhook`` counts a
  status below 400 as success;
* URLs are checked by ``mlflow/utils/validation.py::_validate_webhook_url`` on create and
  on every delivery: the scheme must be in ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES`` (default
  ``https`` only) and the host must resolve to public addresses unless
  ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true`` (also checked on the connected socket,
  ``ssrf.py``): a receiver on 127.0.0.1 needs both set on the MLflow server (local use);
* the secret is stored encrypted with ``MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY``
  (``store/model_registry/dbmodels/models.py::EncryptedString``); without it the key is
  random per server process, and stored secrets are lost when the server restarts.

Usage::

    export MODEL_AUDIT_WEBHOOK_SECRET=...   # the webhook's secret; never on the command line
    python -m audit.gate.serve --port 8765 --on-unverified-alias revoke tracking.uri=http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from audit.errors import AuditError, first_line, report

__all__ = [
    "main",
    "Watcher",
    "Check",
    "verify_signature",
    "json_depth",
    "MAX_JSON_DEPTH",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "DELIVERY_ID_HEADER",
]

# the header names and signature version of mlflow/webhooks/constants.py (kept here so that the
# receiver does not import MLflow; tests/integration/test_serve.py checks them against MLflow's)
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"

EVENT = "model_version.created"
#: Events judged, not audited: a promotion alias set, an ``audit.*`` tag set (:class:`Watcher`).
ALIAS_EVENT = "model_version_alias.created"
TAG_EVENT = "model_version_tag.set"
ON_UNVERIFIED = ("alert", "revoke")
#: Registered model tags where a flagged alias or forged verdict is reported.
ALIAS_ALERT_TAG = "audit.alias_alert"
VERDICT_ALERT_TAG = "audit.verdict_alert"
#: A promoted version with audit evidence but no verdict may be a gate between its writes
#: (old verdict removed, new one not yet written): it is judged again after this many seconds...
SETTLE_S = 5.0
#: ... this many times at most, then flagged.
SETTLE_TRIES = 3
#: Seconds the watcher gets to finish its check at a stop (every MLflow call in it is bounded).
WATCH_STOP_S = 30.0
#: A registered model name in a judged event: it only reaches MLflow's API (never Hydra), so any
#: printable text MLflow accepts.
WATCH_NAME_RE = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
ALIAS_RE = re.compile(r"[\w-]{1,255}")
DEFAULT_SECRET_ENV = "MODEL_AUDIT_WEBHOOK_SECRET"
#: Shortest secret accepted: a short one could be guessed offline from one captured delivery.
MIN_SECRET_CHARS = 16
#: Largest body read; MLflow's payload (name, version, source, run id, tags, description) is far smaller.
MAX_BODY = 1 << 20
#: Deepest nesting of arrays and objects in a body; MLflow's payload is 3 deep (``data.tags``).
#: Checked before parsing: Python's parser recurses, and a deeper body raised RecursionError.
MAX_JSON_DEPTH = 64
#: Deliveries waiting at most; beyond, 503 (MLflow retries a 503 with backoff).
MAX_QUEUE = 256
#: Seconds a client may take to send its request (a stalled connection is dropped).
READ_TIMEOUT_S = 10.0
#: Seconds the running audit gets to unwind after the stop signal is passed on, before SIGKILL.
STOP_GRACE_S = 120.0
#: A registered model name this server audits: the name goes into a Hydra override
#: (``model.uri=models:/<name>/<version>``), so no ``$``, quotes, commas, brackets, ``/`` or
#: ``@``, which Hydra or the ``models:/`` URI would read as syntax.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")
_TOKEN_RE = re.compile(r"[a-z_]{1,64}")
_DIGITS_RE = re.compile(r"[0-9]{1,12}")  # ASCII digits only (str.isdigit also takes e.g. "²")
_DELIVERY_RE = re.compile(r"[A-Za-z0-9-]{1,128}")

log = logging.getLogger("audit.gate.serve")


class ServeError(AuditError):
    """Bad options or overrides: the message is the one line the user sees (exit 2)."""


# --------------------------------------------------------------------------- signature
def verify_signature(
    secret: bytes, delivery_id: str, timestamp: str, body: bytes, header: str
) -> bool:
    """Whether ``header`` holds MLflow's ``v1,<base64 HMAC-SHA256>`` of ``delivery_id.timestamp.body``.

    The content signed is mlflow/webhooks/delivery.py::_generate_hmac_signature's
    ``f"{delivery_id}.{timestamp}.{payload}"``, taken here over the raw body bytes. The header
    may hold several space-separated signatures (Standard Webhooks, for a secret rotation);
    each is compared with :func:`hmac.compare_digest` (constant time).
    """
    # header values reach http.server as latin-1 text: encoding back gives the bytes that were sent
    signed = delivery_id.encode("latin-1") + b"." + timestamp.encode("latin-1") + b"." + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    expected = f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}".encode("ascii")
    ok = False
    for candidate in header.split()[:8]:
        ok |= hmac.compare_digest(expected, candidate.encode("latin-1"))
    return ok


# --------------------------------------------------------------------------- the audits
@dataclass
class _Job:
    name: str
    version: str
    delivery: str


class Auditor:
    """One worker thread that runs the queued audits in order, each as a ``python -m audit`` subprocess.

    A subprocess, not :func:`audit.gate.job.audit_from_config` in this process, because: the job's
    signal handling (SIGTERM/SIGINT closing the run KILLED) needs the main thread of its own
    process; a crash, a hang or memory exhausted by one model (they are attacker-controlled
    files) must not take the server down, and a stuck audit can be killed; every audit starts
    from a fresh Hydra and MLflow state and gives its memory back; and it is exactly the
    ``model-audit`` command, with its exit codes. The cost is the imports (a few seconds).
    """

    def __init__(self, overrides: Sequence[str], env: dict[str, str], timeout_s: float) -> None:
        self.overrides = list(overrides)
        self.env = env
        self.timeout_s = timeout_s
        self.queue: queue.Queue[_Job | None] = queue.Queue(maxsize=MAX_QUEUE)
        self._waiting: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="model-audit-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: _Job) -> str:
        """``queued``, ``already queued`` (that version waits already) or ``full``."""
        with self._lock:
            if self._stopping:
                return "full"
            key = (job.name, job.version)
            if key in self._waiting:
                return "already queued"
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                return "full"
            self._waiting.add(key)
            return "queued"

    def command(self, name: str, version: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "audit",
            *self.overrides,
            f"model.uri=models:/{name}/{version}",
        ]

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting.discard((job.name, job.version))
                if self._stopping:
                    log.info(
                        "not audited (the server is stopping): %s v%s (delivery %s)",
                        job.name,
                        job.version,
                        job.delivery,
                    )
                    continue
            try:
                self._audit(job)
            except Exception as err:  # noqa: BLE001 - one audit's failure never stops the worker
                log.error(
                    "audit %s v%s: could not run: %s: %s",
                    job.name,
                    job.version,
                    type(err).__name__,
                    err,
                )

    def _audit(self, job: _Job) -> None:
        t0 = time.monotonic()
        with self._lock:
            if self._stopping:
                log.info(
                    "not audited (the server is stopping): %s v%s (delivery %s)",
                    job.name,
                    job.version,
                    job.delivery,
                )
                return
            # its own session: a Ctrl-C on the server's terminal reaches the audit only through stop()
            self._proc = proc = subprocess.Popen(
                self.command(job.name, job.version),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        note = ""
        try:
            out, err = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            note = f"; stopped after --audit-timeout {self.timeout_s:g} s"
            out, err = _end(proc, signal.SIGTERM)
        finally:
            with self._lock:
                self._proc = None
        code = proc.returncode
        found = re.findall(
            rf"^{re.escape(job.name)} v{job.version}: (PASS|FAIL|INCONCLUSIVE)$", out, re.M
        )
        verdict = found[-1] if found else "none"
        errors = [ln for ln in err.splitlines() if ln.startswith("model-audit: error:")]
        if code < 0:
            note += f"; ended by {signal.Signals(-code).name}"
        if errors:
            note += f"; {errors[0]}"
        log.info(
            "audit %s v%s: verdict %s, exit %d, %.1f s (delivery %s)%s",
            job.name,
            job.version,
            verdict,
            code,
            time.monotonic() - t0,
            job.delivery,
            note,
        )

    def stop(self) -> None:
        """Take no more jobs, SIGTERM the running audit, drop the queue and wait for the worker.

        SIGTERM whichever signal stopped the server: the job treats SIGTERM and SIGINT alike once
        its handlers are in place, and before that (during its imports) SIGTERM ends it at once,
        with nothing written, where SIGINT would raise KeyboardInterrupt wherever it lands.
        """
        with self._lock:
            self._stopping = True
            proc = self._proc
            if proc is not None and proc.poll() is None:
                log.info("passing SIGTERM to the running audit (pid %d)", proc.pid)
                proc.send_signal(signal.SIGTERM)
        while True:  # what is still queued is logged as not audited by the worker, then it ends
            try:
                self.queue.put_nowait(None)
                break
            except queue.Full:
                time.sleep(0.05)
        self.thread.join(STOP_GRACE_S)
        if self.thread.is_alive():
            with self._lock:
                proc = self._proc
            if proc is not None and proc.poll() is None:
                log.error(
                    "the running audit did not end within %g s of the signal: SIGKILL", STOP_GRACE_S
                )
                proc.kill()
            self.thread.join(30.0)


def _end(proc: subprocess.Popen, sig: int) -> tuple[str, str]:
    """Signal ``proc``, give it :data:`STOP_GRACE_S` to unwind, then SIGKILL; its output."""
    proc.send_signal(sig)
    try:
        return proc.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


# --------------------------------------------------------------------------- the watcher
@dataclass(frozen=True)
class Check:
    """One judged event: ``kind`` ``alias`` (the promotion alias ``target`` of model ``name``) or
    ``tag`` (an ``audit.*`` tag set on version ``target``); ``tries``: times judged again already."""

    kind: str
    name: str
    target: str
    delivery: str
    tries: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.name, self.target)


class Watcher:
    """One thread that judges promotion aliases and ``audit.*`` tags set in the registry, in order.

    Its own thread and queue: a check (a few registry reads, the weights downloaded and hashed
    by :func:`audit.gate.verify.check_version`) never waits behind an audit, nor an audit behind it.
    Each check reads the registry as it is NOW, never the payload: the gate writes its tags in
    sequence (old verdict removed, evidence, verdict, history, alias), so events arrive while it
    writes. A version with no ``audit.verdict`` is nothing to flag for a tag event; for the
    promotion alias it is judged again :data:`SETTLE_S` later while it has an ``audit.run_id``
    (a gate between its writes), at most :data:`SETTLE_TRIES` times, then flagged. Checks of the
    same alias or version that wait together are done once. One log line per check; a failing
    check is logged and the thread goes on.

    Args:
        tracking_uri: the store of the audits (the server's ``tracking.uri``).
        alias: the promotion alias (the server's ``promote.alias``).
        on_unverified: ``alert`` (log and tag the registered model) or ``revoke`` (also remove the
            alias, or the forged ``audit.verdict``, when it is still what was judged).
        settle_s: seconds before a promoted version without a verdict is judged again.
    """

    def __init__(
        self,
        tracking_uri: str,
        alias: str,
        on_unverified: str = "alert",
        *,
        settle_s: float = SETTLE_S,
    ) -> None:
        if on_unverified not in ON_UNVERIFIED:
            raise ServeError(
                f"--on-unverified-alias must be one of {list(ON_UNVERIFIED)}; got {on_unverified!r}"
            )
        self.uri, self.alias, self.on_unverified, self.settle_s = (
            tracking_uri,
            alias,
            on_unverified,
            settle_s,
        )
        self.queue: queue.Queue[Check | None] = queue.Queue(maxsize=MAX_QUEUE)
        self._later: list[tuple[float, Check]] = []
        self._waiting: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self.client: Any = None
        self.thread = threading.Thread(target=self._run, name="model-audit-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, check: Check) -> str:
        """``checking``, ``already waiting`` (the same alias or version waits already) or ``full``."""
        with self._lock:
            if self._stopping:
                return "full"
            if check.key in self._waiting:
                log.info(
                    "%s: a check of it waits already (delivery %s)", _what(check), check.delivery
                )
                return "already waiting"
            try:
                self.queue.put_nowait(check)
            except queue.Full:
                return "full"
            self._waiting.add(check.key)
            return "checking"

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._later.clear()
        while True:
            try:
                self.queue.put_nowait(None)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.queue.get_nowait()
        self.thread.join(WATCH_STOP_S)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            check = self._due()
            if check is None:
                try:
                    check = self.queue.get(timeout=self._wait_s())
                except queue.Empty:
                    continue
                if check is None:
                    return
            with self._lock:
                if self._stopping:
                    return
                self._waiting.discard(check.key)
            try:
                self._judge(check)
            except Exception as err:  # noqa: BLE001 - one check's failure never stops the watcher
                log.error(
                    "%s: could not be judged (delivery %s): %s: %s",
                    _what(check),
                    check.delivery,
                    type(err).__name__,
                    first_line(err, 300),
                )

    def _due(self) -> Check | None:
        with self._lock:
            now = time.monotonic()
            for i, (at, check) in enumerate(self._later):
                if at <= now:
                    del self._later[i]
                    return check
        return None

    def _wait_s(self) -> float:
        with self._lock:
            return max(
                0.05,
                min((at for at, _ in self._later), default=time.monotonic() + 1.0)
                - time.monotonic(),
            )

    def _again_later(self, check: Check) -> None:
        with self._lock:
            self._later.append(
                (time.monotonic() + self.settle_s, replace(check, tries=check.tries + 1))
            )
            self._waiting.add(check.key)

    def _judge(self, check: Check) -> None:
        from audit.gate.verify import VerifyError, open_store

        try:
            # the store must exist (nothing is created) and a server must answer its health check (seconds)
            self.client, _ = open_store(self.uri)
            if check.kind == "alias":
                self._judge_alias(check)
            else:
                self._judge_tag(check)
        except VerifyError as err:
            log.warning("%s: not judged (delivery %s): %s", _what(check), check.delivery, err)

    def _judge_alias(self, check: Check) -> None:
        from audit.gate.verify import check_version

        version = self._holder(check.name, check.target)
        where = f"alias {check.target!r} of {check.name!r}"
        if version is None:
            log.info("%s is not set now: nothing to judge (delivery %s)", where, check.delivery)
            return
        result = check_version(self.client, self.uri, check.name, version)
        if result.passed:
            log.info(
                "%s -> v%s: a genuine PASS by audit run %s (delivery %s)",
                where,
                version,
                result.run_id,
                check.delivery,
            )
            return
        if result.verdict is None and result.run_id and check.tries < SETTLE_TRIES:
            log.info(
                "%s -> v%s: no verdict beside its audit evidence (a gate between its writes?); "
                "judged again in %g s (delivery %s)",
                where,
                version,
                self.settle_s,
                check.delivery,
            )
            self._again_later(check)
            return
        reason = (
            "; ".join(result.failures) or f"its verdict {result.verdict} is genuine but not PASS"
        )
        action = (
            self._revoke_alias(check.name, check.target, version)
            if self.on_unverified == "revoke"
            else "the alias was left in place (--on-unverified-alias alert)"
        )
        self._alert(
            check.name,
            ALIAS_ALERT_TAG,
            f"alias {check.target!r} on v{version} without a genuine PASS: {reason}; {action}",
        )
        log.warning(
            "FLAGGED %s -> v%s without a genuine PASS: %s; %s (delivery %s)",
            where,
            version,
            reason,
            action,
            check.delivery,
        )

    def _judge_tag(self, check: Check) -> None:
        from audit.gate.verify import check_version

        result = check_version(self.client, self.uri, check.name, check.target)
        where = f"{check.name!r} v{check.target}"
        if result.verdict is None:
            log.info(
                "audit.* tag on %s: no verdict yet, nothing to flag (delivery %s)",
                where,
                check.delivery,
            )
            return
        if result.genuine:
            log.info(
                "audit.* tag on %s: its verdict %s is genuine (audit run %s) (delivery %s)",
                where,
                result.verdict,
                result.run_id,
                check.delivery,
            )
            return
        reason = "; ".join(result.failures)
        action = (
            self._revoke_verdict(check.name, check.target, result)
            if self.on_unverified == "revoke"
            else "the tag was left in place (--on-unverified-alias alert)"
        )
        self._alert(
            check.name,
            VERDICT_ALERT_TAG,
            f"audit.verdict={result.verdict!r} on v{check.target} is not genuine: {reason}; {action}",
        )
        log.warning(
            "FLAGGED audit.verdict=%r on %s is not genuine: %s; %s (delivery %s)",
            result.verdict,
            where,
            reason,
            action,
            check.delivery,
        )

    # ------------------------------------------------------------------ registry reads and writes
    def _holder(self, name: str, alias: str) -> str | None:
        """The version ``alias`` points to now, or None when it is not set (or the model is gone)."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def _revoke_alias(self, name: str, alias: str, version: str) -> str:
        """Remove ``alias`` only while it still points to ``version`` (read again right before)."""
        now = self._holder(name, alias)
        if now is None:
            return "the alias was removed meanwhile"
        if now != version:
            return f"the alias was NOT removed: it moved to v{now} meanwhile"
        self.client.delete_registered_model_alias(name, alias)
        return "the alias was removed (--on-unverified-alias revoke)"

    def _revoke_verdict(self, name: str, version: str, judged: Any) -> str:
        """Remove the ``audit.verdict`` judged, only while the version still has that verdict and run id."""
        tags = self.client.get_model_version(name, version).tags or {}
        if (tags.get("audit.verdict"), tags.get("audit.run_id")) != (judged.verdict, judged.run_id):
            return "the tag was NOT removed: the version's audit tags changed meanwhile"
        self.client.delete_model_version_tag(name, version, "audit.verdict")
        return "the forged audit.verdict was removed (--on-unverified-alias revoke)"

    def _alert(self, name: str, key: str, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.client.set_registered_model_tag(name, key, f"{stamp} {text}"[:5000])


def _what(check: Check) -> str:
    if check.kind == "alias":
        return f"alias {check.target!r} of {check.name!r}"
    return f"audit.* tag on {check.name!r} v{check.target}"


# --------------------------------------------------------------------------- the receiver
# a string, or an unterminated one up to the end; the lookahead and backreference make the body
# possessive (Python 3.10 has no *+), so each string is scanned once, never once per quote inside it
_JSON_STRING = re.compile(r'"(?=((?:[^"\\]|\\.)*))\1(?:"|\\?\Z)', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` in JSON ``text``, without parsing it (linear, no recursion).

    Brackets inside strings do not count, as for the parser, which reads a string (even an
    unterminated one, to its end) before anything after it: the count is the depth the
    parser would recurse to before it finishes or fails.
    """
    depth = deepest = 0
    for ch in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class _Seen:
    """Delivery ids already accepted, each kept until its timestamp leaves the window."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, delivery: str, until: float) -> bool:
        """False when ``delivery`` was seen before (a replay)."""
        now = time.time()
        with self._lock:
            if len(self._until) > 1024:
                self._until = {k: t for k, t in self._until.items() if t >= now}
            if delivery in self._until and self._until[delivery] >= now:
                return False
            self._until[delivery] = until
            return True

    def discard(self, delivery: str) -> None:
        with self._lock:
            self._until.pop(delivery, None)


class _Reject(Exception):
    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


class Receiver(ThreadingHTTPServer):
    """The HTTP server: checks each delivery (see the module docstring) and queues its audit."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        secret: bytes,
        max_age: int,
        auditor: Auditor,
        watcher: Watcher | None = None,
    ) -> None:
        self.secret, self.max_age, self.auditor, self.watcher = secret, max_age, auditor, watcher
        self.seen = _Seen()
        super().__init__(address, _Handler)

    def check(self, h: BaseHTTPRequestHandler) -> tuple[int, dict[str, Any]]:
        """The answer to one POST; raises :class:`_Reject` for a refused one."""
        if urlsplit(h.path).path != "/":
            raise _Reject(404, "not found: deliveries are POSTed to /", close=True)
        if h.headers.get("Transfer-Encoding"):
            raise _Reject(411, "a Content-Length is required (no Transfer-Encoding)", close=True)
        length = h.headers.get("Content-Length", "")
        if not _DIGITS_RE.fullmatch(length):
            raise _Reject(411, "a Content-Length is required", close=True)
        if int(length) > MAX_BODY:
            raise _Reject(413, f"body over {MAX_BODY} bytes", close=True)
        body = h.rfile.read(int(length))
        if len(body) != int(length):
            raise _Reject(400, "body shorter than its Content-Length", close=True)
        # 1. the signature, before anything is parsed
        sig = h.headers.get(SIGNATURE_HEADER, "")
        stamp = h.headers.get(TIMESTAMP_HEADER, "")
        delivery = h.headers.get(DELIVERY_ID_HEADER, "")
        if not sig or not stamp or not delivery:
            raise _Reject(
                401,
                f"unsigned: {SIGNATURE_HEADER}, {TIMESTAMP_HEADER} and {DELIVERY_ID_HEADER} are required",
            )
        if len(sig) > 1024 or len(stamp) > 20 or len(delivery) > 128:
            raise _Reject(401, "bad signature headers")
        if not verify_signature(self.secret, delivery, stamp, body, sig):
            raise _Reject(401, "bad signature")
        # 2. replay: a signed timestamp in the window, a delivery id not seen before
        if not _DIGITS_RE.fullmatch(stamp) or abs(time.time() - int(stamp)) > self.max_age:
            raise _Reject(
                401,
                f"stale: the signed timestamp {stamp[:20]} is more than {self.max_age} s from now",
            )
        if not _DELIVERY_RE.fullmatch(delivery):
            raise _Reject(400, "bad delivery id")
        if not self.seen.add(delivery, int(stamp) + self.max_age):
            raise _Reject(409, f"delivery {delivery} was received before (a replay)")
        # 3. the payload, its depth bounded, parsed strictly
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _Reject(400, "the body is not JSON (not UTF-8)") from None
        depth = json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise _Reject(
                400,
                f"the body nests arrays and objects {depth} deep, above the limit of {MAX_JSON_DEPTH}",
            )
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError):
            raise _Reject(400, "the body is not JSON") from None
        if not isinstance(payload, dict):
            raise _Reject(400, "the body is not a JSON object")
        entity, action = payload.get("entity"), payload.get("action")
        if not (
            isinstance(entity, str)
            and isinstance(action, str)
            and _TOKEN_RE.fullmatch(entity)
            and _TOKEN_RE.fullmatch(action)
        ):
            raise _Reject(
                400, "entity and action must be event names such as model_version and created"
            )
        event = f"{entity}.{action}"
        if event in (ALIAS_EVENT, TAG_EVENT) and self.watcher is not None:
            return self._watch(event, payload.get("data"), delivery)
        if event != EVENT:
            log.info("ignored event %s (delivery %s)", event, delivery)
            return 200, {"status": "ignored", "event": event}
        data = payload.get("data")
        if not isinstance(data, dict):
            raise _Reject(400, "data must be an object")
        name, version = data.get("name"), data.get("version")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise _Reject(
                400, f"data.name must match {NAME_RE.pattern} (this server audits only such names)"
            )
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
            raise _Reject(400, 'data.version must be a version number as a string, e.g. "3"')
        state = self.auditor.submit(_Job(name, version, delivery))
        if state == "full":
            self.seen.discard(delivery)  # MLflow retries a 503 with the same delivery id
            raise _Reject(503, "the audit queue is full or the server is stopping; retry later")
        log.info("%s %s v%s (delivery %s)", state, name, version, delivery)
        return 202, {"status": state, "model": name, "version": version}

    def _watch(self, event: str, data: Any, delivery: str) -> tuple[int, dict[str, Any]]:
        """A promotion alias set or an ``audit.*`` tag set: queued for the :class:`Watcher` (the payload
        only says where to look; the registry is read again when the check runs)."""
        assert self.watcher is not None
        if not isinstance(data, dict):
            raise _Reject(400, "data must be an object")
        name, version = data.get("name"), data.get("version")
        if not isinstance(name, str) or not WATCH_NAME_RE.fullmatch(name):
            raise _Reject(
                400, "data.name must be a registered model name (1 to 256 printable characters)"
            )
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
            raise _Reject(400, 'data.version must be a version number as a string, e.g. "3"')
        if event == ALIAS_EVENT:
            alias = data.get("alias")
            if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias):
                raise _Reject(400, "data.alias must be an alias name (letters, digits, _ and -)")
            if alias != self.watcher.alias:
                log.info(
                    "ignored %s: alias %r is not the promotion alias %r (delivery %s)",
                    event,
                    alias,
                    self.watcher.alias,
                    delivery,
                )
                return 200, {"status": "ignored", "event": event}
            check = Check("alias", name, alias, delivery)
        else:
            key = data.get("key")
            if not isinstance(key, str) or not 0 < len(key) <= 250:
                raise _Reject(400, "data.key must be a tag key (1 to 250 characters)")
            if not key.startswith("audit."):
                log.info(
                    "ignored %s: key %r is not an audit.* tag (delivery %s)", event, key, delivery
                )
                return 200, {"status": "ignored", "event": event}
            check = Check("tag", name, version, delivery)
        state = self.watcher.submit(check)
        if state == "full":
            self.seen.discard(delivery)
            raise _Reject(503, "the check queue is full or the server is stopping; retry later")
        return 202, {"status": state, "event": event, "model": name, "version": version}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "model-audit-serve"
    sys_version = ""
    timeout = READ_TIMEOUT_S  # socket timeout: a client that stalls is dropped
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        try:
            status, answer = self.server.check(self)
        except _Reject as r:
            log.warning(
                "refused POST %s from %s: %d %s",
                self.path[:200],
                self.client_address[0],
                r.status,
                r.message,
            )
            if r.close:
                self.close_connection = True
            status, answer = r.status, {"error": r.message}
        except OSError:  # the client stalled past READ_TIMEOUT_S or went away
            self.close_connection = True
            return
        self._answer(status, answer)

    def do_GET(self) -> None:  # noqa: N802
        if urlsplit(self.path).path == "/health":
            self._answer(200, {"status": "ok"})
        else:
            self._answer(404, {"error": "not found"})

    def _answer(self, status: int, answer: dict[str, Any]) -> None:
        body = json.dumps(answer).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 503:
                self.send_header("Retry-After", "30")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass  # the checks log what they refuse or accept; nothing else per request


# --------------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="model-audit serve",
        description="Audit each new MLflow model version announced by a registry webhook "
        "(event model_version.created), and flag a promotion alias or an audit.* tag that no genuine "
        "audit wrote (model_version_alias.created, model_version_tag.set). Other arguments are Hydra "
        "overrides for every audit.",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; put a TLS proxy in front)",
    )
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    p.add_argument(
        "--secret-env",
        default=DEFAULT_SECRET_ENV,
        metavar="NAME",
        help=f"environment variable holding the webhook's secret (default {DEFAULT_SECRET_ENV})",
    )
    p.add_argument(
        "--max-age",
        type=int,
        default=300,
        metavar="SECONDS",
        help="how far the signed timestamp may be from now (default 300; MLflow's retries need ~150)",
    )
    p.add_argument(
        "--audit-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="an audit still running after this long is stopped (default 3600)",
    )
    p.add_argument(
        "--on-unverified-alias",
        choices=ON_UNVERIFIED,
        default="alert",
        help="a promotion alias set on a version without a genuine PASS, or a forged audit.verdict: "
        f"alert (log it and tag the registered model {ALIAS_ALERT_TAG} / {VERDICT_ALERT_TAG}; the "
        "default) or revoke (also remove the alias or the forged verdict, if unchanged meanwhile)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides for every audit, e.g. tracking.uri=http://... gate=...",
    )
    return p


def _check_overrides(overrides: list[str]) -> dict[str, Any]:
    """Compose ``conf/audit.yaml`` as the job does (``pkg://audit.conf``, config ``audit``) to refuse bad
    overrides now; returns the composed config (plain), whose store and alias the watcher uses."""
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "model.uri" or key.startswith("model.uri."):
            raise ServeError(
                f"{o!r}: model.uri is set per delivery (models:/<name>/<version>); leave it out"
            )
        if o.startswith("-"):
            raise ServeError(
                f"{o!r}: Hydra flags (multirun, --cfg, ...) are not supported by serve"
            )
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from audit.gate.job import check_job_config, config_error_line, plain_config

    try:
        with initialize_config_module(config_module="audit.conf", version_base="1.3"):
            cfg = compose("audit", overrides=overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors, as the job words them
        raise ServeError(config_error_line(err, overrides)) from None
    kind = OmegaConf.select(cfg, "model.kind")
    if kind != "mlflow":
        raise ServeError(
            f"model.kind must be mlflow (serve audits registry versions); got {kind!r}: drop the model= override"
        )
    OmegaConf.update(cfg, "model.uri", "models:/serve-check/1")  # what each delivery sets
    from audit.gate.registry import check_alias

    plain = plain_config(cfg)
    check_job_config(plain)  # a JobError or GateError is an AuditError: main words it
    check_alias(plain["promote"]["alias"])
    return plain


def main(argv: list[str] | None = None) -> int:
    """Run the receiver until SIGTERM/SIGINT; 0 after a clean stop, 2 for bad options or a port in use."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s model-audit serve: %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        args = _parser().parse_intermixed_args(argv)
    except SystemExit as exit_:  # argparse printed its usage line
        return 0 if exit_.code in (0, None) else 2
    try:
        secret = _secret(args.secret_env)
        if not 0 <= args.port <= 65535:
            raise ServeError(f"--port must be 0..65535; got {args.port}")
        if args.max_age < 1:
            raise ServeError(f"--max-age must be >= 1 second; got {args.max_age}")
        if not args.audit_timeout > 0:
            raise ServeError(f"--audit-timeout must be > 0; got {args.audit_timeout}")
        os.environ["HYDRA_FULL_ERROR"] = "1"  # as the job: Hydra raises, config_error_line words it
        cfg = _check_overrides(args.overrides)
    except AuditError as err:
        return report("model-audit serve", err)
    from audit.gate import tracking

    tracking.bound_http_calls()  # the watcher's MLflow calls (and the audits', which set the same bounds)
    # the audits never see the secret
    env = {k: v for k, v in os.environ.items() if k != args.secret_env}
    auditor = Auditor(args.overrides, env, args.audit_timeout)
    watcher = Watcher(
        tracking.tracking_uri(cfg["tracking"]["uri"]),
        cfg["promote"]["alias"],
        args.on_unverified_alias,
    )
    try:
        httpd = Receiver((args.host, args.port), secret, args.max_age, auditor, watcher)
    except OSError as err:
        print(
            f"model-audit serve: error: cannot listen on {args.host}:{args.port} ({err.strerror or err}); "
            f"pick another --port or --host",
            file=sys.stderr,
            flush=True,
        )
        return 2
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        if received:
            log.info(
                "%s again: still waiting for the running audit to end", signal.Signals(signum).name
            )
            return
        received.append(signum)
        stop.set()

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    host, port = httpd.server_address[:2]
    if not _loopback(args.host):
        log.warning("listening on %s: not loopback; serve it only behind a TLS proxy", args.host)
    auditor.start()
    watcher.start()
    server_thread = threading.Thread(
        target=httpd.serve_forever,
        kwargs={"poll_interval": 0.2},
        name="model-audit-http",
        daemon=True,
    )
    server_thread.start()
    log.info(
        "listening on http://%s:%d/ (event %s, max age %d s); audits: %s model.uri=models:/<name>/<version>",
        host,
        port,
        EVENT,
        args.max_age,
        " ".join(["python -m audit", *args.overrides]),
    )
    log.info(
        "judging %s (alias %r) and %s (audit.* keys) against %s; unverified: %s",
        ALIAS_EVENT,
        watcher.alias,
        TAG_EVENT,
        watcher.uri,
        watcher.on_unverified,
    )
    try:
        while not stop.wait(0.5):
            pass
        signum = received[0]
        log.info("%s: no more deliveries accepted; stopping", signal.Signals(signum).name)
        httpd.shutdown()
        httpd.server_close()
        server_thread.join(10.0)
        watcher.stop()
        auditor.stop()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    log.info("stopped")
    return 0


def _secret(name: str) -> bytes:
    if not name or "=" in name:
        raise ServeError(f"--secret-env must name an environment variable; got {name!r}")
    value = os.environ.get(name)
    if not value:
        raise ServeError(
            f"no webhook secret: set the environment variable {name} to the secret given to "
            f'MlflowClient.create_webhook(secret=...) (e.g. from `python -c "import secrets; '
            f'print(secrets.token_urlsafe(32))"`); a secret is never passed on the command line'
        )
    if len(value) < MIN_SECRET_CHARS:
        raise ServeError(
            f"the secret in {name} is {len(value)} characters; use at least {MIN_SECRET_CHARS}"
        )
    return value.encode("utf-8", "surrogateescape")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
