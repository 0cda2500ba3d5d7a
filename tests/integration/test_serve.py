"""``model-audit serve`` (:mod:`audit.gate.serve`): MLflow registry webhooks in, audits out.

Every test talks to a real ``python -m audit.gate.serve`` subprocess on 127.0.0.1 over HTTP.
Deliveries are signed with MLflow's own signing function
(``mlflow.webhooks.delivery._generate_hmac_signature``) over the body bytes sent, as
MLflow's delivery does. The fast tests check the checks (signature, replay window,
delivery ids, strict parsing, the refusals at start, SIGTERM); the slow one runs a real
``mlflow server`` whose webhook (created with ``MlflowClient.create_webhook``) announces a
new version, and waits for the audit's tags on it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from _mlflow_server import MlflowServer, free_port, wait_for
from mlflow.tracking import MlflowClient
from mlflow.webhooks.delivery import _generate_hmac_signature

from audit.gate import serve
from audit.gate.loading import log_model_safely
from audit.models import SmallCNN

SECRET = "s3cret-for-tests-" + "x" * 16
SECRET_ENV = "MODEL_AUDIT_TEST_WEBHOOK_SECRET"
MAX_AGE = 60
#: Seconds ``python -m audit.gate.serve`` may take to answer /health (imports and the Hydra compose).
START_S = 60.0


class Serve:
    """A ``python -m audit.gate.serve`` subprocess; its stdout and stderr go to ``log_file``."""

    def __init__(
        self,
        workdir: Path,
        overrides: list[str],
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_file = workdir / "serve.log"
        env = {**os.environ, SECRET_ENV: SECRET, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.pop(key, None)
        cmd = [
            sys.executable,
            "-m",
            "audit.gate.serve",
            "--port",
            str(self.port),
            "--secret-env",
            SECRET_ENV,
            "--max-age",
            str(MAX_AGE),
            *(args or []),
            *overrides,
            f"paths.root_dir={workdir}",
        ]
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}: {self.log()}"
            try:
                return requests.get(self.url + "health", timeout=1).ok
            except requests.RequestException:
                return False

        assert wait_for(up, START_S), (
            f"serve did not answer /health within {START_S} s: {self.log()}"
        )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                pytest.fail(
                    f"serve did not exit within {timeout} s of {signal.Signals(sig).name}: {self.log()}"
                )
        return self.proc.returncode


def body_for(
    name: str = "ghost", version: str = "1", entity: str = "model_version", action: str = "created"
) -> str:
    """The JSON text MLflow's ``_send_webhook_request`` sends (``json.dumps`` of this shape)."""
    data = {
        "name": name,
        "version": version,
        "source": "models:/m-123",
        "run_id": "abc",
        "tags": {},
        "description": None,
    }
    return json.dumps(
        {"entity": entity, "action": action, "timestamp": "2025-01-01T00:00:00+00:00", "data": data}
    )


def signed(
    body: str, secret: str = SECRET, stamp: int | None = None, delivery: str | None = None
) -> dict[str, str]:
    """MLflow's headers for ``body``: delivery id, timestamp and its ``v1,`` signature."""
    delivery = delivery or str(uuid.uuid4())
    ts = str(int(time.time()) if stamp is None else stamp)
    return {
        "Content-Type": "application/json",
        serve.DELIVERY_ID_HEADER: delivery,
        serve.TIMESTAMP_HEADER: ts,
        serve.SIGNATURE_HEADER: _generate_hmac_signature(secret, delivery, ts, body),
    }


def post(
    srv: Serve, body: str | bytes, headers: dict[str, str], path: str = ""
) -> requests.Response:
    data = body.encode("utf-8") if isinstance(body, str) else body
    return requests.post(srv.url + path, data=data, headers=headers, timeout=10)


def queued(srv: Serve, delivery: str) -> bool:
    return re.search(rf"queued \S+ v\d+ \(delivery {delivery}\)", srv.log()) is not None


