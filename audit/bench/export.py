"""LRP on an exported program against one forward+backward of the same program.

``python -m audit.bench export``: a random torchvision ResNet-50 at 224 px exported with
``torch.export`` (dynamic batch), ``explain("lrp", ep.module(), x)`` (the graph backend)
timed against one forward+backward of ``ep.module()`` (the input gradient of the target
logits), and the same for the eager network. Each round times both back to back (the same
load on a shared machine); the median of the per-round ratios, CPU or the first GPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torchvision.models as tvm
from torch import nn

from audit.methods import explain


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _paired(
    base: Callable[[], object], lrp: Callable[[], object], rounds: int
) -> tuple[float, float]:
    """``(median LRP seconds, median of per-round LRP / base ratios)``.

    Each round times one forward+backward and one LRP call back to back, so both see the
    same load on a shared machine; the ratio is taken per round, then the median.
    """
    base(), lrp()  # warm-up (plans, caches, allocator)
    pairs = [(_seconds(base), _seconds(lrp)) for _ in range(rounds)]
    return statistics.median(t for _, t in pairs), statistics.median(t / b for b, t in pairs)


def _forward_backward(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor
) -> Callable[[], object]:
    def run() -> object:
        xin = x.detach().requires_grad_(True)
        logits = model(xin)
        return torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xin)

    return run


def rows(batch: int = 2, size: int = 224, rounds: int = 3) -> list[tuple[str, float, float]]:
    """``(what, seconds, x one forward+backward)`` for the eager and the exported ResNet-50."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = tvm.resnet50(num_classes=10).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(batch, 3, size, size, device=device)
    target = torch.zeros(batch, dtype=torch.long, device=device)
    dim = torch.export.Dim("batch", min=1, max=64)
    graph = torch.export.export(model, (x,), dynamic_shapes=({0: dim},)).module()
    for p in graph.parameters():
        p.requires_grad_(False)
    out = []
    for what, net in (("eager ResNet-50", model), ("exported ResNet-50 (ep.module())", graph)):
        lrp = lambda net=net: explain("lrp", net, x, target, max_batch=batch)  # noqa: E731
        seconds, ratio = _paired(_forward_backward(net, x, target), lrp, rounds)
        out.append((f"lrp, {what}", seconds, ratio))
    return out


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"LRP (epsilon_plus_flat) vs one forward+backward of the same model, batch 2, 224 px, {device}"
    )
    for what, seconds, ratio in rows():
        print(f"  {what:45s} {seconds * 1000:8.0f} ms  {ratio:5.2f}x one forward+backward")


if __name__ == "__main__":
    main()
