"""Bounded memory: the evidence of 512 probes at 224x224 on ResNet-50 with chunking by ``max_batch``.

On CUDA it runs the audit engine's :func:`audit.evidence.attribution.collect` (Grad-CAM, saliency,
LRP, deletion curves of 16 steps) over 512 random 224x224 probes on torchvision's
ResNet-50 (random weights) with ``max_batch=64`` and prints the peak GPU memory. A
single un-chunked captum call on VGG-11 with 256 such images ran out of an H100's
80 GB (the issue's anchor); here memory grows with ``max_batch``, not with the probe
count, which the run shows by repeating it with 128 probes. Without CUDA it says so
and skips.
"""

from __future__ import annotations

import time

import torch


def _probe_set(n: int, size: int):
    from audit.probes import ProbeSet

    gen = torch.Generator().manual_seed(0)
    return ProbeSet(
        images=torch.rand(n, 3, size, size, generator=gen),
        labels=torch.randint(0, 1000, (n,), generator=gen),
        class_names=[f"c{i}" for i in range(1000)],
    )


def main() -> None:
    if not torch.cuda.is_available():
        print(
            "memory: skipped (needs CUDA; the target is 512 probes at 224x224 on ResNet-50 on a GPU)"
        )
        return
    import torchvision

    from audit.evidence.attribution import collect

    model = torchvision.models.resnet50(weights=None).eval().cuda()
    print(
        "ResNet-50 (random weights), gradcam + saliency + lrp, deletion with 16 steps, max_batch=64, on cuda"
    )
    for n in (128, 512):
        probes = _probe_set(n, 224)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        ev = collect(model, probes, ("gradcam", "saliency", "lrp"), ("deletion",), max_batch=64)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        print(
            f"  {n:>4} probes: peak {peak:6.2f} GiB above the model, {time.perf_counter() - t0:6.1f} s, "
            f"deletion AUC mean {float(ev.scores['gradcam']['deletion'].mean()):.3f}"
        )


if __name__ == "__main__":
    main()
