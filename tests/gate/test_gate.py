"""The registry gate on a real SQLite MLflow registry."""

from __future__ import annotations

import shutil

import pytest
from mlflow.tracking import MlflowClient

from audit.gate.loading import read_identity
from audit.gate.registry import (
    GateError,
    GateWriteError,
    VersionChangedError,
    apply_verdict,
    check_alias,
)

NAME = "candidate"


@pytest.fixture(scope="module")
def template(tmp_path_factory, empty_mlflow_store):
    """A registry built once: model 'candidate' v1 and v2, alias 'champion' on v1."""
    folder = tmp_path_factory.mktemp("gate-registry")
    empty_mlflow_store(folder)
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.create_experiment("gate", artifact_location=(folder / "artifacts").as_uri())
    run = client.create_run(exp)
    client.create_registered_model(NAME)
    for _ in range(2):
        client.create_model_version(
            NAME, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
        )
    client.set_registered_model_alias(NAME, "champion", "1")
    return folder / "mlflow.db"


@pytest.fixture
def registry(template, tracking_uri, tmp_path, monkeypatch):
    """A fresh copy of the template registry for one test (SQLite migrations take ~2 s)."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(template, tmp_path / "mlflow.db")
    return MlflowClient(tracking_uri)


def _state(client):
    versions = {v: dict(client.get_model_version(NAME, v).tags) for v in ("1", "2")}
    return versions, _aliases(client)


def _aliases(client):
    return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}


def _audit_tags(tags):
    return {k: v for k, v in tags.items() if k.startswith("audit.")}


def test_pass_tags_and_moves_alias(registry):
    out = apply_verdict(
        NAME, 2, "PASS", "run123", "digest9", client=registry, extra_tags={"audit.gate": "v0"}
    )
    tags = registry.get_model_version(NAME, "2").tags
    assert tags["audit.verdict"] == "PASS" and tags["audit.run_id"] == "run123"
    assert tags["audit.probe_digest"] == "digest9" and tags["audit.gate"] == "v0"
    assert str(registry.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert out.alias_moved and out.previous_holder == "1" and out.version == "2"
    again = apply_verdict(NAME, "2", "PASS", "run124", "digest9", client=registry)
    assert not again.alias_moved and again.previous_holder == "2"


@pytest.mark.parametrize("verdict", ["FAIL", "INCONCLUSIVE"])
def test_non_pass_tags_but_keeps_champion(registry, verdict):
    out = apply_verdict(NAME, "2", verdict, "run123", "digest9", client=registry)
    assert registry.get_model_version(NAME, "2").tags["audit.verdict"] == verdict
    assert _aliases(registry) == {"champion": "1"}
    assert not out.alias_moved and out.previous_holder == "1"


def test_fail_without_champion_sets_none(registry):
    registry.delete_registered_model_alias(NAME, "champion")
    out = apply_verdict(NAME, "2", "FAIL", "run123", "digest9", client=registry)
    assert _aliases(registry) == {}
    assert out.previous_holder is None and not out.alias_moved


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"verdict": "pass"},
            r"verdict must be one of \['PASS', 'FAIL', 'INCONCLUSIVE'\]; got 'pass'",
        ),
        ({"alias": "latest"}, "reserved"),
        ({"alias": "v3"}, "reserved"),
        ({"alias": "champ ion"}, "letters, digits"),
        ({"alias": ""}, "non-empty"),
        ({"version": 7}, r"has no version 7; its versions are \[1, 2\]"),
        ({"version": "two"}, "positive integer"),
        ({"name": "nope"}, "'nope' does not exist"),
        ({"run_id": ""}, "run_id must be a non-empty string"),
        ({"extra_tags": {"audit.verdict": "PASS"}}, "may not override"),
        ({"extra_tags": {"note": "x" * 5001}}, "at most 5000"),
    ],
)
def test_bad_input_writes_nothing(registry, kwargs, message):
    before = _state(registry)
    args = {
        "name": NAME,
        "version": "2",
        "verdict": "PASS",
        "run_id": "run123",
        "alias": "champion",
    }
    extra = kwargs.pop("extra_tags", None)
    args.update(kwargs)
    with pytest.raises(GateError, match=message):
        apply_verdict(
            args["name"],
            args["version"],
            args["verdict"],
            args["run_id"],
            "digest9",
            alias=args["alias"],
            client=registry,
            extra_tags=extra,
        )
    assert _state(registry) == before
    assert not _audit_tags(before[0]["2"])


class _AliasWriteFails(MlflowClient):
    """A real client on the real store whose alias write fails (as if the server went down)."""

    def set_registered_model_alias(self, name, alias, version):
        raise ConnectionError("registry unreachable")


def test_write_failure_lists_what_happened(registry):
    client = _AliasWriteFails(registry.tracking_uri)
    with pytest.raises(GateWriteError) as info:
        apply_verdict(NAME, "2", "PASS", "run123", "digest9", client=client)
    err = info.value
    assert (
        len(err.done) == 4 and len(err.pending) == 1
    )  # run id, digest, verdict, history; not the alias
    text = str(err)
    assert "ConnectionError: registry unreachable" in text and "not moved (still v1)" in text
    assert _aliases(registry) == {"champion": "1"}
    assert registry.get_model_version(NAME, "2").tags["audit.verdict"] == "PASS"


def test_unreachable_registry_is_reported_before_writing(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    client = MlflowClient("http://127.0.0.1:9")
    with pytest.raises(GateError, match="nothing was written"):
        apply_verdict(NAME, "2", "PASS", "run123", "digest9", client=client)


def test_default_client_uses_the_tracking_uri(registry):
    out = apply_verdict(NAME, "1", "INCONCLUSIVE", "run123", "digest9")  # MLFLOW_TRACKING_URI
    assert registry.get_model_version(NAME, "1").tags["audit.verdict"] == "INCONCLUSIVE"
    assert _aliases(registry) == {"champion": "1"} and not out.alias_moved


def test_check_alias_accepts_valid_names():
    assert check_alias("champion") == "champion"
    assert check_alias("prod-candidate_2") == "prod-candidate_2"
    assert check_alias("version3") == "version3"


def test_a_version_registered_again_before_the_gate_gets_nothing_written(registry):
    """v2's record is taken, then the model is deleted and registered again (v1, v2 anew): the gate
    refuses before its first write and names what changed."""
    judged = read_identity(registry, NAME, "2")
    run = registry.get_run(registry.get_model_version(NAME, "2").run_id)
    registry.delete_registered_model(NAME)
    other = registry.create_run(run.info.experiment_id)
    registry.create_registered_model(NAME)
    for _ in range(2):
        registry.create_model_version(
            NAME, source=f"{other.info.artifact_uri}/model", run_id=other.info.run_id
        )
    with pytest.raises(
        VersionChangedError, match=r"candidate v2 changed during the audit \(source: .*run_id: "
    ) as info:
        apply_verdict(NAME, "2", "PASS", "run123", "digest9", client=registry, identity=judged)
    assert "nothing was written" in str(info.value) and info.value.repaired == []
    assert not _audit_tags(registry.get_model_version(NAME, "2").tags) and _aliases(registry) == {}


def test_an_identity_of_another_version_is_refused(registry):
    with pytest.raises(GateError, match=r"identity names candidate v1, not candidate v2"):
        apply_verdict(
            NAME,
            "2",
            "PASS",
            "run123",
            "digest9",
            client=registry,
            identity=read_identity(registry, NAME, "1"),
        )
    assert not _audit_tags(registry.get_model_version(NAME, "2").tags)
