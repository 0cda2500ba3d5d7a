"""Every bad input the gate refuses: exit 2, one line on stderr, nothing written anywhere.

Each case runs the real ``model-audit`` command line (in this process, see ``_jobkit``)
against one shared SQLite registry, which must be unchanged after every case: no run,
no tag, no alias, no report. The bad-input table of docs/errors.md is generated from these
cases: ``MODEL_AUDIT_WRITE_TABLE=1 pytest tests/gate/test_bad_inputs.py`` rewrites it, and
without the variable the last test fails when docs/errors.md and the cases disagree.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _jobkit import NAME, all_runs, cli, colour_folder, probes_args, registry, state
from _toy_models import GreyReader, NaNModel, colour_probe_set
from mlflow.tracking import MlflowClient
from PIL import Image

from audit.probes import ProbeSet

TESTS = Path(__file__).resolve().parents[1]
ERRORS_PAGE = TESTS.parent / "docs" / "errors.md"
START, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


class Batch1Only(torch.nn.Module):
    """A model whose forward works on one image and raises on a batch of several."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(2, 2)

    def forward(self, x):
        if x.shape[0] > 1:
            raise RuntimeError("shape '[1, 2]' is invalid for input of size 8")
        return self.fc(self.features(x).mean(dim=(2, 3)))


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One registry for every case: toy v1 (clean), v2 (shortcut); nan v1; batch1 v1; evil-* v1."""
    root = tmp_path_factory.mktemp("bad-inputs")
    uri = registry(root / "store")
    registry(root / "store", models=(NaNModel,), name="nan")
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("train").experiment_id
    marker = root / "pwned"
    payloads = {
        "evil-touch": {"_target_": "pathlib.Path.touch", "self": str(marker)},
        "evil-nested": {
            "_target_": "audit.models.SmallCNN",
            "num_classes": {
                "_target_": "builtins.len",
                "_args_": [
                    [
                        {
                            "_target_": "pathlib.Path.write_text",
                            "data": "x",
                            "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
                        },
                        1,
                    ]
                ],
            },
        },
    }
    lraspp = {
        "_target_": "torchvision.models.segmentation.lraspp_mobilenet_v3_large",
        "num_classes": 2,
    }
    runs = {}
    for name, net in {
        **payloads,
        "batch1": {"_target_": "test_bad_inputs.Batch1Only"},
        "lraspp": lraspp,
    }.items():
        files = root / "files" / name
        files.mkdir(parents=True)
        (files / "net.json").write_text(json.dumps(net))
        model = Batch1Only() if name == "batch1" else GreyReader()
        torch.save(model.state_dict(), files / "state_dict.pth")
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(files), "model")
        client.set_terminated(run.info.run_id)
        client.create_registered_model(name)
        client.create_model_version(
            name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
        )
        runs[name] = run.info.run_id
    client.create_registered_model("etc")  # a version whose source is a system folder, not its run
    client.create_model_version("etc", source="file:///etc", run_id=runs["batch1"])
    work = root / "work"
    work.mkdir()
    colour_folder(work)
    return {
        "root": root,
        "uri": uri,
        "client": client,
        "work": work,
        "marker": marker,
        "runs": runs,
    }


def _folder(world, name: str, edit: Callable[[Path], None]) -> str:
    """A copy of the colour probe folder, changed by ``edit``."""
    folder = world["root"] / "folders" / name
    if not folder.is_dir():
        colour_probe_set(n_per_group=4, size=32).save(folder)
        edit(folder)
    return str(folder)


def _manifest(folder: Path, row: int, column: str, value: str) -> None:
    lines = (folder / "manifest.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[row].split(",")
    cells[header.index(column)] = value
    lines[row] = ",".join(cells)
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")


def _huge_header_png(folder: Path) -> None:
    """images/0000.png claims 20000 x 20000 pixels in its header (the data stays tiny)."""
    path = folder / "images" / "0000.png"
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = (20000).to_bytes(4, "big") * 2
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = crc.to_bytes(4, "big")
    path.write_bytes(bytes(data))


def _transparent(folder: Path) -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    Image.fromarray(rgba, mode="RGBA").save(folder / "images" / "0000.png")


def _three_classes(folder: Path) -> None:
    (folder / "classes.txt").write_text("red\nblue\ngreen\n")


def _link_out(folder: Path) -> None:
    (folder / "images" / "0000.png").unlink()
    (folder / "images" / "0000.png").symlink_to("/etc/hostname")


def _checkpoint(world, net: dict) -> str:
    """A Lightning checkpoint written by audit.training.Classifier, its hyper_parameters.net replaced."""
    from _checkpoints import save_checkpoint

    from audit.training import Classifier

    path = world["root"] / "evil.ckpt"
    if not path.exists():
        save_checkpoint(
            Classifier({"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [4, 8]}),
            path,
        )
        ckpt = torch.load(path, weights_only=True)
        ckpt["hyper_parameters"]["net"] = net
        torch.save(ckpt, path)
    return str(path)


def _foreign_checkpoint(world) -> str:
    """A Lightning checkpoint whose hyper-parameters are another LightningModule's (no ``net``)."""
    path = world["root"] / "foreign.ckpt"
    if not path.exists():
        ckpt = torch.load(
            _checkpoint(world, {"_target_": "audit.models.SmallCNN"}), weights_only=True
        )
        ckpt["hyper_parameters"] = {"backbone": "resnet18", "lr": 0.001}
        torch.save(ckpt, path)
    return str(path)


