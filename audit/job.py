"""The audit gate as a command: ``model-audit`` (also ``python -m audit``), a Hydra app over ``conf/audit.yaml``.

One audit, in this order, so that bad input changes nothing:

1. validate the config (thresholds, method names, alias) and load the probes and the
   candidate model (MLflow URI, Lightning checkpoint, or ``_target_`` + state_dict);
2. :func:`audit.bias.run_audit`;
3. write ``reports/<model>-<version or name>/report.{html,json,md}``;
4. log an MLflow run with the metrics, the reports and the config;
5. for a registry version: tag it (``audit.verdict``, ``audit.run_id``,
   ``audit.probe_digest``) and move the promotion alias on PASS only.

Exit codes: 0 PASS; 1 FAIL or INCONCLUSIVE (promotion blocked); 2 bad input, config or
an unreachable store, with one clear message and no registry write. A Hydra multirun
(``-m``) audits each candidate and exits with the worst code.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["JobOutcome", "audit_from_config", "main"]

EXIT_PASS, EXIT_BLOCKED, EXIT_ERROR = 0, 1, 2


class JobError(Exception):
    """Bad input or config: the message is the one line the user sees."""


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


_OUTCOMES: list[JobOutcome] = []


def _load_probes(spec: Mapping[str, Any]):
    from audit.probes import ProbeSet, ProbeSetError

    kind = spec.get("kind")
    try:
        if kind == "folder":
            return ProbeSet.load(spec["path"])
        if kind == "synthetic":
            from importlib import import_module

            name = spec.get("benchmark", "snow_wolf")
            try:
                bench = import_module(f"audit.datasets.{name}")
            except ModuleNotFoundError:
                raise JobError(f"probes.benchmark={name!r} is not a synthetic benchmark; use snow_wolf or stamps") from None
            return bench.probe_set(n_per_group=int(spec["n_per_group"]), size=int(spec["size"]), seed=int(spec["seed"]))
    except ProbeSetError as err:
        raise JobError(f"bad probe set: {err}") from None
    except FileNotFoundError as err:
        raise JobError(f"probe folder not found: {err}") from None
    raise JobError(f"probes.kind must be folder or synthetic; got {kind!r} (e.g. probes=folder probes.path=...)")


def _plain(cfg: DictConfig) -> dict[str, Any]:
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
        raise JobError(f"bad config: {err}".splitlines()[0]) from None


def audit_from_config(cfg: DictConfig | Mapping[str, Any]) -> JobOutcome:
    """Run one audit from a composed ``conf/audit.yaml`` config; never raises for bad input.

    Returns:
        A :class:`JobOutcome` whose ``code`` is the exit code.
    """
    t0 = time.perf_counter()
    try:
        out = _audit(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg)))
    except JobError as err:
        out = JobOutcome(code=EXIT_ERROR, error=str(err))
    out.seconds = time.perf_counter() - t0
    return out


def _audit(cfg: DictConfig) -> JobOutcome:
    from audit import tracking
    from audit.bias import AuditConfigError, check_config, merge_config, run_audit
    from audit.gate import GateError, GateWriteError, apply_verdict, check_alias
    from audit.loading import ModelLoadError, load_model

    c = _plain(cfg)
    quiet = bool(c.get("quiet", False))
    say = (lambda _m: None) if quiet else (lambda m: print(f"[model-audit] {m}", flush=True))
    # 1. validate everything before touching a model or a store
    try:
        audit_cfg = check_config(merge_config({"engine": c["engine"], "gate": c["gate"]}))
        alias = check_alias(c["promote"]["alias"])
    except (AuditConfigError, GateError) as err:
        raise JobError(str(err)) from None
    probes = _load_probes(c["probes"])
    uri = tracking.tracking_uri(c["tracking"]["uri"])
    say(f"loading {c['model'].get('uri') or c['model'].get('path')} ({c['model']['kind']})")
    try:
        loaded = load_model(c["model"], tracking_uri=uri)
    except ModelLoadError as err:
        raise JobError(str(err)) from None
    name = loaded.name
    say(f"auditing {name} on {len(probes)} probes")
    # 2. the audit
    try:
        result = run_audit(loaded.model, probes, audit_cfg, progress=say)
    except AuditConfigError as err:
        raise JobError(str(err)) from None
    # the digest hashes every pixel: run_audit computed it once, for the result
    say(f"verdict {result.verdict} after {result.seconds:.1f} s (probe digest {result.probes['digest'][:12]})")
    model_info = {
        "name": name,
        "version": loaded.registered_version,
        "uri": loaded.uri,
        "registered_name": loaded.registered_name,
        "kind": loaded.kind,
        "layout": loaded.layout,
    }
    # 3./4. the MLflow run and the reports (reports name the run, the run holds the reports)
    from audit.report import report_folder, write_reports

    folder = report_folder(c["paths"]["reports_dir"], name, loaded.registered_version)
    client = tracking.client(uri)
    try:
        run_id = _log_run(client, c, result, model_info, folder, write_reports)
    except Exception as err:  # noqa: BLE001 - one clear line instead of a traceback
        raise JobError(
            f"could not log the audit to MLflow at {uri} ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"nothing was tagged or promoted; check tracking.uri and that the store is reachable"
        ) from None
    # 5. the registry gate
    gate_note = "not a registry version: no tags, no alias"
    if loaded.registered_name and loaded.registered_version and c["promote"]["tags"]:
        try:
            g = apply_verdict(
                loaded.registered_name, loaded.registered_version, result.verdict, run_id,
                result.probes["digest"], alias=alias, client=client,
            )  # fmt: skip
        except (GateError, GateWriteError) as err:
            raise JobError(f"registry gate: {err}") from None
        if g.alias_moved:
            gate_note = f"alias '{alias}' moved to {g.registered_name} v{g.version}" + (
                f" (was v{g.previous_holder})" if g.previous_holder else ""
            )
        elif result.verdict == "PASS":
            gate_note = f"alias '{alias}' already on v{g.version}"
        else:
            holder = f"v{g.previous_holder}" if g.previous_holder else "unset"
            gate_note = f"alias '{alias}' not moved (stays {holder})"
    code = EXIT_PASS if result.verdict == "PASS" else EXIT_BLOCKED
    decisive = [ch.finding for ch in result.checks if ch.decisive] or result.findings[:1]
    out = JobOutcome(code=code, model=_display(loaded), verdict=result.verdict, reasons=decisive,
                     report_dir=folder, run_id=run_id, gate=gate_note)  # fmt: skip
    if quiet:
        print(f"{out.model}: {result.verdict}", flush=True)
    else:
        print(f"\n{out.model}: {result.verdict}")
        for r in decisive:
            print(f"  - {r}")
        print(f"  registry: {gate_note}")
        print(f"  report:   {folder / 'report.html'}")
        print(f"  run:      {run_id} ({uri})", flush=True)
    return out


def _display(loaded) -> str:
    if loaded.registered_name and loaded.registered_version:
        return f"{loaded.registered_name} v{loaded.registered_version}"
    return loaded.name


def _log_run(client, c: Mapping[str, Any], result, model_info: Mapping[str, Any], folder: Path, write_reports) -> str:
    from audit import tracking

    exp_name = c["tracking"]["experiment"]
    exp = client.get_experiment_by_name(exp_name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
    run = client.create_run(
        exp_id,
        run_name=f"audit-{model_info['name']}" + (f"-v{model_info['version']}" if model_info["version"] else ""),
        tags={
            "audit.verdict": result.verdict,
            "audit.probe_digest": result.probes["digest"],
            "audit.model_uri": str(model_info["uri"]),
        },
    )
    run_id = run.info.run_id
    status = "FAILED"
    try:
        paths = write_reports(result, folder, model=model_info, run_id=run_id)
        client.log_batch(
            run_id,
            metrics=[_metric(tracking.metric_key(k), v) for k, v in result.metrics.items() if _finite(v)],
            params=[_param(k, v) for k, v in _flat({"engine": result.config["engine"], "gate": result.config["gate"]}).items()],
        )
        client.log_metric(run_id, "verdict_pass", 1.0 if result.verdict == "PASS" else 0.0)
        for p in paths.values():
            client.log_artifact(run_id, str(p), artifact_path="report")
        with tempfile.TemporaryDirectory() as tmp:
            cfg_file = Path(tmp) / "audit_config.yaml"
            cfg_file.write_text(OmegaConf.to_yaml(OmegaConf.create(dict(c))), encoding="utf-8")
            client.log_artifact(run_id, str(cfg_file))
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


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


@hydra.main(version_base="1.3", config_path="pkg://audit.conf", config_name="audit")
def _app(cfg: DictConfig) -> int:
    outcome = audit_from_config(cfg)
    _OUTCOMES.append(outcome)
    if outcome.error:
        print(f"model-audit: error: {outcome.error}", file=sys.stderr, flush=True)
    return outcome.code


def main() -> None:
    """Console entry point: run the Hydra app and exit 0 / 1 / 2 (worst over a multirun)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _OUTCOMES.clear()
    hydra_failed = False
    try:
        _app()
    except SystemExit as err:  # Hydra exits 1 on a config it cannot compose (message already printed)
        hydra_failed = err.code not in (0, None)
    codes = [o.code for o in _OUTCOMES]
    if hydra_failed:
        codes.append(EXIT_ERROR)
    if len(_OUTCOMES) > 1:
        print("\nmodel-audit: summary")
        for o in _OUTCOMES:
            label = o.verdict or "ERROR"
            print(f"  {o.model or '?':<32} {label:<13} exit {o.code}" + (f"  {o.error}" if o.error else ""))
    sys.exit(max(codes) if codes else EXIT_PASS)


if __name__ == "__main__":
    main()