# --------------------------------------------------------------------------- fast: one receiver for the checks
@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    """A receiver whose audits fail at once: its store does not exist (the audit exits 2, nothing written)."""
    root = tmp_path_factory.mktemp("serve")
    srv = Serve(root, [f"tracking.uri=sqlite:///{root / 'absent' / 'mlflow.db'}"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log()


@pytest.mark.slow  # an audit subprocess to its error: 15 s idle, up to a minute on 2 busy cores
@pytest.mark.timeout(180)  # first: no other audit is queued ahead of it
def test_a_failing_audit_is_logged_and_the_server_goes_on(receiver):
    body = body_for("ghost", "8")
    h = signed(body)
    assert post(receiver, body, h).status_code == 202
    line = re.compile(
        rf"audit ghost v8: verdict none, exit 2, .*\(delivery {h[serve.DELIVERY_ID_HEADER]}\); model-audit: error: .*does not exist"
    )
    assert wait_for(lambda: line.search(receiver.log()) is not None, 150), receiver.log()
    assert receiver.proc.poll() is None
    body = body_for("ghost", "9")
    assert post(receiver, body, signed(body)).status_code == 202


def test_header_names_and_signature_match_mlflows():
    from mlflow.webhooks import constants

    assert (
        serve.SIGNATURE_HEADER,
        serve.TIMESTAMP_HEADER,
        serve.DELIVERY_ID_HEADER,
        serve.SIGNATURE_VERSION,
    ) == (
        constants.WEBHOOK_SIGNATURE_HEADER,
        constants.WEBHOOK_TIMESTAMP_HEADER,
        constants.WEBHOOK_DELIVERY_ID_HEADER,
        constants.WEBHOOK_SIGNATURE_VERSION,
    )
    body = body_for("wolf", "7")
    h = signed(body)
    args = (h[serve.DELIVERY_ID_HEADER], h[serve.TIMESTAMP_HEADER], body.encode())
    assert serve.verify_signature(SECRET.encode(), *args, h[serve.SIGNATURE_HEADER])
    assert not serve.verify_signature(
        b"another secret of some length", *args, h[serve.SIGNATURE_HEADER]
    )
    assert not serve.verify_signature(
        SECRET.encode(), args[0], str(int(args[1]) + 1), args[2], h[serve.SIGNATURE_HEADER]
    )


def test_a_good_signature_is_accepted_and_queued(receiver):
    body = body_for("ghost", "1")
    h = signed(body)
    r = post(receiver, body, h)
    assert r.status_code == 202, r.text
    assert (
        r.json() == {"status": "queued", "model": "ghost", "version": "1"}
        or r.json()["status"] == "already queued"
    )
    assert wait_for(lambda: queued(receiver, h[serve.DELIVERY_ID_HEADER]), 5), receiver.log()


@pytest.mark.parametrize(
    "case",
    [
        "wrong secret",
        "body changed after signing",
        "no signature",
        "signature of another delivery id",
    ],
)
def test_a_wrong_signature_is_refused_401_and_nothing_is_queued(receiver, case):
    body = body_for("ghost", "2")
    h = signed(body, secret="not-the-secret-" + "y" * 16 if case == "wrong secret" else SECRET)
    if case == "body changed after signing":
        body = body_for("ghost", "3")
    elif case == "no signature":
        del h[serve.SIGNATURE_HEADER]
    elif case == "signature of another delivery id":
        h[serve.DELIVERY_ID_HEADER] = str(uuid.uuid4())
    r = post(receiver, body, h)
    assert r.status_code == 401, r.text
    assert "signature" in r.json()["error"] or "unsigned" in r.json()["error"]
    time.sleep(0.3)
    assert f"delivery {h[serve.DELIVERY_ID_HEADER]}" not in receiver.log()


@pytest.mark.parametrize("offset", [-(MAX_AGE + 30), MAX_AGE + 30], ids=["old", "future"])
def test_a_stale_timestamp_is_refused_even_when_signed(receiver, offset):
    body = body_for("ghost", "4")
    h = signed(
        body, stamp=int(time.time()) + offset
    )  # a correct signature over the stale timestamp
    r = post(receiver, body, h)
    assert r.status_code == 401, r.text
    assert "stale" in r.json()["error"]
    time.sleep(0.3)
    assert f"delivery {h[serve.DELIVERY_ID_HEADER]}" not in receiver.log()


def test_a_replayed_delivery_is_refused_409(receiver):
    body = body_for("ghost", "5")
    h = signed(body)
    first = post(receiver, body, h)
    assert first.status_code == 202, first.text
    again = post(receiver, body, h)  # the same bytes and headers: a captured delivery sent again
    assert again.status_code == 409, again.text
    assert "replay" in again.json()["error"]
    time.sleep(0.3)
    assert (
        len(
            re.findall(
                rf"queued ghost v5 \(delivery {h[serve.DELIVERY_ID_HEADER]}\)", receiver.log()
            )
        )
        == 1
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (
            json.dumps({"entity": "model_version", "action": "created", "data": "x"}),
            "data must be an object",
        ),
        (body_for("${oc.env:HOME}", "1"), "data.name"),
        (body_for("a,b", "1"), "data.name"),
        (body_for("wolf/1", "1"), "data.name"),
        (body_for("wolf", "1,2"), "data.version"),
        (body_for("wolf", "0"), "data.version"),
        (
            json.dumps(
                {
                    "entity": "model_version",
                    "action": "created",
                    "data": {"name": "wolf", "version": 3},
                }
            ),
            "data.version",
        ),
    ],
    ids=[
        "text",
        "array",
        "data",
        "interpolation",
        "comma",
        "slash",
        "versions",
        "zero",
        "int-version",
    ],
)
def test_a_malformed_signed_delivery_is_refused_400(receiver, body, expected):
    h = signed(body)
    r = post(receiver, body, h)
    assert r.status_code == 400, r.text
    assert expected in r.json()["error"]
    time.sleep(0.2)
    assert not queued(receiver, h[serve.DELIVERY_ID_HEADER])


@pytest.mark.parametrize(
    "depth", [serve.MAX_JSON_DEPTH + 1, 200_000], ids=["just-over", "recursion"]
)
def test_a_signed_body_nested_too_deep_is_refused_400_and_the_server_goes_on(receiver, depth):
    """Python's JSON parser recurses: 200000 nested arrays raised RecursionError, with no answer."""
    body = (
        '{"entity": "model_version", "action": "created", "data": '
        + "[" * depth
        + "]" * depth
        + "}"
    )
    h = signed(body)
    r = post(receiver, body, h)
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": f"the body nests arrays and objects {depth + 1} deep, above the limit of {serve.MAX_JSON_DEPTH}"
    }
    time.sleep(0.2)
    assert "Traceback" not in receiver.log() and "RecursionError" not in receiver.log()
    assert not queued(receiver, h[serve.DELIVERY_ID_HEADER])
    ok = body_for("ghost", "11")
    assert post(receiver, ok, signed(ok)).status_code == 202  # the receiver still answers


