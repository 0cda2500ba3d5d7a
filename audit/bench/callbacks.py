"""Overhead of the audit callbacks on the benchmark's training run (target: at most +10 %).

The run is the command a user types, each in a fresh process:
``python -m audit.training.train data.correlation=0.99 trainer.enable_progress_bar=false``
(SmallCNN, 4000 images of 64x64, 8 epochs, the default MLflow logger) without callbacks
and with ``callbacks=default`` (attribution: Grad-CAM, input x gradient and LRP on 16
fixed probes per pass and all 32 for the final weights, deletion and LeRF curves,
relevance mass; the spurious-feature series; activation maximization), alternately.
By default the callbacks spend a budget (``max_overhead: 0.1``): they audit the first
epoch and the final weights, and between them as often as 10% of the training time
allows. Both runs log to a temporary SQLite store created before the timing starts.
Wall times are the whole process's (imports, data generation, the callbacks' probe
sets, fit, the final evaluation); the ratio is with / without, the median of the
rounds. The table lists each callback's passes and the epochs they audited, read
back from the MLflow run, and the callbacks' measured share of the training time
(``audit/overhead/total``).

Both arms run with the same glibc ``malloc`` settings, fixed (``--malloc fixed``, the
default): ``MALLOC_MMAP_THRESHOLD_=32 MiB`` and a trim threshold of 16 GiB. Left to
glibc's dynamic threshold, a process lands in one of two regimes set by its early
history: the training's tensors come from the heap (about 100 page faults an epoch),
or they are mapped and page-faulted at every batch (about 800,000 an epoch, batches
about a third slower). Either arm lands in either regime; measured on this benchmark, a
run without callbacks as often as one with them. That swings a single ratio by 0.3
and says nothing about the callbacks, so the bench takes it out of both arms and
prints each process's page faults. ``--malloc default`` runs without the fix.

``python -m audit.bench.callbacks [--rounds R] [override ...]``, e.g.
``python -m audit.bench.callbacks net=resnet18_small`` or
``python -m audit.bench.callbacks callbacks.attribution.every_n_epochs=1`` (a fixed cadence).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import NamedTuple

TARGET_RATIO = 1.10
BASE = ["data.correlation=0.99", "trainer.enable_progress_bar=false"]
#: a callback's line per pass, printed by audit.callbacks (see AuditCallback._audit)
_PASS = re.compile(r"\b(\w+Callback): epoch (\d+) audited in ([\d.]+) s")
#: the fixed glibc malloc settings (see the module docstring): heap, not mmap, up to 32 MiB; no trimming
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}
_SHARE = re.compile(r"audit callbacks (\d+)% of training so far")

__all__ = ["main", "run"]


class _Process(NamedTuple):
    """One ``python -m audit.training.train`` process, measured."""

    seconds: float  # wall time
    cpu: float  # CPU seconds, user + system
    faults: int  # minor page faults
    passes: dict[str, list[tuple[int, float]]]  # each callback's passes: (epoch, seconds)
    out: str  # stdout + stderr


def _fit(overrides: Sequence[str], workdir: str, env: dict[str, str]) -> _Process:
    """Run one ``python -m audit.training.train`` process and measure it."""
    cmd = [
        sys.executable,
        "-m",
        "audit.training.train",
        *overrides,
        f"hydra.run.dir={workdir}/hydra",
        "hydra.output_subdir=null",
    ]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    passes: dict[str, list[tuple[int, float]]] = {}
    for name, epoch, sec in _PASS.findall(out):
        passes.setdefault(name, []).append((int(epoch), float(sec)))
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return _Process(seconds, cpu, r1.ru_minflt - r0.ru_minflt, passes, out)


def _overhead(out: str) -> float | None:
    """The callbacks' last reported share of the training time (the final pass's line)."""
    shares = _SHARE.findall(out)
    return int(shares[-1]) / 100 if shares else None


def run(rounds: int = 1, extra: Sequence[str] = (), *, malloc: str = "fixed") -> dict[str, object]:
    """Alternate fresh processes without and with the callbacks; returns the times and the median ratio."""
    without, with_, ratios, cpu_ratios, passes, shares = [], [], [], [], {}, []
    with tempfile.TemporaryDirectory(prefix="bench-callbacks-") as tmp:
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "PYTHONUNBUFFERED": "1",
        }
        if malloc == "fixed":
            env.update(FIXED_MALLOC)
        # create the store first: its tables are not a cost of either run
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from audit.gate.tracking import client; client().search_experiments()",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        for r in range(rounds):
            order = [False, True] if r % 2 == 0 else [True, False]
            times, cpu = {}, {}
            for on in order:
                # overrides of the callbacks group apply to the run with callbacks only
                common = [o for o in extra if not o.startswith("callbacks")]
                mine = [o for o in extra if o.startswith("callbacks")]
                overrides = [*BASE, *common, *(["callbacks=default", *mine] if on else [])]
                proc = _fit(overrides, tmp, env)
                times[on], cpu[on] = proc.seconds, proc.cpu
                if on:
                    for k, p in proc.passes.items():
                        passes.setdefault(k, []).append(p)
                    shares.append(_overhead(proc.out))
                print(
                    f"  round {r + 1}: {'with   ' if on else 'without'} callbacks {proc.seconds:7.1f} s "
                    f"({proc.faults:,} page faults)",
                    flush=True,
                )
            without.append(times[False])
            with_.append(times[True])
            ratios.append(times[True] / times[False])
            cpu_ratios.append(cpu[True] / cpu[False])
    return {
        "without": without,
        "with": with_,
        "ratios": ratios,
        "ratio": statistics.median(ratios),
        "cpu_ratios": cpu_ratios,
        "passes": passes,
        "shares": shares,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m audit.bench.callbacks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="with/without pairs (default 3, ~5 min each)"
    )
    parser.add_argument(
        "--malloc",
        choices=["fixed", "default"],
        default="fixed",
        help="glibc malloc settings of both arms: fixed (default; see the module docstring) or glibc's own",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra Hydra overrides, e.g. trainer.max_epochs=2 (callbacks.* ones: the run with callbacks only)",
    )
    args = parser.parse_args([] if argv is None else list(argv))
    print(
        f"python -m audit.training.train {' '.join(BASE + args.overrides)} [callbacks=default], a fresh process each"
    )
    if args.malloc == "fixed":
        print("both arms with " + " ".join(f"{k}={v}" for k, v in FIXED_MALLOC.items()))
    res = run(args.rounds, args.overrides, malloc=args.malloc)
    print(f"{'callback':<34} {'passes':>6} {'mean s':>8} {'total s':>8}  epochs audited, per round")
    for name, rounds in res["passes"].items():
        secs = [sec for r in rounds for _, sec in r]
        if secs:
            epochs = " | ".join(",".join(str(e) for e, _ in r) for r in rounds)
            print(
                f"{name:<34} {len(secs):6d} {statistics.mean(secs):8.2f} {sum(secs):8.1f}  {epochs}"
            )
    shares = ", ".join("?" if s is None else f"{s:.0%}" for s in res["shares"])
    print(f"callbacks' share of the training time, per round (audit/overhead/total): {shares}")
    print(f"wall-time ratio per round: {', '.join(f'{r:.3f}' for r in res['ratios'])}")
    # CPU seconds do not count time the machine gave to others: steadier on a shared one
    print(
        f"CPU-time ratio per round (user + system): {', '.join(f'{r:.3f}' for r in res['cpu_ratios'])}; "
        f"median {statistics.median(res['cpu_ratios']):.3f}"
    )
    med_without, med_with = statistics.median(res["without"]), statistics.median(res["with"])
    status = "PASS" if res["ratio"] <= TARGET_RATIO else "MISS"
    print(f"{'what':<34} {'without':>8} {'with':>8} {'ratio':>7} {'target':>7}  result")
    print(
        f"{'train 8 epochs + callbacks=default':<34} {med_without:8.1f} {med_with:8.1f} "
        f"{res['ratio']:7.3f} {'<= 1.10':>7}  {status}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
