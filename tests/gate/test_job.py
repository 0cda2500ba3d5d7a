"""The audit job end to end: `python -m audit` in a subprocess, a real SQLite registry, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _jobkit import all_runs, cli, probes_args, registry, state
from _toy_models import ColourReader, GreyReader, colour_probe_set
from mlflow.tracking import MlflowClient

from audit.gate.loading import log_model_safely

TESTS = Path(__file__).resolve().parents[1]
NAME = "toy"
# a small, fast audit: colour squares, 48 probes per group at 32x32 (see _toy_models)
ENGINE = ["engine.attribution_probes=32", "engine.sanity_probes=4", "engine.steps=8"]
ALLOW = "model.allowed_targets=[audit.models.*,_toy_models.*]"


def small(workdir: Path) -> list[str]:
    folder = workdir / "colour-probes"
    if not folder.is_dir():
        colour_probe_set(n_per_group=48, size=32).save(folder)
    return ["probes=folder", f"probes.path={folder}", ALLOW, *ENGINE]


@pytest.fixture(scope="module")
def template(tmp_path_factory, empty_mlflow_store):
    """A registry built once: 'toy' v1 (reads the colour: PASS) and v2 (reads the grey context: FAIL)."""
    folder = tmp_path_factory.mktemp("job-registry")
    uri = empty_mlflow_store(folder)
    client = MlflowClient(uri)
    exp = client.create_experiment("train", artifact_location=(folder / "artifacts").as_uri())
    for model in (ColourReader(), GreyReader()):
        run = client.create_run(exp)
        log_model_safely(
            model,
            {"_target_": f"_toy_models.{type(model).__name__}"},
            registered_name=NAME,
            run_id=run.info.run_id,
            tracking_uri=uri,
        )
        client.set_terminated(run.info.run_id)
    return folder


@pytest.fixture
def store(template, tmp_path, monkeypatch):
    """A fresh copy of the template store; returns (uri, client, workdir)."""
    shutil.copyfile(template / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copytree(template / "artifacts", tmp_path / "artifacts_src", dirs_exist_ok=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri, MlflowClient(uri), tmp_path


def run_job(args: list[str], workdir: Path, uri: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": str(TESTS),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "audit", *args, f"paths.root_dir={workdir}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def registry_state(client: MlflowClient) -> dict:
    versions = {
        str(v.version): dict(v.tags) for v in client.search_model_versions(f"name='{NAME}'")
    }
    return {
        "versions": versions,
        "aliases": {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()},
    }


def test_multirun_fail_blocks_and_never_removes_the_champion(store):
    uri, client, work = store
    proc = run_job(["-m", f"model.uri=models:/{NAME}/1,models:/{NAME}/2", *small(work)], work, uri)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # the worst of PASS (0) and FAIL (1)
    assert f"{NAME} v1: PASS" in out and f"{NAME} v2: FAIL" in out and "model-audit: summary" in out
    state = registry_state(client)
    assert state["aliases"] == {"champion": "1"}  # moved by v1's PASS, kept through v2's FAIL
    assert state["versions"]["2"]["audit.verdict"] == "FAIL"
    assert "alias 'champion' not moved (stays v1)" in out


def test_a_config_hydra_cannot_compose_exits_2(store):
    uri, _client, work = store
    proc = run_job(["probes=nosuch"], work, uri)
    assert proc.returncode == 2
    # one line from the real entry point (tests/gate/test_bad_inputs.py runs 40+ cases in-process)
    assert proc.stderr.strip().splitlines() == [
        "model-audit: error: In 'audit': Could not find 'probes/nosuch'; "
        "available options in 'probes': folder, stamps, synthetic"
    ]


# --------------------------------------------------------------------------- the gate's run as its readers see it
def _version_from_logged_model(
    client: MlflowClient, uri: str, of: str, monkeypatch
) -> tuple[str, str]:
    """Register the artifacts of version ``of`` again, as an MLflow 3 logged model (source
    ``models:/<model_id>``, as ``mlflow.register_model`` writes it); returns (version, model_id)."""
    mv = client.get_model_version(NAME, of)
    exp = client.get_experiment_by_name("train").experiment_id
    logged = client.create_logged_model(exp, name=f"toy-v{of}", source_run_id=mv.run_id)
    local = client.download_artifacts(mv.run_id, "model", dst_path=None)
    client.log_model_artifacts(logged.model_id, local)
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", uri
    )  # MLflow's SQL registry reads the logged model through it
    new = client.create_model_version(NAME, source=f"models:/{logged.model_id}", run_id=mv.run_id)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    return str(new.version), logged.model_id


def _flat_text(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".")


def test_the_gate_run_shows_its_verdict_reasons_probe_set_and_model(tmp_path, monkeypatch):
    """A FAIL of a version registered from a logged model: the description leads with the verdict
    and the report's decisive findings; the probe set and the logged model are the run's inputs;
    the version's tags link to the run."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    from audit.gate import job

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS))
    uri = registry(tmp_path / "store")  # toy v1 reads the colour, v2 the grey context
    client = MlflowClient(uri, registry_uri=uri)
    version, model_id = _version_from_logged_model(client, uri, "2", monkeypatch)
    assert (
        job._logged_model_id(client, {"registered_name": NAME, "version": "1"}) is None
    )  # run artifacts only

    res = cli(
        [f"model.uri=models:/{NAME}/{version}", f"tracking.uri={uri}", *probes_args(tmp_path)],
        tmp_path,
    )
    assert res.code == 1 and f"{NAME} v{version}: FAIL" in res.out, res.out + res.err
    tags = state(client)["versions"][version]
    run = client.get_run(tags["audit.run_id"])
    report = json.loads((tmp_path / "reports" / f"{NAME}-{version}" / "report.json").read_text())

    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(
        f"**FAIL** (promotion blocked): model-audit gate run for registered model `{NAME}` "
        f"version {version}."
    )
    decisive = [c["finding"] for c in report["checks"] if c["decisive"]]
    assert decisive and all(_flat_text(f) in note for f in decisive), (decisive, note)
    assert all(_flat_text(c["finding"]) not in note for c in report["checks"] if not c["decisive"])
    assert report["probes"]["digest"] in note and "No verdict" not in note

    (probe_input,) = run.inputs.dataset_inputs
    ds = probe_input.dataset
    digest = report["probes"]["digest"]
    assert ds.digest == digest[:36] and ds.name == "colour-probes-48"
    assert {t.key: t.value for t in probe_input.tags} == {
        "mlflow.data.context": "probes",
        "audit.probe_digest": digest,
    }
    source = get_dataset_source_from_json(
        ds.source, ds.source_type
    )  # MLflow's own reader of the source
    assert (
        ds.source_type == "local" and Path(source.uri) == (tmp_path / "colour-probes-48").absolute()
    )
    assert json.loads(ds.profile)["num_rows"] == report["probes"]["n"] == 192
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    assert run.data.tags["audit.model_id"] == model_id
    exp = run.info.experiment_id
    assert tags["audit.run_link"] == f"#/experiments/{exp}/runs/{run.info.run_id}"


