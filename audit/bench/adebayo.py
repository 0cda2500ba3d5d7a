"""Adebayo et al. (2018), "Sanity Checks for Saliency Maps": cascading randomization, reproduced.

``python -m audit.bench.adebayo [--model shortcut.pt] [--seeds 0 1 2] [--methods ...]``

The paper randomizes a trained network's layers one after another from the logits
down and compares each explanation with the trained network's: maps that stay
similar while the weights are destroyed describe the input more than the model. Its
famous result: guided backpropagation (and Guided Grad-CAM's guided factor) barely
change, while plain gradients and Grad-CAM do.

Here: the demo's shortcut model (``SmallCNN``, trained with
``compose_train(["data.correlation=0.99", "logger=none"])``, the demo's config: 4000
snow-wolf images of 64 px, 8 epochs, seed 0; or a state dict given with ``--model``),
the probes of the demo's audit at 16 per group (``snow_wolf.probe_set(n_per_group=16,
size=64, seed=2024)``, 64 images) explained for their labels (as the gate's sanity filter does), and
:func:`audit.metrics.sanity.randomization_sanity` in ``cascade`` mode: one step per
module with parameters (``fc``, then each BatchNorm and conv, top down). The number
per step is the gate's similarity: the larger of the mean signed and the mean
absolute-value Spearman correlation with the trained model's maps (equal for the
non-negative maps). With several ``--seeds`` the table shows the mean over the
randomizations, and the spread (max - min) in the last column.

Not a ``make bench`` section: training the model takes minutes on a CPU, and the
cascade runs one explanation per layer and method.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from audit.datasets import snow_wolf
from audit.metrics.sanity import randomization_sanity
from audit.models import SmallCNN

__all__ = ["METHODS", "OPTIONS", "train_shortcut", "cascade", "table", "plot", "main"]

METHODS = (
    "saliency",
    "gradcam",
    "guided_backprop",
    "guided_gradcam",
    "deconvnet",
    "input_x_gradient",
    "integrated_gradients",
)
#: options per method (integrated gradients: 16 path points, to keep the run short)
OPTIONS: dict[str, dict[str, object]] = {"integrated_gradients": {"steps": 16}}
FIGURE = Path("docs/figures/adebayo.png")


def train_shortcut(overrides: Sequence[str] = ()) -> nn.Module:
    """The demo's shortcut model (background correlation 0.99), trained now; eval mode."""
    from audit.training.demo import compose_train
    from audit.training.train import train

    result = train(compose_train(["data.correlation=0.99", "logger=none", *overrides]))
    return result.module.net.eval()


def load(path: str | Path) -> nn.Module:
    """A ``SmallCNN(2)`` (default widths) from a state dict saved with ``torch.save``."""
    model = SmallCNN(num_classes=2)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def cascade(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    methods: Sequence[str] = METHODS,
    seeds: Sequence[int] = (0,),
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Similarity per cascade step for each method: ``(layers, {method: [seeds, steps]})``.

    The similarity is :attr:`RandomizationResult.similarity`'s rule applied per step:
    the larger of the mean signed and mean absolute-value Spearman correlation.
    """
    layers: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for m in methods:
        rows = []
        for seed in seeds:
            t0 = time.perf_counter()
            r = randomization_sanity(
                m, model, images, target, mode="cascade", seed=int(seed), **OPTIONS.get(m, {})
            )
            layers = r.layers
            rows.append(torch.tensor([max(a, b) for a, b in zip(r.mean, r.mean_abs, strict=True)]))
            print(f"  {m} (seed {seed}): {time.perf_counter() - t0:.1f} s", flush=True)
        out[m] = torch.stack(rows)
    return layers, out


def table(layers: Sequence[str], sims: dict[str, torch.Tensor]) -> str:
    """A markdown table: one row per method, one column per randomized layer (cumulative)."""
    multi = next(iter(sims.values())).shape[0] > 1
    head = ["method", *[f"→ {n}" for n in layers]] + (["spread"] if multi else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, s in sims.items():
        mean = s.mean(dim=0)
        cells = [m, *[f"{v:+.2f}" for v in mean.tolist()]]
        if multi:
            cells.append(f"{float((s.max(dim=0).values - s.min(dim=0).values).max()):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kind(model: nn.Module, name: str) -> str:
    m = model.get_submodule(name)
    return {"Conv2d": "conv", "BatchNorm2d": "BN", "Linear": "linear"}.get(
        type(m).__name__, type(m).__name__
    )


def plot(
    layers: Sequence[str], sims: dict[str, torch.Tensor], path: Path, limit: float, model: nn.Module
) -> None:
    """Line plot of similarity against the layers randomized so far (one line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    xs = list(range(len(layers) + 1))
    for m, s in sims.items():
        mean = [1.0, *s.mean(dim=0).tolist()]  # step 0: the trained model, identical maps
        style = "-" if m in ("guided_backprop", "guided_gradcam", "deconvnet") else "--"
        ax.plot(xs, mean, style, marker="o", markersize=3, label=m)
    ax.axhline(limit, color="grey", linewidth=0.8, linestyle=":")
    ax.text(
        len(layers),
        limit + 0.02,
        f"gate threshold {limit:.2f}",
        ha="right",
        fontsize=8,
        color="grey",
    )
    names = [f"{n} ({_kind(model, n)})" for n in layers]
    ax.set_xticks(xs, ["trained", *names], rotation=35, ha="right", fontsize=8)
    ax.set_xlabel("layers randomized, cumulatively from the logits down")
    ax.set_ylabel("Spearman similarity to the trained model's maps")
    ax.set_ylim(-0.4, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower left")
    ax.set_title("Cascading randomization, snow-wolf shortcut SmallCNN", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Train (or load) the model, run the cascade, print the table, write the figure."""
    p = argparse.ArgumentParser(
        prog="python -m audit.bench.adebayo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", help="state dict of the demo's SmallCNN(2); default: train it now")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of the random weights")
    p.add_argument("--per-group", type=int, default=16, help="probes per group (4 groups)")
    p.add_argument("--out", type=Path, default=FIGURE, help="the PNG to write")
    args = p.parse_args(argv)

    from audit.pipeline import default_config

    limit = float(default_config()["gate"]["sanity"]["max_similarity"])
    t0 = time.perf_counter()
    model = load(args.model) if args.model else train_shortcut()
    print(
        f"model: {'loaded ' + args.model if args.model else 'trained'} ({time.perf_counter() - t0:.0f} s)"
    )
    probes = snow_wolf.probe_set(n_per_group=args.per_group, size=64, seed=2024)
    with torch.no_grad():
        acc = float((model(probes.images).argmax(dim=1) == probes.labels).float().mean())
    print(
        f"probes: {len(probes)} snow-wolf images of 64 px (seed 2024), accuracy {acc:.3f}; "
        f"targets: the labels; seeds {args.seeds}"
    )
    layers, sims = cascade(model, probes.images, probes.labels, args.methods, args.seeds)
    print()
    print(table(layers, sims))
    plot(layers, sims, args.out, limit, model)
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
