"""Gate integrity: model files are written by an attacker, and the named store is the store read.

Payloads that would write a file (``pathlib.Path.touch``, a nested ``pathlib.Path.write_text``,
a nested ``builtins.len``) go through every place a network config comes from: a registry
version's ``net.json``, a ``runs:/`` URI, a Lightning checkpoint's hyper-parameters and
``kind: state_dict``'s ``target``. The file never appears and a one-line ModelLoadError
names the key and how to allow a trusted class. Real SQLite stores, no mocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid

import pytest
import torch
import torchvision
from _checkpoints import save_checkpoint
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from audit.gate.loading import (
    DEFAULT_ALLOWED_TARGETS,
    ModelLoadError,
    build_network,
    load_model,
    log_model_safely,
)
from audit.models import SmallCNN
from audit.training import Classifier, build_net

NET = {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [4, 8]}
X = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
NOT_ALLOWED = r"_target_ 'pathlib\.Path\.touch' is not in model\.allowed_targets \['audit\.models\.\*', 'torchvision\.models\.\*'\], so nothing was imported; if you trust that code, add it to model\.allowed_targets, e\.g\. model\.allowed_targets=\[audit\.models\.\*,torchvision\.models\.\*,pathlib\.Path\.\*\]"
SPECIAL = r"is a Hydra special key; .*add that class to model\.allowed_targets"


def _net(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    net = SmallCNN(widths=[4, 8])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    return net.eval()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(X), b.eval()(X), rtol=0, atol=0)


def _payloads(marker) -> dict[str, tuple[dict, str]]:
    """name -> (network config, regex of the refusal); each would write ``marker`` or run code."""
    return {
        "touch": ({"_target_": "pathlib.Path.touch", "self": str(marker)}, NOT_ALLOWED),
        "nested_write_text": (
            {
                **NET,
                "widths": {
                    "_target_": "pathlib.Path.write_text",
                    "data": "x",
                    "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
                },
            },
            r"widths\._target_ " + SPECIAL,
        ),
        "nested_len": (
            {**NET, "num_classes": {"_target_": "builtins.len", "_args_": [[1, 2, 3]]}},
            r"num_classes\._target_ " + SPECIAL,
        ),
        "args": ({**NET, "_args_": [str(marker)]}, r": _args_ " + SPECIAL),
        "partial": ({**NET, "_partial_": True}, r": _partial_ " + SPECIAL),
    }


PAYLOADS = list(_payloads("x"))


def test_the_payloads_really_run_when_instantiated(tmp_path):
    """What the loader used to do (Hydra's instantiate) runs them: so the tests below can fail."""
    p = _payloads(tmp_path / "touched")
    instantiate(p["touch"][0])
    assert (tmp_path / "touched").exists()
    p = _payloads(tmp_path / "written")
    with pytest.raises(InstantiationException):  # SmallCNN(widths=<int>) fails, after the write
        instantiate(p["nested_write_text"][0])
    assert (tmp_path / "written").read_text() == "x"
    assert instantiate(p["nested_len"][0]).fc.out_features == 3  # len([1, 2, 3]) ran


# ----------------------------------------------------------------- registry and runs:/
@pytest.fixture(scope="module")
def evil_store(tmp_path_factory, empty_mlflow_store):
    """A store whose registered models 'evil-<payload>' v1 hold poisoned net.json files."""
    folder = tmp_path_factory.mktemp("evil-store")
    marker = folder / "pwned"
    uri = empty_mlflow_store(folder)
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("evil", artifact_location=(folder / "artifacts").as_uri())
    runs = {}
    for name, (config, _) in _payloads(marker).items():
        run = client.create_run(exp)
        files = folder / "files" / name
        files.mkdir(parents=True)
        (files / "net.json").write_text(json.dumps(config))
        torch.save(_net(0).state_dict(), files / "state_dict.pth")
        client.log_artifacts(run.info.run_id, str(files), "model")
        client.create_registered_model(f"evil-{name}")
        client.create_model_version(
            f"evil-{name}", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
        )
        runs[name] = run.info.run_id
    return {"db": folder / "mlflow.db", "marker": marker, "runs": runs}


@pytest.fixture
def evil(evil_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(evil_store["db"], tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return {**evil_store, "uri": uri}


@pytest.mark.parametrize("which", ["registry", "run"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_poisoned_net_json_is_refused(evil, payload, which):
    uri = (
        f"models:/evil-{payload}/1"
        if which == "registry"
        else f"runs:/{evil['runs'][payload]}/model"
    )
    message = _payloads(evil["marker"])[payload][1]
    with pytest.raises(ModelLoadError, match=rf"net\.json of '{uri}'.*{message}") as info:
        load_model({"kind": "mlflow", "uri": uri}, tracking_uri=evil["uri"])
    assert "\n" not in str(info.value)
    assert not evil["marker"].exists()


# ----------------------------------------------------------------- checkpoints
def _checkpoint(path, net_config: dict | None = None, **extra) -> None:
    """A real Lightning checkpoint of Classifier(NET); then hyper_parameters.net is replaced."""
    save_checkpoint(Classifier(NET), path)
    ckpt = torch.load(path, weights_only=True)
    if net_config is not None:
        ckpt["hyper_parameters"]["net"] = net_config
    ckpt.update(extra)
    torch.save(ckpt, path)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_poisoned_checkpoint_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    config, message = _payloads(marker)[payload]
    path = tmp_path / "evil.ckpt"
    _checkpoint(path, config)
    with pytest.raises(
        ModelLoadError, match=rf"checkpoint '{path}': hyper_parameters\.net.*{message}"
    ) as info:
        load_model({"kind": "checkpoint", "path": str(path)})
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_checkpoint_past_hparams_key_and_weights_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "old.ckpt"
    _checkpoint(path, hparams={"net": {"_target_": "pathlib.Path.touch", "self": str(marker)}})
    with pytest.raises(ModelLoadError, match=r"hparams\.net: " + NOT_ALLOWED):
        load_model({"kind": "checkpoint", "path": str(path)})
    path = tmp_path / "download.ckpt"
    _checkpoint(path, {"_target_": "torchvision.models.resnet18", "weights": "IMAGENET1K_V1"})
    with pytest.raises(
        ModelLoadError, match=r"weights='IMAGENET1K_V1' asks for pretrained weights"
    ):
        load_model({"kind": "checkpoint", "path": str(path)})
    assert not marker.exists()


# ----------------------------------------------------------------- state_dict
@pytest.mark.parametrize("payload", PAYLOADS)
def test_poisoned_state_dict_target_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    config, message = _payloads(marker)[payload]
    weights = tmp_path / "w.pt"
    torch.save(_net(0).state_dict(), weights)
    with pytest.raises(ModelLoadError, match=rf"model\.target.*{message}"):
        load_model({"kind": "state_dict", "target": config, "path": str(weights)})
    assert not marker.exists()


@pytest.mark.parametrize(
    "target, message",
    [
        ({"_target_": "os"}, r"'os' is not a dotted path of identifiers .*nothing was imported"),
        (
            {"_target_": "audit.models.SmallCNN;import os"},
            r"not a dotted path of identifiers",
        ),
        ({"_target_": "audit.models.__class__"}, r"not a dotted path of identifiers"),
        ({"_target_": ["audit.models.SmallCNN"]}, r"_target_ must be a dotted class path"),
        ({**NET, "bad-name": 1}, r"argument name 'bad-name' is not a Python identifier"),
        (
            {**NET, "widths": [4, {"_convert_": "all"}]},
            r"widths\[1\]\._convert_ is a Hydra special key",
        ),
        (
            {"_target_": "torchvision.models.resnet18", "weights_backbone": "X"},
            r"model\.target: weights_backbone='X' asks for pretrained weights, which would be "
            r"downloaded; .*set weights_backbone: null or remove it",
        ),
        (
            {"_target_": "torchvision.models.ResNet18_Weights"},
            r"_target_ 'torchvision\.models\.ResNet18_Weights' is the class ResNet18_Weights, not a torch\.nn\.Module",
        ),
        (  # defined in torchvision.models._api: a * never reaches a private module
            {"_target_": "torchvision.models.Weights"},
            r"is defined as 'torchvision\.models\._api\.Weights', which is not in model\.allowed_targets .*"
            r"never matches a private name '_api'",
        ),
        (
            {"_target_": "audit.models.torch"},
            r"'audit\.models\.torch' is a module, neither a torch\.nn\.Module subclass nor a Python function",
        ),
        ({"_target_": "audit.models.Nope"}, r"could not build model\.target .*cannot import it"),
    ],
)
def test_bad_targets_name_the_key(tmp_path, target, message):
    weights = tmp_path / "w.pt"
    torch.save(_net(0).state_dict(), weights)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model({"kind": "state_dict", "target": target, "path": str(weights)})
    assert "\n" not in str(info.value)


def test_plain_values_only_and_allow_list_checked():
    with pytest.raises(
        ModelLoadError, match=r"net: widths\[0\] is a object; arguments must be plain"
    ):
        build_network({**NET, "widths": [object()]}, DEFAULT_ALLOWED_TARGETS, "net")
    weights = "unused.pt"
    for bad, message in [
        ("audit.models.*", r"model\.allowed_targets must be a list of glob patterns"),
        (["audit.models.*", "os; rm"], r"model\.allowed_targets: 'os; rm' is not a glob"),
    ]:
        with pytest.raises(ModelLoadError, match=message):
            load_model(
                {"kind": "state_dict", "target": NET, "path": weights, "allowed_targets": bad}
            )


# ----------------------------------------------------------------- a user's own classes
USER_MODULE = """
from pathlib import Path
from shutil import copyfile  # re-exported: must never pass as a network

from torch import nn

Path(__file__).with_name("imported.flag").touch()  # importing this module runs code


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 2, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def tiny(num_classes: int = 2) -> TinyNet:
    return TinyNet(num_classes=num_classes)


def not_a_net():
    return 3


def lies() -> TinyNet:  # annotated as a network, returns something else
    return 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A fresh module ``usernets_<id>`` on sys.path; returns its name and folder."""
    name = f"usernets_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield name, folder
    sys.modules.pop(name, None)


def test_user_class_refused_by_default_then_allowed(user_module, tmp_path):
    name, folder = user_module
    torch.manual_seed(0)
    net = sys.modules.get(name)
    assert net is None
    target = {"_target_": f"{name}.TinyNet", "num_classes": 3}
    with pytest.raises(
        ModelLoadError,
        match=rf"_target_ '{name}\.TinyNet' is not in model\.allowed_targets .*"
        rf"model\.allowed_targets=\[audit\.models\.\*,torchvision\.models\.\*,{name}\.\*\]",
    ):
        load_model({"kind": "state_dict", "target": target, "path": str(tmp_path / "none.pt")})
    assert name not in sys.modules and not (folder / "imported.flag").exists()  # never imported

    allow = ["audit.models.*", f"{name}.*"]
    model = build_network(target, allow, "target")  # imports the module: now it may run
    assert (folder / "imported.flag").exists()
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    src = {"kind": "state_dict", "target": target, "path": str(weights), "allowed_targets": allow}
    loaded = load_model(src)
    _same(loaded.model, model)
    assert loaded.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    by_function = load_model({**src, "target": {"_target_": f"{name}.tiny", "num_classes": 3}})
    _same(by_function.model, model)
    with pytest.raises(
        ModelLoadError, match=rf"'{name}\.not_a_net' has no return annotation.*nothing was called"
    ):
        load_model({**src, "target": {"_target_": f"{name}.not_a_net"}})
    with pytest.raises(ModelLoadError, match=rf"'{name}\.lies' returned a int, not a torch"):
        load_model({**src, "target": {"_target_": f"{name}.lies"}})


def test_reexported_function_is_refused_even_when_its_module_is_allowed(user_module, tmp_path):
    """``usernets.copyfile`` matches ``usernets.*``, but it is ``shutil.copyfile``: refused
    before it is called, from model.target and from a checkpoint (there by build_net)."""
    name, _ = user_module
    secret, copy = tmp_path / "secret.txt", tmp_path / "copy.txt"
    secret.write_text("s")
    evil = {"_target_": f"{name}.copyfile", "src": str(secret), "dst": str(copy)}
    allow = [f"{name}.*"]
    message = rf"_target_ '{name}\.copyfile' is defined as 'shutil\.copyfile', which is not in model\.allowed_targets"
    with pytest.raises(ModelLoadError, match=message):
        load_model({"kind": "state_dict", "target": evil, "path": "x.pt", "allowed_targets": allow})
    path = tmp_path / "evil.ckpt"
    _checkpoint(path, evil)
    with pytest.raises(ModelLoadError, match=rf"checkpoint '{path}': net: {message}"):
        load_model({"kind": "checkpoint", "path": str(path), "allowed_targets": allow})
    assert not copy.exists()


def test_user_class_in_a_checkpoint(user_module, tmp_path):
    name, _ = user_module
    target = {"_target_": f"{name}.TinyNet", "num_classes": 2}
    torch.manual_seed(1)
    module = Classifier(target)  # training from one's own config: trusted, no allow-list
    path = save_checkpoint(module, tmp_path / "user.ckpt")
    with pytest.raises(
        ModelLoadError, match=r"hyper_parameters\.net: _target_ .* is not in model\.allowed_targets"
    ):
        load_model({"kind": "checkpoint", "path": str(path)})
    loaded = load_model({"kind": "checkpoint", "path": str(path), "allowed_targets": [f"{name}.*"]})
    _same(loaded.model, module.net)
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_torchvision_builder_by_default(tmp_path):
    torch.manual_seed(2)
    net = torchvision.models.resnet18(num_classes=3).eval()
    weights = tmp_path / "resnet.pt"
    torch.save(net.state_dict(), weights)
    target = {"_target_": "torchvision.models.resnet18", "num_classes": 3, "weights": None}
    loaded = load_model({"kind": "state_dict", "target": target, "path": str(weights)})
    _same(loaded.model, net)
    with pytest.raises(
        ModelLoadError, match=r"weights='IMAGENET1K_V1' asks for pretrained weights"
    ):
        load_model(
            {
                "kind": "state_dict",
                "target": {**target, "weights": "IMAGENET1K_V1"},
                "path": str(weights),
            }
        )


def test_build_net_trusts_training_configs_but_never_uses_hydra(tmp_path):
    assert isinstance(
        build_net({"_target_": "audit.models.resnet18_small", "num_classes": 2}), torch.nn.Module
    )
    with pytest.raises(ValueError, match=r"widths\._target_ is a Hydra special key"):
        build_net(
            {**NET, "widths": {"_target_": "pathlib.Path.touch", "self": str(tmp_path / "t")}}
        )
    with pytest.raises(ValueError, match=r"is not in model\.allowed_targets"):
        build_net(NET, allowed_targets=["torchvision.models.*"])
    assert not (tmp_path / "t").exists()


# ----------------------------------------------------------------- the named store is the store read
def _store(folder, seed: int, alias: bool = False) -> str:
    """A SQLite store in ``folder`` with 'cand' v1 = _net(seed); returns its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("s", artifact_location=(folder / "artifacts").as_uri())
    run = client.create_run(exp)
    log_model_safely(
        _net(seed), NET, registered_name="cand", run_id=run.info.run_id, tracking_uri=uri
    )
    client.set_terminated(run.info.run_id)
    client.set_registered_model_alias("cand", "champion", "1")
    return uri


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """B (the named store, model X = _net(10)), D (a cwd default store, Y = _net(11)),
    C (MLFLOW_TRACKING_URI's store, Z = _net(12)); built with no process default set."""
    root = tmp_path_factory.mktemp("stores")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mp.chdir(root)
        uris = {k: _store(root / k, seed) for k, seed in (("B", 10), ("D", 11), ("C", 12))}
    sha = {
        k: hashlib.sha256(
            next((root / k / "artifacts").rglob("state_dict.pth")).read_bytes()
        ).hexdigest()
        for k in uris
    }
    assert len(set(sha.values())) == 3
    return {"root": root, "uris": uris, "sha": sha}


@pytest.mark.parametrize("default", ["cwd_store_and_env", "env_only", "none"])
@pytest.mark.parametrize("uri", ["models:/cand/1", "models:/cand@champion"])
def test_the_named_store_is_the_store_read(stores, tmp_path, monkeypatch, default, uri):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    if default == "cwd_store_and_env":
        shutil.copyfile(stores["root"] / "D" / "mlflow.db", work / "mlflow.db")
    if default == "none":
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", stores["uris"]["C"])
    before = sorted(os.listdir(work))
    loaded = load_model({"kind": "mlflow", "uri": uri}, tracking_uri=stores["uris"]["B"])
    _same(loaded.model, _net(10))
    with torch.no_grad():
        assert not torch.equal(loaded.model(X), _net(11)(X)) and not torch.equal(
            loaded.model(X), _net(12)(X)
        )
    assert loaded.weights_sha256 == stores["sha"]["B"]
    assert (loaded.registered_name, loaded.version) == ("cand", "1")
    assert sorted(os.listdir(work)) == before  # no mlflow.db (or anything else) appeared


def test_runs_uri_is_read_from_the_named_store(stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stores["uris"]["C"])
    b = MlflowClient(stores["uris"]["B"], stores["uris"]["B"])
    run_id = b.get_model_version("cand", "1").run_id
    loaded = load_model(
        {"kind": "mlflow", "uri": f"runs:/{run_id}/model"}, tracking_uri=stores["uris"]["B"]
    )
    _same(loaded.model, _net(10))
    assert loaded.weights_sha256 == stores["sha"]["B"]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("uri", ["models:/cand/1", "runs:/0123456789abcdef/model"])
def test_a_store_that_does_not_exist_is_an_error_and_creates_nothing(tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nothing" / "mlflow.db"
    with pytest.raises(
        ModelLoadError,
        match=rf"the MLflow store sqlite:///{missing} does not exist \(no file '{missing}'\); set "
        r"tracking\.uri \(or MLFLOW_TRACKING_URI\) to the store that holds the model; nothing was created",
    ):
        load_model({"kind": "mlflow", "uri": uri}, tracking_uri=f"sqlite:///{missing}")
    assert not missing.parent.exists() and os.listdir(tmp_path) == []
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: ./mlflow.db
    with pytest.raises(
        ModelLoadError, match=r"the MLflow store sqlite:///mlflow\.db does not exist"
    ):
        load_model({"kind": "mlflow", "uri": uri})
    assert os.listdir(tmp_path) == []


def test_weights_sha256_of_a_state_dict_file(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(_net(3).state_dict(), weights)
    loaded = load_model({"kind": "state_dict", "target": NET, "path": str(weights)})
    assert loaded.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
