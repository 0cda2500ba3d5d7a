"""``*.safetensors`` weights wherever a weights file is read: ``model.path`` of kind state_dict and
``model.safetensors`` in the safe layout of a registry version (audit/loaders/weights.py). A header
that claims more than the file holds is refused before anything is allocated; no file is unpickled."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from audit.gate.loading import ModelLoadError, load_model, read_identity, version_weights_sha256
from audit.models import SmallCNN

NET = {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [4, 8]}
X = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _net() -> SmallCNN:
    torch.manual_seed(3)
    net = SmallCNN(widths=[4, 8])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    return net.eval()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(X), b.eval()(X), rtol=0, atol=0)


def _header_file(path: Path, header: dict, body: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)
    return path


def test_a_state_dict_path_may_be_safetensors(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(_net().state_dict(), str(path))
    loaded = load_model({"kind": "state_dict", "target": NET, "path": str(path)})
    _same(loaded.model, _net())
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_safe_layout_reads_model_safetensors_and_hashes_it(tracking_uri, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "net.json").write_text(json.dumps(NET))
    save_file(_net().state_dict(), str(folder / "model.safetensors"))
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = client.create_run(
        client.create_experiment("st", artifact_location=(tmp_path / "art").as_uri())
    )
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.create_registered_model("st")
    client.create_model_version("st", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    loaded = load_model({"kind": "mlflow", "uri": "models:/st/1"}, tracking_uri=tracking_uri)
    _same(loaded.model, _net())
    sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.layout == "safe" and loaded.weights_sha256 == sha
    identity = read_identity(client, "st", "1")
    assert version_weights_sha256(client, tracking_uri, identity) == sha


@pytest.mark.parametrize(
    "case, header, length, words",
    [
        ("length beyond the file", {}, 2**62, "claims 4611686018427387904 bytes"),
        (
            "absurd shape",
            {"w": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 16]}},
            None,
            "claims shape",
        ),
        (
            "offsets beyond the data",
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**40]}},
            None,
            "outside",
        ),
        (
            "unknown dtype",
            {"w": {"dtype": "OBJ", "shape": [4], "data_offsets": [0, 16]}},
            None,
            "dtype",
        ),
        (
            "negative size",
            {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
            None,
            "not a list of sizes",
        ),
    ],
)
def test_a_hostile_safetensors_header_is_refused_before_allocating(
    tmp_path, case, header, length, words
):
    path = _header_file(tmp_path / "w.safetensors", header, b"\0" * 16, length)
    with pytest.raises(ModelLoadError, match=words):
        load_model({"kind": "state_dict", "target": NET, "path": str(path)})


class _Touch:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_named_safetensors_is_not_unpickled(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(pickle.dumps(_Touch(tmp_path / "pwned")))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model({"kind": "state_dict", "target": NET, "path": str(path)})
    assert not (tmp_path / "pwned").exists()
