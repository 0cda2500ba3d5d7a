"""Loading candidates from MLflow (real SQLite store), checkpoints and state_dict files."""

from __future__ import annotations

import shutil

import mlflow
import pytest
import torch
from _checkpoints import save_checkpoint
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from audit.gate.loading import ModelLoadError, load_model, log_model_safely
from audit.models import Normalized, SmallCNN
from audit.training import Classifier

NET = {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [4, 8]}
NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
X = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _net(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    net = SmallCNN(widths=[4, 8])
    with torch.no_grad():  # non-trivial BatchNorm statistics, so they must be loaded too
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(X), b.eval()(X), rtol=0, atol=0)


@pytest.fixture(scope="module")
def template(tmp_path_factory, empty_mlflow_store):
    """One store built once: registered 'cand' v1 (safe) and v2 (safe, normalized), alias
    'champion' on v1, and runs with a pickled and a pt2 MLflow pytorch model."""
    folder = tmp_path_factory.mktemp("loading-store")
    uri = empty_mlflow_store(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(folder)
        client = MlflowClient(uri)
        exp = client.create_experiment("loading", artifact_location=(folder / "artifacts").as_uri())
        ids = {}
        with mlflow.start_run(experiment_id=exp) as run:
            ids["safe"] = run.info.run_id
            log_model_safely(_net(0), NET, registered_name="cand")
            log_model_safely(
                Normalized(_net(1), NORM["mean"], NORM["std"]),
                NET,
                "normed",
                registered_name="cand",
            )
            info = mlflow.pytorch.log_model(
                _net(2), name="pickled", serialization_format="pickle", pip_requirements=["torch"]
            )
            ids["pickled_uri"] = info.model_uri  # models:/m-<id>, MLflow 3's logged-model URI
            mlflow.pytorch.log_model(  # MLflow 3's default format: pt2 (torch.export)
                _net(3),
                name="exported",
                input_example=X[:1].numpy(),
                pip_requirements=["torch"],
                registered_model_name="exported-cand",
            )
        client.set_registered_model_alias("cand", "champion", "1")
    return {"db": folder / "mlflow.db", **ids}


@pytest.fixture
def store(template, tracking_uri, tmp_path, monkeypatch):
    """A fresh copy of the template store (SQLite migrations cost ~2 s per new store)."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(template["db"], tmp_path / "mlflow.db")
    return template


@pytest.mark.parametrize("uri", ["models:/cand/1", "models:/cand@champion"])
def test_registry_round_trip(store, uri):
    loaded = load_model({"kind": "mlflow", "uri": uri})
    _same(loaded.model, _net(0))
    assert not loaded.model.training
    assert (loaded.name, loaded.version) == ("cand", "1")
    assert (loaded.registered_name, loaded.registered_version) == ("cand", "1")
    assert loaded.layout == "safe" and loaded.uri == uri


def test_run_uri_and_logged_normalization(store):
    loaded = load_model({"kind": "mlflow", "uri": f"runs:/{store['safe']}/normed"})
    assert isinstance(loaded.model, Normalized)
    _same(loaded.model, Normalized(_net(1), NORM["mean"], NORM["std"]))
    assert loaded.version is None and loaded.registered_name is None
    assert loaded.name == f"run-{store['safe'][:8]}"
    v2 = load_model({"kind": "mlflow", "uri": "models:/cand/2"})
    assert isinstance(v2.model, Normalized) and v2.version == "2"
    with pytest.raises(ModelLoadError, match="applied twice"):
        load_model({"kind": "mlflow", "uri": "models:/cand/2", "normalization": NORM})


@pytest.mark.parametrize(
    "uri, message",
    [
        (
            "models:/nope/1",
            r"no registered model 'nope' .*registered models: \['cand', 'exported-cand'\]",
        ),
        (
            "models:/cand@prod",
            r"has no alias 'prod'; its versions are \[1, 2\] and its aliases \{'champion': '1'\}",
        ),
        ("models:/cand/9", r"has no version 9; its versions are \[1, 2\]"),
        ("models:/cand/Production", "stages are not supported"),
        ("runs:/0123456789abcdef/model", "run '0123456789abcdef' does not exist"),
        ("s3://bucket/model", "unsupported model URI"),
    ],
)
def test_missing_models_name_what_exists(store, uri, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model({"kind": "mlflow", "uri": uri})


def test_missing_artifact_path(store):
    with pytest.raises(ModelLoadError, match="could not download"):
        load_model({"kind": "mlflow", "uri": f"runs:/{store['safe']}/nothing-here"})


def test_pickle_refused_by_default_and_loaded_when_allowed(store):
    uri = f"runs:/{store['safe']}/pickled"
    with pytest.raises(
        ModelLoadError, match="arbitrary code.*allow_pickle: true.*log_model_safely"
    ):
        load_model({"kind": "mlflow", "uri": uri})
    loaded = load_model({"kind": "mlflow", "uri": uri, "allow_pickle": True})
    assert loaded.layout == "pickle"
    _same(loaded.model, _net(2))
    by_id = load_model({"kind": "mlflow", "uri": store["pickled_uri"], "allow_pickle": True})
    _same(by_id.model, _net(2))
    assert by_id.name == store["pickled_uri"].removeprefix("models:/") and by_id.version is None
    with pytest.raises(ModelLoadError, match="allow_pickle must be true or false"):
        load_model({"kind": "mlflow", "uri": uri, "allow_pickle": "yes"})


@pytest.mark.parametrize("which", ["run", "registry"])
def test_pt2_is_loaded_unflattened_at_its_fixed_batch(store, which):
    """MLflow's default format: the program comes back with its module tree (SmallCNN's
    ``features``, ``head``), its input size, and, exported from a batch-1 example, any batch."""
    from audit.loaders.pt2 import ExportedModule, fixed_batch

    uri = f"runs:/{store['safe']}/exported" if which == "run" else "models:/exported-cand/1"
    loaded = load_model({"kind": "mlflow", "uri": uri})
    assert loaded.layout == "pt2" and loaded.input_size == (8, 8)
    assert isinstance(loaded.model, ExportedModule) and fixed_batch(loaded.model) == 1
    assert {n for n, _ in loaded.model.named_children()} == {n for n, _ in _net(3).named_children()}
    assert sorted(loaded.model.state_dict()) == sorted(_net(3).state_dict())
    with torch.no_grad():  # three rows through a batch-1 program, one at a time
        torch.testing.assert_close(loaded.model(X), _net(3)(X), rtol=1e-5, atol=1e-6)
    if which == "registry":
        assert (
            loaded.identity is not None and loaded.identity.weights_sha256 == loaded.weights_sha256
        )


def test_log_model_safely_checks_config_and_run(store, tmp_path):
    with pytest.raises(ModelLoadError, match="needs a run"):
        log_model_safely(_net(0), NET)
    wrong = {**NET, "widths": [4, 16]}
    with mlflow.start_run(
        experiment_id=MlflowClient().get_experiment_by_name("loading").experiment_id
    ):
        with pytest.raises(ModelLoadError, match="shape mismatches"):
            log_model_safely(_net(0), wrong)


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(_net(4).state_dict(), path)
    return path


def test_state_dict_round_trip_and_normalization(weights):
    loaded = load_model(
        OmegaConf.create({"kind": "state_dict", "target": NET, "path": str(weights)})
    )
    _same(loaded.model, _net(4))
    assert (loaded.name, loaded.version, loaded.layout) == ("weights", None, "state_dict")
    wrapped = load_model(
        {
            "kind": "state_dict",
            "target": NET,
            "path": str(weights),
            "normalization": NORM,
            "name": "cnn",
        }
    )
    assert isinstance(wrapped.model, Normalized) and wrapped.name == "cnn"
    _same(wrapped.model, Normalized(_net(4), NORM["mean"], NORM["std"]))


def test_state_dict_that_does_not_fit(weights):
    with pytest.raises(ModelLoadError) as info:
        load_model(
            {"kind": "state_dict", "target": {**NET, "widths": [4, 16]}, "path": str(weights)}
        )
    text = str(info.value)
    assert (
        "shape mismatches" in text
        and "features.3.weight: file (8, 4, 3, 3) vs model (16, 4, 3, 3)" in text
    )
    assert "_target_ and its arguments must match" in text
    with pytest.raises(ModelLoadError, match=r"missing keys: \['features.6.weight'"):
        load_model(
            {"kind": "state_dict", "target": {**NET, "widths": [4, 8, 8]}, "path": str(weights)}
        )


def test_state_dict_bad_inputs(weights, tmp_path):
    pickled = tmp_path / "module.pt"
    torch.save(_net(0), pickled)
    cases = [
        ({"kind": "state_dict", "target": NET, "path": str(pickled)}, "weights_only=True"),
        ({"kind": "state_dict", "target": NET, "path": str(tmp_path / "none.pt")}, "no such file"),
        (
            {"kind": "state_dict", "target": {"widths": [4]}, "path": str(weights)},
            "'_target_' class path",
        ),
        (
            {
                "kind": "state_dict",
                "target": {"_target_": "audit.models.Nope"},
                "path": str(weights),
            },
            "could not build",
        ),
        (
            {
                "kind": "state_dict",
                "target": NET,
                "path": str(weights),
                "normalization": {"mean": [0.5]},
            },
            "mean: \\[...\\], std",
        ),
        (
            {"kind": "state_dict", "target": NET, "path": str(weights), "normalisation": NORM},
            "unknown key",
        ),
        (
            {"kind": "onnx", "path": str(weights)},
            r"model.kind must be one of \['mlflow', 'checkpoint', 'state_dict', 'timm', 'huggingface'\]; got 'onnx'",
        ),
    ]
    for source, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            load_model(source)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(5)
    module = Classifier(NET)
    path = save_checkpoint(module, tmp_path / "model.ckpt")
    return path, module.net


def test_checkpoint_round_trip(checkpoint):
    path, net = checkpoint
    loaded = load_model(
        {"kind": "checkpoint", "path": str(path), "module": "audit.training.Classifier"}
    )
    _same(loaded.model, net)
    assert (
        isinstance(loaded.model, SmallCNN)
        and loaded.name == "model"
        and loaded.layout == "checkpoint"
    )


@pytest.mark.parametrize(
    "module, message",
    [
        ("audit.training.modules.Nope", "cannot be imported"),
        ("nowhere.Classifier", "cannot be imported"),
        ("audit.models.SmallCNN", "not a pytorch_lightning.LightningModule"),
    ],
)
def test_checkpoint_bad_module(checkpoint, module, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model({"kind": "checkpoint", "path": str(checkpoint[0]), "module": module})


def test_checkpoint_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="existing Lightning checkpoint"):
        load_model({"kind": "checkpoint", "path": str(tmp_path / "x.ckpt")})


# --------------------------------------------------------------------------- version identity
def test_a_registry_version_records_its_identity_and_its_weights_can_be_hashed_again(
    store, tracking_uri
):
    """What identifies the judged version is recorded at load; the weights it points to hash again
    to the same digest without being loaded, and a re-registered version no longer matches."""
    from audit.gate.loading import read_identity, version_weights_sha256

    loaded = load_model({"kind": "mlflow", "uri": "models:/cand/1"}, tracking_uri=tracking_uri)
    ident = loaded.identity
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    mv = client.get_model_version("cand", "1")
    assert (ident.registered_name, ident.version, ident.source) == ("cand", "1", mv.source)
    assert ident.run_id == mv.run_id and ident.creation_timestamp == mv.creation_timestamp > 0
    assert ident.weights_sha256 == loaded.weights_sha256 != ""
    assert version_weights_sha256(client, tracking_uri, ident) == loaded.weights_sha256
    now = read_identity(client, "cand", "1")
    assert ident.same_version(now) and ident.differences(now) == []
    # the other version's weights hash differently: a source swapped under the name is caught
    other = read_identity(client, "cand", "2")
    assert not ident.same_version(other)
    assert version_weights_sha256(client, tracking_uri, other) != loaded.weights_sha256
    client.delete_model_version("cand", "1")
    assert read_identity(client, "cand", "1") is None


def test_the_alias_form_records_the_version_it_resolved(store, tracking_uri):
    loaded = load_model(
        {"kind": "mlflow", "uri": "models:/cand@champion"}, tracking_uri=tracking_uri
    )
    assert loaded.identity.version == "1" and loaded.identity.registered_name == "cand"
    run = load_model(
        {"kind": "mlflow", "uri": f"runs:/{store['safe']}/model"}, tracking_uri=tracking_uri
    )
    assert run.identity is None  # not a registry version: nothing for the gate to re-check
