"""Every size bounded: each integer of the job's config has a range, stated in its YAML comment and
checked before any work; synthetic probes obey a probe folder's pixel limits before anything is drawn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from audit.datasets import snow_wolf, stamps
from audit.gate import options
from audit.gate.job import MAX_RUN_LEASE_S, audit_from_config, int_ranges
from audit.probes.probe_set import DEFAULT_MAX_PIXELS, DEFAULT_MAX_TOTAL_PIXELS, pixels_problem

ROOT = Path(__file__).resolve().parents[2]
LEASE = "tracking.run_lease_s"


def _composed(group: str, option: str) -> dict:
    with initialize_config_module(config_module=options.CONF_PACKAGE, version_base="1.3"):
        cfg = compose(options.CONFIG_NAME, overrides=[f"{group}={option}"])
    return OmegaConf.to_container(cfg, resolve=False)


def _integers(node: dict, prefix: str = "") -> list[str]:
    """The key paths of every integer leaf (booleans are not integers)."""
    out = []
    for k, v in node.items():
        if isinstance(v, dict):
            out += _integers(v, f"{prefix}{k}.")
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(f"{prefix}{k}")
    return out


CHOICES = [(g.name, o.name) for g in options.groups() for o in g.options]


@pytest.mark.parametrize(("group", "option"), CHOICES)
def test_every_integer_key_has_a_range_stated_in_its_comment(group, option):
    found = _integers(_composed(group, option))
    assert found, "the composed config has integer keys"
    documented = options.documented({group: option})
    ranges = int_ranges()
    for path in found:
        if path == LEASE:  # a number of seconds, not only integers
            assert f"(0..{MAX_RUN_LEASE_S}]" in documented[path].meaning
            continue
        assert path in ranges, f"{path} has no range in audit.gate.job.int_ranges()"
        low, high = ranges[path]
        assert f"[{low}..{high}]" in documented[path].meaning, (path, documented[path].meaning)


def _config(tmp_path: Path, path: str, value) -> dict:
    cfg = _composed("probes", "synthetic")
    cfg["model"]["uri"] = "models:/toy/1"
    cfg["tracking"]["uri"] = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cfg["paths"] = {
        "root_dir": str(tmp_path),
        "output_dir": str(tmp_path / "outputs"),
        "reports_dir": str(tmp_path / "reports"),
    }
    cfg.pop("hydra", None)
    node = cfg
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return cfg


def _keys() -> list[str]:
    return sorted({p for g, o in CHOICES for p in _integers(_composed(g, o))})


@pytest.mark.parametrize("path", _keys())
def test_every_integer_key_is_refused_above_its_range_before_any_work(path, tmp_path, monkeypatch):
    """The job refuses the value one above the range (a tenth above the lease) with one line naming the
    key, the value and the range; nothing is created: no store, no report, no folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    if path == LEASE:
        value, needle = MAX_RUN_LEASE_S * 1.1, f"at most {MAX_RUN_LEASE_S}"
    else:
        low, high = int_ranges()[path]
        value, needle = (
            high + 1,
            f"{path} must be an integer <= {high}; got {high + 1} (its range is {low}..{high}",
        )
    t0 = time.perf_counter()
    out = audit_from_config(_config(tmp_path, path, value))
    assert out.code == 2 and needle in (out.error or ""), out.error
    assert time.perf_counter() - t0 < 5.0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["store"]


def test_the_top_of_each_range_is_accepted(tmp_path, monkeypatch):
    """At its highest value, no engine key is refused: the job goes on to load the model (its store is empty)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    for path, (_low, high) in int_ranges().items():
        if not path.startswith("engine.") or path in ("engine.devices", "engine.num_nodes"):
            continue  # probes: next tests; several processes would be started before the model is loaded
        cfg = _config(tmp_path, path, high)
        cfg["probes"].update(n_per_group=2, size=24)
        out = audit_from_config(cfg)
        assert out.code == 2 and (out.error or "").startswith("the MLflow store "), (
            path,
            out.error,
        )  # the model's


@pytest.mark.parametrize("module", [snow_wolf, stamps], ids=["snow_wolf", "stamps"])
def test_benchmarks_refuse_more_pixels_than_a_probe_folder_before_drawing(module):
    for kwargs, needle in (
        ({"n_per_group": 10**8}, f"above the limit of {DEFAULT_MAX_TOTAL_PIXELS} pixels"),
        ({"size": 100_000}, f"above the limit of {DEFAULT_MAX_PIXELS} per image"),
    ):
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=needle):
            module.probe_set(**kwargs)
        assert time.perf_counter() - t0 < 1.0
    with pytest.raises(ValueError, match=f"above the limit of {DEFAULT_MAX_TOTAL_PIXELS} pixels"):
        module.generate(10**8)


def test_pixel_limits_are_inclusive():
    side = 64
    n = DEFAULT_MAX_TOTAL_PIXELS // (side * side)
    assert pixels_problem(n, side, side) is None
    assert "134217728 pixels" in pixels_problem(n + 1, side, side)
    assert pixels_problem(1, 4096, 4096) is None
    assert "per image" in pixels_problem(1, 4096, 4097)


CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import audit.gate.cli, audit.gate.job, audit.pipeline, audit.gate.registry, audit.gate.loading, audit.probes.probe_set, audit.datasets, audit.engine.distributed
    import audit.report.write, mlflow.tracking
    vm = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmSize:")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more, no more
    sys.argv = ["model-audit", "model.uri=models:/toy/1", *sys.argv[1:]]
    t0 = time.perf_counter()
    try:
        audit.gate.cli.main()
    except SystemExit as exc:
        print(json.dumps({"code": exc.code, "seconds": time.perf_counter() - t0}), file=sys.stderr)
    """
)


def test_a_huge_synthetic_probe_set_exits_2_in_seconds_without_growing_memory(tmp_path):
    """Through the real entry point in a child whose address space may grow by 1 GiB at most after its
    imports: before the fix, 100 million probes per group grew memory past 9 GB (here: the allocation
    fails and the job ends in an unexpected error); now it is refused before anything is drawn."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    args = [
        "probes.n_per_group=100000000",
        f"paths.root_dir={tmp_path}",
    ]  # the other sizes: test_bad_inputs
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    result = json.loads(lines[-1])
    errors = [ln for ln in lines if ln.startswith("model-audit: error:")]
    assert result["code"] == 2 and len(errors) == 1, proc.stderr
    assert "probes.n_per_group must be an integer <= 65536; got 100000000" in errors[0], errors[0]
    assert result["seconds"] < 5.0, result
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports").exists()