def test_a_signed_body_at_the_depth_limit_is_parsed(receiver):
    nested: dict = {"tags": {}}
    for _ in range(serve.MAX_JSON_DEPTH - 3):
        nested = {"x": nested}
    body = json.dumps({"entity": "model_version", "action": "created", "data": nested})
    assert serve.json_depth(body) == serve.MAX_JSON_DEPTH
    r = post(receiver, body, signed(body))
    assert r.status_code == 400 and "data.name" in r.json()["error"], r.text  # parsed, then judged


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ('{"a": "[[[{{{"}', 1),  # brackets in a string do not count
        ('["\\"[[", [[]]]', 3),  # nor after an escaped quote
        ('["a\\\\", [[]]]', 3),  # an escaped backslash ends before the quote
        ('[["unterminated [[[[', 2),  # an unterminated string reaches the end, as for the parser
        ('"' + '\\"' * 200_000, 0),  # linear: one scan, not one per escaped quote
    ],
)
def test_json_depth_counts_as_the_parser_nests(text, depth):
    t0 = time.perf_counter()
    assert serve.json_depth(text) == depth
    assert time.perf_counter() - t0 < 2.0


def test_other_events_are_answered_200_and_ignored(receiver):
    body = body_for("wolf", "1", entity="registered_model", action="created")
    h = signed(body)
    r = post(receiver, body, h)
    assert r.status_code == 200 and r.json() == {
        "status": "ignored",
        "event": "registered_model.created",
    }, r.text
    assert not queued(receiver, h[serve.DELIVERY_ID_HEADER])


def judged_body(event: str, **data: str) -> str:
    """MLflow's body of ``model_version_alias.created`` (name, alias, version) or ``model_version_tag.set``
    (name, version, key, value): mlflow/webhooks/types.py."""
    entity, action = event.rsplit(".", 1)
    return json.dumps(
        {"entity": entity, "action": action, "timestamp": "2025-01-01T00:00:00+00:00", "data": data}
    )


