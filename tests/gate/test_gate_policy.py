"""promote.policy: which PASSing version the alias moves to (newer, any, none), against a real mlflow server.

Three clean versions of one registered model are judged out of order. ``newer`` (the default)
never takes the alias back to an older version, ``any`` does, ``none`` writes tags only.
The gate-level tests call :func:`audit.gate.registry.apply_verdict` through the server; the slow test
runs the real ``model-audit`` command on the three versions in the order v3, v1, v2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _jobkit import ALLOW, ENGINE, colour_folder
from _mlflow_server import MlflowServer
from _toy_models import ColourReader
from mlflow.tracking import MlflowClient

from audit.gate.loading import log_model_safely
from audit.gate.registry import GateError, apply_verdict, describe_policy

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_mlflow_store):
    root = tmp_path_factory.mktemp("policy")
    db = root / "server.db"
    uri = empty_mlflow_store(root, db.name)
    MlflowClient(uri, registry_uri=uri).create_experiment(
        "train", artifact_location=(root / "artifacts").as_uri()
    )
    srv = MlflowServer(root, db)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _three_versions(uri: str, name: str) -> MlflowClient:
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("train").experiment_id
    for _ in range(3):
        run = client.create_run(exp)
        log_model_safely(
            ColourReader(),
            {"_target_": "_toy_models.ColourReader"},
            registered_name=name,
            run_id=run.info.run_id,
            tracking_uri=uri,
        )
        client.set_terminated(run.info.run_id)
    return client


def _holder(client: MlflowClient, name: str, alias: str = "champion") -> str | None:
    holder = client.get_registered_model(name).aliases.get(alias)
    return str(holder) if holder is not None else None


def test_newer_never_takes_the_alias_back_and_any_does(server):
    client = _three_versions(server.uri, "pol-newer")
    out = apply_verdict("pol-newer", "3", "PASS", "run-3", "d", client=client)
    assert out.alias_moved and out.held_back is None and _holder(client, "pol-newer") == "3"
    out = apply_verdict("pol-newer", "1", "PASS", "run-1", "d", client=client)  # the default: newer
    assert not out.alias_moved and _holder(client, "pol-newer") == "3"
    assert "v1 is older than v3" in out.held_back and "promote.policy=newer" in out.held_back
    assert (
        client.get_model_version("pol-newer", "1").tags["audit.verdict"] == "PASS"
    )  # tagged all the same
    out = apply_verdict("pol-newer", "2", "PASS", "run-2", "d", client=client, policy="any")
    assert out.alias_moved and out.previous_holder == "3" and _holder(client, "pol-newer") == "2"
    out = apply_verdict(
        "pol-newer", "3", "PASS", "run-3b", "d", client=client
    )  # newer than v2: moves back up
    assert out.alias_moved and _holder(client, "pol-newer") == "3"


def test_newer_moves_an_unset_alias_and_none_writes_tags_only(server):
    client = _three_versions(server.uri, "pol-none")
    out = apply_verdict("pol-none", "1", "PASS", "run-1", "d", client=client)
    assert out.alias_moved and _holder(client, "pol-none") == "1"
    out = apply_verdict("pol-none", "3", "PASS", "run-3", "d", client=client, policy="none")
    assert not out.alias_moved and _holder(client, "pol-none") == "1"
    assert "promote.policy=none" in out.held_back
    assert client.get_model_version("pol-none", "3").tags["audit.verdict"] == "PASS"
    # a FAIL of the champion under none keeps the alias (with the alert); revoke is refused up front
    out = apply_verdict("pol-none", "1", "FAIL", "run-1b", "d", client=client, policy="none")
    assert _holder(client, "pol-none") == "1" and out.champion_alert
    before = client.get_model_version("pol-none", "2").tags
    with pytest.raises(GateError, match="promote.policy=none writes tags only"):
        apply_verdict(
            "pol-none",
            "2",
            "PASS",
            "run-2",
            "d",
            client=client,
            policy="none",
            on_champion_fail="revoke",
        )
    with pytest.raises(GateError, match="policy must be one of"):
        apply_verdict("pol-none", "2", "PASS", "run-2", "d", client=client, policy="sideways")
    assert client.get_model_version("pol-none", "2").tags == before


def test_the_policy_is_described_for_reports():
    assert "only if it is newer" in describe_policy(
        "newer"
    ) and "promote.policy=newer" in describe_policy("newer")
    assert "tags only" in describe_policy("none", "prod") and "'prod'" in describe_policy(
        "none", "prod"
    )
    assert "removes the alias" in describe_policy("any", on_champion_fail="revoke")


def _audit(
    server: MlflowServer, name: str, version: int, workdir: Path, *extra: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    args = [
        f"model.uri=models:/{name}/{version}",
        f"tracking.uri={server.uri}",
        "probes=folder",
        f"probes.path={colour_folder(workdir)}",
        ALLOW,
        *ENGINE,
        f"paths.root_dir={workdir}",
        *extra,
    ]
    return subprocess.run(
        [sys.executable, "-m", "audit", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_three_versions_audited_out_of_order_through_the_command(server, tmp_path):
    """v3, then v1, then v2 (all clean: PASS): champion goes to v3 and stays there under the default
    policy, with a console line saying why; promote.policy=any then moves it to v1."""
    client = _three_versions(server.uri, "pol-cli")
    lines = {}
    for version in (3, 1, 2):
        res = _audit(server, "pol-cli", version, tmp_path)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        lines[version] = next(
            ln for ln in res.stdout.splitlines() if ln.strip().startswith("registry:")
        )
        assert _holder(client, "pol-cli") == "3"
    assert "moved to pol-cli v3" in lines[3]
    assert "not moved" in lines[1] and "v1 is older than v3" in lines[1]
    assert "not moved" in lines[2] and "v2 is older than v3" in lines[2]
    report = next((tmp_path / "reports").glob("pol-cli*1*")) / "report.html"
    assert "promote.policy=newer" in report.read_text()
    res = _audit(server, "pol-cli", 1, tmp_path, "promote.policy=any")
    assert res.returncode == 0 and _holder(client, "pol-cli") == "1", res.stdout[-2000:]
