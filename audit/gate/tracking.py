"""The one place that talks to MLflow: URIs, key names, runs, and fault-tolerant logging.

* :func:`tracking_uri`, :func:`metric_key`: where to log, and valid key names.
* :class:`RunTarget`: one MLflow run and the client that writes to it; either an
  existing run (a Lightning ``MLFlowLogger``'s, or the fluent API's active run:
  :func:`active_run`) or a run of its own, created on first use.
* :class:`EvidenceSink`: sends :class:`Record` s (metrics, tags, step-indexed
  images, images rendered lazily) to a run from one background worker thread.
  What cannot be sent (MLflow unreachable, a failing call) is kept in a local spool
  folder and re-sent, in order, before the next record and at :meth:`EvidenceSink.close`.
  Problems are collected and handed to the caller (:meth:`EvidenceSink.problems`),
  who reports them once. :func:`replay_spool` sends a spool left behind later.

The worker never touches torch: records carry numpy arrays and Python numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PIL import Image

__all__ = [
    "DEFAULT_TRACKING_URI",
    "DEFAULT_EXPERIMENT",
    "tracking_uri",
    "metric_key",
    "client",
    "reachable",
    "active_run",
    "same_store",
    "bound_http_calls",
    "HTTP_BOUNDS",
    "RunTarget",
    "Record",
    "EvidenceSink",
    "replay_spool",
]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "model-audit"
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")
_SPOOL_VERSION = 1


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: the argument, else ``MLFLOW_TRACKING_URI``, else a local SQLite file.

    Never MLflow's own fallback: a bare ``./mlruns`` file store is refused by MLflow 3.
    """
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def metric_key(*parts: str) -> str:
    """Join ``parts`` with ``/`` into a valid MLflow key (``wolf|snow`` -> ``wolf_snow``)."""
    return "/".join(_BAD_KEY_CHARS.sub("_", p) for p in parts)


def client(uri: str | None = None):
    """An ``MlflowClient`` whose runs AND registry live at :func:`tracking_uri` ``(uri)``.

    The registry URI is passed explicitly: left out, MLflow takes it from
    ``MLFLOW_REGISTRY_URI`` or a process global, so tags and aliases could land in
    another store than the one named (imported lazily: MLflow is slow to import).
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri)
    return MlflowClient(uri, registry_uri=uri)


#: Bounds on every MLflow HTTP call of the audit job (MLflow's defaults retry for ~4 minutes).
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # MLflow reads it as an int
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "8",
}


def bound_http_calls() -> None:
    """Bound MLflow's HTTP retries and timeouts (unless the user set them): a server that
    vanishes costs seconds, not the ~255 s of MLflow's default retries."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


def reachable(uri: str, timeout: float = 2.0) -> bool:
    """Whether an ``http(s)`` tracking server answers its ``/health`` endpoint within ``timeout``.

    Other URIs (SQLite, databases, files) are local and count as reachable; their
    errors show up when logging. Checking first keeps a dead server from stalling
    the logger in MLflow's own retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``).
    """
    if urlparse(uri).scheme not in ("http", "https"):
        return True
    import requests

    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).ok
    except requests.RequestException:
        return False


def active_run() -> tuple[str, str] | None:
    """The MLflow fluent API's active run of this thread as ``(run id, tracking URI)``; None without one.

    That is the run of a ``with mlflow.start_run():`` around the caller, or the one
    ``mlflow.pytorch.autolog()`` starts around ``Trainer.fit``. MLflow keeps it per
    thread and per process: a process Lightning spawns (``ddp_spawn``) has none.
    MLflow is not imported for the question: a process that never imported it has no
    active run.
    """
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or not hasattr(mlflow, "active_run"):
        return None
    run = mlflow.active_run()
    if run is None:
        return None
    return run.info.run_id, mlflow.get_tracking_uri()


def same_store(a: str, b: str) -> bool:
    """Whether two tracking URIs name the same store (a SQLite file by its resolved path, else the URI)."""
    return _store_key(a) == _store_key(b)


def _store_key(uri: str) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and ":memory:" not in uri:
        return prefix + str(Path(uri[len(prefix) :].split("?")[0]).resolve())
    return uri.rstrip("/")