def test_a_benchmark_probe_set_is_a_code_source_naming_its_generator(tmp_path):
    """A synthetic probe set as a dataset input, logged to a real store and read back with MLflow's reader."""
    from types import SimpleNamespace

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    from audit.datasets import snow_wolf
    from audit.gate import job
    from audit.pipeline import _probe_info

    probes = snow_wolf.probe_set(n_per_group=2, size=24, seed=5)
    spec = {"kind": "synthetic", "benchmark": "snow_wolf", "n_per_group": 2, "size": 24, "seed": 5}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
    runs = [client.create_run(exp).info.run_id for _ in range(2)]
    for run_id in runs:
        client.log_inputs(
            run_id,
            datasets=[
                job._probe_input({"probes": spec}, SimpleNamespace(probes=_probe_info(probes)))
            ],
        )
    back = [client.get_run(r).inputs.dataset_inputs[0].dataset for r in runs]
    assert back[0] == back[1]  # one dataset, the same in both runs
    ds = back[0]
    assert (
        ds.digest == probes.digest[:36]
        and ds.name == "snow_wolf probes (n_per_group=2, size=24, seed=5)"
    )
    source = get_dataset_source_from_json(ds.source, ds.source_type)
    assert isinstance(source, CodeDatasetSource)
    assert source.to_dict()["tags"] == {
        "generator": "audit.datasets.snow_wolf.probe_set",
        "n_per_group": "2",
        "size": "24",
        "seed": "5",
    }
    profile = json.loads(ds.profile)
    assert profile["num_rows"] == 8 and profile["sha256"] == probes.digest
    assert profile["classes"] == list(probes.class_names)


