"""Gate integrity: the named store is the one read, every write in a safe order, no run left RUNNING.

Real SQLite MLflow stores, the real Hydra app run in-process (see ``_jobkit``), and a
real subprocess where a real signal is needed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _jobkit import NAME, all_runs, cli, copy_store, probes_args, registry, state, weights_sha256
from _toy_models import ColourReader, GreyReader, NaNModel
from mlflow.tracking import MlflowClient

from audit.gate.registry import GateWriteError, apply_verdict

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("integrity")
    registry(folder)
    return folder


@pytest.fixture
def store(template, tmp_path, monkeypatch):
    """A fresh copy of the template registry (toy v1 = ColourReader, v2 = GreyReader)."""
    uri, client = copy_store(template, tmp_path, monkeypatch)
    monkeypatch.syspath_prepend(str(TESTS))
    return uri, client, tmp_path


def test_pass_tags_run_and_report_name_the_same_audit_and_weights(store, monkeypatch):
    import audit.report.write

    rendered: list[
        str | None
    ] = []  # the reports are rendered once per audit (the page is the costly part)
    render_html = audit.report.write.render_html
    monkeypatch.setattr(
        audit.report.write, "render_html", lambda *a, **k: rendered.append(a[2]) or render_html(*a, **k)
    )
    uri, client, work = store
    res = cli([f"model.uri=models:/{NAME}/1", f"tracking.uri={uri}", *probes_args(work)], work)
    assert res.code == 0, res.out + res.err
    tags = state(client)["versions"]["1"]
    sha = weights_sha256(client, NAME, "1")
    assert tags["audit.verdict"] == "PASS" and tags["audit.weights_sha256"] == sha
    assert tags["audit.tool_version"].startswith("model-audit ")
    run = client.get_run(tags["audit.run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["audit.verdict"] == "PASS" and run.data.metrics["verdict_pass"] == 1.0
    assert run.data.tags["audit.weights_sha256"] == sha
    assert "version 1" in run.data.tags["mlflow.note.content"]
    history = tags["audit.history"].splitlines()
    assert len(history) == 1 and f"PASS run={run.info.run_id}" in history[0]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert arts == {"report/report.html", "report/report.json", "report/report.md"}
    assert run.data.metrics["context_gap"] < 0.05 and "acc/red_dark" in run.data.metrics
    assert s_aliases(client) == {"champion": "1"}
    report = json.loads((work / "reports" / f"{NAME}-1" / "report.json").read_text())
    assert report["mlflow_run_id"] == run.info.run_id and report["verdict"] == "PASS"
    assert report["model"]["weights_sha256"] == sha
    assert rendered == [run.info.run_id]
    # ... and the same texts are the run's artifacts and the local folder's files
    logged = Path(
        client.download_artifacts(run.info.run_id, "report", dst_path=str(work / "logged"))
    )
    for file in ("report.html", "report.json", "report.md"):
        assert (logged / file).read_bytes() == (
            work / "reports" / f"{NAME}-1" / file
        ).read_bytes(), file


def test_the_named_store_is_read_whatever_the_environment_holds(store, tmp_path, monkeypatch):
    """Store B's v1 reads the context (FAIL); the cwd's store and MLFLOW_TRACKING_URI's hold a clean v1."""
    _, _, work = store
    b = registry(tmp_path / "B", models=(GreyReader,))
    registry(work, models=(ColourReader,))  # ./mlflow.db, MLflow's default store
    c = registry(tmp_path / "C", models=(ColourReader,))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", c)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", c)
    res = cli([f"model.uri=models:/{NAME}/1", f"tracking.uri={b}", *probes_args(work)], work)
    assert res.code == 1 and f"{NAME} v1: FAIL" in res.out, res.out + res.err
    cb = MlflowClient(b, registry_uri=b)
    assert state(cb)["versions"]["1"]["audit.verdict"] == "FAIL"
    assert state(cb)["versions"]["1"]["audit.weights_sha256"] == weights_sha256(cb, NAME, "1")
    assert weights_sha256(cb, NAME, "1") != weights_sha256(
        MlflowClient(c, registry_uri=c), NAME, "1"
    )
    for other in (c, f"sqlite:///{work / 'mlflow.db'}"):
        oc = MlflowClient(other, registry_uri=other)
        assert "audit.verdict" not in state(oc)["versions"]["1"] and not state(oc)["aliases"]
        assert not oc.search_experiments(filter_string="name = 'model-audit-gate'")


def test_a_store_that_does_not_exist_is_exit_2_and_creates_no_file(store, tmp_path):
    _, _, work = store
    empty = tmp_path / "empty"
    empty.mkdir()
    for uri in (
        f"sqlite:///{empty / 'nothing.db'}",
        f"sqlite:///{empty / 'no' / 'such' / 'mlflow.db'}",
    ):
        res = cli([f"model.uri=models:/{NAME}/1", f"tracking.uri={uri}", *probes_args(work)], empty)
        assert res.code == 2 and len(res.errors) == 1, res.err
        assert not any(p.name.endswith(".db") for p in empty.rglob("*")), list(empty.rglob("*"))
    assert not (work / "mlflow.db").exists()