class RunTarget:
    """One MLflow run and the client that writes to it.

    Args:
        uri: the tracking URI.
        run_id: an existing run; None creates a run of its own on first use.
        mlflow_client: the client to use (e.g. ``MLFlowLogger.experiment``); None
            creates one for ``uri`` on first use.
        experiment_name: the experiment of an own run.
        run_name: the name of an own run.
    """

    def __init__(
        self,
        uri: str,
        run_id: str | None = None,
        mlflow_client: Any = None,
        *,
        experiment_name: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
    ) -> None:
        self.uri = uri
        self.own = run_id is None or mlflow_client is None
        self._run_id = run_id
        self._client = mlflow_client
        self.experiment_name = experiment_name
        self.run_name = run_name
        self._lock = threading.Lock()
        self._finished = False

    @classmethod
    def of_logger(cls, logger: Any) -> RunTarget:
        """The run of a Lightning ``MLFlowLogger`` (same run, same client)."""
        mlflow_client = logger.experiment
        target = cls(mlflow_client.tracking_uri, logger.run_id, mlflow_client)
        target.own = False
        return target

    @property
    def run_id(self) -> str | None:
        """The run id, or None while an own run is not created yet."""
        return self._run_id

    @property
    def client(self) -> Any:
        """The MLflow client (created on first use)."""
        with self._lock:
            if self._client is None:
                self._client = client(self.uri)
            return self._client

    def ensure(self) -> str:
        """The run id, creating the own run (and its experiment) if needed."""
        c = self.client
        with self._lock:
            if self._run_id is None:
                exp = c.get_experiment_by_name(self.experiment_name)
                exp_id = (
                    exp.experiment_id
                    if exp is not None
                    else c.create_experiment(self.experiment_name)
                )
                # an explicit name: MLflow's generated names draw from Python's global RNG
                name = self.run_name or time.strftime("model-audit-%Y%m%d-%H%M%S")
                run = c.create_run(exp_id, run_name=name, tags={"audit.own_run": "true"})
                self._run_id = run.info.run_id
            return self._run_id

    def finish(self, status: str = "FINISHED") -> None:
        """End an own run (no-op for a borrowed run, or one never created)."""
        if self.own and self._run_id is not None and not self._finished:
            self.client.set_terminated(self._run_id, status)
            self._finished = True

    def describe(self) -> str:
        return f"run {self._run_id or '(to be created)'} at {self.uri}"


@dataclass
class Record:
    """What one audit pass logs at one step.

    Args:
        step: the MLflow step (epoch or global step).
        metrics: key -> value (keys made valid with :func:`metric_key`).
        tags: key -> value.
        images: key -> image (PIL or uint8 ``[H, W, 3]`` array), logged with the step.
        render: a function returning more images, called on the worker thread
            (rendering off the training thread); it must not use torch.
        timestamp: milliseconds since the epoch; fixed at creation so a re-sent
            metric is recognised as the same point.
    """

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)
    render: Callable[[], Mapping[str, Any]] | None = None
    timestamp: int = field(default_factory=lambda: int(time.time() * 1000))


