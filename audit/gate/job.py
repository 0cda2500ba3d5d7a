"""The audit job: a Hydra app over ``conf/audit.yaml``, run by ``model-audit`` (:mod:`audit.gate.cli`).

One audit, in this order, so that bad input changes nothing and an interruption at
any point never leaves a state that says more than what was done:

1. validate the config (types, thresholds, method names, alias), check that the
   tracking server answers and the reports folder is writable, load the probes and
   the candidate model (only allow-listed classes are imported; see
   :mod:`audit.gate.loading`); with ``engine.devices * engine.num_nodes > 1`` the other
   processes are started (or joined, under torchrun or srun) just before the loading,
   so every rank loads the same probes and model (:mod:`audit.engine.distributed`);
2. :func:`audit.pipeline.run_audit` (all heavy work happens before any MLflow write); with
   several processes each computes its share, rank zero gathers them and alone goes on
   to 3 and 4; a failure on any rank ends the job here, with exit 2;
3. the MLflow run: created RUNNING without a verdict (its description says the audit
   is under way or did not complete); the probe set (name, digest, source; no images)
   and the audited logged model, where the version has one, become its inputs; metrics,
   parameters, the reports and the config are logged; for a registry version, its record
   is read again and its weights re-hashed (:func:`audit.gate.registry.version_changes`): a version
   deleted and registered again, or other weights behind its source, closes the run FAILED
   and ends the job with exit 2; the local
   ``reports/<model>-<version>/`` set is replaced; the run is closed FINISHED; only then
   do the run's ``audit.verdict`` tag, the description with the verdict and its decisive
   reasons and the ``verdict_pass`` metric follow, in one call. A run that fails for the tool's own
   reasons (disk, network, a signal) is closed FAILED or KILLED and carries no verdict;
   one left RUNNING by a lost server is closed KILLED by the next audit once its
   lease (``tracking.run_lease_s``) has passed;
4. for a registry version: :func:`audit.gate.registry.apply_verdict` (evidence tags, then the
   verdict tag, then the history, then the alias on PASS only), with the version's identity
   checked before each write; a change seen there undoes the gate's own writes, marks the
   FINISHED run FAILED and removes its ``audit.verdict`` tag (its ``verdict_pass`` metric
   stays: MLflow cannot delete a metric), exit 2.

Exit codes: 0 PASS; 1 FAIL or INCONCLUSIVE (promotion blocked); 2 bad input, config,
a broken model, an unreachable store or an interruption, with one line on stderr. A
Hydra multirun (``-m``) audits each candidate and exits with the worst code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from audit import __version__
from audit.errors import AuditError, first_line, user_line
from audit.report.text import visible

__all__ = ["JobOutcome", "audit_from_config", "int_ranges", "main", "MAX_RUN_LEASE_S"]

EXIT_PASS, EXIT_BLOCKED, EXIT_ERROR = 0, 1, 2
TOOL_VERSION = f"model-audit {__version__}"
#: Seconds the health check of an ``http(s)`` tracking server may take.
HEALTH_TIMEOUT = 5.0
_NOTHING = "nothing was logged, tagged or promoted"
#: The longest ``tracking.run_lease_s``: a week (an audit run is closed KILLED after its lease).
MAX_RUN_LEASE_S = 7 * 24 * 3600
#: The example of each of the job's own integer keys in its error (the shipped default).
_EXAMPLES = {
    "probes.n_per_group": 256,
    "probes.size": 64,
    "probes.seed": 2024,
    "model.max_bytes": 2**31,
}


class JobError(AuditError):
    """Bad input or config: the message is the one line the user sees."""


class JobInterrupted(BaseException):
    """SIGTERM or SIGINT arrived: unwind (closing the run as KILLED) and exit 2.

    A ``BaseException``, so that no ``except Exception`` on the way swallows it.
    """


@dataclass
class JobOutcome:
    """What one audit did (one per candidate in a multirun)."""

    code: int
    model: str = ""
    verdict: str | None = None
    reasons: list[str] = field(default_factory=list)
    report_dir: Path | None = None
    run_id: str | None = None
    gate: str = ""
    error: str | None = None
    seconds: float = 0.0
    weights_sha256: str | None = None
    rank: int = 0


_OUTCOMES: list[JobOutcome] = []
_SIGNALLED: list[str] = []


def _on_signal(signum: int, _frame: Any) -> None:
    if _SIGNALLED:  # already unwinding: let the clean-up finish
        return
    _SIGNALLED.append(signal.Signals(signum).name)
    raise JobInterrupted(signal.Signals(signum).name)


# --------------------------------------------------------------------------- config checks
def int_ranges() -> dict[str, tuple[int, int]]:
    """The range (inclusive) of every integer key of the job's config, as its YAML comment states it.

    The engine's are :data:`audit.config.INT_RANGES`; the synthetic probes' follow the limits
    of a probe folder read whole (:data:`audit.probes.probe_set.DEFAULT_MAX_PIXELS` for one image's side;
    ``n_per_group`` is bounded jointly with ``size`` as well, see :func:`audit.probes.probe_set.pixels_problem`).
    """
    import math

    from audit.config import INT_RANGES
    from audit.datasets import MIN_SIZE
    from audit.probes.probe_set import DEFAULT_MAX_PIXELS

    return {
        **INT_RANGES,
        "probes.n_per_group": (1, 65536),
        "probes.size": (MIN_SIZE, math.isqrt(DEFAULT_MAX_PIXELS)),
        "probes.seed": (0, 2**32 - 1),
        "model.max_bytes": (1, 2**40),
    }


def _int(c: Mapping[str, Any], path: str) -> int:
    """The job's integer at ``path`` in its range (:func:`int_ranges`), checked by :func:`audit.config.check_int`."""
    from audit.config import AuditConfigError, check_int, value_at

    try:
        return check_int(value_at(c, path), path, *int_ranges()[path], example=_EXAMPLES[path])
    except AuditConfigError as err:
        raise JobError(f"{err}; {_NOTHING}") from None


