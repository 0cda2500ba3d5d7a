"""``make validate``: how well the gate detects a model that leans on the background.

Trains snow-wolf models at background correlations rho in {0.5, 0.75, 0.9, 0.97, 1.0},
three seeds each, with the real Hydra training config, and audits each with the gate's
default config on its default probe set (256 probes per group). ``--dataset stamps``
runs the second benchmark (the cue is a small stamp beside the shape);
``--n-per-group 24`` audits on small probe sets (24 pairs per class); ``--masks-only``
audits each model a second time on the same probes stripped to their masks (no groups,
no pairs: the gate builds its own counterfactuals), and requires the same outcome of
that audit too. ``--cache DIR`` keeps the trained weights, keyed by dataset, rho, seed
and overrides, so a re-run after a change to the gate audits without retraining.

Ground truth comes from a large balanced test set (2,000 images per group, drawn
apart from the probes): a model *leans* on the background when, for some class, its
accuracy in one context is more than 15 points below its accuracy in the other; it is
*clean* when every context gap is within 5 points; otherwise it is *between*. The
requirement: no false verdict (no leaning model PASSes, no clean model FAILs). How many
leaning models FAIL and clean ones PASS (the gate's power) is counted and printed, not
required: it depends on the probes (at 24 pairs per class a single pair that is right in
one context only already leaves a gap of 0.15 possible; ``python -m audit.engine.stats power``). The script prints one row per model, the confusion table and the bias score
(the gate's largest context gap, with its interval) against rho, and exits 0 only when
the requirement holds.

``python -m audit.training.validate --jobs 4 --device cuda`` trains several models at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

RHOS = (0.5, 0.75, 0.9, 0.97, 1.0)
SEEDS = (0, 1, 2)
TRUTH_PER_GROUP = 2000
TRUTH_SEED = 987_654
LEAN, CLEAN = 0.15, 0.05

__all__ = [
    "Row",
    "truth_of",
    "validate_one",
    "validate",
    "format_table",
    "meets_requirement",
    "main",
]


@dataclass
class Row:
    """One trained model: its ground truth and what the gate said."""

    rho: float
    seed: int
    true_gaps: dict[str, float]
    truth: str  # leans | clean | between
    verdict: str
    gate_gap: float
    gate_low: float
    gate_high: float
    accuracy: float
    train_s: float
    audit_s: float
    findings: list[str] = field(default_factory=list)
    dataset: str = "snow_wolf"
    n_per_group: int = 256
    masks_verdict: str | None = None  # the same model audited on the probes stripped to masks
    masks_findings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No false verdict in any view audited: a leaning model never PASSes, a clean one never FAILs."""
        verdicts = [v for v in (self.verdict, self.masks_verdict) if v is not None]
        false = {"leans": "PASS", "clean": "FAIL"}.get(self.truth)
        return false not in verdicts


def truth_of(gaps: dict[str, float]) -> str:
    """``leans`` if some class gap exceeds 0.15, ``clean`` if all are within 0.05, else ``between``."""
    worst = max(gaps.values())
    if worst > LEAN:
        return "leans"
    return "clean" if worst <= CLEAN else "between"


