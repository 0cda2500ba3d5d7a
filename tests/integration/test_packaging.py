"""The wheel ships every config group, so Hydra finds them outside the repository."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_group_is_packaged():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    groups = {
        p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and not p.name.startswith("_")
    }
    packaged = {p.split(".", 2)[2] for p in meta["packages"] if p.startswith("audit.conf.")}
    assert groups == packaged, f"add {sorted(groups - packaged)} to [tool.setuptools] packages"
    assert all(meta["package-data"][f"audit.conf.{g}"] == ["*.yaml"] for g in groups)
