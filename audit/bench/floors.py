"""The whole audit against the sum of its floors (target: at most 1.5x on CPU).

The floors are what the audit cannot do without, timed on this machine in the same
process: one forward per probe for the behaviour; for the faithfulness curves, every
distinct perturbed image once (per explained probe and baseline: the unperturbed and
the all-baseline image, and ``steps - 1`` inner steps per method and curve); one
forward+backward per map (every method on every explained probe, and on every sanity
probe for the original and the randomized model). A forward costs what the fastest of
the plain model and the audit's folded channels-last copy (:func:`audit.evidence.attribution.inference_copy`)
takes per image at the engine's ``max_batch``, under ``torch.inference_mode``; a
forward+backward what an input gradient of the target logit takes per image at the
same batch. The audit is :func:`audit.pipeline.run_audit` with the default config (what
``model-audit`` runs) on the default synthetic probe set (256 per group at 64 px,
1,024 probes), timed whole and per stage from its progress lines.

``python -m audit.bench.floors [--models small_cnn resnet18_small] [--device cpu|cuda]
[--size 64] [--per-group 256]``; ``make bench`` runs it for SmallCNN and ResNet-18 on
CPU, and ResNet-50 at 224 px on CUDA when a GPU is present.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

TARGET_CPU = 1.5
ROUNDS = 5

__all__ = ["floors", "main", "measure"]


def _per_image(fn, n: int, rounds: int = ROUNDS) -> float:
    fn()  # warm-up (oneDNN primitive creation, allocator)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / n


def unit_costs(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Seconds per image of a forward (best layout) and of a forward+backward, at batch ``len(x)``."""
    from audit.evidence.attribution import inference_copy

    model = model.eval()
    with torch.inference_mode():
        plain = _per_image(lambda: model(x), len(x))
        expected = model(x)
    folded = inference_copy(model, x, expected.clone())
    fast = plain
    if folded is not None:
        xc = x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x
        with torch.inference_mode():
            fast = min(plain, _per_image(lambda: folded(xc), len(x)))
    for p in model.parameters():
        p.requires_grad_(False)

    def fwd_bwd() -> None:
        xi = x.detach().clone().requires_grad_(True)
        out = model(xi)
        out.gather(1, labels[:, None]).sum().backward()

    return {
        "forward": fast,
        "forward_plain": plain,
        "forward_backward": _per_image(fwd_bwd, len(x)),
    }


def floors(
    engine: dict, n_probes: int, n_explained: int, n_sanity: int
) -> dict[str, dict[str, int]]:
    """Forwards and forward+backwards the audit cannot avoid, per stage."""
    methods = len(engine["methods"])
    baselines = 1 + len(engine["also_baselines"])
    per_probe = 2 + methods * 2 * (int(engine["steps"]) - 1)  # deletion and LeRF, shared ends
    return {
        "behaviour": {"forward": n_probes, "forward_backward": 0},
        "attribution": {
            "forward": baselines * n_explained * per_probe,
            "forward_backward": methods * n_explained,
        },
        "sanity": {"forward": 0, "forward_backward": 2 * methods * n_sanity},
    }


def measure(net: str, device: str, size: int, per_group: int) -> dict[str, object]:
    """Audit a randomly initialised ``net`` (a ``conf/net`` name) and time it against its floors."""
    from importlib import resources

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from audit.datasets import snow_wolf
    from audit.defaults import default_config
    from audit.pipeline import run_audit

    if net == "resnet50":  # the GPU row: torchvision's own, random weights
        from torchvision.models import resnet50

        torch.manual_seed(0)
        model = resnet50(num_classes=2)
    else:
        cfg = OmegaConf.load(str(resources.files("audit.conf") / "net" / f"{net}.yaml"))
        torch.manual_seed(0)
        model = instantiate(cfg)
    model = model.eval().to(device)
    probes = snow_wolf.probe_set(per_group, size=size, seed=2024)
    engine = dict(default_config()["engine"])
    engine["device"] = device
    n_explained = min(len(probes), int(engine["attribution_probes"]))
    n_sanity = min(len(probes), int(engine["sanity_probes"]))
    x = probes.images[: engine["max_batch"]].to(device)
    unit = unit_costs(model, x, probes.labels[: len(x)].to(device))

    marks: list[tuple[float, str]] = []

    def note(line: str) -> None:
        if not line.startswith(" "):  # a stage starts (inner lines are indented)
            marks.append((time.perf_counter(), line.split(":", 1)[0]))

    t0 = time.perf_counter()
    result = run_audit(model, probes, {"engine": {"device": device}}, progress=note)
    wall = time.perf_counter() - t0
    ends = [t for t, _ in marks[1:]] + [t0 + wall]
    stage_s: dict[str, float] = {}
    for (start, name), end in zip(marks, ends, strict=True):
        stage_s[name] = stage_s.get(name, 0.0) + end - start
    need = floors(engine, len(probes), n_explained, n_sanity)
    floor_s = {
        k: v["forward"] * unit["forward"] + v["forward_backward"] * unit["forward_backward"]
        for k, v in need.items()
    }
    return {
        "net": net,
        "device": device,
        "size": size,
        "probes": len(probes),
        "explained": n_explained,
        "wall": wall,
        "floor": sum(floor_s.values()),
        "stages": stage_s,
        "stage_floors": floor_s,
        "counts": need,
        "unit": unit,
        "verdict": result.verdict,
    }


def _print(res: dict[str, object], target: float | None) -> None:
    u = res["unit"]
    print(
        f"{res['net']} on {res['device']}, {res['probes']} probes at {res['size']} px ({res['explained']} explained): "
        f"forward {1e3 * u['forward']:.3f} ms/image (plain {1e3 * u['forward_plain']:.3f}), "
        f"forward+backward {1e3 * u['forward_backward']:.3f} ms/image"
    )
    print(
        f"  {'stage':<14} {'forwards':>9} {'fwd+bwd':>8} {'floor s':>8} {'audit s':>8} {'ratio':>6}"
    )
    for stage, need in res["counts"].items():
        f, s = res["stage_floors"][stage], res["stages"].get(stage, 0.0)
        print(
            f"  {stage:<14} {need['forward']:>9,} {need['forward_backward']:>8,} {f:8.1f} {s:8.1f} "
            f"{s / f if f else float('nan'):6.2f}"
        )
    ratio = res["wall"] / res["floor"]
    status = (
        ""
        if target is None
        else f"  target <= {target:.1f}x: {'PASS' if ratio <= target else 'MISS'}"
    )
    print(
        f"  {'whole audit':<14} {'':>9} {'':>8} {res['floor']:8.1f} {res['wall']:8.1f} {ratio:6.2f}{status}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m audit.bench.floors", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--models",
        nargs="*",
        default=None,
        help="conf/net names (default: small_cnn resnet18_small)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: both where present)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-group", type=int, default=256)
    args = parser.parse_args([] if argv is None else list(argv))
    print(f"threads: {torch.get_num_threads()}")
    runs: list[tuple[str, str, int]] = []
    if args.device in (None, "cpu"):
        runs += [(m, "cpu", args.size) for m in args.models or ("small_cnn", "resnet18_small")]
    if args.device in (None, "cuda") and torch.cuda.is_available():
        runs += [(m, "cuda", args.size) for m in args.models or ()] or [("resnet50", "cuda", 224)]
    elif args.device == "cuda":
        print("no CUDA device: the GPU row is skipped")
    for net, device, size in runs:
        _print(measure(net, device, size, args.per_group), TARGET_CPU if device == "cpu" else None)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
