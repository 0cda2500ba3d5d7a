"""The audit job over several processes: ``engine.devices=2 engine.strategy=ddp`` through Lightning Fabric.

The two-process tests run the real CLI (``python -m audit``) in a subprocess; Lightning's
own launcher starts the second rank (gloo on CPU), and both write to a real SQLite
MLflow store. Equality with one process holds when every process runs with the same
torch thread count (audit/engine/distributed.py: the mask shares of Grad-CAM and LRP differ in
the last bits between 1 and 2 threads on this project's SmallCNN); both runs here use
``OMP_NUM_THREADS=1``, as tests/gate/test_job.py does, and Lightning leaves a set
``OMP_NUM_THREADS`` alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _jobkit import ALLOW, all_runs, cli, colour_folder, registry, state
from mlflow.tracking import MlflowClient

from audit.engine.distributed import block_rows, blocks, rows_of

TESTS = Path(__file__).resolve().parents[1]
# 96 colour-square probes (4 groups of 24, masks, pairs) in 6 blocks of 16: behaviour, attribution,
# sanity, TCAV and dissection all run
ENGINE = [
    "engine.attribution_probes=32",
    "engine.sanity_probes=4",
    "engine.steps=8",
    "engine.max_batch=16",
    "engine.device=cpu",
]
TWO = ["engine.devices=2", "engine.strategy=ddp"]


# ----------------------------------------------------------------------------- the blocks
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 96, 100])
@pytest.mark.parametrize("size", [1, 16, 128])
def test_every_row_is_in_exactly_one_rank_and_the_blocks_do_not_depend_on_the_world(n, size):
    reference = blocks(n, size)
    assert [r for b in reference for r in b] == list(
        range(n)
    )  # consecutive, in order, each row once
    assert all(len(b) == size for b in reference[:-1]) and all(
        0 < len(b) <= size for b in reference
    )
    for world in (1, 2, 3, 5):
        shares = [block_rows(n, size, rank, world) for rank in range(world)]
        # the same blocks, whatever the world size; only their owner changes (block k: rank k mod world)
        assert sorted((b for s in shares for b in s), key=lambda b: b.start) == reference
        for rank, share in enumerate(shares):
            assert all(reference.index(b) % world == rank for b in share)
        rows = sorted(int(r) for s in shares for r in rows_of(s))
        assert rows == list(range(n))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_callbacks_shard_rows_with_the_engines_sharding_and_gather_alone_in_one_process(world):
    """callbacks' shard is block_rows with blocks of one row: every row on exactly one rank, ranks interleaved."""
    from types import SimpleNamespace

    from audit.callbacks._base import shard
    from audit.engine.distributed import all_gather

    for n in (0, 1, 7, 10):
        mine = [shard(n, SimpleNamespace(global_rank=r, world_size=world)) for r in range(world)]
        assert mine == [rows_of(block_rows(n, 1, r, world)).tolist() for r in range(world)]
        assert sorted(i for rows in mine for i in rows) == list(range(n))
        assert mine[0][:2] == list(range(0, n, world))[:2]
    assert all_gather({"rows": [1]}, world) == [
        {"rows": [1]}
    ]  # no process group here: this rank's alone


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank must lie in 0..1"):
        block_rows(10, 4, 2, 2)


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("engine.devices=0", "engine.devices must be an integer >= 1; got 0"),
        ("engine.devices=two", "engine.devices must be an integer >= 1; got 'two'"),
        ("engine.num_nodes=0", "engine.num_nodes must be an integer >= 1; got 0"),
        ("engine.strategy=fsdp", "engine.strategy must be auto or ddp"),
    ],
)
def test_bad_distributed_keys_exit_2_with_one_line(override, message, tracking_uri, tmp_path):
    res = cli(["model.uri=models:/toy/1", override], tmp_path)
    assert res.code == 2, res.err
    assert len(res.errors) == 1 and message in res.errors[0], res.err


def test_a_multirun_with_several_processes_is_refused_before_anything_starts(
    tracking_uri, tmp_path
):
    res = cli(["-m", "model.uri=models:/toy/1,models:/toy/2", *TWO, "engine.device=cpu"], tmp_path)
    assert res.code == 2, res.err
    assert len(res.errors) == 2, res.err  # one line per candidate, no process started
    assert all("does not combine with a multirun (-m)" in e for e in res.errors), res.err
    assert "summary" in res.out


# ----------------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """'toy' v1 (reads the colour: PASS) and v2 in a SQLite registry, and the colour probe folder."""
    folder = tmp_path_factory.mktemp("dist-registry")
    registry(folder / "store")
    colour_folder(folder, 24)
    return folder


def _store(template: Path, where: Path) -> tuple[str, MlflowClient]:
    shutil.copytree(template / "store", where / "store")
    uri = f"sqlite:///{where / 'store' / 'mlflow.db'}"
    return uri, MlflowClient(uri)