_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """One worker thread for every sink of the process (Matplotlib is not thread safe)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-audit-log")
        return _EXECUTOR


class EvidenceSink:
    """Sends records to one run in the background; spools what cannot be sent.

    Args:
        target: the run.
        spool_dir: the spool folder; None makes a temporary one when first needed.
        background: send from the worker thread (else on the caller's thread).
        health_timeout: seconds to wait for an ``http(s)`` server's health check.
    """

    def __init__(
        self,
        target: RunTarget,
        spool_dir: str | os.PathLike | None = None,
        *,
        background: bool = True,
        health_timeout: float = 2.0,
    ) -> None:
        self.target = target
        self._spool = Path(spool_dir) if spool_dir is not None else None
        self._own_spool = spool_dir is None
        self.background = background
        self.health_timeout = health_timeout
        self._futures: list[Future] = []
        self._problems: list[str] = []
        self._lock = threading.Lock()
        self._seq = 0
        self.sent = 0
        self.closed = False

    # ------------------------------------------------------------------ public
    @property
    def spool_dir(self) -> Path | None:
        """The spool folder (None until something had to be spooled, unless given)."""
        return self._spool

    def pending(self) -> int:
        """Records waiting in the spool."""
        return len(self._entries())

    def submit(self, record: Record) -> None:
        """Queue ``record``: spooled records are re-sent first, then this one."""
        if self.closed:
            raise RuntimeError("EvidenceSink.submit after close()")
        if self.background:
            self._futures = [f for f in self._futures if not f.done()]
            self._futures.append(_executor().submit(self._handle, record))
        else:
            self._handle(record)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until queued records are handled; False if ``timeout`` ran out first."""
        if not self._futures:
            return True
        done, not_done = wait_futures(list(self._futures), timeout=timeout)
        self._futures = list(not_done)
        return not not_done

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued records, then try once more to send the spool; True if nothing is left."""
        if not self.wait(timeout):
            return False
        self._send_spool()
        return self.pending() == 0

    def close(self, timeout: float | None = None) -> bool:
        """:meth:`flush`, then stop accepting records; removes an empty temporary spool."""
        ok = self.flush(timeout)
        self.closed = True
        if ok and self._own_spool and self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None
        return ok

    def problems(self) -> list[str]:
        """Problems seen since the last call (sending failed, rendering failed), oldest first."""
        with self._lock:
            out, self._problems = self._problems, []
        return out

    # ------------------------------------------------------------------ worker
    def _problem(self, text: str) -> None:
        with self._lock:
            self._problems.append(text)

    def _handle(self, record: Record) -> None:
        images = dict(record.images)
        if record.render is not None:
            try:
                images.update(record.render())
            except Exception as err:  # noqa: BLE001 - reported to the caller, metrics still logged
                self._problem(
                    f"rendering the images of step {record.step} failed: {type(err).__name__}: {err}"
                )
        entry = self._write_entry(record, images)
        self._send_spool(only_if_first=entry)

    def _write_entry(self, record: Record, images: Mapping[str, Any]) -> dict[str, Any]:
        """A spool entry in memory; written to disk only if it cannot be sent now."""
        self._seq += 1
        return {
            "version": _SPOOL_VERSION,
            "seq": self._seq,
            "uri": self.target.uri,
            "run_id": self.target.run_id,
            "experiment": self.target.experiment_name,
            "step": int(record.step),
            "timestamp": int(record.timestamp),
            "metrics": {metric_key(k): float(v) for k, v in record.metrics.items()},
            "tags": {str(k): str(v) for k, v in record.tags.items()},
            "images": {metric_key(k): _as_pil(v) for k, v in images.items()},
            "sent": {"metrics": False, "tags": False, "images": []},
        }

    def _send_spool(self, only_if_first: dict[str, Any] | None = None) -> None:
        """Send spooled entries in order, then ``only_if_first``; spool whatever fails."""
        queue: list[tuple[Path | None, dict[str, Any]]] = [
            (p, _read_entry(p)) for p in self._entries()
        ]
        if only_if_first is not None:
            queue.append((None, only_if_first))
        if not queue:
            return
        up = reachable(self.target.uri, self.health_timeout)
        for i, (path, entry) in enumerate(queue):
            err: str | None = None
            if not up:
                err = f"MLflow at {self.target.uri} does not answer its health check"
            else:
                try:
                    self._send(entry, path)
                except Exception as e:  # noqa: BLE001 - the documented fault-tolerance path
                    err = f"{type(e).__name__}: {e}"
            if err is None:
                self.sent += 1
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            # keep this and every later entry, in order
            for p, e in queue[i:]:
                if p is None:
                    self._spool_entry(e)
            self._problem(
                f"could not log step {entry['step']} to MLflow ({err}); kept in {self._spool}"
            )
            return

    def _send(self, entry: dict[str, Any], path: Path | None) -> None:
        target = self.target
        run_id = entry.get("run_id") or target.ensure()
        entry["run_id"] = run_id
        c = target.client
        sent = entry["sent"]
        if not sent["metrics"] or not sent["tags"]:
            from mlflow.entities import Metric, RunTag

            metrics = [
                Metric(k, v, entry["timestamp"], entry["step"]) for k, v in entry["metrics"].items()
            ]
            tags = [RunTag(k, v) for k, v in entry["tags"].items()]
            if metrics or tags:
                c.log_batch(run_id, metrics=metrics, tags=tags, synchronous=True)
            sent["metrics"] = sent["tags"] = True
            _update(path, entry)
        for key, img in entry["images"].items():
            if key in sent["images"]:
                continue
            image = Image.open(img) if isinstance(img, (str, Path)) else img
            c.log_image(
                run_id,
                image,
                key=key,
                step=entry["step"],
                timestamp=entry["timestamp"],
                synchronous=True,
            )
            sent["images"].append(key)
            _update(path, entry)

    # ------------------------------------------------------------------ spool
    def _entries(self) -> list[Path]:
        if self._spool is None or not self._spool.is_dir():
            return []
        return sorted(
            p for p in self._spool.iterdir() if p.is_dir() and (p / "record.json").is_file()
        )

    def _spool_entry(self, entry: dict[str, Any]) -> None:
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="model-audit-spool-"))
        self._spool.mkdir(parents=True, exist_ok=True)
        name = f"{int(time.time() * 1000):013d}-{entry['seq']:06d}-{uuid.uuid4().hex[:8]}"
        tmp = self._spool / (name + ".tmp")
        tmp.mkdir()
        files = {}
        for i, (key, img) in enumerate(entry["images"].items()):
            fname = f"image{i:02d}.png"
            if isinstance(img, (str, Path)):
                shutil.copyfile(img, tmp / fname)
            else:
                img.save(tmp / fname, format="png", compress_level=1)
            files[key] = fname
        data = {k: v for k, v in entry.items() if k != "images"}
        data["images"] = files
        (tmp / "record.json").write_text(json.dumps(data, indent=1))
        tmp.rename(self._spool / name)


def _as_pil(img: Any) -> Any:
    if isinstance(img, Image.Image) or isinstance(img, (str, Path)):
        return img
    import numpy as np

    return Image.fromarray(np.asarray(img, dtype=np.uint8))


def _read_entry(path: Path) -> dict[str, Any]:
    data = json.loads((path / "record.json").read_text())
    data["images"] = {k: path / f for k, f in data["images"].items()}
    return data


def _update(path: Path | None, entry: dict[str, Any]) -> None:
    """Persist what was sent of a spooled entry, so a retry does not send it twice."""
    if path is None:
        return
    data = {k: v for k, v in entry.items() if k != "images"}
    data["images"] = {k: Path(v).name for k, v in entry["images"].items()}
    tmp = path / "record.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path / "record.json")


def replay_spool(folder: str | os.PathLike, uri: str | None = None) -> int:
    """Send a spool folder left behind (e.g. the server was down until the process ended).

    Each entry names its run; entries of an own run that was never created go to a
    new run in their experiment. Returns the number of entries sent; what fails
    stays in the folder.

    Args:
        folder: the spool folder named in the warning.
        uri: send to this tracking URI instead of the one recorded in the entries.
    """
    sinks: dict[tuple[str, str | None, str], EvidenceSink] = {}
    sent = 0
    for path in sorted(Path(folder).iterdir()):
        if not (path / "record.json").is_file():
            continue
        entry = _read_entry(path)
        key = (
            uri or entry["uri"],
            entry.get("run_id"),
            entry.get("experiment", DEFAULT_EXPERIMENT),
        )
        if key not in sinks:
            target = RunTarget(key[0], key[1], None, experiment_name=key[2])
            sinks[key] = EvidenceSink(target, folder, background=False)
        sink = sinks[key]
        if entry.get("run_id") is None and sink.target.run_id is not None:
            entry["run_id"] = sink.target.run_id
        try:
            sink._send(entry, path)
        except Exception as err:  # noqa: BLE001 - report and stop: order matters
            raise RuntimeError(
                f"replaying {path} to {key[0]} failed ({type(err).__name__}: {err}); "
                f"{sent} entries were sent, the rest stay in {folder}"
            ) from err
        shutil.rmtree(path)
        sent += 1
    return sent