def check_job_config(c: Mapping[str, Any]) -> None:
    """Types of the job's own keys, by the config kit of :mod:`audit.config` (the engine and gate
    are checked by :func:`audit.config.check_config`)."""
    from audit.config import check_bool, check_choice, check_text, value_at
    from audit.gate.registry import ON_CHAMPION_FAIL, POLICIES

    check_bool(c, "quiet")
    check_bool(c, "promote.tags")
    check_choice(c, "promote.on_champion_fail", ON_CHAMPION_FAIL)
    check_choice(c, "promote.policy", POLICIES)
    if (
        value_at(c, "promote.policy") == "none"
        and value_at(c, "promote.on_champion_fail") == "revoke"
    ):
        raise JobError(
            "promote.policy=none writes tags only, but promote.on_champion_fail=revoke would remove the alias: "
            "set promote.on_champion_fail=keep, or another promote.policy"
        )
    check_text(c, "tracking.uri", optional=True)
    check_text(c, "tracking.experiment")
    lease = value_at(c, "tracking.run_lease_s")
    if (
        isinstance(lease, bool)
        or not isinstance(lease, (int, float))
        or not 0 < lease <= MAX_RUN_LEASE_S
    ):
        raise JobError(
            f"tracking.run_lease_s must be a positive number of seconds, at most {MAX_RUN_LEASE_S} (a week); "
            f"got {lease!r} (e.g. tracking.run_lease_s=900; {_NOTHING})"
        )
    check_text(c, "paths.reports_dir")
    if "max_bytes" in value_at(c, "model"):
        _int(c, "model.max_bytes")
    if value_at(c, "probes").get("kind") == "synthetic":
        _check_synthetic(c)


def _check_synthetic(c: Mapping[str, Any]) -> None:
    """The synthetic probes' keys in range and within a probe folder's pixel limits, before any is drawn."""
    from importlib import import_module

    from audit.probes.probe_set import pixels_problem

    name = c["probes"].get("benchmark", "snow_wolf")
    if name not in ("snow_wolf", "stamps"):
        raise JobError(f"probes.benchmark must be snow_wolf or stamps; got {name!r}")
    n, size = _int(c, "probes.n_per_group"), _int(c, "probes.size")
    _int(c, "probes.seed")
    groups = len(import_module(f"audit.datasets.{name}").GROUPS)  # probe_set draws n per group
    problem = pixels_problem(groups * n, size, size)
    if problem:
        raise JobError(
            f"probes.n_per_group={n} with probes.size={size}: {problem} (the limit of a probe folder read whole, "
            f"audit.probes.probe_set.DEFAULT_MAX_TOTAL_PIXELS); lower probes.n_per_group or probes.size, e.g. "
            f"probes.n_per_group={_EXAMPLES['probes.n_per_group']} probes.size={_EXAMPLES['probes.size']} ({_NOTHING})"
        )


def _load_probes(spec: Mapping[str, Any]):
    from audit.config import check_bool, check_text
    from audit.probes import ProbeSet

    kind = spec.get("kind")
    try:
        if kind == "folder":
            path = check_text({"probes": spec}, "probes.path")
            check_bool({"probes": {"stream": spec.get("stream", True)}}, "probes.stream")
            # every file checked now, nothing decoded; with no probes.transform.size the size waits
            # for the model's input size (_fit_probes, after the model is loaded)
            explicit = _probe_transform(spec)
            return ProbeSet.open(path, transform=explicit, defer_size=explicit is None)
        if kind == "synthetic":
            from importlib import import_module

            name = spec.get("benchmark", "snow_wolf")  # checked with the config (_check_synthetic)
            c = {"probes": spec}
            n, size, seed = (
                _int(c, "probes.n_per_group"),
                _int(c, "probes.size"),
                _int(c, "probes.seed"),
            )
            try:
                return import_module(f"audit.datasets.{name}").probe_set(
                    n_per_group=n, size=size, seed=seed
                )
            except ValueError as err:
                raise JobError(f"probes ({name}): {err}") from None
    except FileNotFoundError as err:
        raise JobError(f"probe folder not found: {err}") from None
    raise JobError(
        f"probes.kind must be folder or synthetic; got {kind!r} (e.g. probes=folder probes.path=...)"
    )