def validate_one(
    rho: float,
    seed: int,
    device: str = "auto",
    overrides: Sequence[str] = (),
    dataset: str = "snow_wolf",
    n_per_group: int = 256,
    masks_only: bool = False,
    cache: str | None = None,
) -> Row:
    """Train one model (or take it from ``cache``) and audit it (runs in a worker process)."""
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from audit.datasets import snow_wolf, stamps
    from audit.evidence.behaviour import context_gaps, group_accuracy, predict
    from audit.pipeline import run_audit
    from audit.probes import ProbeSet
    from audit.training.demo import compose_train
    from audit.training.train import train

    bench = {"snow_wolf": snow_wolf, "stamps": stamps}[dataset]
    data = ["data=stamps", "eval_probes.benchmark=stamps"] if dataset == "stamps" else []

    accel = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[device]
    # CUDA has no deterministic kernel for some backward passes (adaptive pooling): warn there
    determinism = "warn" if accel != "cpu" and torch.cuda.is_available() else "true"
    cfg = compose_train(
        [
            *data,
            f"data.correlation={rho}",
            f"seed={seed}",
            f"data.seed={1000 + seed}",
            "logger=none",
            "trainer.enable_progress_bar=false",
            f"trainer.accelerator={accel}",
            f"trainer.deterministic={determinism}",
            *overrides,
        ]
    )
    t0 = time.perf_counter()
    weights = _cache_file(cache, dataset, rho, seed, overrides)
    if weights is not None and weights.exists():
        from audit.training import build_net

        net = build_net(cfg.net)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        net.eval()
    else:
        net = train(cfg).module.net.eval()
        if weights is not None:
            weights.parent.mkdir(parents=True, exist_ok=True)
            torch.save(net.state_dict(), weights)
    train_s = time.perf_counter() - t0
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    net.to(dev)
    test = bench.probe_set(n_per_group=TRUTH_PER_GROUP, size=int(cfg.data.size), seed=TRUTH_SEED)
    accs = group_accuracy(test, predict(net, test.images, max_batch=512))
    gaps = {c: b.accuracy - w.accuracy for c, (w, b) in context_gaps(accs).items()}
    probes = bench.probe_set(n_per_group=n_per_group, size=int(cfg.data.size), seed=2024)
    engine = {"engine": {"device": "cuda" if dev.type == "cuda" else "cpu"}}
    t0 = time.perf_counter()
    result = run_audit(net, probes, engine)
    masks = None
    if masks_only:  # the same probes, stripped to images, labels and masks
        stripped = ProbeSet(probes.images, probes.labels, probes.class_names, masks=probes.masks)
        masks = run_audit(net, stripped, engine)
    audit_s = time.perf_counter() - t0
    worst_cls = max(gaps, key=gaps.get)
    m = result.metrics
    return Row(
        rho=rho,
        seed=seed,
        true_gaps=gaps,
        truth=truth_of(gaps),
        verdict=result.verdict,
        gate_gap=m.get("context_gap", float("nan")),
        gate_low=max(m.get(f"context_gap/{c}/low", float("nan")) for c in gaps),
        gate_high=max(m.get(f"context_gap/{c}/high", float("nan")) for c in gaps),
        accuracy=sum(a.correct for a in accs.values()) / sum(a.n for a in accs.values()),
        train_s=train_s,
        audit_s=audit_s,
        findings=[c.finding for c in result.checks if c.decisive][:2]
        or [f"worst class {worst_cls}"],
        dataset=dataset,
        n_per_group=n_per_group,
        masks_verdict=None if masks is None else masks.verdict,
        masks_findings=[] if masks is None else [c.finding for c in masks.checks if c.decisive][:2],
    )


def _cache_file(
    cache: str | None, dataset: str, rho: float, seed: int, overrides: Sequence[str]
) -> Path | None:
    """Where the weights of one trained model are kept (None: no cache)."""
    if not cache:
        return None
    import hashlib

    key = hashlib.sha256(json.dumps([dataset, rho, seed, list(overrides)]).encode()).hexdigest()[
        :12
    ]
    return Path(cache) / f"{dataset}-rho{rho}-seed{seed}-{key}.pt"


def validate(
    rhos: Sequence[float] = RHOS,
    seeds: Sequence[int] = SEEDS,
    jobs: int = 1,
    device: str = "auto",
    overrides: Sequence[str] = (),
    progress=print,
    dataset: str = "snow_wolf",
    n_per_group: int = 256,
    masks_only: bool = False,
    cache: str | None = None,
) -> list[Row]:
    """Train and audit every (rho, seed); rows in (rho, seed) order."""
    grid = [(r, s) for r in rhos for s in seeds]
    rows: list[Row] = []
    more = (dataset, n_per_group, masks_only, cache)
    if jobs <= 1:
        for r, s in grid:
            rows.append(validate_one(r, s, device, overrides, *more))
            progress(_row_line(rows[-1]))
        return rows
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // jobs)))
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {
            pool.submit(validate_one, r, s, device, tuple(overrides), *more): (r, s)
            for r, s in grid
        }
        for f in futures:
            rows.append(f.result())
            progress(_row_line(rows[-1]))
    return sorted(rows, key=lambda x: (x.rho, x.seed))


def _row_line(r: Row) -> str:
    gaps = " ".join(f"{c}={g:+.3f}" for c, g in r.true_gaps.items())
    return (
        f"rho={r.rho:<5} seed={r.seed}  true gaps {gaps}  -> {r.truth:<8} gate {r.verdict:<12} "
        f"gap {r.gate_gap:.3f} [{r.gate_low:.3f}, {r.gate_high:.3f}]  acc {r.accuracy:.3f}  "
        + (f"masks only {r.masks_verdict:<12} " if r.masks_verdict else "")
        + f"train {r.train_s:.0f}s audit {r.audit_s:.0f}s  {'ok' if r.ok else 'WRONG'}"
    )


