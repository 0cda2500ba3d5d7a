"""Two real clients on one store: the gate against another client writing at the worst moment.

One real ``mlflow server`` (SQLite store) for the module, with a :class:`FaultProxy` in
front of it. The gate's client (or the audit subprocess) talks to the proxy; the other
client talks to the server directly. The proxy runs the other client's write (an alias
move, a delete-and-re-register of the audited version, an in-place overwrite of its
weights) right before it forwards a chosen request of the gate, or right after the
server answered it: the race is deterministic, not timing luck.

Each test has a registered model of its own (one store, one server).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _jobkit import ALLOW, ENGINE, colour_folder
from _mlflow_server import FaultProxy, MlflowServer, Step
from _toy_models import ColourReader, GreyReader
from mlflow.tracking import MlflowClient

from audit.gate.loading import log_model_safely, read_identity, version_weights_sha256
from audit.gate.registry import ALERT_TAG, VersionChangedError, apply_verdict

TESTS = Path(__file__).resolve().parents[1]
API = "/api/2.0/mlflow"
ALIAS_SET = Step("set alias", "POST", f"{API}/registered-models/alias")
ALIAS_DELETE = Step("delete alias", "DELETE", f"{API}/registered-models/alias")
RUN_CREATE = Step("runs/create", "POST", f"{API}/runs/create")
#: Bound on one audit subprocess (imports ~6 s, audit and MLflow writes ~10 s on 2 shared cores).
AUDIT_TIMEOUT_S = 240.0


def set_tag(key: str) -> Step:
    return Step(f"set-tag {key}", "POST", f"{API}/model-versions/set-tag", body_key=key)


# --------------------------------------------------------------------------- the store and the server
@pytest.fixture(scope="module")
def bench(tmp_path_factory, empty_mlflow_store):
    root = tmp_path_factory.mktemp("races")
    db = root / "server.db"
    uri = empty_mlflow_store(root, db.name)
    direct = MlflowClient(uri, registry_uri=uri)
    direct.create_experiment("train", artifact_location=(root / "artifacts").as_uri())
    server = MlflowServer(root, db)
    proxy = None
    try:
        server.start()
        proxy = FaultProxy(server)
        yield server, proxy
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()


def register(uri: str, name: str, *models: type) -> None:
    """``name`` v1, v2, ... = ``models``, each logged in its own run of the experiment ``train``."""
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("train").experiment_id
    for cls in models:
        run = client.create_run(exp)
        log_model_safely(
            cls(),
            {"_target_": f"_toy_models.{cls.__name__}"},
            registered_name=name,
            run_id=run.info.run_id,
            tracking_uri=uri,
        )
        client.set_terminated(run.info.run_id)


@dataclasses.dataclass
class Clients:
    gate: MlflowClient  # through the proxy
    other: MlflowClient  # straight to the server
    proxy: FaultProxy
    uri: str  # the server's

    def aliases(self, name: str) -> dict[str, str]:
        return {k: str(v) for k, v in self.other.get_registered_model(name).aliases.items()}

    def model_tags(self, name: str) -> dict[str, str]:
        return dict(self.other.get_registered_model(name).tags)

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        return {
            k: v
            for k, v in self.other.get_model_version(name, version).tags.items()
            if k.startswith("audit.")
        }

    def identity(self, name: str, version: str):
        found = read_identity(self.other, name, version)
        return dataclasses.replace(
            found, weights_sha256=version_weights_sha256(self.other, self.uri, found)
        )

    def move(self, name: str, alias: str, version: str):
        return lambda: self.other.set_registered_model_alias(name, alias, version)

    def reregister(self, name: str, model: type = GreyReader):
        """The other client deletes ``name`` and registers ``model`` as its v1 again."""

        def act() -> None:
            self.other.delete_registered_model(name)
            register(self.uri, name, model)
            assert str(self.other.get_model_version(name, "1").run_id)  # v1 again, another run

        return act

    def overwrite_weights(self, name: str, version: str, model: type = GreyReader):
        """The other client logs ``model``'s weights over the version's own artifacts (same run, same path)."""
        mv = self.other.get_model_version(name, version)

        def act() -> None:
            log_model_safely(
                model(),
                {"_target_": f"_toy_models.{model.__name__}"},
                run_id=mv.run_id,
                tracking_uri=self.uri,
            )

        return act


@pytest.fixture
def clients(bench, monkeypatch):
    server, proxy = bench
    monkeypatch.syspath_prepend(str(TESTS))
    proxy.disarm()
    yield Clients(
        MlflowClient(proxy.uri, registry_uri=proxy.uri),
        MlflowClient(server.uri, registry_uri=server.uri),
        proxy,
        server.uri,
    )
    proxy.disarm()


def hit(c: Clients) -> None:
    armed = c.proxy.armed
    assert armed is not None and armed.hit.is_set(), (
        f"the step never came: {[(s.method, s.path, s.keys) for s in c.proxy.writes()]}"
    )
    assert armed.error is None, f"the other client's write failed: {armed.error!r}"


# --------------------------------------------------------------------------- alias moves never undo another client's
def test_revoke_leaves_the_alias_another_client_moved_during_the_gate(clients):
    """champion v1 re-audited FAIL with revoke; another client moves champion to v2 once the gate
    started writing: the gate removes nothing (the alias is v2's), writes no alert about v1, says so."""
    c, name = clients, "race-revoke"
    register(c.uri, name, ColourReader, ColourReader)
    c.other.set_registered_model_alias(name, "champion", "1")
    c.proxy.arm(set_tag("audit.run_id"), "call", c.move(name, "champion", "2"))
    out = apply_verdict(name, "1", "FAIL", "run-r", "d0", client=c.gate, on_champion_fail="revoke")
    hit(c)
    assert c.aliases(name) == {"champion": "2"}
    assert (
        not out.alias_revoked and out.champion_alert is None and ALERT_TAG not in c.model_tags(name)
    )
    assert out.previous_holder == "2"
    assert any("v2" in note and "another client" in note for note in out.concurrent), out.concurrent
    assert c.version_tags(name, "1")["audit.verdict"] == "FAIL"


def test_the_keep_alert_names_the_champion_read_just_before_it(clients):
    """champion on v2 when the gate starts; another client moves it to v1, the version being
    re-audited FAIL, during the gate: the alert names v1, the champion read right before it."""
    c, name = clients, "race-keep"
    register(c.uri, name, ColourReader, ColourReader)
    c.other.set_registered_model_alias(name, "champion", "2")
    c.proxy.arm(set_tag("audit.run_id"), "call", c.move(name, "champion", "1"))
    out = apply_verdict(name, "1", "FAIL", "run-k", "d0", client=c.gate)
    hit(c)
    assert c.aliases(name) == {"champion": "1"}
    alert = c.model_tags(name).get(ALERT_TAG, "")
    assert alert.startswith("champion v1 was re-audited FAIL") and "stays" in alert, alert
    assert out.champion_alert == alert and out.previous_holder == "1"


def test_revoke_never_removes_an_alias_another_client_put_on_the_version_during_the_gate(clients):
    """champion on v2 at the start; another client moves it onto v1 while v1 is re-audited FAIL with
    revoke: the alias stays where that client put it, the alert names v1, the outcome says why."""
    c, name = clients, "race-revoke-onto"
    register(c.uri, name, ColourReader, ColourReader)
    c.other.set_registered_model_alias(name, "champion", "2")
    c.proxy.arm(set_tag("audit.verdict"), "call", c.move(name, "champion", "1"))
    out = apply_verdict(name, "1", "FAIL", "run-ro", "d0", client=c.gate, on_champion_fail="revoke")
    hit(c)
    assert c.aliases(name) == {"champion": "1"} and not out.alias_revoked
    assert c.model_tags(name)[ALERT_TAG].startswith("champion v1 was re-audited FAIL")
    assert any("never removes an alias another client set" in note for note in out.concurrent), (
        out.concurrent
    )


def test_a_pass_reports_the_holder_read_just_before_the_alias_move(clients):
    c, name = clients, "race-pass-before"
    register(c.uri, name, ColourReader, ColourReader, ColourReader)
    c.other.set_registered_model_alias(name, "champion", "1")
    c.proxy.arm(set_tag("audit.run_id"), "call", c.move(name, "champion", "3"))
    out = apply_verdict(
        name, "2", "PASS", "run-p", "d0", client=c.gate, policy="any"
    )  # v2 < v3: newer would hold it back
    hit(c)
    assert c.aliases(name) == {"champion": "2"}
    assert out.alias_moved and out.previous_holder == "3"
    assert any("from v1 to v3" in note for note in out.concurrent), out.concurrent


def test_an_alias_moved_right_after_the_gate_set_it_is_left_and_reported(clients):
    c, name = clients, "race-pass-after"
    register(c.uri, name, ColourReader, ColourReader, ColourReader)
    c.other.set_registered_model_alias(name, "champion", "1")
    c.proxy.arm(ALIAS_SET, "call-after", c.move(name, "champion", "3"))
    out = apply_verdict(name, "2", "PASS", "run-pa", "d0", client=c.gate)
    hit(c)
    assert c.aliases(name) == {"champion": "3"}  # the other client's move stands
    assert not out.alias_moved
    assert any("v3" in note and "another client" in note for note in out.concurrent), out.concurrent


def test_an_alias_set_right_after_the_gate_revoked_it_is_left_and_reported(clients):
    c, name = clients, "race-revoke-after"
    register(c.uri, name, ColourReader, ColourReader)
    c.other.set_registered_model_alias(name, "champion", "1")
    c.proxy.arm(ALIAS_DELETE, "call-after", c.move(name, "champion", "2"))
    out = apply_verdict(name, "1", "FAIL", "run-ra", "d0", client=c.gate, on_champion_fail="revoke")
    hit(c)
    assert c.aliases(name) == {"champion": "2"}
    assert out.alias_revoked
    assert any("v2" in note and "another client" in note for note in out.concurrent), out.concurrent


# --------------------------------------------------------------------------- the version judged is the version written
def test_a_version_re_registered_during_the_gate_gets_no_verdict_and_the_gates_tags_are_repaired(
    clients,
):
    """The other client deletes the model and registers a shortcut net as v1 right before the gate's
    ``audit.run_id`` tag: that tag lands on the new v1; the gate sees the change before its next
    write, removes what it wrote there, writes no verdict and moves no alias."""
    c, name = clients, "race-reregister"
    register(c.uri, name, ColourReader)
    judged = c.identity(name, "1")
    c.proxy.arm(set_tag("audit.run_id"), "call", c.reregister(name))
    with pytest.raises(VersionChangedError) as info:
        apply_verdict(name, "1", "PASS", "run-x", "d0", client=c.gate, identity=judged)
    hit(c)
    text = str(info.value)
    assert (
        "changed during the audit" in text and "source:" in text and "creation_timestamp:" in text
    ), text
    assert "audit.run_id" in text and "removed" in text, text  # what was repaired, said
    assert info.value.repaired and not info.value.left
    assert c.version_tags(name, "1") == {} and c.aliases(name) == {}
    assert read_identity(c.other, name, "1").source != judged.source


def test_weights_overwritten_in_place_are_caught_by_the_re_hash_before_the_verdict(clients):
    """Same version record (source, run, creation time), other bytes: only the re-hash sees it."""
    c, name = clients, "race-weights"
    register(c.uri, name, ColourReader)
    judged = c.identity(name, "1")
    c.proxy.arm(set_tag("audit.probe_digest"), "call", c.overwrite_weights(name, "1"))
    with pytest.raises(VersionChangedError) as info:
        apply_verdict(name, "1", "PASS", "run-w", "d0", client=c.gate, identity=judged)
    hit(c)
    assert "weights_sha256:" in str(info.value) and judged.weights_sha256 in str(info.value)
    assert read_identity(c.other, name, "1").same_version(judged)
    assert c.version_tags(name, "1") == {} and c.aliases(name) == {}


def test_weights_overwritten_after_the_verdict_tag_are_caught_before_the_alias_and_every_tag_undone(
    clients,
):
    """An earlier FAIL audit is on v1. The weights are overwritten in place right before the gate's
    history tag: the re-hash before the alias move sees it; the gate removes its verdict and evidence
    tags (the verdict first), puts the earlier history back and says the earlier verdict stays removed."""
    c, name = clients, "race-weights-late"
    register(c.uri, name, ColourReader)
    apply_verdict(
        name, "1", "FAIL", "run-old", "d0", client=c.other, history="old FAIL run=run-old"
    )
    judged = c.identity(name, "1")
    c.proxy.arm(set_tag("audit.history"), "call", c.overwrite_weights(name, "1"))
    with pytest.raises(VersionChangedError) as info:
        apply_verdict(
            name, "1", "PASS", "run-late", "d1", client=c.gate, identity=judged, history="new PASS"
        )
    hit(c)
    assert c.version_tags(name, "1") == {"audit.history": "old FAIL run=run-old"}
    assert c.aliases(name) == {}
    repaired = info.value.repaired
    assert repaired.index("removed audit.verdict from race-weights-late v1") < repaired.index(
        "removed audit.run_id from race-weights-late v1"
    ), repaired
    assert "put back the earlier audit.history of race-weights-late v1" in repaired
    assert any("earlier audit.verdict='FAIL'" in x for x in info.value.left), info.value.left


def test_a_version_deleted_between_the_check_and_a_write_is_a_change_not_a_write_failure(clients):
    """The other client deletes the model right before the gate's ``audit.probe_digest`` tag: the
    write fails (no such version); the gate reads the registry again and reports the deletion."""
    c, name = clients, "race-deleted"
    register(c.uri, name, ColourReader)
    judged = c.identity(name, "1")
    c.proxy.arm(
        set_tag("audit.probe_digest"), "call", lambda: c.other.delete_registered_model(name)
    )
    with pytest.raises(VersionChangedError) as info:
        apply_verdict(name, "1", "PASS", "run-d", "d0", client=c.gate, identity=judged)
    hit(c)
    assert info.value.changes == ["version 1 was deleted"], info.value.changes
    assert c.other.search_registered_models(f"name='{name}'") == []


def test_a_version_re_registered_right_before_the_alias_write_loses_the_alias_again(clients):
    """The other client swaps v1 between the gate's last check and its alias write: the alias
    lands on the new v1; the read after the write sees the change and the gate removes the
    alias it set (nobody else holds it), writes no verdict on the new v1, says what it repaired."""
    c, name = clients, "race-alias-swap"
    register(c.uri, name, ColourReader)
    judged = c.identity(name, "1")
    c.proxy.arm(ALIAS_SET, "call", c.reregister(name))
    with pytest.raises(VersionChangedError) as info:
        apply_verdict(name, "1", "PASS", "run-s", "d0", client=c.gate, identity=judged)
    hit(c)
    assert c.aliases(name) == {} and c.version_tags(name, "1") == {}
    assert any("alias" in r for r in info.value.repaired), info.value.repaired


def test_an_unchanged_version_passes_with_every_check(clients):
    c, name = clients, "race-none"
    register(c.uri, name, ColourReader)
    judged = c.identity(name, "1")
    out = apply_verdict(name, "1", "PASS", "run-n", "d0", client=c.gate, identity=judged)
    assert out.alias_moved and c.aliases(name) == {"champion": "1"} and out.concurrent == ()
    assert c.version_tags(name, "1")["audit.verdict"] == "PASS"


# --------------------------------------------------------------------------- the real command
def _audit(proxy: FaultProxy, name: str, workdir: Path) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    probes = ["probes=folder", f"probes.path={colour_folder(workdir)}", ALLOW, *ENGINE]
    args = [
        f"model.uri=models:/{name}/1",
        f"tracking.uri={proxy.uri}",
        *probes,
        f"paths.root_dir={workdir}",
    ]
    return subprocess.run(
        [sys.executable, "-m", "audit", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=AUDIT_TIMEOUT_S,
    )


def _gate_runs(client: MlflowClient, name: str) -> list:
    exp = client.get_experiment_by_name("model-audit-gate")
    runs = [] if exp is None else client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("audit.model_registered_name") == name]


def test_model_audit_refuses_a_version_deleted_and_re_registered_while_it_ran(clients, tmp_path):
    """``model-audit models:/rr/1``: v1 (the clean net) is deleted and a shortcut net registered as
    v1 while the audit runs (when it creates its run). Exit 2, one line naming the change, no
    verdict tag on the new v1, no alias, the run FAILED."""
    c, name = clients, "rr"
    register(c.uri, name, ColourReader)
    c.proxy.arm(RUN_CREATE, "call", c.reregister(name))
    res = _audit(c.proxy, name, tmp_path)
    hit(c)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("model-audit: error:")]
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"{name} v1 changed during the audit" in errors[0] and "source:" in errors[0], errors[0]
    assert c.version_tags(name, "1") == {} and c.aliases(name) == {}
    runs = _gate_runs(c.other, name)
    assert len(runs) == 1 and runs[0].info.status == "FAILED", [r.info for r in runs]
    assert "audit.verdict" not in runs[0].data.tags


def test_a_version_swapped_during_the_gates_writes_fails_the_finished_run(clients, tmp_path):
    """The swap comes after the run was closed FINISHED with its verdict, right before the gate's
    first evidence tag: the run is marked FAILED and loses its verdict tag; the new v1 keeps nothing."""
    c, name = clients, "rr-gate"
    register(c.uri, name, ColourReader)
    c.proxy.arm(set_tag("audit.run_id"), "call", c.reregister(name))
    res = _audit(c.proxy, name, tmp_path)
    hit(c)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("model-audit: error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "changed during the audit" in errors[0] and "FAILED" in errors[0], errors[0]
    assert c.version_tags(name, "1") == {} and c.aliases(name) == {}
    runs = _gate_runs(c.other, name)
    assert len(runs) == 1 and runs[0].info.status == "FAILED", [r.info for r in runs]
    assert "audit.verdict" not in runs[0].data.tags and runs[0].data.tags.get("audit.error")
