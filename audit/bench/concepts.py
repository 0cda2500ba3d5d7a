"""Concept evidence on the demo's two snow-wolf models: TCAV (and network dissection when present).

Models: the demo's SmallCNNs, trained with the real Hydra config (``conf/train.yaml``,
8 epochs on 4,000 images of 64 px) at background correlation 0.99 (the shortcut) and
0.5 (clean); from ``--models DIR`` (state dicts ``shortcut.pt`` and ``clean.pt``), else
trained once and cached under ``--cache`` (:func:`audit.bench.faithfulness.model`).
Probes: the audit job's default probe set (256 per group, 64 px, seed 2024).

:func:`tcav_figures` prints, per model and seed of the probe split, the TCAV table the
audit reports (:func:`audit.evidence.concepts.summary` at the gate's default confidence, engine
defaults otherwise) and, per model, the context gap on the probes and the share of
counterfactual pairs whose wolf-minus-husky margin rises from grass to snow (what the
model does when only the background changes), to read TCAV's answer against.

    .venv/bin/python -m audit.bench.concepts [--models DIR] [--seeds 0,1,2,3,4]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["demo_models", "demo_probes", "tcav_figures", "dissection_figures", "main"]


def demo_models(
    models: str | os.PathLike | None = None, cache: str | os.PathLike | None = None
) -> dict[str, torch.nn.Module]:
    """``{"shortcut": net, "clean": net}`` (eval mode): state dicts from ``models``, else trained (cached)."""
    if models is not None:
        from audit.models import SmallCNN

        out = {}
        for name in ("shortcut", "clean"):
            net = SmallCNN(num_classes=2)
            net.load_state_dict(torch.load(Path(models) / f"{name}.pt", weights_only=True))
            out[name] = net.eval()
        return out
    from audit.bench import faithfulness

    kw = {} if cache is None else {"cache": cache}
    return {
        name: faithfulness.model("snow_wolf", rho, epochs=8, **kw)
        for name, rho in (("shortcut", 0.99), ("clean", 0.5))
    }


def demo_probes():
    """The audit job's default snow-wolf probe set (256 per group, 64 px, seed 2024)."""
    from audit.datasets import snow_wolf

    return snow_wolf.probe_set(n_per_group=256, size=64, seed=2024)


def _behaviour(net: torch.nn.Module, probes) -> str:
    with torch.no_grad():
        logits = net(probes.images)
    right = logits.argmax(1) == probes.labels
    acc = {
        name: float(right[probes.groups == g].float().mean())
        for g, name in enumerate(probes.group_names)
    }
    gaps = []
    for cls in probes.class_names:
        mine = [a for name, a in acc.items() if name.split("|", 1)[0] == cls]
        gaps.append(f"{cls} {max(mine) - min(mine):.3f}")
    margin = (
        logits[:, probes.class_names.index("wolf")] - logits[:, probes.class_names.index("husky")]
    )
    snow = [probes.group_names[int(g)].endswith("|snow") for g in probes.groups]
    by_pair: dict[int, dict[bool, float]] = {}
    for i, pair in enumerate(probes.pairs.tolist()):
        by_pair.setdefault(pair, {})[snow[i]] = float(margin[i])
    moves = torch.tensor([p[True] - p[False] for p in by_pair.values() if len(p) == 2])
    return (
        f"context gap {', '.join(gaps)}; wolf-minus-husky margin, snow minus grass on the same animal: "
        f"mean {float(moves.mean()):+.2f}, up in {float((moves > 0).float().mean()):.2f} of {len(moves)} pairs"
    )


