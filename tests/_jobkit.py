"""Helpers for tests of the audit job: registries of toy models, and the CLI run in-process.

Running ``audit.gate.cli.main`` in the test process (with ``sys.argv`` set) instead of a
subprocess saves the ~6 s of imports per call, so dozens of command lines fit in the
fast suite. Everything else is real: Hydra composes ``conf/audit.yaml``, MLflow writes
to a real SQLite store.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from _stores import empty_store
from _toy_models import ColourReader, GreyReader, colour_probe_set
from mlflow.tracking import MlflowClient

from audit.gate.loading import log_model_safely

NAME = "toy"
ENGINE = ["engine.attribution_probes=32", "engine.sanity_probes=4", "engine.steps=8"]
ALLOW = "model.allowed_targets=[audit.models.*,_toy_models.*]"


@dataclass
class Cli:
    code: int
    out: str
    err: str

    @property
    def errors(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("model-audit: error:")]


def cli(args: list[str], workdir: Path) -> Cli:
    """``model-audit *args`` in this process; the environment is restored afterwards."""
    from audit.gate import cli as command

    env = dict(os.environ)
    argv = sys.argv
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["model-audit", *args, f"paths.root_dir={workdir}"]
    code = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                command.main()
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(env)
    return Cli(code=int(code) if code is not None else 0, out=out.getvalue(), err=err.getvalue())


def colour_folder(workdir: Path, n_per_group: int = 48) -> Path:
    folder = workdir / f"colour-probes-{n_per_group}"
    if not folder.is_dir():
        colour_probe_set(n_per_group=n_per_group, size=32).save(folder)
    return folder


def probes_args(workdir: Path, n_per_group: int = 48) -> list[str]:
    return ["probes=folder", f"probes.path={colour_folder(workdir, n_per_group)}", ALLOW, *ENGINE]


def registry(folder: Path, models=(ColourReader, GreyReader), name: str = NAME) -> str:
    """A SQLite registry in ``folder`` with ``name`` v1, v2, ... = ``models``; returns its URI."""
    uri = empty_store(folder)
    client = MlflowClient(uri, registry_uri=uri)
    found = client.get_experiment_by_name("train")
    exp = (
        found.experiment_id
        if found
        else client.create_experiment("train", artifact_location=(folder / "artifacts").as_uri())
    )
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
    return uri


def weights_sha256(client: MlflowClient, name: str, version: str) -> str:
    """SHA-256 of the ``state_dict.pth`` that a registry version's source holds."""
    mv = client.get_model_version(name, version)
    local = client.download_artifacts(mv.run_id, "model/state_dict.pth", dst_path=None)
    return hashlib.sha256(Path(local).read_bytes()).hexdigest()


def state(client: MlflowClient, name: str = NAME) -> dict:
    versions = {
        str(v.version): dict(v.tags) for v in client.search_model_versions(f"name='{name}'")
    }
    model = client.get_registered_model(name)
    return {
        "versions": versions,
        "aliases": {k: str(v) for k, v in model.aliases.items()},
        "tags": dict(model.tags),
    }


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def audited_registry(folder: Path) -> str:
    """:func:`registry` in ``folder / "store"`` with real audits: ``toy`` v1 a genuine PASS (it holds
    ``champion``), v2 a genuine FAIL; returns the store's URI."""
    uri = registry(folder / "store")
    work = folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    for version, code in (("1", 0), ("2", 1)):
        res = cli(
            [f"model.uri=models:/{NAME}/{version}", f"tracking.uri={uri}", *probes_args(work)], work
        )
        assert res.code == code, res.out + res.err
    return uri


def copy_store(template: Path, tmp_path: Path, monkeypatch) -> tuple[str, MlflowClient]:
    """A fresh copy of a template store folder (``mlflow.db``; artifact locations are absolute
    file URIs into the template folder, so they stay valid) as this test's store, run from
    ``tmp_path`` with no ``MLFLOW_TRACKING_URI``: ``(uri, client)``."""
    dst = tmp_path / "store"
    shutil.copytree(template, dst)
    uri = f"sqlite:///{dst / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return uri, MlflowClient(uri, registry_uri=uri)