def meets_requirement(rows: Sequence[Row]) -> bool:
    """No false verdict: no leaning model PASSes and no clean model FAILs (power is printed, not required)."""
    return all(r.ok for r in rows)


def format_table(rows: Sequence[Row]) -> str:
    """Per-model rows, the confusion table and the bias score against rho (Markdown)."""
    masks = any(r.masks_verdict for r in rows)
    names = list(rows[0].true_gaps) if rows else ["class 1", "class 2"]
    out = [
        f"| rho | seed | true gap {names[0]} | true gap {names[-1]} | truth | verdict | "
        + ("masks only | " if masks else "")
        + "gate gap [CI of the larger] | ok |",
        "|---|---|---|---|---|---|" + ("---|" if masks else "") + "---|---|",
    ]
    for r in rows:
        g = list(r.true_gaps.values())
        out.append(
            f"| {r.rho} | {r.seed} | {g[0]:+.3f} | {g[-1]:+.3f} | {r.truth} | {r.verdict} | "
            + (f"{r.masks_verdict} | " if masks else "")
            + f"{r.gate_gap:.3f} [{r.gate_low:.3f}, {r.gate_high:.3f}] | {'yes' if r.ok else 'NO'} |"
        )
    out += [
        "",
        "Confusion (rows: ground truth, columns: gate verdict)",
        "",
        "| truth | FAIL | INCONCLUSIVE | PASS |",
        "|---|---|---|---|",
    ]
    for t in ("leans", "between", "clean"):
        counts = [
            sum(1 for r in rows if r.truth == t and r.verdict == v)
            for v in ("FAIL", "INCONCLUSIVE", "PASS")
        ]
        out.append(f"| {t} | {counts[0]} | {counts[1]} | {counts[2]} |")
    out += [
        "",
        "Bias score against rho (mean over seeds)",
        "",
        "| rho | gate: largest context gap | ground truth: largest context gap | verdicts |",
        "|---|---|---|---|",
    ]
    for rho in sorted({r.rho for r in rows}):
        rs = [r for r in rows if r.rho == rho]
        gate = sum(r.gate_gap for r in rs) / len(rs)
        true = sum(max(r.true_gaps.values()) for r in rs) / len(rs)
        out.append(f"| {rho} | {gate:.3f} | {true:.3f} | {', '.join(r.verdict for r in rs)} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m audit.training.validate", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--rhos", type=float, nargs="+", default=list(RHOS))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--jobs", type=int, default=1, help="models trained at once (processes)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--dataset", choices=("snow_wolf", "stamps"), default="snow_wolf")
    ap.add_argument(
        "--n-per-group", type=int, default=256, help="probes per group (pairs per class)"
    )
    ap.add_argument(
        "--masks-only", action="store_true", help="also audit on the probes stripped to masks"
    )
    ap.add_argument(
        "--cache", default=None, help="folder that keeps the trained weights between runs"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument(
        "overrides", nargs="*", help="training config overrides, e.g. trainer.max_epochs=4"
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic training on CUDA
    t0 = time.perf_counter()
    print(
        f"validate: {len(args.rhos) * len(args.seeds)} {args.dataset} models (rho {args.rhos} x seeds "
        f"{args.seeds}), {args.n_per_group} probes per group{', also masks only' if args.masks_only else ''}, "
        f"{args.jobs} at a time, device {args.device}",
        flush=True,
    )
    rows = validate(
        args.rhos,
        args.seeds,
        args.jobs,
        args.device,
        args.overrides,
        progress=lambda s: print(s, flush=True),
        dataset=args.dataset,
        n_per_group=args.n_per_group,
        masks_only=args.masks_only,
        cache=args.cache,
    )
    print("\n" + format_table(rows))
    ok = meets_requirement(rows)
    clean, leans = [r for r in rows if r.truth == "clean"], [r for r in rows if r.truth == "leans"]
    masks = any(r.masks_verdict for r in rows)

    def power(rs: list[Row], want: str) -> str:
        out = f"{sum(r.verdict == want for r in rs)}/{len(rs)}"
        return out + (
            f" (masks only {sum(r.masks_verdict == want for r in rs)}/{len(rs)})" if masks else ""
        )

    print(
        f"\n{'OK' if ok else 'MISS'}: no false verdict ({sum(r.ok for r in rows)}/{len(rows)} models as required); "
        f"power: leaning models that FAIL {power(leans, 'FAIL')}, clean models that PASS {power(clean, 'PASS')}; "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