def _run(args: list[str], workdir: Path, uri: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": str(TESTS),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("LOCAL_RANK", None)
    return subprocess.run(
        [sys.executable, "-m", "audit", *args, ALLOW, *ENGINE, f"paths.root_dir={workdir}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def _comparable(report: dict) -> dict:
    """A report without what may differ between runs: times, the run id, and the process keys."""
    out = json.loads(json.dumps(report))
    for key in ("seconds", "made_at", "mlflow_run_id"):
        out.pop(key, None)
    for key in ("devices", "strategy", "num_nodes"):
        out["config"]["engine"].pop(key, None)
    for block in out["evidence"].values():  # wall times kept with the evidence (dissection, TCAV)
        if isinstance(block, dict):
            block.pop("seconds", None)
    return out


def _audit_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("model-audit-gate")
    return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_two_processes_give_the_report_of_one(template, tmp_path):
    """Same registered model and probes: the 2-process report.json equals the 1-process one, number for number."""
    probes = [
        "probes=folder",
        f"probes.path={template / 'colour-probes-24'}",
        "model.uri=models:/toy/1",
    ]
    reports = {}
    for name, extra in (("one", []), ("two", TWO)):
        work = tmp_path / name
        work.mkdir()
        uri, client = _store(template, work)
        proc = _run([*probes, *extra], work, uri)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert out.count("toy v1: PASS") == 1 and out.count("loading models:/toy/1") == 1, (
            out
        )  # rank 1 is silent
        if extra:
            assert (
                "2 processes (Lightning DDP, gloo)" in out
                and "6 blocks of 16 over 2 processes" in out
            ), out
        runs = _audit_runs(client)
        assert [(r.info.status, r.data.tags.get("audit.verdict")) for r in runs] == [
            ("FINISHED", "PASS")
        ], out
        reg = state(client)
        assert reg["aliases"] == {"champion": "1"}
        assert reg["versions"]["1"]["audit.run_id"] == runs[0].info.run_id
        assert len(reg["versions"]["1"]["audit.history"].splitlines()) == 1  # the gate wrote once
        written = sorted(
            p.name for p in (work / "reports").iterdir()
        )  # toy-1 -> .toy-1.v<stamp>: one report set
        assert len(written) == 2 and written[1] == "toy-1", written
        reports[name] = json.loads((work / "reports" / "toy-1" / "report.json").read_text())
    one, two = reports["one"], reports["two"]
    assert two["config"]["engine"]["devices"] == 2 and one["config"]["engine"]["devices"] == 1
    assert set(one["evidence"]) >= {"behaviour", "methods", "tcav", "dissection"}
    assert "sanity_spearman" in one["evidence"]["methods"]["gradcam"]
    assert _comparable(two) == _comparable(one)


def _truncate_after_header(png: Path) -> None:
    """Keep the first half: the header (size, mode) reads, so ProbeSet.open accepts it; the pixels do not decode."""
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_one_rank_failing_ends_the_job_with_exit_2_and_no_registry_write(template, tmp_path):
    """A file only rank 1 reads is truncated after a valid header: exit 2, one line naming it, nothing written."""
    from audit.engine.rows import pick_rows
    from audit.probes import ProbeSet

    if not hasattr(ProbeSet, "open"):
        pytest.skip("streamed probe folders (ProbeSet.open) have not landed")
    folder = tmp_path / "probes"
    shutil.copytree(template / "colour-probes-24", folder)
    opened = ProbeSet.open(folder)
    explained = set(pick_rows(len(opened), 32, opened.groups))
    rank1 = [int(r) for r in rows_of(block_rows(len(opened), 16, 1, 2)) if int(r) not in explained]
    assert (
        int(rows_of(block_rows(len(opened), 16, 0, 2))[0]) == 0
    )  # rank 0 checks the model on row 0
    victim = rank1[0]
    rel = opened.entries[victim].rel
    _truncate_after_header(folder / rel)
    work = tmp_path / "work"
    work.mkdir()
    uri, client = _store(template, work)
    before = state(client)
    proc = _run(
        ["probes=folder", f"probes.path={folder}", "model.uri=models:/toy/1", *TWO], work, uri
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, out
    line = errors[0]
    assert line.startswith("model-audit: error: rank 1 of 2 failed: bad probe set:"), line
    assert Path(rel).name in line and "nothing was logged, tagged or promoted" in line, line
    assert state(client) == before  # no tag, no alias
    assert (
        _audit_runs(client) == []
    )  # the run is created only after the gather: none, so none RUNNING
    assert not (work / "reports").exists() or not list((work / "reports").iterdir())
    assert all(r.info.status == "FINISHED" for r in all_runs(client))