def tcav_figures(
    models: Mapping[str, torch.nn.Module] | None = None,
    probes=None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    engine: Mapping | None = None,
) -> dict[str, list[list[dict]]]:
    """Print the TCAV table of each model for each seed of the probe split; returns the rows."""
    from audit.config import merge_config
    from audit.evidence.concepts import summary, tcav_raw

    models = demo_models() if models is None else models
    probes = demo_probes() if probes is None else probes
    cfg = merge_config({"engine": dict(engine or {})})
    base, confidence = cfg["engine"], float(cfg["gate"]["confidence"])
    out: dict[str, list[list[dict]]] = {}
    opts = base["tcav"]
    print(
        f"TCAV: {opts['examples']} images per concept, {opts['random_concepts']} random concepts, "
        f"at most {opts['probes']} scored probes per class; Bonferroni at {confidence:.0%}"
    )
    print(
        "| model | seed | class | concept | score | random | p (Bonferroni) | significant | logit shift (random sd) | s |"
    )
    print("|---|---:|---|---|---:|---:|---:|---|---:|---:|")
    for name, net in models.items():
        out[name] = []
        for seed in seeds:
            block = tcav_raw(net, probes, dict(base, seed=int(seed)))
            if "error" in block:
                print(f"| {name} | {seed} | error: {block['error']} |")
                continue
            rows = summary(block, confidence)
            out[name].append(rows)
            for r in rows:
                print(
                    f"| {name} | {seed} | {r['class']} | {r['concept']} | {r['score']:.2f} \u00b1 {r['score_sd']:.2f} | "
                    f"{r['random']:.2f} \u00b1 {r['random_sd']:.2f} | {r['p_adjusted']:.2g} | "
                    f"{'yes' if r['significant'] else 'no'} | {r['shift']:+.2f} ({r['random_shift_sd']:.2f}) | "
                    f"{block['seconds']:.1f} |"
                )
    for name, net in models.items():
        print(f"{name}: {_behaviour(net, probes)}")
    return out


def dissection_figures(
    models: Mapping[str, torch.nn.Module] | None = None,
    probes=None,
    engine: Mapping | None = None,
    sizes: Sequence[int | None] = (256, None),
) -> dict[str, list[dict]]:
    """Print what network dissection finds in each model (:func:`audit.evidence.dissection.dissection_raw`).

    Per model and probe count (``sizes``: the audit's default cap of 256 probes spread over
    the groups, and None for every probe): the layer, the context units (best concept a
    named context with IoU above the threshold) by context, the share of each class's
    logit they carry, the most context-aligned unit, the completeness error of the
    contributions (0: exact) and the seconds. Returns the raw blocks.
    """
    from audit.config import merge_config
    from audit.evidence.dissection import dissection_raw
    from audit.rules import dissection as rules

    models = demo_models() if models is None else models
    probes = demo_probes() if probes is None else probes
    base = merge_config({"engine": dict(engine or {})})["engine"]
    opts = base["dissection"]
    print(
        f"network dissection: top {opts['quantile']:g} of each unit's upsampled activations, context units with "
        f"best context IoU > {opts['iou_threshold']:g}"
    )
    print(
        "| model | probes | layer | context units | by context | share of the class logits | best context IoU (unit) "
        "| completeness error | s |"
    )
    print("|---|---:|---|---:|---|---|---|---:|---:|")
    out: dict[str, list[dict]] = {}
    for name, net in models.items():
        out[name] = []
        for size in sizes:
            n = len(probes) if size is None else int(size)
            block = dissection_raw(net, probes, dict(base, dissection=dict(opts, probes=n)))
            out[name].append(block)
            if "error" in block:
                print(f"| {name} | {n} | error: {block['error']} |")
                continue
            units = rules.context_units(block)
            rows = {r["unit"]: r for r in rules.rows(block)}
            kinds: dict[str, int] = {}
            for u in units:
                kinds[rows[u]["concept"]] = kinds.get(rows[u]["concept"], 0) + 1
            shares = ", ".join(f"{c} {v:.1%}" for c, v in rules.carried(block, units).items())
            best = max(
                range(int(block["units"])),
                key=lambda u: max(v[u] for v in block["iou_contexts"].values()),
            )
            top = max(v[best] for v in block["iou_contexts"].values())
            print(
                f"| {name} | {block['probes']} | {block['layer']} | {len(units)} of {block['units']} | "
                f"{', '.join(f'{k} {v}' for k, v in sorted(kinds.items())) or '-'} | {shares} | {top:.2f} ({best}) | "
                f"{block['completeness_error']:.1e} | {block['seconds']:.1f} |"
            )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--models", default=None, help="folder with shortcut.pt and clean.pt (SmallCNN state dicts)"
    )
    parser.add_argument(
        "--cache", default=None, help="where trained models are cached (when --models is not given)"
    )
    parser.add_argument(
        "--seeds", default="0,1,2,3,4", help="seeds of the probe split (engine.seed)"
    )
    args = parser.parse_args(argv)
    models = demo_models(args.models, args.cache)
    probes = demo_probes()
    seeds = [int(s) for s in args.seeds.split(",")]
    sections = [globals().get("dissection_figures"), tcav_figures]
    for fn in sections:
        if fn is None:
            continue
        print(f"\n=== concepts: {fn.__name__} ===", flush=True)
        if fn is tcav_figures:
            fn(models, probes, seeds)
        else:
            fn(models, probes)


if __name__ == "__main__":
    main()