@pytest.mark.parametrize(
    ("body", "status", "answer"),
    [
        (judged_body(serve.ALIAS_EVENT, name="wolf", alias="staging", version="1"), 200, "ignored"),
        (
            judged_body(serve.TAG_EVENT, name="wolf", version="1", key="owner", value="x"),
            200,
            "ignored",
        ),
        (judged_body(serve.ALIAS_EVENT, name="wolf", version="1"), 400, "data.alias"),
        (
            judged_body(serve.ALIAS_EVENT, name="wolf", alias="champ ion", version="1"),
            400,
            "data.alias",
        ),
        (judged_body(serve.TAG_EVENT, name="wolf", version="1", value="PASS"), 400, "data.key"),
        (
            judged_body(serve.TAG_EVENT, name="wolf\n", version="1", key="audit.verdict"),
            400,
            "data.name",
        ),
        (
            judged_body(serve.TAG_EVENT, name="wolf", version="one", key="audit.verdict"),
            400,
            "data.version",
        ),
    ],
    ids=[
        "other-alias",
        "other-key",
        "no-alias",
        "bad-alias",
        "no-key",
        "control-char",
        "bad-version",
    ],
)
def test_judged_events_are_parsed_strictly(receiver, body, status, answer):
    h = signed(body)
    r = post(receiver, body, h)
    assert r.status_code == status, r.text
    assert answer in (r.json().get("status") or r.json().get("error")), r.text


def test_an_audit_tag_event_is_judged_off_the_audit_queue_and_never_crashes_the_server(receiver):
    """The receiver's store does not exist: the check is logged as not judged; nothing is created."""
    body = judged_body(serve.TAG_EVENT, name="wolf", version="3", key="audit.verdict", value="PASS")
    h = signed(body)
    r = post(receiver, body, h)
    assert r.status_code == 202 and r.json()["status"] == "checking", r.text
    line = re.compile(
        rf"audit\.\* tag on 'wolf' v3: not judged \(delivery {h[serve.DELIVERY_ID_HEADER]}\): .*does not exist"
    )
    assert wait_for(lambda: line.search(receiver.log()) is not None, 30), receiver.log()
    assert receiver.proc.poll() is None and requests.get(receiver.url + "health", timeout=5).ok


def test_size_path_and_length_limits(receiver):
    big = b"x" * (serve.MAX_BODY + 1)
    r = requests.post(
        receiver.url, data=big, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert r.status_code == 413, r.text
    body = body_for("ghost", "6")
    assert post(receiver, body, signed(body), path="hooks").status_code == 404
    chunked = requests.post(
        receiver.url, data=iter([body.encode()]), headers=signed(body), timeout=10
    )
    assert chunked.status_code == 411, chunked.text


# --------------------------------------------------------------------------- fast: start and stop
@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({SECRET_ENV: ""}, [], f"no webhook secret: set the environment variable {SECRET_ENV}"),
        ({SECRET_ENV: "short"}, [], "use at least 16"),
        ({}, ["model.uri=models:/x/1"], "model.uri is set per delivery"),
        ({}, ["gaet.fail=1"], "unknown config key 'gaet"),
        ({}, ["model=checkpoint"], "model.kind must be mlflow"),
    ],
    ids=["no-secret", "short-secret", "model-uri", "unknown-key", "not-mlflow"],
)
def test_bad_start_exits_2_with_one_line(tmp_path, env, args, expected):
    srv = Serve(tmp_path, args, env=env)
    try:
        code = srv.proc.wait(START_S)
    finally:
        srv.stop()
    errors = [ln for ln in srv.log().splitlines() if ln.startswith("model-audit serve: error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], srv.log()
    assert "Traceback" not in srv.log() and SECRET not in srv.log()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_accepting_ends_the_running_audit_and_exits_0(tmp_path, sig):
    srv = Serve(tmp_path, [f"tracking.uri=sqlite:///{tmp_path / 'absent' / 'mlflow.db'}"])
    try:
        srv.wait_ready()
        deliveries = []
        for version in ("1", "2"):  # v1 starts at once; v2 waits behind it and is dropped
            body = body_for("ghost", version)
            h = signed(body)
            assert post(srv, body, h).status_code == 202
            deliveries.append(h[serve.DELIVERY_ID_HEADER])
        assert wait_for(lambda: "queued ghost v2" in srv.log(), 5)
        code = srv.stop(sig)
    finally:
        srv.stop(signal.SIGKILL)
    log = srv.log()
    assert code == 0, log
    assert re.search(
        rf"audit ghost v1: verdict none, exit (2|-\d+), .*\(delivery {deliveries[0]}\)", log
    ), log
    assert f"not audited (the server is stopping): ghost v2 (delivery {deliveries[1]})" in log, log
    assert log.rstrip().endswith("stopped"), log
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.url + "health", timeout=2)


# --------------------------------------------------------------------------- slow: a real mlflow server's webhook
NET = {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8, 16]}
AUDIT = [
    "probes.n_per_group=32",
    "probes.size=32",
    "engine.methods=[gradcam]",
    "engine.attribution_probes=16",
    "engine.sanity_probes=0",
    "engine.steps=4",
]


