"""`model-audit` from a wheel installed outside the repository: the configs ship inside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from audit.models import SmallCNN

ROOT = Path(__file__).resolve().parents[2]


def test_model_audit_runs_from_a_wheel_outside_the_repository(tmp_path):
    dist, site, work = tmp_path / "dist", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(dist), str(ROOT)], check=True, timeout=600
    )
    wheel = next(dist.glob("model_audit-*.whl"))
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    assert (site / "audit" / "conf" / "audit.yaml").is_file()
    assert (site / "audit" / "conf" / "gate" / "default.yaml").is_file()
    assert (site / "audit" / "callbacks" / "__init__.py").is_file()
    assert (site / "audit" / "report" / "templates" / "report.html.j2").is_file()
    # one namespace: `audit` is the only package the wheel installs
    packages = {
        p.name
        for p in site.iterdir()
        if p.is_dir() and not p.name.endswith(".dist-info") and p.name != "bin"
    }
    assert packages == {"audit"}, packages

    torch.manual_seed(0)
    torch.save(SmallCNN().state_dict(), work / "weights.pt")
    # dependencies come from this environment; `audit` must come from the wheel, not the checkout
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
    }
    where = subprocess.run(
        [sys.executable, "-c", "import audit.gate.job, audit.conf; print(audit.conf.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout
    # a user's own callbacks module beside their script neither shadows nor is shadowed by ours
    (work / "callbacks.py").write_text("MINE = True\n")
    both = subprocess.run(
        [
            sys.executable,
            "-c",
            "import callbacks, audit.callbacks as a; "
            "print(callbacks.MINE, a.AttributionCallback.__module__)",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert both.stdout.split() == ["True", "audit.callbacks.attribution"], both.stdout + both.stderr
    (work / "callbacks.py").unlink()
    proc = subprocess.run(
        [
            str(site / "bin" / "model-audit"),
            "model=state_dict",
            f"model.path={work / 'weights.pt'}",
            "model.name=wheel-check",
            "probes.n_per_group=32",
            "probes.size=32",
            "engine.methods=[gradcam]",
            "engine.attribution_probes=16",
            "engine.sanity_probes=0",
            "engine.steps=4",
            f"paths.root_dir={work}",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1), out  # a verdict, not an error
    assert "wheel-check: " in proc.stdout
    assert (work / "reports" / "wheel-check" / "report.html").is_file()