def _transform_spec(spec: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(probes.transform.size, probes.transform.interpolation)`` as configured (defaults when absent)."""
    t = spec.get("transform")
    if t is None:
        return None, "bilinear"
    if not isinstance(t, Mapping):
        raise JobError(f"probes.transform must be a mapping with size and interpolation; got {t!r}")
    return t.get("size"), t.get("interpolation", "bilinear")


def _probe_transform(spec: Mapping[str, Any], input_size: tuple[int, int] | None = None):
    """The folder's :class:`audit.probes.transform.ProbeTransform`: probes.transform.size, else the
    model's ``input_size`` when given, else None; a bad value is a :class:`JobError`."""
    from audit.probes.transform import probe_transform

    size, interpolation = _transform_spec(spec)
    try:
        return probe_transform(size, interpolation, input_size=input_size)
    except ValueError as err:
        text = str(err)
        raise JobError(
            text if text.startswith(("probes.", "the model")) else f"probes.transform.{text}"
        ) from None


def _fit_probes(probes, spec: dict[str, Any], input_size: tuple[int, int] | None):
    """A probe folder brought to its final size once the model is loaded (other probes unchanged).

    The size is probes.transform.size, else the model's input size, else the files' one size
    (mixed sizes are refused here, naming probes.transform.size). With probes.stream=false
    the folder is decoded into memory now (``ProbeSet.load``). The size used is written back
    to ``spec`` (``transform.size``), so the run's config and dataset input record it.
    Nothing has been written to any store yet.
    """
    from audit.probes import ProbeSet

    if spec.get("kind") != "folder":
        return probes
    transform = _probe_transform(spec, input_size)
    fitted = probes.with_transform(transform)
    if not spec.get("stream", True):
        fitted = ProbeSet.load(spec["path"], transform=transform)
    if transform is not None:
        spec["transform"] = {
            **(spec.get("transform") or {}),
            "size": list(transform.size),
            "interpolation": transform.interpolation,
        }
    return fitted


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        if "Missing mandatory value" in str(err):
            hint = {
                "model.uri": "model.uri=models:/<name>@<alias> (or models:/<name>/<version>, runs:/<run>/model)",
                "model.path": "model.path=<file>",
                "probes.path": "probes.path=<probe folder>",
            }.get(key, f"{key}=<value>")
            raise JobError(f"{key} is required: pass {hint} on the command line") from None
        raise JobError(f"bad config: {first_line(err)}") from None


def _check_store(uri: str, setting: str = "tracking.uri") -> None:
    """Fail in seconds, before any heavy work, when the store cannot be used.

    ``setting`` names where the URI came from (``tracking.uri`` or ``$MLFLOW_TRACKING_URI``).
    """
    from audit.gate import tracking

    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        if not tracking.reachable(uri, HEALTH_TIMEOUT):
            raise JobError(
                f"the MLflow tracking server at {uri} does not answer its health check within "
                f"{HEALTH_TIMEOUT:g} s; start it or fix tracking.uri ({_NOTHING})"
            )
    elif parsed.scheme == "sqlite":
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:" and not Path(path).parent.is_dir():
            raise JobError(
                f"tracking.uri {uri} names a database in a folder that does not exist "
                f"({Path(path).parent}); create the folder or fix tracking.uri"
            )
    else:
        _check_scheme(uri, setting)


def _check_scheme(uri: str, setting: str) -> None:
    """A store other than SQLite or a server: MLflow must be able to open it (its scheme known,
    its driver installed), said as a sentence instead of MLflow's exception.

    MLflow's client opens both stores in its constructor: an unknown scheme fails there,
    before anything is read or written.
    """
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    from audit.gate import tracking

    use = "use sqlite:///path/mlflow.db, http(s)://host:port (an MLflow server)"
    if (
        urlparse(uri).scheme in ("", "file")
        and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true"
    ):
        raise JobError(
            f"{setting} {uri!r} is a file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true; "
            f"{use} ({_NOTHING})"
        )
    try:
        tracking.client(uri)
    except UnsupportedModelRegistryStoreURIException as err:
        others = [
            s for s in err.supported_uri_schemes if s not in ("", "file", "sqlite", "http", "https")
        ]
        also = f" or another scheme MLflow opens here ({', '.join(others)})" if others else ""
        raise JobError(
            f"{setting} {uri!r} is not a store MLflow can open; {use}{also} ({_NOTHING})"
        ) from None
    except Exception as err:  # noqa: BLE001 - a file store (refused by MLflow 3), a missing database driver, ...
        raise JobError(
            f"{setting} {uri!r} cannot be opened by MLflow ({type(err).__name__}: {first_line(err)}); {use} "
            f"({_NOTHING})"
        ) from None


def _check_reports_dir(reports_dir: str) -> None:
    """The reports folder can be created and written (checked before the audit, not after)."""
    root = Path(reports_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".model-audit-write-check-"):
            pass
    except OSError as err:
        raise JobError(
            f"the reports folder {root} is not writable ({err.strerror or type(err).__name__}); "
            f"set paths.reports_dir to a writable folder ({_NOTHING})"
        ) from None


# --------------------------------------------------------------------------- the audit
def audit_from_config(cfg: DictConfig | Mapping[str, Any]) -> JobOutcome:
    """Run one audit from a composed ``conf/audit.yaml`` config; never raises for bad input.

    Returns:
        A :class:`JobOutcome` whose ``code`` is the exit code.
    """
    t0 = time.perf_counter()
    if _SIGNALLED:
        return JobOutcome(code=EXIT_ERROR, error=f"not started: interrupted by {_SIGNALLED[0]}")
    state: dict[str, Any] = {}
    try:
        with _run_links_silenced(cfg):
            out = _audit(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg)), state)
    except AuditError as err:  # the one place a project error becomes its line and exit 2
        out = JobOutcome(code=EXIT_ERROR, error=_error_line(err, state.get("stage", "starting")))
    except JobInterrupted as sig:
        out = JobOutcome(code=EXIT_ERROR, error=_interrupted(str(sig), state))
    except Exception as err:  # noqa: BLE001 - e.g. a store that answers with an error: one line, exit 2
        stage = state.get("stage", "starting")
        run = (
            f"; run {state['run_id']} carries no verdict"
            if state.get("run_id") and stage != "gate"
            else ""
        )
        out = JobOutcome(
            code=EXIT_ERROR,
            error=f"unexpected {type(err).__name__} while {stage}: {first_line(err)}{run}; {_registry_note(stage)} "
            f"(if the input looks right, this is a bug: please report it with this line)",
        )
    out.seconds = time.perf_counter() - t0
    return _rank_outcome(out, state)


def _error_line(err: AuditError, stage: str) -> str:
    """The one line for a project error that ended the audit at ``stage``.

    The error's own line (:func:`audit.errors.user_line`); an error from the registry writes
    after ``registry gate:``; one from the audit itself (the engine, a rank, the gather)
    followed by the note that nothing was written. The job's own lines and a probe set's
    (which reads the same wherever the folder turns out bad) stand as they are.
    """
    line = user_line(err)
    if isinstance(err, JobError) or err.topic:
        return line
    if stage == "gate":
        return f"registry gate: {line}"
    if stage == "auditing":
        return f"{line} ({_NOTHING})"
    return line


def _launch(engine: Mapping[str, Any], state: dict[str, Any]):
    """:func:`audit.engine.distributed.launch` for the job: None for one process; a refusal is a :class:`JobError`."""
    from audit.engine.distributed import launch, world_of

    if world_of(engine) == 1:
        return None
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_run = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN
    if HydraConfig.initialized() and not hydra_run:
        raise JobError(
            f"engine.devices={engine['devices']} engine.num_nodes={engine['num_nodes']} does not combine with a "
            f"multirun (-m): every process would run every candidate; audit one candidate per command ({_NOTHING})"
        )
    state["stage"] = "starting the processes"
    try:
        return launch(engine, hydra_run=hydra_run)
    except ValueError as err:
        raise JobError(f"{err} ({_NOTHING})") from None


def _rank_outcome(out: JobOutcome, state: dict[str, Any]) -> JobOutcome:
    """A distributed audit's outcome on this rank; the process group is closed.

    A rank that failed before the gather sends its error there (no peer waits for it).
    Rank zero's outcome is the job's. Another rank prints nothing when every rank learnt
    the failure at the gather (rank zero reports it), and exits 0 where Lightning launched
    it here (its code reaches only Lightning's child observer, which SIGKILLs every process,
    rank zero too, when a child exits non-zero), 2 under torchrun or srun (whose own exit
    code then shows the failure). A gather that failed itself (a peer died or timed out) is
    one line on every rank that sees it.
    """
    ranks = state.get("ranks")
    if ranks is None:
        return out
    if out.error and not ranks.gathered:
        ranks.abandon(out.error)
    ranks.close()
    out.rank = ranks.rank
    if ranks.rank != 0 and out.error and ranks.delivered:
        out.error = None
        out.code = EXIT_PASS if ranks.launched_here else EXIT_ERROR
    return out


