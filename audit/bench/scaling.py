"""Throughput of the whole audit job against the number of processes (``engine.devices``).

What is timed: the real command line, ``python -m audit ...`` as a user runs it, on a
probe folder written here (the snow-wolf benchmark, with groups, pairs and masks, so
every stage of the default engine runs), a SmallCNN state dict, and a SQLite MLflow store
in a temporary folder. Per process count it prints

* the job's wall time, from the command to its exit (imports, the launch of the other
  ranks, loading, the audit, the MLflow run and the reports), and probes per second
  over it: what a release pipeline waits for;
* the audit's own time, ``seconds`` of ``report.json`` (rank zero's :func:`run_audit`:
  predictions, attribution, sanity, concept evidence and the verdict), and probes per
  second over that;
* the speed-up of each against one process, and whether ``report.json`` (every number
  but ``seconds`` and the launch keys of the config) equals the one-process report.

The rows are medians over ``--rounds`` rounds, the process counts interleaved inside a
round, so a load that comes and goes on the machine touches every count alike.

    .venv/bin/python -m audit.bench.scaling [--processes 1 2] [--per-group 256] [--size 64] [--rounds 1] [--threads T]

On a GPU machine pass ``--device cuda`` (one process per GPU); ``--model resnet50``
audits a torchvision ResNet-50 (random weights, 1000 classes re-headed to the probe
classes) instead of the SmallCNN.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "run_job", "same_report"]

#: config keys that say how the job was launched, not what it measured
LAUNCH_KEYS = ("devices", "strategy", "num_nodes", "workers")


def _model(kind: str, classes: int, folder: Path) -> list[str]:
    """Write the network's state dict; return the job's model overrides."""
    torch.manual_seed(0)
    if kind == "small_cnn":
        from audit.models import SmallCNN

        net = SmallCNN(num_classes=classes)
        target = [
            "model.target._target_=audit.models.SmallCNN",
            f"model.target.num_classes={classes}",
        ]
    elif kind == "resnet50":
        from torchvision.models import resnet50

        net = resnet50(num_classes=classes)
        target = [
            "model.target._target_=torchvision.models.resnet50",
            f"model.target.num_classes={classes}",
        ]
    else:
        raise SystemExit(f"--model must be small_cnn or resnet50; got {kind!r}")
    path = folder / f"{kind}.pt"
    torch.save(net.state_dict(), path)
    return ["model=state_dict", f"model.path={path}", f"model.name={kind}", *target]


def run_job(args: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """``python -m audit *args``: (wall seconds, exit code, output tail)."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "audit", *args], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - t0
    return wall, out.returncode, (out.stdout + out.stderr)[-3000:]


def _report(reports: Path) -> dict[str, Any]:
    found = sorted(reports.rglob("report.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no report.json under {reports}")
    return json.loads(found[-1].read_text())


def same_report(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal in everything but the times, the run id and the launch keys of ``config.engine``."""
    return not report_differences(a, b)


def report_differences(a: dict[str, Any], b: dict[str, Any], limit: int = 10) -> list[str]:
    """The first ``limit`` paths where two reports differ (times, run id and launch keys aside)."""

    def strip(r: dict[str, Any]) -> dict[str, Any]:
        r = json.loads(json.dumps(r))
        for k in ("seconds", "made_at", "mlflow_run_id"):
            r.pop(k, None)
        for block in r.get(
            "evidence", {}
        ).values():  # wall times kept with the evidence (dissection, TCAV)
            if isinstance(block, dict):
                block.pop("seconds", None)
        for k in LAUNCH_KEYS:
            r.get("config", {}).get("engine", {}).pop(k, None)
        return r

    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{path}.{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{path}[{i}]")
        elif x != y:
            out.append(f"{path}: {str(x)[:80]} != {str(y)[:80]}")

    walk(strip(a), strip(b), "")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m audit.bench.scaling", description=__doc__.splitlines()[0]
    )
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--per-group", type=int, default=256, help="probes per group (4 groups)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="small_cnn", choices=["small_cnn", "resnet50"])
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of every process (default: unset; Lightning gives each of N processes cores/N)",
    )
    p.add_argument(
        "--engine", nargs="*", default=[], help="extra engine overrides, e.g. engine.max_batch=64"
    )
    a = p.parse_args([] if argv is None else argv)  # `make bench` calls main() with the defaults
    from audit.datasets import snow_wolf

    with tempfile.TemporaryDirectory(prefix="audit-scaling-") as tmp:
        root = Path(tmp)
        probes = snow_wolf.probe_set(n_per_group=a.per_group, size=a.size, seed=2024)
        folder = probes.save(root / "probes")
        n = len(probes)
        del probes
        model = _model(a.model, 2, root)
        walls: dict[int, list[float]] = {k: [] for k in a.processes}
        audits: dict[int, list[float]] = {k: [] for k in a.processes}
        reports: dict[int, dict[str, Any]] = {}
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
        if a.threads is not None:
            env["OMP_NUM_THREADS"] = str(a.threads)
        threads = "unset" if a.threads is None else a.threads
        print(
            f"{n} probes of {a.size} px, {a.model}, device {a.device}; {os.cpu_count()} CPU cores here; "
            f"OMP_NUM_THREADS {threads}",
            flush=True,
        )
        for r in range(a.rounds):
            for k in a.processes:
                out = root / f"run-{k}-{r}"
                args = [
                    *model,
                    "probes=folder",
                    f"probes.path={folder}",
                    f"engine.device={a.device}",
                    f"engine.devices={k}",
                    f"engine.strategy={'ddp' if k > 1 else 'auto'}",
                    f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
                    f"paths.root_dir={out}",
                    "quiet=true",
                    *a.engine,
                ]
                out.mkdir()
                wall, code, tail = run_job(args, env)
                if code not in (0, 1):
                    print(f"{k} process(es): exit {code}\n{tail}", flush=True)
                    return 2
                rep = _report(out)
                reports.setdefault(k, rep)
                walls[k].append(wall)
                audits[k].append(float(rep["seconds"]))
                print(
                    f"  round {r}: {k} process(es): job {wall:.1f} s, audit {rep['seconds']:.1f} s, "
                    f"verdict {rep['verdict']}",
                    flush=True,
                )
        base = a.processes[0]
        w0, s0 = statistics.median(walls[base]), statistics.median(audits[base])
        print(
            f"\n| processes | job s | probes/s (job) | speed-up | audit s | probes/s (audit) | speed-up | report = {base} process |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for k in a.processes:
            w, s = statistics.median(walls[k]), statistics.median(audits[k])
            diff = report_differences(reports[base], reports[k])
            same = "yes" if not diff else "NO: " + "; ".join(diff[:3])
            print(
                f"| {k} | {w:.1f} | {n / w:.0f} | {w0 / w:.2f}x | {s:.1f} | {n / s:.0f} | {s0 / s:.2f}x | {same} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
