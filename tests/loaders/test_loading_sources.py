"""Issue 27, item 4: a version's weights come only from its own run's or logged model's artifacts.

A registry version's ``source`` (and a ``runs:/`` model URI) is checked before anything is
copied: ``file:///etc``, an absolute folder outside the run's and experiment's artifact
locations, ``..`` and encoded traversal (``%2e%2e``, ``%2f``, backslashes) are refused with
one line. Downloads are bounded by ``model.max_bytes`` and the temporary folder
(``model-audit-load-*``) never outlives the call. Real SQLite stores, real files; each
test gets its own ``TMPDIR``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from audit.gate.loading import (
    DEFAULT_MAX_BYTES,
    ModelLoadError,
    check_folder_size,
    load_model,
    log_model_safely,
    read_identity,
    temporary_folder,
    version_weights_sha256,
)
from audit.models import SmallCNN

NET = {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [4, 8]}
X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
PREFIX = "model-audit-load-"


def _net(seed: int) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(widths=[4, 8]).eval()


@pytest.fixture(scope="module")
def template(tmp_path_factory, empty_mlflow_store):
    """A store: 'cand' v1 = _net(0) logged in run R; a loadable copy of a *different* model
    (_net(9)) in ``outside/model``, beside the store's artifacts; hostile versions of 'evil'."""
    root = tmp_path_factory.mktemp("sources")
    uri = empty_mlflow_store(root)
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("s", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(exp).info.run_id
    log_model_safely(_net(0), NET, registered_name="cand", run_id=run, tracking_uri=uri)
    client.set_terminated(run)
    run_dir = root / "artifacts" / run / "artifacts"
    assert (run_dir / "model" / "state_dict.pth").is_file()
    outside = root / "outside" / "model"
    outside.mkdir(parents=True)
    (outside / "net.json").write_text((run_dir / "model" / "net.json").read_text())
    torch.save(_net(9).state_dict(), outside / "state_dict.pth")
    up = "../../.."  # from artifacts/<run>/artifacts to root
    sources = {
        "etc": "file:///etc",
        "etc-path": "/etc",
        "outside-path": str(outside),
        "outside-uri": outside.as_uri(),
        "file-dotdot": f"{run_dir.as_uri()}/{up}/outside/model",
        "runs-dotdot": f"runs:/{run}/{up}/outside/model",
        "runs-encoded": f"runs:/{run}/%2e%2e/%2E%2E/%2e%2e/outside/model",
        "runs-slash": f"runs:/{run}/model%2f..%2f..%2f..%2f..%2foutside%2fmodel",
        "runs-backslash": f"runs:/{run}/..\\..\\..\\outside\\model",
        "in-run-path": str(run_dir / "model"),  # a plain path inside the run's artifacts: fine
        "prefix-sibling": f"{(root / 'artifacts').as_uri()}-sibling/model",  # shares a string prefix only
    }
    client.create_registered_model("evil")
    versions = {}
    for key, source in sources.items():
        versions[key] = client.create_model_version("evil", source=source, run_id=run).version
    # links inside the run's artifacts: a folder that is a link out, a weights file that is one
    (run_dir / "escape").symlink_to(outside, target_is_directory=True)
    (run_dir / "linked").mkdir()
    (run_dir / "linked" / "net.json").write_text((outside / "net.json").read_text())
    (run_dir / "linked" / "state_dict.pth").symlink_to(outside / "state_dict.pth")
    for key, source in {
        "runs-link-folder": f"runs:/{run}/escape",
        "file-link-folder": (run_dir / "escape").as_uri(),
        "runs-link-file": f"runs:/{run}/linked",
    }.items():
        sources[key] = source
        versions[key] = client.create_model_version("evil", source=source, run_id=run).version
    (root / "artifacts-sibling" / "model").mkdir(parents=True)
    shutil.copytree(outside, root / "artifacts-sibling" / "model", dirs_exist_ok=True)
    return {
        "root": root,
        "uri": uri,
        "run": run,
        "versions": versions,
        "sources": sources,
        "outside": outside,
    }


@pytest.fixture
def store(template, tmp_path, monkeypatch):
    """The template store copied (its artifacts stay where they are) and a TMPDIR of this test."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template["root"] / "mlflow.db", db)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    monkeypatch.chdir(tmp_path)
    assert tempfile.gettempdir() == str(tmp)
    return {**template, "uri": f"sqlite:///{db}", "tmp": tmp}


def _same(model: torch.nn.Module, net: torch.nn.Module) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X), net(X), rtol=0, atol=0)


def _left(store) -> list[str]:
    return sorted(os.listdir(store["tmp"]))


HOSTILE = [
    "etc",
    "etc-path",
    "outside-path",
    "outside-uri",
    "file-dotdot",
    "runs-dotdot",
    "runs-encoded",
    "runs-slash",
    "runs-backslash",
    "prefix-sibling",
    "runs-link-folder",
    "file-link-folder",
    "runs-link-file",
]
REASONS = {
    "etc": "is outside the artifacts of its run",
    "etc-path": "is outside the artifacts of its run",
    "outside-path": "is outside the artifacts of its run",
    "outside-uri": "is outside the artifacts of its run",
    "prefix-sibling": "is outside the artifacts of its run",
    "file-dotdot": "has a '..' component",
    "runs-dotdot": "has a '..' component",
    "runs-encoded": "has an encoded '.', '/', '\\' or '%' (%2e)",
    "runs-slash": "has an encoded '.', '/', '\\' or '%' (%2f)",
    "runs-backslash": "has a backslash",
    "runs-link-folder": "leads to",
    "file-link-folder": "is outside the artifacts of its run",
    "runs-link-file": "",  # the link is inside the folder: the message names it
}


@pytest.mark.parametrize("key", HOSTILE)
def test_a_source_outside_the_run_is_refused_before_any_copy(store, key):
    version = store["versions"][key]
    source = store["sources"][key]
    with pytest.raises(ModelLoadError) as info:
        load_model({"kind": "mlflow", "uri": f"models:/evil/{version}"}, tracking_uri=store["uri"])
    message = str(info.value)
    assert "\n" not in message
    if key == "runs-link-file":
        assert message.startswith(f"'models:/evil/{version}': state_dict.pth in "), message
        assert (
            f"is a symbolic link to {store['outside'] / 'state_dict.pth'}, outside the model's artifacts"
            in message
        )
    else:
        assert message.startswith(
            f"'models:/evil/{version}': the registered version's source '{source}' {REASONS[key]}"
        ), message
    assert message.endswith(
        "; a version's weights are read only from its own run's or logged model's artifacts in the named store: "
        "register the model from its run (audit.gate.loading.log_model_safely(..., registered_name=...) or "
        "mlflow.register_model('runs:/<run_id>/model', name)); nothing was downloaded"
    ), message
    assert _left(store) == []  # nothing copied, no temporary folder left


def test_re_hashing_a_version_checks_its_source_the_same_way(store):
    """The gate re-hashes a version's weights before the alias moves: same checks, nothing copied."""
    client = MlflowClient(store["uri"], store["uri"])
    for key in ("etc", "runs-dotdot", "runs-link-folder"):
        identity = read_identity(client, "evil", store["versions"][key])
        with pytest.raises(
            ModelLoadError,
            match=rf"the registered version's source '{re.escape(store['sources'][key])}'",
        ):
            version_weights_sha256(client, store["uri"], identity)
    assert _left(store) == []
    good = read_identity(client, "evil", store["versions"]["in-run-path"])
    assert (
        version_weights_sha256(client, store["uri"], good)
        == load_model(
            {"kind": "mlflow", "uri": "models:/cand/1"}, tracking_uri=store["uri"]
        ).weights_sha256
    )
    assert _left(store) == []


@pytest.mark.parametrize(
    "path", ["../../../outside/model", "%2e%2e/%2e%2e/%2e%2e/outside/model", "model/..\\..\\x"]
)
def test_a_runs_uri_with_traversal_is_refused(store, path):
    uri = f"runs:/{store['run']}/{path}"
    with pytest.raises(
        ModelLoadError,
        match=rf"^model\.uri '{re.escape(uri)}' has (a|an) .*; give the artifact path "
        r"inside the run, e.g\. runs:/<run_id>/model; nothing was downloaded$",
    ):
        load_model({"kind": "mlflow", "uri": uri}, tracking_uri=store["uri"])
    assert _left(store) == []


def test_sources_inside_the_store_still_load(store):
    for uri in (
        "models:/cand/1",
        f"models:/evil/{store['versions']['in-run-path']}",
        f"runs:/{store['run']}/model",
    ):
        loaded = load_model({"kind": "mlflow", "uri": uri}, tracking_uri=store["uri"])
        _same(loaded.model, _net(0))
        assert _left(store) == [], uri


# ----------------------------------------------------------------- the size limit
def test_max_bytes_refuses_a_download_before_it_starts(store):
    size = sum(
        p.stat().st_size
        for p in (store["root"] / "artifacts" / store["run"] / "artifacts" / "model").iterdir()
    )
    ok = load_model(
        {"kind": "mlflow", "uri": "models:/cand/1", "max_bytes": size}, tracking_uri=store["uri"]
    )
    _same(ok.model, _net(0))
    with pytest.raises(ModelLoadError) as info:
        load_model(
            {"kind": "mlflow", "uri": "models:/cand/1", "max_bytes": size - 1},
            tracking_uri=store["uri"],
        )
    assert re.fullmatch(
        rf"'models:/cand/1': the artifacts at 'file://\S+/model' hold more than model\.max_bytes={size - 1} bytes "
        r"\(\d+ listed\); nothing was downloaded: raise model\.max_bytes if the model is really that large",
        str(info.value),
    ), str(info.value)
    assert _left(store) == []
    assert DEFAULT_MAX_BYTES == 2 * 1024**3


@pytest.mark.parametrize("bad", [0, -1, "2GB", 1.5, True, None])
def test_max_bytes_must_be_a_positive_integer(store, bad):
    with pytest.raises(
        ModelLoadError,
        match=rf"^model\.max_bytes must be an integer >= 1 \(bytes\), e\.g\. 2147483648 "
        rf"for 2 GiB; got {re.escape(repr(bad))}$",
    ):
        load_model(
            {"kind": "mlflow", "uri": "models:/cand/1", "max_bytes": bad}, tracking_uri=store["uri"]
        )
    assert _left(store) == []


def test_check_folder_size_counts_the_bytes_on_disk(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a").write_bytes(b"x" * 10)
    (folder / "sub" / "b").write_bytes(b"y" * 5)
    os.symlink("/etc/hostname", folder / "link")  # a link is counted as itself, never followed
    assert check_folder_size(folder, 15 + len("/etc/hostname"), "the copy") == 15 + len(
        "/etc/hostname"
    )
    with pytest.raises(
        ModelLoadError,
        match=r"^the copy holds \d+ bytes on disk, more than model\.max_bytes=14; raise",
    ):
        check_folder_size(folder, 14, "the copy")


# ----------------------------------------------------------------- temporary folders
def test_no_temporary_folder_outlives_a_load_that_fails_after_the_download(store):
    client = MlflowClient(store["uri"], store["uri"])
    run = client.get_model_version("cand", "1").run_id
    broken = store["tmp"].parent / "broken"
    broken.mkdir()
    (broken / "net.json").write_text(
        '{"_target_": "audit.models.SmallCNN", "num_classes": 3}'
    )  # does not fit
    torch.save(_net(0).state_dict(), broken / "state_dict.pth")
    client.log_artifacts(run, str(broken), "broken")
    with pytest.raises(ModelLoadError, match="do not fit the architecture"):
        load_model({"kind": "mlflow", "uri": f"runs:/{run}/broken"}, tracking_uri=store["uri"])
    assert _left(store) == []


def test_temporary_folder_is_removed_while_something_still_writes_into_it(tmp_path, monkeypatch):
    """What copying /etc showed: MLflow's copy threads still wrote while the folder was removed
    ('Directory not empty'). The folder goes all the same, and the body's error is the one raised."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    stop = threading.Event()

    def writer(folder: Path) -> None:
        i = 0
        while not stop.is_set():
            try:
                (folder / f"f{i}").write_bytes(b"z" * 100)
            except OSError:  # the folder is gone
                return
            i += 1

    with pytest.raises(RuntimeError, match="the body failed"), temporary_folder() as folder:
        assert Path(folder).parent == tmp_path and Path(folder).name.startswith(PREFIX)
        thread = threading.Thread(target=writer, args=(Path(folder),), daemon=True)
        thread.start()
        time.sleep(0.05)
        threading.Timer(0.2, stop.set).start()
        raise RuntimeError("the body failed")
    thread.join(5)
    stop.set()
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------- a real tracking server (mlflow-artifacts:)
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` with proxied artifacts: 'cand' v1 = _net(0) logged over HTTP in experiment
    A; a run of experiment B holds _net(9); 'evil' v1 names cand's run with B's artifacts as source,
    v2 the same run with file:///etc (written into the server's SQLite store directly)."""
    from _mlflow_server import MlflowServer

    root = tmp_path_factory.mktemp("sources-server")
    srv = MlflowServer(root)
    srv.start()
    try:
        client = MlflowClient(srv.uri, srv.uri)
        run = client.create_run(client.create_experiment("A")).info
        log_model_safely(
            _net(0), NET, registered_name="cand", run_id=run.run_id, tracking_uri=srv.uri
        )
        other = client.create_run(client.create_experiment("B")).info
        log_model_safely(_net(9), NET, run_id=other.run_id, tracking_uri=srv.uri)
        # the server refuses a source outside the version's run; the store underneath does not
        direct = MlflowClient(srv.store_uri, srv.store_uri)
        direct.create_registered_model("evil")
        direct.create_model_version("evil", source=f"{other.artifact_uri}/model", run_id=run.run_id)
        direct.create_model_version("evil", source="file:///etc", run_id=run.run_id)
        yield {"uri": srv.uri, "run": run, "other": other}
    finally:
        srv.stop()


def test_a_server_store_loads_its_own_artifacts_and_refuses_others(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert server["run"].artifact_uri.startswith("mlflow-artifacts:/")
    loaded = load_model({"kind": "mlflow", "uri": "models:/cand/1"}, tracking_uri=server["uri"])
    _same(loaded.model, _net(0))
    with pytest.raises(
        ModelLoadError,
        match=r"^'models:/cand/1': the artifacts at 'mlflow-artifacts:/\S+/model' hold "
        r"more than model\.max_bytes=100 bytes",
    ):
        load_model(
            {"kind": "mlflow", "uri": "models:/cand/1", "max_bytes": 100},
            tracking_uri=server["uri"],
        )
    for version, source in (("1", f"{server['other'].artifact_uri}/model"), ("2", "file:///etc")):
        with pytest.raises(
            ModelLoadError,
            match=rf"^'models:/evil/{version}': the registered version's source "
            rf"'{re.escape(source)}' is outside the artifacts of its run",
        ):
            load_model(
                {"kind": "mlflow", "uri": f"models:/evil/{version}"}, tracking_uri=server["uri"]
            )
    assert os.listdir(tmp_path) == []