@contextlib.contextmanager
def _run_links_silenced(cfg: Mapping[str, Any]) -> Iterator[None]:
    """With ``quiet=true``, no "View run ... at: ..." / "View experiment at: ..." lines during the audit.

    MLflow writes them to stdout from ``MlflowClient.set_terminated`` for an http(s) store
    unless ``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT`` is true (read at each call); that
    variable is set for the audit and restored afterwards.
    """
    try:
        quiet = cfg.get("quiet") is True
    except Exception:  # noqa: BLE001 - a bad value is reported by the config check
        quiet = False
    name = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    before = os.environ.get(name)
    if quiet:
        os.environ[name] = "true"
    try:
        yield
    finally:
        if quiet and before is None:
            os.environ.pop(name, None)
        elif quiet:
            os.environ[name] = before


def _interrupted(name: str, state: Mapping[str, Any]) -> str:
    stage = state.get("stage", "starting")
    run = state.get("run_id")
    closed = ""
    if run and stage == "closing the run" and state.get("run_status") == "FINISHED":
        closed = f"; run {run} is FINISHED without a verdict"
    elif run and stage != "gate":
        closed = f"; run {run} was closed as KILLED, without a verdict"
    return f"interrupted by {name} while {stage}{closed}; {_registry_note(stage)}"


def _registry_note(stage: str) -> str:
    """What the registry holds after a failure at ``stage``."""
    if stage == "gate":
        return (
            "the registry writes stopped part way (a verdict tag is written after its evidence, so none "
            "is misleading); re-run the audit"
        )
    return "nothing was tagged or promoted"


def _audit(cfg: DictConfig, state: dict[str, Any]) -> JobOutcome:
    from audit.gate import tracking
    from audit.gate.loading import load_model
    from audit.gate.registry import (
        VersionChangedError,
        apply_verdict,
        check_alias,
        describe_policy,
    )
    from audit.pipeline import check_config, merge_config, run_audit

    state["stage"] = "checking the config"
    c = plain_config(cfg)
    check_job_config(c)
    quiet = c["quiet"]
    say = (lambda _m: None) if quiet else (lambda m: _console(f"[model-audit] {m}"))
    # 1. validate everything before touching a model or a store (an AuditError from here on
    # is worded by _error_line: audit_from_config catches them all)
    audit_cfg = check_config(merge_config({"engine": c["engine"], "gate": c["gate"]}))
    alias = check_alias(c["promote"]["alias"])
    uri = tracking.tracking_uri(c["tracking"]["uri"])
    setting = "tracking.uri" if c["tracking"]["uri"] else "$MLFLOW_TRACKING_URI"
    _check_store(uri, setting)
    _check_reports_dir(c["paths"]["reports_dir"])
    # engine.devices * engine.num_nodes > 1: start (or join) the other processes now, so that every
    # rank loads the same probes and model below (audit/engine/distributed.py); one process starts nothing
    ranks = state["ranks"] = _launch(audit_cfg["engine"], state)
    if ranks is not None and ranks.rank != 0:
        say = lambda _m: None  # noqa: E731 - rank zero speaks for the job
    elif ranks is not None:
        say(
            f"{ranks.world} processes (Lightning DDP, {ranks.backend}): rank zero gathers their shares and decides"
        )
    state["stage"] = "loading the probes"
    probes = _load_probes(c["probes"])
    probes.check_names()  # a folder is checked on load; a synthetic set here, before the audit
    state["stage"] = "loading the model"
    say(f"loading {c['model'].get('uri') or c['model'].get('path')} ({c['model']['kind']})")
    loaded = load_model(c["model"], tracking_uri=uri)
    state["stage"] = "loading the probes"
    probes = _fit_probes(probes, c["probes"], loaded.input_size)
    _check_input_size(loaded, probes)
    name = loaded.name
    weights = getattr(loaded, "weights_sha256", None)
    identity = getattr(loaded, "identity", None)
    say(f"auditing {name} on {len(probes)} probes")
    # 2. the audit
    state["stage"] = "auditing"
    # a rank's failure (ShardError) is known to every rank after the gather; a streamed folder's
    # file that passed its header check but does not decode is a ProbeSetError, as from ProbeSet.load
    result = run_audit(loaded.model, probes, audit_cfg, progress=say, ranks=ranks)
    if (
        result is None
    ):  # a rank other than zero: its share is gathered; rank zero decides and writes
        return JobOutcome(code=EXIT_PASS, model=_display(loaded), rank=ranks.rank if ranks else 0)
    say(
        f"verdict {result.verdict} after {result.seconds:.1f} s (probe digest {result.probes['digest'][:12]})"
    )
    model_info = {
        "name": name,
        "version": loaded.registered_version,
        "uri": loaded.uri,
        "registered_name": loaded.registered_name,
        "kind": loaded.kind,
        "layout": loaded.layout,
        "weights_sha256": weights,
        # what identifies a registry version (verify compares them with the version's now)
        **(
            {"source": identity.source, "created": identity.creation_timestamp}
            if identity is not None
            else {}
        ),
    }
    if loaded.registered_name and loaded.registered_version and c["promote"]["tags"]:
        model_info["promotion"] = describe_policy(
            c["promote"]["policy"], alias, c["promote"]["on_champion_fail"]
        )
    # 3. the MLflow run and the reports (reports name the run, the run holds the reports)
    from audit.report.write import report_folder

    folder = report_folder(c["paths"]["reports_dir"], name, loaded.registered_version)
    _check_store(
        uri
    )  # the audit took a while: a server lost meanwhile fails here, before any write
    state["stage"] = "logging the run"
    client = tracking.client(uri)
    confirm = (lambda: _confirm_version(client, identity, uri)) if identity is not None else None
    run_id = _log_run(client, c, result, model_info, folder, state, before_close=confirm)
    # 4. the registry gate
    gate_note = "not a registry version: no tags, no alias"
    if loaded.registered_name and loaded.registered_version and not c["promote"]["tags"]:
        gate_note = "promote.tags=false: no tags, no alias"
    elif loaded.registered_name and loaded.registered_version:
        state["stage"] = "gate"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        extra = {
            "audit.tool_version": TOOL_VERSION,
            "audit.audited_at": stamp,
            "audit.run_link": _run_link(uri, state.get("experiment_id"), run_id),
        }
        if weights:
            extra["audit.weights_sha256"] = weights
        try:
            g = apply_verdict(
                loaded.registered_name,
                loaded.registered_version,
                result.verdict,
                run_id,
                result.probes["digest"],
                alias=alias,
                client=client,
                extra_tags=extra,
                on_champion_fail=c["promote"]["on_champion_fail"],
                policy=c["promote"]["policy"],
                history=f"{stamp} {result.verdict} run={run_id} {TOOL_VERSION}",
                identity=identity,
                tracking_uri=uri,
            )
        except VersionChangedError as err:  # the run says FINISHED with a verdict: take it back
            raise JobError(f"registry gate: {err}; {_fail_judged_run(client, run_id)}") from None
        gate_note = _gate_note(g, result.verdict, alias)
    code = EXIT_PASS if result.verdict == "PASS" else EXIT_BLOCKED
    decisive = [ch.finding for ch in result.checks if ch.decisive] or result.findings[:1]
    out = JobOutcome(
        code=code,
        model=_display(loaded),
        verdict=result.verdict,
        reasons=decisive,
        report_dir=folder,
        run_id=run_id,
        gate=gate_note,
        weights_sha256=weights,
    )
    if quiet:
        _console(f"{out.model}: {result.verdict}")
    else:
        print()
        _console(f"{out.model}: {result.verdict}")
        for r in decisive:
            _console(f"  - {r}")
        _console(f"  registry: {gate_note}")
        _console(f"  report:   {folder / 'report.html'}")
        _console(f"  run:      {run_id} ({uri})")
    return out


