"""The `model-audit` command line: --help, --version, `serve`, a user's own module, quiet, `make clean`.

Everything is real: the installed console script (subprocesses) or ``audit.gate.cli.main``
in this process with Hydra composing ``conf/audit.yaml``; Lightning writes the
checkpoint; a real ``mlflow server`` prints (or not) its run links.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from _jobkit import cli

from audit.gate.job import EXIT_BLOCKED, EXIT_ERROR, EXIT_PASS
from audit.gate.loading import ModelLoadError, load_model
from audit.models import SmallCNN

ROOT = Path(__file__).resolve().parents[2]
MODEL_AUDIT = str(Path(sys.executable).parent / "model-audit")
SMALL = [
    "probes.n_per_group=32",
    "probes.size=32",
    "engine.methods=[gradcam]",
    "engine.attribution_probes=16",
    "engine.sanity_probes=0",
    "engine.steps=4",
]


def _audit_groups() -> dict[str, tuple[str, list[str]]]:
    """group -> (default, options), read from the files here (independently of audit.gate.options)."""
    listed = yaml.safe_load((ROOT / "conf" / "audit.yaml").read_text())["defaults"]
    out = {}
    for item in listed:
        if isinstance(item, dict):
            ((group, default),) = item.items()
            out[group] = (default, sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")))
    return out


def _env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    return {
        **env,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        **extra,
    }


def _run(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MODEL_AUDIT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# ----------------------------------------------------------------- --help, --version, serve
def test_help_shows_the_audit_groups_exit_codes_and_where_the_keys_are(tmp_path):
    proc = _run(["--help"], tmp_path, _env(tmp_path))
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "powered by Hydra" not in out and "Could not override" not in out + proc.stderr
    assert re.search(r"^model-audit: audit an image classifier", out), out[:300]
    assert "Usage:" in out
    groups = _audit_groups()
    section = out.split("Config groups", 1)[1].split("\nKeys:", 1)[0]
    listed = re.findall(r"^  (\w+) +(.+)$", section, re.M)
    assert [g for g, _ in listed] == list(groups), section
    for group, options in listed:
        default, files = groups[group]
        assert options.split(", ") == [o + ("*" if o == default else "") for o in files], (
            group,
            options,
        )
    # conf/ also holds the training's groups: none of them is offered to the audit
    training = {
        p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and not p.name.startswith("_")
    } - set(groups)
    assert training >= {"callbacks", "data", "logger", "module", "net", "trainer"}
    for group in training:
        assert not re.search(rf"^\s+{group}\b", section, re.M), group
    for code, meaning in (
        (EXIT_PASS, "PASS"),
        (EXIT_BLOCKED, "FAIL or INCONCLUSIVE"),
        (EXIT_ERROR, "error"),
    ):
        assert re.search(rf"^  {code}  {meaning}\b", out, re.M), (code, meaning)
    for needle in (
        "model-audit --cfg job",
        "model-audit <group>=<option> --cfg job",
        "model-audit serve --help",
        "docs/options.md",
        "drops the YAML comments",
    ):
        assert needle in out, needle
    hydra = _run(["--hydra-help"], tmp_path, _env(tmp_path))
    assert hydra.returncode == 0 and re.match(r"Hydra \(\d", hydra.stdout), hydra.stdout[:200]


def test_the_keys_of_another_option_are_listed_as_help_says(tmp_path):
    """`model-audit <group>=<option> --cfg job` (what --help suggests) prints that option's keys."""
    shown = cli(
        ["--cfg", "job", "model=checkpoint"], tmp_path
    )  # cli() appends an override: flags first
    assert shown.code == 0, shown.err
    assert yaml.safe_load(shown.out)["model"]["module"] == "audit.training.Classifier"