def test_a_champion_that_no_longer_passes_keeps_or_loses_the_alias_as_configured(store):
    uri, client, work = store
    client.set_registered_model_alias(NAME, "champion", "2")  # the shortcut model holds it
    args = [f"model.uri=models:/{NAME}/2", f"tracking.uri={uri}", *probes_args(work)]
    res = cli(args, work)
    assert res.code == 1 and "stays on v2, the champion that no longer PASSes" in res.out, (
        res.out + res.err
    )
    s = state(client)
    assert s["aliases"] == {"champion": "2"}
    assert "champion v2 was re-audited FAIL" in s["tags"]["audit.champion_alert"]
    first_run = s["versions"]["2"]["audit.run_id"]

    res = cli([*args, "promote.on_champion_fail=revoke"], work)
    assert res.code == 1 and "removed from v2" in res.out, res.out + res.err
    s = state(client)
    assert s["aliases"] == {}
    history = s["versions"]["2"]["audit.history"].splitlines()
    assert len(history) == 2 and "FAIL" in history[0] and f"run={first_run}" in history[1]
    assert s["versions"]["2"]["audit.run_id"] != first_run

    res = cli([f"model.uri=models:/{NAME}/1", f"tracking.uri={uri}", *probes_args(work)], work)
    assert res.code == 0, res.out + res.err
    s = state(client)
    assert s["aliases"] == {"champion": "1"} and "audit.champion_alert" not in s["tags"]


def test_a_model_with_nan_logits_is_named_broken_and_nothing_is_written(store, tmp_path):
    uri, client, work = store
    broken = registry(tmp_path / "nan", models=(NaNModel,))
    before = state(MlflowClient(broken, registry_uri=broken))
    res = cli([f"model.uri=models:/{NAME}/1", f"tracking.uri={broken}", *probes_args(work)], work)
    assert res.code == 2 and len(res.errors) == 1 and "broken" in res.errors[0], res.err
    bc = MlflowClient(broken, registry_uri=broken)
    assert state(bc) == before
    assert not bc.search_experiments(filter_string="name = 'model-audit-gate'")


def test_an_unreachable_tracking_server_fails_in_seconds(store):
    _, _, work = store
    t0 = time.monotonic()
    res = cli(
        [f"model.uri=models:/{NAME}/1", "tracking.uri=http://127.0.0.1:9", *probes_args(work)], work
    )
    assert time.monotonic() - t0 < 15
    assert res.code == 2 and "does not answer its health check" in res.errors[0], res.err


def test_runs_left_running_past_their_lease_are_closed_by_the_next_audit(store):
    uri, client, work = store
    exp = client.create_experiment("model-audit-gate")
    stale = client.create_run(exp, tags={"audit.deadline": f"{time.time() - 5:.0f}"}).info.run_id
    live = client.create_run(exp, tags={"audit.deadline": f"{time.time() + 3600:.0f}"}).info.run_id
    res = cli([f"model.uri=models:/{NAME}/1", f"tracking.uri={uri}", *probes_args(work)], work)
    assert res.code == 0, res.err
    assert client.get_run(stale).info.status == "KILLED"
    assert "audit.verdict" not in client.get_run(stale).data.tags
    assert client.get_run(live).info.status == "RUNNING"


def s_aliases(client: MlflowClient) -> dict:
    return state(client)["aliases"]


class _VerdictWriteFails(MlflowClient):
    """A real client on the real store whose version-tag write of the verdict fails."""

    def set_model_version_tag(self, name, version, key, value):
        if key == "audit.verdict":
            raise ConnectionError("registry unreachable")
        return super().set_model_version_tag(name, version, key, value)


def test_an_interrupted_gate_never_shows_a_verdict_beside_another_runs_id(store):
    uri, client, _ = store
    apply_verdict(NAME, "1", "PASS", "run-old", "d0", client=client)
    assert state(client)["versions"]["1"]["audit.verdict"] == "PASS"
    with pytest.raises(GateWriteError) as info:
        apply_verdict(
            NAME, "1", "FAIL", "run-new", "d1", client=_VerdictWriteFails(uri, registry_uri=uri)
        )
    tags = state(client)["versions"]["1"]
    assert tags["audit.run_id"] == "run-new" and "audit.verdict" not in tags  # the old PASS is gone
    assert "remove the earlier audit.verdict='PASS'" in info.value.done[0]


def test_sigterm_during_the_audit_closes_cleanly_and_writes_nothing(store):
    uri, client, work = store
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # a larger probe set, so that the audit is still running when the signal comes
    args = [
        f"model.uri=models:/{NAME}/1",
        f"tracking.uri={uri}",
        *probes_args(work, 160),
        "engine.sanity_probes=16",
        "engine.attribution_probes=320",
        f"paths.root_dir={work}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "audit", *args],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if "auditing" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err
    assert (
        "model-audit: error: interrupted by SIGTERM while auditing" in err
        and "Traceback" not in err
    )
    assert "audit.verdict" not in state(client)["versions"]["1"]
    assert not client.search_experiments(filter_string="name = 'model-audit-gate'") or not all_runs(
        client
    )


def test_the_http_bounds_are_values_mlflow_accepts(monkeypatch):
    """MLflow parses each variable with its own type (the backoff factor is an int)."""
    import mlflow.environment_variables as mev

    from audit.gate.tracking import HTTP_BOUNDS, bound_http_calls

    for key in HTTP_BOUNDS:
        monkeypatch.delenv(key, raising=False)
    bound_http_calls()
    for key, value in HTTP_BOUNDS.items():
        assert os.environ[key] == value
        assert getattr(mev, key).get() == getattr(mev, key).type(value)