def _check_input_size(loaded, probes) -> None:
    """Probe images (after ``probes.transform``) of the size the model's source fixes (an exported program)."""
    want = getattr(loaded, "input_size", None)
    got = tuple(int(v) for v in probes.size)
    if want is None or got == tuple(want):
        return
    (h, w), (ph, pw) = want, got
    raise JobError(
        f"{_display(loaded)} takes {h}x{w} images (its {loaded.layout} model fixes the input size) but the probe "
        f"images are {ph}x{pw}: give probes of {h}x{w} (a synthetic set: probes.size={h}; a folder: "
        f"probes.transform.size=[{h},{w}]) ({_NOTHING})"
    )


def _console(line: str, *, err: bool = False) -> None:
    """One line on stdout (stderr with ``err``), every invisible character in it shown as its
    escape (:func:`audit.report.text.visible`): a model, class or group name cannot reorder, hide or
    rewrite what the console shows."""
    print(visible(line), file=sys.stderr if err else sys.stdout, flush=True)


def _confirm_version(client, identity, uri: str) -> None:
    """Raise :class:`audit.gate.registry.VersionChangedError` when the version audited is no longer the
    one in the registry (its record, or the weights its source holds now)."""
    from audit.gate.registry import VersionChangedError, changed_line, version_changes

    changes = version_changes(client, identity, weights=True, tracking_uri=uri)
    if changes:
        raise VersionChangedError(changed_line(identity, changes), changes, [], [])


def _fail_judged_run(client, run_id: str) -> str:
    """Mark the audit's FINISHED run FAILED after its version changed under the gate: the verdict
    tag goes first (a run never carries a verdict unless FINISHED); what was done, as a clause."""
    reason = "the registry version changed during the audit; the gate wrote no verdict and moved no alias"
    try:
        client.delete_tag(run_id, "audit.verdict")
        client.set_tag(run_id, "audit.error", reason)
        client.set_tag(
            run_id,
            "mlflow.note.content",
            f"**No verdict: {reason}.** See the run tag `audit.error`.",
        )
        client.set_terminated(run_id, "FAILED")
    except Exception as err:  # noqa: BLE001 - the change is the error reported; this says what is left
        return (
            f"the run {run_id} could not be marked FAILED ({type(err).__name__}: {first_line(err)}): "
            f"delete its audit.verdict tag by hand"
        )
    return (
        f"the run {run_id} was marked FAILED and its audit.verdict tag removed (its verdict_pass "
        f"metric stays: MLflow cannot delete a metric)"
    )


def _gate_note(g, verdict: str, alias: str) -> str:
    note = _alias_note(g, verdict, alias)
    return "; ".join([note, *getattr(g, "concurrent", ())])


def _alias_note(g, verdict: str, alias: str) -> str:
    if getattr(g, "held_back", None):
        return f"alias '{alias}' not moved: {g.held_back}"
    if g.alias_moved:
        return f"alias '{alias}' moved to {g.registered_name} v{g.version}" + (
            f" (was v{g.previous_holder})" if g.previous_holder else ""
        )
    if verdict == "PASS":
        return f"alias '{alias}' already on v{g.version}"
    if g.alias_revoked:
        return f"alias '{alias}' removed from v{g.version}, the champion that no longer PASSes"
    if g.champion_alert:
        return f"alias '{alias}' stays on v{g.version}, the champion that no longer PASSes (model tag audit.champion_alert)"
    holder = f"v{g.previous_holder}" if g.previous_holder else "unset"
    return f"alias '{alias}' not moved (stays {holder})"


def _display(loaded) -> str:
    if loaded.registered_name and loaded.registered_version:
        return f"{loaded.registered_name} v{loaded.registered_version}"
    return loaded.name


#: Most characters of the run's description (MLflow allows 8000 in a tag value).
DESCRIPTION_MAX = 5000


