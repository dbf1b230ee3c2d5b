"""Measuring on the benchmark's device, shared by the sections of ``bench_gpu.py``: the resolved
settings of a run (:class:`Setup`), device synchronisation, peak memory and median timings."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Setup:
    cuda: bool
    device: torch.device
    train_steps: int
    train_batch: int
    render_batches: tuple[int, ...]
    render_steps: int
    render_modes: tuple[str, ...]
    workers: int
    rows: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 matmul rate of this GPU (8192^3, the best of 10 after warm-up): the MFU denominator."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = min(median_seconds(lambda: a @ b, device, 1) for _ in range(10))
    return 2 * 8192**3 / best / 1e12