def _register(client: MlflowClient, uri: str, experiment: str, seed: int) -> str:
    import torch

    torch.manual_seed(seed)
    run = client.create_run(experiment)
    _, version = log_model_safely(
        SmallCNN(2, widths=(8, 16)),
        NET,
        registered_name="wolf",
        run_id=run.info.run_id,
        tracking_uri=uri,
    )
    client.set_terminated(run.info.run_id)
    return version


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_webhook_from_a_real_mlflow_server_audits_the_new_version(tmp_path, monkeypatch):
    # the MLflow server may deliver to http://127.0.0.1 only with these (mlflow/utils/validation.py
    # _validate_webhook_url and mlflow/webhooks/ssrf.py); MlflowServer passes os.environ on
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    root = tmp_path / "server"
    root.mkdir()
    db = root / "server.db"
    direct = MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    exp = direct.create_experiment("train", artifact_location=(root / "train-artifacts").as_uri())
    # v1 exists before the webhook: only a forged delivery will name it
    assert _register(direct, f"sqlite:///{db}", exp, seed=1) == "1"
    server = MlflowServer(root, db)
    server.start()
    srv = None
    try:
        srv = Serve(tmp_path / "serve", [f"tracking.uri={server.uri}", *AUDIT])
        srv.wait_ready()
        client = MlflowClient(server.uri, registry_uri=server.uri)
        hook = client.create_webhook(
            name="model-audit", url=srv.url, events=["model_version.created"], secret=SECRET
        )
        assert hook.url == srv.url

        forged_body = body_for("wolf", "1")
        forged = post(srv, forged_body, signed(forged_body, secret="an-attacker-guess-" + "z" * 16))
        assert forged.status_code == 401, forged.text

        version = _register(
            client, server.uri, exp, seed=2
        )  # through the server: the webhook fires
        assert version == "2"

        def audited() -> bool:
            assert srv.proc.poll() is None, srv.log()
            return (
                "audit.verdict" in client.get_model_version("wolf", "2").tags
                and "audit wolf v2:" in srv.log()
            )

        assert wait_for(audited, 480, every=2.0), (
            f"no audit of wolf v2:\n{srv.log()}\n{(root / 'server.log').read_text()[-3000:]}"
        )
        tags = client.get_model_version("wolf", "2").tags
        verdict = tags["audit.verdict"]
        assert verdict in ("PASS", "FAIL", "INCONCLUSIVE"), tags
        run = client.get_run(tags["audit.run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["audit.verdict"] == verdict
        assert (
            run.data.tags["audit.model_registered_name"] == "wolf"
            and run.data.tags["audit.model_version"] == "2"
        )
        aliases = {k: str(v) for k, v in client.get_registered_model("wolf").aliases.items()}
        assert aliases == ({"champion": "2"} if verdict == "PASS" else {}), (verdict, aliases)
        log = srv.log()
        assert re.search(r"queued wolf v2 \(delivery [0-9a-f-]{36}\)", log), (
            log
        )  # MLflow's own delivery
        exit_code = 0 if verdict == "PASS" else 1
        assert re.search(rf"audit wolf v2: verdict {verdict}, exit {exit_code}, ", log), log
        # the forged delivery changed nothing: v1 has no audit tag and no alias; one audit ran in all
        assert not [k for k in client.get_model_version("wolf", "1").tags if k.startswith("audit.")]
        assert "1" not in aliases.values()
        assert len(re.findall(r"audit \S+ v\d+: verdict", log)) == 1, log
        assert srv.stop() == 0, srv.log()
    finally:
        if srv is not None:
            srv.stop(signal.SIGKILL)
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_real_mlflow_server_delivers_alias_and_tag_events_that_serve_flags_and_revokes(
    tmp_path, monkeypatch
):
    """MLflow's own deliveries of model_version_alias.created and model_version_tag.set: an alias set
    by hand on an unaudited version is flagged (alert: kept; revoke: removed); a genuine audit through
    the server (its tags written in sequence, then the alias) is not flagged; a forged verdict is removed."""
    from _jobkit import NAME, cli, probes_args, registry

    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    # the server caches the webhooks of each event (default 60 s): a webhook made or deleted
    # below must take effect within a second
    monkeypatch.setenv("MLFLOW_WEBHOOK_CACHE_TTL", "1")
    root = tmp_path / "server"
    registry(root)  # toy v1 (reads the colour: PASS when audited), v2; neither audited yet
    server = MlflowServer(root, root / "mlflow.db")
    server.start()
    alert = revoke = None
    try:
        alert = Serve(tmp_path / "alert", [f"tracking.uri={server.uri}"])
        revoke = Serve(
            tmp_path / "revoke",
            [f"tracking.uri={server.uri}"],
            args=["--on-unverified-alias", "revoke"],
        )
        alert.wait_ready()
        revoke.wait_ready()
        client = MlflowClient(server.uri, registry_uri=server.uri)
        events = [serve.ALIAS_EVENT, serve.TAG_EVENT]

        def aliases() -> dict[str, str]:
            return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}

        def model_tags() -> dict[str, str]:
            return dict(client.get_registered_model(NAME).tags)

        # 1. alert: the alias set by hand on v2, never audited: flagged, left in place
        hook = client.create_webhook(
            name="watch-alert", url=alert.url, events=events, secret=SECRET
        )
        client.set_registered_model_alias(NAME, "champion", "2")
        assert wait_for(lambda: serve.ALIAS_ALERT_TAG in model_tags(), 120), alert.log()
        assert (
            "FLAGGED alias 'champion' of 'toy' -> v2 without a genuine PASS: no audit.verdict tag"
            in alert.log()
        )
        assert (
            aliases() == {"champion": "2"}
            and "left in place" in model_tags()[serve.ALIAS_ALERT_TAG]
        )
        client.delete_webhook(hook.webhook_id)
        # 2. revoke: the same alias set again is removed
        client.create_webhook(name="watch-revoke", url=revoke.url, events=events, secret=SECRET)
        time.sleep(2.0)  # the server's webhook cache (its TTL, above)
        client.set_registered_model_alias(NAME, "champion", "2")
        assert wait_for(lambda: not aliases(), 120), revoke.log()
        assert (
            "the alias was removed (--on-unverified-alias revoke)"
            in model_tags()[serve.ALIAS_ALERT_TAG]
        )
        # 3. a genuine audit through the server: its tag events and its alias are judged genuine
        work = tmp_path / "work"
        work.mkdir()
        res = cli(
            [f"model.uri=models:/{NAME}/1", f"tracking.uri={server.uri}", *probes_args(work)], work
        )
        assert res.code == 0, res.out + res.err
        assert wait_for(
            lambda: "alias 'champion' of 'toy' -> v1: a genuine PASS" in revoke.log(), 120
        ), revoke.log()
        assert (
            aliases() == {"champion": "1"}
            and client.get_model_version(NAME, "1").tags["audit.verdict"] == "PASS"
        )
        assert revoke.log().count("FLAGGED") == 1, revoke.log()  # step 2 only
        assert serve.VERDICT_ALERT_TAG not in model_tags()
        # 4. a verdict forged on v2: flagged and removed
        client.set_model_version_tag(NAME, "2", "audit.verdict", "PASS")
        assert wait_for(
            lambda: "audit.verdict" not in client.get_model_version(NAME, "2").tags, 120
        ), revoke.log()
        assert "is not genuine: no audit.run_id tag" in model_tags()[serve.VERDICT_ALERT_TAG]
        assert aliases() == {"champion": "1"}
        assert alert.stop() == 0 and revoke.stop() == 0
    finally:
        for srv in (alert, revoke):
            if srv is not None:
                srv.stop(signal.SIGKILL)
        server.stop()