def _description(model_info: Mapping[str, Any], result, *, final: bool = False) -> str:
    """The run's description (``mlflow.note.content``, Markdown), shown at the top of the run's page.

    The first one (``final=False``) says the audit is under way or did not complete and
    carries no verdict; the final one leads with the verdict and its decisive reasons
    and is written in the same call as the ``audit.verdict`` tag, so a run that did not
    complete never shows a verdict. Every user string (model name, URI, findings) is an
    inline code span (:func:`audit.report.write.code_span`): inert in Markdown.
    """
    from audit.report.write import code_span, sentence

    name, version = model_info.get("registered_name"), model_info.get("version")
    shown = str(version) if str(version).isdigit() else code_span(version)
    what = (
        f"registered model {code_span(name)} version {shown}"
        if name and version
        else code_span(model_info.get("uri"))
    )
    about = (
        f"Model {code_span(model_info.get('uri'))}, weights sha256 {code_span(model_info.get('weights_sha256') or 'unknown')}; "
        f"probe set {code_span(result.probes['digest'])} ({result.probes.get('n', '?')} probes, the run's dataset input). "
        f"Reports: the artifacts under `report/` (report.html). {TOOL_VERSION}."
    )
    if not final:
        return (
            f"**No verdict: the audit of {what} is under way or did not complete.** The verdict is written "
            f"here and as the run tag `audit.verdict` only once the run is complete.\n\n{about}"
        )
    verdict = str(result.verdict)
    gate = "may be promoted" if verdict == "PASS" else "promotion blocked"
    reasons = [ch.finding for ch in result.checks if ch.decisive] or result.findings[:1]
    head = f"**{verdict}** ({gate}): model-audit gate run for {what}. " + (
        "Why:" if reasons else "No check decided it."
    )
    lines: list[str] = []
    budget = DESCRIPTION_MAX - len(head) - len(about) - 200
    for i, r in enumerate(
        reasons
    ):  # the first lines are what the run page shows before "Show more"
        line = f"- {code_span(sentence(r))}"
        if len(line) + 1 > budget:
            lines.append(f"- ... and {len(reasons) - i} more in report.html")
            break
        budget -= len(line) + 1
        lines.append(line)
    return "\n\n".join(x for x in (head, "\n".join(lines), about) if x)[:DESCRIPTION_MAX]


