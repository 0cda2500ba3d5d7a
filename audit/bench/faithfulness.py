"""Which faithfulness criterion lets the gate use a method whose evidence is diffuse?

Models: the four benchmark models of the gate's tests, trained with the real Hydra
config (``conf/train.yaml``): snow-wolf and stamps, each at background/stamp
correlation 0.99 (the shortcut) and 0.5 (clean). Trained once and cached as state
dicts under ``--cache`` (default ``/tmp/model-audit-faithfulness``).

Probes: the audit job's default probe set of each benchmark (256 per group, 64x64,
seed 2024), the 256 rows the audit explains (``pick_rows``), the true class.

Per model and method:

* ``old adv``: the old criterion on the old baseline (blur, 16 steps): deletion AUC of
  a random ordering minus the method's (paired over probes, one random ranking per
  probe), needed above 0.02 (interval's low end);
* ``SRG blur``: ``AUC(LeRF) - AUC(MoRF)`` on the blur baseline (same curves);
* ``SRG gate``: the SRG as the real :func:`audit.pipeline.run_audit` with the default
  config measures and judges it (``engine.baseline``, ``gate.faithfulness.min_gain``),
  and whether the method counts (faithfulness and sanity filters), and the verdict.

Means with their 95% normal intervals over the probes.

    .venv/bin/python -m audit.bench.faithfulness [--epochs 3] [--cache DIR] [--rows 256]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from audit.engine.rows import pick_rows
from audit.evidence.attribution import RANDOM, collect
from audit.rules.base import mean_ci

__all__ = ["MODELS", "main", "model", "probes"]

#: (benchmark, correlation) of the four models
MODELS = (("snow_wolf", 0.99), ("snow_wolf", 0.5), ("stamps", 0.99), ("stamps", 0.5))
DEFAULT_CACHE = "/tmp/model-audit-faithfulness"


def _overrides(bench: str, rho: float, epochs: int) -> list[str]:
    out = [
        f"data.correlation={rho}",
        f"trainer.max_epochs={epochs}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    if bench == "stamps":
        out += ["data=stamps", "eval_probes.benchmark=stamps"]
    return out


def model(
    bench: str, rho: float, epochs: int = 3, cache: str | os.PathLike = DEFAULT_CACHE
) -> torch.nn.Module:
    """The trained network (eval mode), from the cache or trained now and cached."""
    from audit.training import build_net
    from audit.training.demo import compose_train

    cfg = compose_train(_overrides(bench, rho, epochs))
    path = Path(cache) / f"{bench}_rho{rho}_e{epochs}.pt"
    if path.exists():
        from omegaconf import OmegaConf

        net = build_net(OmegaConf.to_container(cfg.net, resolve=True))
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    from audit.training.train import train

    net = train(cfg).module.net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net


def probes(bench: str, n_per_group: int = 256, size: int = 64, seed: int = 2024):
    """The audit job's default probe set of a benchmark (``conf/probes/synthetic.yaml``)."""
    import importlib

    return importlib.import_module(f"audit.datasets.{bench}").probe_set(
        n_per_group=n_per_group, size=size, seed=seed
    )


def _ci(values: list[float], conf: float = 0.95) -> str:
    mean, lo, hi, _ = mean_ci(values, conf)
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def measure(
    net: torch.nn.Module, ps, rows: int = 256, baseline: str = "blur"
) -> dict[str, dict[str, list[float]]]:
    """Per method: per-probe ``adv`` (random's deletion AUC minus the method's) and ``srg`` on ``baseline``."""
    sub = ps.subset(pick_rows(len(ps), rows, ps.groups))
    ev = collect(
        net,
        sub,
        metrics=("deletion", "lerf", "random_reference"),
        steps=16,
        baseline=baseline,
        max_batch=128,
    ).cpu()
    rand = ev.scores[RANDOM]["deletion"]
    return {
        m: {
            "adv": (rand - ev.scores[m]["deletion"]).tolist(),
            "srg": (ev.scores[m]["lerf"] - ev.scores[m]["deletion"]).tolist(),
        }
        for m in [*ev.methods, RANDOM]
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument(
        "--rows", type=int, default=256, help="probes explained (the audit's attribution_probes)"
    )
    args = ap.parse_args(argv)
    from audit.pipeline import run_audit

    print(
        "| model | method | old adv, blur (need > 0.02) | SRG blur | SRG gate (need > min_gain) | counted |"
    )
    print("|---|---|---|---|---|---|")
    for bench, rho in MODELS:
        t0 = time.perf_counter()
        net = model(bench, rho, args.epochs, args.cache)
        ps = probes(bench)
        nums = measure(net, ps, args.rows)
        res = run_audit(net, ps, {"engine": {"attribution_probes": args.rows}})
        used = next(c.numbers["used"] for c in res.checks if c.name == "methods")
        for m, v in nums.items():
            gate, why = "-", []
            for c in res.checks:
                if c.name == f"faithfulness/{m}" and "srg" in c.numbers:
                    n = c.numbers
                    gate = f"{n['srg']:+.3f} [{n['low']:+.3f}, {n['high']:+.3f}]"
                if c.name in (f"faithfulness/{m}", f"sanity/{m}") and not c.numbers.get(
                    "used", True
                ):
                    why.append(c.kind)
            counted = "yes" if m in used else ("no: " + ", ".join(why) if why else "-")
            print(
                f"| {bench} rho {rho} | {m} | {_ci(v['adv'])} | {_ci(v['srg'])} | {gate} | {counted} |",
                flush=True,
            )
        print(
            f"| {bench} rho {rho} | verdict {res.verdict} ({time.perf_counter() - t0:.0f} s) | | | | |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