def test_version_is_the_installed_distribution(tmp_path):
    proc = _run(["--version"], tmp_path, _env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"model-audit {importlib.metadata.version('model-audit')}\n"
    assert "Hydra" not in proc.stdout


def test_serve_dispatches_to_audit_serve(tmp_path):
    got = cli(
        ["serve", "--help"], tmp_path
    )  # cli appends paths.root_dir=...: serve sees it as an override
    if importlib.util.find_spec("audit.gate.serve") is None:
        assert got.code == EXIT_ERROR and "no module audit.gate.serve" in got.err
        return
    assert got.code == 0, got.err
    assert "model-audit serve" in got.out and "Config groups" not in got.out


# ----------------------------------------------------------------- a user's own module
MY_MODULE = '''
"""A user's own LightningModule, beside their files (not installed, not on PYTHONPATH)."""
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

Path(__file__).with_name("imported.flag").touch()  # importing this module runs code


class ShapeNet(pl.LightningModule):
    def __init__(self, num_classes: int = 2, width: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Backdoor(nn.Module):
    """A module-level class that nothing allowed: naming it must import nothing."""

    def __init__(self):
        super().__init__()
        Path(__file__).with_name("backdoor.flag").touch()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))
'''


def _trained_checkpoint(folder: Path) -> Path:
    """``my_module.py`` in ``folder`` and ``shapes.ckpt`` written by a Lightning Trainer (2 steps of SGD)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    (folder / "my_module.py").write_text(MY_MODULE)
    name = f"my_module_{uuid.uuid4().hex[:8]}"  # a private name in this process; the CLI imports my_module
    spec = importlib.util.spec_from_file_location(name, folder / "my_module.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        torch.manual_seed(0)
        data = TensorDataset(torch.rand(16, 3, 32, 32), torch.randint(0, 2, (16,)))
        trainer = pl.Trainer(
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            default_root_dir=folder,
        )
        trainer.fit(mod.ShapeNet(num_classes=2, width=8), DataLoader(data, batch_size=8))
        trainer.save_checkpoint(folder / "shapes.ckpt")
    finally:
        sys.modules.pop(name, None)
    (folder / "imported.flag").unlink()
    return folder / "shapes.ckpt"


@pytest.mark.slow
def test_model_module_from_the_working_directory(tmp_path):
    """`model.module=my_module.ShapeNet` with my_module.py in the working directory, no PYTHONPATH:
    found as `python -m` would; a class of it that is not allowed is refused before any import."""
    ckpt = _trained_checkpoint(tmp_path)
    env = _env(tmp_path)
    refused = _run(
        [
            "model=state_dict",
            f"model.path={tmp_path / 'none.pt'}",
            "model.target._target_=my_module.Backdoor",
            *SMALL,
            f"paths.root_dir={tmp_path}",
        ],
        tmp_path,
        env,
    )
    assert refused.returncode == EXIT_ERROR, refused.stdout + refused.stderr
    assert "'my_module.Backdoor' is not in model.allowed_targets" in refused.stderr
    assert (
        "model.allowed_targets=[audit.models.*,torchvision.models.*,my_module.*]" in refused.stderr
    )
    assert not (tmp_path / "imported.flag").exists() and not (tmp_path / "backdoor.flag").exists()

    proc = _run(
        [
            "model=checkpoint",
            f"model.path={ckpt}",
            "model.module=my_module.ShapeNet",
            "model.name=shapes",
            *SMALL,
            f"paths.root_dir={tmp_path}",
        ],
        tmp_path,
        env,
    )
    assert proc.returncode in (EXIT_PASS, EXIT_BLOCKED), (
        proc.stdout + proc.stderr
    )  # a verdict, not an error
    assert re.search(r"^shapes: (PASS|FAIL|INCONCLUSIVE)$", proc.stdout, re.M), proc.stdout
    assert (tmp_path / "reports" / "shapes" / "report.html").is_file()
    assert (tmp_path / "imported.flag").exists() and not (tmp_path / "backdoor.flag").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lost = _run(
        [
            "model=checkpoint",
            f"model.path={ckpt}",
            "model.module=my_module.ShapeNet",
            *SMALL,
            f"paths.root_dir={elsewhere}",
        ],
        elsewhere,
        {**env, "PYTHONPATH": str(elsewhere / "lib")},
    )
    assert lost.returncode == EXIT_ERROR, lost.stdout + lost.stderr
    line = lost.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "model-audit: error: model.module 'my_module.ShapeNet' cannot be imported"
    ), line
    for needle in (
        "my_module.py",
        f"working directory {elsewhere} ",
        f"PYTHONPATH ({elsewhere / 'lib'})",
        "PYTHONPATH=/path/to/folder",
        "model.allowed_targets=[audit.models.*,torchvision.models.*,my_module.*]",
    ):
        assert needle in line, needle


def test_a_target_in_the_working_directory_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    """In this process: the working directory is on sys.path only while the allowed path is imported."""
    name = f"cwdnets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MY_MODULE)
    torch.manual_seed(0)
    torch.save(SmallCNN().state_dict(), tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    before = list(sys.path)
    src = {
        "kind": "state_dict",
        "path": str(tmp_path / "w.pt"),
        "target": {"_target_": f"{name}.Backdoor"},
    }
    try:
        with pytest.raises(
            ModelLoadError, match=rf"'{name}\.Backdoor' is not in model\.allowed_targets"
        ):
            load_model(src)
        assert name not in sys.modules and not (tmp_path / "imported.flag").exists()
        with pytest.raises(
            ModelLoadError, match=r"do not fit the architecture"
        ):  # imported, built, wrong weights
            load_model({**src, "allowed_targets": [f"{name}.*"]})
        assert (
            sys.modules[name].__file__ == str(tmp_path / f"{name}.py")
            and (tmp_path / "backdoor.flag").exists()
        )
        assert sys.path == before
        with pytest.raises(
            ModelLoadError,
            match=rf"{name} \({re.escape(str(tmp_path))}/{name}\.py\) has no attribute 'Nope'",
        ):
            load_model(
                {**src, "target": {"_target_": f"{name}.Nope"}, "allowed_targets": [f"{name}.*"]}
            )
    finally:
        sys.modules.pop(name, None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    with pytest.raises(ModelLoadError) as err:
        load_model(
            {"kind": "checkpoint", "path": str(tmp_path / "w.pt"), "module": f"{name}.ShapeNet"}
        )
    message = str(err.value)
    for needle in (
        f"model.module '{name}.ShapeNet' cannot be imported",
        f"looked for {name}.py and {name}/__init__.py",
        f"working directory {elsewhere} ",
        "PYTHONPATH (/nowhere)",
        "PYTHONPATH=/path/to/folder",
        f"model.allowed_targets=[audit.models.*,torchvision.models.*,{name}.*]",
    ):
        assert needle in message, (needle, message)
    assert name not in sys.modules and sys.path == before


# ----------------------------------------------------------------- quiet
@pytest.mark.slow
def test_quiet_hides_mlflow_run_links(tmp_path):
    """Against a real `mlflow server`, MLflow prints "View run ... at: ..." when the run ends;
    quiet=true prints the verdict line only."""
    from _mlflow_server import MlflowServer

    torch.manual_seed(0)
    torch.save(SmallCNN().state_dict(), tmp_path / "w.pt")
    server = MlflowServer(tmp_path)
    server.start()
    try:
        env = _env(tmp_path)
        args = [
            "model=state_dict",
            f"model.path={tmp_path / 'w.pt'}",
            "model.name=q",
            f"tracking.uri={server.uri}",
            *SMALL,
            f"paths.root_dir={tmp_path}",
        ]
        loud = _run(args, tmp_path, env)
        quiet = _run([*args, "quiet=true"], tmp_path, env)
    finally:
        server.stop()
    assert loud.returncode in (EXIT_PASS, EXIT_BLOCKED), loud.stdout + loud.stderr
    assert (
        "View run" in loud.stdout and "View experiment at:" in loud.stdout
    )  # what quiet must hide
    assert quiet.returncode == loud.returncode, quiet.stdout + quiet.stderr
    assert re.fullmatch(r"q: (PASS|FAIL|INCONCLUSIVE)\n", quiet.stdout), quiet.stdout


# ----------------------------------------------------------------- make clean
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_removes_runs_and_reports_but_the_reports_readme(tmp_path):
    """The Makefile's own clean target, run in a scratch folder (VENV points there too)."""
    for path in (
        "mlruns/0/meta.yaml",
        "reports/README.md",
        "reports/m-1/report.html",
        "outputs/x",
        "venv/bin/python",
        "mlflow.db",
        "keep.txt",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    subprocess.run(
        ["make", "-s", "-C", str(tmp_path), "-f", str(ROOT / "Makefile"), "clean", "VENV=venv"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["keep.txt", "reports", "reports/README.md"], left
