"""Benchmark generation speed: 10,000 snow-wolf images at 64x64 (target: under 10 s)."""

from __future__ import annotations

import statistics
import time

import torch

from audit.datasets import snow_wolf

TARGET_SECONDS = 10.0


def main(rounds: int = 3) -> None:
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        snow_wolf.generate(10_000, correlation=0.95, size=64, seed=r)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"threads: {torch.get_num_threads()}")
    print(f"{'what':<40} {'median s':>9} {'target':>8}  result")
    status = "PASS" if med < TARGET_SECONDS else "MISS"
    print(f"{'snow_wolf.generate(10000, size=64)':<40} {med:9.2f} {'< 10 s':>8}  {status}")
    print(f"rounds: {', '.join(f'{t:.2f}' for t in times)}")
