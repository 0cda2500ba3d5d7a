"""A real ``mlflow server`` on 127.0.0.1 and a forwarding proxy in front of it that can fault one request.

:class:`MlflowServer` runs ``mlflow server`` (one worker) over a SQLite file that may
already exist (a registry built with an ``MlflowClient`` on ``sqlite:///...``), with
``--artifacts-destination`` so that runs created through it upload their artifacts
over HTTP. :class:`FaultProxy` is a threaded HTTP proxy in this process: every request
is forwarded with ``requests`` (method, path, query, headers, body) and logged; once
armed with a :class:`Step` it either stops the server when that request arrives (the
request is then never forwarded and its connection is dropped without an answer) or
forwards it and SIGKILLs a victim process once the server's answer is back, before
answering (so the write happened, but the client never learns it).

Every wait is bounded; ports come from binding port 0.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

#: Headers that describe one hop's connection or encoding, never forwarded.
_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "host",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 over ``sqlite:///<db>``; start() waits for ``/health``."""

    def __init__(self, root: Path, db: Path | None = None) -> None:
        self.root = Path(root)
        self.db = Path(db) if db is not None else self.root / "server.db"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def store_uri(self) -> str:
        return f"sqlite:///{self.db}"

    def start(self, timeout: float = 90.0) -> None:
        env = dict(
            os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true"
        )
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.pop(key, None)
        self._log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                self.store_uri,
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            env=env,
            cwd=self.root,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,  # its own process group: stop() can reach every child
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.uri + "/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"mlflow server exited: {tail}")
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health in {timeout} s")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group, then SIGKILL if it outlives ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=timeout)
            _signal_group(proc, signal.SIGKILL)  # workers left behind by the parent, if any
        if self._log is not None:
            self._log.close()
            self._log = None
        deadline = time.monotonic() + timeout  # the port is free again: a restart can bind it
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group the server leads (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Step:
    """The ``n``-th request (1-based) whose method is ``method``, whose path ends with ``path``
    and, when ``body_key`` is set, whose JSON body has ``body_key`` as its ``key`` field or
    among its ``tags[].key``."""

    label: str
    method: str
    path: str
    n: int = 1
    body_key: str | None = None

    def matches(self, method: str, path: str, body: bytes) -> bool:
        if method != self.method or not path.split("?", 1)[0].endswith(self.path):
            return False
        if self.body_key is None:
            return True
        return self.body_key in _body_keys(body)


def _body_keys(body: bytes) -> set[str]:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return set()
    if not isinstance(data, dict):
        return set()
    keys = {data["key"]} if isinstance(data.get("key"), str) else set()
    keys |= {t.get("key") for t in data.get("tags") or [] if isinstance(t, dict)}
    return keys


@dataclass
class Seen:
    method: str
    path: str
    keys: tuple[str, ...]
    status: int | None


@dataclass
class _Armed:
    step: Step
    action: str  # "stop" | "kill" | "call" | "call-after"
    call: Callable[[], None] | None = None  # for "call" and "call-after"
    error: BaseException | None = None  # what ``call`` raised, if anything
    count: int = 0
    hit: threading.Event = field(default_factory=threading.Event)
    at: float | None = None  # time.monotonic() when the step's request arrived


class FaultProxy:
    """A forwarding proxy on 127.0.0.1 to ``server`` that can fault one request (see the module docstring).

    ``kill`` forwards the step's request, waits for the server's answer, SIGKILLs
    ``victim`` and only then would answer: the write is in the store, and the client
    died without knowing it. ``stop`` stops the server when the step's request arrives,
    without forwarding it, and drops the connection without an answer; later requests
    get ``502`` (the server does not answer). ``call`` runs the armed callable (in the proxy's
    thread, while the step's request waits) and then forwards the request; ``call-after``
    forwards it and runs the callable before passing the answer on. What the callable raised
    is kept in ``armed.error``.
    """

    def __init__(self, server: MlflowServer) -> None:
        self.server = server
        self.seen: list[Seen] = []
        self.victim: subprocess.Popen | None = None
        self.armed: _Armed | None = None
        self._lock = threading.Lock()
        self._session = requests.Session()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                proxy._handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()

    # ----------------------------------------------------------------- control
    def arm(self, step: Step, action: str, call: Callable[[], None] | None = None) -> _Armed:
        assert action in ("stop", "kill", "call", "call-after"), action
        assert (call is not None) == action.startswith("call"), (
            "call= goes with 'call' and 'call-after' only"
        )
        with self._lock:
            self.armed = _Armed(step, action, call)
            self.seen.clear()
            return self.armed

    def disarm(self) -> None:
        with self._lock:
            self.armed = None
            self.victim = None

    def writes(self) -> list[Seen]:
        """The non-GET requests seen since the last arm(), health checks excluded."""
        return [s for s in self.seen if s.method != "GET"]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
        self._session.close()

    # ----------------------------------------------------------------- forwarding
    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        method, path = h.command, h.path
        action = None
        with self._lock:
            armed = self.armed
            if (
                armed is not None
                and not armed.hit.is_set()
                and armed.step.matches(method, path, body)
            ):
                armed.count += 1
                if armed.count == armed.step.n:
                    action = armed.action
                    armed.at = time.monotonic()
                    armed.hit.set()
            seen = Seen(
                method, path.split("?", 1)[0], tuple(sorted(k for k in _body_keys(body) if k)), None
            )
            self.seen.append(seen)
        if action == "stop":
            self.server.stop()
            h.close_connection = (
                True  # dropped without an answer, like a server that died mid-request
            )
            return
        if action == "call":
            _run_call(armed)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        try:
            resp = self._session.request(
                method,
                self.server.uri + path,
                headers=headers,
                data=body or None,
                timeout=30,
                allow_redirects=False,
            )
        except requests.RequestException:
            seen.status = 502
            _answer(h, 502, {"Content-Type": "text/plain"}, b"the mlflow server does not answer")
            return
        seen.status = resp.status_code
        if action == "call-after":
            _run_call(armed)
        if action == "kill":
            victim = self.victim
            if victim is not None and victim.poll() is None:
                victim.kill()
                victim.wait(timeout=30)
            h.close_connection = True
            return
        out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
        _answer(h, resp.status_code, out, resp.content if method != "HEAD" else b"")


def _run_call(armed: _Armed) -> None:
    try:
        armed.call()
    except BaseException as err:  # noqa: BLE001 - kept for the test to assert on, never swallowed there
        armed.error = err


def _read_body(h: http.server.BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(h.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(h.rfile.read(size))
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else b""


def _answer(h: http.server.BaseHTTPRequestHandler, status: int, headers: dict, body: bytes) -> None:
    try:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if body:
            h.wfile.write(body)
    except OSError:  # the client went away (e.g. it was killed)
        h.close_connection = True


def wait_for(predicate: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
