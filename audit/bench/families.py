"""Every torchvision family against every registered method: works, or why not; LRP conservation.

``python -m audit.bench.families [--families resnet18 vit_b_16 ...] [--methods ...] [--images 2]``

Random weights (nothing can be downloaded here), with BatchNorm statistics calibrated
on a random batch (with torchvision's initial statistics deep nets such as EfficientNet
shrink every activation to logits of ~1e-13, and every map is zero) and ViT's
zero-initialised head re-drawn (else every gradient is zero). Inputs are 64 px, 96 px
for Inception v3 (its stem needs at least 75) and 224 px for ViT-B/16 and MaxViT-T
(fixed input sizes). The target is the predicted class.

For LRP the row also says which backend ran, the operation rules the general backend
applied (see ``audit.methods._lrp_general``) and conservation: the relevance summed
over the image divided by the explained logit, mean over the images, for the default
composite (``epsilon_plus_flat``) and for ``epsilon``. 1 is exact conservation; biases,
BatchNorm shifts, softmax and the stabilizers absorb the rest.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torchvision.models as tvm
from torch import nn

from audit.methods import METHODS, explain
from audit.methods.lrp import lrp_rules

__all__ = ["FAMILIES", "build", "calibrate", "run", "main"]


def _vit_b_16() -> nn.Module:
    m = tvm.vit_b_16(num_classes=2)
    nn.init.normal_(m.heads.head.weight, std=0.02)
    return m


#: family member -> (builder, input size)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (lambda: tvm.resnet18(num_classes=2), 64),
    "resnext50_32x4d": (lambda: tvm.resnext50_32x4d(num_classes=2), 64),
    "wide_resnet50_2": (lambda: tvm.wide_resnet50_2(num_classes=2), 64),
    "vgg11_bn": (lambda: tvm.vgg11_bn(num_classes=2), 64),
    "alexnet": (lambda: tvm.alexnet(num_classes=2), 64),
    "densenet121": (lambda: tvm.densenet121(num_classes=2), 64),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(num_classes=2), 64),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=2), 64),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=2), 64),
    "efficientnet_v2_s": (lambda: tvm.efficientnet_v2_s(num_classes=2), 64),
    "convnext_tiny": (lambda: tvm.convnext_tiny(num_classes=2), 64),
    "regnet_y_400mf": (lambda: tvm.regnet_y_400mf(num_classes=2), 64),
    "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(num_classes=2), 64),
    "squeezenet1_1": (lambda: tvm.squeezenet1_1(num_classes=2), 64),
    "mnasnet0_5": (lambda: tvm.mnasnet0_5(num_classes=2), 64),
    "googlenet": (lambda: tvm.googlenet(num_classes=2, aux_logits=False, init_weights=True), 64),
    "inception_v3": (
        lambda: tvm.inception_v3(num_classes=2, aux_logits=False, init_weights=True),
        96,
    ),
    "swin_t": (lambda: tvm.swin_t(num_classes=2), 64),
    "swin_v2_t": (lambda: tvm.swin_v2_t(num_classes=2), 64),
    "vit_b_16": (_vit_b_16, 224),
    "maxvit_t": (lambda: tvm.maxvit_t(num_classes=2), 224),
}


def calibrate(model: nn.Module, size: int, seed: int = 0) -> nn.Module:
    """BatchNorm running statistics set to those of a random batch (as after training); eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative: the batch's own statistics
    g = torch.Generator().manual_seed(seed + 99)
    with torch.no_grad():
        model.train()(torch.rand(4, 3, size, size, generator=g))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def build(name: str, seed: int = 0) -> tuple[nn.Module, int]:
    """The family member ``name`` with calibrated random weights, and its input size."""
    make, size = FAMILIES[name]
    torch.manual_seed(seed)
    return calibrate(make(), size, seed), size


def _conservation(model: nn.Module, x: torch.Tensor, target: torch.Tensor, composite: str) -> float:
    rel = explain("lrp", model, x, target, composite=composite)
    with torch.no_grad():
        logit = model(x).gather(1, target[:, None]).squeeze(1)
    return float((rel.sum(dim=(1, 2, 3)) / logit).mean())


def run(name: str, methods: list[str], n_images: int = 2) -> dict:
    """One family's row: ``{"method": "ok 1.2 s" or the error, ..., "lrp_info": {...}}``."""
    model, size = build(name)
    x = torch.rand(n_images, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(1)
    row: dict = {"family": name, "size": size}
    for method in methods:
        start = time.perf_counter()
        try:
            maps = explain(method, model, x, target)
            if not bool(torch.isfinite(maps).all()):
                row[method] = "non-finite maps"
            elif not bool((maps.abs().flatten(1).sum(1) > 0).all()):
                row[method] = f"ok {time.perf_counter() - start:.1f} s (a map is all zero)"
            else:
                row[method] = f"ok {time.perf_counter() - start:.1f} s"
        except Exception as e:  # noqa: BLE001 (the bench reports every failure as a cell)
            row[method] = f"{type(e).__name__}: {str(e).split(';')[0][:160]}"
    if "lrp" in methods and row["lrp"].startswith("ok"):
        info = lrp_rules(model, x)
        info["conservation"] = {
            c: _conservation(model, x, target, c) for c in ("epsilon_plus_flat", "epsilon")
        }
        row["lrp_info"] = info
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(
        prog="python -m audit.bench.families", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--images", type=int, default=2)
    args = ap.parse_args(argv)
    methods = args.methods or sorted(m for m in METHODS if m != "actmax")
    rows = []
    print("| family | px | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for name in args.families:
        row = run(name, methods, args.images)
        rows.append(row)
        print(
            f"| {name} | {row['size']} | " + " | ".join(row[m] for m in methods) + " |", flush=True
        )
    print(
        "\n| family | LRP backend | conservation (epsilon_plus_flat / epsilon) | unmerged BatchNorms | "
        "fixed SE gates | operation rules |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        info = row.get("lrp_info")
        if info is None:
            continue
        c = info["conservation"]
        print(
            f"| {row['family']} | {info['backend']} | {c['epsilon_plus_flat']:.3f} / {c['epsilon']:.3f} | "
            f"{len(info['batchnorm_unmerged'])} | {info['fixed_gates']} | "
            f"{', '.join(info['operation_rules']) or '-'} |",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
