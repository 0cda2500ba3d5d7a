"""The webhook receiver's watcher (:class:`audit.gate.serve.Watcher`): a promotion alias or an ``audit.*``
tag that no genuine audit wrote is flagged, and with ``revoke`` removed.

In-process, on a real SQLite registry with real audits (``_jobkit.audited_registry``: ``toy``
v1 a genuine PASS holding ``champion``, v2 a genuine FAIL). The delivery over HTTP from a
real ``mlflow server`` is tests/integration/test_serve.py's slow test.
"""

from __future__ import annotations

import logging

import pytest
from _jobkit import NAME, audited_registry, copy_store
from _mlflow_server import wait_for
from _toy_models import ColourReader
from mlflow.tracking import MlflowClient

from audit.gate.loading import log_model_safely
from audit.gate.serve import ALIAS_ALERT_TAG, VERDICT_ALERT_TAG, Check, Watcher


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("watch")
    audited_registry(folder)
    return folder / "store"


@pytest.fixture
def store(template, tmp_path, monkeypatch):
    return copy_store(template, tmp_path, monkeypatch)


@pytest.fixture
def watch(store, caplog):
    """``watch(mode, check, done)``: a started Watcher judges ``check``; waits for the log line that
    contains ``done``; returns the log text. The watcher is stopped afterwards."""
    uri, _ = store
    started: list[Watcher] = []
    caplog.set_level(logging.INFO, logger="audit.gate.serve")

    def run(mode: str, check: Check, done: str, settle_s: float = 0.2) -> str:
        w = Watcher(uri, "champion", mode, settle_s=settle_s)
        started.append(w)
        w.start()
        assert w.submit(check) == "checking"
        assert wait_for(lambda: done in caplog.text, 60), caplog.text
        return caplog.text

    yield run
    for w in started:
        w.stop()
        assert not w.thread.is_alive()


def unaudited(client: MlflowClient, uri: str) -> str:
    run = client.create_run(client.get_experiment_by_name("train").experiment_id)
    _, version = log_model_safely(
        ColourReader(),
        {"_target_": "_toy_models.ColourReader"},
        registered_name=NAME,
        run_id=run.info.run_id,
        tracking_uri=uri,
    )
    client.set_terminated(run.info.run_id)
    return version


def aliases(client: MlflowClient) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}


def model_tags(client: MlflowClient) -> dict[str, str]:
    return dict(client.get_registered_model(NAME).tags)


@pytest.mark.parametrize("mode", ["alert", "revoke"])
def test_an_alias_set_by_hand_on_an_unaudited_version_is_flagged(store, watch, mode):
    uri, client = store
    v3 = unaudited(client, uri)
    client.set_registered_model_alias(NAME, "champion", v3)
    log = watch(mode, Check("alias", NAME, "champion", "d-1"), "FLAGGED")
    assert (
        f"FLAGGED alias 'champion' of 'toy' -> v{v3} without a genuine PASS: no audit.verdict tag"
        in log
    )
    alert = model_tags(client)[ALIAS_ALERT_TAG]
    assert f"alias 'champion' on v{v3} without a genuine PASS: no audit.verdict tag" in alert
    if mode == "alert":
        assert aliases(client) == {"champion": v3} and "left in place" in alert
    else:
        assert aliases(client) == {} and "the alias was removed" in alert


def test_a_genuine_pass_holding_the_alias_is_not_flagged_even_with_revoke(store, watch):
    _, client = store
    log = watch("revoke", Check("alias", NAME, "champion", "d-2"), "a genuine PASS")
    assert "FLAGGED" not in log and aliases(client) == {"champion": "1"}
    assert ALIAS_ALERT_TAG not in model_tags(client)


def test_a_genuine_fail_given_the_alias_by_hand_is_flagged(store, watch):
    _, client = store
    client.set_registered_model_alias(NAME, "champion", "2")
    log = watch("revoke", Check("alias", NAME, "champion", "d-3"), "FLAGGED")
    assert "its verdict FAIL is genuine but not PASS" in log and aliases(client) == {}


@pytest.mark.parametrize("mode", ["alert", "revoke"])
def test_a_forged_verdict_is_flagged_and_with_revoke_removed(store, watch, mode):
    _, client = store
    client.set_model_version_tag(NAME, "2", "audit.verdict", "PASS")  # over its genuine FAIL
    log = watch(mode, Check("tag", NAME, "2", "d-4"), "FLAGGED")
    assert (
        "FLAGGED audit.verdict='PASS' on 'toy' v2 is not genuine: audit.verdict: audit run" in log
    )
    assert "audit.verdict='PASS' on v2 is not genuine" in model_tags(client)[VERDICT_ALERT_TAG]
    tags = client.get_model_version(NAME, "2").tags
    assert tags.get("audit.verdict") == ("PASS" if mode == "alert" else None), tags
    assert "audit.run_id" in tags  # only the forged verdict is removed
    assert aliases(client) == {"champion": "1"}


def test_audit_tags_without_a_verdict_are_nothing_to_flag(store, watch):
    """The gate between its writes: the old verdict removed, evidence written, no verdict yet."""
    _, client = store
    client.delete_model_version_tag(NAME, "2", "audit.verdict")
    log = watch("revoke", Check("tag", NAME, "2", "d-5"), "no verdict yet, nothing to flag")
    assert "FLAGGED" not in log and VERDICT_ALERT_TAG not in model_tags(client)


def test_a_champion_whose_verdict_comes_back_within_the_settle_time_is_not_flagged(
    store, watch, caplog
):
    """The champion re-audited: its old verdict removed, the alias event judged before the new
    verdict is written. The check is repeated, and the verdict is back by then."""
    _, client = store
    verdict = client.get_model_version(NAME, "1").tags["audit.verdict"]
    client.delete_model_version_tag(NAME, "1", "audit.verdict")
    watch("revoke", Check("alias", NAME, "champion", "d-6"), "judged again in 2 s", settle_s=2.0)
    client.set_model_version_tag(NAME, "1", "audit.verdict", verdict)
    assert wait_for(lambda: "a genuine PASS" in caplog.text, 30), caplog.text
    assert "FLAGGED" not in caplog.text and aliases(client) == {"champion": "1"}


def test_a_champion_left_without_a_verdict_is_flagged_after_the_settle_tries(store, watch):
    _, client = store
    client.delete_model_version_tag(NAME, "1", "audit.verdict")
    log = watch("revoke", Check("alias", NAME, "champion", "d-7"), "FLAGGED", settle_s=0.2)
    assert log.count("judged again in 0.2 s") == 3 and aliases(client) == {}


def test_a_missing_store_is_logged_and_nothing_is_created(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="audit.gate.serve")
    db = tmp_path / "absent.db"
    w = Watcher(f"sqlite:///{db}", "champion", "revoke")
    w.start()
    try:
        assert w.submit(Check("tag", NAME, "1", "d-8")) == "checking"
        assert wait_for(lambda: "not judged" in caplog.text, 30), caplog.text
    finally:
        w.stop()
    assert "does not exist" in caplog.text and not db.exists()