def _probe_input(c: Mapping[str, Any], result):
    """The probe set as the run's dataset input: its name, digest and source; no image is uploaded.

    MLflow keeps at most 36 characters of a dataset digest: the digest is the first 36
    hex characters of the probe set's SHA-256 (the full one is the input tag
    ``audit.probe_digest``, the profile's ``sha256`` and the run tag ``audit.probe_digest``).
    A probe folder is a ``local`` source (its absolute path); a benchmark set is a
    ``code`` source naming the generator and its arguments.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    spec, probes = c["probes"], result.probes
    if spec.get("kind") == "folder":
        folder = Path(str(spec["path"])).absolute()
        name, source_type, source = folder.name or str(folder), "local", {"uri": str(folder)}
        transform = spec.get("transform") or {}
        if transform.get("size") is not None:  # the resolved size (_audit): what the model saw
            source["transform"] = {
                "size": list(transform["size"]),
                "interpolation": transform.get("interpolation"),
            }
    else:
        bench = str(spec.get("benchmark", "snow_wolf"))
        args = {k: spec.get(k) for k in ("n_per_group", "size", "seed")}
        name = f"{bench} probes (" + ", ".join(f"{k}={v}" for k, v in args.items()) + ")"
        source_type = "code"
        source = {
            "tags": {
                "generator": f"audit.datasets.{bench}.probe_set",
                **{k: str(v) for k, v in args.items()},
            }
        }
    profile = {
        "num_rows": probes.get("n"),
        "sha256": probes["digest"],
        "classes": probes.get("classes"),
        "groups": probes.get("groups"),
        "size": probes.get("size"),
    }
    dataset = Dataset(
        name=name[:500],
        digest=str(probes["digest"])[:36],
        source_type=source_type,
        source=json.dumps(source),
        profile=json.dumps(profile),
    )
    return DatasetInput(
        dataset,
        tags=[
            InputTag("mlflow.data.context", "probes"),
            InputTag("audit.probe_digest", str(probes["digest"])),
        ],
    )


def _logged_model_id(client, model_info: Mapping[str, Any]) -> str | None:
    """The MLflow 3 logged model (``model_id``) behind the audited model, or None (e.g. a version
    registered from run artifacts, or a file).

    A registry version names it in ``model_id`` where the registry keeps one; a SQL
    registry (MLflow 3.17) keeps it only as the version's source ``models:/<model_id>``,
    which ``mlflow.register_model`` writes for a logged model. A ``models:/<model_id>``
    URI names it directly.
    """
    name, version = model_info.get("registered_name"), model_info.get("version")
    if name and version:
        mv = client.get_model_version(name, version)
        return getattr(mv, "model_id", None) or _model_id_of(str(mv.source or ""))
    return _model_id_of(str(model_info.get("uri") or ""))


def _model_id_of(uri: str) -> str | None:
    """``<id>`` of ``models:/<id>`` (one path part, no alias), else None."""
    rest = uri[len("models:/") :].strip("/") if uri.startswith("models:/") else ""
    return rest if rest and "/" not in rest and "@" not in rest else None


def _run_link(uri: str, exp_id: str | None, run_id: str) -> str:
    """Where the audit's run is in the MLflow UI: the full address for an http(s) tracking server,
    else the page path to append to the address of ``mlflow ui`` serving this store."""
    page = f"#/experiments/{exp_id}/runs/{run_id}"
    if urlparse(uri).scheme in ("http", "https"):
        parsed = urlparse(uri)
        host = parsed.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parsed.port}" if parsed.port else ""
        return (
            f"{parsed.scheme}://{netloc}{parsed.path.rstrip('/')}/{page}"  # no credentials in a tag
        )
    return page


def _reap_stale_runs(client, exp_id: str) -> None:
    """Close, as KILLED, audit runs left RUNNING past their lease (their process or server died)."""
    now = time.time()
    for run in client.search_runs(
        [exp_id], filter_string="attributes.status = 'RUNNING'", max_results=200
    ):
        deadline = run.data.tags.get("audit.deadline")
        try:
            expired = deadline is not None and float(deadline) < now
        except ValueError:
            expired = False
        if expired:
            client.set_tag(
                run.info.run_id,
                "audit.error",
                "interrupted: left RUNNING past its lease; closed by a later audit",
            )
            client.set_terminated(run.info.run_id, "KILLED")


def _log_run(
    client,
    c: Mapping[str, Any],
    result,
    model_info: Mapping[str, Any],
    folder: Path,
    state: dict[str, Any],
    before_close: Any = None,
) -> str:
    """Create, fill and close the audit's run (see the module docstring for the order); returns its id.

    ``before_close`` (for a registry version: the check that it is still the version audited)
    runs once the run's artifacts are logged, before the local reports and the close; a
    :class:`audit.gate.registry.VersionChangedError` from it closes the run FAILED, without a verdict.
    """
    from mlflow.entities import RunTag

    from audit.gate import tracking
    from audit.gate.registry import VersionChangedError
    from audit.report.write import render_reports, write_rendered

    exp_name = c["tracking"]["experiment"]
    uri = client.tracking_uri
    try:
        exp = client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
        _reap_stale_runs(client, exp_id)
        model_id = _logged_model_id(client, model_info)
        tags = {
            "audit.probe_digest": result.probes["digest"],
            "audit.model_uri": str(model_info["uri"]),
            "audit.tool_version": TOOL_VERSION,
            "audit.deadline": f"{time.time() + float(c['tracking']['run_lease_s']):.0f}",
            "mlflow.note.content": _description(model_info, result),
        }
        for key in ("registered_name", "version", "weights_sha256"):
            if model_info.get(key):
                tags[
                    f"audit.model_{key}" if key != "weights_sha256" else "audit.weights_sha256"
                ] = str(model_info[key])
        if model_id:
            tags["audit.model_id"] = model_id
        tags.update(_identity_tags(model_info))
        run = client.create_run(
            exp_id,
            run_name=f"audit-{model_info['name']}"
            + (f"-v{model_info['version']}" if model_info["version"] else ""),
            tags=tags,
        )
    except Exception as err:  # noqa: BLE001 - one clear line instead of a traceback
        raise JobError(
            f"could not start the audit's run in MLflow at {uri} ({type(err).__name__}: {first_line(err)}); "
            f"{_NOTHING}; check tracking.uri and that the store is reachable"
        ) from None
    run_id = state["run_id"] = run.info.run_id
    state["experiment_id"] = exp_id
    status = "FAILED"
    try:
        from mlflow.entities import LoggedModelInput

        # the probe set and the audited logged model (if any) as the run's inputs
        client.log_inputs(
            run_id,
            datasets=[_probe_input(c, result)],
            models=[LoggedModelInput(model_id)] if model_id else None,
        )
        reports = render_reports(
            result, model_info, run_id
        )  # once: the run's copy and the local one are the same
        with tempfile.TemporaryDirectory(prefix="model-audit-report-") as tmp:
            write_rendered(reports, Path(tmp) / "report")
            client.log_batch(
                run_id,
                metrics=[
                    _metric(tracking.metric_key(k), v)
                    for k, v in result.metrics.items()
                    if _finite(v)
                ],
                params=[_param(k, v) for k, v in _run_params(result).items()],
            )
            client.log_artifacts(run_id, str(Path(tmp) / "report"), artifact_path="report")
            cfg_file = Path(tmp) / "audit_config.yaml"
            cfg_file.write_text(OmegaConf.to_yaml(OmegaConf.create(dict(c))), encoding="utf-8")
            client.log_artifact(run_id, str(cfg_file))
        if before_close is not None:
            state["stage"] = "checking the version"
            before_close()
        state["stage"] = "writing the reports"
        write_rendered(reports, folder)
        state["stage"] = "closing the run"
        client.set_terminated(run_id, "FINISHED")
        status = state["run_status"] = "FINISHED"
        # the verdict last, in one call with the description that states it: a run that did not
        # complete never carries one
        client.log_batch(
            run_id,
            metrics=[_metric("verdict_pass", 1.0 if result.verdict == "PASS" else 0.0)],
            tags=[
                RunTag("audit.verdict", result.verdict),
                RunTag("mlflow.note.content", _description(model_info, result, final=True)),
            ],
        )
    except JobInterrupted:
        status = "KILLED" if status != "FINISHED" else status
        raise
    except VersionChangedError as err:
        where = (
            "was closed as FAILED, without a verdict"
            if _close_quietly(client, run_id, "FAILED")
            else (
                f"stays RUNNING, without a verdict, until a later audit closes it (its lease: {c['tracking']['run_lease_s']} s)"
            )
        )
        status = "FINISHED"  # handled: the finally below has nothing left to close
        raise JobError(f"registry gate: {err}; the run {run_id} {where}") from None
    except Exception as err:  # noqa: BLE001 - one clear line instead of a traceback
        if status == "FINISHED":
            where = "is FINISHED, but its verdict tag could not be written"
        elif _close_quietly(client, run_id, status):
            where = "was closed as FAILED, without a verdict"
        else:
            where = (
                f"stays RUNNING, without a verdict, until a later audit closes it "
                f"(its lease: {c['tracking']['run_lease_s']} s)"
            )
        status = "FINISHED"  # handled: the finally below has nothing left to close
        raise JobError(
            f"could not complete the audit's run {run_id} in MLflow at {uri} or its reports in {folder} "
            f"({type(err).__name__}: {first_line(err)}); the run {where}; nothing was tagged or promoted"
        ) from None
    finally:
        if status != "FINISHED":
            _close_quietly(client, run_id, status)
    return run_id


def _identity_tags(model_info: Mapping[str, Any]) -> dict[str, str]:
    """``audit.model_source`` and ``audit.model_created``: the registry version's source and creation
    time when it was loaded (:class:`audit.gate.loading.VersionIdentity`), which ``model-audit verify``
    compares with the version's now; none for a model that is not a registry version."""
    if "source" not in model_info:
        return {}
    return {
        "audit.model_source": str(model_info["source"]),
        "audit.model_created": str(model_info["created"]),
    }


def _close_quietly(client, run_id: str, status: str) -> bool:
    """End a run that failed; False when the store is gone too (the next audit closes it: its lease)."""
    from audit.gate import tracking

    if not tracking.reachable(client.tracking_uri, 2.0):
        return False
    try:
        client.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001 - already failing: the first error is the one reported
        return False
    return True


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def _run_params(result: Any) -> dict[str, Any]:
    """The run's parameters: the engine and gate config, flat, and ``<method>.layer`` per layer-based method.

    ``gradcam.layer`` names the layer Grad-CAM explained at (its default for the model
    and probe size, e.g. ``layer4`` or ``encoder.layers.encoder_layer_11.ln_1``, or the
    configured one), so two runs' Grad-CAM numbers can be told apart.
    """
    from audit.report.write import method_layers

    params = _flat({"engine": result.config["engine"], "gate": result.config["gate"]})
    for method, layer in method_layers(result).items():
        params[f"{method}.layer"] = layer
    return params


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