def _weights(world, model: torch.nn.Module, name: str) -> str:
    path = world["root"] / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def _reports_file(world) -> str:
    path = world["root"] / "reports-is-a-file"
    path.write_text("not a folder")
    return str(path)


M1 = f"model.uri=models:/{NAME}/1"


def _probes(world) -> list[str]:
    return probes_args(world["work"])


def _timm_probes(world) -> list[str]:
    """The probe folder without _jobkit's allow-list (model=timm keeps its own: timm.create_model)."""
    return ["probes=folder", f"probes.path={colour_folder(world['work'])}"]


def _touch_payload(world) -> dict:
    return {"_target_": "pathlib.Path.touch", "self": str(world["marker"])}


# case -> (arguments, text the one error line must contain)
CASES: dict[str, tuple[Callable[[dict], list[str]], str]] = {
    # --- the command line and the config
    "misspelt key": (lambda w: [M1, "model.urii=models:/x/1"], "unknown config key 'model.urii'"),
    "misspelt config option": (lambda w: [M1, "probes=folderr"], "Could not find 'probes/folderr'"),
    "misspelt threshold key": (
        lambda w: [M1, "gate.context_gap.fial=0.2"],
        "unknown config key 'gate.context_gap.fial'",
    ),
    "override that does not parse": (
        lambda w: [M1, "gate.confidence=[0.9"],
        "cannot parse the override 'gate.confidence=[0.9'",
    ),
    "a method option where no key exists": (
        lambda w: [M1, "engine.method_options={gradcam: {layer: x}}"],
        "+engine.method_options.gradcam.layer=",
    ),
    "a folder key without probes=folder": (
        lambda w: [M1, "probes.path=probes/"],
        "choose it first, e.g. probes=folder probes.path=probes/",
    ),
    "a constructor argument of a model=mlflow": (
        lambda w: [M1, "model.target.num_classes=2"],
        "'target' is a key of model=state_dict",
    ),
    "timm: pretrained weights asked": (
        lambda w: [
            "model=timm",
            "model.name=resnet18",
            "model.num_classes=2",
            "model.path=w.pt",
            "model.pretrained=true",
            *_timm_probes(w),
        ],
        "the audit downloads nothing and audits the weights you give it",
    ),
    "timm: unknown model name": (
        lambda w: [
            "model=timm",
            "model.name=resnet181",
            "model.num_classes=2",
            "model.path=w.pt",
            *_timm_probes(w),
        ],
        "is not a model timm registers (closest: resnet18",
    ),
    "no model named": (lambda w: [], "model.uri is required"),
    "a string where a boolean belongs": (
        lambda w: [M1, "promote.tags='false'", *_probes(w)],
        "promote.tags must be true or false",
    ),
    "quiet=maybe": (lambda w: [M1, "quiet=maybe", *_probes(w)], "quiet must be true or false"),
    "unknown promotion policy": (
        lambda w: [M1, "promote.policy=sideways", *_probes(w)],
        "promote.policy must be one of",
    ),
    "tags only, yet revoke": (
        lambda w: [M1, "promote.policy=none", "promote.on_champion_fail=revoke", *_probes(w)],
        "promote.policy=none writes tags only",
    ),
    "unknown champion policy": (
        lambda w: [M1, "promote.on_champion_fail=drop", *_probes(w)],
        "promote.on_champion_fail must be one of",
    ),
    "reserved alias": (lambda w: [M1, "promote.alias=latest", *_probes(w)], "reserved by MLflow"),
    "threshold out of range": (
        lambda w: [M1, "gate.context_gap.fail=1.5", *_probes(w)],
        "gate.context_gap.fail=1.5 is out of range",
    ),
    "pass threshold above fail": (
        lambda w: [M1, "gate.context_gap.pass=0.2", *_probes(w)],
        "must be below gate.context_gap.fail",
    ),
    "unknown method": (
        lambda w: [M1, "engine.methods=[gradcam,nosuch]", *_probes(w)],
        "unknown method 'nosuch'",
    ),
    "unknown Grad-CAM layer": (
        lambda w: [M1, "+engine.method_options.gradcam.layer=nope", *_probes(w)],
        "nope",
    ),
    "batch size zero": (lambda w: [M1, "engine.max_batch=0", *_probes(w)], "engine.max_batch"),
    "synthetic probes, zero per group": (
        lambda w: [M1, "probes=synthetic", "probes.n_per_group=0"],
        "probes.n_per_group must be an integer >= 1",
    ),
    "synthetic probes, negative size": (
        lambda w: [M1, "probes=synthetic", "probes.size=-5"],
        "probes.size must be an integer >= 24",
    ),
    "synthetic probes, too small to draw": (
        lambda w: [M1, "probes=synthetic", "probes.size=8"],
        "probes.size must be an integer >= 24; got 8",
    ),
    "synthetic probes, 100 million per group": (
        lambda w: [M1, "probes=synthetic", "probes.n_per_group=100000000"],
        "probes.n_per_group must be an integer <= 65536",
    ),
    "synthetic probes, 100000 pixels wide": (
        lambda w: [M1, "probes=stamps", "probes.size=100000"],
        "probes.size must be an integer <= 4096",
    ),
    "synthetic probes, more pixels than a probe folder may hold": (
        lambda w: [M1, "probes=synthetic", "probes.n_per_group=65536"],
        "above the limit of 134217728 pixels",
    ),
    "deletion steps beyond their range": (
        lambda w: [M1, *_probes(w), "engine.steps=100000000"],
        "engine.steps must be an integer <= 1024",
    ),
    "run lease of zero": (
        lambda w: [M1, "tracking.run_lease_s=0", *_probes(w)],
        "tracking.run_lease_s must be a positive number",
    ),
    "run lease of a century": (
        lambda w: [M1, "tracking.run_lease_s=3153600000", *_probes(w)],
        "at most 604800 (a week)",
    ),
    "store scheme MLflow cannot open": (
        lambda w: [M1, "tracking.uri=ftp://x", *_probes(w)],
        "tracking.uri 'ftp://x' is not a store MLflow can open",
    ),
    "tracking server unreachable": (
        lambda w: [M1, "tracking.uri=http://127.0.0.1:9", *_probes(w)],
        "does not answer its health check",
    ),
    "store that does not exist": (
        lambda w: [M1, f"tracking.uri=sqlite:///{w['root']}/nothing.db", *_probes(w)],
        "does not exist",
    ),
    "reports folder is a file": (
        lambda w: [M1, f"paths.reports_dir={_reports_file(w)}", *_probes(w)],
        "is not writable",
    ),
    "output folder that cannot be made (read-only, or under a file)": (
        lambda w: [M1, f"paths.output_dir={_reports_file(w)}/outputs", *_probes(w)],
        "set paths.output_dir (or hydra.run.dir) to a writable folder; the audit did not start",
    ),
    # --- the model
    "unknown registered model": (
        lambda w: [f"model.uri=models:/{NAME}-nosuch/1", *_probes(w)],
        "no registered model 'toy-nosuch'",
    ),
    "unknown version": (lambda w: [f"model.uri=models:/{NAME}/7", *_probes(w)], "has no version 7"),
    "unknown alias": (
        lambda w: [f"model.uri=models:/{NAME}@nosuch", *_probes(w)],
        "has no alias 'nosuch'",
    ),
    "a stage instead of a version": (
        lambda w: [f"model.uri=models:/{NAME}/Production", *_probes(w)],
        "is not a number",
    ),
    "class outside the allow-list": (
        lambda w: [M1, *_probes(w), "model.allowed_targets=[audit.models.*]"],
        "is not in model.allowed_targets",
    ),
    "net.json that runs code (registry)": (
        lambda w: ["model.uri=models:/evil-touch/1", *_probes(w)],
        "'pathlib.Path.touch' is not in model.allowed_targets",
    ),
    "net.json with a nested payload": (
        lambda w: ["model.uri=models:/evil-nested/1", *_probes(w)],
        "num_classes._target_ is a Hydra special key",
    ),
    "checkpoint whose hyper-parameters run code": (
        lambda w: [
            "model=checkpoint",
            f"model.path={_checkpoint(w, _touch_payload(w))}",
            *_probes(w),
        ],
        "'pathlib.Path.touch' is not in model.allowed_targets",
    ),
    "checkpoint of another LightningModule": (
        lambda w: ["model=checkpoint", f"model.path={_foreign_checkpoint(w)}", *_probes(w)],
        "model.module=my_module.MyNet",
    ),
    "state_dict target that runs code": (
        lambda w: [
            "model=state_dict",
            f"model.path={_weights(w, GreyReader(), 'g')}",
            "model.target._target_=pathlib.Path.touch",
            *_probes(w),
        ],
        "'pathlib.Path.touch' is not in model.allowed_targets",
    ),
    "weights that do not fit the class": (
        lambda w: ["model=state_dict", f"model.path={_weights(w, GreyReader(), 'g')}", *_probes(w)],
        "do not fit the architecture",
    ),
    "allow-list given as a string": (
        lambda w: [M1, *_probes(w), "model.allowed_targets=audit.models.*"],
        "must be a list of glob patterns",
    ),
    "one normalization value for three channels": (
        lambda w: [M1, *_probes(w), "model.normalization={mean: [0.5], std: [0.25]}"],
        "need exactly 3 values",
    ),
    "net.json whose builder would download its backbone": (
        lambda w: [
            "model.uri=models:/lraspp/1",
            *_probes(w),
            "model.allowed_targets=[torchvision.models.*]",
        ],
        "defaults weights_backbone to MobileNet_V3_Large_Weights.IMAGENET1K_V1",
    ),
    "registry source outside its run (file:///etc)": (
        lambda w: ["model.uri=models:/etc/1", *_probes(w)],
        "the registered version's source 'file:///etc' is outside the artifacts of its run",
    ),
    "runs URI that climbs out with ..": (
        lambda w: [f"model.uri=runs:/{w['runs']['batch1']}/../../../../tmp/x", *_probes(w)],
        "has a '..' component",
    ),
    "model download above model.max_bytes": (
        lambda w: [M1, "model.max_bytes=10", *_probes(w)],
        "hold more than model.max_bytes=10 bytes",
    ),
    "a model with NaN logits": (lambda w: ["model.uri=models:/nan/1", *_probes(w)], "broken"),
    "a forward that fails on batches": (
        lambda w: [
            "model.uri=models:/batch1/1",
            *_probes(w),
            "model.allowed_targets=[test_bad_inputs.*]",
        ],
        "batch",
    ),
    # --- the probes
    "probe folder missing": (
        lambda w: [
            M1,
            "probes=folder",
            f"probes.path={w['root']}/nosuch",
            "model.allowed_targets=[_toy_models.*]",
        ],
        "does not exist",
    ),
    "classes do not match the outputs": (
        lambda w: [
            M1,
            "probes=folder",
            "model.allowed_targets=[_toy_models.*]",
            f"probes.path={_folder(w, 'three', _three_classes)}",
        ],
        "the model has 2 outputs",
    ),
    "image whose header claims 20000x20000": (
        lambda w: [
            M1,
            "probes=folder",
            "model.allowed_targets=[_toy_models.*]",
            f"probes.path={_folder(w, 'bomb', _huge_header_png)}",
        ],
        "decompression bomb",
    ),
    "image with transparent pixels": (
        lambda w: [
            M1,
            "probes=folder",
            "model.allowed_targets=[_toy_models.*]",
            f"probes.path={_folder(w, 'rgba', _transparent)}",
        ],
        "transparent pixels",
    ),
    "symlink out of the folder": (
        lambda w: [
            M1,
            "probes=folder",
            "model.allowed_targets=[_toy_models.*]",
            f"probes.path={_folder(w, 'link', _link_out)}",
        ],
        "leads outside the probe folder",
    ),
    "group name MLflow refuses": (
        lambda w: [
            M1,
            "probes=folder",
            "model.allowed_targets=[_toy_models.*]",
            f"probes.path={_folder(w, 'slash', lambda f: _manifest(f, 1, 'group', 'red|tag/'))}",
        ],
        "has the character '/'",
    ),
    "group of another class than its row": (
        lambda w: [
            M1,
            "probes=folder",
            "model.allowed_targets=[_toy_models.*]",
            f"probes.path={_folder(w, 'grouplabel', lambda f: _manifest(f, 1, 'group', 'blue|dark'))}",
        ],
        "but the row's label is 'red'",
    ),
    "pair joining two labels": (
        lambda w: [
            M1,
            "probes=folder",
            "model.allowed_targets=[_toy_models.*]",
            f"probes.path={_folder(w, 'pairlabel', lambda f: _manifest(f, 1, 'pair', '7'))}",
        ],
        "joins this row",
    ),
}

