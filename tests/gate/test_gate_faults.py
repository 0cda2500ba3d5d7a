"""Faults at every MLflow write of an audit: a real ``mlflow server`` stopped, or the audit SIGKILLed.

A real ``mlflow server`` on 127.0.0.1 (SQLite store) sits behind a forwarding proxy in
this process (:class:`_mlflow_server.FaultProxy`). The audit runs as a subprocess
(``python -m audit``) against the proxy and the proxy faults one write step:

* ``stop``: the server is stopped when the step's request arrives; the request is never
  forwarded (its connection is dropped). The audit must exit 2 within 30 s with one
  ``model-audit: error:`` line and no traceback; after a restart, a second audit closes
  the first audit's run if it was left RUNNING (its lease, ``tracking.run_lease_s=1``,
  has passed) and PASSes.
* ``kill``: the step's request is forwarded, and once the server's answer is back the
  audit is SIGKILLed *before* the answer reaches it: the write happened, the tool never
  learnt it. A run left RUNNING is expected (the tool could not see the kill) but never
  carries a verdict; a second audit closes it.

After each step the server's SQLite store is read directly and checked: a version's
``audit.verdict`` is its ``audit.run_id`` run's own verdict, that run is FINISHED and
judged this very version; the ``champion`` alias sits only on a version whose verdict
is PASS; no run carries a verdict unless FINISHED.

The write steps (observed through the proxy, MLflow 3.17): ``runs/create``,
``runs/log-inputs`` (the probe set), ``runs/log-batch`` (metrics, params), ``PUT mlflow-artifacts/.../report/report.{html,json,md}``
and ``.../audit_config.yaml``, ``runs/update`` (FINISHED), ``runs/log-batch`` (the
``audit.verdict`` tag), ``DELETE model-versions/delete-tag`` (an earlier verdict only),
``model-versions/set-tag`` for ``audit.run_id``, ``audit.probe_digest``,
``audit.tool_version``, ``audit.audited_at``, ``audit.run_link``, ``audit.weights_sha256``, ``audit.verdict``,
``audit.history``, then ``POST registered-models/alias`` (PASS only).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _jobkit import probes_args
from _mlflow_server import FaultProxy, MlflowServer, Step
from _toy_models import ColourReader
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from audit.gate.loading import log_model_safely

TESTS = Path(__file__).resolve().parents[1]
EXPERIMENT = "model-audit-gate"
API = "/api/2.0/mlflow"
#: Seconds an audit may take to exit 2 once the server it writes to is gone.
STOP_EXIT_S = 30.0
#: Bound on one audit subprocess (imports ~6 s, audit and MLflow writes ~10 s on 2 cores).
AUDIT_TIMEOUT_S = 240.0


def _set_tag(key: str) -> Step:
    return Step(f"set-tag {key}", "POST", f"{API}/model-versions/set-tag", body_key=key)


RUN_CREATE = Step("runs/create", "POST", f"{API}/runs/create")
RUN_INPUTS = Step("runs/log-inputs", "POST", f"{API}/runs/log-inputs")
RUN_METRICS = Step("runs/log-batch metrics+params", "POST", f"{API}/runs/log-batch", n=1)
RUN_UPLOAD_FIRST = Step("upload report.html", "PUT", "/artifacts/report/report.html")
RUN_UPLOAD_LAST = Step("upload audit_config.yaml", "PUT", "/artifacts/audit_config.yaml")
RUN_FINISHED = Step("runs/update FINISHED", "POST", f"{API}/runs/update")
RUN_VERDICT = Step(
    "runs/log-batch audit.verdict", "POST", f"{API}/runs/log-batch", body_key="audit.verdict"
)
OLD_VERDICT_DELETE = Step("delete-tag audit.verdict", "DELETE", f"{API}/model-versions/delete-tag")
ALIAS = Step("registered-models/alias", "POST", f"{API}/registered-models/alias")
EVIDENCE = [
    "audit.run_id",
    "audit.probe_digest",
    "audit.tool_version",
    "audit.audited_at",
    "audit.run_link",
    "audit.weights_sha256",
]

KILL_STEPS = [
    RUN_CREATE,
    RUN_INPUTS,
    RUN_METRICS,
    RUN_UPLOAD_FIRST,
    RUN_UPLOAD_LAST,
    RUN_FINISHED,
    RUN_VERDICT,
    OLD_VERDICT_DELETE,
    *[_set_tag(k) for k in EVIDENCE],
    _set_tag("audit.verdict"),
    _set_tag("audit.history"),
    ALIAS,
]
STOP_STEPS = [
    RUN_CREATE,
    RUN_METRICS,
    RUN_FINISHED,
    RUN_VERDICT,
    _set_tag("audit.run_id"),
    _set_tag("audit.verdict"),
    _set_tag("audit.history"),
    ALIAS,
]


def _ids(steps: list[Step]) -> list[str]:
    return [s.label.replace(" ", "-").replace("/", "-") for s in steps]


# --------------------------------------------------------------------------- stores and audits
def build_store(folder: Path, names: list[str], earlier_fail: tuple[str, ...] = ()) -> Path:
    """A SQLite store (``folder/server.db``) where each of ``names`` has v1 = ``ColourReader``.

    The models' artifacts are local file URIs (read by the audit on this machine). Each
    name in ``earlier_fail`` also carries, on v1, the tags of an earlier complete audit
    that FAILed (no alias), so that a new audit first deletes that verdict.
    """
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "server.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("train", artifact_location=(folder / "train-artifacts").as_uri())
    for name in names:
        run = client.create_run(exp)
        log_model_safely(
            ColourReader(),
            {"_target_": "_toy_models.ColourReader"},
            registered_name=name,
            run_id=run.info.run_id,
            tracking_uri=uri,
        )
        client.set_terminated(run.info.run_id)
    if earlier_fail:
        old = client.create_experiment(
            "earlier-audits", artifact_location=(folder / "old").as_uri()
        )
        for name in earlier_fail:
            run_id = client.create_run(
                old, tags={"audit.model_registered_name": name, "audit.model_version": "1"}
            ).info.run_id
            client.set_terminated(run_id, "FINISHED")
            client.set_tag(run_id, "audit.verdict", "FAIL")
            for k, v in {
                "audit.run_id": run_id,
                "audit.verdict": "FAIL",
                "audit.history": f"2020-01-01T00:00:00Z FAIL run={run_id} earlier",
            }.items():
                client.set_model_version_tag(name, "1", k, v)
    return db


@dataclass
class Audit:
    code: int
    out: str
    err: str
    seconds_after_step: float | None  # from the faulted request's arrival to the exit

    @property
    def errors(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("model-audit: error:")]

    def text(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"


def audit(
    proxy: FaultProxy, name: str, probes: list[str], workdir: Path, lease_s: float | None = None
) -> Audit:
    """``python -m audit`` on ``models:/<name>/1`` through ``proxy``; the proxy's victim while it runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    args = [
        f"model.uri=models:/{name}/1",
        f"tracking.uri={proxy.uri}",
        *probes,
        f"paths.root_dir={workdir}",
    ]
    if lease_s is not None:
        args.append(f"tracking.run_lease_s={lease_s}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "audit", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proxy.victim = proc
    try:
        out, err = proc.communicate(timeout=AUDIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        pytest.fail(
            f"the audit of {name} did not end within {AUDIT_TIMEOUT_S:.0f} s:\n{out[-2000:]}\n{err[-2000:]}"
        )
    finally:
        proxy.victim = None
    ended = time.monotonic()
    armed = proxy.armed
    after = ended - armed.at if armed is not None and armed.at is not None else None
    return Audit(proc.returncode, out, err, after)


def store_client(db: Path) -> MlflowClient:
    """The server's store read directly (no server needed)."""
    uri = f"sqlite:///{db}"
    return MlflowClient(uri, registry_uri=uri)


def all_runs(client: MlflowClient) -> list:
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(exps, run_view_type=ViewType.ALL, max_results=5000)


def gate_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    return (
        []
        if exp is None
        else client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=5000)
    )


def check_invariants(db: Path, names: list[str], where: str) -> dict[str, dict]:
    """The registry never shows a verdict that is not its run's; returns each name's v1 tags and aliases."""
    client = store_client(db)
    seen = {}
    for name in names:
        tags = dict(client.get_model_version(name, "1").tags)
        aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
        seen[name] = {"tags": tags, "aliases": aliases}
        verdict = tags.get("audit.verdict")
        if verdict is not None:
            assert "audit.run_id" in tags, (
                f"{where}: {name} v1 has verdict {verdict} but no audit.run_id: {tags}"
            )
            run = client.get_run(tags["audit.run_id"])
            assert run.info.status == "FINISHED", (
                f"{where}: {name} v1's verdict names run {run.info.run_id}, {run.info.status}"
            )
            assert run.data.tags.get("audit.verdict") == verdict, (
                f"{where}: {name} v1 says {verdict}, its run {run.info.run_id} says {run.data.tags.get('audit.verdict')}"
            )
            judged = (
                run.data.tags.get("audit.model_registered_name"),
                run.data.tags.get("audit.model_version"),
            )
            assert judged == (name, "1"), (
                f"{where}: {name} v1's verdict comes from a run that judged {judged}"
            )
        if aliases.get("champion") == "1":
            assert verdict == "PASS", f"{where}: champion on {name} v1 whose verdict is {verdict!r}"
    for run in all_runs(client):
        if "audit.verdict" in run.data.tags:
            assert run.info.status == "FINISHED", (
                f"{where}: run {run.info.run_id} is {run.info.status} but carries verdict {run.data.tags['audit.verdict']}"
            )
    return seen


def no_running_runs(db: Path, where: str) -> None:
    running = [
        (r.info.run_id, r.data.tags.get("audit.model_registered_name"))
        for r in gate_runs(store_client(db))
        if r.info.status == "RUNNING"
    ]
    assert not running, f"{where}: runs still RUNNING: {running}"


def assert_clean_error_exit(res: Audit, proxy: FaultProxy, where: str) -> None:
    assert res.code == 2, f"{where}: {res.text()}"
    assert len(res.errors) == 1 and "Traceback" not in res.err, f"{where}: {res.text()}"
    assert res.seconds_after_step is not None and res.seconds_after_step < STOP_EXIT_S, (
        f"{where}: exit {res.seconds_after_step:.1f} s after the server stopped"
    )


def assert_step_hit(proxy: FaultProxy, res: Audit, where: str) -> None:
    armed = proxy.armed
    assert armed is not None and armed.hit.is_set(), (
        f"{where}: the step never came; writes seen: {[(s.method, s.path, s.keys) for s in proxy.writes()]}; "
        f"the audit: {res.text()}"
    )


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> list[str]:
    return probes_args(tmp_path_factory.mktemp("fault-probes"))


@pytest.fixture
def bench(tmp_path, empty_mlflow_store):
    """Start a server over a prepared store and a proxy in front of it; both stopped afterwards."""
    made: list = []

    def make(names: list[str], earlier_fail: tuple[str, ...] = (), root: Path | None = None):
        root = root or tmp_path / "server"
        empty_mlflow_store(root, "server.db")
        db = build_store(root, names, earlier_fail)
        server = MlflowServer(root, db)
        made.append(server)
        server.start()
        proxy = FaultProxy(server)
        made.append(proxy)
        return server, proxy, db

    yield make
    for thing in reversed(made):
        (thing.close if isinstance(thing, FaultProxy) else thing.stop)()


# --------------------------------------------------------------------------- fast: 2 representative faults
@pytest.mark.timeout(420)
def test_a_kill_after_the_run_id_tag_and_a_stop_at_the_verdict_tag_leave_no_foreign_verdict(
    bench, probes, tmp_path
):
    """One server: the audit of ``toy-a`` SIGKILLed once its version's ``audit.run_id`` is written;
    the audit of ``toy-b`` cut off by the server stopping at its version's verdict tag. (The
    restart and re-audit after a stop are in the slow matrix below: they cost a server start.)"""
    server, proxy, db = bench(["toy-a", "toy-b"])

    proxy.arm(_set_tag("audit.run_id"), "kill")
    res = audit(proxy, "toy-a", probes, tmp_path / "a", lease_s=1)
    assert_step_hit(proxy, res, "kill at audit.run_id")
    assert res.code == -9, res.text()
    seen = check_invariants(db, ["toy-a", "toy-b"], "after the kill")
    run_id = seen["toy-a"]["tags"]["audit.run_id"]  # the write happened; nothing after it did
    assert "audit.verdict" not in seen["toy-a"]["tags"] and seen["toy-a"]["aliases"] == {}
    run = store_client(db).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["audit.verdict"] == "PASS"

    step = _set_tag("audit.verdict")
    proxy.arm(step, "stop")
    res = audit(proxy, "toy-b", probes, tmp_path / "b", lease_s=1)
    assert_step_hit(proxy, res, "stop at the version verdict")
    assert_clean_error_exit(res, proxy, "stop at the version verdict")
    assert "registry gate" in res.errors[0], res.errors
    seen = check_invariants(db, ["toy-a", "toy-b"], "after the stop")
    assert "audit.run_id" in seen["toy-b"]["tags"] and "audit.verdict" not in seen["toy-b"]["tags"]
    assert seen["toy-b"]["aliases"] == {}


# --------------------------------------------------------------------------- slow: every write step
@pytest.fixture(scope="module")
def kill_bench(tmp_path_factory):
    """One server for every kill case; a registered model of its own per case (``toy-k<i>``)."""
    root = tmp_path_factory.mktemp("kill-server")
    names = [f"toy-k{i}" for i in range(len(KILL_STEPS))]
    db = build_store(root, names, earlier_fail=(names[KILL_STEPS.index(OLD_VERDICT_DELETE)],))
    server = MlflowServer(root, db)
    proxy = None
    try:
        server.start()
        proxy = FaultProxy(server)
        yield server, proxy, db, names
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("index", range(len(KILL_STEPS)), ids=_ids(KILL_STEPS))
def test_a_kill_at_each_write_step_leaves_no_verdict_that_is_not_its_runs(
    kill_bench, probes, tmp_path, index
):
    server, proxy, db, names = kill_bench
    step, name = KILL_STEPS[index], names[index]
    assert server.running
    proxy.arm(step, "kill")
    res = audit(proxy, name, probes, tmp_path / "first", lease_s=1)
    assert_step_hit(proxy, res, f"kill at {step.label}")
    assert res.code == -9, res.text()
    seen = check_invariants(db, names, f"after the kill at {step.label}")[name]
    assert seen["aliases"] == {} or step is ALIAS, seen
    if step is ALIAS:  # the alias was written, the tool never learnt it: it sits on a PASS
        assert seen["aliases"] == {"champion": "1"} and seen["tags"]["audit.verdict"] == "PASS"
    runs = [
        r
        for r in gate_runs(store_client(db))
        if r.data.tags.get("audit.model_registered_name") == name
    ]
    assert len(runs) == 1, [r.info for r in runs]
    # a run the kill left RUNNING (the tool could not see it) carries no verdict (checked above)

    proxy.disarm()
    time.sleep(1.5)  # the killed run's lease (1 s) has passed
    res = audit(proxy, name, probes, tmp_path / "second")
    assert res.code == 0, res.text()
    seen = check_invariants(db, names, f"after the re-audit following the kill at {step.label}")[
        name
    ]
    assert seen["tags"]["audit.verdict"] == "PASS" and seen["aliases"] == {"champion": "1"}
    no_running_runs(db, f"after the re-audit following the kill at {step.label}")
    killed = store_client(db).get_run(runs[0].info.run_id)
    assert killed.info.status in ("FINISHED", "KILLED"), killed.info
    if killed.info.status == "KILLED":
        assert "audit.verdict" not in killed.data.tags


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("step", STOP_STEPS, ids=_ids(STOP_STEPS))
def test_a_server_stopped_at_each_write_step_is_a_clean_exit_2_and_a_rerun_passes(
    bench, probes, tmp_path, step
):
    server, proxy, db = bench(["toy"])
    proxy.arm(step, "stop")
    res = audit(proxy, "toy", probes, tmp_path / "first", lease_s=1)
    assert_step_hit(proxy, res, f"stop at {step.label}")
    assert_clean_error_exit(res, proxy, f"stop at {step.label}")
    seen = check_invariants(db, ["toy"], f"after the stop at {step.label}")["toy"]
    assert seen["aliases"] == {}
    assert ("audit.run_id" in seen["tags"]) == (
        step in (_set_tag("audit.verdict"), _set_tag("audit.history"), ALIAS)
    )
    assert ("audit.verdict" in seen["tags"]) == (step in (_set_tag("audit.history"), ALIAS))

    proxy.disarm()
    server.start()
    res = audit(proxy, "toy", probes, tmp_path / "second")
    assert res.code == 0, res.text()
    seen = check_invariants(db, ["toy"], f"after the rerun following the stop at {step.label}")[
        "toy"
    ]
    assert seen["tags"]["audit.verdict"] == "PASS" and seen["aliases"] == {"champion": "1"}
    no_running_runs(db, f"after the rerun following the stop at {step.label}")
    runs = gate_runs(store_client(db))
    assert len(runs) == (1 if step is RUN_CREATE else 2), [
        (r.info.run_id, r.info.status) for r in runs
    ]
    for run in runs:
        if run.info.run_id != seen["tags"]["audit.run_id"]:
            # the stopped audit's run: closed FINISHED (it was), FAILED/KILLED (by itself or the lease)
            assert run.info.status in ("FINISHED", "FAILED", "KILLED") and (
                "audit.verdict" not in run.data.tags or run.info.status == "FINISHED"
            ), run.info