def _finite(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


# --------------------------------------------------------------------------- entry point
def config_error_line(err: BaseException, overrides: list[str] | None = None) -> str:
    """Hydra's and OmegaConf's multi-line composition errors as one line."""
    from hydra.errors import OverrideParseException

    text = str(err)
    cause = err.__cause__
    if isinstance(err, OverrideParseException):
        bad = [
            o
            for o in overrides or []
            if o.split("=", 1)[-1] and re.search(re.escape(o.split("=", 1)[-1][:20]), text)
        ]
        which = f"the override {bad[0]!r}" if bad else "an override"
        return f"cannot parse {which}: {first_line(err)} (override syntax: key=value, lists [a,b], mappings {{k: v}})"
    if (
        re.match(r"Could not override '([^']+)'", text)
        and cause is not None
        and "not in struct" in str(cause)
    ):
        key = getattr(cause, "full_key", None) or re.match(
            r"Could not override '([^']+)'", text
        ).group(1)
        return f"unknown config key '{key}': {_unknown_key_hint(key, overrides or [])}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    lines = [
        ln for ln in lines if not ln.startswith("Set the environment variable HYDRA_FULL_ERROR")
    ]
    if len(lines) > 1 and lines[1].startswith("Available options"):
        return f"{lines[0]}; {lines[1].rstrip(':').lower()}: {', '.join(lines[2:])}"
    if cause is not None and str(cause).strip():
        lines.append(first_line(cause))
    return "; ".join(lines) or type(err).__name__


def _unknown_key_hint(key: str, overrides: list[str]) -> str:
    """What to do about an unknown key: the ``+`` form for open mappings, the group option that
    has the key, or the spelling."""
    value = next(
        (o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key and "=" in o), "<value>"
    )
    if key.startswith("engine.method_options.") and key.count(".") == 2:
        return (
            f"a method's options are added with a leading '+', e.g. +{key}.layer=<name>"
            " (`model-audit --cfg job` prints every key with its value)"
        )
    from audit.gate.options import groups

    group, _, rest = key.partition(".")
    chosen = {o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == group and "=" in o}
    owners = [
        o.name
        for g in groups()
        if g.name == group
        for o in g.options
        if o.name not in chosen and any(k.path == rest for k in o.keys)
    ]
    if owners:
        return (
            f"'{rest}' is a key of {' and '.join(f'{group}={n}' for n in owners)}, not of the {group} "
            f"option in use; choose it first, e.g. {group}={owners[0]} {key}={value}"
        )
    return "check its spelling (`model-audit --cfg job` prints every key with its value)"


def _run_folder_error(err: OSError) -> str:
    """The one line for a file error out of Hydra itself (the audit catches its own): Hydra creates
    its run folder (``hydra.run.dir``, under ``paths.output_dir``) and writes its config and log
    there before the audit starts."""
    what = err.strerror or type(err).__name__
    return (
        f"cannot write Hydra's run folder ({what}: {err.filename!r}); Hydra writes hydra.run.dir = "
        f"${{paths.output_dir}}/audit/<time> (multirun: hydra.sweep.dir) before the audit starts: set "
        f"paths.output_dir (or hydra.run.dir) to a writable folder; the audit did not start, no report was "
        f"written ({_NOTHING})"
    )


@hydra.main(version_base="1.3", config_path="pkg://audit.conf", config_name="audit")
def _app(cfg: DictConfig) -> int:
    outcome = audit_from_config(cfg)
    _OUTCOMES.append(outcome)
    if outcome.error:
        _console(f"model-audit: error: {outcome.error}", err=True)
    return outcome.code


def main() -> None:
    """Run the Hydra app (one audit, or a multirun's) and exit 0 / 1 / 2 (worst over a multirun).

    The ``model-audit`` command (:func:`audit.gate.cli.main`) calls this for everything
    but its subcommands. ``--help`` is Hydra's app help with the template of
    ``conf/audit.yaml``, whose group list comes from the resolver ``model_audit_groups``
    (:func:`audit.gate.options.help_groups`).
    """
    from audit.gate import tracking

    if not OmegaConf.has_resolver("model_audit_groups"):
        from audit.gate.options import help_groups

        OmegaConf.register_new_resolver("model_audit_groups", help_groups)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Hydra raises instead of printing its multi-line text; config_error_line makes it one line
    os.environ["HYDRA_FULL_ERROR"] = "1"
    tracking.bound_http_calls()
    _OUTCOMES.clear()
    _SIGNALLED.clear()
    handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    codes: list[int] = []
    try:
        _app()
    except SystemExit as err:  # Hydra's own exits (--help, --cfg: 0)
        if err.code not in (0, None):
            codes.append(EXIT_ERROR)
    except JobInterrupted as sig:
        _console(f"model-audit: error: interrupted by {sig} before the audit started", err=True)
        codes.append(EXIT_ERROR)
    except OSError as err:
        if err.filename is None:  # not a path (e.g. a closed stdout): reported as any other error
            _console(f"model-audit: error: {config_error_line(err, sys.argv[1:])}", err=True)
        else:
            _console(f"model-audit: error: {_run_folder_error(err)}", err=True)
        codes.append(EXIT_ERROR)
    except Exception as err:  # noqa: BLE001 - Hydra composition and override errors: one line
        _console(f"model-audit: error: {config_error_line(err, sys.argv[1:])}", err=True)
        codes.append(EXIT_ERROR)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    codes += [o.code for o in _OUTCOMES]
    if len(_OUTCOMES) > 1:
        print("\nmodel-audit: summary")
        for o in _OUTCOMES:
            label = o.verdict or "ERROR"
            _console(
                f"  {o.model or '?':<32} {label:<13} exit {o.code}"
                + (f"  {o.error}" if o.error else "")
            )
    sys.exit(max(codes) if codes else EXIT_PASS)


if __name__ == "__main__":
    main()