RESULTS: dict[str, tuple[int, str]] = {}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(world, case, monkeypatch):
    make_args, needle = CASES[case]
    monkeypatch.chdir(world["work"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    monkeypatch.syspath_prepend(str(TESTS))
    from audit.methods.registry import METHODS

    for name, fn in list(
        METHODS.items()
    ):  # explainers other test files register: not the product's
        if not fn.__module__.startswith("audit."):
            monkeypatch.delitem(METHODS, name)
    client = world["client"]
    names = [m.name for m in client.search_registered_models()]
    before = {n: state(client, n) for n in names}
    runs_before = len(all_runs(client))
    res = cli(make_args(world), world["work"])
    assert res.code == 2, res.out + res.err
    assert len(res.errors) == 1 and needle in res.errors[0], res.err
    assert "Traceback" not in res.err + res.out
    assert {n: state(client, n) for n in names} == before
    assert len(all_runs(client)) == runs_before
    reports = world["work"] / "reports"
    assert not reports.exists() or not [p for p in reports.iterdir() if not p.name.startswith(".")]
    assert not world["marker"].exists()
    RESULTS[case] = (res.code, _generic(res.errors[0][len("model-audit: error: ") :], world))


def _generic(message: str, world) -> str:
    """The message with what differs between runs replaced, for docs/errors.md: this machine's paths,
    MLflow run ids (32 hex digits) and Hydra's run-folder time stamps."""
    message = message.replace(str(world["root"]), "<dir>")
    message = re.sub(r"\b[0-9a-f]{32}\b", "<run_id>", message)
    message = re.sub(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", "<time>", message)
    return re.sub(r"/tmp/[^\s'\"]*", "<tmp>", message)


def _table() -> str:
    rows = ["| case | exit | message |", "|---|---|---|"]
    for case in CASES:
        code, message = RESULTS[case]
        text = message.replace("|", "\\|")
        rows.append(
            f"| {case} | {code} | `` {text} `` |"
            if "`" in text
            else f"| {case} | {code} | `{text}` |"
        )
    return "\n".join(rows)


def test_the_readme_table_is_generated_from_these_cases():
    if len(RESULTS) != len(CASES):
        pytest.skip("run the whole file: the table needs every case")
    readme = ERRORS_PAGE.read_text()
    assert START in readme and END in readme, f"docs/errors.md needs the markers {START} and {END}"
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    fresh = f"{head}{START}\n{_table()}\n{END}{tail}"
    if os.environ.get("MODEL_AUDIT_WRITE_TABLE"):
        ERRORS_PAGE.write_text(fresh)
        return
    assert readme == fresh, (
        "the bad-input table of docs/errors.md is stale: MODEL_AUDIT_WRITE_TABLE=1 pytest tests/gate/test_bad_inputs.py"
    )


def test_probe_set_constructor_refuses_a_pair_of_two_labels():
    with pytest.raises(ValueError, match="pair"):
        ProbeSet(
            images=torch.zeros(2, 3, 8, 8),
            labels=torch.tensor([0, 1]),
            class_names=["a", "b"],
            pairs=torch.tensor([0, 0]),
        )
