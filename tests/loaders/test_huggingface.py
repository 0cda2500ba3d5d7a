"""Hugging Face ``transformers`` image classifiers: the ``model=huggingface`` folder loader and MLflow
``transformers`` versions (audit/loaders/huggingface.py), through the real ``model-audit`` Hydra app
and a real SQLite store; the six supported families explained by the default methods.

Every model is a tiny random-weights ``*ForImageClassification`` from tests/_hf_models.py: nothing
is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import _hf_models as hf  # noqa: E402
from _jobkit import ENGINE, cli, colour_folder  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from audit.defaults import default_config  # noqa: E402
from audit.gate.loading import load_model, version_weights_sha256  # noqa: E402
from audit.methods import explain  # noqa: E402
from audit.methods.gradcam import gradcam_layer  # noqa: E402


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> list[str]:
    """The probe arguments: one small colour probe folder (32 px) for the module."""
    folder = colour_folder(tmp_path_factory.mktemp("probes"), n_per_group=16)
    return ["probes=folder", f"probes.path={folder}", *ENGINE]


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory) -> Path:
    """A ViT's save_pretrained folder, written once; tests that edit it take a copy (:func:`_copy`)."""
    return hf.save("vit", tmp_path_factory.mktemp("vit") / "vit")


def _copy(folder: Path, to: Path) -> Path:
    return Path(shutil.copytree(folder, to))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """The process's temporary folder for this test only, to see what is left in it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# --------------------------------------------------------------------------- loading
def test_folder_loads_as_logits_network_with_processor_normalization_and_size(tmp_path):
    net = hf.build("resnet")
    folder = hf.save("resnet", tmp_path / "resnet", net)
    proc = json.loads((folder / "preprocessor_config.json").read_text())
    proc["size"] = {"shortest_edge": 24}  # any size works on a ResNet: the processor's decides
    (folder / "preprocessor_config.json").write_text(json.dumps(proc))
    loaded = load_model({"kind": "huggingface", "path": str(folder)})
    assert (loaded.kind, loaded.layout, loaded.input_size, loaded.name) == (
        "huggingface",
        "huggingface",
        (24, 24),
        "resnet",
    )
    assert loaded.weights_sha256 == _sha(folder / "model.safetensors")
    x = torch.rand(3, 3, 24, 24)
    mean, std = torch.tensor(hf.MEAN).view(1, 3, 1, 1), torch.tensor(hf.STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = net(pixel_values=(x - mean) / std).logits
        got = loaded.model(x)
        assert isinstance(got, torch.Tensor) and torch.allclose(got, want, atol=1e-5)
        # model.normalization replaces the processor's, never applied on top of it
        own = load_model(
            {
                "kind": "huggingface",
                "path": str(folder),
                "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]},
            }
        )
        assert torch.allclose(own.model(x), net(pixel_values=x).logits, atol=1e-5)


def test_center_crop_size_is_the_input_size_and_sharded_weights_are_hashed_together(tmp_path):
    net = hf.build("convnext")
    folder = tmp_path / "convnext"
    net.save_pretrained(folder, max_shard_size="20KB")
    hf.processor().save_pretrained(folder)
    proc = json.loads((folder / "preprocessor_config.json").read_text())
    proc.update(do_center_crop=True, crop_size={"height": 28, "width": 20})
    (folder / "preprocessor_config.json").write_text(json.dumps(proc))
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    loaded = load_model({"kind": "huggingface", "path": str(folder)})
    assert loaded.input_size == (28, 20)
    first = loaded.weights_sha256
    data = bytearray(shards[-1].read_bytes())
    data[-1] ^= 1  # one bit of the last shard's last tensor
    shards[-1].write_bytes(bytes(data))
    assert load_model({"kind": "huggingface", "path": str(folder)}).weights_sha256 != first


def test_loading_opens_no_connection(saved_vit, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args}")

    folder = saved_vit
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert load_model({"kind": "huggingface", "path": str(folder)}).input_size == (32, 32)


# --------------------------------------------------------------------------- the six families
@pytest.mark.parametrize("family", hf.FAMILIES)
def test_default_methods_explain_each_family(family, tmp_path):
    """Each default method gives finite maps that vary over each image; Grad-CAM's default layer
    is a grid in front of the last attention (transformers) or the last stage (CNNs)."""
    folder = hf.save(family, tmp_path / family)
    model = load_model({"kind": "huggingface", "path": str(folder)}).model
    x = torch.rand(4, 3, hf.SIZE, hf.SIZE, generator=torch.Generator().manual_seed(1))
    layer = gradcam_layer(model, x)
    expected = {
        "vit": "vit.layers.1.layernorm_before",
        "deit": "deit.layers.1.layernorm_before",
        "beit": "beit.layers.1.layernorm_before",
        "swin": "swin.encoder.layers.1.blocks.0.layernorm_before",
        "convnext": "convnext.encoder.stages.1",
        "resnet": "resnet.encoder.stages.1",
    }
    assert layer == f"model.network.{expected[family]}"
    for method in default_config()["engine"]["methods"]:
        maps = explain(method, model, x, 0)
        assert maps.shape[0] == 4 and maps.shape[-2:] == x.shape[-2:], (method, maps.shape)
        assert torch.isfinite(maps).all(), method
        assert (maps.flatten(1).std(dim=1) > 0).all(), f"{method} gives a constant map on {family}"


# --------------------------------------------------------------------------- the app, end to end
def test_save_pretrained_folder_audited_by_the_app(tmp_path, tracking_uri, probes, saved_vit):
    folder = saved_vit
    res = cli(
        ["model=huggingface", f"model.path={folder}", f"tracking.uri={tracking_uri}", *probes],
        tmp_path,
    )
    assert res.code in (0, 1) and not res.errors, (
        res.out + res.err
    )  # a verdict: PASS, or FAIL/INCONCLUSIVE
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.tags["audit.weights_sha256"] == _sha(folder / "model.safetensors")
    assert run.data.tags["audit.verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")


def test_mlflow_transformers_version_audited_and_gated(tmp_path, tracking_uri, monkeypatch, probes):
    """``mlflow.transformers.log_model`` of an image-classification pipeline, registered: loaded
    from its ``model/`` and ``components/image_processor/`` folders, tagged by the gate, and the
    gate's re-hash of the version's weights equals the hash of the weights audited."""
    import mlflow
    from transformers import pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    net = hf.build("deit")
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run():
        pipe = pipeline("image-classification", model=net, image_processor=hf.processor())
        mlflow.transformers.log_model(
            pipe, name="model", registered_model_name="hfdeit", pip_requirements=["transformers"]
        )
    client = MlflowClient(tracking_uri)
    loaded = load_model({"kind": "mlflow", "uri": "models:/hfdeit/1"}, tracking_uri=tracking_uri)
    assert (loaded.layout, loaded.input_size) == ("transformers", (32, 32))
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(hf.MEAN).view(1, 3, 1, 1), torch.tensor(hf.STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(pixel_values=(x - mean) / std).logits, atol=1e-5)
    assert version_weights_sha256(client, tracking_uri, loaded.identity) == loaded.weights_sha256
    res = cli(["model.uri=models:/hfdeit/1", f"tracking.uri={tracking_uri}", *probes], tmp_path)
    assert res.code in (0, 1) and not res.errors, res.out + res.err
    tags = client.get_model_version("hfdeit", "1").tags
    assert tags["audit.weights_sha256"] == loaded.weights_sha256
    assert tags["audit.verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    # weights changed under the version afterwards: the gate's re-hash sees it
    source = client.get_model_version("hfdeit", "1").source
    stored = Path(
        client.get_logged_model(source.removeprefix("models:/")).artifact_location.removeprefix(
            "file://"
        )
    )
    weights = stored / "model" / "model.safetensors"
    assert _sha(weights) == loaded.weights_sha256
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert (
        version_weights_sha256(client, tracking_uri, loaded.identity)
        == _sha(weights)
        != loaded.weights_sha256
    )


# --------------------------------------------------------------------------- refusals
def _pickled(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    torch.save(hf.build("vit").state_dict(), folder / "pytorch_model.bin")
    return "pickled weights ['pytorch_model.bin'] and no model.safetensors"


def _auto_map(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_mine.MyNet"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_mine.py").write_text("raise SystemExit('custom code ran')\n")
    return "has 'auto_map': custom code"


def _unknown_type(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mynet", architectures=["MyNetForImageClassification"])
    (folder / "config.json").write_text(json.dumps(config))
    return "has model_type 'mynet'; supported: vit (ViTForImageClassification)"


def _foreign_class(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["ViTForMaskedImageModeling"]
    (folder / "config.json").write_text(json.dumps(config))
    return "has architectures ['ViTForMaskedImageModeling'] for model_type 'vit'"


def _oversize(folder: Path) -> str:
    return "hold more than model.max_bytes=4096 bytes"


def _bad_header(folder: Path) -> str:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + data[8:])
    return "its safetensors header claims 1000000000 bytes"


def _missing_tensor(folder: Path) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    del state["classifier.weight"]  # transformers would initialize it at random and only warn
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return "do not fit ViTForImageClassification as its config.json describes it (missing: ['classifier.weight'])"


def _other_shape(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config.update(
        id2label={str(i): f"c{i}" for i in range(3)}, label2id={f"c{i}": i for i in range(3)}
    )
    (folder / "config.json").write_text(json.dumps(config))
    return "(of another shape: ['classifier.bias', 'classifier.weight'])"


REFUSALS = {
    "pickled_bin": _pickled,
    "auto_map": _auto_map,
    "unknown_model_type": _unknown_type,
    "foreign_class": _foreign_class,
    "oversize": _oversize,
    "bad_header": _bad_header,
    "missing_tensor": _missing_tensor,
    "other_shape": _other_shape,
}


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One SQLite store for the refusals (each must leave it without a run)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_folder_exits_2_with_one_line_and_writes_nothing(
    case, tmp_path, shared_store, private_tmp, probes, saved_vit, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    tracking_uri = shared_store
    folder = _copy(saved_vit, tmp_path / "vit")
    expected = REFUSALS[case](folder)
    extra = ["model.max_bytes=4096"] if case == "oversize" else []
    res = cli(
        [
            "model=huggingface",
            f"model.path={folder}",
            f"tracking.uri={tracking_uri}",
            *extra,
            *probes,
        ],
        tmp_path,
    )
    assert res.code == 2, res.out + res.err
    assert len(res.errors) == 1 and expected in res.errors[0], res.err
    assert [ln for ln in res.err.splitlines() if ln.strip()] == res.errors  # nothing else on stderr
    client = MlflowClient(tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert list(private_tmp.iterdir()) == []  # no temporary copy left behind


def test_version_logged_without_weights_is_refused(tmp_path, tracking_uri):
    """An MLflow transformers version whose folder names a Hub repository (save_pretrained=False)
    holds no weights: refused, nothing downloaded."""
    from audit.loaders import ModelLoadError
    from audit.loaders.huggingface import model_folder

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "MLmodel").write_text(
        "flavors:\n  transformers:\n    source_model_name: google/vit-base-patch16-224\n"
        "    source_model_revision: abc\n    task: image-classification\n"
    )
    with pytest.raises(
        ModelLoadError,
        match="save_pretrained=False.*'google/vit-base-patch16-224'.*downloads nothing",
    ):
        model_folder(tmp_path / "m", "models:/x/1")