def test_the_description_is_inert_markdown_whatever_the_names(tmp_path):
    """Names and findings are code spans: a link, an image or HTML in them stays text."""
    from types import SimpleNamespace

    from markdown_it import MarkdownIt

    from audit.gate import job
    from audit.rules.base import Check

    evil = "x](http://evil.example) ![i](http://evil.example/i.png) <b>bold</b> www.evil.example `tick`"
    checks = [
        Check(
            "context_gap/a", "behaviour", "FAIL", f"class {evil} reads the context", decisive=True
        ),
        Check("flip_rate", "behaviour", None, "not deciding", decisive=False),
    ]
    result = SimpleNamespace(
        verdict="FAIL", checks=checks, findings=[], probes={"digest": "ab" * 32, "n": 8}
    )
    model = {
        "registered_name": evil,
        "version": "3",
        "uri": f"models:/{evil}/3",
        "weights_sha256": None,
    }
    md = MarkdownIt("commonmark", {"linkify": True}).enable(["linkify", "table", "strikethrough"])
    for final in (False, True):
        html = md.render(job._description(model, result, final=final))
        assert "<a " not in html and "<img" not in html and "<b>" not in html, html
    html = md.render(job._description(model, result, final=True))
    assert (
        html.startswith("<p><strong>FAIL</strong> (promotion blocked)")
        and "not deciding" not in html
    )
    assert md.render(job._description(model, result)).startswith(
        "<p><strong>No verdict: the audit of"
    )


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_through_a_real_server_the_run_links_back_and_a_failed_input_write_leaves_no_verdict(
    tmp_path, monkeypatch
):
    """A real ``mlflow server``: a PASS writes its inputs, description and full run link over HTTP;
    then the server stops when the next audit logs its inputs: exit 2, that run says it has no
    verdict, the version carries no tag of it and the alias stays."""
    from _mlflow_server import FaultProxy, MlflowServer, Step

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS))
    root = tmp_path / "server"
    registry(root)
    server = MlflowServer(root, root / "mlflow.db")
    server.start()
    proxy = FaultProxy(server)
    try:
        args = [f"tracking.uri={proxy.uri}", *probes_args(tmp_path)]
        res = cli([f"model.uri=models:/{NAME}/1", *args], tmp_path)
        assert res.code == 0 and f"{NAME} v1: PASS" in res.out, res.out + res.err
        rest = MlflowClient(proxy.uri, registry_uri=proxy.uri)
        tags = state(rest)["versions"]["1"]
        run = rest.get_run(tags["audit.run_id"])
        assert run.data.tags["mlflow.note.content"].startswith("**PASS** (may be promoted)")
        assert (
            run.inputs.dataset_inputs[0].dataset.digest == run.data.tags["audit.probe_digest"][:36]
        )
        assert (
            tags["audit.run_link"]
            == f"{proxy.uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        )
        assert state(rest)["aliases"] == {"champion": "1"}

        proxy.arm(Step("runs/log-inputs", "POST", "/runs/log-inputs"), "stop")
        res = cli([f"model.uri=models:/{NAME}/2", *args], tmp_path)
        assert proxy.armed is not None and proxy.armed.hit.is_set(), [
            (s.method, s.path) for s in proxy.writes()
        ]
        assert res.code == 2 and len(res.errors) == 1, res.out + res.err
        assert "nothing was tagged or promoted" in res.errors[0], res.errors
    finally:
        proxy.close()
        server.stop()
    local = MlflowClient(
        server.store_uri, registry_uri=server.store_uri
    )  # the server's store, read directly
    s = state(local)
    assert s["aliases"] == {"champion": "1"} and not any(
        k.startswith("audit.") for k in s["versions"]["2"]
    )
    (cut,) = [r for r in all_runs(local) if r.data.tags.get("audit.model_version") == "2"]
    assert "audit.verdict" not in cut.data.tags and cut.info.status != "FINISHED"
    assert cut.data.tags["mlflow.note.content"].startswith("**No verdict: the audit of")
    assert not cut.inputs.dataset_inputs
