"""``model-audit verify`` (:mod:`audit.gate.verify`): a version's verdict is genuine and PASS, or exit 1.

Real audits (the Hydra app in-process, see ``_jobkit``) on a real SQLite registry: ``toy``
v1 reads the colour (a genuine PASS, which moves ``champion``), v2 reads the grey context
(a genuine FAIL). Each test gets a copy of that store and plays the attacker with the
registry rights MLflow gives anyone who can write to it: a verdict tag set by hand, tags
copied from a genuine audit, an alias set by hand, a version deleted and registered again,
weights replaced in the artifact store.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _jobkit import NAME, audited_registry, copy_store
from _toy_models import ColourReader, GreyReader
from mlflow.tracking import MlflowClient

from audit.gate import verify
from audit.gate.loading import log_model_safely

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store with toy v1 audited PASS (champion) and v2 audited FAIL."""
    folder = tmp_path_factory.mktemp("verify")
    audited_registry(folder)
    return folder / "store"


@pytest.fixture
def store(template, tmp_path, monkeypatch):
    """A copy of the template's database (its artifacts stay in the template's folder)."""
    return copy_store(template, tmp_path, monkeypatch)


def run_verify(*args: str) -> tuple[int, list[str], list[str]]:
    """``audit.gate.verify.main(args)``: (exit code, stdout lines, stderr lines)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = verify.main(list(args))
    return code, out.getvalue().splitlines(), err.getvalue().splitlines()


def register(client: MlflowClient, uri: str, model) -> str:
    exp = client.get_experiment_by_name("train").experiment_id
    run = client.create_run(exp)
    _, version = log_model_safely(
        model,
        {"_target_": f"_toy_models.{type(model).__name__}"},
        registered_name=NAME,
        run_id=run.info.run_id,
        tracking_uri=uri,
    )
    client.set_terminated(run.info.run_id)
    return version


def audit_tags(client: MlflowClient, version: str) -> dict[str, str]:
    return {
        k: v
        for k, v in client.get_model_version(NAME, version).tags.items()
        if k.startswith("audit.")
    }


# --------------------------------------------------------------------------- genuine verdicts
def test_a_genuine_pass_verifies_by_number_and_by_alias(store):
    uri, client = store
    tags = audit_tags(client, "1")
    run = client.get_run(tags["audit.run_id"]).data.tags
    mv = client.get_model_version(NAME, "1")
    # the two run tags verify relies on: the version's identity when the audit loaded it
    assert run["audit.model_source"] == mv.source and run["audit.model_created"] == str(
        mv.creation_timestamp
    )
    for target in (f"models:/{NAME}/1", f"models:/{NAME}@champion"):
        code, out, err = run_verify(target, "--tracking-uri", uri)
        assert (code, err) == (0, []), (out, err)
        assert out == [f"{NAME} v1: VERIFIED: a genuine PASS by audit run {tags['audit.run_id']}"]


def test_a_genuine_fail_is_exit_1_and_says_genuine_but_not_pass(store):
    uri, client = store
    code, out, err = run_verify(f"models:/{NAME}/2", "--tracking-uri", uri)
    run_id = audit_tags(client, "2")["audit.run_id"]
    assert code == 1 and err == []
    assert out == [
        f"{NAME} v2: the verdict FAIL is genuine (audit run {run_id}) but not PASS: do not deploy"
    ]


def test_the_default_store_is_the_jobs(store, monkeypatch):
    uri, _client = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert run_verify(f"models:/{NAME}/1")[0] == 0
    monkeypatch.delenv(
        "MLFLOW_TRACKING_URI"
    )  # then ./mlflow.db, which does not exist here: exit 2, nothing made
    code, out, err = run_verify(f"models:/{NAME}/1")
    assert code == 2 and out == [] and len(err) == 1 and "does not exist" in err[0], err
    assert not Path("mlflow.db").exists()


# --------------------------------------------------------------------------- forgeries: exit 1
def test_a_verdict_set_by_hand_is_exit_1(store):
    uri, client = store
    client.set_model_version_tag(NAME, "2", "audit.verdict", "PASS")  # over a genuine FAIL
    code, out, err = run_verify(f"models:/{NAME}/2", "--tracking-uri", uri)
    run_id = audit_tags(client, "2")["audit.run_id"]
    assert code == 1 and err == []
    assert out == [
        f"{NAME} v2: NOT VERIFIED: audit.verdict: audit run {run_id} says 'FAIL', "
        f"the version's audit.verdict is 'PASS'"
    ]


def test_a_pass_set_by_hand_on_an_unaudited_version_is_exit_1(store):
    uri, client = store
    v3 = register(client, uri, GreyReader())
    client.set_model_version_tag(NAME, v3, "audit.verdict", "PASS")
    code, out, _ = run_verify(f"models:/{NAME}/{v3}", "--tracking-uri", uri)
    assert code == 1 and out == [
        f"{NAME} v{v3}: NOT VERIFIED: no audit.run_id tag: the verdict names no audit run"
    ]


def test_tags_copied_from_a_genuine_pass_onto_other_weights_are_exit_1(store):
    """Every audit.* tag of v1 copied onto v2 (other weights): the run names v1, its source, its time, its weights."""
    uri, client = store
    for key, value in audit_tags(client, "1").items():
        client.set_model_version_tag(NAME, "2", key, value)
    code, out, _ = run_verify(f"models:/{NAME}/2", "--tracking-uri", uri)
    assert code == 1
    failed = [ln.split("NOT VERIFIED: ", 1)[1].split(":", 1)[0] for ln in out]
    assert failed == [
        "audit.model_version",
        "audit.model_source",
        "audit.model_created",
        "weights",
    ], out


def test_an_alias_set_by_hand_on_an_unaudited_version_is_exit_1(store):
    uri, client = store
    v3 = register(
        client, uri, ColourReader()
    )  # the same weights as the genuine PASS, never audited
    client.set_registered_model_alias(NAME, "champion", v3)
    code, out, err = run_verify(f"models:/{NAME}@champion", "--tracking-uri", uri)
    assert code == 1 and err == []
    assert out == [
        f"{NAME} v{v3}: NOT VERIFIED: no audit.verdict tag: no audit judged this version"
    ]


def test_a_pass_whose_version_was_deleted_and_registered_again_with_other_weights_is_exit_1(store):
    """The registered model deleted and made again: v1 is another version under the same number; the
    attacker writes the old genuine tags on it. The creation time and the weights give it away."""
    uri, client = store
    old = client.get_model_version(NAME, "1")
    tags = audit_tags(client, "1")
    client.delete_registered_model(NAME)
    assert register(client, uri, GreyReader()) == "1"
    for key, value in tags.items():
        client.set_model_version_tag(NAME, "1", key, value)
    client.set_registered_model_alias(NAME, "champion", "1")
    new = client.get_model_version(NAME, "1")
    assert new.creation_timestamp != old.creation_timestamp
    code, out, _ = run_verify(f"models:/{NAME}@champion", "--tracking-uri", uri)
    assert code == 1
    assert (
        f"{NAME} v1: NOT VERIFIED: audit.model_created: audit run {tags['audit.run_id']} says "
        f"'{old.creation_timestamp}', the version's creation time now is '{new.creation_timestamp}'"
        in out
    ), out
    assert any(
        ln.startswith(f"{NAME} v1: NOT VERIFIED: weights: the file the version points to now")
        for ln in out
    ), out


def test_weights_replaced_in_the_artifact_store_are_exit_1(store):
    """Same version, same source, same creation time; the file behind the source now holds other weights."""
    uri, client = store
    import torch

    mv = client.get_model_version(NAME, "1")
    stored = (
        Path(client.get_run(mv.run_id).info.artifact_uri.removeprefix("file://"))
        / "model"
        / "state_dict.pth"
    )
    original = stored.read_bytes()
    judged = audit_tags(client, "1")["audit.weights_sha256"]
    assert hashlib.sha256(original).hexdigest() == judged
    try:
        torch.save(GreyReader().state_dict(), stored)
        replaced = hashlib.sha256(stored.read_bytes()).hexdigest()
        code, out, _ = run_verify(f"models:/{NAME}/1", "--tracking-uri", uri)
    finally:
        stored.write_bytes(original)  # the artifacts belong to the module's template
    assert code == 1 and out == [
        f"{NAME} v1: NOT VERIFIED: weights: the file the version points to now has sha256 {replaced}, "
        f"the audit judged {judged}"
    ]


def test_a_run_that_is_deleted_or_names_another_store_is_exit_1(store):
    uri, client = store
    run_id = audit_tags(client, "1")["audit.run_id"]
    client.delete_run(run_id)
    code, out, _ = run_verify(f"models:/{NAME}/1", "--tracking-uri", uri)
    assert code == 1 and out == [f"{NAME} v1: NOT VERIFIED: audit run {run_id} is deleted"]
    client.set_model_version_tag(NAME, "1", "audit.run_id", "0" * 32)
    code, out, _ = run_verify(f"models:/{NAME}/1", "--tracking-uri", uri)
    assert code == 1 and out == [
        f"{NAME} v1: NOT VERIFIED: audit.run_id '{'0' * 32}' names no run in {uri}"
    ]


# --------------------------------------------------------------------------- what the caller requires
def test_required_probes_and_tool_version(store):
    uri, client = store
    digest = audit_tags(client, "1")["audit.probe_digest"]
    base = (f"models:/{NAME}/1", "--tracking-uri", uri)
    assert run_verify(*base, "--probes", digest.upper(), "--min-tool-version", "0.1")[0] == 0
    code, out, _ = run_verify(*base, "--probes", "a" * 64, "--min-tool-version", "99.0.1")
    assert code == 1
    assert out == [
        f"{NAME} v1: NOT VERIFIED: probes: the audit used probe set '{digest}', --probes requires {'a' * 64}",
        f"{NAME} v1: NOT VERIFIED: tool version: the audit ran 'model-audit 0.1.0', --min-tool-version requires "
        f"99.0.1 or later",
    ]


# --------------------------------------------------------------------------- bad input: exit 2, one line
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([f"models:/{NAME}"], "is not a version number"),
        (["runs:/abc/model"], "not a registry URI"),
        ([f"models:/{NAME}/x"], "is not a version number"),
        ([f"models:/{NAME}@latest"], "reserved by MLflow"),
        ([f"models:/{NAME}/9"], f"registered model '{NAME}' has no version 9"),
        ([f"models:/{NAME}@nosuch"], f"registered model '{NAME}' has no alias 'nosuch'"),
        (["models:/nosuch/1"], "no such registered model"),
        ([f"models:/{NAME}/1", "--probes", "abc"], "--probes must be a probe set digest"),
        (
            [f"models:/{NAME}/1", "--min-tool-version", "new"],
            "--min-tool-version must be a release",
        ),
    ],
    ids=[
        "no-version",
        "runs-uri",
        "bad-version",
        "reserved-alias",
        "missing-version",
        "missing-alias",
        "missing-model",
        "bad-probes",
        "bad-min-version",
    ],
)
def test_bad_input_is_exit_2_with_one_line(store, args, expected):
    uri, _client = store
    code, out, err = run_verify(*args, "--tracking-uri", uri)
    assert code == 2 and out == [] and len(err) == 1, (out, err)
    assert err[0].startswith("model-audit verify: error: ") and expected in err[0], err


def test_a_missing_store_or_a_dead_server_is_exit_2_in_seconds(tmp_path):
    import time

    absent = tmp_path / "absent.db"
    code, out, err = run_verify(f"models:/{NAME}/1", "--tracking-uri", f"sqlite:///{absent}")
    assert code == 2 and len(err) == 1 and "does not exist" in err[0] and not absent.exists()
    t0 = time.monotonic()
    code, out, err = run_verify(f"models:/{NAME}/1", "--tracking-uri", "http://127.0.0.1:9")
    assert code == 2 and len(err) == 1 and "does not answer its health check" in err[0], err
    assert time.monotonic() - t0 < 15


def test_model_audit_verify_is_dispatched_by_the_command(store):
    """``python -m audit verify`` (the ``model-audit`` entry point): no Hydra, the same exit codes."""
    uri, _client = store
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "audit",
            "verify",
            f"models:/{NAME}@champion",
            "--tracking-uri",
            uri,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"{NAME} v1: VERIFIED"), done.stdout
