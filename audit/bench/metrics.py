"""Speed of :func:`audit.metrics.deletion_curve` against its floor and against Quantus.

Work: a torchvision ResNet-18 with random weights (eval mode), ``N`` images, a random
pixel ranking (float64 scores, so no ties), ``steps = 16``, zero baseline, the
model's predicted class as target.

Rows, each timed over several rounds (the order inside a round rotates; the
machine is shared and noisy, so every ratio is the median of per-round ratios):

* floor: the ``N * (steps + 1)`` forward passes alone, on perturbed images built
  beforehand, in batches of ``max_batch`` (what ``deletion_curve`` runs), no_grad.
* ours: ``deletion_curve`` (ranking, perturbation, forward, softmax, AUC).
  Target: at most 1.1x the floor.
* Quantus 0.6 ``PixelFlipping`` (when ``quantus`` is importable) on the same work:
  ``steps`` flips of ``C * H * W / steps`` values, zero baseline, softmax, no
  normalisation. Its ``features_in_step`` is checked against ``H * W`` while it flips
  ``C * H * W`` channel values, which rejects 16 steps of whole RGB pixels; so
  Quantus sees each image as one channel ``[N, 1, C * H, W]`` (a free view) with the
  pixel score repeated over the channel blocks, and a wrapper model views it back as
  ``[N, C, H, W]``: the same pixels are flipped, in the same order, with the same
  forward passes (``N * steps``: Quantus does not evaluate the unperturbed image).
  The speed target (ours >= 30x faster) applies on CUDA only; on CPU both are bound
  by the same forward passes and the ratio is printed as information.

Agreement: Quantus' curve point ``j`` is our point ``j + 1``. The definitions of the
area differ: ours is the trapezoid over ``steps + 1`` points at ``x = k / steps``
(:mod:`audit.metrics.faithfulness`), Quantus' ``calculate_auc`` the trapezoid over its ``steps`` points with
``dx = 1``. We compare the curves, and our AUC with our area computed from
Quantus' curve with the unperturbed probability prepended.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from audit.metrics import curve_auc, deletion_curve
from audit.metrics.faithfulness import DEFAULT_MAX_BATCH

__all__ = ["main", "run", "BenchConfig"]

TARGET_FLOOR_RATIO = 1.1
TARGET_QUANTUS_SPEEDUP_CUDA = 30.0


@dataclass(frozen=True)
class BenchConfig:
    """What one bench run measures."""

    device: str
    n: int
    size: int
    steps: int = 16
    rounds: int = 5
    max_batch: int = DEFAULT_MAX_BATCH


def default_config() -> BenchConfig:
    """224 px and 16 images on CUDA; 96 px and 8 images on CPU (the whole run stays under ~2 minutes)."""
    if torch.cuda.is_available():
        return BenchConfig(device="cuda", n=16, size=224)
    return BenchConfig(device="cpu", n=8, size=96)


class _RowsAsChannels(nn.Module):
    """Takes ``[N, 1, C * H, W]`` (channel blocks stacked vertically) and runs ``model`` on ``[N, C, H, W]``."""

    def __init__(self, model: nn.Module, channels: int) -> None:
        super().__init__()
        self.model = model
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, ch, w = x.shape
        return self.model(x.reshape(n, self.channels, ch // self.channels, w))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _perturbed(x: torch.Tensor, scores: torch.Tensor, steps: int) -> torch.Tensor:
    """All deletion inputs ``[N * (steps + 1), C, H, W]`` (zero baseline), built once for the floor."""
    n, c, h, w = x.shape
    hw = h * w
    order = scores.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(hw, device=x.device).expand(n, hw)
    )
    thresholds = (torch.arange(steps + 1, device=x.device) * hw) // steps
    gone = (rank[:, None, :] < thresholds[None, :, None]).view(n, steps + 1, 1, h, w)
    return torch.where(gone, 0.0, x[:, None]).flatten(0, 1)


def _floor(model: nn.Module, batches: torch.Tensor, max_batch: int) -> None:
    with torch.no_grad():
        for s in range(0, batches.shape[0], max_batch):
            model(batches[s : s + max_batch])


def _quantus_metric(steps: int, channels: int, hw: int) -> Callable[..., list[list[float]]]:
    import quantus

    return quantus.PixelFlipping(
        features_in_step=channels * hw // steps,
        perturb_baseline=0.0,
        normalise=False,
        abs=False,
        return_auc_per_sample=False,
        disable_warnings=True,
        display_progressbar=False,
    )


def run(config: BenchConfig | None = None) -> dict[str, object]:
    """Measure; returns the per-round times, the median ratios and the agreement numbers."""
    cfg = config or default_config()
    dev = cfg.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval().to(dev)
        x = torch.rand(cfg.n, 3, cfg.size, cfg.size, device=dev)
        scores = torch.rand(cfg.n, 1, cfg.size, cfg.size, dtype=torch.float64, device=dev)
    n, c, h, w = x.shape
    if (h * w) % cfg.steps:
        raise ValueError(f"bench needs H * W divisible by steps; got {h}x{w} and {cfg.steps}")
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    batches = _perturbed(x, scores, cfg.steps)

    try:
        metric = _quantus_metric(cfg.steps, c, h * w)
    except ImportError:
        metric = None
    quantus_model = _RowsAsChannels(model, c).eval()
    xq = x.reshape(n, 1, c * h, w).cpu().numpy()
    aq = scores.repeat(1, 1, c, 1).cpu().numpy()
    yq = target.cpu().numpy()

    def ours() -> tuple[torch.Tensor, torch.Tensor]:
        return deletion_curve(model, x, target, scores, steps=cfg.steps, max_batch=cfg.max_batch)

    def floor() -> None:
        _floor(model, batches, cfg.max_batch)

    def quantus_curves() -> list[list[float]]:
        return metric(
            model=quantus_model,
            x_batch=xq,
            y_batch=yq,
            a_batch=aq,
            channel_first=True,
            softmax=True,
            device=dev,
            batch_size=max(cfg.n, 1),
        )

    jobs: list[tuple[str, Callable[[], object]]] = [("floor", floor), ("ours", ours)]
    if metric is not None:
        jobs.append(("quantus", quantus_curves))
    _floor(model, batches[: cfg.max_batch], cfg.max_batch)  # warm-up
    load_start = _load()
    times: dict[str, list[float]] = {name: [] for name, _ in jobs}
    outputs: dict[str, object] = {}
    for r in range(cfg.rounds):
        k = r % len(jobs)
        for name, fn in jobs[k:] + jobs[:k]:
            t, out = _timed(fn, dev)
            times[name].append(t)
            outputs[name] = out

    result: dict[str, object] = {"config": cfg, "times": times, "load": load_start}
    result["load_end"] = _load()
    result["ours_over_floor"] = [o / f for o, f in zip(times["ours"], times["floor"], strict=True)]
    curves, auc = outputs["ours"]
    if metric is not None:
        result["quantus_over_ours"] = [
            q / o for q, o in zip(times["quantus"], times["ours"], strict=True)
        ]
        q = torch.tensor(outputs["quantus"], dtype=torch.float64)
        ours_c = curves.double().cpu()
        result["max_curve_diff"] = float((q - ours_c[:, 1:]).abs().max())
        q_auc = curve_auc(torch.cat([ours_c[:, :1], q], dim=1))
        result["max_auc_diff"] = float((q_auc - auc.double().cpu()).abs().max())
        result["curve_range"] = (float(ours_c.min()), float(ours_c.max()))
    return result


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def _ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}x [{min(values):.2f}-{max(values):.2f}]"


def _table(res: dict[str, object]) -> str:
    cfg: BenchConfig = res["config"]  # type: ignore[assignment]
    times: dict[str, list[float]] = res["times"]  # type: ignore[assignment]
    med = {k: statistics.median(v) for k, v in times.items()}
    where = f"cpu, {torch.get_num_threads()} threads" if cfg.device == "cpu" else cfg.device
    if res["load"] is not None:
        where += (
            f", load average {res['load']:.1f} -> {res['load_end']:.1f} on {os.cpu_count()} cores"
        )
    floor_row = f"floor: {cfg.n * (cfg.steps + 1)} forwards, batch {cfg.max_batch}"
    lines = [
        f"metrics bench: deletion curve, ResNet-18 (random weights, eval), N={cfg.n} images "
        f"3x{cfg.size}x{cfg.size}, steps={cfg.steps}, zero baseline, max_batch={cfg.max_batch}",
        f"{where}; {cfg.rounds} rounds; ratio = median of per-round ratios [min-max]",
        "",
        f"{'row':<38}{'median s':>9}  {'ratio':<26}{'target':<24}result",
        f"{floor_row:<38}{med['floor']:>9.3f}  {'1.000x':<26}{'':<24}",
    ]
    r = res["ours_over_floor"]
    verdict = "PASS" if statistics.median(r) <= TARGET_FLOOR_RATIO else "MISS"
    lines.append(
        f"{'audit deletion_curve (vs floor)':<38}{med['ours']:>9.3f}  {_ratio(r):<26}"
        f"{f'<= {TARGET_FLOOR_RATIO}x floor':<24}{verdict}"
    )
    if "quantus" in times:
        qr = res["quantus_over_ours"]
        target = f">= {TARGET_QUANTUS_SPEEDUP_CUDA:.0f}x"
        if cfg.device == "cuda":
            verdict = "PASS" if statistics.median(qr) >= TARGET_QUANTUS_SPEEDUP_CUDA else "MISS"
        else:
            target, verdict = target + " (CUDA only)", "info (CPU)"
        lines.append(
            f"{'quantus PixelFlipping 0.6 (vs ours)':<38}{med['quantus']:>9.3f}  "
            f"{_ratio(qr):<26}{target:<24}{verdict}"
        )
        lo, hi = res["curve_range"]
        lines += [
            "",
            "agreement with Quantus on the same ranking (its point j = our point j + 1): "
            f"max |curve diff| {res['max_curve_diff']:.2e} (curves span [{lo:.4f}, {hi:.4f}]); "
            f"max |AUC diff| {res['max_auc_diff']:.2e} with our area (trapezoid at x = k / steps) of its curve "
            "(Quantus' own AUC, trapezoid with dx=1 over its points without the unperturbed "
            "one, is on another scale)",
        ]
    else:
        lines.append(f"{'quantus PixelFlipping':<38}skipped: quantus is not installed")
    return "\n".join(lines)


def main() -> None:
    """Run the bench with the default configuration and print its table."""
    print(_table(run()))
